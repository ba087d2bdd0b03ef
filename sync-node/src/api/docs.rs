//! The document routes: list, read (with time travel), whole-value write,
//! atomic op batches, and history.
//!
//! Replica calls block (reads may load from SQLite, writes wait for the
//! commit's fsync), so each runs on tokio's blocking pool. That also
//! contains panics: a panicking closure becomes a `JoinError`, answered as a
//! 500, and the node keeps serving.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Extension;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use archipelago::doc::Op;
use archipelago::id::parse_change_hash;
use archipelago::txn::Precondition;
use archipelago::{ChangeHash, Commit, DocId, DocView};

use super::error::ApiError;
use super::extract::{ApiQuery, DocPath, JsonBody};
use super::telemetry::{record_docs, COMMITS, COMMIT_SECONDS};
use super::{ApiState, Principal};

/// Most heads accepted in `?at=`.
const AT_HEADS_MAX: usize = 1024;
/// Longest accepted commit message, in bytes.
const MESSAGE_BYTES_MAX: usize = 16 * 1024;

/// Runs a blocking replica call off the async threads. The closure maps
/// library errors itself: `archipelago::Error` is large to move around.
pub(super) async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, ApiError> + Send + 'static,
) -> Result<R, ApiError> {
    tokio::task::spawn_blocking(f).await?
}

fn doc_not_found(id: &DocId) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "doc_not_found",
        format!("document {id} not found"),
    )
}

pub(super) fn check_message(message: Option<&str>) -> Result<(), ApiError> {
    match message {
        Some(m) if m.len() > MESSAGE_BYTES_MAX => Err(ApiError::bad_request(
            "bad_message",
            format!("the message is longer than {MESSAGE_BYTES_MAX} bytes"),
        )),
        _ => Ok(()),
    }
}

/// Query of `GET /v1/docs`.
#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    prefix: String,
    /// Most ids in one answer (at most [`LIST_LIMIT_MAX`]).
    limit: Option<usize>,
    /// Continue after this id (the `next` of the previous page).
    after: Option<String>,
}

/// Most document ids in one `GET /v1/docs` answer; a longer listing is
/// paged with `next` and `after`.
pub(crate) const LIST_LIMIT_MAX: usize = 100_000;

/// `GET /v1/docs?prefix=P[&limit=N][&after=ID]` → `{"docs": [...]}`, with
/// `"next": ID` when more ids follow (pass it as `after`).
pub(crate) async fn list(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    if let Principal::Scoped(token) = &principal {
        if !token
            .prefixes
            .iter()
            .any(|p| query.prefix.starts_with(p.as_str()))
        {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "token {} lists only under its prefixes: give ?prefix= one of {:?}",
                    token.name, token.prefixes
                ),
            ));
        }
    }
    let limit = query
        .limit
        .unwrap_or(LIST_LIMIT_MAX)
        .clamp(1, LIST_LIMIT_MAX);
    // One extra id tells whether there is a next page; `next` appears only
    // then, so an unpaged listing is exactly `{"docs": [...]}`.
    let mut ids = state
        .replica
        .doc_ids_page(&query.prefix, query.after.as_deref(), limit + 1);
    if ids.len() > limit {
        ids.truncate(limit);
        let next = ids.last().map(|id| id.to_string());
        return Ok(Json(json!({ "docs": ids, "next": next })));
    }
    Ok(Json(json!({ "docs": ids })))
}

/// Query of `GET /v1/docs/{id}`.
#[derive(Debug, Deserialize)]
pub(crate) struct ReadQuery {
    at: Option<String>,
    /// `local` (the default) or `linearizable` (through the strong tier's
    /// leader).
    consistency: Option<String>,
}

