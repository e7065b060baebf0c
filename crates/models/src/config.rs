//! Backbone configuration: one `Copy` struct holding everything a backbone constructor needs, so that the
//! training crate can build any backbone from a name string plus this value.

/// Which implementation of the convolution and element-wise blocks a backbone runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputePath {
    /// Fused custom CPU kernels (im2col + `gemm`, fused ReLU/BatchNorm/Dropout/AvgPool) on the CPU for f32 and
    /// f64; candle's stock ops on CUDA/Metal and for other dtypes. This is the only path whose CPU gradients
    /// are correct.
    #[default]
    Fast,
    /// candle's stock ops on every device. **Speed comparison only on the CPU: candle 0.11.1's CPU conv1d
    /// backward is wrong** (weight gradient off for batch > 1, input gradient off for 1 or 3 input channels;
    /// see `tests/candle_bug.rs`). Correct on CUDA/Metal.
    Stock,
}

/// Momentum of the BatchNorm running statistics (PyTorch semantics: `new = (1 - m) old + m batch`).
pub const BN_MOMENTUM: f64 = 0.1;
/// Variance epsilon of every BatchNorm layer (PyTorch's default).
pub const BN_EPS: f64 = 1e-5;

/// Configuration of a backbone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackboneConfig {
    /// Width of the output, the flow's parameter vector `P`.
    pub n_params: usize,
    /// Number of pixels of the input spectrum `(b, 1, input_len)`.
    pub input_len: usize,
    /// Base dropout probability (the reference uses 0.1; TinyCNN's last two blocks use twice this).
    pub dropout: f64,
    /// Fast fused CPU kernels or candle's stock ops.
    pub path: ComputePath,
    /// Seed of the generator that draws the dropout masks (same seed, same masks).
    pub seed: u64,
}

impl BackboneConfig {
    /// A configuration with the reference's dropout (0.1), the fast path and seed 0.
    pub fn new(n_params: usize, input_len: usize) -> Self {
        Self {
            n_params,
            input_len,
            dropout: 0.1,
            path: ComputePath::Fast,
            seed: 0,
        }
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        if self.n_params == 0 {
            return Err(crate::ModelError::InvalidConfig(
                "n_params must be positive".into(),
            ));
        }
        if !(0.0..0.5).contains(&self.dropout) {
            return Err(crate::ModelError::InvalidConfig(format!(
                "dropout must lie in [0, 0.5), got {}",
                self.dropout
            )));
        }
        Ok(())
    }
}
