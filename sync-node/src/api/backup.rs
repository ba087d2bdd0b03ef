//! `GET /v1/backup`: a consistent copy of the node's store, streamed as one
//! SQLite file ([`Sqlite::backup_to`]); `sync-node backup` saves it and
//! `sync-node restore` puts it back. The node's scheduled backups
//! (`[backup]`) go through the same [`Backups`], one at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::stream;
use tokio::io::AsyncReadExt as _;

use archipelago::store::{BackupInfo, BackupLabel, Sqlite};
use archipelago::SiteName;

use super::error::ApiError;
use super::{telemetry, ApiState};

/// Whether `name` is one of the names [`Backups::save_scheduled`] writes
/// (`SITE-` then 13 digits then `.db`, or that plus `.partial`), so pruning
/// never touches anything else in the directory.
fn is_scheduled_name(name: &str, prefix: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    let stem = rest
        .strip_suffix(".db.partial")
        .or_else(|| rest.strip_suffix(".db"));
    stem.is_some_and(|digits| digits.len() == 13 && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Longest wait for a node's first scheduled backup when its backup
/// directory holds none yet.
pub const FIRST_BACKUP_DELAY_MAX: Duration = Duration::from_secs(60);

/// File name prefix of copies staged in the data directory.
const STAGED_PREFIX: &str = ".backup-";

/// Bytes read from the copy per chunk of the answer.
const CHUNK_BYTES: usize = 64 << 10;

/// The answer's header naming the site the backup was taken from.
pub const SITE_HEADER: &str = "x-archipelago-site";
/// The answer's header with the number of documents in the backup.
pub const DOCS_HEADER: &str = "x-archipelago-docs";
/// The answer's header with when the backup was taken (ms since the epoch).
pub const TAKEN_AT_HEADER: &str = "x-archipelago-taken-at-ms";

/// Takes backups of a node's store, one at a time.
#[derive(Debug)]
pub struct Backups {
    store: Arc<Sqlite>,
    site: SiteName,
    /// Where copies are written before they are streamed (the data
    /// directory: the same file system as the store, which has room for
    /// it).
    dir: PathBuf,
    running: Arc<tokio::sync::Mutex<()>>,
}

impl Backups {
    /// Backups of `store`, the store of `site`, staged in `dir`. Copies a
    /// killed process left staged there are removed.
    pub fn new(store: Arc<Sqlite>, site: SiteName, dir: PathBuf) -> Backups {
        let stale: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(STAGED_PREFIX)
            })
            .map(|entry| entry.path())
            .collect();
        for path in stale {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(file = %path.display(), "removed a stale backup copy"),
                Err(error) => {
                    tracing::warn!(file = %path.display(), %error, "cannot remove a stale backup copy")
                }
            }
        }
        Backups {
            store,
            site,
            dir,
            running: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Writes a backup into `dir` as `SITE-MS.db` (`MS` the time, in ms
    /// since the epoch, 13 digits), after any backup being sent, then
    /// deletes this site's oldest backups there beyond `keep`. For the
    /// node's schedule (`[backup]`).
    pub async fn save_scheduled(
        self: &Arc<Self>,
        dir: PathBuf,
        keep: usize,
    ) -> Result<(PathBuf, BackupInfo), archipelago::Error> {
        let _running = self.running.clone().lock_owned().await;
        let backups = self.clone();
        let started = std::time::Instant::now();
        let saved = tokio::task::spawn_blocking(move || backups.save_into(&dir, keep))
            .await
            .map_err(|e| {
                archipelago::store::StoreError::Backend(format!("the backup task failed: {e}"))
            })?;
        let written = saved.as_ref().ok().map(|(_, info)| info.bytes);
        telemetry::record_backup(written, started.elapsed());
        saved
    }

    /// How long until the first scheduled backup into `dir`: one
    /// `interval` after the newest of this site's backups there (at once
    /// when that is past), so restarts do not put backups off; without
    /// any, [`FIRST_BACKUP_DELAY_MAX`] at most.
    pub fn first_scheduled_in(&self, dir: &Path, interval: Duration) -> Duration {
        let prefix = format!("{}-", self.site);
        let newest_ms = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                if !is_scheduled_name(&name, &prefix) || name.ends_with(".partial") {
                    return None;
                }
                name[prefix.len()..prefix.len() + 13].parse::<i64>().ok()
            })
            .max();
        let Some(newest_ms) = newest_ms else {
            return interval.min(FIRST_BACKUP_DELAY_MAX);
        };
        let age_ms = self.label().taken_at_ms.saturating_sub(newest_ms).max(0);
        let age = Duration::from_millis(u64::try_from(age_ms).unwrap_or(0));
        interval.saturating_sub(age)
    }

    fn save_into(
        &self,
        dir: &Path,
        keep: usize,
    ) -> Result<(PathBuf, BackupInfo), archipelago::Error> {
        let io = |what: String, e: std::io::Error| {
            archipelago::store::StoreError::Backend(format!("{what}: {e}"))
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| io(format!("cannot create {}", dir.display()), e))?;
        let label = self.label();
        let path = dir.join(format!("{}-{:013}.db", label.site, label.taken_at_ms));
        let info = self.store.backup_to(&path, &label)?;
        // Names sort by time; a copy a killed process left half-written
        // ends in `.partial` and goes too.
        let prefix = format!("{}-", label.site);
        let mut ours: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
            .map_err(|e| io(format!("cannot list {}", dir.display()), e))?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                is_scheduled_name(&name, &prefix).then(|| (name, entry.path()))
            })
            .collect();
        ours.sort();
        let (partial, whole): (Vec<_>, Vec<_>) = ours
            .into_iter()
            .partition(|(name, _)| name.ends_with(".partial"));
        let excess = whole.len().saturating_sub(keep);
        for (_, old) in partial.iter().chain(&whole[..excess]) {
            if let Err(error) = std::fs::remove_file(old) {
                tracing::warn!(file = %old.display(), %error, "cannot delete an old backup");
            }
        }
        tracing::info!(file = %path.display(), docs = info.docs, bytes = info.bytes, "took a scheduled backup");
        Ok((path, info))
    }

    fn label(&self) -> BackupLabel {
        let taken_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        BackupLabel {
            site: self.site.to_string(),
            taken_at_ms,
        }
    }

    /// Writes a copy into the staging directory and opens it; the file is
    /// unlinked at once, so it vanishes when the answer is done, however it
    /// ends.
    fn take(&self) -> Result<(std::fs::File, BackupInfo), archipelago::Error> {
        let label = self.label();
        let path = self.dir.join(format!(
            "{STAGED_PREFIX}{}.db",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let info = self.store.backup_to(&path, &label)?;
        let file = std::fs::File::open(&path);
        let _ = std::fs::remove_file(&path);
        let file = file.map_err(|e| {
            archipelago::store::StoreError::Backend(format!(
                "cannot open the copy {}: {e}",
                path.display()
            ))
        })?;
        Ok((file, info))
    }
}

/// `GET /v1/backup`: the node's store as an SQLite file
/// (`application/vnd.sqlite3`), with its site, document count and time in
/// the `x-archipelago-*` headers. 409 `backup_running` while another backup
/// is being sent; 404 `backup_off` where the API has no store to copy.
pub(crate) async fn download(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let Some(backups) = state.backups.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "backup_off",
            "this API serves no backups",
        ));
    };
    let running = backups.running.clone().try_lock_owned().map_err(|_| {
        ApiError::new(
            StatusCode::CONFLICT,
            "backup_running",
            "a backup is being taken; try again when it is done",
        )
    })?;
    let started = std::time::Instant::now();
    let taken = tokio::task::spawn_blocking(move || backups.take())
        .await
        .map_err(|e| ApiError::internal(format!("the backup task failed: {e}")))?;
    let written = taken.as_ref().ok().map(|(_, info)| info.bytes);
    telemetry::record_backup(written, started.elapsed());
    let (file, info) = taken?;
    tracing::info!(
        docs = info.docs,
        bytes = info.bytes,
        seconds = started.elapsed().as_secs_f64(),
        "took a backup"
    );
    let label = info
        .label
        .clone()
        .ok_or_else(|| ApiError::internal("the backup's copy has no label"))?;
    let file = tokio::fs::File::from_std(file);
    // The lock is held until the last chunk is sent (or the client leaves).
    let chunks = stream::unfold(
        (file, running, info.bytes),
        |(mut file, running, left)| async move {
            if left == 0 {
                return None;
            }
            let mut chunk =
                vec![0u8; CHUNK_BYTES.min(usize::try_from(left).unwrap_or(CHUNK_BYTES))];
            match file.read_exact(&mut chunk).await {
                Ok(_) => {
                    let left = left - chunk.len() as u64;
                    Some((Ok(chunk), (file, running, left)))
                }
                Err(e) => Some((Err(e), (file, running, 0))),
            }
        },
    );
    let header = |value: String| {
        HeaderValue::from_str(&value).map_err(|e| ApiError::internal(e.to_string()))
    };
    let mut response = Response::new(Body::from_stream(chunks));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.sqlite3"),
    );
    headers.insert(header::CONTENT_LENGTH, header(info.bytes.to_string())?);
    headers.insert(
        header::CONTENT_DISPOSITION,
        header(format!(
            "attachment; filename=\"{}-{}.db\"",
            label.site, label.taken_at_ms
        ))?,
    );
    headers.insert(SITE_HEADER, header(label.site)?);
    headers.insert(DOCS_HEADER, header(info.docs.to_string())?);
    headers.insert(TAKEN_AT_HEADER, header(label.taken_at_ms.to_string())?);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiToken;
    use archipelago::store::{inspect_backup, Memory, Store};
    use archipelago::{Replica, ReplicaOptions};
    use axum::response::IntoResponse as _;

    fn state(backups: Option<Arc<Backups>>) -> ApiState {
        let site: SiteName = "us-east".parse().unwrap();
        let replica = Replica::open(ReplicaOptions::new(site), Arc::new(Memory::new())).unwrap();
        let state = ApiState::new(replica, ApiToken::generate());
        match backups {
            Some(backups) => state.with_backups(backups),
            None => state,
        }
    }

    async fn answer(state: ApiState) -> Response {
        match download(State(state)).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        }
    }

    #[test]
    fn pruning_only_considers_scheduled_names() {
        let prefix = "eu-west-";
        for name in [
            "eu-west-1767225600000.db",
            "eu-west-1767225600000.db.partial",
        ] {
            assert!(is_scheduled_name(name, prefix), "{name}");
        }
        for name in [
            "eu-west-notes.db",
            "eu-west-176722560000.db",
            "eu-west-1767225600000.sqlite",
            "eu-west-2-1767225600000.db",
            "us-east-1767225600000.db",
        ] {
            assert!(!is_scheduled_name(name, prefix), "{name}");
        }
    }

    #[test]
    fn the_first_scheduled_backup_follows_the_newest_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Sqlite::open(dir.path().join("store.db")).unwrap());
        let backups = Backups::new(store, "eu-west".parse().unwrap(), dir.path().to_path_buf());
        let out = dir.path().join("backups");
        let hour = Duration::from_secs(3600);
        // None yet: soon.
        assert_eq!(
            backups.first_scheduled_in(&out, hour),
            FIRST_BACKUP_DELAY_MAX
        );
        assert_eq!(
            backups.first_scheduled_in(&out, Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        std::fs::create_dir_all(&out).unwrap();
        let now_ms = backups.label().taken_at_ms;
        let touch = |ms: i64| std::fs::write(out.join(format!("eu-west-{ms:013}.db")), "").unwrap();
        // Two hours old: at once.
        touch(now_ms - 7_200_000);
        assert_eq!(backups.first_scheduled_in(&out, hour), Duration::ZERO);
        // Ten minutes old: fifty minutes from now, give or take the test's
        // own time.
        touch(now_ms - 600_000);
        let wait = backups.first_scheduled_in(&out, hour);
        assert!(
            wait <= Duration::from_secs(3000) && wait > Duration::from_secs(2990),
            "{wait:?}"
        );
        // Other sites' backups and half-written copies do not count.
        std::fs::write(out.join(format!("us-east-{now_ms:013}.db")), "").unwrap();
        std::fs::write(out.join(format!("eu-west-{now_ms:013}.db.partial")), "").unwrap();
        let again = backups.first_scheduled_in(&out, hour);
        assert!(
            again <= wait && again > Duration::from_secs(2990),
            "{again:?}"
        );
    }

    #[tokio::test]
    async fn one_backup_at_a_time_and_none_without_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Sqlite::open(dir.path().join("store.db")).unwrap());
        let site: SiteName = "us-east".parse().unwrap();
        let replica = Replica::open(
            ReplicaOptions::new(site.clone()),
            store.clone() as Arc<dyn Store>,
        )
        .unwrap();
        let ops: Vec<archipelago::doc::Op> =
            serde_json::from_value(serde_json::json!([{"op": "set", "path": "/x", "value": 1}]))
                .unwrap();
        replica
            .apply_ops(&"a".parse().unwrap(), &ops, None)
            .unwrap();
        let stale = dir.path().join(".backup-0011223344556677.db.partial");
        std::fs::write(&stale, b"left by a killed process").unwrap();
        let backups = Arc::new(Backups::new(store, site, dir.path().to_path_buf()));
        assert!(!stale.exists());

        let response = answer(state(None)).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);

        let held = backups.running.clone().try_lock_owned().unwrap();
        let response = answer(state(Some(backups.clone()))).await;
        assert_eq!(response.status(), StatusCode::CONFLICT);
        drop(held);

        let response = answer(state(Some(backups.clone()))).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[DOCS_HEADER], "1");
        assert_eq!(response.headers()[SITE_HEADER], "us-east");
        // While the answer is being sent, another backup waits its turn.
        assert_eq!(
            answer(state(Some(backups.clone()))).await.status(),
            StatusCode::CONFLICT
        );
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        // The staged copy is gone; what was sent is a whole store.
        let staged: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with(".backup-"))
            .collect();
        assert!(staged.is_empty(), "{staged:?}");
        let copy = dir.path().join("copy.db");
        std::fs::write(&copy, &bytes).unwrap();
        let info = inspect_backup(&copy).unwrap();
        assert_eq!((info.docs, info.bytes), (1, bytes.len() as u64));
        // Once it is sent, the next one may start.
        let response = answer(state(Some(backups))).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
}
