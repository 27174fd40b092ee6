//! The `ddpm` binary end to end on tiny data: train → sample → eval, exact resume, a run
//! killed with SIGKILL, and the error paths a user meets. Data are generated here (8x8 IDX
//! images), so nothing outside the repository is needed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{stderr, write_squares_idx, write_squares_labels};

fn ddpm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm")).args(args).output().expect("the binary runs")
}

fn write_idx(dir: &Path) -> PathBuf {
    write_squares_idx(dir, 64)
}

fn train_args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--preset",
        "tiny",
        "--data",
        data,
        "--out",
        out,
        "--steps",
        steps,
        "--batch",
        "8",
        "--timesteps",
        "50",
        "--warmup",
        "5",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "5",
        "--sample-count",
        "4",
        "--sample-steps",
        "5",
        "--threads",
        "2",
    ]
}

#[test]
fn train_sample_eval_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_idx(dir.path());
    let out = dir.path().join("run");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let r = ddpm(&train_args(d, o, "30"));
    assert!(r.status.success(), "train failed: {}", stderr(&r));
    for f in ["checkpoint.safetensors", "metrics.csv", "loss.png", "samples/step_000030.png"] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    // The loss falls: mean of the last 10 steps below the mean of the first 10.
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let losses: Vec<f64> =
        csv.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect();
    assert_eq!(losses.len(), 30);
    let (first, last) = (losses[..10].iter().sum::<f64>(), losses[20..].iter().sum::<f64>());
    assert!(last < first, "loss did not fall: first {first}, last {last}");

    let samples = dir.path().join("samples");
    let s = samples.to_str().unwrap();
    let r = ddpm(&[
        "sample",
        "--checkpoint",
        o,
        "--num",
        "5",
        "--steps",
        "10",
        "--out",
        s,
        "--trajectory",
        "--threads",
        "2",
    ]);
    assert!(r.status.success(), "sample failed: {}", stderr(&r));
    for f in ["grid.png", "000000.png", "000004.png", "trajectory.png"] {
        assert!(samples.join(f).is_file(), "missing {f}");
    }
    let grid = image::open(samples.join("grid.png")).unwrap();
    // 3 columns x 2 rows of 8x8 images with 2-pixel borders.
    assert_eq!((grid.width(), grid.height()), (3 * 10 + 2, 2 * 10 + 2));

    let r = ddpm(&[
        "sample",
        "--checkpoint",
        o,
        "--num",
        "2",
        "--sampler",
        "ddim",
        "--steps",
        "5",
        "--out",
        s,
        "--grid-only",
    ]);
    assert!(r.status.success(), "ddim failed: {}", stderr(&r));

    let r = ddpm(&["eval", "--checkpoint", o, "--data", d, "--limit", "4", "--json", "--threads", "2"]);
    assert!(r.status.success(), "eval failed: {}", stderr(&r));
    let report: serde_json::Value = serde_json::from_slice(&r.stdout).expect("eval --json prints JSON");
    let total = report["total_bpd"].as_f64().unwrap();
    let parts =
        ["prior_bpd", "kl_sum_bpd", "decoder_bpd"].iter().map(|k| report[k].as_f64().unwrap()).sum::<f64>();
    assert!(total.is_finite() && total > 0.0, "total bpd {total}");
    assert!((total - parts).abs() < 1e-9 * total.max(1.0), "the breakdown sums to the total");
}

#[test]
fn resumed_run_reaches_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_idx(dir.path());
    let d = data.to_str().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    assert!(ddpm(&train_args(d, a, "14")).status.success());
    assert!(ddpm(&train_args(d, b, "8")).status.success());
    let mut resume = train_args(d, b, "14");
    resume.push("--resume");
    let r = ddpm(&resume);
    assert!(r.status.success(), "resume failed: {}", stderr(&r));
    let ca = std::fs::read(Path::new(a).join("checkpoint.safetensors")).unwrap();
    let cb = std::fs::read(Path::new(b).join("checkpoint.safetensors")).unwrap();
    assert!(ca == cb, "checkpoints differ after resume");
}

#[test]
fn killed_run_resumes_from_an_intact_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_idx(dir.path());
    let out = dir.path().join("run");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let mut args = train_args(d, o, "100000");
    let every = args.iter().position(|a| *a == "--checkpoint-every").unwrap() + 1;
    args[every] = "1";
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddpm")).args(&args).spawn().unwrap();
    let ckpt = out.join("checkpoint.safetensors");
    let t0 = std::time::Instant::now();
    while !ckpt.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL, mid-write or not
    child.wait().unwrap();
    let loaded = ddpm::io::checkpoint::load(&ckpt).expect("the checkpoint left behind is complete");
    let mut resume = train_args(d, o, "0");
    let target = (loaded.step + 3).to_string();
    resume[8] = &target;
    resume.push("--resume");
    let r = ddpm(&resume);
    assert!(r.status.success(), "resume after kill failed: {}", stderr(&r));
    assert_eq!(ddpm::io::checkpoint::load(&ckpt).unwrap().step, loaded.step + 3);
}

