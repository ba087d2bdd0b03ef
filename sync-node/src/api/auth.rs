//! Bearer-token authentication of the HTTP API: the token type and the
//! middleware that checks every request except health.
//!
//! The token is compared in constant time, so response timing does not
//! reveal how much of a guess was right.

use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use archipelago::DocId;

use super::error::ApiError;
use super::tokens::ScopedToken;
use super::ApiState;

/// Longest accepted token, in bytes.
pub const TOKEN_BYTES_MAX: usize = 1024;

/// The secret a client presents as `Authorization: Bearer TOKEN`. Its
/// `Debug` output is redacted.
#[derive(Clone)]
pub struct ApiToken(String);

/// A token that cannot be used in an HTTP header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid API token: {0}")]
pub struct InvalidToken(&'static str);

impl ApiToken {
    /// A new random token: 32 bytes from the operating system's generator,
    /// as 64 hex digits.
    pub fn generate() -> ApiToken {
        let bytes: [u8; 32] = rand::random();
        ApiToken(hex::encode(bytes))
    }

    /// Checks a token read from a file or given by an embedder.
    pub fn new(text: &str) -> Result<ApiToken, InvalidToken> {
        if text.is_empty() {
            return Err(InvalidToken("it is empty"));
        }
        if text.len() > TOKEN_BYTES_MAX {
            return Err(InvalidToken("it is longer than 1024 bytes"));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidToken(
                "it must be printable ASCII without spaces, to fit in a header",
            ));
        }
        Ok(ApiToken(text.to_owned()))
    }

    /// The token text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `candidate` is this token; takes the same time for every
    /// candidate of a given length.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if candidate.len() != expected.len() {
            return false;
        }
        let difference = expected
            .iter()
            .zip(candidate)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// The path that answers without a token.
const HEALTH_PATH: &str = "/v1/health";

/// Refuses requests without the right bearer token, except health.
pub(crate) async fn require_token(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == HEALTH_PATH {
        return next.run(request).await;
    }
    let from_query = (request.uri().path() == super::clients::PATH)
        .then(|| request.uri().query().and_then(query_token))
        .flatten();
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .map(|value| value.as_bytes())
        .and_then(bearer)
        .map(<[u8]>::to_vec)
        .or(from_query);
    let presented = presented.as_deref();
    let mut request = request;
    match presented {
        Some(token) if state.token.matches(token) => {
            request.extensions_mut().insert(Principal::Admin);
            next.run(request).await
        }
        Some(token) => match state.tokens.check(token) {
            Some(scoped) => {
                if let Err(refusal) = scoped_may(&request, &scoped) {
                    return refusal.into_response();
                }
                request.extensions_mut().insert(Principal::Scoped(scoped));
                next.run(request).await
            }
            None => ApiError::unauthorized("the bearer token is wrong").into_response(),
        },
        None => {
            ApiError::unauthorized("an Authorization: Bearer token is required").into_response()
        }
    }
}

/// Who a request comes from.
#[derive(Debug, Clone)]
pub(crate) enum Principal {
    /// The node's own token: everything.
    Admin,
    /// A scoped token: the documents under its prefixes.
    Scoped(Arc<ScopedToken>),
}

impl Principal {
    /// Refuses `doc` (and a write, with `writes`) outside what this may do.
    pub(crate) fn check(&self, doc: &DocId, writes: bool) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Scoped(token) => scoped_doc(token, doc, writes),
        }
    }

    /// The token's name, `admin` for the node's own.
    pub(crate) fn name(&self) -> &str {
        match self {
            Principal::Admin => "admin",
            Principal::Scoped(token) => &token.name,
        }
    }
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(axum::http::StatusCode::FORBIDDEN, "forbidden", message)
}

fn scoped_doc(token: &ScopedToken, doc: &DocId, writes: bool) -> Result<(), ApiError> {
    if !token.covers(doc) {
        return Err(forbidden(format!(
            "token {} does not open {doc}",
            token.name
        )));
    }
    if writes && token.read_only {
        return Err(forbidden(format!("token {} only reads", token.name)));
    }
    Ok(())
}

/// The routes a scoped token may use: a document's own routes (for
/// documents under its prefixes), the document list under them,
/// transactions and reads (checked per document by their handlers), and
/// the automerge-repo WebSocket. Everything else is the admin's.
fn scoped_may(request: &Request, token: &ScopedToken) -> Result<(), ApiError> {
    let path = request.uri().path();
    let reads = request.method() == axum::http::Method::GET;
    if path == super::clients::PATH || (path == "/v1/read" && !reads) || path == "/v1/docs" {
        return Ok(());
    }
    if path == "/v1/txn" {
        return if token.read_only {
            Err(forbidden(format!("token {} only reads", token.name)))
        } else {
            Ok(())
        };
    }
    if let Some(rest) = path.strip_prefix("/v1/docs/") {
        let segment = rest.split('/').next().unwrap_or_default();
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        // A malformed id is the handler's to refuse (400).
        return match decoded.parse::<DocId>() {
            Ok(doc) => scoped_doc(token, &doc, !reads),
            Err(_) => Ok(()),
        };
    }
    Err(forbidden(format!(
        "token {} may use only the document routes",
        token.name
    )))
}

/// The `token` parameter of a query string, decoded: browsers cannot set
/// headers on a WebSocket, so its route also takes the token there.
fn query_token(query: &str) -> Option<Vec<u8>> {
    query.split('&').find_map(|pair| {
        let value = pair.strip_prefix("token=")?;
        let decoded: Vec<u8> = percent_encoding::percent_decode_str(value).collect();
        (decoded.len() <= TOKEN_BYTES_MAX).then_some(decoded)
    })
}

/// The credentials of an `Authorization: Bearer ...` header value.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    Some(value[SCHEME.len()..].trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_64_hex_digits_and_differ() {
        let a = ApiToken::generate();
        let b = ApiToken::generate();
        assert_eq!(a.as_str().len(), 64);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(format!("{a:?}"), "ApiToken(<redacted>)");
    }

    #[test]
    fn matching_is_exact() {
        let token = ApiToken::new("secret").unwrap();
        assert!(token.matches(b"secret"));
        assert!(!token.matches(b"secreT"));
        assert!(!token.matches(b"secret2"));
        assert!(!token.matches(b""));
        assert!(ApiToken::new("").is_err());
        assert!(ApiToken::new("a b").is_err());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bear"), None);
    }
}
