"""Bad input raises the right exception, with the command line's message."""

import json
import shutil

import numpy as np
import pytest

import starflow
from conftest import run_cli


def cli_error(cli, *args):
    done = run_cli(cli, *args, check=False)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line[len("error: "):]


def test_missing_run_is_file_not_found_with_the_cli_message(cli, tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(FileNotFoundError) as e:
        starflow.load_run(missing)
    spectra = tmp_path / "s.npy"
    np.save(spectra, np.ones((1, 8), dtype=np.float32))
    want = cli_error(cli, "predict", "--run", missing, "--spectra", spectra)
    assert "the --out directory of a `starflow train` run" in want
    assert str(e.value) == want.replace(
        "the --out directory of a `starflow train` run", "the `out` directory of a `starflow.train` run"
    )


def test_wrong_pixel_count_is_value_error(gaussian_run):
    with pytest.raises(ValueError, match=r"spectra array: spectra have 100 pixels, but the run was trained on 256 pixels; fix: "):
        gaussian_run.predict(np.ones((2, 100), dtype=np.float32))


def test_non_finite_flux_names_row_and_pixel(gaussian_run, spectra):
    bad = spectra[:3].copy()
    bad[2, 17] = np.nan
    with pytest.raises(ValueError, match="row 2 has a non-finite value at pixel 17"):
        gaussian_run.predict(bad)


def test_bad_shapes_and_settings(gaussian_run, spectra):
    with pytest.raises(ValueError, match="2-D array"):
        gaussian_run.predict(np.ones((2, 2, 256)))
    with pytest.raises(ValueError, match="between 10 and"):
        gaussian_run.predict(spectra[:2], samples=3)
    with pytest.raises(TypeError, match="cannot be fluxes"):
        gaussian_run.predict([["a", "b"]])


def test_bad_config_is_value_error_with_the_cli_message(cli, tmp_path):
    with pytest.raises(ValueError) as e:
        starflow.train(out=tmp_path / "r", progress=False, optim__lr=-1.0)
    # The command line's message, with its own words in Python's.
    want = cli_error(cli, "train", "--out", tmp_path / "r", "--set", "optim.lr=-1.0")
    assert "from the command line" in want
    assert str(e.value) == want.replace("from the command line", "from the overrides")
    with pytest.raises(ValueError) as e:
        starflow.train(out=tmp_path / "r", progress=False, optim__epochs=-1)
    assert "usize" not in str(e.value) and "a whole number" in str(e.value)
    with pytest.raises(ValueError, match="unknown key"):
        starflow.train(out=tmp_path / "r", progress=False, optim__learning_rate=1e-3)
    with pytest.raises(FileNotFoundError):
        starflow.train(tmp_path / "missing.toml", out=tmp_path / "r", progress=False)
    with pytest.raises(TypeError):
        starflow.train(out=tmp_path / "r", progress=False, optim__lr=object())


def test_missing_data_dir_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        starflow.train(
            out=tmp_path / "r", progress=False, data__dir=str(tmp_path / "nope"), data__synthetic=False
        )


def test_synth_rejects_bad_settings():
    with pytest.raises(ValueError, match="snr"):
        starflow.synth(10, snr_min=300.0, snr_max=250.0)


def test_synth_is_reproducible():
    a = starflow.synth(3, seed=9, pixels_per_camera=32)
    b = starflow.synth(3, seed=9, pixels_per_camera=32)
    spectra, labels, wavelength, crlb = a
    assert spectra.shape == (3, 128) and spectra.dtype == np.float32
    assert labels.shape == (3, 8) and wavelength.shape == (128,) and crlb.shape == (3, 3)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    marginal = starflow.synth(3, seed=9, pixels_per_camera=32, marginal_crlb=True)[3]
    assert (marginal >= crlb).all()


def test_recalibration_without_validation_data_says_how_to_go_on(gaussian_run, spectra, tmp_path):
    # A copy of the run, trained on (real, not regenerable) data that are gone, whose
    # recalibration is not saved.
    run = tmp_path / "run"
    shutil.copytree(gaussian_run.path, run)
    (run / "calibration.json").unlink()
    state = json.loads((run / "state.json").read_text())
    state["config"]["data"].update(dir=str(tmp_path / "gone"), synthetic=False)
    (run / "state.json").write_text(json.dumps(state))
    moved = starflow.load_run(run)
    # The missing data directory makes it a FileNotFoundError, with the way out in the message.
    with pytest.raises(FileNotFoundError, match="pass calibrate=False for the model's own posteriors"):
        moved.predict(spectra[:2])
    # Spectra on another grid are refused before the recalibration is fitted (minutes on a
    # real run), so the error is about them, not about the missing data.
    with pytest.raises(ValueError, match="spectra have 100 pixels"):
        moved.predict(np.ones((2, 100), dtype=np.float32))
    with pytest.raises(ValueError, match="spectra have 100 pixels"):
        moved.posterior_samples(np.ones((2, 100), dtype=np.float32), 10)
    raw = moved.predict(spectra[:2], calibrate=False, as_frame=False)
    assert raw["t_eff_mean"].shape == (2,)


def test_arrays_astronomers_have_are_read_as_their_values(gaussian_run, spectra):
    """Big-endian arrays (astropy's FITS data) and misaligned C-contiguous chunks (dask) predict
    exactly like the native array; integer arrays are refused, not read as fluxes."""
    x = np.ascontiguousarray(spectra[:4], dtype=np.float32)
    want = gaussian_run.predict(x, as_frame=False)
    big = x.astype(">f4")
    raw = np.empty(x.nbytes + 1, dtype=np.uint8)
    misaligned = np.frombuffer(raw[1:].data, dtype=np.float32).reshape(x.shape)
    misaligned[...] = x
    assert not misaligned.flags.aligned and misaligned.flags.c_contiguous
    for other in (big, misaligned, x.astype(">f8")):
        got = gaussian_run.predict(other, as_frame=False)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{other.dtype} {k}")
    with pytest.raises(TypeError, match="cannot be fluxes.*astype"):
        gaussian_run.predict((x * 100).astype(np.int32))


def test_whole_number_arguments_speak_python(gaussian_run, spectra):
    for kwargs, name in [({"samples": -5}, "samples"), ({"seed": -1}, "seed"),
                         ({"first_row": -3}, "first_row"), ({"samples": 0}, "samples")]:
        with pytest.raises(ValueError, match=rf"^{name} must be between") as e:
            gaussian_run.predict(spectra[:2], **kwargs)
        assert "--" not in str(e.value)
    with pytest.raises(ValueError, match="^n must be between 1 and"):
        gaussian_run.posterior_samples(spectra[:2], -1)


CLI_WORDS = ("--resume", "--out", "--raw", "--set", "--samples", "from the command line", "starflow train")


def assert_python_words(message):
    for word in CLI_WORDS:
        assert word not in message, f"{word!r} in a Python message: {message}"


def test_run_directory_messages_speak_python(gaussian_run, tmp_path):
    # Training into a finished run without resume=True: the fix is resume=True, not --resume.
    with pytest.raises(ValueError) as e:
        starflow.train(out=gaussian_run.path, progress=False)
    assert "resume=True" in str(e.value)
    assert_python_words(str(e.value))
    # resume=True where there is no run: the fix is to drop resume=True.
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        starflow.train(out=tmp_path / "new", progress=False, resume=True)
    assert "resume=True" in str(e.value)
    assert_python_words(str(e.value))


def test_damaged_run_does_not_offer_calibrate_false(gaussian_run, spectra, tmp_path):
    """calibrate=False is a way around missing validation data, not around a damaged run."""
    run = tmp_path / "run"
    shutil.copytree(gaussian_run.path, run)
    (run / "calibration.json").unlink()
    (run / "state.json").write_text('{"format": 1, "epo')
    with pytest.raises(ValueError, match="not valid JSON") as e:
        starflow.load_run(run)
    assert "calibrate=False" not in str(e.value)


def test_synth_and_flow_arguments_speak_python():
    for kwargs, name in [({"n": -1}, "n"), ({"n": 3, "seed": -1}, "seed"),
                         ({"n": 3, "pixels_per_camera": -16}, "pixels_per_camera"),
                         ({"n": 3, "seed": 2**64}, "seed")]:
        with pytest.raises(ValueError, match=rf"^{name} must be between"):
            starflow.synth(**kwargs)
    # The largest seed is a seed.
    assert starflow.synth(1, seed=2**64 - 1, pixels_per_camera=16)[0].shape == (1, 64)
    with pytest.raises(ValueError, match="^dim must be between 1 and"):
        starflow.Flow("full_flow", dim=-3)
    flow = starflow.Flow("diagonal_gaussian")
    params = np.zeros((2, flow.n_params))
    with pytest.raises(ValueError, match="^n must be between 1 and"):
        flow.sample(params, -1)
    with pytest.raises(ValueError, match="sample fewer rows per call"):
        flow.sample(np.zeros((10_000, flow.n_params)), 100_000)
    with pytest.raises(ValueError, match="^seed must be between"):
        flow.sample(params, 3, seed=-2)
