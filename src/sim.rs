//! A seeded, deterministic simulation of several sites replicating through
//! sync sessions over a faulty in-memory network (feature `sim`).
//!
//! Each site is a [`Replica`] over a [`Memory`] store; each pair of sites is
//! linked by two [`Session`]s exchanging frames through per-lane queues (a
//! lane is ordered, like a QUIC stream). Seeded actions edit documents in
//! many ways (often the same fields at several sites), deliver, duplicate
//! and reorder frames, reset connections, partition and heal sites, and
//! crash and restart them (losing everything in memory; commits were durable
//! when acknowledged), make their stores fail for a while (writes are
//! pipelined, so a change whose write failed may already be at peers), and
//! back up a site's store and restore it at a later restart (the site
//! loses what it wrote since, and holds automatic resolutions as a restore
//! does). After the final heal the network runs fault-free until quiet,
//! held resolutions are released, and every site must hold the same
//! documents (equal sorted heads and equal JSON values) and the same
//! conflict reports, none of them resolved automatically twice.
//!
//! Part of the workload is transactions of 2 to 5 documents, some with
//! preconditions (`if_heads` as read, or stale, `if_absent`). After every
//! delivery the run checks the receiving site, and after every step every
//! site, that no committed transaction is partly visible: each site holds
//! all of its member changes or none.
//!
//! Part of it is sagas of 2 to 4 steps at random sites, some steps failing
//! by a precondition or for want of rights of a bounded counter. Each step
//! counts its action and its compensation in the saga's `effects/` document
//! (created with the saga, in one transaction); after the final heal every
//! saga must be done or compensated in reverse order at every site, and
//! every action and compensation counted at most once, exactly once for
//! those recorded as done.
//!
//! The same seed always replays the same run, down to the change hashes:
//! actor ids are drawn from the seed and change times from the simulated
//! clock ([`SimWorld`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::broadcast;

use crate::conflict::{Check, Conflict, ConflictConfig, Filter, Policy, Rule, Status};
use crate::doc::Op;
use crate::escrow::{EscrowConfig, GrantPolicy, PoolKind};
use crate::id::{actor_of_site, DocId, SiteName, ACTOR_RANDOM_BYTES};
use crate::protocol::session::{Lane, Session, SessionConfig};
use crate::replica::{ActorSource, Clock, Committed, Replica, ReplicaOptions, RightsWanted};
use crate::store::{Faulty, Memory, Store as _, Write, RESOLUTIONS_HELD_KEY};
use crate::txn::{Precondition, Txn, TxnDoc, TxnId};
use crate::ChangeHash;

/// The simulation's clock and actor ids, shared by every replica of a run,
/// so that a seed decides every byte the replicas write.
#[derive(Debug)]
pub struct SimWorld {
    seed: u64,
    /// Milliseconds since the Unix epoch, moved only by the simulation.
    now_ms: AtomicI64,
    /// Actor ids handed out so far.
    actors: AtomicU64,
}

/// Where the simulated clock starts: 2026-01-01T00:00:00Z.
const SIM_EPOCH_MS: i64 = 1_767_225_600_000;

impl SimWorld {
    /// A world for `seed`, its clock at [`SIM_EPOCH_MS`].
    pub fn new(seed: u64) -> Arc<SimWorld> {
        Arc::new(SimWorld {
            seed,
            now_ms: AtomicI64::new(SIM_EPOCH_MS),
            actors: AtomicU64::new(0),
        })
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.now_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Replica options for `site` that take time and actor ids from this
    /// world.
    pub fn options(self: &Arc<Self>, site: SiteName) -> ReplicaOptions {
        let mut options = ReplicaOptions::new(site);
        options.clock = self.clone();
        options.actors = self.clone();
        options
    }
}

impl Clock for SimWorld {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::Relaxed)
    }
}

impl ActorSource for SimWorld {
    /// The seed and a counter: unique within a run, the same in its replay.
    fn new_actor(&self, site: &SiteName) -> automerge::ActorId {
        let n = self.actors.fetch_add(1, Ordering::Relaxed);
        let mut unique = [0u8; ACTOR_RANDOM_BYTES];
        unique[..8].copy_from_slice(&self.seed.to_be_bytes());
        unique[8..].copy_from_slice(&n.to_be_bytes());
        actor_of_site(site, unique)
    }
}

/// A small, stable pseudo-random generator (SplitMix64): the same seed gives
/// the same sequence on every platform and every version of this crate's
/// dependencies. A fuzzer can steer it with a tape of bytes, consumed before
/// the seeded sequence takes over.
#[derive(Debug, Clone)]
pub struct SimRng {
    state: u64,
    tape: Vec<u8>,
    position: usize,
}

impl SimRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> SimRng {
        SimRng {
            state: seed ^ 0x5851_f42d_4c95_7f2d,
            tape: Vec::new(),
            position: 0,
        }
    }

    /// A generator that draws from `tape` first (8 bytes a draw).
    pub fn from_tape(tape: &[u8]) -> SimRng {
        let mut rng = SimRng::new(tape.len() as u64);
        rng.tape = tape.to_vec();
        rng
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        if let Some(chunk) = self.tape.get(self.position..self.position + 8) {
            self.position += 8;
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            return u64::from_le_bytes(bytes);
        }
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// Settings of one simulation run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of sites.
    pub sites: usize,
    /// Number of distinct documents edited.
    pub docs: usize,
    /// Seeded actions before the final heal.
    pub steps: usize,
    /// Inject faults (duplication, reordering, resets, partitions, crashes).
    pub faults: bool,
    /// Deliveries allowed in the final fault-free phase before giving up.
    pub settle_deliveries_max: usize,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            sites: 5,
            docs: 8,
            steps: 400,
            faults: true,
            settle_deliveries_max: 200_000,
        }
    }
}

struct SimSite {
    name: SiteName,
    store: Arc<Faulty<Memory>>,
    /// Its store refuses every write until this step.
    store_failing_until: Option<usize>,
    replica: Option<Replica>,
    events: Option<broadcast::Receiver<Committed>>,
    /// Its requests for rights of bounded counters, for its sessions.
    wanted: Option<broadcast::Receiver<RightsWanted>>,
    /// A copy of its store taken at this step, to restore on a restart.
    backup: Option<(usize, Memory)>,
}

/// A connection between sites `low` and `high` (`low < high`).
struct Link {
    low_session: Session,
    high_session: Session,
    /// Frames in flight towards each end, per lane.
    to_low: BTreeMap<Lane, VecDeque<Vec<u8>>>,
    to_high: BTreeMap<Lane, VecDeque<Vec<u8>>>,
}

/// What a finished run observed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    /// Edits that committed.
    pub edits: usize,
    /// Frames delivered.
    pub deliveries: usize,
    /// Connections reset by faults or protocol errors.
    pub resets: usize,
    /// Crashes.
    pub crashes: usize,
    /// Spells of a site's store refusing writes.
    pub store_faults: usize,
    /// Sites restored from an earlier copy of their store.
    pub restores: usize,
    /// Edits whose store write failed (published, so maybe replicated,
    /// but not acknowledged).
    pub failed_writes: usize,
    /// Documents at every site at the end.
    pub docs: usize,
    /// Conflict reports at every site at the end.
    pub conflicts: usize,
    /// Of those, resolved or dismissed.
    pub conflicts_closed: usize,
    /// Digest of every document's heads at the end (the same at every
    /// site): a replay of the seed writes the very same changes.
    pub heads_digest: String,
    /// Transactions that committed.
    pub txns: usize,
    /// Transactions refused (a precondition or an op failed).
    pub txns_refused: usize,
    /// Checks that no transaction was partly visible at a site.
    pub txn_checks: usize,
    /// Ops on bounded counters that committed.
    pub escrow_ops: usize,
    /// Of those tried, refused for want of rights.
    pub escrow_refused: usize,
    /// Invariant checks of bounded counters.
    pub escrow_checks: usize,
    /// Sagas started.
    pub sagas: usize,
    /// Of those, done at the end (the rest compensated, or failed in a
    /// compensation).
    pub sagas_done: usize,
    /// Steps and compensations that took effect, counted in the documents.
    pub saga_effects: usize,
}

