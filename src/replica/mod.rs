//! A replica: many documents of one site over a [`Store`], with a bounded
//! cache of loaded documents, durable commits, and a subscription to every
//! committed change (local or received from a peer).
//!
//! Idle documents are not kept loaded: a loaded automerge document costs
//! tens of kilobytes against a few hundred bytes saved, so at most
//! `cache_docs_max` stay loaded (least recently used first out) and the rest
//! live in the store. What stays in memory for every document is its id and
//! heads (the index), which listing and the sync layer need.
//!
//! Commits to one document are serialised by that document's lock, which is
//! held until the store reports the change durable; commits to different
//! documents proceed in parallel and share the store's group commit.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::transaction::{CommitOptions, Transaction};
use automerge::{ActorId, Automerge, Change, ChangeHash, PatchLog, ReadDoc};
use sha2::{Digest as _, Sha256};
use tokio::sync::broadcast;

mod clients;
mod conflicts;
mod escrow;
mod holdback;
mod saga;
mod strong;
pub(crate) use strong::StrongTxnChanges;
mod txn;

pub use escrow::{EscrowStats, RightsWanted};
pub use holdback::HoldLimits;
pub use saga::{ExternalDue, ExternalOutcome, SagaRun, SagaView};
pub use txn::{TxnStats, READ_DOCS_MAX};

use crate::conflict::{Conflict, ConflictConfig};
use crate::doc::{self, ChangeInfo, Op};
use crate::error::Error;
use crate::id::{new_actor, DocId, SiteName};
use crate::protocol::reconcile::{item_hash, short_hash, ShortHash};
use crate::store::{Store, StoreError, StoredDoc, Write};
use crate::txn::TxnId;
use holdback::Holdback;
use txn::{is_txn_member, loaded_heads, txns_of};

/// Source of wall-clock time for change stamps (replaceable in simulation).
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// Source of the actor ids a replica writes with (replaceable in simulation).
pub trait ActorSource: Send + Sync + 'static {
    /// An actor id for `site` that no replica has written with before.
    fn new_actor(&self, site: &SiteName) -> ActorId;
}

/// Random actor ids ([`new_actor`]): the source every real replica uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomActors;

impl ActorSource for RandomActors {
    fn new_actor(&self, site: &SiteName) -> ActorId {
        new_actor(site)
    }
}

/// Settings of a [`Replica`].
#[derive(Clone)]
pub struct ReplicaOptions {
    /// The site this replica belongs to; recorded in every change it makes.
    pub site: SiteName,
    /// Most documents kept loaded in memory.
    pub cache_docs_max: usize,
    /// A loaded document unused this long is dropped back to its stored
    /// bytes by [`Replica::evict_idle`] (which the daemon calls every few
    /// seconds).
    pub cache_idle: std::time::Duration,
    /// Appended changes after which a document is compacted into a snapshot
    /// (once they also weigh as much as the snapshot: rewriting a document
    /// costs it all, so it is done when that at most doubles what was
    /// written).
    pub compact_changes_min: usize,
    /// Appended changes after which a document is compacted regardless.
    pub compact_changes_max: usize,
    /// Capacity of the change subscription channel; a subscriber that falls
    /// further behind sees `Lagged` and must catch up from the store. The
    /// conflict subscription holds at most 256.
    pub subscription_capacity: usize,
    /// Time source for change stamps.
    pub clock: Arc<dyn Clock>,
    /// Source of the actor id the replica writes with, drawn at open and
    /// again whenever it must move to a fresh one.
    pub actors: Arc<dyn ActorSource>,
    /// Conflict detectors, rules and resolvers.
    pub conflicts: Arc<ConflictConfig>,
    /// Whether this site replicates a document: a received member of a
    /// transaction waits only for the other members this says yes to
    /// (everything by default; a node answers from its peers' `receive`
    /// scopes).
    pub replicates: Arc<dyn Fn(&DocId) -> bool + Send + Sync>,
    /// Bounds on the changes held back for their transaction.
    pub txn_hold: HoldLimits,
    /// How this site manages the rights of bounded counters.
    pub escrow: Arc<crate::escrow::EscrowConfig>,
    /// The Rust functions this site runs as saga steps.
    pub saga_fns: Arc<crate::saga::SagaFns>,
    /// Whether a document is written only through the strong tier
    /// ([`crate::strong`]): local writes to it are refused (none by
    /// default).
    pub strong: Arc<dyn Fn(&DocId) -> bool + Send + Sync>,
}

impl ReplicaOptions {
    /// Defaults for `site`.
    pub fn new(site: SiteName) -> ReplicaOptions {
        ReplicaOptions {
            site,
            cache_docs_max: 1024,
            cache_idle: std::time::Duration::from_secs(30),
            compact_changes_min: 64,
            compact_changes_max: 4096,
            subscription_capacity: 4096,
            clock: Arc::new(SystemClock),
            actors: Arc::new(RandomActors),
            conflicts: Arc::new(ConflictConfig::default()),
            replicates: Arc::new(|_| true),
            txn_hold: HoldLimits::default(),
            escrow: Arc::new(crate::escrow::EscrowConfig::default()),
            saga_fns: Arc::new(crate::saga::SagaFns::default()),
            strong: Arc::new(|_| false),
        }
    }
}

impl std::fmt::Debug for ReplicaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaOptions")
            .field("site", &self.site)
            .field("cache_docs_max", &self.cache_docs_max)
            .finish_non_exhaustive()
    }
}

/// Where a committed change came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Made by this replica.
    Local,
    /// Received from a peer (the site that sent it, which may have relayed it).
    Peer(SiteName),
}

/// Most report events the conflict subscription holds for a slow
/// subscriber. Reports are few next to changes, and each slot of the ring is
/// allocated up front (a report is about 300 bytes), so it stays small.
const CONFLICT_SUBSCRIPTION_CAPACITY_MAX: usize = 256;

/// Most recent document updates remembered for [`Replica::changed_since_synced`]
/// (about 24 bytes each): a peer apart for longer reconciles without hints.
const RECENT_UPDATES_MAX: usize = 4096;

/// Most documents [`Replica::changed_since_synced`] names; beyond that,
/// plain reconciliation is about as cheap.
const CHANGED_SINCE_SYNCED_MAX: usize = 1024;

/// Changes applied to one document, as delivered to subscribers (while
/// their store write runs).
#[derive(Debug, Clone)]
pub struct Committed {
    /// The document.
    pub doc: DocId,
    /// Its heads after the changes.
    pub heads: Vec<ChangeHash>,
    /// The new changes, encoded, in causal order. Empty when a whole
    /// document arrived in saved form: then only `heads` says what is new.
    pub changes: Arc<Vec<Vec<u8>>>,
    /// The hashes of `changes`, in the same order (the new heads when
    /// `changes` is empty).
    pub hashes: Vec<ChangeHash>,
    /// Who made them.
    pub origin: Origin,
    /// The transactions these changes belong to (usually none, or one);
    /// the changes of one transaction are published consecutively.
    pub txns: Vec<TxnId>,
}

/// The outcome of a local commit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Commit {
    /// The document's heads after the commit.
    #[serde(serialize_with = "crate::doc::serialize_hashes")]
    pub heads: Vec<ChangeHash>,
    /// The new change, or `None` when the edit changed nothing.
    #[serde(serialize_with = "serialize_opt_hash")]
    pub change: Option<ChangeHash>,
}

fn serialize_opt_hash<S: serde::Serializer>(
    h: &Option<ChangeHash>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match h {
        Some(h) => s.collect_str(h),
        None => s.serialize_none(),
    }
}

/// The outcome of applying changes received from a peer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    /// Changes that were new here and are now durable.
    pub applied: Vec<ChangeHash>,
    /// Changes that were already known.
    pub duplicates: usize,
    /// Changes left out because changes they depend on are unknown here.
    pub missing_deps: Vec<ChangeHash>,
    /// Changes kept back, not applied yet: they belong to a transaction
    /// whose other members have not all arrived (or depend on such a
    /// change). They are applied with the rest of the transaction.
    pub held: Vec<ChangeHash>,
    /// The document's heads afterwards.
    pub heads: Vec<ChangeHash>,
}

/// A whole document in a form automerge loads, and the heads it contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Saved document, possibly followed by change chunks.
    pub bytes: Vec<u8>,
    /// The heads the bytes contain.
    pub heads: Vec<ChangeHash>,
}

/// A document as JSON with the heads it was read at.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DocView {
    /// The document.
    pub id: DocId,
    /// The heads the value reflects.
    #[serde(serialize_with = "crate::doc::serialize_hashes")]
    pub heads: Vec<ChangeHash>,
    /// The document as JSON.
    pub value: serde_json::Value,
}

/// What [`Replica::heads_digest`] gives: how many documents it covers, and
/// SHA-256 over their item hashes (the reconciliation's, see
/// [`item_hash`]) in id order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadsDigest {
    /// Documents covered.
    pub docs: usize,
    /// The digest.
    pub digest: [u8; 32],
}

impl HeadsDigest {
    /// The digest in lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.digest)
    }
}

/// Documents read per lock of the index while computing a digest.
const HEADS_DIGEST_PAGE: usize = 4096;

