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
    /// Auxiliary training targets: a `.npy` file in `dir` with one row per star of the labels
    /// file and `model.aux_outputs` columns (for GALAH, its per-element abundances, blank = NaN =
    /// missing; for a synthetic set, the drawn offsets the `nuisances` example prints).
    /// The network predicts them beside the labels during training only
    /// (`crate::aux_targets`). Empty: none.
    pub aux_file: String,
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
            aux_file: String::new(),
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
    #[serde(with = "named")]
    pub offdiagonal: starflow_flows::OffDiagonal,
    /// Base dropout probability.
    pub dropout: f64,
    /// Extra outputs of the backbone's head for the auxiliary targets (`data.aux_file`'s
    /// columns); part of the checkpoint's shape, so kept for inference, which ignores them.
    pub aux_outputs: usize,
    /// `fast` (fused CPU kernels) or `stock` (candle's ops; CPU speed comparisons only, its conv1d
    /// backward is wrong in candle 0.11.1).
    #[serde(with = "named")]
    pub compute_path: starflow_models::ComputePath,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            backbone: "cnn".into(),
            flow: "diagonal_gaussian".into(),
            flow_layers: 3,
            flow_kernels: 10,
            offdiagonal: starflow_flows::OffDiagonal::Absolute,
            dropout: 0.1,
            aux_outputs: 0,
            compute_path: starflow_models::ComputePath::Fast,
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
    #[serde(with = "named")]
    pub schedule: Schedule,
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
    /// Weight of the auxiliary targets' mean squared z-error in the training loss (0 with
    /// `data.aux_file` set: predicted but not trained).
    pub aux_weight: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            batch_size: 64,
            epochs: 10,
            lr: 0.8e-4,
            schedule: Schedule::Constant,
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
            aux_weight: 1.0,
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
    #[serde(with = "named")]
    pub device: DeviceKind,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            seed: 42,
            threads: 0,
            device: DeviceKind::Cpu,
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

