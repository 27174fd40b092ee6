//! Shuffled, seeded, resumable minibatches of `x0`.
//!
//! [`Batches`] cuts a [`Dataset`] into minibatches `[B, C, H, W]` of `f32` on [−1, 1]
//! (`x = p / 127.5 − 1`, [`super::pixel_to_unit`]), epoch after epoch, for ever.
//!
//! ## The stream, exactly
//! Epoch `e` (0, 1, 2, …) is planned from `(seed, e)` alone:
//! - a [`crate::Rng`] is made with [`crate::rng_from_seed`]`(seed)` and switched to ChaCha stream
//!   `2^63 + e` (so it never overlaps stream 0, which other users of the same seed draw from);
//! - the order is a Fisher–Yates shuffle of `0..N` driven by that generator, with bounded integers
//!   drawn by rejection (Lemire's method) from `next_u64`, written out here so that the stream
//!   does not change with the `rand` crate's version;
//! - then, with random flips on, one bit per position (`next_u32() >> 31`) says whether the image
//!   at that position is mirrored left-right.
//!
//! Batches are consecutive slices of `B` positions of that order. Every batch is full: when fewer
//! than `B` positions remain, they are skipped and the next epoch starts (improved-diffusion's
//! `drop_last=True`); the skipped images differ from epoch to epoch because the order does.
//!
//! ## Resuming
//! [`Batches::position`] is `(epoch, index)`: the epoch of the next batch and how many positions
//! of its order have been served. Save it with a checkpoint together with the [`BatchConfig`];
//! [`Batches::resume`] with the same dataset, config and position yields exactly the batches the
//! uninterrupted stream would have yielded next, because an epoch's plan depends only on
//! `(seed, epoch)`. The rest of the training RNG (noise, timesteps) is not involved.
//! Both structs are `serde`-serialisable, e.g. as JSON strings in checkpoint metadata.
//!
//! ```
//! use ddpm::data::{BatchConfig, Batches, Dataset};
//! # fn main() -> ddpm::Result<()> {
//! let data = std::sync::Arc::new(Dataset::new(vec![0; 10 * 4], 10, 1, 2, 2, "tiny")?);
//! let config = BatchConfig { batch_size: 3, random_flip: true, seed: 7 };
//! let mut run = Batches::new(data.clone(), config)?;
//! run.next_batch(); // [3, 1, 2, 2]
//! let saved = run.position(); // store with the checkpoint
//! let mut resumed = Batches::resume(data, config, saved)?;
//! assert_eq!(resumed.next_batch(), run.next_batch());
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::Dataset;
use crate::error::{Error, Result};
use crate::{rng_from_seed, Rng, Tensor};

/// First ChaCha stream used for data order: epochs use streams `2^63 + e`.
const DATA_STREAM_BASE: u64 = 1 << 63;

/// What a [`Batches`] stream is made of. Together with a [`BatchPosition`] and the dataset it
/// determines every batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchConfig {
    /// Images per batch `B`, `1 ≤ B ≤ N`.
    pub batch_size: usize,
    /// Mirror each image left-right with probability 1/2 (improved-diffusion's `random_flip`).
    /// Use it for natural images, not for digits or text.
    pub random_flip: bool,
    /// Seed of the data order and flips.
    pub seed: u64,
}

/// Where a [`Batches`] stream stands: the next batch is positions `index..index + B` of epoch
/// `epoch`'s order. A stream never stands where fewer than `B` positions remain (it moves on to
/// `(epoch + 1, 0)` at once), and [`Batches::resume`] treats such a position the same way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchPosition {
    /// Epoch of the next batch, from 0.
    pub epoch: u64,
    /// Positions of this epoch's order already served, `0 ≤ index ≤ N − B`.
    pub index: usize,
}

/// The images of one batch, as [`Batches::next_indices`] returns them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchIndices {
    /// Dataset index of each image of the batch, in batch order (`B` of them).
    pub indices: Vec<usize>,
    /// Whether each image is mirrored left-right (all `false` when random flips are off).
    pub flips: Vec<bool>,
}

/// One minibatch with the class labels of its images, as [`Batches::next_labelled`] returns it.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The images, `[B, C, H, W]` on [−1, 1].
    pub x0: Tensor,
    /// The class label of each image, in batch order (`B` of them); `None` when the dataset has
    /// no labels.
    pub labels: Option<Vec<usize>>,
}

