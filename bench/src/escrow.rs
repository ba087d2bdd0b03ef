//! `escrow`: what bounded counters cost, each figure measured in one run:
//!
//! - `local_ratio`: a durable decrement of a bounded counter with local
//!   rights over a durable `inc` of a plain counter, both through
//!   `Replica::apply_ops` on one replica over SQLite (WAL,
//!   `synchronous=FULL`), one at a time, the kinds taking turns; medians.
//! - `transfer_p50_ms`: two sites over QUIC through a relay adding 25 ms
//!   each way; B holds no rights, A holds them all and grants on demand
//!   (exactly what is asked). Each measured op is a decrement at B through
//!   `Replica::with_rights`: B asks A, A commits the grant, it replicates
//!   back, B commits, so B holds no rights again. p50 from the call to its
//!   success. Between two ops the sites settle (same heads), so an op does
//!   not also wait for A to apply the previous one.
//! - `served_locally_fraction`: three sites over QUIC on 127.0.0.1, a
//!   counter of 1.2 rights per op split evenly, low-water mark 20 and
//!   proportional grants at every site; 80% of the decrements at one site,
//!   10% at each other, on a schedule of one every 2 ms (each site's ops
//!   from a thread of its own, as that site's clients); the fraction of
//!   ops served with the site's own rights at once (the rest waited for a
//!   grant), from `Replica::escrow_stats`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use archipelago::doc::Op;
use archipelago::escrow::{EscrowConfig, GrantPolicy, Policy, PoolKind};
use archipelago::store::Sqlite;
use archipelago::transport::quic::SyncEndpoint;
use archipelago::transport::relay::{Faults, Relay};
use archipelago::transport::tls::CertificateAuthority;
use archipelago::{DocId, Origin, Replica, ReplicaOptions, SiteName};
use serde_json::{json, Map, Value};

use crate::scenarios::metrics;
use crate::versus::{percentile, runtime};

/// One-way delay of the relay in the transfer part.
const TRANSFER_DELAY: Duration = Duration::from_millis(25);

/// Longest wait of an op for a grant.
const OP_WAIT: Duration = Duration::from_secs(2);

/// Longest wait for sites to connect or to agree, and longest run of the
/// transfer and demand loops.
const PART_TIME_MAX: Duration = Duration::from_secs(120);

/// Low-water mark of every site in the demand part.
const LOW_WATER: i64 = 20;

/// Time between two ops of the demand schedule.
const DEMAND_EVERY: Duration = Duration::from_millis(2);

/// Sites of the demand part; the first takes 80% of the ops.
const DEMAND_SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

/// How much each part of the scenario does.
struct Sizes {
    /// Ops of each kind timed for `local_ratio`, after a tenth as many
    /// unmeasured ones of each.
    local_reps: usize,
    /// Decrements at B timed for `transfer_p50_ms`, after two unmeasured.
    transfers: usize,
    /// Decrements of the demand part.
    demand_ops: usize,
}

/// `escrow`: the three parts in turn, with the sizes of `quick` or full
/// mode.
pub(crate) fn escrow(quick: bool) -> anyhow::Result<Map<String, Value>> {
    eprintln!(
        "  reproduce: cargo run --release -p bench --{} --only escrow",
        if quick { " --quick" } else { "" }
    );
    let sizes = if quick {
        Sizes {
            local_reps: 300,
            transfers: 30,
            demand_ops: 1_000,
        }
    } else {
        Sizes {
            local_reps: 2_000,
            transfers: 200,
            demand_ops: 2_500,
        }
    };
    measure(&sizes)
}

/// Runs the three parts with `sizes`; the metrics of all three.
fn measure(sizes: &Sizes) -> anyhow::Result<Map<String, Value>> {
    let mut out = local_ratio(sizes.local_reps)?;
    out.extend(runtime()?.block_on(transfer(sizes.transfers))?);
    out.extend(runtime()?.block_on(served_locally(sizes.demand_ops))?);
    Ok(out)
}

