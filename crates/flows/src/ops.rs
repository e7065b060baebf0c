//! Fused CPU kernels (candle `CustomOp`s) with hand-written backward passes.
//!
//! candle lacks the special functions the reference flows need (thresholded softplus, erfinv,
//! the Winitzki log-CDF tails, `logaddexp`), and composing a Gaussianization layer out of
//! dozens of tiny tensor ops would cost far more in dispatch and allocation than the arithmetic
//! itself at batch 64. So three ops are fused, each on contiguous f64 storage only (any other
//! dtype is an error):
//!
//! * [`bounded_log`]: the element-wise bounded log-width map of math §1 (affine layer scales);
//! * [`householder_reflect`]: `x' = H(v_{n-1}) ... H(v_0) x` per row (math §3a, evaluation
//!   direction), `H(v) = I - 2 v v^T / (v^T v)`;
//! * [`mixture_nonlinearity`]: the logistic-kernel mixture CDF of math §3b followed by the
//!   nonlinearity of §3c, returning the value and the per-dimension log-derivative.
//!
//! Each `bwd` recomputes the forward quantities from the saved inputs (cheap at these sizes) and
//! returns vector-Jacobian products; the tests check them against finite differences and
//! against the reference's autograd gradients in the golden fixtures.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::special::{softplus_t20, BoundedLog, Nonlinearity};

