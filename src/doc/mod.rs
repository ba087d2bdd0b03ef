//! One document: JSON-pointer paths and ops, the JSON view and reconcile,
//! typed access through autosurgeon, and change history. Nothing here
//! touches storage; [`crate::Replica`] wraps these functions with loading,
//! durability and notification.

pub mod history;
pub mod json;
pub mod ops;
pub mod path;

pub use history::ChangeInfo;
pub use ops::{Op, ValueKind};
pub use path::Pointer;

use automerge::ChangeHash;

/// Why an op or a written value does not fit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    /// The path is not a valid JSON pointer for this op.
    #[error("invalid path {path:?}: {reason}")]
    BadPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The value cannot be written (wrong type for `as`, too deep, ...).
    #[error("invalid value: {0}")]
    BadValue(String),
    /// The op needs an existing entry and there is none.
    #[error("{path}: no such entry")]
    PathNotFound {
        /// The missing path.
        path: String,
    },
    /// The op does not fit what the document holds at the path.
    #[error("{path}: {reason}")]
    Mismatch {
        /// Where.
        path: String,
        /// A stable machine-readable code (`not_a_counter`, `not_text`, ...).
        code: &'static str,
        /// A sentence for people.
        reason: String,
    },
    /// A decrement of a bounded counter (or an increment below its `max`)
    /// beyond the rights this site holds: see [`crate::escrow`].
    #[error("{path}: insufficient rights ({available_here} here, {available_total} at all sites as far as this site knows)")]
    InsufficientRights {
        /// The bounded counter.
        path: String,
        /// Which rights: to decrement, or (with a `max`) to increment.
        pool: crate::escrow::PoolKind,
        /// The amount the op needed.
        wanted: i64,
        /// The rights this site holds.
        available_here: i64,
        /// The rights all sites hold, as far as this site knows.
        available_total: i64,
    },
    /// An increment would take a bounded counter past its `max`.
    #[error("{path}: increment would pass max {max} (value {value})")]
    AboveMax {
        /// The bounded counter.
        path: String,
        /// Its upper bound.
        max: i64,
        /// Its value here.
        value: i64,
    },
    /// automerge refused the operation.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}

impl OpError {
    /// A stable machine-readable code for APIs.
    pub fn code(&self) -> &'static str {
        match self {
            OpError::BadPath { .. } => "bad_path",
            OpError::BadValue(_) => "bad_value",
            OpError::PathNotFound { .. } => "path_not_found",
            OpError::Mismatch { code, .. } => code,
            OpError::InsufficientRights { .. } => "insufficient_rights",
            OpError::AboveMax { .. } => "above_max",
            OpError::Automerge(_) => "op_rejected",
        }
    }

    /// True when the input itself is malformed (as opposed to well-formed
    /// but not fitting the document's current contents).
    pub fn is_malformed_input(&self) -> bool {
        matches!(self, OpError::BadPath { .. } | OpError::BadValue(_))
    }
}

/// Serializes a change hash as hex.
pub(crate) fn serialize_hash<S: serde::Serializer>(
    hash: &ChangeHash,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(hash)
}

/// Serializes change hashes as a list of hex strings.
pub(crate) fn serialize_hashes<S: serde::Serializer>(
    hashes: &[ChangeHash],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(hashes.iter().map(|h| h.to_string()))
}
