//! Prints each star's drawn nuisances beside its labels, as CSV, for a synthetic set's seed: the
//! generator draws star `i` from its own stream ([`star_rng`]), so the values are those behind
//! `starflow synth --seed SEED`'s row `i` (issue 32: do a model's errors follow the nuisances?).
//!
//! `cargo run --release -p starflow-data --example nuisances -- SEED N [PIXELS_PER_CAMERA] > out.csv`

use starflow_data::synth::{draw_star, lines::N_SPECIES, star_rng, SynthConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: usize| {
        match args.get(i) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("nuisances: `{v}` is not a whole number; usage: nuisances SEED N [PIXELS_PER_CAMERA]");
            std::process::exit(2)
        }),
    }
    };
    let cfg = SynthConfig {
        seed: arg(0, 42) as u64,
        n: arg(1, 1000),
        pixels_per_camera: arg(2, 4096),
        ..SynthConfig::default()
    };
    let mut header = vec!["row,t_eff,log_g,fe_h,snr,a_li,telluric,edge,d_xi".to_string()];
    header.extend((0..4).map(|c| format!("tilt{c}_offset,tilt{c}_slope")));
    header.extend((0..N_SPECIES).map(|s| format!("x_fe{s}")));
    println!("{}", header.join(","));
    for i in 0..cfg.n {
        let star = draw_star(&mut star_rng(cfg.seed, i), &cfg);
        let (l, nu) = (&star.labels, &star.nuisance);
        let mut row = vec![i as f64, l.t_eff, l.log_g, l.fe_h, star.snr];
        row.extend([nu.a_li, nu.telluric, nu.edge, nu.d_xi]);
        row.extend(nu.tilt.iter().flat_map(|&(o, s)| [o, s]));
        row.extend(&nu.x_fe);
        let row: Vec<String> = row.iter().map(f64::to_string).collect();
        println!("{}", row.join(","));
    }
}