/// Borrows the contiguous f64 data of a custom-op input or fails with the op's name.
fn f64_slice<'a>(
    op: &'static str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [f64]> {
    let data = match s {
        CpuStorage::F64(v) => v.as_slice(),
        other => bail!("{op}: expected f64 input, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// All values of a tensor as a flat row-major f64 vector.
fn flat(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.flatten_all()?.to_vec1::<f64>()
}

// ---------------------------------------------------------------------------------------------
// Bounded log-width.

struct BoundedLogOp(BoundedLog);

impl CustomOp1 for BoundedLogOp {
    fn name(&self) -> &'static str {
        "bounded-log"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f64_slice(self.name(), s, l)?;
        let out: Vec<f64> = x.iter().map(|&r| self.0.eval(r).0).collect();
        Ok((CpuStorage::F64(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = flat(arg)?;
        let g = flat(grad_res)?;
        let out: Vec<f64> = x
            .iter()
            .zip(&g)
            .map(|(&r, &gr)| gr * self.0.eval(r).1)
            .collect();
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

/// `B(r; lo, hi, shift) = ln(lo + hi sigmoid(r - shift))`, element-wise, differentiable (math §1).
pub fn bounded_log(r: &Tensor, lo: f64, hi: f64, shift: f64) -> candle_core::Result<Tensor> {
    r.contiguous()?
        .apply_op1(BoundedLogOp(BoundedLog::new(lo, hi, shift)))
}

// ---------------------------------------------------------------------------------------------
// Householder reflections.

/// Reads the vectors from columns `start..start + len` of its second input, so a layer can
/// pass its whole parameter slice (no narrow, no copy, no zero-padded narrow gradient).
struct HouseholderOp {
    dim: usize,
    start: usize,
    len: usize,
}

/// Applies `H(v_0)`, then `H(v_1)`, ... to `x` in place; `vs` holds the vectors back to back.
/// When `trace` is given, the input to each reflection is appended to it.
#[inline]
fn reflect_row(x: &mut [f64], vs: &[f64], mut trace: Option<&mut Vec<f64>>) {
    let d = x.len();
    for v in vs.chunks_exact(d) {
        if let Some(t) = trace.as_deref_mut() {
            t.extend_from_slice(x);
        }
        let nrm: f64 = v.iter().map(|a| a * a).sum();
        let dot: f64 = v.iter().zip(x.iter()).map(|(a, b)| a * b).sum();
        let s = 2.0 * dot / nrm;
        for (xi, vi) in x.iter_mut().zip(v) {
            *xi -= s * vi;
        }
    }
}

impl CustomOp2 for HouseholderOp {
    fn name(&self) -> &'static str {
        "householder-reflect"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f64_slice(self.name(), s1, l1)?;
        let v = f64_slice(self.name(), s2, l2)?;
        let d = self.dim;
        let b = x.len() / d;
        let width = v.len() / b.max(1);
        let mut out = x.to_vec();
        for (row, vs) in out.chunks_exact_mut(d).zip(v.chunks_exact(width.max(1))) {
            reflect_row(row, &vs[self.start..self.start + self.len], None);
        }
        Ok((CpuStorage::F64(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let x = flat(arg1)?;
        let v = flat(arg2)?;
        let g = flat(grad_res)?;
        let d = self.dim;
        let b = x.len() / d;
        let width = v.len() / b.max(1);
        let nv = self.len;
        let mut gx = vec![0.0; x.len()];
        let mut gv = vec![0.0; v.len()];
        let mut trace = Vec::with_capacity(nv);
        for i in 0..b {
            let mut row = x[i * d..(i + 1) * d].to_vec();
            let first = i * width + self.start;
            let vs = &v[first..first + nv];
            trace.clear();
            reflect_row(&mut row, vs, Some(&mut trace));
            let mut gr = g[i * d..(i + 1) * d].to_vec();
            let gvs = &mut gv[first..first + nv];
            for k in (0..nv / d).rev() {
                let vk = &vs[k * d..(k + 1) * d];
                let yin = &trace[k * d..(k + 1) * d];
                let n: f64 = vk.iter().map(|a| a * a).sum();
                let a: f64 = vk.iter().zip(yin).map(|(p, q)| p * q).sum();
                let vg: f64 = vk.iter().zip(&gr).map(|(p, q)| p * q).sum();
                // y = x - 2 v (v.x) / (v.v): the gradient with respect to v and to x.
                for c in 0..d {
                    gvs[k * d + c] =
                        -2.0 * (yin[c] * vg / n + gr[c] * a / n - 2.0 * vk[c] * a * vg / (n * n));
                }
                for c in 0..d {
                    gr[c] -= 2.0 * vk[c] * vg / n;
                }
            }
            gx[i * d..(i + 1) * d].copy_from_slice(&gr);
        }
        let gx = Tensor::from_vec(gx, arg1.shape(), arg1.device())?;
        let gv = Tensor::from_vec(gv, arg2.shape(), arg2.device())?;
        Ok((Some(gx), Some(gv)))
    }
}

/// Per row, `x' = H(v_{n-1}) ... H(v_1) H(v_0) x` for `x: (b, d)` and the vectors
/// `v: (b, n d)` stored back to back (the evaluation direction `Q^T x` of math §3a with
/// `Q = H(v_0) ... H(v_{n-1})`). Differentiable with respect to both inputs.
pub fn householder_reflect(x: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let nv = v.dims2()?.1;
    householder_reflect_cols(x, v, 0, nv)
}

/// [`householder_reflect`] with the vectors in columns `start..start + len` of `theta`; the
/// gradient with respect to `theta` is zero in the other columns.
pub(crate) fn householder_reflect_cols(
    x: &Tensor,
    theta: &Tensor,
    start: usize,
    len: usize,
) -> candle_core::Result<Tensor> {
    let (b, d) = x.dims2()?;
    let (bv, p) = theta.dims2()?;
    if bv != b || d == 0 || !len.is_multiple_of(d) || start + len > p {
        bail!(
            "householder-reflect: x {:?} and theta {:?} do not match (want {len} = n {d} vector values from column {start})",
            x.dims(),
            theta.dims()
        );
    }
    x.contiguous()?
        .apply_op2(&theta.contiguous()?, HouseholderOp { dim: d, start, len })
}

// ---------------------------------------------------------------------------------------------
// Logistic mixture CDF + nonlinearity.

/// The fixed settings of one Gaussianization layer's per-dimension map.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MixtureSpec {
    /// Kernels per dimension, K.
    pub n_kernels: usize,
    /// Dimension d.
    pub dim: usize,
    /// Kernel width map (math §1, `0.01 + sigmoid(r)` by default).
    pub width: BoundedLog,
    /// Kernel normalisation map (`1 + 10 sigmoid(r)` by default).
    pub norm: BoundedLog,
    /// The nonlinearity after the mixture CDF.
    pub nonlin: Nonlinearity,
}

/// Per-kernel intermediate values of one (row, dimension), everything the backward pass needs
/// so that it is pure arithmetic.
#[derive(Debug, Default)]
pub(crate) struct MixScratch {
    /// `u_k = (x - m_k) / w_k`.
    u: Vec<f64>,
    /// `1 / w_k`.
    inv_w: Vec<f64>,
    /// `d log w_k / d r_k`.
    dlw: Vec<f64>,
    /// `d log n_k / d r_k`.
    dln: Vec<f64>,
    /// `pi_k = n_k / sum n`.
    pi: Vec<f64>,
    /// `d softplus(-u_k) / d(-u_k)` with the reference's threshold.
    dsp: Vec<f64>,
    /// Softmax weights of the three log-sum-exps (log F, log S, log f) over the kernels.
    wf: Vec<f64>,
    ws: Vec<f64>,
    wd: Vec<f64>,
    /// Log-space terms before the log-sum-exps.
    lpi: Vec<f64>,
    lw: Vec<f64>,
}

impl MixScratch {
    pub(crate) fn new(k: usize) -> Self {
        let z = vec![0.0; k];
        Self {
            u: z.clone(),
            inv_w: z.clone(),
            dlw: z.clone(),
            dln: z.clone(),
            pi: z.clone(),
            dsp: z.clone(),
            wf: z.clone(),
            ws: z.clone(),
            wd: z.clone(),
            lpi: z.clone(),
            lw: z,
        }
    }
}

/// Result of the mixture for one (row, dimension): `log F`, `log S = log(1 - F)`, `log f`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MixValue {
    pub lf: f64,
    pub ls: f64,
    pub lpdf: f64,
}

/// `log(sum_k exp(a_k))` of the terms in `w`, leaving the softmax weights in `w`.
#[inline]
fn lse_weights(w: &mut [f64]) -> f64 {
    let m = w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        w.iter_mut().for_each(|a| *a = 0.0);
        return m;
    }
    let mut sum = 0.0;
    for a in w.iter_mut() {
        *a = (*a - m).exp();
        sum += *a;
    }
    let inv = 1.0 / sum;
    w.iter_mut().for_each(|a| *a *= inv);
    m + sum.ln()
}

impl MixtureSpec {
    /// Width of the mixture part of a layer's parameter slice: means, widths and weights.
    pub(crate) fn n_params(&self) -> usize {
        3 * self.n_kernels * self.dim
    }

    /// Evaluates the mixture of math §3b at `x` for dimension `j` of one parameter row
    /// (`row` = the `3 K d` mixture parameters), filling `s` for a backward pass:
    /// `log F = lse_k(log pi - sp(-u))`, `log S = lse_k(log pi - u - sp(-u))`,
    /// `log f = lse_k(log pi - log w - u - 2 sp(-u))` with `sp` PyTorch's softplus.
    ///
    /// The sums are formed in linear space (`pi sigmoid(u)` etc., with the softplus threshold
    /// reproduced: for `u < -20` the terms are `pi e^u`, `pi` and `pi e^u / w`), which needs one
    /// `exp` per kernel instead of five transcendentals; when a sum would underflow it falls
    /// back to the log-space form.
    #[inline]
    pub(crate) fn eval(&self, row: &[f64], j: usize, x: f64, s: &mut MixScratch) -> MixValue {
        let (k_n, d) = (self.n_kernels, self.dim);
        let mut n_sum = 0.0;
        for k in 0..k_n {
            let (w, dlw) = self.width.eval_linear(row[k_n * d + k * d + j]);
            let (n, dln) = self.norm.eval_linear(row[2 * k_n * d + k * d + j]);
            s.inv_w[k] = 1.0 / w;
            s.dlw[k] = dlw;
            s.dln[k] = dln;
            s.pi[k] = n;
            n_sum += n;
        }
        let inv_sum = 1.0 / n_sum;
        let (mut f_cdf, mut s_cdf, mut pdf) = (0.0, 0.0, 0.0);
        for k in 0..k_n {
            let pi = s.pi[k] * inv_sum;
            s.pi[k] = pi;
            let inv_w = s.inv_w[k];
            let u = (x - row[k * d + j]) * inv_w;
            let (fk, sk, dk, dsp) = if u < -20.0 {
                let e = u.exp();
                (pi * e, pi, pi * e * inv_w, 1.0)
            } else {
                let e = (-u.abs()).exp();
                let a = 1.0 / (1.0 + e);
                let dk = pi * inv_w * e * a * a;
                if u >= 0.0 {
                    (pi * a, pi * e * a, dk, e * a)
                } else {
                    (pi * e * a, pi * a, dk, a)
                }
            };
            s.u[k] = u;
            s.dsp[k] = dsp;
            s.wf[k] = fk;
            s.ws[k] = sk;
            s.wd[k] = dk;
            f_cdf += fk;
            s_cdf += sk;
            pdf += dk;
        }
        const TINY: f64 = 1e-290;
        if !(f_cdf > TINY && s_cdf > TINY && pdf > TINY) {
            return self.eval_log(row, j, x, s);
        }
        let (fi, si, di) = (1.0 / f_cdf, 1.0 / s_cdf, 1.0 / pdf);
        for k in 0..k_n {
            s.wf[k] *= fi;
            s.ws[k] *= si;
            s.wd[k] *= di;
        }
        MixValue {
            lf: f_cdf.ln(),
            ls: s_cdf.ln(),
            lpdf: pdf.ln(),
        }
    }

    /// The log-space form of [`Self::eval`] (the reference's own), for points so far from
    /// every kernel that the linear sums underflow.
    fn eval_log(&self, row: &[f64], j: usize, x: f64, s: &mut MixScratch) -> MixValue {
        let (k_n, d) = (self.n_kernels, self.dim);
        let mut n_sum = 0.0;
        for k in 0..k_n {
            let (w, lw, dlw) = self.width.eval_full(row[k_n * d + k * d + j]);
            let (n, _, dln) = self.norm.eval_full(row[2 * k_n * d + k * d + j]);
            s.inv_w[k] = 1.0 / w;
            s.lw[k] = lw;
            s.dlw[k] = dlw;
            s.dln[k] = dln;
            s.pi[k] = n;
            n_sum += n;
        }
        let ln_sum = n_sum.ln();
        let inv_sum = 1.0 / n_sum;
        for k in 0..k_n {
            // log pi = log n - logsumexp(log n), with n in [lo, lo + hi] so no shift is needed.
            let lpi = s.pi[k].ln() - ln_sum;
            s.pi[k] *= inv_sum;
            s.lpi[k] = lpi;
            let u = (x - row[k * d + j]) * s.inv_w[k];
            let (sp, dsp) = softplus_t20(-u);
            s.u[k] = u;
            s.dsp[k] = dsp;
            s.wf[k] = lpi - sp;
            s.ws[k] = lpi - u - sp;
            s.wd[k] = lpi - s.lw[k] - u - 2.0 * sp;
        }
        MixValue {
            lf: lse_weights(&mut s.wf),
            ls: lse_weights(&mut s.ws),
            lpdf: lse_weights(&mut s.wd),
        }
    }

    /// The two Jacobian rows of [`Self::eval`] (which must have just filled `s`) for the
    /// gradient triples `gy` and `gl` with respect to `(log F, log S, log f)`: writes
    /// `d/dx` to `jy[0]`, `jl[0]` and the `3 K` parameters of this dimension (means, widths,
    /// weights, kernel-major) to `[1..]`.
    #[inline]
    pub(crate) fn jacobian_rows(
        &self,
        gy: (f64, f64, f64),
        gl: (f64, f64, f64),
        s: &MixScratch,
        jy: &mut [f64],
        jl: &mut [f64],
    ) {
        let k_n = self.n_kernels;
        let (mut gx_y, mut gx_l, mut sum_y, mut sum_l) = (0.0, 0.0, 0.0, 0.0);
        for k in 0..k_n {
            let (wf, ws, wd, u, dsp, inv_w) =
                (s.wf[k], s.ws[k], s.wd[k], s.u[k], s.dsp[k], s.inv_w[k]);
            // aF = lpi - sp(-u); aS = lpi - u - sp(-u); af = lpi - lw - u - 2 sp(-u);
            // u = (x - m) / w: du/dx = 1/w, du/dm = -1/w, du/dlog w = -u.
            let one = |g: (f64, f64, f64), jr: &mut [f64], gx: &mut f64, sum: &mut f64| {
                let (ga, gs, gd) = (g.0 * wf, g.1 * ws, g.2 * wd);
                let gu = ga * dsp + gs * (dsp - 1.0) + gd * (2.0 * dsp - 1.0);
                let glpi = ga + gs + gd;
                *gx += gu * inv_w;
                jr[1 + k] = -gu * inv_w;
                jr[1 + k_n + k] = (-gd - gu * u) * s.dlw[k];
                jr[1 + 2 * k_n + k] = glpi * s.dln[k];
                *sum += glpi;
            };
            one(gy, jy, &mut gx_y, &mut sum_y);
            one(gl, jl, &mut gx_l, &mut sum_l);
        }
        // log pi_k = log n_k - log sum n: subtract pi_k times the sum of the gradients.
        for k in 0..k_n {
            jy[1 + 2 * k_n + k] -= s.pi[k] * sum_y * s.dln[k];
            jl[1 + 2 * k_n + k] -= s.pi[k] * sum_l * s.dln[k];
        }
        jy[0] = gx_y;
        jl[0] = gx_l;
    }
}

/// The op; when `jac` is set, the forward pass also stores each (row, dimension)'s Jacobian of
/// `(y, log dy/dx)` with respect to `x` and the row's mixture parameters, so that the backward
/// pass is a contraction.
struct MixtureOp {
    spec: MixtureSpec,
    /// First column of the mixture parameters in the op's second input.
    start: usize,
    jac: Option<std::sync::Mutex<Vec<f64>>>,
}

impl MixtureOp {
    /// Entries stored per (row, dimension): for y and for log-det, `d/dx` and the `3 K`
    /// parameters of that dimension.
    fn jac_stride(&self) -> usize {
        2 * (1 + 3 * self.spec.n_kernels)
    }

    /// Value and (optionally) Jacobian of every (row, dimension).
    fn compute(&self, x: &[f64], th: &[f64], jac: Option<&mut [f64]>) -> Vec<f64> {
        let spec = &self.spec;
        let (d, p, k_n) = (spec.dim, spec.n_params(), spec.n_kernels);
        let b = x.len() / d;
        let width = th.len() / b.max(1);
        let stride = self.jac_stride();
        let mut out = vec![0.0; b * 2 * d];
        // Rows are independent: chunks of rows run in parallel (a single chunk below
        // ROWS_PER_TASK rows, where threading costs more than it saves).
        let rows = ROWS_PER_TASK;
        let run = |(c, (out, jac)): (usize, (&mut [f64], Option<&mut [f64]>))| {
            let mut s = MixScratch::new(k_n);
            let mut jac = jac;
            for (r, o) in out.chunks_exact_mut(2 * d).enumerate() {
                let i = c * rows + r;
                let row = &th[i * width + self.start..i * width + self.start + p];
                for j in 0..d {
                    let v = spec.eval(row, j, x[i * d + j], &mut s);
                    let e = spec.nonlin.eval(v.lf, v.ls);
                    o[j] = e.y;
                    o[d + j] = v.lpdf + e.t;
                    if let Some(jac) = jac.as_deref_mut() {
                        let dst = &mut jac[(r * d + j) * stride..(r * d + j + 1) * stride];
                        let (jy, jl) = dst.split_at_mut(stride / 2);
                        spec.jacobian_rows(
                            (e.dy_dlf, e.dy_dls, 0.0),
                            (e.dt_dlf, e.dt_dls, 1.0),
                            &s,
                            jy,
                            jl,
                        );
                    }
                }
            }
        };
        match jac {
            Some(jac) => out
                .par_chunks_mut(rows * 2 * d)
                .zip(jac.par_chunks_mut(rows * d * stride))
                .map(|(o, j)| (o, Some(j)))
                .enumerate()
                .for_each(run),
            None => out
                .par_chunks_mut(rows * 2 * d)
                .map(|o| (o, None))
                .enumerate()
                .for_each(run),
        }
        out
    }
}

/// Rows per parallel task of the mixture op.
const ROWS_PER_TASK: usize = 16;

impl CustomOp2 for MixtureOp {
    fn name(&self) -> &'static str {
        "mixture-nonlinearity"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f64_slice(self.name(), s1, l1)?;
        let th = f64_slice(self.name(), s2, l2)?;
        let d = self.spec.dim;
        let b = x.len() / d;
        let out = match &self.jac {
            Some(cache) => {
                let mut jac = vec![0.0; b * d * self.jac_stride()];
                let out = self.compute(x, th, Some(&mut jac));
                match cache.lock() {
                    Ok(mut guard) => *guard = jac,
                    Err(_) => bail!("mixture-nonlinearity: jacobian cache poisoned"),
                }
                out
            }
            None => self.compute(x, th, None),
        };
        Ok((CpuStorage::F64(out), Shape::from((b, 2 * d))))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let spec = &self.spec;
        let (d, p, k_n) = (spec.dim, spec.n_params(), spec.n_kernels);
        let b = arg1.dims()[0];
        let stride = self.jac_stride();
        let cached = match &self.jac {
            Some(cache) => match cache.lock() {
                Ok(guard) => guard.clone(),
                Err(_) => bail!("mixture-nonlinearity: jacobian cache poisoned"),
            },
            None => Vec::new(),
        };
        let jac = if cached.len() == b * d * stride {
            cached
        } else {
            // Not recorded in the forward pass: recompute.
            let mut jac = vec![0.0; b * d * stride];
            self.compute(&flat(arg1)?, &flat(arg2)?, Some(&mut jac));
            jac
        };
        let g = flat(grad_res)?;
        let mut gx = vec![0.0; b * d];
        let width = arg2.dims()[1];
        let mut gth = vec![0.0; b * width];
        for i in 0..b {
            for j in 0..d {
                let (gy, gl) = (g[i * 2 * d + j], g[i * 2 * d + d + j]);
                let src = &jac[(i * d + j) * stride..(i * d + j + 1) * stride];
                let (jy, jl) = src.split_at(stride / 2);
                gx[i * d + j] = gy * jy[0] + gl * jl[0];
                let first = i * width + self.start;
                let grow = &mut gth[first..first + p];
                for n in 0..3 * k_n {
                    let c = (n / k_n) * k_n * d + (n % k_n) * d + j;
                    grow[c] = gy * jy[1 + n] + gl * jl[1 + n];
                }
            }
        }
        let gx = Tensor::from_vec(gx, arg1.shape(), arg1.device())?;
        let gth = Tensor::from_vec(gth, arg2.shape(), arg2.device())?;
        Ok((Some(gx), Some(gth)))
    }
}

/// The per-dimension map of a Gaussianization layer (math §3b–§3c): for `x: (b, d)` and the
/// mixture parameters in columns `start..start + 3 K d` of `theta` (means, raw widths, raw
/// weights, each `(K, d)` row-major) returns `(b, 2 d)`: the values `y` in columns `0..d` and
/// the per-dimension `log dy/dx` in columns `d..2d`. Differentiable with respect to both inputs
/// (zero gradient in `theta`'s other columns); when either input is tracked, the forward pass
/// records the local Jacobian for the backward pass.
pub(crate) fn mixture_nonlinearity(
    x: &Tensor,
    theta: &Tensor,
    start: usize,
    spec: MixtureSpec,
) -> candle_core::Result<Tensor> {
    let (b, d) = x.dims2()?;
    let (bt, p) = theta.dims2()?;
    if bt != b || d != spec.dim || start + spec.n_params() > p {
        bail!(
            "mixture-nonlinearity: x {:?} and theta {:?} do not match (want (b, {}) and {} columns from column {start})",
            x.dims(),
            theta.dims(),
            spec.dim,
            spec.n_params()
        );
    }
    let tracked = x.track_op() || theta.track_op();
    let op = MixtureOp {
        spec,
        start,
        jac: tracked.then(|| std::sync::Mutex::new(Vec::new())),
    };
    x.contiguous()?.apply_op2(&theta.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nonlin: Nonlinearity) -> MixtureSpec {
        MixtureSpec {
            n_kernels: 4,
            dim: 2,
            width: BoundedLog::new(0.01, 1.0, 0.0),
            norm: BoundedLog::new(1.0, 10.0, 0.0),
            nonlin,
        }
    }

    /// A deterministic pseudo-random row of mixture parameters.
    fn row(n: usize, seed: u64) -> Vec<f64> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn linear_and_log_space_mixtures_agree() {
        let sp = spec(Nonlinearity::InverseSigmoid);
        let (mut a, mut b) = (MixScratch::new(4), MixScratch::new(4));
        for seed in 0..20 {
            let r = row(sp.n_params(), seed);
            // Includes points beyond the softplus threshold of every kernel (|u| > 20).
            for &x in &[-30.0, -3.0, -0.4, 0.0, 0.7, 2.5, 30.0] {
                for j in 0..2 {
                    let v = sp.eval(&r, j, x, &mut a);
                    let w = sp.eval_log(&r, j, x, &mut b);
                    for (p, q) in [(v.lf, w.lf), (v.ls, w.ls), (v.lpdf, w.lpdf)] {
                        assert!(
                            (p - q).abs() <= 1e-12 * q.abs().max(1.0),
                            "x={x} j={j}: {p} vs {q}"
                        );
                    }
                    for k in 0..4 {
                        for (p, q) in [
                            (a.wf[k], b.wf[k]),
                            (a.ws[k], b.ws[k]),
                            (a.wd[k], b.wd[k]),
                            (a.dsp[k], b.dsp[k]),
                        ] {
                            assert!(
                                (p - q).abs() <= 1e-12,
                                "x={x} j={j} k={k}: weight {p} vs {q}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn far_points_fall_back_to_log_space_and_stay_finite() {
        let sp = spec(Nonlinearity::InverseNormal);
        let mut s = MixScratch::new(4);
        let r = row(sp.n_params(), 3);
        for &x in &[-1e4, 1e4] {
            let v = sp.eval(&r, 0, x, &mut s);
            let e = sp.nonlin.eval(v.lf, v.ls);
            assert!(
                [v.lf, v.ls, v.lpdf, e.y, e.t].iter().all(|a| a.is_finite()),
                "x={x}: {v:?} {e:?}"
            );
            assert!(if x < 0.0 {
                v.lf < -500.0 && e.y < -30.0
            } else {
                v.ls < -500.0 && e.y > 30.0
            });
        }
    }
}
