//! The head-to-head scenarios: archipelago (two sites, each a replica over
//! SQLite with its QUIC sync endpoint, on 127.0.0.1) against in-process
//! automerge and against samod (`crate::samod_side`) on the same workload,
//! in the same run.
//!
//! How arrival at B is detected, the same way for both systems: `bulk`,
//! `reconnect` and `memory` poll B's heads of the expected documents (every
//! 1-2 ms) until they equal A's; `live` subscribes at B (archipelago: the
//! replica's committed-change feed; samod: each document's change stream)
//! and timestamps the first moment B holds each change. Latency is measured
//! from the start of A's commit call to that moment (for archipelago the
//! commit includes making it durable at A, and B shows a change only once
//! it is durable at B; samod's side keeps both in memory). `live` also
//! runs once with both replicas over an in-memory store
//! (`p50_ms_without_storage`): the path without any disk. And it measures
//! the least any system can do here for the same workload and the same
//! detection (`minimal_path_*`): automerge at both ends, one unencrypted
//! UDP datagram, a broadcast to the subscriber; no storage, validation or
//! protocol. Every run takes turns between all four, so they share the
//! machine's faster and slower spells.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use archipelago::automerge::transaction::{CommitOptions, Transactable};
use archipelago::automerge::{Automerge, ReadDoc, ROOT};
use archipelago::doc::Op;
use archipelago::store::Sqlite;
use archipelago::transport::quic::SyncEndpoint;
use archipelago::transport::relay::{Faults, Relay};
use archipelago::transport::tls::CertificateAuthority;
use archipelago::{ChangeHash, DocId, Origin, Replica, ReplicaOptions, SiteName};
use serde_json::{json, Map, Value};

use crate::samod_side;
use crate::scenarios::{metrics, rss_bytes};

/// Bound of every waiting loop.
pub(crate) const WAIT_MAX: Duration = Duration::from_secs(600);

fn site(name: &str) -> anyhow::Result<SiteName> {
    Ok(name.parse()?)
}

/// A replica of site `name` over SQLite (WAL, `synchronous=FULL`) in
/// `dir`; `cache_idle` overrides how long an idle document stays loaded.
pub(crate) fn open(
    dir: &std::path::Path,
    name: &str,
    cache_idle: Option<Duration>,
) -> anyhow::Result<Replica> {
    let store = Sqlite::open(dir.join(format!("{name}.db")))?;
    let mut options = ReplicaOptions::new(site(name)?);
    if let Some(idle) = cache_idle {
        options.cache_idle = idle;
    }
    Ok(Replica::open(options, Arc::new(store))?)
}

/// A replica over an in-memory store (nothing durable): for the `live`
/// floor that shows what the path costs without storage.
fn open_in_memory(name: &str) -> anyhow::Result<Replica> {
    let options = ReplicaOptions::new(site(name)?);
    Ok(Replica::open(
        options,
        Arc::new(archipelago::store::Memory::new()),
    )?)
}

/// A runtime with two worker threads for the sites' endpoints.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The encoded changes of one document built by `commits` separate commits,
/// commit `i` setting integer key `k{i % 10}` to `i` (the workload samod's
/// side builds too).
fn small_commits(commits: usize) -> Vec<Vec<u8>> {
    let mut doc = Automerge::new();
    for i in 0..commits {
        let mut tx = doc.transaction();
        tx.put(ROOT, format!("k{}", i % 10), i as i64)
            .expect("a put on the root works");
        tx.commit_with(CommitOptions::default());
    }
    doc.get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}

/// Site B's endpoint (which accepts) and site A's (which dials B, directly
/// or through a counting relay).
pub(crate) struct Link {
    ca: CertificateAuthority,
    a: Option<SyncEndpoint>,
    b: SyncEndpoint,
    relay: Option<Relay>,
}

