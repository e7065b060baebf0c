//! Criterion benchmarks for the numbers issue #3 asks for, on batch 64 like the reference
//! baselines (`reference/baselines.md`: log_prob fwd+bwd 0.63 / 1.36 / 8.1 ms, posterior
//! summary from 1000 samples x 64 stars 0.33 / 0.34 / 6.9 s).
//!
//! Run: `cargo bench -p starflow-flows -- --warm-up-time 1 --measurement-time 3`.

#[path = "common/paired.rs"]
mod paired;

use std::time::Duration;

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use starflow_flows::{flow_by_name, FLOW_NAMES};

const BATCH: usize = 64;

fn randn(rng: &mut ChaCha8Rng, shape: (usize, usize), std: f64) -> Tensor {
    let v: Vec<f64> = (0..shape.0 * shape.1)
        .map(|_| std * rng.sample::<f64, _>(StandardNormal))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// The reference kernel alone (see `common/paired.rs`), as an indication of this machine's speed. In
/// bench-check's paired mode every figure already includes it, so it is skipped.
fn reference(c: &mut Criterion) {
    if paired::paired() {
        return;
    }
    let reference = paired::Reference::new();
    let mut group = c.benchmark_group("reference");
    group.bench_function("matmul_f32_256_flows", |bn| bn.iter(|| reference.run()));
    group.finish();
}

fn log_prob_fwd_bwd(c: &mut Criterion) {
    let reference = paired::Reference::new();
    let mut group = c.benchmark_group("log_prob_fwd_bwd_b64");
    group.throughput(Throughput::Elements(BATCH as u64));
    for name in FLOW_NAMES {
        let flow = flow_by_name(name, 3).expect("flow");
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let params =
            Var::from_tensor(&randn(&mut rng, (BATCH, flow.n_params()), 0.5)).expect("var");
        let x = randn(&mut rng, (BATCH, 3), 1.5);
        group.bench_function(name, |b| {
            paired::iter(b, &reference, || {
                let lp = flow.log_prob(params.as_tensor(), &x).expect("log_prob");
                lp.sum_all().expect("sum").backward().expect("backward")
            })
        });
    }
    group.finish();
}

fn posterior_summary(c: &mut Criterion) {
    let reference = paired::Reference::new();
    let mut group = c.benchmark_group("summary_1000x64");
    group.sample_size(10);
    group.throughput(Throughput::Elements((BATCH * 1000) as u64));
    for name in FLOW_NAMES {
        let flow = flow_by_name(name, 3).expect("flow");
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let params = randn(&mut rng, (BATCH, flow.n_params()), 0.5);
        group.bench_function(name, |b| {
            paired::iter(b, &reference, || {
                flow.summarize(&params, 1000, &mut rng).expect("summary")
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = reference, log_prob_fwd_bwd, posterior_summary
}
criterion_main!(benches);
