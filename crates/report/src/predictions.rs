//! Prediction tables, CSV or Parquet, written as the stars arrive.
//!
//! `starflow predict` on a survey (GALAH DR4 has ~917,000 spectra) must not hold every row in memory,
//! and a reader must never see half a table. [`PredictionWriter`] appends each batch of
//! [`StarPrediction`]s to a temporary file next to the target and renames it into place on
//! [`PredictionWriter::finish`]; dropped unfinished (an error, Ctrl-C unwinding), it removes the
//! temporary file and leaves any previous table untouched.
//!
//! Both formats hold the same columns: `row`, then per label `<label>_mean, _std, _q025, _q16, _q50,
//! _q84, _q975`, and when the truth is known `<label>_true, _pit` per label, the joint `hpd` level and
//! the star's `nll` (the negative log posterior density of its true labels, physical units).
//! Numbers are written with Rust's shortest round-trip formatting, so a CSV reads back to the same
//! f64 bits.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use polars::prelude::{BatchedWriter, Column, DataFrame, ParquetWriter, PlSmallStr};
use starflow_data::atomic_file::AtomicFile;
use starflow_inference::StarPrediction;

use crate::error::{ReportError, Result};

/// The file format of a prediction table, chosen by the file's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableFormat {
    Csv,
    Parquet,
}

impl TableFormat {
    /// `.csv` or `.parquet`; anything else is an error that names the file and the two choices.
    pub fn from_path(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("csv") => Ok(TableFormat::Csv),
            Some(e) if e.eq_ignore_ascii_case("parquet") => Ok(TableFormat::Parquet),
            _ => Err(ReportError::Input(format!(
                "{}: unknown table format; name the output file *.csv or *.parquet",
                path.display()
            ))),
        }
    }
}

/// The column names of a table over `names` (the labels), with or without the truth columns (see
/// [`StarPrediction::columns`]).
pub fn prediction_columns(names: &[String], with_truth: bool) -> Vec<String> {
    StarPrediction::columns(names, with_truth)
}

/// Appends the CSV lines of `stars` to `out`.
fn csv_rows(out: &mut String, stars: &[StarPrediction], d: usize, with_truth: bool) {
    for p in stars {
        let _ = write!(out, "{}", p.row);
        for c in p.cells(d, with_truth) {
            match c {
                Some(v) => {
                    let _ = write!(out, ",{v}");
                }
                None => out.push(','),
            }
        }
        out.push('\n');
    }
}

/// A whole prediction table as CSV text (for the small tables of `evaluate` and `report`).
pub fn predictions_csv(names: &[String], stars: &[StarPrediction]) -> String {
    let with_truth = stars.first().is_some_and(|p| p.truth.is_some());
    let mut s = prediction_columns(names, with_truth).join(",");
    s.push('\n');
    csv_rows(&mut s, stars, names.len(), with_truth);
    s
}

/// Writes a prediction table batch by batch; see the module documentation.
pub struct PredictionWriter {
    path: PathBuf,
    names: Vec<String>,
    with_truth: bool,
    rows: usize,
    sink: Sink,
}

enum Sink {
    Csv(AtomicFile),
    /// Parquet writes through a second handle of the temporary file; the [`AtomicFile`] keeps the
    /// first to commit it.
    Parquet(Box<BatchedWriter<File>>, AtomicFile),
}

impl std::fmt::Debug for PredictionWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PredictionWriter")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .finish()
    }
}

impl PredictionWriter {
    /// Starts a table at `path` (CSV or Parquet by its extension) over the labels `names`.
    pub fn create(path: &Path, names: &[String], with_truth: bool) -> Result<Self> {
        let format = TableFormat::from_path(path)?;
        let mut file = AtomicFile::create(path)?;
        let columns = prediction_columns(names, with_truth);
        let sink = match format {
            TableFormat::Csv => {
                let header = columns.join(",") + "\n";
                file.write_all(header.as_bytes())
                    .map_err(|e| table_error(path, e))?;
                Sink::Csv(file)
            }
            TableFormat::Parquet => {
                let handle = file.handle().map_err(|e| table_error(path, e))?;
                let schema = frame(&columns, &[], names.len(), with_truth)?
                    .schema()
                    .clone();
                let writer = ParquetWriter::new(handle)
                    .batched(&schema)
                    .map_err(|e| table_error(path, e))?;
                Sink::Parquet(Box::new(writer), file)
            }
        };
        Ok(PredictionWriter {
            path: path.to_path_buf(),
            names: names.to_vec(),
            with_truth,
            rows: 0,
            sink,
        })
    }

    /// Appends a batch of stars (in the order they should appear).
    pub fn write(&mut self, stars: &[StarPrediction]) -> Result<()> {
        if stars.is_empty() {
            return Ok(());
        }
        let d = self.names.len();
        match &mut self.sink {
            Sink::Csv(file) => {
                let mut text = String::with_capacity(stars.len() * 64 * (d + 1));
                csv_rows(&mut text, stars, d, self.with_truth);
                file.write_all(text.as_bytes())
                    .map_err(|e| table_error(&self.path, e))?;
            }
            Sink::Parquet(writer, _) => {
                let columns = prediction_columns(&self.names, self.with_truth);
                let df = frame(&columns, stars, d, self.with_truth)?;
                writer
                    .write_batch(&df)
                    .map_err(|e| table_error(&self.path, e))?;
            }
        }
        self.rows += stars.len();
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Completes the table and moves it into place (fsync, rename, directory fsync).
    pub fn finish(self) -> Result<PathBuf> {
        let file = match self.sink {
            Sink::Csv(file) => file,
            Sink::Parquet(writer, file) => {
                writer.finish().map_err(|e| table_error(&self.path, e))?;
                drop(writer);
                file
            }
        };
        file.commit()?;
        Ok(self.path)
    }
}

/// One batch of stars as a data frame with the table's columns.
fn frame(
    columns: &[String],
    stars: &[StarPrediction],
    d: usize,
    with_truth: bool,
) -> Result<DataFrame> {
    let rows: Vec<Vec<Option<f64>>> = stars.iter().map(|p| p.cells(d, with_truth)).collect();
    let mut cols = vec![Column::new(
        PlSmallStr::from("row"),
        stars.iter().map(|p| p.row as u64).collect::<Vec<u64>>(),
    )];
    for (k, name) in columns.iter().skip(1).enumerate() {
        let v: Vec<Option<f64>> = rows.iter().map(|r| r[k]).collect();
        cols.push(Column::new(PlSmallStr::from(name.as_str()), v));
    }
    DataFrame::new(stars.len(), cols).map_err(|e| ReportError::Table {
        path: "predictions".into(),
        message: e.to_string(),
    })
}

fn table_error(path: &Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Table {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}
