//! Replica behaviour over real stores: durability across reopen, the bounded
//! cache, compaction, corrupt stored bytes, store failures, remote changes,
//! subscriptions, history and time travel.

use std::sync::Arc;

use archipelago::doc::Op;
use archipelago::store::{Faulty, Memory, Sqlite, Store, StoredDoc, Write};
use archipelago::{DocId, Error, Origin, Replica, ReplicaOptions};
use serde_json::json;

fn ops(value: serde_json::Value) -> Vec<Op> {
    serde_json::from_value(value).unwrap()
}

fn id(s: &str) -> DocId {
    s.parse().unwrap()
}

fn options(site: &str) -> ReplicaOptions {
    ReplicaOptions::new(site.parse().unwrap())
}

#[test]
fn commits_survive_reopen_with_a_small_cache_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    {
        let mut opts = options("east");
        opts.cache_docs_max = 3;
        opts.compact_changes_min = 4;
        let replica = Replica::open(opts, Arc::new(Sqlite::open(&path).unwrap())).unwrap();
        for round in 0..10 {
            for d in 0..10 {
                let doc = id(&format!("inv/{d}"));
                replica
                    .apply_ops(
                        &doc,
                        &ops(json!([{"op": "set", "path": format!("/r{round}"), "value": round}])),
                        None,
                    )
                    .unwrap();
            }
        }
        assert!(
            replica.stats().loaded_docs <= 3,
            "cache stays bounded: {:?}",
            replica.stats()
        );
        assert_eq!(replica.stats().docs, 10);
    }
    let store = Arc::new(Sqlite::open(&path).unwrap());
    // Compaction left each document as a snapshot plus a few changes.
    let stored = store.load(&id("inv/0")).unwrap().unwrap();
    assert!(stored.snapshot.is_some());
    assert!(stored.changes.len() < 10);
    let replica = Replica::open(options("east"), store).unwrap();
    assert_eq!(replica.doc_ids("inv/").len(), 10);
    for d in 0..10 {
        let view = replica
            .read_json(&id(&format!("inv/{d}")), None)
            .unwrap()
            .unwrap();
        for round in 0..10 {
            assert_eq!(view.value[format!("r{round}")], json!(round));
        }
    }
}

#[test]
fn corrupt_stored_bytes_fail_that_document_only() {
    let store = Arc::new(Memory::new());
    let good = id("good");
    let bad = id("bad");
    {
        let replica = Replica::open(options("east"), store.clone()).unwrap();
        replica
            .apply_ops(
                &good,
                &ops(json!([{"op": "set", "path": "/a", "value": 1}])),
                None,
            )
            .unwrap();
    }
    // Bytes that start like an automerge chunk but are garbage, and bytes
    // that are not automerge at all.
    for garbage in [
        vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 0, 9, 9, 9, 9],
        vec![1, 2, 3],
    ] {
        store
            .commit(vec![Write::Snapshot {
                doc: bad.clone(),
                bytes: garbage,
                heads: vec![],
            }])
            .unwrap();
        let replica = Replica::open(options("east"), store.clone()).unwrap();
        let err = replica.read_json(&bad, None).unwrap_err();
        assert!(matches!(err, Error::CorruptDocument { .. }), "{err}");
        assert!(replica
            .apply_ops(
                &bad,
                &ops(json!([{"op": "set", "path": "/x", "value": 1}])),
                None
            )
            .is_err());
        assert_eq!(
            replica.read_json(&good, None).unwrap().unwrap().value,
            json!({"a": 1})
        );
    }
}

#[test]
fn arbitrary_bytes_never_panic_the_loader() {
    // A deterministic spread of mutations of a real document.
    let replica = Replica::open(options("east"), Arc::new(Memory::new())).unwrap();
    let doc = id("d");
    replica
        .apply_ops(
            &doc,
            &ops(json!([{"op": "set", "path": "/a", "value": {"b": [1, 2, "x"]}}])),
            None,
        )
        .unwrap();
    let changes = replica.changes_after(&doc, &[]).unwrap().unwrap();
    let original = changes[0].clone();
    let mut seed = 0x9e3779b97f4a7c15u64;
    for _ in 0..2000 {
        let mut bytes = original.clone();
        for _ in 0..3 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = (seed as usize) % bytes.len();
            bytes[at] = (seed >> 32) as u8;
        }
        let _ = archipelago::load_document(&StoredDoc {
            snapshot: Some(bytes.clone()),
            changes: vec![],
        });
        let _ = archipelago::load_document(&StoredDoc {
            snapshot: None,
            changes: vec![bytes.clone()],
        });
        let _ = archipelago::decode_change(&bytes);
    }
}

