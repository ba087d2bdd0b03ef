//! The strong tier over HTTP, on a node started in-process on 127.0.0.1
//! whose `[strong]` tier has it as its only voter: strong writes through
//! `POST /v1/txn` and `POST /v1/docs/{id}/ops` with their preconditions,
//! what is refused (mixed transactions, whole-value writes, local writes to
//! strong documents), linearizable reads, leases, members, status and
//! metrics, and the CLI's `strong` commands. The tier across several
//! sites is covered by `strong_jepsen.rs` and the library's tests.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sync_node::config::Config;
use sync_node::init::{init, InitOptions};
use sync_node::Node;

mod support;
use support::{get_json, metrics_text};

struct TestNode {
    node: Node,
    http: reqwest::Client,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl TestNode {
    async fn start() -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let path = init(&InitOptions::new("us-east".parse().unwrap(), dir.path())).unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(
            "\n[strong]\nvoters = [\"us-east\"]\nprefixes = [\"accounts/*\", \"usernames/*\"]\n",
        );
        std::fs::write(&path, text).unwrap();
        let node = Node::start(&Config::load(&path).unwrap()).await.unwrap();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let test = TestNode {
            node,
            http,
            config: path,
            _dir: dir,
        };
        // The lone voter elects itself.
        let started = std::time::Instant::now();
        while test.status().await["strong"]["role"] != "leader" {
            assert!(started.elapsed() < Duration::from_secs(20), "no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        test
    }

    async fn status(&self) -> Value {
        get_json(&self.http, &self.node, "/v1/status").await.1
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.node.url()))
            .bearer_auth(self.node.token());
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }
}

#[tokio::test]
async fn strong_writes_go_through_the_tier_with_their_preconditions() {
    let t = TestNode::start().await;
    let (status, body) = t
        .post(
            "/v1/txn",
            json!({"docs": [
                {"id": "accounts/alice", "if_absent": true, "ops": [{"op": "set", "path": "/balance", "value": 100}]},
                {"id": "accounts/bob", "if_absent": true, "ops": [{"op": "set", "path": "/balance", "value": 0}]},
            ], "message": "open"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["docs"].as_array().unwrap().len(), 2);
    let alice_heads = body["docs"][0]["heads"].clone();
    assert!(body["docs"][0]["change"].is_string(), "{body}");
    assert!(body["txn"].is_string(), "{body}");

    // A stale if_heads: 409 naming the document, nothing applied.
    let (status, body) = t
        .post(
            "/v1/docs/accounts%2Falice/ops",
            json!({"ops": [{"op": "set", "path": "/balance", "value": 1}], "if_heads": ["00".repeat(32)]}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "precondition_failed");
    assert_eq!(body["error"]["doc"], "accounts/alice");
    // The right heads: applied, once, answered like a CRDT write.
    let (status, body) = t
        .post(
            "/v1/docs/accounts%2Falice/ops",
            json!({"ops": [{"op": "set", "path": "/balance", "value": 90}], "if_heads": alice_heads}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["heads"], json!([body["change"]]));
    // if_absent on an existing document.
    let (status, body) = t
        .post(
            "/v1/txn",
            json!({"docs": [{"id": "accounts/bob", "if_absent": true, "ops": [{"op": "set", "path": "/balance", "value": 5}]}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["doc"], "accounts/bob");
    // An op that does not fit: 422, nothing applied.
    let (status, body) = t
        .post(
            "/v1/docs/accounts%2Fbob/ops",
            json!({"ops": [{"op": "inc", "path": "/balance", "by": 1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // Reads: local and linearizable agree.
    let (status, local) = get_json(&t.http, &t.node, "/v1/docs/accounts%2Falice").await;
    assert_eq!(status, StatusCode::OK);
    let (status, linear) = get_json(
        &t.http,
        &t.node,
        "/v1/docs/accounts%2Falice?consistency=linearizable",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{linear}");
    assert_eq!(linear["value"], json!({"balance": 90}));
    assert_eq!(linear["heads"], local["heads"]);
    let (status, _) = get_json(
        &t.http,
        &t.node,
        "/v1/docs/accounts%2Fnobody?consistency=linearizable",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = get_json(
        &t.http,
        &t.node,
        "/v1/docs/accounts%2Falice?consistency=eventual",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Status and metrics show the tier.
    let status_body = t.status().await;
    let strong = &status_body["strong"];
    assert_eq!(strong["role"], "leader");
    assert_eq!(strong["leader"], "us-east");
    assert!(strong["term"].as_u64().unwrap() >= 1);
    assert!(strong["commit_index"].as_u64().unwrap() >= 2, "{strong}");
    assert_eq!(strong["voters"][0]["site"], "us-east");
    assert_eq!(strong["voters"][0]["lag"], 0);
    let metrics = metrics_text(&t.http, &t.node).await;
    for name in [
        "archipelago_strong_commits_total 2",
        "archipelago_strong_commit_seconds",
        "archipelago_strong_term",
        "archipelago_strong_leader 1",
        "archipelago_strong_commit_index",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
}

#[tokio::test]
async fn what_cannot_go_through_the_tier_is_refused_with_nothing_applied() {
    let t = TestNode::start().await;
    let (status, body) = t
        .post(
            "/v1/txn",
            json!({"docs": [
                {"id": "accounts/alice", "ops": [{"op": "set", "path": "/balance", "value": 1}]},
                {"id": "orders/1", "ops": [{"op": "set", "path": "/x", "value": 1}]},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "bad_txn");
    let (status, body) = t
        .send(
            reqwest::Method::PUT,
            "/v1/docs/accounts%2Falice",
            Some(json!({"value": {"balance": 1}})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "strong_document");
    for id in ["accounts%2Falice", "orders%2F1"] {
        let (status, _) = get_json(&t.http, &t.node, &format!("/v1/docs/{id}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{id} was written");
    }
    // CRDT documents are untouched by the tier.
    let (status, body) = t
        .post(
            "/v1/docs/orders%2F1/ops",
            json!({"ops": [{"op": "set", "path": "/x", "value": 1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_and_members_are_shown_and_changed_through_the_api_and_the_cli() {
    let t = TestNode::start().await;
    let (status, body) = get_json(&t.http, &t.node, "/v1/strong/leases").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"leases": []}));
    let (status, body) = get_json(&t.http, &t.node, "/v1/strong/members").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["voters"].as_array().unwrap().len(), 1, "{body}");
    let (status, body) = t
        .post("/v1/strong/members", json!({"add": "x", "remove": "y"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let config = t.config.to_str().unwrap().to_owned();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sync-node"))
        .args(["strong", "members", "--config", &config])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["leader"], "us-east", "{shown}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sync-node"))
        .args(["strong", "leases", "--config", &config])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}
