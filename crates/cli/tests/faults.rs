//! Faults, through the real binary: SIGKILL at known points of training (between steps, during
//! validation, in the middle of each checkpoint write, between the commit and the clean-up), a
//! checkpoint write that fails (something in the way, a full disk, a read-only directory), and
//! non-finite losses. After each, every file in the run must still be readable, and a resumed run
//! must end with exactly the bytes of an uninterrupted one.
//!
//! The points are hit with the `STARFLOW_PAUSE_AT` test hook (see `starflow_training::PauseAt`):
//! the binary writes `RUN/.paused-<point>` there and waits until the test deletes it, so the test
//! can send SIGKILL (`Child::kill`) or block a path at that exact point without timing races.

#![cfg(unix)]

mod common;

use std::fs::File;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// How long a test waits for the binary to reach a pause point or to exit. The tiny runs reach
/// any point in well under a second; this only bounds a hang on a very loaded machine.
const PATIENCE: Duration = Duration::from_secs(120);

/// Synthetic data, a config, an uninterrupted 3-epoch run and a 1-epoch run (the state every
/// run is in just after its first epoch commits).
struct Fixture {
    dir: tempfile::TempDir,
    config: PathBuf,
    reference: PathBuf,
    epoch1: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // 160 stars: 112 train (4 steps of 32 per epoch), 24 validation.
        synth(&data, 160, 64);
        let config = tiny_config(&dir.path().join("tiny.toml"), &data, 3, "");
        let reference = dir.path().join("reference");
        let epoch1 = dir.path().join("epoch1");
        train_ok(&config, &reference, &[]);
        train_ok(&config, &epoch1, &["--epochs", "1"]);
        Fixture {
            dir,
            config,
            reference,
            epoch1,
        }
    }

    fn run(&self, name: &str) -> PathBuf {
        self.dir.path().join(name.replace(':', "-"))
    }
}

fn train_ok(config: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["train", "--config", config.to_str().unwrap()];
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    ok(&args);
}

fn resume(run: &Path) {
    ok(&["train", "--out", run.to_str().unwrap(), "--resume"]);
}

/// A `starflow train` started with a pause point; killed when dropped, so a failing test leaves
/// no process behind.
struct Paused {
    child: Child,
    marker: PathBuf,
    stderr: PathBuf,
    at: String,
}

impl Paused {
    fn start(fx: &Fixture, run: &Path, at: &str) -> Self {
        std::fs::create_dir_all(run).unwrap();
        let point = at.split(':').next().unwrap();
        let stderr = fx
            .dir
            .path()
            .join(format!("{}.stderr", at.replace(':', "-")));
        let mut c = command();
        c.args(["train", "--config", fx.config.to_str().unwrap()])
            .args(["--out", run.to_str().unwrap()])
            .env("STARFLOW_PAUSE_AT", at)
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap());
        let mut p = Paused {
            child: c.spawn().expect("spawn starflow"),
            marker: run.join(format!(".paused-{point}")),
            stderr,
            at: at.to_string(),
        };
        p.wait_for_marker();
        p
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_for_marker(&mut self) {
        let start = Instant::now();
        while !self.marker.exists() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{}: starflow exited ({status}) without reaching the pause point\n{}",
                    self.at,
                    self.stderr()
                );
            }
            assert!(start.elapsed() < PATIENCE, "{}: no pause marker", self.at);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL, as a crash or the OOM killer would; the marker is the test's, so it goes too.
    fn kill(mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{}: {status}", self.at);
        std::fs::remove_file(&self.marker).unwrap();
    }

    /// Lets the run carry on and waits for it to exit.
    fn carry_on(mut self) -> (ExitStatus, String) {
        std::fs::remove_file(&self.marker).unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.stderr());
            }
            assert!(start.elapsed() < PATIENCE, "{}: did not exit", self.at);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Hidden temporary files (`.NAME.PID.tmp`) in the run and checkpoint directories.
fn temp_files(run: &Path) -> Vec<String> {
    [run.to_path_buf(), run.join("checkpoint")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.ends_with(".tmp"))
        .collect()
}

