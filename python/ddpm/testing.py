"""Assertions for other implementations' test suites: each failure names the first mismatching
entry, its index and both values, then prints the whole ``ddpm compare`` table.

- ``assert_arrays_match(reference, candidate, rtol, atol)``: dicts of arrays or .npz paths.
- ``assert_schedule_matches(schedule, tables)``: a ``ddpm.Schedule`` against your tables
  (e.g. the attributes of an improved-diffusion ``GaussianDiffusion``).
- ``assert_scheduler_matches(scheduler, ...)``: a diffusers ``DDPMScheduler`` driven through a
  whole sampling run beside ddpm's ancestral step, from the same input, model output and noise
  at every step (needs torch).
"""

import numpy as np

from . import Schedule, compare

__all__ = ["assert_arrays_match", "assert_schedule_matches", "assert_scheduler_matches"]


def _as_dict(arrays):
    if isinstance(arrays, dict):
        return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    with np.load(arrays) as f:
        return {k: np.asarray(f[k], dtype=np.float64) for k in f.files}


def _first_mismatch(ref, cand, rtol, atol):
    """The index of the first element of ``cand`` outside tolerance of ``ref``, or None."""
    both_nan = np.isnan(ref) & np.isnan(cand)
    ok = np.isclose(cand, ref, rtol=rtol, atol=atol, equal_nan=False) | both_nan
    bad = np.argwhere(~ok)
    return None if bad.size == 0 else tuple(int(i) for i in bad[0])


def assert_arrays_match(reference, candidate, rtol=1e-5, atol=1e-8, only=None):
    """Asserts every array of ``candidate`` matches ``reference`` (dicts or .npz paths) within
    ``|cand - ref| <= atol + rtol * |ref|``. Returns the report when they do; otherwise raises
    AssertionError naming the first failing entry and, for values, the first index that differs.
    """
    report = compare(reference, candidate, rtol=rtol, atol=atol, only=only)
    if report["passed"]:
        return report
    failing = [e for e in report["entries"] if not e["passed"]]
    e = failing[0]
    name = e["name"]
    if e["status"].startswith("MISMATCH (") and "shape" not in e["status"]:
        ref = _as_dict(reference)[name]
        cand = _as_dict(candidate)[name]
        idx = _first_mismatch(ref, cand, rtol, atol)
        r, c = float(ref[idx]), float(cand[idx])
        head = (
            f"{name}: first mismatch at index {idx}: reference {r!r}, candidate {c!r} "
            f"(|diff| {abs(c - r):.3e} > allowed {atol + rtol * abs(r):.3e}); "
            f"{e['mismatched']} of {ref.size} elements differ"
        )
    elif "shape" in e["status"]:
        head = f"{name}: shapes differ: reference {e['reference_shape']}, candidate {e['candidate_shape']}"
    else:
        head = f"{name}: {e['status']}"
    others = len(failing) - 1
    tail = f" (and {others} more failing entr{'y' if others == 1 else 'ies'})" if others else ""
    raise AssertionError(f"{head}{tail}\n\n{report['table']}")


def assert_schedule_matches(schedule, tables, rtol=1e-12, atol=0.0):
    """Asserts that the tables in ``tables`` (name -> array, improved-diffusion's names, e.g.
    ``vars(gaussian_diffusion)``) equal ``schedule``'s. Only names both have are compared; at
    least one must be shared."""
    ours = schedule.tables()
    shared = [n for n in tables if n in ours]
    if not shared:
        raise ValueError(f"none of {sorted(tables)} is a table of ddpm.Schedule; expected names like {sorted(ours)[:4]}")
    return assert_arrays_match(
        {n: ours[n] for n in shared},
        {n: np.asarray(tables[n], dtype=np.float64) for n in shared},
        rtol=rtol,
        atol=atol,
    )


_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_VARIANCE = {"fixed_small": "fixedsmall", "fixed_large": "fixedlarge"}


def _default_model(x, t):
    """A fixed stand-in network: smooth in x, different at every t."""
    return np.tanh(x) * 0.5 + 0.01 * np.sin(np.asarray(t, dtype=np.float64) / 37.0).reshape(-1, *([1] * (x.ndim - 1)))


