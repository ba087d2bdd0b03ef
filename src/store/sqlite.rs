//! The SQLite [`Store`]: WAL journal, `synchronous=FULL`, one writer thread
//! with group commit, and a small pool of read connections.
//!
//! Every [`Store::commit`] call becomes a request to the writer thread. The
//! writer takes every request that queued while the previous transaction was
//! being made durable and commits them together in one SQLite transaction
//! (each inside its own savepoint, so a failing request fails alone). Callers
//! return only after that transaction's fsync: an `Ok` is on disk.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{decode_heads, encode_heads, DocEntry, Store, StoreError, StoredDoc, Write};
use crate::id::DocId;

pub(super) const SCHEMA_VERSION: i64 = 2;
/// Schema versions this build opens: older ones are migrated on open.
pub(super) const SCHEMA_VERSIONS_OPENED: std::ops::RangeInclusive<i64> = 1..=SCHEMA_VERSION;
/// Documents' heads apart from their snapshots: a commit rewrites a
/// document's heads, and with snapshots beside them in one row a page of
/// `docs` held a few documents, so a transaction over several documents
/// wrote a page for each. Now the heads of a hundred documents share a page.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS docs (
    id TEXT PRIMARY KEY NOT NULL,
    heads BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY NOT NULL,
    bytes BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY,
    doc TEXT NOT NULL,
    bytes BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_doc ON changes (doc, seq);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;
";
/// From version 1, where `docs` held each document's snapshot.
const MIGRATE_FROM_1: &str = "
BEGIN IMMEDIATE;
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY NOT NULL,
    bytes BLOB NOT NULL
);
INSERT INTO snapshots (id, bytes) SELECT id, snapshot FROM docs WHERE snapshot IS NOT NULL;
CREATE TABLE docs_2 (
    id TEXT PRIMARY KEY NOT NULL,
    heads BLOB NOT NULL
) WITHOUT ROWID;
INSERT INTO docs_2 (id, heads) SELECT id, heads FROM docs;
DROP TABLE docs;
ALTER TABLE docs_2 RENAME TO docs;
PRAGMA user_version = 2;
COMMIT;
";

/// Tuning for [`Sqlite`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Most commit requests joined into one transaction.
    pub group_requests_max: usize,
    /// Most payload bytes joined into one transaction (a single larger
    /// request still commits alone).
    pub group_bytes_max: usize,
    /// Read connections kept open.
    pub readers_max: usize,
}

impl Default for SqliteOptions {
    fn default() -> SqliteOptions {
        SqliteOptions {
            group_requests_max: 1024,
            group_bytes_max: 64 << 20,
            readers_max: 4,
        }
    }
}

struct Request {
    writes: Vec<Write>,
    done: mpsc::SyncSender<Result<(), StoreError>>,
}

/// An SQLite-backed store in one database file.
pub struct Sqlite {
    path: PathBuf,
    sender: Mutex<Option<mpsc::Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Stops the checkpointer when dropped or sent to.
    checkpoints: Mutex<Option<(mpsc::Sender<()>, JoinHandle<()>)>>,
    readers: Mutex<Vec<Connection>>,
    options: SqliteOptions,
    // Held for the store's lifetime so a second process cannot open it.
    _lock: File,
}

