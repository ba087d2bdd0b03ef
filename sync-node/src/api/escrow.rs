//! Bounded counters: `GET /v1/docs/{id}/escrow?path=P` (the value, bounds
//! and rights per site) and `POST /v1/docs/{id}/escrow/transfer` (moving
//! this site's rights to another site).

use std::time::Instant;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use archipelago::escrow::{Bounded, PoolKind};
use archipelago::SiteName;

use super::docs::{blocking, committed};
use super::error::ApiError;
use super::extract::{ApiQuery, DocPath, JsonBody};
use super::ApiState;

/// Query of `GET /v1/docs/{id}/escrow`.
#[derive(Debug, Deserialize)]
pub(crate) struct EscrowQuery {
    /// The counter; without it, every bounded counter of the document.
    path: Option<String>,
}

/// The JSON of one counter: `{"value", "min", "max"?, "rights": {SITE: N},
/// "pending_requests"}` (with `"up_rights"` when it has a `max`).
fn counter_json(state: &Bounded, pending: u64) -> Value {
    let mut out = json!({
        "value": state.value,
        "min": state.min,
        "rights": state.rights_all(),
        "pending_requests": pending,
    });
    if let (Some(max), Some(up)) = (state.max, state.pool(PoolKind::Up)) {
        out["max"] = json!(max);
        out["up_rights"] = json!(up.rights_all());
    }
    out
}

/// `GET /v1/docs/{id}/escrow?path=/stock` → the counter; without `path`,
/// `{"counters": {POINTER: {...}}}`. 404 `not_bounded` when the document
/// has no bounded counter there.
pub(crate) async fn read(
    State(state): State<ApiState>,
    DocPath(id): DocPath,
    ApiQuery(query): ApiQuery<EscrowQuery>,
) -> Result<Json<Value>, ApiError> {
    let replica = state.replica.clone();
    let not_found = |what: String| {
        ApiError::new(axum::http::StatusCode::NOT_FOUND, "not_bounded", what).for_doc(&id)
    };
    if replica.heads(&id).is_none() {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "doc_not_found",
            format!("document {id} not found"),
        ));
    }
    let doc = id.clone();
    match query.path {
        Some(path) => {
            let pointer = path.clone();
            let found = blocking(move || {
                Ok(replica
                    .escrow(&doc, &pointer)
                    .map(|s| (s, replica.escrow_waiting(&doc, &pointer)))?)
            })
            .await?;
            match found {
                (Some(counter), pending) => Ok(Json(counter_json(&counter, pending))),
                (None, _) => Err(not_found(format!(
                    "{path} of {id} is not a bounded counter"
                ))),
            }
        }
        None => {
            let all = blocking(move || {
                let list = replica.escrow_list(&doc)?;
                Ok(list
                    .into_iter()
                    .map(|(pointer, counter)| {
                        let pending = replica.escrow_waiting(&doc, &pointer);
                        (pointer, counter_json(&counter, pending))
                    })
                    .collect::<serde_json::Map<String, Value>>())
            })
            .await?;
            Ok(Json(json!({ "counters": all })))
        }
    }
}

/// Body of `POST /v1/docs/{id}/escrow/transfer`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TransferBody {
    path: String,
    to: SiteName,
    amount: i64,
    /// `"down"` (rights to decrement, the default) or `"up"` (to increment,
    /// with a `max`).
    #[serde(default = "down")]
    pool: PoolKind,
    #[serde(default)]
    message: Option<String>,
}

fn down() -> PoolKind {
    PoolKind::Down
}

/// `POST /v1/docs/{id}/escrow/transfer` `{"path", "to", "amount"}`: moves
/// this site's rights to site `to` as an ordinary change → `{"heads",
/// "change"}` once durable; 409 `insufficient_rights` when this site holds
/// fewer.
pub(crate) async fn transfer(
    State(state): State<ApiState>,
    DocPath(id): DocPath,
    JsonBody(body): JsonBody<TransferBody>,
) -> Result<Json<archipelago::Commit>, ApiError> {
    super::docs::check_message(body.message.as_deref())?;
    if body.amount <= 0 {
        return Err(ApiError::bad_request(
            "bad_value",
            format!("`amount` must be positive, not {}", body.amount),
        ));
    }
    let replica = state.replica.clone();
    let started = Instant::now();
    let doc = id.clone();
    let commit = blocking(move || {
        Ok(replica.escrow_transfer(
            &doc,
            &body.path,
            body.pool,
            &body.to,
            body.amount,
            body.message.as_deref(),
        )?)
    })
    .await
    .map_err(|e| match e.code() {
        "insufficient_rights" => e.or_doc(&id),
        _ => e,
    })?;
    committed(&state, &commit, started);
    Ok(Json(commit))
}
