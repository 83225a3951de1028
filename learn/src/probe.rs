//! The probe set: a small, non-private, labelled set of the manufacturer's presumed windows
//! that ships beside each edge model (manifest field `probe: {file, sha256}`).
//!
//! Where it stands: the cloud's export step picks it from held-out presumed data
//! ([`ProbeSet::select`]) and writes it next to the `.onnx`; the gateway reads it
//! ([`ProbeSet::read`]) to smoke-test a new model and, in [`crate::adapt`], to keep the
//! presumed behaviour while it adapts (KD towards the installed model on these inputs) and to
//! guard the result (probe accuracy may not drop more than a margin).
//!
//! File format (little-endian): the magic `DRPROBE1`, a `u32` header length, a JSON header
//! `{"format": "diredi-probe/1", "n", "channels", "window", "classes", "labels"}`, then
//! `n · channels · window` `f32` values, standardised windows laid out NCT. Labels index
//! `classes`, which are the model's classes in output order.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::train::{TrainError, Windows};
use crate::window::WindowSet;

/// First bytes of a probe file.
pub const PROBE_MAGIC: &[u8; 8] = b"DRPROBE1";
/// Value of the header's `format` field.
pub const PROBE_FORMAT: &str = "diredi-probe/1";
/// Largest probe file accepted.
pub const MAX_PROBE_BYTES: usize = 32 << 20;

/// Errors reading or writing a probe set.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The bytes are not a probe file of this version.
    #[error("not a {PROBE_FORMAT} file: {0}")]
    Format(String),
    /// The contents are inconsistent (counts, labels, classes).
    #[error("invalid probe set: {0}")]
    Invalid(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    n: usize,
    channels: usize,
    window: usize,
    classes: Vec<String>,
    labels: Vec<u32>,
}

/// Labelled standardised windows of the manufacturer's presumed data.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSet {
    /// Class names (the model's, in output order); labels index them.
    pub classes: Vec<String>,
    /// Channels per window.
    pub channels: usize,
    /// Samples per channel.
    pub window: usize,
    /// `[n, channels, window]` row-major, standardised.
    pub x: Vec<f32>,
    /// One class index per window.
    pub y: Vec<u32>,
}

impl ProbeSet {
    /// Checks counts and labels.
    pub fn new(
        classes: Vec<String>,
        channels: usize,
        window: usize,
        x: Vec<f32>,
        y: Vec<u32>,
    ) -> Result<Self, ProbeError> {
        let per = channels.saturating_mul(window);
        if per == 0 {
            return Err(ProbeError::Invalid(format!(
                "windows of {channels}×{window} values"
            )));
        }
        if x.len() != per.saturating_mul(y.len()) {
            return Err(ProbeError::Invalid(format!(
                "{} values for {} windows of {channels}×{window}",
                x.len(),
                y.len()
            )));
        }
        if let Some((i, c)) = y
            .iter()
            .enumerate()
            .find(|(_, &c)| c as usize >= classes.len())
        {
            return Err(ProbeError::Invalid(format!(
                "label {i} is class {c}, but there are {} classes",
                classes.len()
            )));
        }
        if let Some(v) = x.iter().find(|v| !v.is_finite()) {
            return Err(ProbeError::Invalid(format!("non-finite value {v}")));
        }
        Ok(Self {
            classes,
            channels,
            window,
            x,
            y,
        })
    }

