//! automerge-repo JavaScript clients (the real npm packages, pinned in
//! `tests/js/package.json` and installed here with `npm install`) against
//! two real sites (`sync-node run`, QUIC with mutual TLS, SQLite) on
//! 127.0.0.1, with a UDP relay between them:
//!
//! - a document a client creates at eu-west is read by a client at us-east,
//!   with equal content and heads;
//! - a change made through the HTTP API at us-east reaches a client
//!   watching at eu-west;
//! - clients at both sites editing one field during a partition raise the
//!   same conflict report at both.
//!
//! Each client is a `node tests/js/clients.mjs` process that gives up after
//! 30 s; every wait here is bounded too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use archipelago::transport::relay::{Faults, Relay};
use serde_json::{json, Value};
use support::{cli, wait_file, Process, WAIT_MAX};

mod support;

/// Where the JS side lives.
fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// Installs the pinned packages (quick when they are there already).
fn npm_install() {
    let output = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(js_dir())
        .output()
        .expect("npm is needed for the JavaScript client tests (node 20 and npm)");
    assert!(
        output.status.success(),
        "npm install failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

struct Site {
    _process: Process,
    api: String,
    token: String,
    http: reqwest::Client,
}

impl Site {
    fn start(dir: &Path) -> Site {
        let process = Process::start(&dir.join("sync-node.toml"), &dir.join("node.log"));
        let api = format!("http://{}", wait_file(&dir.join("api.addr")));
        let token = std::fs::read_to_string(dir.join("api.token"))
            .unwrap()
            .trim()
            .to_owned();
        Site {
            _process: process,
            api,
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    /// The WebSocket URL clients connect to, token in the query.
    fn ws(&self) -> String {
        format!(
            "{}/v1/automerge-repo?token={}",
            self.api.replacen("http://", "ws://", 1),
            self.token
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.api))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn doc(&self, id: &str) -> Option<Value> {
        match self
            .get(&format!("/v1/docs/{}", id.replace('/', "%2F")))
            .await
        {
            (200, body) => Some(body),
            _ => None,
        }
    }

    async fn ops(&self, id: &str, ops: Value) {
        let response = self
            .http
            .post(format!(
                "{}/v1/docs/{}/ops",
                self.api,
                id.replace('/', "%2F")
            ))
            .bearer_auth(&self.token)
            .json(&json!({ "ops": ops }))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{}",
            response.text().await.unwrap()
        );
    }

    async fn conflicts(&self) -> Vec<Value> {
        let mut list = self.get("/v1/conflicts").await.1["conflicts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        list.sort_by_key(|c| c["id"].as_str().unwrap_or_default().to_owned());
        list
    }
}

/// Runs `node clients.mjs ARGS` to its end; its last stdout line as JSON.
fn js(args: &[&str]) -> Value {
    let output = js_command(args).output().unwrap();
    assert!(
        output.status.success(),
        "node clients.mjs {}: {}\n{}",
        args[0],
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

fn js_command(args: &[&str]) -> Command {
    let mut command = Command::new("node");
    command
        .arg("clients.mjs")
        .args(args)
        .current_dir(js_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

async fn until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < WAIT_MAX, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sorted(heads: &Value) -> Vec<String> {
    let mut heads: Vec<String> = heads
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_owned())
        .collect();
    heads.sort();
    heads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_clients_at_two_sites_share_documents_live_changes_and_conflicts() {
    npm_install();
    let root = tempfile::tempdir().unwrap();
    let path = |p: &str| root.path().join(p).to_str().unwrap().to_owned();
    cli(&["ca", "init", "--dir", &path("ca")]);
    let init = |site: &str, dir: &str, peer: &str| {
        cli(&[
            "init",
            "--site",
            site,
            "--dir",
            &path(dir),
            "--ca-dir",
            &path("ca"),
            "--api",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--peer",
            peer,
        ]);
    };
    // eu-west sorts first, so it dials us-east, through the relay.
    init("us-east", "us", "eu-west=127.0.0.1:9");
    let us = Site::start(&root.path().join("us"));
    let us_sync: std::net::SocketAddr = wait_file(&root.path().join("us/sync.addr"))
        .parse()
        .unwrap();
    let relay = Relay::start(us_sync, Faults::default()).await.unwrap();
    init("eu-west", "eu", &format!("us-east={}", relay.local_addr()));
    let eu = Site::start(&root.path().join("eu"));

    // Created by a client at eu-west, read by a client at us-east.
    let created = js(&["create", &eu.ws(), &eu.api, &eu.token]);
    let url = created["url"].as_str().unwrap().to_owned();
    let stored = format!("repo/{}", url.strip_prefix("automerge:").unwrap());
    let at_eu = eu.doc(&stored).await.expect("stored at eu-west as repo/ID");
    assert_eq!(at_eu["url"], url.as_str());
    assert_eq!(sorted(&at_eu["heads"]), sorted(&created["heads"]));
    until("the document to reach us-east", || async {
        us.doc(&stored)
            .await
            .is_some_and(|d| d["heads"] == at_eu["heads"])
    })
    .await;
    let found = js(&["find", &us.ws(), &url]);
    assert_eq!(
        found["value"],
        json!({"title": "from js", "items": ["a", "b"], "count": 1})
    );
    assert_eq!(sorted(&found["heads"]), sorted(&created["heads"]));
    assert_eq!(us.doc(&stored).await.unwrap()["url"], url.as_str());

    // A change through the HTTP API at us-east reaches a client at eu-west.
    let mut watcher = js_command(&["watch", &eu.ws(), &url, "title", "from the api"])
        .spawn()
        .unwrap();
    // The watcher says "watching" on stderr once it holds the document.
    {
        use std::io::{BufRead, BufReader};
        let stderr = watcher.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        assert!(
            lines.any(|l| l.is_ok_and(|l| l == "watching")),
            "the watcher never held the document"
        );
    }
    us.ops(
        &stored,
        json!([{"op": "set", "path": "/title", "value": "from the api"}]),
    )
    .await;
    let watched = tokio::task::spawn_blocking(move || watcher.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        watched.status.success(),
        "the watcher did not see the change"
    );

    // Clients at both sites edit one field while the sites are apart.
    relay.set_partitioned(true);
    let (eu_ws, eu_api, eu_token, url_eu) =
        (eu.ws(), eu.api.clone(), eu.token.clone(), url.clone());
    let (us_ws, us_api, us_token, url_us) =
        (us.ws(), us.api.clone(), us.token.clone(), url.clone());
    let edits = [
        tokio::task::spawn_blocking(move || {
            js(&["edit", &eu_ws, &eu_api, &eu_token, &url_eu, "owner", "ana"])
        }),
        tokio::task::spawn_blocking(move || {
            js(&["edit", &us_ws, &us_api, &us_token, &url_us, "owner", "bo"])
        }),
    ];
    for edit in edits {
        edit.await.unwrap();
    }
    relay.set_partitioned(false);
    until(
        "one report at both sites, and the same document",
        || async {
            let (a, b) = (eu.conflicts().await, us.conflicts().await);
            let (da, db) = (
                eu.doc(&stored).await.unwrap(),
                us.doc(&stored).await.unwrap(),
            );
            a.len() == 1 && a == b && da["heads"] == db["heads"]
        },
    )
    .await;
    let report = &eu.conflicts().await[0];
    assert_eq!(report["doc"], stored.as_str());
    assert_eq!(report["path"], "/owner");
    assert_eq!(report["kind"], "concurrent_write");
}

/// The README's example client (`examples/js`), run as written: once to
/// create a document, once to add to it by its URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_example_client_runs() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/js");
    let output = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&example)
        .output()
        .expect("npm is needed for the JavaScript client tests (node 20 and npm)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let root = tempfile::tempdir().unwrap();
    let path = |p: &str| root.path().join(p).to_str().unwrap().to_owned();
    cli(&["ca", "init", "--dir", &path("ca")]);
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
    let site = Site::start(&root.path().join("us"));
    let hello = |url: Option<&str>| {
        let mut command = Command::new("node");
        command
            .arg("hello.mjs")
            .arg(site.ws())
            .args(url)
            .current_dir(&example);
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let first = hello(None);
    let url = first.split_whitespace().next().unwrap().to_owned();
    hello(Some(&url));
    let stored = format!("repo/{}", url.strip_prefix("automerge:").unwrap());
    let doc = site.doc(&stored).await.unwrap();
    assert_eq!(
        doc["value"]["greetings"].as_array().unwrap().len(),
        2,
        "{doc}"
    );
    assert_eq!(doc["url"], url.as_str());
}

/// Scoped tokens on the WebSocket: a token for `tenant-a/` does not open
/// `tenant-b/...`, a read-only client's change is not applied, and the
/// node's admin token opens both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_tokens_limit_js_clients() {
    npm_install();
    let root = tempfile::tempdir().unwrap();
    let path = |p: &str| root.path().join(p).to_str().unwrap().to_owned();
    cli(&["ca", "init", "--dir", &path("ca")]);
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
    let site = Site::start(&root.path().join("us"));
    let mut urls = Vec::new();
    for doc in ["tenant-a/doc", "tenant-b/doc"] {
        site.ops(doc, json!([{"op": "set", "path": "/v", "value": "base"}]))
            .await;
        urls.push(
            site.doc(doc).await.unwrap()["url"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let token = |name: &str, read_only: bool| {
        let body = json!({"name": name, "prefixes": ["tenant-a/"], "read_only": read_only});
        let (http, api, admin) = (site.http.clone(), site.api.clone(), site.token.clone());
        async move {
            let response = http
                .post(format!("{api}/v1/tokens"))
                .bearer_auth(admin)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
            let created: Value = response.json().await.unwrap();
            created["token"].as_str().unwrap().to_owned()
        }
    };
    let ws_with = |token: &str| {
        format!(
            "{}/v1/automerge-repo?token={token}",
            site.api.replacen("http://", "ws://", 1)
        )
    };
    let tenant = ws_with(&token("tenant-a", false).await);
    let reader = ws_with(&token("tenant-a-reader", true).await);

    assert_eq!(
        js(&["open", &tenant, &urls[0]])["value"],
        json!({"v": "base"})
    );
    assert_eq!(js(&["open", &tenant, &urls[1]])["unavailable"], true);
    assert_eq!(
        js(&["open", &site.ws(), &urls[1]])["value"],
        json!({"v": "base"})
    );

    let before = site.doc("tenant-a/doc").await.unwrap()["heads"].clone();
    let tried = js(&["try-edit", &reader, &urls[0], "v", "changed by a reader"]);
    assert_ne!(tried["heads"], before, "the client made its change locally");
    let after = site.doc("tenant-a/doc").await.unwrap();
    assert_eq!(after["heads"], before, "the node did not apply it");
    assert_eq!(after["value"], json!({"v": "base"}));

    // Presence: a writer's and a reader's client of one document hear each
    // other's ephemeral messages through the node.
    let heard = [("tenant", tenant.clone()), ("reader", reader.clone())].map(|(name, ws)| {
        let url = urls[0].clone();
        tokio::task::spawn_blocking(move || js(&["presence", &ws, &url, name]))
    });
    let [tenant_heard, reader_heard] = heard;
    assert_eq!(tenant_heard.await.unwrap()["heard"]["from"], "reader");
    assert_eq!(reader_heard.await.unwrap()["heard"]["from"], "tenant");
    assert_eq!(
        site.doc("tenant-a/doc").await.unwrap()["heads"],
        before,
        "presence is not stored"
    );

    // A revoked token's client is cut off within 5 s, and stays off.
    let mut watcher = js_command(&["watch", &tenant, &urls[0], "v", "never"])
        .spawn()
        .unwrap();
    {
        use std::io::{BufRead, BufReader};
        let mut lines = BufReader::new(watcher.stderr.take().unwrap()).lines();
        assert!(lines.any(|l| l.is_ok_and(|l| l == "watching")));
    }
    let connected = |name: &'static str| {
        let site = &site;
        async move {
            site.get("/v1/status").await.1["clients"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["token"] == name)
                .count()
        }
    };
    assert_eq!(connected("tenant-a").await, 1);
    let response = site
        .http
        .delete(format!("{}/v1/tokens/tenant-a", site.api))
        .bearer_auth(&site.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let revoked = Instant::now();
    while connected("tenant-a").await > 0 {
        assert!(
            revoked.elapsed() < Duration::from_secs(5),
            "the client was still connected 5 s after the revocation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It keeps trying to reconnect (every 500 ms) and is refused.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(connected("tenant-a").await, 0);
    let _ = watcher.kill();
    let _ = watcher.wait();
}
