//! Sagas on real `sync-node run` processes at two sites (`eu-west` dials
//! `us-east` on 127.0.0.1) and a local HTTP server that counts calls per
//! idempotency key. A saga takes an order at eu-west, reserves at us-east
//! and charges through the server; eu-west is killed with SIGKILL while the
//! server holds its first charge call, restarted, and the saga completes:
//! every internal effect once at both sites, one successful call for the
//! key, every try with the same key. Another saga fails at its second step
//! for want of rights and its first step is compensated once. Bad
//! definitions are refused with nothing created. Every wait is bounded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{cli, wait_file, Process, WAIT_MAX};

mod support;

struct Site {
    dir: PathBuf,
    process: Process,
}

impl Site {
    fn start(dir: &Path) -> Site {
        let _ = std::fs::remove_file(dir.join("api.addr"));
        let process = Process::start(&dir.join("sync-node.toml"), &dir.join("node.log"));
        wait_file(&dir.join("api.addr"));
        Site {
            dir: dir.to_path_buf(),
            process,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", wait_file(&self.dir.join("api.addr")))
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("api.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = reqwest::Client::new()
            .request(method, format!("{}{path}", self.url()))
            .bearer_auth(self.token())
            .timeout(Duration::from_secs(30));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn saga(&self, id: &str) -> Value {
        let (status, body) = self
            .call(reqwest::Method::GET, &format!("/v1/sagas/{id}"), None)
            .await;
        if status == 200 {
            body
        } else {
            Value::Null
        }
    }

    async fn doc(&self, id: &str) -> Value {
        let path = format!("/v1/docs/{}", id.replace('/', "%2F"));
        self.call(reqwest::Method::GET, &path, None).await.1["value"].clone()
    }
}

/// What the payment server saw: per idempotency key, tries and successful
/// answers. It holds the first try of each key unanswered until released.
#[derive(Default)]
struct Payments {
    tries: BTreeMap<String, u64>,
    answered: BTreeMap<String, u64>,
    keys_missing: u64,
}

async fn payment_server(
    seen: Arc<Mutex<Payments>>,
    first_arrived: Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().route(
        "/pay",
        axum::routing::post(move |headers: HeaderMap| {
            let (seen, first_arrived) = (seen.clone(), first_arrived.clone());
            async move {
                let Some(key) = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                else {
                    seen.lock().unwrap().keys_missing += 1;
                    return StatusCode::BAD_REQUEST;
                };
                let tries = {
                    let mut seen = seen.lock().unwrap();
                    let tries = seen.tries.entry(key.clone()).or_default();
                    *tries += 1;
                    *tries
                };
                if tries == 1 {
                    // The node is killed while it waits for this answer.
                    first_arrived.notify_one();
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                // One effect per key, however often it is asked.
                *seen.lock().unwrap().answered.entry(key).or_default() += 1;
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < WAIT_MAX, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn inc(doc: &str, key: &str, by: i64) -> Value {
    json!({"id": doc, "ops": [{"op": "inc", "path": format!("/{key}"), "by": by}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_over_two_sites_survives_a_kill_and_compensates_once() {
    let root = tempfile::tempdir().unwrap();
    let path = |p: &str| root.path().join(p).to_str().unwrap().to_owned();
    cli(&["ca", "init", "--dir", &path("ca")]);
    let init = |site: &str, dir: &str, peer: &str| {
        cli(&[
            "init",
            "--site",
            site,
            "--dir",
            &path(dir),
            "--ca-dir",
            &path("ca"),
            "--api",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--peer",
            peer,
        ]);
    };
    init("us-east", "us", "eu-west=127.0.0.1:9");
    let us = Site::start(&root.path().join("us"));
    let us_sync = wait_file(&root.path().join("us/sync.addr"));
    init("eu-west", "eu", &format!("us-east={us_sync}"));
    // Quick retries, so the test does not wait long after the restart.
    let eu_config = root.path().join("eu/sync-node.toml");
    let mut text = std::fs::read_to_string(&eu_config).unwrap();
    text.push_str("\n[sagas]\nhttp_backoff_ms = 50\nhttp_timeout_ms = 120000\n");
    std::fs::write(&eu_config, text).unwrap();
    let mut eu = Site::start(&root.path().join("eu"));

    let payments = Arc::new(Mutex::new(Payments::default()));
    let first_arrived = Arc::new(tokio::sync::Notify::new());
    let server = payment_server(payments.clone(), first_arrived.clone()).await;

    // Counters every step counts its action and compensation in, and a
    // bounded stock us-east holds no rights of.
    let (status, _) = eu
        .call(
            reqwest::Method::POST,
            "/v1/txn",
            Some(json!({"docs": [
                {"id": "effects/sagas", "ops": [
                    {"op": "set", "path": "/take", "value": 0, "as": "counter"},
                    {"op": "set", "path": "/take-undo", "value": 0, "as": "counter"},
                    {"op": "set", "path": "/reserve", "value": 0, "as": "counter"},
                    {"op": "set", "path": "/reserve-undo", "value": 0, "as": "counter"}
                ]},
                {"id": "stock/sku-1", "ops": [{"op": "set", "path": "/n", "value": 0, "as": "bounded", "min": 0}]}
            ]})),
        )
        .await;
    assert_eq!(status, 200);
    until("the counters to reach us-east", || async {
        us.doc("stock/sku-1").await["n"] == 0 && us.doc("effects/sagas").await["take"] == 0
    })
    .await;

    // Bad definitions: 400, nothing created; the API lists nothing.
    for (bad, says) in [
        (json!({"id": "bad", "steps": []}), "at least one step"),
        (
            json!({"id": "bad", "steps": [{"name": "a", "site": "ap-south", "txn": {"docs": [inc("effects/sagas", "take", 1)]}}]}),
            "unknown site",
        ),
        (
            json!({"id": "bad", "steps": [{"name": "a", "site": "eu-west"}]}),
            "no action",
        ),
        (
            json!({"id": "bad", "steps": [{"name": "a", "site": "eu-west", "http": {"url": "https://payments.example/pay"}}]}),
            "http_allow",
        ),
    ] {
        let (status, body) = eu.call(reqwest::Method::POST, "/v1/sagas", Some(bad)).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "bad_saga");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body}"
        );
    }
    let many: Vec<Value> = (0..65)
        .map(|i| json!({"name": format!("s{i}"), "site": "eu-west", "fn": "f"}))
        .collect();
    let (status, _) = eu
        .call(
            reqwest::Method::POST,
            "/v1/sagas",
            Some(json!({"id": "bad", "steps": many})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(eu.saga("bad").await, Value::Null);

    // The saga that survives a kill.
    let order = json!({"id": "order-1", "steps": [
        {"name": "take", "site": "eu-west", "txn": {"docs": [inc("effects/sagas", "take", 1)]},
         "compensate": {"docs": [inc("effects/sagas", "take-undo", 1)]}},
        {"name": "reserve", "site": "us-east", "txn": {"docs": [inc("effects/sagas", "reserve", 1)]},
         "compensate": {"docs": [inc("effects/sagas", "reserve-undo", 1)]}},
        {"name": "charge", "site": "eu-west", "http": {"url": format!("http://{server}/pay"), "body": {"amount": 5}}}
    ]});
    let (status, body) = eu
        .call(reqwest::Method::POST, "/v1/sagas", Some(order.clone()))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body, json!({"id": "order-1", "status": "running"}));
    let (status, body) = eu
        .call(reqwest::Method::POST, "/v1/sagas", Some(order))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "saga_exists");

    // The charge's first try reaches the server, which holds it: eu-west
    // dies in the middle of the step.
    tokio::time::timeout(WAIT_MAX, first_arrived.notified())
        .await
        .expect("the charge was tried");
    let running = eu.saga("order-1").await;
    assert_eq!(running["steps"][2]["status"], "running", "{running}");
    assert_eq!(running["steps"][2]["attempts"], 1);
    eu.process.kill_9();
    eu = Site::start(&root.path().join("eu"));
    until("order-1 to be done at both sites", || async {
        eu.saga("order-1").await["status"] == "done" && us.saga("order-1").await["status"] == "done"
    })
    .await;
    let (at_eu, at_us) = (eu.saga("order-1").await, us.saga("order-1").await);
    assert_eq!(at_eu, at_us, "the same saga at both sites");
    assert!(at_eu["finished_at"].is_string());
    for step in at_eu["steps"].as_array().unwrap() {
        assert_eq!(step["status"], "done", "{step}");
        assert!(step["change"].is_string(), "{step}");
    }
    assert_eq!(at_eu["steps"][2]["attempts"], 2);
    {
        let seen = payments.lock().unwrap();
        assert_eq!(seen.keys_missing, 0);
        assert_eq!(
            seen.tries,
            BTreeMap::from([("order-1/charge".to_owned(), 2)]),
            "every try with the same key"
        );
        assert_eq!(
            seen.answered,
            BTreeMap::from([("order-1/charge".to_owned(), 1)])
        );
    }

    // The saga that fails at its second step: us-east has no rights to
    // the stock, so the order taken at eu-west is given back, once.
    let failing = json!({"id": "order-2", "steps": [
        {"name": "take", "site": "eu-west", "txn": {"docs": [inc("effects/sagas", "take", 1)]},
         "compensate": {"docs": [inc("effects/sagas", "take-undo", 1)]}},
        {"name": "reserve", "site": "us-east", "txn": {"docs": [
            inc("stock/sku-1", "n", -1), inc("effects/sagas", "reserve", 1)]}}
    ]});
    let (status, body) = us
        .call(reqwest::Method::POST, "/v1/sagas", Some(failing))
        .await;
    assert_eq!(status, 201, "{body}");
    until("order-2 to be compensated at both sites", || async {
        eu.saga("order-2").await["status"] == "compensated"
            && us.saga("order-2").await["status"] == "compensated"
    })
    .await;
    let at_us = us.saga("order-2").await;
    assert_eq!(at_us["steps"][0]["status"], "compensated");
    assert_eq!(at_us["steps"][1]["status"], "failed");
    assert!(
        at_us["steps"][1]["error"]
            .as_str()
            .unwrap()
            .contains("insufficient rights"),
        "{at_us}"
    );
    until("both sites to agree on every effect", || async {
        eu.doc("effects/sagas").await == us.doc("effects/sagas").await
    })
    .await;
    assert_eq!(
        eu.doc("effects/sagas").await,
        json!({"take": 2, "take-undo": 1, "reserve": 1, "reserve-undo": 0})
    );
    let (_, listed) = us
        .call(reqwest::Method::GET, "/v1/sagas?status=compensated", None)
        .await;
    let ids: Vec<&str> = listed["sagas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["order-2"]);
    let (status, _) = us
        .call(reqwest::Method::GET, "/v1/sagas?status=nonsense", None)
        .await;
    assert_eq!(status, 400);

    // `/v1/events` carried the saga as it changed, up to compensated.
    let mut events = reqwest::Client::new()
        .get(format!("{}/v1/events", us.url()))
        .bearer_auth(us.token())
        .header("Last-Event-ID", "0")
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    let mut text = String::new();
    let read_until = Instant::now() + Duration::from_secs(20);
    let compensated = |text: &str| {
        text.split("\n\n").any(|block| {
            block.contains("event: saga")
                && block.contains("\"id\":\"order-2\"")
                && block.contains("\"status\":\"compensated\"")
        })
    };
    while !compensated(&text) {
        let left = read_until.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no saga event for order-2 compensated in {text}"
        );
        match tokio::time::timeout(left, events.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("the event stream ended: {other:?}"),
        }
    }
    drop(events);

    // The CLI shows the same.
    let config = path("us/sync-node.toml");
    let cli_json = |args: &[&str]| -> Value {
        let output = std::process::Command::new(support::BIN)
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    assert_eq!(
        cli_json(&["saga", "show", "--config", &config, "order-2"]),
        us.saga("order-2").await
    );
    let listed = cli_json(&["saga", "list", "--config", &config, "--status", "done"]);
    assert_eq!(listed["sagas"][0]["id"], "order-1");
    let file = root.path().join("saga.json");
    std::fs::write(
        &file,
        json!({"id": "from-cli", "steps": [{"name": "take", "site": "us-east", "txn": {"docs": [inc("effects/sagas", "take", 1)]}}]}).to_string(),
    )
    .unwrap();
    let started = cli_json(&["saga", "start", "--config", &config, file.to_str().unwrap()]);
    assert_eq!(started["id"], "from-cli");
    until("the saga from the CLI to be done", || async {
        us.saga("from-cli").await["status"] == "done"
    })
    .await;
}
