//! The QUIC driver around the sans-IO [`Session`]: a [`SyncEndpoint`]
//! listens on one UDP socket, accepts the sites on its peer list (mutual
//! TLS through [`tls`]), dials the listed sites whose names
//! sort after its own (so each pair of sites has one connection, opened by
//! the lower name), and reconnects with capped, jittered exponential
//! backoff after any failure.
//!
//! Each connection carries two bidirectional streams opened by the dialer:
//! the first is the control lane, the second the live lane. The dialer
//! writes one tag byte at the start of each (so the acceptor learns of a
//! stream before the lane has anything to say, and can check which is
//! which); after that, both directions of both streams carry the session's
//! length-prefixed frames. Frames are split per stream, never through one
//! shared decoder, because the two streams' bytes interleave arbitrarily.
//!
//! `Replica` calls wait for the disk, so each connection's session runs on
//! a blocking thread fed by one bounded queue of inputs: frames from the two
//! stream readers (bounded in bytes too), the replica's commits, and timer
//! ticks. The session's frames go to one bounded queue per lane, each
//! drained by a writer task. Back-pressure therefore reaches the peer
//! through QUIC flow control, and the session's own windows bound the
//! unacknowledged bytes on each lane.
//!
//! A peer counts as connected only once the session accepted its `Hello`
//! (with TLS 1.3 the dialer's handshake completes before the server has
//! checked the dialer's certificate). If the replica's commit feed lags
//! (the session could not keep up with local commits), the session closes
//! and the reconnection reconciles whatever it missed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{RecvStream, SendStream, VarInt};
use rand::Rng as _;
use tokio::sync::{broadcast, mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use super::tls::{self, CertificateDer, SiteIdentity, TlsError};
use crate::id::SiteName;
use crate::protocol::wire::{close_code, FRAME_BYTES_MAX};
use crate::protocol::{Event, Lane, Scope, Session, SessionConfig};
use crate::replica::{Committed, Replica};

/// Receive window of one stream and of a whole connection: large enough to
/// keep a high-latency, high-bandwidth link full.
pub const RECEIVE_WINDOW_BYTES: u32 = 16 << 20;
/// Interval of QUIC keep-alive packets, well under the idle timeout.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A connection that hears nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for the QUIC handshake and for the dialer's streams to appear.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// First delay before reconnecting to a peer.
pub const RECONNECT_DELAY_INITIAL: Duration = Duration::from_millis(100);
/// Longest delay before reconnecting to a peer.
pub const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(10);
/// Received frame bytes queued for a session before the readers stop
/// reading (and QUIC flow control stops the peer).
pub const INPUT_QUEUE_BYTES_MAX: usize = 32 << 20;
/// Inputs (frames, commits, ticks) queued for a session.
pub const INPUT_QUEUE_DEPTH: usize = 1024;
/// Frames queued per lane for its writer.
pub const LANE_QUEUE_DEPTH: usize = 64;
/// Incoming connections in their handshake at once; more are refused.
pub const HANDSHAKES_IN_PROGRESS_MAX: usize = 16;
/// Time allowed to flush the last frames after a session ended.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Interval of the timer ticks that drive the session's deadlines.
const TICK_INTERVAL: Duration = Duration::from_millis(250);
/// Tag byte the dialer writes first on the control stream.
pub const STREAM_TAG_CONTROL: u8 = 0xC0;
/// Tag byte the dialer writes first on the live stream.
pub const STREAM_TAG_LIVE: u8 = 0x11;

/// QUIC application close codes.
pub mod connection_close {
    /// The session ended normally.
    pub const NORMAL: u32 = 0;
    /// The peer broke the stream layout or framing.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The peer's identity is not acceptable.
    pub const IDENTITY: u32 = 3;
    /// A newer connection from the same peer replaced this one.
    pub const REPLACED: u32 = 5;
    /// The endpoint is shutting down.
    pub const SHUTDOWN: u32 = 6;
}

/// Why the transport could not start, or why one connection ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The UDP socket could not be bound or used.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS configuration could not be built.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The TLS configuration does not suit QUIC.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Crypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// A connection could not be started.
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// A connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The peer broke the stream layout, the framing or its identity.
    #[error("peer misbehaved: {0}")]
    Peer(String),
    /// Something took longer than allowed.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The peer list names this site, or one site twice.
    #[error("invalid peer list: {0}")]
    PeerList(String),
    /// The endpoint is shutting down.
    #[error("the endpoint is shutting down")]
    Shutdown,
}

