//! A validated pair of spectra and labels, with the target label columns selected by name.
//!
//! Validation happens once, at load time, so that every later stage can trust the data: shapes,
//! row counts, column names, non-finite values and constant targets are all checked here and
//! reported with the file, the problem and the fix.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{DataError, Result};
use crate::npy::NpyArray;

/// The column layout of the GALAH DR4 subset's `labels.npy`, in order.
pub const GALAH_COLUMNS: [&str; 8] = [
    "mass", "age", "l_bol", "dist", "t_eff", "log_g", "fe_h", "SNR",
];

/// The labels the reference model predicts.
pub const DEFAULT_TARGETS: [&str; 3] = ["t_eff", "log_g", "fe_h"];

/// The largest magnitude a target label may have: far beyond any stellar label in any unit, and far
/// below where squaring it for the z-scoring overflows (~1e154). Larger values are sentinels or unit
/// errors, which were reported as a "constant" label.
pub const MAX_LABEL_MAGNITUDE: f64 = 1e30;

/// How to interpret and validate a pair of files.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    /// One name per column of the labels file, in order.
    pub label_names: Vec<String>,
    /// The columns the model predicts, by name.
    pub targets: Vec<String>,
    /// Drop rows with non-finite spectra or targets instead of failing.
    pub drop_nonfinite: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            label_names: GALAH_COLUMNS.iter().map(|s| s.to_string()).collect(),
            targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
            drop_nonfinite: false,
        }
    }
}

/// Where the flux values live: a memory-mapped npy file or an owned buffer (HDF5 input).
enum Spectra {
    Npy(NpyArray),
    Owned(Vec<f32>),
}

/// Spectra and labels that passed validation.
pub struct Dataset {
    spectra: Spectra,
    n_pix: usize,
    /// All label columns of every row in the file, row-major.
    labels: Vec<f64>,
    label_names: Vec<String>,
    target_cols: Vec<usize>,
    /// File row indices that are kept (all rows unless non-finite rows were dropped).
    rows: Vec<usize>,
    dropped: Vec<usize>,
    spectra_path: PathBuf,
    labels_path: PathBuf,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("spectra", &self.spectra_path)
            .field("labels", &self.labels_path)
            .field("n_rows", &self.rows.len())
            .field("n_pix", &self.n_pix)
            .field("targets", &self.target_names())
            .finish()
    }
}

/// Per-file facts that `starflow inspect` prints, gathered without building a [`Dataset`], so that
/// a file with problems can still be inspected.
#[derive(Clone, Debug)]
pub struct FileSummary {
    pub path: PathBuf,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    /// Number of non-finite elements, and the first few rows containing one.
    pub n_nonfinite: usize,
    pub nonfinite_rows: Vec<usize>,
    pub n_nonfinite_rows: usize,
}

/// Fails unless there are spectra, one label row per spectrum and one name per label column.
fn check_shapes(
    (rows_s, n_pix): (usize, usize),
    (rows_l, n_cols): (usize, usize),
    (spectra_path, labels_path): (&Path, &Path),
    opts: &LoadOptions,
) -> Result<()> {
    if rows_s == 0 || n_pix == 0 {
        return Err(DataError::invalid(
            spectra_path,
            format!("the spectra array is empty (shape ({rows_s}, {n_pix}))"),
            "pass a file with one spectrum per row",
        ));
    }
    if rows_s != rows_l {
        return Err(DataError::invalid(
            labels_path,
            format!(
                "row-count mismatch: {} has {rows_s} spectra but this file has {rows_l} label rows",
                spectra_path.display()
            ),
            "use spectra and labels from the same set: row i of each must describe the same star",
        ));
    }
    if n_cols != opts.label_names.len() {
        let names = opts.label_names.join(", ");
        let problem = if n_cols < opts.label_names.len() {
            format!(
                "too few label columns: the file has {n_cols}, but {} named columns are expected ({names})",
                opts.label_names.len()
            )
        } else {
            format!(
                "the file has {n_cols} label columns, but only {} names were given ({names})",
                opts.label_names.len()
            )
        };
        return Err(DataError::invalid(
            labels_path,
            problem,
            "pass one name per column with --label-names (the GALAH layout is mass,age,l_bol,dist,t_eff,log_g,fe_h,SNR)",
        ));
    }
    Ok(())
}

