//! Durable storage of documents behind the [`Store`] trait: an SQLite
//! backend for nodes ([`Sqlite`]), an in-memory one for tests and simulation
//! ([`Memory`]), and a fault-injecting wrapper ([`Faulty`]).
//!
//! A document is stored as an optional snapshot (automerge `save()` bytes)
//! plus the changes appended since; the replica compacts the changes into a
//! new snapshot now and then. Besides documents the store keeps small
//! metadata records (per-peer cursors, conflict reports, ...) that commit in
//! the same transaction as document writes.

mod backup;
mod faulty;
mod memory;
mod sqlite;

pub use backup::{
    inspect_backup, restore_backup, BackupInfo, BackupLabel, Restored, RESOLUTIONS_HELD_KEY,
};
pub use faulty::Faulty;
pub use memory::Memory;
pub use sqlite::{Sqlite, SqliteOptions};

use automerge::ChangeHash;

use crate::id::DocId;

/// What the store holds for one document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredDoc {
    /// The last snapshot, if the document was ever compacted.
    pub snapshot: Option<Vec<u8>>,
    /// Changes appended after the snapshot, in commit order.
    pub changes: Vec<Vec<u8>>,
}

impl StoredDoc {
    /// Total stored bytes.
    pub fn bytes_len(&self) -> usize {
        self.snapshot.as_ref().map_or(0, Vec::len)
            + self.changes.iter().map(Vec::len).sum::<usize>()
    }
}

/// One document in the store's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocEntry {
    /// The document.
    pub id: DocId,
    /// Its heads after the last durable write.
    pub heads: Vec<ChangeHash>,
}

/// One write inside an atomic [`Store::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Appends encoded changes to a document (creating it) and records its
    /// new heads.
    AppendChanges {
        /// The document.
        doc: DocId,
        /// Encoded automerge changes.
        changes: Vec<Vec<u8>>,
        /// The document's heads after these changes.
        heads: Vec<ChangeHash>,
    },
    /// Replaces the document's snapshot and drops every appended change: the
    /// snapshot must contain all of them.
    Snapshot {
        /// The document.
        doc: DocId,
        /// automerge `save()` bytes.
        bytes: Vec<u8>,
        /// The document's heads in the snapshot.
        heads: Vec<ChangeHash>,
    },
    /// Sets a metadata record.
    PutMeta {
        /// Record key.
        key: String,
        /// Record value.
        value: Vec<u8>,
    },
    /// Removes a metadata record (absent is fine).
    DeleteMeta {
        /// Record key.
        key: String,
    },
}

impl Write {
    /// Payload bytes carried by this write.
    pub fn bytes_len(&self) -> usize {
        match self {
            Write::AppendChanges { changes, .. } => changes.iter().map(Vec::len).sum(),
            Write::Snapshot { bytes, .. } => bytes.len(),
            Write::PutMeta { key, value } => key.len() + value.len(),
            Write::DeleteMeta { key } => key.len(),
        }
    }
}

/// Errors of a storage backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed (I/O, SQLite, ...).
    #[error("storage backend: {0}")]
    Backend(String),
    /// Stored data could not be read back.
    #[error("stored data for {what} is corrupt: {reason}")]
    Corrupt {
        /// What was being read.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// Another process holds the store.
    #[error("store is locked by another process: {0}")]
    Locked(String),
    /// The store was closed.
    #[error("store is closed")]
    Closed,
    /// A fault injected by [`Faulty`].
    #[error("injected fault")]
    Injected,
}

/// Durable storage for a replica.
///
/// Implementations are shared between threads. [`Store::commit`] is atomic
/// (all writes or none) and durable when it returns `Ok`: a crash after that
/// never loses the writes.
pub trait Store: Send + Sync + 'static {
    /// Every stored document with its heads.
    fn docs(&self) -> Result<Vec<DocEntry>, StoreError>;
    /// The stored bytes of one document, if it exists.
    fn load(&self, doc: &DocId) -> Result<Option<StoredDoc>, StoreError>;
    /// Applies `writes` atomically and durably.
    fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError>;
    /// One metadata record.
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every metadata record whose key starts with `prefix`, in key order.
    fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// Encodes heads as concatenated 32-byte hashes.
pub(crate) fn encode_heads(heads: &[ChangeHash]) -> Vec<u8> {
    heads.iter().flat_map(|h| h.0).collect()
}

/// Decodes [`encode_heads`] output.
pub(crate) fn decode_heads(bytes: &[u8]) -> Option<Vec<ChangeHash>> {
    if !bytes.len().is_multiple_of(32) {
        return None;
    }
    bytes
        .chunks_exact(32)
        .map(|c| ChangeHash::try_from(c).ok())
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Behaviour every backend must share.
    pub(crate) fn exercise(store: &dyn Store) {
        let a = DocId::new("a/1").unwrap();
        let b = DocId::new("b").unwrap();
        let h1 = ChangeHash([1; 32]);
        let h2 = ChangeHash([2; 32]);
        assert_eq!(store.load(&a).unwrap(), None);
        store
            .commit(vec![
                Write::AppendChanges {
                    doc: a.clone(),
                    changes: vec![vec![1], vec![2]],
                    heads: vec![h1],
                },
                Write::PutMeta {
                    key: "peer/x".into(),
                    value: vec![9],
                },
            ])
            .unwrap();
        store
            .commit(vec![Write::AppendChanges {
                doc: a.clone(),
                changes: vec![vec![3]],
                heads: vec![h2],
            }])
            .unwrap();
        let loaded = store.load(&a).unwrap().unwrap();
        assert_eq!(loaded.snapshot, None);
        assert_eq!(loaded.changes, vec![vec![1], vec![2], vec![3]]);
        store
            .commit(vec![
                Write::Snapshot {
                    doc: a.clone(),
                    bytes: vec![7, 7],
                    heads: vec![h2],
                },
                Write::AppendChanges {
                    doc: b.clone(),
                    changes: vec![vec![4]],
                    heads: vec![h1, h2],
                },
            ])
            .unwrap();
        let loaded = store.load(&a).unwrap().unwrap();
        assert_eq!(
            loaded,
            StoredDoc {
                snapshot: Some(vec![7, 7]),
                changes: vec![]
            }
        );
        let mut docs = store.docs().unwrap();
        docs.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(
            docs,
            vec![
                DocEntry {
                    id: a,
                    heads: vec![h2]
                },
                DocEntry {
                    id: b,
                    heads: vec![h1, h2]
                }
            ]
        );
        assert_eq!(store.meta("peer/x").unwrap(), Some(vec![9]));
        store
            .commit(vec![Write::PutMeta {
                key: "peer/y".into(),
                value: vec![8],
            }])
            .unwrap();
        assert_eq!(store.meta_prefix("peer/").unwrap().len(), 2);
        store
            .commit(vec![Write::DeleteMeta {
                key: "peer/x".into(),
            }])
            .unwrap();
        assert_eq!(store.meta("peer/x").unwrap(), None);
    }

    #[test]
    fn heads_round_trip() {
        let heads = vec![ChangeHash([3; 32]), ChangeHash([4; 32])];
        assert_eq!(decode_heads(&encode_heads(&heads)), Some(heads));
        assert_eq!(decode_heads(&[1, 2]), None);
    }
}
