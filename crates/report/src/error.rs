//! Errors of the report crate.

use std::path::PathBuf;

use starflow_training::TrainError;

pub type Result<T> = std::result::Result<T, ReportError>;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Loading or evaluating a run failed (its message names the file and the fix).
    #[error(transparent)]
    Run(#[from] TrainError),
    #[error(transparent)]
    Data(#[from] starflow_data::DataError),
    #[error("{path}: {message}")]
    Plot { path: PathBuf, message: String },
    #[error("{path}: cannot write the table ({message})")]
    Table { path: PathBuf, message: String },
    #[error("{0}")]
    Input(String),
}

impl ReportError {
    /// True when the cause is the user's input (a missing or incompatible run), not a bug.
    pub fn is_user_error(&self) -> bool {
        match self {
            ReportError::Run(e) => e.is_user_error(),
            ReportError::Data(e) => e.is_user_error(),
            ReportError::Input(_) => true,
            ReportError::Plot { .. } | ReportError::Table { .. } => false,
        }
    }
}
