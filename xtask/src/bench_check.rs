//! `cargo xtask bench-check`: catches performance regressions in CI without trusting absolute times.
//!
//! It runs the criterion benchmarks of the flows and models crates ([`bench::SUITES`]) in a short mode
//! (batch 16, one thread, see [`BENCH_ENV`]) with paired measurement: every criterion sample times the
//! benchmark and then a fixed reference kernel (a 256x256 f32 candle matmul) for about as long, and
//! records their ratio (`crates/flows/benches/common/paired.rs`). Whatever slows the machine at that
//! moment slows both halves and cancels; a change to starflow's own code moves only the figure. The
//! median ratios are compared with `results/bench-baseline.json`: a figure whose ratio grew by more than
//! [`THRESHOLD`] fails the check, as does a baseline figure that was not measured (a renamed or deleted
//! benchmark must be re-baselined on purpose). `--update` measures and rewrites the baseline instead
//! (atomically); `--no-run` compares the latest bench-check results without measuring.
//!
//! Criterion writes into its own directory here ([`CRITERION_DIR`], through `CRITERION_HOME`), so the
//! paired figures never mix with the plain times of `cargo xtask bench`, and only results written during
//! this run are compared, so a stale one never counts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::bench::{bench_dirs, median_s, SUITES};
use crate::{cargo_env, root};

/// Largest accepted growth of a figure's ratio to the reference (0.25 = 25 % slower), as issue #7 asks.
/// Three runs against one baseline on the 2-core development machine, at a load average of 6 (other
/// builds), moved every figure by -15.6 % to +16.3 %; a kernel doing its work three times read +86 %.
pub const THRESHOLD: f64 = 0.25;

/// The baseline file, relative to the workspace root.
const BASELINE: &str = "results/bench-baseline.json";

/// Criterion's output directory for bench-check, relative to the workspace root.
const CRITERION_DIR: &str = "target/criterion-check";

/// Format tag of the baseline; bump it when the meaning of a ratio changes (a new reference kernel,
/// other benchmark sizes), which makes every old baseline an error instead of a false comparison.
const FORMAT: &str = "starflow-bench-baseline/2-paired";

/// Short-mode criterion flags. The backbone and ops groups take 10 samples; criterion falls back to one
/// iteration per sample when they do not fit, so their time is set by the iteration time.
const CRITERION_ARGS: [&str; 4] = ["--warm-up-time", "1", "--measurement-time", "2"];

/// Benchmark sizes and threads, pinned so that a developer's environment cannot change what is measured
/// (and the stock-candle path, minutes per run, stays off). Batch 16 instead of 64 keeps a CNNModel
/// training step at a fraction of a second. One thread, like the reference kernel, because a parallel
/// kernel on a shared 2-core machine waits for its slowest thread: one busy core (another engineer's
/// build) halves its speed but not a one-thread reference's. The price is that a regression in how work
/// is split across threads is not seen here (`cargo xtask bench` measures that).
const BENCH_ENV: [(&str, &str); 5] = [
    ("STARFLOW_BENCH_PAIRED", "1"),
    ("STARFLOW_BENCH_STOCK", "0"),
    ("STARFLOW_BENCH_BATCH", "16"),
    ("STARFLOW_BENCH_LEN", "16384"),
    ("RAYON_NUM_THREADS", "1"),
];

/// What a paired criterion "time" of one second means: the figure took this many reference runs (the
/// `NOMINAL` of `paired.rs`, 1 ms per reference run).
const NOMINAL_S: f64 = 1e-3;

/// One measured figure: its median ratio to the reference kernel, and the spread of its samples.
#[derive(Clone, Debug)]
struct Figure {
    ratio: f64,
    /// Fastest and slowest sample, as ratios: how much the pairing left of the noise.
    range: (f64, f64),
}

pub fn run(args: &[String]) -> Result<()> {
    let update = args.iter().any(|a| a == "--update");
    let no_run = args.iter().any(|a| a == "--no-run");
    if let Some(bad) = args
        .iter()
        .find(|a| !matches!(a.as_str(), "--update" | "--no-run"))
    {
        bail!("unknown option `{bad}` (bench-check takes --update and --no-run)");
    }
    let started = Instant::now();
    let figures = if no_run {
        criterion_results(None)?
    } else {
        measure()?
    };
    let measured_in = started.elapsed().as_secs_f64();
    let path = root().join(BASELINE);
    if update {
        write_baseline(&path, &figures, measured_in)?;
        print_table(&figures, None);
        println!(
            "bench-check: wrote {} ({} figures, measured in {measured_in:.0} s)",
            path.display(),
            figures.len()
        );
        return Ok(());
    }
    let baseline = read_baseline(&path)?;
    let failures = print_table(&figures, Some(&baseline));
    if !no_run {
        println!(
            "bench-check: measured in {measured_in:.0} s, load {}",
            loadavg()
        );
    }
    if failures.is_empty() {
        println!(
            "bench-check: ok, no figure more than {:.0} % slower than {BASELINE} relative to its reference kernel",
            THRESHOLD * 100.0
        );
        Ok(())
    } else {
        bail!(
            "{} figure(s) regressed or missing: {}\n(if the change is intended, record it with `cargo xtask bench-check --update` and commit {BASELINE})",
            failures.len(),
            failures.join(", ")
        )
    }
}

