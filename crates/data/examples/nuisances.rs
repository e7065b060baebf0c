//! Prints each star's drawn nuisances beside its labels, as CSV, for a synthetic set's seed: the
//! generator draws star `i` from its own stream ([`star_rng`]), so the values are those behind
//! `starflow synth --seed SEED`'s row `i` (issue 32: do a model's errors follow the nuisances?).
//!
//! `cargo run --release -p starflow-data --example nuisances -- SEED N [PIXELS_PER_CAMERA] > out.csv`

use starflow_data::synth::{draw_star, lines::N_SPECIES, star_rng};

#[path = "common/set_args.rs"]
mod set_args;

fn main() {
    let cfg = set_args::synth_config("nuisances", 1000);
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
