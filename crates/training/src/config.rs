//! The training configuration: every hyper-parameter in one TOML file, plus CLI overrides.
//!
//! Unknown keys are errors that name the closest valid key, because a misspelt `learning_rate`
//! silently falling back to a default is the most expensive kind of typo in machine learning.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Where the data comes from: files, or the synthetic generator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Directory with `spectra.npy` and `labels.npy` (and, for synthetic data, `crlb.npy`). When it
    /// does not exist and `synthetic` is true, the generator writes it first.
    pub dir: PathBuf,
    /// Generate the data set into `dir` when it is missing.
    pub synthetic: bool,
    /// Stars to generate (synthetic only).
    pub synthetic_n: usize,
    /// Generator seed (synthetic only).
    pub synthetic_seed: u64,
    /// Pixels per camera (synthetic only; 4096 like GALAH, smaller for quick runs).
    pub synthetic_pixels_per_camera: usize,
    /// Synthetic stars drawn with `calibration_seed` to fit the recalibration maps on, instead of
    /// the validation split (synthetic only; 0: the validation split). The maps' own sampling
    /// noise is shared by every figure measured after them, and synthetic stars are free: one
    /// forward pass each, no training. Written next to `dir` as `<dir>-calibration-<seed>`.
    pub calibration_n: usize,
    /// Generator seed of the calibration set; never the training set's.
    pub calibration_seed: u64,
    /// One name per label column.
    pub label_names: Vec<String>,
    /// The predicted columns.
    pub targets: Vec<String>,
    /// Flux floor of `ln(max(flux, floor))`.
    pub flux_floor: f32,
    /// Training-time noise augmentation: every epoch, each training spectrum gets fresh white
    /// noise that multiplies its own noise level (measured from it, DER_SNR) by a factor drawn
    /// uniformly from `[1, 1 + augment_noise]`, so each star is seen at several signal-to-noise
    /// ratios and its own noise realisation cannot be memorised. 0: off. Validation, calibration
    /// and prediction always see the spectra as they are.
    pub augment_noise: f64,
    /// Drop rows with non-finite values instead of failing.
    pub drop_nonfinite: bool,
    /// Split fractions and seed.
    pub train_fraction: f64,
    pub val_fraction: f64,
    pub test_fraction: f64,
    pub split_seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        let opts = starflow_data::LoadOptions::default();
        DataConfig {
            dir: PathBuf::from("data/synth"),
            synthetic: true,
            synthetic_n: 8914,
            synthetic_seed: 42,
            synthetic_pixels_per_camera: 4096,
            calibration_n: 0,
            calibration_seed: 4242,
            label_names: opts.label_names,
            targets: opts.targets,
            flux_floor: 0.2,
            augment_noise: 0.0,
            drop_nonfinite: false,
            train_fraction: 0.70,
            val_fraction: 0.15,
            test_fraction: 0.15,
            split_seed: 42,
        }
    }
}

/// The network: backbone and flow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `cnn` (the reference CNNModel) or `tiny_cnn`.
    pub backbone: String,
    /// `diagonal_gaussian`, `full_gaussian` or `full_flow`.
    pub flow: String,
    /// Gaussianization layers of `full_flow` (reference 3).
    pub flow_layers: usize,
    /// Kernels per dimension of each Gaussianization layer (reference 10).
    pub flow_kernels: usize,
    /// How the off-diagonal outputs of a full-covariance layer (full_gaussian, full_flow) enter
    /// its factor `L`: `absolute` (jammy_flows, the reference) or `relative` (`L_ij = sigma_i
    /// m_ij`, which trains where the absolute form stalls; see `starflow_flows::OffDiagonal`).
    pub offdiagonal: String,
    /// Base dropout probability.
    pub dropout: f64,
    /// `fast` (fused CPU kernels) or `stock` (candle's ops; CPU speed comparisons only, its conv1d
    /// backward is wrong in candle 0.11.1).
    pub compute_path: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            backbone: "cnn".into(),
            flow: "diagonal_gaussian".into(),
            flow_layers: 3,
            flow_kernels: 10,
            offdiagonal: "absolute".into(),
            dropout: 0.1,
            compute_path: "fast".into(),
        }
    }
}

