//! The sync protocol's wire format: length-prefixed, versioned frames
//! carrying one [`Message`] each, with hard limits checked on decode.
//!
//! A frame is `u32` big-endian payload length, then the payload: one byte of
//! wire version followed by the postcard encoding of a [`Message`]. Decoding
//! never panics and never allocates more than the frame limit for one frame;
//! anything malformed is a [`WireError`] that closes the session.
//!
//! A *bundle* is a frame whose version byte is [`WIRE_BUNDLE`]: the rest is
//! the raw DEFLATE compression of whole frames laid end to end, at most
//! [`BUNDLE_BYTES_MAX`] of them once inflated. A sender bundles frames that
//! queued together once the peer's [`Message::Hello`] announced
//! [`capabilities::BUNDLES`]: ten changed documents caught up after a
//! reconnect repeat the same actor, document id prefix and column layout,
//! and one bundle carries them in little more than half the bytes.

use serde::{Deserialize, Serialize};

use super::reconcile::RangeMessage;
use crate::id::{DocId, SiteName};

/// The wire version written in every frame.
pub const WIRE_VERSION: u8 = 1;
/// The version byte of a bundle of compressed frames.
pub const WIRE_BUNDLE: u8 = 2;
/// Most bytes of frames (length prefixes included) in one bundle once
/// inflated; a receiver refuses a bundle that inflates to more. DEFLATE
/// looks back 32 KiB at most, so larger bundles would compress no better;
/// a larger frame travels alone, as it is.
pub const BUNDLE_BYTES_MAX: usize = 64 << 10;
/// Frames queued together that are shorter than this in all are sent as
/// they are: compression would save a few bytes at best.
pub const BUNDLE_COMPRESS_BYTES_MIN: usize = 256;
/// The protocol version announced in [`Message::Hello`].
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest frame payload accepted, in bytes.
pub const FRAME_BYTES_MAX: usize = 8 << 20;
/// Catch-up and live batches are cut to stay under this many bytes of
/// changes per message (a single larger change travels alone).
pub const MESSAGE_CHANGE_BYTES_TARGET: usize = 1 << 20;
/// Most changes in one [`Message::Changes`].
pub const CHANGES_PER_MESSAGE_MAX: usize = 16_384;
/// Most hashes in one heads, sample or base list.
pub const HASHES_PER_MESSAGE_MAX: usize = 4096;
/// Longest reason text in [`Message::Close`].
pub const REASON_BYTES_MAX: usize = 1024;

/// A change hash on the wire.
pub type Hash = [u8; 32];

/// Capability bits announced in [`Message::Hello`].
pub mod capabilities {
    /// Range-based set reconciliation of the document index.
    pub const RANGE_RECONCILE: u64 = 1;
    /// The sender accepts bundles of compressed frames ([`super::WIRE_BUNDLE`]).
    pub const BUNDLES: u64 = 1 << 1;
    /// The sender understands [`super::Message::TxnAsk`] and
    /// [`super::Message::TxnNone`] (changes held for their transaction).
    pub const TXN_ASK: u64 = 1 << 2;
    /// The sender understands [`super::Message::RightsAsk`] (requests for
    /// rights of bounded counters).
    pub const ESCROW: u64 = 1 << 3;
}