/// The index entries starting with `prefix` and sorting after `after`
/// (exclusive), in order.
fn index_page<'a>(
    index: &'a BTreeMap<DocId, Vec<ChangeHash>>,
    prefix: &'a str,
    after: Option<&'a str>,
) -> impl Iterator<Item = (&'a DocId, &'a Vec<ChangeHash>)> + 'a {
    let from = match after {
        Some(after) if after >= prefix => Bound::Excluded(after),
        _ => Bound::Included(prefix),
    };
    index
        .range::<str, _>((from, Bound::Unbounded))
        .take_while(move |(id, _)| id.as_str().starts_with(prefix))
}

/// Counts describing a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaStats {
    /// Documents stored.
    pub docs: usize,
    /// Documents loaded in memory.
    pub loaded_docs: usize,
}

/// Many documents of one site, durable in a [`Store`]. Cheap to clone: clones
/// share the same state.
///
/// ```
/// use std::sync::Arc;
/// use archipelago::{doc::Op, store::Memory, Replica, ReplicaOptions};
///
/// let replica = Replica::open(ReplicaOptions::new("us-east".parse()?), Arc::new(Memory::new()))?;
/// let id = "inventory/sku-1".parse()?;
/// let ops: Vec<Op> = serde_json::from_str(r#"[{"op": "set", "path": "/stock", "value": 5, "as": "counter"}]"#)?;
/// replica.apply_ops(&id, &ops, Some("receive stock"))?;
/// let view = replica.read_json(&id, None)?.expect("just written");
/// assert_eq!(view.value["stock"], 5);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Replica {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("site", &self.shared.options.site)
            .finish_non_exhaustive()
    }
}

struct Shared {
    options: ReplicaOptions,
    /// The actor this replica writes with; replaced by a fresh one if a
    /// document holding changes that never reached the store has to be
    /// dropped (see [`Replica::drop_loaded`]).
    actor: Mutex<automerge::ActorId>,
    store: Arc<dyn Store>,
    state: Mutex<State>,
    events: broadcast::Sender<Committed>,
    conflict_events: broadcast::Sender<Conflict>,
    /// Automatic resolutions wait (the store was restored from a backup;
    /// see [`Replica::release_resolutions`]).
    resolutions_held: std::sync::atomic::AtomicBool,
    /// Received changes waiting for the rest of their transaction.
    holdback: Mutex<Holdback>,
    /// Numbers the transactions this replica commits (with its actor).
    txn_counter: std::sync::atomic::AtomicU64,
    /// Transactions committed here.
    txn_committed: std::sync::atomic::AtomicU64,
    /// How long applied transactions waited for members, in seconds.
    hold_times: Mutex<VecDeque<f64>>,
    /// Documents whose unsaved changes must be written together (a failed
    /// write of a transaction); overlapping sets are merged.
    unsaved_groups: Mutex<Vec<BTreeSet<DocId>>>,
    /// Automatic resolutions that edit other documents, waiting for the
    /// merge that raised them to release its lock.
    deferred_resolutions: Mutex<Vec<crate::conflict::ConflictId>>,
    /// Signalled (with `state`) whenever changes are published.
    published: std::sync::Condvar,
    /// Requests for rights of bounded counters, for the transport.
    rights_wanted: broadcast::Sender<RightsWanted>,
    escrow: escrow::EscrowShared,
}

#[derive(Default)]
struct State {
    /// Heads of every document, as published (a write in progress
    /// included).
    index: BTreeMap<DocId, Vec<ChangeHash>>,
    /// Documents with a slot (loaded, being loaded, or in use).
    slots: HashMap<DocId, (Arc<Slot>, u64)>,
    /// Slots by last use, oldest first, with the time of that use.
    lru: BTreeMap<u64, (DocId, std::time::Instant)>,
    tick: u64,
    /// Number of the latest index update.
    update: u64,
    /// The latest index updates, oldest first, with their numbers; at most
    /// [`RECENT_UPDATES_MAX`].
    recent: VecDeque<(u64, DocId)>,
    /// Per peer: the update number at which its session last had nothing
    /// in flight (see [`Replica::mark_synced`]). In memory only: after a
    /// restart the first reconciliation with each peer runs without hints.
    synced: HashMap<SiteName, u64>,
}

/// One document's lock and, once loaded, its automerge state.
#[derive(Default)]
struct Slot {
    loaded: Mutex<Option<Loaded>>,
}

impl Slot {
    /// Nobody holds the slot (so its lock is free) and dropping it loses
    /// nothing. Call with the replica's state locked: slots are only handed
    /// out under that lock.
    fn evictable(self: &Arc<Slot>) -> bool {
        Arc::strong_count(self) == 1 && !self.holds_unsaved()
    }

    /// The loaded document holds changes a failed write left unsaved, as
    /// far as can be seen without waiting (a slot in use answers no).
    fn holds_unsaved(&self) -> bool {
        match self.loaded.try_lock() {
            Ok(loaded) => loaded.as_ref().is_some_and(|l| l.unsaved),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                p.into_inner().as_ref().is_some_and(|l| l.unsaved)
            }
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }
}

struct Loaded {
    doc: Automerge,
    /// Changes appended to the store since the last snapshot.
    appended_changes: usize,
    appended_bytes: usize,
    snapshot_bytes: usize,
    /// Holds changes whose store write failed after they were published:
    /// the next write of this document is a whole snapshot, and the slot is
    /// not evicted until it succeeds.
    unsaved: bool,
    /// Those unsaved changes were written together with other documents'
    /// (a transaction): they are written again only together with them
    /// ([`Replica::save_unsaved_groups`]), never alone.
    grouped: bool,
    /// What this site's last decrements left of the document's bounded
    /// counters, valid while the document is at these heads
    /// ([`crate::escrow::Known`]).
    escrow_known: Option<(Vec<ChangeHash>, crate::escrow::Known)>,
}

/// Changes from a peer being merged into a loaded document.
struct Merge<'a> {
    /// The document's heads before.
    before: &'a [ChangeHash],
    /// The changes new here, in causal order.
    incoming: &'a [Change],
    /// The objects (other than the root) they write into, when known.
    written: Option<&'a [String]>,
}

/// New changes of one origin inside a durable write.
struct Part {
    changes: Vec<Vec<u8>>,
    hashes: Vec<ChangeHash>,
    origin: Origin,
    /// Heads right after this part, when later parts follow.
    heads: Option<Vec<ChangeHash>>,
    /// The transactions the changes belong to.
    txns: Vec<TxnId>,
}

impl Part {
    fn local(change: Vec<u8>, hash: ChangeHash) -> Part {
        Part {
            changes: vec![change],
            hashes: vec![hash],
            origin: Origin::Local,
            heads: None,
            txns: Vec::new(),
        }
    }
}

/// What a merge leaves to persist: the received changes and any local
/// change of reports and resolutions, the report index writes, and the
/// reports to announce once durable.
struct Settled {
    parts: Vec<Part>,
    extra: Vec<Write>,
    reports: Vec<Conflict>,
}

/// One document's share of a durable write ([`Replica::persist_many`]).
struct Persist<'a, 'g> {
    id: &'a DocId,
    guard: &'a mut MutexGuard<'g, Option<Loaded>>,
    parts: Vec<Part>,
    extra: Vec<Write>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State behind these locks is only replaced whole, never left
    // half-updated, so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Replica {
    /// Opens a replica over `store`, reading its document index. The replica
    /// writes with a fresh actor id, so a restored backup never reuses one.
    pub fn open(options: ReplicaOptions, store: Arc<dyn Store>) -> Result<Replica, Error> {
        let index = store.docs()?.into_iter().map(|e| (e.id, e.heads)).collect();
        let (events, _) = broadcast::channel(options.subscription_capacity.max(1));
        let (conflict_events, _) = broadcast::channel(
            options
                .subscription_capacity
                .clamp(1, CONFLICT_SUBSCRIPTION_CAPACITY_MAX),
        );
        let actor = options.actors.new_actor(&options.site);
        let hold_limits = options.txn_hold;
        let held = store.meta(crate::store::RESOLUTIONS_HELD_KEY)?.is_some();
        if held {
            tracing::warn!(
                "the store was restored from a backup: automatic conflict resolutions are held until released"
            );
        }
        Ok(Replica {
            shared: Arc::new(Shared {
                options,
                actor: Mutex::new(actor),
                store,
                state: Mutex::new(State {
                    index,
                    ..State::default()
                }),
                events,
                conflict_events,
                resolutions_held: std::sync::atomic::AtomicBool::new(held),
                holdback: Mutex::new(Holdback::new(hold_limits)),
                txn_counter: std::sync::atomic::AtomicU64::new(0),
                txn_committed: std::sync::atomic::AtomicU64::new(0),
                hold_times: Mutex::new(VecDeque::new()),
                unsaved_groups: Mutex::new(Vec::new()),
                deferred_resolutions: Mutex::new(Vec::new()),
                published: std::sync::Condvar::new(),
                rights_wanted: broadcast::channel(escrow::RIGHTS_WANTED_CAPACITY).0,
                escrow: escrow::EscrowShared::default(),
            }),
        })
    }

    /// The site of this replica.
    pub fn site(&self) -> &SiteName {
        &self.shared.options.site
    }

    /// The automerge actor id this replica writes with.
    pub fn actor(&self) -> automerge::ActorId {
        lock(&self.shared.actor).clone()
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// Receives every change committed from now on, local or remote, once
    /// it is applied here, while its store write runs (writes are
    /// pipelined, so peers get a change without waiting for the local
    /// fsync). The commit call itself still returns only once durable; a
    /// change whose write fails stays in memory and is written with the
    /// document's next write (see [`Replica::evict_idle`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Committed> {
        self.shared.events.subscribe()
    }

