//! Orders and the stock they take, as transactions across documents.
//!
//! 1. us-east takes an order: the order document and the stock decrement
//!    commit as one transaction (one durable write), guarded by `if_heads`
//!    on the stock it read, so a concurrent sale at the same site cannot be
//!    lost: the second writer retries.
//! 2. eu-west receives the stock's change before the order's: it holds it
//!    back, so no read there ever shows the stock taken without its order;
//!    once the order arrives both appear together, and a consistent read
//!    of the two documents shows the whole transaction.
//! 3. During a partition both regions sell the last unit. The merge breaks
//!    `stock-non-negative`; us-east, the rule's resolver, cancels one order
//!    and restocks its unit in one transaction across both documents.
//!
//! Run: `cargo run --example order_transaction`

use std::sync::Arc;

use archipelago::conflict::{
    Check, Conflict, ConflictConfig, Filter, Kind, Policy, Resolution, Rule, Status,
};
use archipelago::doc::Op;
use archipelago::store::Sqlite;
use archipelago::txn::{Precondition, Txn, TxnDoc};
use archipelago::{DocId, Error, Origin, Replica, ReplicaOptions};
use serde_json::json;

fn ops(value: serde_json::Value) -> anyhow::Result<Vec<Op>> {
    Ok(serde_json::from_value(value)?)
}

fn id(text: &str) -> anyhow::Result<DocId> {
    Ok(text.parse()?)
}

/// Ships what `from` has of `doc` to `to` (`sync-node` does this over QUIC;
/// here it is done by hand, one document at a time, to show the order in
/// which members of a transaction may arrive).
fn ship(from: &Replica, to: &Replica, doc: &DocId) -> anyhow::Result<()> {
    if let Some(changes) = from.changes_after(doc, &[])? {
        to.apply_changes(doc, &changes, Origin::Peer(from.site().clone()))?;
    }
    Ok(())
}

/// Ships every document both ways, a few rounds (reports and resolutions
/// made on arrival are changes too).
fn exchange(sites: &[&Replica], docs: &[DocId]) -> anyhow::Result<()> {
    for _ in 0..3 {
        for doc in docs {
            for from in sites {
                for to in sites.iter().filter(|to| to.site() != from.site()) {
                    ship(from, to, doc)?;
                }
            }
        }
    }
    Ok(())
}

