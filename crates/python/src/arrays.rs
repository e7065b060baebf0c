//! numpy arrays in and out. Inputs already C-contiguous, aligned, native-endian float32 or float64
//! are lent to Rust as read-only slices without a copy; anything else numpy converts once first:
//! big-endian arrays (what astropy returns for FITS data), misaligned chunks (what dask can
//! deliver), strided views and lists. Integer spectra are refused: un-normalised counts predicted
//! as fluxes give confident nonsense (t_eff −228,856 ± 4 K for fluxes ×100 as integers).

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use starflow_inference::Fluxes;

/// Spectra as lent by numpy: `(n_stars, n_pix)`, C-contiguous, float32 or float64.
pub enum Spectra<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
}

impl Spectra<'_> {
    /// Rows and pixels.
    pub fn shape(&self) -> (usize, usize) {
        let s = match self {
            Spectra::F32(a) => a.shape(),
            Spectra::F64(a) => a.shape(),
        };
        (s[0], s[1])
    }

    /// The fluxes, row-major, borrowed from the array.
    pub fn fluxes(&self) -> PyResult<Fluxes<'_>> {
        let not_contiguous = |e: numpy::AsSliceError| PyValueError::new_err(e.to_string());
        Ok(match self {
            Spectra::F32(a) => Fluxes::F32(a.as_slice().map_err(not_contiguous)?),
            Spectra::F64(a) => Fluxes::F64(a.as_slice().map_err(not_contiguous)?),
        })
    }
}

/// `obj` as a C-contiguous, aligned, native-endian numpy array, keeping the element types in
/// `keep` and converting any other to `other` (numpy copies only when it must).
fn contiguous<'py>(
    obj: &Bound<'py, PyAny>,
    keep: &[&str],
    other: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let np = obj.py().import("numpy")?;
    let a = np.call_method1("asarray", (obj,))?;
    // `name` ignores the byte order: ">f4" is "float32" too.
    let dtype: String = a.getattr("dtype")?.getattr("name")?.extract()?;
    let target = if keep.contains(&dtype.as_str()) {
        dtype
    } else {
        other.to_string()
    };
    // `astype` to the native dtype swaps the bytes of a big-endian array and copies nothing for an
    // array that is already right; `require` then makes it C-contiguous and aligned (a
    // misaligned chunk, as dask can deliver, is copied once).
    let copy = pyo3::types::PyDict::new(obj.py());
    copy.set_item("copy", false)?;
    let native = a.call_method(
        "astype",
        (np.call_method1("dtype", (target,))?,),
        Some(&copy),
    )?;
    let kwargs = pyo3::types::PyDict::new(obj.py());
    kwargs.set_item("requirements", ["C", "A"])?;
    np.call_method("require", (native,), Some(&kwargs))
}

/// The spectra argument of `predict` and `posterior_samples`: a 2-D array `(n_stars, n_pix)`, or
/// one spectrum as a 1-D array.
pub fn spectra<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Spectra<'py>> {
    let np = obj.py().import("numpy")?;
    let given = np.call_method1("asarray", (obj,))?;
    let kind: String = given.getattr("dtype")?.getattr("kind")?.extract()?;
    if !matches!(kind.as_str(), "f") {
        let dtype = given.getattr("dtype")?;
        return Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "spectra: an array of {dtype} cannot be fluxes; starflow wants continuum-normalised \
             fluxes (near 1) as float32 or float64. If these are fluxes, pass \
             spectra.astype(np.float32), after normalising counts to the continuum"
        )));
    }
    let mut a = contiguous(&given, &["float32", "float64"], "float32")?;
    let ndim: usize = a.getattr("ndim")?.extract()?;
    if ndim == 1 {
        a = a.call_method1("reshape", ((1, -1),))?;
    } else if ndim != 2 {
        let shape = a.getattr("shape")?;
        return Err(PyValueError::new_err(format!(
            "spectra: an array of shape {shape} cannot be predicted on; fix: pass a 2-D array \
             (n_stars, n_pix), or one spectrum as a 1-D array"
        )));
    }
    match a.extract::<PyReadonlyArray2<'py, f32>>() {
        Ok(x) => Ok(Spectra::F32(x)),
        Err(_) => Ok(Spectra::F64(a.extract::<PyReadonlyArray2<'py, f64>>()?)),
    }
}

/// A float64 matrix argument named `what` with `cols` columns, as a read-only contiguous array.
pub fn matrix_f64<'py>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    cols: usize,
) -> PyResult<PyReadonlyArray2<'py, f64>> {
    let a = contiguous(obj, &["float64"], "float64")?;
    let shape: Vec<usize> = a.getattr("shape")?.extract()?;
    if shape.len() != 2 || shape[1] != cols {
        return Err(PyValueError::new_err(format!(
            "{what}: expected a float64 array of shape (b, {cols}), got shape {shape:?}"
        )));
    }
    a.extract()
}

/// A flat vector as a numpy array of the given shape (the vector moves, no copy).
pub fn array<'py, T: numpy::Element>(
    py: Python<'py>,
    values: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, values)
        .reshape(shape.to_vec())?
        .into_any())
}
