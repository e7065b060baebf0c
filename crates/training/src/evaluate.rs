//! Evaluation and prediction: posterior summaries per star in physical units, and accuracy and
//! calibration metrics per label.
//!
//! Calibration is measured with the probability integral transform (PIT): the posterior CDF of
//! each marginal at the true value. A central interval of mass p covers the truth exactly when
//! |PIT - 0.5| <= p / 2, so coverage needs no interval approximation for any flow. Gaussian flows
//! use their analytic moments and CDF; other flows use samples.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use starflow_data::npy::NpyArray;
use starflow_data::{Batcher, FluxTransform};
use starflow_flows::PosteriorSummary;

use crate::error::{Result, TrainError};
use crate::model::StarModel;
use crate::run::{write_text, RunDir, RunState};
use crate::train::{load_run, prepare_data, Prepared, Quiet};

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
}

/// Metrics of one label, in physical units unless said otherwise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
}

/// The result of `evaluate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub split: String,
    pub n_stars: usize,
    pub flow: String,
    pub backbone: String,
    pub n_samples: usize,
    /// Mean joint NLL of the true labels, z-units, and in physical units (K, dex, dex).
    pub nll_z: f64,
    pub nll: f64,
    pub labels: Vec<LabelMetrics>,
    pub seconds: f64,
    #[serde(skip)]
    pub stars: Vec<StarPrediction>,
}

/// Standard normal CDF.
fn phi(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit), ample for a PIT.
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        1.0 - r
    } else {
        r - 1.0
    }
}

/// Refuses posterior sample counts too small for meaningful quantiles.
fn check_samples(run_dir: &Path, n_samples: usize) -> Result<()> {
    if n_samples < 10 {
        return Err(TrainError::config(
            run_dir,
            format!("--samples must be at least 10 (got {n_samples})"),
        ));
    }
    Ok(())
}

/// Per-label σ-scaling of the posteriors, fitted on the validation split: each label's posterior is
/// stretched about its mean by `scale[j]`, chosen so that half of the validation stars have
/// |pull| below the normal quartile 0.6745: `s = median(|pull|) / 0.6745`. A network trained for a
/// few epochs (or with dropout) is usually too wide or too narrow as a whole rather than star by
/// star, which one factor per label repairs (σ-scaling, Levi et al. 2019, "Evaluating and
/// calibrating uncertainty prediction in regression tasks"). The median, not the Gaussian
/// maximum-likelihood `mean(pull²)`, because pulls are heavy-tailed: a few badly predicted giants
/// in a validation split of a few hundred stars moved the mean-square factor by up to 1.8x in
/// the quick profile, and the factor then made the test split worse. Means, RMSE and bias are
/// unchanged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub labels: Vec<String>,
    pub scale: Vec<f64>,
    /// Split the factors were fitted on and its size.
    pub fitted_on: String,
    pub n_stars: usize,
    /// Epochs done when fitted: a run trained further needs new factors.
    #[serde(default)]
    pub epochs_done: usize,
}

impl Calibration {
    /// Fits the factors to an (unscaled) evaluation, normally of the validation split.
    pub fn fit(eval: &Evaluation) -> Self {
        let d = eval.labels.len();
        let scale = (0..d)
            .map(|j| {
                let mut abs: Vec<f64> = eval
                    .stars
                    .iter()
                    .filter_map(|s| {
                        s.truth
                            .as_ref()
                            .map(|t| ((s.mean[j] - t[j]) / s.std[j]).abs())
                    })
                    .filter(|p| p.is_finite())
                    .collect();
                if abs.is_empty() {
                    return 1.0;
                }
                abs.sort_by(f64::total_cmp);
                let n = abs.len();
                let median = if n % 2 == 1 {
                    abs[n / 2]
                } else {
                    0.5 * (abs[n / 2 - 1] + abs[n / 2])
                };
                if median > 0.0 {
                    median / NORMAL_QUARTILE
                } else {
                    1.0
                }
            })
            .collect();
        Calibration {
            labels: eval.labels.iter().map(|l| l.name.clone()).collect(),
            scale,
            fitted_on: eval.split.clone(),
            n_stars: eval.n_stars,
            epochs_done: 0,
        }
    }
}

