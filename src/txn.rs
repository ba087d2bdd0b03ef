//! Transactions across documents: what a caller asks for ([`Txn`]), what it
//! gets back ([`TxnCommit`]), and how a transaction is recorded in the
//! automerge changes it makes, so every site can tell them apart.
//!
//! A transaction makes one automerge change per document it writes, all in
//! one durable store write. Each of those changes carries the transaction in
//! its message: a header line naming the transaction id and every document
//! the transaction changed (its *members*), then the caller's message:
//!
//! ```text
//! archipelago-txn/1 5f0c9e3a81d24b7e9c1a0f3d2b6e4a17 inventory/sku-1 orders/1
//! take order 1
//! ```
//!
//! The header travels inside the change (automerge hashes the message with
//! the rest), however the change reaches a site: pushed live, in a catch-up,
//! relayed by a third site, or inside a whole document. A site that receives
//! one member holds it back until it has the other members it replicates,
//! then applies them together (see `ARCHITECTURE.md`, "Transactions").

use std::fmt;
use std::str::FromStr;

use automerge::ChangeHash;

use crate::doc::Op;
use crate::id::DocId;
use crate::replica::Commit;

/// Most documents one transaction may touch.
pub const TXN_DOCS_MAX: usize = 256;

/// Most bytes of member document ids (with one separator each) a
/// transaction's header may carry; every member change carries it.
pub const TXN_MEMBER_BYTES_MAX: usize = 32 << 10;

/// What starts the message of a change that belongs to a transaction.
pub const TXN_HEADER_PREFIX: &str = "archipelago-txn/1 ";

/// What no caller's commit message may start with: the transaction
/// headers of this and later versions.
pub const TXN_RESERVED_PREFIX: &str = "archipelago-txn/";

/// The id of a transaction: 16 bytes, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId(pub [u8; 16]);

impl TxnId {
    /// A fresh id. Unique as long as `actor` is (every replica writes with
    /// a fresh actor) and `counter` does not repeat for it.
    pub fn derive(actor: &automerge::ActorId, counter: u64) -> TxnId {
        use sha2::{Digest as _, Sha256};
        let mut hasher = Sha256::new();
        hasher.update(b"archipelago txn id\0");
        hasher.update(actor.to_bytes());
        hasher.update(counter.to_be_bytes());
        let digest = hasher.finalize();
        let mut id = [0; 16];
        id.copy_from_slice(&digest[..16]);
        TxnId(id)
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TxnId({self})")
    }
}

impl FromStr for TxnId {
    type Err = String;

    fn from_str(text: &str) -> Result<TxnId, String> {
        let mut id = [0; 16];
        if text.len() != 32 || text.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!("{text:?} is not a transaction id (32 hex digits)"));
        }
        hex::decode_to_slice(text, &mut id)
            .map_err(|_| format!("{text:?} is not a transaction id (32 hex digits)"))?;
        Ok(TxnId(id))
    }
}

impl serde::Serialize for TxnId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TxnId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TxnId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The transaction of a change, read from its message (`None` for a
/// change outside any transaction).
pub fn txn_of_message(message: Option<&str>) -> Option<TxnId> {
    message
        .and_then(TxnHeader::parse)
        .map(|(header, _)| header.id)
}

/// The transaction a change belongs to, as its message records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnHeader {
    /// The transaction.
    pub id: TxnId,
    /// Every document the transaction changed, in id order.
    pub members: Vec<DocId>,
}

impl TxnHeader {
    /// The change message for a member change: the header line, then the
    /// caller's message when there is one.
    pub fn message(&self, user: Option<&str>) -> String {
        let mut text = String::with_capacity(
            TXN_HEADER_PREFIX.len()
                + 33
                + self
                    .members
                    .iter()
                    .map(|m| m.as_str().len() + 1)
                    .sum::<usize>(),
        );
        text.push_str(TXN_HEADER_PREFIX);
        text.push_str(&self.id.to_string());
        for member in &self.members {
            text.push(' ');
            text.push_str(member.as_str());
        }
        if let Some(user) = user {
            text.push('\n');
            text.push_str(user);
        }
        text
    }

    /// Reads the header of a change message, and the caller's message after
    /// it. `None` when the message carries no header, or one that does not
    /// parse (such a change is treated as not part of a transaction).
    pub fn parse(message: &str) -> Option<(TxnHeader, Option<&str>)> {
        let rest = message.strip_prefix(TXN_HEADER_PREFIX)?;
        let (line, user) = match rest.split_once('\n') {
            Some((line, user)) => (line, Some(user)),
            None => (rest, None),
        };
        if line.len() > 33 + TXN_MEMBER_BYTES_MAX {
            return None;
        }
        let mut words = line.split(' ');
        let id: TxnId = words.next()?.parse().ok()?;
        let members = words
            .map(|word| word.parse::<DocId>().ok())
            .collect::<Option<Vec<DocId>>>()?;
        let sorted = members.windows(2).all(|pair| pair[0] < pair[1]);
        if members.is_empty() || members.len() > TXN_DOCS_MAX || !sorted {
            return None;
        }
        Some((TxnHeader { id, members }, user))
    }
}

