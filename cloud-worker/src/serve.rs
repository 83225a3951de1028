//! `diredi-cloud-worker serve`: the cloud side of the DiReDi loop as a service.
//!
//! Data flow: `$share/{group}/diredi/v1/+/knowledge` (MQTT shared subscription: several
//! workers on a clustered broker split the packages) → decode the [`Knowledge`] → receipt on
//! `diredi/v1/{gw}/knowledge/ack` → [`crate::update::update`] (teacher update on the
//! manufacturer's data, re-distillation towards the user's classes, deploy gate) → export,
//! sign → dispatch on `diredi/v1/{gw}/model` (retained announcement and chunks) → the
//! outcome, gate included, on `diredi/v1/{gw}/update` (retained).
//!
//! Work is idempotent per package id: a package seen before (by this worker, or recorded in
//! its state directory) is acknowledged again and not processed twice. Each gateway has its
//! own line of models: the base of a package must be the model this worker last sent that
//! gateway (or the shipped one), else the package is refused in the receipt.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use diredi_learn::knowledge::Knowledge;
use diredi_learn::model::Net;
use diredi_protocol::dispatch::{chunk_topic, DispatchMsg};
use diredi_protocol::manifest::SigningKey;
use diredi_protocol::messages::KnowledgeAckMsg;
use diredi_protocol::topics::{knowledge_shared, knowledge_source, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::onnx_eval::PackagedModel;
use crate::pipeline::{self, ExportSpec, Prepared};
use crate::update::{update, Baseline, Gate, UpdateConfig, UpdateTimes};

/// Arguments of `diredi-cloud-worker serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Shared-subscription group: workers in one group split the knowledge packages.
    #[arg(long, default_value = "diredi-workers")]
    pub group: String,
    /// Dataset (the manufacturer's data) in the generic format.
    #[arg(long, default_value = "data/hapt")]
    pub dataset: PathBuf,
    /// Split configuration.
    #[arg(long, default_value = "cloud-worker/splits/hapt.toml")]
    pub split: PathBuf,
    /// The teacher checkpoint (the large model).
    #[arg(long, default_value = "onnx-models/hapt-teacher-v1.safetensors")]
    pub teacher: PathBuf,
    /// The shipped student's manifest: the base of every gateway's first package.
    #[arg(long, default_value = "onnx-models/hapt-student-v1.json")]
    pub model: PathBuf,
    /// Private signing key (base64 ed25519 seed).
    #[arg(long, default_value = "keys/dev-signing.key")]
    pub key: PathBuf,
    /// Folder for the models made for each gateway and the processed package ids.
    #[arg(long, default_value = "cloud-state")]
    pub state_dir: PathBuf,
    /// Bytes per model chunk on MQTT.
    #[arg(long, default_value_t = 65_536)]
    pub chunk_size: u32,
    /// Update settings as JSON (fields of `UpdateConfig`; missing ones take the defaults).
    #[arg(long)]
    pub update_json: Option<String>,
    /// Stop after this many packages (tests, demos); default: serve until stopped.
    #[arg(long)]
    pub max_packages: Option<usize>,
    /// Fault injection for tests: stop with an error right after sending the first lease, as
    /// if the worker were killed mid-update.
    #[arg(long, hide = true)]
    pub die_after_lease: bool,
    /// Seconds a gateway holds a package back once this worker has taken it (the lease in the
    /// first receipt); longer than an update takes, short enough that a package whose worker
    /// died is soon taken by another.
    #[arg(long, default_value_t = 600)]
    pub lease_s: u64,
    /// TLS: PEM file of the CA the broker's certificate must chain to (default: plain TCP).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS: this worker's certificate (PEM; its CN is the broker user name, for
    /// example diredi-cloud-worker in broker-config/mosquitto/acl). Needs --key-file.
    #[arg(long, requires = "key_file", requires = "ca_file")]
    pub cert_file: Option<PathBuf>,
    /// Mutual TLS: the private key of --cert-file (PEM).
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

/// What the worker did with one package; published on `diredi/v1/{gw}/update`.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateReport {
    /// The package.
    pub package_id: String,
    /// The gateway.
    pub gateway: String,
    /// Base model version of the package.
    pub base_version: u64,
    /// Version dispatched, when the gate passed.
    pub dispatched_version: Option<u64>,
    /// Classes of the new model.
    pub classes: Vec<String>,
    /// The deploy gate's checks.
    pub gate: Gate,
    /// Seconds of each step.
    pub times: UpdateTimes,
    /// Bytes of the knowledge package.
    pub knowledge_bytes: usize,
    /// Bytes of the dispatched ONNX model.
    pub model_bytes: Option<usize>,
}

