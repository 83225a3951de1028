//! Local adaptation and reverse distillation on the gateway, and the knowledge uplink.
//!
//! Data flow: exclusive store → **adapt** (a copy of the installed student, fine-tuned on the
//! user's windows, regularised towards the installed model on the manufacturer's probe set,
//! guarded on that probe set) → **reverse distillation** (the quantised parameter delta and
//! the class histogram: no window, no per-window output) → outbox → `knowledge` (QoS 1) →
//! cloud worker → `knowledge/ack` → outbox.
//!
//! Adaptation runs on its own thread and training pool, never on the async runtime nor the
//! inference threads, at a lower CPU priority (`[learning] adapt_nice`, see
//! [`crate::priority`]); one at a time (a second `adapt` command while one runs is refused).
//! `{"cmd": "cancel_adapt"}` stops it within one training step: no knowledge is produced and
//! `adaptation` reports `cancelled`. The installed model keeps serving throughout: per DiReDi
//! the manufacturer's model stays in charge until the cloud sends an update.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diredi_infer::{OrtClassifier, SessionConfig};
use diredi_learn::adapt::{adapt_cancellable, AdaptConfig, AdaptError, Exclusive};
use diredi_learn::knowledge::{extract, KnowledgeMeta, QuantConfig};
use diredi_learn::model::Net;
use diredi_learn::onnx::{export, import};
use diredi_learn::privacy::{epsilon, BudgetExceeded};
use diredi_learn::probe::ProbeSet;
use diredi_learn::train::Windows;
use diredi_protocol::messages::{CommandMsg, ErrorMsg, KnowledgeAckMsg};
use diredi_protocol::topics::Topics;
use rumqttc::QoS;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::kinds;
use crate::metrics::Metrics;
use crate::model::{LoadedModel, ModelHandle, ModelSource};
use crate::mqtt::LinkState;
use crate::outbox::{Outbox, Pushed};
use crate::pipeline::unix_ms;
use crate::ratelimit::Verdict;
use crate::report::{Publisher, Reporter};
use crate::store::{ExclusiveStore, StoredWindow};

/// Why an adaptation produced no knowledge.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    /// Nothing to learn from.
    #[error("no labelled windows for the installed model's input shape; label some first")]
    NoData,
    /// The installed model was not loaded from files (no ONNX bytes or probe set).
    #[error("the installed model has {0}; adaptation needs a model package with a probe set")]
    NoSource(&'static str),
    /// Another adaptation is running.
    #[error("an adaptation is already running")]
    Busy,
    /// The probe file cannot be read.
    #[error("probe set: {0}")]
    Probe(String),
    /// Importing the installed ONNX model into the trainer failed.
    #[error("cannot rebuild the installed model for training: {0}")]
    Import(String),
    /// The adaptation was cancelled (`cancel_adapt`); nothing was produced.
    #[error("adaptation cancelled after {steps} of {total} training steps")]
    Cancelled {
        /// Training steps done.
        steps: usize,
        /// Training steps planned.
        total: usize,
    },
    /// Adaptation failed or its guard refused the result.
    #[error(transparent)]
    Adapt(AdaptError),
    /// The privacy budget cannot pay for another adaptation.
    #[error(transparent)]
    Privacy(#[from] BudgetExceeded),
    /// The adapted model cannot be served locally (`serve_adapted`).
    #[error("cannot serve the adapted model: {0}")]
    Serve(String),
    /// Extracting or encoding the knowledge failed.
    #[error(transparent)]
    Knowledge(#[from] diredi_learn::knowledge::KnowledgeError),
    /// The store or the outbox failed.
    #[error("{0}")]
    Storage(String),
}

impl From<AdaptError> for LearnError {
    fn from(e: AdaptError) -> Self {
        match e {
            AdaptError::Cancelled { steps, total } => LearnError::Cancelled { steps, total },
            e => LearnError::Adapt(e),
        }
    }
}

/// What one adaptation did; published on the `adaptation` topic (no user data in it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdaptReport {
    /// Id of the knowledge package.
    pub package_id: String,
    /// Version of the installed model it is relative to.
    pub base_version: u64,
    /// Labelled windows used.
    pub windows: usize,
    /// Classes of the adapted model (the installed model's, then new ones).
    pub classes: Vec<String>,
    /// Probe-set accuracy of the installed and of the adapted model.
    pub probe_accuracy_before: f64,
    pub probe_accuracy_after: f64,
    /// Size of the knowledge package in bytes.
    pub knowledge_bytes: usize,
    /// Seconds of adaptation plus reverse distillation.
    pub seconds: f64,
    /// Differential privacy of this adaptation, when enabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyReport>,
    /// The adapted model now serves on this gateway (`[learning] serve_adapted`).
    pub serving_adapted: bool,
}

/// The privacy accounting of one DP adaptation (ε at `delta`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrivacyReport {
    /// ε of this adaptation alone.
    pub epsilon: f64,
    /// ε this gateway has spent in all, this adaptation included.
    pub epsilon_spent: f64,
    /// The gateway's budget.
    pub epsilon_budget: f64,
    /// δ.
    pub delta: f64,
    /// DP adaptations accounted on this gateway.
    pub adaptations: u64,
}

