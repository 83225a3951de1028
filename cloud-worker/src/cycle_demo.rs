//! The whole DiReDi cycle from the user's side, over MQTT, against a running gateway and a
//! running cloud worker (`diredi-cloud-worker demo --cycle`, and the end-to-end test).
//!
//! 1. The user's *test* windows go to the gateway as a sensor: the installed model's
//!    accuracy on them is measured from the inference results.
//! 2. The user's *exclusive* windows go to the gateway with their labels (time ranges).
//! 3. `{"cmd":"adapt"}`: the gateway adapts locally and sends the knowledge to the cloud.
//! 4. The cloud worker updates its teacher, re-distils, gates, signs and dispatches; the
//!    gateway verifies and installs the new model.
//! 5. The test windows again: the new model's accuracy.
//!
//! Each window is sent as one message of `window` samples, its timestamps apart from the
//! others' by more than the gateway's gap tolerance, so each gives exactly one window whose
//! end time identifies it. Everything the gateway publishes is recorded, so callers can check
//! that no exclusive window left the gateway.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use diredi_learn::dataset::Dataset;
use diredi_learn::split::{Split, SplitConfig};
use diredi_learn::window::WindowSet;
use diredi_protocol::messages::{GatewayState, InferenceMsg, StatusMsg};
use diredi_protocol::sensor::encode_json;
use diredi_protocol::Topics;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Arguments of the cycle.
#[derive(clap::Args, Debug, Clone)]
pub struct CycleArgs {
    /// Dataset in the generic format.
    #[arg(long, default_value = "data/hapt")]
    pub dataset: PathBuf,
    /// Split configuration (names the user's exclusive and test windows).
    #[arg(long, default_value = "cloud-worker/splits/hapt.toml")]
    pub split: PathBuf,
    /// The user.
    #[arg(long, default_value = "2")]
    pub subject: String,
    /// Gateway id.
    #[arg(long, default_value = "demo")]
    pub gateway: String,
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Seconds to wait for the new model after `adapt`.
    #[arg(long, default_value_t = 600)]
    pub wait_s: u64,
}

/// What a cycle measured.
#[derive(Debug, Clone, Serialize)]
pub struct CycleReport {
    /// The user.
    pub subject: String,
    /// Model version before and after.
    pub version_before: u64,
    pub version_after: u64,
    /// User-test accuracy (fraction) before and after.
    pub accuracy_before: f64,
    pub accuracy_after: f64,
    /// Test windows scored.
    pub test_windows: usize,
    /// Exclusive windows labelled on the gateway.
    pub exclusive_windows: usize,
    /// Bytes the gateway published on its knowledge topic (what left it for the cloud).
    pub knowledge_bytes: usize,
    /// Bytes of the exclusive windows as raw f32 samples (what DiReDi does not send).
    pub exclusive_raw_bytes: usize,
    /// Seconds from `adapt` to the new model serving.
    pub cycle_seconds: f64,
    /// Every message the gateway published (topic, payload), for privacy checks.
    #[serde(skip)]
    pub gateway_messages: Vec<(String, Vec<u8>)>,
    /// The exclusive windows: raw rows (`T × C`) and standardised (`C × T`).
    #[serde(skip)]
    pub exclusive: Vec<(Vec<f32>, Vec<f32>)>,
}

struct Link {
    client: AsyncClient,
    events: EventLoop,
    topics: Topics,
    captured: Vec<(String, Vec<u8>)>,
}

impl Link {
    /// The next publish, recording the gateway's own messages.
    async fn next(&mut self, until: Instant) -> Result<Option<(String, Vec<u8>)>> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match tokio::time::timeout(left, self.events.poll()).await {
                Err(_) => return Ok(None),
                Ok(Err(e)) => bail!("lost the broker: {e}"),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let topic = p.topic.clone();
                    let payload = p.payload.to_vec();
                    let ours = [
                        "/sensor/",
                        "/label/",
                        "/command",
                        "/knowledge/ack",
                        "/model",
                    ]
                    .iter()
                    .any(|s| topic.contains(s))
                        || topic.ends_with("/update");
                    if !ours {
                        self.captured.push((topic.clone(), payload.clone()));
                    }
                    return Ok(Some((topic, payload)));
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Waits for a message on `topic` whose JSON satisfies `pred`.
    async fn wait_json(
        &mut self,
        topic: &str,
        until: Instant,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        while let Some((t, p)) = self.next(until).await? {
            if t == topic {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p) {
                    if pred(&v) {
                        return Ok(v);
                    }
                }
            }
        }
        bail!("timed out waiting on {topic}")
    }
}

/// Windows sent before the labels sent with them must have reached the gateway. The broker
/// may deliver a window and its label (two topics) in either order, and the gateway keeps the
/// last `[learning] recent_windows` (32) windows of a sensor for labels that come after them:
/// half of that bounds how far a label can fall behind its window.
const LABEL_CHUNK: usize = 16;