fn ops(value: Value) -> anyhow::Result<Vec<Op>> {
    Ok(serde_json::from_value(value)?)
}

/// Decrement of the counter every part uses.
fn decrement() -> anyhow::Result<Vec<Op>> {
    ops(json!([{"op": "inc", "path": "/stock", "by": -1}]))
}

/// A bounded counter at `/stock` holding `value`, all rights here.
fn create_bounded(replica: &Replica, doc: &DocId, value: i64) -> anyhow::Result<()> {
    replica.apply_ops(
        doc,
        &ops(json!([{"op": "set", "path": "/stock", "value": value, "as": "bounded", "min": 0}]))?,
        None,
    )?;
    Ok(())
}

/// A replica of site `name` over SQLite (WAL, `synchronous=FULL`) in
/// `dir`, with `policy` for every bounded counter.
fn open(dir: &std::path::Path, name: &str, policy: Policy) -> anyhow::Result<Replica> {
    let store = Sqlite::open(dir.join(format!("{name}.db")))?;
    let mut options = ReplicaOptions::new(name.parse()?);
    options.escrow = Arc::new(EscrowConfig {
        rules: Vec::new(),
        default: policy,
    });
    Ok(Replica::open(options, Arc::new(store))?)
}

/// Median of `times`, in milliseconds.
fn median_ms(times: &mut [Duration]) -> f64 {
    times.sort();
    percentile(times, 0.5)
}

/// `local_ratio`: the median time of a durable decrement of a bounded
/// counter with local rights over that of a durable `inc` of a plain
/// counter, one replica over SQLite, one call at a time, the kinds taking
/// turns (and swapping which goes first every round).
fn local_ratio(reps: usize) -> anyhow::Result<Map<String, Value>> {
    let dir = tempfile::tempdir()?;
    let replica = open(dir.path(), "site-a", Policy::default())?;
    let (bounded, plain): (DocId, DocId) = ("bench/bounded".parse()?, "bench/plain".parse()?);
    create_bounded(&replica, &bounded, 1_000_000_000)?;
    replica.apply_ops(
        &plain,
        &ops(json!([{"op": "set", "path": "/stock", "value": 1_000_000_000i64, "as": "counter"}]))?,
        None,
    )?;
    let dec = decrement()?;
    let warm_up = reps / 10 + 1;
    let (mut bounded_times, mut plain_times) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for rep in 0..warm_up + reps {
        let order = if rep % 2 == 0 {
            [&bounded, &plain]
        } else {
            [&plain, &bounded]
        };
        for doc in order {
            let started = Instant::now();
            let commit = replica.apply_ops(doc, &dec, None)?;
            let took = started.elapsed();
            anyhow::ensure!(commit.change.is_some(), "a decrement made no change");
            if rep >= warm_up {
                if doc == &bounded {
                    bounded_times.push(took);
                } else {
                    plain_times.push(took);
                }
            }
        }
    }
    let stats = replica.escrow_stats();
    anyhow::ensure!(
        stats.served_locally as usize == warm_up + reps && stats.asked == 0,
        "bounded decrements were not all served locally: {stats:?}"
    );
    // Each counter's history grows by one increment (two for the bounded
    // one: its value and this site's `spent`) per rep, and so does the
    // cost of an op: the ratio of the first and the last tenth show it.
    let tenth = (reps / 10).max(1);
    let window_ratio = |range: std::ops::Range<usize>| {
        let (mut b, mut p) = (
            bounded_times[range.clone()].to_vec(),
            plain_times[range].to_vec(),
        );
        (median_ms(&mut b), median_ms(&mut p))
    };
    let (first_b, first_p) = window_ratio(0..tenth);
    let (last_b, last_p) = window_ratio(reps - tenth..reps);
    let (b, p) = (median_ms(&mut bounded_times), median_ms(&mut plain_times));
    let ratio = b / p;
    eprintln!(
        "  local: durable decrement on SQLite, one at a time, interleaved ({reps} of each, medians): bounded with local rights {b:.3} ms, plain counter inc {p:.3} ms; local_ratio {ratio:.3} (target <= 1.1); first tenth {first_b:.3} / {first_p:.3} ms = {:.3}, last tenth {last_b:.3} / {last_p:.3} ms = {:.3}",
        first_b / first_p,
        last_b / last_p
    );
    Ok(metrics(&[
        ("local_reps", json!(reps)),
        ("local_bounded_ms", json!(b)),
        ("local_plain_ms", json!(p)),
        ("local_ratio", json!(ratio)),
    ]))
}

