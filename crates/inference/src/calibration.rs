//! Recalibration of posteriors: one monotone map per label of the standardised axis
//! `u = (x - m) / σ` (`m`, `σ` the star's own posterior mean and standard deviation), fitted on
//! the validation split when training ends and applied by default.
//!
//! A network trained with a finite budget is usually too wide or too narrow, and biased by a
//! fraction of its own width, as a whole rather than star by star, so a map shared by all stars
//! repairs most of it (Kuleshov, Fenner & Ermon 2018, "Accurate uncertainties for deep learning
//! using calibrated regression"; Levi et al. 2019 for the affine special case, σ-scaling). The
//! map is [`MarginalMap::quantile`]: it sends the normal quantiles to the empirical quantiles of
//! the validation stars' standardised truths, so the recalibrated posteriors have the tails the
//! errors really have. One shift and one scale (the affine map) cannot do that: the quick
//! profile's standardised errors are sharply peaked with heavy tails (kurtosis up to 9), so a
//! scale that gets the central 68 % right leaves the pull std at 1.13–1.22, and one that gets
//! the std right covers 72 % with the 68.3 % interval.
//!
//! A map shared by all stars cannot make each kind of star right when the network's widths do not
//! follow its errors from star to star (faint stars too narrow, bright ones too wide). Before the
//! map, [`WidthMap`] widens each star's posterior by a factor that depends on what is known of it
//! without its truth: its spectrum's noise level and the posterior's own means; the map then fits
//! the shape of the widened errors, `X' = m + σ w g((X - m) / σ)`.
//!
//! A widening gives each star a scale, not a shape: where a kind of star has skewed or
//! heavier-tailed errors than the most common kind, whose shape the shared map takes, no scale
//! gets both its 68 % and 95 % intervals right. From 2 × [`crate::kind_maps::MIN_KIND_STARS`]
//! calibration stars, [`KindMaps`] replaces the shared map by one per kind of star (k-means on the
//! same covariates), fitted to that kind's widened errors.
//!
//! Maps act on each marginal alone, so they cannot fix errors that are large in several labels
//! at once; [`RadialMap`] does that, before them: it remaps each posterior's Mahalanobis radius
//! and keeps the marginal shapes the maps were fitted to. The density changes by the Jacobian
//! of both, `det ∂T/∂u · prod_j g_j'(u'_j)`.

use std::path::Path;

use serde::{Deserialize, Serialize};
#[cfg(test)]
use starflow_flows::special::{normal_cdf, normal_quantile};
use starflow_flows::{quantile_sorted, PosteriorSummary};

use crate::kind_maps::{KindMaps, KindStar};
use crate::marginal::MarginalMap;
#[cfg(test)]
use crate::marginal::{density, QUANTILE_KNOT_LEVELS};
use crate::metrics::Evaluation;
use crate::radial::{cholesky_lower, precision_of, RadialMap, RadialReference};
use crate::star::StarPrediction;
use starflow_training::config::TrainConfig;
use starflow_training::run::RunState;
use starflow_training::train::calibration_set_dir;

/// The fewest stars recalibration maps are fitted on. With fewer, [`Calibration::fit`] keeps the
/// model's own posteriors (identity maps, [`Calibration::too_few_stars`]) and callers say so: maps
/// fitted on 2 validation stars of a 12-star set used to be applied without a word.
///
/// Measured by Monte Carlo (4,000 fits per cell, `min_stars` tests below): the mean absolute error of
/// the recalibrated 68 % / 95 % coverage, for validation errors drawn from N(0, s^2), against the
/// error without a map (s = 1.2: 8.7 / 5.0 points; s = 0.8: 10.6 / 3.3; s = 1: 0 / 0):
///
/// | stars | 3 | 10 | 30 | 50 | 100 | 200 | 500 |
/// |---|---|---|---|---|---|---|---|
/// | 68 % error, points | 35.5 | 15.5 | 9.5 | 5.6 | 3.8 | 2.6 | 1.7 |
/// | 95 % error, points | 38.6 | 11.5 | 8.6 | 5.0 | 2.6 | 1.6 | 0.8 |
///
/// (the same for every s: the error is the maps' own sampling noise). With 30 stars the maps are
/// no better than nothing for a model 20 % off; from 100 they beat it at both levels. A model that
/// is already right only gains noise from them, so 500 or more are better still (README).
pub const MIN_CALIBRATION_STARS: usize = 100;

/// The fewest validation stars a [`RadialMap`] is fitted on: a radius law needs its tail, and
/// with 500 stars ~23 lie beyond the 95.4 % radius. Fewer stars get the per-label maps alone.
const MIN_RADIAL_STARS: usize = 500;

/// The 75 % quantile of the standard normal: half of N(0, 1) lies within ±0.6745.
const NORMAL_QUARTILE: f64 = 0.674_489_750_196_081_7;

/// Median of finite values (0 when there are none).
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    quantile_sorted(&v, 0.5)
}

/// How [`Calibration::fit`] recalibrates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalibrationMethod {
    /// One shift and one scale per label, from robust statistics of the validation pulls
    /// (`c = median(pull)`, `s = median |pull - c| / 0.6745`): recalibrated posteriors of a
    /// Gaussian flow stay Gaussian.
    Affine,
    /// One [`MarginalMap::quantile`] per label (the default): the validation errors' own shape.
    Quantile,
}

/// Recalibration of a run's posteriors: per label a monotone map `g_j` of the standardised axis
/// and a per-star widening `w_j` ([`WidthMap`]), `X' = m + σ w_j g_j((X - m) / σ)`, fitted on the
/// validation split or the config's calibration set.
///
/// `shift` and `scale` describe each map in the terms of the affine case `g(u) = -c + s u`:
/// `c = -g(0)` and `s = (g(1) - g(-1)) / 2`. A file without `maps` (written before maps
/// existed, or edited by hand) is the affine map they describe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub labels: Vec<String>,
    pub scale: Vec<f64>,
    /// Shift of each label's posterior in units of its own standard deviation (empty in files
    /// written before shifts existed: no shift).
    #[serde(default)]
    pub shift: Vec<f64>,
    /// Per label, the map of the standardised axis (empty: the affine map of `shift`, `scale`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maps: Vec<MarginalMap>,
    /// Per-star widening by the spectrum's noise level and the posterior's own means, applied
    /// with the per-label maps (none in files written before it existed, for the affine method,
    /// or with fewer than 2 [`MIN_WIDTH_STARS`] stars).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<WidthMap>,
    /// A widening was fitted and then declined: it raised the NLL of the stars it was not fitted
    /// on by more than their noise (`fit_calibration_with`), as for posteriors with two modes,
    /// which a widening about the mean pulls apart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub width_declined: bool,
    /// The widening's shifts of each posterior's centre ([`WidthCovariate::shift`]) were fitted
    /// and then declined by the same check: the widening is kept about the model's own means.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shift_declined: bool,
    /// Per-kind maps that replace `maps` for the stars of each kind ([`KindMaps`]; none in files
    /// written before they existed, for the affine method, with fewer than 2 [`MIN_KIND_STARS`]
    /// calibration stars, or when declined like the widening).
    ///
    /// [`MIN_KIND_STARS`]: crate::kind_maps::MIN_KIND_STARS
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<KindMaps>,
    /// Per-kind maps were fitted and then declined: they raised the NLL of the stars they were not
    /// fitted on by more than their noise (`fit_calibration_with`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kinds_declined: bool,
    /// The joint map applied before the per-label ones (Gaussian flows; none in files written
    /// before it existed, for the affine method, for sampled flows and for ensembles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub radial: Option<RadialMap>,
    /// Split the maps were fitted on and its size.
    pub fitted_on: String,
    pub n_stars: usize,
    /// Epochs done when fitted: a run trained further needs new maps.
    #[serde(default)]
    pub epochs_done: usize,
    /// The set had fewer than [`MIN_CALIBRATION_STARS`] stars, so the maps are the identity: the
    /// model's own posteriors.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub too_few_stars: bool,
    /// Seed of the synthetic calibration set the maps were fitted on (`None` for a split). With
    /// `n_stars` it tells maps of the config's set from maps of a set it no longer names, so
    /// that changing `data.calibration_n` or `data.calibration_seed` refits them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_seed: Option<u64>,
    /// The rule by which the held-out check chose the optional parts ([`HELD_OUT_RULE`] for maps
    /// fitted by `fit_calibration_with` and `fit_ensemble_calibration` now; 0 for maps fitted any
    /// other way, and in files written before the field, whose rule was the lowest held-out NLL).
    #[serde(default)]
    pub held_out_rule: u32,
}

/// The optional parts of a recalibration: the per-star widening ([`WidthMap`]), its shifts of
/// each posterior's centre (where its form has them: hinges in the posterior means), and the maps
/// per kind of star ([`KindMaps`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parts {
    pub widen: bool,
    pub shift: bool,
    pub by_kind: bool,
}

/// The held-out check's current rule, recorded in each calibration it chose: 4, the richest
/// candidate within two standard errors of the lowest held-out NLL, every calibration star held
/// out once over two folds, the widening's shifts a candidate of their own (2026-12-08; rule 3
/// had no shifts, rule 2 held out the odd-numbered half only, rule 1 took the lowest). Saved
/// maps of another rule are fitted again, so that a run's maps are the ones the current code
/// fits.
pub const HELD_OUT_RULE: u32 = 4;

impl Calibration {
    /// Fits the maps to an (unscaled) evaluation, normally of the validation split. A label with
    /// too few stars for a quantile map gets the affine one.
    pub fn fit(eval: &Evaluation, method: CalibrationMethod) -> Self {
        Self::fit_with(eval, method, true)
    }

    /// [`Calibration::fit`], with the per-star widening ([`WidthMap`]) and the per-kind maps
    /// ([`KindMaps`]) only when `widen`.
    pub fn fit_with(eval: &Evaluation, method: CalibrationMethod, widen: bool) -> Self {
        Self::fit_parts(eval, method, widen, widen)
    }

    /// [`Calibration::fit`], with the per-star widening only when `widen` and the per-kind maps
    /// only when `by_kind`.
    pub fn fit_parts(
        eval: &Evaluation,
        method: CalibrationMethod,
        widen: bool,
        by_kind: bool,
    ) -> Self {
        Self::fit_parts_as(eval, method, widen, by_kind, eval.stars.len())
    }

    /// [`Calibration::fit_parts`] with the widening's form ([`WidthMap::fit_as`]) chosen for a set
    /// of `form_stars` stars: the held-out check fits on half of the calibration stars and must
    /// score the form the whole set gets.
    pub fn fit_parts_as(
        eval: &Evaluation,
        method: CalibrationMethod,
        widen: bool,
        by_kind: bool,
        form_stars: usize,
    ) -> Self {
        let parts = Parts {
            widen,
            shift: widen,
            by_kind,
        };
        Self::fit_form(eval, method, parts, form_stars)
    }

