//! Rate limiting of error-topic messages.
//!
//! Data flow: a rejected input (decode → **reject**) produces one message on
//! `diredi/v1/{gw}/error` unless its sensor has already used its budget in the current
//! one-second window. Sans-IO: callers pass the time.
//!
//! Policy: fixed windows of one second per key (sensor id). The first `per_window` errors of a
//! key in each window are published, so the first error of every sensor in any second always
//! gets through; later ones are suppressed and counted, and the count is attached to the next
//! error published for that key. Keys without their own state (sensors that were refused, bad
//! sensor ids) share a bounded [`KeyedLimiter`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Length of a rate-limit window.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Decision for one error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Publish it; `suppressed_before` errors of this key were dropped since the last one
    /// published.
    Send {
        /// Errors suppressed since the previous published error of this key.
        suppressed_before: u64,
    },
    /// Drop it (it has been counted).
    Suppress,
}

/// Budget state of one key.
#[derive(Debug, Clone, Default)]
pub struct KeyBudget {
    window_start: Option<Instant>,
    sent: u32,
    suppressed: u64,
}

impl KeyBudget {
    /// Accounts for one error at `now` with `per_window` errors allowed per window (at least 1
    /// is always allowed).
    pub fn check(&mut self, now: Instant, per_window: u32) -> Verdict {
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= WINDOW);
        if expired {
            self.window_start = Some(now);
            self.sent = 0;
        }
        if self.sent < per_window.max(1) {
            self.sent += 1;
            let suppressed_before = std::mem::take(&mut self.suppressed);
            Verdict::Send { suppressed_before }
        } else {
            self.suppressed += 1;
            Verdict::Suppress
        }
    }

    fn idle(&self, now: Instant) -> bool {
        self.window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= WINDOW)
            && self.suppressed == 0
    }
}

/// Budgets for keys that have no state elsewhere, bounded to `capacity` keys. When full, idle
/// keys are evicted; if none is idle, the error is charged to one shared overflow budget.
#[derive(Debug)]
pub struct KeyedLimiter {
    per_window: u32,
    capacity: usize,
    keys: HashMap<String, KeyBudget>,
    overflow: KeyBudget,
}

impl KeyedLimiter {
    /// A limiter allowing `per_window` errors per key and second, tracking up to `capacity`
    /// keys.
    pub fn new(per_window: u32, capacity: usize) -> Self {
        KeyedLimiter {
            per_window,
            capacity: capacity.max(1),
            keys: HashMap::new(),
            overflow: KeyBudget::default(),
        }
    }

    /// Accounts for one error of `key` at `now`.
    pub fn check(&mut self, key: &str, now: Instant) -> Verdict {
        if let Some(b) = self.keys.get_mut(key) {
            return b.check(now, self.per_window);
        }
        if self.keys.len() >= self.capacity {
            self.keys.retain(|_, b| !b.idle(now));
        }
        if self.keys.len() >= self.capacity {
            return self.overflow.check(now, self.per_window);
        }
        let mut b = KeyBudget::default();
        let v = b.check(now, self.per_window);
        self.keys.insert(key.to_owned(), b);
        v
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn first_error_of_each_second_passes_and_the_rest_are_counted() {
        let t0 = Instant::now();
        let mut b = KeyBudget::default();
        assert_eq!(
            b.check(t0, 1),
            Verdict::Send {
                suppressed_before: 0
            }
        );
        assert_eq!(b.check(t0 + ms(10), 1), Verdict::Suppress);
        assert_eq!(b.check(t0 + ms(999), 1), Verdict::Suppress);
        assert_eq!(
            b.check(t0 + ms(1000), 1),
            Verdict::Send {
                suppressed_before: 2
            }
        );
        assert_eq!(b.check(t0 + ms(1500), 1), Verdict::Suppress);
        assert_eq!(
            b.check(t0 + ms(5000), 1),
            Verdict::Send {
                suppressed_before: 1
            }
        );
    }

    #[test]
    fn budget_of_several_errors_per_second_is_honoured() {
        let t0 = Instant::now();
        let mut b = KeyBudget::default();
        let sent = (0..10)
            .filter(|i| matches!(b.check(t0 + ms(*i), 3), Verdict::Send { .. }))
            .count();
        assert_eq!(sent, 3);
    }

    #[test]
    fn keys_are_limited_independently() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(1, 8);
        assert!(matches!(l.check("a", t0), Verdict::Send { .. }));
        assert!(matches!(l.check("b", t0), Verdict::Send { .. }));
        assert_eq!(l.check("a", t0 + ms(1)), Verdict::Suppress);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn a_full_limiter_evicts_idle_keys_or_falls_back_to_the_overflow_budget() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(1, 2);
        l.check("a", t0);
        l.check("b", t0);
        // Both keys are inside their window: "c" and "d" share the overflow budget.
        assert!(matches!(l.check("c", t0), Verdict::Send { .. }));
        assert_eq!(l.check("d", t0), Verdict::Suppress);
        assert_eq!(l.len(), 2);
        // A second later a and b are idle and get evicted.
        assert!(matches!(l.check("e", t0 + ms(1000)), Verdict::Send { .. }));
        assert_eq!(l.len(), 1);
    }
}
