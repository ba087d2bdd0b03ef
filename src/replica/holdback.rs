//! Changes received from peers that wait for the rest of their transaction.
//!
//! A change that belongs to a transaction (its message carries a
//! [`TxnHeader`]) is not applied on arrival while other members of the
//! transaction that this site replicates are still missing: it waits here,
//! together with every change received after it that depends on it. Held
//! changes that must become visible together form a *group*: one or more
//! transactions (two merge when a change depends on both) and their
//! dependants. A group is handed out whole once every member it expects has
//! arrived (members this site does not replicate, and members a peer that
//! delivered part of it says it never sends here, are not expected: see
//! [`Holdback::not_expected`]), and is dropped, never applied in part, when
//! it outgrows its bounds (the changes come back with the next
//! reconciliation).
//!
//! Pure bookkeeping: no locks, no documents, no clock; the replica drives
//! it under its own lock.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use automerge::{Change, ChangeHash};

use crate::id::{DocId, SiteName};
use crate::txn::{TxnHeader, TxnId};

/// Bounds on what a site holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// Most changes held; beyond it the oldest groups are dropped.
    pub changes_max: usize,
    /// Most bytes of changes held; beyond it the oldest groups are dropped.
    pub bytes_max: usize,
    /// Longest a group waits; older groups are dropped.
    pub age_max: Duration,
}

impl Default for HoldLimits {
    fn default() -> HoldLimits {
        HoldLimits {
            changes_max: 100_000,
            bytes_max: 64 << 20,
            age_max: Duration::from_secs(600),
        }
    }
}

/// Transactions remembered as applied here, so a member arriving after
/// the rest (one outside a peer's scope, found later) is not held.
const RECENT_TXNS_MAX: usize = 65_536;

/// Changes that must become visible together.
#[derive(Debug)]
pub(super) struct Group {
    /// The transactions in the group and the members each waits for.
    pub(super) txns: BTreeMap<TxnId, Vec<DocId>>,
    /// Members that arrived: (transaction, document).
    present: HashSet<(TxnId, DocId)>,
    /// The held changes, per document, in arrival order, with the site
    /// that delivered the first of them.
    pub(super) changes: BTreeMap<DocId, (SiteName, Vec<Change>)>,
    /// The objects (other than the root) each held change writes into,
    /// when its decoder said, for the conflict layer.
    pub(super) objects: HashMap<(DocId, ChangeHash), Vec<String>>,
    /// The sites that delivered them.
    pub(super) from: BTreeSet<SiteName>,
    /// When the group started waiting (milliseconds of the replica's clock).
    pub(super) since: i64,
    bytes: usize,
    count: usize,
}

impl Group {
    fn new(now: i64) -> Group {
        Group {
            txns: BTreeMap::new(),
            present: HashSet::new(),
            changes: BTreeMap::new(),
            objects: HashMap::new(),
            from: BTreeSet::new(),
            since: now,
            bytes: 0,
            count: 0,
        }
    }

    /// Every member the group's transactions wait for has arrived.
    fn complete(&self) -> bool {
        self.txns.iter().all(|(txn, members)| {
            members
                .iter()
                .all(|doc| self.present.contains(&(*txn, doc.clone())))
        })
    }

    /// Takes `other`'s transactions and changes into this group.
    pub(super) fn absorb(&mut self, other: Group) {
        self.txns.extend(other.txns);
        self.present.extend(other.present);
        for (doc, (from, changes)) in other.changes {
            self.changes
                .entry(doc)
                .or_insert_with(|| (from, Vec::new()))
                .1
                .extend(changes);
        }
        self.objects.extend(other.objects);
        self.from.extend(other.from);
        self.since = self.since.min(other.since);
        self.bytes += other.bytes;
        self.count += other.count;
    }

