//! Training a run as users do it: `starflow-training`'s loop, then the recalibration fitted
//! while the training data are at hand, so that `predict` applies it by default wherever the run
//! directory goes. The CLI and the Python package both call [`train_and_calibrate`]; neither
//! fits maps of its own.

use starflow_training::{
    calibration_set, train, Observer, Result, RunState, TrainConfig, TrainOptions,
};

use crate::calibration::Calibration;
use crate::fitting::{load_or_fit_calibration, CALIBRATION_FIT_SAMPLES};
use crate::posterior::Sampler;

/// A run trained by [`train_and_calibrate`].
#[derive(Debug)]
pub struct TrainedRun {
    pub state: RunState,
    /// The recalibration fitted when training finished (`None` for a run that stopped before
    /// its last epoch, e.g. interrupted, which is resumed rather than calibrated).
    pub calibration: Option<Calibration>,
}

/// Trains (or resumes) the run of `opts`, calls `trained` with its state as soon as the loop
/// ends (the CLI prints its summary there, before any calibration work), and, when the run
/// finished, fits its recalibration: a synthetic calibration set the config draws is generated
/// first (with `observer` told), then the maps are fitted (or a saved fit for the same settings
/// is loaded) with [`CALIBRATION_FIT_SAMPLES`] posterior samples and seed 0.
pub fn train_and_calibrate(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    observer: &dyn Observer,
    trained: impl FnOnce(&RunState),
) -> Result<TrainedRun> {
    let state = train(cfg, opts, observer)?;
    trained(&state);
    let calibration = if state.finished {
        calibration_set(cfg, observer)?;
        Some(load_or_fit_calibration(
            &opts.out,
            Sampler {
                n_samples: CALIBRATION_FIT_SAMPLES,
                seed: 0,
            },
        )?)
    } else {
        None
    };
    Ok(TrainedRun { state, calibration })
}