/// A committed transaction: its member changes.
struct SimTxn {
    id: TxnId,
    members: Vec<(DocId, ChangeHash)>,
}

/// What one site was last seen to hold of the transactions.
#[derive(Default)]
struct TxnView {
    /// Transactions seen whole at the site.
    whole: BTreeSet<usize>,
    /// Per (transaction, member): the document's heads when last looked
    /// at, and whether it held the member then.
    looked: HashMap<(usize, usize), (Vec<ChangeHash>, bool)>,
}

/// A simulation run.
pub struct Sim {
    seed: u64,
    world: Arc<SimWorld>,
    config: SimConfig,
    rng: SimRng,
    sites: Vec<SimSite>,
    links: BTreeMap<(usize, usize), Link>,
    partitioned: BTreeSet<usize>,
    start: Instant,
    elapsed: Duration,
    report: SimReport,
    trace: VecDeque<String>,
    /// Steps taken so far.
    steps: usize,
    /// Transactions committed so far.
    txns: Vec<SimTxn>,
    /// Per site, what it was seen to hold of them.
    txn_views: Vec<TxnView>,
    /// The first transaction seen partly visible.
    violation: Option<String>,
    /// Per site and document, the heads last checked for escrow invariants.
    escrow_seen: HashMap<(usize, DocId), Vec<ChangeHash>>,
    /// The sagas started.
    sagas: Vec<String>,
}

const TRACE_LINES_MAX: usize = 60;

/// Rounds of running every site's due saga steps after the final heal.
const SAGA_ROUNDS_MAX: usize = 100;

/// Sites whose bounded counters carry a floor rule (more sites work; their
/// counters are just not watched by the conflict layer).
const SITES_MAX: usize = 8;

impl Sim {
    /// A run of `config` driven by `seed`.
    pub fn new(seed: u64, config: SimConfig) -> Sim {
        Sim::with_rng(seed, SimRng::new(seed), config)
    }

    /// A run whose actions are steered by `tape` (for fuzzing).
    pub fn from_tape(tape: &[u8], config: SimConfig) -> Sim {
        Sim::with_rng(tape.len() as u64, SimRng::from_tape(tape), config)
    }

    fn with_rng(seed: u64, rng: SimRng, config: SimConfig) -> Sim {
        let sites = (0..config.sites)
            .map(|i| {
                let name = SiteName::new(&format!("site-{i}")).expect("valid site name");
                let store = Arc::new(Faulty::new(Memory::new()));
                SimSite {
                    name,
                    store,
                    store_failing_until: None,
                    replica: None,
                    events: None,
                    wanted: None,
                    backup: None,
                }
            })
            .collect();
        let mut sim = Sim {
            seed,
            world: SimWorld::new(seed),
            rng,
            config,
            sites,
            links: BTreeMap::new(),
            partitioned: BTreeSet::new(),
            start: Instant::now(),
            elapsed: Duration::ZERO,
            report: SimReport::default(),
            trace: VecDeque::new(),
            steps: 0,
            txns: Vec::new(),
            txn_views: Vec::new(),
            violation: None,
            escrow_seen: HashMap::new(),
            sagas: Vec::new(),
        };
        sim.txn_views = (0..sim.sites.len()).map(|_| TxnView::default()).collect();
        for i in 0..sim.sites.len() {
            sim.restart(i);
        }
        sim
    }

    /// Runs the seeded actions, heals everything, settles, and checks
    /// convergence. The error names the seed and the last actions.
    pub fn run(mut self) -> Result<SimReport, String> {
        for _ in 0..self.config.steps {
            self.step();
            self.check_txns(None);
            self.check_escrow(None);
            self.check_violation()?;
        }
        self.heal_all();
        self.settle()?;
        self.check_violation()?;
        if self.release_resolutions()? {
            self.settle()?;
            self.check_violation()?;
        }
        // Steps left due by a failed write run now (a node retries them
        // every few seconds).
        for _ in 0..SAGA_ROUNDS_MAX {
            if !self.run_all_sagas() {
                break;
            }
            self.settle()?;
            self.check_violation()?;
        }
        self.check_converged()?;
        self.check_sagas()?;
        self.check_stored()?;
        Ok(self.report)
    }

    fn now(&self) -> Instant {
        self.start + self.elapsed
    }

