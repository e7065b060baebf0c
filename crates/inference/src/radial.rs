//! The joint part of the recalibration: a monotone map of each posterior's Mahalanobis radius.
//!
//! Per-label maps ([`crate::MarginalMap`]) give every marginal the right width and shape, but
//! not the joint regions: when a network's badly predicted stars are off in several labels at
//! once (CNNModel's giants: the correlation of `|z|` between t_eff and log g is 0.5–0.6), the
//! standardised errors are a scale mixture, too many truths sit near the centre and a few far
//! out, and the 68 % highest-density region covers 75 % although every marginal is right.
//! Correlations cannot express that dependence; the radius can. It is fitted for Gaussian flows,
//! whose standardised shape is the same for every star (see `fit_radial` in the calibration
//! module for why sampled flows get none).
//!
//! The map `T` acts on a star's standardised posterior `u = (x - m) / σ` (after the per-label
//! maps are inverted), with `R` the star's posterior correlation matrix and `r = sqrt(uᵀR⁻¹u)`:
//!
//! 1. `v = (ρ(r) / r) u`: the radius is remapped along its ray, so the joint regions stay the
//!    posterior's own ellipsoids; `ρ` sends the model's radius law to the validation truths';
//! 2. `u'_j = h_j(v_j)`: a map per label undoes what step 1 did to that label's marginal shape,
//!    so the per-label maps, fitted before, still see the N(0, 1) shape they were fitted to.
//!
//! `T` is a bijection with `ln |det ∂T/∂u| = ln ρ̃'(ln r) + d ln(ρ/r) + Σ_j ln h_j'(v_j)` (`ρ̃`
//! is `ρ` in log-log terms, how it is stored), which the recalibrated density divides by.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::marginal::MarginalMap;

/// Rounds of the fit: `ρ` is fitted to radii measured after `h⁻¹`, and `h` depends on `ρ`.
/// The pair need not have an exact fixed point (the truths' law need not be of this form); the
/// knots still move by a few hundredths of a log-radius per round after the first, so the fit
/// stops after a few.
const FIT_ROUNDS: usize = 3;

/// Draws from N(0, I) standing in for a Gaussian posterior's standardised shape in the fit.
const GAUSSIAN_REFERENCE_DRAWS: usize = 20_000;

/// Seed of those draws: fixed, so a fit is a function of its data alone.
const REFERENCE_SEED: u64 = 0x5eed_7ad1a1;

/// The radial map `T` (see the module doc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RadialMap {
    /// `ln r -> ln ρ(r)`.
    pub log_radius: MarginalMap,
    /// Per label, `h_j`: `v_j -> u'_j`.
    pub marginals: Vec<MarginalMap>,
}

/// The model's own standardised posterior shape that [`RadialMap::fit`] starts from: points
/// `(n, d)` row-major, each with its Mahalanobis radius under its posterior's correlation.
pub struct RadialReference {
    pub points: Vec<f64>,
    pub radii: Vec<f64>,
}

impl RadialReference {
    /// The shape of a Gaussian posterior, whose standardised form is N(0, R): its radius law is
    /// chi with `d` degrees of freedom, and jointly with the radius each coordinate is
    /// distributed as a coordinate of N(0, I) (R has a unit diagonal).
    pub fn gaussian(d: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(REFERENCE_SEED);
        let points: Vec<f64> = (0..GAUSSIAN_REFERENCE_DRAWS * d)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let radii = points
            .chunks_exact(d)
            .map(|p| p.iter().map(|v| v * v).sum::<f64>().sqrt())
            .collect();
        RadialReference { points, radii }
    }
}

