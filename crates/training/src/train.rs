//! The training loop: epochs of shuffled batches, validation, early stopping and a checkpoint after
//! every epoch, resumable to the bit.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use starflow_data::{
    epoch_order, Batcher, Dataset, FluxTransform, LabelScaler, LoadOptions, Split, SplitFractions,
};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::model::{device, StarModel};
use crate::optim::{learning_rate, Adam};
use crate::pause::{pause, PauseAt};
use crate::run::{
    load_tensors, save_tensors_with, write_text, write_text_with, EpochRecord, RunDir, RunState,
    RUN_FORMAT,
};

/// Receives progress; the CLI draws progress bars with it, tests ignore it.
pub trait Observer {
    /// A message for the user (data generation, resume, early stop).
    fn message(&self, _text: &str) {}
    /// Start of an epoch with `n_steps` batches.
    fn epoch_start(&self, _epoch: usize, _n_epochs: usize, _n_steps: usize) {}
    /// After each training step, with the running mean training NLL.
    fn step(&self, _step: usize, _running_nll: f64) {}
    /// After validation and the checkpoint.
    fn epoch_end(&self, _record: &EpochRecord) {}
}

/// An observer that ignores everything.
#[derive(Debug)]
pub struct Quiet;
impl Observer for Quiet {}

/// The data a run trains on: the dataset, its split and normalisation.
pub struct Prepared {
    pub dataset: Dataset,
    pub split: Split,
    pub scaler: LabelScaler,
    pub flux: FluxTransform,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("dataset", &self.dataset)
            .finish()
    }
}

/// Loads (generating first, for synthetic configs) and splits the data of a config.
pub fn prepare_data(cfg: &TrainConfig, observer: &dyn Observer) -> Result<Prepared> {
    let d = &cfg.data;
    if d.synthetic {
        let synth = starflow_data::SynthConfig {
            n: d.synthetic_n,
            seed: d.synthetic_seed,
            pixels_per_camera: d.synthetic_pixels_per_camera,
            ..starflow_data::SynthConfig::default()
        };
        let missing = !d.dir.join("spectra.npy").exists();
        if missing || generated_otherwise(&d.dir, &synth) {
            observer.message(&format!(
                "generating the synthetic data set ({} stars, seed {}) into {}{}",
                d.synthetic_n,
                d.synthetic_seed,
                d.dir.display(),
                if missing {
                    ""
                } else {
                    " (the set there was generated with other settings or an older generator)"
                }
            ));
            starflow_data::generate(&synth, &|_| {})?.write(&d.dir)?;
        }
    }
    let opts = LoadOptions {
        label_names: d.label_names.clone(),
        targets: d.targets.clone(),
        drop_nonfinite: d.drop_nonfinite,
    };
    let dataset = Dataset::load_dir(&d.dir, &opts)?;
    let fractions = SplitFractions {
        train: d.train_fraction,
        val: d.val_fraction,
        test: d.test_fraction,
    };
    let split = Split::new(dataset.len(), fractions, d.split_seed)?;
    if split.val.is_empty() {
        return Err(TrainError::config(
            &d.dir,
            format!(
                "the validation split is empty ({} stars); use more data",
                dataset.len()
            ),
        ));
    }
    let scaler = LabelScaler::fit(&dataset, &split.train)?;
    Ok(Prepared {
        dataset,
        split,
        scaler,
        flux: FluxTransform::new(d.flux_floor)?,
    })
}

/// Whether `dir` holds a set that starflow's generator wrote (its `synth.json` says so) with other
/// settings or an older generator version than `want`: such a set is regenerated, so that changing
/// `data.synthetic_n` in a config takes effect. Files without a `synth.json` of ours (real data put
/// there by hand) are never touched.
fn generated_otherwise(dir: &Path, want: &starflow_data::SynthConfig) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("synth.json")) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    if v["generator"] != "starflow-synth" {
        return false;
    }
    let c = &v["config"];
    v["generator_version"] != starflow_data::synth::GENERATOR_VERSION
        || c["n"].as_u64() != Some(want.n as u64)
        || c["seed"].as_u64() != Some(want.seed)
        || c["pixels_per_camera"].as_u64() != Some(want.pixels_per_camera as u64)
}

