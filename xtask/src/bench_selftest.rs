//! `cargo xtask bench-check --self-test`: shows that the gate's verdict does not depend on the host's
//! cache description and that it still fails on real regressions (issue 28).
//!
//! 1. **Other hosts pass.** For each description of [`HOSTS`] (this project's AMD EPYC and the Intel
//!    Xeon that failed unchanged main), a `/sys/devices/system/cpu` tree is written under
//!    `target/bench-check/hosts/` and bind-mounted over the real one for every counted run (`unshare
//!    --mount`, so root or user namespaces are needed). Every figure is measured and compared with
//!    `results/bench-baseline.json`, which must pass, and the counted binary must report the
//!    baseline's counted cache description.
//! 2. **The stand-in bites.** The same eval_forward/tiny_cnn runs again with the pin lifted
//!    (`counts --see-host-cache`): its peak heap must differ between the two hosts, as it did
//!    between the real machines. Without this, passing 1 could mean the mount never reached gemm.
//! 3. **Regressions fail.** The counted binary is rebuilt with each deliberate regression of the
//!    original gate work, as a feature of the training crate: `gate-probe-kernel` (5 % more work in
//!    the fused block kernel's inner loop) and `gate-probe-alloc` (one extra allocation per optimiser
//!    step). The figures they touch must fail. The normal binary is rebuilt at the end.
//!
//! It takes about 8 minutes on 2 cores after the first build (three full measurements, two rebuilds
//! of the starflow crates).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::bench_check::{
    host_cache, print_table, read_baseline, Counter, Counts, CPU_SYSFS, METRICS,
};
use crate::root;

/// One cache level of a host: sysfs `level`, `type`, `size`, ways, line bytes, and whether every CPU
/// shares it.
struct Level {
    level: u8,
    kind: &'static str,
    size: &'static str,
    ways: u32,
    line: u32,
    shared: bool,
}

/// A host's cache description, as its `/sys/devices/system/cpu/cpuN/cache/indexM` files give it.
struct Host {
    name: &'static str,
    levels: [Level; 4],
}

const fn level(
    level: u8,
    kind: &'static str,
    size: &'static str,
    ways: u32,
    shared: bool,
) -> Level {
    Level {
        level,
        kind,
        size,
        ways,
        line: 64,
        shared,
    }
}

/// The AMD EPYC of this project's 2-core machines (read off one on 2026-12-05) and the Intel Xeon of
/// issue 28 (L1d 48K 12-way, L2 2048K 16-way, L3 491520K 16-way, 64-byte lines), on which unchanged
/// main counted eval_forward/tiny_cnn's peak heap +4.0 %.
const HOSTS: [Host; 2] = [
    Host {
        name: "amd-epyc",
        levels: [
            level(1, "Data", "32K", 8, false),
            level(1, "Instruction", "64K", 4, false),
            level(2, "Unified", "512K", 8, false),
            level(3, "Unified", "8192K", 16, true),
        ],
    },
    Host {
        name: "intel-xeon",
        levels: [
            level(1, "Data", "48K", 12, false),
            level(1, "Instruction", "32K", 8, false),
            level(2, "Unified", "2048K", 16, false),
            level(3, "Unified", "491520K", 16, true),
        ],
    },
];

/// CPUs in the written trees, as on the project's 2-core machines.
const CPUS: usize = 2;

/// The figure whose peak heap moved between the real hosts (one gemm packing buffer).
const CONTROL_FIGURE: &str = "eval_forward/tiny_cnn";

/// Each deliberate regression: the training crate's feature, the figures it touches, and the
/// metric on which at least one of them must fail.
const PROBES: [(&str, &[&str], &str); 2] = [
    (
        "gate-probe-kernel",
        &[
            "eval_forward/cnn",
            "eval_forward/tiny_cnn",
            "train_step/cnn",
            "train_step/tiny_cnn",
        ],
        "instructions",
    ),
    (
        "gate-probe-alloc",
        &["train_step/cnn", "train_step/tiny_cnn"],
        "allocs",
    ),
];

