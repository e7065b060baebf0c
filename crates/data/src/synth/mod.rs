//! The GALAH-like synthetic generator: the embedded default data of starflow.
//!
//! The real GALAH DR4 subset cannot be downloaded here, so the generator produces files that are
//! interchangeable with it (same names, shapes, dtypes, column order, camera layout) and whose
//! spectra respond to the labels the way real spectra do, so that accuracy and calibration
//! measured on them mean something:
//!
//! * four HERMES cameras of 4096 linearly sampled pixels each, resolving power ~28,000;
//! * labels from a GALAH-like population: mostly dwarfs plus a tail of cooler giants, with mass,
//!   age, luminosity, distance and SNR derived consistently from them;
//! * continuum-normalised flux from a line list (see [`lines`]) where each line's optical depth
//!   follows Saha-Boltzmann-like label sensitivities, depths saturate along a curve of growth
//!   (`depth = d_max (1 - exp(-tau * H(a, v)))`, Voigt-like profile), Balmer wings grow with
//!   t_eff, ionised lines strengthen at low gravity and pressure-broadened wings at high gravity;
//! * non-stellar nuisances: telluric O2 residuals at the start of the IR camera, the edge upturn
//!   of the last pixels, small continuum-normalisation tilts, and Gaussian noise of
//!   sigma = 1/SNR per pixel;
//! * for every star the Cramer-Rao lower bound on the standard deviation of (t_eff, log_g, fe_h)
//!   from the noiseless model's label derivatives and the pixel noise, the physical limit that
//!   models are measured against.
//!
//! It is a simplified spectrum model, not radiative transfer: instrumental and Doppler broadening
//! are combined into one Gaussian width before saturation, and weak lines are not at real
//! wavelengths. Every random choice comes from `seed` through one ChaCha8 stream per star, so the
//! output is the same byte for byte for any thread count.

pub mod lines;

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::npy::{atomic_write, write_npy};
use lines::{Line, LineKind};

/// Version of the generator's model; bump it whenever the output for a given seed changes.
pub const GENERATOR_VERSION: &str = "1.0.0";

/// HERMES camera ranges in Angstrom (blue, green, red, IR).
pub const CAMERAS: [(&str, f64, f64); 4] = [
    ("blue", 4718.0, 4903.0),
    ("green", 5649.0, 5873.0),
    ("red", 6481.0, 6739.0),
    ("IR", 7590.0, 7890.0),
];

const C_KMS: f64 = 299_792.458;
const THETA_SUN: f64 = 5040.0 / 5772.0;

/// Every setting of the generator; written to `synth.json` next to the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthConfig {
    /// Number of stars.
    pub n: usize,
    pub seed: u64,
    /// Pixels per camera (4096 in GALAH; smaller only for quick tests).
    pub pixels_per_camera: usize,
    /// Resolving power lambda / FWHM.
    pub resolving_power: f64,
    /// Fraction of giants in the population.
    pub giant_fraction: f64,
    /// SNR range per pixel.
    pub snr_min: f64,
    pub snr_max: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            n: 8914,
            seed: 42,
            pixels_per_camera: 4096,
            resolving_power: 28_000.0,
            giant_fraction: 0.18,
            snr_min: 15.0,
            snr_max: 250.0,
        }
    }
}

impl SynthConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, p: String| Err(DataError::config(name, p));
        if self.n == 0 {
            return bad("n", "must be at least 1".into());
        }
        if self.pixels_per_camera < 16 {
            return bad(
                "pixels_per_camera",
                format!("must be at least 16 (got {})", self.pixels_per_camera),
            );
        }
        if self.resolving_power.is_nan() || self.resolving_power <= 1000.0 {
            return bad(
                "resolving_power",
                format!("must exceed 1000 (got {})", self.resolving_power),
            );
        }
        if !(0.0..=1.0).contains(&self.giant_fraction) {
            return bad(
                "giant_fraction",
                format!("must be within 0..1 (got {})", self.giant_fraction),
            );
        }
        if !(self.snr_min > 0.0 && self.snr_max >= self.snr_min) {
            return bad(
                "snr_min/snr_max",
                format!(
                    "need 0 < snr_min <= snr_max (got {} and {})",
                    self.snr_min, self.snr_max
                ),
            );
        }
        Ok(())
    }

    /// Total pixels per spectrum.
    pub fn n_pix(&self) -> usize {
        4 * self.pixels_per_camera
    }
}

