"""Paired comparison of two runs' predictions on the same stars: for each label the relative change
of the mean squared error (B over A, minus 1) and of the NLL (B minus A), each with its standard
error from the per-star differences (issue 32's screens).

Usage: python paired.py A/predictions.csv B/predictions.csv      (`starflow evaluate`'s files)
"""
import csv
import sys

import numpy as np


def load(path):
    rows = sorted(csv.DictReader(open(path)), key=lambda r: int(r["row"]))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def main(a_path, b_path):
    a, b = load(a_path), load(b_path)
    assert np.array_equal(a["row"], b["row"]), "not the same stars"
    for label in ["t_eff", "log_g", "fe_h"]:
        ea = (a[f"{label}_mean"] - a[f"{label}_true"]) ** 2
        eb = (b[f"{label}_mean"] - b[f"{label}_true"]) ** 2
        d = eb - ea
        rel, se = d.mean() / ea.mean(), d.std(ddof=1) / np.sqrt(len(d)) / ea.mean()
        print(f"{label}: MSE {100 * rel:+.1f} ± {100 * se:.1f} %")
    d = b["nll"] - a["nll"]
    print(f"NLL: {d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)):.3f} ({len(d)} stars)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
