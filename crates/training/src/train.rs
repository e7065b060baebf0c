//! The training loop: epochs of shuffled batches, validation, early stopping and a checkpoint after
//! every epoch, resumable to the bit.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use starflow_data::{
    epoch_order, Batch, Batcher, Dataset, FluxTransform, LabelScaler, LoadOptions, Split,
    SplitFractions,
};

use crate::aux_targets::{masked_mse, AuxTargets};
use crate::config::{DataConfig, Named, TrainConfig};
use crate::error::{Result, TrainError};
use crate::model::{device, StarModel};
use crate::optim::{learning_rate, Adam};
use crate::pause::{pause, PauseAt};
use crate::run::{
    load_tensors, save_tensors_with, verify_tensors, write_text, write_text_with, DataFingerprint,
    EpochRecord, RunDir, RunState, RUN_FORMAT,
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
    /// Asked after every step: `true` stops training with [`TrainError::Interrupted`] before the
    /// epoch is committed (a notebook's Ctrl-C reaches a library call this way).
    fn interrupted(&self) -> bool {
        false
    }
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
        ensure_synthetic(&d.dir, d.synthetic_n, d.synthetic_seed, d, observer)?;
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

/// Generates the synthetic set of `n` stars drawn with `seed` (on `d`'s pixel grid) into `dir`
/// unless it is already there.
fn ensure_synthetic(
    dir: &Path,
    n: usize,
    seed: u64,
    d: &DataConfig,
    observer: &dyn Observer,
) -> Result<()> {
    let synth = starflow_data::SynthConfig {
        n,
        seed,
        pixels_per_camera: d.synthetic_pixels_per_camera,
        ..starflow_data::SynthConfig::default()
    };
    let missing = !dir.join("spectra.npy").exists();
    if missing || generated_otherwise(dir, &synth) {
        observer.message(&format!(
            "generating the synthetic data set ({n} stars, seed {seed}) into {}{}",
            dir.display(),
            if missing {
                ""
            } else {
                " (the set there was generated with other settings or an older generator)"
            }
        ));
        starflow_data::generate(&synth, &|_| {})?.write(dir)?;
    }
    Ok(())
}

/// The directory of a config's synthetic calibration set (`data.calibration_n` stars drawn with
/// `data.calibration_seed`), generated when missing; `None` when the recalibration is fitted on
/// the validation split (real data, or `calibration_n = 0`).
pub fn calibration_set(cfg: &TrainConfig, observer: &dyn Observer) -> Result<Option<PathBuf>> {
    let Some(dir) = calibration_set_dir(cfg) else {
        return Ok(None);
    };
    let d = &cfg.data;
    ensure_synthetic(&dir, d.calibration_n, d.calibration_seed, d, observer)?;
    Ok(Some(dir))
}

/// Where [`calibration_set`] keeps a config's calibration set, `<data.dir>-calibration-<seed>`
/// beside the training data, without generating it; `None` when there is none.
pub fn calibration_set_dir(cfg: &TrainConfig) -> Option<PathBuf> {
    let d = &cfg.data;
    if !d.synthetic || d.calibration_n == 0 {
        return None;
    }
    let name = d
        .dir
        .file_name()
        .map_or("synth".into(), |n| n.to_string_lossy().into_owned());
    Some(
        d.dir
            .with_file_name(format!("{name}-calibration-{}", d.calibration_seed)),
    )
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

/// What a caller asks of one training: a config file (the defaults when `None`), `section.key=value`
/// overrides, the run directory (default `runs/<backbone>-<flow>`) and whether to resume. The
/// command line and the Python package both resolve their arguments through it, so the same
/// request trains the same run.
#[derive(Clone, Debug, Default)]
pub struct TrainRequest {
    pub config: Option<PathBuf>,
    pub overrides: Vec<String>,
    pub out: Option<PathBuf>,
    pub resume: bool,
}

impl TrainRequest {
    /// The configuration and the run directory.
    pub fn resolve(&self) -> Result<(TrainConfig, PathBuf)> {
        let origin = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("<defaults>"));
        let mut cfg = match &self.config {
            Some(p) => TrainConfig::from_file(p)?,
            None => TrainConfig::default(),
        };
        if self.resume {
            // A resumed run keeps its stored config, and `train` takes the larger of the stored
            // and the given epoch budgets; so only an explicit override of optim.epochs may extend
            // it. Without this, a resume took the default budget of 10 epochs and trained a
            // killed 3-epoch run on to 10.
            cfg.optim.epochs = 1;
        }
        cfg.apply_overrides(&self.overrides, &origin)?;
        let out = self.out.clone().unwrap_or_else(|| {
            PathBuf::from(format!("runs/{}-{}", cfg.model.backbone, cfg.model.flow))
        });
        if self.resume {
            self.check_resumable(&cfg, &out)?;
        }
        Ok((cfg, out))
    }

    /// A resumed run keeps the config it started with (only the epoch budget may grow), so a
    /// setting given with `--resume` that differs from it would be ignored without a word: refuse
    /// it instead, naming each. Settings equal to the run's pass, so repeating the original
    /// command with `--resume` works. Nothing to check when `out` holds no committed run yet.
    fn check_resumable(&self, cfg: &TrainConfig, out: &Path) -> Result<()> {
        let run = RunDir::new(out);
        if !run.state().exists() {
            return Ok(());
        }
        let stored = run.load_state()?.config;
        let table = |c: &TrainConfig| toml::Table::try_from(c).unwrap_or_default();
        let (given, kept) = (table(cfg), table(&stored));
        let at = |t: &toml::Table, key: &str| {
            let (section, name) = key.split_once('.')?;
            t.get(section)?.get(name).cloned()
        };
        let differing: Vec<String> = self
            .given_keys()?
            .into_iter()
            .filter(|(key, _)| key != "optim.epochs")
            .filter(|(key, _)| at(&given, key) != at(&kept, key))
            .map(|(key, from)| {
                let show = |v: Option<toml::Value>| v.map_or("-".into(), |v| v.to_string());
                format!(
                    "{key} = {} ({from}; the run has {})",
                    show(at(&given, &key)),
                    show(at(&kept, &key))
                )
            })
            .collect();
        if differing.is_empty() {
            return Ok(());
        }
        Err(TrainError::run(
            out,
            format!(
                "--resume continues the run with the config it started with, so these settings cannot apply: {}",
                differing.join("; ")
            ),
            "drop them (only --epochs, or optim.epochs, may change when resuming), or start a new run in another --out",
        ))
    }

    /// Every `section.key` this request sets explicitly, with where: the config file's keys, then
    /// the overrides'.
    fn given_keys(&self) -> Result<Vec<(String, String)>> {
        let mut keys = Vec::new();
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
            let doc: toml::Table = text
                .parse()
                .map_err(|e| TrainError::config(path, format!("invalid TOML: {e}")))?;
            for (section, table) in &doc {
                for name in table.as_table().into_iter().flat_map(|t| t.keys()) {
                    keys.push((
                        format!("{section}.{name}"),
                        format!("from {}", path.display()),
                    ));
                }
            }
        }
        for ov in &self.overrides {
            if let Some((key, _)) = ov.split_once('=') {
                keys.push((
                    key.trim().to_string(),
                    format!("from the command line: {ov}"),
                ));
            }
        }
        Ok(keys)
    }
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
///
/// The algorithm: take the run directory's lock; open the run (new, or resumed from its last
/// committed epoch); then for each remaining epoch train on the shuffled training split, measure
/// the validation NLL and commit the checkpoint, until the epoch budget or early stopping ends it.
pub fn train(cfg: &TrainConfig, opts: &TrainOptions, observer: &dyn Observer) -> Result<RunState> {
    // A GPU this build or machine lacks is refused before the run directory is made (a resumed
    // run's own config is checked again when it starts).
    device(cfg.run.device.name())?;
    let run = RunDir::new(&opts.out);
    check_out_dir(&run, opts.resume)?;
    // Held until training returns: a second process on this directory gets a clear error.
    let _lock = run.lock()?;
    let (cfg, previous) = match open_run(&run, cfg, opts, observer)? {
        Opened::Finished(state) => return Ok(state),
        Opened::Train { cfg, previous } => (cfg, previous),
    };
    let mut t = Trainer::start(run, cfg, opts, previous, observer)?;
    for epoch in t.state.epochs_done..t.cfg.optim.epochs {
        let start = Instant::now();
        let lr = learning_rate(&t.cfg.optim, epoch);
        let (train_nll, steps_skipped) = t.train_epoch(epoch, lr, observer)?;
        let val_nll = t.validate(epoch)?;
        let record = EpochRecord {
            epoch,
            train_nll,
            val_nll,
            lr,
            seconds: start.elapsed().as_secs_f64(),
            steps_skipped,
        };
        t.commit(epoch, &record)?;
        tracing::info!(
            epoch = epoch + 1,
            train_nll,
            val_nll,
            lr,
            seconds = record.seconds,
            skipped = steps_skipped,
            "epoch finished"
        );
        observer.epoch_end(&record);
        if t.state.finished {
            if let Some(r) = &t.state.stop_reason {
                observer.message(r);
            }
            break;
        }
    }
    Ok(t.state)
}

/// Refuses, before anything is created or written, what would lose data or pretend: `--resume`
/// where there is no run (it used to start a new run with the defaults, exit 0), and a new run in
/// a directory holding files of something else (it overwrote them).
fn check_out_dir(run: &RunDir, resume: bool) -> Result<()> {
    if run.state().exists() {
        return Ok(());
    }
    if resume {
        if run.root.join("config.toml").is_file() {
            // A run that has not committed its first epoch (maybe still training): decided under
            // the lock in `open_run`.
            return Ok(());
        }
        let problem = if run.root.is_dir() {
            "there is no run to resume: the directory has no state.json"
        } else {
            "there is no run to resume: the directory does not exist"
        };
        return Err(TrainError::run(
            &run.root,
            problem,
            "check --out; to start a new run there instead, drop --resume",
        ));
    }
    match run.foreign_entry() {
        None => Ok(()),
        Some(entry) => Err(TrainError::run(
            &run.root,
            format!(
                "the directory is not a starflow run (it holds {entry}), and a new run would overwrite or delete its files"
            ),
            "choose a new or empty --out directory",
        )),
    }
}

/// What [`open_run`] found in the run directory (made once per run, so its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Opened {
    /// The run is finished within the requested epoch budget: nothing to do.
    Finished(RunState),
    /// Train with this configuration, continuing `previous` when resuming.
    Train {
        cfg: TrainConfig,
        previous: Option<RunState>,
    },
}

