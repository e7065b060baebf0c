//! Loading and validation: every bad input gets a message that names the file and the problem.

use std::path::{Path, PathBuf};

use starflow_data::npy::{encode_npy, write_npy, NpyArray};
use starflow_data::{Dataset, LoadOptions};

fn labels_row(i: usize) -> [f64; 8] {
    [
        1.0,
        4.0,
        1.0,
        100.0,
        5000.0 + 10.0 * i as f64,
        4.0 + 0.01 * i as f64,
        -0.2 + 0.01 * i as f64,
        50.0,
    ]
}

/// Writes a valid pair of files with `n` stars of `n_pix` pixels.
fn write_pair(dir: &Path, n: usize, n_pix: usize) -> (PathBuf, PathBuf) {
    let spectra: Vec<f32> = (0..n * n_pix).map(|k| 0.5 + (k % 7) as f32 * 0.1).collect();
    let labels: Vec<f64> = (0..n).flat_map(labels_row).collect();
    let s = dir.join("spectra.npy");
    let l = dir.join("labels.npy");
    write_npy(&s, &[n, n_pix], &spectra).unwrap();
    write_npy(&l, &[n, 8], &labels).unwrap();
    (s, l)
}

/// Replaces text inside the npy header of `path` (same length, so the layout stays valid).
fn patch_header(path: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .expect("pattern in header");
    bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn load_err(s: &Path, l: &Path, opts: &LoadOptions) -> String {
    let e = Dataset::load_npy(s, l, opts).expect_err("must fail");
    assert!(e.is_user_error(), "{e}");
    e.to_string()
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} should mention {p:?}");
    }
}

#[test]
fn valid_pair_loads_zero_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (s, l) = write_pair(dir.path(), 10, 4100);
    let ds = Dataset::load_npy(&s, &l, &LoadOptions::default()).unwrap();
    assert_eq!(ds.len(), 10);
    assert_eq!(ds.n_pix(), 4100);
    assert_eq!(ds.target_names(), ["t_eff", "log_g", "fe_h"]);
    assert_eq!(ds.targets(3), vec![5030.0, 4.03, -0.17]);
    assert!(
        NpyArray::open(&s).unwrap().as_f32_slice().is_some(),
        "f32 spectra must be mapped, not copied"
    );
    let mut row = vec![0f32; 4100];
    ds.flux_into(1, &mut row);
    assert_eq!(row[0], 0.5 + ((4100 % 7) as f32) * 0.1);
}

#[test]
fn float64_spectra_and_float32_labels_load() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s.npy");
    let l = dir.path().join("l.npy");
    write_npy(
        &s,
        &[3, 5],
        &(0..15).map(|k| k as f64 * 0.25).collect::<Vec<f64>>(),
    )
    .unwrap();
    write_npy(
        &l,
        &[3, 8],
        &(0..3)
            .flat_map(labels_row)
            .map(|v| v as f32)
            .collect::<Vec<f32>>(),
    )
    .unwrap();
    let ds = Dataset::load_npy(&s, &l, &LoadOptions::default()).unwrap();
    let mut row = vec![0f32; 5];
    ds.flux_into(2, &mut row);
    assert_eq!(row, [2.5, 2.75, 3.0, 3.25, 3.5]);
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, l) = write_pair(dir.path(), 3, 8);
    let missing = dir.path().join("nope.npy");
    let msg = load_err(&missing, &l, &LoadOptions::default());
    assert_mentions(&msg, &["nope.npy", "cannot open", "starflow synth"]);
}

/// A mistyped data directory is a not-found error (the Python layer's `FileNotFoundError`),
/// while a path that exists but is a file stays a plain invalid-input error.
#[test]
fn missing_and_non_directory_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let err = Dataset::load_dir(&missing, &LoadOptions::default()).unwrap_err();
    assert!(err.is_not_found() && err.is_user_error(), "{err}");
    assert_mentions(
        &err.to_string(),
        &["no-such-dir", "no such directory", "starflow synth"],
    );

    let (s, _) = write_pair(dir.path(), 3, 8);
    let err = Dataset::load_dir(&s, &LoadOptions::default()).unwrap_err();
    assert!(!err.is_not_found() && err.is_user_error(), "{err}");
    assert_mentions(&err.to_string(), &["spectra.npy", "is not a directory"]);
}

#[test]
fn not_an_npy_file_and_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, l) = write_pair(dir.path(), 3, 8);
    let bad = dir.path().join("bad.npy");
    std::fs::write(&bad, "mass,age\n1,2\n").unwrap();
    assert_mentions(
        &load_err(&bad, &l, &LoadOptions::default()),
        &["bad.npy", "not an npy file"],
    );
    std::fs::write(&bad, "").unwrap();
    assert_mentions(
        &load_err(&bad, &l, &LoadOptions::default()),
        &["bad.npy", "empty"],
    );
}

#[test]
fn truncated_data() {
    let dir = tempfile::tempdir().unwrap();
    let (s, l) = write_pair(dir.path(), 4, 2000);
    let bytes = std::fs::read(&s).unwrap();
    std::fs::write(&s, &bytes[..bytes.len() - 100]).unwrap();
    assert_mentions(
        &load_err(&s, &l, &LoadOptions::default()),
        &["spectra.npy", "truncated", "32000 bytes"],
    );
}

#[test]
fn unsupported_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let (s, l) = write_pair(dir.path(), 3, 8);
    patch_header(&s, "'<f4'", "'<i4'");
    assert_mentions(
        &load_err(&s, &l, &LoadOptions::default()),
        &["spectra.npy", "unsupported dtype '<i4'", "astype"],
    );
}

