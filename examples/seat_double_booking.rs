//! Flight seats: two booking sites try to sell seat 12A of the same flight
//! to two different passengers at the same moment, cut off from each
//! other. Each seat is a bounded counter of 1 (min 0) whose one right sits
//! with the site selling it, and a booking is one transaction that takes
//! the seat and writes the booking document. The site holding 12A's right
//! books it; the other site is refused at once (`insufficient_rights`) and
//! nothing of its booking is applied, so it books another seat. After the
//! sites exchange changes no seat has two passengers and no conflict is
//! reported: the double booking was prevented, not repaired.
//!
//! Run: `cargo run --example seat_double_booking`

use std::sync::Arc;

use archipelago::doc::Op;
use archipelago::escrow::PoolKind;
use archipelago::store::Sqlite;
use archipelago::txn::{Precondition, Txn, TxnDoc};
use archipelago::{DocId, Error, Origin, Replica, ReplicaOptions};
use serde_json::json;

/// Ships every change each site has of `docs` to the others until all
/// hold the same heads (`sync-node` does this over QUIC; here it is done by
/// hand). A transaction's changes wait at the receiver until all its
/// documents arrived, so they travel together.
fn exchange(sites: &[&Replica], docs: &[&DocId]) -> anyhow::Result<()> {
    for _ in 0..6 {
        for from in sites {
            for doc in docs {
                let Some(changes) = from.changes_after(doc, &[])? else {
                    continue;
                };
                for to in sites.iter().filter(|to| to.site() != from.site()) {
                    to.apply_changes(doc, &changes, Origin::Peer(from.site().clone()))?;
                }
            }
        }
        if docs
            .iter()
            .all(|doc| sites.windows(2).all(|w| w[0].heads(doc) == w[1].heads(doc)))
        {
            return Ok(());
        }
    }
    anyhow::bail!("sites did not converge on {docs:?}")
}

fn ops(value: serde_json::Value) -> anyhow::Result<Vec<Op>> {
    Ok(serde_json::from_value(value)?)
}

/// Books `seat` for `passenger` at `site`: one transaction taking the seat
/// and creating the booking document.
fn book(site: &Replica, flight: &DocId, seat: &str, passenger: &str) -> Result<DocId, Error> {
    let booking: DocId = format!("bookings/{}", passenger.to_lowercase().replace(' ', "-"))
        .parse()
        .expect("a valid id");
    let txn = Txn {
        docs: vec![
            TxnDoc {
                id: flight.clone(),
                ops: ops(json!([{"op": "inc", "path": format!("/seats/{seat}"), "by": -1}]))
                    .expect("valid ops"),
                precondition: Precondition::none(),
            },
            TxnDoc {
                id: booking.clone(),
                ops: ops(json!([
                    {"op": "set", "path": "/passenger", "value": passenger},
                    {"op": "set", "path": "/flight", "value": flight.as_str()},
                    {"op": "set", "path": "/seat", "value": seat},
                ]))
                .expect("valid ops"),
                precondition: Precondition {
                    if_absent: true,
                    ..Precondition::default()
                },
            },
        ],
        message: Some(format!("book {seat}")),
    };
    site.commit_txn(&txn).map(|_| booking)
}

/// Free seats at `site`: each seat's counter (1 free, 0 taken).
fn seats(site: &Replica, flight: &DocId) -> anyhow::Result<serde_json::Value> {
    Ok(site.read_json(flight, None)?.expect("exists").value["seats"].clone())
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let open = |site: &str| -> anyhow::Result<Replica> {
        let store = Sqlite::open(dir.path().join(format!("{site}.db")))?;
        Ok(Replica::open(
            ReplicaOptions::new(site.parse()?),
            Arc::new(store),
        )?)
    };
    let paris = open("eu-west")?;
    let boston = open("us-east")?;
    let sites = [&paris, &boston];
    let flight: DocId = "flights/AF-334-2025-06-01".parse()?;

    // All seats are created at one site, in one map, before the document is
    // shared (maps created concurrently at two sites would hide each other).
    let mut create = vec![
        json!({"op": "set", "path": "/route", "value": "CDG-BOS"}),
        json!({"op": "set", "path": "/seats", "value": {}}),
    ];
    for seat in ["12A", "12B", "14C", "14D"] {
        create.push(json!({"op": "set", "path": format!("/seats/{seat}"), "value": 1, "as": "bounded", "min": 0}));
    }
    paris.apply_ops(
        &flight,
        &ops(json!(create))?,
        Some("open flight for booking"),
    )?;
    for seat in ["12B", "14D"] {
        paris.escrow_transfer(
            &flight,
            &format!("/seats/{seat}"),
            PoolKind::Down,
            boston.site(),
            1,
            Some("seats sold from Boston"),
        )?;
    }
    exchange(&sites, &[&flight])?;
    println!("1. flight {flight} open: Paris sells 12A and 14C, Boston 12B and 14D");
    println!("   seats (1 = free): {}", seats(&paris, &flight)?);

    println!("2. cut off from each other, both sites try to book 12A");
    let camille = book(&paris, &flight, "12A", "Camille Martin")?;
    println!("   at eu-west: 12A booked for Camille Martin ({camille})");
    let flight_heads = boston.heads(&flight);
    let refused = book(&boston, &flight, "12A", "Jordan Smith");
    match &refused {
        Err(Error::TxnOp { doc, source }) if source.code() == "insufficient_rights" => {
            println!(
                "   at us-east: refused, {} in {doc}: {source}",
                source.code()
            );
        }
        other => anyhow::bail!("Boston's booking of 12A was not refused: {other:?}"),
    }
    let jordan: DocId = "bookings/jordan-smith".parse()?;
    assert!(
        boston.heads(&jordan).is_none() && boston.heads(&flight) == flight_heads,
        "nothing of the refused booking applied"
    );
    let jordan = book(&boston, &flight, "12B", "Jordan Smith")?;
    println!("   at us-east: Jordan Smith takes 12B instead ({jordan})");

    println!("3. the sites exchange changes");
    exchange(&sites, &[&flight, &camille, &jordan])?;
    for site in sites {
        let seats = seats(site, &flight)?;
        println!("   at {}: seats {seats}, no conflict report", site.site());
        assert_eq!(seats, json!({"12A": 0, "12B": 0, "14C": 1, "14D": 1}));
        assert!(site.conflicts(&Default::default())?.is_empty());
        let counters = site.escrow_list(&flight)?;
        assert_eq!(counters.len(), 4, "every seat is a bounded counter");
        for (pointer, seat) in counters {
            assert!(seat.value >= seat.min, "{pointer} below 0");
        }
        let mut booked = Vec::new();
        for booking in [&camille, &jordan] {
            let view = site.read_json(booking, None)?.expect("replicated");
            booked.push(view.value["seat"].clone());
        }
        assert_eq!(booked, [json!("12A"), json!("12B")], "each seat sold once");
    }
    println!("ok: every seat sold once, the double booking prevented rather than reported");
    Ok(())
}
