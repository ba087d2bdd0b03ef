//! The QUIC transport on loopback: two sites that list each other converge
//! (documents written before and after connecting, then a live commit);
//! a site with a certificate from another CA and a site missing from the
//! peer list never exchange data; and a site whose endpoint restarts on the
//! same replica catches up. Every test is bounded in time.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{doc, index, loopback, nowhere, replica, site, write};

use archipelago::transport::quic::SyncEndpoint;
use archipelago::transport::tls::CertificateAuthority;
use archipelago::{Origin, Replica, SiteName};

/// Bound of every test.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until both replicas hold the same documents with the same heads.
async fn converge(a: &Replica, b: &Replica) {
    loop {
        let (left, right) = (index(a), index(b));
        if !left.is_empty() && left == right {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connected(endpoint: &SyncEndpoint, peer: &SiteName) {
    loop {
        if endpoint
            .peer_status()
            .iter()
            .any(|status| status.site == *peer && status.connected)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_converge_and_push_live_commits() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = CertificateAuthority::generate("test cluster").unwrap();
        let (a, b) = (replica("site-a"), replica("site-b"));
        for i in 0..20 {
            write(&a, &format!("orders/a-{i}"), i);
        }

        // site-a sorts first, so it dials; site-b only accepts.
        let east = SyncEndpoint::bind(
            loopback(),
            ca.issue_site(&site("site-b")).unwrap(),
            ca.cert_der(),
            vec![(site("site-a"), nowhere())],
            b.clone(),
        )
        .unwrap();
        let west = SyncEndpoint::bind(
            loopback(),
            ca.issue_site(&site("site-a")).unwrap(),
            ca.cert_der(),
            vec![(site("site-b"), east.local_addr().unwrap())],
            a.clone(),
        )
        .unwrap();
        connected(&west, &site("site-b")).await;
        connected(&east, &site("site-a")).await;
        for i in 0..5 {
            write(&b, &format!("orders/b-{i}"), i);
        }
        write(&b, "orders/a-3", 100);
        converge(&a, &b).await;
        assert_eq!(index(&a).len(), 25);

        // A live commit at A shows up at B.
        let mut feed = b.subscribe();
        let started = Instant::now();
        write(&a, "orders/live", 1);
        loop {
            let committed = feed.recv().await.unwrap();
            if committed.doc == doc("orders/live") {
                assert_eq!(committed.origin, Origin::Peer(site("site-a")));
                break;
            }
        }
        println!("live commit latency on loopback: {:?}", started.elapsed());
        assert_eq!(
            b.read_json(&doc("orders/live"), None)
                .unwrap()
                .map(|v| v.value),
            a.read_json(&doc("orders/live"), None)
                .unwrap()
                .map(|v| v.value),
        );

        // west sent 20 documents and a live change, and received b's writes.
        // Its counters are published after each send, so they may trail
        // what B has already applied by a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            let status = west.peer_status();
            assert_eq!(status.len(), 1);
            if status[0].traffic.batches_out >= 21 || Instant::now() > deadline {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(status[0].connected && status[0].last_seen.is_some());
        let traffic = status[0].traffic;
        assert!(
            traffic.batches_out >= 21 && traffic.bytes_out > 0,
            "{traffic:?}"
        );
        assert!(
            traffic.changes_in >= 5 && traffic.bytes_in > 0,
            "{traffic:?}"
        );
        west.shutdown().await;
        east.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_and_unlisted_site_never_get_data() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = CertificateAuthority::generate("test cluster").unwrap();
        let other_ca = CertificateAuthority::generate("other cluster").unwrap();
        let target = replica("site-m");
        let friend = replica("site-a");
        let foreign = replica("site-e");
        let stranger = replica("site-s");
        write(&target, "m/1", 1);
        write(&friend, "a/1", 1);
        write(&foreign, "e/1", 1);
        write(&stranger, "s/1", 1);

        let target_endpoint = SyncEndpoint::bind(
            loopback(),
            ca.issue_site(&site("site-m")).unwrap(),
            ca.cert_der(),
            vec![(site("site-a"), nowhere())],
            target.clone(),
        )
        .unwrap();
        let target_addr = target_endpoint.local_addr().unwrap();
        let peers = vec![(site("site-m"), target_addr)];
        // All three sort before site-m, so all three dial it.
        let friend_endpoint = SyncEndpoint::bind(
            loopback(),
            ca.issue_site(&site("site-a")).unwrap(),
            ca.cert_der(),
            peers.clone(),
            friend.clone(),
        )
        .unwrap();
        let foreign_endpoint = SyncEndpoint::bind(
            loopback(),
            other_ca.issue_site(&site("site-e")).unwrap(),
            other_ca.cert_der(),
            peers.clone(),
            foreign.clone(),
        )
        .unwrap();
        let stranger_endpoint = SyncEndpoint::bind(
            loopback(),
            ca.issue_site(&site("site-s")).unwrap(),
            ca.cert_der(),
            peers,
            stranger.clone(),
        )
        .unwrap();

        // The listed site converges, so the target is working...
        converge(&target, &friend).await;
        // ...while the refused ones retry for a while and get nothing.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let held = |r: &Replica| r.doc_ids("");
        assert_eq!(held(&target), vec![doc("a/1"), doc("m/1")]);
        assert_eq!(held(&foreign), vec![doc("e/1")]);
        assert_eq!(held(&stranger), vec![doc("s/1")]);
        for endpoint in [&foreign_endpoint, &stranger_endpoint] {
            let status = endpoint.peer_status();
            assert_eq!(status.len(), 1);
            assert!(!status[0].connected, "{status:?}");
            assert_eq!(status[0].last_seen, None, "{status:?}");
        }
        let status = target_endpoint.peer_status();
        assert_eq!(status.len(), 1, "only listed peers appear: {status:?}");
        assert!(status[0].connected);

        for endpoint in [
            friend_endpoint,
            foreign_endpoint,
            stranger_endpoint,
            target_endpoint,
        ] {
            endpoint.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_endpoint_catches_up_on_the_same_replica() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = CertificateAuthority::generate("test cluster").unwrap();
        let (a, b) = (replica("site-a"), replica("site-b"));
        write(&a, "x/1", 1);
        // Rebinding the address a shut-down endpoint held can briefly find
        // it still in use on a loaded machine: retry for a bounded time.
        let bind_b = |addr: SocketAddr| {
            let started = Instant::now();
            loop {
                match SyncEndpoint::bind(
                    addr,
                    ca.issue_site(&site("site-b")).unwrap(),
                    ca.cert_der(),
                    vec![(site("site-a"), nowhere())],
                    b.clone(),
                ) {
                    Ok(endpoint) => return endpoint,
                    Err(e) if started.elapsed() < Duration::from_secs(5) => {
                        eprintln!("rebinding {addr}: {e}; retrying");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("cannot bind {addr}: {e}"),
                }
            }
        };
        let east = bind_b(loopback());
        let east_addr = east.local_addr().unwrap();
        let west = SyncEndpoint::bind(
            loopback(),
            ca.issue_site(&site("site-a")).unwrap(),
            ca.cert_der(),
            vec![(site("site-b"), east_addr)],
            a.clone(),
        )
        .unwrap();
        converge(&a, &b).await;

        let stopped = Instant::now();
        east.shutdown().await;
        println!("shutdown took {:?}", stopped.elapsed());
        // A sees the graceful close promptly.
        while west.peer_status()[0].connected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for i in 0..10 {
            write(&a, &format!("x/after-{i}"), i);
        }
        write(&a, "x/1", 2);
        write(&b, "y/offline", 1);
        assert_ne!(index(&a), index(&b));

        let restarted = Instant::now();
        let east = bind_b(east_addr);
        converge(&a, &b).await;
        println!("caught up {:?} after restart", restarted.elapsed());
        assert_eq!(index(&a).len(), 12);
        west.shutdown().await;
        east.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_sending_an_oversized_frame_is_dropped() {
    use archipelago::protocol::wire::FRAME_BYTES_MAX;
    use archipelago::transport::quic::{
        connection_close, transport_config, STREAM_TAG_CONTROL, STREAM_TAG_LIVE,
    };
    use archipelago::transport::tls::client_config;
    use quinn::crypto::rustls::QuicClientConfig;

    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = CertificateAuthority::generate("test cluster").unwrap();
        let target = replica("site-m");
        write(&target, "m/1", 1);
        let target_endpoint = SyncEndpoint::bind(
            loopback(),
            ca.issue_site(&site("site-m")).unwrap(),
            ca.cert_der(),
            vec![(site("site-a"), nowhere())],
            target.clone(),
        )
        .unwrap();

        // A listed site with a valid certificate, speaking raw QUIC.
        let tls = client_config(
            &ca.issue_site(&site("site-a")).unwrap(),
            ca.cert_der(),
            &site("site-m"),
        )
        .unwrap();
        let mut client =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        client.transport_config(Arc::new(transport_config()));
        let endpoint = quinn::Endpoint::client(loopback()).unwrap();
        let connection = endpoint
            .connect_with(client, target_endpoint.local_addr().unwrap(), "site-m")
            .unwrap()
            .await
            .unwrap();
        let (mut control, mut control_in) = connection.open_bi().await.unwrap();
        control.write_all(&[STREAM_TAG_CONTROL]).await.unwrap();
        let (mut live, _live_in) = connection.open_bi().await.unwrap();
        live.write_all(&[STREAM_TAG_LIVE]).await.unwrap();
        // The target's Hello arrives: the streams were accepted.
        let mut prefix = [0u8; 4];
        control_in.read_exact(&mut prefix).await.unwrap();
        assert!(u32::from_be_bytes(prefix) > 0);

        let too_long = u32::try_from(FRAME_BYTES_MAX + 1).unwrap();
        live.write_all(&too_long.to_be_bytes()).await.unwrap();
        match connection.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(
                    close.error_code,
                    quinn::VarInt::from_u32(connection_close::PROTOCOL_ERROR)
                );
            }
            other => panic!("unexpected end: {other}"),
        }
        let status = target_endpoint.peer_status();
        assert!(!status[0].connected, "{status:?}");
        assert_eq!(status[0].pending_in, 0, "{status:?}");
        endpoint.close(quinn::VarInt::from_u32(0), b"");
        target_endpoint.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused_and_gets_no_data() {
    use archipelago::transport::quic::{transport_config, STREAM_TAG_CONTROL};
    use archipelago::transport::tls::ALPN_PROTOCOL;
    use quinn::crypto::rustls::QuicClientConfig;

    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = CertificateAuthority::generate("test cluster").unwrap();
        let target = replica("site-m");
        write(&target, "m/secret", 1);
        let target_endpoint = SyncEndpoint::bind(
            loopback(),
            ca.issue_site(&site("site-m")).unwrap(),
            ca.cert_der(),
            vec![(site("site-a"), nowhere())],
            target.clone(),
        )
        .unwrap();

        // Trusts the cluster CA but presents no certificate of its own.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        let mut client =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(Arc::new(tls)).unwrap()));
        client.transport_config(Arc::new(transport_config()));
        let endpoint = quinn::Endpoint::client(loopback()).unwrap();
        // With TLS 1.3 the client may finish its side of the handshake
        // before the server refuses it; no application data may follow.
        let outcome = async {
            let connection = endpoint
                .connect_with(client, target_endpoint.local_addr().unwrap(), "site-m")
                .ok()?
                .await
                .ok()?;
            let (mut control, mut control_in) = connection.open_bi().await.ok()?;
            control.write_all(&[STREAM_TAG_CONTROL]).await.ok()?;
            let mut prefix = [0u8; 4];
            control_in.read_exact(&mut prefix).await.ok()?;
            Some(prefix)
        }
        .await;
        assert_eq!(outcome, None, "a client without a certificate read data");
        assert_eq!(target.doc_ids(""), vec![doc("m/secret")]);
        assert!(target_endpoint.peer_status().iter().all(|p| !p.connected));
        endpoint.close(quinn::VarInt::from_u32(0), b"");
        target_endpoint.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_scope_keeps_documents_home_and_refuses_foreign_writes() {
    use archipelago::protocol::{Glob, Scope};

    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = CertificateAuthority::generate("test cluster").unwrap();
        let (eu, us) = (replica("eu-central"), replica("us-east"));
        write(&eu, "eu/patient-1", 1);
        write(&eu, "catalog/1", 1);
        write(&us, "eu/forged", 1);
        write(&us, "catalog/2", 2);
        // eu-central shares only the catalog with us-east, both ways.
        let catalog_only = Scope {
            send: vec![Glob::new("catalog/*")],
            receive: vec![Glob::new("catalog/*")],
        };
        let us_endpoint = SyncEndpoint::bind(
            loopback(),
            ca.issue_site(&site("us-east")).unwrap(),
            ca.cert_der(),
            vec![(site("eu-central"), nowhere())],
            us.clone(),
        )
        .unwrap();
        let eu_endpoint = SyncEndpoint::bind_scoped(
            loopback(),
            ca.issue_site(&site("eu-central")).unwrap(),
            ca.cert_der(),
            vec![(site("us-east"), us_endpoint.local_addr().unwrap())],
            [(site("us-east"), catalog_only)].into_iter().collect(),
            eu.clone(),
        )
        .unwrap();
        // The shared documents arrive both ways ...
        loop {
            if us.heads(&doc("catalog/1")).is_some() && eu.heads(&doc("catalog/2")).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // ... and a live edit outside the scope stays home.
        write(&eu, "eu/patient-1", 2);
        write(&eu, "catalog/1", 3);
        loop {
            if us.heads(&doc("catalog/1")) == eu.heads(&doc("catalog/1")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            us.heads(&doc("eu/patient-1")),
            None,
            "eu data left the EU site"
        );
        assert_eq!(
            eu.heads(&doc("eu/forged")),
            None,
            "a write outside the scope was accepted"
        );
        eu_endpoint.shutdown().await;
        us_endpoint.shutdown().await;
    })
    .await
    .expect("test timed out");
}
