//! The Gaussianization layer "g" of jammy_flows (`gf_block`, "classic", Householder rotation),
//! math §3.
//!
//! Density direction, per item: rotate `x' = Q^T x` with `Q = H(v_0) H(v_1) ... H(v_{d-1})`,
//! then map each dimension through the CDF of a K-kernel logistic mixture and a nonlinearity
//! ([`Nonlinearity::InverseNormal`] for the first layer of the reference flow,
//! [`Nonlinearity::InverseSigmoid`] for later ones). Parameters per item (`d^2 + 3 K d`, 99 for
//! d = 3, K = 10), all row-major:
//!
//! | slice | meaning |
//! |---|---|
//! | `[0, d^2)` | Householder vectors `v_i = p[d i .. d i + d]` |
//! | `[d^2, d^2 + K d)` | kernel means `m[k, j]` |
//! | next `K d` | raw log-widths: `w = 0.01 + 1.0 sigmoid(r)` (math §1, bounds configurable) |
//! | next `K d` | raw log-weights: `n = 1 + 10 sigmoid(r)`, `pi = n / sum_k n` |
//!
//! The sampling direction inverts each dimension's monotone map by a safeguarded Halley
//! iteration on the mixture logit `log F - log S` (bracketed, falling back to bisection),
//! which converges to 1e-12 relative (tested), mostly in a single evaluation thanks to sorted,
//! second-order warm starts; the inverse-normal nonlinearity is
//! inverted in closed form first (normal CDF in the central region, the Winitzki tail solved
//! for `log(F (1 - F))`). The linear-space evaluation used there reproduces the reference's
//! softplus threshold, so it inverts exactly the map `to_base` computes.
//! Where the CPU has AVX2 and FMA, the mixture's kernel loop (most of the sampler's time) runs
//! four kernels per step with its own `exp` (within 2 ulp of libm's, tested); roots then differ
//! from the scalar loop's in the last bits (≤ 3e-13 relative in `predict`'s summaries, measured).

use candle_core::{Tensor, D};

use crate::bijector::{check_points, check_theta, Bijector};
use crate::error::{FlowError, Result};
use crate::ops::{householder_reflect_cols, mixture_nonlinearity, MixScratch, MixtureSpec};
use crate::special::{inormal_target_logit, BoundedLog, Nonlinearity};

/// Settings of one Gaussianization layer. `Default` is the reference's layer 1/2 (isigmoid).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussianizationConfig {
    /// Kernels per dimension, K (reference: 10).
    pub n_kernels: usize,
    /// Nonlinearity after the mixture CDF.
    pub nonlinearity: Nonlinearity,
    /// Kernel width bounds `(lo, hi)`: `w = lo + hi sigmoid(r - ln hi)` (reference: 0.01, 1.0).
    pub width_bounds: (f64, f64),
    /// Kernel normalisation bounds `(lo, hi)`: `n = lo + hi sigmoid(r)` (reference: 1, 10).
    pub norm_bounds: (f64, f64),
}

impl Default for GaussianizationConfig {
    fn default() -> Self {
        Self {
            n_kernels: 10,
            nonlinearity: Nonlinearity::InverseSigmoid,
            width_bounds: (0.01, 1.0),
            norm_bounds: (1.0, 10.0),
        }
    }
}

/// A Gaussianization layer; see the module documentation.
#[derive(Debug, Clone)]
pub struct GaussianizationLayer {
    spec: MixtureSpec,
}

impl GaussianizationLayer {
    /// A layer over `dim` dimensions.
    pub fn new(dim: usize, cfg: &GaussianizationConfig) -> Result<Self> {
        if dim == 0 || cfg.n_kernels == 0 {
            return Err(FlowError::InvalidConfig(format!(
                "gaussianization layer needs dim >= 1 and n_kernels >= 1, got dim {dim}, n_kernels {}",
                cfg.n_kernels
            )));
        }
        let ok = |(lo, hi): (f64, f64)| lo > 0.0 && hi > 0.0 && lo.is_finite() && hi.is_finite();
        if !ok(cfg.width_bounds) || !ok(cfg.norm_bounds) {
            return Err(FlowError::InvalidConfig(format!(
                "width and norm bounds must be positive and finite, got {:?} and {:?}",
                cfg.width_bounds, cfg.norm_bounds
            )));
        }
        let (wl, wh) = cfg.width_bounds;
        let (nl, nh) = cfg.norm_bounds;
        Ok(Self {
            spec: MixtureSpec {
                n_kernels: cfg.n_kernels,
                dim,
                width: BoundedLog::new(wl, wh, wh.ln()),
                norm: BoundedLog::new(nl, nh, 0.0),
                nonlin: cfg.nonlinearity,
            },
        })
    }

