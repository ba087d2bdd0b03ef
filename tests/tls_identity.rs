//! Site identities in real rustls handshakes, run in memory (no sockets):
//! two sites of one CA that list each other connect and learn each other's
//! site; a certificate from another CA, an unlisted site, a missing client
//! certificate and a server certificate for the wrong site are all refused.
//! Because a TLS 1.3 client can finish before the server rejects it, every
//! refusal is checked on both sides: the server reports an error and no
//! application data gets through.

use std::io::{Read as _, Write as _};
use std::sync::Arc;

use archipelago::transport::tls::{
    ca_cert_from_pem, client_config, server_config, server_name, site_name_of,
    CertificateAuthority, SiteIdentity, TlsError, ALPN_PROTOCOL,
};
use archipelago::SiteName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

fn site(name: &str) -> SiteName {
    name.parse().unwrap()
}

/// Most rounds of byte exchange before a handshake is declared stuck.
const ROUNDS_MAX: usize = 20;

/// What happened to one side of a connection.
#[derive(Debug, Default)]
struct Outcome {
    /// The first error the side reported, if any.
    error: Option<rustls::Error>,
}

/// Moves every pending TLS record from `from` to `to` and lets `to` process
/// them. Returns whether any bytes moved.
fn transfer(
    from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    to_outcome: &mut Outcome,
) -> bool {
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).unwrap();
    }
    if bytes.is_empty() || to_outcome.error.is_some() {
        return !bytes.is_empty();
    }
    let mut reader = &bytes[..];
    while !reader.is_empty() {
        if to.read_tls(&mut reader).unwrap() == 0 {
            break;
        }
        if let Err(error) = to.process_new_packets() {
            to_outcome.error = Some(error);
            break;
        }
    }
    true
}

/// Pumps bytes both ways until neither side has anything to send.
fn pump(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
    client_outcome: &mut Outcome,
    server_outcome: &mut Outcome,
) {
    for _ in 0..ROUNDS_MAX {
        let to_server = transfer(client, server, server_outcome);
        let to_client = transfer(server, client, client_outcome);
        if !to_server && !to_client {
            return;
        }
    }
    panic!("the connection did not settle in {ROUNDS_MAX} rounds");
}

/// The result of connecting a client to a server in memory.
struct Connection {
    client: ClientConnection,
    server: ServerConnection,
    client_outcome: Outcome,
    server_outcome: Outcome,
}

impl Connection {
    /// Runs the handshake as far as it goes.
    fn open(client: Arc<ClientConfig>, server: Arc<ServerConfig>, server_site: &SiteName) -> Self {
        let client = ClientConnection::new(client, server_name(server_site).unwrap()).unwrap();
        let server = ServerConnection::new(server).unwrap();
        let mut connection = Connection {
            client,
            server,
            client_outcome: Outcome::default(),
            server_outcome: Outcome::default(),
        };
        connection.pump();
        connection
    }

    fn pump(&mut self) {
        pump(
            &mut self.client,
            &mut self.server,
            &mut self.client_outcome,
            &mut self.server_outcome,
        );
    }

    /// Sends a request from the client and an answer from the server; true
    /// only if both arrived intact.
    fn exchange_application_data(&mut self) -> bool {
        if self.client.writer().write_all(b"ping").is_err() {
            return false;
        }
        self.pump();
        let mut request = [0u8; 4];
        if self.server_outcome.error.is_some()
            || self.server.is_handshaking()
            || self.server.reader().read_exact(&mut request).is_err()
            || &request != b"ping"
        {
            return false;
        }
        if self.server.writer().write_all(b"pong").is_err() {
            return false;
        }
        self.pump();
        let mut answer = [0u8; 4];
        self.client_outcome.error.is_none()
            && self.client.reader().read_exact(&mut answer).is_ok()
            && &answer == b"pong"
    }

    /// Asserts that the server refused the client and that no data flows.
    fn assert_refused(mut self, why: &str) -> rustls::Error {
        let server_error = self
            .server_outcome
            .error
            .take()
            .unwrap_or_else(|| panic!("{why}: the server accepted the handshake"));
        assert!(
            !self.exchange_application_data(),
            "{why}: application data got through"
        );
        server_error
    }
}

/// Two sites of `ca` that list each other.
fn pair(ca: &CertificateAuthority) -> (SiteIdentity, SiteIdentity) {
    (
        ca.issue_site(&site("us-east")).unwrap(),
        ca.issue_site(&site("eu-west")).unwrap(),
    )
}

fn only(site: &SiteName) -> impl Fn(&SiteName) -> bool + Send + Sync + 'static {
    let site = site.clone();
    move |peer| *peer == site
}

