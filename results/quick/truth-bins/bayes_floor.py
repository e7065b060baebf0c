"""What an exactly Bayesian posterior scores in the per-kind calibration table.

The report's kinds of star are chosen two ways: by what is observed (the SNR quarters) and by the
true labels (giants and dwarfs by true log g, cool/hot by true t_eff, metal-poor by true [Fe/H]).
An exact posterior p(theta | x) is calibrated on average over the stars and in any group chosen by
what is observed, but not in a group chosen by the truth: it leans towards where the population
has most stars, so the truths of a rare kind (giants are 18 % of the population) sit in their
posteriors' tails more often than the nominal level says. How much depends on the measurement
error against the population's spread.

This script measures it. Labels are drawn from the generator's population (a numpy copy of
`draw_star` in crates/data/src/synth/mod.rs: t_eff, log g, [Fe/H] only; `--check DIR` compares it
with a generated set's labels.npy), each star is "observed" as truth + Gaussian error of a given sd
per label, and its exact posterior is the population prior times that likelihood (importance
weights over a large prior sample). Then the per-kind coverage of the central 68.3 % / 95.4 %
intervals and the pull std are scored exactly as the report does.

    python3 bayes_floor.py --sigma 65 0.15 0.027 --stars 5000 --prior 400000 --seed 1
"""
import argparse

import numpy as np

GIANT_FRACTION = 0.18


def truncated(rng, n, mu, sd, lo, hi):
    out = np.empty(0)
    while out.size < n:
        v = mu + sd * rng.standard_normal(2 * n)
        out = np.concatenate([out, v[(v >= lo) & (v <= hi)]])
    return out[:n]


def draw_population(rng, n):
    """(n, 3) t_eff, log g, [Fe/H] as `draw_star` draws them."""
    giant = rng.random(n) < GIANT_FRACTION
    fe_h = truncated(rng, n, -0.2, 0.29, -1.3, 0.4)
    t = np.empty(n)
    g = np.empty(n)
    ng = giant.sum()
    g_g = truncated(rng, ng, 2.6, 0.5, 1.3, 3.5)
    t[giant] = np.clip(4350.0 + 330.0 * (g_g - 1.3) - 250.0 * fe_h[giant]
                       + 90.0 * rng.standard_normal(ng), 4100.0, 5300.0)
    g[giant] = g_g
    nd = n - ng
    t_d = truncated(rng, nd, 5650.0, 400.0, 4500.0, 6600.0)
    zams = 4.72 - 0.30 * (t_d - 4500.0) / 2100.0
    evolved = rng.random(nd) ** 2 * (0.15 + 0.45 * ((t_d - 4500.0) / 2100.0))
    g[~giant] = np.clip(zams - evolved + 0.04 * rng.standard_normal(nd), 3.8, 4.7)
    t[~giant] = t_d
    return np.stack([t, g, fe_h], axis=1)


def weighted_quantiles(values, weights, levels):
    order = np.argsort(values)
    v, w = values[order], weights[order]
    c = np.cumsum(w)
    c /= c[-1]
    return np.interp(levels, c - 0.5 * w / w.sum(), v)


def posteriors(truth, sigma, prior, rng, chunk=64):
    """Per star and label: posterior mean, sd and the 2.3/15.9/84.1/97.7 % quantiles."""
    obs = truth + sigma * rng.standard_normal(truth.shape)
    levels = np.array([0.02275, 0.15866, 0.84134, 0.97725])
    mean = np.empty_like(truth)
    sd = np.empty_like(truth)
    q = np.empty(truth.shape + (4,))
    ess = np.empty(len(truth))
    ps = prior / sigma
    for a in range(0, len(truth), chunk):
        o = obs[a:a + chunk] / sigma
        d2 = ((o[:, None, :] - ps[None, :, :]) ** 2).sum(-1)
        logw = -0.5 * d2
        logw -= logw.max(1, keepdims=True)
        w = np.exp(logw)
        w /= w.sum(1, keepdims=True)
        ess[a:a + chunk] = 1.0 / (w ** 2).sum(1)
        m = w @ prior
        mean[a:a + chunk] = m
        sd[a:a + chunk] = np.sqrt(np.maximum(w @ prior ** 2 - m ** 2, 0.0))
        for i in range(len(o)):
            keep = w[i] > 1e-9 * w[i].max()
            for j in range(3):
                q[a + i, j] = weighted_quantiles(prior[keep, j], w[i, keep], levels)
    return mean, sd, q, ess


