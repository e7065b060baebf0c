//! Evaluation and prediction: posterior summaries per star in physical units, and accuracy and
//! calibration metrics per label.
//!
//! Calibration is measured with the probability integral transform (PIT): the posterior CDF of
//! each marginal at the true value. A central interval of mass p covers the truth exactly when
//! |PIT - 0.5| <= p / 2, so coverage needs no interval approximation for any flow. Gaussian flows
//! use their analytic moments and CDF; other flows use samples.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use starflow_data::npy::NpyArray;
use starflow_data::{Batch, Batcher, Dataset, FluxTransform, LoadOptions};
pub use starflow_flows::special::chi2_cdf;
use starflow_flows::special::normal_cdf;
use starflow_flows::{Flow, LogProbParts, PosteriorSummary, Samples};

use crate::calibration::{Calibration, CalibrationMethod, Frame, Resolved};
use crate::kinds::{by_kind, by_snr, coverage_curve, CoverageCurve, KindCalibration, SnrBin};
use crate::radial::precision_of;
use starflow_training::config::TrainConfig;
use starflow_training::error::{Result, TrainError};
use starflow_training::model::StarModel;
use starflow_training::run::{write_text, RunDir, RunState};
use starflow_training::train::{
    calibration_set, calibration_set_dir, load_run, prepare_data, Prepared, Quiet,
};

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
        Evaluation {
            n_stars: keep.len(),
            stars: keep.iter().map(|&i| self.stars[i].clone()).collect(),
            star_nll_z: keep
                .iter()
                .filter_map(|&i| self.star_nll_z.get(i).copied())
                .collect(),
            precisions: pick(&self.precisions),
            ..self.clone()
        }
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

/// Samples per star kept in [`Evaluation::standardized_draws`]: with a validation split of a
/// thousand stars, tens of thousands of draws fix the pooled quantiles far better than the
/// errors' own are fixed.
pub const POOLED_DRAWS: usize = 64;

/// Refuses posterior sample counts too small for meaningful quantiles.
pub(crate) fn check_samples(run_dir: &Path, n_samples: usize) -> Result<()> {
    if !(10..=MAX_SAMPLES).contains(&n_samples) {
        return Err(TrainError::config(
            run_dir,
            format!(
                "--samples must be between 10 and {MAX_SAMPLES} (got {n_samples}); 1,000 resolve \
                 the 2.5 and 97.5 % quantiles to ~0.5 %"
            ),
        ));
    }
    Ok(())
}

/// The most posterior samples per star: a batch of 128 stars holds `128 x samples x 3` values,
/// 300 MB at this limit.
pub const MAX_SAMPLES: usize = 100_000;

/// Posterior summaries (z-units) and, given truths, PITs for one batch of parameters.
///
/// With a calibration each posterior is mapped (see [`Calibration`]). A Gaussian flow's summary
/// is mapped in closed form, and the PIT of a truth is the unscaled posterior's CDF at the point
/// [`Resolved::seen`]; a sampled flow's samples are mapped, and summaries and PITs are the
/// mapped samples' own.
pub(crate) fn summarize_batch(
    model: &StarModel,
    params: &Tensor,
    truth_z: Option<&[f64]>,
    n_samples: usize,
    draws: &mut Draws,
    cal: Option<&Resolved>,
    noise: &[Option<f64>],
) -> Result<BatchSummaries> {
    let d = model.flow.dim();
    let b = params.dims()[0];
    let (unscaled, drawn): (Vec<PosteriorSummary>, Option<Samples>) = if model.flow.is_gaussian() {
        let moments = model.flow.gaussian_moments(params)?;
        (moments.iter().map(|m| m.to_summary()).collect(), None)
    } else {
        let samples = match draws {
            Draws::Shared(rng) => model.flow.sample(params, n_samples, *rng)?,
            Draws::PerStar { seed, rows } => {
                let mut rngs: Vec<ChaCha8Rng> = rows.iter().map(|&r| star_rng(*seed, r)).collect();
                model.flow.sample_per_item(params, n_samples, &mut rngs)?
            }
        };
        (samples.summarize(), Some(samples))
    };
    debug_assert_eq!(b, unscaled.len());
    // The unscaled posteriors, about which a calibration acts.
    let frames: Vec<Frame> = match cal {
        Some(c) => unscaled
            .iter()
            .zip(noise)
            .map(|(s, n)| c.frame(s, *n))
            .collect(),
        None => Vec::new(),
    };
    let truth = |i: usize| truth_z.map(|t| &t[i * d..(i + 1) * d]);
    let items: Vec<(PosteriorSummary, Option<Vec<f64>>)> = match (&drawn, cal) {
        (Some(smp), Some(c)) => {
            let mut mapped = smp.clone();
            for (chunk, f) in mapped.values.chunks_exact_mut(n_samples * d).zip(&frames) {
                c.apply_to_points(chunk, f);
            }
            let pits = (0..b).map(|i| truth(i).map(|t| sample_pit(mapped.item(i), t)));
            mapped.summarize().into_iter().zip(pits).collect()
        }
        (Some(smp), None) => unscaled
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, truth(i).map(|t| sample_pit(smp.item(i), t))))
            .collect(),
        (None, _) => unscaled
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                let pit = truth(i).map(|t| {
                    (0..d)
                        .map(|j| {
                            let seen = cal.map_or(t[j], |c| c.seen(t[j], &frames[i], j));
                            normal_cdf((seen - s.mean[j]) / s.std[j])
                        })
                        .collect()
                });
                if let Some(c) = cal {
                    c.apply(&mut s, &frames[i], None);
                }
                (s, pit)
            })
            .collect(),
    };
    let y_seen = truth_z.map(|t| match cal {
        Some(c) => (0..b)
            .flat_map(|i| c.seen_point(&t[i * d..(i + 1) * d], &frames[i]))
            .collect(),
        None => t.to_vec(),
    });
    Ok(BatchSummaries {
        items,
        samples: drawn,
        y_seen,
        raw: frames,
    })
}

/// Per label, the fraction of posterior samples `pts` (`(n, d)` row-major) below the truth `t`,
/// with half a sample's weight at each end so it never reaches 0 or 1.
fn sample_pit(pts: &[f64], t: &[f64]) -> Vec<f64> {
    let d = t.len();
    let n = pts.len() / d;
    (0..d)
        .map(|j| {
            let below = pts.chunks_exact(d).filter(|p| p[j] < t[j]).count();
            (below as f64 + 0.5) / (n as f64 + 1.0)
        })
        .collect()
}

