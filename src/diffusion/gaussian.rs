//! The Gaussians of DDPM: the forward process q(x_t ∣ x_0), its one-step kernel, the posterior
//! q(x_{t−1} ∣ x_t, x_0), and the model's reverse step p_θ(x_{t−1} ∣ x_t) for every mean
//! parameterisation × variance choice, with ancestral sampling.
//!
//! Reference math in f64 on batches `[N, …]` (`[N, D]` or `[N, C, H, W]`); axis 0 is the batch
//! and `t: &[usize]` holds one 0-based code index per sample (paper t = index + 1). Every
//! per-timestep coefficient is gathered with [`NoiseSchedule::extract_broadcast`] and broadcast
//! over the remaining axes, the way the reference code's `_extract_into_tensor` does.
//!
//! # Panics
//! Every function panics if `t.len()` differs from the batch size, if a `t[n] >= T`, or if two
//! arrays that must have the same shape do not (ndarray's convention for shape bugs).

use ndarray::{ArrayD, Axis};
use rand::Rng as _;
use rand_distr::StandardNormal;

use super::schedule::{NoiseSchedule, Table};
use crate::{Rng, Tensor};

/// What the network's (first) output predicts; the mean μ_θ follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MeanType {
    /// ε, the noise of Eq. (4); μ_θ = μ̃_t(x_t, x̂_0) with x̂_0 = (x_t − √(1−ᾱ_t) ε_θ)/√ᾱ_t,
    /// which equals Eq. (11) of Ho et al. 2020.
    Eps,
    /// x_0 itself; μ_θ = μ̃_t(x_t, x̂_0) (Eq. 7).
    X0,
    /// v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022, arXiv:2202.00512, §4);
    /// x̂_0 = √ᾱ_t x_t − √(1−ᾱ_t) v.
    V,
    /// x_{t−1}'s mean directly (the "xprev" option of Ho et al.'s code); x̂_0 = (μ_θ − c₂ x_t)/c₁.
    PrevX,
}

/// How the variance Σ_θ = σ_t² of p_θ(x_{t−1} ∣ x_t) is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VarianceType {
    /// σ_t² = β̃_t, the posterior variance (Ho §3.2); log-variance [`Table::LogBetaTildeClipped`].
    FixedSmall,
    /// σ_t² = β_t (Ho §3.2); log-variance [`Table::FixedLargeLogVariance`].
    FixedLarge,
    /// The network outputs log σ_t² directly (second half of its channels).
    Learned,
    /// The network outputs v ∈ [−1, 1] and Σ_θ = exp(v' log β_t + (1 − v') log β̃_t) with
    /// v' = (v + 1)/2 (Nichol & Dhariwal 2021, Eq. 15, as improved-diffusion parameterises it).
    LearnedRange,
}

impl VarianceType {
    /// Whether the network outputs a variance (doubling its output channels).
    pub fn is_learned(self) -> bool {
        match self {
            VarianceType::FixedSmall | VarianceType::FixedLarge => false,
            VarianceType::Learned | VarianceType::LearnedRange => true,
        }
    }
}

/// The model's parameterisation: what it predicts and how its variance is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Parameterization {
    /// What the (first half of the) output predicts.
    pub mean_type: MeanType,
    /// How the variance is chosen.
    pub variance_type: VarianceType,
}

impl Parameterization {
    /// DDPM as trained by Ho et al. 2020 for CIFAR-10: ε-prediction, σ_t² = β_t.
    pub const HO2020: Parameterization =
        Parameterization { mean_type: MeanType::Eps, variance_type: VarianceType::FixedLarge };

    /// The network's output channels for data with `data_channels` channels: C, or 2C when
    /// the variance is learned.
    pub fn output_channels(&self, data_channels: usize) -> usize {
        if self.variance_type.is_learned() {
            2 * data_channels
        } else {
            data_channels
        }
    }
}

