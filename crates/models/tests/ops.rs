//! The custom CPU ops on small sizes: forward against their stock-op `*_reference` twins, hand-written
//! backward against f64 central finite differences, dropout masks.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use starflow_models::dropout_mask;
use starflow_models::ops::block::{fused_block, fused_block_reference, BlockNorm, DropoutMask};
use starflow_models::ops::conv1d::{conv1d, conv1d_reference};
use starflow_models::ops::conv_block::conv_block;
use starflow_models::ops::trunk::{conv_trunk, TrunkStage};

const EPS: f64 = 1e-6;

/// Checks the gradient of `sum(f(inputs) * r)` for every element of every input against central
/// differences in f64.
fn check_fd(shapes: &[Vec<usize>], seed: u64, f: &dyn Fn(&[Tensor]) -> Tensor, what: &str) {
    let mut vals: Vec<Vec<f64>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| randn(s.iter().product(), seed + i as u64))
        .collect();
    let vars: Vec<Var> = vals
        .iter()
        .zip(shapes)
        .map(|(v, s)| Var::from_tensor(&tensor(v, s, DType::F64)).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let r = Tensor::from_vec(randn(y.elem_count(), seed + 100), y.shape(), &Device::Cpu).unwrap();
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let loss = |vals: &[Vec<f64>]| -> f64 {
        let ts: Vec<Tensor> = vals
            .iter()
            .zip(shapes)
            .map(|(v, s)| tensor(v, s, DType::F64))
            .collect();
        (f(&ts) * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    for (i, var) in vars.iter().enumerate() {
        let ana = to_vec(grads.get(var.as_tensor()).expect("gradient"));
        let mut num = vec![0.0; ana.len()];
        for (j, n) in num.iter_mut().enumerate() {
            let orig = vals[i][j];
            vals[i][j] = orig + EPS;
            let up = loss(&vals);
            vals[i][j] = orig - EPS;
            let down = loss(&vals);
            vals[i][j] = orig;
            *n = (up - down) / (2.0 * EPS);
        }
        let err = rel_err(&ana, &num);
        assert!(err < 1e-6, "{what}: input {i} gradient rel err {err:e}");
    }
}

#[test]
fn conv1d_forward_matches_stock() {
    for (b, c_in, l, c_out, k) in [
        (1, 1, 17, 4, 3),
        (3, 5, 23, 7, 3),
        (2, 4, 9, 3, 1),
        (2, 3, 12, 2, 5),
    ] {
        let x = tensor(&randn(b * c_in * l, 1), &[b, c_in, l], DType::F32);
        let w = tensor(&randn(c_out * c_in * k, 2), &[c_out, c_in, k], DType::F32);
        let bias = tensor(&randn(c_out, 3), &[c_out], DType::F32);
        let got = to_vec(&conv1d(&x, &w, &bias).unwrap());
        let want = to_vec(&conv1d_reference(&x, &w, &bias).unwrap());
        assert!(
            rel_err(&got, &want) < 1e-5,
            "conv1d {b} {c_in} {l} {c_out} {k}"
        );
    }
}

#[test]
fn conv1d_gradient_matches_finite_differences() {
    for (b, c_in, l, c_out, k) in [
        (1, 1, 11, 3, 3),
        (3, 3, 10, 4, 3),
        (2, 4, 7, 2, 1),
        (2, 2, 9, 3, 5),
    ] {
        check_fd(
            &[vec![b, c_in, l], vec![c_out, c_in, k], vec![c_out]],
            10,
            &|t| conv1d(&t[0], &t[1], &t[2]).unwrap(),
            &format!("conv1d b={b} c_in={c_in} l={l} c_out={c_out} k={k}"),
        );
    }
}

/// Forward and all three gradients of `sum(conv1d(x) * r)` in `dtype` against plain f64 loops: the
/// largest error relative to the largest reference value, per output (y, dx, dw, db).
fn conv1d_errors(
    dtype: DType,
    (b, c_in, l, c_out, k): (usize, usize, usize, usize, usize),
) -> [f64; 4] {
    let l_out = l + 1 - k;
    let (xs, ws, bs) = (
        randn(b * c_in * l, 21),
        randn(c_out * c_in * k, 22),
        randn(c_out, 23),
    );
    let r = randn(b * c_out * l_out, 24);
    let x = Var::from_tensor(&tensor(&xs, &[b, c_in, l], dtype)).unwrap();
    let w = Var::from_tensor(&tensor(&ws, &[c_out, c_in, k], dtype)).unwrap();
    let bias = Var::from_tensor(&tensor(&bs, &[c_out], dtype)).unwrap();
    let y = conv1d(x.as_tensor(), w.as_tensor(), bias.as_tensor()).unwrap();
    let rt = tensor(&r, &[b, c_out, l_out], dtype);
    let grads = (&y * &rt).unwrap().sum_all().unwrap().backward().unwrap();
    let (mut y_want, mut dx, mut dw) = (
        vec![0.0; b * c_out * l_out],
        vec![0.0; xs.len()],
        vec![0.0; ws.len()],
    );
    let mut db = vec![0.0; c_out];
    for i in 0..b {
        for co in 0..c_out {
            for t in 0..l_out {
                let o = (i * c_out + co) * l_out + t;
                let mut acc = bs[co];
                for ci in 0..c_in {
                    for j in 0..k {
                        let (xi, wi) = ((i * c_in + ci) * l + t + j, (co * c_in + ci) * k + j);
                        acc += ws[wi] * xs[xi];
                        dx[xi] += ws[wi] * r[o];
                        dw[wi] += xs[xi] * r[o];
                    }
                }
                y_want[o] = acc;
                db[co] += r[o];
            }
        }
    }
    let grad = |v: &Var| to_vec(grads.get(v.as_tensor()).expect("gradient"));
    [
        rel_err(&to_vec(&y), &y_want),
        rel_err(&grad(&x), &dx),
        rel_err(&grad(&w), &dw),
        rel_err(&grad(&bias), &db),
    ]
}

/// The direct kernels at lengths that span several of their 1,024-position tiles (the last one partial),
/// so the tile seams are covered; the last shape takes the one-input-channel kernels (256-position
/// blocks).
#[test]
fn conv1d_across_tiles_matches_plain_sums() {
    for shape in [
        (2, 3, 2100, 4, 5),
        (2, 2, 1030, 3, 3),
        (1, 3, 2049, 2, 1),
        (3, 1, 1100, 5, 5),
    ] {
        let errs = conv1d_errors(DType::F64, shape);
        assert!(errs.iter().all(|e| *e < 1e-12), "{shape:?}: {errs:?}");
    }
}

/// The Winograd kernels (k3 and k5 with at least 8 channels each side): more than one chunk of 256
/// tiles, a partial last tile, in f64 (exact up to rounding) and f32 (the training dtype, where the
/// transforms cost a few units of 1e-6).
#[test]
fn conv1d_winograd_matches_plain_sums() {
    for shape in [(2, 8, 1103, 9, 5), (1, 9, 1600, 8, 3), (2, 16, 70, 8, 5)] {
        let errs = conv1d_errors(DType::F64, shape);
        assert!(errs.iter().all(|e| *e < 1e-12), "f64 {shape:?}: {errs:?}");
        let errs = conv1d_errors(DType::F32, shape);
        assert!(errs.iter().all(|e| *e < 2e-5), "f32 {shape:?}: {errs:?}");
    }
}

#[test]
fn conv1d_non_contiguous_input() {
    let x = tensor(&randn(2 * 9 * 3, 4), &[2, 9, 3], DType::F32)
        .transpose(1, 2)
        .unwrap();
    let w = tensor(&randn(4 * 3 * 3, 5), &[4, 3, 3], DType::F32);
    let bias = tensor(&randn(4, 6), &[4], DType::F32);
    let got = to_vec(&conv1d(&x, &w, &bias).unwrap());
    let want = to_vec(&conv1d_reference(&x.contiguous().unwrap(), &w, &bias).unwrap());
    assert!(rel_err(&got, &want) < 1e-5);
}

/// The block configurations the backbones use, on an input `(b, c, l)`.
fn block_cases() -> Vec<(&'static str, bool, &'static str, bool, usize)> {
    // (name, relu, norm, dropout, pool)
    vec![
        ("relu-batchnorm-dropout-pool2", true, "batch", true, 2),
        ("relu-batchnorm-pool3", true, "batch", false, 3),
        ("relu-batchnorm-dropout", true, "batch", true, 1),
        ("relu-running-dropout-pool2", true, "running", true, 2),
        ("relu-dropout-pool2", true, "none", true, 2),
        ("dropout-global", false, "none", true, 0),
    ]
}

fn run_block(
    t: &[Tensor],
    relu: bool,
    norm: &str,
    mask: Option<&DropoutMask>,
    pool: usize,
    fast: bool,
) -> Tensor {
    let l = t[0].dim(2).unwrap();
    let pool = if pool == 0 { l } else { pool };
    let stats = [
        Tensor::new(&[0.1f64, -0.2, 0.3], &Device::Cpu).unwrap(),
        Tensor::new(&[0.5f64, 1.5, 2.0], &Device::Cpu).unwrap(),
    ];
    let norm = match norm {
        "batch" => BlockNorm::Batch {
            gamma: &t[1],
            beta: &t[2],
        },
        "running" => BlockNorm::Running {
            gamma: &t[1],
            beta: &t[2],
            mean: &stats[0],
            var: &stats[1],
        },
        _ => BlockNorm::None,
    };
    let f = if fast {
        fused_block
    } else {
        fused_block_reference
    };
    f(&t[0], norm, mask, relu, pool).unwrap().0
}

#[test]
fn fused_block_matches_reference_and_finite_differences() {
    for (b, l) in [(1, 13), (3, 11)] {
        let c = 3;
        let mask = DropoutMask {
            mask: Arc::new(dropout_mask(9, b * c, l, 0.3)),
            p: 0.3,
        };
        for (name, relu, norm, dropout, pool) in block_cases() {
            let mask = dropout.then_some(&mask);
            let shapes = [vec![b, c, l], vec![c], vec![c]];
            let t: Vec<Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| tensor(&randn(s.iter().product(), 30 + i as u64), s, DType::F64))
                .collect();
            let fast = to_vec(&run_block(&t, relu, norm, mask, pool, true));
            let stock = to_vec(&run_block(&t, relu, norm, mask, pool, false));
            let err = rel_err(&fast, &stock);
            assert!(
                err < 1e-10,
                "{name} b={b}: forward differs from reference by {err:e}"
            );
            let f32s: Vec<Tensor> = t.iter().map(|x| x.to_dtype(DType::F32).unwrap()).collect();
            let fast32 = to_vec(&run_block(&f32s, relu, norm, mask, pool, true));
            assert!(rel_err(&fast32, &stock) < 1e-5, "{name} b={b}: f32 forward");
            // The fused backward (gradients to z, gamma and beta) against finite differences.
            let n_inputs = if norm == "none" { 1 } else { 3 };
            check_fd(
                &shapes[..n_inputs],
                40,
                &|t| {
                    let mut t = t.to_vec();
                    while t.len() < 3 {
                        t.push(Tensor::ones(c, DType::F64, &Device::Cpu).unwrap());
                    }
                    run_block(&t, relu, norm, mask, pool, true)
                },
                &format!("fused block {name} b={b}"),
            );
        }
    }
}

#[test]
fn fused_block_returns_batch_statistics() {
    let (b, c, l) = (2, 3, 10);
    let z = tensor(&randn(b * c * l, 50), &[b, c, l], DType::F32);
    let gamma = Tensor::ones(c, DType::F32, &Device::Cpu).unwrap();
    let beta = Tensor::zeros(c, DType::F32, &Device::Cpu).unwrap();
    let norm = BlockNorm::Batch {
        gamma: &gamma,
        beta: &beta,
    };
    let (_, fast) = fused_block(&z, norm, None, true, 2).unwrap();
    let (_, stock) = fused_block_reference(&z, norm, None, true, 2).unwrap();
    let (fast, stock) = (fast.unwrap(), stock.unwrap());
    assert_eq!(fast.n, b * l);
    assert!(rel_err(&fast.mean, &stock.mean) < 1e-6);
    assert!(rel_err(&fast.var, &stock.var) < 1e-5);
}

#[test]
fn fused_block_large_magnitudes_stay_finite() {
    let (b, c, l) = (2, 3, 16);
    let z = (tensor(&randn(b * c * l, 60), &[b, c, l], DType::F32) * 1e6).unwrap();
    let gamma = Tensor::ones(c, DType::F32, &Device::Cpu).unwrap();
    let beta = Tensor::zeros(c, DType::F32, &Device::Cpu).unwrap();
    let norm = BlockNorm::Batch {
        gamma: &gamma,
        beta: &beta,
    };
    let y = fused_block(&z, norm, None, true, 2).unwrap().0;
    assert!(to_vec(&y).iter().all(|v| v.is_finite()));
}

#[test]
fn dropout_masks_are_seeded_and_thread_independent() {
    let a = dropout_mask(5, 64, 1000, 0.1);
    let b = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| dropout_mask(5, 64, 1000, 0.1));
    assert_eq!(a, b, "same seed, same mask, any thread count");
    assert_ne!(a, dropout_mask(6, 64, 1000, 0.1));
    let dropped = a.iter().filter(|&&m| m == 0).count() as f64 / a.len() as f64;
    assert!((dropped - 0.1).abs() < 0.01, "drop fraction {dropped}");
    assert!(dropout_mask(5, 4, 10, 0.0).iter().all(|&m| m == 1));
}

