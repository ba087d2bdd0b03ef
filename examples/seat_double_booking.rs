//! Flight seats: two booking sites sell seat 12A of the same flight to two
//! different passengers at the same moment. Each booking is a new entry, so
//! the CRDT merge keeps both without complaint, and the flight now has two
//! passengers in one seat. The rule `one-passenger-per-seat` reports it at
//! both sites with the same id; its policy is manual, so a gate agent at
//! one site resolves it by moving one passenger to 12B, and the move and
//! the closing of the report replicate together.
//!
//! Run: `cargo run --example seat_double_booking`

use std::sync::Arc;

use archipelago::conflict::{Check, Conflict, ConflictConfig, Filter, Kind, Rule, Status};
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

/// "SEAT passenger" for every booking, sorted.
fn seats(site: &Replica, flight: &DocId) -> anyhow::Result<Vec<String>> {
    let doc = site.read_json(flight, None)?.expect("exists").value;
    let bookings = doc["bookings"].as_object().cloned().unwrap_or_default();
    let mut seats: Vec<String> = bookings
        .values()
        .map(|b| {
            format!(
                "{} {}",
                b["seat"].as_str().unwrap_or("?"),
                b["passenger"].as_str().unwrap_or("?")
            )
        })
        .collect();
    seats.sort();
    Ok(seats)
}

fn status(c: &Conflict) -> String {
    let rule = c.rule.as_deref().unwrap_or("-");
    let mut line = format!(
        "{} {} {rule} {}: {:?}",
        c.kind.as_str(),
        c.id,
        c.path,
        c.status
    );
    if let Some(by) = &c.resolved_by {
        line += &format!(" by {by}, note {:?}", c.note.as_deref().unwrap_or(""));
    }
    line
}

fn main() -> anyhow::Result<()> {
    let rule = Rule::new(
        "one-passenger-per-seat",
        "flights/*",
        "/bookings",
        Check::Unique("seat".into()),
    )?;
    let config = Arc::new(ConflictConfig::default().with_rule(rule)?);

    let dir = tempfile::tempdir()?;
    let open = |site: &str| -> anyhow::Result<Replica> {
        let mut options = ReplicaOptions::new(site.parse()?);
        options.conflicts = config.clone();
        let store = Sqlite::open(dir.path().join(format!("{site}.db")))?;
        Ok(Replica::open(options, Arc::new(store))?)
    };
    let paris = open("eu-west")?;
    let boston = open("us-east")?;
    let sites = [&paris, &boston];
    let flight: DocId = "flights/AF-334-2025-06-01".parse()?;

    paris.apply_ops(
        &flight,
        &ops(json!([
            {"op": "set", "path": "/route", "value": "CDG-BOS"},
            {"op": "set", "path": "/bookings", "value": {}},
        ]))?,
        Some("open flight for booking"),
    )?;
    exchange(&sites, &flight)?;
    println!("1. flight {flight} open for booking at both sites");

    println!("2. at the same moment, each site books seat 12A");
    paris.apply_ops(
        &flight,
        &ops(json!([{"op": "set", "path": "/bookings/bk-paris-1",
                     "value": {"passenger": "Camille Martin", "seat": "12A"}}]))?,
        Some("book 12A"),
    )?;
    boston.apply_ops(
        &flight,
        &ops(json!([{"op": "set", "path": "/bookings/bk-boston-1",
                     "value": {"passenger": "Jordan Smith", "seat": "12A"}}]))?,
        Some("book 12A"),
    )?;

    println!("3. the sites exchange changes");
    exchange(&sites, &flight)?;
    let open_only = Filter {
        status: Some(Status::Open),
        ..Filter::default()
    };
    let mut open_reports = Vec::new();
    for site in sites {
        let reports = site.conflicts(&open_only)?;
        for c in &reports {
            println!("   at {}: {}", site.site(), status(c));
        }
        println!("   at {}: seats {:?}", site.site(), seats(site, &flight)?);
        open_reports.push(reports);
    }
    anyhow::ensure!(open_reports[0].len() == 1, "{:#?}", open_reports[0]);
    anyhow::ensure!(open_reports[0] == open_reports[1], "sites disagree");
    let report = open_reports[0][0].clone();
    assert_eq!(report.kind, Kind::Invariant);
    assert_eq!(report.rule.as_deref(), Some("one-passenger-per-seat"));

    println!("4. a gate agent in Boston moves Jordan Smith to 12B");
    let resolved = boston.resolve_conflict(
        &report.id,
        &ops(json!([{"op": "set", "path": "/bookings/bk-boston-1/seat", "value": "12B"}]))?,
        Some("moved to 12B"),
    )?;
    println!("   at us-east: {}", status(&resolved));

    println!("5. the sites exchange changes again");
    exchange(&sites, &flight)?;
    for site in sites {
        let seen = site.conflict(&report.id)?.expect("known at every site");
        println!("   at {}: {}", site.site(), status(&seen));
        println!("   at {}: seats {:?}", site.site(), seats(site, &flight)?);
        assert_eq!(seen, resolved);
        assert_eq!(
            seats(site, &flight)?,
            ["12A Camille Martin", "12B Jordan Smith"]
        );
        assert!(site.conflicts(&open_only)?.is_empty());
    }
    assert_eq!(resolved.status, Status::Resolved);
    assert_eq!(resolved.resolved_by, Some("us-east".parse()?));
    println!("ok: one report at both sites, resolved once, every seat has one passenger");
    Ok(())
}
