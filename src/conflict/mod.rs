//! The conflict-report layer: semantic conflicts that an automerge merge
//! decides silently, reported identically at every site and resolved once.
//!
//! Three kinds are detected where a merge touched a document (from the
//! merge's patch log and the merged changes' ops, never by rescanning the
//! document):
//!
//! - [`Kind::ConcurrentWrite`]: one field set concurrently to different
//!   values; automerge shows one and keeps the others in `get_all`.
//! - [`Kind::DeleteUpdate`]: an object deleted at one site while another
//!   wrote inside it; automerge drops those writes with the object, so the
//!   report carries them.
//! - [`Kind::Invariant`]: a declared [`Rule`] held on each side of the merge
//!   and fails after it (stock below zero, a seat booked twice, a dangling
//!   reference, a custom predicate).
//!
//! A report's id is a hash of its kind, document, rule, path and the sorted
//! hashes of the changes involved, so every site that sees one conflict
//! computes the same id. Reports live *inside* their document, under root
//! keys with the reserved prefix [`RESERVED_PREFIX`] (hidden from the JSON
//! view and refused by ops): they replicate with the document, follow its
//! replication scope, and a resolution commits in the same automerge change
//! as the edits that resolve it, at every site. Each site also keeps a local
//! index of reports in its store, written in the same durable commit as the
//! document.
//!
//! Exactly one site resolves a conflict automatically: the rule's
//! `resolver`, or else the first (by name) of the sites whose changes are
//! involved. It runs the rule's [`Policy`] under the document's lock, only
//! while the report is still open, and the status and the compensating
//! edits commit together, so a compensation runs once.

pub(crate) mod detect;
pub(crate) mod report;
mod rule;

pub use report::{Conflict, ConflictId, ConflictValue, Kind, Status};
pub use rule::{
    Check, ConflictConfig, DetectorSwitch, Policy, Predicate, Resolution, Resolver, Rule, RuleError,
};

pub(crate) use detect::{detect, DetectInput};
pub(crate) use report::{body_key, read_report, report_ids_in_patches, reports_in, status_key};

/// Root keys starting with this prefix belong to archipelago: conflict
/// reports live there. They are hidden from JSON reads, kept by whole-value
/// writes, and refused as op paths.
pub const RESERVED_PREFIX: &str = "_archipelago/";

/// Whether a root key is reserved for archipelago.
pub fn is_reserved_key(key: &str) -> bool {
    key.starts_with(RESERVED_PREFIX)
}

/// A query over reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only reports with this status.
    pub status: Option<Status>,
    /// Only reports of this document.
    pub doc: Option<crate::DocId>,
    /// Only reports of this kind.
    pub kind: Option<Kind>,
    /// Only reports of this rule.
    pub rule: Option<String>,
}

impl Filter {
    /// Whether `conflict` passes the filter.
    pub fn matches(&self, conflict: &Conflict) -> bool {
        self.status.is_none_or(|s| s == conflict.status)
            && self.doc.as_ref().is_none_or(|d| *d == conflict.doc)
            && self.kind.is_none_or(|k| k == conflict.kind)
            && self
                .rule
                .as_ref()
                .is_none_or(|r| conflict.rule.as_deref() == Some(r.as_str()))
    }
}