#[test]
fn conv_block_matches_composition_and_finite_differences() {
    // x, w, bias, gamma, beta; batch 1 and 3, odd lengths, each norm mode, with and without dropout.
    for (b, l, k) in [(1, 14, 3), (3, 11, 3), (2, 9, 1)] {
        let (c_in, c_out) = (2, 3);
        let l_out = l + 1 - k;
        let mask = DropoutMask {
            mask: Arc::new(dropout_mask(4, b * c_out, l_out, 0.25)),
            p: 0.25,
        };
        for (name, relu, norm, dropout, pool) in block_cases() {
            let mask = dropout.then_some(&mask);
            let pool_of = |l: usize| if pool == 0 { l } else { pool };
            let stats = [
                Tensor::new(&[0.1f64, -0.2, 0.3], &Device::Cpu).unwrap(),
                Tensor::new(&[0.5f64, 1.5, 2.0], &Device::Cpu).unwrap(),
            ];
            let f = |t: &[Tensor], fast: bool| -> Tensor {
                let norm = match norm {
                    "batch" => BlockNorm::Batch {
                        gamma: &t[3],
                        beta: &t[4],
                    },
                    "running" => BlockNorm::Running {
                        gamma: &t[3],
                        beta: &t[4],
                        mean: &stats[0],
                        var: &stats[1],
                    },
                    _ => BlockNorm::None,
                };
                if fast {
                    conv_block(&t[0], &t[1], &t[2], norm, mask, relu, pool_of(l_out))
                        .unwrap()
                        .0
                } else {
                    let z = conv1d_reference(&t[0], &t[1], &t[2]).unwrap();
                    fused_block_reference(&z, norm, mask, relu, pool_of(l_out))
                        .unwrap()
                        .0
                }
            };
            let shapes = [
                vec![b, c_in, l],
                vec![c_out, c_in, k],
                vec![c_out],
                vec![c_out],
                vec![c_out],
            ];
            let t: Vec<Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| tensor(&randn(s.iter().product(), 70 + i as u64), s, DType::F64))
                .collect();
            let err = rel_err(&to_vec(&f(&t, true)), &to_vec(&f(&t, false)));
            assert!(
                err < 1e-10,
                "conv block {name} b={b}: forward differs by {err:e}"
            );
            let n_inputs = if norm == "none" { 3 } else { 5 };
            check_fd(
                &shapes[..n_inputs],
                80,
                &|ts| {
                    let mut ts = ts.to_vec();
                    while ts.len() < 5 {
                        ts.push(Tensor::ones(c_out, DType::F64, &Device::Cpu).unwrap());
                    }
                    f(&ts, true)
                },
                &format!("conv block {name} b={b} k={k}"),
            );
        }
    }
}

