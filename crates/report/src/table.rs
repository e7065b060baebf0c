//! The comparison of several runs: `REPORT.md` for people, `metrics.parquet` and
//! `history.parquet` for programs (every number, one row per run × label and per run × epoch).

use std::fmt::Write as _;
use std::path::Path;

use polars::prelude::{Column, DataFrame, ParquetWriter, PlSmallStr};
use starflow_inference::LabelMetrics;
use starflow_training::EpochRecord;

pub use crate::row::RunRow;

use crate::error::{ReportError, Result};
use crate::plots::{fmt_sig, LabelInfo};
use crate::stats::{calibration_noise, paired_difference};

/// The calibration targets the project holds every flow to (issue #11): pull std, |pull mean|,
/// 68.3 % and 95.4 % coverage of the central intervals (within ±2 points), and of the joint
/// highest-density regions (within ±3 points). They are meant for a few thousand held-out stars,
/// where a calibrated model's sampling noise is well inside them.
#[derive(Clone, Copy, Debug)]
pub struct Targets {
    pub pull_std: (f64, f64),
    pub pull_mean_abs: f64,
    pub coverage_68: (f64, f64),
    pub coverage_95: (f64, f64),
    pub joint_68: (f64, f64),
    pub joint_95: (f64, f64),
}

pub const TARGETS: Targets = Targets {
    pull_std: (0.95, 1.05),
    pull_mean_abs: 0.05,
    coverage_68: (0.6627, 0.7027),
    coverage_95: (0.9345, 0.9745),
    joint_68: (0.6527, 0.7127),
    joint_95: (0.9245, 0.9845),
};

impl Targets {
    /// The targets a label misses, as short phrases (empty when all are met).
    pub fn misses(&self, m: &LabelMetrics) -> Vec<String> {
        let mut out = Vec::new();
        if !within(m.pull_std, self.pull_std) {
            out.push(format!(
                "pull std {:.2} outside {}-{}",
                m.pull_std, self.pull_std.0, self.pull_std.1
            ));
        }
        // NaN counts as a miss.
        if m.pull_mean.abs() > self.pull_mean_abs || m.pull_mean.is_nan() {
            out.push(format!(
                "|pull mean| {:.2} > {}",
                m.pull_mean.abs(),
                self.pull_mean_abs
            ));
        }
        if !within(m.coverage_68, self.coverage_68) {
            out.push(format!(
                "68 % coverage {:.1} % outside {:.1}-{:.1} %",
                100.0 * m.coverage_68,
                100.0 * self.coverage_68.0,
                100.0 * self.coverage_68.1
            ));
        }
        if !within(m.coverage_95, self.coverage_95) {
            out.push(format!(
                "95 % coverage {:.1} % outside {:.1}-{:.1} %",
                100.0 * m.coverage_95,
                100.0 * self.coverage_95.0,
                100.0 * self.coverage_95.1
            ));
        }
        out
    }

    /// The joint-coverage targets missed by `[coverage of the 68.3 %, of the 95.4 % region]`.
    pub fn joint_misses(&self, c: &[f64]) -> Vec<String> {
        let mut out = Vec::new();
        for (v, (lo, hi), what) in [
            (c.first(), self.joint_68, "68.3 %"),
            (c.get(1), self.joint_95, "95.4 %"),
        ] {
            match v {
                Some(&v) if within(v, (lo, hi)) => {}
                Some(&v) => out.push(format!(
                    "{what} region covers {:.1} %, outside {:.1}-{:.1} %",
                    100.0 * v,
                    100.0 * lo,
                    100.0 * hi
                )),
                None => out.push(format!("{what} region: not measured")),
            }
        }
        out
    }
}

fn within(v: f64, (lo, hi): (f64, f64)) -> bool {
    v >= lo && v <= hi
}

