//! `cargo xtask bench`: runs the criterion benchmarks of the flows and models crates and prints
//! every figure with, where a stock-candle twin was measured in the same run, the ratio to it.
//!
//! Ratios measured in one run are what we report: absolute times on a shared 2-core machine move
//! by tens of percent from one minute to the next, ratios much less.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::{cargo_env, root};

/// The criterion benchmark binaries: (package, bench target).
pub const SUITES: [(&str, &str); 2] = [
    ("starflow-flows", "flows"),
    ("starflow-models", "bench_main"),
];

/// Median time in seconds of one criterion benchmark directory.
pub fn median_s(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("new/estimates.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v["median"]["point_estimate"].as_f64()? * 1e-9)
}

pub fn fmt_time(s: f64) -> String {
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
    let env: &[(&str, &str)] = if stock {
        &[("STARFLOW_BENCH_STOCK", "1")]
    } else {
        &[]
    };
    for (package, bench) in SUITES {
        let mut args = vec!["bench", "-p", package, "--bench", bench];
        args.extend(&crit);
        cargo_env(&args, env)?;
    }
    Ok(())
}

/// Every `<base>/<group>/<bench>` directory that holds a criterion result, as (group, bench, dir).
/// Names are criterion's directory names (a `/` in a benchmark name becomes `_`).
pub fn bench_dirs(base: &Path) -> Result<Vec<(String, String, PathBuf)>> {
    let name = |p: &Path| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let mut out = Vec::new();
    for group in std::fs::read_dir(base)
        .with_context(|| format!("no criterion results in {}", base.display()))?
    {
        let group = group?.path();
        if !group.is_dir() {
            continue;
        }
        for bench in std::fs::read_dir(&group)? {
            let bench = bench?.path();
            if bench.join("new/estimates.json").is_file() {
                out.push((name(&group), name(&bench), bench));
            }
        }
    }
    Ok(out)
}

/// Prints the latest criterion results.
fn report() -> Result<()> {
    let mut rows: Vec<(String, String, f64)> = bench_dirs(&root().join("target/criterion"))?
        .into_iter()
        .filter_map(|(g, b, dir)| Some((g, b, median_s(&dir)?)))
        .collect();
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