#[test]
fn conv_block_without_gradients_matches() {
    // Plain (untracked) tensors take the no-graph path; the output must not change.
    let (b, c_in, l, c_out) = (2, 2, 12, 3);
    let x = tensor(&randn(b * c_in * l, 90), &[b, c_in, l], DType::F32);
    let w = tensor(&randn(c_out * c_in * 3, 91), &[c_out, c_in, 3], DType::F32);
    let bias = tensor(&randn(c_out, 92), &[c_out], DType::F32);
    let gamma = Tensor::ones(c_out, DType::F32, &Device::Cpu).unwrap();
    let beta = Tensor::zeros(c_out, DType::F32, &Device::Cpu).unwrap();
    let norm = BlockNorm::Batch {
        gamma: &gamma,
        beta: &beta,
    };
    let plain = conv_block(&x, &w, &bias, norm, None, true, 2).unwrap().0;
    let wv = Var::from_tensor(&w).unwrap();
    let tracked_block = || {
        conv_block(&x, wv.as_tensor(), &bias, norm, None, true, 2)
            .unwrap()
            .0
    };
    let weights_get_gradient = |y: &Tensor| {
        let grads = (y * 2.0).unwrap().sum_all().unwrap().backward().unwrap();
        grads.get(wv.as_tensor()).is_some()
    };
    let tracked = tracked_block();
    assert_eq!(to_vec(&plain), to_vec(&tracked));
    assert!(weights_get_gradient(&tracked));
    // Inside `inference` the same tracked weights take the no-graph path: the same output, and the
    // block is not part of any backward pass (its weights get no gradient at all).
    let inferred = starflow_models::ops::inference(tracked_block);
    assert_eq!(to_vec(&plain), to_vec(&inferred));
    assert!(!weights_get_gradient(&inferred));
    // And the flag is the caller's only for the closure.
    assert!(weights_get_gradient(&tracked_block()));
}

