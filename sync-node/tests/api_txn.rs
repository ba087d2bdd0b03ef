//! `POST /v1/txn`, `POST /v1/read` and `if_heads` on `POST
//! /v1/docs/{id}/ops`, exercised from outside against a node started
//! in-process on 127.0.0.1: the answers, every error case (with nothing
//! applied), events that carry the transaction, metrics, and optimistic
//! concurrency from 8 clients.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sync_node::config::Config;
use sync_node::init::{init, InitOptions};
use sync_node::Node;

mod support;
use support::{get_json, metrics_text, EventStream};

struct TestNode {
    node: Node,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl TestNode {
    async fn start() -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let path = init(&InitOptions::new("us-east".parse().unwrap(), dir.path())).unwrap();
        let node = Node::start(&Config::load(&path).unwrap()).await.unwrap();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        TestNode {
            node,
            http,
            _dir: dir,
        }
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.node.url()))
            .bearer_auth(self.node.token())
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post_raw(&self, path: &str, body: &'static str) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.node.url()))
            .bearer_auth(self.node.token())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        get_json(&self.http, &self.node, path).await
    }

    /// Every document's heads, to show an error applied nothing.
    async fn all_heads(&self) -> Value {
        self.get("/v1/heads?prefix=").await.1
    }
}

fn order_txn(order: u32) -> Value {
    json!({
        "docs": [
            {"id": format!("orders/{order}"), "ops": [{"op": "set", "path": "/qty", "value": 1}]},
            {"id": "inventory/sku-1", "ops": [{"op": "inc", "path": "/stock", "by": -1}]},
        ],
        "message": format!("order {order}"),
    })
}

