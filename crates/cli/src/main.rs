//! The `starflow` command-line tool: a thin layer that parses arguments, calls one library
//! function per subcommand and prints the result. User errors exit with code 2 and a one-line
//! message that names the file, the problem and the fix; they never panic.

mod inspect;
mod report;
mod train;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use starflow_data::{DataError, LoadOptions, SynthConfig};

/// Predict t_eff, log_g and fe_h with calibrated uncertainties from stellar spectra.
#[derive(Parser, Debug)]
#[command(name = "starflow", version, about, propagate_version = true)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a GALAH-like synthetic data set (spectra.npy, labels.npy, wavelength.npy, crlb.npy,
    /// crlb_marginal.npy, synth.json).
    Synth(SynthArgs),
    /// Print shapes, dtypes, label statistics, non-finite counts and the SNR summary of a data set.
    Inspect(InspectArgs),
    /// Train a backbone + flow on a data set (resumable; writes a run directory).
    Train(train::TrainArgs),
    /// Evaluate a trained run on a split: per-star posteriors and per-label metrics.
    Evaluate(train::EvaluateArgs),
    /// Posterior summaries for new spectra with a trained run.
    Predict(train::PredictArgs),
    /// Figures (loss, pulls, calibration, corner plots, a spectrum) and a comparison table
    /// (REPORT.md, metrics.parquet) for one or more trained runs.
    Report(report::ReportArgs),
    /// The data files' row numbers (0-based) of a run's train, val or test split, one per line: for
    /// tools outside starflow that must use the same stars (a classical baseline, say).
    Rows(RowsArgs),
}

#[derive(Args, Debug)]
struct RowsArgs {
    /// Run directory written by `starflow train`.
    #[arg(long)]
    run: PathBuf,
    /// Which split: train, val or test.
    #[arg(long, default_value = "train")]
    split: String,
    /// Write the rows to this file (replacing it whole) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct SynthArgs {
    /// Number of stars.
    #[arg(long, default_value_t = 8914)]
    n: usize,
    /// Random seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Pixels per camera (4096 like GALAH; smaller only for quick experiments).
    #[arg(long, default_value_t = 4096)]
    pixels_per_camera: usize,
    /// Fraction of giants in the population.
    #[arg(long, default_value_t = 0.18)]
    giant_fraction: f64,
    /// Lowest per-pixel SNR.
    #[arg(long, default_value_t = 15.0)]
    snr_min: f64,
    /// Highest per-pixel SNR.
    #[arg(long, default_value_t = 250.0)]
    snr_max: f64,
    /// Replace data files already in --out. Without it, a directory holding spectra.npy,
    /// labels.npy or the other files synth writes is refused, unless they are the set these very
    /// settings write (so rerunning a command is harmless and real data are never overwritten).
    #[arg(long)]
    force: bool,
}

/// Where a data set comes from, shared by every command that reads one.
#[derive(Args, Debug)]
pub struct DataArgs {
    /// Directory holding spectra.npy and labels.npy.
    #[arg(long, conflicts_with_all = ["spectra", "labels", "h5"])]
    pub data: Option<PathBuf>,
    /// Spectra file (.npy, float32 or float64, shape (n_stars, n_pix)).
    #[arg(long, requires = "labels")]
    pub spectra: Option<PathBuf>,
    /// Labels file (.npy, shape (n_stars, n_columns)).
    #[arg(long, requires = "spectra")]
    pub labels: Option<PathBuf>,
    /// HDF5 file holding both arrays (needs the `hdf5` feature).
    #[arg(long)]
    pub h5: Option<PathBuf>,
    /// HDF5 dataset name of the spectra.
    #[arg(long, default_value = "spectra")]
    pub h5_spectra: String,
    /// HDF5 dataset name of the labels.
    #[arg(long, default_value = "labels")]
    pub h5_labels: String,
    /// One name per label column, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "mass,age,l_bol,dist,t_eff,log_g,fe_h,SNR"
    )]
    pub label_names: Vec<String>,
    /// The label columns to predict, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "t_eff,log_g,fe_h")]
    pub targets: Vec<String>,
    /// Skip rows with NaN or inf in the spectra or targets instead of failing.
    #[arg(long)]
    pub drop_nonfinite: bool,
}