    /// The members still missing, as `(transaction, document)`.
    pub(super) fn missing(&self) -> Vec<(TxnId, DocId)> {
        self.txns
            .iter()
            .flat_map(|(txn, members)| members.iter().map(move |doc| (*txn, doc.clone())))
            .filter(|key| !self.present.contains(key))
            .collect()
    }

    /// Held changes.
    pub(super) fn len(&self) -> usize {
        self.count
    }
}

/// What [`Holdback::offer`] decided for one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// Apply it now.
    Apply,
    /// It waits (or already waited) in a group, or is in a group being
    /// applied.
    Held,
    /// It depends on (or belongs to) a group being applied right now: leave
    /// it out, as a change whose dependencies are missing; it is asked for
    /// again once that group is in.
    Later,
}

/// Counters of what the holdback did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct HoldCounters {
    /// Groups handed out complete.
    pub(super) completed: u64,
    /// Members given up on because their peer never sends them.
    pub(super) released_partial: u64,
    /// Groups dropped at a bound.
    pub(super) dropped: u64,
}

/// The held groups of one replica.
#[derive(Debug)]
pub(super) struct Holdback {
    limits: HoldLimits,
    /// By id, in the order they started (iterated: the order must replay).
    groups: BTreeMap<u64, Group>,
    next_group: u64,
    by_txn: HashMap<TxnId, u64>,
    /// Held changes by document and hash: one change can be in several
    /// documents (same actor, history, ops and message: a transaction
    /// creating two alike documents).
    by_change: HashMap<(DocId, ChangeHash), u64>,
    recent: HashSet<TxnId>,
    recent_order: VecDeque<TxnId>,
    /// Changes and transactions of groups taken out to be applied and not
    /// applied yet ([`Holdback::finish`]).
    in_flight_changes: HashSet<(DocId, ChangeHash)>,
    in_flight_txns: HashSet<TxnId>,
    changes: usize,
    bytes: usize,
    pub(super) counters: HoldCounters,
}

impl Holdback {
    pub(super) fn new(limits: HoldLimits) -> Holdback {
        Holdback {
            limits,
            groups: BTreeMap::new(),
            next_group: 0,
            by_txn: HashMap::new(),
            by_change: HashMap::new(),
            recent: HashSet::new(),
            recent_order: VecDeque::new(),
            in_flight_changes: HashSet::new(),
            in_flight_txns: HashSet::new(),
            changes: 0,
            bytes: 0,
            counters: HoldCounters::default(),
        }
    }

    /// Nothing is held.
    pub(super) fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Held groups, changes and bytes.
    pub(super) fn sizes(&self) -> (usize, usize, usize) {
        let txns = self.groups.values().map(|g| g.txns.len()).sum();
        (txns, self.changes, self.bytes)
    }

    /// The changes held for `doc`.
    pub(super) fn held_for(&self, doc: &DocId) -> Vec<Change> {
        self.groups
            .values()
            .filter_map(|g| g.changes.get(doc))
            .flat_map(|(_, changes)| changes)
            .cloned()
            .collect()
    }

    /// Whether the transaction is remembered as applied here.
    pub(super) fn applied(&self, txn: &TxnId) -> bool {
        self.recent.contains(txn)
    }

    /// Remembers transactions now visible here.
    pub(super) fn note_applied(&mut self, txns: impl IntoIterator<Item = TxnId>) {
        for txn in txns {
            if self.recent.insert(txn) {
                self.recent_order.push_back(txn);
                if self.recent_order.len() > RECENT_TXNS_MAX {
                    if let Some(old) = self.recent_order.pop_front() {
                        self.recent.remove(&old);
                    }
                }
            }
        }
    }

