//! `diredi-cloud-worker perf load`: the load generator of the performance harness, run as its
//! own process so its CPU is not the gateway's or the harness's.
//!
//! N sensors `{prefix}0 .. {prefix}N-1` replay a real recording of the dataset (each from its
//! own offset, looping) to `diredi/v1/{gw}/sensor/{id}`, QoS 0, in round-robin order: global
//! message `j` is message `k = j / N` of sensor `i = j % N`, and its first sample has the
//! timestamp `base_ts + k × samples_per_message × period`. Timestamps are continuous, so a
//! gateway never resets a sensor's window during a run.
//!
//! At a fixed offered rate, message `j` is due `j / messages_per_second` after the start; with
//! rate 0 (flat out) the MQTT request queue sets the pace. The Unix time in µs at which each
//! message was handed to the MQTT client is written, as `i64` little-endian in the order `j`,
//! to `--times`; the harness joins it with the inference results (see [`super::sensor_message`])
//! to get publish → result latency. A JSON [`LoadReport`] goes to stdout.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use diredi_protocol::manifest::Manifest;
use diredi_protocol::sensor::{encode_binary, encode_json, encode_senml};
use diredi_protocol::Topics;
use rumqttc::{Event, MqttOptions, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::procstat;
use crate::simulate::PayloadFormat;

/// Requests queued between the publisher and the MQTT event loop (flat out, a full queue is
/// what slows the publisher down).
const REQUEST_QUEUE: usize = 1024;
/// Rows read from the dataset: one long recording is plenty, the replay loops.
const MAX_ROWS: usize = 50_000;

/// Arguments of `diredi-cloud-worker perf load`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// MQTT broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// MQTT broker port.
    #[arg(long)]
    pub port: u16,
    /// Gateway id of the sensor topics.
    #[arg(long)]
    pub gateway: String,
    /// Sensor ids are `{prefix}{i}`.
    #[arg(long, default_value = "perf-")]
    pub sensor_prefix: String,
    /// Simulated sensors.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub sensors: u32,
    /// Payload format.
    #[arg(long, value_enum, default_value_t = PayloadFormat::Binary)]
    pub format: PayloadFormat,
    /// Samples per message.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub samples_per_message: u32,
    /// Offered windows/s over all sensors (one window per `stride` samples); 0 = flat out.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Dataset whose first recording is replayed.
    #[arg(long, default_value = "data/hapt")]
    pub dataset: PathBuf,
    /// Model manifest: channel order, stride and sample rate.
    #[arg(long, default_value = "onnx-models/hapt-student-v1.json")]
    pub model: PathBuf,
    /// Unix ms of every sensor's first sample.
    #[arg(long)]
    pub base_ts: i64,
    /// Where to write the publish times (i64 LE µs, one per message).
    #[arg(long)]
    pub times: PathBuf,
}

/// What one load run sent (printed as JSON on stdout).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// Messages handed to the MQTT client, over all sensors.
    pub messages: u64,
    /// Payload bytes of those messages.
    pub bytes: u64,
    /// Seconds from the first to the last publish.
    pub seconds: f64,
    /// CPU seconds (user + system) of this process.
    pub cpu_seconds: f64,
    /// Peak resident memory of this process, MiB.
    pub rss_peak_mib: f64,
}

/// The manifest fields the load needs.
pub(crate) struct Shape {
    pub channels: Vec<String>,
    pub window: usize,
    pub stride: usize,
    pub sample_rate_hz: f64,
}

impl Shape {
    pub(crate) fn read(manifest: &Path) -> Result<Shape> {
        let bytes = std::fs::read(manifest)
            .with_context(|| format!("reading manifest {}", manifest.display()))?;
        let m = Manifest::from_slice(&bytes)
            .with_context(|| format!("parsing manifest {}", manifest.display()))?;
        if m.input.stride == 0
            || m.input.window == 0
            || !m.input.sample_rate_hz.is_finite()
            || m.input.sample_rate_hz <= 0.0
        {
            bail!(
                "{}: window, stride and sample rate must be positive",
                manifest.display()
            );
        }
        Ok(Shape {
            channels: m.input.channels,
            window: m.input.window,
            stride: m.input.stride,
            sample_rate_hz: m.input.sample_rate_hz,
        })
    }

    pub(crate) fn period_ms(&self) -> f64 {
        1000.0 / self.sample_rate_hz
    }
}

/// Rows (row-major, in `channels` order) of the first recording of a dataset in the generic
/// format, at most [`MAX_ROWS`].
pub(crate) fn read_rows(dataset: &Path, channels: &[String]) -> Result<Vec<f32>> {
    let index = dataset.join("recordings.csv");
    let text = std::fs::read_to_string(&index).with_context(|| {
        format!(
            "reading {} (fetch the data with scripts/fetch-hapt.sh)",
            index.display()
        )
    })?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let file_col = header
        .iter()
        .position(|h| *h == "file")
        .with_context(|| format!("{}: no `file` column", index.display()))?;
    let file = lines
        .next()
        .and_then(|l| l.split(',').nth(file_col))
        .with_context(|| format!("{}: no recording", index.display()))?;
    let path = dataset.join("recordings").join(file);
    let csv =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let cols: Vec<usize> = channels
        .iter()
        .map(|c| {
            header
                .iter()
                .position(|h| h == c)
                .with_context(|| format!("{}: no column {c:?}", path.display()))
        })
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for (n, line) in lines.enumerate().take(MAX_ROWS) {
        let fields: Vec<&str> = line.split(',').collect();
        for &c in &cols {
            let v: f32 = fields
                .get(c)
                .and_then(|f| f.trim().parse().ok())
                .with_context(|| {
                    format!(
                        "{}: row {} column {c} is not a number",
                        path.display(),
                        n + 2
                    )
                })?;
            rows.push(v);
        }
    }
    if rows.is_empty() {
        bail!("{}: no rows", path.display());
    }
    Ok(rows)
}

