//! Data: loading, validation, normalisation, splits, batching and the synthetic generator.