/// The run holds exactly what the 1-epoch run holds: epoch 1 committed, its checkpoint pair and
/// (unless `best_replaced`) its best weights byte for byte.
fn assert_still_at_epoch_1(fx: &Fixture, run: &Path, st: &starflow_training::RunState, ctx: &str) {
    assert_eq!(st.epochs_done, 1, "{ctx}: state.json moved on");
    for f in [&st.model_file, &st.optimizer_file].into_iter().flatten() {
        assert!(
            read(&run.join(f)) == read(&fx.epoch1.join(f)),
            "{ctx}: {f} is not epoch 1's"
        );
    }
}

fn assert_best_is_epoch_1s(fx: &Fixture, run: &Path, ctx: &str) {
    assert!(
        read(&run.join("model.safetensors")) == read(&fx.epoch1.join("model.safetensors")),
        "{ctx}: model.safetensors was replaced before its epoch was committed"
    );
}

#[test]
fn sigkill_anywhere_then_resume_gives_the_uninterrupted_weights() {
    let fx = Fixture::new();
    let reference = state(&fx.reference);
    let h = &reference.history;
    // Epoch 2 must improve the validation NLL, so that its checkpoint rewrites model.safetensors
    // and the kill inside that write tests something.
    assert!(
        h[1].val_nll < h[0].val_nll,
        "the fixture no longer improves in epoch 2: {h:?}"
    );
    let steps = reference.n_train.div_ceil(32) as u64;
    assert!(steps >= 2);
    let mid_epoch_2 = format!("step:{}", steps + 1);
    let points = [
        mid_epoch_2.as_str(),
        "validation:2",
        "checkpoint:2:model-e0002.safetensors",
        "checkpoint:2:optimizer-e0002.safetensors",
        "checkpoint:2:model.safetensors",
        "checkpoint:2:metrics.csv",
        "checkpoint:2:state.json",
        "commit:2",
    ];
    for at in points {
        let run = fx.run(at);
        let paused = Paused::start(&fx, &run, at);
        paused.kill();
        let st = check_run_is_readable(&run, at);
        if let Some(file) = at.strip_prefix("checkpoint:2:") {
            // Killed between writing the temporary file and renaming it.
            let tmp = temp_files(&run);
            assert!(
                tmp.iter().any(|t| t.starts_with(&format!(".{file}."))),
                "{at}: no temporary file for {file}: {tmp:?}"
            );
        }
        match at {
            "commit:2" => {
                // Committed, but the previous pair is not yet deleted.
                assert_eq!(st.epochs_done, 2, "{at}");
                assert!(run.join("checkpoint/model-e0001.safetensors").exists());
            }
            "checkpoint:2:metrics.csv" | "checkpoint:2:state.json" => {
                // The new best weights are in place (renamed before the commit point); state.json
                // still commits epoch 1 and its files.
                assert_still_at_epoch_1(&fx, &run, &st, at);
            }
            _ => {
                assert_still_at_epoch_1(&fx, &run, &st, at);
                assert_best_is_epoch_1s(&fx, &run, at);
            }
        }
        resume(&run);
        assert_eq!(
            temp_files(&run),
            Vec::<String>::new(),
            "{at}: temporary files left after resuming"
        );
        assert_same_run(&run, &fx.reference, at);
    }
}

/// Ways to make the next checkpoint write fail.
#[derive(Clone, Copy, Debug)]
enum Block {
    /// A directory where `checkpoint/model-e0002.safetensors` must go (works as root too).
    InTheWay,
    /// The temporary file of `metrics.csv` is a symlink to /dev/full: writes fail with ENOSPC.
    FullDisk,
    /// The same for `checkpoint/model-e0002.safetensors`, the first file of the checkpoint.
    FullDiskSafetensors,
    /// `checkpoint/` is made read-only (only when that stops this user writing, i.e. not root).
    ReadOnly,
}

/// True when a read-only directory really stops this process writing (false for root).
fn chmod_blocks_writes(scratch: &Path) -> bool {
    let d = scratch.join("probe");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555)).unwrap();
    let blocked = File::create(d.join("x")).is_err();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
    blocked
}