#[test]
fn fortran_order() {
    let dir = tempfile::tempdir().unwrap();
    let (s, l) = write_pair(dir.path(), 3, 8);
    patch_header(&s, "'fortran_order': False", "'fortran_order': True ");
    assert_mentions(
        &load_err(&s, &l, &LoadOptions::default()),
        &["spectra.npy", "Fortran", "ascontiguousarray"],
    );
}

#[test]
fn wrong_rank() {
    let dir = tempfile::tempdir().unwrap();
    let (_, l) = write_pair(dir.path(), 3, 8);
    let s = dir.path().join("flat.npy");
    write_npy(&s, &[24], &[1f32; 24]).unwrap();
    assert_mentions(
        &load_err(&s, &l, &LoadOptions::default()),
        &["flat.npy", "2-D", "1-D"],
    );
}

#[test]
fn row_count_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = write_pair(dir.path(), 4, 8);
    let l = dir.path().join("l3.npy");
    write_npy(
        &l,
        &[3, 8],
        &(0..3).flat_map(labels_row).collect::<Vec<_>>(),
    )
    .unwrap();
    assert_mentions(
        &load_err(&s, &l, &LoadOptions::default()),
        &["l3.npy", "row-count mismatch", "4 spectra", "3 label rows"],
    );
}

#[test]
fn too_few_label_columns() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = write_pair(dir.path(), 3, 8);
    let l = dir.path().join("l.npy");
    write_npy(
        &l,
        &[3, 3],
        &[5000.0, 4.0, 0.0, 5100.0, 4.1, 0.1, 5200.0, 4.2, 0.2],
    )
    .unwrap();
    let msg = load_err(&s, &l, &LoadOptions::default());
    assert_mentions(
        &msg,
        &["l.npy", "too few label columns", "has 3", "--label-names"],
    );
    // Naming the three columns makes the same file valid.
    let opts = LoadOptions {
        label_names: vec!["t_eff".into(), "log_g".into(), "fe_h".into()],
        ..LoadOptions::default()
    };
    assert_eq!(Dataset::load_npy(&s, &l, &opts).unwrap().len(), 3);
}

#[test]
fn unknown_target() {
    let dir = tempfile::tempdir().unwrap();
    let (s, l) = write_pair(dir.path(), 3, 8);
    let opts = LoadOptions {
        targets: vec!["teff".into()],
        ..LoadOptions::default()
    };
    assert_mentions(
        &load_err(&s, &l, &opts),
        &["unknown label column 'teff'", "t_eff"],
    );
}

#[test]
fn nonfinite_values_are_reported_and_can_be_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let n_pix = 16;
    let mut spectra = vec![1f32; 20 * n_pix];
    for r in [3usize, 7, 11, 12, 13, 19] {
        spectra[r * n_pix + 5] = if r % 2 == 0 { f32::NAN } else { f32::INFINITY };
    }
    let s = dir.path().join("spectra.npy");
    let l = dir.path().join("labels.npy");
    write_npy(&s, &[20, n_pix], &spectra).unwrap();
    let mut labels: Vec<f64> = (0..20).flat_map(labels_row).collect();
    labels[5 * 8 + 6] = f64::NAN; // fe_h of row 5
    labels[2 * 8] = f64::NAN; // mass of row 2: not a target, must not matter
    write_npy(&l, &[20, 8], &labels).unwrap();
    let msg = load_err(&s, &l, &LoadOptions::default());
    assert_mentions(
        &msg,
        &[
            "spectra.npy",
            "6 spectra contain non-finite",
            "3, 7, 11, 12, 13, ...",
            "--drop-nonfinite",
        ],
    );
    let opts = LoadOptions {
        drop_nonfinite: true,
        ..LoadOptions::default()
    };
    let ds = Dataset::load_npy(&s, &l, &opts).unwrap();
    assert_eq!(ds.dropped_rows(), [3, 5, 7, 11, 12, 13, 19]);
    assert_eq!(ds.len(), 13);
    assert_eq!(ds.file_row(2), 2);
    assert_eq!(ds.file_row(3), 4);
    // Non-finite targets alone are reported against the labels file.
    write_npy(&s, &[20, n_pix], &vec![1f32; 20 * n_pix]).unwrap();
    assert_mentions(
        &load_err(&s, &l, &LoadOptions::default()),
        &["labels.npy", "1 rows have non-finite target", "5"],
    );
}

#[test]
fn constant_label_column() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = write_pair(dir.path(), 5, 8);
    let mut labels: Vec<f64> = (0..5).flat_map(labels_row).collect();
    for r in 0..5 {
        labels[r * 8 + 5] = 4.4;
    }
    let l = dir.path().join("labels.npy");
    write_npy(&l, &[5, 8], &labels).unwrap();
    assert_mentions(
        &load_err(&s, &l, &LoadOptions::default()),
        &["labels.npy", "'log_g'", "constant"],
    );
}

#[test]
fn header_parser_matches_numpy_bytes() {
    // Bytes numpy 1.26 writes for np.save(f, np.zeros((2, 3), np.float32)).
    let mut numpy =
        b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
            .to_vec();
    while numpy.len() < 127 {
        numpy.push(b' ');
    }
    numpy.push(b'\n');
    numpy.extend_from_slice(&[0u8; 24]);
    assert_eq!(encode_npy(&[2, 3], &[0f32; 6]).unwrap(), numpy);
}