/// Markdown for the whole comparison. `intro` is free text (how the runs were made) placed under
/// the title; then one section per function below, in this order.
pub fn markdown(title: &str, intro: &str, rows: &[RunRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {title}\n");
    if !intro.trim().is_empty() {
        let _ = writeln!(s, "{}\n", intro.trim_end());
    }
    let Some(first) = rows.first() else {
        s.push_str("No runs.\n");
        return s;
    };
    let infos: Vec<LabelInfo> = first
        .labels
        .iter()
        .map(|l| LabelInfo::of(&l.name))
        .collect();
    overview(&mut s, rows, first);
    accuracy(&mut s, rows, first, &infos);
    calibration(&mut s, rows, first);
    joint_calibration(&mut s, rows);
    quality_targets(&mut s, rows);
    s.push_str(&crate::kinds::markdown_section(rows));
    figures(&mut s, rows);
    s
}

/// "met", or "**missed**: " and what was missed.
fn verdict(misses: Vec<String>) -> String {
    if misses.is_empty() {
        "met".to_string()
    } else {
        format!("**missed**: {}", misses.join("; "))
    }
}

/// The overview table: epochs, NLLs and times per run, and what the stars were.
fn overview(s: &mut String, rows: &[RunRow], first: &RunRow) {
    s.push_str("## Overview\n\n");
    s.push_str(
        "| run | backbone | flow | epochs (kept) | test NLL (z) ± se | recalibrated test NLL (z) | test NLL (physical) | s / epoch | train time | report time |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} ({}) | {:.3} ± {:.3} | {:.3} | {:.3} | {:.1} | {} | {} |",
            r.name,
            r.backbone,
            r.flow,
            r.epochs_done,
            r.best_epoch,
            r.test_nll_z,
            r.test_nll_se,
            r.test_nll_z_calibrated,
            r.test_nll,
            r.seconds_per_epoch,
            fmt_duration(r.train_seconds),
            fmt_duration(r.report_seconds),
        );
    }
    let _ = writeln!(
        s,
        "\nEvaluated on {} stars: {} (training set {}). NLL is the mean negative log-likelihood of \
         the true labels; lower is better. z-units standardise each label with the training set's \
         mean and std; physical units add the log-Jacobian of that scaling. ± is one standard \
         error from the finite number of stars.\n",
        first.n_test,
        if first.eval_set.is_empty() { "test" } else { &first.eval_set },
        first.n_train
    );
}

/// RMSE, bias and R² per label, and the RMSE against the Cramér-Rao bounds when the data have them.
fn accuracy(s: &mut String, rows: &[RunRow], first: &RunRow, infos: &[LabelInfo]) {
    s.push_str("## Accuracy (posterior mean against the truth, physical units)\n\n");
    s.push_str("| run |");
    for i in infos {
        let _ = write!(s, " {t} RMSE | {t} bias | {t} R² |", t = i.axis(""));
    }
    s.push('\n');
    s.push_str("|---|");
    s.push_str(&"---|---|---|".repeat(infos.len()));
    s.push('\n');
    for r in rows {
        let _ = write!(s, "| {} |", r.name);
        for l in &r.labels {
            let _ = write!(
                s,
                " {} | {} | {:.4} |",
                fmt_sig(l.rmse),
                fmt_sig(l.bias),
                l.r2
            );
        }
        s.push('\n');
    }
    if first.labels.iter().any(|l| l.median_crlb.is_some()) {
        per_label_table(
            s,
            "RMSE / Cramér-Rao bound (median per-star bound of the synthetic generator, nuisances held fixed; 1 is the best any unbiased estimator that knew them could do):",
            infos,
            rows,
            |l| l.rmse_over_crlb.map(|v| format!("{v:.1}")),
        );
    }
    if first
        .labels
        .iter()
        .any(|l| l.median_crlb_marginal.is_some())
    {
        per_label_table(
            s,
            "RMSE / marginalised Cramér-Rao bound (the generator's 33 nuisance parameters — per-element abundances, microturbulence, lithium, tellurics, edge, continuum — unknown to the estimator, as they are to the network; median per-star bound in brackets):",
            infos,
            rows,
            |l| match (l.rmse_over_crlb_marginal, l.median_crlb_marginal) {
                (Some(v), Some(c)) => Some(format!("{v:.2} ({})", fmt_sig(c))),
                _ => None,
            },
        );
    }
}

