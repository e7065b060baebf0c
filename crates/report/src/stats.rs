//! Numerics behind the figures and tables, kept free of plotting so they can be tested directly.

/// Mean and population standard deviation (NaN for an empty slice).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// A histogram normalised to a probability density over `[lo, hi)`, so that it can be compared
/// with a pdf drawn on the same axes. Values outside the range are counted in `outside` (and still
/// count in the normalisation, so the bars show the true density of the whole sample).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub lo: f64,
    pub hi: f64,
    pub density: Vec<f64>,
    pub outside: usize,
}

impl Histogram {
    pub fn new(values: &[f64], lo: f64, hi: f64, bins: usize) -> Self {
        let mut counts = vec![0usize; bins];
        let mut outside = 0;
        let width = (hi - lo) / bins as f64;
        for &v in values {
            if v.is_finite() && v >= lo && v < hi {
                let k = (((v - lo) / width) as usize).min(bins - 1);
                counts[k] += 1;
            } else {
                outside += 1;
            }
        }
        let norm = values.len().max(1) as f64 * width;
        Histogram {
            lo,
            hi,
            density: counts.iter().map(|&c| c as f64 / norm).collect(),
            outside,
        }
    }

    pub fn bin_width(&self) -> f64 {
        (self.hi - self.lo) / self.density.len() as f64
    }

    /// `(left edge, right edge, density)` per bin.
    pub fn bars(&self) -> impl Iterator<Item = (f64, f64, f64)> + '_ {
        let w = self.bin_width();
        self.density
            .iter()
            .enumerate()
            .map(move |(k, &d)| (self.lo + k as f64 * w, self.lo + (k + 1) as f64 * w, d))
    }
}

/// Standard normal density.
pub fn normal_pdf(x: f64, mean: f64, std: f64) -> f64 {
    let z = (x - mean) / std;
    (-0.5 * z * z).exp() / (std * (2.0 * std::f64::consts::PI).sqrt())
}

/// The standard normal CDF, from `flows::special` (the one implementation every crate uses).
pub use starflow_flows::special::normal_cdf;

/// Sampling noise of the calibration figures of a perfectly calibrated model on `n` stars
/// (normal approximations): standard errors of the pull mean, pull std, 68.3 % and 95.4 %
/// coverage, and the probability that all four land inside `targets`' windows by chance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CalibrationNoise {
    pub se_pull_mean: f64,
    pub se_pull_std: f64,
    pub se_coverage_68: f64,
    pub se_coverage_95: f64,
    pub p_all_met: f64,
}

/// See [`CalibrationNoise`]; the windows are (lo, hi) for pull std, 68 % and 95 % coverage and the
/// bound on |pull mean|.
pub fn calibration_noise(
    n: usize,
    pull_std: (f64, f64),
    pull_mean_abs: f64,
    cov68: (f64, f64),
    cov95: (f64, f64),
) -> CalibrationNoise {
    let n = n.max(1) as f64;
    let (p68, p95) = (0.682_689_49, 0.954_499_74);
    let se_pull_mean = 1.0 / n.sqrt();
    let se_pull_std = 1.0 / (2.0 * n).sqrt();
    let se_coverage_68 = (p68 * (1.0 - p68) / n).sqrt();
    let se_coverage_95 = (p95 * (1.0 - p95) / n).sqrt();
    let inside = |(lo, hi): (f64, f64), mean: f64, se: f64| {
        normal_cdf((hi - mean) / se) - normal_cdf((lo - mean) / se)
    };
    // The four figures are nearly independent for a calibrated model; the product is the chance
    // that one label meets every target.
    let p_all_met = inside(pull_std, 1.0, se_pull_std)
        * inside((-pull_mean_abs, pull_mean_abs), 0.0, se_pull_mean)
        * inside(cov68, p68, se_coverage_68)
        * inside(cov95, p95, se_coverage_95);
    CalibrationNoise {
        se_pull_mean,
        se_pull_std,
        se_coverage_68,
        se_coverage_95,
        p_all_met,
    }
}

/// Empirical coverage of central intervals: for each nominal level `p`, the fraction of
/// probability integral transforms `u` with `|u - 1/2| <= p/2`, i.e. of truths inside the central
/// `p` interval of their own posterior. A calibrated model lies on the diagonal.
pub fn coverage_curve(pits: &[f64], levels: &[f64]) -> Vec<f64> {
    let n = pits.len().max(1) as f64;
    levels
        .iter()
        .map(|p| pits.iter().filter(|u| (*u - 0.5).abs() <= p / 2.0).count() as f64 / n)
        .collect()
}

