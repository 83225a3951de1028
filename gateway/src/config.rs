//! Configuration: compiled-in defaults, a TOML file, `DIREDI_<SECTION>__<KEY>` environment
//! overrides, compiled into a validated [`Config`].
//!
//! Where it stands: `main` loads the configuration before anything else runs; every other
//! module receives the validated form and never sees raw values.
//!
//! Two stages, as in vector's config compiler: the `Raw*` structs mirror the file (serde,
//! `deny_unknown_fields`, defaults in their `Default` impls and nowhere else); [`compile`]
//! checks them and reports **every** problem at once, each with its key. Type errors
//! (a string where a number belongs) are reported per section, so a file with mistakes in
//! several sections lists all of them.
//!
//! Sources, later ones winning: defaults, the file given with `--config`, environment variables
//! `DIREDI_<SECTION>__<KEY>` (for example `DIREDI_MQTT__PORT=1884`; lists are comma
//! separated: `DIREDI_RUNTIME__PROVIDERS=xnnpack,cpu`). Variables starting with `DIREDI_` but
//! without a `__` are not configuration and are ignored.
//!
//! Relative paths (`broker.config`, `model.path`, `runtime.library`) resolve against the
//! directory of the configuration file, or against the working directory when no file is given,
//! so a file and the model next to it can move together.
//!
//! [`preflight`] goes further than [`compile`]: it reads the broker configuration and the
//! model and verifies the model's signature. `diredi-gateway validate` runs both.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use diredi_learn::adapt::AdaptConfig;
use diredi_learn::knowledge::QuantConfig;
use diredi_protocol::manifest::{PublicKey, TrustedKeys};
use diredi_protocol::topics::Topics;
use serde::{Deserialize, Serialize};

use crate::batcher::QueuePolicy;

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "DIREDI";
/// Separator between section and key in environment variable names.
pub const ENV_SEPARATOR: &str = "__";
/// Keys whose environment value is a comma-separated list.
const ENV_LIST_KEYS: &[&str] = &["runtime.providers", "model.trusted_keys"];

/// Longest drain allowed at shutdown; systemd expects the process gone within 5 s.
pub const MAX_DRAIN: Duration = Duration::from_millis(4000);

// ---------------------------------------------------------------------------------- raw

/// `[gateway]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawGateway {
    /// Gateway id, one MQTT topic level; empty = the host name.
    pub id: String,
    /// Log filter (`info`, `debug`, `diredi_gateway=debug,info`); `RUST_LOG` wins.
    pub log_level: String,
    /// `auto` (journald when started by systemd, else terminal), `terminal` or `journald`.
    pub log_format: LogFormat,
}

impl Default for RawGateway {
    fn default() -> Self {
        RawGateway {
            id: String::new(),
            log_level: "info".into(),
            log_format: LogFormat::Auto,
        }
    }
}

/// Where logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when `JOURNAL_STREAM` is set (started by systemd), else terminal.
    Auto,
    /// Human-readable lines on stderr.
    Terminal,
    /// Native journald fields.
    Journald,
}

/// `[broker]`: the embedded rumqttd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawBroker {
    /// Run the embedded broker; `false` connects to an external one at `[mqtt]`.
    pub enabled: bool,
    /// rumqttd TOML file; empty = the built-in copy of `broker-config/rumqttd.toml`.
    pub config: String,
    /// Listen address of the broker's MQTT 3.1.1 listener; empty = `[mqtt] host:port`.
    pub listen: String,
}

impl Default for RawBroker {
    fn default() -> Self {
        RawBroker {
            enabled: true,
            config: String::new(),
            listen: String::new(),
        }
    }
}

/// `[mqtt]`: the gateway's connection to the local broker (embedded or external).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawMqtt {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id; empty = `diredi-gateway-{gateway id}`.
    pub client_id: String,
    /// User name; empty = anonymous.
    pub username: String,
    /// Password (used with `username`).
    pub password: String,
    /// Keep-alive interval in seconds (at least 5).
    pub keep_alive_s: u64,
    /// QoS of the sensor subscription and of inference, metrics and error messages (0 or 1).
    /// Status messages always use QoS 1.
    pub qos: u8,
    /// Largest MQTT packet the gateway sends or receives.
    pub max_packet_bytes: usize,
    /// Outgoing messages the MQTT client buffers; when full, results are dropped and counted.
    pub request_capacity: usize,
    /// First reconnection delay in milliseconds; doubles after each failure.
    pub reconnect_min_ms: u64,
    /// Longest reconnection delay in milliseconds.
    pub reconnect_max_ms: u64,
    /// TLS: PEM file of the CA the broker's certificate must chain to; empty = plain TCP.
    pub ca_file: String,
    /// Mutual TLS: this gateway's certificate chain (PEM), with `key_file`; empty = none.
    pub cert_file: String,
    /// Mutual TLS: the private key of `cert_file` (PEM).
    pub key_file: String,
}

impl Default for RawMqtt {
    fn default() -> Self {
        RawMqtt {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: String::new(),
            username: String::new(),
            password: String::new(),
            keep_alive_s: 30,
            qos: 0,
            max_packet_bytes: 1024 * 1024,
            request_capacity: 1024,
            reconnect_min_ms: 250,
            reconnect_max_ms: 4_000,
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
        }
    }
}

/// `[uplink]`: connection to the cloud broker: the status, and with `[learning]` the knowledge
/// out and the models in (else those travel on the local broker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawUplink {
    /// Connect to the cloud broker.
    pub enabled: bool,
    /// Cloud broker host.
    pub host: String,
    /// Cloud broker port.
    pub port: u16,
    /// MQTT client id; empty = `diredi-gateway-{gateway id}`.
    pub client_id: String,
    /// User name; empty = anonymous.
    pub username: String,
    /// Password.
    pub password: String,
    /// Keep-alive interval in seconds (at least 5).
    pub keep_alive_s: u64,
    /// TLS: PEM file of the CA the broker's certificate must chain to; empty = plain TCP.
    pub ca_file: String,
    /// Mutual TLS: this gateway's certificate chain (PEM), with `key_file`; empty = none.
    pub cert_file: String,
    /// Mutual TLS: the private key of `cert_file` (PEM).
    pub key_file: String,
}

