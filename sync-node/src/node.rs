//! A running node: opens the store and the replica, syncs with its peer
//! sites over QUIC when the config names a site identity, serves the HTTP
//! API and its event stream, and shuts down gracefully — event streams end,
//! in-flight requests finish, sessions with peers close, then the store is
//! closed so every acknowledged commit is on disk.
//!
//! [`Node`] is what `sync-node run` drives, and what tests, benchmarks and
//! the demo start in-process.
//!
//! # Several sites in one process
//!
//! Each site needs its own directory, written by [`crate::init::init`] with
//! a `ca_dir` (from [`crate::ca::init_ca`]) so that it gets a site identity,
//! and the other sites as peers. With `sync_listen` on port 0 a node's sync
//! port is known only once it runs ([`Node::sync_addr`], also written to
//! `sync.addr`); since a site dials only the peers whose names sort after
//! its own, start the sites from the highest name down: the address a site
//! lists for a lower-named peer is never dialed, so any placeholder (such
//! as `127.0.0.1:9`) does.
//!
//! ```
//! use sync_node::config::Config;
//! use sync_node::init::{init, InitOptions};
//! use sync_node::Node;
//!
//! # #[tokio::main(flavor = "multi_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let temp = tempfile::tempdir()?;
//! let ca_dir = temp.path().join("ca");
//! sync_node::ca::init_ca(&ca_dir, false)?;
//! let start = |site: &str, peer: String| {
//!     let mut options = InitOptions::new(site.parse().unwrap(), temp.path().join(site));
//!     options.ca_dir = Some(ca_dir.clone());
//!     options.peers = vec![peer.parse().unwrap()];
//!     let path = init(&options);
//!     async move { Node::start(&Config::load(path?)?).await.map_err(Box::<dyn std::error::Error>::from) }
//! };
//! // us-east sorts after eu-west: it only accepts, so it starts first.
//! let us_east = start("us-east", "eu-west=127.0.0.1:9".to_owned()).await?;
//! let east_addr = us_east.sync_addr().expect("the node has an identity");
//! let eu_west = start("eu-west", format!("us-east={east_addr}")).await?;
//!
//! let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
//! while !eu_west.peers().iter().all(|peer| peer.status.connected) {
//!     assert!(tokio::time::Instant::now() < deadline, "the sites never connected");
//!     tokio::time::sleep(std::time::Duration::from_millis(50)).await;
//! }
//! eu_west.shutdown().await?;
//! us_east.shutdown().await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use archipelago::store::{Sqlite, Store};
use archipelago::strong::StrongTier;
use archipelago::transport::quic::{SyncEndpoint, TransportError};
use archipelago::{Replica, ReplicaOptions, SiteName};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState, ApiToken, Backups};
use crate::config::{Config, ConfigError, PeerAddr, SyncConfig};
use crate::events::{spawn_feed, EventLog, PeerView, SyncPeers};
use crate::init::write_atomically;

