//! `diredi-cloud-worker perf sweep`: scaling curves of the gateway. One knob moves at a time
//! from the base point of `perf run` (8 sensors, binary payloads, the gateway's defaults):
//!
//! - `sensors`: simulated sensors (each a separate window state in the gateway);
//! - `intra_threads`: ONNX Runtime threads per session (`[runtime] intra_threads`);
//! - `workers`: inference workers, each with its own session (`[runtime] workers`);
//! - `max_batch`: largest micro-batch (`[runtime] max_batch`);
//! - `max_wait_ms`: how long a worker waits for a batch to fill (`[runtime] max_wait_ms`; 0
//!   takes what is queued);
//! - `format`: payload format (JSON, SenML, binary);
//! - `gateway_bin`: gateway binaries (`--sweep-gateway-bins`), for example before and after a
//!   change: the same load on each, side by side in one run.
//!
//! Every point is a fresh broker and gateway with a flat-out phase (throughput) and a load
//! phase at half of it (latency, in == out), as in `perf run`. With `--repeat`, the runs go
//! round the points (every point once, then every point again), so a drift of the machine's
//! load reaches every point alike. The inference limit is measured once at the start.
//! Output: JSON, a Markdown table per curve and an SVG plot.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{report, run_target, Ctx, Latency, PerfArgs, Target};
use crate::simulate::PayloadFormat;

/// Arguments of `perf sweep`.
#[derive(clap::Args, Debug, Clone)]
pub struct SweepArgs {
    #[command(flatten)]
    pub base: PerfArgs,
    /// Sensor counts of the `sensors` curve.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000,5000")]
    pub sweep_sensors: Vec<u32>,
    /// ONNX Runtime intra-op threads of the `intra_threads` curve.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub sweep_intra_threads: Vec<u32>,
    /// Inference workers of the `workers` curve.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub sweep_workers: Vec<u32>,
    /// Largest micro-batch of the `max_batch` curve.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32,128")]
    pub sweep_max_batch: Vec<u32>,
    /// Batch waits (ms) of the `max_wait_ms` curve.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,5")]
    pub sweep_max_wait_ms: Vec<u32>,
    /// Payload formats of the `format` curve.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "json,senml,binary"
    )]
    pub sweep_formats: Vec<PayloadFormat>,
    /// Gateway binaries of the `gateway_bin` curve (for example a build before a change and
    /// one after it).
    #[arg(long, value_delimiter = ',')]
    pub sweep_gateway_bins: Vec<PathBuf>,
    /// Runs of every point (each on a fresh broker and gateway); the tables and the plot give
    /// the median, the JSON every run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat: u32,
    /// Curves to run (comma-separated): sensors, intra_threads, workers, max_batch,
    /// max_wait_ms, format, gateway_bin (not in the default: it needs
    /// `--sweep-gateway-bins`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sensors,intra_threads,workers,max_batch,max_wait_ms,format"
    )]
    pub curves: Vec<String>,
}

/// One measured point of a curve.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub curve: String,
    /// The knob's value, as text (a number or a format name).
    pub value: String,
    pub target: Target,
    /// Which run of the point (0-based, `--repeat`).
    pub run: u32,
    pub sensors: u32,
    pub format: PayloadFormat,
    /// Flat-out windows/s.
    pub max_windows_per_second: Option<f64>,
    /// Windows lost flat out (a saturation figure: queues drop).
    pub max_windows_lost: Option<i64>,
    /// Gateway (+ Mosquitto) CPU µs per window, flat out.
    pub max_cpu_us_per_window: Option<f64>,
    /// Offered windows/s of the load phase.
    pub load_offered: Option<f64>,
    pub load_windows_in: u64,
    pub load_windows_out: u64,
    /// Publish → result received, at the load phase's rate.
    pub load_latency_ms: Option<Latency>,
    /// The gateway's own part of it (window complete → result ready), as it reports.
    pub load_gateway_latency_ms: Option<Latency>,
    /// Gateway (+ Mosquitto) CPU µs per window at the load phase's rate.
    pub load_cpu_us_per_window: f64,
    pub rss_idle_mib: f64,
    pub rss_peak_mib: f64,
    pub ready_ms: f64,
}

/// The knobs of one point: gateway environment and load shape.
struct Setting {
    curve: &'static str,
    value: String,
    sensors: u32,
    format: PayloadFormat,
    env: Vec<(String, String)>,
    /// Another gateway binary than `--gateway-bin`.
    gateway_bin: Option<PathBuf>,
}