    fn note(&mut self, line: String) {
        if self.trace.len() == TRACE_LINES_MAX {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn failure(&self, what: String) -> String {
        let trace: Vec<&str> = self.trace.iter().map(String::as_str).collect();
        format!(
            "simulation seed {} failed: {what}\nreplay: SIM_SEEDS={}..{} cargo test --release --test simulation\nlast actions:\n  {}",
            self.seed,
            self.seed,
            self.seed + 1,
            trace.join("\n  ")
        )
    }

    fn step(&mut self) {
        self.steps += 1;
        for site in 0..self.sites.len() {
            if self.sites[site]
                .store_failing_until
                .is_some_and(|until| until <= self.steps)
            {
                self.note(format!("store of site {site} recovers"));
                self.set_store_failing(site, None);
            }
        }
        let faults = self.config.faults;
        let roll = self.rng.below(100);
        match roll {
            0..=34 => self.edit(),
            35..=84 => {
                for _ in 0..1 + self.rng.below(4) {
                    self.deliver_random(faults);
                }
            }
            85..=89 => {
                let by = Duration::from_millis(1 + self.rng.below(500) as u64);
                self.elapsed += by;
                self.world.advance(by);
            }
            90..=92 if faults => {
                let keys: Vec<(usize, usize)> = self.links.keys().copied().collect();
                if !keys.is_empty() {
                    let key = keys[self.rng.below(keys.len())];
                    self.note(format!("reset link {key:?}"));
                    self.drop_link(key);
                }
            }
            93..=95 if faults => {
                let site = self.rng.below(self.sites.len());
                if self.partitioned.contains(&site) {
                    self.note(format!("heal site {site}"));
                    self.partitioned.remove(&site);
                } else {
                    self.note(format!("partition site {site}"));
                    self.partitioned.insert(site);
                    self.cut_links(site);
                }
            }
            96..=97 if faults => {
                let site = self.rng.below(self.sites.len());
                if self.sites[site].replica.is_some() {
                    self.note(format!("crash site {site}"));
                    self.crash(site);
                } else {
                    if self.sites[site].backup.is_some() && self.rng.chance(30) {
                        self.restore_backup(site);
                    }
                    self.note(format!("restart site {site}"));
                    self.restart(site);
                }
            }
            99 if faults => {
                let site = self.rng.below(self.sites.len());
                self.note(format!("back up site {site}"));
                let copy = self.sites[site].store.inner().snapshot();
                self.sites[site].backup = Some((self.steps, copy));
            }
            98 if faults => {
                let site = self.rng.below(self.sites.len());
                let steps = 1 + self.rng.below(20);
                self.note(format!("store of site {site} fails for {steps} steps"));
                self.report.store_faults += 1;
                self.set_store_failing(site, Some(self.steps + steps));
            }
            _ => self.edit(),
        }
        self.pump();
    }

    fn set_store_failing(&mut self, site: usize, until: Option<usize>) {
        self.sites[site].store_failing_until = until;
        self.sites[site].store.set_fail_commits(until.is_some());
    }

    fn heal_all(&mut self) {
        self.note("heal all".into());
        self.partitioned.clear();
        for i in 0..self.sites.len() {
            self.set_store_failing(i, None);
            if self.sites[i].replica.is_none() {
                self.restart(i);
            }
        }
        self.pump();
    }

    /// Puts a stopped site's backup in place of its store, holding its
    /// automatic resolutions as a restore does, and keeps the backup for
    /// another time.
    fn restore_backup(&mut self, site: usize) {
        let Some((step, backup)) = &self.sites[site].backup else {
            return;
        };
        let step = *step;
        let store = self.sites[site].store.inner();
        store.restore_from(backup);
        store
            .commit(vec![Write::PutMeta {
                key: RESOLUTIONS_HELD_KEY.to_owned(),
                value: vec![1],
            }])
            .expect("memory stores always commit");
        self.report.restores += 1;
        self.note(format!(
            "restore site {site} from its backup of step {step}"
        ));
    }

    /// Once every site caught up: ends the hold on automatic resolutions
    /// where a restore set it, as the operator does after `sync-node
    /// check`.
    fn release_resolutions(&mut self) -> Result<bool, String> {
        let mut resolved = 0;
        for site in 0..self.sites.len() {
            let Some(replica) = self.sites[site].replica.clone() else {
                continue;
            };
            if replica.resolutions_held() {
                self.note(format!("release resolutions at site {site}"));
                resolved += replica.release_resolutions().map_err(|e| {
                    self.failure(format!("site {site} cannot release its resolutions: {e}"))
                })?;
            }
        }
        Ok(resolved > 0)
    }

    fn crash(&mut self, site: usize) {
        self.report.crashes += 1;
        let site_state = &mut self.sites[site];
        site_state.replica = None;
        site_state.events = None;
        site_state.wanted = None;
        self.cut_links(site);
    }

    /// Drops every connection of `site`, with whatever was in flight.
    fn cut_links(&mut self, site: usize) {
        let cut: Vec<(usize, usize)> = self
            .links
            .keys()
            .filter(|(a, b)| *a == site || *b == site)
            .copied()
            .collect();
        for key in cut {
            self.drop_link(key);
        }
    }

    fn restart(&mut self, site: usize) {
        // What the site held in memory is gone; a restore may take back
        // whole transactions: look at it afresh.
        if let Some(view) = self.txn_views.get_mut(site) {
            *view = TxnView::default();
        }
        let options = self.site_options(site);
        let state = &mut self.sites[site];
        let replica =
            Replica::open(options, state.store.clone()).expect("memory stores always open");
        // Automatic resolutions interrupted by the crash run now; a node
        // whose store refuses them does not start.
        if let Err(e) = replica.resolve_pending() {
            self.note(format!("site {site} cannot start: {e}"));
            return;
        }
        state.events = Some(replica.subscribe());
        state.wanted = Some(replica.subscribe_rights_wanted());
        state.replica = Some(replica.clone());
        // Steps interrupted by the crash run now (held after a restore).
        for (id, run) in replica.run_sagas() {
            if !run.is_empty() {
                self.note(format!("site {site} resumes saga {id}: {run:?}"));
            }
        }
    }

    fn site_options(&self, site: usize) -> ReplicaOptions {
        let mut options = self.world.options(self.sites[site].name.clone());
        // A tiny cache exercises eviction and reloading.
        options.cache_docs_max = 3;
        options.compact_changes_min = 8;
        options.conflicts = Arc::new(sim_conflict_config());
        // A low-water mark makes sites ask ahead of demand, and grants keep it.
        options.escrow = Arc::new(EscrowConfig {
            rules: Vec::new(),
            default: crate::escrow::Policy {
                low_water: 2,
                rebalance: GrantPolicy::Proportional,
                wait: Duration::ZERO,
            },
        });
        options
    }

    /// Every site's store holds what the site shows, once the writes that
    /// failed are retried (as the node's sweep does): reopened from its
    /// store alone, each site lists the same documents at the same heads.
    fn check_stored(&mut self) -> Result<(), String> {
        for site in 0..self.sites.len() {
            let Some(replica) = self.sites[site].replica.clone() else {
                continue;
            };
            replica.evict_idle();
            let reopened = Replica::open(self.site_options(site), self.sites[site].store.clone())
                .map_err(|e| self.failure(format!("site {site} cannot reopen: {e}")))?;
            if reopened.index() != replica.index() {
                return Err(self.failure(format!(
                    "site {site}'s store lacks what it shows: stored {:?}, shown {:?}",
                    reopened.index(),
                    replica.index()
                )));
            }
        }
        Ok(())
    }

    fn doc_id(&mut self) -> DocId {
        let k = self.rng.below(self.config.docs);
        DocId::new(&format!("ns-{}/doc-{k}", k % 3)).expect("valid id")
    }

    fn edit(&mut self) {
        let site = self.rng.below(self.sites.len());
        let Some(replica) = self.sites[site].replica.clone() else {
            return;
        };
        let doc = self.doc_id();
        let field = self.rng.below(4);
        let value = self.rng.below(1000);
        let ops = match self.rng.below(14) {
            13 => return self.start_saga(site, &replica),
            7 => return self.close_a_conflict(site, &replica),
            8 | 9 => return self.transact(site, &replica),
            10..=12 => return self.escrow_edit(site, &replica, doc),
            0 | 1 => json!([{"op": "set", "path": format!("/f{field}"), "value": value}]),
            2 => json!([{"op": "del", "path": format!("/f{field}")}]),
            3 => json!([{"op": "inc", "path": "/count", "by": value as i64 - 500}]),
            4 => json!([{"op": "set", "path": "/items/-", "value": {"n": value}}]),
            5 => {
                json!([{"op": "splice", "path": "/text", "index": 0, "delete": self.rng.below(2), "text": format!("{value}")}])
            }
            _ => json!([
                {"op": "set", "path": "/count", "value": value, "as": "counter"},
                {"op": "set", "path": "/text", "value": "start", "as": "text"},
                {"op": "set", "path": "/items", "value": []},
            ]),
        };
        let ops: Vec<Op> = serde_json::from_value(ops).expect("ops parse");
        // Ops that do not fit the document's current state are refused;
        // that is part of the workload.
        match replica.apply_ops(&doc, &ops, None) {
            Ok(_) => {
                self.report.edits += 1;
                self.note(format!("edit site {site} {doc} {:?}", ops[0].path()));
            }
            Err(e @ crate::Error::NotDurable { .. }) => {
                self.report.failed_writes += 1;
                self.note(format!("edit site {site} {doc} not written: {e}"));
            }
            Err(_) => {}
        }
    }

    /// An op on the bounded counters `/bounded-site-N`, each created only by
    /// its site (at the root: a counter inside a map two sites create
    /// concurrently would be hidden with the map that loses): create, decrement (asking peers when short), restock,
    /// transfer, or a transaction taking stock and writing an order.
    fn escrow_edit(&mut self, site: usize, replica: &Replica, doc: DocId) {
        let own = format!("/bounded-site-{site}");
        let existing: Vec<String> = replica
            .escrow_list(&doc)
            .map(|list| list.into_iter().map(|(p, _)| p).collect())
            .unwrap_or_default();
        let create = existing.is_empty() || (!existing.contains(&own) && self.rng.chance(30));
        let pointer = if create {
            own
        } else {
            existing[self.rng.below(existing.len())].clone()
        };
        let amount = 1 + self.rng.below(4) as i64;
        let result = match if create { 0 } else { 1 + self.rng.below(6) } {
            0 => {
                let value = 5 + self.rng.below(20) as i64;
                let max = self.rng.chance(50).then_some(value + 10);
                let ops = json!([{"op": "set", "path": pointer, "value": value, "as": "bounded", "min": 0, "max": max}]);
                replica
                    .apply_ops(
                        &doc,
                        &serde_json::from_value::<Vec<Op>>(ops).expect("ops parse"),
                        None,
                    )
                    .map(drop)
            }
            1 | 2 => {
                let ops = json!([{"op": "inc", "path": pointer, "by": -amount}]);
                replica
                    .apply_ops(
                        &doc,
                        &serde_json::from_value::<Vec<Op>>(ops).expect("ops parse"),
                        None,
                    )
                    .map(drop)
            }
            3 => {
                let ops = json!([{"op": "inc", "path": pointer, "by": amount}]);
                replica
                    .apply_ops(
                        &doc,
                        &serde_json::from_value::<Vec<Op>>(ops).expect("ops parse"),
                        None,
                    )
                    .map(drop)
            }
            4 => {
                let to = self.sites[self.rng.below(self.sites.len())].name.clone();
                let pool = if self.rng.chance(20) {
                    PoolKind::Up
                } else {
                    PoolKind::Down
                };
                replica
                    .escrow_transfer(&doc, &pointer, pool, &to, amount, None)
                    .map(drop)
            }
            _ => {
                let order = DocId::new(&format!("ns-{}/order-{}", site % 3, self.rng.below(4)))
                    .expect("valid id");
                if order == doc {
                    return;
                }
                let txn = Txn {
                    docs: vec![
                        TxnDoc {
                            id: doc.clone(),
                            ops: serde_json::from_value(
                                json!([{"op": "inc", "path": pointer, "by": -amount}]),
                            )
                            .expect("ops parse"),
                            precondition: Precondition::none(),
                        },
                        TxnDoc {
                            id: order,
                            ops: serde_json::from_value(
                                json!([{"op": "set", "path": "/qty", "value": amount}]),
                            )
                            .expect("ops parse"),
                            precondition: Precondition::none(),
                        },
                    ],
                    message: Some("sim order".to_owned()),
                };
                match replica.commit_txn(&txn) {
                    Ok(commit) => {
                        self.report.txns += 1;
                        let members: Vec<(DocId, ChangeHash)> = commit
                            .docs
                            .iter()
                            .filter_map(|(id, c)| Some((id.clone(), c.change?)))
                            .collect();
                        self.txns.push(SimTxn {
                            id: commit.txn,
                            members,
                        });
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok(()) => {
                self.report.edits += 1;
                self.report.escrow_ops += 1;
                self.note(format!("escrow site {site} {doc} {pointer}"));
            }
            Err(e) => {
                if let Some((pool, missing)) = missing_rights(&e) {
                    self.report.escrow_refused += 1;
                    replica.ask_rights(&doc, &pointer, pool, missing, self.rng.chance(30));
                }
                if matches!(e, crate::Error::NotDurable { .. }) {
                    self.report.failed_writes += 1;
                }
                self.note(format!("escrow site {site} {doc} {pointer} refused: {e}"));
            }
        }
        self.check_escrow(Some(site));
    }

    /// Every bounded counter at `site` (every site when `None`) keeps its
    /// invariants: value within bounds, no negative rights, rights adding
    /// up. Records the first broken one.
    fn check_escrow(&mut self, sites: Option<usize>) {
        if self.violation.is_some() {
            return;
        }
        let range = match sites {
            Some(site) => site..site + 1,
            None => 0..self.sites.len(),
        };
        for site in range {
            let Some(replica) = self.sites[site].replica.clone() else {
                continue;
            };
            for k in 0..self.config.docs {
                let id = DocId::new(&format!("ns-{}/doc-{k}", k % 3)).expect("valid id");
                // Only a document that changed can break an invariant.
                let heads = replica.heads(&id).unwrap_or_default();
                if self.escrow_seen.get(&(site, id.clone())) == Some(&heads) {
                    continue;
                }
                self.escrow_seen.insert((site, id.clone()), heads);
                self.report.escrow_checks += 1;
                match replica.with_doc(&id, crate::escrow::check) {
                    Ok(Some(Err(violation))) => {
                        self.violation =
                            Some(format!("site {site}: bounded counter of {id}: {violation}"));
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.violation = Some(format!("site {site} cannot read {id}: {e}"));
                        return;
                    }
                }
            }
        }
    }

    /// Commits a transaction over 2 to 5 documents at `site`, each with a
    /// precondition now and then: the heads just read (holds), the empty
    /// heads or `if_absent` (holds only for a new document).
    fn transact(&mut self, site: usize, replica: &Replica) {
        let size = 2 + self.rng.below(4);
        let mut ids: Vec<DocId> = Vec::new();
        for _ in 0..size * 3 {
            let id = self.doc_id();
            if !ids.contains(&id) {
                ids.push(id);
            }
            if ids.len() == size {
                break;
            }
        }
        if ids.len() < 2 {
            return;
        }
        let mut docs = Vec::new();
        for id in ids {
            let value = self.rng.below(1000);
            let ops = match self.rng.below(3) {
                0 => json!([{"op": "inc", "path": "/count", "by": value as i64 - 500}]),
                _ => {
                    json!([{"op": "set", "path": format!("/t{}", self.rng.below(3)), "value": value}])
                }
            };
            let precondition = match self.rng.below(10) {
                0..=2 => Precondition::if_heads(replica.heads(&id).unwrap_or_default()),
                3 => Precondition::if_heads(Vec::new()),
                4 => Precondition {
                    if_absent: true,
                    ..Precondition::default()
                },
                _ => Precondition::none(),
            };
            docs.push(TxnDoc {
                id,
                ops: serde_json::from_value(ops).expect("ops parse"),
                precondition,
            });
        }
        let txn = Txn {
            docs,
            message: Some("sim txn".to_owned()),
        };
        match replica.commit_txn(&txn) {
            Ok(commit) => {
                self.report.edits += 1;
                self.report.txns += 1;
                let members: Vec<(DocId, ChangeHash)> = commit
                    .docs
                    .iter()
                    .filter_map(|(id, c)| Some((id.clone(), c.change?)))
                    .collect();
                self.note(format!(
                    "txn site {site} {} over {:?}",
                    commit.txn,
                    members.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>()
                ));
                self.txns.push(SimTxn {
                    id: commit.txn,
                    members,
                });
            }
            Err(e @ crate::Error::NotDurable { .. }) => {
                // It took effect here and may reach peers: it must stay
                // whole as much as one that was written. Its changes are
                // the newest of each member.
                self.report.failed_writes += 1;
                let members: Vec<(DocId, ChangeHash)> = txn
                    .docs
                    .iter()
                    .filter_map(|d| {
                        let last = replica.history(&d.id).ok()??.pop()?;
                        Some((d.id.clone(), last.hash, last.txn?))
                    })
                    .map(|(doc, hash, _)| (doc, hash))
                    .collect();
                let id = txn
                    .docs
                    .first()
                    .and_then(|d| replica.history(&d.id).ok()??.pop()?.txn);
                self.note(format!("txn site {site} not written: {e}"));
                if let Some(id) = id {
                    self.txns.push(SimTxn { id, members });
                }
            }
            Err(_) => self.report.txns_refused += 1,
        }
    }

    /// Looks at `sites` (every site when `None`): a committed transaction
    /// must be visible whole or not at all. Records the first that is not.
    /// Starts a saga of 2 to 4 steps at random sites, with its effect
    /// counters created in the same transaction. A step sometimes fails:
    /// by a precondition that cannot hold, or by decrementing a bounded
    /// counter its site may lack rights for (or that does not exist).
    fn start_saga(&mut self, site: usize, replica: &Replica) {
        let id = format!("s{}", self.sagas.len());
        let effects = format!("effects/{id}");
        let steps = 2 + self.rng.below(3);
        let mut counters = Vec::new();
        let mut defs = Vec::new();
        for k in 0..steps {
            let at = self.rng.below(self.sites.len());
            let name = format!("step{k}");
            counters.push(json!({"op": "set", "path": format!("/{name}-action"), "value": 0, "as": "counter"}));
            counters.push(json!({"op": "set", "path": format!("/{name}-compensation"), "value": 0, "as": "counter"}));
            let count = |key: &str| json!({"id": effects, "ops": [{"op": "inc", "path": format!("/{name}-{key}"), "by": 1}]});
            let mut action = vec![count("action")];
            let mut compensation = vec![count("compensation")];
            match self.rng.below(10) {
                0 => action.push(json!({"id": format!("ns-0/doc-{}", self.rng.below(self.config.docs)), "if_absent": true})),
                1 | 2 => {
                    let doc = self.doc_id();
                    let amount = 1 + self.rng.below(3);
                    action.push(json!({"id": doc, "ops": [{"op": "inc", "path": format!("/bounded-site-{at}"), "by": -(amount as i64)}]}));
                    compensation.push(json!({"id": doc, "ops": [{"op": "inc", "path": format!("/bounded-site-{at}"), "by": amount}]}));
                }
                _ => {}
            }
            let mut step = json!({"name": name, "site": self.sites[at].name.as_str(), "txn": {"docs": action}});
            if self.rng.chance(80) {
                step["compensate"] = json!({"docs": compensation});
            }
            defs.push(step);
        }
        let def: crate::saga::SagaDef =
            serde_json::from_value(json!({"id": id, "steps": defs})).expect("a saga parses");
        let counters: Vec<Op> = serde_json::from_value(json!(counters)).expect("ops parse");
        let docs = vec![TxnDoc {
            id: effects.parse().expect("valid id"),
            ops: counters,
            precondition: Precondition::none(),
        }];
        match replica.start_saga_with(&def, docs) {
            Ok((_, run)) => {
                self.note(format!(
                    "site {site} starts saga {id} of {steps} steps: {run:?}"
                ));
                self.sagas.push(id);
                self.report.sagas += 1;
            }
            Err(e) => self.note(format!("site {site} cannot start saga {id}: {e}")),
        }
    }

    fn run_saga_at(&mut self, site: usize, replica: &Replica, id: &str) {
        match replica.run_saga(id) {
            Ok(run) if !run.is_empty() => {
                self.note(format!("site {site} runs saga {id}: {run:?}"));
            }
            Ok(_) => {}
            Err(e) => self.note(format!("site {site} saga {id} waits: {e}")),
        }
    }

    /// Runs every due step at every live site; whether any ran.
    fn run_all_sagas(&mut self) -> bool {
        let mut ran = false;
        for site in 0..self.sites.len() {
            let Some(replica) = self.sites[site].replica.clone() else {
                continue;
            };
            for (id, run) in replica.run_sagas() {
                if !run.is_empty() {
                    ran = true;
                    self.note(format!("site {site} runs saga {id}: {run:?}"));
                }
            }
        }
        self.pump();
        ran
    }

    /// Every saga finished alike at every site, each step's action and
    /// compensation counted once if recorded done and never otherwise,
    /// compensations in reverse order.
    fn check_sagas(&mut self) -> Result<(), String> {
        use crate::saga::{CompensationState, SagaStatus, StepState};
        let mut effects_total = 0;
        let mut done = 0;
        // A saga started at a site that was then restored from an earlier
        // backup before sending it is gone, as every write since the
        // backup is (nothing of it ran anywhere: a site that runs a step
        // holds the saga). Sites converged, so one site tells.
        let first = self.sites[0].replica.clone();
        let kept: Vec<String> = self
            .sagas
            .iter()
            .filter(|id| {
                first
                    .as_ref()
                    .is_some_and(|r| r.saga(id).ok().flatten().is_some())
            })
            .cloned()
            .collect();
        self.report.sagas = kept.len();
        for site in 0..self.sites.len() {
            let Some(replica) = self.sites[site].replica.clone() else {
                return Err(self.failure(format!("site {site} is down at the end")));
            };
            for id in kept.clone() {
                let view = replica
                    .saga(&id)
                    .map_err(|e| self.failure(format!("saga {id} at site {site}: {e}")))?
                    .ok_or_else(|| self.failure(format!("site {site} lacks saga {id}")))?;
                let state = &view.state;
                let status = state.status();
                if !status.finished() {
                    return Err(self.failure(format!(
                        "saga {id} is {} at site {site} after the final heal: {:?}",
                        status.as_str(),
                        state.records
                    )));
                }
                let effects = replica
                    .read_json(&format!("effects/{id}").parse().expect("valid id"), None)
                    .map_err(|e| self.failure(format!("effects of {id}: {e}")))?
                    .ok_or_else(|| self.failure(format!("site {site} lacks effects of {id}")))?
                    .value;
                let mut compensated_at = Vec::new();
                for (step, record) in state.def.steps.iter().zip(&state.records) {
                    let count = |key: &str| {
                        effects
                            .get(format!("{}-{key}", step.name))
                            .and_then(serde_json::Value::as_i64)
                    };
                    let (action, compensation) = (count("action"), count("compensation"));
                    let want_action = i64::from(record.status == StepState::Done);
                    let want_compensation =
                        i64::from(record.compensation == CompensationState::Done);
                    if action != Some(want_action) || compensation != Some(want_compensation) {
                        return Err(self.failure(format!(
                            "saga {id} step {} at site {site}: counted {action:?} actions and {compensation:?} compensations for {record:?}",
                            step.name
                        )));
                    }
                    if site == 0 {
                        effects_total += (want_action + want_compensation) as usize;
                    }
                    if record.compensation == CompensationState::Done {
                        compensated_at.push(record.at);
                    }
                }
                // Compensations ran last step first.
                if compensated_at.windows(2).any(|w| w[0] < w[1]) {
                    return Err(self.failure(format!(
                        "saga {id} at site {site}: compensations out of order: {:?}",
                        state.records
                    )));
                }
                if site == 0 && status == SagaStatus::Done {
                    done += 1;
                }
            }
        }
        self.report.sagas_done = done;
        self.report.saga_effects = effects_total;
        Ok(())
    }

    fn check_txns(&mut self, sites: Option<usize>) {
        if self.violation.is_some() || self.txns.is_empty() {
            return;
        }
        self.report.txn_checks += 1;
        let range = match sites {
            Some(site) => site..site + 1,
            None => 0..self.sites.len(),
        };
        for site in range {
            let Some(replica) = self.sites[site].replica.clone() else {
                continue;
            };
            let view = &mut self.txn_views[site];
            for (t, txn) in self.txns.iter().enumerate() {
                if view.whole.contains(&t) {
                    continue;
                }
                let mut held = Vec::with_capacity(txn.members.len());
                for (m, (doc, hash)) in txn.members.iter().enumerate() {
                    let heads = replica.heads(doc).unwrap_or_default();
                    let known = match view.looked.get(&(t, m)) {
                        Some((seen, known)) if *seen == heads => *known,
                        _ => {
                            let known = replica
                                .known_hashes(doc, &[*hash])
                                .is_ok_and(|k| !k.is_empty());
                            view.looked.insert((t, m), (heads, known));
                            known
                        }
                    };
                    held.push(known);
                }
                let count = held.iter().filter(|k| **k).count();
                if count == txn.members.len() {
                    view.whole.insert(t);
                    for m in 0..txn.members.len() {
                        view.looked.remove(&(t, m));
                    }
                } else if count > 0 {
                    let shown: Vec<String> = txn
                        .members
                        .iter()
                        .zip(&held)
                        .map(|((doc, _), known)| {
                            format!("{doc}: {}", if *known { "visible" } else { "missing" })
                        })
                        .collect();
                    self.violation = Some(format!(
                        "site {site} shows part of transaction {}: {}",
                        txn.id,
                        shown.join(", ")
                    ));
                    return;
                }
            }
        }
    }

    fn check_violation(&mut self) -> Result<(), String> {
        match self.violation.take() {
            Some(what) => Err(self.failure(what)),
            None => Ok(()),
        }
    }

    /// Resolves (with an edit) or dismisses an open report, if the site
    /// has one; two sites may close the same report concurrently.
    fn close_a_conflict(&mut self, site: usize, replica: &Replica) {
        let open = replica
            .conflicts(&Filter {
                status: Some(Status::Open),
                ..Filter::default()
            })
            .unwrap_or_default();
        if open.is_empty() {
            return;
        }
        let report = &open[self.rng.below(open.len())];
        let result = if self.rng.chance(50) {
            let ops: Vec<Op> = serde_json::from_value(
                json!([{"op": "set", "path": "/resolved", "value": self.rng.below(1000)}]),
            )
            .expect("ops parse");
            replica.resolve_conflict(&report.id, &ops, Some("sim"))
        } else {
            replica.dismiss_conflict(&report.id, None)
        };
        if result.is_ok() {
            self.report.edits += 1;
            self.note(format!(
                "close site {site} conflict {} in {}",
                report.id, report.doc
            ));
        }
    }

    /// Delivers one frame on a random link, with faults when enabled.
    fn deliver_random(&mut self, faults: bool) {
        let keys: Vec<(usize, usize)> = self.links.keys().copied().collect();
        if keys.is_empty() {
            return;
        }
        let key = keys[self.rng.below(keys.len())];
        let to_high = self.rng.below(2) == 0;
        let lane = if self.rng.below(2) == 0 {
            Lane::Control
        } else {
            Lane::Live
        };
        let duplicate = faults && self.rng.chance(2);
        let out_of_order = faults && self.rng.chance(1);
        // Sometimes several queued frames arrive together (as a transport
        // hands them over), which the session may apply together.
        let together = !duplicate && !out_of_order && self.rng.chance(25);
        let pick = self.rng.next_u64();
        let Some(link) = self.links.get_mut(&key) else {
            return;
        };
        let queue = if to_high {
            link.to_high.entry(lane).or_default()
        } else {
            link.to_low.entry(lane).or_default()
        };
        if queue.is_empty() {
            return;
        }
        if together {
            let count = (1 + pick % 8).min(queue.len() as u64) as usize;
            let frames: Vec<Vec<u8>> = queue.drain(..count).collect();
            return self.deliver_many(key, to_high, &frames);
        }
        let index = if out_of_order {
            (pick % queue.len() as u64) as usize
        } else {
            0
        };
        let Some(frame) = (if duplicate {
            queue.get(index).cloned()
        } else {
            queue.remove(index)
        }) else {
            return;
        };
        self.deliver(key, to_high, &frame);
    }

    fn deliver(&mut self, key: (usize, usize), to_high: bool, frame: &[u8]) {
        self.deliver_many(key, to_high, &[frame.to_vec()]);
    }

    fn deliver_many(&mut self, key: (usize, usize), to_high: bool, frames: &[Vec<u8>]) {
        self.report.deliveries += frames.len();
        let site = if to_high { key.1 } else { key.0 };
        let Some(replica) = self.sites[site].replica.clone() else {
            return;
        };
        let now = self.now();
        let Some(link) = self.links.get_mut(&key) else {
            return;
        };
        let session = if to_high {
            &mut link.high_session
        } else {
            &mut link.low_session
        };
        // Frames carry their length prefix; the session takes the payload.
        let payloads: Vec<&[u8]> = frames.iter().map(|f| &f[4..]).collect();
        session.handle_frames(now, &replica, &payloads);
        // Only the receiving site changed; every site is checked after
        // each step as well.
        self.check_txns(Some(site));
        self.check_escrow(Some(site));
    }

    /// Moves frames from sessions to the network, committed changes to
    /// sessions, tears down closed links and connects missing ones, until
    /// nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            // Committed changes at each site go to that site's sessions.
            for site in 0..self.sites.len() {
                let Some(replica) = self.sites[site].replica.clone() else {
                    continue;
                };
                let mut committed = Vec::new();
                if let Some(events) = self.sites[site].events.as_mut() {
                    loop {
                        match events.try_recv() {
                            Ok(c) => committed.push(c),
                            Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                            Err(_) => break,
                        }
                    }
                }
                for c in &committed {
                    moved = true;
                    for (&(low, high), link) in self.links.iter_mut() {
                        if low == site {
                            link.low_session.handle_committed(&replica, c);
                        } else if high == site {
                            link.high_session.handle_committed(&replica, c);
                        }
                    }
                }
                // A saga that changed here may have a step due here.
                let sagas: BTreeSet<String> = committed
                    .iter()
                    .filter_map(|c| crate::saga::saga_id_of(&c.doc).map(str::to_owned))
                    .collect();
                for id in sagas {
                    self.run_saga_at(site, &replica, &id);
                }
            }
            // Requests for rights go to the sessions of the site they name.
            for site in 0..self.sites.len() {
                let mut wanted = Vec::new();
                if let Some(feed) = self.sites[site].wanted.as_mut() {
                    loop {
                        match feed.try_recv() {
                            Ok(w) => wanted.push(w),
                            Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                            Err(_) => break,
                        }
                    }
                }
                for w in &wanted {
                    for (&(low, high), link) in self.links.iter_mut() {
                        let (session, peer) = if low == site {
                            (&mut link.low_session, high)
                        } else if high == site {
                            (&mut link.high_session, low)
                        } else {
                            continue;
                        };
                        if w.ask
                            .as_ref()
                            .is_none_or(|ask| *ask == self.sites[peer].name)
                        {
                            session.ask_rights(w);
                            moved = true;
                        }
                    }
                }
            }
            // Frames from sessions into lanes.
            let mut closed = Vec::new();
            for (&key, link) in self.links.iter_mut() {
                while let Some((lane, frame)) = link.low_session.poll_transmit() {
                    link.to_high.entry(lane).or_default().push_back(frame);
                    moved = true;
                }
                while let Some((lane, frame)) = link.high_session.poll_transmit() {
                    link.to_low.entry(lane).or_default().push_back(frame);
                    moved = true;
                }
                while link.low_session.poll_event().is_some() {}
                while link.high_session.poll_event().is_some() {}
                if link.low_session.is_closed() || link.high_session.is_closed() {
                    closed.push(key);
                }
            }
            for key in closed {
                self.note(format!("link {key:?} closed"));
                self.drop_link(key);
                moved = true;
            }
            // Connect every pair of live, reachable sites.
            for low in 0..self.sites.len() {
                for high in low + 1..self.sites.len() {
                    if self.links.contains_key(&(low, high))
                        || self.sites[low].replica.is_none()
                        || self.sites[high].replica.is_none()
                        || self.partitioned.contains(&low)
                        || self.partitioned.contains(&high)
                    {
                        continue;
                    }
                    let now = self.now();
                    let (a, b) = (self.sites[low].name.clone(), self.sites[high].name.clone());
                    self.links.insert(
                        (low, high),
                        Link {
                            low_session: Session::new(
                                SessionConfig::new(a.clone(), b.clone()),
                                now,
                            ),
                            high_session: Session::new(SessionConfig::new(b, a), now),
                            to_low: BTreeMap::new(),
                            to_high: BTreeMap::new(),
                        },
                    );
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn drop_link(&mut self, key: (usize, usize)) {
        if self.links.remove(&key).is_some() {
            self.report.resets += 1;
        }
    }

    /// Runs the network without faults until nothing is in flight and every
    /// session is reconciled and idle.
    fn settle(&mut self) -> Result<(), String> {
        let mut deliveries = 0usize;
        loop {
            self.pump();
            let pending: Vec<((usize, usize), bool, Lane)> = self
                .links
                .iter()
                .flat_map(|(&key, link)| {
                    let high = link
                        .to_high
                        .iter()
                        .filter(|(_, q)| !q.is_empty())
                        .map(move |(&l, _)| (key, true, l));
                    let low = link
                        .to_low
                        .iter()
                        .filter(|(_, q)| !q.is_empty())
                        .map(move |(&l, _)| (key, false, l));
                    high.chain(low)
                })
                .collect();
            if pending.is_empty() {
                let busy = self.links.values().any(|l| {
                    !(l.low_session.is_reconciled()
                        && l.high_session.is_reconciled()
                        && l.low_session.is_idle()
                        && l.high_session.is_idle())
                });
                if !busy {
                    return Ok(());
                }
                return Err(self.failure("network is quiet but a session is not idle".into()));
            }
            for (key, to_high, lane) in pending {
                let frame = self.links.get_mut(&key).and_then(|link| {
                    let queue = if to_high {
                        link.to_high.get_mut(&lane)
                    } else {
                        link.to_low.get_mut(&lane)
                    };
                    queue.and_then(VecDeque::pop_front)
                });
                if let Some(frame) = frame {
                    self.deliver(key, to_high, &frame);
                    deliveries += 1;
                }
            }
            if deliveries > self.config.settle_deliveries_max {
                return Err(self.failure(format!("no quiescence after {deliveries} deliveries")));
            }
        }
    }

    fn check_converged(&mut self) -> Result<(), String> {
        let replicas: Vec<Replica> = self
            .sites
            .iter()
            .filter_map(|s| s.replica.clone())
            .collect();
        let first = &replicas[0];
        let ids: Vec<DocId> = first.doc_ids("");
        for (i, replica) in replicas.iter().enumerate().skip(1) {
            let other = replica.doc_ids("");
            if other != ids {
                return Err(self.failure(format!("site {i} holds {other:?}, site 0 holds {ids:?}")));
            }
        }
        for id in &ids {
            let mut reference: Option<(Vec<ChangeHash>, serde_json::Value)> = None;
            for (i, replica) in replicas.iter().enumerate() {
                let view = replica
                    .read_json(id, None)
                    .map_err(|e| self.failure(format!("site {i} cannot read {id}: {e}")))?
                    .ok_or_else(|| self.failure(format!("site {i} lost {id}")))?;
                let mut heads = view.heads;
                heads.sort();
                match &reference {
                    None => reference = Some((heads, view.value)),
                    Some((h, v)) => {
                        if *h != heads || *v != view.value {
                            let held: Vec<String> = replicas
                                .iter()
                                .map(|r| {
                                    format!(
                                        "{}: {:?} {:?}",
                                        r.site(),
                                        r.txn_stats(),
                                        self.sites
                                            .iter()
                                            .map(|s| r.held_missing(&s.name))
                                            .collect::<Vec<_>>()
                                    )
                                })
                                .collect();
                            return Err(self.failure(format!(
                                "{id} differs: site 0 heads {h:?} value {v}; site {i} heads {heads:?} value {}\nheld: {held:#?}",
                                view.value
                            )));
                        }
                    }
                }
            }
        }
        self.report.docs = ids.len();
        self.report.heads_digest = first.heads_digest("").to_hex();
        self.check_reports(&replicas, &ids)
    }

    /// Every site lists the same reports with the same statuses, and each
    /// site's index agrees with the reports stored in its documents.
    fn check_reports(&mut self, replicas: &[Replica], ids: &[DocId]) -> Result<(), String> {
        let mut reference: Option<Vec<Conflict>> = None;
        for (i, replica) in replicas.iter().enumerate() {
            let listed = replica
                .conflicts(&Filter::default())
                .map_err(|e| self.failure(format!("site {i} cannot list conflicts: {e}")))?;
            let mut stored = Vec::new();
            for id in ids {
                let in_doc = replica
                    .with_doc(id, crate::conflict::reports_in)
                    .map_err(|e| self.failure(format!("site {i} cannot read {id}: {e}")))?
                    .unwrap_or_default();
                stored.extend(in_doc);
            }
            let key = |c: &Conflict| c.id.clone();
            let mut sorted_listed = listed.clone();
            sorted_listed.sort_by_key(key);
            stored.sort_by_key(key);
            if sorted_listed != stored {
                return Err(self.failure(format!(
                    "site {i}'s conflict index disagrees with its documents: index {sorted_listed:#?} documents {stored:#?}"
                )));
            }
            match &reference {
                None => reference = Some(sorted_listed),
                Some(first) if *first != sorted_listed => {
                    return Err(self.failure(format!(
                        "conflict reports differ: site 0 {first:#?} site {i} {sorted_listed:#?}"
                    )));
                }
                Some(_) => {}
            }
        }
        let reports = reference.unwrap_or_default();
        if let Some(report) = reports.iter().find(|r| {
            r.rule
                .as_deref()
                .is_some_and(|n| n.starts_with("bounded-floor"))
        }) {
            return Err(self.failure(format!(
                "a bounded counter went below its min: report {} in {}",
                report.id, report.doc
            )));
        }
        // A compensation runs once: no report closed automatically twice
        // (a restored resolver must not resolve again what it already had).
        for report in &reports {
            let automatic = replicas[0]
                .with_doc(&report.doc, |doc| {
                    crate::conflict::report::closings(doc, &report.id)
                        .into_iter()
                        .filter(|c| c.how == "clamp")
                        .count()
                })
                .map_err(|e| self.failure(format!("site 0 cannot read {}: {e}", report.doc)))?
                .unwrap_or(0);
            if automatic > 1 {
                return Err(self.failure(format!(
                    "report {} in {} was resolved automatically {automatic} times",
                    report.id, report.doc
                )));
            }
        }
        self.report.conflicts = reports.len();
        self.report.conflicts_closed = reports.iter().filter(|c| c.status != Status::Open).count();
        Ok(())
    }
}

/// The pool and the number of rights an error says are missing here.
fn missing_rights(error: &crate::Error) -> Option<(PoolKind, i64)> {
    let op = match error {
        crate::Error::Op(op) => &**op,
        crate::Error::TxnOp { source, .. } => &**source,
        _ => return None,
    };
    match op {
        crate::doc::OpError::InsufficientRights {
            pool,
            wanted,
            available_here,
            ..
        } => Some((*pool, wanted - available_here)),
        _ => None,
    }
}

/// The rules every simulated site runs: a floor on the shared counter that
/// its resolver clamps, and unique item numbers left for people.
fn sim_conflict_config() -> ConflictConfig {
    ConflictConfig::default()
        .with_rule(
            Rule::new("count-floor", "ns-*", "/count", Check::Min(-300.0))
                .expect("valid rule")
                .policy(Policy::Clamp),
        )
        .and_then(|c| {
            c.with_rule(
                Rule::new("unique-items", "ns-*", "/items", Check::Unique("n".into()))
                    .expect("valid rule"),
            )
        })
        .and_then(|c| {
            // Never fires: bounded counters cannot go below their min.
            (0..SITES_MAX).try_fold(c, |c, site| {
                c.with_rule(
                    Rule::new(
                        &format!("bounded-floor-{site}"),
                        "ns-*",
                        &format!("/bounded-site-{site}"),
                        Check::Min(0.0),
                    )
                    .expect("valid rule"),
                )
            })
        })
        .expect("rule names differ")
}

/// Harnesses for the fuzz targets under `fuzz/` and for replaying the inputs
/// that once crashed them (`tests/fuzz_regressions.rs`). Each panics only on
/// a real bug.
pub mod fuzz {
    use std::sync::Arc;
    use std::time::Instant;

    use serde_json::json;

    use super::{Sim, SimConfig, SimWorld};
    use crate::doc::Op;
    use crate::id::{DocId, SiteName};
    use crate::protocol::session::{Session, SessionConfig};
    use crate::protocol::wire::{self, FrameDecoder, Message};
    use crate::replica::Replica;
    use crate::store::Memory;

    /// Replaces libFuzzer's abort-on-any-panic hook with a silent one: a
    /// panic inside automerge that our code contains with `catch_unwind` (and
    /// turns into an error) is the behaviour under test, not a crash. A panic
    /// that escapes a harness still aborts the fuzzer (libfuzzer-sys catches
    /// it at the top) and its input is saved.
    pub fn contain_panics() {
        std::panic::set_hook(Box::new(|_| {}));
    }

    /// Arbitrary bytes through the frame decoder: never a panic, and every
    /// message that decodes re-encodes to a frame that decodes the same.
    pub fn wire_decode(data: &[u8]) {
        let mut decoder = FrameDecoder::new();
        decoder.push(data);
        for _ in 0..64 {
            match decoder.next_message() {
                Ok(Some(message)) => {
                    let frame = wire::encode(&message);
                    let again =
                        wire::decode_payload(&frame[4..]).expect("a re-encoded message decodes");
                    assert_eq!(again, message, "decode(encode(m)) == m");
                }
                Ok(None) | Err(_) => break,
            }
        }
        if let Ok(message) = wire::decode_payload(data) {
            assert_eq!(
                wire::decode_payload(&wire::encode(&message)[4..]).ok(),
                Some(message)
            );
        }
    }

    fn site(name: &str) -> SiteName {
        SiteName::new(name).expect("valid site name")
    }

    /// A replica at `east` holding a few documents, and the encoded changes
    /// of a `west` replica, to mutate into hostile input.
    fn fixture() -> (Replica, Vec<Vec<u8>>) {
        // Fixed actor ids and clock: the same input replays the same run.
        let world = SimWorld::new(0);
        let east = Replica::open(world.options(site("east")), Arc::new(Memory::new()))
            .expect("memory store");
        let west = Replica::open(world.options(site("west")), Arc::new(Memory::new()))
            .expect("memory store");
        let ops =
            |v: serde_json::Value| -> Vec<Op> { serde_json::from_value(v).expect("static ops") };
        for (replica, n) in [(&east, 1), (&west, 2)] {
            for d in 0..3 {
                let id = DocId::new(&format!("doc-{d}")).expect("valid id");
                replica
                    .apply_ops(&id, &ops(json!([{"op": "set", "path": "/a", "value": n}, {"op": "set", "path": "/t", "value": "xy", "as": "text"}])), None)
                    .expect("fixture edit");
                replica
                    .apply_ops(
                        &id,
                        &ops(json!([{"op": "set", "path": "/c", "value": d, "as": "counter"}])),
                        None,
                    )
                    .expect("fixture edit");
            }
        }
        let mut pool = Vec::new();
        for d in 0..3 {
            let id = DocId::new(&format!("doc-{d}")).expect("valid id");
            pool.extend(
                west.changes_after(&id, &[])
                    .expect("exists")
                    .expect("exists"),
            );
        }
        (east, pool)
    }

    /// A session that accepted its peer's hello, fed messages built from
    /// `data`: raw frames, and `Changes` carrying mutated real changes. The
    /// session may close; the process must not panic and the store must
    /// stay readable.
    pub fn session_input(data: &[u8]) {
        let (east, pool) = fixture();
        let now = Instant::now();
        let mut session = Session::new(SessionConfig::new(site("east"), site("west")), now);
        let hello = Message::Hello {
            version: wire::PROTOCOL_VERSION,
            site: site("west"),
            capabilities: 1,
        };
        session.handle_bytes(now, &east, &wire::encode(&hello));
        let mut rest = data;
        let mut batch = 0u64;
        while let Some((&kind, tail)) = rest.split_first() {
            rest = tail;
            let take = |rest: &mut &[u8], n: usize| -> Vec<u8> {
                let n = n.min(rest.len());
                let (head, tail) = rest.split_at(n);
                *rest = tail;
                head.to_vec()
            };
            match kind % 4 {
                0 => {
                    // Raw bytes straight into the stream.
                    let len = take(&mut rest, 1).first().copied().unwrap_or(0) as usize;
                    let raw = take(&mut rest, len);
                    session.handle_bytes(now, &east, &raw);
                }
                1 => {
                    // A real change with a few bytes overwritten.
                    let pick = take(&mut rest, 1).first().copied().unwrap_or(0) as usize;
                    let mut change = pool[pick % pool.len()].clone();
                    let edits = take(&mut rest, 6);
                    for pair in edits.chunks(2) {
                        if let [at, value] = pair {
                            let at = *at as usize % change.len();
                            change[at] = *value;
                        }
                    }
                    if edits.first().is_some_and(|b| b % 2 == 0) && change.len() > 8 {
                        // A hostile peer forges a valid checksum.
                        use sha2::Digest;
                        let hash = sha2::Sha256::digest(&change[8..]);
                        change[4..8].copy_from_slice(&hash[..4]);
                    }
                    batch += 1;
                    let doc = DocId::new(&format!("doc-{}", pick % 4)).expect("valid id");
                    let message = Message::Changes {
                        doc,
                        changes: vec![change],
                        batch,
                    };
                    session.handle_bytes(now, &east, &wire::encode(&message));
                }
                2 => {
                    // Real changes in an arbitrary order and subset.
                    let picks = take(&mut rest, 4);
                    let changes: Vec<Vec<u8>> = picks
                        .iter()
                        .map(|p| pool[*p as usize % pool.len()].clone())
                        .collect();
                    batch += 1;
                    let doc =
                        DocId::new(&format!("doc-{}", picks.first().copied().unwrap_or(0) % 3))
                            .expect("valid id");
                    session.handle_bytes(
                        now,
                        &east,
                        &wire::encode(&Message::Changes {
                            doc,
                            changes,
                            batch,
                        }),
                    );
                }
                _ => {
                    // Protocol messages with arbitrary hashes.
                    let bytes = take(&mut rest, 33);
                    let mut hash = [0u8; 32];
                    for (i, b) in bytes.iter().skip(1).enumerate() {
                        hash[i] = *b;
                    }
                    let doc =
                        DocId::new(&format!("doc-{}", bytes.first().copied().unwrap_or(0) % 4))
                            .expect("valid id");
                    let message = match bytes.first().copied().unwrap_or(0) % 4 {
                        0 => Message::Have {
                            doc,
                            heads: vec![hash],
                            reply: false,
                        },
                        1 => Message::Sample {
                            doc,
                            hashes: vec![hash],
                        },
                        2 => Message::Base {
                            doc,
                            hashes: vec![hash],
                        },
                        _ => Message::Ack {
                            batch: u64::from(hash[0]),
                        },
                    };
                    session.handle_bytes(now, &east, &wire::encode(&message));
                }
            }
            while session.poll_transmit().is_some() {}
            while session.poll_event().is_some() {}
        }
        // Whatever happened, every stored document still loads.
        for (id, _) in east.index() {
            east.read_json(&id, None)
                .expect("stored documents stay readable");
        }
    }

    /// A small multi-site run steered by `data`; panics if sites diverge.
    pub fn multi_site(data: &[u8]) {
        let config = SimConfig {
            sites: 3,
            docs: 4,
            steps: 60,
            faults: true,
            settle_deliveries_max: 50_000,
        };
        if let Err(failure) = Sim::from_tape(data, config).run() {
            panic!("{failure}");
        }
    }
}
