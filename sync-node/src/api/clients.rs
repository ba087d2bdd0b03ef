//! `GET /v1/automerge-repo`: a WebSocket speaking the automerge-repo
//! protocol (version 1), so that JavaScript apps using
//! `@automerge/automerge-repo` with its WebSocket network adapter are
//! clients of this site. The protocol's state is the library's
//! [`ClientSession`]; this is the I/O around it: binary messages in, the
//! replica's commits in, the session's messages out. The token was checked
//! before the upgrade (header or `token` query parameter).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use archipelago::clients::{ClientConfig, ClientSession, ClientStats, Ephemeral, ReplicaClients};

use super::error::ApiError;
use super::telemetry::{CLIENTS_CONNECTED, CLIENT_BYTES, CLIENT_EPHEMERAL, CLIENT_MESSAGES};
use super::{ApiState, Principal};
use crate::config::ClientsConfig;

/// The route.
pub const PATH: &str = "/v1/automerge-repo";

/// Ephemeral messages on their way between connections at once; a
/// connection that falls further behind misses some (they are presence,
/// never stored, and clients expect to miss some).
const EPHEMERAL_QUEUE: usize = 1024;

/// What connections share: the open ones, their limits, and the ephemeral
/// messages passed between them (each with the number of the connection it
/// came from).
#[derive(Debug, Clone)]
pub(crate) struct ClientsShared {
    pub(crate) registry: Arc<ClientRegistry>,
    pub(crate) limits: ClientsConfig,
    ephemeral: broadcast::Sender<(u64, Arc<Ephemeral>)>,
}

impl ClientsShared {
    pub(crate) fn new(limits: ClientsConfig) -> ClientsShared {
        ClientsShared {
            registry: Arc::default(),
            limits,
            ephemeral: broadcast::channel(EPHEMERAL_QUEUE).0,
        }
    }
}

/// The client connections open now, for `/v1/status`.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, ClientView>>,
}

/// One open client connection as `/v1/status` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientView {
    /// Its number at this node, from 0.
    pub connection: u64,
    /// The client's peer id, once it joined.
    pub peer_id: Option<String>,
    /// The name of the token it presented (`admin` for the node's token).
    pub token: String,
    /// When it connected (RFC 3339).
    pub since: String,
    /// Documents it syncs.
    pub docs: usize,
    /// Counts of its session.
    pub messages_in: u64,
    /// Messages sent to it.
    pub messages_out: u64,
    /// Bytes received from it.
    pub bytes_in: u64,
    /// Bytes sent to it.
    pub bytes_out: u64,
}

impl ClientRegistry {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().len()
    }

    /// A place for one more connection of `token`, unless it holds `most`
    /// already; it is listed from now until the reservation is dropped.
    fn reserve(self: &Arc<Self>, token: &str, most: usize) -> Option<Reservation> {
        let mut open = self.lock();
        if open.values().filter(|view| view.token == token).count() >= most {
            return None;
        }
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let since = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        open.insert(
            number,
            ClientView {
                connection: number,
                peer_id: None,
                token: token.to_owned(),
                since,
                docs: 0,
                messages_in: 0,
                messages_out: 0,
                bytes_in: 0,
                bytes_out: 0,
            },
        );
        metrics::gauge!(CLIENTS_CONNECTED, "token" => token.to_owned()).increment(1.0);
        Some(Reservation {
            registry: self.clone(),
            number,
            token: token.to_owned(),
        })
    }

    /// The open connections, oldest first.
    pub fn list(&self) -> Vec<ClientView> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ClientView>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection's line in the registry, removed when dropped (when the
/// connection ends, or when its upgrade never happens).
struct Reservation {
    registry: Arc<ClientRegistry>,
    number: u64,
    token: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.number);
        metrics::gauge!(CLIENTS_CONNECTED, "token" => self.token.clone()).decrement(1.0);
    }
}

/// The WebSocket read and write buffers of a connection, in bytes.
const CLIENT_BUFFER_BYTES: usize = 4 << 10;

/// How often an open connection checks that its token still works: a
/// revoked or expired token is cut off within this.
const TOKEN_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) async fn connect(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    ws: WebSocketUpgrade,
) -> Response {
    let shared = &state.clients_shared;
    let most = shared.limits.connections_per_token;
    let Some(reservation) = shared.registry.reserve(principal.name(), most) else {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            format!(
                "token {} holds {most} open connections, the most one token may (clients.connections_per_token)",
                principal.name()
            ),
        )
        .into_response();
    };
    let bytes_max = shared.limits.message_bytes_max;
    // Small buffers: an idle client costs little (they grow for a large
    // message while it lasts).
    ws.max_message_size(bytes_max)
        .max_frame_size(bytes_max)
        .read_buffer_size(CLIENT_BUFFER_BYTES)
        .write_buffer_size(CLIENT_BUFFER_BYTES)
        .on_upgrade(move |socket| serve(socket, state, principal, reservation))
}

async fn serve(socket: WebSocket, state: ApiState, principal: Principal, reservation: Reservation) {
    let number = reservation.number;
    let reason = run(socket, &state, number, &principal).await;
    drop(reservation);
    tracing::info!(connection = number, %reason, "automerge-repo client disconnected");
}

