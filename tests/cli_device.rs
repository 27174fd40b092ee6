//! `--device` end to end: with the `wgpu` feature, `ddpm train --device gpu` and `ddpm sample
//! --device gpu` on tiny data (every product sent to the GPU); without it, `--device gpu` is a
//! clear error and `--device auto` falls back to the CPU. Data are generated here (8x8 IDX).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{stderr, write_squares_idx};

fn ddpm(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ddpm"));
    cmd.args(args).env_remove("DDPM_DEVICE").env_remove("DDPM_GPU_MIN_MACS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn write_idx(dir: &Path) -> PathBuf {
    write_squares_idx(dir, 16)
}

fn train_args<'a>(data: &'a str, out: &'a str, device: &'a str) -> Vec<&'a str> {
    #[rustfmt::skip]
    let args = vec![
        "train", "--preset", "tiny", "--data", data, "--out", out, "--steps", "3", "--batch", "4",
        "--timesteps", "20", "--warmup", "1", "--checkpoint-every", "3", "--sample-every", "0", "--sample-count", "0",
        "--threads", "2", "--device", device,
    ];
    args
}

/// The number in the binary's "gpu: N products and convolutions ran on the GPU" line.
#[cfg(feature = "wgpu")]
fn gpu_calls(err: &str) -> u64 {
    let line =
        err.lines().find(|l| l.contains("ran on the GPU")).unwrap_or_else(|| panic!("no gpu line in: {err}"));
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad gpu line {line:?}"))
}

#[cfg(feature = "wgpu")]
#[test]
fn train_and_sample_run_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_idx(dir.path());
    let out = dir.path().join("run");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let all_on_gpu = [("DDPM_GPU_MIN_MACS", "0")];
    let r = ddpm(&train_args(d, o, "gpu"), &all_on_gpu);
    let err = stderr(&r);
    assert!(r.status.success(), "train --device gpu failed (CI installs mesa-vulkan-drivers): {err}");
    assert!(err.contains("device: gpu"), "{err}");
    assert!(gpu_calls(&err) > 0, "{err}");
    assert!(out.join("checkpoint.safetensors").is_file());
    let losses = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(losses.lines().count(), 4, "a header and 3 steps: {losses}");
    assert!(!losses.contains("NaN") && !losses.contains("inf"), "{losses}");

    // The device may also come from DDPM_DEVICE.
    let samples = dir.path().join("samples");
    let s = samples.to_str().unwrap();
    #[rustfmt::skip]
    let sample = ["sample", "--checkpoint", o, "--num", "2", "--sampler", "ddim", "--steps", "3", "--out", s, "--threads", "2"];
    let r = ddpm(&sample, &[("DDPM_DEVICE", "gpu"), ("DDPM_GPU_MIN_MACS", "0")]);
    let err = stderr(&r);
    assert!(r.status.success(), "sample on the gpu failed: {err}");
    assert!(gpu_calls(&err) > 0, "{err}");
    for f in ["grid.png", "000000.png", "000001.png"] {
        assert!(samples.join(f).is_file(), "missing {f}");
    }
}

#[cfg(not(feature = "wgpu"))]
#[test]
fn gpu_without_the_feature_is_a_clear_error_and_auto_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_idx(dir.path());
    let out = dir.path().join("run");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let r = ddpm(&train_args(d, o, "gpu"), &[]);
    let err = stderr(&r);
    assert!(!r.status.success(), "--device gpu without the feature must fail");
    for hint in ["without the `wgpu` feature", "--features wgpu", "--device cpu"] {
        assert!(err.contains(hint), "the error should say {hint:?}: {err}");
    }
    assert!(!out.join("checkpoint.safetensors").exists(), "nothing is trained");

    let r = ddpm(&["sample", "--checkpoint", o, "--out", o], &[("DDPM_DEVICE", "gpu")]);
    assert!(!r.status.success() && stderr(&r).contains("--features wgpu"), "{}", stderr(&r));

    let r = ddpm(&train_args(d, o, "auto"), &[]);
    let err = stderr(&r);
    assert!(r.status.success(), "--device auto must fall back to the CPU: {err}");
    assert_eq!(err.matches("--device auto: no usable GPU").count(), 1, "one notice: {err}");
    assert!(out.join("checkpoint.safetensors").is_file());
}

#[test]
fn an_unknown_device_is_refused_naming_the_choices() {
    let r = ddpm(&["bench", "--device", "tpu"], &[]);
    let err = stderr(&r);
    assert!(!r.status.success());
    assert!(err.contains("cpu") && err.contains("gpu") && err.contains("auto"), "{err}");
}
