//! The consistency routes: every document's heads, paged, and a digest of
//! them, so that `sync-node check` can compare sites with one small request
//! each and list documents only when the digests differ.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::docs::blocking;
use super::error::ApiError;
use super::extract::ApiQuery;
use super::ApiState;

/// Most documents in one `GET /v1/heads` answer; a longer listing is paged
/// with `next` and `after`.
pub(crate) const HEADS_LIMIT_MAX: usize = 10_000;

/// Query of `GET /v1/heads`.
#[derive(Debug, Deserialize)]
pub(crate) struct HeadsQuery {
    #[serde(default)]
    prefix: String,
    /// Most documents in one answer (at most [`HEADS_LIMIT_MAX`]).
    limit: Option<usize>,
    /// Continue after this id (the `next` of the previous page).
    after: Option<String>,
}

/// `GET /v1/heads?prefix=P[&limit=N][&after=ID]` →
/// `{"docs": [{"id": ID, "heads": [HASH, ...]}, ...]}`, in id order, with
/// `"next": ID` when more documents follow (pass it as `after`).
pub(crate) async fn list(
    State(state): State<ApiState>,
    ApiQuery(query): ApiQuery<HeadsQuery>,
) -> Json<Value> {
    let limit = query
        .limit
        .unwrap_or(HEADS_LIMIT_MAX)
        .clamp(1, HEADS_LIMIT_MAX);
    // One extra document tells whether there is a next page.
    let mut page = state
        .replica
        .heads_page(&query.prefix, query.after.as_deref(), limit + 1);
    let more = page.len() > limit;
    page.truncate(limit);
    let docs: Vec<Value> = page
        .iter()
        .map(|(id, heads)| {
            let heads: Vec<String> = heads.iter().map(ToString::to_string).collect();
            json!({ "id": id, "heads": heads })
        })
        .collect();
    let mut answer = json!({ "docs": docs });
    if more {
        answer["next"] = json!(page.last().map(|(id, _)| id));
    }
    Json(answer)
}

/// Query of `GET /v1/heads/digest`.
#[derive(Debug, Deserialize)]
pub(crate) struct DigestQuery {
    #[serde(default)]
    prefix: String,
}

/// `GET /v1/heads/digest?prefix=P` → `{"prefix": P, "docs": N, "digest":
/// HEX}`: equal at two sites exactly when they hold the same documents under
/// `P` at the same heads (see [`archipelago::Replica::heads_digest`]).
pub(crate) async fn digest(
    State(state): State<ApiState>,
    ApiQuery(query): ApiQuery<DigestQuery>,
) -> Result<Json<Value>, ApiError> {
    let replica = state.replica.clone();
    let prefix = query.prefix;
    blocking(move || {
        let digest = replica.heads_digest(&prefix);
        Ok(Json(json!({
            "prefix": prefix,
            "docs": digest.docs,
            "digest": digest.to_hex(),
        })))
    })
    .await
}
