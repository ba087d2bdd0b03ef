//! A [`Store`] wrapper that fails on demand, for tests of error paths.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{DocEntry, Store, StoreError, StoredDoc, Write};
use crate::id::DocId;

/// Wraps a store; while `fail_commits` is set every commit fails without
/// writing anything.
#[derive(Debug)]
pub struct Faulty<S> {
    inner: S,
    fail_commits: AtomicBool,
    commits: AtomicU64,
}

impl<S: Store> Faulty<S> {
    /// Wraps `inner`, initially healthy.
    pub fn new(inner: S) -> Faulty<S> {
        Faulty {
            inner,
            fail_commits: AtomicBool::new(false),
            commits: AtomicU64::new(0),
        }
    }

    /// Makes later commits fail (`true`) or succeed (`false`).
    pub fn set_fail_commits(&self, fail: bool) {
        self.fail_commits.store(fail, Ordering::SeqCst);
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Number of commits that reached the inner store.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }
}

impl<S: Store> Store for Faulty<S> {
    fn docs(&self) -> Result<Vec<DocEntry>, StoreError> {
        self.inner.docs()
    }
    fn load(&self, doc: &DocId) -> Result<Option<StoredDoc>, StoreError> {
        self.inner.load(doc)
    }
    fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if self.fail_commits.load(Ordering::SeqCst) {
            return Err(StoreError::Injected);
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.inner.commit(writes)
    }
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.meta(key)
    }
    fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.meta_prefix(prefix)
    }
}
