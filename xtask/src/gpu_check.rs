//! `cargo xtask gpu-check`: prepares what a lent GPU machine must be given, or runs it there.
//!
//! A lent GPU machine gets minutes and a copy of the working tree; it has no CUDA compiler and may
//! have no Rust. So the check is built here (`cargo xtask cuda-build`) and this command gathers
//! what must travel into one folder, `target/gpu-check/`: the `starflow-gpu-check` binary,
//! stripped (the device tool carries at most 64 MiB). The folder and the tracked
//! `crates/gpu-check/run.sh` (which finds the machine's CUDA 13 libraries and writes the results
//! folder) are all the machine needs. `--run` runs it on this machine, for a developer who has a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::root;

/// What the device tool may carry, in all.
pub const CARRY_LIMIT: u64 = 64 << 20;
/// The folder the machine is given, relative to the repository root.
pub const PACK_DIR: &str = "target/gpu-check";
const BIN: &str = "starflow-gpu-check";

const HELP: &str = "\
cargo xtask gpu-check [--bin FILE] [--run [--out DIR]]

Gathers the GPU check into target/gpu-check (the stripped starflow-gpu-check that `cargo xtask
cuda-build` made, default target/cuda/release/starflow-gpu-check) and prints how to run it on a
GPU machine: carry target/gpu-check, run `bash crates/gpu-check/run.sh OUT` in the repository root.
--run: run it here as well (a machine with an NVIDIA GPU), results in DIR (default
results/gpu-check).
";

#[derive(Debug, PartialEq)]
struct Options {
    bin: PathBuf,
    run: bool,
    out: PathBuf,
}

fn parse(args: &[String], root: &Path) -> Result<Option<Options>> {
    let mut o = Options {
        bin: root.join("target/cuda/release").join(BIN),
        run: false,
        out: root.join("results/gpu-check"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || crate::option_value(&mut it, a, HELP);
        match a.as_str() {
            "--bin" => o.bin = PathBuf::from(value()?),
            "--out" => o.out = PathBuf::from(value()?),
            "--run" => o.run = true,
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(None);
            }
            other => bail!("unknown argument `{other}`\n\n{HELP}"),
        }
    }
    Ok(Some(o))
}

pub fn run(args: &[String]) -> Result<()> {
    let root = root();
    let Some(opts) = parse(args, &root)? else {
        return Ok(());
    };
    let packed = pack(&opts.bin, &root.join(PACK_DIR))?;
    let size = std::fs::metadata(&packed)?.len();
    eprintln!(
        "GPU check ready: {} ({:.1} MB). On a GPU machine, in the repository root with {PACK_DIR} carried:\n  \
         bash crates/gpu-check/run.sh OUT_DIR\n(with this project's device tool: carry [\"{PACK_DIR}\"], \
         command \"bash crates/gpu-check/run.sh $OUT/gpu-check\"; README, \"On a GPU\")",
        packed.display(),
        size as f64 / 1e6
    );
    if opts.run {
        let status = Command::new("bash")
            .arg(root.join("crates/gpu-check/run.sh"))
            .arg(&opts.out)
            .current_dir(&root)
            .status()
            .context("could not run bash")?;
        if !status.success() {
            bail!(
                "the GPU check failed ({status}); see {}",
                opts.out.join("report.md").display()
            );
        }
    }
    Ok(())
}

/// Copies `bin` into `dir`, stripped of debug information, and checks it fits the carry limit.
fn pack(bin: &Path, dir: &Path) -> Result<PathBuf> {
    if !bin.is_file() {
        bail!(
            "{}: not found; fix: build it first with `cargo xtask cuda-build` (or pass --bin FILE)",
            bin.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let packed = dir.join(BIN);
    let _ = std::fs::remove_file(&packed);
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&packed)
        .arg(bin)
        .status()
        .context("could not run `strip` (binutils)")?;
    if !status.success() {
        bail!("strip {} failed ({status})", bin.display());
    }
    let size = std::fs::metadata(&packed)?.len();
    if size > CARRY_LIMIT {
        bail!(
            "{} is {:.1} MB, more than the {} MiB a lent machine may carry",
            packed.display(),
            size as f64 / 1e6,
            CARRY_LIMIT >> 20
        );
    }
    Ok(packed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let root = Path::new("/r");
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = parse(&args(&[]), root).unwrap().unwrap();
        assert_eq!(
            o.bin,
            Path::new("/r/target/cuda/release/starflow-gpu-check")
        );
        assert!(!o.run);
        let o = parse(&args(&["--run", "--out", "x", "--bin", "b"]), root)
            .unwrap()
            .unwrap();
        assert_eq!(
            (o.run, o.out.as_path(), o.bin.as_path()),
            (true, Path::new("x"), Path::new("b"))
        );
        assert!(parse(&args(&["--out"]), root).is_err());
        assert!(parse(&args(&["--gpu"]), root).is_err());
    }

    /// The packed folder holds the binary, executable and without debug sections; a missing
    /// binary names the command that builds it.
    #[test]
    fn pack_strips_the_binary_into_the_carried_folder() {
        let dir = tempfile_dir();
        let err = pack(&dir.join("nope"), &dir.join("pack"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cargo xtask cuda-build"), "{err}");
        // Any ELF with debug information stands in for the real binary: this test's own.
        let me = std::env::current_exe().unwrap();
        let packed = pack(&me, &dir.join("pack")).unwrap();
        assert_eq!(packed, dir.join("pack").join(BIN));
        let (before, after) = (
            std::fs::metadata(&me).unwrap().len(),
            std::fs::metadata(&packed).unwrap().len(),
        );
        assert!(after < before, "stripped {after} bytes, from {before}");
        let out = Command::new(&packed).arg("--list").output().unwrap();
        assert!(out.status.success(), "the packed copy still runs");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-gpu-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
