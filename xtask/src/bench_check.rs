//! `cargo xtask bench-check`: the performance regression gate, on counts that do not depend on the
//! machine's load or clock.
//!
//! Wall-clock ratios on a shared 2-core machine moved by 26–45 % between runs of the same commit, so a
//! gate on them could not fail a bad commit without failing good ones (issue 13). This gate counts
//! instead:
//!
//! - **instructions** per unit of work, under Valgrind's Callgrind. Each figure of
//!   `crates/training/examples/counts.rs` (a training step, an eval forward, a flow's log-prob
//!   forward+backward, a posterior draw, a batch read from npy, one synthetic star) runs twice, with 1
//!   and with 2 units; the difference of the two totals is one unit's cost, with start-up, set-up and
//!   first-call initialisation cancelled. Everything runs on one thread, so scheduling cannot move it.
//! - **allocations** and **peak heap bytes** of the last unit, from the example's counting allocator.
//!
//! The counted code is the release build as Valgrind's virtual CPU sees it: Valgrind 3.19 does not
//! emulate AVX-512, so gemm and the fused kernels run their AVX2/FMA paths here, while the same binary
//! runs the AVX-512 paths natively. The gate therefore watches how much work our code does, not the
//! fastest path's speed; `cargo xtask bench` still measures real time, for people.
//!
//! **Host independence** (issue 28). The counts must not depend on which CPU model the gate runs on.
//! Valgrind's virtual CPU answers CPUID the same on every host with the same instruction set, but gemm
//! sizes its blocks from the host's `/sys/devices/system/cpu/*/cache` files first (then `lscpu`, then
//! CPUID): an Intel Xeon with 2 MB of L2 per core counted one more 256 KiB packing buffer than the AMD
//! EPYC that recorded the baseline, and failed unchanged code. The counted binary therefore opens that
//! directory as an empty one (its `opendir` wrapper), so gemm uses its built-in sizes (x86: 32 KiB,
//! 256 KiB, 2 MiB) on every host, without spawning `lscpu` or asking CPUID. The binary reports what
//! gemm used (`counts --cache-info`), and the baseline records it under `measured.counted_cache`
//! beside the host's own (`measured.host_cache`). We pin rather than drop the heap figures so the gate
//! keeps watching gemm's buffers. `--self-test`
//! ([`crate::bench_selftest`]) shows it: unchanged code passes with two other hosts' cache descriptions
//! mounted over the real one, and the deliberate regressions still fail.
//!
//! The figures are compared with `results/bench-baseline.json`: more than [`INSTRUCTION_THRESHOLD`]
//! more instructions, more than [`HEAP_THRESHOLD`] more peak heap, or any extra allocation fails, as
//! does a baseline figure that was not measured. `--update` re-records the baseline on purpose. Every
//! run writes its own figures, in the baseline's format, to [`CURRENT`], so a failing CI job can offer
//! them for review.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{cargo, root};

/// Largest accepted growth of a figure's instruction count (0.0075 = 0.75 %). With the hash-map seeds
/// fixed (see the example's `getrandom`) a baseline and five runs of the same commit, two of them
/// beside another cargo build at load 4, gave identical counts for every figure; before that fix they
/// spread by up to 0.245 %, which set this margin. Extra work on 5 % of the fused block kernel's inner
/// loop moved eval_forward/cnn by +1.64 % and eval_forward/tiny_cnn by +0.98 % (the training steps by
/// +0.38 % and +0.24 %, under the threshold).
pub const INSTRUCTION_THRESHOLD: f64 = 0.0075;

/// Largest accepted growth of a figure's peak heap bytes. Allocation sizes never varied between runs,
/// so any growth is a change of code; 1 % leaves room for another libc's rounding.
pub const HEAP_THRESHOLD: f64 = 0.01;

/// The baseline file and this run's figures, relative to the workspace root.
const BASELINE: &str = "results/bench-baseline.json";
const CURRENT: &str = "target/bench-check/current.json";

/// Format tag of the baseline; bump it when the meaning of a figure changes (other sizes, another
/// counting method, 4: the cache description pinned), which makes every old baseline an error instead
/// of a false comparison.
const FORMAT: &str = "starflow-bench-baseline/4-counts-pinned-cache";

