//! How well can a validation-sized set fit the per-star widening? (issue 29, the real-data path)
//!
//! `cargo run --release -p starflow-inference --example width_subsets -- RUN DATA N [noise|giants]`
//!
//! Evaluates RUN's own posteriors on the labelled set DATA (e.g. 10,000 synthetic stars of a tuning
//! seed) and on RUN's validation split, fits a [`WidthMap`] on all of DATA, on the validation
//! split, and on each disjoint block of N stars of DATA, and prints each fit's `ln w` of the first
//! label (t_eff) at four points, with an "excess" of the last over the others:
//! - `noise` (default): the noise-only map at the medians of DATA's four noise quarters, faintest
//!   last;
//! - `giants`: the full map (noise and the three means) at the median noise and the mean posterior
//!   means (z-units) of DATA's true dwarfs in three t_eff terciles and of its true giants (log g <
//!   3.5), giants last.
//!
//! The spread of the blocks' excess is what a set of N stars can know; the validation split's
//! excess, set against it, tells a small fit's noise from a difference between validation and new
//! stars.

use std::path::PathBuf;

use anyhow::{bail, Context};
use starflow_inference::{evaluate_on, EvalSource, Evaluation, PosteriorSettings, WidthMap};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [run, data, n, ..] = args.as_slice() else {
        bail!("usage: width_subsets RUN DATA N [noise|giants]");
    };
    let (run, data) = (PathBuf::from(run), PathBuf::from(data));
    let n: usize = n.parse().context("N: a number of stars")?;
    let giants = std::env::args().nth(4).as_deref() == Some("giants");
    let prepare = |mut e: Evaluation| {
        // Without the label scaling the widening follows the noise level alone.
        if !giants {
            e.label_scale.clear();
        }
        e
    };
    let full = prepare(evaluate_on(
        &run,
        &EvalSource::dir(&data),
        &PosteriorSettings::own(1000, 0),
    )?);
    let val = prepare(evaluate_on(
        &run,
        &EvalSource::Split("val".into()),
        &PosteriorSettings::own(1000, 0),
    )?);
    let points = if giants {
        type_points(&full)?
    } else {
        quarter_medians(&full)?
            .into_iter()
            .map(|x| Point {
                noise: x,
                z: Vec::new(),
            })
            .collect()
    };
    println!("points (last is the excess's): {points:.3?}");
    report("all of DATA", &full, &points, full.stars.len());
    report("validation split", &val, &points, val.stars.len());
    let mut excess = Vec::new();
    for (b, block) in (0..full.stars.len() / n).map(|b| (b, b * n..(b + 1) * n)) {
        let sub = full.subset(&block.collect::<Vec<_>>());
        if let Some(e) = report(&format!("block {b}"), &sub, &points, n) {
            excess.push(e);
        }
    }
    let k = excess.len() as f64;
    let mean = excess.iter().sum::<f64>() / k;
    let sd = (excess.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (k - 1.0)).sqrt();
    println!("blocks of {n}: excess {mean:+.3} ± {sd:.3} (sd over {k} blocks)");
    Ok(())
}

/// Where a width is read: a noise level and posterior means (z-units).
#[derive(Debug)]
struct Point {
    noise: f64,
    z: Vec<f64>,
}

/// The median noise with the mean posterior means of DATA's true dwarfs in three t_eff terciles and
/// of its true giants (log g, label 1, below 3.5), giants last.
fn type_points(e: &Evaluation) -> anyhow::Result<Vec<Point>> {
    let noise = quarter_medians(e)?;
    let median = 0.5 * (noise[1] + noise[2]);
    let truth = |s: &starflow_inference::StarPrediction, j: usize| s.truth.as_ref().map(|t| t[j]);
    let mut dwarfs: Vec<_> = e
        .stars
        .iter()
        .filter(|s| truth(s, 1).is_some_and(|g| g >= 3.5))
        .collect();
    dwarfs.sort_by(|a, b| truth(a, 0).unwrap().total_cmp(&truth(b, 0).unwrap()));
    let giants: Vec<_> = e
        .stars
        .iter()
        .filter(|s| truth(s, 1).is_some_and(|g| g < 3.5))
        .collect();
    let mean_z = |group: &[&starflow_inference::StarPrediction]| -> Vec<f64> {
        let d = e.labels.len();
        let mut m = vec![0.0; d];
        for s in group {
            for (j, z) in e.z_means(s).into_iter().enumerate() {
                m[j] += z / group.len() as f64;
            }
        }
        m
    };
    let k = dwarfs.len() / 3;
    Ok((0..3)
        .map(|t| &dwarfs[t * k..(t + 1) * k])
        .chain(std::iter::once(&giants[..]))
        .map(|g| Point {
            noise: median,
            z: mean_z(g),
        })
        .collect())
}

/// The noise levels at the medians of the four noise quarters of `e`'s stars, increasing.
fn quarter_medians(e: &Evaluation) -> anyhow::Result<Vec<f64>> {
    let mut noise: Vec<f64> = e.stars.iter().filter_map(|s| s.noise).collect();
    if noise.len() < 8 {
        bail!("the stars carry no noise levels");
    }
    noise.sort_by(f64::total_cmp);
    Ok([0.125, 0.375, 0.625, 0.875]
        .iter()
        .map(|q| noise[(q * noise.len() as f64) as usize])
        .collect())
}

/// Prints the fit's `ln w` of label 0 at `points` and returns the last point's excess.
fn report(name: &str, e: &Evaluation, points: &[Point], n: usize) -> Option<f64> {
    let Some(map) = WidthMap::fit(e) else {
        println!("{name} ({n} stars): no widening (too few stars)");
        return None;
    };
    let lw: Vec<f64> = points
        .iter()
        .map(|p| map.width(0, p.noise, &p.z).ln())
        .collect();
    let excess = lw[3] - (lw[0] + lw[1] + lw[2]) / 3.0;
    println!("{name} ({n} stars): ln w {lw:+.3?}, excess {excess:+.3}");
    Some(excess)
}