/// The 75 % quantile of the standard normal: half of N(0, 1) lies within ±0.6745.
const NORMAL_QUARTILE: f64 = 0.674_489_750_196_081_7;

/// Stretches a posterior summary about its mean.
fn scale_summary(s: &mut PosteriorSummary, sc: &[f64]) {
    let d = s.mean.len();
    for j in 0..d {
        s.std[j] *= sc[j];
        let m = s.mean[j];
        s.quantiles[j] = s.quantiles[j].map(|q| m + sc[j] * (q - m));
        for k in 0..d {
            s.cov[j * d + k] *= sc[j] * sc[k];
        }
    }
}

/// Posterior summaries (z-units) and, given truths, PITs for one batch of parameters.
///
/// With `scale`, each label's posterior is widened (or narrowed) by `scale[j]` about its mean (see
/// [`Calibration`]): the PIT of a truth `t` under the scaled posterior is the unscaled posterior's
/// CDF at `m + (t - m) / s`, and the summary's spread is multiplied by `s`.
fn summarize_batch(
    model: &StarModel,
    params: &Tensor,
    truth_z: Option<&[f64]>,
    n_samples: usize,
    rng: &mut ChaCha8Rng,
    scale: Option<&[f64]>,
) -> Result<Vec<(PosteriorSummary, Option<Vec<f64>>)>> {
    let d = model.flow.dim();
    // The truth as seen by the unscaled posterior of item i, label j.
    let seen = |t: f64, m: f64, j: usize| match scale {
        Some(sc) => m + (t - m) / sc[j],
        None => t,
    };
    let b = params.dims()[0];
    let gaussian = model.flow.n_layers() == 1;
    let out: Vec<(PosteriorSummary, Option<Vec<f64>>)> = if gaussian {
        let moments = model.flow.gaussian_moments(params)?;
        moments
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let s = m.to_summary();
                let pit = truth_z.map(|t| {
                    (0..d)
                        .map(|j| phi((seen(t[i * d + j], s.mean[j], j) - s.mean[j]) / s.std[j]))
                        .collect()
                });
                (s, pit)
            })
            .collect()
    } else {
        let samples = model.flow.sample(params, n_samples, rng)?;
        let summaries = samples.summarize();
        summaries
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let pit = truth_z.map(|t| {
                    let pts = samples.item(i);
                    (0..d)
                        .map(|j| {
                            let tj = seen(t[i * d + j], s.mean[j], j);
                            let below = (0..n_samples).filter(|&k| pts[k * d + j] < tj).count();
                            (below as f64 + 0.5) / (n_samples as f64 + 1.0)
                        })
                        .collect()
                });
                (s, pit)
            })
            .collect()
    };
    debug_assert_eq!(b, out.len());
    let mut out = out;
    if let Some(sc) = scale {
        for (s, _) in &mut out {
            scale_summary(s, sc);
        }
    }
    Ok(out)
}