/// The optimiser and schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub batch_size: usize,
    pub epochs: usize,
    /// Peak learning rate of Adam.
    pub lr: f64,
    /// `constant` or `cosine` (cosine decay to `lr * min_lr_factor` over the epochs, after warm-up).
    pub schedule: String,
    pub warmup_epochs: usize,
    pub min_lr_factor: f64,
    /// Decoupled weight decay (AdamW); never applied to BatchNorm statistics.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this value (0 = off).
    pub grad_clip: f64,
    /// Stop after this many epochs without a better validation NLL (0 = never).
    pub patience: usize,
    /// Hold the off-diagonal (correlation) outputs of a full-covariance layer at zero for this
    /// many epochs: their head rows start at zero and get no gradient, so the network first
    /// learns means and scales exactly as the diagonal flow does, then the correlations. Without
    /// it CNNModel + full_gaussian fits the population's label correlations first and stalls
    /// near the prior (issue 11).
    pub offdiagonal_warmup_epochs: usize,
    /// Stop with an error after this many consecutive non-finite steps.
    pub max_bad_steps: usize,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            batch_size: 64,
            epochs: 10,
            lr: 0.8e-4,
            schedule: "constant".into(),
            warmup_epochs: 0,
            min_lr_factor: 0.01,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 0.0,
            patience: 0,
            offdiagonal_warmup_epochs: 0,
            max_bad_steps: 20,
        }
    }
}

/// Seed, threads and device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Seed of weight initialisation, batch order and dropout.
    pub seed: u64,
    /// CPU threads (0 = all cores). Results are reproducible for a fixed thread count.
    pub threads: usize,
    /// `cpu`, `cuda` or `metal` (the latter two need the matching cargo feature).
    pub device: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            seed: 42,
            threads: 0,
            device: "cpu".into(),
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub model: ModelConfig,
    pub optim: OptimConfig,
    pub run: RunConfig,
}

/// Every valid key, per section, for "did you mean" suggestions.
const KEYS: &[(&str, &[&str])] = &[
    (
        "data",
        &[
            "dir",
            "synthetic",
            "synthetic_n",
            "synthetic_seed",
            "synthetic_pixels_per_camera",
            "calibration_n",
            "calibration_seed",
            "label_names",
            "targets",
            "flux_floor",
            "augment_noise",
            "drop_nonfinite",
            "train_fraction",
            "val_fraction",
            "test_fraction",
            "split_seed",
        ],
    ),
    (
        "model",
        &[
            "backbone",
            "flow",
            "flow_layers",
            "flow_kernels",
            "offdiagonal",
            "dropout",
            "compute_path",
        ],
    ),
    (
        "optim",
        &[
            "batch_size",
            "epochs",
            "lr",
            "schedule",
            "warmup_epochs",
            "min_lr_factor",
            "weight_decay",
            "beta1",
            "beta2",
            "eps",
            "grad_clip",
            "patience",
            "offdiagonal_warmup_epochs",
            "max_bad_steps",
        ],
    ),
    ("run", &["seed", "threads", "device"]),
];

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest valid spelling of `key` among `candidates`.
fn closest<'a>(key: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (edit_distance(key, c), c))
        .min_by_key(|(d, _)| *d)
        .filter(|(d, c)| *d <= (c.len() / 2).max(2))
        .map(|(_, c)| c)
}

