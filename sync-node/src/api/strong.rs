//! The strong tier over HTTP: writes to strong documents (from
//! `POST /v1/txn` and `POST /v1/docs/{id}/ops`) go through the tier, reads
//! with `?consistency=linearizable` through its leader, and
//! `/v1/strong/leases` and `/v1/strong/members` show and change it.

use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use archipelago::strong::{MemberChange, StrongError, StrongTier};
use archipelago::txn::{Txn, TxnCommit};
use archipelago::{DocId, SiteName};

use super::error::ApiError;
use super::extract::JsonBody;
use super::ApiState;

/// Strong transactions committed through this node's API.
pub(crate) const STRONG_COMMITS: &str = "archipelago_strong_commits_total";
/// Time from receiving a strong write to its commit, applied here.
pub(crate) const STRONG_COMMIT_SECONDS: &str = "archipelago_strong_commit_seconds";
/// The tier's current term at this site.
pub(crate) const STRONG_TERM: &str = "archipelago_strong_term";
/// 1 while this site leads the tier, else 0.
pub(crate) const STRONG_LEADER: &str = "archipelago_strong_leader";
/// The last log index applied at this site.
pub(crate) const STRONG_COMMIT_INDEX: &str = "archipelago_strong_commit_index";
/// Elections seen at this site since it started.
pub(crate) const STRONG_ELECTIONS: &str = "archipelago_strong_elections";
/// Each voter's match index, as the leader knows it; by site.
pub(crate) const STRONG_MATCH_INDEX: &str = "archipelago_strong_match_index";
/// Each voter's lag behind the leader's log, in entries; by site.
pub(crate) const STRONG_VOTER_LAG: &str = "archipelago_strong_voter_lag";

/// The HTTP error of a strong-tier failure.
pub(crate) fn error(e: StrongError) -> ApiError {
    let message = e.to_string();
    match e {
        StrongError::NoQuorum(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_quorum", message)
        }
        StrongError::Unknown(_) | StrongError::NotLeader => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "outcome_unknown", message)
        }
        StrongError::PreconditionFailed { doc, .. } => {
            ApiError::new(StatusCode::CONFLICT, "precondition_failed", message).for_doc(&doc)
        }
        StrongError::Op { doc, .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_op", message).for_doc(&doc)
        }
        StrongError::Bad(_) => ApiError::bad_request("bad_txn", message),
        _ => {
            tracing::error!(error = %message, "strong tier failed");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "strong_failed", message)
        }
    }
}

/// The tier, or the 400 of a node without one.
fn tier(state: &ApiState) -> Result<&StrongTier, ApiError> {
    state.strong.as_ref().ok_or_else(|| {
        ApiError::bad_request("strong_off", "this node has no [strong] tier configured")
    })
}

/// Whether `txn` goes through the tier: all its documents are strong. A
/// transaction mixing strong and other documents is a 400.
pub(crate) fn covers(state: &ApiState, txn: &Txn) -> Result<bool, ApiError> {
    let Some(tier) = &state.strong else {
        return Ok(false);
    };
    let strong = txn.docs.iter().filter(|d| tier.covers(&d.id)).count();
    match strong {
        0 => Ok(false),
        n if n == txn.docs.len() => Ok(true),
        _ => Err(ApiError::bad_request(
            "bad_txn",
            "a transaction cannot mix strong documents with others",
        )),
    }
}

/// Whether `doc` is written through the tier.
pub(crate) fn covers_doc(state: &ApiState, doc: &DocId) -> bool {
    state.strong.as_ref().is_some_and(|t| t.covers(doc))
}

/// Commits `txn` through the tier.
pub(crate) async fn write(state: &ApiState, txn: &Txn) -> Result<TxnCommit, ApiError> {
    let tier = tier(state)?;
    let started = Instant::now();
    let commit = tier.write(txn).await.map_err(error)?;
    metrics::counter!(STRONG_COMMITS).increment(1);
    metrics::histogram!(STRONG_COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
    Ok(commit)
}

/// A document read through the leader, as `GET /v1/docs/{id}` shows it.
pub(crate) async fn read(state: &ApiState, id: &DocId) -> Result<Option<Value>, ApiError> {
    let tier = tier(state)?;
    let mut docs = tier.read(std::slice::from_ref(id)).await.map_err(error)?;
    let doc = docs
        .pop()
        .ok_or_else(|| ApiError::internal("no document read"))?;
    Ok(doc.value.map(|value| {
        json!({
            "id": doc.id,
            "heads": doc.heads.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "value": value,
        })
    }))
}

/// The tier's part of `/v1/status`, and its metrics.
pub(crate) fn status(state: &ApiState) -> Option<Value> {
    let tier = state.strong.as_ref()?;
    let status = tier.status();
    metrics::gauge!(STRONG_TERM).set(status.term as f64);
    metrics::gauge!(STRONG_LEADER).set(if status.role == "leader" { 1.0 } else { 0.0 });
    if let Some(index) = status.commit_index {
        metrics::gauge!(STRONG_COMMIT_INDEX).set(index as f64);
    }
    metrics::gauge!(STRONG_ELECTIONS).set(status.elections as f64);
    for voter in &status.voters {
        if let Some(matched) = voter.match_index {
            metrics::gauge!(STRONG_MATCH_INDEX, "site" => voter.site.clone()).set(matched as f64);
        }
        if let Some(lag) = voter.lag {
            metrics::gauge!(STRONG_VOTER_LAG, "site" => voter.site.clone()).set(lag as f64);
        }
    }
    serde_json::to_value(status).ok()
}

/// `GET /v1/strong/leases`: `{"leases": [{"name", "holder", "epoch",
/// "expires_ms"}]}` as applied at this site.
pub(crate) async fn leases(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let tier = tier(&state)?;
    Ok(Json(json!({ "leases": tier.leases() })))
}

/// `GET /v1/strong/members`: the tier's status (voters, learners, leader).
pub(crate) async fn members(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    tier(&state)?;
    Ok(Json(status(&state).unwrap_or(Value::Null)))
}

/// Body of `POST /v1/strong/members`: `{"add": SITE}` or `{"remove": SITE}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MembersBody {
    #[serde(default)]
    add: Option<SiteName>,
    #[serde(default)]
    remove: Option<SiteName>,
}

/// `POST /v1/strong/members`: adds or removes a voter through joint
/// consensus; answers the tier's status once the change is committed.
pub(crate) async fn change_members(
    State(state): State<ApiState>,
    JsonBody(body): JsonBody<MembersBody>,
) -> Result<Json<Value>, ApiError> {
    let tier = tier(&state)?;
    let change = match (body.add, body.remove) {
        (Some(site), None) => MemberChange::Add(site),
        (None, Some(site)) => MemberChange::Remove(site),
        _ => {
            return Err(ApiError::bad_request(
                "bad_value",
                "give exactly one of `add` and `remove`",
            ))
        }
    };
    tier.change_members(change).await.map_err(error)?;
    Ok(Json(status(&state).unwrap_or(Value::Null)))
}
