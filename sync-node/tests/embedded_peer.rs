//! A service embedding a replica is a peer of its site's node: with an
//! identity issued by `sync-node init --ca-dir` and its own
//! `SyncEndpoint`, it syncs with the node over QUIC both ways, the node
//! reports it as a connected peer, and both end at the same heads digest.

use std::time::Duration;

use archipelago::store::Memory;
use archipelago::transport::quic::SyncEndpoint;
use archipelago::transport::tls::{ca_cert_from_pem, SiteIdentity};
use archipelago::{Origin, Replica, ReplicaOptions};
use reqwest::StatusCode;
use serde_json::json;
use sync_node::config::Config;
use sync_node::init::{init, InitOptions};
use sync_node::Node;

mod support;
use support::get_json;

/// Bound on every wait for something to happen over the network.
const WAIT: Duration = Duration::from_secs(20);
/// Bound on the whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread")]
async fn an_embedded_replica_syncs_with_its_sites_node_both_ways() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let temp = tempfile::tempdir().unwrap();
        let ca_dir = temp.path().join("ca");
        sync_node::ca::init_ca(&ca_dir, false).unwrap();

        // The node, `us-east`; `svc-east` sorts first, so the service dials
        // and the node's entry for it needs no real address.
        let mut options = InitOptions::new("us-east".parse().unwrap(), temp.path().join("node"));
        options.ca_dir = Some(ca_dir.clone());
        options.peers = vec!["svc-east=127.0.0.1:9".parse().unwrap()];
        let node = Node::start(&Config::load(init(&options).unwrap()).unwrap())
            .await
            .unwrap();

        // The service's identity, issued the way the README says.
        let service_dir = temp.path().join("svc-east");
        let mut options = InitOptions::new("svc-east".parse().unwrap(), &service_dir);
        options.ca_dir = Some(ca_dir.clone());
        init(&options).unwrap();
        let read = |name: &str| std::fs::read_to_string(service_dir.join(name)).unwrap();
        let identity = SiteIdentity::from_pem(&read("site.crt"), &read("site.key")).unwrap();
        let ca = ca_cert_from_pem(&read("ca.crt")).unwrap();
        let replica = Replica::open(
            ReplicaOptions::new("svc-east".parse().unwrap()),
            std::sync::Arc::new(Memory::new()),
        )
        .unwrap();
        let mut feed = replica.subscribe();
        let endpoint = SyncEndpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            identity,
            &ca,
            vec![("us-east".parse().unwrap(), node.sync_addr().unwrap())],
            replica.clone(),
        )
        .unwrap();

        // The service writes; the node serves it.
        let order = "orders/1".parse().unwrap();
        replica
            .put_json(&order, &json!({ "qty": 2 }), Some("from the service"))
            .unwrap();
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = get_json(&http, &node, "/v1/docs/orders%2F1").await;
            if status == StatusCode::OK {
                assert_eq!(body["value"], json!({ "qty": 2 }));
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never reached the node"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The node writes; the service hears of it on its subscription.
        let response = http
            .post(format!("{}/v1/docs/orders%2F1/ops", node.url()))
            .bearer_auth(node.token())
            .json(&json!({ "ops": [{ "op": "set", "path": "/shipped", "value": true }] }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let committed = tokio::time::timeout(WAIT, async {
            loop {
                let committed = feed.recv().await.unwrap();
                if committed.origin == Origin::Peer("us-east".parse().unwrap()) {
                    return committed;
                }
            }
        })
        .await
        .expect("the node's change reached the service");
        assert_eq!(committed.doc, order);
        assert_eq!(
            replica.read_json(&order, None).unwrap().unwrap().value,
            json!({ "qty": 2, "shipped": true })
        );

        // The node lists the service as a connected peer, and both hold the
        // same documents at the same heads.
        let (_, status) = get_json(&http, &node, "/v1/status").await;
        assert_eq!(status["peers"][0]["site"], "svc-east");
        assert_eq!(status["peers"][0]["connected"], true);
        let (_, digest) = get_json(&http, &node, "/v1/heads/digest").await;
        let local = replica.heads_digest("");
        assert_eq!(digest["docs"], local.docs);
        assert_eq!(digest["digest"], local.to_hex());

        endpoint.shutdown().await;
        node.shutdown().await.unwrap();
    })
    .await
    .expect("the test finished in time");
}