/// Where the randomness of posterior samples comes from.
pub(crate) enum Draws<'a> {
    /// One generator for the whole pass, drawn from in star order (evaluation).
    Shared(&'a mut ChaCha8Rng),
    /// One stream per star, from the seed and the star's row in its file (prediction): a star's
    /// samples do not depend on the batch or shard it is predicted in.
    PerStar { seed: u64, rows: &'a [usize] },
}

/// The generator of the star in file row `row`: ChaCha8 keyed by `seed`, on stream `row`.
pub(crate) fn star_rng(seed: u64, row: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(row as u64);
    rng
}

/// One batch's posteriors.
pub(crate) struct BatchSummaries {
    /// Per star, the z-unit summary (recalibrated when asked) and the PITs (given truths).
    pub(crate) items: Vec<(PosteriorSummary, Option<Vec<f64>>)>,
    /// The unscaled posterior samples (non-Gaussian flows only).
    samples: Option<Samples>,
    /// Given truths, `(b, d)` row-major: each truth as seen by the unscaled posterior, whose
    /// density there is the recalibrated density at the truth times the maps' Jacobian.
    y_seen: Option<Vec<f64>>,
    /// Per star, the unscaled posterior as the calibration sees it (empty without one).
    raw: Vec<Frame>,
}

/// Posterior samples per star used to rank the truth's density for [`StarPrediction::hpd`]
/// (non-Gaussian flows): the level is resolved to ~1/400, well below the sampling noise of a
/// coverage on a few thousand stars, at a fraction of the cost of ranking every sample.
const HPD_SAMPLES: usize = 400;

/// What the joint HPD levels of a recalibrated posterior need beyond the unscaled one: the
/// maps, about which means and stds they act, and the truths as the unscaled posterior sees them.
struct Jacobians<'a> {
    cal: &'a Resolved,
    raw: &'a [Frame],
    y_seen: &'a [f64],
}

/// [`StarPrediction::hpd`] for a batch. Gaussian flows: the chi-square CDF of the squared
/// Mahalanobis distance, which is `|z|^2` at the base point. Other flows, and Gaussian flows
/// under a non-affine recalibration (`jac`, with `samples` drawn for it): the fraction of the
/// star's posterior samples whose density exceeds the truth's. A map's image of a sample has the
/// sample's density over the map's Jacobian there; an affine map's constant Jacobian cancels.
fn hpd_levels(
    flow: &Flow,
    params: &Tensor,
    parts: &LogProbParts,
    samples: Option<&Samples>,
    jac: Option<Jacobians>,
) -> Result<Vec<f64>> {
    let d = flow.dim();
    let Some(s) = samples else {
        let z: Vec<f64> = parts.z.flatten_all()?.to_vec1()?;
        return Ok(z
            .chunks_exact(d)
            .map(|zi| chi2_cdf(d, zi.iter().map(|v| v * v).sum()))
            .collect());
    };
    let (b, k) = (s.n_items, s.n_per_item.min(HPD_SAMPLES));
    let idx: Vec<u32> = (0..b as u32)
        .flat_map(|i| std::iter::repeat_n(i, k))
        .collect();
    let idx = Tensor::from_vec(idx, b * k, params.device())?;
    let mut pts = Vec::with_capacity(b * k * d);
    for i in 0..b {
        pts.extend_from_slice(&s.item(i)[..k * d]);
    }
    let points = Tensor::from_slice(&pts, (b * k, d), params.device())?;
    let mut lp_samples: Vec<f64> = flow
        .log_prob(&params.index_select(&idx, 0)?, &points)?
        .to_vec1()?;
    let mut lp_truth: Vec<f64> = parts.log_prob.to_vec1()?;
    if let Some(j) = jac {
        for i in 0..b {
            let f = &j.raw[i];
            lp_truth[i] -= j.cal.log_jacobian(&j.y_seen[i * d..(i + 1) * d], f);
            for r in 0..k {
                let at = (i * k + r) * d;
                lp_samples[i * k + r] -= j.cal.log_jacobian(&pts[at..at + d], f);
            }
        }
    }
    Ok((0..b)
        .map(|i| {
            let denser = lp_samples[i * k..(i + 1) * k]
                .iter()
                .filter(|&&v| v > lp_truth[i])
                .count();
            (denser as f64 + 0.5) / (k as f64 + 1.0)
        })
        .collect())
}

pub(crate) fn to_physical(
    s: &PosteriorSummary,
    mean: &[f64],
    std: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<[f64; 5]>) {
    let d = mean.len();
    (
        (0..d).map(|j| mean[j] + std[j] * s.mean[j]).collect(),
        (0..d).map(|j| std[j] * s.std[j]).collect(),
        (0..d)
            .map(|j| s.quantiles[j].map(|q| mean[j] + std[j] * q))
            .collect(),
    )
}

/// Where the stars of an evaluation come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvalSource {
    /// A split (`train`, `val` or `test`) of the data the run was trained on.
    Split(String),
    /// Any labelled data set on the run's pixel grid (every row is evaluated), such as a
    /// synthetic set drawn with a seed never used in training.
    Files { spectra: PathBuf, labels: PathBuf },
}

impl EvalSource {
    /// `spectra.npy` and `labels.npy` in a directory.
    pub fn dir(dir: &Path) -> Self {
        EvalSource::Files {
            spectra: dir.join("spectra.npy"),
            labels: dir.join("labels.npy"),
        }
    }

    /// Checks, in milliseconds, what can be checked without loading the stars: that the split is
    /// one of `train`, `val`, `test`, or that both files open as npy arrays. Callers that fit a
    /// recalibration first (minutes) call this before, so a typo fails at once.
    pub fn check_quickly(&self, run_dir: &Path) -> Result<()> {
        match self {
            EvalSource::Split(s) if !SPLITS.contains(&s.as_str()) => Err(unknown_split(s, run_dir)),
            EvalSource::Split(_) => Ok(()),
            EvalSource::Files { spectra, labels } => {
                starflow_data::npy::NpyArray::open(spectra)?;
                starflow_data::npy::NpyArray::open(labels)?;
                Ok(())
            }
        }
    }

    /// The name evaluations carry: the split, or `data` for other files.
    pub fn name(&self) -> &str {
        match self {
            EvalSource::Split(s) => s,
            EvalSource::Files { .. } => "data",
        }
    }
}

/// A finished run with the stars to evaluate, ready to be evaluated.
struct Opened {
    state: RunState,
    model: StarModel,
    dataset: Dataset,
    flux: FluxTransform,
    indices: Vec<usize>,
    /// Where `crlb.npy` would be.
    data_dir: PathBuf,
}

/// The stars of `source` for a run: the data set, its flux transform, the rows to evaluate and
/// the directory where the generator's bound files (`crlb.npy`) would be.
pub struct SourceRows {
    pub dataset: Dataset,
    pub flux: FluxTransform,
    pub indices: Vec<usize>,
    pub data_dir: PathBuf,
}