/// Checks every key of a parsed TOML document against [`KEYS`].
fn check_keys(doc: &toml::Table, file: &Path) -> Result<()> {
    for (section, value) in doc {
        let Some((_, keys)) = KEYS.iter().find(|(s, _)| s == section) else {
            let hint = closest(section, KEYS.iter().map(|(s, _)| *s))
                .map(|s| format!("did you mean [{s}]?"))
                .unwrap_or_else(|| "valid sections are [data], [model], [optim], [run]".into());
            return Err(TrainError::config(
                file,
                format!("unknown section or key `{section}`; {hint}"),
            ));
        };
        let Some(table) = value.as_table() else {
            return Err(TrainError::config(
                file,
                format!("`{section}` must be a table ([{section}])"),
            ));
        };
        for key in table.keys() {
            if !keys.contains(&key.as_str()) {
                // A key may also sit in the wrong section.
                let elsewhere = KEYS
                    .iter()
                    .find(|(_, ks)| ks.contains(&key.as_str()))
                    .map(|(s, _)| format!("`{key}` belongs in [{s}]"));
                let hint = elsewhere
                    .or_else(|| {
                        closest(key, keys.iter().copied()).map(|k| format!("did you mean `{k}`?"))
                    })
                    .unwrap_or_else(|| format!("valid keys: {}", keys.join(", ")));
                return Err(TrainError::config(
                    file,
                    format!("unknown key `{key}` in [{section}]; {hint}"),
                ));
            }
        }
    }
    Ok(())
}

/// Where the values of a configuration came from: the `--set` overrides by key, the rest from the
/// file (or the defaults). Every error about a value says which.
#[derive(Debug, Default)]
struct Sources {
    /// `(section.key, the override as given)`.
    overrides: Vec<(String, String)>,
}

impl Sources {
    fn describe(&self, key: &str, origin: &Path) -> String {
        match self.overrides.iter().rev().find(|(k, _)| k == key) {
            Some((_, given)) => format!("from the command line: {given}"),
            None => format!("from {}", origin.display()),
        }
    }
}

/// What each key accepts, stated in every error about it.
fn rule(key: &str) -> String {
    let s = match key {
        "data.dir" => "a directory path",
        "data.synthetic" | "data.drop_nonfinite" => "true or false",
        "data.synthetic_n" => "an integer >= 1",
        "data.synthetic_seed" | "data.split_seed" | "run.seed" => "an integer >= 0",
        "data.synthetic_pixels_per_camera" => "an integer >= 16",
        "data.calibration_n" => {
            "an integer >= 0 (0: fit the recalibration on the validation split)"
        }
        "data.calibration_seed" => "an integer >= 0, not data.synthetic_seed",
        "data.label_names" => "a list of names, one per column of the labels file",
        "data.targets" => "a list of names from data.label_names",
        "data.flux_floor" => "a positive number",
        "data.augment_noise" => "a number in [0, 10] (0 = off)",
        "data.train_fraction" => "a number in (0, 1], with train + val + test = 1",
        "data.val_fraction" => "a number in (0, 1], with train + val + test = 1",
        "data.test_fraction" => "a number in [0, 1], with train + val + test = 1",
        "model.backbone" => {
            return format!("one of {}", starflow_models::BACKBONE_NAMES.join(", "))
        }
        "model.flow" => return format!("one of {}", starflow_flows::FLOW_NAMES.join(", ")),
        "model.flow_layers" | "model.flow_kernels" => "an integer >= 1",
        "model.offdiagonal" => "`absolute` or `relative`",
        "model.dropout" => "a number in [0, 0.5)",
        "model.compute_path" => "`fast` or `stock`",
        "optim.batch_size" | "optim.epochs" | "optim.max_bad_steps" => "an integer >= 1",
        "optim.lr" => "a positive number, at most 1",
        "optim.eps" => "a positive number",
        "optim.schedule" => "`constant` or `cosine`",
        "optim.warmup_epochs" | "optim.patience" | "optim.offdiagonal_warmup_epochs" => {
            "an integer >= 0"
        }
        "optim.min_lr_factor" => "a number in (0, 1]",
        "optim.weight_decay" | "optim.grad_clip" => "a number >= 0 (0 = off)",
        "optim.beta1" | "optim.beta2" => "a number in [0, 1)",
        "run.threads" => "an integer >= 0 (0 = all cores)",
        "run.device" => "cpu, cuda or metal",
        _ => "see configs/reference.toml",
    };
    match upper_limit(key) {
        Some(max) => format!("{s}, at most {max}"),
        None => s.to_string(),
    }
}

