//! `diredi-cloud-worker perf`: the gateway's performance, side by side with what a user would
//! pick instead and with the limits it cannot beat, in one run on one machine.
//!
//! `perf run` measures, in this order:
//!
//! 1. **inference limit**: ONNX Runtime batch throughput of the same model in this process,
//!    no MQTT ([`crate::bench::model_speed`], one thread as the gateway's worker uses); and
//!    the same with one session per CPU at once ([`crate::bench::parallel_model_speed`]),
//!    the most inference the machine can do;
//! 2. **broker limit**: Mosquitto publish → subscribe loopback throughput with the same
//!    payloads, flat out (the load generator publishes, the harness subscribes);
//! 3. every **target**: the Rust gateway on its embedded rumqttd, the Rust gateway on
//!    Mosquitto, the Python gateway (`bench/python_gateway.py`) on Mosquitto. Each target gets
//!    a fresh broker and gateway, READY time and idle memory, then a **flat-out** phase (its
//!    maximum throughput) and a **load** phase at a fixed offered rate (by default half of
//!    that maximum), where latency and in == out are what count.
//!
//! The load comes from `perf load` ([`load`]), a separate process; the harness subscribes to the
//! inference topic and joins every result with the publish time of the sensor message that
//! completed its window (the window's `ts` gives the sample, hence the message, see
//! [`sensor_message`]). CPU time is read from `/proc/<pid>/stat` and peak memory from
//! `VmHWM` ([`procstat`]). [`report`] writes the Markdown table and the latency CDF plot.

pub mod load;
mod procs;
pub mod procstat;
pub mod report;
pub mod steady;
pub mod sweep;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use diredi_protocol::messages::{GatewayState, InferenceMsg, StatusMsg};
use diredi_protocol::Topics;
use rumqttc::{Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::onnx_eval::PackagedModel;
use crate::simulate::PayloadFormat;
use load::{LoadReport, Shape};
use procs::{Guard, TempDir};

const GATEWAY_ID: &str = "perf";
/// A phase's results are complete when this long passes without a new one.
const DRAIN_IDLE: Duration = Duration::from_millis(1500);
/// Longest wait for results after the load has ended.
const DRAIN_MAX: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `diredi-cloud-worker perf ...`.
#[derive(clap::Subcommand, Debug)]
pub enum PerfCmd {
    /// Inference limit, broker limit, and the Rust and Python gateways under the same load,
    /// in one run: JSON, a Markdown table and a latency CDF plot.
    Run(PerfArgs),
    /// Scaling curves of the Rust gateway: sensors, ONNX Runtime threads, workers,
    /// micro-batch size and payload format, one knob at a time.
    Sweep(Box<sweep::SweepArgs>),
    /// The load generator that `perf run` starts as its own process.
    Load(load::LoadArgs),
    /// How steady the machine's own compute speed is: the shipped model in-process, one
    /// thread, timed per 100 ms, with no gateway or broker. Run it on an idle machine.
    Steady(steady::SteadyArgs),
}

/// A gateway and the broker it runs on.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// `diredi-gateway` on its embedded rumqttd.
    RustEmbedded,
    /// `diredi-gateway` on Mosquitto (`[broker] enabled = false`).
    RustMosquitto,
    /// `bench/python_gateway.py` on Mosquitto.
    PythonMosquitto,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::RustEmbedded => "rust-embedded",
            Target::RustMosquitto => "rust-mosquitto",
            Target::PythonMosquitto => "python-mosquitto",
        }
    }

    fn broker(self) -> &'static str {
        match self {
            Target::RustEmbedded => "rumqttd (embedded)",
            Target::RustMosquitto | Target::PythonMosquitto => "mosquitto",
        }
    }
}

/// Arguments of `diredi-cloud-worker perf run`.
#[derive(clap::Args, Debug, Clone)]
pub struct PerfArgs {
    /// Model manifest every gateway serves.
    #[arg(long, default_value = "onnx-models/hapt-student-v1.json")]
    pub model: PathBuf,
    /// Base64 public key the model is signed with (for the Rust gateway).
    #[arg(long, default_value = "onnx-models/publisher.pub")]
    pub trusted_key: PathBuf,
    /// Dataset whose first recording the sensors replay.
    #[arg(long, default_value = "data/hapt")]
    pub dataset: PathBuf,
    /// The Rust gateway binary. Default: `diredi-gateway` beside this executable.
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// Python interpreter with bench/requirements.txt installed (scripts/bench-gateway.sh
    /// makes one). When it is missing the Python target is skipped, and the output says so.
    #[arg(long, default_value = "third_party/pyenv/bin/python")]
    pub python: PathBuf,
    /// The Python gateway script.
    #[arg(long, default_value = "bench/python_gateway.py")]
    pub python_gateway: PathBuf,
    /// Mosquitto binary. Default: `mosquitto` on PATH, else /usr/sbin/mosquitto.
    #[arg(long)]
    pub mosquitto: Option<PathBuf>,
    /// Targets to measure (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rust-embedded,rust-mosquitto,python-mosquitto"
    )]
    pub targets: Vec<Target>,
    /// Simulated sensors.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub sensors: u32,
    /// Payload format.
    #[arg(long, value_enum, default_value_t = PayloadFormat::Binary)]
    pub format: PayloadFormat,
    /// Samples per sensor message (64, the model's stride, completes one window per message).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub samples_per_message: u32,
    /// Seconds of the flat-out phase of each target and of the broker limit; 0 skips them
    /// (then `--rate` is needed).
    #[arg(long, default_value_t = 10.0)]
    pub max_seconds: f64,
    /// Seconds of each step of the sustained-rate search, which looks for the highest fixed
    /// offered rate a target serves with no lost window and keeps up with (see
    /// [`Sustained`]); 0 skips it. It starts from the flat-out phase's rate.
    #[arg(long, default_value_t = 0.0)]
    pub sustain_seconds: f64,
    /// Seconds of the fixed-rate load phase of each target.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Offered windows/s of the load phase, the same for every target. Default: `--load-fraction`
    /// of each target's own flat-out throughput.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Fraction of a target's maximum throughput offered in its load phase: of the sustained
    /// rate when the search ran, else of the flat-out rate.
    #[arg(long, default_value_t = 0.5)]
    pub load_fraction: f64,
    /// Seconds per batch size of the inference limit.
    #[arg(long, default_value_t = 3.0)]
    pub limit_seconds: f64,
    /// Write the results here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the Markdown table here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write the latency CDF plot (SVG) here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write the per-window times of each target's load phase here, as
    /// `{dir}/{target}-load.tsv` (message index, publish time in Unix µs, publish → result ms,
    /// the gateway's own ms), to see when slow windows happened.
    #[arg(long, value_name = "DIR")]
    pub trace: Option<PathBuf>,
    /// `KEY=VALUE` set in the Rust gateway's environment (repeatable), for example
    /// `DIREDI_RUNTIME__MAX_BATCH=8`.
    #[arg(long = "gateway-env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub gateway_env: Vec<(String, String)>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Latency percentiles, ms.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    fn of(sorted: &[f64]) -> Option<Latency> {
        if sorted.is_empty() {
            return None;
        }
        let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
        Some(Latency {
            n: sorted.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: q(1.0),
        })
    }
}

