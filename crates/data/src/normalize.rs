//! Preprocessing: the flux transform and label z-scoring.
//!
//! Both are value types that serialise, because a trained run must apply exactly the same
//! transforms to new spectra and turn its z-scored predictions back into K and dex.

use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::error::{DataError, Result};

/// `ln(max(flux, floor))` per pixel: the reference preprocessing. The floor keeps saturated line
/// cores and zero pixels away from `ln(0)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FluxTransform {
    pub floor: f32,
}

impl Default for FluxTransform {
    fn default() -> Self {
        FluxTransform { floor: 0.2 }
    }
}

impl FluxTransform {
    /// Checks that the floor is a positive finite number.
    pub fn new(floor: f32) -> Result<Self> {
        if !(floor.is_finite() && floor > 0.0) {
            return Err(DataError::config(
                "flux_floor",
                format!("must be a positive number (got {floor}); the reference uses 0.2"),
            ));
        }
        Ok(FluxTransform { floor })
    }

    /// Transforms `flux` in place.
    pub fn apply(&self, flux: &mut [f32]) {
        for v in flux {
            *v = v.max(self.floor).ln();
        }
    }
}

/// Per-label mean and standard deviation (ddof = 0), fitted on the training split only so that no
/// information leaks from validation or test stars into training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelScaler {
    pub names: Vec<String>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl LabelScaler {
    /// Fits the scaler on the targets of the given stars.
    pub fn fit(ds: &Dataset, indices: &[usize]) -> Result<Self> {
        let names = ds.target_names();
        let d = names.len();
        if indices.is_empty() {
            return Err(DataError::config("split", "the training split is empty"));
        }
        let mut mean = vec![0.0; d];
        for &i in indices {
            for (m, v) in mean.iter_mut().zip(ds.targets(i)) {
                *m += v;
            }
        }
        let n = indices.len() as f64;
        mean.iter_mut().for_each(|m| *m /= n);
        let mut var = vec![0.0; d];
        for &i in indices {
            for ((s, v), m) in var.iter_mut().zip(ds.targets(i)).zip(&mean) {
                *s += (v - m) * (v - m);
            }
        }
        let std: Vec<f64> = var.iter().map(|v| (v / n).sqrt()).collect();
        for (name, s) in names.iter().zip(&std) {
            if !s.is_finite() || *s <= 0.0 {
                return Err(DataError::config(
                    "split",
                    format!("label '{name}' is constant within the training split; use a larger data set or another seed"),
                ));
            }
        }
        Ok(LabelScaler { names, mean, std })
    }

    /// Physical units to z-scores, in place.
    pub fn to_z(&self, values: &mut [f64]) {
        for (k, v) in values.iter_mut().enumerate() {
            let j = k % self.mean.len();
            *v = (*v - self.mean[j]) / self.std[j];
        }
    }

    /// z-scores to physical units, in place.
    pub fn to_physical(&self, values: &mut [f64]) {
        for (k, v) in values.iter_mut().enumerate() {
            let j = k % self.mean.len();
            *v = *v * self.std[j] + self.mean[j];
        }
    }
}
