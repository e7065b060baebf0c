//! The synthetic generator: the physics behaves like real spectra, the output is reproducible and
//! it loads back through the real loader.

use starflow_data::synth::{
    draw_star, equivalent_width, marginal_bound, nuisance_param_names, nuisance_prior_precision,
    Labels, Model, Nuisance, SynthConfig, N_NUISANCE_PARAMS,
};
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
    for f in starflow_data::synth::SYNTH_FILES {
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
    let files: Vec<&str> = json["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for f in &files {
        assert!(a.path().join(f).exists(), "{f} listed but not written");
    }
    assert!(files.contains(&"crlb.npy") && files.contains(&"crlb_marginal.npy"));
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

/// The per-star random stream of `generate` (seed, stream = star index).
fn star(cfg: &SynthConfig, i: usize) -> starflow_data::synth::Star {
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(cfg.seed);
    rng.set_stream(i as u64);
    draw_star(&mut rng, cfg)
}

/// The fixed-nuisance CRLB exactly as the generator computed it before the marginal bound was
/// added (copied verbatim from generator 1.0.0), to pin `crlb.npy` bit for bit.
fn reference_crlb(m: &Model, l: &Labels, nu: &Nuisance, snr: f64) -> [f64; 3] {
    let steps = [10.0, 0.01, 0.01];
    let n = m.n_pix();
    let mut scratch = [vec![0.0; n], vec![0.0; n]];
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
        let [a, b] = &mut scratch;
        m.flux(&plus, nu, a);
        m.flux(&minus, nu, b);
        for k in 0..n {
            jac[j * n + k] = (a[k] - b[k]) / (2.0 * h);
        }
    }
    let mut f = [[0.0; 3]; 3];
    for r in 0..3 {
        for c in r..3 {
            let s: f64 = (0..n).map(|k| jac[r * n + k] * jac[c * n + k]).sum::<f64>() * snr * snr;
            f[r][c] = s;
            f[c][r] = s;
        }
    }
    let c =
        |r0: usize, r1: usize, c0: usize, c1: usize| f[r0][c0] * f[r1][c1] - f[r0][c1] * f[r1][c0];
    let cof = [
        [c(1, 2, 1, 2), -c(1, 2, 0, 2), c(1, 2, 0, 1)],
        [-c(0, 2, 1, 2), c(0, 2, 0, 2), -c(0, 2, 0, 1)],
        [c(0, 1, 1, 2), -c(0, 1, 0, 2), c(0, 1, 0, 1)],
    ];
    let det = f[0][0] * cof[0][0] + f[0][1] * cof[0][1] + f[0][2] * cof[0][2];
    if det == 0.0 || !det.is_finite() {
        return [f64::INFINITY; 3];
    }
    [0, 1, 2].map(|i| (cof[i][i] / det).max(0.0).sqrt())
}

fn small_set() -> (SynthConfig, starflow_data::SynthData) {
    let cfg = SynthConfig {
        n: 40,
        seed: 5,
        pixels_per_camera: 512,
        ..SynthConfig::default()
    };
    let data = starflow_data::generate(&cfg, &|_| {}).unwrap();
    (cfg, data)
}

#[test]
fn fixed_crlb_is_unchanged_bit_for_bit() {
    let (cfg, data) = small_set();
    let m = Model::new(&cfg);
    let n = m.n_pix();
    let mut scratch = [vec![0.0; n], vec![0.0; n]];
    for i in 0..cfg.n {
        let s = star(&cfg, i);
        let want = reference_crlb(&m, &s.labels, &s.nuisance, s.snr);
        let api = m.crlb(&s.labels, &s.nuisance, s.snr, &mut scratch);
        for j in 0..3 {
            assert_eq!(
                data.crlb[3 * i + j].to_bits(),
                want[j].to_bits(),
                "star {i}"
            );
            assert_eq!(api[j].to_bits(), want[j].to_bits(), "star {i}");
        }
    }
}

