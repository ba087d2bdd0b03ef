//! One sync session with one peer, as a pure state machine in the shape of
//! quinn-proto: callers feed received bytes, local commits and time through
//! `handle_*`, and take frames to send, events and the next deadline with
//! `poll_*`. The session never touches a socket or reads a clock; it reads
//! and writes documents only through the [`Host`] passed to each call (the
//! [`Replica`](crate::Replica) in production and in the simulation).
//!
//! Flow: both sides send `Hello`; the side whose site name sorts first
//! starts range-based set reconciliation of `(doc id, heads)`, listing up
//! front the documents it changed since the peer last held everything
//! ([`Host::changed_since_synced`]; the session marks that moment with
//! [`Host::mark_synced`] whenever nothing it sent is in flight); every
//! document found to differ is caught up with a per-document exchange of
//! heads that only ever sends changes after heads the sender has verified it
//! knows (automerge answers unknown heads with the whole history). Local
//! commits are pushed live on their own lane, coalesced per document while
//! the live window is full, and acknowledged by batch number.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use automerge::ChangeHash;

use super::reconcile::{item_hash, ItemSet, ShortHash};
use super::scope::Scope;
use super::wire::{
    self, capabilities, close_code, FrameDecoder, Hash, Message, WireError,
    CHANGES_PER_MESSAGE_MAX, HASHES_PER_MESSAGE_MAX, MESSAGE_CHANGE_BYTES_TARGET, PROTOCOL_VERSION,
};
use crate::error::Error;

/// Largest document sent whole in saved form; larger ones travel as
/// changes, cut into messages under the frame limit.
const SNAPSHOT_BYTES_MAX: usize = wire::FRAME_BYTES_MAX - (64 << 10);
use crate::id::{DocId, SiteName};
use crate::replica::{Applied, Committed, Origin};
use crate::txn::TxnId;

/// Most transactions a session asks about ([`Message::TxnAsk`]); past it,
/// held transactions wait for their members or their bound.
const TXN_ASKS_MAX: usize = 4096;

/// What a session needs from the local replica.
pub trait Host {
    /// Every document with its heads.
    fn index(&self) -> Vec<(DocId, Vec<ChangeHash>)>;
    /// The heads of one document, if it exists.
    fn heads(&self, doc: &DocId) -> Option<Vec<ChangeHash>>;
    /// Which of `hashes` the document holds.
    fn known(&self, doc: &DocId, hashes: &[ChangeHash]) -> Result<Vec<ChangeHash>, Error>;
    /// Encoded changes after `have` (all known), in causal order.
    fn changes_after(&self, doc: &DocId, have: &[ChangeHash]) -> Result<Vec<Vec<u8>>, Error>;
    /// Hashes spread over the document's history, newest first.
    fn sample(&self, doc: &DocId) -> Result<Vec<ChangeHash>, Error>;
    /// Applies received changes durably, in one batch.
    fn apply(&self, doc: &DocId, changes: &[Vec<u8>], from: &SiteName) -> Result<Applied, Error>;
    /// [`Host::apply`] inside a batch of frames: work it completes (held
    /// transactions) may wait for [`Host::flush`], which the session calls
    /// once the batch is handled.
    fn apply_batched(
        &self,
        doc: &DocId,
        changes: &[Vec<u8>],
        from: &SiteName,
    ) -> Result<Applied, Error> {
        self.apply(doc, changes, from)
    }
    /// Finishes what [`Host::apply_batched`] left waiting.
    fn flush(&self) {}
    /// The whole document in a form automerge loads (its saved form, or
    /// stored chunks concatenated), with heads the bytes contain.
    fn snapshot(&self, doc: &DocId) -> Result<(Vec<u8>, Vec<ChangeHash>), Error>;
    /// Merges a whole document received in saved form, durably.
    fn apply_snapshot(&self, doc: &DocId, bytes: &[u8], from: &SiteName) -> Result<Applied, Error>;
    /// [`Host::apply_snapshot`] for several documents, results in order; a
    /// host may make them durable together.
    fn apply_snapshots(
        &self,
        docs: &[(DocId, &[u8])],
        from: &SiteName,
    ) -> Vec<Result<Applied, Error>> {
        docs.iter()
            .map(|(doc, bytes)| self.apply_snapshot(doc, bytes, from))
            .collect()
    }

    /// The heads of a recent state of `doc` whose item hash starts with
    /// `short` (see [`super::reconcile::item_hash`]), if this side can find
    /// one; `None` is always a correct answer.
    fn heads_of_state(&self, _doc: &DocId, _short: &ShortHash) -> Option<Vec<ChangeHash>> {
        None
    }

    /// Notes that the session with `peer` has nothing in flight.
    fn mark_synced(&self, _peer: &SiteName) {}

    /// Documents probably changed here since the last [`Host::mark_synced`]
    /// for `peer`, or `None` when unknown. Only a hint: reconciliation
    /// finds every difference whatever it says.
    fn changed_since_synced(&self, _peer: &SiteName) -> Option<Vec<DocId>> {
        None
    }

    /// Whether this site replicates `doc` at all (a member of a
    /// transaction it does not replicate is never sent on).
    fn replicates(&self, _doc: &DocId) -> bool {
        true
    }

    /// The transactions held back with changes `peer` delivered, and the
    /// members each still lacks.
    fn held_missing(&self, _peer: &SiteName) -> Vec<(TxnId, Vec<DocId>)> {
        Vec::new()
    }

