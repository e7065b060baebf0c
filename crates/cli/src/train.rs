//! `starflow train`, `evaluate` and `predict`: argument parsing, progress bars and printing around
//! the training crate.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use starflow_report::predictions::{predictions_csv, PredictionWriter};

use crate::inspect::UserError;
use starflow_inference::{Calibration, EvalSource, Evaluation, Sampler};
use starflow_training::run::write_text;
use starflow_training::{EpochRecord, Observer, TrainOptions, TrainRequest};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// TOML configuration (see configs/reference.toml); defaults apply to missing keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override the flow: diagonal_gaussian, full_gaussian or full_flow.
    #[arg(long)]
    pub flow: Option<String>,
    /// Override the backbone: cnn or tiny_cnn.
    #[arg(long)]
    pub backbone: Option<String>,
    /// Override the number of epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Override any key: --set optim.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Run directory (default runs/<backbone>-<flow>). A new run needs a new or empty directory
    /// (or one whose run never finished its first epoch); any other is refused, not overwritten.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue an interrupted run in --out (its stored config is used; --epochs may extend it).
    /// Refused where --out holds no run, and when another given setting differs from the run's
    /// own (it could not apply); a run stopped in its first epoch starts again from its config.
    #[arg(long)]
    pub resume: bool,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// Run directory written by `starflow train`.
    #[arg(long)]
    pub run: PathBuf,
    /// Split of the run's own data to evaluate: train, val or test.
    #[arg(long, default_value = "test", conflicts_with_all = ["data", "spectra"])]
    pub split: String,
    /// Evaluate on another labelled data set instead: a directory holding spectra.npy and
    /// labels.npy (and crlb.npy / crlb_marginal.npy for the Cramér–Rao ratios), e.g. a synthetic
    /// set drawn with a seed never used in training.
    #[arg(long, conflicts_with_all = ["spectra", "labels"])]
    pub data: Option<PathBuf>,
    /// Spectra file of another labelled data set (with --labels).
    #[arg(long, requires = "labels")]
    pub spectra: Option<PathBuf>,
    /// Labels file of another labelled data set (with --spectra); columns as in the run's config.
    #[arg(long, requires = "spectra")]
    pub labels: Option<PathBuf>,
    /// Evaluate the deep ensemble of --run and these runs (repeatable): the equal-weight mixture
    /// of their posteriors, e.g. the same recipe trained with other `run.seed`s, recalibrated as a
    /// whole (quantile maps fitted on --run's calibration set, or its validation split when its
    /// config draws none, and kept in RUN/ensemble-calibration.json for the next evaluation of
    /// the same ensemble; --raw for the mixture as it is).
    #[arg(long = "member", value_name = "RUN")]
    pub members: Vec<PathBuf>,
    /// Output directory (default RUN/eval-<split>, or for --data/--spectra RUN/eval-data-<NAME>,
    /// NAME the data's directory (or the spectra file's stem when it is not spectra.npy); `-raw`
    /// is appended with --raw, `-ensemble` with --member, `-ensemble-raw` with both). An
    /// evaluation of the same stars there is replaced; one of other stars is kept (exit 2)
    /// unless --force.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an evaluation of other stars in the output directory.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub posterior: PosteriorArgs,
}