/// Loads the stars of `source` for the run in `run_dir` (whose state is `state`), refusing data
/// whose pixel count differs from what the run was trained on.
pub fn source_rows(run_dir: &Path, state: &RunState, source: &EvalSource) -> Result<SourceRows> {
    let rows = match source {
        EvalSource::Split(split) => {
            let data = prepare_data(&state.config, &Quiet)?;
            let indices = split_indices(&data, split, run_dir)?;
            SourceRows {
                dataset: data.dataset,
                flux: data.flux,
                indices,
                data_dir: state.config.data.dir.clone(),
            }
        }
        EvalSource::Files { spectra, labels } => {
            let d = &state.config.data;
            let opts = LoadOptions {
                label_names: d.label_names.clone(),
                targets: d.targets.clone(),
                drop_nonfinite: d.drop_nonfinite,
            };
            let dataset = Dataset::load_npy(spectra, labels, &opts)?;
            SourceRows {
                indices: (0..dataset.len()).collect(),
                dataset,
                flux: FluxTransform::new(state.flux_floor)?,
                data_dir: spectra.parent().unwrap_or(Path::new(".")).to_path_buf(),
            }
        }
    };
    if rows.dataset.n_pix() != state.n_pix {
        return Err(TrainError::Input {
            path: rows.dataset.paths().0.to_path_buf(),
            problem: format!(
                "the spectra have {} pixels, but the run in {} was trained on {} pixels",
                rows.dataset.n_pix(),
                run_dir.display(),
                state.n_pix
            ),
            fix: match source {
                EvalSource::Split(_) => {
                    "evaluate with the data the run was trained on (data.dir in its config.toml)"
                        .into()
                }
                EvalSource::Files { .. } => {
                    "pass spectra on the wavelength grid the run was trained on".into()
                }
            },
        });
    }
    if let EvalSource::Split(_) = source {
        let (spectra, labels) = rows.dataset.paths();
        state.check_data(
            &RunDir::new(run_dir),
            spectra,
            labels,
            "restore the data the run was trained on (data.dir in its config.toml), or evaluate these files with --data, which makes no claim about splits",
        )?;
    }
    if rows.indices.is_empty() {
        return Err(TrainError::config(
            run_dir,
            format!("no stars to evaluate in {}", source.name()),
        ));
    }
    Ok(rows)
}

/// Loads a run and the stars of `source`.
fn open_source(run_dir: &Path, source: &EvalSource) -> Result<Opened> {
    let (state, model) = load_run(run_dir)?;
    let SourceRows {
        dataset,
        flux,
        indices,
        data_dir,
    } = source_rows(run_dir, &state, source)?;
    Ok(Opened {
        state,
        model,
        dataset,
        flux,
        indices,
        data_dir,
    })
}

/// The rows of a named split.
fn split_indices(data: &Prepared, split: &str, run_dir: &Path) -> Result<Vec<usize>> {
    match split {
        "train" => Ok(data.split.train.clone()),
        "val" => Ok(data.split.val.clone()),
        "test" => Ok(data.split.test.clone()),
        other => Err(unknown_split(other, run_dir)),
    }
}

/// The splits a run's data are divided into, by name.
const SPLITS: [&str; 3] = ["train", "val", "test"];

/// The error for a split name that is none of [`SPLITS`].
fn unknown_split(name: &str, run_dir: &Path) -> TrainError {
    TrainError::config(
        run_dir,
        format!("unknown split `{name}`; use train, val or test"),
    )
}

/// Evaluates a run on a split (`train`, `val` or `test`) of the data it was trained on.
pub fn evaluate(run_dir: &Path, split: &str, n_samples: usize, seed: u64) -> Result<Evaluation> {
    evaluate_scaled(run_dir, split, n_samples, seed, None)
}

/// Posterior samples per star with which `train` (the command line and Python) fits a sampled
/// flow's maps when training ends (Gaussian flows are summarised exactly and draw none). The maps
/// read each star's mean and std and the pooled standardised draws, millions of points either
/// way, so a quarter of `evaluate`'s default 1,000 changes them by less than their own sampling
/// noise. Measured 2026-12-04, quick TinyCNN + full_flow, 20,000 calibration stars: 1,000 -> 250
/// samples took the fit from 39 to 23 s on 2 cores; on 3,000 held-out stars each of seeds 777
/// and 1001 the recalibrated NLL moved by less than 0.002, every pull mean, pull std and
/// coverage by less than 0.006, and the joint 68.3 % coverage from 66.4 / 66.2 % to 66.8 / 66.7 %
/// (± 0.9).
pub const CALIBRATION_FIT_SAMPLES: usize = 250;

/// Fits a [`Calibration`] (quantile maps) on the validation split of a run.
pub fn fit_calibration(run_dir: &Path, n_samples: usize, seed: u64) -> Result<Calibration> {
    fit_calibration_with(run_dir, n_samples, seed, CalibrationMethod::Quantile)
}

/// Fits a [`Calibration`] of the given kind on the run's synthetic calibration set when its
/// config draws one (`data.calibration_n`, generated on first use), else on its validation split.
pub fn fit_calibration_with(
    run_dir: &Path,
    n_samples: usize,
    seed: u64,
    method: CalibrationMethod,
) -> Result<Calibration> {
    let state = RunDir::new(run_dir).load_state()?;
    let (source, set_seed) = calibration_source(&state.config)?;
    // The maps are fitted to the marginals (and the Gaussian flows' precisions), never to the
    // joint HPD levels, which for a sampled flow cost a log-prob per sample and star.
    let mut evals = evaluate_passes(run_dir, &source, n_samples, seed, &[None], Joint::Skip)?;
    let own = evals.remove(0);
    let verdict = match method {
        CalibrationMethod::Quantile => {
            width_helps(run_dir, &source, n_samples, seed, &own, method)?
        }
        CalibrationMethod::Affine => None,
    };
    let widen = verdict == Some(true);
    let mut c = fit_marked(Calibration::fit_with(&own, method, widen), set_seed);
    c.width_declined = verdict == Some(false);
    c.epochs_done = state.epochs_done;
    Ok(c)
}