/// Decides whether to start a run, continue one, or do nothing. A resumed run keeps its stored
/// configuration; only the epoch budget may grow.
fn open_run(
    run: &RunDir,
    cfg: &TrainConfig,
    opts: &TrainOptions,
    observer: &dyn Observer,
) -> Result<Opened> {
    if !run.state().exists() {
        if !opts.resume {
            return Ok(Opened::Train {
                cfg: cfg.clone(),
                previous: None,
            });
        }
        // A run that stopped before committing its first epoch (checked under the lock, so one
        // still training elsewhere was reported as such): start it again from its own config,
        // never from the defaults.
        let mut stored = TrainConfig::from_file(&run.root.join("config.toml"))?;
        stored.optim.epochs = cfg.optim.epochs.max(stored.optim.epochs);
        observer.message(&format!(
            "{}: the run stopped before its first epoch was committed; starting it again from its config.toml",
            run.root.display()
        ));
        return Ok(Opened::Train {
            cfg: stored,
            previous: None,
        });
    }
    if !opts.resume {
        return Err(TrainError::run(
            &run.root,
            "the run directory already holds a run",
            "pass --resume to continue it, or choose another --out",
        ));
    }
    let st = run.load_state()?;
    let mut stored = st.config.clone();
    stored.optim.epochs = cfg.optim.epochs.max(stored.optim.epochs);
    if st.finished && st.config.optim.epochs >= stored.optim.epochs {
        observer.message("the run is already finished");
        return Ok(Opened::Finished(st));
    }
    Ok(Opened::Train {
        cfg: stored,
        previous: Some(st),
    })
}

