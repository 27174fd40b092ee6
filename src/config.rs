//! What a training run depends on: [`TrainConfig`] (the network, the diffusion, the optimiser,
//! the batch) and its parts, serialised into every checkpoint, and their validation.
//!
//! This floor sits above [`crate::nn`] and [`crate::diffusion`], whose configurations it
//! combines, and below [`crate::io`] (which stores it) and [`crate::train`] (which runs it).
//! [`TrainConfig::validate`] is the one gate every configuration passes, whether it comes from
//! command-line flags, a checkpoint's metadata or another program's files: a value that would
//! make training panic, allocate without bound or write non-finite weights is refused there,
//! naming the setting.

use serde::{Deserialize, Serialize};

use crate::diffusion::{
    BetaSchedule, Convention, LossType, LossWeighting, MeanType, NoiseSchedule, Parameterization,
    TimestepSampling, VarianceType,
};
use crate::nn::{warmup_lr, AdamConfig, Ema, ParamStore, UNetConfig, MAX_SIGMA_REL};
use crate::{Error, Result};

/// The diffusion process and the objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiffusionConfig {
    /// β schedule.
    pub schedule: BetaSchedule,
    /// Number of steps T.
    pub timesteps: usize,
    /// Conventions where the references disagree.
    pub convention: Convention,
    /// What the network predicts.
    pub mean_type: MeanType,
    /// The reverse process variance.
    pub variance_type: VarianceType,
    /// The training objective.
    pub loss: LossType,
    /// How t is drawn.
    pub timestep_sampling: TimestepSampling,
    /// How each example's squared error is weighted by its t (absent in checkpoints written
    /// before it existed: uniform).
    #[serde(default)]
    pub loss_weighting: LossWeighting,
}

impl Default for DiffusionConfig {
    /// Ho et al.'s CIFAR-10 setting: linear β, T = 1000, ε-prediction, σ² = β, L_simple.
    fn default() -> Self {
        Self {
            schedule: BetaSchedule::Linear,
            timesteps: 1000,
            convention: Convention::Ho2020,
            mean_type: MeanType::Eps,
            variance_type: VarianceType::FixedLarge,
            loss: LossType::Simple,
            timestep_sampling: TimestepSampling::Uniform,
            loss_weighting: LossWeighting::Uniform,
        }
    }
}

impl DiffusionConfig {
    /// The precomputed schedule.
    ///
    /// # Errors
    /// As [`NoiseSchedule::new`].
    pub fn schedule(&self) -> Result<NoiseSchedule> {
        NoiseSchedule::new(&self.schedule, self.timesteps, self.convention.settings())
    }

    /// Mean and variance choice together.
    pub fn parameterization(&self) -> Parameterization {
        Parameterization { mean_type: self.mean_type, variance_type: self.variance_type }
    }

    /// Checks T and builds the β schedule to check it, without reading any file (a `file:`
    /// schedule is checked when it is read, by [`DiffusionConfig::schedule`]).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if T is 0 or above [`NoiseSchedule::MAX_TIMESTEPS`], or a
    /// custom schedule's β do not make a valid process of T steps.
    pub fn validate(&self) -> Result<()> {
        if self.timesteps == 0 || self.timesteps > NoiseSchedule::MAX_TIMESTEPS {
            return Err(Error::config(
                "timesteps",
                format!("T = {} is outside 1..={}", self.timesteps, NoiseSchedule::MAX_TIMESTEPS),
            ));
        }
        // The schedule itself (T ≥ 2, every β in (0, 1), ᾱ decreasing); a `file:` schedule is
        // checked when it is read.
        if !matches!(self.schedule, BetaSchedule::File(_)) {
            self.schedule()?;
        }
        self.loss_weighting.check(self.loss, self.mean_type)
    }
}