    /// The nonlinearity of this layer.
    pub fn nonlinearity(&self) -> Nonlinearity {
        self.spec.nonlin
    }

    /// Number of Householder parameters, `d^2`.
    fn n_rot(&self) -> usize {
        self.spec.dim * self.spec.dim
    }
}

impl Bijector for GaussianizationLayer {
    fn kind(&self) -> &'static str {
        match self.spec.nonlin {
            Nonlinearity::InverseNormal => "gaussianization-inormal",
            Nonlinearity::InverseSigmoid => "gaussianization-isigmoid",
        }
    }

    fn dim(&self) -> usize {
        self.spec.dim
    }

    fn n_params(&self) -> usize {
        self.n_rot() + self.spec.n_params()
    }

    fn to_base(&self, x: &Tensor, theta: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = check_points(self, "to_base", x)?;
        check_theta(self, "to_base", theta, b)?;
        let d = self.spec.dim;
        // Both ops read their columns of the one contiguous parameter slice.
        let theta = theta.contiguous()?;
        let rotated = householder_reflect_cols(x, &theta, 0, self.n_rot())?;
        let out = mixture_nonlinearity(&rotated, &theta, self.n_rot(), self.spec)?;
        let y = out.narrow(1, 0, d)?;
        let log_det = out.narrow(1, d, d)?.sum(D::Minus1)?;
        Ok((y, log_det))
    }

    fn from_base_points(&self, theta: &[f64], points: &mut [f64]) -> Result<()> {
        let d = self.spec.dim;
        if theta.len() != self.n_params() || !points.len().is_multiple_of(d) {
            return Err(FlowError::Shape {
                op: "from_base_points",
                msg: format!(
                    "expected {} parameters and a multiple of {d} coordinates, got {} and {}",
                    self.n_params(),
                    theta.len(),
                    points.len()
                ),
            });
        }
        let (rot, row) = theta.split_at(self.n_rot());
        let n = points.len() / d;
        let mut scratch = MixScratch::new(self.spec.n_kernels);
        let mut targets = vec![0.0; n];
        let mut order: Vec<(u64, u32)> = Vec::with_capacity(n);
        for j in 0..d {
            let mix = DimMixture::new(&self.spec, row, j);
            for (t, pt) in targets.iter_mut().zip(points.chunks_exact(d)) {
                *t = match self.spec.nonlin {
                    Nonlinearity::InverseSigmoid => pt[j],
                    Nonlinearity::InverseNormal => inormal_target_logit(pt[j]),
                };
                if !t.is_finite() {
                    return Err(FlowError::NonFinite {
                        op: "gaussianization from_base",
                        value: pt[j],
                        item: 0,
                    });
                }
            }
            // Solving in increasing target order lets each root start from the previous one
            // (a lower bound, and a second-order step away), so most roots take one evaluation.
            order.clear();
            order.extend(
                targets
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (order_key(*t), i as u32)),
            );
            order.sort_unstable();
            let mut prev = None;
            for &(_, i) in &order {
                let i = i as usize;
                let (x, d1, d2) = mix.solve(targets[i], prev, &self.spec, row, &mut scratch);
                points[i * d + j] = x;
                prev = Some((x, targets[i], d1, d2));
            }
        }
        for pt in points.chunks_exact_mut(d) {
            // x = Q x' = H(v_0) (H(v_1) (... H(v_{d-1}) x')).
            for v in rot.chunks_exact(d).rev() {
                let nrm: f64 = v.iter().map(|a| a * a).sum();
                let dot: f64 = v.iter().zip(pt.iter()).map(|(a, b)| a * b).sum();
                let s = 2.0 * dot / nrm;
                for (xi, vi) in pt.iter_mut().zip(v) {
                    *xi -= s * vi;
                }
            }
        }
        Ok(())
    }
}

