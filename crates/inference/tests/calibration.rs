//! Recalibration of posteriors (Calibration: a monotone map per label of the standardised axis):
//! quantile maps make the validation PITs uniform at their knots, affine maps centre the
//! validation pulls on zero and put half of them within the normal quartile, the recalibrated NLL
//! is the density of the recalibrated posterior (the model's over the maps' Jacobian), and the
//! identity changes nothing.

use std::path::{Path, PathBuf};

use starflow_inference::{
    evaluate, evaluate_on, fit_calibration, fit_calibration_with, load_or_fit_calibration,
    Calibration, CalibrationMethod, EvalSource, MarginalMap, PosteriorSettings, RadialMap, Sampler,
};
use starflow_training::config::TrainConfig;
use starflow_training::{train, Quiet, TrainOptions};

/// A tiny CNNModel run of `flow` in `dir/FLOW` with 120 validation stars, enough for maps
/// ([`starflow_inference::MIN_CALIBRATION_STARS`]).
fn tiny_run(dir: &Path, flow: &str) -> PathBuf {
    let mut cfg = TrainConfig::tiny(&dir.join("data"), flow, "cnn", 2);
    cfg.data.synthetic_n = 480;
    cfg.data.train_fraction = 0.6;
    cfg.data.val_fraction = 0.25;
    cfg.data.test_fraction = 0.15;
    let run = dir.join(flow);
    train(&cfg, &TrainOptions::new(&run), &Quiet).unwrap();
    run
}

/// Too few validation stars for maps: the fit keeps the model's own posteriors and says so.
#[test]
fn too_few_stars_keep_the_models_own_posteriors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig::tiny(&dir.path().join("data"), "diagonal_gaussian", "cnn", 1);
    let run = dir.path().join("run");
    train(&cfg, &TrainOptions::new(&run), &Quiet).unwrap();
    let c = fit_calibration(&run, Sampler::new(100, 1)).unwrap();
    assert!(
        c.n_stars < starflow_inference::MIN_CALIBRATION_STARS,
        "{c:?}"
    );
    assert!(c.too_few_stars);
    assert_eq!(c, ones(&c));
    let raw = evaluate(&run, "val", &PosteriorSettings::own(100, 1)).unwrap();
    let mapped = evaluate(&run, "val", &Sampler::new(100, 1).with(Some(c.clone()))).unwrap();
    assert_nll_is(mapped.nll_z, raw.nll_z);
}

/// A tiny CNNModel run in `dir/run` whose config draws a calibration set of `n` stars with
/// `seed` (generated into `dir/data-calibration-<seed>` on first use).
fn run_with_calibration_set(dir: &Path, flow: &str, n: usize, seed: u64) -> PathBuf {
    let mut cfg = TrainConfig::tiny(&dir.join("data"), flow, "cnn", 2);
    cfg.data.calibration_n = n;
    cfg.data.calibration_seed = seed;
    let run = dir.join("run");
    train(&cfg, &TrainOptions::new(&run), &Quiet).unwrap();
    run
}

/// A recalibrated NLL equals the one computed by hand from the maps, up to rounding.
fn assert_nll_is(nll: f64, expected: f64) {
    assert!(
        (nll - expected).abs() < 1e-6 * expected.abs().max(1.0),
        "{nll} vs {expected}"
    );
}

fn ones(c: &Calibration) -> Calibration {
    Calibration {
        scale: vec![1.0; c.scale.len()],
        shift: vec![0.0; c.scale.len()],
        maps: Vec::new(),
        radial: None,
        ..c.clone()
    }
}

