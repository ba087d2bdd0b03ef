//! Transactions survive `kill -9` whole: 8 clients post transactions of 3
//! documents each to a running `sync-node` (the real binary) through `POST
//! /v1/txn`; once 150–300 are acknowledged (and 0–20 ms more) the node is
//! killed with SIGKILL while the clients are still posting, restarted on the
//! same directory, and read back. Every acknowledged transaction must be there in
//! all 3 documents, and no transaction, acknowledged or not, may be there in
//! part.
//!
//! Transaction `cC-N` (client `C`, its `N`th) creates `orders/cC-N` (with
//! `if_absent`, `{"txn": "cC-N", ...}`), increments `/count` of the
//! client's `ledger/cC` and decrements the shared `inventory/sku-1`'s
//! `/stock` counter, and sets the marker `/txns/cC-N` in both. So a
//! transaction is present in a document exactly when its marker (or, for the
//! order, the document) is, and the counters must agree with the markers.
//!
//! The default test runs 2 kill cycles. The soak runs 20:
//! `CARGO_TARGET_DIR=/tmp/target-tests cargo test -p sync-node --release
//! --test txn_crash -- --ignored`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{Process, WAIT_MAX};
use sync_node::config::Config;

mod support;

/// Concurrent clients, each with its own ledger document.
const CLIENTS: usize = 8;
/// The shared inventory counter's starting value.
const STOCK: i64 = 1_000_000;
/// The shared document every transaction touches.
const INVENTORY: &str = "inventory/sku-1";
/// Most transactions one client posts in one cycle (the bound on its loop).
const POSTS_PER_CYCLE_MAX: u64 = 50_000;
/// Longest a cycle may take to collect its acknowledgements.
const CYCLE_WAIT_MAX: Duration = Duration::from_secs(30);
/// Most ids in one `POST /v1/read` (the node's bound is 1,000).
const READ_CHUNK: usize = 500;

/// The ledger document of client `client`.
fn ledger(client: usize) -> String {
    format!("ledger/c{client}")
}

/// The key of client `client`'s transaction number `n`.
fn txn_key(client: usize, n: u64) -> String {
    format!("c{client}-{n}")
}

/// The body of `POST /v1/txn` for transaction `key` of client `client`.
fn txn_body(client: usize, key: &str) -> Value {
    json!({
        "docs": [
            {
                "id": format!("orders/{key}"),
                "if_absent": true,
                "ops": [
                    {"op": "set", "path": "/txn", "value": key},
                    {"op": "set", "path": "/client", "value": client},
                    {"op": "set", "path": "/qty", "value": 1},
                ],
            },
            {
                "id": ledger(client),
                "ops": [
                    {"op": "inc", "path": "/count", "by": 1},
                    {"op": "set", "path": format!("/txns/{key}"), "value": true},
                ],
            },
            {
                "id": INVENTORY,
                "ops": [
                    {"op": "inc", "path": "/stock", "by": -1},
                    {"op": "set", "path": format!("/txns/{key}"), "value": true},
                ],
            },
        ],
        "message": format!("order {key}"),
    })
}

/// What one client sent and what the node acknowledged.
#[derive(Debug, Default)]
struct ClientLog {
    /// Transaction numbers posted, acknowledged or not.
    sent: BTreeSet<u64>,
    /// Transaction numbers answered with 200.
    acked: BTreeSet<u64>,
    /// The next number to use (numbers are never reused, across cycles too).
    next: u64,
}

/// Where the transactions are found in a node read back after a restart.
#[derive(Debug, Default)]
struct Found {
    /// Keys of the existing `orders/` documents.
    orders: BTreeSet<String>,
    /// Markers in each client's ledger.
    ledgers: Vec<BTreeSet<String>>,
    /// Markers in the inventory.
    inventory: BTreeSet<String>,
}

struct Harness {
    config_path: PathBuf,
    addr_file: PathBuf,
    dir: PathBuf,
    token: String,
    http: reqwest::Client,
    logs: Arc<Mutex<Vec<ClientLog>>>,
    /// Starts so far, to name each start's log file.
    starts: AtomicUsize,
}

impl Harness {
    fn new(dir: &Path) -> Harness {
        let options = sync_node::init::InitOptions::new("us-east".parse().unwrap(), dir);
        let config_path = sync_node::init::init(&options).unwrap();
        let config = Config::load(&config_path).unwrap();
        let token = config.read_token().unwrap().as_str().to_owned();
        Harness {
            addr_file: config.api_addr_path(),
            dir: dir.to_path_buf(),
            config_path,
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            logs: Arc::new(Mutex::new(
                (0..CLIENTS).map(|_| ClientLog::default()).collect(),
            )),
            starts: AtomicUsize::new(0),
        }
    }

