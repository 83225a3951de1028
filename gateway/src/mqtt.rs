//! MQTT connections: the local link (sensors in, results out) and the uplink to the cloud.
//!
//! Data flow: **MQTT in → route** → decode → ... → publish → **MQTT out**. One task per
//! connection drives the rumqttc event loop and does nothing else: incoming sensor messages are
//! routed ([`Intake::route`], no decoding) into the bounded [`Inbox`]es of the decode threads,
//! which never block, so a slow pipeline can never stall the connection. A decode thread is
//! woken once per burst of messages ([`Intake::flush`], when rumqttc has no further event
//! buffered), not once per message. The inference threads' QoS 0 results go to the local
//! link a batch at a time ([`BatchPublisher`]), which writes each batch into the connection
//! and flushes it once. Everything else publishes through the cloneable
//! [`rumqttc::AsyncClient`].
//!
//! Protocol: MQTT 3.1.1. rumqttd serves one protocol version per listener and sensor firmware
//! speaks 3.1.1, so the embedded broker has a 3.1.1 listener and the gateway uses the same
//! listener; retained messages, last will and QoS 1 are all the gateway needs. Mosquitto serves
//! 3.1.1 too.
//!
//! Sessions are clean: after every CONNACK the link re-subscribes and re-announces its status
//! (which the last will may have flipped to `offline`). A lost connection is retried with an
//! exponential [`Backoff`] (doubling from `reconnect_min_ms` to `reconnect_max_ms`, reset once
//! connected); messages queued in the client while disconnected are dropped by rumqttc when the
//! new session starts. Result batches queued meanwhile (up to `request_capacity` messages;
//! beyond that they are dropped and counted) are written once connected again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diredi_protocol::messages::ErrorMsg;
use diredi_protocol::topics::{Route, Topics};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::inbox::Inbox;
use crate::metrics::{kinds, Metrics};
use crate::notify::LoopHealth;
use crate::pipeline::{shard_of, unix_ms, Ingest, IngestKind};
use crate::ratelimit::KeyedLimiter;
use crate::report::{PublishError, Publisher, Reporter};
use crate::status::OutMessage;

/// Exponential reconnection delay. Sans-IO.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays from `min` doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay before the next attempt; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the shortest delay (after a successful connection).
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// rumqttc options for `cfg` with `will` as last will; reads the TLS files when TLS is on.
pub fn options(cfg: &MqttConfig, will: &OutMessage) -> Result<MqttOptions, diredi_mqtt::TlsError> {
    let mut o = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
    o.set_keep_alive(cfg.keep_alive);
    o.set_clean_session(true);
    o.set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes);
    o.set_last_will(LastWill::new(
        will.topic.clone(),
        will.payload.clone(),
        will.qos,
        will.retain,
    ));
    if let Some((user, pass)) = &cfg.credentials {
        o.set_credentials(user, pass);
    }
    cfg.tls.apply(&mut o)?;
    Ok(o)
}

/// Messages for the gateway's control task (commands, the cloud's receipts).
#[derive(Debug)]
pub enum Control {
    /// A payload on `command`.
    Command(Vec<u8>),
    /// A payload on `knowledge/ack`.
    KnowledgeAck(Vec<u8>),
    /// A model announcement or chunk (`model`, `fleet/model`, `.../model/chunk/...`).
    Model {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Vec<u8>,
    },
}

/// Routes sensor messages from the event loop to the decode threads.
pub struct Intake {
    control: Option<tokio::sync::mpsc::Sender<Control>>,
    topics: Topics,
    shards: Vec<Arc<Inbox>>,
    /// Shards given a message since the last [`Intake::flush`].
    unflushed: Vec<bool>,
    open: Arc<AtomicBool>,
    pending: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    reporter: Reporter,
    bad_ids: KeyedLimiter,
}