#[test]
fn quantile_maps_make_validation_pits_uniform_and_keep_the_nll_a_density() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "diagonal_gaussian");
    let c = fit_calibration(&run, Sampler::new(100, 1)).unwrap();
    assert_eq!(c.maps.len(), 3, "{c:?}");
    let raw = evaluate(&run, "val", &PosteriorSettings::own(100, 1)).unwrap();
    let mapped = evaluate(&run, "val", &Sampler::new(100, 1).with(Some(c.clone()))).unwrap();
    let n = raw.stars.len() as f64;
    for (j, g) in c.maps.iter().enumerate() {
        // Each knot sends a normal quantile Φ^{-1}(p) to the errors' p-quantile, so a fraction p
        // of the validation truths lies below the recalibrated posterior's p-quantile.
        for &[u, _] in &g.knots {
            let p = normal_cdf(u);
            let below = mapped
                .stars
                .iter()
                .filter(|s| s.pit.as_ref().unwrap()[j] < p)
                .count() as f64;
            assert!(
                (below / n - p).abs() <= 1.5 / n,
                "label {j}: {below} of {n} below {p}"
            );
        }
    }
    // The recalibrated density of a diagonal Gaussian at the truth, computed here from the maps:
    // the model's density at the truth as it sees it, over the map's slope there.
    let expected: f64 = raw
        .stars
        .iter()
        .map(|s| {
            let t = s.truth.as_ref().unwrap();
            (0..3)
                .map(|j| {
                    let g = &c.maps[j];
                    let u = g.inverse((t[j] - s.mean[j]) / s.std[j]);
                    0.5 * (2.0 * std::f64::consts::PI).ln()
                        + s.std[j].ln()
                        + 0.5 * u * u
                        + g.slope(u).ln()
                })
                .sum::<f64>()
        })
        .sum::<f64>()
        / n;
    assert_nll_is(mapped.nll, expected);
}

/// The standard normal CDF, from the chi-square CDF with one degree of freedom:
/// `P(|Z| < |u|) = 2 Φ(|u|) - 1`.
fn normal_cdf(u: f64) -> f64 {
    0.5 + 0.5 * u.signum() * starflow_inference::chi2_cdf(1, u * u)
}

#[test]
fn affine_calibration_normalises_validation_pulls_and_keeps_the_nll_a_density() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "diagonal_gaussian");
    let c = fit_calibration_with(&run, Sampler::new(100, 1), CalibrationMethod::Affine).unwrap();
    assert!(c.maps.is_empty());
    assert_eq!(c.labels, ["t_eff", "log_g", "fe_h"]);
    assert!(c.scale.iter().all(|s| s.is_finite() && *s > 0.0), "{c:?}");
    assert_eq!(c.fitted_on, "val");

    let raw = evaluate(&run, "val", &PosteriorSettings::own(100, 1)).unwrap();
    let scaled = evaluate(&run, "val", &Sampler::new(100, 1).with(Some(c.clone()))).unwrap();
    assert_eq!(c.shift.len(), 3);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        }
    };
    for (j, l) in scaled.labels.iter().enumerate() {
        // c = median pull and s = median |pull - c| / 0.6745: the recalibrated pulls (pull - c) / s
        // have median 0, and half of them lie within the normal quartile.
        let pulls: Vec<f64> = scaled
            .stars
            .iter()
            .map(|s| (s.mean[j] - s.truth.as_ref().unwrap()[j]) / s.std[j])
            .collect();
        let centre = median(pulls.clone());
        assert!(centre.abs() < 1e-9, "{}: median pull {centre}", l.name);
        let spread = median(pulls.iter().map(|p| p.abs()).collect());
        assert!((spread - 0.674_489_75).abs() < 1e-6, "{}: {spread}", l.name);
        // Stds scale by exactly s; means move by c of the unscaled std.
        for (a, b) in scaled.stars.iter().zip(&raw.stars) {
            assert!((a.std[j] - c.scale[j] * b.std[j]).abs() <= 1e-9 * b.std[j]);
            let moved = b.mean[j] - c.shift[j] * b.std[j];
            assert!((a.mean[j] - moved).abs() <= 1e-9 * b.std[j]);
        }
    }
    // For a diagonal Gaussian the joint NLL is the sum of the marginal NLLs: this holds for the
    // recalibrated posterior only if the log-density adjustment (evaluate at the truth as seen by
    // the unscaled posterior, minus sum ln s) is right.
    for e in [&raw, &scaled] {
        let sum: f64 = e.labels.iter().map(|l| l.marginal_nll_z).sum();
        assert!((e.nll_z - sum).abs() < 1e-9, "{} vs {sum}", e.nll_z);
    }
}

