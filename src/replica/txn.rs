//! The replica side of transactions: committing one across documents,
//! applying a received one whole, and reading several documents at one
//! consistent cut.
//!
//! Locks: a transaction, a whole received one and a consistent read take
//! the locks of all their documents in id order (as whole documents
//! arriving together do), and hold them until the write is durable or the
//! read done, so no reader ever sees a transaction in part. The holdback's
//! lock is taken inside document locks, never the other way round.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use automerge::transaction::{CommitOptions, Transaction};
use automerge::{Automerge, Change, ChangeHash};

use super::holdback::Group;
use super::{
    committed_bytes, lock, order_new_changes, Loaded, Merge, Part, Persist, Replica, Slot,
};
use crate::doc;
use crate::error::Error;
use crate::id::{DocId, SiteName};
use crate::replica::{Commit, DocView, Origin};
use crate::txn::{Precondition, Txn, TxnCommit, TxnHeader, TxnId};

/// Most documents one consistent read takes.
pub const READ_DOCS_MAX: usize = 1_000;

/// Most hold durations kept for [`Replica::take_txn_hold_times`].
const HOLD_TIMES_MAX: usize = 4_096;

/// One document's edit inside a transaction.
pub(super) type Edit<'a> = Box<dyn FnOnce(&mut Transaction<'_>) -> Result<(), Error> + 'a>;

/// What [`Replica::commit_locked`] committed: the transaction and, per
/// document in the order given, its heads and its change.
pub(super) struct Committed {
    pub(super) txn: TxnId,
    pub(super) commits: Vec<Commit>,
}

/// Per document a group wrote: its heads afterwards and the group's
/// changes it took.
pub(super) type GroupWritten = HashMap<DocId, (Vec<ChangeHash>, Vec<ChangeHash>)>;

/// What the transaction layer of a replica has done and holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TxnStats {
    /// Transactions committed here.
    pub committed: u64,
    /// Transactions waiting for members.
    pub held_txns: usize,
    /// Changes waiting for their transaction.
    pub held_changes: usize,
    /// Bytes of those changes.
    pub held_bytes: usize,
    /// Held transactions applied once complete.
    pub completed: u64,
    /// Members of held transactions given up on, because the peer that
    /// delivered the rest never sends them (it does not replicate them, or
    /// does not send them here).
    pub released_partial: u64,
    /// Held transactions dropped at a bound (they come back with the next
    /// reconciliation).
    pub dropped: u64,
}

/// Whether `change` says it belongs to a transaction.
pub(super) fn is_txn_member(change: &Change) -> bool {
    change
        .message()
        .is_some_and(|m| m.starts_with(crate::txn::TXN_HEADER_PREFIX))
}

/// The transactions among `changes`, each once.
pub(super) fn txns_of(changes: &[Change]) -> Vec<TxnId> {
    let mut txns: Vec<TxnId> = changes
        .iter()
        .filter_map(|c| TxnHeader::parse(c.message()?))
        .map(|(header, _)| header.id)
        .collect();
    txns.sort_unstable();
    txns.dedup();
    txns
}

/// The heads of a locked, loaded document.
pub(super) fn loaded_heads(guard: &MutexGuard<'_, Option<Loaded>>) -> Vec<ChangeHash> {
    guard
        .as_ref()
        .expect("the document is loaded")
        .doc
        .get_heads()
}

/// The transactions `doc` (document `id`) holds member changes of.
fn txns_in(id: &DocId, doc: &Automerge) -> Vec<TxnHeader> {
    let mut found: Vec<TxnHeader> = doc
        .get_changes_meta(&[])
        .iter()
        .filter_map(|meta| TxnHeader::parse(meta.message.as_deref()?))
        .map(|(header, _)| header)
        .filter(|header| header.members.contains(id))
        .collect();
    found.sort_by_key(|h| h.id);
    found.dedup_by_key(|h| h.id);
    found
}