/// Sends each window of `set` as its own message on `sensor`, starting at `t0`; returns the
/// end timestamp of every window. Labels go too when `labels` is given, [`LABEL_CHUNK`]
/// windows at a time, each chunk once the gateway has counted the labels before it
/// (`labels_in` in its metrics).
async fn send_windows(
    link: &mut Link,
    dataset: &Dataset,
    set: &WindowSet,
    sensor: &str,
    t0: i64,
    period_ms: f64,
    classes: Option<&[String]>,
) -> Result<Vec<i64>> {
    let (c, t) = (set.channels, set.len);
    let span = ((t - 1) as f64 * period_ms).round() as i64;
    let metrics = link.topics.metrics();
    let labels_in = |v: &serde_json::Value| v["labels_in"].as_u64().unwrap_or(0);
    let mut labels_base = None;
    if classes.is_some() {
        let until = Instant::now() + Duration::from_secs(30);
        let v = link
            .wait_json(&metrics, until, |_| true)
            .await
            .context("waiting for the gateway's metrics")?;
        labels_base = Some(labels_in(&v));
    }
    let mut ends = Vec::with_capacity(set.refs.len());
    for (i, r) in set.refs.iter().enumerate() {
        if let Some(base) = labels_base.filter(|_| i > 0 && i % LABEL_CHUNK == 0) {
            let want = base + i as u64;
            let until = Instant::now() + Duration::from_secs(60);
            link.wait_json(&metrics, until, |v| labels_in(v) >= want)
                .await
                .with_context(|| format!("waiting for the gateway to count {i} labels"))?;
        }
        let rec = &dataset.recordings[r.recording];
        let rows: Vec<f32> = (r.start..r.start + t)
            .flat_map(|k| rec.row(k).iter().copied())
            .collect();
        let ts = t0 + i as i64 * 60_000;
        link.client
            .publish(
                link.topics.sensor(sensor),
                QoS::AtLeastOnce,
                false,
                encode_json(Some(ts), &rows, c),
            )
            .await?;
        if let Some(classes) = classes {
            let class = &classes[set.y[i] as usize];
            let label = serde_json::json!({"from_ts": ts, "to_ts": ts + span, "class": class});
            link.client
                .publish(
                    link.topics.label(sensor),
                    QoS::AtLeastOnce,
                    false,
                    label.to_string().into_bytes(),
                )
                .await?;
        }
        ends.push(ts + span);
    }
    Ok(ends)
}

/// Sends the test windows on a fresh sensor and scores the results.
async fn evaluate(
    link: &mut Link,
    dataset: &Dataset,
    set: &WindowSet,
    split: &Split,
    sensor: &str,
    period_ms: f64,
) -> Result<(f64, u64, usize)> {
    let ends = send_windows(
        link,
        dataset,
        set,
        sensor,
        1_700_000_000_000,
        period_ms,
        None,
    )
    .await?;
    let truth: HashMap<i64, &str> = ends
        .iter()
        .zip(&set.y)
        .map(|(e, y)| (*e, split.classes[*y as usize].as_str()))
        .collect();
    let topic = link.topics.inference(sensor);
    let until = Instant::now() + Duration::from_secs(60);
    let (mut right, mut seen, mut version) = (0usize, 0usize, 0u64);
    while seen < ends.len() {
        let Some((t, p)) = link.next(until).await? else {
            break;
        };
        if t != topic {
            continue;
        }
        let Ok(m) = serde_json::from_slice::<InferenceMsg>(&p) else {
            continue;
        };
        if let Some(want) = truth.get(&m.ts) {
            seen += 1;
            right += usize::from(m.label == *want);
            version = m.model_version;
        }
    }
    if seen == 0 {
        bail!("no inference results for sensor {sensor}");
    }
    Ok((right as f64 / seen as f64, version, seen))
}

