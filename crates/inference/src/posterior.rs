//! The calibrated posterior of a batch of stars, the one place that knows how a posterior is
//! summarised, sampled and recalibrated: Gaussian flows in closed form, other flows through their
//! samples, and either one mapped by a [`Calibration`] about each star's unscaled posterior.
//!
//! Evaluation, prediction and sampling all go through [`BatchPosterior`], so a star's summary,
//! its PIT and its samples agree wherever they are computed.

use std::path::Path;

use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
pub use starflow_flows::special::chi2_cdf;
use starflow_flows::special::normal_cdf;
use starflow_flows::{Flow, LogProbParts, PosteriorSummary, Samples};
use starflow_training::error::{Result, TrainError};

use crate::calibration::{Calibration, Frame, Resolved};

/// How posteriors are drawn and summarised: samples per star (non-Gaussian flows; Gaussian flows
/// are exact), the sampler's seed, and the recalibration, if any. Every evaluation, prediction
/// and sampling call takes one.
#[derive(Clone, Debug)]
pub struct PosteriorSettings {
    pub n_samples: usize,
    pub seed: u64,
    pub calibration: Option<Calibration>,
}

impl PosteriorSettings {
    /// The model's own posteriors, `n_samples` per star from `seed`.
    pub fn own(n_samples: usize, seed: u64) -> Self {
        Sampler::new(n_samples, seed).with(None)
    }

    /// How these posteriors are sampled, without the recalibration.
    pub fn sampler(&self) -> Sampler {
        Sampler {
            n_samples: self.n_samples,
            seed: self.seed,
        }
    }
}

/// How the model's own posteriors are sampled: samples per star (non-Gaussian flows; Gaussian
/// flows are exact) and the sampler's seed. What fitting a recalibration and drawing raw samples
/// take; [`Sampler::with`] makes the [`PosteriorSettings`] of evaluation and prediction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampler {
    pub n_samples: usize,
    pub seed: u64,
}

impl Sampler {
    /// `n_samples` per star from `seed`.
    pub const fn new(n_samples: usize, seed: u64) -> Self {
        Sampler { n_samples, seed }
    }

    /// These posteriors, recalibrated by `calibration` when given.
    pub fn with(self, calibration: Option<Calibration>) -> PosteriorSettings {
        PosteriorSettings {
            n_samples: self.n_samples,
            seed: self.seed,
            calibration,
        }
    }
}

/// Refuses posterior sample counts too small for meaningful quantiles.
pub(crate) fn check_samples(run_dir: &Path, n_samples: usize) -> Result<()> {
    if !(10..=MAX_SAMPLES).contains(&n_samples) {
        return Err(TrainError::config(
            run_dir,
            format!(
                "--samples must be between 10 and {MAX_SAMPLES} (got {n_samples}); 1,000 resolve \
                 the 2.5 and 97.5 % quantiles to ~0.5 %"
            ),
        ));
    }
    Ok(())
}

/// The most posterior samples per star: a batch of 128 stars holds `128 x samples x 3` values,
/// 300 MB at this limit.
pub const MAX_SAMPLES: usize = 100_000;

/// The posteriors of a batch of stars, from their flow parameters: each star's unscaled
/// posterior (the flow's own: in closed form for a Gaussian flow, from samples otherwise) and,
/// with a recalibration, the frame about which its maps act on it. [`BatchPosterior::summaries`]
/// and [`BatchPosterior::mapped_samples`] give the recalibrated posterior.
///
/// With a calibration each posterior is mapped (see [`Calibration`]). A Gaussian flow's summary
/// is mapped in closed form, and the PIT of a truth is the unscaled posterior's CDF at the point
/// [`Resolved::seen`]; a sampled flow's samples are mapped, and summaries and PITs are the
/// mapped samples' own.
pub(crate) struct BatchPosterior<'a> {
    cal: Option<&'a Resolved>,
    gaussian: bool,
    /// Samples per star in `samples`.
    n_samples: usize,
    /// Per star, the unscaled posterior's summary (z-units).
    unscaled: Vec<PosteriorSummary>,
    /// The unscaled posterior samples: a sampled flow's always, a Gaussian flow's when asked
    /// ([`Sampling::Always`]).
    pub(crate) samples: Option<Samples>,
    /// Per star, the unscaled posterior as the calibration sees it (empty without one).
    pub(crate) frames: Vec<Frame>,
}

/// Whether a [`BatchPosterior`] of a Gaussian flow draws samples (its summaries never need them).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sampling {
    /// Sampled flows only: what summaries need.
    WhereNeeded,
    /// Every flow: for callers that want the samples themselves.
    Always,
}

