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
    /// One name per label column.
    pub label_names: Vec<String>,
    /// The predicted columns.
    pub targets: Vec<String>,
    /// Flux floor of `ln(max(flux, floor))`.
    pub flux_floor: f32,
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
            label_names: opts.label_names,
            targets: opts.targets,
            flux_floor: 0.2,
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
            "label_names",
            "targets",
            "flux_floor",
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

impl TrainConfig {
    /// Reads a TOML file; missing keys take their defaults, unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            TrainError::config(
                path,
                format!("cannot read the config file: {e}; check the path (see configs/)"),
            )
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses TOML text (`origin` names it in errors).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            TrainError::config(origin, format!("invalid TOML: {}", e.message()))
        })?;
        check_keys(&doc, origin)?;
        let cfg: TrainConfig = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::config(origin, e.message().to_string()))?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// The TOML form of this configuration (stored in every run).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks ranges and names.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |p: String| Err(TrainError::config(origin, p));
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad(format!("optim.lr must be a positive number (got {})", o.lr));
        }
        if o.batch_size == 0 {
            return bad("optim.batch_size must be at least 1 (got 0)".into());
        }
        if o.epochs == 0 {
            return bad("optim.epochs must be at least 1 (got 0)".into());
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            return bad(format!(
                "optim.beta1 and beta2 must lie in [0, 1) (got {} and {})",
                o.beta1, o.beta2
            ));
        }
        if o.eps.is_nan()
            || o.eps <= 0.0
            || o.weight_decay.is_nan()
            || o.weight_decay < 0.0
            || o.grad_clip.is_nan()
            || o.grad_clip < 0.0
        {
            return bad(
                "optim.eps must be positive; weight_decay and grad_clip must not be negative"
                    .into(),
            );
        }
        if !(o.min_lr_factor > 0.0 && o.min_lr_factor <= 1.0) {
            return bad(format!(
                "optim.min_lr_factor must lie in (0, 1] (got {})",
                o.min_lr_factor
            ));
        }
        if !["constant", "cosine"].contains(&o.schedule.as_str()) {
            return bad(format!(
                "optim.schedule must be `constant` or `cosine` (got `{}`)",
                o.schedule
            ));
        }
        if o.max_bad_steps == 0 {
            return bad("optim.max_bad_steps must be at least 1".into());
        }
        let d = &self.data;
        let f = starflow_data::SplitFractions {
            train: d.train_fraction,
            val: d.val_fraction,
            test: d.test_fraction,
        };
        if let Err(e) = f.validate() {
            return bad(format!("data: {e}"));
        }
        if d.val_fraction <= 0.0 {
            return bad(
                "data.val_fraction must be positive: early stopping needs a validation split"
                    .into(),
            );
        }
        if let Err(e) = starflow_data::FluxTransform::new(d.flux_floor) {
            return bad(format!("data: {e}"));
        }
        let m = &self.model;
        if !starflow_models::BACKBONE_NAMES.contains(&m.backbone.as_str()) {
            return bad(format!(
                "model.backbone `{}` is unknown; valid: {}",
                m.backbone,
                starflow_models::BACKBONE_NAMES.join(", ")
            ));
        }
        if starflow_flows::OffDiagonal::from_name(&m.offdiagonal).is_none() {
            return bad(format!(
                "model.offdiagonal must be `absolute` or `relative` (got `{}`)",
                m.offdiagonal
            ));
        }
        if !starflow_flows::FLOW_NAMES.contains(&m.flow.as_str()) {
            return bad(format!(
                "model.flow `{}` is unknown; valid: {}",
                m.flow,
                starflow_flows::FLOW_NAMES.join(", ")
            ));
        }
        if !(0.0..0.5).contains(&m.dropout) {
            return bad(format!(
                "model.dropout must lie in [0, 0.5) (got {})",
                m.dropout
            ));
        }
        if !["fast", "stock"].contains(&m.compute_path.as_str()) {
            return bad(format!(
                "model.compute_path must be `fast` or `stock` (got `{}`)",
                m.compute_path
            ));
        }
        if m.flow_layers == 0 || m.flow_kernels == 0 {
            return bad("model.flow_layers and model.flow_kernels must be at least 1".into());
        }
        if !["cpu", "cuda", "metal"].contains(&self.run.device.as_str()) {
            return bad(format!(
                "run.device must be cpu, cuda or metal (got `{}`)",
                self.run.device
            ));
        }
        Ok(())
    }

    /// Applies `key=value` overrides (`optim.lr=1e-3`), with the same checks as the file.
    pub fn apply_overrides(&mut self, overrides: &[String], origin: &Path) -> Result<()> {
        if overrides.is_empty() {
            return Ok(());
        }
        let mut doc: toml::Table = toml::Table::try_from(&*self)
            .map_err(|e| TrainError::config(origin, format!("cannot serialise config: {e}")))?;
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
            let parsed: toml::Value = format!("v = {}", value.trim())
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.trim().to_string()));
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
        }
        *self = Self::from_toml(&toml::to_string(&doc).unwrap_or_default(), origin)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