def _respaced(base, timesteps):
    """ddpm's schedule on the ascending subset ``timesteps`` of ``base``'s steps: ᾱ'_i = ᾱ at
    timesteps[i], β'_i = 1 - ᾱ'_i / ᾱ'_{i-1}."""
    ab = base.alphas_cumprod[np.asarray(timesteps)]
    prev = np.concatenate([[1.0], ab[:-1]])
    return Schedule(betas=1.0 - ab / prev, convention=base.convention)


def assert_scheduler_matches(
    scheduler, schedule=None, steps=None, shape=(2, 3, 8, 8), seed=0, model=None, rtol=1e-4, atol=1e-5
):
    """Drives a diffusers ``DDPMScheduler`` through a whole sampling run and checks every step
    against ddpm's ancestral step (Ho et al. Algorithm 2) from the same x_t, model output and
    noise: x_{t-1} = μ_θ(x_t, t) + σ_t z.

    ``schedule``: the ddpm schedule to hold it against (default: the scheduler's own β with
    ddpm's ``diffusers`` convention); ``steps``: inference steps (default: all T), ddpm's
    schedule then respaced to the same timesteps; ``model``: a callable ``(x, t) -> array`` on
    numpy arrays (default: a fixed smooth function). The prediction type, variance type and
    clipping come from the scheduler's config. Raises AssertionError at the first step that
    differs, naming the step, t and the first index. Needs torch.
    """
    import torch

    config = scheduler.config
    if type(scheduler).__name__ != "DDPMScheduler":
        raise TypeError(f"assert_scheduler_matches drives a DDPMScheduler, not a {type(scheduler).__name__}")
    mean_type = _PREDICTION.get(config.prediction_type)
    var_type = _VARIANCE.get(config.variance_type)
    if mean_type is None or var_type is None:
        raise ValueError(
            f"prediction_type {config.prediction_type!r} / variance_type {config.variance_type!r}: "
            f"supported are {sorted(_PREDICTION)} and {sorted(_VARIANCE)}"
        )
    if getattr(config, "thresholding", False):
        raise ValueError("dynamic thresholding has no counterpart in ddpm; turn it off to compare")
    big_t = config.num_train_timesteps
    base = schedule if schedule is not None else Schedule(
        betas=scheduler.betas.numpy().astype(np.float64), convention="diffusers"
    )
    if base.num_timesteps != big_t:
        raise ValueError(f"the schedule has T = {base.num_timesteps}, the scheduler {big_t}")
    scheduler.set_timesteps(steps if steps is not None else big_t)
    timesteps = [int(t) for t in scheduler.timesteps]
    ascending = sorted(timesteps)
    ours = base if ascending == list(range(big_t)) else _respaced(base, ascending)
    model = model or _default_model
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    n = shape[0]
    for k, t in enumerate(timesteps):
        x_np = x.numpy().astype(np.float64)
        out_np = np.asarray(model(x_np, np.full(n, t)), dtype=np.float64)
        out = torch.from_numpy(out_np).to(torch.float32)
        state = generator.get_state()
        prev = scheduler.step(out, t, x, generator=generator).prev_sample
        noise = torch.randn(shape, generator=torch.Generator().set_state(state), dtype=torch.float32)
        i = ascending.index(t)
        p = ours.p_mean_variance(
            out.numpy().astype(np.float64), x_np, np.full(n, i), mean_type=mean_type, var_type=var_type,
            clip_denoised=bool(config.clip_sample),
        )
        expected = p["mean"] + (np.sqrt(p["variance"]) * noise.numpy() if i > 0 else 0.0)
        got = prev.numpy().astype(np.float64)
        idx = _first_mismatch(expected, got, rtol, atol)
        if idx is not None:
            raise AssertionError(
                f"step {k} (t = {t}, ddpm index {i}): x_(t-1) differs first at index {idx}: "
                f"ddpm {float(expected[idx])!r}, scheduler {float(got[idx])!r} "
                f"(|diff| {abs(got[idx] - expected[idx]):.3e} > allowed {atol + rtol * abs(expected[idx]):.3e})"
            )
        x = prev
    return len(timesteps)
