//! Which of a sensor's windows a user's labels name. Sans-IO, one [`LabelBook`] per sensor,
//! owned by the sensor's decode thread.
//!
//! Data flow: `label/{sensor}` → **label book** → [`crate::store`]. A label is either a time
//! range with a class (`{"from_ts", "to_ts", "class"}`: every sample in the range belongs to
//! the class) or a window id from an inference message (`{"window_id", "class"}`).
//!
//! A window is labelled by ranges when ranges of one class cover all of its samples. Ranges
//! that follow each other within 1.5 sample periods are joined, so a labeller may send one
//! range per message of samples. Ranges may arrive before or after the windows they cover:
//! the book keeps the last `recent` windows of the sensor and the last `spans` joined ranges,
//! both bounded.

use std::collections::VecDeque;

/// A complete window, as the decode thread saw it.
#[derive(Debug, Clone)]
pub struct RecentWindow {
    /// Index among the sensor's windows (the number in its window id).
    pub index: u64,
    /// Unix ms of its first and last samples.
    pub start_ts: i64,
    /// Unix ms of its last sample.
    pub end_ts: i64,
    /// `C × T` standardised values.
    pub data: Vec<f32>,
}

/// A window and the class a label gave it.
#[derive(Debug, Clone)]
pub struct Labelled {
    /// The window.
    pub window: RecentWindow,
    /// Its class.
    pub class: String,
}

#[derive(Debug, Clone, PartialEq)]
struct Span {
    from: i64,
    to: i64,
    class: String,
}

/// One sensor's recent windows and label ranges.
#[derive(Debug)]
pub struct LabelBook {
    recent: VecDeque<(RecentWindow, Option<String>)>,
    spans: VecDeque<Span>,
    max_recent: usize,
    max_spans: usize,
    join_ms: i64,
}

impl LabelBook {
    /// A book keeping `max_recent` windows and `max_spans` ranges, for samples `period_ms`
    /// apart.
    pub fn new(max_recent: usize, max_spans: usize, period_ms: f64) -> Self {
        LabelBook {
            recent: VecDeque::with_capacity(max_recent),
            spans: VecDeque::new(),
            max_recent,
            max_spans: max_spans.max(1),
            join_ms: (period_ms * 1.5).ceil() as i64,
        }
    }

    fn covering(&self, w: &RecentWindow) -> Option<&str> {
        self.spans
            .iter()
            .find(|s| s.from <= w.start_ts && w.end_ts <= s.to)
            .map(|s| s.class.as_str())
    }

    /// A window completed; returns it labelled when known ranges already cover it.
    pub fn on_window(&mut self, w: RecentWindow) -> Option<Labelled> {
        let class = self.covering(&w).map(str::to_owned);
        let out = class.clone().map(|class| Labelled {
            window: w.clone(),
            class,
        });
        if self.max_recent > 0 {
            if self.recent.len() == self.max_recent {
                self.recent.pop_front();
            }
            self.recent.push_back((w, class));
        }
        out
    }

    /// A range label; returns the recent windows it (joined with earlier ranges of the same
    /// class) newly covers, or covers with another class than before.
    pub fn on_range(&mut self, from: i64, to: i64, class: &str) -> Vec<Labelled> {
        if to < from {
            return Vec::new();
        }
        // Ranges of another class lose the part this one overlaps: the newest label wins.
        let mut kept = VecDeque::with_capacity(self.spans.len() + 1);
        for s in self.spans.drain(..) {
            if s.class == class || s.to < from || to < s.from {
                kept.push_back(s);
                continue;
            }
            if s.from < from {
                kept.push_back(Span {
                    to: from - 1,
                    ..s.clone()
                });
            }
            if to < s.to {
                kept.push_back(Span { from: to + 1, ..s });
            }
        }
        self.spans = kept;
        let mut span = Span {
            from,
            to,
            class: class.to_owned(),
        };
        let join = self.join_ms;
        self.spans.retain(|s| {
            let touches =
                s.class == span.class && s.from <= span.to + join && span.from <= s.to + join;
            if touches {
                span.from = span.from.min(s.from);
                span.to = span.to.max(s.to);
            }
            !touches
        });
        self.spans.push_back(span);
        while self.spans.len() > self.max_spans {
            self.spans.pop_front();
        }
        self.relabel()
    }

    /// A window-id label; returns the window when it is still among the recent ones.
    pub fn on_window_id(&mut self, index: u64, class: &str) -> Option<Labelled> {
        let (w, label) = self.recent.iter_mut().find(|(w, _)| w.index == index)?;
        *label = Some(class.to_owned());
        Some(Labelled {
            window: w.clone(),
            class: class.to_owned(),
        })
    }