/// Sets the global thread count once (rayon, which candle's CPU backend and our kernels use).
pub fn set_threads(threads: usize) {
    if threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
}

fn weights(model: &StarModel) -> std::collections::HashMap<String, Tensor> {
    let data = model
        .varmap
        .data()
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    data.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

/// Mean NLL over `indices` in eval mode.
pub fn mean_nll(
    model: &StarModel,
    batcher: &Batcher,
    indices: &[usize],
    batch_size: usize,
) -> Result<f64> {
    mean_nll_with(model, batcher, indices, batch_size, &|_| {})
}

/// [`mean_nll`] with a callback after each batch (the validation test hook).
fn mean_nll_with(
    model: &StarModel,
    batcher: &Batcher,
    indices: &[usize],
    batch_size: usize,
    after_batch: &dyn Fn(usize),
) -> Result<f64> {
    let mut total = 0.0;
    for (k, batch) in batcher.batches(indices, batch_size)?.enumerate() {
        let b = batch?;
        let nll = model.nll(&b.x, &b.y, false)?;
        total += nll.sum_all()?.to_scalar::<f64>()?;
        after_batch(k);
    }
    Ok(total / indices.len() as f64)
}

/// Options of one `train` call.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub out: PathBuf,
    pub resume: bool,
    /// Test hook: a loss of NaN is injected at these global step numbers (0-based), as if the
    /// network had produced it; used by the tests of the non-finite handling.
    pub inject_nan_steps: Vec<u64>,
    /// Test hook: pause at this point (writing the marker `RUN/.paused-<point>` and waiting until
    /// it is deleted), so that the fault tests can SIGKILL the binary or block a path there; see
    /// [`PauseAt`]. `None` in normal use.
    pub pause_at: Option<PauseAt>,
}

impl TrainOptions {
    /// Train into `out` from scratch, with no test hook.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        TrainOptions {
            out: out.into(),
            resume: false,
            inject_nan_steps: Vec::new(),
            pause_at: None,
        }
    }
}