/// What [`adapt_and_extract`] gives: the report, the encoded knowledge and the adapted model.
#[derive(Debug)]
pub struct Extracted {
    /// The report (no user data in it).
    pub report: AdaptReport,
    /// The knowledge package.
    pub bytes: Vec<u8>,
    /// The adapted student.
    pub net: Net,
    /// Its classes.
    pub classes: Vec<String>,
    /// Training steps run.
    pub steps: usize,
}

/// Adapts the installed model (`source`) on `windows` and extracts the knowledge. Pure
/// computation: no I/O besides what `source` already holds. `cancel` stops it between two
/// training steps ([`LearnError::Cancelled`]).
pub fn adapt_and_extract(
    source: &ModelSource,
    windows: &[StoredWindow],
    cfg: &AdaptConfig,
    quant: &QuantConfig,
    cancel: &AtomicBool,
) -> Result<Extracted, LearnError> {
    let started = std::time::Instant::now();
    let m = &source.manifest;
    let (c, t) = (m.input.channels.len(), m.input.window);
    let usable: Vec<&StoredWindow> = windows.iter().filter(|w| w.data.len() == c * t).collect();
    if usable.is_empty() {
        return Err(LearnError::NoData);
    }
    let probe_bytes = source
        .probe
        .as_ref()
        .ok_or(LearnError::NoSource("no probe set"))?;
    let probe = ProbeSet::from_bytes(probe_bytes).map_err(|e| LearnError::Probe(e.to_string()))?;
    let base = import(&source.onnx).map_err(|e| LearnError::Import(e.to_string()))?;
    let x: Vec<f32> = usable.iter().flat_map(|w| w.data.iter().copied()).collect();
    let labels: Vec<String> = usable.iter().map(|w| w.class.clone()).collect();
    let xs = Windows::new(&x, c, t).map_err(|e| LearnError::Import(e.to_string()))?;
    let adapted = adapt_cancellable(
        &base,
        &m.classes,
        Exclusive {
            x: xs,
            labels: &labels,
        },
        &probe,
        cfg,
        cancel,
    )?;
    let knowledge = extract(
        &base,
        &adapted.net,
        KnowledgeMeta {
            model_id: m.model_id.clone(),
            base_version: m.version,
            base_sha256: m.sha256.clone(),
            classes: adapted.classes.clone(),
            base_classes: m.classes.len(),
            histogram: adapted.histogram.clone(),
            quant: quant.clone(),
        },
    )?;
    let bytes = knowledge.to_bytes()?;
    Ok(Extracted {
        report: AdaptReport {
            package_id: knowledge.package_id.clone(),
            base_version: m.version,
            windows: usable.len(),
            classes: adapted.classes.clone(),
            probe_accuracy_before: adapted.probe_accuracy_before,
            probe_accuracy_after: adapted.probe_accuracy_after,
            knowledge_bytes: bytes.len(),
            seconds: started.elapsed().as_secs_f64(),
            privacy: None,
            serving_adapted: false,
        },
        bytes,
        net: adapted.net,
        classes: adapted.classes,
        steps: adapted.steps,
    })
}

/// Longest a package is held back by leases, however many receipts extend them (1 hour).
const MAX_LEASE_S: u64 = 3600;

/// A package held back: since `first` (its first lease), until `until`.
#[derive(Debug, Clone, Copy)]
struct Lease {
    first: std::time::Instant,
    until: std::time::Instant,
}