impl std::fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqlite")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl Sqlite {
    /// Opens (creating if needed) the database at `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Sqlite, StoreError> {
        Sqlite::open_with(path, SqliteOptions::default())
    }

    /// Opens (creating if needed) the database at `path`.
    pub fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Sqlite, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(backend)?;
        }
        let lock_path = lock_path(&path);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(backend)?;
        lock.try_lock()
            .map_err(|e| StoreError::Locked(format!("{}: {e}", lock_path.display())))?;

        let writer_conn = open_connection(&path, WRITER_CACHE_KIB)?;
        migrate(&writer_conn).map_err(|reason| StoreError::Corrupt {
            what: path.display().to_string(),
            reason,
        })?;

        // Checkpoints run beside the writer, not inside a commit: SQLite's
        // automatic checkpoint would copy the WAL into the database and fsync
        // it inside whichever commit crosses the threshold, stalling it for
        // milliseconds. The automatic one stays as a backstop.
        writer_conn
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES};"
            ))
            .map_err(backend)?;
        let checkpoint_conn = open_connection(&path, READER_CACHE_KIB)?;
        let (stop_checkpoints, stopped) = mpsc::channel::<()>();
        let checkpointer = std::thread::Builder::new()
            .name("archipelago-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoint_conn, stopped))
            .map_err(backend)?;

        let (sender, receiver) = mpsc::channel();
        let group = (options.group_requests_max.max(1), options.group_bytes_max);
        let writer = std::thread::Builder::new()
            .name("archipelago-sqlite-writer".into())
            .spawn(move || write_loop(writer_conn, receiver, group))
            .map_err(backend)?;
        Ok(Sqlite {
            path,
            sender: Mutex::new(Some(sender)),
            writer: Mutex::new(Some(writer)),
            checkpoints: Mutex::new(Some((stop_checkpoints, checkpointer))),
            readers: Mutex::new(Vec::new()),
            options,
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Finishes queued commits and stops the writer thread. Later commits
    /// fail with [`StoreError::Closed`]. Dropping the store does the same.
    pub fn close(&self) {
        drop(lock(&self.sender).take());
        if let Some(writer) = lock(&self.writer).take() {
            let _ = writer.join();
        }
        if let Some((stop, checkpointer)) = lock(&self.checkpoints).take() {
            drop(stop);
            let _ = checkpointer.join();
        }
    }

    pub(super) fn with_reader<R>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R>,
    ) -> Result<R, StoreError> {
        let conn = lock(&self.readers).pop();
        let conn = match conn {
            Some(conn) => conn,
            None => open_connection(&self.path, READER_CACHE_KIB)?,
        };
        let result = f(&conn).map_err(backend);
        let mut readers = lock(&self.readers);
        if readers.len() < self.options.readers_max {
            readers.push(conn);
        }
        result
    }
}

impl Drop for Sqlite {
    fn drop(&mut self) {
        self.close();
    }
}

/// The file whose lock marks the store at `path` as open.
pub(super) fn lock_path(path: &Path) -> PathBuf {
    path.with_extension("lock")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// WAL pages after which a commit checkpoints by itself (a backstop: the
/// checkpoint thread normally keeps the WAL far below this).
const WAL_AUTOCHECKPOINT_PAGES: u32 = 20_000;
/// How often the checkpoint thread copies the WAL into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Lowers the calling thread's CPU priority (nice +5; on Linux nice is per
/// thread). The writer and the checkpointer mostly wait on the disk; when
/// they do need the CPU at the same moment as the threads that carry live
/// changes (2 cores here), those go first.
fn lower_priority() {
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 5);
}

/// Copies committed WAL frames into the database every [`CHECKPOINT_EVERY`]
/// (passive: never blocks the writer or readers) until `stop` closes.
fn checkpoint_loop(conn: Connection, stop: mpsc::Receiver<()>) {
    lower_priority();
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; the next one retries");
        }
    }
}

/// Page cache of the writer connection, KiB (SQLite's default).
const WRITER_CACHE_KIB: usize = 2048;
/// Page cache of each read connection, KiB: documents are read whole and
/// then cached decoded by the replica, so the kernel's page cache serves
/// re-reads well enough, and idle memory stays small.
const READER_CACHE_KIB: usize = 64;

fn open_connection(path: &Path, cache_kib: usize) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA busy_timeout = 10000;
         PRAGMA cache_size = -{cache_kib};"
    ))
    .map_err(backend)?;
    Ok(conn)
}

