//! Output of `perf run`: the JSON document (with the machine it ran on), the Markdown table
//! and the latency CDF plot (SVG).

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::json;

use super::{Latency, PerfArgs, PerfReport, Phase};

/// The machine a run happened on. The CPU's family, model and vector extensions are recorded
/// too: virtual machines often report only a brand ("AMD EPYC"), and ONNX Runtime's speed
/// depends on the generation (AVX-512 or not).
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| -> Option<String> {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    };
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let mem_gib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|k| k.parse::<f64>().ok())
            .map(|k| (k / 1024.0 / 1024.0 * 10.0).round() / 10.0)
    });
    json!({
        "arch": std::env::consts::ARCH,
        "cpu": field("model name").unwrap_or_else(|| "unknown".into()),
        "cpu_family": field("cpu family"),
        "cpu_model": field("model"),
        "avx2": has("avx2"),
        "avx512f": has("avx512f"),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_gib": mem_gib,
    })
}

pub(crate) fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    }
}

/// The JSON document: `{"benchmark": "perf", "machine", "profile", "result"}`.
pub fn document(r: &PerfReport) -> Result<serde_json::Value> {
    Ok(json!({
        "benchmark": "perf",
        "machine": machine(),
        "profile": profile(),
        "result": serde_json::to_value(r)?,
    }))
}

/// Writes what `args` asks for: JSON, Markdown, plot.
pub fn write(args: &PerfArgs, r: &PerfReport) -> Result<()> {
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&document(r)?)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.report {
        std::fs::write(path, markdown(r)).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        plot(path, r).with_context(|| format!("drawing {}", path.display()))?;
    }
    Ok(())
}

fn lat(l: &Option<Latency>) -> String {
    match l {
        Some(l) => format!("{:.2} / {:.2} / {:.2}", l.p50, l.p99, l.p999),
        None => "–".to_owned(),
    }
}

fn max_cells(m: &Option<Phase>) -> (String, String) {
    match m {
        Some(m) => (
            format!("{:.0}", m.windows_per_second),
            format!("{} of {}", m.windows_lost.max(0), m.windows_in),
        ),
        None => ("–".to_owned(), "–".to_owned()),
    }
}

