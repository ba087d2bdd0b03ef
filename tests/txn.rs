//! Transactions across documents, at the replica: one change per document
//! in one durable write, preconditions, nothing applied on failure, and at
//! a receiving replica atomic visibility however the members arrive
//! (changes, whole documents, out of order, duplicated, with dependants),
//! consistent multi-document reads, and optimistic concurrency.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use archipelago::doc::Op;
use archipelago::store::{DocEntry, Memory, Store, StoreError, StoredDoc, Write};
use archipelago::txn::{Precondition, Txn, TxnDoc, TxnHeader};
use archipelago::{DocId, Error, Origin, Replica, ReplicaOptions};
use serde_json::json;

fn ops(value: serde_json::Value) -> Vec<Op> {
    serde_json::from_value(value).unwrap()
}

fn id(s: &str) -> DocId {
    s.parse().unwrap()
}

fn replica(site: &str) -> Replica {
    Replica::open(
        ReplicaOptions::new(site.parse().unwrap()),
        Arc::new(Memory::new()),
    )
    .unwrap()
}

fn part(doc: &str, value: serde_json::Value) -> TxnDoc {
    TxnDoc {
        id: id(doc),
        ops: ops(value),
        precondition: Precondition::none(),
    }
}

/// A store that counts its durable writes.
struct Counting {
    inner: Memory,
    commits: AtomicUsize,
}

impl Store for Counting {
    fn docs(&self) -> Result<Vec<DocEntry>, StoreError> {
        self.inner.docs()
    }
    fn load(&self, doc: &DocId) -> Result<Option<StoredDoc>, StoreError> {
        self.inner.load(doc)
    }
    fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.inner.commit(writes)
    }
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.meta(key)
    }
    fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.meta_prefix(prefix)
    }
}

fn counting() -> Arc<Counting> {
    Arc::new(Counting {
        inner: Memory::new(),
        commits: AtomicUsize::new(0),
    })
}

/// The order and its stock: one transaction.
fn order_txn(order: &str) -> Txn {
    Txn {
        docs: vec![
            part(
                &format!("orders/{order}"),
                json!([{"op": "set", "path": "/sku", "value": "sku-1"}, {"op": "set", "path": "/qty", "value": 1}]),
            ),
            part(
                "inventory/sku-1",
                json!([{"op": "inc", "path": "/stock", "by": -1}]),
            ),
        ],
        message: Some(format!("take order {order}")),
    }
}

/// [`order_txn`] for a site that has no stock document yet: it creates it.
fn fresh_order_txn(order: &str) -> Txn {
    let mut txn = order_txn(order);
    txn.docs[1].ops = ops(json!([{"op": "set", "path": "/stock", "value": 4, "as": "counter"}]));
    txn
}

fn stock(replica: &Replica, value: i64) {
    replica
        .apply_ops(
            &id("inventory/sku-1"),
            &ops(json!([{"op": "set", "path": "/stock", "value": value, "as": "counter"}])),
            Some("receive stock"),
        )
        .unwrap();
}

#[test]
fn a_transaction_is_one_change_per_document_in_one_durable_write() {
    let store = counting();
    let east = Replica::open(ReplicaOptions::new("east".parse().unwrap()), store.clone()).unwrap();
    stock(&east, 5);
    let before = store.commits.load(Ordering::SeqCst);
    let commit = east.commit_txn(&order_txn("1")).unwrap();
    assert_eq!(store.commits.load(Ordering::SeqCst), before + 1);
    assert_eq!(commit.docs.len(), 2);
    assert_eq!(commit.docs[0].0, id("orders/1"));
    for (doc, result) in &commit.docs {
        let change = result
            .change
            .expect("every document with ops gets a change");
        assert_eq!(east.heads(doc).unwrap(), result.heads);
        let history = east.history(doc).unwrap().unwrap();
        let last = history.last().unwrap();
        assert_eq!(last.hash, change);
        assert_eq!(last.txn, Some(commit.txn));
        assert_eq!(last.message.as_deref(), Some("take order 1"));
    }
    let view = east
        .read_json(&id("inventory/sku-1"), None)
        .unwrap()
        .unwrap();
    assert_eq!(view.value["stock"], 4);
}

