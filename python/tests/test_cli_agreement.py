"""Every binding computes what the CLI computes, bit for bit (the same code path): the tables and
every term of `ddpm vectors`, `ddpm trace`'s step-by-step record, `ddpm compare`'s report."""

import numpy as np
import pytest

import ddpm

CASES = [("linear", "ho2020"), ("cosine", "improved-diffusion"), ("linear", "diffusers"), ("quadratic", "guided-diffusion")]


@pytest.mark.parametrize("kind,convention", CASES)
def test_schedule_and_terms_equal_ddpm_vectors_bit_for_bit(run_cli, tmp_path, kind, convention):
    path = tmp_path / "v.npz"
    run_cli("vectors", "--out", path, "--schedule", kind, "--convention", convention, "--timesteps", 200)
    ref = dict(np.load(path))
    s = ddpm.Schedule(kind, 200, convention)
    for name, value in s.tables().items():
        if name in ref:
            assert np.array_equal(value, ref[name]), name
    x0, t, noise, x_t, out = ref["x0"], ref["t"], ref["noise"], ref["x_t"], ref["model_output"]
    assert np.array_equal(s.q_sample(x0, t, noise), x_t)
    mean, _, _ = s.q_posterior_mean_variance(x0, x_t, t)
    assert np.array_equal(mean, ref["posterior_mean"])
    for var in ["fixedlarge", "fixedsmall"]:
        # The file's terms are of the unclipped x̂_0.
        p = s.p_mean_variance(out, x_t, t, var_type=var, clip_denoised=False)
        assert np.array_equal(p["mean"], ref[f"p_mean_{var}"]), var
        assert np.array_equal(p["log_variance"], ref[f"p_log_variance_{var}"]), var
        vb = s.vb_terms_bpd(out, x0, x_t, t, var_type=var, clip_denoised=False)
        assert np.array_equal(vb["output"], ref[f"vb_bpd_{var}"]), var
    unclipped = s.p_mean_variance(out, x_t, t, clip_denoised=False)
    assert np.array_equal(unclipped["pred_xstart"], ref["pred_xstart"])
    assert np.array_equal(s.prior_bpd(x0), ref["prior_bpd"])
    # ddpm.vectors builds the same file's arrays by the same names.
    mine = ddpm.vectors(kind, 200, convention)
    assert sorted(mine) == sorted(ref)
    for name in ref:
        assert np.array_equal(mine[name], ref[name]), name


def test_a_traced_sample_equals_ddpm_trace(run_cli, tmp_path):
    run = tmp_path / "run"
    run_cli("train", "--preset", "tiny", "--steps", "2", "--batch", "2", "--timesteps", "12",
            "--sample-count", "0", "--threads", "1", "--out", run)
    model = ddpm.load(run)
    schedule = model.schedule()
    for sampler, steps in [("ddpm", None), ("ddim", 5), ("dpm++2m", 4)]:
        out = tmp_path / f"{sampler}.npz"
        args = ["trace", "--checkpoint", run, "--out", out, "--keep", "all", "--seed", 3, "--sampler", sampler]
        if steps:
            args += ["--steps", steps]
        run_cli(*args)
        ref = dict(np.load(out))
        c = model.config["unet"]
        tr = ddpm.sample(model, [1, c["in_channels"], c["resolution"], c["resolution"]], schedule,
                         sampler=sampler, steps=steps, seed=3, trace=True, mean_type=model.mean_type,
                         var_type=model.var_type, clip_denoised=model.config["clip_denoised"])
        for name, value in tr.items():
            assert name in ref, f"{sampler}: {name} is not in ddpm trace's file"
            assert np.array_equal(value, ref[name]), f"{sampler}: {name}"
        step_names = {n for n in ref if "." in n}
        assert step_names == {n for n in tr if "." in n}, sampler
        # Without trace, the same final images.
        x0 = ddpm.sample(model, tr["x_0"].shape, schedule, sampler=sampler, steps=steps, seed=3,
                         mean_type=model.mean_type, var_type=model.var_type,
                         clip_denoised=model.config["clip_denoised"])
        assert np.array_equal(x0, ref["x_0"]), sampler


def test_compare_reports_what_ddpm_compare_prints(run_cli, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    run_cli("vectors", "--out", a, "--timesteps", 50)
    ref = dict(np.load(a))
    ref["x_t"] = ref["x_t"] + 1e-3
    del ref["prior_bpd"]
    np.savez(b, **ref)
    cli = run_cli("compare", a, b, check=False)
    assert cli.returncode == 1
    report = ddpm.compare(str(a), str(b))
    assert not report["passed"]
    assert report["table"].strip() in cli.stdout
    status = {e["name"]: e["status"] for e in report["entries"]}
    assert status["x_t"].startswith("MISMATCH (") and status["prior_bpd"] == "MISSING in candidate"
    assert status["betas"] == "OK"