impl Default for RawUplink {
    fn default() -> Self {
        RawUplink {
            enabled: false,
            host: String::new(),
            port: 1883,
            client_id: String::new(),
            username: String::new(),
            password: String::new(),
            keep_alive_s: 60,
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
        }
    }
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawModel {
    /// The model's manifest (`<model>.json`); a path ending in `.onnx` means the `.json` beside
    /// it. The ONNX file is the manifest's `onnx_file`, next to the manifest.
    pub path: String,
    /// Public keys (base64 of 32 bytes) whose signatures are accepted; several, so keys can
    /// rotate.
    pub trusted_keys: Vec<String>,
}

/// `[runtime]`: ONNX Runtime and the inference threads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRuntime {
    /// ONNX Runtime shared library (e.g. a vendor build); empty = search (`ORT_DYLIB_PATH`,
    /// `third_party/onnxruntime/`, `/usr/lib/diredi`).
    pub library: String,
    /// Execution providers in priority order; unavailable ones fall back to the next.
    pub providers: Vec<String>,
    /// Inference threads, each with its own ONNX Runtime session.
    pub workers: usize,
    /// ONNX Runtime intra-op threads per session.
    pub intra_threads: usize,
    /// ONNX Runtime inter-op threads per session.
    pub inter_threads: usize,
    /// Most windows classified in one call.
    pub max_batch: usize,
    /// Longest a window waits for its batch to fill, counted from when it became complete, in
    /// milliseconds.
    pub max_wait_ms: u64,
    /// At shutdown, longest time spent finishing queued windows, in milliseconds (max 4000).
    pub drain_timeout_ms: u64,
    /// Threads of the async runtime (MQTT connections, installs, timers); 0 = one per core.
    pub async_threads: usize,
    /// Once serving (and after each model install or adaptation), unmap the read-only file
    /// pages (code and constants) that only loading needed; see `memory`.
    pub release_startup_pages: bool,
    /// Nice value of the inference threads (−20 to 19; lower = higher priority); see
    /// `priority`.
    pub inference_nice: i32,
}

impl Default for RawRuntime {
    fn default() -> Self {
        RawRuntime {
            library: String::new(),
            providers: vec!["xnnpack".into(), "cpu".into()],
            workers: 1,
            intra_threads: 1,
            inter_threads: 1,
            max_batch: 32,
            max_wait_ms: 2,
            drain_timeout_ms: 3000,
            async_threads: 0,
            release_startup_pages: true,
            inference_nice: -10,
        }
    }
}

/// `[pipeline]`: decoding, windowing and queues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawPipeline {
    /// Threads decoding and windowing sensor messages (sensors are spread by id).
    pub decode_threads: usize,
    /// Messages queued per decode thread; when full, new messages are dropped and counted.
    pub ingest_capacity: usize,
    /// Complete windows queued for inference.
    pub queue_capacity: usize,
    /// `drop_oldest` or `drop_newest`, when the inference queue is full.
    pub queue_policy: QueuePolicy,
    /// Most sensors; messages from further sensor ids are rejected.
    pub max_sensors: usize,
    /// Largest accepted sensor payload in bytes.
    pub max_payload_bytes: usize,
    /// Most samples in one sensor message.
    pub max_samples_per_message: usize,
    /// A timestamp more than this many sample periods after the expected one restarts the
    /// sensor's window.
    pub max_gap_periods: f64,
}

impl Default for RawPipeline {
    fn default() -> Self {
        RawPipeline {
            decode_threads: 1,
            ingest_capacity: 256,
            queue_capacity: 1024,
            queue_policy: QueuePolicy::DropOldest,
            max_sensors: 64,
            max_payload_bytes: 64 * 1024,
            max_samples_per_message: 4096,
            max_gap_periods: 5.0,
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawMetrics {
    /// Seconds between metrics messages; 0 disables them.
    pub interval_s: f64,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics { interval_s: 10.0 }
    }
}

/// `[errors]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawErrors {
    /// Error-topic messages per sensor and second (at least 1); the rest are counted.
    pub per_sensor_per_second: u32,
}

impl Default for RawErrors {
    fn default() -> Self {
        RawErrors {
            per_sensor_per_second: 1,
        }
    }
}

/// `[learning]`: labels, the exclusive data store, local adaptation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLearning {
    /// Accept labels and store the labelled windows (they never leave the gateway).
    pub enabled: bool,
    /// Directory of the exclusive store and the outbox. Empty = `$STATE_DIRECTORY` (set by
    /// systemd), else `$HOME/.local/state/diredi`.
    pub state_dir: String,
    /// Labelled windows kept; the oldest is evicted beyond this.
    pub max_windows: usize,
    /// Class names the model lacks (the user's new classes) accepted in labels.
    pub max_new_classes: usize,
    /// Recent windows kept per sensor for labels that arrive after them.
    pub recent_windows: usize,
    /// Label ranges kept per sensor for windows that complete after them.
    pub label_spans: usize,
    /// Knowledge packages kept until the cloud acknowledges them.
    pub max_outbox: usize,
    /// Seconds between publications of a package the cloud has not acknowledged yet.
    pub knowledge_retry_s: f64,
    /// Start an adaptation by itself once this many windows were labelled since the last
    /// one (0 = only on command).
    pub adapt_after_labels: u64,
    /// Serve the adapted model locally while the cloud's update is pending. Off by default:
    /// per DiReDi the manufacturer's model stays in charge.
    pub serve_adapted: bool,
    /// Nice value of the adaptation threads (0 to 19; higher = lower CPU priority), so that
    /// adapting never slows inference down.
    pub adapt_nice: i32,
    /// Local adaptation hyper-parameters (see diredi-learn's `AdaptConfig`), including the
    /// probe guard's `guard_margin` and differential privacy (`[learning.adapt.dp]`).
    pub adapt: AdaptConfig,
    /// Quantisation of the knowledge delta: `bits` (8 or 4) and `keep` (fraction of each
    /// tensor's entries kept, largest first).
    pub quant: RawQuant,
}

/// `[learning.quant]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawQuant {
    /// Bits per kept value: 8 or 4.
    pub bits: u8,
    /// Fraction of each tensor's entries kept (1 = dense).
    pub keep: f32,
}

impl Default for RawQuant {
    fn default() -> Self {
        let q = QuantConfig::default();
        RawQuant {
            bits: q.bits,
            keep: q.keep,
        }
    }
}