/// Coefficient of determination of `pred` against `truth`.
pub fn r2(pred: &[f64], truth: &[f64]) -> f64 {
    let (mt, _) = mean_std(truth);
    let ss_res: f64 = pred.iter().zip(truth).map(|(p, t)| (p - t).powi(2)).sum();
    let ss_tot: f64 = truth.iter().map(|t| (t - mt).powi(2)).sum();
    1.0 - ss_res / ss_tot
}

/// The `q` quantile (0..=1) by linear interpolation between order statistics (numpy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let i = pos.floor() as usize;
    let j = (i + 1).min(sorted.len() - 1);
    sorted[i] + (pos - i as f64) * (sorted[j] - sorted[i])
}

/// Picks up to four stars worth a corner plot: the 15th, 50th and 85th percentile of the first
/// label (t_eff: a cool, a typical and a hot star) and the star with the lowest value of the second
/// label (log g: the most evolved giant). Returns positions into `truths`, without repeats.
pub fn pick_showcase(truths: &[Vec<f64>]) -> Vec<usize> {
    if truths.is_empty() {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..truths.len()).collect();
    order.sort_by(|&a, &b| truths[a][0].total_cmp(&truths[b][0]));
    let at = |q: f64| order[((order.len() - 1) as f64 * q).round() as usize];
    let mut picks = vec![at(0.15), at(0.5), at(0.85)];
    if truths[0].len() > 1 {
        let giant = (0..truths.len())
            .min_by(|&a, &b| truths[a][1].total_cmp(&truths[b][1]))
            .unwrap_or(0);
        picks.push(giant);
    }
    let mut seen = Vec::new();
    picks.retain(|p| {
        let new = !seen.contains(p);
        seen.push(*p);
        new
    });
    picks
}

/// Sample mean and covariance of `n × d` row-major samples (unbiased covariance).
pub fn mean_cov(samples: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = samples.len() / d;
    let mut mean = vec![0.0; d];
    for row in samples.chunks_exact(d) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v / n as f64;
        }
    }
    let mut cov = vec![0.0; d * d];
    for row in samples.chunks_exact(d) {
        for a in 0..d {
            for b in 0..d {
                cov[a * d + b] += (row[a] - mean[a]) * (row[b] - mean[b]) / (n as f64 - 1.0);
            }
        }
    }
    (mean, cov)
}

/// Points on the ellipse `{x : (x-m)ᵀ C⁻¹ (x-m) = r²}` of a 2-D Gaussian, for contour overlays.
pub fn ellipse(mean: [f64; 2], cov: [[f64; 2]; 2], r: f64, n: usize) -> Vec<(f64, f64)> {
    // Cholesky of the 2x2 covariance; maps the circle of radius r onto the ellipse.
    let l11 = cov[0][0].max(0.0).sqrt();
    let l21 = if l11 > 0.0 { cov[1][0] / l11 } else { 0.0 };
    let l22 = (cov[1][1] - l21 * l21).max(0.0).sqrt();
    (0..=n)
        .map(|k| {
            let t = 2.0 * std::f64::consts::PI * k as f64 / n as f64;
            let (u, v) = (r * t.cos(), r * t.sin());
            (mean[0] + l11 * u, mean[1] + l21 * u + l22 * v)
        })
        .collect()
}

/// Radius of the 2-D Gaussian contour holding probability `p`: sqrt(-2 ln(1-p)).
pub fn radius_2d(p: f64) -> f64 {
    (-2.0 * (1.0 - p).ln()).sqrt()
}