    /// Starts the binary (stderr to `node-N.log`) and returns it with its
    /// base URL once it listens.
    async fn start(&self) -> (Process, String) {
        // A killed node leaves its api.addr behind.
        let _ = std::fs::remove_file(&self.addr_file);
        let log = self.dir.join(format!(
            "node-{}.log",
            self.starts.fetch_add(1, Ordering::SeqCst)
        ));
        let process = Process::start(&self.config_path, &log);
        let started = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.addr_file) {
                if text.ends_with('\n') {
                    return (process, format!("http://{}", text.trim()));
                }
            }
            assert!(
                started.elapsed() < WAIT_MAX,
                "the node did not start; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `POST path` with the token: the status and the JSON answer, or the
    /// transport error (the node is gone).
    async fn post(
        &self,
        url: &str,
        path: &str,
        body: &Value,
    ) -> Result<(StatusCode, Value), String> {
        let response = self
            .http
            .post(format!("{url}{path}"))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response.json().await.map_err(|e| e.to_string())?;
        Ok((status, body))
    }

    /// Creates the ledgers and the inventory, with their counters and
    /// empty marker maps.
    async fn create_docs(&self, url: &str) {
        let mut docs: Vec<Value> = (0..CLIENTS)
            .map(|client| {
                json!({"id": ledger(client), "if_absent": true, "ops": [
                    {"op": "set", "path": "/count", "value": 0, "as": "counter"},
                    {"op": "set", "path": "/txns", "value": {}},
                ]})
            })
            .collect();
        docs.push(json!({"id": INVENTORY, "if_absent": true, "ops": [
            {"op": "set", "path": "/stock", "value": STOCK, "as": "counter"},
            {"op": "set", "path": "/txns", "value": {}},
        ]}));
        let (status, body) = self
            .post(url, "/v1/txn", &json!({ "docs": docs }))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "creating the documents: {body}");
    }

