//! Recalibration maps per kind of star: the calibration stars split into kinds by what is known of
//! each before its truth (its spectrum's noise level and its posterior's own means), and each kind
//! gets its own quantile map per label, fitted to its own widened errors.
//!
//! Why: the per-star widening ([`crate::WidthMap`]) gives each star a scale, but one map shared by
//! all stars gives every star the same *shape* of errors, the shape of the most common kind. Where
//! a kind's errors are skewed or heavier-tailed than the rest, no scale makes both its 68 % and
//! its 95 % intervals right. Measured with a numpy prototype on the quick profile
//! (`results/quick/cluster-maps-prototype/`,
//! 10,000 stars of tuning seed 1001): CNNModel + diagonal Gaussian's giants had t_eff pulls of
//! median +0.23 to +0.32 with std 1.18 against a MAD-scale of 1.00, and log g 68 % intervals too
//! wide (71–74 %) while the 95 % ones were too narrow (90 %). Maps per kind, fitted after the
//! widening, took the named per-kind cells (four SNR quarters, giants, dwarfs × three labels) from
//! 15, 16 and 17 of 18 to 18, 18 and 17 for CNNModel diagonal, CNNModel full Gaussian and TinyCNN
//! diagonal; this module, on the same stars, took all six quick runs to 18 of 18
//! (`results/quick/per-star-calibration.md`).
//!
//! The kinds are found by k-means, not named: the covariates are the same for any data set (the
//! noise level is measured from the spectrum, the means are the model's), so a real survey's kinds
//! are whatever its stars cluster into. A kind needs [`MIN_KIND_STARS`] calibration stars, so with
//! the 1,200 validation stars of a real-data user's quick split there are none and the global
//! maps stay.

use serde::{Deserialize, Serialize};
use starflow_flows::quantile_sorted;

use crate::marginal::MarginalMap;

/// The fewest calibration stars per kind when kinds are chosen: a quantile map's 2.5 % and 97.5 %
/// knots then rest on 50 stars each. Kinds that come out of k-means with fewer than half of this
/// are dropped, their stars going to the nearest kind left.
pub const MIN_KIND_STARS: usize = 2_000;

/// The most kinds. Measured on the quick profile's 20,000 calibration stars (tuning seed 1001):
/// 4, 8 and 12 kinds gave 16–18 of 18 named cells alike; 8 was the best or joint best for each of
/// the three runs tried.
const MAX_KINDS: usize = 8;

/// Lloyd rounds of the k-means (it stops earlier when the centres no longer move).
const LLOYD_ROUNDS: usize = 100;

/// Per-kind maps of a [`crate::Calibration`]: the kinds' centres in covariate space and, per kind
/// and label, the map of the widened standardised axis that replaces the global map for its stars.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KindMaps {
    /// `[mean, std]` of the noise level (`ln σ̂`) over the stars fitted on, with which it is
    /// standardised; `None` when they had no noise levels and the kinds use the means alone.
    pub noise_scale: Option<[f64; 2]>,
    /// The kinds' centres: the standardised noise level (with `noise_scale`), then the posterior
    /// means in z-units.
    pub centres: Vec<Vec<f64>>,
    /// How many calibration stars each kind was fitted on.
    pub n_stars: Vec<usize>,
    /// Per kind, per label, the quantile map.
    pub maps: Vec<Vec<MarginalMap>>,
}

/// One calibration star as [`KindMaps::fit`] sees it.
pub(crate) struct KindStar {
    /// Index of the star in its evaluation (where its pooled draws are).
    pub index: usize,
    /// Its noise level (`NaN`: unknown).
    pub noise: f64,
    /// Its posterior means, z-units.
    pub mean: Vec<f64>,
    /// Per label, the truth's distance from the mean in units of the widened sd, `(t - m) / (σ w)`:
    /// what the global maps are fitted to.
    pub errors: Vec<f64>,
}

