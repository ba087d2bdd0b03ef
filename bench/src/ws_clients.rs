//! `ws_clients`: automerge-repo clients of a site, each figure measured in
//! one run:
//!
//! - `rss_bytes_per_client`: N clients (1,000; 200 with `--quick`), each
//!   syncing 10 documents of its own, connect to a server and sync; once
//!   all are idle, the growth of the server process's resident memory over
//!   its baseline (documents created, no client), per client. The server
//!   is a child process (this binary run again), so clients cost it nothing.
//! - beside samod 0.16 (a repo in memory behind its axum WebSocket
//!   acceptor, holding the same documents): the same measurement for both
//!   servers with `samod_clients` clients, `samod_rss_bytes_per_client`
//!   and `rss_ratio_vs_samod`. samod connects every connection to every
//!   document it holds, so it cannot be brought to 1,000 idle clients of 10
//!   documents in any time a run can wait (see `SAMOD_CLIENTS`), and its
//!   cost per client grows with all the documents it holds.
//! - `client_to_client_p50_ms`: two nodes in this process over QUIC on
//!   127.0.0.1; a client at A changes a document and a client at B sees the
//!   change; taking turns with a change committed at A's replica and seen
//!   by B's replica's subscription (`live_p50_ms`, the `live` path of this
//!   run), so `client_to_client_ratio_vs_live` compares them side by side;
//!   and with a commit at B's node seen by the client at B
//!   (`node_to_client_p50_ms`).
//!
//! The clients are this module's own: a WebSocket (tokio-tungstenite), the
//! protocol's messages (`archipelago::clients::wire`) and an automerge
//! document and sync state per document, as `@automerge/automerge-repo`
//! keeps them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use archipelago::automerge::sync::{self, SyncDoc};
use archipelago::automerge::transaction::Transactable;
use archipelago::automerge::{Automerge, ReadDoc, ROOT};
use archipelago::clients::wire::{Message, PROTOCOL_V1};
use archipelago::clients::RepoId;
use archipelago::DocId;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message as Ws;

use crate::scenarios::metrics;
use crate::versus::percentile;

/// Documents each client syncs.
const DOCS_PER_CLIENT: usize = 10;
/// Clients connecting at once.
const CONNECTING_MAX: usize = 20;
/// How long a server is left idle before its memory is read: the node
/// drops documents unused for a second, checking every five, and the
/// threads that served the sync leave after ten idle seconds.
const SETTLE: Duration = Duration::from_secs(12);
/// Longest any part may take.
const PART_TIME_MAX: Duration = Duration::from_secs(300);
/// Clients of the samod comparison. samod's hub connects every connection
/// to every document it holds and revisits all those pairs on each event,
/// so its time to bring N clients of 10 documents each to idle grows far
/// faster than N² (measured here: 40 clients 6 s, 80 clients 229 s); 40 is
/// the most a benchmark run can wait for.
const SAMOD_CLIENTS: usize = 40;
/// Longest a change may take to reach a client.
const CHANGE_TIME_MAX: Duration = Duration::from_secs(10);
/// The environment variable that makes this binary a server child.
pub(crate) const SERVER_ENV: &str = "ARCHIPELAGO_BENCH_WS_SERVER";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `ws_clients` with the sizes of `quick` or full mode.
pub(crate) fn ws_clients(quick: bool) -> anyhow::Result<Map<String, Value>> {
    let clients = if quick { 200 } else { 1_000 };
    let changes = if quick { 100 } else { 300 };
    let mut out = Map::new();
    let ours = rss_per_client("archipelago", clients)?;
    eprintln!(
        "  {clients} idle clients x {DOCS_PER_CLIENT} documents: node RSS growth per client {ours:.0} B (target <= 65,536)"
    );
    // samod beside it, at the scale it reaches: its server connects every
    // connection to every document it holds, so its cost per client grows
    // with all documents (see SAMOD_CLIENTS).
    let ours_small = rss_per_client("archipelago", SAMOD_CLIENTS)?;
    let samod = rss_per_client("samod", SAMOD_CLIENTS)?;
    let pairs = (SAMOD_CLIENTS * SAMOD_CLIENTS * DOCS_PER_CLIENT) as f64;
    eprintln!(
        "  {SAMOD_CLIENTS} idle clients x {DOCS_PER_CLIENT} documents: RSS growth per client: archipelago {ours_small:.0} B, samod {samod:.0} B ({:.0} B per client and document it holds); ratio {:.3} (target <= 0.5)",
        samod * SAMOD_CLIENTS as f64 / pairs,
        ours_small / samod
    );
    out.extend(metrics(&[
        ("clients", json!(clients)),
        ("docs_per_client", json!(DOCS_PER_CLIENT)),
        ("rss_bytes_per_client", json!(ours.round())),
        ("samod_clients", json!(SAMOD_CLIENTS)),
        (
            "rss_bytes_per_client_at_samod_clients",
            json!(ours_small.round()),
        ),
        ("samod_rss_bytes_per_client", json!(samod.round())),
        ("rss_ratio_vs_samod", json!(ours_small / samod)),
    ]));
    out.extend(crate::versus::runtime()?.block_on(client_to_client(changes))?);
    Ok(out)
}

