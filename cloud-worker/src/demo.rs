//! `diredi-cloud-worker demo`: the README's main job, seen from the user's side.
//!
//! It waits for the gateway to announce itself (`status`, retained), replays a user's real
//! recordings as a sensor through [`crate::simulate`], prints every inference result as it
//! arrives, and ends with a summary per class: how many windows the gateway labelled, and how
//! many of them match the label the dataset gives those samples.
//!
//! Ground truth comes from the simulator's own label messages (`--labels` semantics): the
//! demo listens to `label/{sensor}` as any monitoring client could, and scores a result when
//! one labelled run covers its whole window.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use diredi_protocol::messages::{GatewayState, InferenceMsg, LabelMsg, StatusMsg};
use diredi_protocol::Topics;
use rumqttc::{Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::simulate::{self, PayloadFormat, SimulateArgs, Speed};

/// Arguments of `diredi-cloud-worker demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Dataset directory in the generic format.
    #[arg(long, default_value = "data/hapt")]
    pub dataset: PathBuf,
    /// The user whose recordings are replayed.
    #[arg(long, default_value = "2")]
    pub subject: String,
    /// The session replayed.
    #[arg(long, default_value = "1")]
    pub session: String,
    /// Gateway id.
    #[arg(long, default_value = "demo")]
    pub gateway: String,
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Replay speed: a factor of realtime (the recordings are 50 Hz).
    #[arg(long, default_value_t = 20.0)]
    pub speed: f64,
    /// Print at most this many result lines (the summary counts all).
    #[arg(long, default_value_t = 40)]
    pub show: usize,
    /// The manifest of the model the gateway serves (for its window length).
    #[arg(long, default_value = "onnx-models/hapt-student-v1.json")]
    pub model: PathBuf,
    /// Also publish the dataset's labels and score the results against them. The gateway
    /// stores labelled windows as the user's exclusive data, so leave this off before a
    /// DiReDi cycle on the same user.
    #[arg(long)]
    pub labels: bool,
    /// Seconds to wait for the gateway's online status.
    #[arg(long, default_value_t = 30)]
    pub wait_s: u64,
}

/// One labelled run of samples, `[from_ts, to_ts]` in unix ms.
#[derive(Debug, Clone)]
struct Run {
    from: i64,
    to: i64,
    label: String,
}

/// Results of a demo run, per class of the ground truth.
#[derive(Debug, Default)]
pub struct DemoSummary {
    /// Inference results received.
    pub results: usize,
    /// Results whose window lies inside one labelled run.
    pub scored: usize,
    /// Scored results whose label matches.
    pub correct: usize,
    /// `truth → (scored, correct)`.
    pub per_class: BTreeMap<String, (usize, usize)>,
    /// Model versions seen in results.
    pub versions: BTreeMap<u64, usize>,
    /// Results per predicted label.
    pub predicted: BTreeMap<String, usize>,
}