/// The counted binary: an example of the training crate, built in release.
const EXAMPLE: &str = "counts";
const PACKAGE: &str = "starflow-training";

/// The counted binary's whole environment: a fixed string, since the environment's length moves the
/// initial stack's alignment (see [`Counter::callgrind`]).
const COUNTED_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Where Linux describes the CPU caches; the self-test mounts other hosts' descriptions over it.
pub(crate) const CPU_SYSFS: &str = "/sys/devices/system/cpu";

/// One figure's counts for one unit of work.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Counts {
    pub(crate) instructions: u64,
    pub(crate) allocs: u64,
    pub(crate) heap_peak_bytes: u64,
}

/// A compared quantity: its name in the baseline, how it is read off [`Counts`], and what fails it.
pub(crate) struct Metric {
    pub(crate) name: &'static str,
    pub(crate) get: fn(&Counts) -> u64,
    /// Largest accepted relative growth (0 = any growth fails).
    threshold: f64,
}

pub(crate) const METRICS: [Metric; 3] = [
    Metric {
        name: "instructions",
        get: |c| c.instructions,
        threshold: INSTRUCTION_THRESHOLD,
    },
    Metric {
        name: "allocs",
        get: |c| c.allocs,
        threshold: 0.0,
    },
    Metric {
        name: "heap_peak_bytes",
        get: |c| c.heap_peak_bytes,
        threshold: HEAP_THRESHOLD,
    },
];

pub struct Options {
    update: bool,
    pub self_test: bool,
    /// Only these figures (for working on one); the gate proper measures all.
    only: Vec<String>,
}

pub fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        update: false,
        self_test: false,
        only: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--update" => opts.update = true,
            "--self-test" => opts.self_test = true,
            "--figure" => opts
                .only
                .push(it.next().context("--figure needs a figure name")?.clone()),
            other => {
                bail!("unknown option `{other}` (bench-check takes --update, --self-test and --figure NAME)")
            }
        }
    }
    if opts.update && !opts.only.is_empty() {
        bail!("--update records every figure; drop --figure");
    }
    if opts.self_test && (opts.update || !opts.only.is_empty()) {
        bail!("--self-test runs on its own; drop --update and --figure");
    }
    Ok(opts)
}

/// `cargo xtask bench-check`: `--self-test` is [`crate::bench_selftest`]'s (main dispatches
/// it, so neither module reaches into the other both ways); everything else is this check.
pub fn run(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let started = Instant::now();
    let counter = Counter::build(&[])?;
    let mut figures = counter.figures()?;
    if !opts.only.is_empty() {
        if let Some(bad) = opts.only.iter().find(|f| !figures.contains(f)) {
            bail!(
                "unknown figure `{bad}`; the figures are: {}",
                figures.join(", ")
            );
        }
        figures.retain(|f| opts.only.contains(f));
    }
    let measured = counter.measure_all(&figures)?;
    let env = counter.environment(&host_cache(Path::new(CPU_SYSFS)))?;
    let seconds = started.elapsed().as_secs_f64();
    let doc = baseline_doc(&measured, &env, seconds);
    write_atomically(&root().join(CURRENT), &doc)?;
    let path = root().join(BASELINE);
    if opts.update {
        write_atomically(&path, &doc)?;
        print_table(&measured, None);
        println!(
            "bench-check: wrote {} ({} figures, {seconds:.0} s)",
            path.display(),
            measured.len()
        );
        return Ok(());
    }
    let baseline = read_baseline(&path)?.only(&opts.only);
    let failures = print_table(&measured, Some(&baseline.figures));
    println!(
        "bench-check: measured in {seconds:.0} s, load {}",
        loadavg()
    );
    let notes = environment_notes(&baseline.env, &env);
    if failures.is_empty() {
        println!(
            "bench-check: ok: no figure above {BASELINE} by more than {} % instructions, {} % peak heap, or any allocation",
            INSTRUCTION_THRESHOLD * 100.0,
            HEAP_THRESHOLD * 100.0
        );
        if !notes.is_empty() {
            println!("bench-check: {}", notes.join("; "));
        }
        Ok(())
    } else {
        bail!(
            "{} figure(s) regressed or missing: {}\n{}\n(if the change is intended, record it with `cargo xtask bench-check --update` and commit {BASELINE}; this run's figures are in {CURRENT})",
            failures.len(),
            failures.join(", "),
            environment_verdict(&notes)
        )
    }
}

