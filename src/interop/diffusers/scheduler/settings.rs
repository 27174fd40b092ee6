//! The `DDPMScheduler` settings ddpm's own sampler honours ↔ ddpm's diffusion settings, and
//! `DDPMScheduler.step` over all T steps in diffusers' f32 arithmetic (the narrow form of
//! [`DiffusersScheduler::step`], kept for the full-chain fixtures).

use std::path::Path;

use serde_json::Value;

use super::config::{
    BetaSource, DdpmVarianceType, DiffusersBetaSchedule, DiffusersSchedulerConfig, PredictionType,
    SchedulerClass,
};
#[cfg(doc)]
use super::DiffusersScheduler;
use super::SchedulerStep;
use crate::diffusion::{BetaSchedule, Convention, LossType, MeanType, TimestepSampling, VarianceType};
use crate::train::DiffusionConfig;
use crate::{Error, Result, Tensor};

/// The DDPMScheduler settings ddpm's sampler reproduces: what `ddpm import --diffusers` keeps.
/// [`DiffusersSchedulerConfig`] holds every key; [`DiffusersScheduler`] steps like diffusers.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerSettings {
    /// β schedule: `linear` (1e-4 … 0.02) or `squaredcos_cap_v2` ([`BetaSchedule::Cosine`]).
    pub schedule: BetaSchedule,
    /// T (`num_train_timesteps`).
    pub timesteps: usize,
    /// `prediction_type`: epsilon, sample or v_prediction.
    pub mean_type: MeanType,
    /// `variance_type`: the `_log` variants map to the plain ones (the same σ; diffusers' own
    /// step with `fixed_large_log` returns NaN, see [`DdpmVarianceType::FixedLargeLog`]).
    pub variance_type: VarianceType,
    /// `clip_sample`: clip the predicted x_0 to [−1, 1] at every step.
    pub clip_sample: bool,
}

impl Default for SchedulerSettings {
    /// Ho et al.'s CIFAR-10 sampler: linear, T = 1000, ε, σ² = β, clipping.
    fn default() -> Self {
        SchedulerSettings {
            schedule: BetaSchedule::Linear,
            timesteps: 1000,
            mean_type: MeanType::Eps,
            variance_type: VarianceType::FixedLarge,
            clip_sample: true,
        }
    }
}

impl SchedulerSettings {
    /// The diffusion settings of a ddpm checkpoint with this scheduler: the `diffusers`
    /// convention, L_simple (L_hybrid when the variance is learned).
    pub fn diffusion_config(&self) -> DiffusionConfig {
        DiffusionConfig {
            schedule: self.schedule.clone(),
            timesteps: self.timesteps,
            convention: Convention::Diffusers,
            mean_type: self.mean_type,
            variance_type: self.variance_type,
            loss: if self.variance_type.is_learned() { LossType::Hybrid } else { LossType::Simple },
            timestep_sampling: TimestepSampling::Uniform,
            loss_weighting: crate::diffusion::LossWeighting::Uniform,
        }
    }