impl Default for RawLearning {
    fn default() -> Self {
        RawLearning {
            enabled: true,
            state_dir: String::new(),
            max_windows: 4096,
            max_new_classes: 2,
            recent_windows: 32,
            label_spans: 256,
            max_outbox: 16,
            knowledge_retry_s: 15.0,
            adapt_after_labels: 0,
            serve_adapted: false,
            adapt_nice: 10,
            adapt: AdaptConfig::default(),
            quant: RawQuant::default(),
        }
    }
}

/// Labels and the exclusive store, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct LearningConfig {
    /// State directory (store, outbox).
    pub state_dir: PathBuf,
    /// Labelled windows kept.
    pub max_windows: usize,
    /// New class names accepted.
    pub max_new_classes: usize,
    /// Recent windows kept per sensor.
    pub recent_windows: usize,
    /// Label ranges kept per sensor.
    pub label_spans: usize,
    /// Knowledge packages kept until acknowledged.
    pub max_outbox: usize,
    /// Interval of knowledge retries.
    pub knowledge_retry: Duration,
    /// Labelled windows that start an adaptation by themselves (0 = off).
    pub adapt_after_labels: u64,
    /// Serve the adapted model until the cloud's update arrives.
    pub serve_adapted: bool,
    /// Nice value of the adaptation threads.
    pub adapt_nice: i32,
    /// Adaptation hyper-parameters.
    pub adapt: AdaptConfig,
    /// Knowledge quantisation.
    pub quant: QuantConfig,
}

/// `[homeassistant]`: MQTT discovery for Home Assistant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHomeAssistant {
    /// Publish discovery configs (retained) on the local broker.
    pub enabled: bool,
    /// Home Assistant's discovery prefix.
    pub discovery_prefix: String,
}

impl Default for RawHomeAssistant {
    fn default() -> Self {
        RawHomeAssistant {
            enabled: false,
            discovery_prefix: crate::homeassistant::DEFAULT_PREFIX.to_owned(),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// `[gateway]`.
    pub gateway: RawGateway,
    /// `[broker]`.
    pub broker: RawBroker,
    /// `[mqtt]`.
    pub mqtt: RawMqtt,
    /// `[uplink]`.
    pub uplink: RawUplink,
    /// `[model]`.
    pub model: RawModel,
    /// `[runtime]`.
    pub runtime: RawRuntime,
    /// `[pipeline]`.
    pub pipeline: RawPipeline,
    /// `[metrics]`.
    pub metrics: RawMetrics,
    /// `[errors]`.
    pub errors: RawErrors,
    /// `[homeassistant]`.
    pub homeassistant: RawHomeAssistant,
    /// `[learning]`.
    pub learning: RawLearning,
}

const SECTIONS: &[&str] = &[
    "gateway",
    "broker",
    "mqtt",
    "uplink",
    "model",
    "runtime",
    "pipeline",
    "metrics",
    "errors",
    "homeassistant",
    "learning",
];

/// The compiled-in defaults as TOML (`diredi-gateway print-default-config`).
pub fn default_toml() -> String {
    let body = toml::to_string_pretty(&RawConfig::default())
        .unwrap_or_else(|e| format!("# cannot render the defaults: {e}\n"));
    format!(
        "# diredi-gateway: compiled-in defaults. Every key is optional; see\n\
         # gateway/config/default.toml for a commented configuration.\n\n{body}"
    )
}

// ---------------------------------------------------------------------------- validated

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key (`mqtt.port`), or the section / source for whole-section problems.
    pub key: String,
    /// What was expected and what was found.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why no configuration could be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not TOML.
    #[error("cannot read configuration {path}: {reason}")]
    Source {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The working directory (base of relative paths) is unavailable.
    #[error("cannot determine the working directory: {0}")]
    WorkingDir(std::io::Error),
    /// One or more values are wrong; every problem is listed.
    #[error("{}", list_problems(.0))]
    Invalid(Vec<Problem>),
}

fn list_problems(problems: &[Problem]) -> String {
    let mut s = format!(
        "{} problem{} in the configuration:",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        s.push_str("\n  - ");
        s.push_str(&p.to_string());
    }
    s
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The gateway id (validated topic level).
    pub gateway_id: String,
    /// Topic names of this gateway.
    pub topics: Topics,
    /// Log filter.
    pub log_level: String,
    /// Log destination.
    pub log_format: LogFormat,
    /// Embedded broker; `None` when an external broker is used.
    pub broker: Option<BrokerConfig>,
    /// Connection to the local broker.
    pub mqtt: MqttConfig,
    /// Connection to the cloud broker, when enabled.
    pub uplink: Option<MqttConfig>,
    /// Model location and trust.
    pub model: ModelConfig,
    /// ONNX Runtime and inference threads.
    pub runtime: RuntimeConfig,
    /// Decoding, windowing and queues.
    pub pipeline: PipelineConfig,
    /// Interval of metrics messages; `None` disables them.
    pub metrics_interval: Option<Duration>,
    /// Error-topic messages per sensor and second.
    pub errors_per_sensor_per_second: u32,
    /// Home Assistant discovery prefix, when discovery is enabled.
    pub homeassistant: Option<String>,
    /// Labels and the exclusive store; `None` when learning is off.
    pub learning: Option<LearningConfig>,
    /// The file the configuration came from.
    pub source: Option<PathBuf>,
}

/// Embedded broker settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerConfig {
    /// rumqttd configuration file; `None` = built-in.
    pub config_file: Option<PathBuf>,
    /// Address of the MQTT 3.1.1 listener.
    pub listen: SocketAddr,
}

/// One MQTT connection.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id.
    pub client_id: String,
    /// User name and password.
    pub credentials: Option<(String, String)>,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// QoS of data messages (0 or 1).
    pub qos: u8,
    /// Largest packet.
    pub max_packet_bytes: usize,
    /// Client request queue.
    pub request_capacity: usize,
    /// First reconnection delay.
    pub reconnect_min: Duration,
    /// Longest reconnection delay.
    pub reconnect_max: Duration,
    /// TLS (off unless a CA file is set), with the client identity for mutual TLS.
    pub tls: diredi_mqtt::Tls,
}

/// Model location and trust.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Manifest path, absolute; `None` when not configured.
    pub manifest: Option<PathBuf>,
    /// Keys accepted for signatures.
    pub trusted_keys: TrustedKeys,
}

