//! Data-parallel training without an MPI library: P ranks as P threads ([`LocalGroup`]) run the
//! same steps a single process runs, and must reach the same weights up to rounding
//! (docs/distributed.md). The MPI back end (`--features mpi`) is tested under `mpirun` by
//! tests/mpi.rs.

use std::sync::Arc;

use ddpm::data::Dataset;
use ddpm::distributed::{Collective, LocalGroup, SingleProcess};
use ddpm::nn::Preset;
use ddpm::train::{DiffusionConfig, Draws, OptimConfig, TrainConfig, Trainer};

fn config() -> TrainConfig {
    let mut unet = Preset::Tiny.config(1, 8);
    // Dropout on: its masks must not depend on the slice a rank holds.
    unet.dropout = 0.1;
    // Two channels per norm group (tests/mpi.rs says why).
    unet.gn_groups = 16;
    TrainConfig {
        unet,
        diffusion: DiffusionConfig { timesteps: 50, ..DiffusionConfig::default() },
        optim: OptimConfig { lr: 1e-3, warmup_steps: 2, ..OptimConfig::default() },
        batch_size: 7,
        random_flip: true,
        seed: 5,
        draws: Draws::Keyed,
    }
}

fn data() -> Arc<Dataset> {
    let n = 20;
    let pixels: Vec<u8> = (0..n * 64).map(|i| ((i * 53) % 256) as u8).collect();
    Arc::new(Dataset::new(pixels, n, 1, 8, 8, "synthetic").expect("valid dataset"))
}

/// k steps on one rank of `group`; the weights as f32 per parameter, and the losses.
fn train(group: &dyn Collective, steps: usize) -> (Vec<Vec<f32>>, Vec<f64>) {
    let mut trainer = Trainer::new(config(), data()).expect("valid");
    let losses = (0..steps).map(|_| trainer.step_with(group).expect("a step").loss).collect();
    let weights = trainer.state().params.iter().map(|(_, t)| t.iter().copied().collect()).collect();
    (weights, losses)
}

/// Every rank's result of `steps` steps in a group of `size` threads.
fn train_in_group(size: usize, steps: usize) -> Vec<(Vec<Vec<f32>>, Vec<f64>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> =
            LocalGroup::new(size).into_iter().map(|g| s.spawn(move || train(&g, steps))).collect();
        handles.into_iter().map(|h| h.join().expect("a rank")).collect()
    })
}

/// ‖a − b‖₂ / ‖b‖₂ over all the weights, and max |a − b|.
///
/// Why not each weight's relative difference: Adam divides each gradient by its own running
/// magnitude, so a weight whose gradient is mostly cancellation (or exactly zero in exact
/// arithmetic, as the bias before a one-channel-per-group norm) moves by its rounding noise, and
/// that noise depends on the order of the sums (docs/distributed.md).
fn relative(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f64, f64) {
    let (mut num, mut den, mut max) = (0.0f64, 0.0f64, 0.0f64);
    for (&p, &q) in a.iter().flatten().zip(b.iter().flatten()) {
        let d = f64::from(p) - f64::from(q);
        num += d * d;
        den += f64::from(q) * f64::from(q);
        max = max.max(d.abs());
    }
    ((num / den).sqrt(), max)
}

#[test]
fn two_and_three_ranks_reach_the_single_process_weights() {
    let steps = 4;
    let (single, single_losses) = train(&SingleProcess, steps);
    for size in [2, 3] {
        let ranks = train_in_group(size, steps);
        // Every rank holds the same weights, bit for bit.
        for (r, (w, _)) in ranks.iter().enumerate() {
            assert!(w == &ranks[0].0, "P = {size}: rank {r} differs from rank 0");
        }
        let (rel, max) = relative(&ranks[0].0, &single);
        println!("P = {size}, {steps} steps: ‖Δw‖/‖w‖ = {rel:.3e}, max |Δw| = {max:.3e} from one process");
        assert!(rel < 1e-6, "P = {size}: {rel:e}");
        for (a, b) in ranks[0].1.iter().zip(&single_losses) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "P = {size}: loss {a} vs {b}");
        }
        // Repeating the run gives the same bits.
        let again = train_in_group(size, steps);
        assert!(again[0].0 == ranks[0].0, "P = {size}: a repeated run differs");
    }
}

#[test]
fn more_ranks_than_examples_still_train() {
    // Batch 7 over 8 ranks: one rank has no example and contributes a zero gradient.
    let (single, _) = train(&SingleProcess, 2);
    let ranks = train_in_group(8, 2);
    assert!(relative(&ranks[7].0, &single).0 < 1e-6);
}

#[test]
fn a_sequential_run_refuses_a_group() {
    let mut c = config();
    c.draws = Draws::Sequential;
    let errors: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = LocalGroup::new(2)
            .into_iter()
            .map(|g| {
                let c = c.clone();
                s.spawn(move || {
                    let mut t = Trainer::new(c, data()).expect("valid");
                    t.step_with(&g).expect_err("refused").to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("a rank")).collect()
    });
    for e in errors {
        assert!(e.contains("one process"), "{e}");
    }
}

/// Started by an MPI launcher as one of several ranks, a binary without the `mpi` feature
/// refuses to train (each rank would train alone into the same directory), and the demo refuses
/// in any build. The launcher is imitated by its environment variables.
#[cfg(not(feature = "mpi"))]
#[test]
fn several_ranks_without_mpi_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ddpm"))
            .args(args)
            .env("PMI_RANK", "0")
            .env("PMI_SIZE", "2")
            .output()
            .expect("the binary runs")
    };
    let o = run(&["train", "--preset", "tiny", "--steps", "1", "--out", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--features mpi"), "{err}");
    assert!(!out.join("checkpoint.safetensors").exists());
    let o = run(&["demo", "--out", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("mpirun -n P ddpm train"), "{err}");
}
