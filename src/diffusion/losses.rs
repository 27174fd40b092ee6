//! The losses of DDPM: the KL of two diagonal Gaussians, the discretized Gaussian decoder L_0,
//! the variational bound's terms in bits/dim (L_T, L_{t−1}, L_0) and their sum over all t, and
//! the training losses L_simple, L_vlb and L_hybrid with improved-diffusion's rescaled variants.
//!
//! Reference math in f64, pure functions on arrays `[N, …]`, written so that the differentiable
//! versions on the tape mirror them line by line. "bits/dim" is nats averaged over every
//! non-batch axis, divided by ln 2 (improved-diffusion's `mean_flat(·) / log(2)`).
//!
//! | quantity                                  | paper                                   | function              |
//! |-------------------------------------------|-----------------------------------------|-----------------------|
//! | KL(N(μ₁,σ₁²) ‖ N(μ₂,σ₂²)) per element      | L_{t−1}, L_T in Ho Eq. (5)             | [`normal_kl`]         |
//! | −log p_θ(x_0 ∣ x_1) per element           | Ho Eq. (13)                             | [`discretized_gaussian_log_likelihood`] |
//! | L_T = KL(q(x_T ∣ x_0) ‖ N(0, I))          | Ho Eq. (5)                              | [`prior_bpd`]         |
//! | L_{t−1} (t > 1) or L_0 (t = 1)            | Ho Eq. (5); N&D Eqs. (5)–(7)            | [`vb_terms_bpd`]      |
//! | L_vlb = L_T + Σ L_{t−1} + L_0, breakdown  | Ho Eq. (5); N&D Eq. (4)                 | [`calc_bpd_loop`]     |
//! | L_simple = ‖ε − ε_θ‖²                     | Ho Eq. (14); N&D Eq. (14)               | [`training_losses`]   |
//! | L_hybrid = L_simple + λ L_vlb, λ = 0.001  | N&D Eq. (16)                            | [`training_losses`]   |

use std::f64::consts::LN_2;

use ndarray::{Array1, Array2, ArrayD, Axis, Zip};

use super::convention::NormalCdf;
use super::gaussian::{
    p_mean_variance, predict_eps_from_x0, q_mean_variance, q_posterior_mean_variance, q_sample,
    standard_normal, v_target, MeanType, ModelOutput, Parameterization,
};
use super::normal::{standard_normal_cdf, standard_normal_interval};
use super::schedule::NoiseSchedule;
use crate::error::{Error, Result};
use crate::Rng;

/// Number of bins of the discretized decoder: 8-bit data.
pub const DECODER_BINS: usize = 256;
/// Half the width of one bin of data scaled to [−1, 1]: 1/255 (Ho Eq. 13, δ±).
pub const BIN_HALF_WIDTH: f64 = 1.0 / 255.0;
/// The floor on a decoder probability before its log, as in the reference code (`clamp(min=1e-12)`).
pub const DECODER_PROBABILITY_FLOOR: f64 = 1e-12;
/// λ of L_hybrid = L_simple + λ L_vlb (Nichol & Dhariwal 2021, §3.1, Eq. 16).
pub const HYBRID_LAMBDA: f64 = 0.001;

/// KL(N(μ₁, e^{v₁}) ‖ N(μ₂, e^{v₂})) = ½(−1 + v₂ − v₁ + e^{v₁−v₂} + (μ₁ − μ₂)² e^{−v₂}) in nats,
/// for one dimension, with log-variances v₁, v₂.
pub fn normal_kl_scalar(mean1: f64, logvar1: f64, mean2: f64, logvar2: f64) -> f64 {
    0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2).powi(2) * (-logvar2).exp())
}

