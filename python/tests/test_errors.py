"""Bad input raises a Python exception carrying ddpm's message; a panic becomes RuntimeError;
long computations release the GIL."""

import threading
import time

import numpy as np
import pytest

import ddpm


def test_bad_names_and_values_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="unknown schedule"):
        ddpm.Schedule("exponential")
    with pytest.raises(ValueError, match="convention"):
        ddpm.Schedule(convention="tensorflow")
    with pytest.raises(ValueError, match="at least 2"):
        ddpm.Schedule(timesteps=0)
    with pytest.raises(ValueError, match="betas has 3 entries"):
        ddpm.Schedule(betas=[0.1, 0.2, 0.3], timesteps=4)
    with pytest.raises(ValueError):
        ddpm.Schedule(betas=[0.1, 1.5, 0.3])
    s = ddpm.Schedule(timesteps=10)
    x = np.zeros((2, 1, 2, 2))
    with pytest.raises(ValueError, match="timestep 10 is out of range"):
        s.q_sample(x, [0, 10], x)
    with pytest.raises(ValueError, match="timestep -1 is out of range"):
        s.q_sample(x, [0, -1], x)
    with pytest.raises(ValueError, match="t has 1 entries for a batch of 2"):
        s.q_sample(x, [0], x)
    with pytest.raises(ValueError, match="differ"):
        s.q_sample(x, [0, 1], np.zeros((2, 1, 2, 3)))
    with pytest.raises(ValueError, match="must be"):
        s.p_mean_variance(np.zeros((2, 1, 2, 2)), x, [0, 1], var_type="learned")
    with pytest.raises(ValueError, match="mean_type"):
        s.p_mean_variance(x, x, [0, 1], mean_type="score")
    with pytest.raises(ValueError, match="batch"):
        s.prior_bpd(np.zeros((0, 1, 2, 2)))
    with pytest.raises(ValueError, match="unknown sampler|expected"):
        ddpm.sample(lambda x, t: x, [1, 1, 2, 2], s, sampler="magic")
    with pytest.raises(ValueError, match="eta"):
        ddpm.sample(lambda x, t: x, [1, 1, 2, 2], s, sampler="ancestral", eta=0.5)


def test_sizes_beyond_memory_are_refused_not_aborted():
    s = ddpm.Schedule(timesteps=10)
    with pytest.raises(ValueError, match="sampling shape.*more than ddpm allocates"):
        ddpm.sample(lambda x, t: x, [10**6, 10**6, 10**6], s)
    with pytest.raises(ValueError, match="reference batch.*more than ddpm allocates"):
        ddpm.vectors(batch=10**9, sample_shape=(1000, 1000, 1000))


def test_a_models_own_exception_comes_back_unchanged():
    s = ddpm.Schedule(timesteps=10)

    class Broken(Exception):
        pass

    def model(x, t):
        raise Broken("their bug")

    with pytest.raises(Broken, match="their bug"):
        s.calc_bpd_loop(model, np.zeros((1, 1, 2, 2)))
    with pytest.raises(Broken, match="their bug"):
        ddpm.sample(model, [1, 1, 2, 2], s)
    with pytest.raises(ValueError, match="model output has shape"):
        s.calc_bpd_loop(lambda x, t: np.zeros((1, 1, 2, 3)), np.zeros((1, 1, 2, 2)))
    with pytest.raises(TypeError):
        ddpm.sample(lambda x, t: "not an array", [1, 1, 2, 2], s)


def test_files_that_are_missing_or_not_models_are_named(tmp_path):
    with pytest.raises((ValueError, OSError), match="nowhere"):
        ddpm.load(tmp_path / "nowhere")
    bad = tmp_path / "checkpoint.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises((ValueError, OSError), match="checkpoint.safetensors"):
        ddpm.load(bad)
    npz = tmp_path / "bad.npz"
    npz.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises((ValueError, OSError), match="bad.npz"):
        ddpm.compare(str(npz), str(npz))


def test_a_panic_becomes_a_runtime_error():
    with pytest.raises(RuntimeError, match="internal error in ddpm.*a deliberate panic"):
        ddpm._ddpm._panic_for_tests()


def test_long_computations_let_other_python_threads_run():
    s = ddpm.Schedule(timesteps=1000)
    x = np.zeros((256, 3, 128, 128))
    t = np.full(256, 500)
    ticks = []
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    time.sleep(0.02)
    before = len(ticks)
    start = time.perf_counter()
    for _ in range(3):
        s.q_sample(x, t, x)
    took = time.perf_counter() - start
    done.set()
    counter.join()
    during = sum(1 for tick in ticks if start <= tick <= start + took)
    # With the GIL held through the native call the counter could not tick at all while it ran.
    assert took > 0.05 and during >= 5, f"{during} ticks in {took:.3f} s (before: {before})"
