//! Bad input through the real binary, one row per case: every user mistake (a damaged or wrong
//! file, a bad setting, a run from elsewhere) must exit with code 2 and a message that names the
//! file (or setting) and the problem, never a panic or a backtrace. The rows that pass an explicit
//! option around the problem (`--drop-nonfinite`) must succeed.
//!
//! The binary runs with `RUST_BACKTRACE=1`, so an internal error that carries a backtrace (a candle
//! shape error reaching the user, say) fails the "no backtrace" check however the caller is set up.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use common::*;
use starflow_data::npy::{write_npy, NpyArray};

/// What a row expects.
enum Expect {
    /// Exit code 2; stderr holds every needle (and none of those written `!needle`).
    UserError(Vec<String>),
    /// Success; stdout holds every needle.
    Success(Vec<String>),
}

struct Case {
    name: &'static str,
    args: Vec<OsString>,
    expect: Expect,
}

fn user_error(name: &'static str, args: &[&dyn AsArg], needles: &[&str]) -> Case {
    Case {
        name,
        args: args.iter().map(|a| a.arg()).collect(),
        expect: Expect::UserError(needles.iter().map(|s| s.to_string()).collect()),
    }
}

fn success(name: &'static str, args: &[&dyn AsArg], needles: &[&str]) -> Case {
    Case {
        name,
        args: args.iter().map(|a| a.arg()).collect(),
        expect: Expect::Success(needles.iter().map(|s| s.to_string()).collect()),
    }
}

/// Arguments are strings or paths.
trait AsArg {
    fn arg(&self) -> OsString;
}
impl AsArg for &str {
    fn arg(&self) -> OsString {
        self.into()
    }
}
impl AsArg for PathBuf {
    fn arg(&self) -> OsString {
        self.into()
    }
}

/// Runs one row; returns what went wrong, if anything.
fn check(case: &Case) -> Option<String> {
    let o = starflow(&case.args);
    let (so, se) = text(&o);
    let fail = |why: String| {
        Some(format!(
            "[{}] {why}\n  args: {:?}\n  exit: {:?}\n  stdout: {so}\n  stderr: {se}",
            case.name, case.args, o.status
        ))
    };
    match &case.expect {
        Expect::UserError(needles) => {
            if o.status.code() != Some(2) {
                return fail("expected exit code 2".into());
            }
            for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
                if se.contains(bad) {
                    return fail(format!("stderr contains {bad:?}"));
                }
            }
            for n in needles {
                match n.strip_prefix('!') {
                    Some(absent) if se.contains(absent) => {
                        return fail(format!("stderr contains {absent:?}"))
                    }
                    None if !se.contains(n.as_str()) => return fail(format!("stderr lacks {n:?}")),
                    _ => {}
                }
            }
        }
        Expect::Success(needles) => {
            if !o.status.success() {
                return fail("expected success".into());
            }
            if let Some(n) = needles.iter().find(|n| !so.contains(n.as_str())) {
                return fail(format!("stdout lacks {n:?}"));
            }
        }
    }
    None
}