    /// The scheduler of a ddpm checkpoint's diffusion settings.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a schedule or parameterisation diffusers' `DDPMScheduler`
    /// cannot express (a schedule other than linear or cosine, a rescaled linear schedule, x_{t−1}
    /// prediction, a learned log-variance).
    pub fn from_diffusion(d: &DiffusionConfig, clip_sample: bool) -> Result<Self> {
        let refuse = |reason: String| Err(Error::config("diffusers export", reason));
        match &d.schedule {
            BetaSchedule::Linear | BetaSchedule::Cosine => {}
            other => {
                return refuse(format!(
                    "schedule `{other}` has no DDPMScheduler beta_schedule (only linear and cosine map)"
                ))
            }
        }
        if d.schedule == BetaSchedule::Linear
            && d.timesteps != 1000
            && d.convention.settings().linear_rescale != crate::diffusion::convention::LinearRescale::None
        {
            return refuse(format!(
                "the {} convention rescales the linear schedule for T = {}; DDPMScheduler's linear does not",
                d.convention, d.timesteps
            ));
        }
        if d.timesteps != 1000
            && d.convention.settings().model_timestep
                == crate::diffusion::convention::ModelTimestep::ScaledTo1000
        {
            // The network was trained on t·1000/T; UNet2DModel is given t itself, so the exported
            // folder would load and compute another function.
            return refuse(format!(
                "the network is given t·1000/T (the {} convention, improved-diffusion's rescale_timesteps) with T = {}; \
                 diffusers gives UNet2DModel t itself, so the export would compute another function",
                d.convention, d.timesteps
            ));
        }
        if d.variance_type == VarianceType::Learned {
            return refuse(
                "a learned log-variance has no DDPMScheduler variance_type (its \"learned\" reads the output as the variance)"
                    .into(),
            );
        }
        if d.mean_type == MeanType::PrevX {
            return refuse("prediction of x_(t-1) (prev-x) has no DDPMScheduler prediction_type".into());
        }
        Ok(SchedulerSettings {
            schedule: d.schedule.clone(),
            timesteps: d.timesteps,
            mean_type: d.mean_type,
            variance_type: d.variance_type,
            clip_sample,
        })
    }

