//! Bounded queue of complete windows and micro-batching for the inference threads.
//!
//! Data flow: decode → window → **queue → micro-batch** → infer → publish. The decode threads
//! [`WindowQueue::push`] complete windows; each inference thread takes up to `max_batch`
//! windows with [`WindowQueue::pop_batch`], waiting at most `max_wait` after the first one for
//! the batch to fill.
//!
//! When the queue is full the configured [`QueuePolicy`] applies and the dropped window is
//! counted (`windows_dropped` in the metrics): `drop_oldest` (default) evicts the window that
//! has waited longest, since a fresh result is worth more to a live consumer; `drop_newest`
//! refuses the new window. The queue never blocks a producer.
//!
//! Window buffers are recycled through a [`BufferPool`], so a steady stream allocates nothing.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What to drop when the inference queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueuePolicy {
    /// Evict the oldest queued window to make room.
    DropOldest,
    /// Refuse the new window.
    DropNewest,
}

/// Identity of a sensor, shared by its windows.
#[derive(Debug)]
pub struct SensorInfo {
    /// Sensor id (last topic level).
    pub id: Box<str>,
    /// `diredi/v1/{gw}/inference/{id}`.
    pub inference_topic: Box<str>,
}

/// A complete, standardised window waiting for inference.
#[derive(Debug)]
pub struct WindowJob {
    /// The sensor it came from.
    pub sensor: Arc<SensorInfo>,
    /// Index of the window among the sensor's windows.
    pub index: u64,
    /// Unix ms of the window's last sample.
    pub end_ts_ms: i64,
    /// When the window became complete.
    pub ready_at: Instant,
    /// Generation of the model whose statistics standardised it.
    pub generation: u64,
    /// `C × T` values, NCT.
    pub data: Vec<f32>,
}

/// Result of [`WindowQueue::push`].
#[derive(Debug)]
pub enum PushOutcome {
    /// Queued without dropping anything.
    Queued,
    /// Queued; the oldest window was evicted and is returned for recycling.
    EvictedOldest(WindowJob),
    /// Not queued (queue full with `drop_newest`, or closed); the job is returned.
    Refused(WindowJob),
}

#[derive(Debug)]
struct State {
    jobs: VecDeque<WindowJob>,
    closed: bool,
}

/// Bounded multi-producer, multi-consumer window queue.
#[derive(Debug)]
pub struct WindowQueue {
    state: Mutex<State>,
    ready: Condvar,
    capacity: usize,
    policy: QueuePolicy,
}

