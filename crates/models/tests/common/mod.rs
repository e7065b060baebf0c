//! Shared test helpers: a naive f64 reference implementation of both backbones with a hand-written
//! backward (plain loops, obviously right and slow), parameter access, and finite differences.
//!
//! The reference restates the architectures from the PyTorch reference independently of the crate's block
//! tables, so that a wrong block table is caught too.

#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use starflow_models::{dropout_mask, BN_EPS};

/// Parameters by name, as flat f64 vectors.
pub type Params = HashMap<String, Vec<f64>>;

pub fn params_of(varmap: &VarMap) -> Params {
    let data = varmap.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| {
            let t = v
                .as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap();
            (k.clone(), t.to_vec1::<f64>().unwrap())
        })
        .collect()
}

/// Overwrites every convolution and linear weight and bias with seeded values, uniform in
/// +-1/sqrt(fan_in) like PyTorch's default. candle's CPU initialiser cannot be seeded, and with
/// unseeded weights an f32-vs-f64 comparison fails now and then (a cancelling gradient sum), so
/// the tests would be flaky.
pub fn randomise_weights(varmap: &VarMap, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        if name.contains("bn") || is_tiny_bn(name) || name.contains("running_") {
            continue;
        }
        let prefix = name.rsplit_once('.').map(|(p, _)| p).unwrap_or(name);
        let Some(w) = data.get(&format!("{prefix}.weight")) else {
            continue;
        };
        if w.rank() < 2 {
            continue;
        }
        let fan_in: usize = w.dims()[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt();
        let var = &data[name];
        let v: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        var.set(
            &Tensor::from_vec(v, var.shape(), var.device())
                .unwrap()
                .to_dtype(var.dtype())
                .unwrap(),
        )
        .unwrap();
    }
}

/// Overwrites BatchNorm parameters and buffers with random values so that every path is exercised.
pub fn randomise_bn(varmap: &VarMap, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let n = var.elem_count();
        let (lo, hi) = if name.ends_with("running_var") {
            (0.5, 2.0)
        } else if name.ends_with("running_mean") {
            (-0.5, 0.5)
        } else if name.contains("bn") || is_tiny_bn(name) {
            if name.ends_with("weight") {
                (0.5, 1.5)
            } else {
                (-0.5, 0.5)
            }
        } else {
            continue;
        };
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi) as f32).collect();
        var.set(
            &Tensor::from_vec(v, var.shape(), var.device())
                .unwrap()
                .to_dtype(var.dtype())
                .unwrap(),
        )
        .unwrap();
    }
}

