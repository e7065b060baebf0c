//! Prints each star's Fisher matrix over the labels and the nuisances (no prior), for a synthetic
//! set's seed, as CSV rows: `row,snr,` then the `(3 + n)^2` entries row-major in the order of
//! [`Model::fisher`] (labels, then [`nuisance_param_names`]). The prior is
//! [`nuisance_prior_precision`]. Issue 32: how well could any estimator recover each star's
//! abundance offsets, the auxiliary targets?
//!
//! `cargo run --release -p starflow-data --example fisher -- SEED N [PIXELS_PER_CAMERA] > out.csv`

use starflow_data::synth::{
    draw_star, nuisance_param_names, nuisance_prior_precision, star_rng, Model,
};

#[path = "common/set_args.rs"]
mod set_args;

fn main() {
    let cfg = set_args::synth_config("fisher", 100);
    let model = Model::new(&cfg);
    let mut scratch = model.crlb_scratch();
    let names = nuisance_param_names();
    let prior: Vec<String> = nuisance_prior_precision()
        .iter()
        .map(f64::to_string)
        .collect();
    println!("# nuisances: {}", names.join(","));
    println!("# prior: {}", prior.join(","));
    for i in 0..cfg.n {
        let star = draw_star(&mut star_rng(cfg.seed, i), &cfg);
        let f = model.fisher(&star.labels, &star.nuisance, star.snr, &mut scratch);
        let mut row = vec![i.to_string(), star.snr.to_string()];
        row.extend(f.iter().map(f64::to_string));
        println!("{}", row.join(","));
    }
}
