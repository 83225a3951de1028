//! Bounded queue of complete windows and micro-batching for the inference threads.
//!
//! Data flow: decode → window → **queue → micro-batch** → infer → publish. The decode threads
//! [`WindowQueue::push`] complete windows; each inference thread takes up to `max_batch`
//! windows with [`WindowQueue::pop_batch`], waiting for the batch to fill until the oldest
//! queued window has been ready for `max_wait`.
//!
//! Wake-ups are what this queue saves. A producer wakes the consumers only when the queue
//! goes from empty to one window (a consumer may be waiting for a first window) or reaches a
//! full batch (a consumer may be waiting for it to fill), and only when one is waiting. A
//! consumer filling a batch leaves the windows queued and sleeps until the batch is full or
//! its `max_wait` has passed, instead of waking once per window.
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
    /// Consumers blocked in [`WindowQueue::pop_batch`].
    waiting: usize,
    /// The largest `max_batch` a consumer waits for: a push that reaches it wakes them.
    fill_target: usize,
    /// Times a consumer woke from a wait.
    wakeups: u64,
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
                waiting: 0,
                fill_target: 1,
                wakeups: 0,
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

    /// How often consumers have woken from a wait so far.
    pub fn wakeups(&self) -> u64 {
        self.lock().wakeups
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
        let len = st.jobs.len();
        let wake = st.waiting > 0 && (len == 1 || len == st.fill_target.min(self.capacity));
        drop(st);
        if wake {
            self.ready.notify_all();
        }
        outcome
    }

    /// Stops accepting windows; consumers drain what is queued, then [`Self::pop_batch`]
    /// returns `false`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Moves up to `max_batch` windows into `out` (which must be empty). Blocks until at least
    /// one window is available, then waits for more until the oldest queued window has been
    /// ready (its [`WindowJob::ready_at`]) for `max_wait`. Returns `false` once the
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
        st.fill_target = st.fill_target.max(max_batch);
        loop {
            while st.jobs.is_empty() {
                if st.closed {
                    return false;
                }
                st = self.wait(st, idle_tick);
                on_idle();
            }
            // Let the batch fill in the queue: producers wake us only when it is full. The
            // wait counts from when the oldest queued window became ready, so a window that
            // already waited (behind the previous batch) does not wait `max_wait` again. The
            // oldest is looked up after every wake: another consumer may have taken it.
            while st.jobs.len() < max_batch && !st.closed {
                let Some(oldest) = st.jobs.front().map(|j| j.ready_at) else {
                    break;
                };
                let deadline = oldest + max_wait;
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st = self.wait(st, deadline - now);
            }
            // Another consumer may have taken them meanwhile: then wait for the next one.
            if !st.jobs.is_empty() || st.closed {
                let n = st.jobs.len().min(max_batch);
                out.extend(st.jobs.drain(..n));
                return true;
            }
        }
    }

    fn wait<'a>(&self, mut st: MutexGuard<'a, State>, limit: Duration) -> MutexGuard<'a, State> {
        st.waiting += 1;
        let mut st = self
            .ready
            .wait_timeout(st, limit)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        st.waiting -= 1;
        st.wakeups += 1;
        st
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
        let third = job(2);
        let ready = third.ready_at;
        q.push(third);
        assert_eq!(pop(&q, 2, 30), Some(vec![2]));
        assert!(ready.elapsed() >= Duration::from_millis(30));
    }

    /// The wait counts from when the oldest window became ready: windows that queued up
    /// behind a previous batch for longer than `max_wait` go at once, even in a partial batch.
    #[test]
    fn windows_that_already_waited_max_wait_are_taken_without_waiting_again() {
        let q = WindowQueue::new(10, QueuePolicy::DropOldest);
        let mut old = job(0);
        old.ready_at = Instant::now()
            .checked_sub(Duration::from_millis(500))
            .unwrap();
        q.push(old);
        q.push(job(1));
        let t0 = Instant::now();
        assert_eq!(pop(&q, 8, 400), Some(vec![0, 1]));
        assert!(
            t0.elapsed() < Duration::from_millis(300),
            "waited {:?} for a batch whose oldest window was 500 ms old",
            t0.elapsed()
        );
        // A fresh window still waits for its batch.
        let fresh = job(2);
        let ready = fresh.ready_at;
        q.push(fresh);
        assert_eq!(pop(&q, 8, 50), Some(vec![2]));
        assert!(ready.elapsed() >= Duration::from_millis(50));
    }

    /// A consumer filling a batch is not woken once per window: 20 windows pushed one by
    /// one while it waits wake it once for the first and once for the full batch.
    #[test]
    fn a_filling_consumer_wakes_for_the_first_window_and_the_full_batch_only() {
        let q = Arc::new(WindowQueue::new(64, QueuePolicy::DropOldest));
        let consumer = {
            let q = q.clone();
            thread::spawn(move || pop(&q, 20, 5_000))
        };
        while q.lock().waiting == 0 {
            thread::sleep(Duration::from_millis(1));
        }
        let before = q.wakeups();
        let t0 = Instant::now();
        for i in 0..20 {
            q.push(job(i));
            thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(consumer.join().unwrap(), Some((0..20).collect()));
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "the full batch woke it"
        );
        let woke = q.wakeups() - before;
        // The OS may wake a waiter spuriously: leave room for a couple.
        assert!(woke <= 4, "{woke} wake-ups for 20 windows");
    }

    #[test]
    fn two_consumers_share_the_windows_without_loss_or_duplicates() {
        let q = Arc::new(WindowQueue::new(1024, QueuePolicy::DropNewest));
        let consumers: Vec<_> = (0..2)
            .map(|_| {
                let q = q.clone();
                thread::spawn(move || {
                    let mut got = Vec::new();
                    while let Some(batch) = pop(&q, 7, 1) {
                        got.extend(batch);
                    }
                    got
                })
            })
            .collect();
        for i in 0..1000 {
            assert!(matches!(q.push(job(i)), PushOutcome::Queued));
            if i % 50 == 0 {
                thread::sleep(Duration::from_millis(1));
            }
        }
        q.close();
        let mut all: Vec<u64> = consumers
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
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