/// Every setting, declared once: its `section.key`, what it accepts (stated in every error about
/// it) and how its value is checked beyond its type. Its type and default are the field's in the
/// section's struct, which `every_field_is_a_setting` keeps in step with this table. The
/// did-you-mean of unknown keys, the error messages and [`TrainConfig::validate`] all read it.
const SETTINGS: &[Setting] = &[
    Setting::new("data.dir", Accepts::Text("a directory path"), Check::Type),
    Setting::new(
        "data.synthetic",
        Accepts::Text("true or false"),
        Check::Type,
    ),
    Setting::count("data.synthetic_n", |c| c.data.synthetic_n, 1, 2_000_000),
    Setting::seed("data.synthetic_seed"),
    Setting::count(
        "data.synthetic_pixels_per_camera",
        |c| c.data.synthetic_pixels_per_camera,
        16,
        65_536,
    ),
    Setting::new(
        "data.calibration_n",
        Accepts::Text("an integer >= 0 (0: fit the recalibration on the validation split)"),
        Check::Count {
            get: |c| c.data.calibration_n,
            min: 0,
            max: 1_000_000,
        },
    ),
    Setting::new(
        "data.calibration_seed",
        Accepts::Text("an integer >= 0, not data.synthetic_seed"),
        Check::Custom(calibration_seed_repeats_training),
    ),
    Setting::new(
        "data.label_names",
        Accepts::Text("a list of names, one per column of the labels file"),
        Check::Custom(|c| named_twice("data.label_names", &c.data.label_names)),
    ),
    Setting::new(
        "data.targets",
        Accepts::Text("a list of names from data.label_names"),
        Check::Custom(|c| named_twice("data.targets", &c.data.targets)),
    ),
    Setting::new(
        "data.flux_floor",
        Accepts::Text("a positive number"),
        Check::Custom(|c| {
            let f = c.data.flux_floor;
            (!(f.is_finite() && f > 0.0)).then(|| Invalid::new("data.flux_floor", f))
        }),
    ),
    Setting::number(
        "data.augment_noise",
        "a number in [0, 10] (0 = off)",
        |c| c.data.augment_noise,
        |x| (0.0..=10.0).contains(&x),
    ),
    Setting::new(
        "data.drop_nonfinite",
        Accepts::Text("true or false"),
        Check::Type,
    ),
    Setting::new(
        "data.aux_file",
        Accepts::Text("a file name in data.dir, with model.aux_outputs > 0; empty for none"),
        Check::Custom(|c| {
            let (file, k) = (&c.data.aux_file, c.model.aux_outputs);
            (!file.is_empty() && k == 0).then(|| Invalid::new("data.aux_file", file))
        }),
    ),
    Setting::number(
        "data.train_fraction",
        "a number in (0, 1], with train + val + test = 1",
        |c| c.data.train_fraction,
        |f| f.is_finite() && f > 0.0 && f <= 1.0,
    ),
    Setting::number(
        "data.val_fraction",
        "a number in (0, 1], with train + val + test = 1",
        |c| c.data.val_fraction,
        |f| f.is_finite() && f > 0.0 && f <= 1.0,
    ),
    Setting::new(
        "data.test_fraction",
        Accepts::Text("a number in [0, 1], with train + val + test = 1"),
        Check::Custom(test_fraction_or_sum),
    ),
    Setting::seed("data.split_seed"),
    Setting::new(
        "model.backbone",
        Accepts::OneOf(|| starflow_models::BACKBONE_NAMES),
        Check::Custom(|c| {
            let name = &c.model.backbone;
            (!starflow_models::BACKBONE_NAMES.contains(&name.as_str()))
                .then(|| unknown_name("model.backbone", name))
        }),
    ),
    Setting::new(
        "model.flow",
        Accepts::OneOf(|| &starflow_flows::FLOW_NAMES),
        Check::Custom(|c| {
            let name = &c.model.flow;
            (!starflow_flows::FLOW_NAMES.contains(&name.as_str()))
                .then(|| unknown_name("model.flow", name))
        }),
    ),
    Setting::count("model.flow_layers", |c| c.model.flow_layers, 1, 64),
    Setting::count("model.flow_kernels", |c| c.model.flow_kernels, 1, 1_000),
    Setting::named::<starflow_flows::OffDiagonal>("model.offdiagonal"),
    Setting::number(
        "model.dropout",
        "a number in [0, 0.5)",
        |c| c.model.dropout,
        |x| (0.0..0.5).contains(&x),
    ),
    Setting::count("model.aux_outputs", |c| c.model.aux_outputs, 0, 4_096),
    Setting::named::<starflow_models::ComputePath>("model.compute_path"),
    Setting::count("optim.batch_size", |c| c.optim.batch_size, 1, 65_536),
    Setting::count("optim.epochs", |c| c.optim.epochs, 1, 100_000),
    Setting::number(
        "optim.lr",
        "a positive number, at most 1",
        |c| c.optim.lr,
        |x| x.is_finite() && x > 0.0 && x <= MAX_LR,
    ),
    Setting::named::<Schedule>("optim.schedule"),
    Setting::count("optim.warmup_epochs", |c| c.optim.warmup_epochs, 0, 100_000),
    Setting::number(
        "optim.min_lr_factor",
        "a number in (0, 1]",
        |c| c.optim.min_lr_factor,
        |x| x > 0.0 && x <= 1.0,
    ),
    Setting::number(
        "optim.weight_decay",
        "a number >= 0 (0 = off)",
        |c| c.optim.weight_decay,
        |x| x.is_finite() && x >= 0.0,
    ),
    Setting::number(
        "optim.beta1",
        "a number in [0, 1)",
        |c| c.optim.beta1,
        |x| (0.0..1.0).contains(&x),
    ),
    Setting::number(
        "optim.beta2",
        "a number in [0, 1)",
        |c| c.optim.beta2,
        |x| (0.0..1.0).contains(&x),
    ),
    Setting::number(
        "optim.eps",
        "a positive number",
        |c| c.optim.eps,
        |x| x.is_finite() && x > 0.0,
    ),
    Setting::number(
        "optim.grad_clip",
        "a number >= 0 (0 = off)",
        |c| c.optim.grad_clip,
        |x| x.is_finite() && x >= 0.0,
    ),
    Setting::count("optim.patience", |c| c.optim.patience, 0, 100_000),
    Setting::count(
        "optim.offdiagonal_warmup_epochs",
        |c| c.optim.offdiagonal_warmup_epochs,
        0,
        100_000,
    ),
    Setting::count(
        "optim.max_bad_steps",
        |c| c.optim.max_bad_steps,
        1,
        1_000_000,
    ),
    Setting::number(
        "optim.aux_weight",
        "a number >= 0",
        |c| c.optim.aux_weight,
        |x| x.is_finite() && x >= 0.0,
    ),
    Setting::seed("run.seed"),
    Setting::new(
        "run.threads",
        Accepts::Text("an integer >= 0 (0 = all cores)"),
        Check::Count {
            get: |c| c.run.threads,
            min: 0,
            max: 1_024,
        },
    ),
    Setting::named::<DeviceKind>("run.device"),
];