/// Longest pointer in a [`Message::RightsAsk`], in bytes.
pub const RIGHTS_POINTER_BYTES_MAX: usize = 4096;

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message on a session, both ways.
    Hello {
        /// [`PROTOCOL_VERSION`] of the sender.
        version: u16,
        /// The sender's site.
        site: SiteName,
        /// Bits of [`capabilities`].
        capabilities: u64,
    },
    /// A round of set reconciliation over `(doc id, heads)`.
    Reconcile(RangeMessage),
    /// Reconciliation finished on the sender's side.
    ReconcileDone,
    /// The sender's heads of a document (empty: it has none). With `reply`
    /// the receiver answers with its own heads when it lacks some of these.
    Have {
        /// The document.
        doc: DocId,
        /// The sender's heads.
        heads: Vec<Hash>,
        /// True when this answers a `Have`: never answered with another.
        reply: bool,
    },
    /// Hashes spread over the sender's recent history, newest first, sent
    /// when both sides hold changes the other lacks: the receiver finds the
    /// newest it knows to use as a common base.
    Sample {
        /// The document.
        doc: DocId,
        /// The sampled hashes.
        hashes: Vec<Hash>,
    },
    /// The common base found from a [`Message::Sample`]: the receiver sends
    /// its changes after these.
    Base {
        /// The document.
        doc: DocId,
        /// Hashes both sides hold.
        hashes: Vec<Hash>,
    },
    /// Encoded automerge changes of one document, in causal order.
    Changes {
        /// The document.
        doc: DocId,
        /// The changes.
        changes: Vec<Vec<u8>>,
        /// Sequence number of this batch on the session, for [`Message::Ack`].
        batch: u64,
    },
    /// A whole document in automerge's saved form, sent to a peer that holds
    /// none of it: far cheaper to produce and apply than its changes one by
    /// one. The receiver verifies it (automerge checks the heads against the
    /// contents) before storing it.
    Snapshot {
        /// The document.
        doc: DocId,
        /// `save()` bytes.
        bytes: Vec<u8>,
        /// Sequence number of this batch on the session, for [`Message::Ack`].
        batch: u64,
    },
    /// Every batch up to and including `batch` was applied durably (or
    /// refused, with an event at the receiver).
    Ack {
        /// The highest batch handled.
        batch: u64,
    },
    /// The sender closes the session.
    Close {
        /// A [`close_code`].
        code: u16,
        /// Why.
        reason: String,
    },
    /// The sender holds back changes of transaction `txn` received on this
    /// session, waiting for its members in `docs`: it asks which of them
    /// the receiver will never send it.
    TxnAsk {
        /// The transaction.
        txn: [u8; 16],
        /// The members still missing.
        docs: Vec<DocId>,
    },
    /// The answer to a [`Message::TxnAsk`]: the members among those asked
    /// about that the sender never sends the receiver (outside what it
    /// replicates, or what it sends that peer). Members it may send are
    /// not listed: they arrive with reconciliation like any change.
    TxnNone {
        /// The transaction.
        txn: [u8; 16],
        /// The members that will not come from the sender.
        docs: Vec<DocId>,
    },
    /// The sender needs `amount` rights of a bounded counter: the receiver
    /// grants what its policy lets it spare, as an ordinary change (which
    /// reaches the sender with replication), or nothing.
    RightsAsk {
        /// The document.
        doc: DocId,
        /// The counter's pointer.
        pointer: String,
        /// Which rights: 0 to decrement, 1 to increment.
        pool: u8,
        /// How many.
        amount: i64,
    },
}

