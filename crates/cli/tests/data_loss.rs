//! Commands that used to lose data or pretend to succeed (issue 30): each must now exit with code
//! 2 and a message naming the directory, the problem and the fix, and leave every file as it was.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Exit code 2, every needle in stderr, no panic or backtrace.
fn refused(args: &[&str], needles: &[&str]) {
    let o = starflow(args);
    let (so, se) = text(&o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "starflow {args:?}: expected exit 2\nstdout {so}\nstderr {se}"
    );
    for n in needles {
        assert!(
            se.contains(n),
            "starflow {args:?}: `{n}` not in stderr:\n{se}"
        );
    }
    assert!(
        !se.contains("panicked") && !se.contains("stack backtrace"),
        "{se}"
    );
}

/// Every file under `dir` with its bytes, sorted by path.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let name = e.path().strip_prefix(dir).unwrap().display().to_string();
                out.push((name, read(&e.path())));
            }
        }
    }
    out.sort();
    out
}

/// A temporary directory with 40 synthetic stars in `data` and a one-epoch config for them.
fn tiny_data() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, 40, 32);
    let cfg = tiny_config(&dir.path().join("tiny.toml"), &data, 1, "");
    (dir, data, cfg)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn resume_without_a_run_is_refused_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("runs").join("typo");
    // Run from the temporary directory, so that a default-config fallback would show as ./data.
    let o = command()
        .current_dir(dir.path())
        .args(["train", "--resume", "--out", s(&typo)])
        .output()
        .unwrap();
    let (_, se) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{se}");
    assert!(
        se.contains("no run to resume") && se.contains("drop --resume"),
        "{se}"
    );
    assert!(!typo.exists(), "--resume created {}", typo.display());
    assert!(!dir.path().join("data").exists(), "--resume generated data");

    // A run killed in its first epoch (config.toml, no state.json) starts again from its own
    // config, not from the defaults.
    let (_tiny, _, cfg) = tiny_data();
    let killed = dir.path().join("killed");
    std::fs::create_dir(&killed).unwrap();
    std::fs::copy(&cfg, killed.join("config.toml")).unwrap();
    let (_, se) = ok(&["train", "--resume", "--out", s(&killed)]);
    assert!(
        se.contains("stopped before its first epoch was committed"),
        "{se}"
    );
    assert_eq!(state(&killed).epochs_done, 1);
}

#[test]
fn a_new_run_never_overwrites_a_directory_of_something_else() {
    let (dir, _, cfg) = tiny_data();

    // The names a run writes, but not a run's: a foreign config.toml.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(foreign.join("checkpoint")).unwrap();
    std::fs::write(foreign.join("model.safetensors"), b"my own weights").unwrap();
    std::fs::write(foreign.join("metrics.csv"), b"a,b\n1,2\n").unwrap();
    std::fs::write(foreign.join("config.toml"), b"title = \"my project\"\n").unwrap();
    std::fs::write(foreign.join("checkpoint/model-e0001.safetensors"), b"x").unwrap();
    let before = snapshot(&foreign);
    refused(
        &["train", "--config", s(&cfg), "--out", s(&foreign)],
        &[
            "foreign",
            "not a starflow run",
            "config.toml",
            "new or empty --out",
        ],
    );
    assert_eq!(snapshot(&foreign), before, "the directory's files changed");

    // Other files without any config.
    let notes = dir.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("notes.txt"), b"keep me").unwrap();
    refused(
        &["train", "--config", s(&cfg), "--out", s(&notes)],
        &["not a starflow run", "`notes.txt`"],
    );
    assert_eq!(read(&notes.join("notes.txt")), b"keep me");

    // An empty directory, and one holding a run killed before its first commit, are fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    ok(&["train", "--config", s(&cfg), "--out", s(&empty)]);
    let killed = dir.path().join("killed");
    std::fs::create_dir(&killed).unwrap();
    std::fs::copy(empty.join("config.toml"), killed.join("config.toml")).unwrap();
    ok(&["train", "--config", s(&cfg), "--out", s(&killed)]);

    // --resume keeps the run's config: a different setting is refused, not ignored; the same
    // command with a larger epoch budget resumes.
    let state = read(&empty.join("state.json"));
    refused(
        &[
            "train",
            "--resume",
            "--out",
            s(&empty),
            "--flow",
            "full_flow",
            "--set",
            "optim.lr=0.01",
        ],
        &[
            "--resume continues the run with the config it started with",
            "model.flow = \"full_flow\"",
            "the run has \"diagonal_gaussian\"",
            "optim.lr = 0.01",
            "only --epochs",
        ],
    );
    assert_eq!(read(&empty.join("state.json")), state);
    let (so, _) = ok(&[
        "train",
        "--config",
        s(&cfg),
        "--resume",
        "--out",
        s(&empty),
        "--epochs",
        "2",
    ]);
    assert!(so.contains("2 epochs"), "{so}");
}

