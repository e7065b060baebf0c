//! Training: composes a backbone and a flow into one model and trains it by minimising the mean
//! negative log-likelihood of the z-scored labels; checkpoints every epoch. What is done with a
//! trained run (evaluation, calibration, prediction) is the `starflow-inference` crate's job.
//!
//! **Architecture invariant:** this crate composes `data`, `flows` and `models` and owns the run
//! directory format (see [`run`]); it knows nothing of inference,
//! command lines, tables or plots.

pub mod aux_targets;
pub mod config;
pub mod error;
pub mod model;
pub mod optim;
pub mod pause;
pub mod run;
pub mod train;

pub use config::{DeviceKind, Named, Schedule, TrainConfig};
pub use error::{Result, TrainError};
pub use model::StarModel;
pub use pause::PauseAt;
pub use run::{EpochRecord, RunDir, RunState};
pub use train::{
    calibration_set, calibration_set_dir, load_run, train, Observer, Quiet, TrainOptions,
    TrainRequest,
};
