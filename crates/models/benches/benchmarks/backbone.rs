//! Training step (forward, diagonal-Gaussian NLL with P = 6, backward, AdamW) and eval forward of both
//! backbones, fast path and (with `STARFLOW_BENCH_STOCK=1`) stock candle.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use criterion::{criterion_group, Criterion, Throughput};
use starflow_models::{backbone, trainable_vars, Backbone, BackboneConfig, ComputePath};

use super::{config, env_usize, paired, with_stock};

const N_PARAMS: usize = 6;

/// Diagonal-Gaussian negative log-likelihood without the constant: `θ = (μ, log σ)`.
fn diag_gaussian_nll(theta: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let mean = theta.narrow(D::Minus1, 0, 3)?;
    let log_std = theta.narrow(D::Minus1, 3, 3)?;
    let z = ((labels - mean)? * log_std.neg()?.exp()?)?;
    ((z.sqr()? * 0.5)? + log_std)?.sum(D::Minus1)?.mean_all()
}

struct Setup {
    model: Box<dyn Backbone>,
    opt: AdamW,
    x: Tensor,
    labels: Tensor,
}

fn setup(name: &str, path: ComputePath, batch: usize, len: usize) -> Result<Setup> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let mut cfg = BackboneConfig::new(N_PARAMS, len);
    cfg.path = path;
    let model = backbone(name, &cfg, vb).map_err(candle_core::Error::wrap)?;
    let opt = AdamW::new(trainable_vars(&varmap), ParamsAdamW::default())?;
    Ok(Setup {
        model,
        opt,
        x: Tensor::randn(0f32, 1.0, (batch, 1, len), &dev)?,
        labels: Tensor::randn(0f32, 1.0, (batch, 3), &dev)?,
    })
}

fn train_step(s: &mut Setup) -> Result<()> {
    let theta = s.model.forward_t(&s.x, true)?;
    let loss = diag_gaussian_nll(&theta, &s.labels)?;
    s.opt.backward_step(&loss)
}

fn eval_forward(s: &Setup) -> Result<Vec<Vec<f32>>> {
    s.model.forward_t(&s.x, false)?.to_vec2()
}

fn bench_backbones(c: &mut Criterion) {
    let batch = env_usize("STARFLOW_BENCH_BATCH", 64);
    let len = env_usize("STARFLOW_BENCH_LEN", 16384);
    let mut paths = vec![("fast", ComputePath::Fast)];
    if with_stock() {
        paths.push(("stock", ComputePath::Stock));
    }
    let reference = paired::Reference::new();
    for name in ["cnn", "tiny_cnn"] {
        let mut group = c.benchmark_group(format!("backbone/{name}"));
        group.throughput(Throughput::Elements(batch as u64));
        for (label, path) in &paths {
            let mut s = setup(name, *path, batch, len).expect("setup");
            group.bench_function(format!("train_step/{label}"), |b| {
                paired::iter(b, &reference, || train_step(&mut s).expect("train step"))
            });
            group.bench_function(format!("eval_forward/{label}"), |b| {
                paired::iter(b, &reference, || eval_forward(&s).expect("eval forward"))
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_backbones
}