/// A diagonal Gaussian over a batch: every field has the batch's shape `[N, …]`.
///
/// `variance` and `log_variance` are kept apart on purpose: at the first step the posterior
/// variance is 0 while its log is clipped (see [`Table::LogBetaTildeClipped`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Gaussian {
    /// The mean.
    pub mean: ArrayD<f64>,
    /// The variance.
    pub variance: ArrayD<f64>,
    /// The log-variance (clipped where the variance is 0).
    pub log_variance: ArrayD<f64>,
}

/// A forward-noised batch: x_t and the noise ε that produced it (Eq. 4).
#[derive(Clone, Debug, PartialEq)]
pub struct NoisedBatch {
    /// x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, shape `[N, …]`.
    pub x_t: ArrayD<f64>,
    /// ε ~ N(0, I), shape `[N, …]`.
    pub eps: ArrayD<f64>,
}

/// The network's output for one batch, already split into its two halves.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelOutput {
    /// The prediction of [`MeanType`] (ε, x_0, v or x_{t−1}), shape `[N, C, …]`.
    pub prediction: ArrayD<f64>,
    /// The variance output (log σ² or v ∈ [−1, 1]) when the variance is learned, shape `[N, C, …]`.
    pub variance_values: Option<ArrayD<f64>>,
}

impl ModelOutput {
    /// Splits a raw network output `[N, C', …]` as improved-diffusion does: with a learned
    /// variance the channels (axis 1) are halved, the first half the prediction and the second
    /// the variance values; otherwise the whole output is the prediction.
    ///
    /// # Panics
    /// If the variance is learned and the output has fewer than 2 axes or an odd channel count.
    pub fn split(output: ArrayD<f64>, variance_type: VarianceType) -> ModelOutput {
        if !variance_type.is_learned() {
            return ModelOutput { prediction: output, variance_values: None };
        }
        assert!(output.ndim() >= 2, "ModelOutput::split: output {:?} has no channel axis", output.shape());
        let channels = output.shape()[1];
        assert!(channels.is_multiple_of(2), "ModelOutput::split: {channels} channels cannot be halved");
        let (a, b) = output.view().split_at(Axis(1), channels / 2);
        ModelOutput { prediction: a.to_owned(), variance_values: Some(b.to_owned()) }
    }

    /// The raw output again: the two halves joined along the channels (the inverse of
    /// [`ModelOutput::split`]), or the prediction alone.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] if the halves' shapes differ other than in the channels
    /// (the fields are public, so a caller can build such an output).
    pub fn joined(&self) -> crate::Result<ArrayD<f64>> {
        match &self.variance_values {
            None => Ok(self.prediction.clone()),
            Some(v) => ndarray::concatenate(Axis(1), &[self.prediction.view(), v.view()]).map_err(|_| {
                crate::Error::config(
                    "model output",
                    format!(
                        "the prediction {:?} and the variance values {:?} cannot be joined along the channels",
                        self.prediction.shape(),
                        v.shape()
                    ),
                )
            }),
        }
    }
}

/// The reverse step p_θ(x_{t−1} ∣ x_t) of one batch, with the x_0 it implies.
#[derive(Clone, Debug, PartialEq)]
pub struct PMeanVariance {
    /// μ_θ(x_t, t), shape `[N, …]`.
    pub mean: ArrayD<f64>,
    /// σ_t², shape `[N, …]` (for fixed-small, β̃_t, which is 0 at the first step).
    pub variance: ArrayD<f64>,
    /// log σ_t², shape `[N, …]` (clipped at the first step per the conventions).
    pub log_variance: ArrayD<f64>,
    /// x̂_0 implied by the prediction (clipped to [−1, 1] when asked), shape `[N, …]`.
    pub x0_pred: ArrayD<f64>,
}

