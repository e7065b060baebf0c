//! A backbone's whole convolutional trunk in training, as one candle `CustomOp3`.
//!
//! Why: candle's autograd accumulates every gradient it hands back as `zeros_like(t) + g`. For the
//! fused blocks ([`super::conv_block`]) that is the input gradient of every block after the first:
//! a fresh zeroed tensor and an add over the network's largest activations (at TinyCNN's shapes,
//! 134 MB each), ~6 % of a training step. Run as one op, the blocks hand their input gradients to
//! each other directly; candle sees only the spectrum, all the trunk's weights packed into one flat
//! tensor and all its per-channel parameters packed into another (`cat`, whose own backward splits
//! the gradients, as for the single block's `[bias | γ | β]`).
//!
//! The kernels and their order are exactly those of the chained [`super::conv_block::conv_block`]
//! calls, so the output and every gradient are the same numbers (`trunk_equals_the_chained_blocks`).
//! It covers training only (BatchNorm on the batch's statistics, or none); evaluation keeps the
//! per-block ops, which record no graph.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::block::{block_op, check, BatchStats, BlockNorm, BlockOp, DropoutMask};
use super::conv1d::{dims, Dims};
use super::conv_block::{fused_bwd_block, fused_bwd_conv, fused_fwd};
use super::{contiguous_slice, with_cpu_slice, Elem};

/// One block of the trunk: its convolution weights, its bias, the block's BatchNorm (the batch's
/// statistics, or none), dropout, ReLU and pool window (the whole length for a global pool).
pub struct TrunkStage<'a> {
    pub w: &'a Tensor,
    pub bias: &'a Tensor,
    pub norm: BlockNorm<'a>,
    pub dropout: Option<&'a DropoutMask>,
    pub relu: bool,
    pub pool: usize,
}

/// A stage as the op runs it: its element-wise op, its shapes and its parameters' lengths.
struct Stage {
    block: BlockOp,
    d: Dims,
    /// Parameters of the stage in the packed tensor: `c_out` (bias) or `3 c_out` (bias, γ, β).
    n_params: usize,
}

impl Stage {
    fn n_weights(&self) -> usize {
        self.d.c_out * self.d.c_in * self.d.k
    }
}

/// What the forward keeps for the backward: every stage's input but the first (the op's own
/// argument) and every stage's pre-activation `z`.
struct Saved<T> {
    inputs: Vec<Vec<T>>,
    zs: Vec<Vec<T>>,
}

enum SavedAny {
    F32(Saved<f32>),
    F64(Saved<f64>),
}

struct TrunkOp {
    stages: Vec<Stage>,
    saved: Mutex<Option<SavedAny>>,
}

impl TrunkOp {
    /// Runs the stages in order; returns the output and what the backward needs.
    fn fwd<T: Elem>(&self, x: &[T], w: &[T], p: &[T]) -> (Vec<T>, Saved<T>) {
        let mut saved = Saved {
            inputs: Vec::with_capacity(self.stages.len()),
            zs: Vec::with_capacity(self.stages.len()),
        };
        let (mut w_at, mut p_at) = (0, 0);
        let mut h: Option<Vec<T>> = None;
        for stage in &self.stages {
            let ws = &w[w_at..w_at + stage.n_weights()];
            let ps = &p[p_at..p_at + stage.n_params];
            let input = h.as_deref().unwrap_or(x);
            let (out, z) = fused_fwd(&stage.block, input, ws, ps, stage.d);
            saved.zs.push(z);
            if let Some(prev) = h.replace(out) {
                saved.inputs.push(prev);
            }
            w_at += stage.n_weights();
            p_at += stage.n_params;
        }
        (h.unwrap_or_else(|| x.to_vec()), saved)
    }

    /// Runs the stages' backwards in reverse; returns the gradients of `x` (when `want_dx`), of the
    /// packed weights and of the packed parameters.
    fn bwd<T: Elem>(
        &self,
        x: &[T],
        w: &[T],
        p: &[T],
        gout: &[T],
        saved: &Saved<T>,
        want_dx: bool,
    ) -> (Option<Vec<T>>, Vec<T>, Vec<T>) {
        let mut dw = vec![T::of(0.0); w.len()];
        let mut dp = vec![T::of(0.0); p.len()];
        let (mut w_at, mut p_at) = (w.len(), p.len());
        let mut g: Option<Vec<T>> = None;
        for (k, stage) in self.stages.iter().enumerate().rev() {
            w_at -= stage.n_weights();
            p_at -= stage.n_params;
            let ws = &w[w_at..w_at + stage.n_weights()];
            let ps = &p[p_at..p_at + stage.n_params];
            // The output gradient is freed as soon as the block's element-wise backward has read it.
            let grad = g.take();
            let gout = grad.as_deref().unwrap_or(gout);
            let (dz, dgamma, dbeta) =
                fused_bwd_block(&stage.block, ps, gout, &saved.zs[k], stage.d);
            drop(grad);
            let input = if k == 0 { x } else { &saved.inputs[k - 1] };
            let want = k > 0 || want_dx;
            let (dx, dwk, dpk) = fused_bwd_conv(input, ws, &dz, (dgamma, dbeta), stage.d, want);
            dw[w_at..w_at + stage.n_weights()].copy_from_slice(&dwk);
            dp[p_at..p_at + stage.n_params].copy_from_slice(&dpk);
            g = dx;
        }
        (g, dw, dp)
    }
}