/// The label columns of `opts.targets`, in order; every name must be a different column.
fn target_columns(opts: &LoadOptions) -> Result<Vec<usize>> {
    // A name given twice would make two identical columns of every output table (Parquet
    // refuses them only after the work) and, for label names, pick one column silently.
    for (key, names) in [
        ("label_names", &opts.label_names),
        ("targets", &opts.targets),
    ] {
        if let Some(dup) = first_duplicate(names) {
            return Err(DataError::config(
                key,
                format!("'{dup}' is named twice; every name must be a different label column"),
            ));
        }
    }
    let mut target_cols = Vec::with_capacity(opts.targets.len());
    for t in &opts.targets {
        match opts.label_names.iter().position(|n| n == t) {
            Some(i) => target_cols.push(i),
            None => {
                return Err(DataError::config(
                    "targets",
                    format!(
                        "unknown label column '{t}'; the columns are: {}",
                        opts.label_names.join(", ")
                    ),
                ))
            }
        }
    }
    if target_cols.is_empty() {
        return Err(DataError::config(
            "targets",
            "at least one target column is needed",
        ));
    }
    Ok(target_cols)
}

/// The labels array, row-major with `n_cols` columns, and which of them are targets.
struct LabelTable<'a> {
    values: &'a [f64],
    n_cols: usize,
    target_cols: &'a [usize],
}

impl LabelTable<'_> {
    fn at(&self, row: usize, col: usize) -> f64 {
        self.values[row * self.n_cols + col]
    }

    /// Fails when a target column holds a value beyond any physical one, or the same value in
    /// every usable row (`rows`): neither can be z-scored.
    fn check_targets(&self, rows: &[usize], labels_path: &Path, targets: &[String]) -> Result<()> {
        for (k, &c) in self.target_cols.iter().enumerate() {
            let extreme = rows
                .iter()
                .map(|&r| (r, self.at(r, c)))
                .find(|(_, v)| v.abs() > MAX_LABEL_MAGNITUDE);
            if let Some((r, v)) = extreme {
                return Err(DataError::invalid(
                    labels_path,
                    format!(
                        "target label column '{}' (column {c}) holds {v:e} in row {r}, beyond any \
                         physical value (|x| <= {MAX_LABEL_MAGNITUDE:e}); z-scoring it would overflow",
                        targets[k]
                    ),
                    "check the labels file for a sentinel value or a unit error, and repair or remove that row",
                ));
            }
            let first = self.at(rows[0], c);
            if rows.iter().all(|&r| self.at(r, c) == first) {
                return Err(DataError::invalid(
                    labels_path,
                    format!(
                        "target label column '{}' (column {c}) is constant ({first}), so it cannot be z-scored or learned",
                        targets[k]
                    ),
                    "check the column order with --label-names, or choose other --targets",
                ));
            }
        }
        Ok(())
    }
}

/// The rows to use and the rows dropped: rows with a non-finite value in the spectrum or in a
/// target column (others are not used) are an error, or with `opts.drop_nonfinite` are dropped.
fn usable_rows(
    spectra: &Spectra,
    (rows_s, n_pix): (usize, usize),
    labels: &LabelTable,
    (spectra_path, labels_path): (&Path, &Path),
    opts: &LoadOptions,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let (_, bad_spec) = match spectra {
        Spectra::Npy(a) => scan_nonfinite(rows_s, n_pix, |i, buf| a.read_f32_into(i * n_pix, buf)),
        Spectra::Owned(v) => scan_nonfinite(rows_s, n_pix, |i, buf| {
            buf.copy_from_slice(&v[i * n_pix..(i + 1) * n_pix])
        }),
    };
    let bad_lab: Vec<usize> = (0..rows_s)
        .filter(|&r| {
            labels
                .target_cols
                .iter()
                .any(|&c| !labels.at(r, c).is_finite())
        })
        .collect();
    if !opts.drop_nonfinite {
        if !bad_spec.is_empty() {
            return Err(DataError::invalid(
                spectra_path,
                format!(
                    "{} spectra contain non-finite values (NaN or inf); first rows: {}",
                    bad_spec.len(),
                    first_rows(&bad_spec)
                ),
                "clean the file, or pass --drop-nonfinite to skip those rows",
            ));
        }
        if !bad_lab.is_empty() {
            return Err(DataError::invalid(
                labels_path,
                format!(
                    "{} rows have non-finite target labels (NaN or inf); first rows: {}",
                    bad_lab.len(),
                    first_rows(&bad_lab)
                ),
                "clean the file, or pass --drop-nonfinite to skip those rows",
            ));
        }
    }
    let mut dropped: Vec<usize> = bad_spec.into_iter().chain(bad_lab).collect();
    dropped.sort_unstable();
    dropped.dedup();
    let rows: Vec<usize> = (0..rows_s)
        .filter(|r| dropped.binary_search(r).is_err())
        .collect();
    if rows.is_empty() {
        return Err(DataError::invalid(
            spectra_path,
            "every row has non-finite values, nothing is left after dropping them",
            "check how the files were produced",
        ));
    }
    if !dropped.is_empty() {
        tracing::warn!(
            n = dropped.len(),
            first = %first_rows(&dropped),
            "dropped rows with non-finite values"
        );
    }
    Ok((rows, dropped))
}