/// Runs the demo; returns the summary printed at the end.
pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> Result<DemoSummary> {
    let topics = Topics::new(&args.gateway).context("gateway id")?;
    let mut options = MqttOptions::new(
        format!("diredi-demo-{}", std::process::id()),
        args.host.clone(),
        args.port,
    );
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = diredi_mqtt::client(options, 64);
    for filter in [
        topics.status(),
        format!("{}inference/+", topics.prefix()),
        topics.label_filter(),
        topics.error(),
    ] {
        client.subscribe(filter, QoS::AtMostOnce).await?;
    }

    // Wait for the gateway's retained online status (the broker may still be starting).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait_s);
    let status = loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return Ok(DemoSummary::default()),
            _ = tokio::time::sleep_until(deadline) => bail!(
                "no online status from gateway {} on {}:{} within {} s; is it running?",
                args.gateway, args.host, args.port, args.wait_s
            ),
            ev = events.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topics.status() => {
                if let Ok(s) = serde_json::from_slice::<StatusMsg>(&p.payload) {
                    if s.state == GatewayState::Online {
                        break s;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "broker not reachable yet");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    println!(
        "gateway {} online: model {} v{}, execution provider {}",
        status.gateway_id,
        status.model_id.as_deref().unwrap_or("-"),
        status
            .model_version
            .map_or("-".to_owned(), |v| v.to_string()),
        status.execution_provider.as_deref().unwrap_or("-"),
    );

    let sensor = format!("user-{}", args.subject);
    let sim = SimulateArgs {
        dataset: args.dataset.clone(),
        subjects: vec![args.subject.clone()],
        sessions: vec![args.session.clone()],
        gateway: Some(args.gateway.clone()),
        sensor_prefix: "sim-".to_owned(),
        sensor: Some(sensor.clone()),
        sensors: None,
        format: PayloadFormat::Json,
        speed: Speed::Factor(args.speed),
        samples_per_message: 32,
        host: args.host.clone(),
        port: args.port,
        qos: 1,
        limit_seconds: None,
        repeat: false,
        labels: args.labels,
    };
    println!(
        "replaying subject {} session {} of {} as sensor {sensor} at {}x realtime",
        args.subject,
        args.session,
        args.dataset.display(),
        args.speed
    );
    let sim_stop = shutdown.child_token();
    let mut replay = tokio::spawn(simulate::run(sim, sim_stop.clone()));

    let mut runs: Vec<Run> = Vec::new();
    let mut results: Vec<InferenceMsg> = Vec::new();
    let mut replay_done = false;
    let mut quiet_until: Option<tokio::time::Instant> = None;
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = &mut replay, if !replay_done => {
                replay_done = true;
                let report = r.context("replay task")??;
                println!(
                    "replay done: {} messages, {} samples, {:.1} s",
                    report.messages, report.samples, report.seconds
                );
                // Results of the last windows are still on their way.
                quiet_until = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                continue;
            }
            _ = async {
                match quiet_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => break,
            ev = events.poll() => ev,
        };
        let publish = match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => p,
            Ok(_) => continue,
            Err(e) => bail!("lost the broker: {e}"),
        };
        if let Some(t) = quiet_until.as_mut() {
            *t = tokio::time::Instant::now() + Duration::from_secs(2);
        }
        let topic = publish.topic.as_str();
        if topic.starts_with(&format!("{}inference/", topics.prefix())) {
            let Ok(msg) = serde_json::from_slice::<InferenceMsg>(&publish.payload) else {
                continue;
            };
            if results.len() < args.show {
                println!(
                    "{:>5}  {:<12} {:>5.1}%  model v{}  {:.2} ms",
                    results.len() + 1,
                    msg.label,
                    msg.confidence * 100.0,
                    msg.model_version,
                    msg.latency_ms
                );
            } else if results.len() == args.show {
                println!("  ... (further results are counted in the summary)");
            }
            results.push(msg);
        } else if topic == topics.label(&sensor) {
            if let Ok(LabelMsg::Range {
                from_ts,
                to_ts,
                class,
            }) = serde_json::from_slice::<LabelMsg>(&publish.payload)
            {
                runs.push(Run {
                    from: from_ts,
                    to: to_ts,
                    label: class,
                });
            }
        } else if topic == topics.error() {
            println!(
                "gateway error: {}",
                String::from_utf8_lossy(&publish.payload)
            );
        }
    }
    sim_stop.cancel();
    let _ = client.disconnect().await;

    let (window_ms, period_ms) = window_span(&args)?;
    let runs = merge_runs(runs, period_ms + period_ms / 2 + 1);
    let summary = score(&results, &runs, window_ms);
    print_summary(&summary);
    Ok(summary)
}