impl Intake {
    /// Intake feeding `shards`; stops forwarding once `open` is false.
    pub fn new(
        topics: Topics,
        shards: Vec<Arc<Inbox>>,
        open: Arc<AtomicBool>,
        pending: Arc<AtomicUsize>,
        metrics: Arc<Metrics>,
        reporter: Reporter,
        errors_per_second: u32,
    ) -> Self {
        Intake {
            control: None,
            topics,
            unflushed: vec![false; shards.len()],
            shards,
            open,
            pending,
            metrics,
            reporter,
            bad_ids: KeyedLimiter::new(errors_per_second, 64),
        }
    }

    /// Also routes commands and knowledge receipts, to `tx` (bounded; a full channel drops
    /// the message with a warning).
    pub fn with_control(mut self, tx: tokio::sync::mpsc::Sender<Control>) -> Self {
        self.control = Some(tx);
        self
    }

    /// Routes one received message. Never blocks: a full decode queue drops the message and
    /// counts it (`ingest_dropped`). The decode thread sees it after the next [`Self::flush`].
    pub fn route(&mut self, publish: rumqttc::Publish) {
        let (id_start, shard, kind) = match self.topics.route(&publish.topic) {
            Route::Sensor(id) => (
                publish.topic.len() - id.len(),
                shard_of(id, self.shards.len()),
                IngestKind::Samples,
            ),
            // A label goes to the decode thread of its sensor, which holds its windows.
            Route::Label(id) => (
                publish.topic.len() - id.len(),
                shard_of(id, self.shards.len()),
                IngestKind::Label,
            ),
            Route::InvalidId { id, error } => {
                let verdict = self.bad_ids.check(&publish.topic, Instant::now());
                let msg = ErrorMsg {
                    topic: publish.topic.clone(),
                    sensor: Some(id.to_owned()),
                    reason: format!("invalid sensor id {id:?}: {error}"),
                    kind: kinds::INVALID_SENSOR_ID.to_owned(),
                    ts: unix_ms(),
                };
                self.reporter.reject(verdict, msg);
                return;
            }
            r @ (Route::Command
            | Route::KnowledgeAck
            | Route::Model
            | Route::FleetModel
            | Route::ModelChunk)
                if self.control.is_some() =>
            {
                let payload = publish.payload.to_vec();
                let msg = match r {
                    Route::Command => Control::Command(payload),
                    Route::KnowledgeAck => Control::KnowledgeAck(payload),
                    _ => Control::Model {
                        topic: publish.topic.clone(),
                        payload,
                    },
                };
                if let Some(tx) = &self.control {
                    if tx.try_send(msg).is_err() {
                        tracing::warn!(topic = %publish.topic, "Control queue full; message dropped.");
                    }
                }
                return;
            }
            _ => {
                Metrics::add(&self.metrics.messages_ignored, 1);
                tracing::debug!(topic = %publish.topic, "Ignoring message on a topic the gateway does not handle.");
                return;
            }
        };
        Metrics::add(&self.metrics.messages_in, 1);
        if !self.open.load(Ordering::Acquire) {
            return;
        }
        let Some(inbox) = self.shards.get(shard) else {
            return;
        };
        self.pending.fetch_add(1, Ordering::Relaxed);
        let msg = Ingest {
            publish,
            id_start,
            kind,
        };
        if inbox.push(msg).is_err() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            Metrics::add(&self.metrics.ingest_dropped, 1);
        } else if let Some(u) = self.unflushed.get_mut(shard) {
            *u = true;
        }
    }

    /// Wakes the decode threads given messages since the last flush.
    pub fn flush(&mut self) {
        for (inbox, unflushed) in self.shards.iter().zip(self.unflushed.iter_mut()) {
            if std::mem::take(unflushed) {
                inbox.flush();
            }
        }
    }
}

/// Shared state of a link.
#[derive(Debug)]
pub struct LinkState {
    /// Currently connected.
    pub connected: AtomicBool,
    /// Becomes true once the first subscription is acknowledged (or, for a link without
    /// subscriptions, once connected).
    pub ready: watch::Sender<bool>,
    /// Event loop liveness.
    pub health: Arc<LoopHealth>,
}

/// Produces the messages to publish after each CONNACK (current status etc.).
pub type Announce = Arc<dyn Fn() -> Vec<OutMessage> + Send + Sync>;

