//! Both backbones against the naive f64 reference (`tests/common`): forward within 1e-4 and every
//! parameter gradient within 1e-3 (relative to the reference's largest entry), train and eval, batch 1 and
//! 3, odd lengths; running statistics; dropout determinism; construction errors.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use starflow_models::{
    backbone, buffer_vars, is_buffer, trainable_vars, BackboneConfig, ComputePath, ModelError,
    BN_MOMENTUM,
};

const N_PARAMS: usize = 6;
const SEED: u64 = 7;
/// Seed of the conv/linear weights in the comparisons (see `randomise_weights`).
const WEIGHT_SEED: u64 = 5;

fn build(
    kind: &str,
    len: usize,
    path: ComputePath,
    seed: u64,
) -> (VarMap, Box<dyn starflow_models::Backbone>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = BackboneConfig {
        n_params: N_PARAMS,
        input_len: len,
        dropout: 0.1,
        path,
        seed,
    };
    let model = backbone(kind, &cfg, vb).unwrap();
    (varmap, model)
}

fn blocks(kind: &str) -> Vec<RefBlock> {
    blocks_of(kind, 0.1)
}

fn check_against_reference(kind: &str, b: usize, len: usize, train: bool, path: ComputePath) {
    let (varmap, model) = build(kind, len, path, SEED);
    randomise_weights(&varmap, WEIGHT_SEED);
    randomise_bn(&varmap, 3);
    let params = params_of(&varmap);
    let x = randn(b * len, 11);
    let r = randn(b * N_PARAMS, 12);
    let masks = masks_for(&blocks(kind), SEED, b, len);
    let xt = tensor(&x, &[b, 1, len], DType::F32);
    let rt = tensor(&r, &[b, N_PARAMS], DType::F32);
    let y = model.forward_t(&xt, train).unwrap();
    assert_eq!(y.dims(), [b, N_PARAMS]);
    let want = reference(kind, &params, &x, b, len, N_PARAMS, train, &masks, Some(&r));
    let err = rel_err(&to_vec(&y), &want.y);
    assert!(
        err <= 1e-4,
        "{kind} b={b} len={len} train={train} {path:?}: forward rel err {err:e}"
    );

    // Running statistics after a training forward (PyTorch semantics).
    let after = params_of(&varmap);
    for (name, (mean, var, n)) in &want.stats {
        let m = BN_MOMENTUM;
        let old_m = &params[&format!("{name}.running_mean")];
        let old_v = &params[&format!("{name}.running_var")];
        let exp_m: Vec<f64> = old_m
            .iter()
            .zip(mean)
            .map(|(o, b)| (1.0 - m) * o + m * b)
            .collect();
        let unbias = *n as f64 / (*n as f64 - 1.0);
        let exp_v: Vec<f64> = old_v
            .iter()
            .zip(var)
            .map(|(o, b)| (1.0 - m) * o + m * b * unbias)
            .collect();
        assert!(
            rel_err(&after[&format!("{name}.running_mean")], &exp_m) < 1e-4,
            "{kind} {name} running mean"
        );
        assert!(
            rel_err(&after[&format!("{name}.running_var")], &exp_v) < 1e-4,
            "{kind} {name} running var"
        );
    }
    if !train {
        for (name, v) in &params {
            if is_buffer(name) {
                assert_eq!(&after[name], v, "eval must not touch {name}");
            }
        }
    }

    if path == ComputePath::Stock {
        // candle 0.11.1's CPU conv1d backward is wrong; only the forward of the stock path is checked.
        return;
    }
    let grads = (y * rt).unwrap().sum_all().unwrap().backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut n_checked = 0;
    for (name, var) in data.iter() {
        if is_buffer(name) {
            assert!(
                grads.get(var.as_tensor()).is_none(),
                "buffer {name} got a gradient"
            );
            continue;
        }
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{kind}: no gradient for {name}"));
        let err = rel_err(&to_vec(g), &want.grads[name]);
        assert!(
            err <= 1e-3,
            "{kind} b={b} len={len} train={train}: gradient of {name} rel err {err:e}"
        );
        n_checked += 1;
    }
    assert_eq!(n_checked, want.grads.len());
}