/// One ancestral sampling step.
#[derive(Clone, Debug, PartialEq)]
pub struct PSample {
    /// x_{t−1} = μ_θ + σ_t z (no noise when t is the first step), shape `[N, …]`.
    pub x_prev: ArrayD<f64>,
    /// The x̂_0 used for the mean, shape `[N, …]`.
    pub x0_pred: ArrayD<f64>,
}

/// Coefficient `which` at the batch's timesteps, shaped `[N, 1, …]` like `x`.
fn coef(schedule: &NoiseSchedule, which: Table, t: &[usize], x: &ArrayD<f64>) -> ArrayD<f64> {
    assert_eq!(t.len(), x.shape()[0], "{} timesteps for a batch of shape {:?}", t.len(), x.shape());
    schedule.extract_broadcast(which, t, x.ndim())
}

/// `c` (shape `[N, 1, …]`) broadcast to the full shape of `x`.
fn full(c: &ArrayD<f64>, x: &ArrayD<f64>) -> ArrayD<f64> {
    c.broadcast(x.raw_dim()).expect("coef shaped c [N, 1, …] with x's ndim and N checked").to_owned()
}

fn assert_same_shape(a: &ArrayD<f64>, b: &ArrayD<f64>, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes {:?} and {:?} differ", a.shape(), b.shape());
}

/// A standard normal array of `shape` drawn from `rng` in row-major order.
pub fn standard_normal(shape: &[usize], rng: &mut Rng) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(shape, || rng.sample::<f64, _>(StandardNormal))
}

/// The one-step kernel q(x_t ∣ x_{t−1}) = N(√(1−β_t) x_{t−1}, β_t I) (Ho Eq. 2).
pub fn q_step_mean_variance(schedule: &NoiseSchedule, x_prev: &ArrayD<f64>, t: &[usize]) -> Gaussian {
    let sqrt_alpha = coef(schedule, Table::Alphas, t, x_prev).mapv(f64::sqrt);
    let beta = coef(schedule, Table::Betas, t, x_prev);
    Gaussian {
        mean: &sqrt_alpha * x_prev,
        variance: full(&beta, x_prev),
        log_variance: full(&beta.mapv(f64::ln), x_prev),
    }
}

/// q(x_t ∣ x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (Ho Eq. 4).
pub fn q_mean_variance(schedule: &NoiseSchedule, x0: &ArrayD<f64>, t: &[usize]) -> Gaussian {
    let mean = &coef(schedule, Table::SqrtAlphaBar, t, x0) * x0;
    let variance = full(&coef(schedule, Table::AlphaBar, t, x0).mapv(|a| 1.0 - a), x0);
    let log_variance = full(&coef(schedule, Table::LogOneMinusAlphaBar, t, x0), x0);
    Gaussian { mean, variance, log_variance }
}

/// x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, a sample of q(x_t ∣ x_0) by reparameterisation (Ho Eq. 4, §3.2).
pub fn q_sample(schedule: &NoiseSchedule, x0: &ArrayD<f64>, t: &[usize], eps: &ArrayD<f64>) -> ArrayD<f64> {
    assert_same_shape(x0, eps, "q_sample");
    &coef(schedule, Table::SqrtAlphaBar, t, x0) * x0
        + &coef(schedule, Table::SqrtOneMinusAlphaBar, t, x0) * eps
}

/// [`q_sample`] on the training code's f32 tensors `[N, …]`: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε with
/// the coefficients gathered in f64 and rounded once to f32.
///
/// # Panics
/// If `x0` and `eps` differ in shape, `t.len()` differs from N, or a `t[n] >= T`.
pub fn q_sample_f32(schedule: &NoiseSchedule, x0: &Tensor, t: &[usize], eps: &Tensor) -> Tensor {
    assert_eq!(x0.shape(), eps.shape(), "q_sample_f32: x0 {:?} and eps {:?} differ", x0.shape(), eps.shape());
    assert_eq!(
        t.len(),
        x0.shape()[0],
        "q_sample_f32: {} timesteps for a batch of shape {:?}",
        t.len(),
        x0.shape()
    );
    let a = schedule.extract_broadcast_f32(Table::SqrtAlphaBar, t, x0.ndim());
    let b = schedule.extract_broadcast_f32(Table::SqrtOneMinusAlphaBar, t, x0.ndim());
    &a * x0 + &b * eps
}

