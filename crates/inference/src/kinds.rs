//! Calibration by kind of star (issue 29): an astronomer reads one star's error bar and selects
//! stars by signal-to-noise and type, so a posterior that is right on average but too narrow for
//! faint stars and too wide for bright ones is wrong for every star they pick. This module splits
//! an evaluation's stars into kinds (signal-to-noise quartiles, giants and dwarfs, metal-poor,
//! cool and hot stars) and gives per kind and label the interval coverages and the pull moments
//! with their standard errors, and the expected-coverage curve (coverage at nominal levels 5 …
//! 95 %, marginal and joint) with its mean absolute coverage error, the summary sbi users expect.

use serde::{Deserialize, Serialize};

use crate::star::{StarPrediction, COVERAGE_LEVELS};

/// The giant/dwarf boundary in log g (dex), as the issue and GALAH's own selections use.
pub const GIANT_LOG_G: f64 = 3.5;
/// Below this [Fe/H] a star counts as metal-poor.
pub const METAL_POOR_FE_H: f64 = -0.5;
/// Cool and hot boundaries in t_eff (K).
pub const COOL_T_EFF: f64 = 5000.0;
pub const HOT_T_EFF: f64 = 6000.0;

/// One label's calibration within one kind of star, each figure with its standard error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KindLabel {
    pub name: String,
    pub coverage_68: f64,
    pub coverage_68_se: f64,
    pub coverage_95: f64,
    pub coverage_95_se: f64,
    pub pull_mean: f64,
    pub pull_mean_se: f64,
    pub pull_std: f64,
    pub pull_std_se: f64,
}

/// The stars of one kind and their per-label calibration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KindCalibration {
    /// What the stars are, e.g. `SNR Q1 (< 38.2)` or `giants (log g < 3.5)`.
    pub kind: String,
    pub n_stars: usize,
    pub labels: Vec<KindLabel>,
}

impl KindCalibration {
    /// Whether every label's 68 % coverage is within `tol68`, 95 % within `tol95` of nominal and
    /// its pull std within `pull_std` (the targets: 3 points, 2 points, 0.93–1.07).
    pub fn cells_within(&self, tol68: f64, tol95: f64, pull_std: (f64, f64)) -> usize {
        self.labels
            .iter()
            .filter(|l| {
                (l.coverage_68 - COVERAGE_LEVELS[0]).abs() <= tol68
                    && (l.coverage_95 - COVERAGE_LEVELS[1]).abs() <= tol95
                    && (pull_std.0..=pull_std.1).contains(&l.pull_std)
            })
            .count()
    }
}

/// Coverage of the central (marginal) and highest-density (joint) regions at nominal levels.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CoverageCurve {
    /// Nominal levels 0.05, 0.10, …, 0.95.
    pub levels: Vec<f64>,
    /// Per label, the coverage at each level (from the PITs).
    pub labels: Vec<Vec<f64>>,
    /// The joint HPD regions' coverage at each level (empty without HPD levels).
    pub joint: Vec<f64>,
    /// Per label, the mean absolute coverage error over the levels.
    pub mace: Vec<f64>,
    pub joint_mace: Option<f64>,
}

/// The expected-coverage curve of `stars` (those with PITs) over `d` labels.
pub fn coverage_curve(stars: &[StarPrediction], d: usize) -> CoverageCurve {
    let levels: Vec<f64> = (1..=19).map(|k| k as f64 * 0.05).collect();
    let with_pit: Vec<&Vec<f64>> = stars.iter().filter_map(|s| s.pit.as_ref()).collect();
    if with_pit.is_empty() {
        return CoverageCurve::default();
    }
    let n = with_pit.len() as f64;
    let labels: Vec<Vec<f64>> = (0..d)
        .map(|j| {
            levels
                .iter()
                .map(|p| {
                    with_pit
                        .iter()
                        .filter(|u| (u[j] - 0.5).abs() <= p / 2.0)
                        .count() as f64
                        / n
                })
                .collect()
        })
        .collect();
    let hpd: Vec<f64> = stars.iter().filter_map(|s| s.hpd).collect();
    let joint: Vec<f64> = if hpd.is_empty() {
        Vec::new()
    } else {
        let m = hpd.len() as f64;
        levels
            .iter()
            .map(|p| hpd.iter().filter(|&&h| h <= *p).count() as f64 / m)
            .collect()
    };
    let mace = |c: &[f64]| {
        c.iter()
            .zip(&levels)
            .map(|(c, p)| (c - p).abs())
            .sum::<f64>()
            / levels.len() as f64
    };
    CoverageCurve {
        mace: labels.iter().map(|c| mace(c)).collect(),
        joint_mace: (!joint.is_empty()).then(|| mace(&joint)),
        levels,
        labels,
        joint,
    }
}

