//! Two sites started in-process with identities from one CA, syncing over
//! QUIC on 127.0.0.1, observed only through their HTTP APIs: documents
//! replicate, `/v1/status` reports the peer, and `/v1/events` streams
//! changes and peer state, resumable with `Last-Event-ID`.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sync_node::config::Config;
use sync_node::init::{init, InitOptions};
use sync_node::Node;

mod support;
use support::{get_json, metrics_text, put_json, EventStream, SseEvent};

/// Bound on every wait for something to happen over the network.
const WAIT: Duration = Duration::from_secs(20);
/// Bound on a whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

struct Sites {
    high: Node,
    low: Node,
    http: reqwest::Client,
    _temp: tempfile::TempDir,
}

/// Starts site `high`, whose name sorts after `low`'s so that it only
/// accepts (its peer entry for `low` is a placeholder: it never dials),
/// then `low` with `high`'s bound sync address. Tests running at once use
/// different site names, because metrics are per process and labelled by
/// peer.
async fn start_sites(high: &str, low: &str) -> Sites {
    assert!(low < high);
    let temp = tempfile::tempdir().unwrap();
    let ca_dir = temp.path().join("ca");
    sync_node::ca::init_ca(&ca_dir, false).unwrap();
    let config = |site: &str, peer: String| {
        let mut options = InitOptions::new(site.parse().unwrap(), temp.path().join(site));
        options.ca_dir = Some(ca_dir.clone());
        options.peers = vec![peer.parse().unwrap()];
        Config::load(init(&options).unwrap()).unwrap()
    };
    let high_config = config(high, format!("{low}=127.0.0.1:9"));
    let high_node = Node::start(&high_config).await.unwrap();
    let high_sync = high_node.sync_addr().expect("the site has an identity");
    let written = std::fs::read_to_string(high_config.sync_addr_path()).unwrap();
    assert_eq!(written.trim(), high_sync.to_string());
    let low_node = Node::start(&config(low, format!("{high}={high_sync}")))
        .await
        .unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    Sites {
        high: high_node,
        low: low_node,
        http,
        _temp: temp,
    }
}

impl Sites {
    async fn get(&self, node: &Node, path: &str) -> (StatusCode, Value) {
        get_json(&self.http, node, path).await
    }

    async fn put(&self, node: &Node, id: &str, value: Value) {
        put_json(&self.http, node, id, value).await;
    }

    /// Waits until `node`'s status shows its one peer connected, and
    /// returns that peer's entry.
    async fn connected_peer(&self, node: &Node) -> Value {
        eventually("the peer connects", || async {
            let (status, body) = self.get(node, "/v1/status").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let peer = body["peers"][0].clone();
            (peer["connected"] == true).then_some(peer)
        })
        .await
    }

    async fn shutdown(self) {
        self.low.shutdown().await.unwrap();
        self.high.shutdown().await.unwrap();
    }
}

/// Polls `check` until it gives a value, at most [`WAIT`].
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_change_of(doc: &'static str) -> impl Fn(&SseEvent) -> bool {
    move |event| event.event == "change" && event.data["doc"] == doc
}

