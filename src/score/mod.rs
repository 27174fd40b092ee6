//! How good are samples? Features and class probabilities from a small classifier trained on
//! the reference data ([`classifier`]), and the statistics of [`metrics`] on them: the Fréchet
//! distance in that feature space (FD), KID, precision and recall, the class histogram, its
//! entropy and the share of confident predictions, each beside the same figures for as many real
//! held-out images (the floor). docs/score.md says what these can and cannot compare.
//!
//! | file | owns |
//! |---|---|
//! | `classifier.rs` | [`Scorer`]: the CNN, its training ([`train_scorer`]), embedding, safetensors |
//! | `metrics.rs` | FD, KID, precision/recall, class statistics on feature matrices |
//! | `mod.rs` | [`ScoreConfig`], [`Reference`], [`score`] and the [`Report`] |

pub mod classifier;
pub mod metrics;

use rand::seq::SliceRandom;
use rand::SeedableRng;

pub use classifier::{train_scorer, Embedded, Scorer, ScorerConfig, ScorerStep, ScorerTrainConfig};
pub use metrics::{frechet_distance, kid, precision_recall, ClassStats, Gaussian, Kid, PrecisionRecall};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::Rng;

/// The MNIST scorer's weights, shipped in the repository (made by the command in
/// docs/score.md) and embedded in the library.
pub const MNIST_SCORER: &[u8] = include_bytes!("../../assets/scorer-mnist.safetensors");

impl Scorer {
    /// The shipped MNIST scorer ([`MNIST_SCORER`]).
    ///
    /// # Errors
    /// Only if the embedded bytes were damaged at build time.
    pub fn mnist() -> Result<Self> {
        Self::from_bytes(MNIST_SCORER, std::path::Path::new("embedded:assets/scorer-mnist.safetensors"))
    }
}

/// How [`score`] samples and compares.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreConfig {
    /// Training images whose features are the reference (a seeded random subset, or all if fewer).
    pub reference_count: usize,
    /// KID's number of subsets.
    pub kid_subsets: usize,
    /// KID's largest subset size (min(n, this) is used).
    pub kid_subset_size: usize,
    /// The k of the k-NN manifolds of precision and recall.
    pub k: usize,
    /// Seed of every random choice (reference subset, held-out images, KID subsets).
    pub seed: u64,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        Self { reference_count: 10_000, kid_subsets: 100, kid_subset_size: 1000, k: 3, seed: 0 }
    }
}

/// Every figure of one set of images against the reference.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Figures {
    /// Fréchet distance in the scorer's feature space.
    pub fd: f64,
    /// KID (unbiased MMD², polynomial kernel).
    pub kid: f64,
    /// KID's standard error over its subsets.
    pub kid_se: f64,
    /// Share of the images inside the real manifold.
    pub precision: f64,
    /// Share of real images inside the images' manifold.
    pub recall: f64,
    /// Images per arg-max class.
    pub class_hist: Vec<usize>,
    /// Entropy of the class histogram, nats.
    pub class_entropy: f64,
    /// Share classified with probability ≥ 0.9.
    pub frac_conf90: f64,
}

/// The reference: features of a seeded subset of the training images and their Gaussian.
#[derive(Clone, Debug)]
pub struct Reference {
    /// Which training images (indices into the training set).
    pub indices: Vec<usize>,
    /// Their features and probabilities.
    pub embedded: Embedded,
    /// Mean and covariance of the features.
    pub gaussian: Gaussian,
}