/// One training run in progress: its configuration, data, model, optimiser and committed state,
/// plus the bookkeeping of the non-finite step guard and the test hooks.
struct Trainer<'o> {
    run: RunDir,
    cfg: TrainConfig,
    opts: &'o TrainOptions,
    data: Prepared,
    model: StarModel,
    adam: Adam,
    state: RunState,
    /// Global step attempts so far (applied plus skipped), for the NaN-injection and pause hooks.
    attempts: u64,
    /// Non-finite steps in a row; training stops at `optim.max_bad_steps`.
    consecutive_bad: usize,
    /// The auxiliary targets (`data.aux_file`), and the epoch's running sum of their loss over
    /// applied steps (logged at the epoch's end).
    aux: Option<AuxTargets>,
    aux_loss_sum: f64,
}

impl<'o> Trainer<'o> {
    /// Loads the data, builds the model and the optimiser, and either writes a new run's
    /// `config.toml` and initial state or restores the last committed checkpoint of `previous`.
    fn start(
        run: RunDir,
        cfg: TrainConfig,
        opts: &'o TrainOptions,
        previous: Option<RunState>,
        observer: &dyn Observer,
    ) -> Result<Self> {
        // The device first: a GPU this build or machine lacks is refused before anything is
        // generated.
        let dev = device(cfg.run.device.name())?;
        if cfg.data.aux_file.is_empty() && cfg.model.aux_outputs > 0 {
            return Err(TrainError::config(
                &run.root,
                format!(
                    "model.aux_outputs = {} but data.aux_file is empty: name the file of \
                     auxiliary targets in data.dir, or set model.aux_outputs = 0",
                    cfg.model.aux_outputs
                ),
            ));
        }
        std::fs::create_dir_all(run.checkpoint_dir())
            .map_err(|e| TrainError::io(run.checkpoint_dir(), e))?;
        run.remove_stale_files(previous.as_ref());
        set_threads(cfg.run.threads);
        let data = prepare_data(&cfg, observer)?;
        let dim = data.scaler.mean.len();
        let aux = match cfg.data.aux_file.as_str() {
            "" => None,
            file => Some(AuxTargets::load(
                &cfg.data.dir.join(file),
                &data.dataset,
                cfg.model.aux_outputs,
                &data.split.train,
            )?),
        };
        let model = StarModel::new(&cfg, data.dataset.n_pix(), dim, &dev)?;
        let adam = Adam::new(
            starflow_models::named_trainable_vars(&model.varmap),
            &cfg.optim,
        )?;
        let mut t = Trainer {
            state: fresh_state(&cfg, &data),
            run,
            cfg,
            opts,
            data,
            model,
            adam,
            attempts: 0,
            consecutive_bad: 0,
            aux,
            aux_loss_sum: 0.0,
        };
        match previous {
            Some(st) => t.resume_from(st, observer)?,
            None => {
                let (spectra, labels) = t.data.dataset.paths();
                t.state.data_fingerprint = Some(DataFingerprint::of(spectra, labels)?);
                write_text(&t.run.root.join("config.toml"), &t.cfg.to_toml())?
            }
        }
        t.attempts = t.state.adam_steps
            + t.state
                .history
                .iter()
                .map(|r| r.steps_skipped as u64)
                .sum::<u64>();
        Ok(t)
    }