/// A value that breaks its rule: the key, the value as TOML shows it, and what is wrong beyond the
/// rule itself (if anything).
struct Invalid {
    key: &'static str,
    value: String,
    note: Option<String>,
}

fn invalid(key: &'static str, value: impl std::fmt::Display) -> Option<Invalid> {
    Some(Invalid {
        key,
        value: value.to_string(),
        note: None,
    })
}

/// The error for a value that breaks its rule: the key, the value, where it came from and what the
/// key accepts.
fn value_error(origin: &Path, sources: &Sources, bad: Invalid) -> TrainError {
    let from = sources.describe(bad.key, origin);
    let note = bad.note.map(|n| format!("{n}; ")).unwrap_or_default();
    TrainError::config(
        origin,
        format!(
            "{} = {} ({from}): {note}must be {}",
            bad.key,
            bad.value,
            rule(bad.key)
        ),
    )
}

impl TrainConfig {
    /// A configuration that trains in about a second, for tests and examples: 160 synthetic stars of
    /// 4 x 64 pixels (generated into `data` on first use), `epochs` epochs of batch 32 at lr 1e-3,
    /// seed 5, two threads.
    pub fn tiny(data: &Path, flow: &str, backbone: &str, epochs: usize) -> Self {
        let mut cfg = TrainConfig::default();
        cfg.data.dir = data.to_path_buf();
        cfg.data.synthetic_n = 160;
        cfg.data.synthetic_pixels_per_camera = 64;
        cfg.model.flow = flow.into();
        cfg.model.backbone = backbone.into();
        cfg.optim.epochs = epochs;
        cfg.optim.batch_size = 32;
        cfg.optim.lr = 1e-3;
        cfg.run.seed = 5;
        cfg.run.threads = 2;
        cfg
    }