impl RadialMap {
    /// Fits `T` so that the radii of the validation truths `u` (`(n, d)` row-major, already
    /// through the inverse per-label maps), measured with each star's `precisions` (`R⁻¹`,
    /// `d x d`), follow the model's radius law mapped by `ρ`, and `h` restores the reference's
    /// marginal shape. `None` when there are too few stars for a quantile map.
    pub fn fit(u: &[f64], precisions: &[Vec<f64>], reference: &RadialReference) -> Option<Self> {
        let d = reference.points.len() / reference.radii.len().max(1);
        if d == 0 || u.len() != precisions.len() * d {
            return None;
        }
        let ref_log_r: Vec<f64> = reference.radii.iter().map(|r| r.ln()).collect();
        let mut map = RadialMap {
            log_radius: MarginalMap::affine(0.0, 1.0),
            marginals: vec![MarginalMap::affine(0.0, 1.0); d],
        };
        // Each round: the radii of the truths with the current `h`, then `ρ` to them, then the
        // `h` that keeps the reference's marginals under that `ρ`; the last `ρ` is refitted so
        // that it matches the final `h`.
        for round in 0..=FIT_ROUNDS {
            let log_r: Vec<f64> = u
                .chunks_exact(d)
                .zip(precisions)
                .map(|(ui, p)| {
                    let v: Vec<f64> = (0..d).map(|j| map.marginals[j].inverse(ui[j])).collect();
                    mahalanobis(&v, p).ln()
                })
                .collect();
            map.log_radius = MarginalMap::quantile(&log_r, &ref_log_r)?;
            if round == FIT_ROUNDS {
                break;
            }
            let v: Vec<f64> = reference
                .points
                .chunks_exact(d)
                .zip(&reference.radii)
                .flat_map(|(p, &r)| {
                    let s = map.stretch(r);
                    p.iter().map(move |x| s * x)
                })
                .collect();
            for j in 0..d {
                let col = |x: &[f64]| x.iter().skip(j).step_by(d).copied().collect::<Vec<f64>>();
                map.marginals[j] = MarginalMap::quantile(&col(&reference.points), &col(&v))?;
            }
        }
        Some(map)
    }

    /// `ρ(r) / r`, the factor a point at radius `r` is moved by along its ray.
    fn stretch(&self, r: f64) -> f64 {
        if r > 0.0 {
            (self.log_radius.forward(r.ln()) - r.ln()).exp()
        } else {
            // ρ is a power law near 0 (linear in log-log), so v -> 0 with u.
            0.0
        }
    }

    /// `u <- T(u)` for one standardised point with precision `p`.
    pub fn forward(&self, u: &mut [f64], p: &[f64]) {
        let s = self.stretch(mahalanobis(u, p));
        for (x, h) in u.iter_mut().zip(&self.marginals) {
            *x = h.forward(s * *x);
        }
    }

    /// `u <- T⁻¹(u)`.
    pub fn inverse(&self, u: &mut [f64], p: &[f64]) {
        for (x, h) in u.iter_mut().zip(&self.marginals) {
            *x = h.inverse(*x);
        }
        let r_out = mahalanobis(u, p);
        let s = if r_out > 0.0 {
            (self.log_radius.inverse(r_out.ln()) - r_out.ln()).exp()
        } else {
            0.0
        };
        u.iter_mut().for_each(|x| *x *= s);
    }

    /// `ln |det ∂T/∂u|` at `u` (before the map).
    pub fn log_det(&self, u: &[f64], p: &[f64]) -> f64 {
        let r = mahalanobis(u, p);
        if r <= 0.0 {
            return 0.0;
        }
        let (ln_r, d) = (r.ln(), u.len() as f64);
        let ln_stretch = self.log_radius.forward(ln_r) - ln_r;
        let s = ln_stretch.exp();
        self.log_radius.slope(ln_r).ln()
            + d * ln_stretch
            + u.iter()
                .zip(&self.marginals)
                .map(|(x, h)| h.slope(s * x).ln())
                .sum::<f64>()
    }
}

/// `sqrt(uᵀ P u)`.
pub fn mahalanobis(u: &[f64], p: &[f64]) -> f64 {
    let d = u.len();
    let mut q = 0.0;
    for j in 0..d {
        for k in 0..d {
            q += u[j] * p[j * d + k] * u[k];
        }
    }
    q.max(0.0).sqrt()
}

