//! `starflow.Flow`: the conditional flows without the CNN, e.g. behind a user's own network.

use candle_core::{Device, Tensor};
use numpy::PyUntypedArrayMethods;
use pyo3::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::arrays::{array, matrix_f64};
use crate::errors::{candle_error, count, flow_error};

/// A conditional normalizing flow over `dim` labels, by name: `diagonal_gaussian`,
/// `full_gaussian` or `full_flow` (the reference library's flows, exact to it). Each item brings
/// its own row of `n_params` raw parameters.
#[pyclass(frozen, module = "starflow")]
pub struct Flow {
    inner: starflow_flows::Flow,
}

/// The most labels a flow is built for: the flows' parameter counts grow with the square of the
/// dimension (a full flow at 3 labels has 306), and stellar label sets stay far below this.
const MAX_DIM: usize = 64;

/// The most values one `sample` call returns (2 GiB of float64); more is asked in parts.
const MAX_SAMPLE_VALUES: usize = 1 << 28;

fn tensor(values: &[f64], rows: usize, cols: usize) -> PyResult<Tensor> {
    Tensor::from_slice(values, (rows, cols), &Device::Cpu).map_err(candle_error)
}

#[pymethods]
impl Flow {
    #[new]
    #[pyo3(signature = (name, dim=3))]
    fn new(name: &str, dim: i64) -> PyResult<Self> {
        let dim = count("dim", dim, 1, MAX_DIM)?;
        let inner = starflow_flows::flow_by_name(name, dim).map_err(flow_error)?;
        Ok(Flow { inner })
    }

    /// The flow's name.
    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    /// Dimension of the labels.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// Raw parameters per item (6, 9 and 306 for the three flows at dim 3).
    #[getter]
    fn n_params(&self) -> usize {
        self.inner.n_params()
    }

    /// `log p(x | params)` per item, float64, for `params` of shape `(b, n_params)` and `x` of
    /// shape `(b, dim)`.
    fn log_prob<'py>(
        &self,
        py: Python<'py>,
        params: &Bound<'py, PyAny>,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let p = matrix_f64(params, "params", self.inner.n_params())?;
        let x = matrix_f64(x, "x", self.inner.dim())?;
        let (b, bx) = (p.shape()[0], x.shape()[0]);
        if b != bx {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "params has {b} rows but x has {bx}: one parameter row per point"
            )));
        }
        let p = tensor(p.as_slice()?, b, self.inner.n_params())?;
        let x = tensor(x.as_slice()?, b, self.inner.dim())?;
        let values: Vec<f64> = py
            .detach(|| -> Result<Vec<f64>, starflow_flows::FlowError> {
                Ok(self.inner.log_prob(&p, &x)?.to_vec1()?)
            })
            .map_err(flow_error)?;
        array(py, values, &[b])
    }

    /// `n` samples per item, shape `(b, n, dim)`, for `params` of shape `(b, n_params)`. The same
    /// seed gives the same samples whatever the thread count.
    #[pyo3(signature = (params, n, seed=0))]
    fn sample<'py>(
        &self,
        py: Python<'py>,
        params: &Bound<'py, PyAny>,
        n: i64,
        seed: i128,
    ) -> PyResult<Bound<'py, PyAny>> {
        let n = count("n", n, 1, MAX_SAMPLE_VALUES)?;
        let seed = crate::errors::seed(seed)?;
        let p = matrix_f64(params, "params", self.inner.n_params())?;
        let b = p.shape()[0];
        if b.saturating_mul(n).saturating_mul(self.inner.dim()) > MAX_SAMPLE_VALUES {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{b} rows x n={n} samples x {} labels is more than {MAX_SAMPLE_VALUES} values \
                 (8 bytes each); sample fewer rows per call",
                self.inner.dim()
            )));
        }
        let p = tensor(p.as_slice()?, b, self.inner.n_params())?;
        let values = py
            .detach(|| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                self.inner.sample(&p, n, &mut rng)
            })
            .map_err(flow_error)?
            .values;
        array(py, values, &[b, n, self.inner.dim()])
    }

    fn __repr__(&self) -> String {
        format!(
            "Flow('{}', dim={}, n_params={})",
            self.inner.name(),
            self.inner.dim(),
            self.inner.n_params()
        )
    }
}
