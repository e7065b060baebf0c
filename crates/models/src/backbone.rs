//! The [`Backbone`] trait, the trunk its networks share, and the split between trainable
//! parameters and BatchNorm buffers.
//!
//! **API boundary**: the training crate builds a backbone with [`crate::backbone`] from a name in
//! its config and a `VarBuilder`, calls [`Backbone::forward_t`], and hands the optimiser only
//! [`trainable_vars`].

use std::sync::Mutex;

use candle_core::{Result as CandleResult, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{BackboneConfig, ComputePath};
use crate::layers::{Block, BlockSpec};
use crate::{ModelError, Result};

/// A network mapping spectra `(b, 1, input_len)` to flow parameters `(b, n_params)`.
pub trait Backbone: Send + Sync + std::fmt::Debug {
    /// The name this backbone is built by (see [`crate::BACKBONE_NAMES`]).
    fn name(&self) -> &'static str;
    /// The configuration it was built with.
    fn config(&self) -> &BackboneConfig;
    /// Forward pass; `train` selects batch statistics (and updates the running ones) and dropout.
    fn forward_t(&self, x: &Tensor, train: bool) -> CandleResult<Tensor>;
    /// Restarts the dropout generator from `seed` (for example at a resumed epoch).
    fn reseed_dropout(&self, seed: u64);
    /// Variable prefix of the final Linear layer, whose output row `k` is flow parameter `k`
    /// (`<prefix>.weight`, `<prefix>.bias`): lets a trainer initialise parts of the head.
    fn head_prefix(&self) -> &'static str;
}

/// Whether a `VarMap` name is a BatchNorm buffer (running statistics), saved with the weights but never
/// optimised or weight-decayed.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// The optimiser's variables: every variable of `varmap` except the BatchNorm buffers, sorted by name.
pub fn trainable_vars(varmap: &VarMap) -> Vec<Var> {
    named_trainable_vars(varmap)
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// [`trainable_vars`] with their names (the keys under which an optimiser saves its state).
pub fn named_trainable_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    named_vars(varmap, false)
}

/// The BatchNorm buffers of `varmap` with their names, sorted by name.
pub fn buffer_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    named_vars(varmap, true)
}

fn named_vars(varmap: &VarMap, buffers: bool) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<(String, Var)> = data
        .iter()
        .filter(|(name, _)| is_buffer(name) == buffers)
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// The convolutional trunk shared by the backbones, with the dropout generator.
#[derive(Debug)]
pub(crate) struct Trunk {
    blocks: Vec<Block>,
    path: ComputePath,
    rng: Mutex<ChaCha8Rng>,
}

impl Trunk {
    /// Builds the blocks, checking that `input_len` survives every one; returns the trunk and the
    /// output length.
    pub fn new(
        name: &'static str,
        specs: &[BlockSpec],
        cfg: &BackboneConfig,
        vb: &VarBuilder,
    ) -> Result<(Self, usize)> {
        cfg.validate()?;
        let mut l = cfg.input_len;
        for spec in specs {
            l = spec.out_len(l).ok_or(ModelError::InputTooShort {
                backbone: name,
                input_len: cfg.input_len,
                min_len: min_len(specs),
            })?;
        }
        let blocks = specs
            .iter()
            .map(|s| Block::new(*s, vb))
            .collect::<CandleResult<Vec<_>>>()?;
        let trunk = Self {
            blocks,
            path: cfg.path,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(cfg.seed)),
        };
        Ok((trunk, l))
    }

    pub fn reseed(&self, seed: u64) {
        *self.rng.lock().unwrap_or_else(|e| e.into_inner()) = ChaCha8Rng::seed_from_u64(seed);
    }

    /// Runs every block. In training mode one `u64` is drawn from the generator per block, in block order,
    /// and seeds that block's mask ([`crate::dropout_mask`] with rows `(item, channel)` of the conv output).
    pub fn forward(&self, x: &Tensor, train: bool) -> CandleResult<Tensor> {
        let (_, c, _) = x.dims3()?;
        if c != 1 {
            candle_core::bail!("backbone input must be (b, 1, n_pix), got {:?}", x.shape());
        }
        // The fused kernels cover f32/f64 on the CPU; anything else takes the stock ops.
        let fast = self.path == ComputePath::Fast
            && x.device().is_cpu()
            && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64);
        let seeds: Vec<Option<u64>> = if train {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            self.blocks.iter().map(|_| Some(rng.next_u64())).collect()
        } else {
            vec![None; self.blocks.len()]
        };
        if fast && train && !crate::ops::in_inference() {
            return crate::layers::train_trunk(&self.blocks, &seeds, x);
        }
        let mut h = x.clone();
        for (block, seed) in self.blocks.iter().zip(seeds) {
            h = block.forward(&h, train, fast, seed)?;
        }
        Ok(h)
    }

    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn last_channels(&self) -> usize {
        self.blocks.last().map_or(1, |b| b.spec().c_out)
    }
}

/// Smallest input length every block accepts.
fn min_len(specs: &[BlockSpec]) -> usize {
    (1..1 << 20)
        .find(|&l0| {
            let mut l = l0;
            specs.iter().all(|s| match s.out_len(l) {
                Some(v) => {
                    l = v;
                    true
                }
                None => false,
            })
        })
        .unwrap_or(usize::MAX)
}
