//! `TinyCNN`, the reference's second backbone: conv k5 1 -> 32, k5 32 -> 32 + AvgPool 3, k5 32 -> 64 +
//! AvgPool 3, k1 64 -> 128 + AvgPool 2, k3 128 -> 128 (ReLU, BatchNorm, Dropout in each; Dropout twice the
//! base rate in the last), k1 128 -> 128 + Dropout (twice the base rate); then a Linear applied along the
//! length axis (`l_final -> 32` per channel), ReLU, flatten to `128 * 32`, Linear -> 128, ReLU, Linear ->
//! `n_params`. `l_final` is derived from the input length (907 for 16384 pixels) instead of hard-coded.
//!
//! Variable names follow the PyTorch reference's `nn.Sequential` indices (`model.0`, `model.2`, ...), so the
//! safetensors keys match a converted PyTorch state dict.
//!
//! Variants from the architecture study of issue 32 (`results/learning-curve`), same keys otherwise:
//! - `tiny_cnn_deep`: two more k3 128 -> 128 blocks (`deep.0`, `deep.1`) after the k3 block. At the
//!   same number of epochs it trained worse (held-out NLL 0.11 worse on both seeds).
//! - `tiny_cnn_readout`: 96 position templates per channel in the length-axis Linear instead of 32.
//!   At the quick grid it was no better (t_eff 15.10 against 15.05 K, same seed and stars).
//! - `tiny_cnn_pool2`: the first block pooled by 2, so everything after it runs at half the length.
//!   At full size it was worse (t_eff 13.1 against 11.8 K after 30 epochs, same host and stars).
//! - `tiny_cnn_wide`: 64 channels instead of 32 in the blocks at full and a third of the resolution.
//!   At the quick grid it was no better (log g 0.0528 against 0.0525 dex, same seed and stars).
//! - `tiny_cnn_skip`: a linear path from every input pixel to 64 features (`skip`), joined to the
//!   trunk's features before `model.28`. Why: the trunk's length-axis Linear shares 32 position
//!   templates among all channels, so which line a feature came from, and so its species, is
//!   mostly lost; a ridge regression on the pixels recovers the species' abundance offsets (held-out
//!   R^2 up to 0.74) that TinyCNN, asked for them as auxiliary targets, does not (R^2 0.01), and
//!   those offsets are what TinyCNN's log g error follows. At the quick grid: T_eff MSE -5.4 +- 2.1 %,
//!   log g -0.1 +- 1.5 %, NLL +0.28 +- 0.12 worse (same seed and stars).

use candle_core::{Result as CandleResult, Tensor};
use candle_nn::{linear, Linear, Module, VarBuilder};

use crate::backbone::{Backbone, Trunk};
use crate::config::BackboneConfig;
use crate::layers::{BlockSpec, Pool};
use crate::Result;

/// Output width of the length-axis Linear (the reference's).
const LEN_FEATURES: usize = 32;
/// Width of `tiny_cnn_skip`'s linear path from the pixels.
const SKIP_FEATURES: usize = 64;
/// Output width of the length-axis Linear in `tiny_cnn_readout`.
const READOUT_LEN_FEATURES: usize = 96;

/// The reference's TinyCNN backbone (and its variants `tiny_cnn_deep`, `tiny_cnn_readout`,
/// `tiny_cnn_pool2`, `tiny_cnn_wide`).
#[derive(Debug)]
pub struct TinyCnn {
    name: &'static str,
    cfg: BackboneConfig,
    trunk: Trunk,
    final_len: usize,
    len_features: usize,
    len_linear: Linear,
    /// `tiny_cnn_skip`'s pixels -> [`SKIP_FEATURES`] Linear.
    skip: Option<Linear>,
    linear1: Linear,
    output: Linear,
}

