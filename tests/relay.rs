//! The fault-injecting UDP relay on loopback: without faults it echoes every
//! datagram; delay, loss, duplication, jitter and the partition switch do
//! what they say; each client gets its own upstream address; the same seed
//! gives the same drops; a non-loopback target is refused; and two QUIC sync
//! endpoints converge through a 20 ms, 1 % loss relay. Every test is bounded
//! in time.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::{doc, index, loopback, nowhere, replica, site, write};

use archipelago::transport::quic::SyncEndpoint;
use archipelago::transport::relay::{Faults, Relay};
use archipelago::transport::tls::CertificateAuthority;
use archipelago::Replica;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Bound of every socket-only test.
const TEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of the QUIC test's convergence.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a test waits before concluding that nothing more arrives.
const QUIET: Duration = Duration::from_millis(300);

async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out");
}

async fn loopback_socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// A UDP echo server; abort the handle to stop it.
async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
    let socket = loopback_socket().await;
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        loop {
            let Ok((len, from)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            let _ = socket.send_to(&buf[..len], from).await;
        }
    });
    (addr, task)
}

/// The next datagram on `socket` with its source, or `None` after `wait`.
async fn receive_within(socket: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
        Ok(received) => {
            let (len, from) = received.unwrap();
            Some((buf[..len].to_vec(), from))
        }
        Err(_) => None,
    }
}

async fn receive(socket: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 65_535];
    let (len, _) = socket.recv_from(&mut buf).await.unwrap();
    buf[..len].to_vec()
}

