//! Rust errors as Python exceptions. The message is the command line's (`error_line`) spoken in
//! Python's terms ([`pythonic`]: `resume=True` for `--resume`, `calibrate=False` for `--raw`, ...),
//! so a user sees the same file, problem and fix in a notebook as in a terminal, with a fix they
//! can type where they are; the exception type follows
//! the crates' own classification: a missing file or run is `FileNotFoundError`, other bad input
//! or settings `ValueError`, an interrupted training `KeyboardInterrupt`, anything else (a bug,
//! the disk) `RuntimeError`.

use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::{PyErr, PyResult};
use starflow_data::error::error_line;
use starflow_data::DataError;
use starflow_flows::FlowError;
use starflow_inference::calibration_unavailable;
use starflow_training::TrainError;

pub fn train_error(err: TrainError) -> PyErr {
    let msg = error_line(&err);
    typed(&err, msg)
}

/// The command line's words in a message and what a Python caller writes instead, in the order
/// they are replaced (longer phrases before the flags they contain). Flags without a Python
/// counterpart here never reach this package (`--data`, `--h5-spectra`: no `evaluate` or HDF5
/// input in Python).
const CLI_TO_PYTHON: &[(&str, &str)] = &[
    ("`starflow synth --out DIR`", "`starflow.synth(n, out=DIR)`"),
    ("`starflow train` run", "`starflow.train` run"),
    ("from the command line", "from the overrides"),
    ("(--set ", "(override "),
    (
        "only --epochs, or optim.epochs,",
        "only epochs=, or optim.epochs,",
    ),
    (
        "predict the rows around them with --rows",
        "predict the rows around them (slice the array; first_row= keeps their row numbers)",
    ),
    ("--resume", "resume=True"),
    ("--drop-nonfinite", "data__drop_nonfinite=True"),
    ("--label-names", "data__label_names=[...]"),
    ("--targets", "data__targets=[...]"),
    ("--samples", "samples"),
    ("--raw", "calibrate=False"),
    ("--out", "`out`"),
];

/// `msg` with the command line's commands, flags and phrases in Python's terms (see
/// [`CLI_TO_PYTHON`]); `starflow train --out RUN --resume` becomes the call that resumes RUN.
pub fn pythonic(msg: &str) -> String {
    let mut out = resume_command(msg);
    for (cli, python) in CLI_TO_PYTHON {
        out = out.replace(cli, python);
    }
    out
}

/// Rewrites every `` `starflow train --out RUN --resume` `` in `msg` as the Python call.
fn resume_command(msg: &str) -> String {
    const START: &str = "`starflow train --out ";
    const END: &str = " --resume`";
    let mut out = String::new();
    let mut rest = msg;
    while let Some(i) = rest.find(START) {
        let after = &rest[i + START.len()..];
        let Some(j) = after.find(END) else { break };
        out.push_str(&rest[..i]);
        out.push_str(&format!(
            "`starflow.train(config, out={:?}, resume=True)`",
            &after[..j]
        ));
        rest = &after[j + END.len()..];
    }
    out.push_str(rest);
    out
}

/// A failure to fit a run's recalibration (its validation data are gone, say), with the way out
/// a Python user has, as the command line gives its own (`--raw`).
pub fn calibration_error(run: &std::path::Path, err: TrainError) -> PyErr {
    if !err.is_about_data() {
        return train_error(err);
    }
    let msg = format!(
        "{} ({})",
        calibration_unavailable(run, "calibrate=False"),
        error_line(&err)
    );
    typed(&err, msg)
}

/// `msg`, in Python's terms, as the exception type of `err`.
fn typed(err: &TrainError, msg: String) -> PyErr {
    let msg = pythonic(&msg);
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
    let msg = pythonic(&error_line(&err));
    match err {
        FlowError::Candle(_) => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

pub fn candle_error(err: candle_core::Error) -> PyErr {
    PyRuntimeError::new_err(error_line(&err))
}

/// A whole-number argument checked in Python's terms: a `ValueError` naming the argument and its
/// range, instead of pyo3's `OverflowError` for a negative value or one past the native type.
pub fn count(name: &str, value: i64, min: usize, max: usize) -> PyResult<usize> {
    match usize::try_from(value) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(PyValueError::new_err(format!(
            "{name} must be between {min} and {max} (got {value})"
        ))),
    }
}

/// A seed: any whole number from 0 to 2**64 - 1, as a `ValueError` otherwise.
pub fn seed(value: i128) -> PyResult<u64> {
    u64::try_from(value).map_err(|_| {
        PyValueError::new_err(format!(
            "seed must be between 0 and 2**64 - 1 (got {value})"
        ))
    })
}
