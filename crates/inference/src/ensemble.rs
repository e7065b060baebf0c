//! Deep ensembles: the equal-weight mixture of several runs' posteriors, evaluated from their
//! pooled samples with the mixture's exact density.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use starflow_data::{Batch, Batcher};
use starflow_flows::PosteriorSummary;
use starflow_training::error::{Result, TrainError};
use starflow_training::run::RunState;

use crate::calibration::{Calibration, Frame, Resolved};
use crate::evaluate::{pool_standardized, Joint};
use crate::kinds::{by_kind, by_snr};
use crate::metrics::{assemble, Evaluation, POOLED_DRAWS};
use crate::posterior::{check_samples, PosteriorSettings, HPD_SAMPLES};
use crate::run::Run;
use crate::source::{source_rows, star_snr, EvalSource, SourceRows};
use crate::star::StarPrediction;

/// Evaluates a deep ensemble: the equal-weight mixture of the posteriors of `runs` (the same
/// labels, normalisation and pixel grid; typically the same recipe trained from different seeds)
/// on the stars of `source`. Each member contributes `n_samples / K` posterior samples, so means,
/// quantiles, PITs and the joint HPD levels come from the pooled samples of the mixture; the NLL
/// is the mixture's exact density, `log(mean_k p_k(y))`. With a calibration in `settings` the
/// mixture is mapped as a whole, as [`crate::evaluate_on`] maps a single run's posteriors.
pub fn evaluate_ensemble(
    runs: &[PathBuf],
    source: &EvalSource,
    settings: &PosteriorSettings,
) -> Result<Evaluation> {
    ensemble_pass(runs, source, settings, Joint::Levels)
}

/// [`evaluate_ensemble`], with the joint HPD levels computed or skipped; the samples drawn, and
/// so every other figure, are the same either way.
pub(crate) fn ensemble_pass(
    runs: &[PathBuf],
    source: &EvalSource,
    settings: &PosteriorSettings,
    joint: Joint,
) -> Result<Evaluation> {
    let (n_samples, seed, calibration) = (
        settings.n_samples,
        settings.seed,
        settings.calibration.as_ref(),
    );
    let start = Instant::now();
    let Some(first) = runs.first() else {
        return Err(TrainError::config(
            Path::new("."),
            "an ensemble needs at least one run".to_string(),
        ));
    };
    check_samples(first, n_samples)?;
    let members = load_members(runs)?;
    let state = &members[0].state;
    let rows = source_rows(first, state, source)?;
    let batcher = Batcher {
        dataset: &rows.dataset,
        flux: rows.flux,
        scaler: &state.scaler,
        device: members[0].model.device.clone(),
    };
    let (k, d) = (members.len(), state.scaler.mean.len());
    let mut pass = EnsemblePass {
        members: &members,
        rows: &rows,
        per_member: (n_samples / k).max(10),
        cal: calibration.map(Calibration::resolved),
        joint,
        rng: ChaCha8Rng::seed_from_u64(seed),
        stars: Vec::with_capacity(rows.indices.len()),
        nll: Vec::with_capacity(rows.indices.len()),
        draws: vec![Vec::new(); d],
    };
    for batch in batcher.batches(&rows.indices, 128)? {
        pass.add(&batch?)?;
    }
    let flows: Vec<String> = members
        .iter()
        .map(|m| m.state.config.model.flow.clone())
        .collect();
    let mut e = assemble(
        state,
        source.name(),
        &rows.data_dir,
        pass.stars,
        &pass.nll,
        format!("ensemble of {k} ({})", flows.join(", ")),
        k * pass.per_member,
        start,
    )?;
    e.standardized_draws = pass.draws;
    e.data = source.data_files();
    let snr = star_snr(&rows.dataset, &rows.indices);
    e.by_kind = by_kind(&e.stars, &state.scaler.names, snr.as_deref());
    e.by_snr = by_snr(&e.stars, &state.scaler.names, snr.as_deref());
    Ok(e)
}

/// An ensemble's evaluation in progress: its members and stars, how it samples and recalibrates,
/// and what it has summarised so far.
struct EnsemblePass<'a> {
    members: &'a [Run],
    rows: &'a SourceRows,
    /// Samples each member draws per star (pooled member by member).
    per_member: usize,
    cal: Option<Resolved>,
    joint: Joint,
    rng: ChaCha8Rng,
    stars: Vec<StarPrediction>,
    nll: Vec<f64>,
    /// [`Evaluation::standardized_draws`] (the mixture's own posteriors only).
    draws: Vec<Vec<f64>>,
}

/// One batch of an ensemble pass as its stars' posteriors are summarised: the mixture, its pooled
/// samples per star and their summary, and the frames the calibration acts in (none without one).
struct Pooled<'a> {
    mixture: Mixture<'a>,
    pts: Vec<Vec<f64>>,
    raw: Vec<PosteriorSummary>,
    frames: Vec<Frame>,
    noise: Vec<Option<f64>>,
}

