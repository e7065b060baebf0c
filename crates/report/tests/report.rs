//! The report end to end on tiny trained runs: every figure is a decodable PNG of the documented
//! size, REPORT.md compares the runs and checks the targets, metrics.parquet holds the same numbers
//! as the evaluation, and the same seed gives the same report.

use std::path::{Path, PathBuf};

use polars::prelude::{DataFrame, ParquetReader, SerReader};
use starflow_inference::{evaluate, PosteriorSettings, Sampler};
use starflow_report::{report_runs, ReportOptions, TARGETS};
use starflow_training::config::TrainConfig;
use starflow_training::{train, Quiet, TrainOptions};

/// The shared tiny config (160 stars of 4 x 64 pixels, CNNModel), 2 epochs: about a second per run.
fn tiny(data: &Path, flow: &str) -> TrainConfig {
    TrainConfig::tiny(data, flow, "cnn", 2)
}

fn train_tiny(dir: &Path, flow: &str) -> PathBuf {
    let run = dir.join(format!("cnn-{flow}"));
    train(
        &tiny(&dir.join("data"), flow),
        &TrainOptions::new(&run),
        &Quiet,
    )
    .unwrap();
    run
}

fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (img.width(), img.height())
}

fn read_parquet(path: &Path) -> DataFrame {
    let f = std::fs::File::open(path).unwrap();
    ParquetReader::new(f).finish().unwrap()
}

fn opts(samples: usize) -> ReportOptions {
    ReportOptions {
        n_samples: samples,
        corner_samples: 2000,
        seed: 3,
        title: "tiny comparison".into(),
        intro: "Two tiny runs.".into(),
        ..ReportOptions::default()
    }
}

#[test]
fn report_of_two_runs_has_every_figure_table_and_number() {
    let dir = tempfile::tempdir().unwrap();
    let runs = vec![
        train_tiny(dir.path(), "diagonal_gaussian"),
        train_tiny(dir.path(), "full_flow"),
    ];
    let out = dir.path().join("report");
    let report = report_runs(&runs, &out, &opts(200), &|_| {}).unwrap();
    assert_eq!(report.rows.len(), 2);

    // Figures: one set per run, each a real PNG of the size its function draws.
    for name in ["cnn-diagonal_gaussian", "cnn-full_flow"] {
        let d = out.join(name);
        assert_eq!(png_size(&d.join("loss.png")), (900, 560));
        assert_eq!(png_size(&d.join("pulls.png")), (1440, 460));
        assert_eq!(png_size(&d.join("predicted_vs_true.png")), (1440, 900));
        assert_eq!(png_size(&d.join("calibration.png")), (1440, 900));
        assert_eq!(png_size(&d.join("joint_calibration.png")), (560, 900));
        let corners: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("posterior-row"))
            .collect();
        assert!(
            (3..=4).contains(&corners.len()),
            "{name}: {} corner plots",
            corners.len()
        );
        for c in corners {
            assert_eq!(png_size(&c.path()), (990, 1030));
        }
        let csv = std::fs::read_to_string(d.join("predictions.csv")).unwrap();
        assert_eq!(csv.lines().count(), 1 + report.rows[0].n_test);
    }
    assert_eq!(png_size(&out.join("spectrum.png")), (1400, 880));
    // No temporary files left behind by the atomic writes.
    for e in walk(&out) {
        assert!(!e.to_string_lossy().ends_with(".tmp"), "{}", e.display());
    }

    // REPORT.md: both runs in every table, the targets section, links to the figures.
    let md = std::fs::read_to_string(&report.markdown).unwrap();
    assert!(md.starts_with("# tiny comparison\n\nTwo tiny runs."));
    for needle in [
        "## Overview",
        "## Accuracy",
        "RMSE / Cramér-Rao bound",
        "## Calibration",
        "## Joint calibration (3-D highest-density regions)",
        "RMSE / marginalised Cramér-Rao bound",
        "## Quality targets",
        "cnn-full_flow/calibration.png",
        "cnn-full_flow/joint_calibration.png",
        "[an example spectrum](spectrum.png)",
        "The recalibrated figures also carry the noise of the maps, fitted on",
    ] {
        assert!(md.contains(needle), "REPORT.md lacks {needle:?}:\n{md}");
    }
    // Overview, accuracy, both Cramér-Rao tables, three calibration rows, the joint row; then
    // the section by kind of star, with the SNR quartiles (the synthetic labels carry SNR), giants
    // and dwarfs, one row per kind and label, own and recalibrated, and its parquet file.
    let (main, kinds) = md
        .split_once("\n## Calibration by kind of star\n")
        .unwrap_or_else(|| panic!("no section by kind of star:\n{md}"));
    assert_eq!(
        main.matches("| cnn-full_flow | ").count(),
        1 + 1 + 2 + 3 + 1,
        "{md}"
    );
    for needle in [
        "| cnn-full_flow | SNR Q1 (< ",
        "| cnn-full_flow | SNR Q4 (≥ ",
        "| cnn-full_flow | dwarfs (log g ≥ 3.5) |",
        " recalibrated.",
        "Mean absolute coverage error over nominal levels",
    ] {
        assert!(
            kinds.contains(needle),
            "the section lacks {needle:?}:\n{kinds}"
        );
    }
    let by_kind = report.rows[1].by_kind.len();
    assert!(by_kind >= 5, "{:?}", report.rows[1].by_kind);
    assert_eq!(report.rows[1].by_kind_calibrated.len(), by_kind);
    assert!(out.join("calibration_by_kind.parquet").exists());
    // The joint coverage is the evaluation's own.
    assert_eq!(report.rows[1].joint_coverage.len(), 2);
    // The kept epoch is the run's own (state.json counts from 1, like the logs).
    let st = starflow_training::RunDir::new(&runs[1])
        .load_state()
        .unwrap();
    assert!(st.best_epoch >= 1);
    let kept = format!(
        "| cnn | full_flow | {} ({}) |",
        st.epochs_done, st.best_epoch
    );
    assert!(md.contains(&kept), "{kept} not in\n{md}");

    // metrics.parquet: one row per run x label, numbers equal to a fresh evaluation.
    let df = read_parquet(&report.metrics);
    assert_eq!(df.height(), 6);
    let rmse = df.column("rmse").unwrap().f64().unwrap();
    let eval = evaluate(&runs[1], "test", &PosteriorSettings::own(200, 3)).unwrap();
    for j in 0..3 {
        assert_eq!(rmse.get(3 + j), Some(eval.labels[j].rmse));
    }
    let cov = df.column("coverage_68").unwrap().f64().unwrap();
    assert_eq!(cov.get(4), Some(eval.labels[1].coverage_68));
    let runs_col = df.column("run").unwrap().str().unwrap();
    assert_eq!(runs_col.get(0), Some("cnn-diagonal_gaussian"));
    assert_eq!(runs_col.get(5), Some("cnn-full_flow"));
    // Recalibrated columns: fitted on validation, metrics of the recalibrated test posteriors.
    let scale = df.column("sigma_scale").unwrap().f64().unwrap();
    let cal = starflow_inference::fit_calibration(&runs[1], Sampler::new(200, 3)).unwrap();
    for j in 0..3 {
        assert_eq!(scale.get(3 + j), Some(cal.scale[j]));
    }
    let scaled = starflow_inference::evaluate(
        &runs[1],
        "test",
        &Sampler::new(200, 3).with(Some(cal.clone())),
    )
    .unwrap();
    let cal_std = df.column("cal_pull_std").unwrap().f64().unwrap();
    assert_eq!(cal_std.get(4), Some(scaled.labels[1].pull_std));
    assert!(
        md.contains("recalibrated test NLL (z)") && md.contains(" → "),
        "{md}"
    );
    let hist = read_parquet(&report.history);
    assert_eq!(hist.height(), 4, "2 runs x 2 epochs");

    // Same seed, same numbers (the wall-clock columns aside).
    let again = report_runs(&runs, &dir.path().join("again"), &opts(200), &|_| {}).unwrap();
    let df2 = read_parquet(&again.metrics);
    for col in ["test_nll_z", "rmse", "bias", "pull_std", "coverage_95"] {
        assert_eq!(
            df.column(col).unwrap().f64().unwrap().to_vec(),
            df2.column(col).unwrap().f64().unwrap().to_vec(),
            "{col}"
        );
    }
}

