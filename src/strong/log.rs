//! The Raft log and vote of a site, durable in the node's [`Store`] as
//! metadata records (`strong/log/INDEX`, `strong/vote`, `strong/purged`,
//! `strong/committed`), with every live entry also kept in memory: the
//! log stays short (entries before a snapshot are purged), and replication
//! reads it far more often than it is written.
//!
//! Every write goes through the store's writer (blocking, so on tokio's
//! blocking pool) and is durable before openraft hears it is done.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};

use super::TypeConfig;
use crate::store::{Store, Write};

const LOG_PREFIX: &str = "strong/log/";
const VOTE_KEY: &str = "strong/vote";
const PURGED_KEY: &str = "strong/purged";
const COMMITTED_KEY: &str = "strong/committed";

type NodeId = u64;

fn decode<T: serde::de::DeserializeOwned>(
    key: &str,
    bytes: &[u8],
) -> Result<T, StorageError<NodeId>> {
    postcard::from_bytes(bytes).map_err(|e| read_error(format!("{key}: {e}")))
}

fn log_key(index: u64) -> String {
    format!("{LOG_PREFIX}{index:020}")
}

/// What the log holds, in memory.
#[derive(Default)]
struct LogState0 {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
}

/// The log of one site; clones share it (one is openraft's reader).
#[derive(Clone)]
pub(crate) struct LogStore {
    store: Arc<dyn Store>,
    state: Arc<Mutex<LogState0>>,
}

fn read_error(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_logs(openraft::AnyError::error(e.to_string())).into()
}

fn write_error(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_logs(openraft::AnyError::error(e.to_string())).into()
}

impl LogStore {
    /// Loads the log `store` holds (none on a fresh store).
    pub(crate) fn open(store: Arc<dyn Store>) -> Result<LogStore, StorageError<NodeId>> {
        let mut state = LogState0::default();
        if let Some(bytes) = store.meta(VOTE_KEY).map_err(read_error)? {
            state.vote = Some(decode(VOTE_KEY, &bytes)?);
        }
        if let Some(bytes) = store.meta(COMMITTED_KEY).map_err(read_error)? {
            state.committed = decode(COMMITTED_KEY, &bytes)?;
        }
        if let Some(bytes) = store.meta(PURGED_KEY).map_err(read_error)? {
            state.purged = Some(decode(PURGED_KEY, &bytes)?);
        }
        for (key, bytes) in store.meta_prefix(LOG_PREFIX).map_err(read_error)? {
            let entry: Entry<TypeConfig> = decode(&key, &bytes)?;
            state.entries.insert(entry.log_id.index, entry);
        }
        Ok(LogStore {
            store,
            state: Arc::new(Mutex::new(state)),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState0> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits `writes` durably, off the async threads.
    async fn commit(&self, writes: Vec<Write>) -> Result<(), StorageError<NodeId>> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.commit(writes))
            .await
            .map_err(write_error)?
            .map_err(write_error)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        let state = self.state();
        Ok(state
            .entries
            .range((start, end))
            .map(|(_, entry)| entry.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let state = self.state();
        let last = state
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(state.purged);
        Ok(LogState {
            last_purged_log_id: state.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let value = postcard::to_stdvec(vote).map_err(write_error)?;
        self.commit(vec![Write::PutMeta {
            key: VOTE_KEY.to_owned(),
            value,
        }])
        .await?;
        self.state().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.state().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let value = postcard::to_stdvec(&committed).map_err(write_error)?;
        self.commit(vec![Write::PutMeta {
            key: COMMITTED_KEY.to_owned(),
            value,
        }])
        .await?;
        self.state().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.state().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut writes = Vec::new();
        {
            let mut state = self.state();
            for entry in entries {
                let value = postcard::to_stdvec(&entry).map_err(write_error)?;
                writes.push(Write::PutMeta {
                    key: log_key(entry.log_id.index),
                    value,
                });
                // Readable at once, as openraft requires; durable below.
                state.entries.insert(entry.log_id.index, entry);
            }
        }
        let result = self.commit(writes).await;
        callback.log_io_completed(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        result
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let gone: Vec<u64> = self
            .state()
            .entries
            .range(log_id.index..)
            .map(|(index, _)| *index)
            .collect();
        let writes = gone
            .iter()
            .map(|index| Write::DeleteMeta {
                key: log_key(*index),
            })
            .collect();
        self.commit(writes).await?;
        let mut state = self.state();
        for index in gone {
            state.entries.remove(&index);
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let gone: Vec<u64> = self
            .state()
            .entries
            .range((Bound::Unbounded, Bound::Included(log_id.index)))
            .map(|(index, _)| *index)
            .collect();
        let mut writes: Vec<Write> = gone
            .iter()
            .map(|index| Write::DeleteMeta {
                key: log_key(*index),
            })
            .collect();
        writes.push(Write::PutMeta {
            key: PURGED_KEY.to_owned(),
            value: postcard::to_stdvec(&log_id).map_err(write_error)?,
        });
        self.commit(writes).await?;
        let mut state = self.state();
        for index in gone {
            state.entries.remove(&index);
        }
        state.purged = Some(log_id);
        Ok(())
    }
}