/// A QUIC transport configuration for long, lossy links: BBR congestion
/// control, [`RECEIVE_WINDOW_BYTES`] stream and connection receive windows,
/// keep-alive every [`KEEP_ALIVE_INTERVAL`], idle timeout [`IDLE_TIMEOUT`],
/// and at most two peer-opened bidirectional streams for the two lanes
/// plus [`super::rpc::RPCS_IN_PROGRESS_MAX`] for RPCs.
pub fn transport_config() -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    config
        .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        .stream_receive_window(VarInt::from_u32(RECEIVE_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW_BYTES))
        .send_window(u64::from(RECEIVE_WINDOW_BYTES) * 2)
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(
            VarInt::from_u32(IDLE_TIMEOUT.as_millis() as u32).into(),
        ))
        .max_concurrent_bidi_streams(VarInt::from_u32(
            2 + super::rpc::RPCS_IN_PROGRESS_MAX as u32,
        ))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None)
        // No path MTU discovery: packets stay at the 1200 bytes every path
        // carries. Discovery sends a dozen padded probes per connection
        // (about 11 KB, twice what a reconnect between identical sites
        // otherwise costs), to gain about 3% of header overhead in bulk.
        .mtu_discovery_config(None);
    config
}

/// What [`SyncEndpoint::peer_status`] reports about one listed peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer site.
    pub site: SiteName,
    /// Where it is dialed (or expected to dial from).
    pub addr: SocketAddr,
    /// True while a session with it is open (after its `Hello`).
    pub connected: bool,
    /// When a frame from it was last received.
    pub last_seen: Option<SystemTime>,
    /// Live bytes queued or unacknowledged towards it.
    pub pending_out: usize,
    /// Received bytes waiting for the session to process them.
    pub pending_in: usize,
    /// What crossed the link with this peer since the endpoint started.
    pub traffic: Traffic,
}

/// Totals of what crossed the link with one peer, over every session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Frame bytes sent.
    pub bytes_out: u64,
    /// Frame bytes received.
    pub bytes_in: u64,
    /// Changes sent (live and catch-up).
    pub changes_out: u64,
    /// New changes received and applied.
    pub changes_in: u64,
    /// Change batches (and whole documents) sent.
    pub batches_out: u64,
    /// Change batches (and whole documents) received.
    pub batches_in: u64,
}

impl Traffic {
    fn of(stats: &crate::protocol::SessionStats) -> Traffic {
        Traffic {
            bytes_out: stats.bytes_sent,
            bytes_in: stats.bytes_received,
            changes_out: stats.changes_sent,
            changes_in: stats.changes_applied,
            batches_out: stats.batches_sent,
            batches_in: stats.batches_received,
        }
    }

    fn plus(self, other: Traffic) -> Traffic {
        Traffic {
            bytes_out: self.bytes_out + other.bytes_out,
            bytes_in: self.bytes_in + other.bytes_in,
            changes_out: self.changes_out + other.changes_out,
            changes_in: self.changes_in + other.changes_in,
            batches_out: self.batches_out + other.batches_out,
            batches_in: self.batches_in + other.batches_in,
        }
    }
}

/// The state of one listed peer.
#[derive(Debug)]
struct PeerEntry {
    addr: SocketAddr,
    connected: bool,
    last_seen: Option<SystemTime>,
    pending_out: usize,
    /// Traffic of finished sessions, and of the current one.
    traffic_done: Traffic,
    traffic_current: Traffic,
    /// The connection currently serving this peer, by id.
    active: Option<ActiveConnection>,
}

#[derive(Debug)]
struct ActiveConnection {
    id: u64,
    connection: quinn::Connection,
    input_bytes: Arc<Semaphore>,
}

/// What every task of an endpoint shares.
struct Shared {
    local: SiteName,
    replica: Replica,
    /// What each peer may receive and write; absent means everything.
    scopes: BTreeMap<SiteName, Scope>,
    peers: Mutex<BTreeMap<SiteName, PeerEntry>>,
    next_connection: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// What answers the RPCs peers open (set once the strong tier starts).
    rpc_handler: super::rpc::HandlerSlot,
}