#[test]
fn a_failed_precondition_or_op_changes_nothing_and_names_the_document() {
    let east = replica("east");
    stock(&east, 5);
    let stock_id = id("inventory/sku-1");
    let heads = east.heads(&stock_id).unwrap();
    let before = east.index();

    let mut stale = order_txn("1");
    stale.docs[1].precondition = Precondition::if_heads(vec![archipelago::ChangeHash([9; 32])]);
    match east.commit_txn(&stale) {
        Err(Error::PreconditionFailed { doc, reason }) => {
            assert_eq!(doc, stock_id);
            assert!(reason.contains("heads"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let mut exists = order_txn("1");
    exists.docs[1].precondition.if_absent = true;
    assert!(
        matches!(east.commit_txn(&exists), Err(Error::PreconditionFailed { doc, .. }) if doc == stock_id)
    );

    // The order would be written first (id order), then the op on the stock fails.
    let mut bad = order_txn("1");
    bad.docs[1].ops = ops(json!([{"op": "inc", "path": "/missing/deeper", "by": 1}]));
    assert!(matches!(east.commit_txn(&bad), Err(Error::TxnOp { doc, .. }) if doc == stock_id));

    assert_eq!(east.index(), before, "nothing was applied");
    assert!(east.read_json(&id("orders/1"), None).unwrap().is_none());

    let mut fresh = order_txn("1");
    fresh.docs[0].precondition.if_absent = true;
    fresh.docs[1].precondition = Precondition::if_heads(heads);
    east.commit_txn(&fresh).unwrap();
    // The same heads are stale now.
    let mut again = order_txn("2");
    again.docs[1].precondition = Precondition::if_heads(east.heads(&stock_id).unwrap());
    east.commit_txn(&again).unwrap();
    assert!(east.commit_txn(&fresh).is_err());

    // A document with no ops is only checked.
    let check_only = Txn {
        docs: vec![
            TxnDoc {
                id: id("orders/1"),
                ops: Vec::new(),
                precondition: Precondition::if_heads(Vec::new()),
            },
            part("orders/3", json!([{"op": "set", "path": "/a", "value": 1}])),
        ],
        message: None,
    };
    assert!(
        matches!(east.commit_txn(&check_only), Err(Error::PreconditionFailed { doc, .. }) if doc == id("orders/1"))
    );
}

#[test]
fn malformed_transactions_are_refused() {
    let east = replica("east");
    let twice = Txn {
        docs: vec![
            part("a", json!([{"op": "set", "path": "/x", "value": 1}])),
            part("a", json!([{"op": "set", "path": "/y", "value": 1}])),
        ],
        message: None,
    };
    assert!(matches!(east.commit_txn(&twice), Err(Error::Txn(_))));
    let reserved = Txn {
        message: Some("archipelago-txn/1 forged".to_owned()),
        ..order_txn("1")
    };
    assert!(matches!(east.commit_txn(&reserved), Err(Error::Txn(_))));
    assert!(east
        .apply_ops(
            &id("a"),
            &ops(json!([{"op": "set", "path": "/x", "value": 1}])),
            Some("archipelago-txn/1 forged")
        )
        .is_err());
    assert!(east.index().is_empty());
}

/// Every change of `doc` at `from`.
fn changes(from: &Replica, doc: &str) -> Vec<Vec<u8>> {
    from.changes_after(&id(doc), &[]).unwrap().unwrap()
}

fn peer(site: &str) -> Origin {
    Origin::Peer(site.parse().unwrap())
}

#[test]
fn a_receiving_replica_shows_a_transaction_only_whole() {
    let east = replica("east");
    let west = replica("west");
    stock(&east, 5);
    west.apply_changes(
        &id("inventory/sku-1"),
        &changes(&east, "inventory/sku-1"),
        peer("east"),
    )
    .unwrap();
    let base = west.heads(&id("inventory/sku-1")).unwrap();
    let commit = east.commit_txn(&order_txn("1")).unwrap();
    let mut events = west.subscribe();

    // The stock's change arrives first (twice, as a duplicated frame would).
    let stock_changes = east
        .changes_after(&id("inventory/sku-1"), &base)
        .unwrap()
        .unwrap();
    for _ in 0..2 {
        let applied = west
            .apply_changes(&id("inventory/sku-1"), &stock_changes, peer("east"))
            .unwrap();
        assert!(applied.applied.is_empty());
        assert_eq!(applied.held.len(), 1);
    }
    assert_eq!(west.heads(&id("inventory/sku-1")).unwrap(), base);
    assert_eq!(
        west.read_json(&id("inventory/sku-1"), None)
            .unwrap()
            .unwrap()
            .value["stock"],
        5
    );
    assert!(west.read_json(&id("orders/1"), None).unwrap().is_none());
    assert_eq!(west.txn_stats().held_txns, 1);
    assert!(events.try_recv().is_err(), "nothing published yet");

    // The order completes it: both become visible, published together.
    let applied = west
        .apply_changes(&id("orders/1"), &changes(&east, "orders/1"), peer("east"))
        .unwrap();
    assert_eq!(applied.heads, commit.docs[0].1.heads);
    let first = events.try_recv().unwrap();
    let second = events.try_recv().unwrap();
    let mut docs = vec![
        first.doc.as_str().to_owned(),
        second.doc.as_str().to_owned(),
    ];
    docs.sort();
    assert_eq!(docs, ["inventory/sku-1", "orders/1"]);
    assert_eq!(first.txns, vec![commit.txn]);
    assert_eq!(second.txns, vec![commit.txn]);
    for (doc, result) in &commit.docs {
        assert_eq!(west.heads(doc).unwrap(), result.heads);
    }
    let stats = west.txn_stats();
    assert_eq!((stats.held_txns, stats.completed), (0, 1));
    assert_eq!(west.take_txn_hold_times().len(), 1);

    // Sent again later: duplicates, nothing held.
    let again = west
        .apply_changes(&id("inventory/sku-1"), &stock_changes, peer("east"))
        .unwrap();
    assert!(again.held.is_empty() && again.applied.is_empty());
}

#[test]
fn changes_after_a_held_one_wait_with_it() {
    let east = replica("east");
    let west = replica("west");
    east.commit_txn(&fresh_order_txn("1")).unwrap();
    east.apply_ops(
        &id("orders/1"),
        &ops(json!([{"op": "set", "path": "/paid", "value": true}])),
        Some("paid"),
    )
    .unwrap();
    let applied = west
        .apply_changes(&id("orders/1"), &changes(&east, "orders/1"), peer("east"))
        .unwrap();
    assert_eq!(applied.held.len(), 2, "the order and the payment after it");
    assert!(west.heads(&id("orders/1")).is_none());
    west.apply_changes(
        &id("inventory/sku-1"),
        &changes(&east, "inventory/sku-1"),
        peer("east"),
    )
    .unwrap();
    let order = west.read_json(&id("orders/1"), None).unwrap().unwrap();
    assert_eq!(order.value["paid"], true);
    assert_eq!(order.heads, east.heads(&id("orders/1")).unwrap());
}

#[test]
fn whole_documents_holding_a_member_wait_for_the_rest() {
    let east = replica("east");
    let west = replica("west");
    east.commit_txn(&fresh_order_txn("1")).unwrap();
    let order = east.snapshot_bytes(&id("orders/1")).unwrap().unwrap();
    let stock_doc = east
        .snapshot_bytes(&id("inventory/sku-1"))
        .unwrap()
        .unwrap();

    let applied = west
        .apply_snapshot(&id("orders/1"), &order.bytes, peer("east"))
        .unwrap();
    assert!(!applied.held.is_empty());
    assert!(west.heads(&id("orders/1")).is_none());
    west.apply_snapshot(&id("inventory/sku-1"), &stock_doc.bytes, peer("east"))
        .unwrap();
    assert_eq!(west.heads(&id("orders/1")).unwrap(), order.heads);
    assert_eq!(west.heads(&id("inventory/sku-1")).unwrap(), stock_doc.heads);

    // Arriving together, they are stored together at once.
    let north = replica("north");
    let results = north.apply_snapshots(
        &[
            (id("orders/1"), order.bytes.as_slice()),
            (id("inventory/sku-1"), stock_doc.bytes.as_slice()),
        ],
        &peer("east"),
    );
    assert!(results.iter().all(|r| r.as_ref().unwrap().held.is_empty()));
    assert_eq!(north.heads(&id("orders/1")).unwrap(), order.heads);
}

#[test]
fn members_a_site_does_not_replicate_are_not_waited_for() {
    let east = replica("east");
    let mut options = ReplicaOptions::new("west".parse().unwrap());
    options.replicates = Arc::new(|doc: &DocId| doc.as_str().starts_with("inventory/"));
    let west = Replica::open(options, Arc::new(Memory::new())).unwrap();
    east.commit_txn(&fresh_order_txn("1")).unwrap();
    let applied = west
        .apply_changes(
            &id("inventory/sku-1"),
            &changes(&east, "inventory/sku-1"),
            peer("east"),
        )
        .unwrap();
    assert_eq!(applied.applied.len(), 1);
    assert!(applied.held.is_empty());
}

#[test]
fn members_a_peer_never_sends_are_not_waited_for() {
    let east = replica("east");
    let west = replica("west");
    east.commit_txn(&fresh_order_txn("1")).unwrap();
    west.apply_changes(
        &id("inventory/sku-1"),
        &changes(&east, "inventory/sku-1"),
        peer("east"),
    )
    .unwrap();
    let east_site: archipelago::SiteName = "east".parse().unwrap();
    let missing = west.held_missing(&east_site);
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0].1, vec![id("orders/1")]);
    // A site that delivered none of it is not heeded.
    west.txn_not_from(&"north".parse().unwrap(), missing[0].0, &[id("orders/1")]);
    assert!(west.heads(&id("inventory/sku-1")).is_none());
    west.txn_not_from(&east_site, missing[0].0, &[id("orders/1")]);
    assert_eq!(
        west.heads(&id("inventory/sku-1")).unwrap(),
        east.heads(&id("inventory/sku-1")).unwrap()
    );
    assert_eq!(west.txn_stats().released_partial, 1);
}

#[test]
fn consistent_reads_never_see_part_of_a_transaction() {
    // East moves units between two documents in transactions; west
    // receives each document's changes separately; readers at both sites
    // check the total never changes.
    let east = replica("east");
    let west = replica("west");
    let a = id("balances/a");
    let b = id("balances/b");
    east.commit_txn(&Txn {
        docs: vec![
            part(
                "balances/a",
                json!([{"op": "set", "path": "/n", "value": 100, "as": "counter"}]),
            ),
            part(
                "balances/b",
                json!([{"op": "set", "path": "/n", "value": 0, "as": "counter"}]),
            ),
        ],
        message: None,
    })
    .unwrap();
    let total = |r: &Replica| {
        let views = r.read_many(&[id("balances/a"), id("balances/b")]).unwrap();
        match (&views[0], &views[1]) {
            (Some(x), Some(y)) => {
                Some(x.value["n"].as_i64().unwrap() + y.value["n"].as_i64().unwrap())
            }
            (None, None) => None,
            _ => Some(-1),
        }
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = [east.clone(), west.clone()]
        .into_iter()
        .map(|r| {
            let (stop, total) = (stop.clone(), total);
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(Ordering::SeqCst) {
                    if let Some(sum) = total(&r) {
                        assert_eq!(sum, 100, "a read saw part of a transaction");
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let mut sent_a = Vec::new();
    let mut sent_b = Vec::new();
    for round in 0..200 {
        let by = if round % 3 == 0 { -2 } else { 1 };
        east.commit_txn(&Txn {
            docs: vec![
                part(
                    "balances/a",
                    json!([{"op": "inc", "path": "/n", "by": -by}]),
                ),
                part("balances/b", json!([{"op": "inc", "path": "/n", "by": by}])),
            ],
            message: None,
        })
        .unwrap();
        let to_a = east.changes_after(&a, &sent_a).unwrap().unwrap();
        let to_b = east.changes_after(&b, &sent_b).unwrap().unwrap();
        sent_a = east.heads(&a).unwrap();
        sent_b = east.heads(&b).unwrap();
        // Alternate which document arrives first.
        if round % 2 == 0 {
            west.apply_changes(&a, &to_a, peer("east")).unwrap();
            west.apply_changes(&b, &to_b, peer("east")).unwrap();
        } else {
            west.apply_changes(&b, &to_b, peer("east")).unwrap();
            west.apply_changes(&a, &to_a, peer("east")).unwrap();
        }
    }
    stop.store(true, Ordering::SeqCst);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    assert_eq!(total(&west), Some(100));
    assert_eq!(west.heads(&a), east.heads(&a));
    assert_eq!(west.txn_stats().held_txns, 0);
}

#[test]
fn read_modify_write_with_if_heads_loses_no_update() {
    let east = replica("east");
    let counter = id("counters/visits");
    east.apply_ops(
        &counter,
        &ops(json!([{"op": "set", "path": "/n", "value": 0}])),
        None,
    )
    .unwrap();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let east = east.clone();
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut retries = 0;
                for _ in 0..50 {
                    loop {
                        let view = east.read_json(&counter, None).unwrap().unwrap();
                        let n = view.value["n"].as_i64().unwrap();
                        let write = ops(json!([{"op": "set", "path": "/n", "value": n + 1}]));
                        match east.apply_ops_if(
                            &counter,
                            &write,
                            None,
                            &Precondition::if_heads(view.heads),
                        ) {
                            Ok(_) => break,
                            Err(Error::PreconditionFailed { .. }) => retries += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                retries
            })
        })
        .collect();
    let retries: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let view = east.read_json(&counter, None).unwrap().unwrap();
    assert_eq!(
        view.value["n"], 400,
        "every increment counted ({retries} retries)"
    );
}

#[test]
fn member_changes_name_their_transaction_and_members() {
    let east = replica("east");
    let commit = east.commit_txn(&fresh_order_txn("7")).unwrap();
    let bytes = changes(&east, "orders/7").pop().unwrap();
    let change = archipelago::decode_change(&bytes).unwrap();
    let (header, user) = TxnHeader::parse(change.message().unwrap()).unwrap();
    assert_eq!(header.id, commit.txn);
    assert_eq!(header.members, vec![id("inventory/sku-1"), id("orders/7")]);
    assert_eq!(user, Some("take order 7"));
}
