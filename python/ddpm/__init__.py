"""ddpm: the exact math of Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020),
from the ddpm Rust crate, for holding other implementations against it in their own tests.

Arrays are float64 numpy arrays in and out (anything numpy converts is accepted), timesteps are
int64 code indices 0 … T-1 as in improved-diffusion, and a model is any callable
``model(x_t, t) -> array`` given the network's timesteps. docs/python.md has worked examples.

- ``Schedule``: β and every derived table (improved-diffusion's names), q_sample,
  q_posterior_mean_variance, p_mean_variance, vb_terms_bpd, prior_bpd, calc_bpd_loop.
- ``sample``: ddpm's samplers driven by your model, optionally traced step by step.
- ``load``: a ddpm checkpoint or a diffusers folder as a callable model.
- ``vectors``: the reference vectors of ``ddpm vectors``; ``compare``: ``ddpm compare``.
- ``ddpm.testing``: assertions that name the first mismatching entry and index.
"""

from ._ddpm import Model, Oracle, Schedule, __version__, load, sample, vectors
from ._ddpm import compare_arrays as _compare_arrays

__all__ = ["Schedule", "Model", "Oracle", "sample", "load", "vectors", "compare", "testing", "__version__"]


def compare(reference, candidate, rtol=1e-5, atol=1e-8, only=None):
    """Compares ``candidate`` against ``reference`` entry by entry, as ``ddpm compare`` does.

    Both are dicts of arrays or paths of .npz files. An element passes when
    ``|cand - ref| <= atol + rtol * |ref|`` (numpy's isclose); NaN matches only NaN. Returns a
    dict: ``passed`` (bool), ``entries`` (one dict per name: name, status, passed,
    reference_shape, candidate_shape, max_abs_err, max_rel_err, mismatched) and ``table``, the
    text ``ddpm compare`` prints.
    """
    return _compare_arrays(reference, candidate, rtol, atol, only)


from . import testing  # noqa: E402  (after the names it uses)