/// The server side, run as a child: `kind` (`archipelago` or `samod`) with
/// `docs` documents; prints `ready WS_URL` and, for samod, one document URL
/// a line, then serves until stdin closes.
pub(crate) fn serve_child(kind: &str, docs: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // A thread of its own, so that nothing waits for it on an error.
        let (closed_tx, stdin_closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).unwrap_or(0) > 0 {}
            let _ = closed_tx.send(());
        });
        match kind {
            "archipelago" => {
                let dir = tempfile::tempdir()?;
                let path = sync_node::init::init(&sync_node::init::InitOptions::new(
                    "bench".parse()?,
                    dir.path(),
                ))?;
                // Idle documents leave memory after a second (30 by
                // default), so the measurement sees idle clients sooner.
                let config = std::fs::read_to_string(&path)?;
                let config = if config.contains("[store]\n") {
                    config.replacen("[store]\n", "[store]\ncache_idle_s = 1\n", 1)
                } else {
                    format!("{config}\n[store]\ncache_idle_s = 1\n")
                };
                std::fs::write(&path, config)?;
                let node = sync_node::Node::start(&sync_node::config::Config::load(&path)?).await?;
                let ops: Vec<archipelago::doc::Op> =
                    serde_json::from_value(json!([{"op": "set", "path": "/n", "value": 1}]))?;
                for d in 0..docs {
                    node.replica()
                        .apply_ops(&doc_name(d).parse()?, &ops, None)?;
                }
                println!(
                    "ready {}/v1/automerge-repo?token={}",
                    node.url().replacen("http://", "ws://", 1),
                    node.token()
                );
                let _ = stdin_closed.await;
                node.shutdown().await?;
            }
            "samod" => {
                // As a sync server: it answers what clients ask for and
                // announces nothing (archipelago's side announces nothing
                // to clients either).
                let repo = samod::Repo::build_tokio()
                    .with_share_policy(samod::ShareConfig::read_write().with_announce(false))
                    .load()
                    .await;
                let mut urls = Vec::with_capacity(docs);
                for _ in 0..docs {
                    let mut doc = Automerge::new();
                    doc.transact::<_, _, archipelago::automerge::AutomergeError>(|tx| {
                        tx.put(ROOT, "n", 1)?;
                        Ok(())
                    })
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let handle = repo
                        .create(doc)
                        .await
                        .map_err(|_| anyhow::anyhow!("samod stopped"))?;
                    urls.push(handle.url().to_string());
                }
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                let acceptor = repo
                    .make_acceptor(format!("ws://{addr}/").parse()?)
                    .map_err(|_| anyhow::anyhow!("samod stopped"))?;
                let app = axum::Router::new().route(
                    "/",
                    axum::routing::get(move |ws: axum::extract::WebSocketUpgrade| {
                        let acceptor = acceptor.clone();
                        async move {
                            ws.on_upgrade(move |socket| async move {
                                // samod drives the connection from here on.
                                let _ = acceptor.accept_axum(socket, None);
                            })
                        }
                    }),
                );
                let server = tokio::spawn(async move { axum::serve(listener, app).await });
                println!("ready ws://{addr}/");
                for url in urls {
                    println!("{url}");
                }
                let _ = stdin_closed.await;
                server.abort();
                repo.stop().await;
            }
            other => anyhow::bail!("unknown server kind {other}"),
        }
        anyhow::Ok(())
    })
}

fn doc_name(d: usize) -> String {
    format!("bench/ws-{d}")
}

