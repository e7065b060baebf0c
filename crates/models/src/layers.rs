//! The convolutional block shared by both backbones, `conv -> [ReLU] -> [BatchNorm] -> Dropout -> AvgPool`,
//! with its two implementations (fused CPU kernels, stock candle ops) and the BatchNorm running statistics.
//!
//! BatchNorm running statistics live in the `VarBuilder` under `<bn>.running_mean` / `<bn>.running_var`, so
//! they are saved and loaded with the weights; they are updated here (PyTorch semantics: momentum 0.1,
//! unbiased batch variance) and must be excluded from the optimiser with [`crate::is_buffer`].

use std::sync::Arc;

use candle_core::{Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::config::BN_MOMENTUM;
use crate::ops::block::{BatchStats, BlockNorm, DropoutMask};
use crate::ops::conv_block::{conv_block, conv_block_reference};
use crate::ops::dropout::dropout_mask;
use crate::ops::trunk::{conv_trunk, TrunkStage};
use crate::ops::{f64_like, host_f64};

/// Pooling at the end of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pool {
    /// Average over non-overlapping windows of this width (1: no pooling).
    Window(usize),
    /// Average over the whole length (output length 1).
    Global,
}

/// Static description of one block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockSpec {
    pub c_in: usize,
    pub c_out: usize,
    pub k: usize,
    pub relu: bool,
    pub bn: bool,
    /// Dropout probability of this block.
    pub dropout: f64,
    pub pool: Pool,
    /// `VarBuilder` prefix of the convolution (`.weight`, `.bias`).
    pub conv_name: &'static str,
    /// `VarBuilder` prefix of the BatchNorm (`.weight`, `.bias`, `.running_mean`, `.running_var`).
    pub bn_name: &'static str,
}

impl BlockSpec {
    /// Output length for input length `l`, or `None` if the block cannot run on it.
    pub fn out_len(&self, l: usize) -> Option<usize> {
        let conv = l.checked_sub(self.k - 1).filter(|&v| v > 0)?;
        match self.pool {
            Pool::Global => Some(1),
            Pool::Window(w) => Some(conv / w).filter(|&v| v > 0),
        }
    }
}

#[derive(Debug)]
struct BatchNorm {
    gamma: Tensor,
    beta: Tensor,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let gamma = vb.get_with_hints(c, "weight", Init::Const(1.0))?;
        let beta = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
        let running_mean = vb.get_with_hints(c, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(c, "running_var", Init::Const(1.0))?;
        Ok(Self {
            gamma,
            beta,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
        })
    }

    /// PyTorch's update: `running = (1 - m) running + m batch`, with the unbiased batch variance.
    fn update(&self, stats: &BatchStats) -> Result<()> {
        let m = BN_MOMENTUM;
        let unbias = if stats.n > 1 {
            stats.n as f64 / (stats.n - 1) as f64
        } else {
            1.0
        };
        let rm = host_f64(self.running_mean.as_tensor())?;
        let rv = host_f64(self.running_var.as_tensor())?;
        let new_mean: Vec<f64> = rm
            .iter()
            .zip(&stats.mean)
            .map(|(r, b)| (1.0 - m) * r + m * b)
            .collect();
        let new_var: Vec<f64> = rv
            .iter()
            .zip(&stats.var)
            .map(|(r, b)| (1.0 - m) * r + m * b * unbias)
            .collect();
        let like = self.running_mean.as_tensor();
        self.running_mean
            .set(&f64_like(new_mean, &[rm.len()], like)?)?;
        self.running_var
            .set(&f64_like(new_var, &[rv.len()], like)?)?;
        Ok(())
    }
}

/// One convolutional block with its parameters.
#[derive(Debug)]
pub(crate) struct Block {
    spec: BlockSpec,
    weight: Tensor,
    bias: Tensor,
    bn: Option<BatchNorm>,
}

impl Block {
    pub fn new(spec: BlockSpec, vb: &VarBuilder) -> Result<Self> {
        let fan_in = (spec.c_in * spec.k) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let cvb = vb.pp(spec.conv_name);
        let weight = cvb.get_with_hints((spec.c_out, spec.c_in, spec.k), "weight", init)?;
        let bias = cvb.get_with_hints(spec.c_out, "bias", init)?;
        let bn = if spec.bn {
            Some(BatchNorm::new(spec.c_out, vb.pp(spec.bn_name))?)
        } else {
            None
        };
        Ok(Self {
            spec,
            weight,
            bias,
            bn,
        })
    }

