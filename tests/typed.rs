//! Typed access through autosurgeon: round trips of Rust values, and the
//! merge laws (commutative, idempotent) for concurrent typed edits.

use std::collections::HashMap;
use std::sync::Arc;

use archipelago::store::Memory;
use archipelago::{DocId, Origin, Replica, ReplicaOptions};
use autosurgeon::{Hydrate, Reconcile};
use proptest::prelude::*;

#[derive(Debug, Clone, Default, PartialEq, Hydrate, Reconcile)]
struct Order {
    customer: String,
    paid: bool,
    total_cents: i64,
    note: Option<String>,
    lines: Vec<Line>,
    tags: HashMap<String, i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Hydrate, Reconcile)]
struct Line {
    sku: String,
    quantity: u32,
}

fn order() -> impl Strategy<Value = Order> {
    (
        "[a-z]{0,8}",
        any::<bool>(),
        any::<i64>(),
        proptest::option::of("[a-z ]{0,8}"),
        proptest::collection::vec(
            ("[A-Z0-9]{1,4}", any::<u32>()).prop_map(|(sku, quantity)| Line { sku, quantity }),
            0..5,
        ),
        proptest::collection::hash_map("[a-z]{1,3}", any::<i64>(), 0..4),
    )
        .prop_map(|(customer, paid, total_cents, note, lines, tags)| Order {
            customer,
            paid,
            total_cents,
            note,
            lines,
            tags,
        })
}

fn replica(site: &str) -> Replica {
    Replica::open(
        ReplicaOptions::new(site.parse().unwrap()),
        Arc::new(Memory::new()),
    )
    .unwrap()
}

fn id() -> DocId {
    "orders/1042".parse().unwrap()
}

/// Sends `from` everything `to` lacks of the document.
fn ship(from: &Replica, to: &Replica) {
    let have = to.heads(&id()).unwrap_or_default();
    // Heads `to` holds that `from` lacks would make changes_after refuse, so
    // ship from the heads both know.
    let known: Vec<_> = have
        .into_iter()
        .filter(|h| {
            from.with_doc(&id(), |d| {
                automerge::ReadDoc::get_change_by_hash(d, h).is_some()
            })
            .unwrap()
                == Some(true)
        })
        .collect();
    let changes = from.changes_after(&id(), &known).unwrap().unwrap();
    to.apply_changes(&id(), &changes, Origin::Peer(from.site().clone()))
        .unwrap();
}

use archipelago::automerge;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn typed_values_round_trip(first in order(), second in order()) {
        let r = replica("east");
        r.put(&id(), &first, None).unwrap();
        prop_assert_eq!(r.get::<Order>(&id()).unwrap(), Some(first.clone()));
        r.put(&id(), &second, None).unwrap();
        prop_assert_eq!(r.get::<Order>(&id()).unwrap(), Some(second));
    }

    #[test]
    fn concurrent_typed_edits_merge_the_same_in_any_order(
        base in order(),
        east_total in any::<i64>(),
        west_customer in "[a-z]{1,8}",
        south_note in "[a-z]{1,8}",
    ) {
        let east = replica("east");
        let west = replica("west");
        let south = replica("south");
        east.put(&id(), &base, None).unwrap();
        ship(&east, &west);
        ship(&east, &south);
        east.update(&id(), None, |o: &mut Order| o.total_cents = east_total).unwrap();
        west.update(&id(), None, |o: &mut Order| o.customer = west_customer.clone()).unwrap();
        south.update(&id(), None, |o: &mut Order| o.note = Some(south_note.clone())).unwrap();

        // east learns west then south; west learns south then east; south
        // learns east then west, twice (idempotence).
        ship(&west, &east);
        ship(&south, &east);
        ship(&south, &west);
        ship(&east, &west);
        ship(&east, &south);
        ship(&west, &south);
        ship(&east, &south);

        let mut heads: Vec<_> = [&east, &west, &south].iter().map(|r| {
            let mut h = r.heads(&id()).unwrap();
            h.sort();
            h
        }).collect();
        heads.dedup();
        prop_assert_eq!(heads.len(), 1, "all replicas have the same heads");
        let merged: Order = east.get(&id()).unwrap().unwrap();
        prop_assert_eq!(merged.total_cents, east_total);
        prop_assert_eq!(&merged.customer, &west_customer);
        prop_assert_eq!(merged.note.as_deref(), Some(south_note.as_str()));
        prop_assert_eq!(west.get::<Order>(&id()).unwrap(), Some(merged.clone()));
        prop_assert_eq!(south.get::<Order>(&id()).unwrap(), Some(merged));
    }
}

#[test]
fn update_starts_from_default_on_a_new_document() {
    let r = replica("east");
    let (commit, lines) = r
        .update(&id(), Some("first line"), |o: &mut Order| {
            o.lines.push(Line {
                sku: "A1".into(),
                quantity: 2,
            });
            o.lines.len()
        })
        .unwrap();
    assert_eq!(lines, 1);
    assert!(commit.change.is_some());
    let history = r.history(&id()).unwrap().unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].message.as_deref(), Some("first line"));
    assert_eq!(history[0].site.as_ref().map(|s| s.as_str()), Some("east"));
}