    /// [`Calibration::fit_parts_as`] with each optional part named, the widening's shifts
    /// ([`WidthCovariate::shift`]) among them.
    pub fn fit_form(
        eval: &Evaluation,
        method: CalibrationMethod,
        parts: Parts,
        form_stars: usize,
    ) -> Self {
        let Parts {
            widen,
            shift,
            by_kind,
        } = parts;
        let d = eval.labels.len();
        if eval.n_stars < MIN_CALIBRATION_STARS {
            tracing::warn!(
                stars = eval.n_stars,
                minimum = MIN_CALIBRATION_STARS,
                "too few stars for recalibration maps; the model's own posteriors are kept"
            );
            return Calibration {
                labels: eval.labels.iter().map(|l| l.name.clone()).collect(),
                scale: vec![1.0; d],
                shift: vec![0.0; d],
                maps: Vec::new(),
                width: None,
                width_declined: false,
                shift_declined: false,
                kinds: None,
                kinds_declined: false,
                radial: None,
                fitted_on: eval.split.clone(),
                n_stars: eval.n_stars,
                epochs_done: 0,
                too_few_stars: true,
                set_seed: None,
                held_out_rule: 0,
            };
        }
        let width_map = match method {
            CalibrationMethod::Quantile if widen => WidthMap::fit_form(eval, form_stars, shift),
            _ => None,
        };
        // A truth's error in units of its star's widened standard deviation, about the shifted
        // centre.
        let widened = |s: &StarPrediction, j: usize, t: f64| {
            let (offset, width) = width_map.as_ref().map_or((0.0, 1.0), |w| {
                let (noise, z) = (s.noise.unwrap_or(f64::NAN), eval.z_means(s));
                (w.offset(j, noise, &z), w.width(j, noise, &z))
            });
            (t - s.mean[j] - s.std[j] * offset) / (s.std[j] * width)
        };
        // Each star's pull in units of its own widened standard deviation.
        let pulls = |j: usize| -> Vec<f64> {
            eval.stars
                .iter()
                .filter_map(|s| Some(-widened(s, j, s.truth.as_ref()?[j])))
                .collect()
        };
        let maps: Vec<MarginalMap> = (0..d)
            .map(|j| {
                let p = pulls(j);
                let errors: Vec<f64> = p.iter().map(|v| -v).collect();
                let reference = eval.standardized_draws.get(j).map_or(&[][..], |v| &v[..]);
                match method {
                    CalibrationMethod::Quantile => MarginalMap::quantile(&errors, reference),
                    CalibrationMethod::Affine => None,
                }
                .unwrap_or_else(|| robust_affine(&p))
            })
            .collect();
        let describe =
            |g: &MarginalMap| (-g.forward(0.0), 0.5 * (g.forward(1.0) - g.forward(-1.0)));
        let (shift, scale) = maps.iter().map(describe).unzip();
        let kinds = match method {
            CalibrationMethod::Quantile if by_kind => fit_kinds(eval, &widened),
            _ => None,
        };
        let map_of = |s: &StarPrediction, j: usize| -> &MarginalMap {
            match &kinds {
                Some(k) => &k.maps[k.kind_of(s.noise.unwrap_or(f64::NAN), &eval.z_means(s))][j],
                None => &maps[j],
            }
        };
        let radial = match method {
            CalibrationMethod::Quantile => fit_radial(eval, &map_of, &widened),
            CalibrationMethod::Affine => None,
        };
        Calibration {
            labels: eval.labels.iter().map(|l| l.name.clone()).collect(),
            scale,
            shift,
            maps: if method == CalibrationMethod::Affine {
                Vec::new()
            } else {
                maps
            },
            width: width_map,
            width_declined: false,
            shift_declined: false,
            kinds,
            kinds_declined: false,
            radial,
            fitted_on: eval.split.clone(),
            n_stars: eval.n_stars,
            epochs_done: 0,
            too_few_stars: false,
            set_seed: None,
            held_out_rule: 0,
        }
    }

    /// Whether the widening shifts any posterior's centre.
    pub fn shifts(&self) -> bool {
        self.width
            .as_ref()
            .is_some_and(|w| w.covariates.iter().any(|c| !c.shift.is_empty()))
    }

    /// The map of label `j`.
    pub fn map(&self, j: usize) -> MarginalMap {
        match self.maps.get(j) {
            Some(g) => g.clone(),
            None => MarginalMap::affine(self.shift.get(j).copied().unwrap_or(0.0), self.scale[j]),
        }
    }

    /// The maps of all labels, resolved once for a pass.
    pub(crate) fn resolved(&self) -> Resolved {
        let maps: Vec<MarginalMap> = (0..self.scale.len()).map(|j| self.map(j)).collect();
        let moments = maps.iter().map(MarginalMap::normal_moments).collect();
        let affine = maps.iter().all(MarginalMap::is_affine)
            && self.radial.is_none()
            && self.kinds.is_none();
        let kind_moments = self.kinds.as_ref().map_or(Vec::new(), |k| {
            k.maps
                .iter()
                .map(|m| m.iter().map(MarginalMap::normal_moments).collect())
                .collect()
        });
        Resolved {
            maps,
            moments,
            affine,
            radial: self.radial.clone(),
            width: self.width.clone(),
            kinds: self.kinds.clone(),
            kind_moments,
        }
    }

    /// Maps posterior samples of one star, `points` `(n, d)` row-major in z-units, whose unscaled
    /// posterior is summarised by `unscaled` and whose spectrum's noise level is `noise`
    /// ([`StarPrediction::noise`]): `x' = m + sd (o + w g(T((x - m) / sd)))`, o the widening's shift.
    pub fn apply_to_points(
        &self,
        points: &mut [f64],
        unscaled: &PosteriorSummary,
        noise: Option<f64>,
    ) {
        let resolved = self.resolved();
        resolved.apply_to_points(points, &resolved.frame(unscaled, noise));
    }
}

/// The [`RadialMap`] of an unscaled evaluation of a Gaussian flow whose per-label maps are
/// `maps`: the validation truths through the inverse maps, their stars' correlations, and the
/// model's own shape, N(0, R). `None` for sampled flows, without the correlations (ensembles)
/// or with fewer than [`MIN_RADIAL_STARS`] stars.
///
/// Sampled flows get none: every star's posterior has its own shape. Three versions were measured
/// on CNNModel + full_flow (quick profile, 3,000 held-out stars, joint 68 % region at 75.3 %):
/// - this map with `h_j` fitted to keep the pooled marginals: joint 70.3 %, but each star's
///   marginals moved (pull stds 0.99–1.03 -> 1.05–1.10, 68 % intervals 64.6–65.4 %);
/// - `ρ` alone with the label maps refitted to the moved pooled samples: marginals kept, joint
///   74.9 %. The fitted `ρ` was a near-uniform shrink (x0.78), which the label maps undo: in
///   Mahalanobis terms the truths sit like the flow's own draws, scaled.
/// - a radial map of the flow's base space (the norm of `f⁻¹(truth)` sent to the chi law,
///   samples drawn through it, label maps refitted after it): marginals kept, joint 74.7–74.9 %
///   (2 and 5 rounds); the base map and the label maps traded a shrink for a stretch.
///
/// Affine label maps (a constant Jacobian) give 75.7 %, so the label maps' kinks are not the
/// cause either. A fourth, tried offline in numpy on 1,500 of those stars (1,000 draws each, two
/// halves fitting and testing each other), moved each star's own radius law (its draws' radius
/// quantiles sent through the validation truths' level law) and then gave each label back that
/// star's own draws by rank: marginals exactly kept, joint 68 % by Mahalanobis rank 76.1 / 76.0 %
/// -> 73.9 / 74.7 % after 4 rounds. What did help was training: with 24 epochs instead of 10
/// the same flow covers 71.8 % (69.8 % on a second seed), with 28 70.8 % (69.3 %), without any
/// radial map.
///
/// Nor would a base-space map decide the full profile's NLL ordering, where the recalibrated
/// full Gaussian (-4.702, radial map and label maps) beats the recalibrated full flow (-4.533,
/// label maps alone) on 3,000 held-out stars of seed 20261201. Measured 2026-12-03 from the base
/// points `f⁻¹(truth)` of TinyCNN's runs: the radius map alone, fitted on the 2,228 validation
/// stars, lowers the full flow's held-out NLL by 0.125 ± 0.011 and the full Gaussian's by
/// 0.200 ± 0.020, both mostly one uniform stretch (x1.2, the models are too narrow), which the
/// label maps' 0.176 for the flow already largely contains. Even if the two simply added, the
/// flow would reach -4.66.
fn fit_radial<'a>(
    eval: &'a Evaluation,
    map_of: &dyn Fn(&'a StarPrediction, usize) -> &'a MarginalMap,
    widened: &dyn Fn(&StarPrediction, usize, f64) -> f64,
) -> Option<RadialMap> {
    let d = eval.labels.len();
    let gaussian = eval.standardized_draws.iter().all(Vec::is_empty);
    if !gaussian || eval.precisions.len() != eval.stars.len() || eval.stars.is_empty() {
        return None;
    }
    let mut u = Vec::with_capacity(eval.stars.len() * d);
    let mut precisions = Vec::with_capacity(eval.stars.len());
    for (s, p) in eval.stars.iter().zip(&eval.precisions) {
        let Some(t) = &s.truth else { continue };
        u.extend((0..d).map(|j| map_of(s, j).inverse(widened(s, j, t[j]))));
        precisions.push(p.clone());
    }
    if precisions.len() < MIN_RADIAL_STARS {
        return None;
    }
    RadialMap::fit(&u, &precisions, &RadialReference::gaussian(d))
}

/// The [`KindMaps`] of an unscaled evaluation, fitted to its stars' errors after the widening
/// (`widened`: a truth's error in widened standard deviations about the shifted centre); `None`
/// without label scales (no means in z-units), with too few stars, or when the pooled draws of a
/// sampled flow cannot be told apart star by star.
fn fit_kinds(
    eval: &Evaluation,
    widened: &dyn Fn(&StarPrediction, usize, f64) -> f64,
) -> Option<KindMaps> {
    let d = eval.labels.len();
    if eval.label_scale.len() != d {
        return None;
    }
    let per_star = eval.draws_per_star()?;
    let stars: Vec<KindStar> = eval
        .stars
        .iter()
        .enumerate()
        .filter_map(|(index, s)| {
            let t = s.truth.as_ref()?;
            Some(KindStar {
                index,
                noise: s.noise.unwrap_or(f64::NAN),
                mean: eval.z_means(s),
                errors: (0..d).map(|j| widened(s, j, t[j])).collect(),
            })
        })
        .collect();
    KindMaps::fit(&stars, &eval.standardized_draws, per_star)
}

