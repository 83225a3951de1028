//! Sensor simulator: replays recordings of a dataset in the generic format over MQTT, the way
//! sensors would, to `diredi/v1/{gateway}/sensor/{sensor_id}`. Used by the README demo, the
//! integration tests and the benchmarks.
//!
//! Where it stands: dataset on disk → **plan** (which recording plays on which sensor id, cut
//! into messages of `--samples-per-message` rows) → **schedule** (every stream's messages in
//! the order their last sample is "measured") → encode (`diredi_protocol::sensor`) → MQTT out
//! → the gateway's MQTT in.
//!
//! Time: the run starts at `now`; a message carries the Unix ms of its first sample, and
//! samples follow at `1 / sample_rate_hz`. At `--speed realtime` a message is published when
//! its last sample would have been measured, so timestamps track the wall clock; a factor `f`
//! publishes `f` times faster with the same timestamps; `max` publishes as fast as the
//! connection takes it. With several streams each one is offset by a fraction of a message
//! period, so a load test does not send every sensor's message in the same instant.
//!
//! Labels of the dataset are only published with `--labels`, as `LabelMsg::Range` messages on
//! `diredi/v1/{gateway}/label/{sensor_id}`, right after the sensor message they describe.
//!
//! The plan and schedule are pure and unit-tested; [`run`] only moves their output to MQTT.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use diredi_learn::dataset::{Dataset, Recording};
use diredi_protocol::messages::LabelMsg;
use diredi_protocol::sensor::{encode_binary, encode_json, encode_senml};
use diredi_protocol::topics::{validate_id, Topics};
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long to wait for the broker's CONNACK, and for the last acknowledgements and the
/// disconnect to go out at the end.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests queued between the publisher and the MQTT event loop; a full queue slows the
/// publisher down (at `--speed max` this is what sets the pace).
const REQUEST_QUEUE: usize = 256;
/// Largest MQTT packet the protocol allows (remaining length of 2^28 - 1 bytes).
const MQTT_MAX_PACKET: usize = 268_435_455;

/// Arguments of `diredi-cloud-worker simulate`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Dataset directory in the generic format (`dataset.json`, `recordings.csv`, `recordings/`).
    #[arg(long, value_name = "DIR")]
    pub dataset: PathBuf,
    /// Subjects to replay; repeat the option or give a comma-separated list. Default: all.
    #[arg(long = "subject", value_name = "S", value_delimiter = ',')]
    pub subjects: Vec<String>,
    /// Sessions to replay; repeat the option or give a comma-separated list. Default: all.
    #[arg(long = "session", value_name = "X", value_delimiter = ',')]
    pub sessions: Vec<String>,
    /// Gateway id: messages go to `diredi/v1/{gateway}/sensor/{sensor_id}`. Default: this
    /// machine's host name, which is also the gateway's default id.
    #[arg(long, value_name = "ID")]
    pub gateway: Option<String>,
    /// Sensor ids are `{prefix}{recording}` (one sensor per recording), or `{prefix}{i}` with
    /// `--sensors N`.
    #[arg(long, value_name = "PREFIX", default_value = "sim-")]
    pub sensor_prefix: String,
    /// Play every selected recording, one after the other, on this one sensor id.
    #[arg(long, value_name = "ID", conflicts_with = "sensors")]
    pub sensor: Option<String>,
    /// Load test: play the selected recordings (one after the other) on N sensors at once,
    /// `{prefix}0` .. `{prefix}N-1`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub sensors: Option<u32>,
    /// Payload format.
    #[arg(long, value_enum, default_value_t = PayloadFormat::Json)]
    pub format: PayloadFormat,
    /// `realtime` (the dataset's sample rate), `max` (as fast as possible), or a factor of
    /// realtime such as `10`.
    #[arg(long, value_name = "SPEED", default_value = "realtime", value_parser = parse_speed)]
    pub speed: Speed,
    /// Samples (rows) per MQTT message; the last message of a recording may hold fewer. The
    /// gateway rejects messages above its decode limit (4096 samples by default).
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub samples_per_message: u32,
    /// MQTT broker host.
    #[arg(long, default_value = "localhost")]
    pub host: String,
    /// MQTT broker port (plain TCP).
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// MQTT QoS of the published messages: 0 or 1. With 1 the run ends once every message is
    /// acknowledged.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Stop after this many seconds of wall-clock time (at realtime speed, the same as seconds
    /// of data).
    #[arg(long, value_name = "SECONDS", value_parser = parse_limit)]
    pub limit_seconds: Option<f64>,
    /// Start again from the beginning when the selection ends (timestamps keep advancing);
    /// stop with `--limit-seconds` or Ctrl-C.
    #[arg(long = "loop")]
    pub repeat: bool,
    /// Also publish the dataset's labels on `diredi/v1/{gateway}/label/{sensor_id}`.
    #[arg(long)]
    pub labels: bool,
}

/// Sensor payload format (see `docs/ARCHITECTURE.md`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// `{"ts": .., "values": [[..], ..]}`.
    Json,
    /// SenML pack (RFC 8428), one record per channel and sample.
    Senml,
    /// `DRB1` header and little-endian f32 frames.
    Binary,
}

/// Replay speed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// This many times realtime (`1.0` = the dataset's sample rate).
    Factor(f64),
    /// No pacing: publish as fast as the MQTT connection accepts.
    Max,
}

