//! The real `starflow` binary, end to end: synth + inspect work, and bad input exits with code 2
//! and a message naming the file and the problem, never a panic.

use std::path::Path;
use std::process::{Command, Output};

use starflow_data::npy::write_npy;

fn starflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_starflow"))
        .args(args)
        .output()
        .expect("run starflow")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn synth(dir: &Path) {
    let out = dir.to_str().unwrap();
    let o = starflow(&[
        "synth",
        "--n",
        "40",
        "--seed",
        "3",
        "--pixels-per-camera",
        "128",
        "--out",
        out,
    ]);
    let (so, se) = text(&o);
    assert!(o.status.success(), "synth failed: {so}\n{se}");
    assert!(so.contains("wrote 40 stars x 512 pixels"), "{so}");
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

fn expect_user_error(args: &[&str], needles: &[&str]) {
    let o = starflow(args);
    let (so, se) = text(&o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "args {args:?}\nstdout {so}\nstderr {se}"
    );
    assert!(
        !se.contains("panicked") && !se.contains("RUST_BACKTRACE"),
        "{se}"
    );
    for n in needles {
        assert!(se.contains(n), "stderr lacks {n:?}: {se}");
    }
}

#[test]
fn bad_inputs_exit_2_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path());
    let d = dir.path();
    let s = d.join("spectra.npy");
    let l = d.join("labels.npy");
    let (s, l) = (s.to_str().unwrap(), l.to_str().unwrap());

    expect_user_error(&["inspect"], &["no data given", "--data"]);
    expect_user_error(
        &["inspect", "--data", "/no/such/dir"],
        &["/no/such/dir", "spectra.npy"],
    );

    let junk = d.join("junk.npy");
    std::fs::write(&junk, b"hello").unwrap();
    expect_user_error(
        &[
            "inspect",
            "--spectra",
            junk.to_str().unwrap(),
            "--labels",
            l,
        ],
        &["junk.npy", "not an npy file"],
    );

    let short = d.join("short.npy");
    write_npy(&short, &[40, 3], &vec![1.0f64; 120]).unwrap();
    expect_user_error(
        &[
            "inspect",
            "--spectra",
            s,
            "--labels",
            short.to_str().unwrap(),
        ],
        &["short.npy", "too few label columns"],
    );

    let nan = d.join("nan.npy");
    let mut v = vec![1f32; 40 * 512];
    v[5 * 512 + 9] = f32::NAN;
    write_npy(&nan, &[40, 512], &v).unwrap();
    expect_user_error(
        &["inspect", "--spectra", nan.to_str().unwrap(), "--labels", l],
        &["nan.npy", "non-finite", "first rows: 5", "--drop-nonfinite"],
    );
    let o = starflow(&[
        "inspect",
        "--spectra",
        nan.to_str().unwrap(),
        "--labels",
        l,
        "--drop-nonfinite",
    ]);
    let (so, se) = text(&o);
    assert!(o.status.success(), "{se}");
    assert!(
        so.contains("39 usable stars") && so.contains("1 rows dropped"),
        "{so}"
    );

    expect_user_error(
        &[
            "inspect",
            "--data",
            d.to_str().unwrap(),
            "--targets",
            "teff",
        ],
        &["unknown label column 'teff'"],
    );
    expect_user_error(
        &["synth", "--n", "0", "--out", d.join("x").to_str().unwrap()],
        &["`n`", "at least 1"],
    );
    expect_user_error(
        &[
            "synth",
            "--snr-min=-3",
            "--out",
            d.join("x").to_str().unwrap(),
        ],
        &["snr_min"],
    );
    // clap's own usage errors also exit with 2.
    expect_user_error(&["inspect", "--bogus"], &["--bogus"]);
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
    let o = starflow(&[
        "train",
        "--config",
        cfg_s,
        "--flow",
        "full_gaussian",
        "--out",
        run_s,
    ]);
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

    // Training again into the same directory without --resume is refused; a typo'd key suggests the fix.
    expect_user_error(
        &["train", "--config", cfg_s, "--out", run_s],
        &["already holds a run", "--resume"],
    );
    expect_user_error(
        &[
            "train",
            "--config",
            cfg_s,
            "--set",
            "optim.lrr=0.1",
            "--out",
            d.join("x").to_str().unwrap(),
        ],
        &["did you mean `lr`?"],
    );
    expect_user_error(
        &["evaluate", "--run", d.to_str().unwrap()],
        &["not a starflow run directory"],
    );
    let short = d.join("short.npy");
    write_npy(&short, &[1, 7], &[1f32; 7]).unwrap();
    expect_user_error(
        &[
            "predict",
            "--run",
            run_s,
            "--spectra",
            short.to_str().unwrap(),
        ],
        &["short.npy", "7 pixels", "256 pixels"],
    );
}