/// The wavelength of every pixel: four cameras, each linear in wavelength.
pub fn wavelength_grid(pixels_per_camera: usize) -> Vec<f64> {
    let n = pixels_per_camera;
    CAMERAS
        .iter()
        .flat_map(|&(_, a, b)| (0..n).map(move |k| a + (b - a) * k as f64 / (n - 1) as f64))
        .collect()
}

/// The three labels the spectrum is modelled from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Labels {
    pub t_eff: f64,
    pub log_g: f64,
    pub fe_h: f64,
}

/// A star: all eight GALAH columns plus the non-stellar nuisances of its observation.
#[derive(Clone, Debug, PartialEq)]
pub struct Star {
    pub labels: Labels,
    pub mass: f64,
    pub age: f64,
    pub l_bol: f64,
    pub dist: f64,
    pub snr: f64,
    pub nuisance: Nuisance,
}

/// What changes a spectrum without being a label: lithium, telluric residuals, the edge upturn
/// and continuum-normalisation tilts. Held fixed when taking label derivatives for the CRLB.
#[derive(Clone, Debug, PartialEq)]
pub struct Nuisance {
    /// Lithium abundance A(Li).
    pub a_li: f64,
    /// Amplitude of the telluric residuals (0 = perfectly corrected).
    pub telluric: f64,
    /// Per-line sign and scale of the telluric residuals.
    pub telluric_pattern: Vec<f64>,
    /// Height of the edge upturn in the last pixels (GALAH's last pixels sit at ~1.2-1.3).
    pub edge: f64,
    /// Continuum tilt per camera: (offset, slope).
    pub tilt: [(f64, f64); 4],
    /// Per-species abundance offsets [X/Fe] (dex), indexed like the species table in [`lines`]: real
    /// stars do not scale every element with fe_h exactly.
    pub x_fe: Vec<f64>,
    /// Microturbulence offset from the t_eff/log_g relation (km/s).
    pub d_xi: f64,
}

impl Nuisance {
    /// No telluric residuals, no edge, no tilt, lithium depleted: for physics tests.
    pub fn quiet() -> Self {
        Nuisance {
            a_li: 1.0,
            telluric: 0.0,
            telluric_pattern: Vec::new(),
            edge: 0.0,
            tilt: [(0.0, 0.0); 4],
            x_fe: vec![0.0; lines::N_SPECIES],
            d_xi: 0.0,
        }
    }
}

/// Positions of the telluric O2 A-band residuals: a fixed set between 7594 and 7700 A, dense at the
/// band head.
fn telluric_lines() -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(0x007e_110c);
    (0..48)
        .map(|_| {
            let u: f64 = rng.random();
            7594.0 + 106.0 * u * u
        })
        .collect()
}