fn set_a(value: i64) -> Vec<Op> {
    ops(json!([{"op": "set", "path": "/a", "value": value}]))
}

/// Writes are pipelined: subscribers (and so peers) see a change before its
/// store write returns. A failed write therefore keeps the change in memory,
/// unsaved, and writes it with the document's next write.
#[test]
fn a_failed_store_write_keeps_the_change_and_the_next_write_saves_it() {
    let store = Arc::new(Faulty::new(Memory::new()));
    let replica = Replica::open(options("east"), store.clone()).unwrap();
    let doc = id("d");
    replica.apply_ops(&doc, &set_a(1), None).unwrap();
    let mut events = replica.subscribe();
    store.set_fail_commits(true);
    let err = replica.apply_ops(&doc, &set_a(2), None).unwrap_err();
    assert!(matches!(err, Error::NotDurable { .. }), "{err}");
    let published = events.try_recv().expect("published before the write");
    assert_eq!(
        replica.read_json(&doc, None).unwrap().unwrap().value,
        json!({"a": 2}),
        "the change stays in memory"
    );
    assert_eq!(replica.heads(&doc).unwrap(), published.heads);
    // Another failing commit keeps both.
    replica.apply_ops(&doc, &set_a(3), None).unwrap_err();
    store.set_fail_commits(false);
    replica.apply_ops(&doc, &set_a(4), None).unwrap();
    let reopened = Replica::open(options("east"), store.clone()).unwrap();
    assert_eq!(
        reopened.read_json(&doc, None).unwrap().unwrap().value,
        json!({"a": 4})
    );
    assert_eq!(reopened.history(&doc).unwrap().unwrap().len(), 4);
    assert_eq!(reopened.heads(&doc), replica.heads(&doc));
}

#[test]
fn unsaved_documents_stay_loaded_until_a_sweep_writes_them() {
    let store = Arc::new(Faulty::new(Memory::new()));
    let mut opts = options("east");
    opts.cache_idle = std::time::Duration::ZERO;
    let replica = Replica::open(opts, store.clone()).unwrap();
    let doc = id("d");
    replica.apply_ops(&doc, &set_a(1), None).unwrap();
    store.set_fail_commits(true);
    replica.apply_ops(&doc, &set_a(2), None).unwrap_err();
    assert_eq!(
        replica.evict_idle(),
        0,
        "an unsaved document is not dropped"
    );
    assert_eq!(replica.stats().loaded_docs, 1);
    store.set_fail_commits(false);
    assert_eq!(replica.evict_idle(), 1, "written, then dropped");
    let reopened = Replica::open(options("east"), store.clone()).unwrap();
    assert_eq!(
        reopened.read_json(&doc, None).unwrap().unwrap().value,
        json!({"a": 2})
    );
}

#[test]
fn a_peer_sending_unsaved_changes_again_retries_their_write() {
    let east = Replica::open(options("east"), Arc::new(Memory::new())).unwrap();
    let store = Arc::new(Faulty::new(Memory::new()));
    let west = Replica::open(options("west"), store.clone()).unwrap();
    let doc = id("d");
    east.apply_ops(&doc, &set_a(1), None).unwrap();
    let changes = east.changes_after(&doc, &[]).unwrap().unwrap();
    store.set_fail_commits(true);
    west.apply_changes(&doc, &changes, Origin::Peer("east".parse().unwrap()))
        .unwrap_err();
    store.set_fail_commits(false);
    let again = west
        .apply_changes(&doc, &changes, Origin::Peer("east".parse().unwrap()))
        .unwrap();
    assert_eq!(again.duplicates, 1);
    let reopened = Replica::open(options("west"), store.clone()).unwrap();
    assert_eq!(reopened.heads(&doc), east.heads(&doc));
}