    /// Document and cache counts.
    pub fn stats(&self) -> ReplicaStats {
        let state = lock(&self.shared.state);
        ReplicaStats {
            docs: state.index.len(),
            loaded_docs: state.slots.len(),
        }
    }

    /// Ids of the stored documents starting with `prefix`, in order.
    pub fn doc_ids(&self, prefix: &str) -> Vec<DocId> {
        let state = lock(&self.shared.state);
        index_page(&state.index, prefix, None)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// At most `limit` ids of stored documents starting with `prefix` and
    /// sorting after `after` (exclusive), in order: a page of
    /// [`Replica::doc_ids`].
    pub fn doc_ids_page(&self, prefix: &str, after: Option<&str>, limit: usize) -> Vec<DocId> {
        let state = lock(&self.shared.state);
        index_page(&state.index, prefix, after)
            .take(limit)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// At most `limit` stored documents starting with `prefix` and sorting
    /// after `after` (exclusive), in order, with their heads: a page of
    /// [`Replica::index`].
    pub fn heads_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<(DocId, Vec<ChangeHash>)> {
        let state = lock(&self.shared.state);
        index_page(&state.index, prefix, after)
            .take(limit)
            .map(|(id, heads)| (id.clone(), heads.clone()))
            .collect()
    }

    /// A digest of the stored documents starting with `prefix` and their
    /// heads: two replicas holding the same documents at the same heads
    /// give the same digest, so comparing sites costs one digest each
    /// until they differ. Reads the index in pages, so commits go on
    /// meanwhile; a document committed during the call may or may not
    /// count.
    pub fn heads_digest(&self, prefix: &str) -> HeadsDigest {
        let mut hasher = Sha256::new();
        let mut docs = 0;
        let mut after: Option<DocId> = None;
        loop {
            let page =
                self.heads_page(prefix, after.as_ref().map(DocId::as_str), HEADS_DIGEST_PAGE);
            for (id, heads) in &page {
                let heads: Vec<[u8; 32]> = heads.iter().map(|h| h.0).collect();
                hasher.update(item_hash(id, &heads));
            }
            docs += page.len();
            if page.len() < HEADS_DIGEST_PAGE {
                break;
            }
            after = page.last().map(|(id, _)| id.clone());
        }
        HeadsDigest {
            docs,
            digest: hasher.finalize().into(),
        }
    }

    /// Every stored document with its heads.
    pub fn index(&self) -> Vec<(DocId, Vec<ChangeHash>)> {
        lock(&self.shared.state)
            .index
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The heads of a stored document.
    pub fn heads(&self, id: &DocId) -> Option<Vec<ChangeHash>> {
        lock(&self.shared.state).index.get(id).cloned()
    }

    /// Reads a document with `f`; `None` when it does not exist.
    pub fn with_doc<R>(
        &self,
        id: &DocId,
        f: impl FnOnce(&Automerge) -> R,
    ) -> Result<Option<R>, Error> {
        if !lock(&self.shared.state).index.contains_key(id) {
            return Ok(None);
        }
        let slot = self.slot(id);
        let mut loaded = lock(&slot.loaded);
        let loaded = self.ensure_loaded(id, &mut loaded)?;
        Ok(Some(f(&loaded.doc)))
    }

    /// The document as JSON, now or as of `at` (time travel).
    pub fn read_json(
        &self,
        id: &DocId,
        at: Option<&[ChangeHash]>,
    ) -> Result<Option<DocView>, Error> {
        let view = self.with_doc(id, |doc| {
            if let Some(heads) = at {
                let unknown = unknown_hashes(doc, heads);
                if !unknown.is_empty() {
                    return Err(Error::UnknownHeads {
                        doc: id.clone(),
                        heads: unknown,
                    });
                }
            }
            let heads = at.map_or_else(|| doc.get_heads(), <[ChangeHash]>::to_vec);
            Ok(DocView {
                id: id.clone(),
                value: doc::json::to_json(doc, at),
                heads,
            })
        })?;
        view.transpose()
    }

    /// Reads a document into a Rust type.
    pub fn get<T: autosurgeon::Hydrate>(&self, id: &DocId) -> Result<Option<T>, Error> {
        self.with_doc(id, |doc| autosurgeon::hydrate(doc))?
            .transpose()
            .map_err(Error::from)
    }

    /// The document's change history, oldest first.
    pub fn history(&self, id: &DocId) -> Result<Option<Vec<ChangeInfo>>, Error> {
        self.with_doc(id, doc::history::history)
    }

    /// Encoded changes of a document that follow `have` (heads the caller
    /// holds). Every head in `have` must be known here: automerge answers
    /// unknown heads with the whole history, so they are refused instead.
    pub fn changes_after(
        &self,
        id: &DocId,
        have: &[ChangeHash],
    ) -> Result<Option<Vec<Vec<u8>>>, Error> {
        self.with_doc(id, |doc| {
            let unknown = unknown_hashes(doc, have);
            if !unknown.is_empty() {
                return Err(Error::UnknownHeads {
                    doc: id.clone(),
                    heads: unknown,
                });
            }
            Ok(doc
                .get_changes(have)
                .iter()
                .map(|c| c.raw_bytes().to_vec())
                .collect())
        })?
        .transpose()
    }

    /// Which of `hashes` the document holds (empty when it does not exist).
    pub fn known_hashes(
        &self,
        id: &DocId,
        hashes: &[ChangeHash],
    ) -> Result<Vec<ChangeHash>, Error> {
        let known = self.with_doc(id, |doc| {
            let unknown = unknown_hashes(doc, hashes);
            hashes
                .iter()
                .filter(|h| !unknown.contains(h))
                .copied()
                .collect()
        })?;
        Ok(known.unwrap_or_default())
    }

    /// Hashes spread over the document's history, newest first: the last 16
    /// changes, then every 2nd, 4th, 8th, ... further back, and the first.
    /// A peer finds the newest it holds to use as a common base.
    pub fn history_sample(&self, id: &DocId) -> Result<Vec<ChangeHash>, Error> {
        let sample = self.with_doc(id, |doc| {
            let all = doc.get_changes_meta(&[]);
            let mut sample = Vec::new();
            let mut back = 0usize;
            let mut step = 1usize;
            while back < all.len() {
                sample.push(all[all.len() - 1 - back].hash);
                if sample.len() >= 16 {
                    step *= 2;
                }
                back += step;
            }
            if let Some(first) = all.first() {
                if sample.last() != Some(&first.hash) {
                    sample.push(first.hash);
                }
            }
            sample
        })?;
        Ok(sample.unwrap_or_default())
    }

    /// Applies `ops` atomically as one change and returns once it is
    /// durable. The document is created if it does not exist. If any op
    /// fails, nothing changes.
    pub fn apply_ops(
        &self,
        id: &DocId,
        ops: &[Op],
        message: Option<&str>,
    ) -> Result<Commit, Error> {
        self.apply_ops_if(id, ops, message, &crate::txn::Precondition::none())
    }

    /// Makes the document equal `value` (a JSON object), changing only the
    /// fields that differ.
    pub fn put_json(
        &self,
        id: &DocId,
        value: &serde_json::Value,
        message: Option<&str>,
    ) -> Result<Commit, Error> {
        self.transact(id, message, |tx| {
            doc::json::reconcile_root(tx, value).map_err(Error::from)
        })
        .map(|(c, ())| c)
    }

    /// Writes a Rust value as the whole document, reconciled field by field
    /// (autosurgeon), so concurrent edits of other fields survive.
    pub fn put<T: autosurgeon::Reconcile>(
        &self,
        id: &DocId,
        value: &T,
        message: Option<&str>,
    ) -> Result<Commit, Error> {
        self.transact(id, message, |tx| {
            autosurgeon::reconcile(tx, value).map_err(Error::from)
        })
        .map(|(c, ())| c)
    }

    /// Reads the document as `T` (or `T::default()` when it is empty), lets
    /// `f` change it, and writes back only what changed.
    pub fn update<T, R>(
        &self,
        id: &DocId,
        message: Option<&str>,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<(Commit, R), Error>
    where
        T: autosurgeon::Hydrate + autosurgeon::Reconcile + Default,
    {
        self.transact(id, message, |tx| {
            let mut value: T = if tx.length(automerge::ROOT) == 0 {
                T::default()
            } else {
                autosurgeon::hydrate(tx)?
            };
            let result = f(&mut value);
            autosurgeon::reconcile(tx, &value)?;
            Ok(result)
        })
    }

    /// Runs `f` in an automerge transaction on the document (created if
    /// missing) and commits its edits as one durable change. When `f` fails
    /// the transaction is rolled back and nothing changes.
    pub fn transact<R>(
        &self,
        id: &DocId,
        message: Option<&str>,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, Error>,
    ) -> Result<(Commit, R), Error> {
        // An edit made here knows nothing of bounded counters: refuse one
        // that changed a counter's value or rights outside their ops.
        self.transact_checked(id, message, None, |tx| {
            let out = f(tx)?;
            if crate::escrow::any(tx) {
                crate::escrow::check_untouched(tx)?;
            }
            Ok(out)
        })
    }

    /// [`Replica::transact`], first checking `precondition` (when given)
    /// under the document's lock.
    fn transact_checked<R>(
        &self,
        id: &DocId,
        message: Option<&str>,
        precondition: Option<&crate::txn::Precondition>,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, Error>,
    ) -> Result<(Commit, R), Error> {
        self.transact_known(id, message, precondition, false, |tx, _| f(tx))
    }

    /// [`Replica::transact_checked`], passing `f` what the document's last
    /// decrements left of its bounded counters when it is still at the
    /// heads they produced (empty otherwise). With `keep`, `f` keeps that
    /// up to date with what it writes, and it is kept with the heads of the
    /// commit; without, it is dropped.
    fn transact_known<R>(
        &self,
        id: &DocId,
        message: Option<&str>,
        precondition: Option<&crate::txn::Precondition>,
        keep: bool,
        f: impl FnOnce(&mut Transaction<'_>, &mut crate::escrow::Known) -> Result<R, Error>,
    ) -> Result<(Commit, R), Error> {
        crate::txn::check_message(message)?;
        self.refuse_strong(id)?;
        let slot = self.slot(id);
        let mut guard = lock(&slot.loaded);
        let exists = precondition.is_some() && lock(&self.shared.state).index.contains_key(id);
        let loaded = self.ensure_loaded_or_new(id, &mut guard)?;
        if let Some(reason) = precondition.and_then(|p| p.failure(exists, &loaded.doc.get_heads()))
        {
            return Err(Error::PreconditionFailed {
                doc: id.clone(),
                reason,
            });
        }
        let mut known = match loaded.escrow_known.take() {
            Some((heads, known)) if keep && heads == loaded.doc.get_heads() => known,
            _ => crate::escrow::Known::default(),
        };
        let mut tx = loaded.doc.transaction();
        let result = match f(&mut tx, &mut known) {
            Ok(result) => result,
            Err(e) => {
                tx.rollback();
                return Err(e);
            }
        };
        let now_ms = self.shared.options.clock.now_ms();
        let options = || {
            let options = CommitOptions::default().with_time(now_ms);
            match message {
                Some(message) => options.with_message(message),
                None => options,
            }
        };
        let hash = match tx.commit_with(options()).0 {
            Some(hash) => hash,
            // A document is created by its first commit, even an empty one,
            // so that writing `{}` to a new document makes it exist.
            None if loaded.doc.get_heads().is_empty() => loaded.doc.empty_commit(options()),
            None => {
                let heads = loaded.doc.get_heads();
                if keep && !known.is_empty() {
                    loaded.escrow_known = Some((heads.clone(), known));
                }
                self.save_unsaved(id, &mut guard)?;
                return Ok((
                    Commit {
                        heads,
                        change: None,
                    },
                    result,
                ));
            }
        };
        let change = committed_bytes(&loaded.doc, &hash);
        let committed =
            self.persist(id, &mut guard, vec![Part::local(change, hash)], Vec::new())?;
        if keep && !known.is_empty() {
            // A failed write drops the loaded document, and this with it.
            if let Some(loaded) = guard.as_mut() {
                loaded.escrow_known = Some((committed.clone(), known));
            }
        }
        Ok((
            Commit {
                heads: committed,
                change: Some(hash),
            },
            result,
        ))
    }

    /// Applies encoded changes received from a peer, in one batch, and
    /// returns once the new ones are durable. Malformed bytes are refused
    /// with [`Error::BadChange`] and change nothing; changes whose
    /// dependencies are unknown here are left out and listed. Changes of a
    /// transaction whose other members have not all arrived are held back
    /// ([`Applied::held`]) and applied with them, in one durable write.
    pub fn apply_changes(
        &self,
        id: &DocId,
        changes: &[Vec<u8>],
        from: Origin,
    ) -> Result<Applied, Error> {
        let (decoded, objects) = decode_batch(id, changes)?;
        self.apply_decoded(id, decoded, Some(objects), from, false)
    }

    /// [`Replica::apply_changes`], except that transactions it completes
    /// wait for [`Replica::apply_ready`], which applies everything
    /// completed since in one durable write: a session catching up many
    /// transactions calls it once per batch of frames, not once per
    /// transaction.
    pub fn apply_changes_batched(
        &self,
        id: &DocId,
        changes: &[Vec<u8>],
        from: Origin,
    ) -> Result<Applied, Error> {
        let (decoded, objects) = decode_batch(id, changes)?;
        self.apply_decoded(id, decoded, Some(objects), from, true)
    }

    /// [`Replica::apply_changes`] for changes already decoded and checked;
    /// `objects` lists what each writes into, when known. With `batched`,
    /// transactions completed here wait for [`Replica::apply_ready`].
    fn apply_decoded(
        &self,
        id: &DocId,
        decoded: Vec<Change>,
        mut objects: Option<WrittenObjects>,
        from: Origin,
        batched: bool,
    ) -> Result<Applied, Error> {
        let slot = self.slot(id);
        let mut guard = lock(&slot.loaded);
        let loaded = self.ensure_loaded_or_new(id, &mut guard)?;
        // Only changes from peers wait for their transaction: a local one
        // is applied with the rest of its transaction by construction.
        let peer = match &from {
            Origin::Peer(site) => Some(site.clone()),
            Origin::Local => None,
        };
        let mut holdback = lock(&self.shared.holdback);
        let holding = peer.is_some() && (!holdback.is_empty() || decoded.iter().any(is_txn_member));
        let mut batch = decoded;
        if holding {
            // What waits for this document takes part in the ordering, so
            // changes that depend on it are recognised as waiting too.
            batch.extend(holdback.held_for(id));
        }
        let (ready, duplicates, missing_deps) = order_new_changes(&loaded.doc, batch);
        let mut now_ready = Vec::with_capacity(ready.len());
        let mut held = Vec::new();
        let mut later = Vec::new();
        let mut groups = Vec::new();
        match &peer {
            Some(site) if holding => {
                let now = self.shared.options.clock.now_ms();
                let replicates = &self.shared.options.replicates;
                // Changes put off to a later batch, and so every change of
                // this batch that depends on one of them (applied now, it
                // would be stored without its dependency).
                let mut put_off: HashSet<ChangeHash> = HashSet::new();
                for change in ready {
                    if change.deps().iter().any(|dep| put_off.contains(dep)) {
                        put_off.insert(change.hash());
                        later.push(change.hash());
                        continue;
                    }
                    let written = objects
                        .as_ref()
                        .and_then(|o| o.get(&change.hash()))
                        .cloned();
                    match holdback.offer(id, &change, site, now, &|doc| replicates(doc), written) {
                        holdback::Decision::Apply => now_ready.push(change),
                        holdback::Decision::Held => held.push(change.hash()),
                        holdback::Decision::Later => {
                            put_off.insert(change.hash());
                            later.push(change.hash());
                        }
                    }
                }
                // Batched: completed groups wait in the holdback for
                // `apply_ready`, which applies all of them in one write.
                if !batched {
                    groups = holdback.take_complete();
                }
                self.drop_groups(holdback.enforce_limits(now));
            }
            _ => now_ready = ready,
        }
        drop(holdback);
        let mut missing_deps = missing_deps;
        missing_deps.extend(later);
        let mut applied = Applied {
            applied: Vec::new(),
            duplicates,
            missing_deps,
            held,
            heads: Vec::new(),
        };
        // Groups taken from the holdback are applied (and so released)
        // whatever happens to this document's own changes: a group left
        // taken would put off every change after it for good.
        let merged = if now_ready.is_empty() {
            // A peer sending again what a failed write left unsaved retries it.
            self.save_unsaved(id, &mut guard).map(|()| {
                applied.heads = guard.as_ref().expect("loaded above").doc.get_heads();
            })
        } else {
            applied.applied = now_ready.iter().map(Change::hash).collect();
            let bytes: Vec<Vec<u8>> = now_ready.iter().map(|c| c.raw_bytes().to_vec()).collect();
            let before = loaded_heads(&guard);
            let written = objects
                .as_mut()
                .and_then(|objects| written_by(&now_ready, |hash| objects.remove(hash)));
            let merge = Merge {
                before: &before,
                incoming: &now_ready,
                written: written.as_deref(),
            };
            let txns = txns_of(&now_ready);
            self.note_applied(&txns);
            self.merge_and_settle(id, &mut guard, &merge, bytes, from, txns)
                .map(|heads| applied.heads = heads)
        };
        drop(guard);
        // Like a single document's, a transaction's unsaved changes are
        // retried when changes arrive (with no lock held here).
        if !lock(&self.shared.unsaved_groups).is_empty() {
            self.save_unsaved_groups();
        }
        let mut failed = merged.err();
        for group in groups {
            match self.apply_group(group) {
                Ok(written) => {
                    if let Some((heads, done)) = written.get(id) {
                        applied.heads.clone_from(heads);
                        applied.held.retain(|h| !done.contains(h));
                        applied.applied.extend(done.iter().copied());
                    }
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if !lock(&self.shared.deferred_resolutions).is_empty() {
            self.run_deferred_resolutions();
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(applied),
        }
    }

    /// Applies `ready` (new here, in causal order) to the loaded document
    /// with its patches logged, then runs the conflict layer and persists.
    fn merge_and_settle(
        &self,
        id: &DocId,
        guard: &mut MutexGuard<'_, Option<Loaded>>,
        merge: &Merge<'_>,
        bytes: Vec<Vec<u8>>,
        from: Origin,
        txns: Vec<TxnId>,
    ) -> Result<Vec<ChangeHash>, Error> {
        let settled = self.merge_parts(id, guard, merge, bytes, from, txns)?;
        let heads = self.persist(id, guard, settled.parts, settled.extra)?;
        self.announce(settled.reports);
        Ok(heads)
    }

    /// Applies `ready` (new here, in causal order) to the loaded document
    /// with its patches logged and runs the conflict layer: returns what to
    /// persist (the received changes and any local change of reports and
    /// resolutions, with the report index) and the reports to announce
    /// once durable. On failure the loaded document is dropped.
    fn merge_parts(
        &self,
        id: &DocId,
        guard: &mut MutexGuard<'_, Option<Loaded>>,
        merge: &Merge<'_>,
        bytes: Vec<Vec<u8>>,
        from: Origin,
        txns: Vec<TxnId>,
    ) -> Result<Settled, Error> {
        let (before, ready) = (merge.before, merge.incoming);
        // A document new here has nothing to conflict with, and one no
        // detector or rule covers needs no patches: its reports (arriving
        // from sites that detect) are read from its keys instead.
        let detect = !before.is_empty() && self.shared.options.conflicts.covers(id.as_str());
        let mut log = if detect {
            PatchLog::active()
        } else {
            PatchLog::inactive()
        };
        self.contain(id, "applying the changes", guard, |doc| {
            doc.apply_changes_log_patches(ready.iter().cloned(), &mut log)
        })?;
        let patches = detect.then(|| {
            let doc = &guard
                .as_ref()
                .expect("contain keeps the document on success")
                .doc;
            doc.make_patches(&mut log)
        });
        let received = Part {
            changes: bytes,
            hashes: ready.iter().map(Change::hash).collect(),
            origin: from,
            heads: None,
            txns,
        };
        self.settle(id, guard, merge, patches.as_deref(), received)
    }

    /// The document in automerge's saved form, for a peer that holds none
    /// of it.
    pub fn save_bytes(&self, id: &DocId) -> Result<Option<Vec<u8>>, Error> {
        self.with_doc(id, Automerge::save)
    }

    /// The document in a form automerge loads, for a peer that holds none
    /// of it, with the heads those bytes contain. A document not loaded here
    /// is not loaded for this: its stored snapshot and appended changes are
    /// concatenated as they are (automerge loads a run of chunks), so
    /// sending many idle documents costs no memory for them.
    pub fn snapshot_bytes(&self, id: &DocId) -> Result<Option<Snapshot>, Error> {
        if !lock(&self.shared.state).index.contains_key(id) {
            return Ok(None);
        }
        let slot = self.slot(id);
        // Commits hold this lock until they are durable and indexed, so the
        // index heads and the stored bytes agree while it is held.
        let loaded = lock(&slot.loaded);
        if let Some(loaded) = loaded.as_ref() {
            return Ok(Some(Snapshot {
                bytes: loaded.doc.save(),
                heads: loaded.doc.get_heads(),
            }));
        }
        let Some(heads) = self.heads(id) else {
            return Ok(None);
        };
        let Some(stored) = self.shared.store.load(id)? else {
            return Ok(None);
        };
        let mut bytes = stored.snapshot.unwrap_or_default();
        for change in &stored.changes {
            bytes.extend_from_slice(change);
        }
        Ok(Some(Snapshot { bytes, heads }))
    }

    /// Merges a whole document received in saved form. The bytes are
    /// verified on load (automerge checks the heads against the contents;
    /// decoder panics are contained); a document new here is stored as the
    /// received snapshot (and not kept loaded), an existing one merges it.
    /// Subscribers get a [`Committed`] with no change bytes for a new
    /// document: it names the new heads only.
    pub fn apply_snapshot(&self, id: &DocId, bytes: &[u8], from: Origin) -> Result<Applied, Error> {
        self.apply_snapshots(&[(id.clone(), bytes)], &from)
            .pop()
            .expect("one result per document")
    }

    /// Merges a whole document into the one held here, like changes.
    fn merge_snapshot(&self, id: &DocId, bytes: &[u8], from: Origin) -> Result<Applied, Error> {
        let stored = StoredDoc {
            snapshot: Some(bytes.to_vec()),
            changes: Vec::new(),
        };
        let incoming = load_document(&stored).map_err(|reason| Error::BadChange {
            doc: id.clone(),
            index: 0,
            reason,
        })?;
        let new = {
            let slot = self.slot(id);
            let mut guard = lock(&slot.loaded);
            let loaded = self.ensure_loaded_or_new(id, &mut guard)?;
            let new = loaded.doc.get_changes_added(&incoming);
            if new.is_empty() {
                let before = loaded.doc.get_heads();
                self.save_unsaved(id, &mut guard)?;
                return Ok(Applied {
                    duplicates: 1,
                    heads: before,
                    ..Applied::default()
                });
            }
            new
        };
        // Like changes: members of a transaction may have to wait.
        self.apply_decoded(id, new, None, from, false)
    }

    /// [`Replica::apply_snapshot`] for many documents at once: those new
    /// here are verified one by one and stored in one durable write (one
    /// fsync for the lot, where a document at a time pays one each); the
    /// others merge one by one. Results are in the order of `docs`.
    pub fn apply_snapshots(
        &self,
        docs: &[(DocId, &[u8])],
        from: &Origin,
    ) -> Vec<Result<Applied, Error>> {
        let mut results: Vec<Option<Result<Applied, Error>>> = docs.iter().map(|_| None).collect();
        // Documents new here, each once, in id order (the lock order).
        let mut fresh: Vec<(usize, Automerge)> = Vec::new();
        {
            let state = lock(&self.shared.state);
            let mut seen = HashSet::new();
            for (i, (id, bytes)) in docs.iter().enumerate() {
                if state.index.contains_key(id) || !seen.insert(id.clone()) {
                    continue;
                }
                let stored = StoredDoc {
                    snapshot: Some(bytes.to_vec()),
                    changes: Vec::new(),
                };
                match load_document(&stored) {
                    Ok(doc) => fresh.push((i, doc)),
                    Err(reason) => {
                        results[i] = Some(Err(Error::BadChange {
                            doc: id.clone(),
                            index: 0,
                            reason,
                        }))
                    }
                }
            }
        }
        fresh.sort_by(|a, b| docs[a.0].0.cmp(&docs[b.0].0));
        let slots: Vec<Arc<Slot>> = fresh.iter().map(|(i, _)| self.slot(&docs[*i].0)).collect();
        let mut guards: Vec<MutexGuard<'_, Option<Loaded>>> =
            slots.iter().map(|slot| lock(&slot.loaded)).collect();
        // Created meanwhile (a local write, another peer, changes that
        // arrived first): merged alone below. Commits hold the slot lock
        // until indexed, so with it held the index is current.
        let mut whole: Vec<bool> = fresh
            .iter()
            .zip(&guards)
            .map(|((i, _), guard)| {
                guard.is_none() && !lock(&self.shared.state).index.contains_key(&docs[*i].0)
            })
            .collect();
        // A document holding a member of a transaction whose other members
        // are not stored with it here goes the way of changes, where the
        // member can wait for the rest.
        let candidates: Vec<(&DocId, &Automerge)> = fresh
            .iter()
            .zip(&whole)
            .filter(|(_, whole)| **whole)
            .map(|((i, doc), _)| (&docs[*i].0, doc))
            .collect();
        let (alone, txns) = self.txns_not_whole(&candidates);
        for ((i, _), whole) in fresh.iter().zip(whole.iter_mut()) {
            *whole &= !alone.contains(&docs[*i].0);
        }
        let mut writes = Vec::new();
        let mut stored = Vec::new();
        let mut events = Vec::new();
        for (((i, doc), _guard), whole) in fresh.iter().zip(guards.iter_mut()).zip(&whole) {
            let id = &docs[*i].0;
            if !*whole {
                continue;
            }
            let heads = doc.get_heads();
            writes.push(Write::Snapshot {
                doc: id.clone(),
                bytes: docs[*i].1.to_vec(),
                heads: heads.clone(),
            });
            let (index, announced) = self.index_reports(doc, None);
            writes.extend(index);
            events.extend(announced);
            stored.push((*i, heads));
        }
        if !writes.is_empty() {
            if let Err(e) = self.shared.store.commit(writes) {
                let reason = e.to_string();
                for (i, _) in &stored {
                    results[*i] = Some(Err(Error::Store(StoreError::Backend(reason.clone()))));
                }
                stored.clear();
            }
        }
        if !stored.is_empty() {
            // Their members may still arrive as changes from a slower path.
            self.note_applied(&txns);
        }
        let mut published = Vec::with_capacity(stored.len());
        for (i, heads) in stored {
            published.push(Committed {
                doc: docs[i].0.clone(),
                heads: heads.clone(),
                changes: Arc::new(Vec::new()),
                hashes: heads.clone(),
                origin: from.clone(),
                txns: Vec::new(),
            });
            results[i] = Some(Ok(Applied {
                applied: heads.clone(),
                heads,
                ..Applied::default()
            }));
        }
        self.publish_all(published);
        drop(guards);
        self.announce(events);
        // Everything else: one at a time.
        docs.iter()
            .zip(results)
            .map(|((id, bytes), result)| {
                result.unwrap_or_else(|| self.merge_snapshot(id, bytes, from.clone()))
            })
            .collect()
    }

    /// Writes new changes of a loaded document durably (compacting when
    /// due) together with `extra` writes. The write is pipelined: the index
    /// and subscribers learn of the changes first, one [`Committed`] per
    /// part, so sessions push them to peers and readers see them while the
    /// store writes; the call returns once the write is durable.
    ///
    /// If the store fails, the changes stay in the loaded document: they may
    /// already be on their way to peers, and dropping them would let this
    /// actor reuse their sequence numbers for different changes. The
    /// document is marked unsaved, its next write (a commit, a peer sending
    /// the changes again, or [`Replica::evict_idle`]) is a whole snapshot
    /// with its report index, and it stays loaded until then. The caller
    /// gets [`Error::NotDurable`]: the change took effect here but would be
    /// lost with a crash before that write (unless a peer holds it).
    fn persist(
        &self,
        id: &DocId,
        guard: &mut MutexGuard<'_, Option<Loaded>>,
        parts: Vec<Part>,
        extra: Vec<Write>,
    ) -> Result<Vec<ChangeHash>, Error> {
        let mut heads = self.persist_many(vec![Persist {
            id,
            guard,
            parts,
            extra,
        }])?;
        Ok(heads.pop().expect("one document in, one out"))
    }

    /// [`Replica::persist`] for several documents, each locked by the
    /// caller, in one durable store write: their changes are published
    /// together (consecutively, so no subscriber sees another change among
    /// them) and become durable together, or the write fails for all.
    /// Returns each document's heads, in order.
    fn persist_many(&self, mut items: Vec<Persist<'_, '_>>) -> Result<Vec<Vec<ChangeHash>>, Error> {
        let options = &self.shared.options;
        let mut events = Vec::new();
        let mut plans = Vec::with_capacity(items.len());
        let mut reports = Vec::new();
        // A local change of a document with bounded counters may spend or
        // move rights: published before it is durable, a crash could lose
        // it here while peers hold it, and this site would spend the same
        // rights again. Such writes publish once durable, and a failed one
        // is undone (nobody saw it). That needs the documents to hold
        // nothing else unwritten: after an earlier failed write (rare: the
        // store failed, then a crash must follow before the next write
        // succeeds) they publish at once as other writes do. A saga's
        // step is the same: published before durable, a crash could lose
        // it here while peers hold it, and the step would run again.
        let publish_when_durable = items.iter().any(|item| {
            item.parts.iter().any(|p| p.origin == Origin::Local)
                && (crate::saga::saga_id_of(item.id).is_some()
                    || item
                        .guard
                        .as_ref()
                        .is_some_and(|loaded| crate::escrow::any(&loaded.doc)))
        }) && items.iter().all(|item| {
            item.guard
                .as_ref()
                .is_some_and(|loaded| !loaded.unsaved && !loaded.grouped)
        });
        for item in &mut items {
            let loaded = item
                .guard
                .as_mut()
                .expect("persist is called with a loaded document");
            let heads = loaded.doc.get_heads();
            let changes: Vec<Vec<u8>> = item
                .parts
                .iter()
                .flat_map(|p| p.changes.iter().cloned())
                .collect();
            let new_bytes: usize = changes.iter().map(Vec::len).sum();
            let appended_changes = loaded.appended_changes + changes.len();
            let appended_bytes = loaded.appended_bytes + new_bytes;
            let compact = loaded.unsaved
                || appended_changes >= options.compact_changes_max
                || (appended_changes >= options.compact_changes_min
                    && appended_bytes >= loaded.snapshot_bytes);
            // After a failed write the report index may lag the reports in
            // the document: rewrite what differs.
            if loaded.unsaved {
                let (index, announced) = self.index_reports(&loaded.doc, None);
                // The caller's own index writes (and announcements) stand.
                let keyed: HashSet<String> = item
                    .extra
                    .iter()
                    .filter_map(|w| match w {
                        Write::PutMeta { key, .. } => Some(key.clone()),
                        _ => None,
                    })
                    .collect();
                item.extra.extend(
                    index.into_iter().filter(
                        |w| !matches!(w, Write::PutMeta { key, .. } if keyed.contains(key)),
                    ),
                );
                reports.extend(
                    announced
                        .into_iter()
                        .filter(|r| !keyed.contains(&conflicts::index_key(&r.id))),
                );
            }
            for part in std::mem::take(&mut item.parts) {
                events.push(Committed {
                    doc: item.id.clone(),
                    heads: part.heads.unwrap_or_else(|| heads.clone()),
                    changes: Arc::new(part.changes),
                    hashes: part.hashes,
                    origin: part.origin,
                    txns: part.txns,
                });
            }
            plans.push((heads, changes, compact, appended_changes, appended_bytes));
        }
        // Published first: saving a whole document to compact it can take
        // milliseconds, and the peers need not wait for it.
        let mut events = Some(events);
        if !publish_when_durable {
            self.publish_all(events.take().unwrap_or_default());
        }
        let ids: BTreeSet<DocId> = items.iter().map(|item| item.id.clone()).collect();
        if let Some(blocked) = self.written_apart(&items, &ids).cloned() {
            // Writing it now would store part of a transaction.
            for item in &mut items {
                item.guard.as_mut().expect("loaded").unsaved = true;
            }
            self.group_unsaved(&mut items, ids);
            return Err(Error::NotDurable {
                doc: blocked.clone(),
                source: StoreError::Backend(format!(
                    "{blocked} holds changes of a transaction whose write failed; they are written together with the rest of it"
                )),
            });
        }
        let mut writes = Vec::new();
        let mut snapshot_lens = Vec::with_capacity(items.len());
        for (item, (heads, changes, compact, _, _)) in items.iter_mut().zip(&mut plans) {
            let loaded = item.guard.as_mut().expect("loaded");
            let write = if *compact {
                let bytes = loaded.doc.save();
                snapshot_lens.push(Some(bytes.len()));
                Write::Snapshot {
                    doc: item.id.clone(),
                    bytes,
                    heads: heads.clone(),
                }
            } else {
                snapshot_lens.push(None);
                Write::AppendChanges {
                    doc: item.id.clone(),
                    changes: std::mem::take(changes),
                    heads: heads.clone(),
                }
            };
            writes.push(write);
            writes.append(&mut item.extra);
        }
        if let Err(e) = self.shared.store.commit(writes) {
            if publish_when_durable {
                for item in &mut items {
                    tracing::warn!(doc = %item.id, error = %e, "store write failed; a change of bounded counters is undone");
                    if let Some(loaded) = item.guard.as_mut() {
                        // Its actor's sequence numbers move on regardless.
                        loaded.unsaved = true;
                    }
                    self.drop_loaded(item.id, item.guard);
                }
                return Err(Error::Store(e));
            }
            let first = items[0].id.clone();
            for item in &mut items {
                tracing::warn!(doc = %item.id, error = %e, "store write failed; the changes stay in memory until the document's next write");
                item.guard.as_mut().expect("loaded").unsaved = true;
            }
            if items.len() > 1 {
                self.group_unsaved(&mut items, ids);
            }
            return Err(Error::NotDurable {
                doc: first,
                source: e,
            });
        }
        if items
            .iter()
            .any(|item| item.guard.as_ref().is_some_and(|l| l.grouped))
        {
            lock(&self.shared.unsaved_groups).retain(|group| !group.is_subset(&ids));
        }
        let mut all_heads = Vec::with_capacity(items.len());
        for ((item, (heads, _, _, appended_changes, appended_bytes)), snapshot_len) in
            items.iter_mut().zip(plans).zip(snapshot_lens)
        {
            let loaded = item.guard.as_mut().expect("loaded");
            loaded.unsaved = false;
            loaded.grouped = false;
            match snapshot_len {
                Some(len) => {
                    loaded.snapshot_bytes = len;
                    loaded.appended_changes = 0;
                    loaded.appended_bytes = 0;
                }
                None => {
                    loaded.appended_changes = appended_changes;
                    loaded.appended_bytes = appended_bytes;
                }
            }
            all_heads.push(heads);
        }
        if let Some(events) = events {
            self.publish_all(events);
        }
        self.announce(reports);
        Ok(all_heads)
    }

    /// Runs an automerge call that may fail or panic on bad input against
    /// the loaded document. On either, the loaded state is suspect: it is
    /// dropped so the next use reloads the durable state, and the failure
    /// is a [`Error::BadChange`].
    fn contain<R>(
        &self,
        id: &DocId,
        what: &str,
        guard: &mut MutexGuard<'_, Option<Loaded>>,
        f: impl FnOnce(&mut Automerge) -> Result<R, automerge::AutomergeError>,
    ) -> Result<R, Error> {
        let loaded = guard
            .as_mut()
            .expect("contain is called with a loaded document");
        let reason = match std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut loaded.doc))) {
            Ok(Ok(result)) => return Ok(result),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("automerge panicked {what}"),
        };
        self.drop_loaded(id, guard);
        Err(Error::BadChange {
            doc: id.clone(),
            index: 0,
            reason,
        })
    }

    /// Writes a document that a failed write left unsaved, if it is.
    fn save_unsaved(
        &self,
        id: &DocId,
        guard: &mut MutexGuard<'_, Option<Loaded>>,
    ) -> Result<(), Error> {
        // Grouped ones are written with their group, by the sweep.
        if guard
            .as_ref()
            .is_some_and(|loaded| loaded.unsaved && !loaded.grouped)
        {
            self.persist(id, guard, Vec::new(), Vec::new())?;
        }
        Ok(())
    }

    /// The first of `items` whose unsaved changes belong to a group of
    /// documents `ids` does not cover: it cannot be written in this write.
    fn written_apart<'i>(
        &self,
        items: &'i [Persist<'_, '_>],
        ids: &BTreeSet<DocId>,
    ) -> Option<&'i DocId> {
        let grouped: Vec<&DocId> = items
            .iter()
            .filter(|item| item.guard.as_ref().is_some_and(|l| l.unsaved && l.grouped))
            .map(|item| item.id)
            .collect();
        if grouped.is_empty() {
            return None;
        }
        let groups = lock(&self.shared.unsaved_groups);
        grouped.into_iter().find(|id| {
            groups
                .iter()
                .any(|group| group.contains(*id) && !group.is_subset(ids))
        })
    }

    /// Records that the unsaved changes of `items` (documents `ids`) must
    /// be written together, merged with any group they overlap.
    fn group_unsaved(&self, items: &mut [Persist<'_, '_>], mut ids: BTreeSet<DocId>) {
        for item in items.iter_mut() {
            item.guard.as_mut().expect("loaded").grouped = true;
        }
        let mut groups = lock(&self.shared.unsaved_groups);
        groups.retain(|group| {
            if group.is_disjoint(&ids) {
                true
            } else {
                ids.extend(group.iter().cloned());
                false
            }
        });
        groups.push(ids);
    }

    /// Writes the unsaved changes of each group of documents together
    /// (taking their locks in id order), for the groups a failed write of a
    /// transaction left. Members no longer holding unsaved changes (dropped
    /// meanwhile) leave their group. Returns how many groups were written.
    fn save_unsaved_groups(&self) -> usize {
        let groups: Vec<BTreeSet<DocId>> = lock(&self.shared.unsaved_groups).clone();
        let mut written = 0;
        for group in groups {
            let ids: Vec<DocId> = group.iter().cloned().collect();
            let slots: Vec<Arc<Slot>> = ids.iter().map(|id| self.slot(id)).collect();
            let mut guards: Vec<MutexGuard<'_, Option<Loaded>>> =
                slots.iter().map(|slot| lock(&slot.loaded)).collect();
            let members: BTreeSet<DocId> = ids
                .iter()
                .zip(&guards)
                .filter(|(_, guard)| guard.as_ref().is_some_and(|l| l.unsaved && l.grouped))
                .map(|(id, _)| id.clone())
                .collect();
            {
                let mut shared = lock(&self.shared.unsaved_groups);
                shared.retain(|g| *g != group);
                if !members.is_empty() {
                    shared.push(members.clone());
                }
            }
            let items: Vec<Persist<'_, '_>> = ids
                .iter()
                .zip(guards.iter_mut())
                .filter(|(id, _)| members.contains(*id))
                .map(|(id, guard)| Persist {
                    id,
                    guard,
                    parts: Vec::new(),
                    extra: Vec::new(),
                })
                .collect();
            if items.is_empty() {
                continue;
            }
            match self.persist_many(items) {
                Ok(_) => written += 1,
                Err(e) => {
                    tracing::warn!(docs = members.len(), error = %e, "unsaved changes of a transaction still not written")
                }
            }
        }
        written
    }

    /// Drops a document's loaded state. If it held unsaved changes, they may
    /// already be at peers: the replica moves to a fresh actor, so the
    /// reloaded document never reuses their sequence numbers.
    fn drop_loaded(&self, id: &DocId, guard: &mut MutexGuard<'_, Option<Loaded>>) {
        if guard.take().is_some_and(|loaded| loaded.unsaved) {
            let fresh = self
                .shared
                .options
                .actors
                .new_actor(&self.shared.options.site);
            tracing::warn!(doc = %id, actor = %fresh, "dropped a document with unsaved changes; writing with a fresh actor");
            *lock(&self.shared.actor) = fresh;
        }
    }

    /// Records changes in the index and tells subscribers, all under the
    /// index lock, so no other change is published among them: the changes
    /// of one transaction reach every subscriber consecutively.
    fn publish_all(&self, events: Vec<Committed>) {
        if events.is_empty() {
            return;
        }
        let mut state = lock(&self.shared.state);
        for committed in events {
            state.update += 1;
            let update = state.update;
            state.recent.push_back((update, committed.doc.clone()));
            if state.recent.len() > RECENT_UPDATES_MAX {
                state.recent.pop_front();
            }
            state
                .index
                .insert(committed.doc.clone(), committed.heads.clone());
            let _ = self.shared.events.send(committed);
        }
        drop(state);
        self.shared.published.notify_all();
    }

    /// The heads of a recent state of the document whose item hash (see
    /// [`crate::protocol::reconcile::item_hash`]) starts with `short`: its
    /// current heads, or the heads before each of its last 16 changes as
    /// long as its history is one line. Lets a side that learns a peer's
    /// state from reconciliation send what the peer lacks without first
    /// asking for its heads.
    pub fn heads_of_state(&self, id: &DocId, short: &ShortHash) -> Option<Vec<ChangeHash>> {
        const STATES_MAX: usize = 16;
        let found = self.with_doc(id, |doc| {
            let mut heads = doc.get_heads();
            for _ in 0..STATES_MAX {
                let raw: Vec<[u8; 32]> = heads.iter().map(|h| h.0).collect();
                if short_hash(&item_hash(id, &raw)) == *short {
                    return Some(heads);
                }
                let [only] = heads.as_slice() else {
                    return None;
                };
                heads = doc.get_change_by_hash(only)?.deps().to_vec();
                if heads.is_empty() {
                    return None;
                }
            }
            None
        });
        found.ok().flatten().flatten()
    }

    /// Records that the session with `peer` has nothing in flight: the
    /// peer holds, as far as this side can tell, every update made so far.
    /// [`Replica::changed_since_synced`] then names what changes after.
    pub fn mark_synced(&self, peer: &SiteName) {
        let mut state = lock(&self.shared.state);
        let update = state.update;
        state.synced.insert(peer.clone(), update);
    }

    /// The documents updated here since the session with `peer` last had
    /// nothing in flight, in no particular order: a guess at what differs,
    /// used to start reconciliation with them listed. `None` when there is
    /// no such mark (no session since this replica opened), when the
    /// updates since go back further than this replica remembers, or when
    /// they name more than 1,024 documents.
    pub fn changed_since_synced(&self, peer: &SiteName) -> Option<Vec<DocId>> {
        let state = lock(&self.shared.state);
        let since = *state.synced.get(peer)?;
        if since == state.update {
            return Some(Vec::new());
        }
        let oldest = state.recent.front()?.0;
        if oldest > since + 1 {
            return None;
        }
        let mut docs: Vec<DocId> = state
            .recent
            .iter()
            .filter(|(update, _)| *update > since)
            .map(|(_, doc)| doc.clone())
            .collect();
        docs.sort_unstable();
        docs.dedup();
        (docs.len() <= CHANGED_SINCE_SYNCED_MAX).then_some(docs)
    }

    /// Drops the loaded state of documents unused for longer than
    /// [`ReplicaOptions::cache_idle`] (documents in use stay); returns how
    /// many were dropped. Idle documents cost their stored bytes only.
    ///
    /// Documents a failed write left unsaved are written first (and stay
    /// loaded while the store still fails).
    pub fn evict_idle(&self) -> usize {
        if let Err(e) = self.apply_ready() {
            tracing::warn!(error = %e, "completed transactions could not be applied");
        }
        self.expire_held();
        self.save_unsaved_groups();
        let idle = self.shared.options.cache_idle;
        let now = std::time::Instant::now();
        let unsaved: Vec<(DocId, Arc<Slot>)> = {
            let state = lock(&self.shared.state);
            state
                .slots
                .iter()
                .filter(|(_, (slot, _))| slot.holds_unsaved())
                .map(|(doc, (slot, _))| (doc.clone(), slot.clone()))
                .collect()
        };
        for (doc, slot) in unsaved {
            let mut guard = lock(&slot.loaded);
            if let Err(e) = self.save_unsaved(&doc, &mut guard) {
                tracing::warn!(%doc, error = %e, "unsaved changes still not written");
            }
        }
        let mut state = lock(&self.shared.state);
        let state = &mut *state;
        let mut evict = Vec::new();
        for (&t, (doc, used)) in state.lru.iter() {
            if now.saturating_duration_since(*used) < idle {
                break;
            }
            if state.slots[doc].0.evictable() {
                evict.push((t, doc.clone()));
            }
        }
        for (t, doc) in &evict {
            state.lru.remove(t);
            state.slots.remove(doc);
        }
        evict.len()
    }

    /// The slot of a document, created if needed, marked as just used;
    /// evicts the least recently used idle slots beyond the cache bound.
    fn slot(&self, id: &DocId) -> Arc<Slot> {
        let mut state = lock(&self.shared.state);
        let state = &mut *state;
        state.tick += 1;
        let tick = state.tick;
        let slot = match state.slots.get_mut(id) {
            Some((slot, last)) => {
                state.lru.remove(last);
                *last = tick;
                slot.clone()
            }
            None => {
                let slot = Arc::new(Slot::default());
                state.slots.insert(id.clone(), (slot.clone(), tick));
                slot
            }
        };
        state
            .lru
            .insert(tick, (id.clone(), std::time::Instant::now()));
        let max = self.shared.options.cache_docs_max.max(1);
        if state.slots.len() > max {
            // Only slots nobody holds may go: a held slot may be mid-commit,
            // and a second slot for the same document would fork its state.
            let mut evict = Vec::new();
            for (&t, (doc, _)) in state.lru.iter() {
                if state.slots.len() - evict.len() <= max {
                    break;
                }
                if state.slots[doc].0.evictable() {
                    evict.push((t, doc.clone()));
                }
            }
            for (t, doc) in evict {
                state.lru.remove(&t);
                state.slots.remove(&doc);
            }
        }
        slot
    }

    fn ensure_loaded<'g>(
        &self,
        id: &DocId,
        guard: &'g mut Option<Loaded>,
    ) -> Result<&'g mut Loaded, Error> {
        if guard.is_none() {
            let stored = self
                .shared
                .store
                .load(id)?
                .ok_or_else(|| Error::NotFound(id.clone()))?;
            *guard = Some(self.decode(id, &stored)?);
        }
        Ok(guard.as_mut().expect("loaded just above"))
    }

    fn ensure_loaded_or_new<'g>(
        &self,
        id: &DocId,
        guard: &'g mut Option<Loaded>,
    ) -> Result<&'g mut Loaded, Error> {
        if guard.is_none() {
            *guard = Some(match self.shared.store.load(id)? {
                Some(stored) => self.decode(id, &stored)?,
                None => Loaded {
                    doc: Automerge::new().with_actor(self.actor()),
                    appended_changes: 0,
                    appended_bytes: 0,
                    snapshot_bytes: 0,
                    unsaved: false,
                    grouped: false,
                    escrow_known: None,
                },
            });
        }
        Ok(guard.as_mut().expect("loaded just above"))
    }

    fn decode(&self, id: &DocId, stored: &StoredDoc) -> Result<Loaded, Error> {
        let mut doc = load_document(stored).map_err(|reason| Error::CorruptDocument {
            doc: id.clone(),
            reason,
        })?;
        doc.set_actor(self.actor());
        Ok(Loaded {
            doc,
            appended_changes: stored.changes.len(),
            appended_bytes: stored.changes.iter().map(Vec::len).sum(),
            snapshot_bytes: stored.snapshot.as_ref().map_or(0, Vec::len),
            unsaved: false,
            grouped: false,
            escrow_known: None,
        })
    }
}

