//! automerge-repo clients of a site: the protocol that JavaScript apps
//! (`@automerge/automerge-repo` with its WebSocket network adapter) speak,
//! served from the replica itself.
//!
//! - [`ids`]: automerge-repo document ids and URLs, mapped to document ids.
//! - [`wire`]: the protocol's CBOR messages.
//! - [`ClientSession`]: one client's connection as state.
//! - [`ReplicaClients`]: the [`ClientHost`] over a [`Replica`].
//!
//! The daemon serves it at `GET /v1/automerge-repo` (a WebSocket).

pub mod ids;
mod session;
pub mod wire;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use automerge::sync;

pub use ids::RepoId;
pub use session::{ClientConfig, ClientHost, ClientSession, ClientStats, Ephemeral};

use crate::{DocId, Error, Replica};

/// How often, at most, the ids of documents whose names carry none are
/// derived again for a lookup that found nothing while the number of
/// documents stayed the same.
const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// The [`ClientHost`] of a site: documents are the replica's, found by the
/// id in their name (`NAMESPACE/ID`) or by the id derived from it.
pub struct ReplicaClients {
    replica: Replica,
    namespace: String,
    derived: Mutex<Derived>,
}

#[derive(Default)]
struct Derived {
    ids: HashMap<RepoId, DocId>,
    scanned: Option<Instant>,
    scanned_docs: usize,
}

impl ReplicaClients {
    /// Clients of `replica`, storing the documents they create under
    /// `namespace`.
    pub fn new(replica: Replica, namespace: impl Into<String>) -> ReplicaClients {
        ReplicaClients {
            replica,
            namespace: namespace.into(),
            derived: Mutex::new(Derived::default()),
        }
    }

    /// Where documents that clients create are stored.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The automerge URL of `doc`.
    pub fn url(&self, doc: &DocId) -> String {
        RepoId::of(doc, &self.namespace).url()
    }

    fn exists(&self, doc: &DocId) -> bool {
        self.replica.heads(doc).is_some()
    }
}

impl std::fmt::Debug for ReplicaClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaClients")
            .field("site", self.replica.site())
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl ClientHost for ReplicaClients {
    fn find(&self, id: &RepoId) -> Option<DocId> {
        if let Some(doc) = id.doc_in(&self.namespace).filter(|doc| self.exists(doc)) {
            return Some(doc);
        }
        let mut derived = self.derived.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(doc) = derived.ids.get(id).filter(|doc| self.exists(doc)) {
            return Some(doc.clone());
        }
        // Derived again when documents came or went since, and otherwise
        // at most every second (a document renamed in place keeps the
        // count), so asking for unknown ids costs little.
        let now = Instant::now();
        let docs = self.replica.stats().docs;
        if derived.scanned_docs == docs && derived.scanned.is_some_and(|at| now < at + RESCAN_EVERY)
        {
            return None;
        }
        derived.scanned_docs = docs;
        derived.ids = self
            .replica
            .doc_ids("")
            .into_iter()
            .map(|doc| (RepoId::of(&doc, &self.namespace), doc))
            .collect();
        derived.scanned = Some(now);
        derived.ids.get(id).cloned()
    }

    fn generate(
        &self,
        doc: &DocId,
        state: &mut sync::State,
    ) -> Result<Option<sync::Message>, Error> {
        self.replica.sync_generate(doc, state)
    }

    fn receive(
        &self,
        doc: &DocId,
        state: &mut sync::State,
        message: sync::Message,
        read_only: bool,
    ) -> Result<(), Error> {
        self.replica.sync_receive(doc, state, message, read_only)
    }
}