/// An integer whose order is the numeric order of finite `f64`s (sorting integers is
/// cheaper than `total_cmp` on indirect floats).
#[inline]
fn order_key(t: f64) -> u64 {
    let bits = t.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

/// Precomputed kernels of one dimension of one item, for the sampler's root find.
struct DimMixture {
    j: usize,
    m: Vec<f64>,
    inv_w: Vec<f64>,
    pi: Vec<f64>,
    pi_inv_w: Vec<f64>,
    m_min: f64,
    m_max: f64,
    /// Whether the CPU has AVX2 and FMA (then [`simd::linear_sums`] runs the kernel loop).
    #[cfg(target_arch = "x86_64")]
    avx2: bool,
}

/// Below this, `F` or `S` is recomputed in log space (linear space would underflow).
const TINY: f64 = 1e-280;
/// Softplus threshold of the reference: for `u < -20` it drops the `log1p(exp(u))` terms.
const NEG_THRESHOLD: f64 = -20.0;
/// Kernels per vector step of the sampler's kernel loop (the four f64 lanes of AVX2).
const KL: usize = 4;

impl DimMixture {
    fn new(spec: &MixtureSpec, row: &[f64], j: usize) -> Self {
        let (k_n, d) = (spec.n_kernels, spec.dim);
        // Padded to whole vector steps with kernels of weight zero (they add exact zeros).
        let padded = |f: &dyn Fn(usize) -> f64| -> Vec<f64> {
            (0..k_n.div_ceil(KL) * KL)
                .map(|k| if k < k_n { f(k) } else { 0.0 })
                .collect()
        };
        let m = padded(&|k| row[k * d + j]);
        // The same arithmetic as the density direction's linear path (`MixtureSpec::eval`).
        let inv_w = padded(&|k| 1.0 / spec.width.eval_linear(row[k_n * d + k * d + j]).0);
        let n = padded(&|k| spec.norm.eval_linear(row[2 * k_n * d + k * d + j]).0);
        let inv_sum = 1.0 / n.iter().sum::<f64>();
        let pi: Vec<f64> = n.iter().map(|a| a * inv_sum).collect();
        let pi_inv_w = pi.iter().zip(&inv_w).map(|(p, w)| p * w).collect();
        let m_min = m[..k_n].iter().copied().fold(f64::INFINITY, f64::min);
        let m_max = m[..k_n].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Self {
            j,
            m,
            inv_w,
            pi,
            pi_inv_w,
            m_min,
            m_max,
            #[cfg(target_arch = "x86_64")]
            avx2: simd::available(),
        }
    }

    /// `(F, S, f, f')` of the mixture at `x` in linear space: four kernels per AVX2 step where
    /// the CPU has it (the kernel loop is most of the sampler's time, and libm's `exp` is a
    /// scalar call), else one at a time.
    #[inline]
    fn linear_sums(&self, x: f64) -> [f64; 4] {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is set only where the CPU has AVX2 and FMA.
            return unsafe { simd::linear_sums(self, x) };
        }
        self.linear_sums_scalar(x)
    }

    /// [`Self::linear_sums`] one kernel at a time, with libm's `exp`: the twin the vector path is
    /// tested against, and the path of CPUs without AVX2.
    fn linear_sums_scalar(&self, x: f64) -> [f64; 4] {
        let (mut f_cdf, mut s_cdf, mut pdf, mut dpdf) = (0.0, 0.0, 0.0, 0.0);
        // Branch-free in the sign of u (which is unpredictable): with e = exp(-|u|) and
        // a = 1 / (1 + e), sigmoid(u) and sigmoid(-u) are a and e a in some order. Below the
        // reference's softplus threshold (u < -20) it drops the 1 + e, i.e. a = 1: then
        // F_k = e^u, S_k = 1 and f_k = e^u / w, exactly as its log-space form evaluates.
        for k in 0..self.m.len() {
            let u = (x - self.m[k]) * self.inv_w[k];
            let e = (-u.abs()).exp();
            let a = if u < NEG_THRESHOLD {
                1.0
            } else {
                1.0 / (1.0 + e)
            };
            let ea = e * a;
            let (fa, sa) = if u >= 0.0 { (a, ea) } else { (ea, a) };
            f_cdf += self.pi[k] * fa;
            s_cdf += self.pi[k] * sa;
            let dens = self.pi_inv_w[k] * ea * a;
            pdf += dens;
            // d/dx of the logistic density: its value times (sigmoid(-u) - sigmoid(u)) / w.
            dpdf += dens * (sa - fa) * self.inv_w[k];
        }
        [f_cdf, s_cdf, pdf, dpdf]
    }

    /// The mixture logit `G(x) = log F - log S` with `G'` and `G''`, with the reference's
    /// softplus threshold reproduced; log space (and `G'' = 0`) when linear space would
    /// underflow.
    #[inline]
    fn logit(
        &self,
        x: f64,
        spec: &MixtureSpec,
        row: &[f64],
        scratch: &mut MixScratch,
    ) -> (f64, f64, f64) {
        let [f_cdf, s_cdf, pdf, dpdf] = self.linear_sums(x);
        if f_cdf > TINY && s_cdf > TINY && pdf > TINY {
            let (rf, rs) = (1.0 / f_cdf, 1.0 / s_cdf);
            // G' = f/F + f/S; G'' = f' (1/F + 1/S) - f^2/F^2 + f^2/S^2.
            let g1 = pdf * (rf + rs);
            let g2 = dpdf * (rf + rs) - pdf * pdf * (rf * rf - rs * rs);
            ((f_cdf * rs).ln(), g1, g2)
        } else {
            let v = spec.eval(row, self.j, x, scratch);
            (v.lf - v.ls, (v.lpdf - v.lf - v.ls).exp(), 0.0)
        }
    }

    /// Solves `G(x) = target` by Halley's method inside a bracket, bisecting whenever a step
    /// leaves it. `prev = (x, G(x), G'(x), G''(x))` of an earlier root with a smaller or equal
    /// target gives a lower bound and a second-order starting point; otherwise the bracket is
    /// found by expanding around the kernel means. Returns the root with `G'` and `G''` near it.
    fn solve(
        &self,
        target: f64,
        prev: Option<(f64, f64, f64, f64)>,
        spec: &MixtureSpec,
        row: &[f64],
        scratch: &mut MixScratch,
    ) -> (f64, f64, f64) {
        let mut g = |x: f64| {
            let (v, d1, d2) = self.logit(x, spec, row, scratch);
            (v - target, d1, d2)
        };
        if let Some((xp, tp, d1, d2)) = prev {
            if target <= tp {
                return (xp, d1, d2);
            }
            if d1 > 0.0 && d1.is_finite() && d2.is_finite() {
                // Inverse-function Taylor step: x' = 1/G', x'' = -G''/G'^3.
                let dt = target - tp;
                let x0 = xp + dt / d1 - 0.5 * d2 * dt * dt / (d1 * d1 * d1);
                let x0 = if x0 > xp { x0 } else { xp + dt / d1 };
                if let Some(r) = halley(&mut g, x0, xp, f64::INFINITY) {
                    return r;
                }
            }
        }
        let (mut lo, mut hi) = (self.m_min - 1.0, self.m_max + 1.0);
        let mut glo = g(lo).0;
        let mut step = 1.0;
        while glo > 0.0 && step < 1e300 {
            hi = lo;
            lo -= step;
            step *= 2.0;
            glo = g(lo).0;
        }
        let mut ghi = g(hi).0;
        step = 1.0;
        while ghi < 0.0 && step < 1e300 {
            lo = hi;
            hi += step;
            step *= 2.0;
            ghi = g(hi).0;
        }
        let x0 = if ghi > glo {
            lo - glo * (hi - lo) / (ghi - glo)
        } else {
            0.5 * (lo + hi)
        };
        halley(&mut g, x0, lo, hi).unwrap_or((x0, 0.0, 0.0))
    }
}