/// Runs every suite in short mode and returns the figures measured.
fn measure() -> Result<BTreeMap<String, Figure>> {
    raise_priority();
    // Criterion's files carry nanosecond mtimes; anything written after this instant is this run's.
    let since = SystemTime::now();
    let home = root().join(CRITERION_DIR);
    let home = home.to_str().context("non-UTF-8 workspace path")?;
    let mut env = BENCH_ENV.to_vec();
    env.push(("CRITERION_HOME", home));
    for (package, bench) in SUITES {
        let mut args = vec!["bench", "-p", package, "--bench", bench, "--"];
        args.extend(CRITERION_ARGS);
        cargo_env(&args, &env)?;
    }
    criterion_results(Some(since))
}

/// Asks the scheduler to favour this process and the benchmarks it starts (children inherit the nice
/// value), so that fewer samples are interrupted by other builds on a shared machine. Best effort:
/// without the privilege (a normal user) it only says so; the pairing copes either way.
fn raise_priority() {
    let pid = std::process::id().to_string();
    let ok = Command::new("renice")
        .args(["-n", "-10", "-p", &pid])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("bench-check: could not raise the priority (renice -n -10 needs root); measuring at normal priority");
    }
}

/// Every `<CRITERION_DIR>/<group>/<bench>` figure (`group/bench`, criterion's directory names), optionally
/// only those written after `since`.
fn criterion_results(since: Option<SystemTime>) -> Result<BTreeMap<String, Figure>> {
    let mut out = BTreeMap::new();
    for (group, bench, dir) in bench_dirs(&root().join(CRITERION_DIR))? {
        let Ok(written) =
            std::fs::metadata(dir.join("new/estimates.json")).and_then(|m| m.modified())
        else {
            continue;
        };
        if since.is_some_and(|s| written < s) {
            continue;
        }
        if let (Some(range), Some(median)) = (sample_range_s(&dir), median_s(&dir)) {
            let figure = Figure {
                ratio: median / NOMINAL_S,
                range: (range.0 / NOMINAL_S, range.1 / NOMINAL_S),
            };
            out.insert(format!("{group}/{bench}"), figure);
        }
    }
    if out.is_empty() {
        bail!("no benchmark results in {CRITERION_DIR}; run `cargo xtask bench-check` first");
    }
    Ok(out)
}

/// The fastest and slowest per-iteration value among a benchmark's criterion samples (`new/sample.json`).
fn sample_range_s(dir: &Path) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(dir.join("new/sample.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let iters = v["iters"].as_array()?;
    let times = v["times"].as_array()?;
    let per: Vec<f64> = iters
        .iter()
        .zip(times)
        .filter_map(|(n, t)| Some(t.as_f64()? / n.as_f64()? * 1e-9))
        .filter(|t| t.is_finite() && *t > 0.0)
        .collect();
    let lo = per.iter().copied().min_by(f64::total_cmp)?;
    let hi = per.iter().copied().max_by(f64::total_cmp)?;
    Some((lo, hi))
}

/// The baseline's figures: id → ratio.
fn read_baseline(path: &Path) -> Result<BTreeMap<String, f64>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "no baseline at {}; record one with `cargo xtask bench-check --update`",
            path.display()
        )
    })?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    if v["format"] != FORMAT {
        bail!(
            "{} has format {}, this xtask reads {FORMAT}; re-record it with `cargo xtask bench-check --update`",
            path.display(),
            v["format"]
        );
    }
    let figures = v["figures"]
        .as_object()
        .with_context(|| format!("{} has no `figures` object", path.display()))?;
    figures
        .iter()
        .map(|(id, f)| {
            let ratio = f["ratio"]
                .as_f64()
                .filter(|r| r.is_finite() && *r > 0.0)
                .with_context(|| {
                    format!("{}: figure {id} has no positive `ratio`", path.display())
                })?;
            Ok((id.clone(), ratio))
        })
        .collect()
}

