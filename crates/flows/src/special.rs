//! Scalar f64 special functions shared by the fused CPU kernels and the sampler.
//!
//! candle has no erfinv, log-CDF tails, thresholded softplus or `logaddexp`, and the reference
//! (jammy_flows on PyTorch) depends on the exact form of each of them down to the 1e-12 level,
//! so they are written out once here, each with the derivative the hand-written backward passes
//! need. Formulas follow `reference/jammy_flows_math.md`; the section is named at each function.

/// `ln(2)`.
pub(crate) const LN_2: f64 = std::f64::consts::LN_2;
/// `ln(sqrt(2 pi))`, the normaliser of the standard normal density.
pub(crate) const LN_SQRT_2PI: f64 = 0.918_938_533_204_672_8;
/// PyTorch's default softplus threshold: above it, `softplus(v) = v` exactly.
const SOFTPLUS_THRESHOLD: f64 = 20.0;

/// PyTorch's `softplus(v)` (math §3b) and its derivative exactly as PyTorch's backward computes
/// them: `(v, 1)` for `v > 20`, else `(log1p(exp(v)), sigmoid(v))`.
#[inline]
pub(crate) fn softplus_t20(v: f64) -> (f64, f64) {
    if v > SOFTPLUS_THRESHOLD {
        (v, 1.0)
    } else {
        let e = v.exp();
        (e.ln_1p(), e / (1.0 + e))
    }
}

/// `log(exp(a) + exp(b))` the way `torch.logaddexp` evaluates it.
#[inline]
pub(crate) fn logaddexp(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY && b == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let m = a.max(b);
    m + (-(a - b).abs()).exp().ln_1p()
}

/// The bounded log-width map of math §1 and its derivative with respect to `r`:
/// `B(r) = logaddexp(ln hi - logaddexp(0, c - r), ln lo)`, i.e. `exp(B) = lo + hi sigmoid(r - c)`.
///
/// Evaluated in the linear form `ln(lo + hi s)`: `lo + hi s` lies in `[lo, lo + hi]`, so nothing
/// over- or underflows, and it agrees with the reference's log-space form to ~1e-16 relative
/// (math §1) while costing one `exp` and one `ln` instead of five transcendentals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BoundedLog {
    lo: f64,
    hi: f64,
    shift: f64,
}

impl BoundedLog {
    /// Bounds `lo..lo+hi` with shift `shift`.
    pub(crate) fn new(lo: f64, hi: f64, shift: f64) -> Self {
        Self { lo, hi, shift }
    }

    /// Returns `(exp(B(r)), B(r), dB/dr)`.
    #[inline]
    pub(crate) fn eval_full(&self, r: f64) -> (f64, f64, f64) {
        let (w, dw) = self.eval_linear(r);
        (w, w.ln(), dw)
    }

    /// Returns `(exp(B(r)), dB/dr)` without the logarithm.
    #[inline]
    pub(crate) fn eval_linear(&self, r: f64) -> (f64, f64) {
        let v = r - self.shift;
        // s = sigmoid(v) and 1 - s from one exponential.
        let e = (-v.abs()).exp();
        let inv = 1.0 / (1.0 + e);
        let (s, one_m_s) = if v >= 0.0 {
            (inv, e * inv)
        } else {
            (e * inv, inv)
        };
        let w = self.lo + self.hi * s;
        (w, self.hi * s * one_m_s / w)
    }

    /// Returns `(B(r), dB/dr)`.
    #[inline]
    pub(crate) fn eval(&self, r: f64) -> (f64, f64) {
        let (_, b, g) = self.eval_full(r);
        (b, g)
    }
}

