"""starflow from Python, end to end: draw synthetic spectra, train a small model, predict with
calibrated uncertainties, and check the calibration on stars the model never saw.

    python crates/python/examples/quickstart.py [WORKDIR]

Well under a minute on a laptop: 1,000 training stars of 4 x 128 pixels, TinyCNN, 6 epochs.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

import starflow

work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="starflow-"))
recipe = Path(__file__).resolve().parents[3] / "configs" / "recommended.toml"

# 1. Synthetic GALAH-like data: spectra (n, n_pix) float32 and labels (n, 8) in GALAH's order.
starflow.synth(1000, seed=1, pixels_per_camera=128, out=work / "train-data")
spectra, labels, wavelength, crlb = starflow.synth(500, seed=2, pixels_per_camera=128)
print(f"held-out set: {spectra.shape[0]} spectra of {spectra.shape[1]} pixels")

# 2. Train TinyCNN + the full Gaussian flow with the recommended recipe, shortened, on those files
#    (synthetic=False reads spectra.npy/labels.npy as they are, as for real data). One line per epoch.
run = starflow.train(
    recipe,
    out=work / "run",
    flow="full_gaussian",
    epochs=6,
    data__dir=work / "train-data",
    data__synthetic=False,
    optim__offdiagonal_warmup_epochs=2,
)
print(run)

# 3. Predict on spectra the model never saw: posterior mean, std and quantiles per star.
pred = run.predict(spectra, samples=1000, seed=0, as_frame=False)
truth = {"t_eff": labels[:, 4], "log_g": labels[:, 5], "fe_h": labels[:, 6]}
for name, t in truth.items():
    pull = (pred[f"{name}_mean"] - t) / pred[f"{name}_std"]
    inside = np.mean((pred[f"{name}_q16"] <= t) & (t <= pred[f"{name}_q84"]))
    rmse = np.sqrt(np.mean((pred[f"{name}_mean"] - t) ** 2))
    print(f"{name:>6}: RMSE {rmse:8.3f}  pull std {pull.std():.2f}  68% interval covers {100 * inside:.0f}%")

# 4. Posterior samples for a corner plot of one star, e.g. with matplotlib or corner.
samples = run.posterior_samples(spectra[:1], 2000)
print("posterior samples of star 0:", samples.shape, "median", np.median(samples[0], axis=0).round(3))

# 5. A flow on its own: the log-density of labels under given flow parameters.
flow = starflow.Flow("full_gaussian")
print(flow, flow.log_prob(np.zeros((1, flow.n_params)), np.zeros((1, 3))))
