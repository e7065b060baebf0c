//! Golden tests against the reference implementation (jammy_flows 1.1.0, float64).
//!
//! The fixtures in `tests/data` (see its README for provenance) hold 128 rows per flow: 64 with
//! parameters of std 0.5 and 64 "stress" rows with std 2.0. Tolerances, all stated per check:
//!
//! * `log_pdf`: `|ours - ref| <= 1e-10 max(|ref|, 1)` on every row;
//! * `log_pdf_base` and `log_det`: `1e-10` (Gaussian flows) or `1e-8` (full flow, erfinv
//!   conditioning, math §3c) times `max(|log_pdf|, |log_pdf_base|, 1)`, because the reference
//!   derives `log_det` as the difference `log_pdf - log_pdf_base`;
//! * base point and per-layer points: `|ours - ref| <= 1e-8 max(|ref|, 1)` (the reference's erfinv
//!   is ill-conditioned near the inverse-normal tail switch, math §3c);
//! * per-layer cumulative log-dets: `1e-10 max(|ref|, 1)`, except `1e-8` after the first g layer
//!   (the same erfinv conditioning);
//! * gradients with respect to params and x: `|ours - ref| <= 1e-6 max(|ref|, 1)`;
//! * sampling: pushing the fixture's base draws through `from_base` reproduces its samples to
//!   `1e-8 max(|ref|, 1)`, and `to_base` maps them back to the draws to `1e-8`.
//!
//! Each check prints its maximum scaled error (run with `--nocapture`).

use candle_core::{Device, Tensor, Var};
use serde_json::Value;
use starflow_flows::{flow_by_name, Flow};

struct Fixture {
    json: Value,
    n_params: usize,
}

fn load(name: &str) -> Fixture {
    let path = format!(
        "{}/tests/data/jammy_logpdf_{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("fixture file is vendored in tests/data");
    let json: Value = serde_json::from_str(&text).expect("fixture is valid JSON");
    let n_params = json["n_params"].as_u64().expect("n_params") as usize;
    Fixture { json, n_params }
}

fn mat(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .expect("matrix")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|a| a.as_f64().expect("finite number"))
                .collect()
        })
        .collect()
}

fn vec1(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("vector")
        .iter()
        .map(|a| a.as_f64().expect("finite number"))
        .collect()
}

fn tensor(m: &[Vec<f64>]) -> Tensor {
    let cols = m[0].len();
    let flat: Vec<f64> = m.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (m.len(), cols), &Device::Cpu).expect("tensor")
}

fn to_mat(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_vec2::<f64>().expect("2-D f64")
}

/// Max over entries of `|a - b| / max(|b|, 1)`; panics (naming the row) if above `tol`.
fn check(
    what: &str,
    ours: &[f64],
    reference: &[f64],
    tol: f64,
    row_of: impl Fn(usize) -> usize,
) -> f64 {
    let scale: Vec<f64> = reference.iter().map(|b| b.abs().max(1.0)).collect();
    check_scaled(what, ours, reference, &scale, tol, row_of)
}

/// Max over entries of `|a - b| / scale`; panics (naming the row) if above `tol`.
fn check_scaled(
    what: &str,
    ours: &[f64],
    reference: &[f64],
    scale: &[f64],
    tol: f64,
    row_of: impl Fn(usize) -> usize,
) -> f64 {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (i, ((a, b), s)) in ours.iter().zip(reference).zip(scale).enumerate() {
        let e = (a - b).abs() / s;
        assert!(
            e.is_finite() && e <= tol,
            "{what}: row {} entry {i}: ours {a} vs reference {b} (scaled error {e:e})",
            row_of(i)
        );
        worst = worst.max(e);
    }
    println!("{what}: max scaled error {worst:.3e} (tolerance {tol:e})");
    worst
}

fn check_mat(what: &str, ours: &[Vec<f64>], reference: &[Vec<f64>], tol: f64) -> f64 {
    let w = reference[0].len();
    let a: Vec<f64> = ours.iter().flatten().copied().collect();
    let b: Vec<f64> = reference.iter().flatten().copied().collect();
    check(what, &a, &b, tol, |i| i / w)
}

