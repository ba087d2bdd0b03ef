//! The API's error answer, `{"error": {"code", "message"}}` with a fitting
//! status, and the mapping from library errors to it.
//!
//! Codes are stable and machine-readable; messages are for people and are
//! clipped so an error never echoes a huge input back.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Longest error message sent, in characters.
const MESSAGE_CHARS_MAX: usize = 512;

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The document the error is about, when one of several is.
    doc: Option<String>,
    /// More fields of `error` (the counter and rights of
    /// `insufficient_rights`).
    fields: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if let Some((cut, _)) = message.char_indices().nth(MESSAGE_CHARS_MAX) {
            message.truncate(cut);
            message.push('…');
        }
        ApiError {
            status,
            code,
            message,
            doc: None,
            fields: serde_json::Map::new(),
        }
    }

    /// Names the document when the error names none yet.
    pub(crate) fn or_doc(self, doc: &archipelago::DocId) -> Self {
        if self.doc.is_some() {
            self
        } else {
            self.for_doc(doc)
        }
    }

    /// Adds a field to `error`.
    pub(crate) fn with_field(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.fields.insert(key.to_owned(), value.into());
        self
    }

    /// The machine-readable code.
    pub(crate) fn code(&self) -> &'static str {
        self.code
    }

    /// Names the document the error is about (`"doc"` in the answer).
    pub(crate) fn for_doc(mut self, doc: &archipelago::DocId) -> Self {
        self.doc = Some(doc.to_string());
        self
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(crate) fn unauthorized(message: &str) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub(crate) fn payload_too_large(limit_bytes: usize) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {limit_bytes} bytes"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({
            "error": {"code": self.code, "message": self.message}
        });
        if let Some(doc) = self.doc {
            body["error"]["doc"] = serde_json::Value::String(doc);
        }
        for (key, value) in self.fields {
            body["error"][key] = value;
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<archipelago::Error> for ApiError {
    fn from(error: archipelago::Error) -> ApiError {
        use archipelago::Error;
        let message = error.to_string();
        match &error {
            Error::Op(op) if escrow_refusal(op).is_some() => {
                escrow_refusal(op).expect("just matched")
            }
            Error::TxnOp { doc, source } if escrow_refusal(source).is_some() => {
                escrow_refusal(source).expect("just matched").for_doc(doc)
            }
            Error::Op(op) if op.is_malformed_input() => ApiError::bad_request(op.code(), message),
            Error::Op(op) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, op.code(), message),
            Error::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "doc_not_found", message),
            Error::ConflictNotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "conflict_not_found", message)
            }
            Error::ConflictClosed { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict_closed", message)
            }
            Error::UnknownHeads { .. } => ApiError::bad_request("unknown_heads", message),
            Error::PreconditionFailed { doc, .. } => {
                ApiError::new(StatusCode::CONFLICT, "precondition_failed", message).for_doc(doc)
            }
            Error::TxnOp { doc, source } if source.is_malformed_input() => {
                ApiError::bad_request(source.code(), message).for_doc(doc)
            }
            Error::TxnOp { doc, source } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, source.code(), message).for_doc(doc)
            }
            Error::Txn(_) => ApiError::bad_request("bad_txn", message),
            Error::Saga(archipelago::saga::SagaError::Invalid(_)) => {
                ApiError::bad_request("bad_saga", message)
            }
            Error::Saga(archipelago::saga::SagaError::Exists(_)) => {
                ApiError::new(StatusCode::CONFLICT, "saga_exists", message)
            }
            Error::Saga(archipelago::saga::SagaError::NotFound(_)) => {
                ApiError::new(StatusCode::NOT_FOUND, "saga_not_found", message)
            }
            Error::TooMany { .. } => ApiError::bad_request("too_many", message),
            Error::StrongDocument(doc) => {
                ApiError::bad_request("strong_document", message).for_doc(doc)
            }
            Error::InvalidId(_) => ApiError::bad_request("invalid_id", message),
            Error::CorruptDocument { .. } => {
                tracing::error!(error = %message, "corrupt document");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "corrupt_document",
                    message,
                )
            }
            // Not "unavailable": the edit took effect, and a client that
            // retries it (an `inc`, an `insert`) would apply it twice.
            Error::NotDurable { doc, .. } => {
                tracing::error!(error = %message, "write not durable");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_durable", message).for_doc(doc)
            }
            Error::Store(_) => {
                tracing::error!(error = %message, "store failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    message,
                )
            }
            _ => {
                tracing::error!(error = %message, "request failed");
                ApiError::internal(message)
            }
        }
    }
}

/// The 409 of an op on a bounded counter refused for want of rights or
/// past its `max`, with the counter and the rights in `error`.
fn escrow_refusal(op: &archipelago::doc::OpError) -> Option<ApiError> {
    use archipelago::doc::OpError;
    match op {
        OpError::InsufficientRights {
            path,
            available_here,
            available_total,
            ..
        } => Some(
            ApiError::new(StatusCode::CONFLICT, "insufficient_rights", op.to_string())
                .with_field("path", path.as_str())
                .with_field("available_here", *available_here)
                .with_field("available_total", *available_total),
        ),
        OpError::AboveMax { path, max, value } => Some(
            ApiError::new(StatusCode::CONFLICT, "above_max", op.to_string())
                .with_field("path", path.as_str())
                .with_field("max", *max)
                .with_field("value", *value),
        ),
        _ => None,
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(error: tokio::task::JoinError) -> ApiError {
        if error.is_panic() {
            tracing::error!("a request handler panicked");
            ApiError::internal("the request could not be completed (internal panic)")
        } else {
            ApiError::internal("the request was cancelled")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_blocking_call_becomes_a_500() {
        let joined = tokio::task::spawn_blocking(|| panic!("boom")).await;
        let error = ApiError::from(joined.unwrap_err());
        assert_eq!(error.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error.code, "internal");
    }

    #[test]
    fn a_write_that_took_effect_but_failed_is_not_durable_not_unavailable() {
        use archipelago::store::StoreError;
        let doc: archipelago::DocId = "d".parse().unwrap();
        let failed = ApiError::from(archipelago::Error::NotDurable {
            doc,
            source: StoreError::Injected,
        });
        assert_eq!(
            (failed.status, failed.code),
            (StatusCode::SERVICE_UNAVAILABLE, "not_durable")
        );
        assert!(failed.message.contains("retrying"), "{}", failed.message);
        let refused = ApiError::from(archipelago::Error::Store(StoreError::Injected));
        assert_eq!(refused.code, "store_unavailable");
    }

    #[test]
    fn long_messages_are_clipped() {
        let error = ApiError::bad_request("x", "é".repeat(10_000));
        assert_eq!(error.message.chars().count(), MESSAGE_CHARS_MAX + 1);
    }
}