impl Drop for TrunkOp {
    fn drop(&mut self) {
        let saved = self
            .saved
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(SavedAny::F32(s)) = saved {
            s.zs.into_iter().for_each(super::pool::give);
        }
    }
}

impl CustomOp3 for TrunkOp {
    fn name(&self) -> &'static str {
        "starflow-conv-trunk"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (out, saved) = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (out, saved) = self.fwd::<f32>(
                    contiguous_slice(op, s1, l1)?,
                    contiguous_slice(op, s2, l2)?,
                    contiguous_slice(op, s3, l3)?,
                );
                (CpuStorage::F32(out), SavedAny::F32(saved))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (out, saved) = self.fwd::<f64>(
                    contiguous_slice(op, s1, l1)?,
                    contiguous_slice(op, s2, l2)?,
                    contiguous_slice(op, s3, l3)?,
                );
                (CpuStorage::F64(out), SavedAny::F64(saved))
            }
            _ => bail!(
                "{op}: expected f32 or f64 inputs of one dtype, got {:?}",
                s1.dtype()
            ),
        };
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        let last = self
            .stages
            .last()
            .map(|s| (s.d.c_out, s.block.out_len(s.d.l_out())));
        let Some((c, l)) = last else {
            bail!("{op}: a trunk needs at least one block");
        };
        Ok((out, Shape::from((self.stages[0].d.b, c, l))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "starflow-conv-trunk backward";
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let dev = x.device();
        macro_rules! typed {
            ($t:ty, $s:expr) => {{
                let (dx, dw, dp) = with_cpu_slice::<$t, _>(op, x, |xs| {
                    with_cpu_slice::<$t, _>(op, w, |ws| {
                        with_cpu_slice::<$t, _>(op, p, |ps| {
                            with_cpu_slice::<$t, _>(op, grad_res, |gs| {
                                Ok(self.bwd(xs, ws, ps, gs, $s, x.track_op()))
                            })
                        })
                    })
                })?;
                (
                    dx.map(|d| Tensor::from_vec(d, x.shape(), dev))
                        .transpose()?,
                    Some(Tensor::from_vec(dw, w.shape(), dev)?),
                    Some(Tensor::from_vec(dp, p.shape(), dev)?),
                )
            }};
        }
        Ok(match (saved.as_ref(), x.dtype()) {
            (Some(SavedAny::F32(s)), DType::F32) => typed!(f32, s),
            (Some(SavedAny::F64(s)), DType::F64) => typed!(f64, s),
            (None, _) => bail!("{op}: backward before forward"),
            _ => bail!("{op}: expects f32 or f64"),
        })
    }
}

/// The chained fused blocks `stages` on `x (b, c_in, l)` as one op with a hand-written backward (see
/// the module doc); CPU only (f32/f64), training only (`BlockNorm::Batch` or `None`). Returns the
/// output and each stage's batch statistics (`Some` with BatchNorm), for the running-statistics update
/// that the caller owns.
pub fn conv_trunk(x: &Tensor, stages: &[TrunkStage]) -> Result<(Tensor, Vec<Option<BatchStats>>)> {
    if !x.device().is_cpu() {
        bail!(
            "conv trunk: the fused kernels run on the CPU only, got {:?}",
            x.device()
        );
    }
    if stages.is_empty() {
        bail!("conv trunk: needs at least one block");
    }
    let mut shape = x.shape().clone();
    let (mut ops, mut weights, mut params) = (vec![], vec![], vec![]);
    for s in stages {
        if matches!(s.norm, BlockNorm::Running { .. }) {
            bail!("conv trunk: training only (BatchNorm on the batch), got running statistics");
        }
        let d = dims(&shape, s.w.shape(), s.bias.shape())?;
        check((d.b, d.c_out, d.l_out()), &s.norm, s.dropout, s.pool)?;
        let has_norm = !matches!(s.norm, BlockNorm::None);
        let (block, gamma, beta) = block_op(x, d.c_out, s.norm, s.dropout, s.relu, s.pool)?;
        shape = Shape::from((d.b, d.c_out, block.out_len(d.l_out())));
        params.push(if has_norm {
            Tensor::cat(&[s.bias, &gamma, &beta], 0)?
        } else {
            s.bias.clone()
        });
        weights.push(s.w.flatten_all()?);
        let n_params = if has_norm { 3 * d.c_out } else { d.c_out };
        ops.push(Stage { block, d, n_params });
    }
    let stats: Vec<Arc<Mutex<Option<BatchStats>>>> =
        ops.iter().map(|s| s.block.saved.clone()).collect();
    let op = TrunkOp {
        stages: ops,
        saved: Mutex::new(None),
    };
    let w = Tensor::cat(&weights, 0)?.contiguous()?;
    let p = Tensor::cat(&params, 0)?.contiguous()?;
    let out = x.contiguous()?.apply_op3(&w, &p, op)?;
    let stats = stats
        .iter()
        .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect();
    Ok((out, stats))
}
