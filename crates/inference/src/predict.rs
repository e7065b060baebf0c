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
use rand_chacha::ChaCha8Rng;
use starflow_data::npy::NpyArray;

use crate::calibration::Calibration;
use crate::ensemble::load_members;
use crate::posterior::{
    check_samples, star_rng, BatchPosterior, Draws, PosteriorSettings, Sampling,
};
use crate::run::Run;
use crate::star::StarPrediction;
use starflow_training::error::{Result, TrainError};

/// Spectra per forward pass: large enough to keep the kernels busy, small enough that a batch of
/// GALAH spectra (128 × 16,384 px) and its activations stay well under a gigabyte.
pub const PREDICT_BATCH: usize = 128;

/// Rows of spectra to predict on, each `n_pix` fluxes: a memory-mapped `.npy` file
/// ([`SpectraFile`]) or an array already in memory ([`SpectraSlice`], e.g. a numpy array lent by
/// the Python package without a copy).
pub trait SpectraRows: Sync {
    /// Where the rows come from, for error messages (a path, or a name such as `<array>`).
    fn origin(&self) -> &Path;
    /// Number of rows.
    fn n_rows(&self) -> usize;
    /// The row numbers these spectra hold, `0..n_rows()` unless they are a slice of a larger set
    /// (see [`SpectraSlice::starting_at`]). A star's posterior samples are keyed by its row number.
    fn rows(&self) -> Range<usize> {
        0..self.n_rows()
    }
    /// Pixels per row.
    fn n_pix(&self) -> usize;
    /// Copies row `row` (one of [`SpectraRows::rows`]) into `out` (`n_pix` values) as f32.
    fn read_row(&self, row: usize, out: &mut [f32]);
    /// The rows will not be read again soon (a mapped file gives their pages back).
    fn release(&self, _rows: Range<usize>) {}
}

/// A spectra `.npy` file (float32 or float64, `(n_stars, n_pix)`), memory-mapped.
pub struct SpectraFile {
    array: NpyArray,
    path: PathBuf,
    n_rows: usize,
    n_pix: usize,
}

impl SpectraFile {
    /// Maps the file and checks that it is a 2-D float array.
    pub fn open(path: &Path) -> Result<Self> {
        let array = NpyArray::open(path)?;
        let (n_rows, n_pix) = array.shape2("spectra")?;
        Ok(SpectraFile {
            array,
            path: path.to_path_buf(),
            n_rows,
            n_pix,
        })
    }
}

impl SpectraRows for SpectraFile {
    fn origin(&self) -> &Path {
        &self.path
    }
    fn n_rows(&self) -> usize {
        self.n_rows
    }
    fn n_pix(&self) -> usize {
        self.n_pix
    }
    fn read_row(&self, row: usize, out: &mut [f32]) {
        self.array.read_f32_into(row * self.n_pix, out);
    }
    fn release(&self, rows: Range<usize>) {
        // Each spectrum is read once: its pages need not stay resident.
        self.array
            .release(rows.start * self.n_pix, rows.len() * self.n_pix);
    }
}

/// Flat row-major fluxes of either float width.
#[derive(Clone, Copy, Debug)]
pub enum Fluxes<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// Spectra held in memory: `n_rows × n_pix` fluxes, row-major, borrowed without a copy.
#[derive(Clone, Copy, Debug)]
pub struct SpectraSlice<'a> {
    fluxes: Fluxes<'a>,
    n_pix: usize,
    origin: &'a Path,
    first_row: usize,
}

impl<'a> SpectraSlice<'a> {
    /// `fluxes` holds whole rows of `n_pix` values; `origin` names them in errors.
    pub fn new(fluxes: Fluxes<'a>, n_pix: usize, origin: &'a Path) -> Result<Self> {
        let len = match fluxes {
            Fluxes::F32(v) => v.len(),
            Fluxes::F64(v) => v.len(),
        };
        if n_pix == 0 || len % n_pix != 0 {
            return Err(TrainError::Input {
                path: origin.to_path_buf(),
                problem: format!("{len} fluxes do not make whole spectra of {n_pix} pixels"),
                fix: "pass a 2-D array of shape (n_stars, n_pix)".into(),
            });
        }
        Ok(SpectraSlice {
            fluxes,
            n_pix,
            origin,
            first_row: 0,
        })
    }

    /// The same spectra as rows `first_row..` of a larger set: predicting a set in chunks this
    /// way gives exactly the rows of predicting it in one go (the same per-star streams).
    pub fn starting_at(self, first_row: usize) -> Self {
        SpectraSlice { first_row, ..self }
    }
}

