//! Prometheus metrics: the process-wide recorder, the middleware that counts
//! and times every request, and the `/metrics` handler.
//!
//! The `metrics` facade has one global recorder per process, while tests and
//! embedders may start several nodes in one process; the recorder is
//! therefore installed once, on first use, and shared by every node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use archipelago::conflict::{Conflict, Kind, Status};

use super::ApiState;
use crate::events::PeerView;

/// Requests answered, by route and status.
pub(crate) const HTTP_REQUESTS: &str = "archipelago_http_requests_total";
/// Request latency, by route.
pub(crate) const HTTP_REQUEST_SECONDS: &str = "archipelago_http_request_seconds";
/// Local commits made durable through the API.
pub(crate) const COMMITS: &str = "archipelago_commits_total";
/// Time from receiving a write to its commit being durable.
pub(crate) const COMMIT_SECONDS: &str = "archipelago_commit_seconds";
/// Documents stored.
pub(crate) const DOCS: &str = "archipelago_docs";
/// 1 while a session with the peer is open, else 0; by peer.
pub(crate) const PEER_CONNECTED: &str = "archipelago_peer_connected";
/// Live bytes queued or unacknowledged towards the peer; by peer.
pub(crate) const PEER_PENDING_OUT_BYTES: &str = "archipelago_peer_pending_out_bytes";
/// Received bytes from the peer waiting to be applied; by peer.
pub(crate) const PEER_PENDING_IN_BYTES: &str = "archipelago_peer_pending_in_bytes";
/// Replication lag towards the peer (see `events::PeerView::lag_ms`); by
/// peer, absent until the peer was first current.
pub(crate) const REPLICATION_LAG_MS: &str = "archipelago_replication_lag_ms";
/// Frame bytes exchanged with the peer; by peer and direction (`in`, `out`).
pub(crate) const PEER_BYTES: &str = "archipelago_peer_bytes_total";
/// Changes exchanged with the peer; by peer and direction.
pub(crate) const PEER_CHANGES: &str = "archipelago_peer_changes_total";
/// Change batches exchanged with the peer; by peer and direction.
pub(crate) const PEER_BATCHES: &str = "archipelago_peer_batches_total";
/// Changes made durable, by origin: `local` or the site they came from.
pub(crate) const CHANGES_APPLIED: &str = "archipelago_changes_applied_total";

/// Open conflict reports at this site, by kind and rule (`""` for the
/// built-in detectors); computed from the report index at each scrape.
pub(crate) const CONFLICTS_OPEN: &str = "archipelago_conflicts_open";
/// Reports that opened here (detected here or arrived open), by kind.
pub(crate) const CONFLICTS_OPENED: &str = "archipelago_conflicts_opened_total";
/// Reports seen closing here (closed here or arrived closed), by kind and
/// status (`resolved`, `dismissed`).
pub(crate) const CONFLICTS_CLOSED: &str = "archipelago_conflicts_closed_total";
/// Time from a report's detection to its closing (`resolved_at -
/// detected_at`, wall clocks of two sites possibly), observed when this
/// site sees it close.
pub(crate) const CONFLICT_RESOLVE_SECONDS: &str = "archipelago_conflict_resolve_seconds";

/// 1 while automatic conflict resolutions are held after a restore.
pub(crate) const RESOLUTIONS_HELD: &str = "archipelago_resolutions_held";
/// Backups taken through `/v1/backup`, by result (`ok`, `failed`).
pub(crate) const BACKUPS: &str = "archipelago_backups_total";
/// Time to write a backup's copy (before it is sent).
pub(crate) const BACKUP_SECONDS: &str = "archipelago_backup_seconds";
/// Size of the latest backup, in bytes.
pub(crate) const BACKUP_BYTES: &str = "archipelago_backup_bytes";