/// The affine map from robust statistics of the pulls.
fn robust_affine(pulls: &[f64]) -> MarginalMap {
    let c = median(pulls.to_vec());
    let spread = median(pulls.iter().map(|v| (v - c).abs()).collect());
    let s = if spread > 0.0 {
        spread / NORMAL_QUARTILE
    } else {
        1.0
    };
    MarginalMap::affine(c, s)
}

/// The unscaled posterior of one star as a calibration sees it: mean and standard deviation
/// (z-units), about which the maps act, the widening of each label ([`WidthMap`], 1 without
/// one), and the inverse of its correlation matrix, with which the
/// radial map measures radii (`None`: no radial map, as for ensembles).
pub(crate) struct Frame {
    pub(crate) mean: Vec<f64>,
    pub(crate) sd: Vec<f64>,
    pub(crate) width: Vec<f64>,
    /// The shift of each label's centre in its own standard deviations ([`WidthMap::offset`]; 0
    /// without one).
    pub(crate) offset: Vec<f64>,
    /// The star's kind ([`KindMaps::kind_of`]; `None`: the global maps).
    pub(crate) kind: Option<usize>,
    pub(crate) precision: Option<Vec<f64>>,
}

impl Frame {
    fn standardize(&self, x: &[f64]) -> Vec<f64> {
        (0..x.len())
            .map(|j| (x[j] - self.mean[j]) / self.sd[j])
            .collect()
    }

    /// The scale of label `j`'s mapped axis: `x' = m + sd (o + w g(u))`.
    fn outer(&self, j: usize) -> f64 {
        self.sd[j] * self.width[j]
    }

    /// The centre of label `j`'s mapped axis, `m + sd o`.
    fn centre(&self, j: usize) -> f64 {
        self.mean[j] + self.sd[j] * self.offset[j]
    }
}

/// A calibration's maps with the normal moments of each, ready to apply star by star.
pub(crate) struct Resolved {
    maps: Vec<MarginalMap>,
    /// `(E g(U), sd g(U))`, `U ~ N(0, 1)`.
    moments: Vec<(f64, f64)>,
    /// Whether every map is affine and there is no radial map.
    affine: bool,
    radial: Option<RadialMap>,
    width: Option<WidthMap>,
    kinds: Option<KindMaps>,
    /// Per kind and label, the moments of its map (as `moments`).
    kind_moments: Vec<Vec<(f64, f64)>>,
}

impl Resolved {
    /// The map of label `j` for the star of frame `f`: its kind's, else the global one.
    fn map(&self, f: &Frame, j: usize) -> &MarginalMap {
        match (&self.kinds, f.kind) {
            (Some(k), Some(c)) => &k.maps[c][j],
            _ => &self.maps[j],
        }
    }

    /// [`Resolved::map`]'s normal moments.
    fn moments(&self, f: &Frame, j: usize) -> (f64, f64) {
        match f.kind {
            Some(c) if !self.kind_moments.is_empty() => self.kind_moments[c][j],
            _ => self.moments[j],
        }
    }

    /// The frame of an unscaled summary whose spectrum has noise level `noise`
    /// ([`StarPrediction::noise`]). The precision is only worked out when there is a radial map
    /// to use it; a singular correlation leaves the radial map out for that star.
    pub(crate) fn frame(&self, s: &PosteriorSummary, noise: Option<f64>) -> Frame {
        Frame {
            precision: self
                .radial
                .as_ref()
                .and_then(|_| precision_of(&s.cov, &s.std)),
            ..self.marginal_frame(s, noise)
        }
    }

    /// [`Resolved::frame`] without the radial map's precision (ensembles, summaries).
    pub(crate) fn marginal_frame(&self, s: &PosteriorSummary, noise: Option<f64>) -> Frame {
        let d = s.mean.len();
        let noise = noise.unwrap_or(f64::NAN);
        let (offset, width) = (0..d)
            .map(|j| {
                self.width.as_ref().map_or((0.0, 1.0), |w| {
                    (w.offset(j, noise, &s.mean), w.width(j, noise, &s.mean))
                })
            })
            .unzip();
        let kind = self.kinds.as_ref().map(|k| k.kind_of(noise, &s.mean));
        Frame {
            mean: s.mean.clone(),
            sd: s.std.clone(),
            width,
            offset,
            kind,
            precision: None,
        }
    }

    /// The truth `t` of label `j` as seen by the unscaled posterior of frame `f`: the
    /// recalibrated CDF at `t` is the unscaled one at this point. (Exact for the per-label maps;
    /// the radial map keeps each marginal of a Gaussian posterior up to the interpolation of its
    /// coordinate map.)
    pub(crate) fn seen(&self, t: f64, f: &Frame, j: usize) -> f64 {
        f.mean[j] + f.sd[j] * self.map(f, j).inverse((t - f.centre(j)) / f.outer(j))
    }

    /// The point `t` (all labels) as seen by the unscaled posterior of frame `f`: the
    /// recalibrated density at `t` is the unscaled one there over [`Resolved::log_jacobian`].
    pub(crate) fn seen_point(&self, t: &[f64], f: &Frame) -> Vec<f64> {
        let mut u: Vec<f64> = (0..t.len())
            .map(|j| self.map(f, j).inverse((t[j] - f.centre(j)) / f.outer(j)))
            .collect();
        if let (Some(r), Some(p)) = (&self.radial, &f.precision) {
            r.inverse(&mut u, p);
        }
        (0..t.len()).map(|j| f.mean[j] + f.sd[j] * u[j]).collect()
    }

    /// `ln |det|` of the recalibration's Jacobian at the unscaled point `x` of frame `f`: the
    /// recalibrated log-density at the image of `x` is the unscaled one minus this.
    pub(crate) fn log_jacobian(&self, x: &[f64], f: &Frame) -> f64 {
        let mut u = f.standardize(x);
        let mut total = 0.0;
        if let (Some(r), Some(p)) = (&self.radial, &f.precision) {
            total += r.log_det(&u, p);
            r.forward(&mut u, p);
        }
        total
            + (0..x.len())
                .map(|j| (f.width[j] * self.map(f, j).slope(u[j])).ln())
                .sum::<f64>()
    }

    /// Whether every map is affine, which keeps Gaussian posteriors Gaussian (the noise widening
    /// is one more scale per star and label).
    pub(crate) fn is_affine(&self) -> bool {
        self.affine
    }

    /// See [`Calibration::apply_to_points`].
    pub(crate) fn apply_to_points(&self, points: &mut [f64], f: &Frame) {
        let d = f.mean.len();
        for x in points.chunks_exact_mut(d) {
            let mut u = f.standardize(x);
            if let (Some(r), Some(p)) = (&self.radial, &f.precision) {
                r.forward(&mut u, p);
            }
            for j in 0..d {
                x[j] = f.centre(j) + f.outer(j) * self.map(f, j).forward(u[j]);
            }
        }
    }

    /// Maps a z-unit posterior summary of frame `f` (made from `s`) by the per-label maps (the
    /// radial map keeps a Gaussian posterior's marginals; sampled posteriors are summarised after
    /// mapping their samples). Quantiles map exactly (the maps are monotone). The mean and std
    /// are those of the mapped posterior when it is Gaussian in `u`, which the maps are fitted to
    /// assume (exact for an affine map); with `points` (the samples the summary came from) and a
    /// map that is not affine they are the mapped samples' own. Correlations are kept.
    pub(crate) fn apply(&self, s: &mut PosteriorSummary, f: &Frame, points: Option<&[f64]>) {
        let d = s.mean.len();
        let (m, sd) = (s.mean.clone(), s.std.clone());
        let (mean, std): (Vec<f64>, Vec<f64>) = match points.filter(|_| !self.is_affine()) {
            Some(pts) => {
                let mut mapped = pts.to_vec();
                let marginal = Frame {
                    mean: m.clone(),
                    sd: sd.clone(),
                    width: f.width.clone(),
                    offset: f.offset.clone(),
                    kind: f.kind,
                    precision: None,
                };
                self.apply_to_points(&mut mapped, &marginal);
                let n = (mapped.len() / d) as f64;
                (0..d)
                    .map(|j| {
                        let col = mapped.iter().skip(j).step_by(d);
                        let mu = col.clone().sum::<f64>() / n;
                        let var = col.map(|v| (v - mu) * (v - mu)).sum::<f64>() / (n - 1.0);
                        (mu, var.sqrt())
                    })
                    .unzip()
            }
            None => (0..d)
                .map(|j| {
                    let outer = sd[j] * f.width[j];
                    let (a, b) = self.moments(f, j);
                    (f.centre(j) + outer * a, outer * b)
                })
                .unzip(),
        };
        for j in 0..d {
            let g = self.map(f, j);
            let outer = sd[j] * f.width[j];
            let centre = f.centre(j);
            s.quantiles[j] = s.quantiles[j].map(|q| centre + outer * g.forward((q - m[j]) / sd[j]));
            for k in 0..d {
                s.cov[j * d + k] *= (std[j] / sd[j]) * (std[k] / sd[k]);
            }
        }
        s.mean = mean;
        s.std = std;
    }
}

/// Per-star widening of each label's posterior by what is known of the star before its truth:
/// the noise level of its spectrum (`ln σ̂`, [`StarPrediction::noise`]) and the model's own
/// posterior mean of each label (z-units). `ln w_j` is a sum of one piecewise-linear function per
/// covariate, each through one knot per bin of that covariate (the bin's median value) and
/// constant beyond the outer knots, fitted by backfitting.
///
/// Why: a network's widths need not follow its errors star by star. The quick profile's TinyCNN
/// t_eff pull std ran from 1.12 in the faintest SNR quarter to 0.66 in the brightest on held-out
/// stars, and on its own training stars from 0.79 to 0.58: it learns the faint stars' noise by
/// heart, so their held-out errors are larger than any its training showed it. Giants' and cool
/// stars' t_eff posteriors were too narrow in the same way (pull std 1.16–1.20 after the global
/// map). One map for all stars can only average such groups; this widening first evens the pulls
/// out across the covariates, and the per-label map then fits the shape. Both covariates are known
/// for any spectrum (the noise level is measured from it, DER_SNR), so it needs no label column.
///
/// Each knot's width is what the bin's 68 % intervals need: the 68.27 % quantile of the truths'
/// distances from their posteriors' medians in units of each posterior's own central 68 %
/// half-width (after the other covariates' widening), divided by its geometric mean over the bins,
/// so that a covariate at a typical value (or a noise level that cannot be measured) adds nothing.
/// Each star's own interval, not its standard deviation, is the unit: the two differ for sampled
/// posteriors, most where a posterior has two modes (CNNModel + full_flow's giants).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WidthMap {
    pub covariates: Vec<WidthCovariate>,
}

