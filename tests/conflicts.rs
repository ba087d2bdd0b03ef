//! The conflict-report layer through the library: each detector, identical
//! reports at every site, automatic and manual resolution exactly once
//! (also after the resolver is restored from a backup), reserved keys, and
//! the durable index.

use std::sync::Arc;

use archipelago::conflict::{
    Check, Conflict, ConflictConfig, Filter, Kind, Policy, Resolution, Rule, Status,
};
use archipelago::doc::Op;
use archipelago::store::{restore_backup, BackupLabel, Memory, Sqlite, Store};
use archipelago::{decode_change, ChangeHash, DocId, Error, Origin, Replica, ReplicaOptions};
use serde_json::json;

fn ops(value: serde_json::Value) -> Vec<Op> {
    serde_json::from_value(value).unwrap()
}

fn id(s: &str) -> DocId {
    s.parse().unwrap()
}

fn replica_with(site: &str, config: &ConflictConfig, store: Arc<dyn Store>) -> Replica {
    let mut options = ReplicaOptions::new(site.parse().unwrap());
    options.conflicts = Arc::new(config.clone());
    Replica::open(options, store).unwrap()
}

fn replica(site: &str, config: &ConflictConfig) -> Replica {
    replica_with(site, config, Arc::new(Memory::new()))
}

/// Ships everything each side has to the other until both hold the same
/// heads (reports written after a merge are changes too).
fn sync(sites: &[&Replica], doc: &DocId) {
    for _ in 0..6 {
        for from in sites {
            let Some(changes) = from.changes_after(doc, &[]).unwrap() else {
                continue;
            };
            for to in sites {
                if to.site() != from.site() {
                    to.apply_changes(doc, &changes, Origin::Peer(from.site().clone()))
                        .unwrap();
                }
            }
        }
        let heads: Vec<_> = sites.iter().map(|s| s.heads(doc)).collect();
        if heads.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
    }
    panic!("sites did not converge on {doc}");
}

fn all(replica: &Replica) -> Vec<Conflict> {
    replica.conflicts(&Filter::default()).unwrap()
}

fn stock_rule() -> Rule {
    Rule::new(
        "stock-non-negative",
        "inventory/*",
        "/stock",
        Check::Min(0.0),
    )
    .unwrap()
}

/// The stock rule, clamped by its resolver `us-east`.
fn clamped_at_us_east() -> ConflictConfig {
    ConflictConfig::default()
        .with_rule(
            stock_rule()
                .resolver("us-east".parse().unwrap())
                .policy(Policy::Clamp),
        )
        .unwrap()
}

/// Two sites holding the same document, written by `base` at the first.
fn shared_base(
    config: &ConflictConfig,
    doc: &DocId,
    base: serde_json::Value,
) -> (Replica, Replica) {
    let a = replica("ap-south", config);
    let b = replica("us-east", config);
    a.apply_ops(doc, &ops(base), Some("base")).unwrap();
    sync(&[&a, &b], doc);
    (a, b)
}

#[test]
fn concurrent_writes_are_one_identical_report_at_both_sites() {
    let config = ConflictConfig::default();
    let doc = id("customers/c1");
    let (a, b) = shared_base(
        &config,
        &doc,
        json!([{"op": "set", "path": "/name", "value": "Ana"}]),
    );
    a.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/name", "value": "Ana Li"}])),
        None,
    )
    .unwrap();
    b.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/name", "value": "Anna"}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc);

    let at_a = all(&a);
    assert_eq!(at_a.len(), 1, "{at_a:#?}");
    let report = &at_a[0];
    assert_eq!(report.kind, Kind::ConcurrentWrite);
    assert_eq!(report.path, "/name");
    assert_eq!(report.status, Status::Open);
    let mut values: Vec<_> = report.values.iter().map(|v| v.value.clone()).collect();
    values.sort_by_key(|v| v.to_string());
    assert_eq!(values, vec![json!("Ana Li"), json!("Anna")]);
    let sites: Vec<_> = report
        .values
        .iter()
        .map(|v| v.site.as_ref().unwrap().as_str())
        .collect();
    assert!(sites.contains(&"ap-south") && sites.contains(&"us-east"));
    let shown = a.read_json(&doc, None).unwrap().unwrap().value;
    assert_eq!(report.provisional, shown["name"]);
    assert_eq!(report.resolver.as_ref().unwrap().as_str(), "ap-south");
    // The document view hides the reports.
    assert_eq!(shown.as_object().unwrap().len(), 1, "{shown}");
    assert_eq!(all(&b), at_a, "both sites list the same report");
}