/// Counts non-finite values of a 2-D array per row, in parallel; returns (count, offending rows).
fn scan_nonfinite(
    rows: usize,
    cols: usize,
    read: impl Fn(usize, &mut [f32]) + Sync,
) -> (usize, Vec<usize>) {
    let per_row: Vec<usize> = (0..rows)
        .into_par_iter()
        .map_init(
            || vec![0f32; cols],
            |buf, r| {
                read(r, buf);
                buf.iter().filter(|v| !v.is_finite()).count()
            },
        )
        .collect();
    let total = per_row.iter().sum();
    let bad = per_row
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(r, _)| r)
        .collect();
    (total, bad)
}

/// Summarises one npy file: dtype, shape and non-finite values (2-D arrays only).
pub fn summarize_npy(path: impl AsRef<Path>) -> Result<FileSummary> {
    let arr = NpyArray::open(path.as_ref())?;
    let (n, bad) = match arr.shape() {
        &[r, c] => scan_nonfinite(r, c, |i, buf| arr.read_f32_into(i * c, buf)),
        _ => {
            let v = arr.to_f64_vec();
            (v.iter().filter(|x| !x.is_finite()).count(), Vec::new())
        }
    };
    Ok(FileSummary {
        path: arr.path().to_path_buf(),
        dtype: arr.dtype().name(),
        shape: arr.shape().to_vec(),
        n_nonfinite: n,
        n_nonfinite_rows: bad.len(),
        nonfinite_rows: bad.into_iter().take(10).collect(),
    })
}

/// The first name that appears twice in `names`.
fn first_duplicate(names: &[String]) -> Option<&str> {
    names
        .iter()
        .enumerate()
        .find(|(i, n)| names[..*i].contains(n))
        .map(|(_, n)| n.as_str())
}

