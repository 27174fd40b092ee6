//! The scorer's network: a small CNN classifier whose penultimate activations are the feature
//! space of the Fréchet distance, KID and precision/recall ([`super::metrics`]), built from
//! ddpm's own ops and trained with its own autodiff and Adam.
//!
//! ```text
//! x [N, C, H, W] on [−1, 1]
//!   conv1 3×3 C→w0, SiLU, avg_pool2x
//!   conv2 3×3 w0→w1, SiLU, avg_pool2x, flatten   → [N, w1·⌊H/4⌋·⌊W/4⌋]
//!   fc    linear → w2, SiLU                      → features [N, w2]
//!   head  linear w2→K                            → logits [N, K]
//! ```
//!
//! With the default widths (32, 64, 128) the features are 128-d and an MNIST scorer has about
//! 422 k parameters.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{Array2, Axis};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::nn::layers::{conv, conv_params, linear, linear_params, Init, Initialise, ParamSink};
use crate::nn::{Adam, AdamConfig, Bound, ParamStore};
use crate::ops::Padding;
use crate::{Rng, Tape, Tensor, Var};

/// The metadata key holding a scorer's [`ScorerConfig`] as JSON.
const CONFIG_KEY: &str = "ddpm_scorer_config";
/// The metadata key holding how the weights were made (free text: command, seed, accuracy).
const PROVENANCE_KEY: &str = "ddpm_scorer_provenance";

/// The shape of a scorer: its input images, its classes and its three conv widths.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScorerConfig {
    /// Channels of the input images (1 for MNIST, 3 for CIFAR-10).
    pub in_channels: usize,
    /// Height and width of the input images.
    pub resolution: usize,
    /// Number of classes K.
    pub num_classes: usize,
    /// Output channels of the two 3×3 convolutions and the width of the feature layer `fc`.
    pub widths: [usize; 3],
}

impl ScorerConfig {
    /// The default widths (32, 64, 128) for images of this shape and class count.
    pub fn new(in_channels: usize, resolution: usize, num_classes: usize) -> Self {
        Self { in_channels, resolution, num_classes, widths: [32, 64, 128] }
    }

    /// The feature dimension (the width of `fc`).
    pub fn feature_dim(&self) -> usize {
        self.widths[2]
    }

    /// Activations of one image through the two convolutions, `w0·H·W + w1·(H/2)·(W/2)`: what
    /// the memory of a forward pass scales with.
    pub fn activation_len(&self) -> usize {
        let r = self.resolution;
        self.widths[0] * r * r + self.widths[1] * (r / 2) * (r / 2)
    }

    /// The length of the flattened conv2 output that `fc` takes.
    pub fn flat_dim(&self) -> usize {
        self.widths[1] * (self.resolution / 4) * (self.resolution / 4)
    }

    /// Checks that the configuration describes a network that can be built.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field that is zero, too small or too large.
    pub fn validate(&self) -> Result<()> {
        if !(1..=4).contains(&self.in_channels) {
            return Err(Error::config("scorer in_channels", format!("{} is not 1 to 4", self.in_channels)));
        }
        if !(4..=512).contains(&self.resolution) {
            return Err(Error::config("scorer resolution", format!("{} is not 4 to 512", self.resolution)));
        }
        if !(2..=1000).contains(&self.num_classes) {
            return Err(Error::config(
                "scorer num_classes",
                format!("{} is not 2 to 1000", self.num_classes),
            ));
        }
        if self.widths.iter().any(|&w| !(1..=1024).contains(&w)) {
            return Err(Error::config("scorer widths", format!("{:?}: each must be 1 to 1024", self.widths)));
        }
        // A file's few bytes of configuration must not size a huge allocation: one image's
        // activations are capped (the defaults at 256×256 use 3.1 M of the 4 M).
        if self.activation_len() > MAX_ACTIVATION_LEN {
            return Err(Error::config(
                "scorer size",
                format!(
                    "widths {:?} at {}×{} need {} activations per image, above the {MAX_ACTIVATION_LEN} allowed",
                    self.widths,
                    self.resolution,
                    self.resolution,
                    self.activation_len()
                ),
            ));
        }
        Ok(())
    }

