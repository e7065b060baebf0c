//! **API boundary**: [`Flow`], a conditional (amortised) normalizing flow, and the constructors
//! of the three reference flows.
//!
//! A flow is a list of [`Bijector`] layers in the sampling direction (base z -> data x) over a
//! standard normal base. Each item (star) brings its own raw parameter row of width
//! [`Flow::n_params`]; layer `i` reads the contiguous slice [`Flow::param_range`]`(i)`, slices
//! assigned in sampling order (math §0). The density runs the layers in reverse:
//!
//! `log p(x) = sum_j log N(z_j; 0, 1) + sum_layers log|det dz/dx|`.
//!
//! The flow owns no tensors and knows nothing of spectra, files or the CNN: the training crate
//! builds one by name, sizes its head with `n_params()` and calls [`Flow::log_prob`].

use std::ops::Range;

use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rayon::prelude::*;

use crate::affine::{AffineLayer, CovType, OffDiagonal};
use crate::bijector::Bijector;
use crate::error::{FlowError, Result};
use crate::gaussianization::{GaussianizationConfig, GaussianizationLayer};
use crate::special::{Nonlinearity, LN_SQRT_2PI};
use crate::summary::{GaussianMoments, PosteriorSummary, Samples};

/// Names accepted by [`flow_by_name`].
pub const FLOW_NAMES: [&str; 3] = ["diagonal_gaussian", "full_gaussian", "full_flow"];

/// Settings of the Gaussianization flow. `Default` is the reference "gggt" flow at d = 3.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FullFlowConfig {
    /// Dimension d (reference: 3).
    pub dim: usize,
    /// Gaussianization layers before the affine layer (reference: 3). The first uses the
    /// inverse-normal nonlinearity, the others the inverse sigmoid.
    pub n_gaussianization_layers: usize,
    /// Kernels per dimension in every Gaussianization layer (reference: 10).
    pub n_kernels: usize,
    /// Off-diagonal parameterisation of the final affine layer (reference: absolute).
    pub offdiagonal: OffDiagonal,
}

impl Default for FullFlowConfig {
    fn default() -> Self {
        Self {
            dim: 3,
            n_gaussianization_layers: 3,
            n_kernels: 10,
            offdiagonal: OffDiagonal::Absolute,
        }
    }
}

/// The output of [`Flow::log_prob_parts`], all differentiable.
#[derive(Debug, Clone)]
pub struct LogProbParts {
    /// `log p(x)`, `(b,)`.
    pub log_prob: Tensor,
    /// `sum_j log N(z_j; 0, 1)` at the base point, `(b,)`.
    pub log_prob_base: Tensor,
    /// Total `log|det dz/dx|`, `(b,)`.
    pub log_det: Tensor,
    /// The base point z, `(b, d)`.
    pub z: Tensor,
}

/// The point after one layer's density-direction map and the log-det accumulated so far.
#[derive(Debug, Clone)]
pub struct LayerTrace {
    /// Index of the layer in sampling order.
    pub layer_idx: usize,
    /// The point after this layer, `(b, d)`.
    pub point: Tensor,
    /// Sum of the log-dets of this layer and all later layers, `(b,)`.
    pub cumulative_log_det: Tensor,
}

/// A conditional normalizing flow; see the module documentation.
#[derive(Debug)]
pub struct Flow {
    name: String,
    dim: usize,
    layers: Vec<Box<dyn Bijector>>,
    offsets: Vec<usize>,
}

impl Flow {
    /// A flow from layers in sampling order (base -> data). All layers must share one dimension.
    pub fn new(name: impl Into<String>, layers: Vec<Box<dyn Bijector>>) -> Result<Self> {
        let name = name.into();
        let dim = match layers.first() {
            Some(l) => l.dim(),
            None => {
                return Err(FlowError::InvalidConfig(format!(
                    "flow {name} has no layers"
                )))
            }
        };
        if let Some(l) = layers.iter().find(|l| l.dim() != dim) {
            return Err(FlowError::InvalidConfig(format!(
                "flow {name}: layer {} has dim {}, expected {dim}",
                l.kind(),
                l.dim()
            )));
        }
        let mut offsets = Vec::with_capacity(layers.len() + 1);
        offsets.push(0);
        for l in &layers {
            offsets.push(offsets[offsets.len() - 1] + l.n_params());
        }
        Ok(Self {
            name,
            dim,
            layers,
            offsets,
        })
    }

