//! The noise level of a spectrum, measured from the spectrum itself.
//!
//! Real spectra do not always come with a signal-to-noise column (GALAH's labels carry one, a new
//! survey's spectra may not), and a recalibration that widens faint stars' posteriors, or a
//! training-time augmentation that adds noise in proportion to a star's own, needs the level of
//! every spectrum. The estimator is DER_SNR's noise term (Stoehr et al. 2008): for white noise of
//! standard deviation `σ`, `2 x_i − x_{i−2} − x_{i+2}` has standard deviation `√6 σ`, so
//! `σ̂ = 1.482602 / √6 · median |2 x_i − x_{i−2} − x_{i+2}|`. Second differences two pixels apart
//! cancel a smooth continuum and most of a resolved line, and the median ignores the pixels where a
//! line or a camera edge does not cancel.

use candle_core::{DType, Device, Result as CandleResult, Tensor};

/// DER_SNR's noise estimate of one spectrum (its pixels in order); `None` for fewer than 5 pixels
/// or a non-finite one.
pub fn noise_level(x: &[f32]) -> Option<f64> {
    if x.len() < 5 || x.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let mut d: Vec<f64> = x
        .windows(5)
        .map(|w| (2.0 * f64::from(w[2]) - f64::from(w[0]) - f64::from(w[4])).abs())
        .collect();
    let mid = d.len() / 2;
    let (_, m, _) = d.select_nth_unstable_by(mid, f64::total_cmp);
    Some(1.482_602 / 6f64.sqrt() * *m)
}

/// `ln σ̂` ([`noise_level`]) of each spectrum of `x: (b, 1, n_pix)`; `None` where it cannot be
/// measured (non-finite pixels, too short) or is zero.
pub fn log_noise_levels(x: &Tensor) -> CandleResult<Vec<Option<f64>>> {
    let (b, _, n) = x.dims3()?;
    let rows: Vec<f32> = x
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(rows
        .chunks(n.max(1))
        .take(b)
        .map(|row| noise_level(row).filter(|s| *s > 0.0).map(f64::ln))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    /// A continuum with absorption lines plus white noise of `sigma`, in log flux.
    fn spectrum(n: usize, sigma: f64, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let line = |c: f64, w: f64| 0.5 * (-((i as f64 - c) / w).powi(2)).exp();
                let flux = 1.0 - line(200.0, 3.0) - line(700.0, 2.0) - line(1500.0, 4.0);
                let e: f64 = StandardNormal.sample(&mut rng);
                (flux.ln() + sigma * e) as f32
            })
            .collect()
    }

    #[test]
    fn estimate_recovers_white_noise_under_lines() {
        for sigma in [0.004, 0.02, 0.07] {
            let s = noise_level(&spectrum(4096, sigma, 3)).unwrap();
            assert!(
                (s / sigma - 1.0).abs() < 0.05,
                "sigma {sigma}: estimated {s}"
            );
        }
    }

    #[test]
    fn unmeasurable_spectra_have_no_level() {
        assert_eq!(noise_level(&[1.0; 4]), None);
        assert_eq!(noise_level(&[1.0, f32::NAN, 1.0, 1.0, 1.0]), None);
        let rows: Vec<f32> = [1.0, 1.0, f32::INFINITY, 1.0, 1.0]
            .into_iter()
            .chain([1.0; 5])
            .chain(spectrum(5, 0.01, 1))
            .collect();
        let x = Tensor::from_vec(rows, (3, 1, 5), &Device::Cpu).unwrap();
        let levels = log_noise_levels(&x).unwrap();
        // Non-finite: none; constant: zero noise, no log; noisy: a level.
        assert_eq!(&levels[..2], &[None, None]);
        assert!(levels[2].is_some());
    }
}
