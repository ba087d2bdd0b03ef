//! automerge-repo clients of a replica, driven as state: a client made of a
//! plain automerge document and sync state speaks the protocol's messages
//! to a `ClientSession` over a `ReplicaClients`. Documents a client creates
//! are stored under the namespace, node-side changes reach it, unknown and
//! out-of-scope documents are unavailable, read-only clients and documents
//! with bounded counters change nothing, and malformed input closes the
//! session with nothing applied.

use std::sync::Arc;
use std::time::{Duration, Instant};

use archipelago::automerge::sync::{self, SyncDoc};
use archipelago::automerge::transaction::Transactable;
use archipelago::automerge::{AutoCommit, ReadDoc, ROOT};
use archipelago::clients::wire::{Message, PROTOCOL_V1};
use archipelago::clients::{ClientConfig, ClientSession, ReplicaClients, RepoId};
use archipelago::doc::Op;
use archipelago::{DocId, Replica, ReplicaOptions};
use serde_json::json;

fn replica() -> Replica {
    Replica::open(
        ReplicaOptions::new("us-east".parse().unwrap()),
        Arc::new(archipelago::store::Memory::new()),
    )
    .unwrap()
}

/// A JS-like client: one automerge document per repo id, with its sync
/// state towards the node.
struct Client {
    id: String,
    docs: Vec<(RepoId, AutoCommit, sync::State)>,
    unavailable: Vec<String>,
    errors: Vec<String>,
    /// Ephemeral messages received: (sender, target, count, data).
    ephemeral: Vec<(String, String, u64, Vec<u8>)>,
}

impl Client {
    fn new(id: &str) -> Client {
        Client {
            id: id.to_owned(),
            docs: Vec::new(),
            unavailable: Vec::new(),
            errors: Vec::new(),
            ephemeral: Vec::new(),
        }
    }

    fn join(&self) -> Vec<u8> {
        Message::Join {
            sender_id: self.id.clone(),
            supported_protocol_versions: vec![PROTOCOL_V1.to_owned()],
            metadata: None,
        }
        .encode()
    }

    fn doc(&mut self, id: RepoId) -> &mut (RepoId, AutoCommit, sync::State) {
        if let Some(k) = self.docs.iter().position(|(d, _, _)| *d == id) {
            return &mut self.docs[k];
        }
        self.docs.push((id, AutoCommit::new(), sync::State::new()));
        self.docs.last_mut().unwrap()
    }

    /// The client's next sync message about `id` (a `request` while it
    /// holds nothing of it).
    fn outgoing(&mut self, id: RepoId) -> Option<Vec<u8>> {
        let sender_id = self.id.clone();
        let (_, doc, state) = self.doc(id);
        let empty = doc.get_heads().is_empty();
        let message = doc.sync().generate_sync_message(state)?;
        let (document_id, data) = (id.to_string(), message.encode());
        let target_id = "node".to_owned();
        Some(
            if empty {
                Message::Request {
                    sender_id,
                    target_id,
                    document_id,
                    data,
                }
            } else {
                Message::Sync {
                    sender_id,
                    target_id,
                    document_id,
                    data,
                }
            }
            .encode(),
        )
    }

