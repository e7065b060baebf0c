//! PNG figures. Each function renders into an in-memory RGB buffer and writes the encoded PNG
//! atomically (temporary file + rename), so an interrupted report never leaves a half-written
//! image next to good ones.

use std::error::Error;
use std::path::Path;

use image::ImageEncoder;
use plotters::coord::Shift;
use plotters::prelude::*;
use starflow_inference::kinds::SnrBin;
use starflow_inference::StarSamples;
use starflow_training::EpochRecord;

use crate::error::{ReportError, Result};
use crate::font::{ensure_registered, FAMILY};
use crate::stats::{
    coverage_curve, ellipse, mean_cov, mean_std, normal_pdf, quantile, r2, radius_2d, Histogram,
};

type DrawResult = std::result::Result<(), Box<dyn Error>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const VAL: RGBColor = RGBColor(255, 127, 14);
const TRUTH: RGBColor = RGBColor(44, 160, 44);
const REFERENCE: RGBColor = RGBColor(214, 39, 40);
const GREY: RGBColor = RGBColor(110, 110, 110);

/// How a label is named and measured on axes.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelInfo {
    /// Column name in the data (`t_eff`).
    pub key: String,
    /// Name on plots (`T_eff`).
    pub title: String,
    /// Physical unit (`K`), empty when unknown.
    pub unit: String,
}

impl LabelInfo {
    /// Display name and unit of the GALAH labels; other columns keep their name and no unit.
    pub fn of(key: &str) -> Self {
        let (title, unit) = match key {
            "t_eff" => ("T_eff", "K"),
            "log_g" => ("log g", "dex"),
            "fe_h" => ("[Fe/H]", "dex"),
            "mass" => ("mass", "M_sun"),
            "age" => ("age", "Gyr"),
            other => (other, ""),
        };
        LabelInfo {
            key: key.to_string(),
            title: title.to_string(),
            unit: unit.to_string(),
        }
    }

    /// `"<prefix>T_eff [K]"`.
    pub fn axis(&self, prefix: &str) -> String {
        if self.unit.is_empty() {
            format!("{prefix}{}", self.title)
        } else {
            format!("{prefix}{} [{}]", self.title, self.unit)
        }
    }
}

fn font(size: u32) -> TextStyle<'static> {
    (FAMILY, size).into_font().into()
}

/// Renders `draw` onto a white `width × height` canvas and writes it to `path` as PNG.
fn render(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> DrawResult) -> Result<()> {
    ensure_registered();
    let plot_err = |message: String| ReportError::Plot {
        path: path.to_path_buf(),
        message,
    };
    let (w, h) = size;
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
        draw(&root).map_err(|e| plot_err(e.to_string()))?;
        root.present().map_err(|e| plot_err(e.to_string()))?;
    }
    let mut png = Vec::new();
    // Best compression: the charts are flat colours, and the quick report is committed to git.
    image::codecs::png::PngEncoder::new_with_quality(
        &mut png,
        image::codecs::png::CompressionType::Best,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(&buf, w, h, image::ColorType::Rgb8)
    .map_err(|e| plot_err(format!("cannot encode PNG: {e}")))?;
    starflow_data::atomic_file::write(path, &png)?;
    Ok(())
}

/// `(lo, hi)` of the finite values, widened by `pad` of the span (and made non-degenerate).
fn range_of<'a>(values: impl IntoIterator<Item = &'a f64>, pad: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &v in values {
        if v.is_finite() {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi > lo {
        hi - lo
    } else {
        lo.abs().max(1.0) * 0.1
    };
    (lo - pad * span, hi + pad * span)
}

/// Central range holding all but `tail` of the values on each side, widened to include `extra`.
fn robust_range(values: &[f64], tail: f64, extra: &[f64]) -> (f64, f64) {
    let mut s: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    let (mut lo, mut hi) = (quantile(&s, tail), quantile(&s, 1.0 - tail));
    for &e in extra {
        if e.is_finite() {
            lo = lo.min(e);
            hi = hi.max(e);
        }
    }
    range_of([lo, hi].iter(), 0.08)
}

fn title_area<'a>(root: &Area<'a>, title: &str) -> std::result::Result<Area<'a>, Box<dyn Error>> {
    root.draw_text(title, &font(22), (12, 8))?;
    Ok(root.margin(36, 0, 0, 0))
}

