//! One automerge-repo client's connection as state, without sockets or
//! clocks: the caller feeds it the client's messages (with the time they
//! arrived) and the documents that changed at the node, and sends what
//! [`ClientSession::poll_transmit`] returns.
//!
//! The node keeps one copy of each document, the replica's: a session holds
//! only an automerge sync state per document the client asked about. A
//! client's changes go through the replica ([`ClientHost::receive`]), which
//! makes them durable and runs the conflict layer before the session
//! answers, so the client never hears that the node holds a change it
//! could still lose.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};

use super::ids::RepoId;
use super::wire::{Message, PeerMetadata, PROTOCOL_V1};
use crate::{DocId, Error};

/// What a session needs of the node.
pub trait ClientHost {
    /// The document that the id `id` names here, if one exists.
    fn find(&self, id: &RepoId) -> Option<DocId>;
    /// A sync message for the client from the node's copy of `doc`, or
    /// `None` when there is nothing to say (or no such document).
    fn generate(
        &self,
        doc: &DocId,
        state: &mut sync::State,
    ) -> Result<Option<sync::Message>, Error>;
    /// Takes a client's sync message about `doc`: its changes are applied
    /// and durable when this returns (none with `read_only`; the document
    /// is created if it is new), and `state` has learnt what the client
    /// has.
    fn receive(
        &self,
        doc: &DocId,
        state: &mut sync::State,
        message: sync::Message,
        read_only: bool,
    ) -> Result<(), Error>;
}

/// What one client may do, and the limits of its connection.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// This node's peer id towards clients.
    pub peer_id: String,
    /// The storage id it announces (clients use it to tell storage peers).
    pub storage_id: Option<String>,
    /// Where documents that clients create are stored: `NAMESPACE/ID`.
    pub namespace: String,
    /// The document id prefixes the client may open; `None` for all.
    pub prefixes: Option<Vec<String>>,
    /// Whether the client's changes are refused.
    pub read_only: bool,
    /// Documents one connection may sync at once.
    pub docs_max: usize,
    /// The largest message taken, in bytes.
    pub message_bytes_max: usize,
    /// Messages a second the client may send, on average.
    pub messages_per_second: u32,
    /// Messages it may send at once above that rate.
    pub messages_burst: u32,
    /// The largest payload of an ephemeral message relayed to the
    /// document's other clients, in bytes.
    pub ephemeral_bytes_max: usize,
}

impl ClientConfig {
    /// A client that may open every document, with default limits.
    pub fn new(peer_id: impl Into<String>) -> ClientConfig {
        ClientConfig {
            peer_id: peer_id.into(),
            storage_id: None,
            namespace: "repo".to_owned(),
            prefixes: None,
            read_only: false,
            docs_max: 10_000,
            message_bytes_max: 16 << 20,
            messages_per_second: 1_000,
            messages_burst: 5_000,
            ephemeral_bytes_max: 64 << 10,
        }
    }

    /// Whether the client may open `doc`.
    pub fn may_open(&self, doc: &DocId) -> bool {
        self.prefixes.as_ref().is_none_or(|prefixes| {
            prefixes
                .iter()
                .any(|p| doc.as_str().starts_with(p.as_str()))
        })
    }
}

/// Counts of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Messages received.
    pub messages_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Messages sent.
    pub messages_out: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Sync messages whose changes were refused (read-only client, bounded
    /// counters, or the replica refused them).
    pub refused: u64,
}

/// An ephemeral message a client sent about a document (presence, cursors:
/// never stored), for the other clients syncing that document: see
/// [`ClientSession::poll_relay`] and [`ClientSession::handle_relayed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ephemeral {
    /// The document here.
    pub doc: DocId,
    /// The document's automerge-repo id.
    pub id: RepoId,
    /// The peer id the message names as its sender (clients forward each
    /// other's messages, so it need not be the sending client's).
    pub sender_id: String,
    /// The sender's session.
    pub session_id: String,
    /// The sender's message counter, by which clients drop repeats.
    pub count: u64,
    /// The payload (CBOR, as the sender encoded it).
    pub data: Vec<u8>,
}

struct DocSync {
    id: RepoId,
    state: sync::State,
}

/// One client connection.
pub struct ClientSession {
    config: ClientConfig,
    client: Option<String>,
    docs: HashMap<DocId, DocSync>,
    out: VecDeque<Vec<u8>>,
    relay: VecDeque<Ephemeral>,
    closed: Option<String>,
    stats: ClientStats,
    /// Messages the client may still send now, refilled with time.
    budget: f64,
    refilled: Option<Instant>,
}

impl ClientSession {
    /// A session waiting for the client's `join`.
    pub fn new(config: ClientConfig) -> ClientSession {
        let budget = f64::from(config.messages_burst);
        ClientSession {
            config,
            client: None,
            docs: HashMap::new(),
            out: VecDeque::new(),
            relay: VecDeque::new(),
            closed: None,
            stats: ClientStats::default(),
            budget,
            refilled: None,
        }
    }

