//! A monotone map of one standardised label axis, `v = g(u)`: piecewise linear through quantile
//! knots, linear beyond them. Recalibration ([`crate::calibration`]) fits one per label; the radial
//! map ([`crate::radial`]) uses one for the Mahalanobis radius.

use serde::{Deserialize, Serialize};
use starflow_flows::quantile_sorted;
use starflow_flows::special::{normal_cdf, normal_quantile};

/// A strictly increasing, piecewise-linear map `v = g(u)` through `knots`, extended linearly
/// beyond them with the slopes of the first and last segments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarginalMap {
    /// `(u, v)` knots, strictly increasing in both; at least two.
    pub knots: Vec<[f64; 2]>,
}

/// Probability levels of the quantile map's knots: dense in the tails, where the 95 % interval's
/// ends are, and used only where the validation split puts at least [`MIN_TAIL_STARS`] stars
/// beyond them.
pub(crate) const QUANTILE_KNOT_LEVELS: [f64; 17] = [
    0.005, 0.01, 0.02, 0.05, 0.1, 0.16, 0.25, 0.35, 0.5, 0.65, 0.75, 0.84, 0.9, 0.95, 0.98, 0.99,
    0.995,
];
/// A tail knot needs this many validation stars beyond it, or its quantile is mostly noise.
const MIN_TAIL_STARS: f64 = 5.0;
/// The smallest slope a fitted map may have: ties among the validation errors would otherwise
/// make it flat, and its inverse undefined.
const MIN_SLOPE: f64 = 1e-3;

impl MarginalMap {
    /// The affine map `g(u) = -c + s u`: the posterior moved by `c` of its own standard deviation
    /// and stretched about its mean by `s`.
    pub fn affine(shift: f64, scale: f64) -> Self {
        MarginalMap {
            knots: vec![[0.0, -shift], [1.0, -shift + scale]],
        }
    }

    /// The map that sends the quantiles of the posteriors' standardised shape to the empirical
    /// quantiles of `errors`, the standardised truths `(t - m) / σ` of a validation set, so that
    /// the recalibrated posteriors' quantiles, pooled over the stars, are the errors'. The shape
    /// is that of `reference`, standardised posterior samples pooled over the same stars (a
    /// sampled flow's marginals need not be Gaussian), or N(0, 1) when it is empty (Gaussian
    /// flows, exactly). `None` when there are too few errors for three knots.
    pub fn quantile(errors: &[f64], reference: &[f64]) -> Option<Self> {
        let sorted = |v: &[f64]| {
            let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let (e, r) = (sorted(errors), sorted(reference));
        let n = e.len() as f64;
        let levels: Vec<f64> = QUANTILE_KNOT_LEVELS
            .into_iter()
            .filter(|p| p.min(1.0 - p) * n >= MIN_TAIL_STARS)
            .collect();
        if levels.len() < 3 {
            return None;
        }
        let mut knots: Vec<[f64; 2]> = Vec::with_capacity(levels.len());
        for p in levels {
            let u = if r.is_empty() {
                normal_quantile(p)
            } else {
                quantile_sorted(&r, p)
            };
            let mut v = quantile_sorted(&e, p);
            if let Some(&[u0, v0]) = knots.last() {
                if u <= u0 {
                    continue;
                }
                v = v.max(v0 + MIN_SLOPE * (u - u0));
            }
            knots.push([u, v]);
        }
        (knots.len() >= 2).then_some(MarginalMap { knots })
    }

    /// The segment `(u0, v0, slope)` that `x` falls on, searching the knots' column `col`
    /// (0: input, 1: output).
    fn segment(&self, x: f64, col: usize) -> (f64, f64, f64) {
        let k = &self.knots;
        let i = k.partition_point(|p| p[col] <= x).clamp(1, k.len() - 1);
        let (a, b) = (k[i - 1], k[i]);
        (a[0], a[1], (b[1] - a[1]) / (b[0] - a[0]))
    }

    /// `g(u)`.
    pub fn forward(&self, u: f64) -> f64 {
        let (u0, v0, slope) = self.segment(u, 0);
        v0 + slope * (u - u0)
    }

    /// `g^{-1}(v)`.
    pub fn inverse(&self, v: f64) -> f64 {
        let (u0, v0, slope) = self.segment(v, 1);
        u0 + (v - v0) / slope
    }

    /// `g'(u)`, the factor by which the map stretches the axis at `u`.
    pub fn slope(&self, u: f64) -> f64 {
        self.segment(u, 0).2
    }

    /// Whether the map is affine (one slope everywhere).
    pub fn is_affine(&self) -> bool {
        let slopes: Vec<f64> = self
            .knots
            .windows(2)
            .map(|w| (w[1][1] - w[0][1]) / (w[1][0] - w[0][0]))
            .collect();
        slopes
            .iter()
            .all(|s| (s - slopes[0]).abs() <= 1e-12 * slopes[0])
    }

    /// Mean and standard deviation of `g(U)` for `U ~ N(0, 1)`, exactly: on each segment
    /// `g = a + b u`, and `E[U; l<U<h] = φ(l) - φ(h)`, `E[U²; l<U<h] = ΔΦ + lφ(l) - hφ(h)`.
    pub fn normal_moments(&self) -> (f64, f64) {
        if self.is_affine() {
            return (self.forward(0.0), self.slope(0.0));
        }
        let k = &self.knots;
        let mut bounds = vec![f64::NEG_INFINITY];
        bounds.extend(k[1..k.len() - 1].iter().map(|p| p[0]));
        bounds.push(f64::INFINITY);
        let (mut m1, mut m2) = (0.0, 0.0);
        for w in bounds.windows(2) {
            let (l, h) = (w[0], w[1]);
            let mid = if l.is_finite() && h.is_finite() {
                0.5 * (l + h)
            } else if l.is_finite() {
                l + 1.0
            } else {
                h - 1.0
            };
            let (u0, v0, b) = self.segment(mid, 0);
            let a = v0 - b * u0;
            let mass = normal_cdf(h) - normal_cdf(l);
            let e1 = density(l) - density(h);
            let e2 = mass + tail_term(l) - tail_term(h);
            m1 += a * mass + b * e1;
            m2 += a * a * mass + 2.0 * a * b * e1 + b * b * e2;
        }
        (m1, (m2 - m1 * m1).max(0.0).sqrt())
    }
}

/// `u φ(u)`, 0 at ±∞.
fn tail_term(u: f64) -> f64 {
    if u.is_finite() {
        u * density(u)
    } else {
        0.0
    }
}

/// The standard normal density.
pub(crate) fn density(u: f64) -> f64 {
    if u.is_finite() {
        (-0.5 * u * u).exp() / (2.0 * std::f64::consts::PI).sqrt()
    } else {
        0.0
    }
}