/// A server child and what it printed.
struct ServerChild {
    child: Child,
    ws: String,
    urls: Vec<String>,
}

impl ServerChild {
    fn start(kind: &str, docs: usize) -> anyhow::Result<ServerChild> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(SERVER_ENV, format!("{kind} {docs}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the server child")?;
        let stdout = child.stdout.take().context("no stdout")?;
        // Read on a thread of its own, so a child that never gets ready
        // fails the part instead of hanging it.
        let (line_tx, line_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if line_tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut lines = std::iter::from_fn(|| line_rx.recv_timeout(PART_TIME_MAX).ok());
        let first = match lines.next() {
            Some(line) => line?,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("the {kind} server child never said it was ready");
            }
        };
        let ws = first
            .strip_prefix("ready ")
            .with_context(|| format!("unexpected first line {first:?}"))?
            .to_owned();
        let urls = if kind == "samod" {
            (0..docs)
                .map(|_| {
                    lines
                        .next()
                        .context("too few urls")?
                        .map_err(anyhow::Error::from)
                })
                .collect::<anyhow::Result<Vec<String>>>()?
        } else {
            (0..docs)
                .map(|d| Ok(RepoId::derived(&doc_name(d).parse::<DocId>()?).url()))
                .collect::<anyhow::Result<Vec<String>>>()?
        };
        Ok(ServerChild { child, ws, urls })
    }

    fn rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS")?;
        let kb: u64 = line.split_whitespace().nth(1).unwrap_or("0").parse()?;
        Ok(kb * 1024)
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory growth of a `kind` server per idle client.
fn rss_per_client(kind: &str, clients: usize) -> anyhow::Result<f64> {
    let server = ServerChild::start(kind, clients * DOCS_PER_CLIENT)?;
    std::thread::sleep(SETTLE);
    let baseline = server.rss()?;
    let runtime = crate::versus::runtime()?;
    let (grown, connected) = runtime.block_on(async {
        let mut idle = Vec::with_capacity(clients);
        let started = Instant::now();
        for batch in (0..clients).collect::<Vec<_>>().chunks(CONNECTING_MAX) {
            let mut joining = Vec::new();
            for &c in batch {
                let urls = server.urls[c * DOCS_PER_CLIENT..(c + 1) * DOCS_PER_CLIENT].to_vec();
                let ws = server.ws.clone();
                joining.push(tokio::spawn(async move {
                    let mut client = Client::connect(&ws, c, &urls).await?;
                    client.sync_all().await?;
                    anyhow::Ok(client)
                }));
            }
            for (joined, c) in joining.into_iter().zip(batch) {
                let client = joined
                    .await?
                    .with_context(|| format!("{kind}: client {c}"))?;
                // An idle client still reads what the server sends (and
                // answers its pings), as a real one does.
                idle.push(tokio::spawn(client.idle()));
            }
            anyhow::ensure!(
                started.elapsed() < PART_TIME_MAX,
                "clients took too long to sync"
            );
            if idle.len() % 200 == 0 {
                eprintln!(
                    "    {kind}: {} clients synced after {:?}",
                    idle.len(),
                    started.elapsed()
                );
            }
        }
        // Idle: let the server settle (and drop what it keeps only briefly).
        tokio::time::sleep(SETTLE).await;
        let grown = server.rss()?.saturating_sub(baseline);
        let connected = idle.iter().filter(|c| !c.is_finished()).count();
        for client in idle {
            client.abort();
        }
        anyhow::Ok((grown, connected))
    })?;
    anyhow::ensure!(
        connected == clients,
        "only {connected} of {clients} clients synced"
    );
    Ok(grown as f64 / clients as f64)
}

/// One automerge-repo client: a WebSocket and, per document, an automerge
/// document and a sync state.
struct Client {
    id: String,
    /// The server's peer id.
    server: String,
    socket: Socket,
    docs: HashMap<String, (Automerge, sync::State)>,
}

impl Client {
    async fn connect(ws: &str, number: usize, urls: &[String]) -> anyhow::Result<Client> {
        let (mut socket, _) = tokio::time::timeout(
            PART_TIME_MAX,
            tokio_tungstenite::connect_async_with_config(ws, None, true),
        )
        .await
        .context("connecting timed out")??;
        let id = format!("bench-client-{number}");
        let join = Message::Join {
            sender_id: id.clone(),
            supported_protocol_versions: vec![PROTOCOL_V1.to_owned()],
            metadata: Some(archipelago::clients::wire::PeerMetadata {
                storage_id: None,
                is_ephemeral: true,
            }),
        };
        socket.send(Ws::binary(join.encode())).await?;
        let mut client = Client {
            id,
            server: String::new(),
            socket,
            docs: HashMap::new(),
        };
        match client.next().await? {
            Message::Peer { sender_id, .. } => client.server = sender_id,
            other => anyhow::bail!("expected peer, got {other:?}"),
        }
        for url in urls {
            let id = RepoId::from_url(url)
                .with_context(|| format!("bad url {url}"))?
                .to_string();
            client
                .docs
                .insert(id, (Automerge::new(), sync::State::new()));
        }
        Ok(client)
    }

