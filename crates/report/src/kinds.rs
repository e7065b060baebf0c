//! Calibration by kind of star in the report (issue 29): the `REPORT.md` section that sets each
//! run's own per-kind figures beside the recalibrated ones, so a reader sees how much the maps
//! carry, and `calibration_by_kind.parquet` with every number (one row per run × kind × label).

use std::fmt::Write as _;

use polars::prelude::{Column, DataFrame, PlSmallStr};
use starflow_inference::kinds::{KindCalibration, KindLabel};

use crate::error::{ReportError, Result};
use crate::row::RunRow;

/// The per-kind targets of issue 29: 68 % coverage within ±3 points, 95 % within ±2, pull std in
/// 0.93–1.07 (wider than the population targets: a kind holds a quarter of the stars or fewer).
pub const KIND_TOL_68: f64 = 0.03;
pub const KIND_TOL_95: f64 = 0.02;
pub const KIND_PULL_STD: (f64, f64) = (0.93, 1.07);

/// Cells (run × kind × label) within the per-kind targets, and all cells, of `kinds` over `rows`.
fn cells(rows: &[RunRow], kinds: impl Fn(&RunRow) -> &[KindCalibration]) -> (usize, usize) {
    rows.iter()
        .flat_map(|r| kinds(r).iter())
        .fold((0, 0), |(ok, all), k| {
            (
                ok + k.cells_within(KIND_TOL_68, KIND_TOL_95, KIND_PULL_STD),
                all + k.labels.len(),
            )
        })
}

/// The `REPORT.md` section; empty when no run has per-kind figures.
pub fn markdown_section(rows: &[RunRow]) -> String {
    let mut s = String::new();
    if rows.iter().all(|r| r.by_kind.is_empty()) {
        return s;
    }
    s.push_str("\n## Calibration by kind of star\n\n");
    let (own_ok, all) = cells(rows, |r| &r.by_kind);
    let (cal_ok, cal_all) = cells(rows, |r| &r.by_kind_calibrated);
    let _ = writeln!(
        s,
        "Per kind of star and label: coverage of the central 68.3 % and 95.4 % intervals and the \
         pull std, the model's own posteriors → the recalibrated ones (± one standard error of the \
         recalibrated figure). Targets per cell: 68 % within ±{:.0} points, 95 % within ±{:.0}, pull \
         std {:.2}–{:.2}. Cells within all three: **{own_ok} of {all}** own, **{cal_ok} of {cal_all}** \
         recalibrated.\n",
        100.0 * KIND_TOL_68,
        100.0 * KIND_TOL_95,
        KIND_PULL_STD.0,
        KIND_PULL_STD.1
    );
    s.push_str("| run | kind | stars | label | 68 % coverage | 95 % coverage | pull std |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for r in rows {
        for (own, cal) in r.by_kind.iter().zip(&r.by_kind_calibrated) {
            for (o, c) in own.labels.iter().zip(&cal.labels) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    r.name,
                    own.kind,
                    own.n_stars,
                    o.name,
                    pct_pair(
                        o.coverage_68,
                        c.coverage_68,
                        c.coverage_68_se,
                        0.6827,
                        KIND_TOL_68
                    ),
                    pct_pair(
                        o.coverage_95,
                        c.coverage_95,
                        c.coverage_95_se,
                        0.9545,
                        KIND_TOL_95
                    ),
                    std_pair(o, c),
                );
            }
        }
    }
    mace_table(&mut s, rows);
    s
}

/// `own → recalibrated ± se` in percent, the recalibrated figure bold when outside `tol`.
fn pct_pair(own: f64, cal: f64, se: f64, nominal: f64, tol: f64) -> String {
    let cal_text = format!("{:.1} ± {:.1}", 100.0 * cal, 100.0 * se);
    let cal_text = if (cal - nominal).abs() > tol {
        format!("**{cal_text}**")
    } else {
        cal_text
    };
    format!("{:.1} → {cal_text}", 100.0 * own)
}

fn std_pair(own: &KindLabel, cal: &KindLabel) -> String {
    let text = format!("{:.2} ± {:.2}", cal.pull_std, cal.pull_std_se);
    let text = if (KIND_PULL_STD.0..=KIND_PULL_STD.1).contains(&cal.pull_std) {
        text
    } else {
        format!("**{text}**")
    };
    format!("{:.2} → {text}", own.pull_std)
}

/// The expected-coverage summary: mean absolute coverage error over nominal 5 … 95 %.
fn mace_table(s: &mut String, rows: &[RunRow]) {
    let Some(first) = rows.iter().find(|r| !r.coverage_curve.mace.is_empty()) else {
        return;
    };
    s.push_str(
        "\nMean absolute coverage error over nominal levels 5 … 95 % (points; expected-coverage \
         curve of the central intervals per label and of the joint highest-density regions), own → \
         recalibrated:\n\n",
    );
    let names: Vec<&str> = first.labels.iter().map(|l| l.name.as_str()).collect();
    let _ = writeln!(s, "| run | {} | joint |", names.join(" | "));
    let _ = writeln!(s, "|---|{}---|", "---|".repeat(names.len()));
    for r in rows {
        let (own, cal) = (&r.coverage_curve, &r.coverage_curve_calibrated);
        let cells: Vec<String> = own
            .mace
            .iter()
            .zip(&cal.mace)
            .map(|(o, c)| format!("{:.1} → {:.1}", 100.0 * o, 100.0 * c))
            .collect();
        let joint = match (own.joint_mace, cal.joint_mace) {
            (Some(o), Some(c)) => format!("{:.1} → {:.1}", 100.0 * o, 100.0 * c),
            _ => "-".into(),
        };
        let _ = writeln!(s, "| {} | {} | {joint} |", r.name, cells.join(" | "));
    }
}

