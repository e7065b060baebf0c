//! `starflow.load_run` and the `Run` class: a trained run, predicting from numpy spectra.

use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use starflow_inference::{
    load_or_fit_calibration, PosteriorSettings, Run as InferenceRun, Sampler, SpectraSlice,
    StarPrediction, MAX_SAMPLES,
};

use crate::arrays::array;
use crate::errors::{calibration_error, count, train_error};

/// Names the spectra in error messages, where the command line names the file.
const ARRAY_ORIGIN: &str = "spectra array";

/// A trained run: its model at the best epoch, its configuration and its training history.
#[pyclass(frozen, module = "starflow")]
pub struct Run {
    model: InferenceRun,
}

/// Opens the run directory written by `starflow train` (or `starflow.train`).
#[pyfunction]
pub fn load_run(py: Python<'_>, path: PathBuf) -> PyResult<Run> {
    let model = py
        .detach(|| InferenceRun::open(&path))
        .map_err(train_error)?;
    Ok(Run { model })
}

impl Run {
    pub fn new(model: InferenceRun) -> Self {
        Run { model }
    }

    /// The posterior settings of one call: the run's recalibration when asked, fitted on its
    /// validation split and cached in the run when it has none yet (as on the command line).
    fn settings(
        &self,
        py: Python<'_>,
        samples: usize,
        seed: u64,
        calibrate: bool,
    ) -> PyResult<PosteriorSettings> {
        let calibration = if calibrate {
            let dir = self.model.dir();
            let c = match self.model.saved_calibration() {
                Some(c) => c,
                None => load_or_fit_calibration(dir, Sampler::new(samples, seed))
                    .map_err(|e| calibration_error(dir, e))?,
            };
            if c.too_few_stars {
                // As the command line says "not recalibrated": a user who asked for calibrated
                // posteriors must hear that they are the model's own.
                let message = format!(
                    "not recalibrated: the {} set of {} has {} stars and the maps need at least \
                     {}; the model's own posteriors are used (as with calibrate=False)",
                    c.fitted_on,
                    dir.display(),
                    c.n_stars,
                    starflow_inference::MIN_CALIBRATION_STARS
                );
                let cstr = std::ffi::CString::new(message).unwrap_or_default();
                let category = py.get_type::<pyo3::exceptions::PyUserWarning>();
                PyErr::warn(py, category.as_any(), &cstr, 1)?;
            }
            Some(c)
        } else {
            None
        };
        Ok(Sampler::new(samples, seed).with(calibration))
    }
}

/// Predictions as columns: `row` (int64) and the float columns of [`StarPrediction::columns`].
fn columns<'py>(
    py: Python<'py>,
    names: &[String],
    stars: &[StarPrediction],
) -> PyResult<Bound<'py, PyDict>> {
    let d = names.len();
    let cols = StarPrediction::columns(names, false);
    let mut values: Vec<Vec<f64>> = vec![Vec::with_capacity(stars.len()); cols.len() - 1];
    for s in stars {
        for (col, cell) in values.iter_mut().zip(s.cells(d, false)) {
            col.push(cell.unwrap_or(f64::NAN));
        }
    }
    let out = PyDict::new(py);
    let rows: Vec<i64> = stars.iter().map(|s| s.row as i64).collect();
    out.set_item("row", array(py, rows, &[stars.len()])?)?;
    for (name, col) in cols[1..].iter().zip(values) {
        let n = col.len();
        out.set_item(name, array(py, col, &[n])?)?;
    }
    Ok(out)
}

/// Runs `work` on the spectra argument lent to Rust as it is (see [`crate::arrays::spectra`]) as
/// rows `first_row..`, without the GIL; returns its result and the number of spectra. The array
/// is checked (its type, shape and pixel count against the run) before `settings` is called, as
/// that may fit the run's recalibration first (minutes).
fn on_spectra<'py, T: Send>(
    py: Python<'py>,
    model: &InferenceRun,
    spectra: &Bound<'py, PyAny>,
    first_row: usize,
    settings: impl FnOnce() -> PyResult<PosteriorSettings>,
    work: impl FnOnce(&SpectraSlice<'_>, &PosteriorSettings) -> starflow_training::Result<T> + Send,
) -> PyResult<(T, usize)> {
    let arr = crate::arrays::spectra(spectra)?;
    let (n_stars, n_pix) = arr.shape();
    let fluxes = arr.fluxes()?;
    let view = SpectraSlice::new(fluxes, n_pix, Path::new(ARRAY_ORIGIN)).map_err(train_error)?;
    let view = view.starting_at(first_row);
    model.check_pixels(&view).map_err(train_error)?;
    let settings = settings()?;
    let out = py.detach(|| work(&view, &settings)).map_err(train_error)?;
    Ok((out, n_stars))
}