impl Reference {
    /// Embeds `min(config.reference_count, train.len())` training images chosen by the seed.
    ///
    /// # Errors
    /// As [`Scorer::embed`]; [`Error::InvalidConfig`] if fewer than 2 images are chosen.
    pub fn new(scorer: &Scorer, train: &Dataset, config: &ScoreConfig) -> Result<Self> {
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut Rng::seed_from_u64(config.seed));
        order.truncate(config.reference_count.min(train.len()));
        let embedded = scorer.embed(train, &order)?;
        let gaussian = Gaussian::fit(embedded.features.view())?;
        Ok(Self { indices: order, embedded, gaussian })
    }

    /// The figures of embedded images against this reference: FD and KID against all the
    /// reference features, precision and recall against the first n of them (equal set sizes,
    /// as Kynkäänniemi et al. use).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if there are fewer than `k + 1` images, or more than the
    /// reference holds.
    pub fn figures(&self, images: &Embedded, config: &ScoreConfig) -> Result<Figures> {
        let n = images.features.nrows();
        if n > self.indices.len() {
            return Err(Error::config(
                "images to score",
                format!(
                    "{n} images but the reference holds {}; score fewer (--n) or use more reference images",
                    self.indices.len()
                ),
            ));
        }
        let gaussian = Gaussian::fit(images.features.view())?;
        let kid = metrics::kid(
            images.features.view(),
            self.embedded.features.view(),
            config.kid_subsets,
            config.kid_subset_size,
            config.seed ^ 0x6b1d,
        )?;
        let real = self.embedded.features.slice(ndarray::s![..n, ..]);
        let pr = precision_recall(real, images.features.view(), config.k)?;
        let classes = metrics::class_stats(images.probs.view());
        Ok(Figures {
            fd: frechet_distance(&gaussian, &self.gaussian),
            kid: kid.kid,
            kid_se: kid.kid_se,
            precision: pr.precision,
            recall: pr.recall,
            class_hist: classes.class_hist,
            class_entropy: classes.class_entropy,
            frac_conf90: classes.frac_conf90,
        })
    }
}

/// The score of a set of images and its floor.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// How many images were scored (and how many real held-out images make the floor).
    pub n: usize,
    /// The images' figures.
    pub samples: Figures,
    /// The same figures for `n` real held-out images (the best a model can expect at this n).
    pub floor: Figures,
    /// Where the floor's images came from.
    pub floor_source: String,
}

impl Report {
    /// The report as JSON: `n`, the samples' figures under their names (`fd`, `kid`, `kid_se`,
    /// `precision`, `recall`, `class_hist`, `class_entropy`, `frac_conf90`), the floor's with a
    /// `real_` prefix, and `floor_source`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        map.insert("n".into(), self.n.into());
        let as_map = |f: &Figures| match serde_json::to_value(f).expect("plain numbers serialise") {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("a struct serialises to an object"),
        };
        map.extend(as_map(&self.samples));
        map.extend(as_map(&self.floor).into_iter().map(|(k, v)| (format!("real_{k}"), v)));
        map.insert("floor_source".into(), self.floor_source.clone().into());
        serde_json::Value::Object(map)
    }
}

/// Scores the images at `sample_indices` of `samples` against the training images: their
/// figures and, as the floor, those of as many real images held out from training (`held_out`,
/// e.g. the test split; or, when it is `None`, training images outside the reference subset),
/// chosen by the seed.
///
/// # Errors
/// As [`Reference::new`] and [`Reference::figures`]; [`Error::InvalidConfig`] if there are too
/// few held-out images for the floor.
pub fn score(
    scorer: &Scorer,
    samples: &Dataset,
    train: &Dataset,
    held_out: Option<&Dataset>,
    config: &ScoreConfig,
) -> Result<Report> {
    let reference = Reference::new(scorer, train, config)?;
    let n = samples.len();
    let all: Vec<usize> = (0..n).collect();
    let generated = scorer.embed(samples, &all)?;
    let sample_figures = reference.figures(&generated, config)?;
    let mut rng = Rng::seed_from_u64(config.seed ^ 0xf100);
    let (floor_data, mut pool, floor_source) = match held_out {
        Some(d) => (d, (0..d.len()).collect::<Vec<_>>(), format!("{} (held out)", d.source().display())),
        None => {
            let mut used = vec![false; train.len()];
            reference.indices.iter().for_each(|&i| used[i] = true);
            let rest = (0..train.len()).filter(|&i| !used[i]).collect();
            (train, rest, format!("{} (training images outside the reference)", train.source().display()))
        }
    };
    if pool.len() < n {
        return Err(Error::config(
            "score floor",
            format!(
                "{n} images to score but only {} held-out real images for the floor; score fewer (--n)",
                pool.len()
            ),
        ));
    }
    pool.shuffle(&mut rng);
    pool.truncate(n);
    let real = scorer.embed(floor_data, &pool)?;
    let floor = reference.figures(&real, config)?;
    Ok(Report { n, samples: sample_figures, floor, floor_source })
}
