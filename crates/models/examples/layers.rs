//! Times each custom op of the CNNModel trunk at batch 64 (forward and backward), to see where a step goes.
//!
//! `cargo run --release -p starflow-models --example layers -- [batch] [len]`.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use starflow_models::dropout_mask;
use starflow_models::ops::block::{fused_block, BlockNorm, DropoutMask};
use starflow_models::ops::conv1d::conv1d;

fn time<T>(what: &str, f: impl Fn() -> Result<T>) -> Result<T> {
    let _ = f()?;
    let t0 = Instant::now();
    let out = f()?;
    println!("{what:<40} {:>8.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
    Ok(out)
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let b = args.first().copied().unwrap_or(64);
    let mut l = args.get(1).copied().unwrap_or(16384);
    let dev = Device::Cpu;
    for (c_in, c_out) in [(1, 16), (16, 32), (32, 64), (64, 64), (64, 128)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c_in, l), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (c_out, c_in, 3), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::zeros(c_out, DType::F32, &dev)?)?;
        let z = time(&format!("conv fwd {c_in}->{c_out} l={l}"), || {
            conv1d(x.as_tensor(), w.as_tensor(), bias.as_tensor())
        })?;
        let r = z.ones_like()?;
        time(&format!("conv fwd+bwd {c_in}->{c_out}"), || {
            let z = conv1d(x.as_tensor(), w.as_tensor(), bias.as_tensor())?;
            (z * &r)?.sum_all()?.backward()
        })?;
        let zv = Var::from_tensor(&z)?;
        let gamma = Var::from_tensor(&Tensor::ones(c_out, DType::F32, &dev)?)?;
        let beta = Var::from_tensor(&Tensor::zeros(c_out, DType::F32, &dev)?)?;
        let lz = l - 2;
        let mask = time("dropout mask", || {
            Ok(DropoutMask {
                mask: Arc::new(dropout_mask(1, b * c_out, lz, 0.1)),
                p: 0.1,
            })
        })?;
        let norm = BlockNorm::Batch {
            gamma: gamma.as_tensor(),
            beta: beta.as_tensor(),
        };
        let y = time("block fwd", || {
            fused_block(zv.as_tensor(), norm, Some(&mask), true, 2)
        })?
        .0;
        let ry = y.ones_like()?;
        time("block fwd+bwd", || {
            let y = fused_block(zv.as_tensor(), norm, Some(&mask), true, 2)?.0;
            (y * &ry)?.sum_all()?.backward()
        })?;
        l = lz / 2;
    }
    Ok(())
}