const CURVES: [&str; 7] = [
    "sensors",
    "intra_threads",
    "workers",
    "max_batch",
    "max_wait_ms",
    "format",
    "gateway_bin",
];

fn settings(args: &SweepArgs) -> Result<Vec<Setting>> {
    for c in &args.curves {
        if !CURVES.contains(&c.as_str()) {
            anyhow::bail!("unknown curve {c:?}; expected one of {}", CURVES.join(", "));
        }
    }
    let base = &args.base;
    let point = |curve: &'static str, value: String, env: Vec<(String, String)>| Setting {
        curve,
        value,
        sensors: base.sensors,
        format: base.format,
        env,
        gateway_bin: None,
    };
    let env = |k: &str, v: u32| vec![(k.to_owned(), v.to_string())];
    let mut out = Vec::new();
    for &curve in CURVES
        .iter()
        .filter(|c| args.curves.iter().any(|a| a == *c))
    {
        match curve {
            "sensors" => out.extend(args.sweep_sensors.iter().map(|&n| Setting {
                sensors: n,
                ..point(curve, n.to_string(), Vec::new())
            })),
            "intra_threads" => out.extend(args.sweep_intra_threads.iter().map(|&n| {
                point(
                    curve,
                    n.to_string(),
                    env("DIREDI_RUNTIME__INTRA_THREADS", n),
                )
            })),
            "workers" => out.extend(
                args.sweep_workers
                    .iter()
                    .map(|&n| point(curve, n.to_string(), env("DIREDI_RUNTIME__WORKERS", n))),
            ),
            "max_wait_ms" => out.extend(
                args.sweep_max_wait_ms
                    .iter()
                    .map(|&n| point(curve, n.to_string(), env("DIREDI_RUNTIME__MAX_WAIT_MS", n))),
            ),
            "max_batch" => out.extend(
                args.sweep_max_batch
                    .iter()
                    .map(|&n| point(curve, n.to_string(), env("DIREDI_RUNTIME__MAX_BATCH", n))),
            ),
            "gateway_bin" => {
                if args.sweep_gateway_bins.is_empty() {
                    anyhow::bail!("the gateway_bin curve needs --sweep-gateway-bins A,B");
                }
                out.extend(args.sweep_gateway_bins.iter().map(|b| Setting {
                    gateway_bin: Some(b.clone()),
                    ..point(curve, super::shown_path(b), Vec::new())
                }))
            }
            _ => out.extend(args.sweep_formats.iter().map(|&f| Setting {
                format: f,
                ..point(curve, super::format_name(f).to_owned(), Vec::new())
            })),
        }
    }
    Ok(out)
}