/// Whether the per-star widening ([`crate::WidthMap`]) lowers the NLL of stars it was not fitted
/// on (`None` when there are too few stars for one): recalibrations with and without it are fitted on the even-numbered stars of `own` (the
/// model's own posteriors on the calibration stars) and scored on the odd-numbered ones, in one
/// more pass over the set. A widening acts about each posterior's mean, which pulls the modes of
/// a two-mode posterior apart: measured on 10,000 stars of seed 1001, CNNModel + full_flow's
/// recalibrated NLL was -2.128 without it and -1.694 with it (its own posteriors -1.871), while
/// every TinyCNN run and CNNModel's Gaussian flows gained 0.05-0.14.
fn width_helps(
    run_dir: &Path,
    source: &EvalSource,
    n_samples: usize,
    seed: u64,
    own: &Evaluation,
    method: CalibrationMethod,
) -> Result<Option<bool>> {
    let (even, odd): (Vec<usize>, Vec<usize>) = (0..own.stars.len()).partition(|i| i % 2 == 0);
    let half = own.subset(&even);
    let with = Calibration::fit_with(&half, method, true);
    if with.width.is_none() {
        return Ok(None);
    }
    let without = Calibration::fit_with(&half, method, false);
    let scored = evaluate_passes(
        run_dir,
        source,
        n_samples,
        seed,
        &[Some(&with), Some(&without)],
        Joint::Skip,
    )?;
    let held_out = |e: &Evaluation| odd.iter().map(|&i| e.star_nll_z[i]).sum::<f64>();
    let (a, b) = (held_out(&scored[0]), held_out(&scored[1]));
    tracing::info!(
        with = a / odd.len() as f64,
        without = b / odd.len() as f64,
        "per-star widening: held-out NLL of the calibration stars"
    );
    Ok(Some(a < b))
}

/// The stars a config's recalibration is fitted on: its synthetic calibration set when it draws
/// one (generated on first use; with the set's seed), else its validation split (`None`).
fn calibration_source(cfg: &TrainConfig) -> Result<(EvalSource, Option<u64>)> {
    Ok(match calibration_set(cfg, &Quiet)? {
        Some(dir) => (EvalSource::dir(&dir), Some(cfg.data.calibration_seed)),
        None => (EvalSource::Split("val".into()), None),
    })
}

/// Whether `c` was fitted on the stars `cfg` names now: its calibration set, of the same size and
/// seed, or, when it draws none, its validation split. Maps saved before the config's
/// `data.calibration_n` or `data.calibration_seed` changed are then refitted, not reused.
fn fitted_on_config_stars(c: &Calibration, cfg: &TrainConfig) -> bool {
    match calibration_set_dir(cfg) {
        Some(_) => {
            c.fitted_on == CALIBRATION_SET
                && c.n_stars == cfg.data.calibration_n
                && c.set_seed == Some(cfg.data.calibration_seed)
        }
        None => c.fitted_on != CALIBRATION_SET,
    }
}

/// [`Calibration::fitted_on`] of maps fitted on a config's synthetic calibration set.
pub const CALIBRATION_SET: &str = "calibration";

/// The run's calibration from `RUN/calibration.json` when it is there, readable and fitted to the
/// run's current weights.
pub fn cached_calibration(run_dir: &Path) -> Result<Option<Calibration>> {
    let path = run_dir.join(CALIBRATION_FILE);
    let state = RunDir::new(run_dir).load_state()?;
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    Ok(match serde_json::from_str::<Calibration>(&text) {
        Ok(c)
            if c.epochs_done == state.epochs_done
                && c.labels == state.scaler.names
                && fitted_on_config_stars(&c, &state.config) =>
        {
            Some(c)
        }
        Ok(_) => {
            tracing::info!(
                "{}: fitted for other weights or another calibration set, fitting again",
                path.display()
            );
            None
        }
        Err(e) => {
            tracing::warn!("{}: unreadable ({e}), fitting again", path.display());
            None
        }
    })
}

/// The run's calibration from `RUN/calibration.json`, fitted (and saved atomically) when missing
/// or older than the run's weights.
pub fn load_or_fit_calibration(run_dir: &Path, n_samples: usize, seed: u64) -> Result<Calibration> {
    if let Some(c) = cached_calibration(run_dir)? {
        return Ok(c);
    }
    let path = run_dir.join(CALIBRATION_FILE);
    let c = fit_calibration(run_dir, n_samples, seed)?;
    write_json(&path, &c)?;
    Ok(c)
}

/// `value` as pretty JSON in `path`, written atomically ([`write_text`]).
fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| TrainError::config(path, format!("cannot serialise: {e}")))?;
    write_text(path, &text)
}

/// What to tell a user when fitting a run's recalibration failed (its validation data are gone,
/// say): restore them, or take the model's own posteriors the way the caller offers (`--raw` on
/// the command line, `calibrate=False` in Python).
pub fn calibration_unavailable(run_dir: &Path, opt_out: &str) -> String {
    format!(
        "{}: no current recalibration is saved there and fitting one needs the run's validation \
         data; restore the data or pass {opt_out} for the model's own posteriors",
        run_dir.display()
    )
}

/// File name of a run's recalibration (its maps, see [`Calibration`]).
pub const CALIBRATION_FILE: &str = "calibration.json";

/// [`evaluate`] with the posteriors recalibrated by `calibration` (when given): PITs, coverage,
/// pulls, quantiles and the NLL are those of the recalibrated posteriors.
pub fn evaluate_scaled(
    run_dir: &Path,
    split: &str,
    n_samples: usize,
    seed: u64,
    calibration: Option<&Calibration>,
) -> Result<Evaluation> {
    evaluate_on(
        run_dir,
        &EvalSource::Split(split.to_string()),
        n_samples,
        seed,
        calibration,
    )
}

/// Evaluates a run on the stars of `source`, recalibrated by `calibration` when given.
pub fn evaluate_on(
    run_dir: &Path,
    source: &EvalSource,
    n_samples: usize,
    seed: u64,
    calibration: Option<&Calibration>,
) -> Result<Evaluation> {
    let mut evals = evaluate_on_each(run_dir, source, n_samples, seed, &[calibration])?;
    Ok(evals.remove(0))
}

/// [`evaluate_on`] for several calibrations (`None`: the model's own posteriors) in one pass over
/// the data: each batch is read and run through the network once, and every calibration summarises
/// the same posteriors. Each gets its own sampler seeded with `seed`, so the results equal separate
/// [`evaluate_on`] calls. `starflow report` uses it for the raw and the recalibrated figures.
pub fn evaluate_on_each(
    run_dir: &Path,
    source: &EvalSource,
    n_samples: usize,
    seed: u64,
    calibrations: &[Option<&Calibration>],
) -> Result<Vec<Evaluation>> {
    evaluate_passes(
        run_dir,
        source,
        n_samples,
        seed,
        calibrations,
        Joint::Levels,
    )
}

/// Whether an evaluation ranks each truth in its joint posterior ([`StarPrediction::hpd`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Joint {
    Levels,
    /// `hpd` left empty: for fitting a calibration, which never reads it.
    Skip,
}