/// ONNX Runtime and inference threads.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// ONNX Runtime library; `None` = search.
    pub library: Option<PathBuf>,
    /// Execution providers in priority order.
    pub providers: Vec<String>,
    /// Inference threads.
    pub workers: usize,
    /// Intra-op threads per session.
    pub intra_threads: usize,
    /// Inter-op threads per session.
    pub inter_threads: usize,
    /// Most windows per call.
    pub max_batch: usize,
    /// Longest wait for a batch to fill.
    pub max_wait: Duration,
    /// Longest drain at shutdown.
    pub drain_timeout: Duration,
    /// Async runtime threads; 0 = one per core.
    pub async_threads: usize,
    /// Unmap start-up-only file pages once serving.
    pub release_startup_pages: bool,
    /// Nice value of the inference threads.
    pub inference_nice: i32,
}

/// Decoding, windowing and queues.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    /// Decode threads.
    pub decode_threads: usize,
    /// Messages queued per decode thread.
    pub ingest_capacity: usize,
    /// Windows queued for inference.
    pub queue_capacity: usize,
    /// What to drop when the inference queue is full.
    pub queue_policy: QueuePolicy,
    /// Most sensors.
    pub max_sensors: usize,
    /// Largest sensor payload.
    pub max_payload_bytes: usize,
    /// Most samples per message.
    pub max_samples_per_message: usize,
    /// Gap tolerance in sample periods.
    pub max_gap_periods: f64,
}

// ---------------------------------------------------------------------------- loading

/// Loads `file` (if any) and the process environment, and compiles them.
pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    load_with_env(file, std::env::vars())
}

/// Like [`load`] with an explicit environment (tests).
pub fn load_with_env(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let (raw, mut problems) = read_raw(file, env)?;
    let base = match file.and_then(Path::parent) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::env::current_dir().map_err(ConfigError::WorkingDir)?,
    };
    match compile(&raw, &base, file) {
        Ok(cfg) if problems.is_empty() => Ok(cfg),
        Ok(_) => Err(ConfigError::Invalid(problems)),
        Err(ConfigError::Invalid(more)) => {
            problems.extend(more);
            Err(ConfigError::Invalid(problems))
        }
        Err(e) => Err(e),
    }
}

/// Parses TOML text (no environment) and compiles it with `base` for relative paths.
pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigError> {
    let builder = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml));
    let built = builder.build().map_err(|e| ConfigError::Source {
        path: PathBuf::from("<text>"),
        reason: e.to_string(),
    })?;
    let (raw, problems) = sections(&built);
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems));
    }
    compile(&raw, base, None)
}

fn read_raw(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(RawConfig, Vec<Problem>), ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::Source {
                path: path.to_path_buf(),
                reason: "no such file".into(),
            });
        }
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    let prefix = format!("{ENV_PREFIX}_");
    let vars: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| {
            k.strip_prefix(&prefix)
                .is_some_and(|rest| rest.contains(ENV_SEPARATOR))
        })
        .collect();
    let mut environment = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("_")
        .separator(ENV_SEPARATOR)
        .try_parsing(true)
        .list_separator(",")
        .source(Some(vars));
    for key in ENV_LIST_KEYS {
        environment = environment.with_list_parse_key(key);
    }
    let built = builder
        .add_source(environment)
        .build()
        .map_err(|e| ConfigError::Source {
            path: file.map_or_else(|| PathBuf::from("<environment>"), Path::to_path_buf),
            reason: e.to_string(),
        })?;
    Ok(sections(&built))
}

/// Deserialises each section on its own so that type errors in several sections are all
/// reported, and flags unknown top-level keys.
fn sections(built: &config::Config) -> (RawConfig, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut raw = RawConfig::default();
    if let Ok(table) = built
        .clone()
        .try_deserialize::<BTreeMap<String, config::Value>>()
    {
        for key in table.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                problems.push(Problem {
                    key: key.clone(),
                    message: format!("unknown section; expected one of {}", SECTIONS.join(", ")),
                });
            }
        }
    }
    fn section<T: serde::de::DeserializeOwned>(
        built: &config::Config,
        name: &str,
        slot: &mut T,
        problems: &mut Vec<Problem>,
    ) {
        let value = match built.get::<config::Value>(name) {
            Ok(v) => v,
            Err(config::ConfigError::NotFound(_)) => return,
            Err(e) => {
                problems.push(Problem {
                    key: name.to_owned(),
                    message: e.to_string(),
                });
                return;
            }
        };
        // Deserialised as `{name: section}` so errors carry the full key (`mqtt.port`).
        let mut table = config::Map::new();
        table.insert(name.to_owned(), value);
        let wrapped = config::Value::new(None, config::ValueKind::Table(table));
        match wrapped.try_deserialize::<BTreeMap<String, T>>() {
            Ok(mut m) => {
                if let Some(v) = m.remove(name) {
                    *slot = v;
                }
            }
            Err(e) => problems.push(Problem {
                key: name.to_owned(),
                message: e.to_string(),
            }),
        }
    }
    section(built, "gateway", &mut raw.gateway, &mut problems);
    section(built, "broker", &mut raw.broker, &mut problems);
    section(built, "mqtt", &mut raw.mqtt, &mut problems);
    section(built, "uplink", &mut raw.uplink, &mut problems);
    section(built, "model", &mut raw.model, &mut problems);
    section(built, "runtime", &mut raw.runtime, &mut problems);
    section(built, "pipeline", &mut raw.pipeline, &mut problems);
    section(built, "metrics", &mut raw.metrics, &mut problems);
    section(built, "errors", &mut raw.errors, &mut problems);
    section(
        built,
        "homeassistant",
        &mut raw.homeassistant,
        &mut problems,
    );
    section(built, "learning", &mut raw.learning, &mut problems);
    (raw, problems)
}

/// Reads the host name, the default gateway id.
pub fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    fn range<T: PartialOrd + fmt::Display + Copy>(&mut self, key: &str, v: T, min: T, max: T) {
        if v < min || v > max {
            self.problem(key, format!("is {v}; expected {min} to {max}"));
        }
    }
}

