//! What a running node reports about itself over time: the sequence-numbered
//! event log behind `GET /v1/events` (document changes, conflict reports
//! opening and closing, and peers going up or down), the view of peer sites
//! behind `GET /v1/status` (connection, pending bytes, replication lag), and
//! the background task that feeds both and keeps the peer, replication and
//! conflict metrics current.
//!
//! The log keeps the last [`EVENTS_KEPT_MAX`] events in a ring so that a
//! client that reconnects with `Last-Event-ID` gets what it missed; a
//! client whose id fell out of the ring, or who reads slower than events
//! arrive, is told so with a `reset` event instead of silently missing
//! events.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use archipelago::conflict::Conflict;
use archipelago::transport::quic::{PeerStatus, SyncEndpoint};
use archipelago::{Committed, Origin, Replica, SiteName};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::api::telemetry;

/// Events kept for clients that resume with `Last-Event-ID`.
pub const EVENTS_KEPT_MAX: usize = 10_000;
/// Live events queued for one client; a client further behind gets a
/// `reset` event and continues from the newest events.
pub const EVENTS_QUEUED_PER_CLIENT_MAX: usize = 1024;
/// How often the feed polls the sync endpoint for peer state.
pub const PEER_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The kind of an event, its SSE `event:` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// Changes became durable in a document: `{"doc", "heads", "origin",
    /// "changes"}`, where `origin` is `local` or the site they came from,
    /// and `changes` counts them (0 when the document arrived whole, as a
    /// saved document: then only `heads` says what is new).
    Change,
    /// A conflict report opened here (detected here or arrived from a
    /// peer) or its status changed: the whole report, as `GET
    /// /v1/conflicts/{id}` answers it.
    Conflict,
    /// A peer site connected or disconnected: `{"site", "connected"}`.
    /// Peer state is polled every [`PEER_POLL_INTERVAL`], so a connection
    /// that comes and goes between two polls is not reported.
    Peer,
    /// A saga changed here (a step of this site ran, or another site's
    /// step arrived): the saga as `GET /v1/sagas/{id}` answers it.
    Saga,
    /// Events were lost: the reader should re-read the state it follows.
    Reset,
}

impl EventKind {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Change => "change",
            EventKind::Conflict => "conflict",
            EventKind::Peer => "peer",
            EventKind::Saga => "saga",
            EventKind::Reset => "reset",
        }
    }
}

/// One event of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEvent {
    /// Sequence number, increasing through the node's run.
    pub id: u64,
    /// What happened.
    pub kind: EventKind,
    /// The details, as JSON.
    pub data: Value,
}

/// What a new reader of the log gets.
#[derive(Debug)]
pub struct Subscription {
    /// Events were lost between the reader's last id and `replay`; the
    /// reader should first be sent a `reset` with id `reset_id`.
    pub reset_id: Option<u64>,
    /// Kept events after the reader's last id, oldest first.
    pub replay: Vec<Arc<NodeEvent>>,
    /// Events published after `replay`.
    pub live: broadcast::Receiver<Arc<NodeEvent>>,
}

struct Ring {
    /// The id the next event gets.
    next_id: u64,
    kept: VecDeque<Arc<NodeEvent>>,
}

/// The node's event log: assigns sequence ids, keeps the newest events in a
/// bounded ring, and fans them out to live readers.
pub struct EventLog {
    ring: Mutex<Ring>,
    kept_max: usize,
    live: broadcast::Sender<Arc<NodeEvent>>,
    closed: watch::Sender<bool>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = self.ring();
        f.debug_struct("EventLog")
            .field("next_id", &ring.next_id)
            .field("kept", &ring.kept.len())
            .finish_non_exhaustive()
    }
}

impl Default for EventLog {
    fn default() -> EventLog {
        EventLog::new(EVENTS_KEPT_MAX, EVENTS_QUEUED_PER_CLIENT_MAX)
    }
}

