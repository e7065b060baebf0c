"""How well could any estimator recover each star's per-species abundance offsets (the auxiliary
targets of issue 32), by the Cramér–Rao bound, and how much do they cost log g?

For each star the Fisher matrix over the labels and the nuisances plus the nuisances' prior is
inverted; a species' offset has posterior variance at best diag((F + P)^-1), so the best possible
mean squared error in units of its prior variance (0.05 dex squared) is that over the prior's.
Also printed: the median marginal bound of the labels, and the bound with the offsets known.

Usage: python offset_bounds.py FISHER.csv...
FISHER.csv: `cargo run --release -p starflow-data --example fisher -- SEED N PIXELS_PER_CAMERA`.
Needs numpy.
"""
import sys

import numpy as np


def main(path):
    lines = open(path).read().splitlines()
    names = lines[0].split(": ", 1)[1].split(",")
    prior = np.array([float(x) for x in lines[1].split(": ", 1)[1].split(",")])
    rows = np.array([[float(x) for x in l.split(",")] for l in lines[2:]])
    snr, m = rows[:, 1], 3 + len(prior)
    fisher = rows[:, 2:].reshape(-1, m, m)
    p = np.diag(np.r_[0.0, 0.0, 0.0, prior])
    n_species = sum(n.startswith("x_fe[") for n in names)
    species = range(3, 3 + n_species)

    def bounds(f, drop=()):
        a = f + p
        keep = [i for i in range(m) if a[i, i] > 0 and i not in drop]
        out = np.full(m, np.nan)
        out[keep] = np.sqrt(np.diag(np.linalg.inv(a[np.ix_(keep, keep)])))
        return out

    full = np.array([bounds(f) for f in fisher])
    known = np.array([bounds(f, drop=species) for f in fisher])
    bright = snr >= np.quantile(snr, 0.75)
    print(f"{path}: {len(snr)} stars")
    print("  median marginal bound t_eff / log g / [Fe/H]:", np.round(np.median(full[:, :3], 0), 4))
    print("  the same with every species' offset known:    ", np.round(np.median(known[:, :3], 0), 4))
    print("  best mean squared error of each offset / its prior variance (all stars, brightest quarter):")
    ratio = full[:, 3:3 + n_species] ** 2 * prior[:n_species]
    for s in range(n_species):
        print(f"    {names[s]:12s} {np.mean(ratio[:, s]):.3f}  {np.mean(ratio[bright, s]):.3f}")
    informative = [s for s in range(n_species) if np.mean(ratio[:, s]) < 0.999]
    print(f"  mean over the {len(informative)} species with lines: {np.mean(ratio[:, informative]):.3f}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        main(p)