/// What a reader needs to tell a regression from a change of machine: every recorded part of the
/// environment that differs from the baseline's, or that none does.
fn environment_verdict(notes: &[String]) -> String {
    if notes.is_empty() {
        "this run's environment matches the baseline's (CPU model, host and counted cache descriptions, rustc, Valgrind), so the code changed the counts".into()
    } else {
        format!(
            "this run's environment differs from the baseline's: {}.\nThe counted cache description is pinned, so the CPU model or the host's caches alone do not move the figures; another counted cache description, rustc or Valgrind does (re-record the baseline with this environment's tools if that is the cause).",
            notes.join("; ")
        )
    }
}

/// The parts of the environment that can change counts, as recorded under the baseline's `measured`.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Environment {
    pub(crate) machine: String,
    pub(crate) rustc: String,
    pub(crate) valgrind: String,
    /// The host's own cache description, from /sys (what gemm would use without the pin).
    pub(crate) host_cache: String,
    /// The description gemm used in the counted binary (`counts --cache-info` under Valgrind).
    pub(crate) counted_cache: String,
}

impl Environment {
    fn fields(&self) -> [(&'static str, &str); 5] {
        [
            ("CPU", &self.machine),
            ("host cache description", &self.host_cache),
            ("counted cache description", &self.counted_cache),
            ("rustc", &self.rustc),
            ("Valgrind", &self.valgrind),
        ]
    }
}

/// One line per field of `now` that differs from the baseline's (a field the baseline lacks counts as
/// unknown, not as a difference).
pub(crate) fn environment_notes(baseline: &Environment, now: &Environment) -> Vec<String> {
    baseline
        .fields()
        .into_iter()
        .zip(now.fields())
        .filter(|((_, b), (_, n))| !b.is_empty() && b != n)
        .map(|((name, b), (_, n))| format!("{name} `{n}` (baseline `{b}`)"))
        .collect()
}

/// The host's cache description as gemm would read it from `dir` (a `/sys/devices/system/cpu`): data
/// and unified caches of `cpu0`, as `L1d 32K 8-way, L2 512K 8-way, L3 8192K 16-way`; `unknown` when
/// the files cannot be read.
pub(crate) fn host_cache(dir: &Path) -> String {
    let cache = dir.join("cpu0/cache");
    let Ok(entries) = std::fs::read_dir(&cache) else {
        return "unknown".into();
    };
    let mut levels: Vec<(String, String)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("index"))
        .filter_map(|e| {
            let read = |f: &str| {
                std::fs::read_to_string(e.path().join(f))
                    .ok()
                    .map(|s| s.trim().to_string())
            };
            let kind = read("type")?;
            if kind == "Instruction" {
                return None;
            }
            let level = read("level")?;
            let name = if kind == "Data" {
                format!("L{level}d")
            } else {
                format!("L{level}")
            };
            let ways = read("ways_of_associativity").unwrap_or_else(|| "?".into());
            let line = read("coherency_line_size").unwrap_or_else(|| "?".into());
            let size = read("size")?;
            Some((
                name.clone(),
                format!("{name} {size} {ways}-way {line}-byte lines"),
            ))
        })
        .collect();
    if levels.is_empty() {
        return "unknown".into();
    }
    levels.sort();
    levels
        .into_iter()
        .map(|(_, d)| d)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the counted binary under Callgrind, in the one environment the baseline was counted in.
pub(crate) struct Counter {
    binary: PathBuf,
    /// Valgrind's absolute path: the counted environment's PATH names no directory.
    valgrind: PathBuf,
    valgrind_version: String,
    /// Another host's cache description, bind-mounted over [`CPU_SYSFS`] in a private mount namespace
    /// for every run (the self-test's stand-in for another machine); `None` runs on this host's.
    pub(crate) host_sysfs: Option<PathBuf>,
    /// Let the binary read [`CPU_SYSFS`] (`counts --see-host-cache`): the self-test's control.
    pub(crate) see_host_cache: bool,
}

impl Counter {
    /// Builds the counted binary in release with `features` of the training crate.
    pub(crate) fn build(features: &[&str]) -> Result<Counter> {
        let (valgrind, valgrind_version) = find_valgrind()?;
        let mut args = vec!["build", "--release", "-p", PACKAGE, "--example", EXAMPLE];
        let joined = features.join(",");
        if !features.is_empty() {
            args.extend(["--features", &joined]);
        }
        cargo(&args)?;
        Ok(Counter {
            binary: target_dir().join("release/examples").join(EXAMPLE),
            valgrind,
            valgrind_version,
            host_sysfs: None,
            see_host_cache: false,
        })
    }

