//! `diredi-cloud-worker bench-gateway`: end-to-end throughput of a gateway process.
//!
//! It starts the `diredi-gateway` binary on its embedded broker (a free port, the given
//! model), times how long the process takes to announce itself online (the gateway sends
//! systemd READY at the same point), replays real recordings at full speed from N simulated
//! sensors through [`crate::simulate`], and reads the gateway's own `metrics` messages:
//! windows inferred per second over the steady part of the run, latency p50/p99, windows
//! dropped, and the process's resident memory (from `/proc`, idle with the model loaded and
//! the peak under load).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use diredi_protocol::messages::{GatewayState, MetricsMsg, StatusMsg};
use diredi_protocol::Topics;
use rumqttc::{Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::simulate::{self, PayloadFormat, SimulateArgs, Speed};

const GATEWAY_ID: &str = "bench";

/// Arguments of `diredi-cloud-worker bench-gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchGatewayArgs {
    /// The gateway binary. Default: `diredi-gateway` beside this executable.
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// Model manifest the gateway serves.
    #[arg(long, default_value = "onnx-models/hapt-student-v1.json")]
    pub model: PathBuf,
    /// Base64 public key the model is signed with.
    #[arg(long, default_value = "onnx-models/publisher.pub")]
    pub trusted_key: PathBuf,
    /// Dataset whose recordings are replayed.
    #[arg(long, default_value = "data/hapt")]
    pub dataset: PathBuf,
    /// Simulated sensors publishing at once.
    #[arg(long, default_value_t = 8)]
    pub sensors: u32,
    /// Samples per MQTT message.
    #[arg(long, default_value_t = 256)]
    pub samples_per_message: u32,
    /// Payload format.
    #[arg(long, value_enum, default_value_t = PayloadFormat::Binary)]
    pub format: PayloadFormat,
    /// Offered load: `max` (as fast as the connection takes it, which on a small machine
    /// starves the gateway of CPU) or a factor of realtime per sensor. Offered windows/s =
    /// sensors x rate x factor / stride.
    #[arg(long, default_value = "max", value_parser = simulate::parse_speed)]
    pub speed: Speed,
    /// Seconds of load; the first `--warmup` seconds are not counted.
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 4.0)]
    pub warmup: f64,
    /// Inference workers of the gateway (each with its own ONNX Runtime session).
    #[arg(long, default_value_t = 1)]
    pub inference_threads: u32,
    /// Write the results here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayBench {
    /// Process start to the retained online status, in ms.
    pub ready_ms: f64,
    /// Windows inferred per second over the measured part.
    pub windows_per_second: f64,
    /// Sensor samples accepted per second over the measured part.
    pub samples_per_second: f64,
    /// Seconds measured (between two metrics messages).
    pub measured_seconds: f64,
    /// Windows inferred in the measured part.
    pub windows: u64,
    /// Windows dropped by the full inference queue during the whole run.
    pub windows_dropped: u64,
    /// Inputs rejected during the whole run (should be 0).
    pub inputs_rejected: u64,
    /// Latency p50/p99 from the last metrics message, in ms.
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    /// Resident memory with the model loaded, before any load, in MiB.
    pub rss_idle_mib: f64,
    /// Highest resident memory seen under load, in MiB.
    pub rss_peak_mib: f64,
    /// Run parameters.
    pub sensors: u32,
    pub samples_per_message: u32,
    pub format: PayloadFormat,
    pub inference_threads: u32,
    /// Offered load (`max` or a factor of realtime per sensor).
    pub speed: String,
}

/// Kills the gateway when dropped (SIGTERM first, so it shuts down the way systemd stops it).
struct GatewayProcess(Child);

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..50 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn default_gateway_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    Ok(dir.join("diredi-gateway"))
}