impl WindowQueue {
    /// A queue of at most `capacity` windows (at least 1).
    pub fn new(capacity: usize, policy: QueuePolicy) -> Self {
        let capacity = capacity.max(1);
        WindowQueue {
            state: Mutex::new(State {
                jobs: VecDeque::with_capacity(capacity),
                closed: false,
            }),
            ready: Condvar::new(),
            capacity,
            policy,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Capacity in windows.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Windows waiting.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Whether no window is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a window, applying the queue policy when full. Never blocks.
    pub fn push(&self, job: WindowJob) -> PushOutcome {
        let mut st = self.lock();
        if st.closed {
            return PushOutcome::Refused(job);
        }
        let outcome = if st.jobs.len() < self.capacity {
            st.jobs.push_back(job);
            PushOutcome::Queued
        } else {
            match self.policy {
                QueuePolicy::DropNewest => return PushOutcome::Refused(job),
                QueuePolicy::DropOldest => {
                    let old = st.jobs.pop_front();
                    st.jobs.push_back(job);
                    match old {
                        Some(old) => PushOutcome::EvictedOldest(old),
                        None => PushOutcome::Queued,
                    }
                }
            }
        };
        drop(st);
        self.ready.notify_one();
        outcome
    }

    /// Stops accepting windows; consumers drain what is queued, then [`Self::pop_batch`]
    /// returns `false`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Moves up to `max_batch` windows into `out` (which must be empty). Blocks until at least
    /// one window is available, then waits at most `max_wait` for more. Returns `false` once the
    /// queue is closed and empty. `idle_tick` bounds each wait while the queue is empty, so the
    /// caller's `on_idle` can report liveness.
    pub fn pop_batch(
        &self,
        out: &mut Vec<WindowJob>,
        max_batch: usize,
        max_wait: Duration,
        idle_tick: Duration,
        mut on_idle: impl FnMut(),
    ) -> bool {
        let max_batch = max_batch.max(1);
        let mut st = self.lock();
        while st.jobs.is_empty() {
            if st.closed {
                return false;
            }
            st = self
                .ready
                .wait_timeout(st, idle_tick)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            on_idle();
        }
        let deadline = Instant::now() + max_wait;
        loop {
            while out.len() < max_batch {
                match st.jobs.pop_front() {
                    Some(j) => out.push(j),
                    None => break,
                }
            }
            if out.len() >= max_batch || st.closed {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            st = self
                .ready
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Free list of window buffers, bounded to `capacity` buffers.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<f32>>>,
    capacity: usize,
}

impl BufferPool {
    /// A pool keeping at most `capacity` idle buffers.
    pub fn new(capacity: usize) -> Self {
        BufferPool {
            free: Mutex::new(Vec::new()),
            capacity,
        }
    }

    /// A buffer of exactly `len` values (content unspecified).
    pub fn take(&self, len: usize) -> Vec<f32> {
        let recycled = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut v = recycled.unwrap_or_default();
        v.resize(len, 0.0);
        v
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, v: Vec<f32>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.capacity {
            free.push(v);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::thread;

    fn job(index: u64) -> WindowJob {
        WindowJob {
            sensor: Arc::new(SensorInfo {
                id: "s".into(),
                inference_topic: "t".into(),
            }),
            index,
            end_ts_ms: 0,
            ready_at: Instant::now(),
            generation: 0,
            data: vec![index as f32],
        }
    }

    fn pop(q: &WindowQueue, max: usize, wait_ms: u64) -> Option<Vec<u64>> {
        let mut out = Vec::new();
        let ok = q.pop_batch(
            &mut out,
            max,
            Duration::from_millis(wait_ms),
            Duration::from_millis(10),
            || {},
        );
        ok.then(|| out.iter().map(|j| j.index).collect())
    }

    #[test]
    fn full_queue_drops_oldest_by_default_policy() {
        let q = WindowQueue::new(2, QueuePolicy::DropOldest);
        assert!(matches!(q.push(job(0)), PushOutcome::Queued));
        assert!(matches!(q.push(job(1)), PushOutcome::Queued));
        match q.push(job(2)) {
            PushOutcome::EvictedOldest(old) => assert_eq!(old.index, 0),
            other => panic!("expected eviction, got {other:?}"),
        }
        assert_eq!(pop(&q, 10, 0), Some(vec![1, 2]));
    }

    #[test]
    fn full_queue_refuses_newest_with_drop_newest() {
        let q = WindowQueue::new(1, QueuePolicy::DropNewest);
        q.push(job(0));
        assert!(matches!(q.push(job(1)), PushOutcome::Refused(j) if j.index == 1));
        assert_eq!(pop(&q, 10, 0), Some(vec![0]));
    }

    #[test]
    fn batches_are_capped_at_max_batch() {
        let q = WindowQueue::new(10, QueuePolicy::DropOldest);
        for i in 0..5 {
            q.push(job(i));
        }
        assert_eq!(pop(&q, 2, 0), Some(vec![0, 1]));
        assert_eq!(pop(&q, 10, 0), Some(vec![2, 3, 4]));
    }

    #[test]
    fn a_partial_batch_waits_for_more_windows_up_to_max_wait() {
        let q = Arc::new(WindowQueue::new(10, QueuePolicy::DropOldest));
        q.push(job(0));
        let producer = {
            let q = q.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                q.push(job(1));
            })
        };
        let t0 = Instant::now();
        assert_eq!(pop(&q, 2, 2000), Some(vec![0, 1]));
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "returned once the batch filled"
        );
        producer.join().unwrap();
        q.push(job(2));
        let t0 = Instant::now();
        assert_eq!(pop(&q, 2, 30), Some(vec![2]));
        assert!(t0.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn closed_queue_is_drained_then_reports_the_end() {
        let q = WindowQueue::new(10, QueuePolicy::DropOldest);
        q.push(job(0));
        q.close();
        assert!(matches!(q.push(job(1)), PushOutcome::Refused(_)));
        assert_eq!(pop(&q, 10, 1000), Some(vec![0]));
        assert_eq!(pop(&q, 10, 1000), None);
    }

    #[test]
    fn closing_wakes_a_waiting_consumer() {
        let q = Arc::new(WindowQueue::new(10, QueuePolicy::DropOldest));
        let consumer = {
            let q = q.clone();
            thread::spawn(move || pop(&q, 1, 0))
        };
        thread::sleep(Duration::from_millis(20));
        q.close();
        assert_eq!(consumer.join().unwrap(), None);
    }

    #[test]
    fn pool_recycles_buffers_up_to_its_capacity() {
        let pool = BufferPool::new(1);
        let a = pool.take(4);
        let ptr = a.as_ptr();
        pool.give(a);
        pool.give(vec![0.0; 4]);
        let b = pool.take(4);
        assert_eq!((b.len(), b.as_ptr()), (4, ptr));
        assert_eq!(pool.take(3).len(), 3);
    }
}