/// One phase of load against one target.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// Offered windows/s; `None` flat out.
    pub offered_windows_per_second: Option<f64>,
    /// Seconds of load (first to last publish).
    pub seconds: f64,
    /// Sensor messages published.
    pub messages: u64,
    /// Windows the published samples make (what the gateway should infer).
    pub windows_in: u64,
    /// Inference results received.
    pub windows_out: u64,
    /// `windows_in - windows_out` (dropped by a full queue, by the broker, or never sent).
    pub windows_lost: i64,
    /// Results received per second while the load ran, after the first fifth of it.
    pub windows_per_second: f64,
    /// Publish of the message that completed a window → its result received.
    pub latency_ms: Option<Latency>,
    /// The gateway's own part of it, as it reports in `latency_ms` (window complete → result
    /// ready).
    pub gateway_latency_ms: Option<Latency>,
    /// CPU seconds of the gateway process (the embedded broker included) during the phase and
    /// its drain.
    pub gateway_cpu_s: f64,
    /// CPU seconds of the external broker (Mosquitto), if any.
    pub broker_cpu_s: Option<f64>,
    /// Gateway (+ external broker) CPU µs per result.
    pub cpu_us_per_window: f64,
    /// CPU seconds of the harness (parsing every result) over the phase.
    pub harness_cpu_s: f64,
    /// The load generator's own figures.
    pub load: LoadReport,
    /// Every received result parsed as the contract's `InferenceMsg`.
    pub results_well_formed: bool,
}

/// One target's run.
#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    pub target: Target,
    pub gateway: &'static str,
    pub broker: &'static str,
    /// Process start → retained online status, ms.
    pub ready_ms: f64,
    /// Execution provider the gateway reported.
    pub execution_provider: Option<String>,
    /// Resident memory with the model loaded, before load, MiB.
    pub rss_idle_mib: f64,
    /// Peak resident memory of the gateway process over the run (VmHWM), MiB.
    pub rss_peak_mib: f64,
    /// Flat out.
    pub max: Option<Phase>,
    /// The sustained-rate search.
    pub sustained: Option<Sustained>,
    /// At the fixed offered rate.
    pub load: Phase,
    #[serde(skip)]
    pub load_latencies_ms: Vec<f64>,
}

/// The highest rate a target sustains. Flat out, the load generator itself takes CPU from the
/// machine the gateway runs on; at a fixed rate it takes only what that rate needs. The search
/// offers fixed rates, each for `--sustain-seconds`: first 0.9 × the flat-out rate, then 15%
/// more after each step that passed, or 20% less after each that missed, until the outcome
/// changes; then it bisects between the highest pass and the lowest miss until they are
/// within [`SUSTAIN_RESOLUTION`] (at most [`SUSTAIN_STEPS`] steps in all).
#[derive(Debug, Clone, Serialize)]
pub struct Sustained {
    /// Highest offered windows/s that passed; 0 when no step did.
    pub windows_per_second: f64,
    pub steps: Vec<SustainStep>,
}

/// Most steps of the sustained-rate search.
pub const SUSTAIN_STEPS: usize = 8;

/// One fixed rate of the sustained-rate search.
#[derive(Debug, Clone, Serialize)]
pub struct SustainStep {
    pub offered_windows_per_second: f64,
    /// Results received per second while the load ran.
    pub windows_per_second: f64,
    pub windows_in: u64,
    pub windows_lost: i64,
    pub latency_ms: Option<Latency>,
    /// No window lost, and results came at ≥ [`KEEP_UP`] of the offered rate while the
    /// load ran (the gateway kept up rather than catching up after it).
    pub passed: bool,
}

/// Delivered / offered that counts as keeping up.
pub const KEEP_UP: f64 = 0.98;

impl SustainStep {
    fn of(p: &Phase, offered: f64) -> Self {
        SustainStep {
            offered_windows_per_second: offered,
            windows_per_second: p.windows_per_second,
            windows_in: p.windows_in,
            windows_lost: p.windows_lost,
            latency_ms: p.latency_ms.clone(),
            passed: p.windows_in > 0
                && p.windows_lost == 0
                && p.windows_per_second >= KEEP_UP * offered,
        }
    }
}