/// `$STATE_DIRECTORY` (systemd's `StateDirectory=`), else `$HOME/.local/state/diredi`, else
/// `./diredi-state`.
fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may list several directories separated by ':'; the first is ours.
        let first = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        return PathBuf::from(first);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/diredi"),
        None => PathBuf::from("diredi-state"),
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Checks raw values and builds the [`Config`], collecting every problem. Touches no file.
pub fn compile(raw: &RawConfig, base: &Path, source: Option<&Path>) -> Result<Config, ConfigError> {
    let mut c = Checker {
        problems: Vec::new(),
    };

    // [gateway]
    let gateway_id = if raw.gateway.id.is_empty() {
        match host_name() {
            Some(h) => h,
            None => {
                c.problem(
                    "gateway.id",
                    "is empty and the host name cannot be read; set it",
                );
                String::new()
            }
        }
    } else {
        raw.gateway.id.clone()
    };
    let topics = match Topics::new(&gateway_id) {
        Ok(t) => Some(t),
        Err(e) => {
            let origin = if raw.gateway.id.is_empty() {
                " (taken from the host name)"
            } else {
                ""
            };
            c.problem(
                "gateway.id",
                format!("{gateway_id:?}{origin} is not usable: {e}"),
            );
            None
        }
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.gateway.log_level) {
        c.problem(
            "gateway.log_level",
            format!(
                "{:?} is not a log filter ({e}); expected e.g. \"info\"",
                raw.gateway.log_level
            ),
        );
    }

    // [mqtt]
    let mqtt = mqtt_section(&mut c, "mqtt", &raw.mqtt, &gateway_id, base);
    if raw.mqtt.qos > 1 {
        c.problem("mqtt.qos", format!("is {}; expected 0 or 1", raw.mqtt.qos));
    }
    let min_packet = raw.pipeline.max_payload_bytes + 1024;
    if raw.mqtt.max_packet_bytes < min_packet {
        c.problem(
            "mqtt.max_packet_bytes",
            format!(
                "is {}; expected at least pipeline.max_payload_bytes + 1024 = {min_packet}, so \
                 oversized payloads are reported instead of breaking the connection",
                raw.mqtt.max_packet_bytes
            ),
        );
    }
    if raw.mqtt.request_capacity == 0 {
        c.problem("mqtt.request_capacity", "is 0; expected at least 1");
    }
    if raw.mqtt.reconnect_min_ms == 0 {
        c.problem("mqtt.reconnect_min_ms", "is 0; expected at least 1");
    }
    if raw.mqtt.reconnect_max_ms < raw.mqtt.reconnect_min_ms {
        c.problem(
            "mqtt.reconnect_max_ms",
            format!(
                "is {}; expected at least mqtt.reconnect_min_ms ({})",
                raw.mqtt.reconnect_max_ms, raw.mqtt.reconnect_min_ms
            ),
        );
    }

    // [broker]
    let broker = if raw.broker.enabled {
        let listen = if raw.broker.listen.is_empty() {
            match raw.mqtt.host.parse::<IpAddr>() {
                Ok(ip) => Some(SocketAddr::new(ip, raw.mqtt.port)),
                Err(_) => {
                    c.problem(
                        "broker.listen",
                        format!(
                            "is empty and mqtt.host {:?} is not an IP address; set broker.listen \
                             (e.g. \"0.0.0.0:1883\")",
                            raw.mqtt.host
                        ),
                    );
                    None
                }
            }
        } else {
            match raw.broker.listen.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    c.problem(
                        "broker.listen",
                        format!("{:?} is not ip:port ({e})", raw.broker.listen),
                    );
                    None
                }
            }
        };
        if let Some(a) = listen {
            if a.port() != raw.mqtt.port {
                c.problem(
                    "mqtt.port",
                    format!(
                        "is {}, but the embedded broker listens on port {}; with broker.enabled \
                         the gateway connects to its own broker, so they must match",
                        raw.mqtt.port,
                        a.port()
                    ),
                );
            }
        }
        let config_file =
            (!raw.broker.config.is_empty()).then(|| resolve(base, &raw.broker.config));
        listen.map(|listen| BrokerConfig {
            config_file,
            listen,
        })
    } else {
        None
    };

    // [uplink]
    let uplink = if raw.uplink.enabled {
        let u = &raw.uplink;
        if u.host.is_empty() {
            c.problem(
                "uplink.host",
                "is empty; expected the cloud broker's host name",
            );
        }
        let as_mqtt = RawMqtt {
            host: u.host.clone(),
            port: u.port,
            client_id: u.client_id.clone(),
            username: u.username.clone(),
            password: u.password.clone(),
            keep_alive_s: u.keep_alive_s,
            qos: 1,
            ca_file: u.ca_file.clone(),
            cert_file: u.cert_file.clone(),
            key_file: u.key_file.clone(),
            ..raw.mqtt.clone()
        };
        Some(mqtt_section(&mut c, "uplink", &as_mqtt, &gateway_id, base))
    } else {
        None
    };

    // [model]
    let manifest = (!raw.model.path.is_empty()).then(|| {
        let p = resolve(base, &raw.model.path);
        if p.extension().is_some_and(|e| e == "onnx") {
            p.with_extension("json")
        } else {
            p
        }
    });
    let mut trusted_keys = TrustedKeys::new();
    for (i, k) in raw.model.trusted_keys.iter().enumerate() {
        match PublicKey::from_base64(k.trim()) {
            Ok(key) => trusted_keys.insert(key),
            Err(e) => c.problem(&format!("model.trusted_keys[{i}]"), e.to_string()),
        }
    }
    if raw.model.trusted_keys.is_empty() {
        c.problem(
            "model.trusted_keys",
            "is empty; expected at least one base64 ed25519 public key (no model can be \
             verified without one)",
        );
    }

    // [runtime]
    let rt = &raw.runtime;
    if rt.providers.is_empty() {
        c.problem("runtime.providers", "is empty; expected e.g. [\"cpu\"]");
    }
    for (i, p) in rt.providers.iter().enumerate() {
        if let Err(e) = diredi_infer::validate_providers(std::slice::from_ref(p)) {
            c.problem(&format!("runtime.providers[{i}]"), e.to_string());
        }
    }
    c.range("runtime.workers", rt.workers, 1, 64);
    c.range("runtime.intra_threads", rt.intra_threads, 1, 64);
    c.range("runtime.inter_threads", rt.inter_threads, 1, 64);
    c.range("runtime.max_batch", rt.max_batch, 1, 4096);
    c.range("runtime.max_wait_ms", rt.max_wait_ms, 0, 1000);
    c.range("runtime.async_threads", rt.async_threads, 0, 64);
    c.range(
        "runtime.inference_nice",
        rt.inference_nice,
        crate::priority::MIN_NICE,
        crate::priority::MAX_NICE,
    );
    c.range(
        "runtime.drain_timeout_ms",
        rt.drain_timeout_ms,
        0,
        MAX_DRAIN.as_millis() as u64,
    );
    let runtime = RuntimeConfig {
        library: (!rt.library.is_empty()).then(|| resolve(base, &rt.library)),
        providers: rt
            .providers
            .iter()
            .map(|p| p.to_ascii_lowercase())
            .collect(),
        workers: rt.workers,
        intra_threads: rt.intra_threads,
        inter_threads: rt.inter_threads,
        max_batch: rt.max_batch,
        max_wait: Duration::from_millis(rt.max_wait_ms),
        drain_timeout: Duration::from_millis(rt.drain_timeout_ms),
        async_threads: rt.async_threads,
        release_startup_pages: rt.release_startup_pages,
        inference_nice: rt.inference_nice,
    };

    // [pipeline]
    let p = &raw.pipeline;
    c.range("pipeline.decode_threads", p.decode_threads, 1, 64);
    c.range("pipeline.ingest_capacity", p.ingest_capacity, 1, 1 << 20);
    c.range("pipeline.queue_capacity", p.queue_capacity, 1, 1 << 20);
    c.range("pipeline.max_sensors", p.max_sensors, 1, 1 << 16);
    c.range(
        "pipeline.max_payload_bytes",
        p.max_payload_bytes,
        16,
        64 << 20,
    );
    c.range(
        "pipeline.max_samples_per_message",
        p.max_samples_per_message,
        1,
        1 << 20,
    );
    if !(p.max_gap_periods.is_finite() && p.max_gap_periods >= 0.0) {
        c.problem(
            "pipeline.max_gap_periods",
            format!("is {}; expected a finite number >= 0", p.max_gap_periods),
        );
    }
    let pipeline = PipelineConfig {
        decode_threads: p.decode_threads,
        ingest_capacity: p.ingest_capacity,
        queue_capacity: p.queue_capacity,
        queue_policy: p.queue_policy,
        max_sensors: p.max_sensors,
        max_payload_bytes: p.max_payload_bytes,
        max_samples_per_message: p.max_samples_per_message,
        max_gap_periods: p.max_gap_periods,
    };

    // [metrics], [errors]
    let interval = raw.metrics.interval_s;
    if !(interval.is_finite() && (0.0..=86_400.0).contains(&interval)) {
        c.problem(
            "metrics.interval_s",
            format!("is {interval}; expected 0 (off) to 86400 seconds"),
        );
    }
    let metrics_interval = (interval.is_finite() && interval > 0.0)
        .then(|| Duration::from_secs_f64(interval.min(86_400.0)));
    if raw.errors.per_sensor_per_second == 0 {
        c.problem("errors.per_sensor_per_second", "is 0; expected at least 1");
    }

    // [homeassistant]
    let homeassistant = raw
        .homeassistant
        .enabled
        .then(|| raw.homeassistant.discovery_prefix.clone());
    if let (Some(prefix), Some(_)) = (&homeassistant, &topics) {
        if let Err(e) = crate::homeassistant::discovery_messages(prefix, &gateway_id, &[], &[], "")
        {
            c.problem("homeassistant.discovery_prefix", e.to_string());
        }
    }

    // [learning]
    let l = &raw.learning;
    c.range("learning.max_windows", l.max_windows, 1, 1 << 20);
    c.range("learning.max_new_classes", l.max_new_classes, 0, 64);
    c.range("learning.recent_windows", l.recent_windows, 0, 4096);
    c.range("learning.label_spans", l.label_spans, 1, 1 << 16);
    c.range("learning.max_outbox", l.max_outbox, 1, 4096);
    c.range(
        "learning.adapt_nice",
        l.adapt_nice,
        0,
        crate::priority::MAX_NICE,
    );
    if !(l.knowledge_retry_s.is_finite() && (0.1..=86_400.0).contains(&l.knowledge_retry_s)) {
        c.problem(
            "learning.knowledge_retry_s",
            format!("is {}; expected 0.1 to 86400 seconds", l.knowledge_retry_s),
        );
    }
    if let Err(e) = l.adapt.validate() {
        c.problem("learning.adapt", e.to_string());
    }
    if !(l.quant.bits == 8 || l.quant.bits == 4) {
        c.problem(
            "learning.quant.bits",
            format!("is {}; expected 8 or 4", l.quant.bits),
        );
    }
    if !(l.quant.keep > 0.0 && l.quant.keep <= 1.0) {
        c.problem(
            "learning.quant.keep",
            format!("is {}; expected more than 0, at most 1", l.quant.keep),
        );
    }
    let learning = l.enabled.then(|| LearningConfig {
        state_dir: if l.state_dir.is_empty() {
            default_state_dir()
        } else {
            resolve(base, &l.state_dir)
        },
        max_windows: l.max_windows,
        max_new_classes: l.max_new_classes,
        recent_windows: l.recent_windows,
        label_spans: l.label_spans,
        max_outbox: l.max_outbox,
        knowledge_retry: Duration::from_secs_f64(l.knowledge_retry_s.clamp(0.1, 86_400.0)),
        adapt_after_labels: l.adapt_after_labels,
        serve_adapted: l.serve_adapted,
        adapt_nice: l.adapt_nice,
        adapt: AdaptConfig {
            // One limit for labels and adaptation: the store's.
            max_new_classes: l.max_new_classes,
            ..l.adapt.clone()
        },
        quant: QuantConfig {
            bits: l.quant.bits,
            keep: l.quant.keep,
        },
    });

    match (topics, c.problems.is_empty()) {
        (Some(topics), true) => Ok(Config {
            gateway_id,
            topics,
            log_level: raw.gateway.log_level.clone(),
            log_format: raw.gateway.log_format,
            broker,
            mqtt,
            uplink,
            model: ModelConfig {
                manifest,
                trusted_keys,
            },
            runtime,
            pipeline,
            metrics_interval,
            errors_per_sensor_per_second: raw.errors.per_sensor_per_second,
            homeassistant,
            learning,
            source: source.map(Path::to_path_buf),
        }),
        _ => Err(ConfigError::Invalid(c.problems)),
    }
}