impl SpectraRows for SpectraSlice<'_> {
    fn origin(&self) -> &Path {
        self.origin
    }
    fn n_rows(&self) -> usize {
        match self.fluxes {
            Fluxes::F32(v) => v.len() / self.n_pix,
            Fluxes::F64(v) => v.len() / self.n_pix,
        }
    }
    fn n_pix(&self) -> usize {
        self.n_pix
    }
    fn rows(&self) -> Range<usize> {
        self.first_row..self.first_row + self.n_rows()
    }
    fn read_row(&self, row: usize, out: &mut [f32]) {
        let i = row - self.first_row;
        let at = i * self.n_pix..(i + 1) * self.n_pix;
        match self.fluxes {
            Fluxes::F32(v) => out.copy_from_slice(&v[at]),
            Fluxes::F64(v) => {
                for (o, &x) in out.iter_mut().zip(&v[at]) {
                    *o = x as f32;
                }
            }
        }
    }
}

impl Run {
    /// Checks that `spectra` are on the run's pixel grid and that the settings are usable.
    pub fn check(&self, spectra: &dyn SpectraRows, settings: &PosteriorSettings) -> Result<()> {
        check_samples(self.dir(), settings.n_samples)?;
        self.check_pixels(spectra)
    }

    /// Fails when `spectra` are not on the run's pixel grid.
    pub fn check_pixels(&self, spectra: &dyn SpectraRows) -> Result<()> {
        if spectra.n_pix() != self.state.n_pix {
            return Err(TrainError::Input {
                path: spectra.origin().to_path_buf(),
                problem: format!(
                    "spectra have {} pixels, but the run was trained on {} pixels",
                    spectra.n_pix(),
                    self.state.n_pix
                ),
                fix: "pass spectra on the same wavelength grid as the training data".into(),
            });
        }
        Ok(())
    }

    /// Posterior summaries, in physical units, of the stars in `rows`, which lie within one
    /// aligned batch (see [`batches`]).
    pub fn predict_batch(
        &self,
        spectra: &dyn SpectraRows,
        rows: Range<usize>,
        settings: &PosteriorSettings,
    ) -> Result<Vec<StarPrediction>> {
        let sampling = (settings.n_samples, Sampling::WhereNeeded);
        let (batch, noise) =
            self.with_posterior(spectra, rows.clone(), settings, sampling, |post| {
                Ok(post.summaries(None))
            })?;
        let scaler = &self.state.scaler;
        Ok(batch
            .items
            .into_iter()
            .zip(rows)
            .zip(noise)
            .map(|(((s, _), row), noise)| {
                StarPrediction::from_summary(row, &s, (&scaler.mean, &scaler.std), noise)
            })
            .collect())
    }

    /// Posterior summaries of every row of `spectra` ([`SpectraRows::rows`]), batch by batch; `progress` is told the
    /// number of stars done after each batch.
    pub fn predict(
        &self,
        spectra: &dyn SpectraRows,
        settings: &PosteriorSettings,
        progress: &dyn Fn(usize),
    ) -> Result<Vec<StarPrediction>> {
        self.check(spectra, settings)?;
        let mut out = Vec::with_capacity(spectra.n_rows());
        for rows in batches(spectra.rows()) {
            out.extend(self.predict_batch(spectra, rows, settings)?);
            progress(out.len());
        }
        Ok(out)
    }

    /// `n` posterior samples of every row of `spectra`, `(n_rows, n, d)` row-major in physical
    /// units (see [`Run::sample_batch`]).
    pub fn sample(
        &self,
        spectra: &dyn SpectraRows,
        n: usize,
        settings: &PosteriorSettings,
    ) -> Result<Vec<f64>> {
        self.check(spectra, settings)?;
        let mut out = Vec::with_capacity(spectra.n_rows() * n * self.model.flow.dim());
        for rows in batches(spectra.rows()) {
            out.extend(self.sample_batch(spectra, rows, n, settings)?);
        }
        Ok(out)
    }

