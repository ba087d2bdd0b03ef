//! Transactions across documents and consistent multi-document reads:
//! `POST /v1/txn` and `POST /v1/read`.

use std::time::Instant;

use axum::extract::State;
use axum::Extension;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use archipelago::doc::Op;
use archipelago::txn::{Txn, TxnDoc, TXN_DOCS_MAX};
use archipelago::{DocId, READ_DOCS_MAX};

use super::docs::{blocking, check_message, committed, precondition, wait_for_rights};
use super::error::ApiError;
use super::extract::JsonBody;
use super::telemetry::TXN_COMMITS;
use super::{ApiState, Principal};

/// One document of a `POST /v1/txn` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TxnDocBody {
    id: DocId,
    /// Ops for the document; none means it is only checked.
    #[serde(default)]
    ops: Vec<Op>,
    #[serde(default)]
    if_heads: Option<Vec<String>>,
    #[serde(default)]
    if_absent: bool,
}

/// Body of `POST /v1/txn`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TxnBody {
    docs: Vec<TxnDocBody>,
    #[serde(default)]
    message: Option<String>,
    /// How long a decrement of a bounded counter short of rights waits for
    /// a peer's grant.
    #[serde(default)]
    wait_ms: Option<u64>,
}

/// `POST /v1/txn`: applies ops to several documents as one transaction,
/// once every precondition holds; answers `{"txn", "docs": [{"id",
/// "heads", "change"}]}` once durable. A failed precondition is 409
/// `precondition_failed` with the document in `error.doc`; in every error
/// case nothing is applied.
pub(crate) async fn commit(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    JsonBody(body): JsonBody<TxnBody>,
) -> Result<Json<Value>, ApiError> {
    check_message(body.message.as_deref())?;
    for doc in &body.docs {
        principal.check(&doc.id, !doc.ops.is_empty())?;
    }
    if body.docs.len() > TXN_DOCS_MAX {
        return Err(ApiError::bad_request(
            "bad_txn",
            format!(
                "a transaction touches at most {TXN_DOCS_MAX} documents, not {}",
                body.docs.len()
            ),
        ));
    }
    let docs = body
        .docs
        .into_iter()
        .map(|doc| {
            Ok(TxnDoc {
                precondition: precondition(doc.if_heads.as_deref(), doc.if_absent)
                    .map_err(|e| e.for_doc(&doc.id))?,
                id: doc.id,
                ops: doc.ops,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let wait = wait_for_rights(body.wait_ms)?;
    let first = docs.first().map(|d| d.id.clone());
    let txn = Txn {
        docs,
        message: body.message,
    };
    if super::strong::covers(&state, &txn)? {
        let commit = super::strong::write(&state, &txn).await?;
        return Ok(Json(txn_json(&commit)));
    }
    let replica = state.replica.clone();
    let started = Instant::now();
    let commit = blocking(move || {
        Ok(match first {
            // Errors of a transaction name their document; the hint is unused.
            Some(first) => replica.with_rights(&first, wait, || replica.commit_txn(&txn))?,
            None => replica.commit_txn(&txn)?,
        })
    })
    .await;
    super::telemetry::record_escrow(&state.replica);
    let commit = commit?;
    metrics::counter!(TXN_COMMITS).increment(1);
    let docs: Vec<Value> = commit
        .docs
        .iter()
        .map(|(id, result)| {
            committed(&state, result, started);
            json!({
                "id": id,
                "heads": result.heads.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "change": result.change.map(|h| h.to_string()),
            })
        })
        .collect();
    Ok(Json(json!({ "txn": commit.txn, "docs": docs })))
}

/// `{"txn", "docs": [{"id", "heads", "change"}]}` of a committed
/// transaction.
pub(crate) fn txn_json(commit: &archipelago::txn::TxnCommit) -> Value {
    let docs: Vec<Value> = commit
        .docs
        .iter()
        .map(|(id, result)| {
            json!({
                "id": id,
                "heads": result.heads.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "change": result.change.map(|h| h.to_string()),
            })
        })
        .collect();
    json!({ "txn": commit.txn, "docs": docs })
}

/// Body of `POST /v1/read`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadBody {
    ids: Vec<DocId>,
}

/// `POST /v1/read`: several documents read at one cut that holds every
/// transaction whole or not at all; `{"docs": [{"id", "heads", "value"}]}`
/// in the order asked, an absent document as `{"id", "heads": [], "value":
/// null}`.
pub(crate) async fn read(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    JsonBody(body): JsonBody<ReadBody>,
) -> Result<Json<Value>, ApiError> {
    for id in &body.ids {
        principal.check(id, false)?;
    }
    if body.ids.len() > READ_DOCS_MAX {
        return Err(ApiError::bad_request(
            "too_many",
            format!(
                "one read takes at most {READ_DOCS_MAX} documents, not {}",
                body.ids.len()
            ),
        ));
    }
    let replica = state.replica.clone();
    let ids = body.ids.clone();
    let views = blocking(move || Ok(replica.read_many(&ids)?)).await?;
    let docs: Vec<Value> = body
        .ids
        .iter()
        .zip(views)
        .map(|(id, view)| match view {
            Some(view) => serde_json::to_value(view).expect("a document view serializes"),
            None => json!({ "id": id, "heads": [], "value": null }),
        })
        .collect();
    Ok(Json(json!({ "docs": docs })))
}
