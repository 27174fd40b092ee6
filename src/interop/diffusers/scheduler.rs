//! diffusers' `DDPMScheduler`: its config ↔ ddpm's diffusion settings, and its `step` computed
//! the way diffusers computes it (the reference the scheduler fixtures are checked against).

use std::path::Path;

use serde_json::{json, Value};

use super::keys::Keys;
use super::DIFFUSERS_VERSION;
use crate::diffusion::{BetaSchedule, Convention, LossType, MeanType, TimestepSampling, VarianceType};
use crate::train::DiffusionConfig;
use crate::{Error, Result, Tensor};

/// The DDPMScheduler settings ddpm can represent.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerSettings {
    /// β schedule: `linear` (1e-4 … 0.02) or `squaredcos_cap_v2` ([`BetaSchedule::Cosine`]).
    pub schedule: BetaSchedule,
    /// T (`num_train_timesteps`).
    pub timesteps: usize,
    /// `prediction_type`: epsilon, sample or v_prediction.
    pub mean_type: MeanType,
    /// `variance_type` (the `_log` variants sample the same distribution as the plain ones).
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

    /// Reads a `scheduler_config.json` value; missing keys take DDPMScheduler's defaults.
    ///
    /// # Errors
    /// [`Error::BadFile`] naming `path`, the key and the reason for anything ddpm cannot
    /// reproduce (another scheduler class, trained_betas, thresholding, another clip range, a
    /// steps_offset, zero-SNR rescaling, other β endpoints, the `learned` variance, an unknown key).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let keys = Keys::new(v, path, "scheduler config")?;
        keys.class_name("DDPMScheduler")?;
        keys.refuse_unknown(&[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "variance_type",
            "clip_sample",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "clip_sample_range",
            "sample_max_value",
            "timestep_spacing",
            "steps_offset",
            "rescale_betas_zero_snr",
        ])?;
        let timesteps = keys.usize_or("num_train_timesteps", 1000)?;
        if !keys.is_null_or_absent("trained_betas") {
            return Err(keys.bad("trained_betas", "explicit β lists are not supported; use a named schedule"));
        }
        let schedule = match keys.str_or("beta_schedule", "linear")? {
            "linear" => {
                let (start, end) = (keys.f64_or("beta_start", 1e-4)?, keys.f64_or("beta_end", 0.02)?);
                if start != 1e-4 || end != 0.02 {
                    return Err(keys.bad(
                        "beta_start",
                        &format!(
                            "the linear schedule runs from {start} to {end}; ddpm's runs from 1e-4 to 0.02"
                        ),
                    ));
                }
                BetaSchedule::Linear
            }
            "squaredcos_cap_v2" => BetaSchedule::Cosine,
            other => {
                return Err(keys.bad(
                    "beta_schedule",
                    &format!("{other:?} is not supported (linear and squaredcos_cap_v2 are)"),
                ))
            }
        };
        let variance_type = match keys.str_or("variance_type", "fixed_small")? {
            "fixed_small" | "fixed_small_log" => VarianceType::FixedSmall,
            "fixed_large" | "fixed_large_log" => VarianceType::FixedLarge,
            // diffusers' `learned` takes the output as σ² itself; ddpm's (improved-diffusion's)
            // as log σ². Not the same model, so refused.
            "learned" => return Err(keys.bad(
                "variance_type",
                "\"learned\" reads the network output as the variance, ddpm's learned as the log-variance",
            )),
            "learned_range" => VarianceType::LearnedRange,
            other => return Err(keys.bad("variance_type", &format!("unknown value {other:?}"))),
        };
        let mean_type = match keys.str_or("prediction_type", "epsilon")? {
            "epsilon" => MeanType::Eps,
            "sample" => MeanType::X0,
            "v_prediction" => MeanType::V,
            other => return Err(keys.bad("prediction_type", &format!("unknown value {other:?}"))),
        };
        if keys.bool_or("thresholding", false)? {
            return Err(keys.bad("thresholding", "dynamic thresholding is not implemented in ddpm"));
        }
        let clip_sample = keys.bool_or("clip_sample", true)?;
        if clip_sample && keys.f64_or("clip_sample_range", 1.0)? != 1.0 {
            return Err(keys.bad("clip_sample_range", "ddpm clips x_0 to [-1, 1] only"));
        }
        if keys.usize_or("steps_offset", 0)? != 0 {
            return Err(keys.bad("steps_offset", "a non-zero offset skips t = 0; ddpm samples every step"));
        }
        if keys.bool_or("rescale_betas_zero_snr", false)? {
            return Err(keys.bad("rescale_betas_zero_snr", "zero terminal SNR rescaling is not implemented"));
        }
        Ok(SchedulerSettings { schedule, timesteps, mean_type, variance_type, clip_sample })
    }

    /// The `scheduler_config.json` value, every key written.
    pub fn to_json(&self) -> Value {
        let beta_schedule = match self.schedule {
            BetaSchedule::Cosine => "squaredcos_cap_v2",
            _ => "linear",
        };
        json!({
            "_class_name": "DDPMScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "beta_end": 0.02,
            "beta_schedule": beta_schedule,
            "beta_start": 0.0001,
            "clip_sample": self.clip_sample,
            "clip_sample_range": 1.0,
            "dynamic_thresholding_ratio": 0.995,
            "num_train_timesteps": self.timesteps,
            "prediction_type": match self.mean_type {
                MeanType::Eps | MeanType::PrevX => "epsilon",
                MeanType::X0 => "sample",
                MeanType::V => "v_prediction",
            },
            "rescale_betas_zero_snr": false,
            "sample_max_value": 1.0,
            "steps_offset": 0,
            "thresholding": false,
            "timestep_spacing": "leading",
            "trained_betas": null,
            "variance_type": match self.variance_type {
                VarianceType::FixedSmall => "fixed_small",
                VarianceType::FixedLarge => "fixed_large",
                // Refused by from_diffusion; diffusers' "learned" is another parameterisation.
                VarianceType::Learned => "learned",
                VarianceType::LearnedRange => "learned_range",
            },
        })
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

/// What `DDPMScheduler.step` returns, `[N, C, H, W]` each.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerStep {
    /// x_{t−1}.
    pub prev_sample: Tensor,
    /// x̂_0, clipped when asked.
    pub pred_original_sample: Tensor,
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
        ] {
            let mut bad = s.to_json();
            bad[key] = value;
            let err = SchedulerSettings::from_json(&bad, Path::new("s")).unwrap_err().to_string();
            let named = if key == "beta_end" { "beta_start" } else { key };
            assert!(err.contains(&format!("`{named}`")), "{key}: {err}");
        }
    }
}
