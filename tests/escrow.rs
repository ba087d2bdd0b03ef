//! Bounded counters at the replica: created by an op, decremented within
//! the site's rights and refused beyond them with nothing applied, rights
//! moved by transfers and grants, never double-spent across a partition,
//! protected from ops and whole-document writes that would bypass them,
//! atomic inside transactions, and waited for while a peer grants.

use std::sync::Arc;
use std::time::Duration;

use archipelago::doc::{Op, OpError};
use archipelago::escrow::{self, EscrowConfig, GrantPolicy, Policy, PoolKind};
use archipelago::txn::{Precondition, Txn, TxnDoc};
use archipelago::{DocId, Error, Origin, Replica, ReplicaOptions};
use proptest::prelude::*;
use serde_json::json;

fn ops(value: serde_json::Value) -> Vec<Op> {
    serde_json::from_value(value).unwrap()
}

fn id(s: &str) -> DocId {
    s.parse().unwrap()
}

fn replica_with(site: &str, escrow: EscrowConfig) -> Replica {
    let mut options = ReplicaOptions::new(site.parse().unwrap());
    options.escrow = Arc::new(escrow);
    Replica::open(options, Arc::new(archipelago::store::Memory::new())).unwrap()
}

fn replica(site: &str) -> Replica {
    replica_with(site, EscrowConfig::default())
}

/// Sends everything `from` has of `doc` to `to`.
fn ship(from: &Replica, to: &Replica, doc: &DocId) {
    if let Some(changes) = from.changes_after(doc, &[]).unwrap() {
        to.apply_changes(doc, &changes, Origin::Peer(from.site().clone()))
            .unwrap();
    }
}

fn value(replica: &Replica, doc: &DocId) -> serde_json::Value {
    replica.read_json(doc, None).unwrap().unwrap().value
}

fn rights(replica: &Replica, doc: &DocId, site: &str) -> i64 {
    let state = replica.escrow(doc, "/stock").unwrap().unwrap();
    state.rights(&site.parse().unwrap())
}

fn assert_consistent(replica: &Replica, doc: &DocId) {
    replica
        .with_doc(doc, escrow::check)
        .unwrap()
        .unwrap()
        .unwrap_or_else(|v| panic!("{} breaks an invariant: {v}", replica.site()));
}

fn insufficient(result: Result<archipelago::Commit, Error>) -> (i64, i64) {
    match result {
        Err(Error::Op(op)) => match *op {
            OpError::InsufficientRights {
                available_here,
                available_total,
                ..
            } => (available_here, available_total),
            other => panic!("expected insufficient rights, got {other}"),
        },
        other => panic!("expected insufficient rights, got {other:?}"),
    }
}

#[test]
fn a_bounded_counter_spends_only_the_rights_its_site_holds() {
    let east = replica("us-east");
    let doc = id("inventory/sku-1");
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/stock", "value": 10, "as": "bounded", "min": 0}])),
        None,
    )
    .unwrap();
    // The value reads as a number; the rights state stays out of the view.
    assert_eq!(value(&east, &doc), json!({"stock": 10}));
    assert_eq!(rights(&east, &doc, "us-east"), 10);

    east.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": -7}])),
        None,
    )
    .unwrap();
    let heads = east.heads(&doc).unwrap();
    let refused = east.apply_ops(
        &doc,
        &ops(json!([
            {"op": "set", "path": "/note", "value": "x"},
            {"op": "inc", "path": "/stock", "by": -4}
        ])),
        None,
    );
    assert_eq!(insufficient(refused), (3, 3));
    assert_eq!(east.heads(&doc).unwrap(), heads, "nothing applied");
    assert_eq!(value(&east, &doc), json!({"stock": 3}));

    // A restock gives the rights to the site that made it.
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": 5}])),
        None,
    )
    .unwrap();
    assert_eq!(rights(&east, &doc, "us-east"), 8);
    assert_consistent(&east, &doc);
}

