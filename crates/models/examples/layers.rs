//! Times each fused block of a backbone's trunk at its real shapes (forward, backward without and with
//! the input gradient) and TinyCNN's head, to see where a step goes.
//!
//! `cargo run --release -p starflow-models --example layers -- [cnn|tiny_cnn] [batch] [len] [repeats]`;
//! prints the median of `repeats` timings per line (after one warm-up).

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};
use starflow_models::dropout_mask;
use starflow_models::ops::block::{BlockNorm, DropoutMask};
use starflow_models::ops::conv1d::conv1d;
use starflow_models::ops::conv_block::conv_block;

/// One trunk block's shape: input and output channels, kernel width, pool window (0: global), BatchNorm,
/// ReLU, dropout probability.
#[derive(Clone, Copy)]
struct Shape {
    c_in: usize,
    c_out: usize,
    k: usize,
    pool: usize,
    bn: bool,
    relu: bool,
    p: f64,
}

/// The trunk shapes of `crate::cnn` and `crate::tiny_cnn` (dropout 0.1).
fn shapes(name: &str) -> Vec<Shape> {
    let s = |c_in, c_out, k, pool, bn, relu, p| Shape {
        c_in,
        c_out,
        k,
        pool,
        bn,
        relu,
        p,
    };
    match name {
        "tiny_cnn" => vec![
            s(1, 32, 5, 1, true, true, 0.1),
            s(32, 32, 5, 3, true, true, 0.1),
            s(32, 64, 5, 3, true, true, 0.1),
            s(64, 128, 1, 2, true, true, 0.1),
            s(128, 128, 3, 1, true, true, 0.2),
            s(128, 128, 1, 1, false, false, 0.2),
        ],
        _ => vec![
            s(1, 16, 3, 2, true, true, 0.1),
            s(16, 32, 3, 2, true, true, 0.1),
            s(32, 64, 3, 2, true, true, 0.1),
            s(64, 64, 3, 2, true, true, 0.1),
            s(64, 128, 3, 2, false, true, 0.1),
            s(128, 64, 1, 0, false, false, 0.1),
        ],
    }
}

