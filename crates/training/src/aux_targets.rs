//! Auxiliary training targets: per-star quantities the network is asked to predict beside the
//! labels, during training only (issue 32).
//!
//! **Why.** The labels' errors of every estimator tried follow each star's drawn abundance
//! offsets (73 % of TinyCNN's held-out log g error variance is a linear function of them): an
//! ionised species' offset shifts its lines the way gravity does. The information to tell them
//! apart is in the spectrum (the marginal Cramér–Rao bound counts them), but the NLL of three
//! labels gives the network no direct signal to pull the offsets apart from log g. Asking it to
//! predict them as well is that signal. GALAH DR4 publishes per-element abundances, so a real-data
//! user has such targets too. `starflow synth` does not write a synthetic set's drawn ones: the
//! `nuisances` example of `starflow-data` prints them (`results/learning-curve/scripts/aux_screen.sh`
//! turns them into `abundances.npy`).
//!
//! The file (`data.aux_file` in `data.dir`) holds one row per star of the labels file, any number
//! of columns (`model.aux_outputs`). A non-finite entry is a missing value (GALAH leaves
//! unmeasured elements blank) and adds nothing to the loss. Columns are z-scored with the
//! training split's finite values, so each weighs alike. The loss is the mean squared z-error over
//! the present entries times `optim.aux_weight`, added to the mean NLL; the extra outputs are
//! extra rows of the backbone's head, unused after training.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use starflow_data::npy::NpyArray;
use starflow_data::Dataset;

use crate::error::{Result, TrainError};

/// A run's auxiliary targets, z-scored, one row per usable star of its dataset.
#[derive(Clone, Debug)]
pub struct AuxTargets {
    /// `(n_stars, k)` row-major, z-scored; NaN where missing.
    z: Vec<f64>,
    k: usize,
    path: PathBuf,
}

impl AuxTargets {
    /// Loads `file` (in the dataset's directory) for `dataset`'s stars, with `expected` columns,
    /// and z-scores it with the statistics of `train`'s rows.
    pub fn load(file: &Path, dataset: &Dataset, expected: usize, train: &[usize]) -> Result<Self> {
        let arr = NpyArray::open(file)?;
        let (rows, k) = arr.shape2("auxiliary targets")?;
        let file_rows = dataset.len() + dataset.dropped_rows().len();
        let bad = |problem: String, fix: &str| TrainError::Input {
            path: file.to_path_buf(),
            problem,
            fix: fix.into(),
        };
        if rows != file_rows {
            return Err(bad(
                format!("has {rows} rows, but the labels file has {file_rows} stars"),
                "give one row per star of labels.npy, in the same order",
            ));
        }
        if k != expected {
            return Err(bad(
                format!("has {k} columns, but model.aux_outputs = {expected}"),
                "set model.aux_outputs to the file's column count",
            ));
        }
        let all = arr.to_f64_vec();
        // The usable stars' rows, then z-scored column by column in place.
        let mut z = Vec::with_capacity(dataset.len() * k);
        for i in 0..dataset.len() {
            let r = dataset.file_row(i);
            z.extend_from_slice(&all[r * k..(r + 1) * k]);
        }
        for c in 0..k {
            let (mean, std) = column_stats(train.iter().map(|&i| z[i * k + c]));
            if !(std.is_finite() && std > 0.0) {
                return Err(bad(
                    format!(
                        "column {c} has no spread over the training stars' finite values (std {std})"
                    ),
                    "drop the column, or give it values that vary",
                ));
            }
            for i in 0..dataset.len() {
                z[i * k + c] = (z[i * k + c] - mean) / std;
            }
        }
        Ok(AuxTargets {
            z,
            k,
            path: file.to_path_buf(),
        })
    }

    /// The file the targets came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The z-scored targets `(b, k)` of stars `rows` with missing entries set to 0, and the mask
    /// `(b, k)` of present ones (1) — f64, on the host.
    pub fn batch(&self, rows: &[usize]) -> Result<(Tensor, Tensor)> {
        let (mut t, mut m) = (Vec::new(), Vec::new());
        for &i in rows {
            for &v in &self.z[i * self.k..(i + 1) * self.k] {
                let present = v.is_finite();
                t.push(if present { v } else { 0.0 });
                m.push(if present { 1.0 } else { 0.0 });
            }
        }
        let shape = (rows.len(), self.k);
        Ok((
            Tensor::from_vec(t, shape, &Device::Cpu)?,
            Tensor::from_vec(m, shape, &Device::Cpu)?,
        ))
    }
}

/// Mean and (population) standard deviation of the finite values.
fn column_stats(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// The masked mean squared error of predictions `pred (b, k)` (f64, host) against `target`
/// with `mask` (from [`AuxTargets::batch`]): the sum over present entries over their count.
pub fn masked_mse(pred: &Tensor, target: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let count = mask.sum_all()?.to_scalar::<f64>()?.max(1.0);
    let sq = (pred - target)?.sqr()?.mul(mask)?;
    Ok((sq.sum_all()? / count)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Missing entries add nothing and are not counted.
    #[test]
    fn missing_entries_are_left_out_of_the_loss() -> Result<()> {
        let pred = Tensor::new(&[[1.0f64, 5.0], [0.0, 2.0]], &Device::Cpu)?;
        let target = Tensor::new(&[[0.0f64, 0.0], [0.0, 0.0]], &Device::Cpu)?;
        let mask = Tensor::new(&[[1.0f64, 0.0], [1.0, 1.0]], &Device::Cpu)?;
        let l = masked_mse(&pred, &target, &mask)?.to_scalar::<f64>()?;
        assert!((l - (1.0 + 0.0 + 4.0) / 3.0).abs() < 1e-12, "{l}");
        Ok(())
    }

    #[test]
    fn column_statistics_skip_non_finite_values() {
        let (m, s) = column_stats([1.0, f64::NAN, 3.0].into_iter());
        assert_eq!((m, s), (2.0, 1.0));
        assert!(column_stats([f64::NAN].into_iter()).0.is_nan());
    }
}
