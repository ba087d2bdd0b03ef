//! The strong tier between three sites on an in-memory network: writes
//! through the leader from any site, preconditions against the committed
//! state, the minority side of a partition refusing strong writes while
//! the majority goes on, restarts, leases.

use std::sync::Arc;
use std::time::{Duration, Instant};

use archipelago::doc::Op;
use archipelago::protocol::Glob;
use archipelago::store::{Memory, Store};
use archipelago::strong::{MemberChange, MemoryNet, StrongConfig, StrongError, StrongTier};
use archipelago::txn::{Precondition, Txn, TxnDoc};
use archipelago::{DocId, Error, Replica, ReplicaOptions, SiteName};
use serde_json::json;

fn site(name: &str) -> SiteName {
    name.parse().unwrap()
}

fn doc(name: &str) -> DocId {
    name.parse().unwrap()
}

fn ops(value: serde_json::Value) -> Vec<Op> {
    serde_json::from_value(value).unwrap()
}

fn config(voters: &[&str]) -> StrongConfig {
    let mut config = StrongConfig::new(
        voters.iter().map(|v| site(v)).collect(),
        vec![Glob::new("accounts/*"), Glob::new("usernames/*")],
    );
    config.heartbeat_ms = 50;
    config.election_timeout_min_ms = 300;
    config.election_timeout_max_ms = 600;
    config.write_timeout_ms = 2_000;
    config
}

struct Site {
    name: SiteName,
    store: Arc<dyn Store>,
    replica: Replica,
    tier: StrongTier,
}

async fn start(net: &MemoryNet, name: &str, store: Arc<dyn Store>, voters: &[&str]) -> Site {
    let config = config(voters);
    let mut options = ReplicaOptions::new(site(name));
    let covers = config.clone();
    options.strong = Arc::new(move |id| covers.covers(id));
    let replica = Replica::open(options, store.clone()).unwrap();
    let tier = StrongTier::start(
        site(name),
        config,
        replica.clone(),
        store.clone(),
        net.rpc(site(name)),
    )
    .await
    .unwrap();
    net.join(site(name), tier.handler());
    Site {
        name: site(name),
        store,
        replica,
        tier,
    }
}

async fn cluster(net: &MemoryNet) -> Vec<Site> {
    let names = ["site-a", "site-b", "site-c"];
    let mut sites = Vec::new();
    for name in names {
        sites.push(start(net, name, Arc::new(Memory::new()), &names).await);
    }
    sites
}