/// [`q_sample`] with ε ~ N(0, I) drawn from `rng`.
pub fn q_sample_rng(schedule: &NoiseSchedule, x0: &ArrayD<f64>, t: &[usize], rng: &mut Rng) -> NoisedBatch {
    let eps = standard_normal(x0.shape(), rng);
    NoisedBatch { x_t: q_sample(schedule, x0, t, &eps), eps }
}

/// The posterior q(x_{t−1} ∣ x_t, x_0) = N(μ̃_t, β̃_t I) with
/// μ̃_t = √ᾱ_{t−1} β_t/(1−ᾱ_t) x_0 + √α_t (1−ᾱ_{t−1})/(1−ᾱ_t) x_t (Ho Eqs. 6–7).
///
/// `log_variance` is [`Table::LogBetaTildeClipped`] (β̃ is 0 at the first step).
pub fn q_posterior_mean_variance(
    schedule: &NoiseSchedule,
    x0: &ArrayD<f64>,
    x_t: &ArrayD<f64>,
    t: &[usize],
) -> Gaussian {
    assert_same_shape(x0, x_t, "q_posterior_mean_variance");
    let mean = &coef(schedule, Table::PosteriorMeanCoef1, t, x0) * x0
        + &coef(schedule, Table::PosteriorMeanCoef2, t, x0) * x_t;
    Gaussian {
        mean,
        variance: full(&coef(schedule, Table::BetaTilde, t, x0), x0),
        log_variance: full(&coef(schedule, Table::LogBetaTildeClipped, t, x0), x0),
    }
}

/// x̂_0 = x_t/√ᾱ_t − √(1/ᾱ_t − 1) ε, Eq. (4) solved for x_0.
pub fn predict_x0_from_eps(
    schedule: &NoiseSchedule,
    x_t: &ArrayD<f64>,
    t: &[usize],
    eps: &ArrayD<f64>,
) -> ArrayD<f64> {
    assert_same_shape(x_t, eps, "predict_x0_from_eps");
    &coef(schedule, Table::SqrtRecipAlphaBar, t, x_t) * x_t
        - &coef(schedule, Table::SqrtRecipm1AlphaBar, t, x_t) * eps
}

/// ε̂ = (x_t/√ᾱ_t − x̂_0)/√(1/ᾱ_t − 1), Eq. (4) solved for ε.
pub fn predict_eps_from_x0(
    schedule: &NoiseSchedule,
    x_t: &ArrayD<f64>,
    t: &[usize],
    x0: &ArrayD<f64>,
) -> ArrayD<f64> {
    assert_same_shape(x_t, x0, "predict_eps_from_x0");
    (&coef(schedule, Table::SqrtRecipAlphaBar, t, x_t) * x_t - x0)
        / &coef(schedule, Table::SqrtRecipm1AlphaBar, t, x_t)
}

/// x̂_0 = √ᾱ_t x_t − √(1−ᾱ_t) v (Salimans & Ho 2022, §4).
pub fn predict_x0_from_v(
    schedule: &NoiseSchedule,
    x_t: &ArrayD<f64>,
    t: &[usize],
    v: &ArrayD<f64>,
) -> ArrayD<f64> {
    assert_same_shape(x_t, v, "predict_x0_from_v");
    &coef(schedule, Table::SqrtAlphaBar, t, x_t) * x_t
        - &coef(schedule, Table::SqrtOneMinusAlphaBar, t, x_t) * v
}