    /// `peer` says the members `docs` of `txn` never come from it.
    fn txn_not_from(&self, _peer: &SiteName, _txn: TxnId, _docs: &[DocId]) {}

    /// `peer` asks for `amount` rights of a bounded counter: grant what
    /// may be spared, as an ordinary change.
    fn grant_rights(
        &self,
        _peer: &SiteName,
        _doc: &DocId,
        _pointer: &str,
        _pool: crate::escrow::PoolKind,
        _amount: i64,
    ) {
    }
}

/// Which stream a frame belongs on: live changes must never wait behind a
/// large catch-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// Handshake, reconciliation, catch-up, acks.
    Control,
    /// Live pushes of new commits.
    Live,
}

/// Settings of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// This site.
    pub local: SiteName,
    /// The site the peer must prove to be.
    pub peer: SiteName,
    /// What the peer may receive and write.
    pub scope: Scope,
    /// Unacknowledged live bytes allowed in flight.
    pub live_window_bytes: usize,
    /// Unacknowledged catch-up bytes allowed in flight.
    pub catchup_window_bytes: usize,
    /// Live changes queued per session before falling back to catch-up.
    pub live_queue_bytes_max: usize,
    /// Time allowed for the peer's `Hello`.
    pub handshake_timeout: Duration,
    /// Announce and send bundles of compressed frames (when the peer
    /// announces them too). Off, every frame travels as it is, which only
    /// helps someone reading raw captures.
    pub bundles: bool,
}

impl SessionConfig {
    /// Defaults for a session between `local` and `peer` replicating
    /// everything.
    pub fn new(local: SiteName, peer: SiteName) -> SessionConfig {
        SessionConfig {
            local,
            peer,
            scope: Scope::everything(),
            live_window_bytes: 4 << 20,
            catchup_window_bytes: 8 << 20,
            live_queue_bytes_max: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            bundles: true,
        }
    }
}

/// Something the session reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer proved its site name and protocol version.
    Connected {
        /// The peer.
        peer: SiteName,
    },
    /// Set reconciliation finished.
    Reconciled {
        /// Documents found to differ.
        differing: usize,
        /// Reconciliation messages sent by this side.
        messages_sent: usize,
    },
    /// Changes received from the peer were applied.
    Applied {
        /// The document.
        doc: DocId,
        /// New changes applied.
        changes: usize,
    },
    /// Changes from the peer were refused; the session carries on.
    Rejected {
        /// The document.
        doc: DocId,
        /// Why.
        reason: String,
    },
    /// The session ended.
    Closed {
        /// A [`close_code`].
        code: u16,
        /// Why.
        reason: String,
        /// True when the peer closed it.
        by_peer: bool,
    },
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Frame bytes handed out for sending.
    pub bytes_sent: u64,
    /// Frame bytes received.
    pub bytes_received: u64,
    /// Changes sent (live and catch-up).
    pub changes_sent: u64,
    /// New changes applied from the peer.
    pub changes_applied: u64,
    /// `Changes` messages sent.
    pub batches_sent: u64,
    /// `Changes` messages received.
    pub batches_received: u64,
    /// Reconciliation round messages sent.
    pub reconcile_messages_sent: u64,
    /// Whole documents sent in saved form.
    pub snapshots_sent: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Open,
    Closed,
}

/// Most whole documents received back to back that are applied in one
/// durable write; each is loaded in memory (~22 KB) while it is checked.
pub const SNAPSHOTS_PER_WRITE_MAX: usize = 256;

/// What a batch from the peer carries.
#[derive(Debug, Clone, Copy)]
enum Payload<'a> {
    Changes(&'a [Vec<u8>]),
    Snapshot(&'a [u8]),
}

/// One peer's sync session.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    phase: Phase,
    deadline: Option<Instant>,
    decoder: FrameDecoder,
    transmits: VecDeque<(Lane, Vec<u8>)>,
    /// The batch of the `Ack` that is the last frame in `transmits`: a newer
    /// one replaces it.
    ack_at_back: Option<u64>,
    /// The peer accepts bundles of compressed frames.
    peer_bundles: bool,
    /// The peer understands `TxnAsk` and `TxnNone`.
    peer_txn_ask: bool,
    /// The peer understands `RightsAsk`.
    peer_escrow: bool,
    /// Transactions this side asked the peer about.
    txn_asked: HashSet<TxnId>,
    /// Changes were held back in this turn: once the turn's frames are all
    /// applied, ask about what is still held ([`Session::ask_about_held`]).
    held_this_turn: bool,
    events: VecDeque<Event>,
    stats: SessionStats,
    // Reconciliation.
    items: Option<ItemSet>,
    reconciled: HashSet<DocId>,
    /// Documents this side sent its own (unprompted) `Have` for.
    haves_sent: HashSet<DocId>,
    /// Set by whichever side ends the exchange (its `respond` had nothing
    /// to send back) and by the other on hearing `ReconcileDone`.
    reconcile_done: bool,
    // Batches sent and not yet acknowledged: batch -> (lane, bytes).
    next_batch: u64,
    unacked: BTreeMap<u64, (Lane, usize)>,
    unacked_bytes: HashMap<Lane, usize>,
    // Live changes waiting for window space, coalesced per document.
    live_queue: BTreeMap<DocId, Vec<Vec<u8>>>,
    live_queue_bytes: usize,
    // Catch-up work waiting for window space: document and base heads.
    catchup_queue: VecDeque<(DocId, Vec<ChangeHash>)>,
    catchup_queued: HashSet<DocId>,
    // Hashes the peer is known to hold (with all their ancestors), per
    // document, learned in this session: grows with what we send and
    // receive, and is replaced by the heads in the peer's own `Have`.
    peer_has: HashMap<DocId, Vec<ChangeHash>>,
    // Changes this session applied from the peer whose commit has not come
    // back through `handle_committed` yet.
    received: HashSet<ChangeHash>,
}

