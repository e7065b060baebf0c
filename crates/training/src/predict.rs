//! Prediction on new spectra at survey scale: batch by batch, any slice of the file, the same
//! posterior for a star whatever the slicing.
//!
//! A [`Predictor`] holds a trained model and a memory-mapped spectra file. The caller walks
//! [`Predictor::batches`] and hands each batch's [`StarPrediction`]s on as they come (the CLI writes
//! them to a table), so memory stays bounded by one batch whatever the number of stars.
//!
//! **Invariant:** a star's prediction depends only on the run, the spectrum, the seed and its row in
//! the file. Its posterior samples come from its own ChaCha8 stream (the seed as key, the row as
//! stream number), and its network output does not depend on the other spectra of its batch: eval
//! mode, per-item convolutions, and every forward pass has the same shape with each star in the slot
//! of its row (see `Predictor::read`; without that, a 2-star batch rounded differently from a
//! 128-star one in the 8th digit). So the rows `a..b` and `b..c` predicted in two processes give
//! exactly the rows of `a..c` predicted in one, which is what lets a cluster split a survey into
//! shards.

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use starflow_data::npy::NpyArray;
use starflow_data::FluxTransform;

use crate::error::{Result, TrainError};
use crate::evaluate::{
    check_samples, summarize_batch, to_physical, Calibration, Draws, StarPrediction,
};
use crate::model::StarModel;
use crate::run::RunState;
use crate::train::load_run;

/// Spectra per forward pass: large enough to keep the kernels busy, small enough that a batch of
/// GALAH spectra (128 × 16,384 px) and its activations stay well under a gigabyte.
pub const PREDICT_BATCH: usize = 128;

/// A trained run and a spectra file, ready to predict any of its rows.
pub struct Predictor {
    state: RunState,
    model: StarModel,
    spectra: NpyArray,
    path: PathBuf,
    flux: FluxTransform,
    rows: Range<usize>,
    n_pix: usize,
    n_samples: usize,
    seed: u64,
    calibration: Option<Calibration>,
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor")
            .field("spectra", &self.path)
            .field("rows", &self.rows)
            .finish()
    }
}

impl Predictor {
    /// Opens the run and the spectra, and checks that `rows` (`(start, end)`, `end` `None` for the
    /// end of the file; all rows when `None`) lie in the file and the pixel grid matches the run.
    pub fn open(
        run_dir: &Path,
        spectra: &Path,
        rows: Option<(usize, Option<usize>)>,
        n_samples: usize,
        seed: u64,
        calibration: Option<&Calibration>,
    ) -> Result<Self> {
        check_samples(run_dir, n_samples)?;
        let (state, model) = load_run(run_dir)?;
        let arr = NpyArray::open(spectra)?;
        let (n_rows, n_pix) = arr.shape2("spectra")?;
        if n_pix != state.n_pix {
            return Err(TrainError::Input {
                path: spectra.to_path_buf(),
                problem: format!(
                    "spectra have {n_pix} pixels, but the run was trained on {} pixels",
                    state.n_pix
                ),
                fix: "pass spectra on the same wavelength grid as the training data".into(),
            });
        }
        let rows = row_range(spectra, n_rows, rows)?;
        Ok(Predictor {
            flux: FluxTransform::new(state.flux_floor)?,
            state,
            model,
            spectra: arr,
            path: spectra.to_path_buf(),
            rows,
            n_pix,
            n_samples,
            seed,
            calibration: calibration.cloned(),
        })
    }

    /// The rows this predictor covers.
    pub fn rows(&self) -> Range<usize> {
        self.rows.clone()
    }

    /// The predicted labels, in column order.
    pub fn label_names(&self) -> &[String] {
        &self.state.scaler.names
    }

    /// The batches of [`Predictor::rows`], in order, cut at multiples of [`PREDICT_BATCH`] of the
    /// file's row number so that a shard starting inside a batch still lines up with the others.
    pub fn batches(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let end = self.rows.end;
        let mut start = self.rows.start;
        std::iter::from_fn(move || {
            (start < end).then(|| {
                let stop = ((start / PREDICT_BATCH + 1) * PREDICT_BATCH).min(end);
                let r = start..stop;
                start = stop;
                r
            })
        })
    }