/// Draws a star from the GALAH-like population.
pub fn draw_star(rng: &mut ChaCha8Rng, cfg: &SynthConfig) -> Star {
    let n01 = |rng: &mut ChaCha8Rng| -> f64 { StandardNormal.sample(rng) };
    let giant = rng.random::<f64>() < cfg.giant_fraction;
    let fe_h = loop {
        let v = -0.2 + 0.29 * n01(rng);
        if (-1.3..=0.4).contains(&v) {
            break v;
        }
    };
    let (t_eff, log_g, mass, age) = if giant {
        let log_g = loop {
            let v = 2.6 + 0.5 * n01(rng);
            if (1.3..=3.5).contains(&v) {
                break v;
            }
        };
        // The red giant branch: cooler at lower gravity, and cooler when metal-rich.
        let t =
            (4350.0 + 330.0 * (log_g - 1.3) - 250.0 * fe_h + 90.0 * n01(rng)).clamp(4100.0, 5300.0);
        let mass: f64 = rng.random_range(0.9..2.2);
        let age = (10.0 * mass.powf(-2.5) * rng.random_range(1.05..1.25)).clamp(0.3, 13.5);
        (t, log_g, mass, age)
    } else {
        let t = loop {
            let v = 5650.0 + 400.0 * n01(rng);
            if (4500.0..=6600.0).contains(&v) {
                break v;
            }
        };
        // The main sequence: cooler dwarfs have higher gravity; evolution lowers it towards the
        // turn-off, mostly for the warmer (more massive) stars.
        let zams = 4.72 - 0.30 * (t - 4500.0) / 2100.0;
        let evolved = rng.random::<f64>().powi(2) * (0.15 + 0.45 * ((t - 4500.0) / 2100.0));
        let log_g = (zams - evolved + 0.04 * n01(rng)).clamp(3.8, 4.7);
        let mass = ((t / 5772.0).powf(1.0 / 0.6) * 10f64.powf(0.1 * fe_h)).clamp(0.6, 1.8);
        let tau_ms = 10.0 * mass.powf(-2.5);
        let age = (tau_ms * rng.random_range(0.05..1.0)).clamp(0.1, 13.5);
        (t, log_g, mass, age)
    };
    // Radius from mass and gravity, luminosity from radius and temperature (solar units).
    let radius = (mass * 10f64.powf(4.438 - log_g)).sqrt();
    let l_bol = radius * radius * (t_eff / 5772.0).powi(4);
    // A magnitude-limited survey: apparent V of 9-14; SNR falls with magnitude.
    let v_mag = rng.random_range(9.0..14.0);
    let abs_mag = 4.74 - 2.5 * l_bol.log10();
    let dist = 10f64.powf((v_mag - abs_mag + 5.0) / 5.0);
    let snr = (cfg.snr_max * 10f64.powf(-0.2 * (v_mag - 9.0)) * (0.25 * n01(rng)).exp())
        .clamp(cfg.snr_min, cfg.snr_max);
    // Lithium: preserved in warm or young dwarfs, depleted in cool dwarfs and diluted in giants.
    let a_li = if giant {
        0.8 + 0.4 * n01(rng)
    } else {
        let cool = ((6000.0 - t_eff) / 1000.0).clamp(0.0, 1.5);
        3.1 - 1.6 * cool - 0.5 * (age / 0.5).log10().max(0.0) + 0.3 * n01(rng)
    };
    let telluric = rng.random::<f64>().powi(2);
    let telluric_pattern = (0..48)
        .map(|_| {
            let sign = if rng.random::<f64>() < 0.7 { 1.0 } else { -0.5 };
            sign * rng.random::<f64>()
        })
        .collect();
    let edge = rng.random_range(0.18..0.32);
    let tilt_n = Normal::new(0.0, 0.004).expect("constant, valid standard deviation");
    let tilt = [0; 4].map(|_| (tilt_n.sample(rng), tilt_n.sample(rng)));
    let x_fe = (0..lines::N_SPECIES).map(|_| 0.05 * n01(rng)).collect();
    let d_xi = 0.15 * n01(rng);
    // The real labels file holds float32-rounded values in float64; so do we.
    let r32 = |v: f64| v as f32 as f64;
    Star {
        labels: Labels {
            t_eff: r32(t_eff),
            log_g: r32(log_g),
            fe_h: r32(fe_h),
        },
        mass: r32(mass),
        age: r32(age),
        l_bol: r32(l_bol),
        dist: r32(dist),
        snr: r32(snr),
        nuisance: Nuisance {
            a_li,
            telluric,
            telluric_pattern,
            edge,
            tilt,
            x_fe,
            d_xi,
        },
    }
}

/// Everything the spectrum model needs that does not change from star to star.
pub struct Model {
    pub wavelength: Vec<f64>,
    pub lines: Vec<Line>,
    pixels_per_camera: usize,
    resolving_power: f64,
    telluric: Vec<f64>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("n_pix", &self.wavelength.len())
            .field("n_lines", &self.lines.len())
            .finish()
    }
}