#[test]
fn unit_scale_changes_nothing_and_wider_scale_covers_more() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "full_flow");
    let c = fit_calibration(&run, Sampler::new(200, 2)).unwrap();
    let raw = evaluate(&run, "test", &PosteriorSettings::own(200, 2)).unwrap();
    let same = evaluate(&run, "test", &Sampler::new(200, 2).with(Some(ones(&c)))).unwrap();
    // Equal up to rounding: the truth as the unscaled posterior sees it is m + sd ((t - m) / sd).
    assert!((raw.nll_z - same.nll_z).abs() < 1e-12 * raw.nll_z.abs().max(1.0));
    // Same PITs and stds; quantiles equal up to the rounding of m + 1 * (q - m).
    // Same PITs; means and stds equal up to the rounding of the mapped samples' own summary.
    for (a, b) in raw.stars.iter().zip(&same.stars) {
        assert_eq!(a.pit, b.pit);
        for (x, y) in a.mean.iter().chain(&a.std).zip(b.mean.iter().chain(&b.std)) {
            assert!((x - y).abs() <= 1e-12 * x.abs().max(1.0), "{x} vs {y}");
        }
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
        ..ones(&c)
    };
    let narrow = Calibration {
        scale: vec![0.3; 3],
        ..ones(&c)
    };
    let w = evaluate(&run, "test", &Sampler::new(200, 2).with(Some(wide.clone()))).unwrap();
    let n = evaluate(
        &run,
        "test",
        &Sampler::new(200, 2).with(Some(narrow.clone())),
    )
    .unwrap();
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
    let a = load_or_fit_calibration(&run, Sampler::new(100, 1)).unwrap();
    assert!(path.exists());
    // A hand-edited file with the right run and labels is used as is.
    let edited = Calibration {
        scale: vec![1.5, 1.5, 1.5],
        ..a.clone()
    };
    std::fs::write(&path, serde_json::to_string(&edited).unwrap()).unwrap();
    assert_eq!(
        load_or_fit_calibration(&run, Sampler::new(100, 1)).unwrap(),
        edited
    );
    // One from another state of the run is refitted.
    let stale = Calibration {
        epochs_done: 99,
        ..edited.clone()
    };
    std::fs::write(&path, serde_json::to_string(&stale).unwrap()).unwrap();
    assert_eq!(
        load_or_fit_calibration(&run, Sampler::new(100, 1)).unwrap(),
        a
    );
    // So is one whose parts an older held-out rule chose, or a file from before the rule was
    // recorded (no `held_out_rule`).
    assert_eq!(a.held_out_rule, starflow_inference::HELD_OUT_RULE);
    let older = Calibration {
        held_out_rule: starflow_inference::HELD_OUT_RULE - 1,
        ..edited.clone()
    };
    std::fs::write(&path, serde_json::to_string(&older).unwrap()).unwrap();
    assert_eq!(
        load_or_fit_calibration(&run, Sampler::new(100, 1)).unwrap(),
        a
    );
    let mut unmarked = serde_json::to_value(&edited).unwrap();
    assert!(unmarked
        .as_object_mut()
        .unwrap()
        .remove("held_out_rule")
        .is_some());
    std::fs::write(&path, unmarked.to_string()).unwrap();
    assert_eq!(
        load_or_fit_calibration(&run, Sampler::new(100, 1)).unwrap(),
        a
    );
}