    /// Posterior summaries, in physical units, of the stars in `rows` (within [`Predictor::rows`]).
    pub fn predict_batch(&self, rows: Range<usize>) -> Result<Vec<StarPrediction>> {
        let (x, offset) = self.read(rows.clone())?;
        let params = self
            .model
            .params(&x, false)?
            .narrow(0, offset, rows.len())?;
        let row_ids: Vec<usize> = rows.clone().collect();
        let mut draws = Draws::PerStar {
            seed: self.seed,
            rows: &row_ids,
        };
        let batch = summarize_batch(
            &self.model,
            &params,
            None,
            self.n_samples,
            &mut draws,
            self.calibration.as_ref(),
        )?;
        let scaler = &self.state.scaler;
        Ok(batch
            .items
            .into_iter()
            .zip(rows)
            .map(|((s, _), row)| {
                let (mean, std, quantiles) = to_physical(&s, &scaler.mean, &scaler.std);
                StarPrediction {
                    row,
                    mean,
                    std,
                    quantiles,
                    truth: None,
                    pit: None,
                    hpd: None,
                }
            })
            .collect())
    }

    /// The preprocessed spectra of `rows` (within one aligned batch) as a full `(PREDICT_BATCH, 1,
    /// n_pix)` tensor with each star at its file row modulo the batch size, the other slots zero;
    /// returns it and the slot of the first star. The network then always sees the same shape with
    /// every star in the same slot: the matrix products' blocking, and so the rounding of each
    /// star's output, cannot depend on how many stars a shard or the file's end left in the batch.
    /// A non-finite flux is an error that names the row and pixel.
    fn read(&self, rows: Range<usize>) -> Result<(Tensor, usize)> {
        let n_pix = self.n_pix;
        let offset = rows.start % PREDICT_BATCH;
        debug_assert!(
            offset + rows.len() <= PREDICT_BATCH,
            "rows span two batches"
        );
        let mut x = vec![0f32; PREDICT_BATCH * n_pix];
        let used = &mut x[offset * n_pix..(offset + rows.len()) * n_pix];
        for (buf, r) in used.chunks_exact_mut(n_pix).zip(rows.clone()) {
            self.spectra.read_f32_into(r * n_pix, buf);
            if let Some(k) = buf.iter().position(|v| !v.is_finite()) {
                return Err(TrainError::Input {
                    path: self.path.clone(),
                    problem: format!("row {r} has a non-finite value at pixel {k}"),
                    fix: "clean the spectra (NaN and inf cannot be predicted on)".into(),
                });
            }
            self.flux.apply(buf);
        }
        // Each spectrum is read once: its pages need not stay resident.
        self.spectra.release(rows.start * n_pix, rows.len() * n_pix);
        let x = Tensor::from_vec(x, (PREDICT_BATCH, 1, n_pix), &self.model.device)?;
        Ok((x, offset))
    }
}

/// The rows `--rows` asks for, checked against the file's `n_rows`.
fn row_range(
    path: &Path,
    n_rows: usize,
    rows: Option<(usize, Option<usize>)>,
) -> Result<Range<usize>> {
    let (start, end) = match rows {
        None => (0, n_rows),
        Some((start, end)) => (start, end.unwrap_or(n_rows)),
    };
    if start >= end || end > n_rows {
        return Err(TrainError::Input {
            path: path.to_path_buf(),
            problem: format!("rows {start}:{end} are not within the file's {n_rows} rows"),
            fix: format!(
                "pass --rows START:END with 0 <= START < END <= {n_rows} (END may be left out)"
            ),
        });
    }
    Ok(start..end)
}

/// Posterior summaries for all rows of a spectra file, collected (see [`Predictor`] for the
/// streaming form).
pub fn predict_scaled(
    run_dir: &Path,
    spectra: &Path,
    n_samples: usize,
    seed: u64,
    calibration: Option<&Calibration>,
) -> Result<Vec<StarPrediction>> {
    let p = Predictor::open(run_dir, spectra, None, n_samples, seed, calibration)?;
    let mut out = Vec::with_capacity(p.rows().len());
    for batch in p.batches() {
        out.extend(p.predict_batch(batch)?);
    }
    Ok(out)
}

/// [`predict_scaled`] without recalibration.
pub fn predict(
    run_dir: &Path,
    spectra: &Path,
    n_samples: usize,
    seed: u64,
) -> Result<Vec<StarPrediction>> {
    predict_scaled(run_dir, spectra, n_samples, seed, None)
}