/// [`evaluate_on_each`], with the joint HPD levels computed or skipped.
fn evaluate_passes(
    run_dir: &Path,
    source: &EvalSource,
    n_samples: usize,
    seed: u64,
    calibrations: &[Option<&Calibration>],
    joint: Joint,
) -> Result<Vec<Evaluation>> {
    let start = Instant::now();
    check_samples(run_dir, n_samples)?;
    let opened = open_source(run_dir, source)?;
    let (state, model) = (&opened.state, &opened.model);
    let batcher = Batcher {
        dataset: &opened.dataset,
        flux: opened.flux,
        scaler: &state.scaler,
        device: model.device.clone(),
    };
    let d = state.scaler.mean.len();
    let mut passes = calibrations
        .iter()
        .map(|&c| Pass::new(run_dir, c, d, seed, opened.indices.len()))
        .collect::<Result<Vec<_>>>()?;
    let snr = star_snr(&opened.dataset, &opened.indices);
    for batch in batcher.batches(&opened.indices, 128)? {
        let b = batch?;
        let params = model.params(&b.x, false)?;
        let batch = Inputs {
            yz: b.y.flatten_all()?.to_vec1()?,
            // Once per batch, whatever the number of passes (the widening's check runs two).
            noise: starflow_data::log_noise_levels(&b.x)?,
            b,
        };
        for pass in &mut passes {
            pass.add(&opened, &params, &batch, n_samples, joint)?;
        }
    }
    passes
        .into_iter()
        .map(|p| {
            let mut e = assemble(
                state,
                source,
                &opened.data_dir,
                p.stars,
                &p.nll,
                state.config.model.flow.clone(),
                n_samples,
                start,
            )?;
            e.standardized_draws = p.draws;
            e.precisions = p.precisions;
            e.by_kind = by_kind(&e.stars, &state.scaler.names, snr.as_deref());
            e.by_snr = by_snr(&e.stars, &state.scaler.names, snr.as_deref());
            Ok(e)
        })
        .collect()
}

/// One batch as every pass of [`evaluate_passes`] reads it: the batch, its z-scored truths and
/// its spectra's noise levels ([`StarPrediction::noise`]).
struct Inputs {
    b: Batch,
    yz: Vec<f64>,
    noise: Vec<Option<f64>>,
}

/// One calibration's share of [`evaluate_on_each`]: its sampler and what it has summarised so far.
struct Pass {
    /// The calibration's maps, resolved once (`None`: the model's own posteriors).
    resolved: Option<Resolved>,
    rng: ChaCha8Rng,
    stars: Vec<StarPrediction>,
    nll: Vec<f64>,
    /// [`Evaluation::standardized_draws`] and `precisions` (model's own posteriors only).
    draws: Vec<Vec<f64>>,
    precisions: Vec<Vec<f64>>,
}

impl Pass {
    fn new(
        run_dir: &Path,
        calibration: Option<&Calibration>,
        d: usize,
        seed: u64,
        n: usize,
    ) -> Result<Self> {
        if let Some(c) = calibration {
            let fits = |len: usize| len == 0 || len == d;
            if c.scale.len() != d || !fits(c.shift.len()) || !fits(c.maps.len()) {
                return Err(TrainError::config(
                    run_dir,
                    format!(
                        "the calibration has {} factors, {} shifts and {} maps but the run predicts {d} labels",
                        c.scale.len(),
                        c.shift.len(),
                        c.maps.len()
                    ),
                ));
            }
        }
        Ok(Pass {
            resolved: calibration.map(Calibration::resolved),
            rng: ChaCha8Rng::seed_from_u64(seed),
            stars: Vec::with_capacity(n),
            nll: Vec::with_capacity(n),
            draws: vec![Vec::new(); d],
            precisions: Vec::new(),
        })
    }

    /// Summarises one batch: `params` from the network for the stars of `inputs`.
    fn add(
        &mut self,
        opened: &Opened,
        params: &Tensor,
        inputs: &Inputs,
        n_samples: usize,
        joint: Joint,
    ) -> Result<()> {
        let (state, model) = (&opened.state, &opened.model);
        let d = model.flow.dim();
        let (b, yz, noise) = (&inputs.b, &inputs.yz[..], &inputs.noise);
        let batch = summarize_batch(
            model,
            params,
            Some(yz),
            n_samples,
            &mut Draws::Shared(&mut self.rng),
            self.resolved.as_ref(),
            noise,
        )?;
        // The recalibrated density at y is the unscaled density at y_seen over the Jacobian.
        let (y_seen, jac) = match (&batch.y_seen, &self.resolved) {
            (Some(v), Some(cal)) => (
                Tensor::from_slice(v, b.y.dims(), b.y.device())?,
                Some(Jacobians {
                    cal,
                    raw: &batch.raw,
                    y_seen: v,
                }),
            ),
            _ => (b.y.clone(), None),
        };
        let parts = model.flow.log_prob_parts(params, &y_seen)?;
        let log_prob: Vec<f64> = parts.log_prob.to_vec1()?;
        self.nll.extend(log_prob.iter().enumerate().map(|(i, lp)| {
            let log_jac = jac.as_ref().map_or(0.0, |j| {
                j.cal.log_jacobian(&j.y_seen[i * d..(i + 1) * d], &j.raw[i])
            });
            log_jac - lp
        }));
        let hpd = match joint {
            Joint::Levels => {
                let samples = batch.samples.as_ref();
                joint_levels(model, params, &parts, samples, jac, &mut self.rng)?
            }
            Joint::Skip => vec![None; batch.items.len()],
        };
        if self.resolved.is_none() {
            self.record_shapes(batch.samples.as_ref(), &batch.items);
        }
        for (k, (s, pit)) in batch.items.into_iter().enumerate() {
            let (mean, std, quantiles) = to_physical(&s, &state.scaler.mean, &state.scaler.std);
            let i = b.indices[k];
            self.stars.push(StarPrediction {
                row: opened.dataset.file_row(i),
                mean,
                std,
                quantiles,
                truth: Some(opened.dataset.targets(i)),
                pit,
                hpd: hpd[k],
                nll: None,
                noise: noise[k],
            });
        }
        Ok(())
    }
}