fn unix_us_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Runs the load until `--seconds` pass or `shutdown` is cancelled.
pub async fn run(args: LoadArgs, shutdown: CancellationToken) -> Result<LoadReport> {
    let shape = Shape::read(&args.model)?;
    let c = shape.channels.len();
    let data = read_rows(&args.dataset, &shape.channels)?;
    let rows = data.len() / c;
    let n = args.sensors as usize;
    let spm = args.samples_per_message as usize;
    let period_ms = shape.period_ms();
    let topics = Topics::new(&args.gateway)?;
    let sensor_topics: Vec<String> = (0..n)
        .map(|i| topics.sensor(&format!("{}{i}", args.sensor_prefix)))
        .collect();
    let names: Vec<String> = (0..n)
        .map(|i| format!("{}{i}", args.sensor_prefix))
        .collect();
    // Each sensor starts somewhere else in the recording, so they do not send equal windows.
    let mut cursor: Vec<usize> = (0..n).map(|i| (i * 7919 * shape.stride) % rows).collect();

    let mut options = MqttOptions::new(
        format!("diredi-perf-load-{}", std::process::id()),
        args.host.clone(),
        args.port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = diredi_mqtt::client(options, REQUEST_QUEUE);
    // No Nagle: a message leaves when it is published, not when the kernel decides.
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    let driver = tokio::spawn(async move {
        let mut connected = Some(connected_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = connected.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), connected_rx).await {
        Ok(Ok(())) => {}
        _ => bail!(
            "no CONNACK from the MQTT broker at {}:{} within 10 s",
            args.host,
            args.port
        ),
    }

    let messages_per_second = args.rate * shape.stride as f64 / spm as f64;
    let paced = messages_per_second > 0.0;
    let mut times: Vec<i64> = Vec::new();
    let mut scratch: Vec<f32> = Vec::with_capacity(spm * c);
    let mut bytes = 0u64;
    let started = Instant::now();
    let limit = Duration::from_secs_f64(args.seconds.max(0.0));
    let mut j: usize = 0;
    loop {
        if shutdown.is_cancelled() || started.elapsed() >= limit {
            break;
        }
        if paced {
            let due = started + Duration::from_secs_f64(j as f64 / messages_per_second);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let (i, k) = (j % n, j / n);
        scratch.clear();
        for _ in 0..spm {
            let r = cursor[i];
            scratch.extend_from_slice(&data[r * c..(r + 1) * c]);
            cursor[i] = (r + 1) % rows;
        }
        let ts = args.base_ts + ((k * spm) as f64 * period_ms).round() as i64;
        let payload = match args.format {
            PayloadFormat::Binary => encode_binary(Some(ts), &scratch, c),
            PayloadFormat::Json => encode_json(Some(ts), &scratch, c),
            PayloadFormat::Senml => encode_senml(
                &format!("{}:", names[i]),
                ts,
                shape.sample_rate_hz,
                &scratch,
                &shape.channels,
            ),
        };
        bytes += payload.len() as u64;
        times.push(unix_us_now());
        if client
            .publish(sensor_topics[i].as_str(), QoS::AtMostOnce, false, payload)
            .await
            .is_err()
        {
            bail!("the MQTT connection closed during the load");
        }
        j += 1;
    }
    let seconds = match (times.first(), times.last()) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e6,
        _ => 0.0,
    };
    // Everything queued leaves before the DISCONNECT does.
    let _ = client.disconnect().await;
    match tokio::time::timeout(Duration::from_secs(30), driver).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => bail!("MQTT connection failed at the end of the load: {e}"),
        Ok(Err(e)) => bail!("MQTT task failed: {e}"),
        Err(_) => bail!("the queued messages did not leave within 30 s"),
    }

    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&args.times)
            .with_context(|| format!("creating {}", args.times.display()))?,
    );
    for t in &times {
        file.write_all(&t.to_le_bytes())?;
    }
    file.flush()?;
    let me = std::process::id();
    Ok(LoadReport {
        messages: times.len() as u64,
        bytes,
        seconds,
        cpu_seconds: procstat::cpu_seconds(me).unwrap_or(f64::NAN),
        rss_peak_mib: procstat::rss_peak_mib(me).unwrap_or(f64::NAN),
    })
}

/// Reads a publish-times file written by [`run`].
pub(crate) fn read_times(path: &Path) -> Result<Vec<i64>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            i64::from_le_bytes(a)
        })
        .collect())
}
