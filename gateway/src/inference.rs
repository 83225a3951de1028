//! Inference threads: micro-batches of windows → classifier → inference messages.
//!
//! Data flow: queue → micro-batch → **infer → publish**. Each of `[runtime] workers` dedicated
//! std threads (never the async runtime) takes a batch from the [`WindowQueue`], copies it into
//! one reused `[N, C, T]` buffer, runs the active model (read from the swap point once per
//! batch), and publishes one [`InferenceMsg`] per window on `diredi/v1/{gw}/inference/{sensor}`,
//! handing the batch's messages over together ([`Publisher::try_publish_batch`]).
//!
//! `latency_ms` runs from the moment the window was complete to the moment its result is
//! ready (queueing + batching + inference). Windows standardised for a previous model are
//! dropped and counted (`windows_stale`). A failing batch is counted (`inference_failures`)
//! and logged, rate-limited; the thread carries on.
//!
//! With one worker, results of a sensor are published in window order; with several, two
//! batches may finish out of order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::ArrayView3;
use rumqttc::QoS;
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::batcher::{BufferPool, WindowJob, WindowQueue};
use crate::metrics::Metrics;
use crate::model::{LoadedModel, ModelHandle};
use crate::notify::ThreadHealth;
use crate::report::Publisher;

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Most windows per call.
    pub max_batch: usize,
    /// Longest wait for a batch to fill.
    pub max_wait: Duration,
    /// QoS of inference messages.
    pub qos: QoS,
}

/// An inference message as [`diredi_protocol::messages::InferenceMsg`] serialises it, byte
/// for byte, but borrowing its strings: no allocation per class and window (the
/// probabilities go out in the order of `by_name`, the class indices sorted by name, which is
/// the order of the contract's `BTreeMap`).
#[derive(serde::Serialize)]
struct InferenceOut<'a> {
    sensor: &'a str,
    ts: i64,
    label: &'a str,
    confidence: f32,
    probabilities: Probabilities<'a>,
    model_version: u64,
    latency_ms: f64,
    window_id: WindowId<'a>,
}

struct Probabilities<'a> {
    classes: &'a [String],
    by_name: &'a [usize],
    row: &'a [f32],
}

impl Serialize for Probabilities<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.by_name.len()))?;
        for &i in self.by_name {
            if let (Some(class), Some(p)) = (self.classes.get(i), self.row.get(i)) {
                map.serialize_entry(class, p)?;
            }
        }
        map.end()
    }
}

/// `{sensor}:{index}`.
struct WindowId<'a>(&'a str, u64);

impl Serialize for WindowId<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}:{}", self.0, self.1))
    }
}

/// Class indices in the order of their names (duplicates: the last one, as a map keeps it).
fn sorted_by_name(classes: &[String]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..classes.len()).collect();
    order.sort_by(|&a, &b| classes[a].cmp(&classes[b]).then(b.cmp(&a)));
    order.dedup_by(|a, b| classes[*a] == classes[*b]);
    order
}

/// One inference thread's state.
pub struct Worker {
    queue: Arc<WindowQueue>,
    pool: Arc<BufferPool>,
    model: ModelHandle,
    publisher: Arc<dyn Publisher>,
    metrics: Arc<Metrics>,
    settings: BatchSettings,
    health: Arc<ThreadHealth>,
    jobs: Vec<WindowJob>,
    input: Vec<f32>,
    latencies: Vec<Duration>,
    failures_logged: u64,
    /// Class order of the serialised probabilities, for the model generation it was made for.
    by_name: (u64, Vec<usize>),
}

impl Worker {
    /// A worker reading `queue` and publishing through `publisher`.
    pub fn new(
        queue: Arc<WindowQueue>,
        pool: Arc<BufferPool>,
        model: ModelHandle,
        publisher: Arc<dyn Publisher>,
        metrics: Arc<Metrics>,
        settings: BatchSettings,
        health: Arc<ThreadHealth>,
    ) -> Self {
        Worker {
            queue,
            pool,
            model,
            publisher,
            metrics,
            settings,
            health,
            jobs: Vec::with_capacity(settings.max_batch),
            input: Vec::new(),
            latencies: Vec::with_capacity(settings.max_batch),
            failures_logged: 0,
            by_name: (u64::MAX, Vec::new()),
        }
    }

    /// Serves batches until the queue is closed and empty.
    pub fn run(mut self) {
        const IDLE_TICK: Duration = Duration::from_millis(250);
        loop {
            let health = self.health.clone();
            let more = self.queue.pop_batch(
                &mut self.jobs,
                self.settings.max_batch,
                self.settings.max_wait,
                IDLE_TICK,
                || health.idle(),
            );
            if !more {
                return;
            }
            self.health.busy();
            self.process_batch();
            self.health.idle();
        }
    }