/// Per run and label: pulls and coverages of the model's own and the recalibrated posteriors
/// against the targets, and the sampling noise a perfectly calibrated model would show.
fn calibration(s: &mut String, rows: &[RunRow], first: &RunRow) {
    s.push_str("\n## Calibration\n\n");
    let _ = writeln!(
        s,
        "Targets: pull std {}-{}, |pull mean| <= {}, 68 % coverage {:.1}-{:.1} %, 95 % coverage {:.1}-{:.1} %. \
         A pull is (posterior mean - truth) / posterior std; coverage is the fraction of true values \
         inside the central 68.3 % / 95.4 % posterior interval.\n",
        TARGETS.pull_std.0,
        TARGETS.pull_std.1,
        TARGETS.pull_mean_abs,
        100.0 * TARGETS.coverage_68.0,
        100.0 * TARGETS.coverage_68.1,
        100.0 * TARGETS.coverage_95.0,
        100.0 * TARGETS.coverage_95.1
    );
    s.push_str(
        "Each cell shows the model's own posteriors → the same posteriors recalibrated (what \
         `starflow evaluate` and `predict` give by default; `--raw` for the model's own): each \
         label's posterior mapped through a monotone map of its standardised axis (x - mean) / std \
         that sends the normal quantiles to the quantiles of the standardised errors of the \
         validation stars (or of a separate synthetic calibration set, when the config draws \
         one), fitted when training ended, so the recalibrated posteriors have the errors' own \
         tails. c and s describe the map: it moves the posterior's centre by c of its own standard \
         deviation, and its central ±1 std by a factor s. Rank correlations are unchanged; ± is one \
         standard error of the model's figure.\n\n",
    );
    s.push_str("| run | label | shift c, scale s | pull mean | pull std | 68 % coverage | 95 % coverage | targets (model) | targets (recalibrated) |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        for (j, l) in r.labels.iter().enumerate() {
            let misses = TARGETS.misses(l);
            let c = r.calibrated.get(j);
            let cal_misses = c.map(|c| TARGETS.misses(c));
            let arrow = |a: f64, b: Option<f64>, pct: bool| {
                let f = |v: f64| {
                    if pct {
                        format!("{:.1} %", 100.0 * v)
                    } else {
                        format!("{v:.3}")
                    }
                };
                match b {
                    Some(b) => format!("{} → {}", f(a), f(b)),
                    None => f(a),
                }
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                LabelInfo::of(&l.name).title,
                match (r.sigma_shift.get(j), r.sigma_scale.get(j)) {
                    (Some(c), Some(v)) => format!("{c:+.3}, {v:.3}"),
                    (None, Some(v)) => format!("{v:.3}"),
                    _ => "-".to_string(),
                },
                with_se(
                    arrow(l.pull_mean, c.map(|c| c.pull_mean), false),
                    l.se.pull_mean,
                    false
                ),
                with_se(
                    arrow(l.pull_std, c.map(|c| c.pull_std), false),
                    l.se.pull_std,
                    false
                ),
                with_se(
                    arrow(l.coverage_68, c.map(|c| c.coverage_68), true),
                    l.se.coverage_68,
                    true
                ),
                with_se(
                    arrow(l.coverage_95, c.map(|c| c.coverage_95), true),
                    l.se.coverage_95,
                    true
                ),
                verdict(misses),
                cal_misses.map_or("-".to_string(), verdict),
            );
        }
    }

    sampling_noise(s, rows, first);
}

