//! The composed model: a backbone that emits f32 flow parameters, cast to f64 for the flow.
//!
//! The cast is part of the autograd graph, so gradients of the f64 negative log-likelihood flow
//! back into the f32 network.
//!
//! **Devices.** The backbone runs on the run's device (`run.device`: its convolutions are the
//! work). The flow always runs on the host, with its fused f64 kernels (`starflow_flows::ops`
//! implement the CPU only, and Metal has no f64): [`StarModel::params`] moves the `(b, P)`
//! parameter rows there, a few kilobytes per batch, and candle's `ToDevice` node carries their
//! gradient back to the device in the backward pass. Labels, masks and everything computed from
//! the parameters (summaries, samples, calibration) are therefore host tensors. On the CPU the
//! move is a no-op, so CPU runs are unchanged.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use starflow_flows::{Flow, FullFlowConfig};
use starflow_models::{Backbone, BackboneConfig};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// Where the flow runs, whatever the backbone's device: the host (see the module docs).
pub const FLOW_DEVICE: Device = Device::Cpu;

/// A backbone plus a flow, with the variables that hold the backbone's weights.
pub struct StarModel {
    pub backbone: Box<dyn Backbone>,
    pub flow: Flow,
    pub varmap: VarMap,
    /// The backbone's device (`run.device`); the flow runs on [`FLOW_DEVICE`].
    pub device: Device,
    /// Head outputs after the flow's parameters, for the auxiliary targets
    /// (`model.aux_outputs`; [`crate::aux_targets`]).
    pub aux_outputs: usize,
}

impl std::fmt::Debug for StarModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StarModel")
            .field("backbone", &self.backbone.name())
            .field("flow", &self.flow.name())
            .finish()
    }
}

/// Builds the flow named in the config for `dim` labels (flows' own by-name constructor, with
/// the config's flow settings).
pub fn build_flow(cfg: &TrainConfig, dim: usize) -> Result<Flow> {
    let m = &cfg.model;
    Ok(starflow_flows::flow_by_name_with(
        &m.flow,
        &FullFlowConfig {
            dim,
            n_gaussianization_layers: m.flow_layers,
            n_kernels: m.flow_kernels,
            offdiagonal: m.offdiagonal,
        },
    )?)
}

/// How a device setting is named to the user: the setting, and how to choose the CPU with it.
/// The config's is [`RUN_DEVICE`]; a tool with its own flag (the GPU check's `--device`) passes
/// its own, so the same errors name what that user typed.
#[derive(Clone, Copy, Debug)]
pub struct DeviceSetting {
    pub name: &'static str,
    pub choose_cpu: &'static str,
}

/// The config's `run.device`.
pub const RUN_DEVICE: DeviceSetting = DeviceSetting {
    name: "run.device",
    choose_cpu: "set run.device = \"cpu\" (the default)",
};

/// Selects the device named in the config (`run.device`); see [`device_for`].
pub fn device(name: &str) -> Result<Device> {
    device_for(name, RUN_DEVICE)
}

/// Selects device `name` given through `setting`. A GPU that this build cannot drive (it was built
/// without the feature) or that the machine does not have is the user's setting to fix, not an
/// internal failure: both say how.
pub fn device_for(name: &str, setting: DeviceSetting) -> Result<Device> {
    let (built, open): (bool, fn() -> candle_core::Result<Device>) = match name {
        "cuda" => (candle_core::utils::cuda_is_available(), || {
            Device::new_cuda(0)
        }),
        "metal" => (candle_core::utils::metal_is_available(), || {
            Device::new_metal(0)
        }),
        _ => return Ok(Device::Cpu),
    };
    let (path, cpu) = (std::path::PathBuf::from(setting.name), setting.choose_cpu);
    if !built {
        let how = match name {
            "cuda" => "`cargo xtask cuda-build` (it fetches the CUDA compiler itself; README, \"On a GPU\")",
            _ => "`cargo build --release -p starflow-cli --features metal` on macOS",
        };
        return Err(TrainError::Input {
            path,
            problem: format!(
                "{} = \"{name}\", but this starflow was built without {name} support",
                setting.name
            ),
            fix: format!("build it with {how}, or {cpu}"),
        });
    }
    open().map_err(|e| TrainError::Input {
        path,
        problem: format!(
            "{} = \"{name}\", but no {name} device could be opened ({})",
            setting.name,
            e.to_string().lines().next().unwrap_or_default()
        ),
        fix: format!("run where a {name} device and its driver are present, or {cpu}"),
    })
}

impl StarModel {
    /// Builds a freshly initialised model. candle's CPU backend draws initial weights from an
    /// unseeded thread-local generator, so every trainable tensor is then re-drawn from the run's
    /// seed (see [`seeded_init`]): the same seed gives the same initial weights.
    pub fn new(cfg: &TrainConfig, input_len: usize, dim: usize, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Self::build(cfg, input_len, dim, vb, varmap, device)?;
        seeded_init(&model.varmap, cfg.run.seed)?;
        if cfg.optim.offdiagonal_warmup_epochs > 0 {
            model.zero_head_rows(&model.offdiagonal_columns())?;
        }
        Ok(model)
    }