/// If a document holding unsaved local changes must be dropped (here: a
/// peer sends a change that reuses one of their sequence numbers, which
/// automerge refuses), the replica moves to a fresh actor, so it never
/// writes a second, different change under a sequence number peers may
/// already hold.
#[test]
fn dropping_unsaved_local_changes_moves_to_a_fresh_actor() {
    let store = Arc::new(Faulty::new(Memory::new()));
    let replica = Replica::open(options("east"), store.clone()).unwrap();
    let doc = id("d");
    replica.apply_ops(&doc, &set_a(1), None).unwrap();
    let saved = replica.save_bytes(&doc).unwrap().unwrap();
    store.set_fail_commits(true);
    replica.apply_ops(&doc, &set_a(2), None).unwrap_err();
    store.set_fail_commits(false);
    // The same actor and sequence number as the unsaved change, other content.
    let actor = replica.actor();
    let mut fork = automerge::AutoCommit::load(&saved)
        .unwrap()
        .with_actor(actor.clone());
    automerge::transaction::Transactable::put(&mut fork, automerge::ROOT, "a", 99).unwrap();
    let forked = fork.get_last_local_change().unwrap().raw_bytes().to_vec();
    let err = replica
        .apply_changes(&doc, &[forked], Origin::Peer("west".parse().unwrap()))
        .unwrap_err();
    assert!(matches!(err, Error::BadChange { .. }), "{err}");
    assert_ne!(replica.actor(), actor);
    replica.apply_ops(&doc, &set_a(3), None).unwrap();
    let history = replica.history(&doc).unwrap().unwrap();
    assert_eq!(history.len(), 2, "the stored change and the new one");
}

#[test]
fn remote_changes_apply_in_a_batch_in_any_order_and_once() {
    let east = Replica::open(options("east"), Arc::new(Memory::new())).unwrap();
    let west = Replica::open(options("west"), Arc::new(Memory::new())).unwrap();
    let doc = id("stock/sku-1");
    for i in 0..20 {
        east.apply_ops(
            &doc,
            &ops(json!([{"op": "set", "path": format!("/k{i}"), "value": i}])),
            None,
        )
        .unwrap();
    }
    let mut changes = east.changes_after(&doc, &[]).unwrap().unwrap();
    changes.reverse();
    let mut events = west.subscribe();
    // Without the first change the rest cannot apply.
    let first = changes.pop().unwrap();
    let partial = west
        .apply_changes(&doc, &changes, Origin::Peer(east.site().clone()))
        .unwrap();
    assert!(partial.applied.is_empty());
    assert_eq!(partial.missing_deps.len(), 19);
    changes.push(first);
    let applied = west
        .apply_changes(&doc, &changes, Origin::Peer(east.site().clone()))
        .unwrap();
    assert_eq!(applied.applied.len(), 20);
    let again = west
        .apply_changes(&doc, &changes, Origin::Peer(east.site().clone()))
        .unwrap();
    assert_eq!((again.applied.len(), again.duplicates), (0, 20));
    assert_eq!(west.heads(&doc), east.heads(&doc));
    assert_eq!(
        west.read_json(&doc, None).unwrap(),
        east.read_json(&doc, None).unwrap()
    );
    let event = events.try_recv().unwrap();
    assert_eq!(event.origin, Origin::Peer("east".parse().unwrap()));
    assert_eq!(event.changes.len(), 20);
    assert!(events.try_recv().is_err(), "one event for one batch");
}

#[test]
fn malformed_remote_changes_are_refused_whole() {
    let west = Replica::open(options("west"), Arc::new(Memory::new())).unwrap();
    let doc = id("d");
    let err = west.apply_changes(
        &doc,
        &[vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 1], vec![7; 40]],
        Origin::Local,
    );
    assert!(matches!(err, Err(Error::BadChange { .. })), "{err:?}");
    assert_eq!(west.heads(&doc), None);
}

#[test]
fn changes_after_refuses_unknown_heads() {
    let east = Replica::open(options("east"), Arc::new(Memory::new())).unwrap();
    let doc = id("d");
    east.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/a", "value": 1}])),
        None,
    )
    .unwrap();
    let unknown = archipelago::ChangeHash([7; 32]);
    assert!(matches!(
        east.changes_after(&doc, &[unknown]),
        Err(Error::UnknownHeads { .. })
    ));
}