/// Waits until one of `sites` leads; its index.
async fn leader(sites: &[Site]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (k, s) in sites.iter().enumerate() {
            let status = s.tier.status();
            if status.role == "leader" {
                return k;
            }
        }
        assert!(Instant::now() < deadline, "no leader within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn set(id: &str, value: serde_json::Value, precondition: Precondition) -> TxnDoc {
    TxnDoc {
        id: doc(id),
        ops: ops(json!([{"op": "set", "path": "/value", "value": value}])),
        precondition,
    }
}

fn txn(docs: Vec<TxnDoc>) -> Txn {
    Txn {
        docs,
        message: None,
    }
}

/// Waits until every site's replica has `id` at the same heads.
async fn converged(sites: &[&Site], id: &DocId) -> Vec<archipelago::ChangeHash> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let heads: Vec<_> = sites.iter().map(|s| s.replica.heads(id)).collect();
        if heads[0].is_some() && heads.iter().all(|h| *h == heads[0]) {
            return heads[0].clone().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not converge: {heads:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_at_any_site_is_made_once_and_every_site_holds_the_same_change() {
    let net = MemoryNet::new();
    let sites = cluster(&net).await;
    let lead = leader(&sites).await;
    let follower = (lead + 1) % 3;
    let commit = sites[follower]
        .tier
        .write(&txn(vec![
            set("accounts/alice", json!(100), Precondition::if_absent()),
            set("accounts/bob", json!(0), Precondition::if_absent()),
        ]))
        .await
        .unwrap();
    assert_eq!(commit.docs.len(), 2);
    // The follower answered after applying it: its own read shows it.
    let alice = sites[follower]
        .replica
        .read_json(&doc("accounts/alice"), None)
        .unwrap()
        .unwrap();
    assert_eq!(alice.value, json!({"value": 100}));
    assert_eq!(alice.heads, commit.docs[0].1.heads);
    let all: Vec<&Site> = sites.iter().collect();
    let heads = converged(&all, &doc("accounts/alice")).await;
    assert_eq!(heads, commit.docs[0].1.heads);
    // One change per document, made once (by the leader's actor).
    for s in &sites {
        let history = s
            .replica
            .with_doc(&doc("accounts/alice"), |d| d.get_changes(&[]).len())
            .unwrap();
        assert_eq!(history, Some(1), "{}", s.name);
    }
    // A linearizable read at another follower sees it.
    let other = (lead + 2) % 3;
    let read = sites[other]
        .tier
        .read(&[doc("accounts/alice"), doc("accounts/nobody")])
        .await
        .unwrap();
    assert_eq!(read[0].value, Some(json!({"value": 100})));
    assert_eq!(read[1].value, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strong_document_refuses_local_writes_and_mixed_transactions() {
    let net = MemoryNet::new();
    let sites = cluster(&net).await;
    leader(&sites).await;
    let local = sites[0].replica.apply_ops(
        &doc("accounts/alice"),
        &ops(json!([{"op": "set", "path": "/value", "value": 1}])),
        None,
    );
    assert!(matches!(local, Err(Error::StrongDocument(_))), "{local:?}");
    let mixed = sites[0]
        .tier
        .write(&txn(vec![
            set("accounts/alice", json!(1), Precondition::none()),
            set("orders/1", json!(1), Precondition::none()),
        ]))
        .await;
    assert!(matches!(mixed, Err(StrongError::Bad(_))), "{mixed:?}");
    assert_eq!(sites[0].replica.heads(&doc("orders/1")), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_of_one_username_from_every_site_leave_exactly_one_holder() {
    let net = MemoryNet::new();
    let sites = cluster(&net).await;
    leader(&sites).await;
    let mut tasks = Vec::new();
    for round in 0..10 {
        for s in &sites {
            let tier = s.tier.clone();
            let name = s.name.clone();
            tasks.push(tokio::spawn(async move {
                let claim = txn(vec![set(
                    &format!("usernames/user-{round}"),
                    json!(name.to_string()),
                    Precondition::if_absent(),
                )]);
                (round, tier.write(&claim).await)
            }));
        }
    }
    let mut winners = vec![0; 10];
    for task in tasks {
        let (round, result) = task.await.unwrap();
        match result {
            Ok(_) => winners[round] += 1,
            Err(StrongError::PreconditionFailed { .. }) => {}
            Err(e) => panic!("round {round}: {e}"),
        }
    }
    assert_eq!(winners, vec![1; 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_modify_write_with_if_heads_from_every_site_loses_no_increment() {
    let net = MemoryNet::new();
    let sites = cluster(&net).await;
    leader(&sites).await;
    sites[0]
        .tier
        .write(&txn(vec![set(
            "accounts/counter",
            json!(0),
            Precondition::none(),
        )]))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for s in &sites {
        for _ in 0..2 {
            let tier = s.tier.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = 0;
                while done < 10 {
                    let read = tier.read(&[doc("accounts/counter")]).await.unwrap();
                    let value = read[0].value.as_ref().unwrap()["value"].as_i64().unwrap();
                    let write = txn(vec![set(
                        "accounts/counter",
                        json!(value + 1),
                        Precondition::if_heads(read[0].heads.clone()),
                    )]);
                    match tier.write(&write).await {
                        Ok(_) => done += 1,
                        Err(StrongError::PreconditionFailed { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let read = sites[1]
        .tier
        .read(&[doc("accounts/counter")])
        .await
        .unwrap();
    assert_eq!(read[0].value, Some(json!({"value": 60})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minority_side_refuses_strong_writes_while_the_majority_goes_on() {
    let net = MemoryNet::new();
    let sites = cluster(&net).await;
    let old = leader(&sites).await;
    let others: Vec<SiteName> = sites
        .iter()
        .filter(|s| s.name != sites[old].name)
        .map(|s| s.name.clone())
        .collect();
    net.cut(&sites[old].name, &others);
    // The old leader stops proposing once a majority has been silent.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let refused = sites[old]
        .tier
        .write(&txn(vec![set(
            "accounts/minority",
            json!(1),
            Precondition::none(),
        )]))
        .await;
    assert!(
        matches!(refused, Err(StrongError::NoQuorum(_))),
        "{refused:?}"
    );
    // CRDT documents stay writable there.
    sites[old]
        .replica
        .apply_ops(
            &doc("orders/1"),
            &ops(json!([{"op": "set", "path": "/x", "value": 1}])),
            None,
        )
        .unwrap();
    // The majority elects a leader and commits.
    let majority: Vec<&Site> = sites.iter().filter(|s| s.name != sites[old].name).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let commit = loop {
        match majority[0]
            .tier
            .write(&txn(vec![set(
                "accounts/majority",
                json!(2),
                Precondition::none(),
            )]))
            .await
        {
            Ok(commit) => break commit,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the majority never committed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    net.heal();
    let all: Vec<&Site> = sites.iter().collect();
    let heads = converged(&all, &doc("accounts/majority")).await;
    assert_eq!(heads, commit.docs[0].1.heads);
    for s in &sites {
        assert_eq!(
            s.replica.heads(&doc("accounts/minority")),
            None,
            "{}",
            s.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_site_resumes_from_its_store_and_catches_up() {
    let net = MemoryNet::new();
    let mut sites = cluster(&net).await;
    leader(&sites).await;
    sites[0]
        .tier
        .write(&txn(vec![set(
            "accounts/a",
            json!(1),
            Precondition::none(),
        )]))
        .await
        .unwrap();
    let all: Vec<&Site> = sites.iter().collect();
    converged(&all, &doc("accounts/a")).await;
    // site-c goes down; the others go on.
    let down = sites.pop().unwrap();
    net.leave(&down.name);
    down.tier.shutdown().await;
    let store = down.store.clone();
    drop(down);
    let deadline = Instant::now() + Duration::from_secs(10);
    let commit = loop {
        match sites[0]
            .tier
            .write(&txn(vec![set(
                "accounts/b",
                json!(2),
                Precondition::none(),
            )]))
            .await
        {
            Ok(commit) => break commit,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no commit with one site down: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let back = start(&net, "site-c", store, &["site-a", "site-b", "site-c"]).await;
    assert!(back.replica.heads(&doc("accounts/a")).is_some());
    sites.push(back);
    let all: Vec<&Site> = sites.iter().collect();
    assert_eq!(
        converged(&all, &doc("accounts/b")).await,
        commit.docs[0].1.heads
    );
    let status = sites[2].tier.status();
    assert_eq!(status.voters.len(), 3, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_held_by_one_site_and_fenced_by_its_epoch() {
    let net = MemoryNet::new();
    let sites = cluster(&net).await;
    leader(&sites).await;
    let (granted, lease) = sites[0]
        .tier
        .acquire_lease("resolver", Duration::from_secs(30))
        .await
        .unwrap();
    let lease = lease.unwrap();
    assert!(granted);
    assert_eq!(lease.holder, sites[0].name);
    let (granted, held) = sites[1]
        .tier
        .acquire_lease("resolver", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(!granted);
    assert_eq!(held.unwrap().holder, sites[0].name);
    let (released, _) = sites[0]
        .tier
        .release_lease("resolver", lease.epoch)
        .await
        .unwrap();
    assert!(released);
    let (granted, taken) = sites[1]
        .tier
        .acquire_lease("resolver", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(granted);
    assert_eq!(taken.unwrap().epoch, lease.epoch + 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sites[2].tier.leases().first().map(|l| l.holder.clone()) != Some("site-b".to_owned()) {
        assert!(Instant::now() < deadline, "{:?}", sites[2].tier.leases());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_is_removed_and_added_back_through_the_log() {
    let net = MemoryNet::new();
    let sites = cluster(&net).await;
    leader(&sites).await;
    sites[0]
        .tier
        .change_members(MemberChange::Remove(site("site-c")))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sites[0].tier.status().voters.len() != 2 {
        assert!(Instant::now() < deadline, "{:?}", sites[0].tier.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sites[1]
        .tier
        .change_members(MemberChange::Add(site("site-c")))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sites[2].tier.status().voters.len() != 3 {
        assert!(Instant::now() < deadline, "{:?}", sites[2].tier.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