fn specs(p: f64) -> Vec<BlockSpec> {
    #[allow(clippy::too_many_arguments)]
    let block = |c_in, c_out, k, relu, bn, dropout, pool, conv_name, bn_name| BlockSpec {
        c_in,
        c_out,
        k,
        relu,
        bn,
        dropout,
        pool: Pool::Window(pool),
        conv_name,
        bn_name,
    };
    vec![
        block(1, 32, 5, true, true, p, 1, "model.0", "model.2"),
        block(32, 32, 5, true, true, p, 3, "model.4", "model.6"),
        block(32, 64, 5, true, true, p, 3, "model.9", "model.11"),
        block(64, 128, 1, true, true, p, 2, "model.14", "model.16"),
        block(128, 128, 3, true, true, 2.0 * p, 1, "model.19", "model.21"),
        block(128, 128, 1, false, false, 2.0 * p, 1, "model.23", ""),
    ]
}

/// TinyCNN's blocks with two more k3 128 -> 128 blocks (ReLU, BatchNorm, dropout twice the base rate,
/// no pooling) after its k3 block: more depth and a wider receptive field at the lowest resolution,
/// where a block costs ~1/18 of one at full resolution.
fn deep_specs(p: f64) -> Vec<BlockSpec> {
    let mut s = specs(p);
    let last = s.pop().expect("TinyCNN has blocks");
    for (conv_name, bn_name) in [("deep.0.conv", "deep.0.bn"), ("deep.1.conv", "deep.1.bn")] {
        s.push(BlockSpec {
            conv_name,
            bn_name,
            ..s[s.len() - 1]
        });
    }
    s.push(last);
    s
}

/// TinyCNN's blocks with the first block pooled by 2: every later block runs at half the length,
/// so a step costs 0.59x and the receptive field in wavelength doubles. The hypothesis: at the full
/// GALAH grid (4,096 px per camera) a line spans ~4 px, so TinyCNN's ~70-px receptive field covers a
/// quarter of the wavelength it covers at the quick grid. Measured, it was wrong: after 30 epochs
/// at full size t_eff was 1.3 K worse (`results/learning-curve`), so full resolution carries more.
fn pool2_specs(p: f64) -> Vec<BlockSpec> {
    let mut s = specs(p);
    s[0].pool = Pool::Window(2);
    s
}

/// TinyCNN's blocks with 64 channels instead of 32 in the three blocks before the second pooling,
/// the ones at full and a third of the resolution: ~2.4x TinyCNN's multiply-adds in a forward, ~1.6x
/// its training step measured. The hypothesis
/// (issue 32): at the full grid TinyCNN underfits. On its own 11,672 training stars its log g
/// error is 0.036 dex and flat in signal-to-noise, where the marginal CRLB of the brightest stars
/// is 0.008 (`results/learning-curve`), and halving the full-resolution blocks' work
/// (`tiny_cnn_pool2`) cost accuracy, so the lines' shapes might need more features there.
/// Screened at the quick grid (5,400 stars x 24 epochs) it was no better: log g MSE +1.0 +- 1.6 %
/// paired, with per-star errors correlating 0.96 with TinyCNN's. Not yet trained at full size.
fn wide_specs(p: f64) -> Vec<BlockSpec> {
    let mut s = specs(p);
    s[0].c_out = WIDE_CHANNELS;
    s[1].c_in = WIDE_CHANNELS;
    s[1].c_out = WIDE_CHANNELS;
    s[2].c_in = WIDE_CHANNELS;
    s
}

/// Channels of `tiny_cnn_wide`'s first three blocks (TinyCNN: 32, 32, then 64 out of the third).
const WIDE_CHANNELS: usize = 64;

/// Builds [`TinyCnn`] from `vb` (name `"tiny_cnn"` in [`crate::backbone`]).
pub fn tiny_cnn(cfg: &BackboneConfig, vb: VarBuilder) -> Result<TinyCnn> {
    build("tiny_cnn", &specs(cfg.dropout), LEN_FEATURES, cfg, vb)
}

pub fn tiny_cnn_skip(cfg: &BackboneConfig, vb: VarBuilder) -> Result<TinyCnn> {
    build_with_skip(
        "tiny_cnn_skip",
        &specs(cfg.dropout),
        LEN_FEATURES,
        SKIP_FEATURES,
        cfg,
        vb,
    )
}