    /// The client's peer id, once it joined.
    pub fn client(&self) -> Option<&str> {
        self.client.as_deref()
    }

    /// Why the session ended, once it did: the connection is to be closed
    /// after sending what is left to send.
    pub fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// Documents the session syncs.
    pub fn docs(&self) -> usize {
        self.docs.len()
    }

    /// What it has done.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// The next ephemeral message the client sent, for the other clients
    /// of its document ([`ClientSession::handle_relayed`]).
    pub fn poll_relay(&mut self) -> Option<Ephemeral> {
        self.relay.pop_front()
    }

    /// An ephemeral message another client sent: passed on to this client
    /// if it syncs the document and did not send it.
    pub fn handle_relayed(&mut self, message: &Ephemeral) {
        let Some(client) = self.client.clone() else {
            return;
        };
        if self.closed.is_some()
            || client == message.sender_id
            || !self.docs.contains_key(&message.doc)
        {
            return;
        }
        self.send(&Message::Ephemeral {
            sender_id: message.sender_id.clone(),
            target_id: client,
            count: message.count,
            session_id: message.session_id.clone(),
            document_id: message.id.to_string(),
            data: message.data.clone(),
        });
    }

    /// Ends the session, telling the client why.
    pub fn close(&mut self, reason: &str) {
        if self.closed.is_none() {
            self.send(&Message::Error {
                message: reason.to_owned(),
            });
            self.closed = Some(reason.to_owned());
        }
    }

    /// A message from the client, received at `now`.
    pub fn handle(&mut self, now: Instant, host: &dyn ClientHost, bytes: &[u8]) {
        if self.closed.is_some() {
            return;
        }
        self.stats.messages_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        if !self.take_budget(now) {
            return self.close("too many messages: slow down");
        }
        if bytes.len() > self.config.message_bytes_max {
            return self.close(&format!(
                "message of {} bytes is over the limit of {}",
                bytes.len(),
                self.config.message_bytes_max
            ));
        }
        let message = match Message::decode(bytes) {
            Ok(message) => message,
            Err(e) => return self.close(&e.to_string()),
        };
        match message {
            Message::Join {
                sender_id,
                supported_protocol_versions,
                ..
            } => {
                if !supported_protocol_versions.iter().any(|v| v == PROTOCOL_V1) {
                    return self.close("unsupported protocol version");
                }
                // A client joining again starts afresh.
                self.docs.clear();
                self.send(&Message::Peer {
                    sender_id: self.config.peer_id.clone(),
                    target_id: sender_id.clone(),
                    selected_protocol_version: PROTOCOL_V1.to_owned(),
                    metadata: Some(PeerMetadata {
                        storage_id: self.config.storage_id.clone(),
                        is_ephemeral: false,
                    }),
                });
                self.client = Some(sender_id);
            }
            _ if self.client.is_none() => self.close("the first message must be join"),
            Message::Request {
                document_id, data, ..
            } => self.on_sync(host, &document_id, &data, false),
            Message::Sync {
                document_id, data, ..
            } => self.on_sync(host, &document_id, &data, true),
            Message::Leave { .. } => self.closed = Some("the client left".to_owned()),
            Message::Ephemeral {
                sender_id,
                count,
                session_id,
                document_id,
                data,
                ..
            } => self.on_ephemeral(host, sender_id, session_id, count, &document_id, data),
            Message::DocUnavailable { .. }
            | Message::Peer { .. }
            | Message::Error { .. }
            | Message::Other { .. } => {}
        }
    }

    /// A document changed at the node (any origin): a client syncing it
    /// hears of the change.
    pub fn handle_changed(&mut self, host: &dyn ClientHost, doc: &DocId) {
        if self.closed.is_none() && self.docs.contains_key(doc) {
            self.sync_out(host, doc);
        }
    }

    /// Commits were missed (the node's feed ran ahead of this session):
    /// every document the client syncs is offered again.
    pub fn handle_lagged(&mut self, host: &dyn ClientHost) {
        let docs: Vec<DocId> = self.docs.keys().cloned().collect();
        for doc in docs {
            self.handle_changed(host, &doc);
        }
    }

