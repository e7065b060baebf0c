"""Runs from Python: training, predictions equal to the CLI's bit for bit, posterior samples."""

import csv
import warnings

import numpy as np
import pytest

import starflow
from conftest import run_cli


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    # Rust writes the shortest round-trip form, so float() gives back the exact f64.
    return {name: np.array([float(r[k]) for r in body]) for k, name in enumerate(header)}


@pytest.mark.parametrize("which", ["gaussian_run", "flow_run"])
@pytest.mark.parametrize("calibrate", [True, False])
def test_predict_equals_cli_bit_for_bit(request, which, calibrate, cli, data_dir, spectra, tmp_path):
    run = request.getfixturevalue(which)
    out = tmp_path / "cli.csv"
    args = ["predict", "--run", run.path, "--spectra", data_dir / "spectra.npy", "--out", out]
    args += ["--samples", 200, "--seed", 3] + ([] if calibrate else ["--raw"])
    run_cli(cli, *args)
    expected = read_csv(out)
    got = run.predict(spectra, samples=200, seed=3, calibrate=calibrate, as_frame=False)
    assert list(got) == list(expected)
    assert got["row"].dtype == np.int64
    for name, column in expected.items():
        assert np.array_equal(got[name], column), name
    # float64 input holds the same float32 values: the same bits come out.
    again = run.predict(spectra.astype(np.float64), samples=200, seed=3, calibrate=calibrate, as_frame=False)
    for name in expected:
        assert np.array_equal(again[name], got[name]), name


def test_predict_is_zero_copy_safe_and_per_star(flow_run, spectra):
    """A star's prediction depends on its row and the seed only, not on its neighbours."""
    full = flow_run.predict(spectra[:20], samples=100, seed=1, as_frame=False)
    first = flow_run.predict(spectra[:1], samples=100, seed=1, as_frame=False)
    one = flow_run.predict(spectra[0], samples=100, seed=1, as_frame=False)  # 1-D: one spectrum
    for name in full:
        assert np.array_equal(first[name], full[name][:1]), name
        assert np.array_equal(one[name], first[name]), name
    assert full["row"].tolist() == list(range(20))
    # A strided view is copied into a contiguous array first and predicts the same.
    strided = np.repeat(spectra[:4], 2, axis=0)[::2]
    for name, col in flow_run.predict(strided, samples=100, seed=1, as_frame=False).items():
        assert np.array_equal(col, full[name][:4]), name


def test_chunks_with_first_row_concatenate_to_one_call(flow_run, spectra):
    whole = flow_run.predict(spectra, samples=100, seed=6, as_frame=False)
    parts = [
        flow_run.predict(spectra[a:b], samples=100, seed=6, as_frame=False, first_row=a)
        for a, b in [(0, 50), (50, 131), (131, len(spectra))]
    ]
    for name, col in whole.items():
        assert np.array_equal(np.concatenate([p[name] for p in parts]), col), name
    s = flow_run.posterior_samples(spectra[131:133], 50, seed=6, first_row=131)
    assert np.array_equal(s, flow_run.posterior_samples(spectra[:133], 50, seed=6)[131:])


def test_predict_returns_a_dataframe_with_pandas(gaussian_run, spectra):
    pd = pytest.importorskip("pandas")
    frame = gaussian_run.predict(spectra[:5])
    assert isinstance(frame, pd.DataFrame)
    assert len(frame) == 5 and "t_eff_mean" in frame.columns


@pytest.mark.parametrize("which", ["gaussian_run", "flow_run"])
def test_posterior_samples(request, which, spectra):
    run = request.getfixturevalue(which)
    s = run.posterior_samples(spectra[:6], 500, calibrate=False, seed=2)
    assert s.shape == (6, 500, 3) and s.dtype == np.float64
    assert np.array_equal(s, run.posterior_samples(spectra[:6], 500, calibrate=False, seed=2))
    p = run.predict(spectra[:6], samples=500, seed=2, calibrate=False, as_frame=False)
    for j, label in enumerate(run.labels):
        if which == "flow_run":
            # The very samples the summaries were computed from (same per-star streams).
            np.testing.assert_allclose(s[:, :, j].mean(axis=1), p[f"{label}_mean"], rtol=1e-12)
            np.testing.assert_allclose(s[:, :, j].std(axis=1, ddof=1), p[f"{label}_std"], rtol=1e-9)
        else:
            # Exact Gaussian summaries; 500 draws agree within their sampling error.
            err = np.abs(s[:, :, j].mean(axis=1) - p[f"{label}_mean"]) / p[f"{label}_std"]
            assert err.max() < 5 / np.sqrt(500)