/// A decrement reuses the counter's state its site's previous decrement
/// left, but only while the document is exactly as that left it: a
/// transfer away, a grant merged in and a restock each change what the
/// next decrement may spend.
#[test]
fn a_decrement_sees_every_change_since_the_last_one() {
    let east = replica("us-east");
    let west = replica("us-west");
    let doc = id("inventory/sku-1");
    let dec = |site: &Replica, by: i64| {
        site.apply_ops(
            &doc,
            &ops(json!([{"op": "inc", "path": "/stock", "by": -by}])),
            None,
        )
    };
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/stock", "value": 10, "as": "bounded", "min": 0}])),
        None,
    )
    .unwrap();
    dec(&east, 1).unwrap();
    dec(&east, 1).unwrap();
    // Given away after the last decrement: not there to spend any more.
    east.escrow_transfer(
        &doc,
        "/stock",
        PoolKind::Down,
        &"us-west".parse().unwrap(),
        7,
        None,
    )
    .unwrap();
    assert_eq!(insufficient(dec(&east, 2)), (1, 8));
    dec(&east, 1).unwrap();
    assert_eq!(insufficient(dec(&east, 1)), (0, 7));

    // Given back by a peer, merged in: there to spend.
    ship(&east, &west, &doc);
    west.escrow_transfer(
        &doc,
        "/stock",
        PoolKind::Down,
        &"us-east".parse().unwrap(),
        3,
        None,
    )
    .unwrap();
    ship(&west, &east, &doc);
    dec(&east, 3).unwrap();
    assert_eq!(insufficient(dec(&east, 1)), (0, 4));

    // Restocked here: there to spend.
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": 2}])),
        None,
    )
    .unwrap();
    dec(&east, 2).unwrap();
    assert_eq!(insufficient(dec(&east, 1)), (0, 4));
    assert_eq!(value(&east, &doc), json!({"stock": 4}));
    assert_consistent(&east, &doc);
}

/// Documents written before `spent` became a plain integer hold a counter
/// there: they read and spend the same.
#[test]
fn a_counter_in_spent_from_an_older_document_still_counts() {
    let east = replica("us-east");
    let doc = id("inventory/sku-1");
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/stock", "value": 10, "as": "bounded", "min": 0}])),
        None,
    )
    .unwrap();
    // As an older version wrote a decrement of 4.
    let older = replica("us-west");
    let mut am = automerge::AutoCommit::new();
    let changes = east.changes_after(&doc, &[]).unwrap().unwrap();
    am.load_incremental(&changes.concat()).unwrap();
    {
        use automerge::{transaction::Transactable, ReadDoc, ScalarValue, ROOT};
        let state = am
            .get(ROOT, escrow::state_key("/stock").as_str())
            .unwrap()
            .unwrap()
            .1;
        let down = am.get(&state, "down").unwrap().unwrap().1;
        let spent = am.get(&down, "spent").unwrap().unwrap().1;
        am.put(&spent, "us-east", ScalarValue::counter(4)).unwrap();
        am.increment(ROOT, "stock", -4).unwrap();
    }
    let latest = am.get_last_local_change().unwrap();
    east.apply_changes(
        &doc,
        &[latest.raw_bytes().to_vec()],
        Origin::Peer(older.site().clone()),
    )
    .unwrap();
    assert_eq!(rights(&east, &doc, "us-east"), 6);
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": -6}])),
        None,
    )
    .unwrap();
    assert_eq!(
        insufficient(east.apply_ops(
            &doc,
            &ops(json!([{"op": "inc", "path": "/stock", "by": -1}])),
            None,
        )),
        (0, 0)
    );
    assert_eq!(value(&east, &doc), json!({"stock": 0}));
    assert_consistent(&east, &doc);
}

#[test]
fn split_rights_let_each_side_of_a_partition_sell_its_share_and_no_more() {
    let east = replica("us-east");
    let west = replica("us-west");
    let doc = id("inventory/sku-1");
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/stock", "value": 10, "as": "bounded", "min": 0}])),
        None,
    )
    .unwrap();
    east.escrow_transfer(
        &doc,
        "/stock",
        PoolKind::Down,
        &"us-west".parse().unwrap(),
        5,
        None,
    )
    .unwrap();
    ship(&east, &west, &doc);
    assert_eq!(rights(&west, &doc, "us-west"), 5);

    // Partitioned: each sells one at a time until refused.
    for site in [&east, &west] {
        for _ in 0..5 {
            site.apply_ops(
                &doc,
                &ops(json!([{"op": "inc", "path": "/stock", "by": -1}])),
                None,
            )
            .unwrap();
        }
        let refused = site.apply_ops(
            &doc,
            &ops(json!([{"op": "inc", "path": "/stock", "by": -1}])),
            None,
        );
        assert_eq!(insufficient(refused).0, 0, "{}", site.site());
    }
    ship(&east, &west, &doc);
    ship(&west, &east, &doc);
    for site in [&east, &west] {
        assert_eq!(value(site, &doc), json!({"stock": 0}));
        assert_consistent(site, &doc);
        assert!(site.conflicts(&Default::default()).unwrap().is_empty());
    }
}