#[test]
fn marginal_crlb_is_finite_and_never_below_the_fixed_one() {
    let (cfg, data) = small_set();
    let m = Model::new(&cfg);
    let mut scratch = m.crlb_scratch();
    for i in 0..cfg.n {
        let fixed = &data.crlb[3 * i..3 * i + 3];
        let marginal = &data.crlb_marginal[3 * i..3 * i + 3];
        for j in 0..3 {
            assert!(
                marginal[j].is_finite() && marginal[j] >= fixed[j] && fixed[j] > 0.0,
                "star {i}: marginal {marginal:?} fixed {fixed:?}"
            );
        }
        // What generate writes is what the public API computes for the same star.
        let s = star(&cfg, i);
        let both = m.crlb_both(&s.labels, &s.nuisance, s.snr, &mut scratch);
        assert_eq!(both.marginal.as_slice(), marginal, "star {i}");
        assert_eq!(both.fixed.as_slice(), fixed, "star {i}");
        let alone = m.crlb_marginal(&s.labels, &s.nuisance, s.snr, &mut scratch);
        assert_eq!(alone, both.marginal);
    }
    // Abundance scatter of 0.05 dex per species caps what the spectrum can say about fe_h.
    let median_fe = {
        let mut v: Vec<f64> = (0..cfg.n).map(|i| data.crlb_marginal[3 * i + 2]).collect();
        v.sort_by(f64::total_cmp);
        v[cfg.n / 2]
    };
    assert!(
        (0.005..0.05).contains(&median_fe),
        "median fe_h bound {median_fe}"
    );
}

#[test]
fn marginal_bound_matches_a_hand_computed_case() {
    // Labels (t, g, z) with information 4, 9, 16; nuisance 3 is correlated with t and g (Fisher
    // entries 1 and 2, information 2), nuisance 4 carries no information, nuisance 5 is an exact
    // copy of nuisance 3 (degenerate: dropped without changing anything).
    let m = 6;
    let mut f = vec![0.0; m * m];
    let mut set = |r: usize, c: usize, v: f64| {
        f[r * m + c] = v;
        f[c * m + r] = v;
    };
    for (i, v) in [4.0, 9.0, 16.0].into_iter().enumerate() {
        set(i, i, v);
    }
    for k in [3, 5] {
        set(0, k, 1.0);
        set(1, k, 2.0);
        set(k, k, 2.0);
    }
    set(3, 5, 2.0);
    // Schur complement of the labels: [[4 - 1/2, -2/2], [-2/2, 9 - 4/2]] = [[3.5, -1], [-1, 7]],
    // determinant 23.5; fe_h untouched.
    let want = [(7.0f64 / 23.5).sqrt(), (3.5f64 / 23.5).sqrt(), 0.25];
    let got = marginal_bound(&f, &[0.0, 5.0, 0.0]);
    for j in 0..3 {
        assert!(
            (got[j] - want[j]).abs() < 1e-12 * want[j],
            "{got:?} vs {want:?}"
        );
    }
    // Without the copy, a prior information of 2 on nuisance 3: its diagonal becomes 4, the
    // Schur complement [[3.75, -0.5], [-0.5, 8]], determinant 29.75.
    let f3: Vec<f64> = (0..4)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .map(|(r, c)| f[r * m + c])
        .collect();
    let want = [(8.0f64 / 29.75).sqrt(), (3.75f64 / 29.75).sqrt(), 0.25];
    let got = marginal_bound(&f3, &[2.0]);
    for j in 0..3 {
        assert!(
            (got[j] - want[j]).abs() < 1e-12 * want[j],
            "{got:?} vs {want:?}"
        );
    }
    // No nuisances: the plain inverse.
    let f0: Vec<f64> = (0..3)
        .flat_map(|r| (0..3).map(move |c| (r, c)))
        .map(|(r, c)| f[r * m + c])
        .collect();
    assert_eq!(marginal_bound(&f0, &[]), [0.5, 1.0 / 3.0, 0.25]);

    // A nuisance that is a copy of fe_h: fe_h is not identifiable with a flat prior (and so all
    // three bounds are reported infinite, like a singular matrix in the fixed bound), and is with
    // a prior of 1: 16 - 16^2 / 17 = 16/17.
    let mut g = vec![0.0; 16];
    for (i, v) in [4.0, 9.0, 16.0].into_iter().enumerate() {
        g[i * 4 + i] = v;
    }
    g[2 * 4 + 3] = 16.0;
    g[3 * 4 + 2] = 16.0;
    g[3 * 4 + 3] = 16.0;
    assert!(marginal_bound(&g, &[0.0]).iter().all(|v| v.is_infinite()));
    let got = marginal_bound(&g, &[1.0]);
    assert!((got[2] - (17.0f64 / 16.0).sqrt()).abs() < 1e-12, "{got:?}");
    assert!((got[0] - 0.5).abs() < 1e-15 && (got[1] - 1.0 / 3.0).abs() < 1e-15);

    // No information, or a broken matrix: infinite.
    assert!(marginal_bound(&[0.0; 16], &[1.0])
        .iter()
        .all(|v| v.is_infinite()));
    let mut bad = g.clone();
    bad[5] = f64::NAN;
    assert!(marginal_bound(&bad, &[1.0]).iter().all(|v| v.is_infinite()));
}

