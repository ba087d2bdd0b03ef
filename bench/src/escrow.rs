//! `escrow`: what bounded counters cost, each figure from one run:
//!
//! - `local_ratio`: a durable decrement of a bounded counter with local
//!   rights over a durable `inc` of a plain counter, both through
//!   `Replica::apply_ops` on one replica over SQLite (WAL,
//!   `synchronous=FULL`), one at a time, the kinds taking turns; medians.
//! - `transfer_p50_ms`: two sites over QUIC through a relay adding 25 ms
//!   each way; B holds no rights, A holds them all and grants on demand.
//!   Each measured op is a decrement at B through `Replica::with_rights`:
//!   B asks A, A commits the grant, it replicates back, B commits. p50 from
//!   the call to its success (one round trip plus the commits).
//! - `served_locally_fraction`: three sites over QUIC on 127.0.0.1, a
//!   counter split evenly, low-water mark 20 and proportional grants at
//!   every site; 80% of the decrements at one site, 10% at each other, one
//!   every 2 ms; the fraction served with the site's own rights at once
//!   (the rest waited for a grant).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use archipelago::doc::Op;
use archipelago::escrow::{EscrowConfig, GrantPolicy, Policy, PoolKind};
use archipelago::store::Sqlite;
use archipelago::transport::quic::SyncEndpoint;
use archipelago::transport::relay::{Faults, Relay};
use archipelago::transport::tls::CertificateAuthority;
use archipelago::{DocId, Replica, ReplicaOptions, SiteName};
use serde_json::{json, Map, Value};

use crate::scenarios::metrics;
use crate::versus::{percentile, runtime, until_same, WAIT_MAX};

/// One-way delay of the relay in the transfer part.
const TRANSFER_DELAY: Duration = Duration::from_millis(25);

/// `escrow`: the three parts in turn, smaller with `quick`.
pub(crate) fn escrow(quick: bool) -> anyhow::Result<Map<String, Value>> {
    eprintln!(
        "  reproduce: cargo run --release -p bench --{} --only escrow",
        if quick { " --quick" } else { "" }
    );
    let (local_reps, transfers, demand) = if quick {
        (300, 20, 1_500)
    } else {
        (2_000, 100, 5_000)
    };
    let mut out = local_ratio(local_reps)?;
    out.extend(runtime()?.block_on(transfer(transfers))?);
    out.extend(runtime()?.block_on(served_locally(demand))?);
    Ok(out)
}

fn ops(value: Value) -> anyhow::Result<Vec<Op>> {
    Ok(serde_json::from_value(value)?)
}

fn open(dir: &std::path::Path, name: &str, policy: Policy) -> anyhow::Result<Replica> {
    let store = Sqlite::open(dir.join(format!("{name}.db")))?;
    let mut options = ReplicaOptions::new(name.parse()?);
    options.escrow = Arc::new(EscrowConfig {
        rules: Vec::new(),
        default: policy,
    });
    Ok(Replica::open(options, Arc::new(store))?)
}

fn median_ms(times: &mut [Duration]) -> f64 {
    times.sort();
    percentile(times, 0.5)
}

/// `local_ratio`: bounded decrement with local rights over plain `inc`.
fn local_ratio(reps: usize) -> anyhow::Result<Map<String, Value>> {
    let dir = tempfile::tempdir()?;
    let replica = open(dir.path(), "site-a", Policy::default())?;
    let (bounded, plain): (DocId, DocId) = ("bench/bounded".parse()?, "bench/plain".parse()?);
    replica.apply_ops(
        &bounded,
        &ops(json!([{"op": "set", "path": "/stock", "value": 1_000_000_000i64, "as": "bounded", "min": 0}]))?,
        None,
    )?;
    replica.apply_ops(
        &plain,
        &ops(json!([{"op": "set", "path": "/stock", "value": 1_000_000_000i64, "as": "counter"}]))?,
        None,
    )?;
    let dec = ops(json!([{"op": "inc", "path": "/stock", "by": -1}]))?;
    let (mut with_rights, mut plain_times) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for rep in 0..reps + reps / 10 {
        // Swap which kind goes first every round.
        let order = if rep % 2 == 0 {
            [&bounded, &plain]
        } else {
            [&plain, &bounded]
        };
        for doc in order {
            let started = Instant::now();
            replica.apply_ops(doc, &dec, None)?;
            let took = started.elapsed();
            if rep >= reps / 10 {
                if doc == &bounded {
                    with_rights.push(took);
                } else {
                    plain_times.push(took);
                }
            }
        }
    }
    let (b, p) = (median_ms(&mut with_rights), median_ms(&mut plain_times));
    eprintln!(
        "  durable decrement, one at a time ({reps} of each, medians): bounded with local rights {b:.3} ms, plain counter {p:.3} ms; ratio {:.3} (target <= 1.1)",
        b / p
    );
    Ok(metrics(&[
        ("local_reps", json!(reps)),
        ("local_bounded_ms", json!(b)),
        ("local_plain_ms", json!(p)),
        ("local_ratio", json!(b / p)),
    ]))
}