/// Log-optical depth offset and damping of one line for a star, relative to the Sun.
fn line_strength(line: &Line, l: &Labels, nu: &Nuisance) -> f64 {
    let d_theta = 5040.0 / l.t_eff - THETA_SUN;
    let d_g = l.log_g - 4.44;
    // Alpha elements are enhanced in metal-poor stars, as in the Galactic disc.
    let alpha_fe = if line.alpha {
        (-0.3 * l.fe_h).clamp(0.0, 0.3)
    } else {
        0.0
    };
    let x_h = l.fe_h + alpha_fe + nu.x_fe.get(line.species_idx).copied().unwrap_or(0.0);
    match line.kind {
        LineKind::Neutral => x_h + 0.35 * (line.chi_ion - line.chi_exc) * d_theta + 0.05 * d_g,
        LineKind::Ionised => x_h - 0.35 * line.chi_exc * d_theta - 0.33 * d_g,
        LineKind::Balmer => -0.5 * 10.2 * d_theta + 0.1 * d_g,
        LineKind::OxygenTriplet => x_h - 0.5 * line.chi_exc * d_theta - 0.25 * d_g,
        LineKind::Lithium => (nu.a_li - 2.0) + 0.6 * line.chi_ion * d_theta,
    }
}

impl Model {
    /// Builds the grid and line list for a configuration.
    pub fn new(cfg: &SynthConfig) -> Self {
        let cams: Vec<(f64, f64)> = CAMERAS.iter().map(|&(_, a, b)| (a, b)).collect();
        Model {
            wavelength: wavelength_grid(cfg.pixels_per_camera),
            lines: lines::line_list(&cams),
            pixels_per_camera: cfg.pixels_per_camera,
            resolving_power: cfg.resolving_power,
            telluric: telluric_lines(),
        }
    }

    /// Number of pixels.
    pub fn n_pix(&self) -> usize {
        self.wavelength.len()
    }

    /// Pixel range `[lo, hi)` of wavelengths within `[a, b]`, per camera (linear grids).
    fn pixel_range(&self, a: f64, b: f64, mut f: impl FnMut(usize, usize)) {
        let n = self.pixels_per_camera;
        for (c, &(_, lo, hi)) in CAMERAS.iter().enumerate() {
            if b < lo || a > hi {
                continue;
            }
            let step = (hi - lo) / (n - 1) as f64;
            let i0 = (((a - lo) / step).ceil().max(0.0)) as usize;
            let i1 = ((((b - lo) / step).floor() + 1.0).min(n as f64)) as usize;
            if i1 > i0 {
                f(c * n + i0, c * n + i1);
            }
        }
    }