/// One row per run × kind × label: the model's own and the recalibrated figures with their errors.
pub fn frame(rows: &[RunRow]) -> Result<DataFrame> {
    type Cell<'a> = (
        &'a RunRow,
        &'a KindCalibration,
        &'a KindLabel,
        &'a KindLabel,
    );
    let flat: Vec<Cell> = rows
        .iter()
        .flat_map(|r| {
            r.by_kind
                .iter()
                .zip(&r.by_kind_calibrated)
                .flat_map(move |(k, c)| {
                    k.labels
                        .iter()
                        .zip(&c.labels)
                        .map(move |(o, cl)| (r, k, o, cl))
                })
        })
        .collect();
    let text = |name: &str, f: &dyn Fn(&Cell) -> String| {
        Column::new(
            PlSmallStr::from(name),
            flat.iter().map(f).collect::<Vec<_>>(),
        )
    };
    let num = |name: &str, f: &dyn Fn(&Cell) -> f64| {
        Column::new(
            PlSmallStr::from(name),
            flat.iter().map(f).collect::<Vec<_>>(),
        )
    };
    let columns = vec![
        text("run", &|c| c.0.name.clone()),
        text("kind", &|c| c.1.kind.clone()),
        num("n_stars", &|c| c.1.n_stars as f64),
        text("label", &|c| c.2.name.clone()),
        num("coverage_68", &|c| c.2.coverage_68),
        num("coverage_95", &|c| c.2.coverage_95),
        num("pull_mean", &|c| c.2.pull_mean),
        num("pull_std", &|c| c.2.pull_std),
        num("cal_coverage_68", &|c| c.3.coverage_68),
        num("cal_coverage_68_se", &|c| c.3.coverage_68_se),
        num("cal_coverage_95", &|c| c.3.coverage_95),
        num("cal_coverage_95_se", &|c| c.3.coverage_95_se),
        num("cal_pull_mean", &|c| c.3.pull_mean),
        num("cal_pull_mean_se", &|c| c.3.pull_mean_se),
        num("cal_pull_std", &|c| c.3.pull_std),
        num("cal_pull_std_se", &|c| c.3.pull_std_se),
    ];
    DataFrame::new(flat.len(), columns).map_err(|e| ReportError::Table {
        path: "calibration_by_kind.parquet".into(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(name: &str, c68: f64, c95: f64, pull_std: f64) -> KindLabel {
        KindLabel {
            name: name.into(),
            coverage_68: c68,
            coverage_68_se: 0.01,
            coverage_95: c95,
            coverage_95_se: 0.005,
            pull_mean: 0.0,
            pull_mean_se: 0.01,
            pull_std,
            pull_std_se: 0.01,
        }
    }

    fn kind(name: &str, labels: Vec<KindLabel>) -> KindCalibration {
        KindCalibration {
            kind: name.into(),
            n_stars: 2500,
            labels,
        }
    }

    #[test]
    fn section_counts_the_cells_within_the_per_kind_targets_and_marks_misses() {
        let mut row: RunRow = serde_json::from_value(serde_json::json!({
            "name": "tiny_cnn-full_flow", "backbone": "tiny_cnn", "flow": "full_flow",
            "epochs_done": 3, "best_epoch": 3, "stop_reason": null, "n_train": 100, "n_test": 10000,
            "test_nll_z": -1.0, "test_nll": 1.0, "labels": [], "sigma_scale": [],
            "calibrated": [], "test_nll_z_calibrated": -1.1, "seconds_per_epoch": 1.0,
            "train_seconds": 3.0, "report_seconds": 1.0, "n_samples": 100, "history": [],
        }))
        .unwrap();
        // Faint stars: too narrow before and after; bright stars: fixed by the maps.
        row.by_kind = vec![
            kind("SNR Q1 (< 38.0)", vec![label("t_eff", 0.52, 0.88, 1.32)]),
            kind("SNR Q4 (≥ 120.0)", vec![label("t_eff", 0.77, 0.98, 0.79)]),
        ];
        row.by_kind_calibrated = vec![
            kind("SNR Q1 (< 38.0)", vec![label("t_eff", 0.60, 0.92, 1.15)]),
            kind("SNR Q4 (≥ 120.0)", vec![label("t_eff", 0.69, 0.955, 1.0)]),
        ];
        let md = markdown_section(&[row]);
        assert!(
            md.contains("**0 of 2** own, **1 of 2** recalibrated"),
            "{md}"
        );
        assert!(
            md.contains("| tiny_cnn-full_flow | SNR Q1 (< 38.0) | 2500 | t_eff | 52.0 → **60.0 ± 1.0** | 88.0 → **92.0 ± 0.5** | 1.32 → **1.15 ± 0.01** |"),
            "{md}"
        );
        assert!(md.contains("| SNR Q4 (≥ 120.0) | 2500 | t_eff | 77.0 → 69.0 ± 1.0 | 98.0 → 95.5 ± 0.5 | 0.79 → 1.00 ± 0.01 |"), "{md}");
        assert_eq!(frame(&[]).unwrap().height(), 0);
    }
}
