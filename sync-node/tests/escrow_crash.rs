//! Rights of a bounded counter survive `kill -9`: no right is lost, none
//! created. `eu-west` (the real binary) holds a bounded counter of 200
//! and its clients sell from it and transfer rights to `us-east` (the real
//! binary too) while the two replicate, and `us-east`'s client spends the
//! rights it receives. `eu-west` is SIGKILLed mid-stream and restarted on
//! the same directory cut off from `us-east` (a UDP relay between them
//! partitions), and its clients sell and transfer until its rights run
//! out before the link heals: a site that forgot a spend its peer already
//! holds would spend those rights again and, once merged, hold negative
//! rights. Twice over. Once both agree: every site's rights are non-negative and add up to
//! the value, every acknowledged sale and transfer is there, and nothing
//! beyond what was in flight at a kill. Loopback only; every wait is
//! bounded.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use archipelago::transport::relay::{Faults, Relay};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{cli, wait_file, Process, WAIT_MAX};

mod support;

const DOC: &str = "inventory%2Fsku-1";
/// The counter's starting value, all of it `eu-west`'s rights: its clients
/// use them up in the first cycle, after the first restart.
const STOCK: i64 = 150;
/// Clients posting at `eu-west`.
const CLIENTS: u64 = 4;
/// Kill cycles.
const CYCLES: usize = 2;
/// How long `eu-west`'s clients post before a kill (more each cycle, so
/// kills land at different points of the write pipeline).
const CYCLE: Duration = Duration::from_millis(200);
/// How long they post after the restart, cut off from `us-east`.
const CUT_OFF: Duration = Duration::from_millis(600);
/// Most ops one client posts in one run (the bound on its loop).
const POSTS_MAX: u64 = 20_000;

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
}

/// What the clients of one site had acknowledged.
#[derive(Default)]
struct Acked {
    sales: AtomicU64,
    transfers: AtomicU64,
    /// Posts sent whose answer never came (the node died meanwhile).
    unanswered: AtomicU64,
    /// Ops refused for want of rights.
    refused: AtomicU64,
}