/// A chart of f64 against f64 on one panel, as every figure here draws them.
type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// The frame of a panel: margin, an optional caption `(text, font size)`, the sizes of the x and y
/// label areas, and the plotted ranges.
fn frame<'a, 'b>(
    panel: &'a Area<'b>,
    margin: u32,
    caption: Option<(&str, u32)>,
    (x_area, y_area): (u32, u32),
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> std::result::Result<Chart<'a, 'b>, Box<dyn Error>> {
    let mut builder = ChartBuilder::on(panel);
    builder
        .margin(margin)
        .x_label_area_size(x_area)
        .y_label_area_size(y_area);
    if let Some((text, size)) = caption {
        builder.caption(text, font(size));
    }
    Ok(builder.build_cartesian_2d(x, y)?)
}

/// Axes with white grid lines, ticks written by [`fmt_tick`] in font size `text`, and the two axis
/// descriptions one size larger.
fn axes(chart: &mut Chart<'_, '_>, x_desc: &str, y_desc: &str, text: u32) -> DrawResult {
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_label_formatter(&|v| fmt_tick(*v))
        .y_label_formatter(&|v| fmt_tick(*v))
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(font(text))
        .axis_desc_style(font(text + 1))
        .draw()?;
    Ok(())
}

/// The legend: framed, on a translucent white box, at `position`.
fn legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    text: u32,
    position: SeriesLabelPosition,
) -> DrawResult {
    chart
        .configure_series_labels()
        .label_font(font(text))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(position)
        .draw()?;
    Ok(())
}

/// Training and validation NLL per epoch, with the epoch whose weights were kept.
pub fn loss_curve(
    path: &Path,
    history: &[EpochRecord],
    best_epoch: Option<usize>,
    title: &str,
) -> Result<()> {
    render(path, (900, 560), |root| {
        let area = title_area(root, title)?;
        let n = history.len().max(1) as f64;
        let vals: Vec<f64> = history
            .iter()
            .flat_map(|r| [r.train_nll, r.val_nll])
            .collect();
        let (lo, hi) = range_of(&vals, 0.08);
        let mut chart = frame(&area, 14, None, (44, 64), 0.5..n + 0.5, lo..hi)?;
        axes(&mut chart, "epoch", "negative log-likelihood (z-units)", 15)?;
        for (name, color, pick) in [
            (
                "train",
                TRAIN,
                (|r: &EpochRecord| r.train_nll) as fn(&EpochRecord) -> f64,
            ),
            ("validation", VAL, |r: &EpochRecord| r.val_nll),
        ] {
            let pts: Vec<(f64, f64)> = history
                .iter()
                .map(|r| ((r.epoch + 1) as f64, pick(r)))
                .filter(|p| p.1.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        if let Some(b) = best_epoch {
            let x = (b + 1) as f64;
            chart
                .draw_series(LineSeries::new(
                    vec![(x, lo), (x, hi)],
                    GREY.stroke_width(1),
                ))?
                .label(format!("kept: epoch {}", b + 1))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREY));
        }
        legend(&mut chart, 15, SeriesLabelPosition::UpperRight)
    })
}