impl Shared {
    fn peers(&self) -> MutexGuard<'_, BTreeMap<SiteName, PeerEntry>> {
        // A panic while holding the lock leaves plain status fields behind,
        // which stay meaningful.
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn track(&self, task: JoinHandle<()>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// Runs `f` on the peer's entry if `connection` still serves it.
    fn update(&self, peer: &SiteName, connection: u64, f: impl FnOnce(&mut PeerEntry)) {
        let mut peers = self.peers();
        if let Some(entry) = peers.get_mut(peer) {
            if entry.active.as_ref().is_some_and(|a| a.id == connection) {
                f(entry);
            }
        }
    }
}

/// A site's sync endpoint: one UDP socket, connections to every listed peer.
///
/// Must be created inside a tokio runtime. Dropping it without
/// [`SyncEndpoint::shutdown`] stops its tasks too, without waiting.
pub struct SyncEndpoint {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for SyncEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncEndpoint")
            .field("local", &self.shared.local)
            .field("addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl SyncEndpoint {
    /// Binds `addr` and starts accepting the listed `peers` and dialing
    /// those whose site name sorts after `identity`'s. Every peer must
    /// present a certificate chaining to `ca_cert`.
    pub fn bind(
        addr: SocketAddr,
        identity: SiteIdentity,
        ca_cert: &CertificateDer<'static>,
        peers: Vec<(SiteName, SocketAddr)>,
        replica: Replica,
    ) -> Result<SyncEndpoint, TransportError> {
        SyncEndpoint::bind_scoped(addr, identity, ca_cert, peers, BTreeMap::new(), replica)
    }

    /// Like [`SyncEndpoint::bind`], with a replication scope per peer (what
    /// it may receive from this site and write to it); a peer without an
    /// entry replicates everything.
    pub fn bind_scoped(
        addr: SocketAddr,
        identity: SiteIdentity,
        ca_cert: &CertificateDer<'static>,
        peers: Vec<(SiteName, SocketAddr)>,
        scopes: BTreeMap<SiteName, Scope>,
        replica: Replica,
    ) -> Result<SyncEndpoint, TransportError> {
        let local = identity.site().clone();
        let mut entries = BTreeMap::new();
        for (site, peer_addr) in &peers {
            if *site == local {
                return Err(TransportError::PeerList(format!("{site} is this site")));
            }
            let entry = PeerEntry {
                addr: *peer_addr,
                connected: false,
                last_seen: None,
                pending_out: 0,
                traffic_done: Traffic::default(),
                traffic_current: Traffic::default(),
                active: None,
            };
            if entries.insert(site.clone(), entry).is_some() {
                return Err(TransportError::PeerList(format!("{site} is listed twice")));
            }
        }
        let transport = Arc::new(transport_config());

        // Only peers that sort before us dial us: one connection per pair.
        let dialers: Vec<SiteName> = entries.keys().filter(|s| **s < local).cloned().collect();
        let server_tls =
            tls::server_config(&identity, ca_cert, move |peer| dialers.contains(peer))?;
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
        server.transport_config(transport.clone());

        let mut clients = Vec::new();
        for (site, peer_addr) in &peers {
            if *site > local {
                let client_tls = tls::client_config(&identity, ca_cert, site)?;
                let mut client =
                    quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
                client.transport_config(transport.clone());
                clients.push((site.clone(), *peer_addr, client));
            }
        }

        let endpoint = quinn::Endpoint::server(server, addr)?;
        let shared = Arc::new(Shared {
            local,
            replica,
            scopes,
            peers: Mutex::new(entries),
            next_connection: AtomicU64::new(1),
            tasks: Mutex::new(Vec::new()),
            rpc_handler: Arc::default(),
        });
        let (shutdown, _) = watch::channel(false);

        let accept = tokio::spawn(accept_loop(
            shared.clone(),
            endpoint.clone(),
            shutdown.subscribe(),
        ));
        shared.track(accept);
        for (site, peer_addr, client) in clients {
            let task = tokio::spawn(dial_loop(
                shared.clone(),
                endpoint.clone(),
                site,
                peer_addr,
                client,
                shutdown.subscribe(),
            ));
            shared.track(task);
        }
        Ok(SyncEndpoint {
            endpoint,
            shared,
            shutdown,
        })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Answers the RPCs peers open from now on with `handler`.
    pub fn set_rpc_handler(&self, handler: Arc<dyn crate::strong::RpcHandler>) {
        *self
            .shared
            .rpc_handler
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(handler);
    }

    /// Calls peers over their connections (a stream per call); a peer not
    /// connected now is unreachable.
    pub fn rpc(&self) -> Arc<dyn crate::strong::Rpc> {
        let shared = Arc::downgrade(&self.shared);
        Arc::new(super::rpc::QuicRpc {
            connections: Arc::new(move |peer: &SiteName| {
                let shared = shared.upgrade()?;
                let peers = shared.peers();
                let entry = peers.get(peer)?;
                entry
                    .active
                    .as_ref()
                    .filter(|_| entry.connected)
                    .map(|a| a.connection.clone())
            }),
        })
    }

    /// This site.
    pub fn site(&self) -> &SiteName {
        &self.shared.local
    }

    /// The state of every listed peer, sorted by site.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        self.shared
            .peers()
            .iter()
            .map(|(site, entry)| PeerStatus {
                site: site.clone(),
                addr: entry.addr,
                connected: entry.connected,
                last_seen: entry.last_seen,
                pending_out: entry.pending_out,
                pending_in: entry.active.as_ref().map_or(0, |a| {
                    INPUT_QUEUE_BYTES_MAX.saturating_sub(a.input_bytes.available_permits())
                }),
                traffic: entry.traffic_done.plus(entry.traffic_current),
            })
            .collect()
    }

    /// Closes every session with a `Close` message, flushes it, closes the
    /// connections and the socket, and waits (bounded) for every task.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let tasks: Vec<JoinHandle<()>> = {
            let mut tasks = self.shared.tasks.lock().unwrap_or_else(|e| e.into_inner());
            tasks.drain(..).collect()
        };
        let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT + Duration::from_secs(2);
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
        self.endpoint.close(
            VarInt::from_u32(connection_close::SHUTDOWN),
            b"shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

impl Drop for SyncEndpoint {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Resolves once shutdown was requested (or the endpoint is gone).
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn accept_loop(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    mut shutdown: watch::Receiver<bool>,
) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_IN_PROGRESS_MAX));
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = shutdown_requested(&mut shutdown) => return,
        };
        let Some(incoming) = incoming else { return };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "too many handshakes, refusing");
            incoming.refuse();
            continue;
        };
        let task_shared = shared.clone();
        let task_shutdown = shutdown.clone();
        let task = tokio::spawn(async move {
            let remote = incoming.remote_address();
            match accept_one(task_shared, incoming, permit, task_shutdown).await {
                Ok(connected) => tracing::debug!(%remote, connected, "accepted connection ended"),
                // Includes every refusal: a certificate from another CA, a
                // site not on the peer list, no certificate at all.
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "incoming connection refused or failed")
                }
            }
        });
        shared.track(task);
    }
}

