//! Rust errors as Python exceptions. The message is the command line's (`error_line`), so a user
//! sees the same file, problem and fix in a notebook as in a terminal; the exception type follows
//! the crates' own classification: a missing file or run is `FileNotFoundError`, other bad input
//! or settings `ValueError`, an interrupted training `KeyboardInterrupt`, anything else (a bug,
//! the disk) `RuntimeError`.

use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::PyErr;
use starflow_data::error::error_line;
use starflow_data::DataError;
use starflow_flows::FlowError;
use starflow_training::{calibration_unavailable, TrainError};

pub fn train_error(err: TrainError) -> PyErr {
    let msg = error_line(&err);
    typed(&err, msg)
}

/// A failure to fit a run's recalibration (its validation data are gone, say), with the way out
/// a Python user has, as the command line gives its own (`--raw`).
pub fn calibration_error(run: &std::path::Path, err: TrainError) -> PyErr {
    if matches!(err, TrainError::Missing { .. }) {
        return train_error(err);
    }
    let msg = format!(
        "{} ({})",
        calibration_unavailable(run, "calibrate=False"),
        error_line(&err)
    );
    typed(&err, msg)
}

/// `msg` as the exception type of `err`.
fn typed(err: &TrainError, msg: String) -> PyErr {
    if err.is_not_found() {
        PyFileNotFoundError::new_err(msg)
    } else if matches!(err, TrainError::Interrupted { .. }) {
        PyKeyboardInterrupt::new_err(msg)
    } else if err.is_user_error() {
        PyValueError::new_err(msg)
    } else {
        PyRuntimeError::new_err(msg)
    }
}

pub fn data_error(err: DataError) -> PyErr {
    train_error(TrainError::Data(err))
}

/// A flow's errors come from its arguments (shapes, names, values that overflow), except those
/// of the tensor library underneath.
pub fn flow_error(err: FlowError) -> PyErr {
    let msg = error_line(&err);
    match err {
        FlowError::Candle(_) => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

pub fn candle_error(err: candle_core::Error) -> PyErr {
    PyRuntimeError::new_err(error_line(&err))
}