impl KindMaps {
    /// Fits the kinds and their maps; `None` with fewer than two kinds' worth of stars or when a
    /// kind's map cannot be fitted. `reference` holds per label the standardised posterior draws
    /// pooled over the evaluation's stars, `per_star` of them per star in the evaluation's order
    /// (0: Gaussian flows, whose shape is N(0, 1)).
    pub(crate) fn fit(stars: &[KindStar], reference: &[Vec<f64>], per_star: usize) -> Option<Self> {
        let k = (stars.len() / MIN_KIND_STARS).min(MAX_KINDS);
        let d = stars.first()?.errors.len();
        if k < 2 {
            return None;
        }
        let noise_scale = stars
            .iter()
            .all(|s| s.noise.is_finite())
            .then(|| mean_std(stars.iter().map(|s| s.noise)));
        let mut kinds = KindMaps {
            noise_scale,
            centres: Vec::new(),
            n_stars: Vec::new(),
            maps: Vec::new(),
        };
        let points: Vec<Vec<f64>> = stars
            .iter()
            .map(|s| kinds.point(s.noise, &s.mean))
            .collect();
        kinds.centres = kmeans(&points, k);
        if kinds.centres.len() < 2 {
            return None;
        }
        let assigned: Vec<usize> = points.iter().map(|p| nearest(&kinds.centres, p)).collect();
        for c in 0..kinds.centres.len() {
            let members: Vec<&KindStar> = stars
                .iter()
                .zip(&assigned)
                .filter(|(_, a)| **a == c)
                .map(|(s, _)| s)
                .collect();
            let maps = (0..d)
                .map(|j| {
                    let errors: Vec<f64> = members.iter().map(|s| s.errors[j]).collect();
                    let draws: Vec<f64> = match reference.get(j) {
                        Some(r) if per_star > 0 => members
                            .iter()
                            .filter_map(|s| r.get(s.index * per_star..(s.index + 1) * per_star))
                            .flatten()
                            .copied()
                            .collect(),
                        _ => Vec::new(),
                    };
                    MarginalMap::quantile(&errors, &draws)
                })
                .collect::<Option<Vec<_>>>()?;
            kinds.n_stars.push(members.len());
            kinds.maps.push(maps);
        }
        Some(kinds)
    }

    /// The kind of a star of noise level `noise` (`NaN`: unknown) and posterior means `mean`
    /// (z-units): the nearest centre over the covariates it has.
    pub fn kind_of(&self, noise: f64, mean: &[f64]) -> usize {
        nearest(&self.centres, &self.point(noise, mean))
    }

    /// A star's point in the kinds' covariate space.
    fn point(&self, noise: f64, mean: &[f64]) -> Vec<f64> {
        let mut x = Vec::with_capacity(mean.len() + 1);
        if let Some([a, b]) = self.noise_scale {
            x.push((noise - a) / b);
        }
        x.extend_from_slice(mean);
        x
    }
}