/// Codes of [`Message::Close`].
pub mod close_code {
    /// Orderly shutdown.
    pub const NORMAL: u16 = 0;
    /// The peer broke the protocol (malformed or unexpected message).
    pub const PROTOCOL_ERROR: u16 = 1;
    /// Incompatible protocol version.
    pub const VERSION: u16 = 2;
    /// The peer is not who it must be.
    pub const IDENTITY: u16 = 3;
    /// A local failure (storage).
    pub const INTERNAL: u16 = 4;
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The length prefix exceeds [`FRAME_BYTES_MAX`].
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    /// An empty frame.
    #[error("empty frame")]
    EmptyFrame,
    /// The frame's wire version is not ours.
    #[error("unsupported wire version {0}")]
    Version(u8),
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message exceeds a per-message limit.
    #[error("message over a limit: {0}")]
    OverLimit(&'static str),
}

impl Message {
    /// Checks per-message limits that the encoding alone does not bound.
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Message::Have { heads: hashes, .. }
            | Message::Sample { hashes, .. }
            | Message::Base { hashes, .. } => {
                if hashes.len() > HASHES_PER_MESSAGE_MAX {
                    return Err(WireError::OverLimit("hashes per message"));
                }
            }
            Message::Changes { changes, .. } => {
                if changes.len() > CHANGES_PER_MESSAGE_MAX {
                    return Err(WireError::OverLimit("changes per message"));
                }
                if changes.iter().any(Vec::is_empty) {
                    return Err(WireError::Malformed("empty change".into()));
                }
            }
            Message::Snapshot { bytes, .. } => {
                if bytes.is_empty() {
                    return Err(WireError::Malformed("empty snapshot".into()));
                }
            }
            Message::Close { reason, .. } => {
                if reason.len() > REASON_BYTES_MAX {
                    return Err(WireError::OverLimit("close reason"));
                }
            }
            Message::TxnAsk { docs, .. } | Message::TxnNone { docs, .. } => {
                if docs.len() > crate::txn::TXN_DOCS_MAX {
                    return Err(WireError::OverLimit("documents of a transaction"));
                }
            }
            Message::RightsAsk {
                pointer,
                pool,
                amount,
                ..
            } => {
                if pointer.len() > RIGHTS_POINTER_BYTES_MAX {
                    return Err(WireError::OverLimit("pointer of a rights request"));
                }
                if *pool > 1 || *amount <= 0 {
                    return Err(WireError::Malformed("rights request".into()));
                }
            }
            Message::Hello { .. }
            | Message::Reconcile(_)
            | Message::ReconcileDone
            | Message::Ack { .. } => {}
        }
        Ok(())
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Reconcile(_) => "reconcile",
            Message::ReconcileDone => "reconcile_done",
            Message::Have { .. } => "have",
            Message::Sample { .. } => "sample",
            Message::Base { .. } => "base",
            Message::Changes { .. } => "changes",
            Message::Snapshot { .. } => "snapshot",
            Message::Ack { .. } => "ack",
            Message::Close { .. } => "close",
            Message::TxnAsk { .. } => "txn_ask",
            Message::TxnNone { .. } => "txn_none",
            Message::RightsAsk { .. } => "rights_ask",
        }
    }
}

/// Encodes one message as a frame.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut frame = vec![0u8; 4];
    frame.push(WIRE_VERSION);
    // Writing into a Vec cannot fail, and every Message is serializable.
    let frame = postcard::to_extend(message, frame).expect("encoding into a Vec cannot fail");
    let len = u32::try_from(frame.len() - 4).expect("frames stay far below 4 GiB");
    let mut frame = frame;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame
}

/// Decodes one frame payload (without its length prefix).
pub fn decode_payload(payload: &[u8]) -> Result<Message, WireError> {
    let (&version, body) = payload.split_first().ok_or(WireError::EmptyFrame)?;
    if version != WIRE_VERSION {
        return Err(WireError::Version(version));
    }
    let message: Message =
        postcard::from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    message.validate()?;
    Ok(message)
}

