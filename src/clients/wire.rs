//! The messages of the automerge-repo network protocol (version `"1"`): one
//! CBOR map per WebSocket message, with a `type` and camel-case keys, as
//! `@automerge/automerge-repo` and its WebSocket adapter write them.
//!
//! Decoding reads the map into a small value tree first, within limits of
//! depth and size, so any input either decodes or is refused with a
//! reason; nothing in it can panic or allocate beyond the message's size.

use std::collections::BTreeMap;

use minicbor::data::Type;
use minicbor::{Decoder, Encoder};

/// The protocol version both ends speak.
pub const PROTOCOL_V1: &str = "1";

/// Nesting deeper than this is refused.
const DEPTH_MAX: usize = 8;

/// Items (of all arrays and maps together) beyond this are refused.
const ITEMS_MAX: usize = 4_096;

/// What a peer says of itself in `join` and `peer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    /// The id of the peer's storage, if it has one.
    pub storage_id: Option<String>,
    /// Whether the peer forgets everything when it goes.
    pub is_ephemeral: bool,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A client opens the conversation.
    Join {
        /// The client's peer id.
        sender_id: String,
        /// Protocol versions it speaks.
        supported_protocol_versions: Vec<String>,
        /// What it says of itself.
        metadata: Option<PeerMetadata>,
    },
    /// The answer to `join`.
    Peer {
        /// This side's peer id.
        sender_id: String,
        /// The client's peer id.
        target_id: String,
        /// The version chosen.
        selected_protocol_version: String,
        /// What this side says of itself.
        metadata: Option<PeerMetadata>,
    },
    /// The sender is going away.
    Leave {
        /// Its peer id.
        sender_id: String,
    },
    /// The sender asks for a document it lacks, with a sync message.
    Request {
        /// The sender's peer id.
        sender_id: String,
        /// The receiver's.
        target_id: String,
        /// The document (bs58check text).
        document_id: String,
        /// An automerge sync message.
        data: Vec<u8>,
    },
    /// A sync message about a document.
    Sync {
        /// The sender's peer id.
        sender_id: String,
        /// The receiver's.
        target_id: String,
        /// The document (bs58check text).
        document_id: String,
        /// An automerge sync message.
        data: Vec<u8>,
    },
    /// The sender does not have the document (and cannot get it).
    DocUnavailable {
        /// The sender's peer id.
        sender_id: String,
        /// The receiver's.
        target_id: String,
        /// The document (bs58check text).
        document_id: String,
    },
    /// A message for the document's other peers that is not stored.
    Ephemeral {
        /// The sender's peer id.
        sender_id: String,
        /// The receiver's.
        target_id: String,
        /// The sender's message counter.
        count: u64,
        /// The sender's session.
        session_id: String,
        /// The document (bs58check text).
        document_id: String,
        /// The payload.
        data: Vec<u8>,
    },
    /// The other end made a protocol error.
    Error {
        /// What went wrong.
        message: String,
    },
    /// A message this side reads and ignores (`remote-subscription-change`,
    /// `remote-heads-changed`, and types a later version adds).
    Other {
        /// Its type.
        kind: String,
    },
}

/// Why bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an automerge-repo message: {0}")]
pub struct DecodeError(String);

fn bad(reason: impl Into<String>) -> DecodeError {
    DecodeError(reason.into())
}

/// A CBOR value as far as messages use them.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Text(String),
    Bytes(Vec<u8>),
    Number(f64),
    Bool(bool),
    Null,
    Array(Vec<Value>),
    Map(BTreeMap<String, Value>),
}

struct Reader<'b> {
    decoder: Decoder<'b>,
    items: usize,
}

