//! Training end to end on a tiny synthetic set: determinism, bit-exact resume, non-finite steps,
//! configuration errors (evaluation and prediction: the inference crate's tests).

use std::path::Path;

use starflow_flows::OffDiagonal;
use starflow_training::config::TrainConfig;
use starflow_training::{train, Quiet, TrainError, TrainOptions};

/// The shared tiny config (160 stars of 4 x 64 pixels, about a second) with 3 epochs.
fn tiny(data: &Path, flow: &str, backbone: &str) -> TrainConfig {
    TrainConfig::tiny(data, flow, backbone, 3)
}

fn opts(out: &Path) -> TrainOptions {
    TrainOptions::new(out)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// metrics.csv without the wall-clock column, which is the one thing allowed to differ.
fn metrics_without_seconds(run: &Path) -> String {
    String::from_utf8(read(&run.join("metrics.csv")))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            format!("{},{},{},{},{}", f[0], f[1], f[2], f[3], f[5])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn same_seed_same_run_and_resume_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = tiny(&data, "full_gaussian", "tiny_cnn");
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let c = dir.path().join("c");
    let st = train(&cfg, &opts(&a), &Quiet).unwrap();
    assert_eq!(st.epochs_done, 3);
    assert!(st
        .history
        .iter()
        .all(|r| r.train_nll.is_finite() && r.val_nll.is_finite()));
    train(&cfg, &opts(&b), &Quiet).unwrap();
    assert_eq!(metrics_without_seconds(&a), metrics_without_seconds(&b));
    assert_eq!(
        read(&a.join("model.safetensors")),
        read(&b.join("model.safetensors"))
    );

    // Interrupted after one epoch, then resumed: the same final weights, bit for bit.
    let mut short = cfg.clone();
    short.optim.epochs = 1;
    train(&short, &opts(&c), &Quiet).unwrap();
    let err = train(&cfg, &opts(&c), &Quiet).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
    let resumed = train(
        &cfg,
        &TrainOptions {
            resume: true,
            ..opts(&c)
        },
        &Quiet,
    )
    .unwrap();
    assert_eq!(resumed.epochs_done, 3);
    assert_eq!(
        read(&a.join("checkpoint/model-e0003.safetensors")),
        read(&c.join("checkpoint/model-e0003.safetensors"))
    );
    assert_eq!(
        read(&a.join("model.safetensors")),
        read(&c.join("model.safetensors"))
    );
    assert_eq!(metrics_without_seconds(&a), metrics_without_seconds(&c));
    // Only the latest epoch's checkpoint pair is kept.
    let files: Vec<_> = std::fs::read_dir(c.join("checkpoint"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
}

#[test]
fn non_finite_steps_are_skipped_and_counted_then_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut cfg = tiny(&data, "diagonal_gaussian", "tiny_cnn");
    cfg.optim.epochs = 2;
    let run = dir.path().join("skip");
    let st = train(
        &cfg,
        &TrainOptions {
            inject_nan_steps: vec![1, 2],
            ..opts(&run)
        },
        &Quiet,
    )
    .unwrap();
    assert_eq!(st.history[0].steps_skipped, 2, "{:?}", st.history);
    assert_eq!(st.history[1].steps_skipped, 0);
    assert!(st.history.iter().all(|r| r.train_nll.is_finite()));
    let csv = String::from_utf8(read(&run.join("metrics.csv"))).unwrap();
    assert!(csv.lines().nth(1).unwrap().ends_with(",2"), "{csv}");

    // Too many in a row: a clear error, and the previous epoch's checkpoint is intact.
    cfg.optim.max_bad_steps = 3;
    let run = dir.path().join("diverge");
    let steps_per_epoch = 4; // 112 training stars / 32
    let nan: Vec<u64> = (steps_per_epoch..steps_per_epoch + 3).collect();
    let e = train(
        &cfg,
        &TrainOptions {
            inject_nan_steps: nan,
            ..opts(&run)
        },
        &Quiet,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            TrainError::Diverged {
                count: 3,
                epoch: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("last good checkpoint"), "{e}");
    let st = starflow_training::RunDir::new(&run).load_state().unwrap();
    assert_eq!(st.epochs_done, 1);
    assert!(run.join(st.model_file.unwrap()).exists());
}

#[test]
fn config_errors_name_the_key_and_suggest_a_fix() {
    let p = Path::new("my.toml");
    let cases: &[(&str, &[&str])] = &[
        (
            "[optim]\nlearning_rat = 1e-3\n",
            &["my.toml", "unknown key `learning_rat`", "[optim]"],
        ),
        ("[optim]\nlrr = 1e-3\n", &["did you mean `lr`?"]),
        ("[optim]\nseed = 3\n", &["`seed` belongs in [run]"]),
        ("[optm]\nlr = 1e-3\n", &["did you mean [optim]?"]),
        (
            "[optim]\nlr = -1e-3\n",
            &["optim.lr = -0.001 (from my.toml): must be a positive number"],
        ),
        (
            "[optim]\nbatch_size = 0\n",
            &["optim.batch_size = 0 (from my.toml): must be an integer >= 1"],
        ),
        (
            "[data]\ntrain_fraction = 0.8\nval_fraction = 0.15\ntest_fraction = 0.15\n",
            &["data.train_fraction = 0.8", "sum to 1.1000"],
        ),
        (
            "[model]\nflow = \"maf\"\n",
            &["model.flow `maf` is unknown", "full_flow"],
        ),
        (
            "[model]\nbackbone = \"resnet\"\n",
            &["model.backbone `resnet` is unknown", "tiny_cnn"],
        ),
        (
            "[optim]\nlr = \"fast\"\n",
            &[
                "my.toml",
                "optim.lr = \"fast\" (from my.toml)",
                "invalid type",
                "must be a positive number",
            ],
        ),
        (
            "[data]\nsynthetic_n = -5\n",
            &[
                "data.synthetic_n = -5 (from my.toml)",
                "must be an integer >= 1",
            ],
        ),
        ("[optim\n", &["my.toml", "invalid TOML"]),
    ];
    for (text, needles) in cases {
        let e = TrainConfig::from_toml(text, p).unwrap_err();
        assert!(e.is_user_error(), "{e}");
        for n in *needles {
            assert!(e.to_string().contains(n), "{text:?}: {e} lacks {n:?}");
        }
    }
    let mut cfg = TrainConfig::default();
    cfg.apply_overrides(&["optim.lr=3e-4".into(), "model.flow=full_flow".into()], p)
        .unwrap();
    assert_eq!(cfg.optim.lr, 3e-4);
    assert_eq!(cfg.model.flow, "full_flow");
    let e = cfg.apply_overrides(&["optim.lrr=1".into()], p).unwrap_err();
    assert!(e.to_string().contains("did you mean `lr`?"), "{e}");
    // An override's error names the key, the override as given and what the key accepts, both for
    // a value of the wrong type (a negative count) and for one out of range.
    for (ov, needles) in [
        (
            "optim.batch_size=-3",
            &[
                "my.toml: optim.batch_size = -3 (from the command line: optim.batch_size=-3)",
                "must be an integer >= 1",
            ],
        ),
        (
            "model.dropout=0.7",
            &[
                "my.toml: model.dropout = 0.7 (from the command line: model.dropout=0.7)",
                "must be a number in [0, 0.5)",
            ],
        ),
    ] {
        let e = cfg.apply_overrides(&[ov.into()], p).unwrap_err();
        assert!(e.is_user_error(), "{e}");
        for n in needles {
            assert!(e.to_string().contains(n), "{ov}: {e} lacks {n:?}");
        }
    }
}

#[test]
fn shipped_configs_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for name in ["reference", "recommended", "quick", "full"] {
        let cfg = TrainConfig::from_file(&root.join(format!("configs/{name}.toml"))).unwrap();
        assert_eq!(cfg.optim.batch_size, 64, "{name}");
    }
    let r = TrainConfig::from_file(&root.join("configs/reference.toml")).unwrap();
    assert_eq!((r.optim.lr, r.optim.epochs), (0.8e-4, 10));
    // The reference keeps jammy_flows' parameterisation and no warm-up, for fidelity.
    assert_eq!(r.model.offdiagonal, OffDiagonal::Absolute);
    assert_eq!(r.optim.offdiagonal_warmup_epochs, 0);
    for name in ["recommended", "quick", "full"] {
        let c = TrainConfig::from_file(&root.join(format!("configs/{name}.toml"))).unwrap();
        assert_eq!(c.model.offdiagonal, OffDiagonal::Relative, "{name}");
        assert!(c.optim.offdiagonal_warmup_epochs > 0, "{name}");
    }
}

/// The off-diagonal warm-up: the head rows of the correlation outputs start at zero and, while the
/// gate is closed, get no gradient (so the model is exactly a diagonal Gaussian); once it opens
/// they learn. Both backbones name their head.
#[test]
fn offdiagonal_warmup_holds_the_correlations_at_zero() {
    use candle_core::{DType, Device, Tensor};
    for backbone in ["cnn", "tiny_cnn"] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny(dir.path(), "full_gaussian", backbone);
        cfg.model.offdiagonal = OffDiagonal::Relative;
        cfg.optim.offdiagonal_warmup_epochs = 2;
        let model = starflow_training::StarModel::new(&cfg, 256, 3, &Device::Cpu).unwrap();
        let cols = model.offdiagonal_columns();
        assert_eq!(cols, vec![6, 7, 8], "{backbone}");
        let head = |suffix: &str| {
            let name = format!("{}.{suffix}", model.backbone.head_prefix());
            model.varmap.data().lock().unwrap()[&name].clone()
        };
        let w: Vec<Vec<f32>> = head("weight").as_tensor().to_vec2().unwrap();
        let b: Vec<f32> = head("bias").as_tensor().to_vec1().unwrap();
        for c in 0..9 {
            let zero = w[c].iter().all(|v| *v == 0.0) && b[c] == 0.0;
            assert_eq!(zero, cols.contains(&c), "{backbone}: head row {c}");
        }
        let x = Tensor::randn(0f32, 1.0, (4, 1, 256), &Device::Cpu).unwrap();
        let y = Tensor::randn(0f64, 1.0, (4, 3), &Device::Cpu).unwrap();
        let grad_rows = |open: bool| -> Vec<f32> {
            let loss = model
                .nll_gated(&x, &y, true, open)
                .unwrap()
                .mean_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let gw = g.get(head("weight").as_tensor()).unwrap();
            let gw: Vec<Vec<f32>> = gw.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
            cols.iter()
                .map(|&c| gw[c].iter().map(|v| v.abs()).sum())
                .collect()
        };
        assert!(
            grad_rows(false).iter().all(|g| *g == 0.0),
            "{backbone}: closed gate"
        );
        assert!(
            grad_rows(true).iter().all(|g| *g > 0.0),
            "{backbone}: open gate"
        );
    }
}

/// With the same seed the full Gaussian's network starts as the diagonal one's: every variable
/// is equal, and its head's rows for the means and scales are the diagonal head (the correlation
/// rows start at zero under the off-diagonal warm-up). Trained through the warm-up, where the
/// correlations are held at zero, the two runs then take the same steps.
#[test]
fn full_gaussian_starts_and_warms_up_as_the_diagonal_gaussian() {
    use candle_core::Device;
    use starflow_training::StarModel;
    let dir = tempfile::tempdir().unwrap();
    let cfg = |flow: &str| {
        let mut c = TrainConfig::tiny(&dir.path().join("data"), flow, "cnn", 1);
        c.model.offdiagonal = OffDiagonal::Relative;
        c.optim.offdiagonal_warmup_epochs = 1;
        c
    };
    let (diag, full) = (cfg("diagonal_gaussian"), cfg("full_gaussian"));
    let a = StarModel::new(&diag, 256, 3, &Device::Cpu).unwrap();
    let b = StarModel::new(&full, 256, 3, &Device::Cpu).unwrap();
    let (a, b) = (
        a.varmap.data().lock().unwrap(),
        b.varmap.data().lock().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (name, va) in a.iter() {
        let (ta, tb) = (va.as_tensor(), b[name].as_tensor());
        let rows = ta.dims()[0];
        let tb = tb.narrow(0, 0, rows).unwrap();
        let (va, vb): (Vec<f32>, Vec<f32>) = (
            ta.flatten_all().unwrap().to_vec1().unwrap(),
            tb.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(va, vb, "{name}");
    }
    drop((a, b));
    let (ra, rb) = (dir.path().join("diag"), dir.path().join("full"));
    train(&diag, &opts(&ra), &Quiet).unwrap();
    train(&full, &opts(&rb), &Quiet).unwrap();
    let nll = |run: &Path| -> Vec<f64> {
        let text = String::from_utf8(read(&run.join("metrics.csv"))).unwrap();
        let row = text.lines().nth(1).unwrap().split(',').collect::<Vec<_>>();
        vec![row[1].parse().unwrap(), row[2].parse().unwrap()]
    };
    let (na, nb) = (nll(&ra), nll(&rb));
    for (x, y) in na.iter().zip(&nb) {
        assert!((x - y).abs() < 1e-4 * x.abs().max(1.0), "{na:?} vs {nb:?}");
    }
}

/// Auxiliary targets (`data.aux_file`): extra head rows trained beside the flow. With weight 0 the
/// run is the plain run exactly (the extra rows get no gradient and the shared weights start the
/// same, `seeded_init` drawing row-major); with weight 1 it differs; a file of the wrong shape is
/// the user's to fix, named.
#[test]
fn auxiliary_targets_train_extra_head_rows_and_a_bad_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let plain_cfg = tiny(&data, "diagonal_gaussian", "tiny_cnn");
    let plain = dir.path().join("plain");
    train(&plain_cfg, &opts(&plain), &Quiet).unwrap();
    // Targets that follow the labels (t_eff and fe_h), one entry missing.
    let labels = starflow_data::npy::NpyArray::open(data.join("labels.npy"))
        .unwrap()
        .to_f64_vec();
    let n = labels.len() / 8;
    let mut aux: Vec<f64> = (0..n)
        .flat_map(|i| [labels[i * 8 + 4], labels[i * 8 + 6]])
        .collect();
    aux[3] = f64::NAN;
    starflow_data::npy::write_npy(data.join("aux.npy"), &[n, 2], &aux).unwrap();
    let with = |weight: f64, outputs: usize| {
        let mut cfg = plain_cfg.clone();
        cfg.data.aux_file = "aux.npy".into();
        cfg.model.aux_outputs = outputs;
        cfg.optim.aux_weight = weight;
        cfg
    };
    let zero = dir.path().join("zero");
    train(&with(0.0, 2), &opts(&zero), &Quiet).unwrap();
    assert_eq!(
        metrics_without_seconds(&plain),
        metrics_without_seconds(&zero)
    );
    let one = dir.path().join("one");
    train(&with(1.0, 2), &opts(&one), &Quiet).unwrap();
    assert_ne!(
        metrics_without_seconds(&plain),
        metrics_without_seconds(&one)
    );
    // The trained run loads (inference ignores the extra rows) and gives finite NLLs.
    let (_, model) = starflow_training::load_run(&one).unwrap();
    assert_eq!(model.aux_outputs, 2);

    let e = train(&with(1.0, 3), &opts(&dir.path().join("bad")), &Quiet).unwrap_err();
    assert!(e.is_user_error(), "{e}");
    let msg = e.to_string();
    for needle in ["aux.npy", "has 2 columns", "model.aux_outputs = 3"] {
        assert!(msg.contains(needle), "{msg} lacks {needle:?}");
    }
    let mut unpaired = plain_cfg.clone();
    unpaired.data.aux_file = "aux.npy".into();
    let e = unpaired
        .validate(Path::new("my.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.aux_file"), "{e}");
    let mut headless = plain_cfg.clone();
    headless.model.aux_outputs = 2;
    let e = train(&headless, &opts(&dir.path().join("headless")), &Quiet).unwrap_err();
    assert!(e.is_user_error(), "{e}");
    assert!(e.to_string().contains("data.aux_file is empty"), "{e}");
}