/// Pull histograms per label against N(0, 1), with the fitted mean and std written on each panel
/// (and, when given, the pull std after recalibration).
pub fn pulls(
    path: &Path,
    labels: &[LabelInfo],
    pulls: &[Vec<f64>],
    scaled_std: Option<&[f64]>,
    title: &str,
) -> Result<()> {
    let d = labels.len();
    render(path, (480 * d as u32, 460), |root| {
        let area = title_area(root, title)?;
        for (j, panel) in area.split_evenly((1, d)).iter().enumerate() {
            let h = Histogram::new(&pulls[j], -5.0, 5.0, 40);
            let (m, s) = mean_std(&pulls[j]);
            let top = h.density.iter().copied().fold(0.41, f64::max) * 1.18;
            let caption = Some((labels[j].title.as_str(), 18));
            let mut chart = frame(panel, 12, caption, (42, 52), -5.0..5.0, 0.0..top)?;
            axes(&mut chart, "pull = (mean - truth) / std", "density", 14)?;
            chart
                .draw_series(h.bars().map(|(a, b, v)| {
                    Rectangle::new([(a, 0.0), (b, v)], TRAIN.mix(0.55).filled())
                }))?;
            let grid: Vec<f64> = (0..=200).map(|k| -5.0 + 0.05 * k as f64).collect();
            chart
                .draw_series(LineSeries::new(
                    grid.iter().map(|&x| (x, normal_pdf(x, 0.0, 1.0))),
                    REFERENCE.stroke_width(2),
                ))?
                .label("N(0, 1)")
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], REFERENCE.stroke_width(2))
                });
            if s > 0.0 && s.is_finite() {
                chart
                    .draw_series(LineSeries::new(
                        grid.iter().map(|&x| (x, normal_pdf(x, m, s))),
                        BLACK.stroke_width(1),
                    ))?
                    .label("fitted normal")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
            }
            legend(&mut chart, 13, SeriesLabelPosition::UpperRight)?;
            let mut note = format!("mean {m:+.3}\nstd  {s:.3}\n{} beyond ±5", h.outside);
            if let Some(v) = scaled_std.and_then(|v| v.get(j)) {
                note.push_str(&format!("\nrecalibrated std {v:.3}"));
            }
            for (k, line) in note.lines().enumerate() {
                panel.draw_text(line, &font(14), (70, 48 + 18 * k as i32))?;
            }
        }
        Ok(())
    })
}

/// Predicted posterior mean against the true value (identity line, R²), and the residual against
/// the true value, per label in physical units.
pub fn predicted_vs_true(
    path: &Path,
    labels: &[LabelInfo],
    truth: &[Vec<f64>],
    pred: &[Vec<f64>],
    title: &str,
) -> Result<()> {
    let d = labels.len();
    render(path, (480 * d as u32, 900), |root| {
        let area = title_area(root, title)?;
        let panels = area.split_evenly((2, d));
        for j in 0..d {
            let (t, p) = (&truth[j], &pred[j]);
            let (lo, hi) = range_of(t.iter().chain(p.iter()), 0.04);
            let caption = Some((labels[j].title.as_str(), 18));
            let mut chart = frame(&panels[j], 12, caption, (42, 64), lo..hi, lo..hi)?;
            let x_desc = labels[j].axis("true ");
            axes(&mut chart, &x_desc, &labels[j].axis("predicted "), 14)?;
            chart.draw_series(
                t.iter()
                    .zip(p)
                    .map(|(&x, &y)| Circle::new((x, y), 2, TRAIN.mix(0.35).filled())),
            )?;
            chart.draw_series(LineSeries::new(
                vec![(lo, lo), (hi, hi)],
                REFERENCE.stroke_width(2),
            ))?;
            let err: Vec<f64> = p.iter().zip(t).map(|(a, b)| a - b).collect();
            let (bias, _) = mean_std(&err);
            let rmse = (err.iter().map(|e| e * e).sum::<f64>() / err.len().max(1) as f64).sqrt();
            for (k, line) in [
                format!("R² = {:.4}", r2(p, t)),
                format!("RMSE = {}", fmt_sig(rmse)),
                format!("bias = {}", fmt_sig(bias)),
            ]
            .iter()
            .enumerate()
            {
                panels[j].draw_text(line, &font(14), (80, 48 + 18 * k as i32))?;
            }

            let (rlo, rhi) = robust_range(&err, 0.002, &[0.0]);
            let mut res = frame(&panels[d + j], 12, None, (42, 64), lo..hi, rlo..rhi)?;
            axes(&mut res, &x_desc, &labels[j].axis("predicted - true "), 14)?;
            res.draw_series(
                t.iter().zip(&err).map(|(&x, &y)| {
                    Circle::new((x, y.clamp(rlo, rhi)), 2, TRAIN.mix(0.35).filled())
                }),
            )?;
            res.draw_series(LineSeries::new(
                vec![(lo, 0.0), (hi, 0.0)],
                REFERENCE.stroke_width(2),
            ))?;
            for s in [-rmse, rmse] {
                res.draw_series(LineSeries::new(
                    vec![(lo, s), (hi, s)],
                    GREY.stroke_width(1),
                ))?;
            }
        }
        Ok(())
    })
}

