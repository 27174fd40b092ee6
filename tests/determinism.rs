//! Training steps are bit-identical for the same seed, and also across rayon thread counts:
//! every parallel loop splits its work by the shapes alone and sums partial results in a fixed
//! order (see the module docs of `ddpm::kernels`), and dropout masks come from per-chunk
//! streams of one seed.

use std::sync::Arc;

use ddpm::data::Dataset;
use ddpm::nn::Preset;
use ddpm::train::{DiffusionConfig, Draws, OptimConfig, TrainConfig, Trainer};

/// Two training steps of the `tiny` preset (with dropout, attention and every kernel of the
/// U-Net) on 8x8 images; returns the losses and every weight's bits.
fn two_steps(threads: usize, draws: Draws) -> (Vec<u64>, Vec<(String, Vec<u32>)>) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a rayon pool");
    pool.install(|| {
        let (n, c, r) = (8, 1, 8);
        let pixels: Vec<u8> = (0..n * c * r * r).map(|i| ((i * 37) % 251) as u8).collect();
        let data = Arc::new(Dataset::new(pixels, n, c, r, r, "synthetic").expect("valid dataset"));
        let mut unet = Preset::Tiny.config(c, r);
        unet.dropout = 0.1;
        let config = TrainConfig {
            unet,
            diffusion: DiffusionConfig::default(),
            optim: OptimConfig::default(),
            batch_size: 4,
            random_flip: true,
            seed: 11,
            draws,
        };
        let mut trainer = Trainer::new(config, data).expect("a valid configuration");
        let losses = (0..2).map(|_| trainer.step().expect("a finite step").loss.to_bits()).collect();
        let weights = trainer
            .state()
            .params
            .iter()
            .map(|(name, t)| (name.to_string(), t.iter().map(|v| v.to_bits()).collect()))
            .collect();
        (losses, weights)
    })
}

#[test]
fn same_seed_same_bits_on_one_and_on_three_threads() {
    for draws in [Draws::Sequential, Draws::Keyed] {
        let one = two_steps(1, draws);
        assert_eq!(one, two_steps(1, draws), "{draws:?}: two runs on one thread differ");
        let three = two_steps(3, draws);
        assert_eq!(one.0, three.0, "{draws:?}: losses differ between 1 and 3 threads");
        for ((name, a), (_, b)) in one.1.iter().zip(&three.1) {
            assert!(a == b, "{draws:?}: weights {name} differ between 1 and 3 threads");
        }
    }
}