    /// Runs the clients until the node acknowledged `kill_after`
    /// transactions in this cycle, then kills it with SIGKILL while they
    /// post, and waits for every client to notice.
    async fn post_until_killed(
        self: &Arc<Self>,
        url: &str,
        cycle: usize,
        kill_after: usize,
        process: &mut Process,
    ) {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let harness = self.clone();
                let (stop, acked, url) = (stop.clone(), acked.clone(), url.to_owned());
                tokio::spawn(async move {
                    for _ in 0..POSTS_PER_CYCLE_MAX {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let n = {
                            let mut logs = harness.logs.lock().unwrap();
                            let log = &mut logs[client];
                            let n = log.next;
                            log.next += 1;
                            log.sent.insert(n);
                            n
                        };
                        let key = txn_key(client, n);
                        let answer = harness.post(&url, "/v1/txn", &txn_body(client, &key)).await;
                        match answer {
                            Ok((StatusCode::OK, _)) => {
                                harness.logs.lock().unwrap()[client].acked.insert(n);
                                acked.fetch_add(1, Ordering::SeqCst);
                            }
                            // Every order id is new, so the node answers 200
                            // or dies; anything else is a bug.
                            Ok((status, body)) => {
                                panic!("transaction {key} refused: {status} {body}")
                            }
                            // The node is gone.
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        let started = Instant::now();
        while acked.load(Ordering::SeqCst) < kill_after {
            assert!(
                started.elapsed() < CYCLE_WAIT_MAX,
                "cycle {cycle}: only {} of {kill_after} transactions acknowledged in {CYCLE_WAIT_MAX:?}",
                acked.load(Ordering::SeqCst)
            );
            assert!(
                !tasks.iter().all(|t| t.is_finished()),
                "cycle {cycle}: every client stopped before the kill"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Every transaction holds the shared inventory's lock until its
        // write is durable, so right after an acknowledgement the next write
        // has just begun: kill somewhere later in it, or in the one after.
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..=20))).await;
        process.kill_9();
        let at_kill = acked.load(Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
        for task in tasks {
            task.await.unwrap();
        }
        eprintln!(
            "cycle {cycle}: killed after {at_kill} acknowledged transactions ({:?})",
            started.elapsed()
        );
    }

    /// Reads every ledger, the inventory and every order of the node at
    /// `url`, checking the counters agree with the markers.
    async fn read_back(&self, url: &str) -> Found {
        let mut found = Found::default();
        let mut ids: Vec<String> = (0..CLIENTS).map(ledger).collect();
        ids.push(INVENTORY.to_owned());
        let (status, read) = self
            .post(url, "/v1/read", &json!({ "ids": ids }))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{read}");
        let docs = read["docs"].as_array().unwrap();
        let markers = |value: &Value| -> BTreeSet<String> {
            value["txns"]
                .as_object()
                .unwrap_or_else(|| panic!("no marker map in {value}"))
                .keys()
                .cloned()
                .collect()
        };
        for (client, doc) in docs[..CLIENTS].iter().enumerate() {
            let value = &doc["value"];
            let marked = markers(value);
            assert_eq!(
                value["count"].as_u64(),
                Some(marked.len() as u64),
                "{}: the counter disagrees with its {} markers",
                ledger(client),
                marked.len()
            );
            found.ledgers.push(marked);
        }
        let inventory = &docs[CLIENTS]["value"];
        found.inventory = markers(inventory);
        assert_eq!(
            inventory["stock"].as_i64(),
            Some(STOCK - found.inventory.len() as i64),
            "{INVENTORY}: the counter disagrees with its {} markers",
            found.inventory.len()
        );

        let response = self
            .http
            .get(format!("{url}/v1/docs?prefix=orders%2F"))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let listing: Value = response.json().await.unwrap();
        let order_ids: Vec<String> = listing["docs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_str().unwrap().to_owned())
            .collect();
        for chunk in order_ids.chunks(READ_CHUNK) {
            let (status, read) = self
                .post(url, "/v1/read", &json!({ "ids": chunk }))
                .await
                .unwrap();
            assert_eq!(status, StatusCode::OK, "{read}");
            for doc in read["docs"].as_array().unwrap() {
                let id = doc["id"].as_str().unwrap();
                let key = id.strip_prefix("orders/").unwrap();
                assert_eq!(doc["value"]["txn"], key, "{id} holds another transaction");
                found.orders.insert(key.to_owned());
            }
        }
        found
    }

    /// Checks the node at `url` holds every acknowledged transaction whole
    /// and no transaction in part; returns (acknowledged, present but never
    /// acknowledged).
    async fn verify(&self, url: &str) -> (usize, usize) {
        let found = self.read_back(url).await;
        let logs = self.logs.lock().unwrap();
        let mut present: BTreeMap<String, [bool; 3]> = BTreeMap::new();
        for key in &found.orders {
            present.entry(key.clone()).or_default()[0] = true;
        }
        for key in found.ledgers.iter().flatten() {
            present.entry(key.clone()).or_default()[1] = true;
        }
        for key in &found.inventory {
            present.entry(key.clone()).or_default()[2] = true;
        }
        let (mut acked, mut unacked_present) = (0, 0);
        for (client, log) in logs.iter().enumerate() {
            for &n in &log.acked {
                let key = txn_key(client, n);
                assert_eq!(
                    present.get(&key),
                    Some(&[true; 3]),
                    "acknowledged transaction {key} is not whole ([order, ledger, inventory])"
                );
            }
            acked += log.acked.len();
            unacked_present += log
                .sent
                .difference(&log.acked)
                .filter(|&&n| present.contains_key(&txn_key(client, n)))
                .count();
        }
        for (key, places) in &present {
            assert_eq!(
                places, &[true; 3],
                "transaction {key} is there in part ([order, ledger, inventory])"
            );
            let (client, n) = key
                .strip_prefix('c')
                .and_then(|k| k.split_once('-'))
                .and_then(|(c, n)| Some((c.parse::<usize>().ok()?, n.parse::<u64>().ok()?)))
                .unwrap_or_else(|| panic!("a marker no client wrote: {key}"));
            assert!(
                client < CLIENTS && logs[client].sent.contains(&n),
                "transaction {key} was never sent"
            );
            assert!(
                found.ledgers[client].contains(key),
                "transaction {key} is in another client's ledger"
            );
        }
        (acked, unacked_present)
    }
}

async fn kill_cycles(cycles: usize) {
    let temp = tempfile::tempdir().unwrap();
    let harness = Arc::new(Harness::new(temp.path()));
    let (mut process, mut url) = harness.start().await;
    harness.create_docs(&url).await;
    for cycle in 0..cycles {
        let kill_after = rand::random_range(150..=300);
        harness
            .post_until_killed(&url, cycle, kill_after, &mut process)
            .await;
        // The restarted node is checked, then posted to in the next cycle.
        (process, url) = harness.start().await;
        let (acked, unacked_present) = harness.verify(&url).await;
        eprintln!(
            "cycle {cycle}: {acked} acknowledged transactions whole, \
             {unacked_present} unacknowledged ones whole, none in part"
        );
    }
    process.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactions_survive_kill_9_whole() {
    tokio::time::timeout(Duration::from_secs(120), kill_cycles(2))
        .await
        .expect("the transaction crash test took too long");
}

/// Run with `CARGO_TARGET_DIR=/tmp/target-tests cargo test -p sync-node
/// --release --test txn_crash -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "soak: 20 kill cycles"]
async fn transactions_survive_many_kill_9_cycles_whole() {
    tokio::time::timeout(Duration::from_secs(1200), kill_cycles(20))
        .await
        .expect("the transaction crash soak took too long");
}