/// The model line of one gateway: what it runs now, as far as this worker knows.
struct Line {
    version: u64,
    sha256: String,
    student: Net,
    teacher: Net,
}

/// The worker's state.
struct Worker {
    prepared: Prepared,
    model_id: String,
    shipped: Arc<PackagedModel>,
    shipped_student: Net,
    teacher: Net,
    baseline: Baseline,
    key: SigningKey,
    cfg: UpdateConfig,
    state_dir: PathBuf,
    lines: HashMap<String, Line>,
    processed: BTreeMap<String, String>,
}

impl Worker {
    fn load(args: &ServeArgs) -> Result<Worker> {
        let prepared = pipeline::prepare(&args.dataset, &args.split)?;
        let teacher = pipeline::load_checkpoint(&args.teacher, &prepared.split)?;
        let shipped = PackagedModel::read(&args.model)?;
        let shipped_student = diredi_learn::onnx::import(&shipped.onnx)
            .with_context(|| format!("importing {}", args.model.display()))?;
        let baseline = Baseline::compute(&teacher, &shipped_student, &prepared.split)?;
        let key = crate::keys::load_or_generate(&args.key)?;
        let cfg: UpdateConfig = match &args.update_json {
            Some(j) => serde_json::from_str(j).context("--update-json")?,
            None => UpdateConfig::default(),
        };
        std::fs::create_dir_all(&args.state_dir)
            .with_context(|| format!("creating {}", args.state_dir.display()))?;
        let processed = std::fs::read(args.state_dir.join("processed.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(Worker {
            prepared,
            model_id: shipped.manifest.model_id.clone(),
            shipped: Arc::new(shipped),
            shipped_student,
            teacher,
            baseline,
            key,
            cfg,
            state_dir: args.state_dir.clone(),
            lines: HashMap::new(),
            processed,
        })
    }

    fn remember(&mut self, package_id: &str, outcome: &str) {
        self.processed
            .insert(package_id.to_owned(), outcome.to_owned());
        let path = self.state_dir.join("processed.json");
        let tmp = self.state_dir.join("processed.json.tmp");
        let ok = serde_json::to_vec_pretty(&self.processed)
            .ok()
            .and_then(|b| std::fs::write(&tmp, b).ok())
            .and_then(|()| std::fs::rename(&tmp, &path).ok());
        if ok.is_none() {
            tracing::warn!(path = %path.display(), "Cannot record processed package ids.");
        }
    }

    /// Checks the package against the gateway's line; `Err` is the refusal detail.
    fn check_base(&self, gw: &str, k: &Knowledge) -> Result<(), String> {
        if k.model_id != self.model_id {
            return Err(format!(
                "model family {} is not this worker's {}",
                k.model_id, self.model_id
            ));
        }
        let (version, sha) = match self.lines.get(gw) {
            Some(l) => (l.version, l.sha256.as_str()),
            None => (
                self.shipped.manifest.version,
                self.shipped.manifest.sha256.as_str(),
            ),
        };
        if k.base_version != version || k.base_sha256 != sha {
            return Err(format!(
                "base model v{} ({}) is not the model this worker knows gateway {gw} runs (v{version})",
                k.base_version, k.base_sha256
            ));
        }
        Ok(())
    }

    /// Updates, re-distils, gates and, when the gate passes, exports and signs. Blocking.
    fn process(
        &mut self,
        gw: &str,
        k: &Knowledge,
        bytes: usize,
    ) -> Result<(UpdateReport, Option<PathBuf>)> {
        let (teacher, installed) = match self.lines.get(gw) {
            Some(l) => (&l.teacher, &l.student),
            None => (&self.teacher, &self.shipped_student),
        };
        let split = &self.prepared.split;
        let out = update(teacher, installed, k, split, &self.baseline, &self.cfg)?;
        let mut report = UpdateReport {
            package_id: k.package_id.clone(),
            gateway: gw.to_owned(),
            base_version: k.base_version,
            dispatched_version: None,
            classes: out.classes.clone(),
            gate: out.gate.clone(),
            times: out.times.clone(),
            knowledge_bytes: bytes,
            model_bytes: None,
        };
        if !out.gate.passed {
            return Ok((report, None));
        }
        let version = k.base_version + 1;
        let dir = self.state_dir.join("models").join(gw);
        let path = pipeline::export_signed(
            &out.student,
            split,
            &ExportSpec {
                model_id: &self.model_id,
                version,
                parent_version: Some(k.base_version),
                out_dir: &dir,
                metrics: serde_json::json!({"gate": out.gate, "package_id": k.package_id}),
            },
            &self.key,
        )?;
        let pkg = PackagedModel::read(&path)?;
        report.dispatched_version = Some(version);
        report.model_bytes = Some(pkg.onnx.len());
        self.lines.insert(
            gw.to_owned(),
            Line {
                version,
                sha256: pkg.manifest.sha256.clone(),
                student: diredi_learn::onnx::import(&pkg.onnx)?,
                teacher: out.teacher,
            },
        );
        Ok((report, Some(path)))
    }
}

