//! Reports on finished runs: what a physicist looks at after training.
//!
//! * [`stats`] — pure numerics on evaluation results (histograms, coverage curves, pulls), tested
//!   without any plotting.
//! * [`plots`] — PNG figures (loss curves, pulls, predicted vs true, calibration, corner plots of
//!   posteriors, an example spectrum), rendered with plotters into memory and written atomically,
//!   with an embedded DejaVu Sans so text renders on machines without system fonts.
//! * [`table`] — the comparison of several runs: `REPORT.md` (Markdown tables with the quality
//!   targets checked) and `metrics.parquet`/`history.parquet` (every number, via polars).
//! * [`predictions`] — prediction tables (CSV or Parquet) written batch by batch, atomically.
//! * [`report_runs`] — the one call the CLI makes: evaluate each run on its test split, draw its
//!   figures, and write the comparison.
//!
//! This crate evaluates runs through `starflow-inference` (it never trains) and is the only crate
//! that knows polars and plotters.

pub mod error;
mod font;
pub mod kinds;
pub mod plots;
pub mod predictions;
mod report;
mod row;
pub mod stats;
pub mod table;

pub use error::{ReportError, Result};
pub use report::{report_runs, ReportOptions, RunReport};
pub use table::{RunRow, TARGETS};