/// Optimiser settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Peak learning rate (Ho et al.: 2e-4 for CIFAR-10).
    pub lr: f64,
    /// Linear warm-up steps (Ho et al.: 5000).
    pub warmup_steps: u64,
    /// Clip gradients to this global norm (Ho et al.: 1.0); `None` disables.
    pub grad_clip: Option<f64>,
    /// Adam's β1.
    pub beta1: f64,
    /// Adam's β2.
    pub beta2: f64,
    /// Adam's ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// EMA decay (Ho et al.: 0.9999).
    pub ema_decay: f64,
    /// Warm the EMA decay up as `min(decay, (1+k)/(10+k))`.
    pub ema_warmup: bool,
    /// EDM2's power-function EMA of this exponent γ instead of the fixed decay ([`Ema`]);
    /// absent in checkpoints written before it existed.
    #[serde(default)]
    pub ema_power: Option<f64>,
    /// Decay of the learning rate after the warm-up; absent in older checkpoints (none).
    #[serde(default)]
    pub lr_decay: Option<LrDecay>,
}

/// The shape of a learning-rate decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecayShape {
    /// Straight down to 0.
    Linear,
    /// Half a cosine period, ½(1 + cos πp) (Loshchilov & Hutter's SGDR without restarts).
    Cosine,
}

/// The learning rate falls from its peak at the end of the warm-up to 0 at `end_step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LrDecay {
    /// How it falls.
    pub shape: DecayShape,
    /// The step at which it reaches 0 (the run's planned length).
    pub end_step: u64,
}

impl OptimConfig {
    /// Adam's hyper-parameters from these settings.
    pub fn adam_config(&self) -> AdamConfig {
        AdamConfig { beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay }
    }

    /// The learning rate of (1-based) step `step`: the linear warm-up, then the decay if any.
    /// After the decay's end step it is 0.
    pub fn lr_at(&self, step: u64) -> f64 {
        let warm = warmup_lr(self.lr, step, self.warmup_steps);
        let Some(d) = self.lr_decay else { return warm };
        let start = self.warmup_steps.min(d.end_step);
        if step <= start {
            return warm;
        }
        let p = ((step - start) as f64 / (d.end_step - start).max(1) as f64).min(1.0);
        warm * match d.shape {
            DecayShape::Linear => 1.0 - p,
            DecayShape::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        }
    }

    /// A fresh average of `params` with these settings.
    pub fn new_ema(&self, params: &ParamStore) -> Ema {
        Ema::new(params, self.ema_decay, self.ema_warmup).with_power(self.ema_power)
    }

    /// Checks every value's range: a NaN or infinite learning rate, say, would make Adam write
    /// NaN into every weight on the first step.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the setting (as its command-line flag) and its range.
    pub fn validate(&self) -> Result<()> {
        let finite_positive = |what: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::config(what, format!("{v} must be a finite number above 0")))
            }
        };
        let unit = |what: &'static str, v: f64, upper_closed: bool| {
            let ok = v >= 0.0 && if upper_closed { v <= 1.0 } else { v < 1.0 };
            if ok {
                Ok(())
            } else {
                let range = if upper_closed { "[0, 1]" } else { "[0, 1)" };
                Err(Error::config(what, format!("{v} is not in {range}")))
            }
        };
        finite_positive("learning rate (--lr)", self.lr)?;
        if let Some(clip) = self.grad_clip {
            finite_positive("gradient clip (--grad-clip)", clip)?;
        }
        unit("Adam beta1", self.beta1, false)?;
        unit("Adam beta2", self.beta2, false)?;
        finite_positive("Adam eps", self.eps)?;
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::config(
                "weight decay",
                format!("{} must be finite and at least 0", self.weight_decay),
            ));
        }
        if let Some(g) = self.ema_power {
            if !(g.is_finite() && g >= 0.0) {
                return Err(Error::config(
                    "power EMA (--ema-sigma-rel)",
                    format!("γ = {g} must be finite and at least 0 (σ_rel in (0, {MAX_SIGMA_REL:.4}])"),
                ));
            }
        }
        if let Some(d) = self.lr_decay {
            if d.end_step == 0 {
                return Err(Error::config(
                    "learning-rate decay (--lr-decay-steps)",
                    "must end at step 1 or later",
                ));
            }
        }
        unit("EMA decay (--ema-decay)", self.ema_decay, true)
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            warmup_steps: 5000,
            grad_clip: Some(1.0),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            ema_decay: 0.9999,
            ema_warmup: true,
            ema_power: None,
            lr_decay: None,
        }
    }
}

