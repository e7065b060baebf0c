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
//!   models are measured against: once with the nuisances held fixed at their true values
//!   ([`Model::crlb`], `crlb.npy`) and once with them marginalised ([`Model::crlb_marginal`],
//!   `crlb_marginal.npy`), since an estimator does not know a star's abundance pattern, tilts or
//!   telluric amplitude either.
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

use crate::atomic_file;
use crate::error::{DataError, Result};
use crate::npy::write_npy;
use lines::{Line, LineKind};

/// Version of the generator's model; bump it whenever the output for a given seed changes.
pub const GENERATOR_VERSION: &str = "1.1.0";

/// HERMES camera ranges in Angstrom (blue, green, red, IR).
pub const CAMERAS: [(&str, f64, f64); 4] = [
    ("blue", 4718.0, 4903.0),
    ("green", 5649.0, 5873.0),
    ("red", 6481.0, 6739.0),
    ("IR", 7590.0, 7890.0),
];

const C_KMS: f64 = 299_792.458;
const THETA_SUN: f64 = 5040.0 / 5772.0;
/// Saturated depth of a metal line: `1 - D_MAX_METAL (1 - exp(-tau))`.
const D_MAX_METAL: f64 = 0.88;

/// Standard deviation of the per-species abundance offsets [X/Fe] (dex) that [`draw_star`] draws;
/// also their Gaussian prior in [`Model::crlb_marginal`].
pub const X_FE_SIGMA: f64 = 0.05;
/// Standard deviation of the microturbulence offset `d_xi` (km/s); also its prior in
/// [`Model::crlb_marginal`].
pub const D_XI_SIGMA: f64 = 0.15;
/// Standard deviation of each continuum-tilt offset and slope; also their prior in
/// [`Model::crlb_marginal`].
pub const TILT_SIGMA: f64 = 0.004;

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

/// The most stars one synthetic set holds ([`SynthConfig::validate`]).
pub const MAX_STARS: usize = 2_000_000;

/// The most pixels per camera of a synthetic set (GALAH has 4,096).
pub const MAX_PIXELS_PER_CAMERA: usize = 65_536;

