//! Sagas: `POST /v1/sagas` starts one, `GET /v1/sagas/{id}` shows it (the
//! same at every site once replicated), `GET /v1/sagas?status=S` lists
//! them. The node's runner ([`crate::sagas`]) runs the steps due here.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use archipelago::saga::{Action, SagaDef, SagaStatus};
use archipelago::SiteName;

use super::docs::blocking;
use super::error::ApiError;
use super::extract::JsonBody;
use super::ApiState;
use crate::sagas::{saga_json, unreachable_by};

/// Most sagas `GET /v1/sagas` lists.
pub(crate) const SAGAS_LISTED_MAX: usize = 1_000;

/// A fresh saga id: 16 random bytes in hex.
fn new_id() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /v1/sagas`: 201 `{"id", "status"}` once the saga is durable here
/// (its leading steps at this site commit with it; the others run from
/// then on, each at its site); 400 `bad_saga` for a
/// definition that cannot run (unknown site, no steps, more than 64, a
/// step without action, a URL outside `[sagas] http_allow`), 409
/// `saga_exists` for an id in use. Nothing is created on an error.
pub(crate) async fn start(
    State(state): State<ApiState>,
    JsonBody(mut def): JsonBody<SagaDef>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut sites: Vec<SiteName> = vec![state.replica.site().clone()];
    sites.extend(state.saga_sites.iter().cloned());
    def.check(Some(&sites)).map_err(archipelago::Error::from)?;
    for step in &def.steps {
        for action in [step.action(), step.compensation()].into_iter().flatten() {
            if let Action::Http(call) = action {
                if !state.sagas.allows(&call.url) {
                    return Err(ApiError::bad_request(
                        "bad_saga",
                        format!(
                            "step {}: {} is not in [sagas] http_allow",
                            step.name, call.url
                        ),
                    ));
                }
            }
        }
    }
    let id = def.id.get_or_insert_with(new_id).clone();
    let replica = state.replica.clone();
    let (view, _) = blocking(move || Ok(replica.create_and_run_leading(&def, Vec::new())?)).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "status": view.state.status().as_str()})),
    ))
}

/// `GET /v1/sagas/{id}`.
pub(crate) async fn read(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let replica = state.replica.clone();
    let lookup = id.clone();
    let view = blocking(move || Ok(replica.saga(&lookup)?)).await?;
    let view = view.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "saga_not_found",
            format!("no saga {id} here"),
        )
    })?;
    let unreachable = unreachable_by(state.sync.as_deref());
    Ok(Json(saga_json(&view, &unreachable)))
}

/// Query of `GET /v1/sagas`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    status: Option<String>,
    /// List after this id (the previous page's `next`).
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/sagas?status=S&after=ID&limit=N` → `{"sagas": [...], "next"?}`,
/// in id order.
pub(crate) async fn list(
    State(state): State<ApiState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let status: Option<SagaStatus> = query
        .status
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: String| ApiError::bad_request("bad_query", e))?;
    let limit = query.limit.unwrap_or(100).clamp(1, SAGAS_LISTED_MAX);
    let replica = state.replica.clone();
    let after = query.after;
    let views = blocking(move || {
        let mut views = Vec::new();
        let mut more = false;
        for id in replica.saga_ids() {
            if after.as_ref().is_some_and(|a| id.as_str() <= a.as_str()) {
                continue;
            }
            let Some(view) = replica.saga(&id)? else {
                continue;
            };
            if status.is_some_and(|s| view.state.status() != s) {
                continue;
            }
            if views.len() == limit {
                more = true;
                break;
            }
            views.push(view);
        }
        Ok((views, more))
    })
    .await?;
    let (views, more) = views;
    let unreachable = unreachable_by(state.sync.as_deref());
    let sagas: Vec<Value> = views.iter().map(|v| saga_json(v, &unreachable)).collect();
    let mut out = json!({ "sagas": sagas });
    if more {
        if let Some(last) = views.last() {
            out["next"] = json!(last.state.id);
        }
    }
    Ok(Json(out))
}
