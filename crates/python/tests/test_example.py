"""The notebook-style example runs end to end, and the default progress display works."""

import shutil
import subprocess
import sys
import types
from pathlib import Path

import starflow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_runs_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for label in ("t_eff", "log_g", "fe_h"):
        assert f"{label}: RMSE" in out
    assert "posterior samples of star 0: (1, 2000, 3)" in out
    # The progress display printed one line per epoch.
    assert done.stderr.count("val nll") == 6
    assert (tmp_path / "run" / "calibration.json").exists()


def test_progress_uses_tqdm_when_installed(monkeypatch, data_dir, tmp_path, capsys):
    bars = []

    class FakeBar:
        def __init__(self, total, desc, leave):
            self.total, self.desc, self.n = total, desc, 0
            bars.append(self)

        def update(self, k):
            self.n += k

        def set_postfix(self, **kw):
            self.postfix = kw

        def close(self):
            self.closed = True

    auto = types.ModuleType("tqdm.auto")
    auto.tqdm = FakeBar
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", auto)
    cfg = {"data": {"dir": str(data_dir), "synthetic_n": 480, "synthetic_pixels_per_camera": 64}}
    starflow.train(cfg, out=tmp_path / "run", epochs=2, optim__batch_size=32, flow="diagonal_gaussian")
    assert [b.desc for b in bars] == ["epoch 1/2", "epoch 2/2"]
    assert all(b.n == b.total and b.closed for b in bars)
    assert capsys.readouterr().err.count("val nll") == 2


def test_the_readme_example_runs_as_pasted(tmp_path):
    """README's Python blocks, run from a copy of the repository's configs (they write runs/py and
    data/synth-py where they run), must work on a fresh checkout without runs/quick; the dask
    block's chunked prediction on a two-process LocalCluster must equal one call."""
    root = Path(__file__).resolve().parents[3]
    text = (root / "README.md").read_text()
    start = text.index("```python\nimport numpy as np, starflow")
    block = text[start + len("```python\n"):text.index("```", start + 10)]
    # The dask block, run after it (its last line checks that it equals one call).
    start = text.index("```python\nimport dask")
    block += text[start + len("```python\n"):text.index("```", start + 10)]
    shutil.copytree(root / "configs", tmp_path / "configs")
    check = block + (
        "\nimport math\n"
        "assert all(math.isfinite(v) for v in logp), logp\n"
        "assert draws.shape == (2, 100, 3)\n"
        "assert len(pred['t_eff_mean']) == 500\n"
        "print('readme example ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "readme example ok" in done.stdout


def test_the_package_readme_shows_the_tested_example():
    """crates/python/README.md repeats the main README's first Python block, which the test above
    runs; a change to one must reach the other."""
    root = Path(__file__).resolve().parents[3]
    main = (root / "README.md").read_text()
    start = main.index("```python\nimport numpy as np, starflow")
    block = main[start:main.index("```", start + 10)]
    assert block in (root / "crates" / "python" / "README.md").read_text()