/// The next rate of the search after `steps`, or `None` when it is over.
pub fn next_sustain_rate(steps: &[SustainStep]) -> Option<f64> {
    if steps.is_empty() || steps.len() >= SUSTAIN_STEPS {
        return None;
    }
    let rates = |passed: bool| {
        steps
            .iter()
            .filter(move |s| s.passed == passed)
            .map(|s| s.offered_windows_per_second)
    };
    let best_pass = rates(true).reduce(f64::max);
    let lowest_miss = rates(false).reduce(f64::min);
    match (best_pass, lowest_miss) {
        (Some(p), None) => Some(p * 1.15),
        (None, Some(m)) => Some(m * 0.8),
        (Some(p), Some(m)) if m > p * (1.0 + SUSTAIN_RESOLUTION) => Some((p + m) / 2.0),
        _ => None,
    }
}

/// The search stops once the lowest missed rate is within this fraction above the highest
/// passed one.
pub const SUSTAIN_RESOLUTION: f64 = 0.05;

/// Mosquitto publish → subscribe, flat out, with the same payloads.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerLimit {
    pub broker: &'static str,
    pub messages_sent: u64,
    pub messages_received: u64,
    /// Messages received per second while the load ran.
    pub messages_per_second: f64,
    /// The same, in windows/s (`× samples_per_message / stride`).
    pub windows_per_second: f64,
    pub latency_ms: Option<Latency>,
    pub broker_cpu_s: f64,
    pub load: LoadReport,
}

/// ONNX Runtime in-process.
#[derive(Debug, Clone, Serialize)]
pub struct InferenceLimit {
    pub intra_threads: usize,
    /// The best windows/s over the batch sizes.
    pub windows_per_second: f64,
    pub batches: Vec<crate::bench::SpeedResult>,
    /// One session per CPU at once, batch 64: the most inference this machine can do, with
    /// nothing else running. No gateway running the model in ONNX Runtime on it can deliver
    /// more.
    pub every_cpu: crate::bench::ParallelSpeed,
}

/// Everything one `perf run` measured.
#[derive(Debug, Clone, Serialize)]
pub struct PerfReport {
    /// 1-minute load average of the machine when the run started and when it ended (other
    /// work on the machine shows here).
    pub load_average: [Option<f64>; 2],
    pub sensors: u32,
    pub format: PayloadFormat,
    pub samples_per_message: u32,
    pub window: usize,
    pub stride: usize,
    /// The Rust gateway binary measured (relative to the working directory when under it).
    pub gateway_bin: String,
    pub inference_limit: InferenceLimit,
    pub broker_limit: Option<BrokerLimit>,
    pub targets: Vec<TargetResult>,
    /// Targets that were asked for but not run, with the reason.
    pub skipped: BTreeMap<String, String>,
    /// Throughput ratios ([`throughput`]: the sustained rate, else flat out, else the load
    /// phase): `a_over_b`.
    pub ratios: BTreeMap<String, f64>,
}

/// Runs a subcommand of `perf`; `perf run` returns its report, `perf load` prints its own.
pub async fn run(cmd: PerfCmd, shutdown: CancellationToken) -> Result<()> {
    match cmd {
        PerfCmd::Load(args) => {
            let r = load::run(args, shutdown).await?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        PerfCmd::Run(args) => {
            let r = run_all(&args, shutdown).await?;
            print!("{}", report::markdown(&r));
            report::write(&args, &r)
        }
        PerfCmd::Sweep(args) => sweep::run(*args, shutdown).await,
        PerfCmd::Steady(args) => steady::run(args).await,
    }
}

/// What every phase shares.
struct Ctx<'a> {
    args: &'a PerfArgs,
    shape: Shape,
    self_exe: PathBuf,
    tmp: TempDir,
    topics: Topics,
    shutdown: CancellationToken,
}

impl<'a> Ctx<'a> {
    fn new(args: &'a PerfArgs, shutdown: CancellationToken) -> Result<Self> {
        let shape = Shape::read(&args.model)?;
        load::read_rows(&args.dataset, &shape.channels)?;
        if args.max_seconds <= 0.0 && args.rate.is_none() {
            bail!("--max-seconds 0 skips the flat-out phase, so --rate must give the load");
        }
        Ok(Ctx {
            args,
            self_exe: std::env::current_exe().context("locating this executable")?,
            tmp: TempDir::new("perf")?,
            topics: Topics::new(GATEWAY_ID)?,
            shutdown,
            shape,
        })
    }
}

/// ONNX Runtime batch throughput of the model in this process, one thread, batch 1 and 64;
/// then one such session per CPU at once.
async fn inference_limit(args: &PerfArgs) -> Result<InferenceLimit> {
    eprintln!("perf: inference limit (ONNX Runtime in-process, 1 thread)");
    let pkg = PackagedModel::read(&args.model)?;
    let secs = args.limit_seconds;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (batches, every_cpu) = tokio::task::spawn_blocking(move || -> Result<_> {
        let batches = crate::bench::model_speed(&pkg, &[1, 64], 1, secs)?;
        eprintln!("perf: inference on every CPU ({cpus} sessions at once)");
        let every_cpu = crate::bench::parallel_model_speed(&pkg, cpus, 64, secs)?;
        Ok((batches, every_cpu))
    })
    .await
    .context("inference limit thread")??;
    Ok(InferenceLimit {
        intra_threads: 1,
        windows_per_second: batches
            .iter()
            .map(|b| b.windows_per_second)
            .fold(0.0, f64::max),
        batches,
        every_cpu,
    })
}