    pub fn spec(&self) -> &BlockSpec {
        &self.spec
    }

    /// The dropout mask of the block's output `(b, c_out, l)` in training mode (`None` without
    /// dropout or outside training).
    fn dropout(&self, b: usize, l: usize, train: bool, seed: Option<u64>) -> Option<DropoutMask> {
        match seed {
            Some(seed) if train && self.spec.dropout > 0.0 => Some(DropoutMask {
                mask: Arc::new(dropout_mask(
                    seed,
                    b * self.spec.c_out,
                    l,
                    self.spec.dropout,
                )),
                p: self.spec.dropout,
            }),
            _ => None,
        }
    }

    /// The pool window for a convolution output of length `l`.
    fn pool(&self, l: usize) -> usize {
        match self.spec.pool {
            Pool::Window(w) => w,
            Pool::Global => l,
        }
    }

    /// Takes this batch's statistics into the running ones (BatchNorm in training only).
    fn update_running(&self, stats: Option<BatchStats>) -> Result<()> {
        match (&self.bn, stats) {
            (Some(bn), Some(stats)) => bn.update(&stats),
            _ => Ok(()),
        }
    }

    /// Runs the block on `x (b, c_in, l)`; `dropout_seed` is `Some` in training mode.
    pub fn forward(
        &self,
        x: &Tensor,
        train: bool,
        fast: bool,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let (b, _, l_in) = x.dims3()?;
        let l = l_in + 1 - self.spec.k;
        let dropout = self.dropout(b, l, train, dropout_seed);
        let running_mean;
        let running_var;
        let norm = match &self.bn {
            None => BlockNorm::None,
            Some(bn) if train => BlockNorm::Batch {
                gamma: &bn.gamma,
                beta: &bn.beta,
            },
            Some(bn) => {
                running_mean = bn.running_mean.as_tensor().detach();
                running_var = bn.running_var.as_tensor().detach();
                BlockNorm::Running {
                    gamma: &bn.gamma,
                    beta: &bn.beta,
                    mean: &running_mean,
                    var: &running_var,
                }
            }
        };
        let block = if fast {
            conv_block
        } else {
            conv_block_reference
        };
        let (y, stats) = block(
            x,
            &self.weight,
            &self.bias,
            norm,
            dropout.as_ref(),
            self.spec.relu,
            self.pool(l),
        )?;
        self.update_running(stats)?;
        Ok(y)
    }
}

/// Runs `blocks` in training mode as one fused trunk op ([`conv_trunk`]): the same numbers as
/// chaining [`Block::forward`] on the fast path, without candle's per-block gradient accumulation.
/// `seeds` are the blocks' dropout seeds.
pub(crate) fn train_trunk(blocks: &[Block], seeds: &[Option<u64>], x: &Tensor) -> Result<Tensor> {
    let (b, _, mut l_in) = x.dims3()?;
    let mut parts = Vec::with_capacity(blocks.len());
    for (block, seed) in blocks.iter().zip(seeds) {
        let l = (l_in + 1).saturating_sub(block.spec.k);
        parts.push((block.dropout(b, l, true, *seed), block.pool(l)));
        l_in = block.spec.out_len(l_in).unwrap_or(0);
    }
    let stages: Vec<TrunkStage> = blocks
        .iter()
        .zip(&parts)
        .map(|(block, (dropout, pool))| TrunkStage {
            w: &block.weight,
            bias: &block.bias,
            norm: match &block.bn {
                None => BlockNorm::None,
                Some(bn) => BlockNorm::Batch {
                    gamma: &bn.gamma,
                    beta: &bn.beta,
                },
            },
            dropout: dropout.as_ref(),
            relu: block.spec.relu,
            pool: *pool,
        })
        .collect();
    let (y, stats) = conv_trunk(x, &stages)?;
    for (block, stats) in blocks.iter().zip(stats) {
        block.update_running(stats)?;
    }
    Ok(y)
}