fn to_physical(
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

/// Evaluates a run on a split (`train`, `val` or `test`) of the data it was trained on.
/// A finished run with its data prepared and the rows of one split, ready to be evaluated.
struct Opened {
    state: RunState,
    model: StarModel,
    data: Prepared,
    indices: Vec<usize>,
}

/// Loads a run and its data and selects a split (`train`, `val` or `test`), refusing data whose
/// pixel count differs from what the run was trained on.
fn open_split(run_dir: &Path, split: &str) -> Result<Opened> {
    let (state, model) = load_run(run_dir)?;
    let data = prepare_data(&state.config, &Quiet)?;
    if data.dataset.n_pix() != state.n_pix {
        return Err(TrainError::Input {
            path: data.dataset.paths().0.to_path_buf(),
            problem: format!(
                "the spectra have {} pixels, but the run in {} was trained on {} pixels",
                data.dataset.n_pix(),
                run_dir.display(),
                state.n_pix
            ),
            fix: "evaluate with the data the run was trained on (data.dir in its config.toml)"
                .into(),
        });
    }
    let indices = match split {
        "train" => data.split.train.clone(),
        "val" => data.split.val.clone(),
        "test" => data.split.test.clone(),
        other => {
            return Err(TrainError::config(
                run_dir,
                format!("unknown split `{other}`; use train, val or test"),
            ));
        }
    };
    if indices.is_empty() {
        return Err(TrainError::config(
            run_dir,
            format!("the {split} split is empty"),
        ));
    }
    Ok(Opened {
        state,
        model,
        data,
        indices,
    })
}

/// Evaluates a run on a split (`train`, `val` or `test`) of the data it was trained on.
pub fn evaluate(run_dir: &Path, split: &str, n_samples: usize, seed: u64) -> Result<Evaluation> {
    evaluate_scaled(run_dir, split, n_samples, seed, None)
}

/// Fits a [`Calibration`] on the validation split of a run.
pub fn fit_calibration(run_dir: &Path, n_samples: usize, seed: u64) -> Result<Calibration> {
    let state = RunDir::new(run_dir).load_state()?;
    let mut c = Calibration::fit(&evaluate(run_dir, "val", n_samples, seed)?);
    c.epochs_done = state.epochs_done;
    Ok(c)
}

/// The run's calibration from `RUN/calibration.json`, fitted (and saved atomically) when missing
/// or older than the run's weights.
pub fn load_or_fit_calibration(run_dir: &Path, n_samples: usize, seed: u64) -> Result<Calibration> {
    let path = run_dir.join(CALIBRATION_FILE);
    let state = RunDir::new(run_dir).load_state()?;
    if let Ok(text) = std::fs::read_to_string(&path) {
        match serde_json::from_str::<Calibration>(&text) {
            Ok(c) if c.epochs_done == state.epochs_done && c.labels == state.scaler.names => {
                return Ok(c)
            }
            Ok(_) => tracing::info!("{}: stale, fitting again", path.display()),
            Err(e) => tracing::warn!("{}: unreadable ({e}), fitting again", path.display()),
        }
    }
    let c = fit_calibration(run_dir, n_samples, seed)?;
    let text = serde_json::to_string_pretty(&c)
        .map_err(|e| TrainError::config(&path, format!("cannot serialise: {e}")))?;
    write_text(&path, &text)?;
    Ok(c)
}

/// File name of a run's σ-scaling factors.
pub const CALIBRATION_FILE: &str = "calibration.json";

/// [`evaluate`] with the posteriors σ-scaled by `calibration` (when given): PITs, coverage, pulls,
/// quantiles and the NLL are those of the scaled posteriors.
pub fn evaluate_scaled(
    run_dir: &Path,
    split: &str,
    n_samples: usize,
    seed: u64,
    calibration: Option<&Calibration>,
) -> Result<Evaluation> {
    let start = Instant::now();
    let Opened {
        state,
        model,
        data,
        indices,
    } = open_split(run_dir, split)?;
    let indices = &indices;
    check_samples(run_dir, n_samples)?;
    let batcher = Batcher {
        dataset: &data.dataset,
        flux: data.flux,
        scaler: &state.scaler,
        device: model.device.clone(),
    };
    let d = state.scaler.mean.len();
    let mut stars = Vec::with_capacity(indices.len());
    let mut nll_sum = 0.0;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let scale = match calibration {
        Some(c) if c.scale.len() != d => {
            return Err(TrainError::config(
                run_dir,
                format!(
                    "the calibration has {} factors but the run predicts {d} labels",
                    c.scale.len()
                ),
            ));
        }
        Some(c) => Some(c.scale.as_slice()),
        None => None,
    };
    let log_scale_sum: f64 = scale.map_or(0.0, |sc| sc.iter().map(|v| v.ln()).sum());
    for batch in batcher.batches(indices, 128)? {
        let b = batch?;
        let params = model.params(&b.x, false)?;
        let yz: Vec<f64> = b.y.flatten_all()?.to_vec1()?;
        let summaries = summarize_batch(&model, &params, Some(&yz), n_samples, &mut rng, scale)?;
        // The scaled density at y is the unscaled density at m + (y - m) / s, divided by prod s.
        let y_seen = match scale {
            None => b.y.clone(),
            Some(sc) => {
                let v: Vec<f64> = yz
                    .iter()
                    .enumerate()
                    .map(|(k, &t)| {
                        let (i, j) = (k / d, k % d);
                        let m = summaries[i].0.mean[j];
                        m + (t - m) / sc[j]
                    })
                    .collect();
                Tensor::from_vec(v, b.y.dims(), b.y.device())?
            }
        };
        nll_sum += model
            .flow
            .log_prob(&params, &y_seen)?
            .neg()?
            .sum_all()?
            .to_scalar::<f64>()?
            + log_scale_sum * b.indices.len() as f64;
        for (k, (s, pit)) in summaries.into_iter().enumerate() {
            let (mean, std, quantiles) = to_physical(&s, &state.scaler.mean, &state.scaler.std);
            let i = b.indices[k];
            stars.push(StarPrediction {
                row: data.dataset.file_row(i),
                mean,
                std,
                quantiles,
                truth: Some(data.dataset.targets(i)),
                pit,
            });
        }
    }
    let n = stars.len() as f64;
    let nll_z = nll_sum / n;
    let log_scale: f64 = state.scaler.std.iter().map(|s| s.ln()).sum();
    let crlb = crlb_for(&state, &stars)?;
    let labels = (0..d)
        .map(|j| label_metrics(&state, &stars, j, crlb.as_ref().map(|c| c[j])))
        .collect();
    Ok(Evaluation {
        split: split.to_string(),
        n_stars: stars.len(),
        flow: state.config.model.flow.clone(),
        backbone: state.config.model.backbone.clone(),
        n_samples,
        nll_z,
        nll: nll_z + log_scale,
        labels,
        seconds: start.elapsed().as_secs_f64(),
        stars,
    })
}

/// Median CRLB per label over the evaluated stars, when the data directory has `crlb.npy`.
fn crlb_for(state: &RunState, stars: &[StarPrediction]) -> Result<Option<Vec<f64>>> {
    let path = state.config.data.dir.join("crlb.npy");
    if !path.exists() || state.config.data.targets != ["t_eff", "log_g", "fe_h"] {
        return Ok(None);
    }
    let arr = NpyArray::open(&path)?;
    let (rows, cols) = arr.shape2("crlb")?;
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
    let pull_std = (pulls.iter().map(|p| (p - pull_mean).powi(2)).sum::<f64>() / n).sqrt();
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
    LabelMetrics {
        name: state.scaler.names[j].clone(),
        rmse,
        mae: err.iter().map(|e| e.abs()).sum::<f64>() / n,
        bias: err.iter().sum::<f64>() / n,
        r2: 1.0 - ss_res / ss_tot,
        pull_mean,
        pull_std,
        coverage_68: cover(COVERAGE_LEVELS[0]),
        coverage_95: cover(COVERAGE_LEVELS[1]),
        marginal_nll_z: marginal_nll - sigma.ln(),
        marginal_nll,
        rmse_over_crlb: crlb.map(|c| rmse / c),
        median_crlb: crlb,
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
    check_samples(run_dir, n_samples)?;
    let opened = open_split(run_dir, split)?;
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
        dataset: &opened.data.dataset,
        flux: opened.data.flux,
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
                row: opened.data.dataset.file_row(i),
                truth: opened.data.dataset.targets(i),
                dim: d,
                samples: phys,
            });
        }
    }
    Ok(out)
}