#[test]
fn cnn_matches_reference_train() {
    check_against_reference("cnn", 1, 127, true, ComputePath::Fast);
    check_against_reference("cnn", 3, 201, true, ComputePath::Fast);
}

#[test]
fn cnn_matches_reference_eval() {
    check_against_reference("cnn", 1, 127, false, ComputePath::Fast);
    check_against_reference("cnn", 3, 201, false, ComputePath::Fast);
}

#[test]
fn tiny_cnn_matches_reference_train() {
    check_against_reference("tiny_cnn", 1, 127, true, ComputePath::Fast);
    check_against_reference("tiny_cnn", 3, 201, true, ComputePath::Fast);
    // Long enough that both k5 layers (32 -> 32, 32 -> 64) take the Winograd kernels.
    check_against_reference("tiny_cnn", 2, 700, true, ComputePath::Fast);
}

#[test]
fn tiny_cnn_deep_matches_reference() {
    check_against_reference("tiny_cnn_deep", 2, 201, true, ComputePath::Fast);
    check_against_reference("tiny_cnn_deep", 2, 700, true, ComputePath::Fast);
    check_against_reference("tiny_cnn_deep", 3, 201, false, ComputePath::Fast);
}

#[test]
fn tiny_cnn_readout_matches_reference() {
    check_against_reference("tiny_cnn_readout", 2, 201, true, ComputePath::Fast);
    check_against_reference("tiny_cnn_readout", 3, 201, false, ComputePath::Fast);
}

#[test]
fn tiny_cnn_pool2_matches_reference() {
    check_against_reference("tiny_cnn_pool2", 2, 201, true, ComputePath::Fast);
    // Long enough that the k5 32 -> 32 layer takes the Winograd kernels at half the length.
    check_against_reference("tiny_cnn_pool2", 2, 1400, true, ComputePath::Fast);
    check_against_reference("tiny_cnn_pool2", 3, 201, false, ComputePath::Fast);
}

#[test]
fn tiny_cnn_wide_matches_reference() {
    // At 201 px both k5 64-channel layers (at 201 and 67 outputs) take the Winograd kernels.
    check_against_reference("tiny_cnn_wide", 2, 201, true, ComputePath::Fast);
    check_against_reference("tiny_cnn_wide", 3, 201, false, ComputePath::Fast);
}

#[test]
fn tiny_cnn_skip_matches_reference() {
    check_against_reference("tiny_cnn_skip", 2, 201, true, ComputePath::Fast);
    check_against_reference("tiny_cnn_skip", 3, 201, false, ComputePath::Fast);
}

#[test]
fn tiny_cnn_matches_reference_eval() {
    check_against_reference("tiny_cnn", 1, 127, false, ComputePath::Fast);
    check_against_reference("tiny_cnn", 3, 201, false, ComputePath::Fast);
}

#[test]
fn stock_path_forward_matches_reference() {
    for kind in ["cnn", "tiny_cnn"] {
        for train in [true, false] {
            check_against_reference(kind, 3, 157, train, ComputePath::Stock);
        }
    }
}