/// The chi-square CDF behind the joint HPD levels of Gaussian flows, at known values.
#[test]
fn chi2_cdf_matches_known_values() {
    use starflow_inference::chi2_cdf;
    let close = |a: f64, b: f64, tol: f64| assert!((a - b).abs() < tol, "{a} vs {b}");
    close(chi2_cdf(1, 1.0), 0.682_689_49, 1e-6);
    close(chi2_cdf(1, 4.0), 0.954_499_74, 1e-6);
    for x in [0.3, 1.0, 2.5, 7.0] {
        close(chi2_cdf(2, x), 1.0 - (-x / 2.0f64).exp(), 1e-12);
        close(
            chi2_cdf(4, x),
            1.0 - (-x / 2.0f64).exp() * (1.0 + x / 2.0),
            1e-12,
        );
    }
    // The 3-D regions of mass 68.27 % and 95.45 % (scipy.stats.chi2.ppf).
    close(chi2_cdf(3, 3.526_741_3), 0.682_689_49, 1e-6);
    close(chi2_cdf(3, 8.024_881_6), 0.954_499_74, 1e-6);
    assert_eq!(chi2_cdf(3, 0.0), 0.0);
    assert_eq!(chi2_cdf(3, 1e4), 1.0);
}

/// Both ways of finding a truth's HPD level agree on a Gaussian: the chi-square CDF of |z|^2 (used
/// for Gaussian flows) and the fraction of posterior samples denser than the truth (used for
/// full_flow).
#[test]
fn hpd_level_from_chi_square_equals_the_sample_ranking() {
    use candle_core::{Device, Tensor};
    use rand::SeedableRng;
    let flow = starflow_flows::full_gaussian(3).unwrap();
    let params = Tensor::new(
        &[[0.3f64, -0.2, 0.1, -0.5, 0.4, 0.0, 0.3, -0.6, 0.2]],
        &Device::Cpu,
    )
    .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let n = 20_000;
    let samples = flow.sample(&params, n, &mut rng).unwrap();
    let pts = Tensor::from_vec(samples.values.clone(), (n, 3), &Device::Cpu).unwrap();
    let rep = params.broadcast_as((n, 9)).unwrap().contiguous().unwrap();
    let lp: Vec<f64> = flow.log_prob(&rep, &pts).unwrap().to_vec1().unwrap();
    for truth in [[0.3, -0.1, 0.2], [1.5, 0.5, -1.0], [-2.0, 2.0, 0.5]] {
        let x = Tensor::new(&[truth], &Device::Cpu).unwrap();
        let parts = flow.log_prob_parts(&params, &x).unwrap();
        let z: Vec<f64> = parts.z.flatten_all().unwrap().to_vec1().unwrap();
        let exact = starflow_inference::chi2_cdf(3, z.iter().map(|v| v * v).sum());
        let lt: f64 = parts.log_prob.to_vec1::<f64>().unwrap()[0];
        let ranked = lp.iter().filter(|&&v| v > lt).count() as f64 / n as f64;
        // Binomial noise of 20,000 samples: < 0.004 at one standard error.
        assert!(
            (exact - ranked).abs() < 0.012,
            "{truth:?}: {exact} vs {ranked}"
        );
    }
}

/// A deep ensemble is the equal-weight mixture of its members: one member, or a member twice, has
/// exactly that member's density; members from other data are refused.
#[test]
fn ensemble_of_copies_is_the_member_itself() {
    use starflow_inference::{evaluate_ensemble, EvalSource};
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "full_gaussian");
    let test = EvalSource::Split("test".into());
    let alone = evaluate(&run, "test", &PosteriorSettings::own(200, 4)).unwrap();
    let one = evaluate_ensemble(
        std::slice::from_ref(&run),
        &test,
        &PosteriorSettings::own(200, 4),
    )
    .unwrap();
    let two = evaluate_ensemble(
        &[run.clone(), run.clone()],
        &test,
        &PosteriorSettings::own(200, 4),
    )
    .unwrap();
    for e in [&one, &two] {
        assert!(
            (e.nll_z - alone.nll_z).abs() < 1e-9,
            "{} vs {}",
            e.nll_z,
            alone.nll_z
        );
        assert_eq!(e.n_stars, alone.n_stars);
        assert_eq!(e.joint_coverage.len(), 2);
        // Means from 200 samples against the exact ones: within a few sampling errors.
        for (a, b) in e.stars.iter().zip(&alone.stars) {
            for j in 0..3 {
                assert!((a.mean[j] - b.mean[j]).abs() < 0.5 * b.std[j], "label {j}");
            }
        }
    }
    assert!(two.flow.starts_with("ensemble of 2"), "{}", two.flow);
    let other = dir.path().join("other");
    let other_run = tiny_run(&other, "diagonal_gaussian");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(other_run.join("state.json")).unwrap())
            .unwrap();
    state["scaler"]["mean"][0] = 1.0.into();
    std::fs::write(other_run.join("state.json"), state.to_string()).unwrap();
    let err =
        evaluate_ensemble(&[run, other_run], &test, &PosteriorSettings::own(200, 4)).unwrap_err();
    assert!(err.to_string().contains("same data"), "{err}");
}