/// [`normal_kl_scalar`] elementwise: the KL of two diagonal Gaussians per dimension, in nats.
///
/// # Panics
/// If the four arrays do not share one shape.
pub fn normal_kl(
    mean1: &ArrayD<f64>,
    logvar1: &ArrayD<f64>,
    mean2: &ArrayD<f64>,
    logvar2: &ArrayD<f64>,
) -> ArrayD<f64> {
    let mut out = ArrayD::zeros(mean1.raw_dim());
    Zip::from(&mut out).and(mean1).and(logvar1).and(mean2).and(logvar2).for_each(|o, &m1, &v1, &m2, &v2| {
        *o = normal_kl_scalar(m1, v1, m2, v2);
    });
    out
}

/// The probability the discretized Gaussian N(mean, e^{2 log_scale}) gives the 8-bit bin of `x`
/// (Ho Eq. 13): the mass on [x − 1/255, x + 1/255], with the first bin (x < −0.999) extended to
/// −∞ and the last (x > 0.999) to +∞. No floor applied.
pub fn decoder_bin_probability(x: f64, mean: f64, log_scale: f64, cdf: NormalCdf) -> f64 {
    // Same operations, in the same order, as the reference code.
    let centered = x - mean;
    let inv_stdv = (-log_scale).exp();
    let plus_in = inv_stdv * (centered + BIN_HALF_WIDTH);
    let min_in = inv_stdv * (centered - BIN_HALF_WIDTH);
    if x < -0.999 {
        standard_normal_cdf(plus_in, cdf)
    } else if x > 0.999 {
        match cdf {
            NormalCdf::TanhApprox => 1.0 - standard_normal_cdf(min_in, cdf),
            NormalCdf::Erf => standard_normal_cdf(-min_in, cdf),
        }
    } else {
        standard_normal_interval(min_in, plus_in, cdf)
    }
}

/// The 256 bin probabilities of N(mean, e^{2 log_scale}) discretized on the 8-bit grid
/// x_k = k/127.5 − 1 (Ho Eq. 13), shape `[256]`. They sum to 1 up to rounding with either CDF.
pub fn decoder_bin_probabilities(mean: f64, log_scale: f64, cdf: NormalCdf) -> Array1<f64> {
    Array1::from_shape_fn(DECODER_BINS, |k| {
        decoder_bin_probability(k as f64 / 127.5 - 1.0, mean, log_scale, cdf)
    })
}

/// log p(x) of the discretized Gaussian decoder per element, in nats (Ho Eq. 13):
/// ln max(P(bin of x), 1e-12), with `log_scales` = ½ log σ².
///
/// `x` holds 8-bit data scaled to [−1, 1]; shapes `[N, …]`.
///
/// # Panics
/// If the three arrays do not share one shape.
pub fn discretized_gaussian_log_likelihood(
    x: &ArrayD<f64>,
    means: &ArrayD<f64>,
    log_scales: &ArrayD<f64>,
    cdf: NormalCdf,
) -> ArrayD<f64> {
    let mut out = ArrayD::zeros(x.raw_dim());
    Zip::from(&mut out).and(x).and(means).and(log_scales).for_each(|o, &x, &m, &s| {
        *o = decoder_bin_probability(x, m, s, cdf).max(DECODER_PROBABILITY_FLOOR).ln();
    });
    out
}

/// The mean over every axis but the first: `[N, …]` → `[N]` (improved-diffusion's `mean_flat`).
///
/// # Panics
/// If `x` has no axis.
pub fn mean_flat(x: &ArrayD<f64>) -> Array1<f64> {
    let n = x.shape()[0];
    let per_sample = x.len().checked_div(n).unwrap_or(0);
    Array1::from_iter(x.axis_iter(Axis(0)).map(|row| row.sum() / per_sample as f64))
}

/// L_T in bits/dim: KL(q(x_T ∣ x_0) ‖ N(0, I)) averaged over dimensions / ln 2 (Ho Eq. 5), shape `[N]`.
pub fn prior_bpd(schedule: &NoiseSchedule, x0: &ArrayD<f64>) -> Array1<f64> {
    let t = vec![schedule.num_timesteps() - 1; x0.shape()[0]];
    let q = q_mean_variance(schedule, x0, &t);
    let zeros = ArrayD::zeros(x0.raw_dim());
    mean_flat(&normal_kl(&q.mean, &q.log_variance, &zeros, &zeros)) / LN_2
}