/// Sync endpoints for `replicas` (sorted by site name), each listing the
/// others, bound on 127.0.0.1; a site dials the peers whose names sort
/// after its own, so they are bound from the last. `through` puts a relay
/// with those faults in front of every accepting endpoint.
struct Mesh {
    endpoints: Vec<SyncEndpoint>,
    relays: Vec<Relay>,
}

impl Mesh {
    async fn connect(replicas: &[Replica], through: Option<Faults>) -> anyhow::Result<Mesh> {
        let ca = CertificateAuthority::generate("bench escrow")?;
        // The first site is dialed by none, so its address is never used.
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
        let mesh = Mesh { endpoints, relays };
        let started = Instant::now();
        while !mesh.endpoints.iter().all(|e| {
            let peers = e.peer_status();
            peers.len() == replicas.len() - 1 && peers.iter().all(|p| p.connected)
        }) {
            if started.elapsed() > PART_TIME_MAX {
                mesh.close().await;
                anyhow::bail!("sites did not connect within {PART_TIME_MAX:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(mesh)
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

/// Waits (polling every `poll`, at most [`PART_TIME_MAX`]) until `check`
/// holds; `what` names it in the error.
async fn until(
    what: &str,
    poll: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while !check()? {
        anyhow::ensure!(
            started.elapsed() < PART_TIME_MAX,
            "{what} did not happen within {PART_TIME_MAX:?}"
        );
        tokio::time::sleep(poll).await;
    }
    Ok(())
}

/// The rights `site` holds of the counter as `replica` sees them.
fn rights(replica: &Replica, doc: &DocId, site: &SiteName) -> anyhow::Result<Option<i64>> {
    Ok(replica
        .escrow(doc, "/stock")?
        .map(|state| state.rights(site)))
}

/// When a replica's feed published a change of the counter's document,
/// and whether it was made there.
type Published = Arc<Mutex<Vec<(Instant, bool)>>>;

/// Records the publications of `doc` on `replica`'s feed until aborted.
fn record_published(replica: &Replica, doc: &DocId) -> (Published, tokio::task::JoinHandle<()>) {
    let published: Published = Arc::default();
    let mut feed = replica.subscribe();
    let (into, doc) = (published.clone(), doc.clone());
    let task = tokio::spawn(async move {
        loop {
            match feed.recv().await {
                Ok(committed) if committed.doc == doc => {
                    let local = committed.origin == Origin::Local;
                    into.lock()
                        .expect("recorder lock")
                        .push((Instant::now(), local));
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        }
    });
    (published, task)
}

/// The first publication in `events` at or after `from` with origin
/// `local`, before `to`.
fn first_between(
    events: &[(Instant, bool)],
    from: Instant,
    to: Instant,
    local: bool,
) -> Option<Instant> {
    events
        .iter()
        .find(|(at, l)| *l == local && *at >= from && *at <= to)
        .map(|(at, _)| *at)
}

/// `transfer_p50_ms`: decrements at a site without rights, each served by
/// a grant across a 25 ms link.
async fn transfer(reps: usize) -> anyhow::Result<Map<String, Value>> {
    let dir = tempfile::tempdir()?;
    let on_demand = Policy {
        low_water: 0,
        rebalance: GrantPolicy::OnDemand,
        wait: OP_WAIT,
    };
    let a = open(dir.path(), "site-a", on_demand)?;
    let b = open(dir.path(), "site-b", on_demand)?;
    let doc: DocId = "bench/stock".parse()?;
    create_bounded(&a, &doc, 1_000_000)?;
    let faults = Faults {
        delay: TRANSFER_DELAY,
        ..Faults::default()
    };
    let mesh = Mesh::connect(&[a.clone(), b.clone()], Some(faults)).await?;
    let result = transfer_reps(&a, &b, &doc, reps).await;
    mesh.close().await;
    let (mut times, phases) = result?;
    let (a_stats, b_stats) = (a.escrow_stats(), b.escrow_stats());
    times.sort();
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
    let [mut ask_to_grant, mut grant_to_applied, mut applied_to_done] = phases;
    let phase_text = if ask_to_grant.is_empty() {
        String::from("no phase breakdown (feeds missed the grants)")
    } else {
        format!(
            "medians of {} ops: call to grant committed at A {:.1} ms, to grant applied at B {:.1} ms, to B's op committed {:.1} ms",
            ask_to_grant.len(),
            median_ms(&mut ask_to_grant),
            median_ms(&mut grant_to_applied),
            median_ms(&mut applied_to_done)
        )
    };
    eprintln!(
        "  transfer: with_rights decrement at B without rights, relay {} ms each way, A grants on demand ({reps} ops): transfer_p50_ms {p50:.1} (target <= 60), p99 {p99:.1} ms; {phase_text}; A granted {}, B asked {}, served after a grant {}, refused {}",
        TRANSFER_DELAY.as_millis(),
        a_stats.granted,
        b_stats.asked,
        b_stats.served_after_transfer,
        b_stats.refused,
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

/// The measured loop of the transfer part: `reps` decrements at `b` (after
/// two unmeasured), each waiting for a grant from `a`. Returns their times
/// and, where both feeds saw the grant, the three phases of each: from the
/// call to the grant committed at A, to the grant applied at B, to the
/// decrement committed.
async fn transfer_reps(
    a: &Replica,
    b: &Replica,
    doc: &DocId,
    reps: usize,
) -> anyhow::Result<(Vec<Duration>, [Vec<Duration>; 3])> {
    until("the counter reaching B", Duration::from_millis(2), || {
        Ok(rights(b, doc, a.site())?.is_some())
    })
    .await?;
    let (at_a, a_task) = record_published(a, doc);
    let (at_b, b_task) = record_published(b, doc);
    let dec = decrement()?;
    let warm_up = 2;
    let started = Instant::now();
    let mut times = Vec::with_capacity(reps);
    let mut spans = Vec::with_capacity(reps);
    for rep in 0..warm_up + reps {
        anyhow::ensure!(
            started.elapsed() < PART_TIME_MAX,
            "the transfer part ran past {PART_TIME_MAX:?}"
        );
        anyhow::ensure!(
            rights(b, doc, b.site())? == Some(0),
            "B holds rights before op {rep}"
        );
        let (b2, doc2, dec2) = (b.clone(), doc.clone(), dec.clone());
        let (call, done) = tokio::task::spawn_blocking(move || {
            let call = Instant::now();
            b2.with_rights(&doc2, Some(OP_WAIT), || b2.apply_ops(&doc2, &dec2, None))?;
            anyhow::Ok((call, Instant::now()))
        })
        .await??;
        if rep >= warm_up {
            times.push(done - call);
            spans.push((call, done));
        }
        // Settle: A has applied B's decrement before B asks again.
        until("A applying B's decrement", Duration::from_millis(1), || {
            Ok(a.heads(doc) == b.heads(doc))
        })
        .await?;
    }
    a_task.abort();
    b_task.abort();
    let (at_a, at_b) = (
        at_a.lock().expect("recorder lock").clone(),
        at_b.lock().expect("recorder lock").clone(),
    );
    let mut phases: [Vec<Duration>; 3] = Default::default();
    for (call, done) in spans {
        let Some(granted) = first_between(&at_a, call, done, true) else {
            continue;
        };
        let Some(applied) = first_between(&at_b, granted, done, false) else {
            continue;
        };
        phases[0].push(granted - call);
        phases[1].push(applied - granted);
        phases[2].push(done.saturating_duration_since(applied));
    }
    Ok((times, phases))
}

/// What one site's demand thread saw.
#[derive(Default)]
struct SiteDemand {
    ops: usize,
    refused: usize,
    /// From each call to its success or refusal.
    times: Vec<Duration>,
    /// How far behind its schedule the site's last op started.
    behind_at_end: Duration,
}

/// The site of demand op `i`: 8 of every 10 at the first, one each at
/// the others.
fn demand_site(i: usize) -> usize {
    match i % 10 {
        0..=7 => 0,
        8 => 1,
        _ => 2,
    }
}

/// `served_locally_fraction`: skewed demand over three sites with
/// proportional rebalancing.
async fn served_locally(ops_total: usize) -> anyhow::Result<Map<String, Value>> {
    let dir = tempfile::tempdir()?;
    let policy = Policy {
        low_water: LOW_WATER,
        rebalance: GrantPolicy::Proportional,
        wait: OP_WAIT,
    };
    let replicas: Vec<Replica> = DEMAND_SITES
        .iter()
        .map(|name| open(dir.path(), name, policy))
        .collect::<anyhow::Result<_>>()?;
    let doc: DocId = "bench/stock".parse()?;
    // 1.2 rights per op, split evenly: the busy site, with 80% of the ops,
    // holds 40% of what it needs at the start, and must be refilled by the
    // others many times over.
    let share = (ops_total as i64 * 6 / 5 / 3).max(LOW_WATER * 4);
    create_bounded(&replicas[0], &doc, share * 3)?;
    for to in &replicas[1..] {
        replicas[0].escrow_transfer(&doc, "/stock", PoolKind::Down, to.site(), share, None)?;
    }
    let mesh = Mesh::connect(&replicas, None).await?;
    let result = demand(&replicas, &doc, share, ops_total).await;
    mesh.close().await;
    let (per_site, stats, seconds) = result?;
    let (mut local, mut transferred, mut refused, mut grants) = (0, 0, 0, 0);
    let mut lines = Vec::new();
    let mut all_times = Vec::new();
    for (i, (demand, (before, after))) in per_site.iter().zip(&stats).enumerate() {
        let l = after.served_locally - before.served_locally;
        let t = after.served_after_transfer - before.served_after_transfer;
        let g = after.granted - before.granted;
        local += l;
        transferred += t;
        refused += demand.refused;
        grants += g;
        let mut times = demand.times.clone();
        times.sort();
        lines.push(format!(
            "{} {} ops: {l} local, {t} after a grant, {} refused, granted {g}, p50 {:.2} ms p99 {:.2} ms, {:.0} ms behind schedule at the end",
            DEMAND_SITES[i],
            demand.ops,
            demand.refused,
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            demand.behind_at_end.as_secs_f64() * 1000.0
        ));
        all_times.extend(demand.times.iter().copied());
    }
    all_times.sort();
    let fraction = local as f64 / (local + transferred).max(1) as f64;
    eprintln!(
        "  skewed demand: {ops_total} with_rights decrements by 1, scheduled one every {} ms (80/10/10%), took {seconds:.2} s ({:.0} ops/s); {share} rights per site at the start, low water {LOW_WATER}, proportional grants",
        DEMAND_EVERY.as_millis(),
        ops_total as f64 / seconds
    );
    for line in &lines {
        eprintln!("    {line}");
    }
    eprintln!(
        "    served_locally_fraction {fraction:.4} = {local} / ({local} + {transferred}) (target >= 0.95); {refused} refused, {grants} grants"
    );
    Ok(metrics(&[
        ("demand_ops", json!(ops_total)),
        ("demand_share", json!(share)),
        ("demand_served_locally", json!(local)),
        ("demand_served_after_transfer", json!(transferred)),
        ("demand_refused", json!(refused)),
        ("demand_grants", json!(grants)),
        ("demand_seconds", json!(seconds)),
        ("demand_p99_ms", json!(percentile(&all_times, 0.99))),
        ("served_locally_fraction", json!(fraction)),
    ]))
}

/// Escrow statistics of one site before and after the demand.
type StatsDelta = (archipelago::EscrowStats, archipelago::EscrowStats);

/// The demand of the served-locally part: once every site sees the even
/// split, `ops_total` decrements on the schedule, each site's from a
/// thread of its own. Returns what each site saw, its escrow statistics
/// around the demand, and the seconds it took.
async fn demand(
    replicas: &[Replica],
    doc: &DocId,
    share: i64,
    ops_total: usize,
) -> anyhow::Result<(Vec<SiteDemand>, Vec<StatsDelta>, f64)> {
    for replica in replicas {
        until(
            "the even split reaching every site",
            Duration::from_millis(2),
            || {
                for holder in replicas {
                    if rights(replica, doc, holder.site())? != Some(share) {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )
        .await?;
    }
    let before: Vec<_> = replicas.iter().map(Replica::escrow_stats).collect();
    let start = Instant::now();
    let threads: Vec<_> = (0..replicas.len())
        .map(|site| {
            let (replica, doc) = (replicas[site].clone(), doc.clone());
            std::thread::spawn(move || -> anyhow::Result<SiteDemand> {
                let dec = decrement()?;
                let mut seen = SiteDemand::default();
                for i in (0..ops_total).filter(|&i| demand_site(i) == site) {
                    let due = start + DEMAND_EVERY * (i as u32 + 1);
                    let now = Instant::now();
                    std::thread::sleep(due.saturating_duration_since(now));
                    anyhow::ensure!(
                        now - start < PART_TIME_MAX,
                        "the demand ran past {PART_TIME_MAX:?}"
                    );
                    seen.behind_at_end = now.saturating_duration_since(due);
                    let call = Instant::now();
                    let result = replica
                        .with_rights(&doc, Some(OP_WAIT), || replica.apply_ops(&doc, &dec, None));
                    seen.times.push(call.elapsed());
                    seen.ops += 1;
                    match result {
                        Ok(_) => {}
                        Err(archipelago::Error::Op(op)) if op.code() == "insufficient_rights" => {
                            seen.refused += 1
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(seen)
            })
        })
        .collect();
    let mut per_site = Vec::new();
    for thread in threads {
        let joined = tokio::task::spawn_blocking(move || thread.join()).await?;
        per_site.push(joined.map_err(|_| anyhow::anyhow!("a demand thread panicked"))??);
    }
    let seconds = start.elapsed().as_secs_f64();
    let stats = before
        .into_iter()
        .zip(replicas.iter().map(Replica::escrow_stats))
        .collect();
    Ok((per_site, stats, seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_goes_80_10_10() {
        let mut counts = [0; 3];
        for i in 0..1_000 {
            counts[demand_site(i)] += 1;
        }
        assert_eq!(counts, [800, 100, 100]);
    }

    #[test]
    fn a_small_escrow_scenario_measures_every_metric() {
        let out = measure(&Sizes {
            local_reps: 10,
            transfers: 3,
            demand_ops: 200,
        })
        .unwrap();
        for name in ["local_ratio", "transfer_p50_ms", "served_locally_fraction"] {
            let value = out[name].as_f64().unwrap();
            assert!(value.is_finite() && value > 0.0, "{name} = {value}");
        }
        // One round trip over the 25 ms link at least.
        assert!(out["transfer_p50_ms"].as_f64().unwrap() >= 50.0);
        assert_eq!(out["demand_refused"], 0);
    }
}
