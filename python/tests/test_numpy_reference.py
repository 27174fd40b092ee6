"""The bindings against an independent numpy implementation written here from the paper's
formulas (Ho, Jain & Abbeel 2020, arXiv:2006.11239; equation numbers in the comments)."""

import math

import numpy as np
import pytest

import ddpm

T = 1000


def linear_betas(t=T):
    # §4: β_1 = 1e-4 rising linearly to β_T = 0.02.
    return np.linspace(1e-4, 0.02, t, dtype=np.float64)


def tables(betas):
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)  # ᾱ_t = Π_{s ≤ t} α_s (§2)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)  # β̃_t, Eq. (7)
    return {
        "betas": betas,
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": ab_prev,
        "sqrt_alphas_cumprod": np.sqrt(ab),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ab),
        "posterior_variance": post_var,
        # β̃_1 = 0: its log is taken at the second step, as the authors' code does.
        "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "posterior_mean_coef1": np.sqrt(ab_prev) * betas / (1.0 - ab),  # Eq. (7)
        "posterior_mean_coef2": np.sqrt(alphas) * (1.0 - ab_prev) / (1.0 - ab),
    }


def per_image(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def approx_cdf(x):
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def decoder_nll(x0, mean, log_var):
    # Eq. (13): the 8-bit bin of x_0 under N(mean, σ²), the edges open at ±1.
    inv = np.exp(-0.5 * log_var)
    cdf_plus = approx_cdf(inv * (x0 - mean + 1.0 / 255))
    cdf_minus = approx_cdf(inv * (x0 - mean - 1.0 / 255))
    p = np.where(x0 < -0.999, cdf_plus, np.where(x0 > 0.999, 1.0 - cdf_minus, cdf_plus - cdf_minus))
    return -np.log(np.maximum(p, 1e-12))


@pytest.fixture
def batch():
    rng = np.random.default_rng(7)
    x0 = rng.integers(0, 256, size=(5, 3, 4, 4)) / 127.5 - 1.0
    t = np.array([0, 1, 500, 999, 250])
    noise = rng.standard_normal(x0.shape)
    return x0, t, noise, 0.9 * noise + 0.1 * rng.standard_normal(x0.shape)


def test_tables_follow_the_paper():
    s = ddpm.Schedule("linear", T, "ho2020")
    for name, value in tables(linear_betas()).items():
        np.testing.assert_allclose(getattr(s, name), value, rtol=1e-12, atol=0, err_msg=name)


def test_forward_posterior_mean_and_reverse_mean(batch):
    x0, t, noise, eps_hat = batch
    s, ref = ddpm.Schedule("linear", T, "ho2020"), tables(linear_betas())
    a = lambda name: per_image(ref[name][t], x0)  # noqa: E731
    x_t = a("sqrt_alphas_cumprod") * x0 + a("sqrt_one_minus_alphas_cumprod") * noise  # Eq. (4)
    np.testing.assert_allclose(s.q_sample(x0, t, noise), x_t, rtol=1e-12, atol=1e-14)
    mean, var, log_var = s.q_posterior_mean_variance(x0, x_t, t)
    np.testing.assert_allclose(mean, a("posterior_mean_coef1") * x0 + a("posterior_mean_coef2") * x_t, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var, np.broadcast_to(a("posterior_variance"), x0.shape), rtol=1e-12)
    np.testing.assert_allclose(log_var, np.broadcast_to(a("posterior_log_variance_clipped"), x0.shape), rtol=1e-12)
    # Eq. (11): μ_θ = (x_t − β_t/√(1−ᾱ_t) ε_θ)/√α_t, without clipping x̂_0.
    alphas = 1.0 - linear_betas()
    mu = (x_t - per_image(linear_betas()[t] / np.sqrt(1 - ref["alphas_cumprod"][t]), x0) * eps_hat) / per_image(np.sqrt(alphas[t]), x0)
    p = s.p_mean_variance(eps_hat, x_t, t, clip_denoised=False)
    np.testing.assert_allclose(p["mean"], mu, rtol=1e-9, atol=1e-12)
    x0_hat = (x_t - a("sqrt_one_minus_alphas_cumprod") * eps_hat) / a("sqrt_alphas_cumprod")
    np.testing.assert_allclose(p["pred_xstart"], x0_hat, rtol=1e-10, atol=1e-12)


def test_bound_terms_and_prior(batch):
    x0, t, noise, eps_hat = batch
    s, ref = ddpm.Schedule("linear", T, "ho2020"), tables(linear_betas())
    a = lambda name: per_image(ref[name][t], x0)  # noqa: E731
    x_t = s.q_sample(x0, t, noise)
    vb = s.vb_terms_bpd(eps_hat, x0, x_t, t, var_type="fixedsmall", clip_denoised=True)
    p = s.p_mean_variance(eps_hat, x_t, t, var_type="fixedsmall", clip_denoised=True)
    q_mean = a("posterior_mean_coef1") * x0 + a("posterior_mean_coef2") * x_t
    q_lv = np.broadcast_to(a("posterior_log_variance_clipped"), x0.shape)
    kl = normal_kl(q_mean, q_lv, p["mean"], p["log_variance"]).mean(axis=(1, 2, 3)) / math.log(2)  # Eq. (5)
    nll = decoder_nll(x0, p["mean"], p["log_variance"]).mean(axis=(1, 2, 3)) / math.log(2)
    expected = np.where(t == 0, nll, kl)
    np.testing.assert_allclose(vb["output"], expected, rtol=1e-9, atol=1e-12)
    # L_T = KL(q(x_T|x_0) ‖ N(0, I)).
    ab_T = ref["alphas_cumprod"][-1]
    prior = normal_kl(math.sqrt(ab_T) * x0, math.log(1 - ab_T), 0.0, 0.0).mean(axis=(1, 2, 3)) / math.log(2)
    np.testing.assert_allclose(s.prior_bpd(x0), prior, rtol=1e-10, atol=1e-15)


def test_the_bound_of_the_true_noise_is_known_in_closed_form():
    # One data point: the true ε is a function of x_t, so the model's mean is the posterior mean
    # and only the variances differ: with σ_t² = β̃_t every KL is 0, L_0 is the decoder at x_0.
    T_ = 100
    s = ddpm.Schedule("linear", T_, "ho2020")
    ref = tables(s.betas)  # the closed form is about the bound, whatever the β
    rng = np.random.default_rng(1)
    x0 = rng.integers(0, 256, size=(1, 1, 3, 3)) / 127.5 - 1.0

    def true_eps(x_t, t):
        ab = ref["alphas_cumprod"][np.asarray(t)]
        return (x_t - per_image(np.sqrt(ab), x_t) * x0) / per_image(np.sqrt(1 - ab), x_t)

    oracle = ddpm.Oracle(x0)
    for var in ["fixedsmall", "fixedlarge"]:
        r = s.calc_bpd_loop(true_eps, x0, var_type=var)
        via_oracle = s.calc_bpd_loop(lambda x, t: oracle.eps(s, x, t), x0, var_type=var)
        for key in ["total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"]:
            np.testing.assert_allclose(r[key], via_oracle[key], rtol=1e-9, atol=1e-12, err_msg=f"{var} {key}")
        lv = np.log(ref["posterior_variance"][1:]) if var == "fixedsmall" else np.log(ref["betas"][1:])
        if var == "fixedlarge":  # the authors' code uses β̃ at the first step
            lv0 = np.log(ref["posterior_variance"][1])
        else:
            lv0 = ref["posterior_log_variance_clipped"][0]
        kls = normal_kl(0.0, ref["posterior_log_variance_clipped"][1:], 0.0, lv) / math.log(2)
        l0 = decoder_nll(x0, x0, lv0).mean() / math.log(2)
        ab_T = ref["alphas_cumprod"][-1]
        prior = normal_kl(math.sqrt(ab_T) * x0, math.log(1 - ab_T), 0.0, 0.0).mean() / math.log(2)
        np.testing.assert_allclose(r["vb"][0, 1:], kls, rtol=1e-7, atol=1e-12, err_msg=var)
        np.testing.assert_allclose(r["vb"][0, 0], l0, rtol=1e-7, err_msg=var)
        np.testing.assert_allclose(r["total_bpd"][0], prior + kls.sum() + l0, rtol=1e-9, err_msg=var)
        np.testing.assert_allclose(r["xstart_mse"], 0.0, atol=1e-20)
