//! The report's NLL orderings (full_gaussian against diagonal_gaussian + 0.02, full_flow against
//! full_gaussian): each judges the model's own and the recalibrated NLL, and gives the paired
//! difference ± its standard error only when both runs were evaluated on the same stars.

use starflow_report::table::{markdown, RunRow};

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// A run of `flow` on TinyCNN whose test stars `rows` have the per-star NLLs `nll` (model's own)
/// and `nll_cal` (recalibrated), in z-units.
fn run(flow: &str, nll: &[f64], nll_cal: &[f64], rows: &[usize]) -> RunRow {
    let mut r: RunRow = serde_json::from_value(serde_json::json!({
        "name": format!("tiny_cnn-{flow}"), "backbone": "tiny_cnn", "flow": flow,
        "epochs_done": 3, "best_epoch": 3, "stop_reason": null,
        "n_train": 100, "n_test": nll.len(),
        "test_nll_z": mean(nll), "test_nll": mean(nll) + 1.0,
        "labels": [], "sigma_scale": [], "calibrated": [],
        "test_nll_z_calibrated": mean(nll_cal),
        "seconds_per_epoch": 1.0, "train_seconds": 3.0, "report_seconds": 1.0,
        "n_samples": 100, "history": [],
    }))
    .unwrap();
    r.test_rows = rows.to_vec();
    r.test_star_nll_z = nll.to_vec();
    r.test_star_nll_z_calibrated = nll_cal.to_vec();
    r
}

fn shifted(v: &[f64], by: &[f64]) -> Vec<f64> {
    v.iter().zip(by).map(|(a, b)| a + b).collect()
}

fn line<'a>(md: &'a str, start: &str) -> &'a str {
    md.lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no line starting {start:?} in:\n{md}"))
}

#[test]
fn orderings_give_paired_differences_over_the_same_stars() {
    let rows = [3, 5, 8, 13];
    let dg = [-1.0, -2.0, -3.0, -4.0];
    // full_gaussian: better by 0.1 or 0.2 on each star, mean -0.150, sd 0.0577, se 0.029.
    let fg = shifted(&dg, &[-0.1, -0.2, -0.1, -0.2]);
    // full_flow: worse than full_gaussian by exactly 0.05 on every star (se 0).
    let ff = shifted(&fg, &[0.05; 4]);
    let cal = |v: &[f64]| shifted(v, &[-0.5; 4]);
    let runs = [
        run("diagonal_gaussian", &dg, &cal(&dg), &rows),
        run("full_gaussian", &fg, &cal(&fg), &rows),
        run("full_flow", &ff, &cal(&ff), &rows),
    ];
    let md = markdown("t", "", &runs);
    assert_eq!(
        line(&md, "- tiny_cnn: full_gaussian test NLL"),
        "- tiny_cnn: full_gaussian test NLL -2.650 <= diagonal_gaussian -2.500 + 0.02 \
         (met; difference -0.150 ± 0.029, paired); recalibrated (what `evaluate` and `predict` \
         give): -3.150 <= diagonal_gaussian -3.000 + 0.02 (met; difference -0.150 ± 0.029, paired)"
    );
    assert_eq!(
        line(&md, "- tiny_cnn: full_flow test NLL"),
        "- tiny_cnn: full_flow test NLL -2.600 > full_gaussian -2.650 (**missed**: the full flow \
         is worse than the full Gaussian; difference +0.050 ± 0.000, paired); recalibrated (what \
         `evaluate` and `predict` give): -3.100 > full_gaussian -3.150 (**missed**: the full flow \
         is worse than the full Gaussian; difference +0.050 ± 0.000, paired)"
    );

    // Evaluated on other stars, full_flow is compared by its mean alone.
    let mut other = runs.clone();
    other[2].test_rows = vec![3, 5, 8, 21];
    let md = markdown("t", "", &other);
    let ff_line = line(&md, "- tiny_cnn: full_flow test NLL");
    assert!(!ff_line.contains("paired"), "{ff_line}");
    assert!(
        line(&md, "- tiny_cnn: full_gaussian test NLL").contains("paired"),
        "{md}"
    );
}