#[test]
fn marginal_crlb_of_a_real_star_behaves() {
    let cfg = SynthConfig {
        pixels_per_camera: 1024,
        ..SynthConfig::default()
    };
    let m = Model::new(&cfg);
    let s = star(&cfg, 7);
    let (l, nu) = (&s.labels, &s.nuisance);
    let mut scratch = m.crlb_scratch();
    let both = m.crlb_both(l, nu, s.snr, &mut scratch);
    let f = m.fisher(l, nu, s.snr, &mut scratch);
    let k = 3 + N_NUISANCE_PARAMS;
    assert_eq!(f.len(), k * k);
    assert_eq!(nuisance_param_names().len(), N_NUISANCE_PARAMS);
    assert!((0..k).all(|r| (0..k).all(|c| f[r * k + c] == f[c * k + r])));
    let prior = nuisance_prior_precision();
    assert_eq!(marginal_bound(&f, &prior), both.marginal);

    // Nuisances pinned by an overwhelming prior: back to the fixed bound (up to the exact fe_h
    // derivative the marginal bound uses instead of the central difference).
    let pinned = marginal_bound(&f, &[1e20; N_NUISANCE_PARAMS]);
    for j in 0..3 {
        assert!(
            (pinned[j] / both.fixed[j] - 1.0).abs() < 1e-3,
            "{pinned:?} vs {:?}",
            both.fixed
        );
    }
    // Without the abundance prior, fe_h is exactly degenerate with the per-species offsets (it
    // only enters the flux through fe_h + [alpha/Fe] + [X/Fe]): no bound.
    let mut flat = prior;
    flat[..starflow_data::synth::lines::N_SPECIES].fill(0.0);
    let b = marginal_bound(&f, &flat);
    assert!(b[2].is_infinite(), "{b:?}");

    // A quiet star (no telluric pattern: that column is all zero and dropped) is finite, and no
    // signal means no bound.
    let quiet = m.crlb_both(l, &Nuisance::quiet(), 50.0, &mut scratch);
    for j in 0..3 {
        assert!(
            quiet.marginal[j].is_finite() && quiet.marginal[j] >= quiet.fixed[j],
            "{quiet:?}"
        );
    }
    let none = m.crlb_marginal(l, nu, 0.0, &mut scratch);
    assert!(none.iter().all(|v| v.is_infinite()), "{none:?}");
}
