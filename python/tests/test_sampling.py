"""ddpm.sample and calc_bpd_loop driven by Python callables, and ddpm.testing's messages."""

import numpy as np
import pytest

import ddpm
from ddpm.testing import assert_arrays_match, assert_schedule_matches


def test_samplers_are_seeded_and_trace_what_they_return():
    s = ddpm.Schedule(timesteps=20)
    model = lambda x, t: 0.3 * x  # noqa: E731
    for sampler, steps in [("ancestral", None), ("ddim", 5), ("dpm++2m", 5), ("euler", 4)]:
        a = ddpm.sample(model, [2, 1, 3, 3], s, sampler=sampler, steps=steps, seed=1)
        b = ddpm.sample(model, [2, 1, 3, 3], s, sampler=sampler, steps=steps, seed=1)
        c = ddpm.sample(model, [2, 1, 3, 3], s, sampler=sampler, steps=steps, seed=2)
        assert a.shape == (2, 1, 3, 3) and np.array_equal(a, b) and not np.array_equal(a, c), sampler
        tr = ddpm.sample(model, [2, 1, 3, 3], s, sampler=sampler, steps=steps, seed=1, trace=True)
        assert np.array_equal(tr["x_0"], a), sampler
        evals = sorted(k.split(".")[0] for k in tr if k.endswith(".x_t"))
        assert len(evals) == (20 if steps is None else steps), sampler


def test_the_model_is_given_the_networks_timesteps():
    seen = []

    def model(x, t):
        seen.append(np.array(t))
        return np.zeros_like(x)

    ddpm.sample(model, [3, 1, 2, 2], ddpm.Schedule(timesteps=10), sampler="ancestral")
    assert [int(t[0]) for t in seen] == list(range(9, -1, -1))
    assert all(t.dtype == np.int64 and t.shape == (3,) for t in seen)
    seen.clear()
    ddpm.Schedule(timesteps=10).calc_bpd_loop(model, np.zeros((2, 1, 2, 2)))
    assert [int(t[0]) for t in seen] == list(range(9, -1, -1))
    # improved-diffusion rescales the network's timestep to [0, 1000) for other T.
    seen.clear()
    ddpm.Schedule(timesteps=100, convention="improved-diffusion").calc_bpd_loop(model, np.zeros((1, 1, 2, 2)))
    assert [float(t[0]) for t in seen] == [10.0 * k for k in range(99, -1, -1)]


def test_learned_variance_models_give_twice_the_channels():
    s = ddpm.Schedule(timesteps=10)
    x0 = np.full((2, 3, 2, 2), 0.5)

    def model(x, t):
        return np.concatenate([np.zeros_like(x), np.zeros_like(x)], axis=1)

    r = s.calc_bpd_loop(model, x0, var_type="learned_range")
    assert r["vb"].shape == (2, 10) and np.all(np.isfinite(r["total_bpd"]))


def test_assertions_name_the_first_mismatch():
    ref = {"a": np.arange(6.0).reshape(2, 3), "b": np.ones(2)}
    assert assert_arrays_match(ref, {k: v.copy() for k, v in ref.items()})["passed"]
    bad = {"a": ref["a"].copy(), "b": ref["b"].copy()}
    bad["a"][1, 2] += 0.1
    with pytest.raises(AssertionError, match=r"a: first mismatch at index \(1, 2\): reference 5\.0, candidate 5\.1"):
        assert_arrays_match(ref, bad)
    with pytest.raises(AssertionError, match="b: shapes differ"):
        assert_arrays_match(ref, {"a": ref["a"], "b": np.ones(3)})
    s = ddpm.Schedule()
    assert_schedule_matches(s, {"betas": np.linspace(1e-4, 0.02, 1000), "alphas_cumprod": s.alphas_cumprod})
    wrong = s.posterior_variance.copy()
    wrong[17] *= 1.001
    with pytest.raises(AssertionError, match=r"posterior_variance: first mismatch at index \(17,\)"):
        assert_schedule_matches(s, {"posterior_variance": wrong})
    with pytest.raises(ValueError, match="none of"):
        assert_schedule_matches(s, {"sigmas": wrong})