#[test]
fn equal_concurrent_writes_and_counter_increments_are_not_conflicts() {
    let config = ConflictConfig::default();
    let doc = id("inventory/sku-1");
    let (a, b) = shared_base(
        &config,
        &doc,
        json!([{"op": "set", "path": "/stock", "value": 5, "as": "counter"},
               {"op": "set", "path": "/status", "value": "new"}]),
    );
    for r in [&a, &b] {
        r.apply_ops(
            &doc,
            &ops(json!([{"op": "inc", "path": "/stock", "by": -1},
                        {"op": "set", "path": "/status", "value": "ok"}])),
            None,
        )
        .unwrap();
    }
    sync(&[&a, &b], &doc);
    assert_eq!(all(&a), Vec::new());
    assert_eq!(all(&b), Vec::new());
}

#[test]
fn concurrently_created_parent_maps_report_the_hidden_one() {
    let config = ConflictConfig::default();
    let doc = id("orders/o1");
    let (a, b) = shared_base(
        &config,
        &doc,
        json!([{"op": "set", "path": "/id", "value": 1}]),
    );
    a.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/ship/city", "value": "Pune"}])),
        None,
    )
    .unwrap();
    b.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/ship/zip", "value": "10001"}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    let reports = all(&a);
    assert_eq!(reports.len(), 1, "{reports:#?}");
    assert_eq!(reports[0].kind, Kind::ConcurrentWrite);
    assert_eq!(reports[0].path, "/ship");
    let values: Vec<_> = reports[0].values.iter().map(|v| v.value.clone()).collect();
    assert!(values.contains(&json!({"city": "Pune"})), "{values:?}");
    assert!(values.contains(&json!({"zip": "10001"})), "{values:?}");
    assert_eq!(all(&b), reports);
}