impl EnsemblePass<'_> {
    /// Summarises one batch of stars.
    fn add(&mut self, b: &Batch) -> Result<()> {
        let n = b.indices.len();
        let d = self.draws.len();
        let yz: Vec<f64> = b.y.flatten_all()?.to_vec1()?;
        let params = self
            .members
            .iter()
            .map(|m| m.model.params(&b.x, false))
            .collect::<Result<Vec<_>>>()?;
        let pooled = self.pool(b, &params)?;
        let frames = &pooled.frames;
        // The truths as the unscaled mixture sees them, and the log-Jacobian of the maps there
        // (see `Pass::add`); with no calibration, the truths themselves.
        let seen: Vec<f64> = (0..n * d)
            .map(|q| {
                let (i, j) = (q / d, q % d);
                self.cal
                    .as_ref()
                    .map_or(yz[q], |c| c.seen(yz[q], &frames[i], j))
            })
            .collect();
        let cal = self.cal.as_ref();
        let log_jac = |x: &[f64], i: usize| cal.map_or(0.0, |c| c.log_jacobian(x, &frames[i]));
        let seen_t = Tensor::from_slice(&seen, (n, d), b.y.device())?;
        let lp_truth: Vec<f64> = pooled
            .mixture
            .log_prob(&seen_t, n, 1)?
            .into_iter()
            .enumerate()
            .map(|(i, lp)| lp - log_jac(&seen[i * d..(i + 1) * d], i))
            .collect();
        self.nll.extend(lp_truth.iter().map(|v| -v));
        let hpd = match self.joint {
            Joint::Levels => pooled
                .mixture
                .hpd_levels(&pooled.pts, &lp_truth, &log_jac)?,
            Joint::Skip => vec![None; n],
        };
        for i in 0..n {
            self.record(b, &pooled, i, &seen[i * d..(i + 1) * d], hpd[i]);
        }
        Ok(())
    }

    /// Each star's pooled samples (member 0's, then member 1's, ...), their summary, the
    /// calibration's frame about it and the spectra's noise levels.
    fn pool<'p>(&mut self, b: &Batch, params: &'p [Tensor]) -> Result<Pooled<'p>>
    where
        Self: 'p,
    {
        let (n, k, d) = (b.indices.len(), self.members.len(), self.draws.len());
        let mut pts = vec![Vec::with_capacity(k * self.per_member * d); n];
        for (m, p) in self.members.iter().zip(params) {
            let smp = m.model.flow.sample(p, self.per_member, &mut self.rng)?;
            for (i, star) in pts.iter_mut().enumerate() {
                star.extend_from_slice(smp.item(i));
            }
        }
        let raw: Vec<PosteriorSummary> = pts
            .iter()
            .map(|p| starflow_flows::summarize_points(p, d))
            .collect();
        let noise = starflow_data::log_noise_levels(&b.x)?;
        let frames: Vec<Frame> = match &self.cal {
            Some(c) => raw
                .iter()
                .zip(&noise)
                .map(|(s, f)| c.marginal_frame(s, *f))
                .collect(),
            None => Vec::new(),
        };
        Ok(Pooled {
            mixture: Mixture {
                members: self.members,
                params,
                per_member: self.per_member,
            },
            pts,
            raw,
            frames,
            noise,
        })
    }

    /// Adds star `i` of the batch: its PITs at its truth as the unscaled mixture sees it (`seen`),
    /// its (recalibrated) summary, and its joint HPD level.
    fn record(&mut self, b: &Batch, pooled: &Pooled, i: usize, seen: &[f64], hpd: Option<f64>) {
        let d = seen.len();
        let pts = &pooled.pts[i];
        let total = pts.len() / d;
        let pit = (0..d)
            .map(|j| {
                let below = (0..total).filter(|&r| pts[r * d + j] < seen[j]).count();
                (below as f64 + 0.5) / (total as f64 + 1.0)
            })
            .collect();
        let mut s = pooled.raw[i].clone();
        match &self.cal {
            Some(c) => c.apply(&mut s, &pooled.frames[i], Some(pts)),
            // Every member's share alike: the pooled samples are member by member.
            None => pool_standardized(
                &mut self.draws,
                pts,
                &s,
                total.div_ceil(POOLED_DRAWS),
                POOLED_DRAWS,
            ),
        }
        let scaler = &self.members[0].state.scaler;
        let (row, scale) = (b.indices[i], (&scaler.mean[..], &scaler.std[..]));
        let file_row = self.rows.dataset.file_row(row);
        self.stars.push(StarPrediction {
            truth: Some(self.rows.dataset.targets(row)),
            pit: Some(pit),
            hpd,
            ..StarPrediction::from_summary(file_row, &s, scale, pooled.noise[i])
        });
    }
}