/// Compresses `frames` (each a whole frame as [`encode`] makes it) into one
/// bundle frame. The frames must total at most [`BUNDLE_BYTES_MAX`] bytes.
/// Frames that do not compress come out a few bytes longer (DEFLATE stores
/// them as they are), which is why only frames queued together that total
/// at least [`BUNDLE_COMPRESS_BYTES_MIN`] are bundled.
pub fn bundle<F: AsRef<[u8]>>(frames: &[F]) -> Vec<u8> {
    let raw: usize = frames.iter().map(|f| f.as_ref().len()).sum();
    debug_assert!(raw <= BUNDLE_BYTES_MAX, "bundles stay under their limit");
    // Fast compression: the gain is in repeats across frames, and it must
    // not slow a bulk catch-up down.
    let mut deflate = flate2::Compress::new(flate2::Compression::fast(), false);
    let mut out = Vec::with_capacity(5 + raw / 2);
    out.extend_from_slice(&[0; 4]);
    out.push(WIRE_BUNDLE);
    for (n, frame) in frames.iter().enumerate() {
        let last = n + 1 == frames.len();
        let flush = if last {
            flate2::FlushCompress::Finish
        } else {
            flate2::FlushCompress::None
        };
        let mut input = frame.as_ref();
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.len());
            }
            let before = deflate.total_in();
            let status = deflate
                .compress_vec(input, &mut out, flush)
                .expect("compressing into a growing buffer cannot fail");
            let consumed = (deflate.total_in() - before) as usize;
            input = &input[consumed..];
            let done = if last {
                status == flate2::Status::StreamEnd
            } else {
                input.is_empty()
            };
            if done {
                break;
            }
        }
    }
    let len = u32::try_from(out.len() - 4).expect("bundles stay far below 4 GiB");
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Inflates a bundle's payload (version byte included) into the frames it
/// holds, laid end to end; refuses more than [`BUNDLE_BYTES_MAX`] bytes.
pub fn unbundle(payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let (&version, body) = payload.split_first().ok_or(WireError::EmptyFrame)?;
    if version != WIRE_BUNDLE {
        return Err(WireError::Version(version));
    }
    let mut inflate = flate2::Decompress::new(false);
    let mut out = Vec::new();
    let mut input = body;
    loop {
        if out.len() == out.capacity() {
            if out.len() > BUNDLE_BYTES_MAX {
                return Err(WireError::OverLimit("bundle bytes"));
            }
            // One byte past the limit tells "exactly full" from "more".
            let room = (BUNDLE_BYTES_MAX + 1 - out.len()).min(out.len().max(4096));
            out.reserve_exact(room);
        }
        let (before, produced_before) = (inflate.total_in(), out.len());
        let status = inflate
            .decompress_vec(input, &mut out, flate2::FlushDecompress::None)
            .map_err(|e| WireError::Malformed(format!("bundle: {e}")))?;
        let consumed = usize::try_from(inflate.total_in() - before)
            .map_err(|_| WireError::Malformed("bundle: input count".into()))?;
        input = &input[consumed..];
        if out.len() > BUNDLE_BYTES_MAX {
            return Err(WireError::OverLimit("bundle bytes"));
        }
        match status {
            flate2::Status::StreamEnd if input.is_empty() => return Ok(out),
            flate2::Status::StreamEnd => {
                return Err(WireError::Malformed("bundle: bytes after its end".into()))
            }
            // Room to write and nothing more came: the stream stops short.
            _ if consumed == 0 && out.len() == produced_before && out.len() < out.capacity() => {
                return Err(WireError::Malformed("bundle: truncated".into()))
            }
            _ => {}
        }
    }
}

/// The payloads of the frames laid end to end in `bytes` (an unbundled
/// bundle), each checked to be a plain frame: bundles do not nest.
pub fn frames_in(bytes: &[u8]) -> impl Iterator<Item = Result<&[u8], WireError>> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some((prefix, after)) = rest.split_first_chunk::<4>() else {
            rest = &[];
            return Some(Err(WireError::Malformed("bundle: cut frame".into())));
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len == 0 || len > after.len() {
            rest = &[];
            return Some(Err(WireError::Malformed("bundle: cut frame".into())));
        }
        let (payload, tail) = after.split_at(len);
        rest = tail;
        if payload[0] == WIRE_BUNDLE {
            rest = &[];
            return Some(Err(WireError::Malformed("bundle inside a bundle".into())));
        }
        Some(Ok(payload))
    })
}

