//! CNN backbones that map a spectrum `(b, 1, n_pix)` to the flow's parameter vector `(b, n_params)`.
//!
//! This crate does no IO and knows nothing of flows beyond the width of their parameter vector.
//! The backbones and their fused CPU kernels arrive with issue #4.
