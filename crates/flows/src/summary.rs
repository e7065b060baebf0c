//! Posterior summaries per star: from samples (any flow) or analytically (Gaussian flows).
//!
//! Downstream code (training metrics, reports) wants a mean, a spread, a covariance and a few
//! quantiles per star, not raw samples, so the reductions live next to the sampler and run in
//! parallel over stars.

use rayon::prelude::*;

/// Quantile levels of every summary: 2.5 %, 16 %, 50 %, 84 %, 97.5 %.
pub const QUANTILE_LEVELS: [f64; 5] = [0.025, 0.16, 0.5, 0.84, 0.975];

/// Summary of one star's posterior over the d labels.
#[derive(Debug, Clone, PartialEq)]
pub struct PosteriorSummary {
    /// Mean, `(d,)`.
    pub mean: Vec<f64>,
    /// Standard deviation (unbiased, `n - 1`), `(d,)`.
    pub std: Vec<f64>,
    /// Covariance (unbiased), `(d, d)` row-major.
    pub cov: Vec<f64>,
    /// Per dimension, the quantiles at [`QUANTILE_LEVELS`].
    pub quantiles: Vec<[f64; 5]>,
}

/// Samples drawn from a flow: `n_items x n_per_item` points of dimension `dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    /// Number of items (stars), b.
    pub n_items: usize,
    /// Samples per item, n.
    pub n_per_item: usize,
    /// Dimension d.
    pub dim: usize,
    /// `(b, n, d)` row-major.
    pub values: Vec<f64>,
}

impl Samples {
    /// The `(n, d)` samples of item `i`, row-major.
    pub fn item(&self, i: usize) -> &[f64] {
        let w = self.n_per_item * self.dim;
        &self.values[i * w..(i + 1) * w]
    }

    /// The samples as an f64 tensor of shape `(b, n, d)`.
    pub fn to_tensor(
        &self,
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_slice(
            &self.values,
            (self.n_items, self.n_per_item, self.dim),
            device,
        )
    }

    /// One summary per item, computed in parallel.
    pub fn summarize(&self) -> Vec<PosteriorSummary> {
        (0..self.n_items)
            .into_par_iter()
            .map(|i| summarize_points(self.item(i), self.dim))
            .collect()
    }
}

/// Summary of `n` points of dimension `dim` stored row-major in `points`. Quantiles use linear
/// interpolation between order statistics (numpy's default). Needs `n >= 2` for a finite std.
pub fn summarize_points(points: &[f64], dim: usize) -> PosteriorSummary {
    let n = points.len() / dim.max(1);
    let nf = n as f64;
    let mut mean = vec![0.0; dim];
    for p in points.chunks_exact(dim) {
        for (m, v) in mean.iter_mut().zip(p) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= nf);
    let mut cov = vec![0.0; dim * dim];
    for p in points.chunks_exact(dim) {
        for i in 0..dim {
            let di = p[i] - mean[i];
            for j in 0..=i {
                cov[i * dim + j] += di * (p[j] - mean[j]);
            }
        }
    }
    let denom = (nf - 1.0).max(0.0);
    for i in 0..dim {
        for j in 0..=i {
            let c = cov[i * dim + j] / denom;
            cov[i * dim + j] = c;
            cov[j * dim + i] = c;
        }
    }
    let std = (0..dim).map(|i| cov[i * dim + i].sqrt()).collect();
    let mut col = vec![0.0; n];
    let quantiles = (0..dim)
        .map(|j| {
            for (c, p) in col.iter_mut().zip(points.chunks_exact(dim)) {
                *c = p[j];
            }
            select_order_statistics(&mut col);
            QUANTILE_LEVELS.map(|q| quantile_sorted(&col, q))
        })
        .collect();
    PosteriorSummary {
        mean,
        std,
        cov,
        quantiles,
    }
}

/// The positions of `values` that [`quantile_sorted`] reads at [`QUANTILE_LEVELS`], ascending.
fn quantile_positions(n: usize) -> impl Iterator<Item = usize> {
    QUANTILE_LEVELS.into_iter().flat_map(move |q| {
        let (lo, hi, _) = quantile_bracket(n, q);
        [lo, hi]
    })
}

/// The two order statistics `(lo, hi)` of `n ≥ 2` sorted values that the linear-interpolation
/// quantile `q` reads, and the weight `frac` of the upper one: one definition for
/// [`quantile_sorted`] and for the selection that must put exactly those in place.
fn quantile_bracket(n: usize, q: f64) -> (usize, usize, f64) {
    let pos = q * (n - 1) as f64;
    let lo = pos.floor() as usize;
    (lo, (lo + 1).min(n - 1), pos - lo as f64)
}