/// The members of an ensemble, checked to share labels, normalisation and pixel grid, and to have
/// been trained on the same data files split the same way: the ensemble is evaluated on the first
/// run's test split, which must hold no member's training stars.
pub(crate) fn load_members(runs: &[PathBuf]) -> Result<Vec<Run>> {
    let members = runs
        .iter()
        .map(|r| Run::open(r))
        .collect::<Result<Vec<_>>>()?;
    let state = &members[0].state;
    for (r, m) in runs.iter().zip(&members) {
        if let Some(problem) = member_mismatch(state, &m.state) {
            return Err(TrainError::config(
                r,
                format!(
                    "this run's {problem} differ from {}'s: ensemble members must be trained on \
                     the same data, split the same way",
                    runs[0].display()
                ),
            ));
        }
    }
    Ok(members)
}

/// What of `member` differs from the ensemble's first run in a way that matters, if anything.
fn member_mismatch(first: &RunState, member: &RunState) -> Option<&'static str> {
    let split = |s: &RunState| {
        let d = &s.config.data;
        (
            d.train_fraction,
            d.val_fraction,
            d.test_fraction,
            d.split_seed,
            d.drop_nonfinite,
        )
    };
    if member.scaler != first.scaler || member.n_pix != first.n_pix {
        Some("labels, normalisation or pixel grid")
    } else if matches!(
        (&first.data_fingerprint, &member.data_fingerprint),
        (Some(a), Some(b)) if !b.differences(a).is_empty()
    ) {
        Some("data files (their sizes or contents)")
    } else if split(member) != split(first) {
        Some("split settings (data.*_fraction, data.split_seed or data.drop_nonfinite)")
    } else {
        None
    }
}

/// One batch of an ensemble: its members, their flow parameters for the batch's stars and how
/// many samples each member drew per star (pooled member by member).
struct Mixture<'a> {
    members: &'a [Run],
    params: &'a [Tensor],
    per_member: usize,
}

impl Mixture<'_> {
    /// The ensemble's log-density, `log(mean_k p_k(x))`, at `pts` (`(n * reps, d)`: `reps`
    /// points for each of the batch's `n` stars).
    fn log_prob(&self, pts: &Tensor, n: usize, reps: usize) -> Result<Vec<f64>> {
        let idx: Vec<u32> = (0..n as u32)
            .flat_map(|i| std::iter::repeat_n(i, reps))
            .collect();
        let idx = Tensor::from_vec(idx, n * reps, pts.device())?;
        let lps = self
            .members
            .iter()
            .zip(self.params)
            .map(|(m, p)| -> Result<Vec<f64>> {
                Ok(m.model
                    .flow
                    .log_prob(&p.index_select(&idx, 0)?, pts)?
                    .to_vec1()?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((0..n * reps)
            .map(|r| log_mean_exp(lps.iter().map(|lp| lp[r])))
            .collect())
    }

    /// Each star's joint HPD level, `P(p(X) > p(truth))` under the (mapped) mixture: the fraction
    /// of up to HPD_SAMPLES of its pooled samples, taken evenly from every member, where the
    /// mixture density (less the maps' log-Jacobian `log_jac`) exceeds the truth's `lp_truth`.
    fn hpd_levels(
        &self,
        pooled: &[Vec<f64>],
        lp_truth: &[f64],
        log_jac: &dyn Fn(&[f64], usize) -> f64,
    ) -> Result<Vec<Option<f64>>> {
        let (n, k, d) = (
            pooled.len(),
            self.members.len(),
            self.members[0].state.scaler.mean.len(),
        );
        let h = (HPD_SAMPLES / k).clamp(1, self.per_member);
        let mut hp = Vec::with_capacity(n * k * h * d);
        for pts in pooled {
            for m in 0..k {
                let from = m * self.per_member * d;
                hp.extend_from_slice(&pts[from..from + h * d]);
            }
        }
        let device = self.params[0].device();
        let pts = Tensor::from_slice(&hp, (n * k * h, d), device)?;
        let lp_h = self.log_prob(&pts, n, k * h)?;
        Ok((0..n)
            .map(|i| {
                let denser = (0..k * h)
                    .filter(|&r| {
                        let at = (i * k * h + r) * d;
                        lp_h[i * k * h + r] - log_jac(&hp[at..at + d], i) > lp_truth[i]
                    })
                    .count();
                Some((denser as f64 + 0.5) / ((k * h) as f64 + 1.0))
            })
            .collect())
    }
}

/// `log(mean(exp(v)))`, stable for very negative values.
fn log_mean_exp(v: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = v.clone().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    let (sum, count) = v.fold((0.0, 0usize), |(s, c), x| (s + (x - max).exp(), c + 1));
    max + (sum / count as f64).ln()
}