#[test]
fn time_travel_and_history_show_the_past() {
    let replica = Replica::open(options("east"), Arc::new(Memory::new())).unwrap();
    let doc = id("d");
    let first = replica
        .apply_ops(
            &doc,
            &ops(json!([{"op": "set", "path": "/price", "value": 10}])),
            Some("list it"),
        )
        .unwrap();
    replica
        .apply_ops(
            &doc,
            &ops(json!([{"op": "set", "path": "/price", "value": 12}])),
            Some("raise"),
        )
        .unwrap();
    let past = replica
        .read_json(&doc, Some(&first.heads))
        .unwrap()
        .unwrap();
    assert_eq!(past.value, json!({"price": 10}));
    assert_eq!(past.heads, first.heads);
    assert_eq!(
        replica.read_json(&doc, None).unwrap().unwrap().value,
        json!({"price": 12})
    );
    let history = replica.history(&doc).unwrap().unwrap();
    let messages: Vec<_> = history.iter().map(|c| c.message.clone().unwrap()).collect();
    assert_eq!(messages, ["list it", "raise"]);
    assert_eq!(history[1].deps, vec![history[0].hash]);
    assert!(
        history[0].time > 1_600_000_000_000,
        "time is in milliseconds"
    );
    let unknown = archipelago::ChangeHash([1; 32]);
    assert!(matches!(
        replica.read_json(&doc, Some(&[unknown])),
        Err(Error::UnknownHeads { .. })
    ));
}

#[test]
fn concurrent_commits_from_many_threads_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::open(
        options("east"),
        Arc::new(Sqlite::open(dir.path().join("s.db")).unwrap()),
    )
    .unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let replica = replica.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    // Half the threads share one document, half have their own.
                    let doc = if t % 2 == 0 {
                        id("shared")
                    } else {
                        id(&format!("own/{t}"))
                    };
                    replica
                        .apply_ops(
                            &doc,
                            &ops(json!([{"op": "set", "path": format!("/t{t}i{i}"), "value": i}])),
                            None,
                        )
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let shared = replica
        .read_json(&id("shared"), None)
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(shared.as_object().unwrap().len(), 4 * 25);
    assert_eq!(replica.history(&id("shared")).unwrap().unwrap().len(), 100);
}

#[test]
fn each_replica_process_writes_with_a_fresh_actor() {
    let store: Arc<dyn Store> = Arc::new(Memory::new());
    let a = Replica::open(options("east"), store.clone()).unwrap();
    let b = Replica::open(options("east"), store).unwrap();
    assert_ne!(a.actor(), b.actor());
}

#[test]
fn documents_idle_past_the_cache_idle_time_are_dropped_to_bytes() {
    let mut opts = options("east");
    opts.cache_idle = std::time::Duration::from_millis(50);
    let replica = Replica::open(opts, Arc::new(Memory::new())).unwrap();
    for d in 0..3 {
        replica
            .apply_ops(
                &id(&format!("inv/{d}")),
                &ops(json!([{"op": "set", "path": "/n", "value": d}])),
                None,
            )
            .unwrap();
    }
    assert_eq!(replica.evict_idle(), 0, "just used");
    assert_eq!(replica.stats().loaded_docs, 3);
    std::thread::sleep(std::time::Duration::from_millis(80));
    replica.read_json(&id("inv/0"), None).unwrap();
    assert_eq!(replica.evict_idle(), 2, "inv/0 was used again");
    assert_eq!(replica.stats().loaded_docs, 1);
    let view = replica.read_json(&id("inv/2"), None).unwrap().unwrap();
    assert_eq!(view.value, json!({"n": 2}));
}

