//! A site killed with `kill -9` while it replicates loses nothing it
//! acknowledged: clients write to `eu-west` (the real binary) while it
//! replicates to `us-east`; `eu-west` is SIGKILLed mid-stream and restarted
//! on the same directory, and every acknowledged write must reach `us-east`.
//! Meanwhile `us-east` keeps taking writes that must reach the restarted
//! `eu-west`. Loopback only; every wait is bounded.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{cli, wait_file, Process, WAIT_MAX};

mod support;

struct Site {
    dir: PathBuf,
    process: Process,
}

impl Site {
    fn start(dir: &Path) -> Site {
        let _ = std::fs::remove_file(dir.join("api.addr"));
        let process = Process::start(&dir.join("sync-node.toml"), &dir.join("node.log"));
        wait_file(&dir.join("api.addr"));
        Site {
            dir: dir.to_path_buf(),
            process,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", wait_file(&self.dir.join("api.addr")))
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("api.token"))
            .unwrap()
            .trim()
            .to_owned()
    }
}

/// Keys under `/k` of a document at a site (empty when it is absent).
async fn keys(http: &reqwest::Client, site: &Site, doc: usize) -> BTreeSet<String> {
    let response = http
        .get(format!("{}/v1/docs/crash%2F{doc}", site.url()))
        .bearer_auth(site.token())
        .send()
        .await;
    let Ok(response) = response else {
        return BTreeSet::new();
    };
    if !response.status().is_success() {
        return BTreeSet::new();
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    body["value"]["k"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Writes `/k/{tag}-{i}` to documents `crash/0..4` until stopped; records
/// what was acknowledged.
fn spawn_writer(
    http: reqwest::Client,
    url: String,
    token: String,
    tag: &'static str,
    acked: Arc<Mutex<Vec<BTreeSet<String>>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0..100_000u64 {
            let doc = (i % 4) as usize;
            let key = format!("{tag}-{i}");
            let body = json!({"ops": [{"op": "set", "path": format!("/k/{key}"), "value": i}]});
            let sent = http
                .post(format!("{url}/v1/docs/crash%2F{doc}/ops"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_success() => {
                    acked.lock().unwrap()[doc].insert(key);
                }
                // The node is down: stop; the test restarts it.
                _ => return,
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_killed_mid_replication_loses_nothing_it_acknowledged() {
    let root = tempfile::tempdir().unwrap();
    let path = |p: &str| root.path().join(p).to_str().unwrap().to_owned();
    cli(&["ca", "init", "--dir", &path("ca")]);
    // us-east sorts after eu-west, so it only accepts; start it first.
    cli(&[
        "init",
        "--site",
        "us-east",
        "--dir",
        &path("us"),
        "--ca-dir",
        &path("ca"),
        "--api",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--peer",
        "eu-west=127.0.0.1:9",
    ]);
    let us = Site::start(&root.path().join("us"));
    let us_sync = wait_file(&root.path().join("us/sync.addr"));
    cli(&[
        "init",
        "--site",
        "eu-west",
        "--dir",
        &path("eu"),
        "--ca-dir",
        &path("ca"),
        "--api",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--peer",
        &format!("us-east={us_sync}"),
    ]);
    let mut eu = Site::start(&root.path().join("eu"));

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // Create each document's `/k` map at one site and let it replicate: two
    // sites creating the same map concurrently would make two map objects,
    // and automerge shows only one of them (a conflict the conflict layer
    // reports, not what this test is about).
    for doc in 0..4 {
        let body = json!({"ops": [{"op": "set", "path": "/k", "value": {}}]});
        let response = http
            .post(format!("{}/v1/docs/crash%2F{doc}/ops", us.url()))
            .bearer_auth(us.token())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }
    let started = Instant::now();
    for doc in 0..4 {
        loop {
            let response = http
                .get(format!("{}/v1/docs/crash%2F{doc}", eu.url()))
                .bearer_auth(eu.token())
                .send()
                .await
                .unwrap();
            if response.status().is_success() {
                break;
            }
            assert!(
                started.elapsed() < WAIT_MAX,
                "crash/{doc} never reached eu-west"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let acked_eu = Arc::new(Mutex::new(vec![BTreeSet::new(); 4]));
    let acked_us = Arc::new(Mutex::new(vec![BTreeSet::new(); 4]));
    let us_writer = spawn_writer(http.clone(), us.url(), us.token(), "us", acked_us.clone());
    for cycle in 0..2u64 {
        let writer = spawn_writer(
            http.clone(),
            eu.url(),
            eu.token(),
            if cycle == 0 { "eu0" } else { "eu1" },
            acked_eu.clone(),
        );
        tokio::time::sleep(Duration::from_millis(300 + 250 * cycle)).await;
        eu.process.kill_9();
        let _ = writer.await;
        eu = Site::start(&root.path().join("eu"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    us_writer.abort();
    let _ = us_writer.await;

    let acked_eu: Vec<BTreeSet<String>> = acked_eu.lock().unwrap().clone();
    let acked_us: Vec<BTreeSet<String>> = acked_us.lock().unwrap().clone();
    assert!(
        acked_eu.iter().map(BTreeSet::len).sum::<usize>() > 20,
        "writes happened at eu-west"
    );
    let started = Instant::now();
    for doc in 0..4 {
        loop {
            let at_us = keys(&http, &us, doc).await;
            let at_eu = keys(&http, &eu, doc).await;
            let missing_at_us =
                acked_eu[doc].difference(&at_us).count() + acked_us[doc].difference(&at_us).count();
            let missing_at_eu =
                acked_eu[doc].difference(&at_eu).count() + acked_us[doc].difference(&at_eu).count();
            if missing_at_us == 0 && missing_at_eu == 0 {
                break;
            }
            assert!(
                started.elapsed() < WAIT_MAX,
                "crash/{doc}: {missing_at_us} acknowledged writes missing at us-east, {missing_at_eu} at eu-west"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
