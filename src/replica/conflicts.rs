//! The replica side of the conflict layer: detection after a merge, the
//! report index, automatic resolution at the resolver site, and the manual
//! resolve and dismiss calls.

use std::collections::{BTreeSet, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{Automerge, Patch, ReadDoc, ROOT};

use super::txn::Edit;
use super::{committed_bytes, lock, Loaded, Merge, Part, Replica, Settled, Slot};
use crate::conflict::{
    self, body_key, read_report, report_ids_in_patches, reports_in, status_key, Conflict,
    ConflictId, DetectInput, Filter, Kind, Policy, Resolution, Status,
};
use crate::doc::{self, Op};
use crate::error::Error;
use crate::id::DocId;
use crate::store::{StoredDoc, Write, RESOLUTIONS_HELD_KEY};

const INDEX_PREFIX: &str = "conflict/";

pub(super) fn index_key(id: &ConflictId) -> String {
    format!("{INDEX_PREFIX}{id}")
}

/// A decided closing of one report, applied inside a transaction.
struct Closing {
    id: ConflictId,
    status: Status,
    how: String,
    note: Option<String>,
    ops: Vec<Op>,
    /// Edits of other documents, committed with the closing as one
    /// transaction.
    docs: Vec<(DocId, Vec<Op>)>,
}

/// Most times a closing that writes other documents is decided again
/// because its resolver named documents not locked yet.
const CLOSE_ATTEMPTS_MAX: usize = 4;

impl Replica {
    /// Reports known here that pass `filter`, oldest first.
    pub fn conflicts(&self, filter: &Filter) -> Result<Vec<Conflict>, Error> {
        let mut all: Vec<Conflict> = self
            .shared
            .store
            .meta_prefix(INDEX_PREFIX)?
            .into_iter()
            .filter_map(|(_, bytes)| serde_json::from_slice::<Conflict>(&bytes).ok())
            .filter(|c| filter.matches(c))
            .collect();
        all.sort_by(|a, b| (a.detected_at, &a.id).cmp(&(b.detected_at, &b.id)));
        Ok(all)
    }

    /// One report, if known here.
    pub fn conflict(&self, id: &ConflictId) -> Result<Option<Conflict>, Error> {
        Ok(self
            .shared
            .store
            .meta(&index_key(id))?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    /// Every report as it changes here: opened (detected here or arrived
    /// from a peer) and closed. A subscriber that falls behind sees `Lagged`
    /// and can re-read [`Replica::conflicts`].
    pub fn subscribe_conflicts(&self) -> tokio::sync::broadcast::Receiver<Conflict> {
        self.shared.conflict_events.subscribe()
    }

    /// Resolves an open report: `ops` apply to the conflict's document in
    /// the same change that marks the report resolved, so both replicate
    /// together and neither happens alone.
    pub fn resolve_conflict(
        &self,
        id: &ConflictId,
        ops: &[Op],
        note: Option<&str>,
    ) -> Result<Conflict, Error> {
        self.resolve_conflict_with(id, ops, &[], note)
    }

    /// [`Replica::resolve_conflict`], with edits of other documents too
    /// (`docs`, each at most once): the closing, `ops` and those edits
    /// commit as one transaction, so compensating an oversold order can
    /// cancel the order and restock in one atomic step, visible whole at
    /// every site.
    pub fn resolve_conflict_with(
        &self,
        id: &ConflictId,
        ops: &[Op],
        docs: &[(DocId, Vec<Op>)],
        note: Option<&str>,
    ) -> Result<Conflict, Error> {
        let mut seen = HashSet::new();
        if let Some((doc, _)) = docs.iter().find(|(doc, _)| !seen.insert(doc)) {
            return Err(crate::txn::TxnError::Duplicate(doc.clone()).into());
        }
        if docs.len() + 1 > crate::txn::TXN_DOCS_MAX {
            return Err(crate::txn::TxnError::TooManyDocs(docs.len() + 1).into());
        }
        self.close(id, |_| {
            Ok(Some(Closing {
                id: id.clone(),
                status: Status::Resolved,
                how: "manual".to_owned(),
                note: note.map(str::to_owned),
                ops: ops.to_vec(),
                docs: docs.to_vec(),
            }))
        })
    }

    /// Closes an open report without action.
    pub fn dismiss_conflict(&self, id: &ConflictId, note: Option<&str>) -> Result<Conflict, Error> {
        self.close(id, |_| {
            Ok(Some(Closing {
                id: id.clone(),
                status: Status::Dismissed,
                how: "dismissed".to_owned(),
                note: note.map(str::to_owned),
                ops: Vec::new(),
                docs: Vec::new(),
            }))
        })
    }

    /// Whether automatic resolutions are held: the store was restored from
    /// a backup ([`crate::store::restore_backup`]) and may lack resolutions
    /// this site already made and sent to peers. Until
    /// [`Replica::release_resolutions`], reports this site resolves stay
    /// open (people may still resolve and dismiss them).
    pub fn resolutions_held(&self) -> bool {
        self.shared.resolutions_held.load(Ordering::SeqCst)
    }

    /// Ends the hold on automatic resolutions, durably, and runs those that
    /// waited ([`Replica::resolve_pending`]). Call it once the site has
    /// caught up with its peers, so that the resolutions it made before the
    /// backup was restored are back and are not made twice. Returns how
    /// many reports were closed; without a hold, it only resolves pending
    /// reports.
    pub fn release_resolutions(&self) -> Result<usize, Error> {
        if self.resolutions_held() {
            self.shared.store.commit(vec![Write::DeleteMeta {
                key: RESOLUTIONS_HELD_KEY.to_owned(),
            }])?;
            self.shared.resolutions_held.store(false, Ordering::SeqCst);
            tracing::info!("automatic conflict resolutions released");
        }
        self.resolve_pending()
    }

    /// Runs the automatic resolution of every open report this site is the
    /// resolver of (after a restart, reports that arrived before a crash may
    /// be waiting). Returns how many were closed; none while resolutions
    /// are held.
    pub fn resolve_pending(&self) -> Result<usize, Error> {
        let mine: Vec<Conflict> = self
            .conflicts(&Filter {
                status: Some(Status::Open),
                ..Filter::default()
            })?
            .into_iter()
            .filter(|c| c.resolver.as_ref() == Some(self.site()))
            .collect();
        let mut closed = 0;
        for report in mine {
            let result = self.close(&report.id, |doc| {
                let Some(current) = read_report(doc, &report.id) else {
                    return Ok(None);
                };
                Ok(self.auto_resolution(&current, doc))
            });
            match result {
                Ok(report) if report.status != Status::Open => closed += 1,
                // Its policy leaves it to people, or resolutions are held.
                Ok(_) | Err(Error::ConflictClosed { .. }) => {}
                Err(e) => {
                    tracing::warn!(conflict = %report.id, error = %e, "automatic resolution failed")
                }
            }
        }
        Ok(closed)
    }

    /// Runs the automatic resolutions that edit other documents, put aside
    /// while a merge held a lock (call with no document lock held).
    pub(super) fn run_deferred_resolutions(&self) {
        let ids: Vec<ConflictId> = std::mem::take(&mut *lock(&self.shared.deferred_resolutions));
        for id in ids {
            let result = self.close(&id, |doc| {
                Ok(read_report(doc, &id).and_then(|current| self.auto_resolution(&current, doc)))
            });
            match result {
                Ok(_) | Err(Error::ConflictClosed { .. }) => {}
                Err(e) => tracing::warn!(conflict = %id, error = %e, "automatic resolution failed"),
            }
        }
    }

    /// Closes report `id` as `decide` says (under the document's lock, only
    /// while the report is open). `decide` returning `None` leaves it open.
    /// A closing that edits other documents takes their locks too (all in
    /// id order) and commits with them as one transaction; since the
    /// documents are known only from the decision, it is made again under
    /// the locks until they cover what it names.
    fn close(
        &self,
        id: &ConflictId,
        decide: impl Fn(&Automerge) -> Result<Option<Closing>, Error>,
    ) -> Result<Conflict, Error> {
        let indexed = self
            .conflict(id)?
            .ok_or_else(|| Error::ConflictNotFound(id.clone()))?;
        let doc_id = indexed.doc;
        let mut others: BTreeSet<DocId> = BTreeSet::new();
        for _ in 0..CLOSE_ATTEMPTS_MAX {
            let mut ids = others.clone();
            ids.insert(doc_id.clone());
            let ids: Vec<DocId> = ids.into_iter().collect();
            let at = ids
                .iter()
                .position(|d| *d == doc_id)
                .expect("inserted above");
            let slots: Vec<Arc<Slot>> = ids.iter().map(|d| self.slot(d)).collect();
            let mut guards: Vec<MutexGuard<'_, Option<Loaded>>> =
                slots.iter().map(|slot| lock(&slot.loaded)).collect();
            let loaded = self.ensure_loaded(&doc_id, &mut guards[at])?;
            let current =
                read_report(&loaded.doc, id).ok_or_else(|| Error::ConflictNotFound(id.clone()))?;
            if current.status != Status::Open {
                return Err(Error::ConflictClosed {
                    id: id.clone(),
                    status: current.status,
                });
            }
            let Some(mut closing) = decide(&loaded.doc)? else {
                return Ok(current);
            };
            // Edits the resolver gave for the conflict's own document join
            // the closing's.
            if let Some(k) = closing.docs.iter().position(|(d, _)| *d == doc_id) {
                let (_, ops) = closing.docs.remove(k);
                closing.ops.extend(ops);
            }
            let wanted: BTreeSet<DocId> = closing.docs.iter().map(|(d, _)| d.clone()).collect();
            if !wanted.is_subset(&others) {
                others = wanted;
                continue;
            }
            let now = self.shared.options.clock.now_ms();
            if wanted.is_empty() {
                let guard = &mut guards[at];
                let loaded = guard.as_mut().expect("loaded above");
                let mut tx = loaded.doc.transaction();
                if let Err(e) = self.write_closing(&mut tx, &closing, now) {
                    tx.rollback();
                    return Err(e);
                }
                let options = CommitOptions::default()
                    .with_time(now)
                    .with_message(format!("archipelago: conflict {id} {}", closing.how));
                let hash = tx
                    .commit_with(options)
                    .0
                    .expect("a closing writes the status key");
                let change = committed_bytes(&loaded.doc, &hash);
                let report = read_report(&loaded.doc, id).expect("the report was just read");
                let extra = vec![index_write(&report)];
                self.persist(&doc_id, guard, vec![Part::local(change, hash)], extra)?;
                let _ = self.shared.conflict_events.send(report.clone());
                return Ok(report);
            }
            for (k, other) in ids.iter().enumerate() {
                if k != at {
                    self.ensure_loaded_or_new(other, &mut guards[k])?;
                }
            }
            let closing = &closing;
            let edits: Vec<Option<Edit<'_>>> = ids
                .iter()
                .map(|d| {
                    if *d == doc_id {
                        Some(
                            Box::new(move |tx: &mut automerge::transaction::Transaction<'_>| {
                                self.write_closing(tx, closing, now)
                            }) as Edit<'_>,
                        )
                    } else {
                        closing.docs.iter().find(|(o, _)| o == d).map(|(o, ops)| {
                            Box::new(move |tx: &mut automerge::transaction::Transaction<'_>| {
                                crate::escrow::apply_ops(
                                    tx,
                                    ops,
                                    self.site(),
                                    self.resolutions_held(),
                                )
                                .map(drop)
                                .map_err(|e| Error::TxnOp {
                                    doc: o.clone(),
                                    source: Box::new(e),
                                })
                            }) as Edit<'_>
                        })
                    }
                })
                .collect();
            let message = format!("archipelago: conflict {id} {}", closing.how);
            // The index entry is written with the closing, in its write.
            let mut index = |k: usize, doc: &Automerge| {
                if k == at {
                    read_report(doc, id)
                        .map(|r| vec![index_write(&r)])
                        .unwrap_or_default()
                } else {
                    Vec::new()
                }
            };
            self.commit_locked(&ids, &mut guards, edits, &mut index, Some(&message))?;
            let loaded = guards[at].as_ref().expect("loaded above");
            let report = read_report(&loaded.doc, id).expect("the report was just read");
            drop(guards);
            let _ = self.shared.conflict_events.send(report.clone());
            return Ok(report);
        }
        Err(Error::ResolverUnstable(id.clone()))
    }

    fn write_closing(
        &self,
        tx: &mut impl Transactable,
        closing: &Closing,
        now: i64,
    ) -> Result<(), Error> {
        if !closing.ops.is_empty() {
            crate::escrow::apply_ops(tx, &closing.ops, self.site(), self.resolutions_held())?;
        }
        let record = conflict::report::Closing {
            status: closing.status,
            by: self.site().clone(),
            at: now,
            how: closing.how.clone(),
            note: closing.note.clone(),
        };
        let text = serde_json::to_string(&record).expect("a closing serializes");
        tx.put(ROOT, status_key(&closing.id), text)?;
        Ok(())
    }

    /// What this site's policy does with an open report, if it is the
    /// report's resolver.
    fn auto_resolution(&self, conflict: &Conflict, doc: &Automerge) -> Option<Closing> {
        if conflict.status != Status::Open
            || conflict.resolver.as_ref() != Some(self.site())
            || self.resolutions_held()
        {
            return None;
        }
        let config = &self.shared.options.conflicts;
        let policy = config.policy_for(conflict);
        let resolution = match &policy {
            Policy::Manual => None,
            Policy::Accept => Some(Resolution {
                ops: Vec::new(),
                how: "accept".to_owned(),
                note: None,
                docs: Vec::new(),
            }),
            Policy::Clamp => clamp(config, conflict, doc),
            Policy::PreferSite(site) => prefer_site(conflict, doc, site),
            Policy::Custom(resolver) => {
                let json = doc::json::to_json(doc, None);
                std::panic::catch_unwind(AssertUnwindSafe(|| resolver.resolve(conflict, &json)))
                    .unwrap_or_else(|_| {
                        tracing::error!(conflict = %conflict.id, "conflict resolver panicked");
                        None
                    })
            }
        }?;
        Some(Closing {
            id: conflict.id.clone(),
            status: Status::Resolved,
            how: resolution.how,
            note: resolution.note,
            ops: resolution.ops,
            docs: resolution.docs,
        })
    }

    /// After changes from a peer were applied to the loaded document:
    /// detects conflicts and writes new reports and this site's automatic
    /// resolutions as one local change. Returns what the caller persists
    /// in one durable write (the received changes, that change, and the
    /// report index) and the reports to announce once it is durable.
    pub(super) fn settle(
        &self,
        id: &DocId,
        guard: &mut MutexGuard<'_, Option<Loaded>>,
        merge: &Merge<'_>,
        patches: Option<&[Patch]>,
        mut received: Part,
    ) -> Result<Settled, Error> {
        let (before, incoming, written) = (merge.before, merge.incoming, merge.written);
        let options = &self.shared.options;
        let now = options.clock.now_ms();
        let loaded = guard
            .as_mut()
            .expect("settle is called with a loaded document");
        let doc = &loaded.doc;
        let bodies = match patches {
            Some(patches) if !before.is_empty() => {
                let store = self.shared.store.clone();
                let lookup = move |other: &DocId| -> Option<Automerge> {
                    let stored: StoredDoc = store.load(other).ok()??;
                    super::load_document(&stored).ok()
                };
                let input = DetectInput {
                    doc_id: id,
                    doc,
                    before,
                    incoming,
                    written,
                    patches,
                    config: &options.conflicts,
                    site: &options.site,
                    now_ms: now,
                    lookup: &lookup,
                };
                std::panic::catch_unwind(AssertUnwindSafe(|| conflict::detect(&input)))
                    .unwrap_or_else(|_| {
                        tracing::error!(doc = %id, "conflict detection panicked; no reports for this merge");
                        Vec::new()
                    })
            }
            _ => Vec::new(),
        };
        let mut touched: Vec<ConflictId> = match patches {
            Some(patches) => report_ids_in_patches(patches),
            None => reports_in(doc).into_iter().map(|c| c.id).collect(),
        };
        let mut reports: Vec<Conflict> = Vec::new();
        let mut new_bodies = Vec::new();
        for mut body in bodies {
            // Each competing change names its transaction, if any: the
            // other documents that changed with it.
            for value in &mut body.values {
                value.txn = doc
                    .get_change_meta_by_hash(&value.change)
                    .and_then(|meta| crate::txn::txn_of_message(meta.message.as_deref()));
            }
            match read_report(doc, &body.id) {
                Some(existing) => reports.push(existing),
                None => {
                    reports.push(conflict::report::assemble(body.clone(), None));
                    new_bodies.push(body);
                }
            }
        }
        for id in &touched {
            if !reports.iter().any(|r| &r.id == id) {
                if let Some(report) = read_report(doc, id) {
                    reports.push(report);
                }
            }
        }
        touched.extend(reports.iter().map(|r| r.id.clone()));
        touched.sort();
        touched.dedup();
        let (mut closings, wider): (Vec<Closing>, Vec<Closing>) = reports
            .iter()
            .filter_map(|r| self.auto_resolution(r, doc))
            .partition(|c| c.docs.is_empty());
        // A resolution that edits other documents needs their locks: it
        // runs once this merge is durable and the lock released
        // ([`Replica::run_deferred_resolutions`]).
        if !wider.is_empty() {
            lock(&self.shared.deferred_resolutions).extend(wider.into_iter().map(|c| c.id));
        }

        let mut parts = Vec::new();
        if !new_bodies.is_empty() || !closings.is_empty() {
            received.heads = Some(doc.get_heads());
            let loaded = guard.as_mut().expect("loaded");
            // A closing whose ops fail is dropped (the report stays open for
            // a person) and the change is rebuilt without it.
            let hash = loop {
                let mut tx = loaded.doc.transaction();
                let mut failed = None;
                for body in &new_bodies {
                    let text = serde_json::to_string(body).expect("a report serializes");
                    tx.put(ROOT, body_key(&body.id), text)?;
                }
                for (i, closing) in closings.iter().enumerate() {
                    if let Err(e) = self.write_closing(&mut tx, closing, now) {
                        tracing::warn!(conflict = %closing.id, error = %e, "automatic resolution failed; the report stays open");
                        failed = Some(i);
                        break;
                    }
                }
                match failed {
                    Some(i) => {
                        tx.rollback();
                        closings.remove(i);
                    }
                    None => {
                        let options = CommitOptions::default()
                            .with_time(now)
                            .with_message("archipelago: conflict reports".to_owned());
                        break tx.commit_with(options).0;
                    }
                }
            };
            parts.push(received);
            if let Some(hash) = hash {
                let change = committed_bytes(&loaded.doc, &hash);
                parts.push(Part::local(change, hash));
            }
        } else {
            parts.push(received);
        }

        let doc = &guard.as_ref().expect("loaded").doc;
        let (extra, reports) = self.index_reports(doc, Some(&touched));
        Ok(Settled {
            parts,
            extra,
            reports,
        })
    }

    /// Index writes for the reports `ids` of `doc` (all of its reports when
    /// `None`) that differ from the index, and the reports whose status
    /// changed (to announce once durable).
    pub(super) fn index_reports(
        &self,
        doc: &Automerge,
        ids: Option<&[ConflictId]>,
    ) -> (Vec<Write>, Vec<Conflict>) {
        let reports: Vec<Conflict> = match ids {
            Some(ids) => ids.iter().filter_map(|id| read_report(doc, id)).collect(),
            None => reports_in(doc),
        };
        let mut writes = Vec::new();
        let mut events = Vec::new();
        for report in reports {
            let previous = self.conflict(&report.id).ok().flatten();
            if previous.as_ref() != Some(&report) {
                if previous.as_ref().map(|p| p.status) != Some(report.status) {
                    events.push(report.clone());
                }
                writes.push(index_write(&report));
            }
        }
        (writes, events)
    }

    /// Tells conflict subscribers (none listening is not an error).
    pub(super) fn announce(&self, events: Vec<Conflict>) {
        for report in events {
            let _ = self.shared.conflict_events.send(report);
        }
    }
}

fn index_write(report: &Conflict) -> Write {
    Write::PutMeta {
        key: index_key(&report.id),
        value: serde_json::to_vec(report).expect("a report serializes"),
    }
}

/// Whether the value at `path` is a counter.
fn is_counter(doc: &Automerge, path: &str) -> bool {
    let Ok(pointer) = doc::Pointer::parse(path) else {
        return false;
    };
    let Some((parents, last)) = pointer.split_last() else {
        return false;
    };
    let mut obj = ROOT;
    for segment in parents {
        let prop = prop_in(doc, &obj, segment);
        match prop.and_then(|p| doc.get(&obj, p).ok().flatten()) {
            Some((automerge::Value::Object(_), id)) => obj = id,
            _ => return false,
        }
    }
    matches!(
        prop_in(doc, &obj, last).and_then(|p| doc.get(&obj, p).ok().flatten()),
        Some((automerge::Value::Scalar(s), _)) if matches!(s.as_ref(), automerge::ScalarValue::Counter(_))
    )
}

fn prop_in(doc: &Automerge, obj: &automerge::ObjId, segment: &str) -> Option<automerge::Prop> {
    match doc.object_type(obj).ok()? {
        automerge::ObjType::Map | automerge::ObjType::Table => Some(segment.into()),
        _ => segment.parse::<usize>().ok().map(automerge::Prop::Seq),
    }
}

/// An edit that makes the number at `path` equal `target`.
fn set_number(doc: &Automerge, path: &str, current: f64, target: f64) -> Option<Op> {
    if is_counter(doc, path) {
        let by = (target - current).round() as i64;
        return Some(Op::Inc {
            path: path.to_owned(),
            by,
        });
    }
    let value = if target.fract() == 0.0 && target.abs() < 9.0e15 {
        serde_json::Value::from(target as i64)
    } else {
        serde_json::Value::from(target)
    };
    Some(Op::Set {
        path: path.to_owned(),
        value,
        kind: None,
        min: None,
        max: None,
    })
}

fn clamp(
    config: &conflict::ConflictConfig,
    conflict: &Conflict,
    doc: &Automerge,
) -> Option<Resolution> {
    let rule = config.rule(conflict.rule.as_deref()?)?;
    let current = current_value(doc, &conflict.path)?.as_f64()?;
    let target = match rule.check {
        conflict::Check::Min(min) if current < min => min,
        conflict::Check::Max(max) if current > max => max,
        conflict::Check::Min(_) | conflict::Check::Max(_) => {
            return Some(Resolution {
                ops: Vec::new(),
                how: "clamp".to_owned(),
                note: Some(format!(
                    "{} is {current}, within bounds again",
                    conflict.path
                )),
                docs: Vec::new(),
            })
        }
        _ => return None,
    };
    let op = set_number(doc, &conflict.path, current, target)?;
    Some(Resolution {
        ops: vec![op],
        how: "clamp".to_owned(),
        note: Some(format!(
            "compensated {} from {current} to {target} ({:+})",
            conflict.path,
            target - current
        )),
        docs: Vec::new(),
    })
}

fn prefer_site(conflict: &Conflict, doc: &Automerge, site: &crate::SiteName) -> Option<Resolution> {
    let preferred = conflict
        .values
        .iter()
        .find(|v| v.site.as_ref() == Some(site))?;
    let how = format!("prefer:{site}");
    if conflict.kind == Kind::DeleteUpdate {
        // Only the delete can be kept as it is; restoring the object is a
        // person's call.
        return preferred.value.is_null().then(|| Resolution {
            ops: Vec::new(),
            how,
            note: None,
            docs: Vec::new(),
        });
    }
    let current = current_value(doc, &conflict.path);
    let op = match (
        current.as_ref().and_then(|c| c.as_f64()),
        preferred.value.as_f64(),
    ) {
        (Some(now), Some(want)) => set_number(doc, &conflict.path, now, want)?,
        _ => Op::Set {
            path: conflict.path.clone(),
            value: preferred.value.clone(),
            kind: None,
            min: None,
            max: None,
        },
    };
    Some(Resolution {
        ops: vec![op],
        how,
        note: None,
        docs: Vec::new(),
    })
}

fn current_value(doc: &Automerge, path: &str) -> Option<serde_json::Value> {
    conflict::detect::value_at(doc, path, None)
}