/// The caller's part of a change message: the message without a
/// transaction header.
pub fn user_message(message: &str) -> Option<&str> {
    match TxnHeader::parse(message) {
        Some((_, user)) => user,
        None => Some(message),
    }
}

/// What must hold of a document for a write to go ahead; checked under the
/// document's lock, so nothing changes it between the check and the write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Precondition {
    /// The document is still at exactly these heads (in any order): it has
    /// not changed since the caller read it. Empty heads mean the document
    /// does not exist or is empty.
    pub if_heads: Option<Vec<ChangeHash>>,
    /// The document does not exist yet.
    pub if_absent: bool,
}

impl Precondition {
    /// No condition.
    pub fn none() -> Precondition {
        Precondition::default()
    }

    /// The document does not exist yet.
    pub fn if_absent() -> Precondition {
        Precondition {
            if_heads: None,
            if_absent: true,
        }
    }

    /// The document is still at `heads`.
    pub fn if_heads(heads: Vec<ChangeHash>) -> Precondition {
        Precondition {
            if_heads: Some(heads),
            if_absent: false,
        }
    }

    /// Why the condition fails for a document that `exists` at `heads`, or
    /// `None` when it holds.
    pub(crate) fn failure(&self, exists: bool, heads: &[ChangeHash]) -> Option<String> {
        if self.if_absent && exists {
            return Some("the document exists".to_owned());
        }
        if let Some(expected) = &self.if_heads {
            let mut want = expected.clone();
            want.sort_unstable();
            want.dedup();
            let mut have = heads.to_vec();
            have.sort_unstable();
            if want != have {
                let list = |hashes: &[ChangeHash]| {
                    if hashes.is_empty() {
                        "none".to_owned()
                    } else {
                        hashes
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                };
                return Some(format!(
                    "the document is at heads {}, not {}",
                    list(&have),
                    list(&want)
                ));
            }
        }
        None
    }
}

/// One document's part of a transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct TxnDoc {
    /// The document (created if it does not exist).
    pub id: DocId,
    /// Ops applied to it as one change. With none, the document is only
    /// checked against its precondition (a read the transaction depends
    /// on) and gets no change.
    pub ops: Vec<Op>,
    /// What must hold of it.
    pub precondition: Precondition,
}

/// Ops over several documents, committed together.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Txn {
    /// The documents, each at most once; at most [`TXN_DOCS_MAX`].
    pub docs: Vec<TxnDoc>,
    /// A message recorded in every change of the transaction.
    pub message: Option<String>,
}

/// A committed transaction.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TxnCommit {
    /// Its id.
    pub txn: TxnId,
    /// Every document of the transaction in the order given, with its heads
    /// afterwards and its new change (`None` for a document only checked).
    pub docs: Vec<(DocId, Commit)>,
}

/// Why a transaction was refused before anything was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TxnError {
    /// No documents.
    #[error("a transaction needs at least one document")]
    Empty,
    /// Too many documents.
    #[error("a transaction touches at most {TXN_DOCS_MAX} documents, not {0}")]
    TooManyDocs(usize),
    /// A document is listed twice.
    #[error("document {0} is listed twice")]
    Duplicate(DocId),
    /// The member ids do not fit the header.
    #[error("the ids of the documents a transaction changes total at most {TXN_MEMBER_BYTES_MAX} bytes, not {0}")]
    MembersTooLong(usize),
    /// Nothing would change: no document has ops.
    #[error("no document of the transaction has ops")]
    NoOps,
    /// The caller's message would read as a transaction header.
    #[error("a commit message may not start with {TXN_RESERVED_PREFIX:?}")]
    ReservedMessage,
}

impl Txn {
    /// Checks the shape of the transaction; returns the members (documents
    /// with ops) in id order.
    pub fn check(&self) -> Result<Vec<DocId>, TxnError> {
        if self.docs.is_empty() {
            return Err(TxnError::Empty);
        }
        if self.docs.len() > TXN_DOCS_MAX {
            return Err(TxnError::TooManyDocs(self.docs.len()));
        }
        let mut ids: Vec<&DocId> = self.docs.iter().map(|d| &d.id).collect();
        ids.sort_unstable();
        if let Some(pair) = ids.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(TxnError::Duplicate(pair[0].clone()));
        }
        check_message(self.message.as_deref())?;
        let mut members: Vec<DocId> = self
            .docs
            .iter()
            .filter(|d| !d.ops.is_empty())
            .map(|d| d.id.clone())
            .collect();
        if members.is_empty() {
            return Err(TxnError::NoOps);
        }
        members.sort_unstable();
        let bytes: usize = members.iter().map(|m| m.as_str().len() + 1).sum();
        if bytes > TXN_MEMBER_BYTES_MAX {
            return Err(TxnError::MembersTooLong(bytes));
        }
        Ok(members)
    }
}