    /// The noiseless normalised flux of a star with `labels` and `nuisance`, written to `out`.
    pub fn flux(&self, l: &Labels, nu: &Nuisance, out: &mut [f64]) {
        // Overlapping lines multiply their residual fluxes.
        out.iter_mut().for_each(|v| *v = 1.0);
        let t = l.t_eff;
        let d_g = l.log_g - 4.44;
        // Microturbulence and macroturbulence (km/s) follow GALAH-like relations in t_eff, log_g.
        let xi = (1.0 + 3e-4 * (t - 5500.0) - 0.25 * (l.log_g - 4.2) + nu.d_xi).clamp(0.5, 2.5);
        let v_mac = (3.5 + 2.5e-3 * (t - 5772.0) + 0.8 * (4.4 - l.log_g).max(0.0)).clamp(1.0, 9.0);
        let fwhm_to_sigma = 1.0 / (8f64.ln() * 2.0).sqrt();
        for line in &self.lines {
            let log_tau = line.log_tau_sun + line_strength(line, l, nu);
            let tau0 = 10f64.powf(log_tau);
            let v_th2 = 2.0 * 8.314_462e-3 * t / line.mass; // (km/s)^2: 2kT/m with R in kJ/(mol K)
            let b = (v_th2 + xi * xi + v_mac * v_mac).sqrt();
            let sigma_dopp = line.wl * b / C_KMS / std::f64::consts::SQRT_2;
            let sigma_inst = line.wl / self.resolving_power * fwhm_to_sigma;
            let sigma = (sigma_dopp * sigma_dopp + sigma_inst * sigma_inst).sqrt();
            let inv = 1.0 / (std::f64::consts::SQRT_2 * sigma);
            if line.kind == LineKind::Balmer {
                self.balmer(line, tau0, sigma, l, out);
                continue;
            }
            // Pressure (van der Waals) broadening: gas pressure grows with gravity, more for
            // neutral lines than for ionised ones.
            let p_exp = if line.kind == LineKind::Ionised {
                0.2
            } else {
                0.5
            };
            let a = line.damping * 10f64.powf(p_exp * d_g) * (sigma_dopp / sigma).max(0.3);
            let d_max = 0.88;
            let coef = a / std::f64::consts::PI.sqrt();
            // Half-width: the Gaussian core, or where the damping wing's optical depth drops to 1e-3.
            let v_wing = (tau0 * coef / 1e-3).sqrt();
            let half = (6.0 * sigma).max((v_wing / inv).min(25.0));
            self.pixel_range(line.wl - half, line.wl + half, |i0, i1| {
                for (k, o) in out[i0..i1].iter_mut().enumerate() {
                    let v = (self.wavelength[i0 + k] - line.wl) * inv;
                    let v2 = v * v;
                    let gauss = if v2 < 40.0 { (-v2).exp() } else { 0.0 };
                    let h = gauss + coef / (v2 + 1.0);
                    *o *= 1.0 - d_max * (1.0 - (-tau0 * h).exp());
                }
            });
        }
        // Non-stellar effects, multiplicative on the flux.
        if nu.telluric > 0.0 {
            let width = 0.07; // Angstrom: unresolved telluric residuals, a few pixels wide
            for (k, &wl) in self.telluric.iter().enumerate() {
                let amp = 0.6
                    * nu.telluric
                    * nu.telluric_pattern.get(k).copied().unwrap_or(0.0)
                    * (1.0 - (wl - 7594.0) / 150.0);
                self.pixel_range(wl - 5.0 * width, wl + 5.0 * width, |i0, i1| {
                    for (j, o) in out[i0..i1].iter_mut().enumerate() {
                        let x = (self.wavelength[i0 + j] - wl) / width;
                        *o *= 1.0 + amp * (-0.5 * x * x).exp();
                    }
                });
            }
        }
        let n = self.pixels_per_camera;
        for (c, &(off, slope)) in nu.tilt.iter().enumerate() {
            for k in 0..n {
                let x = 2.0 * k as f64 / (n - 1) as f64 - 1.0;
                out[c * n + k] *= 1.0 + off + slope * x;
            }
        }
        if nu.edge > 0.0 {
            let m = (n / 100).max(4);
            let total = out.len();
            for k in 0..m {
                let x = (k + 1) as f64 / m as f64;
                out[total - m + k] *= 1.0 + nu.edge * x * x;
            }
        }
        for v in out.iter_mut() {
            *v = v.max(0.0);
        }
    }

    /// A Balmer line: a saturated Doppler core plus Stark wings ~ |dl|^-2.5 whose strength grows
    /// steeply with t_eff (n = 2 population) and mildly with gravity.
    fn balmer(&self, line: &Line, tau_scale: f64, sigma: f64, l: &Labels, out: &mut [f64]) {
        let is_alpha = line.wl > 6000.0;
        let (wing0, w, core) = if is_alpha {
            (3.0, 1.0, 30.0)
        } else {
            (1.6, 0.8, 15.0)
        };
        let wing = wing0 * tau_scale;
        let w = w * (1.0 + 0.1 * (l.log_g - 4.44));
        let inv = 1.0 / (std::f64::consts::SQRT_2 * sigma * 1.8);
        let d_max = 0.80;
        let half = 30.0;
        self.pixel_range(line.wl - half, line.wl + half, |i0, i1| {
            for (k, o) in out[i0..i1].iter_mut().enumerate() {
                let dl = self.wavelength[i0 + k] - line.wl;
                let v = dl * inv;
                let q = 1.0 + (dl / w) * (dl / w);
                // Stark wings fall as |dl|^-2.5: q^-1.25 with q = 1 + (dl/w)^2.
                let tau = core * tau_scale.sqrt() * (-v * v).exp() + wing / (q * q.sqrt().sqrt());
                *o *= 1.0 - d_max * (1.0 - (-tau).exp());
            }
        });
    }