/// One covariate of a [`WidthMap`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WidthCovariate {
    /// [`NOISE_COVARIATE`], or the name of the label whose posterior mean (z-units) it is.
    pub name: String,
    /// The knots' covariate values, increasing.
    pub knots: Vec<f64>,
    /// The smallest and largest value of the stars it was fitted on: between them and the outer
    /// knots `ln w` goes on along the outer segment (the outer bins' stars lie on both sides of
    /// their knot), beyond them it stays constant.
    #[serde(default)]
    pub range: Option<[f64; 2]>,
    /// Per label, `ln w` at each knot.
    pub log_width: Vec<Vec<f64>>,
    /// Per label, the shift of the posterior's centre at each knot, in units of the star's own
    /// standard deviation (empty: none; [`fit_hinges`] with the posterior means fits it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shift: Vec<Vec<f64>>,
}

/// [`WidthCovariate::name`] of the spectrum's noise level.
pub const NOISE_COVARIATE: &str = "noise";

/// The fewest stars per bin of a [`WidthMap`] covariate: the 68 % half-width of 250 normal errors
/// has a relative standard error of ~6 %.
pub const MIN_WIDTH_STARS: usize = 250;

/// The most bins a [`WidthMap`] covariate is fitted with.
const MAX_WIDTH_BINS: usize = 8;

/// Below this many calibration stars [`WidthMap::fit`] fits hinges by maximum likelihood on every
/// star ([`fit_hinges`]: two slopes of `ln w` in `ln σ̂`, meeting at the median star, and from
/// [`MEAN_HINGES_FROM`] stars the same in each label's posterior mean) instead of per-bin quantiles
/// of four covariates. A real-data user's maps
/// come from the validation split (1,200 stars in the quick profile's split of 6,000): there the
/// binned map, 4 bins of 300 stars per covariate, was too noisy to lower the NLL of held-out
/// calibration stars and the check declined it for every run. Measured with the maps of six TinyCNN
/// diagonal runs and three ensembles of the learning curve refitted on their 1,200 validation stars
/// (`results/quick-realish-31337/tune-1001-parametric/`): on 10,000 stars of tuning seed 1001 the
/// issue's named per-kind cells went from 84 to 88 of 108 for the single runs (one run lost three)
/// and from 27 to 32 of 36 for the ensembles; on 10,000 held-out stars, looked at once, 42 to 47 of
/// 54, the NLL better by 0.000-0.027. A model right for every star would pass 16.6 of 18 with maps
/// fitted on 1,200 stars (`calibration-floor/`). With the quick profile's 20,000 synthetic
/// calibration stars the binned map of four covariates is kept: it reached 18 of 18 there.
pub const PARAMETRIC_WIDTH_BELOW: usize = 4_000;

/// From this many calibration stars (and below [`PARAMETRIC_WIDTH_BELOW`]) the widening has one
/// hinge per label's posterior mean beside the noise hinge ([`fit_hinges`]); below it, the noise
/// hinge alone. Measured on the real-data path (maps on the validation split alone, refitted both
/// ways on the same runs, TinyCNN's three flows; `results/quick-realish-31337/tune-1001-hinges/`):
/// - 1,200 validation stars (quick profile; 10,000 stars of tuning seed 1001): named per-kind cells
///   44 against 43 of 54, but the NLL worse for two runs (by 0.011 and 0.061);
/// - 2,400 validation stars (the same recipe on 12,000 stars): on the tuning seed the NLL better for
///   every run (by 0.022, 0.047, 0.052); on 10,000 stars of seed 20261208, looked at once after
///   the choice, better by 0.013, 0.046, 0.048, with 46 against 39 of 54 named cells;
/// - full size, 2,228 validation stars (`results/learning-curve/`): the held-out check below
///   declines any widening for that run (held-out NLL -5.976 against -5.979), so its maps stay
///   global; forced on, the mean hinges gave 17 against 15 of 18 named cells on seed 20261207.
pub const MEAN_HINGES_FROM: usize = 2_000;

/// Standardised errors beyond this many half-widths count as this many in [`fit_hinges`]: one
/// wild star would otherwise set the width of its noise range (the global quantile map still sees
/// its tail).
const HINGE_CLIP: f64 = 6.0;

/// Backfitting rounds of [`WidthMap::fit`] (the widths moved by < 0.5 % in a fourth on the quick
/// profile's calibration set).
const WIDTH_ROUNDS: usize = 3;

impl WidthCovariate {
    /// `ln w_j` at covariate value `v`; 0 for NaN (unknown).
    fn log_width(&self, j: usize, v: f64) -> f64 {
        self.interpolate(&self.log_width[j], v)
    }

    /// Label `j`'s shift (standard deviations) at covariate value `v`; 0 for NaN or without one.
    fn shift(&self, j: usize, v: f64) -> f64 {
        self.shift.get(j).map_or(0.0, |y| self.interpolate(y, v))
    }

    /// The piecewise-linear function through `y` at the knots, at `v` (0 for NaN).
    fn interpolate(&self, y: &[f64], v: f64) -> f64 {
        let x = &self.knots;
        if !v.is_finite() || x.is_empty() || y.len() != x.len() {
            return 0.0;
        }
        if x.len() == 1 {
            return y[0];
        }
        let v = match self.range {
            Some([lo, hi]) => v.clamp(lo, hi),
            None => v.clamp(x[0], x[x.len() - 1]),
        };
        let (k, t) = segment(x, v);
        y[k - 1] + t * (y[k] - y[k - 1])
    }
}

/// The segment of `knots` (at least two, increasing) that `v` lies on, the outer ones extended:
/// the index `k` of its upper knot and `v`'s fraction `t` of the way from `knots[k - 1]`.
fn segment(knots: &[f64], v: f64) -> (usize, f64) {
    let k = knots.partition_point(|u| *u <= v).clamp(1, knots.len() - 1);
    (k, (v - knots[k - 1]) / (knots[k] - knots[k - 1]))
}

/// The covariates of a [`WidthMap`] for few calibration stars: per label, `ln w` a sum of one
/// piecewise-linear function per covariate of `names` (the noise level `ln σ̂` first, then, from
/// [`MEAN_HINGES_FROM`] stars, each label's posterior mean), each through three knots (the covariate's lowest, median and highest
/// value). All knot values are fitted at once by maximum likelihood of the Gaussian scale model
/// `e ~ N(0, w²)` over every star (errors clipped at [`HINGE_CLIP`]); each covariate after the first
/// has its median knot fixed at 0, which the first covariate's level absorbs. Each covariate is then
/// centred so that the stars' geometric mean width from it is 1 (the global map that follows sets
/// the overall scale). The negative log-likelihood is convex in the knot values, so Newton's method
/// finds the optimum.
///
/// Why the means as well as the noise: with the noise alone, the real-data path at full size left
/// metal-poor stars' t_eff and log g intervals too narrow (68 % intervals covering 60-61 %, pull std
/// 1.17) and cool and hot stars' t_eff intervals too wide (72-76 %), on 10,000 stars of seed
/// 20261207 with maps fitted on 2,228 validation stars. Four hinges of three knots are 9 values per
/// label, fewer than the binned map's 4 × 8, whose per-bin quantiles were too noisy below
/// [`PARAMETRIC_WIDTH_BELOW`] stars; on 1,200 stars they still cost NLL ([`MEAN_HINGES_FROM`]).
///
/// With `with_shift` (the mean hinges) each label also gets a shift of its centre through the
/// same knots ([`fit_scale_and_shift`]). Why: a widening cannot mend a bias, and maximum-likelihood
/// widths absorb one. The 30,072-star full-size run (maps on its 2,228 validation stars) had cool
/// stars' t_eff posterior means 0.47 σ too hot and hot stars' 0.13 σ too cool, so after the global
/// map took out the average, giants' and cool stars' t_eff came out too wide (pull std 0.87-0.90)
/// and hot stars' too narrow. With the shift, on 10,000 stars of tuning seed 20261207, the named
/// per-kind cells went from 16 to 18 of 18 (NLL better by 0.029 ± 0.003, t_eff MSE by 2.8 %); on
/// 10,000 of seed 20261212, used for no choice, from 17 to 18 (better by 0.034 ± 0.003). The
/// 11,672-star run's shifts did not carry over to new stars (NLL worse by 0.010 ± 0.002 on the
/// tuning seed), and the held-out check, which scores the shift as a part of its own, declined
/// them (by 0.014 ± 0.007 on the validation stars' two folds).
fn fit_hinges(
    stars: &[WidthStar],
    names: &[String],
    d: usize,
    with_shift: bool,
) -> Vec<WidthCovariate> {
    let knots: Vec<(Vec<f64>, [f64; 2])> = (0..names.len())
        .map(|c| {
            let mut x: Vec<f64> = stars.iter().map(|s| s.x[c]).collect();
            x.sort_by(f64::total_cmp);
            let (lo, hi) = (x[0], x[x.len() - 1]);
            let mid = x[x.len() / 2];
            let k = if lo < mid && mid < hi {
                vec![lo, mid, hi]
            } else if lo < hi {
                vec![lo, hi]
            } else {
                vec![lo]
            };
            (k, [lo, hi])
        })
        .collect();
    // Columns of the joint basis: every knot of the first covariate, every knot but the middle one
    // of the others (their hats sum to 1 like the first's, which would make the fit singular).
    let fixed = |c: usize| (c > 0).then(|| knots[c].0.len() / 2);
    let columns: Vec<(usize, usize)> = (0..names.len())
        .flat_map(|c| {
            (0..knots[c].0.len())
                .filter(move |&k| Some(k) != fixed(c))
                .map(move |k| (c, k))
        })
        .collect();
    // Per star and covariate, the weights of its knots; the joint basis takes its columns.
    let hats: Vec<Vec<Vec<f64>>> = stars
        .iter()
        .map(|s| {
            (0..names.len())
                .map(|c| hat_basis(&knots[c].0, s.x[c]))
                .collect()
        })
        .collect();
    let basis: Vec<Vec<f64>> = hats
        .iter()
        .map(|h| columns.iter().map(|&(c, k)| h[c][k]).collect())
        .collect();
    // Per covariate, the values at its knots of a fitted coefficient vector, centred over the
    // stars (the global map that follows sets the overall level).
    let at_knots = |theta: &[f64], c: usize| -> Vec<f64> {
        let mut values = vec![0.0; knots[c].0.len()];
        for (&(cc, k), t) in columns.iter().zip(theta) {
            if cc == c {
                values[k] = *t;
            }
        }
        let mean = hats.iter().map(|h| dot(&h[c], &values)).sum::<f64>() / stars.len() as f64;
        values.iter().map(|v| v - mean).collect()
    };
    // Per label, the coefficients of `ln w` and of the shift.
    let fits: Vec<(Vec<f64>, Option<Vec<f64>>)> = (0..d)
        .map(|j| fit_scale_and_shift(&basis, stars, j, with_shift))
        .collect();
    names
        .iter()
        .zip(&knots)
        .enumerate()
        .map(|(c, (name, (k, range)))| WidthCovariate {
            name: name.clone(),
            knots: k.clone(),
            range: Some(*range),
            log_width: fits.iter().map(|(theta, _)| at_knots(theta, c)).collect(),
            shift: if with_shift {
                fits.iter()
                    .map(|(_, beta)| beta.as_deref().map_or(Vec::new(), |b| at_knots(b, c)))
                    .collect()
            } else {
                Vec::new()
            },
        })
        .collect()
}

