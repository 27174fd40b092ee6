//! `ddpm sample` and `ddpm trace` with every sampler, end to end on a tiny model trained here:
//! each sampler runs and writes its images, `trace` follows the run `sample` draws, `--steps 1`
//! works, and bad sampler flags get one clear error naming the flag.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use common::{stderr, write_squares_idx};
use ddpm::io::npz::read_npz;
use ndarray::ArrayD;

fn ddpm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm")).args(args).output().expect("the binary runs")
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "ddpm failed: {}", stderr(&out));
    out
}

fn arrays(path: &Path) -> BTreeMap<String, ArrayD<f64>> {
    read_npz(path).expect("npz reads").into_iter().map(|e| (e.name, e.values)).collect()
}

/// A `tiny` model of 8x8 images over T = 50, trained 2 steps (the samplers only need weights).
fn tiny_run(dir: &Path) -> String {
    let data = write_squares_idx(dir, 16);
    let out = dir.join("run");
    let o = out.to_str().unwrap().to_string();
    ok(ddpm(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        data.to_str().unwrap(),
        "--out",
        &o,
        "--steps",
        "2",
        "--batch",
        "4",
        "--timesteps",
        "50",
        "--sample-every",
        "0",
        "--threads",
        "2",
    ]));
    o
}

#[test]
fn every_sampler_samples_and_trace_follows_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path());
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let help = ok(ddpm(&["sample", "--help"]));
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    for (name, steps, extra) in [
        ("ddpm", "5", vec![]),
        ("ddim", "5", vec!["--eta", "0.5"]),
        ("pndm", "6", vec![]),
        ("plms", "5", vec![]),
        ("dpm-solver-1", "5", vec![]),
        ("dpm-solver-2", "6", vec!["--solver-type", "heun"]),
        ("dpm-solver-3", "6", vec![]),
        ("dpm-solver-2m", "5", vec![]),
        ("dpm-solver-3m", "5", vec![]),
        ("dpm++2s", "6", vec!["--karras"]),
        ("dpm++2m", "5", vec!["--spacing", "trailing"]),
        ("dpm++3m", "5", vec!["--karras"]),
        ("dpm++2m-sde", "5", vec![]),
        ("euler", "5", vec!["--s-churn", "1"]),
        ("heun", "4", vec!["--karras"]),
        ("euler-ancestral", "5", vec!["--spacing", "leading"]),
    ] {
        assert!(help.contains(&format!("- {name}:")), "--help lists {name}");
        let common =
            [&["--checkpoint", run.as_str(), "--sampler", name, "--steps", steps, "--seed", "7"][..], &extra]
                .concat();
        let out = p(&format!("s_{name}"));
        ok(ddpm(&[&["sample", "--num", "3", "--out", &out, "--threads", "2"][..], &common].concat()));
        let grid = image::open(Path::new(&out).join("grid.png")).unwrap();
        assert_eq!((grid.width(), grid.height()), (2 * 10 + 2, 2 * 10 + 2), "{name}");
        let npz = p(&format!("t_{name}.npz"));
        ok(ddpm(
            &[&["trace", "--num", "3", "--keep", "all", "--out", &npz, "--threads", "2"][..], &common]
                .concat(),
        ));
        let a = arrays(Path::new(&npz));
        // The traced x_0, written as sample writes it, is sample's image 0 (8-bit PNG).
        let x0 = &a["x_0"];
        let img = image::open(Path::new(&out).join("000000.png")).unwrap().to_luma8();
        for (i, px) in img.pixels().enumerate() {
            let want = ((x0[[0, 0, i / 8, i % 8]].clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
            assert_eq!(px.0[0], want, "{name}: pixel {i}");
        }
        if name == "ddpm" {
            assert!(
                a.contains_key("t0049.x_prev") && a.contains_key("t0000.noise"),
                "{name}: {:?}",
                a.keys()
            );
        } else {
            let evals = a["evals"].len();
            assert!(evals >= 4, "{name}: {evals} evaluations");
            let last = format!("e{:04}.x_next", evals - 1);
            assert_eq!(a[&last], a["x_0"], "{name}: the last state is x_0");
            if extra.contains(&"--s-churn") {
                // Churn adds noise before the first evaluation (Karras et al. Algorithm 2).
                assert_ne!(a["e0000.x_t"], a["x_T"], "{name}: churn moves the first input");
                assert!(a.contains_key("e0000.noise"), "{name}: the churn noise is kept");
            } else {
                assert_eq!(a["e0000.x_t"], a["x_T"], "{name}: the first input is x_T");
            }
        }
    }
}

#[test]
fn one_step_and_bad_sampler_flags() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path());
    let out = dir.path().join("s").to_str().unwrap().to_string();
    for sampler in ["ddpm", "ddim", "dpm++2m", "heun", "plms"] {
        ok(ddpm(&[
            "sample",
            "--checkpoint",
            &run,
            "--num",
            "1",
            "--steps",
            "1",
            "--sampler",
            sampler,
            "--out",
            &out,
        ]));
    }
    for (args, needle) in [
        (vec!["--sampler", "dpm++9m"], "possible values"),
        (vec!["--sampler", "pndm", "--steps", "3"], "use plms"),
        (vec!["--steps", "51"], "--steps"),
        (vec!["--steps", "0"], "--steps"),
        (vec!["--karras"], "--karras"),
        (vec!["--sampler", "euler", "--eta", "0.5"], "--eta"),
        (vec!["--sampler", "ddim", "--s-churn", "1"], "--s-churn"),
        (vec!["--sampler", "euler", "--s-noise", "inf"], "--s-noise"),
        (vec!["--sampler", "ddim", "--eta", "2"], "--eta"),
    ] {
        let r = ddpm(
            &[&["sample", "--checkpoint", run.as_str(), "--num", "1", "--out", &out][..], &args].concat(),
        );
        let e = stderr(&r);
        assert!(!r.status.success() && e.contains(needle) && !e.contains("panicked"), "{args:?}: {e}");
    }
    let npz = dir.path().join("t.npz").to_str().unwrap().to_string();
    let r = ddpm(&[
        "trace",
        "--checkpoint",
        &run,
        "--sampler",
        "heun",
        "--steps",
        "3",
        "--keep",
        "9",
        "--out",
        &npz,
    ]);
    let e = stderr(&r);
    assert!(!r.status.success() && e.contains("--keep") && e.contains("0..=4"), "{e}");
}
