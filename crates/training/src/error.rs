//! The training crate's error type. User mistakes (a bad config, an incompatible run directory, a
//! spectrum of the wrong length) are told apart from failures so that the CLI exits with code 2.

use std::path::PathBuf;

/// Everything that can fail while training, evaluating or predicting.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration file or override is invalid.
    #[error("{path}: {problem}")]
    Config { path: PathBuf, problem: String },
    /// A run directory is missing, incomplete or from an incompatible version.
    #[error("{path}: {problem}; fix: {fix}")]
    Run {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    /// A run directory or file that does not exist (a user error, told apart so that a caller such
    /// as the Python package can raise its "not found" error).
    #[error("{path}: {problem}; fix: {fix}")]
    Missing {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    /// Input that does not fit the trained run (for example the wrong spectrum length).
    #[error("{path}: {problem}; fix: {fix}")]
    Input {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    /// Too many consecutive non-finite losses or gradients.
    #[error("training diverged: {count} consecutive steps had a non-finite loss or gradient (epoch {shown}); the last good checkpoint in {run} is intact; fix: lower optim.lr or set optim.grad_clip", shown = .epoch + 1)]
    Diverged {
        count: usize,
        /// 0-based; the message counts from 1 like the log and the checkpoint names.
        epoch: usize,
        run: PathBuf,
    },
    /// Writing an epoch's checkpoint failed (disk full, read-only directory, something in the way
    /// of a file). Nothing of that epoch was committed: `state.json` still names the previous
    /// epoch's files, which are untouched, so `--resume` continues from there once the cause is
    /// fixed. Not a user error (exit code 1): the input was fine, the environment was not.
    #[error("cannot write the checkpoint of epoch {epoch}: {source}; the last good checkpoint ({last_good}) in {run} is intact; fix: free disk space, make the run directory writable or remove what is in the way, then continue with `starflow train --out {run} --resume`")]
    CheckpointWrite {
        epoch: usize,
        /// "epoch N", or "none yet" when the first epoch failed.
        last_good: String,
        run: PathBuf,
        #[source]
        source: Box<TrainError>,
    },
    /// The caller asked training to stop (its [`crate::Observer::interrupted`] said so, e.g. on
    /// Ctrl-C in a notebook). The epoch in progress is not committed; the run resumes from the
    /// last committed one.
    #[error("training interrupted during epoch {shown}; the last committed epoch in {run} is intact; fix: continue it with `starflow train --out {run} --resume`", shown = .epoch + 1)]
    Interrupted {
        /// 0-based.
        epoch: usize,
        run: PathBuf,
    },
    /// Writing or reading a file failed.
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] starflow_data::DataError),
    #[error(transparent)]
    Flow(#[from] starflow_flows::FlowError),
    #[error(transparent)]
    Model(#[from] starflow_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    /// True when the error is about a run's data (missing, damaged or changed since training)
    /// rather than the run itself: the one case where a caller's "use the model's own posteriors"
    /// (`--raw`) is a way out, as fitting a recalibration needs those data and nothing else does.
    pub fn is_about_data(&self) -> bool {
        matches!(self, TrainError::Data(_) | TrainError::Input { .. })
    }

    /// True for errors caused by the user's input or settings.
    pub fn is_user_error(&self) -> bool {
        match self {
            TrainError::Config { .. }
            | TrainError::Run { .. }
            | TrainError::Missing { .. }
            | TrainError::Input { .. } => true,
            TrainError::Data(e) => e.is_user_error(),
            TrainError::Model(starflow_models::ModelError::InputTooShort { .. }) => true,
            _ => false,
        }
    }

    /// True when a file or directory the caller named does not exist.
    pub fn is_not_found(&self) -> bool {
        match self {
            TrainError::Missing { .. } => true,
            TrainError::Data(e) => e.is_not_found(),
            _ => false,
        }
    }

    /// A bad setting or request: names the file (or run) and the problem.
    pub fn config(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        TrainError::Config {
            path: path.into(),
            problem: problem.into(),
        }
    }

    /// A run directory that cannot be used as asked: names it, the problem and the fix.
    pub fn run(
        path: impl Into<PathBuf>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        TrainError::Run {
            path: path.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// An I/O failure on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, TrainError>;
