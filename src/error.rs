//! The crate's error type, gathering the errors of each boundary.

use automerge::ChangeHash;

use crate::doc::OpError;
use crate::id::{DocId, InvalidId};
use crate::store::StoreError;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An identifier failed validation.
    #[error(transparent)]
    InvalidId(#[from] InvalidId),
    /// An op or value does not fit the document.
    #[error(transparent)]
    Op(Box<OpError>),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A change was applied here and published (so it may already be at
    /// peers), but its store write failed. It stays in memory and is
    /// written with the document's next write; retrying the same edit
    /// would apply it twice.
    #[error("{doc}: the change is applied here but not durable ({source}); it stays in memory, may already be at peers, and is written with the document's next write, so retrying would apply it twice")]
    NotDurable {
        /// The document.
        doc: DocId,
        /// Why the write failed.
        source: StoreError,
    },
    /// The network transport failed.
    #[error(transparent)]
    Transport(Box<crate::transport::quic::TransportError>),
    /// The document does not exist.
    #[error("document {0} not found")]
    NotFound(DocId),
    /// Heads given by a caller are not in the document.
    #[error("document {doc} has no change {}", .heads.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(", "))]
    UnknownHeads {
        /// The document.
        doc: DocId,
        /// The unknown heads.
        heads: Vec<ChangeHash>,
    },
    /// A stored document could not be decoded; other documents are fine.
    #[error("document {doc} is corrupt in storage: {reason}")]
    CorruptDocument {
        /// The document.
        doc: DocId,
        /// Why decoding failed.
        reason: String,
    },
    /// A change received from elsewhere is malformed.
    #[error("change {index} for {doc} is malformed: {reason}")]
    BadChange {
        /// The document.
        doc: DocId,
        /// Position of the change in its batch.
        index: usize,
        /// Why it was refused.
        reason: String,
    },
    /// No conflict report has this id here.
    #[error("conflict {0} not found")]
    ConflictNotFound(crate::conflict::ConflictId),
    /// The conflict report is already resolved or dismissed.
    #[error("conflict {id} is already {status}")]
    ConflictClosed {
        /// The report.
        id: crate::conflict::ConflictId,
        /// Its status.
        status: crate::conflict::Status,
    },
    /// A resolver named other documents each time it was asked again under
    /// their locks; the report stays open.
    #[error("the resolver of conflict {0} named different documents each time it was asked; the report stays open")]
    ResolverUnstable(crate::conflict::ConflictId),
    /// The document does not fit the Rust type.
    #[error("hydrate: {0}")]
    Hydrate(Box<autosurgeon::HydrateError>),
    /// The Rust value could not be written.
    #[error("reconcile: {0}")]
    Reconcile(Box<autosurgeon::ReconcileError>),
    /// A transaction is malformed (too many documents, one twice, ...).
    #[error(transparent)]
    Txn(#[from] crate::txn::TxnError),
    /// A saga cannot start, or is not there.
    #[error(transparent)]
    Saga(#[from] crate::saga::SagaError),
    /// A precondition of a write does not hold; nothing was changed.
    #[error("precondition failed for {doc}: {reason}")]
    PreconditionFailed {
        /// The document whose precondition failed.
        doc: DocId,
        /// What differs.
        reason: String,
    },
    /// An op of a transaction does not fit its document; nothing was
    /// changed.
    #[error("{doc}: {source}")]
    TxnOp {
        /// The document the op is for.
        doc: DocId,
        /// Why it does not fit.
        source: Box<OpError>,
    },
    /// More items were given than a call takes.
    #[error("at most {max} {what}, not {given}")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// The limit.
        max: usize,
        /// How many were given.
        given: usize,
    },
    /// automerge refused an operation.
    #[error("automerge: {0}")]
    Automerge(Box<automerge::AutomergeError>),
    /// The document is written only through the strong tier.
    #[error("{0} is a strong document: it is written only through the strong tier")]
    StrongDocument(DocId),
}

// The large foreign errors are boxed so `Result<_, Error>` stays small on
// the happy path.
impl From<OpError> for Error {
    fn from(e: OpError) -> Error {
        Error::Op(Box::new(e))
    }
}

impl From<crate::transport::quic::TransportError> for Error {
    fn from(e: crate::transport::quic::TransportError) -> Error {
        Error::Transport(Box::new(e))
    }
}

impl From<autosurgeon::HydrateError> for Error {
    fn from(e: autosurgeon::HydrateError) -> Error {
        Error::Hydrate(Box::new(e))
    }
}

impl From<autosurgeon::ReconcileError> for Error {
    fn from(e: autosurgeon::ReconcileError) -> Error {
        Error::Reconcile(Box::new(e))
    }
}

impl From<automerge::AutomergeError> for Error {
    fn from(e: automerge::AutomergeError) -> Error {
        Error::Automerge(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_stay_small() {
        assert!(
            std::mem::size_of::<super::Error>() <= 64,
            "{}",
            std::mem::size_of::<super::Error>()
        );
    }
}