/// An ensemble is recalibrated as a whole: its maps are fitted on the first run's validation
/// split, and an ensemble of copies recalibrated by a run's own maps is that run recalibrated,
/// within the sampling noise of the mixture's 200 samples per star.
#[test]
fn recalibrated_ensemble_of_copies_is_the_recalibrated_member() {
    use starflow_inference::{evaluate_ensemble, fit_ensemble_calibration, EvalSource};
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "full_gaussian");
    let copies = [run.clone(), run.clone()];
    let fitted = fit_ensemble_calibration(&copies, Sampler::new(200, 4)).unwrap();
    assert_eq!((fitted.fitted_on.as_str(), fitted.maps.len()), ("val", 3));
    let c = fit_calibration(&run, Sampler::new(200, 4)).unwrap();
    let test = EvalSource::Split("test".into());
    let alone = evaluate(&run, "test", &Sampler::new(200, 4).with(Some(c.clone()))).unwrap();
    let both =
        evaluate_ensemble(&copies, &test, &Sampler::new(200, 4).with(Some(c.clone()))).unwrap();
    assert!(
        (both.nll_z - alone.nll_z).abs() < 0.15,
        "{} vs {}",
        both.nll_z,
        alone.nll_z
    );
    for (a, b) in both.stars.iter().zip(&alone.stars) {
        for j in 0..3 {
            assert!((a.mean[j] - b.mean[j]).abs() < 0.5 * b.std[j], "label {j}");
            assert!((a.std[j] / b.std[j] - 1.0).abs() < 0.3, "label {j}");
        }
    }
}

/// A map that is not affine takes the sampled path of the joint HPD levels (400 posterior samples
/// per star, ranked by the model's density over the maps' Jacobian): with a kink too small to
/// matter, its levels are the exact chi-square levels of the affine map within sampling noise.
#[test]
fn sampled_joint_levels_under_a_map_agree_with_the_exact_ones() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "full_gaussian");
    let c = fit_calibration_with(&run, Sampler::new(100, 3), CalibrationMethod::Affine).unwrap();
    let kinked = Calibration {
        maps: (0..3)
            .map(|j| {
                let [u0, v0] = c.map(j).knots[0];
                let s = c.scale[j];
                MarginalMap {
                    knots: vec![
                        [u0 - 1.0, v0 - s * (1.0 + 1e-9)],
                        [u0, v0],
                        [u0 + 1.0, v0 + s],
                    ],
                }
            })
            .collect(),
        ..c.clone()
    };
    assert!(!kinked.map(0).is_affine());
    let exact = evaluate(&run, "test", &Sampler::new(100, 3).with(Some(c.clone()))).unwrap();
    let sampled = evaluate(
        &run,
        "test",
        &Sampler::new(100, 3).with(Some(kinked.clone())),
    )
    .unwrap();
    assert!((exact.nll_z - sampled.nll_z).abs() < 1e-6);
    for (a, b) in exact.stars.iter().zip(&sampled.stars) {
        let (a, b) = (a.hpd.unwrap(), b.hpd.unwrap());
        // One sample level's binomial sd is at most 0.025 with 400 samples.
        assert!((a - b).abs() < 0.1, "{a} vs {b}");
    }
}