/// Splits a byte stream into frames, enforcing [`FRAME_BYTES_MAX`] before
/// buffering a frame, and opens bundles.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    /// Messages of an opened bundle not yet returned.
    unbundled: std::collections::VecDeque<Message>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The next complete message, `None` when more bytes are needed. After an
    /// error the stream is unusable.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        // A loop, not recursion: a peer may send any number of empty bundles.
        loop {
            if let Some(message) = self.unbundled.pop_front() {
                return Ok(Some(message));
            }
            let Some(prefix) = self.buffer.get(..4) else {
                return Ok(None);
            };
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            if len > FRAME_BYTES_MAX {
                return Err(WireError::FrameTooLarge(len));
            }
            if self.buffer.len() < 4 + len {
                return Ok(None);
            }
            let payload = &self.buffer[4..4 + len];
            if payload.first() != Some(&WIRE_BUNDLE) {
                let message = decode_payload(payload);
                self.buffer.drain(..4 + len);
                return message.map(Some);
            }
            let frames = unbundle(payload)?;
            self.buffer.drain(..4 + len);
            for payload in frames_in(&frames) {
                self.unbundled.push_back(decode_payload(payload?)?);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message() -> impl Strategy<Value = Message> {
        let doc = "[a-z]{1,6}(/[a-z0-9]{1,4}){0,2}"
            .prop_map(|s| DocId::new(&s).expect("pattern is a valid id"));
        let hashes = proptest::collection::vec(any::<[u8; 32]>(), 0..4);
        prop_oneof![
            (any::<u16>(), "[a-z]{1,10}", any::<u64>()).prop_map(
                |(version, site, capabilities)| {
                    Message::Hello {
                        version,
                        site: SiteName::new(&site).expect("valid"),
                        capabilities,
                    }
                }
            ),
            Just(Message::ReconcileDone),
            (doc.clone(), hashes.clone(), any::<bool>())
                .prop_map(|(doc, heads, reply)| Message::Have { doc, heads, reply }),
            (doc.clone(), hashes.clone()).prop_map(|(doc, hashes)| Message::Sample { doc, hashes }),
            (doc.clone(), hashes).prop_map(|(doc, hashes)| Message::Base { doc, hashes }),
            (
                doc,
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..4),
                any::<u64>()
            )
                .prop_map(|(doc, changes, batch)| Message::Changes {
                    doc,
                    changes,
                    batch
                }),
            (proptest::collection::vec(any::<u8>(), 1..40), any::<u64>()).prop_map(
                |(bytes, batch)| Message::Snapshot {
                    doc: DocId::new("snap").expect("valid"),
                    bytes,
                    batch
                }
            ),
            any::<u64>().prop_map(|batch| Message::Ack { batch }),
            (any::<u16>(), "[ -~]{0,20}")
                .prop_map(|(code, reason)| Message::Close { code, reason }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip_through_a_split_stream(messages in proptest::collection::vec(message(), 1..8), split in 1usize..64) {
            let bytes: Vec<u8> = messages.iter().flat_map(encode).collect();
            let mut decoder = FrameDecoder::new();
            let mut out = Vec::new();
            for chunk in bytes.chunks(split) {
                decoder.push(chunk);
                while let Some(m) = decoder.next_message().unwrap() {
                    out.push(m);
                }
            }
            prop_assert_eq!(out, messages);
            prop_assert_eq!(decoder.buffered(), 0);
        }

        #[test]
        fn bundles_carry_their_frames_unchanged(
            before in proptest::collection::vec(message(), 0..3),
            bundled in proptest::collection::vec(message(), 1..12),
            after in proptest::collection::vec(message(), 0..3),
            split in 1usize..200,
        ) {
            let mut stream = Vec::new();
            for m in &before {
                stream.extend(encode(m));
            }
            let frames: Vec<Vec<u8>> = bundled.iter().map(encode).collect();
            let bundle = bundle(&frames);
            prop_assert_eq!(bundle[4], WIRE_BUNDLE);
            prop_assert_eq!(unbundle(&bundle[4..]).unwrap(), frames.concat());
            stream.extend(&bundle);
            for m in &after {
                stream.extend(encode(m));
            }
            let mut decoder = FrameDecoder::new();
            let mut out = Vec::new();
            for chunk in stream.chunks(split) {
                decoder.push(chunk);
                while let Some(m) = decoder.next_message().unwrap() {
                    out.push(m);
                }
            }
            let expected: Vec<Message> = before.into_iter().chain(bundled).chain(after).collect();
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn arbitrary_bundles_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut deflate = flate2::Compress::new(flate2::Compression::fast(), false);
            let mut payload = vec![WIRE_BUNDLE];
            payload.reserve(bytes.len() + 64);
            deflate.compress_vec(&bytes, &mut payload, flate2::FlushCompress::Finish).unwrap();
            if let Ok(frames) = unbundle(&payload) {
                prop_assert_eq!(&frames, &bytes);
                for payload in frames_in(&frames).flatten() {
                    let _ = decode_payload(payload);
                }
            }
            let _ = unbundle(&bytes);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes);
            for _ in 0..8 {
                match decoder.next_message() {
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            let _ = decode_payload(&bytes);
        }
    }

    /// A raw DEFLATE stream of `bytes`, as a bundle payload.
    fn deflated(bytes: &[u8]) -> Vec<u8> {
        let mut deflate = flate2::Compress::new(flate2::Compression::fast(), false);
        let mut payload = vec![WIRE_BUNDLE];
        payload.reserve(bytes.len() / 2 + 1024);
        let status = deflate
            .compress_vec(bytes, &mut payload, flate2::FlushCompress::Finish)
            .unwrap();
        assert_eq!(status, flate2::Status::StreamEnd);
        payload
    }

    #[test]
    fn a_bundle_that_inflates_past_its_limit_is_refused() {
        // A small payload that would inflate to more than the limit.
        let bomb = deflated(&vec![0; BUNDLE_BYTES_MAX + 1]);
        assert!(bomb.len() * 50 < BUNDLE_BYTES_MAX, "{}", bomb.len());
        assert_eq!(unbundle(&bomb), Err(WireError::OverLimit("bundle bytes")));
        // Exactly at the limit is accepted.
        let full = deflated(&vec![0; BUNDLE_BYTES_MAX]);
        assert_eq!(unbundle(&full).map(|b| b.len()), Ok(BUNDLE_BYTES_MAX));
    }

    #[test]
    fn any_number_of_empty_bundles_decodes() {
        let empty = deflated(&[]);
        let mut frame = (empty.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&empty);
        let mut decoder = FrameDecoder::new();
        for _ in 0..200_000 {
            decoder.push(&frame);
        }
        decoder.push(&encode(&Message::ReconcileDone));
        assert_eq!(decoder.next_message(), Ok(Some(Message::ReconcileDone)));
        assert_eq!(decoder.next_message(), Ok(None));
    }

    #[test]
    fn broken_bundles_are_refused() {
        let frames = [
            encode(&Message::ReconcileDone),
            encode(&Message::Ack { batch: 7 }),
        ];
        let good = bundle(&frames);
        let payload = &good[4..];
        // Cut short.
        assert!(matches!(
            unbundle(&payload[..payload.len() - 2]),
            Err(WireError::Malformed(_))
        ));
        // Bytes after the end of the stream.
        let mut longer = payload.to_vec();
        longer.push(0);
        assert!(matches!(unbundle(&longer), Err(WireError::Malformed(_))));
        // Not a DEFLATE stream at all.
        assert!(matches!(
            unbundle(&[WIRE_BUNDLE, 0xff, 0xff, 0xff]),
            Err(WireError::Malformed(_))
        ));
        // A bundle inside a bundle.
        let nested = bundle(&[good]);
        let inner = unbundle(&nested[4..]).unwrap();
        assert!(matches!(
            frames_in(&inner).next(),
            Some(Err(WireError::Malformed(_)))
        ));
        let mut decoder = FrameDecoder::new();
        decoder.push(&nested);
        assert!(matches!(
            decoder.next_message(),
            Err(WireError::Malformed(_))
        ));
        // A frame cut inside the bundle.
        let cut = deflated(&frames.concat()[..9]);
        let inner = unbundle(&cut).unwrap();
        let parsed: Vec<_> = frames_in(&inner).collect();
        assert!(matches!(parsed.last(), Some(Err(WireError::Malformed(_)))));
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&u32::MAX.to_be_bytes());
        assert_eq!(
            decoder.next_message(),
            Err(WireError::FrameTooLarge(u32::MAX as usize))
        );
    }

    #[test]
    fn invalid_ids_and_versions_are_refused() {
        let mut frame = encode(&Message::Have {
            doc: DocId::new("ok").unwrap(),
            heads: vec![],
            reply: false,
        });
        // Corrupt the id's first byte into a space.
        let at = frame.iter().rposition(|&b| b == b'o').unwrap();
        frame[at] = b' ';
        assert!(matches!(
            decode_payload(&frame[4..]),
            Err(WireError::Malformed(_))
        ));
        let mut frame = encode(&Message::ReconcileDone);
        frame[4] = 99;
        assert_eq!(decode_payload(&frame[4..]), Err(WireError::Version(99)));
    }

    #[test]
    fn too_many_hashes_are_refused() {
        let doc = DocId::new("d").unwrap();
        let frame = encode(&Message::Sample {
            doc,
            hashes: vec![[0; 32]; HASHES_PER_MESSAGE_MAX + 1],
        });
        assert_eq!(
            decode_payload(&frame[4..]),
            Err(WireError::OverLimit("hashes per message"))
        );
    }
}