/// Calibration of the marginals: per label, the empirical against the nominal coverage of
/// central intervals (the model's posteriors and, when given, the recalibrated ones) above a PIT
/// histogram.
pub fn calibration(
    path: &Path,
    labels: &[LabelInfo],
    pits: &[Vec<f64>],
    scaled: Option<&[Vec<f64>]>,
    title: &str,
) -> Result<()> {
    let d = labels.len();
    render(path, (480 * d as u32, 900), |root| {
        let area = title_area(root, title)?;
        let panels = area.split_evenly((2, d));
        let levels: Vec<f64> = (0..=50).map(|k| k as f64 / 50.0).collect();
        for j in 0..d {
            let curves = Curves {
                model: coverage_curve(&pits[j], &levels),
                scaled: scaled
                    .and_then(|v| v.get(j))
                    .map(|sc| coverage_curve(sc, &levels)),
                levels: &levels,
            };
            let c = coverage_curve(&pits[j], &[0.6827, 0.9545]);
            coverage_panel(
                &panels[j],
                labels[j].title.as_str(),
                "nominal coverage of the central interval",
                &curves,
                &[
                    format!("68.3 % interval: {:.1} %", 100.0 * c[0]),
                    format!("95.4 % interval: {:.1} %", 100.0 * c[1]),
                ],
            )?;
            uniform_histogram(
                &panels[d + j],
                &pits[j],
                "PIT = posterior CDF at the true value",
            )?;
        }
        Ok(())
    })
}

