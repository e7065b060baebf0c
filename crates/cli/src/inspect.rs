//! `starflow inspect`: what is in a data set, and whether it passes validation.
//!
//! The summary is printed before validation runs, so a file with problems can still be looked at.

use std::path::PathBuf;

use starflow_data::dataset::summarize_npy;
use starflow_data::npy::NpyArray;
use starflow_data::Dataset;

use crate::{DataArgs, InspectArgs};

/// A user mistake detected by the CLI itself (as opposed to the data crate).
#[derive(Debug)]
pub struct UserError(pub String);

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

/// The spectra and labels files named by the arguments.
pub fn npy_paths(args: &DataArgs) -> Result<(PathBuf, PathBuf), UserError> {
    match (&args.data, &args.spectra, &args.labels) {
        (Some(d), _, _) => Ok((d.join("spectra.npy"), d.join("labels.npy"))),
        (None, Some(s), Some(l)) => Ok((s.clone(), l.clone())),
        _ => Err(UserError(
            "no data given: pass --data DIR (with spectra.npy and labels.npy), --spectra F --labels F, or --h5 F; make a data set with `starflow synth --out DIR`".into(),
        )),
    }
}

/// Loads and validates the data set named by the arguments.
pub fn load(args: &DataArgs) -> anyhow::Result<Dataset> {
    let opts = args.load_options();
    if let Some(h5) = &args.h5 {
        return load_h5(h5, args, &opts);
    }
    let (s, l) = npy_paths(args)?;
    Ok(Dataset::load_npy(s, l, &opts)?)
}

#[cfg(feature = "hdf5")]
fn load_h5(
    path: &std::path::Path,
    args: &DataArgs,
    opts: &starflow_data::LoadOptions,
) -> anyhow::Result<Dataset> {
    let names = starflow_data::hdf5_input::Hdf5Names {
        spectra: args.h5_spectra.clone(),
        labels: args.h5_labels.clone(),
    };
    Ok(starflow_data::hdf5_input::load_hdf5(path, &names, opts)?)
}

#[cfg(not(feature = "hdf5"))]
fn load_h5(
    path: &std::path::Path,
    _args: &DataArgs,
    _opts: &starflow_data::LoadOptions,
) -> anyhow::Result<Dataset> {
    Err(UserError(format!(
        "{}: this starflow was built without HDF5 support; rebuild with `cargo build --release -p starflow-cli --features hdf5` (needs libhdf5-dev), or convert the file to .npy",
        path.display()
    ))
    .into())
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos.fract());
    if i + 1 < sorted.len() {
        sorted[i] * (1.0 - f) + sorted[i + 1] * f
    } else {
        sorted[i]
    }
}

fn stats_row(name: &str, values: &[f64]) {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let n = finite.len() as f64;
    let mean = finite.iter().sum::<f64>() / n;
    let std = (finite.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    println!(
        "  {name:<8} {mean:>12.4} {std:>12.4} {min:>12.4} {max:>12.4} {:>9}",
        values.len() - finite.len()
    );
}

fn print_file(label: &str, path: &std::path::Path) -> anyhow::Result<()> {
    let s = summarize_npy(path)?;
    println!("{label}: {}", s.path.display());
    println!("  dtype {}, shape {:?}", s.dtype, s.shape);
    if s.n_nonfinite == 0 {
        println!("  non-finite values: 0");
    } else {
        println!(
            "  non-finite values: {} in {} rows (first rows: {:?})",
            s.n_nonfinite, s.n_nonfinite_rows, s.nonfinite_rows
        );
    }
    Ok(())
}

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let data = &args.data;
    if data.h5.is_some() {
        let ds = load(data)?;
        println!("hdf5 data set: {} stars x {} pixels", ds.len(), ds.n_pix());
        return print_labels_and_validate(None, ds);
    }
    let (spectra, labels) = npy_paths(data)?;
    print_file("spectra", &spectra)?;
    print_file("labels", &labels)?;
    let arr = NpyArray::open(&labels)?;
    if let &[rows, cols] = arr.shape() {
        let all = arr.to_f64_vec();
        println!("label statistics (ddof = 0):");
        println!(
            "  {:<8} {:>12} {:>12} {:>12} {:>12} {:>9}",
            "column", "mean", "std", "min", "max", "nonfinite"
        );
        for c in 0..cols {
            let name = data
                .label_names
                .get(c)
                .cloned()
                .unwrap_or_else(|| format!("col{c}"));
            let col: Vec<f64> = (0..rows).map(|r| all[r * cols + c]).collect();
            stats_row(&name, &col);
        }
        if let Some(c) = data
            .label_names
            .iter()
            .position(|n| n == "SNR")
            .filter(|&c| c < cols)
        {
            let mut snr: Vec<f64> = (0..rows)
                .map(|r| all[r * cols + c])
                .filter(|v| v.is_finite())
                .collect();
            snr.sort_by(f64::total_cmp);
            println!(
                "SNR: min {:.1}, 5% {:.1}, median {:.1}, 95% {:.1}, max {:.1}; {} stars below 30",
                quantile(&snr, 0.0),
                quantile(&snr, 0.05),
                quantile(&snr, 0.5),
                quantile(&snr, 0.95),
                quantile(&snr, 1.0),
                snr.iter().filter(|&&v| v < 30.0).count()
            );
        }
    }
    let ds = Dataset::load_npy(&spectra, &labels, &data.load_options())?;
    print_labels_and_validate(data.data.as_ref().map(|d| d.join("crlb.npy")), ds)
}

fn print_labels_and_validate(crlb: Option<PathBuf>, ds: Dataset) -> anyhow::Result<()> {
    if let Some(path) = crlb.filter(|p| p.exists()) {
        let arr = NpyArray::open(&path)?;
        if let &[rows, 3] = arr.shape() {
            let all = arr.to_f64_vec();
            let med: Vec<f64> = (0..3)
                .map(|c| {
                    let mut v: Vec<f64> = (0..rows).map(|r| all[r * 3 + c]).collect();
                    v.sort_by(f64::total_cmp);
                    quantile(&v, 0.5)
                })
                .collect();
            println!(
                "Cramer-Rao bound (median): t_eff {:.1} K, log_g {:.4} dex, fe_h {:.4} dex",
                med[0], med[1], med[2]
            );
        }
    }
    println!(
        "validation: ok ({} usable stars x {} pixels, targets {}, {} rows dropped)",
        ds.len(),
        ds.n_pix(),
        ds.target_names().join(", "),
        ds.dropped_rows().len()
    );
    Ok(())
}
