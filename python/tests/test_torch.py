"""Against PyTorch code: a diffusers DDPMScheduler driven step by step beside ddpm, and the
bits/dim of a diffusers UNet2DModel computed by ddpm's calc_bpd_loop against `ddpm eval` of the
same weights. Skipped without torch and diffusers (pip install torch diffusers)."""

import gzip
import json
import struct

import numpy as np
import pytest

import ddpm
from ddpm.testing import assert_scheduler_matches

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize(
    "prediction_type,variance_type,clip,steps",
    [
        ("epsilon", "fixed_small", True, None),
        ("epsilon", "fixed_large", False, None),
        ("sample", "fixed_small", True, 50),
        ("v_prediction", "fixed_small", False, 25),
    ],
)
def test_a_diffusers_ddpm_scheduler_matches_every_step(prediction_type, variance_type, clip, steps):
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000, prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip
    )
    n = assert_scheduler_matches(scheduler, steps=steps, shape=(2, 3, 4, 4), seed=5)
    assert n == (steps or 1000)


def test_a_scheduler_that_differs_is_caught_at_its_first_step():
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    # Held against ddpm's linear schedule instead of its own cosine one.
    with pytest.raises(AssertionError, match=r"step 0 \(t = 999, ddpm index 999\): x_\(t-1\) differs first at index"):
        assert_scheduler_matches(scheduler, schedule=ddpm.Schedule("linear", 1000, "diffusers"), shape=(1, 1, 2, 2))


def write_idx_images(path, images):
    n, h, w = images.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, h, w))
        f.write(images.astype(np.uint8).tobytes())


def test_calc_bpd_loop_of_a_unet2dmodel_agrees_with_ddpm_eval(run_cli, tmp_path):
    # The fixture: a diffusers folder (UNet2DModel + DDPMScheduler), made here from a few steps
    # of training; `ddpm eval` reads it through `ddpm import`, the bindings through torch.
    run, folder, imported = tmp_path / "run", tmp_path / "diffusers", tmp_path / "imported"
    run_cli("train", "--preset", "tiny", "--steps", "3", "--batch", "2", "--timesteps", "20",
            "--sample-count", "0", "--threads", "1", "--out", run)
    run_cli("export", "--checkpoint", run, "--diffusers", folder)
    run_cli("import", "--diffusers", folder, "--out", imported)
    images = np.random.default_rng(3).integers(0, 256, size=(3, 28, 28))
    data = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx_images(data, images)
    report = json.loads(run_cli("eval", "--checkpoint", imported, "--data", data, "--batch", "3", "--limit", "3",
                                "--json", "--seed", "0", "--threads", "1").stdout)
    unet = diffusers.UNet2DModel.from_pretrained(folder).eval()

    def model(x, t):
        with torch.no_grad():
            out = unet(torch.from_numpy(x).float(), torch.from_numpy(np.asarray(t))).sample
        return out.double().numpy()

    loaded = ddpm.load(folder)
    schedule = loaded.schedule()
    # As ddpm (and improved-diffusion) load pixels: p / 127.5 − 1 in float32.
    x0 = (images[:, None].astype(np.float32) / np.float32(127.5) - np.float32(1)).astype(np.float64)
    kw = dict(mean_type=loaded.mean_type, var_type=loaded.var_type, clip_denoised=True, seed=0)
    key = next(k for k in report if "total" in k)
    torch_total = float(np.mean(schedule.calc_bpd_loop(model, x0, **kw)["total_bpd"]))
    ddpm_total = float(np.mean(schedule.calc_bpd_loop(loaded, x0, **kw)["total_bpd"]))
    print(f"ddpm eval {report[key]!r}; calc_bpd_loop: torch UNet2DModel {torch_total!r}, ddpm's network {ddpm_total!r}")
    # The two networks agree to float32 rounding; ddpm's own network gives eval's figure exactly.
    np.testing.assert_allclose(torch_total, report[key], rtol=1e-7)
    assert ddpm_total == pytest.approx(report[key], rel=1e-12)
