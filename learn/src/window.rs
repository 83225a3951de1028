//! Windowing and standardisation, the second stage of the data path:
//! [`crate::dataset::Recording`] → [`WindowRef`]s → [`Standardizer`] → [`WindowSet`]
//! (NCT, the tensor layout of `docs/ARCHITECTURE.md`) → [`crate::split`] and training.
//!
//! A window covers rows `start..start + len` of one recording; starts are `0, stride,
//! 2·stride, …` and only full windows are cut. A window has a label only when every one of
//! its rows carries that same label.

use crate::dataset::Recording;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WindowError {
    #[error("window length must be at least 1, found {0}")]
    ZeroLength(usize),
    #[error("window stride must be at least 1, found {0}")]
    ZeroStride(usize),
    #[error("cannot fit a standardiser on zero windows")]
    NoWindows,
    #[error("window {index} (recording {recording}, start {start}, length {len}) is outside the data ({available})")]
    OutOfRange {
        index: usize,
        recording: usize,
        start: usize,
        len: usize,
        available: String,
    },
    #[error("{what}: expected {expected}, found {found}")]
    Shape {
        what: &'static str,
        expected: String,
        found: String,
    },
    #[error("{0} labels given for {1} windows, expected none or one per window")]
    LabelCount(usize, usize),
    #[error("cannot concatenate labelled and unlabelled window sets")]
    MixedLabelling,
}

/// Window length and stride in samples, both at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawWindowSpec")]
pub struct WindowSpec {
    len: usize,
    stride: usize,
}

#[derive(Deserialize)]
struct RawWindowSpec {
    len: usize,
    stride: usize,
}

impl TryFrom<RawWindowSpec> for WindowSpec {
    type Error = WindowError;
    fn try_from(raw: RawWindowSpec) -> Result<Self, Self::Error> {
        WindowSpec::new(raw.len, raw.stride)
    }
}

// A window is never empty (len >= 1 is validated), so `is_empty` would be meaningless.
#[allow(clippy::len_without_is_empty)]
impl WindowSpec {
    pub fn new(len: usize, stride: usize) -> Result<Self, WindowError> {
        if len == 0 {
            return Err(WindowError::ZeroLength(len));
        }
        if stride == 0 {
            return Err(WindowError::ZeroStride(stride));
        }
        Ok(WindowSpec { len, stride })
    }

    /// Samples per window (`T`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Samples between the starts of consecutive windows.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Number of full windows in `rows` samples.
    pub fn count(&self, rows: usize) -> usize {
        if rows < self.len {
            0
        } else {
            (rows - self.len) / self.stride + 1
        }
    }
}

/// One window: rows `start..start + len` of recording `recording` (an index into
/// `Dataset::recordings`). `label` is the dataset class shared by all rows, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WindowRef {
    pub recording: usize,
    pub start: usize,
    pub label: Option<u16>,
}

impl WindowRef {
    /// Whether two windows of length `len` share at least one raw row.
    pub fn overlaps(&self, other: &WindowRef, len: usize) -> bool {
        self.recording == other.recording && self.start.abs_diff(other.start) < len
    }
}

/// The full windows of `rec` (which is `dataset.recordings[recording]`), in time order.
pub fn windows(
    recording: usize,
    rec: &Recording,
    spec: WindowSpec,
) -> impl Iterator<Item = WindowRef> + '_ {
    let len = spec.len();
    (0..spec.count(rec.rows())).map(move |k| {
        let start = k * spec.stride();
        let rows = &rec.labels[start..start + len];
        let label = match rows[0] {
            Some(c) if rows.iter().all(|l| *l == Some(c)) => Some(c),
            _ => None,
        };
        WindowRef {
            recording,
            start,
            label,
        }
    })
}