#[test]
fn synth_never_replaces_other_data_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("set");
    synth(&set, 12, 16);
    let args = |out: &Path, seed: &str| {
        [
            "synth",
            "--n",
            "12",
            "--seed",
            seed,
            "--pixels-per-camera",
            "16",
            "--out",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([s(out).to_string()])
        .collect::<Vec<_>>()
    };
    // The same settings again: the same bytes, allowed.
    ok(&args(&set, "3"));
    // Other settings: refused, files kept; --force replaces them.
    let before = snapshot(&set);
    let other: Vec<String> = args(&set, "4");
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    refused(
        &other,
        &[
            "set",
            "already holds",
            "spectra.npy",
            "other settings",
            "--force",
        ],
    );
    assert_eq!(snapshot(&set), before);
    let mut forced = other.clone();
    forced.push("--force");
    ok(&forced);
    assert_ne!(snapshot(&set), before);

    // Real data (no synth.json of ours): refused.
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::copy(set.join("spectra.npy"), real.join("spectra.npy")).unwrap();
    std::fs::copy(set.join("labels.npy"), real.join("labels.npy")).unwrap();
    let before = snapshot(&real);
    let to_real = args(&real, "3");
    let to_real: Vec<&str> = to_real.iter().map(String::as_str).collect();
    refused(
        &to_real,
        &[
            "real",
            "spectra.npy, labels.npy",
            "possibly real data",
            "--force",
        ],
    );
    assert_eq!(snapshot(&real), before);
}

#[test]
fn a_target_named_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, 20, 16);
    refused(
        &["inspect", "--data", s(&data), "--targets", "t_eff,t_eff"],
        &["targets", "'t_eff' is named twice"],
    );
    let cfg = tiny_config(&dir.path().join("tiny.toml"), &data, 1, "");
    let out = dir.path().join("run");
    refused(
        &[
            "train",
            "--config",
            s(&cfg),
            "--set",
            "data.targets=[\"t_eff\",\"t_eff\"]",
            "--out",
            s(&out),
        ],
        &["data.targets", "'t_eff' is named twice"],
    );
    assert!(!out.exists());
}

/// A tiny run trained on a tiny synthetic set: the temporary directory, the run, its spectra.
fn trained_run() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (dir, data, cfg) = tiny_data();
    let run = dir.path().join("run");
    ok(&["train", "--config", s(&cfg), "--out", s(&run)]);
    (dir, run, data.join("spectra.npy"))
}

/// `starflow predict` of `spectra` with `run` into `out`.
fn predict_args<'a>(run: &'a Path, spectra: &'a Path, out: &'a Path) -> Vec<&'a str> {
    let (run, spectra, out) = (s(run), s(spectra), s(out));
    vec!["predict", "--run", run, "--spectra", spectra, "--out", out]
}

#[test]
fn a_damaged_weight_file_is_named_instead_of_predicting_nonsense() {
    let (dir, run, spectra) = trained_run();
    let out = dir.path().join("p.csv");
    let mut predict = predict_args(&run, &spectra, &out);
    predict.push("--raw");
    ok(&predict);
    std::fs::remove_file(&out).unwrap();

    // A few hundred bytes overwritten in the middle of the tensors: still valid safetensors.
    let overwrite = |path: &Path| {
        let mut bytes = read(path);
        let mid = bytes.len() / 2;
        bytes[mid..mid + 300].fill(0x7f);
        std::fs::write(path, bytes).unwrap();
    };
    let best = run.join("model.safetensors");
    let good = read(&best);
    overwrite(&best);
    refused(
        &predict,
        &[
            "run/model.safetensors",
            "damaged",
            "bytes changed since training wrote it",
        ],
    );
    assert!(!out.exists());
    std::fs::write(&best, good).unwrap();
    ok(&predict);

    // A damaged checkpoint stops a resume before it trains on.
    let st = state(&run);
    let ckpt = run.join(st.model_file.as_deref().unwrap());
    overwrite(&ckpt);
    refused(
        &["train", "--resume", "--out", s(&run), "--epochs", "2"],
        &["model-e0001.safetensors", "damaged"],
    );
    assert_eq!(state(&run).epochs_done, 1);
}

#[test]
fn predict_keeps_an_existing_table_unless_forced() {
    let (dir, run, spectra) = trained_run();
    let out = dir.path().join("p.csv");
    let predict = predict_args(&run, &spectra, &out);
    ok(&predict);
    let first = read(&out);
    // A second table over the first, e.g. a shard's run with a forgotten --out: refused before
    // any work, the first table byte for byte as it was.
    let mut shard = predict.clone();
    shard.extend(["--rows", "0:5"]);
    refused(
        &shard,
        &["p.csv", "already exists", "--force", "choose another --out"],
    );
    assert_eq!(read(&out), first);
    // --force replaces it.
    shard.push("--force");
    ok(&shard);
    let replaced = String::from_utf8(read(&out)).unwrap();
    assert_eq!(replaced.lines().count(), 1 + 5, "{replaced}");
}

#[test]
fn a_run_refuses_data_that_changed_under_it() {
    let (dir, data, cfg) = tiny_data();
    let run = dir.path().join("run");
    ok(&["train", "--config", s(&cfg), "--out", s(&run)]);
    ok(&["evaluate", "--run", s(&run), "--raw"]);

    // The same shape and settings but other stars, as a regenerated data directory would be.
    ok(&[
        "synth",
        "--n",
        "40",
        "--seed",
        "4",
        "--pixels-per-camera",
        "32",
        "--out",
        s(&data),
        "--force",
    ]);
    refused(
        &["evaluate", "--run", s(&run), "--raw"],
        &["data", "not what the run", "trained on", "changed since"],
    );
    refused(
        &["rows", "--run", s(&run), "--split", "train"],
        &["data", "not what the run", "changed since"],
    );
    refused(
        &["train", "--resume", "--out", s(&run), "--epochs", "2"],
        &[
            "not what the run",
            "resume with the data the run was trained on",
        ],
    );
    assert_eq!(state(&run).epochs_done, 1);
}
