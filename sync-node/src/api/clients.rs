//! `GET /v1/automerge-repo`: a WebSocket speaking the automerge-repo
//! protocol (version 1), so that JavaScript apps using
//! `@automerge/automerge-repo` with its WebSocket network adapter are
//! clients of this site. The protocol's state is the library's
//! [`ClientSession`]; this is the I/O around it: binary messages in, the
//! replica's commits in, the session's messages out. The token was checked
//! before the upgrade (header or `token` query parameter).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::broadcast::error::RecvError;

use archipelago::clients::{ClientConfig, ClientSession, ReplicaClients};

use super::ApiState;

/// The route.
pub const PATH: &str = "/v1/automerge-repo";

/// The largest WebSocket message a client may send, in bytes.
pub const CLIENT_MESSAGE_BYTES_MAX: usize = 16 << 20;

/// Client connections open now, and ever.
#[derive(Debug, Default)]
pub struct ClientCounts {
    open: AtomicU64,
    total: AtomicU64,
}

impl ClientCounts {
    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }
}

pub(super) async fn connect(State(state): State<ApiState>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(CLIENT_MESSAGE_BYTES_MAX)
        .max_frame_size(CLIENT_MESSAGE_BYTES_MAX)
        .on_upgrade(move |socket| serve(socket, state))
}

async fn serve(socket: WebSocket, state: ApiState) {
    let counts = state.client_counts.clone();
    counts.open.fetch_add(1, Ordering::Relaxed);
    let number = counts.total.fetch_add(1, Ordering::Relaxed);
    let reason = run(socket, &state).await;
    counts.open.fetch_sub(1, Ordering::Relaxed);
    tracing::info!(connection = number, %reason, "automerge-repo client disconnected");
}

/// Serves one client until it or the node ends the conversation; returns
/// why it ended.
async fn run(socket: WebSocket, state: &ApiState) -> String {
    let clients: Arc<ReplicaClients> = state.clients.clone();
    // Subscribed before the first message, so no commit falls between.
    let mut commits = state.replica.subscribe();
    let mut config = ClientConfig::new(format!("archipelago-{}", state.replica.site()));
    config.namespace = clients.namespace().to_owned();
    config.message_bytes_max = CLIENT_MESSAGE_BYTES_MAX;
    let mut session = Some(ClientSession::new(config));
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
