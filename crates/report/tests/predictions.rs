//! Prediction tables written batch by batch: CSV and Parquet hold the same numbers bit for bit, the
//! streamed CSV equals the one-shot one, and an unfinished table never replaces the previous one.

use polars::prelude::{DataType, ParquetReader, SerReader};
use starflow_inference::StarPrediction;
use starflow_report::predictions::{prediction_columns, predictions_csv, PredictionWriter};

fn names() -> Vec<String> {
    ["t_eff", "log_g", "fe_h"].map(String::from).to_vec()
}

/// Stars with awkward values: many digits, tiny and huge magnitudes, negative zero.
fn stars(n: usize, with_truth: bool) -> Vec<StarPrediction> {
    (0..n)
        .map(|i| {
            let x = i as f64;
            StarPrediction {
                row: 1000 + i,
                mean: vec![5000.0 + x / 3.0, 4.4 - 1e-9 * x, -0.0 - x * 1e-300],
                std: vec![91.2 + x, 0.1 / (x + 3.0), 1e-17],
                quantiles: (0..3)
                    .map(|j| [0.1, 0.2, 0.5, 0.8, 0.9].map(|q| q * (j as f64 + 1.0) + x / 7.0))
                    .collect(),
                truth: with_truth.then(|| vec![x, -x, x / 11.0]),
                pit: with_truth.then(|| vec![0.5, 0.25, 1.0 / 3.0]),
                hpd: with_truth.then_some(0.7 + x * 1e-3),
                nll: with_truth.then_some(-3.25 - x * 1e-7),
                noise: None,
            }
        })
        .collect()
}

#[test]
fn streamed_csv_equals_the_one_shot_table_and_parquet_holds_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    for with_truth in [false, true] {
        let all = stars(300, with_truth);
        let csv = dir.path().join(format!("p{with_truth}.csv"));
        let pq = dir.path().join(format!("p{with_truth}.parquet"));
        for path in [&csv, &pq] {
            let mut w = PredictionWriter::create(path, &names(), with_truth).unwrap();
            for chunk in all.chunks(128) {
                w.write(chunk).unwrap();
            }
            assert_eq!(w.rows(), 300);
            w.finish().unwrap();
        }
        let text = std::fs::read_to_string(&csv).unwrap();
        assert_eq!(text, predictions_csv(&names(), &all));

        let df = ParquetReader::new(std::fs::File::open(&pq).unwrap())
            .finish()
            .unwrap();
        let columns = prediction_columns(&names(), with_truth);
        assert_eq!(df.height(), 300);
        let got: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(got, columns);
        assert_eq!(df.column("row").unwrap().dtype(), &DataType::UInt64);
        // Every float cell of the CSV parses back to the Parquet cell's exact bits.
        for (i, line) in text.lines().skip(1).enumerate() {
            for (k, cell) in line.split(',').enumerate().skip(1) {
                let col = df.column(&columns[k]).unwrap().f64().unwrap();
                let want: f64 = cell.parse().unwrap();
                assert_eq!(
                    col.get(i).unwrap().to_bits(),
                    want.to_bits(),
                    "row {i} {}",
                    columns[k]
                );
            }
        }
    }
}

#[test]
fn an_unfinished_table_leaves_the_previous_one_and_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["p.csv", "p.parquet"] {
        let path = dir.path().join(name);
        std::fs::write(&path, "previous").unwrap();
        let mut w = PredictionWriter::create(&path, &names(), false).unwrap();
        w.write(&stars(10, false)).unwrap();
        drop(w); // an error or an interrupt before `finish`
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "previous");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn an_unknown_extension_is_a_user_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = PredictionWriter::create(&dir.path().join("p.tsv"), &names(), false).unwrap_err();
    assert!(e.is_user_error());
    let msg = e.to_string();
    assert!(
        msg.contains("p.tsv") && msg.contains("*.csv or *.parquet"),
        "{msg}"
    );
}
