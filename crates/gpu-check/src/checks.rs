//! The three sections of the check. Each case records its own error instead of stopping the run:
//! on a lent GPU, an op that fails is itself the finding, and the other cases still count.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use starflow_training::config::TrainConfig;
use starflow_training::optim::Adam;
use starflow_training::{train, Quiet, StarModel, TrainOptions};

use crate::Options;

/// Pass thresholds (relative differences). The device runs candle's stock f32 kernels in another
/// summation order than the CPU's fused ones: differences of 1e-6..1e-4 are rounding.
pub const PARAMS_TOL: f64 = 1e-3;
pub const GRAD_TOL: f64 = 1e-2;
/// Largest per-star NLL difference between the CPU's and the device's short runs, any epoch.
pub const TRAIN_TOL: f64 = 0.1;

pub const BACKBONES: [&str; 2] = ["tiny_cnn", "cnn"];
pub const FLOWS: [&str; 3] = ["diagonal_gaussian", "full_gaussian", "full_flow"];

/// Everything measured, as JSON rows per section.
#[derive(Debug, Default)]
pub struct Results {
    pub device: String,
    pub correctness: Vec<Value>,
    pub training: Vec<Value>,
    pub timing: Vec<Value>,
}

impl Results {
    /// Every correctness and training row passed (timings have no verdict).
    pub fn passed(&self) -> bool {
        self.correctness
            .iter()
            .chain(&self.training)
            .all(|r| r["pass"] == true)
    }
}

pub fn run_all(opts: &Options, dev: &Device) -> Result<Results> {
    let mut r = Results {
        device: format!("{dev:?}"),
        ..Results::default()
    };
    for backbone in BACKBONES {
        for flow in FLOWS {
            eprintln!("correctness: {backbone} + {flow}");
            r.correctness.push(row(
                json!({"backbone": backbone, "flow": flow}),
                correctness(opts, dev, backbone, flow),
            ));
        }
    }
    eprintln!("training: a short run on the CPU and on {}", opts.device);
    r.training.push(row(
        json!({"backbone": "tiny_cnn", "flow": "full_flow"}),
        training(opts),
    ));
    for backbone in BACKBONES {
        for mode in ["train", "eval"] {
            eprintln!("timing: {backbone} {mode}");
            r.timing.push(row(
                json!({"backbone": backbone, "mode": mode}),
                timing(opts, dev, backbone, mode),
            ));
        }
    }
    Ok(r)
}

/// `base` with the measured fields, or with `pass: false` and the error.
fn row(base: Value, measured: Result<Value>) -> Value {
    let mut out = base;
    match measured {
        Ok(Value::Object(m)) => out.as_object_mut().expect("rows are objects").extend(m),
        Ok(other) => out["value"] = other,
        Err(e) => {
            out["pass"] = json!(false);
            out["error"] = json!(format!("{e:#}"));
        }
    }
    out
}

fn config(backbone: &str, flow: &str) -> TrainConfig {
    TrainConfig::tiny(Path::new("unused"), flow, backbone, 1)
}

/// `n` fixed values in about [-1.3, 1.3], varying with `salt`: inputs without an unseeded generator,
/// so two runs of the check see the same stars.
pub fn pattern(n: usize, salt: u32) -> Vec<f32> {
    let (f, g) = (0.37 + 0.11 * salt as f32, 0.051 * salt as f32);
    (0..n)
        .map(|i| (i as f32 * f).sin() + 0.3 * (i as f32 * g).cos())
        .collect()
}

/// Largest |a - b| over max |b|.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let host = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.flatten_all()?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .to_vec1()?)
    };
    let (a, b) = (host(a)?, host(b)?);
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    Ok(a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale)
}

/// The training-mode NLL summed over the batch and the gradient of every trainable weight.
fn nll_and_grads(
    model: &StarModel,
    x: &Tensor,
    y: &Tensor,
) -> Result<(f64, Vec<(String, Tensor)>)> {
    let nll = model.nll(x, y, true)?.sum_all()?;
    let grads = nll.backward()?;
    let mut out = Vec::new();
    for (name, v) in starflow_models::named_trainable_vars(&model.varmap) {
        let g = grads
            .get(v.as_tensor())
            .with_context(|| format!("no gradient reached {name}"))?;
        out.push((name, g.clone()));
    }
    Ok((nll.to_scalar::<f64>()?, out))
}

/// One backbone + flow on the device against the CPU's fused path, from the same seeded weights.
fn correctness(opts: &Options, dev: &Device, backbone: &str, flow: &str) -> Result<Value> {
    let (b, n_pix) = if opts.quick { (2, 256) } else { (8, 2048) };
    let cfg = config(backbone, flow);
    let cpu = StarModel::new(&cfg, n_pix, 3, &Device::Cpu)?;
    let gpu = StarModel::new(&cfg, n_pix, 3, dev)?;
    let x = Tensor::from_vec(pattern(b * n_pix, 1), (b, 1, n_pix), &Device::Cpu)?;
    let y = Tensor::from_vec(pattern(b * 3, 2), (b, 3), &Device::Cpu)?.to_dtype(DType::F64)?;
    let x_dev = x.to_device(dev)?;
    let params = rel_diff(&gpu.params(&x_dev, false)?, &cpu.params(&x, false)?)?;
    let (nll_cpu, g_cpu) = nll_and_grads(&cpu, &x, &y)?;
    let (nll_dev, g_dev) = nll_and_grads(&gpu, &x_dev, &y)?;
    let mut worst = (0f64, String::new());
    for ((name, a), (_, g)) in g_dev.iter().zip(&g_cpu) {
        let d = rel_diff(a, g)?;
        if d > worst.0 || worst.1.is_empty() {
            worst = (d, name.clone());
        }
    }
    let nll = (nll_dev - nll_cpu).abs() / nll_cpu.abs().max(1.0);
    Ok(json!({
        "batch": b, "n_pix": n_pix,
        "params_rel": params, "nll_rel": nll,
        "grad_rel_max": worst.0, "grad_worst": worst.1,
        "pass": params <= PARAMS_TOL && nll <= PARAMS_TOL && worst.0 <= GRAD_TOL,
    }))
}

