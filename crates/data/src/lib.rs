//! Data for starflow: loading, validation, normalisation, splits, batching and the synthetic
//! GALAH-like generator that is the embedded default data set.
//!
//! **Architecture invariant:** this crate knows nothing of models, flows or training. It turns files
//! into validated arrays and arrays into tensors, and it is the only crate that reads spectra files.

pub mod atomic_file;
pub mod dataset;
pub mod error;
#[cfg(feature = "hdf5")]
pub mod hdf5_input;
pub mod noise;
pub mod normalize;
pub mod npy;
pub mod split;
pub mod synth;

pub use dataset::{Dataset, FileSummary, LoadOptions, DEFAULT_TARGETS, GALAH_COLUMNS};
pub use error::{DataError, Result};
pub use noise::{log_noise_levels, noise_level};
pub use normalize::{FluxTransform, LabelScaler};
pub use split::{epoch_order, Batch, Batcher, Split, SplitFractions};
pub use synth::{generate, SynthConfig, SynthData};
