//! Decode threads: sensor messages → decoded samples → per-sensor windows → inference queue.
//!
//! Data flow: MQTT in → route (event loop) → **decode → window** → queue → micro-batch → infer.
//! The event loop hands each sensor message to one decode thread chosen by a hash of the
//! sensor id ([`shard_of`]), so a sensor's state lives in one thread and needs no lock. A
//! [`Shard`] owns those sensors; [`Shard::handle`] is the whole per-message path and is tested
//! without threads or MQTT.
//!
//! Sensors are created on their first *valid* message, up to `[pipeline] max_sensors` across
//! all threads; messages from further ids are rejected with `too_many_sensors`. Garbage from
//! unknown ids does not take a sensor slot. One [`SensorBatch`] per thread is reused for every
//! message, and window buffers come from the shared [`BufferPool`].
//!
//! When the model is swapped, every sensor's buffer restarts with the new model's shape and
//! statistics (detected by the model's generation).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diredi_protocol::messages::ErrorMsg;
use diredi_protocol::sensor::{decode_sensor, DecodeLimits, SensorBatch};
use diredi_protocol::topics::Topics;

use diredi_protocol::messages::LabelMsg;

use crate::batcher::{BufferPool, PushOutcome, SensorInfo, WindowJob, WindowQueue};
use crate::inbox::Inbox;
use crate::labels::{window_index, LabelBook, Labelled, RecentWindow};
use crate::metrics::{kinds, Metrics};
use crate::model::{LoadedModel, ModelHandle};
use crate::notify::ThreadHealth;
use crate::ratelimit::{KeyBudget, KeyedLimiter};
use crate::report::Reporter;
use crate::store::{ExclusiveStore, StoredWindow};
use crate::window::{Reset, WindowParams, Windower};

/// What a message routed to a decode thread carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestKind {
    /// Samples (`sensor/{id}`).
    Samples,
    /// A user's label for the sensor's windows (`label/{id}`).
    Label,
}

/// A sensor or label message on its way to the decode thread of its sensor.
#[derive(Debug)]
pub struct Ingest {
    /// The MQTT message (topic `diredi/v1/{gw}/sensor/{id}` or `.../label/{id}`).
    pub publish: rumqttc::Publish,
    /// Byte offset of the sensor id in the topic.
    pub id_start: usize,
    /// Samples or label.
    pub kind: IngestKind,
}

impl Ingest {
    /// The sensor id.
    pub fn sensor_id(&self) -> &str {
        self.publish.topic.get(self.id_start..).unwrap_or("")
    }
}

/// Decode thread for a sensor id, out of `shards`.
pub fn shard_of(sensor_id: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    // FNV-1a: stable across runs and cheap for short ids.
    let h = sensor_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (h % shards as u64) as usize
}

/// Sensors admitted by all decode threads (ids kept for the Home Assistant announcements).
#[derive(Debug)]
pub struct SensorRegistry {
    count: AtomicUsize,
    max: usize,
    ids: std::sync::Mutex<Vec<String>>,
}