/// Prints figure / baseline ratio / current ratio / change and returns the ids that fail.
fn print_table(
    figures: &BTreeMap<String, Figure>,
    baseline: Option<&BTreeMap<String, f64>>,
) -> Vec<String> {
    let mut failures = Vec::new();
    println!(
        "{:<44} {:>10} {:>10} {:>9} {:>19}  status",
        "figure (ratio to reference)", "baseline", "current", "change", "samples min-max"
    );
    for (id, f) in figures {
        let (base, change, status) = match baseline.map(|b| b.get(id)) {
            None => (String::new(), String::new(), "recorded".to_string()),
            Some(None) => ("-".into(), String::new(), "new (not in baseline)".into()),
            Some(Some(b)) => {
                let change = f.ratio / b - 1.0;
                let status = if change > THRESHOLD {
                    failures.push(id.clone());
                    format!("FAIL: > {:.0} % slower", THRESHOLD * 100.0)
                } else if change < -THRESHOLD {
                    "faster: consider --update".into()
                } else {
                    "ok".into()
                };
                (fmt_ratio(*b), format!("{:+.1} %", change * 100.0), status)
            }
        };
        let range = format!("{}-{}", fmt_ratio(f.range.0), fmt_ratio(f.range.1));
        println!(
            "{id:<44} {base:>10} {:>10} {change:>9} {range:>19}  {status}",
            fmt_ratio(f.ratio)
        );
    }
    if let Some(baseline) = baseline {
        for (id, b) in baseline {
            if !figures.contains_key(id) {
                failures.push(id.clone());
                println!(
                    "{id:<44} {:>10} {:>10} {:>9} {:>19}  FAIL: not measured",
                    fmt_ratio(*b),
                    "-",
                    "",
                    ""
                );
            }
        }
    }
    failures
}

/// Four significant digits, without an exponent for the ratios we meet (0.01 to 10^4).
fn fmt_ratio(r: f64) -> String {
    let decimals = (3 - r.abs().max(1e-9).log10().floor() as i32).clamp(0, 6) as usize;
    format!("{r:.decimals$}")
}

/// Writes the baseline through a temporary file and a rename, so an interrupted `--update` never leaves
/// a truncated baseline behind.
fn write_baseline(path: &Path, figures: &BTreeMap<String, Figure>, measured_in: f64) -> Result<()> {
    let figures: serde_json::Map<String, Value> = figures
        .iter()
        .map(|(id, f)| {
            let entry = json!({
                "ratio": round(f.ratio),
                "samples_min": round(f.range.0),
                "samples_max": round(f.range.1),
            });
            (id.clone(), entry)
        })
        .collect();
    let doc = json!({
        "format": FORMAT,
        "about": "Written by `cargo xtask bench-check --update`, read by `cargo xtask bench-check` (xtask/src/bench_check.rs). \
            Each figure is a criterion benchmark `group/bench` (criterion's directory names) of the flows and models \
            benches, run in bench-check's short mode (env and criterion_args below) with paired measurement \
            (crates/flows/benches/common/paired.rs): each criterion sample times the benchmark, then a fixed 256x256 \
            f32 candle matmul (the reference kernel) for about as long. `ratio` is the median over samples of \
            benchmark time / reference time, so machine speed and load cancel; samples_min/max show the spread. \
            bench-check fails when a current ratio exceeds the baseline ratio by more than threshold_pct, or when a \
            figure here is not measured. Re-record on purpose after an intended speed change, and commit this file.",
        "threshold_pct": THRESHOLD * 100.0,
        "criterion_args": CRITERION_ARGS,
        "env": BENCH_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "measured": {
            "commit": git_commit(),
            "date_utc": date_utc(),
            "machine": machine(),
            "load_average_after": loadavg(),
            "seconds": measured_in.round(),
        },
        "figures": figures,
    });
    let text = serde_json::to_string_pretty(&doc)? + "\n";
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".bench-baseline.json.{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Four significant digits: enough for a 25 % threshold, and keeps baseline diffs readable.
fn round(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(3 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `HEAD`'s short hash, marked `-dirty` when the work tree differs from it.
fn git_commit() -> String {
    let Some(hash) = command_output("git", &["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty = command_output("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{hash}-dirty")
    } else {
        hash
    }
}

fn date_utc() -> String {
    command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_else(|| "unknown".into())
}

/// CPU model and logical core count, from /proc/cpuinfo where there is one.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} logical cores, {}", std::env::consts::OS)
}

/// The 1/5/15-minute load averages, to judge how busy the machine was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}