#[test]
fn a_delete_against_an_edit_reports_the_lost_write() {
    let config = ConflictConfig::default();
    let doc = id("records/r1");
    let (a, b) = shared_base(
        &config,
        &doc,
        json!([{"op": "set", "path": "/patient", "value": {"name": "Kim", "allergy": "none"}}]),
    );
    a.apply_ops(&doc, &ops(json!([{"op": "del", "path": "/patient"}])), None)
        .unwrap();
    b.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/patient/allergy", "value": "penicillin"}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    let reports = all(&a);
    assert_eq!(reports.len(), 1, "{reports:#?}");
    let report = &reports[0];
    assert_eq!(report.kind, Kind::DeleteUpdate);
    assert_eq!(report.path, "/patient");
    assert_eq!(report.provisional, serde_json::Value::Null);
    let lost: Vec<_> = report
        .values
        .iter()
        .filter(|v| v.site.as_ref().unwrap().as_str() == "us-east")
        .map(|v| v.value.clone())
        .collect();
    assert_eq!(lost, vec![json!({"allergy": "penicillin"})]);
    assert!(report
        .values
        .iter()
        .any(|v| v.value.is_null() && v.site.as_ref().unwrap().as_str() == "ap-south"));
    assert_eq!(all(&b), reports);
    // A delete after the edit was seen is not a conflict.
    let doc2 = id("records/r2");
    a.apply_ops(
        &doc2,
        &ops(json!([{"op": "set", "path": "/x", "value": {"y": 1}}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc2);
    b.apply_ops(
        &doc2,
        &ops(json!([{"op": "set", "path": "/x/y", "value": 2}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc2);
    a.apply_ops(&doc2, &ops(json!([{"op": "del", "path": "/x"}])), None)
        .unwrap();
    sync(&[&a, &b], &doc2);
    assert!(a
        .conflicts(&Filter {
            doc: Some(doc2),
            ..Filter::default()
        })
        .unwrap()
        .is_empty());
}

#[test]
fn an_oversell_is_one_report_compensated_once_by_the_resolver() {
    let config = clamped_at_us_east();
    let doc = id("inventory/sku-1");
    let (a, b) = shared_base(
        &config,
        &doc,
        json!([{"op": "set", "path": "/stock", "value": 1, "as": "counter"}]),
    );
    a.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": -1}])),
        Some("sell"),
    )
    .unwrap();
    b.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": -1}])),
        Some("sell"),
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    for _ in 0..3 {
        sync(&[&a, &b], &doc);
    }

    let reports = all(&a);
    assert_eq!(reports.len(), 1, "{reports:#?}");
    let report = &reports[0];
    assert_eq!(report.kind, Kind::Invariant);
    assert_eq!(report.rule.as_deref(), Some("stock-non-negative"));
    assert_eq!(report.provisional, json!(-1));
    assert_eq!(report.values.len(), 2);
    assert!(report.values.iter().all(|v| v.value == json!(0)));
    assert_eq!(report.status, Status::Resolved);
    assert_eq!(report.resolved_by.as_ref().unwrap().as_str(), "us-east");
    assert_eq!(report.resolution.as_deref(), Some("clamp"));
    assert!(report.resolved_change.is_some());
    assert_eq!(all(&b), reports);
    for r in [&a, &b] {
        assert_eq!(r.read_json(&doc, None).unwrap().unwrap().value["stock"], 0);
    }
    // Restarting the automatic resolution changes nothing.
    assert_eq!(a.resolve_pending().unwrap(), 0);
    assert_eq!(b.resolve_pending().unwrap(), 0);
    sync(&[&a, &b], &doc);
    assert_eq!(b.read_json(&doc, None).unwrap().unwrap().value["stock"], 0);
}

/// The resolver compensated an oversell and sent it, then lost its store
/// and was restored from a backup taken before. Catching up, it sees the
/// oversell again before its own compensation comes back: were automatic
/// resolutions not held after a restore, it would compensate twice.
#[test]
fn a_resolver_restored_from_a_backup_does_not_compensate_twice() {
    let config = clamped_at_us_east();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let backup = dir.path().join("backup.db");
    let doc = id("inventory/sku-1");
    let a = replica("ap-south", &config);
    let store = Arc::new(Sqlite::open(&path).unwrap());
    let b = replica_with("us-east", &config, store.clone());
    a.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/stock", "value": 1, "as": "counter"}])),
        Some("base"),
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    let label = BackupLabel {
        site: "us-east".to_owned(),
        taken_at_ms: 0,
    };
    store.backup_to(&backup, &label).unwrap();

    let sell = ops(json!([{"op": "inc", "path": "/stock", "by": -1}]));
    a.apply_ops(&doc, &sell, Some("sell")).unwrap();
    b.apply_ops(&doc, &sell, Some("sell")).unwrap();
    let (a_sale, b_sale) = (a.heads(&doc).unwrap()[0], b.heads(&doc).unwrap()[0]);
    sync(&[&a, &b], &doc);
    let report = all(&a).pop().unwrap();
    assert_eq!(report.status, Status::Resolved);
    let compensation = report.resolved_change.unwrap();
    assert_eq!(a.read_json(&doc, None).unwrap().unwrap().value["stock"], 0);
    assert!(!b.resolutions_held());

    drop(b);
    drop(store);
    restore_backup(&backup, &path, 1).unwrap();
    let b = replica_with("us-east", &config, Arc::new(Sqlite::open(&path).unwrap()));
    assert!(b.resolutions_held());
    assert_eq!(b.read_json(&doc, None).unwrap().unwrap().value["stock"], 1);

    // Catching up, it gets the other sale, then its own sale (the merge
    // that breaks the rule, detected again), and only then its own
    // compensation.
    let changes = a.changes_after(&doc, &[]).unwrap().unwrap();
    let with = |hash: ChangeHash| -> Vec<Vec<u8>> {
        changes
            .iter()
            .filter(|c| decode_change(c).unwrap().hash() == hash)
            .cloned()
            .collect()
    };
    let from_a = Origin::Peer(a.site().clone());
    b.apply_changes(&doc, &with(a_sale), from_a.clone())
        .unwrap();
    assert!(all(&b).is_empty());
    b.apply_changes(&doc, &with(b_sale), from_a.clone())
        .unwrap();
    let seen = all(&b);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].id, report.id, "the same conflict, detected again");
    assert_eq!(seen[0].status, Status::Open, "held, not resolved again");
    assert_eq!(b.resolve_pending().unwrap(), 0);
    assert_eq!(b.read_json(&doc, None).unwrap().unwrap().value["stock"], -1);
    b.apply_changes(&doc, &with(compensation), from_a).unwrap();
    assert_eq!(all(&b)[0].status, Status::Resolved);
    assert_eq!(b.release_resolutions().unwrap(), 0);
    assert!(!b.resolutions_held());
    sync(&[&a, &b], &doc);
    for r in [&a, &b] {
        assert_eq!(r.read_json(&doc, None).unwrap().unwrap().value["stock"], 0);
        assert_eq!(all(r)[0].resolved_change, Some(compensation));
    }
    // The release is durable.
    drop(b);
    let b = replica_with("us-east", &config, Arc::new(Sqlite::open(&path).unwrap()));
    assert!(!b.resolutions_held());
}

/// While held, reports this site resolves wait; the release resolves them.
#[test]
fn held_resolutions_run_when_released() {
    let config = clamped_at_us_east();
    let store: Arc<dyn Store> = Arc::new(Memory::new());
    store
        .commit(vec![archipelago::store::Write::PutMeta {
            key: archipelago::store::RESOLUTIONS_HELD_KEY.to_owned(),
            value: vec![1],
        }])
        .unwrap();
    let doc = id("inventory/sku-1");
    let a = replica("ap-south", &config);
    let b = replica_with("us-east", &config, store);
    assert!(b.resolutions_held());
    a.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/stock", "value": 1, "as": "counter"}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    let sell = ops(json!([{"op": "inc", "path": "/stock", "by": -1}]));
    a.apply_ops(&doc, &sell, None).unwrap();
    b.apply_ops(&doc, &sell, None).unwrap();
    sync(&[&a, &b], &doc);
    assert_eq!(all(&b)[0].status, Status::Open);
    assert_eq!(b.read_json(&doc, None).unwrap().unwrap().value["stock"], -1);
    assert_eq!(b.release_resolutions().unwrap(), 1);
    sync(&[&a, &b], &doc);
    for r in [&a, &b] {
        assert_eq!(all(r)[0].status, Status::Resolved);
        assert_eq!(r.read_json(&doc, None).unwrap().unwrap().value["stock"], 0);
    }
}

#[test]
fn a_third_site_computes_the_same_report_and_only_the_resolver_compensates() {
    let config = ConflictConfig::default()
        .with_rule(stock_rule().policy(Policy::Clamp))
        .unwrap();
    let doc = id("inventory/sku-2");
    let a = replica("ap-south", &config);
    let b = replica("eu-west", &config);
    let c = replica("us-east", &config);
    a.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/stock", "value": 1, "as": "counter"}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b, &c], &doc);
    b.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": -1}])),
        None,
    )
    .unwrap();
    c.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": -1}])),
        None,
    )
    .unwrap();
    // ap-south hears from both in one go; it is not involved, so the
    // resolver is the first involved site by name: eu-west.
    sync(&[&a, &b, &c], &doc);
    let reports = all(&a);
    assert_eq!(reports.len(), 1, "{reports:#?}");
    assert_eq!(reports[0].resolver.as_ref().unwrap().as_str(), "eu-west");
    assert_eq!(reports[0].status, Status::Resolved);
    assert_eq!(reports[0].resolved_by.as_ref().unwrap().as_str(), "eu-west");
    for r in [&a, &b, &c] {
        assert_eq!(all(r), reports);
        assert_eq!(r.read_json(&doc, None).unwrap().unwrap().value["stock"], 0);
    }
}

#[test]
fn manual_resolution_commits_with_its_ops_and_never_reopens() {
    let config = ConflictConfig::default().with_rule(stock_rule()).unwrap();
    let doc = id("inventory/sku-3");
    let (a, b) = shared_base(
        &config,
        &doc,
        json!([{"op": "set", "path": "/stock", "value": 1, "as": "counter"}]),
    );
    for r in [&a, &b] {
        r.apply_ops(
            &doc,
            &ops(json!([{"op": "inc", "path": "/stock", "by": -1}])),
            None,
        )
        .unwrap();
    }
    sync(&[&a, &b], &doc);
    let report = all(&a).pop().unwrap();
    assert_eq!(report.status, Status::Open);
    assert_eq!(report.resolver, Some("ap-south".parse().unwrap()));

    let resolved = b
        .resolve_conflict(
            &report.id,
            &ops(json!([{"op": "inc", "path": "/stock", "by": 1},
                        {"op": "set", "path": "/backorders", "value": 1}])),
            Some("restocked one unit"),
        )
        .unwrap();
    assert_eq!(resolved.status, Status::Resolved);
    assert_eq!(resolved.note.as_deref(), Some("restocked one unit"));
    let err = b.resolve_conflict(&report.id, &[], None).unwrap_err();
    assert!(matches!(err, Error::ConflictClosed { .. }), "{err}");
    // A failing op changes nothing.
    let err = a
        .dismiss_conflict(&"0".repeat(32).parse_id(), None)
        .unwrap_err();
    assert!(matches!(err, Error::ConflictNotFound(_)), "{err}");
    sync(&[&a, &b], &doc);
    let at_a = a.conflict(&report.id).unwrap().unwrap();
    assert_eq!(at_a, resolved);
    assert_eq!(
        a.read_json(&doc, None).unwrap().unwrap().value,
        json!({"stock": 0, "backorders": 1})
    );
    // More merges do not reopen it.
    a.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": 3}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    assert_eq!(
        b.conflict(&report.id).unwrap().unwrap().status,
        Status::Resolved
    );
}

