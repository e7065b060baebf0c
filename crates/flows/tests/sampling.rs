//! Sampling, summaries and normalisation of the three flows on random parameters.
//!
//! * Seeded sampling is reproducible, and sampled points map back to their base draws.
//! * For the Gaussian flows, sampled means, covariances and quantiles agree with the analytic
//!   ones within 5 standard errors (a fixed seed keeps the test deterministic).
//! * Every flow's density integrates to 1 within 1e-3 (midpoint rule on a 3-D grid over a box
//!   of +-9 sampled standard deviations).

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use starflow_flows::{flow_by_name, summarize_points, QUANTILE_LEVELS};

fn randn(rng: &mut ChaCha8Rng, shape: (usize, usize), std: f64) -> Tensor {
    let v: Vec<f64> = (0..shape.0 * shape.1)
        .map(|_| std * rng.sample::<f64, _>(StandardNormal))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// `sample_per_item` draws item i only from generator i: a batch gives exactly the samples of its
/// items sampled one by one, in any grouping (what lets prediction shards agree).
#[test]
fn per_item_generators_make_samples_independent_of_the_batch() {
    for name in ["diagonal_gaussian", "full_gaussian", "full_flow"] {
        let flow = flow_by_name(name, 3).expect("flow");
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let params = randn(&mut rng, (4, flow.n_params()), 0.5);
        let gens = |items: std::ops::Range<usize>| -> Vec<ChaCha8Rng> {
            items
                .map(|i| {
                    let mut g = ChaCha8Rng::seed_from_u64(7);
                    g.set_stream(i as u64);
                    g
                })
                .collect()
        };
        let whole = flow
            .sample_per_item(&params, 50, &mut gens(0..4))
            .expect("sample");
        let first = flow
            .sample_per_item(&params.narrow(0, 0, 1).unwrap(), 50, &mut gens(0..1))
            .expect("sample");
        let rest = flow
            .sample_per_item(&params.narrow(0, 1, 3).unwrap(), 50, &mut gens(1..4))
            .expect("sample");
        let joined: Vec<f64> = first.values.iter().chain(&rest.values).copied().collect();
        assert_eq!(whole.values, joined, "{name}");
        assert!(flow.sample_per_item(&params, 50, &mut gens(0..3)).is_err());
    }
}

#[test]
fn same_seed_same_samples_and_samples_map_back_to_base() {
    for name in ["diagonal_gaussian", "full_gaussian", "full_flow"] {
        let flow = flow_by_name(name, 3).expect("flow");
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let params = randn(&mut rng, (5, flow.n_params()), 0.5);
        let a = flow
            .sample(&params, 200, &mut ChaCha8Rng::seed_from_u64(42))
            .expect("sample");
        let b = flow
            .sample(&params, 200, &mut ChaCha8Rng::seed_from_u64(42))
            .expect("sample");
        let c = flow
            .sample(&params, 200, &mut ChaCha8Rng::seed_from_u64(43))
            .expect("sample");
        assert_eq!(a, b, "{name}: same seed must give the same samples");
        assert_ne!(
            a.values, c.values,
            "{name}: a different seed must give different samples"
        );
        assert_eq!(a.values.len(), 5 * 200 * 3);

        // The base draws are the first values the rng yields, in (item, sample, dim) order.
        let mut base_rng = ChaCha8Rng::seed_from_u64(42);
        let base: Vec<f64> = (0..a.values.len())
            .map(|_| base_rng.sample(StandardNormal))
            .collect();
        let rep = |t: &Tensor, n: usize| -> Tensor {
            let (rows, cols) = t.dims2().expect("2-D");
            let v = t
                .flatten_all()
                .expect("flat")
                .to_vec1::<f64>()
                .expect("f64");
            let out: Vec<f64> = (0..rows)
                .flat_map(|r| (0..n).flat_map(move |_| r * cols..(r + 1) * cols))
                .map(|i| v[i])
                .collect();
            Tensor::from_vec(out, (rows * n, cols), &Device::Cpu).expect("tensor")
        };
        let x = Tensor::from_vec(a.values.clone(), (5 * 200, 3), &Device::Cpu).expect("tensor");
        let parts = flow
            .log_prob_parts(&rep(&params, 200), &x)
            .expect("log_prob");
        let z = parts
            .z
            .flatten_all()
            .expect("flat")
            .to_vec1::<f64>()
            .expect("f64");
        for (i, (zi, bi)) in z.iter().zip(&base).enumerate() {
            assert!(
                (zi - bi).abs() <= 1e-9 * bi.abs().max(1.0),
                "{name}: entry {i}: base {bi} came back as {zi}"
            );
        }
    }
}

#[test]
fn gaussian_samples_match_analytic_moments() {
    let n = 20_000;
    let nf = n as f64;
    for name in ["diagonal_gaussian", "full_gaussian"] {
        let flow = flow_by_name(name, 3).expect("flow");
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let params = randn(&mut rng, (3, flow.n_params()), 0.5);
        let moments = flow.gaussian_moments(&params).expect("Gaussian flow");
        let samples = flow.sample(&params, n, &mut rng).expect("sample");
        for (i, (m, s)) in moments.iter().zip(samples.summarize()).enumerate() {
            let analytic = m.to_summary();
            for a in 0..3 {
                let sd = analytic.std[a];
                let se_mean = sd / nf.sqrt();
                assert!(
                    (s.mean[a] - m.mean[a]).abs() < 5.0 * se_mean,
                    "{name} item {i} dim {a}: mean {} vs {}",
                    s.mean[a],
                    m.mean[a]
                );
                for b in 0..3 {
                    let (caa, cbb, cab) = (m.cov[a * 3 + a], m.cov[b * 3 + b], m.cov[a * 3 + b]);
                    let se_cov = ((caa * cbb + cab * cab) / nf).sqrt();
                    let got = s.cov[a * 3 + b];
                    assert!(
                        (got - cab).abs() < 5.0 * se_cov,
                        "{name} item {i} cov[{a},{b}]: {got} vs {cab}"
                    );
                }
                for (qi, &q) in QUANTILE_LEVELS.iter().enumerate() {
                    let zq = (analytic.quantiles[a][qi] - m.mean[a]) / sd;
                    let dens = (-0.5 * zq * zq).exp() / (2.0 * std::f64::consts::PI).sqrt() / sd;
                    let se_q = (q * (1.0 - q) / nf).sqrt() / dens;
                    let got = s.quantiles[a][qi];
                    assert!(
                        (got - analytic.quantiles[a][qi]).abs() < 5.0 * se_q,
                        "{name} item {i} dim {a} q {q}: {got} vs {}",
                        analytic.quantiles[a][qi]
                    );
                }
            }
        }
    }
}

/// Midpoint-rule integral of the flow's density for one parameter row over an axis-aligned box
/// of +-9 sampled standard deviations around the sampled mean.
fn integrate(name: &str, row: &Tensor, n_grid: usize) -> f64 {
    let flow = flow_by_name(name, 3).expect("flow");
    let samples = flow
        .sample(row, 4000, &mut ChaCha8Rng::seed_from_u64(9))
        .expect("sample");
    let s = summarize_points(samples.item(0), 3);
    let lo: Vec<f64> = (0..3).map(|a| s.mean[a] - 9.0 * s.std[a]).collect();
    let h: Vec<f64> = (0..3).map(|a| 18.0 * s.std[a] / n_grid as f64).collect();
    let cell = h[0] * h[1] * h[2];
    let mut total = 0.0;
    let chunk = n_grid * n_grid;
    let params = row
        .broadcast_as((chunk, flow.n_params()))
        .expect("broadcast")
        .contiguous()
        .expect("contiguous");
    for i in 0..n_grid {
        let mut pts = Vec::with_capacity(chunk * 3);
        for j in 0..n_grid {
            for k in 0..n_grid {
                pts.extend_from_slice(&[
                    lo[0] + (i as f64 + 0.5) * h[0],
                    lo[1] + (j as f64 + 0.5) * h[1],
                    lo[2] + (k as f64 + 0.5) * h[2],
                ]);
            }
        }
        let x = Tensor::from_vec(pts, (chunk, 3), &Device::Cpu).expect("tensor");
        let lp = flow
            .log_prob(&params, &x)
            .expect("log_prob")
            .to_vec1::<f64>()
            .expect("f64");
        total += lp.iter().map(|v| v.exp()).sum::<f64>() * cell;
    }
    total
}

#[test]
fn densities_integrate_to_one() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (name, n_grid) in [
        ("diagonal_gaussian", 48),
        ("full_gaussian", 48),
        ("full_flow", 56),
    ] {
        let flow = flow_by_name(name, 3).expect("flow");
        for item in 0..2 {
            let row = randn(&mut rng, (1, flow.n_params()), 0.5);
            let total = integrate(name, &row, n_grid);
            println!(
                "{name} item {item}: integral {total:.9} (error {:.2e})",
                total - 1.0
            );
            assert!(
                (total - 1.0).abs() < 1e-3,
                "{name} item {item}: density integrates to {total}"
            );
        }
    }
}
