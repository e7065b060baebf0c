//! Evaluation: the posteriors of a run on labelled stars, summarised per star in physical units,
//! with accuracy and calibration metrics per label, per kind of star and jointly.
//!
//! Calibration is measured with the probability integral transform (PIT): the posterior CDF of
//! each marginal at the true value. A central interval of mass p covers the truth exactly when
//! |PIT - 0.5| <= p / 2, so coverage needs no interval approximation for any flow. Gaussian flows
//! use their analytic moments and CDF; other flows use samples.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use starflow_data::{Batch, Batcher};
use starflow_flows::{LogProbParts, PosteriorSummary, Samples};
use starflow_training::error::{Result, TrainError};
use starflow_training::model::StarModel;

use crate::calibration::{Calibration, Resolved};
use crate::kinds::{by_kind, by_snr};
use crate::metrics::{assemble, Evaluation, POOLED_DRAWS};
use crate::posterior::{
    check_samples, hpd_levels, BatchPosterior, Draws, Jacobians, PosteriorSettings, Sampler,
    Sampling, HPD_SAMPLES,
};
use crate::radial::precision_of;
use crate::run::Run;
use crate::source::{source_rows, star_snr, EvalSource, SourceRows};
use crate::star::StarPrediction;

/// A finished run with the stars to evaluate, ready to be evaluated.
struct Opened {
    run: Run,
    stars: SourceRows,
}

/// Opens a run ([`Run::open`]) and loads the stars of `source` for it.
fn open_source(run_dir: &Path, source: &EvalSource) -> Result<Opened> {
    let run = Run::open(run_dir)?;
    let stars = source_rows(run_dir, &run.state, source)?;
    Ok(Opened { run, stars })
}

/// Evaluates a run on a split (`train`, `val` or `test`) of the data it was trained on (see
/// [`evaluate_on`]).
pub fn evaluate(run_dir: &Path, split: &str, settings: &PosteriorSettings) -> Result<Evaluation> {
    evaluate_on(run_dir, &EvalSource::Split(split.to_string()), settings)
}

/// Evaluates a run on the stars of `source` with the posteriors of `settings`: recalibrated when
/// it holds a calibration, and then PITs, coverage, pulls, quantiles and the NLL are those of the
/// recalibrated posteriors.
pub fn evaluate_on(
    run_dir: &Path,
    source: &EvalSource,
    settings: &PosteriorSettings,
) -> Result<Evaluation> {
    let mut evals = evaluate_on_each(run_dir, source, std::slice::from_ref(settings))?;
    Ok(evals.remove(0))
}