fn run_logpdf(name: &str) {
    let fx = load(name);
    let flow: Flow = flow_by_name(name, 3).expect("known flow");
    assert_eq!(flow.n_params(), fx.n_params);
    let params = tensor(&mat(&fx.json["params"]));
    let x = tensor(&mat(&fx.json["x"]));
    let parts = flow.log_prob_parts(&params, &x).expect("log_prob");
    let id = |i| i;
    check(
        &format!("{name} log_pdf"),
        &parts.log_prob.to_vec1::<f64>().expect("vec"),
        &vec1(&fx.json["log_pdf"]),
        1e-10,
        id,
    );
    // log_pdf_base and log_det individually carry the erfinv conditioning of the first g layer
    // (their errors cancel in log_pdf), and the reference's log_det is derived as
    // log_pdf - log_pdf_base, so it is only as accurate as max(|log_pdf|, |log_pdf_base|).
    let split_tol = if flow.n_layers() > 1 { 1e-8 } else { 1e-10 };
    let ref_base = vec1(&fx.json["log_pdf_base"]);
    let ref_lp = vec1(&fx.json["log_pdf"]);
    let scale: Vec<f64> = ref_base
        .iter()
        .zip(&ref_lp)
        .map(|(a, b)| a.abs().max(b.abs()).max(1.0))
        .collect();
    check_scaled(
        &format!("{name} log_pdf_base"),
        &parts.log_prob_base.to_vec1::<f64>().expect("vec"),
        &ref_base,
        &scale,
        split_tol,
        id,
    );
    check_scaled(
        &format!("{name} log_det"),
        &parts.log_det.to_vec1::<f64>().expect("vec"),
        &vec1(&fx.json["log_det"]),
        &scale,
        split_tol,
        id,
    );
    check_mat(
        &format!("{name} base_pos"),
        &to_mat(&parts.z),
        &mat(&fx.json["base_pos"]),
        1e-8,
    );

    // Per-layer trace, last layer first.
    let trace = flow.trace(&params, &x).expect("trace");
    let ref_layers = fx.json["per_layer"].as_array().expect("per_layer");
    assert_eq!(trace.len(), ref_layers.len());
    for (t, r) in trace.iter().zip(ref_layers) {
        let idx = r["layer_index"].as_u64().expect("layer_index") as usize;
        assert_eq!(t.layer_idx, idx);
        let slice = vec1(&r["param_slice"]);
        let range = flow.param_range(idx);
        assert_eq!(
            (range.start as f64, range.end as f64),
            (slice[0], slice[1]),
            "param slice of layer {idx}"
        );
        check_mat(
            &format!("{name} layer {idx} point"),
            &to_mat(&t.point),
            &mat(&r["point_after"]),
            1e-8,
        );
        let ld_tol = if idx == 0 && flow.n_layers() > 1 {
            1e-8
        } else {
            1e-10
        };
        check(
            &format!("{name} layer {idx} cumulative log-det"),
            &t.cumulative_log_det.to_vec1::<f64>().expect("vec"),
            &vec1(&r["cumulative_log_det"]),
            ld_tol,
            id,
        );
    }
}

fn run_gradients(name: &str) {
    let fx = load(name);
    let flow = flow_by_name(name, 3).expect("known flow");
    let params = Var::from_tensor(&tensor(&mat(&fx.json["params"]))).expect("var");
    let x = Var::from_tensor(&tensor(&mat(&fx.json["x"]))).expect("var");
    let lp = flow
        .log_prob(params.as_tensor(), x.as_tensor())
        .expect("log_prob");
    let grads = lp.sum_all().expect("sum").backward().expect("backward");
    let gp = grads
        .get(params.as_tensor())
        .expect("gradient reaches params");
    let gx = grads.get(x.as_tensor()).expect("gradient reaches x");
    assert_eq!(fx.json["n_nonfinite_grad_entries"].as_u64(), Some(0));
    check_mat(
        &format!("{name} grad params"),
        &to_mat(gp),
        &mat(&fx.json["grad_log_pdf_wrt_params"]),
        1e-6,
    );
    check_mat(
        &format!("{name} grad x"),
        &to_mat(gx),
        &mat(&fx.json["grad_log_pdf_wrt_x"]),
        1e-6,
    );
}

fn run_sampling(name: &str) {
    let fx = load(name);
    let flow = flow_by_name(name, 3).expect("known flow");
    let params = tensor(&mat(&fx.json["params"]));
    let s = &fx.json["samples"];
    let base = tensor(&mat(&s["base_z"]));
    let xs = flow.from_base(&params, &base).expect("from_base");
    check_mat(
        &format!("{name} samples x"),
        &to_mat(&xs),
        &mat(&s["x"]),
        1e-8,
    );
    let back = flow.log_prob_parts(&params, &xs).expect("log_prob");
    check_mat(
        &format!("{name} samples round trip"),
        &to_mat(&back.z),
        &mat(&s["base_z"]),
        1e-8,
    );
    check(
        &format!("{name} samples log_pdf"),
        &back.log_prob.to_vec1::<f64>().expect("vec"),
        &vec1(&s["log_pdf_reevaluated"]),
        1e-8,
        |i| i,
    );
}

#[test]
fn diagonal_gaussian_matches_reference() {
    run_logpdf("diagonal_gaussian");
}

#[test]
fn full_gaussian_matches_reference() {
    run_logpdf("full_gaussian");
}

#[test]
fn full_flow_matches_reference() {
    run_logpdf("full_flow");
}

#[test]
fn diagonal_gaussian_gradients_match_reference() {
    run_gradients("diagonal_gaussian");
}

#[test]
fn full_gaussian_gradients_match_reference() {
    run_gradients("full_gaussian");
}

#[test]
fn full_flow_gradients_match_reference() {
    run_gradients("full_flow");
}

#[test]
fn diagonal_gaussian_sampling_matches_reference() {
    run_sampling("diagonal_gaussian");
}

#[test]
fn full_gaussian_sampling_matches_reference() {
    run_sampling("full_gaussian");
}

#[test]
fn full_flow_sampling_matches_reference() {
    run_sampling("full_flow");
}