    /// Decides for one change of `doc` received from `from`, in causal
    /// order with the others of its batch: it waits when it is a member of
    /// a transaction still missing members `expects` says this site gets,
    /// or depends on a change that waits. A held change that is offered
    /// again stays held.
    pub(super) fn offer(
        &mut self,
        doc: &DocId,
        change: &Change,
        from: &SiteName,
        now: i64,
        expects: &dyn Fn(&DocId) -> bool,
        objects: Option<Vec<String>>,
    ) -> Decision {
        let key = (doc.clone(), change.hash());
        if self.by_change.contains_key(&key) || self.in_flight_changes.contains(&key) {
            return Decision::Held;
        }
        let after_in_flight = change
            .deps()
            .iter()
            .any(|dep| self.in_flight_changes.contains(&(doc.clone(), *dep)));
        let mut joined: Vec<u64> = change
            .deps()
            .iter()
            .filter_map(|dep| self.by_change.get(&(doc.clone(), *dep)).copied())
            .collect();
        let header = change
            .message()
            .and_then(TxnHeader::parse)
            .map(|(header, _)| header)
            .filter(|header| header.members.contains(doc));
        let member = header.filter(|h| !self.recent.contains(&h.id));
        if after_in_flight
            || member
                .as_ref()
                .is_some_and(|h| self.in_flight_txns.contains(&h.id))
        {
            return Decision::Later;
        }
        if let Some(header) = &member {
            if let Some(&group) = self.by_txn.get(&header.id) {
                joined.push(group);
            }
        }
        if joined.is_empty() && member.is_none() {
            return Decision::Apply;
        }
        joined.sort_unstable();
        joined.dedup();
        let id = match joined.first() {
            Some(&first) => {
                for other in &joined[1..] {
                    if let Some(group) = self.groups.remove(other) {
                        self.repoint(&group, first);
                        self.groups
                            .get_mut(&first)
                            .expect("joined groups exist")
                            .absorb(group);
                    }
                }
                first
            }
            None => {
                let id = self.next_group;
                self.next_group += 1;
                self.groups.insert(id, Group::new(now));
                id
            }
        };
        let group = self.groups.get_mut(&id).expect("group exists");
        if let Some(header) = member {
            group.txns.entry(header.id).or_insert_with(|| {
                header
                    .members
                    .iter()
                    .filter(|m| expects(m))
                    .cloned()
                    .collect()
            });
            group.present.insert((header.id, doc.clone()));
            self.by_txn.insert(header.id, id);
        }
        let bytes = change.raw_bytes().len();
        group
            .changes
            .entry(doc.clone())
            .or_insert_with(|| (from.clone(), Vec::new()))
            .1
            .push(change.clone());
        if let Some(objects) = objects {
            group.objects.insert(key.clone(), objects);
        }
        group.from.insert(from.clone());
        group.bytes += bytes;
        group.count += 1;
        self.by_change.insert(key, id);
        self.changes += 1;
        self.bytes += bytes;
        Decision::Held
    }

    fn repoint(&mut self, group: &Group, to: u64) {
        for txn in group.txns.keys() {
            self.by_txn.insert(*txn, to);
        }
        for (doc, (_, changes)) in &group.changes {
            for change in changes {
                self.by_change.insert((doc.clone(), change.hash()), to);
            }
        }
    }

    /// Takes out every group that is now complete.
    pub(super) fn take_complete(&mut self) -> Vec<Group> {
        let done: Vec<u64> = self
            .groups
            .iter()
            .filter(|(_, g)| g.complete())
            .map(|(id, _)| *id)
            .collect();
        self.counters.completed += done.len() as u64;
        done.into_iter().map(|id| self.take_out(id)).collect()
    }

    /// Removes a group to be applied: until [`Holdback::finish`], copies of
    /// its changes are dropped and changes after them wait.
    fn take_out(&mut self, id: u64) -> Group {
        let group = self.remove(id);
        self.in_flight_txns.extend(group.txns.keys().copied());
        for (doc, (_, changes)) in &group.changes {
            for change in changes {
                self.in_flight_changes.insert((doc.clone(), change.hash()));
            }
        }
        group
    }

