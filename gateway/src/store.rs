//! The exclusive data store: the user's labelled windows, on the gateway only.
//!
//! Data flow: labels → [`crate::labels`] (which window gets which class) → **store** →
//! adaptation (reads every window) → knowledge. Nothing in this store is ever published: the
//! only way out of the gateway is the knowledge package, which holds no window.
//!
//! The store is one redb file in the state directory (ACID, crash-safe). It is bounded: at
//! `max_windows` the oldest window is evicted for a new one (counted in
//! [`ExclusiveStore::evicted`]). Labelling a window that is already stored (same sensor, same
//! end time) replaces its class. Class names the model lacks are the user's new classes,
//! accepted up to `max_new_classes` distinct names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use diredi_learn::privacy::Ledger;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

/// Sequence number → encoded window.
const WINDOWS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("windows");
/// `sensor \0 end_ts` → sequence number, to relabel a window instead of storing it twice.
const INDEX: TableDefinition<'_, &str, u64> = TableDefinition::new("index");
/// `"ledger"` → the differential-privacy ledger (JSON), beside the data it accounts for.
const PRIVACY: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("privacy");
const LEDGER_KEY: &str = "ledger";

/// Errors of the exclusive store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file cannot be opened or written.
    #[error("exclusive data store {path}: {reason}")]
    Database {
        /// The redb file.
        path: PathBuf,
        /// What redb said.
        reason: String,
    },
    /// A stored record cannot be decoded (the file was written by something else).
    #[error("exclusive data store: record {seq} is corrupt: {reason}")]
    Corrupt {
        /// Its sequence number.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// A new class beyond the configured limit.
    #[error(
        "class {class:?} is not one of the model's classes and the {limit} new classes allowed \
         ([learning] max_new_classes) are taken: {taken:?}"
    )]
    NewClassLimit {
        /// The refused class.
        class: String,
        /// The limit.
        limit: usize,
        /// The new classes already stored.
        taken: Vec<String>,
    },
    /// The window's values are not finite or its length is wrong.
    #[error("window of sensor {sensor} has {found} values, expected {expected} finite values")]
    BadWindow {
        /// The sensor.
        sensor: String,
        /// Values expected (`C × T`).
        expected: usize,
        /// Values given, or the index of the first non-finite one.
        found: usize,
    },
}

/// One labelled window of the user's exclusive data.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredWindow {
    /// The sensor it came from.
    pub sensor: String,
    /// Unix ms of its last sample.
    pub end_ts: i64,
    /// The class the user gave it.
    pub class: String,
    /// Version of the model whose statistics standardised it.
    pub model_version: u64,
    /// `C × T` standardised values, NCT.
    pub data: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    sensor: String,
    end_ts: i64,
    class: String,
    model_version: u64,
}

fn encode(w: &StoredWindow) -> Vec<u8> {
    let meta = serde_json::to_vec(&Meta {
        sensor: w.sensor.clone(),
        end_ts: w.end_ts,
        class: w.class.clone(),
        model_version: w.model_version,
    })
    .unwrap_or_default();
    let mut out = Vec::with_capacity(4 + meta.len() + 4 * w.data.len());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    for v in &w.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn decode(seq: u64, bytes: &[u8]) -> Result<StoredWindow, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        seq,
        reason: reason.to_owned(),
    };
    let len_bytes: [u8; 4] = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("shorter than its header"))?;
    let meta_len = u32::from_le_bytes(len_bytes) as usize;
    let meta_bytes = bytes
        .get(4..4 + meta_len)
        .ok_or_else(|| corrupt("metadata cut short"))?;
    let meta: Meta =
        serde_json::from_slice(meta_bytes).map_err(|e| corrupt(&format!("metadata: {e}")))?;
    let values = &bytes[4 + meta_len..];
    if !values.len().is_multiple_of(4) {
        return Err(corrupt("values are not whole f32s"));
    }
    let data = values
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(StoredWindow {
        sensor: meta.sensor,
        end_ts: meta.end_ts,
        class: meta.class,
        model_version: meta.model_version,
        data,
    })
}

/// Opens (or creates) the redb file at `path`, its directory included, and creates its
/// tables with `init` so that readers never find them missing. Errors as text.
pub(crate) fn open_db(
    path: &Path,
    init: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::TableError>,
) -> Result<Database, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let db = Database::create(path).map_err(|e| e.to_string())?;
    let tx = db.begin_write().map_err(|e| e.to_string())?;
    init(&tx).map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())?;
    Ok(db)
}

