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

use crate::special::{logsumexp, softplus_t20, softplus_t20_grad, BoundedLog, Nonlinearity};

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

struct HouseholderOp {
    dim: usize,
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
        let nv = v.len() / b.max(1);
        let mut out = x.to_vec();
        for (row, vs) in out.chunks_exact_mut(d).zip(v.chunks_exact(nv)) {
            reflect_row(row, vs, None);
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
        let nv = v.len() / b.max(1);
        let mut gx = vec![0.0; x.len()];
        let mut gv = vec![0.0; v.len()];
        let mut trace = Vec::with_capacity(nv);
        for i in 0..b {
            let mut row = x[i * d..(i + 1) * d].to_vec();
            let vs = &v[i * nv..(i + 1) * nv];
            trace.clear();
            reflect_row(&mut row, vs, Some(&mut trace));
            let mut gr = g[i * d..(i + 1) * d].to_vec();
            let gvs = &mut gv[i * nv..(i + 1) * nv];
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
    let (b, d) = x.dims2()?;
    let (bv, nv) = v.dims2()?;
    if bv != b || d == 0 || nv % d != 0 {
        bail!(
            "householder-reflect: x {:?} and v {:?} do not match (want v: (b, n d))",
            x.dims(),
            v.dims()
        );
    }
    x.contiguous()?
        .apply_op2(&v.contiguous()?, HouseholderOp { dim: d })
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

/// Per-kernel intermediate values for one (row, dimension).
#[derive(Debug, Default)]
pub(crate) struct MixScratch {
    lw: Vec<f64>,
    dlw: Vec<f64>,
    ln: Vec<f64>,
    dln: Vec<f64>,
    u: Vec<f64>,
    af: Vec<f64>,
    asv: Vec<f64>,
    afd: Vec<f64>,
    lse_n: f64,
}

impl MixScratch {
    pub(crate) fn new(k: usize) -> Self {
        let z = vec![0.0; k];
        Self {
            lw: z.clone(),
            dlw: z.clone(),
            ln: z.clone(),
            dln: z.clone(),
            u: z.clone(),
            af: z.clone(),
            asv: z.clone(),
            afd: z,
            lse_n: 0.0,
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

impl MixtureSpec {
    /// Width of the mixture part of a layer's parameter slice: means, widths and weights.
    pub(crate) fn n_params(&self) -> usize {
        3 * self.n_kernels * self.dim
    }

    /// Evaluates the mixture of math §3b at `x` for dimension `j` of one parameter row
    /// (`row` = the `3 K d` mixture parameters), filling `s` for a backward pass.
    #[inline]
    pub(crate) fn eval(&self, row: &[f64], j: usize, x: f64, s: &mut MixScratch) -> MixValue {
        let (k_n, d) = (self.n_kernels, self.dim);
        for k in 0..k_n {
            let (lw, dlw) = self.width.eval(row[k_n * d + k * d + j]);
            let (ln, dln) = self.norm.eval(row[2 * k_n * d + k * d + j]);
            s.lw[k] = lw;
            s.dlw[k] = dlw;
            s.ln[k] = ln;
            s.dln[k] = dln;
        }
        s.lse_n = logsumexp(&s.ln);
        for k in 0..k_n {
            let lpi = s.ln[k] - s.lse_n;
            let u = (x - row[k * d + j]) / s.lw[k].exp();
            let sp = softplus_t20(-u);
            s.u[k] = u;
            s.af[k] = lpi - sp;
            s.asv[k] = lpi - u - sp;
            s.afd[k] = lpi - s.lw[k] - u - 2.0 * sp;
        }
        MixValue {
            lf: logsumexp(&s.af),
            ls: logsumexp(&s.asv),
            lpdf: logsumexp(&s.afd),
        }
    }

    /// Vector-Jacobian product of [`Self::eval`] (which must have just filled `s`) given the
    /// gradients with respect to `log F`, `log S` and `log f`; accumulates into `grow` (same
    /// layout as `row`) and returns the gradient with respect to `x`.
    #[inline]
    pub(crate) fn backward(
        &self,
        v: MixValue,
        g: (f64, f64, f64),
        j: usize,
        s: &MixScratch,
        grow: &mut [f64],
    ) -> f64 {
        let (k_n, d) = (self.n_kernels, self.dim);
        let (g_lf, g_ls, g_lpdf) = g;
        let mut gx = 0.0;
        let mut sum_glpi = 0.0;
        // First pass: the per-kernel terms. The normalisation gradient needs the sum over all
        // kernels, so it is finished in a second pass.
        for k in 0..k_n {
            let ga = g_lf * (s.af[k] - v.lf).exp();
            let gs = g_ls * (s.asv[k] - v.ls).exp();
            let gd = g_lpdf * (s.afd[k] - v.lpdf).exp();
            let u = s.u[k];
            let dsp = softplus_t20_grad(-u);
            // aF = lpi - sp(-u); aS = lpi - u - sp(-u); af = lpi - lw - u - 2 sp(-u).
            let gu = ga * dsp + gs * (dsp - 1.0) + gd * (2.0 * dsp - 1.0);
            let glpi = ga + gs + gd;
            let inv_w = (-s.lw[k]).exp();
            // u = (x - m) / w: du/dx = 1/w, du/dm = -1/w, du/dlog w = -u.
            gx += gu * inv_w;
            grow[k * d + j] += -gu * inv_w;
            let glw = -gd - gu * u;
            grow[k_n * d + k * d + j] += glw * s.dlw[k];
            grow[2 * k_n * d + k * d + j] += glpi * s.dln[k];
            sum_glpi += glpi;
        }
        // log pi_k = log n_k - logsumexp(log n): subtract softmax(log n)_k * sum of gradients.
        for k in 0..k_n {
            let p = (s.ln[k] - s.lse_n).exp();
            grow[2 * k_n * d + k * d + j] -= p * sum_glpi * s.dln[k];
        }
        gx
    }
}

struct MixtureOp(MixtureSpec);

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
        let spec = &self.0;
        let (d, p) = (spec.dim, spec.n_params());
        let b = x.len() / d;
        let mut out = vec![0.0; b * 2 * d];
        let mut s = MixScratch::new(spec.n_kernels);
        for i in 0..b {
            let row = &th[i * p..(i + 1) * p];
            for j in 0..d {
                let v = spec.eval(row, j, x[i * d + j], &mut s);
                let e = spec.nonlin.eval(v.lf, v.ls);
                out[i * 2 * d + j] = e.y;
                out[i * 2 * d + d + j] = v.lpdf + e.t;
            }
        }
        Ok((CpuStorage::F64(out), Shape::from((b, 2 * d))))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let x = flat(arg1)?;
        let th = flat(arg2)?;
        let g = flat(grad_res)?;
        let spec = &self.0;
        let (d, p) = (spec.dim, spec.n_params());
        let b = x.len() / d;
        let mut gx = vec![0.0; x.len()];
        let mut gth = vec![0.0; th.len()];
        let mut s = MixScratch::new(spec.n_kernels);
        for i in 0..b {
            let row = &th[i * p..(i + 1) * p];
            let grow = &mut gth[i * p..(i + 1) * p];
            for j in 0..d {
                let v = spec.eval(row, j, x[i * d + j], &mut s);
                let e = spec.nonlin.eval(v.lf, v.ls);
                let gy = g[i * 2 * d + j];
                let gld = g[i * 2 * d + d + j];
                let g_lf = gy * e.dy_dlf + gld * e.dt_dlf;
                let g_ls = gy * e.dy_dls + gld * e.dt_dls;
                gx[i * d + j] = spec.backward(v, (g_lf, g_ls, gld), j, &s, grow);
            }
        }
        let gx = Tensor::from_vec(gx, arg1.shape(), arg1.device())?;
        let gth = Tensor::from_vec(gth, arg2.shape(), arg2.device())?;
        Ok((Some(gx), Some(gth)))
    }
}

/// The per-dimension map of a Gaussianization layer (math §3b–§3c): for `x: (b, d)` and the
/// mixture parameters `theta: (b, 3 K d)` (means, raw widths, raw weights, each `(K, d)`
/// row-major) returns `(b, 2 d)`: the values `y` in columns `0..d` and the per-dimension
/// `log dy/dx` in columns `d..2d`. Differentiable with respect to both inputs.
pub(crate) fn mixture_nonlinearity(
    x: &Tensor,
    theta: &Tensor,
    spec: MixtureSpec,
) -> candle_core::Result<Tensor> {
    let (b, d) = x.dims2()?;
    let (bt, p) = theta.dims2()?;
    if bt != b || d != spec.dim || p != spec.n_params() {
        bail!(
            "mixture-nonlinearity: x {:?} and theta {:?} do not match (want (b, {}) and (b, {}))",
            x.dims(),
            theta.dims(),
            spec.dim,
            spec.n_params()
        );
    }
    x.contiguous()?
        .apply_op2(&theta.contiguous()?, MixtureOp(spec))
}