/// How posteriors are summarised, shared by `evaluate` and `predict`.
#[derive(Args, Debug)]
pub struct PosteriorArgs {
    /// Posterior samples per star (non-Gaussian flows; Gaussian flows are exact), 10 to 100,000.
    #[arg(long, default_value_t = 1000)]
    pub samples: usize,
    /// Seed of the posterior sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The model's own posteriors, without the recalibration that is applied by default (a
    /// monotone map per label fitted when training ends on the validation split, or on the
    /// config's synthetic calibration set (data.calibration_n), kept in RUN/calibration.json).
    #[arg(long)]
    pub raw: bool,
    /// Recalibrate (the default; kept so that older scripts still run).
    #[arg(long, hide = true, conflicts_with = "raw")]
    pub calibrate: bool,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Run directory written by `starflow train`.
    #[arg(long)]
    pub run: PathBuf,
    /// Spectra to predict (.npy, same pixel grid as the training data). Memory-mapped and read in
    /// batches, so any number of stars fits in memory. Every row asked for is checked for NaN and
    /// inf before any prediction (the first five bad rows are named; predict around them with
    /// --rows).
    #[arg(long)]
    pub spectra: PathBuf,
    /// Output table: *.csv or *.parquet (default: predictions.csv next to the spectra, or
    /// predictions-START-END.csv with --rows). Written as the stars are predicted, and moved into
    /// place only when complete; its directory must exist and be writable (checked first). Ctrl-C
    /// or SIGTERM stops between batches, removes the partial file and exits with code 130.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace the table at --out if there is one. Without it, an existing table is refused
    /// (exit 2) before any work: a survey's table can take an hour, and the next command with a
    /// forgotten --out or another --rows would otherwise replace it without a word.
    #[arg(long)]
    pub force: bool,
    /// Predict only rows START..END of the file (0-based, END exclusive; `START:` runs to the end):
    /// one shard of a survey. Every star draws its posterior samples from its own stream (the seed
    /// and its row), so shards concatenate to exactly the single-process table.
    #[arg(long, value_name = "START:END", value_parser = parse_rows)]
    pub rows: Option<RowRange>,
    /// Predict with the deep ensemble of --run and these runs (repeatable): each star's posterior
    /// is the equal-weight mixture of theirs (e.g. the same recipe trained with other
    /// `run.seed`s; they must share labels, pixel grid and training data), recalibrated as a
    /// whole as `evaluate --member` does (--raw for the mixture as it is). Each member draws
    /// --samples / K samples per star from the star's own stream, so shards still concatenate.
    #[arg(long = "member", value_name = "RUN")]
    pub members: Vec<PathBuf>,
    #[command(flatten)]
    pub posterior: PosteriorArgs,
}

/// `--rows START:END`, END open when omitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowRange {
    pub start: usize,
    pub end: Option<usize>,
}

fn parse_rows(s: &str) -> Result<RowRange, String> {
    let bad = || {
        format!(
            "`{s}` is not START:END (0-based row numbers, END exclusive, e.g. 0:100000 or 500000:)"
        )
    };
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let start = a.trim().parse().map_err(|_| bad())?;
    let end = match b.trim() {
        "" => None,
        e => Some(e.parse().map_err(|_| bad())?),
    };
    if end.is_some_and(|e| e <= start) {
        return Err(format!("`{s}`: END must be greater than START"));
    }
    Ok(RowRange { start, end })
}

impl PosteriorArgs {
    /// `--samples` and `--seed`.
    fn sampler(&self) -> Sampler {
        Sampler::new(self.samples, self.seed)
    }

    /// The run's recalibration unless `--raw` was given: `saved()` (the run's own, when current;
    /// read only when wanted) when there is one, else fitted and saved now.
    fn calibration(
        &self,
        run: &Path,
        saved: impl FnOnce() -> Option<Calibration>,
    ) -> anyhow::Result<Option<Calibration>> {
        if self.raw {
            return Ok(None);
        }
        let c = match saved() {
            Some(c) => c,
            None => fit_calibration(run, self.sampler())?,
        };
        announce(&c);
        Ok(Some(c))
    }

    /// The recalibration of the ensemble of `runs` (fitted on the mixture, kept in the first run)
    /// unless `--raw` was given; says on stderr what the ensemble's posteriors are.
    fn ensemble_calibration(&self, runs: &[PathBuf]) -> anyhow::Result<Option<Calibration>> {
        if self.raw {
            eprintln!(
                "ensemble of {} runs: the equal-weight mixture of their own posteriors",
                runs.len()
            );
            return Ok(None);
        }
        let c = starflow_inference::load_or_fit_ensemble_calibration(runs, self.sampler())
            .map_err(|e| {
                if !e.is_about_data() {
                    return anyhow::Error::from(e);
                }
                anyhow::Error::from(e).context(
                    "fitting the ensemble's recalibration on the first run's calibration set \
                     (its validation split when its config draws none); pass --raw for the \
                     mixture as it is",
                )
            })?;
        eprintln!(
            "ensemble of {} runs: the equal-weight mixture of their posteriors, recalibrated as a \
             whole ({} fitted on {} {} stars: {})",
            runs.len(),
            describe_parts(&c),
            c.n_stars,
            c.fitted_on,
            describe_maps(&c)
        );
        Ok(Some(c))
    }
}

