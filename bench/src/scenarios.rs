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
    "memory_idle_docs",
    "library_commits",
    "library_commits_single_doc",
    "api_commits",
    "api_commits_single_doc",
    "sync_reconcile",
    "sync_catchup",
    "quic_live",
    "quic_bulk",
    "conflict_overhead",
];

pub(crate) fn run(name: &str, quick: bool) -> anyhow::Result<Map<String, Value>> {
    match name {
        "memory_idle_docs" => memory_idle_docs(quick),
        "library_commits" => library_commits(quick, 100),
        "library_commits_single_doc" => library_commits(quick, 1),
        "api_commits" => api_commits(quick, 100),
        "api_commits_single_doc" => api_commits(quick, 1),
        "sync_reconcile" => crate::sync_core::reconcile(quick),
        "sync_catchup" => crate::sync_core::catchup(quick),
        "quic_live" => crate::quic_nodes::live(quick),
        "quic_bulk" => crate::quic_nodes::bulk(quick),
        "conflict_overhead" => crate::conflicts::overhead(quick),
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

/// Resident memory per idle document (stored, indexed, not loaded) and per
/// document held loaded in the cache.
fn memory_idle_docs(quick: bool) -> anyhow::Result<Map<String, Value>> {
    let docs = if quick { 20_000 } else { 100_000 };
    let loaded = 1_000;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.db");
    {
        // Write the documents through a first replica, then drop it.
        let replica = Replica::open(
            ReplicaOptions::new("bench".parse()?),
            Arc::new(Sqlite::open(&path)?),
        )?;
        let ids: Arc<Vec<DocId>> = Arc::new(
            (0..docs)
                .map(|d| format!("tenant-{}/orders/{d}", d % 7).parse())
                .collect::<Result<_, _>>()?,
        );
        let next = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (replica, ids, next) = (replica.clone(), ids.clone(), next.clone());
                std::thread::spawn(move || -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= ids.len() {
                            return Ok(());
                        }
                        let ops: Vec<Op> = serde_json::from_value(json!([
                            {"op": "set", "path": "/customer", "value": format!("c{i}")},
                            {"op": "set", "path": "/total", "value": i},
                            {"op": "set", "path": "/stock", "value": 10, "as": "counter"},
                        ]))?;
                        replica.apply_ops(&ids[i], &ops, None)?;
                    }
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("worker panicked"))??;
        }
    }
    let before = rss_bytes()?;
    let mut options = ReplicaOptions::new("bench".parse()?);
    options.cache_docs_max = loaded;
    let replica = Replica::open(options, Arc::new(Sqlite::open(&path)?))?;
    let ids = replica.doc_ids("");
    anyhow::ensure!(
        ids.len() == docs,
        "expected {docs} documents, found {}",
        ids.len()
    );
    let after_open = rss_bytes()?;
    // Serve every document once through the cache; the last `loaded` stay
    // loaded, the rest are evicted back to bytes in the store.
    for id in &ids {
        replica.read_json(id, None)?;
    }
    let after_all = rss_bytes()?;
    let per_index_entry = after_open.saturating_sub(before) as f64 / docs as f64;
    let per_idle = after_all.saturating_sub(before) as f64 / docs as f64;
    Ok(metrics(&[
        ("docs", json!(docs)),
        ("loaded_docs", json!(replica.stats().loaded_docs)),
        (
            "rss_bytes_per_doc_index_only",
            json!(per_index_entry.round()),
        ),
        ("rss_bytes_per_idle_doc", json!(per_idle.round())),
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

fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))?;
    let kb: u64 = line.split_whitespace().nth(1).unwrap_or("0").parse()?;
    Ok(kb * 1024)
}