#[test]
fn bad_inputs_get_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let o = out.to_str().unwrap();
    let missing = dir.path().join("nope");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--data".into(), missing.display().to_string()], "no such file"),
        (vec!["--data".into(), dir.path().join("empty").display().to_string()], "empty"),
        (
            vec![
                "--data".into(),
                dir.path().join("bad").display().to_string(),
                "--image-size".into(),
                "8".into(),
            ],
            "bad.png",
        ),
    ];
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    std::fs::create_dir(dir.path().join("bad")).unwrap();
    std::fs::write(dir.path().join("bad/bad.png"), b"not a png at all").unwrap();
    for (extra, needle) in cases {
        let mut args = vec!["train", "--out", o, "--steps", "1", "--preset", "tiny"];
        args.extend(extra.iter().map(String::as_str));
        let r = ddpm(&args);
        let e = stderr(&r);
        assert!(!r.status.success(), "{args:?} succeeded");
        assert!(e.to_lowercase().contains(needle), "{args:?}: stderr {e:?} lacks {needle:?}");
        assert!(!e.contains("panicked"), "{args:?} panicked: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{args:?}: not one line: {e}");
    }
}

#[test]
fn corrupt_truncated_and_foreign_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_idx(dir.path());
    let out = dir.path().join("run");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    assert!(ddpm(&train_args(d, o, "2")).status.success());
    let good = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let s = dir.path().join("s");
    let s = s.to_str().unwrap();
    let bad = dir.path().join("bad.safetensors");
    let b = bad.to_str().unwrap();
    for (bytes, needle) in [
        (good[..good.len() / 2].to_vec(), "bad.safetensors"),
        (b"hello".to_vec(), "bad.safetensors"),
        (
            {
                let mut g = good.clone();
                g[10] ^= 0xff;
                g
            },
            "bad.safetensors",
        ),
    ] {
        std::fs::write(&bad, &bytes).unwrap();
        let r = ddpm(&["sample", "--checkpoint", b, "--num", "1", "--out", s]);
        let e = stderr(&r);
        assert!(!r.status.success() && e.contains(needle) && !e.contains("panicked"), "stderr: {e}");
    }
    // A valid safetensors file that is not a ddpm checkpoint.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peer_tiny.safetensors");
    let r = ddpm(&["sample", "--checkpoint", fixture.to_str().unwrap(), "--num", "1", "--out", s]);
    let e = stderr(&r);
    assert!(!r.status.success() && e.contains("peer_tiny") && !e.contains("panicked"), "stderr: {e}");
    // A checkpoint resumed on data it does not fit: 16x16 images for a model of 8x8.
    let mut big = vec![0, 0, 8, 3];
    for d in [4u32, 16, 16] {
        big.extend_from_slice(&d.to_be_bytes());
    }
    big.extend(std::iter::repeat_n(128u8, 4 * 16 * 16));
    let other = dir.path().join("big-idx3-ubyte");
    std::fs::write(&other, big).unwrap();
    let mut resume = train_args(other.to_str().unwrap(), o, "4");
    resume.push("--resume");
    let r = ddpm(&resume);
    let e = stderr(&r);
    assert!(
        !r.status.success() && e.contains("1x16x16") && e.contains("1x8x8") && !e.contains("panicked"),
        "stderr: {e}"
    );
}

/// An improved-/guided-diffusion-style network trains from the command line: heads, scale-shift,
/// residual resampling and a learned variance end up in the checkpoint, sampling runs, and a
/// resume cannot change them.
#[test]
fn improved_diffusion_style_options_train_and_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_idx(dir.path());
    let out = dir.path().join("run");
    let (data, out_s) = (data.to_str().unwrap(), out.to_str().unwrap());
    let with = |steps, heads| {
        let mut a = train_args(data, out_s, steps);
        a.extend([
            "--heads",
            heads,
            "--scale-shift",
            "--resblock-updown",
            "--variance",
            "learned-range",
            "--loss",
            "hybrid",
            "--schedule",
            "cosine",
        ]);
        a
    };
    let args = with("6", "2");
    let o = ddpm(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = ddpm::io::checkpoint::load(&out.join("checkpoint.safetensors")).expect("loads");
    let u = &ck.config.unet;
    assert_eq!(u.attn_heads, ddpm::nn::AttnHeads::Count(2));
    assert_eq!(u.time_conditioning, ddpm::nn::TimeConditioning::ScaleShift);
    assert_eq!((u.downsample, u.upsample), (ddpm::nn::Resample::ResBlock, ddpm::nn::Resample::ResBlock));
    assert_eq!(u.out_channels, 2);
    assert!(ck.params.get("down.0.downsample.temb_proj.weight").is_some());
    let s = ddpm(&[
        "sample",
        "--checkpoint",
        out_s,
        "--num",
        "2",
        "--steps",
        "5",
        "--out",
        dir.path().join("s").to_str().unwrap(),
    ]);
    assert!(s.status.success(), "{}", stderr(&s));
    let mut again = with("8", "4");
    again.push("--resume");
    let r = ddpm(&again);
    assert!(!r.status.success() && stderr(&r).contains("--heads"), "{}", stderr(&r));
}

