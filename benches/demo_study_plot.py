"""Plots benches/demo-study.sh's study.csv files: the score's confident fraction and FD against
training steps, one line per sampler (and per study directory given).

    python3 benches/demo_study_plot.py OUT.png DIR[=LABEL] [DIR[=LABEL] ...]

Needs matplotlib (tested with 3.10.3).
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = sys.argv[1]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
floor_conf, floor_fd = None, None
for arg in sys.argv[2:]:
    path, _, label = arg.partition("=")
    rows = list(csv.DictReader(open(f"{path}/study.csv")))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        if sampler.startswith("euler-ancestral"):
            continue  # the same update as DDIM eta = 1 (docs/sampling.md): the same numbers
        rs = [r for r in rows if r["sampler"] == sampler]
        steps = [int(r["steps"]) for r in rs]
        name = f"{label + ': ' if label else ''}{sampler}"
        ax1.plot(steps, [100 * float(r["frac_conf90"]) for r in rs], marker="o", label=name)
        ax2.plot(steps, [float(r["fd"]) for r in rs], marker="o", label=name)
        floor_conf = 100 * float(rs[0]["real_frac_conf90"])
        floor_fd = float(rs[0]["real_fd"])
ax1.axhline(floor_conf, color="gray", ls="--", label="real digits (floor)")
ax1.axhline(95, color="red", ls=":", label="target 95%")
ax1.set_xlabel("training steps (batch 32)")
ax1.set_ylabel("% of 256 samples classified with p >= 0.9")
ax1.set_ylim(0, 100)
ax2.axhline(floor_fd, color="gray", ls="--", label="real digits (floor)")
ax2.axhline(3 * floor_fd, color="red", ls=":", label="target: 3x floor")
ax2.set_yscale("log")
ax2.set_xlabel("training steps (batch 32)")
ax2.set_ylabel("FD in the scorer's feature space (n = 256)")
ax1.legend(fontsize=7)
ax2.legend(fontsize=7)
fig.suptitle("ddpm demo recipe: score against training (ddpm score, 256 samples each)")
fig.tight_layout()
fig.savefig(out, dpi=90)
print(out)
