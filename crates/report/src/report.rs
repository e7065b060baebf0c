//! Evaluate runs, draw their figures and write the comparison: the one call behind
//! `starflow report`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::predictions::predictions_csv;
use starflow_data::npy::NpyArray;
use starflow_data::synth::{wavelength_grid, CAMERAS};
use starflow_inference::{
    cached_calibration, evaluate_on_each, fit_calibration, posterior_samples_on, source_rows,
    Calibration, EvalSource, Evaluation, Sampler,
};
use starflow_training::run::write_text;
use starflow_training::{calibration_set_dir, RunDir, RunState};

use crate::error::{ReportError, Result};
use crate::plots::{self, fmt_sig, LabelInfo};
use crate::stats::pick_showcase;
use crate::table::{self, RunRow};

/// How to report.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Split to evaluate on (`test` unless you are debugging).
    pub split: String,
    /// Evaluate on this labelled data set (spectra.npy, labels.npy) instead of the split: a large
    /// set drawn with a seed never used in training.
    pub data: Option<PathBuf>,
    /// Posterior samples per star for the metrics of non-Gaussian flows.
    pub n_samples: usize,
    /// Samples per corner plot.
    pub corner_samples: usize,
    /// Seed of every sampler (same seed, same report).
    pub seed: u64,
    /// Title of `REPORT.md`.
    pub title: String,
    /// Free text under the title (how the runs were made).
    pub intro: String,
}

impl ReportOptions {
    /// Where the evaluated stars come from.
    pub fn source(&self) -> EvalSource {
        match &self.data {
            Some(dir) => EvalSource::dir(dir),
            None => EvalSource::Split(self.split.clone()),
        }
    }

    /// How the evaluated stars are named in titles: `test` or the data directory.
    fn set_name(&self) -> String {
        match &self.data {
            Some(dir) => format!("held-out ({})", dir.display()),
            None => self.split.clone(),
        }
    }
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            split: "test".into(),
            data: None,
            n_samples: 1000,
            corner_samples: 20_000,
            seed: 0,
            title: "starflow report".into(),
            intro: String::new(),
        }
    }
}

/// What [`report_runs`] wrote.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub rows: Vec<RunRow>,
    pub markdown: PathBuf,
    pub metrics: PathBuf,
    pub history: PathBuf,
}

fn io(path: &Path, e: std::io::Error) -> ReportError {
    ReportError::Input(format!("{}: {e}", path.display()))
}