#[test]
fn targets_flag_miscalibration() {
    let good = starflow_inference::LabelMetrics {
        name: "t_eff".into(),
        rmse: 50.0,
        mae: 40.0,
        bias: 1.0,
        r2: 0.99,
        pull_mean: 0.02,
        pull_std: 1.0,
        coverage_68: 0.68,
        coverage_95: 0.95,
        marginal_nll_z: 0.0,
        marginal_nll: 0.0,
        rmse_over_crlb: None,
        median_crlb: None,
        rmse_over_crlb_marginal: None,
        median_crlb_marginal: None,
        se: Default::default(),
    };
    assert!(TARGETS.misses(&good).is_empty());
    assert!(TARGETS.joint_misses(&[0.69, 0.95]).is_empty());
    assert_eq!(TARGETS.joint_misses(&[0.80, 0.95]).len(), 1);
    assert_eq!(TARGETS.joint_misses(&[]).len(), 2, "unmeasured is a miss");
    let wide = starflow_inference::LabelMetrics {
        pull_std: 0.7,
        coverage_68: 0.85,
        ..good.clone()
    };
    let m = TARGETS.misses(&wide);
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m[0].contains("pull std 0.70"));
    let biased = starflow_inference::LabelMetrics {
        pull_mean: -0.3,
        coverage_95: 0.90,
        ..good
    };
    assert_eq!(TARGETS.misses(&biased).len(), 2);
}

#[test]
fn missing_run_is_a_user_error_naming_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-run");
    let err = report_runs(&[missing], &dir.path().join("out"), &opts(100), &|_| {}).unwrap_err();
    assert!(err.is_user_error(), "{err}");
    assert!(err.to_string().contains("no-such-run"), "{err}");
    let err = report_runs(&[], &dir.path().join("out"), &opts(100), &|_| {}).unwrap_err();
    assert!(
        err.is_user_error() && err.to_string().contains("--run"),
        "{err}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
