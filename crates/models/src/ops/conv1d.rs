//! Valid (unpadded, stride-1) conv1d with bias as a candle `CustomOp3`, on the `gemm` crate.
//!
//! Why: candle 0.11.1's CPU conv1d is slow (im2col copies, page faults) and its backward is wrong (see the
//! crate docs). Forward: per batch item, an im2col buffer `(c_in k, l_out)` (skipped for `k = 1`) and one
//! `gemm` call `y = w (c_out, c_in k) col + bias`, rayon over the batch with one column buffer per task.
//! Backward, per item: `dw += dy (c_out, l_out) col^T` (im2col rebuilt), `dcol = w^T dy` then col2im
//! into `dx`, `db = sum_t dy`. The weight gradient is accumulated per rayon task and summed at the end. The input
//! gradient is skipped when the input tracks no gradient (the spectrum itself).
//! `gemm` picks AVX-512/AVX2/FMA/NEON kernels at run time, so no `target-cpu` flag is needed.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{assume_init, contiguous_slice, lane_sums, par_rows_uninit, with_cpu_slice, Elem};

struct Conv1dOp;

/// Sizes of one convolution: batch, input channels, input length, output channels, kernel width.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub c_in: usize,
    pub l: usize,
    pub c_out: usize,
    pub k: usize,
}

impl Dims {
    pub(crate) fn l_out(&self) -> usize {
        self.l + 1 - self.k
    }
}

pub(crate) fn dims(x: &Shape, w: &Shape, bias: &Shape) -> Result<Dims> {
    let (b, c_in, l) = x.dims3()?;
    let (c_out, c_in_w, k) = w.dims3()?;
    let n_bias = bias.dims1()?;
    if c_in != c_in_w || n_bias != c_out || k == 0 || k > l {
        bail!("conv1d: incompatible shapes x {x:?}, w {w:?}, bias {bias:?}");
    }
    Ok(Dims {
        b,
        c_in,
        l,
        c_out,
        k,
    })
}

/// Use gemm's own threads only when rayon over the batch cannot keep every thread busy.
fn inner_parallelism(n_tasks: usize) -> Parallelism {
    if n_tasks < rayon::current_num_threads() {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    }
}

pub(crate) fn conv_fwd<T: Elem>(x: &[T], w: &[T], bias: &[T], d: Dims) -> Vec<T> {
    let (l_out, ck) = (d.l_out(), d.c_in * d.k);
    let par = inner_parallelism(d.b);
    par_rows_uninit(d.b, d.c_out * l_out, Vec::<T>::new, |col, i, yi| {
        let xi = &x[i * d.c_in * d.l..(i + 1) * d.c_in * d.l];
        for (row, &bv) in yi.chunks_mut(l_out).zip(bias) {
            for v in row {
                v.write(bv);
            }
        }
        // SAFETY: every element of `yi` was just written with its channel's bias.
        let yi = unsafe { assume_init(yi) };
        let rhs = if d.k == 1 {
            xi
        } else {
            im2col(xi, col, d);
            &col[..]
        };
        // SAFETY: dst `yi` is (c_out, l_out) row-major and exclusively borrowed; lhs `w` is (c_out, c_in k)
        // row-major and rhs is (c_in k, l_out) row-major, all in bounds by construction of `d`.
        unsafe {
            gemm::gemm(
                d.c_out,
                l_out,
                ck,
                yi.as_mut_ptr(),
                1,
                l_out as isize,
                true,
                w.as_ptr(),
                1,
                ck as isize,
                rhs.as_ptr(),
                1,
                l_out as isize,
                T::of(1.0),
                T::of(1.0),
                false,
                false,
                false,
                par,
            )
        }
    })
}

/// Writes the im2col matrix `(c_in k, l_out)` of one item `xi (c_in, l)` into `col`.
fn im2col<T: Elem>(xi: &[T], col: &mut Vec<T>, d: Dims) {
    let l_out = d.l_out();
    col.resize(d.c_in * d.k * l_out, T::of(0.0));
    for ci in 0..d.c_in {
        let xrow = &xi[ci * d.l..(ci + 1) * d.l];
        for j in 0..d.k {
            let r = ci * d.k + j;
            col[r * l_out..(r + 1) * l_out].copy_from_slice(&xrow[j..j + l_out]);
        }
    }
}