    /// Continues `st`: checks that the data still match the run, then loads the committed weights
    /// and Adam moments.
    fn resume_from(&mut self, mut st: RunState, observer: &dyn Observer) -> Result<()> {
        let n_pix = self.data.dataset.n_pix();
        if st.n_pix != n_pix {
            return Err(TrainError::Input {
                path: self.data.dataset.paths().0.to_path_buf(),
                problem: format!(
                    "the spectra have {n_pix} pixels, but the run in {} was trained on {} pixels",
                    self.run.root.display(),
                    st.n_pix
                ),
                fix: "resume with the data the run was trained on, or start a new run".into(),
            });
        }
        let (spectra, labels) = self.data.dataset.paths();
        st.check_data(
            &self.run,
            spectra,
            labels,
            "resume with the data the run was trained on (restore data.dir), or start a new run",
        )?;
        if st.scaler != self.data.scaler {
            return Err(TrainError::run(
                &self.run.root,
                "the data no longer matches the run (the label statistics changed)",
                "resume with the data the run was trained on, or start a new run",
            ));
        }
        if let (Some(m), Some(o)) = (&st.model_file, &st.optimizer_file) {
            for f in [m, o] {
                verify_tensors(&self.run.root.join(f))?;
            }
            let mut vm = self.model.varmap.clone();
            vm.load(self.run.root.join(m)).map_err(|e| {
                TrainError::run(
                    self.run.root.join(m),
                    format!("cannot load checkpoint ({e})"),
                    "train again",
                )
            })?;
            let moments = load_tensors(&self.run.root.join(o), &self.model.device)?;
            self.adam.load_state(&moments, st.adam_steps)?;
        }
        observer.message(&format!("resuming after epoch {}", st.epochs_done));
        st.config.optim.epochs = self.cfg.optim.epochs;
        st.finished = false;
        st.stop_reason = None;
        self.state = st;
        Ok(())
    }

