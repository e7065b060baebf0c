//! `cargo xtask bench`: runs the criterion benchmarks of the flows and models crates and prints
//! every figure with, where a stock-candle twin was measured in the same run, the ratio to it.
//!
//! Ratios measured in one run are what we report: absolute times on a shared 2-core machine move
//! by tens of percent from one minute to the next, ratios much less.

use std::path::Path;

use anyhow::{Context, Result};

use crate::{cargo_env, root};

/// Median time in seconds of one criterion benchmark directory.
fn median_s(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("new/estimates.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v["median"]["point_estimate"].as_f64()? * 1e-9)
}

fn fmt_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let stock = !args.iter().any(|a| a == "--no-stock");
    if !args.iter().any(|a| a == "--report") {
        measure(quick, stock)?;
    }
    report()
}

fn measure(quick: bool, stock: bool) -> Result<()> {
    let mut crit = vec!["--"];
    if quick {
        crit.extend(["--warm-up-time", "1", "--measurement-time", "3"]);
    }
    let mut flows = vec!["bench", "-p", "starflow-flows", "--bench", "flows"];
    flows.extend(&crit);
    cargo_env(&flows, &[])?;
    let mut models = vec!["bench", "-p", "starflow-models", "--bench", "bench_main"];
    models.extend(&crit);
    let env: &[(&str, &str)] = if stock {
        &[("STARFLOW_BENCH_STOCK", "1")]
    } else {
        &[]
    };
    cargo_env(&models, env)
}

/// Prints the latest criterion results.
fn report() -> Result<()> {
    let base = root().join("target/criterion");
    let mut rows = Vec::new();
    for group in std::fs::read_dir(&base)
        .with_context(|| format!("no criterion results in {}", base.display()))?
    {
        let group = group?.path();
        for bench in std::fs::read_dir(&group)? {
            let bench = bench?.path();
            if let Some(t) = median_s(&bench) {
                let g = group
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let b = bench
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                rows.push((g, b, t));
            }
        }
    }
    rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    println!(
        "{:<24} {:<28} {:>12} {:>16}",
        "group", "benchmark", "median", "stock / fast"
    );
    for (g, b, t) in &rows {
        let ratio = b.strip_suffix("_fast").and_then(|stem| {
            rows.iter()
                .find(|(g2, b2, _)| g2 == g && *b2 == format!("{stem}_stock"))
                .map(|(_, _, ts)| format!("{:.1}x", ts / t))
        });
        println!(
            "{g:<24} {b:<28} {:>12} {:>16}",
            fmt_time(*t),
            ratio.unwrap_or_default()
        );
    }
    Ok(())
}
