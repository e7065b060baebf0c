"""Shared fixtures: two tiny trained runs (one Gaussian flow, one sampled flow) and the CLI.

`cargo xtask ci` builds the package into its virtualenv and sets STARFLOW_CLI to the `starflow`
binary of the same build, against which the predictions are compared bit for bit.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import starflow

ROOT = Path(__file__).resolve().parents[3]

# The training crate's TrainConfig::tiny (4 x 64 pixels, batch 32, seconds per run) with 480 stars
# and a validation split of 120, enough for recalibration maps (MIN_CALIBRATION_STARS = 100).
TINY = {
    "data": {
        "synthetic_n": 480,
        "synthetic_pixels_per_camera": 64,
        "train_fraction": 0.6,
        "val_fraction": 0.25,
        "test_fraction": 0.15,
    },
    "optim": {"batch_size": 32, "lr": 1e-3},
    "run": {"seed": 5, "threads": 2},
}


@pytest.fixture(scope="session")
def cli():
    """The `starflow` binary: $STARFLOW_CLI, else target/debug/starflow."""
    path = Path(os.environ.get("STARFLOW_CLI", ROOT / "target" / "debug" / "starflow"))
    if not path.exists():
        pytest.fail(f"{path} does not exist; build it with `cargo build -p starflow-cli`")
    return path


def run_cli(cli, *args, check=True):
    done = subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"starflow {' '.join(map(str, args))} failed:\n{done.stderr}")
    return done


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The tiny synthetic set, written by starflow.synth like `starflow synth` would."""
    d = tmp_path_factory.mktemp("data")
    starflow.synth(480, seed=5, pixels_per_camera=64, out=d)
    return d


def _train(tmp_path_factory, data_dir, flow):
    out = tmp_path_factory.mktemp(f"run-{flow}")
    shutil.rmtree(out)
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["data"]["dir"] = str(data_dir)
    return starflow.train(cfg, out=out, progress=False, flow=flow, backbone="tiny_cnn", epochs=2)


@pytest.fixture(scope="session")
def gaussian_run(tmp_path_factory, data_dir):
    return _train(tmp_path_factory, data_dir, "full_gaussian")


@pytest.fixture(scope="session")
def flow_run(tmp_path_factory, data_dir):
    return _train(tmp_path_factory, data_dir, "full_flow")


@pytest.fixture(scope="session")
def spectra(data_dir):
    return np.load(data_dir / "spectra.npy")
