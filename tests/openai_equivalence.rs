//! ddpm against OpenAI's improved-diffusion and guided-diffusion (pinned commits, torch 2.15.0;
//! tests/fixtures/make_openai_fixture.py, tests/fixtures/openai/README.md). Each fixture is a
//! `.pt` state dict of randomised weights and the flag string of their scripts; ddpm imports it
//! as `ddpm import --improved-diffusion/--guided-diffusion` does and must give
//!
//! - the raw network output of their `UNetModel` at t ∈ {0, 10, 500, 999}, to
//!   1e-4 · max(1, |y|max) against their float32 and float64 outputs (learned sigma with 4 heads,
//!   scale-shift and the cosine schedule; one head with fixed variance; class labels with other
//!   heads on the way up; guided's head width, residual up/down blocks and the new qkv order; the
//!   legacy order with 2 and 4 heads);
//! - their diffusion: the kept timesteps of `--timestep_respacing`, the respaced β, the timestep
//!   the network is given (`rescale_timesteps`), and `p_mean_variance` (mean, variance,
//!   log-variance, x̂_0; learned range included) from ddpm's own network output;
//! - one clear error for a float16 checkpoint and for a super-resolution model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ddpm::diffusion::{p_mean_variance, ModelOutput, NoiseSchedule, Parameterization};
use ddpm::interop::openai::{self, Family, Flags};
use ddpm::io::npz::read_npz;
use ddpm::nn::UNet;
use ddpm::sample::respace;
use ddpm::Var;
use ndarray::ArrayD;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openai")
}

fn npz(name: &str) -> BTreeMap<String, ArrayD<f64>> {
    read_npz(&dir().join(format!("{name}.npz")))
        .expect("fixture reads")
        .into_iter()
        .map(|e| (e.name, e.values))
        .collect()
}

fn flags(name: &str) -> String {
    std::fs::read_to_string(dir().join(format!("{name}.flags.txt"))).expect("flags file").trim().to_string()
}

fn family(name: &str) -> Family {
    if name.starts_with("guided") {
        Family::Guided
    } else {
        Family::Improved
    }
}

