//! `starflow report`: figures and a comparison table for one or more finished runs.

use std::path::PathBuf;

use clap::Args;
use starflow_report::{report_runs, ReportOptions};

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run directory written by `starflow train` (repeat for a comparison).
    #[arg(long = "run", required = true, value_name = "DIR")]
    pub runs: Vec<PathBuf>,
    /// Output directory for REPORT.md, metrics.parquet, history.parquet and the figures
    /// (default: <run>/report for one run, report/ for several).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Split to evaluate: train, val or test.
    #[arg(long, default_value = "test", conflicts_with = "data")]
    pub split: String,
    /// Evaluate on this labelled data set instead (a directory with spectra.npy and labels.npy,
    /// e.g. `starflow synth` with a seed never used in training).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Posterior samples per star for the metrics of non-Gaussian flows.
    #[arg(long, default_value_t = 1000)]
    pub samples: usize,
    /// Posterior samples per corner plot.
    #[arg(long, default_value_t = 20_000)]
    pub corner_samples: usize,
    /// Seed of the posterior samplers.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Title of REPORT.md.
    #[arg(long, default_value = "starflow report")]
    pub title: String,
    /// Markdown file whose text goes under the title (how the runs were made).
    #[arg(long, value_name = "FILE")]
    pub intro: Option<PathBuf>,
}

pub fn run(a: &ReportArgs) -> anyhow::Result<()> {
    let out = a.out.clone().unwrap_or_else(|| match a.runs.as_slice() {
        [one] => one.join("report"),
        _ => PathBuf::from("report"),
    });
    let intro = match &a.intro {
        Some(p) => std::fs::read_to_string(p).map_err(|e| {
            starflow_report::ReportError::Input(format!(
                "{}: cannot read the --intro file ({e}); pass an existing Markdown file",
                p.display()
            ))
        })?,
        None => String::new(),
    };
    let opts = ReportOptions {
        split: a.split.clone(),
        data: a.data.clone(),
        n_samples: a.samples,
        corner_samples: a.corner_samples,
        seed: a.seed,
        title: a.title.clone(),
        intro,
    };
    let report = report_runs(&a.runs, &out, &opts, &|line| eprintln!("{line}"))?;
    for r in &report.rows {
        println!(
            "{}: test NLL {:.3} (z), {}",
            r.name,
            r.test_nll_z,
            r.labels
                .iter()
                .map(|l| format!(
                    "{} rmse {:.4} pull std {:.2} cov68 {:.0} %",
                    l.name,
                    l.rmse,
                    l.pull_std,
                    100.0 * l.coverage_68
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "wrote {}, {} and {}",
        report.markdown.display(),
        report.metrics.display(),
        report.history.display()
    );
    Ok(())
}