pub fn run() -> Result<()> {
    let baseline = read_baseline(&root().join("results/bench-baseline.json"))?;
    let mut counter = Counter::build(&[])?;
    let figures = counter.figures()?;
    let dir = root().join("target/bench-check/hosts");
    let mut verdicts = Vec::new();
    let mut control = BTreeMap::new();
    for host in &HOSTS {
        let sysfs = write_host(&dir, host)?;
        counter.host_sysfs = Some(sysfs.clone());
        counter.see_host_cache = false;
        require_mount_namespace(&counter, host)?;
        println!(
            "\n== unchanged code on the {} cache description ==",
            host.name
        );
        let measured = counter.measure_all(&figures)?;
        let failures = print_table(&measured, Some(&baseline.figures));
        let env = counter.environment(&host_cache(&sysfs))?;
        let pinned = env.counted_cache == baseline.env.counted_cache;
        verdicts.push((
            format!("{}: unchanged code passes", host.name),
            failures.is_empty() && pinned,
            if pinned {
                format!("{} failing rows; host {}", failures.len(), env.host_cache)
            } else {
                format!(
                    "counted cache `{}`, baseline `{}`",
                    env.counted_cache, baseline.env.counted_cache
                )
            },
        ));
        counter.see_host_cache = true;
        let seen = counter.measure_all(&[CONTROL_FIGURE.to_string()])?;
        control.insert(host.name, seen[CONTROL_FIGURE]);
    }
    verdicts.push(control_verdict(&control));
    for (feature, touched, metric) in PROBES {
        let probe = Counter::build(&[feature])?;
        println!("\n== deliberate regression `{feature}` ==");
        let touched: Vec<String> = touched.iter().map(|s| s.to_string()).collect();
        let measured = probe.measure_all(&touched)?;
        // Against the touched figures' baseline only: the others, not measured here, would
        // fail as missing and make the check vacuous.
        let mut expected = baseline.figures.clone();
        expected.retain(|id, _| touched.contains(id));
        let failures = print_table(&measured, Some(&expected));
        let on_metric = failures.iter().any(|f| f.ends_with(&format!(" {metric}")));
        verdicts.push((
            format!("{feature}: the gate fails on {metric}"),
            on_metric,
            format!("failing: {}", failures.join(", ")),
        ));
    }
    Counter::build(&[])?;
    report(&verdicts)
}

/// Peak heap of the control figure with the pin lifted must differ between the hosts.
fn control_verdict(control: &BTreeMap<&str, Counts>) -> (String, bool, String) {
    let heaps: Vec<String> = control
        .iter()
        .map(|(h, c)| format!("{h} {} B", c.heap_peak_bytes))
        .collect();
    let first = control.values().next().map(|c| c.heap_peak_bytes);
    let differ = control.values().any(|c| Some(c.heap_peak_bytes) != first);
    (
        format!("{CONTROL_FIGURE} unpinned: the hosts' peak heaps differ"),
        differ,
        heaps.join(", "),
    )
}

fn report(verdicts: &[(String, bool, String)]) -> Result<()> {
    println!("\n== bench-check self-test ==");
    for (what, ok, detail) in verdicts {
        println!("{} {what} ({detail})", if *ok { "ok  " } else { "FAIL" });
    }
    let failed = verdicts.iter().filter(|(_, ok, _)| !ok).count();
    let metrics: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
    if failed > 0 {
        bail!(
            "{failed} of {} self-test expectations failed (metrics {})",
            verdicts.len(),
            metrics.join(", ")
        );
    }
    println!(
        "bench-check self-test: all {} expectations met",
        verdicts.len()
    );
    Ok(())
}

/// Writes `host` as a `/sys/devices/system/cpu` tree under `dir/NAME` and returns its path.
fn write_host(dir: &Path, host: &Host) -> Result<PathBuf> {
    let top = dir.join(host.name);
    if top.exists() {
        std::fs::remove_dir_all(&top).with_context(|| format!("clearing {}", top.display()))?;
    }
    for cpu in 0..CPUS {
        for (i, l) in host.levels.iter().enumerate() {
            let index = top.join(format!("cpu{cpu}/cache/index{i}"));
            std::fs::create_dir_all(&index)
                .with_context(|| format!("creating {}", index.display()))?;
            let shared = if l.shared {
                format!("0-{}", CPUS - 1)
            } else {
                cpu.to_string()
            };
            let files = [
                ("level", l.level.to_string()),
                ("type", l.kind.to_string()),
                ("size", l.size.to_string()),
                ("ways_of_associativity", l.ways.to_string()),
                ("coherency_line_size", l.line.to_string()),
                ("shared_cpu_list", shared),
            ];
            for (name, value) in files {
                std::fs::write(index.join(name), format!("{value}\n"))
                    .with_context(|| format!("writing {}", index.join(name).display()))?;
            }
        }
    }
    Ok(top)
}

/// Fails with the fix when this machine cannot mount another host's description over [`CPU_SYSFS`].
fn require_mount_namespace(counter: &Counter, host: &Host) -> Result<()> {
    let sysfs = counter
        .host_sysfs
        .as_ref()
        .context("no host description to mount")?;
    let status = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount --bind \"$0\" {CPU_SYSFS} && test \"$(cat {CPU_SYSFS}/cpu0/cache/index2/size)\" = \"$1\""
        ))
        .arg(sysfs)
        .arg(host.levels[2].size)
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        _ => bail!(
            "the self-test mounts other hosts' cache descriptions over {CPU_SYSFS} in a private mount namespace, which failed here; run it as root (or where `unshare --mount` and `mount --bind` are allowed)"
        ),
    }
}