/// `erf^{-1}(y)` for `|y| < 1` to full f64 precision: Giles' single-precision approximation as
/// a start, then Halley steps on `erf` (or `erfc` for `|y| > 1/2`, where `1 -+ y` is exact).
pub fn erfinv(y: f64) -> f64 {
    if y.is_nan() || y.abs() > 1.0 {
        return f64::NAN;
    }
    if y == 1.0 {
        return f64::INFINITY;
    }
    if y == -1.0 {
        return f64::NEG_INFINITY;
    }
    if y == 0.0 {
        return y;
    }
    let mut w = -((-y).ln_1p() + y.ln_1p());
    let mut r = if w < 5.0 {
        w -= 2.5;
        let mut p = 2.810_226_36e-08;
        p = 3.432_739_39e-07 + p * w;
        p = -3.523_387_7e-06 + p * w;
        p = -4.391_506_54e-06 + p * w;
        p = 0.000_218_580_87 + p * w;
        p = -0.001_253_725_03 + p * w;
        p = -0.004_177_681_64 + p * w;
        p = 0.246_640_727 + p * w;
        p = 1.501_409_41 + p * w;
        p * y
    } else {
        w = w.sqrt() - 3.0;
        let mut p = -0.000_200_214_257;
        p = 0.000_100_950_558 + p * w;
        p = 0.001_349_343_22 + p * w;
        p = -0.003_673_428_44 + p * w;
        p = 0.005_739_507_73 + p * w;
        p = -0.007_622_461_3 + p * w;
        p = 0.009_438_870_47 + p * w;
        p = 1.001_674_06 + p * w;
        p = 2.832_976_82 + p * w;
        p * y
    };
    const TWO_OVER_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;
    for _ in 0..3 {
        let f = if y > 0.5 {
            (1.0 - y) - libm::erfc(r)
        } else if y < -0.5 {
            libm::erfc(-r) - (1.0 + y)
        } else {
            libm::erf(r) - y
        };
        let fp = TWO_OVER_SQRT_PI * (-r * r).exp();
        if fp == 0.0 || f == 0.0 {
            break;
        }
        let q = f / fp;
        r -= q / (1.0 + r * q);
    }
    r
}

/// The per-dimension nonlinearity of a Gaussianization layer (math §3c), applied to the
/// mixture's `log F` and `log S = log(1 - F)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nonlinearity {
    /// `inormal_partly_precise`: the inverse normal CDF with jammy's Winitzki tail
    /// approximation for `F <= 5e-8` or `F >= 1 - 5e-8` (used by the first g layer).
    InverseNormal,
    /// `isigmoid`: the logit of the mixture CDF (used by the later g layers).
    InverseSigmoid,
}

/// Value `y`, the log-derivative term `t` (so that `log dy/dx = log f + t`) and their partial
/// derivatives with respect to `log F` and `log S`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NonlinEval {
    pub y: f64,
    pub t: f64,
    pub dy_dlf: f64,
    pub dy_dls: f64,
    pub dt_dlf: f64,
    pub dt_dls: f64,
}

/// Tail bound of `inormal_partly_precise`.
pub(crate) const INORMAL_TAIL: f64 = 5e-8;
/// Winitzki's constant `a`.
const WINITZKI_A: f64 = 0.147;

/// `c = 2 / (pi a)` of the Winitzki approximation.
#[inline]
fn winitzki_c() -> f64 {
    2.0 / (std::f64::consts::PI * WINITZKI_A)
}

impl Nonlinearity {
    /// Evaluates the nonlinearity and its partial derivatives (math §3c).
    #[inline]
    pub(crate) fn eval(self, lf: f64, ls: f64) -> NonlinEval {
        match self {
            Nonlinearity::InverseSigmoid => {
                let t = logaddexp(-ls, -lf);
                NonlinEval {
                    y: lf - ls,
                    t,
                    dy_dlf: 1.0,
                    dy_dls: -1.0,
                    dt_dlf: -(-lf - t).exp(),
                    dt_dls: -(-ls - t).exp(),
                }
            }
            Nonlinearity::InverseNormal => {
                let f = lf.exp();
                if f > INORMAL_TAIL && f < 1.0 - INORMAL_TAIL {
                    // Central region: y = sqrt(2) erfinv(2F - 1), t = ln sqrt(2 pi) + erfinv^2.
                    let e = erfinv(2.0 * f - 1.0);
                    // d erfinv(2F - 1) / d log F = sqrt(pi) exp(e^2) F.
                    let de = std::f64::consts::PI.sqrt() * (e * e).exp() * f;
                    NonlinEval {
                        y: std::f64::consts::SQRT_2 * e,
                        t: LN_SQRT_2PI + e * e,
                        dy_dlf: std::f64::consts::SQRT_2 * de,
                        dy_dls: 0.0,
                        dt_dlf: 2.0 * e * de,
                        dt_dls: 0.0,
                    }
                } else {
                    inormal_tail(lf, ls, f)
                }
            }
        }
    }
}

