//! Splits, shuffling, normalisation and batches.

use candle_core::Device;
use starflow_data::npy::write_npy;
use starflow_data::{
    epoch_order, Batcher, Dataset, FluxTransform, LabelScaler, LoadOptions, Split, SplitFractions,
};

#[test]
fn reference_split_sizes_and_determinism() {
    let s = Split::new(8914, SplitFractions::default(), 42).unwrap();
    assert_eq!(
        (s.train.len(), s.val.len(), s.test.len()),
        (6239, 1337, 1338)
    );
    let mut all: Vec<usize> = s
        .train
        .iter()
        .chain(&s.val)
        .chain(&s.test)
        .copied()
        .collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..8914).collect::<Vec<_>>(),
        "splits must partition the stars"
    );
    assert_eq!(s, Split::new(8914, SplitFractions::default(), 42).unwrap());
    assert_ne!(
        s.train,
        Split::new(8914, SplitFractions::default(), 43)
            .unwrap()
            .train
    );
}

#[test]
fn bad_fractions_are_rejected() {
    for (f, needle) in [
        (
            SplitFractions {
                train: 0.7,
                val: 0.2,
                test: 0.2,
            },
            "sum to 1",
        ),
        (
            SplitFractions {
                train: -0.1,
                val: 0.6,
                test: 0.5,
            },
            "split.train",
        ),
        (
            SplitFractions {
                train: 0.0,
                val: 0.5,
                test: 0.5,
            },
            "greater than 0",
        ),
        (
            SplitFractions {
                train: f64::NAN,
                val: 0.5,
                test: 0.5,
            },
            "between 0 and 1",
        ),
    ] {
        let e = Split::new(100, f, 1).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
}

#[test]
fn epoch_orders_are_seeded_permutations() {
    let idx: Vec<usize> = (100..200).collect();
    let a = epoch_order(&idx, 7, 0);
    let b = epoch_order(&idx, 7, 1);
    assert_eq!(a, epoch_order(&idx, 7, 0));
    assert_ne!(a, b);
    let mut sorted = b.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, idx);
}

fn dataset(dir: &std::path::Path, n: usize, n_pix: usize) -> Dataset {
    let spectra: Vec<f32> = (0..n * n_pix)
        .map(|k| if k % 5 == 0 { 0.0 } else { 1.5 })
        .collect();
    let labels: Vec<f64> = (0..n)
        .flat_map(|i| {
            [
                1.0,
                1.0,
                1.0,
                1.0,
                4000.0 + 100.0 * i as f64,
                1.0 + 0.5 * i as f64,
                -1.0 + 0.1 * i as f64,
                30.0,
            ]
        })
        .collect();
    write_npy(dir.join("spectra.npy"), &[n, n_pix], &spectra).unwrap();
    write_npy(dir.join("labels.npy"), &[n, 8], &labels).unwrap();
    Dataset::load_dir(dir, &LoadOptions::default()).unwrap()
}

#[test]
fn scaler_uses_training_stars_only() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 10, 8);
    let sc = LabelScaler::fit(&ds, &[0, 1, 2]).unwrap();
    assert_eq!(sc.mean[0], 4100.0);
    assert!((sc.std[0] - (20000.0f64 / 3.0).sqrt()).abs() < 1e-9);
    let mut v = vec![4100.0, 1.5, -0.9];
    sc.to_z(&mut v);
    assert!(v.iter().all(|x| x.abs() < 1e-12));
    let mut w = vec![1.0, -1.0, 2.0];
    sc.to_z(&mut w.clone());
    let orig = w.clone();
    sc.to_physical(&mut w);
    sc.to_z(&mut w);
    for (a, b) in w.iter().zip(&orig) {
        assert!((a - b).abs() < 1e-12);
    }
}

#[test]
fn batches_have_the_right_shapes_values_and_remainder() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 10, 8);
    let sc = LabelScaler::fit(&ds, &(0..10).collect::<Vec<_>>()).unwrap();
    let b = Batcher {
        dataset: &ds,
        flux: FluxTransform::default(),
        scaler: &sc,
        device: Device::Cpu,
    };
    let order: Vec<usize> = (0..10).collect();
    let batches: Vec<_> = b
        .batches(&order, 4)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[0].x.dims(), [4, 1, 8]);
    assert_eq!(batches[2].x.dims(), [2, 1, 8]);
    assert_eq!(batches[2].y.dims(), [2, 3]);
    assert_eq!(batches[2].indices, [8, 9]);
    let x: Vec<f32> = batches[0].x.flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        (x[0] - 0.2f32.ln()).abs() < 1e-6,
        "zero flux is floored at 0.2 before the log"
    );
    assert!((x[1] - 1.5f32.ln()).abs() < 1e-6);
    let y: Vec<f64> = batches[0].y.flatten_all().unwrap().to_vec1().unwrap();
    assert!((y[0] - (4000.0 - sc.mean[0]) / sc.std[0]).abs() < 1e-12);
    assert!(b.batches(&order, 0).is_err());
}

#[test]
fn flux_floor_must_be_positive() {
    assert!(FluxTransform::new(0.0).is_err());
    assert!(FluxTransform::new(f32::NAN).is_err());
    assert_eq!(FluxTransform::new(0.2).unwrap(), FluxTransform::default());
}