    /// A group taken out was applied (or failed to be): its transactions
    /// count as applied here from now on.
    pub(super) fn finish(&mut self, txns: &[TxnId], changes: &[(DocId, ChangeHash)]) {
        for txn in txns {
            self.in_flight_txns.remove(txn);
        }
        for key in changes {
            self.in_flight_changes.remove(key);
        }
        self.note_applied(txns.iter().copied());
    }

    /// The transactions of groups holding changes from `peer`, each with
    /// its members still missing.
    pub(super) fn missing_from(&self, peer: &SiteName) -> Vec<(TxnId, Vec<DocId>)> {
        let mut missing: BTreeMap<TxnId, Vec<DocId>> = BTreeMap::new();
        for group in self.groups.values().filter(|g| g.from.contains(peer)) {
            for (txn, doc) in group.missing() {
                missing.entry(txn).or_default().push(doc);
            }
        }
        missing.into_iter().collect()
    }

    /// `peer`, which delivered part of `txn`, never sends its members
    /// `docs`: the transaction stops waiting for them. A peer that
    /// delivered none of it is not heeded.
    pub(super) fn not_expected(&mut self, peer: &SiteName, txn: TxnId, docs: &[DocId]) {
        let Some(&id) = self.by_txn.get(&txn) else {
            return;
        };
        let group = self.groups.get_mut(&id).expect("indexed groups exist");
        if !group.from.contains(peer) {
            return;
        }
        if let Some(members) = group.txns.get_mut(&txn) {
            let before = members.len();
            members.retain(|m| !docs.contains(m) || group.present.contains(&(txn, m.clone())));
            if members.len() < before {
                self.counters.released_partial += 1;
            }
        }
    }

    /// Drops the oldest groups while over the count or byte bound, and
    /// every group older than the age bound; returns what was dropped.
    pub(super) fn enforce_limits(&mut self, now: i64) -> Vec<Group> {
        let mut dropped = Vec::new();
        let mut by_age: Vec<(i64, u64)> =
            self.groups.iter().map(|(id, g)| (g.since, *id)).collect();
        by_age.sort_unstable();
        let age_max = i64::try_from(self.limits.age_max.as_millis()).unwrap_or(i64::MAX);
        for (since, id) in by_age {
            let over = self.changes > self.limits.changes_max
                || self.bytes > self.limits.bytes_max
                || now.saturating_sub(since) > age_max;
            if !over {
                break;
            }
            dropped.push(self.remove(id));
        }
        self.counters.dropped += dropped.len() as u64;
        dropped
    }