/// Puts the order statistics that [`quantile_sorted`] reads at [`QUANTILE_LEVELS`] in their sorted
/// places (in the total order of f64), leaving the rest unsorted: successive selections on the
/// shrinking right part, several times cheaper than sorting a posterior's 1,000 samples, and the
/// same quantiles to the bit.
fn select_order_statistics(values: &mut [f64]) {
    if values.len() < 2 {
        return;
    }
    let mut start = 0;
    for k in quantile_positions(values.len()) {
        if k >= start {
            values[start..].select_nth_unstable_by(k - start, f64::total_cmp);
            start = k + 1;
        }
    }
}

/// Linear-interpolation quantile of sorted values (numpy's default "linear" method); NaN when
/// there are none.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let (lo, hi, frac) = quantile_bracket(n, q);
            sorted[lo] + frac * (sorted[hi] - sorted[lo])
        }
    }
}

/// Exact moments of a Gaussian flow for one item: `x ~ N(mean, cov)`.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianMoments {
    /// Mean `mu`, `(d,)`.
    pub mean: Vec<f64>,
    /// Covariance `L L^T`, `(d, d)` row-major.
    pub cov: Vec<f64>,
}

impl GaussianMoments {
    /// From the affine layer's `mu` and lower-triangular `L` (row-major).
    pub(crate) fn from_factor(mean: Vec<f64>, l: &[f64]) -> Self {
        let d = mean.len();
        let mut cov = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                cov[i * d + j] = (0..d).map(|k| l[i * d + k] * l[j * d + k]).sum();
            }
        }
        Self { mean, cov }
    }

    /// The analytic summary: marginal std and the normal quantiles `mu + sigma Phi^{-1}(q)`.
    pub fn to_summary(&self) -> PosteriorSummary {
        let d = self.mean.len();
        let std: Vec<f64> = (0..d).map(|i| self.cov[i * d + i].sqrt()).collect();
        let z = QUANTILE_LEVELS.map(crate::special::normal_quantile);
        let quantiles = (0..d)
            .map(|i| z.map(|zq| self.mean[i] + std[i] * zq))
            .collect();
        PosteriorSummary {
            mean: self.mean.clone(),
            std,
            cov: self.cov.clone(),
            quantiles,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The selected order statistics give the quantiles of a full sort, bit for bit, on samples
    /// with ties, NaN-free heavy tails and sizes down to 2.
    #[test]
    fn selected_quantiles_equal_sorted_ones() {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for n in [2, 3, 5, 11, 40, 1000, 1001] {
            let v: Vec<f64> = (0..n)
                .map(|i| {
                    let u = next();
                    if i % 7 == 0 {
                        0.5
                    } else {
                        (u - 0.5) / (1.0 - u).max(1e-3)
                    }
                })
                .collect();
            let mut sorted = v.clone();
            sorted.sort_unstable_by(f64::total_cmp);
            let mut selected = v.clone();
            select_order_statistics(&mut selected);
            for q in QUANTILE_LEVELS {
                let (a, b) = (quantile_sorted(&sorted, q), quantile_sorted(&selected, q));
                assert_eq!(a.to_bits(), b.to_bits(), "n {n}, q {q}");
            }
        }
    }

    #[test]
    fn summary_of_known_points() {
        // Points (0, 0), (1, 2), (2, 4), (3, 6): y = 2 x.
        let pts = [0.0, 0.0, 1.0, 2.0, 2.0, 4.0, 3.0, 6.0];
        let s = summarize_points(&pts, 2);
        assert_eq!(s.mean, vec![1.5, 3.0]);
        let var_x = 5.0 / 3.0;
        assert!((s.cov[0] - var_x).abs() < 1e-15);
        assert!((s.cov[1] - 2.0 * var_x).abs() < 1e-15);
        assert!((s.cov[3] - 4.0 * var_x).abs() < 1e-15);
        // numpy.quantile([0, 1, 2, 3], 0.16) = 0.48.
        assert!((s.quantiles[0][1] - 0.48).abs() < 1e-15);
        assert!((s.quantiles[1][2] - 3.0).abs() < 1e-15);
    }

    #[test]
    fn analytic_quantiles_are_normal_quantiles() {
        let g = GaussianMoments {
            mean: vec![1.0],
            cov: vec![4.0],
        };
        let s = g.to_summary();
        assert!((s.quantiles[0][2] - 1.0).abs() < 1e-15);
        assert!((s.quantiles[0][4] - (1.0 + 2.0 * 1.959_963_984_540_054)).abs() < 1e-12);
        assert!((s.quantiles[0][1] - (1.0 - 2.0 * 0.994_457_883_209_753_1)).abs() < 1e-12);
    }
}
