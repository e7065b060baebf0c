//! `starflow._native.train`: training from Python, with the GIL released while it works and the
//! progress reported to a Python callable.

use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use starflow_inference::{train_and_calibrate, Run as InferenceRun};
use starflow_training::{EpochRecord, Observer, TrainOptions, TrainRequest};

use crate::errors::train_error;
use crate::run::Run;

/// Reports training events to a Python callable `callback(event, info)` and watches for Ctrl-C.
/// The training loop runs without the GIL; each event takes it for the call. An exception from
/// the callback, or a pending signal such as KeyboardInterrupt, is kept and stops training at the
/// next step (the epoch in progress is not committed); `train` then raises it.
struct PyObserver {
    callback: Option<Py<PyAny>>,
    error: Mutex<Option<PyErr>>,
}

impl PyObserver {
    fn emit(&self, event: &str, fill: impl FnOnce(&Bound<'_, PyDict>) -> PyResult<()>) {
        if self.failed() {
            return;
        }
        let result = Python::attach(|py| -> PyResult<()> {
            py.check_signals()?;
            if let Some(cb) = &self.callback {
                let info = PyDict::new(py);
                fill(&info)?;
                cb.call1(py, (event, info))?;
            }
            Ok(())
        });
        if let Err(e) = result {
            *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        }
    }

    fn failed(&self) -> bool {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn take_error(&self) -> Option<PyErr> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Observer for PyObserver {
    fn message(&self, text: &str) {
        self.emit("message", |d| d.set_item("text", text));
    }
    fn epoch_start(&self, epoch: usize, n_epochs: usize, n_steps: usize) {
        self.emit("epoch_start", |d| {
            d.set_item("epoch", epoch)?;
            d.set_item("n_epochs", n_epochs)?;
            d.set_item("n_steps", n_steps)
        });
    }
    fn step(&self, step: usize, running_nll: f64) {
        self.emit("step", |d| {
            d.set_item("step", step)?;
            d.set_item("running_nll", running_nll)
        });
    }
    fn epoch_end(&self, r: &EpochRecord) {
        self.emit("epoch_end", |d| {
            d.set_item("epoch", r.epoch)?;
            d.set_item("train_nll", r.train_nll)?;
            d.set_item("val_nll", r.val_nll)?;
            d.set_item("lr", r.lr)?;
            d.set_item("seconds", r.seconds)?;
            d.set_item("steps_skipped", r.steps_skipped)
        });
    }
    fn interrupted(&self) -> bool {
        self.failed()
    }
}

/// Trains as `starflow train --config CONFIG --set OVERRIDE... --out OUT [--resume]` does, fits
/// the recalibration when training finishes, and returns the run. `callback(event, info)` sees
/// the progress (`message`, `epoch_start`, `step`, `epoch_end`).
#[pyfunction]
#[pyo3(signature = (config=None, overrides=Vec::new(), out=None, resume=false, callback=None))]
pub fn train(
    py: Python<'_>,
    config: Option<PathBuf>,
    overrides: Vec<String>,
    out: Option<PathBuf>,
    resume: bool,
    callback: Option<Py<PyAny>>,
) -> PyResult<Run> {
    let request = TrainRequest {
        config,
        overrides,
        out,
        resume,
    };
    let observer = PyObserver {
        callback,
        error: Mutex::new(None),
    };
    let result = py.detach(|| {
        let (cfg, out) = request.resolve()?;
        let mut opts = TrainOptions::new(&out);
        opts.resume = request.resume;
        // As the command line does: the recalibration is fitted while the data are at hand, so
        // that predictions are recalibrated wherever the run goes.
        train_and_calibrate(&cfg, &opts, &observer, |_| {})?;
        InferenceRun::open(&out)
    });
    if let Some(e) = observer.take_error() {
        return Err(e);
    }
    Ok(Run::new(result.map_err(train_error)?))
}