/// Publishes the package at `manifest_path` to `diredi/v1/{gw}/model`: retained chunks, then
/// the retained announcement.
pub async fn dispatch(
    client: &AsyncClient,
    topics: &Topics,
    manifest_path: &Path,
    chunk_size: u32,
) -> Result<usize> {
    let pkg = PackagedModel::read(manifest_path)?;
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let mut files = vec![(pkg.manifest.onnx_file.clone(), pkg.onnx.clone())];
    if let Some(p) = &pkg.manifest.probe {
        let bytes = std::fs::read(dir.join(&p.file))
            .with_context(|| format!("reading probe {}", p.file))?;
        files.push((p.file.clone(), bytes));
    }
    let manifest: serde_json::Value = serde_json::from_slice(&pkg.manifest_json)?;
    let version = pkg.manifest.version;
    let (msg, chunks) = DispatchMsg::build(manifest, version, &files, chunk_size);
    let model_topic = topics.model();
    let mut n = 0;
    for (f, parts) in chunks.into_iter().enumerate() {
        for (i, c) in parts.into_iter().enumerate() {
            client
                .publish(
                    chunk_topic(&model_topic, version, f, i),
                    QoS::AtLeastOnce,
                    true,
                    c,
                )
                .await?;
            n += 1;
        }
    }
    client
        .publish(
            model_topic,
            QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&msg)?,
        )
        .await?;
    Ok(n)
}

