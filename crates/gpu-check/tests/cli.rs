//! The GPU check's CPU-side parts: arguments, exit codes, and the report it writes, with every
//! section run on the CPU against itself (`--device cpu --quick`).

use std::process::Command;

fn check() -> Command {
    Command::new(env!("CARGO_BIN_EXE_starflow-gpu-check"))
}

#[test]
fn cpu_run_writes_a_passing_report_with_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let status = check()
        .args([
            "--device",
            "cpu",
            "--quick",
            "--python",
            "/nonexistent/python",
        ])
        .arg("--out")
        .arg(&out)
        // The repository root, where run.sh runs it (the default peer path is relative to it).
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(status.status.success(), "{stderr}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for section in [
        "## Correctness against the CPU",
        "## A short training run, CPU and device",
        "## Step timing on the device",
        "all checks passed",
    ] {
        assert!(report.contains(section), "{section} missing:\n{report}");
    }
    for backbone in ["tiny_cnn", "cnn"] {
        for flow in ["diagonal_gaussian", "full_gaussian", "full_flow"] {
            let row = format!("| {backbone} | {flow} |");
            let line = report
                .lines()
                .find(|l| l.starts_with(&row))
                .unwrap_or_else(|| panic!("{row}"));
            assert!(line.ends_with("| pass |"), "{line}");
        }
    }
    // The peer could not run: said in the table, not a failure.
    assert!(
        report.contains("could not run /nonexistent/python"),
        "{report}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["passed"], true);
    assert_eq!(json["correctness"].as_array().unwrap().len(), 6);
    // CPU against itself: the same seeded weights give identical numbers.
    for row in json["correctness"].as_array().unwrap() {
        assert_eq!(row["grad_rel_max"], 0.0, "{row}");
    }
    let t = &json["training"][0];
    assert_eq!(t["max_nll_diff"], 0.0, "{t}");
    assert!(json["timing"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["starflow_s"].as_f64().unwrap() > 0.0));
}

#[test]
fn usage_and_device_errors_exit_2_with_the_fix() {
    for (args, needle) in [
        (&["--frobnicate"][..], "unknown option `--frobnicate`"),
        (&["--device", "gpu"][..], "expected cuda, metal or cpu"),
        (&["--out"][..], "--out needs a value"),
    ] {
        let out = check().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    if !candle_core::utils::cuda_is_available() {
        let out = check().args(["--device", "cuda"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("built without cuda support") && err.contains("pass --device cpu"),
            "{err}"
        );
    }
}