/// Evaluates every run on `opts.source()`, writes its figures into `out/<run name>/`, an example
/// spectrum, and the comparison (`REPORT.md`, `metrics.parquet`, `history.parquet`) into `out`.
/// `progress` receives one line per step.
pub fn report_runs(
    runs: &[PathBuf],
    out: &Path,
    opts: &ReportOptions,
    progress: &dyn Fn(&str),
) -> Result<RunReport> {
    if runs.is_empty() {
        return Err(ReportError::Input(
            "no runs to report on: pass --run DIR (repeatable)".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let mut rows = Vec::with_capacity(runs.len());
    let mut spectrum_drawn = false;
    for run in runs {
        let start = Instant::now();
        let name = run_name(run);
        let state = RunDir::new(run).load_state()?;
        if !state.finished {
            tracing::warn!(
                "{}: the run is not finished ({} epochs done); reporting its best weights so far",
                run.display(),
                state.epochs_done
            );
        }
        let source = opts.source();
        progress(&format!(
            "{name}: evaluating on the {} stars",
            opts.set_name()
        ));
        let calibration = default_calibration(run, &state, &name, opts, progress)?;
        // The model's own and the recalibrated posteriors, from one pass over the stars.
        let sampler = Sampler::new(opts.n_samples, opts.seed);
        let settings = [sampler.with(None), sampler.with(Some(calibration.clone()))];
        let [eval, scaled]: [Evaluation; 2] = evaluate_on_each(run, &source, &settings)?
            .try_into()
            .map_err(|_| ReportError::Input("expected two evaluations".into()))?;
        let dir = out.join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        progress(&format!("{name}: drawing figures"));
        let showcase = draw_run(run, &dir, &name, &state, &eval, &scaled, opts)?;
        if !spectrum_drawn {
            if let Some(&p) = showcase.get(1).or(showcase.first()) {
                draw_spectrum(run, &state, &source, p, &out.join("spectrum.png"))?;
                spectrum_drawn = true;
            }
        }
        let names: Vec<String> = state.scaler.names.clone();
        write_text(
            &dir.join("predictions.csv"),
            &predictions_csv(&names, &eval.stars),
        )?;
        rows.push(run_row(
            name,
            &state,
            [&eval, &scaled],
            &calibration,
            opts,
            start,
        ));
    }
    write_tables(out, opts, rows)
}

/// The recalibration users get by default: the one fitted when training ended, else fitted now
/// (and not saved: the report never writes into a run).
fn default_calibration(
    run: &Path,
    state: &RunState,
    name: &str,
    opts: &ReportOptions,
    progress: &dyn Fn(&str),
) -> Result<Calibration> {
    if let Some(c) = cached_calibration(run)? {
        return Ok(c);
    }
    let on = match calibration_set_dir(&state.config) {
        Some(dir) => format!(
            "on the {} stars of its calibration set {}",
            state.config.data.calibration_n,
            dir.display()
        ),
        None => "on its validation split".into(),
    };
    progress(&format!("{name}: fitting the recalibration {on}"));
    Ok(fit_calibration(
        run,
        Sampler::new(opts.n_samples, opts.seed),
    )?)
}

/// What the comparison says about one run: its state, its evaluation with the model's own
/// (`eval`) and the recalibrated (`scaled`) posteriors, and the recalibration.
fn run_row(
    name: String,
    state: &RunState,
    [eval, scaled]: [&Evaluation; 2],
    calibration: &Calibration,
    opts: &ReportOptions,
    start: Instant,
) -> RunRow {
    let train_seconds: f64 = state.history.iter().map(|r| r.seconds).sum();
    RunRow {
        name,
        backbone: eval.backbone.clone(),
        flow: eval.flow.clone(),
        epochs_done: state.epochs_done,
        best_epoch: state.best_epoch,
        stop_reason: state.stop_reason.clone(),
        n_train: state.n_train,
        n_test: eval.n_stars,
        test_nll_z: eval.nll_z,
        test_nll_se: eval.nll_se,
        test_nll: eval.nll,
        eval_set: opts.set_name(),
        joint_coverage: eval.joint_coverage.clone(),
        joint_coverage_se: eval.joint_coverage_se.clone(),
        joint_coverage_calibrated: scaled.joint_coverage.clone(),
        labels: eval.labels.clone(),
        sigma_scale: calibration.scale.clone(),
        sigma_shift: calibration.shift.clone(),
        calibration_stars: calibration.n_stars,
        calibration_set: calibration.fitted_on.clone(),
        calibrated: scaled.labels.clone(),
        test_nll_z_calibrated: scaled.nll_z,
        test_rows: eval.stars.iter().map(|s| s.row).collect(),
        test_star_nll_z: eval.star_nll_z.clone(),
        test_star_nll_z_calibrated: scaled.star_nll_z.clone(),
        seconds_per_epoch: train_seconds / state.history.len().max(1) as f64,
        train_seconds,
        report_seconds: start.elapsed().as_secs_f64(),
        n_samples: eval.n_samples,
        history: state.history.clone(),
        by_kind: eval.by_kind.clone(),
        by_kind_calibrated: scaled.by_kind.clone(),
        coverage_curve: eval.coverage_curve.clone(),
        coverage_curve_calibrated: scaled.coverage_curve.clone(),
    }
}

/// Writes the comparison of `rows` into `out`: `REPORT.md`, `metrics.parquet`,
/// `history.parquet` and `calibration_by_kind.parquet`.
fn write_tables(out: &Path, opts: &ReportOptions, rows: Vec<RunRow>) -> Result<RunReport> {
    let markdown = out.join("REPORT.md");
    write_text(&markdown, &table::markdown(&opts.title, &opts.intro, &rows))?;
    let metrics = out.join("metrics.parquet");
    table::write_parquet(&metrics, &mut table::metrics_frame(&rows)?)?;
    let history = out.join("history.parquet");
    table::write_parquet(&history, &mut table::history_frame(&rows)?)?;
    table::write_parquet(
        &out.join("calibration_by_kind.parquet"),
        &mut crate::kinds::frame(&rows)?,
    )?;
    Ok(RunReport {
        rows,
        markdown,
        metrics,
        history,
    })
}

/// The run directory's last component (`runs/quick/cnn-full_flow` → `cnn-full_flow`).
fn run_name(run: &Path) -> String {
    run.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into())
}

/// Draws one run's figures; returns the showcase positions (within the split) of its corner plots.
fn draw_run(
    run: &Path,
    dir: &Path,
    name: &str,
    state: &RunState,
    eval: &Evaluation,
    scaled: &Evaluation,
    opts: &ReportOptions,
) -> Result<Vec<usize>> {
    let labels: Vec<LabelInfo> = state
        .scaler
        .names
        .iter()
        .map(|n| LabelInfo::of(n))
        .collect();
    let d = labels.len();
    let what = format!("{} + {}", eval.backbone, eval.flow);
    plots::loss_curve(
        &dir.join("loss.png"),
        &state.history,
        // state.best_epoch counts from 1 (0: no epoch yet); history records count from 0.
        state
            .history
            .iter()
            .find(|r| r.epoch + 1 == state.best_epoch)
            .map(|r| r.epoch),
        &format!("{name}: training and validation loss ({what})"),
    )?;
    let truth: Vec<Vec<f64>> = (0..d)
        .map(|j| {
            eval.stars
                .iter()
                .map(|s| s.truth.as_ref().map_or(f64::NAN, |t| t[j]))
                .collect()
        })
        .collect();
    let mean: Vec<Vec<f64>> = (0..d)
        .map(|j| eval.stars.iter().map(|s| s.mean[j]).collect())
        .collect();
    let pulls: Vec<Vec<f64>> = (0..d)
        .map(|j| {
            eval.stars
                .iter()
                .zip(&truth[j])
                .map(|(s, t)| (s.mean[j] - t) / s.std[j])
                .collect()
        })
        .collect();
    let pits_of = |e: &Evaluation| -> Vec<Vec<f64>> {
        (0..d)
            .map(|j| {
                e.stars
                    .iter()
                    .filter_map(|s| s.pit.as_ref().map(|u| u[j]))
                    .collect()
            })
            .collect()
    };
    let (pits, pits_scaled) = (pits_of(eval), pits_of(scaled));
    let scaled_pull_std: Vec<f64> = scaled.labels.iter().map(|l| l.pull_std).collect();
    let n = eval.n_stars;
    let set = opts.set_name();
    plots::pulls(
        &dir.join("pulls.png"),
        &labels,
        &pulls,
        Some(&scaled_pull_std),
        &format!("{name}: pulls on {n} {set} stars"),
    )?;
    plots::predicted_vs_true(
        &dir.join("predicted_vs_true.png"),
        &labels,
        &truth,
        &mean,
        &format!("{name}: posterior mean vs truth, {n} {set} stars"),
    )?;
    plots::calibration(
        &dir.join("calibration.png"),
        &labels,
        &pits,
        Some(&pits_scaled),
        &format!("{name}: calibration on {n} {set} stars"),
    )?;
    if !scaled.by_snr.is_empty() {
        plots::coverage_vs_snr(
            &dir.join("coverage_vs_snr.png"),
            &labels,
            &eval.by_snr,
            &scaled.by_snr,
            &format!("{name}: coverage against SNR, {n} {set} stars"),
        )?;
    }
    let hpd_of = |e: &Evaluation| -> Vec<f64> { e.stars.iter().filter_map(|s| s.hpd).collect() };
    plots::joint_calibration(
        &dir.join("joint_calibration.png"),
        &hpd_of(eval),
        Some(&hpd_of(scaled)),
        &format!("{name}: joint calibration, {n} {set} stars"),
    )?;
    draw_corners(run, dir, name, &labels, eval, opts)
}

/// Draws the corner plots of a few showcase stars of `eval` (see [`pick_showcase`]); returns
/// their positions among the evaluated stars.
fn draw_corners(
    run: &Path,
    dir: &Path,
    name: &str,
    labels: &[LabelInfo],
    eval: &Evaluation,
    opts: &ReportOptions,
) -> Result<Vec<usize>> {
    let truths: Vec<Vec<f64>> = eval
        .stars
        .iter()
        .map(|s| s.truth.clone().unwrap_or_default())
        .collect();
    let showcase = pick_showcase(&truths);
    let samples = posterior_samples_on(
        run,
        &opts.source(),
        &showcase,
        Sampler::new(opts.corner_samples, opts.seed),
    )?;
    for star in &samples {
        let t: Vec<String> = labels
            .iter()
            .zip(&star.truth)
            .map(|(l, v)| format!("{} {}", l.title, fmt_sig(*v)))
            .collect();
        plots::corner(
            &dir.join(format!("posterior-row{}.png", star.row)),
            labels,
            star,
            &format!("{name}: posterior of star {} ({})", star.row, t.join(", ")),
        )?;
    }
    Ok(showcase)
}

/// Plots the spectrum of the star at `position` among the evaluated stars, camera by camera.
fn draw_spectrum(
    run: &Path,
    state: &RunState,
    source: &EvalSource,
    position: usize,
    path: &Path,
) -> Result<()> {
    let rows = source_rows(run, state, source)?;
    let Some(&i) = rows.indices.get(position) else {
        return Ok(());
    };
    let data = &rows;
    let n_pix = data.dataset.n_pix();
    let mut flux = vec![0f32; n_pix];
    data.dataset.flux_into(i, &mut flux);
    let stored = rows.data_dir.join("wavelength.npy");
    let wavelength = match NpyArray::open(&stored) {
        Ok(a) if a.shape().iter().product::<usize>() == n_pix => a.to_f64_vec(),
        _ if n_pix % 4 == 0 && n_pix >= 8 => wavelength_grid(n_pix / 4),
        _ => (0..n_pix).map(|k| k as f64).collect(),
    };
    let per = n_pix / 4;
    let cameras: Vec<(&str, usize, usize)> = if n_pix % 4 == 0 && n_pix >= 8 {
        CAMERAS
            .iter()
            .enumerate()
            .map(|(k, c)| (c.0, k * per, (k + 1) * per))
            .collect()
    } else {
        vec![("all", 0, n_pix)]
    };
    let labels: Vec<String> = state
        .scaler
        .names
        .iter()
        .zip(data.dataset.targets(i))
        .map(|(n, v)| format!("{} {}", LabelInfo::of(n).title, fmt_sig(v)))
        .collect();
    plots::spectrum(
        path,
        &wavelength,
        &flux,
        &cameras,
        &format!(
            "Spectrum of star {} ({}): {}",
            data.dataset.file_row(i),
            data.dataset.paths().0.display(),
            labels.join(", ")
        ),
    )
}
