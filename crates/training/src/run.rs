//! The run directory: checkpoints written atomically, and everything needed to resume or evaluate.
//!
//! Layout of `runs/NAME/`:
//! - `state.json`: the commit point, written last after every epoch (epoch, best validation NLL,
//!   history, label normalisation, the full resolved config, versions, checkpoint file names);
//! - `checkpoint/model-eNNNN.safetensors`, `checkpoint/optimizer-eNNNN.safetensors`: the latest
//!   epoch's weights (with BatchNorm statistics) and Adam moments, named by epoch so that a crash
//!   while writing them leaves the previous pair, which `state.json` still points to, intact;
//! - `model.safetensors`: the best weights so far (what `evaluate` and `predict` use), plain tensors
//!   loadable with Python's `safetensors`;
//! - `metrics.csv`, `config.toml`: for people.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use starflow_data::atomic_file::AtomicFile;
use starflow_data::LabelScaler;

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// Version of the run-directory format; runs of another version are refused.
pub const RUN_FORMAT: u32 = 1;

/// One line of `metrics.csv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_nll: f64,
    pub val_nll: f64,
    pub lr: f64,
    pub seconds: f64,
    pub steps_skipped: usize,
}

/// Everything in `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub format: u32,
    pub starflow_version: String,
    /// Number of completed epochs.
    pub epochs_done: usize,
    pub best_val_nll: f64,
    pub best_epoch: usize,
    pub epochs_since_best: usize,
    pub adam_steps: u64,
    pub finished: bool,
    pub stop_reason: Option<String>,
    pub history: Vec<EpochRecord>,
    pub scaler: LabelScaler,
    pub flux_floor: f32,
    pub n_pix: usize,
    pub n_train: usize,
    pub n_val: usize,
    pub n_test: usize,
    /// Random streams: batch order and dropout of epoch e use ChaCha8(seed) on stream e, so no
    /// generator state needs saving beyond the seed and the epoch.
    pub rng_scheme: String,
    pub model_file: Option<String>,
    pub optimizer_file: Option<String>,
    pub config: TrainConfig,
    /// What the run was trained on, checked before resuming or evaluating its own splits: data
    /// regenerated or replaced in `data.dir` otherwise give "test" metrics on stars the split never
    /// held. `None` in runs written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_fingerprint: Option<DataFingerprint>,
}

/// A cheap identity of a data set's two files: their sizes, the checksum of the whole label file,
/// and that of [`FINGERPRINT_SAMPLES`] evenly spaced 4 KiB blocks of the spectra file (reading all
/// of a survey's spectra would take minutes; any regenerated set changes its labels anyway).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    pub spectra_bytes: u64,
    pub labels_bytes: u64,
    pub labels_checksum: String,
    pub spectra_sample_checksum: String,
}

/// Blocks of the spectra file read by [`DataFingerprint::of`].
pub const FINGERPRINT_SAMPLES: u64 = 64;

impl DataFingerprint {
    /// The fingerprint of the files at `spectra` and `labels`.
    pub fn of(spectra: &Path, labels: &Path) -> Result<Self> {
        use std::io::{Read, Seek, SeekFrom};
        const BLOCK: u64 = 4096;
        let label_bytes = std::fs::read(labels).map_err(io(labels))?;
        let mut file = std::fs::File::open(spectra).map_err(io(spectra))?;
        let spectra_bytes = file.metadata().map_err(io(spectra))?.len();
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; BLOCK as usize];
        let last = spectra_bytes.saturating_sub(BLOCK);
        for k in 0..FINGERPRINT_SAMPLES {
            let at = last * k / (FINGERPRINT_SAMPLES - 1);
            let n = BLOCK.min(spectra_bytes - at) as usize;
            file.seek(SeekFrom::Start(at)).map_err(io(spectra))?;
            file.read_exact(&mut buf[..n]).map_err(io(spectra))?;
            hasher.update(&buf[..n]);
        }
        Ok(DataFingerprint {
            spectra_bytes,
            labels_bytes: label_bytes.len() as u64,
            labels_checksum: format!("crc32:{:08x}", crc32fast::hash(&label_bytes)),
            spectra_sample_checksum: format!("crc32:{:08x}", hasher.finalize()),
        })
    }

    /// What differs from `trained`, in words (empty when nothing does).
    pub fn differences(&self, trained: &DataFingerprint) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.spectra_bytes != trained.spectra_bytes {
            out.push("the spectra file's size");
        } else if self.spectra_sample_checksum != trained.spectra_sample_checksum {
            out.push("the spectra file's contents");
        }
        if self.labels_bytes != trained.labels_bytes {
            out.push("the labels file's size");
        } else if self.labels_checksum != trained.labels_checksum {
            out.push("the labels file's contents");
        }
        out
    }
}

