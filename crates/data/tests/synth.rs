//! The synthetic generator: the physics behaves like real spectra, the output is reproducible and
//! it loads back through the real loader.

use starflow_data::synth::{equivalent_width, Labels, Model, Nuisance, SynthConfig};
use starflow_data::{Dataset, LoadOptions};

fn model() -> Model {
    Model::new(&SynthConfig::default())
}

fn flux(m: &Model, t_eff: f64, log_g: f64, fe_h: f64) -> Vec<f64> {
    let mut out = vec![0.0; m.n_pix()];
    m.flux(&Labels { t_eff, log_g, fe_h }, &Nuisance::quiet(), &mut out);
    out
}

fn ew(m: &Model, f: &[f64], center: f64, half: f64) -> f64 {
    equivalent_width(&m.wavelength, f, center, half)
}

/// Sum of equivalent widths of every line of `species` (each over +-0.3 A).
fn species_ew(m: &Model, f: &[f64], species: &str) -> f64 {
    m.lines
        .iter()
        .filter(|l| l.species == species)
        .map(|l| ew(m, f, l.wl, 0.3))
        .sum()
}

#[test]
fn grid_matches_the_hermes_cameras() {
    let m = model();
    assert_eq!(m.n_pix(), 16384);
    let w = &m.wavelength;
    assert_eq!((w[0], w[4095]), (4718.0, 4903.0));
    assert_eq!((w[4096], w[8191]), (5649.0, 5873.0));
    assert_eq!((w[8192], w[12287]), (6481.0, 6739.0));
    assert_eq!((w[12288], w[16383]), (7590.0, 7890.0));
    assert!(
        m.lines.len() >= 300,
        "a few hundred lines, got {}",
        m.lines.len()
    );
    for name in [
        "H I", "K I", "O I", "Ca I", "Fe I", "Fe II", "Ti I", "Ti II", "Sc II", "Ba II", "Li I",
    ] {
        assert!(m.lines.iter().any(|l| l.species == name), "{name} missing");
    }
}

#[test]
fn h_alpha_grows_with_t_eff() {
    let m = model();
    let ews: Vec<f64> = [4600.0, 5200.0, 5800.0, 6400.0]
        .iter()
        .map(|&t| ew(&m, &flux(&m, t, 4.4, 0.0), 6562.8, 15.0))
        .collect();
    assert!(
        ews.windows(2).all(|p| p[1] > p[0] * 1.1),
        "H-alpha EW vs t_eff: {ews:?}"
    );
    // The line core reaches ~0.2 of the continuum, as in GALAH.
    let f = flux(&m, 5800.0, 4.4, 0.0);
    let core = f[9480..9500].iter().copied().fold(1.0, f64::min);
    assert!((0.15..0.35).contains(&core), "H-alpha core {core}");
}

#[test]
fn metal_lines_grow_with_fe_h_and_saturate() {
    let m = model();
    let ews: Vec<f64> = [-1.0, -0.5, 0.0, 0.4]
        .iter()
        .map(|&z| species_ew(&m, &flux(&m, 5700.0, 4.4, z), "Fe I"))
        .collect();
    assert!(
        ews.windows(2).all(|p| p[1] > p[0]),
        "Fe I EW vs fe_h: {ews:?}"
    );
    // Curve of growth: weak lines scale ~10^[Fe/H], so the summed EW grows by less than 10^1.4
    // from -1.0 to +0.4 because the strong lines saturate.
    assert!(
        ews[3] / ews[0] < 10f64.powf(1.4) * 0.5,
        "no saturation: {ews:?}"
    );
}

#[test]
fn ionised_lines_are_stronger_in_giants() {
    let m = model();
    let giant = species_ew(&m, &flux(&m, 5000.0, 2.2, -0.2), "Fe II");
    let dwarf = species_ew(&m, &flux(&m, 5000.0, 4.5, -0.2), "Fe II");
    assert!(giant > dwarf * 1.2, "Fe II EW giant {giant} dwarf {dwarf}");
}

#[test]
fn pressure_wings_grow_with_gravity() {
    let m = model();
    // Absorption in the wing of K I 7699 (0.5-2 A from the core) and Ca I 6717.
    for (center, name) in [(7698.96, "K I"), (6717.68, "Ca I")] {
        let wing = |g: f64| {
            let f = flux(&m, 5000.0, g, 0.0);
            ew(&m, &f, center + 1.25, 0.75) + ew(&m, &f, center - 1.25, 0.75)
        };
        let (dwarf, giant) = (wing(4.6), wing(2.0));
        assert!(
            dwarf > giant * 1.3,
            "{name} wings dwarf {dwarf} giant {giant}"
        );
    }
}

