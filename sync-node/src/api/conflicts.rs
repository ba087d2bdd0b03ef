//! The conflict routes: list and read the reports known at this site, and
//! close one — resolved (with edits that commit in the same change as the
//! report's new status) or dismissed.
//!
//! Like the document routes, replica calls run on tokio's blocking pool:
//! the report index is read from the store, and closing a report waits for
//! its commit's fsync.

use std::time::Instant;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use archipelago::conflict::{Conflict, Filter, Kind, Status};
use archipelago::doc::Op;
use archipelago::DocId;

use super::docs::blocking;
use super::error::ApiError;
use super::extract::{ApiQuery, ConflictPath, JsonBody};
use super::telemetry::{record_conflicts_open, COMMITS, COMMIT_SECONDS};
use super::ApiState;

/// Longest accepted note, in bytes.
const NOTE_BYTES_MAX: usize = 16 * 1024;
/// Longest accepted rule name in a filter, in bytes (rule names are at most
/// 128 characters).
const RULE_BYTES_MAX: usize = 512;

/// Query of `GET /v1/conflicts`; an empty value is no filter.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    status: Option<String>,
    doc: Option<String>,
    kind: Option<String>,
    rule: Option<String>,
}

/// `Some(text)` unless absent or empty.
fn given(value: Option<String>) -> Option<String> {
    value.filter(|text| !text.is_empty())
}

impl ListQuery {
    fn filter(self) -> Result<Filter, ApiError> {
        let bad = |message: String| ApiError::bad_request("bad_filter", message);
        let status = given(self.status)
            .map(|s| s.parse::<Status>())
            .transpose()
            .map_err(bad)?;
        let kind = given(self.kind)
            .map(|k| k.parse::<Kind>())
            .transpose()
            .map_err(bad)?;
        let doc = given(self.doc)
            .map(|d| DocId::new(&d))
            .transpose()
            .map_err(|e| ApiError::bad_request("invalid_id", e.to_string()))?;
        let rule = given(self.rule);
        if rule.as_ref().is_some_and(|r| r.len() > RULE_BYTES_MAX) {
            return Err(bad(format!(
                "the rule name is longer than {RULE_BYTES_MAX} bytes"
            )));
        }
        Ok(Filter {
            status,
            doc,
            kind,
            rule,
        })
    }
}

/// `GET /v1/conflicts[?status=S][&doc=D][&kind=K][&rule=R]` →
/// `{"conflicts": [report, ...]}`, oldest first.
pub(crate) async fn list(
    State(state): State<ApiState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let filter = query.filter()?;
    let replica = state.replica.clone();
    let conflicts = blocking(move || Ok(replica.conflicts(&filter)?)).await?;
    Ok(Json(json!({ "conflicts": conflicts })))
}

/// `GET /v1/conflicts/{id}` → the report.
pub(crate) async fn read(
    State(state): State<ApiState>,
    ConflictPath(id): ConflictPath,
) -> Result<Json<Conflict>, ApiError> {
    let replica = state.replica.clone();
    let wanted = id.clone();
    let report = blocking(move || Ok(replica.conflict(&wanted)?)).await?;
    report
        .map(Json)
        .ok_or_else(|| archipelago::Error::ConflictNotFound(id).into())
}

fn check_note(note: Option<&str>) -> Result<(), ApiError> {
    match note {
        Some(n) if n.len() > NOTE_BYTES_MAX => Err(ApiError::bad_request(
            "bad_note",
            format!("the note is longer than {NOTE_BYTES_MAX} bytes"),
        )),
        _ => Ok(()),
    }
}

/// Body of `POST /v1/conflicts/{id}/resolve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResolveBody {
    /// Edits to the conflict's document, committed with the resolution.
    #[serde(default)]
    ops: Vec<Op>,
    /// Edits of other documents, committed with the resolution as one
    /// transaction.
    #[serde(default)]
    docs: Vec<ResolveDoc>,
    #[serde(default)]
    note: Option<String>,
}

/// One other document a resolution edits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResolveDoc {
    id: archipelago::DocId,
    ops: Vec<Op>,
}

/// `POST /v1/conflicts/{id}/resolve` with `{"ops"?, "docs"?, "note"?}` →
/// the resolved report. The ops (the same as `POST /v1/docs/{id}/ops`
/// takes) and the report's new status commit as one change, or neither
/// does; with `docs` (`[{"id", "ops"}]`), the edits of those documents
/// commit with them as one transaction (an op that does not fit one is 422
/// naming it in `error.doc`, and nothing changes).
pub(crate) async fn resolve(
    State(state): State<ApiState>,
    ConflictPath(id): ConflictPath,
    JsonBody(body): JsonBody<ResolveBody>,
) -> Result<Json<Conflict>, ApiError> {
    check_note(body.note.as_deref())?;
    let replica = state.replica.clone();
    let started = Instant::now();
    let docs: Vec<(archipelago::DocId, Vec<Op>)> =
        body.docs.into_iter().map(|d| (d.id, d.ops)).collect();
    let report = blocking(move || {
        Ok(replica.resolve_conflict_with(&id, &body.ops, &docs, body.note.as_deref())?)
    })
    .await?;
    closed(started);
    Ok(Json(report))
}

/// Body of `POST /v1/conflicts/{id}/dismiss`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DismissBody {
    #[serde(default)]
    note: Option<String>,
}

/// `POST /v1/conflicts/{id}/dismiss` with `{"note"?}` → the dismissed
/// report.
pub(crate) async fn dismiss(
    State(state): State<ApiState>,
    ConflictPath(id): ConflictPath,
    JsonBody(body): JsonBody<DismissBody>,
) -> Result<Json<Conflict>, ApiError> {
    check_note(body.note.as_deref())?;
    let replica = state.replica.clone();
    let started = Instant::now();
    let report = blocking(move || Ok(replica.dismiss_conflict(&id, body.note.as_deref())?)).await?;
    closed(started);
    Ok(Json(report))
}

/// `POST /v1/resolutions/release`: ends the hold on automatic resolutions
/// that a restore from a backup sets ([`Replica::release_resolutions`]),
/// and runs those that waited. Answers `{"released", "resolved"}`:
/// whether there was a hold, and how many reports were closed.
///
/// [`Replica::release_resolutions`]: archipelago::Replica::release_resolutions
pub(crate) async fn release(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let replica = state.replica.clone();
    let (released, resolved) = blocking(move || {
        let held = replica.resolutions_held();
        Ok((held, replica.release_resolutions()?))
    })
    .await?;
    Ok(Json(json!({ "released": released, "resolved": resolved })))
}

/// Closing a report is a local commit: counted like document writes.
fn closed(started: Instant) {
    metrics::counter!(COMMITS).increment(1);
    metrics::histogram!(COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
}

/// Counts the open reports, updating the open-conflict gauges on the way.
pub(crate) async fn open_count(state: &ApiState) -> Result<usize, ApiError> {
    let replica = state.replica.clone();
    let open = blocking(move || {
        Ok(replica.conflicts(&Filter {
            status: Some(Status::Open),
            ..Filter::default()
        })?)
    })
    .await?;
    record_conflicts_open(&open);
    Ok(open.len())
}