    /// The flow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Dimension d of the labels.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Width P of each item's raw parameter row (6, 9 and 306 for the reference flows).
    pub fn n_params(&self) -> usize {
        self.offsets[self.layers.len()]
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The layers in sampling order.
    pub fn layers(&self) -> &[Box<dyn Bijector>] {
        &self.layers
    }

    /// Columns of the parameter row read by layer `layer_idx` (sampling order).
    pub fn param_range(&self, layer_idx: usize) -> Range<usize> {
        self.offsets[layer_idx]..self.offsets[layer_idx + 1]
    }

    fn check_inputs(&self, op: &'static str, params: &Tensor, x: &Tensor) -> Result<usize> {
        let (pd, xd) = (params.dims(), x.dims());
        if pd.len() != 2
            || xd.len() != 2
            || pd[1] != self.n_params()
            || xd[1] != self.dim
            || pd[0] != xd[0]
        {
            return Err(FlowError::Shape {
                op,
                msg: format!(
                    "{} expects params (b, {}) and points (b, {}), got {:?} and {:?}",
                    self.name,
                    self.n_params(),
                    self.dim,
                    pd,
                    xd
                ),
            });
        }
        if params.dtype() != DType::F64 || x.dtype() != DType::F64 {
            return Err(FlowError::Shape {
                op,
                msg: format!(
                    "params and points must be f64, got {:?} and {:?}",
                    params.dtype(),
                    x.dtype()
                ),
            });
        }
        Ok(pd[0])
    }

    /// Density direction through every layer, keeping each intermediate point.
    pub fn trace(&self, params: &Tensor, x: &Tensor) -> Result<Vec<LayerTrace>> {
        let b = self.check_inputs("trace", params, x)?;
        let mut point = x.clone();
        let mut total = Tensor::zeros(b, DType::F64, x.device())?;
        let mut out = Vec::with_capacity(self.layers.len());
        for (idx, layer) in self.layers.iter().enumerate().rev() {
            let r = self.param_range(idx);
            let theta = params.narrow(1, r.start, r.len())?;
            let (z, ld) = layer.to_base(&point, &theta)?;
            total = if idx + 1 == self.layers.len() {
                ld
            } else {
                total.add(&ld)?
            };
            point = z;
            out.push(LayerTrace {
                layer_idx: idx,
                point: point.clone(),
                cumulative_log_det: total.clone(),
            });
        }
        Ok(out)
    }

    /// `log p(x)` and its parts for `params: (b, P)` and `x: (b, d)`, both f64.
    pub fn log_prob_parts(&self, params: &Tensor, x: &Tensor) -> Result<LogProbParts> {
        let trace = self.trace(params, x)?;
        let last = trace
            .into_iter()
            .last()
            .ok_or_else(|| FlowError::InvalidConfig("flow has no layers".into()))?;
        let z = last.point;
        let log_det = last.cumulative_log_det;
        let log_prob_base =
            (z.sqr()?.sum(D::Minus1)? * -0.5)?.affine(1.0, -(self.dim as f64) * LN_SQRT_2PI)?;
        let log_prob = log_prob_base.add(&log_det)?;
        Ok(LogProbParts {
            log_prob,
            log_prob_base,
            log_det,
            z,
        })
    }

    /// `log p(x)`, `(b,)`, for `params: (b, P)` and `x: (b, d)`, both f64 (cast an f32 head
    /// with `to_dtype(DType::F64)`, which autograd differentiates through). Differentiable with
    /// respect to both through candle autograd.
    pub fn log_prob(&self, params: &Tensor, x: &Tensor) -> Result<Tensor> {
        Ok(self.log_prob_parts(params, x)?.log_prob)
    }

    /// Sampling direction for one base point per item: `z: (b, d)` -> `x: (b, d)` (f64, not
    /// differentiable).
    pub fn from_base(&self, params: &Tensor, z: &Tensor) -> Result<Tensor> {
        let b = self.check_inputs("from_base", params, z)?;
        let rows = params.flatten_all()?.to_vec1::<f64>()?;
        let mut pts = z.flatten_all()?.to_vec1::<f64>()?;
        self.push_from_base(&rows, &mut pts, 1)?;
        Ok(Tensor::from_vec(pts, (b, self.dim), z.device())?)
    }

    /// Pushes `n_per_item` base points per item (stored `(b, n, d)`) through every layer in
    /// sampling order, in parallel over items.
    fn push_from_base(&self, rows: &[f64], pts: &mut [f64], n_per_item: usize) -> Result<()> {
        let p = self.n_params();
        let w = n_per_item * self.dim;
        if w == 0 {
            return Ok(());
        }
        pts.par_chunks_mut(w)
            .zip(rows.par_chunks(p.max(1)))
            .enumerate()
            .try_for_each(|(item, (chunk, row))| {
                for (idx, layer) in self.layers.iter().enumerate() {
                    layer
                        .from_base_points(&row[self.param_range(idx)], chunk)
                        .map_err(|e| match e {
                            FlowError::NonFinite { op, value, .. } => {
                                FlowError::NonFinite { op, value, item }
                            }
                            other => other,
                        })?;
                }
                Ok(())
            })
    }

    /// Draws `n_per_item` samples for each item of `params: (b, P)` (any float dtype; computed
    /// in f64). Base draws come from `rng` in item order, so the same seed gives the same
    /// samples regardless of the thread count.
    pub fn sample<R: Rng + ?Sized>(
        &self,
        params: &Tensor,
        n_per_item: usize,
        rng: &mut R,
    ) -> Result<Samples> {
        let rows = self.sample_rows("sample", params)?;
        let b = rows.len() / self.n_params().max(1);
        let values: Vec<f64> = (0..b * n_per_item * self.dim)
            .map(|_| rng.sample(StandardNormal))
            .collect();
        self.samples_from_base(rows, values, b, n_per_item)
    }

    /// [`Flow::sample`] with item `i`'s base draws taken from `rngs[i]` alone, so that an item's
    /// samples do not depend on which other items share its batch (one generator per star, keyed
    /// by the star's row, lets a survey be predicted in any slicing with the same result).
    pub fn sample_per_item<R: Rng>(
        &self,
        params: &Tensor,
        n_per_item: usize,
        rngs: &mut [R],
    ) -> Result<Samples> {
        let rows = self.sample_rows("sample_per_item", params)?;
        let b = rows.len() / self.n_params().max(1);
        if rngs.len() != b {
            return Err(FlowError::Shape {
                op: "sample_per_item",
                msg: format!("{b} items but {} generators", rngs.len()),
            });
        }
        let per_item = n_per_item * self.dim;
        let values: Vec<f64> = rngs
            .iter_mut()
            .flat_map(|rng| {
                (0..per_item)
                    .map(|_| rng.sample::<f64, _>(StandardNormal))
                    .collect::<Vec<_>>()
            })
            .collect();
        self.samples_from_base(rows, values, b, n_per_item)
    }

    /// The parameter rows `(b, P)` as f64, after checking the shape.
    fn sample_rows(&self, op: &'static str, params: &Tensor) -> Result<Vec<f64>> {
        let dims = params.dims();
        if dims.len() != 2 || dims[1] != self.n_params() {
            return Err(FlowError::Shape {
                op,
                msg: format!(
                    "{} expects params (b, {}), got {:?}",
                    self.name,
                    self.n_params(),
                    dims
                ),
            });
        }
        Ok(params
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    }

    /// Pushes base draws `(b, n, d)` through the flow into [`Samples`].
    fn samples_from_base(
        &self,
        rows: Vec<f64>,
        mut values: Vec<f64>,
        b: usize,
        n_per_item: usize,
    ) -> Result<Samples> {
        self.push_from_base(&rows, &mut values, n_per_item)?;
        Ok(Samples {
            n_items: b,
            n_per_item,
            dim: self.dim,
            values,
        })
    }

    /// [`Flow::sample`] with a ChaCha8 generator seeded by `seed`: the same seed always gives
    /// the same samples, on any machine and thread count.
    pub fn sample_seeded(&self, params: &Tensor, n_per_item: usize, seed: u64) -> Result<Samples> {
        self.sample(
            params,
            n_per_item,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        )
    }

    /// Posterior summaries from `n_per_item` samples per item.
    pub fn summarize<R: Rng + ?Sized>(
        &self,
        params: &Tensor,
        n_per_item: usize,
        rng: &mut R,
    ) -> Result<Vec<PosteriorSummary>> {
        Ok(self.sample(params, n_per_item, rng)?.summarize())
    }

    /// Whether every posterior of this flow is a Gaussian, whose moments
    /// ([`Flow::gaussian_moments`]) are exact: a single affine layer. Otherwise summaries,
    /// intervals and densities come from samples.
    pub fn is_gaussian(&self) -> bool {
        self.layers.len() == 1
    }

    /// Exact mean and covariance per item, for a flow that is a single affine layer.
    pub fn gaussian_moments(&self, params: &Tensor) -> Result<Vec<GaussianMoments>> {
        let not_gaussian = || FlowError::NotGaussian {
            op: "gaussian_moments",
            flow: self.name.clone(),
        };
        if !self.is_gaussian() {
            return Err(not_gaussian());
        }
        let dims = params.dims();
        if dims.len() != 2 || dims[1] != self.n_params() {
            return Err(FlowError::Shape {
                op: "gaussian_moments",
                msg: format!(
                    "{} expects params (b, {}), got {:?}",
                    self.name,
                    self.n_params(),
                    dims
                ),
            });
        }
        let rows = params
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        rows.chunks_exact(self.n_params())
            .map(|row| {
                let (mu, l) = self.layers[0].affine_factor(row).ok_or_else(not_gaussian)?;
                Ok(GaussianMoments::from_factor(mu, &l))
            })
            .collect()
    }
}

/// The reference `diagonal_gaussian` flow: one affine layer with a diagonal scale (2 d params).
pub fn diagonal_gaussian(dim: usize) -> Result<Flow> {
    Flow::new(
        "diagonal_gaussian",
        vec![Box::new(AffineLayer::new(dim, CovType::Diagonal)?)],
    )
}

/// The reference `full_gaussian` flow: one affine layer with a lower-triangular scale.
pub fn full_gaussian(dim: usize) -> Result<Flow> {
    full_gaussian_with(dim, OffDiagonal::Absolute)
}

/// `full_gaussian` with a choice of off-diagonal parameterisation (same parameter count and
/// layout; see [`OffDiagonal`]).
pub fn full_gaussian_with(dim: usize, offdiagonal: OffDiagonal) -> Result<Flow> {
    Flow::new(
        "full_gaussian",
        vec![Box::new(AffineLayer::with_offdiagonal(
            dim,
            CovType::Full,
            offdiagonal,
        )?)],
    )
}

/// The reference `full_flow` ("gggt"): Gaussianization layers (the first with the inverse
/// normal nonlinearity) followed by a full affine layer; 306 params with the default config.
pub fn full_flow(cfg: &FullFlowConfig) -> Result<Flow> {
    let mut layers: Vec<Box<dyn Bijector>> = Vec::with_capacity(cfg.n_gaussianization_layers + 1);
    for i in 0..cfg.n_gaussianization_layers {
        let g = GaussianizationConfig {
            n_kernels: cfg.n_kernels,
            nonlinearity: if i == 0 {
                Nonlinearity::InverseNormal
            } else {
                Nonlinearity::InverseSigmoid
            },
            ..GaussianizationConfig::default()
        };
        layers.push(Box::new(GaussianizationLayer::new(cfg.dim, &g)?));
    }
    layers.push(Box::new(AffineLayer::with_offdiagonal(
        cfg.dim,
        CovType::Full,
        cfg.offdiagonal,
    )?));
    Flow::new("full_flow", layers)
}

/// One of [`FLOW_NAMES`] at dimension `dim`, with the reference settings otherwise.
pub fn flow_by_name(name: &str, dim: usize) -> Result<Flow> {
    flow_by_name_with(
        name,
        &FullFlowConfig {
            dim,
            ..FullFlowConfig::default()
        },
    )
}

/// One of [`FLOW_NAMES`] with the settings of `cfg` that it has: the dimension for all, the
/// off-diagonal form of the full-covariance layer for `full_gaussian` and `full_flow`, the
/// Gaussianization layers and kernels for `full_flow`. The one place that maps names to flows.
pub fn flow_by_name_with(name: &str, cfg: &FullFlowConfig) -> Result<Flow> {
    match name {
        "diagonal_gaussian" => diagonal_gaussian(cfg.dim),
        "full_gaussian" => full_gaussian_with(cfg.dim, cfg.offdiagonal),
        "full_flow" => full_flow(cfg),
        _ => Err(FlowError::UnknownFlow {
            name: name.to_string(),
            valid: FLOW_NAMES.join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_single_affine_flows_are_gaussian() {
        assert!(diagonal_gaussian(3).unwrap().is_gaussian());
        assert!(full_gaussian(3).unwrap().is_gaussian());
        let flow = flow_by_name("full_flow", 3).unwrap();
        assert!(!flow.is_gaussian());
        let params =
            Tensor::zeros((2, flow.n_params()), DType::F64, &candle_core::Device::Cpu).unwrap();
        assert!(flow.gaussian_moments(&params).is_err());
    }
}