/// The same short run on the CPU and on the device, epoch by epoch.
fn training(opts: &Options) -> Result<Value> {
    let dir = opts.out.join("training-runs");
    let data = dir.join("data");
    let run = |device: &str| -> Result<(Vec<(f64, f64)>, f64)> {
        let mut cfg = TrainConfig::tiny(
            &data,
            "full_flow",
            "tiny_cnn",
            if opts.quick { 2 } else { 4 },
        );
        cfg.data.synthetic_n = if opts.quick { 96 } else { 1024 };
        cfg.data.synthetic_pixels_per_camera = if opts.quick { 64 } else { 512 };
        cfg.run.device = starflow_training::Named::from_name(device)
            .with_context(|| format!("unknown device `{device}`: use cpu, cuda or metal"))?;
        let out = dir.join(device);
        if out.exists() {
            std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
        }
        let t0 = Instant::now();
        let state = train(&cfg, &TrainOptions::new(&out), &Quiet)?;
        let seconds = t0.elapsed().as_secs_f64();
        Ok((
            state
                .history
                .iter()
                .map(|e| (e.train_nll, e.val_nll))
                .collect(),
            seconds,
        ))
    };
    let (cpu, cpu_s) = run("cpu")?;
    let (dev, dev_s) = run(&opts.device)?;
    // The runs (metrics.csv, weights) stay for inspection; the synthetic spectra need not travel back.
    std::fs::remove_dir_all(&data).with_context(|| format!("removing {}", data.display()))?;
    let worst = cpu
        .iter()
        .zip(&dev)
        .flat_map(|(c, d)| [(c.0 - d.0).abs(), (c.1 - d.1).abs()])
        .fold(0f64, f64::max);
    Ok(json!({
        "epochs": cpu.len(),
        "cpu": cpu, "device": dev, "cpu_s": cpu_s, "device_s": dev_s,
        "max_nll_diff": worst,
        "pass": cpu.len() == dev.len() && worst.is_finite() && worst <= TRAIN_TOL,
    }))
}

/// Median seconds of `steps` calls after two warm-up calls, synchronising the device each time.
fn median_seconds(dev: &Device, steps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut ts = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

/// starflow's step (diagonal Gaussian, as the peer) and PyTorch's on the same device.
fn timing(opts: &Options, dev: &Device, backbone: &str, mode: &str) -> Result<Value> {
    let (b, n_pix, steps) = if opts.quick {
        (4, 1024, 2)
    } else {
        (64, 16384, 10)
    };
    let cfg = config(backbone, "diagonal_gaussian");
    let model = StarModel::new(&cfg, n_pix, 3, dev)?;
    let x = Tensor::from_vec(pattern(b * n_pix, 3), (b, 1, n_pix), dev)?;
    let y = Tensor::from_vec(pattern(b * 3, 4), (b, 3), &Device::Cpu)?.to_dtype(DType::F64)?;
    let mut adam = Adam::new(
        starflow_models::named_trainable_vars(&model.varmap),
        &cfg.optim,
    )?;
    let starflow = median_seconds(dev, steps, || {
        if mode == "train" {
            let grads = model.nll(&x, &y, true)?.mean_all()?.backward()?;
            adam.step(&grads, 1e-4)?;
        } else {
            model.params(&x, false)?;
        }
        Ok(())
    })?;
    let torch = torch_seconds(opts, backbone, mode, b, n_pix, steps);
    Ok(json!({
        "batch": b, "n_pix": n_pix, "steps": steps,
        "starflow_s": starflow,
        "torch_s": torch.as_ref().ok(),
        "torch_note": torch.as_ref().err().map(|e| format!("{e:#}")),
    }))
}

/// The PyTorch peer's median seconds, or why it did not run.
fn torch_seconds(
    opts: &Options,
    backbone: &str,
    mode: &str,
    b: usize,
    n_pix: usize,
    steps: usize,
) -> Result<f64> {
    if !opts.peer.exists() {
        anyhow::bail!("peer script {} not found", opts.peer.display());
    }
    let out = Command::new(&opts.python)
        .arg(&opts.peer)
        .args([backbone, mode, &opts.device])
        .args([b.to_string(), n_pix.to_string(), steps.to_string()])
        .output()
        .with_context(|| format!("could not run {}", opts.python))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").to_string();
        anyhow::bail!("PyTorch peer did not run: {last}");
    }
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("median_s="))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no median_s in the peer's output: {text}"))
}