/// Serves until `shutdown` (or `--max-packages`). Returns the reports of the packages it
/// processed.
pub async fn run(args: ServeArgs, shutdown: CancellationToken) -> Result<Vec<UpdateReport>> {
    let started = Instant::now();
    let a2 = args.clone();
    let mut worker = tokio::task::spawn_blocking(move || Worker::load(&a2))
        .await
        .context("loading task")??;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        model = %args.model.display(),
        "Cloud worker ready: teacher, shipped student and baseline loaded."
    );
    let filter = knowledge_shared(&args.group)?;
    let mut options = MqttOptions::new(
        format!("diredi-cloud-worker-{}", std::process::id()),
        args.host.clone(),
        args.port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(16 << 20, 16 << 20);
    diredi_mqtt::Tls {
        ca_file: args.ca_file.clone(),
        cert_file: args.cert_file.clone(),
        key_file: args.key_file.clone(),
    }
    .apply(&mut options)
    .context("TLS")?;
    let (client, mut events) = diredi_mqtt::client(options, 1024);
    let mut reports = Vec::new();
    let mut failures: std::collections::HashMap<String, u32> = Default::default();
    let mut queue: std::collections::VecDeque<(String, Vec<u8>)> = Default::default();
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = events.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client.subscribe(filter.clone(), QoS::AtLeastOnce).await?;
                tracing::info!(filter = %filter, "Subscribed to knowledge.");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(gw) = knowledge_source(&p.topic) {
                    queue.push_back((gw.to_owned(), p.payload.to_vec()));
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Broker connection lost; retrying.");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        // One package at a time, between polls; the event loop keeps the connection alive
        // while the blocking work runs on its own thread.
        if let Some((gw, payload)) = queue.pop_front() {
            let topics = match Topics::new(&gw) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(gateway = %gw, error = %e, "Ignoring knowledge on a topic that names no gateway.");
                    continue;
                }
            };
            let k = match Knowledge::from_bytes(&payload) {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(gateway = %gw, error = %e, "Refusing an invalid knowledge package.");
                    continue;
                }
            };
            let k_id = k.package_id.clone();
            let ack = |accepted: bool, detail: Option<String>| KnowledgeAckMsg {
                package_id: k_id.clone(),
                accepted,
                detail,
                lease_s: None,
            };
            if let Some(outcome) = worker.processed.get(&k.package_id) {
                let body =
                    serde_json::to_vec(&ack(true, Some(format!("already processed: {outcome}"))))?;
                client
                    .publish(topics.knowledge_ack(), QoS::AtLeastOnce, false, body)
                    .await?;
                continue;
            }
            if let Err(detail) = worker.check_base(&gw, &k) {
                let body = serde_json::to_vec(&ack(false, Some(detail.clone())))?;
                client
                    .publish(topics.knowledge_ack(), QoS::AtLeastOnce, false, body)
                    .await?;
                worker.remember(&k.package_id, &format!("refused: {detail}"));
                continue;
            }
            // A lease, not the receipt: if this worker dies before the final receipt, the
            // gateway sends the package again when the lease ends and another worker takes it.
            let lease = KnowledgeAckMsg {
                lease_s: Some(args.lease_s),
                ..ack(true, Some("updating".into()))
            };
            client
                .publish(
                    topics.knowledge_ack(),
                    QoS::AtLeastOnce,
                    false,
                    serde_json::to_vec(&lease)?,
                )
                .await?;
            if args.die_after_lease {
                // Fault injection: gone once the lease is out, as if killed mid-update.
                flush(&client, &mut events).await;
                bail!("--die-after-lease: stopped after the lease of {k_id}");
            }
            tracing::info!(gateway = %gw, package_id = %k.package_id, bytes = payload.len(), "Knowledge received; updating the teacher and re-distilling.");
            let bytes = payload.len();
            let (w, res) =
                run_blocking(worker, gw.clone(), k, bytes, &mut events, &shutdown).await?;
            worker = w;
            let (report, path) = match res {
                Ok(r) => r,
                Err(e) => {
                    // Perhaps transient (disk, memory): no receipt, so the package comes back
                    // when the lease ends, here or at another worker; refused for good after
                    // MAX_ATTEMPTS failures here.
                    let n = failures.entry(k_id.clone()).or_insert(0);
                    *n += 1;
                    tracing::warn!(gateway = %gw, error = %e, attempt = *n, "Update failed.");
                    if *n >= MAX_ATTEMPTS {
                        let detail = format!("update failed {n} times: {e}");
                        let body = serde_json::to_vec(&ack(false, Some(detail.clone())))?;
                        client
                            .publish(topics.knowledge_ack(), QoS::AtLeastOnce, false, body)
                            .await?;
                        worker.remember(&k_id, &detail);
                    }
                    continue;
                }
            };
            if let Some(path) = &path {
                let n = dispatch(&client, &topics, path, args.chunk_size).await?;
                tracing::info!(gateway = %gw, version = ?report.dispatched_version, chunks = n, "New model dispatched.");
            } else {
                tracing::warn!(gateway = %gw, gate = ?report.gate, "The deploy gate refused the update; nothing dispatched.");
            }
            let outcome = match report.dispatched_version {
                Some(v) => format!("dispatched v{v}"),
                None => "gate refused".to_owned(),
            };
            worker.remember(&report.package_id, &outcome);
            let body = serde_json::to_vec(&KnowledgeAckMsg {
                package_id: report.package_id.clone(),
                accepted: true,
                detail: Some(outcome.clone()),
                lease_s: None,
            })?;
            client
                .publish(topics.knowledge_ack(), QoS::AtLeastOnce, false, body)
                .await?;
            client
                .publish(
                    format!("{}update", topics.prefix()),
                    QoS::AtLeastOnce,
                    true,
                    serde_json::to_vec(&report)?,
                )
                .await?;
            reports.push(report);
            if args.max_packages.is_some_and(|m| reports.len() >= m) {
                flush(&client, &mut events).await;
                break;
            }
        }
    }
    Ok(reports)
}

/// Lets the publications queued in `client` leave, then disconnects (at most 3 s).
async fn flush(client: &AsyncClient, events: &mut rumqttc::EventLoop) {
    let deadline = Instant::now() + Duration::from_secs(3);
    let _ = client.disconnect().await;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), events.poll()).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
}

type Processed = Result<(UpdateReport, Option<PathBuf>)>;

/// Failed updates of one package on this worker before it is refused for good.
const MAX_ATTEMPTS: u32 = 3;

/// Runs the update on a blocking thread while polling the event loop (so the connection stays
/// alive; packages arriving meanwhile wait in the broker's queue for the next poll).
async fn run_blocking(
    mut worker: Worker,
    gw: String,
    k: Knowledge,
    bytes: usize,
    events: &mut rumqttc::EventLoop,
    shutdown: &CancellationToken,
) -> Result<(Worker, Processed)> {
    let mut task = tokio::task::spawn_blocking(move || {
        // A panic in the update fails this package, not the worker.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            worker.process(&gw, &k, bytes)
        }))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the update panicked")));
        (worker, r)
    });
    let mut held = Vec::new();
    loop {
        tokio::select! {
            r = &mut task => {
                let (w, res) = r.context("update task")?;
                if !held.is_empty() {
                    tracing::warn!(n = held.len(), "Knowledge packages received during an update are dropped; gateways resend them.");
                }
                return Ok((w, res));
            }
            _ = shutdown.cancelled() => bail!("stopped during an update"),
            ev = events.poll() => {
                if let Ok(Event::Incoming(Packet::Publish(p))) = ev {
                    held.push(p.topic);
                }
            }
        }
    }
}