/// Completes an incoming connection's handshake, identifies the peer,
/// accepts its two streams and drives the session.
async fn accept_one(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut shutdown: watch::Receiver<bool>,
) -> Result<bool, TransportError> {
    let setup = async {
        let connection = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming)
            .await
            .map_err(|_| TransportError::Timeout("QUIC handshake"))??;
        let peer = match peer_site(&connection) {
            Ok(peer) if peer < shared.local && shared.peers().contains_key(&peer) => peer,
            Ok(peer) => {
                connection.close(
                    VarInt::from_u32(connection_close::IDENTITY),
                    b"not a dialing peer",
                );
                return Err(TransportError::Peer(format!(
                    "{peer} may not dial this site"
                )));
            }
            Err(e) => {
                connection.close(
                    VarInt::from_u32(connection_close::IDENTITY),
                    b"bad identity",
                );
                return Err(e);
            }
        };
        let streams = async {
            let control = accept_lane(&connection, STREAM_TAG_CONTROL).await?;
            let live = accept_lane(&connection, STREAM_TAG_LIVE).await?;
            Ok::<_, TransportError>((control, live))
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, streams).await {
            Ok(Ok((control, live))) => Ok((connection, peer, control, live)),
            Ok(Err(e)) => {
                connection.close(
                    VarInt::from_u32(connection_close::PROTOCOL_ERROR),
                    b"bad streams",
                );
                Err(e)
            }
            Err(_) => {
                connection.close(
                    VarInt::from_u32(connection_close::PROTOCOL_ERROR),
                    b"no streams",
                );
                Err(TransportError::Timeout("the dialer's streams"))
            }
        }
    };
    let (connection, peer, control, live) = tokio::select! {
        setup = setup => setup?,
        () = shutdown_requested(&mut shutdown) => return Err(TransportError::Shutdown),
    };
    drop(permit);
    drive_connection(shared, connection, peer, control, live, shutdown).await
}

