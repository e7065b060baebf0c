//! `cargo xtask ci`: the one test command of the README and of CI.
//!
//! The HDF5 feature needs the system libhdf5; on a developer machine without it the feature's
//! tests are skipped with a notice, while under CI (`CI=true`) its absence is an error, so the
//! feature can never silently stop being tested.
//!
//! The Python package (`crates/python`) is tested the same way: its pytest suite runs against a
//! build made by maturin in a virtualenv under `target/python-ci`, with the tools pinned in
//! `crates/python/requirements-ci.txt` installed from the package index by this step itself.
//! Without a `python3` (>= 3.9) it is skipped with a notice, except under CI.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, root};

fn have_libhdf5() -> bool {
    Command::new("pkg-config")
        .args(["--exists", "hdf5"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The packages and features of the hdf5 steps. The Python crate is selected for its numpy
/// dependency, which switches on num-complex's `std`: without it the shared dependencies' features
/// differ from `cargo test --workspace`'s, and gemm, candle and polars were built a second time
/// (10+ minutes and gigabytes of disk on CI's 2 cores). The cli pulls in every library crate.
const HDF5_SET: [&str; 8] = [
    "-p",
    "starflow-data",
    "-p",
    "starflow-cli",
    "-p",
    "starflow-python",
    "--features",
    "starflow-data/hdf5,starflow-cli/hdf5",
];

pub fn run() -> Result<()> {
    let started = std::time::Instant::now();
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["test", "--workspace"])?;
    let hdf5 = have_libhdf5();
    if hdf5 {
        cargo(
            &[
                &["clippy"][..],
                &HDF5_SET,
                &["--all-targets", "--", "-D", "warnings"],
            ]
            .concat(),
        )?;
        cargo(&[&["test"][..], &HDF5_SET].concat())?;
    } else if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("libhdf5 is not installed, so the hdf5 feature cannot be tested; install libhdf5-dev and pkg-config");
    } else {
        eprintln!("note: libhdf5 not found (pkg-config hdf5); skipping the hdf5 feature's tests. Install libhdf5-dev to run them.");
    }
    python_tests(hdf5)?;
    eprintln!(
        "xtask ci: all checks passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A Python interpreter of at least 3.9: `$STARFLOW_PYTHON`, else `python3`.
fn python() -> Option<String> {
    let exe = std::env::var("STARFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&exe)
        .args([
            "-c",
            "import sys, venv; sys.exit(sys.version_info < (3, 9))",
        ])
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(exe)
}

/// Runs `program args` in the workspace root with `env` added, echoing it; fails on non-zero exit.
fn exec(program: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<()> {
    eprintln!("$ {} {}", program.display(), args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .current_dir(root())
        .status()
        .with_context(|| format!("could not run {}", program.display()))?;
    if !status.success() {
        bail!(
            "`{} {}` failed ({status})",
            program.display(),
            args.join(" ")
        );
    }
    Ok(())
}

/// Builds the Python package into a virtualenv with maturin and runs its pytest suite, which
/// compares the package's predictions with the `starflow` binary of the same build. `hdf5` says
/// whether the test step before built that binary with the hdf5 feature.
fn python_tests(hdf5: bool) -> Result<()> {
    let Some(python) = python() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("python3 (>= 3.9, with venv) is not installed, so the Python package cannot be tested; install python3 and python3-venv");
        }
        eprintln!("note: python3 >= 3.9 not found; skipping the Python package's tests. Install python3 to run them.");
        return Ok(());
    };
    let root = root();
    let venv = root.join("target").join("python-ci");
    let bin = venv.join("bin");
    if !bin.join("python").exists() {
        exec(
            Path::new(&python),
            &["-m", "venv", &venv.to_string_lossy()],
            &[],
        )?;
    }
    exec(
        &bin.join("python"),
        &[
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            "crates/python/requirements-ci.txt",
        ],
        &[],
    )?;
    // The binary as the last test step built it: `-p starflow-cli` alone would unify dependency
    // features differently and rebuild candle and polars (58 crates, measured in CI's log).
    if hdf5 {
        cargo(&[&["build"][..], &HDF5_SET].concat())?;
    } else {
        cargo(&["build", "--workspace"])?;
    }
    let path = std::env::join_paths(std::iter::once(bin.clone()).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .context("PATH")?;
    exec(
        &bin.join("maturin"),
        &["develop", "--quiet", "-m", "crates/python/Cargo.toml"],
        &[("VIRTUAL_ENV", &venv), ("PATH", Path::new(&path))],
    )?;
    let cli = root.join("target").join("debug").join("starflow");
    exec(
        &bin.join("python"),
        &["-m", "pytest", "-q", "crates/python/tests"],
        &[("STARFLOW_CLI", &cli)],
    )
}