/// One row of [`SETTINGS`].
struct Setting {
    key: &'static str,
    accepts: Accepts,
    check: Check,
}

/// What a setting accepts, in words.
#[derive(Clone, Copy)]
enum Accepts {
    Text(&'static str),
    /// An integer at least the count's minimum (said from its [`Check::Count`]).
    Integer,
    /// One of these names (a setting with a fixed set of values).
    OneOf(fn() -> &'static [&'static str]),
}

/// How a setting's value is checked beyond its type, which deserialising checks.
#[derive(Clone, Copy)]
enum Check {
    /// The type alone: paths, booleans, seeds, settings with a fixed set of names.
    Type,
    /// A count in `min..=max`. `max` is far beyond any real use and refuses a typo (a missing
    /// decimal point, 2^64 - 1) before it allocates terabytes, spawns millions of threads or runs
    /// for a geological age.
    Count {
        get: fn(&TrainConfig) -> usize,
        min: usize,
        max: usize,
    },
    /// A number for which `ok` holds.
    Number {
        get: fn(&TrainConfig) -> f64,
        ok: fn(f64) -> bool,
    },
    /// Anything else (names, rules across keys): the first problem, if any.
    Custom(fn(&TrainConfig) -> Option<Invalid>),
}

impl Setting {
    const fn new(key: &'static str, accepts: Accepts, check: Check) -> Self {
        Setting {
            key,
            accepts,
            check,
        }
    }

    /// A count: an integer `>= min` (at most `max`).
    const fn count(
        key: &'static str,
        get: fn(&TrainConfig) -> usize,
        min: usize,
        max: usize,
    ) -> Self {
        Setting::new(key, Accepts::Integer, Check::Count { get, min, max })
    }

    /// A seed: any integer >= 0.
    const fn seed(key: &'static str) -> Self {
        Setting::new(key, Accepts::Text("an integer >= 0"), Check::Type)
    }

    /// A number described by `accepts` for which `ok` holds.
    const fn number(
        key: &'static str,
        accepts: &'static str,
        get: fn(&TrainConfig) -> f64,
        ok: fn(f64) -> bool,
    ) -> Self {
        Setting::new(key, Accepts::Text(accepts), Check::Number { get, ok })
    }

    /// A setting with a fixed set of names, read into `T` ([`Named`]).
    const fn named<T: Named>(key: &'static str) -> Self {
        Setting::new(key, Accepts::OneOf(|| T::NAMES), Check::Type)
    }

    /// The section and the key within it.
    fn parts(&self) -> (&'static str, &'static str) {
        self.key.split_once('.').expect("section.key")
    }