/// How far a perfectly calibrated model's figures would scatter on these stars (and with the
/// maps' own fitting noise), so a reader can tell a miss from chance.
fn sampling_noise(s: &mut String, rows: &[RunRow], first: &RunRow) {
    let noise = calibration_noise(
        first.n_test,
        TARGETS.pull_std,
        TARGETS.pull_mean_abs,
        TARGETS.coverage_68,
        TARGETS.coverage_95,
    );
    let total_pairs = rows.iter().map(|r| r.labels.len()).sum::<usize>();
    let _ = writeln!(
        s,
        "\nSampling noise: on {} test stars a perfectly calibrated model's figures scatter by \
         ±{:.3} (pull mean), ±{:.3} (pull std), ±{:.1} % (68 % coverage) and ±{:.1} % (95 % \
         coverage), one standard error each, so it meets all four targets for a label with \
         probability {:.0} %: about {:.0} of these {total_pairs} run × label pairs would miss a \
         target by chance alone.",
        first.n_test,
        noise.se_pull_mean,
        noise.se_pull_std,
        100.0 * noise.se_coverage_68,
        100.0 * noise.se_coverage_95,
        100.0 * noise.p_all_met,
        (1.0 - noise.p_all_met) * total_pairs as f64,
    );
    if first.calibration_stars > 0 {
        // A recalibrated figure also carries the noise of the map fitted on the validation
        // stars: a calibrated model's interval ends and centre are estimated from them.
        let n_eff = 1.0 / (1.0 / first.n_test.max(1) as f64 + 1.0 / first.calibration_stars as f64);
        let fitted = calibration_noise(
            n_eff.round() as usize,
            TARGETS.pull_std,
            TARGETS.pull_mean_abs,
            TARGETS.coverage_68,
            TARGETS.coverage_95,
        );
        let _ = writeln!(
            s,
            "\nThe recalibrated figures also carry the noise of the maps, fitted on {} {} \
             stars: together ±{:.3}, ±{:.3}, ±{:.1} % and ±{:.1} %, so a perfectly recalibrated \
             model meets all four targets for a label with probability {:.0} %: about {:.0} of the \
             {total_pairs} pairs would miss by chance.",
            first.calibration_stars,
            if first.calibration_set == starflow_inference::CALIBRATION_SET {
                "synthetic calibration"
            } else {
                "validation"
            },
            fitted.se_pull_mean,
            fitted.se_pull_std,
            100.0 * fitted.se_coverage_68,
            100.0 * fitted.se_coverage_95,
            100.0 * fitted.p_all_met,
            (1.0 - fitted.p_all_met) * total_pairs as f64,
        );
    }
}

/// Coverage of the 3-D highest-density regions per run.
fn joint_calibration(s: &mut String, rows: &[RunRow]) {
    s.push_str("\n## Joint calibration (3-D highest-density regions)\n\n");
    let _ = writeln!(
        s,
        "The fraction of stars whose true (t_eff, log g, [Fe/H]) lies inside the posterior's \
         highest-density region of mass 68.3 % / 95.4 %. Marginal coverage can be right while the \
         correlations are wrong; this cannot. Targets: {:.1}-{:.1} % and {:.1}-{:.1} %. The model's \
         own Gaussian flows are exact (chi-square of the Mahalanobis distance); full_flow, and \
         every recalibrated posterior (whose density is the model's over the maps' Jacobian), rank \
         the truth's density among 400 posterior samples per star.\n",
        100.0 * TARGETS.joint_68.0,
        100.0 * TARGETS.joint_68.1,
        100.0 * TARGETS.joint_95.0,
        100.0 * TARGETS.joint_95.1
    );
    s.push_str(
        "| run | 68.3 % region | 95.4 % region | targets (model) | targets (recalibrated) |\n",
    );
    s.push_str("|---|---|---|---|---|\n");
    for r in rows {
        let cell = |k: usize| match (r.joint_coverage.get(k), r.joint_coverage_se.get(k)) {
            (Some(v), Some(e)) => {
                let scaled = r
                    .joint_coverage_calibrated
                    .get(k)
                    .map_or(String::new(), |c| format!(" → {:.1} %", 100.0 * c));
                format!("{:.1} ± {:.1} %{scaled}", 100.0 * v, 100.0 * e)
            }
            _ => "-".into(),
        };
        let m = TARGETS.joint_misses(&r.joint_coverage);
        let mc = TARGETS.joint_misses(&r.joint_coverage_calibrated);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r.name,
            cell(0),
            cell(1),
            verdict(m),
            verdict(mc)
        );
    }
}

