//! Training: composes a backbone and a flow, minimises the negative log-likelihood, checkpoints.
//!
//! Not implemented yet (issue #5); the crate exists so that the workspace layout is fixed.
