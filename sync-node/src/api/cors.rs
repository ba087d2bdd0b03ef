//! Cross-origin requests from web pages (`[api] cors_origins`).
//!
//! A browser lets a page call the API from another origin only when the API
//! says so. For a request that carries `Authorization` it first sends a
//! preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`,
//! and no token. A preflight from a listed origin is answered here, before
//! the token check, with 204 and the methods and headers the API takes;
//! every other answer to a listed origin names that origin in
//! `Access-Control-Allow-Origin`. Requests from any other origin pass
//! through untouched and get no `Access-Control-*` header, so the browser
//! keeps the page from reading them.
//!
//! Listed origins still need the token for everything but the preflight:
//! CORS decides which pages may try, the token decides who may act. No
//! cookies are involved, so credentials are never allowed.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
    VARY,
};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Most origins a node lists.
pub const CORS_ORIGINS_MAX: usize = 64;
/// Longest origin, in bytes.
pub const CORS_ORIGIN_BYTES_MAX: usize = 256;

/// The methods the API's routes take.
const ALLOW_METHODS: &str = "GET, PUT, POST";
/// The request headers a page may send.
const ALLOW_HEADERS: &str = "authorization, content-type, last-event-id";
/// How long a browser may cache a preflight answer, in seconds.
const MAX_AGE_SECS: &str = "600";

/// The origins whose pages may call the API; empty (the default) allows
/// none.
#[derive(Debug, Clone, Default)]
pub struct CorsOrigins(Arc<[HeaderValue]>);

impl CorsOrigins {
    /// Checks and keeps `origins`, each `http://HOST[:PORT]` or
    /// `https://HOST[:PORT]` exactly as a browser sends it in `Origin`
    /// (lower case, no path, no trailing slash).
    pub fn new(origins: &[String]) -> Result<CorsOrigins, String> {
        if origins.len() > CORS_ORIGINS_MAX {
            return Err(format!(
                "api.cors_origins lists {} origins; at most {CORS_ORIGINS_MAX}",
                origins.len()
            ));
        }
        let values = origins
            .iter()
            .map(|origin| {
                check_origin(origin)
                    .map_err(|why| format!("api.cors_origins: {origin:?} {why}"))?;
                HeaderValue::from_str(origin)
                    .map_err(|_| format!("api.cors_origins: {origin:?} cannot be a header value"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CorsOrigins(values.into()))
    }

    /// True when no origin is listed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        self.0.iter().any(|listed| listed == origin)
    }
}

/// Why `origin` is not one a browser sends, or `Ok`.
fn check_origin(origin: &str) -> Result<(), &'static str> {
    if origin.len() > CORS_ORIGIN_BYTES_MAX {
        return Err("is longer than 256 bytes");
    }
    let host_port = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    if host_port.is_empty() {
        return Err("names no host");
    }
    if host_port.contains(['/', '?', '#']) {
        return Err(
            "must not have a path (browsers send the origin without one, nor a trailing /)",
        );
    }
    if host_port.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("must be in lower case, as browsers send it");
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b);
    if !host_port.bytes().all(allowed) {
        return Err("has characters no host name or port has");
    }
    // The port follows the last ':' outside an IPv6 literal's brackets.
    let port = match host_port.rfind(':') {
        Some(i) if !host_port[i..].contains(']') => Some(&host_port[i + 1..]),
        _ => None,
    };
    if let Some(port) = port {
        if port.parse::<u16>().is_err() {
            return Err("has a port that is not a number from 0 to 65535");
        }
    }
    Ok(())
}

/// The middleware: answers preflights from listed origins and marks the
/// answers to them.
pub(crate) async fn handle(
    State(origins): State<CorsOrigins>,
    request: Request,
    next: Next,
) -> Response {
    if origins.is_empty() {
        return next.run(request).await;
    }
    let listed = request
        .headers()
        .get(ORIGIN)
        .filter(|origin| origins.allows(origin))
        .cloned();
    let Some(origin) = listed else {
        let mut response = next.run(request).await;
        // The answer depends on the origin: caches must keep them apart.
        response
            .headers_mut()
            .append(VARY, HeaderValue::from_static("origin"));
        return response;
    };
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        preflight_answer()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(VARY, HeaderValue::from_static("origin"));
    if !preflight {
        headers.insert(
            ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
    }
    response
}

fn preflight_answer() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            (
                ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(ALLOW_METHODS),
            ),
            (
                ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOW_HEADERS),
            ),
            (
                ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static(MAX_AGE_SECS),
            ),
        ],
    )
        .into_response()
}

/// The answer headers a page may read beyond the CORS-safelisted ones: the
/// backup's labels.
const EXPOSE_HEADERS: &str = "x-archipelago-site, x-archipelago-docs, x-archipelago-taken-at-ms";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::backup::{DOCS_HEADER, SITE_HEADER, TAKEN_AT_HEADER};

    #[test]
    fn the_backup_labels_are_exposed() {
        let exposed: Vec<&str> = EXPOSE_HEADERS.split(", ").collect();
        assert_eq!(exposed, [SITE_HEADER, DOCS_HEADER, TAKEN_AT_HEADER]);
    }

    #[test]
    fn origins_are_checked_as_browsers_send_them() {
        for good in [
            "http://localhost:5173",
            "https://app.example.com",
            "http://127.0.0.1:8080",
            "http://[::1]:3000",
            "https://[::1]",
        ] {
            assert!(CorsOrigins::new(&[good.to_owned()]).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("localhost:5173", "http://"),
            ("http://", "no host"),
            ("http://localhost:5173/", "path"),
            ("https://app.example.com/ui", "path"),
            ("http://Localhost", "lower case"),
            ("http://local host", "characters"),
            ("http://localhost:99999", "port"),
            ("*", "http://"),
        ] {
            let error = CorsOrigins::new(&[bad.to_owned()]).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
        let many = vec!["http://localhost".to_owned(); CORS_ORIGINS_MAX + 1];
        assert!(CorsOrigins::new(&many).unwrap_err().contains("at most"));
    }
}