#[test]
fn ops_and_whole_document_writes_cannot_bypass_the_rights() {
    let east = replica("us-east");
    let doc = id("inventory/sku-1");
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/item/stock", "value": 3, "as": "bounded", "min": 0}])),
        None,
    )
    .unwrap();
    for bypass in [
        json!({"op": "set", "path": "/item/stock", "value": 100}),
        json!({"op": "set", "path": "/item", "value": {"stock": 100}}),
        json!({"op": "del", "path": "/item/stock"}),
        json!({"op": "del", "path": "/item"}),
        json!({"op": "set", "path": "/item/stock", "value": 5, "as": "bounded", "min": 0}),
    ] {
        let result = east.apply_ops(&doc, &ops(json!([bypass.clone()])), None);
        assert!(result.is_err(), "{bypass} was accepted");
    }
    // A whole-document write may keep the counter, not change it.
    east.put_json(&doc, &json!({"item": {"stock": 3}, "name": "lamp"}), None)
        .unwrap();
    let changed = east.put_json(&doc, &json!({"item": {"stock": 50}, "name": "lamp"}), None);
    assert!(
        matches!(&changed, Err(Error::Op(op)) if op.code() == "bounded_counter"),
        "{changed:?}"
    );
    // Neither may ops reach the rights state.
    let reserved = east.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/_archipelago~1escrow~1item~1stock", "value": 1}])),
        None,
    );
    assert!(reserved.is_err());
    assert_eq!(
        value(&east, &doc),
        json!({"item": {"stock": 3}, "name": "lamp"})
    );
    assert_consistent(&east, &doc);
}

#[test]
fn a_transaction_that_takes_stock_commits_only_with_the_rights() {
    let east = replica("us-east");
    let stock = id("inventory/sku-1");
    east.apply_ops(
        &stock,
        &ops(json!([{"op": "set", "path": "/stock", "value": 2, "as": "bounded", "min": 0}])),
        None,
    )
    .unwrap();
    let order = |n: u32, qty: i64| Txn {
        docs: vec![
            TxnDoc {
                id: id(&format!("orders/{n}")),
                ops: ops(json!([{"op": "set", "path": "/qty", "value": qty}])),
                precondition: Precondition::none(),
            },
            TxnDoc {
                id: stock.clone(),
                ops: ops(json!([{"op": "inc", "path": "/stock", "by": -qty}])),
                precondition: Precondition::none(),
            },
        ],
        message: None,
    };
    east.commit_txn(&order(1, 2)).unwrap();
    let refused = east.commit_txn(&order(2, 1));
    assert!(
        matches!(&refused, Err(Error::TxnOp { doc, source }) if *doc == stock && source.code() == "insufficient_rights"),
        "{refused:?}"
    );
    assert!(
        east.heads(&id("orders/2")).is_none(),
        "the order was not created"
    );
    assert_eq!(value(&east, &stock), json!({"stock": 0}));
}

#[test]
fn an_upper_bound_limits_increments_by_its_own_rights() {
    let east = replica("us-east");
    let doc = id("licences/acme");
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/stock", "value": 8, "as": "bounded", "min": 0, "max": 10}])),
        None,
    )
    .unwrap();
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": 2}])),
        None,
    )
    .unwrap();
    let above = east.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": 1}])),
        None,
    );
    assert!(
        matches!(&above, Err(Error::Op(op)) if op.code() == "above_max"),
        "{above:?}"
    );
    // Decrementing makes room again, as rights to increment.
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": -4}])),
        None,
    )
    .unwrap();
    let state = east.escrow(&doc, "/stock").unwrap().unwrap();
    assert_eq!(state.value, 6);
    assert_eq!(state.pool(PoolKind::Up).unwrap().rights(east.site()), 4);
    assert_consistent(&east, &doc);
    let bad = east.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/other", "value": 11, "as": "bounded", "min": 0, "max": 10}])),
        None,
    );
    assert!(
        matches!(&bad, Err(Error::Op(op)) if op.code() == "bad_value"),
        "{bad:?}"
    );
}

#[test]
fn a_grant_gives_what_the_policy_spares_and_keeps_the_low_water_mark() {
    let policy = Policy {
        low_water: 4,
        rebalance: GrantPolicy::Proportional,
        wait: Duration::from_secs(1),
    };
    let east = replica_with(
        "us-east",
        EscrowConfig {
            rules: Vec::new(),
            default: policy,
        },
    );
    let west = replica("us-west");
    let doc = id("inventory/sku-1");
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/stock", "value": 24, "as": "bounded", "min": 0}])),
        None,
    )
    .unwrap();
    let west_site = "us-west".parse().unwrap();
    // Spare is 20: proportional gives at least half of it.
    east.grant_rights(&doc, "/stock", PoolKind::Down, &west_site, 1)
        .unwrap()
        .expect("granted");
    assert_eq!(rights(&east, &doc, "us-west"), 10);
    east.grant_rights(&doc, "/stock", PoolKind::Down, &west_site, 100)
        .unwrap()
        .expect("granted");
    assert_eq!(
        rights(&east, &doc, "us-east"),
        4,
        "keeps its low-water mark"
    );
    assert!(east
        .grant_rights(&doc, "/stock", PoolKind::Down, &west_site, 1)
        .unwrap()
        .is_none());
    ship(&east, &west, &doc);
    assert_eq!(rights(&west, &doc, "us-west"), 20);
    assert_consistent(&west, &doc);
}

