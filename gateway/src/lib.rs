//! diredi-gateway: the edge daemon. Sensor data arrives over MQTT, is windowed per sensor,
//! classified by the ONNX model in micro-batches and the results are published back.
//!
//! Data flow:
//!
//! ```text
//! MQTT in ─► mqtt (event loop: route only) ─► pipeline (decode threads: decode, window)
//!        ─► batcher (bounded queue, micro-batches) ─► inference (threads: ONNX Runtime)
//!        ─► report::Publisher ─► MQTT out
//! ```
//!
//! | module | role |
//! |---|---|
//! | [`config`] | raw TOML/env configuration → validated [`Config`], reporting every problem |
//! | [`logging`] | journald or terminal output, filter from config or `RUST_LOG` |
//! | [`broker`] | the embedded rumqttd broker |
//! | [`mqtt`] | connections (local link, uplink): event loop, reconnection backoff, routing into the decode queues |
//! | [`pipeline`] | decode threads: payload decoding, per-sensor state, sensor limit |
//! | [`window`] | sans-IO per-sensor windowing and standardisation, timestamp gaps |
//! | [`batcher`] | bounded window queue with drop policy, micro-batching, buffer pool |
//! | [`inference`] | inference threads: classify batches, publish results |
//! | [`model`] | manifest verification, ONNX Runtime loading, the swap point |
//! | [`metrics`] | counters, latency percentiles, RSS; the metrics message |
//! | [`ratelimit`] | sans-IO per-sensor budget for error messages |
//! | [`report`] | the publisher abstraction and the error topic |
//! | [`status`] | retained online/offline status, announcements on connect |
//! | [`homeassistant`] | Home Assistant MQTT discovery configs (sans-IO) |
//! | [`notify`] | systemd READY/WATCHDOG/STOPPING and pipeline health |
//!
//! [`run`] takes the validated configuration and a shutdown token, so tests drive the whole
//! gateway in-process; [`run_with`] also accepts a ready model (a fake classifier in tests).

pub mod batcher;
pub mod broker;
pub mod config;
pub mod homeassistant;
pub mod inbox;
pub mod inference;
pub mod install;
pub mod labels;
pub mod learner;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod notify;
pub mod outbox;
pub mod pipeline;
pub mod priority;
pub mod ratelimit;
pub mod remote;
pub mod report;
pub mod status;
pub mod store;
pub mod window;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use diredi_protocol::messages::{CommandMsg, ErrorMsg, GatewayState};
use diredi_protocol::sensor::DecodeLimits;
use rumqttc::{AsyncClient, EventLoop};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::batcher::{BufferPool, WindowQueue};
use crate::broker::BrokerError;
pub use crate::config::Config;
use crate::inference::{BatchSettings, Worker};
use crate::metrics::{Metrics, QueueLevels};
use crate::model::{LoadedModel, ModelError, ModelHandle};
use crate::mqtt::{Announce, Backoff, Intake, Link, LinkState};
use crate::notify::{ExitGuard, Health, LoopHealth, Notifier, Systemd, ThreadHealth};
use crate::pipeline::{run_shard, unix_ms, SensorRegistry, Shard, ShardLearning, ShardSettings};
use crate::report::{Publisher, Reporter};
use crate::status::{Identity, OutMessage};

/// Why the gateway stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The model could not be loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The embedded broker could not start.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A thread could not be started.
    #[error("cannot start thread {name}: {source}")]
    Thread {
        /// Thread name.
        name: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Part of the pipeline died.
    #[error("pipeline failed: {0}")]
    Pipeline(String),
    /// The exclusive data store cannot be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// A TLS file of `[mqtt]` or `[uplink]` cannot be used.
    #[error("[{section}] TLS: {source}")]
    Tls {
        /// `mqtt` or `uplink`.
        section: &'static str,
        /// What is wrong.
        source: diredi_mqtt::TlsError,
    },
}