/// Median wall time of `f` in milliseconds over `repeats` runs after one warm-up.
fn median_ms<T>(repeats: usize, f: impl Fn() -> Result<T>) -> Result<f64> {
    f()?;
    let mut ms = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t0 = Instant::now();
        f()?;
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Forward, forward + weight backward, and forward + full backward of one block; returns its output length.
fn time_block(s: Shape, b: usize, l: usize, repeats: usize, dev: &Device) -> Result<(usize, f64)> {
    let x_plain = Tensor::randn(0f32, 1.0, (b, s.c_in, l), dev)?;
    let x_var = Var::from_tensor(&x_plain)?;
    let bound = 1.0 / ((s.c_in * s.k) as f32).sqrt();
    let w = Var::from_tensor(&Tensor::randn(0f32, bound, (s.c_out, s.c_in, s.k), dev)?)?;
    let bias = Var::from_tensor(&Tensor::zeros(s.c_out, DType::F32, dev)?)?;
    let gamma = Var::from_tensor(&Tensor::ones(s.c_out, DType::F32, dev)?)?;
    let beta = Var::from_tensor(&Tensor::zeros(s.c_out, DType::F32, dev)?)?;
    let l_conv = l + 1 - s.k;
    let pool = if s.pool == 0 { l_conv } else { s.pool };
    let mask = DropoutMask {
        mask: Arc::new(dropout_mask(1, b * s.c_out, l_conv, s.p)),
        p: s.p,
    };
    let norm = || {
        if s.bn {
            BlockNorm::Batch {
                gamma: gamma.as_tensor(),
                beta: beta.as_tensor(),
            }
        } else {
            BlockNorm::None
        }
    };
    let run = |x: &Tensor| {
        conv_block(
            x,
            w.as_tensor(),
            bias.as_tensor(),
            norm(),
            Some(&mask),
            s.relu,
            pool,
        )
    };
    let y = run(&x_plain)?.0;
    let gy = y.ones_like()?;
    let fwd = median_ms(repeats, || run(&x_plain))?;
    let fwd_bwd_w = median_ms(repeats, || (run(&x_plain)?.0 * &gy)?.sum_all()?.backward())?;
    let fwd_bwd = median_ms(repeats, || {
        (run(x_var.as_tensor())?.0 * &gy)?.sum_all()?.backward()
    })?;
    let z = conv1d(&x_plain, w.as_tensor(), bias.as_tensor())?;
    let gz = z.ones_like()?;
    let conv = median_ms(repeats, || {
        conv1d(&x_plain, w.as_tensor(), bias.as_tensor())
    })?;
    let conv_w = median_ms(repeats, || {
        (conv1d(&x_plain, w.as_tensor(), bias.as_tensor())? * &gz)?
            .sum_all()?
            .backward()
    })?;
    let conv_x = median_ms(repeats, || {
        (conv1d(x_var.as_tensor(), w.as_tensor(), bias.as_tensor())? * &gz)?
            .sum_all()?
            .backward()
    })?;
    let gflop = 2.0 * (b * s.c_out * s.c_in * s.k * l_conv) as f64 / 1e9;
    println!(
        "{:>3}->{:<3} k{} l={:<6} pool {:<2} {:>5.2} GFLOP | fwd {:>7.1} ms  bwd(w) {:>7.1}  bwd(x) {:>7.1} | conv alone {:>6.1} {:>6.1} {:>6.1}",
        s.c_in,
        s.c_out,
        s.k,
        l,
        s.pool,
        gflop,
        fwd,
        fwd_bwd_w - fwd,
        fwd_bwd - fwd_bwd_w,
        conv,
        conv_w - conv,
        conv_x - conv_w
    );
    Ok((y.dim(2)?, fwd_bwd))
}

/// TinyCNN's head: the length-axis Linear, ReLU, flatten, Linear, ReLU, Linear (6 outputs).
fn time_tiny_head(b: usize, c: usize, l: usize, repeats: usize, dev: &Device) -> Result<f64> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let len_linear: Linear = candle_nn::linear(l, 32, vb.pp("len"))?;
    let linear1: Linear = candle_nn::linear(c * 32, 128, vb.pp("l1"))?;
    let output: Linear = candle_nn::linear(128, 6, vb.pp("out"))?;
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, l), dev)?)?;
    let forward = || -> Result<Tensor> {
        let t = len_linear
            .forward(&h.as_tensor().reshape((b * c, l))?)?
            .relu()?
            .reshape((b, c * 32))?;
        output.forward(&linear1.forward(&t)?.relu()?)
    };
    let fwd = median_ms(repeats, forward)?;
    let fwd_bwd = median_ms(repeats, || forward()?.sum_all()?.backward())?;
    println!(
        "head ({c} x {l} -> 32 -> 128 -> 6)                     | fwd {fwd:>7.1} ms  bwd    {:>7.1}",
        fwd_bwd - fwd
    );
    Ok(fwd_bwd)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().cloned().unwrap_or_else(|| "cnn".into());
    let num =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (b, mut l, repeats) = (num(1, 64), num(2, 16384), num(3, 3));
    starflow_models::tune_allocator();
    let dev = Device::Cpu;
    println!(
        "{name}, batch {b}, length {l}, median of {repeats}, {} threads",
        rayon::current_num_threads()
    );
    let mut total = 0.0;
    let shapes = shapes(&name);
    for s in &shapes {
        let (l_next, ms) = time_block(*s, b, l, repeats, &dev)?;
        total += ms;
        l = l_next;
    }
    if name == "tiny_cnn" {
        total += time_tiny_head(b, shapes[shapes.len() - 1].c_out, l, repeats, &dev)?;
    }
    println!("sum of forward + backward: {total:.1} ms");
    Ok(())
}
