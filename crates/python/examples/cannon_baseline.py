"""The classical baseline beside the flows: The Cannon (Ness et al. 2015; GALAH's label method for
DR1-2) fitted on a starflow run's own training stars and scored on a held-out labelled set.

The Cannon models each pixel's normalised flux as a quadratic polynomial in the labels plus a
scatter term, fitted pixel by pixel on the training stars; a new spectrum's labels are then found
by least squares, with formal errors from the fit's covariance. It is the method astronomers
already trust, so a neural posterior must beat it clearly to be worth its cost.

It runs outside starflow's own environment and outside CI: the PyPI package the-cannon 0.2.6 needs
numpy < 2, and on Python >= 3.10 a `collections.Iterable` shim (applied below). Its threaded test
step fails, so the test stars are fitted one by one with its own `fitting.fit_spectrum` (from the
training median, as its `test` does; `test` itself would start a shell per call to size a progress
bar), and its
default `dispersion=None` and a scalar regularization fail too (a pixel index and a per-pixel
array are passed instead).

    python -m venv /tmp/cannon && /tmp/cannon/bin/pip install "numpy<2" scipy the-cannon==0.2.6
    starflow rows --run RUN --split train --out train_rows.txt
    /tmp/cannon/bin/python crates/python/examples/cannon_baseline.py \\
        --data DATA_DIR --train-rows train_rows.txt --test HELDOUT_DIR --out OUT_DIR

DATA_DIR is the run's `data.dir` (spectra.npy, labels.npy in GALAH's column order), so the
training stars are exactly the run's; HELDOUT_DIR is any labelled set on the same pixel grid
(`starflow synth --seed S` for one no choice was tuned on). The per-pixel inverse variance is
SNR^2 from the labels' SNR column: the synthetic generator's noise is 1/SNR per pixel of
normalised flux, and for GALAH the column is the same per-pixel figure.

Writes OUT_DIR/predictions.csv (labels, formal errors, truth per test star), OUT_DIR/metrics.json
(per label: RMSE, bias, RMSE over the median marginal Cramer-Rao bound when the held-out set has
crlb_marginal.npy, pull mean and std of the formal errors, 68 % / 95 % coverage of +-1 / +-2
formal sigma; training and test seconds) and prints a Markdown table row.
"""

import argparse
import collections
import contextlib
import io
import collections.abc
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

# the-cannon 0.2.6 imports `Iterable` from `collections`, which Python 3.10 removed.
if not hasattr(collections, "Iterable"):
    collections.Iterable = collections.abc.Iterable

import thecannon as tc  # noqa: E402

# The package logs at DEBUG by default, a line per fit; failed fits are counted in the output instead.
logging.getLogger("thecannon").setLevel(logging.ERROR)

GALAH_COLUMNS = "mass,age,l_bol,dist,t_eff,log_g,fe_h,SNR"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="training data directory (the run's data.dir)")
    p.add_argument("--train-rows", type=Path, required=True, help="row numbers, one per line (`starflow rows`)")
    p.add_argument("--test", type=Path, required=True, help="held-out labelled data directory")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--label-names", default=GALAH_COLUMNS, help="one name per label column")
    p.add_argument("--targets", default="t_eff,log_g,fe_h", help="the labels to fit")
    p.add_argument("--snr-column", default="SNR", help="the label column holding per-pixel SNR")
    p.add_argument("--order", type=int, default=2, help="polynomial order in the labels (2: quadratic)")
    p.add_argument("--regularization", type=float, default=0.0, help="L1 strength on the coefficients")
    p.add_argument("--limit-test", type=int, default=0, help="fit only the first N test stars (0: all)")
    return p.parse_args(argv)


def fail(path, problem, fix):
    """A user error in starflow's format: the file, the problem, the fix; exit code 2."""
    print(f"error: {path}: {problem}; fix: {fix}", file=sys.stderr)
    sys.exit(2)