async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test took too long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_document_written_at_one_site_appears_at_the_other_and_both_report_the_peer() {
    const HIGH: &str = "us-east";
    const LOW: &str = "eu-west";
    bounded(async {
        let sites = start_sites(HIGH, LOW).await;
        sites
            .put(&sites.high, "inventory%2Fsku-1", json!({ "stock": 5 }))
            .await;
        let value = eventually("the document reaches the other site", || async {
            let (status, body) = sites.get(&sites.low, "/v1/docs/inventory%2Fsku-1").await;
            (status == StatusCode::OK).then(|| body["value"].clone())
        })
        .await;
        assert_eq!(value, json!({ "stock": 5 }));

        let keys: BTreeSet<&str> = [
            "site",
            "addr",
            "connected",
            "last_seen",
            "pending_out",
            "pending_in",
            "lag_ms",
        ]
        .into();
        for (node, peer_site, own_site) in [(&sites.low, HIGH, LOW), (&sites.high, LOW, HIGH)] {
            let peer = sites.connected_peer(node).await;
            let peer_keys: BTreeSet<&str> = peer
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(peer_keys, keys, "{peer}");
            assert_eq!(peer["site"], peer_site);
            assert!(
                peer["pending_out"].is_u64() && peer["pending_in"].is_u64(),
                "{peer}"
            );
            let last_seen = peer["last_seen"]
                .as_str()
                .expect("a connected peer was seen");
            assert!(
                last_seen.contains('T') && last_seen.ends_with('Z'),
                "{last_seen}"
            );
            assert!(
                peer["lag_ms"].is_u64() || peer["lag_ms"].is_null(),
                "{peer}"
            );

            let (_, status) = sites.get(node, "/v1/status").await;
            assert_eq!(status["site"], own_site);
            assert_eq!(status["sync_addr"], node.sync_addr().unwrap().to_string());
        }
        assert_eq!(sites.low.peers()[0].status.site.as_str(), HIGH);

        // Once both sides are idle and connected, the lag settles at zero.
        eventually("the lag settles at zero", || async {
            let (_, status) = sites.get(&sites.high, "/v1/status").await;
            (status["peers"][0]["lag_ms"] == 0).then_some(())
        })
        .await;

        // The feed polls peers and counts changes in the background.
        let metric_lines = [
            format!("archipelago_peer_connected{{peer=\"{HIGH}\"}} 1"),
            format!("archipelago_peer_pending_out_bytes{{peer=\"{HIGH}\"}}"),
            format!("archipelago_peer_pending_in_bytes{{peer=\"{HIGH}\"}}"),
            format!("archipelago_replication_lag_ms{{peer=\"{HIGH}\"}}"),
            format!("archipelago_changes_applied_total{{origin=\"{HIGH}\"}}"),
        ];
        eventually("the peer metrics are recorded", || async {
            let metrics = metrics_text(&sites.http, &sites.low).await;
            metric_lines
                .iter()
                .all(|line| metrics.contains(line.as_str()))
                .then_some(())
        })
        .await;
        sites.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_stream_peer_changes_replay_after_last_event_id_and_report_the_peer_leaving() {
    const HIGH: &str = "sa-east";
    const LOW: &str = "ap-south";
    bounded(async {
        let sites = start_sites(HIGH, LOW).await;
        sites.connected_peer(&sites.low).await;

        // An id older than anything kept (here: from before this run) gets
        // a reset first, then every kept event, then live ones: among them,
        // soon if not already, the peer coming up.
        let mut events = EventStream::open(&sites.http, &sites.low, Some(1)).await;
        let reset = events.next().await.unwrap();
        assert_eq!(reset.event, "reset", "{reset:?}");
        let up = events
            .until(|event| event.event == "peer" && event.data["connected"] == true)
            .await;
        assert!(up.iter().all(|event| event.id > reset.id), "{up:?}");
        assert_eq!(
            up.last().unwrap().data,
            json!({ "site": HIGH, "connected": true })
        );

        // A stream opened without Last-Event-ID gets live events only.
        let mut fresh = EventStream::open(&sites.http, &sites.low, None).await;

        sites
            .put(&sites.high, "orders%2F1", json!({ "qty": 1 }))
            .await;
        let first = events.until(is_change_of("orders/1")).await;
        let first = first.last().unwrap().clone();
        assert_eq!(first.data["origin"], HIGH, "{first:?}");
        assert!(first.data["changes"].is_u64(), "{first:?}");
        let heads = first.data["heads"].as_array().unwrap();
        assert_eq!(heads.len(), 1);
        assert_eq!(heads[0].as_str().unwrap().len(), 64);
        let seen_fresh = fresh.until(|event| event.event == "change").await;
        assert_eq!(seen_fresh.len(), 1, "{seen_fresh:?}");
        assert_eq!(seen_fresh[0].id, first.id);
        drop(fresh);

        sites
            .put(&sites.high, "orders%2F2", json!({ "qty": 2 }))
            .await;
        let second = events.until(is_change_of("orders/2")).await;
        let second = second.last().unwrap().clone();
        assert!(second.id > first.id);

        // A local write is a change with origin "local".
        sites
            .put(&sites.low, "orders%2F3", json!({ "qty": 3 }))
            .await;
        let local = events.until(is_change_of("orders/3")).await;
        let local = local.last().unwrap().clone();
        assert_eq!(local.data["origin"], "local");
        assert_eq!(local.data["changes"], 1);

        // Resuming after the first change replays what followed it.
        let mut resumed = EventStream::open(&sites.http, &sites.low, Some(first.id)).await;
        let replayed = resumed.until(|event| event.id == local.id).await;
        assert!(
            replayed.iter().all(|event| event.id > first.id),
            "{replayed:?}"
        );
        assert!(
            replayed.iter().all(|event| event.event != "reset"),
            "{replayed:?}"
        );
        assert!(
            replayed.iter().any(|event| event.id == second.id),
            "{replayed:?}"
        );
        let ids: Vec<u64> = replayed.iter().map(|event| event.id).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
        drop(resumed);

        // A bad Last-Event-ID is a 400, and the stream needs the token.
        let response = sites
            .http
            .get(format!("{}/v1/events", sites.low.url()))
            .bearer_auth(sites.low.token())
            .header("Last-Event-ID", "yesterday")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let response = sites
            .http
            .get(format!("{}/v1/events", sites.low.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

        // The peer leaving is an event too.
        let Sites {
            high,
            low,
            http: _http,
            _temp,
        } = sites;
        high.shutdown().await.unwrap();
        let down = events
            .until(|event| event.event == "peer" && event.data["connected"] == false)
            .await;
        let down = down.last().unwrap();
        assert_eq!(down.data, json!({ "site": HIGH, "connected": false }));
        assert!(down.id > local.id);

        // Shutting down ends the stream instead of holding the server open.
        let shutdown = tokio::spawn(low.shutdown());
        assert!(events.next().await.is_none());
        tokio::time::timeout(WAIT, shutdown)
            .await
            .expect("the node shuts down promptly")
            .unwrap()
            .unwrap();
    })
    .await;
}
