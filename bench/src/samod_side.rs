//! The comparison side of the bench: the same workloads run on samod 0.16
//! (automerge-repo in Rust, on the same automerge 0.12 as archipelago), so
//! both systems are measured in one run on one machine.
//!
//! Two samod repos, site A and site B, live in this process on one tokio
//! runtime with two worker threads. B dials A over TCP on 127.0.0.1 with
//! `TCP_NODELAY`; frames are samod's own length-delimited framing
//! ([`Transport::from_tokio_io`], a `tokio_util` `LengthDelimitedCodec`). The
//! dialing side's socket is wrapped in [`CountedStream`], so the bytes each
//! direction carries are counted exactly once.
//!
//! Both repos use samod's in-memory storage. archipelago's side writes to
//! SQLite, so this favours samod: none of its timings include a disk.
//!
//! Every wait is bounded by [`WAIT_LIMIT`] and turns into an error rather
//! than a hung bench. To run the samod side alone with the full-size
//! workloads:
//!
//! ```text
//! cargo test --release -p bench samod -- --ignored --nocapture
//! ```

// The scenarios in `scenarios.rs` call these functions once they are wired
// in; until then only the tests below do.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use automerge::transaction::Transactable;
use automerge::{Automerge, ChangeHash, ROOT};
use futures::future::{try_join_all, BoxFuture};
use futures::{FutureExt, StreamExt};
use samod::{
    AcceptorHandle, BackoffConfig, DialError, Dialer, DialerHandle, DocHandle, DocumentId, PeerId,
    Repo, Transport, Url,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How many `find`s B keeps outstanding at once.
const FINDS_IN_FLIGHT: usize = 256;

/// The longest any single wait may take before the scenario gives up.
const WAIT_LIMIT: Duration = Duration::from_secs(600);

/// How long the reconnect connection must carry no bytes before its traffic
/// is considered finished.
const QUIET_FOR: Duration = Duration::from_millis(100);

/// The longest the reconnect scenario keeps counting bytes after B holds the
/// changes, if the connection never goes quiet.
const TAIL_LIMIT: Duration = Duration::from_secs(10);

/// Bulk transfer of `docs` documents of `commits_per_doc` small commits from
/// A to an empty B.
///
/// The clock starts when B's TCP connection to A is established and stops
/// when B holds every document with A's heads. B obtains the documents the
/// usual samod way: it issues `Repo::find` for every id, [`FINDS_IN_FLIGHT`]
/// at a time, as soon as the handshake completes (see [`Sites::connect_b`]); A, which announces
/// its documents by default, starts pushing them at the same moment.
/// Arrival is detected per document by awaiting `find`, then comparing B's
/// heads with A's and, while they differ, waiting on the handle's change
/// stream (subscribed before the comparison, so no change is missed).
pub(crate) fn bulk(docs: usize, commits_per_doc: usize) -> anyhow::Result<Duration> {
    run(async move {
        let sites = Sites::start().await?;
        let mut workload = Vec::with_capacity(docs);
        for _ in 0..docs {
            let mut doc = Automerge::new();
            for i in 0..commits_per_doc {
                doc.transact(|tx| tx.put(ROOT, format!("k{}", i % 10), i as i64))
                    .map_err(|failure| anyhow!("building a document: {:?}", failure.error))?;
            }
            workload.push(doc);
        }
        let at_a = sites.populate_a(workload).await?;

        let link = sites.connect_b().await?;
        receive_all(&sites.b, &at_a).await?;
        let done = Instant::now();
        let elapsed = done.saturating_duration_since(link.connected_at()?);

        link.dialer.close();
        sites.stop().await;
        Ok(elapsed)
    })
}

/// Commit-to-visible latency of single changes while A and B are connected.
///
/// A and B first hold `docs` identical documents. A then commits one change
/// every `interval`, round-robin over the documents, `changes` in total; each
/// sets the integer key `seq`. B listens to every document's
/// `DocHandle::changes()` stream and logs each event's new heads with the
/// `Instant` it arrived. Afterwards each change is matched by hash: it became
/// visible at the first event in its document whose heads are that change or
/// a later one (only A writes, so each document's history is a line). The
/// latency runs from just before A's `with_document` call, so A's local
/// commit is included, to that event.
pub(crate) fn live(
    docs: usize,
    changes: usize,
    interval: Duration,
) -> anyhow::Result<Vec<Duration>> {
    run(async move {
        anyhow::ensure!(docs > 0, "live needs at least one document");
        let sites = Sites::start().await?;
        let workload = (0..docs)
            .map(|_| one_commit_document())
            .collect::<anyhow::Result<_>>()?;
        let at_a = sites.populate_a(workload).await?;
        let link = sites.connect_b().await?;
        let at_b = receive_all(&sites.b, &at_a).await?;

        // B's view: (document index, new heads, when B saw them).
        type Seen = (usize, Vec<ChangeHash>, Instant);
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::new()));
        let streams = at_b.iter().enumerate().map(|(index, handle)| {
            handle
                .changes()
                .map(move |changed| (index, changed))
                .boxed()
        });
        let mut all_changes = futures::stream::select_all(streams);
        let log = seen.clone();
        let listener = tokio::spawn(async move {
            while let Some((index, changed)) = all_changes.next().await {
                let at = Instant::now();
                log.lock().expect("the change log is never poisoned").push((
                    index,
                    changed.new_heads,
                    at,
                ));
            }
        });

        // A's side: (document index, position in that document, hash, commit start).
        let handles_a = bounded("A to open its documents", find_all(&sites.a, &at_a)).await?;
        // One unmeasured round, a change per document, as on our side.
        let mut ticks = tokio::time::interval(interval);
        for (index, handle) in handles_a.iter().enumerate() {
            ticks.tick().await;
            commit_seq(handle, -1_000_000 - index as i64)?;
        }
        catch_up("B to receive the warm-up round", &handles_a, &at_b).await?;
        let mut commits: Vec<(usize, usize, ChangeHash, Instant)> = Vec::with_capacity(changes);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for seq in 0..changes {
            ticks.tick().await;
            let index = seq % docs;
            let started = Instant::now();
            let hash = commit_seq(&handles_a[index], seq as i64)?;
            commits.push((index, seq / docs, hash, started));
        }

        // Wait until B holds A's final state, then give the listener a moment
        // to drain events that were already sent.
        catch_up("B to receive every change", &handles_a, &at_b).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        listener.abort();

        let position: HashMap<ChangeHash, usize> = commits
            .iter()
            .map(|&(_, position, hash, _)| (hash, position))
            .collect();
        // For each document, when B first saw each position.
        let mut visible_at: Vec<Vec<Instant>> = vec![Vec::new(); docs];
        for (index, heads, at) in seen
            .lock()
            .expect("the change log is never poisoned")
            .iter()
        {
            let Some(reached) = heads.iter().filter_map(|hash| position.get(hash)).max() else {
                continue;
            };
            let times = &mut visible_at[*index];
            while times.len() <= *reached {
                times.push(*at);
            }
        }
        let latencies = commits
            .iter()
            .map(|&(index, position, hash, started)| {
                visible_at[index]
                    .get(position)
                    .map(|at| at.saturating_duration_since(started))
                    .ok_or_else(|| anyhow!("B never reported change {hash} as visible"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;

        link.dialer.close();
        sites.stop().await;
        Ok(latencies)
    })
}

/// Catching up after a disconnection.
///
/// A and B hold the same `docs` documents of `changes_per_doc` commits each.
/// B's connection is closed, A changes `changed` documents (one commit each),
/// and B dials again. The time runs from the new TCP connection until B
/// holds every changed document with A's heads (each awaited through the
/// handle's change stream, B keeping its handles open throughout). The bytes
/// are both directions of the new connection, counted from its first byte
/// until it has been quiet for [`QUIET_FOR`] after B holds the changes (at
/// most [`TAIL_LIMIT`] more), so the rest of samod's per-document
/// reconnection handshake is included.
pub(crate) fn reconnect(
    docs: usize,
    changes_per_doc: usize,
    changed: usize,
) -> anyhow::Result<(Duration, u64)> {
    let (elapsed, wire) = reconnect_each_way(docs, changes_per_doc, changed)?;
    Ok((elapsed, wire.b_to_a + wire.a_to_b))
}

/// Bytes of one connection in each direction.
struct Traffic {
    b_to_a: u64,
    a_to_b: u64,
}

/// [`reconnect`], with the bytes of the new connection split by direction.
fn reconnect_each_way(
    docs: usize,
    changes_per_doc: usize,
    changed: usize,
) -> anyhow::Result<(Duration, Traffic)> {
    run(async move {
        anyhow::ensure!(
            changed <= docs,
            "cannot change {changed} of {docs} documents"
        );
        let sites = Sites::start().await?;
        let mut workload = Vec::with_capacity(docs);
        for _ in 0..docs {
            let mut doc = Automerge::new();
            for i in 0..changes_per_doc {
                doc.transact(|tx| tx.put(ROOT, format!("k{}", i % 10), i as i64))
                    .map_err(|failure| anyhow!("building a document: {:?}", failure.error))?;
            }
            workload.push(doc);
        }
        let at_a = sites.populate_a(workload).await?;
        let first = sites.connect_b().await?;
        let at_b = receive_all(&sites.b, &at_a).await?;

        first.dialer.close();
        bounded("both sites to see the disconnection", async {
            while !sites.a.connected_peers().0.is_empty() || !sites.b.connected_peers().0.is_empty()
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(())
        })
        .await?;

        let handles_a = bounded(
            "A to open its documents",
            find_all(&sites.a, &at_a[..changed]),
        )
        .await?;
        let mut targets = Vec::with_capacity(changed);
        for (seq, handle) in handles_a.iter().enumerate() {
            commit_seq(handle, seq as i64)?;
            targets.push(heads_of(handle));
        }

        let second = sites.connect_b().await?;
        bounded(
            "B to receive the changes made while disconnected",
            try_join_all(
                at_b.iter()
                    .zip(targets)
                    .map(|(handle, heads)| wait_for_heads(handle, heads)),
            ),
        )
        .await?;
        let done = Instant::now();
        let elapsed = done.saturating_duration_since(second.connected_at()?);

        let tail_end = done + TAIL_LIMIT;
        let mut last = second.wire.total();
        let mut last_change = Instant::now();
        while Instant::now() < tail_end && last_change.elapsed() < QUIET_FOR {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let now = second.wire.total();
            if now != last {
                last = now;
                last_change = Instant::now();
            }
        }

        let traffic = Traffic {
            b_to_a: second.wire.sent.load(Ordering::Relaxed),
            a_to_b: second.wire.received.load(Ordering::Relaxed),
        };
        second.dialer.close();
        sites.stop().await;
        Ok((elapsed, traffic))
    })
}

/// Resident memory per idle document at B, in bytes.
///
/// A creates `docs` documents of a few small commits (about 400 bytes saved
/// each). B's baseline is this process's VmRSS after A is populated and B's
/// repo is loaded, before B connects. B then finds every document, drops its
/// handles (samod keeps the documents loaded regardless) and stays connected
/// and idle for a second. A lives in the same process but was populated
/// before the baseline; what A allocates for syncing with B (per-peer sync
/// state) is counted against B, which slightly favours archipelago. The
/// allocator is not trimmed: that would need `unsafe` (`malloc_trim`), which
/// the workspace forbids.
pub(crate) fn memory(docs: usize) -> anyhow::Result<f64> {
    run(async move {
        anyhow::ensure!(docs > 0, "memory needs at least one document");
        let sites = Sites::start().await?;
        let mut workload = Vec::with_capacity(docs);
        for n in 0..docs {
            let mut doc = Automerge::new();
            for i in 0..4_i64 {
                doc.transact(|tx| {
                    tx.put(ROOT, format!("k{i}"), i * 1_000 + n as i64)?;
                    tx.put(ROOT, "label", format!("document {n} revision {i}"))
                })
                .map_err(|failure| anyhow!("building a document: {:?}", failure.error))?;
            }
            workload.push(doc);
        }
        let at_a = sites.populate_a(workload).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let baseline = resident_bytes()?;

        let link = sites.connect_b().await?;
        let at_b = receive_all(&sites.b, &at_a).await?;
        drop(at_b);
        // As on archipelago's side: idle long enough for the allocator to
        // return freed pages (jemalloc's decay time is 10 s).
        tokio::time::sleep(Duration::from_secs(12)).await;
        let resident = resident_bytes()?;

        link.dialer.close();
        sites.stop().await;
        Ok((resident as f64 - baseline as f64) / docs as f64)
    })
}

/// Builds the runtime a scenario runs on, runs it, and shuts the runtime down
/// so no samod task outlives the scenario.
fn run<T>(scenario: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the samod runtime")?;
    let result = runtime.block_on(scenario);
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

/// Awaits `future`, or fails after [`WAIT_LIMIT`] naming what was awaited.
async fn bounded<T>(
    what: &str,
    future: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(WAIT_LIMIT, future).await {
        Ok(result) => result.with_context(|| format!("waiting for {what}")),
        Err(_) => bail!("gave up after {WAIT_LIMIT:?} waiting for {what}"),
    }
}

/// The two sites and A's listening socket.
struct Sites {
    a: Repo,
    b: Repo,
    address: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl Sites {
    async fn start() -> anyhow::Result<Self> {
        let a = Repo::build_tokio()
            .with_peer_id(PeerId::from("site-a"))
            .load()
            .await;
        let b = Repo::build_tokio()
            .with_peer_id(PeerId::from("site-b"))
            .load()
            .await;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding A's listener")?;
        let address = listener.local_addr()?;
        let url = Url::parse(&format!("tcp://{address}")).context("A's listener url")?;
        let acceptor = a
            .make_acceptor(url)
            .map_err(|_| anyhow!("site A stopped"))?;
        let accepting = tokio::spawn(accept_loop(listener, acceptor));
        Ok(Sites {
            a,
            b,
            address,
            accepting,
        })
    }

    /// Hands every document to A's repo, returning each id with its heads.
    async fn populate_a(
        &self,
        docs: Vec<Automerge>,
    ) -> anyhow::Result<Vec<(DocumentId, Vec<ChangeHash>)>> {
        let created = try_join_all(docs.into_iter().map(|doc| {
            let heads = doc.get_heads();
            self.a.create(doc).map(move |handle| {
                handle
                    .map(|handle| (handle.document_id().clone(), heads))
                    .map_err(|_| anyhow!("site A stopped"))
            })
        }));
        bounded("A to store its documents", created).await
    }

    /// Connects B to A and waits for samod's handshake.
    ///
    /// Finding documents before the handshake completes is racy in samod
    /// 0.16: a `find` issued while the dialer is connecting can resolve as
    /// unavailable in the instant between the handshake and the document
    /// learning about the new peer. So B only searches once connected.
    async fn connect_b(&self) -> anyhow::Result<Link> {
        let dialer = Arc::new(CountedDialer {
            address: self.address,
            wire: Arc::new(WireBytes::default()),
            connected_at: Arc::new(Mutex::new(None)),
        });
        let link_wire = dialer.wire.clone();
        let connected_at = dialer.connected_at.clone();
        let backoff = BackoffConfig {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
            max_retries: Some(5),
        };
        let dialer = self
            .b
            .dial(backoff, dialer)
            .map_err(|_| anyhow!("site B stopped"))?;
        bounded("B's handshake with A", async {
            dialer
                .established()
                .await
                .map_err(|failed| anyhow!("dialing A: {failed}"))
        })
        .await?;
        Ok(Link {
            dialer,
            wire: link_wire,
            connected_at,
        })
    }

    async fn stop(self) {
        self.accepting.abort();
        let stopping = futures::future::join(self.a.stop(), self.b.stop());
        let _ = tokio::time::timeout(Duration::from_secs(10), stopping).await;
    }
}

/// Accepts B's connections at A, with `TCP_NODELAY`, until aborted.
async fn accept_loop(listener: TcpListener, acceptor: AcceptorHandle) {
    while let Ok((stream, _)) = listener.accept().await {
        if stream.set_nodelay(true).is_err() {
            continue;
        }
        if acceptor.accept(Transport::from_tokio_io(stream)).is_err() {
            return;
        }
    }
}

/// One connection (and its retries) from B to A.
struct Link {
    dialer: DialerHandle,
    wire: Arc<WireBytes>,
    connected_at: Arc<Mutex<Option<Instant>>>,
}

impl Link {
    /// When the TCP connection was established.
    fn connected_at(&self) -> anyhow::Result<Instant> {
        self.connected_at
            .lock()
            .expect("the connection time is never poisoned")
            .ok_or_else(|| anyhow!("B never connected to A"))
    }
}

/// Dials A from B over TCP and counts the bytes of the connections it makes.
struct CountedDialer {
    address: SocketAddr,
    wire: Arc<WireBytes>,
    connected_at: Arc<Mutex<Option<Instant>>>,
}

impl Dialer for CountedDialer {
    type Error = Infallible;

    fn url(&self) -> Url {
        Url::parse(&format!("tcp://{}", self.address)).expect("a socket address forms a valid url")
    }

    fn connect(&self) -> BoxFuture<'static, Result<Transport, DialError<Infallible>>> {
        let address = self.address;
        let wire = self.wire.clone();
        let connected_at = self.connected_at.clone();
        async move {
            let stream = TcpStream::connect(address)
                .await
                .map_err(DialError::transient)?;
            let now = Instant::now();
            connected_at
                .lock()
                .expect("the connection time is never poisoned")
                .get_or_insert(now);
            stream.set_nodelay(true).map_err(DialError::transient)?;
            Ok(Transport::from_tokio_io(CountedStream {
                inner: stream,
                wire,
            }))
        }
        .boxed()
    }
}

/// Bytes carried by one connection, seen from the dialing side.
#[derive(Default)]
struct WireBytes {
    sent: AtomicU64,
    received: AtomicU64,
}

impl WireBytes {
    fn total(&self) -> u64 {
        self.sent.load(Ordering::Relaxed) + self.received.load(Ordering::Relaxed)
    }
}

/// A TCP stream that counts what passes through it into [`WireBytes`].
struct CountedStream {
    inner: TcpStream,
    wire: Arc<WireBytes>,
}

impl AsyncRead for CountedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = (buf.filled().len() - before) as u64;
            this.wire.received.fetch_add(read, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled {
            this.wire.sent.fetch_add(written as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = polled {
            this.wire.sent.fetch_add(written as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A document of one small commit.
fn one_commit_document() -> anyhow::Result<Automerge> {
    let mut doc = Automerge::new();
    doc.transact(|tx| tx.put(ROOT, "seq", -1_i64))
        .map_err(|failure| anyhow!("building a document: {:?}", failure.error))?;
    Ok(doc)
}

/// Commits `seq` under the key `seq` and returns the new change's hash.
fn commit_seq(handle: &DocHandle, seq: i64) -> anyhow::Result<ChangeHash> {
    handle
        .with_document(|doc| {
            doc.transact(|tx| tx.put(ROOT, "seq", seq))
                .map(|success| success.hash)
                .map_err(|failure| anyhow!("committing a change: {:?}", failure.error))
        })?
        .ok_or_else(|| anyhow!("a change that sets a key has a hash"))
}

/// Waits (bounded, named `what`) until each of B's documents has the heads
/// its counterpart at A has now.
async fn catch_up(what: &str, at_a: &[DocHandle], at_b: &[DocHandle]) -> anyhow::Result<()> {
    let heads: Vec<_> = at_a.iter().map(heads_of).collect();
    bounded(
        what,
        try_join_all(
            at_b.iter()
                .zip(heads)
                .map(|(handle, heads)| wait_for_heads(handle, heads)),
        ),
    )
    .await?;
    Ok(())
}

fn heads_of(handle: &DocHandle) -> Vec<ChangeHash> {
    handle.with_document(|doc| doc.get_heads())
}

/// Finds every document in `repo`, [`FINDS_IN_FLIGHT`] at a time, and waits
/// until each has the heads it has at A.
///
/// On timeout the error says how far B got, which tells a `find` that never
/// resolves from a document that never catches up.
async fn receive_all(
    repo: &Repo,
    docs: &[(DocumentId, Vec<ChangeHash>)],
) -> anyhow::Result<Vec<DocHandle>> {
    let found = AtomicU64::new(0);
    let complete = AtomicU64::new(0);
    let receiving = futures::stream::iter(docs.iter().map(|(id, heads)| {
        let (found, complete) = (&found, &complete);
        async move {
            let handle = repo
                .find(id.clone())
                .await
                .map_err(|_| anyhow!("repo stopped"))?
                .ok_or_else(|| anyhow!("document {id} is unavailable"))?;
            found.fetch_add(1, Ordering::Relaxed);
            wait_for_heads(&handle, heads.clone()).await?;
            complete.fetch_add(1, Ordering::Relaxed);
            Ok::<_, anyhow::Error>(handle)
        }
    }))
    .buffered(FINDS_IN_FLIGHT)
    .collect::<Vec<_>>()
    .map(|handles| handles.into_iter().collect::<anyhow::Result<Vec<_>>>());
    bounded("B to receive every document", receiving)
        .await
        .with_context(|| {
            format!(
                "{} of {} documents found, {} with A's heads",
                found.load(Ordering::Relaxed),
                docs.len(),
                complete.load(Ordering::Relaxed)
            )
        })
}

/// Waits until `handle`'s document has exactly `heads`.
async fn wait_for_heads(handle: &DocHandle, mut heads: Vec<ChangeHash>) -> anyhow::Result<()> {
    heads.sort();
    let mut changes = handle.changes();
    loop {
        let mut now = heads_of(handle);
        now.sort();
        if now == heads {
            return Ok(());
        }
        if changes.next().await.is_none() {
            bail!(
                "document {} closed before reaching its heads",
                handle.document_id()
            );
        }
    }
}

/// Handles for documents a repo already holds.
async fn find_all(
    repo: &Repo,
    docs: &[(DocumentId, Vec<ChangeHash>)],
) -> anyhow::Result<Vec<DocHandle>> {
    try_join_all(docs.iter().map(|(id, _)| async move {
        repo.find(id.clone())
            .await
            .map_err(|_| anyhow!("repo stopped"))?
            .ok_or_else(|| anyhow!("document {id} is missing"))
    }))
    .await
}

/// This process's resident set size, from `/proc/self/status`.
fn resident_bytes() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS line in /proc/self/status"))?;
    let kilobytes: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .context("parsing VmRSS")?;
    Ok(kilobytes * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_delivers_every_document() {
        let elapsed = bulk(5, 3).unwrap();
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    }

    #[test]
    fn live_reports_one_latency_per_change() {
        let latencies = live(3, 5, Duration::from_millis(10)).unwrap();
        assert_eq!(latencies.len(), 5);
        assert!(latencies
            .iter()
            .all(|latency| *latency < Duration::from_secs(5)));
    }

    #[test]
    fn reconnect_counts_the_new_connection() {
        let (elapsed, bytes) = reconnect(20, 3, 2).unwrap();
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
        assert!(bytes > 0);
    }

    #[test]
    fn memory_is_measured() {
        let per_doc = memory(50).unwrap();
        assert!(per_doc.is_finite());
    }

    /// The full-size samod figures, printed. Run with
    /// `cargo test --release -p bench samod -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn samod_full_size_figures() {
        let elapsed = bulk(1_000, 100).unwrap();
        println!("bulk 1000 docs x 100 commits: {elapsed:?}");

        let mut latencies = live(100, 1_000, Duration::from_millis(10)).unwrap();
        latencies.sort();
        let percentile = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
        println!(
            "live 100 docs, 1000 changes every 10 ms: p50 {:?} p99 {:?}",
            percentile(50),
            percentile(99)
        );

        // samod slows down sharply with the number of documents on a
        // connection: 10,000 documents may not sync within WAIT_LIMIT, in
        // which case the figure is reported as skipped.
        for docs in [2_000, 10_000] {
            let started = Instant::now();
            match reconnect_each_way(docs, 20, 10) {
                Ok((elapsed, wire)) => println!(
                    "reconnect {docs} docs x 20 changes, 10 changed: {elapsed:?}, \
                     {} bytes B to A, {} bytes A to B (scenario took {:?})",
                    wire.b_to_a,
                    wire.a_to_b,
                    started.elapsed()
                ),
                Err(error) => println!("reconnect {docs} docs skipped: {error:#}"),
            }
        }

        for docs in [2_000, 10_000] {
            match memory(docs) {
                Ok(per_doc) => {
                    println!("memory {docs} idle docs at B: {per_doc:.0} bytes per document")
                }
                Err(error) => println!("memory {docs} docs skipped: {error:#}"),
            }
        }
    }
}
