//! Weighting of the simple loss over timesteps: uniform (Ho et al.'s L_simple, Eq. 14) or
//! Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy").
//!
//! Every parameterization's squared error is a multiple of the error of the implied x̂_0. With
//! SNR(t) = ᾱ_t / (1 − ᾱ_t) (docs/derivation.md):
//!
//! | prediction | error in terms of ‖x_0 − x̂_0‖²       | Min-SNR-γ weight w(t)          |
//! |------------|----------------------------------------|--------------------------------|
//! | ε          | ‖ε − ε̂‖² = SNR · ‖x_0 − x̂_0‖²          | min(SNR, γ) / SNR              |
//! | x_0        | ‖x_0 − x̂_0‖²                          | min(SNR, γ)                    |
//! | v          | ‖v − v̂‖² = (SNR + 1) · ‖x_0 − x̂_0‖²    | min(SNR, γ) / (SNR + 1)        |
//!
//! so that w(t) · ‖target − prediction‖² = min(SNR(t), γ) · ‖x_0 − x̂_0‖² whatever the network
//! predicts: the low-noise steps, whose x_0 error is cheap to reduce and would otherwise
//! dominate the gradient, are capped at γ (Hang et al. use γ = 5).

use serde::{Deserialize, Serialize};

use super::gaussian::MeanType;
use super::losses::LossType;
use crate::error::{Error, Result};

/// How each example's squared error is weighted by its timestep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossWeighting {
    /// Weight 1 at every t: Ho et al.'s L_simple (Eq. 14) for the chosen target.
    #[default]
    Uniform,
    /// Min-SNR-γ: the x̂_0 error weighted by min(SNR(t), γ) (table in the module docs).
    MinSnr {
        /// The cap γ on the signal-to-noise ratio (Hang et al.: 5).
        gamma: f64,
    },
}

impl LossWeighting {
    /// The weight of an example at a step whose ᾱ_t is `alpha_bar`, for a network that predicts
    /// `mean_type`. 1 for [`LossWeighting::Uniform`].
    pub fn weight(self, alpha_bar: f64, mean_type: MeanType) -> f64 {
        match self {
            LossWeighting::Uniform => 1.0,
            LossWeighting::MinSnr { gamma } => {
                let snr = alpha_bar / (1.0 - alpha_bar);
                let capped = snr.min(gamma);
                match mean_type {
                    MeanType::Eps => capped / snr,
                    MeanType::X0 => capped,
                    MeanType::V => capped / (snr + 1.0),
                    // Refused by `check`; weight 1 keeps the function total.
                    MeanType::PrevX => 1.0,
                }
            }
        }
    }

    /// Checks that this weighting applies: Min-SNR-γ needs a finite γ above 0, the simple loss
    /// (the bound's terms have weights of their own) and a target of ε, x_0 or v.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the flag and the fix.
    pub fn check(self, loss: LossType, mean_type: MeanType) -> Result<()> {
        let LossWeighting::MinSnr { gamma } = self else { return Ok(()) };
        let what = "loss weighting (--min-snr-gamma)";
        if !(gamma.is_finite() && gamma > 0.0) {
            return Err(Error::config(what, format!("γ = {gamma} must be a finite number above 0")));
        }
        if loss != LossType::Simple {
            return Err(Error::config(
                what,
                format!("Min-SNR-γ weights the simple loss only, not {loss:?}; use --loss simple"),
            ));
        }
        if mean_type == MeanType::PrevX {
            return Err(Error::config(
                what,
                "Min-SNR-γ is defined for ε, x_0 and v targets, not the posterior mean; \
                 use --mean-type eps, x0 or v",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::{BetaSchedule, Convention, NoiseSchedule};

    /// The defining property: for predictions that imply the same x̂_0, the weighted squared
    /// error is min(SNR, γ)·‖x_0 − x̂_0‖² in every parameterization, at every t of a schedule.
    #[test]
    fn every_target_weighs_the_x0_error_by_the_capped_snr() {
        let s =
            NoiseSchedule::new(&BetaSchedule::Linear, 1000, Convention::Ho2020.settings()).expect("schedule");
        let (x0, eps, x0_hat) = (0.7_f64, -1.3_f64, 0.2_f64);
        for gamma in [0.5, 5.0, 1e4] {
            let w = LossWeighting::MinSnr { gamma };
            for t in [0, 1, 10, 100, 400, 999] {
                let ab = s.alpha_bar()[t];
                let (a, b) = (ab.sqrt(), (1.0 - ab).sqrt());
                let x_t = a * x0 + b * eps;
                // Predictions consistent with x̂_0 at this x_t.
                let eps_hat = (x_t - a * x0_hat) / b;
                let v = a * eps - b * x0;
                let v_hat = a * eps_hat - b * x0_hat;
                let snr = ab / (1.0 - ab);
                let want = snr.min(gamma) * (x0 - x0_hat).powi(2);
                let got = [
                    w.weight(ab, MeanType::Eps) * (eps - eps_hat).powi(2),
                    w.weight(ab, MeanType::X0) * (x0 - x0_hat).powi(2),
                    w.weight(ab, MeanType::V) * (v - v_hat).powi(2),
                ];
                for g in got {
                    assert!((g - want).abs() <= 1e-9 * want.max(1e-12), "γ {gamma} t {t}: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn uniform_is_one_and_a_huge_gamma_is_uniform_for_eps() {
        assert_eq!(LossWeighting::Uniform.weight(0.3, MeanType::V), 1.0);
        let w = LossWeighting::MinSnr { gamma: f64::MAX };
        assert_eq!(w.weight(0.3, MeanType::Eps), 1.0);
        // Below the cap, ε-weights are 1 and the others follow SNR.
        let w5 = LossWeighting::MinSnr { gamma: 5.0 };
        let ab = 0.5; // SNR 1
        assert_eq!(w5.weight(ab, MeanType::Eps), 1.0);
        assert_eq!(w5.weight(ab, MeanType::V), 0.5);
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let w = LossWeighting::MinSnr { gamma: 5.0 };
        assert!(w.check(LossType::Simple, MeanType::V).is_ok());
        for (lw, loss, mt) in [
            (LossWeighting::MinSnr { gamma: 0.0 }, LossType::Simple, MeanType::Eps),
            (LossWeighting::MinSnr { gamma: f64::NAN }, LossType::Simple, MeanType::Eps),
            (w, LossType::Hybrid, MeanType::Eps),
            (w, LossType::Simple, MeanType::PrevX),
        ] {
            let e = lw.check(loss, mt).expect_err("refused").to_string();
            assert!(e.contains("--min-snr-gamma"), "{e}");
        }
        assert!(LossWeighting::Uniform.check(LossType::Vlb, MeanType::PrevX).is_ok());
    }
}