    fn incoming(&mut self, bytes: &[u8]) {
        match Message::decode(bytes).unwrap() {
            Message::Sync {
                document_id, data, ..
            } => {
                let id = RepoId::parse(&document_id).unwrap();
                let (_, doc, state) = self.doc(id);
                let message = sync::Message::decode(&data).unwrap();
                doc.sync().receive_sync_message(state, message).unwrap();
            }
            Message::DocUnavailable { document_id, .. } => self.unavailable.push(document_id),
            Message::Error { message } => self.errors.push(message),
            Message::Ephemeral {
                sender_id,
                target_id,
                count,
                data,
                ..
            } => self.ephemeral.push((sender_id, target_id, count, data)),
            Message::Peer { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Exchanges messages about `id` between `client` and `session` until
/// neither has anything to say (bounded).
fn settle(client: &mut Client, session: &mut ClientSession, host: &ReplicaClients, id: RepoId) {
    for _ in 0..20 {
        let mut quiet = true;
        if let Some(bytes) = client.outgoing(id) {
            session.handle(Instant::now(), host, &bytes);
            quiet = false;
        }
        while let Some(bytes) = session.poll_transmit() {
            client.incoming(&bytes);
            quiet = false;
        }
        if quiet {
            return;
        }
    }
    panic!("client and node did not settle");
}

fn open(host: &ReplicaClients, config: ClientConfig, client: &mut Client) -> ClientSession {
    let mut session = ClientSession::new(config);
    session.handle(Instant::now(), host, &client.join());
    match Message::decode(&session.poll_transmit().unwrap()).unwrap() {
        Message::Peer {
            target_id,
            selected_protocol_version,
            ..
        } => {
            assert_eq!(target_id, client.id);
            assert_eq!(selected_protocol_version, PROTOCOL_V1);
        }
        other => panic!("expected peer, got {other:?}"),
    }
    session
}

/// A client's ephemeral message about `id`.
fn ephemeral(client: &Client, id: RepoId, count: u64, data: &[u8]) -> Vec<u8> {
    Message::Ephemeral {
        sender_id: client.id.clone(),
        target_id: "node".to_owned(),
        count,
        session_id: format!("{}-session", client.id),
        document_id: id.to_string(),
        data: data.to_vec(),
    }
    .encode()
}

fn ops(value: serde_json::Value) -> Vec<Op> {
    serde_json::from_value(value).unwrap()
}

#[test]
fn a_client_creates_reads_and_hears_of_node_side_changes() {
    let replica = replica();
    let host = ReplicaClients::new(replica.clone(), "repo");
    let mut client = Client::new("client-1");
    let mut session = open(&host, ClientConfig::new("node"), &mut client);

    // Created at the client, stored at the node as repo/ID with equal heads.
    let id = RepoId::derived(&"anything/at-all".parse().unwrap());
    {
        let (_, doc, _) = client.doc(id);
        doc.put(ROOT, "title", "from js").unwrap();
    }
    settle(&mut client, &mut session, &host, id);
    let stored: DocId = format!("repo/{id}").parse().unwrap();
    assert_eq!(
        replica.read_json(&stored, None).unwrap().unwrap().value,
        json!({"title": "from js"})
    );
    assert_eq!(
        replica.heads(&stored).unwrap(),
        client.doc(id).1.get_heads()
    );
    assert_eq!(host.url(&stored), id.url());

    // A change made at the node reaches the client.
    replica
        .apply_ops(
            &stored,
            &ops(json!([{"op": "set", "path": "/n", "value": 1}])),
            None,
        )
        .unwrap();
    session.handle_changed(&host, &stored);
    while let Some(bytes) = session.poll_transmit() {
        client.incoming(&bytes);
    }
    settle(&mut client, &mut session, &host, id);
    let (_, doc, _) = client.doc(id);
    assert_eq!(doc.get(ROOT, "n").unwrap().unwrap().0.as_i64(), Some(1));
    assert_eq!(replica.heads(&stored).unwrap(), doc.get_heads());

    // A document of the node opens by its derived URL.
    let inventory: DocId = "inventory/sku-1".parse().unwrap();
    replica
        .apply_ops(
            &inventory,
            &ops(json!([{"op": "set", "path": "/stock", "value": 5}])),
            None,
        )
        .unwrap();
    let inv_id = RepoId::from_url(&host.url(&inventory)).unwrap();
    settle(&mut client, &mut session, &host, inv_id);
    let (_, doc, _) = client.doc(inv_id);
    assert_eq!(doc.get(ROOT, "stock").unwrap().unwrap().0.as_i64(), Some(5));

    // Nothing by this id anywhere: unavailable, and nothing is created.
    let unknown = RepoId::derived(&"nowhere/x".parse().unwrap());
    settle(&mut client, &mut session, &host, unknown);
    assert_eq!(client.unavailable, vec![unknown.to_string()]);
    assert!(replica
        .heads(&format!("repo/{unknown}").parse().unwrap())
        .is_none());
    assert!(session.closed().is_none());
    assert!(client.errors.is_empty(), "{:?}", client.errors);
}

#[test]
fn scopes_read_only_clients_and_bounded_counters_keep_documents_unchanged() {
    let replica = replica();
    let host = ReplicaClients::new(replica.clone(), "repo");
    let a: DocId = "tenant-a/doc".parse().unwrap();
    let b: DocId = "tenant-b/doc".parse().unwrap();
    for doc in [&a, &b] {
        replica
            .apply_ops(
                doc,
                &ops(json!([{"op": "set", "path": "/v", "value": 1}])),
                None,
            )
            .unwrap();
    }
    let (a_id, b_id) = (
        RepoId::from_url(&host.url(&a)).unwrap(),
        RepoId::from_url(&host.url(&b)).unwrap(),
    );

    // A client scoped to tenant-a/ sees nothing of tenant-b/.
    let mut config = ClientConfig::new("node");
    config.prefixes = Some(vec!["tenant-a/".to_owned()]);
    let mut client = Client::new("scoped");
    let mut session = open(&host, config.clone(), &mut client);
    settle(&mut client, &mut session, &host, b_id);
    assert_eq!(client.unavailable, vec![b_id.to_string()]);
    assert!(client.doc(b_id).1.get_heads().is_empty());
    settle(&mut client, &mut session, &host, a_id);
    assert_eq!(client.doc(a_id).1.get_heads(), replica.heads(&a).unwrap());

    // A read-only client reads, and its change is not applied.
    config.read_only = true;
    let mut reader = Client::new("reader");
    let mut session = open(&host, config, &mut reader);
    settle(&mut reader, &mut session, &host, a_id);
    let before = replica.heads(&a).unwrap();
    assert_eq!(reader.doc(a_id).1.get_heads(), before);
    reader.doc(a_id).1.put(ROOT, "v", 2).unwrap();
    let bytes = reader.outgoing(a_id).unwrap();
    session.handle(Instant::now(), &host, &bytes);
    assert_eq!(replica.heads(&a).unwrap(), before, "nothing applied");
    assert_eq!(session.stats().refused, 1);

    // Bounded counters change only through their ops.
    let stock: DocId = "inventory/sku-9".parse().unwrap();
    replica
        .apply_ops(
            &stock,
            &ops(json!([{"op": "set", "path": "/stock", "value": 3, "as": "bounded", "min": 0}])),
            None,
        )
        .unwrap();
    let stock_id = RepoId::from_url(&host.url(&stock)).unwrap();
    let mut writer = Client::new("writer");
    let mut session = open(&host, ClientConfig::new("node"), &mut writer);
    settle(&mut writer, &mut session, &host, stock_id);
    let before = replica.heads(&stock).unwrap();
    writer
        .doc(stock_id)
        .1
        .increment(ROOT, "stock", -10)
        .unwrap();
    let bytes = writer.outgoing(stock_id).unwrap();
    session.handle(Instant::now(), &host, &bytes);
    while let Some(bytes) = session.poll_transmit() {
        writer.incoming(&bytes);
    }
    assert_eq!(replica.heads(&stock).unwrap(), before, "nothing applied");
    assert!(
        writer.errors.iter().any(|e| e.contains("bounded counters")),
        "{:?}",
        writer.errors
    );
}

#[test]
fn malformed_input_closes_the_session_and_applies_nothing() {
    let replica = replica();
    let host = ReplicaClients::new(replica.clone(), "repo");
    let id = RepoId::derived(&"x/y".parse().unwrap());
    let sync_with = |data: Vec<u8>| {
        Message::Sync {
            sender_id: "c".into(),
            target_id: "node".into(),
            document_id: id.to_string(),
            data,
        }
        .encode()
    };
    let mut config = ClientConfig::new("node");
    config.message_bytes_max = 1 << 10;
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("not CBOR", vec![vec![0xff, 0x00, 0x13]]),
        ("before join", vec![sync_with(vec![0x42])]),
        (
            "garbage sync message",
            vec![
                Client::new("c").join(),
                sync_with(vec![0x42, 0xff, 0xff, 0x07]),
            ],
        ),
        (
            "oversized",
            vec![Client::new("c").join(), sync_with(vec![0x42; 4096])],
        ),
        (
            "bad document id",
            vec![
                Client::new("c").join(),
                Message::Sync {
                    sender_id: "c".into(),
                    target_id: "node".into(),
                    document_id: "not-an-id".into(),
                    data: vec![0x42],
                }
                .encode(),
            ],
        ),
        (
            "wrong version",
            vec![Message::Join {
                sender_id: "c".into(),
                supported_protocol_versions: vec!["9".into()],
                metadata: None,
            }
            .encode()],
        ),
    ];
    for (what, messages) in cases {
        let mut session = ClientSession::new(config.clone());
        for message in &messages {
            session.handle(Instant::now(), &host, message);
        }
        assert!(session.closed().is_some(), "{what}: still open");
        let last = std::iter::from_fn(|| session.poll_transmit())
            .last()
            .unwrap();
        assert!(
            matches!(Message::decode(&last), Ok(Message::Error { .. })),
            "{what}: the client is told why"
        );
    }
    assert!(replica.doc_ids("").is_empty(), "nothing was created");

    // A client sending faster than its rate is cut off.
    let mut config = ClientConfig::new("node");
    config.messages_per_second = 10;
    config.messages_burst = 20;
    let mut session = ClientSession::new(config);
    let join = Client::new("c").join();
    let start = Instant::now();
    for k in 0..30 {
        session.handle(start + Duration::from_millis(k), &host, &join);
    }
    assert!(session.closed().unwrap().contains("too many messages"));
}

#[test]
fn ephemeral_messages_reach_the_documents_other_clients_only() {
    let replica = replica();
    let host = ReplicaClients::new(replica.clone(), "repo");
    let shared: DocId = "board/1".parse().unwrap();
    let other: DocId = "board/2".parse().unwrap();
    for doc in [&shared, &other] {
        replica
            .apply_ops(
                doc,
                &ops(json!([{"op": "set", "path": "/n", "value": 1}])),
                None,
            )
            .unwrap();
    }
    let (shared_id, other_id) = (RepoId::derived(&shared), RepoId::derived(&other));
    let mut a = Client::new("a");
    let mut b = Client::new("b");
    let mut c = Client::new("c");
    let mut reader_config = ClientConfig::new("node");
    reader_config.read_only = true;
    let mut sa = open(&host, ClientConfig::new("node"), &mut a);
    let mut sb = open(&host, reader_config, &mut b);
    let mut sc = open(&host, ClientConfig::new("node"), &mut c);
    settle(&mut a, &mut sa, &host, shared_id);
    settle(&mut b, &mut sb, &host, shared_id);
    settle(&mut c, &mut sc, &host, other_id);
    let heads = replica.heads(&shared);

    // a's presence reaches b (read-only clients see and send presence),
    // not c (another document) and not a itself.
    sa.handle(
        Instant::now(),
        &host,
        &ephemeral(&a, shared_id, 1, b"cursor"),
    );
    let relayed = sa.poll_relay().expect("kept for the other clients");
    assert!(sa.poll_relay().is_none());
    assert_eq!(
        (relayed.doc.clone(), relayed.id),
        (shared.clone(), shared_id)
    );
    for (client, session) in [(&mut a, &mut sa), (&mut b, &mut sb), (&mut c, &mut sc)] {
        session.handle_relayed(&relayed);
        while let Some(bytes) = session.poll_transmit() {
            client.incoming(&bytes);
        }
    }
    assert!(a.ephemeral.is_empty());
    assert!(c.ephemeral.is_empty());
    assert_eq!(
        b.ephemeral,
        vec![("a".to_owned(), "b".to_owned(), 1, b"cursor".to_vec())]
    );
    // b answers; it is passed on to a.
    sb.handle(Instant::now(), &host, &ephemeral(&b, shared_id, 1, b"here"));
    let back = sb.poll_relay().unwrap();
    sa.handle_relayed(&back);
    a.incoming(&sa.poll_transmit().unwrap());
    assert_eq!(
        a.ephemeral,
        vec![("b".to_owned(), "a".to_owned(), 1, b"here".to_vec())]
    );

    // About a document the client does not sync: nobody hears it.
    sc.handle(Instant::now(), &host, &ephemeral(&c, shared_id, 1, b"x"));
    assert!(sc.poll_relay().is_none());
    // Nothing of it is stored.
    assert_eq!(replica.heads(&shared), heads);

    // An oversized one closes that session alone.
    let big = vec![0u8; ClientConfig::new("node").ephemeral_bytes_max + 1];
    sa.handle(Instant::now(), &host, &ephemeral(&a, shared_id, 2, &big));
    assert!(sa.poll_relay().is_none());
    assert!(sa.closed().unwrap().contains("ephemeral message"));
    assert!(sb.closed().is_none() && sc.closed().is_none());
}
