//! Pins candle 0.11.1's wrong CPU conv1d backward.
//!
//! The stock CPU conv1d weight gradient disagrees with f64 finite differences for batch > 1 with more than
//! one output channel (the CPU backend copies a non-contiguous kernel and then multiplies with the original
//! strided one; upstream issues #3735/#3736, PR #3836). **When this test starts failing, candle has been
//! fixed**: the stock CPU path (`ComputePath::Stock`) can then be trusted for training again, and this test
//! should be turned into an agreement check.

mod common;

use candle_core::{DType, Tensor, Var};
use common::*;

#[test]
fn stock_candle_conv1d_weight_gradient_is_wrong_on_cpu() {
    let (b, c_in, l, c_out, k) = (2, 2, 9, 3, 3);
    let x = randn(b * c_in * l, 1);
    let mut w = randn(c_out * c_in * k, 2);
    let r = tensor(
        &randn(b * c_out * (l - k + 1), 3),
        &[b, c_out, l - k + 1],
        DType::F64,
    );
    let xt = tensor(&x, &[b, c_in, l], DType::F64);
    let loss = |w: &[f64]| -> f64 {
        let wt = tensor(w, &[c_out, c_in, k], DType::F64);
        (xt.conv1d(&wt, 0, 1, 1, 1).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let wv = Var::from_tensor(&tensor(&w, &[c_out, c_in, k], DType::F64)).unwrap();
    let y = xt.conv1d(wv.as_tensor(), 0, 1, 1, 1).unwrap();
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let stock = to_vec(grads.get(wv.as_tensor()).unwrap());
    let numeric: Vec<f64> = (0..w.len()).map(|i| fd(&mut w, i, 1e-6, loss)).collect();
    let err = rel_err(&stock, &numeric);
    assert!(
        err > 1e-2,
        "candle's CPU conv1d weight gradient now matches finite differences (rel err {err:e}): the bug is \
         fixed, the stock CPU path can be trusted again; update this test and the ComputePath::Stock docs"
    );
    // The fast op on the same problem is right.
    let fast = {
        let wv = Var::from_tensor(&tensor(&w, &[c_out, c_in, k], DType::F64)).unwrap();
        let bias = Tensor::zeros(c_out, DType::F64, &candle_core::Device::Cpu).unwrap();
        let y = starflow_models::ops::conv1d::conv1d(&xt, wv.as_tensor(), &bias).unwrap();
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        to_vec(g.get(wv.as_tensor()).unwrap())
    };
    assert!(rel_err(&fast, &numeric) < 1e-7);
}
