//! Counters, latency percentiles and process gauges behind `diredi/v1/{gw}/metrics`.
//!
//! Data flow: every stage counts what it does into the shared [`Metrics`] (atomics, no lock on
//! the hot path except one per inference batch for the latency histogram); the metrics task
//! turns a [`Metrics::snapshot`] into a [`MetricsMsg`] every `[metrics] interval_s`.
//!
//! Counters are totals since start-up. Latency percentiles cover the windows inferred since the
//! previous snapshot. [`LatencyHistogram`] is sans-IO: log-linear buckets (16 per power of two)
//! over microseconds, so a percentile is within about 3 % of the exact value.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use diredi_protocol::messages::MetricsMsg;
use diredi_protocol::sensor::DecodeError;
use serde::Serialize;

/// Error kinds produced by the gateway itself, next to [`DecodeError::ALL_KINDS`].
pub mod kinds {
    /// A new sensor id arrived while `[pipeline] max_sensors` sensors were already known.
    pub const TOO_MANY_SENSORS: &str = "too_many_sensors";
    /// The sensor id in the topic is not a valid topic level (empty, too long, ...).
    pub const INVALID_SENSOR_ID: &str = "invalid_sensor_id";

    /// A label that cannot be applied: not JSON, an unknown sensor or window, a new class
    /// beyond the limit, or learning switched off.
    pub const BAD_LABEL: &str = "bad_label";
    /// A command the gateway does not know or cannot carry out now.
    pub const BAD_COMMAND: &str = "bad_command";

    /// Every gateway-side kind.
    pub const ALL: &[&str] = &[TOO_MANY_SENSORS, INVALID_SENSOR_ID, BAD_LABEL, BAD_COMMAND];
}

const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
const MAX_EXP: u32 = 40;
const BUCKETS: usize = SUB + (MAX_EXP - SUB_BITS + 1) as usize * SUB;

/// Latency histogram with log-linear buckets over whole microseconds (1 µs to about 12 days).
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

fn bucket_of(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros();
    if exp > MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = ((us >> (exp - SUB_BITS)) as usize) & (SUB - 1);
    SUB + (exp - SUB_BITS) as usize * SUB + sub
}

/// Middle of bucket `idx`, in microseconds.
fn bucket_mid(idx: usize) -> f64 {
    if idx < SUB {
        return idx as f64;
    }
    let exp = (idx - SUB) / SUB + SUB_BITS as usize;
    let sub = (idx - SUB) % SUB;
    let width = 1u64 << (exp - SUB_BITS as usize);
    let lower = (SUB as u64 + sub as u64) * width;
    lower as f64 + (width as f64 - 1.0) / 2.0
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[bucket_of(us)] += 1;
        self.total += 1;
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q`-quantile (`0 < q <= 1`) in milliseconds; `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (idx, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_mid(idx) / 1000.0);
            }
        }
        None
    }

    /// Returns the content and leaves the histogram empty.
    pub fn take(&mut self) -> LatencyHistogram {
        std::mem::take(self)
    }
}

/// Counters shared by every stage of the gateway.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    /// Messages received on sensor topics.
    pub messages_in: AtomicU64,
    /// Samples decoded from accepted sensor messages.
    pub samples_in: AtomicU64,
    /// Sensor messages dropped because a decode thread's queue was full (newest dropped).
    pub ingest_dropped: AtomicU64,
    /// Windows completed by the windowing stage.
    pub windows_ready: AtomicU64,
    /// Windows classified and published (or handed to the MQTT client).
    pub windows_inferred: AtomicU64,
    /// Windows dropped because the inference queue was full.
    pub windows_dropped: AtomicU64,
    /// Windows discarded because the model changed while they waited.
    pub windows_stale: AtomicU64,
    /// Windows whose batch failed in the classifier.
    pub inference_failures: AtomicU64,
    /// Sensor buffers emptied after a timestamp gap.
    pub resets_gap: AtomicU64,
    /// Sensor buffers emptied after a backwards timestamp.
    pub resets_backwards: AtomicU64,
    /// Error-topic messages suppressed by the rate limit.
    pub errors_suppressed: AtomicU64,
    /// Outgoing messages dropped because the MQTT client's queue was full or closed.
    pub publish_dropped: AtomicU64,
    /// Messages on topics the gateway does not handle.
    pub messages_ignored: AtomicU64,
    /// Sensors currently known.
    pub sensors: AtomicU64,
    /// Label messages received.
    pub labels_in: AtomicU64,
    /// Windows stored in the exclusive store (new or relabelled).
    pub labelled_windows: AtomicU64,
    /// Adaptations that produced a knowledge package.
    pub adaptations: AtomicU64,
    /// Adaptations that failed or that the probe guard refused.
    pub adaptations_failed: AtomicU64,
    /// Adaptations stopped by `cancel_adapt`.
    pub adaptations_cancelled: AtomicU64,
    /// Knowledge publications (first sends and retries).
    pub knowledge_sent: AtomicU64,
    /// Knowledge packages the cloud acknowledged.
    pub knowledge_acked: AtomicU64,
    rejected: BTreeMap<&'static str, AtomicU64>,
    latency: Mutex<LatencyHistogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Extra counters published next to the protocol's [`MetricsMsg`] fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GatewayMetrics {
    /// The contract fields.
    #[serde(flatten)]
    pub base: MetricsMsg,
    /// Sensor messages dropped because a decode queue was full.
    pub ingest_dropped: u64,
    /// Messages waiting in the decode queues.
    pub ingest_queue_depth: u64,
    /// Windows completed by the windowing stage.
    pub windows_ready: u64,
    /// Windows discarded because the model changed while they waited.
    pub windows_stale: u64,
    /// Windows whose batch failed in the classifier.
    pub inference_failures: u64,
    /// Sensor buffers emptied after a timestamp gap.
    pub resets_gap: u64,
    /// Sensor buffers emptied after a backwards timestamp.
    pub resets_backwards: u64,
    /// Error-topic messages suppressed by the rate limit.
    pub errors_suppressed: u64,
    /// Outgoing messages dropped because the MQTT client queue was full.
    pub publish_dropped: u64,
    /// Messages on topics the gateway does not handle.
    pub messages_ignored: u64,
    /// Label messages received.
    pub labels_in: u64,
    /// Windows stored in the exclusive store (new or relabelled); the windows themselves
    /// never leave the gateway.
    pub labelled_windows: u64,
    /// Adaptations that produced a knowledge package.
    pub adaptations: u64,
    /// Adaptations that failed or that the probe guard refused.
    pub adaptations_failed: u64,
    /// Adaptations stopped by `cancel_adapt`.
    pub adaptations_cancelled: u64,
    /// Knowledge publications (first sends and retries).
    pub knowledge_sent: u64,
    /// Knowledge packages the cloud acknowledged.
    pub knowledge_acked: u64,
    /// Knowledge packages waiting in the outbox for the cloud's acknowledgement.
    pub outbox_pending: u64,
}