/// Safeguarded Halley iteration for an increasing `g` (returning `g, g', g''`) with its root
/// in `(lo, hi)`, starting at `x`; falls back to a Newton step where the Halley denominator is
/// not positive. A step that leaves the bracket bisects it; with an unbounded side it gives up
/// (`None`). Stops once a step is below `1e-6` relative: Halley's cubic convergence then leaves
/// an error around `1e-18` times the curvature scale after that last step (~1e-14 even for the
/// narrowest kernels, width 0.01).
fn halley(
    g: &mut impl FnMut(f64) -> (f64, f64, f64),
    mut x: f64,
    mut lo: f64,
    mut hi: f64,
) -> Option<(f64, f64, f64)> {
    if !(x > lo && x < hi) {
        if !hi.is_finite() || !lo.is_finite() {
            return None;
        }
        x = 0.5 * (lo + hi);
    }
    for _ in 0..200 {
        let (gx, d1, d2) = g(x);
        if gx == 0.0 {
            return Some((x, d1, d2));
        }
        if gx < 0.0 {
            lo = x;
        } else {
            hi = x;
        }
        let denom = d1 * d1 - 0.5 * gx * d2;
        let dx = if denom > 0.0 {
            -gx * d1 / denom
        } else {
            -gx / d1
        };
        let mut xn = x + dx;
        let step_ok = xn > lo && xn < hi;
        if !step_ok {
            if !hi.is_finite() || !lo.is_finite() {
                return None;
            }
            xn = 0.5 * (lo + hi);
        }
        let scale = x.abs().max(1.0);
        if (step_ok && dx.abs() <= 1e-6 * scale) || hi - lo <= 4.0 * f64::EPSILON * scale {
            return Some((xn, d1, d2));
        }
        x = xn;
    }
    Some((x, 0.0, 0.0))
}