    /// The limits of a count.
    fn limits(&self) -> Option<(usize, usize)> {
        match self.check {
            Check::Count { min, max, .. } => Some((min, max)),
            _ => None,
        }
    }

    /// The first way `cfg`'s value breaks this setting's rule, if any.
    fn check(&self, cfg: &TrainConfig) -> Option<Invalid> {
        match self.check {
            Check::Type => None,
            Check::Count { get, min, max } => {
                let v = get(cfg);
                if v > max {
                    Some(Invalid {
                        key: self.key,
                        value: v.to_string(),
                        note: Some("too large".into()),
                    })
                } else {
                    (v < min).then(|| Invalid::new(self.key, v))
                }
            }
            Check::Number { get, ok } => {
                let v = get(cfg);
                (!ok(v)).then(|| Invalid::new(self.key, v))
            }
            Check::Custom(check) => check(cfg),
        }
    }
}

/// The settings of `section`, by key.
fn section_keys(section: &str) -> impl Iterator<Item = &'static str> + '_ {
    SETTINGS
        .iter()
        .map(Setting::parts)
        .filter(move |(s, _)| *s == section)
        .map(|(_, k)| k)
}

/// The sections, in order.
fn sections() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for (s, _) in SETTINGS.iter().map(Setting::parts) {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// The calibration set must not be drawn with the training set's seed (when one is drawn).
fn calibration_seed_repeats_training(c: &TrainConfig) -> Option<Invalid> {
    let d = &c.data;
    (d.calibration_n > 0 && d.calibration_seed == d.synthetic_seed).then(|| Invalid {
        key: "data.calibration_seed",
        value: d.calibration_seed.to_string(),
        note: Some(
            "it equals data.synthetic_seed, so the calibration set would repeat the training stars"
                .into(),
        ),
    })
}

/// A list of label names in which a name appears twice.
fn named_twice(key: &'static str, names: &[String]) -> Option<Invalid> {
    let (_, n) = names
        .iter()
        .enumerate()
        .find(|(i, n)| names[..*i].contains(n))?;
    Some(Invalid {
        key,
        value: format!("{names:?}"),
        note: Some(format!("'{n}' is named twice")),
    })
}

/// `data.test_fraction` out of `[0, 1]`, or the three fractions not summing to 1 (said of
/// `data.train_fraction`).
fn test_fraction_or_sum(c: &TrainConfig) -> Option<Invalid> {
    let d = &c.data;
    let f = d.test_fraction;
    if !(f.is_finite() && (0.0..=1.0).contains(&f)) {
        return Some(Invalid::new("data.test_fraction", f));
    }
    let sum = d.train_fraction + d.val_fraction + d.test_fraction;
    ((sum - 1.0).abs() > 1e-6).then(|| Invalid {
        key: "data.train_fraction",
        value: d.train_fraction.to_string(),
        note: Some(format!(
            "the fractions sum to {sum:.4} (train {} + val {} + test {})",
            d.train_fraction, d.val_fraction, d.test_fraction
        )),
    })
}

/// A setting with a fixed set of values, read and written by name (`#[serde(with = "named")]`):
/// the names are declared once, with the type, and every error and rule lists them.
pub trait Named: Sized + Copy + 'static {
    /// Every name, in the order the rule lists them.
    const NAMES: &'static [&'static str];
    fn from_name(name: &str) -> Option<Self>;
    fn name(self) -> &'static str;
}

/// The learning-rate schedule (`optim.schedule`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Schedule {
    /// `lr` throughout (after any warm-up).
    #[default]
    Constant,
    /// Cosine decay to `lr * min_lr_factor` over the epochs, after warm-up.
    Cosine,
}

impl Named for Schedule {
    const NAMES: &'static [&'static str] = &["constant", "cosine"];
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "constant" => Some(Schedule::Constant),
            "cosine" => Some(Schedule::Cosine),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Cosine => "cosine",
        }
    }
}