#[test]
fn sites_of_one_ca_that_list_each_other_connect_and_learn_each_others_site() {
    let ca = CertificateAuthority::generate("test cluster").unwrap();
    let (east, west) = pair(&ca);
    let server = server_config(&east, ca.cert_der(), only(west.site())).unwrap();
    let client = client_config(&west, ca.cert_der(), east.site()).unwrap();
    let mut connection = Connection::open(client, server, east.site());
    assert!(connection.client_outcome.error.is_none());
    assert!(connection.server_outcome.error.is_none());
    assert!(!connection.client.is_handshaking());
    assert!(!connection.server.is_handshaking());
    assert!(connection.exchange_application_data());

    let client_cert = &connection.server.peer_certificates().unwrap()[0];
    assert_eq!(site_name_of(client_cert).unwrap(), site("eu-west"));
    let server_cert = &connection.client.peer_certificates().unwrap()[0];
    assert_eq!(site_name_of(server_cert).unwrap(), site("us-east"));
    assert_eq!(connection.server.alpn_protocol(), Some(ALPN_PROTOCOL));
    assert_eq!(connection.client.alpn_protocol(), Some(ALPN_PROTOCOL));
    assert_eq!(
        connection.client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let ca = CertificateAuthority::generate("test cluster").unwrap();
    let rogue_ca = CertificateAuthority::generate("rogue").unwrap();
    let east = ca.issue_site(&site("us-east")).unwrap();
    // Same site name as a listed peer, but issued by the wrong CA.
    let rogue_west = rogue_ca.issue_site(&site("eu-west")).unwrap();
    let server = server_config(&east, ca.cert_der(), only(&site("eu-west"))).unwrap();
    // The rogue client trusts the real CA, so only the server can object.
    let client = client_config(&rogue_west, ca.cert_der(), east.site()).unwrap();
    let error = Connection::open(client, server, east.site()).assert_refused("wrong CA");
    assert!(
        matches!(error, rustls::Error::InvalidCertificate(_)),
        "{error:?}"
    );
}

#[test]
fn a_client_site_that_is_not_on_the_peer_list_is_refused() {
    let ca = CertificateAuthority::generate("test cluster").unwrap();
    let (east, west) = pair(&ca);
    let stranger = ca.issue_site(&site("ap-south")).unwrap();
    let server = server_config(&east, ca.cert_der(), only(west.site())).unwrap();
    let client = client_config(&stranger, ca.cert_der(), east.site()).unwrap();
    let error = Connection::open(client, server, east.site()).assert_refused("unlisted site");
    // The server's error says which site was refused, for its log.
    let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = &error else {
        panic!("unexpected error {error:?}");
    };
    let cause = other.0.downcast_ref::<TlsError>();
    assert!(
        matches!(cause, Some(TlsError::PeerNotAllowed(peer)) if peer.as_str() == "ap-south"),
        "{error:?}"
    );
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let ca = CertificateAuthority::generate("test cluster").unwrap();
    let (east, west) = pair(&ca);
    let server = server_config(&east, ca.cert_der(), only(west.site())).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let mut client =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    client.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    let error = Connection::open(Arc::new(client), server, east.site())
        .assert_refused("no client certificate");
    assert!(
        matches!(error, rustls::Error::NoCertificatesPresented),
        "{error:?}"
    );
}

#[test]
fn a_server_certificate_for_another_site_is_refused() {
    let ca = CertificateAuthority::generate("test cluster").unwrap();
    let (east, west) = pair(&ca);
    let impostor = ca.issue_site(&site("ap-south")).unwrap();
    // ap-south answers where west expects us-east.
    let server = server_config(&impostor, ca.cert_der(), only(west.site())).unwrap();
    let client = client_config(&west, ca.cert_der(), east.site()).unwrap();
    let mut connection = Connection::open(client, server, east.site());
    let client_error = connection
        .client_outcome
        .error
        .take()
        .expect("the client accepted a certificate for the wrong site");
    assert!(
        matches!(
            client_error,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. }
            ) | rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
        ),
        "{client_error:?}"
    );
    // The client aborted before sending its certificate: the server never
    // completes the handshake.
    assert!(connection.server.is_handshaking());
    assert!(!connection.exchange_application_data());
}

#[test]
fn ca_and_site_identities_survive_a_pem_round_trip() {
    let ca = CertificateAuthority::generate("test cluster").unwrap();
    let (cert_pem, key_pem) = ca.to_pem();
    assert!(cert_pem.contains("BEGIN CERTIFICATE"));
    assert!(key_pem.contains("PRIVATE KEY"));
    let loaded = CertificateAuthority::from_pem(&cert_pem, &key_pem).unwrap();
    assert_eq!(loaded.cert_der(), ca.cert_der());
    assert_eq!(loaded.to_pem(), (cert_pem.clone(), key_pem));
    assert_eq!(&ca_cert_from_pem(&cert_pem).unwrap(), ca.cert_der());

    // A site issued by the reloaded CA is trusted by sites of the original.
    let east = ca.issue_site(&site("us-east")).unwrap();
    let west = loaded.issue_site(&site("eu-west")).unwrap();
    let (west_cert, west_key) = west.to_pem();
    let west = SiteIdentity::from_pem(&west_cert, &west_key).unwrap();
    assert_eq!(west.site(), &site("eu-west"));
    assert_eq!(west.to_pem(), (west_cert, west_key));

    let (east_cert, east_key) = east.to_pem();
    let east = SiteIdentity::from_pem(&east_cert, &east_key).unwrap();
    let ca_cert = ca_cert_from_pem(&cert_pem).unwrap();
    let server = server_config(&east, &ca_cert, only(west.site())).unwrap();
    let client = client_config(&west, &ca_cert, east.site()).unwrap();
    let mut connection = Connection::open(client, server, east.site());
    assert!(connection.exchange_application_data());
}
