//! The transform abstraction every flow layer implements.
//!
//! Directions are named by meaning, not "forward"/"inverse", because the reference (jammy_flows)
//! calls the sampling direction "forward" while most libraries (zuko, TFP) call the density
//! direction that: `to_base` maps data x to the base space z (what `log_prob` needs, and what
//! must be differentiable), `from_base` maps base points to data (what sampling needs).
//!
//! Layers own no tensors: the parameters `theta` of every item arrive with each call, as the
//! layer's own slice of the `(b, P)` matrix the backbone predicts (amortised flows).

use candle_core::Tensor;

use crate::error::{FlowError, Result};

/// One invertible layer of a conditional flow.
// `from_base` is the direction's name (the style guide's), not a conversion constructor.
#[allow(clippy::wrong_self_convention)]
pub trait Bijector: Send + Sync + std::fmt::Debug {
    /// A short name for the layer type, used in messages.
    fn kind(&self) -> &'static str;

    /// Dimension d of the points the layer maps.
    fn dim(&self) -> usize;

    /// Width of this layer's slice of theta.
    fn n_params(&self) -> usize;

    /// Density direction x -> z for `x: (b, d)` and `theta: (b, n_params)`; returns
    /// `(z, log|det dz/dx|)` with shapes `(b, d)` and `(b,)`. Differentiable (candle autograd)
    /// with respect to `x` and `theta`.
    fn to_base(&self, x: &Tensor, theta: &Tensor) -> Result<(Tensor, Tensor)>;

    /// Sampling direction z -> x, in place, for `n` points of one item: `points` holds `(n, d)`
    /// row-major, `theta` that item's `n_params` values. Plain f64 code, not differentiable.
    fn from_base_points(&self, theta: &[f64], points: &mut [f64]) -> Result<()>;

    /// Sampling direction for tensors, `z: (b, d)` and `theta: (b, n_params)`, row by row.
    /// Not differentiable: the result is a fresh f64 tensor.
    fn from_base(&self, z: &Tensor, theta: &Tensor) -> Result<Tensor> {
        let (b, d) = z.dims2()?;
        check_theta(self, "from_base", theta, b)?;
        if d != self.dim() {
            return Err(FlowError::Shape {
                op: "from_base",
                msg: format!("z has shape {:?}, expected (b, {})", z.dims(), self.dim()),
            });
        }
        let th = theta
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let mut pts = z
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let p = self.n_params();
        for (row, th_row) in pts.chunks_exact_mut(d).zip(th.chunks_exact(p.max(1))) {
            self.from_base_points(&th_row[..p], row)?;
        }
        Ok(Tensor::from_vec(pts, (b, d), z.device())?)
    }

    /// For an affine layer, the mean and the lower-triangular factor `L` (d x d row-major) of
    /// `x = L z + mu` for one item's parameters; `None` for any other layer.
    fn affine_factor(&self, _theta: &[f64]) -> Option<(Vec<f64>, Vec<f64>)> {
        None
    }
}

/// Checks that `theta` is `(b, n_params)`.
pub(crate) fn check_theta<B: Bijector + ?Sized>(
    layer: &B,
    op: &'static str,
    theta: &Tensor,
    b: usize,
) -> Result<()> {
    let dims = theta.dims();
    if dims.len() != 2 || dims[0] != b || dims[1] != layer.n_params() {
        return Err(FlowError::Shape {
            op,
            msg: format!(
                "{} layer expects theta of shape ({b}, {}), got {:?}",
                layer.kind(),
                layer.n_params(),
                dims
            ),
        });
    }
    Ok(())
}

/// Checks that `x` is `(b, d)` and returns `b`.
pub(crate) fn check_points<B: Bijector + ?Sized>(
    layer: &B,
    op: &'static str,
    x: &Tensor,
) -> Result<usize> {
    let dims = x.dims();
    if dims.len() != 2 || dims[1] != layer.dim() {
        return Err(FlowError::Shape {
            op,
            msg: format!(
                "{} layer expects points of shape (b, {}), got {:?}",
                layer.kind(),
                layer.dim(),
                dims
            ),
        });
    }
    Ok(dims[0])
}
