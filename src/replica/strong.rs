//! The replica side of the strong tier: copies of documents for the leader
//! to make changes on, and the state machine's only way in, which applies
//! the changes a log entry carries in log order, as one durable write with
//! the machine's own state.

use std::collections::HashMap;
use std::sync::Arc;

use automerge::{Automerge, ChangeHash, ReadDoc as _};

use super::{decode_batch, lock, unknown_hashes, Loaded, Origin, Part, Persist, Replica, Slot};
use crate::error::Error;
use crate::id::DocId;
use crate::store::Write;
use crate::txn::TxnId;

/// Per transaction, per document changed: its heads right after the
/// transaction, and the transaction's change.
pub(crate) type StrongApplied = Vec<Vec<(DocId, Vec<ChangeHash>, ChangeHash)>>;

/// A strong transaction to apply: its id and its documents' changes.
pub(crate) type StrongTxnChanges = (TxnId, Vec<(DocId, Vec<u8>)>);

/// Strong transactions to apply, in order.
pub(crate) type StrongTxns = [StrongTxnChanges];

impl Replica {
    /// Milliseconds since the Unix epoch, by this replica's clock.
    pub(crate) fn now_ms(&self) -> i64 {
        self.shared.options.clock.now_ms()
    }

    /// Whether `id` is written only through the strong tier.
    pub fn is_strong(&self, id: &DocId) -> bool {
        (self.shared.options.strong)(id)
    }

    /// Refuses a local write to a strong document (it goes through the
    /// tier's log instead).
    pub(crate) fn refuse_strong(&self, id: &DocId) -> Result<(), Error> {
        if self.is_strong(id) {
            return Err(Error::StrongDocument(id.clone()));
        }
        Ok(())
    }

    /// A copy of `id` as it stands here, for the strong tier's leader to
    /// make a transaction's change on; `None` when it does not exist.
    pub(crate) fn fork_doc(&self, id: &DocId) -> Result<Option<Automerge>, Error> {
        self.with_doc(id, Automerge::clone)
    }

    /// Applies the changes of strong transactions, in order, with `extra`
    /// (the state machine's own state) in the same durable write, and
    /// publishes them. A change already here counts as applied. Fails
    /// without applying anything when a change is malformed or lacks a
    /// change it depends on (the log and this store disagree).
    pub(crate) fn apply_strong(
        &self,
        txns: &StrongTxns,
        extra: Vec<Write>,
    ) -> Result<StrongApplied, Error> {
        let mut ids: Vec<DocId> = txns
            .iter()
            .flat_map(|(_, changes)| changes.iter().map(|(doc, _)| doc.clone()))
            .collect();
        ids.sort();
        ids.dedup();
        if ids.is_empty() {
            if !extra.is_empty() {
                self.shared.store.commit(extra)?;
            }
            return Ok(vec![Vec::new(); txns.len()]);
        }
        let position: HashMap<DocId, usize> = ids
            .iter()
            .enumerate()
            .map(|(k, id)| (id.clone(), k))
            .collect();
        let slots: Vec<Arc<Slot>> = ids.iter().map(|id| self.slot(id)).collect();
        let mut guards: Vec<std::sync::MutexGuard<'_, Option<Loaded>>> =
            slots.iter().map(|slot| lock(&slot.loaded)).collect();
        for (id, guard) in ids.iter().zip(guards.iter_mut()) {
            self.ensure_loaded_or_new(id, guard)?;
        }
        let mut parts: Vec<Vec<Part>> = ids.iter().map(|_| Vec::new()).collect();
        let mut out = Vec::with_capacity(txns.len());
        let mut failure = None;
        'txns: for (txn, changes) in txns {
            let mut applied = Vec::with_capacity(changes.len());
            for (doc, bytes) in changes {
                let k = position[doc];
                let change = match decode_batch(doc, std::slice::from_ref(bytes)) {
                    Ok((mut decoded, _)) => decoded.remove(0),
                    Err(e) => {
                        failure = Some(e);
                        break 'txns;
                    }
                };
                let hash = change.hash();
                let loaded = guards[k].as_ref().expect("loaded above");
                if loaded.doc.get_change_by_hash(&hash).is_none() {
                    let missing = unknown_hashes(&loaded.doc, change.deps());
                    if !missing.is_empty() {
                        failure = Some(Error::BadChange {
                            doc: doc.clone(),
                            index: 0,
                            reason: format!(
                                "a strong change depends on {} change(s) this site lacks",
                                missing.len()
                            ),
                        });
                        break 'txns;
                    }
                    if let Err(e) =
                        self.contain(doc, "applying a strong change", &mut guards[k], |d| {
                            d.apply_changes([change])
                        })
                    {
                        failure = Some(e);
                        break 'txns;
                    }
                    let heads = guards[k]
                        .as_ref()
                        .expect("contain keeps it")
                        .doc
                        .get_heads();
                    parts[k].push(Part {
                        changes: vec![bytes.clone()],
                        hashes: vec![hash],
                        origin: Origin::Local,
                        heads: Some(heads),
                        txns: vec![*txn],
                    });
                }
                let heads = guards[k].as_ref().expect("loaded above").doc.get_heads();
                applied.push((doc.clone(), heads, hash));
            }
            out.push(applied);
        }
        if let Some(error) = failure {
            // What was merged so far is unpublished: reload it from the store.
            for (k, id) in ids.iter().enumerate() {
                if !parts[k].is_empty() {
                    self.drop_loaded(id, &mut guards[k]);
                }
            }
            return Err(error);
        }
        let mut extra = Some(extra);
        let mut items = Vec::new();
        for ((id, guard), doc_parts) in ids.iter().zip(guards.iter_mut()).zip(parts) {
            if doc_parts.is_empty() {
                continue;
            }
            items.push(Persist {
                id,
                guard,
                parts: doc_parts,
                extra: extra.take().unwrap_or_default(),
            });
        }
        if items.is_empty() {
            if let Some(extra) = extra.filter(|e| !e.is_empty()) {
                self.shared.store.commit(extra)?;
            }
        } else {
            self.persist_many(items)?;
        }
        Ok(out)
    }

    /// Every strong document here in automerge's saved form, for a
    /// snapshot of the strong tier.
    pub(crate) fn strong_docs(&self) -> Result<Vec<(DocId, Vec<u8>)>, Error> {
        let ids: Vec<DocId> = lock(&self.shared.state)
            .index
            .keys()
            .filter(|id| self.is_strong(id))
            .cloned()
            .collect();
        let mut docs = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(snapshot) = self.snapshot_bytes(&id)? {
                docs.push((id, snapshot.bytes));
            }
        }
        Ok(docs)
    }

    /// Merges strong documents received whole in a snapshot.
    pub(crate) fn merge_strong_docs(&self, docs: &[(DocId, Vec<u8>)]) -> Result<(), Error> {
        for (id, bytes) in docs {
            self.apply_snapshot(id, bytes, Origin::Local)?;
        }
        Ok(())
    }
}
