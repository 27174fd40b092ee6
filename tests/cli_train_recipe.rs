//! `ddpm train`'s recipe options beyond the paper's (Min-SNR-γ, learning-rate decay, EDM2's power
//! EMA) and `--score-every`, end to end through the binary on the embedded MNIST with a
//! very small network, so each run takes seconds.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{stderr, write_squares_idx};

fn ddpm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm")).args(args).output().expect("the binary runs")
}

/// A tiny run on the embedded MNIST: T = 20, batch 4, no grids.
fn tiny<'a>(out: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--preset",
        "tiny",
        "--ch",
        "8",
        "--out",
        out,
        "--steps",
        steps,
        "--batch",
        "4",
        "--timesteps",
        "20",
        "--warmup",
        "2",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "2",
        "--sample-count",
        "0",
        "--threads",
        "2",
    ];
    a.extend_from_slice(extra);
    a
}

/// The rows of metrics.csv, split into fields (header first).
fn metrics(dir: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .expect("metrics.csv")
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn score_every_writes_the_score_that_ddpm_score_gives_the_same_images() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = out.to_str().unwrap();
    let r = ddpm(&tiny(o, "4", &["--score-every", "2", "--score-samples", "16"]));
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(stderr(&r).contains("step 2: FD") && stderr(&r).contains("step 4: FD"), "{}", stderr(&r));
    let rows = metrics(&out);
    let header = &rows[0];
    assert_eq!(header.len(), 14);
    let col = |name: &str| header.iter().position(|h| h == name).expect("column");
    let (fd, conf) = (col("fd"), col("frac_conf90"));
    for row in &rows[1..] {
        assert_eq!(row.len(), 14, "{row:?}");
        let scored = row[0] == "2" || row[0] == "4";
        assert_eq!(!row[fd].is_empty(), scored, "{row:?}");
        if scored {
            let c: f64 = row[conf].parse().unwrap();
            assert!((0.0..=1.0).contains(&c));
        }
    }
    assert!(out.join("score.png").is_file());

    // The score of step 4 is `ddpm score` of `ddpm sample --seed 4` with the same sampler.
    let samples = dir.path().join("s");
    let s = samples.to_str().unwrap();
    let r = ddpm(&[
        "sample",
        "--checkpoint",
        o,
        "--seed",
        "4",
        "--sampler",
        "dpm++2m-sde",
        "--steps",
        "20",
        "--karras",
        "--num",
        "16",
        "--out",
        s,
        "--threads",
        "2",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = ddpm(&["score", s, "--json"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let json: serde_json::Value = serde_json::from_slice(&r.stdout).expect("json");
    let row4 = rows.iter().find(|r| r[0] == "4").unwrap();
    for (key, i) in [("fd", fd), ("frac_conf90", conf), ("class_entropy", col("class_entropy"))] {
        let (got, want) = (row4[i].parse::<f64>().unwrap(), json[key].as_f64().unwrap());
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{key}: metrics {got} vs score {want}");
    }

    // A resume keeps the scored rows up to its checkpoint and goes on scoring.
    let r =
        ddpm(&[tiny(o, "6", &["--score-every", "2", "--score-samples", "16"]), vec!["--resume"]].concat());
    assert!(r.status.success(), "{}", stderr(&r));
    let rows = metrics(&out);
    let scored: Vec<&str> = rows[1..].iter().filter(|r| !r[fd].is_empty()).map(|r| r[0].as_str()).collect();
    assert_eq!(scored, ["2", "4", "6"]);
    let steps: Vec<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    assert_eq!(steps, ["1", "2", "3", "4", "5", "6"]);
}

#[test]
fn score_every_refuses_what_it_cannot_score() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_squares_idx(dir.path(), 64);
    let out = dir.path().join("run");
    let o = out.to_str().unwrap();
    // 8x8 images: the shipped scorer is for 28x28 digits.
    let r = ddpm(&[tiny(o, "2", &["--score-every", "1"]), vec!["--data", data.to_str().unwrap()]].concat());
    assert!(!r.status.success());
    let e = stderr(&r);
    assert!(e.contains("--score-every") && e.contains("--scorer"), "{e}");
    // A scorer file that is not one.
    let bogus = dir.path().join("bogus.safetensors");
    std::fs::write(&bogus, b"not a scorer").unwrap();
    let r = ddpm(&tiny(o, "2", &["--score-every", "1", "--scorer", bogus.to_str().unwrap()]));
    assert!(!r.status.success());
    assert!(stderr(&r).contains("bogus.safetensors"), "{}", stderr(&r));
    // --scorer alone, and too few images.
    let r = ddpm(&tiny(o, "2", &["--scorer", bogus.to_str().unwrap()]));
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    let r = ddpm(&tiny(o, "2", &["--score-every", "1", "--score-samples", "3"]));
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
}

#[test]
fn lr_decay_follows_its_formula_step_by_step() {
    let dir = tempfile::tempdir().unwrap();
    for (shape, f) in [
        ("cosine", (|p: f64| 0.5 * (1.0 + (std::f64::consts::PI * p).cos())) as fn(f64) -> f64),
        ("linear", |p: f64| 1.0 - p),
    ] {
        let out = dir.path().join(shape);
        let o = out.to_str().unwrap();
        let r = ddpm(&tiny(o, "6", &["--lr-decay", shape]));
        assert!(r.status.success(), "{}", stderr(&r));
        let rows = metrics(&out);
        let lr = rows[0].iter().position(|h| h == "lr").unwrap();
        for row in &rows[1..] {
            let step: f64 = row[0].parse().unwrap();
            // Warm-up over steps 1..=2, then from the peak at step 2 to 0 at step 6.
            let want = if step <= 2.0 { 1e-3 * step / 2.0 } else { 1e-3 * f((step - 2.0) / 4.0) };
            let got: f64 = row[lr].parse().unwrap();
            assert!((got - want).abs() <= 1e-9, "{shape} step {step}: {got} vs {want}");
        }
    }
}

#[test]
fn recipe_flags_are_checked_and_kept_across_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = out.to_str().unwrap();
    let refused = |extra: &[&str], needle: &str| {
        let r = ddpm(&tiny(o, "4", extra));
        assert!(!r.status.success(), "{extra:?} was accepted");
        assert!(stderr(&r).contains(needle), "{extra:?}: {}", stderr(&r));
        assert!(!out.join("checkpoint.safetensors").exists());
    };
    refused(&["--lr-decay", "cosine", "--lr-decay-steps", "3"], "--lr-decay-steps");
    refused(&["--ema-sigma-rel", "0.5"], "σ_rel");
    refused(&["--ema-sigma-rel", "0.1", "--ema-decay", "0.9"], "--ema-decay");
    refused(&["--min-snr-gamma", "0"], "--min-snr-gamma");
    refused(&["--min-snr-gamma", "5", "--variance", "learned", "--loss", "hybrid"], "--loss simple");
    let r = ddpm(&["train", "--minutes", "1", "--lr-decay", "linear", "--out", o]);
    assert!(!r.status.success() && stderr(&r).contains("--lr-decay-steps"), "{}", stderr(&r));

    let recipe = [
        "--mean-type",
        "v",
        "--min-snr-gamma",
        "5",
        "--ema-sigma-rel",
        "0.1",
        "--lr-decay",
        "cosine",
        "--lr-decay-steps",
        "8",
    ];
    let r = ddpm(&tiny(o, "4", &recipe));
    assert!(r.status.success(), "{}", stderr(&r));
    // The same flags resume; a changed one is refused by name; the decay's end is the checkpoint's.
    let r = ddpm(&[tiny(o, "6", &recipe), vec!["--resume"]].concat());
    assert!(r.status.success(), "{}", stderr(&r));
    let r = ddpm(&[tiny(o, "8", &["--min-snr-gamma", "1"]), vec!["--resume"]].concat());
    assert!(!r.status.success() && stderr(&r).contains("--min-snr-gamma"), "{}", stderr(&r));
    let r = ddpm(&[tiny(o, "8", &["--ema-sigma-rel", "0.05"]), vec!["--resume"]].concat());
    assert!(!r.status.success() && stderr(&r).contains("--ema-sigma-rel"), "{}", stderr(&r));
    let r = ddpm(&[tiny(o, "9", &[]), vec!["--resume"]].concat());
    assert!(!r.status.success() && stderr(&r).contains("step 8"), "{}", stderr(&r));
    let r = ddpm(&[tiny(o, "8", &[]), vec!["--resume"]].concat());
    assert!(r.status.success(), "{}", stderr(&r));
    let rows = metrics(&out);
    let lr = rows[0].iter().position(|h| h == "lr").unwrap();
    let last: f64 = rows.last().unwrap()[lr].parse().unwrap();
    assert_eq!(last, 0.0, "the cosine decay reaches 0 at its end step");
}