    /// Declares every parameter, in order, under PyTorch-style names.
    pub fn declare(&self, sink: &mut dyn ParamSink) {
        let [w0, w1, w2] = self.widths;
        conv_params(sink, "conv1", self.in_channels, w0, 3, Init::Default);
        conv_params(sink, "conv2", w0, w1, 3, Init::Default);
        linear_params(sink, "fc", self.flat_dim(), w2);
        linear_params(sink, "head", w2, self.num_classes);
    }
}

/// What the network computes for a batch: its features and its logits.
pub struct ScorerOutput {
    /// The penultimate activations `[N, w2]` (after `fc`'s SiLU).
    pub features: Var,
    /// The class logits `[N, K]`.
    pub logits: Var,
}

/// Features and class probabilities of a set of images, in f64 for the statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedded {
    /// `[n, d]` features.
    pub features: Array2<f64>,
    /// `[n, K]` softmax probabilities.
    pub probs: Array2<f64>,
}

/// A trained (or freshly initialised) scorer: its configuration and weights.
#[derive(Clone, Debug)]
pub struct Scorer {
    /// The network's shape.
    pub config: ScorerConfig,
    /// Its weights.
    pub params: ParamStore,
    /// How the weights were made (command, seed, accuracy), as stored with them.
    pub provenance: String,
}

/// How [`train_scorer`] trains.
#[derive(Clone, Debug, PartialEq)]
pub struct ScorerTrainConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Adam's peak learning rate (see [`train_scorer`] for its warm-up and decay).
    pub lr: f64,
    /// Seed of the initialisation and of the order of the images.
    pub seed: u64,
}

impl Default for ScorerTrainConfig {
    fn default() -> Self {
        Self { epochs: 8, batch_size: 128, lr: 2e-3, seed: 0 }
    }
}

/// Images per forward pass when embedding without a tape, at most (fewer for large images: see
/// [`Scorer::embed`]).
const EMBED_CHUNK: usize = 500;
/// The most activations one image may need ([`ScorerConfig::activation_len`]).
const MAX_ACTIVATION_LEN: usize = 1 << 22;
/// The most activations one embedding chunk may hold (256 MiB of f32).
const MAX_CHUNK_ACTIVATIONS: usize = 1 << 26;

impl Scorer {
    /// A scorer with freshly initialised weights (variance scaling, biases zero).
    ///
    /// # Errors
    /// As [`ScorerConfig::validate`].
    pub fn init(config: ScorerConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = Rng::seed_from_u64(seed);
        let mut sink = Initialise { store: ParamStore::new(), rng: &mut rng };
        config.declare(&mut sink);
        Ok(Self { config, params: sink.store, provenance: String::new() })
    }

    /// The forward pass on `x` `[N, C, H, W]` with the parameters bound in `p`.
    ///
    /// # Panics
    /// If `x` does not have the configured channels.
    pub fn forward(&self, p: &Bound, x: &Var) -> ScorerOutput {
        let same = Padding::same(1);
        let h = conv(p, "conv1", x, 1, same).silu().avg_pool2x();
        let h = conv(p, "conv2", &h, 1, same).silu().avg_pool2x();
        let n = h.shape()[0];
        let features = linear(p, "fc", &h.reshape(&[n, self.config.flat_dim()])).silu();
        let logits = linear(p, "head", &features);
        ScorerOutput { features, logits }
    }

    /// Checks that `data` has the images this scorer takes.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] saying which shape was expected.
    pub fn check_images(&self, data: &Dataset) -> Result<()> {
        let c = &self.config;
        if data.channels() != c.in_channels || data.height() != c.resolution || data.width() != c.resolution {
            return Err(Error::config(
                "images to score",
                format!(
                    "{} holds {}×{}×{} images but the scorer takes {}×{}×{}; score images of the kind \
                     it was trained on, or train a scorer for these with `ddpm score --train-scorer`",
                    data.source().display(),
                    data.channels(),
                    data.height(),
                    data.width(),
                    c.in_channels,
                    c.resolution,
                    c.resolution
                ),
            ));
        }
        Ok(())
    }