def load_set(directory, names):
    """Spectra (n, n_pix) and labels (n, n_columns) of a data directory, checked."""
    spectra_path, labels_path = directory / "spectra.npy", directory / "labels.npy"
    for path in (spectra_path, labels_path):
        if not path.is_file():
            fail(path, "not found", "pass a directory holding spectra.npy and labels.npy")
    spectra = np.load(spectra_path, mmap_mode="r")
    labels = np.load(labels_path)
    if spectra.ndim != 2 or labels.ndim != 2 or spectra.shape[0] != labels.shape[0]:
        fail(directory, f"spectra {spectra.shape} and labels {labels.shape} do not pair up",
             "pass the files starflow reads (n_stars x n_pix and n_stars x n_columns)")
    if labels.shape[1] != len(names):
        fail(labels_path, f"{labels.shape[1]} columns but {len(names)} names given",
             "pass --label-names with one name per column")
    return spectra, labels


def inverse_variance(labels, names, snr_column, where):
    """Per-pixel inverse variance SNR^2 (the same for every pixel of a star)."""
    if snr_column not in names:
        fail(where, f"no `{snr_column}` column among {names}", "pass --snr-column")
    snr = labels[:, names.index(snr_column)].astype(np.float64)
    if not np.all(np.isfinite(snr) & (snr > 0)):
        fail(where, "the SNR column has non-positive or non-finite values", "clean the labels file")
    return snr**2


def fit(args):
    names = args.label_names.split(",")
    targets = args.targets.split(",")
    missing = [t for t in targets if t not in names]
    if missing:
        fail(args.data / "labels.npy", f"targets {missing} are not label columns {names}", "check --targets")
    cols = [names.index(t) for t in targets]

    spectra, labels = load_set(args.data, names)
    rows = np.loadtxt(args.train_rows, dtype=np.int64, ndmin=1)
    if rows.size == 0 or rows.min() < 0 or rows.max() >= spectra.shape[0]:
        fail(args.train_rows, f"rows outside 0..{spectra.shape[0]} (or none)",
             "write it with `starflow rows --run RUN --split train` for the run trained on --data")
    rows = np.sort(rows)
    train_flux = np.asarray(spectra[rows], dtype=np.float64)
    train_labels = labels[rows]
    train_ivar = np.repeat(inverse_variance(train_labels, names, args.snr_column, args.data)[:, None],
                           train_flux.shape[1], axis=1)
    table = {t: train_labels[:, c].astype(np.float64) for t, c in zip(targets, cols)}

    test_spectra, test_labels = load_set(args.test, names)
    if test_spectra.shape[1] != train_flux.shape[1]:
        fail(args.test / "spectra.npy", f"{test_spectra.shape[1]} pixels, the training set has {train_flux.shape[1]}",
             "use a held-out set on the same pixel grid")
    n_test = test_spectra.shape[0] if args.limit_test <= 0 else min(args.limit_test, test_spectra.shape[0])

    vectorizer = tc.vectorizer.PolynomialVectorizer(targets, args.order)
    # The package fails on its own default `dispersion=None` (the pixel index serves: it is only a
    # label) and on a scalar regularization under numpy 1.26 (it takes a per-pixel array).
    n_pix = train_flux.shape[1]
    reg = None if args.regularization == 0 else np.full(n_pix, args.regularization)
    model = tc.CannonModel(table, train_flux, train_ivar, vectorizer, regularization=reg,
                           dispersion=np.arange(n_pix, dtype=np.float64))
    print(f"training The Cannon on {rows.size} stars x {n_pix} pixels ...", file=sys.stderr)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its per-pixel progress bar
        model.train()
    train_seconds = time.perf_counter() - t0
    del train_flux, train_ivar

    test_flux = np.asarray(test_spectra[:n_test], dtype=np.float64)
    snr2 = inverse_variance(test_labels[:n_test], names, args.snr_column, args.test)
    t0 = time.perf_counter()
    estimates, covs = [], []
    # leastsq's covariance is of the labels the package scales internally ((x - fiducial) / scale);
    # the formal errors in physical units need the scales back.
    scale_outer = np.outer(model._scales, model._scales)
    failed = np.full((len(targets), len(targets)), np.nan)
    for i in range(n_test):
        ivar = np.full(test_flux.shape[1], snr2[i])
        try:
            labels_i, cov_i, _ = tc.fitting.fit_spectrum(
                test_flux[i], ivar, model._fiducials, model.vectorizer, model.theta, model.s2,
                model._fiducials, model._scales)
        except TypeError:
            # A singular fit: the package's own check of its covariance fails on `None`.
            labels_i, cov_i = np.full(len(targets), np.nan), None
        estimates.append(labels_i)
        covs.append(failed if cov_i is None else np.asarray(cov_i, dtype=np.float64) * scale_outer)
    test_seconds = time.perf_counter() - t0
    return targets, cols, np.array(estimates), np.array(covs), test_labels[:n_test], rows.size, train_seconds, test_seconds