/// The kinds of `stars` (labels `names`, physical units) and their calibration. `snr` gives each
/// star's signal-to-noise (the data's `SNR` column) for the quartile bins; without it, or without
/// a label, those bins are left out. Kinds with no star are left out.
pub fn by_kind(
    stars: &[StarPrediction],
    names: &[String],
    snr: Option<&[f64]>,
) -> Vec<KindCalibration> {
    let truth = |s: &StarPrediction, label: &str| -> Option<f64> {
        let j = names.iter().position(|n| n == label)?;
        s.truth.as_ref().map(|t| t[j])
    };
    let mut kinds: Vec<(String, Vec<usize>)> = Vec::new();
    if let Some(snr) = snr.filter(|v| v.len() == stars.len()) {
        kinds.extend(snr_quartiles(snr));
    }
    let mut select = |kind: String, label: &str, keep: &dyn Fn(f64) -> bool| {
        let idx: Vec<usize> = (0..stars.len())
            .filter(|&i| truth(&stars[i], label).is_some_and(keep))
            .collect();
        kinds.push((kind, idx));
    };
    select(format!("giants (log g < {GIANT_LOG_G})"), "log_g", &|g| {
        g < GIANT_LOG_G
    });
    select(format!("dwarfs (log g ≥ {GIANT_LOG_G})"), "log_g", &|g| {
        g >= GIANT_LOG_G
    });
    select(
        format!("metal-poor ([Fe/H] < {METAL_POOR_FE_H})"),
        "fe_h",
        &|f| f < METAL_POOR_FE_H,
    );
    select(format!("cool (t_eff < {COOL_T_EFF} K)"), "t_eff", &|t| {
        t < COOL_T_EFF
    });
    select(format!("hot (t_eff ≥ {HOT_T_EFF} K)"), "t_eff", &|t| {
        t >= HOT_T_EFF
    });
    kinds
        .into_iter()
        .filter(|(_, idx)| !idx.is_empty())
        .map(|(kind, idx)| KindCalibration {
            kind,
            n_stars: idx.len(),
            labels: labels_of(stars, &idx, names),
        })
        .collect()
}

/// Every label's calibration over the stars at `idx`.
fn labels_of(stars: &[StarPrediction], idx: &[usize], names: &[String]) -> Vec<KindLabel> {
    let chosen: Vec<&StarPrediction> = idx.iter().map(|&i| &stars[i]).collect();
    names
        .iter()
        .enumerate()
        .map(|(j, name)| kind_label(&chosen, j, name))
        .collect()
}

/// The calibration of the stars in one signal-to-noise bin ([`by_snr`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnrBin {
    /// The bin's lowest, median and highest SNR.
    pub snr: [f64; 3],
    pub n_stars: usize,
    pub labels: Vec<KindLabel>,
}

/// Signal-to-noise bins of [`by_snr`]: ten, so that each holds 1,000 of 10,000 held-out stars
/// (a coverage's standard error of ~1.5 points).
pub const SNR_BINS: usize = 10;