    /// Cramer-Rao lower bound on the standard deviation of (t_eff, log_g, fe_h) in K, dex, dex:
    /// sqrt(diag(F^-1)) with Fisher matrix F = J^T J * snr^2, J the central-difference label
    /// derivatives of the noiseless flux, nuisances held fixed.
    pub fn crlb(
        &self,
        l: &Labels,
        nu: &Nuisance,
        snr: f64,
        scratch: &mut [Vec<f64>; 2],
    ) -> [f64; 3] {
        let steps = [10.0, 0.01, 0.01];
        let n = self.n_pix();
        let mut jac = vec![0.0; 3 * n];
        for (j, h) in steps.iter().enumerate() {
            let mut plus = *l;
            let mut minus = *l;
            match j {
                0 => {
                    plus.t_eff += h;
                    minus.t_eff -= h
                }
                1 => {
                    plus.log_g += h;
                    minus.log_g -= h
                }
                _ => {
                    plus.fe_h += h;
                    minus.fe_h -= h
                }
            }
            let [a, b] = scratch;
            self.flux(&plus, nu, a);
            self.flux(&minus, nu, b);
            for k in 0..n {
                jac[j * n + k] = (a[k] - b[k]) / (2.0 * h);
            }
        }
        let mut f = [[0.0; 3]; 3];
        for r in 0..3 {
            for c in r..3 {
                let s: f64 =
                    (0..n).map(|k| jac[r * n + k] * jac[c * n + k]).sum::<f64>() * snr * snr;
                f[r][c] = s;
                f[c][r] = s;
            }
        }
        match invert3(&f) {
            Some(inv) => [0, 1, 2].map(|i| inv[i][i].max(0.0).sqrt()),
            None => [f64::INFINITY; 3],
        }
    }
}

/// Inverse of a symmetric 3x3 matrix by cofactors; `None` when singular.
fn invert3(m: &[[f64; 3]; 3]) -> Option<[[f64; 3]; 3]> {
    let c =
        |r0: usize, r1: usize, c0: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    let cof = [
        [c(1, 2, 1, 2), -c(1, 2, 0, 2), c(1, 2, 0, 1)],
        [-c(0, 2, 1, 2), c(0, 2, 0, 2), -c(0, 2, 0, 1)],
        [c(0, 1, 1, 2), -c(0, 1, 0, 2), c(0, 1, 0, 1)],
    ];
    let det = m[0][0] * cof[0][0] + m[0][1] * cof[0][1] + m[0][2] * cof[0][2];
    if det == 0.0 || !det.is_finite() {
        return None;
    }
    let mut inv = [[0.0; 3]; 3];
    for r in 0..3 {
        for cc in 0..3 {
            inv[r][cc] = cof[cc][r] / det;
        }
    }
    Some(inv)
}

/// A generated data set, laid out like the GALAH files.
#[derive(Clone, Debug)]
pub struct SynthData {
    pub config: SynthConfig,
    pub n_pix: usize,
    pub wavelength: Vec<f64>,
    /// (n, n_pix) row-major.
    pub spectra: Vec<f32>,
    /// (n, 8) in GALAH column order.
    pub labels: Vec<f64>,
    /// (n, 3): CRLB of t_eff (K), log_g (dex), fe_h (dex).
    pub crlb: Vec<f64>,
}

/// The per-star random stream: star `i` always gets the same numbers whatever the thread count.
fn star_rng(seed: u64, i: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(i as u64);
    rng
}

