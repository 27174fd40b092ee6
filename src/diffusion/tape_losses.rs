//! The training losses on the tape: L_simple, the bound term L_t, and their hybrids, with
//! gradients. The f64 reference without gradients is [`training_losses`]; the tests check that
//! the two agree and that the gradients match finite differences.
//!
//! Stop-gradient (Nichol & Dhariwal 2021, §3.1): in the hybrid losses L_t sees the prediction
//! through [`Var::detach`], so it trains only the variance; the mean is trained by L_simple.
//!
//! [`training_losses`]: super::losses::training_losses

use std::f64::consts::LN_2;

use super::convention::NormalCdf;
use super::gaussian::{MeanType, Parameterization, VarianceType};
use super::losses::LossType;
use super::normal::standard_normal_cdf;
use super::schedule::{NoiseSchedule, Table};
use crate::{Tensor, Var};

/// The per-sample losses of a batch, as tape values of shape `[N]`.
#[derive(Debug)]
pub struct TapeLosses {
    /// `mse + w·vb`, what the optimiser minimises (before any importance weights).
    pub loss: Var,
    /// mean‖target − prediction‖², when the loss has it.
    pub mse: Option<Var>,
    /// L_t in bits/dim (unweighted), when the loss has it.
    pub vb: Option<Var>,
}

/// `max(x, lo)`; the gradient is 0 where the floor is active.
pub fn clamp_min(x: &Var, lo: f32) -> Var {
    let y = x.value().mapv(|v| v.max(lo));
    let xs = x.value_rc();
    Var::record([x], y, move |g, _| {
        [Some(ndarray::Zip::from(g).and(&*xs).map_collect(|&g, &x| if x > lo { g } else { 0.0 }))]
    })
}

/// Φ(x), the standard normal CDF, computed per `cdf` (exact erf, or the tanh approximation
/// `½(1 + tanh(√(2/π)(x + 0.044715x³)))` of Ho et al.'s code); the derivative is that of the
/// function actually computed.
pub fn normal_cdf(x: &Var, cdf: NormalCdf) -> Var {
    let y = x.value().mapv(|v| standard_normal_cdf(v as f64, cdf) as f32);
    let xs = x.value_rc();
    Var::record([x], y, move |g, _| {
        let d = |x: f64| -> f64 {
            match cdf {
                NormalCdf::Erf => (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt(),
                NormalCdf::TanhApprox => {
                    let k = (2.0 / std::f64::consts::PI).sqrt();
                    let th = (k * (x + 0.044715 * x * x * x)).tanh();
                    0.5 * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * x * x)
                }
            }
        };
        [Some(ndarray::Zip::from(g).and(&*xs).map_collect(|&g, &x| g * d(x as f64) as f32))]
    })
}

/// Mean over every axis but the first: `[N, …] → [N]`.
fn mean_flat(x: &Var) -> Var {
    let n = x.shape()[0];
    let per = x.len() / n.max(1);
    x.reshape(&[n, per]).mean_axis(1, false)
}

/// A schedule table at the batch's timesteps, broadcast to `shape` (a constant).
fn coef(s: &NoiseSchedule, which: Table, t: &[usize], shape: &[usize]) -> Var {
    let c = s.extract_broadcast_f32(which, t, shape.len());
    // Cannot fail when t has one timestep per batch item, a precondition of training_losses_tape
    // (# Panics: mismatched shapes): c is then [N, 1, …] with shape's ndim.
    Var::constant(c.broadcast(shape).expect("[N, 1, …] broadcasts").to_owned())
}

/// A constant per-sample mask `[N] → [N]`: 1 where `f(t)` holds.
fn mask(t: &[usize], f: impl Fn(usize) -> bool) -> Var {
    Var::constant(
        Tensor::from_shape_vec(vec![t.len()], t.iter().map(|&ti| f(ti) as u8 as f32).collect())
            .expect("one value per timestep"),
    )
}