fn first_rows(rows: &[usize]) -> String {
    let shown: Vec<String> = rows.iter().take(5).map(|r| r.to_string()).collect();
    if rows.len() > 5 {
        format!("{}, ...", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

impl Dataset {
    /// Loads `spectra.npy` and `labels.npy` from a directory.
    pub fn load_dir(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.exists() {
            // A not-found error, so callers can tell a mistyped path from a bad file (the
            // Python layer raises `FileNotFoundError` for it, as for a missing file).
            return Err(DataError::Open {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
            });
        }
        if !dir.is_dir() {
            return Err(DataError::invalid(
                dir,
                "is not a directory",
                "pass a directory holding spectra.npy and labels.npy (make one with `starflow synth --out DIR`)",
            ));
        }
        Self::load_npy(dir.join("spectra.npy"), dir.join("labels.npy"), opts)
    }

    /// Loads a spectra file and a labels file, memory-mapping the spectra.
    pub fn load_npy(
        spectra: impl AsRef<Path>,
        labels: impl AsRef<Path>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let spectra = NpyArray::open(spectra.as_ref())?;
        let labels_arr = NpyArray::open(labels.as_ref())?;
        let (rows_s, n_pix) = spectra.shape2("spectra")?;
        let (rows_l, n_cols) = labels_arr.shape2("labels")?;
        let labels = labels_arr.to_f64_vec();
        let paths = (
            spectra.path().to_path_buf(),
            labels_arr.path().to_path_buf(),
        );
        Self::build(
            Spectra::Npy(spectra),
            (rows_s, n_pix),
            labels,
            (rows_l, n_cols),
            paths,
            opts,
        )
    }

    /// Builds a dataset from in-memory arrays (used by the HDF5 loader and by tests).
    pub fn from_arrays(
        spectra: Vec<f32>,
        n_pix: usize,
        labels: Vec<f64>,
        n_cols: usize,
        paths: (PathBuf, PathBuf),
        opts: &LoadOptions,
    ) -> Result<Self> {
        let rows_s = spectra.len().checked_div(n_pix).unwrap_or(0);
        let rows_l = labels.len().checked_div(n_cols).unwrap_or(0);
        Self::build(
            Spectra::Owned(spectra),
            (rows_s, n_pix),
            labels,
            (rows_l, n_cols),
            paths,
            opts,
        )
    }

    /// Checks the arrays against each other and `opts`, drops non-finite rows when asked, and
    /// builds the dataset.
    fn build(
        spectra: Spectra,
        (rows_s, n_pix): (usize, usize),
        labels: Vec<f64>,
        (rows_l, n_cols): (usize, usize),
        (spectra_path, labels_path): (PathBuf, PathBuf),
        opts: &LoadOptions,
    ) -> Result<Self> {
        let paths = (spectra_path.as_path(), labels_path.as_path());
        check_shapes((rows_s, n_pix), (rows_l, n_cols), paths, opts)?;
        let target_cols = target_columns(opts)?;
        let labels_of = LabelTable {
            values: &labels,
            n_cols,
            target_cols: &target_cols,
        };
        let (rows, dropped) = usable_rows(&spectra, (rows_s, n_pix), &labels_of, paths, opts)?;
        labels_of.check_targets(&rows, labels_path.as_path(), &opts.targets)?;
        Ok(Dataset {
            spectra,
            n_pix,
            labels,
            label_names: opts.label_names.clone(),
            target_cols,
            rows,
            dropped,
            spectra_path,
            labels_path,
        })
    }

    /// Number of usable stars.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no star is usable (never, for a dataset that loaded).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Pixels per spectrum.
    pub fn n_pix(&self) -> usize {
        self.n_pix
    }

    /// Names of the predicted columns.
    pub fn target_names(&self) -> Vec<String> {
        self.target_cols
            .iter()
            .map(|&c| self.label_names[c].clone())
            .collect()
    }

    /// Names of every label column.
    pub fn label_names(&self) -> &[String] {
        &self.label_names
    }

    /// File rows that were dropped for non-finite values.
    pub fn dropped_rows(&self) -> &[usize] {
        &self.dropped
    }

    /// The file row of usable star `i`.
    pub fn file_row(&self, i: usize) -> usize {
        self.rows[i]
    }

    /// Paths of the spectra and labels files.
    pub fn paths(&self) -> (&Path, &Path) {
        (&self.spectra_path, &self.labels_path)
    }

    /// Target labels of star `i`, in physical units.
    pub fn targets(&self, i: usize) -> Vec<f64> {
        let r = self.rows[i];
        let n_cols = self.label_names.len();
        self.target_cols
            .iter()
            .map(|&c| self.labels[r * n_cols + c])
            .collect()
    }

    /// Every value of a label column by name, for usable stars.
    pub fn column(&self, name: &str) -> Option<Vec<f64>> {
        let c = self.label_names.iter().position(|n| n == name)?;
        let n_cols = self.label_names.len();
        Some(
            self.rows
                .iter()
                .map(|&r| self.labels[r * n_cols + c])
                .collect(),
        )
    }

    /// Copies the raw flux of star `i` into `out` (length `n_pix`).
    pub fn flux_into(&self, i: usize, out: &mut [f32]) {
        let r = self.rows[i];
        match &self.spectra {
            Spectra::Npy(a) => a.read_f32_into(r * self.n_pix, out),
            Spectra::Owned(v) => out.copy_from_slice(&v[r * self.n_pix..(r + 1) * self.n_pix]),
        }
    }
}