pub fn parse_speed(s: &str) -> Result<Speed, String> {
    let t = s.trim();
    match t {
        "realtime" => return Ok(Speed::Factor(1.0)),
        "max" => return Ok(Speed::Max),
        _ => {}
    }
    let number = t.strip_suffix('x').unwrap_or(t);
    match number.parse::<f64>() {
        Ok(f) if f.is_finite() && f > 0.0 => Ok(Speed::Factor(f)),
        _ => Err(format!(
            "expected `realtime`, `max` or a positive factor such as `10`, found {s:?}"
        )),
    }
}

fn parse_limit(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "expected a positive number of seconds, found {s:?}"
        )),
    }
}

/// What a run sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    /// Sensor messages handed to the MQTT connection (with QoS 1 the run waits up to 10 s for
    /// their acknowledgements and warns about missing ones).
    pub messages: u64,
    /// Samples (rows) in those messages.
    pub samples: u64,
    /// Payload bytes of those messages.
    pub bytes: u64,
    /// Wall-clock seconds from the connection being up to the disconnect (so the last message
    /// has left).
    pub seconds: f64,
    /// Number of simulated sensors.
    pub sensors: usize,
    /// Label messages published (0 without `--labels`).
    pub label_messages: u64,
}

/// Replays the selected recordings until they end, `--limit-seconds` passes or `shutdown` is
/// cancelled, then disconnects cleanly. Errors: the dataset cannot be read, the selection is
/// empty or gives invalid ids, or the broker cannot be reached or drops the connection.
pub async fn run(args: SimulateArgs, shutdown: CancellationToken) -> anyhow::Result<SimReport> {
    let dir = args.dataset.clone();
    let dataset = tokio::task::spawn_blocking(move || Dataset::load(&dir))
        .await
        .context("dataset loader thread failed")?
        .with_context(|| format!("cannot load dataset {}", args.dataset.display()))?;
    let plan = Plan::build(&dataset, &args)?;
    tracing::info!(
        dataset = %dataset.meta.name,
        gateway = %plan.gateway,
        recordings = plan.recordings,
        sensors = plan.streams.len(),
        rows_per_sensor = plan.rows_per_stream(),
        format = ?args.format,
        speed = ?args.speed,
        "Simulating sensors."
    );

    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let mut options = MqttOptions::new(client_id(), args.host.clone(), args.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(64 * 1024, MQTT_MAX_PACKET);
    let (client, eventloop) = diredi_mqtt::client(options, REQUEST_QUEUE);
    let (progress_tx, mut progress_rx) = watch::channel(LinkProgress::default());
    let lost = CancellationToken::new();
    let mut driver = tokio::spawn(drive(eventloop, progress_tx, lost.clone()));
    let broker = format!("{}:{}", args.host, args.port);

    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            driver.abort();
            return Ok(SimReport { sensors: plan.streams.len(), ..SimReport::default() });
        }
        res = &mut driver => {
            let detail = match res {
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(())) => "the connection closed".to_owned(),
                Err(e) => format!("MQTT task failed: {e}"),
            };
            bail!("cannot connect to the MQTT broker at {broker}: {detail}");
        }
        _ = tokio::time::sleep(CONNECT_TIMEOUT) => {
            driver.abort();
            bail!("no CONNACK from the MQTT broker at {broker} within {CONNECT_TIMEOUT:?}");
        }
        _ = progress_rx.wait_for(|p| p.connected) => {}
    }

    let publisher = Publisher {
        client: &client,
        qos,
        dataset: &dataset,
        plan: &plan,
        args: &args,
    };
    let outcome = publisher.publish_all(&shutdown, &lost).await;

    // Let what was queued leave (and with QoS 1 be acknowledged) before disconnecting.
    let mut report = match outcome {
        Ok(report) => report,
        Err(e) => {
            driver.abort();
            return Err(e);
        }
    };
    if qos == QoS::AtLeastOnce {
        let wanted = report.messages + report.label_messages;
        let all_acked = tokio::time::timeout(
            DRAIN_TIMEOUT,
            progress_rx.wait_for(|p| p.acked >= wanted || p.closed),
        )
        .await
        .is_ok_and(|r| r.is_ok_and(|p| p.acked >= wanted));
        if !all_acked {
            let got = progress_rx.borrow().acked;
            tracing::warn!(
                wanted,
                acked = got,
                "Not every message was acknowledged in time."
            );
        }
    }
    // The disconnect queues behind what is still to be sent; both are bounded by the timeouts.
    if matches!(
        tokio::time::timeout(DRAIN_TIMEOUT, client.disconnect()).await,
        Ok(Ok(()))
    ) {
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut driver).await {
            Ok(Ok(Err(e))) => {
                bail!("MQTT connection to {broker} failed at the end of the run: {e}")
            }
            Ok(_) => {}
            Err(_) => {
                driver.abort();
                tracing::warn!(broker = %broker, "MQTT disconnect did not complete in time.");
            }
        }
    } else {
        driver.abort();
    }
    if let Some(connected_at) = progress_rx.borrow().connected_at {
        report.seconds = connected_at.elapsed().as_secs_f64();
    }
    tracing::info!(
        messages = report.messages,
        samples = report.samples,
        bytes = report.bytes,
        seconds = report.seconds,
        "Simulation finished."
    );
    Ok(report)
}

fn client_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("diredi-sim-{}-{nanos:08x}", std::process::id())
}

/// The host name, as the gateway reads it for its default id.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What the MQTT event loop has done so far.
#[derive(Debug, Clone, Copy, Default)]
struct LinkProgress {
    connected: bool,
    connected_at: Option<Instant>,
    /// PUBACKs received (QoS 1).
    acked: u64,
    /// The event loop has stopped.
    closed: bool,
}

