//! Multi-region inventory: two regions sell the last units of a SKU during a
//! network partition, so together they sell more than there was. Each side
//! was right on its own; only the merge reveals the oversell. The rule
//! `stock-non-negative` reports it identically at both sites, and us-east,
//! the rule's resolver, compensates once: it brings the stock counter back
//! to 0 and records a backorder for the units that were short.
//!
//! Run: `cargo run --example inventory_oversell`

use std::sync::Arc;

use archipelago::conflict::{
    Check, Conflict, ConflictConfig, Filter, Kind, Policy, Resolution, Rule, Status,
};
use archipelago::doc::Op;
use archipelago::store::Sqlite;
use archipelago::{DocId, Origin, Replica, ReplicaOptions};
use serde_json::json;

/// Ships every change each site has to the others until all hold the same
/// heads (`sync-node` does this over QUIC; here it is done by hand).
fn exchange(sites: &[&Replica], doc: &DocId) -> anyhow::Result<()> {
    for _ in 0..6 {
        for from in sites {
            let Some(changes) = from.changes_after(doc, &[])? else {
                continue;
            };
            for to in sites.iter().filter(|to| to.site() != from.site()) {
                to.apply_changes(doc, &changes, Origin::Peer(from.site().clone()))?;
            }
        }
        if sites.windows(2).all(|w| w[0].heads(doc) == w[1].heads(doc)) {
            return Ok(());
        }
    }
    anyhow::bail!("sites did not converge on {doc}")
}

fn ops(value: serde_json::Value) -> anyhow::Result<Vec<Op>> {
    Ok(serde_json::from_value(value)?)
}

/// The compensation: stock back to 0, the shortfall recorded as a backorder
/// keyed by the conflict id (so it can only ever be written once per report).
fn backorder(conflict: &Conflict, doc: &serde_json::Value) -> Option<Resolution> {
    let short = -doc["stock"].as_i64()?;
    if short <= 0 {
        return None;
    }
    let ops = serde_json::from_value(json!([
        {"op": "inc", "path": "/stock", "by": short},
        {"op": "set", "path": format!("/backorders/{}", conflict.id), "value": short},
    ]))
    .ok()?;
    Some(Resolution {
        ops,
        how: "backorder".to_owned(),
        note: Some(format!("{short} unit(s) oversold, backordered")),
        docs: Vec::new(),
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
    .policy(Policy::Custom(Arc::new(backorder)));
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
    let sites = [&east, &west];
    let sku: DocId = "inventory/sku-42".parse()?;

    east.apply_ops(
        &sku,
        &ops(json!([
            {"op": "set", "path": "/name", "value": "espresso grinder"},
            {"op": "set", "path": "/stock", "value": 2, "as": "counter"},
            {"op": "set", "path": "/backorders", "value": {}},
        ]))?,
        Some("receive 2 units"),
    )?;
    exchange(&sites, &sku)?;
    println!("1. both regions see stock = 2");

    println!("2. partition: eu-west sells 2, us-east sells 1 (each sees enough stock)");
    let sell = |site: &Replica, n: i64| -> anyhow::Result<()> {
        let stock = site.read_json(&sku, None)?.expect("exists").value["stock"].clone();
        anyhow::ensure!(stock.as_i64() >= Some(n), "{} cannot sell {n}", site.site());
        site.apply_ops(
            &sku,
            &ops(json!([{"op": "inc", "path": "/stock", "by": -n}]))?,
            Some("sale"),
        )?;
        Ok(())
    };
    sell(&west, 2)?;
    sell(&east, 1)?;

    println!("3. partition heals, the regions exchange changes");
    exchange(&sites, &sku)?;
    for site in sites {
        for c in site.conflicts(&Filter::default())? {
            let by = c.resolved_by.as_ref().map(|s| s.to_string());
            println!(
                "   at {}: {} {} on {}, merged stock {}: {:?} by {}, how {:?}, note {:?}",
                site.site(),
                c.kind.as_str(),
                c.id,
                c.path,
                c.provisional,
                c.status,
                by.unwrap_or_default(),
                c.resolution.unwrap_or_default(),
                c.note.unwrap_or_default(),
            );
            for v in &c.values {
                let site = v.site.as_ref().map(|s| s.to_string());
                println!(
                    "     {} alone had stock {}",
                    site.unwrap_or_default(),
                    v.value
                );
            }
        }
        let value = site.read_json(&sku, None)?.expect("exists").value;
        println!("   at {}: {value}", site.site());
    }

    println!("4. more exchange rounds, and resolve_pending() at every site");
    for _ in 0..3 {
        exchange(&sites, &sku)?;
    }
    for site in sites {
        let closed = site.resolve_pending()?;
        println!("   resolve_pending at {}: {closed} closed", site.site());
        anyhow::ensure!(closed == 0, "compensation ran again at {}", site.site());
    }
    exchange(&sites, &sku)?;

    let reports = east.conflicts(&Filter::default())?;
    anyhow::ensure!(reports.len() == 1, "expected one report: {reports:#?}");
    let report = &reports[0];
    anyhow::ensure!(west.conflicts(&Filter::default())? == reports);
    assert_eq!(report.kind, Kind::Invariant);
    assert_eq!(report.rule.as_deref(), Some("stock-non-negative"));
    assert_eq!(report.provisional, json!(-1));
    assert_eq!(report.status, Status::Resolved);
    assert_eq!(report.resolved_by, Some("us-east".parse()?));
    assert_eq!(report.resolution.as_deref(), Some("backorder"));
    for site in sites {
        let value = site.read_json(&sku, None)?.expect("exists").value;
        println!("   at {}: {value}", site.site());
        assert_eq!(value["stock"], json!(0));
        assert_eq!(value["backorders"], json!({report.id.as_str(): 1}));
    }
    println!("ok: one report, resolved once by us-east, stock 0 and one backorder everywhere");
    Ok(())
}