#[test]
fn crlb_shrinks_as_snr_grows() {
    let m = model();
    let l = Labels {
        t_eff: 5600.0,
        log_g: 4.3,
        fe_h: -0.1,
    };
    let n = m.n_pix();
    let mut scratch = [vec![0.0; n], vec![0.0; n]];
    let lo = m.crlb(&l, &Nuisance::quiet(), 20.0, &mut scratch);
    let hi = m.crlb(&l, &Nuisance::quiet(), 200.0, &mut scratch);
    for k in 0..3 {
        assert!(lo[k].is_finite() && lo[k] > 0.0, "{lo:?}");
        assert!(
            (lo[k] / hi[k] - 10.0).abs() < 1e-6,
            "CRLB must scale as 1/SNR: {lo:?} {hi:?}"
        );
    }
    // Without noise-free information the bound would be infinite; a singular Fisher matrix must
    // show as infinity, not as a tiny number: a star with SNR 0 has no information.
    let none = m.crlb(&l, &Nuisance::quiet(), 0.0, &mut scratch);
    assert!(none.iter().all(|v| v.is_infinite()), "{none:?}");
}

#[test]
fn same_seed_same_bytes_and_files_load_back() {
    let cfg = SynthConfig {
        n: 24,
        seed: 9,
        pixels_per_camera: 256,
        ..SynthConfig::default()
    };
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    starflow_data::generate(&cfg, &|_| {})
        .unwrap()
        .write(a.path())
        .unwrap();
    // A different thread count must not change a byte.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        starflow_data::generate(&cfg, &|_| {})
            .unwrap()
            .write(b.path())
            .unwrap()
    });
    for f in [
        "spectra.npy",
        "labels.npy",
        "wavelength.npy",
        "crlb.npy",
        "synth.json",
    ] {
        assert_eq!(
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap(),
            "{f} differs"
        );
    }
    let other = starflow_data::generate(
        &SynthConfig {
            seed: 10,
            ..cfg.clone()
        },
        &|_| {},
    )
    .unwrap();
    let first = starflow_data::generate(&cfg, &|_| {}).unwrap();
    assert_ne!(first.spectra, other.spectra);

    let ds = Dataset::load_dir(a.path(), &LoadOptions::default()).unwrap();
    assert_eq!(ds.len(), 24);
    assert_eq!(ds.n_pix(), 1024);
    for i in 0..24 {
        let t = ds.targets(i);
        assert!(
            (4000.0..6700.0).contains(&t[0])
                && (1.2..4.8).contains(&t[1])
                && (-1.4..0.5).contains(&t[2]),
            "{t:?}"
        );
    }
    let snr = ds.column("SNR").unwrap();
    assert!(snr.iter().all(|s| (15.0..=250.0).contains(s)));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.path().join("synth.json")).unwrap()).unwrap();
    assert_eq!(json["config"]["seed"], 9);
    assert!(json["generator_version"].is_string());
}

#[test]
fn population_is_galah_like() {
    let cfg = SynthConfig {
        n: 2000,
        seed: 1,
        ..SynthConfig::default()
    };
    let stars: Vec<_> = (0..cfg.n)
        .map(|i| {
            let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
            rng.set_stream(i as u64);
            starflow_data::synth::draw_star(&mut rng, &cfg)
        })
        .collect();
    let mean = |f: &dyn Fn(&starflow_data::synth::Star) -> f64| {
        stars.iter().map(f).sum::<f64>() / stars.len() as f64
    };
    let t = mean(&|s| s.labels.t_eff);
    let g = mean(&|s| s.labels.log_g);
    let z = mean(&|s| s.labels.fe_h);
    assert!((5250.0..5700.0).contains(&t), "mean t_eff {t}");
    assert!((3.8..4.2).contains(&g), "mean log_g {g}");
    assert!((-0.3..-0.1).contains(&z), "mean fe_h {z}");
    // Giants are cooler than dwarfs.
    let giants: Vec<_> = stars.iter().filter(|s| s.labels.log_g < 3.5).collect();
    let gt = giants.iter().map(|s| s.labels.t_eff).sum::<f64>() / giants.len() as f64;
    assert!(gt < 5100.0 && gt < t, "giant mean t_eff {gt}");
    // Luminosity follows from radius and temperature: giants are brighter.
    let gl = giants.iter().map(|s| s.l_bol).sum::<f64>() / giants.len() as f64;
    assert!(gl > 5.0, "giant mean luminosity {gl}");
}