def score(args, targets, cols, est, cov, truth_labels, n_train, train_seconds, test_seconds):
    crlb_path = args.test / "crlb_marginal.npy"
    crlb = np.load(crlb_path)[: est.shape[0]] if crlb_path.is_file() else None
    out = {"n_train": int(n_train), "n_test": int(est.shape[0]), "train_seconds": train_seconds,
           "test_seconds": test_seconds, "labels": {}}
    columns = {}
    for j, (t, c) in enumerate(zip(targets, cols)):
        truth = truth_labels[:, c].astype(np.float64)
        sigma = np.sqrt(cov[:, j, j])
        err = est[:, j] - truth
        ok = np.isfinite(err)
        pull = (truth - est[:, j])[ok & (sigma > 0)] / sigma[ok & (sigma > 0)]
        m = {
            "rmse": float(np.sqrt(np.mean(err[ok] ** 2))),
            "rmse_se": float(np.sqrt(np.mean(err[ok] ** 2)) / np.sqrt(2 * ok.sum())),
            "bias": float(np.mean(err[ok])),
            "failed": int((~ok).sum()),
            "pull_mean": float(np.mean(pull)),
            "pull_std": float(np.std(pull)),
            "cov68": float(np.mean(np.abs(pull) < 1.0)),
            "cov95": float(np.mean(np.abs(pull) < 2.0)),
        }
        if crlb is not None:
            m["median_crlb_marginal"] = float(np.median(crlb[:, j]))
            m["rmse_over_crlb"] = m["rmse"] / m["median_crlb_marginal"]
        out["labels"][t] = m
        columns[f"{t}_pred"], columns[f"{t}_err"], columns[f"{t}_true"] = est[:, j], sigma, truth
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(out, indent=2) + "\n")
    header = ",".join(["row"] + list(columns))
    body = np.column_stack([np.arange(est.shape[0])] + list(columns.values()))
    np.savetxt(args.out / "predictions.csv", body, delimiter=",", header=header, comments="", fmt="%.9g")
    return out


def markdown_row(out):
    cells = []
    for t, m in out["labels"].items():
        ratio = f" ({m['rmse_over_crlb']:.2f}x CRLB)" if "rmse_over_crlb" in m else ""
        cells.append(f"{m['rmse']:.4g}{ratio}, pull std {m['pull_std']:.2f}")
    return (f"| The Cannon (quadratic), {out['n_train']} training stars | " + " | ".join(cells)
            + f" | {out['train_seconds']:.0f} s | {out['test_seconds']:.0f} s for {out['n_test']} |")


def main(argv=None):
    args = parse_args(argv)
    result = score(args, *fit(args))
    for t, m in result["labels"].items():
        extra = f"  RMSE/CRLB {m['rmse_over_crlb']:.2f}" if "rmse_over_crlb" in m else ""
        print(f"{t:6s} RMSE {m['rmse']:.4g} ± {m['rmse_se']:.2g}  bias {m['bias']:+.3g}  "
              f"pull std {m['pull_std']:.2f}  68 % {100 * m['cov68']:.1f}{extra}  failed {m['failed']}")
    print(f"trained on {result['n_train']} stars in {result['train_seconds']:.1f} s; "
          f"{result['n_test']} test stars in {result['test_seconds']:.1f} s")
    print(markdown_row(result))


if __name__ == "__main__":
    main()