/// automerge-repo client connections open, by token name.
pub(crate) const CLIENTS_CONNECTED: &str = "archipelago_clients_connected";
/// Protocol messages exchanged with automerge-repo clients, by direction.
pub(crate) const CLIENT_MESSAGES: &str = "archipelago_client_messages_total";
/// Bytes of those messages, by direction.
pub(crate) const CLIENT_BYTES: &str = "archipelago_client_bytes_total";
/// Ephemeral messages clients sent for the other clients of a document.
pub(crate) const CLIENT_EPHEMERAL: &str = "archipelago_client_ephemeral_total";

/// Sagas this node holds, by status (`running`, `done`, `compensating`,
/// `compensated`, `failed`), as of the runner's last sweep.
pub(crate) const SAGAS: &str = "archipelago_sagas";
/// Saga steps and compensations run here, by outcome (`done`, `failed`,
/// `compensated`).
pub(crate) const SAGA_STEPS: &str = "archipelago_saga_steps_total";
/// Time a saga run here took, per step it ran.
pub(crate) const SAGA_STEP_SECONDS: &str = "archipelago_saga_step_seconds";
/// Tries of sagas' external calls.
pub(crate) const SAGA_HTTP_TRIES: &str = "archipelago_saga_http_tries_total";

/// Transactions committed through the API.
pub(crate) const TXN_COMMITS: &str = "archipelago_txn_commits_total";
/// Transactions received from peers waiting for members.
pub(crate) const TXN_HELD: &str = "archipelago_txn_held";
/// Changes waiting for their transaction, and their bytes.
pub(crate) const TXN_HELD_CHANGES: &str = "archipelago_txn_held_changes";
/// Bytes of the changes waiting for their transaction.
pub(crate) const TXN_HELD_BYTES: &str = "archipelago_txn_held_bytes";
/// How long a received transaction waited for its members before it was
/// applied.
pub(crate) const TXN_HELD_SECONDS: &str = "archipelago_txn_held_seconds";
/// Held transactions by how they ended: `complete`, `partial` (applied
/// without members its peer does not replicate), `dropped` (at a bound;
/// they come back with the next reconciliation).
pub(crate) const TXN_HOLDS: &str = "archipelago_txn_holds_total";

/// Ops on bounded counters by how they were served: `local` (with this
/// site's rights), `transfer` (after a peer's grant), `refused` (no rights
/// in time).
pub(crate) const ESCROW_OPS: &str = "archipelago_escrow_ops_total";
/// Requests for rights this site sent to peers.
pub(crate) const ESCROW_REQUESTS: &str = "archipelago_escrow_requests_total";
/// Grants this site committed for peers.
pub(crate) const ESCROW_GRANTS: &str = "archipelago_escrow_grants_total";
/// Ops waiting for rights now.
pub(crate) const ESCROW_WAITING: &str = "archipelago_escrow_waiting";
/// From an op's first request for rights to its commit with the grant.
pub(crate) const ESCROW_TRANSFER_SECONDS: &str = "archipelago_escrow_transfer_seconds";

/// Histogram buckets for how long received transactions wait, in seconds:
/// from a frame apart to a long partition.
const TXN_HELD_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0,
];

/// Histogram buckets for latencies, in seconds.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Histogram buckets for how long conflicts stay open, in seconds: from a
/// second (automatic resolution) to a week (a person's queue).
const CONFLICT_RESOLVE_BUCKETS_SECONDS: &[f64] = &[
    1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 43_200.0, 86_400.0, 259_200.0, 604_800.0,
];

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first call.
pub(crate) fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".to_owned()),
                LATENCY_BUCKETS_SECONDS,
            )
            .expect("the bucket list is not empty")
            // A full-name matcher takes precedence over the suffix one.
            .set_buckets_for_metric(
                Matcher::Full(CONFLICT_RESOLVE_SECONDS.to_owned()),
                CONFLICT_RESOLVE_BUCKETS_SECONDS,
            )
            .expect("the bucket list is not empty")
            .set_buckets_for_metric(
                Matcher::Full(TXN_HELD_SECONDS.to_owned()),
                TXN_HELD_BUCKETS_SECONDS,
            )
            .expect("the bucket list is not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            // The embedding process installed its own recorder; metrics go
            // there and this handle renders nothing.
            tracing::warn!("a metrics recorder is already installed; /metrics will be empty");
        }
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("archipelago-metrics-upkeep".to_owned())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the metrics upkeep thread");
        }
        handle
    })
}