    /// `n` posterior samples of each star in `rows` (within one aligned batch), in physical
    /// units, `(rows, n, d)` row-major. Each star's draws come from the same stream as in
    /// [`Run::predict_batch`], so for a sampled flow with `n` equal to the summaries'
    /// sample count these are the very samples the summaries describe. With a recalibration each
    /// sample is mapped like the posterior (see [`Calibration`]) about the unscaled posterior's
    /// mean, standard deviation and correlation (exact for Gaussian flows).
    pub fn sample_batch(
        &self,
        spectra: &dyn SpectraRows,
        rows: Range<usize>,
        n: usize,
        settings: &PosteriorSettings,
    ) -> Result<Vec<f64>> {
        let d = self.model.flow.dim();
        let (mut samples, _) =
            self.with_posterior(spectra, rows, settings, (n, Sampling::Always), |post| {
                Ok(post.mapped_samples().expect("drawn for every flow"))
            })?;
        let scaler = &self.state.scaler;
        for (k, v) in samples.values.iter_mut().enumerate() {
            *v = scaler.mean[k % d] + scaler.std[k % d] * *v;
        }
        Ok(samples.values)
    }

    /// `f` of the posterior of the stars in `rows` (within one aligned batch) under `settings`,
    /// with `n` samples per star drawn as `sampling` says, each star from its own stream; and the
    /// stars' noise levels ([`StarPrediction::noise`]).
    fn with_posterior<T>(
        &self,
        spectra: &dyn SpectraRows,
        rows: Range<usize>,
        settings: &PosteriorSettings,
        (n, sampling): (usize, Sampling),
        f: impl FnOnce(&BatchPosterior) -> Result<T>,
    ) -> Result<(T, Vec<Option<f64>>)> {
        let (params, noise) = self.params(spectra, rows.clone())?;
        let row_ids: Vec<usize> = rows.collect();
        let mut draws = Draws::PerStar {
            seed: settings.seed,
            rows: &row_ids,
        };
        let cal = settings.calibration.as_ref().map(Calibration::resolved);
        let post = BatchPosterior::new(
            &self.model.flow,
            &params,
            (n, &mut draws, sampling),
            cal.as_ref(),
            &noise,
        )?;
        Ok((f(&post)?, noise))
    }

    /// The flow parameters of the stars in `rows` (within one aligned batch) and their spectra's
    /// noise levels ([`StarPrediction::noise`]).
    pub(crate) fn params(
        &self,
        spectra: &dyn SpectraRows,
        rows: Range<usize>,
    ) -> Result<(Tensor, Vec<Option<f64>>)> {
        let (x, offset) = self.read(spectra, rows.clone())?;
        let noise = starflow_data::log_noise_levels(&x.narrow(0, offset, rows.len())?)?;
        let params = self
            .model
            .params(&x, false)?
            .narrow(0, offset, rows.len())?;
        Ok((params, noise))
    }

    /// The preprocessed spectra of `rows` (within one aligned batch) as a full `(PREDICT_BATCH, 1,
    /// n_pix)` tensor with each star at its row modulo the batch size, the other slots zero;
    /// returns it and the slot of the first star. The network then always sees the same shape with
    /// every star in the same slot: the matrix products' blocking, and so the rounding of each
    /// star's output, cannot depend on how many stars a shard or the file's end left in the batch.
    /// A non-finite flux is an error that names the row and pixel.
    fn read(&self, spectra: &dyn SpectraRows, rows: Range<usize>) -> Result<(Tensor, usize)> {
        let n_pix = spectra.n_pix();
        let offset = rows.start % PREDICT_BATCH;
        debug_assert!(
            offset + rows.len() <= PREDICT_BATCH,
            "rows span two batches"
        );
        let mut x = vec![0f32; PREDICT_BATCH * n_pix];
        let used = &mut x[offset * n_pix..(offset + rows.len()) * n_pix];
        for (buf, r) in used.chunks_exact_mut(n_pix).zip(rows.clone()) {
            spectra.read_row(r, buf);
            if let Some(k) = buf.iter().position(|v| !v.is_finite()) {
                return Err(TrainError::Input {
                    path: spectra.origin().to_path_buf(),
                    problem: format!("row {r} has a non-finite value at pixel {k}"),
                    fix: "clean the spectra (NaN and inf cannot be predicted on)".into(),
                });
            }
            self.flux.apply(buf);
        }
        spectra.release(rows.clone());
        let x = Tensor::from_vec(x, (PREDICT_BATCH, 1, n_pix), &self.model.device)?;
        Ok((x, offset))
    }
}

/// The batches of `rows`, in order, cut at multiples of [`PREDICT_BATCH`] of the row number so
/// that a shard starting inside a batch still lines up with the others.
pub fn batches(rows: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let end = rows.end;
    let mut start = rows.start;
    std::iter::from_fn(move || {
        (start < end).then(|| {
            let stop = ((start / PREDICT_BATCH + 1) * PREDICT_BATCH).min(end);
            let r = start..stop;
            start = stop;
            r
        })
    })
}

