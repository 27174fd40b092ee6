//! The kernels' instruction-set paths (`DDPM_CPU`, docs/cpu.md) against each other: two `tiny`
//! training steps on each level this machine runs. `scalar` and `avx2` share every product and
//! convolution (the general path) and their element-wise kernels fix their order of sums, so
//! they must give the same bits; `avx512` runs its own products and convolutions, which add in
//! another order, so its weights are held to a bound instead (docs/cpu.md gives the figures).

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
fn every_instruction_set_trains_the_same_weights_or_within_the_stated_bound() {
    let dir = tempfile::tempdir().unwrap();
    let levels: Vec<Isa> = Isa::ALL.into_iter().filter(|&i| i <= Isa::detected()).collect();
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
        match isa {
            Isa::Avx2 => assert!(w == scalar, "avx2 and scalar differ: {rel:e}"),
            _ => assert!(rel < 1e-6, "{isa}: {rel:e}"),
        }
    }
}

#[test]
fn a_level_the_machine_lacks_or_does_not_know_is_refused_by_name() {
    let o = Command::new(BIN).env("DDPM_CPU", "sse9").args(["bench", "--preset", "tiny"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("DDPM_CPU") && err.contains("avx512, avx2 or scalar"),
        "{err}"
    );
    if Isa::detected() < Isa::Avx512 {
        let o =
            Command::new(BIN).env("DDPM_CPU", "avx512").args(["bench", "--preset", "tiny"]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("cannot run avx512"), "{err}");
    }
}