/// Runs the benchmark once.
pub async fn run(args: &BenchGatewayArgs, shutdown: CancellationToken) -> Result<GatewayBench> {
    let bin = match &args.gateway_bin {
        Some(b) => b.clone(),
        None => default_gateway_bin()?,
    };
    if !bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --workspace` or pass --gateway-bin",
            bin.display()
        );
    }
    let key = std::fs::read_to_string(&args.trusted_key)
        .with_context(|| format!("reading {}", args.trusted_key.display()))?;
    let model = std::fs::canonicalize(&args.model)
        .with_context(|| format!("model {}", args.model.display()))?;
    let port = free_port()?;

    let started = Instant::now();
    let child = Command::new(&bin)
        .arg("run")
        .env("DIREDI_GATEWAY__ID", GATEWAY_ID)
        .env("DIREDI_GATEWAY__LOG_LEVEL", "warn")
        .env("DIREDI_GATEWAY__LOG_FORMAT", "terminal")
        .env("DIREDI_MQTT__PORT", port.to_string())
        .env("DIREDI_MODEL__PATH", &model)
        .env("DIREDI_MODEL__TRUSTED_KEYS", key.trim())
        .env("DIREDI_METRICS__INTERVAL_S", "1")
        .env(
            "DIREDI_RUNTIME__WORKERS",
            args.inference_threads.to_string(),
        )
        .env(
            "DIREDI_PIPELINE__MAX_SENSORS",
            (args.sensors + 8).to_string(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let gateway = GatewayProcess(child);
    let pid = gateway.0.id();

    let topics = Topics::new(GATEWAY_ID)?;
    let mut options = MqttOptions::new("diredi-bench-monitor", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = diredi_mqtt::client(options, 64);
    client.subscribe(topics.status(), QoS::AtLeastOnce).await?;
    client.subscribe(topics.metrics(), QoS::AtMostOnce).await?;

    // READY: the first online status (the broker itself starts inside the gateway, so the
    // monitor retries its connection until then).
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready_ms = loop {
        if Instant::now() > deadline {
            bail!("the gateway did not come online within 30 s");
        }
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topics.status() => {
                if serde_json::from_slice::<StatusMsg>(&p.payload)
                    .is_ok_and(|s| s.state == GatewayState::Online)
                {
                    break started.elapsed().as_secs_f64() * 1e3;
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle_mib = rss_mib(pid).unwrap_or(f64::NAN);

    let sim = SimulateArgs {
        dataset: args.dataset.clone(),
        subjects: Vec::new(),
        sessions: Vec::new(),
        gateway: Some(GATEWAY_ID.to_owned()),
        sensor_prefix: "bench-".to_owned(),
        sensor: None,
        sensors: Some(args.sensors),
        format: args.format,
        speed: args.speed,
        samples_per_message: args.samples_per_message,
        host: "127.0.0.1".to_owned(),
        port,
        qos: 0,
        limit_seconds: Some(args.seconds),
        repeat: true,
        labels: false,
    };
    let sim_stop = shutdown.child_token();
    let mut replay = tokio::spawn(simulate::run(sim, sim_stop.clone()));
    let load_start = Instant::now();
    let mut first: Option<MetricsMsg> = None;
    let mut last: Option<MetricsMsg> = None;
    let mut rss_peak_mib = rss_idle_mib;
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = &mut replay => {
                r.context("replay task")??;
                break;
            }
            ev = events.poll() => ev,
        };
        if let Some(r) = rss_mib(pid) {
            rss_peak_mib = rss_peak_mib.max(r);
        }
        let Ok(Event::Incoming(Packet::Publish(p))) = ev else {
            continue;
        };
        if p.topic != topics.metrics() {
            continue;
        }
        let Ok(m) = serde_json::from_slice::<MetricsMsg>(&p.payload) else {
            continue;
        };
        if load_start.elapsed().as_secs_f64() < args.warmup {
            continue;
        }
        if first.is_none() {
            first = Some(m);
        } else {
            last = Some(m);
        }
    }
    sim_stop.cancel();
    let _ = client.disconnect().await;
    drop(gateway);

    let (Some(a), Some(b)) = (first, last) else {
        bail!("too few metrics messages: make --seconds longer than --warmup + 2");
    };
    let dt = (b.ts - a.ts) as f64 / 1e3;
    if dt <= 0.0 {
        bail!("metrics timestamps did not advance");
    }
    let windows = b.windows_inferred.saturating_sub(a.windows_inferred);
    Ok(GatewayBench {
        ready_ms,
        windows_per_second: windows as f64 / dt,
        samples_per_second: b.samples_in.saturating_sub(a.samples_in) as f64 / dt,
        measured_seconds: dt,
        windows,
        windows_dropped: b.windows_dropped,
        inputs_rejected: b.inputs_rejected,
        latency_ms_p50: b.latency_ms_p50,
        latency_ms_p99: b.latency_ms_p99,
        rss_idle_mib,
        rss_peak_mib,
        sensors: args.sensors,
        samples_per_message: args.samples_per_message,
        format: args.format,
        inference_threads: args.inference_threads,
        speed: match args.speed {
            Speed::Max => "max".to_owned(),
            Speed::Factor(f) => format!("{f}x"),
        },
    })
}
