//! Property tests that check the derivation of DDPM (Ho et al. 2020, arXiv:2006.11239), not the
//! code against itself: each expected value is rebuilt here from β alone with the textbook rule
//! the paper uses (composing Gaussians, Bayes' rule in natural parameters, Eq. 11, Eq. 12, the
//! closed-form KL), then compared with what the library computes from its tables.
//! docs/derivation.md links every step to the test that checks it.

use ddpm::diffusion::convention::{Convention, Conventions, NormalCdf};
use ddpm::diffusion::gaussian::{
    p_mean_variance, q_mean_variance, q_posterior_mean_variance, q_step_mean_variance, MeanType, ModelOutput,
    Parameterization, VarianceType,
};
use ddpm::diffusion::losses::{
    decoder_bin_probabilities, normal_kl, normal_kl_scalar, prior_bpd, vb_terms_bpd, DECODER_BINS,
};
use ddpm::diffusion::normal::TANH_CDF_MAX_ABS_ERROR;
use ddpm::diffusion::schedule::{cosine_alpha_bar_closed_form, BetaSchedule, NoiseSchedule, COSINE_MAX_BETA};
use ddpm::rng_from_seed;
use ndarray::ArrayD;
use proptest::prelude::*;
use rand::Rng as _;
use rand_distr::StandardNormal;

/// A valid β sequence of length 2 … 40 with β ∈ [1e-4, 0.3].
fn betas() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(1e-4f64..0.3, 2..40)
}

/// ᾱ_t = ∏_{s≤t}(1 − β_s), computed here from β alone (Ho §3.2).
fn alpha_bar_from(betas: &[f64]) -> Vec<f64> {
    betas
        .iter()
        .scan(1.0, |acc, b| {
            *acc *= 1.0 - b;
            Some(*acc)
        })
        .collect()
}

fn schedule_from(betas: &[f64]) -> NoiseSchedule {
    NoiseSchedule::from_betas(betas.to_vec(), Conventions::default()).expect("β in (0, 1)")
}

fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    (a - b).abs() <= abs + rel * b.abs()
}

