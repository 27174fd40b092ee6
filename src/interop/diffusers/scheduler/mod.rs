//! diffusers' `DDPMScheduler` and `DDIMScheduler`: their configs read in full, their tables and
//! `step` reproduced in diffusers' own float32 arithmetic ([`DiffusersScheduler`]), and the
//! subset ddpm's sampler honours ([`SchedulerSettings`], what `ddpm import --diffusers` keeps).
//!
//! | file       | owns                                                                          |
//! |------------|-------------------------------------------------------------------------------|
//! | `config`   | `scheduler_config.json` ↔ [`DiffusersSchedulerConfig`], every key typed       |
//! | `tables`   | β, ᾱ, zero-SNR rescaling, `set_timesteps` spacings, to the bit                |
//! | `step`     | [`DiffusersScheduler`]: timesteps, previous-timestep rules, `step`            |
//! | `settings` | [`SchedulerSettings`] ↔ ddpm's diffusion settings; [`ddpm_scheduler_step_f32`] |
//!
//! Every formula is checked against diffusers 0.42.1 by tests/diffusers_schedulers.rs on the
//! fixtures of tests/fixtures/diffusers_family (their README lists each fact with its source
//! line). In diffusers' names, with t the (0-based) timestep: `alphas_cumprod[t]` is ᾱ_t of Ho
//! et al. Eq. (4) at paper step t + 1.

use crate::Tensor;

mod config;
mod settings;
mod step;
mod tables;

pub use config::{
    BetaSource, DdpmVarianceType, DiffusersBetaSchedule, DiffusersSchedulerConfig, PredictionType,
    SchedulerClass, TimestepSpacing,
};
pub use settings::{ddpm_scheduler_step_f32, SchedulerSettings, StepVariance};
pub use step::DiffusersScheduler;

/// What a scheduler's `step` returns, `[N, C, H, W]` each.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerStep {
    /// x_{t−1}.
    pub prev_sample: Tensor,
    /// x̂_0, clipped or thresholded when asked.
    pub pred_original_sample: Tensor,
}