/// Coverage against signal-to-noise, one panel per label: the 68.3 % and 95.4 % intervals'
/// coverage (the lower and the upper pair of lines) in each SNR bin (x: the bin's median SNR, log scale) for the model's own posteriors
/// (thin) and the recalibrated ones (thick), with ±1 standard error and the per-kind target bands
/// (±3 and ±2 points) shaded. A population can be calibrated while each end of the SNR range is
/// not; this shows where.
pub fn coverage_vs_snr(
    path: &Path,
    labels: &[LabelInfo],
    own: &[SnrBin],
    recalibrated: &[SnrBin],
    title: &str,
) -> Result<()> {
    let d = labels.len();
    let x = |b: &SnrBin| b.snr[1].max(1e-3).log10();
    let all = own.iter().chain(recalibrated);
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), bin| {
        (a.min(x(bin)), b.max(x(bin)))
    });
    let pad = 0.05 * (hi - lo).max(0.1);
    let (x0, x1) = (lo - pad, hi + pad);
    render(path, (480 * d as u32, 480), |root| {
        let area = title_area(root, title)?;
        let panels = area.split_evenly((1, d));
        for j in 0..d {
            let mut chart = frame(
                &panels[j],
                12,
                Some((labels[j].title.as_str(), 18)),
                (42, 56),
                x0..x1,
                40.0..100.0,
            )?;
            axes(&mut chart, "log10 SNR (bin median)", "coverage (%)", 14)?;
            for (nominal, band) in [(68.27, 3.0), (95.45, 2.0)] {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(x0, nominal - band), (x1, nominal + band)],
                    GREY.mix(0.18).filled(),
                )))?;
            }
            let mut series =
                |bins: &[SnrBin], colour: RGBColor, width: u32, name: &str| -> DrawResult {
                    for k in 0..2 {
                        let point = |b: &SnrBin| {
                            let l = &b.labels[j];
                            let (c, se) = if k == 0 {
                                (l.coverage_68, l.coverage_68_se)
                            } else {
                                (l.coverage_95, l.coverage_95_se)
                            };
                            (x(b), 100.0 * c, 100.0 * se)
                        };
                        let points: Vec<(f64, f64, f64)> = bins.iter().map(point).collect();
                        let drawn = chart.draw_series(LineSeries::new(
                            points.iter().map(|(a, c, _)| (*a, *c)),
                            colour.stroke_width(width),
                        ))?;
                        if k == 0 {
                            let label = name.to_string();
                            drawn.label(label).legend(move |(px, py)| {
                                PathElement::new(
                                    vec![(px, py), (px + 20, py)],
                                    colour.stroke_width(width),
                                )
                            });
                        }
                        chart.draw_series(points.iter().map(|(a, c, e)| {
                            PathElement::new(vec![(*a, c - e), (*a, c + e)], colour.stroke_width(1))
                        }))?;
                    }
                    Ok(())
                };
            series(own, TRAIN, 1, "model's own")?;
            series(recalibrated, VAL, 3, "recalibrated")?;
            legend(&mut chart, 13, SeriesLabelPosition::LowerRight)?;
        }
        Ok(())
    })
}

/// Joint calibration: the empirical against the nominal coverage of the posteriors' 3-D
/// highest-density regions, from each star's HPD level (`StarPrediction::hpd`: the truth lies in
/// the region of mass `a` exactly when its level is `<= a`), above the histogram of the levels,
/// which is flat for a calibrated joint posterior.
pub fn joint_calibration(
    path: &Path,
    hpd: &[f64],
    scaled: Option<&[f64]>,
    title: &str,
) -> Result<()> {
    let levels: Vec<f64> = (0..=50).map(|k| k as f64 / 50.0).collect();
    let below =
        |h: &[f64], a: f64| h.iter().filter(|&&v| v <= a).count() as f64 / h.len().max(1) as f64;
    let curve = |h: &[f64]| levels.iter().map(|&a| below(h, a)).collect::<Vec<f64>>();
    render(path, (560, 900), |root| {
        let area = title_area(root, title)?;
        let panels = area.split_evenly((2, 1));
        let curves = Curves {
            model: curve(hpd),
            scaled: scaled.map(curve),
            levels: &levels,
        };
        coverage_panel(
            &panels[0],
            "joint (all labels)",
            "nominal mass of the highest-density region",
            &curves,
            &[
                format!("68.3 % region: {:.1} %", 100.0 * below(hpd, 0.6827)),
                format!("95.4 % region: {:.1} %", 100.0 * below(hpd, 0.9545)),
            ],
        )?;
        uniform_histogram(
            &panels[1],
            hpd,
            "HPD level = posterior mass denser than the truth",
        )?;
        Ok(())
    })
}

/// Coverage curves on a common grid of nominal levels.
struct Curves<'a> {
    levels: &'a [f64],
    model: Vec<f64>,
    scaled: Option<Vec<f64>>,
}