/// Calibration against signal-to-noise: [`SNR_BINS`] bins of equal counts of the data's `SNR`
/// column, for the coverage-against-SNR figure. Empty without the column or with fewer than
/// 5 stars per bin.
pub fn by_snr(stars: &[StarPrediction], names: &[String], snr: Option<&[f64]>) -> Vec<SnrBin> {
    let Some(snr) = snr.filter(|v| v.len() == stars.len()) else {
        return Vec::new();
    };
    let mut order: Vec<usize> = (0..stars.len()).filter(|&i| snr[i].is_finite()).collect();
    if order.len() < 5 * SNR_BINS {
        return Vec::new();
    }
    order.sort_by(|&a, &b| snr[a].total_cmp(&snr[b]));
    (0..SNR_BINS)
        .map(|k| {
            let idx = &order[k * order.len() / SNR_BINS..(k + 1) * order.len() / SNR_BINS];
            SnrBin {
                snr: [
                    snr[idx[0]],
                    snr[idx[idx.len() / 2]],
                    snr[idx[idx.len() - 1]],
                ],
                n_stars: idx.len(),
                labels: labels_of(stars, idx, names),
            }
        })
        .collect()
}

/// The four signal-to-noise quartiles of the evaluated stars, named by their edges.
fn snr_quartiles(snr: &[f64]) -> Vec<(String, Vec<usize>)> {
    let mut sorted: Vec<f64> = snr.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.len() < 4 {
        return Vec::new();
    }
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let edges = [
        f64::NEG_INFINITY,
        at(0.25),
        at(0.5),
        at(0.75),
        f64::INFINITY,
    ];
    (0..4)
        .map(|k| {
            let (lo, hi) = (edges[k], edges[k + 1]);
            let name = match k {
                0 => format!("SNR Q1 (< {hi:.1})"),
                3 => format!("SNR Q4 (≥ {lo:.1})"),
                _ => format!("SNR Q{} ({lo:.1}–{hi:.1})", k + 1),
            };
            let idx = (0..snr.len())
                .filter(|&i| snr[i] >= lo && snr[i] < hi)
                .collect();
            (name, idx)
        })
        .collect()
}

