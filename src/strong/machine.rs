//! The strong tier's state machine: applies committed entries to the
//! replica (the changes of strong transactions) and to its own state (the
//! last applied entry, the membership, the leases), both in one durable
//! write per batch of entries, so a restart resumes exactly where it
//! stopped (openraft applies again what follows `last_applied`, and a
//! change applied twice is a duplicate automerge drops).
//!
//! A snapshot is the machine's state and every strong document in saved
//! form; installing one merges the documents and takes the state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::command::{AppliedDoc, Command, Lease, Response};
use super::TypeConfig;
use crate::id::DocId;
use crate::replica::Replica;
use crate::store::{Store, Write};
use crate::txn::TxnId;

type NodeId = u64;

const MACHINE_KEY: &str = "strong/machine";

/// What the machine keeps beside the documents.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct MachineState {
    pub(crate) last_applied: Option<LogId<NodeId>>,
    pub(crate) membership: StoredMembership<NodeId, BasicNode>,
    pub(crate) leases: BTreeMap<String, Lease>,
}

/// The bytes of a snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    state: MachineState,
    docs: Vec<(DocId, Vec<u8>)>,
}

fn machine_error(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(openraft::AnyError::error(e.to_string())).into()
}

fn snapshot_error(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_snapshot(None, openraft::AnyError::error(e.to_string())).into()
}

/// The last snapshot built or installed here.
type StoredSnapshot = (SnapshotMeta<NodeId, BasicNode>, Vec<u8>);

/// The state machine of one site; clones share it (one builds snapshots).
#[derive(Clone)]
pub(crate) struct StateMachine {
    replica: Replica,
    store: Arc<dyn Store>,
    state: Arc<Mutex<MachineState>>,
    snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
    snapshots_built: Arc<std::sync::atomic::AtomicU64>,
}

/// Applies `command` (at `log_id`) to the leases in `state`; `None` for
/// transactions, which the replica applies.
fn apply_lease(state: &mut MachineState, command: &Command) -> Option<Response> {
    match command {
        Command::Txns(_) => None,
        Command::AcquireLease {
            name,
            site,
            ttl_ms,
            now_ms,
        } => {
            let expires_ms = now_ms.saturating_add(i64::try_from(*ttl_ms).unwrap_or(i64::MAX));
            let granted = match state.leases.get_mut(name) {
                Some(lease) if lease.holder == *site => {
                    lease.expires_ms = lease.expires_ms.max(expires_ms);
                    true
                }
                Some(lease) if lease.expires_ms < *now_ms => {
                    lease.holder = site.clone();
                    lease.epoch += 1;
                    lease.expires_ms = expires_ms;
                    true
                }
                Some(_) => false,
                None => {
                    state.leases.insert(
                        name.clone(),
                        Lease {
                            name: name.clone(),
                            holder: site.clone(),
                            epoch: 1,
                            expires_ms,
                        },
                    );
                    true
                }
            };
            Some(Response::Lease {
                granted,
                lease: state.leases.get(name).cloned(),
            })
        }
        Command::ReleaseLease { name, site, epoch } => {
            let granted = state
                .leases
                .get(name)
                .is_some_and(|l| l.holder == *site && l.epoch == *epoch);
            if granted {
                // Released, not forgotten: the next holder's epoch follows.
                if let Some(lease) = state.leases.get_mut(name) {
                    lease.expires_ms = i64::MIN;
                }
            }
            Some(Response::Lease {
                granted,
                lease: state.leases.get(name).cloned(),
            })
        }
    }
}