impl<'a> BatchPosterior<'a> {
    /// The posteriors of the stars whose flow parameters are `params`, with `n_samples` draws per
    /// star from `draws` where `sampling` asks for them, recalibrated by `cal` about each star's
    /// unscaled posterior and spectrum noise level `noise`.
    pub(crate) fn new(
        flow: &Flow,
        params: &Tensor,
        (n_samples, draws, sampling): (usize, &mut Draws, Sampling),
        cal: Option<&'a Resolved>,
        noise: &[Option<f64>],
    ) -> Result<Self> {
        let gaussian = flow.is_gaussian();
        let samples = match (gaussian, sampling) {
            (true, Sampling::WhereNeeded) => None,
            _ => Some(match draws {
                Draws::Shared(rng) => flow.sample(params, n_samples, *rng)?,
                Draws::PerStar { seed, rows } => {
                    let mut rngs: Vec<ChaCha8Rng> =
                        rows.iter().map(|&r| star_rng(*seed, r)).collect();
                    flow.sample_per_item(params, n_samples, &mut rngs)?
                }
            }),
        };
        let unscaled: Vec<PosteriorSummary> = match &samples {
            Some(smp) if !gaussian => smp.summarize(),
            _ => flow
                .gaussian_moments(params)?
                .iter()
                .map(|m| m.to_summary())
                .collect(),
        };
        debug_assert_eq!(params.dims()[0], unscaled.len());
        let frames: Vec<Frame> = match cal {
            Some(c) => unscaled
                .iter()
                .zip(noise)
                .map(|(s, n)| c.frame(s, *n))
                .collect(),
            None => Vec::new(),
        };
        Ok(BatchPosterior {
            cal,
            gaussian,
            n_samples,
            unscaled,
            samples,
            frames,
        })
    }

    /// The samples, each mapped like its star's posterior by the recalibration (the unscaled
    /// samples without one); `None` where none were drawn.
    pub(crate) fn mapped_samples(&self) -> Option<Samples> {
        let mut mapped = self.samples.clone()?;
        if let Some(c) = self.cal {
            let d = self.unscaled.first().map_or(0, |s| s.mean.len());
            for (chunk, f) in mapped
                .values
                .chunks_exact_mut(self.n_samples * d)
                .zip(&self.frames)
            {
                c.apply_to_points(chunk, f);
            }
        }
        Some(mapped)
    }

    /// Per star, its (recalibrated) summary in z-units and, given the truths `truth_z` (`(b, d)`
    /// row-major, z-units), its PITs; and the truths as the unscaled posterior sees them, whose
    /// density there is the recalibrated density at the truth times the maps' Jacobian.
    pub(crate) fn summaries(&self, truth_z: Option<&[f64]>) -> BatchSummaries {
        let b = self.unscaled.len();
        let d = self.unscaled.first().map_or(0, |s| s.mean.len());
        let (cal, frames) = (self.cal, &self.frames);
        let truth = |i: usize| truth_z.map(|t| &t[i * d..(i + 1) * d]);
        let items: Vec<(PosteriorSummary, Option<Vec<f64>>)> = match (&self.samples, cal) {
            (Some(_), Some(_)) if !self.gaussian => {
                let mapped = self.mapped_samples().expect("drawn");
                let pits = (0..b).map(|i| truth(i).map(|t| sample_pit(mapped.item(i), t)));
                mapped.summarize().into_iter().zip(pits).collect()
            }
            (Some(smp), None) if !self.gaussian => self
                .unscaled
                .iter()
                .enumerate()
                .map(|(i, s)| (s.clone(), truth(i).map(|t| sample_pit(smp.item(i), t))))
                .collect(),
            _ => self
                .unscaled
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut s = s.clone();
                    let pit = truth(i).map(|t| {
                        (0..d)
                            .map(|j| {
                                let seen = cal.map_or(t[j], |c| c.seen(t[j], &frames[i], j));
                                normal_cdf((seen - s.mean[j]) / s.std[j])
                            })
                            .collect()
                    });
                    if let Some(c) = cal {
                        c.apply(&mut s, &frames[i], None);
                    }
                    (s, pit)
                })
                .collect(),
        };
        let y_seen = truth_z.map(|t| match cal {
            Some(c) => (0..b)
                .flat_map(|i| c.seen_point(&t[i * d..(i + 1) * d], &frames[i]))
                .collect(),
            None => t.to_vec(),
        });
        BatchSummaries { items, y_seen }
    }
}

