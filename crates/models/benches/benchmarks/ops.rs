//! The fused ops alone on the first CNNModel block (the largest activations): fused conv+block forward and
//! forward+backward against the stock-op composition.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::{criterion_group, Criterion, Throughput};
use starflow_models::dropout_mask;
use starflow_models::ops::block::{fused_block_reference, BlockNorm, DropoutMask};
use starflow_models::ops::conv1d::conv1d_reference;
use starflow_models::ops::conv_block::conv_block;

use super::{config, env_usize, paired, with_stock};

struct Block {
    x: Tensor,
    w: Var,
    bias: Var,
    gamma: Var,
    beta: Var,
    mask: DropoutMask,
}

fn block(batch: usize, len: usize, c_in: usize, c_out: usize) -> Result<Block> {
    let dev = Device::Cpu;
    Ok(Block {
        x: Tensor::randn(0f32, 1.0, (batch, c_in, len), &dev)?,
        w: Var::from_tensor(&Tensor::randn(0f32, 0.3, (c_out, c_in, 3), &dev)?)?,
        bias: Var::from_tensor(&Tensor::zeros(c_out, DType::F32, &dev)?)?,
        gamma: Var::from_tensor(&Tensor::ones(c_out, DType::F32, &dev)?)?,
        beta: Var::from_tensor(&Tensor::zeros(c_out, DType::F32, &dev)?)?,
        mask: DropoutMask {
            mask: Arc::new(dropout_mask(1, batch * c_out, len - 2, 0.1)),
            p: 0.1,
        },
    })
}

fn run(b: &Block, fast: bool, backward: bool) -> Result<()> {
    let norm = BlockNorm::Batch {
        gamma: b.gamma.as_tensor(),
        beta: b.beta.as_tensor(),
    };
    let y = if fast {
        conv_block(
            &b.x,
            b.w.as_tensor(),
            b.bias.as_tensor(),
            norm,
            Some(&b.mask),
            true,
            2,
        )?
        .0
    } else {
        let z = conv1d_reference(&b.x, b.w.as_tensor(), b.bias.as_tensor())?;
        fused_block_reference(&z, norm, Some(&b.mask), true, 2)?.0
    };
    if backward {
        y.sum_all()?.backward()?;
    }
    Ok(())
}

fn bench_ops(c: &mut Criterion) {
    let reference = paired::Reference::new();
    let batch = env_usize("STARFLOW_BENCH_BATCH", 64);
    let len = env_usize("STARFLOW_BENCH_LEN", 16384);
    for (c_in, c_out, l) in [(1, 16, len), (16, 32, len / 2)] {
        let mut group = c.benchmark_group(format!("ops/conv_block_{c_in}x{c_out}"));
        group.throughput(Throughput::Elements((batch * c_out * l) as u64));
        let b = block(batch, l, c_in, c_out).expect("setup");
        let mut variants = vec![("fast", true)];
        if with_stock() {
            variants.push(("stock", false));
        }
        for (label, fast) in variants {
            group.bench_function(format!("forward/{label}"), |bn| {
                paired::iter(bn, &reference, || run(&b, fast, false).expect("forward"))
            });
            group.bench_function(format!("forward_backward/{label}"), |bn| {
                paired::iter(bn, &reference, || {
                    run(&b, fast, true).expect("forward+backward")
                })
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_ops
}