fn is_tiny_bn(name: &str) -> bool {
    [
        "model.2.",
        "model.6.",
        "model.11.",
        "model.16.",
        "model.21.",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

pub fn randn(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            // Box-Muller.
            let u1: f64 = rng.random_range(1e-12..1.0);
            let u2: f64 = rng.random::<f64>();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

pub fn tensor(v: &[f64], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `max |a - b| / max |b|` (relative to the reference's scale).
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[derive(Clone, Copy, Debug)]
pub enum RefPool {
    Window(usize),
    Global,
}

#[derive(Clone, Debug)]
pub struct RefBlock {
    pub conv: &'static str,
    pub bn: Option<&'static str>,
    pub c_out: usize,
    pub k: usize,
    pub relu: bool,
    pub p: f64,
    pub pool: RefPool,
}

pub fn cnn_blocks(p: f64) -> Vec<RefBlock> {
    let b = |conv, bn, c_out, k, relu, pool| RefBlock {
        conv,
        bn,
        c_out,
        k,
        relu,
        p,
        pool,
    };
    vec![
        b("conv1", Some("bn1"), 16, 3, true, RefPool::Window(2)),
        b("conv2", Some("bn2"), 32, 3, true, RefPool::Window(2)),
        b("conv3", Some("bn3"), 64, 3, true, RefPool::Window(2)),
        b("conv4", Some("bn4"), 64, 3, true, RefPool::Window(2)),
        b("conv5", None, 128, 3, true, RefPool::Window(2)),
        b("conv6", None, 64, 1, false, RefPool::Global),
    ]
}

pub fn tiny_blocks(p: f64) -> Vec<RefBlock> {
    let b = |conv, bn, c_out, k, relu, p, pool| RefBlock {
        conv,
        bn,
        c_out,
        k,
        relu,
        p,
        pool: RefPool::Window(pool),
    };
    vec![
        b("model.0", Some("model.2"), 32, 5, true, p, 1),
        b("model.4", Some("model.6"), 32, 5, true, p, 3),
        b("model.9", Some("model.11"), 64, 5, true, p, 3),
        b("model.14", Some("model.16"), 128, 1, true, p, 2),
        b("model.19", Some("model.21"), 128, 3, true, 2.0 * p, 1),
        b("model.23", None, 128, 1, false, 2.0 * p, 1),
    ]
}

/// TinyCNN with two more k3 128 -> 128 blocks before its last (`tiny_cnn_deep`).
pub fn tiny_deep_blocks(p: f64) -> Vec<RefBlock> {
    let mut blocks = tiny_blocks(p);
    let last = blocks.pop().unwrap();
    for (conv, bn) in [("deep.0.conv", "deep.0.bn"), ("deep.1.conv", "deep.1.bn")] {
        let prev = blocks[blocks.len() - 1].clone();
        blocks.push(RefBlock {
            conv,
            bn: Some(bn),
            ..prev
        });
    }
    blocks.push(last);
    blocks
}

/// TinyCNN with its first block pooled by 2 (`tiny_cnn_pool2`).
pub fn tiny_pool2_blocks(p: f64) -> Vec<RefBlock> {
    let mut blocks = tiny_blocks(p);
    blocks[0].pool = RefPool::Window(2);
    blocks
}

/// TinyCNN with 64 channels in its first three blocks (`tiny_cnn_wide`).
pub fn tiny_wide_blocks(p: f64) -> Vec<RefBlock> {
    let mut blocks = tiny_blocks(p);
    blocks[0].c_out = 64;
    blocks[1].c_out = 64;
    blocks
}

/// The blocks of backbone `kind` with base dropout `p`.
pub fn blocks_of(kind: &str, p: f64) -> Vec<RefBlock> {
    match kind {
        "cnn" => cnn_blocks(p),
        "tiny_cnn" | "tiny_cnn_readout" | "tiny_cnn_skip" => tiny_blocks(p),
        "tiny_cnn_deep" => tiny_deep_blocks(p),
        "tiny_cnn_pool2" => tiny_pool2_blocks(p),
        "tiny_cnn_wide" => tiny_wide_blocks(p),
        other => panic!("no reference for {other}"),
    }
}

/// The dropout masks a backbone built with `seed` uses in its first training forward.
pub fn masks_for(blocks: &[RefBlock], seed: u64, b: usize, len: usize) -> Vec<Option<Vec<u8>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut l = len;
    blocks
        .iter()
        .map(|blk| {
            let s = rng.next_u64();
            let lz = l + 1 - blk.k;
            l = match blk.pool {
                RefPool::Window(w) => lz / w,
                RefPool::Global => 1,
            };
            (blk.p > 0.0).then(|| dropout_mask(s, b * blk.c_out, lz, blk.p))
        })
        .collect()
}

/// Activation `(b, c, l)`.
#[derive(Clone, Debug)]
struct Act {
    c: usize,
    l: usize,
    v: Vec<f64>,
}

struct BlockCache {
    x: Act,
    z: Vec<f64>,
    lz: usize,
    xhat: Vec<f64>,
    inv_std: Vec<f64>,
    pool: usize,
}

pub struct RefOut {
    pub y: Vec<f64>,
    pub grads: HashMap<String, Vec<f64>>,
    /// BatchNorm name -> (batch mean, biased batch var, n).
    pub stats: HashMap<String, (Vec<f64>, Vec<f64>, usize)>,
}

fn linear_fwd(x: &[f64], n: usize, i: usize, w: &[f64], bias: &[f64], o: usize) -> Vec<f64> {
    let mut y = vec![0.0; n * o];
    for r in 0..n {
        for oo in 0..o {
            let mut acc = bias[oo];
            for ii in 0..i {
                acc += w[oo * i + ii] * x[r * i + ii];
            }
            y[r * o + oo] = acc;
        }
    }
    y
}

/// Returns `(dx, dw, db)`.
fn linear_bwd(
    x: &[f64],
    n: usize,
    i: usize,
    w: &[f64],
    o: usize,
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dx = vec![0.0; n * i];
    let mut dw = vec![0.0; o * i];
    let mut db = vec![0.0; o];
    for r in 0..n {
        for oo in 0..o {
            let g = dy[r * o + oo];
            db[oo] += g;
            for ii in 0..i {
                dw[oo * i + ii] += g * x[r * i + ii];
                dx[r * i + ii] += g * w[oo * i + ii];
            }
        }
    }
    (dx, dw, db)
}

fn relu_mask(v: &mut [f64], pre: &[f64]) {
    for (g, &p) in v.iter_mut().zip(pre) {
        if p <= 0.0 {
            *g = 0.0;
        }
    }
}

/// Runs the reference backbone `kind` ("cnn" or "tiny_cnn") on `x (b, 1, len)`; with `dy` also the
/// gradient of `sum(y * dy)` with respect to every parameter.
#[allow(clippy::too_many_arguments)]
pub fn reference(
    kind: &str,
    params: &Params,
    x: &[f64],
    b: usize,
    len: usize,
    n_params: usize,
    train: bool,
    masks: &[Option<Vec<u8>>],
    dy: Option<&[f64]>,
) -> RefOut {
    let blocks = blocks_of(kind, 0.0);
    let p_of: Vec<f64> = blocks_of(kind, 0.1).iter().map(|blk| blk.p).collect();
    let get = |n: &str| -> &Vec<f64> { params.get(n).unwrap_or_else(|| panic!("missing {n}")) };
    let mut h = Act {
        c: 1,
        l: len,
        v: x.to_vec(),
    };
    let mut caches = vec![];
    let mut stats = HashMap::new();
    for (bi, blk) in blocks.iter().enumerate() {
        let w = get(&format!("{}.weight", blk.conv));
        let bias = get(&format!("{}.bias", blk.conv));
        let (ci, co, k) = (h.c, blk.c_out, blk.k);
        let lz = h.l + 1 - k;
        let mut z = vec![0.0; b * co * lz];
        for i in 0..b {
            for o in 0..co {
                for t in 0..lz {
                    let mut acc = bias[o];
                    for c in 0..ci {
                        for j in 0..k {
                            acc += w[(o * ci + c) * k + j] * h.v[(i * ci + c) * h.l + t + j];
                        }
                    }
                    z[(i * co + o) * lz + t] = acc;
                }
            }
        }
        let mut y: Vec<f64> = z
            .iter()
            .map(|&v| if blk.relu { v.max(0.0) } else { v })
            .collect();
        let mut xhat = vec![];
        let mut inv_std = vec![];
        if let Some(bn) = blk.bn {
            let gamma = get(&format!("{bn}.weight"));
            let beta = get(&format!("{bn}.bias"));
            let n = (b * lz) as f64;
            let (mean, var): (Vec<f64>, Vec<f64>) = if train {
                let mut mean = vec![0.0; co];
                let mut var = vec![0.0; co];
                for o in 0..co {
                    for i in 0..b {
                        for t in 0..lz {
                            mean[o] += y[(i * co + o) * lz + t] / n;
                        }
                    }
                    for i in 0..b {
                        for t in 0..lz {
                            var[o] += (y[(i * co + o) * lz + t] - mean[o]).powi(2) / n;
                        }
                    }
                }
                stats.insert(bn.to_string(), (mean.clone(), var.clone(), b * lz));
                (mean, var)
            } else {
                (
                    get(&format!("{bn}.running_mean")).clone(),
                    get(&format!("{bn}.running_var")).clone(),
                )
            };
            inv_std = var.iter().map(|v| 1.0 / (v + BN_EPS).sqrt()).collect();
            xhat = vec![0.0; y.len()];
            for i in 0..b {
                for o in 0..co {
                    for t in 0..lz {
                        let idx = (i * co + o) * lz + t;
                        xhat[idx] = (y[idx] - mean[o]) * inv_std[o];
                        y[idx] = gamma[o] * xhat[idx] + beta[o];
                    }
                }
            }
        }
        if train {
            if let Some(m) = &masks[bi] {
                let s = 1.0 / (1.0 - p_of[bi]);
                for (v, &keep) in y.iter_mut().zip(m) {
                    *v *= f64::from(keep) * s;
                }
            }
        }
        let pool = match blk.pool {
            RefPool::Window(w) => w,
            RefPool::Global => lz,
        };
        let lp = lz / pool;
        let mut out = vec![0.0; b * co * lp];
        for r in 0..b * co {
            for j in 0..lp {
                for q in 0..pool {
                    out[r * lp + j] += y[r * lz + j * pool + q] / pool as f64;
                }
            }
        }
        caches.push(BlockCache {
            x: h.clone(),
            z,
            lz,
            xhat,
            inv_std,
            pool,
        });
        h = Act {
            c: co,
            l: lp,
            v: out,
        };
    }

    // Heads.
    let mut grads: HashMap<String, Vec<f64>> = HashMap::new();
    let y;
    let dh: Option<Vec<f64>>;
    if kind == "cnn" {
        let f = h.c * h.l;
        let (w1, b1) = (get("linear1.weight"), get("linear1.bias"));
        let (w2, b2) = (get("linear2.weight"), get("linear2.bias"));
        let (w3, b3) = (get("output_layer.weight"), get("output_layer.bias"));
        let a1 = linear_fwd(&h.v, b, f, w1, b1, 64);
        let r1: Vec<f64> = a1.iter().map(|v| v.max(0.0)).collect();
        let a2 = linear_fwd(&r1, b, 64, w2, b2, 128);
        let r2: Vec<f64> = a2.iter().map(|v| v.max(0.0)).collect();
        y = linear_fwd(&r2, b, 128, w3, b3, n_params);
        dh = dy.map(|dy| {
            let (mut dr2, dw3, db3) = linear_bwd(&r2, b, 128, w3, n_params, dy);
            relu_mask(&mut dr2, &a2);
            let (mut dr1, dw2, db2) = linear_bwd(&r1, b, 64, w2, 128, &dr2);
            relu_mask(&mut dr1, &a1);
            let (dh, dw1, db1) = linear_bwd(&h.v, b, f, w1, 64, &dr1);
            for (n, g) in [
                ("output_layer.weight", dw3),
                ("output_layer.bias", db3),
                ("linear2.weight", dw2),
                ("linear2.bias", db2),
                ("linear1.weight", dw1),
                ("linear1.bias", db1),
            ] {
                grads.insert(n.to_string(), g);
            }
            dh
        });
    } else {
        let (c, l) = (h.c, h.l);
        let (wl, bl) = (get("model.25.weight"), get("model.25.bias"));
        // Width of the length-axis readout: 32 (the reference's), 96 in `tiny_cnn_readout`.
        let nf = wl.len() / l;
        let (w1, b1) = (get("model.28.weight"), get("model.28.bias"));
        let (w2, b2) = (get("model.30.weight"), get("model.30.bias"));
        let a0 = linear_fwd(&h.v, b * c, l, wl, bl, nf);
        let r0: Vec<f64> = a0.iter().map(|v| v.max(0.0)).collect();
        // `tiny_cnn_skip`: a Linear from the input pixels, joined after each star's trunk features.
        let skip = params
            .get("skip.weight")
            .map(|ws| (ws, get("skip.bias"), ws.len() / len));
        let ns = skip.map_or(0, |s| s.2);
        let s_out = skip.map(|(ws, bs, ns)| linear_fwd(x, b, len, ws, bs, ns));
        let (nt, nj) = (c * nf, c * nf + ns);
        let joined: Vec<f64> = (0..b)
            .flat_map(|i| {
                let tail = s_out.as_ref().map_or(&[][..], |s| &s[i * ns..(i + 1) * ns]);
                r0[i * nt..(i + 1) * nt].iter().chain(tail).copied()
            })
            .collect();
        let a1 = linear_fwd(&joined, b, nj, w1, b1, 128);
        let r1: Vec<f64> = a1.iter().map(|v| v.max(0.0)).collect();
        y = linear_fwd(&r1, b, 128, w2, b2, n_params);
        dh = dy.map(|dy| {
            let (mut dr1, dw2, db2) = linear_bwd(&r1, b, 128, w2, n_params, dy);
            relu_mask(&mut dr1, &a1);
            let (djoined, dw1, db1) = linear_bwd(&joined, b, nj, w1, 128, &dr1);
            let mut dr0: Vec<f64> = (0..b)
                .flat_map(|i| djoined[i * nj..i * nj + nt].iter().copied())
                .collect();
            if let Some((ws, _, ns)) = skip {
                let ds: Vec<f64> = (0..b)
                    .flat_map(|i| djoined[i * nj + nt..(i + 1) * nj].iter().copied())
                    .collect();
                let (_, dws, dbs) = linear_bwd(x, b, len, ws, ns, &ds);
                grads.insert("skip.weight".to_string(), dws);
                grads.insert("skip.bias".to_string(), dbs);
            }
            relu_mask(&mut dr0, &a0);
            let (dh, dwl, dbl) = linear_bwd(&h.v, b * c, l, wl, nf, &dr0);
            for (n, g) in [
                ("model.30.weight", dw2),
                ("model.30.bias", db2),
                ("model.28.weight", dw1),
                ("model.28.bias", db1),
                ("model.25.weight", dwl),
                ("model.25.bias", dbl),
            ] {
                grads.insert(n.to_string(), g);
            }
            dh
        });
    }

    if let Some(mut dh) = dh {
        for (bi, blk) in blocks.iter().enumerate().rev() {
            let cache = &caches[bi];
            let (ci, co, k, lz, pool) = (cache.x.c, blk.c_out, blk.k, cache.lz, cache.pool);
            let lp = lz / pool;
            // Through the pool.
            let mut dy_ = vec![0.0; b * co * lz];
            for r in 0..b * co {
                for j in 0..lp {
                    for q in 0..pool {
                        dy_[r * lz + j * pool + q] = dh[r * lp + j] / pool as f64;
                    }
                }
            }
            // Through dropout.
            if train {
                if let Some(m) = &masks[bi] {
                    let s = 1.0 / (1.0 - p_of[bi]);
                    for (g, &keep) in dy_.iter_mut().zip(m) {
                        *g *= f64::from(keep) * s;
                    }
                }
            }
            // Through BatchNorm.
            let mut dr = dy_.clone();
            if let Some(bn) = blk.bn {
                let gamma = get(&format!("{bn}.weight"));
                let mut dgamma = vec![0.0; co];
                let mut dbeta = vec![0.0; co];
                let n = (b * lz) as f64;
                for o in 0..co {
                    let (mut sum_dxhat, mut sum_dxhat_xhat) = (0.0, 0.0);
                    for i in 0..b {
                        for t in 0..lz {
                            let idx = (i * co + o) * lz + t;
                            dgamma[o] += dy_[idx] * cache.xhat[idx];
                            dbeta[o] += dy_[idx];
                            let dxhat = dy_[idx] * gamma[o];
                            sum_dxhat += dxhat;
                            sum_dxhat_xhat += dxhat * cache.xhat[idx];
                        }
                    }
                    for i in 0..b {
                        for t in 0..lz {
                            let idx = (i * co + o) * lz + t;
                            let dxhat = dy_[idx] * gamma[o];
                            dr[idx] = if train {
                                cache.inv_std[o] / n
                                    * (n * dxhat - sum_dxhat - cache.xhat[idx] * sum_dxhat_xhat)
                            } else {
                                dxhat * cache.inv_std[o]
                            };
                        }
                    }
                }
                grads.insert(format!("{bn}.weight"), dgamma);
                grads.insert(format!("{bn}.bias"), dbeta);
            }
            // Through ReLU.
            if blk.relu {
                relu_mask(&mut dr, &cache.z);
            }
            // Through the convolution.
            let w = get(&format!("{}.weight", blk.conv));
            let li = cache.x.l;
            let mut dx = vec![0.0; b * ci * li];
            let mut dw = vec![0.0; co * ci * k];
            let mut db = vec![0.0; co];
            for i in 0..b {
                for o in 0..co {
                    for t in 0..lz {
                        let g = dr[(i * co + o) * lz + t];
                        db[o] += g;
                        for c in 0..ci {
                            for j in 0..k {
                                dw[(o * ci + c) * k + j] +=
                                    g * cache.x.v[(i * ci + c) * li + t + j];
                                dx[(i * ci + c) * li + t + j] += g * w[(o * ci + c) * k + j];
                            }
                        }
                    }
                }
            }
            grads.insert(format!("{}.weight", blk.conv), dw);
            grads.insert(format!("{}.bias", blk.conv), db);
            dh = dx;
        }
    }
    RefOut { y, grads, stats }
}

/// Central finite difference of `f` with respect to element `idx` of `v`.
pub fn fd(v: &mut [f64], idx: usize, eps: f64, mut f: impl FnMut(&[f64]) -> f64) -> f64 {
    let orig = v[idx];
    v[idx] = orig + eps;
    let up = f(v);
    v[idx] = orig - eps;
    let down = f(v);
    v[idx] = orig;
    (up - down) / (2.0 * eps)
}
