//! A whole backbone block, `AvgPool(Dropout(BatchNorm(ReLU(conv1d(x) + bias))))`, as one candle `CustomOp3`.
//!
//! Why: candle's autograd accumulates every gradient as `zeros_like(t) + g`, two extra passes and a fresh
//! allocation per tensor. Fusing the convolution with its element-wise block keeps the pre-activation `z`
//! (the network's largest tensors) out of candle's graph: the op saves `z` itself and its backward hands
//! the block's `dz` straight to the convolution kernels. Arguments are `x (b, c_in, l)`, `w (c_out, c_in, k)`
//! and the per-channel parameters packed as `[bias | γ | β]` (`3 c_out`, or `c_out` without BatchNorm; the
//! packing is a `cat` whose own backward splits the gradient). The kernels are those of [`super::conv1d`]
//! and [`super::block`].

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::block::{block_op, check, BatchStats, BlockNorm, BlockOp, DropoutMask};
use super::conv1d::{conv_bwd_input, conv_bwd_weight, conv_fwd, dims, Dims};
use super::{contiguous_slice, with_cpu_slice, Elem};

struct ConvBlockOp {
    block: BlockOp,
    c_out: usize,
    /// Whether the forward keeps `z` (false when no argument tracks gradients: pure inference).
    save_z: bool,
    /// The convolution output `z`, saved by the forward for the backward.
    z: Mutex<Option<CpuStorage>>,
}

impl ConvBlockOp {
    fn dims(&self, x: &Shape, w: &Shape) -> Result<Dims> {
        dims(x, w, &Shape::from(self.c_out))
    }

    fn fwd<T: Elem>(&self, x: &[T], w: &[T], params: &[T], d: Dims) -> (Vec<T>, Vec<T>) {
        fused_fwd(&self.block, x, w, params, d)
    }

    fn bwd_typed<T: Elem>(
        &self,
        x: &Tensor,
        w: &Tensor,
        params: &Tensor,
        gout: &Tensor,
        z: &[T],
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "starflow-conv-block backward";
        let d = self.dims(x.shape(), w.shape())?;
        let (dz, dgamma, dbeta) = with_cpu_slice::<T, _>(op, params, |ps| {
            with_cpu_slice::<T, _>(op, gout, |gos| {
                Ok(fused_bwd_block(&self.block, ps, gos, z, d))
            })
        })?;
        let (dx, dw, dparams) = with_cpu_slice::<T, _>(op, x, |xs| {
            with_cpu_slice::<T, _>(op, w, |ws| {
                Ok(fused_bwd_conv(
                    xs,
                    ws,
                    &dz,
                    (dgamma, dbeta),
                    d,
                    x.track_op(),
                ))
            })
        })?;
        let dev = x.device();
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(dparams, params.shape(), dev)?),
        ))
    }
}

/// A fused block's forward on contiguous data, with its per-channel parameters packed as the op
/// takes them (`[bias | γ | β]`, or the bias alone without BatchNorm): returns `(out, z)`. Shared
/// by [`conv_block`] and the training trunk ([`super::trunk`]).
pub(crate) fn fused_fwd<T: Elem>(
    block: &BlockOp,
    x: &[T],
    w: &[T],
    params: &[T],
    d: Dims,
) -> (Vec<T>, Vec<T>) {
    let c = d.c_out;
    let z = conv_fwd(x, w, &params[..c], d);
    let ones = vec![T::of(1.0); c];
    let zeros = vec![T::of(0.0); c];
    let (gamma, beta) = if block.has_norm() {
        (&params[c..2 * c], &params[2 * c..3 * c])
    } else {
        (&ones[..], &zeros[..])
    };
    let out = block.fwd(&z, gamma, beta, c, d.l_out());
    (out, z)
}

/// The first half of a fused block's backward: through its element-wise part to `(dz, dγ, dβ)`
/// (the last two empty without BatchNorm). Split from [`fused_bwd_conv`] so that the trunk can
/// free the output gradient before the convolution's gradients are allocated.
pub(crate) fn fused_bwd_block<T: Elem>(
    block: &BlockOp,
    params: &[T],
    gout: &[T],
    z: &[T],
    d: Dims,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let c = d.c_out;
    let ones = vec![T::of(1.0); c];
    let gamma = if block.has_norm() {
        &params[c..2 * c]
    } else {
        &ones[..]
    };
    block.bwd(z, gamma, gout, c, d.l_out())
}

/// The second half: from `dz` through the convolution to the input gradient (when `want_dx`), the
/// weight gradient and the packed parameters' gradient `[db | dγ | dβ]`.
pub(crate) fn fused_bwd_conv<T: Elem>(
    x: &[T],
    w: &[T],
    dz: &[T],
    (dgamma, dbeta): (Vec<T>, Vec<T>),
    d: Dims,
    want_dx: bool,
) -> (Option<Vec<T>>, Vec<T>, Vec<T>) {
    let (dw, mut dparams) = conv_bwd_weight(x, dz, d);
    let dx = want_dx.then(|| conv_bwd_input(w, dz, d));
    dparams.extend(dgamma);
    dparams.extend(dbeta);
    (dx, dw, dparams)
}

