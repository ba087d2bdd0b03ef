//! The document HTTP API, exercised from outside against a node started
//! in-process on 127.0.0.1 with a temporary directory: every endpoint, and
//! every error case with its status and JSON error shape.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sync_node::config::Config;
use sync_node::init::{init, InitOptions};
use sync_node::Node;

/// A node in a temporary directory plus an HTTP client for it.
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

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.node.url()))
            .bearer_auth(self.node.token())
    }

    /// Sends a request and returns the status and the JSON answer.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        answer(request.send().await.unwrap()).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn ops(&self, id: &str, ops: Value) -> (StatusCode, Value) {
        let path = format!("/v1/docs/{id}/ops");
        self.call(Method::POST, &path, Some(json!({ "ops": ops })))
            .await
    }

    async fn put(&self, id: &str, value: Value) -> (StatusCode, Value) {
        let path = format!("/v1/docs/{id}");
        self.call(Method::PUT, &path, Some(json!({ "value": value })))
            .await
    }

    /// The document's value and heads, asserting it exists.
    async fn read(&self, id: &str) -> (Value, Value) {
        let (status, body) = self.get(&format!("/v1/docs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (body["value"].clone(), body["heads"].clone())
    }

    async fn stop(self) {
        self.node.shutdown().await.unwrap();
    }
}

async fn answer(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("answer with status {status} is not JSON ({e}): {text:?}"));
    (status, value)
}