    pub(crate) fn figures(&self) -> Result<Vec<String>> {
        let out = Command::new(&self.binary)
            .arg("--list")
            .output()
            .with_context(|| format!("running {} --list", self.binary.display()))?;
        if !out.status.success() {
            bail!("{} --list failed ({})", self.binary.display(), out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// This run's environment; `host_cache` is the description the host offers (see [`host_cache`]).
    pub(crate) fn environment(&self, host_cache: &str) -> Result<Environment> {
        let (_, stdout) = self.callgrind(&["--cache-info"])?;
        let info: Value = last_json(&stdout)?;
        let counted_cache = info["gemm_cache"]
            .as_array()
            .context("`counts --cache-info` printed no `gemm_cache`")?
            .iter()
            .map(|l| {
                format!(
                    "L{} {}K {}-way {}-byte lines",
                    l["level"],
                    l["bytes"].as_u64().unwrap_or(0) / 1024,
                    l["ways"],
                    l["line"]
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Environment {
            machine: machine(),
            rustc: command_output("rustc", &["--version"]).unwrap_or_else(|| "unknown".into()),
            valgrind: self.valgrind_version.clone(),
            host_cache: host_cache.to_string(),
            counted_cache,
        })
    }

    /// Measures every figure, two Valgrind processes at a time (each is single-threaded, and counts do
    /// not depend on what runs beside them).
    pub(crate) fn measure_all(&self, figures: &[String]) -> Result<BTreeMap<String, Counts>> {
        let queue = Mutex::new(figures.iter());
        let results = Mutex::new(Vec::new());
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let Some(figure) = queue.lock().unwrap_or_else(|e| e.into_inner()).next() else {
                        return;
                    };
                    let counted = self.measure(figure);
                    if let Ok(c) = &counted {
                        eprintln!(
                            "bench-check: {figure}: {} instructions, {} allocations, {} B peak heap",
                            c.instructions, c.allocs, c.heap_peak_bytes
                        );
                    }
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((figure.clone(), counted));
                });
            }
        });
        let mut out = BTreeMap::new();
        for (figure, counted) in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
            out.insert(
                figure.clone(),
                counted.with_context(|| format!("figure {figure}"))?,
            );
        }
        Ok(out)
    }

    /// One figure: instructions of 2 units minus those of 1, and the heap counts of the second unit.
    fn measure(&self, figure: &str) -> Result<Counts> {
        let (one, _) = self.units(figure, 1)?;
        let (two, heap) = self.units(figure, 2)?;
        let instructions = two.checked_sub(one).with_context(|| {
            format!("two units counted fewer instructions ({two}) than one ({one})")
        })?;
        Ok(Counts {
            instructions,
            allocs: heap.0,
            heap_peak_bytes: heap.1,
        })
    }

    /// `counts FIGURE UNITS`: the instructions Callgrind counted and the (allocations, peak heap
    /// bytes) the binary reported for its last unit.
    fn units(&self, figure: &str, units: usize) -> Result<(u64, (u64, u64))> {
        let units = units.to_string();
        let mut args = vec![figure, &units];
        if self.see_host_cache {
            args.insert(0, "--see-host-cache");
        }
        let (instructions, stdout) = self.callgrind(&args)?;
        let report = last_json(&stdout)?;
        let field = |k: &str| {
            report[k]
                .as_u64()
                .with_context(|| format!("report has no `{k}`: {report}"))
        };
        Ok((instructions, (field("allocs")?, field("heap_peak_bytes")?)))
    }