impl EventLog {
    /// A log keeping `kept_max` events, queueing at most `queued_max` live
    /// events per reader.
    ///
    /// Ids start at the wall-clock time in milliseconds times 1000, not at
    /// 1, so that an id remembered from an earlier run of the node is older
    /// than every id of this run: a client resuming across a restart gets a
    /// `reset` instead of silently skipping this run's first events. (The
    /// ids stay below 2^53, exact in JavaScript, until about 2255.)
    pub fn new(kept_max: usize, queued_max: usize) -> EventLog {
        let since_epoch_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        EventLog::starting_at(
            since_epoch_ms.saturating_mul(1000) + 1,
            kept_max,
            queued_max,
        )
    }

    fn starting_at(first_id: u64, kept_max: usize, queued_max: usize) -> EventLog {
        let (live, _) = broadcast::channel(queued_max.max(1));
        let (closed, _) = watch::channel(false);
        EventLog {
            ring: Mutex::new(Ring {
                next_id: first_id,
                kept: VecDeque::with_capacity(kept_max.min(1024)),
            }),
            kept_max: kept_max.max(1),
            live,
            closed,
        }
    }

    fn ring(&self) -> MutexGuard<'_, Ring> {
        // The ring is consistent after every statement, so a panic while
        // holding the lock leaves it usable.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an event and hands it to the live readers; returns its id.
    pub fn publish(&self, kind: EventKind, data: Value) -> u64 {
        let mut ring = self.ring();
        let id = ring.next_id;
        ring.next_id += 1;
        let event = Arc::new(NodeEvent { id, kind, data });
        if ring.kept.len() == self.kept_max {
            ring.kept.pop_front();
        }
        ring.kept.push_back(event.clone());
        // Sent under the lock, so a reader subscribing concurrently sees
        // each event exactly once: in its replay or live, never both.
        let _ = self.live.send(event);
        id
    }

    /// The id of the newest event, if any was published.
    pub fn last_id(&self) -> Option<u64> {
        self.ring().kept.back().map(|event| event.id)
    }

    /// Starts reading: with `after`, the kept events after that id, and
    /// whether events between it and the oldest kept one were lost (an id
    /// this log never issued, such as one from an earlier run, counts as
    /// lost too); without, only events published from now on.
    pub fn subscribe(&self, after: Option<u64>) -> Subscription {
        let ring = self.ring();
        let live = self.live.subscribe();
        let Some(after) = after else {
            return Subscription {
                reset_id: None,
                replay: Vec::new(),
                live,
            };
        };
        let oldest = ring.kept.front().map_or(ring.next_id, |event| event.id);
        let lost = after.saturating_add(1) < oldest || after >= ring.next_id;
        let replay = ring
            .kept
            .iter()
            .filter(|event| lost || event.id > after)
            .cloned()
            .collect();
        Subscription {
            // After the reset the reader stands just before the replay.
            reset_id: lost.then(|| oldest - 1),
            replay,
            live,
        }
    }

    /// Ends every reader's stream (the node is stopping).
    pub fn close(&self) {
        let _ = self.closed.send(true);
    }

    /// Resolves once [`EventLog::close`] was called.
    pub async fn closed(&self) {
        let mut closed = self.closed.subscribe();
        let _ = closed.wait_for(|closed| *closed).await;
    }
}

/// The data of a `change` event.
fn change_data(committed: &Committed) -> Value {
    let mut data = json!({
        "doc": committed.doc.as_str(),
        "heads": committed.heads.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        "origin": origin_label(&committed.origin),
        "changes": committed.changes.len(),
    });
    if let Some(first) = committed.txns.first() {
        data["txn"] = Value::String(first.to_string());
    }
    if committed.txns.len() > 1 {
        data["txns"] = json!(committed.txns);
    }
    data
}

/// `local`, or the site the changes came from.
fn origin_label(origin: &Origin) -> &str {
    match origin {
        Origin::Local => "local",
        Origin::Peer(site) => site.as_str(),
    }
}