/// Counts, times and logs every request.
pub(crate) async fn observe(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().clone();
    let started = Instant::now();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status();
    metrics::counter!(HTTP_REQUESTS, "route" => route.clone(), "status" => status.as_u16().to_string())
        .increment(1);
    metrics::histogram!(HTTP_REQUEST_SECONDS, "route" => route.clone())
        .record(elapsed.as_secs_f64());
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    if status.is_server_error() {
        tracing::warn!(%method, %route, status = status.as_u16(), elapsed_ms, "request failed");
    } else {
        tracing::debug!(%method, %route, status = status.as_u16(), elapsed_ms, "request");
    }
    response
}

/// Records the document count and whether resolutions are held.
pub(crate) fn record_docs(state: &ApiState) {
    // A gauge holds f64; document counts stay far below 2^53.
    metrics::gauge!(DOCS).set(state.replica.stats().docs as f64);
    let held = if state.replica.resolutions_held() {
        1.0
    } else {
        0.0
    };
    metrics::gauge!(RESOLUTIONS_HELD).set(held);
}

/// Records what the replica holds back for transactions, and how long
/// those applied since the last call waited.
pub(crate) fn record_txn(replica: &archipelago::Replica) {
    let stats = replica.txn_stats();
    metrics::gauge!(TXN_HELD).set(stats.held_txns as f64);
    metrics::gauge!(TXN_HELD_CHANGES).set(stats.held_changes as f64);
    metrics::gauge!(TXN_HELD_BYTES).set(stats.held_bytes as f64);
    for (how, count) in [
        ("complete", stats.completed),
        ("partial", stats.released_partial),
        ("dropped", stats.dropped),
    ] {
        metrics::counter!(TXN_HOLDS, "end" => how).absolute(count);
    }
    for seconds in replica.take_txn_hold_times() {
        metrics::histogram!(TXN_HELD_SECONDS).record(seconds);
    }
}

/// Records what the escrow layer has done, and the transfer times since
/// the last call.
pub(crate) fn record_escrow(replica: &archipelago::Replica) {
    let stats = replica.escrow_stats();
    for (served, count) in [
        ("local", stats.served_locally),
        ("transfer", stats.served_after_transfer),
        ("refused", stats.refused),
    ] {
        metrics::counter!(ESCROW_OPS, "served" => served).absolute(count);
    }
    metrics::counter!(ESCROW_REQUESTS).absolute(stats.asked);
    metrics::counter!(ESCROW_GRANTS).absolute(stats.granted);
    metrics::gauge!(ESCROW_WAITING).set(stats.waiting as f64);
    for seconds in replica.take_transfer_times() {
        metrics::histogram!(ESCROW_TRANSFER_SECONDS).record(seconds);
    }
}

/// Records a backup's copy: whether it was written, how long it took and,
/// when written, its size.
pub(crate) fn record_backup(written: Option<u64>, elapsed: Duration) {
    let result = if written.is_some() { "ok" } else { "failed" };
    metrics::counter!(BACKUPS, "result" => result).increment(1);
    metrics::histogram!(BACKUP_SECONDS).record(elapsed.as_secs_f64());
    if let Some(bytes) = written {
        // Exact in an f64 up to 8 PiB.
        metrics::gauge!(BACKUP_BYTES).set(bytes as f64);
    }
}

