//! `report.md` (for people) and `results.json` (for tools) in the results folder.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::checks::{Results, GRAD_TOL, PARAMS_TOL, TRAIN_TOL};
use crate::Options;

pub fn write(opts: &Options, r: &Results) -> Result<()> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let json = json!({
        "device": r.device, "quick": opts.quick, "passed": r.passed(),
        "correctness": r.correctness, "training": r.training, "timing": r.timing,
    });
    let path = opts.out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let path = opts.out.join("report.md");
    std::fs::write(&path, markdown(opts, r)).with_context(|| format!("writing {}", path.display()))
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map(|x| {
            if digits == 0 {
                format!("{x:.1e}")
            } else {
                format!("{x:.digits$}")
            }
        })
        .unwrap_or_else(|| "–".into())
}

fn verdict(row: &Value) -> String {
    match (&row["pass"], row["error"].as_str()) {
        (_, Some(e)) => format!("**error**: {}", e.replace('\n', " ")),
        (Value::Bool(true), _) => "pass".into(),
        _ => "**FAIL**".into(),
    }
}

pub fn markdown(opts: &Options, r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# starflow GPU check\n");
    let _ = writeln!(
        s,
        "Device: `{}` (`--device {}`{}). Verdict: **{}**.\n",
        r.device,
        opts.device,
        if opts.quick { ", --quick shapes" } else { "" },
        if r.passed() {
            "all checks passed"
        } else {
            "a check failed"
        }
    );
    correctness(&mut s, r);
    training(&mut s, r);
    timing(&mut s, r);
    s
}

fn correctness(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "## Correctness against the CPU\n\nSame seeded weights and stars; relative differences (max |Δ| / max |CPU|). \
         Pass: parameters and NLL ≤ {PARAMS_TOL:e}, every gradient ≤ {GRAD_TOL:e}.\n\n\
         | backbone | flow | stars × px | eval parameters | training NLL | worst gradient | of | verdict |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for c in &r.correctness {
        let _ = writeln!(
            s,
            "| {} | {} | {} × {} | {} | {} | {} | `{}` | {} |",
            c["backbone"].as_str().unwrap_or(""),
            c["flow"].as_str().unwrap_or(""),
            c["batch"],
            c["n_pix"],
            num(&c["params_rel"], 0),
            num(&c["nll_rel"], 0),
            num(&c["grad_rel_max"], 0),
            c["grad_worst"].as_str().unwrap_or(""),
            verdict(c)
        );
    }
}

fn training(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "\n## A short training run, CPU and device\n\nTinyCNN + full_flow through `starflow_training::train`; \
         mean NLL per star per epoch (train / validation). Pass: every difference ≤ {TRAIN_TOL}.\n"
    );
    for t in &r.training {
        if let Some(e) = t["error"].as_str() {
            let _ = writeln!(s, "**error**: {}", e.replace('\n', " "));
            continue;
        }
        let _ = writeln!(
            s,
            "| epoch | CPU train | CPU val | device train | device val |\n|---|---|---|---|---|"
        );
        let empty = Vec::new();
        let cpu = t["cpu"].as_array().unwrap_or(&empty);
        let dev = t["device"].as_array().unwrap_or(&empty);
        for (i, (c, d)) in cpu.iter().zip(dev).enumerate() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                i + 1,
                num(&c[0], 4),
                num(&c[1], 4),
                num(&d[0], 4),
                num(&d[1], 4)
            );
        }
        let _ = writeln!(
            s,
            "\nLargest difference {}; wall time CPU {} s, device {} s. Verdict: {}.",
            num(&t["max_nll_diff"], 4),
            num(&t["cpu_s"], 1),
            num(&t["device_s"], 1),
            verdict(t)
        );
    }
}

fn timing(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "\n## Step timing on the device\n\nMedian seconds (diagonal Gaussian head, Adam), starflow and PyTorch \
         (`peer/torch_gpu_step.py`) on the same device, one after the other.\n\n\
         | backbone | mode | batch × px | starflow s | PyTorch s | PyTorch / starflow |\n|---|---|---|---|---|---|"
    );
    for t in &r.timing {
        let ratio = match (t["starflow_s"].as_f64(), t["torch_s"].as_f64()) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:.2}×", b / a),
            _ => t["torch_note"]
                .as_str()
                .or(t["error"].as_str())
                .unwrap_or("–")
                .replace('\n', " "),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} × {} | {} | {} | {} |",
            t["backbone"].as_str().unwrap_or(""),
            t["mode"].as_str().unwrap_or(""),
            t["batch"],
            t["n_pix"],
            num(&t["starflow_s"], 4),
            num(&t["torch_s"], 4),
            ratio
        );
    }
}