/// [`StarPrediction::hpd`] for a batch, given its posterior `samples` when the flow is sampled.
fn joint_levels(
    model: &StarModel,
    params: &Tensor,
    parts: &LogProbParts,
    samples: Option<&Samples>,
    jac: Option<Jacobians>,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Option<f64>>> {
    // An affine map keeps the density ranking of the truth among the unscaled samples (and
    // the Gaussian flows' chi-square levels); another map needs samples and its Jacobian.
    let jac = jac.filter(|j| !j.cal.is_affine());
    let drawn_for_hpd = match (samples, &jac) {
        (None, Some(_)) => Some(model.flow.sample(params, HPD_SAMPLES, rng)?),
        _ => None,
    };
    let samples = samples.or(drawn_for_hpd.as_ref());
    let levels = hpd_levels(&model.flow, params, parts, samples, jac)?;
    Ok(levels.into_iter().map(Some).collect())
}

impl Pass {
    /// Records what a recalibration is fitted to beyond the summaries: for Gaussian flows each
    /// star's precision (identity where its correlation is singular), which only their radial
    /// map uses; for sampled flows up to [`POOLED_DRAWS`] standardised samples per star.
    fn record_shapes(
        &mut self,
        drawn: Option<&Samples>,
        items: &[(PosteriorSummary, Option<Vec<f64>>)],
    ) {
        let d = self.draws.len();
        for (i, (s, _)) in items.iter().enumerate() {
            match drawn {
                Some(drawn) => {
                    pool_standardized(&mut self.draws, drawn.item(i), s, 1, POOLED_DRAWS)
                }
                None => self
                    .precisions
                    .push(precision_of(&s.cov, &s.std).unwrap_or_else(|| identity(d))),
            }
        }
    }
}

/// The `d x d` identity, row-major.
fn identity(d: usize) -> Vec<f64> {
    (0..d * d)
        .map(|k| if k % (d + 1) == 0 { 1.0 } else { 0.0 })
        .collect()
}

/// Adds up to `max` of one star's samples `pts` (`(n, d)` row-major), every `step`-th,
/// standardised by its summary `s`, to the per-label pools `draws`.
fn pool_standardized(
    draws: &mut [Vec<f64>],
    pts: &[f64],
    s: &PosteriorSummary,
    step: usize,
    max: usize,
) {
    let d = draws.len();
    for x in pts.chunks_exact(d).step_by(step.max(1)).take(max) {
        for (j, pool) in draws.iter_mut().enumerate() {
            pool.push((x[j] - s.mean[j]) / s.std[j]);
        }
    }
}

/// Evaluates a deep ensemble: the equal-weight mixture of the posteriors of `runs` (the same
/// labels, normalisation and pixel grid; typically the same recipe trained from different seeds)
/// on the stars of `source`. Each member contributes `n_samples / K` posterior samples, so means,
/// quantiles, PITs and the joint HPD levels come from the pooled samples of the mixture; the NLL
/// is the mixture's exact density, `log(mean_k p_k(y))`. The mixture as it is; see
/// [`evaluate_ensemble_scaled`] for it recalibrated.
pub fn evaluate_ensemble(
    runs: &[PathBuf],
    source: &EvalSource,
    n_samples: usize,
    seed: u64,
) -> Result<Evaluation> {
    evaluate_ensemble_scaled(runs, source, n_samples, seed, None)
}

/// Fits a [`Calibration`] (quantile maps) of the ensemble of `runs` on the stars the first run's
/// own maps are fitted on (its config's calibration set, else its validation split): members are
/// not recalibrated one by one; their mixture is, like a single run's posterior.
pub fn fit_ensemble_calibration(
    runs: &[PathBuf],
    n_samples: usize,
    seed: u64,
) -> Result<Calibration> {
    let (source, set_seed) = match runs.first() {
        Some(first) => calibration_source(&RunDir::new(first).load_state()?.config)?,
        None => (EvalSource::Split("val".into()), None),
    };
    // As for a single run, the maps never read the joint HPD levels: skipped, they cost nothing
    // (here a mixture log-prob at up to HPD_SAMPLES pooled samples per star).
    let e = ensemble_pass(runs, &source, n_samples, seed, None, Joint::Skip)?;
    Ok(fit_marked(
        Calibration::fit(&e, CalibrationMethod::Quantile),
        set_seed,
    ))
}

/// File in the first run's directory holding the maps of the last ensemble it led, with what
/// they were fitted for ([`EnsembleCalibration`]).
pub const ENSEMBLE_CALIBRATION_FILE: &str = "ensemble-calibration.json";

/// What an ensemble's maps were fitted for: the members (canonical paths, first first), each
/// member's epochs, and the sampler's settings, since the pooled samples the maps are fitted to
/// depend on all of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnsembleFit {
    pub members: Vec<PathBuf>,
    pub epochs_done: Vec<usize>,
    pub n_samples: usize,
    pub seed: u64,
}

/// The content of [`ENSEMBLE_CALIBRATION_FILE`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnsembleCalibration {
    pub fitted_for: EnsembleFit,
    pub calibration: Calibration,
}

/// [`fit_ensemble_calibration`], read from `FIRST_RUN/ensemble-calibration.json` when that file
/// was written for the same members at the same epochs with the same `n_samples` and `seed`, else
/// fitted and saved there (atomically) for the next call. A fit costs a pass of every member over
/// the calibration set (~40 s for three TinyCNN members and 10,000 stars on 2 cores); evaluating
/// the same ensemble on several sets then pays it once. A file that cannot be written (a
/// read-only run) only costs the next call a fit.
pub fn load_or_fit_ensemble_calibration(
    runs: &[PathBuf],
    n_samples: usize,
    seed: u64,
) -> Result<Calibration> {
    let Some(first) = runs.first() else {
        return fit_ensemble_calibration(runs, n_samples, seed);
    };
    let states = runs
        .iter()
        .map(|r| RunDir::new(r).load_state())
        .collect::<Result<Vec<_>>>()?;
    let fitted_for = EnsembleFit {
        members: runs
            .iter()
            .map(|r| std::fs::canonicalize(r).unwrap_or_else(|_| r.clone()))
            .collect(),
        epochs_done: states.iter().map(|s| s.epochs_done).collect(),
        n_samples,
        seed,
    };
    let cfg = &states[0].config;
    let path = first.join(ENSEMBLE_CALIBRATION_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        match serde_json::from_str::<EnsembleCalibration>(&text) {
            Ok(s) if s.fitted_for == fitted_for && fitted_on_config_stars(&s.calibration, cfg) => {
                return Ok(s.calibration)
            }
            Ok(_) => tracing::info!(
                "{}: fitted for another ensemble or calibration set, fitting again",
                path.display()
            ),
            Err(e) => tracing::warn!("{}: unreadable ({e}), fitting again", path.display()),
        }
    }
    let calibration = fit_ensemble_calibration(runs, n_samples, seed)?;
    let entry = EnsembleCalibration {
        fitted_for,
        calibration,
    };
    if let Err(e) = write_json(&path, &entry) {
        tracing::warn!(
            "{}: not saved ({e}); the next call fits again",
            path.display()
        );
    }
    Ok(entry.calibration)
}

/// [`Calibration::fit`], marked as fitted on the config's calibration set of seed `set_seed` when
/// it was.
fn fit_marked(mut c: Calibration, set_seed: Option<u64>) -> Calibration {
    if set_seed.is_some() {
        c.fitted_on = CALIBRATION_SET.into();
        c.set_seed = set_seed;
    }
    c
}

/// [`evaluate_ensemble`] with the mixture mapped by `calibration` (when given), as
/// [`evaluate_scaled`] maps a single run's posteriors.
pub fn evaluate_ensemble_scaled(
    runs: &[PathBuf],
    source: &EvalSource,
    n_samples: usize,
    seed: u64,
    calibration: Option<&Calibration>,
) -> Result<Evaluation> {
    ensemble_pass(runs, source, n_samples, seed, calibration, Joint::Levels)
}