/// Drives the MQTT event loop until the disconnect has been sent or the connection fails
/// (then `lost` is cancelled so the publisher stops).
async fn drive(
    mut eventloop: rumqttc::EventLoop,
    progress: watch::Sender<LinkProgress>,
    lost: CancellationToken,
) -> Result<(), ConnectionError> {
    let result = loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => progress.send_modify(|p| {
                p.connected = true;
                p.connected_at = Some(Instant::now());
            }),
            Ok(Event::Incoming(Packet::PubAck(_))) => progress.send_modify(|p| p.acked += 1),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break Ok(()),
            Ok(_) => {}
            Err(e) => {
                lost.cancel();
                break Err(e);
            }
        }
    };
    progress.send_modify(|p| p.closed = true);
    result
}

struct Publisher<'a> {
    client: &'a AsyncClient,
    qos: QoS,
    dataset: &'a Dataset,
    plan: &'a Plan,
    args: &'a SimulateArgs,
}

impl Publisher<'_> {
    async fn publish_all(
        &self,
        shutdown: &CancellationToken,
        lost: &CancellationToken,
    ) -> anyhow::Result<SimReport> {
        let plan = self.plan;
        let meta = &self.dataset.meta;
        let channel_names = meta.channel_names();
        let channels = channel_names.len();
        let rate = meta.sample_rate_hz;
        let per_message = self.args.samples_per_message as usize;
        let limit = self.args.limit_seconds;
        let mut report = SimReport {
            sensors: plan.streams.len(),
            ..SimReport::default()
        };

        let total = (!self.args.repeat).then(|| plan.total_messages());
        let progress = progress_bar(total);
        let t0_ms = unix_ms_now();
        let started = Instant::now();
        let starts: Vec<i64> = plan
            .streams
            .iter()
            .enumerate()
            .map(|(i, _)| t0_ms + (plan.phase_s(i, per_message, rate) * 1000.0).round() as i64)
            .collect();
        let shapes: Vec<StreamShape> = plan
            .streams
            .iter()
            .enumerate()
            .map(|(i, s)| StreamShape {
                chunks: Arc::clone(&s.chunks),
                rows: s.rows,
                phase_s: plan.phase_s(i, per_message, rate),
            })
            .collect();

        for due in Schedule::new(shapes, rate, self.args.repeat) {
            if shutdown.is_cancelled() {
                break;
            }
            match self.args.speed {
                Speed::Factor(f) => {
                    let wall = due.data_s / f;
                    if limit.is_some_and(|l| wall > l) {
                        break;
                    }
                    let at = started + Duration::from_secs_f64(wall);
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break,
                        _ = lost.cancelled() => bail!("the MQTT connection was lost"),
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                Speed::Max => {
                    if limit.is_some_and(|l| started.elapsed().as_secs_f64() > l) {
                        break;
                    }
                }
            }

            let stream = &plan.streams[due.stream];
            let recording = &self.dataset.recordings[due.chunk.recording];
            let rows = recording.rows_slice(due.chunk.start, due.chunk.len);
            let ts = sample_ts(starts[due.stream], due.stream_row, rate);
            let payload = match self.args.format {
                PayloadFormat::Json => encode_json(Some(ts), rows, channels),
                PayloadFormat::Binary => encode_binary(Some(ts), rows, channels),
                PayloadFormat::Senml => {
                    encode_senml(&stream.sensor, ts, rate, rows, &channel_names)
                }
            };
            let bytes = payload.len() as u64;
            if !self.send(&stream.topic, payload, shutdown, lost).await? {
                break;
            }
            report.messages += 1;
            report.samples += due.chunk.len as u64;
            report.bytes += bytes;
            progress.inc(1);

            if self.args.labels {
                let labels = &recording.labels[due.chunk.start..due.chunk.start + due.chunk.len];
                for run in label_runs(labels) {
                    let Some(class) = meta.classes.get(usize::from(run.class)) else {
                        continue;
                    };
                    let row = due.stream_row + run.start as u64;
                    let msg = LabelMsg::Range {
                        from_ts: sample_ts(starts[due.stream], row, rate),
                        to_ts: sample_ts(starts[due.stream], row + run.len as u64 - 1, rate),
                        class: class.clone(),
                    };
                    let body = serde_json::to_vec(&msg).context("cannot encode a label")?;
                    if !self.send(&stream.label_topic, body, shutdown, lost).await? {
                        break;
                    }
                    report.label_messages += 1;
                }
            }
        }
        progress.finish_and_clear();
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Queues one publish; `false` when the run was cancelled meanwhile.
    async fn send(
        &self,
        topic: &str,
        payload: Vec<u8>,
        shutdown: &CancellationToken,
        lost: &CancellationToken,
    ) -> anyhow::Result<bool> {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => Ok(false),
            _ = lost.cancelled() => bail!("the MQTT connection was lost"),
            res = self.client.publish(topic, self.qos, false, payload) => {
                res.with_context(|| format!("cannot publish to {topic}"))?;
                Ok(true)
            }
        }
    }
}

fn progress_bar(total: Option<u64>) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(n) => (
            indicatif::ProgressBar::new(n),
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} messages ({per_sec}, eta {eta})",
        ),
        None => (
            indicatif::ProgressBar::new_spinner(),
            "{spinner} [{elapsed_precise}] {pos} messages ({per_sec})",
        ),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Unix ms of sample `row` of a stream that starts at `start_ms`.
