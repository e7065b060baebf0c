"""plot.py EVAL_DIR OUT.png TEST_DIR/crlb_marginal.npy

Learning-curve figure: RMSE over the median marginal CRLB against training stars, TinyCNN and The
Cannon, one panel per label; and TinyCNN's recalibrated NLL. Reads the evaluate and Cannon outputs."""
import json, re, sys
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

import numpy as np
lc = Path(sys.argv[1]); out = Path(sys.argv[2])
crlb = np.median(np.load(sys.argv[3]), axis=0)  # the test set's crlb_marginal.npy
labels = ["t_eff", "log_g", "fe_h"]; titles = ["T_eff", "log g", "[Fe/H]"]
nets, cannon = {}, {}
for p in sorted(lc.glob("tiny_cnn-n*-e*.eval.txt")):
    n, e = map(int, re.search(r"n(\d+)-e(\d+)", p.name).groups())
    t = p.read_text()
    row = {"nll": float(re.search(r"NLL (-?[\d.]+) ±", t).group(1)), "epochs": e}
    for lab in labels:
        m = re.search(rf"^\s+{lab}\s+([\d.]+) ± ([\d.]+).*?\s([\d.]+)\s+([\d.]+)\s*$", t, re.M)
        row[lab] = (float(m.group(1)), float(m.group(2)), float(m.group(1)) / crlb[labels.index(lab)])
    nets[(n, e)] = row
for p in sorted(lc.glob("cannon-tiny_cnn-n*/metrics.json")) + sorted(lc.glob("cannon-tiny_cnn-n*.metrics.json")):
    n = int(re.search(r"-n(\d+)-", str(p)).group(1))
    cannon[n] = json.loads(p.read_text())
fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
pts = sorted(nets)
# The line joins, per number of stars, the run with the best held-out NLL.
curve = [k for k in pts if not any(o[0] == k[0] and nets[o]["nll"] < nets[k]["nll"] for o in pts)]
for j, (lab, title) in enumerate(zip(labels, titles)):
    ax = axes[j]
    xs = [k[0] for k in pts]; ys = [nets[k][lab][2] for k in pts]
    ax.plot(xs, ys, "o", color="C0")
    ax.plot([k[0] for k in curve], [nets[k][lab][2] for k in curve], "-", color="C0", label="TinyCNN (diagonal Gaussian), best epochs per size")
    for k in pts:
        ax.annotate(f"{k[1]} ep", (k[0], nets[k][lab][2]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if cannon:
        cx = sorted(cannon); cy = [cannon[n]["labels"][lab]["rmse_over_crlb"] for n in cx]
        ax.plot(cx, cy, "s--", color="C1", label="The Cannon (quadratic)")
    ax.axhline(2.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log"); ax.set_xlabel("training stars"); ax.set_title(f"{title}: RMSE / median marginal CRLB", fontsize=10)
    ax.set_xticks([1000, 3000, 10000, 30000], ["1k", "3k", "10k", "30k"]); ax.minorticks_off()
    if j == 0: ax.legend(fontsize=7)
ax = axes[3]
steps = [k[0] * k[1] / 64 for k in pts]
ax.plot(steps, [nets[k]["t_eff"][2] for k in pts], "o", color="C0")
for k, st in zip(pts, steps):
    ax.annotate(f"{k[0]} stars", (st, nets[k]["t_eff"][2]), fontsize=7, xytext=(3, 3), textcoords="offset points")
ax.axhline(2.0, color="grey", lw=0.8, ls=":")
ax.set_xscale("log"); ax.set_xlabel("optimiser steps (stars x epochs / 64)")
ax.set_title("T_eff RMSE / CRLB against training steps", fontsize=10)
ax.set_xticks([500, 1000, 2000, 3000], ["500", "1k", "2k", "3k"]); ax.minorticks_off()
fig.tight_layout(); fig.savefig(out, dpi=110)
print("wrote", out)
