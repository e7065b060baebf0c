//! Project automation, run as `cargo xtask <command>` (aliased in `.cargo/config.toml`).
//!
//! xtask shells out to `cargo` rather than linking the model crates, so it compiles in seconds and
//! works even when the library crates do not build.

mod bench;
mod bench_check;
mod bench_selftest;
mod ci;
mod cuda_build;
mod gpu_check;
mod tidy;
mod train_all;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

const HELP: &str = "\
cargo xtask <command>

commands:
  train-all
          train, evaluate and report every flow x backbone into results/<profile>/REPORT.md
          (--profile quick|reference, --data DIR for real files; resumable; see --help)
  ci      rustfmt check, clippy with warnings denied, every test (and the hdf5 feature when
          libhdf5 is installed; required when CI=true)
  cuda-build
          build the CLI and the GPU check with the `cuda` feature on any Linux x86-64 machine (no GPU
          needed): pinned CUDA 13.0 wheels into a cache, binaries in target/cuda/release
          (--compute-cap N, default 90; --cache DIR)
  gpu-check
          gather the GPU check built by cuda-build into target/gpu-check for a GPU machine and print
          how to run it there (--run: run it here, on a machine with an NVIDIA GPU)
  synth   generate the default synthetic data set into data/synth (8,914 stars, seed 42)
  bench   criterion benchmarks of flows and models, each figure with its ratio to stock candle
          measured in the same run (--quick: short measurement; --no-stock: skip the slow stock path;
          --report: print the latest results without measuring)
  bench-check
          performance regression gate on counts, not times: instructions (Valgrind Callgrind),
          allocations and peak heap per unit of work of crates/training/examples/counts.rs,
          compared with results/bench-baseline.json; fails on >0.75 % more instructions, >1 % more
          peak heap, or any extra allocation (--update: re-record the baseline; --figure NAME: one figure;
          --self-test: show the verdict holds on other hosts' cache descriptions and still fails on
          deliberate regressions; needs root for a private mount namespace)
";

/// The workspace root, from this crate's manifest directory.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The value after option `flag` in an argument list (`--flag VALUE`), or an error naming the
/// flag, followed by the command's `help`.
pub fn option_value(
    it: &mut std::slice::Iter<'_, String>,
    flag: &str,
    help: &str,
) -> Result<String> {
    it.next()
        .cloned()
        .with_context(|| format!("{flag} needs a value\n\n{help}"))
}

/// Runs `cargo` with `args` in the workspace root, echoing the command; fails on non-zero exit.
pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_env(args, &[])
}

/// [`cargo`] with extra environment variables.
pub fn cargo_env(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .status()
        .with_context(|| format!("could not run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci::run(),
        Some("train-all") => train_all::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("bench-check") if bench_check::parse(&args[1..]).is_ok_and(|o| o.self_test) => {
            bench_selftest::run()
        }
        Some("bench-check") => bench_check::run(&args[1..]),
        Some("cuda-build") => cuda_build::run(&args[1..]),
        Some("gpu-check") => gpu_check::run(&args[1..]),
        Some("synth") => cargo(&[
            "run",
            "--release",
            "-p",
            "starflow-cli",
            "--",
            "synth",
            "--out",
            "data/synth",
        ]),
        Some("-h" | "--help" | "help") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command `{other}`\n\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