impl RunState {
    /// Fails when the data files of `dataset` are not those the run was trained on (runs without
    /// a recorded fingerprint pass); `fix` says what to do instead.
    pub fn check_data(&self, run: &RunDir, spectra: &Path, labels: &Path, fix: &str) -> Result<()> {
        let Some(trained) = &self.data_fingerprint else {
            return Ok(());
        };
        let now = DataFingerprint::of(spectra, labels)?;
        let changed = now.differences(trained);
        if changed.is_empty() {
            return Ok(());
        }
        Err(TrainError::Input {
            path: spectra.parent().unwrap_or(Path::new(".")).to_path_buf(),
            problem: format!(
                "these data are not what the run in {} was trained on ({} changed since), so its splits would hold other stars",
                run.root.display(),
                changed.join(" and ")
            ),
            fix: fix.into(),
        })
    }
}

/// The advisory lock file of a run directory; it holds the owner's process id.
pub const LOCK_FILE: &str = ".lock";

/// The best weights so far, under the run directory.
pub const BEST_MODEL: &str = "model.safetensors";

/// An exclusive advisory lock on a run directory, held by the one process that trains into it. The
/// kernel releases it when the lock is dropped or the process dies, so a crashed run never leaves a
/// stale lock behind.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

/// Paths inside a run directory.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RunDir { root: root.into() }
    }

    /// Takes the run directory's lock (creating the directory), or fails with an error that names
    /// the directory and the process that holds it: two `train` processes on one directory would
    /// overwrite each other's checkpoints.
    pub fn lock(&self) -> Result<RunLock> {
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let path = self.root.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => {
                let owner = format!("pid {}\n", std::process::id());
                file.set_len(0)
                    .and_then(|()| file.write_all(owner.as_bytes()))
                    .map_err(io(&path))?;
                Ok(RunLock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                let owner = match owner.trim() {
                    "" => "a process that has not yet written its id".to_string(),
                    o => o.to_string(),
                };
                Err(TrainError::run(
                    &self.root,
                    format!("another starflow process ({owner}) is training in this run directory"),
                    "wait for it to finish or stop it, or choose another --out",
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => Err(TrainError::io(&path, e)),
        }
    }
    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }
    pub fn best_model(&self) -> PathBuf {
        self.root.join(BEST_MODEL)
    }
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.root.join("checkpoint")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.csv")
    }

    /// Deletes what a killed or failed run can leave behind: temporary files (`.NAME.PID.tmp`)
    /// in the run and checkpoint directories, and checkpoint files that `state` does not point to
    /// (an epoch whose `state.json` was never committed, or the previous epoch's pair when the
    /// process died between committing and deleting it). Without this they would stay for ever,
    /// since later epochs only delete the pair they replace. Only names starflow writes are
    /// touched; directories and other files are left alone.
    pub fn remove_stale_files(&self, state: Option<&RunState>) {
        let keep: Vec<&str> = state
            .into_iter()
            .flat_map(|s| [s.model_file.as_deref(), s.optimizer_file.as_deref()])
            .flatten()
            .filter_map(|f| f.strip_prefix("checkpoint/"))
            .collect();
        for (dir, checkpoints) in [(self.root.clone(), false), (self.checkpoint_dir(), true)] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let stale = is_temp_name(&name)
                    || (checkpoints && is_checkpoint_name(&name) && !keep.contains(&name.as_str()));
                if stale && entry.file_type().is_ok_and(|t| t.is_file()) {
                    tracing::info!(file = %entry.path().display(), "removing a stale file");
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }

    /// The first entry that shows this directory is not a starflow run that a new run may start in:
    /// `None` when it does not exist, holds only the lock and temporary files, or holds a
    /// `config.toml` that starflow reads (a run that never committed its first epoch, whose own
    /// files a new run replaces). Anything else (a foreign `config.toml`, a user's
    /// `model.safetensors` beside no config) would be overwritten or deleted by a new run.
    pub fn foreign_entry(&self) -> Option<String> {
        let entries = std::fs::read_dir(&self.root).ok()?;
        let names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != LOCK_FILE && !is_temp_name(n))
            .collect();
        if names.is_empty() {
            return None;
        }
        let config = self.root.join("config.toml");
        if !config.is_file() {
            return names.into_iter().min().map(|n| format!("`{n}`"));
        }
        match TrainConfig::from_file(&config) {
            Ok(_) => None,
            Err(_) => Some("config.toml, which is not a starflow config".into()),
        }
    }

    /// Reads `state.json`, refusing other format versions.
    pub fn load_state(&self) -> Result<RunState> {
        let path = self.state();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            let problem = format!("not a starflow run directory (cannot read state.json: {e})");
            let fix = "pass the --out directory of a `starflow train` run".to_string();
            match e.kind() {
                std::io::ErrorKind::NotFound => TrainError::Missing {
                    path: self.root.clone(),
                    problem,
                    fix,
                },
                _ => TrainError::run(&self.root, problem, fix),
            }
        })?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            TrainError::run(
                &path,
                format!("state.json is not valid JSON ({e})"),
                "the run is damaged; train again",
            )
        })?;
        let format = value.get("format").and_then(|v| v.as_u64());
        if format != Some(RUN_FORMAT as u64) {
            return Err(TrainError::run(
                &path,
                format!(
                    "run format {} is not supported by this starflow {} (format {RUN_FORMAT})",
                    format
                        .map(|f| f.to_string())
                        .unwrap_or_else(|| "unknown".into()),
                    env!("CARGO_PKG_VERSION")
                ),
                "evaluate it with the starflow version that trained it, or train again",
            ));
        }
        serde_json::from_value(value).map_err(|e| {
            TrainError::run(
                &path,
                format!("state.json does not match format {RUN_FORMAT} ({e})"),
                "train again",
            )
        })
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::io(path, e)
}

