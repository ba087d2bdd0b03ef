//! Change metadata: the audit trail of a document.

use automerge::{Change, ChangeHash};
use serde::Serialize;

use crate::id::{site_of_actor, SiteName};
use crate::txn::{TxnHeader, TxnId};

/// One change of a document's history, as the history API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeInfo {
    /// Content hash of the change.
    #[serde(serialize_with = "crate::doc::serialize_hash")]
    pub hash: ChangeHash,
    /// The site whose replica made the change, when its actor names one.
    pub site: Option<SiteName>,
    /// The automerge actor id, in hex.
    pub actor: String,
    /// Wall-clock time of the commit, milliseconds since the Unix epoch.
    pub time: i64,
    /// The commit message, if one was given (without the transaction
    /// header a member change carries: that is `txn`).
    pub message: Option<String>,
    /// The transaction the change belongs to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txn: Option<TxnId>,
    /// The changes this one depends on.
    #[serde(serialize_with = "crate::doc::serialize_hashes")]
    pub deps: Vec<ChangeHash>,
}

/// The caller's message and the transaction of a change message.
fn split_message(message: Option<&str>) -> (Option<String>, Option<TxnId>) {
    match message.map(|m| (m, TxnHeader::parse(m))) {
        Some((_, Some((header, user)))) => (user.map(str::to_owned), Some(header.id)),
        Some((m, None)) => (Some(m.to_owned()), None),
        None => (None, None),
    }
}

impl ChangeInfo {
    /// Extracts the metadata of one change.
    pub fn of(change: &Change) -> ChangeInfo {
        let (message, txn) = split_message(change.message());
        ChangeInfo {
            hash: change.hash(),
            site: site_of_actor(change.actor_id()),
            actor: change.actor_id().to_hex_string(),
            time: change.timestamp(),
            message,
            txn,
            deps: change.deps().to_vec(),
        }
    }
}

/// Every change of `doc` in causal order, oldest first.
pub fn history(doc: &automerge::Automerge) -> Vec<ChangeInfo> {
    // Metadata only: rebuilding every change's ops would cost far more.
    doc.get_changes_meta(&[])
        .into_iter()
        .map(|meta| {
            let (message, txn) = split_message(meta.message.as_deref());
            ChangeInfo {
                hash: meta.hash,
                site: site_of_actor(&meta.actor),
                actor: meta.actor.to_hex_string(),
                time: meta.timestamp,
                message,
                txn,
                deps: meta.deps,
            }
        })
        .collect()
}