#[test]
fn a_failed_checkpoint_write_is_reported_and_keeps_the_last_checkpoint() {
    let fx = Fixture::new();
    let mut blocks = vec![Block::InTheWay];
    if Path::new("/dev/full").exists() {
        blocks.push(Block::FullDisk);
        blocks.push(Block::FullDiskSafetensors);
    }
    if chmod_blocks_writes(fx.dir.path()) {
        blocks.push(Block::ReadOnly);
    }
    for block in blocks {
        let ctx = format!("{block:?}");
        eprintln!("checkpoint write blocked by: {ctx}");
        let run = fx.run(&ctx);
        let ckpt = run.join("checkpoint");
        // Epoch 1 is committed, epoch 2 has trained and is validating: block its checkpoint.
        let paused = Paused::start(&fx, &run, "validation:2");
        let (path_needle, problem) = match block {
            Block::InTheWay => {
                std::fs::create_dir_all(ckpt.join("model-e0002.safetensors/x")).unwrap();
                ("checkpoint/model-e0002.safetensors", "Is a directory")
            }
            Block::FullDisk => {
                let tmp = format!(".metrics.csv.{}.tmp", paused.child.id());
                symlink("/dev/full", run.join(tmp)).unwrap();
                ("metrics.csv", "No space left on device")
            }
            Block::FullDiskSafetensors => {
                let tmp = format!(".model-e0002.safetensors.{}.tmp", paused.child.id());
                symlink("/dev/full", ckpt.join(tmp)).unwrap();
                (
                    "checkpoint/model-e0002.safetensors",
                    "No space left on device",
                )
            }
            Block::ReadOnly => {
                std::fs::set_permissions(&ckpt, std::fs::Permissions::from_mode(0o555)).unwrap();
                ("checkpoint/.model-e0002.safetensors.", "Permission denied")
            }
        };
        let (status, stderr) = paused.carry_on();
        assert_eq!(status.code(), Some(1), "{ctx}: {status}\n{stderr}");
        for needle in [
            "error: cannot write the checkpoint of epoch 2",
            path_needle,
            problem,
            "the last good checkpoint (epoch 1)",
            "--resume",
        ] {
            assert!(
                stderr.contains(needle),
                "{ctx}: lacks {needle:?}:\n{stderr}"
            );
        }
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{ctx}: {stderr}"
        );
        assert_eq!(
            stderr.matches(problem).count(),
            1,
            "{ctx}: the cause is repeated: {stderr}"
        );
        let st = check_run_is_readable(&run, &ctx);
        assert_still_at_epoch_1(&fx, &run, &st, &ctx);
        if !matches!(block, Block::FullDisk) {
            // metrics.csv comes after the best weights, which are already replaced (complete).
            assert_best_is_epoch_1s(&fx, &run, &ctx);
        }
        // The intact checkpoint is usable as it is...
        ok(&[
            "evaluate",
            "--run",
            run.to_str().unwrap(),
            "--samples",
            "10",
        ]);
        // ...and once the cause is gone the run resumes to the uninterrupted result.
        match block {
            Block::InTheWay => std::fs::remove_dir_all(ckpt.join("model-e0002.safetensors")),
            // The failed write removed its temporary file (the link).
            Block::FullDisk | Block::FullDiskSafetensors => Ok(()),
            Block::ReadOnly => {
                std::fs::set_permissions(&ckpt, std::fs::Permissions::from_mode(0o755))
            }
        }
        .unwrap();
        resume(&run);
        assert_eq!(temp_files(&run), Vec::<String>::new(), "{ctx}");
        assert_same_run(&run, &fx.reference, &ctx);
    }
}