    /// Reads a TOML file; missing keys take their defaults, unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let problem = format!("cannot read the config file: {e}");
            let fix = "check the path (see configs/)".to_string();
            match e.kind() {
                std::io::ErrorKind::NotFound => TrainError::Missing {
                    path: path.to_path_buf(),
                    problem,
                    fix,
                },
                _ => TrainError::config(path, format!("{problem}; {fix}")),
            }
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses TOML text (`origin` names it in errors).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            TrainError::config(origin, format!("invalid TOML: {}", located(text, &e)))
        })?;
        Self::from_doc(doc, origin, &Sources::default())
    }

    /// Checks keys, types and ranges of a parsed document.
    fn from_doc(doc: toml::Table, origin: &Path, sources: &Sources) -> Result<Self> {
        check_keys(&doc, origin)?;
        if let Some(e) = first_type_error(&doc, origin, sources) {
            return Err(e);
        }
        let cfg: TrainConfig = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::config(origin, e.message().to_string()))?;
        if let Some(bad) = cfg.first_invalid() {
            return Err(value_error(origin, sources, bad));
        }
        Ok(cfg)
    }

    /// The TOML form of this configuration (stored in every run).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks ranges and names; the error names the key, its value and what it accepts.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        match self.first_invalid() {
            Some(bad) => Err(value_error(origin, &Sources::default(), bad)),
            None => Ok(()),
        }
    }

    /// The first value that breaks its key's rule, in the order of the sections.
    fn first_invalid(&self) -> Option<Invalid> {
        self.invalid_limit()
            .or_else(|| self.invalid_data())
            .or_else(|| self.invalid_model())
            .or_else(|| self.invalid_optim())
            .or_else(|| self.invalid_run())
    }

    /// The first count above its [`UPPER_LIMITS`] entry.
    fn invalid_limit(&self) -> Option<Invalid> {
        let (d, m, o) = (&self.data, &self.model, &self.optim);
        let values = [
            ("data.synthetic_n", d.synthetic_n),
            (
                "data.synthetic_pixels_per_camera",
                d.synthetic_pixels_per_camera,
            ),
            ("data.calibration_n", d.calibration_n),
            ("model.flow_layers", m.flow_layers),
            ("model.flow_kernels", m.flow_kernels),
            ("optim.batch_size", o.batch_size),
            ("optim.epochs", o.epochs),
            ("optim.warmup_epochs", o.warmup_epochs),
            ("optim.patience", o.patience),
            (
                "optim.offdiagonal_warmup_epochs",
                o.offdiagonal_warmup_epochs,
            ),
            ("optim.max_bad_steps", o.max_bad_steps),
            ("run.threads", self.run.threads),
        ];
        let (key, value) = values
            .into_iter()
            .find(|(k, v)| upper_limit(k).is_some_and(|max| *v > max))?;
        let key = UPPER_LIMITS.iter().find(|(k, _)| *k == key)?.0;
        Some(Invalid {
            key,
            value: value.to_string(),
            note: Some("too large".into()),
        })
    }

    fn invalid_data(&self) -> Option<Invalid> {
        let d = &self.data;
        if d.synthetic_n == 0 {
            return invalid("data.synthetic_n", 0);
        }
        if d.synthetic_pixels_per_camera < 16 {
            return invalid(
                "data.synthetic_pixels_per_camera",
                d.synthetic_pixels_per_camera,
            );
        }
        if d.calibration_n > 0 && d.calibration_seed == d.synthetic_seed {
            return Some(Invalid {
                key: "data.calibration_seed",
                value: d.calibration_seed.to_string(),
                note: Some("it equals data.synthetic_seed, so the calibration set would repeat the training stars".into()),
            });
        }
        if !(d.flux_floor.is_finite() && d.flux_floor > 0.0) {
            return invalid("data.flux_floor", d.flux_floor);
        }
        if !(0.0..=10.0).contains(&d.augment_noise) {
            return invalid("data.augment_noise", d.augment_noise);
        }
        for (key, names) in [
            ("data.label_names", &d.label_names),
            ("data.targets", &d.targets),
        ] {
            let dup = names
                .iter()
                .enumerate()
                .find(|(i, n)| names[..*i].contains(n));
            if let Some((_, n)) = dup {
                return Some(Invalid {
                    key,
                    value: format!("{names:?}"),
                    note: Some(format!("'{n}' is named twice")),
                });
            }
        }
        let fractions = [
            ("data.train_fraction", d.train_fraction, true),
            ("data.val_fraction", d.val_fraction, true),
            ("data.test_fraction", d.test_fraction, false),
        ];
        for (key, f, positive) in fractions {
            if !(f.is_finite() && f <= 1.0 && (f > 0.0 || (!positive && f == 0.0))) {
                return invalid(key, f);
            }
        }
        let sum = d.train_fraction + d.val_fraction + d.test_fraction;
        if (sum - 1.0).abs() > 1e-6 {
            return Some(Invalid {
                key: "data.train_fraction",
                value: d.train_fraction.to_string(),
                note: Some(format!(
                    "the fractions sum to {sum:.4} (train {} + val {} + test {})",
                    d.train_fraction, d.val_fraction, d.test_fraction
                )),
            });
        }
        None
    }

    fn invalid_model(&self) -> Option<Invalid> {
        let m = &self.model;
        let quoted = |s: &str| format!("\"{s}\"");
        if !starflow_models::BACKBONE_NAMES.contains(&m.backbone.as_str()) {
            return unknown_name("model.backbone", &m.backbone);
        }
        if !starflow_flows::FLOW_NAMES.contains(&m.flow.as_str()) {
            return unknown_name("model.flow", &m.flow);
        }
        if starflow_flows::OffDiagonal::from_name(&m.offdiagonal).is_none() {
            return invalid("model.offdiagonal", quoted(&m.offdiagonal));
        }
        if !(0.0..0.5).contains(&m.dropout) {
            return invalid("model.dropout", m.dropout);
        }
        if !["fast", "stock"].contains(&m.compute_path.as_str()) {
            return invalid("model.compute_path", quoted(&m.compute_path));
        }
        if m.flow_layers == 0 {
            return invalid("model.flow_layers", 0);
        }
        if m.flow_kernels == 0 {
            return invalid("model.flow_kernels", 0);
        }
        None
    }

    fn invalid_optim(&self) -> Option<Invalid> {
        let o = &self.optim;
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !positive(o.lr) || o.lr > MAX_LR {
            return invalid("optim.lr", o.lr);
        }
        if o.batch_size == 0 {
            return invalid("optim.batch_size", 0);
        }
        if o.epochs == 0 {
            return invalid("optim.epochs", 0);
        }
        if !(0.0..1.0).contains(&o.beta1) {
            return invalid("optim.beta1", o.beta1);
        }
        if !(0.0..1.0).contains(&o.beta2) {
            return invalid("optim.beta2", o.beta2);
        }
        if !positive(o.eps) {
            return invalid("optim.eps", o.eps);
        }
        if !non_negative(o.weight_decay) {
            return invalid("optim.weight_decay", o.weight_decay);
        }
        if !non_negative(o.grad_clip) {
            return invalid("optim.grad_clip", o.grad_clip);
        }
        if !(o.min_lr_factor > 0.0 && o.min_lr_factor <= 1.0) {
            return invalid("optim.min_lr_factor", o.min_lr_factor);
        }
        if !["constant", "cosine"].contains(&o.schedule.as_str()) {
            return invalid("optim.schedule", format!("\"{}\"", o.schedule));
        }
        if o.max_bad_steps == 0 {
            return invalid("optim.max_bad_steps", 0);
        }
        None
    }

    fn invalid_run(&self) -> Option<Invalid> {
        if !["cpu", "cuda", "metal"].contains(&self.run.device.as_str()) {
            return invalid("run.device", format!("\"{}\"", self.run.device));
        }
        None
    }

    /// Applies `key=value` overrides (`optim.lr=1e-3`), with the same checks as the file; an error
    /// about an overridden value quotes the override.
    pub fn apply_overrides(&mut self, overrides: &[String], origin: &Path) -> Result<()> {
        if overrides.is_empty() {
            return Ok(());
        }
        let mut doc: toml::Table = toml::Table::try_from(&*self)
            .map_err(|e| TrainError::config(origin, format!("cannot serialise config: {e}")))?;
        let mut sources = Sources::default();
        for ov in overrides {
            let Some((key, value)) = ov.split_once('=') else {
                return Err(TrainError::config(
                    origin,
                    format!("override `{ov}` must look like section.key=value"),
                ));
            };
            let Some((section, name)) = key.trim().split_once('.') else {
                return Err(TrainError::config(
                    origin,
                    format!("override `{ov}` must name a section, e.g. optim.lr=1e-3"),
                ));
            };
            let parsed: Option<toml::Value> = format!("v = {}", value.trim())
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"));
            // A number TOML cannot hold (1e400) is not a string to complain about the type of.
            if parsed.is_none() && value.trim().parse::<f64>().is_ok_and(|x| !x.is_finite()) {
                return Err(TrainError::config(
                    origin,
                    format!(
                        "{key} = {} (--set {ov}): the number is out of range of a 64-bit float; \
                         must be {}",
                        value.trim(),
                        rule(key.trim())
                    ),
                ));
            }
            let parsed = parsed.unwrap_or_else(|| toml::Value::String(value.trim().to_string()));
            let table = doc
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(table) = table.as_table_mut() else {
                return Err(TrainError::config(
                    origin,
                    format!("`{section}` is not a section"),
                ));
            };
            table.insert(name.to_string(), parsed);
            sources
                .overrides
                .push((format!("{section}.{name}"), ov.clone()));
        }
        *self = Self::from_doc(doc, origin, &sources)?;
        Ok(())
    }
}

