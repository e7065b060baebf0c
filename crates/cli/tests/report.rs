//! `starflow report` and `starflow evaluate` (recalibrated, raw, ensembles) through the real
//! binary: a trained run in, figures and tables out; a missing run is a user error (exit 2, names the directory, no panic).

mod common;

use common::{ok, starflow, synth, text, tiny_config};

#[test]
fn report_writes_figures_and_tables_for_a_trained_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 120 validation stars: enough for recalibration maps (MIN_CALIBRATION_STARS).
    synth(&d.join("data"), 480, 64);
    let cfg = tiny_config(&d.join("tiny.toml"), &d.join("data"), 2, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "synthetic = false\n",
        "synthetic = false\ntrain_fraction = 0.6\nval_fraction = 0.25\ntest_fraction = 0.15\n",
    );
    std::fs::write(&cfg, text).unwrap();
    let run = d.join("cnn-diag");
    ok(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    let (so, se) = ok(&[
        "report",
        "--run",
        run.to_str().unwrap(),
        "--samples",
        "100",
        "--corner-samples",
        "500",
    ]);
    let out = run.join("report");
    assert!(so.contains("cnn-diag: test NLL"), "{so}\n{se}");
    assert!(
        so.contains(&out.join("REPORT.md").display().to_string()),
        "{so}"
    );
    for f in [
        "REPORT.md",
        "metrics.parquet",
        "history.parquet",
        "spectrum.png",
        "cnn-diag/loss.png",
        "cnn-diag/pulls.png",
        "cnn-diag/predicted_vs_true.png",
        "cnn-diag/calibration.png",
        "cnn-diag/coverage_vs_snr.png",
        "cnn-diag/predictions.csv",
    ] {
        let p = out.join(f);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 100, "{} missing or empty", p.display());
    }
    // evaluate recalibrates by default (--calibrate is the old spelling of the default): shifts
    // and factors fitted on validation when training ended, cached; --raw opts out.
    let (so, se) = ok(&[
        "evaluate",
        "--run",
        run.to_str().unwrap(),
        "--samples",
        "100",
        "--calibrate",
    ]);
    assert!(
        se.contains("recalibration (quantile maps) fitted on") && se.contains("val stars"),
        "{se}"
    );
    assert!(so.contains("eval-test/"), "{so}");
    // Calibration by kind of star and the expected-coverage summary, printed and in metrics.json.
    for needle in [
        "mean absolute coverage error over nominal 5 … 95 %",
        "by kind of star",
        "SNR Q1 (< ",
        "giants (log g < 3.5)",
    ] {
        assert!(so.contains(needle), "evaluate lacks {needle:?}:\n{so}");
    }
    let cal: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("calibration.json")).unwrap())
            .unwrap();
    assert_eq!(cal["scale"].as_array().map(|a| a.len()), Some(3), "{cal}");
    assert_eq!(cal["shift"].as_array().map(|a| a.len()), Some(3), "{cal}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval-test/metrics.json")).unwrap())
            .unwrap();
    assert!(
        metrics["by_kind"].as_array().is_some_and(|k| k.len() >= 5),
        "{metrics}"
    );
    assert_eq!(
        metrics["coverage_curve"]["levels"].as_array().map(Vec::len),
        Some(19)
    );
    let (so, se) = ok(&[
        "evaluate",
        "--run",
        run.to_str().unwrap(),
        "--samples",
        "100",
        "--raw",
    ]);
    assert!(!se.contains("recalibration"), "{se}");
    assert!(run.join("eval-test-raw/metrics.json").exists(), "{so}");
    // An ensemble (here of the run and a copy) is recalibrated as a whole, or not with --raw.
    let copy = d.join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["state.json", "model.safetensors", "config.toml"] {
        std::fs::copy(run.join(f), copy.join(f)).unwrap();
    }
    let member = ["--member", copy.to_str().unwrap()];
    let args = [
        "evaluate",
        "--run",
        run.to_str().unwrap(),
        "--samples",
        "100",
    ];
    let (_, se) = ok(&[&args[..], &member[..]].concat());
    assert!(
        se.contains("recalibrated as a whole (quantile maps fitted on"),
        "{se}"
    );
    assert!(run.join("eval-test-ensemble/metrics.json").exists());
    let (_, se) = ok(&[&args[..], &member[..], &["--raw"][..]].concat());
    assert!(
        se.contains("the equal-weight mixture of their own posteriors"),
        "{se}"
    );
    assert!(run.join("eval-test-ensemble-raw/metrics.json").exists());
    let png = std::fs::read(out.join("cnn-diag/pulls.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let md = std::fs::read_to_string(out.join("REPORT.md")).unwrap();
    assert!(
        md.contains("| cnn-diag | cnn | diagonal_gaussian | 2 ("),
        "{md}"
    );
}

#[test]
fn report_on_a_missing_run_is_a_user_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let o = starflow(&["report", "--run", missing.to_str().unwrap()]);
    let (_, se) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{se}");
    assert!(se.contains("nowhere") && !se.contains("panicked"), "{se}");
}
