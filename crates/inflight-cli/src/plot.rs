//! `inflight plot`: a trace replayed under each release policy, drawn as
//! live, reserved and pending bytes over the trace's events (or its `t`
//! field), as an SVG written here or a PNG rendered from that SVG (resvg,
//! pure Rust).
//!
//! The replay is [`crate::replay`]'s, sampled through its tap: the events
//! are cut into at most `--points` spans, and each point is the highest
//! value in its span for live bytes (requested sizes of live trace
//! buffers, the same under every policy) and reserved bytes (the
//! allocator's peak since the previous point), and the value at the end of
//! the span for pending bytes (freed while work still used them).

use std::fmt::Write as _;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use inflight::{Allocator, Harness, Policy, PolicyKind};

use crate::args::{policies, ConfigArgs};
use crate::backends::{with_backend, BackendJob, Validator};
use crate::progress::Steps;
use crate::replay::{self, ReplaySettings, RunArgs};
use crate::trace::{Event, Trace};
use crate::units::fmt_bytes;

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XAxis {
    /// The count of events replayed.
    Events,
    /// The events' `t` field (µs since the start of the recording).
    Time,
}

#[derive(clap::Args)]
pub struct PlotArgs {
    /// The trace: JSON Lines (docs/TRACE.md), gzip-compressed or not.
    file: PathBuf,
    /// The image to write: a name ending in .svg or .png.
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// The x axis.
    #[arg(long, value_enum, default_value_t = XAxis::Events)]
    x: XAxis,
    #[command(flatten)]
    run: RunArgs,
    /// The most points per line.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(2..=100_000))]
    points: u64,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1200, value_parser = clap::value_parser!(u32).range(400..=10_000))]
    width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 675, value_parser = clap::value_parser!(u32).range(300..=10_000))]
    height: u32,
    /// The title [default: the trace's file name].
    #[arg(long)]
    title: Option<String>,
    /// No progress display.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

/// One policy's sampled replay.
#[derive(Clone, Debug)]
pub struct Series {
    pub policy: PolicyKind,
    /// Per point: the peak reserved bytes over its span.
    pub reserved: Vec<u64>,
    /// Per point: the pending bytes at its end.
    pub pending: Vec<u64>,
}

/// Everything drawn.
#[derive(Clone, Debug)]
pub struct Chart {
    pub title: String,
    pub subtitle: String,
    pub x_label: String,
    /// The x of each point (events, or seconds if `x_label` starts with
    /// "time"), rising; the first is 0.
    pub xs: Vec<f64>,
    /// Per point: the peak live bytes over its span.
    pub live: Vec<u64>,
    pub series: Vec<Series>,
    pub width: u32,
    pub height: u32,
}

/// Which events end a span: every `every`-th, and the last.
fn span_ends(n: usize, points: u64) -> usize {
    (n as u64).div_ceil(points.max(1)).max(1) as usize
}

fn is_end(i: usize, every: usize, n: usize) -> bool {
    (i + 1) % every == 0 || i + 1 == n
}

/// The peak live bytes of each span, from the trace alone.
pub fn live_points(trace: &Trace, every: usize) -> Vec<u64> {
    let n = trace.events.len();
    let mut sizes = vec![0u64; trace.slots];
    let (mut live, mut peak) = (0u64, 0u64);
    let mut out = vec![0];
    for (i, e) in trace.events.iter().enumerate() {
        match *e {
            Event::Alloc { slot, bytes, .. } => {
                sizes[slot as usize] = bytes;
                live += bytes;
            }
            Event::Free { slot } => live -= sizes[slot as usize],
            _ => {}
        }
        peak = peak.max(live);
        if is_end(i, every, n) {
            out.push(peak);
            peak = live;
        }
    }
    out
}