fn sample_ts(start_ms: i64, row: u64, rate: f64) -> i64 {
    start_ms + (row as f64 * 1000.0 / rate).round() as i64
}

/// A run of consecutive rows carrying the same label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LabelRun {
    start: usize,
    len: usize,
    class: u16,
}

/// Maximal runs of equal, present labels; unlabelled rows separate runs and are skipped.
fn label_runs(labels: &[Option<u16>]) -> Vec<LabelRun> {
    let mut runs: Vec<LabelRun> = Vec::new();
    for (i, label) in labels.iter().enumerate() {
        match (label, runs.last_mut()) {
            (Some(c), Some(run)) if run.class == *c && run.start + run.len == i => run.len += 1,
            (Some(c), _) => runs.push(LabelRun {
                start: i,
                len: 1,
                class: *c,
            }),
            (None, _) => {}
        }
    }
    runs
}

/// One MQTT message's worth of rows of one recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    /// Index into `Dataset::recordings`.
    recording: usize,
    /// First row within the recording.
    start: usize,
    /// Rows in this message (1 ..= samples per message).
    len: usize,
    /// Rows of the stream before this chunk (within one pass).
    offset: usize,
}

/// Cuts recordings `(index, rows)`, played one after the other, into chunks of at most
/// `per_message` rows. Chunks never span two recordings: the last chunk of each may be shorter.
fn chunk_recordings(recordings: &[(usize, usize)], per_message: usize) -> Vec<Chunk> {
    let per_message = per_message.max(1);
    let mut chunks = Vec::new();
    let mut offset = 0;
    for &(recording, rows) in recordings {
        let mut start = 0;
        while start < rows {
            let len = per_message.min(rows - start);
            chunks.push(Chunk {
                recording,
                start,
                len,
                offset,
            });
            start += len;
            offset += len;
        }
    }
    chunks
}

/// How sensor ids are given.
#[derive(Debug, Clone, PartialEq)]
enum Naming {
    /// One sensor per recording: `{prefix}{recording id}`.
    PerRecording { prefix: String },
    /// Every recording, one after the other, on one sensor.
    Single(String),
    /// The recordings, one after the other, on `n` sensors `{prefix}{i}`.
    Clones { prefix: String, n: u32 },
}

impl Naming {
    fn from_args(args: &SimulateArgs) -> Naming {
        match (&args.sensor, args.sensors) {
            (Some(id), _) => Naming::Single(id.clone()),
            (None, Some(n)) => Naming::Clones {
                prefix: args.sensor_prefix.clone(),
                n,
            },
            (None, None) => Naming::PerRecording {
                prefix: args.sensor_prefix.clone(),
            },
        }
    }

    /// Sensor ids, each checked to be a valid topic level.
    fn sensor_ids(&self, recording_ids: &[&str]) -> anyhow::Result<Vec<String>> {
        let ids: Vec<String> = match self {
            Naming::PerRecording { prefix } => recording_ids
                .iter()
                .map(|r| format!("{prefix}{r}"))
                .collect(),
            Naming::Single(id) => vec![id.clone()],
            Naming::Clones { prefix, n } => (0..*n).map(|i| format!("{prefix}{i}")).collect(),
        };
        for id in &ids {
            validate_id(id).with_context(|| {
                format!("sensor id {id:?} cannot be used as an MQTT topic level")
            })?;
        }
        Ok(ids)
    }
}

/// One simulated sensor.
#[derive(Debug, Clone)]
struct StreamPlan {
    sensor: String,
    topic: String,
    label_topic: String,
    chunks: Arc<[Chunk]>,
    rows: usize,
}

/// Which rows go to which sensor, in which messages.
#[derive(Debug)]
struct Plan {
    gateway: String,
    streams: Vec<StreamPlan>,
    /// Number of selected recordings.
    recordings: usize,
}

impl Plan {
    fn build(dataset: &Dataset, args: &SimulateArgs) -> anyhow::Result<Plan> {
        let gateway = match &args.gateway {
            Some(id) => id.clone(),
            None => host_name().context(
                "no --gateway given and the host name (the gateway's default id) cannot be read",
            )?,
        };
        let topics = Topics::new(&gateway)
            .with_context(|| format!("gateway id {gateway:?} cannot be used in topics"))?;
        let channels = dataset.meta.channels.len();
        if channels == 0 || channels > usize::from(u16::MAX) {
            bail!(
                "the dataset has {channels} channels; expected 1 to {}",
                u16::MAX
            );
        }
        let selected = select_recordings(&dataset.recordings, &args.subjects, &args.sessions)?;
        let per_message = args.samples_per_message as usize;
        let naming = Naming::from_args(args);

        let recording_ids: Vec<&str> = selected
            .iter()
            .map(|&i| dataset.recordings[i].id.as_str())
            .collect();
        let ids = naming.sensor_ids(&recording_ids)?;
        let rows_of = |i: usize| (i, dataset.recordings[i].rows());
        let stream = |id: String, chunks: Arc<[Chunk]>, rows: usize| StreamPlan {
            topic: topics.sensor(&id),
            label_topic: topics.label(&id),
            sensor: id,
            chunks,
            rows,
        };

        let streams: Vec<StreamPlan> = match naming {
            Naming::PerRecording { .. } => selected
                .iter()
                .zip(ids)
                .map(|(&i, id)| {
                    let chunks = chunk_recordings(&[rows_of(i)], per_message);
                    stream(id, chunks.into(), dataset.recordings[i].rows())
                })
                .collect(),
            // Every stream plays the same concatenation: cut it once and share it.
            Naming::Single(_) | Naming::Clones { .. } => {
                let parts: Vec<(usize, usize)> = selected.iter().map(|&i| rows_of(i)).collect();
                let rows = parts.iter().map(|p| p.1).sum();
                let chunks: Arc<[Chunk]> = chunk_recordings(&parts, per_message).into();
                ids.into_iter()
                    .map(|id| stream(id, Arc::clone(&chunks), rows))
                    .collect()
            }
        };
        Ok(Plan {
            gateway,
            streams,
            recordings: selected.len(),
        })
    }

