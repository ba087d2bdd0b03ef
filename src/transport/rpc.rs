//! Request and reply calls between sites (the strong tier's RPCs) over the
//! QUIC connection the sites already hold for sync: each call is a stream
//! of its own, opened by the caller, tagged [`STREAM_TAG_RPC`], carrying
//! one length-prefixed request one way and one length-prefixed reply the
//! other. Streams are cheap in QUIC and independent, so a slow call (a
//! snapshot) never holds up another or the sync lanes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use tokio::sync::Semaphore;

use crate::id::SiteName;
use crate::strong::{BoxFuture, Rpc, RpcError, RpcHandler, RPC_BYTES_MAX};

/// Tag byte the caller writes first on an RPC stream.
pub const STREAM_TAG_RPC: u8 = 0x52;

/// Calls one connection serves at once; more wait for a place.
pub const RPCS_IN_PROGRESS_MAX: usize = 64;

/// Where the endpoint's RPC handler is set once the tier starts.
pub(crate) type HandlerSlot = Arc<Mutex<Option<Arc<dyn RpcHandler>>>>;

/// Finds the connection that serves a peer now.
pub(crate) type Connections = Arc<dyn Fn(&SiteName) -> Option<quinn::Connection> + Send + Sync>;

/// The [`Rpc`] of a [`super::quic::SyncEndpoint`].
pub(crate) struct QuicRpc {
    pub(crate) connections: Connections,
}

impl Rpc for QuicRpc {
    fn call(
        &self,
        to: &SiteName,
        request: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<Result<Vec<u8>, RpcError>> {
        let connection = (self.connections)(to);
        let to = to.clone();
        Box::pin(async move {
            let connection = connection.ok_or_else(|| RpcError::Unreachable(to.to_string()))?;
            let exchange = async {
                let (mut send, mut recv) = connection
                    .open_bi()
                    .await
                    .map_err(|e| RpcError::Unreachable(format!("{to}: {e}")))?;
                let failed = |e: &dyn std::fmt::Display| RpcError::Failed(format!("{to}: {e}"));
                write_message(&mut send, Some(STREAM_TAG_RPC), &request)
                    .await
                    .map_err(|e| failed(&e))?;
                let _ = send.finish();
                read_message(&mut recv).await.map_err(|e| failed(&e))
            };
            tokio::time::timeout(timeout, exchange)
                .await
                .unwrap_or(Err(RpcError::Timeout(timeout)))
        })
    }
}

/// Writes an optional tag byte, then `bytes` with a `u32` length prefix.
async fn write_message(send: &mut SendStream, tag: Option<u8>, bytes: &[u8]) -> Result<(), String> {
    let len = u32::try_from(bytes.len()).map_err(|_| "message too long".to_owned())?;
    let mut framed = Vec::with_capacity(bytes.len() + 5);
    framed.extend(tag);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    send.write_all(&framed).await.map_err(|e| e.to_string())
}

/// Reads one `u32`-length-prefixed message of at most [`RPC_BYTES_MAX`].
async fn read_message(recv: &mut RecvStream) -> Result<Vec<u8>, String> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| e.to_string())?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > RPC_BYTES_MAX {
        return Err(format!("a message of {len} bytes"));
    }
    let mut bytes = vec![0u8; len];
    recv.read_exact(&mut bytes)
        .await
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Answers the calls `peer` opens on `connection`, with the handler in
/// `slot` (calls before one is set are refused), until the connection
/// ends.
pub(crate) async fn serve(connection: quinn::Connection, peer: SiteName, slot: HandlerSlot) {
    let places = Arc::new(Semaphore::new(RPCS_IN_PROGRESS_MAX));
    while let Ok((send, recv)) = connection.accept_bi().await {
        let Ok(place) = places.clone().acquire_owned().await else {
            return;
        };
        let handler = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(send, recv, peer.clone(), handler).await {
                tracing::debug!(%peer, error = %e, "an RPC from a peer failed");
            }
            drop(place);
        });
    }
}

async fn answer(
    mut send: SendStream,
    mut recv: RecvStream,
    peer: SiteName,
    handler: Option<Arc<dyn RpcHandler>>,
) -> Result<(), String> {
    let mut tag = [0u8; 1];
    recv.read_exact(&mut tag).await.map_err(|e| e.to_string())?;
    if tag[0] != STREAM_TAG_RPC {
        let _ = send.reset(quinn::VarInt::from_u32(1));
        return Err(format!("stream tag {:#04x}", tag[0]));
    }
    let request = read_message(&mut recv).await?;
    let Some(handler) = handler else {
        let _ = send.reset(quinn::VarInt::from_u32(2));
        return Err("no handler for RPCs here".to_owned());
    };
    let reply = handler.handle(peer, request).await;
    write_message(&mut send, None, &reply).await?;
    send.finish().map_err(|e| e.to_string())?;
    Ok(())
}
