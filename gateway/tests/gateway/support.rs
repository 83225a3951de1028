//! Shared fixture: real brokers on free ports, an MQTT observer, signed test models, a fake
//! classifier, configurations and an in-process gateway.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diredi_gateway::model::LoadedModel;
use diredi_gateway::notify::Notifier;
use diredi_gateway::{config, Config, GatewayError, RunOptions};
use diredi_infer::{Classifier, InferError};
use diredi_protocol::manifest::{sign_manifest, ReceivedModel, SigningKey, TrustedKeys};
use ndarray::{Array2, ArrayView3};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Gateway id used by every test.
pub const GW: &str = "gw-test";

/// Default wait for an expected message.
pub const WAIT: Duration = Duration::from_secs(10);

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Whether optional prerequisites may be skipped (`DIREDI_REQUIRE_DATA` unset). When they may,
/// prints why the test is skipped and returns false; otherwise panics.
pub fn skip(what: &str) -> bool {
    if std::env::var_os("DIREDI_REQUIRE_DATA").is_some() {
        panic!("{what} is required (DIREDI_REQUIRE_DATA is set)");
    }
    eprintln!("SKIPPED: {what} is not available");
    true
}

/// Whether ONNX Runtime can be loaded in this process (and so by the gateway binary, which
/// searches the same places).
pub fn ort_available() -> bool {
    diredi_infer::init_runtime(None).is_ok()
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

// ------------------------------------------------------------------------------- brokers

/// A Mosquitto broker on a free port, killed on drop.
pub struct Mosquitto {
    child: Child,
    /// Its port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto on a free port and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts Mosquitto on `port`.
    pub fn start_on(port: u16) -> Self {
        Self::start_conf(
            port,
            &format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
    }

    /// Starts Mosquitto with the configuration `text`, which must listen on `port`.
    pub fn start_conf(port: u16, text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, text).unwrap();
        let bin = ["/usr/sbin/mosquitto", "mosquitto"]
            .into_iter()
            .find(|b| !b.starts_with('/') || Path::new(b).exists())
            .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (apt-get install -y mosquitto)");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Mosquitto {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------------ observer

/// A received message.
#[derive(Debug, Clone)]
pub struct Msg {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained flag as delivered.
    pub retain: bool,
}

impl Msg {
    /// Payload as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {:?}", self.topic, self.payload))
    }
}

/// Options of an observer on `127.0.0.1:port` with a fresh client id.
pub fn observer_options(port: u16) -> MqttOptions {
    let id = format!("observer-{}", free_port());
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(4 << 20, 4 << 20);
    opts
}

/// An MQTT client that records every message on a filter and can publish.
pub struct Observer {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Msg>,
    task: JoinHandle<()>,
}

impl Observer {
    /// Connects to `127.0.0.1:port` (retrying until the broker is up) and subscribes to
    /// `filter`; returns once the subscription is acknowledged.
    pub async fn connect(port: u16, filter: &str) -> Self {
        Self::connect_with(observer_options(port), filter).await
    }

    /// [`Observer::connect`] with these options (TLS, another client id).
    pub async fn connect_with(opts: MqttOptions, filter: &str) -> Self {
        let (client, mut el) = AsyncClient::new(opts, 10_000);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
        let filter = filter.to_owned();
        let sub_client = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let c = sub_client.clone();
                        let f = filter.clone();
                        tokio::spawn(async move { c.subscribe(f, QoS::AtLeastOnce).await });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, sub_rx.recv())
            .await
            .expect("observer subscribed");
        Observer { client, rx, task }
    }

    /// The next message whose topic ends with `suffix`, within `timeout`.
    pub async fn next_on(&mut self, suffix: &str, timeout: Duration) -> Option<Msg> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if m.topic.ends_with(suffix) => return Some(m),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }

    /// The next message on `suffix` whose JSON satisfies `pred`.
    pub async fn next_json(
        &mut self,
        suffix: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self.next_on(suffix, left).await?;
            let v = m.json();
            if pred(&v) {
                return Some(v);
            }
        }
    }

    /// Panics with `why` if a message on `suffix` arrives within `wait`.
    pub async fn assert_silent(&mut self, suffix: &str, wait: Duration, why: &str) {
        if let Some(m) = self.next_on(suffix, wait).await {
            panic!("{why}: got a message on {}", m.topic);
        }
    }

    /// A message already received, without waiting.
    pub fn try_next(&mut self) -> Option<Msg> {
        self.rx.try_recv().ok()
    }

    /// Collects `n` messages on `suffix` (fewer if `timeout` passes first).
    pub async fn collect(&mut self, suffix: &str, n: usize, timeout: Duration) -> Vec<Msg> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_on(suffix, left).await {
                Some(m) => out.push(m),
                None => break,
            }
        }
        out
    }

    /// Publishes with QoS 1 (ordered, acknowledged).
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Publishes a retained message with QoS 1.
    pub async fn publish_retained(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
    }

    /// Publishes to the sensor topic of `sensor`.
    pub async fn sensor(&self, sensor: &str, payload: Vec<u8>) {
        self.publish(&format!("diredi/v1/{GW}/sensor/{sensor}"), payload)
            .await;
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ------------------------------------------------------------------------------- models

/// Shape, statistics and classes of a test model. One class per channel (`mean-argmax`).
#[derive(Debug, Clone)]
pub struct Spec {
    /// Channel names.
    pub channels: Vec<String>,
    /// Window length.
    pub window: usize,
    /// Stride.
    pub stride: usize,
    /// Sample rate.
    pub rate: f64,
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel std.
    pub std: Vec<f32>,
}

impl Spec {
    /// Three channels, window 8, stride 4, 50 Hz, non-trivial statistics.
    pub fn small() -> Self {
        Spec {
            channels: vec!["c0".into(), "c1".into(), "c2".into()],
            window: 8,
            stride: 4,
            rate: 50.0,
            mean: vec![1.0, -2.0, 0.5],
            std: vec![2.0, 0.5, 1.0],
        }
    }

    /// Class names: `class-{k}` per channel.
    pub fn classes(&self) -> Vec<String> {
        (0..self.channels.len())
            .map(|k| format!("class-{k}"))
            .collect()
    }

    /// Sample period in ms.
    pub fn period_ms(&self) -> i64 {
        (1000.0 / self.rate) as i64
    }

    /// The class and probabilities the mean-argmax model gives a window of raw rows
    /// (row-major `T × C`): standardise, mean over time, softmax, argmax.
    pub fn expected(&self, rows: &[f32]) -> (String, Vec<f32>) {
        let c = self.channels.len();
        let t = rows.len() / c;
        let means: Vec<f32> = (0..c)
            .map(|k| {
                rows.chunks_exact(c)
                    .map(|r| (r[k] - self.mean[k]) / self.std[k])
                    .sum::<f32>()
                    / t as f32
            })
            .collect();
        let max = means.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = means.iter().map(|m| (m - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        let probs: Vec<f32> = exp.iter().map(|e| e / sum).collect();
        let best = (0..c)
            .max_by(|a, b| probs[*a].total_cmp(&probs[*b]))
            .unwrap();
        (self.classes()[best].clone(), probs)
    }
}

/// The key that signs test models.
pub fn signing_key() -> SigningKey {
    SigningKey::from_seed(&[9; 32])
}

/// Base64 public half of [`signing_key`].
pub fn public_key() -> String {
    signing_key().public().to_base64()
}

fn manifest_json(spec: &Spec, onnx: &[u8], onnx_file: &str) -> serde_json::Value {
    versioned_manifest(spec, onnx, onnx_file, 7, &signing_key())
}

/// A manifest of version `version` for `spec` and `onnx`, signed with `key`.
pub fn versioned_manifest(
    spec: &Spec,
    onnx: &[u8],
    onnx_file: &str,
    version: u64,
    key: &SigningKey,
) -> serde_json::Value {
    let manifest = serde_json::json!({
        "format": "diredi-manifest/1",
        "model_id": "test-model", "version": version, "parent_version": null,
        "created_at": "2026-01-01T00:00:00Z",
        "onnx_file": onnx_file, "sha256": diredi_protocol::sha256_hex(onnx),
        "input": {"name": "input", "layout": "NCT", "channels": spec.channels,
                  "window": spec.window, "stride": spec.stride, "sample_rate_hz": spec.rate,
                  "mean": spec.mean, "std": spec.std},
        "output": {"name": "probabilities", "kind": "probabilities"},
        "classes": spec.classes(), "params": 0, "metrics": {}
    });
    sign_manifest(&manifest, onnx, key).unwrap()
}

/// Writes `model.onnx` (the real mean-argmax ONNX model) and its signed `model.json` into
/// `dir`; returns the manifest path.
pub fn write_onnx_model(dir: &Path, spec: &Spec) -> PathBuf {
    let onnx = super::onnx::mean_argmax(spec.channels.len(), spec.window);
    std::fs::write(dir.join("model.onnx"), &onnx).unwrap();
    let manifest = dir.join("model.json");
    std::fs::write(
        &manifest,
        serde_json::to_vec_pretty(&manifest_json(spec, &onnx, "model.onnx")).unwrap(),
    )
    .unwrap();
    manifest
}

/// In-process fake of the mean-argmax model (no ONNX Runtime).
#[derive(Debug)]
pub struct MeanArgmax {
    channels: usize,
    window: usize,
}

impl Classifier for MeanArgmax {
    fn classify(&self, batch: ArrayView3<'_, f32>) -> Result<Array2<f32>, InferError> {
        let (n, c, _) = batch.dim();
        let mut out = Array2::zeros((n, c));
        for (i, w) in batch.outer_iter().enumerate() {
            let means: Vec<f32> = w.outer_iter().map(|ch| ch.mean().unwrap_or(0.0)).collect();
            let max = means.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = means.iter().map(|m| (m - max).exp()).sum();
            for (k, m) in means.iter().enumerate() {
                out[[i, k]] = (m - max).exp() / sum;
            }
        }
        Ok(out)
    }
    fn channels(&self) -> usize {
        self.channels
    }
    fn window(&self) -> usize {
        self.window
    }
    fn num_outputs(&self) -> usize {
        self.channels
    }
    fn execution_provider(&self) -> &str {
        "fake"
    }
}

/// A verified manifest for `spec` with the fake classifier.
pub fn fake_model(spec: &Spec) -> LoadedModel {
    let onnx = b"fake".to_vec();
    let manifest = serde_json::to_vec(&manifest_json(spec, &onnx, "fake.onnx")).unwrap();
    let mut keys = TrustedKeys::new();
    keys.insert(signing_key().public());
    let verified = ReceivedModel::new(manifest, onnx).verify(&keys).unwrap();
    LoadedModel::new(
        &verified,
        Box::new(MeanArgmax {
            channels: spec.channels.len(),
            window: spec.window,
        }),
    )
    .unwrap()
}

/// The shipped HAPT student, re-signed with the test key in a directory of its own (with its
/// probe set). This is about the pipeline: the release signature is checked by
/// `diredi-gateway validate` on the packaged config.
pub struct Shipped {
    /// Holds the files (removed when dropped).
    _dir: tempfile::TempDir,
    /// The re-signed manifest.
    pub manifest: PathBuf,
    /// Its content.
    pub signed: serde_json::Value,
    /// The ONNX bytes.
    pub onnx: Vec<u8>,
    /// The input channels, in the model's order.
    pub channels: Vec<String>,
}

/// [`Shipped`], or `None` (after [`skip`]) when the model or ONNX Runtime is missing.
pub fn shipped_model() -> Option<Shipped> {
    let root = repo_root();
    let (onnx_path, manifest_path) = (
        root.join("onnx-models/hapt-student-v1.onnx"),
        root.join("onnx-models/hapt-student-v1.json"),
    );
    if !onnx_path.is_file() && skip("onnx-models/hapt-student-v1.onnx") {
        return None;
    }
    if !ort_available() && skip("ONNX Runtime") {
        return None;
    }
    let onnx = std::fs::read(&onnx_path).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest.as_object_mut().unwrap().remove("signature");
    let signed = sign_manifest(&manifest, &onnx, &signing_key()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = signed["onnx_file"].as_str().unwrap().to_owned();
    std::fs::write(dir.path().join(&file), &onnx).unwrap();
    if let Some(probe) = signed["probe"]["file"].as_str() {
        std::fs::copy(manifest_path.with_file_name(probe), dir.path().join(probe)).unwrap();
    }
    let local = dir.path().join("model.json");
    std::fs::write(&local, serde_json::to_vec(&signed).unwrap()).unwrap();
    let channels = serde_json::from_value(signed["input"]["channels"].clone()).unwrap();
    Some(Shipped {
        _dir: dir,
        manifest: local,
        signed,
        onnx,
        channels,
    })
}

/// The first `n` rows of the first HAPT recording, columns in `channels` order, or `None`
/// (after [`skip`]) when the converted data set is missing.
pub fn hapt_rows(channels: &[String], n: usize) -> Option<Vec<f32>> {
    let dataset = repo_root().join("data/hapt");
    if !dataset.join("recordings.csv").is_file() && skip("data/hapt") {
        return None;
    }
    let index = std::fs::read_to_string(dataset.join("recordings.csv")).unwrap();
    let first = index
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .nth(3)
        .unwrap()
        .trim()
        .to_owned();
    let text = std::fs::read_to_string(dataset.join("recordings").join(first)).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let cols: Vec<usize> = channels
        .iter()
        .map(|ch| {
            header
                .iter()
                .position(|h| h == ch)
                .expect("channel in recording")
        })
        .collect();
    let data: Vec<f32> = lines
        .take(n)
        .flat_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            cols.iter()
                .map(move |&i| f[i].parse::<f32>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(data.len(), n * channels.len(), "recording long enough");
    Some(data)
}

// ------------------------------------------------------------------------------- configs

/// Configuration as a TOML table with test defaults: gateway [`GW`], broker on `port`
/// (embedded or not), fast reconnects and metrics, the test key trusted.
pub fn config_table(port: u16, embedded: bool, manifest: Option<&Path>) -> toml::Table {
    let text = format!(
        r#"
[gateway]
id = "{GW}"
log_level = "warn"
[broker]
enabled = {embedded}
[mqtt]
port = {port}
keep_alive_s = 5
reconnect_min_ms = 50
reconnect_max_ms = 400
[model]
path = "{}"
trusted_keys = ["{}"]
[runtime]
providers = ["cpu"]
max_wait_ms = 1
[metrics]
interval_s = 0.2
[learning]
state_dir = "{}"
"#,
        manifest
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        public_key(),
        state_dir().display()
    );
    toml::from_str(&text).unwrap()
}

/// A state directory of its own for every gateway a test starts (the exclusive store is
/// locked by the gateway that opened it), below one directory per test process.
pub fn state_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir()
        .join(format!("diredi-gateway-tests-{}", std::process::id()))
        .join(NEXT.fetch_add(1, Ordering::Relaxed).to_string())
}

/// Sets `section.key = value` in `table`.
pub fn set(table: &mut toml::Table, section: &str, key: &str, value: impl Into<toml::Value>) {
    table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap()
        .insert(key.to_owned(), value.into());
}

/// Compiles a table (relative paths against the temp dir).
pub fn compile(table: &toml::Table) -> Config {
    config::from_toml(&toml::to_string(table).unwrap(), &std::env::temp_dir()).unwrap()
}

// ------------------------------------------------------------------------------- running

/// Records service notifications with their time.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Notifications in order.
    pub events: Mutex<Vec<(Instant, String)>>,
}

impl Recorder {
    /// Names of the notifications so far.
    pub fn names(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, n)| n.clone())
            .filter(|n| !n.starts_with("STATUS"))
            .collect()
    }

    /// Waits for notification `name`.
    pub async fn wait_for(&self, name: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.names().iter().any(|n| n == name) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    fn push(&self, s: String) {
        self.events.lock().unwrap().push((Instant::now(), s));
    }
}

impl Notifier for Recorder {
    fn ready(&self) {
        self.push("READY".into());
    }
    fn watchdog(&self) {
        self.push("WATCHDOG".into());
    }
    fn stopping(&self) {
        self.push("STOPPING".into());
    }
    fn status(&self, text: &str) {
        self.push(format!("STATUS={text}"));
    }
    fn watchdog_timeout(&self) -> Option<Duration> {
        None
    }
}

/// An in-process gateway.
pub struct Running {
    /// Cancel to stop it.
    pub token: CancellationToken,
    /// Its `run_with` task.
    pub handle: JoinHandle<Result<(), GatewayError>>,
    /// Its notifications.
    pub notes: Arc<Recorder>,
}

impl Running {
    /// Starts `config` with `model` (or the configured model when `None`).
    pub fn start(config: Config, model: Option<LoadedModel>) -> Self {
        let token = CancellationToken::new();
        let notes = Arc::new(Recorder::default());
        let options = RunOptions {
            model,
            notifier: notes.clone(),
        };
        let handle = tokio::spawn(diredi_gateway::run_with(config, options, token.clone()));
        Running {
            token,
            handle,
            notes,
        }
    }

    /// Waits for READY (model loaded, subscribed).
    pub async fn ready(&self) {
        assert!(
            self.notes.wait_for("READY", WAIT).await,
            "gateway not ready; notifications: {:?}",
            self.notes.names()
        );
    }

    /// Stops it and returns its result (panics if it takes over 5 s).
    pub async fn stop(self) -> Result<(), GatewayError> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.handle)
            .await
            .expect("gateway stops within 5 s")
            .expect("gateway task did not panic")
    }
}

// ------------------------------------------------------------------------------- data

/// `n` rows of `c` channels starting at sample `from`, varying so that each channel dominates
/// in turn (labels change along the stream) without ties.
pub fn rows(from: usize, n: usize, spec: &Spec) -> Vec<f32> {
    let c = spec.channels.len();
    (from..from + n)
        .flat_map(|i| {
            let dominant = (i / 6) % c;
            (0..c).map(move |k| {
                let z = if k == dominant { 2.0 } else { -0.5 } + 0.01 * k as f32 + 0.001 * i as f32;
                (k, z)
            })
        })
        .map(|(k, z)| spec.mean[k] + spec.std[k] * z)
        .collect()
}

/// Nice values of this process's threads whose name is `name` or starts with `prefix`.
pub fn thread_nices(name: &str, prefix: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim_end();
        if comm != name && !comm.starts_with(prefix) {
            continue;
        }
        // Fields after "(comm)": state is field 3, nice is field 19.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if let Some(n) = rest.split_whitespace().nth(16) {
            out.push(n.parse().unwrap());
        }
    }
    out
}
