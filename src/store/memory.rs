//! An in-memory [`Store`] for tests and the simulation: every commit is
//! "durable" at once, and nothing survives the process.

use std::collections::BTreeMap;
use std::sync::Mutex;

use automerge::ChangeHash;

use super::{DocEntry, Store, StoreError, StoredDoc, Write};
use crate::id::DocId;

/// An in-memory store.
#[derive(Debug, Default)]
pub struct Memory {
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone)]
struct State {
    docs: BTreeMap<DocId, (StoredDoc, Vec<ChangeHash>)>,
    meta: BTreeMap<String, Vec<u8>>,
}

impl Memory {
    /// An empty store.
    pub fn new() -> Memory {
        Memory::default()
    }

    /// A copy of everything stored now (a backup, for the simulation).
    pub fn snapshot(&self) -> Memory {
        Memory {
            state: Mutex::new(self.state().clone()),
        }
    }

    /// Replaces everything stored by what `backup` holds (a restore).
    pub fn restore_from(&self, backup: &Memory) {
        let copy = backup.state().clone();
        *self.state() = copy;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-written:
        // commits are applied to a copy first.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Store for Memory {
    fn docs(&self) -> Result<Vec<DocEntry>, StoreError> {
        Ok(self
            .state()
            .docs
            .iter()
            .map(|(id, (_, heads))| DocEntry {
                id: id.clone(),
                heads: heads.clone(),
            })
            .collect())
    }

    fn load(&self, doc: &DocId) -> Result<Option<StoredDoc>, StoreError> {
        Ok(self.state().docs.get(doc).map(|(stored, _)| stored.clone()))
    }

    fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut state = self.state();
        for write in writes {
            match write {
                Write::AppendChanges {
                    doc,
                    changes,
                    heads,
                } => {
                    let entry = state.docs.entry(doc).or_default();
                    entry.0.changes.extend(changes);
                    entry.1 = heads;
                }
                Write::Snapshot { doc, bytes, heads } => {
                    let entry = state.docs.entry(doc).or_default();
                    entry.0 = StoredDoc {
                        snapshot: Some(bytes),
                        changes: Vec::new(),
                    };
                    entry.1 = heads;
                }
                Write::PutMeta { key, value } => {
                    state.meta.insert(key, value);
                }
                Write::DeleteMeta { key } => {
                    state.meta.remove(&key);
                }
            }
        }
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state().meta.get(key).cloned())
    }

    fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .state()
            .meta
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_store_behaves() {
        super::super::tests::exercise(&super::Memory::new());
    }
}