/// [`evaluate_on`] for several settings (typically the model's own posteriors and recalibrated
/// ones) in one pass over the data: each batch is read and run through the network once, and
/// every setting summarises the same posteriors with its own sampler, so the results equal
/// separate [`evaluate_on`] calls. `starflow report` uses it for the raw and the recalibrated
/// figures.
pub fn evaluate_on_each(
    run_dir: &Path,
    source: &EvalSource,
    settings: &[PosteriorSettings],
) -> Result<Vec<Evaluation>> {
    evaluate_passes(run_dir, source, settings, Joint::Levels, None)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Joint {
    Levels,
    /// `hpd` left empty: for fitting a calibration, which never reads it.
    Skip,
}

/// The network's outputs on one source, batch by batch: everything the passes read. A calibration
/// fit keeps them from its first pass, so that its held-out check of the widening, a second pass
/// over the same stars, does not run the network again (at the quick profile's 20,000 calibration
/// stars, a TinyCNN forward of ~14 s per run).
pub(crate) struct NetworkOutputs(Vec<Inputs>);

/// One [`Evaluation`] per entry of `settings`, on the stars of `source`, in one pass of the
/// network. With `keep`, the network's outputs are taken from it when it holds them (they must
/// come from the same run and source) and otherwise left in it for the next call.
pub(crate) fn evaluate_passes(
    run_dir: &Path,
    source: &EvalSource,
    settings: &[PosteriorSettings],
    joint: Joint,
    keep: Option<&mut Option<NetworkOutputs>>,
) -> Result<Vec<Evaluation>> {
    let start = Instant::now();
    for s in settings {
        check_samples(run_dir, s.n_samples)?;
    }
    let opened = open_source(run_dir, source)?;
    let (state, model) = (&opened.run.state, &opened.run.model);
    let d = state.scaler.mean.len();
    let mut passes = settings
        .iter()
        .map(|s| Pass::new(run_dir, s, d, opened.stars.indices.len()))
        .collect::<Result<Vec<_>>>()?;
    let snr = star_snr(&opened.stars.dataset, &opened.stars.indices);
    match keep {
        Some(Some(kept)) => {
            for inputs in &kept.0 {
                for pass in &mut passes {
                    pass.add(&opened, inputs, joint)?;
                }
            }
        }
        keep => {
            let batcher = Batcher {
                dataset: &opened.stars.dataset,
                flux: opened.stars.flux,
                scaler: &state.scaler,
                device: model.device.clone(),
            };
            let mut kept = Vec::new();
            for batch in batcher.batches(&opened.stars.indices, 128)? {
                let inputs = Inputs::of(model, batch?)?;
                for pass in &mut passes {
                    pass.add(&opened, &inputs, joint)?;
                }
                if keep.is_some() {
                    kept.push(inputs);
                }
            }
            if let Some(slot) = keep {
                *slot = Some(NetworkOutputs(kept));
            }
        }
    }
    passes
        .into_iter()
        .map(|p| {
            let mut e = assemble(
                state,
                source.name(),
                &opened.stars.data_dir,
                p.stars,
                &p.nll,
                state.config.model.flow.clone(),
                p.n_samples,
                start,
            )?;
            e.standardized_draws = p.draws;
            e.data = source.data_files();
            e.precisions = p.precisions;
            e.by_kind = by_kind(&e.stars, &state.scaler.names, snr.as_deref());
            e.by_snr = by_snr(&e.stars, &state.scaler.names, snr.as_deref());
            Ok(e)
        })
        .collect()
}

/// One batch as every pass of [`evaluate_passes`] reads it: the batch, its z-scored truths and
/// its spectra's noise levels ([`StarPrediction::noise`]).
struct Inputs {
    /// The flow parameters the network gives for the batch's spectra.
    params: Tensor,
    /// The z-scored truths, as a tensor and flat.
    y: Tensor,
    yz: Vec<f64>,
    /// The batch's rows of the source's dataset.
    indices: Vec<usize>,
    noise: Vec<Option<f64>>,
}

impl Inputs {
    /// Runs the network on `b` (eval mode); its spectra are not kept.
    fn of(model: &StarModel, b: Batch) -> Result<Self> {
        Ok(Self {
            params: model.params(&b.x, false)?,
            yz: b.y.flatten_all()?.to_vec1()?,
            // Once per batch, whatever the number of passes (the widening's check runs two).
            noise: starflow_data::log_noise_levels(&b.x)?,
            y: b.y,
            indices: b.indices,
        })
    }
}

/// One calibration's share of [`evaluate_on_each`]: its sampler and what it has summarised so far.
struct Pass {
    /// The calibration's maps, resolved once (`None`: the model's own posteriors).
    resolved: Option<Resolved>,
    n_samples: usize,
    rng: ChaCha8Rng,
    stars: Vec<StarPrediction>,
    nll: Vec<f64>,
    /// [`Evaluation::standardized_draws`] and `precisions` (model's own posteriors only).
    draws: Vec<Vec<f64>>,
    precisions: Vec<Vec<f64>>,
}

impl Pass {
    fn new(run_dir: &Path, settings: &PosteriorSettings, d: usize, n: usize) -> Result<Self> {
        let calibration = settings.calibration.as_ref();
        if let Some(c) = calibration {
            let fits = |len: usize| len == 0 || len == d;
            if c.scale.len() != d || !fits(c.shift.len()) || !fits(c.maps.len()) {
                return Err(TrainError::config(
                    run_dir,
                    format!(
                        "the calibration has {} factors, {} shifts and {} maps but the run predicts {d} labels",
                        c.scale.len(),
                        c.shift.len(),
                        c.maps.len()
                    ),
                ));
            }
        }
        Ok(Pass {
            resolved: calibration.map(Calibration::resolved),
            n_samples: settings.n_samples,
            rng: ChaCha8Rng::seed_from_u64(settings.seed),
            stars: Vec::with_capacity(n),
            nll: Vec::with_capacity(n),
            draws: vec![Vec::new(); d],
            precisions: Vec::new(),
        })
    }

    /// Summarises one batch of the network's outputs.
    fn add(&mut self, opened: &Opened, inputs: &Inputs, joint: Joint) -> Result<()> {
        let (state, model) = (&opened.run.state, &opened.run.model);
        let d = model.flow.dim();
        let (params, yz, noise) = (&inputs.params, &inputs.yz[..], &inputs.noise);
        let post = BatchPosterior::new(
            &model.flow,
            params,
            (
                self.n_samples,
                &mut Draws::Shared(&mut self.rng),
                Sampling::WhereNeeded,
            ),
            self.resolved.as_ref(),
            noise,
        )?;
        let batch = post.summaries(Some(yz));
        // The recalibrated density at y is the unscaled density at y_seen over the Jacobian.
        let (y_seen, jac) = match (&batch.y_seen, &self.resolved) {
            (Some(v), Some(cal)) => (
                Tensor::from_slice(v, inputs.y.dims(), inputs.y.device())?,
                Some(Jacobians {
                    cal,
                    raw: &post.frames,
                    y_seen: v,
                }),
            ),
            _ => (inputs.y.clone(), None),
        };
        let parts = model.flow.log_prob_parts(params, &y_seen)?;
        let log_prob: Vec<f64> = parts.log_prob.to_vec1()?;
        self.nll.extend(log_prob.iter().enumerate().map(|(i, lp)| {
            let log_jac = jac.as_ref().map_or(0.0, |j| {
                j.cal.log_jacobian(&j.y_seen[i * d..(i + 1) * d], &j.raw[i])
            });
            log_jac - lp
        }));
        let hpd = match joint {
            Joint::Levels => {
                let samples = post.samples.as_ref();
                joint_levels(model, params, &parts, samples, jac, &mut self.rng)?
            }
            Joint::Skip => vec![None; batch.items.len()],
        };
        if self.resolved.is_none() {
            self.record_shapes(post.samples.as_ref(), &batch.items);
        }
        for (k, (s, pit)) in batch.items.into_iter().enumerate() {
            let i = inputs.indices[k];
            let row = opened.stars.dataset.file_row(i);
            let scale = (&state.scaler.mean[..], &state.scaler.std[..]);
            self.stars.push(StarPrediction {
                truth: Some(opened.stars.dataset.targets(i)),
                pit,
                hpd: hpd[k],
                ..StarPrediction::from_summary(row, &s, scale, noise[k])
            });
        }
        Ok(())
    }
}

/// [`StarPrediction::hpd`] for a batch, given its posterior `samples` when the flow is sampled.
fn joint_levels(
    model: &StarModel,
    params: &Tensor,
    parts: &LogProbParts,
    samples: Option<&Samples>,
    jac: Option<Jacobians>,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Option<f64>>> {
    // An affine map keeps the density ranking of the truth among the unscaled samples (and
    // the Gaussian flows' chi-square levels); another map needs samples and its Jacobian.
    let jac = jac.filter(|j| !j.cal.is_affine());
    let drawn_for_hpd = match (samples, &jac) {
        (None, Some(_)) => Some(model.flow.sample(params, HPD_SAMPLES, rng)?),
        _ => None,
    };
    let samples = samples.or(drawn_for_hpd.as_ref());
    let levels = hpd_levels(&model.flow, params, parts, samples, jac)?;
    Ok(levels.into_iter().map(Some).collect())
}

impl Pass {
    /// Records what a recalibration is fitted to beyond the summaries: for Gaussian flows each
    /// star's precision (identity where its correlation is singular), which only their radial
    /// map uses; for sampled flows up to [`POOLED_DRAWS`] standardised samples per star.
    fn record_shapes(
        &mut self,
        drawn: Option<&Samples>,
        items: &[(PosteriorSummary, Option<Vec<f64>>)],
    ) {
        let d = self.draws.len();
        for (i, (s, _)) in items.iter().enumerate() {
            match drawn {
                Some(drawn) => {
                    pool_standardized(&mut self.draws, drawn.item(i), s, 1, POOLED_DRAWS)
                }
                None => self
                    .precisions
                    .push(precision_of(&s.cov, &s.std).unwrap_or_else(|| identity(d))),
            }
        }
    }
}

/// The `d x d` identity, row-major.
fn identity(d: usize) -> Vec<f64> {
    (0..d * d)
        .map(|k| if k % (d + 1) == 0 { 1.0 } else { 0.0 })
        .collect()
}

/// Adds up to `max` of one star's samples `pts` (`(n, d)` row-major), every `step`-th,
/// standardised by its summary `s`, to the per-label pools `draws`.
pub(crate) fn pool_standardized(
    draws: &mut [Vec<f64>],
    pts: &[f64],
    s: &PosteriorSummary,
    step: usize,
    max: usize,
) {
    let d = draws.len();
    for x in pts.chunks_exact(d).step_by(step.max(1)).take(max) {
        for (j, pool) in draws.iter_mut().enumerate() {
            pool.push((x[j] - s.mean[j]) / s.std[j]);
        }
    }
}

/// Posterior samples of a few stars, in physical units: what a corner plot draws.
#[derive(Clone, Debug)]
pub struct StarSamples {
    /// Row in the label file.
    pub row: usize,
    /// True labels (physical units).
    pub truth: Vec<f64>,
    /// Number of labels, d.
    pub dim: usize,
    /// `n × d` samples, row-major, physical units.
    pub samples: Vec<f64>,
}

/// Draws `sampler.n_samples` posterior samples (the model's own posteriors) for the stars at
/// `positions` within a split (positions index the split's rows in its stored order, e.g. as
/// returned in [`Evaluation::stars`]).
pub fn posterior_samples(
    run_dir: &Path,
    split: &str,
    positions: &[usize],
    sampler: Sampler,
) -> Result<Vec<StarSamples>> {
    let source = EvalSource::Split(split.to_string());
    posterior_samples_on(run_dir, &source, positions, sampler)
}

/// [`posterior_samples`] for stars of any [`EvalSource`] (positions index its rows).
pub fn posterior_samples_on(
    run_dir: &Path,
    source: &EvalSource,
    positions: &[usize],
    sampler: Sampler,
) -> Result<Vec<StarSamples>> {
    let Sampler { n_samples, seed } = sampler;
    check_samples(run_dir, n_samples)?;
    let split = source.name();
    let opened = open_source(run_dir, source)?;
    let chosen = positions
        .iter()
        .map(|&p| {
            opened.stars.indices.get(p).copied().ok_or_else(|| {
                TrainError::config(
                    run_dir,
                    format!(
                        "star {p} is out of range: the {split} split has {} stars",
                        opened.stars.indices.len()
                    ),
                )
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    let batcher = Batcher {
        dataset: &opened.stars.dataset,
        flux: opened.stars.flux,
        scaler: &opened.run.state.scaler,
        device: opened.run.model.device.clone(),
    };
    let scaler = &opened.run.state.scaler;
    let d = scaler.mean.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(chosen.len());
    for batch in batcher.batches(&chosen, 64)? {
        let b = batch?;
        let params = opened.run.model.params(&b.x, false)?;
        let samples = opened.run.model.flow.sample(&params, n_samples, &mut rng)?;
        for (k, &i) in b.indices.iter().enumerate() {
            let z = samples.item(k);
            let phys = z
                .iter()
                .enumerate()
                .map(|(m, v)| scaler.mean[m % d] + scaler.std[m % d] * v)
                .collect();
            out.push(StarSamples {
                row: opened.stars.dataset.file_row(i),
                truth: opened.stars.dataset.targets(i),
                dim: d,
                samples: phys,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{evaluate_passes, Joint, NetworkOutputs};
    use crate::posterior::Sampler;
    use crate::source::EvalSource;
    use starflow_training::config::TrainConfig;
    use starflow_training::{train, Quiet, TrainOptions};

    /// A second pass on kept network outputs gives the same evaluations, to the bit, as passes
    /// that run the network (a sampled flow, so the draws' order matters too).
    #[test]
    fn kept_network_outputs_give_the_same_evaluations() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = TrainConfig::tiny(&dir.path().join("data"), "full_flow", "cnn", 1);
        cfg.data.synthetic_n = 800;
        cfg.data.train_fraction = 0.5;
        cfg.data.val_fraction = 0.4;
        cfg.data.test_fraction = 0.1;
        let run = dir.path().join("run");
        train(&cfg, &TrainOptions::new(&run), &Quiet).unwrap();
        let source = EvalSource::Split("val".into());
        let settings = [
            Sampler::new(40, 3).with(None),
            Sampler::new(40, 4).with(None),
        ];
        let pass = |keep: Option<&mut Option<NetworkOutputs>>| {
            evaluate_passes(&run, &source, &settings, Joint::Skip, keep).unwrap()
        };
        let mut kept = None;
        let fresh = pass(None);
        let first = pass(Some(&mut kept));
        assert!(
            kept.as_ref().is_some_and(|k| k.0.len() > 1),
            "several batches kept"
        );
        let again = pass(Some(&mut kept));
        for evals in [first, again] {
            for (mut e, f) in evals.into_iter().zip(&fresh) {
                e.seconds = f.seconds;
                assert_eq!(&e, f);
            }
        }
    }
}