/// The lower Cholesky factor `L` (`d x d`, row-major) of the symmetric matrix with entries
/// `a(j, k)`, `A = L Lᵀ`; `None` when a pivot is NaN or at most `min_pivot` (not positive definite,
/// or too close to singular for the caller).
pub(crate) fn cholesky_lower(
    a: impl Fn(usize, usize) -> f64,
    d: usize,
    min_pivot: f64,
) -> Option<Vec<f64>> {
    let mut l = vec![0.0; d * d];
    for j in 0..d {
        for k in 0..=j {
            let s: f64 = (0..k).map(|m| l[j * d + m] * l[k * d + m]).sum();
            if j == k {
                let v = a(j, j) - s;
                if v.is_nan() || v <= min_pivot {
                    return None;
                }
                l[j * d + j] = v.sqrt();
            } else {
                l[j * d + k] = (a(j, k) - s) / l[k * d + k];
            }
        }
    }
    Some(l)
}

/// The inverse of the correlation matrix of a covariance `cov` (`d x d`) with standard
/// deviations `sd`, by Cholesky; `None` when it is not positive definite.
pub fn precision_of(cov: &[f64], sd: &[f64]) -> Option<Vec<f64>> {
    let d = sd.len();
    // R = L Lᵀ.
    let l = cholesky_lower(|j, k| cov[j * d + k] / (sd[j] * sd[k]), d, 1e-12)?;
    // L⁻¹, lower triangular, then R⁻¹ = L⁻ᵀ L⁻¹.
    let mut li = vec![0.0; d * d];
    for j in 0..d {
        li[j * d + j] = 1.0 / l[j * d + j];
        for k in 0..j {
            let s: f64 = (k..j).map(|m| l[j * d + m] * li[m * d + k]).sum();
            li[j * d + k] = -s / l[j * d + j];
        }
    }
    let mut p = vec![0.0; d * d];
    for j in 0..d {
        for k in 0..d {
            p[j * d + k] = (0..d).map(|m| li[m * d + j] * li[m * d + k]).sum();
        }
    }
    p.iter().all(|v| v.is_finite()).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(d: usize) -> Vec<f64> {
        (0..d * d)
            .map(|k| if k % (d + 1) == 0 { 1.0 } else { 0.0 })
            .collect()
    }

    /// Truths from a scale mixture of N(0, I): each star's three errors share a scale of 0.5 or
    /// 2.0, the dependence the per-label maps cannot see; `maps` are those per-label maps,
    /// fitted on other stars of the same law.
    fn scale_mixture(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .flat_map(|i| {
                let s = if i % 4 == 0 { 2.0 } else { 0.5 };
                let z: Vec<f64> = (0..3)
                    .map(|_| s * Distribution::<f64>::sample(&StandardNormal, &mut rng))
                    .collect();
                z
            })
            .collect()
    }

    /// The per-label quantile maps of `e` against N(0, 1), as `Calibration::fit` fits them.
    fn label_maps(e: &[f64]) -> Vec<MarginalMap> {
        (0..3)
            .map(|j| {
                let col: Vec<f64> = e.iter().skip(j).step_by(3).copied().collect();
                MarginalMap::quantile(&col, &[]).unwrap()
            })
            .collect()
    }

    /// `e` through the inverse per-label maps: what the radial map is fitted to.
    fn through(maps: &[MarginalMap], e: &[f64]) -> Vec<f64> {
        e.iter()
            .enumerate()
            .map(|(k, &x)| maps[k % 3].inverse(x))
            .collect()
    }

    #[test]
    fn precision_inverts_the_correlation() {
        let sd = [2.0, 0.5, 1.0];
        let corr = [1.0, 0.6, -0.3, 0.6, 1.0, 0.2, -0.3, 0.2, 1.0];
        let cov: Vec<f64> = (0..9).map(|k| corr[k] * sd[k / 3] * sd[k % 3]).collect();
        let p = precision_of(&cov, &sd).unwrap();
        for j in 0..3 {
            for k in 0..3 {
                let v: f64 = (0..3).map(|m| corr[j * 3 + m] * p[m * 3 + k]).sum();
                assert!(
                    (v - if j == k { 1.0 } else { 0.0 }).abs() < 1e-12,
                    "{j}{k} {v}"
                );
            }
        }
        assert!(precision_of(&[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0]).is_none());
    }

    #[test]
    fn round_trip_and_log_det_against_a_numerical_jacobian() {
        let reference = RadialReference::gaussian(3);
        let e = scale_mixture(3000, 1);
        let u = through(&label_maps(&e), &e);
        let p = vec![identity(3); 3000];
        let map = RadialMap::fit(&u, &p, &reference).unwrap();
        let prec = precision_of(
            &[1.0, 0.5, 0.1, 0.5, 1.0, -0.2, 0.1, -0.2, 1.0],
            &[1.0, 1.0, 1.0],
        )
        .unwrap();
        for x in [
            [0.3, -0.2, 0.1],
            [1.5, 0.7, -2.0],
            [-3.0, 2.5, 4.0],
            [0.01, 0.0, 0.02],
        ] {
            let mut y = x.to_vec();
            map.forward(&mut y, &prec);
            let mut back = y.clone();
            map.inverse(&mut back, &prec);
            for k in 0..3 {
                assert!((back[k] - x[k]).abs() < 1e-9, "{x:?} -> {y:?} -> {back:?}");
            }
            // Central differences, columns of the Jacobian.
            let h = 1e-6;
            let mut jac = [[0.0; 3]; 3];
            for (c, col) in jac.iter_mut().enumerate() {
                let (mut a, mut b) = (x.to_vec(), x.to_vec());
                a[c] += h;
                b[c] -= h;
                map.forward(&mut a, &prec);
                map.forward(&mut b, &prec);
                for r in 0..3 {
                    col[r] = (a[r] - b[r]) / (2.0 * h);
                }
            }
            let det = jac[0][0] * (jac[1][1] * jac[2][2] - jac[2][1] * jac[1][2])
                - jac[1][0] * (jac[0][1] * jac[2][2] - jac[2][1] * jac[0][2])
                + jac[2][0] * (jac[0][1] * jac[1][2] - jac[1][1] * jac[0][2]);
            let want = map.log_det(&x, &prec);
            assert!(
                (det.abs().ln() - want).abs() < 1e-4,
                "{x:?}: numerical {} against {want}",
                det.abs().ln()
            );
        }
    }

    #[test]
    fn fitted_map_gives_the_truths_the_reference_radius_law() {
        // Held-out truths from the same mixture, mapped back through T, must have the chi(3)
        // radius law of the Gaussian reference: the fraction inside each chi-square level.
        let reference = RadialReference::gaussian(3);
        let fit_on = scale_mixture(4000, 2);
        let maps = label_maps(&fit_on);
        let p = vec![identity(3); 4000];
        let map = RadialMap::fit(&through(&maps, &fit_on), &p, &reference).unwrap();
        let held = through(&maps, &scale_mixture(4000, 3));
        let id = identity(3);
        for (level, r2) in [(0.683, 3.5271), (0.954, 8.0452)] {
            let plain = held
                .chunks_exact(3)
                .filter(|u| u.iter().map(|v| v * v).sum::<f64>() <= r2)
                .count() as f64
                / 4000.0;
            let mapped = held
                .chunks_exact(3)
                .filter(|u| {
                    let mut v = u.to_vec();
                    map.inverse(&mut v, &id);
                    v.iter().map(|x| x * x).sum::<f64>() <= r2
                })
                .count() as f64
                / 4000.0;
            assert!(
                (plain - level).abs() > 0.04,
                "{level}: no dependence to fix ({plain})"
            );
            assert!(
                (mapped - level).abs() < 0.025,
                "{level}: {plain} -> {mapped}"
            );
        }
    }

    #[test]
    fn gaussian_truths_give_a_near_identity_map() {
        let reference = RadialReference::gaussian(3);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let u: Vec<f64> = (0..9000)
            .map(|_| Distribution::<f64>::sample(&StandardNormal, &mut rng))
            .collect();
        let map = RadialMap::fit(&u, &vec![identity(3); 3000], &reference).unwrap();
        for x in [[0.5, -0.5, 0.2], [1.0, 1.0, -1.0], [2.0, 0.0, 0.5]] {
            let mut y = x.to_vec();
            map.forward(&mut y, &identity(3));
            for k in 0..3 {
                assert!((y[k] - x[k]).abs() < 0.1, "{x:?} -> {y:?}");
            }
        }
    }
}
