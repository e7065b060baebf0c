//! CNN backbones that map a spectrum `(b, 1, n_pix)` to the flow's parameter vector `(b, n_params)`.
//!
//! This crate does no IO and knows nothing of flows beyond the width of their parameter vector.
//!
//! - [`Backbone`] (**API boundary**): built by name with [`backbone`] (`"cnn"`, `"tiny_cnn"`) from a
//!   [`BackboneConfig`] and a `VarBuilder`; `forward_t(x, train)`.
//! - Parameters live in the `VarBuilder` under names that are also the safetensors keys. BatchNorm running
//!   statistics are stored there too (`*.running_mean`, `*.running_var`) but are buffers: hand the optimiser
//!   [`trainable_vars`] (or filter with [`is_buffer`]).
//! - Dropout masks are seeded: each training forward draws one seed per block from a `ChaCha8Rng` owned by
//!   the model (seeded with [`BackboneConfig::seed`], restarted by [`Backbone::reseed_dropout`]), and
//!   [`dropout_mask`] expands it, identically on both paths and for any thread count.
//! - On the CPU, [`ComputePath::Fast`] runs the fused kernels of [`ops`]; candle's stock ops run on other
//!   devices or with [`ComputePath::Stock`]. **candle 0.11.1's CPU conv1d backward is wrong** (pinned by
//!   `tests/candle_bug.rs`), so the stock CPU path is for speed comparisons only.
//! - Binaries that train on the CPU should call [`tune_allocator`] once at startup (glibc only).

mod alloc;
mod backbone;
mod cnn;
mod config;
mod error;
mod layers;
pub mod ops;
mod select;
mod tiny_cnn;

pub use alloc::tune_allocator;
pub use backbone::{buffer_vars, is_buffer, named_trainable_vars, trainable_vars, Backbone};
pub use cnn::{cnn_model, CnnModel};
pub use config::{BackboneConfig, ComputePath, BN_EPS, BN_MOMENTUM};
pub use error::{ModelError, Result};
pub use ops::dropout::dropout_mask;
pub use select::{backbone, BACKBONE_NAMES};
pub use tiny_cnn::{tiny_cnn, TinyCnn};