/// Queue levels sampled when a snapshot is taken.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueLevels {
    /// Windows waiting for inference.
    pub inference_depth: usize,
    /// Capacity of the inference queue.
    pub inference_capacity: usize,
    /// Messages waiting in the decode queues.
    pub ingest_depth: usize,
    /// Knowledge packages waiting in the outbox.
    pub outbox_pending: usize,
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Metrics {
    /// Zeroed counters, with every known rejection kind registered.
    pub fn new() -> Self {
        let rejected = DecodeError::ALL_KINDS
            .iter()
            .chain(kinds::ALL)
            .map(|k| (*k, AtomicU64::new(0)))
            .collect();
        Metrics {
            started: Instant::now(),
            messages_in: AtomicU64::new(0),
            samples_in: AtomicU64::new(0),
            ingest_dropped: AtomicU64::new(0),
            windows_ready: AtomicU64::new(0),
            windows_inferred: AtomicU64::new(0),
            windows_dropped: AtomicU64::new(0),
            windows_stale: AtomicU64::new(0),
            inference_failures: AtomicU64::new(0),
            resets_gap: AtomicU64::new(0),
            resets_backwards: AtomicU64::new(0),
            errors_suppressed: AtomicU64::new(0),
            publish_dropped: AtomicU64::new(0),
            messages_ignored: AtomicU64::new(0),
            sensors: AtomicU64::new(0),
            labels_in: AtomicU64::new(0),
            labelled_windows: AtomicU64::new(0),
            adaptations: AtomicU64::new(0),
            adaptations_failed: AtomicU64::new(0),
            adaptations_cancelled: AtomicU64::new(0),
            knowledge_sent: AtomicU64::new(0),
            knowledge_acked: AtomicU64::new(0),
            rejected,
            latency: Mutex::new(LatencyHistogram::default()),
        }
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one rejected input of `kind` (a [`DecodeError::kind`] or a [`kinds`] code).
    pub fn reject(&self, kind: &str) {
        match self.rejected.get(kind) {
            Some(c) => Metrics::add(c, 1),
            None => debug_assert!(false, "unregistered rejection kind {kind}"),
        }
    }

    /// Rejected inputs of `kind` so far.
    pub fn rejected(&self, kind: &str) -> u64 {
        self.rejected.get(kind).map_or(0, load)
    }

    /// Records window latencies (window ready → result ready).
    pub fn record_latencies(&self, latencies: impl IntoIterator<Item = Duration>) {
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for d in latencies {
            h.record(d);
        }
    }

    /// Builds the metrics message and restarts the latency period.
    pub fn snapshot(&self, now_ms: i64, queues: QueueLevels) -> GatewayMetrics {
        let latency = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let rejected_by_reason: BTreeMap<String, u64> = self
            .rejected
            .iter()
            .map(|(k, v)| ((*k).to_owned(), load(v)))
            .filter(|(_, v)| *v > 0)
            .collect();
        let base = MetricsMsg {
            ts: now_ms,
            uptime_s: self.started.elapsed().as_secs(),
            messages_in: load(&self.messages_in),
            samples_in: load(&self.samples_in),
            windows_inferred: load(&self.windows_inferred),
            inputs_rejected: rejected_by_reason.values().sum(),
            rejected_by_reason,
            windows_dropped: load(&self.windows_dropped),
            latency_ms_p50: latency.quantile_ms(0.5),
            latency_ms_p99: latency.quantile_ms(0.99),
            queue_depth: queues.inference_depth as u64,
            queue_capacity: queues.inference_capacity as u64,
            sensors: load(&self.sensors),
            rss_bytes: rss_bytes(),
        };
        GatewayMetrics {
            base,
            ingest_dropped: load(&self.ingest_dropped),
            ingest_queue_depth: queues.ingest_depth as u64,
            windows_ready: load(&self.windows_ready),
            windows_stale: load(&self.windows_stale),
            inference_failures: load(&self.inference_failures),
            resets_gap: load(&self.resets_gap),
            resets_backwards: load(&self.resets_backwards),
            errors_suppressed: load(&self.errors_suppressed),
            publish_dropped: load(&self.publish_dropped),
            messages_ignored: load(&self.messages_ignored),
            labels_in: load(&self.labels_in),
            labelled_windows: load(&self.labelled_windows),
            adaptations: load(&self.adaptations),
            adaptations_failed: load(&self.adaptations_failed),
            adaptations_cancelled: load(&self.adaptations_cancelled),
            knowledge_sent: load(&self.knowledge_sent),
            knowledge_acked: load(&self.knowledge_acked),
            outbox_pending: queues.outbox_pending as u64,
        }
    }
}

/// Resident set size of this process: `/proc/self/statm` (pages) × the page size from the
/// auxiliary vector. `None` where `/proc` is unavailable.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size()?)
}

