//! The synthetic generator's line list.
//!
//! About a hundred diagnostic lines sit at their laboratory wavelengths (Balmer lines, K I, the O I
//! triplet, Li I, Ca I, Ba II, Sc II, Ti I/II, Fe I/II, Na I, Al I, Si I, Ni I ...), each with a
//! species class that decides how it reacts to t_eff, log_g and fe_h. Several hundred weaker lines
//! are added from a fixed seed (the same for every star and every run) with a realistic species mix
//! and a density that falls from the blue to the IR camera; their positions are not real line
//! positions, but their statistics and label sensitivities are.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How a line's strength depends on the stellar labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    /// A neutral metal line of a mostly ionised element: Saha and Boltzmann factors make it
    /// stronger in cooler stars; nearly insensitive to gravity.
    Neutral,
    /// A line of the majority ionised species: weaker at high gravity (continuum opacity grows
    /// with electron pressure), so stronger in giants.
    Ionised,
    /// A Balmer line: its lower level sits 10.2 eV up, so the Stark-broadened wings grow steeply
    /// with t_eff.
    Balmer,
    /// The high-excitation O I triplet: stronger at higher t_eff and lower gravity (non-LTE).
    OxygenTriplet,
    /// Li I 6708: its strength follows the star's lithium abundance (young or warm dwarfs).
    Lithium,
}

/// One absorption line.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    /// Air wavelength, Angstrom.
    pub wl: f64,
    pub species: &'static str,
    pub kind: LineKind,
    /// Lower-level excitation potential, eV.
    pub chi_exc: f64,
    /// Ionisation potential of the neutral atom, eV (used by neutral lines).
    pub chi_ion: f64,
    /// Atomic mass, amu (thermal broadening).
    pub mass: f64,
    /// log10 of the line-centre optical depth in a solar-like dwarf at solar metallicity.
    pub log_tau_sun: f64,
    /// Damping parameter (Lorentzian over Doppler width) in the Sun; pressure broadening scales it.
    pub damping: f64,
    /// True for alpha elements (O, Mg, Si, Ca, Ti), enhanced in metal-poor stars.
    pub alpha: bool,
    /// Index of the element in the species table (for per-star abundance offsets).
    pub species_idx: usize,
}

/// Number of species in the table.
pub const N_SPECIES: usize = SPECIES.len();

struct Species {
    name: &'static str,
    kind: LineKind,
    chi_ion: f64,
    mass: f64,
    alpha: bool,
}

const SPECIES: &[Species] = &[
    Species {
        name: "H I",
        kind: LineKind::Balmer,
        chi_ion: 13.6,
        mass: 1.0,
        alpha: false,
    },
    Species {
        name: "Li I",
        kind: LineKind::Lithium,
        chi_ion: 5.39,
        mass: 7.0,
        alpha: false,
    },
    Species {
        name: "O I",
        kind: LineKind::OxygenTriplet,
        chi_ion: 13.6,
        mass: 16.0,
        alpha: true,
    },
    Species {
        name: "Na I",
        kind: LineKind::Neutral,
        chi_ion: 5.14,
        mass: 23.0,
        alpha: false,
    },
    Species {
        name: "Mg I",
        kind: LineKind::Neutral,
        chi_ion: 7.65,
        mass: 24.3,
        alpha: true,
    },
    Species {
        name: "Al I",
        kind: LineKind::Neutral,
        chi_ion: 5.99,
        mass: 27.0,
        alpha: false,
    },
    Species {
        name: "Si I",
        kind: LineKind::Neutral,
        chi_ion: 8.15,
        mass: 28.1,
        alpha: true,
    },
    Species {
        name: "K I",
        kind: LineKind::Neutral,
        chi_ion: 4.34,
        mass: 39.1,
        alpha: false,
    },
    Species {
        name: "Ca I",
        kind: LineKind::Neutral,
        chi_ion: 6.11,
        mass: 40.1,
        alpha: true,
    },
    Species {
        name: "Sc II",
        kind: LineKind::Ionised,
        chi_ion: 6.56,
        mass: 45.0,
        alpha: false,
    },
    Species {
        name: "Ti I",
        kind: LineKind::Neutral,
        chi_ion: 6.83,
        mass: 47.9,
        alpha: true,
    },
    Species {
        name: "Ti II",
        kind: LineKind::Ionised,
        chi_ion: 6.83,
        mass: 47.9,
        alpha: true,
    },
    Species {
        name: "Cr I",
        kind: LineKind::Neutral,
        chi_ion: 6.77,
        mass: 52.0,
        alpha: false,
    },
    Species {
        name: "Cr II",
        kind: LineKind::Ionised,
        chi_ion: 6.77,
        mass: 52.0,
        alpha: false,
    },
    Species {
        name: "Fe I",
        kind: LineKind::Neutral,
        chi_ion: 7.90,
        mass: 55.8,
        alpha: false,
    },
    Species {
        name: "Fe II",
        kind: LineKind::Ionised,
        chi_ion: 7.90,
        mass: 55.8,
        alpha: false,
    },
    Species {
        name: "Ni I",
        kind: LineKind::Neutral,
        chi_ion: 7.64,
        mass: 58.7,
        alpha: false,
    },
    Species {
        name: "Cu I",
        kind: LineKind::Neutral,
        chi_ion: 7.73,
        mass: 63.5,
        alpha: false,
    },
    Species {
        name: "Zn I",
        kind: LineKind::Neutral,
        chi_ion: 9.39,
        mass: 65.4,
        alpha: false,
    },
    Species {
        name: "Rb I",
        kind: LineKind::Neutral,
        chi_ion: 4.18,
        mass: 85.5,
        alpha: false,
    },
    Species {
        name: "Ba II",
        kind: LineKind::Ionised,
        chi_ion: 5.21,
        mass: 137.3,
        alpha: false,
    },
];

