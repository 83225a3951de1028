//! The bounded queue of sensor and label messages in front of one decode thread.
//!
//! Data flow: MQTT in → route → **inbox** → decode → window → ... The event loop
//! [`Inbox::push`]es every message it routes and wakes the decode thread once per burst
//! ([`Inbox::flush`], called when rumqttc has no further event buffered), not once per
//! message: rumqttc reads up to 10 packets per socket read, and every wake-up of a sleeping
//! thread is a futex call and a context switch, on a board whose 2 cores also run the broker.
//! The decode thread takes everything queued in one step ([`Inbox::take`]), swapping its empty
//! buffer for the full one, so a steady stream allocates nothing.
//!
//! The queue holds at most `capacity` messages; a push beyond that is refused and the caller
//! counts it (`ingest_dropped`). It never blocks the event loop.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::pipeline::Ingest;

#[derive(Debug, Default)]
struct State {
    queue: Vec<Ingest>,
    /// The decode thread is blocked in [`Inbox::take`].
    waiting: bool,
    /// Times the decode thread woke from a wait.
    wakeups: u64,
}

/// Messages routed to one decode thread and not yet taken.
#[derive(Debug)]
pub struct Inbox {
    state: Mutex<State>,
    ready: Condvar,
    capacity: usize,
}

impl Inbox {
    /// An inbox of at most `capacity` messages (at least 1).
    pub fn new(capacity: usize) -> Self {
        Inbox {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `msg` without waking the decode thread; gives it back when the inbox is full.
    pub fn push(&self, msg: Ingest) -> Result<(), Ingest> {
        let mut st = self.lock();
        if st.queue.len() >= self.capacity {
            return Err(msg);
        }
        st.queue.push(msg);
        Ok(())
    }

    /// Wakes the decode thread if it sleeps and messages wait.
    pub fn flush(&self) {
        let st = self.lock();
        let wake = st.waiting && !st.queue.is_empty();
        drop(st);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Moves every queued message into `out` (which should be empty: its content is
    /// replaced), waiting up to `limit` for one when none is queued. Returns how many it moved.
    pub fn take(&self, out: &mut Vec<Ingest>, limit: Duration) -> usize {
        out.clear();
        let mut st = self.lock();
        if st.queue.is_empty() {
            st.waiting = true;
            st = self
                .ready
                .wait_timeout(st, limit)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            st.waiting = false;
            st.wakeups += 1;
        }
        std::mem::swap(&mut st.queue, out);
        out.len()
    }

    /// Messages queued.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether no message is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the decode thread is blocked waiting for a message.
    pub fn is_waiting(&self) -> bool {
        self.lock().waiting
    }

    /// How often the decode thread has woken from a wait so far.
    pub fn wakeups(&self) -> u64 {
        self.lock().wakeups
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pipeline::IngestKind;
    use std::sync::Arc;
    use std::time::Instant;

    fn msg(id: &str) -> Ingest {
        let topic = format!("diredi/v1/gw/sensor/{id}");
        Ingest {
            id_start: topic.len() - id.len(),
            publish: rumqttc::Publish::new(topic, rumqttc::QoS::AtMostOnce, b"{}".to_vec()),
            kind: IngestKind::Samples,
        }
    }

    #[test]
    fn a_full_inbox_refuses_and_take_moves_everything_in_order() {
        let inbox = Inbox::new(2);
        assert!(inbox.push(msg("a")).is_ok());
        assert!(inbox.push(msg("b")).is_ok());
        let refused = inbox.push(msg("c")).unwrap_err();
        assert_eq!(refused.sensor_id(), "c");
        let mut out = vec![msg("stale")];
        assert_eq!(inbox.take(&mut out, Duration::ZERO), 2);
        let ids: Vec<&str> = out.iter().map(Ingest::sensor_id).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(inbox.is_empty());
        assert!(inbox.push(msg("d")).is_ok(), "taking frees the room");
    }

    #[test]
    fn an_empty_take_waits_for_its_limit() {
        let inbox = Inbox::new(4);
        let mut out = Vec::new();
        let t = Instant::now();
        assert_eq!(inbox.take(&mut out, Duration::from_millis(30)), 0);
        assert!(t.elapsed() >= Duration::from_millis(30));
    }

    /// A burst of pushes wakes a sleeping decode thread once, at the flush, and not before.
    #[test]
    fn a_sleeping_reader_wakes_at_the_flush_not_at_each_push() {
        let inbox = Arc::new(Inbox::new(64));
        let reader = {
            let inbox = inbox.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let t = Instant::now();
                let n = inbox.take(&mut out, Duration::from_secs(10));
                (n, t.elapsed())
            })
        };
        // Let the reader block first.
        while !inbox.is_waiting() {
            std::thread::sleep(Duration::from_millis(1));
        }
        for i in 0..10 {
            inbox.push(msg(&format!("s{i}"))).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(inbox.is_waiting(), "pushes alone do not wake the reader");
        assert_eq!(inbox.wakeups(), 0);
        inbox.flush();
        let (n, waited) = reader.join().unwrap();
        assert_eq!(n, 10, "the reader takes the whole burst in one step");
        assert!(waited < Duration::from_secs(5), "woken by the flush");
        assert_eq!(inbox.wakeups(), 1);
    }
}