/// How long shutdown waits for in-flight requests before closing the store
/// anyway.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a node could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration or token file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store or replica could not be opened.
    #[error("cannot open the store {}: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: Box<archipelago::Error>,
    },
    /// The API address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A peer's address could not be resolved.
    #[error("cannot resolve the address {addr} of peer {site}: {source}")]
    ResolvePeer {
        /// The peer site.
        site: SiteName,
        /// Its configured address.
        addr: PeerAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The sync endpoint could not start.
    #[error("cannot start the sync endpoint on {addr}: {source}")]
    Sync {
        /// The address it was to listen on.
        addr: SocketAddr,
        /// Why.
        source: TransportError,
    },
    /// A bound address could not be written to `api.addr` or `sync.addr`.
    #[error("cannot write {}: {source}", path.display())]
    AddrFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The strong tier could not start.
    #[error("cannot start the strong tier: {0}")]
    Strong(archipelago::strong::StrongError),
    /// The HTTP server failed.
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    /// A background task failed.
    #[error("a node task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Replaces an unspecified IP (listen on all interfaces) by loopback.
pub(crate) fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// Warns when the token file can be read by other users than its owner.
fn warn_if_readable_by_others(path: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(metadata) = std::fs::metadata(path) {
            let mode = metadata.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the API token file is readable by other users; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Resolves every configured peer address (a DNS name resolves to its first
/// address, once, at start).
async fn resolve_peers(config: &Config) -> Result<Vec<(SiteName, SocketAddr)>, NodeError> {
    let mut peers = Vec::with_capacity(config.file.peers.len());
    for peer in &config.file.peers {
        let error = |source| NodeError::ResolvePeer {
            site: peer.site.clone(),
            addr: peer.addr.clone(),
            source,
        };
        let addr = tokio::net::lookup_host(peer.addr.as_str())
            .await
            .map_err(error)?
            .next()
            .ok_or_else(|| error(std::io::Error::other("it resolves to no address")))?;
        peers.push((peer.site.clone(), addr));
    }
    Ok(peers)
}

/// Starts the sync endpoint when the config names a site identity.
async fn start_sync(config: &Config, replica: &Replica) -> Result<Option<SyncPeers>, NodeError> {
    let Some(identity) = config.load_sync_identity()? else {
        if config.file.peers.is_empty() {
            tracing::info!("no site identity configured: sync is off, the node runs alone");
        } else {
            tracing::warn!(
                peers = config.file.peers.len(),
                "peers are listed but no site identity ([sync] cert, key, ca_cert) is configured: sync is off"
            );
        }
        return Ok(None);
    };
    let listen = match &config.file.sync {
        Some(SyncConfig { listen, .. }) => *listen,
        None => unreachable!("an identity is only loaded from a [sync] table"),
    };
    let peers = resolve_peers(config).await?;
    let sync_error = |source| NodeError::Sync {
        addr: listen,
        source,
    };
    let scopes = config
        .file
        .peers
        .iter()
        .map(|peer| (peer.site.clone(), peer.scope()))
        .collect();
    let endpoint = SyncEndpoint::bind_scoped(
        listen,
        identity.identity,
        &identity.ca_cert,
        peers,
        scopes,
        replica.clone(),
    )
    .map_err(sync_error)?;
    Ok(Some(SyncPeers::new(endpoint).map_err(sync_error)?))
}

/// Starts the strong tier over the sync endpoint's connections (with no
/// endpoint, a tier of this site alone: any other voter is unreachable).
async fn start_strong(
    config: &Config,
    strong: archipelago::strong::StrongConfig,
    replica: &Replica,
    store: Arc<dyn Store>,
    sync: Option<&SyncPeers>,
) -> Result<StrongTier, NodeError> {
    let rpc = sync
        .and_then(SyncPeers::rpc)
        .unwrap_or_else(|| archipelago::strong::MemoryNet::new().rpc(config.file.site.clone()));
    let tier = StrongTier::start(
        config.file.site.clone(),
        strong,
        replica.clone(),
        store,
        rpc,
    )
    .await
    .map_err(NodeError::Strong)?;
    if let Some(sync) = sync {
        sync.set_rpc_handler(tier.handler());
    }
    tracing::info!(site = %config.file.site, "strong tier started");
    Ok(tier)
}

/// Writes `addr` to `path`, replacing it atomically.
async fn write_addr_file(path: &std::path::Path, addr: SocketAddr) -> Result<(), NodeError> {
    let contents = format!("{addr}\n");
    let file = path.to_path_buf();
    tokio::task::spawn_blocking(move || write_atomically(&file, contents.as_bytes(), false))
        .await?
        .map_err(|source| NodeError::AddrFile {
            path: path.to_path_buf(),
            source,
        })
}

/// Removes an address file if it still holds `addr` (another node may have
/// started in the same directory since).
fn remove_addr_file(path: &std::path::Path, addr: SocketAddr) {
    if std::fs::read_to_string(path).is_ok_and(|a| a.trim() == addr.to_string()) {
        let _ = std::fs::remove_file(path);
    }
}

/// A node serving its HTTP API and, with a site identity, syncing with its
/// peers. Dropping it without [`Node::shutdown`] still stops the server
/// gracefully, in the background, and the sync endpoint without waiting.
#[derive(Debug)]
pub struct Node {
    addr: SocketAddr,
    token: ApiToken,
    replica: Replica,
    store: Arc<Sqlite>,
    addr_file: PathBuf,
    sync: Option<Arc<SyncPeers>>,
    sync_addr_file: PathBuf,
    events: Arc<EventLog>,
    feed: Option<JoinHandle<()>>,
    evictor: Option<JoinHandle<()>>,
    sagas: Option<JoinHandle<()>>,
    scheduled: Option<JoinHandle<()>>,
    strong: Option<StrongTier>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl Node {
    /// Opens the store named by `config`, binds the API address and, when
    /// the config names a site identity, the sync endpoint (with the
    /// configured peers); writes the bound addresses to `api.addr` and
    /// `sync.addr` next to the config, and starts serving.
    pub async fn start(config: &Config) -> Result<Node, NodeError> {
        let token = config.read_token()?;
        warn_if_readable_by_others(&config.token_path());
        let store_path = config.store_path();
        let mut options = ReplicaOptions::new(config.file.site.clone());
        options.cache_docs_max = config.file.store.cache_docs_max;
        options.cache_idle = std::time::Duration::from_secs(config.file.store.cache_idle_s);
        options.conflicts = Arc::new(config.conflict_config()?);
        options.txn_hold = config.file.txn.hold_limits();
        options.escrow = Arc::new(config.escrow_config());
        // A received transaction waits only for members some peer may
        // write here: the others never arrive.
        if !config.file.peers.is_empty() {
            let scopes: Vec<archipelago::protocol::Scope> =
                config.file.peers.iter().map(|p| p.scope()).collect();
            options.replicates = Arc::new(move |doc| scopes.iter().any(|s| s.may_receive(doc)));
        }
        let strong_config = config.file.strong.as_ref().map(|s| s.tier_config());
        if let Some(strong) = &strong_config {
            let covers = strong.clone();
            options.strong = Arc::new(move |doc| covers.covers(doc));
        }
        let rules = options.conflicts.rules.len();
        let path = store_path.clone();
        let (store, replica) = tokio::task::spawn_blocking(move || {
            let store = Arc::new(Sqlite::open(&path).map_err(|e| Box::new(e.into()))?);
            let replica =
                Replica::open(options, store.clone() as Arc<dyn Store>).map_err(Box::new)?;
            // Reports this site resolves automatically may have arrived just
            // before a crash, with their resolution not yet written.
            let resolved = replica.resolve_pending().map_err(Box::new)?;
            if resolved > 0 {
                tracing::info!(
                    resolved,
                    "resolved the conflicts left pending at the last stop"
                );
            } else {
                tracing::debug!("no conflicts were left pending at the last stop");
            }
            Ok::<_, Box<archipelago::Error>>((store, replica))
        })
        .await?
        .map_err(|source| NodeError::Open {
            path: store_path,
            source,
        })?;

        let listen = config.file.api.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| NodeError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| NodeError::Bind {
            addr: listen,
            source,
        })?;
        let sync = start_sync(config, &replica).await?.map(Arc::new);
        let strong = match strong_config {
            Some(strong_config) => Some(
                start_strong(
                    config,
                    strong_config,
                    &replica,
                    store.clone() as Arc<dyn Store>,
                    sync.as_deref(),
                )
                .await?,
            ),
            None => None,
        };
        let addr_file = config.api_addr_path();
        write_addr_file(&addr_file, addr).await?;
        let sync_addr_file = config.sync_addr_path();
        if let Some(sync) = &sync {
            write_addr_file(&sync_addr_file, sync.local_addr()).await?;
        }

        let events = Arc::new(EventLog::default());
        let backups = Arc::new(Backups::new(
            store.clone(),
            config.file.site.clone(),
            config.data_dir(),
        ));
        let scheduled = match (&config.file.backup, config.backup_dir()) {
            (Some(backup), Some(dir)) => Some(spawn_backups(
                backups.clone(),
                dir,
                std::time::Duration::from_secs(backup.interval_secs),
                backup.keep,
            )),
            _ => None,
        };
        let mut state = ApiState::new(replica.clone(), token.clone())
            .with_events(events.clone())
            .with_backups(backups)
            .with_cors(config.cors_origins()?)
            .with_clients(&config.file.clients)
            .with_sagas(
                &config.file.sagas,
                config.file.peers.iter().map(|p| p.site.clone()).collect(),
            );
        if let Some(sync) = &sync {
            state = state.with_sync(sync.clone());
        }
        if let Some(strong) = &strong {
            state = state.with_strong(strong.clone());
        }
        // The router installs the metrics recorder the feed records into.
        let app = api::router(state);
        let feed = spawn_feed(&replica, sync.clone(), events.clone());
        let evictor = spawn_evictor(&replica);
        let sagas = crate::sagas::spawn_sagas(
            &replica,
            config.file.sagas.clone(),
            events.clone(),
            sync.clone(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        // Small messages answered at once (WebSocket clients above all):
        // none waits for Nagle's algorithm.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set on an API connection");
            }
        });
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // A dropped sender (the Node was dropped) also stops.
                    let _ = stopped.await;
                })
                .await
        });
        let sync_addr = sync
            .as_ref()
            .map_or_else(|| "off".to_owned(), |sync| sync.local_addr().to_string());
        tracing::info!(
            site = %config.file.site,
            api = %addr,
            sync = %sync_addr,
            peers = config.file.peers.len(),
            rules,
            store = %store.path().display(),
            "node started"
        );
        Ok(Node {
            addr,
            token,
            replica,
            store,
            addr_file,
            sync,
            sync_addr_file,
            events,
            feed: Some(feed),
            evictor: Some(evictor),
            sagas: Some(sagas),
            scheduled,
            strong,
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// The address the API is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API's base URL, such as `http://127.0.0.1:7070` (loopback when
    /// the node listens on all interfaces).
    pub fn url(&self) -> String {
        format!("http://{}", reachable(self.addr))
    }

    /// The bearer token clients must present.
    pub fn token(&self) -> &str {
        self.token.as_str()
    }

    /// The replica the node serves.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The address the sync endpoint is bound to, or `None` when sync is
    /// off (the config names no site identity).
    pub fn sync_addr(&self) -> Option<SocketAddr> {
        self.sync.as_ref().map(|sync| sync.local_addr())
    }

    /// The listed peers as `/v1/status` reports them, sorted by site;
    /// empty when sync is off.
    pub fn peers(&self) -> Vec<PeerView> {
        self.sync
            .as_ref()
            .map_or_else(Vec::new, |sync| sync.status())
    }

    /// The node's event log, as streamed by `/v1/events`.
    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    /// Serves until `signal` completes (or the server fails), then shuts
    /// down gracefully.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<(), NodeError> {
        let Some(server) = self.server.as_mut() else {
            return self.shutdown().await;
        };
        tokio::select! {
            () = signal => {
                tracing::info!("shutting down: finishing in-flight requests");
                self.shutdown().await
            }
            result = server => {
                self.server = None;
                let served = result?.map_err(NodeError::Serve);
                let closed = self.shutdown().await;
                served.and(closed)
            }
        }
    }

    /// Ends the event streams, stops accepting connections, waits for
    /// in-flight requests (at most [`SHUTDOWN_TIMEOUT`]), closes the
    /// sessions with peers, then closes the store.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        // Event streams never end by themselves; the server's graceful
        // shutdown would wait for them.
        self.events.close();
        if let Some(stop) = self.stop.take() {
            // The server may already have stopped on its own.
            let _ = stop.send(());
        }
        let mut result = Ok(());
        if let Some(server) = self.server.take() {
            match tokio::time::timeout(SHUTDOWN_TIMEOUT, server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => result = Err(NodeError::Serve(error)),
                Ok(Err(error)) => result = Err(NodeError::Task(error)),
                Err(_) => tracing::warn!(
                    "in-flight requests did not finish within {SHUTDOWN_TIMEOUT:?}; closing the store anyway"
                ),
            }
        }
        for task in [
            self.feed.take(),
            self.evictor.take(),
            self.sagas.take(),
            self.scheduled.take(),
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
            let _ = task.await;
        }
        if let Some(strong) = self.strong.take() {
            strong.shutdown().await;
        }
        if let Some(sync) = self.sync.take() {
            if let Some(endpoint) = sync.take() {
                endpoint.shutdown().await;
            }
            remove_addr_file(&self.sync_addr_file, sync.local_addr());
        }
        // Requests still running hold replica clones; closing the store makes
        // their commits fail instead of leaving them unfinished.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.close()).await?;
        remove_addr_file(&self.addr_file, self.addr);
        tracing::info!("node stopped");
        result
    }
}