/// Parses `HEAD,HEAD,...` (hex change hashes).
fn parse_heads(text: &str) -> Result<Vec<ChangeHash>, ApiError> {
    let heads = text
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .take(AT_HEADS_MAX + 1)
        .map(|h| {
            parse_change_hash(h).map_err(|e| ApiError::bad_request("bad_heads", e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if heads.is_empty() {
        return Err(ApiError::bad_request(
            "bad_heads",
            "`at` needs at least one change hash",
        ));
    }
    if heads.len() > AT_HEADS_MAX {
        return Err(ApiError::bad_request(
            "bad_heads",
            format!("`at` takes at most {AT_HEADS_MAX} change hashes"),
        ));
    }
    Ok(heads)
}

/// `GET /v1/docs/{id}[?at=HEAD,HEAD]`: the view (`id`, `heads`, `value`)
/// and the document's automerge URL, `url`, which opens it from any site
/// (see [`super::clients`]).
pub(crate) async fn read(
    State(state): State<ApiState>,
    DocPath(id): DocPath,
    ApiQuery(query): ApiQuery<ReadQuery>,
) -> Result<Json<Value>, ApiError> {
    let at = query.at.as_deref().map(parse_heads).transpose()?;
    match query.consistency.as_deref() {
        None | Some("local") => {}
        Some("linearizable") if at.is_some() => {
            return Err(ApiError::bad_request(
                "bad_value",
                "`at` and `consistency=linearizable` do not go together",
            ))
        }
        Some("linearizable") => {
            let mut body = super::strong::read(&state, &id)
                .await?
                .ok_or_else(|| doc_not_found(&id))?;
            body["url"] = Value::String(state.clients.url(&id));
            return Ok(Json(body));
        }
        Some(other) => {
            return Err(ApiError::bad_request(
                "bad_value",
                format!("`consistency` is `local` or `linearizable`, not {other:?}"),
            ))
        }
    }
    let replica = state.replica.clone();
    let doc = id.clone();
    let view: Option<DocView> =
        blocking(move || Ok(replica.read_json(&doc, at.as_deref())?)).await?;
    let view = view.ok_or_else(|| doc_not_found(&id))?;
    let mut body = serde_json::to_value(&view).map_err(|e| ApiError::internal(e.to_string()))?;
    body["url"] = Value::String(state.clients.url(&id));
    Ok(Json(body))
}

/// Body of `PUT /v1/docs/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutBody {
    value: Value,
    #[serde(default)]
    message: Option<String>,
}

/// `PUT /v1/docs/{id}`: makes the document equal the value, field by field.
pub(crate) async fn put(
    State(state): State<ApiState>,
    DocPath(id): DocPath,
    JsonBody(body): JsonBody<PutBody>,
) -> Result<Json<Commit>, ApiError> {
    check_message(body.message.as_deref())?;
    if !body.value.is_object() {
        return Err(ApiError::bad_request(
            "bad_value",
            "the document value must be a JSON object",
        ));
    }
    let replica = state.replica.clone();
    let started = Instant::now();
    let commit =
        blocking(move || Ok(replica.put_json(&id, &body.value, body.message.as_deref())?)).await?;
    committed(&state, &commit, started);
    Ok(Json(commit))
}

/// Body of `POST /v1/docs/{id}/ops`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OpsBody {
    ops: Vec<Op>,
    #[serde(default)]
    message: Option<String>,
    /// Apply only if the document is still at these heads.
    #[serde(default)]
    if_heads: Option<Vec<String>>,
    /// Apply only if the document does not exist yet.
    #[serde(default)]
    if_absent: bool,
    /// How long an op on a bounded counter short of rights waits for a
    /// peer's grant (default: the counter's `[[escrow]]` wait, 2000).
    #[serde(default)]
    wait_ms: Option<u64>,
}

/// The wait of `wait_ms`, checked.
pub(super) fn wait_for_rights(wait_ms: Option<u64>) -> Result<Option<Duration>, ApiError> {
    match wait_ms {
        Some(ms) if ms > crate::config::ESCROW_WAIT_MS_MAX => Err(ApiError::bad_request(
            "bad_value",
            format!(
                "`wait_ms` is at most {}, not {ms}",
                crate::config::ESCROW_WAIT_MS_MAX
            ),
        )),
        other => Ok(other.map(Duration::from_millis)),
    }
}

/// `POST /v1/docs/{id}/ops`: applies the ops atomically as one change.
pub(crate) async fn apply_ops(
    State(state): State<ApiState>,
    DocPath(id): DocPath,
    JsonBody(body): JsonBody<OpsBody>,
) -> Result<Json<Commit>, ApiError> {
    check_message(body.message.as_deref())?;
    if body.ops.is_empty() {
        return Err(ApiError::bad_request("bad_value", "`ops` is empty"));
    }
    let precondition = precondition(body.if_heads.as_deref(), body.if_absent)?;
    if super::strong::covers_doc(&state, &id) {
        let txn = archipelago::txn::Txn {
            docs: vec![archipelago::txn::TxnDoc {
                id: id.clone(),
                ops: body.ops,
                precondition,
            }],
            message: body.message,
        };
        let commit = super::strong::write(&state, &txn).await?;
        let (_, commit) = commit
            .docs
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::internal("the strong tier answered no document"))?;
        return Ok(Json(commit));
    }
    let wait = wait_for_rights(body.wait_ms)?;
    let replica = state.replica.clone();
    let started = Instant::now();
    let doc = id.clone();
    let commit = blocking(move || {
        replica
            .with_rights(&id, wait, || {
                replica.apply_ops_if(&id, &body.ops, body.message.as_deref(), &precondition)
            })
            .map_err(ApiError::from)
    })
    .await;
    super::telemetry::record_escrow(&state.replica);
    let commit = commit.map_err(|e| match e.code() {
        "insufficient_rights" | "above_max" => e.or_doc(&doc),
        _ => e,
    })?;
    committed(&state, &commit, started);
    Ok(Json(commit))
}

/// The precondition of `if_heads` (hex change hashes) and `if_absent`.
pub(super) fn precondition(
    if_heads: Option<&[String]>,
    if_absent: bool,
) -> Result<Precondition, ApiError> {
    let if_heads = match if_heads {
        None => None,
        Some(heads) if heads.len() > AT_HEADS_MAX => {
            return Err(ApiError::bad_request(
                "bad_heads",
                format!("`if_heads` takes at most {AT_HEADS_MAX} change hashes"),
            ))
        }
        Some(heads) => Some(
            heads
                .iter()
                .map(|h| {
                    parse_change_hash(h)
                        .map_err(|e| ApiError::bad_request("bad_heads", e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(Precondition {
        if_heads,
        if_absent,
    })
}

pub(super) fn committed(state: &ApiState, commit: &Commit, started: Instant) {
    if commit.change.is_some() {
        metrics::counter!(COMMITS).increment(1);
        metrics::histogram!(COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        record_docs(state);
    }
}

/// `GET /v1/docs/{id}/history`: changes, oldest first.
pub(crate) async fn history(
    State(state): State<ApiState>,
    DocPath(id): DocPath,
) -> Result<Json<Value>, ApiError> {
    let replica = state.replica.clone();
    let doc = id.clone();
    let changes = blocking(move || Ok(replica.history(&doc)?)).await?;
    match changes {
        Some(changes) => Ok(Json(json!({ "changes": changes }))),
        None => Err(doc_not_found(&id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_from_comma_separated_hex() {
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        assert_eq!(parse_heads(&format!("{a},{b}")).unwrap().len(), 2);
        assert_eq!(parse_heads(&format!(" {a} ,")).unwrap().len(), 1);
        assert!(parse_heads("").is_err());
        assert!(parse_heads("zz").is_err());
        assert!(parse_heads(&"a".repeat(63)).is_err());
        let many = vec![a; AT_HEADS_MAX + 1].join(",");
        assert!(parse_heads(&many).is_err());
    }
}