#[test]
fn class_conditional_train_sample_eval_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_idx(dir.path());
    write_squares_labels(dir.path(), 64);
    let out = dir.path().join("run");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let mut args = train_args(d, o, "6");
    args.push("--class-cond");
    let r = ddpm(&args);
    assert!(r.status.success(), "train failed: {}", stderr(&r));
    assert!(stderr(&r).contains("4 classes"), "{}", stderr(&r));
    // 4 samples of a 4-class model: one row per class, one image each (8x8, 2-pixel borders).
    let grid = image::open(out.join("samples/step_000006.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (10 + 2, 4 * 10 + 2));

    let samples = dir.path().join("samples");
    let s = samples.to_str().unwrap();
    let sample = |class: Option<&str>| {
        let mut a =
            vec!["sample", "--checkpoint", o, "--num", "2", "--steps", "5", "--out", s, "--threads", "2"];
        if let Some(c) = class {
            a.extend(["--class", c]);
        }
        ddpm(&a)
    };
    let r = sample(Some("3"));
    assert!(r.status.success(), "sample --class failed: {}", stderr(&r));
    assert!(samples.join("grid.png").is_file());
    assert!(!sample(None).status.success(), "a class-conditional model needs --class");
    assert!(!sample(Some("4")).status.success(), "class 4 of a 4-class model");

    let r = ddpm(&["eval", "--checkpoint", o, "--data", d, "--limit", "4", "--json", "--threads", "2"]);
    assert!(r.status.success(), "eval failed: {}", stderr(&r));
    let report: serde_json::Value = serde_json::from_slice(&r.stdout).expect("eval --json prints JSON");
    assert!(report["total_bpd"].as_f64().unwrap().is_finite());

    // Resume with the same command, then without --class-cond (the checkpoint decides), then
    // from the recorded data (labels reloaded and checked).
    let mut again = train_args(d, o, "8");
    again.extend(["--class-cond", "--resume"]);
    let r = ddpm(&again);
    assert!(r.status.success(), "resume failed: {}", stderr(&r));
    let mut again = train_args(d, o, "9");
    again.push("--resume");
    let r = ddpm(&again);
    assert!(r.status.success(), "resume without --class-cond failed: {}", stderr(&r));
    let r =
        ddpm(&["train", "--out", o, "--resume", "--steps", "10", "--threads", "2", "--sample-count", "0"]);
    assert!(r.status.success(), "resume from the recorded data failed: {}", stderr(&r));

    // Changed labels are other data: the recorded fingerprint covers them.
    let labels = dir.path().join("squares-idx1-ubyte");
    let mut bytes = std::fs::read(&labels).unwrap();
    bytes[8] = 1;
    std::fs::write(&labels, &bytes).unwrap();
    let r =
        ddpm(&["train", "--out", o, "--resume", "--steps", "11", "--threads", "2", "--sample-count", "0"]);
    assert!(!r.status.success(), "resumed on changed labels");
    assert!(stderr(&r).contains("labels xxh3"), "{}", stderr(&r));

    // Without the label file: train and eval refuse, naming the file looked for.
    std::fs::remove_file(&labels).unwrap();
    let other = dir.path().join("other");
    let mut args = train_args(d, other.to_str().unwrap(), "2");
    args.push("--class-cond");
    let r = ddpm(&args);
    assert!(!r.status.success(), "class-cond training without labels");
    assert!(stderr(&r).contains("squares-idx1-ubyte"), "{}", stderr(&r));
    let r = ddpm(&["eval", "--checkpoint", o, "--data", d, "--limit", "2", "--threads", "2"]);
    assert!(!r.status.success(), "class-cond eval without labels");
    assert!(stderr(&r).contains("squares-idx1-ubyte") && stderr(&r).contains("4 classes"), "{}", stderr(&r));
}

#[test]
fn class_cond_cannot_be_added_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_idx(dir.path());
    write_squares_labels(dir.path(), 64);
    let out = dir.path().join("run");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let r = ddpm(&train_args(d, o, "2"));
    assert!(r.status.success(), "train failed: {}", stderr(&r));
    let mut again = train_args(d, o, "4");
    again.extend(["--resume", "--class-cond"]);
    let r = ddpm(&again);
    assert!(!r.status.success(), "--class-cond added on resume");
    assert!(stderr(&r).contains("--class-cond"), "{}", stderr(&r));
}

#[test]
fn embedded_mnist_trains_class_conditionally() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = out.to_str().unwrap();
    let r = ddpm(&[
        "train",
        "--class-cond",
        "--preset",
        "tiny",
        "--ch",
        "8",
        "--out",
        o,
        "--steps",
        "2",
        "--batch",
        "4",
        "--timesteps",
        "10",
        "--warmup",
        "1",
        "--sample-count",
        "10",
        "--sample-steps",
        "2",
        "--threads",
        "2",
    ]);
    assert!(r.status.success(), "train failed: {}", stderr(&r));
    assert!(stderr(&r).contains("10 classes"), "{}", stderr(&r));
    // Ten classes, one image each: a column of ten 28x28 images.
    let grid = image::open(out.join("samples/step_000002.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (30 + 2, 10 * 30 + 2));
}