/// The verdicts: how many run × label pairs and runs miss a target, and the NLL orderings
/// between flows of one backbone.
fn quality_targets(s: &mut String, rows: &[RunRow]) {
    s.push_str("\n## Quality targets\n\n");
    let missed = |l: &LabelMetrics| !TARGETS.misses(l).is_empty();
    let n_miss: usize = rows
        .iter()
        .map(|r| r.labels.iter().filter(|l| missed(l)).count())
        .sum();
    let n_miss_cal: usize = rows
        .iter()
        .map(|r| {
            r.calibrated
                .iter()
                .take(r.labels.len())
                .filter(|c| missed(c))
                .count()
        })
        .sum();
    let n_joint_miss = rows
        .iter()
        .filter(|r| !TARGETS.joint_misses(&r.joint_coverage).is_empty())
        .count();
    let n_joint_miss_cal = rows
        .iter()
        .filter(|r| {
            !TARGETS
                .joint_misses(&r.joint_coverage_calibrated)
                .is_empty()
        })
        .count();
    let total = rows.iter().map(|r| r.labels.len()).sum::<usize>();
    for (what, n) in [
        ("the model's own posteriors", n_miss),
        ("recalibrated posteriors", n_miss_cal),
    ] {
        if n == 0 {
            let _ = writeln!(
                s,
                "- Calibration of {what}: every target met for all {total} run × label pairs."
            );
        } else {
            let _ = writeln!(
                s,
                "- Calibration of {what}: **{n} of {total} run × label pairs miss at least one target** (table above)."
            );
        }
    }
    for (what, n) in [
        ("the model's own posteriors", n_joint_miss),
        ("recalibrated posteriors", n_joint_miss_cal),
    ] {
        let _ = writeln!(
            s,
            "- Joint calibration of {what}: {}",
            if n == 0 {
                format!("every target met for all {} runs.", rows.len())
            } else {
                format!(
                    "**{n} of {} runs miss a target** (table above).",
                    rows.len()
                )
            }
        );
    }
    flow_orderings(s, rows);
}

/// The NLL orderings between the flows of one backbone (full_gaussian against
/// diagonal_gaussian + 0.02, full_flow against full_gaussian), with paired differences.
fn flow_orderings(s: &mut String, rows: &[RunRow]) {
    for backbone in unique(rows.iter().map(|r| r.backbone.as_str())) {
        let find = |flow: &str| {
            rows.iter()
                .find(|r| r.backbone == backbone && r.flow == flow)
        };
        // `a <= b + margin`, for the model's own and the recalibrated posteriors, with the
        // difference's paired standard error when both runs saw the same stars.
        let compare = |a: &RunRow, b: &RunRow, margin: f64, what: &str, why: &str| {
            let same_stars = a.test_rows == b.test_rows;
            let judge = |x: f64, y: f64, xs: &[f64], ys: &[f64]| {
                let ok = x <= y + margin;
                let plus = if margin > 0.0 {
                    format!(" + {margin}")
                } else {
                    String::new()
                };
                let verdict = if ok {
                    "met".to_string()
                } else {
                    format!("**missed**: {why}")
                };
                let paired = match paired_difference(xs, ys).filter(|_| same_stars) {
                    Some((d, se)) => format!("; difference {d:+.3} ± {se:.3}, paired"),
                    None => String::new(),
                };
                format!(
                    "{x:.3} {} {what} {y:.3}{plus} ({verdict}{paired})",
                    if ok { "<=" } else { ">" },
                )
            };
            format!(
                "{}; recalibrated (what `evaluate` and `predict` give): {}",
                judge(
                    a.test_nll_z,
                    b.test_nll_z,
                    &a.test_star_nll_z,
                    &b.test_star_nll_z
                ),
                judge(
                    a.test_nll_z_calibrated,
                    b.test_nll_z_calibrated,
                    &a.test_star_nll_z_calibrated,
                    &b.test_star_nll_z_calibrated
                )
            )
        };
        if let (Some(fg), Some(dg)) = (find("full_gaussian"), find("diagonal_gaussian")) {
            let _ = writeln!(
                s,
                "- {backbone}: full_gaussian test NLL {}",
                compare(
                    fg,
                    dg,
                    0.02,
                    "diagonal_gaussian",
                    "the full Gaussian, which nests the diagonal one, is worse"
                )
            );
        }
        if let (Some(ff), Some(fg)) = (find("full_flow"), find("full_gaussian")) {
            let _ = writeln!(
                s,
                "- {backbone}: full_flow test NLL {}",
                compare(
                    ff,
                    fg,
                    0.0,
                    "full_gaussian",
                    "the full flow is worse than the full Gaussian"
                )
            );
        }
    }

    if rows.iter().any(|r| !r.test_star_nll_z.is_empty()) {
        s.push_str(
            "\nA difference is the mean over the test stars of one run's NLL minus the other's \
             on the same star, ± its standard error: each star's difficulty cancels, so it is far \
             smaller than each mean's own ± and tells an ordering from noise.\n",
        );
    }
}

