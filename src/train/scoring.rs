//! `--score-every`: the sample score of a run as it trains. Every N steps the EMA weights draw
//! a fixed number of images with DPM-Solver++(2M)-SDE (20 steps on Karras σ, the demo's
//! sampler), seeded by the step, and [`crate::score`] scores them against a reference of the
//! training images embedded once when the run starts. The figures go into metrics.csv and
//! `score.png`.
//!
//! The images are rounded to 8-bit pixels before they are scored, exactly as `ddpm sample`
//! writes them, so the score of step N equals `ddpm score` on the same images saved as PNG.

use super::metrics::ScoreColumns;
use super::Trainer;
use crate::data::Dataset;
use crate::diffusion::samplers::SamplerKind;
use crate::io::png::unit_to_pixel;
use crate::sample::{sample, SampleConfig};
use crate::score::{Reference, ScoreConfig, Scorer};
use crate::stop::StopFlag;
use crate::{Error, Result};

/// The sampler's step count.
pub const SCORE_SAMPLER_STEPS: usize = 20;

/// A scorer and its reference, ready to score a trainer's samples.
pub struct Scoring {
    scorer: Scorer,
    reference: Reference,
    config: ScoreConfig,
    samples: usize,
}

impl Scoring {
    /// Embeds the reference (the scorer's default count of training images, chosen by its
    /// seed) and checks that `samples` images can be scored against it.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the scorer does not fit the images (channels, size), or
    /// `samples` is below k + 1 or above the reference's size (naming `--score-samples`).
    pub fn new(scorer: Scorer, train: &Dataset, samples: usize) -> Result<Self> {
        let config = ScoreConfig::default();
        let reference = Reference::new(&scorer, train, &config)?;
        let most = reference.indices.len();
        if samples <= config.k || samples > most {
            return Err(Error::config(
                "images scored (--score-samples)",
                format!("{samples} is outside {}..={most} (k + 1 up to the reference's size)", config.k + 1),
            ));
        }
        Ok(Self { scorer, reference, config, samples })
    }

    /// Draws and scores the trainer's samples; `None` if `stop` was raised meanwhile. A
    /// class-conditional model draws each class in turn, as many of each as `samples` allows.
    ///
    /// # Errors
    /// Errors of sampling or scoring (none are expected once [`Scoring::new`] succeeded).
    pub fn score(&self, trainer: &Trainer, stop: &StopFlag) -> Result<Option<ScoreColumns>> {
        let n = self.samples;
        // Seeded by the step, as `ddpm sample --seed STEP` seeds its first batch: the images of
        // an unconditional model's score are those of `ddpm sample --checkpoint (step N) --seed N
        // --sampler dpm++2m-sde --steps 20 --karras --num (samples)`.
        let mut rng = crate::rng_from_seed(trainer.step_count());
        rng.set_stream(0);
        let param = trainer.config().diffusion.parameterization();
        let (ema, net, schedule) = (trainer.ema_params(), trainer.net(), trainer.schedule());
        let cfg = |class: Option<usize>| SampleConfig {
            sampler: SamplerKind::DpmPlusPlus2MSde,
            steps: Some(SCORE_SAMPLER_STEPS.min(trainer.config().diffusion.timesteps)),
            karras: true,
            stop: Some(stop.clone()),
            class,
            ..SampleConfig::ancestral()
        };
        let groups: Vec<(Option<usize>, usize)> = match trainer.config().unet.num_classes {
            None => vec![(None, n)],
            Some(k) => (0..k.min(n)).map(|c| (Some(c), n / k + usize::from(c < n % k))).collect(),
        };
        let [_, c, h, w] = trainer.dataset().shape();
        let mut pixels = Vec::with_capacity(n * c * h * w);
        for (class, count) in groups {
            match sample(net, &ema, schedule, &param, count, &cfg(class), &mut rng, |_, _| {}) {
                Err(Error::Interrupted) => return Ok(None),
                Err(e) => return Err(e),
                Ok(s) => pixels.extend(s.images.iter().map(|&x| unit_to_pixel(x))),
            }
        }
        let images = Dataset::new(pixels, n, c, h, w, "samples of the run")?;
        let all: Vec<usize> = (0..n).collect();
        let embedded = self.scorer.embed(&images, &all)?;
        let f = self.reference.figures(&embedded, &self.config)?;
        Ok(Some(ScoreColumns {
            fd: f.fd,
            kid: f.kid,
            precision: f.precision,
            recall: f.recall,
            class_entropy: f.class_entropy,
            frac_conf90: f.frac_conf90,
        }))
    }
}
