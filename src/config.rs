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
    BetaSchedule, Convention, LossType, MeanType, NoiseSchedule, Parameterization, TimestepSampling,
    VarianceType,
};
use crate::nn::{AdamConfig, UNetConfig};
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
        Ok(())
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
}

impl OptimConfig {
    /// Adam's hyper-parameters from these settings.
    pub fn adam_config(&self) -> AdamConfig {
        AdamConfig { beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay }
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
        }
    }
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
