//! Per-sensor windowing: decoded samples → standardised `C × T` windows.
//!
//! Data flow: MQTT in → route → decode → **window** → queue → micro-batch → infer → publish.
//! Sans-IO: a [`Windower`] holds one sensor's ring buffer and is fed [`SensorBatch`]-shaped
//! rows by the pipeline's decode threads; it never allocates after construction.
//!
//! Rules (also in the README):
//! - Values are standardised on the way in, `(x - mean[c]) / std[c]`, with the manifest's
//!   statistics, and stored channel-major so a window copies out in NCT order.
//! - The first window is emitted once `window` samples have arrived, then one every `stride`
//!   samples.
//! - A payload with a timestamp is checked against the previous sample of that sensor: if its
//!   first sample is not later than the previous one (**backwards**, including a repeat of the
//!   same time), or lies more than `max_gap_periods` sample periods after the expected time
//!   (**gap**), the buffer is emptied before the payload is added. Smaller deviations are
//!   clock jitter; the payload's own timestamps are used from then on.
//! - A payload without a timestamp is assumed to follow the previous sample without a gap;
//!   the very first payload of a sensor without a timestamp is anchored so that its last sample
//!   falls at the receive time.
//! - A window's time is the time of its last sample, in Unix milliseconds.

/// Shape and statistics of the windows a model expects.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowParams {
    /// Channels `C`.
    pub channels: usize,
    /// Window length `T` in samples.
    pub window: usize,
    /// Samples between the starts of consecutive windows (`1..=window` overlaps or tiles).
    pub stride: usize,
    /// Sample period in milliseconds (`1000 / sample_rate_hz`).
    pub period_ms: f64,
    /// Per-channel mean subtracted before inference.
    pub mean: Vec<f32>,
    /// Per-channel `1 / std`.
    pub inv_std: Vec<f32>,
    /// A timestamp more than this many sample periods after the expected one is a gap.
    pub max_gap_periods: f64,
}

/// Why a sensor's buffer was emptied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    /// The payload's first timestamp is not later than the previous sample's.
    Backwards,
    /// The payload's first timestamp is too far after the expected one.
    Gap,
}

impl Reset {
    /// Short code for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reset::Backwards => "backwards",
            Reset::Gap => "gap",
        }
    }
}

/// What one [`Windower::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PushOutcome {
    /// Windows emitted.
    pub windows: usize,
    /// Whether, and why, the buffer was emptied first.
    pub reset: Option<Reset>,
}

/// A complete window, borrowed from the ring buffer for the duration of the emit callback.
#[derive(Debug)]
pub struct WindowView<'a> {
    ring: &'a [f32],
    window: usize,
    /// Ring position of the oldest sample.
    start: usize,
    /// Index of this window among the windows of its sensor, from 0.
    pub index: u64,
    /// Unix ms of the window's last sample.
    pub end_ts_ms: i64,
}

impl WindowView<'_> {
    /// Copies the window into `out` (length `C × T`) in NCT order: `out[c * T + t]`.
    ///
    /// # Panics
    /// If `out.len() != C × T` (a caller bug, never input dependent).
    pub fn copy_into(&self, out: &mut [f32]) {
        let t = self.window;
        assert_eq!(
            out.len(),
            self.ring.len(),
            "window buffer has the wrong length"
        );
        let tail = t - self.start;
        for (src, dst) in self.ring.chunks_exact(t).zip(out.chunks_exact_mut(t)) {
            dst[..tail].copy_from_slice(&src[self.start..]);
            dst[tail..].copy_from_slice(&src[..self.start]);
        }
    }
}

/// One sensor's sliding window.
#[derive(Debug, Clone)]
pub struct Windower {
    /// `C × T`, channel-major; standardised values.
    ring: Vec<f32>,
    window: usize,
    channels: usize,
    /// Next write position, which is also the oldest sample once the ring is full.
    head: usize,
    /// Samples in the ring, at most `window`.
    filled: usize,
    /// Samples since the last emitted window (or since the last reset).
    since_emit: usize,
    /// Samples needed before the next emission: `window` after a reset, then `stride`.
    need: usize,
    /// Time of the last sample pushed, in Unix ms.
    last_ts: Option<f64>,
    next_index: u64,
}

impl Windower {
    /// An empty windower for windows of `params`.
    pub fn new(params: &WindowParams) -> Self {
        Windower {
            ring: vec![0.0; params.channels * params.window],
            window: params.window,
            channels: params.channels,
            head: 0,
            filled: 0,
            since_emit: 0,
            need: params.window,
            last_ts: None,
            next_index: 0,
        }
    }