/// The gateway's learner: starts adaptations, keeps the outbox moving.
pub struct Learner {
    store: Arc<ExclusiveStore>,
    outbox: Arc<Outbox>,
    model: ModelHandle,
    topics: Topics,
    adapt: AdaptConfig,
    quant: QuantConfig,
    serve: Option<SessionConfig>,
    nice: i32,
    /// Unmap start-up-only file pages after each adaptation ([`crate::memory`]).
    release_pages: bool,
    busy: AtomicBool,
    /// Set by `cancel_adapt`, read by the running adaptation; cleared when one starts.
    cancel: AtomicBool,
    wake: Notify,
    metrics: Arc<Metrics>,
    /// Packages a worker has taken (a receipt with `lease_s`): held back until then.
    leases: std::sync::Mutex<std::collections::HashMap<String, Lease>>,
}

impl std::fmt::Debug for Learner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learner")
            .field("store", &self.store)
            .finish()
    }
}

impl Learner {
    /// A learner over `store` and `outbox`, adapting the model behind `model`. With `serve`
    /// (`[learning] serve_adapted`), an adapted model replaces the served one, in an ONNX
    /// Runtime session of those settings, until the cloud's update arrives. Adaptations run
    /// at nice value `nice` ([`crate::priority`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<ExclusiveStore>,
        outbox: Arc<Outbox>,
        model: ModelHandle,
        topics: Topics,
        adapt: AdaptConfig,
        quant: QuantConfig,
        serve: Option<SessionConfig>,
        nice: i32,
        metrics: Arc<Metrics>,
    ) -> Self {
        Learner {
            store,
            outbox,
            model,
            topics,
            adapt,
            quant,
            serve,
            nice,
            release_pages: false,
            busy: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            wake: Notify::new(),
            leases: std::sync::Mutex::default(),
            metrics,
        }
    }

    /// After each adaptation, unmap the code pages only training ran ([`crate::memory`]).
    pub fn releasing_pages(mut self, on: bool) -> Self {
        self.release_pages = on;
        self
    }

    /// Waits (up to `limit`) for a running adaptation to finish, so that its result reaches
    /// the outbox before the gateway exits.
    pub async fn wait_idle(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.busy.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether an adaptation is running.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Asks the running adaptation to stop; it does within one training step and reports
    /// [`LearnError::Cancelled`]. `false` when none is running.
    pub fn cancel(&self) -> bool {
        if !self.is_busy() {
            return false;
        }
        self.cancel.store(true, Ordering::Release);
        true
    }

    /// Packages waiting for the cloud's acknowledgement.
    pub fn outbox_pending(&self) -> usize {
        self.outbox.len().unwrap_or(0)
    }

    /// Starts an adaptation on its own thread. `done` gets the outcome (for the
    /// `adaptation` topic and the logs). `Err(Busy)` when one is already running.
    pub fn start(
        self: &Arc<Self>,
        done: impl FnOnce(Result<AdaptReport, LearnError>) + Send + 'static,
    ) -> Result<(), LearnError> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(LearnError::Busy);
        }
        self.cancel.store(false, Ordering::Release);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("adapt".into())
            .spawn(move || {
                crate::priority::lower_current_thread(me.nice);
                // Candle's kernels run on the rayon pool they are called from: a pool of
                // niced threads, made for this adaptation and gone after it.
                let outcome = match crate::priority::background_pool("adapt", 0, me.nice) {
                    Ok(pool) => pool.install(|| me.run_once()),
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot start the adaptation pool; training on rayon's global pool.");
                        me.run_once()
                    }
                };
                if me.release_pages {
                    crate::memory::release_after("adaptation");
                }
                let counter = match &outcome {
                    Ok(_) => &me.metrics.adaptations,
                    Err(LearnError::Cancelled { .. }) => &me.metrics.adaptations_cancelled,
                    Err(_) => &me.metrics.adaptations_failed,
                };
                Metrics::add(counter, 1);
                me.busy.store(false, Ordering::Release);
                me.wake.notify_one();
                done(outcome);
            });
        if let Err(e) = spawned {
            self.busy.store(false, Ordering::Release);
            return Err(LearnError::Storage(format!(
                "cannot start the adapt thread: {e}"
            )));
        }
        Ok(())
    }

    fn run_once(&self) -> Result<AdaptReport, LearnError> {
        let model = self.model.load_full();
        let source = model
            .source()
            .ok_or(LearnError::NoSource("no ONNX source"))?;
        let windows = self
            .store
            .all()
            .map_err(|e| LearnError::Storage(e.to_string()))?;
        // Privacy is paid before the data is touched, and recorded durably first: a crash
        // during the adaptation cannot leave it unaccounted.
        let privacy = if self.adapt.dp.enabled {
            let dp = &self.adapt.dp;
            let spent = self
                .store
                .ledger()
                .map_err(|e| LearnError::Storage(e.to_string()))?;
            let next = spent.charge(dp, self.adapt.epochs)?;
            self.store
                .set_ledger(&next)
                .map_err(|e| LearnError::Storage(e.to_string()))?;
            Some(PrivacyReport {
                epsilon: epsilon(dp.rho(self.adapt.epochs), dp.delta),
                epsilon_spent: next.epsilon(dp.delta),
                epsilon_budget: dp.epsilon_budget,
                delta: dp.delta,
                adaptations: next.adaptations,
            })
        } else {
            None
        };
        let mut out = adapt_and_extract(source, &windows, &self.adapt, &self.quant, &self.cancel)?;
        if self.cancel.load(Ordering::Acquire) {
            // Cancelled after the last step: the result is dropped all the same.
            return Err(LearnError::Cancelled {
                steps: out.steps,
                total: out.steps,
            });
        }
        out.report.privacy = privacy;
        match self
            .outbox
            .push(&out.report.package_id, &self.topics.knowledge(), &out.bytes)
            .map_err(|e| LearnError::Storage(e.to_string()))?
        {
            Pushed::Queued | Pushed::Duplicate => {}
            Pushed::Full => {
                return Err(LearnError::Storage(
                    "the knowledge outbox is full; the cloud has not acknowledged earlier packages"
                        .into(),
                ))
            }
        }
        if let Some(session) = &self.serve {
            let onnx = export(&out.net).map_err(|e| LearnError::Serve(e.to_string()))?;
            let classifier = OrtClassifier::from_bytes(&onnx, session)
                .map_err(|e| LearnError::Serve(e.to_string()))?;
            // Only over the model it was adapted from: an update installed meanwhile wins.
            let current = self.model.load_full();
            if current.source().map(|s| &s.manifest.sha256) == Some(&source.manifest.sha256) {
                let local =
                    LoadedModel::adapted_locally(&current, out.classes, Box::new(classifier))
                        .map_err(|e| LearnError::Serve(e.to_string()))?;
                self.model.store(Arc::new(local));
                out.report.serving_adapted = true;
                tracing::info!(
                    base_version = source.manifest.version,
                    "Serving the adapted model until the cloud's update arrives ([learning] serve_adapted)."
                );
            }
        }
        Ok(out.report)
    }

    /// Handles a `knowledge/ack` payload.
    pub fn on_ack(&self, payload: &[u8]) {
        let ack: KnowledgeAckMsg = match serde_json::from_slice(payload) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "Ignoring a malformed knowledge acknowledgement.");
                return;
            }
        };
        if let Some(lease) = ack.lease_s {
            // Only for a package still waiting here, and at most MAX_LEASE_S from its first
            // lease however often it is renewed: a bogus receipt can neither grow the table nor
            // hold a package back for ever.
            let pending = self
                .outbox
                .pending()
                .is_ok_and(|p| p.iter().any(|p| p.id == ack.package_id));
            if !pending {
                return;
            }
            let now = std::time::Instant::now();
            if let Ok(mut leases) = self.leases.lock() {
                let first = leases.get(&ack.package_id).map_or(now, |l| l.first);
                let until = (now + Duration::from_secs(lease))
                    .min(first + Duration::from_secs(MAX_LEASE_S));
                leases.insert(ack.package_id.clone(), Lease { first, until });
            }
            tracing::info!(package_id = %ack.package_id, lease_s = lease, "A cloud worker took a knowledge package.");
            return;
        }
        if let Ok(mut leases) = self.leases.lock() {
            leases.remove(&ack.package_id);
        }
        match self.outbox.ack(&ack.package_id, unix_ms()) {
            Ok(true) => {
                Metrics::add(&self.metrics.knowledge_acked, 1);
                tracing::info!(
                    package_id = %ack.package_id,
                    accepted = ack.accepted,
                    detail = ack.detail.as_deref().unwrap_or(""),
                    "The cloud acknowledged a knowledge package."
                );
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "Cannot record a knowledge acknowledgement."),
        }
    }

    /// Handles a `command` payload: `adapt` starts an adaptation whose outcome goes to the
    /// `adaptation` topic (or the error topic), `cancel_adapt` stops it; anything else is
    /// reported as a bad command.
    pub fn on_command(self: &Arc<Self>, payload: &[u8], reporter: &Reporter) {
        let topic = self.topics.command();
        let reject = |reason: String| {
            reporter.reject(
                Verdict::Send {
                    suppressed_before: 0,
                },
                ErrorMsg {
                    topic: topic.clone(),
                    sensor: None,
                    reason,
                    kind: kinds::BAD_COMMAND.to_owned(),
                    ts: unix_ms(),
                },
            );
        };
        match CommandMsg::parse(payload) {
            Ok(CommandMsg::Adapt) => {
                let (reporter2, out_topic) = (reporter.clone(), self.topics.adaptation());
                let started = self.start(move |outcome| {
                    let body = match &outcome {
                        Ok(report) => {
                            tracing::info!(
                                package_id = %report.package_id,
                                windows = report.windows,
                                probe_before = report.probe_accuracy_before,
                                probe_after = report.probe_accuracy_after,
                                bytes = report.knowledge_bytes,
                                seconds = report.seconds,
                                "Adaptation done; knowledge queued for the cloud."
                            );
                            serde_json::json!({"state": "done", "report": report})
                        }
                        Err(e @ LearnError::Cancelled { .. }) => {
                            tracing::info!(reason = %e, "Adaptation cancelled; no knowledge produced.");
                            serde_json::json!({"state": "cancelled", "reason": e.to_string()})
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Adaptation failed.");
                            serde_json::json!({"state": "failed", "reason": e.to_string()})
                        }
                    };
                    let _ = reporter2.publisher().try_publish(
                        out_topic,
                        QoS::AtLeastOnce,
                        false,
                        body.to_string().into_bytes(),
                    );
                });
                if let Err(e) = started {
                    reject(format!("adapt: {e}"));
                }
            }
            Ok(CommandMsg::CancelAdapt) => {
                if self.cancel() {
                    tracing::info!("Cancelling the running adaptation (cancel_adapt).");
                } else {
                    reject("cancel_adapt: no adaptation is running".into());
                }
            }
            Ok(CommandMsg::Rollback { .. }) => {
                reject("rollback: no earlier model is installed on this gateway".into())
            }
            Err(e) => reject(e.to_string()),
        }
    }

    /// Publishes every pending package now, then again every `retry` (and whenever an
    /// adaptation finishes), until `stop`, except packages under a worker's lease.
    /// `connected` says whether publishing makes sense.
    pub async fn run_sender(
        self: Arc<Self>,
        publisher: Arc<dyn Publisher>,
        link: Arc<LinkState>,
        retry: Duration,
        stop: CancellationToken,
    ) {
        loop {
            if link.connected.load(Ordering::Acquire) {
                match self.outbox.pending() {
                    Ok(pending) => {
                        let now = std::time::Instant::now();
                        if let Ok(mut leases) = self.leases.lock() {
                            leases.retain(|id, l| {
                                // Active, or kept (for its first time) while the package waits.
                                l.until > now
                                    || ((now - l.first).as_secs() < MAX_LEASE_S
                                        && pending.iter().any(|p| p.id == *id))
                            });
                        }
                        let leased = |id: &str| {
                            self.leases
                                .lock()
                                .is_ok_and(|l| l.get(id).is_some_and(|l| l.until > now))
                        };
                        for p in pending.into_iter().filter(|p| !leased(&p.id)) {
                            if publisher
                                .try_publish(p.topic, QoS::AtLeastOnce, false, p.payload)
                                .is_ok()
                            {
                                Metrics::add(&self.metrics.knowledge_sent, 1);
                                tracing::info!(package_id = %p.id, "Knowledge package sent.");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "Cannot read the knowledge outbox."),
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(retry) => {}
            }
        }
    }
}
