//! One fused element-wise block: `AvgPool_k(Dropout(BatchNorm(ReLU(z))))` as a candle `CustomOp3`.
//!
//! Why: on the CPU the stock composition of these layers costs a dozen allocating passes over the largest
//! activations of the network; fused, the forward is at most two passes (batch statistics, then
//! normalise/mask/pool) and the backward two passes (per-channel sums, then the input gradient).
//! Each stage is optional: ReLU on/off, BatchNorm off / with batch statistics (training) / with given running
//! statistics (evaluation), a dropout keep-mask or none, pool window `k >= 1` (output length `l / k`, the
//! tail dropped as PyTorch's `AvgPool1d` does; `k = l` is a global average pool).
//!
//! Backward with batch statistics (per channel, over the `n = b l` elements, `x̂ = (r - mean) / σ`, `g` the
//! gradient at the BatchNorm output): `dβ = Σ g`, `dγ = Σ g x̂`,
//! `dr = γ / σ (g - Σ g / n - x̂ Σ g x̂ / n)`, `dz = dr [z > 0]`. Rows `(item, channel)` run in parallel;
//! per-row sums accumulate in f64.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::dropout::keep_scale;
use super::{
    assume_init, contiguous_slice, f64_like, host_f64, lane_sums, par_rows_uninit, simd_fn,
    with_cpu_slice, Elem,
};
use crate::config::BN_EPS;

/// Which BatchNorm the block applies.
#[derive(Debug, Clone, Copy)]
pub enum BlockNorm<'a> {
    /// No BatchNorm.
    None,
    /// BatchNorm with the statistics of this batch (training); gradients flow through the statistics.
    Batch { gamma: &'a Tensor, beta: &'a Tensor },
    /// BatchNorm with given (running) statistics (evaluation).
    Running {
        gamma: &'a Tensor,
        beta: &'a Tensor,
        mean: &'a Tensor,
        var: &'a Tensor,
    },
}

/// A dropout keep-mask (1 keep, 0 drop) over the block's input `(b, c, l)` and its drop probability.
#[derive(Debug, Clone)]
pub struct DropoutMask {
    pub mask: Arc<Vec<u8>>,
    pub p: f64,
}

/// Batch statistics of a block run with [`BlockNorm::Batch`]: per-channel mean and biased variance over
/// `n` elements.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub n: usize,
}

#[derive(Debug, Clone)]
pub(crate) enum Norm {
    None,
    Batch,
    Running { mean: Vec<f64>, var: Vec<f64> },
}

pub(crate) struct BlockOp {
    relu: bool,
    norm: Norm,
    mask: Option<DropoutMask>,
    pool: usize,
    pub(crate) saved: Arc<Mutex<Option<BatchStats>>>,
}

/// Per-channel `(mean, 1/σ)` of the normalisation, or `None` without BatchNorm.
type Affine = Option<(Vec<f64>, Vec<f64>)>;

impl BlockOp {
    /// Whether the block applies BatchNorm (and so has γ/β gradients).
    pub(crate) fn has_norm(&self) -> bool {
        !matches!(self.norm, Norm::None)
    }

    /// Output length for an input of length `l`.
    pub(crate) fn out_len(&self, l: usize) -> usize {
        l / self.pool
    }

    /// The per-channel normalisation used by forward and backward (`None` without BatchNorm).
    fn affine<T: Elem>(&self, z: &[T], c: usize, l: usize) -> Affine {
        let (mean, var) = match &self.norm {
            Norm::None => return None,
            Norm::Running { mean, var } => (mean.clone(), var.clone()),
            Norm::Batch => {
                let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
                let stats = match &*saved {
                    Some(s) => s.clone(),
                    None => {
                        let s = batch_stats(self, z, c, l);
                        *saved = Some(s.clone());
                        s
                    }
                };
                (stats.mean, stats.var)
            }
        };
        let inv_std = var.iter().map(|v| 1.0 / (v + BN_EPS).sqrt()).collect();
        Some((mean, inv_std))
    }
}

impl BlockOp {
    /// The forward (see the module doc), 8 lanes wide where the CPU allows.
    pub(crate) fn fwd<T: Elem>(
        &self,
        z: &[T],
        gamma: &[T],
        beta: &[T],
        c: usize,
        l: usize,
    ) -> Vec<T> {
        block_fwd(self, z, gamma, beta, c, l)
    }