/// The Winitzki tail of `inormal_partly_precise` with its exact derivative (math §3c).
#[inline]
fn inormal_tail(lf: f64, ls: f64, f: f64) -> NonlinEval {
    let a = WINITZKI_A;
    let l = lf + ls + 2.0 * LN_2;
    let c = winitzki_c() + 0.5 * l;
    let r = (c * c - l / a).sqrt();
    let rc = r - c;
    let tv = (2.0 * rc).max(0.0).sqrt();
    let sign = if f >= 1.0 - INORMAL_TAIL { 1.0 } else { -1.0 };
    let big_a = r + 1.0 / a - c;
    let one_m_2f = 1.0 - 2.0 * f;
    let t =
        big_a.ln() - 0.5 * (8.0f64).ln() - 0.5 * rc.ln() - r.ln() - lf - ls + one_m_2f.abs().ln();
    // Derivatives with respect to L (dL/dlog F = dL/dlog S = 1).
    let dr = (c - 1.0 / a) / (2.0 * r);
    let dy_dl = if tv > 0.0 {
        sign * (dr - 0.5) / tv
    } else {
        0.0
    };
    let dt_dl = (dr - 0.5) / big_a - 0.5 * (dr - 0.5) / rc - dr / r;
    NonlinEval {
        y: sign * tv,
        t,
        dy_dlf: dy_dl,
        dy_dls: dy_dl,
        dt_dlf: dt_dl - 1.0 - 2.0 * f / one_m_2f,
        dt_dls: dt_dl - 1.0,
    }
}

/// For the sampler: the mixture logit `log F - log S` whose [`Nonlinearity::InverseNormal`]
/// value is `z`. The central branch inverts exactly through the normal CDF; the tail branch
/// inverts the Winitzki approximation in closed form. A `z` that falls in the small gap between
/// the branches (where the reference map is discontinuous) maps to the switch point.
pub(crate) fn inormal_target_logit(z: f64) -> f64 {
    // Phi(z) from one erfc on the side where it is small; the other side is exact as 1 - it.
    let small_c = 0.5 * libm::erfc(z.abs() * std::f64::consts::FRAC_1_SQRT_2);
    if small_c > INORMAL_TAIL {
        let logit = small_c.ln() - (-small_c).ln_1p();
        return if z < 0.0 { logit } else { -logit };
    }
    // Tail: with q = z^2 / 2 = R - C, R^2 = C^2 - L/a and C = c + L/2 give
    // L = -(q^2 + 2 q c) / (q + 1/a), and F (1 - F) = exp(L) / 4.
    let q = 0.5 * z * z;
    let l = -(q * q + 2.0 * q * winitzki_c()) / (q + 1.0 / WINITZKI_A);
    let p = (l - 2.0 * LN_2).exp();
    // The smaller root of F (1 - F) = p, computed without cancellation.
    let small = 2.0 * p / (1.0 + (1.0 - 4.0 * p).max(0.0).sqrt());
    let small = small.min(INORMAL_TAIL);
    let (ln_small, ln_big) = (small.ln(), (-small).ln_1p());
    if z < 0.0 {
        ln_small - ln_big
    } else {
        ln_big - ln_small
    }
}

/// The standard normal CDF `Φ(x)`, for PITs, coverages and interval masses: the one
/// implementation every crate uses. erf is Numerical Recipes' erfc Chebyshev fit (|error| <
/// 1.2e-7), ample where the result is compared with a uniform draw or counted into a coverage;
/// the sampler's tails, which need full precision far out, use `libm::erfc` instead
/// (`inormal_target_logit`).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + erf_approx(x / std::f64::consts::SQRT_2))
}

/// erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit).
fn erf_approx(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        1.0 - r
    } else {
        r - 1.0
    }
}

/// CDF of the chi-square distribution with `k` degrees of freedom at `x`: the regularised lower
/// incomplete gamma `P(k/2, x/2)`, by the upward recursion `P(a+1, y) = P(a, y) - y^a e^-y /
/// Gamma(a+1)` from `P(1/2, y) = erf(sqrt y)` or `P(1, y) = 1 - e^-y` (the joint HPD levels of
/// Gaussian posteriors; erf as in [`normal_cdf`]).
pub fn chi2_cdf(k: usize, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let y = 0.5 * x;
    let (mut a, mut p, mut term) = if k % 2 == 1 {
        // term = y^a e^-y / Gamma(a + 1) at a = 1/2, Gamma(3/2) = sqrt(pi) / 2.
        (
            0.5,
            erf_approx(y.sqrt()),
            y.sqrt() * (-y).exp() / (0.5 * std::f64::consts::PI.sqrt()),
        )
    } else {
        (1.0, 1.0 - (-y).exp(), y * (-y).exp())
    };
    while a + 1.0 <= 0.5 * k as f64 {
        p -= term;
        a += 1.0;
        term *= y / (a + 1.0);
    }
    p.clamp(0.0, 1.0)
}