/// `json.loads` of a serialisable value: plain dicts, lists, numbers and strings.
fn plain<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

#[pymethods]
impl Run {
    /// Posterior summaries of each spectrum in physical units: `row`, then per label its mean,
    /// standard deviation and the 2.5/16/50/84/97.5 % quantiles (the columns of `starflow
    /// predict`). A pandas DataFrame when pandas is installed (or `as_frame=True`), else a dict
    /// of numpy arrays. `calibrate` applies the run's recalibration, as the command line does
    /// unless `calibrate=False`. Each star's posterior samples come from its own stream (the seed and
    /// its row), so the result equals `starflow predict` on the same spectra bit for bit. The rows
    /// are numbered from `first_row`: predicting a large set in chunks, pass each chunk's first row
    /// and the chunks concatenate to exactly the one-call result (as `starflow predict --rows`).
    #[pyo3(signature = (spectra, samples=1000, calibrate=true, seed=0, as_frame=None, first_row=0))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments, each with its default
    fn predict<'py>(
        &self,
        py: Python<'py>,
        spectra: &Bound<'py, PyAny>,
        samples: i64,
        calibrate: bool,
        seed: i128,
        as_frame: Option<bool>,
        first_row: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let samples = count("samples", samples, 10, MAX_SAMPLES)?;
        let seed = crate::errors::seed(seed)?;
        let first_row = count("first_row", first_row, 0, usize::MAX)?;
        let (stars, _) = on_spectra(
            py,
            &self.model,
            spectra,
            first_row,
            || self.settings(py, samples, seed, calibrate),
            |view, settings| self.model.predict(view, settings, &|_| {}),
        )?;
        let cols = columns(py, self.model.label_names(), &stars)?;
        let pandas = match as_frame {
            Some(false) => None,
            Some(true) => Some(py.import("pandas")?),
            None => py.import("pandas").ok(),
        };
        match pandas {
            Some(pd) => pd.call_method1("DataFrame", (cols,)),
            None => Ok(cols.into_any()),
        }
    }

    /// `n` posterior samples per spectrum, physical units, shape `(n_stars, n, n_labels)`. Drawn
    /// from the same per-star streams as `predict` (rows numbered from `first_row`); recalibrated
    /// like it when `calibrate`.
    #[pyo3(signature = (spectra, n=1000, calibrate=true, seed=0, first_row=0))]
    fn posterior_samples<'py>(
        &self,
        py: Python<'py>,
        spectra: &Bound<'py, PyAny>,
        n: i64,
        calibrate: bool,
        seed: i128,
        first_row: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let n = count("n", n, 1, MAX_SAMPLES)?;
        let seed = crate::errors::seed(seed)?;
        let first_row = count("first_row", first_row, 0, usize::MAX)?;
        let (values, n_stars) = on_spectra(
            py,
            &self.model,
            spectra,
            first_row,
            || self.settings(py, n.max(10), seed, calibrate),
            |view, settings| self.model.sample(view, n, settings),
        )?;
        array(py, values, &[n_stars, n, self.model.label_names().len()])
    }

    /// The run directory.
    #[getter]
    fn path(&self) -> PathBuf {
        self.model.dir().to_path_buf()
    }

    /// The predicted labels, in column order.
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.model.label_names().to_vec()
    }

    /// Pixels per spectrum the run was trained on.
    #[getter]
    fn n_pix(&self) -> usize {
        self.model.state.n_pix
    }

    /// The run's configuration as a dict of sections (`data`, `model`, `optim`, `run`).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        plain(py, &self.model.state.config)
    }

    /// One dict per finished epoch: `epoch`, `train_nll`, `val_nll`, `lr`, `seconds`,
    /// `steps_skipped`.
    #[getter]
    fn history<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        plain(py, &self.model.state.history)
    }

    /// Epochs done, the best validation NLL and its epoch, and whether training finished.
    #[getter]
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let s = &self.model.state;
        let out = PyDict::new(py);
        out.set_item("epochs_done", s.epochs_done)?;
        out.set_item("best_val_nll", s.best_val_nll)?;
        out.set_item("best_epoch", s.best_epoch)?;
        out.set_item("finished", s.finished)?;
        out.set_item("stop_reason", s.stop_reason.clone())?;
        out.set_item("n_train", s.n_train)?;
        out.set_item("n_val", s.n_val)?;
        out.set_item("n_test", s.n_test)?;
        Ok(out.into_any())
    }

    fn __repr__(&self) -> String {
        let c = &self.model.state.config.model;
        format!(
            "Run('{}': {} + {}, {} epochs, labels {:?})",
            self.model.dir().display(),
            c.backbone,
            c.flow,
            self.model.state.epochs_done,
            self.model.label_names()
        )
    }
}
