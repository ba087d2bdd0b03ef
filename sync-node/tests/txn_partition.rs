//! Transactions become visible whole at a site that catches up over a slow
//! link. Two in-process nodes, `us-east` (A, where every transaction is
//! committed) and `eu-west` (B), replicate over QUIC through a UDP relay on
//! 127.0.0.1. The relay partitions them; meanwhile A commits 200
//! transactions, each moving units between two of 20 `balances/NN`
//! documents and creating an `orders/KEY` document. The link heals slowed
//! (delay, jitter, loss) while A commits 50 more, and a client polls B's
//! `POST /v1/read` over every document involved the whole time: every read
//! must show each transaction wholly or not at all. Finally B must hold
//! exactly what A holds (the same heads for every document, the same
//! digest).
//!
//! A transaction `KEY` moving `k` from balance `i` to `j` increments
//! `/amount` of `balances/i` by `-k` and of `balances/j` by `k`, sets the
//! markers `/moves/KEY` to `-k` and `k` in them, and creates `orders/KEY` as
//! `{"from": i, "to": j, "amount": k}`. So in a read that holds every
//! transaction whole the sum of the amounts never changes, each amount is
//! its start plus its markers, and an order is there exactly when both its
//! markers are (see [`check_cut`]).
//!
//! Two scenarios: the connection survives the partition (what was pushed
//! meanwhile is retransmitted on the live lane), and B restarts during it
//! (a new connection, then reconciliation and catch-up document by
//! document). Every wait is bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use archipelago::transport::quic::IDLE_TIMEOUT;
use archipelago::transport::relay::{Faults, Relay};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sync_node::config::Config;
use sync_node::init::{init, InitOptions};
use sync_node::Node;

mod support;
use support::get_json;

/// Balance documents.
const BALANCES: usize = 20;
/// Each balance's starting amount.
const INITIAL: i64 = 1_000;
/// Transactions committed at A during the partition.
const DURING_PARTITION: usize = 200;
/// Transactions committed at A while B catches up.
const DURING_HEAL: usize = 50;
/// Bound on each wait for the sites to connect or agree.
const WAIT: Duration = Duration::from_secs(60);
/// Bound on the whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);
/// Most reads the polling client makes (the bound on its loop).
const READS_MAX: usize = 1_000_000;

/// The link once healed: slow, a little jittery (QUIC packets reorder) and
/// lossy.
fn slow_link(seed: u64) -> Faults {
    Faults {
        delay: Duration::from_millis(30),
        jitter: Duration::from_millis(5),
        loss: 0.01,
        seed,
        ..Faults::default()
    }
}

fn balance(i: usize) -> String {
    format!("balances/{i:02}")
}

/// One planned transfer.
#[derive(Debug, Clone)]
struct Transfer {
    key: String,
    from: usize,
    to: usize,
    amount: i64,
}

impl Transfer {
    /// The body of `POST /v1/txn` that commits it.
    fn body(&self) -> Value {
        let leg = |i: usize, by: i64| {
            json!({"id": balance(i), "ops": [
                {"op": "inc", "path": "/amount", "by": by},
                {"op": "set", "path": format!("/moves/{}", self.key), "value": by},
            ]})
        };
        json!({
            "docs": [
                leg(self.from, -self.amount),
                {"id": format!("orders/{}", self.key), "if_absent": true, "ops": [
                    {"op": "set", "path": "/from", "value": self.from},
                    {"op": "set", "path": "/to", "value": self.to},
                    {"op": "set", "path": "/amount", "value": self.amount},
                ]},
                leg(self.to, self.amount),
            ],
            "message": format!("transfer {}", self.key),
        })
    }
}

/// `count` transfers between distinct random balances, keyed `{tag}-{n}`.
fn plan(rng: &mut StdRng, tag: &str, count: usize) -> Vec<Transfer> {
    (0..count)
        .map(|n| {
            let from = rng.random_range(0..BALANCES);
            let to = (from + rng.random_range(1..BALANCES)) % BALANCES;
            Transfer {
                key: format!("{tag}-{n}"),
                from,
                to,
                amount: rng.random_range(1..=50),
            }
        })
        .collect()
}

/// The ids every read asks for: the balances, then every planned order.
fn read_ids(transfers: &[Transfer]) -> Vec<String> {
    (0..BALANCES)
        .map(balance)
        .chain(transfers.iter().map(|t| format!("orders/{}", t.key)))
        .collect()
}