    /// Returns `(dz, dγ, dβ)`; the last two are empty without BatchNorm.
    pub(crate) fn bwd<T: Elem>(
        &self,
        z: &[T],
        gamma: &[T],
        gout: &[T],
        c: usize,
        l: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        block_bwd(self, z, gamma, gout, c, l)
    }
}

simd_fn! {
fn batch_stats<T: Elem>(op: &BlockOp, z: &[T], c: usize, l: usize) -> BatchStats {
    let relu = op.relu;
    let rows: Vec<(f64, f64)> = z
        .par_chunks(l)
        .map(|row| {
            lane_sums(row.len(), |i| {
                let r = if relu { row[i].relu() } else { row[i] };
                (r, r * r)
            })
        })
        .collect();
    let n = rows.len() / c * l;
    let mut mean = vec![0f64; c];
    let mut var = vec![0f64; c];
    for (r, (s, ss)) in rows.iter().enumerate() {
        mean[r % c] += s;
        var[r % c] += ss;
    }
    for (m, v) in mean.iter_mut().zip(var.iter_mut()) {
        *m /= n as f64;
        *v = (*v / n as f64 - *m * *m).max(0.0);
    }
    BatchStats { mean, var, n }
}
}

simd_fn! {
fn block_fwd<T: Elem>(
    op: &BlockOp,
    z: &[T],
    gamma: &[T],
    beta: &[T],
    c: usize,
    l: usize,
) -> Vec<T> {
    let (pool, relu) = (op.pool, op.relu);
    let l_out = l / pool;
    let used = l_out * pool;
    let zero = T::of(0.0);
    let affine = op.affine(z, c, l);
    // y = a r + s per channel.
    let (a, s): (Vec<T>, Vec<T>) = match &affine {
        None => (vec![T::of(1.0); c], vec![zero; c]),
        Some((mean, inv_std)) => (0..c)
            .map(|ch| {
                let a = gamma[ch].to64() * inv_std[ch];
                (T::of(a), T::of(beta[ch].to64() - mean[ch] * a))
            })
            .unzip(),
    };
    let mask = op.mask.as_ref().map(|m| m.mask.as_slice());
    let scale = op.mask.as_ref().map_or(1.0, |m| keep_scale(m.p));
    let out_scale = T::of(scale / pool as f64);
    par_rows_uninit(z.len() / l, l_out, Vec::<T>::new, |buf, row, o| {
        let zr = &z[row * l..row * l + used];
        let (ar, sr) = (a[row % c], s[row % c]);
        buf.resize(used, zero);
        if relu {
            for (y, &v) in buf.iter_mut().zip(zr) {
                *y = ar * v.relu() + sr;
            }
        } else {
            for (y, &v) in buf.iter_mut().zip(zr) {
                *y = ar * v + sr;
            }
        }
        // The benchmark gate's self-test: redo 5 % of the row's affine work (same values).
        #[cfg(feature = "gate-probe-kernel")]
        for y in buf.iter_mut().take(used / 20) {
            *y = std::hint::black_box(*y * T::of(1.0));
        }
        if let Some(mask) = mask {
            for (y, &m) in buf.iter_mut().zip(&mask[row * l..row * l + used]) {
                *y *= T::of_u8(m);
            }
        }
        match pool {
            1 => {
                for (oj, &y) in o.iter_mut().zip(buf.iter()) {
                    oj.write(y * out_scale);
                }
            }
            2 => {
                for (oj, w) in o.iter_mut().zip(buf.chunks_exact(2)) {
                    oj.write((w[0] + w[1]) * out_scale);
                }
            }
            // TinyCNN's window; the same sum, in the same order, as `lane_sums` gives below.
            3 => {
                for (oj, w) in o.iter_mut().zip(buf.chunks_exact(3)) {
                    oj.write((w[0] + w[1] + w[2]) * out_scale);
                }
            }
            _ => {
                for (oj, w) in o.iter_mut().zip(buf.chunks_exact(pool)) {
                    let (sum, _) = lane_sums(pool, |i| (w[i], zero));
                    oj.write(T::of(sum) * out_scale);
                }
            }
        }
    })
}
}