/// Brings the connection's line in `/v1/status` and the metrics up to date
/// with its session.
fn record(state: &ApiState, number: u64, session: &ClientSession, before: &mut ClientStats) {
    let stats = session.stats();
    let counts = [
        (
            CLIENT_MESSAGES,
            "in",
            stats.messages_in - before.messages_in,
        ),
        (
            CLIENT_MESSAGES,
            "out",
            stats.messages_out - before.messages_out,
        ),
        (CLIENT_BYTES, "in", stats.bytes_in - before.bytes_in),
        (CLIENT_BYTES, "out", stats.bytes_out - before.bytes_out),
    ];
    for (name, direction, delta) in counts {
        if delta > 0 {
            metrics::counter!(name, "direction" => direction).increment(delta);
        }
    }
    *before = stats;
    if let Some(view) = state.clients_shared.registry.lock().get_mut(&number) {
        view.peer_id = session.client().map(str::to_owned);
        view.docs = session.docs();
        view.messages_in = stats.messages_in;
        view.messages_out = stats.messages_out;
        view.bytes_in = stats.bytes_in;
        view.bytes_out = stats.bytes_out;
    }
}

/// Serves one client until it or the node ends the conversation; returns
/// why it ended.
async fn run(socket: WebSocket, state: &ApiState, number: u64, principal: &Principal) -> String {
    let clients: Arc<ReplicaClients> = state.clients.clone();
    // Subscribed before the first message, so no commit falls between.
    let mut commits = state.replica.subscribe();
    let mut relayed = state.clients_shared.ephemeral.subscribe();
    let limits = &state.clients_shared.limits;
    let mut config = ClientConfig::new(format!("archipelago-{}", state.replica.site()));
    config.namespace = clients.namespace().to_owned();
    config.message_bytes_max = limits.message_bytes_max;
    config.docs_max = limits.docs_per_connection;
    config.messages_per_second = limits.messages_per_second;
    config.messages_burst = limits.messages_per_second.saturating_mul(5);
    if let Principal::Scoped(token) = principal {
        config.prefixes = Some(token.prefixes.clone());
        config.read_only = token.read_only;
    }
    let mut token_check = tokio::time::interval(TOKEN_CHECK_EVERY);
    let mut session = Some(ClientSession::new(config));
    let mut recorded = ClientStats::default();
    let (mut sink, mut stream) = socket.split();
    loop {
        // What to feed the session: a message, or changed documents.
        enum Input {
            Bytes(Vec<u8>),
            Changed(archipelago::DocId),
            Lagged,
        }
        let input = tokio::select! {
            received = stream.next() => match received {
                Some(Ok(WsMessage::Binary(bytes))) => Input::Bytes(bytes.to_vec()),
                Some(Ok(WsMessage::Text(_))) => {
                    let session = session.as_mut().expect("present between turns");
                    session.close("text messages are not part of the protocol");
                    let _ = flush(session, &mut sink).await;
                    return "the client sent text".to_owned();
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(WsMessage::Close(_))) | None => return "the client closed".to_owned(),
                Some(Err(e)) => return format!("the connection failed: {e}"),
            },
            _ = token_check.tick() => {
                if let Principal::Scoped(token) = principal {
                    if !state.tokens.still_valid(token) {
                        let session = session.as_mut().expect("present between turns");
                        session.close("the token was revoked or has expired");
                        let _ = flush(session, &mut sink).await;
                        let _ = sink.send(WsMessage::Close(None)).await;
                        return format!("token {} no longer works", token.name);
                    }
                }
                continue;
            }
            message = relayed.recv() => {
                match message {
                    Ok((from, message)) if from != number => {
                        let session = session.as_mut().expect("present between turns");
                        session.handle_relayed(&message);
                        record(state, number, session, &mut recorded);
                        if let Err(e) = flush(session, &mut sink).await {
                            return format!("sending failed: {e}");
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(connection = number, missed, "a client missed ephemeral messages");
                    }
                    Err(RecvError::Closed) => return "the node is shutting down".to_owned(),
                }
                continue;
            }
            committed = commits.recv() => match committed {
                Ok(committed) => Input::Changed(committed.doc),
                Err(RecvError::Lagged(_)) => Input::Lagged,
                Err(RecvError::Closed) => return "the node is shutting down".to_owned(),
            },
        };
        // Replica calls block (a client's change waits for its fsync).
        let mut taken = session.take().expect("present between turns");
        let host = clients.clone();
        let turn = tokio::task::spawn_blocking(move || {
            match input {
                Input::Bytes(bytes) => taken.handle(Instant::now(), &*host, &bytes),
                Input::Changed(doc) => taken.handle_changed(&*host, &doc),
                Input::Lagged => taken.handle_lagged(&*host),
            }
            taken
        })
        .await;
        let current = match turn {
            Ok(current) => session.insert(current),
            Err(_) => return "the session failed".to_owned(),
        };
        record(state, number, current, &mut recorded);
        while let Some(message) = current.poll_relay() {
            metrics::counter!(CLIENT_EPHEMERAL).increment(1);
            // No receiver: no other client listens.
            let _ = state
                .clients_shared
                .ephemeral
                .send((number, Arc::new(message)));
        }
        if let Err(e) = flush(current, &mut sink).await {
            return format!("sending failed: {e}");
        }
        if let Some(reason) = current.closed() {
            let _ = sink.send(WsMessage::Close(None)).await;
            return reason.to_owned();
        }
    }
}

async fn flush(
    session: &mut ClientSession,
    sink: &mut futures_util::stream::SplitSink<WebSocket, WsMessage>,
) -> Result<(), axum::Error> {
    while let Some(bytes) = session.poll_transmit() {
        sink.feed(WsMessage::Binary(bytes.into())).await?;
    }
    sink.flush().await
}
