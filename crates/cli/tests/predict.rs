//! `starflow predict` at survey scale: streamed output, `--rows` shards that concatenate to exactly
//! the single-process table, Parquet beside CSV, and clear errors for a bad slice or file name.

mod common;

use std::path::{Path, PathBuf};

use common::{ok, starflow, text, tiny_config};

/// One trained full_flow run (its posteriors are sampled, so per-star streams matter) and the
/// spectra it predicts: 300 stars, which the prediction batches of 128 cut at 128 and 256.
struct Fixture {
    dir: tempfile::TempDir,
    run: PathBuf,
    spectra: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        common::synth(&data, 300, 64);
        let cfg = tiny_config(&dir.path().join("tiny.toml"), &data, 1, "");
        let run = dir.path().join("run");
        ok(&[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--flow",
            "full_flow",
            "--out",
            run.to_str().unwrap(),
        ]);
        Fixture {
            spectra: data.join("spectra.npy"),
            dir,
            run,
        }
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `starflow predict` with 50 samples per star and `extra` arguments.
    fn predict(&self, extra: &[&str]) -> (String, String) {
        let mut args = vec![
            "predict",
            "--run",
            self.run.to_str().unwrap(),
            "--spectra",
            self.spectra.to_str().unwrap(),
            "--samples",
            "50",
            "--seed",
            "9",
        ];
        args.extend_from_slice(extra);
        ok(&args)
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn shards_concatenate_to_the_single_process_table() {
    let fx = Fixture::new();
    let all = fx.out("all.csv");
    let (so, _) = fx.predict(&["--out", all.to_str().unwrap()]);
    assert!(so.contains("wrote 300 predictions (rows 0..300)"), "{so}");
    assert!(so.contains("stars/s"), "{so}");
    let whole = read(&all);
    assert_eq!(whole.lines().count(), 301);

    // Shards that start and end inside prediction batches, the last one open-ended.
    let mut joined = String::new();
    for (k, rows) in ["0:100", "100:250", "250:"].iter().enumerate() {
        let shard = fx.out(&format!("shard{k}.csv"));
        fx.predict(&["--rows", rows, "--out", shard.to_str().unwrap()]);
        let text = read(&shard);
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        if k == 0 {
            joined.push_str(header);
            joined.push('\n');
        }
        for l in lines {
            joined.push_str(l);
            joined.push('\n');
        }
    }
    assert_eq!(
        joined, whole,
        "the shards differ from the single-process table"
    );

    // Without --out, a shard is named after its rows, next to the spectra.
    fx.predict(&["--rows", "7:9"]);
    let named = fx.spectra.parent().unwrap().join("predictions-7-9.csv");
    let rows: Vec<&str> = whole.lines().skip(8).take(2).collect();
    assert_eq!(read(&named).lines().skip(1).collect::<Vec<_>>(), rows);

    // Parquet holds the same table: a valid file, replaced atomically, no temporary left over.
    let pq = fx.out("all.parquet");
    let (so, _) = fx.predict(&["--out", pq.to_str().unwrap()]);
    assert!(so.contains("wrote 300 predictions"), "{so}");
    let bytes = std::fs::read(&pq).unwrap();
    assert!(bytes.starts_with(b"PAR1") && bytes.ends_with(b"PAR1"));
    let leftovers: Vec<_> = std::fs::read_dir(fx.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_bad_slice_or_table_name_is_a_clear_error_and_writes_nothing() {
    let fx = Fixture::new();
    let base = [
        "predict",
        "--run",
        fx.run.to_str().unwrap(),
        "--spectra",
        fx.spectra.to_str().unwrap(),
    ];
    let keep = fx.out("keep.csv");
    std::fs::write(&keep, "previous table\n").unwrap();
    let txt = fx.out("p.txt");
    let a_dir = fx.out("tables");
    std::fs::create_dir(&a_dir).unwrap();
    let missing = fx.out("no/such/dir/p.csv");
    let cases: [(&[&str], &[&str]); 7] = [
        (
            &["--rows", "250:400", "--out", keep.to_str().unwrap()],
            &[
                "spectra.npy",
                "rows 250:400 are not within the file's 300 rows",
                "--rows START:END",
            ],
        ),
        (&["--rows", "9:3"], &["END must be greater than START"]),
        (&["--rows", "ten:"], &["is not START:END"]),
        (
            &["--out", txt.to_str().unwrap()],
            &["p.txt", "name the output file *.csv or *.parquet"],
        ),
        (
            &["--out", a_dir.to_str().unwrap()],
            &[
                "is a directory",
                "--out wants a file name",
                "predictions.csv",
            ],
        ),
        (
            &["--out", missing.to_str().unwrap()],
            &["does not exist", "mkdir -p"],
        ),
        (
            &["--samples", "18446744073709551615"],
            &["--samples must be between 10 and 100000"],
        ),
    ];
    for (extra, needles) in cases {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let o = starflow(&args);
        let (_, se) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {se}");
        for n in needles {
            assert!(se.contains(n), "{extra:?}: stderr lacks {n:?}:\n{se}");
        }
        assert!(!se.contains("panicked"), "{se}");
    }
    assert_eq!(
        read(&keep),
        "previous table\n",
        "a failed predict touched its output"
    );
    assert!(!txt.exists());
    assert_eq!(std::fs::read_dir(&a_dir).unwrap().count(), 0);
    assert!(!fx.out("no").exists());
}

/// A NaN in the last row is found before any prediction, named with its row and pixel, and
/// nothing is written; before, predict aborted there after all the work.
#[test]
fn a_non_finite_row_is_refused_before_any_work() {
    let fx = Fixture::new();
    let mut bytes = std::fs::read(&fx.spectra).unwrap();
    let at = bytes.len() - 4;
    bytes[at..].copy_from_slice(&f32::NAN.to_le_bytes());
    let bad = fx.out("bad.npy");
    std::fs::write(&bad, bytes).unwrap();
    let out = fx.out("p.csv");
    let o = starflow(&[
        "predict",
        "--run",
        fx.run.to_str().unwrap(),
        "--spectra",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let (so, se) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{se}");
    for n in [
        "bad.npy",
        "1 of rows 0..300",
        "row 299 (pixel 255)",
        "nothing was predicted",
        "--rows",
    ] {
        assert!(se.contains(n), "stderr lacks {n:?}:\n{se}");
    }
    assert!(!so.contains("wrote"), "{so}");
    assert!(!out.exists());
}

/// SIGTERM (or Ctrl-C) in the middle of a prediction: exit 130, no temporary file left behind, no
/// table, and a table written earlier under the same name (replaced with --force) untouched.
#[cfg(unix)]
#[test]
fn a_terminated_predict_leaves_no_temporary_file() {
    let fx = Fixture::new();
    let out = fx.out("p.csv");
    std::fs::write(&out, "previous table\n").unwrap();
    let mut child = common::command()
        .args([
            "predict",
            "--run",
            fx.run.to_str().unwrap(),
            "--spectra",
            fx.spectra.to_str().unwrap(),
            "--samples",
            "20000",
            "--out",
            out.to_str().unwrap(),
            // Replacing the earlier table, which the interruption must leave as it was.
            "--force",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let tmp = || {
        std::fs::read_dir(fx.dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
    };
    let started = std::time::Instant::now();
    while !tmp() {
        assert!(
            started.elapsed().as_secs() < 120,
            "no temporary table appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "predict ended before the signal"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = child.wait_with_output().unwrap();
    let se = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{se}");
    assert!(se.contains("interrupted"), "{se}");
    assert!(!tmp(), "a temporary file was left behind");
    assert_eq!(read(&out), "previous table\n");
}
