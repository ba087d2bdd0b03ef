//! Request extractors whose every rejection is an [`ApiError`]: the JSON
//! body (size limit, syntax, shape), the document or conflict id in the
//! path, and the query string. axum's own extractors answer some rejections in plain
//! text; these wrap them so clients always get the JSON error shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use archipelago::conflict::ConflictId;
use archipelago::DocId;

use super::error::ApiError;
use super::BODY_BYTES_MAX;

/// A JSON request body of type `T`.
#[derive(Debug)]
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::payload_too_large(BODY_BYTES_MAX)
                } else {
                    ApiError::bad_request("bad_body", rejection.body_text())
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|error| match error.classify() {
                serde_json::error::Category::Data => {
                    ApiError::bad_request("invalid_body", error.to_string())
                }
                serde_json::error::Category::Syntax
                | serde_json::error::Category::Eof
                | serde_json::error::Category::Io => ApiError::bad_request(
                    "malformed_json",
                    format!("the body is not valid JSON: {error}"),
                ),
            })
    }
}

/// The `{id}` path parameter as a validated document id.
#[derive(Debug)]
pub(crate) struct DocPath(pub(crate) DocId);

impl<S> FromRequestParts<S> for DocPath
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request("bad_url", rejection.body_text()))?;
        DocId::new(&raw)
            .map(DocPath)
            .map_err(|error| ApiError::bad_request("invalid_id", error.to_string()))
    }
}

/// The `{id}` path parameter as a conflict report id (32 hex digits).
#[derive(Debug)]
pub(crate) struct ConflictPath(pub(crate) ConflictId);

impl<S> FromRequestParts<S> for ConflictPath
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request("bad_url", rejection.body_text()))?;
        ConflictId::parse(&raw).map(ConflictPath).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_conflict_id",
                format!("{raw:?} is not a conflict id (32 hex digits)"),
            )
        })
    }
}

/// The query string parsed as `T`.
#[derive(Debug)]
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection| ApiError::bad_request("bad_query", rejection.body_text()))
    }
}
