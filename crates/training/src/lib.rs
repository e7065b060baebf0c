//! Training: composes a backbone and a flow into one model and trains it by minimising the mean
//! negative log-likelihood of the z-scored labels; checkpoints every epoch; evaluates and predicts.
//!
//! **Architecture invariant:** this crate composes `data`, `flows` and `models` and owns the run
//! directory format (see [`run`]); it knows nothing of command lines, tables or plots.

pub mod calibration;
pub mod config;
pub mod error;
pub mod evaluate;
pub mod kinds;
pub mod model;
pub mod optim;
pub mod pause;
pub mod predict;
pub mod radial;
pub mod run;
pub mod train;

pub use calibration::{
    Calibration, CalibrationMethod, MarginalMap, WidthCovariate, WidthMap, MIN_CALIBRATION_STARS,
    MIN_WIDTH_STARS, NOISE_COVARIATE,
};
pub use config::TrainConfig;
pub use error::{Result, TrainError};
pub use evaluate::{
    cached_calibration, calibration_unavailable, chi2_cdf, evaluate, evaluate_ensemble,
    evaluate_ensemble_scaled, evaluate_on, evaluate_on_each, evaluate_scaled, fit_calibration,
    fit_calibration_with, fit_ensemble_calibration, load_or_fit_calibration,
    load_or_fit_ensemble_calibration, posterior_samples, posterior_samples_on, source_rows,
    EnsembleCalibration, EnsembleFit, EvalSource, Evaluation, LabelErrors, LabelMetrics,
    SourceRows, StarPrediction, StarSamples, CALIBRATION_FIT_SAMPLES, ENSEMBLE_CALIBRATION_FILE,
    MAX_SAMPLES,
};
pub use model::StarModel;
pub use pause::PauseAt;
pub use predict::{
    batches, predict, predict_scaled, Fluxes, PosteriorSettings, Predictor, SpectraFile,
    SpectraRows, SpectraSlice, TrainedModel, PREDICT_BATCH,
};
pub use radial::RadialMap;
pub use run::{EpochRecord, RunDir, RunState};
pub use train::{
    calibration_set, calibration_set_dir, load_run, train, Observer, Quiet, TrainOptions,
    TrainRequest,
};
