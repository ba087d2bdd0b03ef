//! The replica's side of automerge-repo clients ([`crate::clients`]): sync
//! messages generated from the replica's own copy of a document, and a
//! client's changes applied like any change made at this site.

use std::panic::AssertUnwindSafe;

use automerge::sync::{self, SyncDoc};

use super::{lock, Origin, Replica};
use crate::doc::OpError;
use crate::{DocId, Error};

impl Replica {
    /// An automerge sync message for a client from this site's copy of
    /// `id`, or `None` when there is nothing to send or no such document.
    pub fn sync_generate(
        &self,
        id: &DocId,
        state: &mut sync::State,
    ) -> Result<Option<sync::Message>, Error> {
        let generated = self.with_doc(id, |doc| {
            std::panic::catch_unwind(AssertUnwindSafe(|| doc.generate_sync_message(state)))
        })?;
        match generated {
            None => Ok(None),
            Some(Ok(message)) => Ok(message),
            Some(Err(_)) => Err(Error::BadChange {
                doc: id.clone(),
                index: 0,
                reason: "automerge panicked generating a sync message".to_owned(),
            }),
        }
    }

    /// Takes a client's sync message about `id`. Its changes are applied
    /// as changes made at this site (durable, checked by the conflict
    /// layer, published to peers and subscribers) before `state` learns
    /// what the client holds, so what this site then tells the client is
    /// durable here. With `read_only` the changes are left out. A document
    /// holding bounded counters takes no changes from clients: its rights
    /// change only through the counters' ops.
    pub fn sync_receive(
        &self,
        id: &DocId,
        state: &mut sync::State,
        mut message: sync::Message,
        read_only: bool,
    ) -> Result<(), Error> {
        let chunks: Vec<Vec<u8>> = message.changes.iter().map(<[u8]>::to_vec).collect();
        message.changes = sync::ChunkList::empty();
        if !chunks.is_empty() && !read_only {
            self.refuse_strong(id)?;
            if self.with_doc(id, crate::escrow::any)? == Some(true) {
                return Err(OpError::Mismatch {
                    path: String::new(),
                    code: "bounded_counter",
                    reason: "the document holds bounded counters, which change only through \
                             their ops: clients may read it but not change it"
                        .to_owned(),
                }
                .into());
            }
            // A chunk is one change, or (from newer peers) a whole document
            // or bundle in saved form.
            let (changes, saved): (Vec<Vec<u8>>, Vec<Vec<u8>>) =
                chunks.into_iter().partition(|chunk| is_change(chunk));
            if !changes.is_empty() {
                self.apply_changes(id, &changes, Origin::Local)?;
            }
            for bytes in saved {
                self.apply_snapshot(id, &bytes, Origin::Local)?;
            }
        }
        if !lock(&self.shared.state).index.contains_key(id) {
            return Ok(());
        }
        let slot = self.slot(id);
        let mut guard = lock(&slot.loaded);
        let loaded = self.ensure_loaded(id, &mut guard)?;
        // Without changes this reads the document and updates `state` only.
        match std::panic::catch_unwind(AssertUnwindSafe(|| {
            loaded.doc.receive_sync_message(state, message)
        })) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::BadChange {
                doc: id.clone(),
                index: 0,
                reason: e.to_string(),
            }),
            Err(_) => {
                self.drop_loaded(id, &mut guard);
                Err(Error::BadChange {
                    doc: id.clone(),
                    index: 0,
                    reason: "automerge panicked on a sync message".to_owned(),
                })
            }
        }
    }
}

/// Whether `bytes` hold exactly one encoded change.
fn is_change(bytes: &[u8]) -> bool {
    std::panic::catch_unwind(|| automerge::Change::from_bytes(bytes.to_vec()).is_ok())
        .unwrap_or(false)
}