/// Saves tensors as a safetensors file atomically (see [`starflow_data::atomic_file`]): the bytes
/// come from the `safetensors` crate's serializer (names sorted, so the same tensors give the same
/// bytes) and go through our own temporary file, fsync, rename and directory fsync, with mode 0644.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    save_tensors_with(path, tensors, &|_| {})
}

/// [`save_tensors`] with a callback between writing the temporary file and renaming it over
/// `path` (the test hook of [`PauseAt::Checkpoint`](crate::pause::PauseAt)).
/// Writes `tensors` to `path` atomically, with the CRC-32 of the tensor data in the file's own
/// metadata (`"crc32"`; see [`verify_tensors`]).
pub(crate) fn save_tensors_with(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    before_rename: &dyn Fn(&Path),
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let serialize = |metadata: Option<HashMap<String, String>>| {
        safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), metadata)
            .map_err(|e| TrainError::io(path, std::io::Error::other(e)))
    };
    // The data region does not depend on the header, so its checksum from a first serialisation
    // is that of the second, which carries it.
    let plain = serialize(None)?;
    let crc = data_region(&plain).map(crc32fast::hash).unwrap_or(0);
    let metadata = HashMap::from([(CRC_KEY.to_string(), format!("{crc:08x}"))]);
    let bytes = serialize(Some(metadata))?;
    let mut file = AtomicFile::create(path)?;
    file.write_all(&bytes).map_err(io(path))?;
    file.commit_after(before_rename)?;
    Ok(())
}

/// The metadata key of a weight file's checksum.
const CRC_KEY: &str = "crc32";

/// The tensor data of a safetensors file's bytes: everything after the 8-byte header length and
/// the header.
fn data_region(bytes: &[u8]) -> Option<&[u8]> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    bytes.get(8usize.checked_add(usize::try_from(len).ok()?)?..)
}