/// The store. Cheap to share behind an `Arc`; redb serialises writers.
pub struct ExclusiveStore {
    db: Database,
    path: PathBuf,
    max_windows: usize,
    max_new_classes: usize,
    evicted: AtomicU64,
}

impl std::fmt::Debug for ExclusiveStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExclusiveStore")
            .field("path", &self.path)
            .field("max_windows", &self.max_windows)
            .finish()
    }
}

impl ExclusiveStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(
        path: &Path,
        max_windows: usize,
        max_new_classes: usize,
    ) -> Result<Self, StoreError> {
        let db = open_db(path, |tx| {
            tx.open_table(WINDOWS)?;
            tx.open_table(INDEX)?;
            tx.open_table(PRIVACY)?;
            Ok(())
        })
        .map_err(|reason| StoreError::Database {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(ExclusiveStore {
            db,
            path: path.to_path_buf(),
            max_windows: max_windows.max(1),
            max_new_classes,
            evicted: AtomicU64::new(0),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Database {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Stores `w` (or relabels the stored window with the same sensor and end time).
    /// `known` are the model's classes; other names are new classes, within the limit.
    /// Returns whether a window was added (`false` for a relabel).
    pub fn insert(&self, w: &StoredWindow, known: &[String]) -> Result<bool, StoreError> {
        if let Some(i) = w.data.iter().position(|v| !v.is_finite()) {
            return Err(StoreError::BadWindow {
                sensor: w.sensor.clone(),
                expected: w.data.len(),
                found: i,
            });
        }
        if !known.contains(&w.class) {
            let new: Vec<String> = self
                .histogram()?
                .into_keys()
                .filter(|c| !known.contains(c))
                .collect();
            if !new.contains(&w.class) && new.len() >= self.max_new_classes {
                return Err(StoreError::NewClassLimit {
                    class: w.class.clone(),
                    limit: self.max_new_classes,
                    taken: new,
                });
            }
        }
        let key = format!("{}\0{}", w.sensor, w.end_ts);
        let bytes = encode(w);
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let added;
        {
            let mut windows = tx.open_table(WINDOWS).map_err(|e| self.err(e))?;
            let mut index = tx.open_table(INDEX).map_err(|e| self.err(e))?;
            let existing = index
                .get(key.as_str())
                .map_err(|e| self.err(e))?
                .map(|g| g.value());
            match existing {
                Some(seq) => {
                    windows
                        .insert(seq, bytes.as_slice())
                        .map_err(|e| self.err(e))?;
                    added = false;
                }
                None => {
                    let next = windows
                        .last()
                        .map_err(|e| self.err(e))?
                        .map_or(0, |(k, _)| k.value() + 1);
                    windows
                        .insert(next, bytes.as_slice())
                        .map_err(|e| self.err(e))?;
                    index.insert(key.as_str(), next).map_err(|e| self.err(e))?;
                    added = true;
                    while windows.len().map_err(|e| self.err(e))? > self.max_windows as u64 {
                        let Some((seq, old)) = windows.pop_first().map_err(|e| self.err(e))? else {
                            break;
                        };
                        let old = decode(seq.value(), old.value())?;
                        index
                            .remove(format!("{}\0{}", old.sensor, old.end_ts).as_str())
                            .map_err(|e| self.err(e))?;
                        self.evicted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(added)
    }

    /// Every stored window, oldest first.
    pub fn all(&self) -> Result<Vec<StoredWindow>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let windows = tx.open_table(WINDOWS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in windows.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Windows per class.
    pub fn histogram(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut h = BTreeMap::new();
        for w in self.all()? {
            *h.entry(w.class).or_insert(0) += 1;
        }
        Ok(h)
    }

    /// Windows stored.
    pub fn len(&self) -> Result<usize, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let windows = tx.open_table(WINDOWS).map_err(|e| self.err(e))?;
        Ok(windows.len().map_err(|e| self.err(e))? as usize)
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// The privacy this gateway has spent ([`Ledger::default`] before the first DP
    /// adaptation).
    pub fn ledger(&self) -> Result<Ledger, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(PRIVACY).map_err(|e| self.err(e))?;
        match table.get(LEDGER_KEY).map_err(|e| self.err(e))? {
            Some(v) => serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                seq: 0,
                reason: format!("privacy ledger: {e}"),
            }),
            None => Ok(Ledger::default()),
        }
    }

    /// Records `ledger` (committed before the adaptation it pays for starts).
    pub fn set_ledger(&self, ledger: &Ledger) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(ledger).map_err(|e| self.err(e))?;
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(PRIVACY).map_err(|e| self.err(e))?;
            table
                .insert(LEDGER_KEY, bytes.as_slice())
                .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Windows evicted by the size bound since the store was opened.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(sensor: &str, end_ts: i64, class: &str, v: f32) -> StoredWindow {
        StoredWindow {
            sensor: sensor.into(),
            end_ts,
            class: class.into(),
            model_version: 1,
            data: vec![v; 12],
        }
    }

    fn known() -> Vec<String> {
        vec!["walk".into(), "sit".into()]
    }

    #[test]
    fn windows_survive_reopening_and_relabel_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exclusive.redb");
        {
            let s = ExclusiveStore::open(&path, 100, 2).unwrap();
            assert!(s.insert(&window("a", 10, "walk", 0.5), &known()).unwrap());
            assert!(s.insert(&window("a", 20, "sit", -1.25), &known()).unwrap());
            // Same sensor and end time: a relabel, not a second window.
            assert!(!s.insert(&window("a", 10, "sit", 0.5), &known()).unwrap());
        }
        let s = ExclusiveStore::open(&path, 100, 2).unwrap();
        let all = s.all().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].class, "sit");
        assert_eq!(all[1].data, vec![-1.25; 12]);
        assert_eq!(s.histogram().unwrap()["sit"], 2);
    }

    #[test]
    fn the_privacy_ledger_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exclusive.redb");
        {
            let s = ExclusiveStore::open(&path, 100, 2).unwrap();
            assert_eq!(s.ledger().unwrap(), Ledger::default());
            s.set_ledger(&Ledger {
                rho: 0.75,
                adaptations: 2,
            })
            .unwrap();
        }
        let s = ExclusiveStore::open(&path, 100, 2).unwrap();
        assert_eq!(
            s.ledger().unwrap(),
            Ledger {
                rho: 0.75,
                adaptations: 2
            }
        );
    }

    #[test]
    fn the_oldest_window_is_evicted_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let s = ExclusiveStore::open(&dir.path().join("x.redb"), 3, 0).unwrap();
        for t in 0..5 {
            s.insert(&window("a", t, "walk", t as f32), &known())
                .unwrap();
        }
        let ends: Vec<i64> = s.all().unwrap().iter().map(|w| w.end_ts).collect();
        assert_eq!(ends, [2, 3, 4]);
        assert_eq!(s.evicted(), 2);
        // The evicted window's index entry is gone too: storing it again adds it.
        assert!(s.insert(&window("a", 0, "walk", 9.0), &known()).unwrap());
    }

    #[test]
    fn new_classes_are_accepted_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let s = ExclusiveStore::open(&dir.path().join("x.redb"), 100, 1).unwrap();
        s.insert(&window("a", 1, "downstairs", 0.0), &known())
            .unwrap();
        s.insert(&window("a", 2, "downstairs", 0.0), &known())
            .unwrap();
        let err = s
            .insert(&window("a", 3, "jump", 0.0), &known())
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::NewClassLimit { class, limit: 1, taken }
                if class == "jump" && taken == &["downstairs".to_owned()]),
            "{err}"
        );
        assert_eq!(s.len().unwrap(), 2);
    }

    #[test]
    fn non_finite_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = ExclusiveStore::open(&dir.path().join("x.redb"), 100, 1).unwrap();
        let mut w = window("a", 1, "walk", 0.0);
        w.data[3] = f32::NAN;
        assert!(matches!(
            s.insert(&w, &known()),
            Err(StoreError::BadWindow { found: 3, .. })
        ));
        assert!(s.is_empty().unwrap());
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        for bytes in [
            &b""[..],
            &[9, 0, 0, 0, b'{'][..],
            &[2, 0, 0, 0, b'{', b'}', 1][..],
        ] {
            assert!(decode(7, bytes).is_err());
        }
    }
}