def score(name, sel, truth, mean, sd, q):
    n = sel.sum()
    cells = []
    for j, label in enumerate(["t_eff", "log_g", "fe_h"]):
        t = truth[sel, j]
        c68 = np.mean((t >= q[sel, j, 1]) & (t <= q[sel, j, 2])) * 100
        c95 = np.mean((t >= q[sel, j, 0]) & (t <= q[sel, j, 3])) * 100
        pull = (t - mean[sel, j]) / sd[sel, j]
        ok = abs(c68 - 68.27) <= 3 and abs(c95 - 95.45) <= 2 and 0.93 <= pull.std() <= 1.07
        cells.append(f"{label} {c68:5.1f} / {c95:5.1f}, {pull.std():.2f}{'' if ok else ' *'}")
    print(f"| {name:28s} | {n:5d} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sigma", type=float, nargs=3, required=True,
                    help="measurement error sd of t_eff (K), log g, [Fe/H]")
    ap.add_argument("--stars", type=int, default=5000)
    ap.add_argument("--prior", type=int, default=400000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check", help="a generated set's directory: compare its labels")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    if args.check:
        real = np.load(f"{args.check}/labels.npy")[:, 4:7]
        mine = draw_population(rng, 200000)
        for j, label in enumerate(["t_eff", "log_g", "fe_h"]):
            lv = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
            print(label, "set:", np.round(np.quantile(real[:, j], lv), 3),
                  "copy:", np.round(np.quantile(mine[:, j], lv), 3))
        print("giant fraction: set", np.mean(real[:, 1] < 3.5), "copy", np.mean(mine[:, 1] < 3.5))
    sigma = np.array(args.sigma)
    prior = draw_population(rng, args.prior)
    truth = draw_population(rng, args.stars)
    mean, sd, q, ess = posteriors(truth, sigma, prior, rng)
    rmse = np.sqrt(((mean - truth) ** 2).mean(0))
    print(f"likelihood sd {sigma.tolist()}; exact posterior mean RMSE {np.round(rmse, 4).tolist()}; "
          f"importance-sample size median {np.median(ess):.0f}, 1 % quantile {np.quantile(ess, 0.01):.0f}")
    print("| kind | stars | t_eff 68 / 95 %, pull std | log_g | fe_h |")
    print("|---|---|---|---|---|")
    t, g, f = truth[:, 0], truth[:, 1], truth[:, 2]
    score("all", np.ones(len(truth), bool), truth, mean, sd, q)
    score("giants (log g < 3.5)", g < 3.5, truth, mean, sd, q)
    score("dwarfs (log g >= 3.5)", g >= 3.5, truth, mean, sd, q)
    score("metal-poor ([Fe/H] < -0.5)", f < -0.5, truth, mean, sd, q)
    score("cool (t_eff < 5000 K)", t < 5000, truth, mean, sd, q)
    score("hot (t_eff >= 6000 K)", t >= 6000, truth, mean, sd, q)
    # The same kinds chosen by the posterior mean, as a catalogue user chooses them.
    t, g, f = mean[:, 0], mean[:, 1], mean[:, 2]
    score("giants, estimated", g < 3.5, truth, mean, sd, q)
    score("dwarfs, estimated", g >= 3.5, truth, mean, sd, q)
    score("metal-poor, estimated", f < -0.5, truth, mean, sd, q)
    score("cool, estimated", t < 5000, truth, mean, sd, q)
    score("hot, estimated", t >= 6000, truth, mean, sd, q)


if __name__ == "__main__":
    main()
