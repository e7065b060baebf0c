//! Criterion benchmarks of the backbones and the fused CPU ops.
//!
//! Sizes come from the environment so that quick runs stay quick: `STARFLOW_BENCH_BATCH` (default 64),
//! `STARFLOW_BENCH_LEN` (default 16384). The stock-candle path, which takes ~15 s per CNNModel training step
//! on a 2-core machine, runs only with `STARFLOW_BENCH_STOCK=1`; `cargo xtask bench` sets it and reports
//! each fast figure as a ratio to the stock one of the same run. Thread count: rayon's default (set
//! `RAYON_NUM_THREADS=2` to pin it).

mod benchmarks;

criterion::criterion_main!(
    benchmarks::reference::benches,
    benchmarks::backbone::benches,
    benchmarks::ops::benches
);