/// A TOML error with its line and the line's text (the parser's own message names neither for,
/// e.g., a key given twice).
fn located(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end_matches('\n');
    let Some(span) = e.span() else {
        return message.to_string();
    };
    let at = span.start.min(text.len());
    let line = text[..at].matches('\n').count() + 1;
    let content = text.lines().nth(line - 1).unwrap_or("").trim();
    format!("line {line} (`{content}`): {message}")
}

/// The largest value each count setting accepts: far beyond any real use, and small enough that
/// a typo (a missing decimal point, 2^64 - 1) is refused before it allocates terabytes, spawns
/// millions of threads or runs for a geological age.
const UPPER_LIMITS: [(&str, usize); 12] = [
    ("data.synthetic_n", 2_000_000),
    ("data.synthetic_pixels_per_camera", 65_536),
    ("data.calibration_n", 1_000_000),
    ("model.flow_layers", 64),
    ("model.flow_kernels", 1_000),
    ("optim.batch_size", 65_536),
    ("optim.epochs", 100_000),
    ("optim.warmup_epochs", 100_000),
    ("optim.patience", 100_000),
    ("optim.offdiagonal_warmup_epochs", 100_000),
    ("optim.max_bad_steps", 1_000_000),
    ("run.threads", 1_024),
];

/// The upper limit of `key` ([`UPPER_LIMITS`]).
fn upper_limit(key: &str) -> Option<usize> {
    UPPER_LIMITS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
}

