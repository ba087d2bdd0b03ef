//! Multi-region inventory without oversell: the story of
//! `inventory_oversell`, but the stock is a bounded counter (min 0). The
//! ten units are split into rights held by three regions; during a
//! partition each region sells exactly what its rights allow and its next
//! sale is refused at once, with nothing applied. After healing the stock
//! is 0 everywhere, never below, and no conflict report is raised: the
//! oversell was prevented, not compensated. Then a region without rights
//! sells once more: it asks the region that still holds some (after a
//! restock), waits for the grant, and the sale goes through.
//!
//! Run: `cargo run --example bounded_stock`

use std::sync::Arc;
use std::time::Duration;

use archipelago::doc::{Op, OpError};
use archipelago::escrow::PoolKind;
use archipelago::store::Sqlite;
use archipelago::{DocId, Error, Origin, Replica, ReplicaOptions};
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

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let open = |site: &str| -> anyhow::Result<Replica> {
        let store = Sqlite::open(dir.path().join(format!("{site}.db")))?;
        Ok(Replica::open(
            ReplicaOptions::new(site.parse()?),
            Arc::new(store),
        )?)
    };
    let (east, west, south) = (open("us-east")?, open("eu-west")?, open("ap-south")?);
    let sites = [&east, &west, &south];
    let sku: DocId = "inventory/sku-1".parse()?;

    east.apply_ops(
        &sku,
        &ops(json!([
            {"op": "set", "path": "/stock", "value": 10, "as": "bounded", "min": 0},
            {"op": "set", "path": "/name", "value": "desk lamp"},
        ]))?,
        Some("receive 10 desk lamps"),
    )?;
    for (to, amount) in [(&west, 3), (&south, 3)] {
        east.escrow_transfer(&sku, "/stock", PoolKind::Down, to.site(), amount, None)?;
    }
    exchange(&sites, &sku)?;
    let state = east.escrow(&sku, "/stock")?.expect("a bounded counter");
    println!(
        "us-east received 10 desk lamps as a bounded counter and split the rights: {:?}",
        state.rights_all()
    );

    println!("partition: the regions cannot talk");
    let sell = ops(json!([{"op": "inc", "path": "/stock", "by": -1}]))?;
    let mut sold_total = 0;
    for site in sites {
        let mut sold = 0;
        let refusal = loop {
            let heads = site.heads(&sku);
            match site.apply_ops(&sku, &sell, Some("sell 1")) {
                Ok(_) => sold += 1,
                Err(Error::Op(op)) => {
                    assert_eq!(site.heads(&sku), heads, "a refused sale applies nothing");
                    break *op;
                }
                Err(e) => return Err(e.into()),
            }
            assert!(sold <= 10, "{} sold more than there was", site.site());
        };
        let OpError::InsufficientRights {
            available_here,
            available_total,
            ..
        } = &refusal
        else {
            anyhow::bail!("unexpected refusal: {refusal}");
        };
        assert_eq!(*available_here, 0);
        println!(
            "  {:<8} sells {sold}, then its next sale is refused: {} \
             ({available_here} rights here, {available_total} in total as far as it knows)",
            site.site(),
            refusal.code()
        );
        sold_total += sold;
    }
    assert_eq!(sold_total, 10);

    println!("healed: the regions exchange all their changes");
    exchange(&sites, &sku)?;
    for site in sites {
        let view = site.read_json(&sku, None)?.expect("replicated");
        let state = site.escrow(&sku, "/stock")?.expect("a bounded counter");
        assert_eq!(view.value["stock"], json!(state.value));
        assert_eq!(state.value, 0, "the same value everywhere, never below min");
        assert!(state.rights_all().values().all(|n| *n == 0));
        assert!(site.conflicts(&Default::default())?.is_empty());
        println!(
            "  {:<8} sees stock {}, no conflict report, rights {:?}",
            site.site(),
            state.value,
            state.rights_all()
        );
    }

    // us-east restocks 4 (the rights are its own); eu-west, with none, sells
    // one: it asks the holder and waits, while a stand-in for the sync
    // connection delivers the request and the grant.
    east.apply_ops(
        &sku,
        &ops(json!([{"op": "inc", "path": "/stock", "by": 4}]))?,
        Some("restock 4"),
    )?;
    exchange(&sites, &sku)?;
    let state = west.escrow(&sku, "/stock")?.expect("a bounded counter");
    println!(
        "us-east restocks 4 and holds their rights: {:?}",
        state.rights_all()
    );
    assert_eq!(state.rights(west.site()), 0);
    let mut wanted = west.subscribe_rights_wanted();
    let (holder, asker, doc) = (east.clone(), west.clone(), sku.clone());
    let connection = std::thread::spawn(move || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        runtime.block_on(async {
            let want = tokio::time::timeout(Duration::from_secs(5), wanted.recv()).await??;
            assert_eq!(want.ask.as_ref(), Some(holder.site()), "asks the holder");
            println!(
                "  eu-west asks {} for {} right(s) of {}",
                want.ask
                    .as_ref()
                    .map_or("every peer".to_owned(), |s| s.to_string()),
                want.amount,
                want.pointer
            );
            holder
                .grant_rights(&doc, &want.pointer, want.pool, asker.site(), want.amount)?
                .expect("us-east has rights to spare");
            println!("  us-east grants, and its change is shipped to eu-west");
            exchange(&[&holder, &asker], &doc)?;
            anyhow::Ok(())
        })
    });
    println!("eu-west, with no rights, sells one and waits up to 5 s for a grant");
    let sold = west.with_rights(&sku, Some(Duration::from_secs(5)), || {
        west.apply_ops(&sku, &sell, Some("sell 1"))
    });
    connection.join().expect("the stand-in connection")?;
    sold?;
    assert_eq!(west.escrow_stats().served_after_transfer, 1);
    exchange(&sites, &sku)?;
    for site in sites {
        let state = site.escrow(&sku, "/stock")?.expect("a bounded counter");
        assert_eq!(state.value, 3);
        assert!(site.conflicts(&Default::default())?.is_empty());
    }
    let state = west.escrow(&sku, "/stock")?.expect("a bounded counter");
    println!(
        "  eu-west sold one once the grant arrived; stock {} everywhere, rights {:?}",
        state.value,
        state.rights_all()
    );
    println!("ok: 10 sold during the partition and no more, no report, stock never below 0");
    Ok(())
}