fn mqtt_section(
    c: &mut Checker,
    section: &str,
    m: &RawMqtt,
    gateway_id: &str,
    base: &Path,
) -> MqttConfig {
    if m.host.is_empty() && section == "mqtt" {
        c.problem(
            "mqtt.host",
            "is empty; expected the broker's host name or IP address",
        );
    }
    if m.port == 0 {
        c.problem(&format!("{section}.port"), "is 0; expected 1 to 65535");
    }
    c.range(&format!("{section}.keep_alive_s"), m.keep_alive_s, 5, 3600);
    if m.username.is_empty() && !m.password.is_empty() {
        c.problem(
            &format!("{section}.username"),
            "is empty but a password is set; expected both or neither",
        );
    }
    let file = |p: &str| (!p.is_empty()).then(|| resolve(base, p));
    let tls = diredi_mqtt::Tls {
        ca_file: file(&m.ca_file),
        cert_file: file(&m.cert_file),
        key_file: file(&m.key_file),
    };
    if tls.check().is_err() {
        c.problem(
            &format!("{section}.cert_file"),
            "and key_file: only one is set; expected both (mutual TLS) or neither",
        );
    }
    if !tls.enabled() && tls.cert_file.is_some() {
        c.problem(
            &format!("{section}.ca_file"),
            "is empty but a client certificate is set; expected the broker's CA (TLS)",
        );
    }
    let client_id = if m.client_id.is_empty() {
        format!("diredi-gateway-{gateway_id}")
    } else {
        m.client_id.clone()
    };
    MqttConfig {
        host: m.host.clone(),
        port: m.port,
        client_id,
        credentials: (!m.username.is_empty()).then(|| (m.username.clone(), m.password.clone())),
        keep_alive: Duration::from_secs(m.keep_alive_s),
        qos: m.qos,
        max_packet_bytes: m.max_packet_bytes,
        request_capacity: m.request_capacity.max(1),
        reconnect_min: Duration::from_millis(m.reconnect_min_ms.max(1)),
        reconnect_max: Duration::from_millis(m.reconnect_max_ms.max(m.reconnect_min_ms).max(1)),
        tls,
    }
}