    /// Runs the binary with `args` under Callgrind; returns the instructions it counted and its stdout.
    ///
    /// Callgrind also counts any child process before its `exec`; only the counted process's own
    /// total (the `Collected` line with the PID of its `Command:` line) is taken.
    ///
    /// The binary runs with a fixed environment (only `PATH=`[`COUNTED_PATH`]) and a fixed `argv[0]`
    /// (`./counts`, from its own directory): the environment strings and the program path sit on the
    /// initial stack, so their length moves the stack's alignment and with it the instruction count of
    /// alignment-sensitive copies. Before this, the same binary counted up to 0.33 % differently with
    /// `CI=true` set, or from another checkout path. With [`Counter::host_sysfs`] the same command runs
    /// through `unshare --mount`, which mounts that directory over [`CPU_SYSFS`] first and then
    /// replaces itself with `env -i` and Valgrind, so the counted process's environment is the same.
    fn callgrind(&self, args: &[&str]) -> Result<(u64, String)> {
        let dir = self
            .binary
            .parent()
            .context("the counts binary has no directory")?;
        let name = self
            .binary
            .file_name()
            .and_then(|n| n.to_str())
            .context("the counts binary has no name")?;
        let mut valgrind_args: Vec<String> = vec![
            "--tool=callgrind".into(),
            "--callgrind-out-file=/dev/null".into(),
            format!("./{name}"),
        ];
        valgrind_args.extend(args.iter().map(|a| a.to_string()));
        let mut cmd = match &self.host_sysfs {
            None => {
                let mut cmd = Command::new(&self.valgrind);
                cmd.env_clear().env("PATH", COUNTED_PATH);
                cmd
            }
            Some(host) => {
                let mut cmd = Command::new("unshare");
                cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .arg(format!(
                        "mount --bind \"$0\" {CPU_SYSFS} && exec env -i PATH={COUNTED_PATH} \"$@\""
                    ))
                    .arg(host)
                    .arg(&self.valgrind);
                cmd
            }
        };
        let out = cmd
            .args(&valgrind_args)
            .current_dir(dir)
            .output()
            .context("running valgrind")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "valgrind {} {} failed ({}):\n{stderr}",
                self.binary.display(),
                args.join(" "),
                out.status
            );
        }
        let instructions = collected(&stderr).with_context(|| {
            format!("no `Collected :` line of the counted process in Callgrind's output:\n{stderr}")
        })?;
        Ok((
            instructions,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }
}

/// The instructions Callgrind collected for the process it started (`==PID== Command: ...`), not for
/// a child it forked.
fn collected(stderr: &str) -> Option<u64> {
    let main = stderr.lines().find_map(|l| {
        let (pid, rest) = pid_of(l)?;
        rest.trim_start().starts_with("Command:").then_some(pid)
    })?;
    stderr.lines().find_map(|l| {
        let (pid, rest) = pid_of(l)?;
        let n = rest.trim_start().strip_prefix("Collected :")?;
        (pid == main).then(|| n.trim().parse().ok()).flatten()
    })
}

/// `==PID== rest` split into its PID and the rest.
fn pid_of(line: &str) -> Option<(&str, &str)> {
    line.strip_prefix("==")?.split_once("==")
}

/// The last line of `stdout` that is a JSON value.
fn last_json(stdout: &str) -> Result<Value> {
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("no JSON report on the binary's stdout:\n{stdout}"))
}

/// Valgrind's absolute path (from this process's PATH) and `valgrind --version`, or an error that
/// says how to install it.
fn find_valgrind() -> Result<(PathBuf, String)> {
    let install = "bench-check counts instructions under Valgrind, which is not installed; install it (Debian/Ubuntu: `apt-get install valgrind`)";
    let path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("valgrind"))
        .find(|p| p.is_file())
        .context(install)?;
    let out = Command::new(&path).arg("--version").output();
    match out {
        Ok(o) if o.status.success() => {
            Ok((path, String::from_utf8_lossy(&o.stdout).trim().to_string()))
        }
        _ => bail!(install),
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root().join(p) })
        .unwrap_or_else(|| root().join("target"))
}

