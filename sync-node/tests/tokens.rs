//! Scoped client tokens against an in-process node on 127.0.0.1: the admin
//! creates, lists and revokes them; a scoped token reads and writes only
//! under its prefixes through the API (403 `forbidden` elsewhere, and on
//! every route that is not a document's), a read-only one writes nothing;
//! tokens survive a restart; a revoked token is refused at once and its
//! open WebSocket is closed within 5 s. The CLI does the same through the
//! real binary. Bounded waits.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

mod support;

struct Api {
    url: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

async fn start(dir: &std::path::Path) -> sync_node::Node {
    let path = dir.join("sync-node.toml");
    if !path.exists() {
        sync_node::init::init(&sync_node::init::InitOptions::new(
            "us-east".parse().unwrap(),
            dir,
        ))
        .unwrap();
    }
    // Right after a shutdown in this process, tasks that held the old
    // node's store may still be ending: its lock goes with the last of them.
    let started = Instant::now();
    loop {
        match sync_node::Node::start(&sync_node::config::Config::load(&path).unwrap()).await {
            Ok(node) => return node,
            Err(e)
                if started.elapsed() < Duration::from_secs(10)
                    && e.to_string().contains("lock") =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the node did not start: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_tokens_open_only_their_documents_and_revoked_ones_are_cut_off() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let admin = node.token().to_owned();
    let api = Api {
        url: node.url(),
        http: reqwest::Client::new(),
    };
    for (doc, value) in [("tenant-a%2Fdoc", 1), ("tenant-b%2Fdoc", 2)] {
        let (status, _) = api
            .call(
                &admin,
                Method::POST,
                &format!("/v1/docs/{doc}/ops"),
                Some(json!({"ops": [{"op": "set", "path": "/v", "value": value}]})),
            )
            .await;
        assert_eq!(status, 200);
    }

    // The admin makes tokens; each is shown once.
    let (status, writer) = api
        .call(
            &admin,
            Method::POST,
            "/v1/tokens",
            Some(json!({"name": "tenant-a", "prefixes": ["tenant-a/"]})),
        )
        .await;
    assert_eq!(status, 201, "{writer}");
    let writer_token = writer["token"].as_str().unwrap().to_owned();
    let (status, reader) = api
        .call(&admin, Method::POST, "/v1/tokens", Some(json!({"name": "reader", "prefixes": ["tenant-a/"], "read_only": true, "expires_in_s": 3600})))
        .await;
    assert_eq!(status, 201);
    let reader_token = reader["token"].as_str().unwrap().to_owned();
    assert!(reader["expires_at"].as_i64().unwrap() > reader["created_at"].as_i64().unwrap());
    for (body, code, what) in [
        (
            json!({"name": "tenant-a", "prefixes": ["x/"]}),
            409,
            "a taken name",
        ),
        (
            json!({"name": "bad name", "prefixes": ["x/"]}),
            400,
            "a bad name",
        ),
        (
            json!({"name": "admin", "prefixes": ["x/"]}),
            400,
            "the admin's name",
        ),
        (json!({"name": "none", "prefixes": []}), 400, "no prefix"),
        (
            json!({"name": "zero", "prefixes": ["x/"], "expires_in_s": 0}),
            400,
            "no lifetime",
        ),
    ] {
        let (status, body) = api
            .call(&admin, Method::POST, "/v1/tokens", Some(body))
            .await;
        assert_eq!(status, code, "{what}: {body}");
    }
    let (_, list) = api.call(&admin, Method::GET, "/v1/tokens", None).await;
    let names: Vec<&str> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["reader", "tenant-a"]);
    assert!(
        !list.to_string().contains(&writer_token),
        "secrets are never listed"
    );

    // The writer: its documents only, and none of the admin's routes.
    let ok = [
        (Method::GET, "/v1/docs/tenant-a%2Fdoc", None),
        (
            Method::POST,
            "/v1/docs/tenant-a%2Fdoc/ops",
            Some(json!({"ops": [{"op": "set", "path": "/w", "value": 1}]})),
        ),
        (Method::GET, "/v1/docs?prefix=tenant-a/", None),
        (
            Method::POST,
            "/v1/read",
            Some(json!({"ids": ["tenant-a/doc"]})),
        ),
        (
            Method::POST,
            "/v1/txn",
            Some(
                json!({"docs": [{"id": "tenant-a/other", "ops": [{"op": "set", "path": "/x", "value": 1}]}]}),
            ),
        ),
    ];
    for (method, path, body) in ok {
        let (status, answer) = api.call(&writer_token, method.clone(), path, body).await;
        assert_eq!(status, 200, "{method} {path}: {answer}");
    }
    let forbidden = [
        (Method::GET, "/v1/docs/tenant-b%2Fdoc", None),
        (
            Method::POST,
            "/v1/docs/tenant-b%2Fdoc/ops",
            Some(json!({"ops": [{"op": "set", "path": "/w", "value": 1}]})),
        ),
        (Method::GET, "/v1/docs", None),
        (
            Method::POST,
            "/v1/read",
            Some(json!({"ids": ["tenant-a/doc", "tenant-b/doc"]})),
        ),
        (
            Method::POST,
            "/v1/txn",
            Some(
                json!({"docs": [{"id": "tenant-a/doc", "ops": [{"op": "set", "path": "/x", "value": 1}]}, {"id": "tenant-b/doc", "ops": [{"op": "set", "path": "/x", "value": 1}]}]}),
            ),
        ),
        (Method::GET, "/v1/status", None),
        (Method::GET, "/v1/conflicts", None),
        (Method::GET, "/v1/tokens", None),
        (Method::GET, "/v1/backup", None),
        (Method::GET, "/metrics", None),
    ];
    for (method, path, body) in forbidden {
        let (status, answer) = api.call(&writer_token, method.clone(), path, body).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{method} {path}: {answer}"
        );
    }
    // The reader reads and writes nothing.
    let (status, _) = api
        .call(&reader_token, Method::GET, "/v1/docs/tenant-a%2Fdoc", None)
        .await;
    assert_eq!(status, 200);
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/docs/tenant-a%2Fdoc/ops",
            Some(json!({"ops": [{"op": "set", "path": "/w", "value": 2}]})),
        ),
        (
            Method::PUT,
            "/v1/docs/tenant-a%2Fdoc",
            Some(json!({"value": {}})),
        ),
        (
            Method::POST,
            "/v1/txn",
            Some(
                json!({"docs": [{"id": "tenant-a/doc", "ops": [{"op": "set", "path": "/x", "value": 2}]}]}),
            ),
        ),
    ] {
        let (status, answer) = api.call(&reader_token, method.clone(), path, body).await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
    }
    let (_, doc) = api
        .call(&admin, Method::GET, "/v1/docs/tenant-a%2Fdoc", None)
        .await;
    assert_eq!(
        doc["value"],
        json!({"v": 1, "w": 1}),
        "the reader changed nothing"
    );

    // Tokens survive a restart.
    drop(api);
    node.shutdown().await.unwrap();
    let node = start(dir.path()).await;
    let api = Api {
        url: node.url(),
        http: reqwest::Client::new(),
    };
    let (status, _) = api
        .call(&writer_token, Method::GET, "/v1/docs/tenant-a%2Fdoc", None)
        .await;
    assert_eq!(status, 200, "the token works after a restart");

    // A revoked token: refused at once, its WebSocket closed within 5 s.
    let ws = format!(
        "{}/v1/automerge-repo?token={writer_token}",
        node.url().replacen("http://", "ws://", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(ws.as_str()).await.unwrap();
    let (status, _) = api
        .call(&admin, Method::DELETE, "/v1/tokens/tenant-a", None)
        .await;
    assert_eq!(status, 200);
    let revoked_at = Instant::now();
    let (status, _) = api
        .call(&writer_token, Method::GET, "/v1/docs/tenant-a%2Fdoc", None)
        .await;
    assert_eq!(status, 401);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match socket.next().await {
                None
                | Some(Err(_))
                | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the WebSocket was still open {:?} after the revocation",
        revoked_at.elapsed()
    );
    let (status, _) = api
        .call(&admin, Method::DELETE, "/v1/tokens/tenant-a", None)
        .await;
    assert_eq!(status, 404);
    assert!(
        tokio_tungstenite::connect_async(ws.as_str()).await.is_err(),
        "no new connection"
    );
    node.shutdown().await.unwrap();
}

#[test]
fn the_cli_creates_lists_and_revokes_tokens() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node/sync-node.toml");
    support::cli(&[
        "init",
        "--site",
        "us-east",
        "--dir",
        dir.path().join("node").to_str().unwrap(),
        "--api",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
    ]);
    let _node = support::Process::start(&config, &dir.path().join("node.log"));
    support::wait_file(&dir.path().join("node/api.addr"));
    let run = |args: &[&str]| {
        let output = Command::new(support::BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&[
        "token",
        "create",
        "--name",
        "shop",
        "--prefix",
        "shop/",
        "--prefix",
        "orders/shop-",
        "--read-only",
        "--expires-in",
        "30d",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    assert!(created["token"].as_str().unwrap().starts_with("amt_"));
    assert_eq!(created["prefixes"], json!(["shop/", "orders/shop-"]));
    assert_eq!(created["read_only"], true);
    let (code, out, _) = run(&["token", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"shop\"") && !out.contains(created["token"].as_str().unwrap()));
    let (code, _, err) = run(&[
        "token",
        "create",
        "--name",
        "x",
        "--prefix",
        "x/",
        "--expires-in",
        "soon",
    ]);
    assert_eq!(code, Some(2), "a bad duration is a usage error: {err}");
    let (code, out, _) = run(&["token", "revoke", "shop"]);
    assert_eq!((code, out.contains("\"revoked\"")), (Some(0), true));
    let (code, _, err) = run(&["token", "revoke", "shop"]);
    assert_eq!(code, Some(1), "{err}");
}