/// An endless stream of shuffled minibatches `[B, C, H, W]` on [−1, 1]; see the module
/// documentation for the exact stream and how to resume it.
///
/// It is also an [`Iterator`] that never ends.
#[derive(Clone)]
pub struct Batches {
    data: Arc<Dataset>,
    config: BatchConfig,
    position: BatchPosition,
    /// The plan of `position.epoch`: dataset indices in order, and flips (empty when off).
    order: Vec<usize>,
    flips: Vec<bool>,
}

impl Batches {
    /// A stream starting at epoch 0, position 0.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `batch_size` is 0 or larger than the dataset.
    pub fn new(data: impl Into<Arc<Dataset>>, config: BatchConfig) -> Result<Self> {
        Self::resume(data, config, BatchPosition::default())
    }

    /// The stream that [`Batches::new`] with the same dataset and config would be in after
    /// reaching `position`: its next batch is the one the uninterrupted stream yields there.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `batch_size` is 0 or larger than the dataset, or
    /// `position.index` is larger than the dataset.
    pub fn resume(
        data: impl Into<Arc<Dataset>>,
        config: BatchConfig,
        position: BatchPosition,
    ) -> Result<Self> {
        let data = data.into();
        if config.batch_size == 0 || config.batch_size > data.len() {
            return Err(Error::config(
                "batch size",
                format!(
                    "{} is not in 1..={}, the number of images in {}",
                    config.batch_size,
                    data.len(),
                    data.source().display()
                ),
            ));
        }
        if position.index > data.len() {
            return Err(Error::config(
                "batch position",
                format!(
                    "index {} is past the {} images of {}; was the checkpoint made with another \
                     dataset?",
                    position.index,
                    data.len(),
                    data.source().display()
                ),
            ));
        }
        let (order, flips) = epoch_plan(data.len(), config, position.epoch);
        let mut batches = Batches { data, config, position, order, flips };
        batches.roll_over_if_done();
        Ok(batches)
    }

    /// Where the stream stands: save this (with [`Batches::config`]) to resume later.
    pub fn position(&self) -> BatchPosition {
        self.position
    }

    /// The config the stream was made with.
    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// The dataset the batches are drawn from.
    pub fn dataset(&self) -> &Dataset {
        &self.data
    }

    /// Full batches per epoch, `⌊N / B⌋`.
    pub fn batches_per_epoch(&self) -> usize {
        self.data.len() / self.config.batch_size
    }

    /// The dataset indices of the next batch, in order, and whether each is flipped; advances the
    /// stream. [`Batches::next_batch`] is this plus the gather.
    pub fn next_indices(&mut self) -> BatchIndices {
        let b = self.config.batch_size;
        let range = self.position.index..self.position.index + b;
        self.position.index += b;
        let flips = if self.flips.is_empty() { vec![false; b] } else { self.flips[range.clone()].to_vec() };
        let indices = self.order[range].to_vec();
        self.roll_over_if_done();
        BatchIndices { indices, flips }
    }

    /// Starts the next epoch when fewer than `B` positions of this one remain, so that
    /// [`Batches::position`] always says where the next batch really starts.
    fn roll_over_if_done(&mut self) {
        if self.position.index + self.config.batch_size > self.data.len() {
            self.position = BatchPosition { epoch: self.position.epoch.wrapping_add(1), index: 0 };
            (self.order, self.flips) = epoch_plan(self.data.len(), self.config, self.position.epoch);
        }
    }

    /// The next minibatch, `[B, C, H, W]` on [−1, 1]; advances the stream.
    pub fn next_batch(&mut self) -> Tensor {
        let plan = self.next_indices();
        self.data.gather(&plan.indices, Some(&plan.flips))
    }

    /// [`Batches::next_batch`] with the labels of its images, looked up by dataset index (a
    /// flip does not change a label), so the stream and its resumption are the same with or
    /// without labels.
    pub fn next_labelled(&mut self) -> Batch {
        let plan = self.next_indices();
        Batch {
            x0: self.data.gather(&plan.indices, Some(&plan.flips)),
            labels: self.data.labels_at(&plan.indices),
        }
    }
}

impl std::fmt::Debug for Batches {
    /// Config, position and dataset; not the epoch's order, which has `N` entries.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batches")
            .field("config", &self.config)
            .field("position", &self.position)
            .field("data", &self.data)
            .finish_non_exhaustive()
    }
}

impl Iterator for Batches {
    type Item = Tensor;