    /// Features and softmax probabilities of the images at `indices` of `data`, computed without a
    /// tape in chunks of at most 500 images and 256 MiB of activations (the result
    /// does not depend on the chunking).
    ///
    /// # Errors
    /// As [`Scorer::check_images`].
    pub fn embed(&self, data: &Dataset, indices: &[usize]) -> Result<Embedded> {
        self.check_images(data)?;
        let (d, k) = (self.config.feature_dim(), self.config.num_classes);
        let mut features = Array2::<f64>::zeros((indices.len(), d));
        let mut probs = Array2::<f64>::zeros((indices.len(), k));
        let p = self.params.bind_constant();
        let per_chunk = (MAX_CHUNK_ACTIVATIONS / self.config.activation_len().max(1)).clamp(1, EMBED_CHUNK);
        for (chunk_no, chunk) in indices.chunks(per_chunk).enumerate() {
            let x = Var::constant(data.to_tensor(chunk));
            let out = self.forward(&p, &x);
            let start = chunk_no * per_chunk;
            let f = out
                .features
                .value()
                .view()
                .into_dimensionality::<ndarray::Ix2>()
                .expect("features are [N, d]");
            let l =
                out.logits.value().view().into_dimensionality::<ndarray::Ix2>().expect("logits are [N, K]");
            for (i, (frow, lrow)) in f.axis_iter(Axis(0)).zip(l.axis_iter(Axis(0))).enumerate() {
                features.row_mut(start + i).iter_mut().zip(frow).for_each(|(o, &v)| *o = f64::from(v));
                // Softmax in f64 through the row's maximum.
                let max = lrow.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut row = probs.row_mut(start + i);
                row.iter_mut().zip(lrow).for_each(|(o, &v)| *o = f64::from(v - max).exp());
                let sum: f64 = row.sum();
                row.mapv_inplace(|v| v / sum);
            }
        }
        Ok(Embedded { features, probs })
    }

    /// The share of `data`'s images whose arg-max class is their label.
    ///
    /// # Errors
    /// [`Error::BadFile`] if `data` carries no labels; as [`Scorer::embed`].
    pub fn accuracy(&self, data: &Dataset) -> Result<f64> {
        let labels = data.labels().ok_or_else(|| {
            Error::bad_file(
                data.source(),
                "the scorer's accuracy needs class labels, and these images carry none",
            )
        })?;
        let all: Vec<usize> = (0..data.len()).collect();
        let embedded = self.embed(data, &all)?;
        let correct = embedded
            .probs
            .axis_iter(Axis(0))
            .zip(labels)
            .filter(|(row, &y)| argmax(row.as_slice().expect("rows of a standard array")) == y as usize)
            .count();
        Ok(correct as f64 / data.len() as f64)
    }

    /// Saves the weights, the configuration and the provenance as a safetensors file, atomically.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be written.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::files::write_atomic(path, &self.to_bytes()?)
    }

    /// The bytes [`Scorer::save`] writes.
    ///
    /// # Errors
    /// Only if two parameters shared a name (they cannot: the configuration names them).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let tensors: Vec<(String, &Tensor)> = self.params.iter().map(|(n, t)| (n.to_string(), t)).collect();
        let mut metadata = BTreeMap::new();
        let config = serde_json::to_string(&self.config).expect("a plain struct serialises");
        metadata.insert(CONFIG_KEY.to_string(), config);
        metadata.insert(PROVENANCE_KEY.to_string(), self.provenance.clone());
        crate::io::safetensors::to_bytes(&tensors, &metadata)
    }

    /// Loads a scorer written by [`Scorer::save`].
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; [`Error::BadFile`] naming the file if it is not a
    /// scorer (no configuration, or a tensor missing or of the wrong shape).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::files::read_capped(path, crate::files::memory_cap())?;
        Self::from_bytes(&bytes, path)
    }

    /// [`Scorer::load`] for bytes in memory; `source` names them in errors.
    ///
    /// # Errors
    /// As [`Scorer::load`].
    pub fn from_bytes(bytes: &[u8], source: &Path) -> Result<Self> {
        let loaded = crate::io::safetensors::from_bytes(bytes, source)?;
        let not_scorer = |why: String| {
            Error::bad_file(
                source,
                format!("{why}; this is not a scorer written by `ddpm score --train-scorer`"),
            )
        };
        let config_json = loaded
            .metadata
            .get(CONFIG_KEY)
            .ok_or_else(|| not_scorer(format!("no `{CONFIG_KEY}` in its metadata")))?;
        let config: ScorerConfig = serde_json::from_str(config_json)
            .map_err(|e| not_scorer(format!("its `{CONFIG_KEY}` cannot be read ({e})")))?;
        config.validate().map_err(|e| not_scorer(format!("its configuration is refused ({e})")))?;
        let mut expected: Vec<(String, Vec<usize>)> = Vec::new();
        config.declare(&mut expected);
        let mut params = ParamStore::new();
        for (name, shape) in expected {
            let t = loaded.tensors.get(&name).ok_or_else(|| not_scorer(format!("no tensor `{name}`")))?;
            if t.shape() != shape.as_slice() {
                return Err(not_scorer(format!("`{name}` is {:?}, expected {shape:?}", t.shape())));
            }
            if !crate::nn::all_finite(t) {
                return Err(not_scorer(format!("`{name}` holds NaN or infinite values")));
            }
            params.insert(name, t.clone());
        }
        if loaded.tensors.len() != params.len() {
            return Err(not_scorer(format!(
                "{} tensors where {} were expected",
                loaded.tensors.len(),
                params.len()
            )));
        }
        let provenance = loaded.metadata.get(PROVENANCE_KEY).cloned().unwrap_or_default();
        Ok(Self { config, params, provenance })
    }
}