    /// Up to `max` windows of `set` whose label is one of the first `classes.len()` classes,
    /// balanced over those classes and evenly spaced within each (deterministic).
    pub fn select(set: &WindowSet, classes: &[String], max: usize) -> Result<Self, ProbeError> {
        let k = classes.len();
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); k];
        for (i, &c) in set.y.iter().enumerate() {
            if let Some(list) = by_class.get_mut(c as usize) {
                list.push(i);
            }
        }
        let present = by_class.iter().filter(|l| !l.is_empty()).count().max(1);
        let per_class = max / present;
        let mut picked = Vec::new();
        for list in &by_class {
            let take = per_class.min(list.len());
            for j in 0..take {
                picked.push(list[j * list.len() / take.max(1)]);
            }
        }
        picked.sort_unstable();
        let sub = set.subset(&picked);
        Self::new(classes.to_vec(), set.channels, set.len, sub.x, sub.y)
    }

    /// Number of windows.
    pub fn n(&self) -> usize {
        self.y.len()
    }

    /// The windows, for [`crate::train`] functions.
    pub fn windows(&self) -> Result<Windows<'_>, TrainError> {
        Windows::new(&self.x, self.channels, self.window)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProbeError> {
        let header = Header {
            format: PROBE_FORMAT.to_owned(),
            n: self.n(),
            channels: self.channels,
            window: self.window,
            classes: self.classes.clone(),
            labels: self.y.clone(),
        };
        let json = serde_json::to_vec(&header).map_err(|e| ProbeError::Format(e.to_string()))?;
        let len = u32::try_from(json.len())
            .map_err(|_| ProbeError::Invalid("header too large".to_owned()))?;
        let mut out = Vec::with_capacity(12 + json.len() + 4 * self.x.len());
        out.extend_from_slice(PROBE_MAGIC);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&json);
        for v in &self.x {
            out.extend_from_slice(&v.to_le_bytes());
        }
        Ok(out)
    }

    /// Parses a probe file; never panics on bad input.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProbeError> {
        if bytes.len() > MAX_PROBE_BYTES {
            return Err(ProbeError::Format(format!(
                "{} bytes, more than the {MAX_PROBE_BYTES} accepted",
                bytes.len()
            )));
        }
        let rest = bytes
            .strip_prefix(PROBE_MAGIC.as_slice())
            .ok_or_else(|| ProbeError::Format("missing magic DRPROBE1".to_owned()))?;
        let (len, rest) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| ProbeError::Format("truncated before the header length".to_owned()))?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(ProbeError::Format(format!(
                "header of {len} bytes, only {} left",
                rest.len()
            )));
        }
        let (json, data) = rest.split_at(len);
        let h: Header =
            serde_json::from_slice(json).map_err(|e| ProbeError::Format(e.to_string()))?;
        if h.format != PROBE_FORMAT {
            return Err(ProbeError::Format(format!("format is `{}`", h.format)));
        }
        if h.labels.len() != h.n {
            return Err(ProbeError::Invalid(format!(
                "n is {} but {} labels",
                h.n,
                h.labels.len()
            )));
        }
        let want =
            h.n.checked_mul(h.channels)
                .and_then(|v| v.checked_mul(h.window))
                .and_then(|v| v.checked_mul(4))
                .ok_or_else(|| ProbeError::Invalid("sizes overflow".to_owned()))?;
        if data.len() != want {
            return Err(ProbeError::Format(format!(
                "{} data bytes, the header needs {want}",
                data.len()
            )));
        }
        let x = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Self::new(h.classes, h.channels, h.window, x, h.labels)
    }

    /// Reads a probe file.
    pub fn read(path: &Path) -> Result<Self, ProbeError> {
        let bytes = std::fs::read(path).map_err(|source| ProbeError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names(k: usize) -> Vec<String> {
        (0..k).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn probe_round_trips_and_rejects_damage() {
        let x: Vec<f32> = (0..3 * 2 * 4).map(|v| v as f32 * 0.5).collect();
        let p = ProbeSet::new(names(2), 2, 4, x, vec![0, 1, 1]).unwrap();
        let bytes = p.to_bytes().unwrap();
        assert_eq!(ProbeSet::from_bytes(&bytes).unwrap(), p);
        for cut in [0, 5, 11, 20, bytes.len() - 1] {
            assert!(ProbeSet::from_bytes(&bytes[..cut]).is_err(), "cut {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(ProbeSet::from_bytes(&bad).is_err());
        assert!(ProbeSet::new(names(2), 2, 4, vec![0.0; 8], vec![2]).is_err());
    }

    #[test]
    fn selection_balances_classes() {
        let n = 40;
        let set = WindowSet {
            channels: 1,
            len: 2,
            x: (0..2 * n).map(|v| v as f32).collect(),
            y: (0..n)
                .map(|i| if i < 30 { 0 } else { (i % 2) as u32 + 1 })
                .collect(),
            refs: vec![
                crate::window::WindowRef {
                    recording: 0,
                    start: 0,
                    label: None
                };
                n
            ],
        };
        let p = ProbeSet::select(&set, &names(2), 10).unwrap();
        // Class 2 is not among the two probe classes; 5 windows each of classes 0 and 1.
        assert_eq!(p.n(), 10);
        assert_eq!(p.y.iter().filter(|&&c| c == 0).count(), 5);
    }
}