impl Replica {
    /// Commits `txn`: one change per document with ops, all in one durable
    /// store write, after checking every precondition under the documents'
    /// locks (taken in id order, so transactions never deadlock). If a
    /// precondition fails or an op does not fit, nothing changes and the
    /// error names the document. Peers apply the changes together: no read
    /// or subscriber anywhere sees part of the transaction.
    pub fn commit_txn(&self, txn: &Txn) -> Result<TxnCommit, Error> {
        txn.check()?;
        let mut order: Vec<usize> = (0..txn.docs.len()).collect();
        order.sort_by(|a, b| txn.docs[*a].id.cmp(&txn.docs[*b].id));
        let ids: Vec<DocId> = order.iter().map(|&i| txn.docs[i].id.clone()).collect();
        let slots: Vec<Arc<Slot>> = ids.iter().map(|id| self.slot(id)).collect();
        let mut guards: Vec<MutexGuard<'_, Option<Loaded>>> =
            slots.iter().map(|slot| lock(&slot.loaded)).collect();
        for (&i, guard) in order.iter().zip(guards.iter_mut()) {
            let part = &txn.docs[i];
            let exists = lock(&self.shared.state).index.contains_key(&part.id);
            let loaded = self.ensure_loaded_or_new(&part.id, guard)?;
            if let Some(reason) = part.precondition.failure(exists, &loaded.doc.get_heads()) {
                return Err(Error::PreconditionFailed {
                    doc: part.id.clone(),
                    reason,
                });
            }
        }
        // A saga's step must publish only once durable, which a document
        // holding changes of a failed write cannot: it waits for them.
        let saga_step = txn
            .docs
            .iter()
            .any(|d| !d.ops.is_empty() && crate::saga::saga_id_of(&d.id).is_some());
        if saga_step {
            if let Some(k) = guards
                .iter()
                .position(|g| g.as_ref().is_some_and(|l| l.unsaved || l.grouped))
            {
                return Err(Error::Store(crate::store::StoreError::Backend(format!(
                    "{} holds changes whose write failed; a saga's step waits until they are written",
                    ids[k]
                ))));
            }
        }
        let spent_all = std::cell::RefCell::new(Vec::new());
        let spent_all = &spent_all;
        let edits: Vec<Option<Edit<'_>>> = order
            .iter()
            .map(|&i| {
                let part = &txn.docs[i];
                (!part.ops.is_empty()).then(|| {
                    Box::new(move |tx: &mut Transaction<'_>| {
                        let spent = crate::escrow::apply_ops(
                            tx,
                            &part.ops,
                            self.site(),
                            self.resolutions_held(),
                        )
                        .map_err(|e| Error::TxnOp {
                            doc: part.id.clone(),
                            source: Box::new(e),
                        })?;
                        spent_all
                            .borrow_mut()
                            .extend(spent.into_iter().map(|s| (part.id.clone(), s)));
                        Ok(())
                    }) as Edit<'_>
                })
            })
            .collect();
        let done = self.commit_locked(
            &ids,
            &mut guards,
            edits,
            &mut |_, _| Vec::new(),
            txn.message.as_deref(),
        )?;
        self.shared.txn_committed.fetch_add(1, Ordering::Relaxed);
        drop(guards);
        self.after_escrow_ops(&spent_all.take());
        let mut docs: Vec<(usize, (DocId, Commit))> = order
            .iter()
            .zip(ids)
            .zip(done.commits)
            .map(|((&i, id), commit)| (i, (id, commit)))
            .collect();
        docs.sort_by_key(|(i, _)| *i);
        Ok(TxnCommit {
            txn: done.txn,
            docs: docs.into_iter().map(|(_, d)| d).collect(),
        })
    }

    /// The core of a transaction, with the documents `ids` (in id order)
    /// locked and loaded by the caller: runs each document's edit (`None`
    /// for a document only checked) in an automerge transaction of its
    /// own, all before any commits, so a failing edit leaves every document
    /// as it was; then commits each as a member change carrying the
    /// transaction's header and `message`, and persists them in one
    /// durable write with the writes `extra` gives for each member (its
    /// position and the document as committed: a report index entry).
    pub(super) fn commit_locked(
        &self,
        ids: &[DocId],
        guards: &mut [MutexGuard<'_, Option<Loaded>>],
        edits: Vec<Option<Edit<'_>>>,
        extra: &mut dyn FnMut(usize, &Automerge) -> Vec<super::Write>,
        message: Option<&str>,
    ) -> Result<Committed, Error> {
        let members: Vec<DocId> = ids
            .iter()
            .zip(&edits)
            .filter(|(_, edit)| edit.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for member in &members {
            self.refuse_strong(member)?;
        }
        let id = TxnId::derive(
            &self.actor(),
            self.shared.txn_counter.fetch_add(1, Ordering::Relaxed),
        );
        let message = TxnHeader { id, members }.message(message);
        let now_ms = self.shared.options.clock.now_ms();
        let mut transactions: Vec<(usize, Transaction<'_>)> = Vec::new();
        let mut failure = None;
        for (k, (guard, edit)) in guards.iter_mut().zip(edits).enumerate() {
            let Some(edit) = edit else {
                continue;
            };
            let loaded = guard.as_mut().expect("the caller loaded every document");
            let mut tx = loaded.doc.transaction();
            if let Err(e) = edit(&mut tx) {
                tx.rollback();
                failure = Some(e);
                break;
            }
            transactions.push((k, tx));
        }
        if let Some(error) = failure {
            for (_, tx) in transactions {
                tx.rollback();
            }
            return Err(error);
        }
        let options = || {
            CommitOptions::default()
                .with_time(now_ms)
                .with_message(message.clone())
        };
        let mut made: HashMap<usize, Option<ChangeHash>> = transactions
            .into_iter()
            .map(|(k, tx)| (k, tx.commit_with(options()).0))
            .collect();
        let mut changes: Vec<Option<ChangeHash>> = vec![None; ids.len()];
        let mut items = Vec::new();
        let mut written = Vec::new();
        for (k, (guard, doc_id)) in guards.iter_mut().zip(ids).enumerate() {
            let Some(made) = made.remove(&k) else {
                continue;
            };
            let loaded = guard.as_mut().expect("loaded above");
            // A member whose edit changed nothing still gets a change: the
            // others name it, and peers wait for it.
            let hash = made.unwrap_or_else(|| loaded.doc.empty_commit(options()));
            let change = committed_bytes(&loaded.doc, &hash);
            let mut part = Part::local(change, hash);
            part.txns = vec![id];
            changes[k] = Some(hash);
            written.push(k);
            let extra = extra(k, &loaded.doc);
            items.push(Persist {
                id: doc_id,
                guard,
                parts: vec![part],
                extra,
            });
        }
        let heads = self.persist_many(items)?;
        lock(&self.shared.holdback).note_applied([id]);
        let mut after: HashMap<usize, Vec<ChangeHash>> = written.into_iter().zip(heads).collect();
        let commits = guards
            .iter()
            .enumerate()
            .map(|(k, guard)| Commit {
                heads: after
                    .remove(&k)
                    .unwrap_or_else(|| guard.as_ref().expect("loaded").doc.get_heads()),
                change: changes[k],
            })
            .collect();
        Ok(Committed { txn: id, commits })
    }

    /// [`Replica::apply_ops`] if `precondition` holds, checked under the
    /// document's lock; otherwise nothing changes and the error says why.
    pub fn apply_ops_if(
        &self,
        id: &DocId,
        ops: &[doc::Op],
        message: Option<&str>,
        precondition: &Precondition,
    ) -> Result<Commit, Error> {
        if ops.is_empty() {
            return Err(doc::OpError::BadValue("no ops given".to_owned()).into());
        }
        let (commit, spent) =
            self.transact_known(id, message, Some(precondition), true, |tx, known| {
                crate::escrow::apply_ops_known(tx, ops, self.site(), self.resolutions_held(), known)
                    .map_err(Error::from)
            })?;
        self.after_escrow_ops(
            &spent
                .into_iter()
                .map(|s| (id.clone(), s))
                .collect::<Vec<_>>(),
        );
        Ok(commit)
    }

    /// Reads several documents at one cut: every transaction is either
    /// wholly in what is read or not at all. Takes the documents' locks in
    /// id order for the time of the read. `None` for a document that does
    /// not exist; at most [`READ_DOCS_MAX`] documents.
    pub fn read_many(&self, ids: &[DocId]) -> Result<Vec<Option<DocView>>, Error> {
        if ids.len() > READ_DOCS_MAX {
            return Err(Error::TooMany {
                what: "documents in one read",
                max: READ_DOCS_MAX,
                given: ids.len(),
            });
        }
        let unique: Vec<DocId> = ids
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let slots: Vec<Arc<Slot>> = unique.iter().map(|id| self.slot(id)).collect();
        let mut guards: Vec<MutexGuard<'_, Option<Loaded>>> =
            slots.iter().map(|slot| lock(&slot.loaded)).collect();
        let mut views: HashMap<&DocId, DocView> = HashMap::new();
        for (id, guard) in unique.iter().zip(guards.iter_mut()) {
            // Commits hold the lock until indexed, so with it held the
            // index says whether the document exists.
            if !lock(&self.shared.state).index.contains_key(id) {
                continue;
            }
            let loaded = self.ensure_loaded(id, guard)?;
            views.insert(
                id,
                DocView {
                    id: id.clone(),
                    heads: loaded.doc.get_heads(),
                    value: doc::json::to_json(&loaded.doc, None),
                },
            );
        }
        drop(guards);
        Ok(ids.iter().map(|id| views.get(id).cloned()).collect())
    }

    /// What the transaction layer has done and holds.
    pub fn txn_stats(&self) -> TxnStats {
        let holdback = lock(&self.shared.holdback);
        let (held_txns, held_changes, held_bytes) = holdback.sizes();
        TxnStats {
            committed: self.shared.txn_committed.load(Ordering::Relaxed),
            held_txns,
            held_changes,
            held_bytes,
            completed: holdback.counters.completed,
            released_partial: holdback.counters.released_partial,
            dropped: holdback.counters.dropped,
        }
    }

    /// How long each transaction applied here since the last call waited
    /// for its members, in seconds (at most the last 4,096).
    pub fn take_txn_hold_times(&self) -> Vec<f64> {
        lock(&self.shared.hold_times).drain(..).collect()
    }

    /// Whether this site replicates `doc` ([`ReplicaOptions::replicates`]).
    ///
    /// [`ReplicaOptions::replicates`]: crate::ReplicaOptions::replicates
    pub fn replicates(&self, doc: &DocId) -> bool {
        (self.shared.options.replicates)(doc)
    }

    /// The transactions held back with changes `peer` delivered, each with
    /// the members it still lacks.
    pub fn held_missing(&self, peer: &SiteName) -> Vec<(TxnId, Vec<DocId>)> {
        lock(&self.shared.holdback).missing_from(peer)
    }

    /// `peer` says the members `docs` of `txn` never come from it (outside
    /// what it replicates or sends here): the transaction stops waiting
    /// for them, and is applied if nothing else is missing. They become
    /// visible here only if they arrive by another way.
    pub fn txn_not_from(&self, peer: &SiteName, txn: TxnId, docs: &[DocId]) {
        let groups = {
            let mut holdback = lock(&self.shared.holdback);
            holdback.not_expected(peer, txn, docs);
            holdback.take_complete()
        };
        for group in groups {
            tracing::info!(
                %peer,
                %txn,
                left_out = docs.len(),
                "applied a transaction without members its peer never sends here"
            );
            if let Err(e) = self.apply_group(group) {
                tracing::warn!(%peer, error = %e, "a held transaction could not be applied");
            }
        }
        self.run_deferred_resolutions();
    }

    /// Applies the transactions that batched applies
    /// ([`Replica::apply_changes_batched`]) completed, all in one durable
    /// write (each transaction stays whole either way). Returns how many
    /// groups were applied.
    pub fn apply_ready(&self) -> Result<usize, Error> {
        let groups = lock(&self.shared.holdback).take_complete();
        let count = groups.len();
        let mut groups = groups.into_iter();
        let Some(mut all) = groups.next() else {
            return Ok(0);
        };
        for group in groups {
            all.absorb(group);
        }
        // A failure drops them all, as a bound does: reconciliation brings
        // them back.
        self.apply_group(all)?;
        self.run_deferred_resolutions();
        Ok(count)
    }

    /// Drops held groups past their bounds (the daemon calls it with
    /// [`Replica::evict_idle`]); returns how many.
    pub(super) fn expire_held(&self) -> usize {
        let now = self.shared.options.clock.now_ms();
        let dropped = lock(&self.shared.holdback).enforce_limits(now);
        let count = dropped.len();
        self.drop_groups(dropped);
        count
    }

    pub(super) fn drop_groups(&self, groups: Vec<Group>) {
        for group in groups {
            tracing::warn!(
                txns = group.txns.len(),
                changes = group.len(),
                "dropped held transaction changes at a bound; the next reconciliation brings them back"
            );
        }
    }

    pub(super) fn note_applied(&self, txns: &[TxnId]) {
        if !txns.is_empty() {
            lock(&self.shared.holdback).note_applied(txns.iter().copied());
        }
    }

    /// Applies a group of held changes whole: every document's changes in
    /// one durable write, published together. Returns the new heads of
    /// each document written and the changes of the group it held.
    pub(super) fn apply_group(&self, group: Group) -> Result<GroupWritten, Error> {
        let txns: Vec<TxnId> = group.txns.keys().copied().collect();
        let keys: Vec<(DocId, ChangeHash)> = group
            .changes
            .iter()
            .flat_map(|(doc, (_, changes))| changes.iter().map(|c| (doc.clone(), c.hash())))
            .collect();
        let result = self.apply_group_taken(group);
        lock(&self.shared.holdback).finish(&txns, &keys);
        result
    }

    /// [`Replica::apply_group`] before the holdback hears it is done.
    fn apply_group_taken(&self, group: Group) -> Result<GroupWritten, Error> {
        let waited_ms = self
            .shared
            .options
            .clock
            .now_ms()
            .saturating_sub(group.since);
        let docs: Vec<DocId> = group.changes.keys().cloned().collect();
        let slots: Vec<Arc<Slot>> = docs.iter().map(|id| self.slot(id)).collect();
        let mut guards: Vec<MutexGuard<'_, Option<Loaded>>> =
            slots.iter().map(|slot| lock(&slot.loaded)).collect();
        let mut prepared = Vec::with_capacity(docs.len());
        let mut announce = Vec::new();
        let mut failure = None;
        for (k, (id, guard)) in docs.iter().zip(guards.iter_mut()).enumerate() {
            let (from, changes) = &group.changes[id];
            let result = self.merge_held(id, guard, from, changes, &group.objects);
            match result {
                Ok(Some(settled)) => {
                    prepared.push((k, settled.parts, settled.extra));
                    announce.extend(settled.reports);
                }
                Ok(None) => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(error) = failure {
            // Documents merged so far hold changes nothing published:
            // reload them from the store.
            for (k, _, _) in &prepared {
                self.drop_loaded(&docs[*k], &mut guards[*k]);
            }
            return Err(error);
        }
        let written: Vec<usize> = prepared.iter().map(|(k, _, _)| *k).collect();
        let mut by_index: HashMap<usize, (Vec<Part>, Vec<super::Write>)> = prepared
            .into_iter()
            .map(|(k, parts, extra)| (k, (parts, extra)))
            .collect();
        let mut items = Vec::new();
        for (k, (id, guard)) in docs.iter().zip(guards.iter_mut()).enumerate() {
            if let Some((parts, extra)) = by_index.remove(&k) {
                items.push(Persist {
                    id,
                    guard,
                    parts,
                    extra,
                });
            }
        }
        let heads = if items.is_empty() {
            Vec::new()
        } else {
            self.persist_many(items)?
        };
        drop(guards);
        self.announce(announce);
        let mut times = lock(&self.shared.hold_times);
        if times.len() >= HOLD_TIMES_MAX {
            times.pop_front();
        }
        times.push_back(waited_ms as f64 / 1000.0);
        drop(times);
        Ok(written
            .into_iter()
            .zip(heads)
            .map(|(k, heads)| {
                let applied = group.changes[&docs[k]].1.iter().map(Change::hash).collect();
                (docs[k].clone(), (heads, applied))
            })
            .collect())
    }

    /// Merges held changes of one document of a group, in causal order.
    /// `None` when none is new here.
    fn merge_held(
        &self,
        id: &DocId,
        guard: &mut MutexGuard<'_, Option<Loaded>>,
        from: &SiteName,
        changes: &[Change],
        objects: &HashMap<(DocId, ChangeHash), Vec<String>>,
    ) -> Result<Option<super::Settled>, Error> {
        let loaded = self.ensure_loaded_or_new(id, guard)?;
        let (ready, _, missing) = order_new_changes(&loaded.doc, changes.to_vec());
        if !missing.is_empty() {
            tracing::warn!(doc = %id, missing = missing.len(), "held changes lack dependencies; they are left out");
        }
        if ready.is_empty() {
            return Ok(None);
        }
        let before = loaded.doc.get_heads();
        let bytes: Vec<Vec<u8>> = ready.iter().map(|c| c.raw_bytes().to_vec()).collect();
        let written = super::written_by(&ready, |hash| objects.get(&(id.clone(), *hash)).cloned());
        let merge = Merge {
            before: &before,
            incoming: &ready,
            written: written.as_deref(),
        };
        let txns = txns_of(&ready);
        self.merge_parts(id, guard, &merge, bytes, Origin::Peer(from.clone()), txns)
            .map(Some)
    }

    /// Fresh documents (id, loaded) arriving whole together: those holding
    /// a member of a transaction whose other members this site replicates
    /// are not all among them (holding it too) must go the way of changes.
    /// Returns their ids, and the transactions the others hold whole.
    pub(super) fn txns_not_whole(
        &self,
        fresh: &[(&DocId, &Automerge)],
    ) -> (HashSet<DocId>, Vec<TxnId>) {
        let found: Vec<(DocId, Vec<TxnHeader>)> = fresh
            .iter()
            .map(|(id, doc)| ((*id).clone(), txns_in(id, doc)))
            .collect();
        let holdback = lock(&self.shared.holdback);
        let replicates = &self.shared.options.replicates;
        let mut alone: HashSet<DocId> = found
            .iter()
            .filter(|(id, _)| !holdback.held_for(id).is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        // Which fresh documents hold each transaction.
        let mut holders: HashMap<TxnId, HashSet<DocId>> = HashMap::new();
        for (id, headers) in &found {
            for header in headers {
                holders.entry(header.id).or_default().insert(id.clone());
            }
        }
        // A document is whole with the others only if every transaction it
        // holds is held by all members this site replicates, each of them
        // whole too: repeat until nothing more drops out.
        loop {
            let before = alone.len();
            for (id, headers) in &found {
                if alone.contains(id) {
                    continue;
                }
                let whole = headers.iter().all(|header| {
                    holdback.applied(&header.id)
                        || header.members.iter().filter(|m| replicates(m)).all(|m| {
                            holders.get(&header.id).is_some_and(|h| h.contains(m))
                                && !alone.contains(m)
                        })
                });
                if !whole {
                    alone.insert(id.clone());
                }
            }
            if alone.len() == before {
                break;
            }
        }
        let mut whole: Vec<TxnId> = found
            .iter()
            .filter(|(id, _)| !alone.contains(id))
            .flat_map(|(_, headers)| headers.iter().map(|h| h.id))
            .collect();
        whole.sort_unstable();
        whole.dedup();
        (alone, whole)
    }

    /// [`Replica::transact`] if `precondition` holds.
    pub fn transact_if<R>(
        &self,
        id: &DocId,
        message: Option<&str>,
        precondition: &Precondition,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, Error>,
    ) -> Result<(Commit, R), Error> {
        self.transact_checked(id, message, Some(precondition), f)
    }
}