simd_fn! {
/// Returns `(dz, dγ, dβ)`; the last two are empty without BatchNorm.
fn block_bwd<T: Elem>(
    op: &BlockOp,
    z: &[T],
    gamma: &[T],
    gout: &[T],
    c: usize,
    l: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (pool, relu) = (op.pool, op.relu);
    let l_out = l / pool;
    let used = l_out * pool;
    let zero = T::of(0.0);
    let affine = op.affine(z, c, l);
    let scale = op.mask.as_ref().map_or(1.0, |m| keep_scale(m.p));
    let g_scale = T::of(scale / pool as f64);
    let mask = op.mask.as_ref().map(|m| m.mask.as_slice());
    let (neg_mean, inv_std): (Vec<T>, Vec<T>) = match &affine {
        None => (vec![zero; c], vec![T::of(1.0); c]),
        Some((mean, inv_std)) => (
            mean.iter().map(|m| T::of(-m)).collect(),
            inv_std.iter().map(|v| T::of(*v)).collect(),
        ),
    };
    // Pass 1: the gradient g at the BatchNorm output, written into dz, and its per-row sums.
    let mut row_sums = vec![(0f64, 0f64); z.len() / l];
    let sums = super::SendPtr(row_sums.as_mut_ptr());
    let mut dz = par_rows_uninit(
        z.len() / l,
        l,
        || (),
        |_, row, g| {
            let go = &gout[row * l_out..(row + 1) * l_out];
            let zr = &z[row * l..(row + 1) * l];
            match pool {
                1 => {
                    for (gj, &o) in g.iter_mut().zip(go) {
                        gj.write(o * g_scale);
                    }
                }
                2 => {
                    for (w, &o) in g.chunks_exact_mut(2).zip(go) {
                        let v = o * g_scale;
                        w[0].write(v);
                        w[1].write(v);
                    }
                }
                _ => {
                    for (w, &o) in g.chunks_exact_mut(pool).zip(go) {
                        for gj in w {
                            gj.write(o * g_scale);
                        }
                    }
                }
            }
            for gj in &mut g[used..] {
                gj.write(zero);
            }
            // SAFETY: the pooled windows cover 0..used and the tail was zeroed just above.
            let g = unsafe { assume_init(g) };
            if let Some(mask) = mask {
                for (gj, &m) in g[..used].iter_mut().zip(&mask[row * l..row * l + used]) {
                    *gj *= T::of_u8(m);
                }
            }
            if affine.is_none() {
                return;
            }
            let (nm, is) = (neg_mean[row % c], inv_std[row % c]);
            let g = &*g;
            let rs = lane_sums(used, |i| {
                let r = if relu { zr[i].relu() } else { zr[i] };
                (g[i], g[i] * ((r + nm) * is))
            });
            // SAFETY: `row < row_sums.len()` and each row's task writes only its own entry; `row_sums`
            // outlives this parallel section.
            unsafe { *sums.ptr().add(row) = rs };
        },
    );
    let mut sum_g = vec![0f64; c];
    let mut sum_gx = vec![0f64; c];
    for (row, (sg, sgx)) in row_sums.iter().enumerate() {
        sum_g[row % c] += sg;
        sum_gx[row % c] += sgx;
    }
    // Pass 2: through BatchNorm and ReLU, in place.
    let batch = matches!(op.norm, Norm::Batch);
    let n = (z.len() / c) as f64;
    dz.par_chunks_mut(l)
        .zip(z.par_chunks(l))
        .enumerate()
        .for_each(|(row, (d, zr))| {
            let ch = row % c;
            let (coef, nm, is, mg, mgx) = match &affine {
                None => (T::of(1.0), zero, zero, zero, zero),
                Some(_) if batch => (
                    T::of(gamma[ch].to64() * inv_std[ch].to64()),
                    neg_mean[ch],
                    inv_std[ch],
                    T::of(-sum_g[ch] / n),
                    T::of(-sum_gx[ch] / n),
                ),
                Some(_) => (
                    T::of(gamma[ch].to64() * inv_std[ch].to64()),
                    zero,
                    zero,
                    zero,
                    zero,
                ),
            };
            if relu {
                for (dj, &v) in d.iter_mut().zip(zr) {
                    // For v > 0, relu(v) = v, so x̂ = (v - mean) / σ.
                    let val = coef * (*dj + mg + (v + nm) * is * mgx);
                    *dj = if v > zero { val } else { zero };
                }
            } else {
                for (dj, &v) in d.iter_mut().zip(zr) {
                    *dj = coef * (*dj + mg + (v + nm) * is * mgx);
                }
            }
        });
    if affine.is_none() {
        return (dz, vec![], vec![]);
    }
    let dgamma = sum_gx.into_iter().map(T::of).collect();
    let dbeta = sum_g.into_iter().map(T::of).collect();
    (dz, dgamma, dbeta)
}
}

