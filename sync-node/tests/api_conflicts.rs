//! The conflict HTTP API (and its CLI), exercised from outside against a
//! node started in-process on 127.0.0.1 with a temporary directory.
//!
//! A single node never conflicts with itself, so a second site, eu-west, is
//! an in-process [`Replica`] over a memory store with the same rules: both
//! sites start from the same document, write concurrently, and the node
//! receives eu-west's changes as if from a peer.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use archipelago::doc::Op;
use archipelago::store::{Memory, Store};
use archipelago::{DocId, Origin, Replica, ReplicaOptions};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sync_node::config::Config;
use sync_node::events::EventKind;
use sync_node::init::{init, InitOptions};
use sync_node::Node;

const BIN: &str = env!("CARGO_BIN_EXE_sync-node");

/// Bound on waiting for the event feed.
const WAIT: Duration = Duration::from_secs(20);

const RULES: &str = r#"
[[rules]]
name = "stock-non-negative"
docs = "inventory/*"
path = "/stock"
min = 0
"#;

/// A node with the rules above, a second site and an HTTP client.
struct TestNode {
    node: Node,
    config: Config,
    eu_west: Replica,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl TestNode {
    async fn start() -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let path = init(&InitOptions::new("us-east".parse().unwrap(), dir.path())).unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(RULES);
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).unwrap();
        let node = Node::start(&config).await.unwrap();
        let mut options = ReplicaOptions::new("eu-west".parse().unwrap());
        options.conflicts = Arc::new(config.conflict_config().unwrap());
        let eu_west = Replica::open(options, Arc::new(Memory::new()) as Arc<dyn Store>).unwrap();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        TestNode {
            node,
            config,
            eu_west,
            http,
            _dir: dir,
        }
    }

    /// Gives eu-west the node's copy of `doc`, then has the node apply
    /// `here` and eu-west `there` concurrently, then ships eu-west's
    /// changes to the node, which detects what conflicts.
    fn diverge(&self, doc: &str, here: Value, there: Value) {
        let doc: DocId = doc.parse().unwrap();
        let us_east = self.node.replica();
        let base = us_east.changes_after(&doc, &[]).unwrap().unwrap();
        self.eu_west
            .apply_changes(&doc, &base, Origin::Peer("us-east".parse().unwrap()))
            .unwrap();
        let shared = self.eu_west.heads(&doc).unwrap();
        us_east.apply_ops(&doc, &ops(here), None).unwrap();
        self.eu_west.apply_ops(&doc, &ops(there), None).unwrap();
        let theirs = self.eu_west.changes_after(&doc, &shared).unwrap().unwrap();
        let applied = us_east
            .apply_changes(&doc, &theirs, Origin::Peer("eu-west".parse().unwrap()))
            .unwrap();
        assert!(applied.missing_deps.is_empty());
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.node.url()))
            .bearer_auth(self.node.token())
    }

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

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    /// The reports listed with `query`, asserting success.
    async fn list(&self, query: &str) -> Vec<Value> {
        let (status, body) = self.get(&format!("/v1/conflicts{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        body["conflicts"].as_array().unwrap().clone()
    }

    /// The one report of `doc`.
    async fn report_of(&self, doc: &str) -> Value {
        let doc = doc.replace('/', "%2F");
        let mut reports = self.list(&format!("?doc={doc}")).await;
        assert_eq!(reports.len(), 1, "{reports:?}");
        reports.remove(0)
    }

    async fn stop(self) {
        self.node.shutdown().await.unwrap();
    }
}

fn ops(value: Value) -> Vec<Op> {
    serde_json::from_value(value).unwrap()
}

async fn answer(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("answer with status {status} is not JSON ({e}): {text:?}"));
    (status, value)
}

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