/// Checks one read (the docs of `POST /v1/read` over [`read_ids`]) holds
/// every transaction wholly or not at all; returns how many transactions it
/// holds, or what is wrong.
fn check_cut(docs: &[Value]) -> Result<usize, String> {
    if docs.len() < BALANCES {
        return Err(format!("the read answered {} documents", docs.len()));
    }
    let mut total = 0;
    let mut moves: Vec<BTreeMap<String, i64>> = Vec::with_capacity(BALANCES);
    for (i, doc) in docs[..BALANCES].iter().enumerate() {
        let value = &doc["value"];
        let amount = value["amount"]
            .as_i64()
            .ok_or_else(|| format!("{}: no amount in {value}", balance(i)))?;
        let marked: BTreeMap<String, i64> = value["moves"]
            .as_object()
            .ok_or_else(|| format!("{}: no moves in {value}", balance(i)))?
            .iter()
            .map(|(key, by)| (key.clone(), by.as_i64().unwrap_or(i64::MIN)))
            .collect();
        let marked_sum: i64 = marked.values().sum();
        if amount != INITIAL + marked_sum {
            return Err(format!(
                "{}: amount {amount} is not {INITIAL} plus its moves ({marked_sum}): {value}",
                balance(i)
            ));
        }
        total += amount;
        moves.push(marked);
    }
    let expected = INITIAL * BALANCES as i64;
    if total != expected {
        return Err(format!("the balances sum to {total}, not {expected}"));
    }
    let mut orders = BTreeSet::new();
    for doc in &docs[BALANCES..] {
        if doc["value"].is_null() {
            continue;
        }
        let id = doc["id"].as_str().unwrap_or_default();
        let key = id.strip_prefix("orders/").unwrap_or(id);
        let order = &doc["value"];
        let (Some(from), Some(to), Some(amount)) = (
            order["from"].as_u64(),
            order["to"].as_u64(),
            order["amount"].as_i64(),
        ) else {
            return Err(format!("{id} is not a whole order: {order}"));
        };
        let (from, to) = (from as usize, to as usize);
        for (i, by) in [(from, -amount), (to, amount)] {
            let marked = moves.get(i).and_then(|m| m.get(key));
            if marked != Some(&by) {
                return Err(format!(
                    "{id} is there but {} shows {marked:?} for it, not {by}",
                    balance(i)
                ));
            }
        }
        orders.insert(key.to_owned());
    }
    for (i, marked) in moves.iter().enumerate() {
        if let Some(key) = marked.keys().find(|key| !orders.contains(*key)) {
            return Err(format!(
                "{} shows transfer {key} but orders/{key} is not there",
                balance(i)
            ));
        }
    }
    Ok(orders.len())
}