/// One MQTT connection's event loop.
pub struct Link {
    /// `local` or `uplink`, for logs.
    pub name: &'static str,
    /// Filters to subscribe after each CONNACK.
    pub subscriptions: Vec<(String, QoS)>,
    /// Messages to publish after each CONNACK.
    pub announce: Announce,
    /// A topic on which the payload `online` asks for the announcements again (Home
    /// Assistant's birth message); subscribed with the other filters.
    pub reannounce_on: Option<String>,
    /// Where received messages go; `None` ignores them.
    pub intake: Option<Intake>,
    /// Reconnection delays.
    pub backoff: Backoff,
    /// Shared state.
    pub state: Arc<LinkState>,
    /// Batches of QoS 0 messages from a [`BatchPublisher`], each written and flushed whole.
    pub batches: Option<BatchReceiver>,
}

/// A publisher whose QoS 0 batches (the results of one inference batch) bypass rumqttc's
/// request queue: the link writes a whole batch into its connection's buffer and flushes it
/// in a few writes (one per 8 KiB), instead of one write per message (rumqttc 0.25 flushes
/// after every request, bytebeamio/rumqtt#810). Everything else goes through the client as
/// usual.
#[derive(Clone)]
pub struct BatchPublisher {
    client: AsyncClient,
    batches: tokio::sync::mpsc::UnboundedSender<Vec<rumqttc::Publish>>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

/// The link's end of a [`BatchPublisher`].
pub struct BatchReceiver {
    rx: tokio::sync::mpsc::UnboundedReceiver<Vec<rumqttc::Publish>>,
    queued: Arc<AtomicUsize>,
}

impl BatchReceiver {
    /// The next batch; `None` once every publisher is gone.
    async fn recv(&mut self) -> Option<Vec<rumqttc::Publish>> {
        let batch = self.rx.recv().await?;
        self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        Some(batch)
    }
}

impl BatchPublisher {
    /// A publisher over `client` and the receiver for its [`Link::batches`], holding at most
    /// `capacity` messages (a batch that does not fit is dropped, and the caller counts it).
    pub fn new(client: AsyncClient, capacity: usize) -> (Self, BatchReceiver) {
        let (batches, rx) = tokio::sync::mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let publisher = BatchPublisher {
            client,
            batches,
            queued: queued.clone(),
            capacity: capacity.max(1),
        };
        (publisher, BatchReceiver { rx, queued })
    }
}

impl Publisher for BatchPublisher {
    fn try_publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), PublishError> {
        Publisher::try_publish(&self.client, topic, qos, retain, payload)
    }

    fn try_publish_batch(&self, qos: QoS, batch: Vec<(String, Vec<u8>)>) -> usize {
        let n = batch.len();
        if qos != QoS::AtMostOnce {
            // Packet ids and acknowledgements stay with rumqttc's own flow control.
            return Publisher::try_publish_batch(&self.client, qos, batch);
        }
        let reserved = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + n <= self.capacity).then_some(q + n)
            })
            .is_ok();
        if !reserved {
            return n;
        }
        let publishes = batch
            .into_iter()
            .map(|(topic, payload)| rumqttc::Publish::new(topic, qos, payload))
            .collect();
        match self.batches.send(publishes) {
            Ok(()) => 0,
            Err(_) => {
                self.queued.fetch_sub(n, Ordering::AcqRel);
                n
            }
        }
    }
}

/// Writes `batch` into the connection of `eventloop` and flushes. rumqttc's state sees every
/// message (as if it came through the client), so its keep-alive and events stay right.
/// `Err` when the connection failed; the caller bounds the time it may take.
async fn write_batch(
    eventloop: &mut EventLoop,
    batch: Vec<rumqttc::Publish>,
) -> Result<(), ConnectionError> {
    let Some(network) = eventloop.network.as_mut() else {
        return Err(std::io::Error::from(std::io::ErrorKind::NotConnected).into());
    };
    for publish in batch {
        if let Some(packet) = eventloop
            .state
            .handle_outgoing_packet(rumqttc::Request::Publish(publish))?
        {
            network.write(packet).await?;
        }
    }
    Ok(network.flush().await?)
}

