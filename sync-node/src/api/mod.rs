//! The HTTP API (axum): routes, authentication, error answers, metrics.
//!
//! Every answer is JSON except `/metrics`; every error, including axum's own
//! rejections (unknown route, wrong method, oversized or malformed body), has
//! the shape `{"error": {"code", "message"}}`. All routes but
//! `GET /v1/health` need the bearer token.
//!
//! [`router`] builds the whole API over a [`Replica`], so a service can
//! mount it without the rest of the daemon.

mod auth;
mod docs;
mod error;
mod extract;
mod telemetry;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{middleware, Json, Router};
use serde_json::{json, Value};

use archipelago::Replica;

pub use auth::{ApiToken, InvalidToken, TOKEN_BYTES_MAX};

use error::ApiError;

/// Largest accepted request body, in bytes; larger bodies get 413.
pub const BODY_BYTES_MAX: usize = 16 << 20;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    replica: Replica,
    token: ApiToken,
}

impl ApiState {
    /// State serving `replica` to clients presenting `token`.
    pub fn new(replica: Replica, token: ApiToken) -> ApiState {
        ApiState { replica, token }
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
        .route("/v1/docs/{id}/ops", axum::routing::post(docs::apply_ops))
        .route("/v1/docs/{id}/history", get(docs::history))
        .route("/metrics", get(telemetry::render))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(route_not_found)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(middleware::from_fn(telemetry::observe))
        .with_state(state)
}

/// `GET /v1/health`.
async fn health() -> Json<Value> {
    Json(json!({ "ok": true }))
}

/// `GET /v1/status`.
async fn status(State(state): State<ApiState>) -> Json<Value> {
    let stats = state.replica.stats();
    telemetry::record_docs(&state);
    Json(json!({
        "site": state.replica.site(),
        "docs": stats.docs,
        "peers": [],
        "conflicts_open": 0,
        "loaded_docs": stats.loaded_docs,
        "version": env!("CARGO_PKG_VERSION"),
    }))
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
