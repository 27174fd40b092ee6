//! The β and ᾱ tables and the timestep lists of diffusers' schedulers, to the bit.
//!
//! Precision, as diffusers 0.42.1 with torch on the CPU computes them (fixtures README, facts
//! S1–S4):
//! - β is a float32 tensor. `linear` is torch's float32 `linspace`, whose AVX2/AVX-512 kernels
//!   form each entry with one fused multiply-add ([`torch_linspace_f32`]; torch's pre-AVX2
//!   kernel rounds twice and can differ in the last place); `squaredcos_cap_v2` is computed in
//!   f64 (Python floats) and rounded once.
//! - α = 1 − β in f32; ᾱ is torch's CPU `cumprod`, which multiplies in f64 and rounds each
//!   partial product to f32 once.
//! - Zero-terminal-SNR rescaling is f32 throughout.
//! - Timesteps are numpy f64/int64 arithmetic, rounded half to even.
//!
//! The last bit of ᾱ matters: near t = 0 the step's β'_t = 1 − ᾱ_t/ᾱ_prev keeps only a few
//! significant digits in f32, so one ulp of ᾱ moves x_{t−1} by ~1e-4.

use super::config::{BetaSource, DiffusersBetaSchedule, TimestepSpacing};
use crate::diffusion::samplers::spaced_timesteps;
use crate::diffusion::schedule::torch_linspace_f32;
use crate::{Error, Result};

/// β_1 … β_T as diffusers' float32 `betas` tensor, before any zero-SNR rescaling.
pub(super) fn betas(source: &BetaSource, timesteps: usize) -> Vec<f32> {
    match source {
        BetaSource::Trained(b) => b.iter().map(|&x| x as f32).collect(),
        BetaSource::Schedule { schedule, beta_start, beta_end } => match schedule {
            DiffusersBetaSchedule::Linear => {
                torch_linspace_f32(*beta_start, *beta_end, timesteps).into_iter().map(|b| b as f32).collect()
            }
            // `beta_start ** 0.5` in Python (f64), the linspace in f32, squared in f32.
            DiffusersBetaSchedule::ScaledLinear => {
                torch_linspace_f32(beta_start.powf(0.5), beta_end.powf(0.5), timesteps)
                    .into_iter()
                    .map(|r| {
                        let r = r as f32;
                        r * r
                    })
                    .collect()
            }
            DiffusersBetaSchedule::SquaredcosCapV2 => squaredcos_cap_v2(timesteps),
        },
    }
}

/// `betas_for_alpha_bar(T)` with the cosine ᾱ(s) = cos²((s + 0.008)/1.008 · π/2) (Nichol &
/// Dhariwal 2021, Eq. 17): β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), 0.999) in f64, rounded to f32.
fn squaredcos_cap_v2(timesteps: usize) -> Vec<f32> {
    let alpha_bar = |s: f64| ((s + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    let t = timesteps as f64;
    (0..timesteps)
        .map(|i| {
            let (t1, t2) = (i as f64 / t, (i + 1) as f64 / t);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// torch's CPU `cumprod` of float32 values: the running product kept in f64, each output
/// rounded to f32.
pub(super) fn cumprod_f32(alphas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    alphas
        .iter()
        .map(|&a| {
            acc *= f64::from(a);
            acc as f32
        })
        .collect()
}

/// ᾱ_t = ∏_{s≤t} (1 − β_s) (Ho et al. Eq. 4) as diffusers' float32 `alphas_cumprod`.
pub(super) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    cumprod_f32(&betas.iter().map(|&b| 1.0 - b).collect::<Vec<f32>>())
}

/// `rescale_zero_terminal_snr` (Lin et al. 2024, arXiv:2305.08891, Algorithm 1), all f32:
/// r = √ᾱ; r ← (r − r_{T−1})·r_0/(r_0 − r_{T−1}); ᾱ' = r²; α'_0 = ᾱ'_0, α'_t = ᾱ'_t/ᾱ'_{t−1};
/// β' = 1 − α'. ᾱ'_{T−1} is then 0, so x̂_0 from ε divides by zero at t = T−1 (±∞, NaN where
/// x_t equals √(1−ᾱ)·ε exactly; clipping then brings it back to ±range).
pub(super) fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut r: Vec<f32> = alphas_cumprod(betas).into_iter().map(f32::sqrt).collect();
    let (Some(&r0), Some(&r_last)) = (r.first(), r.last()) else { return Vec::new() };
    let scale = r0 / (r0 - r_last);
    for x in &mut r {
        *x = (*x - r_last) * scale;
    }
    let alpha_bar: Vec<f32> = r.iter().map(|&x| x * x).collect();
    (0..alpha_bar.len())
        .map(|t| {
            let alpha = if t == 0 { alpha_bar[0] } else { alpha_bar[t] / alpha_bar[t - 1] };
            1.0 - alpha
        })
        .collect()
}

/// The timesteps `set_timesteps(K)` chooses, in stepping order (descending), as numpy computes
/// them (fixtures README fact S4): the samplers' [`spaced_timesteps`], with its errors naming
/// diffusers' argument.
///
/// # Errors
/// [`Error::InvalidConfig`] if K is 0 or above T (diffusers raises), if `leading` with
/// `steps_offset` reaches past T − 1 (diffusers would index past ᾱ at the first step), or for a
/// `trailing` (T, K) where numpy's float `arange` overshoots and gives K + 1 timesteps, the last
/// −1 (e.g. T = 1000, K = 61): diffusers then steps at t = −1, which Python's negative indexing
/// turns into ᾱ_{T−1}, and ddpm does not reproduce that.
pub(super) fn spacing(
    spacing: TimestepSpacing,
    timesteps: usize,
    k: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    spaced_timesteps(spacing, timesteps, k, steps_offset).map_err(|e| match e {
        Error::InvalidConfig { what, reason } if what.starts_with("sampling steps") => {
            Error::config("num_inference_steps", reason)
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_diffusers_would_index_past_the_table_are_refused_naming_its_argument() {
        // The values are the samplers' (grid::tests::spacings_match_the_values_numpy_gives).
        // numpy.arange(1000, 0, -1000/61) has 62 entries, the last ~1e-13: diffusers steps at −1.
        let e = spacing(TimestepSpacing::Trailing, 1000, 61, 0).unwrap_err().to_string();
        assert!(e.contains("num_inference_steps"), "{e}");
        assert!(spacing(TimestepSpacing::Trailing, 1000, 61, 0).is_err());
        assert!(spacing(TimestepSpacing::Trailing, 50, 29, 0).is_err());
        assert!(spacing(TimestepSpacing::Leading, 50, 10, 5).is_err());
        assert!(spacing(TimestepSpacing::Leading, 50, 51, 0).is_err());
        assert!(spacing(TimestepSpacing::Leading, 50, 0, 0).is_err());
        assert_eq!(spacing(TimestepSpacing::Leading, 50, 10, 4).unwrap()[0], 49);
    }

    #[test]
    fn zero_snr_rescaling_ends_at_zero_alpha_bar() {
        let b = betas(
            &BetaSource::Schedule {
                schedule: DiffusersBetaSchedule::Linear,
                beta_start: 1e-4,
                beta_end: 0.02,
            },
            50,
        );
        let ab = alphas_cumprod(&rescale_zero_terminal_snr(&b));
        assert_eq!(ab[49], 0.0);
        assert!((ab[0] - alphas_cumprod(&b)[0]).abs() < 1e-7);
    }
}