/// One term of the bound for a batch, in bits/dim.
#[derive(Clone, Debug, PartialEq)]
pub struct VbTerms {
    /// The term the bound uses: the decoder NLL where t is the first step (L_0), the KL
    /// elsewhere (L_{t−1}), shape `[N]`.
    pub bpd: Array1<f64>,
    /// KL(q(x_{t−1} ∣ x_t, x_0) ‖ p_θ(x_{t−1} ∣ x_t)) in bits/dim for every sample, shape `[N]`.
    pub kl_bpd: Array1<f64>,
    /// −log p_θ(x_0 ∣ x_1) in bits/dim for every sample (meaningful where t is the first step), `[N]`.
    pub decoder_nll_bpd: Array1<f64>,
    /// The x̂_0 the model implied, shape `[N, …]`.
    pub x0_pred: ArrayD<f64>,
}

/// L_{t−1} = KL(q(x_{t−1} ∣ x_t, x_0) ‖ p_θ(x_{t−1} ∣ x_t)) for t > 1 and L_0 = −log p_θ(x_0 ∣ x_1)
/// for t = 1, in bits/dim (Ho Eq. 5, the decoder of Eq. 13; improved-diffusion's `_vb_terms_bpd`).
///
/// `x0` is on the 8-bit grid in [−1, 1], shapes `[N, …]`.
///
/// # Panics
/// As [`p_mean_variance`].
pub fn vb_terms_bpd(
    schedule: &NoiseSchedule,
    param: &Parameterization,
    x0: &ArrayD<f64>,
    x_t: &ArrayD<f64>,
    t: &[usize],
    output: &ModelOutput,
    clip_x0: bool,
) -> VbTerms {
    let q = q_posterior_mean_variance(schedule, x0, x_t, t);
    let p = p_mean_variance(schedule, param, x_t, t, output, clip_x0);
    let kl_bpd = mean_flat(&normal_kl(&q.mean, &q.log_variance, &p.mean, &p.log_variance)) / LN_2;
    let log_scales = p.log_variance.mapv(|v| 0.5 * v);
    let ll = discretized_gaussian_log_likelihood(x0, &p.mean, &log_scales, schedule.conventions().normal_cdf);
    let decoder_nll_bpd = mean_flat(&ll.mapv(|v| -v)) / LN_2;
    let bpd =
        Array1::from_iter(t.iter().enumerate().map(
            |(n, &ti)| {
                if ti == 0 {
                    decoder_nll_bpd[n]
                } else {
                    kl_bpd[n]
                }
            },
        ));
    VbTerms { bpd, kl_bpd, decoder_nll_bpd, x0_pred: p.x0_pred }
}

/// The bound L_vlb = L_T + Σ_{t>1} L_{t−1} + L_0 for a batch, in bits/dim, as improved-diffusion's
/// `calc_bpd_loop` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct BpdBreakdown {
    /// L_T, the prior term, shape `[N]`.
    pub prior_bpd: Array1<f64>,
    /// Every term by code index: column 0 is L_0, column i > 0 is L_{i} (paper L_{t−1}, t = i + 1), `[N, T]`.
    pub terms_bpd: Array2<f64>,
    /// L_0 = −log p_θ(x_0 ∣ x_1), shape `[N]` (= `terms_bpd[.., 0]`).
    pub decoder_bpd: Array1<f64>,
    /// Σ_{t>1} L_{t−1}, the KL terms, shape `[N]`.
    pub kl_sum_bpd: Array1<f64>,
    /// L_T + Σ L_{t−1} + L_0, shape `[N]`.
    pub total_bpd: Array1<f64>,
    /// mean‖x̂_0 − x_0‖² per step, shape `[N, T]`.
    pub x0_mse: Array2<f64>,
    /// mean‖ε̂ − ε‖² per step (ε̂ recovered from x̂_0), shape `[N, T]`.
    pub eps_mse: Array2<f64>,
}