/// Weight and bias gradients, `dw += dy col^T`, accumulated over the batch in one buffer per rayon task.
pub(crate) fn conv_bwd_weight<T: Elem>(x: &[T], gy: &[T], d: Dims) -> (Vec<T>, Vec<T>) {
    let (l_out, ck) = (d.l_out(), d.c_in * d.k);
    let n_tasks = rayon::current_num_threads().clamp(1, d.b.max(1));
    let per_task = d.b.div_ceil(n_tasks);
    let par = inner_parallelism(n_tasks);
    let zero = T::of(0.0);
    let (dw, db) = (0..n_tasks)
        .into_par_iter()
        .map(|task| {
            let mut dw = vec![zero; d.c_out * ck];
            let mut db = vec![0f64; d.c_out];
            let mut col = Vec::new();
            for i in task * per_task..((task + 1) * per_task).min(d.b) {
                let xi = &x[i * d.c_in * d.l..(i + 1) * d.c_in * d.l];
                let gyi = &gy[i * d.c_out * l_out..(i + 1) * d.c_out * l_out];
                let col = if d.k == 1 {
                    xi
                } else {
                    im2col(xi, &mut col, d);
                    &col[..]
                };
                // SAFETY: dst `dw` (c_out, c_in k) row-major is owned by this task; lhs `gyi` is (c_out, l_out)
                // row-major; rhs element (t, j) is col[j l_out + t], in bounds for t < l_out, j < c_in k.
                unsafe {
                    gemm::gemm(
                        d.c_out,
                        ck,
                        l_out,
                        dw.as_mut_ptr(),
                        1,
                        ck as isize,
                        true,
                        gyi.as_ptr(),
                        1,
                        l_out as isize,
                        col.as_ptr(),
                        l_out as isize,
                        1,
                        T::of(1.0),
                        T::of(1.0),
                        false,
                        false,
                        false,
                        par,
                    )
                }
                for (acc, row) in db.iter_mut().zip(gyi.chunks(l_out)) {
                    *acc += lane_sums(row.len(), |t| (row[t], T::of(0.0))).0;
                }
            }
            (dw, db)
        })
        .reduce(
            || (vec![zero; d.c_out * ck], vec![0f64; d.c_out]),
            |(mut dw_a, mut db_a), (dw_b, db_b)| {
                for (a, b) in dw_a.iter_mut().zip(dw_b) {
                    *a += b;
                }
                for (a, b) in db_a.iter_mut().zip(db_b) {
                    *a += b;
                }
                (dw_a, db_a)
            },
        );
    (dw, db.into_iter().map(T::of).collect())
}

/// Input gradient `dcol = w^T dy` followed by col2im, rayon over the batch.
pub(crate) fn conv_bwd_input<T: Elem>(w: &[T], gy: &[T], d: Dims) -> Vec<T> {
    let (l_out, ck) = (d.l_out(), d.c_in * d.k);
    let zero = T::of(0.0);
    let mut dx = super::pool::take::<T>(d.b * d.c_in * d.l);
    dx.resize(d.b * d.c_in * d.l, zero);
    let par = inner_parallelism(d.b);
    dx.par_chunks_mut(d.c_in * d.l)
        .enumerate()
        .for_each_init(Vec::<T>::new, |dcol, (i, dxi)| {
            let gyi = &gy[i * d.c_out * l_out..(i + 1) * d.c_out * l_out];
            let direct = d.k == 1;
            if !direct {
                dcol.resize(ck * l_out, zero);
            }
            let dst = if direct {
                dxi.as_mut_ptr()
            } else {
                dcol.as_mut_ptr()
            };
            // SAFETY: dst is `dxi` (c_in, l = l_out) when k = 1 or `dcol` (c_in k, l_out), row-major and
            // exclusively borrowed; lhs element (j, co) is w[co c_in k + j]; rhs `gyi` is (c_out, l_out).
            unsafe {
                gemm::gemm(
                    ck,
                    l_out,
                    d.c_out,
                    dst,
                    1,
                    l_out as isize,
                    false,
                    w.as_ptr(),
                    ck as isize,
                    1,
                    gyi.as_ptr(),
                    1,
                    l_out as isize,
                    T::of(0.0),
                    T::of(1.0),
                    false,
                    false,
                    false,
                    par,
                )
            }
            if !direct {
                for ci in 0..d.c_in {
                    let xrow = &mut dxi[ci * d.l..(ci + 1) * d.l];
                    for j in 0..d.k {
                        let r = ci * d.k + j;
                        for (a, &g) in xrow[j..j + l_out]
                            .iter_mut()
                            .zip(&dcol[r * l_out..(r + 1) * l_out])
                        {
                            *a += g;
                        }
                    }
                }
            }
        });
    dx
}