trait ParseId {
    fn parse_id(&self) -> archipelago::conflict::ConflictId;
}

impl ParseId for String {
    fn parse_id(&self) -> archipelago::conflict::ConflictId {
        archipelago::conflict::ConflictId::parse(self).unwrap()
    }
}

/// Two sites that set `/tier` of `doc` concurrently to 2 and 3, synced.
fn tier_set_at_both(doc: &DocId) -> (Replica, Replica) {
    let (a, b) = shared_base(
        &ConflictConfig::default(),
        doc,
        json!([{"op": "set", "path": "/tier", "value": 1}]),
    );
    for (site, tier) in [(&a, 2), (&b, 3)] {
        site.apply_ops(
            doc,
            &ops(json!([{"op": "set", "path": "/tier", "value": tier}])),
            None,
        )
        .unwrap();
    }
    sync(&[&a, &b], doc);
    (a, b)
}

#[test]
fn resolve_ops_that_fail_change_nothing() {
    let doc = id("customers/c2");
    let (a, _b) = tier_set_at_both(&doc);
    let report = all(&a).pop().unwrap();
    let heads = a.heads(&doc);
    let err = a
        .resolve_conflict(
            &report.id,
            &ops(json!([{"op": "set", "path": "/tier", "value": 3},
                        {"op": "inc", "path": "/tier", "by": 1}])),
            None,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Op(_)), "{err}");
    assert_eq!(a.heads(&doc), heads);
    assert_eq!(
        a.conflict(&report.id).unwrap().unwrap().status,
        Status::Open
    );
}