/// One sample of shape [1, 1] holding `v`.
fn one(v: f64) -> ArrayD<f64> {
    ArrayD::from_elem(vec![1, 1], v)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Composing q(x_t | x_{t−1}) = N(√(1−β_t) x_{t−1}, β_t) (Eq. 2) step by step: if
    /// x_{t−1} ~ N(m, v) then x_t ~ N(a m, a² v + β_t) with a the kernel's mean factor. Starting
    /// from the point x_0 (v = 0), this must give q(x_t | x_0) = N(√ᾱ_t x_0, 1 − ᾱ_t) (Eq. 4) at
    /// every t.
    #[test]
    fn composing_one_step_kernels_gives_the_closed_form_at_every_t(betas in betas(), x0 in -1.0f64..1.0) {
        let s = schedule_from(&betas);
        let (mut m, mut v) = (x0, 0.0);
        for i in 0..betas.len() {
            let kernel_at_one = q_step_mean_variance(&s, &one(1.0), &[i]);
            let a = kernel_at_one.mean[[0, 0]];
            let beta = kernel_at_one.variance[[0, 0]];
            m *= a;
            v = a * a * v + beta;
            let closed = q_mean_variance(&s, &one(x0), &[i]);
            prop_assert!(close(closed.mean[[0, 0]], m, 1e-12, 1e-15), "mean at {i}: {} vs {m}", closed.mean[[0, 0]]);
            prop_assert!(close(closed.variance[[0, 0]], v, 1e-12, 1e-15), "variance at {i}: {} vs {v}", closed.variance[[0, 0]]);
            prop_assert!(close(closed.log_variance[[0, 0]], v.ln(), 1e-12, 1e-12));
        }
    }

    /// Bayes' rule in natural parameters: q(x_{t−1} | x_t, x_0) ∝ q(x_t | x_{t−1}) q(x_{t−1} | x_0)
    /// with q(x_{t−1} | x_0) = N(√ᾱ_{t−1} x_0, 1 − ᾱ_{t−1}) and, as a function of x_{t−1},
    /// q(x_t | x_{t−1}) contributing precision α_t/β_t and linear term √α_t x_t/β_t. The posterior
    /// precision is the sum of precisions and its mean the summed linear terms over it; this
    /// must equal μ̃_t and β̃_t of Eqs. (6)–(7). At the first step x_{t−1} = x_0 exactly.
    #[test]
    fn posterior_from_bayes_rule_equals_mu_tilde_and_beta_tilde(
        betas in betas(), x0 in -1.0f64..1.0, x_t in -3.0f64..3.0, pick in 0.0f64..1.0
    ) {
        let s = schedule_from(&betas);
        let ab = alpha_bar_from(&betas);
        let i = ((pick * betas.len() as f64) as usize).min(betas.len() - 1);
        let post = q_posterior_mean_variance(&s, &one(x0), &one(x_t), &[i]);
        let (mean, var) = (post.mean[[0, 0]], post.variance[[0, 0]]);
        if i == 0 {
            prop_assert!(close(mean, x0, 1e-12, 1e-14) && var == 0.0, "first step: {mean}, {var}");
        } else {
            let (alpha, beta, ab_prev) = (1.0 - betas[i], betas[i], ab[i - 1]);
            let precision = 1.0 / (1.0 - ab_prev) + alpha / beta;
            let linear = ab_prev.sqrt() * x0 / (1.0 - ab_prev) + alpha.sqrt() * x_t / beta;
            prop_assert!(close(var, 1.0 / precision, 1e-10, 0.0), "variance {var} vs {}", 1.0 / precision);
            prop_assert!(close(mean, linear / precision, 1e-9, 1e-12), "mean {mean} vs {}", linear / precision);
        }
    }

    /// Eq. (11): with ε-prediction the model mean is μ_θ = (x_t − β_t/√(1−ᾱ_t) ε_θ)/√α_t,
    /// whatever the fixed variance, at every step (at t = 1 it reduces to x̂_0).
    #[test]
    fn mean_from_eps_is_equation_11(betas in betas(), x_t in -3.0f64..3.0, eps in -3.0f64..3.0, pick in 0.0f64..1.0) {
        let s = schedule_from(&betas);
        let ab = alpha_bar_from(&betas);
        let i = ((pick * betas.len() as f64) as usize).min(betas.len() - 1);
        let want = (x_t - betas[i] / (1.0 - ab[i]).sqrt() * eps) / (1.0 - betas[i]).sqrt();
        for variance_type in [VarianceType::FixedSmall, VarianceType::FixedLarge] {
            let param = Parameterization { mean_type: MeanType::Eps, variance_type };
            let out = ModelOutput { prediction: one(eps), variance_values: None };
            let got = p_mean_variance(&s, &param, &one(x_t), &[i], &out, false).mean[[0, 0]];
            prop_assert!(close(got, want, 1e-9, 1e-11), "{variance_type:?} at {i}: {got} vs {want}");
        }
    }

    /// KL(p‖q) ≥ 0 and KL(p‖p) = 0 (to rounding) for any two 1-D Gaussians, elementwise too.
    #[test]
    fn kl_is_nonnegative_and_zero_only_against_itself(
        m1 in -5.0f64..5.0, v1 in -6.0f64..3.0, m2 in -5.0f64..5.0, v2 in -6.0f64..3.0
    ) {
        prop_assert!(normal_kl_scalar(m1, v1, m2, v2) >= -1e-15);
        // ½(−1 + v − v + e⁰) is 0 up to the rounding of (−1 + v) − v.
        prop_assert!(normal_kl_scalar(m1, v1, m1, v1).abs() <= 1e-15 * (1.0 + v1.abs()));
        let a = |v: f64| ArrayD::from_elem(vec![2, 3], v);
        let kl = normal_kl(&a(m1), &a(v1), &a(m2), &a(v2));
        prop_assert!(kl.iter().all(|&k| k == normal_kl_scalar(m1, v1, m2, v2)));
    }

    /// The discretized decoder of Eq. (13) is a distribution over the 256 bins: with the exact CDF
    /// the bins sum to 1 up to rounding. The tanh CDF is itself a valid CDF, so its bins also
    /// sum to 1, and each bin is within 2 × 1.8e-4 (twice the approximation's largest error,
    /// a bin being a difference of two CDF values) of the exact one.
    #[test]
    fn decoder_bins_sum_to_one_and_tanh_stays_within_its_error(mean in -1.5f64..1.5, log_scale in -7.0f64..0.7) {
        let exact = decoder_bin_probabilities(mean, log_scale, NormalCdf::Erf);
        let tanh = decoder_bin_probabilities(mean, log_scale, NormalCdf::TanhApprox);
        prop_assert_eq!(exact.len(), DECODER_BINS);
        prop_assert!((exact.sum() - 1.0).abs() < 1e-12, "exact sum {}", exact.sum());
        prop_assert!((tanh.sum() - 1.0).abs() < 1e-12, "tanh sum {}", tanh.sum());
        prop_assert!(exact.iter().chain(tanh.iter()).all(|&p| p >= 0.0));
        for k in 0..DECODER_BINS {
            prop_assert!((tanh[k] - exact[k]).abs() <= 2.0 * TANH_CDF_MAX_ABS_ERROR, "bin {k}: {} vs {}", tanh[k], exact[k]);
        }
    }

    /// Eq. (12): for ε-prediction with a fixed σ_t², L_{t−1} (t > 1) equals
    /// Σ_d β_t²/(2σ_t² α_t (1−ᾱ_t)) (ε − ε_θ)² plus the θ-free constant
    /// C = D·½(log(σ_t²/β̃_t) − 1 + β̃_t/σ_t²) (the variance part of the Gaussian KL, Eq. 8's C).
    #[test]
    fn l_t_minus_1_for_eps_prediction_is_the_weighted_squared_error_of_eq_12(
        betas in betas(), pick in 0.0f64..1.0, seed in 0u64..1000, scale in 0.0f64..1.0
    ) {
        let s = schedule_from(&betas);
        let ab = alpha_bar_from(&betas);
        let i = 1 + ((pick * (betas.len() - 1) as f64) as usize).min(betas.len() - 2);
        let mut rng = rng_from_seed(seed);
        let d = 6;
        let x0 = ArrayD::from_shape_simple_fn(vec![1, d], || f64::from(rng.random_range(0..=255u32)) / 127.5 - 1.0);
        let eps = ArrayD::from_shape_simple_fn(vec![1, d], || rng.sample::<f64, _>(StandardNormal));
        let eps_pred = &eps + &ArrayD::from_shape_simple_fn(vec![1, d], || scale * rng.sample::<f64, _>(StandardNormal));
        let x_t = &x0 * ab[i].sqrt() + &eps * (1.0 - ab[i]).sqrt();
        let (alpha, beta) = (1.0 - betas[i], betas[i]);
        let beta_tilde = (1.0 - ab[i - 1]) / (1.0 - ab[i]) * beta;
        let sq_err: f64 = eps.iter().zip(&eps_pred).map(|(e, p)| (e - p).powi(2)).sum();
        for (variance_type, sigma2) in [(VarianceType::FixedSmall, beta_tilde), (VarianceType::FixedLarge, beta)] {
            let param = Parameterization { mean_type: MeanType::Eps, variance_type };
            let out = ModelOutput { prediction: eps_pred.clone(), variance_values: None };
            let vb = vb_terms_bpd(&s, &param, &x0, &x_t, &[i], &out, false);
            let kl_nats = vb.kl_bpd[0] * d as f64 * std::f64::consts::LN_2;
            let weight = beta * beta / (2.0 * sigma2 * alpha * (1.0 - ab[i]));
            let c = d as f64 * 0.5 * ((sigma2 / beta_tilde).ln() - 1.0 + beta_tilde / sigma2);
            let want = weight * sq_err + c;
            prop_assert!(close(kl_nats, want, 1e-7, 1e-10), "{variance_type:?} at {i}: {kl_nats} vs {want}");
            prop_assert_eq!(vb.bpd[0], vb.kl_bpd[0], "the bound uses the KL away from the first step");
        }
    }

    /// L_T = KL(q(x_T | x_0) ‖ N(0, I)) is below 1e-4 bits/dim for the linear schedule of Ho et al.
    /// (T = 1000) for every x_0 in [−1, 1] (it grows with |x_0|; at x_0 = ±1 it is 2.9e-5).
    #[test]
    fn prior_term_is_below_1e4_bits_per_dim_for_the_linear_schedule(seed in 0u64..10_000) {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 1000, Conventions::default()).expect("valid");
        let mut rng = rng_from_seed(seed);
        let x0 = ArrayD::from_shape_simple_fn(vec![4, 3, 2, 2], || f64::from(rng.random_range(0..=255u32)) / 127.5 - 1.0);
        prop_assert!(prior_bpd(&s, &x0).iter().all(|&b| (0.0..1e-4).contains(&b)));
    }

    /// The cosine schedule's ᾱ follows f(t)/f(0), f(t) = cos²((t/T + s)/(1+s) · π/2)
    /// (Nichol & Dhariwal Eq. 17), at every step up to the first β capped at 0.999.
    #[test]
    fn cosine_alpha_bar_follows_its_closed_form_where_beta_is_not_capped(timesteps in 2usize..2000) {
        let s = NoiseSchedule::new(&BetaSchedule::Cosine, timesteps, Conventions::default()).expect("valid");
        for i in 0..timesteps {
            if s.betas()[i] >= COSINE_MAX_BETA {
                break;
            }
            let want = cosine_alpha_bar_closed_form((i + 1) as f64, timesteps);
            prop_assert!(close(s.alpha_bar()[i], want, 1e-10, 0.0), "T={timesteps} i={i}: {} vs {want}", s.alpha_bar()[i]);
        }
    }
}

