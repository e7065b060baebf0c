//! The figures of an evaluation, computed from its stars' [`StarPrediction`]s: per-label accuracy
//! and calibration with their standard errors, the Cramér–Rao ratios where the generator's bound
//! files are there, the joint coverage and the mean NLL.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use starflow_data::npy::NpyArray;
use starflow_training::error::Result;
use starflow_training::run::RunState;

use crate::kinds::{coverage_curve, CoverageCurve, KindCalibration, SnrBin};
use crate::star::{StarPrediction, COVERAGE_LEVELS};

/// Metrics of one label, in physical units unless said otherwise.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LabelMetrics {
    pub name: String,
    pub rmse: f64,
    pub mae: f64,
    pub bias: f64,
    pub r2: f64,
    pub pull_mean: f64,
    pub pull_std: f64,
    pub coverage_68: f64,
    pub coverage_95: f64,
    /// Mean NLL of the Gaussian approximation of this marginal (mean, std), z-units and physical.
    pub marginal_nll_z: f64,
    pub marginal_nll: f64,
    /// RMSE over the median Cramer-Rao bound of the evaluated stars (synthetic data only).
    pub rmse_over_crlb: Option<f64>,
    pub median_crlb: Option<f64>,
    /// The same against the bound with the generator's nuisance parameters marginalised
    /// (`crlb_marginal.npy`): the bound an estimator that does not know them can reach.
    #[serde(default)]
    pub rmse_over_crlb_marginal: Option<f64>,
    #[serde(default)]
    pub median_crlb_marginal: Option<f64>,
    /// One standard error of the figures above from the finite number of stars.
    #[serde(default)]
    pub se: LabelErrors,
}

/// Standard errors (sampling noise from the finite number of stars) of a label's figures:
/// the spread of each figure over test sets of the same size, estimated from the set itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LabelErrors {
    pub rmse: f64,
    pub bias: f64,
    pub pull_mean: f64,
    pub pull_std: f64,
    pub coverage_68: f64,
    pub coverage_95: f64,
}

/// The result of `evaluate`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub split: String,
    /// The labelled files evaluated, when they were not a split of the run's own data: two
    /// evaluations of other sets can be told apart, and `starflow evaluate` refuses to replace
    /// one set's results with another's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataFiles>,
    pub n_stars: usize,
    pub flow: String,
    pub backbone: String,
    pub n_samples: usize,
    /// Mean joint NLL of the true labels, z-units, and in physical units (K, dex, dex).
    pub nll_z: f64,
    pub nll: f64,
    /// Standard error of the mean NLL (the same in z-units and physical units).
    #[serde(default)]
    pub nll_se: f64,
    pub labels: Vec<LabelMetrics>,
    /// Coverage of the joint highest-posterior-density regions of mass [`COVERAGE_LEVELS`]: the
    /// fraction of stars whose true (t_eff, log_g, fe_h) lies inside them. Marginal PITs miss a
    /// wrong correlation; this does not.
    #[serde(default)]
    pub joint_coverage: Vec<f64>,
    #[serde(default)]
    pub joint_coverage_se: Vec<f64>,
    /// Calibration per kind of star: signal-to-noise quartiles (when the data carry an `SNR`
    /// column), giants and dwarfs, metal-poor, cool and hot stars ([`crate::kinds`]).
    #[serde(default)]
    pub by_kind: Vec<KindCalibration>,
    /// Calibration in [`crate::kinds::SNR_BINS`] signal-to-noise bins (when the data carry an
    /// `SNR` column): the coverage-against-SNR figure.
    #[serde(default)]
    pub by_snr: Vec<SnrBin>,
    /// Coverage at nominal levels 5 … 95 %, per label and joint, with its mean absolute error.
    #[serde(default)]
    pub coverage_curve: CoverageCurve,
    pub seconds: f64,
    #[serde(skip)]
    pub stars: Vec<StarPrediction>,
    /// Per star (as in `stars`), the NLL of its true labels in z-units, whose mean is `nll_z`:
    /// two runs evaluated on the same stars are compared star by star (a paired difference has a
    /// far smaller standard error than either mean).
    #[serde(skip)]
    pub star_nll_z: Vec<f64>,
    /// Per label, posterior samples of the model's own posteriors standardised by each star's
    /// mean and std, `(x - m) / σ`, pooled over the stars (sampled flows only, up to
    /// [`POOLED_DRAWS`] per star; empty otherwise): the shape a recalibration map starts from.
    #[serde(skip)]
    pub standardized_draws: Vec<Vec<f64>>,
    /// Per label, the scaling of its z-units, `[mean, std]` of the training labels (empty for an
    /// evaluation built elsewhere): lets a [`crate::WidthMap`] read posterior means in z-units.
    #[serde(skip)]
    pub label_scale: Vec<[f64; 2]>,
    /// Per star (as in `stars`), the inverse of the model's own posterior correlation matrix,
    /// `d x d` (single runs' own posteriors of Gaussian flows only; empty otherwise).
    #[serde(skip)]
    pub precisions: Vec<Vec<f64>>,
}