/// Evaluates the whole bound of a batch: for t = T−1 … 0 (code indices) draw ε, form x_t
/// (Eq. 4), run `model(x_t, t)` and take [`vb_terms_bpd`]; then add [`prior_bpd`]
/// (improved-diffusion's `calc_bpd_loop`, Ho et al.'s `calc_bpd_loop`).
///
/// `model` returns the raw network output, split per the variance type with [`ModelOutput::split`].
/// The reference code evaluates with `clip_x0 = true`.
///
/// # Panics
/// As [`p_mean_variance`].
pub fn calc_bpd_loop<F>(
    schedule: &NoiseSchedule,
    param: &Parameterization,
    x0: &ArrayD<f64>,
    clip_x0: bool,
    mut model: F,
    rng: &mut Rng,
) -> BpdBreakdown
where
    F: FnMut(&ArrayD<f64>, &[usize]) -> ArrayD<f64>,
{
    let n = x0.shape()[0];
    let big_t = schedule.num_timesteps();
    let mut terms_bpd = Array2::zeros((n, big_t));
    let mut x0_mse = Array2::zeros((n, big_t));
    let mut eps_mse = Array2::zeros((n, big_t));
    for i in (0..big_t).rev() {
        let t = vec![i; n];
        let eps = standard_normal(x0.shape(), rng);
        let x_t = q_sample(schedule, x0, &t, &eps);
        let output = ModelOutput::split(model(&x_t, &t), param.variance_type);
        let vb = vb_terms_bpd(schedule, param, x0, &x_t, &t, &output, clip_x0);
        terms_bpd.column_mut(i).assign(&vb.bpd);
        x0_mse.column_mut(i).assign(&mean_flat(&(&vb.x0_pred - x0).mapv(|d| d * d)));
        let eps_pred = predict_eps_from_x0(schedule, &x_t, &t, &vb.x0_pred);
        eps_mse.column_mut(i).assign(&mean_flat(&(&eps_pred - &eps).mapv(|d| d * d)));
    }
    let prior_bpd = prior_bpd(schedule, x0);
    let decoder_bpd = terms_bpd.column(0).to_owned();
    let kl_sum_bpd = terms_bpd.sum_axis(Axis(1)) - &decoder_bpd;
    let total_bpd = terms_bpd.sum_axis(Axis(1)) + &prior_bpd;
    BpdBreakdown { prior_bpd, terms_bpd, decoder_bpd, kl_sum_bpd, total_bpd, x0_mse, eps_mse }
}

/// Which training objective; each variant names its improved-diffusion `LossType` equivalent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossType {
    /// L_simple: mean‖target − prediction‖² (Ho Eq. 14; the target is ε, x_0, v or μ̃ per
    /// [`MeanType`]). Fixed variance only. improved-diffusion `MSE`.
    Simple,
    /// mean‖target − prediction‖² + L_t with the mean's gradient stopped, weight 1 on the bound
    /// term: improved-diffusion `MSE` with a learned variance. Equals N&D's L_hybrid (Eq. 16,
    /// λ = 0.001) only when T = 1000. Learned variance only.
    Hybrid,
    /// As `Hybrid` with the bound term weighted T/1000, i.e. λ·T·L_t with λ = 0.001: the unbiased
    /// one-sample estimate of N&D's L_simple + λ L_vlb for any T. improved-diffusion
    /// `RESCALED_MSE` (the default of its scripts). Learned variance only.
    RescaledHybrid,
    /// L_t alone (the term of the bound at the sampled t, bits/dim). improved-diffusion `KL`.
    Vlb,
    /// T·L_t, the unbiased one-sample estimate of the whole L_vlb (bits/dim). improved-diffusion
    /// `RESCALED_KL`.
    RescaledVlb,
}