/// Per label, the fraction of posterior samples `pts` (`(n, d)` row-major) below the truth `t`,
/// with half a sample's weight at each end so it never reaches 0 or 1.
fn sample_pit(pts: &[f64], t: &[f64]) -> Vec<f64> {
    let d = t.len();
    let n = pts.len() / d;
    (0..d)
        .map(|j| {
            let below = pts.chunks_exact(d).filter(|p| p[j] < t[j]).count();
            (below as f64 + 0.5) / (n as f64 + 1.0)
        })
        .collect()
}

/// Where the randomness of posterior samples comes from.
pub(crate) enum Draws<'a> {
    /// One generator for the whole pass, drawn from in star order (evaluation).
    Shared(&'a mut ChaCha8Rng),
    /// One stream per star, from the seed and the star's row in its file (prediction): a star's
    /// samples do not depend on the batch or shard it is predicted in.
    PerStar { seed: u64, rows: &'a [usize] },
}

/// The generator of the star in file row `row`: ChaCha8 keyed by `seed`, on stream `row`.
pub(crate) fn star_rng(seed: u64, row: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(row as u64);
    rng
}

/// One batch's recalibrated summaries ([`BatchPosterior::summaries`]).
pub(crate) struct BatchSummaries {
    /// Per star, the z-unit summary (recalibrated when asked) and the PITs (given truths).
    pub(crate) items: Vec<(PosteriorSummary, Option<Vec<f64>>)>,
    /// Given truths, `(b, d)` row-major: each truth as seen by the unscaled posterior, whose
    /// density there is the recalibrated density at the truth times the maps' Jacobian.
    pub(crate) y_seen: Option<Vec<f64>>,
}

/// Posterior samples per star used to rank the truth's density for [`StarPrediction::hpd`]
/// (non-Gaussian flows): the level is resolved to ~1/400, well below the sampling noise of a
/// coverage on a few thousand stars, at a fraction of the cost of ranking every sample.
pub(crate) const HPD_SAMPLES: usize = 400;

/// What the joint HPD levels of a recalibrated posterior need beyond the unscaled one: the
/// maps, about which means and stds they act, and the truths as the unscaled posterior sees them.
pub(crate) struct Jacobians<'a> {
    pub(crate) cal: &'a Resolved,
    pub(crate) raw: &'a [Frame],
    pub(crate) y_seen: &'a [f64],
}

/// [`StarPrediction::hpd`] for a batch. Gaussian flows: the chi-square CDF of the squared
/// Mahalanobis distance, which is `|z|^2` at the base point. Other flows, and Gaussian flows
/// under a non-affine recalibration (`jac`, with `samples` drawn for it): the fraction of the
/// star's posterior samples whose density exceeds the truth's. A map's image of a sample has the
/// sample's density over the map's Jacobian there; an affine map's constant Jacobian cancels.
pub(crate) fn hpd_levels(
    flow: &Flow,
    params: &Tensor,
    parts: &LogProbParts,
    samples: Option<&Samples>,
    jac: Option<Jacobians>,
) -> Result<Vec<f64>> {
    let d = flow.dim();
    let Some(s) = samples else {
        let z: Vec<f64> = parts.z.flatten_all()?.to_vec1()?;
        return Ok(z
            .chunks_exact(d)
            .map(|zi| chi2_cdf(d, zi.iter().map(|v| v * v).sum()))
            .collect());
    };
    let (b, k) = (s.n_items, s.n_per_item.min(HPD_SAMPLES));
    let idx: Vec<u32> = (0..b as u32)
        .flat_map(|i| std::iter::repeat_n(i, k))
        .collect();
    let idx = Tensor::from_vec(idx, b * k, params.device())?;
    let mut pts = Vec::with_capacity(b * k * d);
    for i in 0..b {
        pts.extend_from_slice(&s.item(i)[..k * d]);
    }
    let points = Tensor::from_slice(&pts, (b * k, d), params.device())?;
    let mut lp_samples: Vec<f64> = flow
        .log_prob(&params.index_select(&idx, 0)?, &points)?
        .to_vec1()?;
    let mut lp_truth: Vec<f64> = parts.log_prob.to_vec1()?;
    if let Some(j) = jac {
        for i in 0..b {
            let f = &j.raw[i];
            lp_truth[i] -= j.cal.log_jacobian(&j.y_seen[i * d..(i + 1) * d], f);
            for r in 0..k {
                let at = (i * k + r) * d;
                lp_samples[i * k + r] -= j.cal.log_jacobian(&pts[at..at + d], f);
            }
        }
    }
    Ok((0..b)
        .map(|i| {
            let denser = lp_samples[i * k..(i + 1) * k]
                .iter()
                .filter(|&&v| v > lp_truth[i])
                .count();
            (denser as f64 + 0.5) / (k as f64 + 1.0)
        })
        .collect())
}
