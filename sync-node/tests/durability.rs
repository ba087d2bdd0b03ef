//! Acknowledged writes survive `kill -9`: client tasks write to a running
//! `sync-node` (the real binary) through `POST /v1/docs/{id}/ops`, the node
//! is killed with SIGKILL after a random 200–800 ms, restarted on the same
//! directory, and every write it acknowledged must be there.
//!
//! The default test runs 3 kill cycles. The soak runs 30:
//! `cargo test -p sync-node --release --test durability -- --ignored`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sync_node::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_sync-node");
const DOCS: usize = 4;
const WRITERS_PER_DOC: usize = 2;

/// Kills the child on drop, so a failing test leaves no process behind.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    fn kill_9(&mut self) {
        if let Some(mut child) = self.0.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the node acknowledged for one document, and what was attempted.
#[derive(Debug, Default)]
struct DocWrites {
    /// Keys under `/keys` whose `set` was acknowledged, with their values.
    keys: BTreeMap<String, u64>,
    /// Acknowledged increments of `/count`.
    incs_acked: u64,
    /// Increments sent, acknowledged or not.
    incs_sent: u64,
}

struct Harness {
    config_path: PathBuf,
    addr_file: PathBuf,
    log_file: PathBuf,
    token: String,
    http: reqwest::Client,
    writes: Arc<Mutex<Vec<DocWrites>>>,
}

fn doc_id(doc: usize) -> String {
    format!("durability%2Fdoc-{doc}")
}

impl Harness {
    fn new(dir: &Path) -> Harness {
        let mut options = sync_node::init::InitOptions::new("us-east".parse().unwrap(), dir);
        options.api_listen = "127.0.0.1:0".parse().unwrap();
        let config_path = sync_node::init::init(&options).unwrap();
        let config = Config::load(&config_path).unwrap();
        let token = config.read_token().unwrap().as_str().to_owned();
        Harness {
            addr_file: config.api_addr_path(),
            log_file: dir.join("node.log"),
            config_path,
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            writes: Arc::new(Mutex::new(
                (0..DOCS).map(|_| DocWrites::default()).collect(),
            )),
        }
    }

    /// Starts the binary and returns it with its base URL once it listens.
    async fn start(&self) -> (ChildGuard, String) {
        // A killed node leaves its api.addr behind.
        let _ = std::fs::remove_file(&self.addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .unwrap();
        let child = ChildGuard(Some(
            Command::new(BIN)
                .args(["run", "--config", self.config_path.to_str().unwrap()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        ));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.addr_file) {
                if text.ends_with('\n') {
                    return (child, format!("http://{}", text.trim()));
                }
            }
            assert!(
                Instant::now() < deadline,
                "the node did not start; log:\n{}",
                std::fs::read_to_string(&self.log_file).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn post_ops(&self, url: &str, doc: usize, ops: Value) -> Result<(), String> {
        let response = self
            .http
            .post(format!("{url}/v1/docs/{}/ops", doc_id(doc)))
            .bearer_auth(&self.token)
            .json(&json!({ "ops": ops }))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response.text().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(())
        } else {
            // The node answers every well-formed write here with 200 or
            // dies; anything else is a bug, not a crash effect.
            panic!("write refused with {status}: {body}");
        }
    }

    /// Creates every document with its counter.
    async fn create_docs(&self, url: &str) {
        for doc in 0..DOCS {
            self.post_ops(
                url,
                doc,
                json!([{"op": "set", "path": "/count", "value": 0, "as": "counter"}]),
            )
            .await
            .unwrap();
        }
    }

    /// Checks every acknowledged write is in the node at `url`.
    async fn verify(&self, url: &str) -> usize {
        let mut acknowledged = 0;
        for doc in 0..DOCS {
            let response = self
                .http
                .get(format!("{url}/v1/docs/{}", doc_id(doc)))
                .bearer_auth(&self.token)
                .send()
                .await
                .unwrap();
            assert!(response.status().is_success(), "doc {doc} is missing");
            let view: Value = response.json().await.unwrap();
            let value = &view["value"];
            let writes = self.writes.lock().unwrap();
            let expected = &writes[doc];
            for (key, n) in &expected.keys {
                assert_eq!(
                    value["keys"][key],
                    json!(n),
                    "doc {doc}: acknowledged key {key} lost"
                );
            }
            let count = value["count"].as_u64().unwrap();
            assert!(
                count >= expected.incs_acked,
                "doc {doc}: counter {count} < {} acknowledged increments",
                expected.incs_acked
            );
            assert!(
                count <= expected.incs_sent,
                "doc {doc}: counter {count} > {} increments sent",
                expected.incs_sent
            );
            acknowledged += expected.keys.len() + expected.incs_acked as usize;
        }
        acknowledged
    }

    /// Writes until the node dies: each writer alternates a `set` of a new
    /// key and an `inc`, recording what was acknowledged.
    async fn write_until_killed(self: &Arc<Self>, url: &str, cycle: usize, child: &mut ChildGuard) {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for doc in 0..DOCS {
            for writer in 0..WRITERS_PER_DOC {
                let harness = self.clone();
                let stop = stop.clone();
                let url = url.to_owned();
                tasks.push(tokio::spawn(async move {
                    let mut n: u64 = 0;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        if n.is_multiple_of(2) {
                            harness.writes.lock().unwrap()[doc].incs_sent += 1;
                            let ops = json!([{"op": "inc", "path": "/count", "by": 1}]);
                            if harness.post_ops(&url, doc, ops).await.is_err() {
                                break;
                            }
                            harness.writes.lock().unwrap()[doc].incs_acked += 1;
                        } else {
                            let key = format!("c{cycle}-w{writer}-n{n}");
                            let ops =
                                json!([{"op": "set", "path": format!("/keys/{key}"), "value": n}]);
                            if harness.post_ops(&url, doc, ops).await.is_err() {
                                break;
                            }
                            harness.writes.lock().unwrap()[doc].keys.insert(key, n);
                        }
                    }
                }));
            }
        }
        let delay_ms = rand::random_range(200..=800);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        child.kill_9();
        stop.store(true, Ordering::SeqCst);
        for task in tasks {
            task.await.unwrap();
        }
        eprintln!("cycle {cycle}: killed after {delay_ms} ms");
    }
}

async fn kill_cycles(cycles: usize) {
    let temp = tempfile::tempdir().unwrap();
    let harness = Arc::new(Harness::new(temp.path()));
    let (mut child, mut url) = harness.start().await;
    harness.create_docs(&url).await;
    for cycle in 0..cycles {
        harness.write_until_killed(&url, cycle, &mut child).await;
        // The restarted node is checked, then written to in the next cycle.
        (child, url) = harness.start().await;
        let acknowledged = harness.verify(&url).await;
        eprintln!("cycle {cycle}: {acknowledged} acknowledged writes all present");
        assert!(acknowledged > 0, "no write was acknowledged");
    }
    child.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() {
    tokio::time::timeout(Duration::from_secs(120), kill_cycles(3))
        .await
        .expect("the durability test took too long");
}

/// Run with `cargo test -p sync-node --release --test durability -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "soak: 30 kill cycles"]
async fn durability_soak_many_kill_cycles() {
    tokio::time::timeout(Duration::from_secs(1200), kill_cycles(30))
        .await
        .expect("the durability soak took too long");
}
