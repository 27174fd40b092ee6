"""ddpm.load on the other families' files, against the outputs their own code wrote
(tests/fixtures/openai: improved- and guided-diffusion `.pt` files with the flags of their
scripts, and what their `UNetModel` and `p_mean_variance` returned; see that folder's README)."""

import pathlib

import numpy as np
import pytest

import ddpm

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "openai"
CASES = [  # name, weights, family
    ("improved_class", "improved_class", "improved-diffusion"),
    ("improved_sigma", "improved_sigma", "improved-diffusion"),
    ("guided_heads", "guided_heads", "guided-diffusion"),
]


@pytest.mark.parametrize("name,weights,family", CASES)
def test_an_openai_checkpoint_predicts_and_steps_as_their_code_did(name, weights, family):
    if not FIXTURES.is_dir():
        pytest.skip("the repository's fixtures are not beside this test")
    flags = (FIXTURES / f"{name}.flags.txt").read_text().strip()
    model = ddpm.load(FIXTURES / f"{weights}.pt", flags=flags, family=family)
    f = dict(np.load(FIXTURES / f"{name}.npz"))
    y = f.get("y")
    out = model(f["x"], f["t"], y=y)
    bound = 1e-4 * max(1.0, np.abs(f["out_f64"]).max())
    assert np.abs(out - f["out"]).max() <= bound and np.abs(out - f["out_f64"]).max() <= bound, name
    # Their p_mean_variance on their respaced β, with the output at their network timesteps.
    s = ddpm.Schedule(betas=f["betas"], convention=model.config["diffusion"]["convention"])
    p = s.p_mean_variance(
        model(f["x"], f["pmv_model_t"], y=y), f["x"], f["pmv_t"], mean_type=model.mean_type,
        var_type=model.var_type, clip_denoised=True,
    )
    for key in ["mean", "variance", "log_variance", "pred_xstart"]:
        assert np.abs(p[key] - f[f"pmv_{key}"]).max() <= 1e-3, f"{name}: {key}"


def test_a_class_conditional_model_wants_its_labels():
    model = ddpm.load(FIXTURES / "improved_class.pt", flags=(FIXTURES / "improved_class.flags.txt").read_text().strip())
    x = np.zeros((2, 3, 32, 32))
    with pytest.raises(ValueError, match="give one label per image"):
        model(x, [1, 2])
    with pytest.raises(ValueError, match="label 1000 is not one of the model's"):
        model(x, [1, 2], y=[0, 1000])
    with pytest.raises(ValueError, match="flag|num_channels|unknown"):
        ddpm.load(FIXTURES / "improved_class.pt", flags="--num_channels 64 --bogus 1")