#[test]
fn whole_documents_apply_together_and_stay_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let source = Replica::open(options("west"), Arc::new(Memory::new())).unwrap();
    for d in 0..3 {
        source
            .apply_ops(
                &id(&format!("inv/{d}")),
                &ops(json!([{"op": "set", "path": "/n", "value": d}])),
                None,
            )
            .unwrap();
    }
    let saved: Vec<Vec<u8>> = (0..3)
        .map(|d| {
            source
                .save_bytes(&id(&format!("inv/{d}")))
                .unwrap()
                .unwrap()
        })
        .collect();
    {
        let replica =
            Replica::open(options("east"), Arc::new(Sqlite::open(&path).unwrap())).unwrap();
        // inv/2 exists here already: it merges on its own.
        replica
            .apply_ops(
                &id("inv/2"),
                &ops(json!([{"op": "set", "path": "/local", "value": true}])),
                None,
            )
            .unwrap();
        let from = Origin::Peer("west".parse().unwrap());
        let batch: Vec<(DocId, &[u8])> = vec![
            (id("inv/0"), &saved[0]),
            (id("inv/1"), &saved[1]),
            (id("inv/2"), &saved[2]),
            (id("inv/3"), b"not a document"),
            (id("inv/0"), &saved[0]),
        ];
        let results = replica.apply_snapshots(&batch, &from);
        assert_eq!(results.len(), 5);
        for (i, expected) in [(0, "inv/0"), (1, "inv/1")] {
            let applied = results[i].as_ref().unwrap();
            assert_eq!(Some(applied.heads.clone()), source.heads(&id(expected)));
        }
        assert!(!results[2].as_ref().unwrap().applied.is_empty(), "merged");
        assert!(matches!(results[3], Err(Error::BadChange { .. })));
        assert_eq!(
            results[4].as_ref().unwrap().duplicates,
            1,
            "the second copy is known"
        );
    }
    let replica = Replica::open(options("east"), Arc::new(Sqlite::open(&path).unwrap())).unwrap();
    assert_eq!(
        replica
            .read_json(&id("inv/1"), None)
            .unwrap()
            .unwrap()
            .value,
        json!({"n": 1})
    );
    assert_eq!(
        replica
            .read_json(&id("inv/2"), None)
            .unwrap()
            .unwrap()
            .value,
        json!({"n": 2, "local": true})
    );
    assert!(replica.heads(&id("inv/3")).is_none());
}

#[test]
fn heads_pages_and_digests_cover_a_prefix_and_change_with_any_head() {
    let east = Replica::open(options("east"), Arc::new(Memory::new())).unwrap();
    let west = Replica::open(options("west"), Arc::new(Memory::new())).unwrap();
    // More documents than one page of the digest's index reads.
    let ids: Vec<DocId> = (0..4100).map(|n| id(&format!("orders/{n:05}"))).collect();
    for doc in &ids {
        east.apply_ops(doc, &set_a(1), None).unwrap();
    }
    east.apply_ops(&id("other/1"), &set_a(1), None).unwrap();
    east.apply_ops(&id("ordersx"), &set_a(1), None).unwrap();

    let first = east.heads_page("orders/", None, 3);
    let first_ids: Vec<&str> = first.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(first_ids, ["orders/00000", "orders/00001", "orders/00002"]);
    assert_eq!(first[0].1, east.heads(&ids[0]).unwrap());
    let next = east.heads_page("orders/", Some("orders/00002"), 2);
    assert_eq!(next[0].0.as_str(), "orders/00003");
    // An `after` before the prefix starts at the prefix; past it, nothing.
    assert_eq!(east.heads_page("orders/", Some("a"), 1)[0].0, ids[0]);
    assert!(east
        .heads_page("orders/", Some("orders/99999"), 1)
        .is_empty());
    assert_eq!(east.heads_page("", None, usize::MAX).len(), 4102);

    let digest = east.heads_digest("orders/");
    assert_eq!(digest.docs, 4100);
    assert_eq!(digest.to_hex().len(), 64);
    assert_eq!(east.heads_digest("").docs, 4102);
    assert_eq!(west.heads_digest("orders/").docs, 0);
    assert_ne!(west.heads_digest("orders/"), digest);

    // The same documents at the same heads give the same digest at another
    // replica; one more change anywhere gives another.
    for doc in &ids {
        let changes = east.changes_after(doc, &[]).unwrap().unwrap();
        west.apply_changes(doc, &changes, Origin::Peer(east.site().clone()))
            .unwrap();
    }
    assert_eq!(west.heads_digest("orders/"), digest);
    assert_ne!(west.heads_digest(""), east.heads_digest(""));
    west.apply_ops(&ids[4099], &set_a(2), None).unwrap();
    assert_ne!(west.heads_digest("orders/"), digest);
    assert_eq!(west.heads_digest("orders/").docs, 4100);
}
