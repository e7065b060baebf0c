//! The real `starflow` binary, end to end: synth + inspect, and train / evaluate / predict.
//! Bad input (exit code 2 and a clear message) is tested row by row in `bad_input.rs`, faults
//! (SIGKILL, failed writes, non-finite losses) in `faults.rs`.

mod common;

use std::path::Path;

use common::{starflow, text};

fn synth(dir: &std::path::Path) {
    common::synth(dir, 40, 128);
}

#[test]
fn synth_then_inspect() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path());
    let o = starflow(&["inspect", "--data", dir.path().to_str().unwrap()]);
    let (so, se) = text(&o);
    assert!(o.status.success(), "{so}\n{se}");
    for needle in [
        "dtype float32, shape [40, 512]",
        "dtype float64, shape [40, 8]",
        "non-finite values: 0",
        "t_eff",
        "SNR: min",
        "Cramer-Rao bound (median)",
        "validation: ok (40 usable stars x 512 pixels",
    ] {
        assert!(
            so.contains(needle),
            "inspect output lacks {needle:?}:\n{so}"
        );
    }
}

#[test]
fn train_evaluate_predict_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("tiny.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\ndir = \"{}\"\nsynthetic_n = 120\nsynthetic_pixels_per_camera = 64\n[model]\nbackbone = \"tiny_cnn\"\n[optim]\nepochs = 2\nbatch_size = 32\n[run]\nthreads = 1\n",
            d.join("data").display()
        ),
    )
    .unwrap();
    let run = d.join("run");
    let (cfg_s, run_s) = (cfg.to_str().unwrap(), run.to_str().unwrap());
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec!["train", "--config", cfg_s, "--flow", "full_gaussian"];
        args.extend_from_slice(extra);
        args.extend(["--out", out]);
        starflow(&args)
    };
    let o = train(run_s, &[]);
    let (so, se) = text(&o);
    assert!(o.status.success(), "{so}\n{se}");
    assert!(so.contains("2 epochs, best validation NLL"), "{so}");
    assert!(se.contains("epoch   2: train nll"), "{se}");
    for f in [
        "state.json",
        "model.safetensors",
        "metrics.csv",
        "config.toml",
    ] {
        assert!(run.join(f).exists(), "{f}");
    }
    let o = starflow(&["evaluate", "--run", run_s, "--samples", "100"]);
    let (so, se) = text(&o);
    assert!(o.status.success(), "{se}");
    assert!(
        so.contains("full_gaussian on test") && so.contains("RMSE/CRLB") && so.contains("fe_h"),
        "{so}"
    );
    assert!(
        run.join("eval-test/predictions.csv").exists()
            && run.join("eval-test/metrics.json").exists()
    );
    // `rows`: the file rows of each split, for tools outside starflow; together a permutation of
    // every row, and written to a file the same as to standard output.
    let mut all: Vec<usize> = Vec::new();
    for split in ["train", "val", "test"] {
        let o = starflow(&["rows", "--run", run_s, "--split", split]);
        let (so, se) = text(&o);
        assert!(o.status.success(), "{se}");
        all.extend(so.lines().map(|l| l.parse::<usize>().unwrap()));
    }
    all.sort_unstable();
    assert_eq!(all, (0..120).collect::<Vec<_>>());
    let rows_file = d.join("train_rows.txt");
    let o = starflow(&["rows", "--run", run_s, "--out", rows_file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    let o2 = starflow(&["rows", "--run", run_s, "--split", "train"]);
    assert_eq!(std::fs::read_to_string(&rows_file).unwrap(), text(&o2).0);
    let o = starflow(&["rows", "--run", run_s, "--split", "training"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).1.contains("unknown split `training`"),
        "{}",
        text(&o).1
    );

    let out = d.join("p.csv");
    let spectra = d.join("data/spectra.npy");
    let o = starflow(&[
        "predict",
        "--run",
        run_s,
        "--spectra",
        spectra.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let csv = std::fs::read_to_string(&out).unwrap();
    assert_eq!(csv.lines().count(), 121);
    assert!(
        csv.starts_with("row,t_eff_mean,t_eff_std,t_eff_q025"),
        "{csv}"
    );

    // A deep ensemble: the same recipe from another seed, predicted as one mixture and
    // recalibrated as a whole (the maps are kept in the first run).
    let run2 = d.join("run2");
    let o = train(run2.to_str().unwrap(), &["--set", "run.seed=7"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let ens = d.join("ensemble.csv");
    let o = starflow(&[
        "predict",
        "--run",
        run_s,
        "--member",
        run2.to_str().unwrap(),
        "--spectra",
        spectra.to_str().unwrap(),
        "--samples",
        "200",
        "--out",
        ens.to_str().unwrap(),
    ]);
    let (so, se) = text(&o);
    assert!(o.status.success(), "{so}\n{se}");
    assert!(se.contains("ensemble of 2 runs"), "{se}");
    assert!(run.join("ensemble-calibration.json").exists());
    let csv_e = std::fs::read_to_string(&ens).unwrap();
    assert_eq!(csv_e.lines().count(), 121);
    assert_ne!(
        csv_e, csv,
        "the ensemble predicted what the first run alone does"
    );
}

/// A second held-out set's evaluation lands in its own folder; pointed with `--out` at the first
/// set's folder it is refused (exit 2, the first set's files unchanged) unless `--force`; the same
/// set's evaluation may replace itself.
fn evaluations_of_two_sets_are_both_kept(d: &Path, run: &Path, held: &Path) {
    let second = d.join("second");
    common::synth(&second, 30, 64);
    let eval = |data: &Path, extra: &[&str]| {
        let mut args = vec![
            "evaluate",
            "--run",
            run.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--samples",
            "50",
        ];
        args.extend_from_slice(extra);
        starflow(&args)
    };
    let first = run.join("eval-data-held");
    let before = common::read(&first.join("predictions.csv"));
    let o = eval(&second, &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(
        std::fs::read_to_string(run.join("eval-data-second/predictions.csv"))
            .unwrap()
            .lines()
            .count(),
        31
    );
    let o = eval(&second, &["--out", first.to_str().unwrap()]);
    let (_, se) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{se}");
    assert!(
        se.contains("eval-data-held")
            && se.contains("held/spectra.npy")
            && se.contains("second/spectra.npy")
            && se.contains("--force")
            && !se.contains("panicked"),
        "{se}"
    );
    assert_eq!(common::read(&first.join("predictions.csv")), before);
    // The same stars again: replaced without a word (the run may have been recalibrated).
    let o = eval(held, &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    let o = eval(&second, &["--out", first.to_str().unwrap(), "--force"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("metrics.json")).unwrap())
            .unwrap();
    assert_eq!(metrics["n_stars"], 30);
    // Nor is a split's evaluation replaced by a set's.
    common::ok(&[
        "evaluate",
        "--run",
        run.to_str().unwrap(),
        "--samples",
        "50",
    ]);
    let o = eval(&second, &["--out", run.join("eval-test").to_str().unwrap()]);
    let (_, se) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{se}");
    assert!(se.contains("the run's test split"), "{se}");
}

/// `evaluate --data DIR` scores a run on another labelled set (here one drawn with another seed):
/// every row is evaluated, the Cramér–Rao ratios come from that set's own bound files, the
/// figures carry standard errors, and the joint HPD coverage is reported.
#[test]
fn evaluate_on_a_held_out_data_set() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::synth(&d.join("data"), 120, 64);
    let cfg = common::tiny_config(&d.join("tiny.toml"), &d.join("data"), 1, "");
    let run = d.join("run");
    let run_s = run.to_str().unwrap();
    common::ok(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--flow",
        "full_gaussian",
        "--set",
        "model.offdiagonal=\"relative\"",
        "--out",
        run_s,
    ]);
    let held = d.join("held");
    common::ok(&[
        "synth",
        "--n",
        "57",
        "--seed",
        "9",
        "--pixels-per-camera",
        "64",
        "--out",
        held.to_str().unwrap(),
    ]);
    let (so, _) = common::ok(&[
        "evaluate",
        "--run",
        run_s,
        "--data",
        held.to_str().unwrap(),
        "--samples",
        "50",
    ]);
    assert!(so.contains("full_gaussian on data (57 stars)"), "{so}");
    assert!(so.contains(" ± "), "standard errors are printed: {so}");
    assert!(so.contains("joint (3-D HPD regions)"), "{so}");
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("eval-data-held/metrics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(metrics["n_stars"], 57);
    assert_eq!(metrics["joint_coverage"].as_array().unwrap().len(), 2);
    assert!(metrics["nll_se"].as_f64().unwrap() > 0.0);
    for l in metrics["labels"].as_array().unwrap() {
        assert!(l["rmse_over_crlb"].as_f64().unwrap() > 0.0, "{l}");
        // The marginalised bound is looser, so the ratio against it is smaller.
        let marginal = l["rmse_over_crlb_marginal"].as_f64().unwrap();
        assert!(
            marginal > 0.0 && marginal <= l["rmse_over_crlb"].as_f64().unwrap(),
            "{l}"
        );
        assert!(l["se"]["coverage_68"].as_f64().unwrap() > 0.0, "{l}");
    }
    let csv = std::fs::read_to_string(run.join("eval-data-held/predictions.csv")).unwrap();
    assert_eq!(csv.lines().count(), 58);
    assert!(csv.lines().next().unwrap().ends_with(",hpd,nll"), "{csv}");
    // Each star's `nll` is its term of the run's NLL (physical units): their mean is that NLL.
    let star_nll: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
        .collect();
    let mean = star_nll.iter().sum::<f64>() / star_nll.len() as f64;
    let nll = metrics["nll"].as_f64().unwrap();
    assert!(
        (mean - nll).abs() < 1e-9 * nll.abs().max(1.0),
        "{mean} vs {nll}"
    );
    assert_eq!(
        metrics["data"]["spectra"].as_str().unwrap(),
        std::fs::canonicalize(held.join("spectra.npy"))
            .unwrap()
            .to_str()
            .unwrap()
    );
    evaluations_of_two_sets_are_both_kept(d, &run, &held);
    // Another pixel grid is refused with the file named.
    let other = d.join("other");
    common::synth(&other, 20, 32);
    let o = starflow(&[
        "evaluate",
        "--run",
        run_s,
        "--data",
        other.to_str().unwrap(),
    ]);
    let (_, se) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{se}");
    assert!(se.contains("spectra.npy") && se.contains("pixels"), "{se}");
}