/// Two concurrent writes of `/color` and a stock that two concurrent
/// decrements take below zero.
async fn node_with_three_conflicts() -> TestNode {
    let node = TestNode::start().await;
    for doc in ["colors/1", "colors/2"] {
        node.node
            .replica()
            .apply_ops(
                &doc.parse().unwrap(),
                &ops(json!([{"op": "set", "path": "/color", "value": "red"}])),
                None,
            )
            .unwrap();
        node.diverge(
            doc,
            json!([{"op": "set", "path": "/color", "value": "blue"}]),
            json!([{"op": "set", "path": "/color", "value": "green"}]),
        );
    }
    node.node
        .replica()
        .apply_ops(
            &"inventory/sku-1".parse().unwrap(),
            &ops(json!([{"op": "set", "path": "/stock", "value": 1, "as": "counter"}])),
            None,
        )
        .unwrap();
    node.diverge(
        "inventory/sku-1",
        json!([{"op": "inc", "path": "/stock", "by": -1}]),
        json!([{"op": "inc", "path": "/stock", "by": -1}]),
    );
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_and_broken_rules_are_listed_and_filtered() {
    let node = node_with_three_conflicts().await;
    let all = node.list("").await;
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(node.list("?status=open").await.len(), 3);
    assert_eq!(
        node.list("?status=open&kind=concurrent_write").await.len(),
        2
    );
    assert_eq!(node.list("?status=resolved").await.len(), 0);
    assert_eq!(node.list("?kind=delete_update").await.len(), 0);
    // Empty values filter nothing.
    assert_eq!(node.list("?status=&doc=&kind=&rule=").await.len(), 3);

    let color = node.report_of("colors/1").await;
    assert_eq!(color["kind"], "concurrent_write");
    assert_eq!(color["doc"], "colors/1");
    assert_eq!(color["path"], "/color");
    assert_eq!(color["rule"], Value::Null);
    assert_eq!(color["status"], "open");
    assert_eq!(color["detected_by"], "us-east");
    let mut values: Vec<(String, String)> = color["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            assert_eq!(v["change"].as_str().unwrap().len(), 64, "{v}");
            (
                v["site"].as_str().unwrap().to_owned(),
                v["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    values.sort();
    assert_eq!(
        values,
        [
            ("eu-west".to_owned(), "green".to_owned()),
            ("us-east".to_owned(), "blue".to_owned())
        ]
    );
    let (_, doc) = node.get("/v1/docs/colors%2F1").await;
    assert_eq!(color["provisional"], doc["value"]["color"]);

    let stock = node.list("?rule=stock-non-negative").await;
    assert_eq!(stock.len(), 1, "{stock:?}");
    assert_eq!(stock[0]["kind"], "invariant");
    assert_eq!(stock[0]["doc"], "inventory/sku-1");
    assert_eq!(stock[0]["path"], "/stock");
    assert_eq!(stock[0]["provisional"], -1);
    assert_eq!(node.list("?kind=invariant").await, stock);
    assert!(node.list("?rule=other").await.is_empty());

    let id = color["id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    let (status, one) = node.get(&format!("/v1/conflicts/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one, color);
    // Ids are accepted in upper case too.
    let (status, one) = node
        .get(&format!("/v1/conflicts/{}", id.to_ascii_uppercase()))
        .await;
    assert_eq!((status, &one), (StatusCode::OK, &color));

    let (_, status) = node.get("/v1/status").await;
    assert_eq!(status["conflicts_open"], 3, "{status}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_filters_ids_and_bodies_are_refused() {
    let node = TestNode::start().await;
    assert_eq!(node.list("").await, Vec::<Value>::new());
    for (query, code) in [
        ("?status=closed", "bad_filter"),
        ("?kind=merge", "bad_filter"),
        ("?doc=bad%20id", "invalid_id"),
        ("?state=open", "bad_query"),
    ] {
        let answer = node.get(&format!("/v1/conflicts{query}")).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, code);
    }
    let unknown = "0123456789abcdef".repeat(2);
    assert_error(
        &node.get(&format!("/v1/conflicts/{unknown}")).await,
        StatusCode::NOT_FOUND,
        "conflict_not_found",
    );
    for action in ["resolve", "dismiss"] {
        let path = format!("/v1/conflicts/{unknown}/{action}");
        assert_error(
            &node.post(&path, json!({})).await,
            StatusCode::NOT_FOUND,
            "conflict_not_found",
        );
    }
    for bad in ["xyz", "0123456789abcdef", &"g".repeat(32), &"0".repeat(33)] {
        assert_error(
            &node.get(&format!("/v1/conflicts/{bad}")).await,
            StatusCode::BAD_REQUEST,
            "invalid_conflict_id",
        );
        assert_error(
            &node
                .post(&format!("/v1/conflicts/{bad}/resolve"), json!({}))
                .await,
            StatusCode::BAD_REQUEST,
            "invalid_conflict_id",
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_applies_the_ops_with_the_status_once() {
    let node = node_with_three_conflicts().await;
    let color = node.report_of("colors/1").await;
    let id = color["id"].as_str().unwrap().to_owned();
    let resolve = format!("/v1/conflicts/{id}/resolve");

    // Refused bodies and ops change nothing.
    let answer = node
        .post(&resolve, json!({"ops": [], "reason": "typo"}))
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_body");
    let answer = node
        .post(&resolve, json!({"ops": [{"op": "inc", "path": "/color"}]}))
        .await;
    assert_eq!(answer.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", answer.1);
    let answer = node
        .post(&resolve, json!({"note": "n".repeat(20_000)}))
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "bad_note");
    assert_eq!(node.report_of("colors/1").await, color);

    let (status, resolved) = node
        .post(
            &resolve,
            json!({
                "ops": [{"op": "set", "path": "/color", "value": "purple"}],
                "note": "neither: purple",
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{resolved}");
    assert_eq!(resolved["id"], id.as_str());
    assert_eq!(resolved["status"], "resolved");
    assert_eq!(resolved["resolved_by"], "us-east");
    assert_eq!(resolved["resolution"], "manual");
    assert_eq!(resolved["note"], "neither: purple");
    assert!(resolved["resolved_at"].as_i64().unwrap() >= color["detected_at"].as_i64().unwrap());
    let change = resolved["resolved_change"].as_str().unwrap();
    // The ops and the status are one change: the document's only head.
    let (_, doc) = node.get("/v1/docs/colors%2F1").await;
    assert_eq!(doc["value"], json!({"color": "purple"}));
    assert_eq!(doc["heads"], json!([change]));
    assert_eq!(
        node.get(&format!("/v1/conflicts/{id}")).await,
        (StatusCode::OK, resolved.clone())
    );

    assert_error(
        &node.post(&resolve, json!({})).await,
        StatusCode::CONFLICT,
        "conflict_closed",
    );
    assert_error(
        &node
            .post(&format!("/v1/conflicts/{id}/dismiss"), json!({}))
            .await,
        StatusCode::CONFLICT,
        "conflict_closed",
    );

    // Resolving without ops only closes the report.
    let other = node.report_of("colors/2").await;
    let (_, before) = node.get("/v1/docs/colors%2F2").await;
    let path = format!("/v1/conflicts/{}/resolve", other["id"].as_str().unwrap());
    let (status, closed) = node.post(&path, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{closed}");
    assert_eq!(closed["status"], "resolved");
    assert_eq!(closed["note"], Value::Null);
    let (_, after) = node.get("/v1/docs/colors%2F2").await;
    assert_eq!(after["value"], before["value"]);

    assert_eq!(node.list("?status=resolved").await.len(), 2);
    let (_, status) = node.get("/v1/status").await;
    assert_eq!(status["conflicts_open"], 1, "{status}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dismissing_closes_without_edits_and_is_streamed_and_counted() {
    let node = node_with_three_conflicts().await;
    let stock = node.report_of("inventory/sku-1").await;
    let id = stock["id"].as_str().unwrap().to_owned();
    let dismiss = format!("/v1/conflicts/{id}/dismiss");
    let answer = node.post(&dismiss, json!({"ops": []})).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_body");

    let (status, dismissed) = node
        .post(&dismiss, json!({"note": "a return is on its way"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{dismissed}");
    assert_eq!(dismissed["status"], "dismissed");
    assert_eq!(dismissed["resolution"], "dismissed");
    assert_eq!(dismissed["resolved_by"], "us-east");
    assert_eq!(dismissed["note"], "a return is on its way");
    let (_, doc) = node.get("/v1/docs/inventory%2Fsku-1").await;
    assert_eq!(doc["value"], json!({"stock": -1}));
    assert_eq!(
        node.list("?status=dismissed").await,
        vec![dismissed.clone()]
    );
    assert_error(
        &node.post(&dismiss, json!({})).await,
        StatusCode::CONFLICT,
        "conflict_closed",
    );

    // The event log has each report opening, and this one closing.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let replay = node.node.events().subscribe(Some(0)).replay;
        let conflicts: Vec<&Value> = replay
            .iter()
            .filter(|event| event.kind == EventKind::Conflict)
            .map(|event| &event.data)
            .collect();
        if conflicts.len() == 4 {
            assert!(conflicts[..3].iter().all(|c| c["status"] == "open"));
            assert_eq!(*conflicts[3], dismissed);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "conflict events: {conflicts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let metrics = node
        .request(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "archipelago_conflicts_open{kind=\"concurrent_write\",rule=\"\"}",
        "archipelago_conflicts_open{kind=\"invariant\",rule=\"stock-non-negative\"}",
        "archipelago_conflicts_opened_total{kind=\"invariant\"}",
        "archipelago_conflicts_closed_total{kind=\"invariant\",status=\"dismissed\"}",
        "archipelago_conflict_resolve_seconds_bucket{le=\"604800\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_conflict_route_needs_the_token() {
    let node = TestNode::start().await;
    let url = node.node.url();
    let id = "0".repeat(32);
    for (method, path) in [
        (Method::GET, "/v1/conflicts".to_owned()),
        (Method::GET, format!("/v1/conflicts/{id}")),
        (Method::POST, format!("/v1/conflicts/{id}/resolve")),
        (Method::POST, format!("/v1/conflicts/{id}/dismiss")),
    ] {
        let request = node.http.request(method, format!("{url}{path}"));
        let missing = answer(request.json(&json!({})).send().await.unwrap()).await;
        assert_error(&missing, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    node.stop().await;
}

/// Runs the CLI against the in-process node; returns stdout, asserting
/// success.
fn cli(node: &TestNode, args: &[&str]) -> String {
    let config = node.config.path().to_str().unwrap();
    let (command, rest) = args.split_at(2);
    let output = Command::new(BIN)
        .args(command)
        .args(["--config", config])
        .args(rest)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_shows_resolves_and_dismisses() {
    let node = node_with_three_conflicts().await;
    let color = node.report_of("colors/1").await;
    let id = color["id"].as_str().unwrap();

    let table = cli(&node, &["conflicts", "list", "--kind", "concurrent_write"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("ID ") && lines[0].contains("PROVISIONAL"));
    assert!(table.contains(id) && table.contains("colors/2"), "{table}");

    let listed: Value = serde_json::from_str(&cli(
        &node,
        &["conflicts", "list", "--json", "--doc", "colors/1"],
    ))
    .unwrap();
    assert_eq!(listed, json!({"conflicts": [color]}));
    let shown: Value = serde_json::from_str(&cli(&node, &["conflicts", "show", id])).unwrap();
    assert_eq!(shown, color);

    let resolved: Value = serde_json::from_str(&cli(
        &node,
        &[
            "conflicts",
            "resolve",
            id,
            "--ops",
            r#"[{"op": "set", "path": "/color", "value": "blue"}]"#,
            "--note",
            "blue it is",
        ],
    ))
    .unwrap();
    assert_eq!(resolved["status"], "resolved");
    assert_eq!(resolved["note"], "blue it is");
    let stock = node.report_of("inventory/sku-1").await;
    let dismissed: Value = serde_json::from_str(&cli(
        &node,
        &["conflicts", "dismiss", stock["id"].as_str().unwrap()],
    ))
    .unwrap();
    assert_eq!(dismissed["status"], "dismissed");
    let open = cli(&node, &["conflicts", "list", "--status", "open"]);
    assert_eq!(open.lines().count(), 2, "{open}");
    assert!(open.contains("colors/2"), "{open}");

    // A second resolve is an error answer: exit 1, the reason on stderr.
    let config = node.config.path().to_str().unwrap();
    let again = Command::new(BIN)
        .args(["conflicts", "dismiss", "--config", config, id])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("already resolved") && stderr.contains("409"),
        "{stderr}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolution_edits_other_documents_in_one_transaction() {
    let node = node_with_three_conflicts().await;
    let stock = node.report_of("inventory/sku-1").await;
    let resolve = format!("/v1/conflicts/{}/resolve", stock["id"].as_str().unwrap());
    // An op that does not fit the other document: 422 naming it, nothing changes.
    let (status, body) = node
        .post(
            &resolve,
            json!({"ops": [{"op": "inc", "path": "/stock", "by": 1}],
                   "docs": [{"id": "colors/1", "ops": [{"op": "inc", "path": "/color", "by": 1}]}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["doc"], "colors/1");
    assert_eq!(node.report_of("inventory/sku-1").await["status"], "open");

    let (status, resolved) = node
        .post(
            &resolve,
            json!({"ops": [{"op": "inc", "path": "/stock", "by": 1}],
                   "docs": [{"id": "orders/late", "ops": [{"op": "set", "path": "/status", "value": "cancelled"}]}],
                   "note": "cancelled the late order"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{resolved}");
    assert_eq!(resolved["status"], "resolved");
    let (_, order) = node.get("/v1/docs/orders%2Flate").await;
    assert_eq!(order["value"]["status"], "cancelled");
    let (_, stock_doc) = node.get("/v1/docs/inventory%2Fsku-1").await;
    assert_eq!(stock_doc["value"]["stock"], 0);
    // The closing and the cancellation are one transaction.
    let (_, history) = node.get("/v1/docs/inventory%2Fsku-1/history").await;
    let closing = history["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["hash"] == resolved["resolved_change"])
        .unwrap()
        .clone();
    let (_, order_history) = node.get("/v1/docs/orders%2Flate/history").await;
    assert!(closing["txn"].is_string(), "{closing}");
    assert_eq!(order_history["changes"][0]["txn"], closing["txn"]);
    node.stop().await;
}