/// The encoded bytes of a change just committed to `doc`.
fn committed_bytes(doc: &Automerge, hash: &ChangeHash) -> Vec<u8> {
    doc.get_change_by_hash(hash)
        .expect("a change just committed is in the document")
        .raw_bytes()
        .to_vec()
}

/// The objects (other than the root) each change of a batch writes into.
type WrittenObjects = HashMap<ChangeHash, Vec<String>>;

/// Every object `changes` write into, sorted, from what `objects_of` says
/// of each; `None` if it says nothing of one (the conflict layer then
/// decodes the changes itself).
pub(super) fn written_by(
    changes: &[Change],
    mut objects_of: impl FnMut(&ChangeHash) -> Option<Vec<String>>,
) -> Option<Vec<String>> {
    let mut written = Vec::new();
    for change in changes {
        written.extend(objects_of(&change.hash())?);
    }
    written.sort_unstable();
    written.dedup();
    Some(written)
}

/// Decodes and checks a batch of changes received for `id`, with the
/// objects each writes into.
fn decode_batch(id: &DocId, changes: &[Vec<u8>]) -> Result<(Vec<Change>, WrittenObjects), Error> {
    let mut objects: HashMap<ChangeHash, Vec<String>> = HashMap::new();
    let decoded = changes
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let (change, written) =
                decode_change_with_objects(bytes).map_err(|reason| Error::BadChange {
                    doc: id.clone(),
                    index: i,
                    reason,
                })?;
            objects.insert(change.hash(), written);
            Ok(change)
        })
        .collect::<Result<Vec<Change>, Error>>()?;
    Ok((decoded, objects))
}

