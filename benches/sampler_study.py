"""Summarises benches/sampler-study.sh: one markdown table per family, and a PNG per figure.

ODE samplers: RMS per-pixel difference of x_0 (clipped to [-1, 1]) against DDIM eta=0 with all
T steps from the same x_T. Stochastic samplers: RMS difference of the per-pixel mean and standard
deviation maps against 1000 ancestral steps, beside the floor (ancestral against itself, another
seed). Usage: python3 benches/sampler_study.py OUT_DIR
"""
import csv
import sys
import zipfile
from pathlib import Path

import numpy as np


def x0(path):
    with zipfile.ZipFile(path) as z, z.open("x_0.npy") as f:
        return np.clip(np.lib.format.read_array(f), -1.0, 1.0)


def rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


def family(runs, prefix):
    """The step counts and sampler names of the runs named PREFIX<sampler>_k<K>, in run order."""
    names = [k for k in runs if k.startswith(prefix) and "_k" in k]
    ks = sorted({int(k.rsplit("_k", 1)[1]) for k in names})
    samplers = list(dict.fromkeys(k[len(prefix):].rsplit("_k", 1)[0] for k in names))
    return ks, samplers


def main(out):
    out = Path(out)
    runs = {}
    with open(out / "runs.tsv") as f:
        for name, n, secs, args in csv.reader(f, delimiter="\t"):
            runs[name] = (int(n), float(secs), args)
    lines = [(out / "machine.txt").read_text().strip().replace("\n", ", cores: "), ""]
    ref = x0(out / "ode_ref.npz")
    n, secs, _ = runs["ode_ref"]
    lines.append(f"ODE reference: ddim eta=0, all T steps, {n} images, {secs:.1f} s")
    lines.append("")
    ks, samplers = family(runs, "ode_")
    lines.append("| sampler | " + " | ".join(f"K={k}: RMS, s" for k in ks) + " |")
    lines.append("|---|" + "---|" * len(ks))
    for s in samplers:
        cells = []
        for k in ks:
            name = f"ode_{s}_k{k}"
            if name not in runs:
                cells.append("")
                continue
            cells.append(f"{rms(x0(out / (name + '.npz')), ref):.4f}, {runs[name][1]:.1f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")
    a, b = x0(out / "sde_ref.npz"), x0(out / "sde_ref2.npz")
    n, secs, _ = runs["sde_ref"]

    def stats(x):
        return x.mean(axis=0), x.std(axis=0)

    ma, sa = stats(a)
    mb, sb = stats(b)
    lines.append(
        f"SDE reference: 1000 ancestral steps, {n} images, {secs:.1f} s; floor (another seed): "
        f"mean-map RMS {rms(ma, mb):.4f}, std-map RMS {rms(sa, sb):.4f}"
    )
    lines.append("")
    ks, samplers = family(runs, "sde_")
    lines.append("| sampler | " + " | ".join(f"K={k}: mean, std, s" for k in ks) + " |")
    lines.append("|---|" + "---|" * len(ks))
    for s in samplers:
        cells = []
        for k in ks:
            name = f"sde_{s}_k{k}"
            m, sd = stats(x0(out / (name + ".npz")))
            cells.append(f"{rms(m, ma):.4f}, {rms(sd, sa):.4f}, {runs[name][1]:.1f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1])