/// One peer site as the node reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// What the sync endpoint reports.
    pub status: PeerStatus,
    /// Replication lag towards the peer, in milliseconds: `Some(0)` while
    /// the peer is connected and has acknowledged everything sent to it;
    /// while bytes to it are pending, or it is disconnected, the time since
    /// it was last seen so — connected with nothing pending — (`None` if it
    /// never was during this run). It bounds how stale the peer's copy of
    /// this site's changes can be, to within [`PEER_POLL_INTERVAL`], since
    /// that moment is sampled by polling.
    pub lag_ms: Option<u64>,
}

impl PeerView {
    /// The JSON of one entry of `/v1/status`'s `peers`.
    pub fn to_json(&self) -> Value {
        let status = &self.status;
        json!({
            "site": status.site.as_str(),
            "addr": status.addr.to_string(),
            "connected": status.connected,
            "last_seen": status.last_seen.map(rfc3339),
            "pending_out": status.pending_out,
            "pending_in": status.pending_in,
            "lag_ms": self.lag_ms,
        })
    }
}

/// `time` as RFC 3339 in UTC.
fn rfc3339(time: SystemTime) -> String {
    time::OffsetDateTime::from(time)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The lag of one peer (see [`PeerView::lag_ms`]), given when it was last
/// seen current; updates that moment when it is current now.
fn lag_ms(
    status: &PeerStatus,
    now: SystemTime,
    current_at: &mut Option<SystemTime>,
) -> Option<u64> {
    if status.connected && status.pending_out == 0 {
        *current_at = Some(now);
        return Some(0);
    }
    current_at.map(|at| now.duration_since(at).map_or(0, |d| d.as_millis() as u64))
}

/// The node's sync endpoint, shared by the API, the feed and the node
/// until shutdown takes it, with what is remembered between polls to
/// report replication lag.
pub struct SyncPeers {
    endpoint: Mutex<Option<SyncEndpoint>>,
    local_addr: SocketAddr,
    current_at: Mutex<BTreeMap<SiteName, SystemTime>>,
}

impl std::fmt::Debug for SyncPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncPeers")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl SyncPeers {
    /// Shares `endpoint`.
    pub fn new(
        endpoint: SyncEndpoint,
    ) -> Result<SyncPeers, archipelago::transport::quic::TransportError> {
        let local_addr = endpoint.local_addr()?;
        Ok(SyncPeers {
            endpoint: Mutex::new(Some(endpoint)),
            local_addr,
            current_at: Mutex::new(BTreeMap::new()),
        })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every listed peer, sorted by site; empty once the endpoint was
    /// taken for shutdown.
    pub fn status(&self) -> Vec<PeerView> {
        let statuses = match &*self.endpoint.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(endpoint) => endpoint.peer_status(),
            None => return Vec::new(),
        };
        let now = SystemTime::now();
        let mut current_at = self.current_at.lock().unwrap_or_else(|e| e.into_inner());
        statuses
            .into_iter()
            .map(|status| {
                let mut at = current_at.get(&status.site).copied();
                let lag_ms = lag_ms(&status, now, &mut at);
                if let Some(at) = at {
                    current_at.insert(status.site.clone(), at);
                }
                PeerView { status, lag_ms }
            })
            .collect()
    }

    /// Calls peers over the endpoint's connections (unreachable once it
    /// was taken for shutdown).
    pub fn rpc(&self) -> Option<Arc<dyn archipelago::strong::Rpc>> {
        self.endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(SyncEndpoint::rpc)
    }

    /// Answers peers' RPCs with `handler`.
    pub fn set_rpc_handler(&self, handler: Arc<dyn archipelago::strong::RpcHandler>) {
        if let Some(endpoint) = &*self.endpoint.lock().unwrap_or_else(|e| e.into_inner()) {
            endpoint.set_rpc_handler(handler);
        }
    }

    /// Takes the endpoint out, to shut it down.
    pub(crate) fn take(&self) -> Option<SyncEndpoint> {
        self.endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// Starts the task that turns the replica's commits into `change` events
/// and counts them (changes that arrived in a saved document count 0),
/// turns its conflict reports into `conflict` events and the conflict
/// metrics, and polls `peers` every [`PEER_POLL_INTERVAL`] for `peer`
/// events and the peer metrics. It ends when `log` is closed.
///
/// Subscribes to the replica before returning, so no commit or report made
/// after this call is missed.
pub fn spawn_feed(
    replica: &Replica,
    peers: Option<Arc<SyncPeers>>,
    log: Arc<EventLog>,
) -> JoinHandle<()> {
    let commits = replica.subscribe();
    let conflicts = replica.subscribe_conflicts();
    tokio::spawn(feed(replica.clone(), commits, conflicts, peers, log))
}

/// The commit put aside, else the next one from the replica.
async fn next_commit(
    pending: &mut Option<Committed>,
    commits: &mut broadcast::Receiver<Committed>,
) -> Result<Committed, broadcast::error::RecvError> {
    match pending.take() {
        Some(committed) => Ok(committed),
        None => commits.recv().await,
    }
}

/// The data of a `conflict` event: the report's JSON.
fn conflict_data(report: &Conflict) -> Value {
    serde_json::to_value(report).expect("a conflict report serializes to JSON")
}

async fn feed(
    replica: Replica,
    mut commits: broadcast::Receiver<Committed>,
    mut conflicts: broadcast::Receiver<Conflict>,
    peers: Option<Arc<SyncPeers>>,
    log: Arc<EventLog>,
) {
    let mut poll = tokio::time::interval(PEER_POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connected: BTreeMap<SiteName, bool> = BTreeMap::new();
    // A commit taken while gathering a transaction's, not yet published.
    let mut pending: Option<Committed> = None;
    let closed = log.closed();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            () = &mut closed => return,
            commit = next_commit(&mut pending, &mut commits) => match commit {
                Ok(committed) => {
                    telemetry::record_changes_applied(
                        origin_label(&committed.origin),
                        committed.changes.len(),
                    );
                    log.publish(EventKind::Change, change_data(&committed));
                    // The replica publishes a transaction's changes
                    // together: take the rest now, before any other event.
                    while !committed.txns.is_empty() {
                        match commits.try_recv() {
                            Ok(next) if next.txns.iter().any(|t| committed.txns.contains(t)) => {
                                telemetry::record_changes_applied(
                                    origin_label(&next.origin),
                                    next.changes.len(),
                                );
                                log.publish(EventKind::Change, change_data(&next));
                            }
                            Ok(other) => {
                                pending = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "the event feed fell behind the replica's commits");
                    log.publish(
                        EventKind::Reset,
                        json!({ "reason": format!("the node missed {missed} commits") }),
                    );
                }
                // The replica is gone: only peers are left to watch.
                Err(broadcast::error::RecvError::Closed) => {
                    commits = broadcast::channel(1).1;
                }
            },
            report = conflicts.recv() => match report {
                Ok(report) => {
                    telemetry::record_conflict(&report);
                    log.publish(EventKind::Conflict, conflict_data(&report));
                    // The open gauges follow every report that opens or
                    // closes, not only scrapes.
                    let replica = replica.clone();
                    let open = tokio::task::spawn_blocking(move || {
                        replica.conflicts(&archipelago::conflict::Filter {
                            status: Some(archipelago::conflict::Status::Open),
                            ..Default::default()
                        })
                    })
                    .await;
                    if let Ok(Ok(open)) = open {
                        telemetry::record_conflicts_open(&open);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "the event feed fell behind the replica's conflict reports");
                    log.publish(
                        EventKind::Reset,
                        json!({ "reason": format!("the node missed {missed} conflict reports") }),
                    );
                }
                Err(broadcast::error::RecvError::Closed) => {
                    conflicts = broadcast::channel(1).1;
                }
            },
            _ = poll.tick() => {
                telemetry::record_txn(&replica);
                telemetry::record_escrow(&replica);
                let Some(peers) = &peers else { continue };
                for view in peers.status() {
                    telemetry::record_peer(&view);
                    let site = &view.status.site;
                    let was = connected.get(site).copied().unwrap_or(false);
                    if view.status.connected != was {
                        connected.insert(site.clone(), view.status.connected);
                        log.publish(
                            EventKind::Peer,
                            json!({ "site": site.as_str(), "connected": view.status.connected }),
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(events: &[Arc<NodeEvent>]) -> Vec<u64> {
        events.iter().map(|event| event.id).collect()
    }

    #[test]
    fn a_reader_resumes_after_its_last_id_or_is_told_it_lost_events() {
        let log = EventLog::starting_at(1, 3, 8);
        for _ in 0..5 {
            log.publish(EventKind::Change, json!({}));
        }
        // Kept: 3, 4, 5.
        let resumed = log.subscribe(Some(3));
        assert_eq!(resumed.reset_id, None);
        assert_eq!(ids(&resumed.replay), vec![4, 5]);
        let just_kept = log.subscribe(Some(2));
        assert_eq!(just_kept.reset_id, None);
        assert_eq!(ids(&just_kept.replay), vec![3, 4, 5]);
        let too_old = log.subscribe(Some(1));
        assert_eq!(too_old.reset_id, Some(2));
        assert_eq!(ids(&too_old.replay), vec![3, 4, 5]);
        let unknown = log.subscribe(Some(9));
        assert_eq!(unknown.reset_id, Some(2));
        assert_eq!(ids(&unknown.replay), vec![3, 4, 5]);
        let current = log.subscribe(Some(5));
        assert_eq!(current.reset_id, None);
        assert!(current.replay.is_empty());
    }

    #[test]
    fn live_events_follow_the_replay_without_gap_or_duplicate() {
        let log = EventLog::starting_at(1, 10, 8);
        log.publish(EventKind::Change, json!({}));
        let mut fresh = log.subscribe(None);
        let mut resumed = log.subscribe(Some(0));
        assert_eq!(ids(&resumed.replay), vec![1]);
        log.publish(EventKind::Peer, json!({}));
        assert_eq!(fresh.live.try_recv().unwrap().id, 2);
        assert_eq!(resumed.live.try_recv().unwrap().id, 2);
        assert!(resumed.live.try_recv().is_err());
        assert_eq!(log.last_id(), Some(2));
    }

    #[test]
    fn ids_of_a_later_run_are_larger() {
        let first = EventLog::default();
        let id = first.publish(EventKind::Change, json!({}));
        std::thread::sleep(Duration::from_millis(2));
        let second = EventLog::default();
        assert!(second.publish(EventKind::Change, json!({})) > id);
        assert!(id < 1 << 53);
        assert!(second.subscribe(Some(id)).reset_id.is_some());
    }

    #[test]
    fn lag_is_zero_while_current_and_grows_from_the_last_current_moment() {
        let status = |connected, pending_out| PeerStatus {
            site: "eu-west".parse().unwrap(),
            addr: "127.0.0.1:1".parse().unwrap(),
            connected,
            last_seen: None,
            pending_out,
            pending_in: 0,
            traffic: Default::default(),
        };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut at = None;
        assert_eq!(lag_ms(&status(false, 0), t0, &mut at), None);
        assert_eq!(lag_ms(&status(true, 10), t0, &mut at), None);
        assert_eq!(lag_ms(&status(true, 0), t0, &mut at), Some(0));
        let later = t0 + Duration::from_millis(750);
        assert_eq!(lag_ms(&status(true, 10), later, &mut at), Some(750));
        assert_eq!(lag_ms(&status(false, 0), later, &mut at), Some(750));
        assert_eq!(lag_ms(&status(true, 0), later, &mut at), Some(0));
    }

    #[test]
    fn peer_json_has_the_status_keys() {
        let view = PeerView {
            status: PeerStatus {
                site: "eu-west".parse().unwrap(),
                addr: "127.0.0.1:7081".parse().unwrap(),
                connected: true,
                last_seen: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1500)),
                pending_out: 3,
                pending_in: 4,
                traffic: Default::default(),
            },
            lag_ms: Some(7),
        };
        assert_eq!(
            view.to_json(),
            json!({
                "site": "eu-west", "addr": "127.0.0.1:7081", "connected": true,
                "last_seen": "1970-01-01T00:00:01.5Z", "pending_out": 3, "pending_in": 4,
                "lag_ms": 7,
            })
        );
    }
}