/// One panel of empirical against nominal coverage with the diagonal of a calibrated model and
/// `notes` written in its upper left corner.
fn coverage_panel(
    panel: &Area<'_>,
    caption: &str,
    x_desc: &str,
    curves: &Curves<'_>,
    notes: &[String],
) -> DrawResult {
    let mut chart = frame(panel, 12, Some((caption, 18)), (42, 56), 0.0..1.0, 0.0..1.0)?;
    axes(&mut chart, x_desc, "empirical coverage", 14)?;
    let diagonal = [(0.0, 0.0), (1.0, 1.0)];
    chart
        .draw_series(LineSeries::new(diagonal, REFERENCE.stroke_width(2)))?
        .label("calibrated")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], REFERENCE.stroke_width(2)));
    let mut line = |ys: &[f64], name: &str, colour: RGBColor| -> DrawResult {
        chart
            .draw_series(LineSeries::new(
                curves.levels.iter().copied().zip(ys.iter().copied()),
                colour.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        Ok(())
    };
    line(&curves.model, "model", TRAIN)?;
    if let Some(sc) = &curves.scaled {
        line(sc, "recalibrated", VAL)?;
    }
    legend(&mut chart, 13, SeriesLabelPosition::LowerRight)?;
    for (k, note) in notes.iter().enumerate() {
        panel.draw_text(note, &font(14), (70, 48 + 18 * k as i32))?;
    }
    Ok(())
}

/// Density histogram of values in [0, 1] against the flat density 1 they should have.
fn uniform_histogram(panel: &Area<'_>, values: &[f64], x_desc: &str) -> DrawResult {
    let h = Histogram::new(values, 0.0, 1.0 + 1e-12, 20);
    let top = h.density.iter().copied().fold(1.0, f64::max) * 1.15;
    let mut hist = frame(panel, 12, None, (42, 56), 0.0..1.0, 0.0..top)?;
    axes(&mut hist, x_desc, "density", 14)?;
    hist.draw_series(
        h.bars()
            .map(|(a, b, v)| Rectangle::new([(a, 0.0), (b.min(1.0), v)], TRAIN.mix(0.55).filled())),
    )?;
    hist.draw_series(LineSeries::new(
        vec![(0.0, 1.0), (1.0, 1.0)],
        REFERENCE.stroke_width(2),
    ))?;
    Ok(())
}

/// Corner plot of one star's posterior: 1-D marginals on the diagonal, 2-D marginals below it, the
/// true value in green and the Gaussian with the samples' mean and covariance in red (curves and
/// 68 %/95 % contours) — where the flow departs from a Gaussian, the two disagree visibly.
pub fn corner(path: &Path, labels: &[LabelInfo], star: &StarSamples, title: &str) -> Result<()> {
    let d = star.dim;
    let n = star.samples.len() / d;
    let column = |j: usize| -> Vec<f64> { (0..n).map(|k| star.samples[k * d + j]).collect() };
    let cols: Vec<Vec<f64>> = (0..d).map(column).collect();
    let (mean, cov) = mean_cov(&star.samples, d);
    let ranges: Vec<(f64, f64)> = (0..d)
        .map(|j| {
            let s = cov[j * d + j].sqrt();
            robust_range(
                &cols[j],
                0.002,
                &[star.truth[j], mean[j] - 2.5 * s, mean[j] + 2.5 * s],
            )
        })
        .collect();
    let c = Corner {
        labels,
        truth: &star.truth,
        cols,
        mean,
        cov,
        ranges,
    };
    render(path, (330 * d as u32, 330 * d as u32 + 40), |root| {
        let area = title_area(root, title)?;
        let cells = area.split_evenly((d, d));
        for i in 0..d {
            for j in 0..=i {
                let cell = &cells[i * d + j];
                if i == j {
                    c.marginal(cell, j)?;
                } else {
                    c.joint(cell, i, j)?;
                }
            }
        }
        // Key and numbers in the empty upper-right triangle.
        if d > 1 {
            c.key(&cells[d - 1], n)?;
        }
        Ok(())
    })
}

/// What a corner plot draws: per label its samples (`cols`), the samples' mean and covariance
/// (`d x d`), the axis range and the truth.
struct Corner<'a> {
    labels: &'a [LabelInfo],
    truth: &'a [f64],
    cols: Vec<Vec<f64>>,
    mean: Vec<f64>,
    cov: Vec<f64>,
    ranges: Vec<(f64, f64)>,
}