/// Coverage and pull moments of label `j` over `stars`, with standard errors (binomial for the
/// coverages; for the pull std the delta method on the sample variance, which holds for heavy
/// tails too).
fn kind_label(stars: &[&StarPrediction], j: usize, name: &str) -> KindLabel {
    let pulls: Vec<f64> = stars
        .iter()
        .filter_map(|s| s.truth.as_ref().map(|t| (s.mean[j] - t[j]) / s.std[j]))
        .collect();
    let n = pulls.len().max(1) as f64;
    let mean = pulls.iter().sum::<f64>() / n;
    let var = pulls.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / n;
    let m4 = pulls.iter().map(|p| (p - mean).powi(4)).sum::<f64>() / n;
    let std = var.sqrt();
    let pits: Vec<f64> = stars
        .iter()
        .filter_map(|s| s.pit.as_ref().map(|u| u[j]))
        .collect();
    let m = pits.len().max(1) as f64;
    let cover = |p: f64| pits.iter().filter(|u| (*u - 0.5).abs() <= p / 2.0).count() as f64 / m;
    let (c68, c95) = (cover(COVERAGE_LEVELS[0]), cover(COVERAGE_LEVELS[1]));
    let binomial = |c: f64| (c * (1.0 - c) / m).sqrt();
    KindLabel {
        name: name.to_string(),
        coverage_68: c68,
        coverage_68_se: binomial(c68),
        coverage_95: c95,
        coverage_95_se: binomial(c95),
        pull_mean: mean,
        pull_mean_se: std / n.sqrt(),
        pull_std: std,
        pull_std_se: if std > 0.0 {
            ((m4 - var * var).max(0.0) / n).sqrt() / (2.0 * std)
        } else {
            0.0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn star(mean: [f64; 3], std: f64, truth: [f64; 3], pit: f64) -> StarPrediction {
        StarPrediction {
            row: 0,
            mean: mean.to_vec(),
            std: vec![std; 3],
            quantiles: vec![[0.0; 5]; 3],
            truth: Some(truth.to_vec()),
            pit: Some(vec![pit; 3]),
            hpd: Some(pit),
            nll: None,
            noise: None,
        }
    }

    fn names() -> Vec<String> {
        ["t_eff", "log_g", "fe_h"].map(String::from).to_vec()
    }

    #[test]
    fn kinds_split_by_snr_quartile_and_type_with_their_own_coverage() {
        // Faint stars (SNR 10-19) all miss their 68 % interval, bright ones (30-39) all hit it.
        let mut stars = Vec::new();
        let mut snr = Vec::new();
        for i in 0..40 {
            let faint = i < 20;
            let pit = if faint { 0.99 } else { 0.5 };
            let log_g = if i % 4 == 0 { 2.5 } else { 4.4 };
            stars.push(star(
                [5000.0, log_g, 0.0],
                10.0,
                [5000.0, log_g, -0.6 + 0.1 * (i % 2) as f64],
                pit,
            ));
            snr.push(if faint {
                10.0 + (i % 10) as f64
            } else {
                30.0 + (i % 10) as f64
            });
        }
        let kinds = by_kind(&stars, &names(), Some(&snr));
        let get = |prefix: &str| kinds.iter().find(|k| k.kind.starts_with(prefix)).unwrap();
        assert_eq!(get("SNR Q1").n_stars + get("SNR Q2").n_stars, 20);
        assert_eq!(get("SNR Q1").labels[0].coverage_68, 0.0);
        assert_eq!(get("SNR Q4").labels[0].coverage_68, 1.0);
        assert_eq!(get("giants").n_stars, 10);
        assert_eq!(get("dwarfs").n_stars, 30);
        assert_eq!(get("metal-poor").n_stars, 20);
        assert!(
            kinds.iter().all(|k| !k.kind.starts_with("hot")),
            "no hot star, no bin"
        );
        // Without SNR the quartiles are left out.
        assert!(by_kind(&stars, &names(), None)
            .iter()
            .all(|k| !k.kind.starts_with("SNR")));
    }

    #[test]
    fn coverage_curve_of_uniform_pits_is_the_diagonal() {
        let n = 2000;
        let stars: Vec<StarPrediction> = (0..n)
            .map(|i| star([0.0; 3], 1.0, [0.0; 3], (i as f64 + 0.5) / n as f64))
            .collect();
        let c = coverage_curve(&stars, 3);
        assert_eq!(c.levels.len(), 19);
        for (got, p) in c.labels[0].iter().zip(&c.levels) {
            assert!((got - p).abs() < 2e-3, "{got} vs {p}");
        }
        assert!(c.mace[0] < 1e-3 && c.joint_mace.unwrap() < 1e-3, "{c:?}");
        // Every PIT at 0.99: nothing is covered below 98 %.
        let off: Vec<StarPrediction> = (0..100)
            .map(|_| star([0.0; 3], 1.0, [0.0; 3], 0.99))
            .collect();
        assert!((coverage_curve(&off, 3).mace[0] - 0.5).abs() < 1e-9);
    }

    #[test]
    fn snr_bins_hold_equal_counts_in_order() {
        let stars: Vec<StarPrediction> = (0..200)
            .map(|i| {
                star(
                    [5000.0, 4.0, 0.0],
                    1.0,
                    [5000.0, 4.0, 0.0],
                    (i as f64 + 0.5) / 200.0,
                )
            })
            .collect();
        let snr: Vec<f64> = (0..200).map(|i| 200.0 - i as f64).collect();
        let bins = by_snr(&stars, &names(), Some(&snr));
        assert_eq!(bins.len(), SNR_BINS);
        assert!(bins.iter().all(|b| b.n_stars == 20));
        assert_eq!(bins[0].snr, [1.0, 11.0, 20.0]);
        assert!(bins.windows(2).all(|w| w[0].snr[2] < w[1].snr[0]));
        assert!(by_snr(&stars[..49], &names(), Some(&snr[..49])).is_empty());
        assert!(by_snr(&stars, &names(), None).is_empty());
    }
}
