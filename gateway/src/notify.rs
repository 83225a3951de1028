//! systemd integration and pipeline health.
//!
//! Where it stands: beside the data flow. The decode and inference threads and the MQTT event
//! loop report liveness into [`Health`]; the watchdog task pings systemd (`WATCHDOG=1`) only
//! while [`Health::check`] passes, so a hung pipeline gets restarted. `READY=1` is sent once the
//! model is loaded and the sensor subscription is acknowledged; `STOPPING=1` when shutdown
//! starts.
//!
//! A thread is unhealthy when it has exited unexpectedly or has been busy with one item
//! (a message or a batch) for longer than [`STALL_LIMIT`]. The event loop is unhealthy when it
//! has not come back from the network for longer than its own bound (keep-alive or reconnect
//! delay, plus slack).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Longest time one message or batch may take before the thread counts as stalled.
pub const STALL_LIMIT: Duration = Duration::from_secs(15);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds on a process-wide monotonic clock, never 0.
fn mono_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// Liveness of one pipeline thread.
#[derive(Debug)]
pub struct ThreadHealth {
    name: String,
    alive: AtomicBool,
    busy_since: AtomicU64,
}

impl ThreadHealth {
    /// A live, idle thread named `name`.
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        epoch();
        Arc::new(ThreadHealth {
            name: name.into(),
            alive: AtomicBool::new(true),
            busy_since: AtomicU64::new(0),
        })
    }

    /// The thread started an item.
    pub fn busy(&self) {
        self.busy_since.store(mono_ms(), Ordering::Relaxed);
    }

    /// The thread finished an item or is waiting.
    pub fn idle(&self) {
        self.busy_since.store(0, Ordering::Relaxed);
    }

    /// The thread has ended (called from a drop guard, so also on panic).
    pub fn exited(&self) {
        self.alive.store(false, Ordering::Release);
    }

    fn problem(&self, now_ms: u64, stall: Duration) -> Option<String> {
        if !self.alive.load(Ordering::Acquire) {
            return Some(format!("{} has stopped", self.name));
        }
        let since = self.busy_since.load(Ordering::Relaxed);
        let busy = Duration::from_millis(now_ms.saturating_sub(since));
        (since != 0 && busy > stall).then(|| format!("{} is stuck for {:.0?}", self.name, busy))
    }
}

/// Marks a thread as exited when dropped.
#[derive(Debug)]
pub struct ExitGuard(pub Arc<ThreadHealth>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.exited();
    }
}

/// Liveness of the MQTT event loop.
#[derive(Debug)]
pub struct LoopHealth {
    beat: AtomicU64,
    max_silence: Duration,
    finished: AtomicBool,
}

impl LoopHealth {
    /// An event loop expected to come back at least every `max_silence`.
    pub fn new(max_silence: Duration) -> Arc<Self> {
        Arc::new(LoopHealth {
            beat: AtomicU64::new(mono_ms()),
            max_silence,
            finished: AtomicBool::new(false),
        })
    }

    /// The loop made progress.
    pub fn beat(&self) {
        self.beat.store(mono_ms(), Ordering::Relaxed);
    }

    /// The loop has ended.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::Release);
    }
}

/// Everything the watchdog looks at.
#[derive(Debug, Default)]
pub struct Health {
    threads: Mutex<Vec<Arc<ThreadHealth>>>,
    loops: Mutex<Vec<(String, Arc<LoopHealth>)>>,
    stall_limit: Option<Duration>,
}

impl Health {
    /// Empty health registry with the default stall limit.
    pub fn new() -> Self {
        Health::default()
    }

    /// Same, with another stall limit (tests).
    pub fn with_stall_limit(stall_limit: Duration) -> Self {
        Health {
            stall_limit: Some(stall_limit),
            ..Health::default()
        }
    }