/// The whole run: limits, then every target.
pub async fn run_all(args: &PerfArgs, shutdown: CancellationToken) -> Result<PerfReport> {
    let load_average_start = load_average();
    let ctx = Ctx::new(args, shutdown)?;
    let inference_limit = inference_limit(args).await?;

    let broker_limit = if args.max_seconds > 0.0 {
        eprintln!("perf: broker limit (Mosquitto loopback, flat out)");
        Some(broker_limit(&ctx).await?)
    } else {
        None
    };

    let mut targets = Vec::new();
    let mut skipped = BTreeMap::new();
    for &t in &args.targets {
        if t == Target::PythonMosquitto && !args.python.is_file() {
            let why = format!(
                "no Python interpreter at {} (scripts/bench-gateway.sh creates it with \
                 bench/requirements.txt)",
                args.python.display()
            );
            eprintln!("perf: SKIPPING {}: {why}", t.name());
            skipped.insert(t.name().to_owned(), why);
            continue;
        }
        eprintln!("perf: {}", t.name());
        targets.push(run_target(&ctx, t).await?);
        if ctx.shutdown.is_cancelled() {
            bail!("interrupted");
        }
    }
    for t in [
        Target::RustEmbedded,
        Target::RustMosquitto,
        Target::PythonMosquitto,
    ] {
        if !args.targets.contains(&t) {
            skipped.insert(t.name().to_owned(), "not selected (--targets)".to_owned());
        }
    }

    let mut report = PerfReport {
        load_average: [load_average_start, load_average()],
        sensors: args.sensors,
        format: args.format,
        samples_per_message: args.samples_per_message,
        window: ctx.shape.window,
        stride: ctx.shape.stride,
        gateway_bin: gateway_bin_shown(args),
        inference_limit,
        broker_limit,
        targets,
        skipped,
        ratios: BTreeMap::new(),
    };
    report.ratios = ratios(&report);
    Ok(report)
}

/// The 1-minute load average.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Throughput of a target for the ratios: the sustained rate when the search ran, else the
/// flat-out phase's, else the load phase's.
pub fn throughput(t: &TargetResult) -> f64 {
    throughput_basis(t).0
}

/// [`throughput`] and where it comes from (`sustained`, `flat out` or `load`). A search in
/// which no step passed counts as not run.
pub fn throughput_basis(t: &TargetResult) -> (f64, &'static str) {
    if let Some(s) = t.sustained.as_ref().filter(|s| s.windows_per_second > 0.0) {
        return (s.windows_per_second, "sustained");
    }
    match &t.max {
        Some(m) => (m.windows_per_second, "flat out"),
        None => (t.load.windows_per_second, "load"),
    }
}

fn ratios(r: &PerfReport) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let find = |t: Target| r.targets.iter().find(|x| x.target == t).map(throughput);
    let python = find(Target::PythonMosquitto);
    let limits = [
        ("inference_limit", r.inference_limit.windows_per_second),
        (
            "inference_every_cpu",
            r.inference_limit.every_cpu.windows_per_second,
        ),
        (
            "broker_limit",
            r.broker_limit
                .as_ref()
                .map_or(0.0, |b| b.windows_per_second),
        ),
    ];
    let rust: Vec<(String, f64)> = [Target::RustEmbedded, Target::RustMosquitto]
        .into_iter()
        .filter_map(|t| Some((t.name().replace('-', "_"), find(t)?)))
        .collect();
    if let Some(p) = python.filter(|p| *p > 0.0) {
        for (name, w) in &rust {
            out.insert(format!("{name}_over_python"), w / p);
        }
    }
    for (name, w) in rust
        .into_iter()
        .chain(python.map(|p| ("python".to_owned(), p)))
    {
        for (limit, l) in limits.iter().filter(|(_, l)| *l > 0.0) {
            out.insert(format!("{name}_over_{limit}"), w / l);
        }
    }
    out
}

/// The sensor message (global index `j` of the load generator) that completed the window of
/// sensor `sensor` ending at `ts`: the window's last sample is sample `(ts - base_ts) / period`
/// of that sensor, which message `sample / samples_per_message` carried.
pub fn sensor_message(
    ts: i64,
    sensor: usize,
    base_ts: i64,
    period_ms: f64,
    samples_per_message: usize,
    sensors: usize,
) -> Option<usize> {
    let sample = ((ts - base_ts) as f64 / period_ms).round();
    if sample < 0.0 {
        return None;
    }
    let k = sample as usize / samples_per_message.max(1);
    Some(k * sensors + sensor)
}

/// Windows that `samples` samples of one sensor make.
pub fn windows_of(samples: u64, window: usize, stride: usize) -> u64 {
    let (w, s) = (window as u64, stride.max(1) as u64);
    if samples < w {
        0
    } else {
        (samples - w) / s + 1
    }
}

/// One received message: sensor index, `ts` (inference) or arrival order (sensor topics), and
/// the Unix µs it arrived.
#[derive(Debug, Clone, Copy)]
struct Rec {
    sensor: u32,
    key: i64,
    recv_us: i64,
    /// The gateway's own `latency_ms` (window complete → result ready); 0 for sensor messages.
    internal_ms: f32,
}

fn unix_us_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Clone, Copy, PartialEq)]
enum Collect {
    /// Inference results (`inference/{prefix}{i}`).
    Inference,
    /// The sensor messages themselves (`sensor/{prefix}{i}`), for the broker limit.
    Sensor,
}

/// A subscriber that records what arrives until it is stopped.
struct Collector {
    count: Arc<AtomicU64>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(Vec<Rec>, bool)>>,
}

