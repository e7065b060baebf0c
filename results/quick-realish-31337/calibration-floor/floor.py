"""The sampling floor of the per-kind calibration targets (issue 29).

A model whose own posteriors are exactly right for every star is recalibrated with a global map
fitted on N calibration stars, as `starflow train` fits one when it has no synthetic calibration set,
and scored as the issue scores: 18 cells (the four SNR quarters of 2,500 stars, 1,811 giants and
8,189 dwarfs of a 10,000-star test set, x three labels), each passing when its 68.3 % interval covers
68.3 +- 3 %, its 95.4 % interval 95.4 +- 2 % and its pull std lies in 0.93-1.07. For such a model the
kinds carry no information about the errors, so every miss is sampling noise: of the map (N stars)
and of the cells (the test stars).

The map is the quantile map's essentials: the recalibrated 68.3 % and 95.4 % intervals are the
calibration stars' empirical 15.9/84.1 % and 2.3/97.7 % quantiles of the standardised error, and the
recalibrated mean and std are the calibration errors' mean and std. Errors are standard normal, or
Student-t with 5 degrees of freedom scaled to unit variance (kurtosis 9, as heavy-tailed as the quick
profile's standardised errors, `crates/inference/src/calibration.rs`).

Run: python floor.py   (numpy, scipy; ~1 min)
"""
import numpy as np
from scipy.stats import norm, t as student_t

REPS = 1000
TEST = 10_000
GIANTS = 1_811
NU = 5
rng = np.random.default_rng(20261206)


def draw(n, tails):
    if tails == "normal":
        return rng.standard_normal(n)
    return student_t.rvs(NU, size=n, random_state=rng) / np.sqrt(NU / (NU - 2))


def true_intervals(tails):
    """The exact 68.3 / 95.4 % intervals of the error law: the identity map."""
    levels = norm.cdf([-1, 1, -2, 2])
    if tails == "normal":
        return norm.ppf(levels), 0.0, 1.0
    return student_t.ppf(levels, NU) / np.sqrt(NU / (NU - 2)), 0.0, 1.0


def fitted_intervals(n, tails):
    v = draw(n, tails)
    return np.quantile(v, norm.cdf([-1, 1, -2, 2])), v.mean(), v.std()


def cells_passed(n, tails):
    passed = 0
    for _label in range(3):
        q, c1, c2 = true_intervals(tails) if n == 0 else fitted_intervals(n, tails)
        test = draw(TEST, tails)
        order = rng.permutation(TEST)
        quarters = np.array_split(order, 4)
        kinds = quarters + [order[:GIANTS], order[GIANTS:]]
        for rows in kinds:
            x = test[rows]
            c68 = np.mean((x > q[0]) & (x < q[1])) * 100
            c95 = np.mean((x > q[2]) & (x < q[3])) * 100
            pull_std = np.std((x - c1) / c2)
            passed += abs(c68 - 68.27) <= 3 and abs(c95 - 95.45) <= 2 and 0.93 <= pull_std <= 1.07
    return passed


print("| errors | calibration stars | mean cells passed (of 18) | P(all 18) |")
print("|---|---|---|---|")
for tails in ["normal", "student-t(5)"]:
    for n in [0, 600, 1200, 2228, 5000, 10000, 20000]:
        r = np.array([cells_passed(n, tails) for _ in range(REPS)])
        p = np.mean(r == 18)
        label = "none (the exact law)" if n == 0 else f"{n:,}"
        print(
            f"| {tails} | {label} | {r.mean():.2f} +- {r.std() / np.sqrt(REPS):.2f} "
            f"| {p:.2f} +- {np.sqrt(p * (1 - p) / REPS):.2f} |"
        )