#[test]
fn reference_gradient_matches_finite_differences() {
    // The reference's hand-written backward against central differences of its own forward, on a few
    // entries of every parameter (train mode with dropout, batch 2). The small step keeps the chance of
    // stepping across a ReLU kink negligible.
    for kind in ["cnn", "tiny_cnn"] {
        let (b, len) = (2, 101);
        let (varmap, _model) = build(kind, len, ComputePath::Fast, SEED);
        randomise_weights(&varmap, WEIGHT_SEED);
        randomise_bn(&varmap, 5);
        let mut params = params_of(&varmap);
        let x = randn(b * len, 21);
        let r = randn(b * N_PARAMS, 22);
        let masks = masks_for(&blocks(kind), SEED, b, len);
        let want = reference(kind, &params, &x, b, len, N_PARAMS, true, &masks, Some(&r));
        let mut names: Vec<String> = want.grads.keys().cloned().collect();
        names.sort();
        for name in names {
            let n = params[&name].len();
            for idx in [0, n / 2, n - 1] {
                let mut v = params[&name].clone();
                let num = fd(&mut v, idx, 1e-7, |v| {
                    params.insert(name.clone(), v.to_vec());
                    let out = reference(kind, &params, &x, b, len, N_PARAMS, true, &masks, None);
                    out.y.iter().zip(&r).map(|(a, b)| a * b).sum()
                });
                params.insert(name.clone(), v);
                let ana = want.grads[&name][idx];
                let scale = want.grads[&name]
                    .iter()
                    .fold(1e-8f64, |m, g| m.max(g.abs()));
                assert!(
                    (num - ana).abs() <= 1e-5 * scale.max(1.0) + 1e-4 * scale,
                    "{kind} {name}[{idx}]: analytic {ana}, numeric {num}"
                );
            }
        }
    }
}

#[test]
fn dropout_masks_follow_the_seed() {
    let len = 131;
    let x = tensor(&randn(2 * len, 1), &[2, 1, len], DType::F32);
    let (_vm, model) = build("cnn", len, ComputePath::Fast, 1);
    let run = |seed: u64| {
        model.reseed_dropout(seed);
        to_vec(&model.forward_t(&x, true).unwrap())
    };
    let a = run(42);
    let b = run(42);
    let c = run(43);
    assert_eq!(a, b, "same seed, same masks");
    assert_ne!(a, c, "different seed, different masks");
    model.reseed_dropout(42);
    let _ = model.forward_t(&x, true).unwrap();
    let second = to_vec(&model.forward_t(&x, true).unwrap());
    assert_ne!(a, second, "consecutive training steps draw fresh masks");
    // Eval mode has no dropout: two calls agree.
    let e1 = to_vec(&model.forward_t(&x, false).unwrap());
    let e2 = to_vec(&model.forward_t(&x, false).unwrap());
    assert_eq!(e1, e2);
}

#[test]
fn buffers_are_split_from_trainable_vars() {
    let (varmap, _) = build("cnn", 200, ComputePath::Fast, 0);
    let buffers = buffer_vars(&varmap);
    assert_eq!(buffers.len(), 8);
    assert!(buffers.iter().all(|(n, _)| n.starts_with("bn")));
    // 6 convs + 4 BatchNorm affines + 3 linears, weight and bias each.
    assert_eq!(trainable_vars(&varmap).len(), 2 * (6 + 4 + 3));
    let (varmap, _) = build("tiny_cnn", 200, ComputePath::Fast, 0);
    assert_eq!(buffer_vars(&varmap).len(), 10);
    assert_eq!(trainable_vars(&varmap).len(), 2 * (6 + 5 + 3));
}

#[test]
fn construction_errors_name_the_problem() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = BackboneConfig::new(6, 16384);
    let err = backbone("resnet", &cfg, vb.clone()).unwrap_err();
    assert!(matches!(err, ModelError::UnknownBackbone { .. }));
    let msg = err.to_string();
    assert!(msg.contains("cnn") && msg.contains("tiny_cnn"), "{msg}");
    let err = backbone("cnn", &BackboneConfig::new(6, 50), vb).unwrap_err();
    assert!(matches!(err, ModelError::InputTooShort { .. }), "{err}");
}

#[test]
fn tiny_cnn_head_width_follows_the_length() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = starflow_models::tiny_cnn(&BackboneConfig::new(6, 16384), vb).unwrap();
    assert_eq!(
        model.final_len(),
        907,
        "the reference hard-codes 907 for 16384 pixels"
    );
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
}
