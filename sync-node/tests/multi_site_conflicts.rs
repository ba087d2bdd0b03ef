//! Conflict reports between two real sites (the `sync-node` binary, QUIC
//! with mutual TLS, SQLite) on 127.0.0.1, with a UDP relay that partitions
//! them. During the partition both sides sell the last unit, rename the same
//! customer, and one deletes a record the other edits. After healing, both
//! sites list exactly one report of each kind with identical ids; the oversell
//! is compensated once by the resolver site; resolving or dismissing at one
//! site shows at the other; nothing re-opens, not even after a restart.
//! Every wait is bounded.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use archipelago::transport::relay::{Faults, Relay};
use serde_json::{json, Value};
use support::{cli, wait_file, Process, WAIT_MAX};

mod support;

const RULES: &str = r#"
[[rules]]
name = "stock-non-negative"
docs = "inventory/*"
path = "/stock"
min = 0
resolver = "us-east"
policy = "clamp"
"#;

struct Site {
    dir: PathBuf,
    _process: Process,
    url: String,
    token: String,
    http: reqwest::Client,
}

impl Site {
    fn start(dir: &Path) -> Site {
        let _ = std::fs::remove_file(dir.join("api.addr"));
        let process = Process::start(&dir.join("sync-node.toml"), &dir.join("node.log"));
        let url = format!("http://{}", wait_file(&dir.join("api.addr")));
        let token = std::fs::read_to_string(dir.join("api.token"))
            .unwrap()
            .trim()
            .to_owned();
        Site {
            dir: dir.to_path_buf(),
            _process: process,
            url,
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    async fn get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(status.is_success(), "POST {path}: {status} {body}");
        body
    }

    async fn ops(&self, doc: &str, ops: Value) {
        self.post(
            &format!("/v1/docs/{}/ops", doc.replace('/', "%2F")),
            json!({ "ops": ops }),
        )
        .await;
    }

    async fn doc(&self, doc: &str) -> Value {
        self.get(&format!("/v1/docs/{}", doc.replace('/', "%2F")))
            .await
    }

    async fn conflicts(&self) -> Vec<Value> {
        let mut list = self.get("/v1/conflicts").await["conflicts"]
            .as_array()
            .unwrap()
            .clone();
        list.sort_by_key(|c| c["id"].as_str().unwrap().to_owned());
        list
    }
}

/// Waits until `check` holds, polling.
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < WAIT_MAX, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn same_docs(a: &Site, b: &Site, docs: &[&str]) -> bool {
    for doc in docs {
        let path = format!("/v1/docs/{}", doc.replace('/', "%2F"));
        let get = |site: &Site| {
            site.http
                .get(format!("{}{path}", site.url))
                .bearer_auth(&site.token)
                .send()
        };
        let (Ok(x), Ok(y)) = (get(a).await, get(b).await) else {
            return false;
        };
        if !x.status().is_success() || !y.status().is_success() {
            return false;
        }
        let (x, y): (Value, Value) = (x.json().await.unwrap(), y.json().await.unwrap());
        let sorted = |v: &Value| {
            let mut h: Vec<String> = v["heads"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_str().unwrap().to_owned())
                .collect();
            h.sort();
            h
        };
        if sorted(&x) != sorted(&y) {
            return false;
        }
    }
    true
}

fn init(root: &Path, site: &str, peer: &str) -> PathBuf {
    let dir = root.join(site);
    cli(&[
        "init",
        "--site",
        site,
        "--dir",
        dir.to_str().unwrap(),
        "--ca-dir",
        root.join("ca").to_str().unwrap(),
        "--api",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--peer",
        peer,
    ]);
    let config = dir.join("sync-node.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(RULES);
    std::fs::write(&config, text).unwrap();
    dir
}

fn of_kind<'a>(list: &'a [Value], kind: &str) -> Vec<&'a Value> {
    list.iter().filter(|c| c["kind"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_during_a_partition_are_one_report_each_at_both_sites_resolved_once() {
    let root = tempfile::tempdir().unwrap();
    cli(&[
        "ca",
        "init",
        "--dir",
        root.path().join("ca").to_str().unwrap(),
    ]);
    // eu-west sorts first, so it dials us-east, through the relay.
    let us_dir = init(root.path(), "us-east", "eu-west=127.0.0.1:9");
    let mut us = Site::start(&us_dir);
    let us_sync: std::net::SocketAddr = wait_file(&us_dir.join("sync.addr")).parse().unwrap();
    let relay = Relay::start(us_sync, Faults::default()).await.unwrap();
    let eu_dir = init(
        root.path(),
        "eu-west",
        &format!("us-east={}", relay.local_addr()),
    );
    let eu = Site::start(&eu_dir);

    let docs = ["inventory/sku-1", "customers/c1", "records/r1"];
    eu.ops(
        docs[0],
        json!([{"op": "set", "path": "/stock", "value": 1, "as": "counter"}]),
    )
    .await;
    eu.ops(
        docs[1],
        json!([{"op": "set", "path": "/name", "value": "Ana"}]),
    )
    .await;
    eu.ops(
        docs[2],
        json!([{"op": "set", "path": "/patient", "value": {"name": "Kim", "allergy": "none"}}]),
    )
    .await;
    until("the base to replicate", || same_docs(&eu, &us, &docs)).await;

    relay.set_partitioned(true);
    eu.ops(docs[0], json!([{"op": "inc", "path": "/stock", "by": -1}]))
        .await;
    us.ops(docs[0], json!([{"op": "inc", "path": "/stock", "by": -1}]))
        .await;
    eu.ops(
        docs[1],
        json!([{"op": "set", "path": "/name", "value": "Ana Li"}]),
    )
    .await;
    us.ops(
        docs[1],
        json!([{"op": "set", "path": "/name", "value": "Anna"}]),
    )
    .await;
    eu.ops(docs[2], json!([{"op": "del", "path": "/patient"}]))
        .await;
    us.ops(
        docs[2],
        json!([{"op": "set", "path": "/patient/allergy", "value": "penicillin"}]),
    )
    .await;
    assert_eq!(eu.doc(docs[0]).await["value"]["stock"], 0);
    assert_eq!(us.doc(docs[0]).await["value"]["stock"], 0);
    relay.set_partitioned(false);

    until("both sites to hold the same reports", || async {
        let (a, b) = (eu.conflicts().await, us.conflicts().await);
        a.len() == 3
            && a == b
            && of_kind(&a, "invariant")
                .first()
                .is_some_and(|c| c["status"] == "resolved")
            && same_docs(&eu, &us, &docs).await
    })
    .await;
    let reports = eu.conflicts().await;
    for kind in ["concurrent_write", "delete_update", "invariant"] {
        assert_eq!(of_kind(&reports, kind).len(), 1, "{kind}: {reports:#?}");
    }
    let oversell = of_kind(&reports, "invariant")[0].clone();
    assert_eq!(oversell["doc"], docs[0]);
    assert_eq!(oversell["rule"], "stock-non-negative");
    assert_eq!(oversell["provisional"], -1);
    assert_eq!(oversell["resolved_by"], "us-east");
    assert_eq!(oversell["resolution"], "clamp");
    let rename = of_kind(&reports, "concurrent_write")[0].clone();
    assert_eq!(rename["path"], "/name");
    let delete = of_kind(&reports, "delete_update")[0].clone();
    assert_eq!(delete["path"], "/patient");
    assert!(
        delete["values"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["site"] == "us-east" && v["value"] == json!({"allergy": "penicillin"})),
        "{delete:#}"
    );
    for site in [&eu, &us] {
        assert_eq!(
            site.doc(docs[0]).await["value"]["stock"],
            0,
            "compensated once"
        );
        let one: Value = site
            .get(&format!("/v1/conflicts/{}", rename["id"].as_str().unwrap()))
            .await;
        assert_eq!(one, rename);
    }

    // Resolve the rename at eu-west (with an edit), dismiss the delete at
    // us-east; each shows at the other site.
    let resolved = eu
        .post(
            &format!("/v1/conflicts/{}/resolve", rename["id"].as_str().unwrap()),
            json!({"ops": [{"op": "set", "path": "/name", "value": "Ana Li"}], "note": "customer confirmed"}),
        )
        .await;
    assert_eq!(resolved["status"], "resolved");
    us.post(
        &format!("/v1/conflicts/{}/dismiss", delete["id"].as_str().unwrap()),
        json!({"note": "patient discharged"}),
    )
    .await;
    until("the closings to replicate", || async {
        let (a, b) = (eu.conflicts().await, us.conflicts().await);
        a == b && a.iter().all(|c| c["status"] != "open")
    })
    .await;
    assert_eq!(us.doc(docs[1]).await["value"]["name"], "Ana Li");
    let open: Value = us.get("/v1/conflicts?status=open").await;
    assert_eq!(open["conflicts"], json!([]));

    // More writes, a restart of the resolver site: nothing re-opens and the
    // compensation does not run again.
    drop(us);
    // Same sync port again, so the relay still reaches it.
    let config = us_dir.join("sync-node.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[sync]\nlisten = \"127.0.0.1:0\"",
        &format!("[sync]\nlisten = \"{us_sync}\""),
    );
    std::fs::write(&config, text).unwrap();
    us = Site::start(&us_dir);
    eu.ops(docs[0], json!([{"op": "inc", "path": "/stock", "by": 5}]))
        .await;
    us.ops(
        docs[1],
        json!([{"op": "set", "path": "/phone", "value": "555"}]),
    )
    .await;
    until("the sites to agree again", || same_docs(&eu, &us, &docs)).await;
    let after = us.conflicts().await;
    assert_eq!(after.len(), 3);
    assert!(after.iter().all(|c| c["status"] != "open"), "{after:#?}");
    assert_eq!(after, eu.conflicts().await);
    assert_eq!(us.doc(docs[0]).await["value"]["stock"], 5);
    let status: Value = us.get("/v1/status").await;
    assert_eq!(status["conflicts_open"], 0);
    let _ = us.dir;
    relay.stop().await;
}