/// Most hashes `received` holds; past it the set starts over, and at worst
/// a few changes go back to the peer and are dropped there as duplicates.
const RECEIVED_MAX: usize = 65_536;

fn to_wire(hashes: &[ChangeHash]) -> Vec<Hash> {
    hashes.iter().map(|h| h.0).collect()
}

fn from_wire(hashes: &[Hash]) -> Vec<ChangeHash> {
    hashes.iter().map(|h| ChangeHash(*h)).collect()
}

impl Session {
    /// Starts a session; its `Hello` is ready to send at once.
    pub fn new(config: SessionConfig, now: Instant) -> Session {
        let mut session = Session {
            deadline: Some(now + config.handshake_timeout),
            config,
            phase: Phase::AwaitHello,
            decoder: FrameDecoder::new(),
            transmits: VecDeque::new(),
            ack_at_back: None,
            peer_bundles: false,
            peer_txn_ask: false,
            peer_escrow: false,
            txn_asked: HashSet::new(),
            held_this_turn: false,
            events: VecDeque::new(),
            stats: SessionStats::default(),
            items: None,
            reconciled: HashSet::new(),
            haves_sent: HashSet::new(),
            reconcile_done: false,
            next_batch: 1,
            unacked: BTreeMap::new(),
            unacked_bytes: HashMap::new(),
            live_queue: BTreeMap::new(),
            live_queue_bytes: 0,
            catchup_queue: VecDeque::new(),
            catchup_queued: HashSet::new(),
            peer_has: HashMap::new(),
            received: HashSet::new(),
        };
        session.send(
            Lane::Control,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                site: session.config.local.clone(),
                capabilities: if session.config.bundles {
                    capabilities::RANGE_RECONCILE
                        | capabilities::BUNDLES
                        | capabilities::TXN_ASK
                        | capabilities::ESCROW
                } else {
                    capabilities::RANGE_RECONCILE | capabilities::TXN_ASK | capabilities::ESCROW
                },
            },
        );
        session
    }

    /// The peer this session is for.
    pub fn peer(&self) -> &SiteName {
        &self.config.peer
    }

    /// True once the peer's `Hello` was accepted and until the session closes.
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// True once the session ended.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// True when reconciliation finished on both sides.
    pub fn is_reconciled(&self) -> bool {
        self.reconcile_done
    }

    /// True when nothing is queued, in flight or waiting to be sent.
    pub fn is_idle(&self) -> bool {
        self.transmits.is_empty()
            && self.unacked.is_empty()
            && self.live_queue.is_empty()
            && self.catchup_queue.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Live bytes queued or in flight (for status: pending out).
    pub fn pending_out_bytes(&self) -> usize {
        self.live_queue_bytes + self.unacked_bytes.values().sum::<usize>()
    }

    /// The next frame to send and its lane.
    ///
    /// Control frames that queued together go out as one compressed bundle
    /// when the peer accepts bundles and they total at least
    /// [`wire::BUNDLE_COMPRESS_BYTES_MIN`]. Live pushes go out as they are:
    /// they are sent one at a time, and latency comes first.
    pub fn poll_transmit(&mut self) -> Option<(Lane, Vec<u8>)> {
        if self.peer_bundles {
            let together = self
                .transmits
                .iter()
                .take_while(|(lane, _)| *lane == Lane::Control)
                .scan(0usize, |bytes, (_, frame)| {
                    *bytes += frame.len();
                    (*bytes <= wire::BUNDLE_BYTES_MAX).then_some(frame.len())
                });
            let (count, bytes) = together.fold((0, 0), |(n, b), len| (n + 1, b + len));
            if bytes >= wire::BUNDLE_COMPRESS_BYTES_MIN {
                let frames: Vec<&[u8]> = self
                    .transmits
                    .iter()
                    .take(count)
                    .map(|(_, frame)| frame.as_slice())
                    .collect();
                let bundle = wire::bundle(&frames);
                self.transmits.drain(..count);
                return Some(self.transmitted(Lane::Control, bundle));
            }
        }
        let (lane, frame) = self.transmits.pop_front()?;
        Some(self.transmitted(lane, frame))
    }

    fn transmitted(&mut self, lane: Lane, frame: Vec<u8>) -> (Lane, Vec<u8>) {
        if self.transmits.is_empty() {
            self.ack_at_back = None;
        }
        self.stats.bytes_sent += frame.len() as u64;
        (lane, frame)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Session::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// Closes the session locally.
    pub fn close(&mut self, code: u16, reason: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        self.send(
            Lane::Control,
            &Message::Close {
                code,
                reason: reason.to_owned(),
            },
        );
        self.finish(code, reason.to_owned(), false);
    }

    /// Advances timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| now >= d) && self.phase == Phase::AwaitHello {
            self.close(close_code::PROTOCOL_ERROR, "no hello from the peer in time");
        }
    }

    /// Feeds bytes received from the peer (any split).
    ///
    /// `now` is the arrival time; no message needs it yet, but callers pass
    /// it so timers can depend on traffic without an API change.
    pub fn handle_bytes(&mut self, now: Instant, host: &dyn Host, bytes: &[u8]) {
        self.handle_bytes_unflushed(now, host, bytes);
        host.flush();
        if std::mem::take(&mut self.held_this_turn) {
            self.ask_about_held(host);
        }
    }

    fn handle_bytes_unflushed(&mut self, _now: Instant, host: &dyn Host, bytes: &[u8]) {
        if self.phase == Phase::Closed {
            return;
        }
        self.stats.bytes_received += bytes.len() as u64;
        self.decoder.push(bytes);
        loop {
            match self.decoder.next_message() {
                Ok(Some(message)) => {
                    self.handle_message(host, message);
                    if self.phase == Phase::Closed {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.close(close_code::PROTOCOL_ERROR, &e.to_string());
                    return;
                }
            }
        }
    }

    /// Feeds one already-decoded frame payload (for transports that frame
    /// messages themselves).
    pub fn handle_frame(&mut self, now: Instant, host: &dyn Host, payload: &[u8]) {
        self.handle_frames(now, host, std::slice::from_ref(&payload));
    }

    /// Feeds frame payloads that arrived together, in order. Whole
    /// documents among them that follow one another are applied together.
    pub fn handle_frames<P: AsRef<[u8]>>(&mut self, now: Instant, host: &dyn Host, payloads: &[P]) {
        self.handle_frames_unflushed(now, host, payloads);
        host.flush();
        // The other members of a transaction usually come in the same
        // turn: only those still missing once it is applied are worth a
        // question.
        if std::mem::take(&mut self.held_this_turn) {
            self.ask_about_held(host);
        }
    }

    fn handle_frames_unflushed<P: AsRef<[u8]>>(
        &mut self,
        _now: Instant,
        host: &dyn Host,
        payloads: &[P],
    ) {
        let mut snapshots: Vec<(DocId, Vec<u8>, u64)> = Vec::new();
        for payload in payloads {
            let payload = payload.as_ref();
            self.stats.bytes_received += payload.len() as u64 + 4;
            if payload.first() != Some(&wire::WIRE_BUNDLE) {
                self.handle_payload(host, payload, &mut snapshots);
                continue;
            }
            let frames = match wire::unbundle(payload) {
                Ok(frames) => frames,
                Err(e) => return self.protocol_error(host, &mut snapshots, &e),
            };
            for inner in wire::frames_in(&frames) {
                match inner {
                    Ok(inner) => self.handle_payload(host, inner, &mut snapshots),
                    Err(e) => return self.protocol_error(host, &mut snapshots, &e),
                }
            }
        }
        self.on_snapshots(host, &mut snapshots);
    }

    /// One plain frame payload; whole documents wait in `snapshots` until
    /// something else arrives.
    fn handle_payload(
        &mut self,
        host: &dyn Host,
        payload: &[u8],
        snapshots: &mut Vec<(DocId, Vec<u8>, u64)>,
    ) {
        if self.phase == Phase::Closed {
            return;
        }
        match wire::decode_payload(payload) {
            Ok(Message::Snapshot { doc, bytes, batch }) if self.phase == Phase::Open => {
                snapshots.push((doc, bytes, batch));
                // Each is loaded to be checked: bound what one write holds.
                if snapshots.len() >= SNAPSHOTS_PER_WRITE_MAX {
                    self.on_snapshots(host, snapshots);
                }
            }
            Ok(message) => {
                self.on_snapshots(host, snapshots);
                if self.phase != Phase::Closed {
                    self.handle_message(host, message);
                }
            }
            Err(e) => self.protocol_error(host, snapshots, &e),
        }
    }

    /// Applies what arrived intact before a malformed frame, then closes.
    fn protocol_error(
        &mut self,
        host: &dyn Host,
        snapshots: &mut Vec<(DocId, Vec<u8>, u64)>,
        error: &WireError,
    ) {
        self.on_snapshots(host, snapshots);
        self.close(close_code::PROTOCOL_ERROR, &error.to_string());
    }

    /// Asks the peer for rights of a bounded counter (see
    /// [`crate::Replica::ask_rights`]); nothing happens when the session is
    /// not open, the peer does not understand the request, or the document
    /// is outside what the two sites exchange.
    pub fn ask_rights(&mut self, wanted: &crate::RightsWanted) {
        if self.phase != Phase::Open
            || !self.peer_escrow
            || wanted.amount <= 0
            || !self.config.scope.may_receive(&wanted.doc)
            || wanted.pointer.len() > super::wire::RIGHTS_POINTER_BYTES_MAX
        {
            return;
        }
        let pool = match wanted.pool {
            crate::escrow::PoolKind::Down => 0,
            crate::escrow::PoolKind::Up => 1,
        };
        self.send(
            Lane::Live,
            &Message::RightsAsk {
                doc: wanted.doc.clone(),
                pointer: wanted.pointer.clone(),
                pool,
                amount: wanted.amount,
            },
        );
    }

    /// Offers a locally durable commit (any origin) for live push.
    pub fn handle_committed(&mut self, host: &dyn Host, committed: &Committed) {
        // Only what this session received is known to be at the peer. A
        // change the peer sent over an earlier connection may be lost with
        // it: changes leave a site before its own write of them is durable,
        // so a peer killed meanwhile restarts without them, and they must
        // go back to it like any other.
        let received_here = committed.origin == Origin::Peer(self.config.peer.clone())
            && self.take_received(&committed.hashes);
        if self.phase == Phase::Closed || !self.config.scope.may_send(&committed.doc) {
            return;
        }
        if received_here {
            // Remember so catch-up skips them.
            self.learn_peer_has(&committed.doc, &committed.hashes);
            return;
        }
        if self.phase != Phase::Open {
            // Reconciliation after the handshake will find this document.
            return;
        }
        let bytes: usize = committed.changes.iter().map(Vec::len).sum();
        if committed.changes.is_empty()
            || self.live_queue_bytes + bytes > self.config.live_queue_bytes_max
        {
            // A whole document arrived in saved form (no change bytes to
            // forward), or too much is queued: offer our heads and let the
            // peer pull what it lacks, which needs no memory per change.
            self.send_have(host, &committed.doc, false);
            return;
        }
        self.live_queue_bytes += bytes;
        self.live_queue
            .entry(committed.doc.clone())
            .or_default()
            .extend(committed.changes.iter().cloned());
        self.pump_live();
    }

    fn handle_message(&mut self, host: &dyn Host, message: Message) {
        match (self.phase, message) {
            (
                Phase::AwaitHello,
                Message::Hello {
                    version,
                    site,
                    capabilities: caps,
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    return self.close(
                        close_code::VERSION,
                        &format!("protocol version {version} is not {PROTOCOL_VERSION}"),
                    );
                }
                if site != self.config.peer {
                    return self.close(
                        close_code::IDENTITY,
                        &format!("peer says it is {site}, expected {}", self.config.peer),
                    );
                }
                if caps & capabilities::RANGE_RECONCILE == 0 {
                    return self.close(close_code::VERSION, "peer lacks range reconciliation");
                }
                self.peer_bundles = self.config.bundles && caps & capabilities::BUNDLES != 0;
                self.peer_txn_ask = caps & capabilities::TXN_ASK != 0;
                self.peer_escrow = caps & capabilities::ESCROW != 0;
                self.phase = Phase::Open;
                self.deadline = None;
                self.events.push_back(Event::Connected { peer: site });
                self.start_reconcile(host);
            }
            (Phase::AwaitHello, Message::Close { code, reason }) => self.finish(code, reason, true),
            (Phase::AwaitHello, other) => self.close(
                close_code::PROTOCOL_ERROR,
                &format!("{} before hello", other.kind()),
            ),
            (Phase::Open, Message::Hello { .. }) => {
                self.close(close_code::PROTOCOL_ERROR, "second hello")
            }
            (Phase::Open, Message::Reconcile(round)) => self.on_reconcile(host, &round),
            (Phase::Open, Message::ReconcileDone) => {
                self.reconcile_done = true;
                self.maybe_reconciled();
                self.maybe_synced(host);
            }
            (Phase::Open, Message::Have { doc, heads, reply }) => {
                self.on_have(host, doc, from_wire(&heads), reply)
            }
            (Phase::Open, Message::Sample { doc, hashes }) => {
                self.on_sample(host, doc, from_wire(&hashes))
            }
            (Phase::Open, Message::Base { doc, hashes }) => {
                self.on_base(host, doc, from_wire(&hashes))
            }
            (
                Phase::Open,
                Message::Changes {
                    doc,
                    changes,
                    batch,
                },
            ) => self.on_changes(host, doc, Payload::Changes(&changes), batch),
            (Phase::Open, Message::Snapshot { doc, bytes, batch }) => {
                self.on_changes(host, doc, Payload::Snapshot(&bytes), batch)
            }
            (Phase::Open, Message::Ack { batch }) => self.on_ack(host, batch),
            (Phase::Open, Message::TxnAsk { txn, docs }) => {
                // Only what never comes from here: outside what this site
                // replicates or sends the peer. Never "not yet".
                let never: Vec<DocId> = docs
                    .into_iter()
                    .filter(|doc| !self.config.scope.may_send(doc) || !host.replicates(doc))
                    .collect();
                if !never.is_empty() {
                    self.send(Lane::Control, &Message::TxnNone { txn, docs: never });
                }
            }
            (Phase::Open, Message::TxnNone { txn, docs }) => {
                host.txn_not_from(&self.config.peer, TxnId(txn), &docs)
            }
            (
                Phase::Open,
                Message::RightsAsk {
                    doc,
                    pointer,
                    pool,
                    amount,
                },
            ) => {
                // A grant the peer may not receive would strand the rights.
                if self.config.scope.may_send(&doc) {
                    let pool = if pool == 0 {
                        crate::escrow::PoolKind::Down
                    } else {
                        crate::escrow::PoolKind::Up
                    };
                    host.grant_rights(&self.config.peer, &doc, &pointer, pool, amount);
                }
            }
            (Phase::Open, Message::Close { code, reason }) => self.finish(code, reason, true),
            (Phase::Closed, _) => {}
        }
    }

    fn start_reconcile(&mut self, host: &dyn Host) {
        let items = host
            .index()
            .into_iter()
            .filter(|(doc, _)| self.config.scope.covers(doc))
            .map(|(doc, heads)| {
                let raw: Vec<[u8; 32]> = heads.iter().map(|h| h.0).collect();
                let hash = item_hash(&doc, &raw);
                (doc, hash)
            });
        let items = match ItemSet::new(items) {
            Ok(items) => items,
            Err(e) => return self.close(close_code::INTERNAL, &format!("index: {e}")),
        };
        if self.config.local < self.config.peer {
            // Documents changed here since the peer last held everything
            // are listed up front: when they are all that differs, one
            // round trip settles the rest.
            let first = match host.changed_since_synced(&self.config.peer) {
                Some(changed) => items.initiate_hinted(&changed),
                None => items.initiate(),
            };
            self.stats.reconcile_messages_sent += 1;
            self.send(Lane::Control, &Message::Reconcile(first));
        }
        self.items = Some(items);
    }

    fn on_reconcile(&mut self, host: &dyn Host, round: &super::reconcile::RangeMessage) {
        let Some(items) = &self.items else {
            return self.close(close_code::PROTOCOL_ERROR, "reconcile before hello");
        };
        let (reply, differences) = match items.respond(round) {
            Ok(outcome) => outcome,
            Err(e) => return self.close(close_code::PROTOCOL_ERROR, &format!("reconcile: {e}")),
        };
        match reply {
            Some(reply) => {
                self.stats.reconcile_messages_sent += 1;
                self.send(Lane::Control, &Message::Reconcile(reply));
            }
            None => {
                self.send(Lane::Control, &Message::ReconcileDone);
                self.reconcile_done = true;
            }
        }
        let told: HashSet<DocId> = differences.told.into_iter().collect();
        let listed: HashMap<DocId, ShortHash> = differences.listed_by_peer.into_iter().collect();
        let docs = differences
            .differ
            .into_iter()
            .chain(differences.only_mine)
            .chain(differences.only_theirs);
        for doc in docs {
            if !self.reconciled.insert(doc.clone()) {
                continue;
            }
            if told.contains(&doc) {
                // Our list tells the peer; it answers with changes or with
                // its heads.
                continue;
            }
            if let Some(theirs) = listed.get(&doc) {
                // The peer listed its state: when that is one of ours, we
                // know its heads and send what it lacks at once.
                if let Some(heads) = host.heads_of_state(&doc, theirs) {
                    self.learn_peer_has(&doc, &heads);
                    if self.config.scope.may_send(&doc) {
                        self.queue_catchup(host, doc, heads);
                    }
                    continue;
                }
            }
            self.haves_sent.insert(doc.clone());
            self.send_have(host, &doc, false);
        }
        self.maybe_reconciled();
        self.maybe_synced(host);
    }

    fn maybe_reconciled(&mut self) {
        if self.is_reconciled() && self.items.is_some() {
            self.items = None;
            self.events.push_back(Event::Reconciled {
                differing: self.reconciled.len(),
                messages_sent: self.stats.reconcile_messages_sent as usize,
            });
        }
    }

    fn send_have(&mut self, host: &dyn Host, doc: &DocId, reply: bool) {
        let heads = host.heads(doc).unwrap_or_default();
        self.send(
            Lane::Control,
            &Message::Have {
                doc: doc.clone(),
                heads: to_wire(&heads),
                reply,
            },
        );
    }

    fn on_have(&mut self, host: &dyn Host, doc: DocId, theirs: Vec<ChangeHash>, reply: bool) {
        if !self.config.scope.covers(&doc) {
            return self.reject(doc, "outside the replication scope");
        }
        let known = match host.known(&doc, &theirs) {
            Ok(known) => known,
            Err(e) => return self.host_error(e),
        };
        if known.len() == theirs.len() {
            // We know everything the peer has: send what it lacks. Its own
            // word replaces what we inferred: it drops changes whose
            // dependencies it lacks (they can overtake them on the other
            // lane) and says so with this `Have`, so a change we sent is
            // not necessarily one it holds. At worst changes still in
            // flight go again and are dropped there as duplicates.
            self.peer_has.insert(doc.clone(), theirs.clone());
            if self.config.scope.may_send(&doc) {
                self.queue_catchup(host, doc, theirs);
            }
        } else if !reply {
            // The peer has changes we lack: tell it what we have, unless our
            // own `Have` is already on its way, in which case the peer acts
            // on that (sends what we lack, or answers with its heads when it
            // lacks some of ours too); the side whose name sorts first still
            // answers, so that one side always reaches the sampling below.
            let ours_sent = self.haves_sent.contains(&doc);
            if !ours_sent || self.config.local < self.config.peer {
                self.send_have(host, &doc, true);
            }
        } else {
            // Both sides hold changes the other lacks: find a common base.
            match host.sample(&doc) {
                Ok(sample) => {
                    let sample: Vec<ChangeHash> =
                        sample.into_iter().take(HASHES_PER_MESSAGE_MAX).collect();
                    self.send(
                        Lane::Control,
                        &Message::Sample {
                            doc,
                            hashes: to_wire(&sample),
                        },
                    );
                }
                Err(e) => self.host_error(e),
            }
        }
    }

    fn on_sample(&mut self, host: &dyn Host, doc: DocId, sample: Vec<ChangeHash>) {
        if !self.config.scope.covers(&doc) {
            return self.reject(doc, "outside the replication scope");
        }
        let base = match host.known(&doc, &sample) {
            Ok(known) => known,
            Err(e) => return self.host_error(e),
        };
        self.send(
            Lane::Control,
            &Message::Base {
                doc: doc.clone(),
                hashes: to_wire(&base),
            },
        );
        if self.config.scope.may_send(&doc) {
            self.queue_catchup(host, doc, base);
        }
    }

    fn on_base(&mut self, host: &dyn Host, doc: DocId, base: Vec<ChangeHash>) {
        if !self.config.scope.covers(&doc) {
            return self.reject(doc, "outside the replication scope");
        }
        // Never trust heads from the wire: keep only those we hold.
        let base = match host.known(&doc, &base) {
            Ok(known) => known,
            Err(e) => return self.host_error(e),
        };
        if self.config.scope.may_send(&doc) {
            self.queue_catchup(host, doc, base);
        }
    }

    fn on_changes(&mut self, host: &dyn Host, doc: DocId, payload: Payload<'_>, batch: u64) {
        if !self.config.scope.may_receive(&doc) {
            self.stats.batches_received += 1;
            self.reject(doc, "the peer may not write this document");
            self.send_ack(batch);
            return;
        }
        let applied = match payload {
            Payload::Changes(changes) => host.apply_batched(&doc, changes, &self.config.peer),
            Payload::Snapshot(bytes) => host.apply_snapshot(&doc, bytes, &self.config.peer),
        };
        self.on_applied(host, doc, applied, batch);
    }

    /// Whole documents received back to back, applied together (one
    /// durable write for those new here), then acknowledged in order.
    fn on_snapshots(&mut self, host: &dyn Host, pending: &mut Vec<(DocId, Vec<u8>, u64)>) {
        if pending.is_empty() {
            return;
        }
        let mut allowed: Vec<(DocId, &[u8])> = Vec::new();
        for (doc, bytes, _) in pending.iter() {
            if self.config.scope.may_receive(doc) {
                allowed.push((doc.clone(), bytes.as_slice()));
            }
        }
        let mut results = host
            .apply_snapshots(&allowed, &self.config.peer)
            .into_iter();
        for (doc, _, batch) in std::mem::take(pending) {
            if self.phase == Phase::Closed {
                return;
            }
            if !self.config.scope.may_receive(&doc) {
                self.stats.batches_received += 1;
                self.reject(doc, "the peer may not write this document");
                self.send_ack(batch);
                continue;
            }
            let applied = results.next().unwrap_or_else(|| {
                Err(Error::Store(crate::store::StoreError::Backend(
                    "the host returned too few results".to_owned(),
                )))
            });
            self.on_applied(host, doc, applied, batch);
        }
    }

    fn on_applied(
        &mut self,
        host: &dyn Host,
        doc: DocId,
        applied: Result<Applied, Error>,
        batch: u64,
    ) {
        self.stats.batches_received += 1;
        match applied {
            Ok(applied) => {
                if !applied.held.is_empty() {
                    // They are published when their transaction is whole;
                    // that commit then comes back here as received.
                    if self.received.len() + applied.held.len() > RECEIVED_MAX {
                        self.received.clear();
                    }
                    self.received.extend(applied.held.iter().copied());
                    self.held_this_turn = true;
                }
                if !applied.applied.is_empty() {
                    if self.received.len() + applied.applied.len() > RECEIVED_MAX {
                        self.received.clear();
                    }
                    self.received.extend(applied.applied.iter().copied());
                    self.stats.changes_applied += applied.applied.len() as u64;
                    self.events.push_back(Event::Applied {
                        doc: doc.clone(),
                        changes: applied.applied.len(),
                    });
                }
                if !applied.missing_deps.is_empty() {
                    // Arrived ahead of changes they depend on (lanes
                    // reorder): ask for a catch-up from our heads.
                    self.send_have(host, &doc, false);
                }
            }
            Err(Error::BadChange { reason, .. }) => {
                self.reject(doc, &format!("malformed change: {reason}"))
            }
            Err(e) => return self.host_error(e),
        }
        self.send_ack(batch);
        self.maybe_synced(host);
    }

    fn on_ack(&mut self, host: &dyn Host, batch: u64) {
        let acked: Vec<u64> = self.unacked.range(..=batch).map(|(b, _)| *b).collect();
        for b in acked {
            if let Some((lane, bytes)) = self.unacked.remove(&b) {
                let entry = self.unacked_bytes.entry(lane).or_default();
                *entry = entry.saturating_sub(bytes);
            }
        }
        self.pump_live();
        self.pump_catchup(host);
        self.maybe_synced(host);
    }

    /// Tells the host when reconciliation is over and nothing sent is
    /// waiting for an ack or queued: the peer then holds what this side
    /// had (as far as it can tell; the mark only steers hints).
    /// Asks the peer, once per transaction, which missing members of the
    /// transactions held with its changes it will never send.
    fn ask_about_held(&mut self, host: &dyn Host) {
        if !self.peer_txn_ask {
            return;
        }
        for (txn, docs) in host.held_missing(&self.config.peer) {
            if self.txn_asked.len() >= TXN_ASKS_MAX {
                return;
            }
            if docs.is_empty() || !self.txn_asked.insert(txn) {
                continue;
            }
            self.send(Lane::Control, &Message::TxnAsk { txn: txn.0, docs });
        }
    }

    fn maybe_synced(&mut self, host: &dyn Host) {
        if self.is_reconciled()
            && self.unacked.is_empty()
            && self.live_queue.is_empty()
            && self.catchup_queue.is_empty()
        {
            host.mark_synced(&self.config.peer);
        }
    }

    fn queue_catchup(&mut self, host: &dyn Host, doc: DocId, base: Vec<ChangeHash>) {
        if self.catchup_queued.insert(doc.clone()) {
            self.catchup_queue.push_back((doc, base));
        }
        self.pump_catchup(host);
    }

    /// Sends queued catch-up work while the catch-up window has room.
    fn pump_catchup(&mut self, host: &dyn Host) {
        while self.in_flight(Lane::Control) < self.config.catchup_window_bytes {
            let Some((doc, mut base)) = self.catchup_queue.pop_front() else {
                return;
            };
            self.catchup_queued.remove(&doc);
            // Skip what the peer is known to hold already, when we know it too.
            if let Some(peer_has) = self.peer_has.get(&doc) {
                if let Ok(known) = host.known(&doc, peer_has) {
                    base.extend(known);
                    base.sort();
                    base.dedup();
                }
            }
            if base.is_empty() {
                // The peer holds none of it: the saved form is far cheaper
                // to produce and to apply than the changes one by one.
                match host.snapshot(&doc) {
                    Ok((bytes, heads)) if bytes.len() <= SNAPSHOT_BYTES_MAX => {
                        self.learn_peer_has(&doc, &heads);
                        self.send_snapshot(doc, bytes);
                        continue;
                    }
                    Ok(_) => {}
                    Err(Error::NotFound(_)) => continue,
                    Err(e) => return self.host_error(e),
                }
            }
            let changes = match host.changes_after(&doc, &base) {
                Ok(changes) => changes,
                Err(Error::NotFound(_)) => continue,
                Err(e) => return self.host_error(e),
            };
            // Streams are reliable: once sent, the peer will hold these.
            if let Some(heads) = host.heads(&doc) {
                self.learn_peer_has(&doc, &heads);
            }
            self.send_changes(Lane::Control, doc, changes);
        }
    }

    /// Sends queued live changes while the live window has room.
    fn pump_live(&mut self) {
        while self.in_flight(Lane::Live) < self.config.live_window_bytes {
            let Some((doc, changes)) = self.live_queue.pop_first() else {
                return;
            };
            let bytes: usize = changes.iter().map(Vec::len).sum();
            self.live_queue_bytes = self.live_queue_bytes.saturating_sub(bytes);
            self.send_changes(Lane::Live, doc, changes);
        }
    }

    /// Sends changes of one document, cut into messages under the limits.
    fn send_changes(&mut self, lane: Lane, doc: DocId, changes: Vec<Vec<u8>>) {
        let mut chunk: Vec<Vec<u8>> = Vec::new();
        let mut chunk_bytes = 0;
        for change in changes {
            if !chunk.is_empty()
                && (chunk_bytes + change.len() > MESSAGE_CHANGE_BYTES_TARGET
                    || chunk.len() == CHANGES_PER_MESSAGE_MAX)
            {
                self.send_batch(lane, doc.clone(), std::mem::take(&mut chunk), chunk_bytes);
                chunk_bytes = 0;
            }
            chunk_bytes += change.len();
            chunk.push(change);
        }
        if !chunk.is_empty() {
            self.send_batch(lane, doc, chunk, chunk_bytes);
        }
    }

    fn send_snapshot(&mut self, doc: DocId, bytes: Vec<u8>) {
        let batch = self.next_batch;
        self.next_batch += 1;
        self.stats.batches_sent += 1;
        self.stats.snapshots_sent += 1;
        self.unacked.insert(batch, (Lane::Control, bytes.len()));
        *self.unacked_bytes.entry(Lane::Control).or_default() += bytes.len();
        self.send(Lane::Control, &Message::Snapshot { doc, bytes, batch });
    }

    fn send_batch(&mut self, lane: Lane, doc: DocId, changes: Vec<Vec<u8>>, bytes: usize) {
        let batch = self.next_batch;
        self.next_batch += 1;
        self.stats.batches_sent += 1;
        self.stats.changes_sent += changes.len() as u64;
        self.unacked.insert(batch, (lane, bytes));
        *self.unacked_bytes.entry(lane).or_default() += bytes;
        self.send(
            lane,
            &Message::Changes {
                doc,
                changes,
                batch,
            },
        );
    }

    /// Whether this session applied all of `hashes` (and forgets them).
    fn take_received(&mut self, hashes: &[ChangeHash]) -> bool {
        let mut all = !hashes.is_empty();
        for hash in hashes {
            all &= self.received.remove(hash);
        }
        all
    }

    fn learn_peer_has(&mut self, doc: &DocId, hashes: &[ChangeHash]) {
        let known = self.peer_has.entry(doc.clone()).or_default();
        known.extend_from_slice(hashes);
        known.sort();
        known.dedup();
        if known.len() > HASHES_PER_MESSAGE_MAX {
            // Forget older knowledge: at worst some changes are resent and
            // dropped as duplicates.
            *known = hashes.to_vec();
        }
    }

    fn in_flight(&self, lane: Lane) -> usize {
        self.unacked_bytes.get(&lane).copied().unwrap_or(0)
    }

    fn reject(&mut self, doc: DocId, reason: &str) {
        self.events.push_back(Event::Rejected {
            doc,
            reason: reason.to_owned(),
        });
    }

    fn host_error(&mut self, error: Error) {
        self.close(close_code::INTERNAL, &format!("local failure: {error}"));
    }

    fn send(&mut self, lane: Lane, message: &Message) {
        self.ack_at_back = None;
        self.transmits.push_back((lane, wire::encode(message)));
    }

    /// Acknowledges every batch up to `batch`, merging with an `Ack` still
    /// waiting at the back of the queue: acknowledgements are cumulative,
    /// so one carrying the higher batch says all both would.
    fn send_ack(&mut self, batch: u64) {
        let mut batch = batch;
        if let Some(queued) = self.ack_at_back {
            self.transmits.pop_back();
            batch = batch.max(queued);
        }
        self.send(Lane::Control, &Message::Ack { batch });
        self.ack_at_back = Some(batch);
    }

    fn finish(&mut self, code: u16, reason: String, by_peer: bool) {
        self.phase = Phase::Closed;
        self.deadline = None;
        self.live_queue.clear();
        self.live_queue_bytes = 0;
        self.catchup_queue.clear();
        self.catchup_queued.clear();
        self.events.push_back(Event::Closed {
            code,
            reason,
            by_peer,
        });
    }
}
