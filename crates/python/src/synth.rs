//! `starflow.synth`: the GALAH-like synthetic generator.

use std::path::PathBuf;

use pyo3::prelude::*;
use starflow_data::SynthConfig;

use crate::arrays::array;
use crate::errors::{count, data_error};

/// Draws `n` synthetic stars; returns `(spectra, labels, wavelength, crlb)`: spectra `(n, n_pix)`
/// float32, labels `(n, 8)` in GALAH's column order (mass, age, l_bol, dist, t_eff, log_g, fe_h,
/// SNR), the wavelength grid `(n_pix,)` and the Cramér–Rao bound of t_eff, log_g, fe_h `(n, 3)`,
/// with the ~30 nuisance parameters held fixed, or marginalised when `marginal_crlb`. With `out`
/// it also writes the data set there, as `starflow synth --out` does. The same seed gives the
/// same bytes.
#[pyfunction]
#[pyo3(signature = (n, seed=42, pixels_per_camera=4096, giant_fraction=0.18, snr_min=15.0, snr_max=250.0, marginal_crlb=false, out=None))]
#[allow(clippy::too_many_arguments)]
pub fn synth<'py>(
    py: Python<'py>,
    n: i64,
    seed: i128,
    pixels_per_camera: i64,
    giant_fraction: f64,
    snr_min: f64,
    snr_max: f64,
    marginal_crlb: bool,
    out: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    // The generator checks the ranges (n >= 1, 16 <= pixels_per_camera, the upper bounds); these
    // only turn a negative or out-of-range Python int into its ValueError.
    let n = count("n", n, 0, usize::MAX)?;
    let pixels_per_camera = count("pixels_per_camera", pixels_per_camera, 0, usize::MAX)?;
    let seed = crate::errors::seed(seed)?;
    let cfg = SynthConfig {
        n,
        seed,
        pixels_per_camera,
        giant_fraction,
        snr_min,
        snr_max,
        ..SynthConfig::default()
    };
    let data = py
        .detach(|| {
            let data = starflow_data::generate(&cfg, &|_| {})?;
            if let Some(dir) = &out {
                data.write(dir)?;
            }
            Ok(data)
        })
        .map_err(data_error)?;
    let n_pix = data.n_pix;
    let crlb = if marginal_crlb {
        data.crlb_marginal
    } else {
        data.crlb
    };
    let items = (
        array(py, data.spectra, &[n, n_pix])?,
        array(py, data.labels, &[n, 8])?,
        array(py, data.wavelength, &[n_pix])?,
        array(py, crlb, &[n, 3])?,
    );
    Ok(items.into_pyobject(py)?.into_any())
}
