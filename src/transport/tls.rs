//! Site identities for mutual TLS: a cluster certificate authority, the
//! certificate and key it issues to each site, and the rustls configurations
//! that accept a peer only when its certificate chains to the cluster CA
//! *and* names a site on the local peer list.
//!
//! A site's certificate carries its [`SiteName`] as the only DNS name in its
//! subject alternative names and again as its common name, and is valid for
//! both server and client authentication, because every site both accepts
//! and opens connections. [`site_name_of`] reads the name back from a peer's
//! certificate. The configurations use the ring provider explicitly and TLS
//! 1.3 only; nothing here installs process-wide state.
//!
//! With TLS 1.3 a client finishes its side of the handshake before the
//! server has checked the client's certificate, so a client must not treat
//! a peer as accepted until the first application data has been exchanged.
//!
//! ```
//! use archipelago::transport::tls::{client_config, server_config, CertificateAuthority};
//!
//! let ca = CertificateAuthority::generate("example cluster")?;
//! let east = ca.issue_site(&"us-east".parse()?)?;
//! let west = ca.issue_site(&"us-west".parse()?)?;
//! // us-east accepts us-west; us-west connects to us-east.
//! let west_name = west.site().clone();
//! let _server = server_config(&east, ca.cert_der(), move |peer| *peer == west_name)?;
//! let _client = client_config(&west, ca.cert_der(), east.site())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName as RootHint};
use rustls::{ClientConfig, OtherError, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{PrivatePkcs8KeyDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::id::SiteName;

/// DER certificates and private keys, as rustls takes them.
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol both sides of a site-to-site connection must offer.
pub const ALPN_PROTOCOL: &[u8] = b"archipelago/1";

/// How long a site certificate is valid after it is issued.
pub const SITE_CERT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// How long a CA certificate is valid after it is generated; longer than any
/// site certificate it issues.
pub const CA_CERT_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 60 * 60);

/// How far before "now" certificates start being valid, so that a site whose
/// clock runs behind the issuer's still accepts a fresh certificate.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60 * 60);

/// Longest accepted CA name, in bytes (the X.520 upper bound for a common
/// name).
pub const CA_NAME_BYTES_MAX: usize = 64;

/// Longest accepted PEM input, in bytes. Our certificates and keys are a
/// few hundred bytes; the limit keeps a wrong file from being read whole.
pub const PEM_BYTES_MAX: usize = 64 * 1024;

/// Random bytes in a certificate serial number (RFC 5280 allows up to 20).
const SERIAL_BYTES: usize = 16;

/// Why an identity could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Generating a key or signing a certificate failed.
    #[error("cannot generate a key or certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM text could not be used.
    #[error("invalid {what} PEM: {reason}")]
    Pem {
        /// What the text should have held, such as "CA certificate".
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate could not be parsed or does not have the expected form.
    #[error("invalid certificate: {0}")]
    Certificate(String),
    /// A private key does not belong to the certificate it was given with.
    #[error("the {what} key does not belong to its certificate")]
    KeyMismatch {
        /// Whose key, such as "CA" or "site".
        what: &'static str,
    },
    /// A certificate given as a CA is not a CA certificate.
    #[error("the certificate is not a CA certificate")]
    NotCa,
    /// The CA name is empty or too long.
    #[error("invalid CA name {0:?}: must be 1 to {CA_NAME_BYTES_MAX} bytes")]
    InvalidCaName(String),
    /// A site name cannot be a DNS name, which the certificate needs.
    #[error(
        "site name {0} cannot be used in a certificate: it must also be a DNS name \
         (no leading or trailing '-', not all digits)"
    )]
    SiteNotDnsName(SiteName),
    /// A peer proved its identity but is not on the local peer list.
    #[error("site {0} is not on the peer list")]
    PeerNotAllowed(SiteName),
    /// The system clock cannot be turned into a certificate validity.
    #[error("the system clock is unusable for certificate validity: {0}")]
    Clock(String),
    /// rustls refused the configuration, the certificate or the key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// rustls could not build a certificate verifier.
    #[error("TLS certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The cluster certificate authority: it issues every site's certificate,
