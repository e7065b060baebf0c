//! Helpers shared by the tests that run the real `starflow` binary: running it with a clean
//! environment, tiny synthetic data sets and configs, and checks on run directories.

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use starflow_training::{RunDir, RunState};

/// The binary under test, with an environment that cannot change what the tests see: no test
/// hooks or log filters inherited from the caller, and `RUST_BACKTRACE=1` so that an error or
/// panic carrying a backtrace is visible to the "no backtrace" checks whatever the caller set.
pub fn command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_starflow"));
    for var in [
        "RUST_LOG",
        "STARFLOW_PAUSE_AT",
        "STARFLOW_INJECT_NAN_STEPS",
        "RAYON_NUM_THREADS",
    ] {
        c.env_remove(var);
    }
    c.env("RUST_BACKTRACE", "1");
    c
}

/// Runs the binary to completion.
pub fn starflow<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    command().args(args).output().expect("run starflow")
}

/// Stdout and stderr as text.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Panics unless the command succeeded; returns stdout and stderr.
pub fn ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> (String, String) {
    let o = starflow(args);
    let (so, se) = text(&o);
    assert!(
        o.status.success(),
        "starflow {args:?} failed ({:?})\nstdout {so}\nstderr {se}",
        o.status
    );
    (so, se)
}

/// `starflow synth` of `n` stars with `4 * ppc` pixels into `dir`.
pub fn synth(dir: &Path, n: usize, ppc: usize) {
    let (so, _) = ok(&[
        "synth",
        "--n",
        &n.to_string(),
        "--seed",
        "3",
        "--pixels-per-camera",
        &ppc.to_string(),
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(
        so.contains(&format!("wrote {n} stars x {} pixels", 4 * ppc)),
        "{so}"
    );
}

/// A CNNModel + diagonal Gaussian config on the data in `data`: about 0.1 s per epoch of 160
/// stars x 256 pixels in the debug binary (TinyCNN takes 2.5 times as long there). One thread, so
/// that resumed runs are bit-identical to straight ones. With seed 1 the validation NLL improves
/// in each of the first three epochs.
pub fn tiny_config(path: &Path, data: &Path, epochs: usize, extra: &str) -> PathBuf {
    std::fs::write(
        path,
        format!(
            "[data]\ndir = \"{}\"\nsynthetic = false\n[model]\nbackbone = \"cnn\"\n\
             [optim]\nepochs = {epochs}\nbatch_size = 32\nlr = 1e-3\n[run]\nseed = 1\nthreads = 1\n{extra}",
            data.display()
        ),
    )
    .unwrap();
    path.to_path_buf()
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `state.json` of a run, parsed and format-checked by the library.
pub fn state(run: &Path) -> RunState {
    RunDir::new(run)
        .load_state()
        .unwrap_or_else(|e| panic!("{}: {e}", run.display()))
}

/// The state with the wall-clock seconds zeroed: the one thing that differs between two
/// otherwise identical runs.
pub fn state_without_seconds(run: &Path) -> RunState {
    let mut s = state(run);
    for r in &mut s.history {
        r.seconds = 0.0;
    }
    s
}

/// metrics.csv without the seconds column.
pub fn metrics_without_seconds(run: &Path) -> String {
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

/// Every `*.safetensors` file under `run` (run root and `checkpoint/`), sorted by path.
pub fn safetensors_files(run: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in [run.to_path_buf(), run.join("checkpoint")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_file() && p.extension().is_some_and(|x| x == "safetensors") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Loads a safetensors file and returns every value as f64 (panics naming the file otherwise).
pub fn load_values(p: &Path) -> Vec<(String, Vec<f64>)> {
    let tensors = candle_core::safetensors::load(p, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", p.display()));
    let mut out: Vec<(String, Vec<f64>)> = tensors
        .into_iter()
        .map(|(name, t)| {
            let v = t
                .to_dtype(candle_core::DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
                .unwrap_or_else(|e| panic!("{}: {name}: {e}", p.display()));
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "{} holds no tensors", p.display());
    out
}

/// What must hold after any kill or failure: every safetensors file parses, `state.json` parses,
/// and the checkpoint files it names exist and parse. Returns the state.
pub fn check_run_is_readable(run: &Path, context: &str) -> RunState {
    for p in safetensors_files(run) {
        let tensors = candle_core::safetensors::load(&p, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{context}: {} does not parse: {e}", p.display()));
        assert!(!tensors.is_empty(), "{context}: {} is empty", p.display());
    }
    let st = state(run);
    // metrics.csv is written just before state.json, so it may be one epoch ahead; it must be whole.
    let csv = String::from_utf8(read(&run.join("metrics.csv"))).unwrap();
    let rows = csv.lines().count().saturating_sub(1);
    assert!(
        csv.ends_with('\n')
            && csv.lines().all(|l| l.split(',').count() == 6)
            && (rows == st.epochs_done || rows == st.epochs_done + 1),
        "{context}: metrics.csv is damaged or out of step with state.json:\n{csv}"
    );
    for f in [&st.model_file, &st.optimizer_file].into_iter().flatten() {
        assert!(
            run.join(f).is_file(),
            "{context}: state.json names {f}, which is missing"
        );
    }
    st
}

/// Names and bytes of the files in `run/checkpoint`, plus `model.safetensors`: what a resumed run
/// must reproduce exactly.
pub fn final_files(run: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(run.join("checkpoint"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                format!("checkpoint/{}", e.file_name().to_string_lossy()),
                read(&e.path()),
            )
        })
        .collect();
    out.push((
        "model.safetensors".into(),
        read(&run.join("model.safetensors")),
    ));
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Asserts that `run` ended exactly like the uninterrupted `reference`: same checkpoint files
/// (names and bytes), same best weights, same metrics and state apart from wall-clock seconds.
pub fn assert_same_run(run: &Path, reference: &Path, context: &str) {
    let (a, b) = (final_files(run), final_files(reference));
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "{context}: different files");
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            x == y,
            "{context}: {name} differs from the uninterrupted run"
        );
    }
    assert_eq!(
        metrics_without_seconds(run),
        metrics_without_seconds(reference),
        "{context}: metrics.csv"
    );
    assert_eq!(
        state_without_seconds(run),
        state_without_seconds(reference),
        "{context}: state.json"
    );
}