/// The largest learning rate accepted: Adam's steps are about `lr` per weight, so anything near 1
/// destroys the network in one step.
const MAX_LR: f64 = 1.0;

/// An unknown backbone or flow name: says so before the rule lists the valid ones.
fn unknown_name(key: &'static str, name: &str) -> Option<Invalid> {
    Some(Invalid {
        key,
        value: format!("\"{name}\""),
        note: Some(format!("{key} `{name}` is unknown")),
    })
}

/// The first key whose value has the wrong type or cannot be represented (`-3` for a count), found
/// by deserialising each key alone over the defaults, so that the error can name it.
fn first_type_error(doc: &toml::Table, origin: &Path, sources: &Sources) -> Option<TrainError> {
    for (section, table) in doc {
        let Some(table) = table.as_table() else {
            continue;
        };
        for (name, value) in table {
            let mut one = toml::Table::new();
            let mut inner = toml::Table::new();
            inner.insert(name.clone(), value.clone());
            one.insert(section.clone(), toml::Value::Table(inner));
            if let Err(e) = toml::Value::Table(one).try_into::<TrainConfig>() {
                let key = format!("{section}.{name}");
                let from = sources.describe(&key, origin);
                return Some(TrainError::config(
                    origin,
                    format!(
                        "{key} = {value} ({from}): {}; must be {}",
                        plain_types(e.message()),
                        rule(&key)
                    ),
                ));
            }
        }
    }
    None
}