    /// Samples currently buffered.
    pub fn buffered(&self) -> usize {
        self.filled
    }

    fn reset(&mut self) {
        self.head = 0;
        self.filled = 0;
        self.since_emit = 0;
        self.need = self.window;
    }

    /// Adds the rows of one payload (`values` row-major, `C` per sample; `ts_ms` the time of
    /// the first sample if the payload carried one) and calls `emit` for every window that
    /// becomes complete. `now_ms` anchors a sensor's first payload when it has no timestamp.
    ///
    /// `params` must be the ones this windower was built with; `values.len()` must be a
    /// multiple of `C` (the decoder guarantees both).
    pub fn push(
        &mut self,
        params: &WindowParams,
        ts_ms: Option<i64>,
        values: &[f32],
        now_ms: i64,
        mut emit: impl FnMut(&WindowView<'_>),
    ) -> PushOutcome {
        debug_assert_eq!(params.channels, self.channels);
        debug_assert_eq!(params.window, self.window);
        let c = self.channels;
        let n = values.len() / c;
        let mut outcome = PushOutcome::default();
        if n == 0 {
            return outcome;
        }
        let period = params.period_ms;
        let first_ts = match (ts_ms, self.last_ts) {
            (Some(ts), Some(last)) => {
                let ts = ts as f64;
                if ts <= last {
                    outcome.reset = Some(Reset::Backwards);
                } else if ts - (last + period) > params.max_gap_periods * period {
                    outcome.reset = Some(Reset::Gap);
                }
                ts
            }
            (Some(ts), None) => ts as f64,
            (None, Some(last)) => last + period,
            (None, None) => now_ms as f64 - (n - 1) as f64 * period,
        };
        if outcome.reset.is_some() {
            self.reset();
        }

        let t = self.window;
        for (i, row) in values.chunks_exact(c).enumerate() {
            for (ch, &x) in row.iter().enumerate() {
                self.ring[ch * t + self.head] = (x - params.mean[ch]) * params.inv_std[ch];
            }
            self.head = (self.head + 1) % t;
            self.filled = (self.filled + 1).min(t);
            self.since_emit += 1;
            if self.filled == t && self.since_emit >= self.need {
                let view = WindowView {
                    ring: &self.ring,
                    window: t,
                    start: self.head,
                    index: self.next_index,
                    end_ts_ms: (first_ts + i as f64 * period).round() as i64,
                };
                emit(&view);
                self.next_index += 1;
                self.since_emit = 0;
                self.need = params.stride.max(1);
                outcome.windows += 1;
            }
        }
        self.last_ts = Some(first_ts + (n - 1) as f64 * period);
        outcome
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn params(channels: usize, window: usize, stride: usize) -> WindowParams {
        WindowParams {
            channels,
            window,
            stride,
            period_ms: 20.0,
            mean: vec![0.0; channels],
            inv_std: vec![1.0; channels],
            max_gap_periods: 5.0,
        }
    }

    /// Rows whose value is `sample index * 10 + channel`, to see which samples a window holds.
    fn rows(from: usize, n: usize, c: usize) -> Vec<f32> {
        (from..from + n)
            .flat_map(|i| (0..c).map(move |ch| (i * 10 + ch) as f32))
            .collect()
    }

    fn collect(
        w: &mut Windower,
        p: &WindowParams,
        ts: Option<i64>,
        values: &[f32],
    ) -> (PushOutcome, Vec<(u64, i64, Vec<f32>)>) {
        let mut out = Vec::new();
        let o = w.push(p, ts, values, 1_000_000, |v| {
            let mut buf = vec![0.0; p.channels * p.window];
            v.copy_into(&mut buf);
            out.push((v.index, v.end_ts_ms, buf));
        });
        (o, out)
    }

    #[test]
    fn windows_are_emitted_at_window_then_every_stride_in_nct_order() {
        let p = params(2, 4, 2);
        let mut w = Windower::new(&p);
        let (o, wins) = collect(&mut w, &p, Some(0), &rows(0, 3, 2));
        assert_eq!((o.windows, wins.len()), (0, 0));
        let (o, wins) = collect(&mut w, &p, None, &rows(3, 5, 2));
        assert_eq!(
            o.windows, 3,
            "samples 0..8: windows end at samples 3, 5 and 7"
        );
        // Window 0 holds samples 0..4: channel 0 then channel 1.
        assert_eq!(wins[0].2, vec![0., 10., 20., 30., 1., 11., 21., 31.]);
        assert_eq!((wins[0].0, wins[0].1), (0, 60));
        assert_eq!(wins[1].2, vec![20., 30., 40., 50., 21., 31., 41., 51.]);
        assert_eq!((wins[1].0, wins[1].1), (1, 100));
        assert_eq!(wins[2].0, 2);
        let (o, wins) = collect(&mut w, &p, None, &rows(8, 2, 2));
        assert_eq!(o.windows, 1);
        assert_eq!(wins[0].2, vec![60., 70., 80., 90., 61., 71., 81., 91.]);
        assert_eq!((wins[0].0, wins[0].1), (3, 180));
    }

    #[test]
    fn samples_are_standardised_with_mean_and_std() {
        let mut p = params(2, 2, 2);
        p.mean = vec![1.0, -1.0];
        p.inv_std = vec![0.5, 2.0];
        let mut w = Windower::new(&p);
        let (_, wins) = collect(&mut w, &p, None, &[3.0, 0.0, 5.0, 1.0]);
        assert_eq!(wins[0].2, vec![1.0, 2.0, 2.0, 4.0]);
    }

    #[test]
    fn a_window_is_the_same_however_the_samples_are_split_into_payloads() {
        let p = params(3, 16, 5);
        let all = rows(0, 60, 3);
        let mut whole = Windower::new(&p);
        let (_, expected) = collect(&mut whole, &p, Some(1000), &all);
        let mut split = Windower::new(&p);
        let mut got = Vec::new();
        for (k, chunk) in all.chunks(3 * 7).enumerate() {
            let ts = (k % 2 == 0).then_some(1000 + (k * 7) as i64 * 20);
            got.extend(collect(&mut split, &p, ts, chunk).1);
        }
        assert_eq!(got, expected);
        assert_eq!(expected.len(), 1 + (60 - 16) / 5);
    }

    #[test]
    fn a_timestamp_gap_empties_the_buffer() {
        let p = params(1, 4, 4);
        let mut w = Windower::new(&p);
        collect(&mut w, &p, Some(0), &rows(0, 3, 1));
        // Expected next sample at 60 ms; 5 periods of tolerance allow up to 160 ms.
        let (o, _) = collect(&mut w, &p, Some(160), &rows(3, 1, 1));
        assert_eq!(o.reset, None);
        assert_eq!(w.buffered(), 4);
        let (o, wins) = collect(&mut w, &p, Some(161 + 20 * 6), &rows(4, 3, 1));
        assert_eq!(o.reset, Some(Reset::Gap));
        assert!(wins.is_empty());
        assert_eq!(w.buffered(), 3);
        let (o, wins) = collect(&mut w, &p, None, &rows(7, 1, 1));
        assert_eq!(o.windows, 1);
        assert_eq!(wins[0].2, vec![40., 50., 60., 70.], "only post-gap samples");
    }

    #[test]
    fn a_backwards_or_repeated_timestamp_empties_the_buffer() {
        let p = params(1, 4, 1);
        let mut w = Windower::new(&p);
        collect(&mut w, &p, Some(1000), &rows(0, 3, 1));
        let (o, _) = collect(&mut w, &p, Some(1040), &rows(0, 1, 1));
        assert_eq!(
            o.reset,
            Some(Reset::Backwards),
            "1040 is the previous sample's time"
        );
        assert_eq!(w.buffered(), 1);
        let (o, _) = collect(&mut w, &p, Some(500), &rows(0, 2, 1));
        assert_eq!(o.reset, Some(Reset::Backwards));
        assert_eq!(w.buffered(), 2);
    }

    #[test]
    fn untimed_first_payload_ends_at_the_receive_time() {
        let p = params(1, 2, 1);
        let mut w = Windower::new(&p);
        let (_, wins) = collect(&mut w, &p, None, &rows(0, 3, 1));
        assert_eq!(
            wins.iter().map(|w| w.1).collect::<Vec<_>>(),
            vec![999_980, 1_000_000]
        );
        let (_, wins) = collect(&mut w, &p, None, &rows(3, 1, 1));
        assert_eq!(
            wins[0].1, 1_000_020,
            "untimed payloads continue contiguously"
        );
    }

    #[test]
    fn window_indices_keep_counting_across_resets() {
        let p = params(1, 2, 2);
        let mut w = Windower::new(&p);
        let (_, a) = collect(&mut w, &p, Some(0), &rows(0, 2, 1));
        let (_, b) = collect(&mut w, &p, Some(0), &rows(0, 2, 1));
        assert_eq!((a[0].0, b[0].0), (0, 1));
    }
}