/// The device a run's backbone runs on (`run.device`; see [`crate::model::device`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// Needs the `cuda` feature and an NVIDIA GPU.
    Cuda,
    /// Needs the `metal` feature and a Mac.
    Metal,
}

impl Named for DeviceKind {
    const NAMES: &'static [&'static str] = &["cpu", "cuda", "metal"];
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "cpu" => Some(DeviceKind::Cpu),
            "cuda" => Some(DeviceKind::Cuda),
            "metal" => Some(DeviceKind::Metal),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Metal => "metal",
        }
    }
}

impl Named for starflow_flows::OffDiagonal {
    const NAMES: &'static [&'static str] = &["absolute", "relative"];
    fn from_name(name: &str) -> Option<Self> {
        starflow_flows::OffDiagonal::from_name(name)
    }
    fn name(self) -> &'static str {
        starflow_flows::OffDiagonal::name(self)
    }
}

impl Named for starflow_models::ComputePath {
    const NAMES: &'static [&'static str] = &["fast", "stock"];
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "fast" => Some(starflow_models::ComputePath::Fast),
            "stock" => Some(starflow_models::ComputePath::Stock),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            starflow_models::ComputePath::Fast => "fast",
            starflow_models::ComputePath::Stock => "stock",
        }
    }
}

/// Serde by name for [`Named`] settings. An unknown name is the deserialiser's "unknown variant"
/// error, which [`first_type_error`] turns into the setting's own rule.
mod named {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use super::Named;

    pub fn serialize<T: Named, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(value.name())
    }

    pub fn deserialize<'de, T: Named, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let name = String::deserialize(d)?;
        T::from_name(&name).ok_or_else(|| D::Error::unknown_variant(&name, T::NAMES))
    }
}

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