/// Every few seconds, drops documents idle longer than the cache's idle
/// time back to their stored bytes.
fn spawn_evictor(replica: &Replica) -> JoinHandle<()> {
    let replica = replica.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVICT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let replica = replica.clone();
            if let Ok(dropped) = tokio::task::spawn_blocking(move || replica.evict_idle()).await {
                if dropped > 0 {
                    tracing::debug!(dropped, "idle documents dropped from the cache");
                }
            }
        }
    })
}

/// Every `interval`, a backup into `dir`, keeping the newest `keep`; the
/// first when the newest there is one interval old (see
/// [`Backups::first_scheduled_in`]).
fn spawn_backups(
    backups: Arc<Backups>,
    dir: PathBuf,
    interval: std::time::Duration,
    keep: usize,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let first = backups.first_scheduled_in(&dir, interval);
        tracing::info!(dir = %dir.display(), first_in_secs = first.as_secs(), "scheduled backups");
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = backups.save_scheduled(dir.clone(), keep).await {
                tracing::error!(%error, dir = %dir.display(), "scheduled backup failed");
            }
        }
    })
}

/// How often idle documents are dropped from the cache.
const EVICT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for Node {
    fn drop(&mut self) {
        // Without `shutdown`: end the event streams and the feed, and drop
        // the sync endpoint, which stops its tasks without waiting.
        self.events.close();
        for task in [
            self.feed.take(),
            self.evictor.take(),
            self.sagas.take(),
            self.scheduled.take(),
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
        }
        if let Some(sync) = self.sync.take() {
            drop(sync.take());
        }
    }
}