/// How [`run_with`] runs.
pub struct RunOptions {
    /// Use this model instead of loading `[model]` (tests, benchmarks).
    pub model: Option<LoadedModel>,
    /// Where READY/WATCHDOG/STOPPING go.
    pub notifier: Arc<dyn Notifier>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            model: None,
            notifier: Arc::new(Systemd),
        }
    }
}

/// Runs the gateway until `shutdown` is cancelled, then drains and stops cleanly.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), GatewayError> {
    run_with(config, RunOptions::default(), shutdown).await
}

struct Connection {
    client: AsyncClient,
    state: Arc<LinkState>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

fn spawn_link(link: Link, client: AsyncClient, eventloop: EventLoop) -> Connection {
    let stop = CancellationToken::new();
    let state = link.state.clone();
    let task = tokio::spawn(link.run(client.clone(), eventloop, stop.clone()));
    Connection {
        client,
        state,
        stop,
        task,
    }
}

fn link_state(cfg: &config::MqttConfig) -> Arc<LinkState> {
    // The loop comes back at least every keep-alive or reconnection delay, plus the
    // connection timeout of rumqttc (5 s).
    let max_silence = cfg.keep_alive.max(cfg.reconnect_max) + Duration::from_secs(15);
    Arc::new(LinkState {
        connected: AtomicBool::new(false),
        ready: watch::channel(false).0,
        health: LoopHealth::new(max_silence),
    })
}

/// Runs the gateway with `options`; see [`run`].
pub async fn run_with(
    config: Config,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let notifier = options.notifier;
    let identity = Identity {
        gateway_id: config.gateway_id.clone(),
        started_at: unix_ms(),
    };
    let topics = config.topics.clone();

    // Model first: without one there is nothing to serve.
    // An installed update (in the state directory) wins over the configured model when newer.
    let state_dir = config.learning.as_ref().map(|l| l.state_dir.clone());
    let (model, model_path) = match options.model {
        Some(m) => (m, None),
        None => {
            notifier.status("Loading the model");
            let (mc, rc, sd) = (
                config.model.clone(),
                config.runtime.clone(),
                state_dir.clone(),
            );
            tokio::task::spawn_blocking(move || {
                let loaded = install::startup_model(&mc, &rc, sd.as_deref());
                if rc.release_startup_pages {
                    memory::release_after("model load");
                }
                loaded
            })
            .await
            .map_err(|e| GatewayError::Pipeline(format!("model loading task failed: {e}")))??
        }
    };
    {
        let s = model.spec();
        tracing::info!(
            model_id = %s.model_id, version = s.version, channels = s.input.channels.len(),
            window = s.input.window, stride = s.input.stride, classes = s.classes.len(),
            provider = model.execution_provider(), key_id = %s.key_id,
            "Model loaded."
        );
    }
    let model: ModelHandle = Arc::new(ArcSwap::from_pointee(model));

    let _broker = match &config.broker {
        Some(b) => Some(broker::start(b)?),
        None => None,
    };

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let data_qos = report::qos(config.mqtt.qos);

    // Local connection: created now so the pipeline can publish through its client.
    let offline = status::status_message(
        &topics.status(),
        &identity,
        GatewayState::Offline,
        Some(&model.load()),
    );
    let tls_error = |section| move |source| GatewayError::Tls { section, source };
    let local_options = mqtt::options(&config.mqtt, &offline).map_err(tls_error("mqtt"))?;
    let mut uplink_options = match &config.uplink {
        Some(u) => Some(mqtt::options(u, &offline).map_err(tls_error("uplink"))?),
        None => None,
    };
    let (client, eventloop) = diredi_mqtt::client(local_options, config.mqtt.request_capacity);
    let publisher: Arc<dyn Publisher> = Arc::new(client.clone());
    let reporter = Reporter::new(publisher.clone(), topics.error(), data_qos, metrics.clone());
    // The inference threads' results: whole batches into the local link, as many messages
    // queued at most as the client's request queue holds.
    let (results, result_batches) =
        mqtt::BatchPublisher::new(client.clone(), config.mqtt.request_capacity);
    let results: Arc<dyn Publisher> = Arc::new(results);

    // Pipeline threads.
    let p = &config.pipeline;
    let queue = Arc::new(WindowQueue::new(p.queue_capacity, p.queue_policy));
    let pool = Arc::new(BufferPool::new(
        p.queue_capacity + config.runtime.workers * config.runtime.max_batch + 64,
    ));
    let registry = Arc::new(SensorRegistry::new(p.max_sensors));
    let intake_open = Arc::new(AtomicBool::new(true));
    let pending = Arc::new(AtomicUsize::new(0));
    let (learning, learner) = match &config.learning {
        Some(l) => {
            let path = l.state_dir.join("exclusive.redb");
            let store = Arc::new(store::ExclusiveStore::open(
                &path,
                l.max_windows,
                l.max_new_classes,
            )?);
            let outbox_path = l.state_dir.join("outbox.redb");
            let outbox = outbox::Outbox::open(&outbox_path, l.max_outbox)
                .map_err(|e| GatewayError::Pipeline(e.to_string()))?;
            tracing::info!(
                path = %path.display(),
                windows = store.len()?,
                outbox_pending = outbox.len().unwrap_or(0),
                "Exclusive data store and knowledge outbox open."
            );
            let learner = Arc::new(
                learner::Learner::new(
                    store.clone(),
                    Arc::new(outbox),
                    model.clone(),
                    topics.clone(),
                    l.adapt.clone(),
                    l.quant.clone(),
                    l.serve_adapted.then(|| diredi_infer::SessionConfig {
                        intra_threads: config.runtime.intra_threads,
                        inter_threads: config.runtime.inter_threads,
                        providers: config.runtime.providers.clone(),
                    }),
                    l.adapt_nice,
                    metrics.clone(),
                )
                .releasing_pages(config.runtime.release_startup_pages),
            );
            (
                Some(ShardLearning {
                    store,
                    recent_windows: l.recent_windows,
                    label_spans: l.label_spans,
                }),
                Some(learner),
            )
        }
        None => (None, None),
    };
    // Commands, receipts and model chunks (a burst when retained chunks are delivered).
    let (control_tx, mut control_rx) = tokio::sync::mpsc::channel::<mqtt::Control>(1024);
    let settings = ShardSettings {
        limits: DecodeLimits {
            max_payload_bytes: p.max_payload_bytes,
            max_samples: p.max_samples_per_message,
        },
        max_gap_periods: p.max_gap_periods,
        errors_per_second: config.errors_per_sensor_per_second,
        discovery_prefix: config.homeassistant.clone(),
        learning,
    };
    let (decoders_done_tx, mut decoders_done) = mpsc::channel::<()>(1);
    let mut inboxes = Vec::with_capacity(p.decode_threads);
    for i in 0..p.decode_threads {
        let inbox = Arc::new(inbox::Inbox::new(p.ingest_capacity));
        inboxes.push(inbox.clone());
        let shard = Shard::new(
            topics.clone(),
            settings.clone(),
            model.clone(),
            registry.clone(),
            queue.clone(),
            pool.clone(),
            reporter.clone(),
            metrics.clone(),
        );
        let name = format!("decode-{i}");
        let th = ThreadHealth::new(name.clone());
        health.add_thread(th.clone());
        let (open, pending, done) = (
            intake_open.clone(),
            pending.clone(),
            decoders_done_tx.clone(),
        );
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let _exit = ExitGuard(th.clone());
                let _done = done;
                run_shard(shard, &inbox, open, pending, th);
            })
            .map_err(|source| GatewayError::Thread { name, source })?;
    }
    drop(decoders_done_tx);

    let (workers_done_tx, mut workers_done) = mpsc::channel::<()>(1);
    let batch = BatchSettings {
        max_batch: config.runtime.max_batch,
        max_wait: config.runtime.max_wait,
        qos: data_qos,
    };
    for i in 0..config.runtime.workers {
        let name = format!("inference-{i}");
        let th = ThreadHealth::new(name.clone());
        health.add_thread(th.clone());
        let worker = Worker::new(
            queue.clone(),
            pool.clone(),
            model.clone(),
            results.clone(),
            metrics.clone(),
            batch,
            th.clone(),
        );
        let done = workers_done_tx.clone();
        let nice = config.runtime.inference_nice;
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let _exit = ExitGuard(th);
                let _done = done;
                crate::priority::set_inference_thread_nice(nice);
                worker.run();
            })
            .map_err(|source| GatewayError::Thread { name, source })?;
    }
    drop(workers_done_tx);

    // Local link.
    let announce: Announce = {
        let (model, identity, topic) = (model.clone(), identity.clone(), topics.status());
        let (prefix, registry) = (config.homeassistant.clone(), registry.clone());
        Arc::new(move || {
            let sensors = registry.ids();
            let discovery = prefix.as_deref().map(|prefix| status::Discovery {
                prefix,
                sensors: &sensors,
            });
            status::announcements(&topic, &identity, &model.load(), discovery)
        })
    };
    let uplink_announce: Announce = {
        let (model, identity, topic) = (model.clone(), identity.clone(), topics.status());
        Arc::new(move || status::announcements(&topic, &identity, &model.load(), None))
    };
    // The cloud's side of the loop (knowledge receipts, models) comes over the uplink when
    // there is one, else over the local broker (the embedded demo).
    let cloud_subs: Vec<(String, rumqttc::QoS)> = [
        topics.knowledge_ack(),
        topics.model(),
        diredi_protocol::topics::FLEET_MODEL.to_owned(),
    ]
    .into_iter()
    .map(|t| (t, rumqttc::QoS::AtLeastOnce))
    .collect();
    let uplink_intake = (config.uplink.is_some() && config.learning.is_some()).then(|| {
        Intake::new(
            topics.clone(),
            inboxes.clone(),
            intake_open.clone(),
            pending.clone(),
            metrics.clone(),
            reporter.clone(),
            config.errors_per_sensor_per_second,
        )
        .with_control(control_tx.clone())
    });
    let state = link_state(&config.mqtt);
    health.add_loop("local", state.health.clone());
    let mut ready = state.ready.subscribe();
    let local = spawn_link(
        Link {
            name: "local",
            subscriptions: {
                let mut subs = vec![(topics.sensor_filter(), data_qos)];
                if config.learning.is_some() {
                    subs.push((topics.label_filter(), rumqttc::QoS::AtLeastOnce));
                    subs.push((topics.command(), rumqttc::QoS::AtLeastOnce));
                    if config.uplink.is_none() {
                        subs.extend(cloud_subs.iter().cloned());
                    }
                }
                subs
            },
            announce,
            reannounce_on: config
                .homeassistant
                .as_deref()
                .map(homeassistant::birth_topic),
            intake: Some(
                Intake::new(
                    topics.clone(),
                    inboxes,
                    intake_open.clone(),
                    pending.clone(),
                    metrics.clone(),
                    reporter.clone(),
                    config.errors_per_sensor_per_second,
                )
                .with_control(control_tx),
            ),
            backoff: Backoff::new(config.mqtt.reconnect_min, config.mqtt.reconnect_max),
            state: state.clone(),
            batches: Some(result_batches),
        },
        client,
        eventloop,
    );

    // Uplink: the status, and with learning the knowledge out and the models in.
    let uplink = config
        .uplink
        .as_ref()
        .zip(uplink_options.take())
        .map(|(u, options)| {
            let (client, eventloop) = diredi_mqtt::client(options, u.request_capacity);
            let state = link_state(u);
            health.add_loop("uplink", state.health.clone());
            if config.runtime.release_startup_pages {
                // Once the uplink's first connection has resolved its host (which may load
                // name-service libraries), give back the pages its start-up ran.
                let mut connected = state.ready.subscribe();
                tokio::spawn(async move {
                    if connected.wait_for(|r| *r).await.is_ok() {
                        tokio::task::spawn_blocking(|| memory::release_after("uplink connected"));
                    }
                });
            }
            spawn_link(
                Link {
                    name: "uplink",
                    subscriptions: if uplink_intake.is_some() {
                        cloud_subs.clone()
                    } else {
                        Vec::new()
                    },
                    announce: uplink_announce.clone(),
                    reannounce_on: None,
                    intake: uplink_intake,
                    backoff: Backoff::new(u.reconnect_min, u.reconnect_max),
                    state,
                    batches: None,
                },
                client,
                eventloop,
            )
        });

    let tasks_stop = CancellationToken::new();
    // Commands and the cloud's receipts; the knowledge outbox's sender.
    let mut learner_tasks = Vec::new();
    if let (Some(learner), Some(state_dir)) = (&learner, &state_dir) {
        let (l, reporter, stop) = (learner.clone(), reporter.clone(), tasks_stop.clone());
        // The link the cloud talks to: the uplink when configured.
        let (cloud_client, cloud_state) = match &uplink {
            Some(u) => (u.client.clone(), u.state.clone()),
            None => (local.client.clone(), state.clone()),
        };
        let cloud_publisher: Arc<dyn Publisher> = Arc::new(cloud_client.clone());
        let mut installer = install::Installer::new(
            topics.clone(),
            identity.clone(),
            cloud_client,
            model.clone(),
            config.model.clone(),
            config.runtime.clone(),
            state_dir,
            model_path.clone(),
        );
        if uplink.is_some() {
            // Models come over the uplink; local monitoring sees the install in its status too.
            installer = installer.with_status_also_on(local.client.clone());
        }
        let command_topic = topics.command();
        // The policy trigger: adapt by itself after N newly labelled windows.
        let policy = config.learning.as_ref().map_or(0, |l| l.adapt_after_labels);
        let counters = metrics.clone();
        learner_tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut labelled_at_last = 0u64;
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = control_rx.recv() => m,
                    _ = tick.tick(), if policy > 0 => {
                        let labelled = counters.labelled_windows.load(Ordering::Relaxed);
                        if labelled >= labelled_at_last + policy && !l.is_busy() {
                            labelled_at_last = labelled;
                            tracing::info!(labelled, "Adapting: enough new labels ([learning] adapt_after_labels).");
                            l.on_command(br#"{"cmd":"adapt"}"#, &reporter);
                        }
                        continue;
                    }
                };
                match msg {
                    Some(mqtt::Control::Command(p)) => match CommandMsg::parse(&p) {
                        Ok(CommandMsg::Rollback { .. }) => {
                            if let Err(e) = installer.rollback().await {
                                reporter.reject(
                                    ratelimit::Verdict::Send {
                                        suppressed_before: 0,
                                    },
                                    ErrorMsg {
                                        topic: command_topic.clone(),
                                        sensor: None,
                                        reason: format!("rollback: {e}"),
                                        kind: metrics::kinds::BAD_COMMAND.to_owned(),
                                        ts: unix_ms(),
                                    },
                                );
                            }
                        }
                        _ => l.on_command(&p, &reporter),
                    },
                    Some(mqtt::Control::KnowledgeAck(p)) => l.on_ack(&p),
                    Some(mqtt::Control::Model { topic, payload }) => {
                        installer.on_message(&topic, &payload).await
                    }
                    None => return,
                }
            }
        }));
        learner_tasks.push(tokio::spawn(
            learner.clone().run_sender(
                cloud_publisher,
                cloud_state,
                config
                    .learning
                    .as_ref()
                    .map_or(Duration::from_secs(15), |l| l.knowledge_retry),
                tasks_stop.clone(),
            ),
        ));
    }
    if let Some(interval) = config.metrics_interval {
        // Awaited at shutdown with the learner's tasks: it holds the learner too.
        learner_tasks.push(tokio::spawn(metrics_task(
            publisher.clone(),
            topics.metrics(),
            data_qos,
            metrics.clone(),
            queue.clone(),
            pending.clone(),
            learner.clone(),
            interval,
            tasks_stop.clone(),
        )));
    }
    tokio::spawn(notify::watchdog(
        notifier.clone(),
        health.clone(),
        tasks_stop.clone(),
    ));

    notifier.status("Connecting to the broker");
    let mut is_ready = false;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    let outcome = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            r = ready.wait_for(|r| *r), if !is_ready => {
                if r.is_ok() {
                    is_ready = true;
                    notifier.ready();
                    notifier.status("Serving");
                    if config.runtime.release_startup_pages {
                        tokio::task::spawn_blocking(|| memory::release_after("start-up"));
                    }
                    tracing::info!(gateway_id = %identity.gateway_id, topic = %topics.sensor_filter(), "Ready.");
                }
            }
            _ = check.tick() => {
                let stopped = health.stopped();
                if !stopped.is_empty() {
                    let what = stopped.join("; ");
                    tracing::error!(problems = %what, "Pipeline failed; stopping.");
                    break Err(GatewayError::Pipeline(what));
                }
            }
        }
    };

    // Shutdown: stop intake, drain queued windows (their results are published), announce
    // offline, disconnect.
    notifier.stopping();
    notifier.status("Stopping");
    tracing::info!(
        queued = queue.len(),
        "Shutting down; draining queued windows."
    );
    intake_open.store(false, Ordering::Release);
    let drain = async {
        while decoders_done.recv().await.is_some() {}
        queue.close();
        while workers_done.recv().await.is_some() {}
    };
    if tokio::time::timeout(config.runtime.drain_timeout, drain)
        .await
        .is_err()
    {
        queue.close();
        tracing::warn!(
            abandoned = queue.len(),
            "Drain timed out; abandoning queued windows."
        );
    }
    let offline = status::status_message(
        &topics.status(),
        &identity,
        GatewayState::Offline,
        Some(&model.load()),
    );
    let mut connections = vec![local];
    connections.extend(uplink);
    for c in connections.iter_mut() {
        close(c, &offline).await;
    }
    tasks_stop.cancel();
    // The store and the outbox close when the last task holding them ends.
    for t in learner_tasks {
        let _ = t.await;
    }
    if let Some(l) = &learner {
        l.wait_idle(Duration::from_secs(30)).await;
    }
    let m = metrics.snapshot(unix_ms(), QueueLevels::default());
    tracing::info!(
        messages_in = m.base.messages_in,
        windows_inferred = m.base.windows_inferred,
        inputs_rejected = m.base.inputs_rejected,
        "Stopped."
    );
    outcome
}

