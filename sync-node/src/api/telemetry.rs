//! Prometheus metrics: the process-wide recorder, the middleware that counts
//! and times every request, and the `/metrics` handler.
//!
//! The `metrics` facade has one global recorder per process, while tests and
//! embedders may start several nodes in one process; the recorder is
//! therefore installed once, on first use, and shared by every node.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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

/// Histogram buckets for latencies, in seconds.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
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

/// Records the document count.
pub(crate) fn record_docs(state: &ApiState) {
    // A gauge holds f64; document counts stay far below 2^53.
    metrics::gauge!(DOCS).set(state.replica.stats().docs as f64);
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

/// `GET /metrics`: Prometheus text.
pub(crate) async fn render(State(state): State<ApiState>) -> Response {
    record_docs(&state);
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        prometheus().render(),
    )
        .into_response()
}