impl LossType {
    /// Checks that this loss can train `param`: the MSE-only loss needs a fixed variance (it
    /// would never train a learned one), the hybrid losses a learned one (their bound term
    /// trains only the variance).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the mismatch and the loss to use instead.
    pub fn check(self, param: &Parameterization) -> Result<()> {
        let learned = param.variance_type.is_learned();
        match self {
            LossType::Simple if learned => Err(Error::config(
                "loss",
                format!(
                    "the simple loss gives a learned variance ({:?}) no gradient; use hybrid",
                    param.variance_type
                ),
            )),
            LossType::Hybrid | LossType::RescaledHybrid if !learned => Err(Error::config(
                "loss",
                format!(
                    "the hybrid loss needs a learned variance, not {:?}; use simple",
                    param.variance_type
                ),
            )),
            LossType::Simple
            | LossType::Hybrid
            | LossType::RescaledHybrid
            | LossType::Vlb
            | LossType::RescaledVlb => Ok(()),
        }
    }

    /// The weight on the bound term L_t (bits/dim) for T steps: 0, 1, T/1000, 1 or T.
    pub fn vb_weight(self, timesteps: usize) -> f64 {
        match self {
            LossType::Simple => 0.0,
            LossType::Hybrid | LossType::Vlb => 1.0,
            LossType::RescaledHybrid => timesteps as f64 / 1000.0,
            LossType::RescaledVlb => timesteps as f64,
        }
    }

    /// Whether the loss has a mean-squared-error term.
    pub fn has_mse(self) -> bool {
        match self {
            LossType::Simple | LossType::Hybrid | LossType::RescaledHybrid => true,
            LossType::Vlb | LossType::RescaledVlb => false,
        }
    }
}

/// The regression target of L_simple for each [`MeanType`]: ε (Ho Eq. 14), x_0, v, or the
/// posterior mean μ̃_t(x_t, x_0) (Eq. 7), shape `[N, …]`.
pub fn training_target(
    schedule: &NoiseSchedule,
    mean_type: MeanType,
    x0: &ArrayD<f64>,
    x_t: &ArrayD<f64>,
    t: &[usize],
    eps: &ArrayD<f64>,
) -> ArrayD<f64> {
    match mean_type {
        MeanType::Eps => eps.clone(),
        MeanType::X0 => x0.clone(),
        MeanType::V => v_target(schedule, x0, t, eps),
        MeanType::PrevX => q_posterior_mean_variance(schedule, x0, x_t, t).mean,
    }
}

/// The per-sample training losses of one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingLosses {
    /// The loss to average (after any importance weights), shape `[N]`.
    pub loss: Array1<f64>,
    /// mean‖target − prediction‖², when the loss has it, shape `[N]`.
    pub mse: Option<Array1<f64>>,
    /// L_t in bits/dim, unweighted, when the loss has it, shape `[N]`.
    pub vb: Option<Array1<f64>>,
}