/// KL(N(μ₁,σ₁²) ‖ N(μ₂,σ₂²)) against a Monte-Carlo estimate E_{x∼p}[log p(x) − log q(x)] with a
/// seeded RNG. The tolerance is 5 standard errors of the estimate (the sample standard deviation
/// of the log-ratio over √n), so a correct KL fails with probability below 1e-6 per case.
#[test]
fn kl_agrees_with_a_monte_carlo_estimate_within_five_standard_errors() {
    let cases: [(f64, f64, f64, f64); 4] =
        [(0.0, 0.0, 1.0, 0.0), (0.3, -1.0, -0.2, 0.5), (1.5, 0.7, 0.0, -0.3), (-2.0, -3.0, -1.0, -2.0)];
    let mut rng = rng_from_seed(7);
    let n = 200_000;
    for (m1, v1, m2, v2) in cases {
        let s1 = (0.5 * v1).exp();
        let log_density = |x: f64, m: f64, v: f64| {
            -0.5 * ((x - m).powi(2) / v.exp() + v + (2.0 * std::f64::consts::PI).ln())
        };
        let (mut sum, mut sum_sq) = (0.0, 0.0);
        for _ in 0..n {
            let x = m1 + s1 * rng.sample::<f64, _>(StandardNormal);
            let r = log_density(x, m1, v1) - log_density(x, m2, v2);
            sum += r;
            sum_sq += r * r;
        }
        let mean = sum / n as f64;
        let se = ((sum_sq / n as f64 - mean * mean) / n as f64).sqrt();
        let kl = normal_kl_scalar(m1, v1, m2, v2);
        assert!(
            (mean - kl).abs() < 5.0 * se.max(1e-12),
            "KL {kl} vs MC {mean} ± {se} for {:?}",
            (m1, v1, m2, v2)
        );
    }
}

/// The first-step conventions change only index 0 of the log-variance tables (with the tables'
/// precision held at f64: diffusers' f32 tables move every entry a little).
#[test]
fn conventions_change_only_the_first_step_of_the_log_variances() {
    use ddpm::diffusion::convention::TablePrecision;
    let a = NoiseSchedule::new(&BetaSchedule::Linear, 100, Convention::Ho2020.settings()).expect("valid");
    let diffusers_f64 = ddpm::diffusion::Conventions {
        table_precision: TablePrecision::Float64,
        ..Convention::Diffusers.settings()
    };
    let b = NoiseSchedule::new(&BetaSchedule::Linear, 100, diffusers_f64).expect("valid");
    assert_ne!(a.log_beta_tilde_clipped()[0], b.log_beta_tilde_clipped()[0]);
    assert_ne!(a.fixed_large_log_variance()[0], b.fixed_large_log_variance()[0]);
    for i in 1..100 {
        assert_eq!(a.log_beta_tilde_clipped()[i], b.log_beta_tilde_clipped()[i]);
        assert_eq!(a.fixed_large_log_variance()[i], b.fixed_large_log_variance()[i]);
    }
}
