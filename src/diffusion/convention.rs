//! Named conventions for the places where the reference implementations of DDPM disagree.
//!
//! The paper (Ho et al. 2020, arXiv:2006.11239) leaves a few numerical details open, and the
//! three codebases people compare against filled them in differently. Each detail is one enum
//! here; a [`Convention`] picks one value for each, and [`Conventions`] holds the picked values
//! so a caller can also override one of them. docs/conventions.md explains every choice and
//! where it comes from.
//!
//! | setting              | `ho2020` (default)    | `improved-diffusion`  | `guided-diffusion`    | `diffusers` |
//! |----------------------|-----------------------|-----------------------|-----------------------|-------------|
//! | [`T0LogVariance`]    | `SecondStep`          | `SecondStep`          | `SecondStep`          | `Floor1e20` |
//! | [`FixedLargeT0`]     | `SecondStepPosterior` | `SecondStepPosterior` | `SecondStepPosterior` | `Beta`      |
//! | [`NormalCdf`]        | `TanhApprox`          | `TanhApprox`          | `TanhApprox`          | `Erf`       |
//! | [`LinearRescale`]    | `None`                | `ThousandOverT`       | `ThousandOverT`       | `None`      |
//! | [`ModelTimestep`]    | `Index`               | `ScaledTo1000`        | `Index`               | `Index`     |
//! | [`TablePrecision`]   | `Float64`             | `Float64`             | `Float64`             | `Float32`   |
//!
//! `guided-diffusion` is improved-diffusion's code with `rescale_timesteps=False`, the default of
//! openai/guided-diffusion's scripts (and of improved-diffusion run with that flag).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A named set of choices for the details the references disagree on; default [`Convention::Ho2020`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Convention {
    /// The authors' TensorFlow code, `diffusion_tf/diffusion_utils_2.py` (the CIFAR-10 and
    /// likelihood runs of Ho et al. 2020).
    #[default]
    Ho2020,
    /// openai/improved-diffusion, `gaussian_diffusion.py` with the defaults of `script_util.py`
    /// (Nichol & Dhariwal 2021, arXiv:2102.09672).
    ImprovedDiffusion,
    /// openai/guided-diffusion (Dhariwal & Nichol 2021, arXiv:2105.05233): improved-diffusion's
    /// math with the network given the timestep index itself (`rescale_timesteps=False`).
    GuidedDiffusion,
    /// huggingface/diffusers, `DDPMScheduler` (no likelihood code there; the exact CDF is used).
    Diffusers,
}

impl Convention {
    /// Every convention, in the order of the table in the module docs.
    pub const ALL: [Convention; 4] = [
        Convention::Ho2020,
        Convention::ImprovedDiffusion,
        Convention::GuidedDiffusion,
        Convention::Diffusers,
    ];

    /// The name used on the command line and in docs: `ho2020`, `improved-diffusion`,
    /// `guided-diffusion`, `diffusers`.
    pub fn name(self) -> &'static str {
        match self {
            Convention::Ho2020 => "ho2020",
            Convention::ImprovedDiffusion => "improved-diffusion",
            Convention::GuidedDiffusion => "guided-diffusion",
            Convention::Diffusers => "diffusers",
        }
    }

    /// The value this convention picks for every setting (see the table in the module docs).
    pub fn settings(self) -> Conventions {
        match self {
            Convention::Ho2020 => Conventions {
                t0_log_variance: T0LogVariance::SecondStep,
                fixed_large_t0: FixedLargeT0::SecondStepPosterior,
                normal_cdf: NormalCdf::TanhApprox,
                linear_rescale: LinearRescale::None,
                model_timestep: ModelTimestep::Index,
                table_precision: TablePrecision::Float64,
            },
            Convention::ImprovedDiffusion => Conventions {
                t0_log_variance: T0LogVariance::SecondStep,
                fixed_large_t0: FixedLargeT0::SecondStepPosterior,
                normal_cdf: NormalCdf::TanhApprox,
                linear_rescale: LinearRescale::ThousandOverT,
                model_timestep: ModelTimestep::ScaledTo1000,
                table_precision: TablePrecision::Float64,
            },
            Convention::GuidedDiffusion => Conventions {
                model_timestep: ModelTimestep::Index,
                ..Convention::ImprovedDiffusion.settings()
            },
            Convention::Diffusers => Conventions {
                t0_log_variance: T0LogVariance::Floor1e20,
                fixed_large_t0: FixedLargeT0::Beta,
                normal_cdf: NormalCdf::Erf,
                linear_rescale: LinearRescale::None,
                model_timestep: ModelTimestep::Index,
                table_precision: TablePrecision::Float32,
            },
        }
    }
}

impl fmt::Display for Convention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Convention {
    type Err = Error;

    /// Parses a [`Convention::name`] (case-insensitive, `_` allowed for `-`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the accepted values.
    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        Convention::ALL.into_iter().find(|c| c.name() == wanted).ok_or_else(|| {
            Error::config(
                "convention",
                format!("unknown convention {s:?}; expected one of ho2020, improved-diffusion, guided-diffusion, diffusers"),
            )
        })
    }
}