/// Per-channel standardisation `(x - mean) / std`, as stored in the model manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Standardizer {
    /// Floor for `std`, so constant channels do not divide by zero.
    pub const MIN_STD: f32 = 1e-6;

    /// Leaves data unchanged.
    pub fn identity(channels: usize) -> Self {
        Standardizer {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }

    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// Fits mean and population standard deviation per channel over the *distinct* rows
    /// covered by `refs` (rows shared by overlapping windows count once), in two passes
    /// with f64 accumulation. `std` is floored at [`Self::MIN_STD`].
    pub fn fit(
        recordings: &[Recording],
        refs: &[WindowRef],
        len: usize,
    ) -> Result<Standardizer, WindowError> {
        let Some(first) = refs.first() else {
            return Err(WindowError::NoWindows);
        };
        check_refs(recordings, refs, len)?;
        let channels = recordings[first.recording].channels;

        let mut sorted: Vec<(usize, usize)> = refs.iter().map(|r| (r.recording, r.start)).collect();
        sorted.sort_unstable();
        // Merge windows into disjoint row ranges per recording.
        let mut ranges: Vec<(usize, usize, usize)> = Vec::new();
        for (rec, start) in sorted {
            match ranges.last_mut() {
                Some((r, _, end)) if *r == rec && start <= *end => *end = (*end).max(start + len),
                _ => ranges.push((rec, start, start + len)),
            }
        }
        let mut n = 0usize;
        let mut sum = vec![0f64; channels];
        for &(rec, start, end) in &ranges {
            n += end - start;
            for row in recordings[rec]
                .rows_slice(start, end - start)
                .chunks_exact(channels)
            {
                for (s, v) in sum.iter_mut().zip(row) {
                    *s += f64::from(*v);
                }
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / n as f64).collect();
        let mut sq = vec![0f64; channels];
        for &(rec, start, end) in &ranges {
            for row in recordings[rec]
                .rows_slice(start, end - start)
                .chunks_exact(channels)
            {
                for ((s, v), m) in sq.iter_mut().zip(row).zip(&mean) {
                    let d = f64::from(*v) - m;
                    *s += d * d;
                }
            }
        }
        Ok(Standardizer {
            mean: mean.iter().map(|m| *m as f32).collect(),
            std: sq
                .iter()
                .map(|s| ((s / n as f64).sqrt() as f32).max(Self::MIN_STD))
                .collect(),
        })
    }

    /// Standardises `rows` (`T × C`, row-major as in a recording) into `out` (`C × T`,
    /// the NCT layout of one window).
    pub fn apply(&self, rows: &[f32], out: &mut [f32]) -> Result<(), WindowError> {
        let c = self.channels();
        if c == 0 || !rows.len().is_multiple_of(c) || out.len() != rows.len() {
            return Err(WindowError::Shape {
                what: "standardiser input",
                expected: format!("T×{c} input values and as many output slots"),
                found: format!("{} input values, {} output slots", rows.len(), out.len()),
            });
        }
        let t_len = rows.len() / c;
        for (t, row) in rows.chunks_exact(c).enumerate() {
            for (ch, v) in row.iter().enumerate() {
                out[ch * t_len + t] = (v - self.mean[ch]) / self.std[ch];
            }
        }
        Ok(())
    }
}

fn check_refs(recordings: &[Recording], refs: &[WindowRef], len: usize) -> Result<(), WindowError> {
    for (index, r) in refs.iter().enumerate() {
        let available = match recordings.get(r.recording) {
            None => format!("{} recordings", recordings.len()),
            Some(rec) if r.start + len > rec.rows() => format!("{} rows", rec.rows()),
            Some(rec) if rec.channels != recordings[refs[0].recording].channels => {
                return Err(WindowError::Shape {
                    what: "channels of windowed recordings",
                    expected: recordings[refs[0].recording].channels.to_string(),
                    found: rec.channels.to_string(),
                })
            }
            Some(_) => continue,
        };
        return Err(WindowError::OutOfRange {
            index,
            recording: r.recording,
            start: r.start,
            len,
            available,
        });
    }
    Ok(())
}

/// Standardised windows in NCT layout, with where they came from and optional labels.
///
/// Invariants: `x.len() == n · channels · len`, `refs.len() == n`, `y` empty (unlabelled)
/// or `y.len() == n`. What `y` indexes (dataset classes or a split's classes) is up to
/// the builder; [`crate::split`] uses `Split::classes`.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowSet {
    pub channels: usize,
    pub len: usize,
    pub x: Vec<f32>,
    pub y: Vec<u32>,
    pub refs: Vec<WindowRef>,
}

impl WindowSet {
    pub fn empty(channels: usize, len: usize) -> Self {
        WindowSet {
            channels,
            len,
            x: Vec::new(),
            y: Vec::new(),
            refs: Vec::new(),
        }
    }