impl Link {
    pub(crate) async fn connect(a: &Replica, b: &Replica, relay: bool) -> anyhow::Result<Link> {
        let ca = CertificateAuthority::generate("bench cluster")?;
        let nowhere: SocketAddr = "127.0.0.1:9".parse()?;
        let b_endpoint = SyncEndpoint::bind(
            "127.0.0.1:0".parse()?,
            ca.issue_site(b.site())?,
            ca.cert_der(),
            vec![(a.site().clone(), nowhere)],
            b.clone(),
        )?;
        let mut link = Link {
            ca,
            a: None,
            b: b_endpoint,
            relay: None,
        };
        link.dial(a, relay).await?;
        Ok(link)
    }

    /// (Re)binds A's endpoint, dialing B (through a fresh relay when asked,
    /// so its byte count covers this connection only).
    async fn dial(&mut self, a: &Replica, relay: bool) -> anyhow::Result<()> {
        let b_addr = self.b.local_addr()?;
        let target = if relay {
            let relay = Relay::start(b_addr, Faults::default()).await?;
            let addr = relay.local_addr();
            self.relay = Some(relay);
            addr
        } else {
            b_addr
        };
        let endpoint = SyncEndpoint::bind(
            "127.0.0.1:0".parse()?,
            self.ca.issue_site(a.site())?,
            self.ca.cert_der(),
            vec![(self.b_site()?, target)],
            a.clone(),
        )?;
        let started = Instant::now();
        while !endpoint.peer_status().iter().any(|p| p.connected) {
            anyhow::ensure!(started.elapsed() < WAIT_MAX, "sites did not connect");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.a = Some(endpoint);
        Ok(())
    }

    fn b_site(&self) -> anyhow::Result<SiteName> {
        site("site-b")
    }

    /// Closes A's side (B keeps listening); returns the relay's bytes.
    async fn disconnect(&mut self) -> u64 {
        if let Some(a) = self.a.take() {
            a.shutdown().await;
        }
        match self.relay.take() {
            Some(relay) => {
                let bytes = relay.stats().bytes;
                relay.stop().await;
                bytes
            }
            None => 0,
        }
    }

    fn relay_bytes(&self) -> u64 {
        self.relay.as_ref().map_or(0, |r| r.stats().bytes)
    }

    pub(crate) async fn close(mut self) -> u64 {
        let bytes = self.disconnect().await;
        self.b.shutdown().await;
        bytes
    }
}

/// Waits until B holds A's heads for every document in `ids`.
pub(crate) async fn until_same(
    a: &Replica,
    b: &Replica,
    ids: &[DocId],
    poll: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut pending: Vec<&DocId> = ids.iter().collect();
    loop {
        pending.retain(|id| b.heads(id) != a.heads(id));
        if pending.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < WAIT_MAX,
            "{} documents did not arrive",
            pending.len()
        );
        tokio::time::sleep(poll).await;
    }
}