/// Runs the cycle; see the module documentation.
pub async fn run(args: &CycleArgs, shutdown: CancellationToken) -> Result<CycleReport> {
    let (dataset, split) = {
        let (d, s) = (args.dataset.clone(), args.split.clone());
        tokio::task::spawn_blocking(move || -> Result<(Dataset, Split)> {
            let dataset = Dataset::load(&d)?;
            let cfg = SplitConfig::from_file(&s)?;
            let split = Split::build(&cfg, &dataset)?;
            Ok((dataset, split))
        })
        .await??
    };
    let user = split
        .users
        .iter()
        .find(|u| u.subject == args.subject)
        .with_context(|| {
            format!(
                "subject {} is not a user of split {}",
                args.subject, split.name
            )
        })?;
    let period_ms = 1000.0 / split.sample_rate_hz;
    let topics = Topics::new(&args.gateway)?;
    let mut options = MqttOptions::new(
        format!("diredi-cycle-{}", std::process::id()),
        args.host.clone(),
        args.port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(16 << 20, 16 << 20);
    // Room for every window and label of a user: publishing never waits for the event loop,
    // which `Link::next` drives (dropping a half-polled `poll()` could lose a packet).
    let (client, events) = diredi_mqtt::client(options, 65_536);
    // Every topic the gateway publishes on (not the sensor and label topics this side
    // writes: echoing them back would only load the broker).
    for t in [
        format!("{}inference/+", topics.prefix()),
        topics.status(),
        topics.metrics(),
        topics.error(),
        topics.adaptation(),
        topics.knowledge(),
    ] {
        client.subscribe(t, QoS::AtLeastOnce).await?;
    }
    let mut link = Link {
        client,
        events,
        topics: topics.clone(),
        captured: Vec::new(),
    };
    let until = Instant::now() + Duration::from_secs(30);
    let status = link
        .wait_json(&topics.status(), until, |v| v["state"] == "online")
        .await
        .context("waiting for the gateway's online status")?;
    let status: StatusMsg = serde_json::from_value(status)?;
    debug_assert_eq!(status.state, GatewayState::Online);
    println!(
        "gateway {} online, model v{}",
        status.gateway_id,
        status.model_version.unwrap_or(0)
    );

    let (acc_before, v_before, n_test) = evaluate(
        &mut link,
        &dataset,
        &user.test,
        &split,
        "user-test-before",
        period_ms,
    )
    .await?;
    println!(
        "user {}: {n_test} test windows, accuracy {:.1}% with model v{v_before}",
        args.subject,
        acc_before * 100.0
    );

    let n_excl = user.exclusive.refs.len();
    send_windows(
        &mut link,
        &dataset,
        &user.exclusive,
        "user-phone",
        1_600_000_000_000,
        period_ms,
        Some(&split.classes),
    )
    .await?;
    let until = Instant::now() + Duration::from_secs(60);
    link.wait_json(&topics.metrics(), until, |v| {
        v["labelled_windows"].as_u64().unwrap_or(0) >= n_excl as u64
    })
    .await
    .context("waiting for the labelled windows in the gateway's metrics")?;
    println!("{n_excl} exclusive windows labelled on the gateway (they stay there)");

    let started = Instant::now();
    link.client
        .publish(
            topics.command(),
            QoS::AtLeastOnce,
            false,
            br#"{"cmd":"adapt"}"#.to_vec(),
        )
        .await?;
    let until = Instant::now() + Duration::from_secs(args.wait_s);
    let adaptation = link
        .wait_json(&topics.adaptation(), until, |_| true)
        .await?;
    if adaptation["state"] != "done" {
        bail!("adaptation failed: {adaptation}");
    }
    println!(
        "adapted on the gateway in {:.1} s; knowledge package {} bytes sent to the cloud",
        adaptation["report"]["seconds"].as_f64().unwrap_or(0.0),
        adaptation["report"]["knowledge_bytes"]
    );
    let v_target = v_before + 1;
    let status_topic = topics.status();
    tokio::select! {
        _ = shutdown.cancelled() => bail!("cancelled"),
        r = link.wait_json(&status_topic, until, |v| {
            v["install"]["state"] == "committed" && v["install"]["version"] == v_target
                || v["install"]["state"] == "rejected"
        }) => {
            let s = r.context("waiting for the new model")?;
            if s["install"]["state"] == "rejected" {
                bail!("the gateway rejected the new model: {}", s["install"]["detail"]);
            }
        }
    }
    let cycle_seconds = started.elapsed().as_secs_f64();
    println!("model v{v_target} installed {cycle_seconds:.0} s after `adapt`");

    let (acc_after, v_after, _) = evaluate(
        &mut link,
        &dataset,
        &user.test,
        &split,
        "user-test-after",
        period_ms,
    )
    .await?;
    println!(
        "user {}: accuracy {:.1}% with model v{v_after} (was {:.1}% with v{v_before})",
        args.subject,
        acc_after * 100.0,
        acc_before * 100.0
    );
    // Let late messages (metrics) arrive so the capture is complete.
    let _ = link.next(Instant::now() + Duration::from_millis(500)).await;
    let _ = link.client.disconnect().await;

    // The package itself when it travelled on this broker, else (an uplink) its size as the
    // gateway reported it.
    let knowledge_topic = topics.knowledge();
    let knowledge_bytes = link
        .captured
        .iter()
        .filter(|(t, _)| *t == knowledge_topic)
        .map(|(_, p)| p.len())
        .max()
        .or_else(|| {
            adaptation["report"]["knowledge_bytes"]
                .as_u64()
                .and_then(|b| usize::try_from(b).ok())
        })
        .unwrap_or(0);
    let (c, t) = (user.exclusive.channels, user.exclusive.len);
    let exclusive: Vec<(Vec<f32>, Vec<f32>)> = user
        .exclusive
        .refs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let rec = &dataset.recordings[r.recording];
            let raw = (r.start..r.start + t)
                .flat_map(|k| rec.row(k).iter().copied())
                .collect();
            let std = user.exclusive.x[i * c * t..(i + 1) * c * t].to_vec();
            (raw, std)
        })
        .collect();
    Ok(CycleReport {
        subject: args.subject.clone(),
        version_before: v_before,
        version_after: v_after,
        accuracy_before: acc_before,
        accuracy_after: acc_after,
        test_windows: n_test,
        exclusive_windows: n_excl,
        knowledge_bytes,
        exclusive_raw_bytes: n_excl * c * t * 4,
        cycle_seconds,
        gateway_messages: link.captured,
        exclusive,
    })
}