async fn stock(node: &TestNode, value: i64) -> Value {
    let (status, body) = node
        .post(
            "/v1/docs/inventory%2Fsku-1/ops",
            json!({"ops": [{"op": "set", "path": "/stock", "value": value, "as": "counter"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["heads"].clone()
}

#[tokio::test]
async fn a_transaction_commits_across_documents_and_reads_back_whole() {
    let node = TestNode::start().await;
    stock(&node, 5).await;
    let (status, body) = node.post("/v1/txn", order_txn(1)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let txn = body["txn"].as_str().unwrap();
    assert_eq!(txn.len(), 32);
    let docs = body["docs"].as_array().unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0]["id"], "orders/1");
    assert_eq!(docs[1]["id"], "inventory/sku-1");
    for doc in docs {
        assert_eq!(doc["heads"], json!([doc["change"].clone()]));
    }
    let (_, history) = node.get("/v1/docs/orders%2F1/history").await;
    assert_eq!(history["changes"][0]["txn"], txn);
    assert_eq!(history["changes"][0]["message"], "order 1");

    let (status, read) = node
        .post(
            "/v1/read",
            json!({"ids": ["orders/1", "inventory/sku-1", "orders/none"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["docs"][0]["value"]["qty"], 1);
    assert_eq!(read["docs"][1]["value"]["stock"], 4);
    assert_eq!(read["docs"][1]["heads"], docs[1]["heads"]);
    assert_eq!(
        read["docs"][2],
        json!({"id": "orders/none", "heads": [], "value": null})
    );

    let metrics = metrics_text(&node.http, &node.node).await;
    for name in [
        "archipelago_txn_commits_total",
        "archipelago_txn_held ",
        "archipelago_txn_held_changes",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
    node.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_refused_transaction_applies_nothing() {
    let node = TestNode::start().await;
    let heads = stock(&node, 5).await;
    let before = node.all_heads().await;

    // A stale `if_heads`: 409 naming the document.
    let mut stale = order_txn(1);
    stale["docs"][1]["if_heads"] = json!(["ab".repeat(32)]);
    let (status, body) = node.post("/v1/txn", stale).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "precondition_failed");
    assert_eq!(body["error"]["doc"], "inventory/sku-1");

    // `if_heads: []` on a document that exists, `if_absent` likewise.
    for condition in [json!({"if_heads": []}), json!({"if_absent": true})] {
        let mut txn = order_txn(1);
        for (key, value) in condition.as_object().unwrap() {
            txn["docs"][1][key] = value.clone();
        }
        let (status, body) = node.post("/v1/txn", txn).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["doc"], "inventory/sku-1");
    }

    // An op that does not fit: 422 naming the document.
    let mut bad_op = order_txn(1);
    bad_op["docs"][1]["ops"] = json!([{"op": "inc", "path": "/stock/deeper", "by": 1}]);
    let (status, body) = node.post("/v1/txn", bad_op).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["doc"], "inventory/sku-1");

    // Malformed: 400.
    let duplicate = json!({"docs": [
        {"id": "a", "ops": [{"op": "set", "path": "/x", "value": 1}]},
        {"id": "a", "ops": [{"op": "set", "path": "/y", "value": 1}]},
    ]});
    let too_many = json!({"docs": (0..257).map(|i| json!({"id": format!("d/{i}"), "ops": [{"op": "set", "path": "/x", "value": 1}]})).collect::<Vec<_>>()});
    let bad_heads = json!({"docs": [{"id": "a", "ops": [{"op": "set", "path": "/x", "value": 1}], "if_heads": ["zz"]}]});
    let bad_id = json!({"docs": [{"id": "a b", "ops": []}]});
    let unknown_field = json!({"docs": [{"id": "a", "ops": [], "if_head": []}]});
    let empty = json!({"docs": []});
    for body in [duplicate, too_many, bad_heads, bad_id, unknown_field, empty] {
        let (status, answer) = node.post("/v1/txn", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    }
    let (status, _) = node.post_raw("/v1/txn", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    assert_eq!(node.all_heads().await, before, "nothing was applied");

    // The right heads and a fresh order: it commits.
    let mut fresh = order_txn(1);
    fresh["docs"][0]["if_heads"] = json!([]);
    fresh["docs"][1]["if_heads"] = heads;
    let (status, body) = node.post("/v1/txn", fresh).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    node.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn ops_take_if_heads_and_reads_take_at_most_1000_documents() {
    let node = TestNode::start().await;
    let heads = stock(&node, 5).await;
    let inc = |heads: Value| json!({"ops": [{"op": "inc", "path": "/stock", "by": -1}], "if_heads": heads});
    let (status, body) = node
        .post("/v1/docs/inventory%2Fsku-1/ops", inc(heads.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = node
        .post("/v1/docs/inventory%2Fsku-1/ops", inc(heads))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "precondition_failed");
    assert_eq!(body["error"]["doc"], "inventory/sku-1");

    let ids: Vec<String> = (0..1001).map(|i| format!("d/{i}")).collect();
    let (status, body) = node.post("/v1/read", json!({ "ids": ids })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = node.post("/v1/read", json!({ "ids": ["a b"] })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    node.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_change_events_of_a_transaction_carry_it_and_come_together() {
    let node = TestNode::start().await;
    stock(&node, 5).await;
    let mut events = EventStream::open(&node.http, &node.node, None).await;
    let mut txns = Vec::new();
    for order in 1..=5 {
        let (status, body) = node.post("/v1/txn", order_txn(order)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        txns.push(body["txn"].as_str().unwrap().to_owned());
        // A plain write between transactions.
        let (status, _) = node
            .post(
                "/v1/docs/other/ops",
                json!({"ops": [{"op": "set", "path": "/n", "value": order}]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let mut seen = Vec::new();
    while seen
        .iter()
        .filter(|e: &&support::SseEvent| e.data["doc"] == "other")
        .count()
        < 5
    {
        seen.extend(events.until(|e| e.event == "change").await);
    }
    let changes: Vec<&support::SseEvent> = seen.iter().filter(|e| e.event == "change").collect();
    for txn in &txns {
        let at: Vec<usize> = changes
            .iter()
            .enumerate()
            .filter(|(_, e)| e.data["txn"] == txn.as_str())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(at.len(), 2, "both documents of {txn}: {changes:?}");
        assert_eq!(at[1], at[0] + 1, "consecutive: {changes:?}");
    }
    assert!(changes
        .iter()
        .filter(|e| e.data["doc"] == "other")
        .all(|e| e.data.get("txn").is_none()));
    node.node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_clients_reading_and_writing_with_if_heads_lose_no_increment() {
    const CLIENTS: usize = 8;
    const EACH: usize = 25;
    let node = std::sync::Arc::new(TestNode::start().await);
    let (status, _) = node
        .post(
            "/v1/docs/counters%2Fhits/ops",
            json!({"ops": [{"op": "set", "path": "/n", "value": 0}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let node = node.clone();
            tokio::spawn(async move {
                let mut conflicts = 0;
                for _ in 0..EACH {
                    // Bounded: with 8 writers a round always lets one through.
                    for attempt in 0.. {
                        assert!(attempt < 10_000, "no progress");
                        let (_, doc) = node.get("/v1/docs/counters%2Fhits").await;
                        let n = doc["value"]["n"].as_i64().unwrap();
                        let (status, body) = node
                            .post(
                                "/v1/docs/counters%2Fhits/ops",
                                json!({"ops": [{"op": "set", "path": "/n", "value": n + 1}],
                                       "if_heads": doc["heads"]}),
                            )
                            .await;
                        match status {
                            StatusCode::OK => break,
                            StatusCode::CONFLICT => conflicts += 1,
                            other => panic!("{other}: {body}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let mut conflicts = 0;
    for client in clients {
        conflicts += client.await.unwrap();
    }
    let (_, doc) = node.get("/v1/docs/counters%2Fhits").await;
    assert_eq!(
        doc["value"]["n"],
        (CLIENTS * EACH) as i64,
        "no increment lost ({conflicts} retries after 409)"
    );
    assert!(conflicts > 0, "the clients did race");
}
