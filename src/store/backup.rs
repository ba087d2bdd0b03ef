//! Online backups of a [`Sqlite`] store, and restoring one in place of a
//! closed store.
//!
//! A backup is an ordinary store file, compacted (`VACUUM INTO`), in one
//! file (rollback journal rather than WAL), and labelled with the site it
//! was taken from and when (`meta` keys under `backup/`). Taking one reads a
//! single consistent snapshot: commits go on meanwhile, and the backup holds
//! exactly the writes acknowledged before it began.
//!
//! Restoring puts a backup in place of a store file whose store is closed
//! (its lock is held for the duration, so nothing opens it meanwhile); the
//! replaced file is kept beside it, never deleted. A restored store lacks
//! what its site wrote after the backup. The replica that opens it writes
//! with a fresh actor id, as every replica does, so sequence numbers never
//! fork, and reconciliation with peers brings back everything they hold.
//! It may also lack conflict resolutions it made and sent: a restored store
//! holds automatic resolutions ([`RESOLUTIONS_HELD_KEY`]) until they are
//! released, so a compensation is not run a second time.

use std::fs::File;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::sqlite::{lock_path, Sqlite, SCHEMA_VERSION, SCHEMA_VERSIONS_OPENED};
use super::StoreError;

/// The `meta` key of the site a backup was taken from.
const SITE_KEY: &str = "backup/site";
/// The `meta` key of when a backup was taken (ms since the Unix epoch).
const TAKEN_AT_KEY: &str = "backup/taken_at_ms";
/// The `meta` key whose presence holds a replica's automatic conflict
/// resolutions (`Replica::resolutions_held`): [`restore_backup`] sets it to
/// the time of the restore.
pub const RESOLUTIONS_HELD_KEY: &str = "resolutions/held";

/// Where a backup came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupLabel {
    /// The site whose store was copied.
    pub site: String,
    /// When the copy was taken, ms since the Unix epoch.
    pub taken_at_ms: i64,
}