impl DataArgs {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            label_names: self.label_names.clone(),
            targets: self.targets.clone(),
            drop_nonfinite: self.drop_nonfinite,
        }
    }
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub data: DataArgs,
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs redirected to a file or CI stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn synth(args: &SynthArgs) -> anyhow::Result<()> {
    let cfg = SynthConfig {
        n: args.n,
        seed: args.seed,
        pixels_per_camera: args.pixels_per_camera,
        giant_fraction: args.giant_fraction,
        snr_min: args.snr_min,
        snr_max: args.snr_max,
        ..SynthConfig::default()
    };
    cfg.validate()?;
    refuse_to_replace(&args.out, &cfg, args.force)?;
    let bar = ProgressBar::new(cfg.n as u64).with_style(
        ProgressStyle::with_template("synth {bar:40} {pos}/{len} stars [{elapsed} < {eta}]")
            .context("progress bar template")?,
    );
    let start = std::time::Instant::now();
    let data = starflow_data::generate(&cfg, &|k| bar.inc(k))?;
    bar.finish_and_clear();
    let gen_s = start.elapsed().as_secs_f64();
    data.write(&args.out)?;
    tracing::info!(seconds = gen_s, "generated");
    println!(
        "wrote {} stars x {} pixels to {} (generated in {:.1} s, written in {:.1} s)",
        cfg.n,
        data.n_pix,
        args.out.display(),
        gen_s,
        start.elapsed().as_secs_f64() - gen_s
    );
    Ok(())
}

/// Refuses, before generating, to replace data in `out` that are not the set `cfg` writes.
fn refuse_to_replace(out: &Path, cfg: &SynthConfig, force: bool) -> Result<(), inspect::UserError> {
    use starflow_data::synth::Occupied;
    match starflow_data::synth::occupied(out, cfg) {
        Occupied::Free | Occupied::SameSet => Ok(()),
        Occupied::Other { .. } if force => Ok(()),
        Occupied::Other { files, generated } => Err(inspect::UserError(format!(
            "{}: already holds {} ({}), which synth would replace; choose another --out, or pass --force to replace them",
            out.display(),
            files.join(", "),
            if generated {
                "a synthetic set made with other settings"
            } else {
                "not written by `starflow synth`: possibly real data"
            }
        ))),
    }
}

/// `starflow rows`: the split's file rows, checked against the run's data fingerprint.
fn rows(a: &RowsArgs) -> anyhow::Result<()> {
    let rows = starflow_inference::source::split_file_rows(&a.run, &a.split)?;
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    match &a.out {
        Some(path) => {
            starflow_data::atomic_file::write(path, text.as_bytes())?;
            eprintln!(
                "wrote the {} rows of {}'s {} split to {}",
                rows.len(),
                a.run.display(),
                a.split,
                path.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// True when the error comes from the user's input rather than from a bug.
fn is_user_error(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<DataError>()
            .is_some_and(DataError::is_user_error)
            || e.downcast_ref::<inspect::UserError>().is_some()
            || e.downcast_ref::<starflow_training::TrainError>()
                .is_some_and(starflow_training::TrainError::is_user_error)
            || e.downcast_ref::<starflow_report::ReportError>()
                .is_some_and(starflow_report::ReportError::is_user_error)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    if matches!(
        cli.command,
        Command::Train(_) | Command::Evaluate(_) | Command::Predict(_) | Command::Report(_)
    ) {
        // Keep large freed blocks in the heap: a training step would otherwise fault tens of
        // megabytes back in every time (see starflow_models::tune_allocator).
        starflow_models::tune_allocator();
    }
    let result = match &cli.command {
        Command::Synth(a) => synth(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Train(a) => train::train(a),
        Command::Evaluate(a) => train::evaluate(a),
        Command::Predict(a) => train::predict(a),
        Command::Report(a) => report::run(a),
        Command::Rows(a) => rows(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", starflow_data::error::error_line(e.as_ref()));
            if is_user_error(&e) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