    /// Classifies and publishes the jobs taken from the queue, then recycles their buffers.
    fn process_batch(&mut self) {
        let model = self.model.load_full();
        let generation = model.generation();
        let (c, t) = (model.spec().input.channels.len(), model.spec().input.window);
        let mut stale = 0;
        self.jobs.retain_mut(|j| {
            let keep = j.generation == generation && j.data.len() == c * t;
            if !keep {
                stale += 1;
                self.pool.give(std::mem::take(&mut j.data));
            }
            keep
        });
        Metrics::add(&self.metrics.windows_stale, stale);
        let n = self.jobs.len();
        if n > 0 {
            self.input.clear();
            for j in &self.jobs {
                self.input.extend_from_slice(&j.data);
            }
            match ArrayView3::from_shape((n, c, t), &self.input) {
                Ok(view) => match model.classifier().classify(view) {
                    Ok(out) => self.publish(&model, out),
                    Err(e) => self.failed(n, &e.to_string()),
                },
                Err(e) => self.failed(n, &e.to_string()),
            }
        }
        for j in self.jobs.drain(..) {
            self.pool.give(j.data);
        }
    }

    fn failed(&mut self, n: usize, error: &str) {
        Metrics::add(&self.metrics.inference_failures, n as u64);
        self.failures_logged += 1;
        // Log the first failures and then every 1000th, with the running count.
        if self.failures_logged <= 3 || self.failures_logged.is_multiple_of(1000) {
            tracing::error!(
                error,
                windows = n,
                failures = self.failures_logged,
                "Inference failed."
            );
        }
    }

    fn publish(&mut self, model: &LoadedModel, mut out: ndarray::Array2<f32>) {
        let spec = model.spec();
        if self.by_name.0 != model.generation() {
            self.by_name = (model.generation(), sorted_by_name(&spec.classes));
        }
        let done = Instant::now();
        self.latencies.clear();
        let mut inferred = 0;
        let mut unserialised = 0;
        let mut batch = Vec::with_capacity(self.jobs.len());
        for (job, mut row) in self.jobs.iter().zip(out.rows_mut()) {
            let Some(row) = row.as_slice_mut() else {
                continue;
            };
            model.to_probabilities(row);
            let (best, confidence) =
                row.iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |acc, (i, &p)| if p > acc.1 { (i, p) } else { acc },
                    );
            let latency = done.saturating_duration_since(job.ready_at);
            self.latencies.push(latency);
            let msg = InferenceOut {
                sensor: &job.sensor.id,
                ts: job.end_ts_ms,
                label: spec.classes.get(best).map_or("", String::as_str),
                confidence,
                probabilities: Probabilities {
                    classes: &spec.classes,
                    by_name: &self.by_name.1,
                    row,
                },
                model_version: spec.version,
                latency_ms: latency.as_secs_f64() * 1000.0,
                window_id: WindowId(&job.sensor.id, job.index),
            };
            inferred += 1;
            match serde_json::to_vec(&msg) {
                Ok(payload) => batch.push((job.sensor.inference_topic.to_string(), payload)),
                Err(_) => unserialised += 1,
            }
        }
        // The batch's results go out together: the local link writes them with one flush.
        let dropped = self.publisher.try_publish_batch(self.settings.qos, batch);
        Metrics::add(
            &self.metrics.publish_dropped,
            (dropped + unserialised) as u64,
        );
        Metrics::add(&self.metrics.windows_inferred, inferred);
        self.metrics
            .record_latencies(self.latencies.iter().copied());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::batcher::{QueuePolicy, SensorInfo};
    use crate::model::tests::fake_model;
    use crate::report::tests::Recorder;
    use arc_swap::ArcSwap;
    use std::sync::atomic::Ordering;

    fn job(model: &LoadedModel, index: u64, value: f32) -> WindowJob {
        WindowJob {
            sensor: Arc::new(SensorInfo {
                id: "s1".into(),
                inference_topic: "diredi/v1/gw/inference/s1".into(),
            }),
            index,
            end_ts_ms: 1000 + index as i64,
            ready_at: Instant::now(),
            generation: model.generation(),
            data: vec![value; model.spec().input.channels.len() * model.spec().input.window],
        }
    }

    fn worker(
        model: ModelHandle,
        queue: Arc<WindowQueue>,
        rec: Arc<Recorder>,
    ) -> (Worker, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let w = Worker::new(
            queue,
            Arc::new(BufferPool::new(4)),
            model,
            rec,
            metrics.clone(),
            BatchSettings {
                max_batch: 8,
                max_wait: Duration::ZERO,
                qos: QoS::AtMostOnce,
            },
            ThreadHealth::new("inference-0"),
        );
        (w, metrics)
    }