    /// Builds the model with its weights from a safetensors file (a checkpoint of
    /// [`StarModel::new`]'s variables).
    ///
    /// The checkpoint's tensors are put in the variable map before the model is built, and
    /// building takes a variable the map already holds instead of drawing one, so no initial
    /// weights are drawn only to be overwritten. Every variable the model asks for must be in the
    /// file with its shape; tensors the model does not use are ignored.
    pub fn load(
        cfg: &TrainConfig,
        input_len: usize,
        dim: usize,
        weights: &std::path::Path,
        device: &Device,
    ) -> Result<Self> {
        let tensors = candle_core::safetensors::load(weights, device)?;
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for (name, t) in &tensors {
                data.insert(name.clone(), Var::from_tensor(&t.to_dtype(DType::F32)?)?);
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Self::build(cfg, input_len, dim, vb, varmap, device)?;
        let data = model
            .varmap
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut missing: Vec<&String> = data.keys().filter(|k| !tensors.contains_key(*k)).collect();
        if !missing.is_empty() {
            missing.sort();
            return Err(TrainError::run(
                weights,
                format!(
                    "the weights file lacks {} of the model's tensors (first: {}); it was not \
                     written for this run's config",
                    missing.len(),
                    missing[0]
                ),
                "restore the run's own model.safetensors, or train the run again",
            ));
        }
        drop(data);
        Ok(model)
    }

    fn build(
        cfg: &TrainConfig,
        input_len: usize,
        dim: usize,
        vb: VarBuilder,
        varmap: VarMap,
        device: &Device,
    ) -> Result<Self> {
        let flow = build_flow(cfg, dim)?;
        let bcfg = BackboneConfig {
            n_params: flow.n_params() + cfg.model.aux_outputs,
            input_len,
            dropout: cfg.model.dropout,
            path: cfg.model.compute_path,
            seed: cfg.run.seed,
        };
        let backbone = starflow_models::backbone(&cfg.model.backbone, &bcfg, vb)?;
        Ok(StarModel {
            backbone,
            flow,
            varmap,
            device: device.clone(),
            aux_outputs: cfg.model.aux_outputs,
        })
    }

    /// Raw flow parameters `(b, P)` in f64 on the host ([`FLOW_DEVICE`]) for spectra
    /// `x: (b, 1, n_pix)` on the model's device. Moved before the cast, so a GPU sends f32.
    ///
    /// Without `train` this is inference ([`starflow_models::ops::inference`]): the backbone keeps
    /// nothing for a backward pass and the result is detached, so these parameters carry no
    /// gradient.
    pub fn params(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.outputs(x, train)?.0)
    }

    /// [`StarModel::params`], and the auxiliary outputs `(b, aux_outputs)` in f64 on the host
    /// when the model has any.
    pub fn outputs(&self, x: &Tensor, train: bool) -> Result<(Tensor, Option<Tensor>)> {
        let forward = || self.backbone.forward_t(x, train);
        let theta = if train {
            forward()?
        } else {
            starflow_models::ops::inference(forward)?.detach()
        };
        let host =
            |t: Tensor| -> Result<Tensor> { Ok(t.to_device(&FLOW_DEVICE)?.to_dtype(DType::F64)?) };
        if self.aux_outputs == 0 {
            return Ok((host(theta)?, None));
        }
        let p = self.flow.n_params();
        let aux = host(theta.narrow(1, p, self.aux_outputs)?)?;
        Ok((host(theta.narrow(1, 0, p)?)?, Some(aux)))
    }

    /// Per-star negative log-likelihood `(b,)` of z-scored labels `y: (b, d)`.
    pub fn nll(&self, x: &Tensor, y: &Tensor, train: bool) -> Result<Tensor> {
        self.nll_of(self.params(x, train)?, y, true)
    }

    /// [`StarModel::nll`] with the off-diagonal gate of [`StarModel::nll_of`].
    pub fn nll_gated(
        &self,
        x: &Tensor,
        y: &Tensor,
        train: bool,
        offdiagonal: bool,
    ) -> Result<Tensor> {
        self.nll_of(self.params(x, train)?, y, offdiagonal)
    }

    /// The per-star negative log-likelihood `(b,)` of `y` under flow parameters `params` (from
    /// [`StarModel::outputs`]), with the off-diagonal outputs of a full-covariance layer held at
    /// zero (and so given no gradient) unless `offdiagonal`: the warm-up of
    /// `optim.offdiagonal_warmup_epochs`.
    pub fn nll_of(&self, mut params: Tensor, y: &Tensor, offdiagonal: bool) -> Result<Tensor> {
        let cols = self.offdiagonal_columns();
        if !offdiagonal && !cols.is_empty() {
            let p = self.flow.n_params();
            let mask: Vec<f64> = (0..p)
                .map(|c| if cols.contains(&c) { 0.0 } else { 1.0 })
                .collect();
            let mask = Tensor::from_vec(mask, (1, p), &FLOW_DEVICE)?;
            params = params.broadcast_mul(&mask)?;
        }
        Ok(self.flow.log_prob(&params, y)?.neg()?)
    }

