"""How much of a run's per-star error its drawn nuisances explain (issue 32). The error of each
label is regressed on a quadratic in the true labels, then on that plus every nuisance (lithium,
tellurics, edge, microturbulence offset, the tilts, the per-species offsets x_fe) and their
products with log g; fitted on the even-numbered stars and scored (R^2) on the odd ones.

Usage: python nuisance_regression.py PREDICTIONS.csv DATA_DIR NUISANCES.csv
PREDICTIONS.csv: `starflow evaluate`'s or cannon_baseline.py's, with a `row` column.
NUISANCES.csv: `cargo run --release -p starflow-data --example nuisances -- SEED N 4096` for the
set's seed and size. Needs numpy.
"""
import csv
import os
import sys

import numpy as np


def quadratic(x):
    cols = [np.ones(len(x))] + [x[:, i] for i in range(x.shape[1])]
    cols += [x[:, i] * x[:, j] for i in range(x.shape[1]) for j in range(i, x.shape[1])]
    return np.column_stack(cols)


def main(pred_path, data_dir, nuis_path):
    labels = np.load(os.path.join(data_dir, "labels.npy"))
    nu = np.genfromtxt(nuis_path, delimiter=",", names=True)
    assert np.allclose(nu["log_g"], labels[:, 5], atol=1e-5), "nuisances of another set"
    # starflow's `*_mean` columns or cannon_baseline.py's `*_pred`; stars without a finite
    # estimate of every label (a failed Cannon fit) are left out.
    rows = list(csv.DictReader(open(pred_path)))
    key = "_mean" if "t_eff_mean" in rows[0] else "_pred"
    est = lambda r, name: float(r[name + key])
    rows = [r for r in rows if all(np.isfinite(est(r, k)) for k in ("t_eff", "log_g", "fe_h"))]
    idx = np.array([int(r["row"]) for r in rows])
    names = [c for c in nu.dtype.names if c not in ("row", "t_eff", "log_g", "fe_h", "snr")]
    x_nu = np.column_stack([nu[c][idx] for c in names])
    lab = np.column_stack([labels[idx, 4] / 1000, labels[idx, 5], labels[idx, 6]])
    x_lab = quadratic(lab)
    x_all = np.column_stack([x_lab, x_nu, x_nu * lab[:, 1:2]])
    snr = labels[idx, 7]
    fit = np.arange(len(idx)) % 2 == 0
    bright = snr >= np.quantile(snr, 0.75)
    print(f"{pred_path}: {len(idx)} stars; fitted on the even-numbered, scored on the odd")
    for name, j in (("t_eff", 4), ("log_g", 5), ("fe_h", 6)):
        e = np.array([est(r, name) for r in rows]) - labels[idx, j]

        def held_out_residual(x, where):
            b, *_ = np.linalg.lstsq(x[fit & where], e[fit & where], rcond=None)
            return e[~fit & where] - x[~fit & where] @ b

        everyone = np.ones(len(e), bool)
        var = np.mean((e[~fit] - e[fit].mean()) ** 2)
        r2_lab = 1 - np.mean(held_out_residual(x_lab, everyone) ** 2) / var
        r2_all = 1 - np.mean(held_out_residual(x_all, everyone) ** 2) / var
        rms_b = np.sqrt(np.mean(e[~fit & bright] ** 2))
        res_b = np.sqrt(np.mean(held_out_residual(x_all, bright) ** 2))
        corr = sorted(((abs(np.corrcoef(x_nu[:, i], e)[0, 1]), names[i]) for i in range(len(names))), reverse=True)
        print(
            f"{name}: held-out R^2 from the labels {r2_lab:.3f}, with the nuisances {r2_all:.3f};"
            f" brightest quarter RMSE {rms_b:.4g}, left when the nuisances are known {res_b:.4g};"
            f" largest |corr|: " + ", ".join(f"{n} {c:.2f}" for c, n in corr[:5])
        )


if __name__ == "__main__":
    main(*sys.argv[1:4])
