//! `sync-node ca init`: the cluster certificate authority on disk — a
//! directory holding the CA certificate (`ca.crt`, public, copied to every
//! site) and its private key (`ca.key`, mode 0600, needed only to issue site
//! identities with `sync-node init --ca-dir`).
//!
//! Both files are written to a temporary name and renamed into place, and
//! an existing CA is never replaced without `force`: replacing it would
//! orphan every site identity it issued.

use std::path::{Path, PathBuf};

use archipelago::transport::tls::{CertificateAuthority, TlsError};

use crate::init::write_atomically;

/// Name of the CA certificate file, in the CA directory and in node
/// directories.
pub const CA_CERT_FILE_NAME: &str = "ca.crt";
/// Name of the CA private key file in the CA directory.
pub const CA_KEY_FILE_NAME: &str = "ca.key";
/// Common name of CAs made by `sync-node ca init`.
pub const CA_NAME: &str = "archipelago cluster CA";

/// Why a CA directory could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A CA file exists and `force` was not given.
    #[error("{} already exists (use --force to replace the CA; sites it issued will no longer be trusted)", .0.display())]
    Exists(PathBuf),
    /// A file could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// "read" or "write".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA files are not a usable CA.
    #[error("CA in {}: {source}", dir.display())]
    Tls {
        /// The CA directory.
        dir: PathBuf,
        /// What is wrong.
        source: TlsError,
    },
}

/// The files of a CA directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// The CA certificate.
    pub cert: PathBuf,
    /// The CA private key.
    pub key: PathBuf,
}

impl CaFiles {
    /// The files of the CA in `dir`.
    pub fn in_dir(dir: &Path) -> CaFiles {
        CaFiles {
            cert: dir.join(CA_CERT_FILE_NAME),
            key: dir.join(CA_KEY_FILE_NAME),
        }
    }
}

/// Generates a new CA into `dir` (created if missing): `ca.crt` and
/// `ca.key` (mode 0600). Refuses if either file exists, unless `force`.
pub fn init_ca(dir: &Path, force: bool) -> Result<CaFiles, CaError> {
    let files = CaFiles::in_dir(dir);
    if !force {
        for path in [&files.cert, &files.key] {
            if path.exists() {
                return Err(CaError::Exists(path.clone()));
            }
        }
    }
    let ca = CertificateAuthority::generate(CA_NAME).map_err(|source| CaError::Tls {
        dir: dir.to_path_buf(),
        source,
    })?;
    let (cert_pem, key_pem) = ca.to_pem();
    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CaError::Io {
            action: "write",
            path,
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(write_error(dir))?;
    // The key first: a crash in between leaves no certificate whose key is
    // lost.
    write_atomically(&files.key, key_pem.as_bytes(), true).map_err(write_error(&files.key))?;
    write_atomically(&files.cert, cert_pem.as_bytes(), false).map_err(write_error(&files.cert))?;
    Ok(files)
}

/// Loads the CA in `dir`, checking that the key belongs to the certificate.
pub fn load_ca(dir: &Path) -> Result<CertificateAuthority, CaError> {
    let files = CaFiles::in_dir(dir);
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| CaError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    CertificateAuthority::from_pem(&cert_pem, &key_pem).map_err(|source| CaError::Tls {
        dir: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_is_written_privately_loaded_back_and_not_overwritten() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("ca");
        let files = init_ca(&dir, false).unwrap();
        assert_eq!(files, CaFiles::in_dir(&dir));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let ca = load_ca(&dir).unwrap();
        let cert = std::fs::read_to_string(&files.cert).unwrap();
        assert_eq!(ca.cert_pem(), cert);

        assert!(matches!(init_ca(&dir, false), Err(CaError::Exists(_))));
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), cert);
        init_ca(&dir, true).unwrap();
        assert_ne!(std::fs::read_to_string(&files.cert).unwrap(), cert);
    }

    #[test]
    fn a_missing_ca_names_the_file() {
        let temp = tempfile::tempdir().unwrap();
        let error = load_ca(temp.path()).unwrap_err().to_string();
        assert!(error.contains(CA_CERT_FILE_NAME), "{error}");
    }
}