/// The `t` of each event (µs), from a second pass over the file; events
/// without one take the one before.
fn event_times(path: &Path, trace: &Trace) -> anyhow::Result<Vec<f64>> {
    #[derive(serde::Deserialize)]
    struct T {
        t: Option<f64>,
    }
    let mut reader = crate::input::open(path)?;
    let mut times = Vec::with_capacity(trace.events.len());
    let (mut line, mut buf, mut last, mut any) = (0u32, String::new(), 0.0, false);
    let mut want = trace.lines.iter().peekable();
    while want.peek().is_some() {
        buf.clear();
        if reader.read_line(&mut buf)? == 0 {
            break;
        }
        line += 1;
        if want.peek() == Some(&&line) {
            want.next();
            if let Some(t) = serde_json::from_str::<T>(buf.trim())
                .with_context(|| format!("{}: line {line}", path.display()))?
                .t
            {
                last = t;
                any = true;
            }
            times.push(last);
        }
    }
    if !any {
        anyhow::bail!(
            "--x time: {} has no \"t\" fields (use --x events)",
            path.display()
        );
    }
    anyhow::ensure!(
        times.len() == trace.events.len(),
        "{} changed while read",
        path.display()
    );
    Ok(times)
}

struct PlotJob<'a> {
    policy: Policy,
    trace: &'a Trace,
    settings: &'a ReplaySettings,
    every: usize,
    quiet: bool,
}

impl BackendJob for PlotJob<'_> {
    type Output = Series;

    fn run<B: Harness>(self, backend: B, validator: &dyn Validator) -> anyhow::Result<Series> {
        let n = self.trace.events.len();
        let mut steps = Steps::new(&self.policy.to_string(), "events", n as u64, self.quiet);
        let mut reserved = vec![0];
        let mut pending = vec![0];
        let every = self.every;
        let mut tap = |i: usize, alloc: &Allocator<B>| {
            steps.set(i as u64 + 1);
            if is_end(i, every, n) {
                let s = alloc.stats();
                reserved.push(s.peak_reserved_bytes);
                pending.push(s.pending_bytes);
                alloc.reset_peak();
            }
        };
        replay::run_with_tap(
            backend,
            validator,
            self.policy,
            self.trace,
            self.settings,
            None,
            &mut tap,
        )?;
        steps.finish();
        Ok(Series {
            policy: self.policy.kind(),
            reserved,
            pending,
        })
    }
}