/// The sampler's kernel loop in AVX2 + FMA, four kernels per step.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{DimMixture, KL, NEG_THRESHOLD};

    /// Whether the CPU has AVX2 and FMA (std caches the detection).
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }

    /// `1 / k!` for `k ≤ 13`: the Taylor coefficients of [`exp_nonpositive`].
    const INV_FACT: [f64; 14] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5_040.0,
        1.0 / 40_320.0,
        1.0 / 362_880.0,
        1.0 / 3_628_800.0,
        1.0 / 39_916_800.0,
        1.0 / 479_001_600.0,
        1.0 / 6_227_020_800.0,
    ];

    /// `exp(t)` lane by lane for `t ≤ 0`, to about one ulp: `t = n ln 2 + r` with
    /// `|r| ≤ ln 2 / 2` (Cody–Waite with fdlibm's split of `ln 2`, whose high part makes `n ln 2`
    /// exact for `|n| < 2^11`), `exp(r)` by its Taylor series to `r^13` (truncation below 4e-18
    /// relative) in FMA Horner steps, and `2^n` built from the bits of the rounded `n`. Zero below
    /// −708 (the mixture's sums fall back to log space long before); NaN stays NaN.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_nonpositive(t: __m256d) -> __m256d {
        /// `1.5 · 2^52`: adding it rounds to an integer, which then sits in the low mantissa bits.
        const SHIFT: f64 = 6_755_399_441_055_744.0;
        const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
        const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
        let floor = _mm256_set1_pd(-708.0);
        let tc = _mm256_max_pd(t, floor);
        let shift = _mm256_set1_pd(SHIFT);
        let kd = _mm256_fmadd_pd(tc, _mm256_set1_pd(std::f64::consts::LOG2_E), shift);
        let n = _mm256_sub_pd(kd, shift);
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_HI), tc);
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_LO), r);
        let mut p = _mm256_set1_pd(INV_FACT[13]);
        for c in INV_FACT[..13].iter().rev() {
            p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(*c));
        }
        // The low 12 bits of `kd` hold `n` (two's complement, −1021 ≤ n ≤ 0), so `n + 1023`
        // shifted into place is the biased exponent of `2^n`.
        let biased = _mm256_add_epi64(_mm256_castpd_si256(kd), _mm256_set1_epi64x(1023));
        let scale = _mm256_castsi256_pd(_mm256_slli_epi64::<52>(biased));
        let y = _mm256_mul_pd(p, scale);
        let under = _mm256_cmp_pd::<_CMP_LT_OQ>(t, floor);
        let y = _mm256_andnot_pd(under, y);
        let nan = _mm256_cmp_pd::<_CMP_UNORD_Q>(t, t);
        _mm256_blendv_pd(y, t, nan)
    }

    /// [`DimMixture::linear_sums_scalar`] four kernels at a time (the same formulas; lanes summed
    /// at the end, so sums differ from the scalar loop's in the last bits).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn linear_sums(mix: &DimMixture, x: f64) -> [f64; 4] {
        let (one, zero) = (_mm256_set1_pd(1.0), _mm256_setzero_pd());
        let (xv, thr, sign) = (
            _mm256_set1_pd(x),
            _mm256_set1_pd(NEG_THRESHOLD),
            _mm256_set1_pd(-0.0),
        );
        let mut acc = [zero; 4];
        let lanes = |v: &[f64], c: usize| {
            let chunk: &[f64; KL] = v[c..c + KL].try_into().expect("padded to whole steps");
            // SAFETY: `chunk` is four in-bounds f64s; the load is unaligned.
            unsafe { _mm256_loadu_pd(chunk.as_ptr()) }
        };
        for c in (0..mix.m.len()).step_by(KL) {
            let inv_w = lanes(&mix.inv_w, c);
            let u = _mm256_mul_pd(_mm256_sub_pd(xv, lanes(&mix.m, c)), inv_w);
            let e = exp_nonpositive(_mm256_or_pd(u, sign));
            let a = _mm256_blendv_pd(
                _mm256_div_pd(one, _mm256_add_pd(one, e)),
                one,
                _mm256_cmp_pd::<_CMP_LT_OQ>(u, thr),
            );
            let ea = _mm256_mul_pd(e, a);
            let nonneg = _mm256_cmp_pd::<_CMP_GE_OQ>(u, zero);
            let fa = _mm256_blendv_pd(ea, a, nonneg);
            let sa = _mm256_blendv_pd(a, ea, nonneg);
            let pi = lanes(&mix.pi, c);
            acc[0] = _mm256_add_pd(acc[0], _mm256_mul_pd(pi, fa));
            acc[1] = _mm256_add_pd(acc[1], _mm256_mul_pd(pi, sa));
            let dens = _mm256_mul_pd(_mm256_mul_pd(lanes(&mix.pi_inv_w, c), ea), a);
            acc[2] = _mm256_add_pd(acc[2], dens);
            let slope = _mm256_mul_pd(_mm256_mul_pd(dens, _mm256_sub_pd(sa, fa)), inv_w);
            acc[3] = _mm256_add_pd(acc[3], slope);
        }
        acc.map(|v| {
            let mut l = [0.0; KL];
            // SAFETY: `l` holds four f64s; the store is unaligned.
            unsafe { _mm256_storeu_pd(l.as_mut_ptr(), v) };
            (l[0] + l[1]) + (l[2] + l[3])
        })
    }
}