impl Drop for ConvBlockOp {
    fn drop(&mut self) {
        let z = self.z.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(CpuStorage::F32(z)) = z {
            super::pool::give(z);
        }
    }
}

impl CustomOp3 for ConvBlockOp {
    fn name(&self) -> &'static str {
        "starflow-conv-block"
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
        let d = self.dims(l1.shape(), l2.shape())?;
        let op = self.name();
        let (out, z) = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (out, z) = self.fwd::<f32>(
                    contiguous_slice(op, s1, l1)?,
                    contiguous_slice(op, s2, l2)?,
                    contiguous_slice(op, s3, l3)?,
                    d,
                );
                (CpuStorage::F32(out), CpuStorage::F32(z))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (out, z) = self.fwd::<f64>(
                    contiguous_slice(op, s1, l1)?,
                    contiguous_slice(op, s2, l2)?,
                    contiguous_slice(op, s3, l3)?,
                    d,
                );
                (CpuStorage::F64(out), CpuStorage::F64(z))
            }
            _ => bail!(
                "{op}: expected f32 or f64 inputs of one dtype, got {:?}",
                s1.dtype()
            ),
        };
        let l_pool = self.block.out_len(d.l_out());
        if self.save_z {
            *self.z.lock().unwrap_or_else(|e| e.into_inner()) = Some(z);
        } else if let CpuStorage::F32(z) = z {
            super::pool::give(z);
        }
        Ok((out, Shape::from((d.b, d.c_out, l_pool))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.z.lock().unwrap_or_else(|e| e.into_inner());
        let Some(z) = saved.as_ref() else {
            bail!("starflow-conv-block: backward before forward");
        };
        match (z, x.dtype()) {
            (CpuStorage::F32(z), DType::F32) => self.bwd_typed::<f32>(x, w, params, grad_res, z),
            (CpuStorage::F64(z), DType::F64) => self.bwd_typed::<f64>(x, w, params, grad_res, z),
            _ => bail!("starflow-conv-block: backward expects f32 or f64"),
        }
    }
}

/// One fused block: valid conv1d of `x (b, c_in, l)` with `w (c_out, c_in, k)` and `bias (c_out)`, then
/// [`super::block::fused_block`]'s ReLU/BatchNorm/Dropout/AvgPool, as one op with a hand-written backward
/// to `x`, `w`, `bias`, γ and β. CPU only (f32/f64). Returns the batch statistics with
/// [`BlockNorm::Batch`]. When no argument tracks gradients (weights loaded as plain tensors, inference), the
/// pre-activation is not kept and no graph node is recorded.
pub fn conv_block(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    norm: BlockNorm,
    dropout: Option<&DropoutMask>,
    relu: bool,
    pool: usize,
) -> Result<(Tensor, Option<BatchStats>)> {
    let d = dims(x.shape(), w.shape(), bias.shape())?;
    check((d.b, d.c_out, d.l_out()), &norm, dropout, pool)?;
    if !x.device().is_cpu() {
        bail!(
            "conv block: the fused kernel runs on the CPU only, got {:?}",
            x.device()
        );
    }
    let (block, gamma, beta) = block_op(x, d.c_out, norm, dropout, relu, pool)?;
    let params = if block.has_norm() {
        Tensor::cat(&[bias, &gamma, &beta], 0)?
    } else {
        bias.clone()
    };
    let saved = block.saved.clone();
    let save_z = !super::in_inference() && (x.track_op() || w.track_op() || params.track_op());
    let op = ConvBlockOp {
        block,
        c_out: d.c_out,
        save_z,
        z: Mutex::new(None),
    };
    let (x, w, params) = (x.contiguous()?, w.contiguous()?, params.contiguous()?);
    let out = if save_z {
        x.apply_op3(&w, &params, op)?
    } else {
        x.apply_op3_no_bwd(&w, &params, &op)?
    };
    let stats = saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok((out, stats))
}

/// The same block from candle's stock ops: [`super::conv1d::conv1d_reference`] then
/// [`super::block::fused_block_reference`] (any device; speed comparison only on the CPU, where candle
/// 0.11.1's conv1d backward is wrong).
pub fn conv_block_reference(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    norm: BlockNorm,
    dropout: Option<&DropoutMask>,
    relu: bool,
    pool: usize,
) -> Result<(Tensor, Option<BatchStats>)> {
    let z = super::conv1d::conv1d_reference(x, w, bias)?;
    super::block::fused_block_reference(&z, norm, dropout, relu, pool)
}
