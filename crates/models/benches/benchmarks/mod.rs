//! Benchmark groups and their shared settings.

pub mod backbone;
pub mod ops;
#[path = "../../../flows/benches/common/paired.rs"]
pub mod paired;
pub mod reference;

use std::time::Duration;

use criterion::Criterion;

/// Small sample counts: every iteration here takes tenths of a second to seconds.
pub fn config() -> Criterion {
    starflow_models::tune_allocator();
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .without_plots()
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn with_stock() -> bool {
    std::env::var("STARFLOW_BENCH_STOCK").is_ok_and(|v| v == "1")
}