/// Fails, naming the file, when a weight file no longer has the bytes training wrote: the CRC-32
/// of its tensor data must equal the one in its own metadata. Bytes changed on disk otherwise load
/// as valid tensors and predict nonsense (t_eff ~ -3.6e37 K from a few hundred overwritten bytes)
/// without a word. Files without a checksum (written before it existed) pass.
///
/// The checksum lives in the file rather than in `state.json` because the best weights are
/// written before the epoch's commit point: a failed commit leaves a newer, intact
/// `model.safetensors` beside the previous `state.json`.
pub fn verify_tensors(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let damaged = |why: String| {
        TrainError::run(
            path,
            format!("the file is damaged: {why}"),
            "restore the run directory from a copy, or train the run again",
        )
    };
    let Some(data) = data_region(&bytes) else {
        return Err(damaged("it is shorter than its header says".into()));
    };
    let header = &bytes[8..bytes.len() - data.len()];
    let header: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| damaged(format!("its header is not valid JSON ({e})")))?;
    let Some(recorded) = header["__metadata__"][CRC_KEY].as_str() else {
        return Ok(());
    };
    let now = format!("{:08x}", crc32fast::hash(data));
    if now == recorded {
        return Ok(());
    }
    Err(damaged(format!(
        "its bytes changed since training wrote it (CRC-32 of the tensor data {now}, recorded {recorded})"
    )))
}

/// Loads a safetensors file onto `device`, with an error that names it.
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| {
        TrainError::run(
            path,
            format!("cannot read checkpoint ({e})"),
            "the run is damaged; train again or resume from an earlier copy",
        )
    })
}

/// Writes a text file atomically.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    starflow_data::atomic_file::write(path, text.as_bytes()).map_err(TrainError::from)
}

/// [`write_text`] with a callback when half of the temporary file is written, before the rest,
/// the fsync and the rename (the test hook of [`PauseAt::Checkpoint`](crate::pause::PauseAt)).
pub(crate) fn write_text_with(path: &Path, text: &str, midway: &dyn Fn(&Path)) -> Result<()> {
    let (first, second) = text.as_bytes().split_at(text.len() / 2);
    starflow_data::atomic_file::write_with(path, |w| {
        use std::io::Write;
        w.write_all(first)?;
        w.flush()?;
        midway(path);
        w.write_all(second)
    })
    .map_err(TrainError::from)
}

/// True for a file name that starflow writes into `checkpoint/`: `model-eNNNN.safetensors` or
/// `optimizer-eNNNN.safetensors`.
fn is_checkpoint_name(name: &str) -> bool {
    ["model-e", "optimizer-e"].iter().any(|prefix| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".safetensors"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// True for a temporary file of [`starflow_data::atomic_file`] (`.NAME.PID.tmp`), or of the
/// safetensors crate's own writer, which runs before this version wrote `.tmpXXXXXX` files.
fn is_temp_name(name: &str) -> bool {
    starflow_data::atomic_file::is_temp_name(name) || name.starts_with(".tmp")
}

impl RunState {
    /// Writes `state.json` atomically: the commit point of an epoch.
    pub fn save(&self, run: &RunDir) -> Result<()> {
        self.save_with(run, &|_| {})
    }

    /// [`RunState::save`] with the test hook of [`write_text_with`].
    pub(crate) fn save_with(&self, run: &RunDir, midway: &dyn Fn(&Path)) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| TrainError::io(run.state(), std::io::Error::other(e)))?;
        write_text_with(&run.state(), &text, midway)
    }

    /// `metrics.csv` from the history.
    pub fn metrics_csv(&self) -> String {
        let mut s = String::from("epoch,train_nll,val_nll,lr,seconds,steps_skipped\n");
        for r in &self.history {
            s.push_str(&format!(
                "{},{:.8},{:.8},{:.6e},{:.3},{}\n",
                r.epoch, r.train_nll, r.val_nll, r.lr, r.seconds, r.steps_skipped
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_file_names() {
        for name in ["model-e0001.safetensors", "optimizer-e0123.safetensors"] {
            assert!(is_checkpoint_name(name), "{name}");
        }
        for name in [
            "model.safetensors",
            "model-e.safetensors",
            "model-e0001.safetensors.bak",
            "mymodel-e0001.safetensors",
            "model-e00x1.safetensors",
        ] {
            assert!(!is_checkpoint_name(name), "{name}");
        }
        for name in [
            ".state.json.123.tmp",
            ".tmpAbC123",
            ".model-e0002.safetensors.9.tmp",
        ] {
            assert!(is_temp_name(name), "{name}");
        }
        for name in ["state.json", "notes.tmp", ".paused-step", "config.toml"] {
            assert!(!is_temp_name(name), "{name}");
        }
    }
}
