//! Change metadata: the audit trail of a document.

use automerge::{Change, ChangeHash};
use serde::Serialize;

use crate::id::{site_of_actor, SiteName};

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
    /// The commit message, if one was given.
    pub message: Option<String>,
    /// The changes this one depends on.
    #[serde(serialize_with = "crate::doc::serialize_hashes")]
    pub deps: Vec<ChangeHash>,
}

impl ChangeInfo {
    /// Extracts the metadata of one change.
    pub fn of(change: &Change) -> ChangeInfo {
        ChangeInfo {
            hash: change.hash(),
            site: site_of_actor(change.actor_id()),
            actor: change.actor_id().to_hex_string(),
            time: change.timestamp(),
            message: change.message().map(str::to_owned),
            deps: change.deps().to_vec(),
        }
    }
}

/// Every change of `doc` in causal order, oldest first.
pub fn history(doc: &automerge::Automerge) -> Vec<ChangeInfo> {
    // Metadata only: rebuilding every change's ops would cost far more.
    doc.get_changes_meta(&[])
        .into_iter()
        .map(|meta| ChangeInfo {
            hash: meta.hash,
            site: site_of_actor(&meta.actor),
            actor: meta.actor.to_hex_string(),
            time: meta.timestamp,
            message: meta.message.map(|m| m.into_owned()),
            deps: meta.deps,
        })
        .collect()
}
