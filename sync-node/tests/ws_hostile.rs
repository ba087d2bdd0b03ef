//! The automerge-repo endpoint under hostile input: a connection without a
//! token (or with a wrong one) is refused before the upgrade; malformed
//! CBOR, text messages, oversized and deeply nested messages, garbage
//! automerge sync messages and messages before `join` each close that
//! connection only, after an `error` message, and apply nothing. A
//! well-behaved client on its own connection syncs a document before,
//! between and after them. The `[clients]` limits hold: no more open
//! connections per token than configured. In-process node on 127.0.0.1;
//! bounded waits.

use std::time::Duration;

use archipelago::automerge::sync::{self, SyncDoc};
use archipelago::automerge::{Automerge, ReadDoc};
use archipelago::clients::wire::{Message, PROTOCOL_V1};
use archipelago::clients::RepoId;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as Ws;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

async fn connect(url: &str) -> Socket {
    let (socket, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connects in time")
        .expect("the upgrade succeeds");
    socket
}

fn join(id: &str) -> Vec<u8> {
    Message::Join {
        sender_id: id.to_owned(),
        supported_protocol_versions: vec![PROTOCOL_V1.to_owned()],
        metadata: None,
    }
    .encode()
}

/// The next protocol message, or `None` once the node closed.
async fn next(socket: &mut Socket) -> Option<Message> {
    loop {
        match tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("the node answers in time")
        {
            Some(Ok(Ws::Binary(bytes))) => return Some(Message::decode(&bytes).unwrap()),
            Some(Ok(Ws::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// A well-behaved client fetches `id` whole over a fresh connection and
/// returns the document it assembled.
async fn fetch(url: &str, id: RepoId) -> Automerge {
    let mut socket = connect(url).await;
    socket.send(Ws::binary(join("good"))).await.unwrap();
    assert!(matches!(
        next(&mut socket).await,
        Some(Message::Peer { .. })
    ));
    let mut doc = Automerge::new();
    let mut state = sync::State::new();
    let first = doc.generate_sync_message(&mut state).unwrap();
    let request = Message::Request {
        sender_id: "good".into(),
        target_id: "node".into(),
        document_id: id.to_string(),
        data: first.encode(),
    };
    socket.send(Ws::binary(request.encode())).await.unwrap();
    for _ in 0..10 {
        let Some(Message::Sync { data, .. }) = next(&mut socket).await else {
            panic!("expected a sync message");
        };
        doc.receive_sync_message(&mut state, sync::Message::decode(&data).unwrap())
            .unwrap();
        match doc.generate_sync_message(&mut state) {
            Some(reply) => {
                let reply = Message::Sync {
                    sender_id: "good".into(),
                    target_id: "node".into(),
                    document_id: id.to_string(),
                    data: reply.encode(),
                };
                socket.send(Ws::binary(reply.encode())).await.unwrap();
            }
            None => break,
        }
        if !doc.get_heads().is_empty() {
            break;
        }
    }
    doc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_close_alone_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = sync_node::init::init(&sync_node::init::InitOptions::new(
        "us-east".parse().unwrap(),
        dir.path(),
    ))
    .unwrap();
    let node = sync_node::Node::start(&sync_node::config::Config::load(&path).unwrap())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let (api, token) = (node.url(), node.token().to_owned());
    let response = http
        .post(format!("{api}/v1/docs/inventory%2Fsku-1/ops"))
        .bearer_auth(&token)
        .json(&json!({"ops": [{"op": "set", "path": "/stock", "value": 5}]}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let doc: serde_json::Value = http
        .get(format!("{api}/v1/docs/inventory%2Fsku-1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = RepoId::from_url(doc["url"].as_str().unwrap()).unwrap();
    let heads = doc["heads"].clone();
    let ws = format!("{}/v1/automerge-repo", api.replacen("http://", "ws://", 1));
    let url = format!("{ws}?token={token}");

    // No token, or a wrong one: 401 before any upgrade.
    for bad in [ws.clone(), format!("{ws}?token=wrong")] {
        match tokio_tungstenite::connect_async(bad.as_str()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401)
            }
            other => panic!("{bad}: expected 401, got {other:?}"),
        }
    }
    // The header works as well as the query.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws.as_str())
            .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut by_header, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    by_header.send(Ws::binary(join("h"))).await.unwrap();
    assert!(matches!(
        next(&mut by_header).await,
        Some(Message::Peer { .. })
    ));

    let good = fetch(&url, id).await;
    assert_eq!(
        good.get(archipelago::automerge::ROOT, "stock")
            .unwrap()
            .unwrap()
            .0
            .as_i64(),
        Some(5)
    );

    let sync_of = |data: Vec<u8>| {
        Message::Sync {
            sender_id: "bad".into(),
            target_id: "node".into(),
            document_id: id.to_string(),
            data,
        }
        .encode()
    };
    let mut nested = vec![0x81u8; 64];
    nested.push(0x01);
    let hostile: Vec<(&str, Vec<Ws>)> = vec![
        ("malformed CBOR", vec![Ws::binary(vec![0xff, 0x13, 0x00])]),
        ("deep nesting", vec![Ws::binary(nested)]),
        ("sync before join", vec![Ws::binary(sync_of(vec![0x42]))]),
        ("text", vec![Ws::text("hello")]),
        (
            "garbage sync message",
            vec![
                Ws::binary(join("bad")),
                Ws::binary(sync_of(vec![0x42, 0xde, 0xad, 0xbe, 0xef])),
            ],
        ),
        (
            "oversized",
            vec![
                Ws::binary(join("bad")),
                Ws::binary(vec![0u8; (16 << 20) + 1]),
            ],
        ),
    ];
    for (what, messages) in hostile {
        let mut socket = connect(&url).await;
        let mut told = false;
        for message in messages {
            // The node may close before taking all of an oversized message.
            let _ = socket.send(message).await;
        }
        while let Some(message) = next(&mut socket).await {
            told |= matches!(message, Message::Error { .. });
        }
        // Oversized messages are cut off by the WebSocket layer itself.
        assert!(told || what == "oversized", "{what}: no error message");
        // Everyone else is still served.
        let again = fetch(&url, id).await;
        assert_eq!(again.get_heads(), good.get_heads(), "after {what}");
    }
    by_header.send(Ws::binary(join("h"))).await.unwrap();
    assert!(
        matches!(next(&mut by_header).await, Some(Message::Peer { .. })),
        "still open"
    );

    // Status lists the open connection; the metrics count the traffic.
    let status: serde_json::Value = http
        .get(format!("{api}/v1/status"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let clients = status["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 1, "{status}");
    assert_eq!(clients[0]["peer_id"], "h");
    assert_eq!(clients[0]["token"], "admin");
    assert_eq!(clients[0]["messages_in"], 2);
    let metrics = http
        .get(format!("{api}/metrics"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "archipelago_clients_connected{token=\"admin\"} 1",
        "archipelago_client_messages_total{direction=\"in\"}",
        "archipelago_client_bytes_total{direction=\"out\"}",
    ] {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }

    // Nothing was applied: one document, at the same heads.
    let list: serde_json::Value = http
        .get(format!("{api}/v1/docs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["docs"].as_array().unwrap().len(), 1, "{list}");
    let after: serde_json::Value = http
        .get(format!("{api}/v1/docs/inventory%2Fsku-1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(after["heads"], heads);
    node.shutdown().await.unwrap();
}

/// `[clients]`: a token holds at most `connections_per_token` open
/// WebSockets (429 `too_many_connections` beyond, before the upgrade), a
/// closed one frees its place, and documents clients create are stored
/// under the configured namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_limits_and_namespace_come_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = sync_node::init::init(&sync_node::init::InitOptions::new(
        "us-east".parse().unwrap(),
        dir.path(),
    ))
    .unwrap();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("\n[clients]\nnamespace = \"apps/js\"\nconnections_per_token = 2\n");
    std::fs::write(&path, text).unwrap();
    let node = sync_node::Node::start(&sync_node::config::Config::load(&path).unwrap())
        .await
        .unwrap();
    let (api, admin) = (node.url(), node.token().to_owned());
    let http = reqwest::Client::new();
    // A token of its own, so the metrics of the other test stay apart.
    let created: serde_json::Value = http
        .post(format!("{api}/v1/tokens"))
        .bearer_auth(&admin)
        .json(&json!({"name": "limited", "prefixes": ["apps/js/"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let url = format!(
        "{}/v1/automerge-repo?token={token}",
        api.replacen("http://", "ws://", 1)
    );
    let open = || async {
        http.get(format!("{api}/v1/status"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()["clients"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["token"] == "limited")
            .count()
    };

    let mut first = connect(&url).await;
    let second = connect(&url).await;
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned();
            assert!(body.contains("too_many_connections"), "{body}");
        }
        other => panic!("a third connection: expected 429, got {other:?}"),
    }
    assert_eq!(open().await, 2);
    drop(second);
    let started = std::time::Instant::now();
    while open().await != 1 {
        assert!(
            started.elapsed() < WAIT,
            "the closed connection stays listed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut third = connect(&url).await;
    third.close(None).await.unwrap();

    // A client's new document lands under apps/js/.
    first.send(Ws::binary(join("maker"))).await.unwrap();
    assert!(matches!(next(&mut first).await, Some(Message::Peer { .. })));
    let id = RepoId::derived(&"made/by-a-client".parse().unwrap());
    let mut doc = Automerge::new();
    {
        use archipelago::automerge::transaction::Transactable;
        let mut tx = doc.transaction();
        tx.put(archipelago::automerge::ROOT, "made", "here")
            .unwrap();
        tx.commit();
    }
    let mut state = sync::State::new();
    let stored: archipelago::DocId = format!("apps/js/{id}").parse().unwrap();
    for _ in 0..10 {
        if let Some(message) = doc.generate_sync_message(&mut state) {
            let sync = Message::Sync {
                sender_id: "maker".into(),
                target_id: "node".into(),
                document_id: id.to_string(),
                data: message.encode(),
            };
            first.send(Ws::binary(sync.encode())).await.unwrap();
        }
        // The node answers, or has nothing more to say.
        match tokio::time::timeout(Duration::from_millis(500), first.next()).await {
            Ok(Some(Ok(Ws::Binary(bytes)))) => {
                let Message::Sync { data, .. } = Message::decode(&bytes).unwrap() else {
                    panic!("expected a sync message");
                };
                doc.receive_sync_message(&mut state, sync::Message::decode(&data).unwrap())
                    .unwrap();
            }
            Ok(other) => panic!("expected a sync message, got {other:?}"),
            Err(_) => {}
        }
        if node.replica().heads(&stored).as_deref() == Some(&doc.get_heads()[..]) {
            break;
        }
    }
    assert_eq!(
        node.replica().heads(&stored),
        Some(doc.get_heads()),
        "stored as apps/js/ID"
    );
    node.shutdown().await.unwrap();
}
