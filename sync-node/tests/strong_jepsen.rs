//! Jepsen-style test of the strong tier on three real `sync-node run`
//! processes, each pair connected over QUIC through a UDP relay on
//! 127.0.0.1. Clients at every site run reads (`?consistency=linearizable`),
//! writes and compare-and-set (a read, then a write with `if_heads` on what
//! it read) on three strong registers, while a nemesis partitions the
//! leader away, kills a node with SIGKILL and restarts it, slows every
//! link, and cuts a follower off. Every operation is recorded with its
//! invocation and return times; an answer that does not say whether the
//! write happened (a timeout, 504, a dropped connection) is recorded as
//! unknown, and 503 `no_quorum` as never having happened. The histories are
//! then checked for linearizability, key by key
//! ([`archipelago::strong::history`]). Meanwhile a writer at every site
//! commits CRDT documents, which must succeed throughout, on either side
//! of every partition. Every loop and wait is bounded.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use archipelago::strong::history::{check, Event, Op, Outcome};
use archipelago::transport::relay::{Faults, Relay};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{cli, wait_file, Process, WAIT_MAX};

mod support;

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
/// Strong registers the clients work on.
const KEYS: usize = 3;
/// Clients per site.
const CLIENTS: usize = 2;
/// Most operations one client makes (the bound on its loop).
const OPS_MAX: u64 = 5_000;

fn key(k: usize) -> String {
    format!("accounts/k{k}")
}

fn path_of(key: &str) -> String {
    key.replace('/', "%2F")
}

struct Site {
    name: &'static str,
    dir: PathBuf,
    process: Option<Process>,
}

impl Site {
    fn start(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("api.addr"));
        let _ = std::fs::remove_file(self.dir.join("sync.addr"));
        self.process = Some(Process::start(
            &self.dir.join("sync-node.toml"),
            &self.dir.join("node.log"),
        ));
        wait_file(&self.dir.join("api.addr"));
    }

    fn kill_9(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill_9();
        }
    }

    fn url(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join("api.addr")).ok()?;
        Some(format!("http://{}", text.trim()))
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("api.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// After the first start: the sync port it bound is written into its
    /// config, so a restart binds the same one (the relays point at it).
    fn pin_sync_port(&self) {
        let addr = wait_file(&self.dir.join("sync.addr"));
        let config = self.dir.join("sync-node.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        let pinned = text.replacen(
            "[sync]\nlisten = \"127.0.0.1:0\"",
            &format!("[sync]\nlisten = \"{addr}\""),
            1,
        );
        assert_ne!(text, pinned, "no [sync] listen to pin in {text}");
        std::fs::write(config, pinned).unwrap();
    }
}

/// Writes a site's directory with `peers` and the `[strong]` table.
fn init(root: &Path, name: &str, peers: &[(&str, String)]) -> PathBuf {
    let dir = root.join(name);
    let ca = root.join("ca");
    let mut args = vec![
        "init".to_owned(),
        "--site".to_owned(),
        name.to_owned(),
        "--dir".to_owned(),
        dir.to_str().unwrap().to_owned(),
        "--ca-dir".to_owned(),
        ca.to_str().unwrap().to_owned(),
        "--api".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
    ];
    for (peer, addr) in peers {
        args.push("--peer".to_owned());
        args.push(format!("{peer}={addr}"));
    }
    cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let config = dir.join("sync-node.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "\n[strong]\nvoters = [\"site-a\", \"site-b\", \"site-c\"]\nprefixes = [\"accounts/*\"]\n\
         heartbeat_ms = 150\nelection_timeout_min_ms = 600\nelection_timeout_max_ms = 1200\n\
         write_timeout_ms = 3000\n",
    );
    std::fs::write(&config, text).unwrap();
    dir
}

/// The history every client appends to, with times from one origin.
struct History {
    origin: Instant,
    events: Mutex<Vec<Event>>,
    ops: AtomicU64,
    unknown: AtomicU64,
    refused: AtomicU64,
    /// Why writes were refused or unknown, with counts.
    reasons: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl History {
    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn note(&self, why: String) {
        // Numbers (ms, heads) would make every reason its own.
        let why: String = why.chars().filter(|c| !c.is_ascii_digit()).collect();
        *self.reasons.lock().unwrap().entry(why).or_default() += 1;
    }

    fn refuse(&self, why: String) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.note(why);
    }

    fn record(&self, event: Event) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        if event.outcome == Outcome::Unknown {
            self.unknown.fetch_add(1, Ordering::Relaxed);
        }
        self.events.lock().unwrap().push(event);
    }
}

/// Where the clients of one site send requests (none while it is down).
#[derive(Clone)]
struct Target {
    url: Arc<Mutex<Option<String>>>,
    token: String,
}