impl CustomOp3 for Conv1dOp {
    fn name(&self) -> &'static str {
        "starflow-conv1d"
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
        let d = dims(l1.shape(), l2.shape(), l3.shape())?;
        let shape = Shape::from((d.b, d.c_out, d.l_out()));
        let op = self.name();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(conv_fwd::<f32>(
                    contiguous_slice(op, s1, l1)?,
                    contiguous_slice(op, s2, l2)?,
                    contiguous_slice(op, s3, l3)?,
                    d,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(conv_fwd::<f64>(
                    contiguous_slice(op, s1, l1)?,
                    contiguous_slice(op, s2, l2)?,
                    contiguous_slice(op, s3, l3)?,
                    d,
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
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            candle_core::DType::F32 => conv_bwd::<f32>(x, w, bias, grad_res),
            candle_core::DType::F64 => conv_bwd::<f64>(x, w, bias, grad_res),
            dt => bail!("starflow-conv1d: backward expects f32 or f64, got {dt:?}"),
        }
    }
}

type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

fn conv_bwd<T: Elem>(x: &Tensor, w: &Tensor, bias: &Tensor, gy: &Tensor) -> Result<Grads3> {
    let op = "starflow-conv1d backward";
    let d = dims(x.shape(), w.shape(), bias.shape())?;
    let dev = x.device();
    let (dw, db) = with_cpu_slice::<T, _>(op, x, |xs| {
        with_cpu_slice::<T, _>(op, gy, |gys| Ok(conv_bwd_weight(xs, gys, d)))
    })?;
    let dx = if x.track_op() {
        let dx = with_cpu_slice::<T, _>(op, w, |ws| {
            with_cpu_slice::<T, _>(op, gy, |gys| Ok(conv_bwd_input(ws, gys, d)))
        })?;
        Some(Tensor::from_vec(dx, x.shape(), dev)?)
    } else {
        None
    };
    Ok((
        dx,
        Some(Tensor::from_vec(dw, w.shape(), dev)?),
        Some(Tensor::from_vec(db, bias.shape(), dev)?),
    ))
}

/// Valid conv1d with bias: `x (b, c_in, l)`, `w (c_out, c_in, k)`, `bias (c_out)` -> `(b, c_out, l - k + 1)`.
///
/// CPU only (f32/f64), with a hand-written backward; use [`conv1d_reference`] elsewhere.
pub fn conv1d(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    dims(x.shape(), w.shape(), bias.shape())?;
    if !x.device().is_cpu() {
        bail!(
            "conv1d: the fused kernel runs on the CPU only, got {:?}",
            x.device()
        );
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &bias.contiguous()?, Conv1dOp)
}

/// The same convolution from candle's stock ops (speed comparison only on the CPU: candle 0.11.1's CPU
/// conv1d backward is wrong; correct on CUDA/Metal).
pub fn conv1d_reference(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let c_out = bias.dim(0)?;
    x.conv1d(w, 0, 1, 1, 1)?
        .broadcast_add(&bias.reshape((1, c_out, 1))?)
}
