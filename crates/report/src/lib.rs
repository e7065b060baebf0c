//! Reports on finished runs: denormalised metrics, calibration, plots.
//!
//! Not implemented yet (issue #6); the crate exists so that the workspace layout is fixed.