/// Alternating fits of label `j`'s hinge coefficients over `basis` (one row per star of
/// `stars`): `ln w` by maximum likelihood of the errors about the shifted centre
/// ([`newton_scale_fit`], errors clipped at [`HINGE_CLIP`] half-widths), and with `with_shift` the
/// shift (standard deviations) by least squares weighted by each star's widened precision (its
/// error clipped the same way). Each half-step lowers the Gaussian negative log-likelihood.
fn fit_scale_and_shift(
    basis: &[Vec<f64>],
    stars: &[WidthStar],
    j: usize,
    with_shift: bool,
) -> (Vec<f64>, Option<Vec<f64>>) {
    let p = basis.first().map_or(0, Vec::len);
    let mut shift = vec![0.0; stars.len()];
    let mut beta = None;
    let mut theta = Vec::new();
    for round in 0..=SHIFT_ROUNDS {
        let e2: Vec<f64> = stars
            .iter()
            .zip(&shift)
            .map(|(s, mu)| (s.dev[j] - mu * s.ratio[j]).abs().min(HINGE_CLIP).powi(2))
            .collect();
        theta = newton_scale_fit(basis, &e2, p);
        if !with_shift || round == SHIFT_ROUNDS {
            break;
        }
        // In standard deviations a star's widened scale is w / ratio.
        let (mut h, mut g) = (vec![0.0; p * p], vec![0.0; p]);
        for (b, s) in basis.iter().zip(stars) {
            let scale = dot(b, &theta).exp() / s.ratio[j];
            let r = s.signed[j].clamp(-HINGE_CLIP * scale, HINGE_CLIP * scale);
            let weight = scale.powi(-2);
            for a in 0..p {
                g[a] += weight * b[a] * r;
                for c in 0..p {
                    h[a * p + c] += weight * b[a] * b[c];
                }
            }
        }
        (0..p).for_each(|a| h[a * p + a] += 1e-9);
        let Some(b) = solve_spd(&h, &g, p) else {
            break;
        };
        shift = basis.iter().map(|row| dot(row, &b)).collect();
        beta = Some(b);
    }
    (theta, beta)
}

/// Alternations of [`fit_scale_and_shift`] (widths, then shifts weighted by them). Not tuned:
/// widths and shifts barely depend on each other (a shift of a third of a standard deviation
/// changes a width by ~5 %), so a few rounds settle them.
const SHIFT_ROUNDS: usize = 4;

