//! `sync-node backup` and `sync-node restore`.
//!
//! `backup` saves a running node's store (`GET /v1/backup`) to a file: it
//! writes `FILE.partial`, checks that what arrived is whole and is a store
//! this build opens, makes it durable, and only then renames it to `FILE`.
//!
//! `restore` puts such a file in place of a stopped node's store, after the
//! same checks, and refuses a backup of another site unless told otherwise
//! (sites may hold different namespaces, and some data must not leave its
//! region). The replaced store is kept beside it. Once restarted, the node
//! writes with a fresh actor id (as at every start) and gets back from its
//! peers everything it wrote after the backup and they hold.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use archipelago::store::{inspect_backup, restore_backup, BackupInfo, StoreError};

use crate::api::backup::{DOCS_HEADER, SITE_HEADER};
use crate::client::Client;
use crate::config::Config;

/// Where `backup` gets the store from.
#[derive(Debug)]
pub enum Source {
    /// The node configured by this file.
    Config(PathBuf),
    /// The node whose API is at this URL, with the token in this file.
    Node {
        /// `http://HOST:PORT`.
        url: String,
        /// The node's `api.token`.
        token_file: PathBuf,
    },
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Saves a backup of the node at `source` to `out`, which must not exist.
pub fn backup(source: &Source, out: &Path) -> anyhow::Result<BackupInfo> {
    anyhow::ensure!(
        !out.exists(),
        "{} already exists; choose a new file",
        out.display()
    );
    let client = match source {
        Source::Config(path) => Client::from_config(path)?,
        Source::Node { url, token_file } => Client::from_url(url, token_file)?,
    };
    let partial = with_suffix(out, ".partial");
    let saved = save(&client, &partial).and_then(|info| {
        std::fs::rename(&partial, out)
            .with_context(|| format!("cannot rename {} to {}", partial.display(), out.display()))?;
        sync_parent(out)?;
        Ok(info)
    });
    if saved.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    saved
}

/// Downloads into `partial` and checks it.
fn save(client: &Client, partial: &Path) -> anyhow::Result<BackupInfo> {
    let mut file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut file);
    let (headers, written) = runtime.block_on(client.download("/v1/backup", &mut out))?;
    out.flush().context("cannot write the backup")?;
    drop(out);
    file.sync_all()
        .with_context(|| format!("cannot sync {}", partial.display()))?;
    drop(file);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(length) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
        anyhow::ensure!(
            length == written,
            "the node sent {written} of {length} bytes; the backup is incomplete"
        );
    }
    let info = inspect_backup(partial).context("what arrived is not a whole store")?;
    let site = info.label.as_ref().map(|l| l.site.as_str());
    anyhow::ensure!(
        site.is_some() && site == header(SITE_HEADER),
        "what arrived is labelled {site:?}, the node announced {:?}",
        header(SITE_HEADER)
    );
    anyhow::ensure!(
        header(DOCS_HEADER) == Some(info.docs.to_string().as_str()),
        "what arrived holds {} documents, the node announced {:?}",
        info.docs,
        header(DOCS_HEADER)
    );
    Ok(info)
}

fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// Restores the backup at `from` as the store of the (stopped) node
/// configured by `config_path`. A backup of another site is refused unless
/// `allow_other_site`.
pub fn restore(
    config_path: &Path,
    from: &Path,
    allow_other_site: bool,
) -> anyhow::Result<archipelago::store::Restored> {
    let config = Config::load(config_path)?;
    let info =
        inspect_backup(from).with_context(|| format!("cannot restore {}", from.display()))?;
    let site = config.file.site.as_str();
    match &info.label {
        Some(label) if label.site != site && !allow_other_site => anyhow::bail!(
            "{} is a backup of site {}, and this node is site {site}: sites may hold \
             different namespaces; pass --allow-other-site to restore it anyway",
            from.display(),
            label.site
        ),
        Some(_) => {}
        None => eprintln!(
            "warning: {} was not taken by `sync-node backup` (it has no label); restoring it as a store file",
            from.display()
        ),
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    restore_backup(from, &config.store_path(), now_ms).map_err(|e| match e {
        StoreError::Locked(_) => anyhow::anyhow!(
            "the store {} is in use: stop the node first ({e})",
            config.store_path().display()
        ),
        e => anyhow::Error::new(e).context(format!("cannot restore {}", from.display())),
    })
}