/// Generates a data set; `progress` is called with the number of stars finished since its last call.
pub fn generate(cfg: &SynthConfig, progress: &(dyn Fn(u64) + Sync)) -> Result<SynthData> {
    cfg.validate()?;
    let model = Model::new(cfg);
    let n_pix = model.n_pix();
    let mut spectra = vec![0f32; cfg.n * n_pix];
    let mut labels = vec![0f64; cfg.n * 8];
    let mut crlb = vec![0f64; cfg.n * 3];
    spectra
        .par_chunks_mut(n_pix)
        .zip(labels.par_chunks_mut(8))
        .zip(crlb.par_chunks_mut(3))
        .enumerate()
        .for_each_init(
            || (vec![0.0; n_pix], [vec![0.0; n_pix], vec![0.0; n_pix]]),
            |(flux, scratch), (i, ((spec, lab), bound))| {
                let mut rng = star_rng(cfg.seed, i);
                let star = draw_star(&mut rng, cfg);
                model.flux(&star.labels, &star.nuisance, flux);
                let sigma = 1.0 / star.snr;
                for (s, f) in spec.iter_mut().zip(flux.iter()) {
                    let e: f64 = StandardNormal.sample(&mut rng);
                    *s = (f + sigma * e) as f32;
                }
                let l = &star.labels;
                lab.copy_from_slice(&[
                    star.mass, star.age, star.l_bol, star.dist, l.t_eff, l.log_g, l.fe_h, star.snr,
                ]);
                bound.copy_from_slice(&model.crlb(l, &star.nuisance, star.snr, scratch));
                progress(1);
            },
        );
    Ok(SynthData {
        config: cfg.clone(),
        n_pix,
        wavelength: model.wavelength,
        spectra,
        labels,
        crlb,
    })
}

/// The record written to `synth.json`.
#[derive(Serialize)]
struct SynthRecord<'a> {
    generator: &'static str,
    generator_version: &'static str,
    crate_version: &'static str,
    config: &'a SynthConfig,
    cameras: Vec<(&'static str, f64, f64)>,
    n_lines: usize,
    files: [&'static str; 4],
    label_columns: [&'static str; 8],
}

impl SynthData {
    /// Writes `spectra.npy` (f32), `labels.npy` (f64), `wavelength.npy`, `crlb.npy` and
    /// `synth.json` into `dir`, each atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let n = self.config.n;
        write_npy(dir.join("spectra.npy"), &[n, self.n_pix], &self.spectra)?;
        write_npy(dir.join("labels.npy"), &[n, 8], &self.labels)?;
        write_npy(dir.join("wavelength.npy"), &[self.n_pix], &self.wavelength)?;
        write_npy(dir.join("crlb.npy"), &[n, 3], &self.crlb)?;
        let record = SynthRecord {
            generator: "starflow-synth",
            generator_version: GENERATOR_VERSION,
            crate_version: env!("CARGO_PKG_VERSION"),
            config: &self.config,
            cameras: CAMERAS.to_vec(),
            n_lines: Model::new(&self.config).lines.len(),
            files: ["spectra.npy", "labels.npy", "wavelength.npy", "crlb.npy"],
            label_columns: crate::dataset::GALAH_COLUMNS,
        };
        let json = serde_json::to_string_pretty(&record).map_err(|e| DataError::Io {
            path: dir.join("synth.json"),
            source: std::io::Error::other(e),
        })?;
        atomic_write(&dir.join("synth.json"), json.as_bytes())
    }
}

/// Equivalent width (Angstrom) of the absorption in `[center - half, center + half]`.
pub fn equivalent_width(wavelength: &[f64], flux: &[f64], center: f64, half: f64) -> f64 {
    let mut ew = 0.0;
    for k in 1..wavelength.len() {
        let (w0, w1) = (wavelength[k - 1], wavelength[k]);
        if w0 >= center - half && w1 <= center + half && w1 > w0 {
            ew += 0.5 * ((1.0 - flux[k - 1]) + (1.0 - flux[k])) * (w1 - w0);
        }
    }
    ew
}