impl Corner<'_> {
    fn d(&self) -> usize {
        self.mean.len()
    }

    /// The x-axis title of a cell in column `j`: only the bottom row has one.
    fn x_desc(&self, i: usize, j: usize) -> String {
        if i + 1 == self.d() {
            self.labels[j].axis("")
        } else {
            String::new()
        }
    }

    /// Label `j`'s 1-D marginal: a histogram of its samples, the Gaussian and the truth.
    fn marginal(&self, cell: &Area<'_>, j: usize) -> DrawResult {
        let (d, (xlo, xhi)) = (self.d(), self.ranges[j]);
        let (m, s) = (self.mean[j], self.cov[j * d + j].sqrt());
        let h = Histogram::new(&self.cols[j], xlo, xhi, 40);
        let peak = normal_pdf(m, m, s);
        let top = h.density.iter().copied().fold(peak, f64::max) * 1.15;
        let mut chart = frame(cell, 8, None, (40, 20), xlo..xhi, 0.0..top)?;
        chart
            .configure_mesh()
            .disable_y_axis()
            .disable_mesh()
            .x_label_formatter(&|v| fmt_tick(*v))
            .x_desc(self.x_desc(j, j))
            .x_labels(4)
            .label_style(font(12))
            .axis_desc_style(font(14))
            .draw()?;
        chart.draw_series(
            h.bars()
                .map(|(a, b, v)| Rectangle::new([(a, 0.0), (b, v)], TRAIN.mix(0.55).filled())),
        )?;
        let grid = (0..=160).map(|k| xlo + (xhi - xlo) * k as f64 / 160.0);
        chart.draw_series(LineSeries::new(
            grid.map(|x| (x, normal_pdf(x, m, s))),
            REFERENCE.stroke_width(2),
        ))?;
        let t = self.truth[j];
        chart.draw_series(LineSeries::new(
            vec![(t, 0.0), (t, top)],
            TRUTH.stroke_width(2),
        ))?;
        Ok(())
    }

    /// The 2-D marginal of labels `j` (x) and `i` (y): the samples' density as shaded bins, the
    /// Gaussian's 68 % and 95 % contours and the truth.
    fn joint(&self, cell: &Area<'_>, i: usize, j: usize) -> DrawResult {
        let (d, (xlo, xhi), (ylo, yhi)) = (self.d(), self.ranges[j], self.ranges[i]);
        let y_area = if j == 0 { 64 } else { 20 };
        let mut chart = frame(cell, 8, None, (40, y_area), xlo..xhi, ylo..yhi)?;
        let mut mesh = chart.configure_mesh();
        mesh.disable_mesh()
            .x_label_formatter(&|v| fmt_tick(*v))
            .y_label_formatter(&|v| fmt_tick(*v))
            .x_desc(self.x_desc(i, j))
            .x_labels(4)
            .y_labels(4)
            .label_style(font(12))
            .axis_desc_style(font(14));
        if j == 0 {
            mesh.y_desc(self.labels[i].axis(""));
        } else {
            mesh.disable_y_axis();
        }
        mesh.draw()?;
        let bins = 30usize;
        let mut counts = vec![0usize; bins * bins];
        for (&x, &y) in self.cols[j].iter().zip(&self.cols[i]) {
            if x >= xlo && x < xhi && y >= ylo && y < yhi {
                let bx = ((x - xlo) / (xhi - xlo) * bins as f64) as usize;
                let by = ((y - ylo) / (yhi - ylo) * bins as f64) as usize;
                counts[by.min(bins - 1) * bins + bx.min(bins - 1)] += 1;
            }
        }
        let max = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
        let (wx, wy) = ((xhi - xlo) / bins as f64, (yhi - ylo) / bins as f64);
        chart.draw_series(
            counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(k, &c)| {
                    let (bx, by) = ((k % bins) as f64, (k / bins) as f64);
                    let shade = (c as f64 / max).sqrt();
                    Rectangle::new(
                        [
                            (xlo + bx * wx, ylo + by * wy),
                            (xlo + (bx + 1.0) * wx, ylo + (by + 1.0) * wy),
                        ],
                        TRAIN.mix(0.1 + 0.85 * shade).filled(),
                    )
                }),
        )?;
        let cov = &self.cov;
        let c2 = [
            [cov[j * d + j], cov[j * d + i]],
            [cov[i * d + j], cov[i * d + i]],
        ];
        for p in [0.6827, 0.9545] {
            chart.draw_series(LineSeries::new(
                ellipse([self.mean[j], self.mean[i]], c2, radius_2d(p), 96),
                REFERENCE.stroke_width(2),
            ))?;
        }
        let (tx, ty) = (self.truth[j], self.truth[i]);
        chart.draw_series(std::iter::once(Cross::new(
            (tx, ty),
            7,
            TRUTH.stroke_width(3),
        )))?;
        Ok(())
    }

    /// The key and each label's mean ± std (true value) of `n` samples.
    fn key(&self, key: &Area<'_>, n: usize) -> DrawResult {
        let d = self.d();
        let mut lines = vec![
            (format!("{n} posterior samples"), TRAIN),
            ("Gaussian with their mean/covariance".to_string(), REFERENCE),
            ("true value".to_string(), TRUTH),
            (String::new(), BLACK),
        ];
        for j in 0..d {
            let s = self.cov[j * d + j].sqrt();
            lines.push((
                format!(
                    "{}: {} ± {} (true {})",
                    self.labels[j].title,
                    fmt_sig(self.mean[j]),
                    fmt_sig(s),
                    fmt_sig(self.truth[j])
                ),
                BLACK,
            ));
        }
        for (k, (text, color)) in lines.iter().enumerate() {
            key.draw_text(text, &font(14).color(color), (4, 20 + 20 * k as i32))?;
        }
        Ok(())
    }
}