/// Links to every run's figures and the Parquet files.
fn figures(s: &mut String, rows: &[RunRow]) {
    s.push_str("\n## Figures\n\n");
    for r in rows {
        let _ = writeln!(
            s,
            "- **{n}**: [loss]({n}/loss.png), [pulls]({n}/pulls.png), [predicted vs true]({n}/predicted_vs_true.png), [calibration]({n}/calibration.png), [joint calibration]({n}/joint_calibration.png), [coverage against SNR]({n}/coverage_vs_snr.png), [posteriors]({n}/) (corner plots `posterior-row*.png`)",
            n = r.name
        );
    }
    s.push_str("- [an example spectrum](spectrum.png)\n");
    s.push_str(
        "\nEvery number above is in `metrics.parquet` (one row per run × label), the calibration by \
         kind of star in `calibration_by_kind.parquet` (one row per run × kind × label) and the \
         per-epoch losses in `history.parquet`.\n",
    );
}

fn per_label_table(
    s: &mut String,
    title: &str,
    infos: &[LabelInfo],
    rows: &[RunRow],
    cell: impl Fn(&LabelMetrics) -> Option<String>,
) {
    let _ = write!(s, "\n{title}\n\n| run |");
    for i in infos {
        let _ = write!(s, " {} |", i.title);
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(infos.len()));
    s.push('\n');
    for r in rows {
        let _ = write!(s, "| {} |", r.name);
        for l in &r.labels {
            let _ = write!(s, " {} |", cell(l).unwrap_or_else(|| "-".into()));
        }
        s.push('\n');
    }
}

/// `text ± se` (se in percent when `pct`), the error belonging to the first figure of `text`.
fn with_se(text: String, se: f64, pct: bool) -> String {
    let (first, rest) = match text.split_once(" → ") {
        Some((a, b)) => (a.to_string(), format!(" → {b}")),
        None => (text, String::new()),
    };
    if pct {
        let first = first.trim_end_matches(" %");
        format!("{first} ± {:.1} %{rest}", 100.0 * se)
    } else {
        format!("{first} ± {se:.3}{rest}")
    }
}

fn unique<'a>(it: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for v in it {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// `1 h 02 min`, `3 min 20 s`, `12.3 s`.
pub fn fmt_duration(seconds: f64) -> String {
    if seconds >= 3600.0 {
        let m = (seconds / 60.0).round() as u64;
        format!("{} h {:02} min", m / 60, m % 60)
    } else if seconds >= 60.0 {
        let s = seconds.round() as u64;
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{seconds:.1} s")
    }
}

fn col_str(name: &str, v: Vec<String>) -> Column {
    Column::new(PlSmallStr::from(name), v)
}

fn col_f64(name: &str, v: Vec<f64>) -> Column {
    Column::new(PlSmallStr::from(name), v)
}

fn col_opt(name: &str, v: Vec<Option<f64>>) -> Column {
    Column::new(PlSmallStr::from(name), v)
}

