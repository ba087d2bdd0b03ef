//! Bounded counters across two real nodes over QUIC through a relay:
//! rights split 5/5, a partition, each side sells 5 and its 6th sale is
//! refused 409 `insufficient_rights`, after healing the stock is 0 at both
//! with no conflict report; then a site without rights waits (`wait_ms`)
//! while the holder restocks and gets its sale once the grant arrives.
//! Every wait is bounded. (Its own test binary: the metrics it checks are
//! process-wide.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use archipelago::transport::relay::{Faults, Relay};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sync_node::config::Config;
use sync_node::init::{init, InitOptions};
use sync_node::Node;

mod support;
use support::{get_json, metrics_text};

/// Bound on each wait for the sites to connect or agree.
const WAIT: Duration = Duration::from_secs(60);

const DOC: &str = "inventory%2Fsku-1";

async fn post(http: &reqwest::Client, node: &Node, path: &str, body: Value) -> (StatusCode, Value) {
    let response = http
        .post(format!("{}{path}", node.url()))
        .bearer_auth(node.token())
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn sell(http: &reqwest::Client, node: &Node, wait_ms: u64) -> (StatusCode, Value) {
    post(
        http,
        node,
        &format!("/v1/docs/{DOC}/ops"),
        json!({"ops": [{"op": "inc", "path": "/stock", "by": -1}], "wait_ms": wait_ms}),
    )
    .await
}

async fn escrow(http: &reqwest::Client, node: &Node) -> Value {
    let (status, body) = get_json(http, node, &format!("/v1/docs/{DOC}/escrow?path=/stock")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .unwrap()
}

struct Site {
    node: Node,
}

impl Site {
    async fn init_and_start(root: &Path, ca_dir: &Path, site: &str, peer: String) -> Site {
        let mut options = InitOptions::new(site.parse().unwrap(), root.join(site));
        options.ca_dir = Some(ca_dir.to_path_buf());
        options.peers = vec![peer.parse().unwrap()];
        let config: PathBuf = init(&options).unwrap();
        let node = Node::start(&Config::load(&config).unwrap()).await.unwrap();
        Site { node }
    }

    fn connected(&self) -> bool {
        let peers = self.node.peers();
        !peers.is_empty() && peers.iter().all(|p| p.status.connected)
    }
}

/// Waits until `done` holds, checking every 20 ms, for at most [`WAIT`].
async fn until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let detail = match done().await {
            Ok(()) => return,
            Err(detail) => detail,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {WAIT:?}: {detail}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_sites_sell_their_rights_and_no_more_and_a_waiting_sale_gets_a_grant() {
    let root = tempfile::tempdir().unwrap();
    let ca_dir = root.path().join("ca");
    sync_node::ca::init_ca(&ca_dir, false).unwrap();
    // `us-east` sorts after `eu-west`, so it only accepts; B dials it
    // through the relay.
    let a = Site::init_and_start(
        root.path(),
        &ca_dir,
        "us-east",
        "eu-west=127.0.0.1:9".to_owned(),
    )
    .await;
    let relay = Relay::start(a.node.sync_addr().unwrap(), Faults::default())
        .await
        .unwrap();
    let b = Site::init_and_start(
        root.path(),
        &ca_dir,
        "eu-west",
        format!("us-east={}", relay.local_addr()),
    )
    .await;
    let http = http();
    until("B to be connected", || async {
        if b.connected() {
            Ok(())
        } else {
            Err(format!("{:?}", b.node.peers()))
        }
    })
    .await;

    // 10 in stock at A, rights split 5/5, seen at both.
    let (status, body) = post(
        &http,
        &a.node,
        &format!("/v1/docs/{DOC}/ops"),
        json!({"ops": [{"op": "set", "path": "/stock", "value": 10, "as": "bounded", "min": 0}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(
        &http,
        &a.node,
        &format!("/v1/docs/{DOC}/escrow/transfer"),
        json!({"path": "/stock", "to": "eu-west", "amount": 5}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let split = json!({"us-east": 5, "eu-west": 5});
    until("the split to reach B", || {
        let (http, b, split) = (&http, &b, &split);
        async move {
            let (status, body) =
                get_json(http, &b.node, &format!("/v1/docs/{DOC}/escrow?path=/stock")).await;
            if status == StatusCode::OK && body["rights"] == *split {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        }
    })
    .await;

    // Partitioned, each side sells its 5; the 6th waits briefly, then is refused.
    relay.set_partitioned(true);
    for site in [&a, &b] {
        for n in 0..5 {
            let (status, body) = sell(&http, &site.node, 0).await;
            assert_eq!(status, StatusCode::OK, "sale {n}: {body}");
        }
        let (status, body) = sell(&http, &site.node, 300).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "insufficient_rights");
        assert_eq!(body["error"]["available_here"], 0);
    }

    // Healed: 0 at both, rights 0/0, no report.
    relay.set_partitioned(false);
    until("both sites to agree on 0", || {
        let (http, a, b) = (&http, &a, &b);
        async move {
            let (_, at_a) = get_json(http, &a.node, &format!("/v1/docs/{DOC}")).await;
            let (_, at_b) = get_json(http, &b.node, &format!("/v1/docs/{DOC}")).await;
            if at_a["value"] == json!({"stock": 0}) && at_a == at_b {
                Ok(())
            } else {
                Err(format!("A {at_a} B {at_b}"))
            }
        }
    })
    .await;
    for site in [&a, &b] {
        let state = escrow(&http, &site.node).await;
        assert_eq!(
            state["rights"],
            json!({"us-east": 0, "eu-west": 0}),
            "{state}"
        );
        let (status, reports) = get_json(&http, &site.node, "/v1/conflicts").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(reports["conflicts"], json!([]), "{reports}");
    }

    // B has no rights and waits for one while A restocks.
    let waiting = {
        let (http, node_url, token) = (http.clone(), b.node.url(), b.node.token().to_owned());
        tokio::spawn(async move {
            let response = http
                .post(format!("{node_url}/v1/docs/{DOC}/ops"))
                .bearer_auth(token)
                .json(
                    &json!({"ops": [{"op": "inc", "path": "/stock", "by": -1}], "wait_ms": 20_000}),
                )
                .send()
                .await
                .unwrap();
            let status = response.status();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        })
    };
    until("B's sale to wait", || {
        let (http, b) = (&http, &b);
        async move {
            let state = escrow(http, &b.node).await;
            if state["pending_requests"] == 1 {
                Ok(())
            } else {
                Err(state.to_string())
            }
        }
    })
    .await;
    let (status, body) = post(
        &http,
        &a.node,
        &format!("/v1/docs/{DOC}/ops"),
        json!({"ops": [{"op": "inc", "path": "/stock", "by": 3}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK, "B's sale once granted: {body}");
    until("both sites to agree on 2", || {
        let (http, a, b) = (&http, &a, &b);
        async move {
            let (_, at_a) = get_json(http, &a.node, &format!("/v1/docs/{DOC}")).await;
            let (_, at_b) = get_json(http, &b.node, &format!("/v1/docs/{DOC}")).await;
            if at_a["value"] == json!({"stock": 2}) && at_a == at_b {
                Ok(())
            } else {
                Err(format!("A {at_a} B {at_b}"))
            }
        }
    })
    .await;
    let metrics = metrics_text(&http, &b.node).await;
    assert!(
        metrics.contains("archipelago_escrow_ops_total{served=\"transfer\"} 1"),
        "{metrics}"
    );
    a.node.shutdown().await.unwrap();
    b.node.shutdown().await.unwrap();
}