impl SensorRegistry {
    /// A registry admitting at most `max` sensors.
    pub fn new(max: usize) -> Self {
        SensorRegistry {
            count: AtomicUsize::new(0),
            max,
            ids: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Admits sensor `id` (not yet admitted); `false` when the registry is full.
    pub fn try_add(&self, id: &str) -> bool {
        let admitted = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(id.to_owned());
        }
        admitted
    }

    /// Ids of the admitted sensors, in order of arrival.
    pub fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sensors admitted.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Whether no sensor is admitted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Settings shared by the decode threads.
#[derive(Debug, Clone)]
pub struct ShardSettings {
    /// Payload and sample limits.
    pub limits: DecodeLimits,
    /// Gap tolerance in sample periods.
    pub max_gap_periods: f64,
    /// Error messages per sensor and second.
    pub errors_per_second: u32,
    /// Home Assistant discovery prefix; when set, a new sensor's discovery configs are
    /// published when it is admitted.
    pub discovery_prefix: Option<String>,
    /// Labels and the exclusive store; `None` when learning is off (labels are rejected).
    pub learning: Option<ShardLearning>,
}

/// What a decode thread needs to turn labels into stored windows.
#[derive(Debug, Clone)]
pub struct ShardLearning {
    /// Where labelled windows go.
    pub store: Arc<ExclusiveStore>,
    /// Recent windows kept per sensor for labels that arrive after them.
    pub recent_windows: usize,
    /// Label ranges kept per sensor.
    pub label_spans: usize,
}

struct Sensor {
    info: Arc<SensorInfo>,
    windower: Windower,
    budget: KeyBudget,
    book: Option<LabelBook>,
}

/// Stores a labelled window of `sensor`, standardised for (and tagged with) model `m`, whose
/// classes decide which names are new.
fn store_window(
    store: &ExclusiveStore,
    m: &LoadedModel,
    sensor: &str,
    l: Labelled,
) -> Result<bool, crate::store::StoreError> {
    let w = StoredWindow {
        sensor: sensor.to_owned(),
        end_ts: l.window.end_ts,
        class: l.class,
        model_version: m.spec().version,
        data: l.window.data,
    };
    store.insert(&w, &m.spec().classes)
}

/// A label book for a sensor, when learning is on.
fn new_book(settings: &ShardSettings, params: &WindowParams) -> Option<LabelBook> {
    settings
        .learning
        .as_ref()
        .map(|l| LabelBook::new(l.recent_windows, l.label_spans, params.period_ms))
}

/// The sensors of one decode thread and everything needed to process their messages.
pub struct Shard {
    topics: Topics,
    settings: ShardSettings,
    model: ModelHandle,
    generation: u64,
    channels: Vec<String>,
    params: WindowParams,
    sensors: HashMap<Box<str>, Sensor>,
    registry: Arc<SensorRegistry>,
    batch: SensorBatch,
    queue: Arc<WindowQueue>,
    pool: Arc<BufferPool>,
    reporter: Reporter,
    unknown_budget: KeyedLimiter,
    metrics: Arc<Metrics>,
}

impl Shard {
    /// A shard serving the current model of `model`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        topics: Topics,
        settings: ShardSettings,
        model: ModelHandle,
        registry: Arc<SensorRegistry>,
        queue: Arc<WindowQueue>,
        pool: Arc<BufferPool>,
        reporter: Reporter,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (generation, channels, params) = {
            let m = model.load();
            (
                m.generation(),
                m.spec().input.channels.clone(),
                m.spec().window_params(settings.max_gap_periods),
            )
        };
        let unknown_budget = KeyedLimiter::new(settings.errors_per_second, registry.max.max(16));
        Shard {
            topics,
            settings,
            model,
            generation,
            channels,
            params,
            sensors: HashMap::new(),
            registry,
            batch: SensorBatch::new(),
            queue,
            pool,
            reporter,
            unknown_budget,
            metrics,
        }
    }

    fn follow_model(&mut self) {
        let m = self.model.load();
        if m.generation() == self.generation {
            return;
        }
        self.generation = m.generation();
        self.channels = m.spec().input.channels.clone();
        self.params = m.spec().window_params(self.settings.max_gap_periods);
        for s in self.sensors.values_mut() {
            s.windower = Windower::new(&self.params);
            s.book = new_book(&self.settings, &self.params);
        }
        tracing::debug!(
            generation = self.generation,
            "Decode thread follows the new model."
        );
    }

    fn new_book(&self) -> Option<LabelBook> {
        new_book(&self.settings, &self.params)
    }

    /// Processes one sensor or label message received at `now` (`now_ms` wall clock).
    pub fn handle(&mut self, msg: &Ingest, now: Instant, now_ms: i64) {
        self.follow_model();
        match msg.kind {
            IngestKind::Samples => self.handle_samples(msg, now, now_ms),
            IngestKind::Label => self.handle_label(msg, now, now_ms),
        }
    }

    /// Applies a label to the sensor's windows and stores the windows it names. Errors (bad
    /// JSON, unknown sensor, learning off, store full of new classes) go to the error topic.
    fn handle_label(&mut self, msg: &Ingest, now: Instant, now_ms: i64) {
        let id = msg.sensor_id();
        let topic = msg.publish.topic.as_str();
        let result = self.apply_label(id, &msg.publish.payload);
        Metrics::add(&self.metrics.labels_in, 1);
        match result {
            Ok(stored) => {
                Metrics::add(&self.metrics.labelled_windows, stored as u64);
                tracing::debug!(sensor = id, windows = stored, "Label applied.");
            }
            Err((kind, reason)) => {
                let verdict = match self.sensors.get_mut(id) {
                    Some(s) => s.budget.check(now, self.settings.errors_per_second),
                    None => self.unknown_budget.check(id, now),
                };
                self.reporter.reject(
                    verdict,
                    ErrorMsg {
                        topic: topic.to_owned(),
                        sensor: Some(id.to_owned()),
                        reason,
                        kind: kind.to_owned(),
                        ts: now_ms,
                    },
                );
            }
        }
    }

    fn apply_label(&mut self, id: &str, payload: &[u8]) -> Result<usize, (&'static str, String)> {
        let Some(learning) = self.settings.learning.clone() else {
            return Err((
                kinds::BAD_LABEL,
                "learning is off ([learning] enabled = false)".into(),
            ));
        };
        let label: LabelMsg = serde_json::from_slice(payload)
            .map_err(|e| (kinds::BAD_LABEL, format!("not a label: {e}")))?;
        let Some(sensor) = self.sensors.get_mut(id) else {
            return Err((
                kinds::BAD_LABEL,
                format!("no sensor {id:?} has sent samples yet; labels name its windows"),
            ));
        };
        let Some(book) = sensor.book.as_mut() else {
            return Ok(0);
        };
        let labelled = match &label {
            LabelMsg::Range {
                from_ts,
                to_ts,
                class,
            } => {
                if to_ts < from_ts {
                    return Err((
                        kinds::BAD_LABEL,
                        format!("to_ts {to_ts} is before from_ts {from_ts}"),
                    ));
                }
                book.on_range(*from_ts, *to_ts, class)
            }
            LabelMsg::Window { window_id, class } => {
                let index = window_index(window_id, id).ok_or_else(|| {
                    (
                        kinds::BAD_LABEL,
                        format!("window id {window_id:?} is not one of sensor {id:?}'s"),
                    )
                })?;
                match book.on_window_id(index, class) {
                    Some(l) => vec![l],
                    None => {
                        return Err((
                            kinds::BAD_LABEL,
                            format!("window {window_id:?} is no longer among the recent windows"),
                        ))
                    }
                }
            }
        };
        let m = self.model.load();
        let mut stored = 0;
        for l in labelled {
            store_window(&learning.store, &m, id, l)
                .map_err(|e| (kinds::BAD_LABEL, e.to_string()))?;
            stored += 1;
        }
        Ok(stored)
    }

    /// Stores the windows a label already covers as they complete.
    fn store_labelled(&self, sensor: &str, labelled: Vec<Labelled>) {
        let Some(learning) = &self.settings.learning else {
            return;
        };
        let m = self.model.load();
        for l in labelled {
            match store_window(&learning.store, &m, sensor, l) {
                Ok(_) => Metrics::add(&self.metrics.labelled_windows, 1),
                Err(e) => tracing::warn!(sensor, error = %e, "Cannot store a labelled window."),
            }
        }
    }

    fn handle_samples(&mut self, msg: &Ingest, now: Instant, now_ms: i64) {
        let id = msg.sensor_id();
        let topic = msg.publish.topic.as_str();
        if let Err(e) = decode_sensor(
            &msg.publish.payload,
            &self.channels,
            &self.settings.limits,
            &mut self.batch,
        ) {
            let verdict = match self.sensors.get_mut(id) {
                Some(s) => s.budget.check(now, self.settings.errors_per_second),
                None => self.unknown_budget.check(id, now),
            };
            self.reporter
                .reject(verdict, ErrorMsg::from_decode(topic, Some(id), &e, now_ms));
            return;
        }

        if !self.sensors.contains_key(id) {
            if !self.registry.try_add(id) {
                let verdict = self.unknown_budget.check(id, now);
                self.reporter.reject(
                    verdict,
                    ErrorMsg {
                        topic: topic.to_owned(),
                        sensor: Some(id.to_owned()),
                        reason: format!(
                            "sensor limit reached: {} sensors are known; expected at most \
                             [pipeline] max_sensors = {}",
                            self.registry.len(),
                            self.registry.max
                        ),
                        kind: kinds::TOO_MANY_SENSORS.to_owned(),
                        ts: now_ms,
                    },
                );
                return;
            }
            Metrics::add(&self.metrics.sensors, 1);
            tracing::info!(sensor = id, "New sensor.");
            if let Some(prefix) = &self.settings.discovery_prefix {
                self.announce_sensor(prefix, id);
            }
            let info = Arc::new(SensorInfo {
                id: id.into(),
                inference_topic: self.topics.inference(id).into(),
            });
            let book = self.new_book();
            self.sensors.insert(
                id.into(),
                Sensor {
                    info,
                    windower: Windower::new(&self.params),
                    budget: KeyBudget::default(),
                    book,
                },
            );
        }
        let Some(sensor) = self.sensors.get_mut(id) else {
            return;
        };

        Metrics::add(&self.metrics.samples_in, self.batch.samples() as u64);
        let Sensor {
            info,
            windower,
            book,
            ..
        } = sensor;
        let (queue, pool, metrics) = (&self.queue, &self.pool, &self.metrics);
        let generation = self.generation;
        let len = self.params.channels * self.params.window;
        let span_ms =
            ((self.params.window.max(1) - 1) as f64 * self.params.period_ms).round() as i64;
        let mut labelled = Vec::new();
        let outcome = windower.push(
            &self.params,
            self.batch.ts_ms,
            &self.batch.values,
            now_ms,
            |view| {
                let mut data = pool.take(len);
                view.copy_into(&mut data);
                if let Some(book) = book.as_mut() {
                    labelled.extend(book.on_window(RecentWindow {
                        index: view.index,
                        start_ts: view.end_ts_ms - span_ms,
                        end_ts: view.end_ts_ms,
                        data: data.clone(),
                    }));
                }
                let job = WindowJob {
                    sensor: info.clone(),
                    index: view.index,
                    end_ts_ms: view.end_ts_ms,
                    ready_at: Instant::now(),
                    generation,
                    data,
                };
                match queue.push(job) {
                    PushOutcome::Queued => {}
                    PushOutcome::EvictedOldest(old) | PushOutcome::Refused(old) => {
                        Metrics::add(&metrics.windows_dropped, 1);
                        pool.give(old.data);
                    }
                }
            },
        );
        Metrics::add(&self.metrics.windows_ready, outcome.windows as u64);
        if !labelled.is_empty() {
            self.store_labelled(id, labelled);
        }
        if let Some(reset) = outcome.reset {
            let counter = match reset {
                Reset::Gap => &self.metrics.resets_gap,
                Reset::Backwards => &self.metrics.resets_backwards,
            };
            Metrics::add(counter, 1);
            tracing::debug!(
                sensor = id,
                reset = reset.as_str(),
                "Sensor window restarted."
            );
        }
    }

    fn announce_sensor(&self, prefix: &str, id: &str) {
        let classes = self.model.load().spec().classes.clone();
        let gw = self.topics.gateway_id();
        match crate::homeassistant::sensor_discovery(
            prefix,
            gw,
            id,
            &classes,
            crate::status::VERSION,
        ) {
            Ok(configs) => {
                for d in configs {
                    let sent = self.reporter.publisher().try_publish(
                        d.topic,
                        rumqttc::QoS::AtLeastOnce,
                        d.retain,
                        d.payload.into_bytes(),
                    );
                    if sent.is_err() {
                        Metrics::add(&self.metrics.publish_dropped, 1);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(sensor = id, error = %e, "Cannot build Home Assistant discovery.")
            }
        }
    }

    /// Sensors of this shard.
    pub fn sensors(&self) -> usize {
        self.sensors.len()
    }
}

/// Unix time in milliseconds.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Runs a decode thread until intake is closed and its inbox is empty. `pending` is the
/// number of queued messages across all inboxes.
pub fn run_shard(
    mut shard: Shard,
    inbox: &Inbox,
    intake_open: Arc<AtomicBool>,
    pending: Arc<AtomicUsize>,
    health: Arc<ThreadHealth>,
) {
    const TICK: Duration = Duration::from_millis(50);
    let mut batch = Vec::new();
    loop {
        // Read before taking: once intake is closed, an empty take means nothing more comes.
        let open = intake_open.load(Ordering::Acquire);
        let n = inbox.take(&mut batch, TICK);
        if n == 0 {
            health.idle();
            if !open {
                break;
            }
            continue;
        }
        health.busy();
        for msg in batch.drain(..) {
            pending.fetch_sub(1, Ordering::Relaxed);
            shard.handle(&msg, Instant::now(), unix_ms());
        }
        health.idle();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::batcher::QueuePolicy;
    use crate::model::tests::fake_model;
    use crate::report::tests::Recorder;
    use arc_swap::ArcSwap;
    use diredi_protocol::sensor::{encode_binary, encode_json};
    use rumqttc::QoS;
    use std::time::Duration;

    struct Fixture {
        shard: Shard,
        queue: Arc<WindowQueue>,
        rec: Arc<Recorder>,
        metrics: Arc<Metrics>,
        model: ModelHandle,
    }

    fn fixture(max_sensors: usize, queue_capacity: usize) -> Fixture {
        let topics = Topics::new("gw").unwrap();
        let model: ModelHandle = Arc::new(ArcSwap::from_pointee(fake_model(2, 4, 2)));
        let rec = Arc::new(Recorder::default());
        let metrics = Arc::new(Metrics::new());
        let queue = Arc::new(WindowQueue::new(queue_capacity, QueuePolicy::DropOldest));
        let reporter = Reporter::new(
            rec.clone(),
            topics.error(),
            QoS::AtMostOnce,
            metrics.clone(),
        );
        let shard = Shard::new(
            topics,
            ShardSettings {
                limits: DecodeLimits {
                    max_payload_bytes: 1024,
                    max_samples: 64,
                },
                max_gap_periods: 5.0,
                errors_per_second: 1,
                discovery_prefix: Some("homeassistant".into()),
                learning: None,
            },
            model.clone(),
            Arc::new(SensorRegistry::new(max_sensors)),
            queue.clone(),
            Arc::new(BufferPool::new(8)),
            reporter,
            metrics.clone(),
        );
        Fixture {
            shard,
            queue,
            rec,
            metrics,
            model,
        }
    }

    fn ingest(sensor: &str, payload: Vec<u8>) -> Ingest {
        let topic = format!("diredi/v1/gw/sensor/{sensor}");
        Ingest {
            id_start: topic.len() - sensor.len(),
            publish: rumqttc::Publish::new(topic, QoS::AtMostOnce, payload),
            kind: IngestKind::Samples,
        }
    }

    fn drain(q: &WindowQueue) -> Vec<WindowJob> {
        let mut out = Vec::new();
        if !q.is_empty() {
            q.pop_batch(&mut out, 1000, Duration::ZERO, Duration::ZERO, || {});
        }
        out
    }

    fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn valid_messages_become_windows_for_their_sensor() {
        let mut f = fixture(4, 16);
        let t = Instant::now();
        f.shard.handle(
            &ingest("a", encode_json(Some(1000), &[1.0; 2 * 6], 2)),
            t,
            0,
        );
        f.shard.handle(
            &ingest("b", encode_binary(None, &[-1.0; 2 * 4], 2)),
            t,
            5000,
        );
        let jobs = drain(&f.queue);
        let summary: Vec<_> = jobs
            .iter()
            .map(|j| (&*j.sensor.id, j.index, j.end_ts_ms))
            .collect();
        assert_eq!(
            summary,
            vec![("a", 0, 1060), ("a", 1, 1100), ("b", 0, 5000)]
        );
        assert_eq!(&*jobs[0].sensor.inference_topic, "diredi/v1/gw/inference/a");
        assert_eq!(jobs[0].data, vec![1.0; 8]);
        assert_eq!(load(&f.metrics.samples_in), 10);
        assert_eq!(load(&f.metrics.windows_ready), 3);
        assert_eq!(load(&f.metrics.sensors), 2);
    }

    #[test]
    fn bad_payloads_are_reported_per_sensor_and_do_not_disturb_others() {
        let mut f = fixture(4, 16);
        let t = Instant::now();
        f.shard
            .handle(&ingest("good", encode_json(None, &[1.0; 2 * 2], 2)), t, 0);
        let bad: [&[u8]; 5] = [
            b"{not json",
            br#"{"values": [[1, 2, 3]]}"#,
            br#"{"values": [[1, 1e39]]}"#,
            b"\x00\x01garbage",
            &[b'['; 2000],
        ];
        for (i, p) in bad.iter().enumerate() {
            // One second apart, so each passes the rate limit.
            let at = t + Duration::from_secs(i as u64 + 1);
            f.shard.handle(&ingest("bad", p.to_vec()), at, 0);
        }
        f.shard
            .handle(&ingest("good", encode_json(None, &[1.0; 2 * 2], 2)), t, 0);
        let errors = f.rec.on("/error");
        let kinds: Vec<_> = errors.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            vec![
                "malformed_json",
                "channel_count",
                "non_finite",
                "unknown_format",
                "too_large"
            ]
        );
        assert_eq!(errors[1]["sensor"], "bad");
        assert_eq!(errors[1]["topic"], "diredi/v1/gw/sensor/bad");
        assert!(errors[1]["reason"]
            .as_str()
            .unwrap()
            .contains("expected 2 values"));
        assert_eq!(f.metrics.rejected("channel_count"), 1);
        assert_eq!(
            f.shard.sensors(),
            1,
            "a sensor that never sent a valid message has no slot"
        );
        assert_eq!(
            drain(&f.queue).len(),
            1,
            "good sensor still produced its window"
        );
    }

    #[test]
    fn errors_beyond_the_budget_are_suppressed_and_counted() {
        let mut f = fixture(4, 16);
        let t = Instant::now();
        for i in 0..5 {
            f.shard
                .handle(&ingest("s", b"x".to_vec()), t + Duration::from_millis(i), 0);
        }
        f.shard
            .handle(&ingest("s", b"x".to_vec()), t + Duration::from_secs(1), 0);
        let errors = f.rec.on("/error");
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[1]["suppressed"], 4);
        assert_eq!(f.metrics.rejected("unknown_format"), 6);
        assert_eq!(load(&f.metrics.errors_suppressed), 4);
    }

    #[test]
    fn a_new_sensor_is_announced_to_home_assistant_once() {
        let mut f = fixture(4, 16);
        let t = Instant::now();
        for _ in 0..2 {
            f.shard
                .handle(&ingest("imu", encode_json(None, &[1.0; 2], 2)), t, 0);
        }
        let configs: Vec<String> = f
            .rec
            .messages
            .lock()
            .unwrap()
            .iter()
            .filter(|(topic, retain, _)| topic.starts_with("homeassistant/") && *retain)
            .map(|(topic, _, _)| topic.clone())
            .collect();
        assert_eq!(
            configs.len(),
            2,
            "class and confidence entities: {configs:?}"
        );
        assert!(configs.iter().all(|t| t.contains("imu")), "{configs:?}");
    }

    #[test]
    fn sensors_beyond_the_limit_are_rejected() {
        let mut f = fixture(2, 16);
        let t = Instant::now();
        for s in ["a", "b", "c"] {
            f.shard
                .handle(&ingest(s, encode_json(None, &[1.0; 2], 2)), t, 0);
        }
        let errors = f.rec.on("/error");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0]["kind"], "too_many_sensors");
        assert_eq!(errors[0]["sensor"], "c");
        assert_eq!(f.shard.sensors(), 2);
        f.shard
            .handle(&ingest("a", encode_json(None, &[1.0; 2], 2)), t, 0);
        assert_eq!(
            f.metrics.rejected("too_many_sensors"),
            1,
            "known sensors still accepted"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_windows() {
        let mut f = fixture(4, 2);
        f.shard.handle(
            &ingest("a", encode_json(Some(0), &[1.0; 2 * 12], 2)),
            Instant::now(),
            0,
        );
        assert_eq!(load(&f.metrics.windows_ready), 5);
        assert_eq!(load(&f.metrics.windows_dropped), 3);
        let idx: Vec<_> = drain(&f.queue).iter().map(|j| j.index).collect();
        assert_eq!(idx, vec![3, 4], "oldest dropped");
    }

    #[test]
    fn a_model_swap_restarts_every_sensor_with_the_new_shape() {
        let mut f = fixture(4, 16);
        let t = Instant::now();
        f.shard
            .handle(&ingest("a", encode_json(None, &[1.0; 2 * 3], 2)), t, 0);
        f.model.store(Arc::new(fake_model(3, 2, 2)));
        f.shard
            .handle(&ingest("a", encode_json(None, &[1.0; 2 * 2], 2)), t, 0);
        assert_eq!(
            f.metrics.rejected("channel_count"),
            1,
            "old channel count now invalid"
        );
        f.shard
            .handle(&ingest("a", encode_json(None, &[1.0; 3 * 2], 3)), t, 0);
        let jobs = drain(&f.queue);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].data.len(), 6);
        assert_eq!(jobs[0].generation, f.model.load().generation());
    }

    #[test]
    fn shards_spread_sensors_deterministically() {
        assert_eq!(shard_of("x", 1), 0);
        let a = shard_of("imu-1", 4);
        assert_eq!(a, shard_of("imu-1", 4));
        let used: std::collections::HashSet<_> =
            (0..64).map(|i| shard_of(&format!("s{i}"), 4)).collect();
        assert_eq!(used.len(), 4);
    }
}
