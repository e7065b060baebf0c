//! Inference: everything done with a trained run. Evaluation on a split or a labelled set, the
//! calibrated posterior of each star (summaries, samples, HPD levels), the recalibration maps and
//! their fitting (also when training ends: [`train_and_calibrate`]), calibration by kind of star,
//! prediction on spectra files, and ensembles.
//!
//! **Architecture invariant:** this crate sits above `training` (it loads runs through
//! `training`'s run directory and model) and below `report`, `cli`, `xtask` and the Python layer;
//! `training` never calls into it. It knows nothing of command lines, tables or plots.

pub mod calibration;
pub mod evaluate;
pub mod kinds;
pub mod predict;
pub mod radial;
pub mod train_run;

pub use calibration::{
    Calibration, CalibrationMethod, MarginalMap, WidthCovariate, WidthMap, MIN_CALIBRATION_STARS,
    MIN_WIDTH_STARS, NOISE_COVARIATE,
};
pub use evaluate::{
    cached_calibration, calibration_unavailable, chi2_cdf, evaluate, evaluate_ensemble,
    evaluate_ensemble_scaled, evaluate_on, evaluate_on_each, evaluate_scaled, fit_calibration,
    fit_calibration_with, fit_ensemble_calibration, load_or_fit_calibration,
    load_or_fit_ensemble_calibration, posterior_samples, posterior_samples_on, source_rows,
    EnsembleCalibration, EnsembleFit, EvalSource, Evaluation, LabelErrors, LabelMetrics,
    SourceRows, StarPrediction, StarSamples, CALIBRATION_FIT_SAMPLES, ENSEMBLE_CALIBRATION_FILE,
    MAX_SAMPLES,
};
pub use predict::{
    batches, predict, predict_scaled, Fluxes, PosteriorSettings, Predictor, SpectraFile,
    SpectraRows, SpectraSlice, TrainedModel, PREDICT_BATCH,
};
pub use radial::RadialMap;
pub use starflow_training::{Result, TrainError};
pub use train_run::{train_and_calibrate, TrainedRun};
