//! The HTTP API (axum): routes, authentication, error answers, metrics.
//!
//! Every answer is JSON except `/metrics`; every error, including axum's own
//! rejections (unknown route, wrong method, oversized or malformed body), has
//! the shape `{"error": {"code", "message"}}`. All routes but
//! `GET /v1/health` need the bearer token.
//!
//! [`router`] builds the whole API over a [`Replica`], so a service can
//! mount it without the rest of the daemon; peers in `/v1/status` and the
//! `/v1/events` stream need the sync endpoint and the event log a node adds
//! with [`ApiState::with_sync`] and [`ApiState::with_events`], and
//! `/v1/backup` the SQLite store it adds with [`ApiState::with_backups`].
//! Web pages from other origins may call it once listed with
//! [`ApiState::with_cors`].

mod auth;
pub mod backup;
pub mod clients;
mod conflicts;
pub mod cors;
mod docs;
mod error;
mod escrow;
mod events;
mod extract;
mod heads;
mod sagas;
mod strong;
pub(crate) mod telemetry;
pub mod tokens;
mod txn;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use serde_json::{json, Value};

use archipelago::Replica;

use crate::events::{EventLog, SyncPeers};

pub(crate) use auth::Principal;
pub use auth::{ApiToken, InvalidToken, TOKEN_BYTES_MAX};
pub use backup::Backups;
pub use cors::CorsOrigins;

use error::ApiError;

/// Where documents that automerge-repo clients create are stored, unless
/// configured otherwise.
pub const DEFAULT_CLIENT_NAMESPACE: &str = "repo";

/// Largest accepted request body, in bytes; larger bodies get 413.
pub const BODY_BYTES_MAX: usize = 16 << 20;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    replica: Replica,
    token: ApiToken,
    sync: Option<Arc<SyncPeers>>,
    events: Option<Arc<EventLog>>,
    backups: Option<Arc<Backups>>,
    cors: CorsOrigins,
    clients: Arc<archipelago::clients::ReplicaClients>,
    clients_shared: clients::ClientsShared,
    sagas: Arc<crate::config::SagasConfig>,
    saga_sites: Arc<Vec<archipelago::SiteName>>,
    tokens: Arc<tokens::Tokens>,
    strong: Option<archipelago::strong::StrongTier>,
}

impl ApiState {
    /// State serving `replica` to clients presenting `token`, with no peers
    /// and no event stream (`/v1/events` answers 404 `events_off`).
    pub fn new(replica: Replica, token: ApiToken) -> ApiState {
        let replica_store = replica.store().clone();
        ApiState {
            clients: Arc::new(archipelago::clients::ReplicaClients::new(
                replica.clone(),
                DEFAULT_CLIENT_NAMESPACE,
            )),
            replica,
            token,
            sync: None,
            events: None,
            backups: None,
            cors: CorsOrigins::default(),
            clients_shared: clients::ClientsShared::new(crate::config::ClientsConfig::default()),
            sagas: Arc::default(),
            saga_sites: Arc::default(),
            tokens: Arc::new(
                tokens::Tokens::load(replica_store.clone()).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "the stored tokens could not be read: none opens anything");
                    tokens::Tokens::empty(replica_store)
                }),
            ),
            strong: None,
        }
    }

    /// Writes strong documents through `tier`, and shows it in
    /// `/v1/status`.
    pub fn with_strong(mut self, tier: archipelago::strong::StrongTier) -> ApiState {
        self.strong = Some(tier);
        self
    }

    /// Serves automerge-repo clients as `config` says: documents they
    /// create stored under its namespace (`repo` by default:
    /// `NAMESPACE/ID`), its limits on their connections.
    pub fn with_clients(mut self, config: &crate::config::ClientsConfig) -> ApiState {
        self.clients = Arc::new(archipelago::clients::ReplicaClients::new(
            self.replica.clone(),
            config.namespace.clone(),
        ));
        self.clients_shared = clients::ClientsShared::new(config.clone());
        self
    }

    /// Starts sagas whose steps run at this site or at `peers`, with
    /// external calls as `config` allows.
    pub fn with_sagas(
        mut self,
        config: &crate::config::SagasConfig,
        peers: Vec<archipelago::SiteName>,
    ) -> ApiState {
        self.sagas = Arc::new(config.clone());
        self.saga_sites = Arc::new(peers);
        self
    }

    /// Reports the peers of `sync` in `/v1/status`.
    pub fn with_sync(mut self, sync: Arc<SyncPeers>) -> ApiState {
        self.sync = Some(sync);
        self
    }

    /// Serves backups of the node's store on `/v1/backup`.
    pub fn with_backups(mut self, backups: Arc<Backups>) -> ApiState {
        self.backups = Some(backups);
        self
    }

    /// Lets web pages from `origins` call the API (see [`cors`]).
    pub fn with_cors(mut self, origins: CorsOrigins) -> ApiState {
        self.cors = origins;
        self
    }

    /// Streams `events` on `/v1/events`; something must feed the log, such
    /// as [`crate::events::spawn_feed`].
    pub fn with_events(mut self, events: Arc<EventLog>) -> ApiState {
        self.events = Some(events);
        self
    }
}

