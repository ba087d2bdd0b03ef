//! Two sites over real QUIC (mutual TLS, SQLite stores) on 127.0.0.1. Traffic
//! passes through the UDP relay, which counts its bytes and can add a
//! one-way delay.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use archipelago::doc::Op;
use archipelago::store::Sqlite;
use archipelago::transport::quic::SyncEndpoint;
use archipelago::transport::relay::{Faults, Relay};
use archipelago::transport::tls::CertificateAuthority;
use archipelago::{ChangeHash, DocId, Replica, ReplicaOptions, SiteName};
use serde_json::{json, Map, Value};

use crate::scenarios::metrics;

/// Bound of every waiting loop.
const WAIT_MAX: Duration = Duration::from_secs(300);

fn site(name: &str) -> anyhow::Result<SiteName> {
    Ok(name.parse()?)
}

fn open(dir: &std::path::Path, name: &str) -> anyhow::Result<Replica> {
    let store = Sqlite::open(dir.join(format!("{name}.db")))?;
    Ok(Replica::open(
        ReplicaOptions::new(site(name)?),
        Arc::new(store),
    )?)
}

/// A connection between replicas `site-a` and `site-b` through a relay.
struct Link {
    a: SyncEndpoint,
    b: SyncEndpoint,
    relay: Relay,
}

impl Link {
    async fn connect(a: &Replica, b: &Replica, one_way_delay: Duration) -> anyhow::Result<Link> {
        let ca = CertificateAuthority::generate("bench cluster")?;
        let nowhere: SocketAddr = "127.0.0.1:9".parse()?;
        let b_endpoint = SyncEndpoint::bind(
            "127.0.0.1:0".parse()?,
            ca.issue_site(&site("site-b")?)?,
            ca.cert_der(),
            vec![(site("site-a")?, nowhere)],
            b.clone(),
        )?;
        let relay = Relay::start(
            b_endpoint.local_addr()?,
            Faults {
                delay: one_way_delay,
                ..Faults::default()
            },
        )
        .await?;
        // site-a sorts first: it dials b, through the relay.
        let a_endpoint = SyncEndpoint::bind(
            "127.0.0.1:0".parse()?,
            ca.issue_site(&site("site-a")?)?,
            ca.cert_der(),
            vec![(site("site-b")?, relay.local_addr())],
            a.clone(),
        )?;
        let started = Instant::now();
        while !a_endpoint.peer_status().iter().any(|p| p.connected) {
            anyhow::ensure!(started.elapsed() < WAIT_MAX, "sites did not connect");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Link {
            a: a_endpoint,
            b: b_endpoint,
            relay,
        })
    }

    async fn close(self) -> u64 {
        let bytes = self.relay.stats().bytes;
        self.a.shutdown().await;
        self.b.shutdown().await;
        self.relay.stop().await;
        bytes
    }
}

fn set_ops(i: usize) -> Vec<Op> {
    serde_json::from_value(json!([{"op": "set", "path": format!("/k{}", i % 10), "value": i}]))
        .expect("static op")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// Commit-to-visible latency: site-a commits one change every 10 ms,
/// round-robin over 100 synced documents; each is timed until site-b's
/// replica has applied it.
async fn live_latency(one_way_delay: Duration, changes: usize) -> anyhow::Result<(f64, f64, u64)> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (open(dir.path(), "site-a")?, open(dir.path(), "site-b")?);
    let ids: Vec<DocId> = (0..100)
        .map(|d| format!("live/{d}").parse())
        .collect::<Result<_, _>>()?;
    for id in &ids {
        a.apply_ops(id, &set_ops(0), None)?;
    }
    let link = Link::connect(&a, &b, one_way_delay).await?;
    let started = Instant::now();
    while ids.iter().any(|id| b.heads(id) != a.heads(id)) {
        anyhow::ensure!(started.elapsed() < WAIT_MAX, "initial sync did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut feed = b.subscribe();
    let arrivals = tokio::spawn(async move {
        let mut seen: HashMap<ChangeHash, Instant> = HashMap::new();
        while seen.len() < changes {
            match feed.recv().await {
                Ok(committed) => {
                    for hash in committed.hashes {
                        seen.insert(hash, Instant::now());
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
        seen
    });
    let mut commits: Vec<(ChangeHash, Instant)> = Vec::with_capacity(changes);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for i in 0..changes {
        tick.tick().await;
        let at = Instant::now();
        let commit = a.apply_ops(&ids[i % ids.len()], &set_ops(i + 1), None)?;
        commits.push((
            commit.change.ok_or_else(|| anyhow::anyhow!("no change"))?,
            at,
        ));
    }
    let seen = tokio::time::timeout(WAIT_MAX, arrivals).await??;
    let mut latencies: Vec<Duration> = commits
        .iter()
        .map(|(hash, at)| {
            seen.get(hash)
                .map(|arrived| arrived.saturating_duration_since(*at))
        })
        .collect::<Option<_>>()
        .ok_or_else(|| anyhow::anyhow!("a change never arrived"))?;
    latencies.sort();
    let bytes = link.close().await;
    Ok((
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        bytes,
    ))
}

/// Commit-to-visible latency between two sites, on loopback and with 25 ms
/// one-way delay.
pub(crate) fn live(quick: bool) -> anyhow::Result<Map<String, Value>> {
    let changes = if quick { 300 } else { 1_000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (p50, p99, bytes) = live_latency(Duration::ZERO, changes).await?;
        let (p50_wan, p99_wan, _) = live_latency(Duration::from_millis(25), changes).await?;
        Ok(metrics(&[
            ("changes", json!(changes)),
            ("p50_ms", json!(p50)),
            ("p99_ms", json!(p99)),
            ("delay_25ms_p50_ms", json!(p50_wan)),
            ("delay_25ms_p99_ms", json!(p99_wan)),
            (
                "wire_bytes_per_change",
                json!(bytes as f64 / changes as f64),
            ),
        ]))
    })
}

/// Bulk replication of 1,000 documents x 100 changes from site-a to an
/// empty site-b over QUIC with SQLite stores, against decoding and applying
/// the same changes in-process with automerge.
pub(crate) fn bulk(quick: bool) -> anyhow::Result<Map<String, Value>> {
    let docs = if quick { 300 } else { 1_000 };
    let per_doc = 100;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        let (a, b) = (open(dir.path(), "site-a")?, open(dir.path(), "site-b")?);
        let ids: Vec<DocId> = (0..docs)
            .map(|d| format!("bulk/{d}").parse())
            .collect::<Result<_, _>>()?;
        let mut all = Vec::new();
        for id in &ids {
            for i in 0..per_doc {
                a.apply_ops(id, &set_ops(i), None)?;
            }
            all.push(a.changes_after(id, &[])?.unwrap_or_default());
        }
        let in_process = crate::scenarios::automerge_in_process(&all)?.as_secs_f64();

        let started = Instant::now();
        let link = Link::connect(&a, &b, Duration::ZERO).await?;
        while ids.iter().any(|id| b.heads(id) != a.heads(id)) {
            anyhow::ensure!(
                started.elapsed() < WAIT_MAX,
                "bulk replication did not finish"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let bytes = link.close().await;
        let total = docs * per_doc;
        Ok(metrics(&[
            ("docs", json!(docs)),
            ("changes", json!(total)),
            ("seconds", json!(seconds)),
            ("automerge_in_process_seconds", json!(in_process)),
            ("ratio_vs_automerge", json!(seconds / in_process)),
            ("wire_bytes", json!(bytes)),
            ("wire_bytes_per_change", json!(bytes as f64 / total as f64)),
        ]))
    })
}
