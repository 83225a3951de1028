//! `perf run` on a tiny load: the harness starts its brokers, gateway and load generator, and
//! writes well-formed JSON, Markdown and a plot. Figures are not checked, only that they are
//! sane and that at a low rate every window comes back (in == out). The Python gateway is not
//! part of this test (it needs the venv of scripts/bench-gateway.sh); the run must say it
//! skipped it.

use std::path::PathBuf;
use std::process::Command;

use crate::{available, repo_root};

fn mosquitto() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// What a harness run needs: this binary, the gateway binary beside it, and Mosquitto; `None`
/// (after saying what is missing) when the test may be skipped.
fn prerequisites() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let root = repo_root();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_diredi-cloud-worker"));
    let gateway = bin.with_file_name("diredi-gateway");
    let ort = diredi_infer::init_runtime(None).is_ok();
    let mosq = mosquitto();
    if !available("ONNX Runtime", ort)
        || !available("data/hapt", root.join("data/hapt/dataset.json").is_file())
        || !available("mosquitto", mosq.is_some())
        || !available(
            "the diredi-gateway binary (cargo build --workspace)",
            gateway.is_file(),
        )
    {
        return None;
    }
    Some((bin, gateway, mosq?))
}

/// The files one harness run wrote, in a temporary directory that lives as long as this.
struct Harness {
    _dir: tempfile::TempDir,
    stdout: String,
    stderr: String,
    json: serde_json::Value,
    md: String,
    svg: String,
}

/// The load of both tests: 2 sensors at 100 windows/s for 2 s, no flat-out phase, a short
/// inference limit.
const TINY_LOAD: [&str; 10] = [
    "--sensors",
    "2",
    "--max-seconds",
    "0",
    "--rate",
    "100",
    "--seconds",
    "2",
    "--limit-seconds",
    "0.2",
];

/// Runs `diredi-cloud-worker perf <args>` on [`TINY_LOAD`] with the real gateway and
/// Mosquitto, with JSON, Markdown and SVG output, and asserts that it succeeded. `None` when a prerequisite is
/// missing and the test may be skipped.
fn harness(args: &[&str]) -> Option<Harness> {
    let (bin, gateway, mosq) = prerequisites()?;
    let dir = tempfile::tempdir().unwrap();
    let (json, md, svg) = (
        dir.path().join("out.json"),
        dir.path().join("out.md"),
        dir.path().join("out.svg"),
    );
    let out = Command::new(&bin)
        .current_dir(repo_root())
        .arg("perf")
        .args(args)
        .args(TINY_LOAD)
        .arg("--gateway-bin")
        .arg(&gateway)
        .arg("--mosquitto")
        .arg(&mosq)
        .arg("--json")
        .arg(&json)
        .arg("--report")
        .arg(&md)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "perf {args:?} failed:\n{stdout}\n{stderr}"
    );
    Some(Harness {
        json: serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap(),
        md: std::fs::read_to_string(&md).unwrap(),
        svg: std::fs::read_to_string(&svg).unwrap(),
        stdout,
        stderr,
        _dir: dir,
    })
}