/// Refuses a caller's message that would read as a transaction header.
pub(crate) fn check_message(message: Option<&str>) -> Result<(), TxnError> {
    match message {
        Some(message) if message.starts_with(TXN_RESERVED_PREFIX) => Err(TxnError::ReservedMessage),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str) -> DocId {
        id.parse().unwrap()
    }

    #[test]
    fn headers_round_trip_with_and_without_a_message() {
        let header = TxnHeader {
            id: TxnId([7; 16]),
            members: vec![doc("inventory/sku-1"), doc("orders/1")],
        };
        let text = header.message(Some("take order 1\nsecond line"));
        assert_eq!(
            text,
            "archipelago-txn/1 07070707070707070707070707070707 inventory/sku-1 orders/1\ntake order 1\nsecond line"
        );
        let (parsed, user) = TxnHeader::parse(&text).unwrap();
        assert_eq!(parsed, header);
        assert_eq!(user, Some("take order 1\nsecond line"));
        assert_eq!(user_message(&text), Some("take order 1\nsecond line"));

        let bare = header.message(None);
        assert_eq!(TxnHeader::parse(&bare), Some((header, None)));
        assert_eq!(user_message(&bare), None);
        assert_eq!(user_message("restock"), Some("restock"));
    }

    #[test]
    fn malformed_headers_are_not_transactions() {
        for text in [
            "archipelago-txn/1 nothex inventory/sku-1",
            "archipelago-txn/1 07070707070707070707070707070707",
            "archipelago-txn/1 07070707070707070707070707070707 b a",
            "archipelago-txn/1 07070707070707070707070707070707 a a",
            "archipelago-txn/1 07070707070707070707070707070707 b@d",
            "archipelago-txn/2 07070707070707070707070707070707 a",
            "hello",
        ] {
            assert_eq!(TxnHeader::parse(text), None, "{text}");
        }
    }

    #[test]
    fn ids_are_derived_uniquely_and_parse_back() {
        let actor = automerge::ActorId::from(vec![1, 2, 3]);
        let a = TxnId::derive(&actor, 1);
        let b = TxnId::derive(&actor, 2);
        assert_ne!(a, b);
        assert_ne!(
            a,
            TxnId::derive(&automerge::ActorId::from(vec![1, 2, 4]), 1)
        );
        assert_eq!(a.to_string().parse::<TxnId>().unwrap(), a);
        assert!("ABCDEF0123456789ABCDEF0123456789".parse::<TxnId>().is_err());
        assert!("abc".parse::<TxnId>().is_err());
    }

    #[test]
    fn preconditions_compare_heads_as_sets() {
        let h1 = ChangeHash([1; 32]);
        let h2 = ChangeHash([2; 32]);
        let at = Precondition::if_heads(vec![h2, h1]);
        assert_eq!(at.failure(true, &[h1, h2]), None);
        assert!(at.failure(true, &[h1]).unwrap().contains("not"));
        let empty = Precondition::if_heads(Vec::new());
        assert_eq!(empty.failure(false, &[]), None);
        assert!(empty.failure(true, &[h1]).is_some());
        let absent = Precondition {
            if_absent: true,
            ..Precondition::default()
        };
        assert_eq!(absent.failure(false, &[]), None);
        assert_eq!(
            absent.failure(true, &[]),
            Some("the document exists".to_owned())
        );
    }

    #[test]
    fn transactions_are_checked_before_anything_runs() {
        let set: Vec<Op> = serde_json::from_str(r#"[{"op":"set","path":"/a","value":1}]"#).unwrap();
        let part = |id: &str, ops: &[Op]| TxnDoc {
            id: doc(id),
            ops: ops.to_vec(),
            precondition: Precondition::none(),
        };
        let txn = Txn {
            docs: vec![part("b", &set), part("a", &[]), part("c", &set)],
            message: None,
        };
        assert_eq!(txn.check().unwrap(), vec![doc("b"), doc("c")]);
        assert_eq!(Txn::default().check(), Err(TxnError::Empty));
        let twice = Txn {
            docs: vec![part("a", &set), part("a", &set)],
            message: None,
        };
        assert_eq!(twice.check(), Err(TxnError::Duplicate(doc("a"))));
        let many = Txn {
            docs: (0..=TXN_DOCS_MAX)
                .map(|i| part(&format!("d{i}"), &set))
                .collect(),
            message: None,
        };
        assert_eq!(many.check(), Err(TxnError::TooManyDocs(TXN_DOCS_MAX + 1)));
        let none = Txn {
            docs: vec![part("a", &[])],
            message: None,
        };
        assert_eq!(none.check(), Err(TxnError::NoOps));
        let reserved = Txn {
            docs: vec![part("a", &set)],
            message: Some("archipelago-txn/1 x".to_owned()),
        };
        assert_eq!(reserved.check(), Err(TxnError::ReservedMessage));
        let long = "x".repeat(200);
        let wide = Txn {
            docs: (0..200)
                .map(|i| part(&format!("{long}{i:03}"), &set))
                .collect(),
            message: None,
        };
        assert!(matches!(wide.check(), Err(TxnError::MembersTooLong(_))));
    }
}