impl Target {
    fn url(&self) -> Option<String> {
        self.url.lock().unwrap().clone()
    }
}

enum ReadResult {
    Value(Option<i64>, Vec<String>),
    Failed,
}

async fn read(http: &reqwest::Client, target: &Target, key: &str) -> ReadResult {
    let Some(url) = target.url() else {
        tokio::time::sleep(Duration::from_millis(20)).await;
        return ReadResult::Failed;
    };
    let response = http
        .get(format!(
            "{url}/v1/docs/{}?consistency=linearizable",
            path_of(key)
        ))
        .bearer_auth(&target.token)
        .send()
        .await;
    let Ok(response) = response else {
        return ReadResult::Failed;
    };
    match response.status() {
        StatusCode::OK => {
            let Ok(body) = response.json::<Value>().await else {
                return ReadResult::Failed;
            };
            let heads = body["heads"]
                .as_array()
                .map(|h| {
                    h.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            ReadResult::Value(body["value"]["value"].as_i64(), heads)
        }
        StatusCode::NOT_FOUND => ReadResult::Value(None, Vec::new()),
        _ => ReadResult::Failed,
    }
}

/// How a write was answered.
enum Written {
    Ok,
    PreconditionFailed,
    /// 503 `no_quorum`: it never happened (with why).
    Refused(String),
    /// With what was seen instead of an answer.
    Unknown(String),
}

async fn write(
    http: &reqwest::Client,
    target: &Target,
    key: &str,
    value: i64,
    if_heads: Option<&[String]>,
) -> Written {
    let Some(url) = target.url() else {
        tokio::time::sleep(Duration::from_millis(20)).await;
        return Written::Refused("the site is down".to_owned());
    };
    let mut body = json!({"ops": [{"op": "set", "path": "/value", "value": value}]});
    if let Some(heads) = if_heads {
        body["if_heads"] = json!(heads);
    }
    let response = http
        .post(format!("{url}/v1/docs/{}/ops", path_of(key)))
        .bearer_auth(&target.token)
        .json(&body)
        .send()
        .await;
    match response {
        Ok(r) if r.status() == StatusCode::OK => Written::Ok,
        Ok(r) if r.status() == StatusCode::CONFLICT => Written::PreconditionFailed,
        Ok(r) if r.status().is_client_error() => {
            panic!("a write was refused as malformed: {}", r.status())
        }
        Ok(r) => {
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            let reason = format!("{status} {}", body["error"]["message"]);
            if status == StatusCode::SERVICE_UNAVAILABLE && body["error"]["code"] == "no_quorum" {
                Written::Refused(reason)
            } else {
                // 504 `outcome_unknown`, ...
                Written::Unknown(reason)
            }
        }
        // A connection dropped by a kill, a timeout, ...
        Err(e) => Written::Unknown(e.to_string()),
    }
}

/// One client: random reads, writes and compare-and-sets until `stop`.
/// After an operation of unknown outcome it carries on as a new client
/// (the old one's operation may still take effect at any later time).
async fn client(
    http: reqwest::Client,
    target: Target,
    history: Arc<History>,
    id: u64,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(id);
    let mut client_id = id << 16;
    for n in 0..OPS_MAX {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let key = key(rng.random_range(0..KEYS));
        let unique = ((id << 32) | n) as i64;
        let invoked = history.now();
        let event = |op, returned, outcome| Event {
            client: client_id,
            key: key.clone(),
            op,
            invoked_ns: invoked,
            returned_ns: returned,
            outcome,
        };
        match rng.random_range(0..3) {
            0 => {
                if let ReadResult::Value(value, _) = read(&http, &target, &key).await {
                    history.record(event(Op::Read, Some(history.now()), Outcome::Read(value)));
                }
            }
            1 => match write(&http, &target, &key, unique, None).await {
                Written::Ok => history.record(event(
                    Op::Write(unique),
                    Some(history.now()),
                    Outcome::WriteOk,
                )),
                Written::Refused(why) => {
                    history.refuse(why);
                    // A refusal is immediate: do not spin on it.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Written::PreconditionFailed => panic!("a plain write answered 409"),
                Written::Unknown(why) => {
                    history.note(why);
                    history.record(event(Op::Write(unique), None, Outcome::Unknown));
                    client_id += 1;
                }
            },
            _ => {
                let ReadResult::Value(value, heads) = read(&http, &target, &key).await else {
                    continue;
                };
                history.record(event(Op::Read, Some(history.now()), Outcome::Read(value)));
                let Some(expect) = value else {
                    continue;
                };
                // Every value is written once, so "at the heads read" is
                // "holds the value read": a compare-and-set.
                let invoked = history.now();
                let op = Op::Cas {
                    expect,
                    new: unique,
                };
                let cas = |returned, outcome| Event {
                    client: client_id,
                    key: key.clone(),
                    op,
                    invoked_ns: invoked,
                    returned_ns: returned,
                    outcome,
                };
                match write(&http, &target, &key, unique, Some(&heads)).await {
                    Written::Ok => history.record(cas(Some(history.now()), Outcome::CasOk)),
                    Written::PreconditionFailed => {
                        history.record(cas(Some(history.now()), Outcome::CasFailed))
                    }
                    Written::Refused(why) => {
                        history.refuse(why);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Written::Unknown(why) => {
                        history.note(why);
                        history.record(cas(None, Outcome::Unknown));
                        client_id += 1;
                    }
                }
            }
        }
    }
}

/// A writer of CRDT documents at one site: every write must succeed while
/// the site runs, whatever the partitions.
async fn crdt_writer(
    http: reqwest::Client,
    target: Target,
    site: &'static str,
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    done: Arc<AtomicU64>,
) {
    for n in 0..OPS_MAX {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Some(url) = target.url() else {
            continue;
        };
        let response = http
            .post(format!("{url}/v1/docs/orders%2F{site}-{n}/ops"))
            .bearer_auth(&target.token)
            .json(&json!({"ops": [{"op": "set", "path": "/n", "value": n}]}))
            .send()
            .await;
        match response {
            Ok(r) if r.status() == StatusCode::OK => {
                done.fetch_add(1, Ordering::Relaxed);
            }
            // A node being killed drops the connection: not a refusal.
            Err(_) => {}
            Ok(r) => failures
                .lock()
                .unwrap()
                .push(format!("{site}: a CRDT write answered {}", r.status())),
        }
    }
}

async fn status(http: &reqwest::Client, site: &Site) -> Option<Value> {
    let url = site.url()?;
    let response = http
        .get(format!("{url}/v1/status"))
        .bearer_auth(site.token())
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

/// The index of the site every running site names as leader.
async fn leader(http: &reqwest::Client, sites: &[Site]) -> usize {
    let started = Instant::now();
    loop {
        for s in sites.iter().filter(|s| s.process.is_some()) {
            if let Some(body) = status(http, s).await {
                if body["strong"]["role"] == "leader" {
                    if let Some(k) = SITES.iter().position(|n| *n == s.name) {
                        return k;
                    }
                }
            }
        }
        assert!(
            started.elapsed() < WAIT_MAX,
            "no leader within {WAIT_MAX:?}; the logs:\n{}",
            logs(sites)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Copies every site's log to `$STRONG_JEPSEN_LOGS`, when set.
fn keep_logs(sites: &[Site]) {
    if let Ok(keep) = std::env::var("STRONG_JEPSEN_LOGS") {
        for s in sites {
            let _ = std::fs::copy(s.dir.join("node.log"), format!("{keep}/{}.log", s.name));
        }
    }
}

/// The last lines of every site's log.
fn logs(sites: &[Site]) -> String {
    keep_logs(sites);
    sites
        .iter()
        .map(|s| {
            let text = std::fs::read_to_string(s.dir.join("node.log")).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            format!("== {}\n{tail}", s.name)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The relays between `site` and the others.
fn relays_of(relays: &[(usize, usize, Relay)], site: usize) -> Vec<&Relay> {
    relays
        .iter()
        .filter(|(a, b, _)| *a == site || *b == site)
        .map(|(_, _, r)| r)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_registers_stay_linearizable_through_partitions_kills_and_slow_links() {
    let root = tempfile::tempdir().unwrap();
    cli(&[
        "ca",
        "init",
        "--dir",
        root.path().join("ca").to_str().unwrap(),
    ]);
    // site-a dials b and c, site-b dials c: start c, then b, then a, each
    // dialer through a relay in front of the site it dials.
    let placeholder = "127.0.0.1:9".to_owned();
    let dir_c = init(
        root.path(),
        "site-c",
        &[
            ("site-a", placeholder.clone()),
            ("site-b", placeholder.clone()),
        ],
    );
    let mut c = Site {
        name: "site-c",
        dir: dir_c,
        process: None,
    };
    c.start();
    c.pin_sync_port();
    let c_sync = wait_file(&c.dir.join("sync.addr")).parse().unwrap();
    let relay_ac = Relay::start(c_sync, Faults::default()).await.unwrap();
    let relay_bc = Relay::start(c_sync, Faults::default()).await.unwrap();
    let dir_b = init(
        root.path(),
        "site-b",
        &[
            ("site-a", placeholder.clone()),
            ("site-c", relay_bc.local_addr().to_string()),
        ],
    );
    let mut b = Site {
        name: "site-b",
        dir: dir_b,
        process: None,
    };
    b.start();
    b.pin_sync_port();
    let b_sync = wait_file(&b.dir.join("sync.addr")).parse().unwrap();
    let relay_ab = Relay::start(b_sync, Faults::default()).await.unwrap();
    let dir_a = init(
        root.path(),
        "site-a",
        &[
            ("site-b", relay_ab.local_addr().to_string()),
            ("site-c", relay_ac.local_addr().to_string()),
        ],
    );
    let mut a = Site {
        name: "site-a",
        dir: dir_a,
        process: None,
    };
    a.start();
    a.pin_sync_port();
    let mut sites = vec![a, b, c];
    let relays = vec![(0, 1, relay_ab), (0, 2, relay_ac), (1, 2, relay_bc)];
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let first = leader(&http, &sites).await;
    eprintln!("leader: {}", SITES[first]);

    let history = Arc::new(History {
        origin: Instant::now(),
        events: Mutex::new(Vec::new()),
        ops: AtomicU64::new(0),
        unknown: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        reasons: Mutex::new(std::collections::BTreeMap::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let crdt_failures = Arc::new(Mutex::new(Vec::new()));
    let crdt_done = Arc::new(AtomicU64::new(0));
    let targets: Vec<Target> = sites
        .iter()
        .map(|s| Target {
            url: Arc::new(Mutex::new(s.url())),
            token: s.token(),
        })
        .collect();
    let mut tasks = Vec::new();
    for (k, target) in targets.iter().enumerate() {
        for c in 0..CLIENTS {
            tasks.push(tokio::spawn(client(
                http.clone(),
                target.clone(),
                history.clone(),
                (k * CLIENTS + c + 1) as u64,
                stop.clone(),
            )));
        }
        tasks.push(tokio::spawn(crdt_writer(
            http.clone(),
            target.clone(),
            SITES[k],
            stop.clone(),
            crdt_failures.clone(),
            crdt_done.clone(),
        )));
    }

    // The nemesis.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lead = leader(&http, &sites).await;
    eprintln!("nemesis: partition the leader {}", SITES[lead]);
    for relay in relays_of(&relays, lead) {
        relay.set_partitioned(true);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (_, _, relay) in &relays {
        relay.set_partitioned(false);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lead = leader(&http, &sites).await;
    eprintln!("nemesis: kill -9 the leader {}", SITES[lead]);
    *targets[lead].url.lock().unwrap() = None;
    sites[lead].kill_9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sites[lead].start();
    *targets[lead].url.lock().unwrap() = sites[lead].url();
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("nemesis: slow every link");
    for (_, _, relay) in &relays {
        relay.set_faults(Faults {
            delay: Duration::from_millis(30),
            jitter: Duration::from_millis(10),
            seed: 7,
            ..Faults::default()
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (_, _, relay) in &relays {
        relay.set_faults(Faults::default());
    }
    let lead = leader(&http, &sites).await;
    let follower = (lead + 1) % 3;
    eprintln!("nemesis: cut the follower {} off", SITES[follower]);
    for relay in relays_of(&relays, follower) {
        relay.set_partitioned(true);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (_, _, relay) in &relays {
        relay.set_partitioned(false);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        tokio::time::timeout(WAIT_MAX, task)
            .await
            .expect("a client did not stop")
            .unwrap();
    }

    keep_logs(&sites);
    let events = history.events.lock().unwrap().clone();
    let completed = events.iter().filter(|e| e.returned_ns.is_some()).count();
    eprintln!(
        "history: {} operations ({completed} completed, {} unknown), {} refused with no_quorum; {} CRDT writes",
        history.ops.load(Ordering::Relaxed),
        history.unknown.load(Ordering::Relaxed),
        history.refused.load(Ordering::Relaxed),
        crdt_done.load(Ordering::Relaxed),
    );
    eprintln!(
        "refusals and unknowns: {:#?}",
        history.reasons.lock().unwrap()
    );
    assert!(completed > 100, "too few operations completed: {completed}");
    let failures = crdt_failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "CRDT writes failed: {failures:?}");
    if let Err(e) = check(&events) {
        if let Ok(keep) = std::env::var("STRONG_JEPSEN_LOGS") {
            let mut sorted = events.clone();
            sorted.sort_by_key(|e| (e.key.clone(), e.invoked_ns));
            let text: String = sorted.iter().map(|e| format!("{e:?}\n")).collect();
            let _ = std::fs::write(format!("{keep}/history.txt"), text);
        }
        panic!("the history is not linearizable: {e}");
    }
}