fn col_u64(name: &str, v: Vec<u64>) -> Column {
    Column::new(PlSmallStr::from(name), v)
}

fn label_of(r: &RunRow, l: &LabelMetrics) -> Option<usize> {
    r.labels.iter().position(|x| x.name == l.name)
}

fn cal<'a>(r: &'a RunRow, l: &LabelMetrics) -> Option<&'a LabelMetrics> {
    label_of(r, l).and_then(|j| r.calibrated.get(j))
}

/// One row per run × label, every metric as a column (`cal_*`: the recalibrated posteriors).
pub fn metrics_frame(rows: &[RunRow]) -> Result<DataFrame> {
    let flat: Vec<(&RunRow, &LabelMetrics)> = rows
        .iter()
        .flat_map(|r| r.labels.iter().map(move |l| (r, l)))
        .collect();
    let s =
        |f: &dyn Fn(&RunRow, &LabelMetrics) -> String| flat.iter().map(|(r, l)| f(r, l)).collect();
    let f = |f: &dyn Fn(&RunRow, &LabelMetrics) -> f64| flat.iter().map(|(r, l)| f(r, l)).collect();
    let u = |f: &dyn Fn(&RunRow, &LabelMetrics) -> u64| flat.iter().map(|(r, l)| f(r, l)).collect();
    let o = |f: &dyn Fn(&RunRow, &LabelMetrics) -> Option<f64>| {
        flat.iter().map(|(r, l)| f(r, l)).collect()
    };
    let columns = vec![
        col_str("run", s(&|r, _| r.name.clone())),
        col_str("backbone", s(&|r, _| r.backbone.clone())),
        col_str("flow", s(&|r, _| r.flow.clone())),
        col_str("label", s(&|_, l| l.name.clone())),
        col_str("unit", s(&|_, l| LabelInfo::of(&l.name).unit)),
        col_u64("epochs_done", u(&|r, _| r.epochs_done as u64)),
        col_u64("best_epoch", u(&|r, _| r.best_epoch as u64)),
        col_u64("n_train", u(&|r, _| r.n_train as u64)),
        col_u64("n_test", u(&|r, _| r.n_test as u64)),
        col_u64("n_samples", u(&|r, _| r.n_samples as u64)),
        col_f64("test_nll_z", f(&|r, _| r.test_nll_z)),
        col_f64("test_nll", f(&|r, _| r.test_nll)),
        col_f64("rmse", f(&|_, l| l.rmse)),
        col_f64("mae", f(&|_, l| l.mae)),
        col_f64("bias", f(&|_, l| l.bias)),
        col_f64("r2", f(&|_, l| l.r2)),
        col_f64("pull_mean", f(&|_, l| l.pull_mean)),
        col_f64("pull_std", f(&|_, l| l.pull_std)),
        col_f64("coverage_68", f(&|_, l| l.coverage_68)),
        col_f64("coverage_95", f(&|_, l| l.coverage_95)),
        col_f64("marginal_nll", f(&|_, l| l.marginal_nll)),
        col_f64("marginal_nll_z", f(&|_, l| l.marginal_nll_z)),
        col_opt("median_crlb", o(&|_, l| l.median_crlb)),
        col_opt("rmse_over_crlb", o(&|_, l| l.rmse_over_crlb)),
        col_opt("median_crlb_marginal", o(&|_, l| l.median_crlb_marginal)),
        col_opt(
            "rmse_over_crlb_marginal",
            o(&|_, l| l.rmse_over_crlb_marginal),
        ),
        col_f64("se_rmse", f(&|_, l| l.se.rmse)),
        col_f64("se_pull_mean", f(&|_, l| l.se.pull_mean)),
        col_f64("se_pull_std", f(&|_, l| l.se.pull_std)),
        col_f64("se_coverage_68", f(&|_, l| l.se.coverage_68)),
        col_f64("se_coverage_95", f(&|_, l| l.se.coverage_95)),
        col_f64("test_nll_se", f(&|r, _| r.test_nll_se)),
        col_opt(
            "joint_coverage_68",
            o(&|r, _| r.joint_coverage.first().copied()),
        ),
        col_opt(
            "joint_coverage_95",
            o(&|r, _| r.joint_coverage.get(1).copied()),
        ),
        col_opt(
            "cal_joint_coverage_68",
            o(&|r, _| r.joint_coverage_calibrated.first().copied()),
        ),
        col_opt(
            "cal_joint_coverage_95",
            o(&|r, _| r.joint_coverage_calibrated.get(1).copied()),
        ),
        col_opt(
            "sigma_shift",
            o(&|r, l| label_of(r, l).and_then(|j| r.sigma_shift.get(j).copied())),
        ),
        col_opt(
            "sigma_scale",
            o(&|r, l| label_of(r, l).and_then(|j| r.sigma_scale.get(j).copied())),
        ),
        col_f64("cal_test_nll_z", f(&|r, _| r.test_nll_z_calibrated)),
        col_opt("cal_pull_mean", o(&|r, l| cal(r, l).map(|c| c.pull_mean))),
        col_opt("cal_pull_std", o(&|r, l| cal(r, l).map(|c| c.pull_std))),
        col_opt(
            "cal_coverage_68",
            o(&|r, l| cal(r, l).map(|c| c.coverage_68)),
        ),
        col_opt(
            "cal_coverage_95",
            o(&|r, l| cal(r, l).map(|c| c.coverage_95)),
        ),
        col_opt(
            "cal_marginal_nll",
            o(&|r, l| cal(r, l).map(|c| c.marginal_nll)),
        ),
        col_opt(
            "mace",
            o(&|r, l| label_of(r, l).and_then(|j| r.coverage_curve.mace.get(j).copied())),
        ),
        col_opt(
            "cal_mace",
            o(&|r, l| {
                label_of(r, l).and_then(|j| r.coverage_curve_calibrated.mace.get(j).copied())
            }),
        ),
        col_f64("seconds_per_epoch", f(&|r, _| r.seconds_per_epoch)),
        col_f64("train_seconds", f(&|r, _| r.train_seconds)),
        col_f64("report_seconds", f(&|r, _| r.report_seconds)),
    ];
    DataFrame::new(flat.len(), columns).map_err(|e| ReportError::Table {
        path: "metrics.parquet".into(),
        message: e.to_string(),
    })
}