    async fn next(&mut self) -> anyhow::Result<Message> {
        loop {
            let received = tokio::time::timeout(PART_TIME_MAX, self.socket.next())
                .await
                .context("the server went quiet")?;
            match received {
                Some(Ok(Ws::Binary(bytes))) => return Ok(Message::decode(&bytes)?),
                Some(Ok(Ws::Close(_))) | None => anyhow::bail!("the server closed"),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(_)) => {}
            }
        }
    }

    /// Sends what the sync state of `doc` has to say, if anything.
    async fn offer(&mut self, doc: &str) -> anyhow::Result<bool> {
        let (am, state) = self.docs.get_mut(doc).context("unknown document")?;
        let empty = am.get_heads().is_empty();
        let Some(message) = am.generate_sync_message(state) else {
            return Ok(false);
        };
        let (sender_id, target_id) = (self.id.clone(), self.server.clone());
        let (document_id, data) = (doc.to_owned(), message.encode());
        let message = if empty {
            Message::Request {
                sender_id,
                target_id,
                document_id,
                data,
            }
        } else {
            Message::Sync {
                sender_id,
                target_id,
                document_id,
                data,
            }
        };
        self.socket.send(Ws::binary(message.encode())).await?;
        Ok(true)
    }

    /// Takes one message; returns the document it was about, if any.
    fn take(&mut self, message: Message) -> anyhow::Result<Option<String>> {
        match message {
            Message::Sync {
                document_id, data, ..
            } => {
                let (am, state) = self
                    .docs
                    .get_mut(&document_id)
                    .context("a sync message about an unknown document")?;
                am.receive_sync_message(state, sync::Message::decode(&data)?)?;
                Ok(Some(document_id))
            }
            Message::DocUnavailable { document_id, .. } => {
                anyhow::bail!("{document_id} is unavailable")
            }
            Message::Error { message } => anyhow::bail!("the server said: {message}"),
            _ => Ok(None),
        }
    }