/// A calibration file written before maps existed (shifts and scales only) is the affine map.
#[test]
fn calibration_without_maps_is_affine() {
    let text = r#"{"labels":["t_eff","log_g","fe_h"],"scale":[2.0,1.0,0.5],"shift":[0.1,0.0,-0.2],
        "fitted_on":"val","n_stars":10,"epochs_done":2}"#;
    let c: Calibration = serde_json::from_str(text).unwrap();
    assert!(c.maps.is_empty());
    let g = c.map(0);
    assert!(g.is_affine());
    assert!((g.forward(1.5) - (-0.1 + 2.0 * 1.5)).abs() < 1e-12);
}

/// The NLL of a Gaussian flow under a radial map is the model's density at the truth as the
/// unscaled posterior sees it, `T⁻¹` of the standardised truth, over `det ∂T/∂u` there; and the
/// joint HPD levels rank the truth among samples by that same density.
#[test]
fn radial_map_enters_the_nll_through_its_jacobian() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "diagonal_gaussian");
    let c = fit_calibration(&run, Sampler::new(100, 1)).unwrap();
    // Too few validation stars for a fitted radial map: one is made by hand, with a kink in the
    // radius (wider beyond r = 1.5) and a stretched marginal map.
    assert!(c.radial.is_none());
    let radial = RadialMap {
        log_radius: MarginalMap {
            knots: vec![[-1.0, -1.1], [0.4, 0.3], [1.0, 1.2]],
        },
        marginals: vec![
            MarginalMap {
                knots: vec![[-1.0, -1.2], [0.0, 0.0], [1.0, 1.2]]
            };
            3
        ],
    };
    let with = Calibration {
        radial: Some(radial.clone()),
        ..ones(&c)
    };
    let raw = evaluate(&run, "val", &PosteriorSettings::own(100, 1)).unwrap();
    let mapped = evaluate(&run, "val", &Sampler::new(100, 1).with(Some(with.clone()))).unwrap();
    let identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    let n = raw.stars.len() as f64;
    let expected: f64 = raw
        .stars
        .iter()
        .map(|s| {
            let t = s.truth.as_ref().unwrap();
            let mut z: Vec<f64> = (0..3).map(|j| (t[j] - s.mean[j]) / s.std[j]).collect();
            radial.inverse(&mut z, &identity);
            (0..3)
                .map(|j| {
                    0.5 * (2.0 * std::f64::consts::PI).ln() + s.std[j].ln() + 0.5 * z[j] * z[j]
                })
                .sum::<f64>()
                + radial.log_det(&z, &identity)
        })
        .sum::<f64>()
        / n;
    assert_nll_is(mapped.nll, expected);
    // The map moves the truths' joint levels.
    assert!(raw
        .stars
        .iter()
        .zip(&mapped.stars)
        .any(|(a, b)| (a.hpd.unwrap() - b.hpd.unwrap()).abs() > 0.01));
}

/// With `data.calibration_n` the maps are fitted on a synthetic set of their own, drawn with
/// `data.calibration_seed` next to the data directory on first use: the quantile maps of that
/// set's evaluation, not of the validation split's.
#[test]
fn calibration_set_is_drawn_and_fitted_on() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_with_calibration_set(dir.path(), "diagonal_gaussian", 150, 7);
    let c = fit_calibration(&run, Sampler::new(100, 1)).unwrap();
    let set = dir.path().join("data-calibration-7");
    assert!(set.join("spectra.npy").exists());
    assert_eq!((c.fitted_on.as_str(), c.n_stars), ("calibration", 150));
    let on_set = evaluate_on(
        &run,
        &EvalSource::dir(&set),
        &PosteriorSettings::own(100, 1),
    )
    .unwrap();
    assert_eq!(
        c.maps,
        Calibration::fit(&on_set, CalibrationMethod::Quantile).maps
    );
    let on_val = evaluate(&run, "val", &PosteriorSettings::own(100, 1)).unwrap();
    assert_ne!(
        c.maps,
        Calibration::fit(&on_val, CalibrationMethod::Quantile).maps
    );
}