    fn batcher(&self) -> Batcher<'_> {
        Batcher {
            dataset: &self.data.dataset,
            flux: self.data.flux,
            scaler: &self.data.scaler,
            device: self.model.device.clone(),
        }
    }

    /// Waits at the configured pause point when `hit` (the fault tests' hook).
    fn pause_if(&self, hit: bool) {
        if let (true, Some(at)) = (hit, self.opts.pause_at.as_ref()) {
            pause(at, &self.run.root);
        }
    }

    /// One epoch of training steps in the epoch's seeded order; returns the mean training NLL of
    /// the applied steps and the number of skipped (non-finite) steps.
    fn train_epoch(
        &mut self,
        epoch: usize,
        lr: f64,
        observer: &dyn Observer,
    ) -> Result<(f64, usize)> {
        let seed = self.cfg.run.seed;
        let order = epoch_order(&self.data.split.train, seed, epoch as u64);
        self.model
            .backbone
            .reseed_dropout(seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let bs = self.cfg.optim.batch_size;
        if bs == 0 {
            return Err(TrainError::config(
                &self.run.root,
                "optim.batch_size = 0: must be an integer >= 1",
            ));
        }
        observer.epoch_start(epoch, self.cfg.optim.epochs, order.len().div_ceil(bs));
        let (mut sum, mut count, mut skipped) = (0.0, 0usize, 0usize);
        self.aux_loss_sum = 0.0;
        let augment = NoiseAugment {
            factor: self.cfg.data.augment_noise,
            seed,
            epoch: epoch as u64,
        };
        for (k, rows) in order.chunks(bs).enumerate() {
            let b = if augment.factor > 0.0 {
                self.batcher()
                    .batch_with(rows, |i, flux| augment.apply(i, flux))?
            } else {
                self.batcher().batch(rows)?
            };
            match self.step(epoch, lr, &b)? {
                (value, true) => {
                    sum += value * b.indices.len() as f64;
                    count += b.indices.len();
                }
                (value, false) => {
                    skipped += 1;
                    tracing::warn!(
                        epoch,
                        step = k,
                        loss = value,
                        "skipped a step with a non-finite loss or gradient"
                    );
                    if self.consecutive_bad >= self.cfg.optim.max_bad_steps {
                        return Err(TrainError::Diverged {
                            count: self.consecutive_bad,
                            epoch,
                            run: self.run.root.clone(),
                        });
                    }
                }
            }
            observer.step(k, mean_or_nan(sum, count));
            if observer.interrupted() {
                return Err(TrainError::Interrupted {
                    epoch,
                    run: self.run.root.clone(),
                });
            }
        }
        if let Some(aux) = &self.aux {
            tracing::info!(
                epoch,
                file = %aux.path().display(),
                mse = mean_or_nan(self.aux_loss_sum, count),
                "auxiliary targets' mean squared z-error (training stars)"
            );
        }
        Ok((mean_or_nan(sum, count), skipped))
    }

    /// One optimiser step on a batch; returns its mean NLL and whether the step was applied (not
    /// when the loss or the gradient was not finite). With auxiliary targets the loss minimised is
    /// the mean NLL plus `optim.aux_weight` times their masked mean squared z-error.
    fn step(&mut self, epoch: usize, lr: f64, b: &Batch) -> Result<(f64, bool)> {
        self.pause_if(self.opts.pause_at == Some(PauseAt::Step(self.attempts)));
        let offdiagonal = epoch >= self.cfg.optim.offdiagonal_warmup_epochs;
        let (params, aux_pred) = self.model.outputs(&b.x, true)?;
        let nll = self.model.nll_of(params, &b.y, offdiagonal)?;
        let mut loss = nll.mean_all()?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut aux_value = 0.0;
        if let (Some(aux), Some(pred)) = (&self.aux, aux_pred) {
            let (target, mask) = aux.batch(&b.indices)?;
            let mse = masked_mse(&pred, &target, &mask)?;
            aux_value = mse.to_scalar::<f64>()?;
            loss = (loss + (mse * self.cfg.optim.aux_weight)?)?;
        }
        if self.opts.inject_nan_steps.contains(&self.attempts) {
            loss = (loss * f64::NAN)?;
        }
        self.attempts += 1;
        let total = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let applied = total.is_finite() && self.adam.step(&loss.backward()?, lr)?.applied;
        if applied {
            self.consecutive_bad = 0;
            self.aux_loss_sum += aux_value * b.indices.len() as f64;
        } else {
            self.consecutive_bad += 1;
        }
        Ok((if total.is_finite() { value } else { total }, applied))
    }

    /// The validation NLL in eval mode.
    fn validate(&self, epoch: usize) -> Result<f64> {
        let bs = self.cfg.optim.batch_size.max(64);
        let batcher = self.batcher();
        mean_nll_with(&self.model, &batcher, &self.data.split.val, bs, &|k| {
            self.pause_if(k == 0 && self.opts.pause_at == Some(PauseAt::Validation(epoch + 1)));
        })
    }

    /// Commits the epoch: epoch-named weights and moments first, the best weights if improved,
    /// then `metrics.csv` and `state.json` as the commit point, and only then the previous epoch's
    /// files are removed. A failed write leaves the previous commit in force; the error says so.
    fn commit(&mut self, epoch: usize, record: &EpochRecord) -> Result<()> {
        let last_good = match self.state.epochs_done {
            0 => "none yet".to_string(),
            n => format!("epoch {n}"),
        };
        let old =
            self.write_checkpoint(epoch, record)
                .map_err(|e| TrainError::CheckpointWrite {
                    epoch: epoch + 1,
                    last_good,
                    run: self.run.root.clone(),
                    source: Box::new(e),
                })?;
        self.pause_if(self.opts.pause_at == Some(PauseAt::Commit(epoch + 1)));
        for f in old.into_iter().flatten() {
            let _ = std::fs::remove_file(self.run.root.join(f));
        }
        Ok(())
    }

    /// The writes of [`Trainer::commit`]; returns the previous epoch's checkpoint files.
    fn write_checkpoint(
        &mut self,
        epoch: usize,
        record: &EpochRecord,
    ) -> Result<[Option<String>; 2]> {
        let pause_at = self.opts.pause_at.as_ref();
        let run_root = self.run.root.clone();
        let hook = |path: &Path| {
            if matches!(pause_at, Some(PauseAt::Checkpoint { epoch: e, file })
                if *e == epoch + 1 && path.file_name() == Some(std::ffi::OsStr::new(file)))
            {
                pause(pause_at.expect("matched"), &run_root);
            }
        };
        let tag = format!("{:04}", epoch + 1);
        let model_file = format!("checkpoint/model-e{tag}.safetensors");
        let optim_file = format!("checkpoint/optimizer-e{tag}.safetensors");
        let epoch_weights = weights(&self.model);
        save_tensors_with(&self.run.root.join(&model_file), &epoch_weights, &hook)?;
        save_tensors_with(
            &self.run.root.join(&optim_file),
            &self.adam.state_tensors(),
            &hook,
        )?;
        let state = &mut self.state;
        let val_nll = record.val_nll;
        if val_nll.is_finite() && val_nll < state.best_val_nll {
            state.best_val_nll = val_nll;
            state.best_epoch = epoch + 1;
            state.epochs_since_best = 0;
            save_tensors_with(&self.run.best_model(), &epoch_weights, &hook)?;
        } else {
            state.epochs_since_best += 1;
        }
        let old = [state.model_file.take(), state.optimizer_file.take()];
        state.model_file = Some(model_file);
        state.optimizer_file = Some(optim_file);
        state.epochs_done = epoch + 1;
        state.adam_steps = self.adam.steps();
        state.history.push(record.clone());
        let optim = &self.cfg.optim;
        let patience_hit = optim.patience > 0 && state.epochs_since_best >= optim.patience;
        let last = epoch + 1 == optim.epochs;
        if patience_hit || last {
            state.finished = true;
            state.stop_reason = Some(if patience_hit && !last {
                format!(
                    "early stop: no better validation NLL for {} epochs",
                    optim.patience
                )
            } else {
                format!("completed {} epochs", optim.epochs)
            });
        }
        write_text_with(&self.run.metrics(), &state.metrics_csv(), &hook)?;
        state.save_with(&self.run, &hook)?;
        Ok(old)
    }
}

