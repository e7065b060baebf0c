//! The crate's error type: constructors and configuration checks return [`ModelError`], so that callers
//! can tell a bad configuration (unknown backbone name, spectrum too short) from a tensor failure.

/// Errors raised while building or running a backbone.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The backbone name in a configuration is not one this crate knows.
    #[error("unknown backbone {name:?}, valid names are {valid:?}")]
    UnknownBackbone {
        name: String,
        valid: &'static [&'static str],
    },
    /// The configured spectrum is too short for the backbone's convolution and pooling stack.
    #[error(
        "backbone {backbone} needs an input length of at least {min_len} pixels, got {input_len}"
    )]
    InputTooShort {
        backbone: &'static str,
        input_len: usize,
        min_len: usize,
    },
    /// A configuration value outside its valid range.
    #[error("invalid backbone configuration: {0}")]
    InvalidConfig(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this crate's constructors.
pub type Result<T> = std::result::Result<T, ModelError>;