/// Time from the first to the last sample of a window, and between samples, in ms, from the
/// model's manifest.
fn window_span(args: &DemoArgs) -> Result<(i64, i64)> {
    let text =
        std::fs::read(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let m: diredi_protocol::manifest::Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a model manifest", args.model.display()))?;
    let rate = m.input.sample_rate_hz;
    if rate.is_nan() || rate <= 0.0 {
        bail!("{}: sample_rate_hz must be positive", args.model.display());
    }
    let period = 1000.0 / rate;
    Ok((
        ((m.input.window as f64 - 1.0) * period).round() as i64,
        period.round() as i64,
    ))
}

/// Joins runs of one class that follow each other within `max_gap_ms` (the simulator labels
/// each message's samples separately).
fn merge_runs(mut runs: Vec<Run>, max_gap_ms: i64) -> Vec<Run> {
    runs.sort_by_key(|r| r.from);
    let mut out: Vec<Run> = Vec::with_capacity(runs.len());
    for r in runs {
        match out.last_mut() {
            Some(last) if last.label == r.label && r.from - last.to <= max_gap_ms => {
                last.to = last.to.max(r.to);
            }
            _ => out.push(r),
        }
    }
    out
}

fn score(results: &[InferenceMsg], runs: &[Run], window_ms: i64) -> DemoSummary {
    let mut s = DemoSummary {
        results: results.len(),
        ..DemoSummary::default()
    };
    for r in results {
        *s.versions.entry(r.model_version).or_default() += 1;
        *s.predicted.entry(r.label.clone()).or_default() += 1;
        let start = r.ts - window_ms;
        let Some(run) = runs.iter().find(|run| run.from <= start && r.ts <= run.to) else {
            continue;
        };
        s.scored += 1;
        let hit = run.label == r.label;
        s.correct += usize::from(hit);
        let e = s.per_class.entry(run.label.clone()).or_default();
        e.0 += 1;
        e.1 += usize::from(hit);
    }
    s
}

fn print_summary(s: &DemoSummary) {
    println!();
    if s.scored > 0 {
        println!(
            "{} results; {} windows lie inside one labelled activity",
            s.results, s.scored
        );
    } else {
        println!("{} results", s.results);
    }
    for (class, (n, ok)) in &s.per_class {
        println!(
            "  {class:<12} {ok:>4}/{n:<4} {:>5.1}%",
            100.0 * *ok as f64 / (*n).max(1) as f64
        );
    }
    if s.scored > 0 {
        println!(
            "accuracy on labelled windows: {:.1}% (classes the model does not know count as errors)",
            100.0 * s.correct as f64 / s.scored as f64
        );
    }
    for (v, n) in &s.versions {
        println!("model v{v}: {n} results");
    }
    if s.scored == 0 {
        let mut shown: Vec<_> = s.predicted.iter().collect();
        shown.sort_by(|a, b| b.1.cmp(a.1));
        let line: Vec<String> = shown.iter().map(|(c, n)| format!("{c} {n}")).collect();
        println!("labels given: {}", line.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(ts: i64, label: &str) -> InferenceMsg {
        InferenceMsg {
            sensor: "s".into(),
            ts,
            label: label.into(),
            confidence: 0.9,
            probabilities: BTreeMap::new(),
            model_version: 1,
            latency_ms: 0.1,
            window_id: format!("s:{ts}"),
        }
    }

    #[test]
    fn only_windows_inside_one_run_are_scored() {
        let runs = vec![
            Run {
                from: 0,
                to: 10_000,
                label: "walk".into(),
            },
            Run {
                from: 12_000,
                to: 20_000,
                label: "sit".into(),
            },
        ];
        let results = vec![
            result(5_000, "walk"),  // inside run 1, right
            result(11_000, "walk"), // straddles the gap: not scored
            result(19_000, "walk"), // inside run 2, wrong
            result(1_000, "walk"),  // starts before run 1: not scored
        ];
        let s = score(&results, &runs, 2_540);
        assert_eq!(s.versions[&1], 4);
        // Consecutive runs of one class join; a gap or another class splits them.
        let pieces = vec![
            Run {
                from: 0,
                to: 620,
                label: "walk".into(),
            },
            Run {
                from: 640,
                to: 1_260,
                label: "walk".into(),
            },
            Run {
                from: 1_280,
                to: 1_900,
                label: "sit".into(),
            },
            Run {
                from: 3_000,
                to: 3_600,
                label: "sit".into(),
            },
        ];
        let merged = merge_runs(pieces, 31);
        let spans: Vec<(i64, i64)> = merged.iter().map(|r| (r.from, r.to)).collect();
        assert_eq!(spans, [(0, 1_260), (1_280, 1_900), (3_000, 3_600)]);
        assert_eq!((s.results, s.scored, s.correct), (4, 2, 1));
        assert_eq!(s.per_class["walk"], (1, 1));
        assert_eq!(s.per_class["sit"], (1, 0));
        assert_eq!(s.versions[&1], 4);
    }
}