/// One spectrum, one panel per HERMES camera (or one panel when the grid is not the four-camera
/// layout).
pub fn spectrum(
    path: &Path,
    wavelength: &[f64],
    flux: &[f32],
    cameras: &[(&str, usize, usize)],
    title: &str,
) -> Result<()> {
    let n_panels = cameras.len().max(1);
    let (rows, cols) = if n_panels == 4 { (2, 2) } else { (n_panels, 1) };
    render(path, (1400, 420 * rows as u32 + 40), |root| {
        let area = title_area(root, title)?;
        let panels = area.split_evenly((rows, cols));
        for (k, &(name, a, b)) in cameras.iter().enumerate() {
            let w = &wavelength[a..b];
            let f: Vec<f64> = flux[a..b].iter().map(|&v| v as f64).collect();
            let (xlo, xhi) = range_of(w, 0.0);
            let (flo, fhi) = robust_range(&f, 0.0005, &[0.0, 1.05]);
            let caption = format!("{name} camera");
            let mut chart = frame(
                &panels[k],
                10,
                Some((&caption, 17)),
                (40, 56),
                xlo..xhi,
                flo..fhi,
            )?;
            axes(&mut chart, "wavelength [Å]", "normalised flux", 13)?;
            chart.draw_series(LineSeries::new(
                w.iter().copied().zip(f.iter().map(|v| v.clamp(flo, fhi))),
                BLACK.stroke_width(1),
            ))?;
        }
        Ok(())
    })
}

/// Tick labels: as few decimals as the value needs (`6500`, `4.5`, `-0.25`).
pub fn fmt_tick(v: f64) -> String {
    let t = format!("{v:.3}");
    let t = t.trim_end_matches('0').trim_end_matches('.');
    if t == "-0" {
        "0".into()
    } else {
        t.to_string()
    }
}

/// Three significant digits without scientific notation for the magnitudes of stellar labels.
pub fn fmt_sig(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        format!("{v}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 || a == 0.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}