    fn remove(&mut self, id: u64) -> Group {
        let group = self.groups.remove(&id).expect("group exists");
        for txn in group.txns.keys() {
            self.by_txn.remove(txn);
        }
        for (doc, (_, changes)) in &group.changes {
            for change in changes {
                self.by_change.remove(&(doc.clone(), change.hash()));
            }
        }
        self.changes -= group.count;
        self.bytes -= group.bytes;
        group
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::{CommitOptions, Transactable as _};
    use automerge::{Automerge, ReadDoc as _, ROOT};

    fn doc(id: &str) -> DocId {
        id.parse().unwrap()
    }

    fn site(name: &str) -> SiteName {
        name.parse().unwrap()
    }

    /// A change to a fresh document with `message`, after `parent` when given.
    fn change(parent: Option<&mut Automerge>, message: &str) -> Change {
        let mut fresh = Automerge::new();
        let doc = parent.unwrap_or(&mut fresh);
        let mut tx = doc.transaction();
        tx.put(ROOT, message, 1).unwrap();
        let hash = tx
            .commit_with(CommitOptions::default().with_message(message))
            .0
            .unwrap();
        doc.get_change_by_hash(&hash).unwrap().clone()
    }

    fn header(id: u8, members: &[&str]) -> String {
        TxnHeader {
            id: TxnId([id; 16]),
            members: members.iter().map(|m| doc(m)).collect(),
        }
        .message(None)
    }

    fn all(_: &DocId) -> bool {
        true
    }

    #[test]
    fn a_transaction_is_handed_out_once_every_member_arrived() {
        let mut hold = Holdback::new(HoldLimits::default());
        let now = 0;
        let a = change(None, &header(1, &["a", "b"]));
        let b = change(None, &header(1, &["a", "b"]));
        let plain = change(None, "plain");
        assert_eq!(
            hold.offer(&doc("c"), &plain, &site("x"), now, &all, None),
            Decision::Apply
        );
        assert_eq!(
            hold.offer(&doc("a"), &a, &site("x"), now, &all, None),
            Decision::Held
        );
        assert!(hold.take_complete().is_empty());
        // Offered again (a duplicate frame): still one held change.
        assert_eq!(
            hold.offer(&doc("a"), &a, &site("x"), now, &all, None),
            Decision::Held
        );
        assert_eq!(hold.sizes().1, 1);
        assert_eq!(
            hold.offer(&doc("b"), &b, &site("y"), now, &all, None),
            Decision::Held
        );
        let groups = hold.take_complete();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].changes.len(), 2);
        assert_eq!(groups[0].from.len(), 2);
        assert!(hold.is_empty());
        assert_eq!(hold.sizes(), (0, 0, 0));
    }

    #[test]
    fn dependants_of_held_changes_wait_with_them() {
        let mut hold = Holdback::new(HoldLimits::default());
        let now = 0;
        let mut a_doc = Automerge::new();
        let a = change(Some(&mut a_doc), &header(1, &["a", "b"]));
        let after = change(Some(&mut a_doc), "later edit");
        assert_eq!(
            hold.offer(&doc("a"), &a, &site("x"), now, &all, None),
            Decision::Held
        );
        assert_eq!(
            hold.offer(&doc("a"), &after, &site("x"), now, &all, None),
            Decision::Held
        );
        assert_eq!(hold.held_for(&doc("a")).len(), 2);
        let b = change(None, &header(1, &["a", "b"]));
        hold.offer(&doc("b"), &b, &site("x"), now, &all, None);
        let group = hold.take_complete().pop().unwrap();
        assert_eq!(group.changes[&doc("a")].1.len(), 2);
    }

    #[test]
    fn a_change_depending_on_two_groups_joins_them() {
        let mut hold = Holdback::new(HoldLimits::default());
        let now = 0;
        let mut d = Automerge::new();
        let t1 = change(Some(&mut d), &header(1, &["a", "b"]));
        let t2a = change(Some(&mut d), &header(2, &["a", "c"]));
        hold.offer(&doc("a"), &t1, &site("x"), now, &all, None);
        hold.offer(&doc("a"), &t2a, &site("x"), now, &all, None);
        assert_eq!(hold.groups.len(), 1, "t2 depends on t1's held change");
        hold.offer(
            &doc("c"),
            &change(None, &header(2, &["a", "c"])),
            &site("x"),
            now,
            &all,
            None,
        );
        assert!(hold.take_complete().is_empty(), "t1 still lacks b");
        hold.offer(
            &doc("b"),
            &change(None, &header(1, &["a", "b"])),
            &site("x"),
            now,
            &all,
            None,
        );
        let group = hold.take_complete().pop().unwrap();
        assert_eq!(group.txns.len(), 2);
    }

    #[test]
    fn members_this_site_does_not_replicate_are_not_waited_for() {
        let mut hold = Holdback::new(HoldLimits::default());
        let now = 0;
        let only_a = |d: &DocId| d.as_str() == "a";
        hold.offer(
            &doc("a"),
            &change(None, &header(1, &["a", "b"])),
            &site("x"),
            now,
            &only_a,
            None,
        );
        assert_eq!(hold.take_complete().len(), 1);
    }

    #[test]
    fn members_a_peer_never_sends_stop_being_waited_for() {
        let mut hold = Holdback::new(HoldLimits::default());
        let now = 0;
        hold.offer(
            &doc("a"),
            &change(None, &header(1, &["a", "b", "c"])),
            &site("x"),
            now,
            &all,
            None,
        );
        hold.offer(
            &doc("d"),
            &change(None, &header(2, &["d", "e"])),
            &site("y"),
            now,
            &all,
            None,
        );
        assert_eq!(
            hold.missing_from(&site("x")),
            vec![(TxnId([1; 16]), vec![doc("b"), doc("c")])]
        );
        // Only the peer that delivered part of it is heeded.
        hold.not_expected(&site("y"), TxnId([1; 16]), &[doc("b"), doc("c")]);
        assert!(hold.take_complete().is_empty());
        hold.not_expected(&site("x"), TxnId([1; 16]), &[doc("b")]);
        assert!(hold.take_complete().is_empty(), "c is still expected");
        hold.not_expected(&site("x"), TxnId([1; 16]), &[doc("c")]);
        let released = hold.take_complete();
        assert_eq!(released.len(), 1);
        assert!(released[0].missing().is_empty());
        assert_eq!(hold.sizes().0, 1);
        assert_eq!(hold.counters.released_partial, 2);
    }

    #[test]
    fn one_change_in_two_documents_is_held_for_each() {
        let mut hold = Holdback::new(HoldLimits::default());
        // Alike fresh documents of one transaction: the very same change.
        let twin = change(None, &header(1, &["a", "b"]));
        hold.offer(&doc("a"), &twin, &site("x"), 0, &all, None);
        assert!(hold.take_complete().is_empty());
        assert_eq!(
            hold.offer(&doc("b"), &twin, &site("x"), 0, &all, None),
            Decision::Held
        );
        let group = hold.take_complete().pop().expect("both members arrived");
        assert_eq!(group.changes.len(), 2);
        // While it is being applied, a copy is dropped and a later change
        // waits; once applied, a copy is a plain duplicate.
        assert_eq!(
            hold.offer(&doc("a"), &twin, &site("x"), 0, &all, None),
            Decision::Held
        );
        let mut a = Automerge::new();
        a.apply_changes([twin.clone()]).unwrap();
        let after = change(Some(&mut a), "after");
        assert_eq!(
            hold.offer(&doc("a"), &after, &site("x"), 0, &all, None),
            Decision::Later
        );
        let keys = [(doc("a"), twin.hash()), (doc("b"), twin.hash())];
        hold.finish(&[TxnId([1; 16])], &keys);
        assert_eq!(
            hold.offer(&doc("a"), &after, &site("x"), 0, &all, None),
            Decision::Apply
        );
        assert_eq!(
            hold.offer(&doc("b"), &twin, &site("x"), 0, &all, None),
            Decision::Apply
        );
    }

    #[test]
    fn late_members_of_applied_transactions_are_not_held() {
        let mut hold = Holdback::new(HoldLimits::default());
        hold.note_applied([TxnId([1; 16])]);
        let late = change(None, &header(1, &["a", "b"]));
        assert_eq!(
            hold.offer(&doc("b"), &late, &site("x"), 0, &all, None),
            Decision::Apply
        );
    }

    #[test]
    fn groups_past_a_bound_are_dropped_whole_oldest_first() {
        let limits = HoldLimits {
            changes_max: 2,
            bytes_max: usize::MAX,
            age_max: Duration::from_secs(60),
        };
        let mut hold = Holdback::new(limits);
        let start = 0;
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            let at = start + 1000 * i as i64;
            let c = change(None, &header(i as u8, &[name, "z"]));
            hold.offer(&doc(name), &c, &site("x"), at, &all, None);
        }
        let dropped = hold.enforce_limits(start + 3000);
        assert_eq!(dropped.len(), 1);
        assert!(dropped[0].changes.contains_key(&doc("a")));
        let aged = hold.enforce_limits(start + 62_000);
        assert_eq!(aged.len(), 1, "b waited 61 s, c 60 s");
        assert_eq!(hold.sizes().1, 1);
        assert_eq!(hold.counters.dropped, 2);
    }
}