/// The training losses of a batch given x_0, t, ε and the model's output on x_t = q_sample(x_0, t, ε)
/// (Ho Algorithm 1; N&D §3.1): `loss = mse + w·vb` with the weights of [`LossType::vb_weight`].
///
/// Stop-gradient: in the hybrid losses the bound term must not train the mean (N&D §3.1). This
/// reference has no gradients; the tape version must compute `vb` from a detached prediction
/// and the live variance values. For [`LossType::Vlb`]/[`LossType::RescaledVlb`] nothing is detached.
/// No clipping of x̂_0 during training, as in the reference code.
///
/// # Errors
/// [`Error::InvalidConfig`] from [`LossType::check`].
///
/// # Panics
/// As [`p_mean_variance`].
pub fn training_losses(
    schedule: &NoiseSchedule,
    param: &Parameterization,
    loss_type: LossType,
    x0: &ArrayD<f64>,
    t: &[usize],
    eps: &ArrayD<f64>,
    output: &ModelOutput,
) -> Result<TrainingLosses> {
    loss_type.check(param)?;
    let x_t = q_sample(schedule, x0, t, eps);
    let mse = loss_type.has_mse().then(|| {
        let target = training_target(schedule, param.mean_type, x0, &x_t, t, eps);
        mean_flat(&(&target - &output.prediction).mapv(|d| d * d))
    });
    let weight = loss_type.vb_weight(schedule.num_timesteps());
    let vb = (weight != 0.0).then(|| vb_terms_bpd(schedule, param, x0, &x_t, t, output, false).bpd);
    let mut loss = Array1::zeros(x0.shape()[0]);
    if let Some(m) = &mse {
        loss += m;
    }
    if let Some(v) = &vb {
        loss.scaled_add(weight, v);
    }
    Ok(TrainingLosses { loss, mse, vb })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::convention::Conventions;
    use crate::diffusion::gaussian::VarianceType;
    use crate::diffusion::schedule::BetaSchedule;
    use crate::rng_from_seed;

    #[test]
    fn kl_of_unit_shift_is_half_a_nat() {
        // KL(N(1,1) ‖ N(0,1)) = ½(μ₁ − μ₂)²/σ² = 0.5 nats: closed form of the Gaussian KL.
        assert!((normal_kl_scalar(1.0, 0.0, 0.0, 0.0) - 0.5).abs() < 1e-15);
        // KL(N(0,1) ‖ N(0,e)) = ½(−1 + 1 + e^{−1}) = e^{−1}/2.
        assert!((normal_kl_scalar(0.0, 0.0, 0.0, 1.0) - 0.5 * (-1.0f64).exp()).abs() < 1e-15);
    }

    #[test]
    fn decoder_gives_each_grid_value_its_own_bin() {
        let s = (1e-3f64).ln(); // σ = 1e-3, well inside a bin (half-width 1/255)
        for k in [0usize, 1, 127, 254, 255] {
            let x = k as f64 / 127.5 - 1.0;
            let p = decoder_bin_probabilities(x, s, NormalCdf::Erf);
            let best = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("256 bins").0;
            assert_eq!(best, k);
        }
    }

    #[test]
    fn loss_type_check_refuses_mismatched_variances() {
        let fixed = Parameterization::HO2020;
        let learned =
            Parameterization { mean_type: MeanType::Eps, variance_type: VarianceType::LearnedRange };
        assert!(LossType::Simple.check(&fixed).is_ok());
        assert!(LossType::Simple.check(&learned).is_err());
        assert!(LossType::Hybrid.check(&fixed).is_err());
        assert!(LossType::RescaledHybrid.check(&learned).is_ok());
        assert!(LossType::Vlb.check(&fixed).is_ok() && LossType::RescaledVlb.check(&learned).is_ok());
    }

    #[test]
    fn hybrid_loss_is_mse_plus_weighted_bound_term() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 100, Conventions::default()).expect("valid");
        let mut rng = rng_from_seed(4);
        let x0 = standard_normal(&[3, 2, 2, 2], &mut rng)
            .mapv(|v| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() / 127.5 - 1.0);
        let eps = standard_normal(&[3, 2, 2, 2], &mut rng);
        let t = [0, 40, 99];
        let param = Parameterization { mean_type: MeanType::Eps, variance_type: VarianceType::LearnedRange };
        let out = ModelOutput {
            prediction: &eps * 0.9,
            variance_values: Some(standard_normal(&[3, 2, 2, 2], &mut rng).mapv(|v| v.tanh())),
        };
        let h = training_losses(&s, &param, LossType::Hybrid, &x0, &t, &eps, &out).expect("learned");
        let r = training_losses(&s, &param, LossType::RescaledHybrid, &x0, &t, &eps, &out).expect("learned");
        let v = training_losses(&s, &param, LossType::RescaledVlb, &x0, &t, &eps, &out).expect("any");
        let (mse, vb) = (h.mse.expect("has mse"), h.vb.expect("has vb"));
        for n in 0..3 {
            assert!((mse[n] - 0.01 * mean_flat(&eps.mapv(|e| e * e))[n]).abs() < 1e-12);
            assert!((h.loss[n] - (mse[n] + vb[n])).abs() < 1e-12);
            assert!((r.loss[n] - (mse[n] + 0.1 * vb[n])).abs() < 1e-12);
            assert!((v.loss[n] - 100.0 * vb[n]).abs() < 1e-9);
        }
    }
}