impl Evaluation {
    /// The evaluation of the stars at `keep` (indices into `stars`) alone, for fitting on part of
    /// a set; the summary figures are left as they were.
    pub fn subset(&self, keep: &[usize]) -> Evaluation {
        let pick = |v: &Vec<Vec<f64>>| {
            if v.len() == self.stars.len() {
                keep.iter().map(|&i| v[i].clone()).collect()
            } else {
                v.clone()
            }
        };
        // Keep the pooled draws of the stars at `keep` when they can be told apart.
        let standardized_draws = match self.draws_per_star() {
            Some(per_star) if per_star > 0 => self
                .standardized_draws
                .iter()
                .map(|v| {
                    keep.iter()
                        .flat_map(|&i| &v[i * per_star..(i + 1) * per_star])
                        .copied()
                        .collect()
                })
                .collect(),
            _ => self.standardized_draws.clone(),
        };
        Evaluation {
            n_stars: keep.len(),
            stars: keep.iter().map(|&i| self.stars[i].clone()).collect(),
            standardized_draws,
            star_nll_z: keep
                .iter()
                .filter_map(|&i| self.star_nll_z.get(i).copied())
                .collect(),
            precisions: pick(&self.precisions),
            ..self.clone()
        }
    }

    /// How many of [`Evaluation::standardized_draws`] each star holds, when every label's pool
    /// holds the same number per star in the stars' order (0 for Gaussian flows, which pool
    /// none); `None` without stars or when the pools cannot be told apart star by star.
    pub fn draws_per_star(&self) -> Option<usize> {
        let n = self.stars.len();
        let pooled = self.standardized_draws.first().map_or(0, Vec::len);
        let per_star = pooled / n.max(1);
        (n > 0
            && self
                .standardized_draws
                .iter()
                .all(|v| v.len() == per_star * n))
        .then_some(per_star)
    }

    /// A star's posterior means in z-units ([`Evaluation::label_scale`]; NaN without it).
    pub fn z_means(&self, s: &StarPrediction) -> Vec<f64> {
        (0..s.mean.len())
            .map(|j| {
                self.label_scale
                    .get(j)
                    .map_or(f64::NAN, |[a, b]| (s.mean[j] - a) / b)
            })
            .collect()
    }
}

/// The labelled files an evaluation was of, as absolute paths ([`Evaluation::data`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFiles {
    pub spectra: String,
    pub labels: String,
}

/// Samples per star kept in [`Evaluation::standardized_draws`]: with a validation split of a
/// thousand stars, tens of thousands of draws fix the pooled quantiles far better than the
/// errors' own are fixed.
pub const POOLED_DRAWS: usize = 64;

/// The figures of an evaluation from its stars and their NLLs (z-units): per-label metrics with
/// the Cramér–Rao ratios when `data_dir` has the bound files, the joint coverage, the mean NLL.
#[allow(clippy::too_many_arguments)]
pub(crate) fn assemble(
    state: &RunState,
    split: &str,
    data_dir: &Path,
    mut stars: Vec<StarPrediction>,
    nll: &[f64],
    flow: String,
    n_samples: usize,
    start: Instant,
) -> Result<Evaluation> {
    let (nll_z, nll_se) = mean_and_se(nll);
    let log_scale: f64 = state.scaler.std.iter().map(|s| s.ln()).sum();
    for (s, v) in stars.iter_mut().zip(nll) {
        s.nll = Some(v + log_scale);
    }
    let targets = &state.config.data.targets;
    let crlb = crlb_for(data_dir, "crlb.npy", targets, &stars)?;
    let crlb_m = crlb_for(data_dir, "crlb_marginal.npy", targets, &stars)?;
    let labels = (0..state.scaler.mean.len())
        .map(|j| {
            let mut m = label_metrics(state, &stars, j, crlb.as_ref().map(|c| c[j]));
            m.median_crlb_marginal = crlb_m.as_ref().map(|c| c[j]);
            m.rmse_over_crlb_marginal = m.median_crlb_marginal.map(|c| m.rmse / c);
            m
        })
        .collect();
    let (joint_coverage, joint_coverage_se) = joint_coverage(&stars);
    Ok(Evaluation {
        split: split.to_string(),
        data: None,
        n_stars: stars.len(),
        flow,
        backbone: state.config.model.backbone.clone(),
        n_samples,
        nll_z,
        nll: nll_z + log_scale,
        nll_se,
        labels,
        joint_coverage,
        joint_coverage_se,
        by_kind: Vec::new(),
        by_snr: Vec::new(),
        coverage_curve: coverage_curve(&stars, state.scaler.mean.len()),
        label_scale: state
            .scaler
            .mean
            .iter()
            .zip(&state.scaler.std)
            .map(|(a, b)| [*a, *b])
            .collect(),
        seconds: start.elapsed().as_secs_f64(),
        stars,
        star_nll_z: nll.to_vec(),
        standardized_draws: Vec::new(),
        precisions: Vec::new(),
    })
}

/// Mean and its standard error.
pub(crate) fn mean_and_se(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var / n).sqrt())
}

