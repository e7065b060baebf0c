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
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
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
    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }
    pub fn best_model(&self) -> PathBuf {
        self.root.join("model.safetensors")
    }
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.root.join("checkpoint")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.csv")
    }

    /// Reads `state.json`, refusing other format versions.
    pub fn load_state(&self) -> Result<RunState> {
        let path = self.state();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            TrainError::run(
                &self.root,
                format!("not a starflow run directory (cannot read state.json: {e})"),
                "pass the --out directory of a `starflow train` run",
            )
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

/// Makes the rename of a just-written file durable.
fn fsync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Saves tensors as safetensors atomically: temporary file, fsync, rename.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        candle_core::safetensors::save(tensors, &tmp)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        fsync_dir(dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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
    starflow_data::npy::atomic_write(path, text.as_bytes()).map_err(TrainError::from)
}

impl RunState {
    /// Writes `state.json` atomically: the commit point of an epoch.
    pub fn save(&self, run: &RunDir) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| TrainError::io(run.state(), std::io::Error::other(e)))?;
        write_text(&run.state(), &text)
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