#[test]
fn perf_run_on_a_small_load_writes_well_formed_results_and_loses_no_window() {
    let _turn = crate::heavy_turn();
    let trace = tempfile::tempdir().unwrap();
    let trace_dir = trace.path().to_str().unwrap();
    let Some(h) = harness(&[
        "run",
        "--targets",
        "rust-embedded,rust-mosquitto",
        "--trace",
        trace_dir,
    ]) else {
        return;
    };
    let (stdout, stderr, doc) = (&h.stdout, &h.stderr, &h.json);
    assert_eq!(doc["benchmark"], "perf");
    assert!(doc["machine"]["cores"].as_u64().unwrap() >= 1);
    let r = &doc["result"];
    assert!(r["inference_limit"]["windows_per_second"].as_f64().unwrap() > 0.0);
    // One session per CPU, each measured, and the sum is the machine's.
    let every = &r["inference_limit"]["every_cpu"];
    assert_eq!(every["sessions"], doc["machine"]["cores"]);
    let per: Vec<f64> = every["per_session"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    assert_eq!(per.len() as u64, doc["machine"]["cores"].as_u64().unwrap());
    assert!(per.iter().all(|w| *w > 0.0), "{per:?}");
    let sum = every["windows_per_second"].as_f64().unwrap();
    assert!(
        (sum - per.iter().sum::<f64>()).abs() < 1e-6 * sum,
        "{every}"
    );
    assert!(h.md.contains("| inference on every CPU ("), "{}", h.md);
    assert!(
        r["broker_limit"].is_null(),
        "--max-seconds 0 skips the broker limit"
    );
    assert!(r["skipped"]["python-mosquitto"].is_string());
    let targets = r["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2);
    for t in targets {
        let name = t["target"].as_str().unwrap();
        let ready = t["ready_ms"].as_f64().unwrap();
        assert!(ready > 0.0 && ready < 60_000.0, "{name}: READY {ready} ms");
        let rss = t["rss_peak_mib"].as_f64().unwrap();
        assert!(rss > 1.0 && rss < 4096.0, "{name}: RSS {rss} MiB");
        assert!(t["max"].is_null());
        assert!(
            t["sustained"].is_null(),
            "the sustained-rate search needs the flat-out phase"
        );
        let load = &t["load"];
        let (win, wout) = (
            load["windows_in"].as_u64().unwrap(),
            load["windows_out"].as_u64().unwrap(),
        );
        assert!(win > 50, "{name}: only {win} windows offered");
        assert_eq!(win, wout, "{name}: windows lost at 100 windows/s");
        assert_eq!(load["windows_lost"], 0);
        assert_eq!(load["results_well_formed"], true);
        let lat = &load["latency_ms"];
        for k in ["p50", "p99", "p999", "max"] {
            let v = lat[k].as_f64().unwrap();
            assert!(v > 0.0 && v < 5_000.0, "{name}: latency {k} {v} ms");
        }
        assert_eq!(
            lat["n"].as_u64().unwrap(),
            wout,
            "{name}: every result joined"
        );
        assert!(load["gateway_cpu_s"].as_f64().unwrap() > 0.0);
        // The trace has one row per result, each joined to its publish time.
        let tsv = std::fs::read_to_string(trace.path().join(format!("{name}-load.tsv"))).unwrap();
        let mut lines = tsv.lines();
        assert_eq!(
            lines.next(),
            Some("j\tsent_unix_us\tlatency_ms\tgateway_ms")
        );
        let rows: Vec<Vec<f64>> = lines
            .map(|l| l.split('\t').map(|v| v.parse().unwrap()).collect())
            .collect();
        assert_eq!(rows.len() as u64, wout, "{name}: one trace row per result");
        for r in &rows {
            assert_eq!(r.len(), 4);
            assert!(
                r[1] > 1.6e15,
                "{name}: publish time {} is not Unix µs",
                r[1]
            );
            assert!(r[2] > 0.0 && r[2] < 5_000.0 && r[3] >= 0.0 && r[3] <= r[2] + 0.01);
        }
        let wps = load["windows_per_second"].as_f64().unwrap();
        assert!(
            wps > 50.0 && wps < 200.0,
            "{name}: {wps} windows/s at 100 offered"
        );
    }
    assert!(
        r["ratios"]["rust_embedded_over_inference_limit"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let over_every = r["ratios"]["rust_embedded_over_inference_every_cpu"]
        .as_f64()
        .unwrap();
    assert!(over_every > 0.0, "{over_every}");

    let md = &h.md;
    assert!(md.contains("| rust-embedded |") && md.contains("| rust-mosquitto |"));
    assert!(md.contains("Skipped python-mosquitto"));
    assert!(
        stderr.contains("SKIPPING python-mosquitto") || stdout.contains("Skipped python-mosquitto")
    );
    assert!(h.svg.starts_with("<svg") && h.svg.contains("rust-embedded"));
}

/// `perf sweep` with two one-point curves (a micro-batch size passed to the gateway through its
/// environment, and SenML payloads): one point per curve, each served without loss at a low
/// rate, in JSON, Markdown and SVG.
#[test]
fn perf_sweep_measures_one_point_per_setting() {
    let _turn = crate::heavy_turn();
    let Some(h) = harness(&[
        "sweep",
        "--curves",
        "max_batch,format",
        "--sweep-max-batch",
        "4",
        "--sweep-formats",
        "senml",
        "--targets",
        "rust-mosquitto",
    ]) else {
        return;
    };
    let doc = &h.json;
    assert_eq!(doc["benchmark"], "perf-sweep");
    let points = doc["points"].as_array().unwrap();
    let got: Vec<(&str, &str, &str)> = points
        .iter()
        .map(|p| {
            (
                p["curve"].as_str().unwrap(),
                p["value"].as_str().unwrap(),
                p["format"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![("max_batch", "4", "binary"), ("format", "senml", "senml")]
    );
    for p in points {
        let (win, wout) = (
            p["load_windows_in"].as_u64().unwrap(),
            p["load_windows_out"].as_u64().unwrap(),
        );
        assert!(win > 50 && win == wout, "{p}");
        assert!(p["load_latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    }
    assert!(h.md.contains("### max_batch") && h.md.contains("### format"));
    assert!(h.svg.starts_with("<svg"));
}

/// `perf steady` for one second: well-formed JSON whose buckets add up to the run and whose
/// summary agrees with them.
#[test]
fn perf_steady_times_the_model_in_buckets_and_summarises_them() {
    if !available("ONNX Runtime", diredi_infer::init_runtime(None).is_ok()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("steady.json");
    let out = Command::new(env!("CARGO_BIN_EXE_diredi-cloud-worker"))
        .current_dir(repo_root())
        .args(["perf", "steady", "--seconds", "1", "--batch", "8", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "perf steady failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("µs per call of 8 windows"), "{stdout}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(doc["benchmark"], "perf-steady");
    assert_eq!(doc["batch"], 8);
    let buckets = doc["buckets"].as_array().unwrap();
    // 1 s in 100 ms buckets: the last, partial one is not written.
    assert!(
        (8..=10).contains(&buckets.len()),
        "{} buckets",
        buckets.len()
    );
    let at: Vec<u64> = buckets
        .iter()
        .map(|b| b["at_ms"].as_u64().unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
    let summary = &doc["summary"];
    let median = summary["median_us_per_call"].as_f64().unwrap();
    let max = summary["max_us_per_call"].as_f64().unwrap();
    assert!(median > 0.0 && max >= median, "{summary}");
    let per_call: Vec<f64> = buckets
        .iter()
        .filter(|b| b["calls"].as_u64().unwrap() >= 3)
        .map(|b| b["us_per_call"].as_f64().unwrap())
        .collect();
    assert_eq!(
        summary["buckets"].as_u64().unwrap() as usize,
        per_call.len()
    );
    assert_eq!(per_call.iter().copied().fold(0.0, f64::max), max);
}