/// The three blocks the trunk tests chain: 1 -> 8 k5 (ReLU, BatchNorm, dropout), 8 -> 8 k5 pool 3
/// (ReLU, BatchNorm; Winograd's shape), 8 -> 4 k3 without ReLU or BatchNorm, global pool. Inputs are
/// `[x, w0, b0, γ0, β0, w1, b1, γ1, β1, w2, b2]`.
fn trunk_shapes(b: usize, l: usize) -> Vec<Vec<usize>> {
    vec![
        vec![b, 1, l],
        vec![8, 1, 5],
        vec![8],
        vec![8],
        vec![8],
        vec![8, 8, 5],
        vec![8],
        vec![8],
        vec![8],
        vec![4, 8, 3],
        vec![4],
    ]
}

/// Runs [`trunk_shapes`]' blocks on `t`, as one trunk op or chained fused blocks; returns the output
/// and each block's batch statistics.
fn run_trunk(
    t: &[Tensor],
    mask: &DropoutMask,
    fused: bool,
) -> (Tensor, Vec<Option<starflow_models::ops::block::BatchStats>>) {
    let l = t[0].dims()[2];
    let l2 = (l - 8) / 3 - 2;
    let norm = |g: usize| BlockNorm::Batch {
        gamma: &t[g],
        beta: &t[g + 1],
    };
    let stages = [
        TrunkStage {
            w: &t[1],
            bias: &t[2],
            norm: norm(3),
            dropout: Some(mask),
            relu: true,
            pool: 1,
        },
        TrunkStage {
            w: &t[5],
            bias: &t[6],
            norm: norm(7),
            dropout: None,
            relu: true,
            pool: 3,
        },
        TrunkStage {
            w: &t[9],
            bias: &t[10],
            norm: BlockNorm::None,
            dropout: None,
            relu: false,
            pool: l2,
        },
    ];
    if fused {
        return conv_trunk(&t[0], &stages).unwrap();
    }
    let mut h = t[0].clone();
    let mut stats = vec![];
    for s in &stages {
        let (y, st) = conv_block(&h, s.w, s.bias, s.norm, s.dropout, s.relu, s.pool).unwrap();
        h = y;
        stats.push(st);
    }
    (h, stats)
}