    /// Syncs every document until each holds the server's content.
    async fn sync_all(&mut self) -> anyhow::Result<()> {
        let docs: Vec<String> = self.docs.keys().cloned().collect();
        for doc in &docs {
            self.offer(doc).await?;
        }
        let started = Instant::now();
        let mut retry = Duration::from_secs(2);
        while self.docs.values().any(|(am, _)| am.get_heads().is_empty()) {
            anyhow::ensure!(
                started.elapsed() < PART_TIME_MAX,
                "the server never sent every document"
            );
            // A request the server dropped (samod can, right after its
            // handshake) is asked again, as a client retries.
            match tokio::time::timeout(retry, self.next()).await {
                Ok(message) => {
                    if let Some(doc) = self.take(message?)? {
                        self.offer(&doc).await?;
                    }
                }
                Err(_) => {
                    retry *= 2;
                    let lacking: Vec<String> = self
                        .docs
                        .iter()
                        .filter(|(_, (am, _))| am.get_heads().is_empty())
                        .map(|(doc, _)| doc.clone())
                        .collect();
                    for doc in lacking {
                        if let Some((_, state)) = self.docs.get_mut(&doc) {
                            *state = sync::State::new();
                        }
                        self.offer(&doc).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads until the server closes, answering sync messages.
    async fn idle(mut self) {
        while let Some(Ok(received)) = self.socket.next().await {
            if let Ws::Binary(bytes) = received {
                if let Ok(Some(doc)) = Message::decode(&bytes)
                    .map_err(anyhow::Error::from)
                    .and_then(|m| self.take(m))
                {
                    if self.offer(&doc).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// Two nodes over QUIC; turns between a change by a client at A seen by a
/// client at B, and a change committed at A's replica seen by B's replica.
async fn client_to_client(changes: usize) -> anyhow::Result<Map<String, Value>> {
    let root = tempfile::tempdir()?;
    let ca = root.path().join("ca");
    sync_node::ca::init_ca(&ca, true)?;
    let start = |name: &str, peer: String| {
        let mut options = sync_node::init::InitOptions::new(
            name.parse().expect("a site name"),
            root.path().join(name),
        );
        options.ca_dir = Some(ca.clone());
        options.peers = vec![peer
            .parse()
            .map_err(|e: String| anyhow::anyhow!(e))
            .expect("a peer")];
        options
    };
    // site-a dials site-b.
    let b_options = start("site-b", "site-a=127.0.0.1:9".to_owned());
    let b = sync_node::Node::start(&sync_node::config::Config::load(&sync_node::init::init(
        &b_options,
    )?)?)
    .await?;
    let b_sync = b.sync_addr().context("site-b has no sync endpoint")?;
    let a_options = start("site-a", format!("site-b={b_sync}"));
    let a = sync_node::Node::start(&sync_node::config::Config::load(&sync_node::init::init(
        &a_options,
    )?)?)
    .await?;

    let doc: DocId = "bench/c2c".parse()?;
    let node_doc: DocId = "bench/n2n".parse()?;
    let ops: Vec<archipelago::doc::Op> =
        serde_json::from_value(json!([{"op": "set", "path": "/start", "value": 0}]))?;
    a.replica().apply_ops(&doc, &ops, None)?;
    a.replica().apply_ops(&node_doc, &ops, None)?;
    let started = Instant::now();
    while b.replica().heads(&doc) != a.replica().heads(&doc)
        || b.replica().heads(&node_doc) != a.replica().heads(&node_doc)
    {
        anyhow::ensure!(
            started.elapsed() < PART_TIME_MAX,
            "the sites did not connect"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let url = RepoId::derived(&doc).url();
    let ws = |node: &sync_node::Node| {
        format!(
            "{}/v1/automerge-repo?token={}",
            node.url().replacen("http://", "ws://", 1),
            node.token()
        )
    };
    let mut writer = Client::connect(&ws(&a), 0, std::slice::from_ref(&url)).await?;
    writer.sync_all().await?;
    let mut reader = Client::connect(&ws(&b), 1, std::slice::from_ref(&url)).await?;
    reader.sync_all().await?;
    let key = RepoId::derived(&doc).to_string();

    // B's reader runs on a task of its own and stamps each new value it
    // sees: `i` written by the client at A, `n` committed at B's node.
    let (seen_tx, mut seen_rx) =
        tokio::sync::mpsc::unbounded_channel::<anyhow::Result<(&'static str, i64, Instant)>>();
    let reading = tokio::spawn(async move {
        let mut last = [-1, -1];
        let stopped = async {
            loop {
                let message = reader.next().await?;
                let Some(doc) = reader.take(message)? else {
                    continue;
                };
                for (key, last) in ["i", "n"].into_iter().zip(&mut last) {
                    let value = reader.docs[&doc]
                        .0
                        .get(ROOT, key)?
                        .and_then(|(v, _)| v.as_scalar().and_then(|s| s.as_i64()));
                    if let Some(value) = value.filter(|v| *v > *last) {
                        *last = value;
                        let _ = seen_tx.send(Ok((key, value, Instant::now())));
                    }
                }
                reader.offer(&doc).await?;
            }
        };
        let stopped: anyhow::Result<()> = stopped.await;
        if let Err(e) = stopped {
            let _ = seen_tx.send(Err(e.context("the client at B stopped")));
        }
    });
    // Waits until B's reader has seen `key` at `value`.
    let mut seen = async |key: &str, value: i64| -> anyhow::Result<Instant> {
        loop {
            let (k, v, at) = tokio::time::timeout(CHANGE_TIME_MAX, seen_rx.recv())
                .await
                .with_context(|| format!("the client at B never saw {key} = {value}"))?
                .context("the reader stopped")??;
            if k == key && v == value {
                return Ok(at);
            }
        }
    };
    // A's writer, on a task of its own too: it makes each change it is
    // told to and answers the node throughout, as a client does (a sync
    // round can take more than one message, as when a bloom filter errs).
    let (put, mut puts) = tokio::sync::mpsc::unbounded_channel::<i64>();
    let writing = tokio::spawn(async move {
        loop {
            tokio::select! {
                i = puts.recv() => {
                    let Some(i) = i else {
                        writer.close().await;
                        return anyhow::Ok(());
                    };
                    let (am, _) = writer
                        .docs
                        .get_mut(&key)
                        .context("the writer lost its document")?;
                    am.transact::<_, _, archipelago::automerge::AutomergeError>(|tx| {
                        tx.put(ROOT, "i", i)?;
                        Ok(())
                    })
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    writer.offer(&key).await?;
                }
                message = writer.next() => {
                    if let Some(doc) = writer.take(message?)? {
                        writer.offer(&doc).await?;
                    }
                }
            }
        }
    });
    let mut feed = b.replica().subscribe();
    let (mut c2c, mut n2n, mut n2c) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..changes as i64 {
        // A client's change at A, seen by the client at B.
        let sent = Instant::now();
        put.send(i).context("the client at A stopped")?;
        c2c.push(seen("i", i).await? - sent);
        tokio::time::sleep(Duration::from_millis(5)).await;
        // A commit at A's replica, seen by B's replica.
        let ops: Vec<archipelago::doc::Op> =
            serde_json::from_value(json!([{"op": "set", "path": "/i", "value": i}]))?;
        let committed = Instant::now();
        let commit = a.replica().apply_ops(&node_doc, &ops, None)?;
        let hash = commit.change.context("no change")?;
        loop {
            let event = tokio::time::timeout(PART_TIME_MAX, feed.recv()).await??;
            if event.hashes.contains(&hash) {
                n2n.push(committed.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        // A commit at B's node (as the HTTP API makes it), seen by the
        // client at B; timed from before the commit, its fsync included.
        let ops: Vec<archipelago::doc::Op> =
            serde_json::from_value(json!([{"op": "set", "path": "/n", "value": i}]))?;
        let committed = Instant::now();
        b.replica().apply_ops(&doc, &ops, None)?;
        n2c.push(seen("n", i).await? - committed);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reading.abort();
    drop(put);
    writing.await??;
    a.shutdown().await?;
    b.shutdown().await?;
    c2c.sort();
    n2n.sort();
    n2c.sort();
    let (n2c_p50, n2c_p99) = (percentile(&n2c, 0.5), percentile(&n2c, 0.99));
    eprintln!(
        "  commit at B's node to the client at B: p50 {n2c_p50:.3} ms, p99 {n2c_p99:.3} ms (target p50 <= 5)"
    );
    let (c2c_p50, c2c_p99) = (percentile(&c2c, 0.5), percentile(&c2c, 0.99));
    let (live_p50, live_p99) = (percentile(&n2n, 0.5), percentile(&n2n, 0.99));
    eprintln!(
        "  client at A to client at B over QUIC ({changes} changes, taking turns with replica to replica): p50 {c2c_p50:.3} ms, p99 {c2c_p99:.3} ms; live (replica to replica) p50 {live_p50:.3} ms, p99 {live_p99:.3} ms; ratio {:.3} (target <= 2)",
        c2c_p50 / live_p50
    );
    Ok(metrics(&[
        ("changes", json!(changes)),
        ("client_to_client_p50_ms", json!(c2c_p50)),
        ("client_to_client_p99_ms", json!(c2c_p99)),
        ("live_p50_ms", json!(live_p50)),
        ("live_p99_ms", json!(live_p99)),
        ("client_to_client_ratio_vs_live", json!(c2c_p50 / live_p50)),
        ("node_to_client_p50_ms", json!(n2c_p50)),
        ("node_to_client_p99_ms", json!(n2c_p99)),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_client_to_client_run_measures_every_metric() {
        let out = crate::versus::runtime()
            .unwrap()
            .block_on(client_to_client(3))
            .unwrap();
        for key in [
            "client_to_client_p50_ms",
            "live_p50_ms",
            "node_to_client_p50_ms",
            "client_to_client_ratio_vs_live",
        ] {
            let value = out[key].as_f64().unwrap();
            assert!(value.is_finite() && value > 0.0, "{key} = {value}");
        }
    }
}