    /// Cuts and standardises the windows `refs` of `recordings`; `y` must be empty or hold
    /// one label per window.
    pub fn build(
        recordings: &[Recording],
        refs: Vec<WindowRef>,
        y: Vec<u32>,
        len: usize,
        standardizer: &Standardizer,
    ) -> Result<WindowSet, WindowError> {
        if !y.is_empty() && y.len() != refs.len() {
            return Err(WindowError::LabelCount(y.len(), refs.len()));
        }
        check_refs(recordings, &refs, len)?;
        let channels = standardizer.channels();
        if let Some(r) = refs.first() {
            if recordings[r.recording].channels != channels {
                return Err(WindowError::Shape {
                    what: "standardiser channels",
                    expected: recordings[r.recording].channels.to_string(),
                    found: channels.to_string(),
                });
            }
        }
        let size = channels * len;
        let mut x = vec![0f32; refs.len() * size];
        for (r, out) in refs.iter().zip(x.chunks_exact_mut(size.max(1))) {
            standardizer.apply(recordings[r.recording].rows_slice(r.start, len), out)?;
        }
        Ok(WindowSet {
            channels,
            len,
            x,
            y,
            refs,
        })
    }

    /// Number of windows.
    pub fn n(&self) -> usize {
        self.refs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    pub fn is_labelled(&self) -> bool {
        !self.y.is_empty()
    }

    /// Window `i`, `channels × len` values. Panics if `i >= n()`, like slice indexing.
    pub fn window(&self, i: usize) -> &[f32] {
        let size = self.channels * self.len;
        &self.x[i * size..(i + 1) * size]
    }

    pub fn label(&self, i: usize) -> Option<u32> {
        self.y.get(i).copied()
    }

    /// Windows per label, for labels `0..k` (labels `>= k` are not counted).
    pub fn class_counts(&self, k: usize) -> Vec<usize> {
        let mut counts = vec![0; k];
        for &y in &self.y {
            if let Some(c) = counts.get_mut(y as usize) {
                *c += 1;
            }
        }
        counts
    }

    /// The windows at `indices`, in that order (repeats allowed). Panics on an index
    /// `>= n()`, like slice indexing.
    pub fn subset(&self, indices: &[usize]) -> WindowSet {
        let mut out = WindowSet::empty(self.channels, self.len);
        out.x.reserve(indices.len() * self.channels * self.len);
        for &i in indices {
            out.x.extend_from_slice(self.window(i));
            out.refs.push(self.refs[i]);
            if self.is_labelled() {
                out.y.push(self.y[i]);
            }
        }
        out
    }

    /// All windows of `sets` in order. Shapes must agree; empty sets combine with anything,
    /// otherwise all sets are labelled or all unlabelled.
    pub fn concat(sets: &[&WindowSet]) -> Result<WindowSet, WindowError> {
        let Some(first) = sets.first() else {
            return Ok(WindowSet::empty(0, 0));
        };
        let mut out = WindowSet::empty(first.channels, first.len);
        let mut labelled = None;
        for set in sets {
            if (set.channels, set.len) != (out.channels, out.len) {
                return Err(WindowError::Shape {
                    what: "window shape",
                    expected: format!("{}×{}", out.channels, out.len),
                    found: format!("{}×{}", set.channels, set.len),
                });
            }
            if set.is_empty() {
                continue;
            }
            if *labelled.get_or_insert(set.is_labelled()) != set.is_labelled() {
                return Err(WindowError::MixedLabelling);
            }
            out.x.extend_from_slice(&set.x);
            out.y.extend_from_slice(&set.y);
            out.refs.extend_from_slice(&set.refs);
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Two channels: channel 0 = row index, channel 1 = 10 · row index.
    fn recording(labels: Vec<Option<u16>>) -> Recording {
        let samples = (0..labels.len())
            .flat_map(|i| [i as f32, 10.0 * i as f32])
            .collect();
        Recording {
            id: "r".into(),
            subject: "1".into(),
            session: "0".into(),
            file: "r.csv".into(),
            channels: 2,
            samples,
            labels,
        }
    }

    #[test]
    fn spec_rejects_zero_length_and_stride() {
        assert_eq!(WindowSpec::new(0, 1), Err(WindowError::ZeroLength(0)));
        assert_eq!(WindowSpec::new(1, 0), Err(WindowError::ZeroStride(0)));
        let spec: Result<WindowSpec, _> = serde_json::from_str(r#"{"len": 4, "stride": 0}"#);
        assert!(spec.is_err());
    }

    #[test]
    fn windows_start_at_stride_multiples_and_are_full() {
        let rec = recording(vec![Some(0); 10]);
        let spec = WindowSpec::new(4, 3).unwrap();
        let starts: Vec<usize> = windows(7, &rec, spec).map(|w| w.start).collect();
        // 0..4, 3..7, 6..10; 9..13 would not be full.
        assert_eq!(starts, vec![0, 3, 6]);
        assert!(windows(7, &rec, spec).all(|w| w.recording == 7));
        assert_eq!(windows(0, &rec, WindowSpec::new(11, 1).unwrap()).count(), 0);
        assert_eq!(windows(0, &rec, WindowSpec::new(10, 5).unwrap()).count(), 1);
    }

    #[test]
    fn window_label_requires_every_row_to_agree() {
        let labels = vec![
            Some(1),
            Some(1),
            Some(1),
            Some(1), // 0..4 pure 1
            Some(1),
            Some(2),
            Some(2),
            Some(2), // 4..8 mixed
            None,
            Some(2),
            Some(2),
            Some(2), // 8..12 partly unlabelled
            None,
            None,
            None,
            None, // 12..16 unlabelled
        ];
        let rec = recording(labels);
        let got: Vec<Option<u16>> = windows(0, &rec, WindowSpec::new(4, 4).unwrap())
            .map(|w| w.label)
            .collect();
        assert_eq!(got, vec![Some(1), None, None, None]);
        let shifted: Vec<Option<u16>> = windows(0, &rec, WindowSpec::new(3, 1).unwrap())
            .map(|w| w.label)
            .collect();
        assert_eq!(
            &shifted[..8],
            &[Some(1), Some(1), Some(1), None, None, Some(2), None, None]
        );
        assert_eq!(shifted[9], Some(2));
    }

    #[test]
    fn standardizer_counts_overlapping_rows_once() {
        let rec = recording(vec![None; 6]);
        // Windows 0..4 and 2..6 cover rows 0..6 once: channel 0 = 0..=5,
        // mean 2.5, population variance (6.25+2.25+0.25)·2/6 = 35/12.
        let refs = [
            WindowRef {
                recording: 0,
                start: 0,
                label: None,
            },
            WindowRef {
                recording: 0,
                start: 2,
                label: None,
            },
        ];
        let st = Standardizer::fit(std::slice::from_ref(&rec), &refs, 4).unwrap();
        let std0 = (35.0f64 / 12.0).sqrt() as f32;
        assert!((st.mean[0] - 2.5).abs() < 1e-6 && (st.mean[1] - 25.0).abs() < 1e-5);
        assert!((st.std[0] - std0).abs() < 1e-6 && (st.std[1] - 10.0 * std0).abs() < 1e-5);
    }

    #[test]
    fn standardizer_floors_constant_channels_and_rejects_bad_refs() {
        let mut rec = recording(vec![None; 4]);
        rec.samples = vec![3.0; 8];
        let refs = [WindowRef {
            recording: 0,
            start: 0,
            label: None,
        }];
        let st = Standardizer::fit(std::slice::from_ref(&rec), &refs, 4).unwrap();
        assert_eq!(st.std, vec![Standardizer::MIN_STD; 2]);
        assert_eq!(st.mean, vec![3.0; 2]);
        assert_eq!(
            Standardizer::fit(&[rec.clone()], &[], 4),
            Err(WindowError::NoWindows)
        );
        let late = [WindowRef {
            recording: 0,
            start: 1,
            label: None,
        }];
        assert!(matches!(
            Standardizer::fit(&[rec], &late, 4),
            Err(WindowError::OutOfRange { .. })
        ));
    }

    #[test]
    fn apply_writes_channel_major_standardised_values() {
        let st = Standardizer {
            mean: vec![1.0, 10.0],
            std: vec![2.0, 5.0],
        };
        let rows = [1.0, 10.0, 3.0, 20.0, 5.0, 0.0]; // T=3 rows of C=2
        let mut out = [0.0; 6];
        st.apply(&rows, &mut out).unwrap();
        assert_eq!(out, [0.0, 1.0, 2.0, 0.0, 2.0, -2.0]);
        assert!(st.apply(&rows, &mut [0.0; 4]).is_err());
        assert!(st.apply(&rows[..5], &mut [0.0; 5]).is_err());
    }

    #[test]
    fn window_set_builds_subsets_and_concatenates() {
        let rec = recording(vec![Some(0); 8]);
        let recs = std::slice::from_ref(&rec);
        let refs: Vec<WindowRef> = windows(0, &rec, WindowSpec::new(2, 2).unwrap()).collect();
        let st = Standardizer::identity(2);
        let set = WindowSet::build(recs, refs, vec![0, 1, 2, 3], 2, &st).unwrap();
        assert_eq!(set.n(), 4);
        // Window 1 = rows 2,3: channel 0 = [2,3], channel 1 = [20,30].
        assert_eq!(set.window(1), &[2.0, 3.0, 20.0, 30.0]);
        let sub = set.subset(&[3, 1]);
        assert_eq!(sub.y, vec![3, 1]);
        assert_eq!(sub.window(0), set.window(3));
        assert_eq!(sub.refs[1].start, 2);
        assert_eq!(set.class_counts(2), vec![1, 1]);

        let both = WindowSet::concat(&[&sub, &set]).unwrap();
        assert_eq!(both.n(), 6);
        assert_eq!(both.window(2), set.window(0));
        assert_eq!(both.y, vec![3, 1, 0, 1, 2, 3]);

        let unlabelled = WindowSet::build(recs, set.refs.clone(), vec![], 2, &st).unwrap();
        assert_eq!(
            WindowSet::concat(&[&set, &unlabelled]),
            Err(WindowError::MixedLabelling)
        );
        let empty = WindowSet::empty(2, 2);
        assert_eq!(WindowSet::concat(&[&empty, &unlabelled]).unwrap().n(), 4);
        assert!(WindowSet::concat(&[&set, &WindowSet::empty(2, 3)]).is_err());
        assert!(WindowSet::build(recs, set.refs.clone(), vec![1], 2, &st).is_err());
    }

    #[test]
    fn overlap_means_same_recording_and_shared_rows() {
        let a = WindowRef {
            recording: 0,
            start: 10,
            label: None,
        };
        assert!(a.overlaps(&WindowRef { start: 13, ..a }, 4));
        assert!(!a.overlaps(&WindowRef { start: 14, ..a }, 4));
        assert!(!a.overlaps(&WindowRef { recording: 1, ..a }, 4));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod proptests {
    //! Windowing invariants (count, starts, stride, labels, overlap) and the standardisation
    //! round trip, on random recordings.

    use super::*;
    use proptest::prelude::*;

    fn recording(channels: usize, samples: Vec<f32>, labels: Vec<Option<u16>>) -> Recording {
        Recording {
            id: "r".into(),
            subject: "1".into(),
            session: "0".into(),
            file: "r.csv".into(),
            channels,
            samples,
            labels,
        }
    }

    /// A recording of 1-3 channels and 0-60 rows, labels mostly in long runs.
    fn recordings() -> impl Strategy<Value = Recording> {
        (1usize..4, 0usize..60).prop_flat_map(|(c, rows)| {
            (
                proptest::collection::vec(-1e3f32..1e3, c * rows),
                proptest::collection::vec(
                    prop_oneof![3 => Just(Some(0u16)), 1 => Just(Some(1)), 1 => Just(None)],
                    rows,
                ),
            )
                .prop_map(move |(samples, labels)| recording(c, samples, labels))
        })
    }

    proptest! {
        #[test]
        fn windows_are_the_full_ones_at_stride_multiples(
            rec in recordings(),
            len in 1usize..20,
            stride in 1usize..20,
        ) {
            let spec = WindowSpec::new(len, stride).unwrap();
            let ws: Vec<WindowRef> = windows(3, &rec, spec).collect();
            let expected = (0..=rec.rows()).filter(|s| s % stride == 0 && s + len <= rec.rows()).count();
            prop_assert_eq!(ws.len(), expected);
            prop_assert_eq!(spec.count(rec.rows()), expected);
            for (k, w) in ws.iter().enumerate() {
                prop_assert_eq!(w.recording, 3);
                prop_assert_eq!(w.start, k * stride);
                prop_assert!(w.start + len <= rec.rows());
                let rows = &rec.labels[w.start..w.start + len];
                let agreed = rows.iter().all(|l| *l == rows[0]);
                prop_assert_eq!(w.label, if agreed { rows[0] } else { None });
            }
            // The next start would not fit.
            prop_assert!(ws.len() * stride + len > rec.rows());
        }

        #[test]
        fn overlap_means_a_shared_row(a in 0usize..50, b in 0usize..50, len in 1usize..20, same in any::<bool>()) {
            let wa = WindowRef { recording: 0, start: a, label: None };
            let wb = WindowRef { recording: usize::from(!same), start: b, label: None };
            let shared = same && (a..a + len).any(|r| (b..b + len).contains(&r));
            prop_assert_eq!(wa.overlaps(&wb, len), shared);
            prop_assert_eq!(wb.overlaps(&wa, len), shared);
        }

        #[test]
        fn standardisation_round_trips_and_centres_the_fitted_rows(
            rec in recordings(),
            len in 1usize..12,
            stride in 1usize..12,
        ) {
            let spec = WindowSpec::new(len, stride).unwrap();
            let refs: Vec<WindowRef> = windows(0, &rec, spec).collect();
            prop_assume!(!refs.is_empty());
            let recs = std::slice::from_ref(&rec);
            let st = Standardizer::fit(recs, &refs, len).unwrap();
            let c = rec.channels;
            prop_assert_eq!(st.channels(), c);
            prop_assert!(st.std.iter().all(|s| s.is_finite() && *s >= Standardizer::MIN_STD));

            let set = WindowSet::build(recs, refs.clone(), Vec::new(), len, &st).unwrap();
            prop_assert_eq!(set.x.len(), refs.len() * c * len);
            let mut sum = vec![0f64; c];
            let mut sq = vec![0f64; c];
            for (i, r) in refs.iter().enumerate() {
                let raw = rec.rows_slice(r.start, len);
                let x = set.window(i);
                for t in 0..len {
                    for ch in 0..c {
                        let z = x[ch * len + t];
                        let back = z * st.std[ch] + st.mean[ch];
                        let v = raw[t * c + ch];
                        prop_assert!((back - v).abs() <= 1e-3 * (1.0 + v.abs()), "{back} vs {v}");
                        sum[ch] += f64::from(z);
                        sq[ch] += f64::from(z) * f64::from(z);
                    }
                }
            }
            // With disjoint windows every fitted row appears once: mean 0 and variance 1, for
            // channels whose spread is well above f32 rounding of their values.
            if stride >= len {
                let n = (refs.len() * len) as f64;
                for ch in 0..c {
                    if (1.0 + st.mean[ch].abs()) / st.std[ch] > 1e3 {
                        continue;
                    }
                    let mean = sum[ch] / n;
                    let var = sq[ch] / n - mean * mean;
                    prop_assert!(mean.abs() < 1e-3, "channel {ch}: mean {mean}");
                    prop_assert!((var - 1.0).abs() < 1e-2, "channel {ch}: var {var}");
                }
            }
        }

        #[test]
        fn subsets_and_concatenations_keep_the_shape(
            rec in recordings(),
            len in 1usize..8,
            picks in proptest::collection::vec(any::<proptest::sample::Index>(), 0..10),
        ) {
            let refs: Vec<WindowRef> = windows(0, &rec, WindowSpec::new(len, 1).unwrap()).collect();
            prop_assume!(!refs.is_empty());
            let y: Vec<u32> = (0..refs.len() as u32).collect();
            let st = Standardizer::identity(rec.channels);
            let set = WindowSet::build(std::slice::from_ref(&rec), refs, y, len, &st).unwrap();
            let idx: Vec<usize> = picks.iter().map(|p| p.index(set.n())).collect();
            let sub = set.subset(&idx);
            prop_assert_eq!(sub.n(), idx.len());
            prop_assert_eq!(sub.x.len(), idx.len() * rec.channels * len);
            for (k, &i) in idx.iter().enumerate() {
                prop_assert_eq!(sub.window(k), set.window(i));
                prop_assert_eq!(sub.label(k), Some(i as u32));
            }
            let both = WindowSet::concat(&[&set, &sub]).unwrap();
            prop_assert_eq!(both.n(), set.n() + sub.n());
            prop_assert_eq!(both.x.len(), both.n() * rec.channels * len);
        }
    }
}
