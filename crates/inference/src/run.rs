//! A trained run opened for inference: its state (config, label scaling, pixel grid), its model
//! at the best epoch and its flux preprocessing, loaded together by one call, [`Run::open`]; its
//! saved recalibration is read when a caller asks for it ([`Run::saved_calibration`]), since
//! evaluation passes, ensembles and `--raw` never do. Evaluation, prediction and sampling all
//! start from a `Run`.

use std::path::{Path, PathBuf};

use starflow_data::FluxTransform;
use starflow_training::error::Result;
use starflow_training::model::StarModel;
use starflow_training::run::RunState;
use starflow_training::train::load_run;

use crate::calibration::Calibration;

/// A trained run: its state, its model at the best epoch and its flux preprocessing. It predicts
/// on any [`crate::SpectraRows`] on the run's pixel grid.
pub struct Run {
    pub state: RunState,
    pub(crate) model: StarModel,
    pub(crate) flux: FluxTransform,
    dir: PathBuf,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").field("dir", &self.dir).finish()
    }
}

impl Run {
    /// Loads the run in `run_dir`: its state and its best-epoch weights (read straight into the
    /// model, see [`StarModel::load`]).
    pub fn open(run_dir: &Path) -> Result<Self> {
        let (state, model) = load_run(run_dir)?;
        Ok(Run {
            flux: FluxTransform::new(state.flux_floor)?,
            state,
            model,
            dir: run_dir.to_path_buf(),
        })
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The predicted labels, in column order.
    pub fn label_names(&self) -> &[String] {
        &self.state.scaler.names
    }

    /// The recalibration saved in the run (`calibration.json`) when it was fitted for the run's
    /// current weights and calibration stars; `None` when there is none or it is stale (see
    /// [`crate::load_or_fit_calibration`] to fit one).
    pub fn saved_calibration(&self) -> Option<Calibration> {
        Calibration::saved(&self.dir, &self.state)
    }

    /// The model at the best epoch.
    pub fn model(&self) -> &StarModel {
        &self.model
    }
}
