//! A running node: opens the store and the replica, serves the HTTP API,
//! and shuts down gracefully — in-flight requests finish, then the store is
//! closed so every acknowledged commit is on disk.
//!
//! [`Node`] is what `sync-node run` drives, and what tests and benchmarks
//! start in-process.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use archipelago::store::{Sqlite, Store};
use archipelago::{Replica, ReplicaOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState, ApiToken};
use crate::config::{Config, ConfigError};
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
    /// The bound address could not be written to `api.addr`.
    #[error("cannot write {}: {source}", path.display())]
    AddrFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
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

/// A node serving its HTTP API. Dropping it without [`Node::shutdown`]
/// still stops the server gracefully, in the background.
#[derive(Debug)]
pub struct Node {
    addr: SocketAddr,
    token: ApiToken,
    replica: Replica,
    store: Arc<Sqlite>,
    addr_file: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl Node {
    /// Opens the store named by `config`, binds the API address, writes the
    /// bound address to `api.addr` next to the config, and starts serving.
    pub async fn start(config: &Config) -> Result<Node, NodeError> {
        let token = config.read_token()?;
        warn_if_readable_by_others(&config.token_path());
        let store_path = config.store_path();
        let mut options = ReplicaOptions::new(config.file.site.clone());
        options.cache_docs_max = config.file.store.cache_docs_max;
        let path = store_path.clone();
        let (store, replica) = tokio::task::spawn_blocking(move || {
            let store = Arc::new(Sqlite::open(&path).map_err(|e| Box::new(e.into()))?);
            let replica =
                Replica::open(options, store.clone() as Arc<dyn Store>).map_err(Box::new)?;
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
        let addr_file = config.api_addr_path();
        let contents = format!("{addr}\n");
        let file = addr_file.clone();
        tokio::task::spawn_blocking(move || write_atomically(&file, contents.as_bytes(), false))
            .await?
            .map_err(|source| NodeError::AddrFile {
                path: addr_file.clone(),
                source,
            })?;

        let app = api::router(ApiState::new(replica.clone(), token.clone()));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // A dropped sender (the Node was dropped) also stops.
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!(site = %config.file.site, %addr, store = %store.path().display(), "node started");
        Ok(Node {
            addr,
            token,
            replica,
            store,
            addr_file,
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

    /// Stops accepting connections, waits for in-flight requests (at most
    /// [`SHUTDOWN_TIMEOUT`]), then closes the store.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
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
        // Requests still running hold replica clones; closing the store makes
        // their commits fail instead of leaving them unfinished.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.close()).await?;
        if std::fs::read_to_string(&self.addr_file).is_ok_and(|a| a.trim() == self.addr.to_string())
        {
            let _ = std::fs::remove_file(&self.addr_file);
        }
        tracing::info!("node stopped");
        result
    }
}