impl SynthConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, p: String| Err(DataError::config(name, p));
        if self.n == 0 {
            return bad("n", "must be at least 1".into());
        }
        // Far beyond any real use (GALAH DR4 has ~917,000 spectra), and refused before a typo
        // allocates terabytes.
        if self.n > MAX_STARS {
            return bad(
                "n",
                format!(
                    "must be at most {MAX_STARS} (got {}); generate in parts with other seeds",
                    self.n
                ),
            );
        }
        if self.pixels_per_camera > MAX_PIXELS_PER_CAMERA {
            return bad(
                "pixels_per_camera",
                format!(
                    "must be at most {MAX_PIXELS_PER_CAMERA} (got {})",
                    self.pixels_per_camera
                ),
            );
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
/// and continuum-normalisation tilts. Held fixed by [`Model::crlb`]; every continuous one that
/// changes the flux is marginalised by [`Model::crlb_marginal`] (see [`nuisance_param_names`]).
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
    let tilt_n = Normal::new(0.0, TILT_SIGMA).expect("constant, valid standard deviation");
    let tilt = [0; 4].map(|_| (tilt_n.sample(rng), tilt_n.sample(rng)));
    let x_fe = (0..lines::N_SPECIES)
        .map(|_| X_FE_SIGMA * n01(rng))
        .collect();
    let d_xi = D_XI_SIGMA * n01(rng);
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

/// Width (Angstrom) of one telluric residual: unresolved, a few pixels wide.
const TELLURIC_WIDTH: f64 = 0.07;

/// The broadening shared by every line of one star.
struct Broadening {
    t: f64,
    d_g: f64,
    /// Microturbulence (km/s).
    xi: f64,
    /// Macroturbulence (km/s).
    v_mac: f64,
}

impl Broadening {
    /// Microturbulence and macroturbulence follow GALAH-like relations in t_eff, log_g.
    fn new(l: &Labels, nu: &Nuisance) -> Self {
        let t = l.t_eff;
        Broadening {
            t,
            d_g: l.log_g - 4.44,
            xi: (1.0 + 3e-4 * (t - 5500.0) - 0.25 * (l.log_g - 4.2) + nu.d_xi).clamp(0.5, 2.5),
            v_mac: (3.5 + 2.5e-3 * (t - 5772.0) + 0.8 * (4.4 - l.log_g).max(0.0)).clamp(1.0, 9.0),
        }
    }
}

/// The shape of one line in one star.
enum Profile {
    /// Line-centre optical depth scale and Gaussian width of a Balmer line ([`Model::balmer`]).
    Balmer {
        tau0: f64,
        sigma: f64,
    },
    Metal(MetalProfile),
}

/// A metal line: residual flux `1 - D_MAX_METAL (1 - exp(-tau0 H(v)))` within `wl +- half`, with
/// `H(v) = exp(-v^2) + coef / (1 + v^2)` and `v = (lambda - wl) inv`.
#[derive(Clone, Copy, Debug)]
struct MetalProfile {
    tau0: f64,
    inv: f64,
    coef: f64,
    half: f64,
}

impl MetalProfile {
    /// The Voigt-like profile `H` at `dl` Angstrom from the line centre.
    fn h(&self, dl: f64) -> f64 {
        let v = dl * self.inv;
        let v2 = v * v;
        let gauss = if v2 < 40.0 { (-v2).exp() } else { 0.0 };
        gauss + self.coef / (v2 + 1.0)
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

    /// The shape of one line in a star with labels `l`, nuisances `nu` and broadening `b`.
    fn profile(&self, line: &Line, l: &Labels, nu: &Nuisance, b: &Broadening) -> Profile {
        let fwhm_to_sigma = 1.0 / (8f64.ln() * 2.0).sqrt();
        let log_tau = line.log_tau_sun + line_strength(line, l, nu);
        let tau0 = 10f64.powf(log_tau);
        let v_th2 = 2.0 * 8.314_462e-3 * b.t / line.mass; // (km/s)^2: 2kT/m with R in kJ/(mol K)
        let bw = (v_th2 + b.xi * b.xi + b.v_mac * b.v_mac).sqrt();
        let sigma_dopp = line.wl * bw / C_KMS / std::f64::consts::SQRT_2;
        let sigma_inst = line.wl / self.resolving_power * fwhm_to_sigma;
        let sigma = (sigma_dopp * sigma_dopp + sigma_inst * sigma_inst).sqrt();
        let inv = 1.0 / (std::f64::consts::SQRT_2 * sigma);
        if line.kind == LineKind::Balmer {
            return Profile::Balmer { tau0, sigma };
        }
        // Pressure (van der Waals) broadening: gas pressure grows with gravity, more for
        // neutral lines than for ionised ones.
        let p_exp = if line.kind == LineKind::Ionised {
            0.2
        } else {
            0.5
        };
        let a = line.damping * 10f64.powf(p_exp * b.d_g) * (sigma_dopp / sigma).max(0.3);
        let coef = a / std::f64::consts::PI.sqrt();
        // Half-width: the Gaussian core, or where the damping wing's optical depth drops to 1e-3.
        let v_wing = (tau0 * coef / 1e-3).sqrt();
        let half = (6.0 * sigma).max((v_wing / inv).min(25.0));
        Profile::Metal(MetalProfile {
            tau0,
            inv,
            coef,
            half,
        })
    }

    /// The noiseless normalised flux of a star with `labels` and `nuisance`, written to `out`.
    pub fn flux(&self, l: &Labels, nu: &Nuisance, out: &mut [f64]) {
        // Overlapping lines multiply their residual fluxes.
        out.iter_mut().for_each(|v| *v = 1.0);
        let b = Broadening::new(l, nu);
        for line in &self.lines {
            match self.profile(line, l, nu, &b) {
                Profile::Balmer { tau0, sigma } => self.balmer(line, tau0, sigma, l, out),
                Profile::Metal(p) => {
                    self.pixel_range(line.wl - p.half, line.wl + p.half, |i0, i1| {
                        for (k, o) in out[i0..i1].iter_mut().enumerate() {
                            let h = p.h(self.wavelength[i0 + k] - line.wl);
                            *o *= 1.0 - D_MAX_METAL * (1.0 - (-p.tau0 * h).exp());
                        }
                    })
                }
            }
        }
        // Non-stellar effects, multiplicative on the flux.
        if nu.telluric > 0.0 {
            let width = TELLURIC_WIDTH;
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
    ///
    /// This is the bound for an estimator that knows every nuisance of the star exactly; see
    /// [`Model::crlb_marginal`] for the one that does not.
    pub fn crlb(
        &self,
        l: &Labels,
        nu: &Nuisance,
        snr: f64,
        scratch: &mut [Vec<f64>; 2],
    ) -> [f64; 3] {
        let n = self.n_pix();
        let mut jac = vec![0.0; 3 * n];
        self.label_jacobian(l, nu, scratch, &mut jac);
        bound3(&label_fisher(&jac, n, snr))
    }

    /// Buffers for [`Model::crlb_marginal`], [`Model::crlb_both`] and [`Model::fisher`]; one per
    /// thread (about 40 columns of `n_pix` f64).
    pub fn crlb_scratch(&self) -> CrlbScratch {
        let n = self.n_pix();
        let mut support = vec![Vec::new(); N_PARAMS];
        for s in &mut support[..3] {
            s.push((0, n));
        }
        CrlbScratch {
            n_pix: n,
            flux: vec![0.0; n],
            pm: [vec![0.0; n], vec![0.0; n]],
            jac: vec![0.0; N_PARAMS * n],
            support,
            metal: Vec::new(),
            fisher: vec![0.0; N_PARAMS * N_PARAMS],
        }
    }

    /// Cramer-Rao lower bound on the standard deviation of (t_eff, log_g, fe_h) in K, dex, dex with
    /// the nuisances marginalised: sqrt of the label block's diagonal of `(F + P)^-1`, where `F` is
    /// the Fisher matrix `snr^2 J^T J` over the three labels and every continuous nuisance that
    /// changes the flux (see [`nuisance_param_names`]) and `P` the prior information
    /// ([`nuisance_prior_precision`]).
    ///
    /// It is the relevant limit for an estimator that sees only the spectrum: the nuisances have
    /// to be inferred from the same pixels, and whatever the labels share with them is lost.
    /// Star by star it is at least [`Model::crlb`] (tested): the label block of the inverse is the
    /// inverse of the Schur complement `F_ll - F_ln (F_nn + P)^-1 F_nl <= F_ll`. Both use the
    /// same t_eff and log_g derivatives; for fe_h this bound uses the exact derivative rather than
    /// the central difference of [`Model::crlb`] (see `exact_fe_h_column`), 1-2 % apart, far
    /// inside the margin (the marginal fe_h bound is several times the fixed one).
    ///
    /// Why a prior on some nuisances: `fe_h` enters the flux only through `fe_h + [alpha/Fe] +
    /// x_fe[species]`, so with every species' offset free `fe_h` is exactly degenerate with them
    /// and its bound would be infinite. What limits `fe_h` is that the offsets scatter by
    /// [`X_FE_SIGMA`] about 0, which an estimator trained on the population knows; the Gaussian
    /// prior information `1/sigma^2` of each nuisance that [`draw_star`] draws from a fixed
    /// zero-mean Gaussian (`x_fe`, `d_xi`, the tilts) is therefore added (a hybrid Cramer-Rao
    /// bound); `a_li` (label-dependent mean), `telluric` and `edge` (bounded, non-Gaussian draws)
    /// get a flat prior. `telluric_pattern` stays fixed: it is the per-line shape of the residuals,
    /// whose amplitude is the marginalised `telluric`.
    ///
    /// Infinite where the labels carry no information (e.g. `snr` 0) or are degenerate.
    pub fn crlb_marginal(
        &self,
        l: &Labels,
        nu: &Nuisance,
        snr: f64,
        scratch: &mut CrlbScratch,
    ) -> [f64; 3] {
        self.crlb_both(l, nu, snr, scratch).marginal
    }

    /// Both bounds of a star from one label Jacobian: [`Model::crlb`] (bit for bit) and
    /// [`Model::crlb_marginal`].
    pub fn crlb_both(
        &self,
        l: &Labels,
        nu: &Nuisance,
        snr: f64,
        scratch: &mut CrlbScratch,
    ) -> Crlb {
        let mut flux = std::mem::take(&mut scratch.flux);
        self.flux(l, nu, &mut flux);
        let out = self.crlb_with_flux(l, nu, snr, &flux, scratch);
        scratch.flux = flux;
        out
    }

    /// The Fisher matrix `snr^2 J^T J` of [`Model::crlb_marginal`] without any prior,
    /// `(3 + N_NUISANCE_PARAMS)^2` row-major: the labels (t_eff, log_g, fe_h) first, then the
    /// nuisances in the order of [`nuisance_param_names`]. [`marginal_bound`] with
    /// [`nuisance_prior_precision`] turns it into the marginal bound.
    pub fn fisher(
        &self,
        l: &Labels,
        nu: &Nuisance,
        snr: f64,
        scratch: &mut CrlbScratch,
    ) -> Vec<f64> {
        self.crlb_both(l, nu, snr, scratch);
        scratch.fisher.clone()
    }

    /// [`Model::crlb_both`] given the star's noiseless flux (which `generate` has computed already).
    fn crlb_with_flux(
        &self,
        l: &Labels,
        nu: &Nuisance,
        snr: f64,
        flux: &[f64],
        s: &mut CrlbScratch,
    ) -> Crlb {
        let n = self.n_pix();
        assert_eq!(s.n_pix, n, "CrlbScratch made for another model");
        self.label_jacobian(l, nu, &mut s.pm, &mut s.jac[..3 * n]);
        let f3 = label_fisher(&s.jac[..3 * n], n, snr);
        let fixed = bound3(&f3);
        self.nuisance_jacobian(l, nu, flux, s);
        exact_fe_h_column(l, n, s);
        let m = N_PARAMS;
        // The (t_eff, log_g) block is the fixed bound's own; the rest (fe_h and the nuisances)
        // from the columns, over the pixels where both can be non-zero.
        for (r, row) in f3.iter().enumerate().take(2) {
            s.fisher[r * m..r * m + 2].copy_from_slice(&row[..2]);
        }
        for r in 2..m {
            for c in 0..=r {
                let (a, b) = (&s.jac[r * n..(r + 1) * n], &s.jac[c * n..(c + 1) * n]);
                let v = dot_on(a, &s.support[r], b, &s.support[c]) * snr * snr;
                s.fisher[r * m + c] = v;
                s.fisher[c * m + r] = v;
            }
        }
        let marginal = marginal_bound(&s.fisher, &nuisance_prior_precision());
        Crlb { fixed, marginal }
    }

    /// Central-difference derivatives of the flux with respect to (t_eff, log_g, fe_h), written
    /// to `jac` (3 columns of `n_pix`). Steps of 10 K, 0.01 dex and 0.01 dex: far below the
    /// labels' uncertainties (the flux is linear over them) and far above rounding.
    fn label_jacobian(
        &self,
        l: &Labels,
        nu: &Nuisance,
        scratch: &mut [Vec<f64>; 2],
        jac: &mut [f64],
    ) {
        let steps = [10.0, 0.01, 0.01];
        let n = self.n_pix();
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
    }

    /// Derivatives of the flux with respect to every nuisance parameter, into the nuisance columns
    /// of `s.jac`, and the pixel ranges outside which each is zero into `s.support`. `flux` is the
    /// star's noiseless flux.
    ///
    /// * `d_xi`: central difference with a step of 0.01 km/s (1 % of a typical microturbulence,
    ///   a fifteenth of its spread [`D_XI_SIGMA`]), like the label steps; it changes every line's
    ///   width, so it costs two full flux evaluations.
    /// * `x_fe` and `a_li`: analytic. They only shift `log10 tau` of their own lines by the same
    ///   amount, and the flux is a product of per-line factors `f = 1 - d (1 - exp(-tau H))`, so
    ///   `dF = F * sum over the lines of d ln f / d log10 tau = -F ln(10) d tau H exp(-tau H) / f`,
    ///   exact and evaluated on those lines' pixels only (two full flux evaluations per species
    ///   otherwise). The line windows, which grow with tau, are held fixed: the model's flux is
    ///   smooth in them up to the 1e-3 optical depth where the windows end.
    /// * `telluric`, `edge`, tilts: analytic, since each multiplies the flux by a known factor `g`:
    ///   `dF = F d ln g`. At `telluric` or `edge` 0 this is the derivative from above (the model
    ///   ignores negative values).
    fn nuisance_jacobian(&self, l: &Labels, nu: &Nuisance, flux: &[f64], s: &mut CrlbScratch) {
        let n = self.n_pix();
        let CrlbScratch {
            pm,
            jac,
            support,
            metal,
            ..
        } = s;
        let mut cols = NuisanceColumns { n, jac, support };
        self.d_xi_column(l, nu, pm, &mut cols);
        self.line_strength_columns(l, nu, flux, metal, &mut cols);
        self.telluric_column(nu, flux, &mut cols);
        self.edge_and_tilt_columns(nu, flux, &mut cols);
    }

    /// Microturbulence: central difference (see [`Model::nuisance_jacobian`]).
    fn d_xi_column(
        &self,
        l: &Labels,
        nu: &Nuisance,
        pm: &mut [Vec<f64>; 2],
        cols: &mut NuisanceColumns,
    ) {
        let (n, jac, support) = (cols.n, &mut *cols.jac, &mut *cols.support);
        let col = |p: usize| (3 + p) * n..(3 + p + 1) * n;
        let h = 0.01;
        let mut shifted = nu.clone();
        shifted.d_xi = nu.d_xi + h;
        self.flux(l, &shifted, &mut pm[0]);
        shifted.d_xi = nu.d_xi - h;
        self.flux(l, &shifted, &mut pm[1]);
        for ((d, a), b) in jac[col(P_D_XI)].iter_mut().zip(&pm[0]).zip(&pm[1]) {
            *d = (a - b) / (2.0 * h);
        }
        set_support(&mut support[3 + P_D_XI], &[(0, n)]);
    }

    /// Abundance offsets and lithium: analytic, on their own lines' pixels.
    fn line_strength_columns(
        &self,
        l: &Labels,
        nu: &Nuisance,
        flux: &[f64],
        metal: &mut Vec<(usize, usize, MetalProfile)>,
        cols: &mut NuisanceColumns,
    ) {
        let (n, jac, support) = (cols.n, &mut *cols.jac, &mut *cols.support);
        let col = |p: usize| (3 + p) * n..(3 + p + 1) * n;
        let b = Broadening::new(l, nu);
        metal.clear();
        for sup in support[3..3 + lines::N_SPECIES].iter_mut() {
            sup.clear();
        }
        support[3 + P_A_LI].clear();
        for (i, line) in self.lines.iter().enumerate() {
            let p = match line.kind {
                LineKind::Balmer => continue,
                LineKind::Lithium => P_A_LI,
                LineKind::Neutral | LineKind::Ionised | LineKind::OxygenTriplet => line.species_idx,
            };
            if let Profile::Metal(prof) = self.profile(line, l, nu, &b) {
                let sup = &mut support[3 + p];
                self.pixel_range(line.wl - prof.half, line.wl + prof.half, |i0, i1| {
                    sup.push((i0, i1))
                });
                metal.push((i, p, prof));
            }
        }
        let line_params = (0..lines::N_SPECIES).chain([P_A_LI]);
        for p in line_params.clone() {
            merge_ranges(&mut support[3 + p]);
            let c = &mut jac[col(p)];
            for &(i0, i1) in &support[3 + p] {
                c[i0..i1].fill(0.0);
            }
        }
        for &(i, p, prof) in metal.iter() {
            let line = &self.lines[i];
            let c = &mut jac[col(p)];
            self.pixel_range(line.wl - prof.half, line.wl + prof.half, |i0, i1| {
                for (k, d) in c.iter_mut().enumerate().take(i1).skip(i0) {
                    let x = prof.tau0 * prof.h(self.wavelength[k] - line.wl);
                    let e = (-x).exp();
                    let f = 1.0 - D_MAX_METAL * (1.0 - e);
                    *d -= D_MAX_METAL * std::f64::consts::LN_10 * x * e / f;
                }
            });
        }
        for p in line_params {
            let c = &mut jac[col(p)];
            for &(i0, i1) in &support[3 + p] {
                for (d, f) in c[i0..i1].iter_mut().zip(&flux[i0..i1]) {
                    *d *= f;
                }
            }
        }
    }

    /// Telluric amplitude: the flux carries prod_k (1 + telluric a_k g_k).
    fn telluric_column(&self, nu: &Nuisance, flux: &[f64], cols: &mut NuisanceColumns) {
        let (n, jac, support) = (cols.n, &mut *cols.jac, &mut *cols.support);
        let col = |p: usize| (3 + p) * n..(3 + p + 1) * n;
        let sup = &mut support[3 + P_TELLURIC];
        sup.clear();
        if nu.telluric >= 0.0 {
            let width = TELLURIC_WIDTH;
            for &wl in &self.telluric {
                self.pixel_range(wl - 5.0 * width, wl + 5.0 * width, |i0, i1| {
                    sup.push((i0, i1))
                });
            }
            merge_ranges(sup);
            let c = &mut jac[col(P_TELLURIC)];
            for &(i0, i1) in sup.iter() {
                c[i0..i1].fill(0.0);
            }
            for (k, &wl) in self.telluric.iter().enumerate() {
                let a = 0.6
                    * nu.telluric_pattern.get(k).copied().unwrap_or(0.0)
                    * (1.0 - (wl - 7594.0) / 150.0);
                self.pixel_range(wl - 5.0 * width, wl + 5.0 * width, |i0, i1| {
                    for (j, d) in c.iter_mut().enumerate().take(i1).skip(i0) {
                        let x = (self.wavelength[j] - wl) / width;
                        let g = a * (-0.5 * x * x).exp();
                        *d += g / (1.0 + nu.telluric * g);
                    }
                });
            }
            for &(i0, i1) in sup.iter() {
                for (d, f) in c[i0..i1].iter_mut().zip(&flux[i0..i1]) {
                    *d *= f;
                }
            }
        }
    }

    /// Edge upturn (the last m pixels carry (1 + edge x^2)) and continuum tilts (camera c carries
    /// (1 + offset + slope x)).
    fn edge_and_tilt_columns(&self, nu: &Nuisance, flux: &[f64], cols: &mut NuisanceColumns) {
        let (n, jac, support) = (cols.n, &mut *cols.jac, &mut *cols.support);
        let col = |p: usize| (3 + p) * n..(3 + p + 1) * n;
        // Edge upturn: the last m pixels carry (1 + edge x^2).
        let pc = self.pixels_per_camera;
        let sup = &mut support[3 + P_EDGE];
        sup.clear();
        if nu.edge >= 0.0 {
            let m = (pc / 100).max(4);
            sup.push((n - m, n));
            let c = &mut jac[col(P_EDGE)];
            for k in 0..m {
                let x = (k + 1) as f64 / m as f64;
                let i = n - m + k;
                c[i] = flux[i] * x * x / (1.0 + nu.edge * x * x);
            }
        }

        // Continuum tilts: camera c carries (1 + offset + slope x).
        for (cam, &(off, slope)) in nu.tilt.iter().enumerate() {
            let (i0, i1) = (cam * pc, (cam + 1) * pc);
            for (q, deriv_of_slope) in [(0, false), (1, true)] {
                let p = P_TILT + 2 * cam + q;
                set_support(&mut support[3 + p], &[(i0, i1)]);
                let c = &mut jac[col(p)];
                for k in 0..pc {
                    let x = 2.0 * k as f64 / (pc - 1) as f64 - 1.0;
                    let g = flux[i0 + k] / (1.0 + off + slope * x);
                    c[i0 + k] = if deriv_of_slope { g * x } else { g };
                }
            }
        }
    }
}

/// The nuisance columns of a star's Jacobian being filled: `jac` (columns of `n` pixels, labels
/// first) and, per column, the pixel ranges outside which it is zero.
struct NuisanceColumns<'a> {
    n: usize,
    jac: &'a mut [f64],
    support: &'a mut [Vec<(usize, usize)>],
}

/// Number of nuisance parameters that [`Model::crlb_marginal`] marginalises: an abundance offset
/// per species, `d_xi`, `a_li`, `telluric`, `edge` and (offset, slope) of each camera's tilt.
pub const N_NUISANCE_PARAMS: usize = lines::N_SPECIES + 12;
/// All Fisher-matrix parameters: the three labels, then the nuisances.
const N_PARAMS: usize = 3 + N_NUISANCE_PARAMS;
const P_D_XI: usize = lines::N_SPECIES;
const P_A_LI: usize = P_D_XI + 1;
const P_TELLURIC: usize = P_D_XI + 2;
const P_EDGE: usize = P_D_XI + 3;
const P_TILT: usize = P_D_XI + 4;

/// Names of the nuisance parameters in the order of [`Model::fisher`] and
/// [`nuisance_prior_precision`]: `x_fe[<species>]` for each species of the line table, `d_xi`,
/// `a_li`, `telluric`, `edge`, then `tilt_offset[<camera>]`, `tilt_slope[<camera>]` per camera.
pub fn nuisance_param_names() -> Vec<String> {
    let mut names: Vec<String> = (0..lines::N_SPECIES)
        .map(|i| format!("x_fe[{}]", lines::species_name(i)))
        .collect();
    names.extend(["d_xi", "a_li", "telluric", "edge"].map(String::from));
    for (cam, ..) in CAMERAS {
        names.push(format!("tilt_offset[{cam}]"));
        names.push(format!("tilt_slope[{cam}]"));
    }
    names
}

/// The prior information `1/sigma^2` on each nuisance parameter that [`Model::crlb_marginal`]
/// adds to the Fisher matrix: [`X_FE_SIGMA`], [`D_XI_SIGMA`] and [`TILT_SIGMA`], the spreads
/// [`draw_star`] draws them with; 0 (a flat prior) for `a_li`, `telluric` and `edge`.
pub fn nuisance_prior_precision() -> [f64; N_NUISANCE_PARAMS] {
    let mut p = [0.0; N_NUISANCE_PARAMS];
    p[..lines::N_SPECIES].fill(1.0 / (X_FE_SIGMA * X_FE_SIGMA));
    p[P_D_XI] = 1.0 / (D_XI_SIGMA * D_XI_SIGMA);
    p[P_TILT..].fill(1.0 / (TILT_SIGMA * TILT_SIGMA));
    p
}

/// Both Cramer-Rao bounds of one star, standard deviations of (t_eff, log_g, fe_h) in K, dex, dex.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Crlb {
    /// Nuisances held fixed at their true values ([`Model::crlb`]).
    pub fixed: [f64; 3],
    /// Nuisances marginalised ([`Model::crlb_marginal`]); never below `fixed`.
    pub marginal: [f64; 3],
}

/// Buffers for the marginal Cramer-Rao bound of one star; make one per thread with
/// [`Model::crlb_scratch`].
#[derive(Clone, Debug)]
pub struct CrlbScratch {
    n_pix: usize,
    flux: Vec<f64>,
    pm: [Vec<f64>; 2],
    /// `N_PARAMS` columns of `n_pix`: d flux / d parameter, labels first.
    jac: Vec<f64>,
    /// Per column, sorted disjoint pixel ranges outside which it is zero; only these are read.
    support: Vec<Vec<(usize, usize)>>,
    /// The current star's metal lines: (index into the line list, nuisance parameter, shape).
    metal: Vec<(usize, usize, MetalProfile)>,
    /// `N_PARAMS^2` Fisher matrix of the last star.
    fisher: Vec<f64>,
}

/// Replaces the central-difference fe_h column of `s.jac` by the exact derivative
/// `sum over species of (1 + d[alpha/Fe]/dfe_h) dF/dx_fe[species]`, built from the abundance
/// columns: fe_h changes the flux only through `fe_h + [alpha/Fe](fe_h) + x_fe[species]`.
///
/// Why: the central difference also sees the jumps where a line's window (which ends where its
/// wing's optical depth falls to 1e-3) gains or loses a pixel, about 1-2 % of the column's norm.
/// Held against the abundance offsets that direction is the only part of fe_h that they cannot
/// absorb, so it would pass for information on fe_h and make the marginal fe_h bound 1-6 % too
/// small. t_eff and log_g keep their central differences: their windows jump too, but no
/// nuisance mimics them, and the effect on their marginal bounds is below 0.2 %.
fn exact_fe_h_column(l: &Labels, n: usize, s: &mut CrlbScratch) {
    // [alpha/Fe] = clamp(-0.3 fe_h, 0, 0.3): see `line_strength`.
    let alpha_slope = if l.fe_h < 0.0 && l.fe_h > -1.0 {
        -0.3
    } else {
        0.0
    };
    let (labels, nuisances) = s.jac.split_at_mut(3 * n);
    let fe = &mut labels[2 * n..3 * n];
    fe.fill(0.0);
    for sp in 0..lines::N_SPECIES {
        let w = if lines::species_is_alpha(sp) {
            1.0 + alpha_slope
        } else {
            1.0
        };
        let c = &nuisances[sp * n..(sp + 1) * n];
        for &(i0, i1) in &s.support[3 + sp] {
            for (d, v) in fe[i0..i1].iter_mut().zip(&c[i0..i1]) {
                *d += w * v;
            }
        }
    }
}

/// The label block of the fixed-nuisance Fisher matrix from the label Jacobian.
fn label_fisher(jac: &[f64], n: usize, snr: f64) -> [[f64; 3]; 3] {
    let mut f = [[0.0; 3]; 3];
    for r in 0..3 {
        for c in r..3 {
            let s: f64 = (0..n).map(|k| jac[r * n + k] * jac[c * n + k]).sum::<f64>() * snr * snr;
            f[r][c] = s;
            f[c][r] = s;
        }
    }
    f
}

/// sqrt(diag(F^-1)) of a 3x3 Fisher matrix; infinite when it is singular.
fn bound3(f: &[[f64; 3]; 3]) -> [f64; 3] {
    match invert3(f) {
        Some(inv) => [0, 1, 2].map(|i| inv[i][i].max(0.0).sqrt()),
        None => [f64::INFINITY; 3],
    }
}

/// Sum of `a[k] b[k]` over the pixels in both supports (sorted, disjoint ranges outside which the
/// columns are zero).
fn dot_on(a: &[f64], ra: &[(usize, usize)], b: &[f64], rb: &[(usize, usize)]) -> f64 {
    let (mut i, mut j, mut s) = (0, 0, 0.0);
    while i < ra.len() && j < rb.len() {
        let lo = ra[i].0.max(rb[j].0);
        let hi = ra[i].1.min(rb[j].1);
        if lo < hi {
            s += a[lo..hi]
                .iter()
                .zip(&b[lo..hi])
                .map(|(x, y)| x * y)
                .sum::<f64>();
        }
        if ra[i].1 <= rb[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    s
}

fn set_support(sup: &mut Vec<(usize, usize)>, ranges: &[(usize, usize)]) {
    sup.clear();
    sup.extend_from_slice(ranges);
}

/// Sorts pixel ranges and merges the overlapping or touching ones.
fn merge_ranges(r: &mut Vec<(usize, usize)>) {
    r.sort_unstable();
    let mut kept = 0;
    for i in 0..r.len() {
        if kept > 0 && r[i].0 <= r[kept - 1].1 {
            r[kept - 1].1 = r[kept - 1].1.max(r[i].1);
        } else {
            r[kept] = r[i];
            kept += 1;
        }
    }
    r.truncate(kept);
}

/// Squared pivot, relative to the diagonal, below which a parameter counts as a linear combination
/// of the ones eliminated before it: rounding in a ~40-parameter Cholesky is ~1e-14, and a real
/// correlation this close to 1 (1 - 5e-11) is indistinguishable from degeneracy at the accuracy
/// of central differences.
const PIVOT_TOL: f64 = 1e-10;

/// The marginal Cramer-Rao bound from a Fisher matrix: sqrt of the label block's diagonal of
/// `(F + diag(0, 0, 0, prior))^-1`.
///
/// `fisher` is `(3 + K)^2` row-major and symmetric, the labels first; `prior` (K) the prior
/// information added to each nuisance's diagonal (0: flat). Robust to what a real star produces:
/// * a nuisance whose Fisher diagonal is 0 (a species with no lines in range, a clamped
///   microturbulence, no telluric pattern) has zero covariance with everything and is dropped;
/// * the matrix is scaled to unit diagonal and factorised by Cholesky in f64 with the nuisances
///   first and the labels last, so that the labels' trailing 3x3 factor `L` is the Cholesky
///   factor of their Schur complement and the label block of the inverse is `L^-T L^-1`;
/// * a nuisance whose pivot vanishes is a combination of earlier nuisances: dropping it leaves
///   their span, and so the labels' bound, unchanged;
/// * infinite for all three labels when a label has no information, an entry is not finite, or a
///   label's pivot vanishes (a label degenerate with the nuisances or the other labels), as
///   [`Model::crlb`] is for a singular matrix.
pub fn marginal_bound(fisher: &[f64], prior: &[f64]) -> [f64; 3] {
    let m = 3 + prior.len();
    assert_eq!(fisher.len(), m * m, "fisher must be (3 + prior.len())^2");
    let none = [f64::INFINITY; 3];
    let diag = |i: usize| fisher[i * m + i] + if i >= 3 { prior[i - 3] } else { 0.0 };
    if (0..3).any(|i| fisher[i * m + i].is_nan() || fisher[i * m + i] <= 0.0) {
        return none;
    }
    let mut order: Vec<usize> = (3..m).filter(|&i| fisher[i * m + i] != 0.0).collect();
    order.extend(0..3);
    let p = order.len();
    let scale: Vec<f64> = order.iter().map(|&i| 1.0 / diag(i).sqrt()).collect();
    // Lower triangle of the scaled matrix, factorised in place.
    let mut a = vec![0.0; p * p];
    for r in 0..p {
        for c in 0..=r {
            let (i, j) = (order[r], order[c]);
            let v = if i == j { diag(i) } else { fisher[i * m + j] };
            a[r * p + c] = v * scale[r] * scale[c];
        }
    }
    if a.iter().any(|v| !v.is_finite()) {
        return none;
    }
    for c in 0..p {
        let pivot = a[c * p + c] - (0..c).map(|k| a[c * p + k] * a[c * p + k]).sum::<f64>();
        if pivot.is_nan() || pivot <= PIVOT_TOL {
            if c >= p - 3 {
                return none;
            }
            for r in c..p {
                a[r * p + c] = 0.0;
            }
            continue;
        }
        let d = pivot.sqrt();
        a[c * p + c] = d;
        for r in c + 1..p {
            let s = a[r * p + c] - (0..c).map(|k| a[r * p + k] * a[c * p + k]).sum::<f64>();
            a[r * p + c] = s / d;
        }
    }
    // The trailing factor L = [[a, 0, 0], [b, c, 0], [d, e, f]] has the inverse
    // [[1/a, 0, 0], [-b/(ac), 1/c, 0], [(be - cd)/(acf), -e/(cf), 1/f]], and the diagonal of
    // L^-T L^-1 is the column sums of its squares.
    let o = p - 3;
    let l = |r: usize, c: usize| a[(o + r) * p + o + c];
    let (la, lb, lc, ld, le, lf) = (l(0, 0), l(1, 0), l(1, 1), l(2, 0), l(2, 1), l(2, 2));
    let var = [
        (1.0 / la).powi(2)
            + (lb / (la * lc)).powi(2)
            + ((lb * le - lc * ld) / (la * lc * lf)).powi(2),
        (1.0 / lc).powi(2) + (le / (lc * lf)).powi(2),
        (1.0 / lf).powi(2),
    ];
    [0, 1, 2].map(|i| {
        let sd = var[i].sqrt() * scale[o + i];
        if sd.is_finite() {
            sd
        } else {
            f64::INFINITY
        }
    })
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
    /// (n, 3): CRLB of t_eff (K), log_g (dex), fe_h (dex), nuisances fixed ([`Model::crlb`]).
    pub crlb: Vec<f64>,
    /// (n, 3): the same with the nuisances marginalised ([`Model::crlb_marginal`]); every entry is
    /// at least the one in `crlb`.
    pub crlb_marginal: Vec<f64>,
}

/// The per-star random stream: star `i` always gets the same numbers whatever the thread count
/// (public so that tools can redraw a set's stars with [`draw_star`]).
pub fn star_rng(seed: u64, i: usize) -> ChaCha8Rng {
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
    let mut crlb_marginal = vec![0f64; cfg.n * 3];
    spectra
        .par_chunks_mut(n_pix)
        .zip(labels.par_chunks_mut(8))
        .zip(crlb.par_chunks_mut(3))
        .zip(crlb_marginal.par_chunks_mut(3))
        .enumerate()
        .for_each_init(
            || (vec![0.0; n_pix], model.crlb_scratch()),
            |(flux, scratch), (i, (((spec, lab), bound), marginal))| {
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
                let b = model.crlb_with_flux(l, &star.nuisance, star.snr, flux, scratch);
                bound.copy_from_slice(&b.fixed);
                marginal.copy_from_slice(&b.marginal);
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
        crlb_marginal,
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
    files: &'static [&'static str],
    label_columns: [&'static str; 8],
}

/// The files [`SynthData::write`] writes.
pub const SYNTH_FILES: [&str; 6] = [
    "spectra.npy",
    "labels.npy",
    "wavelength.npy",
    "crlb.npy",
    "crlb_marginal.npy",
    "synth.json",
];

/// What a directory already holds where [`SynthData::write`] would write.
#[derive(Clone, Debug, PartialEq)]
pub enum Occupied {
    /// None of [`SYNTH_FILES`].
    Free,
    /// A set this generator wrote with exactly these settings: writing again gives the same bytes.
    SameSet,
    /// Files that writing would replace (names), and whether the generator wrote them (with other
    /// settings) or not (real data, say).
    Other { files: Vec<String>, generated: bool },
}

/// Whether writing `cfg`'s set into `dir` would replace anything that is not the same set.
pub fn occupied(dir: &Path, cfg: &SynthConfig) -> Occupied {
    let files: Vec<String> = SYNTH_FILES
        .iter()
        .filter(|f| dir.join(f).exists())
        .map(|f| f.to_string())
        .collect();
    if files.is_empty() {
        return Occupied::Free;
    }
    let record = std::fs::read_to_string(dir.join("synth.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(|v| v["generator"] == "starflow-synth");
    let same = record.as_ref().is_some_and(|v| {
        v["generator_version"] == GENERATOR_VERSION
            && serde_json::from_value::<SynthConfig>(v["config"].clone())
                .ok()
                .as_ref()
                == Some(cfg)
            && files.len() == SYNTH_FILES.len()
    });
    if same {
        Occupied::SameSet
    } else {
        Occupied::Other {
            files,
            generated: record.is_some(),
        }
    }
}

impl SynthData {
    /// Writes `spectra.npy` (f32), `labels.npy` (f64), `wavelength.npy`, `crlb.npy`,
    /// `crlb_marginal.npy` and `synth.json` into `dir`, each atomically.
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
        write_npy(dir.join("crlb_marginal.npy"), &[n, 3], &self.crlb_marginal)?;
        let record = SynthRecord {
            generator: "starflow-synth",
            generator_version: GENERATOR_VERSION,
            crate_version: env!("CARGO_PKG_VERSION"),
            config: &self.config,
            cameras: CAMERAS.to_vec(),
            n_lines: Model::new(&self.config).lines.len(),
            // The data files, without synth.json itself.
            files: &SYNTH_FILES[..5],
            label_columns: crate::dataset::GALAH_COLUMNS,
        };
        let json = serde_json::to_string_pretty(&record).map_err(|e| DataError::Io {
            path: dir.join("synth.json"),
            source: std::io::Error::other(e),
        })?;
        atomic_file::write(&dir.join("synth.json"), json.as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The analytic nuisance derivatives (and their supports) agree with central differences of
    /// the full flux.
    #[test]
    fn nuisance_derivatives_match_central_differences() {
        let cfg = SynthConfig {
            pixels_per_camera: 1024,
            ..SynthConfig::default()
        };
        let model = Model::new(&cfg);
        let n = model.n_pix();
        for seed in [3, 4] {
            let star = draw_star(&mut star_rng(seed, 0), &cfg);
            let mut s = model.crlb_scratch();
            model.crlb_both(&star.labels, &star.nuisance, star.snr, &mut s);
            let (mut plus, mut minus) = (vec![0.0; n], vec![0.0; n]);
            let shifted = |p: usize, h: f64| {
                let mut nu = star.nuisance.clone();
                match p {
                    _ if p < lines::N_SPECIES => nu.x_fe[p] += h,
                    P_D_XI => nu.d_xi += h,
                    P_A_LI => nu.a_li += h,
                    P_TELLURIC => nu.telluric += h,
                    P_EDGE => nu.edge += h,
                    _ => {
                        let q = p - P_TILT;
                        let t = &mut nu.tilt[q / 2];
                        if q.is_multiple_of(2) {
                            t.0 += h
                        } else {
                            t.1 += h
                        }
                    }
                }
                nu
            };
            for (p, name) in nuisance_param_names().iter().enumerate() {
                let h = if p == P_D_XI { 0.01 } else { 1e-5 };
                model.flux(&star.labels, &shifted(p, h), &mut plus);
                model.flux(&star.labels, &shifted(p, -h), &mut minus);
                // The analytic column, zero outside its support.
                let mut analytic = vec![0.0; n];
                for &(i0, i1) in &s.support[3 + p] {
                    analytic[i0..i1].copy_from_slice(&s.jac[(3 + p) * n + i0..(3 + p) * n + i1]);
                }
                let (mut err, mut norm) = (0.0f64, 0.0f64);
                for k in 0..n {
                    let num = (plus[k] - minus[k]) / (2.0 * h);
                    err += (analytic[k] - num).powi(2);
                    norm += num * num;
                }
                let rel = (err / norm.max(1e-300)).sqrt();
                if norm == 0.0 {
                    assert!(analytic.iter().all(|&v| v == 0.0), "{name}");
                } else {
                    assert!(rel < 1e-6, "{name}: relative error {rel:e}");
                }
            }
        }
    }
}