    /// Columns of the parameter row that are off-diagonal entries of a full-covariance affine
    /// layer (the flow's last layer), in order; empty for other flows.
    pub fn offdiagonal_columns(&self) -> Vec<usize> {
        let last = self.flow.n_layers() - 1;
        let layer = &self.flow.layers()[last];
        if !layer.kind().starts_with("affine-full") {
            return Vec::new();
        }
        let r = self.flow.param_range(last);
        (r.start + 2 * self.flow.dim()..r.end).collect()
    }

    /// Sets the head's weight rows and biases of parameter columns `cols` to zero.
    fn zero_head_rows(&self, cols: &[usize]) -> Result<()> {
        if cols.is_empty() {
            return Ok(());
        }
        let prefix = self.backbone.head_prefix();
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for suffix in ["weight", "bias"] {
            let Some(var) = data.get(&format!("{prefix}.{suffix}")) else {
                continue;
            };
            let t = var.as_tensor();
            let rows = t.dim(0)?;
            let keep: Vec<f32> = (0..rows)
                .map(|r| if cols.contains(&r) { 0.0 } else { 1.0 })
                .collect();
            let shape: Vec<usize> = std::iter::once(rows)
                .chain(std::iter::repeat_n(1, t.rank() - 1))
                .collect();
            let keep = Tensor::from_vec(keep, shape, t.device())?.to_dtype(t.dtype())?;
            var.set(&t.broadcast_mul(&keep)?)?;
        }
        Ok(())
    }
}

/// PyTorch's default initialisation, drawn from a seeded generator: every weight of rank >= 2 and
/// its bias uniform in +-1/sqrt(fan_in) (fan_in = product of the trailing dimensions); rank-1
/// tensors that start constant (BatchNorm scale and shift) and the BatchNorm buffers are kept.
///
/// Each variable draws from its own stream of the seeded ChaCha8 generator, keyed by its name
/// (its checkpoint key), in row-major order. So the draw depends neither on hash-map order nor on
/// the other variables' sizes: a head with more outputs starts with the same weights as one with
/// fewer in the outputs they share. The full Gaussian's head is the diagonal one's plus the
/// correlation rows, so with the same seed it starts as exactly the diagonal flow, and any
/// difference between the two runs comes from the correlations, not from another draw of the
/// whole network (which moved the quick profile's held-out NLL by 0.1 between seeds).
pub fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let fan_in_of = |name: &str| -> Option<usize> {
        let prefix = name.rsplit_once('.').map(|(p, _)| p)?;
        let w = data.get(&format!("{prefix}.weight"))?;
        (w.rank() >= 2).then(|| w.dims()[1..].iter().product())
    };
    for name in names {
        let var = &data[name];
        if starflow_models::is_buffer(name) {
            continue;
        }
        let fan_in = if var.rank() >= 2 {
            Some(var.dims()[1..].iter().product::<usize>())
        } else {
            let v: Vec<f32> = var.as_tensor().to_dtype(DType::F32)?.to_vec1()?;
            let constant = v.iter().all(|x| *x == v[0]);
            if constant && !name.ends_with(".bias") || fan_in_of(name).is_none() {
                None
            } else {
                fan_in_of(name)
            }
        };
        let Some(fan_in) = fan_in else { continue };
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(name_stream(name));
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let t = Tensor::from_vec(values, var.dims(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// The stream of variable `name` in [`seeded_init`]: its 64-bit FNV-1a hash.
fn name_stream(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GPU this build cannot drive is the user's setting to fix (exit 2 on the command line),
    /// with the rebuild or `cpu` as the fix; `cpu` and unknown names (refused by the config's
    /// own check first) give the CPU.
    #[test]
    fn a_gpu_missing_from_the_build_is_a_user_error_with_the_fix() {
        assert!(matches!(device("cpu"), Ok(Device::Cpu)));
        for (name, built) in [
            ("cuda", candle_core::utils::cuda_is_available()),
            ("metal", candle_core::utils::metal_is_available()),
        ] {
            if built {
                continue;
            }
            let err = device(name).expect_err(name);
            assert!(err.is_user_error(), "{name}: {err}");
            let msg = err.to_string();
            assert!(msg.starts_with("run.device: "), "{msg}");
            let rebuild = match name {
                "cuda" => "cargo xtask cuda-build".to_string(),
                _ => format!("--features {name}"),
            };
            assert!(msg.contains(&rebuild), "{msg}");
            assert!(msg.contains("run.device = \"cpu\""), "{msg}");
        }
    }
}
