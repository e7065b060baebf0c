//! [`RunRow`]: everything the comparison of runs says about one run, gathered once from its
//! state, history and evaluations; the tables ([`crate::table`], [`crate::kinds`]) only format it.

use serde::{Deserialize, Serialize};
use starflow_inference::kinds::{CoverageCurve, KindCalibration};
use starflow_inference::LabelMetrics;
use starflow_training::EpochRecord;

/// Everything the comparison says about one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRow {
    /// Directory name of the run (`cnn-full_flow`).
    pub name: String,
    pub backbone: String,
    pub flow: String,
    pub epochs_done: usize,
    /// Epoch whose weights were kept (lowest validation NLL), counting from 1 like the logs.
    pub best_epoch: usize,
    pub stop_reason: Option<String>,
    pub n_train: usize,
    pub n_test: usize,
    /// Mean test NLL in z-units (labels standardised) and in physical units.
    pub test_nll_z: f64,
    /// Standard error of the mean test NLL.
    #[serde(default)]
    pub test_nll_se: f64,
    pub test_nll: f64,
    /// What the evaluated stars are: `test` (the split) or `held-out (DIR)`.
    #[serde(default)]
    pub eval_set: String,
    /// Coverage of the joint 68.3 % / 95.4 % highest-density regions, with standard errors, and
    /// of the recalibrated posteriors.
    #[serde(default)]
    pub joint_coverage: Vec<f64>,
    #[serde(default)]
    pub joint_coverage_se: Vec<f64>,
    #[serde(default)]
    pub joint_coverage_calibrated: Vec<f64>,
    pub labels: Vec<LabelMetrics>,
    /// Recalibration fitted on the validation split (per label, its map's shift and scale, in
    /// posterior standard deviations) and the test metrics of the recalibrated posteriors;
    /// empty when not computed.
    pub sigma_scale: Vec<f64>,
    #[serde(default)]
    pub sigma_shift: Vec<f64>,
    /// Stars the recalibration was fitted on (0: unknown).
    #[serde(default)]
    pub calibration_stars: usize,
    /// What they were: `val` (the validation split) or
    /// [`starflow_inference::CALIBRATION_SET`] (the config's synthetic calibration set).
    #[serde(default)]
    pub calibration_set: String,
    pub calibrated: Vec<LabelMetrics>,
    pub test_nll_z_calibrated: f64,
    /// The evaluated stars' rows and, per star, the NLL in z-units of the model's own and of the
    /// recalibrated posteriors: runs evaluated on the same stars are compared star by star.
    #[serde(skip)]
    pub test_rows: Vec<usize>,
    #[serde(skip)]
    pub test_star_nll_z: Vec<f64>,
    #[serde(skip)]
    pub test_star_nll_z_calibrated: Vec<f64>,
    pub seconds_per_epoch: f64,
    /// Training wall time (sum over epochs, including validation and checkpoints).
    pub train_seconds: f64,
    /// Evaluation, sampling and plotting time of the report.
    pub report_seconds: f64,
    /// Posterior samples per star used for the non-Gaussian flows.
    pub n_samples: usize,
    pub history: Vec<EpochRecord>,
    /// Calibration per kind of star and the expected-coverage curve, of the model's own and of
    /// the recalibrated posteriors ([`crate::kinds`]).
    #[serde(default)]
    pub by_kind: Vec<KindCalibration>,
    #[serde(default)]
    pub by_kind_calibrated: Vec<KindCalibration>,
    #[serde(default)]
    pub coverage_curve: CoverageCurve,
    #[serde(default)]
    pub coverage_curve_calibrated: CoverageCurve,
}