/// Posterior summaries for new spectra (no labels), with the run's stored preprocessing.
pub fn predict(
    run_dir: &Path,
    spectra: &Path,
    n_samples: usize,
    seed: u64,
) -> Result<Vec<StarPrediction>> {
    predict_scaled(run_dir, spectra, n_samples, seed, None)
}

/// [`predict`] with the posteriors σ-scaled by `calibration` (when given).
pub fn predict_scaled(
    run_dir: &Path,
    spectra: &Path,
    n_samples: usize,
    seed: u64,
    calibration: Option<&Calibration>,
) -> Result<Vec<StarPrediction>> {
    let (state, model) = load_run(run_dir)?;
    let arr = NpyArray::open(spectra)?;
    let (rows, n_pix) = arr.shape2("spectra")?;
    if n_pix != state.n_pix {
        return Err(TrainError::Input {
            path: spectra.to_path_buf(),
            problem: format!(
                "spectra have {n_pix} pixels, but the run was trained on {} pixels",
                state.n_pix
            ),
            fix: "pass spectra on the same wavelength grid as the training data".into(),
        });
    }
    check_samples(run_dir, n_samples)?;
    let flux = FluxTransform::new(state.flux_floor)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(rows);
    let mut buf = vec![0f32; n_pix];
    for start in (0..rows).step_by(128) {
        let end = (start + 128).min(rows);
        let mut x = Vec::with_capacity((end - start) * n_pix);
        for r in start..end {
            arr.read_f32_into(r * n_pix, &mut buf);
            if let Some(k) = buf.iter().position(|v| !v.is_finite()) {
                return Err(TrainError::Input {
                    path: spectra.to_path_buf(),
                    problem: format!("row {r} has a non-finite value at pixel {k}"),
                    fix: "clean the spectra (NaN and inf cannot be predicted on)".into(),
                });
            }
            flux.apply(&mut buf);
            x.extend_from_slice(&buf);
        }
        let x = Tensor::from_vec(x, (end - start, 1, n_pix), &model.device)?;
        let params = model.params(&x, false)?;
        for (k, (s, _)) in summarize_batch(
            &model,
            &params,
            None,
            n_samples,
            &mut rng,
            calibration.map(|c| c.scale.as_slice()),
        )?
        .into_iter()
        .enumerate()
        {
            let (mean, std, quantiles) = to_physical(&s, &state.scaler.mean, &state.scaler.std);
            out.push(StarPrediction {
                row: start + k,
                mean,
                std,
                quantiles,
                truth: None,
                pit: None,
            });
        }
    }
    Ok(out)
}

/// Predictions as CSV: one row per star, `<label>_mean, _std, _q025, _q16, _q50, _q84, _q975`, and
/// the truth and PIT when known.
pub fn predictions_csv(names: &[String], stars: &[StarPrediction]) -> String {
    let mut s = String::from("row");
    for n in names {
        for suffix in ["mean", "std", "q025", "q16", "q50", "q84", "q975"] {
            s.push_str(&format!(",{n}_{suffix}"));
        }
    }
    let with_truth = stars.first().is_some_and(|p| p.truth.is_some());
    if with_truth {
        for n in names {
            s.push_str(&format!(",{n}_true,{n}_pit"));
        }
    }
    s.push('\n');
    for p in stars {
        s.push_str(&p.row.to_string());
        for j in 0..names.len() {
            s.push_str(&format!(",{},{}", p.mean[j], p.std[j]));
            for q in p.quantiles[j] {
                s.push_str(&format!(",{q}"));
            }
        }
        if let (Some(t), Some(u)) = (&p.truth, &p.pit) {
            for j in 0..names.len() {
                s.push_str(&format!(",{},{}", t[j], u[j]));
            }
        }
        s.push('\n');
    }
    s
}
