//! `starflow-gpu-check`: the prepared check for a lent GPU, in one run and one results folder.
//!
//! GPU time is scarce (a lent machine, minutes), so everything a GPU must prove is in one binary
//! that `cargo xtask cuda-build` builds here and the device carries:
//! 1. **correctness**: both backbones × every flow on the device against the CPU's fused path, from
//!    the same seeded weights and the same stars: eval parameters, training-mode NLL and the
//!    gradient of every weight (relative differences, with pass thresholds);
//! 2. **training**: a short run of the real training loop (`starflow_training::train`, as
//!    `starflow train --set run.device=…` calls it) on the CPU and on the device, epoch by epoch;
//! 3. **timing**: the training step and the eval forward at batch 64 × 16,384 px on the device,
//!    and PyTorch's on the same device when `torch` is importable (`peer/torch_gpu_step.py`).
//!
//! It writes `report.md` and `results.json` into `--out`, exits 1 when a check fails and 2 on a
//! usage error (an unknown option, a device this build or machine lacks: the message says the
//! fix). `--device cpu` runs every section on the CPU against itself: the tests use it to check the
//! arguments, the report and the exit codes without a GPU.

mod checks;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};

const HELP: &str = "\
starflow-gpu-check [--device cuda|metal|cpu] [--out DIR] [--quick] [--python PY] [--peer FILE]

Checks starflow on a GPU against the CPU and times it; writes DIR/report.md and DIR/results.json
(default DIR: gpu-check-out). --quick: small shapes (seconds; for tests). --python: the
interpreter for the PyTorch peer (default python3; skipped when it cannot import torch).
--peer: the peer script (default crates/gpu-check/peer/torch_gpu_step.py).
Exit status: 0 all checks passed, 1 a check failed, 2 usage or device error.
";

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub device: String,
    pub out: PathBuf,
    pub quick: bool,
    pub python: String,
    pub peer: PathBuf,
}

fn parse(args: &[String]) -> Result<Option<Options>> {
    let mut o = Options {
        device: "cuda".into(),
        out: PathBuf::from("gpu-check-out"),
        quick: false,
        python: "python3".into(),
        peer: PathBuf::from("crates/gpu-check/peer/torch_gpu_step.py"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || match it.next() {
            Some(v) => Ok(v.clone()),
            None => bail!("{a} needs a value"),
        };
        match a.as_str() {
            "--device" => o.device = value()?,
            "--out" => o.out = PathBuf::from(value()?),
            "--python" => o.python = value()?,
            "--peer" => o.peer = PathBuf::from(value()?),
            "--quick" => o.quick = true,
            "-h" | "--help" => return Ok(None),
            other => bail!("unknown option `{other}`"),
        }
    }
    if !["cuda", "metal", "cpu"].contains(&o.device.as_str()) {
        bail!("--device {}: expected cuda, metal or cpu", o.device);
    }
    Ok(Some(o))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("starflow-gpu-check: {e}; fix: see --help\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    let setting = starflow_training::model::DeviceSetting {
        name: "--device",
        choose_cpu: "pass --device cpu",
    };
    let device = match starflow_training::model::device_for(&opts.device, setting) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("starflow-gpu-check: {e}");
            return ExitCode::from(2);
        }
    };
    match checks::run_all(&opts, &device).and_then(|r| report::write(&opts, &r).map(|()| r)) {
        Ok(results) => {
            eprintln!(
                "starflow-gpu-check: {} ({})",
                if results.passed() {
                    "all checks passed"
                } else {
                    "a check FAILED"
                },
                opts.out.join("report.md").display()
            );
            if results.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("starflow-gpu-check: {e:#}");
            ExitCode::from(1)
        }
    }
}