/// The state of a new run before its first epoch.
fn fresh_state(cfg: &TrainConfig, data: &Prepared) -> RunState {
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
        n_pix: data.dataset.n_pix(),
        n_train: data.split.train.len(),
        n_val: data.split.val.len(),
        n_test: data.split.test.len(),
        rng_scheme: format!("chacha8(seed={}, stream=epoch)", cfg.run.seed),
        model_file: None,
        optimizer_file: None,
        config: cfg.clone(),
        data_fingerprint: None,
    }
}

fn mean_or_nan(sum: f64, count: usize) -> f64 {
    if count > 0 {
        sum / count as f64
    } else {
        f64::NAN
    }
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
    verify_tensors(&run.best_model())?;
    set_threads(state.config.run.threads);
    // A run trained on a GPU still predicts where there is none: its weights load on the CPU.
    let dev = device(state.config.run.device.name()).unwrap_or_else(|e| {
        tracing::warn!("{e}; loading {} on the CPU", run_dir.display());
        Device::Cpu
    });
    let model = StarModel::load(
        &state.config,
        state.n_pix,
        state.scaler.mean.len(),
        &run.best_model(),
        &dev,
    )?;
    Ok((state, model))
}

/// Training-time noise augmentation (`data.augment_noise`): white noise that multiplies a
/// spectrum's own noise level by a factor drawn uniformly from `[1, 1 + factor]`.
///
/// Each draw comes from its own ChaCha8 stream keyed by `(seed, epoch, star)`, so an epoch's
/// batches are the same bytes for any thread count and after a resume.
struct NoiseAugment {
    factor: f64,
    seed: u64,
    epoch: u64,
}

