"""starflow: stellar labels with calibrated posteriors, from spectra.

A 1-D CNN reads each spectrum and sets the parameters of a conditional normalizing flow over
t_eff (K), log_g (dex) and fe_h (dex). This package is a thin layer over the Rust crates:

- ``load_run(path)`` opens a trained run; ``Run.predict(spectra)`` gives per-star posterior
  summaries (a pandas DataFrame when pandas is installed), ``Run.posterior_samples(spectra, n)``
  the samples themselves;
- ``Flow(name)`` is one of the three flows on its own (``log_prob``, ``sample``), for use behind
  your own network;
- ``synth(n, seed)`` draws GALAH-like synthetic spectra with their labels and Cramér–Rao bounds;
- ``train(config, **overrides)`` trains a run, with a progress display.

Long calls release the GIL. Errors are Python exceptions carrying the command line's message in
Python's words (``resume=True`` for ``--resume``, ``calibrate=False`` for ``--raw``):
``FileNotFoundError`` for a missing file or run, ``ValueError`` for other bad input or settings,
``KeyboardInterrupt`` when Ctrl-C stops training (the run resumes with ``resume=True``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Mapping, Optional, Union

from ._native import FLOW_NAMES, Flow, Run, __version__, load_run, synth, tune_allocator
from . import _native

__all__ = [
    "FLOW_NAMES",
    "Flow",
    "Run",
    "__version__",
    "load_run",
    "synth",
    "train",
    "tune_allocator",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Shorthand keywords of ``train`` and the config keys they set (as ``starflow train --flow`` etc.).
_SHORTHANDS = {"flow": "model.flow", "backbone": "model.backbone", "epochs": "optim.epochs"}


def _toml_value(value: Any) -> str:
    """A Python value as a TOML literal for a ``section.key=value`` override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes).
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot pass {value!r} ({type(value).__name__}) as a config value")


def _overrides(config: Optional[Mapping[str, Any]], overrides: Mapping[str, Any]) -> list:
    """``section.key=value`` strings from a config dict and keyword overrides."""
    out = []
    for section, keys in (config or {}).items():
        if not isinstance(keys, Mapping):
            raise ValueError(
                f"config[{section!r}] must be a dict of keys (e.g. {{'optim': {{'lr': 1e-3}}}})"
            )
        out += [f"{section}.{k}={_toml_value(v)}" for k, v in keys.items()]
    for key, value in overrides.items():
        key = _SHORTHANDS.get(key, key.replace("__", "."))
        out.append(f"{key}={_toml_value(value)}")
    return out


class _Progress:
    """Training progress on stderr: a tqdm bar per epoch when tqdm is installed, else one line per
    epoch like the command line's."""

    def __init__(self) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self._tqdm = tqdm
        self._bar = None

    def __call__(self, event: str, info: dict) -> None:
        if event == "message":
            print(info["text"], file=sys.stderr, flush=True)
        elif event == "epoch_start" and self._tqdm is not None:
            self._bar = self._tqdm(
                total=info["n_steps"],
                desc=f"epoch {info['epoch'] + 1}/{info['n_epochs']}",
                leave=False,
            )
        elif event == "step" and self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(nll=f"{info['running_nll']:.4f}", refresh=False)
        elif event == "epoch_end":
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            skipped = info["steps_skipped"]
            print(
                f"epoch {info['epoch'] + 1:>3}: train nll {info['train_nll']:.4f}  "
                f"val nll {info['val_nll']:.4f}  lr {info['lr']:.2e}  {info['seconds']:.1f} s"
                + (f"  ({skipped} steps skipped)" if skipped else ""),
                file=sys.stderr,
                flush=True,
            )


def train(
    config: Union[None, PathLike, Mapping[str, Mapping[str, Any]]] = None,
    *,
    out: Optional[PathLike] = None,
    resume: bool = False,
    progress: Union[bool, Callable[[str, dict], None]] = True,
    **overrides: Any,
) -> Run:
    """Train a backbone and flow; returns the finished :class:`Run`.

    ``config`` is a TOML file (see ``configs/``), a dict of sections such as
    ``{"optim": {"lr": 1e-3}}`` applied over the defaults, or ``None`` for the defaults.
    Keyword overrides set single keys: ``flow=``, ``backbone=`` and ``epochs=`` as on the command
    line, any other key as ``section__key=value`` (``optim__lr=3e-4``) or ``**{"optim.lr": 3e-4}``.
    ``out`` is the run directory (default ``runs/<backbone>-<flow>``); ``resume=True`` continues an
    interrupted run there. ``progress`` shows a progress display on stderr (``True``), nothing
    (``False``), or calls your ``callback(event, info)``.

    The same request trains the same run as ``starflow train`` with the same seed. When training
    finishes, the recalibration is fitted on the validation split (or on the config's synthetic
    calibration set, ``data.calibration_n``), as on the command line.
    """
    path = None
    table = None
    if isinstance(config, Mapping):
        table = config
    elif config is not None:
        path = os.fspath(config)
    callback = _Progress() if progress is True else (progress or None)
    return _native.train(
        config=path,
        overrides=_overrides(table, overrides),
        out=None if out is None else os.fspath(out),
        resume=resume,
        callback=callback,
    )