/// Mean and standard error of `a[i] - b[i]`, the per-star difference of two runs on the same
/// stars; `None` unless both have the same, non-zero number of values. Each star's difficulty
/// cancels in the difference, so its standard error is far below either mean's.
pub fn paired_difference(a: &[f64], b: &[f64]) -> Option<(f64, f64)> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let (mean, std) = mean_std(&d);
    // The population std over sqrt(n - 1): the usual unbiased estimate's standard error.
    Some((mean, std / ((d.len() - 1) as f64).sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_a_density_and_counts_outliers() {
        let v = [0.1, 0.2, 0.6, 0.9, 1.5, -3.0];
        let h = Histogram::new(&v, 0.0, 1.0, 2);
        assert_eq!(h.outside, 2);
        // two values in each half, 6 values, bin width 0.5: 2 / (6 * 0.5)
        assert!((h.density[0] - 2.0 / 3.0).abs() < 1e-12);
        assert!((h.density[1] - 2.0 / 3.0).abs() < 1e-12);
        let area: f64 = h.bars().map(|(a, b, d)| (b - a) * d).sum();
        assert!((area - 4.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn coverage_of_uniform_pits_is_the_identity() {
        let pits: Vec<f64> = (0..10_000).map(|i| (i as f64 + 0.5) / 10_000.0).collect();
        let levels = [0.1, 0.5, 0.6827, 0.9545];
        for (c, p) in coverage_curve(&pits, &levels).iter().zip(levels) {
            assert!((c - p).abs() < 2e-4, "{c} vs {p}");
        }
        // Overconfident posteriors: PITs pile up at 0 and 1, so central intervals cover too little.
        let bad: Vec<f64> = pits
            .iter()
            .map(|u| {
                if *u < 0.5 {
                    u * 0.2
                } else {
                    1.0 - (1.0 - u) * 0.2
                }
            })
            .collect();
        assert!(coverage_curve(&bad, &[0.68])[0] < 0.2);
    }

    #[test]
    fn normal_cdf_and_calibration_noise() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.0) - 0.841_344_746).abs() < 2e-7);
        assert!((normal_cdf(-1.959_964) - 0.025).abs() < 2e-7);
        let t = |n| calibration_noise(n, (0.9, 1.1), 0.1, (0.65, 0.72), (0.93, 0.97));
        let small = t(300);
        assert!((small.se_pull_mean - 0.057_735).abs() < 1e-6);
        assert!((small.se_coverage_68 - 0.026_88).abs() < 1e-4);
        // A calibrated model meets all four targets on 300 stars only about two times in three;
        // on a million stars almost surely.
        assert!(
            small.p_all_met > 0.55 && small.p_all_met < 0.72,
            "{}",
            small.p_all_met
        );
        assert!(t(1_000_000).p_all_met > 0.999);
    }

    #[test]
    fn quantile_matches_numpy_linear() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&s, 0.0), 1.0);
        assert_eq!(quantile(&s, 1.0), 4.0);
        assert!((quantile(&s, 0.5) - 2.5).abs() < 1e-12);
        assert!((quantile(&s, 0.25) - 1.75).abs() < 1e-12);
    }

    #[test]
    fn showcase_picks_distinct_cool_typical_hot_and_giant() {
        let truths: Vec<Vec<f64>> = (0..101)
            .map(|i| vec![4000.0 + 30.0 * i as f64, if i == 40 { 1.0 } else { 4.4 }])
            .collect();
        assert_eq!(pick_showcase(&truths), vec![15, 50, 85, 40]);
        let one = vec![vec![5000.0, 4.0]];
        assert_eq!(pick_showcase(&one), vec![0]);
    }

    #[test]
    fn ellipse_points_lie_on_the_mahalanobis_contour() {
        let cov = [[4.0, 1.2], [1.2, 1.0]];
        let det = cov[0][0] * cov[1][1] - cov[0][1] * cov[1][0];
        let inv = [
            [cov[1][1] / det, -cov[0][1] / det],
            [-cov[1][0] / det, cov[0][0] / det],
        ];
        let r = radius_2d(0.6827);
        for (x, y) in ellipse([1.0, -2.0], cov, r, 64) {
            let (a, b) = (x - 1.0, y + 2.0);
            let m = a * (inv[0][0] * a + inv[0][1] * b) + b * (inv[1][0] * a + inv[1][1] * b);
            assert!((m - r * r).abs() < 1e-9);
        }
        // 68.27 % of a 2-D Gaussian lies within r = 1.515.
        assert!((r - 1.5151).abs() < 1e-3);
    }

    #[test]
    fn mean_cov_recovers_a_known_covariance() {
        let samples = [1.0, 2.0, 3.0, 6.0, 5.0, 10.0];
        let (m, c) = mean_cov(&samples, 2);
        assert_eq!(m, vec![3.0, 6.0]);
        assert!((c[0] - 4.0).abs() < 1e-12 && (c[3] - 16.0).abs() < 1e-12);
        assert!((c[1] - 8.0).abs() < 1e-12 && (c[2] - 8.0).abs() < 1e-12);
        assert!((r2(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn paired_difference_cancels_what_the_runs_share() {
        // Stars of very different difficulty, the same offset between the runs: no noise left.
        let b = [1.0, -7.0, 30.0, 4.5];
        let a: Vec<f64> = b.iter().map(|x| x - 0.25).collect();
        let (d, se) = paired_difference(&a, &b).unwrap();
        assert!((d + 0.25).abs() < 1e-12 && se < 1e-12, "{d} {se}");
        // 1, 2, 3, 4 against zeros: mean 2.5, sample std sqrt(5/3), se sqrt(5/3) / 2.
        let (d, se) = paired_difference(&[1.0, 2.0, 3.0, 4.0], &[0.0; 4]).unwrap();
        assert!((d - 2.5).abs() < 1e-12);
        assert!((se - (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12, "{se}");
        assert_eq!(paired_difference(&[1.0, 2.0], &[1.0]), None);
        assert_eq!(paired_difference(&[], &[]), None);
    }
}
