//! The data crate's error type.
//!
//! Every variant that comes from a user's file names the file, the problem and the fix, because a
//! data loader is where users first meet the tool and a bare "invalid input" costs them an hour.
//! [`DataError::is_user_error`] lets the CLI map these to exit code 2 without string matching.

use std::path::PathBuf;

/// Everything that can go wrong while reading, validating or writing data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file does not exist or cannot be opened.
    #[error("cannot open {path}: {source} (check the path, or create the data with `starflow synth --out DIR`)")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An I/O failure while reading or writing an existing file.
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid `.npy` file, or is one we cannot read as it is.
    #[error("{path}: {problem}; fix: {fix}")]
    Npy {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    /// The file is readable but its content is unusable (shape, values, columns).
    #[error("{path}: {problem}; fix: {fix}")]
    Invalid {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    /// A configuration value is out of range (split fractions, batch size, flux floor).
    #[error("invalid setting `{name}`: {problem}")]
    Config { name: String, problem: String },
    /// HDF5 input failed (only with the `hdf5` feature).
    #[error("{path}: hdf5 error: {message}; fix: {fix}")]
    Hdf5 {
        path: PathBuf,
        message: String,
        fix: String,
    },
    /// A tensor operation failed while building a batch.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    /// True when the error is caused by the user's input or settings rather than by a bug or the
    /// environment, so that a CLI can exit with code 2.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, DataError::Io { .. } | DataError::Candle(_))
    }

    /// True when the file the caller named does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, DataError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    pub(crate) fn npy(
        path: impl Into<PathBuf>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        DataError::Npy {
            path: path.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn invalid(
        path: impl Into<PathBuf>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        DataError::Invalid {
            path: path.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn config(name: impl Into<String>, problem: impl Into<String>) -> Self {
        DataError::Config {
            name: name.into(),
            problem: problem.into(),
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, DataError>;

/// An error and its causes on one line, like anyhow's `{e:#}`, but without repeating a cause that
/// an outer message already quotes (starflow's errors print their source, e.g. "i/o error on PATH:
/// CAUSE"). The command line and the Python package show errors through it, so both say the same.
pub fn error_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut cause = Some(err);
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}