/// The v target √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022, §4).
pub fn v_target(schedule: &NoiseSchedule, x0: &ArrayD<f64>, t: &[usize], eps: &ArrayD<f64>) -> ArrayD<f64> {
    assert_same_shape(x0, eps, "v_target");
    &coef(schedule, Table::SqrtAlphaBar, t, x0) * eps
        - &coef(schedule, Table::SqrtOneMinusAlphaBar, t, x0) * x0
}

/// x̂_0 = (x_{t−1} − c₂ x_t)/c₁ with c₁, c₂ the posterior mean coefficients (Eq. 7 solved for x_0).
pub fn predict_x0_from_xprev(
    schedule: &NoiseSchedule,
    x_t: &ArrayD<f64>,
    t: &[usize],
    x_prev: &ArrayD<f64>,
) -> ArrayD<f64> {
    assert_same_shape(x_t, x_prev, "predict_x0_from_xprev");
    let c1 = coef(schedule, Table::PosteriorMeanCoef1, t, x_t);
    let c2 = coef(schedule, Table::PosteriorMeanCoef2, t, x_t);
    &c1.mapv(|c| 1.0 / c) * x_prev - &(&c2 / &c1) * x_t
}

/// The model's reverse step p_θ(x_{t−1} ∣ x_t) = N(μ_θ, σ_t² I) (Ho Eq. 1, §3.2; the learned
/// variances of Nichol & Dhariwal §3.1, Eq. 15), and the x̂_0 it implies.
///
/// With `clip_x0`, x̂_0 is clamped to [−1, 1] before the mean is formed from it (not for
/// [`MeanType::PrevX`], whose mean is the output itself), as the reference code does.
///
/// # Panics
/// If a learned variance is asked for and `output.variance_values` is `None`, or on the shape
/// mismatches listed in the module docs.
pub fn p_mean_variance(
    schedule: &NoiseSchedule,
    param: &Parameterization,
    x_t: &ArrayD<f64>,
    t: &[usize],
    output: &ModelOutput,
    clip_x0: bool,
) -> PMeanVariance {
    let pred = &output.prediction;
    assert_same_shape(x_t, pred, "p_mean_variance");
    let log_variance = match param.variance_type {
        VarianceType::FixedSmall => full(&coef(schedule, Table::LogBetaTildeClipped, t, x_t), x_t),
        VarianceType::FixedLarge => full(&coef(schedule, Table::FixedLargeLogVariance, t, x_t), x_t),
        // A documented precondition (# Panics), not a run-time condition: ModelOutput::split,
        // which p_sample_loop uses, sets variance_values for both learned types.
        VarianceType::Learned => {
            let v = output.variance_values.as_ref().expect("a learned variance needs variance_values");
            assert_same_shape(x_t, v, "p_mean_variance (variance values)");
            v.clone()
        }
        VarianceType::LearnedRange => {
            let v = output.variance_values.as_ref().expect("a learned-range variance needs variance_values");
            assert_same_shape(x_t, v, "p_mean_variance (variance values)");
            let min_log = coef(schedule, Table::LogBetaTildeClipped, t, x_t);
            let max_log = coef(schedule, Table::LogBetas, t, x_t);
            let frac = v.mapv(|v| (v + 1.0) / 2.0);
            &frac * &max_log + &frac.mapv(|f| 1.0 - f) * &min_log
        }
    };
    let variance = match param.variance_type {
        // The exact β̃_t, 0 at the first step, as the reference code returns it.
        VarianceType::FixedSmall => full(&coef(schedule, Table::BetaTilde, t, x_t), x_t),
        VarianceType::FixedLarge | VarianceType::Learned | VarianceType::LearnedRange => {
            log_variance.mapv(f64::exp)
        }
    };
    let clip = |x: ArrayD<f64>| {
        if clip_x0 {
            x.mapv(|v| v.clamp(-1.0, 1.0))
        } else {
            x
        }
    };
    let (mean, x0_pred) = match param.mean_type {
        MeanType::PrevX => (pred.clone(), clip(predict_x0_from_xprev(schedule, x_t, t, pred))),
        MeanType::Eps | MeanType::X0 | MeanType::V => {
            let x0_pred = clip(match param.mean_type {
                MeanType::Eps => predict_x0_from_eps(schedule, x_t, t, pred),
                MeanType::V => predict_x0_from_v(schedule, x_t, t, pred),
                MeanType::X0 | MeanType::PrevX => pred.clone(),
            });
            (q_posterior_mean_variance(schedule, &x0_pred, x_t, t).mean, x0_pred)
        }
    };
    PMeanVariance { mean, variance, log_variance, x0_pred }
}

