"""Per-star error correlation of two estimators on the same stars (issue 32): whether what is left
of their errors is shared. Usage: python error_correlation.py A.csv B.csv LABELS.npy
A.csv and B.csv are `starflow evaluate` predictions (`*_mean` columns) or cannon_baseline.py's
(`*_pred` columns), each with `row` and `*_true`; stars where either has no finite estimate are
left out. Prints the correlation over all stars and over the brightest SNR quarter. Needs numpy.
"""
import csv
import sys

import numpy as np


def errors(path):
    out = {}
    for r in csv.DictReader(open(path)):
        key = "_mean" if "t_eff_mean" in r else "_pred"
        out[int(r["row"])] = [float(r[k + key]) - float(r[k + "_true"]) for k in ("t_eff", "log_g", "fe_h")]
    return out


def main(a_path, b_path, labels_path):
    a, b = errors(a_path), errors(b_path)
    rows = [i for i in a if i in b and np.all(np.isfinite(a[i] + b[i]))]
    ea, eb = np.array([a[i] for i in rows]), np.array([b[i] for i in rows])
    snr = np.load(labels_path)[rows, 7]
    bright = snr >= np.quantile(snr, 0.75)
    for j, name in enumerate(("t_eff", "log_g", "fe_h")):
        all_ = np.corrcoef(ea[:, j], eb[:, j])[0, 1]
        top = np.corrcoef(ea[bright, j], eb[bright, j])[0, 1]
        print(f"{name}: {len(rows)} stars, correlation {all_:+.2f}; brightest quarter {top:+.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