impl NoiseAugment {
    fn apply(&self, star: usize, flux: &mut [f32]) {
        use rand::{Rng, SeedableRng};
        use rand_distr::{Distribution, StandardNormal};
        let Some(sigma) = starflow_data::noise_level(flux) else {
            return;
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed ^ self.epoch.wrapping_mul(0xd1b5_4a32_d192_ed03),
        );
        rng.set_stream(star as u64);
        let m = 1.0 + self.factor * rng.random::<f64>();
        let extra = sigma * (m * m - 1.0).sqrt();
        for v in flux.iter_mut() {
            let e: f64 = StandardNormal.sample(&mut rng);
            *v = (f64::from(*v) + extra * e) as f32;
        }
    }
}

#[cfg(test)]
mod augment {
    use super::NoiseAugment;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    /// A continuum near 1 with white noise of `sigma`.
    fn spectrum(sigma: f64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        (0..4096)
            .map(|i| {
                let e: f64 = StandardNormal.sample(&mut rng);
                (1.0 - 0.3 * ((i % 97) as f64 / 97.0).powi(8) + sigma * e) as f32
            })
            .collect()
    }

    #[test]
    fn noise_grows_by_a_factor_within_the_range_and_each_draw_is_reproducible() {
        let aug = |epoch| NoiseAugment {
            factor: 1.0,
            seed: 42,
            epoch,
        };
        let clean = spectrum(0.01);
        let before = starflow_data::noise_level(&clean).unwrap();
        let mut factors = Vec::new();
        for star in 0..20 {
            let mut a = clean.clone();
            aug(3).apply(star, &mut a);
            let mut b = clean.clone();
            aug(3).apply(star, &mut b);
            assert_eq!(a, b, "same seed, epoch and star: same bytes");
            let mut c = clean.clone();
            aug(4).apply(star, &mut c);
            assert_ne!(a, c, "another epoch draws other noise");
            factors.push(starflow_data::noise_level(&a).unwrap() / before);
        }
        // Factors are uniform in [1, 2]; the estimate scatters by ~2 % on 4,096 pixels.
        assert!(
            factors.iter().all(|f| (0.95..2.1).contains(f)),
            "{factors:?}"
        );
        let spread = factors.iter().cloned().fold(f64::NAN, f64::max)
            - factors.iter().cloned().fold(f64::NAN, f64::min);
        assert!(spread > 0.5, "{factors:?}");
    }
}