/// The site named by the client certificate of an accepted connection.
fn peer_site(connection: &quinn::Connection) -> Result<SiteName, TransportError> {
    let identity = connection
        .peer_identity()
        .ok_or_else(|| TransportError::Peer("no client certificate".to_owned()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TransportError::Peer("unexpected peer identity type".to_owned()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| TransportError::Peer("empty certificate chain".to_owned()))?;
    Ok(tls::site_name_of(leaf)?)
}

/// Accepts the dialer's next stream and checks its tag byte.
async fn accept_lane(
    connection: &quinn::Connection,
    tag: u8,
) -> Result<(SendStream, RecvStream), TransportError> {
    let (send, mut recv) = connection.accept_bi().await?;
    let mut got = [0u8; 1];
    recv.read_exact(&mut got).await?;
    if got[0] != tag {
        return Err(TransportError::Peer(format!(
            "stream tag {:#04x}, expected {tag:#04x}",
            got[0]
        )));
    }
    Ok((send, recv))
}

/// Opens a stream and writes its tag byte.
async fn open_lane(
    connection: &quinn::Connection,
    tag: u8,
) -> Result<(SendStream, RecvStream), TransportError> {
    let (mut send, recv) = connection.open_bi().await?;
    send.write_all(&[tag]).await?;
    Ok((send, recv))
}

/// Keeps one connection to `peer` alive: dial, drive, back off, repeat.
async fn dial_loop(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    peer: SiteName,
    addr: SocketAddr,
    client: quinn::ClientConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut delay = RECONNECT_DELAY_INITIAL;
    // A peer that is down fails every attempt: the first failure of a run
    // is logged, the retries only at debug level.
    let mut failed = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let outcome = dial_once(&shared, &endpoint, &peer, addr, &client, shutdown.clone()).await;
        match &outcome {
            Ok(true) if *shutdown.borrow() => return,
            Ok(true) => {
                tracing::info!(%peer, "session ended, reconnecting");
                delay = RECONNECT_DELAY_INITIAL;
            }
            Ok(false) if failed => tracing::debug!(%peer, "session ended before the handshake"),
            Ok(false) => tracing::info!(%peer, "session ended before the handshake; retrying"),
            Err(TransportError::Shutdown) => return,
            Err(e) if failed => tracing::debug!(%peer, error = %e, "connection failed"),
            Err(e) => tracing::info!(
                %peer,
                error = %e,
                "connection failed; retrying (further failures are logged at debug level)"
            ),
        }
        failed = !matches!(outcome, Ok(true));
        let jittered = delay.mul_f64(rand::rng().random_range(0.8..1.2));
        tokio::select! {
            () = tokio::time::sleep(jittered) => {}
            () = shutdown_requested(&mut shutdown) => return,
        }
        delay = (delay * 2).min(RECONNECT_DELAY_MAX);
    }
}

/// One connection attempt; true when the session got past the handshake.
async fn dial_once(
    shared: &Arc<Shared>,
    endpoint: &quinn::Endpoint,
    peer: &SiteName,
    addr: SocketAddr,
    client: &quinn::ClientConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<bool, TransportError> {
    let setup = async {
        let connecting = endpoint.connect_with(client.clone(), addr, peer.as_str())?;
        let connection = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .map_err(|_| TransportError::Timeout("QUIC handshake"))??;
        let control = open_lane(&connection, STREAM_TAG_CONTROL).await?;
        let live = open_lane(&connection, STREAM_TAG_LIVE).await?;
        Ok::<_, TransportError>((connection, control, live))
    };
    let (connection, control, live) = tokio::select! {
        setup = setup => setup?,
        () = shutdown_requested(&mut shutdown) => return Err(TransportError::Shutdown),
    };
    drive_connection(
        shared.clone(),
        connection,
        peer.clone(),
        control,
        live,
        shutdown,
    )
    .await
}

/// What the session thread is fed.
enum Input {
    /// Frame payloads (without their length prefixes) that arrived
    /// together, in order; they hold their bytes of the input budget.
    Frames(Vec<Vec<u8>>),
    /// A local commit (published while its store write runs).
    Committed(Committed),
    /// The commit feed dropped commits: the session cannot know what it
    /// missed.
    Lagged(u64),
    /// Time passed.
    Tick,
    /// A stream ended or failed; `misbehaved` when the peer broke the
    /// framing.
    TransportClosed { reason: String, misbehaved: bool },
    /// The replica wants rights of a bounded counter from this peer.
    AskRights(crate::RightsWanted),
    /// The endpoint is shutting down.
    Shutdown,
}

/// Runs one established connection until its session ends; true when the
/// session got past the handshake.
async fn drive_connection(
    shared: Arc<Shared>,
    connection: quinn::Connection,
    peer: SiteName,
    control: (SendStream, RecvStream),
    live: (SendStream, RecvStream),
    mut shutdown: watch::Receiver<bool>,
) -> Result<bool, TransportError> {
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let input_bytes = Arc::new(Semaphore::new(INPUT_QUEUE_BYTES_MAX));
    {
        let mut peers = shared.peers();
        let Some(entry) = peers.get_mut(&peer) else {
            return Err(TransportError::Peer(format!("{peer} is not listed")));
        };
        let replaced = entry.active.replace(ActiveConnection {
            id,
            connection: connection.clone(),
            input_bytes: input_bytes.clone(),
        });
        if let Some(old) = replaced {
            old.connection
                .close(VarInt::from_u32(connection_close::REPLACED), b"replaced");
        }
        entry.connected = false;
        entry.pending_out = 0;
        entry.traffic_done = entry.traffic_done.plus(entry.traffic_current);
        entry.traffic_current = Traffic::default();
    }

    let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE_DEPTH);
    let (control_tx, control_rx) = mpsc::channel(LANE_QUEUE_DEPTH);
    let (live_tx, live_rx) = mpsc::channel(LANE_QUEUE_DEPTH);
    // Subscribe before the session exists, so no commit falls between the
    // index it reconciles and the feed it pushes live.
    let commits = shared.replica.subscribe();

    let (control_send, control_recv) = control;
    let (live_send, live_recv) = live;
    let helpers = [
        tokio::spawn(read_lane(
            control_recv,
            input_tx.clone(),
            input_bytes.clone(),
        )),
        tokio::spawn(read_lane(live_recv, input_tx.clone(), input_bytes.clone())),
        tokio::spawn(tick(input_tx.clone())),
        tokio::spawn(super::rpc::serve(
            connection.clone(),
            peer.clone(),
            shared.rpc_handler.clone(),
        )),
        tokio::spawn(forward_rights_wanted(
            shared.replica.subscribe_rights_wanted(),
            peer.clone(),
            input_tx.clone(),
        )),
    ];
    let writers = [
        tokio::spawn(write_lane(control_send, control_rx)),
        tokio::spawn(write_lane(live_send, live_rx)),
    ];

    let mut session_config = SessionConfig::new(shared.local.clone(), peer.clone());
    if let Some(scope) = shared.scopes.get(&peer) {
        session_config.scope = scope.clone();
    }
    let session = Session::new(session_config, Instant::now());
    let driver = SessionDriver {
        shared: shared.clone(),
        peer: peer.clone(),
        connection_id: id,
        input_bytes,
        control: control_tx,
        live: live_tx,
    };
    let feed = Feed {
        runtime: tokio::runtime::Handle::current(),
        inputs: input_rx,
        commits: Some(commits),
        commits_first: true,
    };
    let mut thread = tokio::task::spawn_blocking(move || driver.run(session, feed));
    let outcome = tokio::select! {
        outcome = &mut thread => outcome,
        () = shutdown_requested(&mut shutdown) => {
            // The session sends its Close and flushes; bounded in case the
            // session thread is stuck on the disk.
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, input_tx.send(Input::Shutdown)).await;
            match tokio::time::timeout(FLUSH_TIMEOUT, &mut thread).await {
                Ok(outcome) => outcome,
                Err(_) => Ok(SessionOutcome { connected: false, reason: "shutdown timed out".to_owned(), close: connection_close::SHUTDOWN }),
            }
        }
    };
    drop(input_tx);
    for helper in &helpers {
        helper.abort();
    }
    // The writers end once the session dropped its lane senders: they
    // finish their streams and wait until the peer has received everything,
    // so the Close message arrives before the connection closes.
    let flush = async {
        for writer in writers {
            let _ = writer.await;
        }
    };
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, flush).await;
    let code = match &outcome {
        Ok(outcome) => outcome.close,
        Err(_) => connection_close::PROTOCOL_ERROR,
    };
    connection.close(VarInt::from_u32(code), b"session ended");

    {
        let mut peers = shared.peers();
        if let Some(entry) = peers.get_mut(&peer) {
            if entry.active.as_ref().is_some_and(|a| a.id == id) {
                entry.active = None;
                entry.connected = false;
                entry.pending_out = 0;
            }
        }
    }
    match outcome {
        Ok(outcome) => {
            tracing::info!(%peer, reason = %outcome.reason, "session ended");
            Ok(outcome.connected)
        }
        Err(e) => Err(TransportError::Peer(format!("session thread failed: {e}"))),
    }
}