#[test]
fn trunk_equals_the_chained_blocks() {
    // The same kernels in the same order: the output, every gradient and the batch statistics are the
    // same numbers, in f32 (the training dtype) and f64.
    let (b, l) = (3, 40);
    let mask = DropoutMask {
        mask: Arc::new(dropout_mask(11, b * 8, l - 4, 0.2)),
        p: 0.2,
    };
    for dtype in [DType::F32, DType::F64] {
        let vars: Vec<Var> = trunk_shapes(b, l)
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let v = randn(s.iter().product(), 300 + i as u64);
                Var::from_tensor(&tensor(&v, s, dtype)).unwrap()
            })
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let r = tensor(&randn(b * 4, 399), &[b, 4, 1], dtype);
        let run = |fused: bool| {
            let (y, stats) = run_trunk(&ts, &mask, fused);
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g: Vec<Vec<f64>> = vars
                .iter()
                .map(|v| to_vec(grads.get(v.as_tensor()).expect("gradient")))
                .collect();
            (to_vec(&y), g, stats)
        };
        let (y_f, g_f, s_f) = run(true);
        let (y_c, g_c, s_c) = run(false);
        assert_eq!(y_f, y_c, "{dtype:?}: output");
        for (i, (a, c)) in g_f.iter().zip(&g_c).enumerate() {
            assert_eq!(a, c, "{dtype:?}: gradient of input {i}");
        }
        assert_eq!(s_f.len(), 3);
        for (a, c) in s_f.iter().zip(&s_c) {
            assert_eq!(a.as_ref().map(|s| &s.mean), c.as_ref().map(|s| &s.mean));
            assert_eq!(a.as_ref().map(|s| &s.var), c.as_ref().map(|s| &s.var));
        }
    }
}

#[test]
fn trunk_gradients_match_finite_differences() {
    let (b, l) = (2, 28);
    let mask = DropoutMask {
        mask: Arc::new(dropout_mask(12, b * 8, l - 4, 0.2)),
        p: 0.2,
    };
    check_fd(
        &trunk_shapes(b, l),
        500,
        &|t| run_trunk(t, &mask, true).0,
        "conv trunk",
    );
}