/// Builds a document from stored bytes. automerge's decoder can panic on
/// malformed input; the panic is contained and reported as an error.
pub fn load_document(stored: &StoredDoc) -> Result<Automerge, String> {
    let result = std::panic::catch_unwind(|| {
        let mut doc = match &stored.snapshot {
            Some(snapshot) => Automerge::load(snapshot).map_err(|e| e.to_string())?,
            None => Automerge::new(),
        };
        if !stored.changes.is_empty() {
            let joined: Vec<u8> = stored.changes.concat();
            doc.load_incremental(&joined).map_err(|e| e.to_string())?;
        }
        let missing = doc.get_missing_deps(&[]);
        if !missing.is_empty() {
            return Err(format!(
                "{} changes have missing dependencies",
                missing.len()
            ));
        }
        Ok(doc)
    });
    result.unwrap_or_else(|_| Err("automerge panicked decoding the stored bytes".to_owned()))
}

/// Decodes one change received from elsewhere and checks it is well formed.
///
/// automerge's decoder does not verify a change's checksum and accepts
/// changes whose columns are inconsistent (applying those can corrupt the
/// document's op order). So besides containing decoder panics, this checks
/// the header checksum against the change's hash, and that decoding and
/// re-encoding the change gives back the same hash: a change automerge
/// itself wrote always does.
pub fn decode_change(bytes: &[u8]) -> Result<Change, String> {
    decode_change_with_objects(bytes).map(|(change, _)| change)
}

