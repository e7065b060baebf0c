//! `CNNModel`, the reference backbone: five conv-k3 blocks (16/32/64/64/128 channels; ReLU, BatchNorm except
//! in the fifth, Dropout, AvgPool 2), a conv-k1 128 -> 64 with Dropout, a global average pool, and an MLP
//! 64 -> 64 -> 128 -> `n_params` with ReLUs.
//!
//! Variable names follow the PyTorch reference (`conv1..conv6`, `bn1..bn4`, `linear1`, `linear2`,
//! `output_layer`), so the safetensors keys match a converted PyTorch state dict.

use candle_core::{Result as CandleResult, Tensor};
use candle_nn::{linear, Linear, Module, VarBuilder};

use crate::backbone::{Backbone, Trunk};
use crate::config::BackboneConfig;
use crate::layers::{BlockSpec, Pool};
use crate::Result;

/// The reference CNN backbone.
#[derive(Debug)]
pub struct CnnModel {
    cfg: BackboneConfig,
    trunk: Trunk,
    linear1: Linear,
    linear2: Linear,
    output: Linear,
}

fn specs(p: f64) -> Vec<BlockSpec> {
    let conv = |c_in, c_out, bn, conv_name, bn_name| BlockSpec {
        c_in,
        c_out,
        k: 3,
        relu: true,
        bn,
        dropout: p,
        pool: Pool::Window(2),
        conv_name,
        bn_name,
    };
    vec![
        conv(1, 16, true, "conv1", "bn1"),
        conv(16, 32, true, "conv2", "bn2"),
        conv(32, 64, true, "conv3", "bn3"),
        conv(64, 64, true, "conv4", "bn4"),
        conv(64, 128, false, "conv5", ""),
        BlockSpec {
            c_in: 128,
            c_out: 64,
            k: 1,
            relu: false,
            bn: false,
            dropout: p,
            pool: Pool::Global,
            conv_name: "conv6",
            bn_name: "",
        },
    ]
}

/// Builds [`CnnModel`] from `vb` (name `"cnn"` in [`crate::backbone`]).
pub fn cnn_model(cfg: &BackboneConfig, vb: VarBuilder) -> Result<CnnModel> {
    let (trunk, _) = Trunk::new("cnn", &specs(cfg.dropout), cfg, &vb)?;
    Ok(CnnModel {
        cfg: *cfg,
        trunk,
        linear1: linear(64, 64, vb.pp("linear1"))?,
        linear2: linear(64, 128, vb.pp("linear2"))?,
        output: linear(128, cfg.n_params, vb.pp("output_layer"))?,
    })
}

impl Backbone for CnnModel {
    fn name(&self) -> &'static str {
        "cnn"
    }

    fn config(&self) -> &BackboneConfig {
        &self.cfg
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> CandleResult<Tensor> {
        let h = self.trunk.forward(x, train)?;
        let b = h.dim(0)?;
        let h = h.reshape((b, self.trunk.last_channels()))?;
        let h = self.linear1.forward(&h)?.relu()?;
        let h = self.linear2.forward(&h)?.relu()?;
        self.output.forward(&h)
    }

    fn reseed_dropout(&self, seed: u64) {
        self.trunk.reseed(seed);
    }

    fn head_prefix(&self) -> &'static str {
        "output_layer"
    }
}

impl CnnModel {
    /// Number of dropout draws per training forward (one per block).
    pub fn n_dropout_layers(&self) -> usize {
        self.trunk.n_blocks()
    }
}
