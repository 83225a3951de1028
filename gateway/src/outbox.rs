//! The durable outbox of knowledge packages.
//!
//! Data flow: adaptation → knowledge → **outbox** → `knowledge` topic (QoS 1) → cloud worker
//! → `knowledge/ack` → **outbox** (the package is done). A package stays in the outbox, in a
//! redb file in the state directory, until the cloud worker acknowledges it by id, so it
//! survives gateway restarts and broker outages: the sender publishes every pending package
//! after each connection and again every retry period. Packages are deduplicated by id: pushing
//! an id that is pending or already acknowledged does nothing, and the cloud worker treats a
//! package id it has seen as done.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

/// Package id → topic `\0` payload.
const PENDING: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("pending");
/// Acknowledged package id → unix ms of the acknowledgement (bounded, oldest dropped).
const DONE: TableDefinition<'_, &str, i64> = TableDefinition::new("done");

/// Acknowledged ids remembered for deduplication.
const DONE_KEPT: u64 = 1024;

/// Errors of the outbox.
#[derive(Debug, thiserror::Error)]
#[error("knowledge outbox {path}: {reason}")]
pub struct OutboxError {
    path: PathBuf,
    reason: String,
}

/// One package waiting for its acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Package id.
    pub id: String,
    /// Topic to publish on.
    pub topic: String,
    /// The package.
    pub payload: Vec<u8>,
}

/// The outbox.
pub struct Outbox {
    db: Database,
    path: PathBuf,
    max_pending: usize,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("path", &self.path).finish()
    }
}

/// What [`Outbox::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Already pending or already acknowledged: nothing to do.
    Duplicate,
    /// The outbox holds `max_pending` packages already.
    Full,
}

impl Outbox {
    /// Opens (or creates) the outbox at `path`, holding at most `max_pending` packages.
    pub fn open(path: &Path, max_pending: usize) -> Result<Self, OutboxError> {
        let db = crate::store::open_db(path, |tx| {
            tx.open_table(PENDING)?;
            tx.open_table(DONE)?;
            Ok(())
        })
        .map_err(|reason| OutboxError {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Outbox {
            db,
            path: path.to_path_buf(),
            max_pending: max_pending.max(1),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> OutboxError {
        OutboxError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Queues a package for `topic` unless its id is known.
    pub fn push(&self, id: &str, topic: &str, payload: &[u8]) -> Result<Pushed, OutboxError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let outcome;
        {
            let mut pending = tx.open_table(PENDING).map_err(|e| self.err(e))?;
            let done = tx.open_table(DONE).map_err(|e| self.err(e))?;
            if pending.get(id).map_err(|e| self.err(e))?.is_some()
                || done.get(id).map_err(|e| self.err(e))?.is_some()
            {
                outcome = Pushed::Duplicate;
            } else if pending.len().map_err(|e| self.err(e))? >= self.max_pending as u64 {
                outcome = Pushed::Full;
            } else {
                let mut value = Vec::with_capacity(topic.len() + 1 + payload.len());
                value.extend_from_slice(topic.as_bytes());
                value.push(0);
                value.extend_from_slice(payload);
                pending
                    .insert(id, value.as_slice())
                    .map_err(|e| self.err(e))?;
                outcome = Pushed::Queued;
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(outcome)
    }

    /// Every pending package, in id order.
    pub fn pending(&self) -> Result<Vec<Pending>, OutboxError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(PENDING).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let v = v.value();
            let Some(split) = v.iter().position(|b| *b == 0) else {
                tracing::warn!(id = k.value(), "Skipping a malformed outbox entry.");
                continue;
            };
            out.push(Pending {
                id: k.value().to_owned(),
                topic: String::from_utf8_lossy(&v[..split]).into_owned(),
                payload: v[split + 1..].to_vec(),
            });
        }
        Ok(out)
    }

    /// Marks `id` as delivered; returns whether it was pending.
    pub fn ack(&self, id: &str, now_ms: i64) -> Result<bool, OutboxError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let was_pending;
        {
            let mut pending = tx.open_table(PENDING).map_err(|e| self.err(e))?;
            let mut done = tx.open_table(DONE).map_err(|e| self.err(e))?;
            was_pending = pending.remove(id).map_err(|e| self.err(e))?.is_some();
            if was_pending {
                done.insert(id, now_ms).map_err(|e| self.err(e))?;
                while done.len().map_err(|e| self.err(e))? > DONE_KEPT {
                    let oldest = done
                        .iter()
                        .map_err(|e| self.err(e))?
                        .filter_map(Result::ok)
                        .min_by_key(|(_, t)| t.value())
                        .map(|(k, _)| k.value().to_owned());
                    match oldest {
                        Some(k) => {
                            done.remove(k.as_str()).map_err(|e| self.err(e))?;
                        }
                        None => break,
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(was_pending)
    }

    /// Packages waiting for their acknowledgement.
    pub fn len(&self) -> Result<usize, OutboxError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(PENDING).map_err(|e| self.err(e))?;
        Ok(table.len().map_err(|e| self.err(e))? as usize)
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> Result<bool, OutboxError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_survive_reopening_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        {
            let o = Outbox::open(&path, 8).unwrap();
            assert_eq!(
                o.push("p1", "t/knowledge", b"\x00\x01bin").unwrap(),
                Pushed::Queued
            );
            assert_eq!(o.push("p2", "t/knowledge", b"two").unwrap(), Pushed::Queued);
        }
        let o = Outbox::open(&path, 8).unwrap();
        let p = o.pending().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0].payload, b"\x00\x01bin",
            "payload bytes kept, zeros included"
        );
        assert_eq!(p[0].topic, "t/knowledge");
        assert!(o.ack("p1", 10).unwrap());
        assert!(!o.ack("p1", 11).unwrap(), "a second ack is a no-op");
        assert_eq!(o.len().unwrap(), 1);
    }

    #[test]
    fn ids_are_deduplicated_and_the_outbox_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(&dir.path().join("o.redb"), 2).unwrap();
        assert_eq!(o.push("a", "t", b"1").unwrap(), Pushed::Queued);
        assert_eq!(o.push("a", "t", b"1").unwrap(), Pushed::Duplicate);
        assert_eq!(o.push("b", "t", b"2").unwrap(), Pushed::Queued);
        assert_eq!(o.push("c", "t", b"3").unwrap(), Pushed::Full);
        o.ack("a", 1).unwrap();
        assert_eq!(
            o.push("a", "t", b"1").unwrap(),
            Pushed::Duplicate,
            "already delivered"
        );
        assert_eq!(o.push("c", "t", b"3").unwrap(), Pushed::Queued);
    }
}
