// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--plot FILE.svg`: the latency distribution of every workload, through
//! the daemon (top) and on the device model in-process (bottom); with
//! `--scaling`, the cost of a request against the mappings a domain holds.
//!
//! SVG only: plotters draws text into bitmaps through a font rasteriser
//! (its `ttf` feature, font-kit over the fontconfig and freetype system
//! libraries), which this crate does not build with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::histogram::Histogram;
use crate::scaling::ScalingPoint;

/// Histogram bins per power of two in the plot.
const BINS_PER_OCTAVE: f64 = 8.0;

/// Why the plot was not written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Not a `.svg` path.
    #[error(
        "--plot {0}: only SVG is supported (name the file *.svg); PNG would need a font \
         rasteriser from system libraries"
    )]
    Format(PathBuf),
    /// Drawing or writing failed.
    #[error("--plot {path}: {msg}")]
    Draw {
        /// The file.
        path: PathBuf,
        /// plotters' description.
        msg: String,
    },
}

/// Refuse a path the plot cannot be written to, before any work is done.
pub fn check_path(path: &Path) -> Result<(), PlotError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("svg") => Ok(()),
        _ => Err(PlotError::Format(path.to_path_buf())),
    }
}

/// One curve: a name and its latencies.
#[derive(Clone, Copy, Debug)]
pub struct Series<'a> {
    /// The workload (and variant).
    pub name: &'a str,
    /// Its latencies.
    pub latency: &'a Histogram,
}

/// `(latency µs at the bin's geometric centre, % of requests)` per bin of
/// 1/8 of a power of two.
fn density(h: &Histogram) -> Vec<(f64, f64)> {
    let mut bins: BTreeMap<i64, u64> = BTreeMap::new();
    for (lo, hi, count) in h.buckets() {
        let mid = (lo as f64 + hi as f64 + 1.0) / 2.0;
        let bin = (mid.max(1.0).log2() * BINS_PER_OCTAVE).floor() as i64;
        *bins.entry(bin).or_default() += count;
    }
    let total = h.count().max(1) as f64;
    bins.into_iter()
        .map(|(bin, count)| {
            let ns = ((bin as f64 + 0.5) / BINS_PER_OCTAVE).exp2();
            (ns / 1000.0, 100.0 * count as f64 / total)
        })
        .collect()
}

fn draw_err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> PlotError + '_ {
    move |e| PlotError::Draw {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Draw the latency curves into the SVG file `path`: `daemon` (through the
/// daemon, with or without QEMU) in the top panel, `direct` in the bottom.
pub fn write_svg(
    path: &Path,
    daemon: &[Series<'_>],
    direct: &[Series<'_>],
) -> Result<(), PlotError> {
    check_path(path)?;
    let draw_err = draw_err(path);
    let root = SVGBackend::new(path, (1000, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let panels = root.split_evenly((2, 1));
    let legs = [
        (
            "through the daemon (vhost-user, busy-polling driver)",
            daemon,
        ),
        ("device model in-process (direct)", direct),
    ];
    for (panel, (title, series)) in panels.iter().zip(legs) {
        let curves: Vec<(&str, Vec<(f64, f64)>)> = series
            .iter()
            .map(|s| (s.name, density(s.latency)))
            .collect();
        let points = curves.iter().flat_map(|(_, c)| c.iter());
        let (mut lo, mut hi, mut top) = (f64::MAX, f64::MIN, 1.0f64);
        for &(x, y) in points {
            lo = lo.min(x);
            hi = hi.max(x);
            top = top.max(y);
        }
        if lo > hi {
            (lo, hi) = (0.01, 100.0);
        }
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("latency, {title}"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((lo / 1.5..hi * 1.5).log_scale(), 0.0..top * 1.1)
            .map_err(|e| draw_err(&e))?;
        chart
            .configure_mesh()
            .x_desc("latency (µs, log scale)")
            .y_desc("% of requests per 1/8 octave")
            .draw()
            .map_err(|e| draw_err(&e))?;
        for (i, (name, curve)) in curves.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(curve, color.stroke_width(2)))
                .map_err(|e| draw_err(&e))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_err(&e))?;
    }
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

/// Draw the `--scaling` curves into the SVG file `path`: ns per request
/// (p50 of MAP/UNMAP) and per translation, against the mappings already in
/// the domain; both axes logarithmic.
pub fn write_scaling_svg(path: &Path, points: &[ScalingPoint]) -> Result<(), PlotError> {
    check_path(path)?;
    let draw_err = draw_err(path);
    type Pick = fn(&ScalingPoint) -> f64;
    let curves: [(&str, Pick); 4] = [
        ("device MAP/UNMAP (p50)", |p| {
            p.device.map_unmap_ns.p50 as f64
        }),
        ("device translate", |p| p.device.translate_ns),
        ("table MAP/UNMAP (p50)", |p| p.table.map_unmap_ns.p50 as f64),
        ("table translate", |p| p.table.translate_ns),
    ];
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for p in points {
        for (_, pick) in &curves {
            let v = pick(p).max(1.0);
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if lo > hi {
        (lo, hi) = (1.0, 1000.0);
    }
    let first = points.first().map_or(1.0, |p| p.existing as f64).max(1.0);
    let last = points
        .last()
        .map_or(10.0, |p| p.existing as f64)
        .max(first * 10.0);
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "cost per request vs. mappings in the domain",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (first / 1.5..last * 1.5).log_scale(),
            (lo / 1.5..hi * 1.5).log_scale(),
        )
        .map_err(|e| draw_err(&e))?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("existing 4 KiB mappings (log scale)")
        .y_desc("ns (log scale)")
        .draw()
        .map_err(|e| draw_err(&e))?;
    for (i, (name, pick)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.existing as f64, pick(p).max(1.0)))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(|e| draw_err(&e))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| draw_err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw_err(&e))?;
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_svg_paths_are_accepted() {
        assert!(check_path(Path::new("lat.svg")).is_ok());
        assert!(check_path(Path::new("LAT.SVG")).is_ok());
        assert!(matches!(
            check_path(Path::new("lat.png")),
            Err(PlotError::Format(_))
        ));
        assert!(check_path(Path::new("lat")).is_err());
    }

    #[test]
    fn density_sums_to_100_percent() {
        let mut h = Histogram::new();
        for v in [900, 1000, 1100, 5000, 5000, 20_000] {
            h.record(v);
        }
        let d = density(&h);
        let sum: f64 = d.iter().map(|p| p.1).sum();
        assert!((sum - 100.0).abs() < 1e-9);
        assert!(d.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
