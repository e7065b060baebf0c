"""Where a run's errors come from (issue 32): RMSE of the posterior means by SNR bin (quartiles,
the top quarter split at the 90th percentile), by true log g, T_eff and [Fe/H], against the median
marginal CRLB of each bin where the data set has one, and the posterior's own std by SNR.

Usage: python error_by_snr.py PREDICTIONS.csv DATA_DIR
PREDICTIONS.csv is `starflow evaluate`'s (its `row` column indexes DATA_DIR's labels.npy; the
columns are mass, age, l_bol, dist, t_eff, log_g, fe_h, SNR). Needs numpy.
"""
import csv
import os
import sys

import numpy as np


def main(pred_path, data_dir):
    rows = list(csv.DictReader(open(pred_path)))
    labels = np.load(os.path.join(data_dir, "labels.npy"))
    crlb_path = os.path.join(data_dir, "crlb_marginal.npy")
    idx = np.array([int(r["row"]) for r in rows])
    crlb = np.load(crlb_path)[idx] if os.path.exists(crlb_path) else np.full((len(idx), 3), np.nan)
    col = lambda name: np.array([float(r[name]) for r in rows])
    truth = {"t_eff": labels[idx, 4], "log_g": labels[idx, 5], "fe_h": labels[idx, 6]}
    err = {k: col(k + "_mean") - truth[k] for k in truth}
    std = {k: col(k + "_std") for k in truth}
    snr = labels[idx, 7]
    rms = lambda v: float(np.sqrt(np.mean(v**2)))
    print(f"{pred_path}: {len(idx)} stars; log g RMSE {rms(err['log_g']):.4f}, T_eff {rms(err['t_eff']):.2f} K")

    def table(name, key, edges):
        print(f"by {name}:")
        for a, b in zip(edges[:-1], edges[1:]):
            m = (key >= a) & (key < b)
            if m.sum() < 30:
                continue
            g, t = err["log_g"][m], err["t_eff"][m]
            print(
                f"  [{a:8.2f}, {b:8.2f}) n={m.sum():5d}  log g RMSE {rms(g):.4f} (CRLB {np.median(crlb[m, 1]):.4f}),"
                f" bias {g.mean():+.4f}, own std {rms(std['log_g'][m]):.4f} | T_eff RMSE {rms(t):5.1f} K"
                f" (CRLB {np.median(crlb[m, 0]):4.1f}), own std {rms(std['t_eff'][m]):5.1f}"
            )

    q = np.quantile(snr, [0, 0.25, 0.5, 0.75, 0.9, 1.0])
    q[-1] += 1
    table("SNR", snr, q)
    table("true log g", truth["log_g"], [0, 2, 2.5, 3, 3.5, 4, 4.3, 4.6, 5.5])
    table("true T_eff", truth["t_eff"], [3000, 4500, 5000, 5500, 6000, 6500, 8000])
    table("true [Fe/H]", truth["fe_h"], [-3, -1, -0.5, -0.25, 0, 0.25, 1])
    bright = snr >= q[3]
    g, t = err["log_g"][bright], err["t_eff"][bright]
    slope = np.polyfit(t, g, 1)
    resid = g - np.polyval(slope, t)
    print(
        f"brightest quarter: corr(log g error, T_eff error) {np.corrcoef(g, t)[0, 1]:+.2f};"
        f" log g error along T_eff's {slope[0]:+.2e} dex/K, the rest {rms(resid):.4f} of {rms(g):.4f}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
