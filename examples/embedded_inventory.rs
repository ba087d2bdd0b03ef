//! An embedded replica per region, typed access, and a manual exchange of
//! changes between two sites (done by hand here, with the calls the sync
//! protocol uses; `embedded_sync` lets the replicas sync over QUIC).
//!
//! Run: `cargo run --example embedded_inventory`

use std::sync::Arc;

use archipelago::store::Sqlite;
use archipelago::{DocId, Origin, Replica, ReplicaOptions};
use autosurgeon::{Hydrate, Reconcile};

#[derive(Debug, Clone, Default, PartialEq, Hydrate, Reconcile)]
struct Item {
    name: String,
    price_cents: i64,
    warehouse: String,
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let east = Replica::open(
        ReplicaOptions::new("us-east".parse()?),
        Arc::new(Sqlite::open(dir.path().join("us-east.db"))?),
    )?;
    let west = Replica::open(
        ReplicaOptions::new("us-west".parse()?),
        Arc::new(Sqlite::open(dir.path().join("us-west.db"))?),
    )?;
    let id: DocId = "inventory/sku-1".parse()?;

    let item = Item {
        name: "desk lamp".into(),
        price_cents: 3000,
        warehouse: "NJ-1".into(),
    };
    let created = east.put(&id, &item, Some("create sku-1"))?;
    println!("us-east created {id} at {:?}", created.heads);

    // us-west catches up on the whole document.
    let changes = east
        .changes_after(&id, &[])?
        .expect("us-east has the document");
    west.apply_changes(&id, &changes, Origin::Peer(east.site().clone()))?;
    let common = west.heads(&id).expect("us-west has it now");

    // Both regions edit different fields at the same time.
    east.update(&id, Some("price drop"), |item: &mut Item| {
        item.price_cents = 2500
    })?;
    west.update(&id, Some("moved stock"), |item: &mut Item| {
        item.warehouse = "CA-2".into()
    })?;

    // Exchange what each has since the common heads.
    let to_west = east.changes_after(&id, &common)?.expect("exists");
    let to_east = west.changes_after(&id, &common)?.expect("exists");
    west.apply_changes(&id, &to_west, Origin::Peer(east.site().clone()))?;
    east.apply_changes(&id, &to_east, Origin::Peer(west.site().clone()))?;

    let at_east: Item = east.get(&id)?.expect("exists");
    let at_west: Item = west.get(&id)?.expect("exists");
    assert_eq!(at_east, at_west);
    println!("merged at both sites: {at_east:?}");

    for change in east.history(&id)?.expect("exists") {
        println!(
            "  {} by {} at {}: {}",
            &change.hash.to_string()[..12],
            change
                .site
                .map_or_else(|| "?".to_owned(), |s| s.to_string()),
            change.time,
            change.message.unwrap_or_default()
        );
    }
    // Time travel: the document as it was when both sites had caught up.
    let before = east.read_json(&id, Some(&common))?.expect("exists");
    println!("as of {:?}: {}", common, before.value);
    Ok(())
}