pub fn command(a: PlotArgs) -> anyhow::Result<ExitCode> {
    let png = match a.output.extension().and_then(|e| e.to_str()) {
        Some("svg") => false,
        Some("png") => true,
        _ => anyhow::bail!(
            "{}: the image's name must end in .svg or .png",
            a.output.display()
        ),
    };
    let (opts, settings) = a.run.setup(&a.config, true)?;
    let trace = crate::trace::load(&a.file)?;
    let n = trace.events.len();
    let every = span_ends(n, a.points);
    let xs: Vec<f64> = match a.x {
        XAxis::Events => std::iter::once(0.0)
            .chain(
                (0..n)
                    .filter(|&i| is_end(i, every, n))
                    .map(|i| (i + 1) as f64),
            )
            .collect(),
        XAxis::Time => {
            let t = event_times(&a.file, &trace)?;
            let t0 = t[0];
            // Never back in time: a `t` below an earlier one (threads
            // stamping out of order) takes the earlier one.
            let mut latest = 0.0f64;
            std::iter::once(0.0)
                .chain((0..n).filter(|&i| is_end(i, every, n)).map(|i| {
                    latest = latest.max((t[i] - t0) / 1e6);
                    latest
                }))
                .collect()
        }
    };
    let mut series = Vec::new();
    for policy in policies(a.run.policy) {
        let job = PlotJob {
            policy,
            trace: &trace,
            settings: &settings,
            every,
            quiet: a.quiet,
        };
        series.push(with_backend(a.run.backend, &opts, job)?);
    }
    let name = a.file.file_name().map_or_else(
        || a.file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let chart = Chart {
        title: a.title.clone().unwrap_or_else(|| format!("{name}: memory over the replay")),
        subtitle: format!(
            "{} events, {} stream{}, {}; memory limit {}; each point the peak over {} event{} (pending: at its end)",
            group(n as u64),
            trace.streams.len(),
            if trace.streams.len() == 1 { "" } else { "s" },
            if trace.explicit_submissions {
                "submissions as in the trace".to_string()
            } else {
                format!("committed every {} events", settings.commit_every)
            },
            fmt_bytes(settings.config.memory_limit.unwrap_or(replay::DEFAULT_MEMORY_LIMIT)),
            every,
            if every == 1 { "" } else { "s" },
        ),
        x_label: match a.x {
            XAxis::Events => "events replayed".into(),
            XAxis::Time => "time since the first event".into(),
        },
        xs,
        live: live_points(&trace, every),
        series,
        width: a.width,
        height: a.height,
    };
    let svg = render_svg(&chart);
    if png {
        write_png(&svg, &a.output)?;
    } else {
        std::fs::write(&a.output, &svg)
            .with_context(|| format!("cannot write {}", a.output.display()))?;
    }
    let peaks: Vec<String> = chart
        .series
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                s.policy,
                fmt_bytes(s.reserved.iter().copied().max().unwrap_or(0))
            )
        })
        .collect();
    println!(
        "inflight plot: wrote {} ({}x{}, {} points a line); peak live {}, peak reserved: {}",
        a.output.display(),
        a.width,
        a.height,
        chart.xs.len(),
        fmt_bytes(chart.live.iter().copied().max().unwrap_or(0)),
        peaks.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// Renders `svg` to a PNG of the same size at `path`.
pub fn write_png(svg: &str, path: &Path) -> anyhow::Result<()> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    if opt.fontdb.is_empty() {
        eprintln!("inflight: warning: no system fonts found: the PNG has no text (the SVG has)");
    }
    let tree = usvg::Tree::from_str(svg, &opt).context("the SVG drawn does not parse")?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .context("an image of that size cannot be made")?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    let data = pixmap.encode_png().context("encoding the PNG")?;
    std::fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))
}

/// `1234567` as `1,234,567`.
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A step of 1, 2, 2.5 or 5 times a power of ten giving about `ticks`
/// ticks up to `max`.
fn nice_step(max: f64, ticks: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / ticks;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// Tick label for `v` with the decimals `step` needs.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = (0..6)
        .find(|&d| {
            let x = step * 10f64.powi(d);
            (x - x.round()).abs() < 1e-6 * x.max(1.0)
        })
        .unwrap_or(6) as usize;
    if decimals == 0 && v.abs() >= 10_000.0 {
        return group(v.round() as u64);
    }
    format!("{v:.decimals$}")
}

/// Escapes text for XML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const FONT: &str = "DejaVu Sans, Helvetica, Arial, sans-serif";

/// The color of a policy's lines.
fn color(p: PolicyKind) -> &'static str {
    match p {
        PolicyKind::Deferred => "#1f77b4",
        PolicyKind::Retained => "#2ca02c",
        _ => "#d62728",
    }
}

/// The width of the `k`-th of `n` reserved lines: 1.3 px for the last,
/// 1.1 px more for each before it.
fn reserved_width(k: usize, n: usize) -> f64 {
    1.3 + 1.1 * (n - 1 - k) as f64
}

