//! Prints each star's drawn nuisances beside its labels, as CSV, for a synthetic set's seed: the
//! generator draws star `i` from its own stream, so the values are those behind `starflow synth
//! --seed SEED`'s row `i` (issue 32: do a model's errors follow the nuisances?).
//!
//! `cargo run --release -p starflow-data --example nuisances -- SEED N [PIXELS_PER_CAMERA] > out.csv`

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use starflow_data::synth::{draw_star, SynthConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: usize| {
        args.get(i)
            .map(|v| {
                v.parse::<usize>()
                    .expect("SEED N [PIXELS_PER_CAMERA] are integers")
            })
            .unwrap_or(default)
    };
    let cfg = SynthConfig {
        seed: arg(0, 42) as u64,
        n: arg(1, 1000),
        pixels_per_camera: arg(2, 4096),
        ..SynthConfig::default()
    };
    let mut header = vec!["row,t_eff,log_g,fe_h,snr,a_li,telluric,edge,d_xi".to_string()];
    header.extend((0..4).map(|c| format!("tilt{c}_offset,tilt{c}_slope")));
    let mut printed_species = false;
    for i in 0..cfg.n {
        // The generator's per-star stream (`synth::star_rng`).
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        rng.set_stream(i as u64);
        let star = draw_star(&mut rng, &cfg);
        let nu = &star.nuisance;
        if !printed_species {
            header.extend((0..nu.x_fe.len()).map(|s| format!("x_fe{s}")));
            println!("{}", header.join(","));
            printed_species = true;
        }
        let l = &star.labels;
        let mut row = vec![
            i.to_string(),
            l.t_eff.to_string(),
            l.log_g.to_string(),
            l.fe_h.to_string(),
            star.snr.to_string(),
            nu.a_li.to_string(),
            nu.telluric.to_string(),
            nu.edge.to_string(),
            nu.d_xi.to_string(),
        ];
        row.extend(
            nu.tilt
                .iter()
                .flat_map(|(o, s)| [o.to_string(), s.to_string()]),
        );
        row.extend(nu.x_fe.iter().map(|x| x.to_string()));
        println!("{}", row.join(","));
    }
}
