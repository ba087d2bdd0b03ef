//! `sync-node init`: writes a new node directory — the configuration file
//! and a freshly generated API token readable only by its owner.
//!
//! Both files are written to a temporary name and renamed into place, so a
//! crash never leaves a half-written config or token behind.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use archipelago::SiteName;

use crate::api::ApiToken;
use crate::config::{
    validate, ApiConfig, ConfigFile, PeerConfig, StoreConfig, SyncConfig, CONFIG_FILE_NAME,
    DATA_DIR_NAME, TOKEN_FILE_NAME,
};

/// What `sync-node init` writes.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The node's site.
    pub site: SiteName,
    /// The node directory, created if missing.
    pub dir: PathBuf,
    /// Address of the HTTP API (port 0 picks a free port at each start).
    pub api_listen: SocketAddr,
    /// Address of the sync endpoint (for the QUIC transport).
    pub sync_listen: SocketAddr,
    /// Directory of the cluster CA (for the QUIC transport).
    pub ca_dir: Option<PathBuf>,
    /// Peer sites (for the QUIC transport).
    pub peers: Vec<PeerConfig>,
    /// Replace an existing configuration (and token).
    pub force: bool,
}

impl InitOptions {
    /// Options for `site` in `dir`, with the API on `127.0.0.1:0` (a free
    /// port) and the sync endpoint on `127.0.0.1:0`, no peers.
    pub fn new(site: SiteName, dir: impl Into<PathBuf>) -> InitOptions {
        InitOptions {
            site,
            dir: dir.into(),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            sync_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ca_dir: None,
            peers: Vec::new(),
            force: false,
        }
    }
}

/// Why a node directory could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// A configuration exists and `force` was not given.
    #[error("{} already exists (use --force to overwrite it)", .0.display())]
    Exists(PathBuf),
    /// The options contradict each other.
    #[error("{0}")]
    Invalid(String),
    /// Writing failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Writes `DIR/sync-node.toml` and `DIR/api.token` (mode 0600) and returns
/// the path of the configuration file.
pub fn init(options: &InitOptions) -> Result<PathBuf, InitError> {
    let ca_dir = match &options.ca_dir {
        // Paths in the config are relative to the config's directory, so a
        // relative path given on the command line is made absolute first.
        Some(dir) => Some(std::path::absolute(dir).map_err(|source| InitError::Io {
            path: dir.clone(),
            source,
        })?),
        None => None,
    };
    let file = ConfigFile {
        site: options.site.clone(),
        data_dir: PathBuf::from(DATA_DIR_NAME),
        api: ApiConfig {
            listen: options.api_listen,
            token_file: PathBuf::from(TOKEN_FILE_NAME),
        },
        sync: Some(SyncConfig {
            listen: options.sync_listen,
            ca_dir,
        }),
        peers: options.peers.clone(),
        store: StoreConfig::default(),
        rules: Vec::new(),
    };
    validate(&file).map_err(InitError::Invalid)?;
    let text = toml::to_string(&file)
        .map_err(|e| InitError::Invalid(format!("cannot encode the config: {e}")))?;

    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InitError::Io { path, source }
    };
    std::fs::create_dir_all(&options.dir).map_err(io(&options.dir))?;
    let config_path = options.dir.join(CONFIG_FILE_NAME);
    if config_path.exists() && !options.force {
        return Err(InitError::Exists(config_path));
    }
    let token_path = options.dir.join(TOKEN_FILE_NAME);
    let token = ApiToken::generate();
    write_atomically(
        &token_path,
        format!("{}\n", token.as_str()).as_bytes(),
        true,
    )
    .map_err(io(&token_path))?;
    write_atomically(&config_path, text.as_bytes(), false).map_err(io(&config_path))?;
    Ok(config_path)
}

/// Writes `bytes` to a temporary file next to `path`, makes it durable and
/// renames it over `path`. With `private`, the file is created with mode
/// 0600 on Unix.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{file_name}.tmp"));
    let _ = std::fs::remove_file(&temp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let result = (|| {
        let mut file = options.open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn init_writes_a_loadable_config_and_a_private_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = InitOptions::new("us-east".parse().unwrap(), dir.path().join("node"));
        options.peers = vec!["eu-west=127.0.0.1:7081".parse().unwrap()];
        options.ca_dir = Some("ca".into());
        let path = init(&options).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.file.site.as_str(), "us-east");
        assert_eq!(config.file.peers, options.peers);
        let ca = config.file.sync.as_ref().unwrap().ca_dir.as_ref().unwrap();
        assert!(ca.is_absolute());
        let token = config.read_token().unwrap();
        assert_eq!(token.as_str().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(config.token_path())
                .unwrap()
                .permissions();
            assert_eq!(mode.mode() & 0o777, 0o600);
        }

        assert!(matches!(init(&options), Err(InitError::Exists(_))));
        options.force = true;
        init(&options).unwrap();
        let new_token = Config::load(&path).unwrap().read_token().unwrap();
        assert_ne!(new_token.as_str(), token.as_str());
    }

    #[test]
    fn init_refuses_self_and_duplicate_peers() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = InitOptions::new("us-east".parse().unwrap(), dir.path());
        options.peers = vec!["us-east=127.0.0.1:1".parse().unwrap()];
        assert!(matches!(init(&options), Err(InitError::Invalid(_))));
        options.peers = vec![
            "eu-west=127.0.0.1:1".parse().unwrap(),
            "eu-west=127.0.0.1:2".parse().unwrap(),
        ];
        assert!(matches!(init(&options), Err(InitError::Invalid(_))));
        assert!(!dir.path().join(CONFIG_FILE_NAME).exists());
    }
}