/// Takes order `order` for one unit: reads the stock, then commits the
/// order and the decrement together, only if the stock is still as read.
/// Retries when another writer got there first.
fn take_order(site: &Replica, order: &str) -> anyhow::Result<archipelago::txn::TxnCommit> {
    let stock_id = id("inventory/sku-1")?;
    for attempt in 1..=10 {
        let stock = site.read_json(&stock_id, None)?.expect("stocked");
        anyhow::ensure!(
            stock.value["stock"].as_i64() > Some(0),
            "{} sees no stock left for {order}",
            site.site()
        );
        let txn = Txn {
            docs: vec![
                TxnDoc {
                    id: id(&format!("orders/{order}"))?,
                    ops: ops(json!([
                        {"op": "set", "path": "/sku", "value": "sku-1"},
                        {"op": "set", "path": "/status", "value": "placed"},
                    ]))?,
                    precondition: Precondition {
                        if_absent: true,
                        ..Precondition::default()
                    },
                },
                TxnDoc {
                    id: stock_id.clone(),
                    ops: ops(json!([
                        {"op": "inc", "path": "/stock", "by": -1},
                        {"op": "set", "path": format!("/orders/{order}"), "value": 1},
                    ]))?,
                    precondition: Precondition::if_heads(stock.heads),
                },
            ],
            message: Some(format!("take order {order}")),
        };
        match site.commit_txn(&txn) {
            Ok(commit) => return Ok(commit),
            Err(Error::PreconditionFailed { doc, .. }) if doc == stock_id => {
                println!(
                    "   {order}: the stock changed since it was read (attempt {attempt}); retrying"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("{order} did not commit in 10 attempts")
}

/// The compensation of an oversell: cancel the order of the site whose
/// order id sorts last, and give its unit back, in one transaction.
fn cancel_one(_conflict: &Conflict, stock: &serde_json::Value) -> Option<Resolution> {
    let order = stock["orders"].as_object()?.keys().max()?.clone();
    Some(Resolution {
        ops: serde_json::from_value(json!([
            {"op": "inc", "path": "/stock", "by": 1},
            {"op": "del", "path": format!("/orders/{order}")},
        ]))
        .ok()?,
        how: "cancel".to_owned(),
        note: Some(format!("cancelled {order}, restocked 1")),
        docs: vec![(
            format!("orders/{order}").parse().ok()?,
            serde_json::from_value(json!([{"op": "set", "path": "/status", "value": "cancelled"}]))
                .ok()?,
        )],
    })
}

fn main() -> anyhow::Result<()> {
    let rule = Rule::new(
        "stock-non-negative",
        "inventory/*",
        "/stock",
        Check::Min(0.0),
    )?
    .resolver("us-east".parse()?)
    .policy(Policy::Custom(Arc::new(cancel_one)));
    let config = Arc::new(ConflictConfig::default().with_rule(rule)?);
    let dir = tempfile::tempdir()?;
    let open = |site: &str| -> anyhow::Result<Replica> {
        let mut options = ReplicaOptions::new(site.parse()?);
        options.conflicts = config.clone();
        let store = Sqlite::open(dir.path().join(format!("{site}.db")))?;
        Ok(Replica::open(options, Arc::new(store))?)
    };
    let east = open("us-east")?;
    let west = open("eu-west")?;
    let stock_id = id("inventory/sku-1")?;

    east.apply_ops(
        &stock_id,
        &ops(json!([
            {"op": "set", "path": "/stock", "value": 2, "as": "counter"},
            {"op": "set", "path": "/orders", "value": {}},
        ]))?,
        Some("receive 2 units"),
    )?;
    ship(&east, &west, &stock_id)?;
    println!("0. both regions stock 2 units of sku-1");

    println!("1. us-east takes order e-1: the order and the stock, one transaction");
    let commit = take_order(&east, "e-1")?;
    println!(
        "   committed {} over {} documents",
        commit.txn,
        commit.docs.len()
    );

    println!("2. eu-west receives the stock's change first, then the order's");
    ship(&east, &west, &stock_id)?;
    let stock = west.read_json(&stock_id, None)?.expect("stocked").value;
    let order = west.read_json(&id("orders/e-1")?, None)?;
    println!(
        "   before the order arrives: stock {}, order {}",
        stock["stock"],
        if order.is_some() { "present" } else { "absent" }
    );
    anyhow::ensure!(
        stock["stock"] == 2 && order.is_none(),
        "part of a transaction showed"
    );
    ship(&east, &west, &id("orders/e-1")?)?;
    let both = west.read_many(&[stock_id.clone(), id("orders/e-1")?])?;
    let (stock, order) = (
        both[0].as_ref().expect("stocked"),
        both[1].as_ref().expect("arrived"),
    );
    println!(
        "   after: stock {}, order {} (one consistent read)",
        stock.value["stock"], order.value["status"]
    );
    anyhow::ensure!(stock.value["stock"] == 1 && order.value["status"] == "placed");

    println!("3. partition: each region sells the last unit");
    take_order(&east, "e-2")?;
    take_order(&west, "w-1")?;
    let docs = [
        stock_id.clone(),
        id("orders/e-1")?,
        id("orders/e-2")?,
        id("orders/w-1")?,
    ];
    println!("   the partition heals; the regions exchange changes");
    exchange(&[&east, &west], &docs)?;

    let report = east
        .conflicts(&Filter::default())?
        .into_iter()
        .find(|c| c.kind == Kind::Invariant)
        .ok_or_else(|| anyhow::anyhow!("the oversell raised no report"))?;
    println!(
        "   {} on {}: the merge made stock {}; {:?} by {}: {}",
        report.rule.as_deref().unwrap_or_default(),
        report.doc,
        report.provisional,
        report.status,
        report
            .resolved_by
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        report.note.as_deref().unwrap_or_default()
    );
    for value in &report.values {
        println!(
            "     {} sold in transaction {}",
            value
                .site
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            value.txn.map(|t| t.to_string()).unwrap_or_default()
        );
    }
    anyhow::ensure!(report.status == Status::Resolved);
    for site in [&east, &west] {
        let views = site.read_many(&docs)?;
        let stock = &views[0].as_ref().expect("stocked").value;
        let status = |k: usize| views[k].as_ref().expect("present").value["status"].clone();
        println!(
            "   at {}: stock {}, orders e-1 {}, e-2 {}, w-1 {}",
            site.site(),
            stock["stock"],
            status(1),
            status(2),
            status(3)
        );
        anyhow::ensure!(stock["stock"] == 0);
        anyhow::ensure!(status(3) == "cancelled" && status(2) == "placed");
    }
    println!("ok: every transaction visible whole at both sites; the oversold order cancelled and restocked in one transaction, once");
    Ok(())
}