    /// Reads a `scheduler_config.json` value; missing keys take DDPMScheduler's defaults. The
    /// whole config is read by [`DiffusersSchedulerConfig::from_json`] first, so unknown keys and
    /// values are refused the same way; then what ddpm's own sampler does not honour is refused.
    ///
    /// # Errors
    /// [`Error::BadFile`] naming `path`, the key and the reason for anything
    /// [`DiffusersSchedulerConfig::from_json`] refuses, and for what ddpm's sampler cannot
    /// reproduce (a DDIMScheduler, trained_betas, scaled_linear, other β endpoints, the `learned`
    /// variance, thresholding, another clip range, a steps_offset, zero-SNR rescaling). Those
    /// messages point to [`DiffusersScheduler`], which reproduces the scheduler's own steps.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let c = DiffusersSchedulerConfig::from_json(v, path)?;
        let refuse = |key: &str, reason: &str| {
            Err(Error::bad_file(
                path,
                format!(
                    "scheduler config key `{key}`: {reason}; ddpm's sampler does not reproduce it \
                     (ddpm::interop::diffusers::DiffusersScheduler reproduces this scheduler's steps, \
                     for step-by-step comparison)"
                ),
            ))
        };
        let variance_type = match c.class {
            SchedulerClass::Ddim { .. } => {
                return refuse("_class_name", "a DDIMScheduler; ddpm imports the training settings of a DDPMScheduler")
            }
            SchedulerClass::Ddpm { variance_type } => match variance_type {
                DdpmVarianceType::FixedSmall | DdpmVarianceType::FixedSmallLog => VarianceType::FixedSmall,
                // The variance GLIDE's `fixed_large_log` means; diffusers' own step computes
                // √(ln β) with it and returns NaN (DdpmVarianceType::FixedLargeLog).
                DdpmVarianceType::FixedLarge | DdpmVarianceType::FixedLargeLog => VarianceType::FixedLarge,
                // diffusers' `learned` takes the output as σ² itself; ddpm's (improved-diffusion's)
                // as log σ². Not the same model, so refused.
                DdpmVarianceType::Learned => {
                    return refuse(
                        "variance_type",
                        "\"learned\" reads the network output as the variance, ddpm's learned as the log-variance",
                    )
                }
                DdpmVarianceType::LearnedRange => VarianceType::LearnedRange,
            },
        };
        let schedule = match &c.betas {
            BetaSource::Trained(_) => {
                return refuse("trained_betas", "explicit β lists are not supported; use a named schedule")
            }
            BetaSource::Schedule { schedule: DiffusersBetaSchedule::Linear, beta_start, beta_end } => {
                for (key, got, want) in [("beta_start", *beta_start, 1e-4), ("beta_end", *beta_end, 0.02)] {
                    if got != want {
                        return refuse(key, &format!("the linear schedule runs from {beta_start} to {beta_end}; ddpm's runs from 1e-4 to 0.02"));
                    }
                }
                BetaSchedule::Linear
            }
            BetaSource::Schedule { schedule: DiffusersBetaSchedule::SquaredcosCapV2, .. } => {
                BetaSchedule::Cosine
            }
            BetaSource::Schedule { schedule: DiffusersBetaSchedule::ScaledLinear, .. } => {
                return refuse(
                    "beta_schedule",
                    "\"scaled_linear\" has no ddpm schedule (linear and squaredcos_cap_v2 map)",
                )
            }
        };
        if c.thresholding {
            return refuse("thresholding", "dynamic thresholding of x̂_0");
        }
        if c.clip_sample && c.clip_sample_range != 1.0 {
            return refuse("clip_sample_range", "ddpm clips x̂_0 to [-1, 1] only");
        }
        if c.steps_offset != 0 {
            return refuse(
                "steps_offset",
                "a non-zero offset shifts the respaced timesteps; ddpm's respacing has none",
            );
        }
        if c.rescale_betas_zero_snr {
            return refuse("rescale_betas_zero_snr", "zero terminal SNR rescaling");
        }
        let mean_type = match c.prediction_type {
            PredictionType::Epsilon => MeanType::Eps,
            PredictionType::Sample => MeanType::X0,
            PredictionType::VPrediction => MeanType::V,
        };
        Ok(SchedulerSettings {
            schedule,
            timesteps: c.num_train_timesteps,
            mean_type,
            variance_type,
            clip_sample: c.clip_sample,
        })
    }

    /// The full DDPMScheduler config of these settings (every other key at its default).
    pub fn diffusers_config(&self) -> DiffusersSchedulerConfig {
        let schedule = match self.schedule {
            BetaSchedule::Cosine => DiffusersBetaSchedule::SquaredcosCapV2,
            _ => DiffusersBetaSchedule::Linear,
        };
        DiffusersSchedulerConfig {
            class: SchedulerClass::Ddpm {
                variance_type: match self.variance_type {
                    VarianceType::FixedSmall => DdpmVarianceType::FixedSmall,
                    VarianceType::FixedLarge => DdpmVarianceType::FixedLarge,
                    // Refused by from_diffusion; diffusers' "learned" is another parameterisation.
                    VarianceType::Learned => DdpmVarianceType::Learned,
                    VarianceType::LearnedRange => DdpmVarianceType::LearnedRange,
                },
            },
            num_train_timesteps: self.timesteps,
            betas: BetaSource::Schedule { schedule, beta_start: 1e-4, beta_end: 0.02 },
            prediction_type: match self.mean_type {
                // PrevX is refused by from_diffusion.
                MeanType::Eps | MeanType::PrevX => PredictionType::Epsilon,
                MeanType::X0 => PredictionType::Sample,
                MeanType::V => PredictionType::VPrediction,
            },
            clip_sample: self.clip_sample,
            ..DiffusersSchedulerConfig::ddpm()
        }
    }

    /// The `scheduler_config.json` value, every key written.
    pub fn to_json(&self) -> Value {
        self.diffusers_config().to_json()
    }
}

/// The variance choices of [`ddpm_scheduler_step_f32`], under diffusers' names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepVariance {
    /// `fixed_small`: σ = √max(β̃_t, 1e-20).
    FixedSmall,
    /// `fixed_small_log`: σ = exp(½ log max(β̃_t, 1e-20)).
    FixedSmallLog,
    /// `fixed_large`: σ = √β_t, β_t = 1 − ᾱ_t/ᾱ_{t−1}.
    FixedLarge,
}