/// Reads length-prefixed frames from one stream into the session's inputs.
/// Every whole frame among the bytes that arrived together goes to the
/// session as one input, so frames written together (a transaction's
/// members, say) are handled in one turn.
async fn read_lane(mut recv: RecvStream, inputs: mpsc::Sender<Input>, budget: Arc<Semaphore>) {
    let mut frames = LaneFrames::default();
    let mut chunks: Vec<bytes::Bytes> = vec![bytes::Bytes::new(); READ_CHUNKS_MAX];
    let (reason, misbehaved) = loop {
        match recv.read_chunks(&mut chunks).await {
            Ok(Some(count)) => {
                for chunk in &chunks[..count] {
                    frames.push(chunk);
                }
            }
            Ok(None) if frames.is_empty() => {
                break ("the peer finished a stream".to_owned(), false)
            }
            Ok(None) => break ("the peer finished a stream inside a frame".to_owned(), true),
            Err(e) => {
                break (
                    TransportError::Read(quinn::ReadExactError::ReadError(e)).to_string(),
                    false,
                )
            }
        }
        let whole = match frames.take_whole(&budget).await {
            Ok(whole) => whole,
            Err(e) => {
                let misbehaved = matches!(e, TransportError::Peer(_));
                break (e.to_string(), misbehaved);
            }
        };
        if !whole.is_empty() && inputs.send(Input::Frames(whole)).await.is_err() {
            return;
        }
    };
    let _ = inputs
        .send(Input::TransportClosed { reason, misbehaved })
        .await;
}

/// Most chunks one read of a stream takes.
const READ_CHUNKS_MAX: usize = 32;

/// Bytes read from a stream that do not yet make a whole frame.
#[derive(Default)]
struct LaneFrames {
    buffer: Vec<u8>,
    /// Where the first unread frame starts in `buffer`.
    start: usize,
}

