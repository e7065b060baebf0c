//! One star's posterior summary in physical units: the row every evaluation, prediction and table
//! is built from, and the nominal interval masses its coverage is judged at.

use serde::{Deserialize, Serialize};
use starflow_flows::PosteriorSummary;

/// Nominal masses of the two central intervals whose coverage is reported (1 and 2 sigma).
pub const COVERAGE_LEVELS: [f64; 2] = [0.6827, 0.9545];

/// One star's posterior summary in physical units.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StarPrediction {
    /// Row in the input file.
    pub row: usize,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    /// Per label, the 2.5/16/50/84/97.5 % quantiles.
    pub quantiles: Vec<[f64; 5]>,
    /// True labels, when known.
    pub truth: Option<Vec<f64>>,
    /// Posterior CDF of each marginal at the truth.
    pub pit: Option<Vec<f64>>,
    /// Joint calibration: the posterior mass of the highest-density region whose boundary passes
    /// through the truth, `P(p(X) > p(truth))`. The truth lies inside the HPD region of mass
    /// `a` exactly when `hpd <= a`, so for a calibrated joint posterior `hpd` is uniform.
    #[serde(default)]
    pub hpd: Option<f64>,
    /// The negative log posterior density of the true labels in physical units (K, dex, dex),
    /// the star's term of the run's NLL: two runs' tables compare star by star, whatever data
    /// each was trained on.
    #[serde(default)]
    pub nll: Option<f64>,
    /// The noise level of the star's preprocessed spectrum, `ln σ̂` (DER_SNR, measured from the
    /// spectrum itself; `starflow_data::noise_level`), on which the recalibration's
    /// [`crate::WidthMap`] widens the posterior. `None` where it cannot be measured.
    #[serde(default)]
    pub noise: Option<f64>,
}

/// The five quantile columns of each label, in order (levels [`starflow_flows::QUANTILE_LEVELS`]).
const QUANTILE_SUFFIXES: [&str; 5] = ["q025", "q16", "q50", "q84", "q975"];

impl StarPrediction {
    /// The prediction of the star in file row `row` from its posterior summary in z-units `s`,
    /// in physical units through the labels' scaling `(mean, std)`, with its spectrum's noise
    /// level; nothing about its truth yet.
    pub(crate) fn from_summary(
        row: usize,
        s: &PosteriorSummary,
        (mean, std): (&[f64], &[f64]),
        noise: Option<f64>,
    ) -> Self {
        let d = mean.len();
        StarPrediction {
            row,
            mean: (0..d).map(|j| mean[j] + std[j] * s.mean[j]).collect(),
            std: (0..d).map(|j| std[j] * s.std[j]).collect(),
            quantiles: (0..d)
                .map(|j| s.quantiles[j].map(|q| mean[j] + std[j] * q))
                .collect(),
            truth: None,
            pit: None,
            hpd: None,
            nll: None,
            noise,
        }
    }

    /// The columns of a prediction table over the labels `names`: `row`, then per label
    /// `<label>_mean, _std, _q025, _q16, _q50, _q84, _q975`, and with the truth `<label>_true,
    /// _pit` per label, the joint `hpd` level and the star's `nll`. The CSV and Parquet tables and the Python
    /// package's predictions all use these names.
    pub fn columns(names: &[String], with_truth: bool) -> Vec<String> {
        let mut cols = vec!["row".to_string()];
        for n in names {
            cols.push(format!("{n}_mean"));
            cols.push(format!("{n}_std"));
            cols.extend(QUANTILE_SUFFIXES.iter().map(|s| format!("{n}_{s}")));
        }
        if with_truth {
            for n in names {
                cols.push(format!("{n}_true"));
                cols.push(format!("{n}_pit"));
            }
            cols.push("hpd".into());
            cols.push("nll".into());
        }
        cols
    }

    /// The float cells of this star over `d` labels, in the order of [`StarPrediction::columns`]
    /// after `row`; a cell is `None` when unknown (no truth).
    pub fn cells(&self, d: usize, with_truth: bool) -> Vec<Option<f64>> {
        let mut out = Vec::with_capacity(7 * d + 2 * d + 2);
        for j in 0..d {
            out.push(Some(self.mean[j]));
            out.push(Some(self.std[j]));
            out.extend(self.quantiles[j].iter().map(|&q| Some(q)));
        }
        if with_truth {
            for j in 0..d {
                out.push(self.truth.as_ref().map(|t| t[j]));
                out.push(self.pit.as_ref().map(|u| u[j]));
            }
            out.push(self.hpd);
            out.push(self.nll);
        }
        out
    }
}
