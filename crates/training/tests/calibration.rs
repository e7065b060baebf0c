//! σ-scaling of posteriors (Calibration): the fitted factors put half of the validation pulls
//! within the normal quartile, the scaled NLL is the density of the scaled posterior, and factors of 1
//! change nothing.

use std::path::{Path, PathBuf};

use starflow_training::config::TrainConfig;
use starflow_training::{
    evaluate, evaluate_scaled, fit_calibration, load_or_fit_calibration, train, Calibration, Quiet,
    TrainOptions,
};

fn tiny_run(dir: &Path, flow: &str) -> PathBuf {
    let text = format!(
        "[data]\ndir = \"{}\"\nsynthetic_n = 160\nsynthetic_pixels_per_camera = 64\n\
         [model]\nflow = \"{flow}\"\nbackbone = \"cnn\"\n[optim]\nepochs = 2\nbatch_size = 32\n\
         lr = 1e-3\n[run]\nseed = 5\nthreads = 2\n",
        dir.join("data").display()
    );
    let cfg = TrainConfig::from_toml(&text, Path::new("tiny.toml")).unwrap();
    let run = dir.join(flow);
    let opts = TrainOptions {
        out: run.clone(),
        resume: false,
        inject_nan_steps: Vec::new(),
        pause_at: None,
    };
    train(&cfg, &opts, &Quiet).unwrap();
    run
}

fn ones(c: &Calibration) -> Calibration {
    Calibration {
        scale: vec![1.0; c.scale.len()],
        ..c.clone()
    }
}

#[test]
fn fitted_scale_normalises_validation_pulls_and_keeps_the_nll_a_density() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "diagonal_gaussian");
    let c = fit_calibration(&run, 100, 1).unwrap();
    assert_eq!(c.labels, ["t_eff", "log_g", "fe_h"]);
    assert!(c.scale.iter().all(|s| s.is_finite() && *s > 0.0), "{c:?}");
    assert_eq!(c.fitted_on, "val");

    let raw = evaluate(&run, "val", 100, 1).unwrap();
    let scaled = evaluate_scaled(&run, "val", 100, 1, Some(&c)).unwrap();
    for (j, l) in scaled.labels.iter().enumerate() {
        // s = median|pull| / 0.6745, so half of the scaled pulls lie within the normal quartile.
        let mut abs: Vec<f64> = scaled
            .stars
            .iter()
            .map(|s| ((s.mean[j] - s.truth.as_ref().unwrap()[j]) / s.std[j]).abs())
            .collect();
        abs.sort_by(f64::total_cmp);
        let n = abs.len();
        let median = if n % 2 == 1 {
            abs[n / 2]
        } else {
            0.5 * (abs[n / 2 - 1] + abs[n / 2])
        };
        assert!((median - 0.674_489_75).abs() < 1e-6, "{}: {median}", l.name);
        // Means (and so RMSE and bias) do not move; stds scale by exactly s.
        assert_eq!(l.rmse, raw.labels[j].rmse);
        for (a, b) in scaled.stars.iter().zip(&raw.stars) {
            assert!((a.std[j] - c.scale[j] * b.std[j]).abs() <= 1e-9 * b.std[j]);
        }
    }
    // For a diagonal Gaussian the joint NLL is the sum of the marginal NLLs: this holds for the
    // scaled posterior only if the log-density adjustment (evaluate at m + (y-m)/s, minus sum ln s)
    // is right.
    for e in [&raw, &scaled] {
        let sum: f64 = e.labels.iter().map(|l| l.marginal_nll_z).sum();
        assert!((e.nll_z - sum).abs() < 1e-9, "{} vs {sum}", e.nll_z);
    }
}

#[test]
fn unit_scale_changes_nothing_and_wider_scale_covers_more() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "full_flow");
    let c = fit_calibration(&run, 200, 2).unwrap();
    let raw = evaluate(&run, "test", 200, 2).unwrap();
    let same = evaluate_scaled(&run, "test", 200, 2, Some(&ones(&c))).unwrap();
    assert_eq!(raw.nll_z, same.nll_z);
    // Same PITs and stds; quantiles equal up to the rounding of m + 1 * (q - m).
    for (a, b) in raw.stars.iter().zip(&same.stars) {
        assert_eq!((&a.mean, &a.std, &a.pit), (&b.mean, &b.std, &b.pit));
        for (qa, qb) in a
            .quantiles
            .iter()
            .flatten()
            .zip(b.quantiles.iter().flatten())
        {
            assert!((qa - qb).abs() <= 1e-12 * qa.abs().max(1.0), "{qa} vs {qb}");
        }
    }
    let wide = Calibration {
        scale: vec![3.0; 3],
        ..c.clone()
    };
    let narrow = Calibration {
        scale: vec![0.3; 3],
        ..c
    };
    let w = evaluate_scaled(&run, "test", 200, 2, Some(&wide)).unwrap();
    let n = evaluate_scaled(&run, "test", 200, 2, Some(&narrow)).unwrap();
    for j in 0..3 {
        assert!(w.labels[j].coverage_68 >= raw.labels[j].coverage_68);
        assert!(n.labels[j].coverage_68 <= raw.labels[j].coverage_68);
        assert!((w.labels[j].pull_std * 3.0 - raw.labels[j].pull_std).abs() < 1e-9);
    }
}

#[test]
fn calibration_is_saved_and_reused_until_the_run_changes() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "diagonal_gaussian");
    let path = run.join("calibration.json");
    assert!(!path.exists());
    let a = load_or_fit_calibration(&run, 100, 1).unwrap();
    assert!(path.exists());
    // A hand-edited file with the right run and labels is used as is.
    let edited = Calibration {
        scale: vec![1.5, 1.5, 1.5],
        ..a.clone()
    };
    std::fs::write(&path, serde_json::to_string(&edited).unwrap()).unwrap();
    assert_eq!(load_or_fit_calibration(&run, 100, 1).unwrap(), edited);
    // One from another state of the run is refitted.
    let stale = Calibration {
        epochs_done: 99,
        ..edited
    };
    std::fs::write(&path, serde_json::to_string(&stale).unwrap()).unwrap();
    assert_eq!(load_or_fit_calibration(&run, 100, 1).unwrap(), a);
}
