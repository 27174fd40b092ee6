//! The kernels' instruction-set paths (`DDPM_CPU`, docs/cpu.md) against each other: two `tiny`
//! training steps on each level this machine runs must give the same bits. Every kernel of
//! ddpm's own is written over 16 lanes with one order of sums (`src/kernels/lanes/`), and the
//! products left to the `gemm` crate (linear layers, the attention gradient and the weight
//! gradients of the strided and 1x1 convolutions) are the same code under every level, since
//! the crate picks its instruction set from the machine, not from `DDPM_CPU`.

use std::path::Path;
use std::process::Command;

use ddpm::cpu::Isa;

const BIN: &str = env!("CARGO_BIN_EXE_ddpm");

fn train(isa: Isa, out: &Path) {
    let o = Command::new(BIN)
        .env("DDPM_CPU", isa.name())
        .args(["train", "--preset", "tiny", "--steps", "2", "--batch", "4", "--timesteps", "20"])
        .args(["--sample-count", "0", "--threads", "2", "--out"])
        .arg(out)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{isa}: {}", String::from_utf8_lossy(&o.stderr));
}

fn weights(dir: &Path) -> Vec<f32> {
    let s = ddpm::io::checkpoint::load(&dir.join("checkpoint.safetensors")).expect("a checkpoint");
    s.params.iter().flat_map(|(_, t)| t.iter().copied().collect::<Vec<_>>()).collect()
}

#[test]
fn every_instruction_set_trains_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let levels = Isa::available();
    let runs: Vec<(Isa, Vec<f32>)> = levels
        .iter()
        .map(|&isa| {
            let out = dir.path().join(isa.name());
            train(isa, &out);
            (isa, weights(&out))
        })
        .collect();
    let scalar = &runs[0].1;
    for (isa, w) in &runs[1..] {
        let num: f64 = w.iter().zip(scalar).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum();
        let den: f64 = scalar.iter().map(|&b| f64::from(b).powi(2)).sum();
        let rel = (num / den).sqrt();
        println!("{isa} vs scalar after 2 steps: ‖Δw‖/‖w‖ = {rel:.3e}");
        let same = w.len() == scalar.len() && w.iter().zip(scalar).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{isa} and scalar differ: ‖Δw‖/‖w‖ = {rel:e}");
    }
}

#[test]
fn a_level_the_machine_lacks_or_does_not_know_is_refused_by_name() {
    let o = Command::new(BIN).env("DDPM_CPU", "sse9").args(["bench", "--preset", "tiny"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("DDPM_CPU") && err.contains("avx512, avx2, neon or scalar"),
        "{err}"
    );
    // Every machine lacks some level: NEON on x86-64, AVX2 and AVX-512 on aarch64.
    let lacking: Vec<Isa> = Isa::ALL.into_iter().filter(|i| !i.runs_here()).collect();
    assert!(!lacking.is_empty());
    for isa in lacking {
        let o = Command::new(BIN)
            .env("DDPM_CPU", isa.name())
            .args(["bench", "--preset", "tiny"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(&format!("cannot run {isa}")), "{err}");
        assert!(err.contains("DDPM_CPU"), "{err}");
        // Asked for with the flag instead, the error names the flag.
        let o = Command::new(BIN)
            .env_remove("DDPM_CPU")
            .args(["bench", "--preset", "tiny", "--cpu", isa.name()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("--cpu") && err.contains(&format!("cannot run {isa}")),
            "{err}"
        );
    }
}