#[test]
fn non_finite_losses_are_skipped_reported_and_the_run_finishes_finite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, 160, 64);
    let config = tiny_config(&dir.path().join("tiny.toml"), &data, 3, "");
    let (cfg_s, run) = (config.to_str().unwrap(), dir.path().join("nan"));
    // Steps 5 and 6 are the second and third of epoch 2 (4 steps per epoch).
    let o = command()
        .args(["train", "--config", cfg_s, "--out", run.to_str().unwrap()])
        .env("STARFLOW_INJECT_NAN_STEPS", "5,6")
        .output()
        .unwrap();
    let (so, se) = text(&o);
    assert!(o.status.success(), "{so}\n{se}");
    assert_eq!(
        se.matches("skipped a step with a non-finite loss or gradient")
            .count(),
        2,
        "{se}"
    );
    assert!(se.contains("(2 steps skipped)"), "{se}");
    assert!(
        !se.contains('\x1b'),
        "colour codes in a redirected log: {se:?}"
    );
    assert!(so.contains("3 epochs"), "{so}");
    let st = state(&run);
    let skipped: Vec<usize> = st.history.iter().map(|r| r.steps_skipped).collect();
    assert_eq!(skipped, [0, 2, 0]);
    assert!(st
        .history
        .iter()
        .all(|r| r.train_nll.is_finite() && r.val_nll.is_finite()));
    let csv = String::from_utf8(read(&run.join("metrics.csv"))).unwrap();
    let column: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap())
        .collect();
    assert_eq!(column, ["0", "2", "0"], "{csv}");
    // 12 attempts, 10 applied: the skipped steps changed neither weights nor Adam's step count.
    assert_eq!(st.adam_steps, 10);
    for p in safetensors_files(&run) {
        for (name, values) in load_values(&p) {
            assert!(
                values.iter().all(|v| v.is_finite()),
                "{}: {name} is not finite",
                p.display()
            );
        }
    }

    // Too many in a row stop the run with a clear error; epoch 1's checkpoint stays readable.
    let run = dir.path().join("diverge");
    let o = command()
        .args(["train", "--config", cfg_s, "--out", run.to_str().unwrap()])
        .args(["--set", "optim.max_bad_steps=3"])
        .env("STARFLOW_INJECT_NAN_STEPS", "4,5,6")
        .output()
        .unwrap();
    let (so, se) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{so}\n{se}");
    assert!(
        se.contains("training diverged: 3 consecutive steps")
            && se.contains("(epoch 2)")
            && se.contains("last good checkpoint")
            && !se.contains("panicked"),
        "{se}"
    );
    let st = check_run_is_readable(&run, "diverged");
    assert_eq!(st.epochs_done, 1);
}

/// Two `train` processes on one run directory would overwrite each other's checkpoints: the second
/// gets a clear error naming the directory and the first process (exit 2) and writes nothing; once
/// the first has finished, the lock is free and the run resumes normally.
#[test]
fn a_second_train_on_the_same_run_directory_is_refused() {
    let fx = Fixture::new();
    let run = fx.run("locked");
    let paused = Paused::start(&fx, &run, "step:1");
    let pid = paused.child.id();
    let before = std::fs::read_dir(&run).unwrap().count();
    for extra in [&[][..], &["--resume"][..]] {
        let o = command()
            .args(["train", "--config", fx.config.to_str().unwrap()])
            .args(["--out", run.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        let (_, se) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {se}");
        for needle in [
            run.to_str().unwrap(),
            &format!("another starflow process (pid {pid}) is training in this run directory"),
            "choose another --out",
        ] {
            assert!(se.contains(needle), "{extra:?}: lacks {needle:?}:\n{se}");
        }
        assert!(!se.contains("panicked"), "{se}");
    }
    assert_eq!(std::fs::read_dir(&run).unwrap().count(), before);
    let (status, stderr) = paused.carry_on();
    assert!(status.success(), "{stderr}");
    assert_same_run(&run, &fx.reference, "locked");
    // The lock went with the process: extending the finished run works.
    ok(&[
        "train",
        "--out",
        run.to_str().unwrap(),
        "--resume",
        "--epochs",
        "4",
    ]);
}

/// The NaN-injection hook refuses entries it cannot parse, so a fault test cannot pass without its
/// fault.
#[test]
fn an_unparsable_nan_injection_step_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, 40, 16);
    let config = tiny_config(&dir.path().join("tiny.toml"), &data, 1, "");
    let run = dir.path().join("run");
    let o = command()
        .args(["train", "--config", config.to_str().unwrap()])
        .args(["--out", run.to_str().unwrap()])
        .env("STARFLOW_INJECT_NAN_STEPS", "5, six")
        .output()
        .unwrap();
    let (_, se) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{se}");
    assert!(
        se.contains("STARFLOW_INJECT_NAN_STEPS=5, six: `six` is not a step number"),
        "{se}"
    );
    assert!(!run.join("state.json").exists());
}