fn write_loop(mut conn: Connection, receiver: mpsc::Receiver<Request>, group: (usize, usize)) {
    let (requests_max, bytes_max) = group;
    lower_priority();
    while let Ok(first) = receiver.recv() {
        let mut bytes: usize = first.writes.iter().map(Write::bytes_len).sum();
        let mut batch = vec![first];
        while batch.len() < requests_max && bytes < bytes_max {
            match receiver.try_recv() {
                Ok(request) => {
                    bytes += request.writes.iter().map(Write::bytes_len).sum::<usize>();
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        let results = commit_group(&mut conn, &batch);
        for (request, result) in batch.into_iter().zip(results) {
            // The caller may have gone away; its writes are durable anyway.
            let _ = request.done.send(result);
        }
    }
}

/// Brings the database to [`SCHEMA_VERSION`]: creates the tables of a new
/// one, migrates an older one in one transaction (a crash leaves it
/// unmigrated, and the next open migrates it again), refuses a newer one.
fn migrate(conn: &Connection) -> Result<(), String> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    let run = |sql: &str| {
        conn.execute_batch(sql).map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            format!("cannot migrate from schema version {version}: {e}")
        })
    };
    match version {
        0 => run(&format!(
            "BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )),
        1 => run(MIGRATE_FROM_1),
        SCHEMA_VERSION => Ok(()),
        _ => Err(format!(
            "schema version {version}, this build knows {SCHEMA_VERSION}"
        )),
    }
}

/// Commits every request of the group in one transaction; each request's
/// writes are atomic on their own.
fn commit_group(conn: &mut Connection, batch: &[Request]) -> Vec<Result<(), StoreError>> {
    let fail_all = |e: rusqlite::Error| batch.iter().map(|_| Err(backend(&e))).collect();
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return fail_all(e),
    };
    let mut results = Vec::with_capacity(batch.len());
    for request in batch {
        let result = (|| {
            let sp = tx.savepoint()?;
            for write in &request.writes {
                apply_write(&sp, write)?;
            }
            sp.commit()
        })();
        results.push(result.map_err(backend));
    }
    match tx.commit() {
        Ok(()) => results,
        Err(e) => fail_all(e),
    }
}

fn apply_write(conn: &Connection, write: &Write) -> rusqlite::Result<()> {
    match write {
        Write::AppendChanges {
            doc,
            changes,
            heads,
        } => {
            put_heads(conn, doc, heads)?;
            let mut insert =
                conn.prepare_cached("INSERT INTO changes (doc, bytes) VALUES (?1, ?2)")?;
            for change in changes {
                insert.execute(params![doc.as_str(), change])?;
            }
        }
        Write::Snapshot { doc, bytes, heads } => {
            put_heads(conn, doc, heads)?;
            conn.prepare_cached(
                "INSERT INTO snapshots (id, bytes) VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET bytes = excluded.bytes",
            )?
            .execute(params![doc.as_str(), bytes])?;
            conn.prepare_cached("DELETE FROM changes WHERE doc = ?1")?
                .execute(params![doc.as_str()])?;
        }
        Write::PutMeta { key, value } => {
            conn.prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![key, value])?;
        }
        Write::DeleteMeta { key } => {
            conn.prepare_cached("DELETE FROM meta WHERE key = ?1")?
                .execute(params![key])?;
        }
    }
    Ok(())
}

fn put_heads(
    conn: &Connection,
    doc: &DocId,
    heads: &[automerge::ChangeHash],
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO docs (id, heads) VALUES (?1, ?2)
         ON CONFLICT (id) DO UPDATE SET heads = excluded.heads",
    )?
    .execute(params![doc.as_str(), encode_heads(heads)])
    .map(|_| ())
}