/// The index of the largest entry (the first on ties).
pub(crate) fn argmax(row: &[f64]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
}

/// One step's figures, passed to [`train_scorer`]'s progress callback.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScorerStep {
    /// Steps done so far (1-based).
    pub step: usize,
    /// Steps in the whole run.
    pub total: usize,
    /// This step's mean cross-entropy.
    pub loss: f64,
}

/// Trains a scorer on a labelled dataset: softmax cross-entropy, Adam with a linear warm-up
/// over the first 100 steps (or tenth of the run, if shorter) and a linear decay to 0, each epoch
/// a seeded shuffle of the images, each image shifted by up to 2 pixels (zero padded) so that the
/// features do not hinge on exact centring.
///
/// Each batch also holds a quarter as many noise images ([`outliers`]) whose target is the
/// uniform distribution (outlier exposure, Hendrycks et al. 2019), so that the scorer is not
/// confident about images that are no digit at all: a plain softmax classifier calls most
/// Gaussian noise an "8" with probability above 0.9, which would make the confident fraction
/// of a failed model look good.
///
/// # Errors
/// [`Error::BadFile`] if `data` has no labels; [`Error::InvalidConfig`] if the configuration is
/// refused, a label is not below its class count, or the run has no step.
pub fn train_scorer(
    data: &Dataset,
    config: &ScorerTrainConfig,
    mut progress: impl FnMut(ScorerStep),
) -> Result<Scorer> {
    let labels = data.labels().ok_or_else(|| {
        Error::bad_file(
            data.source(),
            "training a scorer needs class labels: give IDX images with their *-labels-idx1-ubyte \
             file (--labels) or CIFAR-10 batches",
        )
    })?;
    let num_classes = data.num_classes().unwrap_or(0).max(2);
    if data.height() != data.width() {
        return Err(Error::config(
            "scorer images",
            format!("{}×{} images; the scorer takes square ones", data.height(), data.width()),
        ));
    }
    if config.batch_size == 0 || config.epochs == 0 {
        return Err(Error::config("scorer training", "epochs and batch size must be at least 1"));
    }
    let scorer_config = ScorerConfig::new(data.channels(), data.height(), num_classes);
    let mut scorer = Scorer::init(scorer_config, config.seed)?;
    let mut adam = Adam::new(&scorer.params, AdamConfig::default());
    let mut rng = Rng::seed_from_u64(config.seed ^ 0x5c0e_5c0e);
    let per_epoch = data.len().div_ceil(config.batch_size);
    let total = per_epoch * config.epochs;
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut step = 0;
    for _ in 0..config.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(config.batch_size) {
            step += 1;
            let real = shifted(data.to_tensor(chunk), &mut rng);
            let noise = outliers(chunk.len().div_ceil(4), data.channels(), data.height(), &mut rng);
            let x = ndarray::concatenate(Axis(0), &[real.view(), noise.view()]).expect("same image shape");
            let rows = x.shape()[0];
            let mut targets = Array2::<f32>::from_elem((rows, num_classes), 1.0 / num_classes as f32);
            for (n, &i) in chunk.iter().enumerate() {
                targets.row_mut(n).fill(0.0);
                targets[[n, labels[i] as usize]] = 1.0;
            }
            let tape = Tape::new();
            let p = scorer.params.bind(&tape);
            let loss = scorer.forward(&p, &tape.var(x)).logits.cross_entropy_soft(targets.view());
            let grads = p.grads(&loss.backward());
            let warm = (step as f64 / (total / 10).clamp(1, 100) as f64).min(1.0);
            let decay = 1.0 - (step - 1) as f64 / total as f64;
            adam.update(&mut scorer.params, &grads, config.lr * warm * decay);
            progress(ScorerStep { step, total, loss: f64::from(loss.value()[[]]) });
        }
    }
    Ok(scorer)
}