/// `POST path` with the token: the status and the JSON answer.
async fn post(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    path: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let response = http
        .post(format!("{url}{path}"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `POST /v1/read` of `ids` at `node`: the documents read.
async fn read(http: &reqwest::Client, node: &Node, ids: &[String]) -> Vec<Value> {
    let (status, body) = post(
        http,
        &node.url(),
        node.token(),
        "/v1/read",
        &json!({ "ids": ids }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "read: {body}");
    body["docs"].as_array().cloned().unwrap_or_default()
}

/// Commits `transfer` at `url`, which must accept it.
async fn commit(http: &reqwest::Client, url: &str, token: &str, transfer: &Transfer) {
    let (status, body) = post(http, url, token, "/v1/txn", &transfer.body()).await;
    assert_eq!(status, StatusCode::OK, "transfer {}: {body}", transfer.key);
}

/// Commits every transfer at `node` from `clients` concurrent clients, each
/// taking the next transfer not yet taken.
async fn commit_all(http: &reqwest::Client, node: &Node, transfers: &[Transfer], clients: usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let transfers: Arc<[Transfer]> = transfers.into();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, token) = (http.clone(), node.url(), node.token().to_owned());
            let (next, transfers) = (next.clone(), transfers.clone());
            tokio::spawn(async move {
                while let Some(transfer) = transfers.get(next.fetch_add(1, Ordering::SeqCst)) {
                    commit(&http, &url, &token, transfer).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a client committing at A failed");
    }
}

/// What the polling client saw.
#[derive(Debug, Default)]
struct Polled {
    /// Reads made.
    reads: usize,
    /// How many transactions each read held, each count once.
    states: BTreeSet<usize>,
    /// The first read that held a transaction in part (or failed).
    violation: Option<String>,
}

/// A client reading B in a loop until stopped (or at the first read that
/// shows part of a transaction), recording what it saw.
struct Poller {
    polled: Arc<Mutex<Polled>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Poller {
    fn start(http: reqwest::Client, node: &Node, ids: Vec<String>) -> Poller {
        let polled = Arc::new(Mutex::new(Polled::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (url, token) = (node.url(), node.token().to_owned());
        let record = polled.clone();
        let task = tokio::spawn(async move {
            for _ in 0..READS_MAX {
                if *stopped.borrow() {
                    return;
                }
                let (status, body) =
                    post(&http, &url, &token, "/v1/read", &json!({ "ids": ids })).await;
                let checked = if status == StatusCode::OK {
                    check_cut(body["docs"].as_array().map_or(&[][..], Vec::as_slice))
                } else {
                    Err(format!("the read answered {status}: {body}"))
                };
                let mut polled = record.lock().unwrap();
                polled.reads += 1;
                match checked {
                    Ok(held) => {
                        polled.states.insert(held);
                    }
                    Err(violation) => {
                        polled.violation = Some(violation);
                        return;
                    }
                }
            }
        });
        Poller { polled, stop, task }
    }

    /// The first violation seen so far, if any.
    fn violation(&self) -> Option<String> {
        self.polled.lock().unwrap().violation.clone()
    }

    /// Stops the client and returns what it saw.
    async fn stop(self) -> Polled {
        let _ = self.stop.send(true);
        self.task.await.expect("the polling client failed");
        Arc::try_unwrap(self.polled)
            .expect("the client is done")
            .into_inner()
            .unwrap()
    }
}

struct Site {
    node: Node,
    config: PathBuf,
}

impl Site {
    /// Writes a node directory for `site` under `root` with an identity from
    /// the CA at `ca_dir` and `peer`, and starts the node.
    async fn init_and_start(root: &Path, ca_dir: &Path, site: &str, peer: String) -> Site {
        let mut options = InitOptions::new(site.parse().unwrap(), root.join(site));
        options.ca_dir = Some(ca_dir.to_path_buf());
        options.peers = vec![peer.parse().unwrap()];
        let config = init(&options).unwrap();
        Site::start(config).await
    }

    async fn start(config: PathBuf) -> Site {
        let node = Node::start(&Config::load(&config).unwrap()).await.unwrap();
        Site { node, config }
    }

    /// Shuts the node down and starts it again on the same directory.
    async fn restart(self) -> Site {
        self.node.shutdown().await.unwrap();
        Site::start(self.config).await
    }

    fn connected(&self) -> bool {
        let peers = self.node.peers();
        !peers.is_empty() && peers.iter().all(|p| p.status.connected)
    }
}

/// Waits until `done` holds, checking every 20 ms; fails after [`WAIT`] with
/// `what` and the last `done` answer's detail, or as soon as `poller` saw a
/// violation.
async fn until<F, Fut>(what: &str, poller: Option<&Poller>, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(violation) = poller.and_then(Poller::violation) {
            panic!("B showed part of a transaction: {violation}");
        }
        let detail = match done().await {
            Ok(()) => return,
            Err(detail) => detail,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {WAIT:?}: {detail}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// B holds what A holds: the same heads and value for every document read,
/// and the same digest of all heads.
async fn same(http: &reqwest::Client, a: &Node, b: &Node, ids: &[String]) -> Result<(), String> {
    let (at_a, at_b) = (read(http, a, ids).await, read(http, b, ids).await);
    if let Some((x, y)) = at_a.iter().zip(&at_b).find(|(x, y)| x != y) {
        return Err(format!("{} differs: A {x}, B {y}", x["id"]));
    }
    let (status_a, digest_a) = get_json(http, a, "/v1/heads/digest").await;
    let (status_b, digest_b) = get_json(http, b, "/v1/heads/digest").await;
    assert_eq!((status_a, status_b), (StatusCode::OK, StatusCode::OK));
    if digest_a != digest_b {
        return Err(format!("digests differ: A {digest_a}, B {digest_b}"));
    }
    Ok(())
}

async fn partition_and_catch_up(restart_b: bool, seed: u64) {
    let root = tempfile::tempdir().unwrap();
    let ca_dir = root.path().join("ca");
    sync_node::ca::init_ca(&ca_dir, false).unwrap();
    // `us-east` sorts after `eu-west`, so it only accepts; B dials it
    // through the relay (and dials it again after a restart).
    let a = Site::init_and_start(
        root.path(),
        &ca_dir,
        "us-east",
        "eu-west=127.0.0.1:9".to_owned(),
    )
    .await;
    let relay = Relay::start(a.node.sync_addr().unwrap(), Faults::default())
        .await
        .unwrap();
    let mut b = Site::init_and_start(
        root.path(),
        &ca_dir,
        "eu-west",
        format!("us-east={}", relay.local_addr()),
    )
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let partitioned = plan(&mut rng, "p", DURING_PARTITION);
    let healing = plan(&mut rng, "h", DURING_HEAL);
    let all: Vec<Transfer> = partitioned.iter().chain(&healing).cloned().collect();
    let ids = read_ids(&all);

    // The balances, created at A and replicated before the partition.
    let docs: Vec<Value> = (0..BALANCES)
        .map(|i| {
            json!({"id": balance(i), "if_absent": true, "ops": [
                {"op": "set", "path": "/amount", "value": INITIAL, "as": "counter"},
                {"op": "set", "path": "/moves", "value": {}},
            ]})
        })
        .collect();
    let (status, body) = post(
        &http,
        &a.node.url(),
        a.node.token(),
        "/v1/txn",
        &json!({ "docs": docs }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "creating the balances: {body}");
    {
        let (http, a, b, ids) = (&http, &a.node, &b, &ids);
        until("the balances to reach B", None, || {
            same(http, a, &b.node, ids)
        })
        .await;
        until("B to be connected", None, || async move {
            if b.connected() {
                Ok(())
            } else {
                Err(format!("{:?}", b.node.peers()))
            }
        })
        .await;
    }

    let mut poller = Poller::start(http.clone(), &b.node, ids.clone());
    let started = tokio::time::Instant::now();
    relay.set_partitioned(true);
    commit_all(&http, &a.node, &partitioned, 8).await;
    let at_a = read(&http, &a.node, &ids).await;
    assert_eq!(
        check_cut(&at_a),
        Ok(DURING_PARTITION),
        "A holds its transactions"
    );
    if restart_b {
        let polled = poller.stop().await;
        assert_eq!(polled.violation, None, "B showed part of a transaction");
        b = b.restart().await;
        poller = Poller::start(http.clone(), &b.node, ids.clone());
    }
    {
        let polled = &poller.polled;
        until(
            "B to be read during the partition",
            Some(&poller),
            || async move {
                let reads = polled.lock().unwrap().reads;
                if reads >= 5 {
                    Ok(())
                } else {
                    Err(format!("{reads} reads"))
                }
            },
        )
        .await;
    }
    let before_heal = poller.polled.lock().unwrap().states.clone();
    assert_eq!(
        before_heal.into_iter().collect::<Vec<_>>(),
        vec![0],
        "B saw no transaction during the partition"
    );

    let partitioned_for = started.elapsed();
    relay.set_faults(slow_link(seed));
    relay.set_partitioned(false);
    let healed = tokio::time::Instant::now();
    let writer = {
        let (http, url, token) = (http.clone(), a.node.url(), a.node.token().to_owned());
        tokio::spawn(async move {
            for transfer in &healing {
                commit(&http, &url, &token, transfer).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    {
        let (http, a, b, ids, writer) = (&http, &a.node, &b.node, &ids, &writer);
        until("B to catch up with A", Some(&poller), || async move {
            if !writer.is_finished() {
                return Err("A is still committing".to_owned());
            }
            same(http, a, b, ids).await
        })
        .await;
    }
    let caught_up_in = healed.elapsed();
    writer.await.expect("the writer at A failed");
    let polled = poller.stop().await;
    assert_eq!(polled.violation, None, "B showed part of a transaction");
    let at_b = read(&http, &b.node, &ids).await;
    assert_eq!(check_cut(&at_b), Ok(all.len()), "B holds every transaction");
    let stats = b.node.replica().txn_stats();
    eprintln!(
        "restart_b={restart_b}: partitioned for {partitioned_for:?}, B caught up \
         {caught_up_in:?} after the heal; {} reads at B, all whole, showing {} \
         different numbers of transactions (of {}); B applied {} held groups",
        polled.reads,
        polled.states.len(),
        all.len(),
        stats.completed,
    );
    assert_eq!(stats.held_txns, 0, "B holds nothing back once caught up");
    assert!(polled.reads > 10, "B was read while it caught up");
    if !restart_b && partitioned_for < IDLE_TIMEOUT / 2 {
        // Over the connection that survived, B applies the transactions
        // as they arrive; a restarted B (or one whose connection timed
        // out) may get them all in one catch-up.
        assert!(
            polled.states.iter().any(|&n| n > 0 && n < all.len()),
            "B was read while it held some of the transactions: {:?}",
            polled.states
        );
    }

    b.node.shutdown().await.unwrap();
    a.node.shutdown().await.unwrap();
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_at_a_site_catching_up_over_a_slow_link_hold_transactions_whole() {
    tokio::time::timeout(TEST_TIMEOUT, partition_and_catch_up(false, 11))
        .await
        .expect("the partition test took too long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_at_a_site_restarted_during_a_partition_hold_transactions_whole() {
    tokio::time::timeout(TEST_TIMEOUT, partition_and_catch_up(true, 12))
        .await
        .expect("the partition test took too long");
}
