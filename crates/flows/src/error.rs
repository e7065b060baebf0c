//! The crate's single error type, so callers match on what went wrong instead of parsing text.

/// Everything that can fail in `starflow-flows`.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// An error from a candle tensor operation.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A flow name that is not one of the known flows.
    #[error("unknown flow {name:?}, expected one of: {valid}")]
    UnknownFlow {
        /// The name that was asked for.
        name: String,
        /// The valid names, comma separated.
        valid: String,
    },
    /// A tensor or slice with the wrong shape for the operation.
    #[error("{op}: {msg}")]
    Shape {
        /// The operation that rejected its input.
        op: &'static str,
        /// What was expected and what was given.
        msg: String,
    },
    /// A configuration that cannot build a flow (zero dimension, zero kernels, bad bounds).
    #[error("invalid flow configuration: {0}")]
    InvalidConfig(String),
    /// An analytic result asked of a flow that has none (moments of a non-Gaussian flow).
    #[error("{op} needs a Gaussian flow (a single affine layer), {flow} is not one")]
    NotGaussian {
        /// The operation asked for.
        op: &'static str,
        /// The flow's name.
        flow: String,
    },
    /// A non-finite value where the sampler needs a finite one.
    #[error("{op}: non-finite value {value} at item {item}")]
    NonFinite {
        /// The operation that met the value.
        op: &'static str,
        /// The offending value.
        value: f64,
        /// The item (star) index.
        item: usize,
    },
}

/// Shorthand for results in this crate.
pub type Result<T> = std::result::Result<T, FlowError>;