fn max_err(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// `name` with the weights of `weights` (fixtures that differ only in flags share a file).
fn check(name: &str, weights: &str) {
    let m = openai::load(&dir().join(format!("{weights}.pt")), &flags(name), family(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let net = UNet::new(m.unet.clone()).expect("validated by load");
    let f = npz(name);
    let labels: Option<Vec<usize>> = f.get("y").map(|y| y.iter().map(|&c| c as usize).collect());
    let bound = m.params.bind_constant();
    let run = |t: &[f32]| {
        net.forward_labelled(&bound, &Var::constant(f["x"].mapv(|v| v as f32)), t, labels.as_deref(), None)
            .value()
            .mapv(f64::from)
    };
    // The raw network at the fixture's t.
    let t: Vec<f32> = f["t"].iter().map(|&t| t as f32).collect();
    let y = run(&t);
    let tol = 1e-4 * f["out_f64"].iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let (e32, e64) = (max_err(&y, &f["out"]), max_err(&y, &f["out_f64"]));
    println!("{name}: network max |ddpm − theirs| f32 {e32:.2e}, f64 {e64:.2e} (bound {tol:.1e})");
    assert!(e32 <= tol && e64 <= tol, "{name}: {e32:.2e} / {e64:.2e} > {tol:.1e}");

    // The diffusion the flags describe.
    let flags = Flags::parse(&flags(name), family(name)).expect("parsed by load");
    let big_t = m.diffusion.timesteps;
    assert_eq!(big_t as f64, f["original_num_steps"].iter().next().copied().expect("scalar"), "{name}: T");
    let kept = flags.kept_timesteps(big_t).expect("their respacing");
    let want_map: Vec<usize> = f["timestep_map"].iter().map(|&v| v as usize).collect();
    assert_eq!(kept, want_map, "{name}: kept timesteps");
    let full =
        NoiseSchedule::new(&m.diffusion.schedule, big_t, m.diffusion.convention.settings()).expect("valid");
    let sched = if kept.len() == big_t { full.clone() } else { respace(&full, &kept).expect("valid") };
    let betas_err =
        sched.betas().iter().zip(&f["betas"]).map(|(a, b)| ((a - b) / b).abs()).fold(0.0, f64::max);
    assert_eq!(sched.betas().len(), f["betas"].len());
    assert!(betas_err < 1e-12, "{name}: β relative error {betas_err:e}");
    let pmv_t: Vec<usize> = f["pmv_t"].iter().map(|&v| v as usize).collect();
    let model_t: Vec<f32> = pmv_t.iter().map(|&i| full.model_timestep(kept[i]) as f32).collect();
    let want_t: Vec<f32> = f["pmv_model_t"].iter().map(|&v| v as f32).collect();
    assert_eq!(model_t, want_t, "{name}: the timestep the network is given");
    let out = ModelOutput::split(run(&model_t), m.diffusion.variance_type);
    let param =
        Parameterization { mean_type: m.diffusion.mean_type, variance_type: m.diffusion.variance_type };
    let x = f["x"].clone();
    let p = p_mean_variance(&sched, &param, &x, &pmv_t, &out, true);
    let errs = [
        ("mean", max_err(&p.mean, &f["pmv_mean"])),
        ("variance", max_err(&p.variance, &f["pmv_variance"])),
        ("log_variance", max_err(&p.log_variance, &f["pmv_log_variance"])),
        ("pred_xstart", max_err(&p.x0_pred, &f["pmv_pred_xstart"])),
    ];
    println!("{name}: p_mean_variance max |ddpm − theirs| {errs:?} (β rel {betas_err:.1e})");
    for (what, e) in errs {
        assert!(e <= 1e-3, "{name}: {what} {e:e}");
    }
}

#[test]
fn improved_learned_sigma_four_heads_scale_shift_cosine_respaced() {
    check("improved_sigma", "improved_sigma");
}

#[test]
fn improved_class_conditional_with_other_heads_on_the_way_up() {
    check("improved_class", "improved_class");
}

#[test]
fn improved_fixed_variance_one_head() {
    check("improved_fixed", "improved_class");
}

#[test]
fn guided_head_width_resblock_updown_new_attention_order() {
    check("guided_heads", "guided_heads");
}

#[test]
fn guided_legacy_attention_order_two_and_four_heads() {
    check("guided_legacy", "guided_heads");
}

#[test]
fn half_precision_checkpoints_and_super_resolution_models_are_refused_in_one_line() {
    let e = openai::load(&dir().join("guided_fp16.pt"), &flags("guided_fp16"), Family::Guided)
        .expect_err("float16 weights")
        .to_string();
    assert!(e.contains("guided_fp16.pt") && !e.contains('\n'), "{e}");
    assert!(e.to_lowercase().contains("half") || e.contains("float16") || e.contains("F16"), "{e}");
    let e = openai::load(&dir().join("superres_stub.pt"), &flags("superres"), Family::Improved)
        .expect_err("a super-resolution model")
        .to_string();
    assert!(e.contains("super-resolution") && !e.contains('\n'), "{e}");
    // The same stem under image-model flags is still recognised by its 6 input channels.
    let e =
        openai::load(&dir().join("superres_stub.pt"), "--image_size 64 --num_channels 32", Family::Improved)
            .expect_err("a super-resolution stem")
            .to_string();
    assert!(e.contains("super-resolution") && e.contains("input_blocks.0.0.weight"), "{e}");
}

/// `ddpm import --improved-diffusion` then `ddpm predict --class`: the command line gives the
/// library's numbers, and class-conditional models refuse what they cannot do.
#[test]
fn import_then_predict_on_the_command_line() {
    let bin = env!("CARGO_BIN_EXE_ddpm");
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| std::process::Command::new(bin).args(args).output().expect("ddpm runs");
    let out = tmp.path().join("run");
    let o = run(&[
        "import",
        "--improved-diffusion",
        dir().join("improved_class.pt").to_str().unwrap(),
        "--flags",
        &flags("improved_class"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = npz("improved_class");
    // Image 1 of the fixture: t = 10, class 123; the network is given t itself (no rescaling).
    let x = tmp.path().join("x.npy");
    ddpm::io::npz::write_npy_f32(
        &x,
        &f["x"].index_axis(ndarray::Axis(0), 1).insert_axis(ndarray::Axis(0)).mapv(|v| v as f32).into_dyn(),
    )
    .unwrap();
    let (t, class) = (f["t"][1] as u64, f["y"][1] as u64);
    assert_eq!((t, class), (10, 123), "the fixture's second image");
    let y = tmp.path().join("y.npy");
    let predict = |extra: &[&str]| {
        let mut a = vec![
            "predict",
            "--model",
            out.to_str().unwrap(),
            "--x",
            x.to_str().unwrap(),
            "--t",
            "10",
            "--out",
            y.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        run(&a)
    };
    let o = predict(&["--class", "123"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = ddpm::io::npz::read_npy_f32(&y).unwrap().mapv(f64::from);
    let want =
        f["out_f64"].index_axis(ndarray::Axis(0), 1).insert_axis(ndarray::Axis(0)).to_owned().into_dyn();
    let tol = 1e-4 * want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    assert!(max_err(&got, &want) <= tol, "{} > {tol}", max_err(&got, &want));
    for (extra, needle) in [(&[][..], "class-conditional"), (&["--class", "1000"][..], "has 1000 (0..=999)")]
    {
        let o = predict(extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(needle) && err.lines().count() == 1, "{err}");
    }
    let o = run(&["eval", "--checkpoint", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("label"), "{err}");
}

/// The diffusers configs that tests/fixtures/make_openai_export_fixture.py exported with this
/// binary and loaded in diffusers (where the outputs matched their library's to 7e-6, its
/// errors.json): ddpm still writes exactly these from the same flags.
#[test]
fn exported_diffusers_configs_are_the_ones_diffusers_was_checked_with() {
    let export = dir().join("export");
    for (name, family) in [
        ("improved_export", Family::Improved),
        ("improved_class_export", Family::Improved),
        ("guided_export", Family::Guided),
    ] {
        let flags = std::fs::read_to_string(export.join(format!("{name}.flags.txt"))).unwrap();
        let f = Flags::parse(flags.trim(), family).unwrap();
        let mut ours = ddpm::interop::diffusers::unet_config_to_json(&f.unet_config().unwrap()).unwrap();
        let text = std::fs::read_to_string(export.join(format!("{name}.config.json"))).unwrap();
        let mut theirs: serde_json::Value = serde_json::from_str(&text).unwrap();
        for v in [&mut ours, &mut theirs] {
            v.as_object_mut().unwrap().remove("_diffusers_version");
        }
        assert_eq!(ours, theirs, "{name}");
    }
}

/// A model given t·1000/T (improved-diffusion's rescale_timesteps) with T ≠ 1000 cannot be a
/// diffusers folder: UNet2DModel is given t itself, so the export would load and compute another
/// function. Refused; the same network at T = 1000, or given t itself, exports.
#[test]
fn an_export_that_would_change_the_networks_timestep_is_refused() {
    use ddpm::interop::diffusers::SchedulerSettings;
    let m =
        openai::load(&dir().join("improved_sigma.pt"), &flags("improved_sigma"), Family::Improved).unwrap();
    assert_eq!(
        (m.diffusion.timesteps, m.diffusion.convention),
        (4000, ddpm::diffusion::Convention::ImprovedDiffusion)
    );
    let e = SchedulerSettings::from_diffusion(&m.diffusion, true).unwrap_err().to_string();
    assert!(e.contains("t·1000/T") && e.contains("4000"), "{e}");
    let guided = ddpm::train::DiffusionConfig {
        convention: ddpm::diffusion::Convention::GuidedDiffusion,
        ..m.diffusion.clone()
    };
    SchedulerSettings::from_diffusion(&guided, true).expect("t itself at T = 4000");
    let thousand = ddpm::train::DiffusionConfig { timesteps: 1000, ..m.diffusion };
    SchedulerSettings::from_diffusion(&thousand, true).expect("×1 at T = 1000");
}

/// `--timestep_respacing` their sampler would refuse is refused at import, naming it.
#[test]
fn a_respacing_their_code_refuses_is_refused_at_import() {
    let e = openai::load(
        &dir().join("improved_class.pt"),
        &format!("{} --timestep_respacing banana", flags("improved_class")),
        Family::Improved,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--timestep_respacing"), "{e}");
}