/// How many bad rows [`Predictor::check_finite`] names.
pub const LISTED_BAD_ROWS: usize = 5;

/// A trained run (or a deep ensemble of runs) and a spectra file, ready to predict any of its
/// rows (the command line's `starflow predict`).
pub struct Predictor {
    model: Run,
    /// The ensemble's other members (empty for a single run): see [`Predictor::open_ensemble`].
    members: Vec<Run>,
    spectra: SpectraFile,
    rows: Range<usize>,
    settings: PosteriorSettings,
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor")
            .field("spectra", &self.spectra.path)
            .field("rows", &self.rows)
            .finish()
    }
}

impl Predictor {
    /// Opens the run and the spectra, and checks that `rows` (`(start, end)`, `end` `None` for the
    /// end of the file; all rows when `None`) lie in the file, the pixel grid matches the run and
    /// `settings` asks for a usable number of samples.
    pub fn open(
        run_dir: &Path,
        spectra: &Path,
        rows: Option<(usize, Option<usize>)>,
        settings: PosteriorSettings,
    ) -> Result<Self> {
        check_samples(run_dir, settings.n_samples)?;
        let model = Run::open(run_dir)?;
        let spectra = SpectraFile::open(spectra)?;
        model.check(&spectra, &settings)?;
        let rows = row_range(&spectra.path, spectra.n_rows, rows)?;
        Ok(Predictor {
            model,
            members: Vec::new(),
            spectra,
            rows,
            settings,
        })
    }

    /// [`Predictor::open`] for the deep ensemble of `runs` (the first run first): each star's
    /// posterior is the equal-weight mixture of the members' (see [`crate::evaluate_ensemble`];
    /// members must share labels, normalisation, pixel grid and training data), and a
    /// calibration given is an ensemble's, fitted on the mixture
    /// ([`crate::load_or_fit_ensemble_calibration`]).
    pub fn open_ensemble(
        runs: &[PathBuf],
        spectra: &Path,
        rows: Option<(usize, Option<usize>)>,
        settings: PosteriorSettings,
    ) -> Result<Self> {
        let Some(first) = runs.first() else {
            return Err(TrainError::config(
                Path::new("."),
                "an ensemble needs at least one run".to_string(),
            ));
        };
        check_samples(first, settings.n_samples)?;
        let mut members = load_members(runs)?.into_iter();
        let model = members.next().expect("at least one run");
        let spectra = SpectraFile::open(spectra)?;
        model.check(&spectra, &settings)?;
        let rows = row_range(&spectra.path, spectra.n_rows, rows)?;
        Ok(Predictor {
            model,
            members: members.collect(),
            spectra,
            rows,
            settings,
        })
    }

    /// Recalibrates what this predictor gives (or not, with `None`). Callers that fit the
    /// recalibration on the way (minutes, on a run without a saved one) open the predictor
    /// without it first, so that a wrong spectra file, row range or output fails before the fit.
    pub fn set_calibration(&mut self, calibration: Option<Calibration>) {
        self.settings.calibration = calibration;
    }

    /// The recalibration saved in the run, when current ([`Run::saved_calibration`]): what
    /// [`Predictor::set_calibration`] is given unless the caller wants the model's own posteriors
    /// or a run without one has its maps fitted first.
    pub fn saved_calibration(&self) -> Option<Calibration> {
        self.model.saved_calibration()
    }

    /// The rows this predictor covers.
    pub fn rows(&self) -> Range<usize> {
        self.rows.clone()
    }

    /// The predicted labels, in column order.
    pub fn label_names(&self) -> &[String] {
        self.model.label_names()
    }

    /// Checks every row of [`Predictor::rows`] for non-finite fluxes before any work is done, so
    /// that a bad row near the end of a survey file does not abort the prediction after an hour:
    /// the error names the first [`LISTED_BAD_ROWS`] such rows (with a pixel each) and their count.
    /// Reading a row costs far less than predicting it (the scan itself was not timed).
    pub fn check_finite(&self) -> Result<()> {
        let n_pix = self.spectra.n_pix;
        let mut buf = vec![0f32; n_pix];
        let mut bad: Vec<(usize, usize)> = Vec::new();
        let mut count = 0usize;
        for rows in batches(self.rows.clone()) {
            for r in rows.clone() {
                self.spectra.read_row(r, &mut buf);
                if let Some(k) = buf.iter().position(|v| !v.is_finite()) {
                    count += 1;
                    if bad.len() < LISTED_BAD_ROWS {
                        bad.push((r, k));
                    }
                }
            }
            self.spectra.release(rows);
        }
        if count == 0 {
            return Ok(());
        }
        let listed: Vec<String> = bad
            .iter()
            .map(|(r, k)| format!("row {r} (pixel {k})"))
            .collect();
        Err(TrainError::Input {
            path: self.spectra.path.clone(),
            problem: format!(
                "{count} of rows {}..{} hold non-finite values (NaN or inf): {}{}; nothing was \
                 predicted",
                self.rows.start,
                self.rows.end,
                listed.join(", "),
                if count > bad.len() { ", ..." } else { "" }
            ),
            fix: "repair or remove those rows, or predict the rows around them with --rows".into(),
        })
    }