impl Collector {
    async fn start(ctx: &Ctx<'_>, port: u16, what: Collect, prefix: &str) -> Result<Collector> {
        let (filter, level) = match what {
            Collect::Inference => (ctx.topics.inference("+"), "inference/"),
            Collect::Sensor => (ctx.topics.sensor_filter(), "sensor/"),
        };
        let strip = format!("{}{level}{prefix}", ctx.topics.prefix());
        let mut options = MqttOptions::new(
            format!("diredi-perf-collect-{}-{port}", std::process::id()),
            "127.0.0.1",
            port,
        );
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = diredi_mqtt::client(options, 64);
        let mut net = events.network_options();
        net.set_tcp_nodelay(true);
        events.set_network_options(net);
        client.subscribe(filter, QoS::AtMostOnce).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if Instant::now() > deadline {
                bail!("no SUBACK from the broker on port {port} within 10 s");
            }
            match tokio::time::timeout(Duration::from_secs(1), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let count = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (c2, s2) = (Arc::clone(&count), stop.clone());
        let task = tokio::spawn(async move {
            let mut recs = Vec::new();
            let mut order: Vec<i64> = Vec::new();
            let mut well_formed = true;
            loop {
                let ev = tokio::select! {
                    _ = s2.cancelled() => break,
                    ev = events.poll() => ev,
                };
                let p = match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => p,
                    Ok(_) => continue,
                    Err(e) => bail!("collector connection failed: {e}"),
                };
                let recv_us = unix_us_now();
                let Some(sensor) = p
                    .topic
                    .strip_prefix(strip.as_str())
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let (key, internal_ms) = match what {
                    Collect::Inference => {
                        match serde_json::from_slice::<InferenceMsg>(&p.payload) {
                            Ok(m) => (m.ts, m.latency_ms as f32),
                            Err(_) => {
                                well_formed = false;
                                continue;
                            }
                        }
                    }
                    Collect::Sensor => {
                        let i = sensor as usize;
                        if order.len() <= i {
                            order.resize(i + 1, 0);
                        }
                        order[i] += 1;
                        (order[i] - 1, 0.0)
                    }
                };
                recs.push(Rec {
                    sensor,
                    key,
                    recv_us,
                    internal_ms,
                });
                c2.fetch_add(1, Ordering::Relaxed);
            }
            let _ = client.disconnect().await;
            Ok((recs, well_formed))
        });
        Ok(Collector { count, stop, task })
    }

    /// Waits until `expected` messages have arrived or none for [`DRAIN_IDLE`], then stops.
    async fn finish(self, expected: u64) -> Result<(Vec<Rec>, bool)> {
        let started = Instant::now();
        let mut last = self.count.load(Ordering::Relaxed);
        let mut last_change = Instant::now();
        while started.elapsed() < DRAIN_MAX {
            let now = self.count.load(Ordering::Relaxed);
            if now >= expected {
                break;
            }
            if now != last {
                last = now;
                last_change = Instant::now();
            } else if last_change.elapsed() >= DRAIN_IDLE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop.cancel();
        self.task.await.context("collector task")?
    }
}

/// One load generator run, as seen by a collector.
struct LoadRun {
    load: LoadReport,
    times: Vec<i64>,
    recs: Vec<Rec>,
    well_formed: bool,
    base_ts: i64,
    expected: u64,
    /// CPU seconds of the watched processes over the run and its drain.
    cpu: Vec<f64>,
    /// CPU seconds of this process (the collector) over the same time.
    harness_cpu_s: f64,
}

async fn drive(
    ctx: &Ctx<'_>,
    port: u16,
    what: Collect,
    prefix: &str,
    rate: f64,
    seconds: f64,
    watch: &[u32],
) -> Result<LoadRun> {
    let args = ctx.args;
    let collector = Collector::start(ctx, port, what, prefix).await?;
    let base_ts = unix_us_now() / 1000;
    let times_path = ctx.tmp.path().join(format!("times-{prefix}{port}.bin"));
    let mut cmd = Command::new(&ctx.self_exe);
    cmd.args([
        "perf",
        "load",
        "--host",
        "127.0.0.1",
        "--gateway",
        GATEWAY_ID,
    ])
    .arg("--port")
    .arg(port.to_string())
    .arg("--sensor-prefix")
    .arg(prefix)
    .arg("--sensors")
    .arg(args.sensors.to_string())
    .arg("--format")
    .arg(format_name(args.format))
    .arg("--samples-per-message")
    .arg(args.samples_per_message.to_string())
    .arg("--rate")
    .arg(rate.to_string())
    .arg("--seconds")
    .arg(seconds.to_string())
    .arg("--dataset")
    .arg(&args.dataset)
    .arg("--model")
    .arg(&args.model)
    .arg("--base-ts")
    .arg(base_ts.to_string())
    .arg("--times")
    .arg(&times_path)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let cpu0: Vec<f64> = watch
        .iter()
        .map(|&p| procstat::cpu_seconds(p).unwrap_or(f64::NAN))
        .collect();
    let me = std::process::id();
    let harness0 = procstat::cpu_seconds(me).unwrap_or(f64::NAN);
    let generator = Guard::spawn(cmd, "the load generator (perf load)")?;
    let stop = ctx.shutdown.clone();
    let mut waiting = tokio::task::spawn_blocking(move || generator.wait_output());
    let out = tokio::select! {
        r = &mut waiting => r.context("load generator thread")??,
        _ = stop.cancelled() => bail!("interrupted"),
    };
    let load: LoadReport = serde_json::from_slice(&out).context("reading perf load's report")?;
    let times = load::read_times(&times_path)?;
    let _ = std::fs::remove_file(&times_path);

    let n = args.sensors as u64;
    let expected = match what {
        Collect::Sensor => load.messages,
        Collect::Inference => (0..n)
            .map(|i| {
                let msgs = load.messages / n + u64::from(i < load.messages % n);
                windows_of(
                    msgs * u64::from(args.samples_per_message),
                    ctx.shape.window,
                    ctx.shape.stride,
                )
            })
            .sum(),
    };
    let (recs, well_formed) = collector.finish(expected).await?;
    let cpu = watch
        .iter()
        .zip(&cpu0)
        .map(|(&p, c0)| procstat::cpu_seconds(p).unwrap_or(f64::NAN) - c0)
        .collect();
    let harness_cpu_s = procstat::cpu_seconds(me).unwrap_or(f64::NAN) - harness0;
    Ok(LoadRun {
        load,
        times,
        recs,
        well_formed,
        base_ts,
        expected,
        cpu,
        harness_cpu_s,
    })
}

fn format_name(f: PayloadFormat) -> &'static str {
    match f {
        PayloadFormat::Binary => "binary",
        PayloadFormat::Json => "json",
        PayloadFormat::Senml => "senml",
    }
}