/// Sync endpoints for `replicas` (sorted by site name), each listing the
/// others; a site dials the peers whose names sort after its own, so they
/// are bound from the last. `through` puts a relay with those faults in
/// front of every accepting endpoint.
struct Mesh {
    endpoints: Vec<SyncEndpoint>,
    relays: Vec<Relay>,
}

impl Mesh {
    async fn connect(replicas: &[Replica], through: Option<Faults>) -> anyhow::Result<Mesh> {
        let ca = CertificateAuthority::generate("bench escrow")?;
        let nowhere: SocketAddr = "127.0.0.1:9".parse()?;
        let mut addrs: Vec<SocketAddr> = vec![nowhere; replicas.len()];
        let mut endpoints = Vec::new();
        let mut relays = Vec::new();
        for i in (0..replicas.len()).rev() {
            let peers: Vec<(SiteName, SocketAddr)> = (0..replicas.len())
                .filter(|&j| j != i)
                .map(|j| (replicas[j].site().clone(), addrs[j]))
                .collect();
            let endpoint = SyncEndpoint::bind(
                "127.0.0.1:0".parse()?,
                ca.issue_site(replicas[i].site())?,
                ca.cert_der(),
                peers,
                replicas[i].clone(),
            )?;
            addrs[i] = match &through {
                Some(faults) => {
                    let relay = Relay::start(endpoint.local_addr()?, faults.clone()).await?;
                    let addr = relay.local_addr();
                    relays.push(relay);
                    addr
                }
                None => endpoint.local_addr()?,
            };
            endpoints.push(endpoint);
        }
        let started = Instant::now();
        while !endpoints.iter().all(|e| {
            let peers = e.peer_status();
            peers.len() == replicas.len() - 1 && peers.iter().all(|p| p.connected)
        }) {
            anyhow::ensure!(started.elapsed() < WAIT_MAX, "sites did not connect");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(Mesh { endpoints, relays })
    }

    async fn close(self) {
        for endpoint in self.endpoints {
            endpoint.shutdown().await;
        }
        for relay in self.relays {
            relay.stop().await;
        }
    }
}

/// Waits until `replica` sees `site` holding `rights` of the counter.
async fn until_rights(
    replica: &Replica,
    doc: &DocId,
    site: &str,
    rights: i64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let site: SiteName = site.parse()?;
    loop {
        let held = replica
            .escrow(doc, "/stock")?
            .map(|state| state.rights(&site));
        if held == Some(rights) {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < WAIT_MAX,
            "rights did not arrive: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `transfer_p50_ms`: a decrement at a site without rights, served by a
/// grant across a 25 ms link.
async fn transfer(reps: usize) -> anyhow::Result<Map<String, Value>> {
    let dir = tempfile::tempdir()?;
    let on_demand = Policy {
        low_water: 0,
        rebalance: GrantPolicy::OnDemand,
        wait: Duration::from_secs(5),
    };
    let a = open(dir.path(), "site-a", on_demand)?;
    let b = open(dir.path(), "site-b", on_demand)?;
    let doc: DocId = "bench/stock".parse()?;
    a.apply_ops(
        &doc,
        &ops(
            json!([{"op": "set", "path": "/stock", "value": 1_000_000, "as": "bounded", "min": 0}]),
        )?,
        None,
    )?;
    let faults = Faults {
        delay: TRANSFER_DELAY,
        ..Faults::default()
    };
    let replicas = [a.clone(), b.clone()];
    let mesh = Mesh::connect(&replicas, Some(faults)).await?;
    until_same(&a, &b, std::slice::from_ref(&doc), Duration::from_millis(2)).await?;
    let dec = ops(json!([{"op": "inc", "path": "/stock", "by": -1}]))?;
    let mut times = Vec::with_capacity(reps);
    for rep in 0..reps + 2 {
        let (b2, d2, dec2) = (b.clone(), doc.clone(), dec.clone());
        let started = Instant::now();
        tokio::task::spawn_blocking(move || {
            b2.with_rights(&d2, Some(Duration::from_secs(5)), || {
                b2.apply_ops(&d2, &dec2, None)
            })
        })
        .await??;
        let took = started.elapsed();
        // The first two warm the path up (documents loaded, congestion window).
        if rep >= 2 {
            times.push(took);
        }
        anyhow::ensure!(
            b.escrow(&doc, "/stock")?
                .is_some_and(|s| s.rights(b.site()) == 0),
            "B kept rights"
        );
    }
    let stats = b.escrow_stats();
    mesh.close().await;
    times.sort();
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
    eprintln!(
        "  transfer: decrement at a site without rights, {} ms each way ({reps} ops): p50 {p50:.1} ms, p99 {p99:.1} ms (target p50 <= 60); B asked {} times, served after a transfer {}",
        TRANSFER_DELAY.as_millis(),
        stats.asked,
        stats.served_after_transfer
    );
    Ok(metrics(&[
        ("transfer_reps", json!(reps)),
        (
            "transfer_delay_ms",
            json!(TRANSFER_DELAY.as_millis() as u64),
        ),
        ("transfer_p50_ms", json!(p50)),
        ("transfer_p99_ms", json!(p99)),
    ]))
}

/// `served_locally_fraction`: skewed demand over three sites with
/// proportional rebalancing.
async fn served_locally(ops_total: usize) -> anyhow::Result<Map<String, Value>> {
    const STOCK: i64 = 30_000;
    const LOW_WATER: i64 = 20;
    const EVERY: Duration = Duration::from_millis(2);
    let dir = tempfile::tempdir()?;
    let policy = Policy {
        low_water: LOW_WATER,
        rebalance: GrantPolicy::Proportional,
        wait: Duration::from_secs(2),
    };
    let names = ["site-a", "site-b", "site-c"];
    let replicas: Vec<Replica> = names
        .iter()
        .map(|n| open(dir.path(), n, policy))
        .collect::<anyhow::Result<_>>()?;
    let doc: DocId = "bench/stock".parse()?;
    // Split evenly, each site half the demand: the busy site, with 80% of
    // it, must be refilled by the others.
    let share = (ops_total as i64 / 2).min(STOCK / 3);
    replicas[0].apply_ops(
        &doc,
        &ops(
            json!([{"op": "set", "path": "/stock", "value": share * 3, "as": "bounded", "min": 0}]),
        )?,
        None,
    )?;
    for to in &replicas[1..] {
        replicas[0].escrow_transfer(&doc, "/stock", PoolKind::Down, to.site(), share, None)?;
    }
    let mesh = Mesh::connect(&replicas, None).await?;
    for r in &replicas[1..] {
        until_rights(r, &doc, names[2], share).await?;
        until_rights(r, &doc, names[1], share).await?;
    }
    let before: Vec<_> = replicas.iter().map(Replica::escrow_stats).collect();
    let dec = ops(json!([{"op": "inc", "path": "/stock", "by": -1}]))?;
    let (rs, d) = (replicas.clone(), doc.clone());
    let refused = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
        let mut refused = 0;
        let started = Instant::now();
        for i in 0..ops_total {
            // 8 of every 10 at site-a, one each at b and c.
            let site = match i % 10 {
                0..=7 => 0,
                8 => 1,
                _ => 2,
            };
            let r = &rs[site];
            match r.with_rights(&d, Some(Duration::from_secs(2)), || {
                r.apply_ops(&d, &dec, None)
            }) {
                Ok(_) => {}
                Err(archipelago::Error::Op(op)) if op.code() == "insufficient_rights" => {
                    refused += 1
                }
                Err(e) => return Err(e.into()),
            }
            let due = EVERY * (i as u32 + 1);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(refused)
    })
    .await??;
    let after: Vec<_> = replicas.iter().map(Replica::escrow_stats).collect();
    mesh.close().await;
    let mut local = 0;
    let mut transferred = 0;
    let grants: u64 = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.granted - b.granted)
        .sum();
    let mut per_site = Vec::new();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let l = a.served_locally - b.served_locally;
        let t = a.served_after_transfer - b.served_after_transfer;
        local += l;
        transferred += t;
        per_site.push(format!("{} {l} local / {t} after a grant", names[i]));
    }
    let fraction = local as f64 / (local + transferred).max(1) as f64;
    eprintln!(
        "  skewed demand: {ops_total} decrements, one every {} ms, 80% at site-a, rights {share} per site, low water {LOW_WATER}, proportional: {}; {grants} grants ahead of demand or on request; served locally {fraction:.4} (target >= 0.95), {refused} refused",
        EVERY.as_millis(),
        per_site.join(", ")
    );
    Ok(metrics(&[
        ("demand_ops", json!(ops_total)),
        ("demand_refused", json!(refused)),
        ("demand_grants", json!(grants)),
        ("served_after_transfer", json!(transferred)),
        ("served_locally_fraction", json!(fraction)),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_measures_every_part() {
        let local = local_ratio(10).unwrap();
        assert!(local["local_ratio"].as_f64().unwrap() > 0.0);
        let transfers = runtime().unwrap().block_on(transfer(2)).unwrap();
        // One round trip over the 25 ms link at least.
        assert!(transfers["transfer_p50_ms"].as_f64().unwrap() >= 50.0);
        let served = runtime().unwrap().block_on(served_locally(300)).unwrap();
        assert_eq!(served["demand_refused"], 0);
    }
}