/// The deserializer's message with Rust's type names in words (`expected usize` says nothing to a
/// user who wrote a TOML file or a Python keyword).
fn plain_types(message: &str) -> String {
    const WORDS: &[(&str, &str)] = &[
        ("usize", "a whole number >= 0"),
        ("u64", "a whole number >= 0"),
        ("u32", "a whole number >= 0"),
        ("i64", "a whole number"),
        ("f64", "a number"),
        ("f32", "a number"),
    ];
    let mut out = message.to_string();
    for (rust, words) in WORDS {
        out = out.replace(&format!("expected {rust}"), &format!("expected {words}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_name_no_rust_types() {
        for (key, value) in [
            ("optim.epochs", "-1"),
            ("data.split_seed", "-1"),
            ("optim.lr", "true"),
            ("data.flux_floor", "\"x\""),
        ] {
            let err = TrainConfig::default()
                .apply_overrides(&[format!("{key}={value}")], Path::new("x.toml"))
                .expect_err(key)
                .to_string();
            for rust in ["usize", "u64", "u32", "i64", "f64", "f32"] {
                assert!(!err.contains(rust), "{key}={value}: {err}");
            }
            assert!(err.contains("expected a"), "{key}={value}: {err}");
        }
    }

    #[test]
    fn suggestions() {
        assert_eq!(closest("lrr", ["lr", "epochs"].into_iter()), Some("lr"));
        assert_eq!(
            closest("batchsize", ["batch_size", "lr"].into_iter()),
            Some("batch_size")
        );
        assert_eq!(closest("zzzzzzzz", ["lr"].into_iter()), None);
    }

    #[test]
    fn every_key_states_what_it_accepts() {
        for (section, keys) in KEYS {
            for k in *keys {
                let key = format!("{section}.{k}");
                assert_ne!(
                    rule(&key),
                    "see configs/reference.toml",
                    "{key} has no rule"
                );
            }
        }
    }

    /// A calibration set drawn with the training seed would repeat the training stars.
    #[test]
    fn calibration_seed_must_differ_from_the_training_seed() {
        let mut cfg = TrainConfig::default();
        cfg.data.calibration_seed = cfg.data.synthetic_seed;
        assert!(
            cfg.validate(Path::new("x.toml")).is_ok(),
            "unused when calibration_n = 0"
        );
        cfg.data.calibration_n = 1000;
        let err = cfg.validate(Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("data.calibration_seed"), "{err}");
        assert!(err.contains("repeat the training stars"), "{err}");
        cfg.data.calibration_seed += 1;
        assert!(cfg.validate(Path::new("x.toml")).is_ok());
    }

    #[test]
    fn every_field_is_listed() {
        let doc = toml::Table::try_from(TrainConfig::default()).unwrap();
        for (section, v) in &doc {
            let (_, keys) = KEYS.iter().find(|(s, _)| s == section).unwrap();
            let t = v.as_table().unwrap();
            assert_eq!(t.len(), keys.len(), "[{section}] keys out of sync");
            for k in t.keys() {
                assert!(keys.contains(&k.as_str()), "{section}.{k}");
            }
        }
    }

    /// Counts that would allocate terabytes, spawn a million threads or loop for ever are refused
    /// with the key, the value and the limit.
    #[test]
    fn every_count_has_an_upper_limit() {
        let base = TrainConfig::default();
        for (key, max) in UPPER_LIMITS {
            let set = |v: usize| {
                let mut cfg = base.clone();
                cfg.apply_overrides(&[format!("{key}={v}")], Path::new("x.toml"))
                    .map(|_| cfg)
            };
            let err = set(max + 1).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("too large"), "{err}");
            assert!(err.contains(&format!("at most {max}")), "{err}");
            let huge = set(usize::MAX);
            assert!(huge.is_err(), "{key} = usize::MAX accepted");
        }
        let mut cfg = base.clone();
        cfg.apply_overrides(&["run.threads=1024".into()], Path::new("x.toml"))
            .unwrap();
    }

    #[test]
    fn a_number_out_of_float_range_is_named_as_such() {
        let mut cfg = TrainConfig::default();
        let err = cfg
            .apply_overrides(&["optim.lr=1e400".into()], Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("optim.lr = 1e400") && err.contains("out of range"),
            "{err}"
        );
        assert!(!err.contains("invalid type"), "{err}");
        let err = cfg
            .apply_overrides(&["optim.lr=3".into()], Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 1"), "{err}");
    }

    #[test]
    fn a_duplicate_key_names_the_key_and_the_line() {
        let text = "[optim]\nlr = 1e-3\nepochs = 4\nlr = 2e-3\n";
        let err = TrainConfig::from_toml(text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4") && err.contains("lr = 2e-3"), "{err}");
        assert!(err.contains("lr"), "{err}");
    }
}