/// Checks every key of a parsed TOML document against [`SETTINGS`].
fn check_keys(doc: &toml::Table, file: &Path) -> Result<()> {
    let sections = sections();
    for (section, value) in doc {
        if !sections.contains(&section.as_str()) {
            let hint = closest(section, sections.iter().copied())
                .map(|s| format!("did you mean [{s}]?"))
                .unwrap_or_else(|| {
                    let all: Vec<String> = sections.iter().map(|s| format!("[{s}]")).collect();
                    format!("valid sections are {}", all.join(", "))
                });
            return Err(TrainError::config(
                file,
                format!("unknown section or key `{section}`; {hint}"),
            ));
        }
        let Some(table) = value.as_table() else {
            return Err(TrainError::config(
                file,
                format!("`{section}` must be a table ([{section}])"),
            ));
        };
        for key in table.keys() {
            if section_keys(section).any(|k| k == key) {
                continue;
            }
            // A key may also sit in the wrong section.
            let elsewhere = SETTINGS
                .iter()
                .map(Setting::parts)
                .find(|(_, k)| k == key)
                .map(|(s, _)| format!("`{key}` belongs in [{s}]"));
            let hint = elsewhere
                .or_else(|| {
                    closest(key, section_keys(section)).map(|k| format!("did you mean `{k}`?"))
                })
                .unwrap_or_else(|| {
                    let keys: Vec<&str> = section_keys(section).collect();
                    format!("valid keys: {}", keys.join(", "))
                });
            return Err(TrainError::config(
                file,
                format!("unknown key `{key}` in [{section}]; {hint}"),
            ));
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

/// What `key` accepts, stated in every error about it ([`SETTINGS`]; counts add their limit).
fn rule(key: &str) -> String {
    let Some(setting) = SETTINGS.iter().find(|s| s.key == key) else {
        return "see configs/reference.toml".into();
    };
    let limits = setting.limits();
    let s = match setting.accepts {
        Accepts::Text(s) => s.to_string(),
        Accepts::Integer => format!("an integer >= {}", limits.map_or(0, |(min, _)| min)),
        Accepts::OneOf(names) => one_of(names()),
    };
    match limits {
        Some((_, max)) => format!("{s}, at most {max}"),
        None => s,
    }
}

/// `one of a, b, c` for a setting's names.
fn one_of(names: &[&str]) -> String {
    format!("one of {}", names.join(", "))
}

/// A value that breaks its rule: the key, the value as TOML shows it, and what is wrong beyond the
/// rule itself (if anything).
struct Invalid {
    key: &'static str,
    value: String,
    note: Option<String>,
}

impl Invalid {
    /// `key` = `value`, with nothing to say beyond the key's rule.
    fn new(key: &'static str, value: impl std::fmt::Display) -> Self {
        Invalid {
            key,
            value: value.to_string(),
            note: None,
        }
    }
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

    /// The first value that breaks its key's rule, in the order of [`SETTINGS`].
    fn first_invalid(&self) -> Option<Invalid> {
        SETTINGS.iter().find_map(|setting| setting.check(self))
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

/// The largest learning rate accepted: Adam's steps are about `lr` per weight, so anything near 1
/// destroys the network in one step.
const MAX_LR: f64 = 1.0;

/// An unknown backbone or flow name: says so before the rule lists the valid ones.
fn unknown_name(key: &'static str, name: &str) -> Invalid {
    Invalid {
        key,
        value: format!("\"{name}\""),
        note: Some(format!("{key} `{name}` is unknown")),
    }
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
                if e.message().starts_with("unknown variant") {
                    // A name the setting does not have: its rule lists those it has.
                    return Some(TrainError::config(
                        origin,
                        format!("{key} = {value} ({from}): must be {}", rule(&key)),
                    ));
                }
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
        for s in SETTINGS {
            assert_ne!(rule(s.key), "see configs/reference.toml", "{}", s.key);
            assert!(!rule(s.key).is_empty(), "{}", s.key);
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
    fn every_field_is_a_setting() {
        let doc = toml::Table::try_from(TrainConfig::default()).unwrap();
        let mut fields = Vec::new();
        for (section, v) in &doc {
            for k in v.as_table().unwrap().keys() {
                fields.push(format!("{section}.{k}"));
            }
        }
        let mut keys: Vec<String> = SETTINGS.iter().map(|s| s.key.to_string()).collect();
        fields.sort();
        keys.sort();
        assert_eq!(
            fields, keys,
            "the structs' fields and SETTINGS are out of step"
        );
    }

    /// A setting with a fixed set of names refuses another with its rule, reads every name it
    /// lists, and writes it back the same.
    #[test]
    fn named_settings_round_trip_and_list_their_names() {
        let err = TrainConfig::default()
            .apply_overrides(&["optim.schedule=\"cosin\"".into()], Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("optim.schedule = \"cosin\"") && err.contains("one of constant, cosine"),
            "{err}"
        );
        assert!(!err.contains("variant"), "{err}");
        for (key, names) in [
            ("optim.schedule", Schedule::NAMES),
            ("run.device", DeviceKind::NAMES),
            (
                "model.offdiagonal",
                <starflow_flows::OffDiagonal as Named>::NAMES,
            ),
            (
                "model.compute_path",
                <starflow_models::ComputePath as Named>::NAMES,
            ),
        ] {
            for name in names {
                let mut cfg = TrainConfig::default();
                cfg.apply_overrides(&[format!("{key}=\"{name}\"")], Path::new("x.toml"))
                    .unwrap();
                let (section, k) = key.split_once('.').unwrap();
                let doc = toml::Table::try_from(&cfg).unwrap();
                assert_eq!(doc[section][k].as_str(), Some(*name), "{key}");
            }
        }
    }

    /// Counts that would allocate terabytes, spawn a million threads or loop for ever are refused
    /// with the key, the value and the limit.
    #[test]
    fn every_count_has_an_upper_limit() {
        let base = TrainConfig::default();
        let limits = SETTINGS.iter().filter_map(|s| Some((s.key, s.limits()?.1)));
        for (key, max) in limits {
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