/// Standard error of a fraction `p` of `n` independent stars.
fn fraction_se(p: f64, n: f64) -> f64 {
    (p * (1.0 - p) / n).sqrt()
}

/// Coverage of the joint HPD regions at [`COVERAGE_LEVELS`] and its standard errors.
fn joint_coverage(stars: &[StarPrediction]) -> (Vec<f64>, Vec<f64>) {
    let levels: Vec<f64> = stars.iter().filter_map(|s| s.hpd).collect();
    if levels.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let n = levels.len() as f64;
    COVERAGE_LEVELS
        .iter()
        .map(|&a| {
            let p = levels.iter().filter(|&&h| h <= a).count() as f64 / n;
            (p, fraction_se(p, n))
        })
        .unzip()
}

/// Median bound per label over the evaluated stars, when `dir` has the bound file `name`
/// (`crlb.npy` or `crlb_marginal.npy`, written by the synthetic generator).
fn crlb_for(
    dir: &Path,
    name: &str,
    targets: &[String],
    stars: &[StarPrediction],
) -> Result<Option<Vec<f64>>> {
    let path = dir.join(name);
    if !path.exists() || targets != ["t_eff", "log_g", "fe_h"] {
        return Ok(None);
    }
    let arr = NpyArray::open(&path)?;
    let (rows, cols) = arr.shape2(name.trim_end_matches(".npy"))?;
    if cols != 3 {
        return Ok(None);
    }
    let all = arr.to_f64_vec();
    let mut med = Vec::with_capacity(3);
    for j in 0..3 {
        let mut v: Vec<f64> = stars
            .iter()
            .filter(|s| s.row < rows)
            .map(|s| all[s.row * 3 + j])
            .collect();
        v.sort_by(f64::total_cmp);
        med.push(v.get(v.len() / 2).copied().unwrap_or(f64::NAN));
    }
    Ok(Some(med))
}

fn label_metrics(
    state: &RunState,
    stars: &[StarPrediction],
    j: usize,
    crlb: Option<f64>,
) -> LabelMetrics {
    let n = stars.len() as f64;
    let truth: Vec<f64> = stars
        .iter()
        .map(|s| s.truth.as_ref().map_or(f64::NAN, |t| t[j]))
        .collect();
    let err: Vec<f64> = stars
        .iter()
        .zip(&truth)
        .map(|(s, t)| s.mean[j] - t)
        .collect();
    let mean_t = truth.iter().sum::<f64>() / n;
    let ss_tot: f64 = truth.iter().map(|t| (t - mean_t).powi(2)).sum();
    let ss_res: f64 = err.iter().map(|e| e * e).sum();
    let pulls: Vec<f64> = stars.iter().zip(&err).map(|(s, e)| e / s.std[j]).collect();
    let pull_mean = pulls.iter().sum::<f64>() / n;
    let pull_var = pulls.iter().map(|p| (p - pull_mean).powi(2)).sum::<f64>() / n;
    let pull_std = pull_var.sqrt();
    let cover = |p: f64| {
        stars
            .iter()
            .filter(|s| {
                s.pit
                    .as_ref()
                    .is_some_and(|u| (u[j] - 0.5).abs() <= p / 2.0)
            })
            .count() as f64
            / n
    };
    let sigma = state.scaler.std[j];
    let half_ln_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
    let marginal_nll = stars
        .iter()
        .zip(&err)
        .map(|(s, e)| half_ln_2pi + s.std[j].ln() + 0.5 * (e / s.std[j]).powi(2))
        .sum::<f64>()
        / n;
    let rmse = (ss_res / n).sqrt();
    let (coverage_68, coverage_95) = (cover(COVERAGE_LEVELS[0]), cover(COVERAGE_LEVELS[1]));
    // Delta-method errors: se(rmse) = se(mse) / (2 rmse); the sample variance of the pulls has
    // variance (m4 - var^2) / n, whatever their distribution (heavy tails widen it).
    let sq: Vec<f64> = err.iter().map(|e| e * e).collect();
    let m4 = pulls.iter().map(|p| (p - pull_mean).powi(4)).sum::<f64>() / n;
    let se = LabelErrors {
        rmse: mean_and_se(&sq).1 / (2.0 * rmse),
        bias: mean_and_se(&err).1,
        pull_mean: pull_std / n.sqrt(),
        pull_std: ((m4 - pull_var * pull_var).max(0.0) / n).sqrt() / (2.0 * pull_std),
        coverage_68: fraction_se(coverage_68, n),
        coverage_95: fraction_se(coverage_95, n),
    };
    LabelMetrics {
        name: state.scaler.names[j].clone(),
        rmse,
        mae: err.iter().map(|e| e.abs()).sum::<f64>() / n,
        bias: err.iter().sum::<f64>() / n,
        r2: 1.0 - ss_res / ss_tot,
        pull_mean,
        pull_std,
        coverage_68,
        coverage_95,
        marginal_nll_z: marginal_nll - sigma.ln(),
        marginal_nll,
        rmse_over_crlb: crlb.map(|c| rmse / c),
        median_crlb: crlb,
        rmse_over_crlb_marginal: None,
        median_crlb_marginal: None,
        se,
    }
}