/// Maps saved for one calibration set are not reused once the run's config names another: a
/// larger `data.calibration_n` or another `data.calibration_seed` in `state.json` refits them on
/// the set it names now, and that fit is then kept.
#[test]
fn saved_maps_follow_the_configs_calibration_set() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_with_calibration_set(dir.path(), "diagonal_gaussian", 120, 7);
    let first = load_or_fit_calibration(&run, Sampler::new(100, 1)).unwrap();
    assert_eq!(
        (first.n_stars, first.set_seed, first.fitted_on.as_str()),
        (120, Some(7), "calibration")
    );
    let set_config = |n: u64, seed: u64| {
        let path = run.join("state.json");
        let mut state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        state["config"]["data"]["calibration_n"] = n.into();
        state["config"]["data"]["calibration_seed"] = seed.into();
        std::fs::write(&path, state.to_string()).unwrap();
    };
    set_config(160, 7);
    let larger = load_or_fit_calibration(&run, Sampler::new(100, 1)).unwrap();
    assert_eq!((larger.n_stars, larger.set_seed), (160, Some(7)));
    assert_ne!(larger.maps, first.maps);
    set_config(160, 8);
    let other = load_or_fit_calibration(&run, Sampler::new(100, 1)).unwrap();
    assert_eq!((other.n_stars, other.set_seed), (160, Some(8)));
    assert!(dir
        .path()
        .join("data-calibration-8")
        .join("spectra.npy")
        .exists());
    // Kept for the set it was fitted on: an edit to the saved file comes back.
    let path = run.join("calibration.json");
    let edited = Calibration {
        scale: vec![1.5, 1.5, 1.5],
        ..other
    };
    std::fs::write(&path, serde_json::to_string(&edited).unwrap()).unwrap();
    assert_eq!(
        load_or_fit_calibration(&run, Sampler::new(100, 1)).unwrap(),
        edited
    );
}

/// An ensemble's maps are fitted where its first run's own maps are: on that run's calibration
/// set when its config draws one, as the quantile maps of the mixture's evaluation there. The fit
/// skips the joint HPD levels, the evaluation here computes them: the maps must not differ.
#[test]
fn ensemble_calibration_is_fitted_on_the_first_runs_calibration_set() {
    use starflow_inference::{evaluate_ensemble, fit_ensemble_calibration};
    let dir = tempfile::tempdir().unwrap();
    let run = run_with_calibration_set(dir.path(), "full_gaussian", 120, 9);
    let copies = [run.clone(), run.clone()];
    let c = fit_ensemble_calibration(&copies, Sampler::new(100, 2)).unwrap();
    assert_eq!((c.fitted_on.as_str(), c.n_stars), ("calibration", 120));
    let set = EvalSource::dir(&dir.path().join("data-calibration-9"));
    let on_set = evaluate_ensemble(&copies, &set, &PosteriorSettings::own(100, 2)).unwrap();
    assert_eq!(
        c.maps,
        Calibration::fit(&on_set, CalibrationMethod::Quantile).maps
    );
}

/// An ensemble's maps take their optional parts (the per-star widening, the maps per kind) through
/// the same held-out check as a single run's: fitted on half the calibration stars, scored on the
/// other half. With 600 stars a widening can be fitted on the whole set (2 x MIN_WIDTH_STARS) but
/// not on a half, so the check keeps none, for the run and for the ensemble of its copies alike;
/// before the check covered ensembles, their maps always had it.
#[test]
fn ensemble_maps_pass_the_held_out_check_as_a_runs_do() {
    use starflow_inference::{fit_ensemble_calibration, MIN_WIDTH_STARS};
    let dir = tempfile::tempdir().unwrap();
    let run = run_with_calibration_set(dir.path(), "diagonal_gaussian", 600, 9);
    // The first fit generates the calibration set.
    let single = fit_calibration(&run, Sampler::new(200, 2)).unwrap();
    let set = EvalSource::dir(&dir.path().join("data-calibration-9"));
    let own = starflow_inference::evaluate_on(&run, &set, &PosteriorSettings::own(200, 2)).unwrap();
    assert!(own.n_stars >= 2 * MIN_WIDTH_STARS && own.n_stars / 2 < 2 * MIN_WIDTH_STARS);
    let unchecked = Calibration::fit(&own, CalibrationMethod::Quantile);
    assert!(unchecked.width.is_some(), "600 stars can fit a widening");
    let ensemble = fit_ensemble_calibration(&[run.clone(), run], Sampler::new(200, 2)).unwrap();
    for c in [&single, &ensemble] {
        assert_eq!(c.n_stars, 600);
        assert!(c.width.is_none() && c.kinds.is_none(), "{c:?}");
    }
}

