"""Type stubs of the compiled module ``starflow._native`` (re-exported by ``starflow``)."""

from os import PathLike
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str
FLOW_NAMES: list[str]

_Path = Union[str, PathLike[str]]
_Spectra = npt.ArrayLike

class Run:
    """A trained run: its model at the best epoch, its configuration and history."""

    @property
    def path(self) -> Path: ...
    @property
    def labels(self) -> list[str]: ...
    @property
    def n_pix(self) -> int: ...
    @property
    def config(self) -> dict[str, dict[str, Any]]: ...
    @property
    def history(self) -> list[dict[str, float]]: ...
    @property
    def state(self) -> dict[str, Any]: ...
    def predict(
        self,
        spectra: _Spectra,
        samples: int = 1000,
        calibrate: bool = True,
        seed: int = 0,
        as_frame: Optional[bool] = None,
        first_row: int = 0,
    ) -> Any:
        """Per-star posterior summaries in physical units (`row`, then `<label>_mean`, `_std`,
        `_q025`, `_q16`, `_q50`, `_q84`, `_q975`): a pandas DataFrame when pandas is installed
        (or `as_frame=True`), else a dict of numpy arrays. Rows are numbered from `first_row`, so
        chunks of a large set concatenate to exactly the one-call result."""
    def posterior_samples(
        self,
        spectra: _Spectra,
        n: int = 1000,
        calibrate: bool = True,
        seed: int = 0,
        first_row: int = 0,
    ) -> npt.NDArray[np.float64]:
        """`n` posterior samples per spectrum, shape `(n_stars, n, n_labels)`."""

class Flow:
    """A conditional normalizing flow by name: diagonal_gaussian, full_gaussian or full_flow."""

    def __init__(self, name: str, dim: int = 3) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def n_params(self) -> int: ...
    def log_prob(self, params: npt.ArrayLike, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """`log p(x | params)` for params `(b, n_params)` and x `(b, dim)`; shape `(b,)`."""
    def sample(self, params: npt.ArrayLike, n: int, seed: int = 0) -> npt.NDArray[np.float64]:
        """`n` samples per parameter row, shape `(b, n, dim)`."""

def tune_allocator() -> bool:
    """Keep large freed blocks in the heap (glibc), as the `starflow` command does: faster
    prediction and training at scale; process-wide, opt-in. Returns whether it applied."""

def load_run(path: _Path) -> Run:
    """Open a run directory written by `starflow train` or `starflow.train`."""

def synth(
    n: int,
    seed: int = 42,
    pixels_per_camera: int = 4096,
    giant_fraction: float = 0.18,
    snr_min: float = 15.0,
    snr_max: float = 250.0,
    marginal_crlb: bool = False,
    out: Optional[_Path] = None,
) -> Tuple[
    npt.NDArray[np.float32],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]:
    """`(spectra (n, n_pix), labels (n, 8), wavelength (n_pix,), crlb (n, 3))`."""

def train(
    config: Optional[str] = None,
    overrides: Sequence[str] = ...,
    out: Optional[str] = None,
    resume: bool = False,
    callback: Optional[Callable[[str, dict[str, Any]], None]] = None,
) -> Run: ...