    #[test]
    fn every_window_gets_one_inference_message_with_the_contract_fields() {
        let model: ModelHandle = Arc::new(ArcSwap::from_pointee(fake_model(2, 4, 2)));
        let queue = Arc::new(WindowQueue::new(16, QueuePolicy::DropOldest));
        let m = model.load();
        queue.push(job(&m, 0, 1.0));
        queue.push(job(&m, 1, -1.0));
        queue.close();
        let rec = Arc::new(Recorder::default());
        let (w, metrics) = worker(model.clone(), queue, rec.clone());
        w.run();
        let msgs = rec.on("/inference/s1");
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0]["label"], "pos");
        assert_eq!(msgs[1]["label"], "neg");
        assert_eq!(msgs[0]["window_id"], "s1:0");
        assert_eq!(msgs[1]["ts"], 1001);
        assert_eq!(msgs[0]["model_version"], 3);
        assert_eq!(msgs[0]["sensor"], "s1");
        assert!((msgs[0]["confidence"].as_f64().unwrap() - 0.9).abs() < 1e-6);
        assert!((msgs[0]["probabilities"]["neg"].as_f64().unwrap() - 0.1).abs() < 1e-6);
        assert!(msgs[0]["latency_ms"].as_f64().unwrap() >= 0.0);
        assert_eq!(metrics.windows_inferred.load(Ordering::Relaxed), 2);
        let snap = metrics.snapshot(0, Default::default());
        assert!(snap.base.latency_ms_p99.is_some());
    }

    /// The borrowed form serialises to the very bytes of the contract's `InferenceMsg`,
    /// whatever the order of the class names.
    #[test]
    fn the_borrowed_message_is_the_contract_byte_for_byte() {
        use diredi_protocol::messages::InferenceMsg;
        let classes: Vec<String> = ["walk", "sit", "Stand", "lie", "sit_to_stand", "a"]
            .iter()
            .map(|c| (*c).to_owned())
            .collect();
        let row = [0.1f32, 0.25, 0.05, 0.3, 1e-7, 0.2999];
        let by_name = sorted_by_name(&classes);
        let out = InferenceOut {
            sensor: "phone-1",
            ts: -17,
            label: "lie",
            confidence: 0.3,
            probabilities: Probabilities {
                classes: &classes,
                by_name: &by_name,
                row: &row,
            },
            model_version: 9,
            latency_ms: 1.234_567,
            window_id: WindowId("phone-1", 42),
        };
        let msg = InferenceMsg {
            sensor: "phone-1".into(),
            ts: -17,
            label: "lie".into(),
            confidence: 0.3,
            probabilities: classes.iter().cloned().zip(row).collect(),
            model_version: 9,
            latency_ms: 1.234_567,
            window_id: "phone-1:42".into(),
        };
        assert_eq!(
            String::from_utf8(serde_json::to_vec(&out).unwrap()).unwrap(),
            String::from_utf8(serde_json::to_vec(&msg).unwrap()).unwrap()
        );
        // A repeated class name keeps the last value, as the map does.
        let dup: Vec<String> = ["b", "a", "b"].iter().map(|c| (*c).to_owned()).collect();
        assert_eq!(sorted_by_name(&dup), vec![1, 2]);
    }

    #[test]
    fn windows_of_a_replaced_model_are_dropped_as_stale() {
        let model: ModelHandle = Arc::new(ArcSwap::from_pointee(fake_model(2, 4, 2)));
        let queue = Arc::new(WindowQueue::new(16, QueuePolicy::DropOldest));
        queue.push(job(&model.load(), 0, 1.0));
        let new = fake_model(2, 4, 2);
        queue.push(job(&new, 1, 1.0));
        model.store(Arc::new(new));
        queue.close();
        let rec = Arc::new(Recorder::default());
        let (w, metrics) = worker(model, queue, rec.clone());
        w.run();
        let msgs = rec.on("/inference/s1");
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0]["window_id"], "s1:1");
        assert_eq!(metrics.windows_stale.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn results_that_cannot_be_queued_are_counted() {
        let model: ModelHandle = Arc::new(ArcSwap::from_pointee(fake_model(1, 2, 1)));
        let queue = Arc::new(WindowQueue::new(16, QueuePolicy::DropOldest));
        queue.push(job(&model.load(), 0, 1.0));
        queue.close();
        let rec = Arc::new(Recorder {
            capacity: Some(0),
            ..Recorder::default()
        });
        let (w, metrics) = worker(model, queue, rec);
        w.run();
        assert_eq!(metrics.publish_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.windows_inferred.load(Ordering::Relaxed), 1);
    }
}
