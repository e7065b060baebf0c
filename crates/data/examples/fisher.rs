//! Prints each star's Fisher matrix over the labels and the nuisances (no prior), for a synthetic
//! set's seed, as CSV rows: `row,snr,` then the `(3 + n)^2` entries row-major in the order of
//! [`Model::fisher`] (labels, then [`nuisance_param_names`]). The prior is
//! [`nuisance_prior_precision`]. Issue 32: how well could any estimator recover each star's
//! abundance offsets, the auxiliary targets?
//!
//! `cargo run --release -p starflow-data --example fisher -- SEED N [PIXELS_PER_CAMERA] > out.csv`

use starflow_data::synth::{
    draw_star, nuisance_param_names, nuisance_prior_precision, star_rng, Model, SynthConfig,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: usize| match args.get(i) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            eprintln!(
                "fisher: `{v}` is not a whole number; usage: fisher SEED N [PIXELS_PER_CAMERA]"
            );
            std::process::exit(2)
        }),
    };
    let cfg = SynthConfig {
        seed: arg(0, 42) as u64,
        n: arg(1, 100),
        pixels_per_camera: arg(2, 4096),
        ..SynthConfig::default()
    };
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