/// diffusers' `DDPMScheduler.step` (all T steps, so the previous timestep is t − 1) computed the
/// way it computes it: in f32, operation by operation, from its f32 `alphas_cumprod`, with the
/// noise `noise` (what its generator would draw). Ho et al.'s Eqs. (7), (11) and (15) in
/// diffusers' arithmetic; the `diffusers` [`Convention`] computes the same step in f64 from the
/// same tables, within a few f32 roundings of this. `mean_type` is what `model_output` predicts
/// (`epsilon`, `sample` or `v_prediction`).
///
/// # Panics
/// If the shapes differ, `t` is out of range, or `mean_type` is [`MeanType::PrevX`] (no
/// `prediction_type` for it).
#[allow(clippy::too_many_arguments)]
pub fn ddpm_scheduler_step_f32(
    alphas_cumprod: &[f32],
    mean_type: MeanType,
    variance: StepVariance,
    clip_sample: bool,
    t: usize,
    model_output: &Tensor,
    sample: &Tensor,
    noise: &Tensor,
) -> SchedulerStep {
    assert_eq!(model_output.shape(), sample.shape(), "ddpm_scheduler_step_f32: model_output vs sample");
    assert_eq!(noise.shape(), sample.shape(), "ddpm_scheduler_step_f32: noise vs sample");
    let ab_t = alphas_cumprod[t];
    let ab_prev = if t > 0 { alphas_cumprod[t - 1] } else { 1.0 };
    let beta_prod_t = 1.0 - ab_t;
    let beta_prod_t_prev = 1.0 - ab_prev;
    let current_alpha_t = ab_t / ab_prev;
    let current_beta_t = 1.0 - current_alpha_t;
    let mut pred = match mean_type {
        MeanType::Eps => {
            let (a, b) = (beta_prod_t.sqrt(), ab_t.sqrt());
            ndarray::Zip::from(sample).and(model_output).map_collect(|&x, &e| (x - a * e) / b)
        }
        MeanType::X0 => model_output.clone(),
        MeanType::V => {
            let (a, b) = (ab_t.sqrt(), beta_prod_t.sqrt());
            ndarray::Zip::from(sample).and(model_output).map_collect(|&x, &v| a * x - b * v)
        }
        MeanType::PrevX => panic!("ddpm_scheduler_step_f32: DDPMScheduler has no x_(t-1) prediction"),
    };
    if clip_sample {
        pred.mapv_inplace(|v| v.clamp(-1.0, 1.0));
    }
    let c1 = (ab_prev.sqrt() * current_beta_t) / beta_prod_t;
    let c2 = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
    let mut prev = ndarray::Zip::from(&pred).and(sample).map_collect(|&p, &x| c1 * p + c2 * x);
    if t > 0 {
        let var = ((1.0 - ab_prev) / (1.0 - ab_t) * current_beta_t).max(1e-20);
        let std = match variance {
            StepVariance::FixedSmall => var.sqrt(),
            StepVariance::FixedSmallLog => (0.5 * var.ln()).exp(),
            StepVariance::FixedLarge => current_beta_t.sqrt(),
        };
        ndarray::Zip::from(&mut prev).and(noise).for_each(|p, &z| *p += std * z);
    }
    SchedulerStep { prev_sample: prev, pred_original_sample: pred }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scheduler_settings_round_trip_and_refuse_what_ddpm_lacks() {
        let s = SchedulerSettings {
            variance_type: VarianceType::FixedSmall,
            clip_sample: false,
            ..Default::default()
        };
        assert_eq!(SchedulerSettings::from_json(&s.to_json(), Path::new("s")).unwrap(), s);
        for (key, value) in [
            ("thresholding", json!(true)),
            ("beta_end", json!(0.012)),
            ("steps_offset", json!(1)),
            ("beta_schedule", json!("scaled_linear")),
            ("variance_type", json!("learned")),
            ("rescale_betas_zero_snr", json!(true)),
            ("clip_sample_range", json!(2.0)),
            ("trained_betas", json!(vec![0.01; 1000])),
            ("_class_name", json!("DDIMScheduler")),
        ] {
            let mut bad = SchedulerSettings { clip_sample: true, ..s.clone() }.to_json();
            if key == "_class_name" {
                bad.as_object_mut().expect("an object").remove("variance_type");
            }
            bad[key] = value;
            let err = SchedulerSettings::from_json(&bad, Path::new("s")).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
            assert!(err.contains("DiffusersScheduler"), "{key}: {err}");
        }
    }
}