/// A version-1 npy file with the given header dictionary and data bytes.
fn npy_with_dict(path: &Path, dict: &str, data: &[u8]) -> PathBuf {
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    let dict = format!("{dict}\n");
    bytes.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    bytes.extend_from_slice(dict.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Edits `state.json` of a run as JSON.
fn edit_state(run: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = run.join("state.json");
    let mut v: serde_json::Value = serde_json::from_slice(&read(&p)).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn bad_input_exits_2_naming_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 40 stars of 512 pixels, and the same stars at 256 pixels.
    let data = d.join("data");
    let data256 = d.join("data256");
    synth(&data, 40, 128);
    synth(&data256, 40, 64);
    let spectra = data.join("spectra.npy");
    let labels = data.join("labels.npy");
    let (n, n_pix, n_cols) = (40usize, 512usize, 8usize);
    let flux: Vec<f32> = NpyArray::open(&spectra)
        .unwrap()
        .to_f64_vec()
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let lab = NpyArray::open(&labels).unwrap().to_f64_vec();
    let f = |name: &str| d.join(name);

    // --- damaged or foreign files ---
    std::fs::write(f("empty.npy"), b"").unwrap();
    std::fs::write(f("junk.npy"), b"hello, not an array").unwrap();
    let mut magic = read(&spectra);
    magic[5] = b'Z';
    std::fs::write(f("magic.npy"), magic).unwrap();
    let mut version = read(&spectra);
    version[6] = 9;
    std::fs::write(f("version.npy"), version).unwrap();
    let f32_bytes: Vec<u8> = flux.iter().flat_map(|v| v.to_le_bytes()).collect();
    npy_with_dict(
        &f("no_shape.npy"),
        "{'descr': '<f4', 'fortran_order': False, }",
        &f32_bytes,
    );
    npy_with_dict(
        &f("bad_dict.npy"),
        "{'descr': '<f4' 'fortran_order': False, 'shape': (40, 512), }",
        &f32_bytes,
    );
    let mut short_header = b"\x93NUMPY\x01\x00".to_vec();
    short_header.extend_from_slice(&1000u16.to_le_bytes());
    short_header.extend_from_slice(b"{'descr': '<f4', ");
    std::fs::write(f("header_cut.npy"), short_header).unwrap();
    let whole = read(&spectra);
    std::fs::write(f("truncated.npy"), &whole[..whole.len() / 2]).unwrap();
    npy_with_dict(
        &f("int.npy"),
        "{'descr': '<i4', 'fortran_order': False, 'shape': (40, 512), }",
        &f32_bytes,
    );
    npy_with_dict(
        &f("fortran.npy"),
        "{'descr': '<f4', 'fortran_order': True, 'shape': (40, 512), }",
        &f32_bytes,
    );
    write_npy(f("rank3.npy"), &[n, 2, n_pix / 2], &flux).unwrap();
    write_npy(f("rank1.npy"), &[n * n_cols], &lab).unwrap();
    // --- files that are valid npy but wrong as data ---
    write_npy(f("rows39.npy"), &[n - 1, n_cols], &lab[..(n - 1) * n_cols]).unwrap();
    let three: Vec<f64> = lab.chunks(n_cols).flat_map(|r| r[4..7].to_vec()).collect();
    write_npy(f("labels3.npy"), &[n, 3], &three).unwrap();
    let mut nan = flux.clone();
    nan[5 * n_pix + 9] = f32::NAN;
    write_npy(f("nan.npy"), &[n, n_pix], &nan).unwrap();
    let mut inf = lab.clone();
    inf[7 * n_cols + 5] = f64::INFINITY; // log_g of row 7
    write_npy(f("inf_labels.npy"), &[n, n_cols], &inf).unwrap();
    let all_nan = vec![f64::NAN; n * n_cols];
    write_npy(f("all_nan_labels.npy"), &[n, n_cols], &all_nan).unwrap();
    let mut constant = lab.clone();
    for r in 0..n {
        constant[r * n_cols + 4] = 5777.0; // t_eff
    }
    write_npy(f("constant.npy"), &[n, n_cols], &constant).unwrap();
    let mut extreme = lab.clone();
    extreme[11 * n_cols + 6] = 1e300; // fe_h of row 11: a sentinel, overflows the z-scoring
    write_npy(f("extreme.npy"), &[n, n_cols], &extreme).unwrap();
    write_npy(f("short.npy"), &[1, 7], &[1f32; 7]).unwrap();
    let nan_dir = d.join("nan_data");
    std::fs::create_dir(&nan_dir).unwrap();
    std::fs::copy(f("nan.npy"), nan_dir.join("spectra.npy")).unwrap();
    std::fs::copy(&labels, nan_dir.join("labels.npy")).unwrap();

    // --- configs ---
    let cfg = tiny_config(&f("tiny.toml"), &data, 1, "");
    let nan_cfg = tiny_config(&f("nan.toml"), &nan_dir, 1, "");
    let nan_drop_cfg = tiny_config(&f("nan_drop.toml"), &nan_dir, 1, "");
    let text_of = read(&nan_drop_cfg);
    std::fs::write(
        &nan_drop_cfg,
        String::from_utf8(text_of).unwrap().replace(
            "synthetic = false\n",
            "synthetic = false\ndrop_nonfinite = true\n",
        ),
    )
    .unwrap();
    let toml = |name: &str, body: &str| {
        std::fs::write(f(name), body).unwrap();
        f(name)
    };
    let unknown_key = toml("unknown_key.toml", "[optim]\nlearning_rat = 1e-3\n");
    let typo = toml("typo.toml", "[optim]\nlrr = 1e-3\n");
    let section = toml("section.toml", "[optm]\nlr = 1e-3\n");
    let misplaced = toml("misplaced.toml", "[optim]\nseed = 3\n");
    let negative_lr = toml("negative_lr.toml", "[optim]\nlr = -1e-3\n");
    let zero_batch = toml("zero_batch.toml", "[optim]\nbatch_size = 0\n");
    let fractions = toml(
        "fractions.toml",
        "[data]\ntrain_fraction = 0.8\nval_fraction = 0.15\ntest_fraction = 0.15\n",
    );
    let wrong_type = toml("wrong_type.toml", "[optim]\nlr = \"fast\"\n");
    let broken = toml("broken.toml", "[optim\nlr = 1\n");

    // --- runs ---
    let run = d.join("run");
    ok(&[
        "train".arg(),
        "--config".arg(),
        cfg.arg(),
        "--out".arg(),
        run.arg(),
    ]);
    // The same run pointed at data of another spectrum length.
    let other_len = d.join("run_other_length");
    copy_dir(&run, &other_len);
    edit_state(&other_len, |v| {
        v["config"]["data"]["dir"] = data256.to_str().unwrap().into();
    });
    let v99 = d.join("run_v99");
    copy_dir(&run, &v99);
    edit_state(&v99, |v| v["format"] = 99.into());
    let damaged = d.join("run_damaged");
    copy_dir(&run, &damaged);
    std::fs::write(damaged.join("state.json"), "{\"format\": 1, \"epo").unwrap();
    // The same damage without a saved recalibration, which would be fitted first: `--raw` is no
    // way out of a damaged run, so the message must not offer it.
    let damaged_uncalibrated = d.join("run_damaged_uncalibrated");
    copy_dir(&damaged, &damaged_uncalibrated);
    std::fs::remove_file(damaged_uncalibrated.join("calibration.json")).unwrap();
    // Ensemble members trained on other data files, or on the same files split another way.
    let other_files = d.join("run_other_files");
    copy_dir(&run, &other_files);
    edit_state(&other_files, |v| {
        v["data_fingerprint"]["labels_checksum"] = "crc32:00000000".into();
    });
    let other_split = d.join("run_other_split");
    copy_dir(&run, &other_split);
    edit_state(&other_split, |v| {
        v["config"]["data"]["split_seed"] = 777.into();
    });
    // A run trained on a GPU, as its state says, evaluated by a build without one.
    let gpu_trained = d.join("run_gpu_trained");
    copy_dir(&run, &gpu_trained);
    edit_state(&gpu_trained, |v| {
        v["config"]["run"]["device"] = "cuda".into()
    });
    let unfinished = d.join("run_unfinished");
    copy_dir(&run, &unfinished);
    std::fs::remove_file(unfinished.join("model.safetensors")).unwrap();
    // A run moved away from its data, without its saved recalibration (as a run trained before
    // recalibration existed): the default recalibration cannot be fitted, --raw still predicts.
    let moved = d.join("run_moved");
    copy_dir(&run, &moved);
    std::fs::remove_file(moved.join("calibration.json")).unwrap();
    edit_state(&moved, |v| {
        v["config"]["data"]["dir"] = d.join("gone").to_str().unwrap().into();
    });
    let out = |name: &str| d.join("out").join(name);

    let inspect = |s: PathBuf, l: PathBuf| -> Vec<OsString> {
        vec![
            "inspect".into(),
            "--spectra".into(),
            s.into(),
            "--labels".into(),
            l.into(),
        ]
    };
    let with = |mut v: Vec<OsString>, extra: &[&str]| {
        v.extend(extra.iter().map(OsString::from));
        v
    };
    let raw = |name: &'static str, args: Vec<OsString>, needles: &[&str]| Case {
        name,
        args,
        expect: Expect::UserError(needles.iter().map(|s| s.to_string()).collect()),
    };
    let raw_ok = |name: &'static str, args: Vec<OsString>, needles: &[&str]| Case {
        name,
        args,
        expect: Expect::Success(needles.iter().map(|s| s.to_string()).collect()),
    };
    let sp = || spectra.clone();
    let lb = || labels.clone();
    let (trn, c, o, r) = (&"train", &"--config", &"--out", &"--run");
    let (ev, pr, s) = (&"evaluate", &"predict", &"--spectra");

    let cases =
        vec![
        // Missing or unreadable input.
        user_error("no data", &[&"inspect"], &["no data given", "--data"]),
        user_error(
            "missing directory",
            &[&"inspect", &"--data", &"/no/such/dir"],
            &["/no/such/dir", "spectra.npy"],
        ),
        raw(
            "missing file",
            inspect(f("absent.npy"), lb()),
            &["absent.npy", "cannot open"],
        ),
        raw(
            "directory as file",
            inspect(data.clone(), lb()),
            &["data", "is a directory, not an npy file"],
        ),
        // Damaged or foreign files.
        raw(
            "empty file",
            inspect(f("empty.npy"), lb()),
            &["empty.npy", "the file is empty"],
        ),
        raw(
            "not npy",
            inspect(f("junk.npy"), lb()),
            &["junk.npy", "not an npy file"],
        ),
        raw(
            "wrong magic",
            inspect(f("magic.npy"), lb()),
            &["magic.npy", "missing the \\x93NUMPY magic bytes"],
        ),
        raw(
            "unsupported version",
            inspect(f("version.npy"), lb()),
            &["version.npy", "unsupported npy format version 9"],
        ),
        raw(
            "header without shape",
            inspect(f("no_shape.npy"), lb()),
            &["no_shape.npy", "the npy header has no 'shape' entry"],
        ),
        raw(
            "malformed header",
            inspect(f("bad_dict.npy"), lb()),
            &["bad_dict.npy", "malformed npy header"],
        ),
        raw(
            "truncated header",
            inspect(f("header_cut.npy"), lb()),
            &["header_cut.npy", "the npy header is truncated"],
        ),
        raw(
            "truncated data",
            inspect(f("truncated.npy"), lb()),
            &[
                "truncated.npy",
                "the file is truncated",
                "download the file again",
            ],
        ),
        raw(
            "unsupported dtype",
            inspect(f("int.npy"), lb()),
            &["int.npy", "unsupported dtype '<i4'", "astype(np.float32)"],
        ),
        raw(
            "fortran order",
            inspect(f("fortran.npy"), lb()),
            &[
                "fortran.npy",
                "Fortran (column-major) order",
                "ascontiguousarray",
            ],
        ),
        raw(
            "wrong rank (spectra 3-D)",
            inspect(f("rank3.npy"), lb()),
            &["rank3.npy", "spectra must be a 2-D array, found 3-D"],
        ),
        raw(
            "wrong rank (labels 1-D)",
            inspect(sp(), f("rank1.npy")),
            &["rank1.npy", "labels must be a 2-D array, found 1-D"],
        ),
        // Valid npy, wrong as data.
        raw(
            "row-count mismatch",
            inspect(sp(), f("rows39.npy")),
            &[
                "rows39.npy",
                "row-count mismatch",
                "40 spectra",
                "39 label rows",
            ],
        ),
        raw(
            "too few label columns",
            inspect(sp(), f("labels3.npy")),
            &["labels3.npy", "too few label columns", "--label-names"],
        ),
        raw(
            "unknown target",
            with(inspect(sp(), lb()), &["--targets", "teff"]),
            &["targets", "unknown label column 'teff'", "t_eff"],
        ),
        raw(
            "NaN in spectra",
            inspect(f("nan.npy"), lb()),
            &["nan.npy", "non-finite", "first rows: 5", "--drop-nonfinite"],
        ),
        raw_ok(
            "NaN in spectra, dropped",
            with(inspect(f("nan.npy"), lb()), &["--drop-nonfinite"]),
            &["39 usable stars", "1 rows dropped"],
        ),
        raw(
            "inf in labels",
            inspect(sp(), f("inf_labels.npy")),
            &[
                "inf_labels.npy",
                "non-finite target labels",
                "first rows: 7",
                "--drop-nonfinite",
            ],
        ),
        raw_ok(
            "inf in labels, dropped",
            with(inspect(sp(), f("inf_labels.npy")), &["--drop-nonfinite"]),
            &["39 usable stars", "1 rows dropped"],
        ),
        raw(
            "every row non-finite, dropped",
            with(
                inspect(sp(), f("all_nan_labels.npy")),
                &["--drop-nonfinite"],
            ),
            &["every row has non-finite values"],
        ),
        raw(
            "constant labels",
            inspect(sp(), f("constant.npy")),
            &["constant.npy", "'t_eff' (column 4) is constant"],
        ),
        raw(
            "extreme label",
            inspect(sp(), f("extreme.npy")),
            &[
                "extreme.npy",
                "'fe_h' (column 6)",
                "1e300 in row 11",
                "sentinel",
            ],
        ),
        user_error(
            "NaN data through train",
            &[trn, c, &nan_cfg, o, &out("nan")],
            &["nan_data/spectra.npy", "non-finite", "--drop-nonfinite"],
        ),
        success(
            "NaN data through train, dropped",
            &[trn, c, &nan_drop_cfg, o, &out("nan_drop")],
            &["1 epochs"],
        ),
        // Spectra of the wrong length for a trained run.
        user_error(
            "predict, wrong length",
            &[pr, r, &run, s, &f("short.npy")],
            &["short.npy", "7 pixels", "512 pixels"],
        ),
        user_error(
            "predict, another grid",
            &[pr, r, &run, s, &data256.join("spectra.npy")],
            &["data256/spectra.npy", "256 pixels", "512 pixels"],
        ),
        user_error(
            "predict, NaN spectra",
            &[pr, r, &run, s, &f("nan.npy")],
            &["nan.npy", "non-finite"],
        ),
        user_error(
            "predict, not npy",
            &[pr, r, &run, s, &f("junk.npy")],
            &["junk.npy", "not an npy file"],
        ),
        user_error(
            "evaluate, data of another length",
            &[ev, r, &other_len],
            &["data256/spectra.npy", "256 pixels", "trained on 512 pixels"],
        ),
        user_error(
            "resume, data of another length",
            &[trn, o, &other_len, &"--resume", &"--epochs", &"2"],
            &["data256/spectra.npy", "256 pixels", "trained on 512 pixels"],
        ),
        // Config keys.
        user_error(
            "unknown config key",
            &[trn, c, &unknown_key, o, &out("k")],
            &["unknown_key.toml", "unknown key `learning_rat` in [optim]"],
        ),
        user_error(
            "mistyped config key",
            &[trn, c, &typo, o, &out("k")],
            &["typo.toml", "unknown key `lrr`", "did you mean `lr`?"],
        ),
        user_error(
            "mistyped section",
            &[trn, c, &section, o, &out("k")],
            &["section.toml", "`optm`", "did you mean [optim]?"],
        ),
        user_error(
            "key in the wrong section",
            &[trn, c, &misplaced, o, &out("k")],
            &["misplaced.toml", "`seed` belongs in [run]"],
        ),
        user_error(
            "mistyped override",
            &[trn, c, &cfg, &"--set", &"optim.lrr=0.1", o, &out("k")],
            &["tiny.toml", "did you mean `lr`?"],
        ),
        user_error(
            "value of the wrong type",
            &[trn, c, &wrong_type, o, &out("k")],
            &[
                "wrong_type.toml",
                "optim.lr = \"fast\" (from ",
                "invalid type",
                "must be a positive number",
            ],
        ),
        user_error(
            "invalid TOML",
            &[trn, c, &broken, o, &out("k")],
            &["broken.toml", "invalid TOML"],
        ),
        user_error(
            "missing config file",
            &[trn, c, &f("absent.toml"), o, &out("k")],
            &["absent.toml", "cannot read the config file"],
        ),
        // Out-of-range hyper-parameters.
        user_error(
            "negative learning rate",
            &[trn, c, &negative_lr, o, &out("k")],
            &[
                "negative_lr.toml",
                "optim.lr = -0.001 (from ",
                "must be a positive number",
            ],
        ),
        user_error(
            "negative learning rate override",
            &[trn, c, &cfg, &"--set", &"optim.lr=-0.1", o, &out("k")],
            &[
                "tiny.toml",
                "optim.lr = -0.1 (from the command line: optim.lr=-0.1): must be a positive number",
            ],
        ),
        user_error(
            "negative batch size override (a type error, not a range error)",
            &[trn, c, &cfg, &"--set", &"optim.batch_size=-3", o, &out("k")],
            &[
                "tiny.toml",
                "optim.batch_size = -3 (from the command line: optim.batch_size=-3)",
                "invalid value",
                "must be an integer >= 1",
            ],
        ),
        user_error(
            "zero batch size",
            &[trn, c, &zero_batch, o, &out("k")],
            &[
                "zero_batch.toml",
                "optim.batch_size = 0 (from ",
                "must be an integer >= 1",
            ],
        ),
        user_error(
            "fractions not summing to 1",
            &[trn, c, &fractions, o, &out("k")],
            &[
                "fractions.toml",
                "data.train_fraction = 0.8",
                "the fractions sum to 1.1",
                "train + val + test = 1",
            ],
        ),
        user_error(
            "zero epochs",
            &[trn, c, &cfg, &"--epochs", &"0", o, &out("k")],
            &[
                "tiny.toml",
                "optim.epochs = 0 (from the command line: optim.epochs=0)",
                "must be an integer >= 1",
            ],
        ),
        user_error(
            "unknown flow",
            &[trn, c, &cfg, &"--flow", &"maf", o, &out("k")],
            &["tiny.toml", "model.flow `maf` is unknown", "full_flow"],
        ),
        // Run directories.
        user_error(
            "not a run directory",
            &[ev, r, &data],
            &["data", "not a starflow run directory"],
        ),
        user_error(
            "incompatible run format",
            &[ev, r, &v99],
            &["run_v99/state.json", "run format 99 is not supported"],
        ),
        user_error(
            "incompatible run format, resume",
            &[trn, o, &v99, &"--resume"],
            &["run_v99/state.json", "run format 99 is not supported"],
        ),
        user_error(
            "damaged state.json",
            &[ev, r, &damaged],
            &["run_damaged/state.json", "not valid JSON"],
        ),
        // Input and output are checked before the recalibration is fitted (minutes on a run
        // without a saved one): here the fit would fail, so these rows fail unless they come first.
        user_error(
            "predict: missing spectra before the recalibration",
            &[
                &"predict",
                r,
                &moved,
                &"--spectra",
                &d.join("no-such-spectra.npy"),
            ],
            &["no-such-spectra.npy", "!recalibration"],
        ),
        user_error(
            "evaluate: missing data before the recalibration",
            &[ev, r, &moved, &"--data", &d.join("no-such-dir")],
            &["no-such-dir/spectra.npy", "!recalibration"],
        ),
        user_error(
            "evaluate: unknown split before the recalibration",
            &[ev, r, &moved, &"--split", &"tset"],
            &["unknown split `tset`", "!recalibration"],
        ),
        user_error(
            "damaged state.json, recalibration to fit",
            &[ev, r, &damaged_uncalibrated],
            &["run_damaged_uncalibrated/state.json", "not valid JSON", "!--raw"],
        ),
        user_error(
            "ensemble member trained on other data files",
            &[ev, r, &run, &"--member", &other_files],
            &["run_other_files", "data files", "same data", "!--raw"],
        ),
        user_error(
            "ensemble member split another way",
            &[ev, r, &run, &"--member", &other_split],
            &["run_other_split", "data.split_seed", "!--raw"],
        ),
        user_error(
            "run without weights",
            &[ev, r, &unfinished],
            &[
                "run_unfinished/model.safetensors",
                "no model.safetensors yet",
            ],
        ),
        user_error(
            "a GPU this build lacks",
            &[trn, c, &cfg, o, &out("gpu-run"), &"--set", &"run.device=cuda"],
            &["run.device", "built without cuda support", "cargo xtask cuda-build", "\"cpu\""],
        ),
        success(
            "a GPU-trained run evaluates on the CPU",
            &[ev, r, &gpu_trained],
            &["NLL"],
        ),
        user_error(
            "run already there",
            &[trn, c, &cfg, o, &run],
            &["already holds a run", "--resume"],
        ),
        user_error(
            "recalibration without the run's data",
            &[
                &"predict",
                r,
                &moved,
                &"--spectra",
                &spectra,
                o,
                &out("p-moved.csv"),
            ],
            &["run_moved", "recalibration", "--raw"],
        ),
        success(
            "--raw needs no recalibration",
            &[
                &"predict",
                r,
                &moved,
                &"--spectra",
                &spectra,
                o,
                &out("p-raw.csv"),
                &"--raw",
            ],
            &["wrote 40 predictions"],
        ),
        user_error(
            "unknown split",
            &[ev, r, &run, &"--split", &"dev"],
            &["unknown split `dev`"],
        ),
        user_error(
            "too few samples",
            &[ev, r, &run, &"--samples", &"5"],
            &["--samples must be between 10 and 100000"],
        ),
        // Other settings.
        user_error(
            "synth n = 0",
            &[&"synth", &"--n", &"0", o, &out("s")],
            &["`n`", "at least 1"],
        ),
        user_error(
            "synth negative SNR",
            &[&"synth", &"--snr-min=-3", o, &out("s")],
            &["snr_min"],
        ),
        // clap's own usage errors also exit with 2.
        user_error("unknown flag", &[&"inspect", &"--bogus"], &["--bogus"]),
    ];

    // Two runners: the machine has two cores and most rows are tiny processes.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                if let Some(f) = check(case) {
                    failures.lock().unwrap().push(f);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} bad-input rows failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Refused before anything was written.
    assert!(
        !out("gpu-run").exists(),
        "the refused GPU run left a directory"
    );
}