/// The value picked for every setting; start from [`Convention::settings`] and override fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conventions {
    /// log β̃ at the first step, where β̃_1 = 0.
    pub t0_log_variance: T0LogVariance,
    /// The fixed-large log-variance at the first step.
    pub fixed_large_t0: FixedLargeT0,
    /// The standard normal CDF inside the discretized decoder (Ho et al. 2020, Eq. 13).
    pub normal_cdf: NormalCdf,
    /// Whether the linear schedule's endpoints are scaled by 1000/T.
    pub linear_rescale: LinearRescale,
    /// Which number the network is given for the 0-based timestep index.
    pub model_timestep: ModelTimestep,
    /// Whether β, α and ᾱ are exact f64 values or diffusers' float32 ones.
    pub table_precision: TablePrecision,
}

impl Default for Conventions {
    fn default() -> Self {
        Convention::default().settings()
    }
}

/// The clipped posterior log-variance at code index 0 (paper t = 1), where β̃_1 = 0 (Eq. 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum T0LogVariance {
    /// log β̃ at index 0 is replaced by log β̃ at index 1 (paper t = 2); the other entries are
    /// log β̃ unchanged. `diffusion_utils_2.py` and improved-diffusion. Needs T ≥ 2.
    SecondStep,
    /// log max(β̃, 1e-20) at every index, so index 0 holds log 1e-20 ≈ −46.05.
    /// `diffusion_utils.py` of Ho et al. and diffusers' `_get_variance`.
    Floor1e20,
}

/// The fixed-large (σ_t² = β_t) log-variance at code index 0 (paper t = 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FixedLargeT0 {
    /// β̃ at index 1 is used at index 0 ("to get a better decoder log likelihood", as the
    /// original code says); β_t elsewhere. Ho et al. and improved-diffusion. Needs T ≥ 2.
    SecondStepPosterior,
    /// β at index 0, like every other step. diffusers (`fixed_large`).
    Beta,
}

/// How the standard normal CDF Φ is evaluated in the discretized decoder (Eq. 13).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormalCdf {
    /// Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))), as in Ho et al.'s `utils.py` and
    /// improved-diffusion's `losses.py`. Its largest absolute error is about 1.9e-4 (see
    /// [`crate::diffusion::normal::TANH_CDF_MAX_ABS_ERROR`]).
    TanhApprox,
    /// Φ(x) = ½ erfc(−x/√2) with an erf/erfc accurate to about 1e-15 relative
    /// ([`crate::diffusion::normal::erf`]).
    Erf,
}

/// Whether the linear schedule's β endpoints are scaled with the number of steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinearRescale {
    /// β from 1e-4 to 0.02 whatever T is (Ho et al.; diffusers' `linear`).
    None,
    /// β from 1e-4·1000/T to 0.02·1000/T, so the schedule keeps its shape for any T
    /// (improved-diffusion's `get_named_beta_schedule("linear", T)`).
    ThousandOverT,
}

/// The number given to the network for the 0-based timestep index i.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelTimestep {
    /// i itself (0 … T−1), as Ho et al. and diffusers do.
    Index,
    /// i · 1000/T, so the embedding always sees the range 0 … 1000 (improved-diffusion's
    /// `rescale_timesteps=True`, the default of its scripts).
    ScaledTo1000,
}

/// The precision of the schedule's base tables β, α and ᾱ (every other table is derived from
/// them in f64 either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TablePrecision {
    /// β as the schedule defines it, α = 1 − β and ᾱ = ∏ α, all in f64 (Ho et al.,
    /// improved-diffusion).
    Float64,
    /// As diffusers' `DDPMScheduler` builds and uses them: β in f32 (the linear schedule as
    /// PyTorch's f32 `linspace` computes it, others rounded from f64), α = 1 − β in f32,
    /// ᾱ a running product (kept in f64, as PyTorch's CPU `cumprod` does) rounded to f32 at every
    /// step; then α_t and β_t are replaced by what its `step` uses, α_t = ᾱ_t/ᾱ_{t−1} and
    /// β_t = 1 − α_t, each computed in f32. The relative change against `Float64` is about
    /// 1e-7 for ᾱ and up to about 1e-3 for β at the first steps (docs/conventions.md).
    Float32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convention_names_round_trip_through_from_str() {
        for c in Convention::ALL {
            assert_eq!(c.name().parse::<Convention>().expect("own name parses"), c);
        }
        assert_eq!(
            "Improved_Diffusion".parse::<Convention>().expect("parses"),
            Convention::ImprovedDiffusion
        );
        let err = "ddim".parse::<Convention>().expect_err("unknown name is refused");
        assert!(err.to_string().contains("ho2020"), "{err}");
    }

    #[test]
    fn default_convention_is_ho2020() {
        assert_eq!(Conventions::default(), Convention::Ho2020.settings());
    }
}
