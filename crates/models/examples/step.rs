//! Times training steps (forward, diagonal-Gaussian NLL, backward, AdamW) or eval forwards of a backbone,
//! for benchmarks and peak-memory measurements (`/usr/bin/time -v`).
//!
//! `cargo run --release -p starflow-models --example step -- [cnn|tiny_cnn] [fast|stock] [train|eval]
//! [batch] [len] [steps]`; prints one line per run with the median and minimum step time.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use starflow_models::{backbone, trainable_vars, BackboneConfig, ComputePath};

/// Diagonal-Gaussian negative log-likelihood (P = 6: three means, three log standard deviations),
/// averaged over the batch, without the constant.
fn diag_gaussian_nll(theta: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let mean = theta.narrow(D::Minus1, 0, 3)?;
    let log_std = theta.narrow(D::Minus1, 3, 3)?;
    let z = ((labels - mean)? * log_std.neg()?.exp()?)?;
    ((z.sqr()? * 0.5)? + log_std)?.sum(D::Minus1)?.mean_all()
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat` (0 where unavailable).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let name = arg(0, "cnn");
    let path = match arg(1, "fast").as_str() {
        "stock" => ComputePath::Stock,
        _ => ComputePath::Fast,
    };
    let train = arg(2, "train") == "train";
    let batch: usize = arg(3, "64").parse().unwrap_or(64);
    let len: usize = arg(4, "16384").parse().unwrap_or(16384);
    let steps: usize = arg(5, "3").parse().unwrap_or(3);
    let tuned = std::env::var("STARFLOW_NO_TUNE").is_err() && starflow_models::tune_allocator();

    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let mut cfg = BackboneConfig::new(6, len);
    cfg.path = path;
    let model = backbone(&name, &cfg, vb).map_err(candle_core::Error::wrap)?;
    let mut opt = AdamW::new(trainable_vars(&varmap), ParamsAdamW::default())?;
    let x = Tensor::randn(0f32, 1.0, (batch, 1, len), &dev)?;
    let labels = Tensor::randn(0f32, 1.0, (batch, 3), &dev)?;

    let mut times = vec![];
    let mut cpu = vec![];
    for _ in 0..steps {
        let t0 = Instant::now();
        let c0 = cpu_seconds();
        if train {
            let theta = model.forward_t(&x, true)?;
            let loss = diag_gaussian_nll(&theta, &labels)?;
            opt.backward_step(&loss)?;
        } else {
            let theta = model.forward_t(&x, false)?;
            theta.to_vec2::<f32>()?;
        }
        times.push(t0.elapsed().as_secs_f64());
        cpu.push(cpu_seconds() - c0);
    }
    cpu.sort_by(f64::total_cmp);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "backbone={name} path={path:?} mode={} batch={batch} len={len} threads={} steps={steps} tuned_alloc={tuned} \
         median_s={:.4} min_s={:.4} median_cpu_s={:.2} all={:?}",
        if train { "train" } else { "eval" },
        rayon::current_num_threads(),
        sorted[sorted.len() / 2],
        sorted[0],
        cpu[cpu.len() / 2],
        times
            .iter()
            .map(|t| (t * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    Ok(())
}