/// Builds TinyCNN with a wider length-axis readout (`"tiny_cnn_readout"`): 96 position templates per
/// channel instead of 32, so that the head can weigh more line regions apart (log g is read from the
/// ratio of ionised to neutral lines at fixed wavelengths). The trunk is TinyCNN's.
pub fn tiny_cnn_readout(cfg: &BackboneConfig, vb: VarBuilder) -> Result<TinyCnn> {
    build(
        "tiny_cnn_readout",
        &specs(cfg.dropout),
        READOUT_LEN_FEATURES,
        cfg,
        vb,
    )
}

/// Builds TinyCNN with 64 channels in its first three blocks (`"tiny_cnn_wide"`), the same head.
pub fn tiny_cnn_wide(cfg: &BackboneConfig, vb: VarBuilder) -> Result<TinyCnn> {
    build(
        "tiny_cnn_wide",
        &wide_specs(cfg.dropout),
        LEN_FEATURES,
        cfg,
        vb,
    )
}

/// Builds TinyCNN with its first block pooled by 2 (`"tiny_cnn_pool2"`), the same head.
pub fn tiny_cnn_pool2(cfg: &BackboneConfig, vb: VarBuilder) -> Result<TinyCnn> {
    build(
        "tiny_cnn_pool2",
        &pool2_specs(cfg.dropout),
        LEN_FEATURES,
        cfg,
        vb,
    )
}

/// Builds the deeper TinyCNN (`"tiny_cnn_deep"`): two more k3 128 -> 128 blocks at the lowest
/// resolution, the same head.
pub fn tiny_cnn_deep(cfg: &BackboneConfig, vb: VarBuilder) -> Result<TinyCnn> {
    build(
        "tiny_cnn_deep",
        &deep_specs(cfg.dropout),
        LEN_FEATURES,
        cfg,
        vb,
    )
}

fn build(
    name: &'static str,
    specs: &[BlockSpec],
    len_features: usize,
    cfg: &BackboneConfig,
    vb: VarBuilder,
) -> Result<TinyCnn> {
    build_with_skip(name, specs, len_features, 0, cfg, vb)
}

/// [`build`] with a linear path from the pixels to `skip` features (none when 0).
fn build_with_skip(
    name: &'static str,
    specs: &[BlockSpec],
    len_features: usize,
    skip: usize,
    cfg: &BackboneConfig,
    vb: VarBuilder,
) -> Result<TinyCnn> {
    let (trunk, final_len) = Trunk::new(name, specs, cfg, &vb)?;
    let channels = trunk.last_channels();
    let skip_linear = match skip {
        0 => None,
        k => Some(linear(cfg.input_len, k, vb.pp("skip"))?),
    };
    Ok(TinyCnn {
        name,
        cfg: *cfg,
        trunk,
        final_len,
        len_features,
        len_linear: linear(final_len, len_features, vb.pp("model.25"))?,
        skip: skip_linear,
        linear1: linear(channels * len_features + skip, 128, vb.pp("model.28"))?,
        output: linear(128, cfg.n_params, vb.pp("model.30"))?,
    })
}

impl TinyCnn {
    /// Length of the trunk's output, the input width of the length-axis Linear.
    pub fn final_len(&self) -> usize {
        self.final_len
    }
}

impl Backbone for TinyCnn {
    fn name(&self) -> &'static str {
        self.name
    }

    fn config(&self) -> &BackboneConfig {
        &self.cfg
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> CandleResult<Tensor> {
        let h = self.trunk.forward(x, train)?;
        let (b, c, l) = h.dims3()?;
        let h = self
            .len_linear
            .forward(&h.reshape((b * c, l))?)?
            .relu()?
            .reshape((b, c * self.len_features))?;
        let h = match &self.skip {
            Some(skip) => {
                let pixels = x.reshape((b, x.elem_count() / b))?;
                Tensor::cat(&[h, skip.forward(&pixels)?], 1)?
            }
            None => h,
        };
        let h = self.linear1.forward(&h)?.relu()?;
        self.output.forward(&h)
    }

    fn reseed_dropout(&self, seed: u64) {
        self.trunk.reseed(seed);
    }

    fn head_prefix(&self) -> &'static str {
        "model.30"
    }
}