/// The chart as SVG (see the module doc for what is drawn).
pub fn render_svg(c: &Chart) -> String {
    let (w, h) = (c.width as f64, c.height as f64);
    let (left, right, top, bottom) = (90.0, w - 310.0, 78.0, h - 62.0);
    let all = c
        .live
        .iter()
        .chain(
            c.series
                .iter()
                .flat_map(|s| s.reserved.iter().chain(&s.pending)),
        )
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    let (unit, unit_name) = if all >= 1 << 30 {
        ((1u64 << 30) as f64, "GiB")
    } else if all >= 1 << 20 {
        ((1u64 << 20) as f64, "MiB")
    } else {
        (1024.0, "KiB")
    };
    let y_step = nice_step(all as f64 / unit, 6.0);
    let y_top = ((all as f64 / unit) / y_step).ceil().max(1.0) * y_step;
    let x_max = c.xs.last().copied().unwrap_or(1.0).max(1e-9);
    let (x_scale, x_unit) = match (c.x_label.starts_with("time"), x_max) {
        (false, _) => (1.0, ""),
        (true, x) if x < 0.002 => (1e6, "µs"),
        (true, x) if x < 2.0 => (1e3, "ms"),
        (true, _) => (1.0, "s"),
    };
    let x_step_shown = nice_step(x_max * x_scale, 8.0);
    let px = |x: f64| left + (x / x_max) * (right - left);
    let py = |b: u64| bottom - (b as f64 / unit / y_top) * (bottom - top);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" viewBox="0 0 {} {}" font-family="{FONT}">"#,
        c.width, c.height, c.width, c.height
    );
    let _ = writeln!(s, "<title>{}</title>", esc(&c.title));
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text class="title" x="{:.1}" y="30" font-size="20" font-weight="bold" text-anchor="middle">{}</text>"#,
        w / 2.0,
        esc(&c.title)
    );
    let _ = writeln!(
        s,
        r##"<text class="subtitle" x="{:.1}" y="54" font-size="12.5" fill="#444" text-anchor="middle">{}</text>"##,
        w / 2.0,
        esc(&c.subtitle)
    );
    // Grid and y ticks.
    let _ = writeln!(s, r##"<g class="y-axis" font-size="12" fill="#333">"##);
    let mut v = 0.0;
    while v <= y_top + y_step * 1e-6 {
        let y = bottom - (v / y_top) * (bottom - top);
        let _ = writeln!(
            s,
            r##"<line x1="{left:.1}" y1="{y:.1}" x2="{right:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 8.0,
            y + 4.0,
            tick_label(v, y_step)
        );
        v += y_step;
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(s, r##"<g class="x-axis" font-size="12" fill="#333">"##);
    let mut v = 0.0;
    while v <= x_max * x_scale + x_step_shown * 1e-6 {
        let x = px(v / x_scale);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{bottom:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            bottom + 5.0,
            bottom + 20.0,
            tick_label(v, x_step_shown)
        );
        v += x_step_shown;
    }
    let _ = writeln!(s, "</g>");
    // Axes and their labels.
    let _ = writeln!(
        s,
        r##"<path class="frame" d="M{left:.1},{top:.1} V{bottom:.1} H{right:.1}" fill="none" stroke="#333"/>"##
    );
    let x_label = if x_unit.is_empty() {
        c.x_label.clone()
    } else {
        format!("{} ({x_unit})", c.x_label)
    };
    let _ = writeln!(
        s,
        r#"<text class="x-label" x="{:.1}" y="{:.1}" font-size="14" text-anchor="middle">{}</text>"#,
        (left + right) / 2.0,
        h - 18.0,
        esc(&x_label)
    );
    let _ = writeln!(
        s,
        r#"<text class="y-label" x="0" y="0" font-size="14" text-anchor="middle" transform="translate(24,{:.1}) rotate(-90)">memory ({unit_name})</text>"#,
        (top + bottom) / 2.0
    );
    // Lines.
    let points = |vals: &[u64]| -> String {
        let mut p = String::with_capacity(vals.len() * 14);
        for (x, &b) in c.xs.iter().zip(vals) {
            let _ = write!(p, "{:.1},{:.1} ", px(*x), py(b));
        }
        p.pop();
        p
    };
    let live = points(&c.live);
    let _ = writeln!(
        s,
        r##"<polygon class="live-area" points="{left:.1},{bottom:.1} {live} {:.1},{bottom:.1}" fill="#e6e6e6" stroke="none"/>"##,
        px(*c.xs.last().unwrap_or(&0.0))
    );
    let _ = writeln!(
        s,
        r##"<polyline class="live" points="{live}" fill="none" stroke="#555" stroke-width="1.2"/>"##
    );
    for sr in c.series.iter().rev() {
        let _ = writeln!(
            s,
            r#"<polyline class="pending" data-policy="{}" points="{}" fill="none" stroke="{}" stroke-width="1.4" stroke-dasharray="6 4"/>"#,
            sr.policy,
            points(&sr.pending),
            color(sr.policy)
        );
    }
    // Each reserved line thinner than the one drawn before it, so that
    // lines that coincide (immediate's and deferred's often do) all show.
    let n = c.series.len();
    for (k, sr) in c.series.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<polyline class="reserved" data-policy="{}" points="{}" fill="none" stroke="{}" stroke-width="{:.1}" stroke-linejoin="round"/>"#,
            sr.policy,
            points(&sr.reserved),
            color(sr.policy),
            reserved_width(k, n)
        );
    }
    // Legend.
    let lx = right + 22.0;
    let mut ly = top + 6.0;
    let _ = writeln!(s, r#"<g class="legend" font-size="12">"#);
    let peak = |v: &[u64]| fmt_bytes(v.iter().copied().max().unwrap_or(0));
    let mut entry = |s: &mut String, style: &str, text: String| {
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" {style}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 30.0,
            lx + 38.0,
            ly + 4.5,
            esc(&text)
        );
        ly += 22.0;
    };
    entry(
        &mut s,
        r##"stroke="#555" stroke-width="8" stroke-opacity="0.25""##,
        format!("live (requested), peak {}", peak(&c.live)),
    );
    for sr in &c.series {
        entry(
            &mut s,
            &format!(r#"stroke="{}" stroke-width="2.5""#, color(sr.policy)),
            format!("{} reserved, peak {}", sr.policy, peak(&sr.reserved)),
        );
        entry(
            &mut s,
            &format!(
                r#"stroke="{}" stroke-width="1.4" stroke-dasharray="6 4""#,
                color(sr.policy)
            ),
            format!("{} pending, peak {}", sr.policy, peak(&sr.pending)),
        );
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> Chart {
        Chart {
            title: "t.jsonl: memory <over> the replay".into(),
            subtitle: "3 events".into(),
            x_label: "events replayed".into(),
            xs: vec![0.0, 2.0, 3.0],
            live: vec![0, 3 << 20, 1 << 20],
            series: vec![
                Series {
                    policy: PolicyKind::Deferred,
                    reserved: vec![0, 4 << 20, 4 << 20],
                    pending: vec![0, 0, 2 << 20],
                },
                Series {
                    policy: PolicyKind::Retained,
                    reserved: vec![0, 5 << 20, 5 << 20],
                    pending: vec![0, 1 << 20, 0],
                },
            ],
            width: 1200,
            height: 675,
        }
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(1.1, 6.0), 0.2);
        assert_eq!(nice_step(4870.0, 8.0), 1000.0);
        assert_eq!(tick_label(0.4, 0.2), "0.4");
        assert_eq!(tick_label(0.75, 0.25), "0.75");
        assert_eq!(tick_label(12000.0, 2000.0), "12,000");
        assert_eq!(group(1234567), "1,234,567");
    }

    #[test]
    fn spans_cover_the_trace() {
        let every = span_ends(4870, 2000);
        assert_eq!(every, 3);
        let ends = (0..4870).filter(|&i| is_end(i, every, 4870)).count();
        assert_eq!(ends, 1624);
        assert_eq!(span_ends(10, 2000), 1);
    }

    #[test]
    fn the_svg_is_xml_with_its_lines() {
        let svg = render_svg(&chart());
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let lines: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .collect();
        assert_eq!(lines.len(), 5);
        assert!(svg.contains("&lt;over&gt;"));
        assert!(svg.contains("memory (MiB)"));
    }
}
