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
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Client {
            http,
            base: format!("http://{addr}"),
            token: token.as_str().to_owned(),
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
        let error = value.as_ref().and_then(|v| v.get("error"));
        let text = |key: &str| {
            error
                .and_then(|e| e.get(key))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        Err(HttpError {
            status,
            code: text("code").unwrap_or_else(|| "unknown".to_owned()),
            message: text("message")
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_owned()),
        }
        .into())
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
    fn unspecified_addresses_become_loopback() {
        let addr: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        assert_eq!(reachable(addr), "127.0.0.1:7070".parse().unwrap());
        let addr: SocketAddr = "[::]:7070".parse().unwrap();
        assert_eq!(reachable(addr), "[::1]:7070".parse().unwrap());
        let addr: SocketAddr = "10.0.0.1:7070".parse().unwrap();
        assert_eq!(reachable(addr), addr);
    }
}
