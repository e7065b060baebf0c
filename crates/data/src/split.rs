//! Seeded train/validation/test splits, seeded per-epoch shuffling and batching into tensors.
//!
//! Every order here is a pure function of a seed (and the epoch), independent of thread count, so
//! that a resumed run sees exactly the batches an uninterrupted run would have seen.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::normalize::{FluxTransform, LabelScaler};

/// Fractions of the data set in each split; they must sum to 1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitFractions {
    pub train: f64,
    pub val: f64,
    pub test: f64,
}

impl Default for SplitFractions {
    /// The reference's 70/15/15.
    fn default() -> Self {
        SplitFractions {
            train: 0.70,
            val: 0.15,
            test: 0.15,
        }
    }
}

impl SplitFractions {
    /// Checks ranges and that the fractions sum to 1 (within 1e-6).
    pub fn validate(&self) -> Result<()> {
        for (name, f) in [
            ("train", self.train),
            ("val", self.val),
            ("test", self.test),
        ] {
            if !(f.is_finite() && (0.0..=1.0).contains(&f)) {
                return Err(DataError::config(
                    format!("split.{name}"),
                    format!("must be between 0 and 1 (got {f})"),
                ));
            }
        }
        if self.train <= 0.0 {
            return Err(DataError::config("split.train", "must be greater than 0"));
        }
        let sum = self.train + self.val + self.test;
        if (sum - 1.0).abs() > 1e-6 {
            return Err(DataError::config(
                "split",
                format!(
                    "fractions must sum to 1 (train {} + val {} + test {} = {sum})",
                    self.train, self.val, self.test
                ),
            ));
        }
        Ok(())
    }
}

/// Indices (into a [`Dataset`]) of each split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

impl Split {
    /// Shuffles `0..n` with `seed` and cuts it into train, validation and test. Train and
    /// validation sizes are rounded down and test takes the rest, which gives the reference's
    /// 6239 / 1337 / 1338 for 8,914 stars.
    pub fn new(n: usize, fractions: SplitFractions, seed: u64) -> Result<Self> {
        fractions.validate()?;
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let n_train = (n as f64 * fractions.train).floor() as usize;
        let n_val = ((n as f64 * fractions.val).floor() as usize).min(n - n_train);
        if n_train == 0 {
            return Err(DataError::config(
                "split.train",
                format!(
                    "{n} stars with a train fraction of {} leaves no training star",
                    fractions.train
                ),
            ));
        }
        let test = idx.split_off(n_train + n_val);
        let val = idx.split_off(n_train);
        Ok(Split {
            train: idx,
            val,
            test,
        })
    }
}

/// The order in which `indices` are visited in `epoch`: a shuffle seeded by `(seed, epoch)`, so
/// that any epoch's order can be recomputed on resume without replaying earlier epochs.
pub fn epoch_order(indices: &[usize], seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut order = indices.to_vec();
    order.shuffle(&mut rng);
    order
}

/// One batch: preprocessed spectra `x` of shape `(b, 1, n_pix)` in f32 on the batcher's device,
/// z-scored targets `y` of shape `(b, n_targets)` in f64 on the host (the flows compute in f64 on
/// the host whatever the backbone's device), and the dataset indices of its stars.
#[derive(Debug)]
pub struct Batch {
    pub x: Tensor,
    pub y: Tensor,
    pub indices: Vec<usize>,
}

/// Turns dataset rows into tensors with the run's preprocessing.
#[derive(Clone, Debug)]
pub struct Batcher<'a> {
    pub dataset: &'a Dataset,
    pub flux: FluxTransform,
    pub scaler: &'a LabelScaler,
    pub device: Device,
}

impl Batcher<'_> {
    /// Builds the batch of the given stars (any count ≥ 1, so the last partial batch works).
    pub fn batch(&self, indices: &[usize]) -> Result<Batch> {
        self.batch_with(indices, |_, _| {})
    }

    /// [`Batcher::batch`], with `raw(i, flux)` applied to star `i`'s flux as read, before the
    /// preprocessing (e.g. training-time noise augmentation). Runs in parallel over the stars.
    pub fn batch_with(
        &self,
        indices: &[usize],
        raw: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Result<Batch> {
        let n_pix = self.dataset.n_pix();
        let b = indices.len();
        let mut x = vec![0f32; b * n_pix];
        x.par_chunks_mut(n_pix)
            .zip(indices.par_iter())
            .for_each(|(row, &i)| {
                self.dataset.flux_into(i, row);
                raw(i, row);
                self.flux.apply(row);
            });
        let mut y: Vec<f64> = indices
            .iter()
            .flat_map(|&i| self.dataset.targets(i))
            .collect();
        self.scaler.to_z(&mut y);
        let d = self.scaler.mean.len();
        Ok(Batch {
            x: Tensor::from_vec(x, (b, 1, n_pix), &self.device)?,
            y: Tensor::from_vec(y, (b, d), &Device::Cpu)?,
            indices: indices.to_vec(),
        })
    }

    /// Iterates over `order` in batches of `batch_size`; the last batch holds the remainder.
    pub fn batches<'b>(
        &'b self,
        order: &'b [usize],
        batch_size: usize,
    ) -> Result<impl Iterator<Item = Result<Batch>> + 'b> {
        if batch_size == 0 {
            return Err(DataError::config("batch_size", "must be at least 1"));
        }
        Ok(order.chunks(batch_size).map(move |c| self.batch(c)))
    }
}