/// Waits until the relay's byte count stops growing (the tail of acks).
async fn quiet_bytes(link: &Link) -> u64 {
    let mut last = link.relay_bytes();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = link.relay_bytes();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// `bulk`: 1,000 documents x 100 small commits at A, B empty, until B's
/// heads equal A's; against in-process `apply_changes` and samod.
pub(crate) fn bulk(_quick: bool) -> anyhow::Result<Map<String, Value>> {
    let (docs, per_doc) = (1_000, 100);
    let dir = tempfile::tempdir()?;
    let (a, b) = (
        open(dir.path(), "site-a", None)?,
        open(dir.path(), "site-b", None)?,
    );
    let ids: Vec<DocId> = (0..docs)
        .map(|d| format!("bulk/{d}").parse())
        .collect::<Result<_, _>>()?;
    let mut all = Vec::with_capacity(docs);
    for id in &ids {
        let changes = small_commits(per_doc);
        a.apply_changes(id, &changes, Origin::Local)?;
        all.push(changes);
    }
    let in_process = crate::scenarios::automerge_in_process(&all)?.as_secs_f64();
    let (seconds, bytes) = runtime()?.block_on(async {
        let started = Instant::now();
        let link = Link::connect(&a, &b, true).await?;
        until_same(&a, &b, &ids, Duration::from_millis(2)).await?;
        let seconds = started.elapsed().as_secs_f64();
        anyhow::Ok((seconds, link.close().await))
    })?;
    eprintln!("  archipelago {seconds:.3} s (in-process automerge {in_process:.3} s); samod ...");
    let samod = samod_side::bulk(docs, per_doc)?.as_secs_f64();
    let total = docs * per_doc;
    Ok(metrics(&[
        ("docs", json!(docs)),
        ("changes", json!(total)),
        ("seconds", json!(seconds)),
        ("automerge_in_process_seconds", json!(in_process)),
        ("samod_seconds", json!(samod)),
        ("ratio_vs_automerge", json!(seconds / in_process)),
        ("ratio_vs_samod", json!(seconds / samod)),
        ("wire_bytes", json!(bytes)),
    ]))
}

/// The `p` quantile (0 to 1) of `sorted` latencies, in milliseconds.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// One op setting integer key `k{key % 10}` to `value`.
pub(crate) fn set_op(key: usize, value: usize) -> Vec<Op> {
    serde_json::from_value(
        json!([{"op": "set", "path": format!("/k{}", key % 10), "value": value}]),
    )
    .expect("static op")
}

/// Commit-to-visible latencies at B while A commits one change every
/// `interval` round-robin over 100 synced documents.
/// With `durable` false both replicas keep everything in memory.
async fn live_latencies(
    changes: usize,
    interval: Duration,
    durable: bool,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let dir = tempfile::tempdir()?;
    let (a, b) = if durable {
        (
            open(dir.path(), "site-a", None)?,
            open(dir.path(), "site-b", None)?,
        )
    } else {
        (open_in_memory("site-a")?, open_in_memory("site-b")?)
    };
    let ids: Vec<DocId> = (0..100)
        .map(|d| format!("live/{d}").parse())
        .collect::<Result<_, _>>()?;
    for id in &ids {
        a.apply_ops(id, &set_op(0, 0), None)?;
    }
    let link = Link::connect(&a, &b, false).await?;
    until_same(&a, &b, &ids, Duration::from_millis(5)).await?;
    // One unmeasured round, a change per document: B received the documents
    // whole and keeps them as bytes until first used (see `memory`), so
    // each one's first live change would also time loading it.
    let mut tick = tokio::time::interval(interval);
    for (n, id) in ids.iter().enumerate() {
        tick.tick().await;
        let (a, id) = (a.clone(), id.clone());
        tokio::task::spawn_blocking(move || a.apply_ops(&id, &set_op(n, 1_000_000 + n), None))
            .await??;
    }
    until_same(&a, &b, &ids, Duration::from_millis(5)).await?;
    let mut feed = b.subscribe();
    let arrivals = tokio::spawn(async move {
        let mut seen: HashMap<ChangeHash, Instant> = HashMap::new();
        while seen.len() < changes {
            match feed.recv().await {
                Ok(committed) => {
                    let now = Instant::now();
                    for hash in committed.hashes {
                        seen.insert(hash, now);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
        seen
    });
    // A writes from a thread of its own, as a program embedding the
    // library's synchronous API does: each commit starts when the thread
    // wakes from its sleep, as samod's starts when its task wakes.
    let writer = {
        let (a, ids) = (a.clone(), ids.clone());
        std::thread::spawn(
            move || -> anyhow::Result<Vec<(ChangeHash, Instant, Instant)>> {
                let mut commits = Vec::with_capacity(changes);
                let start = Instant::now();
                for i in 0..changes {
                    let due = start + interval * (i as u32 + 1);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    let started = Instant::now();
                    let commit = a.apply_ops(&ids[i % ids.len()], &set_op(i, i + 1), None)?;
                    commits.push((
                        commit.change.ok_or_else(|| anyhow::anyhow!("no change"))?,
                        started,
                        Instant::now(),
                    ));
                }
                Ok(commits)
            },
        )
    };
    let commits = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the writing thread panicked"))??;
    let seen = tokio::time::timeout(WAIT_MAX, arrivals).await??;
    link.close().await;
    let mut from_start = Vec::with_capacity(changes);
    let mut from_durable = Vec::with_capacity(changes);
    for (hash, started, durable) in &commits {
        let arrived = seen
            .get(hash)
            .ok_or_else(|| anyhow::anyhow!("a change never arrived"))?;
        from_start.push(arrived.saturating_duration_since(*started));
        from_durable.push(arrived.saturating_duration_since(*durable));
    }
    Ok((from_start, from_durable))
}

/// The least any replication of a live change can do on this machine,
/// measured the way `live` measures the systems: at A, a thread that wakes
/// every `interval` commits one put to an in-process automerge document
/// (100 of them, round-robin) and sends the encoded change in one UDP
/// datagram on 127.0.0.1, with no encryption; at B, a thread blocked on the
/// socket applies it to its copy of the document and publishes it on a
/// broadcast that a task subscribes to, as `live` subscribes to B's
/// replica. No storage, no checks, no framing, no session. Returns the
/// latencies from the start of the commit to the subscriber, after one
/// unmeasured round over the documents.
async fn minimal_path(changes: usize, interval: Duration) -> anyhow::Result<Vec<Duration>> {
    const DOCS: usize = 100;
    let mut a_docs = Vec::with_capacity(DOCS);
    let mut b_docs = Vec::with_capacity(DOCS);
    for _ in 0..DOCS {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(ROOT, "k0", 0_i64)?;
        tx.commit();
        b_docs.push(Automerge::load(&doc.save())?);
        a_docs.push(doc);
    }
    let total = DOCS + changes;
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0")?;
    receiver.set_read_timeout(Some(Duration::from_secs(10)))?;
    let to = receiver.local_addr()?;
    let (published, mut feed) = tokio::sync::broadcast::channel::<usize>(1024);
    let arrivals = tokio::spawn(async move {
        let mut seen: HashMap<usize, Instant> = HashMap::with_capacity(total);
        while seen.len() < total {
            match feed.recv().await {
                Ok(n) => {
                    seen.insert(n, Instant::now());
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
        seen
    });
    let applier = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut buf = vec![0u8; 65_536];
        for _ in 0..total {
            let len = receiver.recv(&mut buf)?;
            anyhow::ensure!(len > 8, "a short datagram");
            let n = u64::from_be_bytes(buf[..8].try_into()?) as usize;
            let change = archipelago::automerge::Change::try_from(&buf[8..len])?;
            let hash = change.hash();
            let doc = &mut b_docs[n % DOCS];
            doc.apply_changes([change])?;
            anyhow::ensure!(doc.get_heads() == [hash], "a change did not apply");
            let _ = published.send(n);
        }
        Ok(())
    });
    let writer = std::thread::spawn(move || -> anyhow::Result<Vec<Instant>> {
        let sender = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let mut started = Vec::with_capacity(total);
        let start = Instant::now();
        for n in 0..total {
            let due = start + interval * (n as u32 + 1);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            started.push(Instant::now());
            let doc = &mut a_docs[n % DOCS];
            let mut tx = doc.transaction();
            tx.put(ROOT, format!("k{}", n % 10), 1_000_000 + n as i64)?;
            let (Some(hash), _) = tx.commit() else {
                anyhow::bail!("the put made no change");
            };
            let change = doc
                .get_change_by_hash(&hash)
                .ok_or_else(|| anyhow::anyhow!("the change is gone"))?;
            let mut datagram = (n as u64).to_be_bytes().to_vec();
            datagram.extend_from_slice(change.raw_bytes());
            sender.send_to(&datagram, to)?;
        }
        Ok(started)
    });
    let started = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the writing thread panicked"))??;
    tokio::task::spawn_blocking(move || applier.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the applying thread panicked"))??;
    let seen = tokio::time::timeout(WAIT_MAX, arrivals).await??;
    (DOCS..total)
        .map(|n| {
            let arrived = seen
                .get(&n)
                .ok_or_else(|| anyhow::anyhow!("a change never arrived"))?;
            Ok(arrived.saturating_duration_since(started[n]))
        })
        .collect()
}

/// `live`: 100 synced documents; A commits every 10 ms round-robin, 1,000
/// changes; commit-to-visible at B, against samod.
pub(crate) fn live(quick: bool) -> anyhow::Result<Map<String, Value>> {
    let changes = if quick { 500 } else { 1_000 };
    let interval = Duration::from_millis(10);
    // The runs take turns, half of the changes each time, so a slower or
    // faster spell of the machine weighs on all alike. The third is the
    // same path with nothing durable at either site: what the hops between
    // threads and QUIC cost alone.
    let rounds = 2;
    let (mut ours, mut after_durable, mut samod, mut floor, mut minimal) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (from_start, from_durable) =
            runtime()?.block_on(live_latencies(changes / rounds, interval, true))?;
        ours.extend(from_start);
        after_durable.extend(from_durable);
        samod.extend(samod_side::live(100, changes / rounds, interval)?);
        floor.extend(
            runtime()?
                .block_on(live_latencies(changes / rounds, interval, false))?
                .0,
        );
        minimal.extend(runtime()?.block_on(minimal_path(changes / rounds, interval))?);
    }
    ours.sort();
    after_durable.sort();
    samod.sort();
    floor.sort();
    minimal.sort();
    eprintln!(
        "  archipelago p50 {:.3} ms p99 {:.3} ms; samod p50 {:.3} ms p99 {:.3} ms; minimal path p50 {:.3} ms",
        percentile(&ours, 0.5),
        percentile(&ours, 0.99),
        percentile(&samod, 0.5),
        percentile(&samod, 0.99),
        percentile(&minimal, 0.5),
    );
    let (p50, p99) = (percentile(&ours, 0.5), percentile(&ours, 0.99));
    let (s50, s99) = (percentile(&samod, 0.5), percentile(&samod, 0.99));
    Ok(metrics(&[
        ("changes", json!(changes)),
        ("p50_ms", json!(p50)),
        ("p99_ms", json!(p99)),
        (
            "p50_ms_from_durable_at_a",
            json!(percentile(&after_durable, 0.5)),
        ),
        (
            "p99_ms_from_durable_at_a",
            json!(percentile(&after_durable, 0.99)),
        ),
        ("p50_ms_without_storage", json!(percentile(&floor, 0.5))),
        ("p99_ms_without_storage", json!(percentile(&floor, 0.99))),
        ("minimal_path_p50_ms", json!(percentile(&minimal, 0.5))),
        ("minimal_path_p99_ms", json!(percentile(&minimal, 0.99))),
        (
            "minimal_path_p50_ratio_vs_samod",
            json!(percentile(&minimal, 0.5) / s50),
        ),
        ("samod_p50_ms", json!(s50)),
        ("samod_p99_ms", json!(s99)),
        ("p50_ratio_vs_samod", json!(p50 / s50)),
        ("p99_ratio_vs_samod", json!(p99 / s99)),
    ]))
}

/// Our side of `reconnect`: `docs` documents of `per_doc` changes identical
/// at both sites; A disconnects, 10 documents change at A, A reconnects.
/// Returns the seconds until B has the changes, the bytes both ways, and
/// the bytes of a connection between the identical sites (handshake and
/// reconciliation alone).
fn reconnect_ours(docs: usize, per_doc: usize, changed: usize) -> anyhow::Result<(f64, u64, u64)> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (
        open(dir.path(), "site-a", None)?,
        open(dir.path(), "site-b", None)?,
    );
    let ids: Vec<DocId> = (0..docs)
        .map(|d| format!("tenant-{}/orders/{d}", d % 7).parse())
        .collect::<Result<_, _>>()?;
    for id in &ids {
        let changes = small_commits(per_doc);
        a.apply_changes(id, &changes, Origin::Local)?;
        b.apply_changes(id, &changes, Origin::Local)?;
    }
    runtime()?.block_on(async {
        let mut link = Link::connect(&a, &b, true).await?;
        until_same(&a, &b, &ids, Duration::from_millis(5)).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let identical = link.disconnect().await;
        let touched: Vec<DocId> = ids
            .iter()
            .step_by(docs / changed)
            .take(changed)
            .cloned()
            .collect();
        for (n, id) in touched.iter().enumerate() {
            a.apply_ops(id, &set_op(n, 1_000_000 + n), None)?;
        }
        let started = Instant::now();
        link.dial(&a, true).await?;
        until_same(&a, &b, &touched, Duration::from_millis(1)).await?;
        let seconds = started.elapsed().as_secs_f64();
        let bytes = quiet_bytes(&link).await;
        link.close().await;
        Ok((seconds, bytes, identical))
    })
}

/// `reconnect`: N documents identical at both sites, 10 change at A while
/// apart; seconds and wire bytes until B has them, against samod.
pub(crate) fn reconnect(quick: bool) -> anyhow::Result<Map<String, Value>> {
    let (docs, per_doc, changed) = (if quick { 2_000 } else { 10_000 }, 20, 10);
    let (seconds, bytes, identical) = reconnect_ours(docs, per_doc, changed)?;
    eprintln!("  archipelago {seconds:.3} s, {bytes} bytes; samod ...");
    let (samod_time, samod_bytes) = samod_side::reconnect(docs, per_doc, changed)?;
    let samod_seconds = samod_time.as_secs_f64();
    let mut pairs = vec![
        ("docs", json!(docs)),
        ("changed", json!(changed)),
        ("seconds", json!(seconds)),
        ("wire_bytes", json!(bytes)),
        ("identical_sites_wire_bytes", json!(identical)),
        ("samod_seconds", json!(samod_seconds)),
        ("samod_wire_bytes", json!(samod_bytes)),
        ("seconds_ratio_vs_samod", json!(seconds / samod_seconds)),
        (
            "wire_bytes_ratio_vs_samod",
            json!(bytes as f64 / samod_bytes as f64),
        ),
    ];
    if !quick {
        let (s, b, _) = reconnect_ours(100_000, per_doc, changed)?;
        pairs.push(("docs_100k_seconds", json!(s)));
        pairs.push(("docs_100k_wire_bytes", json!(b)));
    }
    Ok(metrics(&pairs))
}

/// Resident memory once the allocator has returned what was freed: jemalloc
/// (the bench's allocator, as the daemon's, and SQLite's too) purges freed
/// pages gradually over its decay time (10 s) on a background thread, so
/// this reads RSS after twice that.
fn settled_rss() -> anyhow::Result<u64> {
    std::thread::sleep(Duration::from_secs(21));
    rss_bytes()
}

/// Syncs a few documents between two throwaway sites, so that code pages
/// and process-wide state touched by the first sync (QUIC, TLS, runtime)
/// are resident before the baseline and not counted per document.
fn warm_up() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (
        open(dir.path(), "site-a", None)?,
        open(dir.path(), "site-b", None)?,
    );
    let ids: Vec<DocId> = (0..100)
        .map(|d| format!("warm/{d}").parse())
        .collect::<Result<_, _>>()?;
    for id in &ids {
        a.apply_changes(id, &small_commits(4), Origin::Local)?;
    }
    runtime()?.block_on(async {
        let link = Link::connect(&a, &b, false).await?;
        until_same(&a, &b, &ids, Duration::from_millis(5)).await?;
        link.close().await;
        anyhow::Ok(())
    })?;
    for id in &ids {
        b.read_json(id, None)?;
    }
    Ok(())
}

/// Bytes the Rust heap holds in live allocations (jemalloc's count; SQLite's
/// own allocations are not in it).
fn heap_bytes() -> anyhow::Result<u64> {
    tikv_jemalloc_ctl::epoch::advance().map_err(|e| anyhow::anyhow!("jemalloc epoch: {e}"))?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read()
        .map_err(|e| anyhow::anyhow!("jemalloc stats: {e}"))?;
    Ok(allocated as u64)
}

/// `memory`: RSS growth at B per document after receiving N documents from
/// A over QUIC and serving each once, then idle (the cache drops documents
/// idle for 1 s); against samod, which keeps every document loaded. The
/// baseline is taken once a warm-up sync between two other sites has run
/// and freed memory has settled, so first-use costs of the process (code
/// pages, runtime state) are not counted as per-document cost; both RSS
/// readings wait for the allocator to return freed pages. The heap figure
/// is the growth of live Rust allocations over the same span.
pub(crate) fn memory(quick: bool) -> anyhow::Result<Map<String, Value>> {
    let docs = if quick { 10_000 } else { 100_000 };
    // samod's cost to sync grows faster than the number of documents
    // (about 7 s for 2,000, minutes for 10,000): fewer in quick mode.
    let samod_docs = if quick { 2_000 } else { 10_000 };
    // Freed memory goes back to the system in the background.
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
    let idle = Duration::from_secs(1);
    let dir = tempfile::tempdir()?;
    let a = open(dir.path(), "site-a", None)?;
    let ids: Vec<DocId> = (0..docs)
        .map(|d| format!("tenant-{}/orders/{d}", d % 7).parse())
        .collect::<Result<_, _>>()?;
    for id in &ids {
        a.apply_changes(id, &small_commits(4), Origin::Local)?;
    }
    a.evict_idle();
    warm_up()?;
    let before = settled_rss()?;
    let heap_before = heap_bytes()?;
    let b = open(dir.path(), "site-b", Some(idle))?;
    runtime()?.block_on(async {
        let link = Link::connect(&a, &b, false).await?;
        until_same(&a, &b, &ids, Duration::from_millis(20)).await?;
        link.close().await;
        anyhow::Ok(())
    })?;
    let after_sync = rss_bytes()?;
    for id in &ids {
        b.read_json(id, None)?;
    }
    let after_serve = rss_bytes()?;
    std::thread::sleep(idle + Duration::from_millis(200));
    let dropped = b.evict_idle();
    a.evict_idle();
    let after = settled_rss()?;
    let heap_after = heap_bytes()?;
    let per_doc = after.saturating_sub(before) as f64 / docs as f64;
    let heap_per_doc = heap_after.saturating_sub(heap_before) as f64 / docs as f64;
    eprintln!(
        "  archipelago {per_doc:.0} B per idle doc, heap {heap_per_doc:.0} B (RSS MB: before {}, received {}, served {}, idle {}); samod ...",
        before >> 20,
        after_sync >> 20,
        after_serve >> 20,
        after >> 20
    );
    let samod = samod_side::memory(samod_docs)?;
    Ok(metrics(&[
        ("docs", json!(docs)),
        ("idle_docs_dropped_from_cache", json!(dropped)),
        ("rss_bytes_per_idle_doc", json!(per_doc.round())),
        ("heap_bytes_per_idle_doc", json!(heap_per_doc.round())),
        ("samod_docs", json!(samod_docs)),
        ("samod_rss_bytes_per_idle_doc", json!(samod.round())),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_reconnect_delivers_the_changes() {
        let (seconds, bytes, identical) = reconnect_ours(50, 3, 5).unwrap();
        assert!(seconds > 0.0 && bytes > identical && identical > 0);
    }

    #[test]
    fn small_live_latencies_are_measured() {
        let (from_start, from_durable) = runtime()
            .unwrap()
            .block_on(live_latencies(5, Duration::from_millis(10), true))
            .unwrap();
        assert_eq!(from_start.len(), 5);
        assert!(from_start.iter().zip(&from_durable).all(|(s, d)| s >= d));
    }

    #[test]
    fn the_minimal_path_delivers_every_change() {
        let latencies = runtime()
            .unwrap()
            .block_on(minimal_path(5, Duration::from_millis(1)))
            .unwrap();
        assert_eq!(latencies.len(), 5);
        assert!(latencies
            .iter()
            .all(|l| *l > Duration::ZERO && *l < WAIT_MAX));
    }
}