impl LaneFrames {
    fn is_empty(&self) -> bool {
        self.start == self.buffer.len()
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The whole frames' payloads read so far, each taking its bytes from
    /// `budget` first (the session returns them); waits while the session
    /// is behind, so reading stops and QUIC flow control holds the peer.
    async fn take_whole(&mut self, budget: &Semaphore) -> Result<Vec<Vec<u8>>, TransportError> {
        let mut whole = Vec::new();
        loop {
            let rest = &self.buffer[self.start..];
            let Some(prefix) = rest.first_chunk::<4>() else {
                break;
            };
            let len = u32::from_be_bytes(*prefix) as usize;
            if len == 0 || len > FRAME_BYTES_MAX {
                return Err(TransportError::Peer(format!("frame of {len} bytes")));
            }
            if rest.len() < 4 + len {
                break;
            }
            // FRAME_BYTES_MAX is below INPUT_QUEUE_BYTES_MAX, so this
            // always fits.
            budget
                .acquire_many(len as u32)
                .await
                .map_err(|_| TransportError::Shutdown)?
                .forget();
            whole.push(rest[4..4 + len].to_vec());
            self.start += 4 + len;
        }
        if self.is_empty() {
            self.buffer.clear();
            self.start = 0;
        }
        Ok(whole)
    }
}

/// Writes the session's frames to one stream, then finishes it and waits
/// until the peer has received everything.
async fn write_lane(mut send: SendStream, mut frames: mpsc::Receiver<Vec<u8>>) {
    while let Some(frame) = frames.recv().await {
        if send.write_all(&frame).await.is_err() {
            return;
        }
    }
    if send.finish().is_ok() {
        let _ = send.stopped().await;
    }
}

/// What the session thread waits on: the queued inputs, and the replica's
/// commits read straight from its feed. A commit wakes the session thread
/// itself, with no task between them: that hand-off is on the path of every
/// live change.
struct Feed {
    runtime: tokio::runtime::Handle,
    inputs: mpsc::Receiver<Input>,
    /// `None` once the replica's feed closed.
    commits: Option<broadcast::Receiver<Committed>>,
    /// Which source is tried first next time, alternating so neither
    /// starves the other.
    commits_first: bool,
}

impl Feed {
    /// The next input, waiting for one; `None` once the inputs ended.
    fn next(&mut self) -> Option<Input> {
        self.commits_first = !self.commits_first;
        if self.commits_first {
            if let Some(input) = self.try_commit() {
                return Some(input);
            }
        }
        if let Ok(input) = self.inputs.try_recv() {
            return Some(input);
        }
        if let Some(input) = self.try_commit() {
            return Some(input);
        }
        let Feed {
            runtime,
            inputs,
            commits,
            ..
        } = self;
        let Some(feed) = commits else {
            return inputs.blocking_recv();
        };
        let (input, closed) = runtime.block_on(async {
            tokio::select! {
                input = inputs.recv() => (input, false),
                committed = feed.recv() => match committed {
                    Ok(committed) => (Some(Input::Committed(committed)), false),
                    Err(broadcast::error::RecvError::Lagged(missed)) => (Some(Input::Lagged(missed)), false),
                    Err(broadcast::error::RecvError::Closed) => (None, true),
                },
            }
        });
        if closed {
            *commits = None;
            return self.next();
        }
        input
    }