/// What a backup file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// Its label; `None` for a store file that is not a backup.
    pub label: Option<BackupLabel>,
    /// Documents in it.
    pub docs: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// What [`restore_backup`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The backup that is now the store.
    pub backup: BackupInfo,
    /// Where the replaced store file was moved (with its WAL), if there was
    /// one.
    pub replaced: Option<PathBuf>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Makes a rename or a new file in `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| backend(format!("cannot sync {}: {e}", dir.display())))
}

impl Sqlite {
    /// Writes a consistent, compacted copy of the store to `dest`, labelled
    /// with `label`. Commits are not held up while it runs. `dest` must not
    /// exist; the copy is written beside it (`dest` + `.partial`), made
    /// durable, and only then renamed to `dest`.
    pub fn backup_to(&self, dest: &Path, label: &BackupLabel) -> Result<BackupInfo, StoreError> {
        if dest.exists() {
            return Err(backend(format!("{} already exists", dest.display())));
        }
        let partial = with_suffix(dest, ".partial");
        let text = partial
            .to_str()
            .ok_or_else(|| backend(format!("{} is not valid UTF-8", partial.display())))?
            .to_owned();
        match std::fs::remove_file(&partial) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(backend(format!("cannot remove {text}: {e}"))),
        }
        let written = self
            .with_reader(|conn| conn.execute("VACUUM INTO ?1", params![text]))
            .and_then(|_| label_copy(&partial, label))
            .and_then(|()| {
                File::open(&partial)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| backend(format!("cannot sync {text}: {e}")))
            })
            .and_then(|()| {
                std::fs::rename(&partial, dest)
                    .map_err(|e| backend(format!("cannot rename {text}: {e}")))
            });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        sync_parent(dest)?;
        // Whoever receives the copy checks it whole (`sync-node backup`
        // does); here only its label and count are read back.
        inspect(dest, false)
    }
}

/// Labels a fresh copy and turns it into a single file.
fn label_copy(path: &Path, label: &BackupLabel) -> Result<(), StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA synchronous = FULL;")
        .map_err(backend)?;
    put_meta(&conn, SITE_KEY, label.site.as_bytes())?;
    put_meta(&conn, TAKEN_AT_KEY, &label.taken_at_ms.to_be_bytes())?;
    conn.close().map_err(|(_, e)| backend(e))
}

/// Marks a restored copy so its replica holds automatic resolutions.
fn hold_resolutions(path: &Path, now_ms: i64) -> Result<(), StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    put_meta(&conn, RESOLUTIONS_HELD_KEY, &now_ms.to_be_bytes())?;
    conn.close().map_err(|(_, e)| backend(e))
}

fn put_meta(conn: &Connection, key: &str, value: &[u8]) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map(|_| ())
    .map_err(backend)
}

/// Opens the store file at `path` read-only and checks that it is one this
/// build can open, whole (SQLite's `quick_check`): its schema version, its
/// tables, its label if it is a backup, and how many documents it holds.
pub fn inspect_backup(path: &Path) -> Result<BackupInfo, StoreError> {
    inspect(path, true)
}

/// [`inspect_backup`], with SQLite's `quick_check` (a read of the whole
/// file) only when `check`: a copy this process just wrote needs none.
fn inspect(path: &Path, check: bool) -> Result<BackupInfo, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        what: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::metadata(path)
        .map_err(|e| backend(format!("cannot read {}: {e}", path.display())))?
        .len();
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| corrupt(format!("not a store: {e}")))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| corrupt(format!("not a store: {e}")))?;
    if !SCHEMA_VERSIONS_OPENED.contains(&version) {
        return Err(corrupt(format!(
            "schema version {version}, this build knows {SCHEMA_VERSION}"
        )));
    }
    if check {
        let result: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| corrupt(format!("cannot check: {e}")))?;
        if result != "ok" {
            return Err(corrupt(format!("damaged: {result}")));
        }
    }
    let docs: i64 = conn
        .query_row("SELECT count(*) FROM docs", [], |r| r.get(0))
        .map_err(|e| corrupt(format!("no document table: {e}")))?;
    let meta = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| corrupt(format!("no meta table: {e}")))
    };
    let label = match (meta(SITE_KEY)?, meta(TAKEN_AT_KEY)?) {
        (Some(site), Some(taken)) => {
            let site = String::from_utf8(site).map_err(|_| corrupt("site label".into()))?;
            let taken: [u8; 8] = taken.try_into().map_err(|_| corrupt("time label".into()))?;
            Some(BackupLabel {
                site,
                taken_at_ms: i64::from_be_bytes(taken),
            })
        }
        _ => None,
    };
    Ok(BackupInfo {
        label,
        docs: u64::try_from(docs).unwrap_or(0),
        bytes,
    })
}

/// Puts the backup at `backup` in place of the store file at `store`, whose
/// store must be closed ([`StoreError::Locked`] otherwise). The backup is
/// checked first ([`inspect_backup`]) and copied, never moved; the replaced
/// file and its WAL are renamed with `.replaced-<ms>` appended, where `ms`
/// is `now_ms`.
pub fn restore_backup(backup: &Path, store: &Path, now_ms: i64) -> Result<Restored, StoreError> {
    let info = inspect_backup(backup)?;
    let lock_file = lock_path(store);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_file)
        .map_err(|e| backend(format!("cannot open {}: {e}", lock_file.display())))?;
    lock.try_lock()
        .map_err(|e| StoreError::Locked(format!("{}: {e}", lock_file.display())))?;

    let partial = with_suffix(store, ".partial");
    let copied = std::fs::copy(backup, &partial)
        .map_err(|e| {
            backend(format!(
                "cannot copy the backup to {}: {e}",
                partial.display()
            ))
        })
        .and_then(|_| hold_resolutions(&partial, now_ms))
        .and_then(|()| {
            File::open(&partial)
                .and_then(|f| f.sync_all())
                .map_err(|e| backend(format!("cannot sync {}: {e}", partial.display())))
        });
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    let replaced = if store.exists() {
        let aside = with_suffix(store, &format!(".replaced-{now_ms}"));
        // The WAL holds committed writes the main file may not have yet: it
        // moves with it, under the name SQLite looks for beside the new one.
        for suffix in ["-wal", ""] {
            let from = with_suffix(store, suffix);
            if from.exists() {
                std::fs::rename(&from, with_suffix(&aside, suffix))
                    .map_err(|e| backend(format!("cannot move {} aside: {e}", from.display())))?;
            }
        }
        let _ = std::fs::remove_file(with_suffix(store, "-shm"));
        Some(aside)
    } else {
        None
    };
    std::fs::rename(&partial, store)
        .map_err(|e| backend(format!("cannot rename {}: {e}", partial.display())))?;
    sync_parent(store)?;
    Ok(Restored {
        backup: info,
        replaced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::DocId;
    use crate::store::{Store, Write};

    fn label() -> BackupLabel {
        BackupLabel {
            site: "us-east".to_owned(),
            taken_at_ms: 1_767_225_600_000,
        }
    }

    fn append(store: &Sqlite, doc: &str, byte: u8) {
        store
            .commit(vec![Write::AppendChanges {
                doc: DocId::new(doc).unwrap(),
                changes: vec![vec![byte]],
                heads: vec![],
            }])
            .unwrap();
    }

    #[test]
    fn a_backup_holds_what_was_committed_before_it_and_restores_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let backup = dir.path().join("backup.db");
        let store = Sqlite::open(&path).unwrap();
        append(&store, "a", 1);
        append(&store, "b", 2);
        let info = store.backup_to(&backup, &label()).unwrap();
        assert_eq!(info.docs, 2);
        assert_eq!(info.label, Some(label()));
        assert!(info.bytes > 0);
        assert!(!with_suffix(&backup, ".partial").exists());
        // A second backup to the same file is refused, the first one kept.
        assert!(store.backup_to(&backup, &label()).is_err());
        assert_eq!(inspect_backup(&backup).unwrap(), info);

        append(&store, "c", 3);
        // The store is open: restoring over it is refused.
        assert!(matches!(
            restore_backup(&backup, &path, 7),
            Err(StoreError::Locked(_))
        ));
        drop(store);

        let restored = restore_backup(&backup, &path, 7).unwrap();
        assert_eq!(restored.backup, info);
        let aside = restored.replaced.unwrap();
        assert_eq!(aside, dir.path().join("store.db.replaced-7"));
        let store = Sqlite::open(&path).unwrap();
        let ids: Vec<String> = store
            .docs()
            .unwrap()
            .into_iter()
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(
            store
                .load(&DocId::new("b").unwrap())
                .unwrap()
                .unwrap()
                .changes,
            [vec![2]]
        );
        assert_eq!(
            store.meta(RESOLUTIONS_HELD_KEY).unwrap(),
            Some(7i64.to_be_bytes().to_vec())
        );
        drop(store);
        // The replaced store, moved with its WAL, still holds "c".
        let old = Sqlite::open(&aside).unwrap();
        assert_eq!(old.docs().unwrap().len(), 3);
    }

    #[test]
    fn a_file_that_is_not_a_store_is_refused_and_nothing_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        drop(Sqlite::open(&path).unwrap());
        let bogus = dir.path().join("bogus.db");
        std::fs::write(&bogus, b"not a database at all, just some text").unwrap();
        assert!(matches!(
            inspect_backup(&bogus),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(restore_backup(&bogus, &path, 1).is_err());
        assert!(restore_backup(&dir.path().join("missing.db"), &path, 1).is_err());
        // A SQLite file of some other application.
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        let refused = restore_backup(&other, &path, 1).unwrap_err();
        assert!(
            refused.to_string().contains("schema version 0"),
            "{refused}"
        );
        assert!(!dir.path().join("store.db.replaced-1").exists());
        assert!(Sqlite::open(&path).is_ok());
    }

    #[test]
    fn a_store_that_is_not_a_backup_has_no_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = Sqlite::open(&path).unwrap();
        append(&store, "a", 1);
        drop(store);
        let info = inspect_backup(&path).unwrap();
        assert_eq!((info.label, info.docs), (None, 1));
    }
}
