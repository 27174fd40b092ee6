//! The interop commands end to end on the committed diffusers fixture (tests/fixtures/diffusers/small):
//! `ddpm trace` on a diffusers folder and on its import, `ddpm compare` of the two traces, and
//! the refusal of a config ddpm cannot map.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ddpm::io::npz::read_npz;
use ndarray::ArrayD;

fn small() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers/small")
}

fn ddpm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm")).args(args).output().expect("the ddpm binary runs")
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "ddpm failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn arrays(path: &Path) -> BTreeMap<String, ArrayD<f64>> {
    read_npz(path).expect("npz reads").into_iter().map(|e| (e.name, e.values)).collect()
}

#[test]
fn trace_of_a_diffusers_folder_equals_the_trace_of_its_import_and_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let small = small();
    let common = ["--seed", "3", "--num", "2", "--keep", "999,500,0", "--threads", "1"];
    ok(ddpm(
        &[&["trace", "--checkpoint", small.to_str().unwrap(), "--out", &p("a.npz")], &common[..]].concat(),
    ));
    ok(ddpm(&["import", "--diffusers", small.to_str().unwrap(), "--out", &p("run")]));
    ok(ddpm(&[&["trace", "--checkpoint", &p("run"), "--out", &p("b.npz")], &common[..]].concat()));
    let out = ok(ddpm(&["compare", &p("a.npz"), &p("b.npz"), "--rtol", "0", "--atol", "0"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("all 24 arrays match"));

    let a = arrays(&dir.path().join("a.npz"));
    assert_eq!(a["timesteps"].iter().copied().collect::<Vec<_>>(), vec![999.0, 500.0, 0.0]);
    assert_eq!(a["t0999.x_t"], a["x_T"]);
    assert_eq!(a["t0000.x_prev"], a["x_0"]);
    assert!(a["t0000.noise"].iter().all(|&z| z == 0.0));
    // x_{t−1} = mean + √variance · z at every kept step.
    for t in ["t0999", "t0500"] {
        let (mean, var, z, prev) = (
            &a[&format!("{t}.mean")],
            &a[&format!("{t}.variance")],
            &a[&format!("{t}.noise")],
            &a[&format!("{t}.x_prev")],
        );
        let want = mean + &(var.mapv(f64::sqrt) * z);
        assert!(want.iter().zip(prev).all(|(w, g)| (w - g).abs() < 1e-12), "{t}");
    }
    // The imported scheduler clips (clip_sample = true): x̂_0 stays in [−1, 1].
    assert!(a["t0500.x0_pred"].iter().all(|v| v.abs() <= 1.0));
}

#[test]
fn unmappable_diffusers_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("model");
    std::fs::create_dir(&folder).unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"] {
        std::fs::copy(small().join(file), folder.join(file)).unwrap();
    }
    let config = std::fs::read_to_string(small().join("config.json")).unwrap();
    let changed = config
        .replace("\"resnet_time_scale_shift\": \"default\"", "\"resnet_time_scale_shift\": \"spatial\"");
    assert_ne!(changed, config);
    std::fs::write(folder.join("config.json"), changed).unwrap();
    let out = ddpm(&[
        "import",
        "--diffusers",
        folder.to_str().unwrap(),
        "--out",
        dir.path().join("run").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`resnet_time_scale_shift`") && err.contains("config.json"), "{err}");
}