impl CustomOp3 for BlockOp {
    fn name(&self) -> &'static str {
        "starflow-relu-bn-dropout-pool"
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
        let (b, c, l) = l1.shape().dims3()?;
        let shape = Shape::from((b, c, l / self.pool));
        let op = self.name();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(self.fwd::<f32>(
                    contiguous_slice(op, s1, l1)?,
                    contiguous_slice(op, s2, l2)?,
                    contiguous_slice(op, s3, l3)?,
                    c,
                    l,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(self.fwd::<f64>(
                    contiguous_slice(op, s1, l1)?,
                    contiguous_slice(op, s2, l2)?,
                    contiguous_slice(op, s3, l3)?,
                    c,
                    l,
                ))
            }
            _ => bail!(
                "{op}: expected f32 or f64 inputs of one dtype, got {:?}",
                s1.dtype()
            ),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        z: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match z.dtype() {
            DType::F32 => self.bwd_tensors::<f32>(z, gamma, beta, grad_res),
            DType::F64 => self.bwd_tensors::<f64>(z, gamma, beta, grad_res),
            dt => bail!("{}: backward expects f32 or f64, got {dt:?}", self.name()),
        }
    }
}

impl BlockOp {
    fn bwd_tensors<T: Elem>(
        &self,
        z: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        gout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "starflow-relu-bn-dropout-pool backward";
        let (_, c, l) = z.dims3()?;
        let (dz, dgamma, dbeta) = with_cpu_slice::<T, _>(op, z, |zs| {
            with_cpu_slice::<T, _>(op, gamma, |gs| {
                with_cpu_slice::<T, _>(op, gout, |gos| Ok(self.bwd(zs, gs, gos, c, l)))
            })
        })?;
        let dev = z.device();
        let dz = Tensor::from_vec(dz, z.shape(), dev)?;
        if matches!(self.norm, Norm::None) {
            return Ok((Some(dz), None, None));
        }
        Ok((
            Some(dz),
            Some(Tensor::from_vec(dgamma, gamma.shape(), dev)?),
            Some(Tensor::from_vec(dbeta, beta.shape(), dev)?),
        ))
    }
}

pub(crate) fn check(
    (b, c, l): (usize, usize, usize),
    norm: &BlockNorm,
    dropout: Option<&DropoutMask>,
    pool: usize,
) -> Result<()> {
    if pool == 0 || pool > l {
        bail!("fused block: pool window {pool} must lie in 1..={l} for input ({b}, {c}, {l})");
    }
    let per_channel = |t: &Tensor, what: &str| -> Result<()> {
        if t.dims() != [c] {
            bail!(
                "fused block: {what} has shape {:?}, expected [{c}]",
                t.shape()
            );
        }
        Ok(())
    };
    match norm {
        BlockNorm::None => {}
        BlockNorm::Batch { gamma, beta } => {
            per_channel(gamma, "gamma")?;
            per_channel(beta, "beta")?;
        }
        BlockNorm::Running {
            gamma,
            beta,
            mean,
            var,
        } => {
            per_channel(gamma, "gamma")?;
            per_channel(beta, "beta")?;
            per_channel(mean, "running mean")?;
            per_channel(var, "running var")?;
        }
    }
    if let Some(d) = dropout {
        if d.mask.len() != b * c * l {
            bail!(
                "fused block: dropout mask has {} elements, input ({b}, {c}, {l})",
                d.mask.len()
            );
        }
        if !(0.0..1.0).contains(&d.p) {
            bail!("fused block: dropout p {} outside [0, 1)", d.p);
        }
    }
    Ok(())
}