    fn try_commit(&mut self) -> Option<Input> {
        let feed = self.commits.as_mut()?;
        match feed.try_recv() {
            Ok(committed) => Some(Input::Committed(committed)),
            Err(broadcast::error::TryRecvError::Lagged(missed)) => Some(Input::Lagged(missed)),
            Err(broadcast::error::TryRecvError::Empty) => None,
            Err(broadcast::error::TryRecvError::Closed) => {
                self.commits = None;
                None
            }
        }
    }
}

/// Hands the replica's requests for rights meant for `peer` (or for every
/// peer) to its session.
async fn forward_rights_wanted(
    mut wanted: broadcast::Receiver<crate::RightsWanted>,
    peer: SiteName,
    inputs: mpsc::Sender<Input>,
) {
    loop {
        match wanted.recv().await {
            Ok(want) if want.ask.as_ref().is_none_or(|ask| *ask == peer) => {
                if inputs.send(Input::AskRights(want)).await.is_err() {
                    return;
                }
            }
            // A waiting op asks again; a lost request only delays it.
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Wakes the session regularly so its deadlines fire.
async fn tick(inputs: mpsc::Sender<Input>) {
    let mut interval = tokio::time::interval(TICK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match inputs.try_send(Input::Tick) {
            // A full queue wakes the session anyway.
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// How a session thread ended.
struct SessionOutcome {
    /// The session got past the handshake.
    connected: bool,
    reason: String,
    /// The QUIC close code to end the connection with.
    close: u32,
}

/// Most bytes of frames handed to a lane's writer as one write.
const WRITE_BYTES_MAX: usize = 256 << 10;

/// Hands `bytes` (whole frames) to a lane's writer; blocks while the
/// writer is behind: back-pressure from QUIC.
fn send_lane(lane_tx: &mpsc::Sender<Vec<u8>>, bytes: Vec<u8>) -> Result<(), String> {
    lane_tx
        .blocking_send(bytes)
        .map_err(|_| "a stream writer stopped".to_owned())
}

/// Most queued frames handed to the session in one turn.
const FRAMES_PER_TURN_MAX: usize = 256;

/// The blocking side of one connection: owns the session.
struct SessionDriver {
    shared: Arc<Shared>,
    peer: SiteName,
    connection_id: u64,
    input_bytes: Arc<Semaphore>,
    control: mpsc::Sender<Vec<u8>>,
    live: mpsc::Sender<Vec<u8>>,
}

impl SessionDriver {
    fn run(self, mut session: Session, mut feed: Feed) -> SessionOutcome {
        let replica = self.shared.replica.clone();
        let mut outcome = SessionOutcome {
            connected: false,
            reason: String::from("inputs ended"),
            close: connection_close::NORMAL,
        };
        // An input taken from the queue while gathering frames.
        let mut next: Option<Input> = None;
        loop {
            if let Err(why) = self.flush(&mut session, &mut outcome) {
                outcome.reason = why;
                return outcome;
            }
            if session.is_closed() {
                return outcome;
            }
            let input = match next.take() {
                Some(input) => input,
                None => match feed.next() {
                    Some(input) => input,
                    None => return outcome,
                },
            };
            let now = Instant::now();
            match input {
                Input::Frames(mut frames) => {
                    // Frames that queued meanwhile go in together, so whole
                    // documents arriving back to back become one durable write.
                    while frames.len() < FRAMES_PER_TURN_MAX {
                        match feed.inputs.try_recv() {
                            Ok(Input::Frames(more)) => frames.extend(more),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    session.handle_frames(now, &replica, &frames);
                    self.input_bytes
                        .add_permits(frames.iter().map(Vec::len).sum());
                    self.shared.update(&self.peer, self.connection_id, |entry| {
                        entry.last_seen = Some(SystemTime::now());
                    });
                }
                Input::Committed(committed) => {
                    session.handle_committed(&replica, &committed);
                    // Commits published together (the members of a
                    // transaction) leave together: their frames reach the
                    // writer in one turn, so the peer receives them at
                    // once and holds none back waiting for the next.
                    for _ in 1..FRAMES_PER_TURN_MAX {
                        match feed.try_commit() {
                            Some(Input::Committed(committed)) => {
                                session.handle_committed(&replica, &committed);
                            }
                            Some(other) => {
                                next = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Input::Lagged(missed) => session.close(
                    close_code::INTERNAL,
                    &format!("missed {missed} local commits; reconnecting to reconcile"),
                ),
                Input::Tick => {}
                Input::AskRights(wanted) => session.ask_rights(&wanted),
                Input::TransportClosed { reason, misbehaved } => {
                    // Whatever the peer still sent is lost with the stream;
                    // the next connection reconciles.
                    if misbehaved {
                        session.close(close_code::PROTOCOL_ERROR, &reason);
                    }
                    let _ = self.flush(&mut session, &mut outcome);
                    outcome.reason = reason;
                    return outcome;
                }
                Input::Shutdown => session.close(close_code::NORMAL, "shutting down"),
            }
            if session
                .poll_timeout()
                .is_some_and(|deadline| now >= deadline)
            {
                session.handle_timeout(now);
            }
        }
    }

    /// Hands the session's frames to the writers and applies its events.
    /// Frames of one lane go to its writer together (one stream write, so
    /// usually one packet for small ones), up to [`WRITE_BYTES_MAX`].
    fn flush(&self, session: &mut Session, outcome: &mut SessionOutcome) -> Result<(), String> {
        let mut control: Vec<u8> = Vec::new();
        let mut live: Vec<u8> = Vec::new();
        while let Some((lane, frame)) = session.poll_transmit() {
            let (pending, lane_tx) = match lane {
                Lane::Control => (&mut control, &self.control),
                Lane::Live => (&mut live, &self.live),
            };
            if !pending.is_empty() && pending.len() + frame.len() > WRITE_BYTES_MAX {
                send_lane(lane_tx, std::mem::take(pending))?;
            }
            if pending.is_empty() {
                *pending = frame;
            } else {
                pending.extend_from_slice(&frame);
            }
        }
        for (pending, lane_tx) in [(control, &self.control), (live, &self.live)] {
            if !pending.is_empty() {
                send_lane(lane_tx, pending)?;
            }
        }
        while let Some(event) = session.poll_event() {
            match event {
                Event::Connected { peer } => {
                    outcome.connected = true;
                    tracing::info!(local = %self.shared.local, %peer, "session connected");
                    self.shared.update(&self.peer, self.connection_id, |entry| {
                        entry.connected = true;
                        entry.last_seen = Some(SystemTime::now());
                    });
                }
                Event::Closed {
                    code,
                    reason,
                    by_peer,
                } => {
                    outcome.reason = format!(
                        "closed by {} with code {code}: {reason}",
                        if by_peer { "the peer" } else { "this site" }
                    );
                    if code == close_code::PROTOCOL_ERROR && !by_peer {
                        outcome.close = connection_close::PROTOCOL_ERROR;
                    }
                    self.shared.update(&self.peer, self.connection_id, |entry| {
                        entry.connected = false;
                    });
                }
                Event::Rejected { doc, reason } => {
                    tracing::warn!(peer = %self.peer, %doc, %reason, "changes rejected");
                }
                Event::Applied { doc, changes } => {
                    tracing::debug!(peer = %self.peer, %doc, changes, "changes applied");
                }
                Event::Reconciled {
                    differing,
                    messages_sent,
                } => {
                    tracing::debug!(peer = %self.peer, differing, messages_sent, "reconciled");
                }
            }
        }
        let pending_out = session.pending_out_bytes();
        let traffic = Traffic::of(&session.stats());
        self.shared.update(&self.peer, self.connection_id, |entry| {
            entry.pending_out = pending_out;
            entry.traffic_current = traffic;
        });
        Ok(())
    }
}
