//! The reference kernel of `cargo xtask bench-check` and the paired measurement that uses it. Shared by
//! the flows and models benches (models includes this file by path) so both measure the same way.
//!
//! With `STARFLOW_BENCH_PAIRED=1` (set by bench-check) every criterion sample times the benchmark's
//! iterations, then runs the reference kernel, a fixed 256x256 f32 candle matmul, for about as long, and
//! reports `work time / reference time × NOMINAL` instead of the work time. Both halves of a pair run
//! within milliseconds of each other, so whatever slows the machine at that moment (a busy sibling core,
//! another build, a slower CPU) slows both and cancels in the ratio; a change in starflow's own code
//! moves only the work. A reference measured once per run cannot do that on a shared machine: we saw
//! ratios move by 50-100 % between runs minutes apart. Without the variable, benchmarks measure plain time.
//!
//! Never change the reference's size or values: the baseline's ratios assume them.

#![allow(dead_code)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use criterion::Bencher;

/// In paired mode criterion's "time" per iteration is (work / reference) × NOMINAL, so a reported
/// 1 ms means "as long as one reference matmul".
pub const NOMINAL: Duration = Duration::from_millis(1);

/// Whether bench-check asked for paired measurement.
pub fn paired() -> bool {
    std::env::var("STARFLOW_BENCH_PAIRED").is_ok_and(|v| v == "1")
}

/// The reference kernel: a 256x256 by 256x256 f32 matmul with fixed values (candle's CPU generator cannot
/// be seeded).
pub struct Reference {
    a: Tensor,
    b: Tensor,
}

impl Reference {
    pub fn new() -> Self {
        let dev = Device::Cpu;
        let a = Tensor::arange(0u32, 256 * 256, &dev)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| ((t * 1e-4)?.sin()?).reshape((256, 256)))
            .expect("reference a");
        let b = a.t().and_then(|t| t.contiguous()).expect("reference b");
        Reference { a, b }
    }

    pub fn run(&self) -> Tensor {
        self.a.matmul(&self.b).expect("reference matmul")
    }
}

/// `b.iter(work)`, or in paired mode the work's time as a multiple of the reference's (see the module
/// documentation).
pub fn iter<O>(b: &mut Bencher, reference: &Reference, mut work: impl FnMut() -> O) {
    if !paired() {
        b.iter(work);
        return;
    }
    b.iter_custom(|iters| {
        let start = Instant::now();
        for _ in 0..iters {
            black_box(work());
        }
        let w = start.elapsed();
        let start = Instant::now();
        let mut runs = 0u32;
        while runs == 0 || start.elapsed() < w {
            black_box(reference.run());
            runs += 1;
        }
        let r = start.elapsed().as_secs_f64() / f64::from(runs);
        NOMINAL.mul_f64(w.as_secs_f64() / r)
    });
}