/// The op for a block on `z (b, c, l)`, with the γ and β tensors it takes (ones and zeros without
/// BatchNorm).
pub(crate) fn block_op(
    like: &Tensor,
    c: usize,
    norm: BlockNorm,
    dropout: Option<&DropoutMask>,
    relu: bool,
    pool: usize,
) -> Result<(BlockOp, Tensor, Tensor)> {
    let (gamma, beta, norm_kind) = match norm {
        BlockNorm::None => {
            let ones = Tensor::ones(c, like.dtype(), like.device())?;
            (ones.clone(), ones.zeros_like()?, Norm::None)
        }
        BlockNorm::Batch { gamma, beta } => (gamma.clone(), beta.clone(), Norm::Batch),
        BlockNorm::Running {
            gamma,
            beta,
            mean,
            var,
        } => (
            gamma.clone(),
            beta.clone(),
            Norm::Running {
                mean: host_f64(mean)?,
                var: host_f64(var)?,
            },
        ),
    };
    let op = BlockOp {
        relu,
        norm: norm_kind,
        mask: dropout.cloned(),
        pool,
        saved: Arc::new(Mutex::new(None)),
    };
    Ok((op, gamma, beta))
}

/// `AvgPool_pool(Dropout(BatchNorm(ReLU?(z))))` for `z (b, c, l)` -> `(b, c, l / pool)` on the CPU (f32/f64),
/// with a fused backward to `z`, γ and β. Returns the batch statistics with [`BlockNorm::Batch`] (for the
/// running-statistics update, which the caller owns).
pub fn fused_block(
    z: &Tensor,
    norm: BlockNorm,
    dropout: Option<&DropoutMask>,
    relu: bool,
    pool: usize,
) -> Result<(Tensor, Option<BatchStats>)> {
    check(z.dims3()?, &norm, dropout, pool)?;
    if !z.device().is_cpu() {
        bail!(
            "fused block: the fused kernel runs on the CPU only, got {:?}",
            z.device()
        );
    }
    let (op, gamma, beta) = block_op(z, z.dim(1)?, norm, dropout, relu, pool)?;
    let saved = op.saved.clone();
    let out = z
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let stats = saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok((out, stats))
}

/// The same block from candle's stock tensor ops (any device; the stock path of the backbones).
pub fn fused_block_reference(
    z: &Tensor,
    norm: BlockNorm,
    dropout: Option<&DropoutMask>,
    relu: bool,
    pool: usize,
) -> Result<(Tensor, Option<BatchStats>)> {
    check(z.dims3()?, &norm, dropout, pool)?;
    let (b, c, l) = z.dims3()?;
    let r = if relu { z.relu()? } else { z.clone() };
    let per_channel = |t: &Tensor| t.reshape((1, c, 1));
    let (y, stats) = match norm {
        BlockNorm::None => (r, None),
        BlockNorm::Batch { gamma, beta } => {
            let mean = r.mean_keepdim(2)?.mean_keepdim(0)?;
            let centred = r.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(2)?.mean_keepdim(0)?;
            let y = centred
                .broadcast_div(&(var.clone() + BN_EPS)?.sqrt()?)?
                .broadcast_mul(&per_channel(gamma)?)?
                .broadcast_add(&per_channel(beta)?)?;
            let stats = BatchStats {
                mean: host_f64(&mean)?,
                var: host_f64(&var)?,
                n: b * l,
            };
            (y, Some(stats))
        }
        BlockNorm::Running {
            gamma,
            beta,
            mean,
            var,
        } => {
            let y = r
                .broadcast_sub(&per_channel(mean)?)?
                .broadcast_div(&(per_channel(var)? + BN_EPS)?.sqrt()?)?
                .broadcast_mul(&per_channel(gamma)?)?
                .broadcast_add(&per_channel(beta)?)?;
            (y, None)
        }
    };
    let y = match dropout {
        None => y,
        Some(d) => {
            let scale = keep_scale(d.p);
            let m: Vec<f64> = d.mask.iter().map(|&k| f64::from(k) * scale).collect();
            let m = f64_like(m, &[b, c, l], z)?;
            (y * m)?
        }
    };
    let l_out = l / pool;
    let pooled = if pool == 1 {
        y
    } else {
        y.narrow(D::Minus1, 0, l_out * pool)?
            .reshape((b, c, l_out, pool))?
            .mean(D::Minus1)?
    };
    Ok((pooled, stats))
}