impl LoadRun {
    /// Sorted latencies in ms, joined through the publish times.
    fn latencies(&self, ctx: &Ctx<'_>, what: Collect) -> Vec<f64> {
        let mut lat: Vec<f64> = self
            .joined(ctx, what)
            .map(|(_, sent, r)| (r.recv_us - sent) as f64 / 1e3)
            .collect();
        lat.sort_by(f64::total_cmp);
        lat
    }

    /// Each received message with the index `j` and publish time of the message it came from.
    fn joined<'s>(
        &'s self,
        ctx: &Ctx<'_>,
        what: Collect,
    ) -> impl Iterator<Item = (usize, i64, &'s Rec)> + 's {
        let n = ctx.args.sensors as usize;
        let spm = ctx.args.samples_per_message as usize;
        let (base_ts, period_ms) = (self.base_ts, ctx.shape.period_ms());
        self.recs.iter().filter_map(move |r| {
            let j = match what {
                Collect::Inference => {
                    sensor_message(r.key, r.sensor as usize, base_ts, period_ms, spm, n)?
                }
                Collect::Sensor => usize::try_from(r.key).ok()? * n + r.sensor as usize,
            };
            Some((j, *self.times.get(j)?, r))
        })
    }

    /// Writes the per-window trace of `--trace` (see [`PerfArgs::trace`]), in arrival order.
    fn write_trace(&self, ctx: &Ctx<'_>, path: &Path) -> Result<()> {
        let mut out = String::from("j\tsent_unix_us\tlatency_ms\tgateway_ms\n");
        for (j, sent, r) in self.joined(ctx, Collect::Inference) {
            let _ = writeln!(
                out,
                "{j}\t{sent}\t{:.3}\t{:.3}",
                (r.recv_us - sent) as f64 / 1e3,
                r.internal_ms
            );
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
    }

    /// Messages received per second while the load ran, after its first fifth.
    fn rate(&self) -> f64 {
        let (Some(&first), Some(&last)) = (self.times.first(), self.times.last()) else {
            return 0.0;
        };
        let from = first + (last - first) / 5;
        let span = (last - from) as f64 / 1e6;
        if span <= 0.0 {
            return 0.0;
        }
        let n = self
            .recs
            .iter()
            .filter(|r| r.recv_us >= from && r.recv_us <= last)
            .count();
        n as f64 / span
    }
}

async fn broker_limit(ctx: &Ctx<'_>) -> Result<BrokerLimit> {
    let bin = procs::find_mosquitto(ctx.args.mosquitto.as_deref())?;
    let (mosquitto, port) = procs::start_mosquitto(&bin, ctx.tmp.path())?;
    let run = drive(
        ctx,
        port,
        Collect::Sensor,
        "limit-",
        0.0,
        ctx.args.max_seconds,
        &[mosquitto.pid()],
    )
    .await?;
    drop(mosquitto);
    let lat = run.latencies(ctx, Collect::Sensor);
    let mps = run.rate();
    Ok(BrokerLimit {
        broker: "mosquitto",
        messages_sent: run.load.messages,
        messages_received: run.recs.len() as u64,
        messages_per_second: mps,
        windows_per_second: mps * f64::from(ctx.args.samples_per_message) / ctx.shape.stride as f64,
        latency_ms: Latency::of(&lat),
        broker_cpu_s: run.cpu.first().copied().unwrap_or(f64::NAN),
        load: run.load,
    })
}

/// Waits for the retained online status of the gateway on `port`; returns it and the time
/// since `started` in ms.
async fn wait_online(
    ctx: &Ctx<'_>,
    port: u16,
    started: Instant,
    gateway: &mut Guard,
) -> Result<(f64, StatusMsg)> {
    let mut options = MqttOptions::new(
        format!("diredi-perf-monitor-{}-{port}", std::process::id()),
        "127.0.0.1",
        port,
    );
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = diredi_mqtt::client(options, 16);
    client
        .subscribe(ctx.topics.status(), QoS::AtLeastOnce)
        .await?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let result = loop {
        if Instant::now() > deadline {
            bail!("the gateway did not come online within {READY_TIMEOUT:?}");
        }
        let ev = tokio::select! {
            _ = ctx.shutdown.cancelled() => bail!("interrupted"),
            ev = tokio::time::timeout(Duration::from_millis(500), events.poll()) => ev,
        };
        match ev {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == ctx.topics.status() => {
                if let Ok(s) = serde_json::from_slice::<StatusMsg>(&p.payload) {
                    if s.state == GatewayState::Online {
                        break (started.elapsed().as_secs_f64() * 1e3, s);
                    }
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                gateway.check_alive()?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(_) => gateway.check_alive()?,
        }
    };
    let _ = client.disconnect().await;
    Ok(result)
}

/// The gateway binary as the report shows it: relative to the working directory when under it
/// (no machine's absolute paths in committed results).
fn gateway_bin_shown(args: &PerfArgs) -> String {
    let bin = args
        .gateway_bin
        .clone()
        .or_else(|| default_gateway_bin().ok())
        .unwrap_or_default();
    shown_path(&bin)
}

/// `path` relative to the working directory when under it, else as it is.
fn shown_path(path: &Path) -> String {
    let bin = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let cwd = std::env::current_dir()
        .and_then(std::fs::canonicalize)
        .unwrap_or_default();
    bin.strip_prefix(&cwd)
        .map(Path::to_path_buf)
        .unwrap_or(bin)
        .display()
        .to_string()
}

fn default_gateway_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    Ok(dir.join("diredi-gateway"))
}

/// The command that starts `target`'s gateway on `port`.
fn gateway_command(ctx: &Ctx<'_>, target: Target, port: u16) -> Result<Command> {
    let args = ctx.args;
    let model = std::fs::canonicalize(&args.model)
        .with_context(|| format!("model {}", args.model.display()))?;
    if target == Target::PythonMosquitto {
        let mut cmd = Command::new(&args.python);
        cmd.arg(&args.python_gateway)
            .arg("--model")
            .arg(&model)
            .args(["--host", "127.0.0.1", "--gateway-id", GATEWAY_ID])
            .arg("--port")
            .arg(port.to_string())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        return Ok(cmd);
    }
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
    let state = ctx.tmp.path().join(format!("state-{}", target.name()));
    let mut cmd = Command::new(&bin);
    cmd.arg("run")
        .env("DIREDI_GATEWAY__ID", GATEWAY_ID)
        .env("DIREDI_GATEWAY__LOG_LEVEL", "warn")
        .env("DIREDI_GATEWAY__LOG_FORMAT", "terminal")
        .env("DIREDI_MQTT__PORT", port.to_string())
        .env("DIREDI_MODEL__PATH", &model)
        .env("DIREDI_MODEL__TRUSTED_KEYS", key.trim())
        .env("DIREDI_LEARNING__STATE_DIR", &state)
        .env(
            "DIREDI_PIPELINE__MAX_SENSORS",
            (2 * args.sensors + 8).to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if target == Target::RustMosquitto {
        cmd.env("DIREDI_BROKER__ENABLED", "false");
    }
    cmd.envs(args.gateway_env.iter().map(|(k, v)| (k, v)));
    Ok(cmd)
}

async fn run_target(ctx: &Ctx<'_>, target: Target) -> Result<TargetResult> {
    let args = ctx.args;
    let mosquitto = match target {
        Target::RustEmbedded => None,
        Target::RustMosquitto | Target::PythonMosquitto => {
            let bin = procs::find_mosquitto(args.mosquitto.as_deref())?;
            Some(procs::start_mosquitto(&bin, ctx.tmp.path())?)
        }
    };
    let port = match &mosquitto {
        Some((_, p)) => *p,
        None => procs::free_port()?,
    };
    let started = Instant::now();
    let log = ctx.tmp.path().join(format!("{}.log", target.name()));
    let mut gateway = Guard::spawn_logged(
        gateway_command(ctx, target, port)?,
        &format!("the {} gateway", target.name()),
        &log,
    )?;
    let (ready_ms, status) = wait_online(ctx, port, started, &mut gateway).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = gateway.pid();
    let rss_idle_mib = procstat::rss_mib(pid).unwrap_or(f64::NAN);
    let mut watch = vec![pid];
    if let Some((m, _)) = &mosquitto {
        watch.push(m.pid());
    }

    let max = if args.max_seconds > 0.0 {
        let run = drive(
            ctx,
            port,
            Collect::Inference,
            "max-",
            0.0,
            args.max_seconds,
            &watch,
        )
        .await?;
        gateway.check_alive()?;
        Some(phase(ctx, &run, None).0)
    } else {
        None
    };
    let sustained = match &max {
        Some(m) if args.sustain_seconds > 0.0 => {
            let mut steps: Vec<SustainStep> = Vec::new();
            let mut rate = Some((0.9 * m.windows_per_second).max(1.0));
            while let Some(r) = rate {
                let run = drive(
                    ctx,
                    port,
                    Collect::Inference,
                    "sustain-",
                    r,
                    args.sustain_seconds,
                    &watch,
                )
                .await?;
                gateway.check_alive()?;
                let step = SustainStep::of(&phase(ctx, &run, Some(r)).0, r);
                eprintln!(
                    "perf: {} sustained-rate step: {:.0} windows/s offered, {:.0} received, {} lost: {}",
                    target.name(),
                    r,
                    step.windows_per_second,
                    step.windows_lost,
                    if step.passed { "kept up" } else { "did not keep up" }
                );
                steps.push(step);
                rate = next_sustain_rate(&steps);
            }
            let best = steps
                .iter()
                .filter(|s| s.passed)
                .map(|s| s.offered_windows_per_second)
                .fold(0.0, f64::max);
            Some(Sustained {
                windows_per_second: best,
                steps,
            })
        }
        _ => None,
    };
    let max_rate = sustained
        .as_ref()
        .map(|s| s.windows_per_second)
        .filter(|w| *w > 0.0)
        .or(max.as_ref().map(|m| m.windows_per_second));
    let rate = match (args.rate, max_rate) {
        (Some(r), _) => r,
        (None, Some(m)) => (m * args.load_fraction).max(1.0),
        (None, None) => bail!("no rate for the load phase"),
    };
    let run = drive(
        ctx,
        port,
        Collect::Inference,
        "load-",
        rate,
        args.seconds,
        &watch,
    )
    .await?;
    gateway.check_alive()?;
    let (load, load_latencies_ms) = phase(ctx, &run, Some(rate));
    if let Some(dir) = &args.trace {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        run.write_trace(ctx, &dir.join(format!("{}-load.tsv", target.name())))?;
    }
    let rss_peak_mib = procstat::rss_peak_mib(pid).unwrap_or(f64::NAN);
    drop(gateway);
    drop(mosquitto);
    Ok(TargetResult {
        target,
        gateway: if target == Target::PythonMosquitto {
            "bench/python_gateway.py"
        } else {
            "diredi-gateway"
        },
        broker: target.broker(),
        ready_ms,
        execution_provider: status.execution_provider,
        rss_idle_mib,
        rss_peak_mib,
        max,
        sustained,
        load,
        load_latencies_ms,
    })
}

fn phase(ctx: &Ctx<'_>, run: &LoadRun, offered: Option<f64>) -> (Phase, Vec<f64>) {
    let lat = run.latencies(ctx, Collect::Inference);
    let out = run.recs.len() as u64;
    let gateway_cpu_s = run.cpu.first().copied().unwrap_or(f64::NAN);
    let broker_cpu_s = run.cpu.get(1).copied();
    let cpu = gateway_cpu_s + broker_cpu_s.unwrap_or(0.0);
    let p = Phase {
        offered_windows_per_second: offered,
        seconds: run.load.seconds,
        messages: run.load.messages,
        windows_in: run.expected,
        windows_out: out,
        windows_lost: run.expected as i64 - out as i64,
        windows_per_second: run.rate(),
        latency_ms: Latency::of(&lat),
        gateway_latency_ms: {
            let mut v: Vec<f64> = run.recs.iter().map(|r| f64::from(r.internal_ms)).collect();
            v.sort_by(f64::total_cmp);
            Latency::of(&v)
        },
        gateway_cpu_s,
        broker_cpu_s,
        cpu_us_per_window: if out > 0 {
            cpu * 1e6 / out as f64
        } else {
            f64::NAN
        },
        harness_cpu_s: run.harness_cpu_s,
        load: run.load.clone(),
        results_well_formed: run.well_formed,
    };
    (p, lat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_maps_to_the_message_that_completed_it() {
        // 64 samples per message, 3 sensors, 20 ms period: window 0 of sensor 1 ends at
        // sample 127, carried by that sensor's message 1, global message 1 * 3 + 1.
        let base = 1_700_000_000_000;
        assert_eq!(
            sensor_message(base + 127 * 20, 1, base, 20.0, 64, 3),
            Some(4)
        );
        assert_eq!(
            sensor_message(base + 191 * 20, 2, base, 20.0, 64, 3),
            Some(8)
        );
        assert_eq!(sensor_message(base - 20, 0, base, 20.0, 64, 3), None);
    }

    fn step(offered: f64, passed: bool) -> SustainStep {
        SustainStep {
            offered_windows_per_second: offered,
            windows_per_second: offered,
            windows_in: 1,
            windows_lost: 0,
            latency_ms: None,
            passed,
        }
    }

    #[test]
    fn the_sustained_search_climbs_descends_then_bisects() {
        let next = |steps: &[SustainStep]| next_sustain_rate(steps).map(|r| r.round());
        assert_eq!(next(&[]), None);
        assert_eq!(next(&[step(1000.0, true)]), Some(1150.0));
        assert_eq!(next(&[step(1000.0, false)]), Some(800.0));
        // Between a pass and a miss: the midpoint, until they are within 5%.
        let mut steps = vec![step(1000.0, true), step(1150.0, false)];
        assert_eq!(next(&steps), Some(1075.0));
        steps.push(step(1075.0, true));
        assert_eq!(next(&steps), Some(1113.0));
        steps.push(step(1112.5, false));
        assert_eq!(next(&steps), None, "1075 and 1112.5 are within 5%");
        let climbing: Vec<SustainStep> = (1..=SUSTAIN_STEPS)
            .map(|i| step(i as f64 * 100.0, true))
            .collect();
        assert_eq!(next(&climbing), None, "at most {SUSTAIN_STEPS} steps");
    }

    #[test]
    fn a_step_passes_only_without_loss_and_keeping_up() {
        let mut p = Phase {
            offered_windows_per_second: Some(1000.0),
            seconds: 5.0,
            messages: 5000,
            windows_in: 5000,
            windows_out: 5000,
            windows_lost: 0,
            windows_per_second: 990.0,
            latency_ms: None,
            gateway_latency_ms: None,
            gateway_cpu_s: 1.0,
            broker_cpu_s: None,
            cpu_us_per_window: 200.0,
            harness_cpu_s: 0.1,
            load: LoadReport::default(),
            results_well_formed: true,
        };
        assert!(SustainStep::of(&p, 1000.0).passed);
        p.windows_lost = 1;
        assert!(!SustainStep::of(&p, 1000.0).passed);
        p.windows_lost = 0;
        p.windows_per_second = 900.0;
        assert!(
            !SustainStep::of(&p, 1000.0).passed,
            "fell behind while the load ran"
        );
    }

    #[test]
    fn windows_start_after_one_window_then_every_stride() {
        assert_eq!(windows_of(127, 128, 64), 0);
        assert_eq!(windows_of(128, 128, 64), 1);
        assert_eq!(windows_of(191, 128, 64), 1);
        assert_eq!(windows_of(192, 128, 64), 2);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        let l = Latency::of(&v).unwrap_or_else(|| unreachable!());
        assert_eq!((l.p50, l.p99, l.max), (501.0, 990.0, 1000.0));
        assert!(Latency::of(&[]).is_none());
    }
}
