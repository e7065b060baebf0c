//! Optional HDF5 input (cargo feature `hdf5`, system libhdf5 through `hdf5-metno`).
//!
//! Some users keep spectra and labels as two datasets of one `.h5` file. The arrays are read whole
//! (HDF5 has no portable zero-copy view) and then validated exactly like npy input.

use std::path::{Path, PathBuf};

use hdf5_metno as hdf5;

use crate::dataset::{Dataset, LoadOptions};
use crate::error::{DataError, Result};

/// Names of the two datasets inside the HDF5 file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hdf5Names {
    pub spectra: String,
    pub labels: String,
}

impl Default for Hdf5Names {
    fn default() -> Self {
        Hdf5Names {
            spectra: "spectra".into(),
            labels: "labels".into(),
        }
    }
}

fn h5err(path: &Path, e: hdf5::Error, fix: &str) -> DataError {
    DataError::Hdf5 {
        path: path.to_path_buf(),
        message: e.to_string(),
        fix: fix.to_string(),
    }
}

fn read_2d<T: hdf5::H5Type>(
    file: &hdf5::File,
    path: &Path,
    name: &str,
) -> Result<(Vec<T>, usize, usize)> {
    let ds = file.dataset(name).map_err(|e| {
        h5err(
            path,
            e,
            &format!("the file needs a dataset named '{name}'; choose another name with --h5-spectra / --h5-labels"),
        )
    })?;
    let shape = ds.shape();
    let (r, c) = match shape.as_slice() {
        &[r, c] => (r, c),
        s => {
            return Err(DataError::invalid(
                path,
                format!("dataset '{name}' must be 2-D, found shape {s:?}"),
                "store it as a (rows, columns) array",
            ))
        }
    };
    let data = ds.read_raw::<T>().map_err(|e| {
        h5err(
            path,
            e,
            &format!("dataset '{name}' must hold floating-point numbers"),
        )
    })?;
    Ok((data, r, c))
}

/// Loads spectra and labels from two datasets of one HDF5 file.
pub fn load_hdf5(path: impl AsRef<Path>, names: &Hdf5Names, opts: &LoadOptions) -> Result<Dataset> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(DataError::Open {
            path: path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let file =
        hdf5::File::open(path).map_err(|e| h5err(path, e, "pass a valid HDF5 (.h5) file"))?;
    let (spectra, rows_s, n_pix) = read_2d::<f32>(&file, path, &names.spectra)?;
    let (labels, rows_l, n_cols) = read_2d::<f64>(&file, path, &names.labels)?;
    if rows_s != rows_l {
        return Err(DataError::invalid(
            path,
            format!(
                "row-count mismatch: '{}' has {rows_s} rows, '{}' has {rows_l}",
                names.spectra, names.labels
            ),
            "row i of each dataset must describe the same star",
        ));
    }
    let tag = |n: &str| PathBuf::from(format!("{}:{n}", path.display()));
    Dataset::from_arrays(
        spectra,
        n_pix,
        labels,
        n_cols,
        (tag(&names.spectra), tag(&names.labels)),
        opts,
    )
}