/// Trains a model as configured, writing the run directory; returns the final state.
pub fn train(cfg: &TrainConfig, opts: &TrainOptions, observer: &dyn Observer) -> Result<RunState> {
    let run = RunDir::new(&opts.out);
    // Held until training returns: a second process on this directory gets a clear error.
    let _lock = run.lock()?;
    let existing = run.state().exists();
    if existing && !opts.resume {
        return Err(TrainError::run(
            &run.root,
            "the run directory already holds a run",
            "pass --resume to continue it, or choose another --out",
        ));
    }
    let (cfg, previous) = if existing {
        let st = run.load_state()?;
        let mut stored = st.config.clone();
        // Only the epoch budget may change on resume; everything else comes from the run.
        stored.optim.epochs = cfg.optim.epochs.max(stored.optim.epochs);
        (stored, Some(st))
    } else {
        (cfg.clone(), None)
    };
    if previous
        .as_ref()
        .is_some_and(|p| p.finished && p.config.optim.epochs >= cfg.optim.epochs)
    {
        observer.message("the run is already finished");
        return Ok(previous.expect("checked above"));
    }
    std::fs::create_dir_all(run.checkpoint_dir())
        .map_err(|e| TrainError::io(run.checkpoint_dir(), e))?;
    run.remove_stale_files(previous.as_ref());
    set_threads(cfg.run.threads);
    let dev = device(&cfg.run.device)?;
    let data = prepare_data(&cfg, observer)?;
    let dim = data.scaler.mean.len();
    let n_pix = data.dataset.n_pix();
    let model = StarModel::new(&cfg, n_pix, dim, &dev)?;
    let mut adam = Adam::new(
        starflow_models::named_trainable_vars(&model.varmap),
        &cfg.optim,
    )?;
    let mut state = match previous {
        Some(mut st) => {
            if st.n_pix != n_pix {
                return Err(TrainError::Input {
                    path: data.dataset.paths().0.to_path_buf(),
                    problem: format!(
                        "the spectra have {n_pix} pixels, but the run in {} was trained on {} pixels",
                        run.root.display(),
                        st.n_pix
                    ),
                    fix: "resume with the data the run was trained on, or start a new run".into(),
                });
            }
            if st.scaler != data.scaler {
                return Err(TrainError::run(
                    &run.root,
                    "the data no longer matches the run (the label statistics changed)",
                    "resume with the data the run was trained on, or start a new run",
                ));
            }
            if let (Some(m), Some(o)) = (&st.model_file, &st.optimizer_file) {
                let mut vm = model.varmap.clone();
                vm.load(run.root.join(m)).map_err(|e| {
                    TrainError::run(
                        run.root.join(m),
                        format!("cannot load checkpoint ({e})"),
                        "train again",
                    )
                })?;
                adam.load_state(&load_tensors(&run.root.join(o), &dev)?, st.adam_steps)?;
            }
            observer.message(&format!("resuming after epoch {}", st.epochs_done));
            st.config.optim.epochs = cfg.optim.epochs;
            st.finished = false;
            st.stop_reason = None;
            st
        }
        None => {
            write_text(&run.root.join("config.toml"), &cfg.to_toml())?;
            RunState {
                format: RUN_FORMAT,
                starflow_version: env!("CARGO_PKG_VERSION").to_string(),
                epochs_done: 0,
                best_val_nll: f64::INFINITY,
                best_epoch: 0,
                epochs_since_best: 0,
                adam_steps: 0,
                finished: false,
                stop_reason: None,
                history: Vec::new(),
                scaler: data.scaler.clone(),
                flux_floor: data.flux.floor,
                n_pix,
                n_train: data.split.train.len(),
                n_val: data.split.val.len(),
                n_test: data.split.test.len(),
                rng_scheme: format!("chacha8(seed={}, stream=epoch)", cfg.run.seed),
                model_file: None,
                optimizer_file: None,
                config: cfg.clone(),
            }
        }
    };
    let batcher = Batcher {
        dataset: &data.dataset,
        flux: data.flux,
        scaler: &data.scaler,
        device: dev.clone(),
    };
    let bs = cfg.optim.batch_size;
    let mut consecutive_bad = 0usize;
    let pause_at = opts.pause_at.as_ref();
    let pause_if = |hit: bool| {
        if let (true, Some(at)) = (hit, pause_at) {
            pause(at, &run.root);
        }
    };
    // Global step attempts so far (applied plus skipped), for the NaN-injection and pause hooks.
    let mut attempts: u64 = state.adam_steps
        + state
            .history
            .iter()
            .map(|r| r.steps_skipped as u64)
            .sum::<u64>();
    for epoch in state.epochs_done..cfg.optim.epochs {
        let start = Instant::now();
        let lr = learning_rate(&cfg.optim, epoch);
        let order = epoch_order(&data.split.train, cfg.run.seed, epoch as u64);
        model
            .backbone
            .reseed_dropout(cfg.run.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let n_steps = order.len().div_ceil(bs);
        observer.epoch_start(epoch, cfg.optim.epochs, n_steps);
        let (mut sum, mut count, mut skipped) = (0.0, 0usize, 0usize);
        for (k, batch) in batcher.batches(&order, bs)?.enumerate() {
            pause_if(pause_at == Some(&PauseAt::Step(attempts)));
            let b = batch?;
            let offdiagonal = epoch >= cfg.optim.offdiagonal_warmup_epochs;
            let nll = model.nll_gated(&b.x, &b.y, true, offdiagonal)?;
            let mut loss = nll.mean_all()?;
            if opts.inject_nan_steps.contains(&attempts) {
                loss = (loss * f64::NAN)?;
            }
            attempts += 1;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let applied = if value.is_finite() {
                adam.step(&loss.backward()?, lr)?.applied
            } else {
                false
            };
            if applied {
                consecutive_bad = 0;
                sum += value * b.indices.len() as f64;
                count += b.indices.len();
            } else {
                skipped += 1;
                consecutive_bad += 1;
                tracing::warn!(
                    epoch,
                    step = k,
                    loss = value,
                    "skipped a step with a non-finite loss or gradient"
                );
                if consecutive_bad >= cfg.optim.max_bad_steps {
                    return Err(TrainError::Diverged {
                        count: consecutive_bad,
                        epoch,
                        run: run.root.clone(),
                    });
                }
            }
            observer.step(
                k,
                if count > 0 {
                    sum / count as f64
                } else {
                    f64::NAN
                },
            );
        }
        let val_nll = mean_nll_with(&model, &batcher, &data.split.val, bs.max(64), &|k| {
            pause_if(k == 0 && pause_at == Some(&PauseAt::Validation(epoch + 1)));
        })?;
        let record = EpochRecord {
            epoch,
            train_nll: if count > 0 {
                sum / count as f64
            } else {
                f64::NAN
            },
            val_nll,
            lr,
            seconds: start.elapsed().as_secs_f64(),
            steps_skipped: skipped,
        };
        // Checkpoint: epoch-named weights and moments first, the best weights if improved, then
        // state.json as the commit point, and only then the previous epoch's files are removed.
        // A failed write leaves the previous commit in force; the error says so.
        let last_good = match state.epochs_done {
            0 => "none yet".to_string(),
            n => format!("epoch {n}"),
        };
        let hook = |path: &Path| {
            pause_if(
                matches!(pause_at, Some(PauseAt::Checkpoint { epoch: e, file })
                if *e == epoch + 1 && path.file_name() == Some(std::ffi::OsStr::new(file))),
            );
        };
        let old = (|| -> Result<[Option<String>; 2]> {
            let tag = format!("{:04}", epoch + 1);
            let model_file = format!("checkpoint/model-e{tag}.safetensors");
            let optim_file = format!("checkpoint/optimizer-e{tag}.safetensors");
            let epoch_weights = weights(&model);
            save_tensors_with(&run.root.join(&model_file), &epoch_weights, &hook)?;
            save_tensors_with(&run.root.join(&optim_file), &adam.state_tensors(), &hook)?;
            if val_nll.is_finite() && val_nll < state.best_val_nll {
                state.best_val_nll = val_nll;
                state.best_epoch = epoch + 1;
                state.epochs_since_best = 0;
                save_tensors_with(&run.best_model(), &epoch_weights, &hook)?;
            } else {
                state.epochs_since_best += 1;
            }
            let old = [state.model_file.take(), state.optimizer_file.take()];
            state.model_file = Some(model_file);
            state.optimizer_file = Some(optim_file);
            state.epochs_done = epoch + 1;
            state.adam_steps = adam.steps();
            state.history.push(record.clone());
            let patience_hit =
                cfg.optim.patience > 0 && state.epochs_since_best >= cfg.optim.patience;
            let last = epoch + 1 == cfg.optim.epochs;
            if patience_hit || last {
                state.finished = true;
                state.stop_reason = Some(if patience_hit && !last {
                    format!(
                        "early stop: no better validation NLL for {} epochs",
                        cfg.optim.patience
                    )
                } else {
                    format!("completed {} epochs", cfg.optim.epochs)
                });
            }
            write_text_with(&run.metrics(), &state.metrics_csv(), &hook)?;
            state.save_with(&run, &hook)?;
            Ok(old)
        })()
        .map_err(|e| TrainError::CheckpointWrite {
            epoch: epoch + 1,
            last_good,
            run: run.root.clone(),
            source: Box::new(e),
        })?;
        pause_if(pause_at == Some(&PauseAt::Commit(epoch + 1)));
        for f in old.into_iter().flatten() {
            let _ = std::fs::remove_file(run.root.join(f));
        }
        tracing::info!(
            epoch = epoch + 1,
            train_nll = record.train_nll,
            val_nll = record.val_nll,
            lr,
            seconds = record.seconds,
            skipped,
            "epoch finished"
        );
        observer.epoch_end(&record);
        if state.finished {
            if let Some(r) = &state.stop_reason {
                observer.message(r);
            }
            break;
        }
    }
    Ok(state)
}

/// Loads a finished (or interrupted) run's best model for evaluation and prediction.
pub fn load_run(run_dir: &Path) -> Result<(RunState, StarModel)> {
    let run = RunDir::new(run_dir);
    let state = run.load_state()?;
    if !run.best_model().exists() {
        return Err(TrainError::run(
            run.best_model(),
            "the run has no model.safetensors yet (no epoch finished)",
            "let training finish at least one epoch, or resume it with --resume",
        ));
    }
    set_threads(state.config.run.threads);
    let dev = device(&state.config.run.device)?;
    let model = StarModel::load(
        &state.config,
        state.n_pix,
        state.scaler.mean.len(),
        &run.best_model(),
        &dev,
    )?;
    Ok((state, model))
}