/// The whole HTTP API.
pub fn router(state: ApiState) -> Router {
    // Install the recorder before the first request records anything.
    telemetry::prometheus();
    telemetry::record_docs(&state);
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/status", get(status))
        .route("/v1/docs", get(docs::list))
        .route("/v1/docs/{id}", get(docs::read).put(docs::put))
        .route("/v1/docs/{id}/ops", post(docs::apply_ops))
        .route("/v1/docs/{id}/history", get(docs::history))
        .route("/v1/docs/{id}/escrow", get(escrow::read))
        .route("/v1/docs/{id}/escrow/transfer", post(escrow::transfer))
        .route("/v1/txn", post(txn::commit))
        .route("/v1/sagas", get(sagas::list).post(sagas::start))
        .route("/v1/sagas/{id}", get(sagas::read))
        .route("/v1/read", post(txn::read))
        .route("/v1/heads", get(heads::list))
        .route("/v1/heads/digest", get(heads::digest))
        .route("/v1/conflicts", get(conflicts::list))
        .route("/v1/conflicts/{id}", get(conflicts::read))
        .route("/v1/conflicts/{id}/resolve", post(conflicts::resolve))
        .route("/v1/conflicts/{id}/dismiss", post(conflicts::dismiss))
        .route("/v1/resolutions/release", post(conflicts::release))
        .route("/v1/events", get(events::stream))
        .route("/v1/backup", get(backup::download))
        .route(clients::PATH, get(clients::connect))
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/tokens/{name}", axum::routing::delete(tokens::revoke))
        .route("/v1/strong/leases", get(strong::leases))
        .route(
            "/v1/strong/members",
            get(strong::members).post(strong::change_members),
        )
        .route("/metrics", get(telemetry::render))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(route_not_found)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        // Outside the token check: a preflight carries no token.
        .layer(middleware::from_fn_with_state(
            state.cors.clone(),
            cors::handle,
        ))
        .layer(middleware::from_fn(telemetry::observe))
        .with_state(state)
}

/// `GET /v1/health`.
async fn health() -> Json<Value> {
    Json(json!({ "ok": true }))
}

/// `GET /v1/status`: the site, its document count, its open conflict
/// reports (`conflicts_open`), whether automatic resolutions are held
/// after a restore (`resolutions_held`) and its peers, each as `{"site", "addr",
/// "connected", "last_seen", "pending_out", "pending_in", "lag_ms"}` (see
/// [`crate::events::PeerView`] for what `lag_ms` means).
async fn status(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let stats = state.replica.stats();
    telemetry::record_docs(&state);
    let conflicts_open = conflicts::open_count(&state).await?;
    let peers: Vec<Value> = state.sync.as_ref().map_or_else(Vec::new, |sync| {
        sync.status().iter().map(|view| view.to_json()).collect()
    });
    Ok(Json(json!({
        "site": state.replica.site(),
        "docs": stats.docs,
        "sync_addr": state.sync.as_ref().map(|sync| sync.local_addr().to_string()),
        "peers": peers,
        "conflicts_open": conflicts_open,
        "resolutions_held": state.replica.resolutions_held(),
        "loaded_docs": stats.loaded_docs,
        "clients": state.clients_shared.registry.list(),
        "strong": strong::status(&state),
        "version": env!("CARGO_PKG_VERSION"),
    })))
}

async fn route_not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "route_not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}
