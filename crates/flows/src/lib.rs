//! Conditional normalizing flows over the stellar labels (t_eff, log_g, fe_h).
//!
//! This crate turns the raw parameter vector a backbone emits for each star into a probability
//! distribution: bijectors with their log |det J|, `log_prob`, sampling and posterior summaries.
//! It is a faithful port of the three jammy_flows flows the reference uses (formulas in the
//! team's `reference/jammy_flows_math.md`, checked against golden fixtures in `tests/data`).
//!
//! **Architecture invariant:** it knows nothing of spectra, files or CNNs, and does no IO.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use starflow_flows::flow_by_name;
//! let flow = flow_by_name("full_gaussian", 3)?;
//! assert_eq!(flow.n_params(), 9);
//! let params = Tensor::zeros((2, flow.n_params()), candle_core::DType::F64, &Device::Cpu)?;
//! let x = Tensor::zeros((2, 3), candle_core::DType::F64, &Device::Cpu)?;
//! let lp = flow.log_prob(&params, &x)?; // (2,)
//! assert_eq!(lp.dims(), &[2]);
//! # Ok::<(), starflow_flows::FlowError>(())
//! ```

pub mod affine;
pub mod bijector;
pub mod error;
pub mod flow;
pub mod gaussianization;
pub mod ops;
pub mod special;
pub mod summary;

pub use affine::{AffineLayer, CovType, OffDiagonal};
pub use bijector::Bijector;
pub use error::{FlowError, Result};
pub use flow::{
    diagonal_gaussian, flow_by_name, flow_by_name_with, full_flow, full_gaussian,
    full_gaussian_with, Flow, FullFlowConfig, LayerTrace, LogProbParts, FLOW_NAMES,
};
pub use gaussianization::{GaussianizationConfig, GaussianizationLayer};
pub use special::Nonlinearity;
pub use summary::{
    quantile_sorted, summarize_points, GaussianMoments, PosteriorSummary, Samples, QUANTILE_LEVELS,
};

/// Compiles and runs the README's example as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