impl Store for Sqlite {
    fn docs(&self) -> Result<Vec<DocEntry>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> = self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached("SELECT id, heads FROM docs ORDER BY id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(id, heads)| {
                let corrupt = |reason: &str| StoreError::Corrupt {
                    what: format!("document {id:?}"),
                    reason: reason.to_owned(),
                };
                let doc = DocId::new(&id).map_err(|_| corrupt("invalid document id"))?;
                let heads = decode_heads(&heads).ok_or_else(|| corrupt("invalid heads"))?;
                Ok(DocEntry { id: doc, heads })
            })
            .collect()
    }

    fn load(&self, doc: &DocId) -> Result<Option<StoredDoc>, StoreError> {
        self.with_reader(|conn| {
            // Both reads see one snapshot of the database.
            conn.execute_batch("BEGIN")?;
            let result = (|| {
                let exists = conn
                    .prepare_cached("SELECT 1 FROM docs WHERE id = ?1")?
                    .query_row(params![doc.as_str()], |_| Ok(()))
                    .optional()?;
                if exists.is_none() {
                    return Ok(None);
                }
                let snapshot: Option<Vec<u8>> = conn
                    .prepare_cached("SELECT bytes FROM snapshots WHERE id = ?1")?
                    .query_row(params![doc.as_str()], |r| r.get(0))
                    .optional()?;
                let mut stmt =
                    conn.prepare_cached("SELECT bytes FROM changes WHERE doc = ?1 ORDER BY seq")?;
                let changes = stmt
                    .query_map(params![doc.as_str()], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<Vec<u8>>>>()?;
                Ok(Some(StoredDoc { snapshot, changes }))
            })();
            conn.execute_batch("COMMIT")?;
            result
        })
    }

    fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let (done, wait) = mpsc::sync_channel(1);
        {
            let sender = lock(&self.sender);
            let sender = sender.as_ref().ok_or(StoreError::Closed)?;
            sender
                .send(Request { writes, done })
                .map_err(|_| StoreError::Closed)?;
        }
        wait.recv().map_err(|_| StoreError::Closed)?
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_reader(|conn| {
            conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row(params![key], |r| r.get(0))
                .optional()
        })
    }

    fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT key, value FROM meta WHERE key >= ?1 ORDER BY key")?;
            let rows =
                stmt.query_map(params![prefix], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (key, value) = row?;
                if !key.starts_with(prefix) {
                    break;
                }
                out.push((key, value));
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_store_behaves_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        {
            let store = Sqlite::open(&path).unwrap();
            super::super::tests::exercise(&store);
        }
        let store = Sqlite::open(&path).unwrap();
        assert_eq!(store.docs().unwrap().len(), 2);
        assert_eq!(store.meta("peer/y").unwrap(), Some(vec![8]));
    }

    #[test]
    fn a_version_1_store_is_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let heads = encode_heads(&[automerge::ChangeHash([7; 32])]);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE docs (id TEXT PRIMARY KEY NOT NULL, heads BLOB NOT NULL, snapshot BLOB) WITHOUT ROWID;
                 CREATE TABLE changes (seq INTEGER PRIMARY KEY, doc TEXT NOT NULL, bytes BLOB NOT NULL);
                 CREATE INDEX changes_by_doc ON changes (doc, seq);
                 CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL) WITHOUT ROWID;
                 PRAGMA user_version = 1;",
            )
            .unwrap();
            conn.execute(
                "INSERT INTO docs VALUES ('snap', ?1, x'0102'), ('bare', ?1, NULL)",
                params![heads],
            )
            .unwrap();
            conn.execute_batch(
                "INSERT INTO changes (doc, bytes) VALUES ('snap', x'03'), ('bare', x'04'), ('bare', x'05');
                 INSERT INTO meta VALUES ('k', x'09');",
            )
            .unwrap();
        }
        for _ in 0..2 {
            let store = Sqlite::open(&path).unwrap();
            let ids: Vec<String> = store
                .docs()
                .unwrap()
                .into_iter()
                .map(|d| d.id.to_string())
                .collect();
            assert_eq!(ids, ["bare", "snap"]);
            let snap = store.load(&DocId::new("snap").unwrap()).unwrap().unwrap();
            assert_eq!(
                (snap.snapshot, snap.changes),
                (Some(vec![1, 2]), vec![vec![3]])
            );
            let bare = store.load(&DocId::new("bare").unwrap()).unwrap().unwrap();
            assert_eq!(
                (bare.snapshot, bare.changes),
                (None, vec![vec![4], vec![5]])
            );
            assert_eq!(store.meta("k").unwrap(), Some(vec![9]));
        }
        let version: i64 = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_newer_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
        let err = Sqlite::open(&path).unwrap_err();
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }

    #[test]
    fn second_open_is_refused_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let _first = Sqlite::open(&path).unwrap();
        assert!(matches!(Sqlite::open(&path), Err(StoreError::Locked(_))));
    }

    #[test]
    fn concurrent_commits_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = std::sync::Arc::new(Sqlite::open(&path).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let doc = DocId::new(&format!("d{t}")).unwrap();
                        store
                            .commit(vec![Write::AppendChanges {
                                doc,
                                changes: vec![vec![i]],
                                heads: vec![],
                            }])
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(store);
        let store = Sqlite::open(&path).unwrap();
        for t in 0..8 {
            let doc = store
                .load(&DocId::new(&format!("d{t}")).unwrap())
                .unwrap()
                .unwrap();
            assert_eq!(doc.changes, (0..50u8).map(|i| vec![i]).collect::<Vec<_>>());
        }
    }
}