/// One ancestral step x_{t−1} = μ_θ + σ_t z, z ~ N(0, I) (Ho Algorithm 2, line 4), with no
/// noise added where t is the first step (code index 0). z is drawn for the whole batch.
///
/// # Panics
/// As [`p_mean_variance`].
pub fn p_sample(
    schedule: &NoiseSchedule,
    param: &Parameterization,
    x_t: &ArrayD<f64>,
    t: &[usize],
    output: &ModelOutput,
    clip_x0: bool,
    rng: &mut Rng,
) -> PSample {
    let p = p_mean_variance(schedule, param, x_t, t, output, clip_x0);
    let z = standard_normal(x_t.shape(), rng);
    let mut x_prev = p.mean;
    for (((mut row, zr), lv), &ti) in
        x_prev.axis_iter_mut(Axis(0)).zip(z.axis_iter(Axis(0))).zip(p.log_variance.axis_iter(Axis(0))).zip(t)
    {
        if ti != 0 {
            row.zip_mut_with(&(&lv.mapv(|l| (0.5 * l).exp()) * &zr), |x, n| *x += n);
        }
    }
    PSample { x_prev, x0_pred: p.x0_pred }
}

/// Ancestral sampling (Ho Algorithm 2): x_T ~ N(0, I), then [`p_sample`] for t = T−1 … 0
/// (code indices). `model(x_t, t)` returns the raw network output, split per the variance type
/// with [`ModelOutput::split`].
///
/// # Panics
/// As [`p_mean_variance`], or if `shape` is empty.
pub fn p_sample_loop<F>(
    schedule: &NoiseSchedule,
    param: &Parameterization,
    shape: &[usize],
    clip_x0: bool,
    mut model: F,
    rng: &mut Rng,
) -> ArrayD<f64>
where
    F: FnMut(&ArrayD<f64>, &[usize]) -> ArrayD<f64>,
{
    assert!(!shape.is_empty(), "p_sample_loop: empty shape");
    let mut x = standard_normal(shape, rng);
    for i in (0..schedule.num_timesteps()).rev() {
        let t = vec![i; shape[0]];
        let output = ModelOutput::split(model(&x, &t), param.variance_type);
        x = p_sample(schedule, param, &x, &t, &output, clip_x0, rng).x_prev;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::convention::Conventions;
    use crate::diffusion::schedule::BetaSchedule;
    use crate::rng_from_seed;

    fn schedule() -> NoiseSchedule {
        NoiseSchedule::new(&BetaSchedule::Linear, 20, Conventions::default()).expect("valid")
    }

    #[test]
    fn eps_x0_and_v_predictions_invert_the_forward_process() {
        let s = schedule();
        let mut rng = rng_from_seed(1);
        let x0 = standard_normal(&[3, 2, 2, 2], &mut rng);
        let t = [0, 7, 19];
        let n = q_sample_rng(&s, &x0, &t, &mut rng);
        let close = |a: &ArrayD<f64>, b: &ArrayD<f64>| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-10);
        assert!(close(&predict_x0_from_eps(&s, &n.x_t, &t, &n.eps), &x0));
        assert!(close(&predict_eps_from_x0(&s, &n.x_t, &t, &x0), &n.eps));
        let v = v_target(&s, &x0, &t, &n.eps);
        assert!(close(&predict_x0_from_v(&s, &n.x_t, &t, &v), &x0));
        let post = q_posterior_mean_variance(&s, &x0, &n.x_t, &t);
        assert!(close(&predict_x0_from_xprev(&s, &n.x_t, &t, &post.mean), &x0));
    }

    #[test]
    fn every_mean_type_gives_the_posterior_mean_when_it_predicts_the_truth() {
        let s = schedule();
        let mut rng = rng_from_seed(2);
        let x0 = standard_normal(&[4, 5], &mut rng);
        let t = [1, 5, 10, 19];
        let n = q_sample_rng(&s, &x0, &t, &mut rng);
        let truth = q_posterior_mean_variance(&s, &x0, &n.x_t, &t).mean;
        for (mean_type, prediction) in [
            (MeanType::Eps, n.eps.clone()),
            (MeanType::X0, x0.clone()),
            (MeanType::V, v_target(&s, &x0, &t, &n.eps)),
            (MeanType::PrevX, truth.clone()),
        ] {
            for variance_type in [VarianceType::FixedSmall, VarianceType::FixedLarge] {
                let param = Parameterization { mean_type, variance_type };
                let out = ModelOutput { prediction: prediction.clone(), variance_values: None };
                let p = p_mean_variance(&s, &param, &n.x_t, &t, &out, false);
                for (a, b) in p.mean.iter().zip(&truth) {
                    assert!((a - b).abs() < 1e-9, "{mean_type:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn learned_range_interpolates_between_beta_tilde_and_beta_in_log_space() {
        let s = schedule();
        let t = [5, 5, 5];
        let x_t = ArrayD::zeros(vec![3, 1]);
        let v = ArrayD::from_shape_vec(vec![3, 1], vec![-1.0, 0.0, 1.0]).expect("3 values");
        let out = ModelOutput { prediction: x_t.clone(), variance_values: Some(v) };
        let param = Parameterization { mean_type: MeanType::Eps, variance_type: VarianceType::LearnedRange };
        let p = p_mean_variance(&s, &param, &x_t, &t, &out, false);
        let (lo, hi) = (s.beta_tilde()[5].ln(), s.betas()[5].ln());
        assert!((p.log_variance[[0, 0]] - lo).abs() < 1e-14);
        assert!((p.log_variance[[1, 0]] - 0.5 * (lo + hi)).abs() < 1e-14);
        assert!((p.log_variance[[2, 0]] - hi).abs() < 1e-14);
    }

    #[test]
    fn split_halves_the_channel_axis_only_for_learned_variances() {
        let raw = ArrayD::from_shape_fn(vec![2, 6, 1, 1], |ix| ix[1] as f64);
        let fixed = ModelOutput::split(raw.clone(), VarianceType::FixedLarge);
        assert_eq!(fixed.prediction.shape(), &[2, 6, 1, 1]);
        let learned = ModelOutput::split(raw, VarianceType::Learned);
        assert_eq!(learned.prediction.shape(), &[2, 3, 1, 1]);
        assert_eq!(learned.variance_values.as_ref().expect("learned")[[0, 0, 0, 0]], 3.0);
    }

    #[test]
    fn clipping_bounds_x0_pred_and_the_first_step_adds_no_noise() {
        let s = schedule();
        let x_t = ArrayD::from_elem(vec![1, 4], 3.0);
        let out = ModelOutput { prediction: ArrayD::from_elem(vec![1, 4], -5.0), variance_values: None };
        let p = p_mean_variance(&s, &Parameterization::HO2020, &x_t, &[0], &out, true);
        assert!(p.x0_pred.iter().all(|&v| v == 1.0));
        let a = p_sample(&s, &Parameterization::HO2020, &x_t, &[0], &out, true, &mut rng_from_seed(3));
        assert_eq!(a.x_prev, p.mean, "no noise at the first step");
    }
}