/// `n` noise images `[n, c, side, side]` on [−1, 1] that are no class: half white Gaussian noise
/// of a random scale in [0.2, 1], half smooth blobs (Gaussian noise at a quarter of the
/// resolution, upsampled by repetition and shifted towards the dark background), each clipped.
pub fn outliers(n: usize, c: usize, side: usize, rng: &mut Rng) -> Tensor {
    use rand::Rng as _;
    use rand_distr::StandardNormal;
    let mut out = Tensor::zeros(vec![n, c, side, side]);
    let coarse = (side / 4).max(1);
    for i in 0..n {
        let scale: f32 = rng.random_range(0.2..=1.0);
        if i % 2 == 0 {
            out.slice_mut(ndarray::s![i, .., .., ..])
                .mapv_inplace(|_| (scale * rng.sample::<f32, _>(StandardNormal)).clamp(-1.0, 1.0));
        } else {
            let low = Tensor::from_shape_simple_fn(vec![c, coarse, coarse], || {
                rng.sample::<f32, _>(StandardNormal)
            });
            let shift: f32 = rng.random_range(-1.0..=0.0);
            for ch in 0..c {
                for r in 0..side {
                    for col in 0..side {
                        let v = low[[
                            ch,
                            (r * coarse / side).min(coarse - 1),
                            (col * coarse / side).min(coarse - 1),
                        ]];
                        out[[i, ch, r, col]] = (shift + scale * v).clamp(-1.0, 1.0);
                    }
                }
            }
        }
    }
    out
}