    /// Always `Some(self.next_batch())`: the stream does not end.
    fn next(&mut self) -> Option<Tensor> {
        Some(self.next_batch())
    }
}

/// The order and flips of epoch `epoch`, from `(config.seed, epoch)` only.
fn epoch_plan(n: usize, config: BatchConfig, epoch: u64) -> (Vec<usize>, Vec<bool>) {
    let mut rng = rng_from_seed(config.seed);
    rng.set_stream(DATA_STREAM_BASE.wrapping_add(epoch));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let flips =
        if config.random_flip { (0..n).map(|_| rng.next_u32() >> 31 == 1).collect() } else { Vec::new() };
    (order, flips)
}

/// A uniform integer in `0..bound` (`bound > 0`) by Lemire's multiply-and-reject method.
fn below(rng: &mut Rng, bound: u64) -> u64 {
    // Reject the low products that would make some outcomes one more likely than others.
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let product = u128::from(rng.next_u64()) * u128::from(bound);
        if (product as u64) >= threshold {
            return (product >> 64) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::pixel_to_unit;

    /// `n` images of 1×1×3 whose pixels encode the index: row [i, i, 255 − i] (so a flip shows).
    fn indexed(n: usize) -> Dataset {
        let pixels = (0..n).flat_map(|i| [i as u8, i as u8, 255 - i as u8]).collect();
        Dataset::new(pixels, n, 1, 1, 3, "indexed").expect("valid shape")
    }

    fn config(batch_size: usize, random_flip: bool, seed: u64) -> BatchConfig {
        BatchConfig { batch_size, random_flip, seed }
    }

    #[test]
    fn same_seed_gives_the_same_stream_and_another_seed_another() {
        let d = Arc::new(indexed(50));
        let take = |seed| {
            let mut b = Batches::new(Arc::clone(&d), config(8, true, seed)).expect("valid");
            (0..20).map(|_| b.next_batch()).collect::<Vec<_>>()
        };
        assert_eq!(take(3), take(3));
        assert_ne!(take(3), take(4));
    }

    #[test]
    fn each_epoch_is_a_permutation_without_the_dropped_tail() {
        let n = 23;
        let mut b = Batches::new(indexed(n), config(5, false, 1)).expect("valid");
        assert_eq!(b.batches_per_epoch(), 4);
        let mut epochs = Vec::new();
        for _ in 0..3 {
            let mut seen = Vec::new();
            for _ in 0..4 {
                let plan = b.next_indices();
                assert!(plan.flips.iter().all(|&f| !f));
                seen.extend(plan.indices);
            }
            let mut sorted = seen.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 20, "no image twice within an epoch");
            epochs.push(seen);
        }
        assert_ne!(epochs[0], epochs[1], "epochs are reshuffled");
        assert_eq!(b.position(), BatchPosition { epoch: 3, index: 0 });
    }

    #[test]
    fn resuming_from_the_middle_equals_the_tail_of_the_full_stream() {
        let d = Arc::new(indexed(37));
        let cfg = config(6, true, 99);
        let mut full = Batches::new(Arc::clone(&d), cfg).expect("valid");
        let all: Vec<Tensor> = (0..30).map(|_| full.next_batch()).collect();
        for stop in [0, 1, 5, 6, 7, 13, 29] {
            let mut first = Batches::new(Arc::clone(&d), cfg).expect("valid");
            for _ in 0..stop {
                first.next_batch();
            }
            let saved = first.position();
            let mut resumed = Batches::resume(Arc::clone(&d), cfg, saved).expect("valid");
            let tail: Vec<Tensor> = (stop..30).map(|_| resumed.next_batch()).collect();
            assert_eq!(tail, all[stop..], "resumed at batch {stop}, position {saved:?}");
        }
    }

    #[test]
    fn position_moves_to_the_next_epoch_as_soon_as_no_full_batch_is_left() {
        let d = Arc::new(indexed(10));
        let cfg = config(4, false, 8);
        let mut b = Batches::new(Arc::clone(&d), cfg).expect("valid");
        b.next_batch();
        assert_eq!(b.position(), BatchPosition { epoch: 0, index: 4 });
        b.next_batch();
        assert_eq!(b.position(), BatchPosition { epoch: 1, index: 0 });
        // A position left by an older writer, with too few images left, resumes the same way.
        let late = BatchPosition { epoch: 0, index: 9 };
        let mut resumed = Batches::resume(Arc::clone(&d), cfg, late).expect("valid");
        assert_eq!(resumed.position(), BatchPosition { epoch: 1, index: 0 });
        assert_eq!(resumed.next_batch(), b.next_batch());
    }

    #[test]
    fn position_survives_a_json_round_trip() {
        let p = BatchPosition { epoch: 7, index: 128 };
        let text = serde_json::to_string(&p).expect("serialize");
        assert_eq!(serde_json::from_str::<BatchPosition>(&text).expect("deserialize"), p);
    }

    #[test]
    fn batches_are_scaled_nchw_and_flips_mirror_the_width() {
        let cfg = config(40, true, 5);
        let plan = Batches::new(indexed(40), cfg).expect("valid").next_indices();
        let batch = Batches::new(indexed(40), cfg).expect("valid").next_batch();
        assert_eq!(batch.shape(), &[40, 1, 1, 3]);
        for (k, (&i, &flip)) in plan.indices.iter().zip(&plan.flips).enumerate() {
            let mut row = [i as u8, i as u8, 255 - i as u8];
            if flip {
                row.reverse();
            }
            let got: Vec<f32> = (0..3).map(|x| batch[[k, 0, 0, x]]).collect();
            let want: Vec<f32> = row.iter().map(|&p| pixel_to_unit(p)).collect();
            assert_eq!(got, want, "image {i}, flip {flip}");
        }
        let flipped = plan.flips.iter().filter(|&&f| f).count();
        assert!((8..=32).contains(&flipped), "about half flipped, got {flipped}");
    }

    #[test]
    fn bad_batch_sizes_and_positions_are_config_errors() {
        let d = Arc::new(indexed(10));
        for bs in [0, 11] {
            let err = Batches::new(Arc::clone(&d), config(bs, false, 0)).expect_err("bad size");
            assert!(matches!(err, Error::InvalidConfig { what: "batch size", .. }));
        }
        let err = Batches::resume(d, config(2, false, 0), BatchPosition { epoch: 0, index: 11 })
            .expect_err("bad index");
        assert!(matches!(err, Error::InvalidConfig { what: "batch position", .. }));
    }

    #[test]
    fn below_is_in_range_and_covers_it() {
        let mut rng = rng_from_seed(0);
        let mut counts = [0usize; 7];
        for _ in 0..7000 {
            counts[below(&mut rng, 7) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
    }

    #[test]
    fn iterator_yields_the_same_batches_as_next_batch() {
        let d = Arc::new(indexed(12));
        let mut a = Batches::new(Arc::clone(&d), config(4, true, 2)).expect("valid");
        let b = Batches::new(d, config(4, true, 2)).expect("valid");
        let from_iter: Vec<Tensor> = b.take(5).collect();
        let direct: Vec<Tensor> = (0..5).map(|_| a.next_batch()).collect();
        assert_eq!(from_iter, direct);
    }

    #[test]
    fn labelled_batches_follow_the_same_stream_and_carry_each_image_s_label() {
        // Label of image i is 10 + i; pixel 0 of image i is i, so the label can be checked
        // against the image that was actually served.
        let n = 12;
        let labels: Vec<u32> = (0..n as u32).map(|i| 10 + i).collect();
        let d = Arc::new(indexed(n).with_labels(labels).expect("one label per image"));
        let mut plain = Batches::new(Arc::clone(&d), config(5, true, 4)).expect("valid");
        let mut labelled = Batches::new(Arc::clone(&d), config(5, true, 4)).expect("valid");
        for _ in 0..7 {
            let batch = labelled.next_labelled();
            assert_eq!(batch.x0, plain.next_batch());
            let got = batch.labels.expect("the dataset has labels");
            for (k, &label) in got.iter().enumerate() {
                // A flip mirrors [i, i, 255 − i]; the middle pixel is i either way.
                let i = ((batch.x0[[k, 0, 0, 1]] + 1.0) * 127.5).round() as usize;
                assert_eq!(label, 10 + i);
            }
        }
        let position = labelled.position();
        let mut resumed = Batches::resume(Arc::clone(&d), config(5, true, 4), position).expect("valid");
        assert_eq!(resumed.next_labelled(), labelled.next_labelled());
        let mut unlabelled = Batches::new(Arc::new(indexed(n)), config(5, true, 4)).expect("valid");
        assert_eq!(unlabelled.next_labelled().labels, None);
    }
}