    /// Watches a thread.
    pub fn add_thread(&self, t: Arc<ThreadHealth>) {
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t);
    }

    /// Watches an event loop.
    pub fn add_loop(&self, name: &str, l: Arc<LoopHealth>) {
        self.loops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_owned(), l));
    }

    /// Threads and loops that have ended (a subset of what [`Self::check`] reports): these
    /// never recover, so the gateway stops instead of waiting for the watchdog.
    pub fn stopped(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|t| !t.alive.load(Ordering::Acquire))
            .map(|t| format!("{} has stopped", t.name))
            .collect();
        for (name, l) in self.loops.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if l.finished.load(Ordering::Acquire) {
                out.push(format!("{name} MQTT event loop has stopped"));
            }
        }
        out
    }

    /// `Ok` when every watched thread and loop is alive and progressing; otherwise every
    /// problem found.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let now = mono_ms();
        let stall = self.stall_limit.unwrap_or(STALL_LIMIT);
        let mut problems: Vec<String> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|t| t.problem(now, stall))
            .collect();
        for (name, l) in self.loops.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if l.finished.load(Ordering::Acquire) {
                problems.push(format!("{name} MQTT event loop has stopped"));
                continue;
            }
            let silent = Duration::from_millis(now.saturating_sub(l.beat.load(Ordering::Relaxed)));
            if silent > l.max_silence {
                problems.push(format!("{name} MQTT event loop silent for {silent:.0?}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Service-manager notifications.
pub trait Notifier: Send + Sync + 'static {
    /// `READY=1`.
    fn ready(&self);
    /// `WATCHDOG=1`.
    fn watchdog(&self);
    /// `STOPPING=1`.
    fn stopping(&self);
    /// `STATUS=...`.
    fn status(&self, text: &str);
    /// How often the service manager expects `WATCHDOG=1`; `None` when it does not.
    fn watchdog_timeout(&self) -> Option<Duration>;
}

/// Notifies systemd through `NOTIFY_SOCKET`; does nothing when not started by systemd.
#[derive(Debug, Default, Clone, Copy)]
pub struct Systemd;

impl Systemd {
    fn send(states: &[sd_notify::NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::debug!(error = %e, "Cannot notify systemd.");
        }
    }
}

impl Notifier for Systemd {
    fn ready(&self) {
        Systemd::send(&[sd_notify::NotifyState::Ready]);
    }

    fn watchdog(&self) {
        Systemd::send(&[sd_notify::NotifyState::Watchdog]);
    }

    fn stopping(&self) {
        Systemd::send(&[sd_notify::NotifyState::Stopping]);
    }

    fn status(&self, text: &str) {
        Systemd::send(&[sd_notify::NotifyState::Status(text)]);
    }

    fn watchdog_timeout(&self) -> Option<Duration> {
        let mut usec = 0;
        sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec))
    }
}

/// Pings the watchdog at half its timeout while the pipeline is healthy; logs (once per
/// episode) when it is not. Returns when `shutdown` is cancelled or there is no watchdog.
pub async fn watchdog(
    notifier: Arc<dyn Notifier>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let Some(timeout) = notifier.watchdog_timeout() else {
        return;
    };
    let period = (timeout / 2).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unhealthy = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match health.check() {
            Ok(()) => {
                if unhealthy {
                    tracing::info!("Pipeline healthy again; watchdog pings resume.");
                    unhealthy = false;
                }
                notifier.watchdog();
            }
            Err(problems) => {
                if !unhealthy {
                    tracing::error!(problems = %problems.join("; "), "Pipeline unhealthy; withholding watchdog pings so systemd restarts the gateway.");
                    unhealthy = true;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// Records notifications.
    #[derive(Debug, Default)]
    pub(crate) struct Recorded {
        pub events: Mutex<Vec<String>>,
        pub watchdog: Option<Duration>,
    }

    impl Notifier for Recorded {
        fn ready(&self) {
            self.events.lock().unwrap().push("READY".into());
        }
        fn watchdog(&self) {
            self.events.lock().unwrap().push("WATCHDOG".into());
        }
        fn stopping(&self) {
            self.events.lock().unwrap().push("STOPPING".into());
        }
        fn status(&self, text: &str) {
            self.events.lock().unwrap().push(format!("STATUS={text}"));
        }
        fn watchdog_timeout(&self) -> Option<Duration> {
            self.watchdog
        }
    }

    #[test]
    fn stopped_or_stuck_threads_make_the_pipeline_unhealthy() {
        let h = Health::with_stall_limit(Duration::from_millis(30));
        let a = ThreadHealth::new("inference-0");
        let b = ThreadHealth::new("decode-0");
        h.add_thread(a.clone());
        h.add_thread(b.clone());
        assert_eq!(h.check(), Ok(()));
        a.busy();
        std::thread::sleep(Duration::from_millis(50));
        let p = h.check().unwrap_err();
        assert!(p[0].starts_with("inference-0 is stuck"), "{p:?}");
        a.idle();
        drop(ExitGuard(b));
        assert_eq!(
            h.check().unwrap_err(),
            vec!["decode-0 has stopped".to_string()]
        );
    }

    #[test]
    fn a_silent_or_finished_event_loop_is_unhealthy() {
        let h = Health::new();
        let l = LoopHealth::new(Duration::from_millis(20));
        h.add_loop("local", l.clone());
        assert!(h.check().is_ok());
        std::thread::sleep(Duration::from_millis(40));
        assert!(h.check().unwrap_err()[0].contains("silent"));
        l.beat();
        assert!(h.check().is_ok());
        l.finish();
        assert!(h.check().unwrap_err()[0].contains("stopped"));
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_pings_only_while_healthy() {
        let rec = Arc::new(Recorded {
            watchdog: Some(Duration::from_secs(2)),
            ..Recorded::default()
        });
        let health = Arc::new(Health::new());
        let t = ThreadHealth::new("w");
        health.add_thread(t.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(watchdog(rec.clone(), health.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let pings = rec.events.lock().unwrap().len();
        assert_eq!(pings, 4, "ticks at 0, 1, 2 and 3 s");
        t.exited();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            rec.events.lock().unwrap().len(),
            pings,
            "no ping while unhealthy"
        );
        stop.cancel();
        task.await.unwrap();
    }
}