impl Link {
    /// Runs the event loop until the client disconnects cleanly or `stop` is cancelled.
    pub async fn run(
        mut self,
        client: AsyncClient,
        mut eventloop: EventLoop,
        stop: CancellationToken,
    ) {
        let addr = {
            let (host, port) = eventloop.mqtt_options.broker_address();
            format!("{host}:{port}")
        };
        let mut failures: u64 = 0;
        let mut ever_connected = false;
        // rumqttc's own bound on a flush.
        let write_timeout = Duration::from_secs(eventloop.network_options().connection_timeout());
        loop {
            // Once rumqttc has handed out every buffered event (the messages of the last socket
            // read, the previous batch's results), just before this task may wait: wake the
            // decode threads, and take the next batch (so a backlog of results never holds
            // reads back).
            let drained = eventloop.state.events.is_empty();
            if drained {
                if let Some(intake) = self.intake.as_mut() {
                    intake.flush();
                }
            }
            let take_batch = drained && self.state.connected.load(Ordering::Acquire);
            let event = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                // Taking a batch drops the pending poll. That is safe here: every batch write
                // ends with a complete flush (or a failed connection, which is cleaned), so
                // rumqttc's buffer is empty whenever poll runs and its own writes (a request,
                // a ping, acknowledgements: under 8 KiB) never wait; its reads and flushes
                // keep their data when dropped.
                Some(batch) = next_batch(&mut self.batches), if take_batch => {
                    let written = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        w = tokio::time::timeout(write_timeout, write_batch(&mut eventloop, batch)) => {
                            w.unwrap_or(Err(ConnectionError::FlushTimeout))
                        }
                    };
                    match written {
                        Ok(()) => {
                            self.state.health.beat();
                            continue;
                        }
                        // Handled below like a failed poll: reconnect after the backoff.
                        Err(e) => {
                            eventloop.clean();
                            Err(e)
                        }
                    }
                }
                ev = eventloop.poll() => ev,
            };
            self.state.health.beat();
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if self.reannounce_on.as_deref() == Some(p.topic.as_str()) {
                        if p.payload.as_ref() == b"online" {
                            tracing::debug!(link = self.name, topic = %p.topic, "Announcing again on request.");
                            spawn_announce(
                                client.clone(),
                                Vec::new(),
                                self.announce.clone(),
                                self.name,
                            );
                        }
                    } else if let Some(intake) = self.intake.as_mut() {
                        intake.route(p);
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    self.backoff.reset();
                    self.state.connected.store(true, Ordering::Release);
                    if ever_connected {
                        tracing::info!(link = self.name, broker = %addr, after_failures = failures, "Reconnected to the broker.");
                    } else {
                        tracing::info!(link = self.name, broker = %addr, "Connected to the broker.");
                    }
                    ever_connected = true;
                    failures = 0;
                    if self.subscriptions.is_empty() {
                        self.state.ready.send_replace(true);
                    }
                    let mut subs = self.subscriptions.clone();
                    if let Some(t) = &self.reannounce_on {
                        subs.push((t.clone(), QoS::AtLeastOnce));
                    }
                    spawn_announce(client.clone(), subs, self.announce.clone(), self.name);
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    if refused {
                        tracing::error!(link = self.name, "The broker refused the subscription; no sensor data will arrive. Check the broker's ACL.");
                    } else {
                        self.state.ready.send_replace(true);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    tracing::debug!(link = self.name, "Disconnected cleanly.");
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    let was_connected = self.state.connected.swap(false, Ordering::AcqRel);
                    failures += 1;
                    let delay = self.backoff.next_delay();
                    if was_connected {
                        tracing::warn!(link = self.name, broker = %addr, error = %e, "Lost the broker connection; reconnecting.");
                    } else if failures == 3 || (failures > 3 && failures.is_power_of_two()) {
                        tracing::warn!(link = self.name, broker = %addr, error = %e, failures, retry_in = ?delay, "Cannot connect to the broker; retrying.");
                    } else {
                        tracing::debug!(link = self.name, broker = %addr, error = %e, failures, retry_in = ?delay, "Connection attempt failed.");
                    }
                    let sleep = tokio::time::sleep(delay);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = &mut sleep => break,
                            // Keep the liveness beat going during long delays.
                            _ = tokio::time::sleep(Duration::from_secs(1)) => self.state.health.beat(),
                        }
                    }
                    if stop.is_cancelled() {
                        break;
                    }
                }
            }
        }
        self.state.connected.store(false, Ordering::Release);
        self.state.health.finish();
    }
}