    /// The batches of [`Predictor::rows`] (see [`batches`]).
    pub fn batches(&self) -> impl Iterator<Item = Range<usize>> {
        batches(self.rows.clone())
    }

    /// Posterior summaries, in physical units, of the stars in `rows` (within [`Predictor::rows`]).
    pub fn predict_batch(&self, rows: Range<usize>) -> Result<Vec<StarPrediction>> {
        if self.members.is_empty() {
            return self
                .model
                .predict_batch(&self.spectra, rows, &self.settings);
        }
        let members: Vec<&Run> = std::iter::once(&self.model).chain(&self.members).collect();
        predict_mixture_batch(&members, &self.spectra, rows, &self.settings)
    }
}

/// Posterior summaries of the stars in `rows` (within one aligned batch) under the equal-weight
/// mixture of the `members`' posteriors. Each member draws `n_samples / K` (at least 10) samples
/// per star from the star's own stream for that member ([`member_rng`]), so a star's prediction
/// depends only on the runs, its spectrum, the seed and its row, as for a single run. The pooled
/// samples are summarised and, with a calibration, mapped as [`crate::evaluate_ensemble`] maps a
/// mixture (about the pooled summary, with the first member's noise level of the spectrum).
fn predict_mixture_batch(
    members: &[&Run],
    spectra: &dyn SpectraRows,
    rows: Range<usize>,
    settings: &PosteriorSettings,
) -> Result<Vec<StarPrediction>> {
    let (k, d) = (members.len(), members[0].model.flow.dim());
    let per_member = (settings.n_samples / k).max(10);
    let row_ids: Vec<usize> = rows.clone().collect();
    let mut pooled = vec![Vec::with_capacity(k * per_member * d); row_ids.len()];
    let mut noise = Vec::new();
    for (m, run) in members.iter().enumerate() {
        let (params, levels) = run.params(spectra, rows.clone())?;
        if m == 0 {
            noise = levels;
        }
        let mut rngs: Vec<ChaCha8Rng> = row_ids
            .iter()
            .map(|&r| member_rng(settings.seed, m, r))
            .collect();
        let smp = run
            .model
            .flow
            .sample_per_item(&params, per_member, &mut rngs)?;
        for (i, pts) in pooled.iter_mut().enumerate() {
            pts.extend_from_slice(smp.item(i));
        }
    }
    let cal = settings.calibration.as_ref().map(Calibration::resolved);
    let scaler = &members[0].state.scaler;
    Ok(pooled
        .iter()
        .zip(&row_ids)
        .zip(&noise)
        .map(|((pts, &row), &level)| {
            let mut s = starflow_flows::summarize_points(pts, d);
            if let Some(c) = &cal {
                let frame = c.marginal_frame(&s, level);
                c.apply(&mut s, &frame, Some(pts));
            }
            StarPrediction::from_summary(row, &s, (&scaler.mean, &scaler.std), level)
        })
        .collect())
}

/// The sampling stream of ensemble member `member` for the star in file row `row`: the first
/// member's is the single run's ([`star_rng`]), the others' are keyed by the seed and the
/// member's place (a golden-ratio step apart, so no two members share a key for any seed).
fn member_rng(seed: u64, member: usize, row: usize) -> ChaCha8Rng {
    star_rng(
        seed.wrapping_add((member as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        row,
    )
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
pub fn predict(
    run_dir: &Path,
    spectra: &Path,
    settings: &PosteriorSettings,
) -> Result<Vec<StarPrediction>> {
    let p = Predictor::open(run_dir, spectra, None, settings.clone())?;
    let mut out = Vec::with_capacity(p.rows().len());
    for batch in p.batches() {
        out.extend(p.predict_batch(batch)?);
    }
    Ok(out)
}