/// The losses of [`training_losses`](super::losses::training_losses) on the tape, for the
/// network output `output` on `x_t = q_sample(x0, t, eps)`. Shapes `[N, C, …]` (`output` has
/// `2C` channels when the variance is learned).
///
/// # Panics
/// On mismatched shapes, or a loss type that does not fit the parameterisation (check it with
/// [`LossType::check`] first).
#[allow(clippy::too_many_arguments)]
pub fn training_losses_tape(
    s: &NoiseSchedule,
    param: &Parameterization,
    loss_type: LossType,
    x0: &Tensor,
    x_t: &Tensor,
    t: &[usize],
    eps: &Tensor,
    output: &Var,
) -> TapeLosses {
    let shape = x0.shape().to_vec();
    let c = shape[1];
    let learned = param.variance_type.is_learned();
    let (pred, var_values) = if learned {
        assert_eq!(output.shape()[1], 2 * c, "training_losses_tape: a learned variance needs 2C channels");
        (output.slice(1, 0, c), Some(output.slice(1, c, 2 * c)))
    } else {
        (output.clone(), None)
    };
    let k = |which| coef(s, which, t, &shape);
    let (x0c, xtc) = (Var::constant(x0.clone()), Var::constant(x_t.clone()));

    let mse = loss_type.has_mse().then(|| {
        let target = match param.mean_type {
            MeanType::Eps => Var::constant(eps.clone()),
            MeanType::X0 => x0c.clone(),
            MeanType::V => k(Table::SqrtAlphaBar)
                .mul(&Var::constant(eps.clone()))
                .sub(&k(Table::SqrtOneMinusAlphaBar).mul(&x0c)),
            MeanType::PrevX => {
                k(Table::PosteriorMeanCoef1).mul(&x0c).add(&k(Table::PosteriorMeanCoef2).mul(&xtc))
            }
        };
        mean_flat(&pred.sub(&target).square())
    });

    let weight = loss_type.vb_weight(s.num_timesteps());
    let vb = (weight != 0.0).then(|| {
        let p = if loss_type.has_mse() { pred.detach() } else { pred.clone() };
        // x̂_0 from the prediction (no clipping in training), then μ_θ = coef1·x̂_0 + coef2·x_t.
        let model_mean = match param.mean_type {
            MeanType::PrevX => p.clone(),
            mt => {
                let x0_pred = match mt {
                    MeanType::Eps => {
                        k(Table::SqrtRecipAlphaBar).mul(&xtc).sub(&k(Table::SqrtRecipm1AlphaBar).mul(&p))
                    }
                    MeanType::X0 => p.clone(),
                    MeanType::V => {
                        k(Table::SqrtAlphaBar).mul(&xtc).sub(&k(Table::SqrtOneMinusAlphaBar).mul(&p))
                    }
                    MeanType::PrevX => unreachable!("handled above"),
                };
                k(Table::PosteriorMeanCoef1).mul(&x0_pred).add(&k(Table::PosteriorMeanCoef2).mul(&xtc))
            }
        };
        // The expects cannot fail: var_values is Some exactly when the variance is learned (above).
        let model_log_var = match param.variance_type {
            VarianceType::FixedSmall => k(Table::LogBetaTildeClipped),
            VarianceType::FixedLarge => k(Table::FixedLargeLogVariance),
            VarianceType::Learned => var_values.clone().expect("learned"),
            VarianceType::LearnedRange => {
                // log σ² = frac·log β + (1 − frac)·log β̃, frac = (v + 1)/2 (N&D Eq. 15).
                let frac = var_values.clone().expect("learned").add_scalar(1.0).mul_scalar(0.5);
                let (max_log, min_log) = (k(Table::LogBetas), k(Table::LogBetaTildeClipped));
                frac.mul(&max_log).add(&frac.neg().add_scalar(1.0).mul(&min_log))
            }
        };
        // KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)) of diagonal Gaussians, in nats per element.
        let true_mean = k(Table::PosteriorMeanCoef1).mul(&x0c).add(&k(Table::PosteriorMeanCoef2).mul(&xtc));
        let true_log_var = k(Table::LogBetaTildeClipped);
        let diff = true_mean.sub(&model_mean);
        let kl = model_log_var
            .sub(&true_log_var)
            .add(&true_log_var.sub(&model_log_var).exp())
            .add(&diff.square().mul(&model_log_var.neg().exp()))
            .add_scalar(-1.0)
            .mul_scalar(0.5);
        let kl_bpd = mean_flat(&kl).mul_scalar((1.0 / LN_2) as f32);
        // L_0: −log of the mass of x_0's 8-bit bin under N(μ_θ, σ²), edges to ±∞ (Ho Eq. 13).
        let cdf = s.conventions().normal_cdf;
        let centered = x0c.sub(&model_mean);
        let inv_std = model_log_var.mul_scalar(-0.5).exp();
        let cdf_plus = normal_cdf(&inv_std.mul(&centered.add_scalar(1.0 / 255.0)), cdf);
        let cdf_min = normal_cdf(&inv_std.mul(&centered.add_scalar(-1.0 / 255.0)), cdf);
        let log_cdf_plus = clamp_min(&cdf_plus, 1e-12).log();
        let log_one_minus_cdf_min = clamp_min(&cdf_min.neg().add_scalar(1.0), 1e-12).log();
        let log_delta = clamp_min(&cdf_plus.sub(&cdf_min), 1e-12).log();
        let low = x0.mapv(|v| (v < -0.999) as u8 as f32);
        let high = x0.mapv(|v| (v > 0.999) as u8 as f32);
        let mid = ndarray::Zip::from(&low).and(&high).map_collect(|&a, &b| 1.0 - a - b);
        let log_probs = log_cdf_plus
            .mul(&Var::constant(low))
            .add(&log_one_minus_cdf_min.mul(&Var::constant(high)))
            .add(&log_delta.mul(&Var::constant(mid)));
        let decoder_bpd = mean_flat(&log_probs.neg()).mul_scalar((1.0 / LN_2) as f32);
        decoder_bpd.mul(&mask(t, |ti| ti == 0)).add(&kl_bpd.mul(&mask(t, |ti| ti != 0)))
    });

    let loss = match (&mse, &vb) {
        (Some(m), Some(v)) => m.add(&v.mul_scalar(weight as f32)),
        (Some(m), None) => m.clone(),
        (None, Some(v)) => v.mul_scalar(weight as f32),
        (None, None) => unreachable!("every loss type has an MSE or a bound term"),
    };
    TapeLosses { loss, mse, vb }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autodiff::{gradcheck, GradcheckConfig};
    use crate::diffusion::losses::training_losses;
    use crate::diffusion::{BetaSchedule, Convention, ModelOutput};
    use crate::ops::testutil::{randn, uniform};

    #[test]
    fn cdf_and_clamp_backward_match_finite_differences() {
        let x = randn(&[4, 5], 1);
        for cdf in [NormalCdf::Erf, NormalCdf::TanhApprox] {
            gradcheck(&[x.clone()], |v| normal_cdf(&v[0], cdf), &GradcheckConfig::default()).unwrap();
        }
        gradcheck(&[x], |v| clamp_min(&v[0], 0.1), &GradcheckConfig::default()).unwrap();
    }

    fn setup(c: Convention) -> (NoiseSchedule, Tensor, Tensor, Vec<usize>, Tensor) {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 50, c.settings()).unwrap();
        // x0 on the 8-bit grid, including both edges.
        let x0 = uniform(&[4, 2, 3, 3], 0.0, 256.0, 3).mapv(|v| (v.floor().min(255.0) / 127.5) - 1.0);
        let mut x0 = x0;
        x0[[0, 0, 0, 0]] = -1.0;
        x0[[0, 0, 0, 1]] = 1.0;
        let eps = randn(&[4, 2, 3, 3], 4);
        let t = vec![0, 1, 25, 49];
        let x_t = crate::diffusion::gaussian::q_sample_f32(&s, &x0, &t, &eps);
        (s, x0, x_t, t, eps)
    }

    #[test]
    fn tape_losses_equal_the_f64_reference() {
        for conv in [Convention::Ho2020, Convention::Diffusers] {
            let (s, x0, x_t, t, eps) = setup(conv);
            for (mean_type, var, loss) in [
                (MeanType::Eps, VarianceType::FixedLarge, LossType::Simple),
                (MeanType::Eps, VarianceType::Learned, LossType::Hybrid),
                (MeanType::Eps, VarianceType::LearnedRange, LossType::RescaledHybrid),
                (MeanType::X0, VarianceType::FixedSmall, LossType::Vlb),
                (MeanType::V, VarianceType::LearnedRange, LossType::RescaledVlb),
                (MeanType::PrevX, VarianceType::Learned, LossType::Hybrid),
            ] {
                let param = Parameterization { mean_type, variance_type: var };
                let ch = param.output_channels(2);
                let mut out = randn(&[4, ch, 3, 3], 9).mapv(|v| 0.3 * v);
                if var == VarianceType::Learned {
                    // Plausible log-variances, near log β.
                    let lv = s.extract_broadcast_f32(Table::LogBetas, &t, 4);
                    let mut half = out.slice_mut(ndarray::s![.., 2.., .., ..]);
                    half += &lv;
                }
                let tape =
                    training_losses_tape(&s, &param, loss, &x0, &x_t, &t, &eps, &Var::constant(out.clone()));
                let reference = training_losses(
                    &s,
                    &param,
                    loss,
                    &x0.mapv(|v| v as f64),
                    &t,
                    &eps.mapv(|v| v as f64),
                    &ModelOutput::split(out.mapv(|v| v as f64), var),
                )
                .unwrap();
                for (a, b) in tape.loss.value().iter().zip(reference.loss.iter()) {
                    let tol = 2e-3 * b.abs().max(1.0);
                    assert!(
                        (*a as f64 - b).abs() < tol,
                        "{mean_type:?}/{var:?}/{loss:?}: tape {a} vs f64 {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn hybrid_loss_gradients_match_finite_differences_and_stop_the_mean() {
        let (s, x0, x_t, t, eps) = setup(Convention::Ho2020);
        let param = Parameterization { mean_type: MeanType::Eps, variance_type: VarianceType::LearnedRange };
        let out = randn(&[4, 4, 3, 3], 11).mapv(|v| 0.5 * v);
        let f = |v: &[Var]| training_losses_tape(&s, &param, LossType::Vlb, &x0, &x_t, &t, &eps, &v[0]).loss;
        let cfg = GradcheckConfig { eps: 1e-2, rtol: 5e-2, atol: 5e-3, ..Default::default() };
        gradcheck(&[out.clone()], f, &cfg).unwrap();
        // Hybrid: the bound term's gradient reaches only the variance half.
        let tape = crate::Tape::new();
        let o = tape.var(out);
        let l = training_losses_tape(&s, &param, LossType::Hybrid, &x0, &x_t, &t, &eps, &o);
        let g = l.vb.unwrap().sum().backward();
        let g = g.get(&o).unwrap();
        assert!(g.slice(ndarray::s![.., ..2, .., ..]).iter().all(|&v| v == 0.0), "L_vlb reached the mean");
        assert!(
            g.slice(ndarray::s![.., 2.., .., ..]).iter().any(|&v| v != 0.0),
            "L_vlb did not reach the variance"
        );
    }
}