/// Records the state of one peer.
pub(crate) fn record_peer(view: &PeerView) {
    let peer = view.status.site.as_str().to_owned();
    metrics::gauge!(PEER_CONNECTED, "peer" => peer.clone()).set(if view.status.connected {
        1.0
    } else {
        0.0
    });
    // Byte counts in a gauge (f64) stay exact far beyond any queue limit.
    metrics::gauge!(PEER_PENDING_OUT_BYTES, "peer" => peer.clone())
        .set(view.status.pending_out as f64);
    metrics::gauge!(PEER_PENDING_IN_BYTES, "peer" => peer.clone())
        .set(view.status.pending_in as f64);
    let traffic = &view.status.traffic;
    for (name, out, into) in [
        (PEER_BYTES, traffic.bytes_out, traffic.bytes_in),
        (PEER_CHANGES, traffic.changes_out, traffic.changes_in),
        (PEER_BATCHES, traffic.batches_out, traffic.batches_in),
    ] {
        metrics::counter!(name, "peer" => peer.clone(), "direction" => "out").absolute(out);
        metrics::counter!(name, "peer" => peer.clone(), "direction" => "in").absolute(into);
    }
    if let Some(lag_ms) = view.lag_ms {
        metrics::gauge!(REPLICATION_LAG_MS, "peer" => peer).set(lag_ms as f64);
    }
}

/// Counts `changes` changes made durable from `origin` (`local` or a site).
pub(crate) fn record_changes_applied(origin: &str, changes: usize) {
    metrics::counter!(CHANGES_APPLIED, "origin" => origin.to_owned()).increment(changes as u64);
}

/// Counts a report that opened or closed here (one report of the
/// replica's conflict subscription).
pub(crate) fn record_conflict(report: &Conflict) {
    let kind = report.kind.as_str();
    match (report.status, report.resolved_at) {
        (Status::Open, _) => metrics::counter!(CONFLICTS_OPENED, "kind" => kind).increment(1),
        (status, resolved_at) => {
            metrics::counter!(CONFLICTS_CLOSED, "kind" => kind, "status" => status.as_str())
                .increment(1);
            if let Some(resolved_at) = resolved_at {
                // Clocks of different sites may disagree: never negative.
                let open_ms = resolved_at.saturating_sub(report.detected_at).max(0);
                metrics::histogram!(CONFLICT_RESOLVE_SECONDS).record(open_ms as f64 / 1000.0);
            }
        }
    }
}

/// `(kind, rule)` label pairs of the open-conflict gauge set so far, so a
/// pair whose reports all closed is set back to 0 rather than left stale.
static CONFLICTS_OPEN_LABELS: Mutex<BTreeSet<(&'static str, String)>> = Mutex::new(BTreeSet::new());

/// Sets the open-conflict gauges from the open reports.
pub(crate) fn record_conflicts_open(open: &[Conflict]) {
    let mut counts: BTreeMap<(&'static str, String), usize> = BTreeMap::new();
    for report in open {
        let labels = (
            report.kind.as_str(),
            report.rule.clone().unwrap_or_default(),
        );
        *counts.entry(labels).or_default() += 1;
    }
    let mut seen = CONFLICTS_OPEN_LABELS
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // The built-in detectors' gauges exist, at 0, from the first scrape.
    for kind in [Kind::ConcurrentWrite, Kind::DeleteUpdate] {
        seen.insert((kind.as_str(), String::new()));
    }
    for labels in seen.iter() {
        if !counts.contains_key(labels) {
            metrics::gauge!(CONFLICTS_OPEN, "kind" => labels.0, "rule" => labels.1.clone())
                .set(0.0);
        }
    }
    for (labels, count) in counts {
        metrics::gauge!(CONFLICTS_OPEN, "kind" => labels.0, "rule" => labels.1.clone())
            .set(count as f64);
        seen.insert(labels);
    }
}

/// `GET /metrics`: Prometheus text.
pub(crate) async fn render(State(state): State<ApiState>) -> Response {
    record_docs(&state);
    record_txn(&state.replica);
    record_escrow(&state.replica);
    // A store failure is logged where it is mapped to an error and leaves
    // the open-conflict gauges as they were; the other metrics still go out.
    let _ = super::conflicts::open_count(&state).await;
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        prometheus().render(),
    )
        .into_response()
}
