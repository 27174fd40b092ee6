//! Known values from outside this crate, each with the script or formula that produced it.
//!
//! "numpy" below means numpy 2.4 float64 running the table definitions of Ho et al.'s
//! `diffusion_tf/diffusion_utils_2.py` / improved-diffusion's `gaussian_diffusion.py`, e.g.
//!
//! ```python
//! b = np.linspace(1e-4, 0.02, 1000); ab = np.cumprod(1 - b); abp = np.append(1.0, ab[:-1])
//! pv = b * (1 - abp) / (1 - ab); plvc = np.log(np.append(pv[1], pv[1:]))
//! ```
//!
//! printed with `repr()`.

use ddpm::diffusion::convention::{Convention, Conventions, NormalCdf};
use ddpm::diffusion::losses::{discretized_gaussian_log_likelihood, normal_kl_scalar, prior_bpd};
use ddpm::diffusion::schedule::{BetaSchedule, NoiseSchedule};
use ndarray::{arr1, ArrayD};

fn rel(a: f64, b: f64) -> f64 {
    ((a - b) / b).abs()
}

#[test]
fn linear_schedule_t1000_tables_match_numpy() {
    let s = NoiseSchedule::new(&BetaSchedule::Linear, 1000, Conventions::default()).expect("valid");
    // numpy: ab[999], pv[487], plvc[0] (see the module docs).
    assert!(rel(s.alpha_bar()[999], 4.035829765375676e-05) < 1e-12);
    assert!(rel(s.beta_tilde()[487], 0.00979157198569004) < 1e-13);
    assert!(rel(s.log_beta_tilde_clipped()[0], -9.81672513529567) < 1e-14);
    // The rounded values quoted in issue 3: ᾱ_1000 ≈ 4.0358e-5, β̃[487] ≈ 0.0097916,
    // clipped log β̃[0] ≈ −9.8167251.
    assert!((s.alpha_bar()[999] - 4.0358e-5).abs() < 5e-10);
    assert!((s.beta_tilde()[487] - 0.0097916).abs() < 5e-8);
    assert!((s.log_beta_tilde_clipped()[0] + 9.8167251).abs() < 5e-8);
}

#[test]
fn improved_diffusion_rescaled_linear_t100_matches_numpy() {
    // numpy: bb = np.linspace(10 * 1e-4, 10 * 0.02, 100); np.cumprod(1 - bb)[-1]
    // (improved-diffusion's get_named_beta_schedule("linear", 100)).
    let s = NoiseSchedule::new(&BetaSchedule::Linear, 100, Convention::ImprovedDiffusion.settings())
        .expect("valid");
    assert!(rel(s.alpha_bar()[99], 2.039008975564078e-05) < 1e-12);
}

#[test]
fn kl_of_n11_from_n01_is_half_a_nat() {
    // Closed form: KL(N(μ₁,σ²) ‖ N(μ₂,σ²)) = (μ₁ − μ₂)²/(2σ²) = 1/2 for μ₁ = 1, μ₂ = 0, σ = 1.
    assert_eq!(normal_kl_scalar(1.0, 0.0, 0.0, 0.0), 0.5);
}

#[test]
fn prior_bpd_at_x0_one_matches_numpy() {
    // numpy: m = np.sqrt(ab[-1]); lv = np.log(1 - ab[-1])
    //        0.5 * (-1 + 0 - lv + np.exp(lv) + m**2) / np.log(2)   (improved-diffusion's _prior_bpd)
    let s = NoiseSchedule::new(&BetaSchedule::Linear, 1000, Conventions::default()).expect("valid");
    let bpd = prior_bpd(&s, &ArrayD::from_elem(vec![1, 3], 1.0));
    assert!(rel(bpd[0], 2.9112945420286456e-05) < 1e-9, "{}", bpd[0]);
}

#[test]
fn discretized_decoder_matches_the_reference_formula_in_numpy() {
    // numpy port of discretized_gaussian_log_likelihood (improved-diffusion losses.py) at
    //   x = [-1, 0, 1, 10/127.5 - 1], means = [-0.99, 0.003, 0.95, -0.9],
    //   log_scales = log([0.01, 0.005, 0.1, 0.02]);
    // tanh: approx_standard_normal_cdf as in the reference; erf: 0.5 * math.erfc(-x / sqrt(2)).
    let x = arr1(&[-1.0, 0.0, 1.0, 10.0 / 127.5 - 1.0]).into_dyn();
    let means = arr1(&[-0.99, 0.003, 0.95, -0.9]).into_dyn();
    let log_scales = arr1(&[0.01f64.ln(), 0.005f64.ln(), 0.1f64.ln(), 0.02f64.ln()]).into_dyn();
    let tanh = [-1.3030478534948324, -0.713728438161726, -1.131638553734934, -2.436124205465491];
    let erf = [-1.303256421817628, -0.7133802557830163, -1.1317244601855254, -2.435527087397456];
    let got_tanh = discretized_gaussian_log_likelihood(&x, &means, &log_scales, NormalCdf::TanhApprox);
    let got_erf = discretized_gaussian_log_likelihood(&x, &means, &log_scales, NormalCdf::Erf);
    for k in 0..4 {
        assert!(rel(got_tanh[k], tanh[k]) < 1e-12, "tanh {k}: {} vs {}", got_tanh[k], tanh[k]);
        assert!(rel(got_erf[k], erf[k]) < 1e-12, "erf {k}: {} vs {}", got_erf[k], erf[k]);
    }
}