    /// Rows of the longest stream.
    fn rows_per_stream(&self) -> usize {
        self.streams.iter().map(|s| s.rows).max().unwrap_or(0)
    }

    fn total_messages(&self) -> u64 {
        self.streams.iter().map(|s| s.chunks.len() as u64).sum()
    }

    /// Start offset of stream `i`: streams are spread evenly over one message period.
    fn phase_s(&self, i: usize, per_message: usize, rate: f64) -> f64 {
        let n = self.streams.len().max(1) as f64;
        i as f64 / n * per_message as f64 / rate
    }
}

/// Indices of the recordings that match the subject and session filters (empty filter = all),
/// in dataset order, skipping empty recordings. Unknown subjects or sessions are errors.
fn select_recordings(
    recordings: &[Recording],
    subjects: &[String],
    sessions: &[String],
) -> anyhow::Result<Vec<usize>> {
    let known_subjects: BTreeSet<&str> = recordings.iter().map(|r| r.subject.as_str()).collect();
    let known_sessions: BTreeSet<&str> = recordings.iter().map(|r| r.session.as_str()).collect();
    for (wanted, known, what) in [
        (subjects, &known_subjects, "subject"),
        (sessions, &known_sessions, "session"),
    ] {
        let unknown: Vec<&str> = wanted
            .iter()
            .map(|s| s.trim())
            .filter(|s| !known.contains(s))
            .collect();
        if !unknown.is_empty() {
            bail!(
                "unknown {what} {unknown:?}; the dataset has {}",
                known.iter().copied().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let matches = |filter: &[String], value: &str| {
        filter.is_empty() || filter.iter().any(|f| f.trim() == value)
    };
    let selected: Vec<usize> = recordings
        .iter()
        .enumerate()
        .filter(|(_, r)| matches(subjects, &r.subject) && matches(sessions, &r.session))
        .filter(|(_, r)| r.rows() > 0)
        .map(|(i, _)| i)
        .collect();
    if selected.is_empty() {
        bail!("no recording with samples matches subjects {subjects:?} and sessions {sessions:?}");
    }
    Ok(selected)
}

/// The pacing-relevant shape of a stream.
#[derive(Debug, Clone)]
struct StreamShape {
    chunks: Arc<[Chunk]>,
    /// Rows in one pass over the stream.
    rows: usize,
    /// Start offset in seconds of data time.
    phase_s: f64,
}

/// One message to publish.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Due {
    stream: usize,
    chunk: Chunk,
    /// Rows of the stream before this chunk, counting earlier passes with `--loop`.
    stream_row: u64,
    /// Data time, in seconds from the start, at which the chunk's last sample is measured.
    data_s: f64,
}

/// Every stream's messages, merged in the order of [`Due::data_s`] (ties: lower stream first).
struct Schedule {
    shapes: Vec<StreamShape>,
    rate: f64,
    repeat: bool,
    /// Next chunk of each stream and its pass.
    cursors: Vec<(usize, u64)>,
    heap: BinaryHeap<Reverse<(u64, usize)>>,
}

impl Schedule {
    fn new(shapes: Vec<StreamShape>, rate: f64, repeat: bool) -> Schedule {
        let mut s = Schedule {
            cursors: vec![(0, 0); shapes.len()],
            heap: BinaryHeap::with_capacity(shapes.len()),
            shapes,
            rate,
            repeat,
        };
        for i in 0..s.shapes.len() {
            s.push(i);
        }
        s
    }

    fn due_of(&self, stream: usize) -> Option<Due> {
        let shape = &self.shapes[stream];
        let (next, pass) = self.cursors[stream];
        let chunk = *shape.chunks.get(next)?;
        let stream_row = pass * shape.rows as u64 + chunk.offset as u64;
        let data_s = (stream_row + chunk.len as u64) as f64 / self.rate + shape.phase_s;
        Some(Due {
            stream,
            chunk,
            stream_row,
            data_s,
        })
    }

    fn push(&mut self, stream: usize) {
        if let Some(due) = self.due_of(stream) {
            // Nanoseconds as the key: f64 is not Ord, and 2^64 ns is 584 years.
            let key = (due.data_s * 1e9).round() as u64;
            self.heap.push(Reverse((key, stream)));
        }
    }
}

impl Iterator for Schedule {
    type Item = Due;

    fn next(&mut self) -> Option<Due> {
        let Reverse((_, stream)) = self.heap.pop()?;
        let due = self.due_of(stream)?;
        let shape = &self.shapes[stream];
        let cursor = &mut self.cursors[stream];
        cursor.0 += 1;
        if cursor.0 == shape.chunks.len() && self.repeat && shape.rows > 0 {
            *cursor = (0, cursor.1 + 1);
        }
        self.push(stream);
        Some(due)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;
    use diredi_protocol::sensor::{decode_sensor, DecodeLimits, SensorBatch};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn parse(extra: &[&str]) -> Result<SimulateArgs, clap::Error> {
        let mut argv = vec!["sim", "--dataset", "d"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn speed_accepts_keywords_and_positive_factors_only() {
        assert_eq!(parse_speed("realtime"), Ok(Speed::Factor(1.0)));
        assert_eq!(parse_speed("max"), Ok(Speed::Max));
        assert_eq!(parse_speed("2.5"), Ok(Speed::Factor(2.5)));
        assert_eq!(parse_speed("10x"), Ok(Speed::Factor(10.0)));
        for bad in ["0", "-1", "fast", "inf", "NaN", ""] {
            assert!(parse_speed(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn options_parse_lists_and_reject_conflicts() {
        let a = parse(&["--subject", "1,2", "--subject", "3", "--session", "0"]).unwrap();
        assert_eq!(a.subjects, ["1", "2", "3"]);
        assert_eq!(a.sessions, ["0"]);
        assert_eq!(a.samples_per_message, 32);
        assert_eq!(a.speed, Speed::Factor(1.0));
        assert!(!a.labels);
        assert!(parse(&["--sensor", "x", "--sensors", "3"]).is_err());
        assert!(parse(&["--qos", "2"]).is_err());
        assert!(parse(&["--samples-per-message", "0"]).is_err());
        assert!(parse(&["--sensors", "0"]).is_err());
        assert!(parse(&["--limit-seconds", "-3"]).is_err());
        let b = parse(&["--format", "binary", "--speed", "max", "--qos", "1"]).unwrap();
        assert_eq!(b.format, PayloadFormat::Binary);
        assert_eq!(b.speed, Speed::Max);
    }

    #[test]
    fn chunks_cover_every_row_once_and_never_span_recordings() {
        let recs = [(4, 70), (1, 0), (7, 64), (2, 5)];
        let chunks = chunk_recordings(&recs, 32);
        let lens: Vec<(usize, usize, usize)> = chunks
            .iter()
            .map(|c| (c.recording, c.start, c.len))
            .collect();
        assert_eq!(
            lens,
            [
                (4, 0, 32),
                (4, 32, 32),
                (4, 64, 6),
                (7, 0, 32),
                (7, 32, 32),
                (2, 0, 5)
            ]
        );
        // Offsets run continuously over the concatenation.
        let mut expected = 0;
        for c in &chunks {
            assert_eq!(c.offset, expected);
            expected += c.len;
        }
        assert_eq!(expected, 70 + 64 + 5);
        assert_eq!(chunk_recordings(&[(0, 3)], 1).len(), 3);
    }

    fn shape(rows_per_rec: &[usize], per_message: usize, phase_s: f64) -> StreamShape {
        let parts: Vec<(usize, usize)> = rows_per_rec.iter().copied().enumerate().collect();
        StreamShape {
            chunks: chunk_recordings(&parts, per_message).into(),
            rows: rows_per_rec.iter().sum(),
            phase_s,
        }
    }

    #[test]
    fn schedule_paces_each_message_at_the_time_of_its_last_sample() {
        // 50 Hz, 10 rows per message: a message every 0.2 s, due when complete.
        let sched = Schedule::new(vec![shape(&[25], 10, 0.0)], 50.0, false);
        let got: Vec<(u64, usize, f64)> = sched
            .map(|d| (d.stream_row, d.chunk.len, d.data_s))
            .collect();
        assert_eq!(got.len(), 3);
        assert_eq!((got[0].0, got[0].1), (0, 10));
        assert!((got[0].2 - 0.2).abs() < 1e-9);
        assert!((got[1].2 - 0.4).abs() < 1e-9);
        assert_eq!((got[2].0, got[2].1), (20, 5));
        assert!((got[2].2 - 0.5).abs() < 1e-9);
    }

    #[test]
    fn schedule_interleaves_streams_in_time_order() {
        // Stream 1 is offset by half a message period.
        let shapes = vec![shape(&[30], 10, 0.0), shape(&[30], 10, 0.1)];
        let order: Vec<usize> = Schedule::new(shapes, 50.0, false)
            .map(|d| d.stream)
            .collect();
        assert_eq!(order, [0, 1, 0, 1, 0, 1]);

        let shapes = vec![shape(&[10], 10, 0.0), shape(&[40], 10, 0.0)];
        let dues: Vec<Due> = Schedule::new(shapes, 10.0, false).collect();
        assert_eq!(dues.len(), 5);
        for pair in dues.windows(2) {
            assert!(pair[0].data_s <= pair[1].data_s);
        }
        // Equal times: the lower stream goes first.
        assert_eq!((dues[0].stream, dues[1].stream), (0, 1));
    }

    #[test]
    fn looping_continues_rows_and_time_across_passes() {
        let mut sched = Schedule::new(vec![shape(&[15], 10, 0.0)], 10.0, true);
        let got: Vec<Due> = (&mut sched).take(5).collect();
        let rows: Vec<u64> = got.iter().map(|d| d.stream_row).collect();
        assert_eq!(rows, [0, 10, 15, 25, 30]);
        assert_eq!(got[2].chunk.start, 0);
        assert!((got[2].data_s - 2.5).abs() < 1e-9);
        assert!(sched.next().is_some());
    }

    #[test]
    fn sensor_naming_follows_the_mode_and_rejects_bad_ids() {
        let recs = ["s1-r0", "s1-r1"];
        let per = Naming::PerRecording {
            prefix: "sim-".into(),
        };
        assert_eq!(per.sensor_ids(&recs).unwrap(), ["sim-s1-r0", "sim-s1-r1"]);
        let one = Naming::Single("wrist".into());
        assert_eq!(one.sensor_ids(&recs).unwrap(), ["wrist"]);
        let clones = Naming::Clones {
            prefix: "load-".into(),
            n: 3,
        };
        assert_eq!(
            clones.sensor_ids(&recs).unwrap(),
            ["load-0", "load-1", "load-2"]
        );
        let bad = Naming::PerRecording {
            prefix: "a/".into(),
        };
        let err = bad.sensor_ids(&recs).unwrap_err().to_string();
        assert!(err.contains("a/s1-r0"), "{err}");
        assert!(Naming::Single("#".into()).sensor_ids(&recs).is_err());
    }

    #[test]
    fn label_runs_split_on_changes_and_gaps() {
        let labels = [Some(1), Some(1), None, Some(1), Some(2), Some(2), None];
        let runs = label_runs(&labels);
        assert_eq!(
            runs,
            [
                LabelRun {
                    start: 0,
                    len: 2,
                    class: 1
                },
                LabelRun {
                    start: 3,
                    len: 1,
                    class: 1
                },
                LabelRun {
                    start: 4,
                    len: 2,
                    class: 2
                },
            ]
        );
        assert!(label_runs(&[None, None]).is_empty());
    }

    #[test]
    fn sample_times_advance_by_the_sample_period() {
        assert_eq!(sample_ts(1_000, 0, 50.0), 1_000);
        assert_eq!(sample_ts(1_000, 1, 50.0), 1_020);
        assert_eq!(sample_ts(1_000, 3, 30.0), 1_100);
        assert_eq!(sample_ts(0, 1, 3.0), 333);
        assert_eq!(sample_ts(0, 2, 3.0), 667);
    }

    // --- end to end against a minimal MQTT 3.1.1 broker ------------------------------------

    /// Writes a dataset with 2 channels at 10 Hz: subject "a" has recordings of 25 and 7
    /// rows, subject "b" one of 12 rows. Value of row i, channel c of recording r: r*1000 + i*10 + c.
    fn write_dataset(dir: &std::path::Path) {
        std::fs::write(
            dir.join("dataset.json"),
            r#"{"name":"tiny","sample_rate_hz":10,"channels":[{"name":"x","unit":""},{"name":"y","unit":""}],"classes":["rest","move"]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("recordings.csv"),
            "recording,subject,session,file\nr0,a,0,r0.csv\nr1,a,1,r1.csv\nr2,b,0,r2.csv\n",
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("recordings")).unwrap();
        for (r, rows) in [(0usize, 25usize), (1, 7), (2, 12)] {
            let mut s = String::from("x,y,label\n");
            for i in 0..rows {
                let label = match i {
                    0..=9 => "rest",
                    10..=11 => "",
                    _ => "move",
                };
                let base = r * 1000 + i * 10;
                s.push_str(&format!("{},{},{label}\n", base, base + 1));
            }
            std::fs::write(dir.join("recordings").join(format!("r{r}.csv")), s).unwrap();
        }
    }

    /// A received PUBLISH.
    #[derive(Debug, Clone)]
    struct Received {
        topic: String,
        payload: Vec<u8>,
    }

    async fn read_remaining_len(s: &mut tokio::net::TcpStream) -> std::io::Result<usize> {
        let mut len = 0usize;
        for shift in (0..28).step_by(7) {
            let b = s.read_u8().await?;
            len |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
        }
        Ok(len)
    }

    /// Accepts one client, acknowledges CONNECT, PUBLISH (QoS 1) and PINGREQ, records every
    /// PUBLISH and returns them once the client disconnects.
    async fn fake_broker() -> (u16, tokio::task::JoinHandle<Vec<Received>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            while let Ok(header) = s.read_u8().await {
                let len = read_remaining_len(&mut s).await.unwrap();
                let mut body = vec![0u8; len];
                s.read_exact(&mut body).await.unwrap();
                match header >> 4 {
                    1 => s.write_all(&[0x20, 2, 0, 0]).await.unwrap(),
                    3 => {
                        let qos = (header >> 1) & 3;
                        let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
                        let topic = String::from_utf8(body[2..2 + tlen].to_vec()).unwrap();
                        let mut at = 2 + tlen;
                        if qos > 0 {
                            s.write_all(&[0x40, 2, body[at], body[at + 1]])
                                .await
                                .unwrap();
                            at += 2;
                        }
                        got.push(Received {
                            topic,
                            payload: body[at..].to_vec(),
                        });
                    }
                    12 => s.write_all(&[0xd0, 0]).await.unwrap(),
                    14 => break,
                    _ => {}
                }
            }
            got
        });
        (port, task)
    }

    fn sim_args(dir: &std::path::Path, port: u16, extra: &[&str]) -> SimulateArgs {
        let port = port.to_string();
        let mut argv = vec![
            "sim",
            "--dataset",
            dir.to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--gateway",
            "gw-t",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args
    }

    fn channels() -> Vec<String> {
        vec!["x".into(), "y".into()]
    }

    #[tokio::test]
    async fn replays_every_row_of_the_selection_in_order_with_advancing_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path());
        let (port, broker) = fake_broker().await;
        let args = sim_args(
            dir.path(),
            port,
            &[
                "--subject",
                "a",
                "--sensor",
                "wrist",
                "--samples-per-message",
                "10",
                "--speed",
                "max",
                "--format",
                "binary",
                "--qos",
                "1",
            ],
        );
        let report = run(args, CancellationToken::new()).await.unwrap();
        let got = broker.await.unwrap();

        // r0 (25 rows) then r1 (7 rows): 10 + 10 + 5 + 7.
        assert_eq!(report.messages, 4);
        assert_eq!(report.samples, 32);
        assert_eq!(report.sensors, 1);
        assert_eq!(report.label_messages, 0);
        assert_eq!(got.len(), 4);
        assert_eq!(
            report.bytes,
            got.iter().map(|r| r.payload.len() as u64).sum::<u64>()
        );

        let mut batch = SensorBatch::new();
        let mut values = Vec::new();
        let mut stamps = Vec::new();
        for r in &got {
            assert_eq!(r.topic, "diredi/v1/gw-t/sensor/wrist");
            decode_sensor(
                &r.payload,
                &channels(),
                &DecodeLimits::default(),
                &mut batch,
            )
            .unwrap();
            stamps.push((batch.ts_ms.unwrap(), batch.samples()));
            values.extend_from_slice(&batch.values);
        }
        let expected: Vec<f32> = (0..25)
            .map(|i| i * 10)
            .chain((0..7).map(|i| 1000 + i * 10))
            .flat_map(|b| [b as f32, b as f32 + 1.0])
            .collect();
        assert_eq!(values, expected);
        // 10 Hz: the first sample of each message is 100 ms per preceding row later.
        let t0 = stamps[0].0;
        let offsets: Vec<i64> = stamps.iter().map(|(t, _)| t - t0).collect();
        assert_eq!(offsets, [0, 1000, 2000, 2500]);
        assert!((t0 - unix_ms_now()).abs() < 60_000);
    }

    #[tokio::test]
    async fn clones_and_labels_go_to_their_own_topics() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path());
        let (port, broker) = fake_broker().await;
        let args = sim_args(
            dir.path(),
            port,
            &[
                "--subject",
                "b",
                "--sensors",
                "3",
                "--sensor-prefix",
                "load-",
                "--samples-per-message",
                "12",
                "--speed",
                "max",
                "--format",
                "senml",
                "--labels",
            ],
        );
        let report = run(args, CancellationToken::new()).await.unwrap();
        let got = broker.await.unwrap();

        assert_eq!(report.messages, 3);
        assert_eq!(report.samples, 36);
        // Rows 0-9 "rest", 10-11 unlabelled, nothing after: one range per sensor.
        assert_eq!(report.label_messages, 3);
        let mut batch = SensorBatch::new();
        for i in 0..3 {
            let sensor: Vec<&Received> = got
                .iter()
                .filter(|r| r.topic == format!("diredi/v1/gw-t/sensor/load-{i}"))
                .collect();
            assert_eq!(sensor.len(), 1);
            decode_sensor(
                &sensor[0].payload,
                &channels(),
                &DecodeLimits::default(),
                &mut batch,
            )
            .unwrap();
            assert_eq!(batch.samples(), 12);
            let ts = batch.ts_ms.unwrap();

            let labels: Vec<&Received> = got
                .iter()
                .filter(|r| r.topic == format!("diredi/v1/gw-t/label/load-{i}"))
                .collect();
            assert_eq!(labels.len(), 1);
            let msg: LabelMsg = serde_json::from_slice(&labels[0].payload).unwrap();
            assert_eq!(
                msg,
                LabelMsg::Range {
                    from_ts: ts,
                    to_ts: ts + 900,
                    class: "rest".into()
                }
            );
        }
    }

    #[tokio::test]
    async fn realtime_pacing_and_the_limit_stop_the_run_early() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path());
        let (port, broker) = fake_broker().await;
        // 10 Hz, 1 row per message at 10x: a message every 10 ms; stop after 0.15 s.
        let args = sim_args(
            dir.path(),
            port,
            &[
                "--subject",
                "a",
                "--session",
                "0",
                "--samples-per-message",
                "1",
                "--speed",
                "10",
                "--limit-seconds",
                "0.15",
            ],
        );
        let started = Instant::now();
        let report = run(args, CancellationToken::new()).await.unwrap();
        let took = started.elapsed();
        let got = broker.await.unwrap();
        assert_eq!(got.len() as u64, report.messages);
        assert!((13..=15).contains(&report.messages), "{report:?}");
        assert!(took >= Duration::from_millis(140), "{took:?}");
        assert!(got
            .iter()
            .all(|r| r.topic == "diredi/v1/gw-t/sensor/sim-r0"));
    }

    #[tokio::test]
    async fn cancellation_ends_the_run_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path());
        let (port, broker) = fake_broker().await;
        let args = sim_args(dir.path(), port, &["--samples-per-message", "1", "--loop"]);
        let token = CancellationToken::new();
        let cancel = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            cancel.cancel();
        });
        let report = tokio::time::timeout(Duration::from_secs(5), run(args, token))
            .await
            .unwrap()
            .unwrap();
        let got = broker.await.unwrap();
        assert_eq!(report.sensors, 3);
        assert_eq!(got.len() as u64, report.messages);
        assert!(report.messages >= 3, "{report:?}");
    }

    #[tokio::test]
    async fn unreachable_broker_and_bad_selection_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path());
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = run(sim_args(dir.path(), port, &[]), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cannot connect"), "{err:#}");

        let err = run(
            sim_args(dir.path(), port, &["--subject", "zz"]),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("unknown subject") && msg.contains("a, b"),
            "{msg}"
        );
    }
}