#[test]
fn concurrent_manual_closings_converge_to_one_status() {
    let doc = id("customers/c3");
    let (a, b) = tier_set_at_both(&doc);
    let report = all(&a).pop().unwrap();
    a.dismiss_conflict(&report.id, Some("fine")).unwrap();
    b.resolve_conflict(
        &report.id,
        &ops(json!([{"op": "set", "path": "/tier", "value": 3}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    let at_a = a.conflict(&report.id).unwrap().unwrap();
    assert_ne!(at_a.status, Status::Open);
    assert_eq!(b.conflict(&report.id).unwrap().unwrap(), at_a);
}

#[test]
fn unique_references_and_predicates_fail_only_after_a_merge() {
    let even = Rule::new(
        "even-rows",
        "flights/*",
        "/rows",
        Check::Predicate(Arc::new(|v| {
            v.and_then(|v| v.as_i64()).is_none_or(|n| n % 2 == 0)
        })),
    )
    .unwrap();
    let config = ConflictConfig::default()
        .without_detectors()
        .with_rule(
            Rule::new(
                "one-seat-each",
                "flights/*",
                "/bookings",
                Check::Unique("seat".into()),
            )
            .unwrap(),
        )
        .unwrap()
        .with_rule(
            Rule::new(
                "featured-exists",
                "flights/*",
                "/featured",
                Check::references("flights/fl-1:/bookings").unwrap(),
            )
            .unwrap(),
        )
        .unwrap()
        .with_rule(even)
        .unwrap();
    let doc = id("flights/fl-1");
    let (a, b) = shared_base(
        &config,
        &doc,
        json!([{"op": "set", "path": "/bookings", "value": {"b0": {"seat": "1A"}}},
               {"op": "set", "path": "/featured", "value": "b0"},
               {"op": "set", "path": "/rows", "value": 2, "as": "counter"}]),
    );
    a.apply_ops(
        &doc,
        &ops(
            json!([{"op": "set", "path": "/bookings/b1", "value": {"seat": "2C"}},
                    {"op": "set", "path": "/featured", "value": "b1"},
                    {"op": "inc", "path": "/rows", "by": 2}]),
        ),
        None,
    )
    .unwrap();
    b.apply_ops(
        &doc,
        &ops(
            json!([{"op": "set", "path": "/bookings/b2", "value": {"seat": "2C"}},
                    {"op": "del", "path": "/bookings/b0"},
                    {"op": "inc", "path": "/rows", "by": 4}]),
        ),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    let mut rules: Vec<_> = all(&a).into_iter().map(|c| c.rule.unwrap()).collect();
    rules.sort();
    // 2 + 2 + 4 = 8 is even: the predicate holds after the merge too.
    assert_eq!(rules, vec!["one-seat-each".to_owned()], "{:#?}", all(&a));
    assert_eq!(all(&b), all(&a));

    // A delete that makes the rule fail on its own side alone is not a
    // merge conflict.
    b.apply_ops(
        &doc,
        &ops(json!([{"op": "del", "path": "/bookings/b1"}])),
        None,
    )
    .unwrap();
    a.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/title", "value": "x"}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    assert_eq!(all(&a).len(), 1);
    // The reference: b4 featured at one site while deleted at the other.
    a.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/featured", "value": "b2"},
                    {"op": "set", "path": "/bookings/b4", "value": {"seat": "5A"}}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    a.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/featured", "value": "b4"}])),
        None,
    )
    .unwrap();
    b.apply_ops(
        &doc,
        &ops(json!([{"op": "del", "path": "/bookings/b4"}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    let refs: Vec<_> = all(&a)
        .into_iter()
        .filter(|c| c.rule.as_deref() == Some("featured-exists"))
        .collect();
    assert_eq!(refs.len(), 1, "{:#?}", all(&a));
    assert_eq!(refs[0].provisional, json!("b4"));
}

#[test]
fn rust_resolvers_return_ops_that_commit_with_the_status() {
    let restock = |conflict: &Conflict, doc: &serde_json::Value| -> Option<Resolution> {
        let stock = doc["stock"].as_i64()?;
        Some(Resolution {
            ops: serde_json::from_value(json!([
                {"op": "inc", "path": "/stock", "by": -stock},
                {"op": "set", "path": format!("/refunds/{}", conflict.id), "value": -stock}
            ]))
            .unwrap(),
            how: "refund".to_owned(),
            note: Some(format!("refunded {} orders", -stock)),
            docs: Vec::new(),
        })
    };
    let config = ConflictConfig::default()
        .with_rule(stock_rule().policy(Policy::Custom(Arc::new(restock))))
        .unwrap();
    let doc = id("inventory/sku-9");
    let (a, b) = shared_base(
        &config,
        &doc,
        json!([{"op": "set", "path": "/stock", "value": 2, "as": "counter"},
               {"op": "set", "path": "/refunds", "value": {}}]),
    );
    a.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": -2}])),
        None,
    )
    .unwrap();
    b.apply_ops(
        &doc,
        &ops(json!([{"op": "inc", "path": "/stock", "by": -1}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    let report = all(&b).pop().unwrap();
    assert_eq!(report.status, Status::Resolved);
    assert_eq!(report.resolution.as_deref(), Some("refund"));
    let value = b.read_json(&doc, None).unwrap().unwrap().value;
    assert_eq!(value["stock"], 0);
    assert_eq!(value["refunds"], json!({report.id.as_str(): 1}));
    assert_eq!(a.read_json(&doc, None).unwrap().unwrap().value, value);
}

#[test]
fn reserved_keys_are_hidden_and_protected() {
    let doc = id("customers/c4");
    let (a, _b) = tier_set_at_both(&doc);
    assert_eq!(all(&a).len(), 1);
    let err = a
        .apply_ops(
            &doc,
            &ops(json!([{"op": "del", "path": "/_archipelago~1conflict"}])),
            None,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Op(_)), "{err}");
    // Writing the whole document keeps the reports.
    a.put_json(&doc, &json!({"tier": 4}), None).unwrap();
    let report = all(&a).pop().unwrap();
    assert_eq!(
        a.conflict(&report.id).unwrap().unwrap().status,
        Status::Open
    );
    a.dismiss_conflict(&report.id, None).unwrap();
    assert_eq!(
        a.read_json(&doc, None).unwrap().unwrap().value,
        json!({"tier": 4})
    );
    assert!(a
        .put_json(&doc, &json!({"_archipelago/x": 1}), None)
        .is_err());
}

#[test]
fn the_index_is_durable_and_follows_whole_documents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let config = ConflictConfig::default();
    let doc = id("customers/c5");
    let report = {
        let a = replica_with("ap-south", &config, Arc::new(Sqlite::open(&path).unwrap()));
        let b = replica("us-east", &config);
        a.apply_ops(
            &doc,
            &ops(json!([{"op": "set", "path": "/tier", "value": 1}])),
            None,
        )
        .unwrap();
        sync(&[&a, &b], &doc);
        a.apply_ops(
            &doc,
            &ops(json!([{"op": "set", "path": "/tier", "value": 2}])),
            None,
        )
        .unwrap();
        b.apply_ops(
            &doc,
            &ops(json!([{"op": "set", "path": "/tier", "value": 3}])),
            None,
        )
        .unwrap();
        sync(&[&a, &b], &doc);
        // A site that receives the document whole indexes its reports.
        let c = replica("eu-west", &config);
        let mut events = c.subscribe_conflicts();
        c.apply_snapshot(
            &doc,
            &a.save_bytes(&doc).unwrap().unwrap(),
            Origin::Peer(a.site().clone()),
        )
        .unwrap();
        assert_eq!(all(&c), all(&a));
        assert_eq!(events.try_recv().unwrap(), all(&a)[0]);
        a.dismiss_conflict(&all(&a)[0].id, Some("checked")).unwrap()
    };
    let a = replica_with("ap-south", &config, Arc::new(Sqlite::open(&path).unwrap()));
    assert_eq!(all(&a), vec![report]);
    assert_eq!(
        a.conflicts(&Filter {
            status: Some(Status::Open),
            ..Filter::default()
        })
        .unwrap(),
        Vec::new()
    );
}

#[test]
fn lost_writes_keep_their_place_inside_the_deleted_object() {
    let config = ConflictConfig::default();
    let doc = id("records/r3");
    let (a, b) = shared_base(
        &config,
        &doc,
        json!([{"op": "set", "path": "/patient",
                "value": {"name": "Kim", "contact": {"phone": "1"}, "tags": ["a"], "note": ""}},
               {"op": "set", "path": "/patient/note", "value": "", "as": "text"}]),
    );
    a.apply_ops(&doc, &ops(json!([{"op": "del", "path": "/patient"}])), None)
        .unwrap();
    b.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/patient/contact/phone", "value": "555"},
                    {"op": "insert", "path": "/patient/tags/-", "value": "vip"},
                    {"op": "splice", "path": "/patient/note", "index": 0, "delete": 0, "text": "hi"}])),
        None,
    )
    .unwrap();
    sync(&[&a, &b], &doc);
    let reports = all(&a);
    assert_eq!(reports.len(), 1, "{reports:#?}");
    let mut lost: Vec<_> = reports[0]
        .values
        .iter()
        .filter(|v| !v.value.is_null())
        .map(|v| v.value.clone())
        .collect();
    lost.sort_by_key(|v| v.to_string());
    assert_eq!(
        lost,
        vec![
            json!({"contact": {"phone": "555"}}),
            json!({"note": "hi"}),
            json!({"tags": ["vip"]}),
        ]
    );
    assert_eq!(all(&b), reports);
}

/// Each site takes one order of the last unit in a transaction: the order
/// document and the stock's decrement, which records the order.
fn sell_last_unit(site: &Replica, order: &str) -> archipelago::txn::TxnCommit {
    use archipelago::txn::{Precondition, Txn, TxnDoc};
    site.commit_txn(&Txn {
        docs: vec![
            TxnDoc {
                id: id(&format!("orders/{order}")),
                ops: ops(json!([{"op": "set", "path": "/status", "value": "placed"}])),
                precondition: Precondition::none(),
            },
            TxnDoc {
                id: id("inventory/sku-7"),
                ops: ops(json!([{"op": "inc", "path": "/stock", "by": -1},
                                {"op": "set", "path": format!("/orders/{order}"), "value": 1}])),
                precondition: Precondition::none(),
            },
        ],
        message: Some(format!("order {order}")),
    })
    .unwrap()
}

/// Ships every document of the oversell scenario both ways until equal.
fn sync_all(sites: &[&Replica]) {
    for _ in 0..3 {
        for doc in ["inventory/sku-7", "orders/o-east", "orders/o-south"] {
            for from in sites {
                let Some(changes) = from.changes_after(&id(doc), &[]).unwrap() else {
                    continue;
                };
                for to in sites {
                    if to.site() != from.site() {
                        to.apply_changes(&id(doc), &changes, Origin::Peer(from.site().clone()))
                            .unwrap();
                    }
                }
            }
        }
    }
}

#[test]
fn a_resolution_can_cancel_the_order_and_restock_in_one_transaction() {
    // The resolver cancels the order of the site whose name sorts last,
    // restocking its unit, in one transaction across both documents.
    let cancel = |conflict: &Conflict, doc: &serde_json::Value| -> Option<Resolution> {
        assert!(
            conflict.values.iter().all(|v| v.txn.is_some()),
            "each competing change names its transaction: {conflict:#?}"
        );
        let order = doc["orders"].as_object()?.keys().max()?.clone();
        Some(Resolution {
            ops: ops(json!([{"op": "inc", "path": "/stock", "by": 1},
                            {"op": "del", "path": format!("/orders/{order}")}])),
            how: "cancel".to_owned(),
            note: Some(format!("cancelled {order}")),
            docs: vec![(
                id(&format!("orders/{order}")),
                ops(json!([{"op": "set", "path": "/status", "value": "cancelled"}])),
            )],
        })
    };
    let config = ConflictConfig::default()
        .with_rule(
            stock_rule()
                .resolver("us-east".parse().unwrap())
                .policy(Policy::Custom(Arc::new(cancel))),
        )
        .unwrap();
    let doc = id("inventory/sku-7");
    let (south, east) = shared_base(
        &config,
        &doc,
        json!([{"op": "set", "path": "/stock", "value": 1, "as": "counter"},
               {"op": "set", "path": "/orders", "value": {}}]),
    );
    let sold_south = sell_last_unit(&south, "o-south");
    let sold_east = sell_last_unit(&east, "o-east");
    sync_all(&[&south, &east]);

    let report = all(&east)
        .into_iter()
        .find(|c| c.kind == Kind::Invariant)
        .expect("the oversell is reported");
    assert_eq!(report.status, Status::Resolved, "{report:#?}");
    assert_eq!(report.note.as_deref(), Some("cancelled o-south"));
    let mut txns: Vec<_> = report.values.iter().filter_map(|v| v.txn).collect();
    txns.sort();
    let mut sold = vec![sold_south.txn, sold_east.txn];
    sold.sort();
    assert_eq!(txns, sold, "the values name the two sales");
    for site in [&south, &east] {
        let stock = site.read_json(&doc, None).unwrap().unwrap().value;
        assert_eq!(stock["stock"], 0, "{stock}");
        assert_eq!(stock["orders"], json!({"o-east": 1}));
        let order = site
            .read_json(&id("orders/o-south"), None)
            .unwrap()
            .unwrap();
        assert_eq!(order.value["status"], "cancelled");
    }
    // The closing and the cancellation are one transaction.
    let closing = report.resolved_change.unwrap();
    let stock_history = east.history(&doc).unwrap().unwrap();
    let closing_txn = stock_history
        .iter()
        .find(|c| c.hash == closing)
        .and_then(|c| c.txn)
        .expect("the closing belongs to a transaction");
    let order_history = east.history(&id("orders/o-south")).unwrap().unwrap();
    assert_eq!(order_history.last().unwrap().txn, Some(closing_txn));
    // Exactly once: one closing in the document.
    let again = east.resolve_pending().unwrap();
    assert_eq!(again, 0);
}

#[test]
fn a_person_can_resolve_with_edits_of_other_documents() {
    let config = ConflictConfig::default().with_rule(stock_rule()).unwrap();
    let doc = id("inventory/sku-7");
    let (south, east) = shared_base(
        &config,
        &doc,
        json!([{"op": "set", "path": "/stock", "value": 1, "as": "counter"},
               {"op": "set", "path": "/orders", "value": {}}]),
    );
    sell_last_unit(&south, "o-south");
    sell_last_unit(&east, "o-east");
    sync_all(&[&south, &east]);
    let report = all(&south)
        .into_iter()
        .find(|c| c.kind == Kind::Invariant)
        .unwrap();
    assert_eq!(report.status, Status::Open);
    let twice = south.resolve_conflict_with(
        &report.id,
        &[],
        &[
            (
                id("orders/o-east"),
                ops(json!([{"op": "set", "path": "/x", "value": 1}])),
            ),
            (
                id("orders/o-east"),
                ops(json!([{"op": "set", "path": "/y", "value": 1}])),
            ),
        ],
        None,
    );
    assert!(matches!(twice, Err(Error::Txn(_))), "{twice:?}");
    // An op that does not fit another document: nothing changes.
    let bad = south.resolve_conflict_with(
        &report.id,
        &ops(json!([{"op": "inc", "path": "/stock", "by": 1}])),
        &[(
            id("orders/o-east"),
            ops(json!([{"op": "inc", "path": "/status", "by": 1}])),
        )],
        None,
    );
    assert!(
        matches!(bad, Err(Error::TxnOp { ref doc, .. }) if *doc == id("orders/o-east")),
        "{bad:?}"
    );
    assert_eq!(
        south.conflict(&report.id).unwrap().unwrap().status,
        Status::Open
    );
    let closed = south
        .resolve_conflict_with(
            &report.id,
            &ops(json!([{"op": "inc", "path": "/stock", "by": 1}])),
            &[(
                id("orders/o-east"),
                ops(json!([{"op": "set", "path": "/status", "value": "cancelled"}])),
            )],
            Some("cancelled o-east by hand"),
        )
        .unwrap();
    assert_eq!(closed.status, Status::Resolved);
    sync_all(&[&south, &east]);
    for site in [&south, &east] {
        assert_eq!(
            site.read_json(&doc, None).unwrap().unwrap().value["stock"],
            0
        );
        assert_eq!(
            site.read_json(&id("orders/o-east"), None)
                .unwrap()
                .unwrap()
                .value["status"],
            "cancelled"
        );
        assert_eq!(
            site.conflict(&report.id).unwrap().unwrap().status,
            Status::Resolved
        );
    }
}