/// Fitting skips the joint HPD levels (a log-prob per sample and star for a sampled flow), which
/// the maps never read: the fit equals one made from a full evaluation of the validation split,
/// so the sampler's stream is the same too.
#[test]
fn fitting_without_the_joint_levels_gives_the_same_maps() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "full_flow");
    let full = evaluate(&run, "val", &PosteriorSettings::own(100, 1)).unwrap();
    assert!(full.stars.iter().all(|s| s.hpd.is_some()));
    let got = fit_calibration(&run, Sampler::new(100, 1)).unwrap();
    let mut expected = Calibration::fit(&full, CalibrationMethod::Quantile);
    expected.epochs_done = got.epochs_done;
    expected.held_out_rule = got.held_out_rule;
    assert_eq!(got, expected);
}

/// An ensemble's maps are kept in its first run's directory and read back when the same members
/// are evaluated with the same sampler settings; another seed or another member list is fitted
/// again, giving what a fresh fit gives.
#[test]
fn ensemble_calibration_is_kept_for_the_same_ensemble() {
    use starflow_inference::{
        fit_ensemble_calibration, load_or_fit_ensemble_calibration, EnsembleCalibration,
        ENSEMBLE_CALIBRATION_FILE,
    };
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "full_gaussian");
    let two = [run.clone(), run.clone()];
    let fresh = fit_ensemble_calibration(&two, Sampler::new(100, 3)).unwrap();
    assert_eq!(
        load_or_fit_ensemble_calibration(&two, Sampler::new(100, 3)).unwrap(),
        fresh
    );
    // The next call reads the file: a mark put into it comes back.
    let file = run.join(ENSEMBLE_CALIBRATION_FILE);
    let mut saved: EnsembleCalibration =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    saved.calibration.n_stars += 1;
    std::fs::write(&file, serde_json::to_string(&saved).unwrap()).unwrap();
    let read = load_or_fit_ensemble_calibration(&two, Sampler::new(100, 3)).unwrap();
    assert_eq!(read.n_stars, fresh.n_stars + 1);
    // A file written before the held-out check covered ensembles (no `held_out_rule`, the mark
    // still in it): fitted again.
    assert_eq!(fresh.held_out_rule, starflow_inference::HELD_OUT_RULE);
    let mut old: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let calibration = old["calibration"].as_object_mut().unwrap();
    assert!(calibration.remove("held_out_rule").is_some());
    std::fs::write(&file, old.to_string()).unwrap();
    assert_eq!(
        load_or_fit_ensemble_calibration(&two, Sampler::new(100, 3)).unwrap(),
        fresh
    );
    // Another seed, then another member list: fitted again.
    let reseeded = load_or_fit_ensemble_calibration(&two, Sampler::new(100, 4)).unwrap();
    assert_eq!(
        reseeded,
        fit_ensemble_calibration(&two, Sampler::new(100, 4)).unwrap()
    );
    assert_ne!(reseeded.maps, fresh.maps);
    let three = [run.clone(), run.clone(), run.clone()];
    assert_eq!(
        load_or_fit_ensemble_calibration(&three, Sampler::new(100, 4)).unwrap(),
        fit_ensemble_calibration(&three, Sampler::new(100, 4)).unwrap()
    );
}