/// How a training step draws its random numbers (docs/distributed.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Draws {
    /// One stream for the run: the batch's timesteps, then its noise, then the dropout masks.
    /// Runs started before keyed draws existed (their checkpoints lack the field); one process
    /// only.
    #[default]
    Sequential,
    /// Each example's timestep, noise and dropout from streams keyed by the seed, the step and
    /// its position in the batch, so a step's maths does not depend on how many processes share
    /// it. Every new run.
    Keyed,
}

/// Everything a training run depends on; stored in every checkpoint's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The network.
    pub unet: UNetConfig,
    /// The diffusion process and objective.
    pub diffusion: DiffusionConfig,
    /// The optimiser.
    pub optim: OptimConfig,
    /// Images per step.
    pub batch_size: usize,
    /// Random horizontal flips of training images.
    pub random_flip: bool,
    /// Seed of the weights, the trainer's RNG and the batch order.
    pub seed: u64,
    /// How steps draw their random numbers (absent in older checkpoints: sequential).
    #[serde(default)]
    pub draws: Draws,
}

impl TrainConfig {
    /// Checks the parts against each other.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the mismatch.
    pub fn validate(&self) -> Result<()> {
        self.unet.validate()?;
        let param = self.diffusion.parameterization();
        self.diffusion.loss.check(&param)?;
        let want = param.output_channels(self.unet.in_channels);
        if self.unet.out_channels != want {
            return Err(Error::config(
                "U-Net",
                format!(
                    "{} output channels, but {:?} needs {want}",
                    self.unet.out_channels, self.diffusion.variance_type
                ),
            ));
        }
        if self.batch_size == 0 {
            return Err(Error::config("batch size", "must be at least 1"));
        }
        self.diffusion.validate()?;
        self.optim.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration written before the recipe options existed (no `loss_weighting`,
    /// `ema_power`, `lr_decay`) still loads, as the paper's recipe.
    #[test]
    fn configurations_without_the_later_fields_load_with_their_defaults() {
        let c = TrainConfig {
            unet: crate::nn::Preset::Tiny.config(1, 8),
            diffusion: DiffusionConfig::default(),
            optim: OptimConfig::default(),
            batch_size: 4,
            random_flip: false,
            seed: 0,
            draws: Draws::Sequential,
        };
        let mut json = serde_json::to_value(&c).expect("serialises");
        json["diffusion"].as_object_mut().expect("object").remove("loss_weighting");
        for key in ["ema_power", "lr_decay"] {
            json["optim"].as_object_mut().expect("object").remove(key);
        }
        json.as_object_mut().expect("object").remove("draws");
        let back: TrainConfig = serde_json::from_value(json).expect("loads");
        assert_eq!(back, c);
    }

    #[test]
    fn lr_at_warms_up_then_decays_to_zero_and_stays_there() {
        let mut o = OptimConfig { lr: 1.0, warmup_steps: 10, ..OptimConfig::default() };
        assert_eq!(o.lr_at(5), 0.5);
        assert_eq!(o.lr_at(1000), 1.0);
        o.lr_decay = Some(LrDecay { shape: DecayShape::Linear, end_step: 110 });
        assert_eq!(o.lr_at(10), 1.0);
        assert!((o.lr_at(60) - 0.5).abs() < 1e-15);
        assert_eq!(o.lr_at(110), 0.0);
        assert_eq!(o.lr_at(500), 0.0);
        o.lr_decay = Some(LrDecay { shape: DecayShape::Cosine, end_step: 110 });
        assert!((o.lr_at(60) - 0.5).abs() < 1e-15);
        assert!((o.lr_at(35) - 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())).abs() < 1e-15);
        // A decay that ends inside the warm-up: the warm-up, then 0.
        o.lr_decay = Some(LrDecay { shape: DecayShape::Linear, end_step: 4 });
        assert_eq!(o.lr_at(3), 0.3);
        assert_eq!(o.lr_at(5), 0.0);
        o.lr_decay = Some(LrDecay { shape: DecayShape::Linear, end_step: 0 });
        assert!(o.validate().is_err());
        o.lr_decay = None;
        o.ema_power = Some(f64::NAN);
        assert!(o.validate().unwrap_err().to_string().contains("--ema-sigma-rel"));
    }
}