/// One row per run × epoch: the loss curves.
pub fn history_frame(rows: &[RunRow]) -> Result<DataFrame> {
    let flat: Vec<(&RunRow, &EpochRecord)> = rows
        .iter()
        .flat_map(|r| r.history.iter().map(move |e| (r, e)))
        .collect();
    let columns = vec![
        col_str("run", flat.iter().map(|(r, _)| r.name.clone()).collect()),
        col_str(
            "backbone",
            flat.iter().map(|(r, _)| r.backbone.clone()).collect(),
        ),
        col_str("flow", flat.iter().map(|(r, _)| r.flow.clone()).collect()),
        col_u64(
            "epoch",
            flat.iter().map(|(_, e)| e.epoch as u64 + 1).collect(),
        ),
        col_f64("train_nll", flat.iter().map(|(_, e)| e.train_nll).collect()),
        col_f64("val_nll", flat.iter().map(|(_, e)| e.val_nll).collect()),
        col_f64("lr", flat.iter().map(|(_, e)| e.lr).collect()),
        col_f64("seconds", flat.iter().map(|(_, e)| e.seconds).collect()),
        col_u64(
            "steps_skipped",
            flat.iter().map(|(_, e)| e.steps_skipped as u64).collect(),
        ),
    ];
    DataFrame::new(flat.len(), columns).map_err(|e| ReportError::Table {
        path: "history.parquet".into(),
        message: e.to_string(),
    })
}

/// Writes a frame as Parquet, atomically.
pub fn write_parquet(path: &Path, df: &mut DataFrame) -> Result<()> {
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf)
        .finish(df)
        .map_err(|e| ReportError::Table {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    starflow_data::atomic_file::write(path, &buf)?;
    Ok(())
}
