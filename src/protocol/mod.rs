//! The sync protocol between sites, without I/O: the wire format
//! ([`wire`]), replication scope ([`scope`]), set reconciliation of the
//! document index ([`reconcile`]), and the per-peer [`session::Session`]
//! state machine. The QUIC transport drives sessions; the simulation and
//! the fuzz targets drive them directly.

pub mod reconcile;
pub mod scope;
pub mod session;
pub mod wire;

pub use scope::{Glob, Scope};
pub use session::{Event, Host, Lane, Session, SessionConfig, SessionStats};

use automerge::ChangeHash;

use crate::error::Error;
use crate::id::{DocId, SiteName};
use crate::replica::{Applied, Origin, Replica};

impl Host for Replica {
    fn grant_rights(
        &self,
        peer: &SiteName,
        doc: &DocId,
        pointer: &str,
        pool: crate::escrow::PoolKind,
        amount: i64,
    ) {
        if let Err(e) = Replica::grant_rights(self, doc, pointer, pool, peer, amount) {
            tracing::warn!(%peer, %doc, pointer, error = %e, "could not grant rights");
        }
    }

    fn index(&self) -> Vec<(DocId, Vec<ChangeHash>)> {
        Replica::index(self)
    }

    fn heads(&self, doc: &DocId) -> Option<Vec<ChangeHash>> {
        Replica::heads(self, doc)
    }

    fn known(&self, doc: &DocId, hashes: &[ChangeHash]) -> Result<Vec<ChangeHash>, Error> {
        self.known_hashes(doc, hashes)
    }

    fn changes_after(&self, doc: &DocId, have: &[ChangeHash]) -> Result<Vec<Vec<u8>>, Error> {
        Replica::changes_after(self, doc, have)?.ok_or_else(|| Error::NotFound(doc.clone()))
    }

    fn sample(&self, doc: &DocId) -> Result<Vec<ChangeHash>, Error> {
        self.history_sample(doc)
    }

    fn apply(&self, doc: &DocId, changes: &[Vec<u8>], from: &SiteName) -> Result<Applied, Error> {
        self.apply_changes(doc, changes, Origin::Peer(from.clone()))
    }

    fn apply_batched(
        &self,
        doc: &DocId,
        changes: &[Vec<u8>],
        from: &SiteName,
    ) -> Result<Applied, Error> {
        self.apply_changes_batched(doc, changes, Origin::Peer(from.clone()))
    }

    fn flush(&self) {
        if let Err(e) = self.apply_ready() {
            tracing::warn!(error = %e, "completed transactions could not be applied");
        }
    }

    fn snapshot(&self, doc: &DocId) -> Result<(Vec<u8>, Vec<ChangeHash>), Error> {
        self.snapshot_bytes(doc)?
            .map(|s| (s.bytes, s.heads))
            .ok_or_else(|| Error::NotFound(doc.clone()))
    }

    fn apply_snapshot(&self, doc: &DocId, bytes: &[u8], from: &SiteName) -> Result<Applied, Error> {
        Replica::apply_snapshot(self, doc, bytes, Origin::Peer(from.clone()))
    }

    fn heads_of_state(&self, doc: &DocId, short: &reconcile::ShortHash) -> Option<Vec<ChangeHash>> {
        Replica::heads_of_state(self, doc, short)
    }

    fn mark_synced(&self, peer: &SiteName) {
        Replica::mark_synced(self, peer)
    }

    fn changed_since_synced(&self, peer: &SiteName) -> Option<Vec<DocId>> {
        Replica::changed_since_synced(self, peer)
    }

    fn replicates(&self, doc: &DocId) -> bool {
        Replica::replicates(self, doc)
    }

    fn held_missing(&self, peer: &SiteName) -> Vec<(crate::txn::TxnId, Vec<DocId>)> {
        Replica::held_missing(self, peer)
    }

    fn txn_not_from(&self, peer: &SiteName, txn: crate::txn::TxnId, docs: &[DocId]) {
        Replica::txn_not_from(self, peer, txn, docs)
    }

    fn apply_snapshots(
        &self,
        docs: &[(DocId, &[u8])],
        from: &SiteName,
    ) -> Vec<Result<Applied, Error>> {
        Replica::apply_snapshots(self, docs, &Origin::Peer(from.clone()))
    }
}