impl StateMachine {
    /// The machine over `replica`, with the state `store` holds.
    pub(crate) fn open(
        replica: Replica,
        store: Arc<dyn Store>,
    ) -> Result<StateMachine, StorageError<NodeId>> {
        let state = match store.meta(MACHINE_KEY).map_err(machine_error)? {
            Some(bytes) => postcard::from_bytes(&bytes).map_err(machine_error)?,
            None => MachineState::default(),
        };
        Ok(StateMachine {
            replica,
            store,
            state: Arc::new(Mutex::new(state)),
            snapshot: Arc::new(Mutex::new(None)),
            snapshots_built: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MachineState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The leases as applied here.
    pub(crate) fn leases(&self) -> Vec<Lease> {
        self.state().leases.values().cloned().collect()
    }

    fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let state = self.state().clone();
        let docs = self.replica.strong_docs().map_err(snapshot_error)?;
        let bytes = postcard::to_stdvec(&SnapshotBody {
            state: state.clone(),
            docs,
        })
        .map_err(snapshot_error)?;
        let built = self
            .snapshots_built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
            snapshot_id: format!("{}-{built}", state.last_applied.map_or(0, |id| id.index)),
        };
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(bytes),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let machine = self.clone();
        tokio::task::spawn_blocking(move || machine.build())
            .await
            .map_err(snapshot_error)?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let state = self.state();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut state = self.state().clone();
        let mut responses = Vec::new();
        // Transactions of the whole batch, applied in one write; where
        // each entry's answers go.
        let mut txns: Vec<crate::replica::StrongTxnChanges> = Vec::new();
        let mut txn_entries: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response::None),
                EntryPayload::Membership(membership) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    responses.push(Response::None);
                }
                EntryPayload::Normal(command) => match apply_lease(&mut state, &command) {
                    Some(response) => responses.push(response),
                    None => {
                        let Command::Txns(list) = command else {
                            unreachable!("apply_lease answers every other command")
                        };
                        let start = txns.len();
                        for txn in list {
                            txns.push((
                                TxnId(txn.id),
                                txn.changes.into_iter().map(|c| (c.doc, c.change)).collect(),
                            ));
                        }
                        txn_entries.push((responses.len(), start..txns.len()));
                        responses.push(Response::Txns(Vec::new()));
                    }
                },
            }
        }
        let extra = vec![Write::PutMeta {
            key: MACHINE_KEY.to_owned(),
            value: postcard::to_stdvec(&state).map_err(machine_error)?,
        }];
        let replica = self.replica.clone();
        let applied = tokio::task::spawn_blocking(move || replica.apply_strong(&txns, extra))
            .await
            .map_err(machine_error)?
            .map_err(machine_error)?;
        for (at, range) in txn_entries {
            responses[at] = Response::Txns(
                applied[range]
                    .iter()
                    .map(|docs| {
                        docs.iter()
                            .map(|(doc, heads, change)| AppliedDoc {
                                doc: doc.clone(),
                                heads: heads.iter().map(|h| h.0).collect(),
                                change: change.0,
                            })
                            .collect()
                    })
                    .collect(),
            );
        }
        *self.state() = state;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Vec<u8>>, StorageError<NodeId>> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Vec<u8>>,
    ) -> Result<(), StorageError<NodeId>> {
        let body: SnapshotBody = postcard::from_bytes(&snapshot).map_err(snapshot_error)?;
        let mut state = body.state;
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        let replica = self.replica.clone();
        let store = self.store.clone();
        let value = postcard::to_stdvec(&state).map_err(machine_error)?;
        tokio::task::spawn_blocking(move || {
            replica.merge_strong_docs(&body.docs)?;
            store.commit(vec![Write::PutMeta {
                key: MACHINE_KEY.to_owned(),
                value,
            }])?;
            Ok::<_, crate::Error>(())
        })
        .await
        .map_err(machine_error)?
        .map_err(machine_error)?;
        *self.state() = state;
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some((meta.clone(), *snapshot));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(meta, bytes)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(bytes.clone()),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquire(site: &str, now_ms: i64) -> Command {
        Command::AcquireLease {
            name: "resolver".to_owned(),
            site: site.parse().unwrap(),
            ttl_ms: 1_000,
            now_ms,
        }
    }

    fn granted(response: Option<Response>) -> (bool, u64) {
        match response {
            Some(Response::Lease { granted, lease }) => (granted, lease.map_or(0, |l| l.epoch)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lease_changes_hands_only_once_it_lapsed_and_each_time_with_a_new_epoch() {
        let mut state = MachineState::default();
        assert_eq!(
            granted(apply_lease(&mut state, &acquire("a", 0))),
            (true, 1)
        );
        // b cannot take it while a holds it; a renews in the same epoch.
        assert_eq!(
            granted(apply_lease(&mut state, &acquire("b", 500))),
            (false, 1)
        );
        assert_eq!(
            granted(apply_lease(&mut state, &acquire("a", 900))),
            (true, 1)
        );
        assert_eq!(state.leases["resolver"].expires_ms, 1_900);
        // Lapsed: b takes it with the next epoch.
        assert_eq!(
            granted(apply_lease(&mut state, &acquire("b", 2_000))),
            (true, 2)
        );
        // a, back with its old epoch, can neither release nor keep it.
        let release = Command::ReleaseLease {
            name: "resolver".to_owned(),
            site: "a".parse().unwrap(),
            epoch: 1,
        };
        assert_eq!(granted(apply_lease(&mut state, &release)), (false, 2));
        assert_eq!(
            granted(apply_lease(&mut state, &acquire("a", 2_100))),
            (false, 2)
        );
        let release = Command::ReleaseLease {
            name: "resolver".to_owned(),
            site: "b".parse().unwrap(),
            epoch: 2,
        };
        assert_eq!(granted(apply_lease(&mut state, &release)), (true, 2));
        assert_eq!(
            granted(apply_lease(&mut state, &acquire("a", 2_200))),
            (true, 3)
        );
    }
}