/// Page size of this process, read once from `/proc/self/auxv` (`AT_PAGESZ`). Kernels of
/// ARM boards use 4 KiB or 16 KiB pages, so it is not assumed.
fn page_size() -> Option<u64> {
    static PAGE: OnceLock<Option<u64>> = OnceLock::new();
    *PAGE.get_or_init(|| {
        const AT_PAGESZ: u64 = 6;
        let auxv = std::fs::read("/proc/self/auxv").ok()?;
        let word = std::mem::size_of::<usize>();
        let read = |b: &[u8]| -> u64 {
            let mut buf = [0u8; 8];
            buf[..word].copy_from_slice(b);
            u64::from_ne_bytes(buf)
        };
        auxv.chunks_exact(2 * word)
            .map(|pair| (read(&pair[..word]), read(&pair[word..])))
            .find(|(key, _)| *key == AT_PAGESZ)
            .map(|(_, v)| v)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_three_percent_of_the_exact_value() {
        let mut h = LatencyHistogram::default();
        // 1..=1000 ms: exact p50 = 500 ms, p99 = 990 ms.
        for i in 1..=1000u64 {
            h.record(Duration::from_millis(i));
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        assert!((p50 - 500.0).abs() / 500.0 < 0.03, "p50 = {p50}");
        assert!((p99 - 990.0).abs() / 990.0 < 0.03, "p99 = {p99}");
    }

    #[test]
    fn small_values_are_exact_and_huge_values_are_clamped() {
        let mut h = LatencyHistogram::default();
        h.record(Duration::from_micros(7));
        assert_eq!(h.quantile_ms(1.0), Some(0.007));
        h.record(Duration::from_secs(10_000_000));
        assert!(h.quantile_ms(1.0).unwrap() > 1e9);
    }

    #[test]
    fn every_bucket_midpoint_maps_back_to_its_bucket() {
        for idx in 0..BUCKETS {
            assert_eq!(bucket_of(bucket_mid(idx) as u64), idx, "bucket {idx}");
        }
    }

    #[test]
    fn empty_histogram_has_no_percentile_and_take_resets() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile_ms(0.5), None);
        h.record(Duration::from_millis(3));
        let old = h.take();
        assert_eq!((old.count(), h.count()), (1, 0));
    }

    #[test]
    fn snapshot_sums_rejections_and_reports_rss() {
        let m = Metrics::new();
        m.reject("malformed_json");
        m.reject("malformed_json");
        m.reject(kinds::TOO_MANY_SENSORS);
        Metrics::add(&m.messages_in, 5);
        m.record_latencies([Duration::from_millis(2)]);
        let s = m.snapshot(42, QueueLevels::default());
        assert_eq!(s.base.inputs_rejected, 3);
        assert_eq!(s.base.rejected_by_reason["malformed_json"], 2);
        assert_eq!(s.base.messages_in, 5);
        assert!(s.base.latency_ms_p50.is_some());
        assert!(
            s.base.rss_bytes.unwrap() > 1 << 20,
            "a test process uses over 1 MiB"
        );
        let again = m.snapshot(43, QueueLevels::default());
        assert_eq!(
            again.base.latency_ms_p50, None,
            "latency restarts every period"
        );
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["messages_in"], 5, "contract fields are flattened");
        assert_eq!(v["errors_suppressed"], 0);
    }
}