#[tokio::test]
async fn without_faults_every_datagram_comes_back() {
    bounded(async {
        let (echo, server) = echo_server().await;
        let relay = Relay::start(echo, Faults::default()).await.unwrap();
        let client = loopback_socket().await;
        let count = 200u32;
        let mut expected = HashSet::new();
        for i in 0..count {
            let payload = i.to_be_bytes().repeat(1 + i as usize % 50);
            client.send_to(&payload, relay.local_addr()).await.unwrap();
            expected.insert(payload);
            // Keep the kernel's socket buffers from overflowing.
            if i % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut received = HashSet::new();
        for _ in 0..count {
            received.insert(receive(&client).await);
        }
        assert_eq!(received, expected);
        let stats = relay.stats();
        let bytes: u64 = expected.iter().map(|p| p.len() as u64).sum();
        assert_eq!(stats.forwarded, 2 * u64::from(count), "{stats:?}");
        assert_eq!(stats.bytes, 2 * bytes, "{stats:?}");
        assert_eq!((stats.dropped, stats.duplicated), (0, 0), "{stats:?}");
        relay.stop().await;
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn delay_of_50ms_each_way_makes_the_round_trip_at_least_100ms() {
    bounded(async {
        let (echo, server) = echo_server().await;
        let faults = Faults {
            delay: Duration::from_millis(50),
            ..Faults::default()
        };
        let relay = Relay::start(echo, faults).await.unwrap();
        let client = loopback_socket().await;
        for _ in 0..3 {
            let started = Instant::now();
            client.send_to(b"ping", relay.local_addr()).await.unwrap();
            assert_eq!(receive(&client).await, b"ping");
            let round_trip = started.elapsed();
            println!("round trip through a 50 ms relay: {round_trip:?}");
            assert!(round_trip >= Duration::from_millis(100), "{round_trip:?}");
            assert!(round_trip < Duration::from_millis(1000), "{round_trip:?}");
        }
        relay.stop().await;
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn total_loss_delivers_nothing_and_counts_the_drops() {
    bounded(async {
        let (echo, server) = echo_server().await;
        let faults = Faults {
            loss: 1.0,
            ..Faults::default()
        };
        let relay = Relay::start(echo, faults).await.unwrap();
        let client = loopback_socket().await;
        for _ in 0..10 {
            client.send_to(b"lost", relay.local_addr()).await.unwrap();
        }
        assert_eq!(receive_within(&client, QUIET).await, None);
        let stats = relay.stats();
        assert_eq!((stats.dropped, stats.forwarded), (10, 0), "{stats:?}");
        relay.stop().await;
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn full_duplication_delivers_two_copies() {
    bounded(async {
        let target = loopback_socket().await;
        let faults = Faults {
            duplicate: 1.0,
            ..Faults::default()
        };
        let relay = Relay::start(target.local_addr().unwrap(), faults)
            .await
            .unwrap();
        let client = loopback_socket().await;
        client.send_to(b"twice", relay.local_addr()).await.unwrap();
        for _ in 0..2 {
            let (payload, _) = receive_within(&target, QUIET).await.unwrap();
            assert_eq!(payload, b"twice");
        }
        assert_eq!(receive_within(&target, QUIET).await, None);
        let stats = relay.stats();
        assert_eq!((stats.forwarded, stats.duplicated), (2, 1), "{stats:?}");
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn partition_drops_everything_and_healing_resumes_delivery() {
    bounded(async {
        let (echo, server) = echo_server().await;
        let relay = Relay::start(echo, Faults::default()).await.unwrap();
        let client = loopback_socket().await;
        client.send_to(b"before", relay.local_addr()).await.unwrap();
        assert_eq!(receive(&client).await, b"before");

        relay.set_partitioned(true);
        assert!(relay.is_partitioned());
        for _ in 0..5 {
            client.send_to(b"during", relay.local_addr()).await.unwrap();
        }
        assert_eq!(receive_within(&client, QUIET).await, None);
        assert_eq!(relay.stats().dropped, 5);

        relay.set_partitioned(false);
        assert!(!relay.is_partitioned());
        client.send_to(b"after", relay.local_addr()).await.unwrap();
        assert_eq!(receive(&client).await, b"after");
        let stats = relay.stats();
        assert_eq!((stats.forwarded, stats.dropped), (4, 5), "{stats:?}");
        relay.stop().await;
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn datagrams_queued_when_the_partition_starts_are_dropped() {
    bounded(async {
        let target = loopback_socket().await;
        let faults = Faults {
            delay: Duration::from_millis(100),
            ..Faults::default()
        };
        let relay = Relay::start(target.local_addr().unwrap(), faults)
            .await
            .unwrap();
        let client = loopback_socket().await;
        client
            .send_to(b"in flight", relay.local_addr())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        relay.set_partitioned(true);
        assert_eq!(receive_within(&target, QUIET).await, None);
        assert_eq!(relay.stats().dropped, 1);
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn jitter_reorders_but_delivers_everything() {
    bounded(async {
        let target = loopback_socket().await;
        let faults = Faults {
            delay: Duration::from_millis(10),
            jitter: Duration::from_millis(10),
            seed: 42,
            ..Faults::default()
        };
        let relay = Relay::start(target.local_addr().unwrap(), faults)
            .await
            .unwrap();
        let client = loopback_socket().await;
        let count = 100u32;
        for i in 0..count {
            client
                .send_to(&i.to_be_bytes(), relay.local_addr())
                .await
                .unwrap();
        }
        let mut order = Vec::new();
        for _ in 0..count {
            let payload = receive(&target).await;
            order.push(u32::from_be_bytes(payload.try_into().unwrap()));
        }
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..count).collect::<Vec<_>>());
        assert_ne!(
            order, sorted,
            "20 ms of jitter should reorder 100 datagrams"
        );
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn each_client_gets_its_own_upstream_address_and_its_own_replies() {
    bounded(async {
        let (echo, server) = echo_server().await;
        let relay = Relay::start(echo, Faults::default()).await.unwrap();
        // A plain target shows the source addresses the relay uses.
        let target = loopback_socket().await;
        let spy = Relay::start(target.local_addr().unwrap(), Faults::default())
            .await
            .unwrap();
        let (first, second) = (loopback_socket().await, loopback_socket().await);
        for (client, payload) in [(&first, b"one"), (&second, b"two")] {
            client.send_to(payload, relay.local_addr()).await.unwrap();
            client.send_to(payload, spy.local_addr()).await.unwrap();
        }
        assert_eq!(receive(&first).await, b"one");
        assert_eq!(receive(&second).await, b"two");
        let (_, from_first) = receive_within(&target, QUIET).await.unwrap();
        let (_, from_second) = receive_within(&target, QUIET).await.unwrap();
        assert_ne!(from_first, from_second);
        assert!(from_first.ip().is_loopback() && from_second.ip().is_loopback());
        relay.stop().await;
        spy.stop().await;
        server.abort();
    })
    .await;
}

/// How many of `count` one-way datagrams a relay with `faults` drops.
async fn drops_of(faults: Faults, count: u32) -> u64 {
    let target = loopback_socket().await;
    let relay = Relay::start(target.local_addr().unwrap(), faults)
        .await
        .unwrap();
    let client = loopback_socket().await;
    for i in 0..count {
        client
            .send_to(&i.to_be_bytes(), relay.local_addr())
            .await
            .unwrap();
    }
    // Every datagram is either forwarded or dropped.
    loop {
        let stats = relay.stats();
        if stats.forwarded + stats.dropped == u64::from(count) {
            relay.stop().await;
            return stats.dropped;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_same_seed_drops_the_same_datagrams() {
    bounded(async {
        let faults = |seed| Faults {
            loss: 0.5,
            seed,
            ..Faults::default()
        };
        let first = drops_of(faults(7), 200).await;
        assert_eq!(drops_of(faults(7), 200).await, first);
        assert!((50..150).contains(&first), "{first}");
    })
    .await;
}

#[tokio::test]
async fn set_faults_applies_to_later_datagrams() {
    bounded(async {
        let (echo, server) = echo_server().await;
        let lossy = Faults {
            loss: 1.0,
            ..Faults::default()
        };
        let relay = Relay::start(echo, lossy).await.unwrap();
        let client = loopback_socket().await;
        client.send_to(b"lost", relay.local_addr()).await.unwrap();
        assert_eq!(receive_within(&client, QUIET).await, None);
        relay.set_faults(Faults::default());
        client.send_to(b"back", relay.local_addr()).await.unwrap();
        assert_eq!(receive(&client).await, b"back");
        relay.stop().await;
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn a_target_off_loopback_is_refused() {
    bounded(async {
        for target in ["192.0.2.1:9", "0.0.0.0:9", "[::1]:9", "127.0.0.1:0"] {
            let error = Relay::start(target.parse().unwrap(), Faults::default())
                .await
                .unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{target}");
        }
    })
    .await;
}

// QUIC through the relay.

/// Waits until both replicas hold `docs` documents with the same heads.
async fn converge(a: &Replica, b: &Replica, docs: usize) {
    loop {
        let (left, right) = (index(a), index(b));
        if left.len() == docs && left == right {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Documents written at site-a before connecting: enough datagrams that
/// 1 % loss drops some.
const DOCS_A: i64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_sites_converge_through_a_lossy_delayed_relay() {
    let ca = CertificateAuthority::generate("test cluster").unwrap();
    let (a, b) = (replica("site-a"), replica("site-b"));
    for i in 0..DOCS_A {
        write(&a, &format!("orders/a-{i}"), i);
    }
    for i in 0..5 {
        write(&b, &format!("orders/b-{i}"), i);
    }

    // site-a sorts first, so it dials site-b, through the relay.
    let east = SyncEndpoint::bind(
        loopback(),
        ca.issue_site(&site("site-b")).unwrap(),
        ca.cert_der(),
        vec![(site("site-a"), nowhere())],
        b.clone(),
    )
    .unwrap();
    let faults = Faults {
        delay: Duration::from_millis(20),
        loss: 0.01,
        seed: 1,
        ..Faults::default()
    };
    let relay = Relay::start(east.local_addr().unwrap(), faults)
        .await
        .unwrap();
    let west = SyncEndpoint::bind(
        loopback(),
        ca.issue_site(&site("site-a")).unwrap(),
        ca.cert_der(),
        vec![(site("site-b"), relay.local_addr())],
        a.clone(),
    )
    .unwrap();

    let started = Instant::now();
    tokio::time::timeout(CONVERGE_TIMEOUT, converge(&a, &b, DOCS_A as usize + 5))
        .await
        .expect("replicas did not converge through the relay");
    println!(
        "converged through the relay in {:?}: {:?}",
        started.elapsed(),
        relay.stats()
    );

    // A later commit crosses too.
    write(&b, "orders/a-3", 100);
    let started = Instant::now();
    tokio::time::timeout(CONVERGE_TIMEOUT, converge(&a, &b, DOCS_A as usize + 5))
        .await
        .expect("a live commit did not cross the relay");
    println!("live commit crossed in {:?}", started.elapsed());
    assert_eq!(
        a.read_json(&doc("orders/a-3"), None)
            .unwrap()
            .map(|v| v.value),
        b.read_json(&doc("orders/a-3"), None)
            .unwrap()
            .map(|v| v.value),
    );
    let stats = relay.stats();
    assert!(stats.forwarded > 0 && stats.bytes > 0, "{stats:?}");

    tokio::time::timeout(TEST_TIMEOUT, async {
        west.shutdown().await;
        east.shutdown().await;
        relay.stop().await;
    })
    .await
    .expect("shutdown timed out");
}