/// Checks what [`compile`] cannot without touching files: the broker configuration loads, the
/// model and manifest exist and the model verifies against the trusted keys, and a configured
/// ONNX Runtime library exists. Returns every problem found.
pub fn preflight(cfg: &Config) -> Vec<Problem> {
    let mut c = Checker {
        problems: Vec::new(),
    };
    if let Some(b) = &cfg.broker {
        if let Err(e) = crate::broker::load_config(b) {
            c.problem("broker.config", e.to_string());
        }
    }
    match &cfg.model.manifest {
        None => c.problem(
            "model.path",
            "is empty; expected the model manifest (<model>.json)",
        ),
        Some(_) => {
            if let Err(e) = crate::model::read_verified(&cfg.model) {
                c.problem("model.path", e.to_string());
            }
        }
    }
    let links =
        std::iter::once(("mqtt", &cfg.mqtt)).chain(cfg.uplink.iter().map(|u| ("uplink", u)));
    for (section, m) in links {
        if let Err(e) = m.tls.client_config() {
            c.problem(&format!("{section}.ca_file"), e.to_string());
        }
    }
    if let Some(lib) = &cfg.runtime.library {
        if !lib.is_file() {
            c.problem(
                "runtime.library",
                format!(
                    "{} does not exist; expected an ONNX Runtime shared library: {}",
                    lib.display(),
                    diredi_infer::ORT_FETCH_HINT
                ),
            );
        }
    }
    c.problems
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key() -> String {
        diredi_protocol::manifest::SigningKey::from_seed(&[7; 32])
            .public()
            .to_base64()
    }

    fn base() -> PathBuf {
        PathBuf::from("/base")
    }

    fn minimal() -> String {
        format!(
            "[gateway]\nid = \"gw-1\"\n[model]\ntrusted_keys = [\"{}\"]\n",
            key()
        )
    }

    fn problems(text: &str) -> Vec<Problem> {
        match from_toml(text, &base()) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    fn keys(p: &[Problem]) -> Vec<&str> {
        p.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn defaults_compile_to_an_embedded_broker_on_localhost() {
        let cfg = from_toml(&minimal(), &base()).unwrap();
        assert_eq!(cfg.gateway_id, "gw-1");
        let b = cfg.broker.unwrap();
        assert_eq!(b.listen, "127.0.0.1:1883".parse().unwrap());
        assert_eq!(b.config_file, None);
        assert_eq!(cfg.mqtt.client_id, "diredi-gateway-gw-1");
        assert_eq!(cfg.runtime.providers, vec!["xnnpack", "cpu"]);
        assert_eq!(cfg.pipeline.queue_policy, QueuePolicy::DropOldest);
        assert_eq!(cfg.metrics_interval, Some(Duration::from_secs(10)));
        assert!(cfg.uplink.is_none());
        assert_eq!(cfg.model.trusted_keys.len(), 1);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = format!(
            "{}[runtime]\nworkers = 0\nproviders = [\"cpu\", \"warp-drive\"]\n\
             [mqtt]\nqos = 2\nkeep_alive_s = 1\n[pipeline]\nmax_gap_periods = -1.0\n\
             [errors]\nper_sensor_per_second = 0\n",
            minimal().replace(&key(), "not-base64!")
        );
        let p = problems(&text);
        let k = keys(&p);
        for expected in [
            "model.trusted_keys[0]",
            "runtime.workers",
            "runtime.providers[1]",
            "mqtt.qos",
            "mqtt.keep_alive_s",
            "pipeline.max_gap_periods",
            "errors.per_sensor_per_second",
        ] {
            assert!(k.contains(&expected), "{expected} missing from {k:?}");
        }
        let text = ConfigError::Invalid(p).to_string();
        assert!(
            text.starts_with("7 problems in the configuration:"),
            "{text}"
        );
        assert!(
            text.contains("runtime.workers: is 0; expected 1 to 64"),
            "{text}"
        );
    }

    #[test]
    fn type_errors_in_several_sections_are_all_reported() {
        let text = format!(
            "{}[mqtt]\nport = \"high\"\n[pipeline]\nmax_sensors = \"many\"\n[bogus]\nx = 1\n",
            minimal()
        );
        let p = problems(&text);
        assert_eq!(keys(&p), vec!["bogus", "mqtt", "pipeline"], "{p:?}");
        assert!(p[1].message.contains("mqtt.port"), "{}", p[1].message);
    }

    #[test]
    fn home_assistant_discovery_is_off_by_default_and_checks_its_prefix() {
        assert_eq!(from_toml(&minimal(), &base()).unwrap().homeassistant, None);
        let on = format!("{}[homeassistant]\nenabled = true\n", minimal());
        assert_eq!(
            from_toml(&on, &base()).unwrap().homeassistant.as_deref(),
            Some("homeassistant")
        );
        let bad = format!("{on}discovery_prefix = \"ha/#\"\n");
        assert_eq!(
            keys(&problems(&bad)),
            vec!["homeassistant.discovery_prefix"]
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let p = problems(&format!("{}[mqtt]\nhots = \"x\"\n", minimal()));
        assert_eq!(keys(&p), vec!["mqtt"]);
        assert!(p[0].message.contains("hots"), "{}", p[0].message);
    }

    #[test]
    fn embedded_broker_port_must_match_the_client_port() {
        let p = problems(&format!(
            "{}[broker]\nlisten = \"0.0.0.0:1884\"\n",
            minimal()
        ));
        assert_eq!(keys(&p), vec!["mqtt.port"]);
        let cfg = from_toml(
            &format!(
                "{}[broker]\nlisten = \"0.0.0.0:1884\"\n[mqtt]\nport = 1884\n",
                minimal()
            ),
            &base(),
        )
        .unwrap();
        assert_eq!(cfg.broker.unwrap().listen.port(), 1884);
        let cfg = from_toml(
            &format!(
                "{}[broker]\nenabled = false\n[mqtt]\nhost = \"broker.lan\"\n",
                minimal()
            ),
            &base(),
        )
        .unwrap();
        assert!(cfg.broker.is_none());
        assert_eq!(cfg.mqtt.host, "broker.lan");
    }

    #[test]
    fn relative_paths_resolve_against_the_base_directory() {
        let text = format!(
            "{}[broker]\nconfig = \"rumqttd.toml\"\n[runtime]\nlibrary = \"/opt/ort.so\"\n",
            minimal().replace("[model]\n", "[model]\npath = \"models/m.onnx\"\n")
        );
        let cfg = from_toml(&text, &base()).unwrap();
        assert_eq!(
            cfg.model.manifest,
            Some(PathBuf::from("/base/models/m.json"))
        );
        assert_eq!(
            cfg.broker.unwrap().config_file,
            Some(PathBuf::from("/base/rumqttd.toml"))
        );
        assert_eq!(cfg.runtime.library, Some(PathBuf::from("/opt/ort.so")));
    }

    #[test]
    fn environment_overrides_file_values_and_ignores_other_diredi_variables() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gw.toml");
        std::fs::write(&file, format!("{}[mqtt]\nport = 1000\n", minimal())).unwrap();
        let env = [
            ("DIREDI_GATEWAY__ID", "from-env"),
            ("DIREDI_MQTT__HOST", "10.0.0.7"),
            ("DIREDI_MQTT__PORT", "1999"),
            ("DIREDI_BROKER__ENABLED", "false"),
            ("DIREDI_RUNTIME__PROVIDERS", "qnn,cpu"),
            ("DIREDI_REQUIRE_DATA", "1"),
            ("OTHER__X", "1"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let cfg = load_with_env(Some(&file), env).unwrap();
        assert_eq!(cfg.gateway_id, "from-env");
        assert_eq!((cfg.mqtt.host.as_str(), cfg.mqtt.port), ("10.0.0.7", 1999));
        assert!(cfg.broker.is_none());
        assert_eq!(cfg.runtime.providers, vec!["qnn", "cpu"]);
        assert_eq!(cfg.source.as_deref(), Some(file.as_path()));
    }

    #[test]
    fn numeric_gateway_id_from_the_environment_stays_a_string() {
        let env = [("DIREDI_GATEWAY__ID".to_owned(), "4711".to_owned())];
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gw.toml");
        std::fs::write(&file, minimal()).unwrap();
        assert_eq!(load_with_env(Some(&file), env).unwrap().gateway_id, "4711");
    }

    #[test]
    fn bad_environment_values_are_reported_with_their_key() {
        let env = [("DIREDI_MQTT__PORT".to_owned(), "seventy".to_owned())];
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gw.toml");
        std::fs::write(&file, minimal()).unwrap();
        match load_with_env(Some(&file), env) {
            Err(ConfigError::Invalid(p)) => assert_eq!(keys(&p), vec!["mqtt"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_file_is_a_source_error() {
        let err = load_with_env(Some(Path::new("/nonexistent/gw.toml")), []).unwrap_err();
        assert!(matches!(err, ConfigError::Source { .. }), "{err}");
    }

    #[test]
    fn gateway_id_defaults_to_the_host_name() {
        let text = minimal().replace("id = \"gw-1\"\n", "");
        match (from_toml(&text, &base()), host_name()) {
            (Ok(cfg), Some(h)) => assert_eq!(cfg.gateway_id, h),
            (Err(ConfigError::Invalid(p)), _) => assert_eq!(keys(&p), vec!["gateway.id"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn default_toml_round_trips_and_the_shipped_file_stays_in_sync() {
        let text = default_toml();
        let raw: RawConfig = toml::from_str(&text).unwrap();
        assert_eq!(raw, RawConfig::default());

        let shipped = include_str!("../config/default.toml");
        let shipped_raw: RawConfig = toml::from_str(shipped).expect("shipped config parses");
        let shipped_table: toml::Table = toml::from_str(shipped).unwrap();
        let default_table: toml::Table = toml::from_str(&text).unwrap();
        for (section, keys) in &default_table {
            let keys = keys.as_table().unwrap();
            let shipped_keys = shipped_table
                .get(section)
                .and_then(|s| s.as_table())
                .unwrap_or_else(|| panic!("[{section}] missing from config/default.toml"));
            for key in keys.keys() {
                assert!(
                    shipped_keys.contains_key(key),
                    "{section}.{key} missing from config/default.toml"
                );
            }
        }
        assert!(shipped_raw.broker.enabled);
        // The learning settings are not "packaged" values: the file must say what runs.
        assert_eq!(
            shipped_raw.learning.adapt,
            RawConfig::default().learning.adapt
        );
        assert_eq!(
            shipped_raw.learning.quant,
            RawConfig::default().learning.quant
        );
    }
}