/// `Φ^{-1}(p)` to full f64 precision, through [`erfinv`].
pub fn normal_quantile(p: f64) -> f64 {
    std::f64::consts::SQRT_2 * erfinv(2.0 * p - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_is_within_its_stated_error_and_normal_quantile_inverts_it() {
        // Against libm's erfc (full precision) over the body and both tails.
        for i in -800..=800 {
            let x = f64::from(i) / 100.0;
            let exact = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
            assert!((normal_cdf(x) - exact).abs() < 1.2e-7, "{x}");
        }
        assert!((normal_cdf(1.0) - 0.841_344_746).abs() < 2e-7);
        assert!((normal_cdf(-1.959_964) - 0.025).abs() < 2e-7);
        for p in [1e-9, 0.001, 0.025, 0.16, 0.5, 0.84, 0.975, 0.999] {
            let x = normal_quantile(p);
            let back = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
            assert!((back - p).abs() < 1e-12 * p.max(1e-3), "{p}: {x} -> {back}");
        }
        assert!((normal_quantile(0.975) - 1.959_963_984_540_054).abs() < 1e-12);
    }

    #[test]
    fn erfinv_inverts_erf() {
        for &y in &[
            -0.999_999_9,
            -0.9,
            -0.5,
            -1e-3,
            1e-9,
            0.3,
            0.7,
            0.99,
            0.999_999_99,
        ] {
            let x = erfinv(y);
            let back = libm::erf(x);
            assert!(
                (back - y).abs() <= 2e-16 * (1.0 + y.abs()),
                "y={y} x={x} back={back}"
            );
        }
    }

    #[test]
    fn bounded_log_matches_closed_form_and_derivative() {
        let b = BoundedLog::new(0.01, 100.0, 100f64.ln());
        for &r in &[-30.0, -3.0, 0.0, 2.5, 4.6, 10.0, 40.0] {
            let (v, g) = b.eval(r);
            // The reference's log-space form (math §1).
            let c = 100f64.ln();
            let sp = logaddexp(0.0, c - r);
            let reference = logaddexp(100f64.ln() - sp, 0.01f64.ln());
            assert!(
                (v - reference).abs() <= 2e-15 * reference.abs().max(1.0),
                "r={r}: {v} vs {reference}"
            );
            let h = 1e-6;
            let fd = (b.eval(r + h).0 - b.eval(r - h).0) / (2.0 * h);
            assert!(
                (g - fd).abs() < 1e-8 * (1.0 + g.abs()),
                "r={r} g={g} fd={fd}"
            );
        }
    }

    #[test]
    fn nonlinearity_partials_match_finite_differences() {
        for nl in [Nonlinearity::InverseNormal, Nonlinearity::InverseSigmoid] {
            // (log F, log S) pairs in the central region and both tails.
            for &lf in &[-1e-9f64, -0.3, -0.69, -2.0, -18.0, -40.0] {
                let ls = (-lf.exp()).ln_1p();
                // Small enough steps that no difference crosses the tail switch at F = 1 - 5e-8.
                let h = if lf.abs() < 1e-6 { 1e-10 } else { 1e-6 };
                let e = nl.eval(lf, ls);
                let fd = |df: f64, ds: f64| {
                    let p = nl.eval(lf + df, ls + ds);
                    let m = nl.eval(lf - df, ls - ds);
                    ((p.y - m.y) / (2.0 * h), (p.t - m.t) / (2.0 * h))
                };
                let (yf, tf) = fd(h, 0.0);
                let (ys, ts) = fd(0.0, h);
                for (a, b) in [
                    (e.dy_dlf, yf),
                    (e.dt_dlf, tf),
                    (e.dy_dls, ys),
                    (e.dt_dls, ts),
                ] {
                    assert!(
                        (a - b).abs() < 1e-5 * (1.0 + a.abs()),
                        "{nl:?} lf={lf}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn inormal_target_inverts_the_value_map() {
        for &z in &[-7.0, -5.5, -5.0, -2.0, 0.0, 0.4, 3.0, 5.2, 6.5] {
            let logit = inormal_target_logit(z);
            // Recover log F, log S from the logit and push them through the forward map.
            let lf = if logit > 0.0 {
                -(-logit).exp().ln_1p()
            } else {
                logit - logit.exp().ln_1p()
            };
            let ls = lf - logit;
            let y = Nonlinearity::InverseNormal.eval(lf, ls).y;
            assert!((y - z).abs() < 1e-9, "z={z} y={y}");
        }
    }
}
