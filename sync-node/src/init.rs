//! `sync-node init`: writes a new node directory — the configuration file,
//! a freshly generated API token readable only by its owner and, given the
//! cluster CA's directory, the site's identity: a key (readable only by its
//! owner), a certificate naming the site, and a copy of the CA certificate.
//!
//! Every file is written to a temporary name and renamed into place, and the
//! configuration file last, so a crash never leaves a half-written file, nor
//! a configuration naming files that do not exist yet.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use archipelago::transport::tls::{SiteIdentity, TlsError};
use archipelago::SiteName;

use crate::api::ApiToken;
use crate::ca::{load_ca, CaError, CA_CERT_FILE_NAME};
use crate::config::{
    validate, ApiConfig, ConfigFile, PeerConfig, StoreConfig, SyncConfig, CONFIG_FILE_NAME,
    DATA_DIR_NAME, SITE_CERT_FILE_NAME, SITE_KEY_FILE_NAME, TOKEN_FILE_NAME,
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
    /// Directory of the cluster CA (`sync-node ca init`); when given, the
    /// site's key and certificate are issued from it.
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
    /// The CA directory could not be used.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The site identity could not be issued.
    #[error("cannot issue the site identity: {0}")]
    Tls(TlsError),
    /// Writing failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Writes `DIR/api.token` (mode 0600), with a CA directory `DIR/site.key`
/// (mode 0600), `DIR/site.crt` and `DIR/ca.crt`, and last
/// `DIR/sync-node.toml`; returns the path of the configuration file.
/// [`written_files`] names them all.
pub fn init(options: &InitOptions) -> Result<PathBuf, InitError> {
    // Issue the identity before writing anything, so a bad CA leaves no
    // half-made node directory behind. The CA's directory is not recorded in
    // the config: it holds the CA's key, which stays off the sites.
    let identity = match &options.ca_dir {
        Some(dir) => {
            let ca = load_ca(dir)?;
            let identity = ca.issue_site(&options.site).map_err(|error| match error {
                TlsError::SiteNotDnsName(_) => InitError::Invalid(error.to_string()),
                error => InitError::Tls(error),
            })?;
            Some((identity, ca.cert_pem().to_owned()))
        }
        None => None,
    };
    let named = |name: &str| identity.as_ref().map(|_| PathBuf::from(name));
    let file = ConfigFile {
        site: options.site.clone(),
        data_dir: PathBuf::from(DATA_DIR_NAME),
        api: ApiConfig {
            listen: options.api_listen,
            token_file: PathBuf::from(TOKEN_FILE_NAME),
            cors_origins: Vec::new(),
        },
        sync: Some(SyncConfig {
            listen: options.sync_listen,
            ca_dir: None,
            cert: named(SITE_CERT_FILE_NAME),
            key: named(SITE_KEY_FILE_NAME),
            ca_cert: named(CA_CERT_FILE_NAME),
        }),
        peers: options.peers.clone(),
        store: StoreConfig::default(),
        clients: Default::default(),
        sagas: Default::default(),
        txn: Default::default(),
        backup: None,
        conflicts: Default::default(),
        rules: Vec::new(),
        escrow: Vec::new(),
        strong: None,
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
    if let Some((identity, ca_cert_pem)) = &identity {
        write_identity(&options.dir, identity, ca_cert_pem)?;
    }
    write_atomically(&config_path, text.as_bytes(), false).map_err(io(&config_path))?;
    Ok(config_path)
}

/// The files [`init`] writes for `options`, in the order it writes them.
pub fn written_files(options: &InitOptions) -> Vec<PathBuf> {
    let mut names = vec![TOKEN_FILE_NAME];
    if options.ca_dir.is_some() {
        names.extend([SITE_KEY_FILE_NAME, SITE_CERT_FILE_NAME, CA_CERT_FILE_NAME]);
    }
    names.push(CONFIG_FILE_NAME);
    names
        .into_iter()
        .map(|name| options.dir.join(name))
        .collect()
}

/// Writes the site's key, certificate and the CA certificate into `dir`.
fn write_identity(dir: &Path, identity: &SiteIdentity, ca_cert_pem: &str) -> Result<(), InitError> {
    let (cert_pem, key_pem) = identity.to_pem();
    let files = [
        (SITE_KEY_FILE_NAME, key_pem.as_str(), true),
        (SITE_CERT_FILE_NAME, cert_pem.as_str(), false),
        (CA_CERT_FILE_NAME, ca_cert_pem, false),
    ];
    for (name, text, private) in files {
        let path = dir.join(name);
        write_atomically(&path, text.as_bytes(), private)
            .map_err(|source| InitError::Io { path, source })?;
    }
    Ok(())
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

    fn mode(path: &Path) -> u32 {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(path).unwrap().permissions().mode() & 0o777
        }
        #[cfg(not(unix))]
        {
            let _ = path;
            0o600
        }
    }

    #[test]
    fn init_writes_a_loadable_config_and_a_private_token() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        crate::ca::init_ca(&ca_dir, false).unwrap();
        let mut options = InitOptions::new("us-east".parse().unwrap(), dir.path().join("node"));
        options.peers = vec!["eu-west=127.0.0.1:7081".parse().unwrap()];
        options.ca_dir = Some(ca_dir);
        let path = init(&options).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.file.site.as_str(), "us-east");
        assert_eq!(config.file.peers, options.peers);
        // The CA's directory (with its key) is not named in a site's config.
        assert_eq!(config.file.sync.as_ref().unwrap().ca_dir, None);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("ca_dir"), "{text}");
        let sync = config.load_sync_identity().unwrap().unwrap();
        assert_eq!(sync.identity.site().as_str(), "us-east");
        assert_eq!(mode(&options.dir.join(SITE_KEY_FILE_NAME)), 0o600);
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

        for file in written_files(&options) {
            assert!(file.is_file(), "{}", file.display());
        }
        let mut in_dir: Vec<_> = std::fs::read_dir(&options.dir)
            .unwrap()
            .map(|entry| options.dir.join(entry.unwrap().file_name()))
            .collect();
        in_dir.sort();
        let mut named = written_files(&options);
        named.sort();
        assert_eq!(in_dir, named, "init wrote a file it does not name");

        assert!(matches!(init(&options), Err(InitError::Exists(_))));
        options.force = true;
        init(&options).unwrap();
        let new_token = Config::load(&path).unwrap().read_token().unwrap();
        assert_ne!(new_token.as_str(), token.as_str());
    }

    #[test]
    fn init_without_a_ca_names_no_identity() {
        let dir = tempfile::tempdir().unwrap();
        let options = InitOptions::new("us-east".parse().unwrap(), dir.path());
        let config = Config::load(init(&options).unwrap()).unwrap();
        assert_eq!(config.tls_paths(), None);
        assert!(config.load_sync_identity().unwrap().is_none());
        assert!(!dir.path().join(SITE_KEY_FILE_NAME).exists());
    }

    #[test]
    fn init_with_a_missing_ca_or_an_unusable_site_name_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = InitOptions::new("us-east".parse().unwrap(), dir.path().join("node"));
        options.ca_dir = Some(dir.path().join("no-ca"));
        let error = init(&options).unwrap_err();
        assert!(matches!(error, InitError::Ca(_)), "{error}");
        assert!(error.to_string().contains("ca.crt"), "{error}");
        assert!(!options.dir.exists());

        crate::ca::init_ca(&dir.path().join("ca"), false).unwrap();
        options.ca_dir = Some(dir.path().join("ca"));
        options.site = "-east".parse().unwrap();
        assert!(matches!(init(&options), Err(InitError::Invalid(_))));
        assert!(!options.dir.exists());
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
