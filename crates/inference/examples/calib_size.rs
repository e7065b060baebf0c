//! How many calibration stars do the maps need? (issue 29, the real-data path)
//!
//! `cargo run --release -p starflow-inference --example calib_size -- RUN DATA N1,N2,... [SAMPLES]`
//!
//! Evaluates RUN's own posteriors on the labelled set DATA (e.g. 10,000 synthetic stars of a tuning
//! seed) and keeps its second half as the stars to score. For each N it fits the recalibration on
//! the first N stars of the first half: without the per-star widening, with it, and with a
//! widening by the noise level alone (no held-out check: all three are shown). All maps are
//! applied in one more pass over DATA. Each line then gives, on the scored half, the NLL (z-units)
//! and the per-kind cells within the targets (68 % coverage within 3 points, 95 % within 2, pull
//! std 0.93–1.07): the named ones (SNR quarters, giants, dwarfs × labels) and the others
//! (metal-poor, cool, hot × labels), then the t_eff 68 % coverage of the faintest quarter and of
//! the giants.

use std::path::PathBuf;

use anyhow::{bail, Context};
use starflow_inference::kinds::{by_kind, KindCalibration};
use starflow_inference::{
    evaluate_on, evaluate_on_each, Calibration, CalibrationMethod, EvalSource, Evaluation,
    PosteriorSettings, Sampler,
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [run, data, sizes, ..] = args.as_slice() else {
        bail!("usage: calib_size RUN DATA N1,N2,... [SAMPLES]");
    };
    let (run, data) = (PathBuf::from(run), PathBuf::from(data));
    let sizes: Vec<usize> = sizes
        .split(',')
        .map(|v| v.parse().context("N: numbers of stars, comma-separated"))
        .collect::<anyhow::Result<_>>()?;
    let samples: usize = args.get(3).map_or(Ok(250), |v| v.parse())?;
    let source = EvalSource::dir(&data);
    let own = evaluate_on(&run, &source, &PosteriorSettings::own(samples, 0))?;
    let half = own.stars.len() / 2;
    if sizes.iter().any(|&n| n > half) {
        bail!(
            "every N must be at most half of DATA's {} stars",
            own.stars.len()
        );
    }
    let snr = snr_column(&data, own.stars.len())?;
    let scored: Vec<usize> = (half..own.stars.len()).collect();
    let mut fits = Vec::new();
    for &n in &sizes {
        let fit_on = own.subset(&(0..n).collect::<Vec<_>>());
        for widen in [false, true] {
            let c = Calibration::fit_with(&fit_on, CalibrationMethod::Quantile, widen);
            let label = match (widen, c.width.is_some()) {
                (false, _) => format!("N={n} global maps"),
                (true, true) => format!("N={n} widening + maps"),
                (true, false) => format!("N={n} widening (too few stars: none)"),
            };
            fits.push((label, c));
        }
        // The widening by the noise level alone: without the label scaling the fit has no
        // posterior means to use as covariates.
        let mut noise_only = fit_on.clone();
        noise_only.label_scale.clear();
        let c = Calibration::fit_with(&noise_only, CalibrationMethod::Quantile, true);
        fits.push((format!("N={n} noise-only widening + maps"), c));
    }
    let settings: Vec<PosteriorSettings> = fits
        .iter()
        .map(|(_, c)| Sampler::new(samples, 0).with(Some(c.clone())))
        .collect();
    let evals = evaluate_on_each(&run, &source, &settings)?;
    println!(
        "{} on {} ({} scored stars, {samples} samples)",
        run.display(),
        data.display(),
        scored.len()
    );
    print_line("model's own", &own, &scored, snr.as_deref());
    for ((label, _), e) in fits.iter().zip(&evals) {
        print_line(label, e, &scored, snr.as_deref());
    }
    Ok(())
}

/// The data's `SNR` column (the GALAH layout's eighth), when it has one of the right length.
fn snr_column(data: &std::path::Path, n: usize) -> anyhow::Result<Option<Vec<f64>>> {
    let labels = starflow_data::npy::NpyArray::open(data.join("labels.npy"))?;
    let (rows, cols) = labels.shape2("labels")?;
    if cols < 8 || rows != n {
        return Ok(None);
    }
    let mut all = vec![0f64; rows * cols];
    labels.read_f64_into(0, &mut all);
    Ok(Some((0..n).map(|i| all[i * cols + 7]).collect()))
}

fn print_line(what: &str, e: &Evaluation, scored: &[usize], snr: Option<&[f64]>) {
    let sub = e.subset(scored);
    let snr_sub: Option<Vec<f64>> = snr.map(|s| scored.iter().map(|&i| s[i]).collect());
    let names: Vec<String> = e.labels.iter().map(|l| l.name.clone()).collect();
    let kinds = by_kind(&sub.stars, &names, snr_sub.as_deref());
    let cells = |named: bool| -> usize {
        kinds
            .iter()
            .filter(|k| is_named(k) == named)
            .map(|k| k.cells_within(0.03, 0.02, (0.93, 1.07)))
            .sum()
    };
    let total = |named: bool| -> usize {
        kinds
            .iter()
            .filter(|k| is_named(k) == named)
            .map(|k| k.labels.len())
            .sum()
    };
    let t_eff_68 = |prefix: &str| {
        kinds
            .iter()
            .find(|k| k.kind.starts_with(prefix))
            .map_or(f64::NAN, |k| 100.0 * k.labels[0].coverage_68)
    };
    let nll = sub.star_nll_z.iter().sum::<f64>() / sub.star_nll_z.len().max(1) as f64;
    println!(
        "{what:<40} NLL {nll:>7.3}  named {:>2}/{:<2} other {}/{}  t_eff 68 %: faintest Q {:>5.1}, giants {:>5.1}",
        cells(true),
        total(true),
        cells(false),
        total(false),
        t_eff_68("SNR Q1"),
        t_eff_68("giants"),
    );
}

/// The named kinds: the SNR quarters, giants and dwarfs.
fn is_named(k: &KindCalibration) -> bool {
    k.kind.starts_with("SNR") || k.kind.starts_with("giants") || k.kind.starts_with("dwarfs")
}
