//! The CLI's HTTP client: finds a node's address and token from its config,
//! sends API requests, and turns error answers into messages.
//!
//! The address is the configured `api.listen`, unless its port is 0, in
//! which case the running node wrote the real one to `api.addr` next to the
//! config. An unspecified listen address (`0.0.0.0`) is reached on loopback.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::Method;
use serde_json::Value;

use crate::api::ApiToken;
use crate::config::Config;
use crate::node::reachable;

/// Everything but RFC 3986 unreserved characters is encoded, so `/` in a
/// document id becomes `%2F` and stays inside one path segment.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How long a CLI request may take in all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a download ([`Client::download`]) may take in all.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Percent-encodes a path segment or query value.
pub(crate) fn encode(text: &str) -> String {
    utf8_percent_encode(text, NOT_UNRESERVED).to_string()
}

/// An error answer from the node.
#[derive(Debug)]
pub(crate) struct HttpError {
    status: reqwest::StatusCode,
    code: String,
    message: String,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (HTTP {}, {})", self.message, self.status, self.code)
    }
}

impl std::error::Error for HttpError {}

/// A client of one node's API.
#[derive(Debug)]
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// A client for the node configured by the file at `config_path`.
    pub(crate) fn from_config(config_path: &Path) -> anyhow::Result<Client> {
        let config = Config::load(config_path)?;
        let addr = node_addr(&config)?;
        let token = config.read_token()?;
        Client::new(format!("http://{addr}"), token.as_str())
    }

    /// A client for the node whose API is at `url` (`http://HOST:PORT`),
    /// with the token kept in `token_file` (the node's `api.token`).
    pub(crate) fn from_url(url: &str, token_file: &Path) -> anyhow::Result<Client> {
        let base = url.trim_end_matches('/');
        let address = base
            .strip_prefix("http://")
            .with_context(|| format!("{url} is not an http://HOST:PORT address"))?;
        anyhow::ensure!(
            !address.is_empty() && !address.contains('/'),
            "{url} is not an http://HOST:PORT address"
        );
        let text = std::fs::read_to_string(token_file)
            .with_context(|| format!("cannot read the token file {}", token_file.display()))?;
        let token = ApiToken::new(text.trim())
            .with_context(|| format!("{} does not hold a token", token_file.display()))?;
        Client::new(base.to_owned(), token.as_str())
    }

    fn new(base: String, token: &str) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Client {
            http,
            base,
            token: token.to_owned(),
        })
    }

    /// Sends a request and returns the JSON answer; an error answer becomes
    /// an [`HttpError`].
    pub(crate) async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path_and_query}", self.base);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the node at {}", self.base))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("reading the answer to {method} {url}"))?;
        let value: Option<Value> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            return value.with_context(|| format!("the answer to {method} {url} is not JSON"));
        }
        Err(http_error(status, value.as_ref(), &bytes).into())
    }

    /// Sends a `GET` and writes the answer's body to `out` as it arrives,
    /// for answers too large to hold (a backup): it may take up to
    /// [`DOWNLOAD_TIMEOUT`]. Returns the answer's headers and the bytes
    /// written; an error answer becomes an [`HttpError`].
    pub(crate) async fn download(
        &self,
        path_and_query: &str,
        out: &mut impl std::io::Write,
    ) -> anyhow::Result<(reqwest::header::HeaderMap, u64)> {
        let url = format!("{}{path_and_query}", self.base);
        let mut response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .timeout(DOWNLOAD_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("cannot reach the node at {}", self.base))?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response.bytes().await.unwrap_or_default();
            let value: Option<Value> = serde_json::from_slice(&bytes).ok();
            return Err(http_error(status, value.as_ref(), &bytes).into());
        }
        let headers = response.headers().clone();
        let mut written = 0u64;
        while let Some(chunk) = response
            .chunk()
            .await
            .with_context(|| format!("reading the answer to GET {url}"))?
        {
            out.write_all(&chunk).context("cannot write what arrived")?;
            written += chunk.len() as u64;
        }
        Ok((headers, written))
    }
}

/// The [`HttpError`] for an error answer: its JSON `error`, or its text.
fn http_error(status: reqwest::StatusCode, value: Option<&Value>, bytes: &[u8]) -> HttpError {
    let error = value.and_then(|v| v.get("error"));
    let text = |key: &str| {
        error
            .and_then(|e| e.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    HttpError {
        status,
        code: text("code").unwrap_or_else(|| "unknown".to_owned()),
        message: text("message")
            .unwrap_or_else(|| String::from_utf8_lossy(bytes).trim().to_owned()),
    }
}

/// The address to reach the node at.
fn node_addr(config: &Config) -> anyhow::Result<SocketAddr> {
    let listen = config.file.api.listen;
    let addr = if listen.port() == 0 {
        let path = config.api_addr_path();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "the config listens on port 0 and {} cannot be read; is the node running?",
                path.display()
            )
        })?;
        text.trim()
            .parse()
            .with_context(|| format!("{} does not hold an address", path.display()))?
    } else {
        listen
    };
    Ok(reachable(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_encoded_as_one_segment() {
        assert_eq!(encode("inventory/sku-1"), "inventory%2Fsku-1");
        assert_eq!(encode("a.b_c~d-e"), "a.b_c~d-e");
        assert_eq!(encode("bad id"), "bad%20id");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn node_urls_must_be_plain_http_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("api.token");
        std::fs::write(&token, "a".repeat(43)).unwrap();
        for url in ["http://127.0.0.1:7070", "http://node-a:7070/"] {
            assert!(Client::from_url(url, &token).is_ok(), "{url}");
        }
        for url in [
            "127.0.0.1:7070",
            "https://node-a:7070",
            "http://",
            "http://a:1/v1",
        ] {
            assert!(Client::from_url(url, &token).is_err(), "{url}");
        }
        let missing = dir.path().join("missing.token");
        let error = Client::from_url("http://127.0.0.1:7070", &missing).unwrap_err();
        assert!(format!("{error:#}").contains("cannot read the token file"));
    }

    #[test]
    fn unspecified_addresses_become_loopback() {
        let addr: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        assert_eq!(reachable(addr), "127.0.0.1:7070".parse().unwrap());
        let addr: SocketAddr = "[::]:7070".parse().unwrap();
        assert_eq!(reachable(addr), "[::1]:7070".parse().unwrap());
        let addr: SocketAddr = "10.0.0.1:7070".parse().unwrap();
        assert_eq!(reachable(addr), addr);
    }
}