#[test]
fn an_op_short_of_rights_waits_for_a_peers_grant() {
    let east = replica("us-east");
    let west = replica("us-west");
    let doc = id("inventory/sku-1");
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/stock", "value": 10, "as": "bounded", "min": 0}])),
        None,
    )
    .unwrap();
    ship(&east, &west, &doc);

    // A stand-in transport: west's requests reach east, whose grant comes back.
    let mut wanted = west.subscribe_rights_wanted();
    let (e, w, d) = (east.clone(), west.clone(), doc.clone());
    let peer = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let want = tokio::time::timeout(Duration::from_secs(10), wanted.recv())
                .await
                .expect("west asked in time")
                .unwrap();
            assert_eq!(want.ask.as_ref().map(|s| s.as_str()), Some("us-east"));
            assert_eq!(want.amount, 3);
            e.grant_rights(&d, &want.pointer, want.pool, w.site(), want.amount)
                .unwrap()
                .expect("east has rights to spare");
            ship(&e, &w, &d);
        });
    });
    let sold = west.with_rights(&doc, Some(Duration::from_secs(10)), || {
        west.apply_ops(
            &doc,
            &ops(json!([{"op": "inc", "path": "/stock", "by": -3}])),
            None,
        )
    });
    peer.join().unwrap();
    sold.expect("sold once the grant arrived");
    assert_eq!(value(&west, &doc), json!({"stock": 7}));
    assert_eq!(west.escrow_stats().served_after_transfer, 1);

    // Nobody answers: refused after the wait, nothing applied.
    let before = west.heads(&doc).unwrap();
    let started = std::time::Instant::now();
    let refused = west.with_rights(&doc, Some(Duration::from_millis(300)), || {
        west.apply_ops(
            &doc,
            &ops(json!([{"op": "inc", "path": "/stock", "by": -100}])),
            None,
        )
    });
    assert!(started.elapsed() >= Duration::from_millis(300));
    insufficient(refused);
    assert_eq!(west.heads(&doc).unwrap(), before);
    assert_eq!(west.escrow_stats().refused, 1);
}

/// One step of the property below.
#[derive(Debug, Clone)]
enum Step {
    Inc { site: usize, by: i64 },
    Transfer { from: usize, to: usize, amount: i64 },
    Ship { from: usize, to: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..3usize, -4i64..4).prop_map(|(site, by)| Step::Inc { site, by }),
        1 => (0..3usize, 0..3usize, 1i64..6).prop_map(|(from, to, amount)| Step::Transfer { from, to, amount }),
        3 => (0..3usize, 0..3usize).prop_map(|(from, to)| Step::Ship { from, to }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever sites do concurrently and in whatever order their changes
    /// meet, every replica keeps value within bounds, no negative rights,
    /// and rights adding up to the room on each side.
    #[test]
    fn no_interleaving_of_spends_and_merges_breaks_the_invariants(
        steps in proptest::collection::vec(step(), 1..60)
    ) {
        let sites = ["eu", "us", "ap"];
        let replicas: Vec<Replica> = sites.iter().map(|s| replica(s)).collect();
        let doc = id("stock");
        replicas[0]
            .apply_ops(
                &doc,
                &ops(json!([{"op": "set", "path": "/stock", "value": 12, "as": "bounded", "min": 0, "max": 20}])),
                None,
            )
            .unwrap();
        for r in &replicas[1..] {
            ship(&replicas[0], r, &doc);
        }
        for step in steps {
            match step {
                Step::Inc { site, by } => {
                    let _ = replicas[site].apply_ops(&doc, &ops(json!([{"op": "inc", "path": "/stock", "by": by}])), None);
                }
                Step::Transfer { from, to, amount } if from != to => {
                    let to = sites[to].parse().unwrap();
                    let _ = replicas[from].escrow_transfer(&doc, "/stock", PoolKind::Down, &to, amount, None);
                }
                Step::Transfer { .. } => {}
                Step::Ship { from, to } if from != to => ship(&replicas[from], &replicas[to], &doc),
                Step::Ship { .. } => {}
            }
            for r in &replicas {
                if let Some(verdict) = r.with_doc(&doc, escrow::check).unwrap() {
                    prop_assert!(verdict.is_ok(), "{}: {:?}", r.site(), verdict);
                }
            }
        }
        for a in &replicas {
            for b in &replicas {
                ship(a, b, &doc);
            }
        }
        let values: Vec<_> = replicas.iter().map(|r| value(r, &doc)).collect();
        prop_assert!(values.windows(2).all(|w| w[0] == w[1]), "{values:?}");
    }
}