/// Publishes the offline status and disconnects, or gives up after about 1.5 s.
async fn close(c: &mut Connection, offline: &OutMessage) {
    const STEP: Duration = Duration::from_millis(500);
    if c.state.connected.load(Ordering::Acquire) {
        let publish = c.client.publish(
            offline.topic.clone(),
            offline.qos,
            offline.retain,
            offline.payload.clone(),
        );
        let sent = matches!(tokio::time::timeout(STEP, publish).await, Ok(Ok(())))
            && matches!(
                tokio::time::timeout(STEP, c.client.disconnect()).await,
                Ok(Ok(()))
            );
        if sent && tokio::time::timeout(STEP * 2, &mut c.task).await.is_ok() {
            return;
        }
    }
    c.stop.cancel();
    let _ = (&mut c.task).await;
}

#[allow(clippy::too_many_arguments)]
async fn metrics_task(
    publisher: Arc<dyn Publisher>,
    topic: String,
    qos: rumqttc::QoS,
    metrics: Arc<Metrics>,
    queue: Arc<WindowQueue>,
    pending: Arc<AtomicUsize>,
    learner: Option<Arc<learner::Learner>>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snapshot = metrics.snapshot(
            unix_ms(),
            QueueLevels {
                inference_depth: queue.len(),
                inference_capacity: queue.capacity(),
                ingest_depth: pending.load(Ordering::Relaxed),
                outbox_pending: learner.as_ref().map_or(0, |l| l.outbox_pending()),
            },
        );
        match serde_json::to_vec(&snapshot) {
            Ok(payload) => {
                if publisher
                    .try_publish(topic.clone(), qos, false, payload)
                    .is_err()
                {
                    Metrics::add(&metrics.publish_dropped, 1);
                }
            }
            Err(e) => tracing::warn!(error = %e, "Cannot serialise metrics."),
        }
    }
}
