//! Inference: everything done with a trained run. A run is opened once ([`Run::open`]: state,
//! weights and flux preprocessing together; its saved recalibration on demand); the calibrated
//! posterior of a batch of stars is assembled in one place ([`posterior`]); on top sit evaluation
//! on a split or a labelled set, the recalibration maps and their fitting (also when training ends:
//! [`train_and_calibrate`]), calibration by kind of star, prediction on spectra files, and
//! ensembles.
//!
//! Modules, lowest first (each uses only those before it): [`star`] (one star's summary),
//! [`kinds`], [`metrics`], [`marginal`], [`radial`], [`calibration`] (the maps),
//! [`posterior`], [`run`], [`source`], [`evaluate`], [`ensemble`], [`fitting`] (fitting and
//! caching the maps), [`predict`], [`train_run`].
//!
//! **Architecture invariant:** this crate sits above `training` (it loads runs through
//! `training`'s run directory and model) and below `report`, `cli`, `xtask` and the Python layer;
//! `training` never calls into it. It knows nothing of command lines, tables or plots.

/// The README's example, compiled as a doctest so reusing this crate alone is shown to work.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub mod calibration;
pub mod ensemble;
pub mod evaluate;
pub mod fitting;
pub mod kind_maps;
pub mod kinds;
pub mod marginal;
pub mod metrics;
pub mod posterior;
pub mod predict;
pub mod radial;
pub mod run;
pub mod source;
pub mod star;
pub mod train_run;

pub use calibration::{
    Calibration, CalibrationMethod, Parts, WidthCovariate, WidthMap, CALIBRATION_FILE,
    CALIBRATION_SET, HELD_OUT_RULE, MIN_CALIBRATION_STARS, MIN_WIDTH_STARS, NOISE_COVARIATE,
    PARAMETRIC_WIDTH_BELOW,
};
pub use ensemble::evaluate_ensemble;
pub use evaluate::{
    evaluate, evaluate_on, evaluate_on_each, posterior_samples, posterior_samples_on, StarSamples,
};
pub use fitting::{
    cached_calibration, calibration_unavailable, fit_calibration, fit_calibration_with,
    fit_ensemble_calibration, load_or_fit_calibration, load_or_fit_ensemble_calibration,
    EnsembleCalibration, EnsembleFit, CALIBRATION_FIT_SAMPLES, ENSEMBLE_CALIBRATION_FILE,
};
pub use kind_maps::KindMaps;
pub use marginal::MarginalMap;
pub use metrics::{DataFiles, Evaluation, LabelErrors, LabelMetrics, POOLED_DRAWS};
pub use posterior::{chi2_cdf, PosteriorSettings, Sampler, MAX_SAMPLES};
pub use predict::{
    batches, predict, Fluxes, Predictor, SpectraFile, SpectraRows, SpectraSlice, PREDICT_BATCH,
};
pub use radial::RadialMap;
pub use run::Run;
pub use source::{source_rows, EvalSource, SourceRows};
pub use star::{StarPrediction, COVERAGE_LEVELS};
pub use starflow_training::{Result, TrainError};
pub use train_run::{train_and_calibrate, TrainedRun};
