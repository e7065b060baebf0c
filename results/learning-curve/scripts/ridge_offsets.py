"""Can the species' abundance offsets be read off the pixels linearly? A ridge regression from the
z-scored log flux (starflow's ln(max(flux, 0.2))) to each offset and to the labels, fitted on the
first N_TRAIN stars and scored (R^2, RMSE) on the rest, for a few ridge strengths (issue 32:
TinyCNN, asked for the offsets as auxiliary targets, recovers R^2 ~ 0.01).

Usage: python ridge_offsets.py DATA_DIR NUISANCES.csv N_TRAIN
NUISANCES.csv: `cargo run --release -p starflow-data --example nuisances -- SEED N PPC` for the
set's seed, size and pixels per camera. Needs numpy; ~1 min for 6,600 stars of 4,096 pixels.
"""
import sys

import numpy as np


def main(data_dir, nuis_path, n_train):
    x = np.log(np.maximum(np.load(f"{data_dir}/spectra.npy").astype(np.float64), 0.2))
    labels = np.load(f"{data_dir}/labels.npy")[:, 4:7]
    nu = np.genfromtxt(nuis_path, delimiter=",", names=True)
    assert np.allclose(nu["log_g"], labels[:, 1], atol=1e-5), "nuisances of another set"
    names = [n for n in nu.dtype.names if n.startswith("x_fe")]
    offsets = np.column_stack([nu[n] for n in names])
    tr, te = slice(0, n_train), slice(n_train, len(x))
    z = (x - x[tr].mean(0)) / (x[tr].std(0) + 1e-6)
    gram = z[tr].T @ z[tr]
    for lam in [1e2, 1e3, 1e4]:
        a = gram + lam * np.eye(len(gram))

        def fit(y):
            w = np.linalg.solve(a, z[tr].T @ (y[tr] - y[tr].mean(0)))
            return z[te] @ w + y[tr].mean(0)

        r2 = 1 - ((fit(offsets) - offsets[te]) ** 2).mean(0) / offsets[te].var(0)
        rmse = np.sqrt(((fit(labels) - labels[te]) ** 2).mean(0))
        lines = r2[2:]  # H I and Li I: no offset in the flux (Li follows a_li)
        print(f"ridge {lam:g}: offsets' held-out R^2 mean {lines.mean():.3f}, best "
              f"{names[2 + lines.argmax()]} {lines.max():.2f}; labels' RMSE {np.round(rmse, 4)}")
        print("   ", " ".join(f"{n[4:]}:{v:.2f}" for n, v in zip(names, r2)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