/// Index of a species in the table; every name used in this file is in it (tested).
fn species_index(name: &str) -> usize {
    SPECIES.iter().position(|s| s.name == name).unwrap_or(14)
}

/// Name of the species with index `idx` in the table (as in [`Line::species`]).
pub fn species_name(idx: usize) -> &'static str {
    SPECIES[idx].name
}

/// Whether the species with index `idx` is an alpha element (as in [`Line::alpha`]).
pub fn species_is_alpha(idx: usize) -> bool {
    SPECIES[idx].alpha
}

fn species(name: &str) -> &'static Species {
    &SPECIES[species_index(name)]
}

/// (wavelength, species, excitation eV, log tau in the Sun, solar damping)
type Named = (f64, &'static str, f64, f64, f64);

/// Diagnostic lines at their laboratory wavelengths (Angstrom, air).
const NAMED: &[Named] = &[
    // Blue camera 4718-4903
    (4718.43, "Cr I", 3.20, 0.3, 0.03),
    (4722.15, "Zn I", 4.03, 0.6, 0.04),
    (4731.45, "Fe II", 2.89, 0.2, 0.02),
    (4733.59, "Fe I", 1.48, 0.4, 0.03),
    (4736.77, "Fe I", 3.21, 0.9, 0.04),
    (4737.64, "Cr I", 3.09, 0.2, 0.03),
    (4742.79, "Ti I", 2.24, 0.0, 0.03),
    (4758.12, "Ti I", 2.25, 0.2, 0.03),
    (4759.27, "Ti I", 2.26, 0.2, 0.03),
    (4778.26, "Ti I", 2.24, -0.3, 0.03),
    (4779.98, "Ti II", 2.05, 0.3, 0.02),
    (4786.81, "Fe I", 3.02, 0.3, 0.03),
    (4789.65, "Fe I", 3.55, 0.3, 0.03),
    (4798.53, "Ti II", 1.08, 0.4, 0.02),
    (4801.03, "Cr I", 3.12, 0.1, 0.03),
    (4805.09, "Ti II", 2.06, 0.6, 0.02),
    (4810.53, "Zn I", 4.08, 0.7, 0.04),
    (4848.25, "Cr II", 3.86, 0.1, 0.02),
    (4861.33, "H I", 10.2, 0.0, 0.0),
    (4865.61, "Ti II", 1.12, 0.1, 0.02),
    (4871.32, "Fe I", 2.87, 1.4, 0.06),
    (4872.14, "Fe I", 2.88, 1.2, 0.06),
    (4874.01, "Ti II", 3.10, 0.1, 0.02),
    (4885.08, "Ti I", 1.89, 0.2, 0.03),
    (4890.76, "Fe I", 2.88, 1.4, 0.06),
    (4891.49, "Fe I", 2.85, 1.5, 0.06),
    (4893.82, "Fe II", 2.83, 0.2, 0.02),
    // Green camera 5649-5873
    (5657.88, "Sc II", 1.51, 0.6, 0.02),
    (5658.82, "Fe I", 3.40, 0.5, 0.04),
    (5662.52, "Fe I", 4.18, 0.5, 0.04),
    (5665.55, "Si I", 4.92, 0.2, 0.04),
    (5669.04, "Sc II", 1.50, 0.2, 0.02),
    (5682.63, "Na I", 2.10, 0.7, 0.08),
    (5684.20, "Sc II", 1.51, 0.3, 0.02),
    (5688.20, "Na I", 2.10, 0.9, 0.08),
    (5690.43, "Si I", 4.93, 0.1, 0.04),
    (5701.54, "Fe I", 2.56, 0.5, 0.04),
    (5708.40, "Si I", 4.95, 0.4, 0.04),
    (5709.38, "Fe I", 3.37, 0.8, 0.05),
    (5711.09, "Mg I", 4.35, 0.9, 0.06),
    (5763.00, "Fe I", 4.21, 0.5, 0.04),
    (5772.15, "Si I", 5.08, 0.2, 0.04),
    (5775.08, "Fe I", 4.22, 0.3, 0.04),
    (5782.13, "Cu I", 1.64, 0.3, 0.03),
    (5805.22, "Ni I", 4.17, -0.2, 0.03),
    (5846.99, "Ni I", 1.68, -0.5, 0.03),
    (5853.67, "Ba II", 0.60, 0.9, 0.03),
    (5857.45, "Ca I", 2.93, 0.8, 0.06),
    (5859.59, "Fe I", 4.55, 0.3, 0.04),
    (5862.36, "Fe I", 4.55, 0.4, 0.04),
    (5867.56, "Ca I", 2.93, -0.2, 0.05),
    // Red camera 6481-6739
    (6482.80, "Ni I", 1.93, -0.1, 0.03),
    (6493.78, "Ca I", 2.52, 0.9, 0.08),
    (6494.98, "Fe I", 2.40, 1.2, 0.08),
    (6496.90, "Ba II", 0.60, 1.0, 0.03),
    (6499.65, "Ca I", 2.52, 0.6, 0.08),
    (6508.85, "Ca I", 2.53, -0.6, 0.06),
    (6516.08, "Fe II", 2.89, 0.3, 0.02),
    (6554.22, "Ti I", 1.44, -0.3, 0.03),
    (6556.06, "Ti I", 1.46, -0.4, 0.03),
    (6562.80, "H I", 10.2, 0.0, 0.0),
    (6586.31, "Ni I", 1.95, 0.0, 0.03),
    (6592.91, "Fe I", 2.73, 0.8, 0.06),
    (6593.87, "Fe I", 2.43, 0.6, 0.06),
    (6599.11, "Ti I", 0.90, -0.5, 0.03),
    (6604.60, "Sc II", 1.36, 0.0, 0.02),
    (6606.95, "Ti II", 2.06, -0.6, 0.02),
    (6609.11, "Fe I", 2.56, 0.3, 0.05),
    (6643.63, "Ni I", 1.68, 0.4, 0.04),
    (6677.99, "Fe I", 2.69, 1.0, 0.06),
    (6696.02, "Al I", 3.143, 0.0, 0.05),
    (6698.67, "Al I", 3.143, -0.3, 0.05),
    (6705.10, "Fe I", 4.61, -0.1, 0.04),
    (6707.80, "Li I", 0.00, 0.0, 0.01),
    (6710.32, "Fe I", 1.49, -0.6, 0.03),
    (6717.68, "Ca I", 2.71, 0.9, 0.10),
    (6721.85, "Si I", 5.86, -0.2, 0.04),
    (6725.36, "Fe I", 4.10, -0.3, 0.03),
    (6726.67, "Fe I", 4.61, 0.0, 0.04),
    (6733.15, "Fe I", 4.64, -0.3, 0.04),
    // IR camera 7590-7890
    (7664.90, "K I", 0.00, 2.6, 0.20),
    (7691.55, "Mg I", 5.75, 0.5, 0.06),
    (7698.96, "K I", 0.00, 2.3, 0.20),
    (7748.27, "Fe I", 2.95, 0.4, 0.04),
    (7771.94, "O I", 9.15, 0.3, 0.02),
    (7774.17, "O I", 9.15, 0.2, 0.02),
    (7775.39, "O I", 9.15, 0.0, 0.02),
    (7780.56, "Fe I", 4.47, 0.5, 0.05),
    (7799.99, "Si I", 6.18, 0.0, 0.04),
    (7800.27, "Rb I", 0.00, -0.6, 0.03),
    (7832.20, "Fe I", 4.43, 0.6, 0.05),
    (7835.31, "Al I", 4.02, -0.2, 0.04),
    (7836.13, "Al I", 4.02, 0.0, 0.04),
    (7855.40, "Fe I", 5.06, -0.2, 0.03),
];

/// Number of seeded weak lines per camera (blue to IR): line density falls towards the red.
const WEAK_PER_CAMERA: [usize; 4] = [220, 130, 100, 60];

/// Species mix of the weak lines, with weights.
const WEAK_MIX: [(&str, f64); 10] = [
    ("Fe I", 0.45),
    ("Fe II", 0.06),
    ("Ti I", 0.10),
    ("Ti II", 0.04),
    ("Cr I", 0.08),
    ("Ni I", 0.09),
    ("Ca I", 0.05),
    ("Si I", 0.06),
    ("Sc II", 0.03),
    ("Cr II", 0.04),
];

/// The full line list for the given camera ranges. Deterministic: the weak lines come from a fixed
/// seed that does not depend on the run's seed, so every data set shares one "periodic table".
pub fn line_list(cameras: &[(f64, f64)]) -> Vec<Line> {
    let mut lines: Vec<Line> = NAMED
        .iter()
        .filter(|(wl, ..)| cameras.iter().any(|&(a, b)| *wl >= a && *wl <= b))
        .map(|&(wl, sp, chi_exc, log_tau_sun, damping)| {
            make_line(wl, sp, chi_exc, log_tau_sun, damping)
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_11e5);
    let total_w: f64 = WEAK_MIX.iter().map(|(_, w)| w).sum();
    for (cam, &(a, b)) in cameras.iter().enumerate() {
        let n = WEAK_PER_CAMERA.get(cam).copied().unwrap_or(60);
        for _ in 0..n {
            let wl = rng.random_range(a..b);
            let mut pick = rng.random::<f64>() * total_w;
            let mut name = WEAK_MIX[0].0;
            for (s, w) in WEAK_MIX {
                if pick < w {
                    name = s;
                    break;
                }
                pick -= w;
            }
            let ionised = species(name).kind == LineKind::Ionised;
            let chi_exc = if ionised {
                rng.random_range(1.0..4.0)
            } else {
                rng.random_range(0.0..5.0)
            };
            // Skewed towards weak lines, as in real spectra: most lines are a few percent deep.
            let u: f64 = rng.random();
            let log_tau_sun = -1.8 + 2.0 * u * u;
            let damping = rng.random_range(0.01..0.05);
            lines.push(make_line(wl, name, chi_exc, log_tau_sun, damping));
        }
    }
    lines.sort_by(|x, y| x.wl.total_cmp(&y.wl));
    lines
}

fn make_line(wl: f64, sp: &str, chi_exc: f64, log_tau_sun: f64, damping: f64) -> Line {
    let s = species(sp);
    Line {
        wl,
        species: s.name,
        kind: s.kind,
        chi_exc,
        chi_ion: s.chi_ion,
        mass: s.mass,
        log_tau_sun,
        damping,
        alpha: s.alpha,
        species_idx: species_index(sp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_species_is_known() {
        for (_, sp, ..) in NAMED {
            assert!(SPECIES.iter().any(|s| s.name == *sp), "{sp}");
        }
        for (sp, _) in WEAK_MIX {
            assert!(SPECIES.iter().any(|s| s.name == sp), "{sp}");
        }
    }
}