/// and every site trusts exactly it.
pub struct CertificateAuthority {
    cert: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Generates a new CA with a fresh key; `name` becomes its common name.
    pub fn generate(name: &str) -> Result<CertificateAuthority, TlsError> {
        if name.is_empty() || name.len() > CA_NAME_BYTES_MAX {
            return Err(TlsError::InvalidCaName(name.chars().take(80).collect()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        // Sites are issued directly by the CA: no intermediates.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        set_validity(&mut params, CA_CERT_VALIDITY)?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate and private key as PEM texts, in that order. The
    /// key must be kept secret: whoever holds it can mint site identities.
    pub fn to_pem(&self) -> (String, String) {
        (self.cert_pem.clone(), self.issuer.key().serialize_pem())
    }

    /// Loads a CA written by [`CertificateAuthority::to_pem`], checking that
    /// the certificate is a CA certificate and that the key is its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertificateAuthority, TlsError> {
        let cert = ca_cert_from_pem(cert_pem)?;
        let key_der = private_key_from_pem("CA key", key_pem)?;
        let key = KeyPair::try_from(&key_der).map_err(|e| TlsError::Pem {
            what: "CA key",
            reason: e.to_string(),
        })?;
        check_key_matches(&cert, &key, "CA")?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(CertificateAuthority {
            cert,
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate, the only trust root of every site.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate as PEM text (what sites are given as `ca.crt`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a fresh key and certificate for `site`: the site name is the
    /// certificate's only DNS name and its common name, the certificate is
    /// valid for [`SITE_CERT_VALIDITY`] for both server and client
    /// authentication.
    pub fn issue_site(&self, site: &SiteName) -> Result<SiteIdentity, TlsError> {
        // The client names the server by its site in the handshake, so the
        // site name must be a DNS name as rustls understands it.
        if ServerName::try_from(site.as_str()).is_err() {
            return Err(TlsError::SiteNotDnsName(site.clone()));
        }
        let dns_name = rcgen::string::Ia5String::try_from(site.as_str())
            .map_err(|_| TlsError::SiteNotDnsName(site.clone()))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::DnsName(dns_name)];
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, site.as_str());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        set_validity(&mut params, SITE_CERT_VALIDITY)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(SiteIdentity {
            site: site.clone(),
            cert_chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("CertificateAuthority")
            .field("cert_bytes", &self.cert.len())
            .finish_non_exhaustive()
    }
}

/// A site's certificate chain and private key, issued by the cluster CA.
/// The site name is read from the certificate, so it always matches it.
pub struct SiteIdentity {
    site: SiteName,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl SiteIdentity {
    /// The site the certificate names.
    pub fn site(&self) -> &SiteName {
        &self.site
    }

    /// The certificate chain, the site's own certificate first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    /// The private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The certificate chain and the private key as PEM texts, in that
    /// order (`site.crt` and `site.key`).
    pub fn to_pem(&self) -> (String, String) {
        (self.cert_pem.clone(), self.key_pem.clone())
    }

    /// Loads an identity written by [`SiteIdentity::to_pem`]: reads the site
    /// name from the first certificate and checks that the key is its key.
    /// Whether the chain leads to a trusted CA is checked by the peer.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<SiteIdentity, TlsError> {
        let cert_chain = certs_from_pem("site certificate", cert_pem)?;
        let Some(leaf) = cert_chain.first() else {
            return Err(TlsError::Pem {
                what: "site certificate",
                reason: "no certificate in it".to_owned(),
            });
        };
        let site = site_name_of(leaf)?;
        let key = private_key_from_pem("site key", key_pem)?;
        let key_pair = KeyPair::try_from(&key).map_err(|e| TlsError::Pem {
            what: "site key",
            reason: e.to_string(),
        })?;
        check_key_matches(leaf, &key_pair, "site")?;
        Ok(SiteIdentity {
            site,
            cert_chain,
            key,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }
}

impl fmt::Debug for SiteIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("SiteIdentity")
            .field("site", &self.site)
            .field("certs", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

/// Reads a CA certificate (such as a site's `ca.crt`) from PEM text holding
/// exactly one certificate, which must be a CA certificate.
pub fn ca_cert_from_pem(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    let mut certs = certs_from_pem("CA certificate", pem)?;
    if certs.len() != 1 {
        return Err(TlsError::Pem {
            what: "CA certificate",
            reason: format!("expected exactly one certificate, found {}", certs.len()),
        });
    }
    let cert = certs.remove(0);
    let parsed = parse_certificate(&cert)?;
    if !parsed.is_ca() {
        return Err(TlsError::NotCa);
    }
    Ok(cert)
}

/// The site named by a site certificate: its only subject alternative name,
/// which must be a DNS name that is a valid [`SiteName`] and equal to the
/// certificate's common name if it has one.
///
/// This does not check the signature or the validity period; use it on a
/// peer certificate after the TLS handshake verified it (rustls's
/// `peer_certificates()`), or on a certificate just loaded.
pub fn site_name_of(cert: &CertificateDer<'_>) -> Result<SiteName, TlsError> {
    let parsed = parse_certificate(cert)?;
    let names = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::Certificate(format!("bad subject alternative names: {e}")))?
        .ok_or_else(|| TlsError::Certificate("no subject alternative name".to_owned()))?;
    let name = match names.value.general_names.as_slice() {
        [GeneralName::DNSName(name)] => *name,
        [_] => {
            return Err(TlsError::Certificate(
                "the subject alternative name is not a DNS name".to_owned(),
            ))
        }
        other => {
            return Err(TlsError::Certificate(format!(
                "expected exactly one subject alternative name, found {}",
                other.len()
            )))
        }
    };
    let site = SiteName::new(name)
        .map_err(|e| TlsError::Certificate(format!("the DNS name is not a site name: {e}")))?;
    for common_name in parsed.subject().iter_common_name() {
        let common_name = common_name
            .as_str()
            .map_err(|e| TlsError::Certificate(format!("bad common name: {e}")))?;
        if common_name != site.as_str() {
            return Err(TlsError::Certificate(format!(
                "common name {:?} differs from the DNS name {site}",
                common_name.chars().take(80).collect::<String>()
            )));
        }
    }
    Ok(site)
}

/// A server configuration for `identity` that requires every client to
/// present a certificate chaining to `ca_cert` whose site name
/// ([`site_name_of`]) satisfies `allowed_peer`; anything else fails the
/// handshake. ALPN [`ALPN_PROTOCOL`], TLS 1.3 only.
///
/// The site of an accepted client can be read back from the connection's
/// `peer_certificates()` with [`site_name_of`].
pub fn server_config(
    identity: &SiteIdentity,
    ca_cert: &CertificateDer<'static>,
    allowed_peer: impl Fn(&SiteName) -> bool + Send + Sync + 'static,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let chain =
        WebPkiClientVerifier::builder_with_provider(roots(ca_cert)?, provider.clone()).build()?;
    let verifier = Arc::new(PeerListVerifier {
        chain,
        allowed_peer: Box::new(allowed_peer),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    // No session resumption: a resumed handshake skips the certificate
    // verifiers, so a peer that has since been removed from the list or
    // whose certificate expired would get back in; and over QUIC it saves
    // no bytes (the packets carrying the handshake are padded to 1,200
    // bytes either way) while every ticket costs some.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client configuration for `identity` connecting to `expected_peer`: the
/// server's certificate must chain to `ca_cert` and name `expected_peer`,
/// which is therefore also the server name to pass to the connection. The
/// client presents its own certificate. ALPN [`ALPN_PROTOCOL`], TLS 1.3
/// only.
pub fn client_config(
    identity: &SiteIdentity,
    ca_cert: &CertificateDer<'static>,
    expected_peer: &SiteName,
) -> Result<Arc<ClientConfig>, TlsError> {
    // Fail here, not at connect time, if the peer cannot be named.
    server_name(expected_peer)?;
    let provider = provider();
    // webpki checks that the certificate's DNS name equals the server name,
    // and site certificates carry exactly one DNS name: their site.
    let verifier =
        WebPkiServerVerifier::builder_with_provider(roots(ca_cert)?, provider.clone()).build()?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    // Every handshake checks both certificates (see `server_config`).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The server name a client passes to rustls to reach `site`.
pub fn server_name(site: &SiteName) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(site.as_str().to_owned())
        .map_err(|_| TlsError::SiteNotDnsName(site.clone()))
}

/// Checks a client certificate with webpki against the cluster CA, then
/// checks that the site it names is on the peer list.
struct PeerListVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    allowed_peer: Box<dyn Fn(&SiteName) -> bool + Send + Sync>,
}

impl fmt::Debug for PeerListVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerListVerifier")
            .field("chain", &self.chain)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for PeerListVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[RootHint] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let reject = |error: TlsError| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
        };
        let site = site_name_of(end_entity).map_err(reject)?;
        if !(self.allowed_peer)(&site) {
            return Err(reject(TlsError::PeerNotAllowed(site)));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The ring provider, passed explicitly so no process-wide default is set.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A root store holding only the cluster CA.
fn roots(ca_cert: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.clone())?;
    Ok(Arc::new(roots))
}

/// Parses one DER certificate, with nothing after it.
fn parse_certificate<'a>(
    cert: &'a CertificateDer<'_>,
) -> Result<x509_parser::certificate::X509Certificate<'a>, TlsError> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::Certificate(format!("not an X.509 certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(TlsError::Certificate(
            "trailing bytes after the certificate".to_owned(),
        ));
    }
    Ok(parsed)
}

fn certs_from_pem(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    check_pem_size(what, pem)?;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })
}

fn private_key_from_pem(what: &'static str, pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    check_pem_size(what, pem)?;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what,
        reason: e.to_string(),
    })
}

fn check_pem_size(what: &'static str, pem: &str) -> Result<(), TlsError> {
    if pem.len() > PEM_BYTES_MAX {
        return Err(TlsError::Pem {
            what,
            reason: format!("longer than {PEM_BYTES_MAX} bytes"),
        });
    }
    Ok(())
}

/// Checks that `key` is the private key of the public key in `cert`.
fn check_key_matches(
    cert: &CertificateDer<'_>,
    key: &KeyPair,
    what: &'static str,
) -> Result<(), TlsError> {
    let parsed = parse_certificate(cert)?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(TlsError::KeyMismatch { what });
    }
    Ok(())
}