/// Runs every point of every selected curve; writes `--json`, `--report` and `--plot`.
pub async fn run(args: SweepArgs, shutdown: CancellationToken) -> Result<()> {
    let points_todo = settings(&args)?;
    let load_average_start = super::load_average();
    let limit = super::inference_limit(&args.base).await?;
    let mut points = Vec::new();
    for (run, (i, s)) in
        (0..args.repeat).flat_map(|run| points_todo.iter().enumerate().map(move |p| (run, p)))
    {
        let mut a = args.base.clone();
        a.sensors = s.sensors;
        a.format = s.format;
        a.gateway_env.extend(s.env.iter().cloned());
        if let Some(bin) = &s.gateway_bin {
            a.gateway_bin = Some(bin.clone());
        }
        let ctx = Ctx::new(&a, shutdown.clone())?;
        for &t in a.targets.iter().filter(|t| **t != Target::PythonMosquitto) {
            eprintln!(
                "perf sweep [{}/{}]: {} = {} on {}, run {} of {}",
                i + 1,
                points_todo.len(),
                s.curve,
                s.value,
                t.name(),
                run + 1,
                args.repeat
            );
            let r = run_target(&ctx, t).await?;
            points.push(Point {
                curve: s.curve.to_owned(),
                value: s.value.clone(),
                target: t,
                run,
                sensors: s.sensors,
                format: s.format,
                max_windows_per_second: r.max.as_ref().map(|m| m.windows_per_second),
                max_windows_lost: r.max.as_ref().map(|m| m.windows_lost),
                max_cpu_us_per_window: r.max.as_ref().map(|m| m.cpu_us_per_window),
                load_offered: r.load.offered_windows_per_second,
                load_windows_in: r.load.windows_in,
                load_windows_out: r.load.windows_out,
                load_latency_ms: r.load.latency_ms.clone(),
                load_gateway_latency_ms: r.load.gateway_latency_ms.clone(),
                load_cpu_us_per_window: r.load.cpu_us_per_window,
                rss_idle_mib: r.rss_idle_mib,
                rss_peak_mib: r.rss_peak_mib,
                ready_ms: r.ready_ms,
            });
            if shutdown.is_cancelled() {
                anyhow::bail!("interrupted");
            }
        }
    }
    let doc = json!({
        "benchmark": "perf-sweep",
        "machine": report::machine(),
        "profile": report::profile(),
        "gateway_bin": super::gateway_bin_shown(&args.base),
        "load_average": [load_average_start, super::load_average()],
        "base": {
            "sensors": args.base.sensors,
            "format": args.base.format,
            "samples_per_message": args.base.samples_per_message,
            "max_seconds": args.base.max_seconds,
            "seconds": args.base.seconds,
            "load_fraction": args.base.load_fraction,
            "repeat": args.repeat,
        },
        "inference_limit": limit,
        "points": points,
    });
    let md = markdown(&points, limit.windows_per_second);
    print!("{md}");
    if let Some(path) = &args.base.json {
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.base.report {
        std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.base.plot {
        plot(path, &points)?;
    }
    Ok(())
}

/// The runs of one point, summarised by medians.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub curve: String,
    pub value: String,
    pub target: Target,
    pub runs: usize,
    /// Median, lowest and highest flat-out windows/s.
    pub max_windows_per_second: Option<[f64; 3]>,
    pub max_cpu_us_per_window: Option<f64>,
    pub load_offered: Option<f64>,
    pub load_windows_in: u64,
    pub load_windows_out: u64,
    /// Medians of the runs' p50, p99 and p999.
    pub latency_ms: Option<[f64; 3]>,
    /// Medians of the runs' p50 and p99 of the gateway's own part.
    pub gateway_latency_ms: Option<[f64; 2]>,
    pub load_cpu_us_per_window: Option<f64>,
    pub rss_idle_mib: Option<f64>,
    /// The highest peak of the runs.
    pub rss_peak_mib: f64,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// One summary per (curve, value, target), in the order measured.
pub fn summarise(points: &[Point]) -> Vec<Summary> {
    let mut keys: Vec<(&str, &str, Target)> = Vec::new();
    for p in points {
        let k = (p.curve.as_str(), p.value.as_str(), p.target);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(curve, value, target)| {
            let runs: Vec<&Point> = points
                .iter()
                .filter(|p| p.curve == curve && p.value == value && p.target == target)
                .collect();
            let col = |f: &dyn Fn(&Point) -> Option<f64>| -> Vec<f64> {
                runs.iter().filter_map(|p| f(p)).collect()
            };
            let max = col(&|p| p.max_windows_per_second);
            let lat = |f: fn(&Latency) -> f64| median(col(&|p| p.load_latency_ms.as_ref().map(f)));
            let gw = |f: fn(&Latency) -> f64| {
                median(col(&|p| p.load_gateway_latency_ms.as_ref().map(f)))
            };
            Summary {
                curve: curve.to_owned(),
                value: value.to_owned(),
                target,
                runs: runs.len(),
                max_windows_per_second: median(max.clone()).map(|m| {
                    [
                        m,
                        max.iter().copied().fold(f64::INFINITY, f64::min),
                        max.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    ]
                }),
                max_cpu_us_per_window: median(col(&|p| p.max_cpu_us_per_window)),
                load_offered: median(col(&|p| p.load_offered)),
                load_windows_in: runs.iter().map(|p| p.load_windows_in).sum(),
                load_windows_out: runs.iter().map(|p| p.load_windows_out).sum(),
                latency_ms: match (lat(|l| l.p50), lat(|l| l.p99), lat(|l| l.p999)) {
                    (Some(a), Some(b), Some(c)) => Some([a, b, c]),
                    _ => None,
                },
                gateway_latency_ms: match (gw(|l| l.p50), gw(|l| l.p99)) {
                    (Some(a), Some(b)) => Some([a, b]),
                    _ => None,
                },
                load_cpu_us_per_window: median(col(&|p| Some(p.load_cpu_us_per_window))),
                rss_idle_mib: median(col(&|p| Some(p.rss_idle_mib))),
                rss_peak_mib: runs.iter().map(|p| p.rss_peak_mib).fold(0.0, f64::max),
            }
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or_else(|| "–".to_owned(), |x| format!("{x:.digits$}"))
}

/// One table per curve: medians over the runs of each point.
pub fn markdown(points: &[Point], inference_limit: f64) -> String {
    let sums = summarise(points);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Inference limit (ONNX Runtime in-process, 1 thread): {inference_limit:.0} windows/s. \
         Medians over the runs of each point; flat-out windows/s with the lowest and highest \
         run; in / out summed over the runs; RSS peak is the highest run's.\n"
    );
    for curve in CURVES {
        let rows: Vec<&Summary> = sums.iter().filter(|p| p.curve == curve).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(s, "### {curve}\n");
        let _ = writeln!(
            s,
            "| {curve} | target | runs | flat out windows/s (min–max) | CPU µs/window (flat out) | half load: offered | in / out | p50 / p99 / p999 ms | of which in the gateway p50 / p99 | CPU µs/window | RSS idle / peak MiB |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for p in rows {
            let lat = p.latency_ms.map_or_else(
                || "–".to_owned(),
                |[a, b, c]| format!("{a:.2} / {b:.2} / {c:.2}"),
            );
            let gw = p
                .gateway_latency_ms
                .map_or_else(|| "–".to_owned(), |[a, b]| format!("{a:.2} / {b:.2}"));
            let max = p.max_windows_per_second.map_or_else(
                || "–".to_owned(),
                |[m, lo, hi]| format!("{m:.0} ({lo:.0}–{hi:.0})"),
            );
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} / {:.1} |",
                p.value,
                p.target.name(),
                p.runs,
                max,
                opt(p.max_cpu_us_per_window, 0),
                opt(p.load_offered, 0),
                p.load_windows_in,
                p.load_windows_out,
                lat,
                gw,
                opt(p.load_cpu_us_per_window, 0),
                opt(p.rss_idle_mib, 1),
                p.rss_peak_mib,
            );
        }
        s.push('\n');
    }
    s
}

/// Median flat-out windows/s and median p99 at half load for each curve, one row of panels
/// per curve.
fn plot(path: &PathBuf, points: &[Point]) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let sums = summarise(points);
    let curves: Vec<&str> = CURVES
        .into_iter()
        .filter(|c| sums.iter().any(|p| p.curve == *c))
        .collect();
    let root = SVGBackend::new(path, (1200, 300 * curves.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let rows = root.split_evenly((curves.len().max(1), 2));
    let blue = RGBColor(0, 114, 178);
    let orange = RGBColor(230, 159, 0);
    for (i, curve) in curves.iter().enumerate() {
        let pts: Vec<&Summary> = sums.iter().filter(|p| p.curve == *curve).collect();
        let labels: Vec<String> = pts.iter().map(|p| p.value.clone()).collect();
        let n = pts.len() as f64;
        for (j, (what, color)) in [
            ("flat-out windows/s (median)", blue),
            ("p99 ms at half load (median)", orange),
        ]
        .into_iter()
        .enumerate()
        {
            let ys: Vec<f64> = pts
                .iter()
                .map(|p| {
                    if j == 0 {
                        p.max_windows_per_second.map_or(0.0, |m| m[0])
                    } else {
                        p.latency_ms.map_or(0.0, |l| l[1])
                    }
                })
                .collect();
            let top = ys.iter().copied().fold(0.0f64, f64::max).max(1.0) * 1.15;
            let area = &rows[i * 2 + j];
            let l = labels.clone();
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{what} vs {curve}"), ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(-0.5f64..(n - 0.5), 0f64..top)
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_labels(pts.len())
                .x_label_formatter(&move |x| {
                    let k = x.round();
                    if (x - k).abs() < 1e-6 && k >= 0.0 {
                        l.get(k as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .draw()
                .map_err(|e| err(&e))?;
            let series: Vec<(f64, f64)> =
                ys.iter().enumerate().map(|(k, y)| (k as f64, *y)).collect();
            chart
                .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?;
            chart
                .draw_series(
                    series
                        .into_iter()
                        .map(|(x, y)| Circle::new((x, y), 4, color.filled())),
                )
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SweepArgs,
    }

    #[test]
    fn each_curve_moves_one_knob_from_the_base_point() {
        let cli = Cli::try_parse_from([
            "x",
            "--curves",
            "sensors,max_batch,max_wait_ms,format",
            "--sweep-sensors",
            "1,5000",
            "--sweep-max-batch",
            "4",
            "--sweep-max-wait-ms",
            "0",
            "--sweep-formats",
            "json",
        ])
        .unwrap();
        let s = settings(&cli.args).unwrap();
        let got: Vec<(&str, &str, u32, PayloadFormat, usize)> = s
            .iter()
            .map(|s| (s.curve, s.value.as_str(), s.sensors, s.format, s.env.len()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("sensors", "1", 1, PayloadFormat::Binary, 0),
                ("sensors", "5000", 5000, PayloadFormat::Binary, 0),
                ("max_batch", "4", 8, PayloadFormat::Binary, 1),
                ("max_wait_ms", "0", 8, PayloadFormat::Binary, 1),
                ("format", "json", 8, PayloadFormat::Json, 0),
            ]
        );
        assert_eq!(
            s[2].env,
            vec![("DIREDI_RUNTIME__MAX_BATCH".to_owned(), "4".to_owned())]
        );
        assert_eq!(
            s[3].env,
            vec![("DIREDI_RUNTIME__MAX_WAIT_MS".to_owned(), "0".to_owned())]
        );
        let bad = Cli::try_parse_from(["x", "--curves", "colour"]).unwrap();
        assert!(settings(&bad.args).is_err());
        let no_bins = Cli::try_parse_from(["x", "--curves", "gateway_bin"]).unwrap();
        assert!(settings(&no_bins.args).is_err());
        let bins = Cli::try_parse_from([
            "x",
            "--curves",
            "gateway_bin",
            "--sweep-gateway-bins",
            "before/diredi-gateway,after/diredi-gateway",
        ])
        .unwrap();
        let s = settings(&bins.args).unwrap();
        let got: Vec<(&str, Option<&std::path::Path>, usize)> = s
            .iter()
            .map(|s| (s.value.as_str(), s.gateway_bin.as_deref(), s.env.len()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "before/diredi-gateway",
                    Some(std::path::Path::new("before/diredi-gateway")),
                    0
                ),
                (
                    "after/diredi-gateway",
                    Some(std::path::Path::new("after/diredi-gateway")),
                    0
                ),
            ]
        );
    }

    fn point(value: &str, run: u32, wps: f64, p99: f64, rss: f64) -> Point {
        Point {
            curve: "max_batch".into(),
            value: value.into(),
            target: Target::RustMosquitto,
            run,
            sensors: 8,
            format: PayloadFormat::Binary,
            max_windows_per_second: Some(wps),
            max_windows_lost: Some(0),
            max_cpu_us_per_window: Some(100.0),
            load_offered: Some(wps / 2.0),
            load_windows_in: 10,
            load_windows_out: 10,
            load_latency_ms: Some(Latency {
                n: 10,
                p50: 1.0,
                p90: 2.0,
                p99,
                p999: p99 + 1.0,
                max: p99 + 2.0,
            }),
            load_gateway_latency_ms: Some(Latency {
                n: 10,
                p50: 0.5,
                p90: 1.0,
                p99: p99 / 2.0,
                p999: p99,
                max: p99,
            }),
            load_cpu_us_per_window: 120.0,
            rss_idle_mib: 40.0,
            rss_peak_mib: rss,
            ready_ms: 100.0,
        }
    }

    #[test]
    fn repeated_runs_are_summarised_by_medians_per_point() {
        let pts = vec![
            point("4", 0, 100.0, 9.0, 50.0),
            point("4", 1, 300.0, 3.0, 52.0),
            point("4", 2, 200.0, 5.0, 51.0),
            point("8", 0, 400.0, 7.0, 60.0),
        ];
        let s = summarise(&pts);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].value.as_str(), s[0].runs), ("4", 3));
        assert_eq!(s[0].max_windows_per_second, Some([200.0, 100.0, 300.0]));
        assert_eq!(s[0].latency_ms, Some([1.0, 5.0, 6.0]));
        assert_eq!(s[0].gateway_latency_ms, Some([0.5, 2.5]));
        assert_eq!(s[0].rss_peak_mib, 52.0);
        assert_eq!((s[0].load_windows_in, s[0].load_windows_out), (30, 30));
        assert_eq!(s[1].max_windows_per_second, Some([400.0, 400.0, 400.0]));
        assert_eq!(median(vec![1.0, 4.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN]), None);
        let md = markdown(&pts, 1000.0);
        assert!(
            md.contains("| 4 | rust-mosquitto | 3 | 200 (100–300) |"),
            "{md}"
        );
    }
}