impl Reader<'_> {
    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > DEPTH_MAX {
            return Err(bad("nested too deep"));
        }
        let d = &mut self.decoder;
        let cbor = |e: minicbor::decode::Error| bad(e.to_string());
        Ok(match d.datatype().map_err(cbor)? {
            Type::String => Value::Text(d.str().map_err(cbor)?.to_owned()),
            Type::Bytes => Value::Bytes(d.bytes().map_err(cbor)?.to_vec()),
            Type::U8 | Type::U16 | Type::U32 | Type::U64 => {
                Value::Number(d.u64().map_err(cbor)? as f64)
            }
            Type::I8 | Type::I16 | Type::I32 | Type::I64 => {
                Value::Number(d.i64().map_err(cbor)? as f64)
            }
            Type::F32 => Value::Number(f64::from(d.f32().map_err(cbor)?)),
            Type::F64 => Value::Number(d.f64().map_err(cbor)?),
            Type::Bool => Value::Bool(d.bool().map_err(cbor)?),
            Type::Null => {
                d.null().map_err(cbor)?;
                Value::Null
            }
            Type::Undefined => {
                d.undefined().map_err(cbor)?;
                Value::Null
            }
            Type::Array => {
                let len = d
                    .array()
                    .map_err(cbor)?
                    .ok_or_else(|| bad("indefinite array"))?;
                let len = self.take_items(len)?;
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(self.value(depth + 1)?);
                }
                Value::Array(items)
            }
            Type::Map => {
                let len = d
                    .map()
                    .map_err(cbor)?
                    .ok_or_else(|| bad("indefinite map"))?;
                let len = self.take_items(len)?;
                let mut map = BTreeMap::new();
                for _ in 0..len {
                    let Value::Text(key) = self.value(depth + 1)? else {
                        return Err(bad("a map key that is not text"));
                    };
                    let value = self.value(depth + 1)?;
                    map.insert(key, value);
                }
                Value::Map(map)
            }
            other => return Err(bad(format!("unexpected CBOR {other}"))),
        })
    }

    fn take_items(&mut self, len: u64) -> Result<usize, DecodeError> {
        let len = usize::try_from(len).map_err(|_| bad("too many items"))?;
        self.items = self.items.saturating_add(len);
        if self.items > ITEMS_MAX {
            return Err(bad("too many items"));
        }
        Ok(len)
    }
}

/// The fields of a message map, taken by name.
struct Fields(BTreeMap<String, Value>);

impl Fields {
    fn text(&mut self, key: &str) -> Result<String, DecodeError> {
        match self.0.remove(key) {
            Some(Value::Text(text)) => Ok(text),
            Some(_) => Err(bad(format!("{key} is not text"))),
            None => Err(bad(format!("no {key}"))),
        }
    }

    fn bytes(&mut self, key: &str) -> Result<Vec<u8>, DecodeError> {
        match self.0.remove(key) {
            Some(Value::Bytes(bytes)) => Ok(bytes),
            Some(_) => Err(bad(format!("{key} is not bytes"))),
            None => Err(bad(format!("no {key}"))),
        }
    }

    fn count(&mut self, key: &str) -> Result<u64, DecodeError> {
        match self.0.remove(key) {
            Some(Value::Number(n)) if n >= 0.0 && n.fract() == 0.0 && n < 2f64.powi(53) => {
                Ok(n as u64)
            }
            Some(_) => Err(bad(format!("{key} is not a count"))),
            None => Err(bad(format!("no {key}"))),
        }
    }

    fn texts(&mut self, key: &str) -> Result<Vec<String>, DecodeError> {
        match self.0.remove(key) {
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::Text(text) => Ok(text),
                    _ => Err(bad(format!("{key} holds something other than text"))),
                })
                .collect(),
            Some(_) => Err(bad(format!("{key} is not an array"))),
            None => Err(bad(format!("no {key}"))),
        }
    }

    fn metadata(&mut self) -> Result<Option<PeerMetadata>, DecodeError> {
        let value = self
            .0
            .remove("peerMetadata")
            .or_else(|| self.0.remove("metadata"));
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Map(mut map)) => {
                let storage_id = match map.remove("storageId") {
                    Some(Value::Text(id)) => Some(id),
                    None | Some(Value::Null) => None,
                    Some(_) => return Err(bad("storageId is not text")),
                };
                let is_ephemeral = match map.remove("isEphemeral") {
                    Some(Value::Bool(b)) => b,
                    None | Some(Value::Null) => false,
                    Some(_) => return Err(bad("isEphemeral is not a boolean")),
                };
                Ok(Some(PeerMetadata {
                    storage_id,
                    is_ephemeral,
                }))
            }
            Some(_) => Err(bad("peerMetadata is not a map")),
        }
    }
}