/// [`evaluate_ensemble_scaled`], with the joint HPD levels computed or skipped; the samples
/// drawn, and so every other figure, are the same either way.
fn ensemble_pass(
    runs: &[PathBuf],
    source: &EvalSource,
    n_samples: usize,
    seed: u64,
    calibration: Option<&Calibration>,
    joint: Joint,
) -> Result<Evaluation> {
    let start = Instant::now();
    let Some(first) = runs.first() else {
        return Err(TrainError::config(
            Path::new("."),
            "an ensemble needs at least one run".to_string(),
        ));
    };
    check_samples(first, n_samples)?;
    let members = load_members(runs)?;
    let state = &members[0].0;
    let rows = source_rows(first, state, source)?;
    let batcher = Batcher {
        dataset: &rows.dataset,
        flux: rows.flux,
        scaler: &state.scaler,
        device: members[0].1.device.clone(),
    };
    let (k, d) = (members.len(), state.scaler.mean.len());
    let per_member = (n_samples / k).max(10);
    let cal = calibration.map(Calibration::resolved);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut stars = Vec::with_capacity(rows.indices.len());
    let mut nll = Vec::with_capacity(rows.indices.len());
    let mut draws = vec![Vec::new(); d];
    for batch in batcher.batches(&rows.indices, 128)? {
        let b = batch?;
        let n = b.indices.len();
        let yz: Vec<f64> = b.y.flatten_all()?.to_vec1()?;
        let params = members
            .iter()
            .map(|(_, m)| m.params(&b.x, false))
            .collect::<Result<Vec<_>>>()?;
        // Pooled samples, star by star: member 0's, then member 1's, ...
        let mut pooled = vec![Vec::with_capacity(k * per_member * d); n];
        for ((_, m), p) in members.iter().zip(&params) {
            let smp = m.flow.sample(p, per_member, &mut rng)?;
            for (i, pts) in pooled.iter_mut().enumerate() {
                pts.extend_from_slice(smp.item(i));
            }
        }
        let raw: Vec<PosteriorSummary> = pooled
            .iter()
            .map(|pts| starflow_flows::summarize_points(pts, d))
            .collect();
        let noise = starflow_data::log_noise_levels(&b.x)?;
        let frames: Vec<Frame> = match &cal {
            Some(c) => raw
                .iter()
                .zip(&noise)
                .map(|(s, f)| c.marginal_frame(s, *f))
                .collect(),
            None => Vec::new(),
        };
        // The truths as the unscaled mixture sees them, and the log-Jacobian of the maps there
        // (see `Pass::add`); with no calibration, the truths themselves.
        let seen: Vec<f64> = (0..n * d)
            .map(|q| {
                let (i, j) = (q / d, q % d);
                cal.as_ref().map_or(yz[q], |c| c.seen(yz[q], &frames[i], j))
            })
            .collect();
        let log_jac =
            |x: &[f64], i: usize| cal.as_ref().map_or(0.0, |c| c.log_jacobian(x, &frames[i]));
        let mixture = Mixture {
            members: &members,
            params: &params,
            per_member,
        };
        let seen_t = Tensor::from_slice(&seen, (n, d), b.y.device())?;
        let lp_truth: Vec<f64> = mixture
            .log_prob(&seen_t, n, 1)?
            .into_iter()
            .enumerate()
            .map(|(i, lp)| lp - log_jac(&seen[i * d..(i + 1) * d], i))
            .collect();
        nll.extend(lp_truth.iter().map(|v| -v));
        let hpd = match joint {
            Joint::Levels => mixture.hpd_levels(&pooled, &lp_truth, &log_jac)?,
            Joint::Skip => vec![None; n],
        };
        for (i, pts) in pooled.iter().enumerate() {
            let total = pts.len() / d;
            let pit = (0..d)
                .map(|j| {
                    let t = seen[i * d + j];
                    let below = (0..total).filter(|&r| pts[r * d + j] < t).count();
                    (below as f64 + 0.5) / (total as f64 + 1.0)
                })
                .collect();
            let mut s = raw[i].clone();
            match &cal {
                Some(c) => c.apply(&mut s, &frames[i], Some(pts)),
                // Every member's share alike: the pooled samples are member by member.
                None => pool_standardized(
                    &mut draws,
                    pts,
                    &s,
                    total.div_ceil(POOLED_DRAWS),
                    POOLED_DRAWS,
                ),
            }
            let (mean, std, quantiles) = to_physical(&s, &state.scaler.mean, &state.scaler.std);
            let row = b.indices[i];
            stars.push(StarPrediction {
                row: rows.dataset.file_row(row),
                mean,
                std,
                quantiles,
                truth: Some(rows.dataset.targets(row)),
                pit: Some(pit),
                hpd: hpd[i],
                nll: None,
                noise: noise[i],
            });
        }
    }
    let flows: Vec<String> = members
        .iter()
        .map(|(st, _)| st.config.model.flow.clone())
        .collect();
    let mut e = assemble(
        state,
        source,
        &rows.data_dir,
        stars,
        &nll,
        format!("ensemble of {k} ({})", flows.join(", ")),
        k * per_member,
        start,
    )?;
    e.standardized_draws = draws;
    let snr = star_snr(&rows.dataset, &rows.indices);
    e.by_kind = by_kind(&e.stars, &state.scaler.names, snr.as_deref());
    e.by_snr = by_snr(&e.stars, &state.scaler.names, snr.as_deref());
    Ok(e)
}

/// Each evaluated star's signal-to-noise, from the data's `SNR` label column (GALAH's layout), in
/// the order of `indices`; `None` when the data have no such column.
fn star_snr(dataset: &Dataset, indices: &[usize]) -> Option<Vec<f64>> {
    let column = dataset.column("SNR")?;
    Some(indices.iter().map(|&i| column[i]).collect())
}

/// The members of an ensemble, checked to share labels, normalisation and pixel grid, and to have
/// been trained on the same data files split the same way: the ensemble is evaluated on the first
/// run's test split, which must hold no member's training stars.
fn load_members(runs: &[PathBuf]) -> Result<Vec<(RunState, StarModel)>> {
    let members = runs
        .iter()
        .map(|r| load_run(r))
        .collect::<Result<Vec<_>>>()?;
    let state = &members[0].0;
    for (r, (st, _)) in runs.iter().zip(&members) {
        if let Some(problem) = member_mismatch(state, st) {
            return Err(TrainError::config(
                r,
                format!(
                    "this run's {problem} differ from {}'s: ensemble members must be trained on \
                     the same data, split the same way",
                    runs[0].display()
                ),
            ));
        }
    }
    Ok(members)
}