    /// A `request` (`client_has` false: the client lacks the document) or
    /// a `sync` message about a document.
    fn on_sync(&mut self, host: &dyn ClientHost, document_id: &str, data: &[u8], client_has: bool) {
        let Some(id) = RepoId::parse(document_id) else {
            return self.close(&format!("{document_id:?} is not a document id"));
        };
        let found = host.find(&id);
        let Some(doc) = found.clone().or_else(|| id.doc_in(&self.config.namespace)) else {
            return self.unavailable(&id);
        };
        if !self.config.may_open(&doc) {
            return self.unavailable(&id);
        }
        let message = match decode_sync(data) {
            Ok(message) => message,
            Err(reason) => return self.close(&reason),
        };
        if !self.docs.contains_key(&doc) {
            if self.docs.len() >= self.config.docs_max {
                tracing::warn!(client = ?self.client, docs = self.docs.len(), "a client opened as many documents as one connection may");
                return self.unavailable(&id);
            }
            self.docs.insert(
                doc.clone(),
                DocSync {
                    id,
                    state: sync::State::new(),
                },
            );
        }
        let has_changes = !message.changes.is_empty();
        if found.is_none() && !has_changes {
            if client_has {
                // A document the client has and the node lacks (one it
                // created): answer as an empty document does, so that the
                // client sends its changes.
                let entry = self.docs.get_mut(&doc).expect("inserted above");
                let empty = automerge::Automerge::new();
                if let Some(reply) = empty.generate_sync_message(&mut entry.state) {
                    self.send_sync(id, reply);
                }
                return;
            }
            // Nothing here, and the client brings nothing: it is told so,
            // and hears of the document if it arrives later.
            return self.unavailable(&id);
        }
        let read_only = self.config.read_only;
        if has_changes && read_only {
            self.stats.refused += 1;
        }
        let entry = self.docs.get_mut(&doc).expect("inserted above");
        if let Err(e) = host.receive(&doc, &mut entry.state, message, read_only) {
            self.stats.refused += 1;
            tracing::info!(client = ?self.client, %doc, error = %e, "a client's sync message was refused");
            self.send(&Message::Error {
                message: format!("{doc}: {e}"),
            });
            if found.is_none() {
                self.docs.remove(&doc);
                return;
            }
        }
        self.sync_out(host, &doc);
    }

    /// An ephemeral message from the client: kept for the document's other
    /// clients when this one syncs the document (a client sends them only
    /// to peers it syncs the document with).
    fn on_ephemeral(
        &mut self,
        host: &dyn ClientHost,
        sender_id: String,
        session_id: String,
        count: u64,
        document_id: &str,
        data: Vec<u8>,
    ) {
        let Some(id) = RepoId::parse(document_id) else {
            return self.close(&format!("{document_id:?} is not a document id"));
        };
        if data.len() > self.config.ephemeral_bytes_max {
            return self.close(&format!(
                "ephemeral message of {} bytes is over the limit of {}",
                data.len(),
                self.config.ephemeral_bytes_max
            ));
        }
        let Some(doc) = host.find(&id).or_else(|| id.doc_in(&self.config.namespace)) else {
            return;
        };
        if !self.docs.contains_key(&doc) {
            return;
        }
        self.relay.push_back(Ephemeral {
            doc,
            id,
            sender_id,
            session_id,
            count,
            data,
        });
    }

    fn sync_out(&mut self, host: &dyn ClientHost, doc: &DocId) {
        let Some(entry) = self.docs.get_mut(doc) else {
            return;
        };
        let id = entry.id;
        match host.generate(doc, &mut entry.state) {
            Ok(Some(message)) => self.send_sync(id, message),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%doc, error = %e, "no sync message for a client");
            }
        }
    }

    fn send_sync(&mut self, id: RepoId, message: sync::Message) {
        let message = Message::Sync {
            sender_id: self.config.peer_id.clone(),
            target_id: self.client.clone().unwrap_or_default(),
            document_id: id.to_string(),
            data: message.encode(),
        };
        self.send(&message);
    }

    fn unavailable(&mut self, id: &RepoId) {
        let message = Message::DocUnavailable {
            sender_id: self.config.peer_id.clone(),
            target_id: self.client.clone().unwrap_or_default(),
            document_id: id.to_string(),
        };
        self.send(&message);
    }

    fn send(&mut self, message: &Message) {
        let bytes = message.encode();
        self.stats.messages_out += 1;
        self.stats.bytes_out += bytes.len() as u64;
        self.out.push_back(bytes);
    }

    fn take_budget(&mut self, now: Instant) -> bool {
        let rate = f64::from(self.config.messages_per_second);
        let burst = f64::from(self.config.messages_burst);
        if let Some(before) = self.refilled {
            let elapsed = now
                .saturating_duration_since(before)
                .min(Duration::from_secs(60));
            self.budget = (self.budget + elapsed.as_secs_f64() * rate).min(burst);
        }
        self.refilled = Some(now);
        if self.budget < 1.0 {
            return false;
        }
        self.budget -= 1.0;
        true
    }
}

/// An automerge sync message, or why it is not one (automerge's decoder
/// can panic on malformed bytes: that is contained here).
fn decode_sync(data: &[u8]) -> Result<sync::Message, String> {
    match std::panic::catch_unwind(|| sync::Message::decode(data)) {
        Ok(Ok(message)) => Ok(message),
        Ok(Err(e)) => Err(format!("not an automerge sync message: {e}")),
        Err(_) => Err("not an automerge sync message (the decoder failed)".to_owned()),
    }
}