impl Message {
    /// Decodes one message; anything that is not a well-formed message of
    /// a known shape is an error (unknown types decode as [`Message::Other`]).
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let mut reader = Reader {
            decoder: Decoder::new(bytes),
            items: 0,
        };
        let Value::Map(map) = reader.value(0)? else {
            return Err(bad("not a map"));
        };
        if reader.decoder.position() != bytes.len() {
            return Err(bad("bytes after the message"));
        }
        let mut f = Fields(map);
        let kind = f.text("type")?;
        Ok(match kind.as_str() {
            "join" => Message::Join {
                sender_id: f.text("senderId")?,
                supported_protocol_versions: match f.0.contains_key("supportedProtocolVersions") {
                    true => f.texts("supportedProtocolVersions")?,
                    // Clients before versions were negotiated speak version 1.
                    false => vec![PROTOCOL_V1.to_owned()],
                },
                metadata: f.metadata()?,
            },
            "peer" => Message::Peer {
                sender_id: f.text("senderId")?,
                target_id: f.text("targetId")?,
                selected_protocol_version: f.text("selectedProtocolVersion")?,
                metadata: f.metadata()?,
            },
            "leave" => Message::Leave {
                sender_id: f.text("senderId")?,
            },
            "request" | "sync" => {
                let (sender_id, target_id) = (f.text("senderId")?, f.text("targetId")?);
                let (document_id, data) = (f.text("documentId")?, f.bytes("data")?);
                if kind == "request" {
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
                }
            }
            "doc-unavailable" => Message::DocUnavailable {
                sender_id: f.text("senderId")?,
                target_id: f.text("targetId")?,
                document_id: f.text("documentId")?,
            },
            "ephemeral" => Message::Ephemeral {
                sender_id: f.text("senderId")?,
                target_id: f.text("targetId")?,
                count: f.count("count")?,
                session_id: f.text("sessionId")?,
                document_id: f.text("documentId")?,
                data: f.bytes("data")?,
            },
            "error" => Message::Error {
                message: f.text("message")?,
            },
            _ => Message::Other { kind },
        })
    }

    /// The message as CBOR, as the JS side writes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new());
        // Writing to a Vec cannot fail.
        let _ = self.encode_into(&mut e);
        e.into_writer()
    }

    fn encode_into(
        &self,
        e: &mut Encoder<Vec<u8>>,
    ) -> Result<(), minicbor::encode::Error<std::convert::Infallible>> {
        let metadata = |e: &mut Encoder<Vec<u8>>, m: &PeerMetadata| {
            e.str("peerMetadata")?;
            e.map(if m.storage_id.is_some() { 2 } else { 1 })?;
            if let Some(id) = &m.storage_id {
                e.str("storageId")?.str(id)?;
            }
            e.str("isEphemeral")?.bool(m.is_ephemeral)?;
            Ok::<_, minicbor::encode::Error<std::convert::Infallible>>(())
        };
        match self {
            Message::Join {
                sender_id,
                supported_protocol_versions,
                metadata: m,
            } => {
                e.map(3 + u64::from(m.is_some()))?;
                e.str("type")?.str("join")?;
                e.str("senderId")?.str(sender_id)?;
                e.str("supportedProtocolVersions")?
                    .array(supported_protocol_versions.len() as u64)?;
                for v in supported_protocol_versions {
                    e.str(v)?;
                }
                if let Some(m) = m {
                    metadata(e, m)?;
                }
            }
            Message::Peer {
                sender_id,
                target_id,
                selected_protocol_version,
                metadata: m,
            } => {
                e.map(4 + u64::from(m.is_some()))?;
                e.str("type")?.str("peer")?;
                e.str("senderId")?.str(sender_id)?;
                e.str("targetId")?.str(target_id)?;
                e.str("selectedProtocolVersion")?
                    .str(selected_protocol_version)?;
                if let Some(m) = m {
                    metadata(e, m)?;
                }
            }
            Message::Leave { sender_id } => {
                e.map(2)?;
                e.str("type")?.str("leave")?;
                e.str("senderId")?.str(sender_id)?;
            }
            Message::Request {
                sender_id,
                target_id,
                document_id,
                data,
            }
            | Message::Sync {
                sender_id,
                target_id,
                document_id,
                data,
            } => {
                let kind = if matches!(self, Message::Request { .. }) {
                    "request"
                } else {
                    "sync"
                };
                e.map(5)?;
                e.str("type")?.str(kind)?;
                e.str("senderId")?.str(sender_id)?;
                e.str("targetId")?.str(target_id)?;
                e.str("documentId")?.str(document_id)?;
                e.str("data")?.bytes(data)?;
            }
            Message::DocUnavailable {
                sender_id,
                target_id,
                document_id,
            } => {
                e.map(4)?;
                e.str("type")?.str("doc-unavailable")?;
                e.str("senderId")?.str(sender_id)?;
                e.str("targetId")?.str(target_id)?;
                e.str("documentId")?.str(document_id)?;
            }
            Message::Ephemeral {
                sender_id,
                target_id,
                count,
                session_id,
                document_id,
                data,
            } => {
                e.map(7)?;
                e.str("type")?.str("ephemeral")?;
                e.str("senderId")?.str(sender_id)?;
                e.str("targetId")?.str(target_id)?;
                e.str("count")?.u64(*count)?;
                e.str("sessionId")?.str(session_id)?;
                e.str("documentId")?.str(document_id)?;
                e.str("data")?.bytes(data)?;
            }
            Message::Error { message } => {
                e.map(2)?;
                e.str("type")?.str("error")?;
                e.str("message")?.str(message)?;
            }
            Message::Other { kind } => {
                e.map(1)?;
                e.str("type")?.str(kind)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Message> {
        let (a, b) = ("client-1".to_owned(), "site-a".to_owned());
        vec![
            Message::Join {
                sender_id: a.clone(),
                supported_protocol_versions: vec!["1".into()],
                metadata: Some(PeerMetadata {
                    storage_id: None,
                    is_ephemeral: true,
                }),
            },
            Message::Peer {
                sender_id: b.clone(),
                target_id: a.clone(),
                selected_protocol_version: "1".into(),
                metadata: Some(PeerMetadata {
                    storage_id: Some("0a1b".into()),
                    is_ephemeral: false,
                }),
            },
            Message::Leave {
                sender_id: a.clone(),
            },
            Message::Request {
                sender_id: a.clone(),
                target_id: b.clone(),
                document_id: "doc".into(),
                data: vec![0x42, 1],
            },
            Message::Sync {
                sender_id: b.clone(),
                target_id: a.clone(),
                document_id: "doc".into(),
                data: vec![0x42, 2],
            },
            Message::DocUnavailable {
                sender_id: b.clone(),
                target_id: a.clone(),
                document_id: "doc".into(),
            },
            Message::Ephemeral {
                sender_id: a.clone(),
                target_id: b,
                count: 7,
                session_id: "s".into(),
                document_id: "doc".into(),
                data: vec![1],
            },
            Message::Error {
                message: "no".into(),
            },
            Message::Other {
                kind: "remote-heads-changed".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for message in every_kind() {
            assert_eq!(Message::decode(&message.encode()), Ok(message));
        }
    }

    #[test]
    fn malformed_messages_are_refused_not_panicked_on() {
        let sync = every_kind()[4].encode();
        // Every truncation of a valid message.
        for end in 0..sync.len() {
            assert!(Message::decode(&sync[..end]).is_err(), "cut at {end}");
        }
        // Trailing bytes, wrong types, missing fields, deep nesting.
        let mut trailing = sync.clone();
        trailing.push(0);
        assert!(Message::decode(&trailing).is_err());
        let encode = |f: &dyn Fn(&mut Encoder<Vec<u8>>)| {
            let mut e = Encoder::new(Vec::new());
            f(&mut e);
            e.into_writer()
        };
        let no_data = encode(&|e| {
            e.map(4).unwrap();
            e.str("type").unwrap().str("sync").unwrap();
            e.str("senderId").unwrap().str("a").unwrap();
            e.str("targetId").unwrap().str("b").unwrap();
            e.str("documentId").unwrap().str("d").unwrap();
        });
        assert_eq!(Message::decode(&no_data), Err(bad("no data")));
        let text_data = encode(&|e| {
            e.map(2).unwrap();
            e.str("type").unwrap().str("error").unwrap();
            e.str("message").unwrap().bytes(b"x").unwrap();
        });
        assert_eq!(Message::decode(&text_data), Err(bad("message is not text")));
        let deep = encode(&|e| {
            for _ in 0..20 {
                e.array(1).unwrap();
            }
            e.u8(1).unwrap();
        });
        assert!(Message::decode(&deep).is_err());
        let huge = encode(&|e| {
            e.array(u64::MAX).unwrap();
        });
        assert!(Message::decode(&huge).is_err());
        assert!(Message::decode(&[0xff; 64]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = Message::decode(&bytes);
        }
    }
}