/// Posts sales (and, with `transfer_to`, transfers of one right every
/// other op) until the node stops answering or `stop` is set; a refusal
/// for want of rights is fine (the site ran out).
fn spawn_client(
    http: reqwest::Client,
    url: String,
    token: String,
    transfer_to: Option<&'static str>,
    acked: Arc<Acked>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0..POSTS_MAX {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let transfer = transfer_to.filter(|_| i % 2 == 1);
            let request = match transfer {
                Some(to) => http
                    .post(format!("{url}/v1/docs/{DOC}/escrow/transfer"))
                    .json(&json!({"path": "/stock", "to": to, "amount": 1})),
                None => http.post(format!("{url}/v1/docs/{DOC}/ops")).json(
                    &json!({"ops": [{"op": "inc", "path": "/stock", "by": -1}], "wait_ms": 0}),
                ),
            };
            match request.bearer_auth(&token).send().await {
                Ok(response) if response.status().is_success() => {
                    let counter = if transfer.is_some() {
                        &acked.transfers
                    } else {
                        &acked.sales
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Ok(response) if response.status() == StatusCode::CONFLICT => {
                    acked.refused.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(response) => panic!("unexpected answer {}", response.status()),
                Err(_) => {
                    acked.unanswered.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        }
    })
}

async fn escrow(http: &reqwest::Client, site: &Site) -> Option<Value> {
    let response = http
        .get(format!("{}/v1/docs/{DOC}/escrow?path=/stock", site.url()))
        .bearer_auth(site.token())
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < WAIT_MAX, "{what} within {WAIT_MAX:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_transfers_loses_no_rights_and_creates_none() {
    kill_and_check().await;
}

/// A kill loses a spend its peer holds only when it lands in the few
/// hundred microseconds of a write's fsync after the change went out, so
/// one run catches a regression there now and then, the soak reliably:
/// `cargo test -p sync-node --test escrow_crash -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: 30 runs"]
async fn kill_9_soak() {
    for _ in 0..30 {
        kill_and_check().await;
    }
}

async fn kill_and_check() {
    let root = tempfile::tempdir().unwrap();
    let path = |p: &str| root.path().join(p).to_str().unwrap().to_owned();
    cli(&["ca", "init", "--dir", &path("ca")]);
    // us-east sorts after eu-west, so it only accepts; start it first.
    cli(&[
        "init",
        "--site",
        "us-east",
        "--dir",
        &path("us"),
        "--ca-dir",
        &path("ca"),
        "--api",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--peer",
        "eu-west=127.0.0.1:9",
    ]);
    let us = Site::start(&root.path().join("us"));
    let us_sync = wait_file(&root.path().join("us/sync.addr"));
    let relay = Relay::start(us_sync.parse().unwrap(), Faults::default())
        .await
        .unwrap();
    let us_sync = relay.local_addr().to_string();
    cli(&[
        "init",
        "--site",
        "eu-west",
        "--dir",
        &path("eu"),
        "--ca-dir",
        &path("ca"),
        "--api",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--peer",
        &format!("us-east={us_sync}"),
    ]);
    let mut eu = Site::start(&root.path().join("eu"));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let created = http
        .post(format!("{}/v1/docs/{DOC}/ops", eu.url()))
        .bearer_auth(eu.token())
        .json(&json!({"ops": [{"op": "set", "path": "/stock", "value": STOCK, "as": "bounded", "min": 0}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::OK);
    wait_until("the counter to reach us-east", async || {
        escrow(&http, &us).await.is_some()
    })
    .await;

    let eu_acked = Arc::new(Acked::default());
    let us_acked = Arc::new(Acked::default());
    let stop_us = Arc::new(AtomicBool::new(false));
    let us_client = spawn_client(
        http.clone(),
        us.url(),
        us.token(),
        None,
        us_acked.clone(),
        stop_us.clone(),
    );
    let run_clients = |eu: &Site, stop: &Arc<AtomicBool>| -> Vec<tokio::task::JoinHandle<()>> {
        (0..CLIENTS)
            .map(|_| {
                spawn_client(
                    http.clone(),
                    eu.url(),
                    eu.token(),
                    Some("us-east"),
                    eu_acked.clone(),
                    stop.clone(),
                )
            })
            .collect()
    };
    for cycle in 0..CYCLES {
        let clients = run_clients(&eu, &Arc::new(AtomicBool::new(false)));
        tokio::time::sleep(CYCLE + Duration::from_millis(37 * cycle as u64)).await;
        eu.process.kill_9();
        for client in clients {
            client.await.unwrap();
        }
        relay.set_partitioned(true);
        eu = Site::start(&root.path().join("eu"));
        let stop = Arc::new(AtomicBool::new(false));
        let clients = run_clients(&eu, &stop);
        tokio::time::sleep(CUT_OFF).await;
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.unwrap();
        }
        relay.set_partitioned(false);
    }
    stop_us.store(true, Ordering::SeqCst);
    us_client.await.unwrap();

    // Both agree, then check.
    wait_until("the sites to agree", async || {
        match (escrow(&http, &eu).await, escrow(&http, &us).await) {
            (Some(a), Some(b)) => a["value"] == b["value"] && a["rights"] == b["rights"],
            _ => false,
        }
    })
    .await;
    let state = escrow(&http, &eu).await.unwrap();
    let value = state["value"].as_i64().unwrap();
    let rights = |site: &str| state["rights"][site].as_i64().unwrap_or(0);
    let sum: i64 = state["rights"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    eprintln!(
        "{CYCLES} kills: value {value}, rights {}, eu-west acknowledged {} sales and {} transfers \
         ({} unanswered, {} refused), us-east {} sales",
        state["rights"],
        eu_acked.sales.load(Ordering::SeqCst),
        eu_acked.transfers.load(Ordering::SeqCst),
        eu_acked.unanswered.load(Ordering::SeqCst),
        eu_acked.refused.load(Ordering::SeqCst),
        us_acked.sales.load(Ordering::SeqCst),
    );
    assert!(rights("eu-west") >= 0 && rights("us-east") >= 0, "{state}");
    assert_eq!(sum, value, "rights created or lost: {state}");
    let in_flight = eu_acked.unanswered.load(Ordering::SeqCst) as i64;
    let (eu_sales, transfers) = (
        eu_acked.sales.load(Ordering::SeqCst) as i64,
        eu_acked.transfers.load(Ordering::SeqCst) as i64,
    );
    let us_sales = us_acked.sales.load(Ordering::SeqCst) as i64;
    // us-east was never killed: what it acknowledged is exactly what it did.
    let transferred = rights("us-east") + us_sales;
    assert!(
        (transfers..=transfers + in_flight).contains(&transferred),
        "{transfers} transfers acknowledged, {in_flight} unanswered, {transferred} made: {state}"
    );
    let eu_sold = STOCK - value - us_sales;
    assert!(
        (eu_sales..=eu_sales + in_flight).contains(&eu_sold),
        "{eu_sales} sales acknowledged at eu-west, {in_flight} unanswered, {eu_sold} made: {state}"
    );
    assert!(us_sales > 0, "us-east never spent a transferred right");
    assert!(
        eu_acked.refused.load(Ordering::SeqCst) > 0,
        "eu-west never ran out of rights, so no right was scarce"
    );
}