/// What of `member` differs from the ensemble's first run in a way that matters, if anything.
fn member_mismatch(first: &RunState, member: &RunState) -> Option<&'static str> {
    let split = |s: &RunState| {
        let d = &s.config.data;
        (
            d.train_fraction,
            d.val_fraction,
            d.test_fraction,
            d.split_seed,
            d.drop_nonfinite,
        )
    };
    if member.scaler != first.scaler || member.n_pix != first.n_pix {
        Some("labels, normalisation or pixel grid")
    } else if matches!(
        (&first.data_fingerprint, &member.data_fingerprint),
        (Some(a), Some(b)) if !b.differences(a).is_empty()
    ) {
        Some("data files (their sizes or contents)")
    } else if split(member) != split(first) {
        Some("split settings (data.*_fraction, data.split_seed or data.drop_nonfinite)")
    } else {
        None
    }
}

/// One batch of an ensemble: its members, their flow parameters for the batch's stars and how
/// many samples each member drew per star (pooled member by member).
struct Mixture<'a> {
    members: &'a [(RunState, StarModel)],
    params: &'a [Tensor],
    per_member: usize,
}

impl Mixture<'_> {
    /// The ensemble's log-density, `log(mean_k p_k(x))`, at `pts` (`(n * reps, d)`: `reps`
    /// points for each of the batch's `n` stars).
    fn log_prob(&self, pts: &Tensor, n: usize, reps: usize) -> Result<Vec<f64>> {
        let idx: Vec<u32> = (0..n as u32)
            .flat_map(|i| std::iter::repeat_n(i, reps))
            .collect();
        let idx = Tensor::from_vec(idx, n * reps, pts.device())?;
        let lps = self
            .members
            .iter()
            .zip(self.params)
            .map(|((_, m), p)| -> Result<Vec<f64>> {
                Ok(m.flow.log_prob(&p.index_select(&idx, 0)?, pts)?.to_vec1()?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((0..n * reps)
            .map(|r| log_mean_exp(lps.iter().map(|lp| lp[r])))
            .collect())
    }

    /// Each star's joint HPD level, `P(p(X) > p(truth))` under the (mapped) mixture: the fraction
    /// of up to HPD_SAMPLES of its pooled samples, taken evenly from every member, where the
    /// mixture density (less the maps' log-Jacobian `log_jac`) exceeds the truth's `lp_truth`.
    fn hpd_levels(
        &self,
        pooled: &[Vec<f64>],
        lp_truth: &[f64],
        log_jac: &dyn Fn(&[f64], usize) -> f64,
    ) -> Result<Vec<Option<f64>>> {
        let (n, k, d) = (
            pooled.len(),
            self.members.len(),
            self.members[0].0.scaler.mean.len(),
        );
        let h = (HPD_SAMPLES / k).clamp(1, self.per_member);
        let mut hp = Vec::with_capacity(n * k * h * d);
        for pts in pooled {
            for m in 0..k {
                let from = m * self.per_member * d;
                hp.extend_from_slice(&pts[from..from + h * d]);
            }
        }
        let device = self.params[0].device();
        let pts = Tensor::from_slice(&hp, (n * k * h, d), device)?;
        let lp_h = self.log_prob(&pts, n, k * h)?;
        Ok((0..n)
            .map(|i| {
                let denser = (0..k * h)
                    .filter(|&r| {
                        let at = (i * k * h + r) * d;
                        lp_h[i * k * h + r] - log_jac(&hp[at..at + d], i) > lp_truth[i]
                    })
                    .count();
                Some((denser as f64 + 0.5) / ((k * h) as f64 + 1.0))
            })
            .collect())
    }
}

/// The figures of an evaluation from its stars and their NLLs (z-units): per-label metrics with
/// the Cramér–Rao ratios when `data_dir` has the bound files, the joint coverage, the mean NLL.
#[allow(clippy::too_many_arguments)]
fn assemble(
    state: &RunState,
    source: &EvalSource,
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
        split: source.name().to_string(),
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

/// `log(mean(exp(v)))`, stable for very negative values.
fn log_mean_exp(v: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = v.clone().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    let (sum, count) = v.fold((0.0, 0usize), |(s, c), x| (s + (x - max).exp(), c + 1));
    max + (sum / count as f64).ln()
}

/// Mean and its standard error.
fn mean_and_se(v: &[f64]) -> (f64, f64) {
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

/// Posterior samples of a few stars, in physical units: what a corner plot draws.
#[derive(Clone, Debug)]
pub struct StarSamples {
    /// Row in the label file.
    pub row: usize,
    /// True labels (physical units).
    pub truth: Vec<f64>,
    /// Number of labels, d.
    pub dim: usize,
    /// `n × d` samples, row-major, physical units.
    pub samples: Vec<f64>,
}

/// Draws `n_samples` posterior samples for the stars at `positions` within a split (positions
/// index the split's rows in its stored order, e.g. as returned in [`Evaluation::stars`]).
pub fn posterior_samples(
    run_dir: &Path,
    split: &str,
    positions: &[usize],
    n_samples: usize,
    seed: u64,
) -> Result<Vec<StarSamples>> {
    let source = EvalSource::Split(split.to_string());
    posterior_samples_on(run_dir, &source, positions, n_samples, seed)
}

/// [`posterior_samples`] for stars of any [`EvalSource`] (positions index its rows).
pub fn posterior_samples_on(
    run_dir: &Path,
    source: &EvalSource,
    positions: &[usize],
    n_samples: usize,
    seed: u64,
) -> Result<Vec<StarSamples>> {
    check_samples(run_dir, n_samples)?;
    let split = source.name();
    let opened = open_source(run_dir, source)?;
    let chosen = positions
        .iter()
        .map(|&p| {
            opened.indices.get(p).copied().ok_or_else(|| {
                TrainError::config(
                    run_dir,
                    format!(
                        "star {p} is out of range: the {split} split has {} stars",
                        opened.indices.len()
                    ),
                )
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    let batcher = Batcher {
        dataset: &opened.dataset,
        flux: opened.flux,
        scaler: &opened.state.scaler,
        device: opened.model.device.clone(),
    };
    let scaler = &opened.state.scaler;
    let d = scaler.mean.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(chosen.len());
    for batch in batcher.batches(&chosen, 64)? {
        let b = batch?;
        let params = opened.model.params(&b.x, false)?;
        let samples = opened.model.flow.sample(&params, n_samples, &mut rng)?;
        for (k, &i) in b.indices.iter().enumerate() {
            let z = samples.item(k);
            let phys = z
                .iter()
                .enumerate()
                .map(|(m, v)| scaler.mean[m % d] + scaler.std[m % d] * v)
                .collect();
            out.push(StarSamples {
                row: opened.dataset.file_row(i),
                truth: opened.dataset.targets(i),
                dim: d,
                samples: phys,
            });
        }
    }
    Ok(out)
}
