//! The benchmark scenarios. Each returns the metrics it measured.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use archipelago::doc::Op;
use archipelago::store::Sqlite;
use archipelago::{DocId, Replica, ReplicaOptions};
use serde_json::{json, Map, Value};

/// Scenario names in run order (memory first, before other scenarios have
/// grown the heap).
pub(crate) const NAMES: &[&str] = &[
    "memory",
    "bulk",
    "live",
    "reconnect",
    "api_commits",
    "conflict_overhead",
    "api_commits_single_doc",
    "library_commits",
    "library_commits_single_doc",
    "sync_reconcile",
    "sync_catchup",
    "txn",
    "escrow",
    "ws_clients",
    "saga",
];

pub(crate) fn run(name: &str, quick: bool) -> anyhow::Result<Map<String, Value>> {
    match name {
        "memory" => crate::versus::memory(quick),
        "bulk" => crate::versus::bulk(quick),
        "live" => crate::versus::live(quick),
        "reconnect" => crate::versus::reconnect(quick),
        "library_commits" => library_commits(quick, 100),
        "library_commits_single_doc" => library_commits(quick, 1),
        "api_commits" => api_commits(quick, 100),
        "api_commits_single_doc" => api_commits(quick, 1),
        "sync_reconcile" => crate::sync_core::reconcile(quick),
        "sync_catchup" => crate::sync_core::catchup(quick),
        "conflict_overhead" => crate::conflicts::overhead(quick),
        "txn" => crate::txn::txn(quick),
        "escrow" => crate::escrow::escrow(quick),
        "ws_clients" => crate::ws_clients::ws_clients(quick),
        "saga" => crate::saga::saga(quick),
        other => anyhow::bail!("unknown scenario {other}"),
    }
}

/// The in-process limit: decodes each document's changes and applies them
/// to a fresh automerge document in one batch. Returns the time taken.
pub(crate) fn automerge_in_process(docs: &[Vec<Vec<u8>>]) -> anyhow::Result<std::time::Duration> {
    let started = Instant::now();
    for changes in docs {
        let decoded: Vec<archipelago::automerge::Change> = changes
            .iter()
            .map(|c| archipelago::automerge::Change::try_from(c.as_slice()))
            .collect::<Result<_, _>>()?;
        let mut doc = archipelago::automerge::Automerge::new();
        doc.apply_changes(decoded)?;
    }
    Ok(started.elapsed())
}

pub(crate) fn metrics(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn set_op(key: usize, value: usize) -> Vec<Op> {
    serde_json::from_value(
        json!([{"op": "set", "path": format!("/k{}", key % 10), "value": value}]),
    )
    .expect("static op parses")
}

/// Durable commits per second through the library: 8 threads, commits
/// spread round-robin over `docs` documents, SQLite store.
fn library_commits(quick: bool, docs: usize) -> anyhow::Result<Map<String, Value>> {
    let total = if quick { 8_000 } else { 40_000 };
    let threads = 8;
    let dir = tempfile::tempdir()?;
    let replica = Replica::open(
        ReplicaOptions::new("bench".parse()?),
        Arc::new(Sqlite::open(dir.path().join("store.db"))?),
    )?;
    let ids: Arc<Vec<DocId>> = Arc::new(
        (0..docs)
            .map(|d| format!("bench/{d}").parse())
            .collect::<Result<_, _>>()?,
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (replica, ids, next) = (replica.clone(), ids.clone(), next.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok(());
                    }
                    replica.apply_ops(&ids[i % ids.len()], &set_op(i, i), None)?;
                }
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(metrics(&[
        ("commits", json!(total)),
        ("docs", json!(docs)),
        ("threads", json!(threads)),
        ("seconds", json!(seconds)),
        (
            "commits_per_second",
            json!((total as f64 / seconds).round()),
        ),
    ]))
}

/// Durable `POST /v1/docs/{id}/ops` commits per second through a node's
/// HTTP API on 127.0.0.1: 8 concurrent clients, round-robin over `docs`.
fn api_commits(quick: bool, docs: usize) -> anyhow::Result<Map<String, Value>> {
    let total = if quick { 8_000 } else { 40_000 };
    let clients = 8;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let dir = tempfile::tempdir()?;
        let path = sync_node::init::init(&sync_node::init::InitOptions::new("bench".parse()?, dir.path()))?;
        let node = sync_node::Node::start(&sync_node::config::Config::load(&path)?).await?;
        let http = reqwest::Client::new();
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (http, next) = (http.clone(), next.clone());
            let (url, token) = (node.url(), node.token().to_owned());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return anyhow::Ok(());
                    }
                    let body = json!({"ops": [{"op": "set", "path": format!("/k{}", i % 10), "value": i}]});
                    let response = http
                        .post(format!("{url}/v1/docs/bench%2F{}/ops", i % docs))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await?;
                    anyhow::ensure!(response.status().is_success(), "commit failed: {}", response.status());
                }
            }));
        }
        for task in tasks {
            task.await??;
        }
        let seconds = started.elapsed().as_secs_f64();
        node.shutdown().await?;
        Ok(metrics(&[
            ("commits", json!(total)),
            ("docs", json!(docs)),
            ("clients", json!(clients)),
            ("seconds", json!(seconds)),
            ("commits_per_second", json!((total as f64 / seconds).round())),
        ]))
    })
}

/// The process's resident memory.
pub(crate) fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))?;
    let kb: u64 = line.split_whitespace().nth(1).unwrap_or("0").parse()?;
    Ok(kb * 1024)
}