/// A baseline file: its figures and the environment they were counted in.
pub(crate) struct Baseline {
    pub(crate) figures: BTreeMap<String, Counts>,
    pub(crate) env: Environment,
}

impl Baseline {
    /// Only the figures in `only` (all when it is empty).
    fn only(mut self, only: &[String]) -> Baseline {
        if !only.is_empty() {
            self.figures.retain(|id, _| only.contains(id));
        }
        self
    }
}

/// The baseline's figures.
pub(crate) fn read_baseline(path: &Path) -> Result<Baseline> {
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
    let figures = figures
        .iter()
        .map(|(id, f)| {
            let get = |k: &str| {
                f[k].as_u64().with_context(|| {
                    format!("{}: figure {id} has no integer `{k}`", path.display())
                })
            };
            let counts = Counts {
                instructions: get("instructions")?,
                allocs: get("allocs")?,
                heap_peak_bytes: get("heap_peak_bytes")?,
            };
            Ok((id.clone(), counts))
        })
        .collect::<Result<_>>()?;
    let m = &v["measured"];
    let text = |k: &str| m[k].as_str().unwrap_or_default().to_string();
    let env = Environment {
        machine: text("machine"),
        rustc: text("rustc"),
        valgrind: text("valgrind"),
        host_cache: text("host_cache"),
        counted_cache: text("counted_cache"),
    };
    Ok(Baseline { figures, env })
}

/// Prints figure / baseline / now / change for every metric and returns the `figure metric` ids that fail.
pub(crate) fn print_table(
    figures: &BTreeMap<String, Counts>,
    baseline: Option<&BTreeMap<String, Counts>>,
) -> Vec<String> {
    let mut failures = Vec::new();
    println!(
        "{:<52} {:>14} {:>14} {:>9}  status",
        "figure (per unit)", "baseline", "now", "change"
    );
    for (id, now) in figures {
        for m in &METRICS {
            let n = (m.get)(now);
            let row = format!("{id} {}", m.name);
            let (base, change, status) = match baseline.map(|b| b.get(id)) {
                None => (String::new(), String::new(), "recorded".to_string()),
                Some(None) => ("-".into(), String::new(), "new (not in baseline)".into()),
                Some(Some(b)) => {
                    let b = (m.get)(b);
                    let change = relative_change(b, n);
                    let status = if change > m.threshold {
                        failures.push(row.clone());
                        format!("FAIL: more than +{} %", m.threshold * 100.0)
                    } else if change < -m.threshold.max(0.01) {
                        "lower: consider --update".into()
                    } else {
                        "ok".into()
                    };
                    (b.to_string(), format!("{:+.3} %", change * 100.0), status)
                }
            };
            println!("{row:<52} {base:>14} {n:>14} {change:>9}  {status}");
        }
    }
    if let Some(baseline) = baseline {
        for id in baseline.keys().filter(|id| !figures.contains_key(*id)) {
            failures.push(id.clone());
            println!(
                "{id:<52} {:>14} {:>14} {:>9}  FAIL: not measured",
                "", "-", ""
            );
        }
    }
    failures
}

/// `now / base - 1`, with a zero baseline counting any growth as +100 %.
fn relative_change(base: u64, now: u64) -> f64 {
    if base == 0 {
        if now == 0 {
            0.0
        } else {
            1.0
        }
    } else {
        now as f64 / base as f64 - 1.0
    }
}