/// Each image of `x` `[N, C, H, W]` moved by a random whole-pixel offset in [−2, 2]² (the
/// background value −1 fills what moves in).
fn shifted(x: Tensor, rng: &mut Rng) -> Tensor {
    use rand::Rng as _;
    let shape = x.shape().to_vec();
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let mut out = Tensor::from_elem(shape.clone(), -1.0);
    for i in 0..n {
        let dy = rng.random_range(-2i32..=2) as isize;
        let dx = rng.random_range(-2i32..=2) as isize;
        for ch in 0..c {
            for r in 0..h as isize {
                let src_r = r - dy;
                if src_r < 0 || src_r >= h as isize {
                    continue;
                }
                for col in 0..w as isize {
                    let src_c = col - dx;
                    if src_c < 0 || src_c >= w as isize {
                        continue;
                    }
                    out[[i, ch, r as usize, col as usize]] = x[[i, ch, src_r as usize, src_c as usize]];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_labelled(n: usize) -> Dataset {
        // Class 0: horizontal stripes; class 1: vertical stripes (8×8, one channel), with a
        // varying phase and brightness.
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let class = i % 2;
            for r in 0..8 {
                for c in 0..8 {
                    let along = if class == 0 { r } else { c };
                    let bright = (along + i / 2) % 2 == 0;
                    pixels.push(if bright { 200 + (i % 50) as u8 } else { (i % 30) as u8 });
                }
            }
            labels.push(class as u32);
        }
        Dataset::new(pixels, n, 1, 8, 8, "tiny").unwrap().with_labels(labels).unwrap()
    }

    #[test]
    fn scorer_learns_a_separable_task() {
        let data = tiny_labelled(64);
        let config = ScorerTrainConfig { epochs: 20, batch_size: 16, lr: 1e-2, seed: 1 };
        let mut losses = Vec::new();
        let scorer = train_scorer(&data, &config, |s| losses.push(s.loss)).unwrap();
        assert_eq!(losses.len(), 20 * 4);
        assert!(losses.last().unwrap() < &(losses[0] * 0.5), "loss did not fall: {losses:?}");
        assert!(scorer.accuracy(&data).unwrap() > 0.95);
        // Outlier exposure: noise images get no confident class.
        let noise = outliers(32, 1, 8, &mut Rng::seed_from_u64(9));
        let p = scorer.params.bind_constant();
        let probs = scorer.forward(&p, &Var::constant(noise)).logits.softmax();
        let confident = probs.value().rows().into_iter().filter(|r| r.iter().any(|&v| v >= 0.9)).count();
        assert!(confident <= 3, "{confident} of 32 noise images classified with ≥ 0.9");
    }

    #[test]
    fn embedding_does_not_depend_on_chunking() {
        let data = tiny_labelled(EMBED_CHUNK + 7);
        let scorer = Scorer::init(ScorerConfig::new(1, 8, 2), 3).unwrap();
        let all: Vec<usize> = (0..data.len()).collect();
        let whole = scorer.embed(&data, &all).unwrap();
        let last = scorer.embed(&data, &all[EMBED_CHUNK..]).unwrap();
        assert_eq!(whole.features.slice(ndarray::s![EMBED_CHUNK.., ..]), last.features);
        for row in whole.probs.axis_iter(Axis(0)) {
            assert!((row.sum() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn save_and_load_round_trip_and_refuse_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        let mut scorer = Scorer::init(ScorerConfig::new(1, 8, 3), 2).unwrap();
        scorer.provenance = "test".into();
        scorer.save(&path).unwrap();
        let back = Scorer::load(&path).unwrap();
        assert_eq!(back.config, scorer.config);
        assert_eq!(back.provenance, "test");
        for ((a, x), (b, y)) in scorer.params.iter().zip(back.params.iter()) {
            assert_eq!((a, x), (b, y));
        }
        // A safetensors file without the scorer's metadata is refused, naming the file.
        let other = dir.path().join("o.safetensors");
        let t = Tensor::zeros(vec![2]);
        crate::io::safetensors::save_atomic(&other, &[("w".into(), &t)], &BTreeMap::new()).unwrap();
        let err = Scorer::load(&other).unwrap_err().to_string();
        assert!(err.contains("o.safetensors") && err.contains("not a scorer"), "{err}");
        // Truncated bytes are refused, not a panic.
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 7, 8, 60, bytes.len() / 2, bytes.len() - 1] {
            assert!(Scorer::from_bytes(&bytes[..cut], &path).is_err());
        }
    }

    #[test]
    fn a_configuration_that_would_need_huge_activations_is_refused() {
        let mut c = ScorerConfig::new(1, 512, 10);
        c.widths = [1024, 1024, 8];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("activations"), "{err}");
        assert!(ScorerConfig::new(3, 256, 10).validate().is_ok(), "the defaults at 256×256 fit");
    }

    #[test]
    fn images_of_another_shape_are_refused() {
        let scorer = Scorer::init(ScorerConfig::new(1, 28, 10), 0).unwrap();
        let err = scorer.embed(&tiny_labelled(4), &[0]).unwrap_err().to_string();
        assert!(err.contains("1×8×8") && err.contains("1×28×28"), "{err}");
    }

    #[test]
    fn shifted_moves_whole_images() {
        let x = Tensor::from_shape_fn(vec![3, 1, 6, 6], |d| (d[2] * 6 + d[3]) as f32);
        let mut rng = Rng::seed_from_u64(5);
        let y = shifted(x.clone(), &mut rng);
        for i in 0..3 {
            // Every value kept is the source pixel's, at one offset per image; the rest is −1.
            let kept: Vec<f32> =
                y.slice(ndarray::s![i, 0, .., ..]).iter().copied().filter(|&v| v >= 0.0).collect();
            assert!(kept.len() >= 16, "at most 2 pixels move out each way");
            let offsets: std::collections::BTreeSet<isize> = (0..6)
                .flat_map(|r| (0..6).map(move |c| (r, c)))
                .filter(|&(r, c)| y[[i, 0, r, c]] >= 0.0)
                .map(|(r, c)| (r * 6 + c) as isize - y[[i, 0, r, c]] as isize)
                .collect();
            assert_eq!(offsets.len(), 1, "image {i} moved by more than one offset: {offsets:?}");
        }
    }
}