    fn relabel(&mut self) -> Vec<Labelled> {
        let mut out = Vec::new();
        for i in 0..self.recent.len() {
            let class = self.covering(&self.recent[i].0).map(str::to_owned);
            let (w, label) = &mut self.recent[i];
            if class.is_some() && *label != class {
                label.clone_from(&class);
                if let Some(class) = class {
                    out.push(Labelled {
                        window: w.clone(),
                        class,
                    });
                }
            }
        }
        out
    }
}

/// The window index in a window id `"{sensor}:{index}"` of `sensor`.
pub fn window_index(window_id: &str, sensor: &str) -> Option<u64> {
    let (s, i) = window_id.rsplit_once(':')?;
    (s == sensor).then_some(())?;
    i.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Window `i` of 4 samples, stride 2, 20 ms period: samples `2i .. 2i+3`.
    fn w(i: u64) -> RecentWindow {
        let start = i as i64 * 40;
        RecentWindow {
            index: i,
            start_ts: start,
            end_ts: start + 60,
            data: vec![i as f32; 4],
        }
    }

    fn classes(v: &[Labelled]) -> Vec<(u64, &str)> {
        v.iter()
            .map(|l| (l.window.index, l.class.as_str()))
            .collect()
    }

    #[test]
    fn consecutive_ranges_join_to_cover_windows_that_came_first() {
        let mut b = LabelBook::new(8, 16, 20.0);
        for i in 0..4 {
            assert!(b.on_window(w(i)).is_none());
        }
        // One range per 2-sample message, as the simulator sends them.
        let mut got = Vec::new();
        for m in 0..6 {
            got.extend(b.on_range(m * 40, m * 40 + 20, "walk"));
        }
        assert_eq!(
            classes(&got),
            [(0, "walk"), (1, "walk"), (2, "walk"), (3, "walk")]
        );
        // Nothing is labelled twice with the same class.
        assert!(b.on_range(0, 20, "walk").is_empty());
    }

    #[test]
    fn ranges_first_then_windows() {
        let mut b = LabelBook::new(8, 16, 20.0);
        b.on_range(0, 200, "sit");
        assert_eq!(b.on_window(w(1)).map(|l| l.class), Some("sit".into()));
        // Window 4 spans 160..220: not covered.
        assert!(b.on_window(w(4)).is_none());
    }

    #[test]
    fn a_window_across_two_classes_is_not_labelled_and_the_newest_label_wins() {
        let mut b = LabelBook::new(8, 16, 20.0);
        b.on_window(w(0)); // 0..60
        b.on_window(w(1)); // 40..100
        let got = b.on_range(0, 50, "walk");
        assert!(got.is_empty(), "{:?}", classes(&got));
        let got = b.on_range(51, 100, "sit");
        assert!(got.is_empty(), "{:?}", classes(&got));
        // Relabelling the whole stretch as sit covers both.
        let got = b.on_range(0, 100, "sit");
        assert_eq!(classes(&got), [(0, "sit"), (1, "sit")]);
        // A label inside a longer one of another class splits it.
        let mut b = LabelBook::new(8, 16, 20.0);
        b.on_range(0, 1000, "walk");
        b.on_range(300, 400, "lie");
        assert_eq!(b.on_window(w(2)).map(|l| l.class), Some("walk".into())); // 80..140
        assert!(b.on_window(w(7)).is_none()); // 280..340 crosses walk and lie
        assert_eq!(b.on_window(w(8)).map(|l| l.class), Some("lie".into())); // 320..380
    }

    #[test]
    fn window_ids_label_recent_windows_only() {
        let mut b = LabelBook::new(2, 4, 20.0);
        for i in 0..3 {
            b.on_window(w(i));
        }
        assert!(b.on_window_id(0, "lie").is_none(), "evicted");
        assert_eq!(
            b.on_window_id(2, "lie").map(|l| l.window.data[0]),
            Some(2.0)
        );
        assert_eq!(window_index("s1:17", "s1"), Some(17));
        assert_eq!(window_index("s1:17", "s2"), None);
        assert_eq!(window_index("a:b:3", "a:b"), Some(3));
        assert_eq!(window_index("s1:x", "s1"), None);
    }

    #[test]
    fn spans_are_bounded_and_backward_ranges_ignored() {
        let mut b = LabelBook::new(4, 2, 20.0);
        assert!(b.on_range(10, 5, "walk").is_empty());
        b.on_range(0, 10, "a");
        b.on_range(1000, 1010, "b");
        b.on_range(2000, 2010, "c");
        assert_eq!(b.spans.len(), 2);
        assert_eq!(b.spans[0].class, "b");
    }
}