fn baseline_doc(figures: &BTreeMap<String, Counts>, env: &Environment, seconds: f64) -> Value {
    let figures: serde_json::Map<String, Value> = figures
        .iter()
        .map(|(id, c)| {
            let entry = json!({
                "instructions": c.instructions,
                "allocs": c.allocs,
                "heap_peak_bytes": c.heap_peak_bytes,
            });
            (id.clone(), entry)
        })
        .collect();
    json!({
        "format": FORMAT,
        "about": "Written by `cargo xtask bench-check --update`, read by `cargo xtask bench-check` (xtask/src/bench_check.rs). \
            Each figure is one unit of work of crates/training/examples/counts.rs (its doc comment and constants give the \
            sizes), built in release and run on one thread. `instructions`: Callgrind's count for 2 units minus 1 unit. \
            `allocs` and `heap_peak_bytes`: allocations and peak live heap above the unit's start, of the second unit, from \
            the example's counting allocator. bench-check fails on more instructions or peak heap than the thresholds allow, \
            on any extra allocation, and on a figure here that was not measured. Counts depend on the compiler, the \
            Valgrind version and the instruction set Valgrind emulates, recorded under `measured`; not on the host's cache \
            sizes: the counted binary hides them from gemm, which then sizes its blocks from its built-in defaults \
            (`measured.counted_cache`; the host's own is `measured.host_cache`). \
            Re-record on purpose after an intended change, and commit this file.",
        "threshold_pct": {
            "instructions": INSTRUCTION_THRESHOLD * 100.0,
            "allocs": 0.0,
            "heap_peak_bytes": HEAP_THRESHOLD * 100.0,
        },
        "measured": {
            "commit": git_commit(),
            "date_utc": date_utc(),
            "machine": env.machine,
            "rustc": env.rustc,
            "valgrind": env.valgrind,
            "host_cache": env.host_cache,
            "counted_cache": env.counted_cache,
            "seconds": seconds.round(),
        },
        "figures": figures,
    })
}

/// Writes a JSON document through a temporary file, fsync and a rename, so an interrupted run never
/// leaves a truncated file behind.
fn write_atomically(path: &Path, doc: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(doc)? + "\n";
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
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

/// The 1/5/15-minute load averages, to show the counts did not care.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collected_reads_the_counted_process_not_a_forked_child() {
        let stderr = "==100== Callgrind, a call-graph generating cache profiler\n\
            ==100== Command: ./counts train_step/cnn 1\n\
            ==101== Events    : Ir\n\
            ==101== Collected : 6938608\n\
            ==100== Events    : Ir\n\
            ==100== Collected : 88861629\n";
        assert_eq!(collected(stderr), Some(88_861_629));
        assert_eq!(collected("==100== Collected : 5\n"), None);
    }

    #[test]
    fn environment_notes_name_each_difference_and_skip_unrecorded_fields() {
        let base = Environment {
            machine: "AMD EPYC, 2 logical cores, linux".into(),
            rustc: "rustc 1.95.0".into(),
            valgrind: "valgrind-3.19.0".into(),
            host_cache: "L2 512K".into(),
            counted_cache: String::new(),
        };
        let now = Environment {
            machine: "Intel Xeon, 2 logical cores, linux".into(),
            host_cache: "L2 2048K".into(),
            counted_cache: "L2 256K".into(),
            ..base.clone()
        };
        let notes = environment_notes(&base, &now);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("CPU `Intel Xeon"), "{notes:?}");
        assert!(notes[1].contains("host cache description `L2 2048K` (baseline `L2 512K`)"));
        assert!(environment_verdict(&notes).contains("differs from the baseline's"));
        assert!(environment_notes(&base, &base).is_empty());
        assert!(environment_verdict(&[]).contains("the code changed the counts"));
    }

    #[test]
    fn host_cache_reads_data_and_unified_levels_of_cpu0() {
        let dir = std::env::temp_dir().join(format!("xtask-host-cache-{}", std::process::id()));
        for (i, (level, kind, size, ways)) in [
            (1, "Data", "48K", 12),
            (1, "Instruction", "32K", 8),
            (2, "Unified", "2048K", 16),
            (3, "Unified", "491520K", 16),
        ]
        .into_iter()
        .enumerate()
        {
            let index = dir.join(format!("cpu0/cache/index{i}"));
            std::fs::create_dir_all(&index).unwrap();
            for (name, value) in [
                ("level", level.to_string()),
                ("type", kind.to_string()),
                ("size", size.to_string()),
                ("ways_of_associativity", ways.to_string()),
                ("coherency_line_size", "64".to_string()),
            ] {
                std::fs::write(index.join(name), value + "\n").unwrap();
            }
        }
        let described = host_cache(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            described,
            "L1d 48K 12-way 64-byte lines, L2 2048K 16-way 64-byte lines, L3 491520K 16-way 64-byte lines"
        );
        assert_eq!(host_cache(Path::new("/nonexistent/cpu")), "unknown");
    }
}