/// The run's recalibration from `RUN/calibration.json`, fitted there first when missing or stale.
fn fit_calibration(run: &Path, sampler: Sampler) -> anyhow::Result<Calibration> {
    starflow_inference::load_or_fit_calibration(run, sampler).map_err(|e| {
        // Only the run's data can be worked around with --raw: a run that is not there or is
        // damaged needs its own fix and no word about its recalibration.
        if !e.is_about_data() {
            return anyhow::Error::from(e);
        }
        anyhow::Error::from(e).context(starflow_inference::calibration_unavailable(run, "--raw"))
    })
}

/// Announces a run's recalibration on stderr: each map's shift and scale and what was fitted, or
/// why the model's own posteriors are used.
fn announce(c: &Calibration) {
    if c.too_few_stars {
        eprintln!(
            "not recalibrated: the {} set has {} stars and maps need at least {}; the model's own posteriors are used (as with --raw)",
            c.fitted_on,
            c.n_stars,
            starflow_inference::MIN_CALIBRATION_STARS
        );
        return;
    }
    eprintln!(
        "recalibration ({}) fitted on {} {} stars: {}",
        describe_parts(c),
        c.n_stars,
        c.fitted_on,
        describe_maps(c)
    );
}

/// What a recalibration is made of: its maps, the per-star widening and the maps per kind of star
/// it has, or that the held-out check declined them.
fn describe_parts(c: &Calibration) -> String {
    let kinds = match &c.kinds {
        Some(k) => format!(
            ", one map per label for each of {} kinds of star (k-means on the noise level and the means)",
            k.centres.len()
        ),
        None if c.kinds_declined => {
            ", maps per kind of star tried and declined (held-out NLL higher beyond its noise)".to_string()
        }
        None => String::new(),
    };
    let maps = match (c.maps.is_empty(), &c.width) {
        (true, _) => "one shift and scale per label".to_string(),
        (false, None) if c.width_declined => "quantile maps; a per-star widening was tried and \
            declined, as it raised the NLL of held-out calibration stars beyond their noise"
            .to_string(),
        (false, None) => "quantile maps".to_string(),
        (false, Some(w)) => format!(
            "quantile maps after a per-star widening{} by {}",
            match (c.shifts(), c.shift_declined) {
                (true, _) => " and shift",
                (false, true) => " (its shift tried and declined)",
                (false, false) => "",
            },
            w.covariates
                .iter()
                .map(|v| match v.name.as_str() {
                    starflow_inference::NOISE_COVARIATE => "noise level".to_string(),
                    label => format!("{label} mean"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!("{maps}{kinds}")
}

/// Each label's map as its shift and scale, for stderr.
fn describe_maps(c: &Calibration) -> String {
    c.labels
        .iter()
        .enumerate()
        .map(|(j, l)| {
            format!(
                "{l} shift {:+.3} sd, scale x{:.3}",
                c.shift.get(j).copied().unwrap_or(0.0),
                c.scale[j]
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Progress bars for the training loop.
struct Bars {
    bar: std::cell::RefCell<Option<ProgressBar>>,
}

impl Observer for Bars {
    fn message(&self, text: &str) {
        eprintln!("{text}");
    }
    fn epoch_start(&self, epoch: usize, n_epochs: usize, n_steps: usize) {
        let bar = ProgressBar::new(n_steps as u64).with_style(
            ProgressStyle::with_template(
                "epoch {prefix} {bar:30} {pos}/{len} [{elapsed} < {eta}] nll {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, n_epochs));
        *self.bar.borrow_mut() = Some(bar);
    }
    fn step(&self, step: usize, running_nll: f64) {
        if let Some(b) = &*self.bar.borrow() {
            b.set_position(step as u64 + 1);
            b.set_message(format!("{running_nll:.4}"));
        }
    }
    fn epoch_end(&self, r: &EpochRecord) {
        if let Some(b) = self.bar.borrow_mut().take() {
            b.finish_and_clear();
        }
        eprintln!(
            "epoch {:>3}: train nll {:.4}  val nll {:.4}  lr {:.2e}  {:.1} s{}",
            r.epoch + 1,
            r.train_nll,
            r.val_nll,
            r.lr,
            r.seconds,
            if r.steps_skipped > 0 {
                format!("  ({} steps skipped)", r.steps_skipped)
            } else {
                String::new()
            }
        );
    }
}

pub fn train(a: &TrainArgs) -> anyhow::Result<()> {
    let mut overrides = a.set.clone();
    if let Some(f) = &a.flow {
        overrides.push(format!("model.flow=\"{f}\""));
    }
    if let Some(b) = &a.backbone {
        overrides.push(format!("model.backbone=\"{b}\""));
    }
    if let Some(e) = a.epochs {
        overrides.push(format!("optim.epochs={e}"));
    }
    let request = TrainRequest {
        config: a.config.clone(),
        overrides,
        out: a.out.clone(),
        resume: a.resume,
    };
    let (cfg, out) = request.resolve()?;
    let observer = Bars {
        bar: std::cell::RefCell::new(None),
    };
    let opts = TrainOptions {
        out: out.clone(),
        resume: a.resume,
        inject_nan_steps: inject_nan_steps()?,
        // Test hook of the fault tests (crates/cli/tests/faults.rs); see PauseAt.
        pause_at: match std::env::var("STARFLOW_PAUSE_AT") {
            Ok(v) => Some(
                v.parse()
                    .map_err(|e: String| anyhow::anyhow!("STARFLOW_PAUSE_AT: {e}"))?,
            ),
            Err(_) => None,
        },
    };
    let trained = starflow_inference::train_and_calibrate(&cfg, &opts, &observer, |state| {
        println!(
            "run {}: {} epochs, best validation NLL {:.4} (epoch {}); {}",
            out.display(),
            state.epochs_done,
            state.best_val_nll,
            state.best_epoch,
            state.stop_reason.as_deref().unwrap_or("stopped")
        );
    })?;
    if let Some(c) = &trained.calibration {
        announce(c);
    }
    Ok(())
}

fn print_evaluation(e: &Evaluation) {
    println!(
        "{} / {} on {} ({} stars): NLL {:.4} ± {:.4} (z-units), {:.4} (physical units)",
        e.backbone, e.flow, e.split, e.n_stars, e.nll_z, e.nll_se, e.nll
    );
    println!(
        "  {:<7} {:>16} {:>10} {:>7} {:>15} {:>15} {:>13} {:>13} {:>9} {:>9}",
        "label",
        "RMSE",
        "bias",
        "R2",
        "pull mean",
        "pull std",
        "cov68 %",
        "cov95 %",
        "RMSE/CRLB",
        "(marg.)"
    );
    let ratio = |r: Option<f64>| r.map_or_else(|| "-".into(), |r| format!("{r:.1}"));
    for l in &e.labels {
        println!(
            "  {:<7} {:>16} {:>10.4} {:>7.3} {:>15} {:>15} {:>13} {:>13} {:>9} {:>9}",
            l.name,
            format!("{:.4} ± {:.4}", l.rmse, l.se.rmse),
            l.bias,
            l.r2,
            format!("{:+.3} ± {:.3}", l.pull_mean, l.se.pull_mean),
            format!("{:.3} ± {:.3}", l.pull_std, l.se.pull_std),
            format!(
                "{:.1} ± {:.1}",
                100.0 * l.coverage_68,
                100.0 * l.se.coverage_68
            ),
            format!(
                "{:.1} ± {:.1}",
                100.0 * l.coverage_95,
                100.0 * l.se.coverage_95
            ),
            ratio(l.rmse_over_crlb),
            ratio(l.rmse_over_crlb_marginal),
        );
    }
    if let [c68, c95] = e.joint_coverage[..] {
        println!(
            "  joint (3-D HPD regions): 68.3 % covers {:.1} ± {:.1} %, 95.4 % covers {:.1} ± {:.1} %",
            100.0 * c68,
            100.0 * e.joint_coverage_se[0],
            100.0 * c95,
            100.0 * e.joint_coverage_se[1]
        );
    }
    print_by_kind(e);
}

/// Calibration per kind of star and the expected-coverage summary (issue 29).
fn print_by_kind(e: &Evaluation) {
    let c = &e.coverage_curve;
    if !c.mace.is_empty() {
        let labels: Vec<String> = e
            .labels
            .iter()
            .zip(&c.mace)
            .map(|(l, m)| format!("{} {:.1}", l.name, 100.0 * m))
            .collect();
        let joint = c
            .joint_mace
            .map_or(String::new(), |m| format!(", joint {:.1}", 100.0 * m));
        println!(
            "  mean absolute coverage error over nominal 5 … 95 % (points): {}{joint}",
            labels.join(", ")
        );
    }
    if e.by_kind.is_empty() {
        return;
    }
    println!("  by kind of star: 68.3 % / 95.4 % coverage (%) and pull std, each ± se");
    for k in &e.by_kind {
        let cells: Vec<String> = k
            .labels
            .iter()
            .map(|l| {
                format!(
                    "{} {:.1}±{:.1} / {:.1}±{:.1}, {:.2}±{:.2}",
                    l.name,
                    100.0 * l.coverage_68,
                    100.0 * l.coverage_68_se,
                    100.0 * l.coverage_95,
                    100.0 * l.coverage_95_se,
                    l.pull_std,
                    l.pull_std_se
                )
            })
            .collect();
        println!("    {:<28} {:>6}  {}", k.kind, k.n_stars, cells.join("; "));
    }
}

/// The fault tests' `STARFLOW_INJECT_NAN_STEPS` (comma-separated global step numbers whose loss is
/// made NaN). An entry that is not a step number is an error: a hook that silently skipped it would
/// let a fault test pass without injecting its fault.
fn inject_nan_steps() -> anyhow::Result<Vec<u64>> {
    let Ok(text) = std::env::var("STARFLOW_INJECT_NAN_STEPS") else {
        return Ok(Vec::new());
    };
    text.split(',')
        .map(|v| {
            v.trim().parse().map_err(|_| {
                UserError(format!(
                    "STARFLOW_INJECT_NAN_STEPS={text}: `{}` is not a step number; fix: give comma-separated non-negative integers (e.g. 5,6) or unset it",
                    v.trim()
                ))
                .into()
            })
        })
        .collect()
}

pub fn evaluate(a: &EvaluateArgs) -> anyhow::Result<()> {
    let source = match (&a.data, &a.spectra, &a.labels) {
        (Some(dir), _, _) => EvalSource::dir(dir),
        (None, Some(spectra), Some(labels)) => EvalSource::Files {
            spectra: spectra.clone(),
            labels: labels.clone(),
        },
        _ => EvalSource::Split(a.split.clone()),
    };
    source.check_quickly(&a.run)?;
    let suffix = match (a.members.is_empty(), a.posterior.raw) {
        (true, false) => "",
        (true, true) => "-raw",
        (false, false) => "-ensemble",
        (false, true) => "-ensemble-raw",
    };
    let dir = a
        .out
        .clone()
        .unwrap_or_else(|| a.run.join(format!("eval-{}{suffix}", source.folder_name())));
    refuse_other_evaluation(&dir, &source, a.force)?;
    let e = if a.members.is_empty() {
        let cal = a.posterior.calibration(&a.run, || None)?;
        starflow_inference::evaluate_on(&a.run, &source, &a.posterior.sampler().with(cal))?
    } else {
        let runs: Vec<PathBuf> = std::iter::once(a.run.clone())
            .chain(a.members.iter().cloned())
            .collect();
        let cal = a.posterior.ensemble_calibration(&runs)?;
        starflow_inference::evaluate_ensemble(&runs, &source, &a.posterior.sampler().with(cal))?
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let names: Vec<String> = e.labels.iter().map(|l| l.name.clone()).collect();
    write_text(
        &dir.join("predictions.csv"),
        &predictions_csv(&names, &e.stars),
    )?;
    write_text(
        &dir.join("metrics.json"),
        &serde_json::to_string_pretty(&e)?,
    )?;
    print_evaluation(&e);
    println!(
        "wrote {}/predictions.csv and metrics.json ({:.1} s)",
        dir.display(),
        e.seconds
    );
    Ok(())
}

pub fn predict(a: &PredictArgs) -> anyhow::Result<()> {
    // Everything about the input and output is checked before the recalibration, which a run
    // without a saved one fits first (minutes).
    let rows = a.rows.map(|r| (r.start, r.end));
    let settings = a.posterior.sampler().with(None);
    let runs: Vec<PathBuf> = std::iter::once(a.run.clone())
        .chain(a.members.iter().cloned())
        .collect();
    let mut predictor = if a.members.is_empty() {
        starflow_inference::Predictor::open(&a.run, &a.spectra, rows, settings)?
    } else {
        starflow_inference::Predictor::open_ensemble(&runs, &a.spectra, rows, settings)?
    };
    let range = predictor.rows();
    let out = a.out.clone().unwrap_or_else(|| {
        let name = match a.rows {
            Some(_) => format!("predictions-{}-{}.csv", range.start, range.end),
            None => "predictions.csv".into(),
        };
        a.spectra.parent().unwrap_or(Path::new(".")).join(name)
    });
    check_output_file(&out)?;
    refuse_to_replace(&out, a.force)?;
    predictor.check_finite()?;
    let calibration = if a.members.is_empty() {
        a.posterior
            .calibration(&a.run, || predictor.saved_calibration())?
    } else {
        a.posterior.ensemble_calibration(&runs)?
    };
    predictor.set_calibration(calibration);
    let stop = interrupt_flag();
    let mut table = PredictionWriter::create(&out, predictor.label_names(), false)?;
    let bar = ProgressBar::new(range.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} stars  {per_sec}  eta {eta}")
            .expect("static template"),
    );
    let started = std::time::Instant::now();
    for batch in predictor.batches() {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            bar.finish_and_clear();
            // Dropping the table removes its temporary file; any previous table stays as it was.
            drop(table);
            eprintln!(
                "interrupted: nothing written to {} (its temporary file was removed)",
                out.display()
            );
            std::process::exit(130);
        }
        let stars = predictor.predict_batch(batch.clone())?;
        table.write(&stars)?;
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    let n = table.rows();
    let path = table.finish()?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "wrote {n} predictions (rows {}..{}) to {} in {seconds:.1} s ({:.0} stars/s)",
        range.start,
        range.end,
        path.display(),
        n as f64 / seconds.max(1e-9)
    );
    Ok(())
}

/// Set by SIGINT or SIGTERM (unix): `predict` stops between batches and cleans up. Where the
/// handlers cannot be installed, the default (immediate exit) stays.
fn interrupt_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    #[cfg(unix)]
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, std::sync::Arc::clone(&flag)) {
            tracing::warn!("cannot catch signal {signal}: {e}");
        }
    }
    flag
}

/// An evaluation of other stars in `dir` is kept unless `force`: the error names what it was of,
/// what would replace it, and both ways on (exit 2). Checked before the evaluation (minutes).
fn refuse_other_evaluation(dir: &Path, source: &EvalSource, force: bool) -> Result<(), UserError> {
    match source.other_evaluation_in(dir) {
        Some(other) if !force => Err(UserError(format!(
            "{}: holds {other}; evaluating {} here would replace its predictions.csv and metrics.json; choose another --out, or pass --force to replace it",
            dir.display(),
            match source.data_files() {
                Some(f) => format!("{} and {}", f.spectra, f.labels),
                None => format!("the run's {} split", source.name()),
            }
        ))),
        _ => Ok(()),
    }
}

/// An existing table at `out` is kept unless `force`: the error names it, its size and age, and
/// both ways on (exit 2).
fn refuse_to_replace(out: &Path, force: bool) -> Result<(), UserError> {
    let Ok(meta) = std::fs::metadata(out) else {
        return Ok(());
    };
    if force {
        return Ok(());
    }
    let age = meta
        .modified()
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map(|d| match d.as_secs() {
            s if s < 120 => format!("{s} s"),
            s if s < 7200 => format!("{} min", s / 60),
            s => format!("{} h", s / 3600),
        })
        .unwrap_or_else(|| "unknown time".into());
    Err(UserError(format!(
        "{}: already exists ({} bytes, written {age} ago), and predict would replace it; choose another --out, or pass --force to replace it",
        out.display(),
        meta.len()
    )))
}

/// Checks that a table can be written at `out` before any work: not a directory, in a directory
/// that exists and that we may write in. Each failure names the path and the fix (exit 2).
pub fn check_output_file(out: &Path) -> Result<(), UserError> {
    if out.is_dir() {
        return Err(UserError(format!(
            "{}: is a directory; --out wants a file name, e.g. {}",
            out.display(),
            out.join("predictions.csv").display()
        )));
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(UserError(format!(
            "{}: the directory {} does not exist; create it (mkdir -p {}) or choose another --out",
            out.display(),
            dir.display(),
            dir.display()
        )));
    }
    let probe = dir.join(format!(".starflow-write-check.{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(UserError(format!(
            "{}: cannot write in {} ({e}); choose a directory you can write to with --out",
            out.display(),
            dir.display()
        ))),
    }
}