def test_recalibrated_samples_follow_the_recalibrated_summary(flow_run, spectra):
    s = flow_run.posterior_samples(spectra[:4], 1000, calibrate=True, seed=4)
    p = flow_run.predict(spectra[:4], samples=1000, seed=4, calibrate=True, as_frame=False)
    for j, label in enumerate(flow_run.labels):
        np.testing.assert_allclose(s[:, :, j].mean(axis=1), p[f"{label}_mean"], rtol=1e-9)
        np.testing.assert_allclose(s[:, :, j].std(axis=1, ddof=1), p[f"{label}_std"], rtol=1e-9)


def test_run_metadata(flow_run, tmp_path):
    assert flow_run.labels == ["t_eff", "log_g", "fe_h"]
    assert flow_run.n_pix == 4 * 64
    assert flow_run.config["model"]["flow"] == "full_flow"
    assert flow_run.config["optim"]["epochs"] == 2
    assert [h["epoch"] for h in flow_run.history] == [0, 1]
    assert all(isinstance(h["val_nll"], float) for h in flow_run.history)
    assert flow_run.state["finished"] is True
    again = starflow.load_run(flow_run.path)
    assert again.history == flow_run.history
    assert "full_flow" in repr(again)


def test_train_reports_progress_and_resumes(data_dir, tmp_path):
    events = []
    cfg = {"data": {"dir": str(data_dir), "synthetic_n": 480, "synthetic_pixels_per_camera": 64},
           "run": {"seed": 5, "threads": 2}}
    out = tmp_path / "run"
    run = starflow.train(cfg, out=out, progress=lambda e, i: events.append((e, i)),
                         epochs=1, optim__batch_size=32, **{"model.flow": "diagonal_gaussian"})
    kinds = [e for e, _ in events]
    assert kinds.count("epoch_start") == 1 and kinds.count("epoch_end") == 1
    assert kinds.count("step") == events[kinds.index("epoch_start")][1]["n_steps"]
    assert run.config["model"]["flow"] == "diagonal_gaussian"
    # Resume extends the run by the epochs asked for, like `starflow train --resume --epochs 2`.
    longer = starflow.train(cfg, out=out, resume=True, progress=False, epochs=2)
    assert [h["epoch"] for h in longer.history] == [0, 1]


def test_an_exception_in_the_callback_stops_training(data_dir, tmp_path):
    cfg = {"data": {"dir": str(data_dir), "synthetic_n": 480, "synthetic_pixels_per_camera": 64}}

    def stop(event, info):
        if event == "step" and info["step"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        starflow.train(cfg, out=tmp_path / "run", progress=stop, epochs=3, optim__batch_size=32)
    # Nothing of the interrupted epoch was committed; resuming starts the run again from scratch
    # with its own config (3 epochs; a smaller budget given now cannot shrink it).
    run = starflow.train(cfg, out=tmp_path / "run", resume=True, progress=False, epochs=1,
                         optim__batch_size=32)
    assert len(run.history) == 3


def test_tune_allocator_applies_on_glibc():
    import platform

    assert starflow.tune_allocator() is (platform.libc_ver()[0] == "glibc")


def test_maps_on_too_few_stars_warn_that_the_posteriors_are_the_models_own(data_dir, spectra, tmp_path):
    # 24 validation stars: below MIN_CALIBRATION_STARS, so the "recalibrated" posteriors are the
    # model's own, which the command line says on stderr and Python must say as a warning.
    cfg = {"data": {"dir": str(data_dir), "synthetic_n": 480, "synthetic_pixels_per_camera": 64,
                    "train_fraction": 0.9, "val_fraction": 0.05, "test_fraction": 0.05},
           "optim": {"batch_size": 32}, "run": {"seed": 5, "threads": 2}}
    run = starflow.train(cfg, out=tmp_path / "run", progress=False, epochs=1)
    with pytest.warns(UserWarning, match="not recalibrated.*24 stars"):
        calibrated = run.predict(spectra[:8], samples=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        own = run.predict(spectra[:8], samples=20, calibrate=False)
    for k in calibrated:
        np.testing.assert_array_equal(calibrated[k], own[k])
