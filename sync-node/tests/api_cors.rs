//! Cross-origin calls from web pages (`[api] cors_origins`), against a node
//! started in-process on 127.0.0.1: preflights and actual requests from a
//! listed and an unlisted origin, a node that lists none, and origins the
//! config refuses.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use sync_node::config::Config;
use sync_node::init::{init, InitOptions};
use sync_node::Node;

const LISTED: &str = "http://localhost:5173";
const UNLISTED: &str = "http://evil.localhost:5173";

/// A node whose config lists `origins`, in a temporary directory.
async fn node_with(origins: &[&str]) -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = init(&InitOptions::new("us-east".parse().unwrap(), dir.path())).unwrap();
    let list: Vec<String> = origins.iter().map(|o| format!("{o:?}")).collect();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "token_file = \"api.token\"\n",
        &format!(
            "token_file = \"api.token\"\ncors_origins = [{}]\n",
            list.join(", ")
        ),
    );
    std::fs::write(&path, text).unwrap();
    let node = Node::start(&Config::load(&path).unwrap()).await.unwrap();
    (node, dir)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A preflight as a browser sends it before a `POST` with a token: no token.
async fn preflight(node: &Node, origin: &str) -> (StatusCode, HeaderMap) {
    let response = http()
        .request(
            Method::OPTIONS,
            format!("{}/v1/docs/orders%2F1/ops", node.url()),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    (response.status(), response.headers().clone())
}

/// `GET /v1/status` from `origin`, with the token or without.
async fn status(node: &Node, origin: &str, token: bool) -> (StatusCode, HeaderMap) {
    let mut request = http()
        .get(format!("{}/v1/status", node.url()))
        .header("origin", origin);
    if token {
        request = request.bearer_auth(node.token());
    }
    let response = request.send().await.unwrap();
    (response.status(), response.headers().clone())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|value| value.to_str().unwrap())
}

/// The `Access-Control-*` headers of an answer.
fn cors_headers(headers: &HeaderMap) -> Vec<String> {
    headers
        .keys()
        .map(|name| name.as_str().to_owned())
        .filter(|name| name.starts_with("access-control-"))
        .collect()
}

#[tokio::test]
async fn a_listed_origin_gets_preflights_and_marked_answers() {
    let (node, _dir) = node_with(&[LISTED, "https://app.example.com"]).await;

    let (code, headers) = preflight(&node, LISTED).await;
    assert_eq!(code, StatusCode::NO_CONTENT);
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some(LISTED)
    );
    let methods = header(&headers, "access-control-allow-methods").unwrap();
    for method in ["GET", "PUT", "POST"] {
        assert!(methods.contains(method), "{methods}");
    }
    assert_eq!(
        header(&headers, "access-control-allow-headers"),
        Some("authorization, content-type, last-event-id")
    );
    assert_eq!(header(&headers, "access-control-allow-credentials"), None);

    let (code, headers) = status(&node, LISTED, true).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some(LISTED)
    );
    assert!(header(&headers, "vary").unwrap().contains("origin"));

    // The page can read why it was refused, and the token is still needed.
    let (code, headers) = status(&node, LISTED, false).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some(LISTED)
    );

    // The second listed origin is answered with itself, not the first.
    let (code, headers) = preflight(&node, "https://app.example.com").await;
    assert_eq!(code, StatusCode::NO_CONTENT);
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("https://app.example.com")
    );
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unlisted_origin_gets_no_cors_headers() {
    let (node, _dir) = node_with(&[LISTED]).await;
    // A preflight goes to the token check like any request, and fails it.
    let (code, headers) = preflight(&node, UNLISTED).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert_eq!(cors_headers(&headers), Vec::<String>::new());
    let (code, headers) = status(&node, UNLISTED, true).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(cors_headers(&headers), Vec::<String>::new());
    // Origins compare exactly: another port is another origin.
    let (code, headers) = preflight(&node, "http://localhost:5174").await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert_eq!(cors_headers(&headers), Vec::<String>::new());
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_node_listing_no_origin_answers_no_preflight() {
    let (node, _dir) = node_with(&[]).await;
    let (code, headers) = preflight(&node, LISTED).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert_eq!(cors_headers(&headers), Vec::<String>::new());
    let (code, headers) = status(&node, LISTED, true).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(cors_headers(&headers), Vec::<String>::new());
    node.shutdown().await.unwrap();
}

#[test]
fn origins_a_browser_never_sends_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = init(&InitOptions::new("us-east".parse().unwrap(), dir.path())).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    for bad in ["http://localhost:5173/", "*", "localhost:5173"] {
        let with = text.replace(
            "token_file = \"api.token\"\n",
            &format!("token_file = \"api.token\"\ncors_origins = [{bad:?}]\n"),
        );
        std::fs::write(&path, with).unwrap();
        let error = Config::load(&path).unwrap_err().to_string();
        assert!(error.contains("cors_origins"), "{bad}: {error}");
    }
}