/// The next batch, or never when there is no batch channel.
async fn next_batch(batches: &mut Option<BatchReceiver>) -> Option<Vec<rumqttc::Publish>> {
    match batches {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Subscribes `subs`, then publishes the announcements. Through the client queue, which the
/// event loop drains, so it runs in its own task.
fn spawn_announce(
    client: AsyncClient,
    subs: Vec<(String, QoS)>,
    announce: Announce,
    name: &'static str,
) {
    tokio::spawn(async move {
        if !subs.is_empty() {
            let filters = subs
                .into_iter()
                .map(|(f, q)| rumqttc::SubscribeFilter::new(f, q));
            if let Err(e) = client.subscribe_many(filters).await {
                tracing::warn!(link = name, error = %e, "Cannot subscribe.");
            }
        }
        for m in announce() {
            if let Err(e) = client.publish(m.topic, m.qos, m.retain, m.payload).await {
                tracing::warn!(link = name, error = %e, "Cannot publish an announcement.");
            }
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::report::tests::Recorder;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    fn intake(
        capacity: usize,
    ) -> (
        Intake,
        Arc<Inbox>,
        Arc<Recorder>,
        Arc<Metrics>,
        Arc<AtomicBool>,
    ) {
        let inbox = Arc::new(Inbox::new(capacity));
        let metrics = Arc::new(Metrics::new());
        let rec = Arc::new(Recorder::default());
        let topics = Topics::new("gw").unwrap();
        let reporter = Reporter::new(
            rec.clone(),
            topics.error(),
            QoS::AtMostOnce,
            metrics.clone(),
        );
        let open = Arc::new(AtomicBool::new(true));
        let i = Intake::new(
            topics,
            vec![inbox.clone()],
            open.clone(),
            Arc::new(AtomicUsize::new(0)),
            metrics.clone(),
            reporter,
            1,
        );
        (i, inbox, rec, metrics, open)
    }

    fn taken(inbox: &Inbox) -> Vec<Ingest> {
        let mut out = Vec::new();
        inbox.take(&mut out, Duration::ZERO);
        out
    }

    fn publish(topic: &str) -> rumqttc::Publish {
        rumqttc::Publish::new(topic, QoS::AtMostOnce, b"{}".to_vec())
    }

    #[test]
    fn sensor_messages_are_forwarded_with_their_id_and_overflow_is_counted() {
        let (mut i, inbox, _, metrics, _) = intake(1);
        i.route(publish("diredi/v1/gw/sensor/imu-7"));
        i.route(publish("diredi/v1/gw/sensor/imu-8"));
        let got = taken(&inbox);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].sensor_id(), "imu-7");
        assert_eq!(metrics.ingest_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.messages_in.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn invalid_sensor_ids_are_reported_and_other_topics_ignored() {
        let (mut i, inbox, rec, metrics, _) = intake(4);
        i.route(publish("diredi/v1/gw/sensor/"));
        i.route(publish("diredi/v1/gw/status"));
        i.route(publish("diredi/v1/other/sensor/x"));
        assert!(inbox.is_empty());
        let errors = rec.on("/error");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0]["kind"], "invalid_sensor_id");
        assert_eq!(metrics.messages_ignored.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn closed_intake_forwards_nothing() {
        let (mut i, inbox, _, _, open) = intake(4);
        open.store(false, Ordering::Release);
        i.route(publish("diredi/v1/gw/sensor/a"));
        assert!(inbox.is_empty());
    }

    fn batch(topics: &[&str]) -> Vec<(String, Vec<u8>)> {
        topics
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).to_owned(), format!("{i}").into_bytes()))
            .collect()
    }

    /// QoS 0 batches go whole to the link's channel; a full channel drops (and reports) the
    /// batch; other QoS go through the client, not the channel.
    #[tokio::test]
    async fn qos0_batches_go_whole_to_the_link_and_a_full_queue_drops_them() {
        let (client, _eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 16);
        let (publisher, mut rx) = BatchPublisher::new(client, 4);
        assert_eq!(
            publisher.try_publish_batch(QoS::AtMostOnce, batch(&["a/1", "a/2", "a/3"])),
            0
        );
        assert_eq!(
            publisher.try_publish_batch(QoS::AtMostOnce, batch(&["b/1", "b/2"])),
            2,
            "4 messages at most are queued"
        );
        assert_eq!(
            publisher.try_publish_batch(QoS::AtMostOnce, batch(&["b/3"])),
            0,
            "one more still fits"
        );
        let got = rx.recv().await.unwrap();
        let topics: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
        assert_eq!(topics, ["a/1", "a/2", "a/3"]);
        assert!(got.iter().all(|p| p.qos == QoS::AtMostOnce && !p.retain));
        assert_eq!(&got[2].payload[..], b"2");
        assert_eq!(rx.recv().await.unwrap().len(), 1);
        assert_eq!(
            publisher.try_publish_batch(QoS::AtMostOnce, batch(&["d/1", "d/2", "d/3", "d/4"])),
            0,
            "taking batches frees their room"
        );
        assert_eq!(
            publisher.try_publish_batch(QoS::AtLeastOnce, batch(&["c/1"])),
            0
        );
        assert_eq!(rx.recv().await.unwrap().len(), 4);
        assert!(rx.rx.try_recv().is_err(), "QoS 1 stays with rumqttc");
    }

    /// A link with no subscriptions or announcements that writes `batches`, reconnecting
    /// after `backoff`.
    fn batch_link(batches: BatchReceiver, backoff: Duration) -> (Link, Arc<LinkState>) {
        let state = Arc::new(LinkState {
            connected: AtomicBool::new(false),
            ready: watch::channel(false).0,
            health: LoopHealth::new(Duration::from_secs(60)),
        });
        let link = Link {
            name: "test",
            subscriptions: Vec::new(),
            announce: Arc::new(Vec::new),
            reannounce_on: None,
            intake: None,
            backoff: Backoff::new(backoff, backoff),
            state: state.clone(),
            batches: Some(batches),
        };
        (link, state)
    }

    /// A link writes its batches into a real broker connection: a subscriber gets every
    /// message, in order, next to what goes through the client.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_writes_result_batches_to_the_broker_in_order() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let _broker = crate::broker::start(&crate::config::BrokerConfig {
            config_file: None,
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
        })
        .unwrap();
        // The subscriber.
        let (sub, mut sub_loop) =
            diredi_mqtt::client(MqttOptions::new("sub", "127.0.0.1", port), 16);
        sub.subscribe("r/#", QoS::AtMostOnce).await.unwrap();
        let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            while let Ok(ev) = sub_loop.poll().await {
                match ev {
                    Event::Incoming(Packet::SubAck(_)) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        let _ = got_tx.send((p.topic, p.payload.to_vec()));
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed)
            .await
            .unwrap()
            .unwrap();
        // The link.
        let (client, eventloop) =
            diredi_mqtt::client(MqttOptions::new("gw", "127.0.0.1", port), 16);
        let (publisher, batches) = BatchPublisher::new(client.clone(), 64);
        let (link, state) = batch_link(batches, Duration::from_millis(50));
        let mut ready = state.ready.subscribe();
        let stop = CancellationToken::new();
        let task = tokio::spawn(link.run(client.clone(), eventloop, stop.clone()));
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
            .await
            .unwrap()
            .unwrap();
        let topics: Vec<String> = (0..40).map(|i| format!("r/{i}")).collect();
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        assert_eq!(
            publisher.try_publish_batch(QoS::AtMostOnce, batch(&refs[..20])),
            0
        );
        Publisher::try_publish(
            &publisher,
            "r/client".into(),
            QoS::AtMostOnce,
            false,
            b"c".to_vec(),
        )
        .unwrap();
        assert_eq!(
            publisher.try_publish_batch(QoS::AtMostOnce, batch(&refs[20..])),
            0
        );
        let mut received = Vec::new();
        while received.len() < 41 {
            let m = tokio::time::timeout(Duration::from_secs(10), got.recv())
                .await
                .expect("every message arrives")
                .unwrap();
            received.push(m);
        }
        let batched: Vec<&(String, Vec<u8>)> =
            received.iter().filter(|(t, _)| t != "r/client").collect();
        let want: Vec<(String, Vec<u8>)> = batch(&refs[..20])
            .into_iter()
            .chain(batch(&refs[20..]))
            .collect();
        assert_eq!(batched.len(), 40);
        for (got, want) in batched.iter().zip(&want) {
            assert_eq!(*got, want);
        }
        assert!(received.iter().any(|(t, p)| t == "r/client" && p == b"c"));
        stop.cancel();
        task.await.unwrap();
    }

    /// A broker that stops reading: a blocked batch write gives up after rumqttc's connection
    /// timeout and the link reconnects (after its backoff); a stop ends a blocked write at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_batch_write_times_out_into_a_reconnect_and_yields_to_stop() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts connections, answers CONNECT with CONNACK, then never reads again.
        let (conn_tx, mut connections) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut connect = [0u8; 256];
                let _ = stream.read(&mut connect);
                let _ = stream.write_all(&[0x20, 0x02, 0x00, 0x00]);
                held.push(stream);
                if conn_tx.send(()).is_err() {
                    return;
                }
            }
        });
        let (client, mut eventloop) =
            diredi_mqtt::client(MqttOptions::new("gw", "127.0.0.1", port), 16);
        eventloop.network_options.set_connection_timeout(1);
        let (publisher, batches) = BatchPublisher::new(client.clone(), 1 << 16);
        let (link, state) = batch_link(batches, Duration::from_millis(200));
        let stop = CancellationToken::new();
        let task = tokio::spawn(link.run(client.clone(), eventloop, stop.clone()));
        let ten_s = Duration::from_secs(10);
        tokio::time::timeout(ten_s, connections.recv())
            .await
            .unwrap()
            .unwrap();
        while !state.connected.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Far more than the socket buffers hold (32 MiB in messages under rumqttc's 10 KiB
        // packet limit): the write blocks.
        let big = vec![0u8; 8 * 1024];
        let sent = Instant::now();
        for _ in 0..128 {
            let batch = (0..32).map(|i| (format!("r/{i}"), big.clone())).collect();
            assert_eq!(publisher.try_publish_batch(QoS::AtMostOnce, batch), 0);
        }
        // After the 1 s timeout and the 200 ms backoff, the link connects again.
        tokio::time::timeout(ten_s, connections.recv())
            .await
            .expect("the link reconnects")
            .unwrap();
        assert!(
            sent.elapsed() >= Duration::from_millis(1100),
            "reconnected after {:?}: not the write timeout",
            sent.elapsed()
        );
        // Blocked again on the new connection (the queued batches are written there):
        // a stop ends the write now, not after the timeout.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished());
        let t = Instant::now();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }

    /// Routing queues without waking; the flush wakes the decode thread blocked on the inbox.
    #[test]
    fn routed_messages_wake_the_decode_thread_at_the_flush() {
        let (mut i, inbox, _, _, _) = intake(16);
        let reader = {
            let inbox = inbox.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                inbox.take(&mut out, Duration::from_secs(10));
                out.iter()
                    .map(|m| m.sensor_id().to_owned())
                    .collect::<Vec<_>>()
            })
        };
        // Let the reader block on the empty inbox first.
        while !inbox.is_waiting() {
            std::thread::sleep(Duration::from_millis(1));
        }
        for id in ["a", "b", "c"] {
            i.route(publish(&format!("diredi/v1/gw/sensor/{id}")));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !reader.is_finished(),
            "routing alone does not wake the reader"
        );
        i.flush();
        assert_eq!(reader.join().unwrap(), ["a", "b", "c"]);
    }
}
