//! Bounded counters through the HTTP API, from outside: created by an op,
//! read with their rights, decremented within them and refused 409
//! `insufficient_rights` beyond them with nothing applied, `above_max`,
//! inside a transaction, bad inputs, a transfer, and the metrics.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sync_node::config::Config;
use sync_node::init::{init, InitOptions};
use sync_node::Node;

mod support;
use support::{get_json, metrics_text};

const DOC: &str = "inventory%2Fsku-1";

async fn post(http: &reqwest::Client, node: &Node, path: &str, body: Value) -> (StatusCode, Value) {
    let response = http
        .post(format!("{}{path}", node.url()))
        .bearer_auth(node.token())
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn sell(http: &reqwest::Client, node: &Node, wait_ms: u64) -> (StatusCode, Value) {
    post(
        http,
        node,
        &format!("/v1/docs/{DOC}/ops"),
        json!({"ops": [{"op": "inc", "path": "/stock", "by": -1}], "wait_ms": wait_ms}),
    )
    .await
}

async fn escrow(http: &reqwest::Client, node: &Node) -> Value {
    let (status, body) = get_json(http, node, &format!("/v1/docs/{DOC}/escrow?path=/stock")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_creates_reads_spends_and_refuses_bounded_counters() {
    let dir = tempfile::tempdir().unwrap();
    let path = init(&InitOptions::new("us-east".parse().unwrap(), dir.path())).unwrap();
    let node = Node::start(&Config::load(&path).unwrap()).await.unwrap();
    let http = http();
    let ops = format!("/v1/docs/{DOC}/ops");

    let (status, body) = post(
        &http,
        &node,
        &ops,
        json!({"ops": [{"op": "set", "path": "/stock", "value": 3, "as": "bounded", "min": 0, "max": 5}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let state = escrow(&http, &node).await;
    assert_eq!(
        state,
        json!({"value": 3, "min": 0, "max": 5, "rights": {"us-east": 3}, "up_rights": {"us-east": 2}, "pending_requests": 0})
    );
    // The document reads as plain JSON.
    let (_, doc) = get_json(&http, &node, &format!("/v1/docs/{DOC}")).await;
    assert_eq!(doc["value"], json!({"stock": 3}));

    for _ in 0..3 {
        let (status, body) = sell(&http, &node, 0).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let heads = doc_heads(&http, &node).await;
    let (status, body) = post(
        &http,
        &node,
        &ops,
        json!({"ops": [{"op": "set", "path": "/sold", "value": true}, {"op": "inc", "path": "/stock", "by": -1}], "wait_ms": 100}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_rights");
    assert_eq!(body["error"]["doc"], "inventory/sku-1");
    assert_eq!(body["error"]["path"], "/stock");
    assert_eq!(body["error"]["available_here"], 0);
    assert_eq!(body["error"]["available_total"], 0);
    assert_eq!(doc_heads(&http, &node).await, heads, "nothing applied");

    // Past max.
    let (status, body) = post(
        &http,
        &node,
        &ops,
        json!({"ops": [{"op": "inc", "path": "/stock", "by": 6}]}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "above_max");

    // Inside a transaction: the order is not created.
    let (status, body) = post(
        &http,
        &node,
        "/v1/txn",
        json!({"docs": [
            {"id": "orders/1", "ops": [{"op": "set", "path": "/qty", "value": 1}]},
            {"id": "inventory/sku-1", "ops": [{"op": "inc", "path": "/stock", "by": -1}]}
        ], "wait_ms": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_rights");
    assert_eq!(body["error"]["doc"], "inventory/sku-1");
    let (status, _) = get_json(&http, &node, "/v1/docs/orders%2F1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Bad inputs.
    let (status, body) = sell(&http, &node, 30_001).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = post(
        &http,
        &node,
        &ops,
        json!({"ops": [{"op": "set", "path": "/stock", "value": 9}]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "bounded_counter");
    let (status, body) = post(
        &http,
        &node,
        &format!("/v1/docs/{DOC}/escrow/transfer"),
        json!({"path": "/stock", "to": "eu-west", "amount": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_rights");
    let (status, body) = get_json(&http, &node, &format!("/v1/docs/{DOC}/escrow?path=/sold")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // A restock, then a transfer of what it brought.
    let (status, body) = post(
        &http,
        &node,
        &ops,
        json!({"ops": [{"op": "inc", "path": "/stock", "by": 2}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(
        &http,
        &node,
        &format!("/v1/docs/{DOC}/escrow/transfer"),
        json!({"path": "/stock", "to": "eu-west", "amount": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let state = escrow(&http, &node).await;
    assert_eq!(state["rights"], json!({"us-east": 0, "eu-west": 2}));

    let metrics = metrics_text(&http, &node).await;
    assert!(
        metrics.contains("archipelago_escrow_ops_total{served=\"local\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("archipelago_escrow_ops_total{served=\"refused\"} 2"),
        "{metrics}"
    );
    node.shutdown().await.unwrap();
}

async fn doc_heads(http: &reqwest::Client, node: &Node) -> Value {
    let (status, body) = get_json(http, node, &format!("/v1/docs/{DOC}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["heads"].clone()
}