/// [`decode_change`], also returning the objects (other than the root) the
/// change's ops write into, which the conflict layer needs and would
/// otherwise decode the change again to learn.
fn decode_change_with_objects(bytes: &[u8]) -> Result<(Change, Vec<String>), String> {
    let checked = std::panic::catch_unwind(|| {
        let change = Change::try_from(bytes).map_err(|e| e.to_string())?;
        let hash = change.hash();
        if bytes.get(4..8) != Some(&hash.0[..4]) {
            return Err("checksum does not match the change's contents".to_owned());
        }
        let expanded = change.decode();
        let objects: HashSet<&automerge::legacy::ObjectId> = expanded
            .operations
            .iter()
            .map(|op| &op.obj)
            .filter(|obj| **obj != automerge::legacy::ObjectId::Root)
            .collect();
        let objects: Vec<String> = objects.into_iter().map(ToString::to_string).collect();
        let canonical = Change::from(expanded);
        if canonical.hash() != hash {
            return Err("change is not in canonical form".to_owned());
        }
        Ok((change, objects))
    });
    checked.unwrap_or_else(|_| Err("automerge panicked decoding the change".to_owned()))
}

/// The hashes among `hashes` that the document does not hold. Cheap: it
/// consults the change graph, where `get_change_by_hash` rebuilds the change.
pub(crate) fn unknown_hashes(doc: &Automerge, hashes: &[ChangeHash]) -> Vec<ChangeHash> {
    // Loaded documents never keep queued changes (see `order_new_changes`
    // and `load_document`), so every missing dependency is one of `hashes`.
    let mut missing = doc.get_missing_deps(hashes);
    missing.retain(|h| hashes.contains(h));
    missing
}