/// The Markdown table of a run.
pub fn markdown(r: &PerfReport) -> String {
    let m = machine();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Machine: {} (family {}, model {}{}), {} cores, {}; harness in the {} profile, gateway \
         binary {}; load average {} at the start, {} at the end. {} sensors, {:?} payloads, {} \
         samples per message (window {}, stride {}).\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cpu_family"].as_str().unwrap_or("?"),
        m["cpu_model"].as_str().unwrap_or("?"),
        if m["avx512f"] == true {
            ", AVX-512"
        } else if m["avx2"] == true {
            ", AVX2"
        } else {
            ""
        },
        m["cores"],
        m["arch"].as_str().unwrap_or("?"),
        profile(),
        r.gateway_bin,
        r.load_average[0].map_or("?".to_owned(), |l| format!("{l:.2}")),
        r.load_average[1].map_or("?".to_owned(), |l| format!("{l:.2}")),
        r.sensors,
        r.format,
        r.samples_per_message,
        r.window,
        r.stride,
    );
    s.push_str(
        "| target | broker | READY ms | flat out: windows/s | flat out: lost | sustained windows/s | load: offered → windows/s | load: in / out | load latency p50 / p99 / p999 ms | of which in the gateway p50 / p99 / p999 | CPU µs/window (load) | RSS idle / peak MiB |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for t in &r.targets {
        let (mx, lost) = max_cells(&t.max);
        let l = &t.load;
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {mx} | {lost} | {} | {:.0} → {:.0} | {} / {} | {} | {} | {:.1} | {:.1} / {:.1} |",
            t.target.name(),
            t.broker,
            t.ready_ms,
            t.sustained
                .as_ref()
                .map_or("–".to_owned(), |x| format!("{:.0}", x.windows_per_second)),
            l.offered_windows_per_second.unwrap_or(f64::NAN),
            l.windows_per_second,
            l.windows_in,
            l.windows_out,
            lat(&l.latency_ms),
            lat(&l.gateway_latency_ms),
            l.cpu_us_per_window,
            t.rss_idle_mib,
            t.rss_peak_mib,
        );
    }
    let il = &r.inference_limit;
    let _ = writeln!(
        s,
        "\nReferences, same run:\n\n| limit | windows/s | detail |\n|---|---:|---|"
    );
    let batches: Vec<String> = il
        .batches
        .iter()
        .map(|b| format!("batch {}: {:.0}/s", b.batch, b.windows_per_second))
        .collect();
    let _ = writeln!(
        s,
        "| inference (ONNX Runtime in-process, {} thread, no MQTT) | {:.0} | {} |",
        il.intra_threads,
        il.windows_per_second,
        batches.join(", ")
    );
    let ec = &il.every_cpu;
    let _ = writeln!(
        s,
        "| inference on every CPU ({} one-thread sessions at once, batch {}, no MQTT) | {:.0} | {} |",
        ec.sessions,
        ec.batch,
        ec.windows_per_second,
        ec.per_session
            .iter()
            .map(|w| format!("{w:.0}/s"))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    if let Some(b) = &r.broker_limit {
        let _ = writeln!(
            s,
            "| broker ({} publish → subscribe loopback, flat out) | {:.0} | {:.0} messages/s, {} of {} received, latency p50 / p99 / p999 {} ms |",
            b.broker,
            b.windows_per_second,
            b.messages_per_second,
            b.messages_received,
            b.messages_sent,
            lat(&b.latency_ms),
        );
    }
    if !r.ratios.is_empty() {
        s.push_str("\n| ratio (windows/s) | value |\n|---|---:|\n");
        for (k, v) in &r.ratios {
            let _ = writeln!(s, "| {} | {v:.2} |", k.replace("_over_", " / "));
        }
    }
    if !r.skipped.is_empty() {
        s.push('\n');
        for (k, v) in &r.skipped {
            let _ = writeln!(s, "Skipped {k}: {v}.");
        }
    }
    let steps: Vec<String> = r
        .targets
        .iter()
        .filter_map(|t| {
            let x = t.sustained.as_ref()?;
            let steps: Vec<String> = x
                .steps
                .iter()
                .map(|st| {
                    format!(
                        "{:.0} → {:.0} ({} lost, p99 {}){}",
                        st.offered_windows_per_second,
                        st.windows_per_second,
                        st.windows_lost,
                        st.latency_ms
                            .as_ref()
                            .map_or("–".to_owned(), |l| format!("{:.1} ms", l.p99)),
                        if st.passed { "" } else { " missed" }
                    )
                })
                .collect();
            Some(format!("- {}: {}", t.target.name(), steps.join("; ")))
        })
        .collect();
    if !steps.is_empty() {
        let _ = writeln!(
            s,
            "\nSustained-rate search (offered → received windows/s; a step passes with no lost \
             window and results at ≥ {:.0}% of the offered rate while the load ran):\n\n{}",
            super::KEEP_UP * 100.0,
            steps.join("\n")
        );
    }
    let _ = writeln!(
        s,
        "\nThroughput for the ratios: {}.",
        r.targets
            .iter()
            .map(|t| {
                let (w, basis) = super::throughput_basis(t);
                format!("{} {w:.0} ({basis})", t.target.name())
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(line) = ten_times_python(r) {
        let _ = writeln!(s, "\n{line}");
    }
    s
}

/// What the "10× the Python gateway" target asks of the machine: that rate, and how
/// it compares with the model on every CPU at once. `None` without a Python result.
fn ten_times_python(r: &PerfReport) -> Option<String> {
    let p = r.ratios.get("python_over_inference_every_cpu")?;
    Some(format!(
        "Ten times the Python gateway's throughput is {:.0} windows/s: {:.2}× what the model \
         does on every CPU at once with nothing else running{}.",
        10.0 * p * r.inference_limit.every_cpu.windows_per_second,
        10.0 * p,
        if 10.0 * p > 1.0 {
            ", so no gateway running this model in ONNX Runtime can reach it on this machine"
        } else {
            ""
        }
    ))
}

/// Latency CDF of every target's load phase, log-scaled latency axis.
pub fn plot(path: &std::path::Path, r: &PerfReport) -> Result<()> {
    use plotters::prelude::*;
    let colors = [
        RGBColor(0, 114, 178),
        RGBColor(0, 158, 115),
        RGBColor(230, 159, 0),
        RGBColor(204, 121, 167),
    ];
    let all: Vec<f64> = r
        .targets
        .iter()
        .flat_map(|t| t.load_latencies_ms.iter().copied())
        .filter(|v| *v > 0.0)
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(0.0f64, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo * 0.8, hi * 1.25)
    } else {
        (0.1, 100.0)
    };
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "publish → inference received, load phase (CDF)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log scale)")
        .y_desc("fraction of windows")
        .draw()
        .map_err(|e| err(&e))?;
    for (t, color) in r.targets.iter().zip(colors.iter().cycle()) {
        let v = &t.load_latencies_ms;
        if v.is_empty() {
            continue;
        }
        // At most ~2000 points per curve: the SVG stays small.
        let step = (v.len() / 2000).max(1);
        let n = v.len() as f64;
        let points: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0 || *i == v.len() - 1)
            .map(|(i, x)| (x.max(lo), (i + 1) as f64 / n))
            .collect();
        let label = format!(
            "{} ({:.0} windows/s offered)",
            t.target.name(),
            t.load.offered_windows_per_second.unwrap_or(f64::NAN)
        );
        let c = *color;
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::bench::ParallelSpeed;
    use crate::perf::InferenceLimit;

    fn report(ratios: &[(&str, f64)]) -> PerfReport {
        PerfReport {
            load_average: [None, None],
            sensors: 8,
            format: crate::simulate::PayloadFormat::Binary,
            samples_per_message: 64,
            window: 128,
            stride: 64,
            gateway_bin: "diredi-gateway".into(),
            inference_limit: InferenceLimit {
                intra_threads: 1,
                windows_per_second: 25_000.0,
                batches: Vec::new(),
                every_cpu: ParallelSpeed {
                    sessions: 2,
                    batch: 64,
                    per_session: vec![24_000.0, 24_000.0],
                    windows_per_second: 48_000.0,
                },
            },
            broker_limit: None,
            targets: Vec::new(),
            skipped: BTreeMap::new(),
            ratios: ratios.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        }
    }

    #[test]
    fn ten_times_python_is_set_against_every_cpu() {
        // Python at 6,500 windows/s on a machine doing 48,000: 10x is 65,000, 1.35x of it.
        let r = report(&[("python_over_inference_every_cpu", 6_500.0 / 48_000.0)]);
        let line = ten_times_python(&r).unwrap();
        assert!(line.contains("is 65000 windows/s: 1.35×"), "{line}");
        assert!(
            line.ends_with(
                "so no gateway running this model in ONNX Runtime can reach it on this machine."
            ),
            "{line}"
        );
        // Within reach: no such claim.
        let r = report(&[("python_over_inference_every_cpu", 0.05)]);
        let line = ten_times_python(&r).unwrap();
        assert!(line.contains("is 24000 windows/s: 0.50×"), "{line}");
        assert!(!line.contains("no gateway"), "{line}");
        assert!(markdown(&r).contains(&line));
        // Without Python, nothing.
        assert_eq!(ten_times_python(&report(&[])), None);
    }
}
