//! The reference kernel alone (see `crates/flows/benches/common/paired.rs`), as an indication of this
//! machine's speed. In bench-check's paired mode every figure already includes it, so it is skipped.

use std::time::Duration;

use criterion::{criterion_group, Criterion};

use super::paired;

fn reference(c: &mut Criterion) {
    if paired::paired() {
        return;
    }
    let reference = paired::Reference::new();
    let mut group = c.benchmark_group("reference");
    group.bench_function("matmul_f32_256_models", |bn| bn.iter(|| reference.run()));
    group.finish();
}

criterion_group! {
    name = benches;
    // Sub-millisecond iterations: criterion's usual sample count, unlike the slow backbone groups.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots();
    targets = reference
}