/// Splits received changes into those to apply (new, dependencies met, in
/// causal order), a count of duplicates, and those with unmet dependencies.
/// Linear in the batch: one batched lookup against the document, then a
/// topological sort.
fn order_new_changes(
    doc: &Automerge,
    changes: Vec<Change>,
) -> (Vec<Change>, usize, Vec<ChangeHash>) {
    let incoming: Vec<ChangeHash> = changes.iter().map(Change::hash).collect();
    let absent: HashSet<ChangeHash> = unknown_hashes(doc, &incoming).into_iter().collect();
    let mut pending: HashMap<ChangeHash, Change> = HashMap::with_capacity(changes.len());
    let mut duplicates = 0;
    for change in changes {
        let hash = change.hash();
        if !absent.contains(&hash) || pending.contains_key(&hash) {
            duplicates += 1;
        } else {
            pending.insert(hash, change);
        }
    }
    // Dependencies outside the batch must be in the document.
    let outside: Vec<ChangeHash> = pending
        .values()
        .flat_map(|c| c.deps().iter().copied())
        .filter(|d| !pending.contains_key(d))
        .collect();
    let missing_outside: HashSet<ChangeHash> = unknown_hashes(doc, &outside).into_iter().collect();
    let mut unmet: HashMap<ChangeHash, usize> = HashMap::with_capacity(pending.len());
    let mut dependents: HashMap<ChangeHash, Vec<ChangeHash>> = HashMap::new();
    let mut ready_queue: Vec<ChangeHash> = Vec::new();
    let mut blocked = HashSet::new();
    for (hash, change) in &pending {
        let mut count = 0;
        for dep in change.deps() {
            if pending.contains_key(dep) {
                count += 1;
                dependents.entry(*dep).or_default().push(*hash);
            } else if missing_outside.contains(dep) {
                blocked.insert(*hash);
            }
        }
        unmet.insert(*hash, count);
        if count == 0 && !blocked.contains(hash) {
            ready_queue.push(*hash);
        }
    }
    // Deterministic order among changes ready at the same time.
    ready_queue.sort_unstable();
    let mut ready = Vec::with_capacity(pending.len());
    while let Some(hash) = ready_queue.pop() {
        let change = pending.remove(&hash).expect("each change is released once");
        ready.push(change);
        if let Some(next) = dependents.get(&hash) {
            for dependent in next {
                let count = unmet.get_mut(dependent).expect("counted above");
                *count -= 1;
                if *count == 0 && !blocked.contains(dependent) {
                    ready_queue.push(*dependent);
                }
            }
        }
    }
    let mut missing: Vec<ChangeHash> = pending.into_keys().collect();
    missing.sort_unstable();
    (ready, duplicates, missing)
}
