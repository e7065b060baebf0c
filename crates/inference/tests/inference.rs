//! Inference end to end on runs trained on a tiny synthetic set: evaluation, prediction, and the
//! errors a user gets for a wrong spectrum file or a directory that is not a run.

use std::path::Path;

use starflow_inference::{evaluate, predict, PosteriorSettings, Sampler};
use starflow_training::config::TrainConfig;
use starflow_training::{train, Quiet, TrainOptions};

/// The shared tiny config (160 stars of 4 x 64 pixels, about a second) with 3 epochs.
fn tiny(data: &Path, flow: &str, backbone: &str) -> TrainConfig {
    TrainConfig::tiny(data, flow, backbone, 3)
}

fn opts(out: &Path) -> TrainOptions {
    TrainOptions::new(out)
}

#[test]
fn every_flow_and_backbone_trains_evaluates_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (flow, backbone) in [("diagonal_gaussian", "cnn"), ("full_flow", "tiny_cnn")] {
        let mut cfg = tiny(&data, flow, backbone);
        cfg.optim.epochs = 2;
        let run = dir.path().join(format!("{backbone}-{flow}"));
        let st = train(&cfg, &opts(&run), &Quiet).unwrap();
        assert!(st.best_val_nll.is_finite(), "{flow}/{backbone}");
        let e = evaluate(&run, "test", &PosteriorSettings::own(200, 1)).unwrap();
        assert_eq!(e.n_stars, st.n_test);
        assert_eq!(e.labels.len(), 3);
        for l in &e.labels {
            assert!(l.rmse.is_finite() && l.rmse > 0.0, "{l:?}");
            assert!(
                (0.0..=1.0).contains(&l.coverage_68) && l.coverage_68 <= l.coverage_95,
                "{l:?}"
            );
            assert!(l.rmse_over_crlb.is_some(), "synthetic data has crlb.npy");
        }
        // Posterior summaries are ordered and in physical units.
        for s in &e.stars {
            assert!(
                s.quantiles
                    .iter()
                    .all(|q| q.windows(2).all(|w| w[0] <= w[1])),
                "{s:?}"
            );
            assert!(
                s.mean[0] > 2000.0 && s.mean[0] < 9000.0,
                "t_eff in K: {s:?}"
            );
        }
        let p = predict(
            &run,
            &data.join("spectra.npy"),
            &PosteriorSettings::own(100, 2),
        )
        .unwrap();
        assert_eq!(p.len(), 160);
    }
}

#[test]
fn wrong_spectrum_length_is_a_user_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut cfg = tiny(&data, "diagonal_gaussian", "tiny_cnn");
    cfg.optim.epochs = 1;
    let run = dir.path().join("run");
    train(&cfg, &opts(&run), &Quiet).unwrap();
    let bad = dir.path().join("short.npy");
    starflow_data::npy::write_npy(&bad, &[2, 100], &[1f32; 200]).unwrap();
    let e = predict(&run, &bad, &PosteriorSettings::own(100, 0)).unwrap_err();
    assert!(e.is_user_error());
    assert!(
        e.to_string().contains("short.npy") && e.to_string().contains("100 pixels"),
        "{e}"
    );
    // A directory that is not a run.
    let e = evaluate(dir.path(), "test", &PosteriorSettings::own(100, 0)).unwrap_err();
    assert!(
        e.is_user_error() && e.to_string().contains("not a starflow run directory"),
        "{e}"
    );
    // A run of another format version.
    let state = std::fs::read_to_string(run.join("state.json")).unwrap();
    std::fs::write(
        run.join("state.json"),
        state.replacen("\"format\": 1", "\"format\": 99", 1),
    )
    .unwrap();
    let e = evaluate(&run, "test", &PosteriorSettings::own(100, 0)).unwrap_err();
    assert!(
        e.is_user_error() && e.to_string().contains("run format 99"),
        "{e}"
    );
}

#[test]
fn training_ends_with_the_recalibration_fitted_and_saved() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(&dir.path().join("data"), "diagonal_gaussian", "tiny_cnn");
    let run = dir.path().join("run");
    let saved = run.join("calibration.json");
    let mut told = false;
    let trained = starflow_inference::train_and_calibrate(&cfg, &opts(&run), &Quiet, |state| {
        // Called when the loop ends, before any calibration work.
        assert!(state.finished);
        assert!(!saved.exists());
        told = true;
    })
    .unwrap();
    assert!(told);
    let c = trained.calibration.expect("a finished run is recalibrated");
    assert_eq!(c.fitted_on, "val");
    assert!(saved.exists());
    // What predict and evaluate load is what training fitted.
    let loaded = starflow_inference::load_or_fit_calibration(
        &run,
        Sampler::new(starflow_inference::CALIBRATION_FIT_SAMPLES, 0),
    )
    .unwrap();
    assert_eq!(loaded, c);
}

/// A deep ensemble predicts on a spectra file as a single run does: shards concatenate to the
/// whole file's rows exactly, the mixture of a run with itself gives that run's posteriors up to
/// the sampling noise of the pooled samples, and its recalibration (fitted on the mixture) maps
/// them.
#[test]
fn ensemble_predictions_are_shard_invariant_and_match_their_members() {
    use starflow_inference::{fit_ensemble_calibration, Predictor, StarPrediction};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = dir.path().join("run");
    let mut cfg = tiny(&data, "diagonal_gaussian", "tiny_cnn");
    // Enough calibration stars for maps (the validation split of 160 stars has too few).
    cfg.data.calibration_n = 200;
    cfg.data.calibration_seed = 99;
    train(&cfg, &opts(&run), &Quiet).unwrap();
    let spectra = data.join("spectra.npy");
    let runs = [run.clone(), run.clone()];
    let settings = PosteriorSettings::own(400, 3);
    let all_of = |p: &Predictor| -> Vec<StarPrediction> {
        p.batches()
            .flat_map(|b| p.predict_batch(b).unwrap())
            .collect()
    };
    let open = |rows| Predictor::open_ensemble(&runs, &spectra, rows, settings.clone()).unwrap();
    let all = all_of(&open(None));
    assert_eq!(all.len(), 160);
    let mut shards = all_of(&open(Some((0, Some(37)))));
    shards.extend(all_of(&open(Some((37, None)))));
    assert_eq!(
        shards, all,
        "shards of an ensemble's predictions differ from the whole"
    );

    let single = predict(&run, &spectra, &settings).unwrap();
    for (e, s) in all.iter().zip(&single) {
        assert_eq!(e.row, s.row);
        for j in 0..3 {
            // 400 pooled samples: the mean is off by ~0.05 sd and the std by ~4 %.
            assert!(
                (e.mean[j] - s.mean[j]).abs() < 0.3 * s.std[j],
                "{e:?} vs {s:?}"
            );
            assert!((e.std[j] / s.std[j] - 1.0).abs() < 0.3, "{e:?} vs {s:?}");
        }
    }

    let c = fit_ensemble_calibration(&runs, Sampler::new(200, 3)).unwrap();
    assert!(!c.too_few_stars, "{c:?}");
    let mut p = open(None);
    p.set_calibration(Some(c));
    let mapped = all_of(&p);
    assert!(mapped.iter().zip(&all).any(|(m, a)| m.std != a.std));
    assert!(mapped
        .iter()
        .all(|m| m.std.iter().all(|s| s.is_finite() && *s > 0.0)));
}
