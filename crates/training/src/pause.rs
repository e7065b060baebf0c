//! Test hook: stop training at a named point so that a test can act on the process there (send it
//! SIGKILL, put something in the way of the next checkpoint file) deterministically, without
//! racing a timer against the training loop.
//!
//! At the point, [`train`](crate::train()) writes a marker file `RUN/.paused-<point>` (for example
//! `.paused-checkpoint`) and waits until the marker is deleted, then carries on. A test waits for
//! the marker, does what it wants (kill, chmod, mkdir) and, if the run should continue, deletes it.
//! The wait is bounded by [`PAUSE_LIMIT`] so that a test that dies leaves no process waiting for
//! ever. The hook is off unless [`TrainOptions::pause_at`](crate::TrainOptions) is set (the CLI
//! reads `STARFLOW_PAUSE_AT`), and costs one comparison per step when off.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest a paused run waits for its marker to be deleted before it continues on its own.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(120);

/// Where training pauses. Steps count like `TrainOptions::inject_nan_steps` (global, 0-based,
/// skipped steps included); epochs count from 1, like the checkpoint file names and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PauseAt {
    /// `step:N`: before global training step N, i.e. between two steps of an epoch.
    Step(u64),
    /// `validation:E`: during the validation of epoch E, after its first batch.
    Validation(usize),
    /// `checkpoint:E:FILE`: while epoch E's checkpoint writes the file named FILE (a file name such
    /// as `model.safetensors`, `model-e0002.safetensors`, `state.json` or `metrics.csv`). The pause
    /// comes after the temporary file has been written (text files: half written) and before the
    /// rename that would make it visible, so a kill there must leave the previous file in place.
    Checkpoint { epoch: usize, file: String },
    /// `commit:E`: after epoch E's `state.json` is committed, before the previous epoch's
    /// checkpoint files are deleted.
    Commit(usize),
}

impl PauseAt {
    /// The `<point>` part of the marker name `.paused-<point>`.
    pub fn point(&self) -> &'static str {
        match self {
            PauseAt::Step(_) => "step",
            PauseAt::Validation(_) => "validation",
            PauseAt::Checkpoint { .. } => "checkpoint",
            PauseAt::Commit(_) => "commit",
        }
    }

    /// The marker file written into `run` when the pause is reached.
    pub fn marker(&self, run: &Path) -> PathBuf {
        run.join(format!(".paused-{}", self.point()))
    }
}

impl std::fmt::Display for PauseAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PauseAt::Step(n) => write!(f, "step:{n}"),
            PauseAt::Validation(e) => write!(f, "validation:{e}"),
            PauseAt::Checkpoint { epoch, file } => write!(f, "checkpoint:{epoch}:{file}"),
            PauseAt::Commit(e) => write!(f, "commit:{e}"),
        }
    }
}

impl std::str::FromStr for PauseAt {
    type Err = String;

    /// Parses `step:N`, `validation:E`, `checkpoint:E:FILE` or `commit:E`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || {
            format!("`{s}` is not a pause point; use step:N, validation:E, checkpoint:E:FILE or commit:E")
        };
        let mut parts = s.trim().splitn(3, ':');
        let kind = parts.next().unwrap_or_default();
        let n: u64 = parts
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(usage)?;
        let rest = parts.next();
        let epoch = || {
            usize::try_from(n)
                .ok()
                .filter(|&e| e >= 1)
                .ok_or_else(usage)
        };
        match (kind, rest) {
            ("step", None) => Ok(PauseAt::Step(n)),
            ("validation", None) => Ok(PauseAt::Validation(epoch()?)),
            ("commit", None) => Ok(PauseAt::Commit(epoch()?)),
            ("checkpoint", Some(file)) if !file.is_empty() => Ok(PauseAt::Checkpoint {
                epoch: epoch()?,
                file: file.to_string(),
            }),
            _ => Err(usage()),
        }
    }
}

/// Writes the marker and waits until it is deleted (or [`PAUSE_LIMIT`] passes).
pub(crate) fn pause(at: &PauseAt, run: &Path) {
    let marker = at.marker(run);
    tracing::warn!(point = %at, marker = %marker.display(), "test hook: paused");
    // A plain write: the test only looks for the file's existence. If it fails the run simply
    // does not pause, and the test waiting for the marker reports that.
    if std::fs::write(&marker, format!("{at} pid {}\n", std::process::id())).is_err() {
        return;
    }
    let start = Instant::now();
    while marker.exists() && start.elapsed() < PAUSE_LIMIT {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(&marker);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_point() {
        for s in [
            "step:0",
            "step:5",
            "validation:2",
            "checkpoint:2:model.safetensors",
            "checkpoint:1:state.json",
            "commit:3",
        ] {
            let p: PauseAt = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        for bad in [
            "",
            "step",
            "step:x",
            "validation:0",
            "checkpoint:2",
            "checkpoint:2:",
            "commit:1:x",
            "epoch:1",
        ] {
            assert!(bad.parse::<PauseAt>().is_err(), "{bad}");
        }
    }
}