/// The weights of linear interpolation through `knots` at `v` (clamped to the outer knots).
fn hat_basis(knots: &[f64], v: f64) -> Vec<f64> {
    let mut b = vec![0.0; knots.len()];
    if knots.len() == 1 {
        b[0] = 1.0;
        return b;
    }
    let (k, t) = segment(knots, v.clamp(knots[0], knots[knots.len() - 1]));
    b[k - 1] = 1.0 - t;
    b[k] = t;
    b
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Minimises `Σ_i [l_i + e2_i exp(-2 l_i) / 2]`, `l_i = basis_i · θ` (the negative log-likelihood of
/// `e_i ~ N(0, exp(2 l_i))`), by damped Newton steps from the constant fit.
fn newton_scale_fit(basis: &[Vec<f64>], e2: &[f64], p: usize) -> Vec<f64> {
    let objective = |theta: &[f64]| -> f64 {
        basis
            .iter()
            .zip(e2)
            .map(|(b, e)| {
                let l = dot(b, theta);
                l + 0.5 * e * (-2.0 * l).exp()
            })
            .sum()
    };
    let rms = (e2.iter().sum::<f64>() / e2.len() as f64).sqrt().max(1e-6);
    let mut theta = vec![rms.ln(); p];
    let mut f = objective(&theta);
    for _ in 0..100 {
        let mut g = vec![0.0; p];
        let mut h = vec![0.0; p * p];
        for (b, e) in basis.iter().zip(e2) {
            let r = e * (-2.0 * dot(b, &theta)).exp();
            for a in 0..p {
                g[a] += b[a] * (1.0 - r);
                for c in 0..p {
                    h[a * p + c] += 2.0 * r * b[a] * b[c];
                }
            }
        }
        (0..p).for_each(|a| h[a * p + a] += 1e-9);
        let Some(step) = solve_spd(&h, &g, p) else {
            break;
        };
        let mut t = 1.0;
        let mut improved = false;
        while t > 1e-6 {
            let trial: Vec<f64> = theta.iter().zip(&step).map(|(x, s)| x - t * s).collect();
            let ft = objective(&trial);
            if ft < f {
                let converged = f - ft < 1e-12 * f.abs().max(1.0);
                theta = trial;
                f = ft;
                improved = !converged;
                break;
            }
            t *= 0.5;
        }
        if !improved {
            break;
        }
    }
    theta
}

/// Solves `H x = g` for a small symmetric positive definite `H` (Cholesky); `None` if it is not.
fn solve_spd(h: &[f64], g: &[f64], p: usize) -> Option<Vec<f64>> {
    let l = cholesky_lower(|i, j| h[i * p + j], p, 0.0)?;
    let mut y = vec![0.0; p];
    for i in 0..p {
        y[i] = (g[i] - (0..i).map(|k| l[i * p + k] * y[k]).sum::<f64>()) / l[i * p + i];
    }
    let mut x = vec![0.0; p];
    for i in (0..p).rev() {
        x[i] = (y[i] - (i + 1..p).map(|k| l[k * p + i] * x[k]).sum::<f64>()) / l[i * p + i];
    }
    Some(x)
}

/// One star as a [`WidthMap`] fit sees it: covariate values and, per label, the truth's distance
/// from the posterior's median in units of the posterior's own central 68 % half-width (`e`;
/// `dev` with its sign), the truth's signed distance from the posterior's mean in standard
/// deviations (`signed`), and the standard deviation over the half-width (`ratio`; 1 for a
/// Gaussian).
struct WidthStar {
    x: Vec<f64>,
    e: Vec<f64>,
    dev: Vec<f64>,
    signed: Vec<f64>,
    ratio: Vec<f64>,
}

impl WidthMap {
    /// Fits the widening to an unscaled evaluation. The noise covariate is used when every star
    /// carries a noise level, the label means when the evaluation knows its label scaling; `None`
    /// with fewer than 2 [`MIN_WIDTH_STARS`] stars or no covariate. Below
    /// [`PARAMETRIC_WIDTH_BELOW`] stars with noise levels, one hinge per covariate ([`fit_hinges`]).
    pub fn fit(eval: &Evaluation) -> Option<Self> {
        Self::fit_as(eval, eval.stars.len())
    }

    /// [`WidthMap::fit`] with the form (binned, hinges with or without the means) that a set of
    /// `form_stars` stars gets, whatever the number of stars it is fitted on.
    pub fn fit_as(eval: &Evaluation, form_stars: usize) -> Option<Self> {
        Self::fit_form(eval, form_stars, true)
    }

    /// [`WidthMap::fit_as`], with the shifts of the posteriors' centres only when `shift` (they
    /// come only with the hinges in the posterior means).
    pub fn fit_form(eval: &Evaluation, form_stars: usize, shift: bool) -> Option<Self> {
        let d = eval.labels.len();
        let with_noise = eval
            .stars
            .iter()
            .all(|s| s.noise.is_some_and(f64::is_finite));
        let with_means = eval.label_scale.len() == d;
        let mut names: Vec<String> = Vec::new();
        if with_noise {
            names.push(NOISE_COVARIATE.into());
        }
        if with_means {
            names.extend(eval.labels.iter().map(|l| l.name.clone()));
        }
        let stars: Vec<WidthStar> = eval
            .stars
            .iter()
            .filter_map(|s| {
                let t = s.truth.as_ref()?;
                let mut x = Vec::with_capacity(names.len());
                if with_noise {
                    x.push(s.noise.unwrap_or(f64::NAN));
                }
                if with_means {
                    x.extend((0..d).map(|j| {
                        let [a, b] = eval.label_scale[j];
                        (s.mean[j] - a) / b
                    }));
                }
                // The truth's distance from the posterior's median in units of its own central
                // 68 % half-width: for a Gaussian |t - m| / σ, and for a sampled posterior
                // (skewed, or with two modes where giant and dwarf are both possible) the scale
                // its own interval has.
                let signed: Vec<f64> = (0..d).map(|j| (t[j] - s.mean[j]) / s.std[j]).collect();
                let (dev, ratio): (Vec<f64>, Vec<f64>) = (0..d)
                    .map(|j| {
                        let q = &s.quantiles[j];
                        let half = 0.5 * (q[3] - q[1]);
                        if half > 0.0 {
                            ((t[j] - q[2]) / half, s.std[j] / half)
                        } else {
                            (signed[j], 1.0)
                        }
                    })
                    .unzip();
                Some(WidthStar {
                    x,
                    e: dev.iter().map(|v| v.abs()).collect(),
                    dev,
                    signed,
                    ratio,
                })
            })
            .collect();
        let n_bins = (stars.len() / MIN_WIDTH_STARS).min(MAX_WIDTH_BINS);
        if n_bins < 2 || names.is_empty() {
            return None;
        }
        if with_noise && form_stars < PARAMETRIC_WIDTH_BELOW {
            return Some(WidthMap {
                covariates: if form_stars < MEAN_HINGES_FROM {
                    fit_hinges(&stars, &names[..1], d, false)
                } else {
                    fit_hinges(&stars, &names, d, shift)
                },
            });
        }
        let mut map = WidthMap {
            covariates: names
                .into_iter()
                .map(|name| WidthCovariate {
                    name,
                    knots: Vec::new(),
                    range: None,
                    log_width: vec![Vec::new(); d],
                    shift: Vec::new(),
                })
                .collect(),
        };
        for _ in 0..WIDTH_ROUNDS {
            for c in 0..map.covariates.len() {
                map.covariates[c] = map.refit(c, &stars, n_bins, d);
            }
        }
        Some(map)
    }

    /// Covariate `c` refitted to the errors after every other covariate's widening.
    fn refit(&self, c: usize, stars: &[WidthStar], n_bins: usize, d: usize) -> WidthCovariate {
        let mut order: Vec<(usize, f64)> = stars.iter().map(|s| s.x[c]).enumerate().collect();
        order.sort_by(|a, b| a.1.total_cmp(&b.1));
        let others = |i: usize, j: usize| -> f64 {
            self.covariates
                .iter()
                .enumerate()
                .filter(|(k, _)| *k != c)
                .map(|(k, cov)| cov.log_width(j, stars[i].x[k]))
                .sum::<f64>()
                .exp()
        };
        let mut knots = Vec::with_capacity(n_bins);
        let mut log_width = vec![Vec::with_capacity(n_bins); d];
        for k in 0..n_bins {
            let bin = &order[k * order.len() / n_bins..(k + 1) * order.len() / n_bins];
            knots.push(bin[bin.len() / 2].1);
            for (j, lw) in log_width.iter_mut().enumerate() {
                let mut e: Vec<f64> = bin
                    .iter()
                    .map(|&(i, _)| stars[i].e[j] / others(i, j))
                    .collect();
                e.sort_by(f64::total_cmp);
                lw.push(quantile_sorted(&e, 0.6827).max(1e-3).ln());
            }
        }
        for lw in &mut log_width {
            let mean = lw.iter().sum::<f64>() / lw.len() as f64;
            lw.iter_mut().for_each(|v| *v -= mean);
        }
        // Knots at equal values (ties) would make the interpolation undefined: keep the first.
        let keep: Vec<usize> = (0..n_bins)
            .filter(|&k| k == 0 || knots[k] > knots[k - 1])
            .collect();
        WidthCovariate {
            name: self.covariates[c].name.clone(),
            knots: keep.iter().map(|&k| knots[k]).collect(),
            range: Some([order[0].1, order[order.len() - 1].1]),
            log_width: log_width
                .into_iter()
                .map(|lw| keep.iter().map(|&k| lw[k]).collect())
                .collect(),
            shift: Vec::new(),
        }
    }

    /// The widening of label `j` for a star of noise level `noise` (NaN: unknown) whose unscaled
    /// posterior means are `mean` (z-units).
    pub fn width(&self, j: usize, noise: f64, mean: &[f64]) -> f64 {
        self.values(noise, mean)
            .map(|(c, v)| c.log_width(j, v))
            .sum::<f64>()
            .exp()
    }

    /// The shift of label `j`'s posterior centre, in units of its own standard deviation, for a
    /// star of noise level `noise` whose unscaled posterior means are `mean` (z-units); 0 for a
    /// map without shifts.
    pub fn offset(&self, j: usize, noise: f64, mean: &[f64]) -> f64 {
        self.values(noise, mean).map(|(c, v)| c.shift(j, v)).sum()
    }

    /// Each covariate with its value for a star of noise level `noise` and posterior means `mean`.
    fn values<'a>(
        &'a self,
        noise: f64,
        mean: &'a [f64],
    ) -> impl Iterator<Item = (&'a WidthCovariate, f64)> + 'a {
        let mut labels = mean.iter();
        self.covariates.iter().map(move |c| {
            let v = if c.name == NOISE_COVARIATE {
                noise
            } else {
                labels.next().copied().unwrap_or(f64::NAN)
            };
            (c, v)
        })
    }
}

/// File name of a run's recalibration (its maps, see [`Calibration`]).
pub const CALIBRATION_FILE: &str = "calibration.json";

/// [`Calibration::fitted_on`] of maps fitted on a config's synthetic calibration set.
pub const CALIBRATION_SET: &str = "calibration";

impl Calibration {
    /// The calibration saved in `RUN/calibration.json` when it is there, readable and fitted to
    /// the run's current weights, labels and calibration stars (`state` is the run's).
    pub fn saved(run_dir: &Path, state: &RunState) -> Option<Calibration> {
        let path = run_dir.join(CALIBRATION_FILE);
        let text = std::fs::read_to_string(&path).ok()?;
        match serde_json::from_str::<Calibration>(&text) {
            Ok(c)
                if c.epochs_done == state.epochs_done
                    && c.labels == state.scaler.names
                    && c.current_for(&state.config) =>
            {
                Some(c)
            }
            Ok(_) => {
                tracing::info!(
                    "{}: fitted for other weights, another calibration set or by an older \
                     held-out rule, fitting again",
                    path.display()
                );
                None
            }
            Err(e) => {
                tracing::warn!("{}: unreadable ({e}), fitting again", path.display());
                None
            }
        }
    }

    /// Whether these maps are what the current code fits on the stars `cfg` names now: fitted
    /// there ([`Calibration::fitted_on_config_stars`]) with the parts the current
    /// [`HELD_OUT_RULE`] chose. A run's saved maps and an ensemble's are reused only then.
    pub fn current_for(&self, cfg: &TrainConfig) -> bool {
        self.held_out_rule == HELD_OUT_RULE && self.fitted_on_config_stars(cfg)
    }

    /// Whether these maps were fitted on the stars `cfg` names now: its calibration set, of the
    /// same size and seed, or, when it draws none, its validation split. Maps saved before the
    /// config's `data.calibration_n` or `data.calibration_seed` changed are then refitted, not
    /// reused.
    pub fn fitted_on_config_stars(&self, cfg: &TrainConfig) -> bool {
        match calibration_set_dir(cfg) {
            Some(_) => {
                self.fitted_on == CALIBRATION_SET
                    && self.n_stars == cfg.data.calibration_n
                    && self.set_seed == Some(cfg.data.calibration_seed)
            }
            None => self.fitted_on != CALIBRATION_SET,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affine_map_is_the_shift_and_scale() {
        let g = MarginalMap::affine(0.3, 2.0);
        for u in [-5.0, -1.0, 0.0, 0.4, 7.0] {
            assert!((g.forward(u) - (-0.3 + 2.0 * u)).abs() < 1e-12);
            assert!((g.inverse(g.forward(u)) - u).abs() < 1e-12);
            assert_eq!(g.slope(u), 2.0);
        }
        assert!(g.is_affine());
        let (m, s) = g.normal_moments();
        assert!((m + 0.3).abs() < 1e-7 && (s - 2.0).abs() < 1e-7, "{m} {s}");
    }

    /// Errors drawn from a Student t with 3 degrees of freedom, scaled: the map is monotone,
    /// inverts, and sends the normal quantiles to theirs.
    #[test]
    fn quantile_map_follows_heavy_tailed_errors() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StudentT};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let t3 = StudentT::new(3.0).unwrap();
        let errors: Vec<f64> = (0..20_000)
            .map(|_| 0.5 + 0.7 * t3.sample(&mut rng))
            .collect();
        let g = MarginalMap::quantile(&errors, &[]).unwrap();
        assert_eq!(g.knots.len(), QUANTILE_KNOT_LEVELS.len());
        assert!(!g.is_affine());
        // The median of a t is its centre; the t3's 84 % quantile is 1.1896.
        assert!((g.forward(0.0) - 0.5).abs() < 0.02, "{}", g.forward(0.0));
        assert!((g.forward(normal_quantile(0.84)) - (0.5 + 0.7 * 1.1896)).abs() < 0.03);
        for u in [-4.0, -2.2, -0.3, 0.0, 1.1, 3.5] {
            assert!((g.inverse(g.forward(u)) - u).abs() < 1e-9);
            assert!(g.slope(u) > 0.0);
        }
        // A t3 has infinite kurtosis but finite variance, 3 × 0.7²; the map's tails are linear,
        // so its std is finite and above the core's width.
        let (m, s) = g.normal_moments();
        assert!((m - 0.5).abs() < 0.05 && s > 0.9 && s < 1.5, "{m} {s}");
        // Slopes integrate to the map: compare with a numerical derivative away from knots.
        let u = 0.2;
        let num = (g.forward(u + 1e-6) - g.forward(u - 1e-6)) / 2e-6;
        assert!((num - g.slope(u)).abs() < 1e-6);
    }

    /// When the posteriors' pooled shape is already the errors' (both Student t3 here), the map
    /// fitted against that shape is the identity within sampling noise; fitted against N(0, 1)
    /// it would stretch the tails.
    #[test]
    fn quantile_map_against_the_posteriors_own_shape() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StudentT};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let t3 = StudentT::new(3.0).unwrap();
        let mut draw = |n: usize| -> Vec<f64> { (0..n).map(|_| t3.sample(&mut rng)).collect() };
        let (errors, reference) = (draw(20_000), draw(60_000));
        let g = MarginalMap::quantile(&errors, &reference).unwrap();
        for u in [-4.0, -1.5, 0.0, 0.7, 2.5] {
            assert!(
                (g.forward(u) - u).abs() < 0.06 * u.abs().max(1.0),
                "g({u}) = {}",
                g.forward(u)
            );
        }
        let normal = MarginalMap::quantile(&errors, &[]).unwrap();
        assert!(normal.forward(normal_quantile(0.995)) > 1.5 * normal_quantile(0.995));
    }

    #[test]
    fn too_few_errors_give_no_quantile_map() {
        assert!(MarginalMap::quantile(&[0.1, -0.2, 0.3], &[]).is_none());
        // 60 errors: only the levels with 5 stars beyond them, 0.1 ... 0.9.
        let e: Vec<f64> = (0..60).map(|i| (i as f64 - 29.5) / 20.0).collect();
        let g = MarginalMap::quantile(&e, &[]).unwrap();
        assert_eq!(g.knots.len(), 9);
    }

    #[test]
    fn normal_moments_match_quadrature() {
        let g = MarginalMap {
            knots: vec![
                [-2.0, -3.0],
                [-0.5, -0.6],
                [0.0, 0.1],
                [1.0, 0.9],
                [2.5, 4.0],
            ],
        };
        let (mut m1, mut m2, h) = (0.0, 0.0, 1e-3);
        let mut u = -12.0;
        while u < 12.0 {
            let w = density(u) * h;
            let v = g.forward(u);
            m1 += w * v;
            m2 += w * v * v;
            u += h;
        }
        let (m, s) = g.normal_moments();
        assert!((m - m1).abs() < 1e-5, "{m} vs {m1}");
        assert!((s - (m2 - m1 * m1).sqrt()).abs() < 1e-5);
    }
}