/// Asserts an error answer: its status and the JSON error shape and code.
#[track_caller]
fn assert_error(answer: &(StatusCode, Value), status: StatusCode, code: &str) {
    let (got, body) = answer;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_without_a_token_and_everything_else_needs_one() {
    let node = TestNode::start().await;
    let url = node.node.url();
    let health = answer(
        node.http
            .get(format!("{url}/v1/health"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(health, (StatusCode::OK, json!({"ok": true})));

    for path in [
        "/v1/status",
        "/v1/docs",
        "/v1/docs/a",
        "/v1/docs/a/history",
        "/metrics",
        "/v1/nope",
    ] {
        let missing = answer(node.http.get(format!("{url}{path}")).send().await.unwrap()).await;
        assert_error(&missing, StatusCode::UNAUTHORIZED, "unauthorized");
        let wrong = answer(
            node.http
                .get(format!("{url}{path}"))
                .bearer_auth("0".repeat(64))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_error(&wrong, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let write = answer(
        node.http
            .post(format!("{url}/v1/docs/a/ops"))
            .bearer_auth("wrong")
            .json(&json!({"ops": [{"op": "set", "path": "/x", "value": 1}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&write, StatusCode::UNAUTHORIZED, "unauthorized");
    // The refused write changed nothing.
    assert_error(
        &node.get("/v1/docs/a").await,
        StatusCode::NOT_FOUND,
        "doc_not_found",
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_site_document_count_and_version() {
    let node = TestNode::start().await;
    node.ops("a", json!([{"op": "set", "path": "/x", "value": 1}]))
        .await;
    node.ops("b", json!([{"op": "set", "path": "/x", "value": 1}]))
        .await;
    let (status, body) = node.get("/v1/status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["site"], "us-east");
    assert_eq!(body["docs"], 2);
    assert_eq!(body["peers"], json!([]));
    assert_eq!(body["conflicts_open"], 0);
    assert!(body["loaded_docs"].is_u64(), "{body}");
    assert!(body["version"].is_string(), "{body}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_write_counters_read_as_numbers_and_text_as_strings() {
    let node = TestNode::start().await;
    let id = "inventory%2Fsku-1";
    let (status, commit) = node
        .ops(
            id,
            json!([
                {"op": "set", "path": "/stock", "value": 5, "as": "counter"},
                {"op": "set", "path": "/name", "value": "desk lamp", "as": "text"},
                {"op": "set", "path": "/tags", "value": ["a"]},
                {"op": "set", "path": "/price", "value": 30},
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{commit}");
    let change = commit["change"].as_str().unwrap();
    assert_eq!(change.len(), 64);
    assert_eq!(commit["heads"], json!([change]));

    let (status, commit) = node
        .ops(
            id,
            json!([
                {"op": "inc", "path": "/stock", "by": -2},
                {"op": "inc", "path": "/stock"},
                {"op": "splice", "path": "/name", "index": 0, "delete": 4, "text": "floor"},
                {"op": "set", "path": "/tags/-", "value": "b"},
                {"op": "insert", "path": "/tags/0", "value": "first"},
                {"op": "set", "path": "/meta/created/by", "value": "alice"},
                {"op": "del", "path": "/price"},
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{commit}");

    let (status, body) = node.get(&format!("/v1/docs/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], "inventory/sku-1");
    assert_eq!(body["heads"], commit["heads"]);
    assert_eq!(
        body["value"],
        json!({
            "stock": 4,
            "name": "floor lamp",
            "tags": ["first", "a", "b"],
            "meta": {"created": {"by": "alice"}},
        })
    );

    let (status, list) = node.get("/v1/docs?prefix=inventory%2F").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list, json!({"docs": ["inventory/sku-1"]}));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_by_prefix() {
    let node = TestNode::start().await;
    for id in ["t-a%2Forders%2F1", "t-a%2Forders%2F2", "t-b%2Forders%2F1"] {
        let (status, body) = node
            .ops(id, json!([{"op": "set", "path": "/n", "value": 1}]))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, all) = node.get("/v1/docs").await;
    assert_eq!(all["docs"].as_array().unwrap().len(), 3);
    let (_, a) = node.get("/v1/docs?prefix=t-a/").await;
    assert_eq!(a, json!({"docs": ["t-a/orders/1", "t-a/orders/2"]}));
    let (_, none) = node.get("/v1/docs?prefix=zzz").await;
    assert_eq!(none, json!({"docs": []}));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_documents_and_routes_answer_404() {
    let node = TestNode::start().await;
    assert_error(
        &node.get("/v1/docs/absent").await,
        StatusCode::NOT_FOUND,
        "doc_not_found",
    );
    assert_error(
        &node.get("/v1/docs/absent/history").await,
        StatusCode::NOT_FOUND,
        "doc_not_found",
    );
    assert_error(
        &node.get("/v1/nope").await,
        StatusCode::NOT_FOUND,
        "route_not_found",
    );
    assert_error(
        &node.get("/v1/docs/a/b/c").await,
        StatusCode::NOT_FOUND,
        "route_not_found",
    );
    assert_error(
        &node.call(Method::DELETE, "/v1/docs/a", None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    assert_error(
        &node.call(Method::GET, "/v1/docs/a/ops", None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_answers_400_and_changes_nothing() {
    let node = TestNode::start().await;
    let (status, _) = node
        .ops("doc", json!([{"op": "set", "path": "/x", "value": 1}]))
        .await;
    assert_eq!(status, StatusCode::OK);
    let before = node.read("doc").await;

    let raw = |body: &'static str| {
        node.request(Method::POST, "/v1/docs/doc/ops")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_error(
        &answer(raw("{\"ops\": [").await.unwrap()).await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );
    assert_error(
        &answer(raw("").await.unwrap()).await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );
    assert_error(
        &answer(raw("{\"ops\": \"set\"}").await.unwrap()).await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    assert_error(
        &answer(raw("{\"opz\": []}").await.unwrap()).await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    assert_error(
        &node
            .ops("doc", json!([{"op": "frobnicate", "path": "/x"}]))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    assert_error(
        &node
            .ops("doc", json!([{"op": "inc", "path": "/x", "by": "one"}]))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    assert_error(
        &node
            .ops("doc", json!([{"op": "set", "path": "a/b", "value": 1}]))
            .await,
        StatusCode::BAD_REQUEST,
        "bad_path",
    );
    assert_error(
        &node
            .ops(
                "doc",
                json!([{"op": "set", "path": "/c", "value": "x", "as": "counter"}]),
            )
            .await,
        StatusCode::BAD_REQUEST,
        "bad_value",
    );
    assert_error(
        &node.ops("doc", json!([])).await,
        StatusCode::BAD_REQUEST,
        "bad_value",
    );
    assert_error(
        &node.put("doc", json!([1, 2])).await,
        StatusCode::BAD_REQUEST,
        "bad_value",
    );
    assert_error(
        &node
            .call(Method::PUT, "/v1/docs/doc", Some(json!({"val": {}})))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );

    // Invalid document ids, once percent-decoded.
    assert_error(
        &node.get("/v1/docs/bad%20id").await,
        StatusCode::BAD_REQUEST,
        "invalid_id",
    );
    assert_error(
        &node
            .ops("bad%20id", json!([{"op": "set", "path": "/x", "value": 1}]))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_id",
    );
    assert_error(
        &node.get("/v1/docs/%C3%A9").await,
        StatusCode::BAD_REQUEST,
        "invalid_id",
    );
    assert_error(
        &node.get("/v1/docs/%FF").await,
        StatusCode::BAD_REQUEST,
        "bad_url",
    );
    let long = "a".repeat(257);
    assert_error(
        &node.get(&format!("/v1/docs/{long}")).await,
        StatusCode::BAD_REQUEST,
        "invalid_id",
    );

    // Heads that are not hex, and hex heads the document does not have.
    assert_error(
        &node.get("/v1/docs/doc?at=zz").await,
        StatusCode::BAD_REQUEST,
        "bad_heads",
    );
    assert_error(
        &node.get("/v1/docs/doc?at=").await,
        StatusCode::BAD_REQUEST,
        "bad_heads",
    );
    let unknown = "ab".repeat(32);
    assert_error(
        &node.get(&format!("/v1/docs/doc?at={unknown}")).await,
        StatusCode::BAD_REQUEST,
        "unknown_heads",
    );

    assert_eq!(node.read("doc").await, before);
    let (_, list) = node.get("/v1/docs").await;
    assert_eq!(list, json!({"docs": ["doc"]}));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_16_mib_answer_413() {
    let node = TestNode::start().await;
    let huge = format!("{{\"value\": {{\"s\": \"{}\"}}}}", "x".repeat(17 << 20));
    // Its own client: the server stops reading the body and drops the
    // connection after answering, which a pooled connection would hit on
    // the next request as a broken pipe.
    let once = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let response = once
        .put(format!("{}/v1/docs/big", node.node.url()))
        .bearer_auth(node.node.token())
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_error(
        &answer(response).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    assert_error(
        &node.get("/v1/docs/big").await,
        StatusCode::NOT_FOUND,
        "doc_not_found",
    );
    // A body just under the limit is accepted.
    let (status, body) = node.put("big", json!({"s": "x".repeat(15 << 20)})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_that_do_not_fit_the_document_answer_422_and_change_nothing() {
    let node = TestNode::start().await;
    let (status, _) = node
        .ops(
            "doc",
            json!([
                {"op": "set", "path": "/name", "value": "plain string"},
                {"op": "set", "path": "/map", "value": {"k": 1}},
                {"op": "set", "path": "/list", "value": [1, 2]},
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let before = node.read("doc").await;

    let cases = [
        (json!({"op": "inc", "path": "/name"}), "not_a_counter"),
        (
            json!({"op": "splice", "path": "/name", "index": 0, "text": "x"}),
            "not_text",
        ),
        (
            json!({"op": "insert", "path": "/map/k2", "value": 1}),
            "not_a_list",
        ),
        (json!({"op": "del", "path": "/missing"}), "path_not_found"),
        (
            json!({"op": "del", "path": "/map/missing"}),
            "path_not_found",
        ),
        (json!({"op": "inc", "path": "/missing"}), "path_not_found"),
        (
            json!({"op": "set", "path": "/list/5", "value": 1}),
            "index_out_of_range",
        ),
        (
            json!({"op": "insert", "path": "/list/3", "value": 1}),
            "index_out_of_range",
        ),
        (
            json!({"op": "set", "path": "/name/inner", "value": 1}),
            "not_a_container",
        ),
    ];
    for (op, code) in cases {
        let answer = node.ops("doc", json!([op])).await;
        assert_error(&answer, StatusCode::UNPROCESSABLE_ENTITY, code);
    }
    assert_eq!(node.read("doc").await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_second_op_fails_leaves_the_document_unchanged() {
    let node = TestNode::start().await;
    let (status, _) = node
        .ops(
            "doc",
            json!([{"op": "set", "path": "/stock", "value": 5, "as": "counter"}]),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let before = node.read("doc").await;
    let (_, history_before) = node.get("/v1/docs/doc/history").await;

    let failing = node
        .ops(
            "doc",
            json!([
                {"op": "inc", "path": "/stock", "by": 10},
                {"op": "del", "path": "/nothing-here"},
                {"op": "set", "path": "/after", "value": true},
            ]),
        )
        .await;
    assert_error(&failing, StatusCode::UNPROCESSABLE_ENTITY, "path_not_found");
    assert_eq!(node.read("doc").await, before);
    let (_, history_after) = node.get("/v1/docs/doc/history").await;
    assert_eq!(history_after, history_before);

    // A failing batch on a new document does not create it.
    let failing = node
        .ops(
            "new-doc",
            json!([
                {"op": "set", "path": "/a", "value": 1},
                {"op": "inc", "path": "/a"},
            ]),
        )
        .await;
    assert_error(&failing, StatusCode::UNPROCESSABLE_ENTITY, "not_a_counter");
    assert_error(
        &node.get("/v1/docs/new-doc").await,
        StatusCode::NOT_FOUND,
        "doc_not_found",
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_at_old_heads_returns_the_old_value() {
    let node = TestNode::start().await;
    let (_, first) = node
        .ops("doc", json!([{"op": "set", "path": "/v", "value": 1}]))
        .await;
    let (_, second) = node
        .ops("doc", json!([{"op": "set", "path": "/v", "value": 2}]))
        .await;
    let old = first["heads"].as_array().unwrap()[0].as_str().unwrap();
    let (status, body) = node.get(&format!("/v1/docs/doc?at={old}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["value"], json!({"v": 1}));
    assert_eq!(body["heads"], json!([old]));
    let (_, now) = node.get("/v1/docs/doc").await;
    assert_eq!(now["value"], json!({"v": 2}));
    assert_eq!(now["heads"], second["heads"]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lists_changes_oldest_first_with_site_and_message() {
    let node = TestNode::start().await;
    let (_, first) = node
        .call(
            Method::POST,
            "/v1/docs/doc/ops",
            Some(json!({"ops": [{"op": "set", "path": "/v", "value": 1}], "message": "create"})),
        )
        .await;
    let (_, second) = node
        .call(
            Method::PUT,
            "/v1/docs/doc",
            Some(json!({"value": {"v": 2}, "message": "update"})),
        )
        .await;
    let (status, body) = node.get("/v1/docs/doc/history").await;
    assert_eq!(status, StatusCode::OK);
    let changes = body["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[0]["hash"], first["change"]);
    assert_eq!(changes[1]["hash"], second["change"]);
    assert_eq!(changes[0]["message"], "create");
    assert_eq!(changes[1]["message"], "update");
    assert_eq!(changes[1]["deps"], json!([first["change"]]));
    for change in changes {
        assert_eq!(change["site"], "us-east");
        assert!(change["actor"].is_string());
        assert!(change["time"].as_i64().unwrap() > 1_600_000_000_000);
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_reconciles_field_by_field() {
    let node = TestNode::start().await;
    let (status, created) = node
        .put("doc", json!({"a": 1, "b": 1, "nested": {"x": 1}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert!(created["change"].is_string());

    // Writing the same value changes nothing.
    let (status, same) = node
        .put("doc", json!({"a": 1, "b": 1, "nested": {"x": 1}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(same["change"], Value::Null);
    assert_eq!(same["heads"], created["heads"]);

    // Two PUTs touching different fields keep both.
    node.put("doc", json!({"a": 2, "b": 1, "nested": {"x": 1}}))
        .await;
    node.put("doc", json!({"a": 2, "b": 2, "nested": {"x": 1, "y": 2}}))
        .await;
    let (value, _) = node.read("doc").await;
    assert_eq!(value, json!({"a": 2, "b": 2, "nested": {"x": 1, "y": 2}}));

    // A counter given a new number stays a counter; text stays text.
    node.ops(
        "doc",
        json!([
            {"op": "set", "path": "/stock", "value": 5, "as": "counter"},
            {"op": "set", "path": "/note", "value": "hello", "as": "text"},
        ]),
    )
    .await;
    let (status, body) = node
        .put("doc", json!({"a": 2, "stock": 7, "note": "hello world"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = node
        .ops(
            "doc",
            json!([
                {"op": "inc", "path": "/stock", "by": 1},
                {"op": "splice", "path": "/note", "index": 0, "delete": 1, "text": "H"},
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (value, _) = node.read("doc").await;
    assert_eq!(value, json!({"a": 2, "stock": 8, "note": "Hello world"}));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_render_prometheus_text() {
    let node = TestNode::start().await;
    node.ops("doc", json!([{"op": "set", "path": "/v", "value": 1}]))
        .await;
    node.get("/v1/docs/absent").await;
    let response = node.request(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    for needle in [
        "archipelago_http_requests_total{",
        "route=\"/v1/docs/{id}/ops\"",
        "status=\"404\"",
        "archipelago_http_request_seconds_bucket{",
        "archipelago_commits_total",
        "archipelago_docs",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    node.stop().await;
}

#[tokio::test]
async fn listing_pages_with_limit_and_after() {
    let node = TestNode::start().await;
    for i in 0..5 {
        let (status, body) = node
            .ops(
                &format!("page%2F{i}"),
                json!([{"op": "set", "path": "/n", "value": i}]),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, first) = node.get("/v1/docs?prefix=page/&limit=2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        first,
        json!({"docs": ["page/0", "page/1"], "next": "page/1"})
    );
    let (_, second) = node.get("/v1/docs?prefix=page/&limit=2&after=page/1").await;
    assert_eq!(
        second,
        json!({"docs": ["page/2", "page/3"], "next": "page/3"})
    );
    let (_, last) = node.get("/v1/docs?prefix=page/&limit=2&after=page/3").await;
    assert_eq!(last, json!({"docs": ["page/4"]}));
    let (_, all) = node.get("/v1/docs?prefix=page/").await;
    assert_eq!(all["docs"].as_array().unwrap().len(), 5);
    node.stop().await;
}