#[cfg(test)]
mod tests {
    /// The AVX2 `exp` against libm's on a dense grid of `[-720, 0]`, at the edges of its range
    /// reduction and at the special values: within 2 ulp where the result is normal, zero below
    /// −708, NaN kept. Skipped (passes) on CPUs without AVX2 and FMA, which never run it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_matches_libm() {
        use std::arch::x86_64::{_mm256_loadu_pd, _mm256_storeu_pd};
        if !simd::available() {
            return;
        }
        let half_ln2 = std::f64::consts::LN_2 / 2.0;
        let grid = (0..=2_000_000).map(|i| -720.0 * f64::from(i) / 2e6);
        let edges = (0..1500).flat_map(|n| {
            let c = -f64::from(n) * half_ln2;
            [c, c - 1e-13, c + 1e-13]
        });
        let specials = [0.0, -0.0, f64::NEG_INFINITY, f64::NAN, -708.0, -707.9999];
        let ts: Vec<f64> = grid
            .chain(edges)
            .filter(|t| *t <= 0.0)
            .chain(specials)
            .collect();
        for chunk in ts.chunks(4) {
            let mut t = [0.0; 4];
            t[..chunk.len()].copy_from_slice(chunk);
            let mut got = [0.0; 4];
            // SAFETY: the CPU has AVX2 and FMA (checked above); loads and stores of four f64s.
            unsafe {
                let v = simd::exp_nonpositive(_mm256_loadu_pd(t.as_ptr()));
                _mm256_storeu_pd(got.as_mut_ptr(), v);
            }
            for (&t, &got) in t.iter().zip(&got) {
                let want = t.exp();
                if t.is_nan() {
                    assert!(got.is_nan());
                } else if t < -708.0 {
                    assert_eq!(got, 0.0, "t = {t}");
                } else {
                    let ulps = (got - want).abs() / (want * f64::EPSILON);
                    assert!(
                        ulps <= 2.0,
                        "t = {t}: {got:e} against {want:e} ({ulps:.2} ulp)"
                    );
                }
            }
        }
    }

    /// The vector kernel loop against its scalar twin on random mixtures, at points from far
    /// below the kernels (the softplus threshold) to far above: the same sums to 1e-14 relative.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_kernel_sums_match_the_scalar_loop() {
        if !simd::available() {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (k, std) in [(10, 1.0), (7, 2.0), (1, 0.5), (13, 3.0)] {
            let cfg = GaussianizationConfig {
                n_kernels: k,
                ..GaussianizationConfig::default()
            };
            let layer = GaussianizationLayer::new(3, &cfg).expect("valid");
            let row: Vec<f64> = (0..layer.n_params())
                .map(|_| std * rng.sample::<f64, _>(StandardNormal))
                .collect();
            for j in 0..3 {
                let mix = DimMixture::new(&layer.spec, &row[9..], j);
                for i in 0..=400 {
                    let x = -30.0 + 0.15 * f64::from(i);
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    let fast = unsafe { simd::linear_sums(&mix, x) };
                    let slow = mix.linear_sums_scalar(x);
                    for (f, s) in fast.iter().zip(&slow) {
                        let tol = 1e-14 * s.abs().max(1e-300);
                        assert!(
                            (f - s).abs() <= tol,
                            "K {k} x {x}: {fast:?} against {slow:?}"
                        );
                    }
                }
            }
        }
    }

    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_distr::StandardNormal;

    /// Every root the sampler returns, warm-started or not, is within 1e-12 (relative) of the
    /// exact root: the residual divided by the slope bounds the distance to it.
    #[test]
    fn root_finder_converges_to_1e_12() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
        for (seed, std) in [(0, 0.5), (1, 1.0), (2, 2.0)] {
            let layer =
                GaussianizationLayer::new(3, &GaussianizationConfig::default()).expect("valid");
            let row: Vec<f64> = (0..layer.n_params())
                .map(|_| std * rng.sample::<f64, _>(StandardNormal))
                .collect();
            let mix_row = &row[9..];
            let mut scratch = MixScratch::new(10);
            for j in 0..3 {
                let mix = DimMixture::new(&layer.spec, mix_row, j);
                let mut targets: Vec<f64> = (0..2000)
                    .map(|_| 3.0 * rng.sample::<f64, _>(StandardNormal))
                    .collect();
                targets.sort_by(f64::total_cmp);
                let mut prev = None;
                for &t in &targets {
                    let (x, d1, d2) = mix.solve(t, prev, &layer.spec, mix_row, &mut scratch);
                    prev = Some((x, t, d1, d2));
                    let cold = mix.solve(t, None, &layer.spec, mix_row, &mut scratch).0;
                    let (g, slope, _) = mix.logit(x, &layer.spec, mix_row, &mut scratch);
                    let err = ((g - t) / slope).abs();
                    assert!(
                        err <= 1e-12 * x.abs().max(1.0),
                        "seed {seed} dim {j} target {t}: x {x} off by ~{err:e}"
                    );
                    assert!(
                        (cold - x).abs() <= 2e-12 * x.abs().max(1.0),
                        "warm {x} vs cold {cold}"
                    );
                }
            }
        }
    }
}