#[cfg(test)]
mod min_stars {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    /// Mean absolute error of the 68 % and 95 % coverage of maps fitted on `n` validation errors
    /// drawn from N(0, s^2) (a Gaussian model whose widths are off by the factor `s`), over `reps`
    /// fits, as `fit` makes them for a label; and the same error without a map.
    fn coverage_errors(n: usize, s: f64, reps: usize) -> ([f64; 2], [f64; 2]) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(n as u64);
        let levels = [0.6827, 0.9545];
        let covered = |lo: f64, hi: f64| normal_cdf(hi / s) - normal_cdf(lo / s);
        let mut mapped = [0.0; 2];
        for _ in 0..reps {
            let errors: Vec<f64> = (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    s * z
                })
                .collect();
            let pulls: Vec<f64> = errors.iter().map(|e| -e).collect();
            let g = MarginalMap::quantile(&errors, &[]).unwrap_or_else(|| robust_affine(&pulls));
            for (k, p) in levels.iter().enumerate() {
                let (lo, hi) = (
                    normal_quantile(0.5 - p / 2.0),
                    normal_quantile(0.5 + p / 2.0),
                );
                mapped[k] += (covered(g.forward(lo), g.forward(hi)) - p).abs() / reps as f64;
            }
        }
        let raw = levels.map(|p| {
            let h = normal_quantile(0.5 + p / 2.0);
            (covered(-h, h) - p).abs()
        });
        (mapped, raw)
    }

    /// The minimum is where maps start to help: fitted on that many stars they lower the mean
    /// coverage error of a model whose widths are 20 % off, at both levels, while on 30 stars
    /// they do not (see [`MIN_CALIBRATION_STARS`] for the full table).
    #[test]
    fn maps_on_the_minimum_of_stars_help_and_on_fewer_they_do_not() {
        for s in [0.8, 1.2] {
            let (mapped, raw) = coverage_errors(MIN_CALIBRATION_STARS, s, 2000);
            assert!(
                mapped[0] < 0.6 * raw[0] && mapped[1] < raw[1],
                "s {s}: {mapped:?} vs raw {raw:?}"
            );
            let (few, raw) = coverage_errors(30, s, 2000);
            assert!(
                few[0] > 0.9 * raw[0] || few[1] > raw[1],
                "s {s}, 30 stars: {few:?} vs raw {raw:?}"
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod width {
    use super::*;
    use crate::metrics::LabelMetrics;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};

    /// The true error scale of a star whose model says 1 everywhere: label 0 grows with the noise
    /// level (x2.7 over the range), label 1 with the star's type (its own mean), label 2 is right.
    fn true_scale(noise: f64, z: &[f64; 3], j: usize) -> f64 {
        match j {
            0 => (0.5 * (noise + 3.5)).exp(),
            1 => (0.3 * z[1]).exp(),
            _ => 1.0,
        }
    }

    /// `n` stars with unit model widths, their noise levels, type covariates and errors.
    pub(crate) fn stars(n: usize, seed: u64) -> Vec<StarPrediction> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|row| {
                let noise = rng.random_range(-4.5..-2.5);
                let z: [f64; 3] = std::array::from_fn(|_| StandardNormal.sample(&mut rng));
                let truth = (0..3)
                    .map(|j| {
                        let e: f64 = StandardNormal.sample(&mut rng);
                        z[j] + true_scale(noise, &z, j) * e
                    })
                    .collect();
                StarPrediction {
                    row,
                    mean: z.to_vec(),
                    std: vec![1.0; 3],
                    quantiles: vec![[0.0; 5]; 3],
                    truth: Some(truth),
                    pit: None,
                    hpd: None,
                    nll: None,
                    noise: Some(noise),
                }
            })
            .collect()
    }

    pub(crate) fn evaluation(stars: Vec<StarPrediction>) -> Evaluation {
        Evaluation {
            n_stars: stars.len(),
            labels: ["t_eff", "log_g", "fe_h"]
                .iter()
                .map(|n| LabelMetrics {
                    name: n.to_string(),
                    ..Default::default()
                })
                .collect(),
            label_scale: vec![[0.0, 1.0]; 3],
            stars,
            ..Default::default()
        }
    }

    pub(crate) fn summary(s: &StarPrediction) -> PosteriorSummary {
        PosteriorSummary {
            mean: s.mean.clone(),
            std: s.std.clone(),
            quantiles: vec![[0.0; 5]; 3],
            cov: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        }
    }

    /// 68.3 % coverage of label `j` among the quarter `q` of `stars` ordered by `key`.
    fn quarter_coverage(
        cal: &Resolved,
        stars: &[StarPrediction],
        j: usize,
        q: usize,
        key: impl Fn(&StarPrediction) -> f64,
    ) -> f64 {
        quarter_share(cal, stars, j, q, key, |pit| {
            (pit - 0.5).abs() < 0.5 * 0.6827
        })
    }

    /// The share (%) of the quarter `q` of `stars` ordered by `key` whose truth of label `j` has a
    /// PIT under the recalibrated posterior for which `inside` holds.
    fn quarter_share(
        cal: &Resolved,
        stars: &[StarPrediction],
        j: usize,
        q: usize,
        key: impl Fn(&StarPrediction) -> f64,
        inside: impl Fn(f64) -> bool,
    ) -> f64 {
        let mut sorted: Vec<&StarPrediction> = stars.iter().collect();
        sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
        let part = &sorted[q * sorted.len() / 4..(q + 1) * sorted.len() / 4];
        let inside = part
            .iter()
            .filter(|s| {
                let f = cal.frame(&summary(s), s.noise);
                let t = s.truth.as_ref().unwrap()[j];
                inside(normal_cdf((cal.seen(t, &f, j) - s.mean[j]) / s.std[j]))
            })
            .count();
        100.0 * inside as f64 / part.len() as f64
    }

    #[test]
    fn widening_follows_noise_and_type_on_new_stars() {
        // The widening alone: these stars' errors are normal for every kind, so maps per kind
        // would only add their own sampling noise (`kind_maps` tests those).
        let fitted = Calibration::fit_parts(
            &evaluation(stars(8000, 1)),
            CalibrationMethod::Quantile,
            true,
            false,
        );
        assert!(fitted.kinds.is_none());
        let map = fitted.width.as_ref().expect("a width map on 8,000 stars");
        assert_eq!(map.covariates[0].name, NOISE_COVARIATE);
        let mut global = fitted.clone();
        global.width = None;
        global.kinds = None;
        let test = stars(8000, 2);
        let noise = |s: &StarPrediction| s.noise.unwrap();
        let kind = |s: &StarPrediction| s.mean[1];
        for (label, key) in [(0, &noise as &dyn Fn(&StarPrediction) -> f64), (1, &kind)] {
            for q in [0, 3] {
                let with = quarter_coverage(&fitted.resolved(), &test, label, q, key);
                let without = quarter_coverage(&global.resolved(), &test, label, q, key);
                // se of a coverage on 2,000 stars: ~1 point.
                assert!(
                    (with - 68.3).abs() < 3.0,
                    "label {label} quarter {q}: {with:.1} %"
                );
                assert!(
                    (without - 68.3).abs() > 5.0,
                    "label {label} quarter {q}: {without:.1} % without"
                );
            }
        }
    }

    /// Stars whose label-0 errors have another shape for one kind (log g mean near -2, a quarter
    /// of them: a standardised exponential, skewed) than for the rest (normal).
    fn two_shape_stars(n: usize, seed: u64) -> Vec<StarPrediction> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|row| {
                let giant = rng.random::<f64>() < 0.25;
                let jitter: f64 = StandardNormal.sample(&mut rng);
                let z = [0.0, if giant { -2.0 } else { 1.0 } + 0.3 * jitter, 0.0];
                let e0: f64 = if giant {
                    -rng.random::<f64>().ln() - 1.0
                } else {
                    StandardNormal.sample(&mut rng)
                };
                let e: [f64; 2] = std::array::from_fn(|_| StandardNormal.sample(&mut rng));
                StarPrediction {
                    row,
                    mean: z.to_vec(),
                    std: vec![1.0; 3],
                    quantiles: vec![[0.0; 5]; 3],
                    truth: Some(vec![z[0] + e0, z[1] + e[0], z[2] + e[1]]),
                    pit: None,
                    hpd: None,
                    nll: None,
                    noise: Some(rng.random_range(-4.5..-2.5)),
                }
            })
            .collect()
    }

    #[test]
    fn maps_per_kind_reach_each_star_s_posterior() {
        let fitted = Calibration::fit(
            &evaluation(two_shape_stars(8000, 21)),
            CalibrationMethod::Quantile,
        );
        assert!(fitted.kinds.is_some(), "maps per kind on 8,000 stars");
        let mut shared = fitted.clone();
        shared.kinds = None;
        let test = two_shape_stars(8000, 22);
        let kind = |s: &StarPrediction| s.mean[1];
        // The lowest quarter by log g mean is the skewed kind. A widening can get its 68 %
        // intervals about right, but not where its posteriors' medians are: 63 % of a
        // standardised exponential lies below 0, the shared (normal) shape's median.
        let below = |pit: f64| pit < 0.5;
        let with = quarter_share(&fitted.resolved(), &test, 0, 0, kind, below);
        let without = quarter_share(&shared.resolved(), &test, 0, 0, kind, below);
        // se on 2,000 stars: 1.1 points.
        assert!(
            (with - 50.0).abs() < 3.0,
            "{with:.1} % below with maps per kind"
        );
        assert!(
            (without - 50.0).abs() > 8.0,
            "{without:.1} % below with the shared map"
        );
    }

    #[test]
    fn few_stars_get_a_noise_hinge_that_follows_the_noise_on_new_stars() {
        // 1,200 stars: the quick profile's validation split on the real-data path.
        let fitted = Calibration::fit(&evaluation(stars(1200, 7)), CalibrationMethod::Quantile);
        let map = fitted.width.as_ref().expect("a width map on 1,200 stars");
        assert_eq!(map.covariates.len(), 1);
        let hinge = &map.covariates[0];
        assert_eq!(hinge.name, NOISE_COVARIATE);
        assert_eq!(hinge.knots.len(), 3);
        // Label 0's true scale is exp(0.5 (noise + 3.5)): ln w rises by 0.5 per unit of noise.
        let s = slope(hinge, 0);
        assert!((s - 0.5).abs() < 0.1, "slope {s}");
        // Label 2 is right everywhere: nearly flat.
        assert!(slope(hinge, 2).abs() < 0.1);
        let noise = |s: &StarPrediction| s.noise.unwrap();
        for q in [0, 3] {
            let (with, without) = with_and_without_widening(&fitted, 0, q, &noise);
            // The map's own noise at 1,200 stars (each slope ±0.1) leaves a few points; without the
            // widening the quarter is ~18 points off.
            assert_widening_mends(with, without, 10.0, &format!("quarter {q}"));
        }
        // From 4,000 stars on, the binned map of every covariate.
        let many = Calibration::fit(&evaluation(stars(4000, 9)), CalibrationMethod::Quantile);
        assert!(many.width.unwrap().covariates[0].knots.len() > 3);
    }

    #[test]
    fn enough_stars_get_mean_hinges_that_follow_the_type_on_new_stars() {
        // 2,400 stars: between MEAN_HINGES_FROM and PARAMETRIC_WIDTH_BELOW.
        let fitted = Calibration::fit(&evaluation(stars(2400, 7)), CalibrationMethod::Quantile);
        let map = fitted.width.as_ref().expect("a width map on 2,400 stars");
        let names: Vec<&str> = map.covariates.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [NOISE_COVARIATE, "t_eff", "log_g", "fe_h"]);
        assert!(map.covariates.iter().all(|c| c.knots.len() == 3));
        let s = slope(&map.covariates[0], 0);
        assert!((s - 0.5).abs() < 0.08, "noise slope {s}");
        // Label 1's true scale is exp(0.3 z1), z1 its own posterior mean.
        let s = slope(&map.covariates[2], 1);
        assert!((s - 0.3).abs() < 0.06, "log g mean slope {s}");
        // Label 2 is right everywhere: nearly flat in every covariate.
        for c in &map.covariates {
            assert!(slope(c, 2).abs() < 0.08, "{}: {}", c.name, slope(c, 2));
        }
        let noise = |s: &StarPrediction| s.noise.unwrap();
        let kind = |s: &StarPrediction| s.mean[1];
        for (label, key) in [(0, &noise as &dyn Fn(&StarPrediction) -> f64), (1, &kind)] {
            for q in [0, 3] {
                let (with, without) = with_and_without_widening(&fitted, label, q, key);
                let what = format!("label {label} quarter {q}");
                assert_widening_mends(with, without, 6.0, &what);
            }
        }
        // One star fewer than MEAN_HINGES_FROM: the noise hinge alone.
        let fewer = Calibration::fit(
            &evaluation(stars(MEAN_HINGES_FROM - 1, 7)),
            CalibrationMethod::Quantile,
        );
        assert_eq!(fewer.width.unwrap().covariates.len(), 1);
        // The held-out check fits on half of the set: it gets the whole set's form.
        let half = Calibration::fit_parts_as(
            &evaluation(stars(1200, 7)),
            CalibrationMethod::Quantile,
            true,
            false,
            2400,
        );
        assert_eq!(half.width.unwrap().covariates.len(), 4);
    }

    /// [`stars`] whose label-0 posterior means are off by `0.5 z1` standard deviations (`z1` the
    /// log g posterior mean): a bias by type, which no widening about the mean can mend.
    fn biased_stars(n: usize, seed: u64) -> Vec<StarPrediction> {
        let mut out = stars(n, seed);
        for s in &mut out {
            let t = s.truth.as_mut().unwrap();
            t[0] -= 0.5 * s.mean[1];
        }
        out
    }

    #[test]
    fn mean_hinges_shift_the_centre_of_stars_biased_by_type() {
        let fitted = Calibration::fit(
            &evaluation(biased_stars(2400, 21)),
            CalibrationMethod::Quantile,
        );
        let map = fitted.width.as_ref().expect("a width map on 2,400 stars");
        // The shift of label 0 along the log g mean: about -0.5 per unit (truth below the mean).
        let c = &map.covariates[2];
        let [lo, hi] = c.range.unwrap();
        let s = (c.shift(0, hi) - c.shift(0, lo)) / (hi - lo);
        assert!((s + 0.5).abs() < 0.08, "shift slope {s}");
        // Labels 1 and 2 are unbiased: their shifts stay small over the type covariates' middle
        // 80 % (the outer knots sit at the extremes, fixed by few stars).
        for c in &map.covariates[1..] {
            for j in [1, 2] {
                for v in [-1.28, 0.0, 1.28] {
                    assert!(
                        c.shift(j, v).abs() < 0.1,
                        "{} {j}: {}",
                        c.name,
                        c.shift(j, v)
                    );
                }
            }
        }
        // On new stars the lowest and highest quarters by type are mended; without the shifts
        // (the widening kept) they are not.
        let mut unshifted = fitted.clone();
        for c in &mut unshifted.width.as_mut().unwrap().covariates {
            c.shift.clear();
        }
        let test = biased_stars(8000, 22);
        let kind = |s: &StarPrediction| s.mean[1];
        for q in [0, 3] {
            let with = quarter_coverage(&fitted.resolved(), &test, 0, q, kind);
            let without = quarter_coverage(&unshifted.resolved(), &test, 0, q, kind);
            assert_widening_mends(with, without, 4.0, &format!("quarter {q}"));
        }
        // Maps without shifts (files written before them) read as before.
        let json = serde_json::to_string(&unshifted).unwrap();
        assert!(!json.contains("\"shift\":[["), "{json}");
        let back: Calibration = serde_json::from_str(&json).unwrap();
        assert_eq!(back, unshifted);
        assert_frame_is_consistent(&fitted);
        // A star of high log g mean has its t_eff centre moved down, in its own sd units.
        let mut star = summary(&test[0]);
        star.mean[1] = 2.0;
        let f = fitted.resolved().frame(&star, test[0].noise);
        assert!(
            f.offset[0] < -0.6 && f.offset[1].abs() < 0.2,
            "{:?}",
            f.offset
        );
    }

    /// `ln w` of label `j` per unit of covariate `c` from its lowest to its highest value.
    fn slope(c: &WidthCovariate, j: usize) -> f64 {
        let [lo, hi] = c.range.unwrap();
        (c.log_width(j, hi) - c.log_width(j, lo)) / (hi - lo)
    }

    /// 68.3 % coverage of label `j` in the quarter `q` by `key` of 8,000 new stars, with `fitted`'s
    /// widening and without it (the per-label maps kept).
    fn with_and_without_widening(
        fitted: &Calibration,
        j: usize,
        q: usize,
        key: &dyn Fn(&StarPrediction) -> f64,
    ) -> (f64, f64) {
        let mut global = fitted.clone();
        global.width = None;
        global.kinds = None;
        let test = stars(8000, 8);
        (
            quarter_coverage(&fitted.resolved(), &test, j, q, key),
            quarter_coverage(&global.resolved(), &test, j, q, key),
        )
    }

    /// The widening brings a quarter's 68.3 % coverage (`with`) to within 0.4 of the distance it
    /// is off without it (`without`), which must be more than `off` points.
    fn assert_widening_mends(with: f64, without: f64, off: f64, what: &str) {
        assert!(
            (with - 68.3).abs() < 0.4 * (without - 68.3).abs(),
            "{what}: {with:.1} % with, {without:.1} % without"
        );
        assert!(
            (without - 68.3).abs() > off,
            "{what}: {without:.1} % without"
        );
    }

    #[test]
    fn newton_scale_fit_finds_the_maximum_likelihood_scales() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let knots = [-1.0, 0.0, 1.0];
        let (mut basis, mut e2) = (Vec::new(), Vec::new());
        for _ in 0..20_000 {
            let v: f64 = rng.random_range(-1.0..1.0);
            let l = if v < 0.0 { 0.2 * v } else { 0.8 * v };
            let e: f64 = StandardNormal.sample(&mut rng);
            basis.push(hat_basis(&knots, v));
            e2.push((l.exp() * e).powi(2));
        }
        let theta = newton_scale_fit(&basis, &e2, 3);
        for (got, want) in theta.iter().zip([-0.2, 0.0, 0.8]) {
            assert!((got - want).abs() < 0.03, "{theta:?}");
        }
        // One knot: the log of the root mean square.
        let one: Vec<Vec<f64>> = e2.iter().map(|_| vec![1.0]).collect();
        let rms = (e2.iter().sum::<f64>() / e2.len() as f64).sqrt();
        assert!((newton_scale_fit(&one, &e2, 1)[0] - rms.ln()).abs() < 1e-9);
    }

    #[test]
    fn fewer_than_two_bins_of_stars_get_no_widening() {
        let few = Calibration::fit(
            &evaluation(stars(2 * MIN_WIDTH_STARS - 1, 3)),
            CalibrationMethod::Quantile,
        );
        assert!(few.width.is_none());
        let affine = Calibration::fit(&evaluation(stars(4000, 3)), CalibrationMethod::Affine);
        assert!(affine.width.is_none());
    }

    #[test]
    fn a_star_without_a_noise_level_gets_the_typical_width_of_that_covariate() {
        let fitted = Calibration::fit(&evaluation(stars(4000, 4)), CalibrationMethod::Quantile);
        let map = fitted.width.unwrap();
        let noise = &map.covariates[0];
        assert_eq!(noise.log_width(0, f64::NAN), 0.0);
        // Beyond the fitted range the width stays at the range's end.
        let [lo, hi] = noise.range.unwrap();
        assert_eq!(noise.log_width(0, hi + 5.0), noise.log_width(0, hi));
        assert_eq!(noise.log_width(0, lo - 5.0), noise.log_width(0, lo));
        assert!(noise.log_width(0, hi) > noise.log_width(0, lo) + 0.5);
    }

    /// The density of a recalibrated posterior is the unscaled one at the seen point over the
    /// Jacobian: `d seen / d t` must be `exp(-log_jacobian)` per label, with the widening in.
    #[test]
    fn seen_point_and_log_jacobian_agree_with_the_widening() {
        let fitted = Calibration::fit(&evaluation(stars(4000, 5)), CalibrationMethod::Quantile);
        assert!(fitted.kinds.is_some(), "maps per kind on 4,000 stars");
        assert_frame_is_consistent(&fitted);
    }

    /// For one star: `d seen / d t` is `exp(-log_jacobian)` per label, and mapping the seen point
    /// forward gives the truth back, with the widening (and its shift, where fitted) in.
    fn assert_frame_is_consistent(fitted: &Calibration) {
        let cal = fitted.resolved();
        let star = &stars(1, 6)[0];
        let s = summary(star);
        let f = cal.frame(&s, Some(-2.7));
        assert!(
            f.width.iter().any(|w| (w - 1.0).abs() > 0.1),
            "{:?}",
            f.width
        );
        let t = [0.3, -0.2, 0.5];
        let h = 1e-5;
        let mut numeric = 0.0;
        for j in 0..3 {
            let (mut a, mut b) = (t, t);
            a[j] += h;
            b[j] -= h;
            let d = (cal.seen_point(&a, &f)[j] - cal.seen_point(&b, &f)[j]) / (2.0 * h);
            numeric += d.ln();
        }
        let analytic = -cal.log_jacobian(&cal.seen_point(&t, &f), &f);
        assert!((numeric - analytic).abs() < 1e-6, "{numeric} vs {analytic}");
        // Mapping the seen point forward gives the truth back.
        let mut back = cal.seen_point(&t, &f);
        cal.apply_to_points(&mut back, &f);
        for j in 0..3 {
            assert!((back[j] - t[j]).abs() < 1e-9);
        }
    }
}
