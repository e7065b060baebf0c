//! HDF5 input (only with `--features hdf5`, which needs the system libhdf5).
#![cfg(feature = "hdf5")]

use hdf5_metno as hdf5;
use starflow_data::hdf5_input::{load_hdf5, Hdf5Names};
use starflow_data::LoadOptions;

fn write_h5(path: &std::path::Path, spectra_name: &str, rows_labels: usize) {
    let f = hdf5::File::create(path).unwrap();
    let spectra: Vec<f64> = (0..4 * 6).map(|k| 0.5 + k as f64 * 0.01).collect();
    f.new_dataset::<f64>()
        .shape((4, 6))
        .create(spectra_name)
        .unwrap()
        .write_raw(&spectra)
        .unwrap();
    let labels: Vec<f64> = (0..rows_labels)
        .flat_map(|i| {
            [
                1.0,
                2.0,
                1.0,
                10.0,
                5000.0 + i as f64,
                4.0 + 0.1 * i as f64,
                -0.1 * i as f64,
                40.0,
            ]
        })
        .collect();
    f.new_dataset::<f64>()
        .shape((rows_labels, 8))
        .create("labels")
        .unwrap()
        .write_raw(&labels)
        .unwrap();
}

#[test]
fn loads_both_datasets_and_converts_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("galah.h5");
    write_h5(&p, "flux", 4);
    let names = Hdf5Names {
        spectra: "flux".into(),
        labels: "labels".into(),
    };
    let ds = load_hdf5(&p, &names, &LoadOptions::default()).unwrap();
    assert_eq!((ds.len(), ds.n_pix()), (4, 6));
    let mut row = vec![0f32; 6];
    ds.flux_into(1, &mut row);
    assert!((row[0] - 0.56).abs() < 1e-6);
    assert_eq!(ds.targets(2), vec![5002.0, 4.2, -0.2]);
}

#[test]
fn missing_dataset_and_row_mismatch_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("galah.h5");
    write_h5(&p, "flux", 4);
    let e = load_hdf5(&p, &Hdf5Names::default(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("galah.h5") && e.contains("'spectra'"), "{e}");
    let q = dir.path().join("mismatch.h5");
    write_h5(&q, "spectra", 3);
    let e = load_hdf5(&q, &Hdf5Names::default(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mismatch.h5") && e.contains("row-count mismatch"),
        "{e}"
    );
    let e = load_hdf5(
        dir.path().join("none.h5"),
        &Hdf5Names::default(),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("none.h5"), "{e}");
}
