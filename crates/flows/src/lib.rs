//! Conditional normalizing flows over the stellar labels (t_eff, log_g, fe_h).
//!
//! This crate turns the raw parameter vector a backbone emits for each star into a probability
//! distribution: bijectors with their log |det J|, `log_prob`, sampling and posterior summaries.
//! It knows nothing of spectra, files or CNNs. The flows themselves arrive with issue #3.