/// `[mean, std]` of `v` (std 1 when it is 0).
fn mean_std(v: impl Iterator<Item = f64> + Clone) -> [f64; 2] {
    let n = v.clone().count().max(1) as f64;
    let mean = v.clone().sum::<f64>() / n;
    let sd = (v.map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
    [mean, if sd > 0.0 { sd } else { 1.0 }]
}

/// Squared distance over the coordinates of `x` that are known (a star without a noise level is
/// placed by its means alone).
fn dist2(c: &[f64], x: &[f64]) -> f64 {
    c.iter()
        .zip(x)
        .filter(|(_, v)| v.is_finite())
        .map(|(a, b)| (a - b) * (a - b))
        .sum()
}

/// Index of the centre nearest to `x` (the first on ties).
fn nearest(centres: &[Vec<f64>], x: &[f64]) -> usize {
    let mut best = (0, f64::INFINITY);
    for (k, c) in centres.iter().enumerate() {
        let d = dist2(c, x);
        if d < best.1 {
            best = (k, d);
        }
    }
    best.0
}

/// k-means of `points` into at most `k` clusters, deterministic and robust to outliers: the
/// centres are fitted to the 95 % of points nearest the points' mean (so that no outlier starts or
/// drags a cluster), from farthest-first starting centres and by Lloyd rounds; then the smallest
/// cluster (counting every point) is dropped while it holds fewer than half of
/// [`MIN_KIND_STARS`], and the rest refitted.
fn kmeans(points: &[Vec<f64>], k: usize) -> Vec<Vec<f64>> {
    let core = central(points);
    let mut centres = farthest_first(&core, k);
    loop {
        centres = lloyd(&core, centres);
        let mut counts = vec![0usize; centres.len()];
        for p in points {
            counts[nearest(&centres, p)] += 1;
        }
        let Some((small, &n)) = counts.iter().enumerate().min_by_key(|(_, n)| **n) else {
            return centres;
        };
        if n >= MIN_KIND_STARS / 2 || centres.len() <= 2 {
            return centres;
        }
        centres.remove(small);
    }
}

/// The mean of `points`.
fn centroid(points: &[Vec<f64>]) -> Vec<f64> {
    let dim = points.first().map_or(0, Vec::len);
    let n = points.len() as f64;
    (0..dim)
        .map(|a| points.iter().map(|p| p[a]).sum::<f64>() / n)
        .collect()
}

/// The 95 % of `points` nearest their mean.
fn central(points: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let mean = centroid(points);
    let from_mean: Vec<f64> = points.iter().map(|p| dist2(&mean, p)).collect();
    let mut sorted = from_mean.clone();
    sorted.sort_by(f64::total_cmp);
    let cut = if sorted.is_empty() {
        0.0
    } else {
        quantile_sorted(&sorted, 0.95)
    };
    points
        .iter()
        .zip(&from_mean)
        .filter(|(_, d)| **d <= cut)
        .map(|(p, _)| p.clone())
        .collect()
}

/// `k` starting centres: the point nearest the points' mean, then each time the point farthest
/// from the centres so far.
fn farthest_first(points: &[Vec<f64>], k: usize) -> Vec<Vec<f64>> {
    let mean = centroid(points);
    let Some(first) = points
        .iter()
        .min_by(|a, b| dist2(&mean, a).total_cmp(&dist2(&mean, b)))
    else {
        return Vec::new();
    };
    let mut centres = vec![first.clone()];
    let mut gap: Vec<f64> = points.iter().map(|p| dist2(first, p)).collect();
    while centres.len() < k {
        let (far, _) = gap
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("points");
        let c = points[far].clone();
        for (g, p) in gap.iter_mut().zip(points) {
            *g = g.min(dist2(&c, p));
        }
        centres.push(c);
    }
    centres
}

fn lloyd(points: &[Vec<f64>], mut centres: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
    let dim = points.first().map_or(0, Vec::len);
    for _ in 0..LLOYD_ROUNDS {
        let mut sums = vec![vec![0.0; dim]; centres.len()];
        let mut counts = vec![0usize; centres.len()];
        for p in points {
            let c = nearest(&centres, p);
            counts[c] += 1;
            sums[c].iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        let next: Vec<Vec<f64>> = sums
            .into_iter()
            .zip(&counts)
            .zip(&centres)
            .map(|((s, &n), old)| {
                if n == 0 {
                    old.clone()
                } else {
                    s.into_iter().map(|v| v / n as f64).collect()
                }
            })
            .collect();
        if next == centres {
            break;
        }
        centres = next;
    }
    centres
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};

    /// Two kinds of star a map shared by all cannot both get right: the first (type mean near −2,
    /// a quarter of the stars) has skewed errors (a shifted exponential, standardised), the second
    /// (near +2) normal ones.
    fn stars(n: usize, seed: u64) -> Vec<KindStar> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|index| {
                let first = rng.random::<f64>() < 0.25;
                let centre = if first { -2.0 } else { 2.0 };
                let jitter: f64 = StandardNormal.sample(&mut rng);
                let e: f64 = if first {
                    let u: f64 = rng.random();
                    -u.ln() - 1.0
                } else {
                    StandardNormal.sample(&mut rng)
                };
                KindStar {
                    index,
                    noise: rng.random_range(-4.0..-3.0),
                    mean: vec![centre + 0.3 * jitter, 0.0],
                    errors: vec![e, StandardNormal.sample(&mut rng)],
                }
            })
            .collect()
    }

    /// 68.3 % coverage of label 0 among the stars whose first mean is below (`first`) or above 0,
    /// under the map each star gets.
    fn coverage(stars: &[KindStar], map: impl Fn(&KindStar) -> MarginalMap, first: bool) -> f64 {
        let part: Vec<&KindStar> = stars
            .iter()
            .filter(|s| (s.mean[0] < 0.0) == first)
            .collect();
        let inside = part
            .iter()
            .filter(|s| map(s).inverse(s.errors[0]).abs() <= 1.0)
            .count();
        100.0 * inside as f64 / part.len() as f64
    }

    #[test]
    fn kinds_give_each_kind_its_own_error_shape_on_new_stars() {
        let fit = stars(8_000, 1);
        let kinds = KindMaps::fit(&fit, &[], 0).expect("kinds on 8,000 stars");
        assert!(kinds.centres.len() >= 2);
        assert!(kinds.n_stars.iter().all(|&n| n >= MIN_KIND_STARS / 2));
        let errors: Vec<f64> = fit.iter().map(|s| s.errors[0]).collect();
        let global = MarginalMap::quantile(&errors, &[]).unwrap();
        let test = stars(8_000, 2);
        for first in [true, false] {
            let with = coverage(
                &test,
                |s| kinds.maps[kinds.kind_of(s.noise, &s.mean)][0].clone(),
                first,
            );
            let without = coverage(&test, |_| global.clone(), first);
            // se of a coverage on 2,000-6,000 stars: <= 1.1 points.
            assert!((with - 68.3).abs() < 3.0, "first {first}: {with:.1} %");
            if first {
                assert!(
                    (without - 68.3).abs() > 5.0,
                    "the shared map was already right: {without:.1} %"
                );
            }
        }
    }

    #[test]
    fn kinds_are_the_same_for_the_same_stars_and_need_enough_of_them() {
        let a = KindMaps::fit(&stars(6_000, 3), &[], 0).unwrap();
        let b = KindMaps::fit(&stars(6_000, 3), &[], 0).unwrap();
        assert_eq!(a, b);
        assert!(KindMaps::fit(&stars(2 * MIN_KIND_STARS - 1, 3), &[], 0).is_none());
        // Without a noise level a star is placed by its means alone.
        let s = &stars(1, 4)[0];
        let by_means = |c: &Vec<f64>| dist2(&c[1..], &s.mean);
        let k = a.kind_of(f64::NAN, &s.mean);
        assert!(a
            .centres
            .iter()
            .all(|c| by_means(&a.centres[k]) <= by_means(c)));
    }

    #[test]
    fn kmeans_finds_separated_clusters_and_drops_the_small_ones() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut points = Vec::new();
        for (c, n) in [(-5.0, 3_000), (0.0, 3_000), (5.0, 3_000), (50.0, 600)] {
            for _ in 0..n {
                let e: f64 = StandardNormal.sample(&mut rng);
                points.push(vec![c + 0.5 * e]);
            }
        }
        // The cluster of 600 far out starts a kind and is dropped (fewer than half of
        // MIN_KIND_STARS), its points joining the nearest kind; the rest stay where they are, as
        // the 5 % farthest points do not drag the centres.
        let mut centres = kmeans(&points, 4);
        centres.sort_by(|a, b| a[0].total_cmp(&b[0]));
        assert_eq!(centres.len(), 3, "{centres:?}");
        for (c, want) in centres.iter().zip([-5.0, 0.0, 5.0]) {
            assert!((c[0] - want).abs() < 2.0, "{centres:?}");
        }
        assert!((centres[0][0] + 5.0).abs() < 0.1, "{centres:?}");
    }
}