/// A random positive serial number, so two certificates of one CA never
/// share one.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; SERIAL_BYTES] = rand::random();
    // The serial is a positive DER integer: clear the sign bit, and keep
    // the first byte non-zero so the encoding is always the same length.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Makes `params` valid from a little before now for `validity`.
fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), TlsError> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| TlsError::Clock("it is before 1970".to_owned()))?;
    let at = |seconds: u64| {
        i64::try_from(seconds)
            .ok()
            .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
            .ok_or_else(|| TlsError::Clock(format!("{seconds} s after 1970 is out of range")))
    };
    params.not_before = at(now.saturating_sub(CLOCK_SKEW_ALLOWANCE).as_secs())?;
    params.not_after = at(now.saturating_add(validity).as_secs())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str) -> SiteName {
        name.parse().unwrap()
    }

    #[test]
    fn issued_certificates_name_their_site() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let identity = ca.issue_site(&site("eu-west-1")).unwrap();
        assert_eq!(identity.site(), &site("eu-west-1"));
        assert_eq!(
            site_name_of(&identity.cert_chain()[0]).unwrap(),
            site("eu-west-1")
        );
        let parsed = parse_certificate(&identity.cert_chain()[0]).unwrap();
        assert!(!parsed.is_ca());
        let debug = format!("{identity:?} {ca:?}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
    }

    #[test]
    fn site_names_that_are_not_dns_names_are_refused() {
        let ca = CertificateAuthority::generate("test").unwrap();
        for name in ["123", "-east", "east-"] {
            let error = ca.issue_site(&site(name)).unwrap_err();
            assert!(
                matches!(error, TlsError::SiteNotDnsName(_)),
                "{name}: {error}"
            );
        }
    }

    #[test]
    fn ca_names_are_bounded() {
        assert!(matches!(
            CertificateAuthority::generate(""),
            Err(TlsError::InvalidCaName(_))
        ));
        assert!(CertificateAuthority::generate(&"c".repeat(CA_NAME_BYTES_MAX)).is_ok());
        assert!(CertificateAuthority::generate(&"c".repeat(CA_NAME_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn ambiguous_certificates_name_no_site() {
        let key = KeyPair::generate().unwrap();
        let two = CertificateParams::new(vec!["us-east".to_owned(), "us-west".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let error = site_name_of(two.der()).unwrap_err().to_string();
        assert!(error.contains("exactly one"), "{error}");

        let mut params = CertificateParams::new(vec!["us-east".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "us-west");
        let mismatch = params.self_signed(&key).unwrap();
        let error = site_name_of(mismatch.der()).unwrap_err().to_string();
        assert!(error.contains("common name"), "{error}");

        let ip = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(site_name_of(ip.der()).is_err());

        let upper = CertificateParams::new(vec!["US-EAST".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(site_name_of(upper.der()).is_err());

        assert!(site_name_of(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }

    #[test]
    fn keys_must_belong_to_their_certificates() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let other = CertificateAuthority::generate("other").unwrap();
        let (cert, _) = ca.to_pem();
        let (_, other_key) = other.to_pem();
        assert!(matches!(
            CertificateAuthority::from_pem(&cert, &other_key),
            Err(TlsError::KeyMismatch { what: "CA" })
        ));

        let east = ca.issue_site(&site("us-east")).unwrap();
        let west = ca.issue_site(&site("us-west")).unwrap();
        let (east_cert, _) = east.to_pem();
        let (_, west_key) = west.to_pem();
        assert!(matches!(
            SiteIdentity::from_pem(&east_cert, &west_key),
            Err(TlsError::KeyMismatch { what: "site" })
        ));
    }

    #[test]
    fn a_site_certificate_is_not_a_ca() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let (cert, key) = ca.issue_site(&site("us-east")).unwrap().to_pem();
        assert!(matches!(ca_cert_from_pem(&cert), Err(TlsError::NotCa)));
        assert!(CertificateAuthority::from_pem(&cert, &key).is_err());
        assert!(ca_cert_from_pem("no pem here").is_err());
        let (ca_pem, _) = ca.to_pem();
        let twice = format!("{ca_pem}{ca_pem}");
        assert!(ca_cert_from_pem(&twice).is_err());
    }

    /// Runs an in-memory handshake until it ends or the server refuses it;
    /// the bytes both ways, and the server's error if it refused.
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
        server_site: &SiteName,
    ) -> (rustls::ServerConnection, usize, Option<rustls::Error>) {
        let mut client =
            rustls::ClientConnection::new(client, server_name(server_site).unwrap()).unwrap();
        let mut server = rustls::ServerConnection::new(server).unwrap();
        let mut total = 0;
        for _ in 0..20 {
            let mut moved = false;
            while client.wants_write() {
                let mut bytes = Vec::new();
                client.write_tls(&mut bytes).unwrap();
                moved |= !bytes.is_empty();
                total += bytes.len();
                server.read_tls(&mut bytes.as_slice()).unwrap();
                if let Err(e) = server.process_new_packets() {
                    return (server, total, Some(e));
                }
            }
            while server.wants_write() {
                let mut bytes = Vec::new();
                server.write_tls(&mut bytes).unwrap();
                moved |= !bytes.is_empty();
                total += bytes.len();
                client.read_tls(&mut bytes.as_slice()).unwrap();
                client.process_new_packets().unwrap();
            }
            if !moved {
                break;
            }
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        (server, total, None)
    }

    #[test]
    fn every_handshake_checks_both_certificates_again() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let ca = CertificateAuthority::generate("test").unwrap();
        let east = ca.issue_site(&site("us-east")).unwrap();
        let west = ca.issue_site(&site("us-west")).unwrap();
        let allowed = Arc::new(AtomicBool::new(true));
        let still = allowed.clone();
        let server =
            server_config(&east, ca.cert_der(), move |_| still.load(Ordering::SeqCst)).unwrap();
        let client = client_config(&west, ca.cert_der(), east.site()).unwrap();
        let (first, first_bytes, error) = handshake(client.clone(), server.clone(), east.site());
        assert!(error.is_none(), "{error:?}");
        let (second, second_bytes, error) = handshake(client.clone(), server.clone(), east.site());
        assert!(error.is_none(), "{error:?}");
        // Same configurations, so a session could have been resumed: it is
        // not, and no ticket is sent.
        assert_eq!(first.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(second.handshake_kind(), Some(rustls::HandshakeKind::Full));
        // (ECDSA signatures vary by a byte or two in length.)
        assert!(
            first_bytes.abs_diff(second_bytes) <= 8,
            "{first_bytes} then {second_bytes}"
        );
        // So a client taken off the peer list is refused at once.
        allowed.store(false, Ordering::SeqCst);
        let (_, _, error) = handshake(client, server, east.site());
        assert!(
            error.is_some(),
            "the server must refuse a client no longer listed"
        );
    }
}
