//! `txn`: what a transaction across documents costs beside a single-document
//! commit, each pair measured in the same run, taking turns:
//!
//! - `commit_ratio_k4`: one durable 4-document `Replica::commit_txn` against
//!   one `Replica::apply_ops`, on one replica over SQLite (WAL,
//!   `synchronous=FULL`), one commit at a time, so neither shares an fsync
//!   with another; medians of each.
//! - `api_txn_per_second`: 2-document `POST /v1/txn` transactions through a
//!   node's HTTP API on 127.0.0.1, 8 concurrent clients over 100 documents
//!   (as `api_commits` does for single commits).
//! - `live_p50_ratio_vs_single`: commit-to-visible latency at site B of a
//!   2-document transaction against a single change, over the two sites of
//!   `live` (replicas over SQLite, QUIC endpoints on 127.0.0.1). A commits
//!   every 10 ms from a thread of its own, alternating the two kinds; a
//!   transaction is visible at B when B's committed-change feed has
//!   published its last member (B holds members back until all arrived,
//!   then publishes them together).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use archipelago::txn::{Precondition, Txn, TxnDoc, TxnId};
use archipelago::{ChangeHash, DocId, Replica};
use serde_json::{json, Map, Value};

use crate::scenarios::metrics;
use crate::versus::{open, percentile, runtime, set_op, until_same, Link, WAIT_MAX};

/// How much each part of the scenario does.
struct Sizes {
    /// Commits of each kind timed for `commit_ratio_k4`, after a tenth as
    /// many unmeasured ones of each.
    commit_reps: usize,
    /// Transactions sent through the API.
    api_txns: usize,
    /// Changes of each kind timed in the live part.
    live_per_kind: usize,
    /// Time between two commits at A in the live part.
    live_interval: Duration,
}

/// Documents the API and live parts spread their commits over.
const DOCS: usize = 100;

/// Concurrent HTTP clients of the API part.
const CLIENTS: usize = 8;

/// `txn`: the three parts in turn, with the sizes of `quick` or full mode.
pub(crate) fn txn(quick: bool) -> anyhow::Result<Map<String, Value>> {
    let sizes = if quick {
        Sizes {
            commit_reps: 300,
            api_txns: 8_000,
            live_per_kind: 200,
            live_interval: Duration::from_millis(10),
        }
    } else {
        Sizes {
            commit_reps: 2_000,
            api_txns: 40_000,
            live_per_kind: 1_000,
            live_interval: Duration::from_millis(10),
        }
    };
    eprintln!(
        "  reproduce: cargo run --release -p bench --{} --only txn",
        if quick { " --quick" } else { "" }
    );
    measure(&sizes)
}

/// Runs the three parts with `sizes`; the metrics of all three.
fn measure(sizes: &Sizes) -> anyhow::Result<Map<String, Value>> {
    let mut out = commit_ratio(sizes.commit_reps)?;
    out.extend(api_txns(sizes.api_txns)?);
    out.extend(live(sizes.live_per_kind, sizes.live_interval)?);
    Ok(out)
}

/// The two documents (indexes below `docs`, an even number) of
/// transaction `i`: an even one and an odd one, every run of `docs / 2`
/// consecutive transactions covering each document once, the partners
/// shifting every run. So concurrent transactions do not wait for each
/// other's document locks, as `api_commits` spreads its commits round-robin.
fn pair(i: usize, docs: usize) -> (usize, usize) {
    let half = docs / 2;
    let (run, k) = (i / half, i % half);
    (2 * k, (2 * (k + run) + 1) % docs)
}

/// A transaction setting integer key `k{key % 10}` to `value` in each of
/// `ids`.
fn set_txn(ids: &[&DocId], key: usize, value: usize) -> Txn {
    Txn {
        docs: ids
            .iter()
            .map(|id| TxnDoc {
                id: (*id).clone(),
                ops: set_op(key, value),
                precondition: Precondition::none(),
            })
            .collect(),
        message: None,
    }
}

/// Median of `times`, in milliseconds.
fn median_ms(times: &mut [Duration]) -> f64 {
    times.sort();
    percentile(times, 0.5)
}

/// `commit_ratio_k4`: the median time of a durable 4-document transaction
/// over that of a durable single-document commit, one replica over SQLite,
/// one call at a time, the kinds taking turns (and swapping which goes
/// first every round, so neither always follows the other).
fn commit_ratio(reps: usize) -> anyhow::Result<Map<String, Value>> {
    let dir = tempfile::tempdir()?;
    let replica = open(dir.path(), "site-a", None)?;
    let single: DocId = "single/0".parse()?;
    let members: Vec<DocId> = (0..4)
        .map(|d| format!("txn/{d}").parse())
        .collect::<Result<_, _>>()?;
    let member_refs: Vec<&DocId> = members.iter().collect();
    let warm_up = reps / 10 + 1;
    let (mut singles, mut txns) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for i in 0..warm_up + reps {
        let mut times = [Duration::ZERO; 2];
        for kind in [i % 2, 1 - i % 2] {
            let started = Instant::now();
            if kind == 0 {
                replica.apply_ops(&single, &set_op(i, i), None)?;
            } else {
                let commit = replica.commit_txn(&set_txn(&member_refs, i, i))?;
                anyhow::ensure!(
                    commit.docs.iter().all(|(_, c)| c.change.is_some()),
                    "a member of the transaction got no change"
                );
            }
            times[kind] = started.elapsed();
        }
        if i >= warm_up {
            singles.push(times[0]);
            txns.push(times[1]);
        }
    }
    let (single_ms, k4_ms) = (median_ms(&mut singles), median_ms(&mut txns));
    eprintln!(
        "  durable commit (SQLite, one at a time, {reps} of each, medians): 4-document transaction {k4_ms:.3} ms, single document {single_ms:.3} ms"
    );
    Ok(metrics(&[
        ("commit_reps", json!(reps)),
        ("commit_k4_ms", json!(k4_ms)),
        ("commit_single_ms", json!(single_ms)),
        ("commit_ratio_k4", json!(k4_ms / single_ms)),
    ]))
}

/// `api_txn_per_second`: durable 2-document `POST /v1/txn` transactions
/// per second through a node's HTTP API on 127.0.0.1, 8 concurrent clients,
/// each transaction over two of the 100 documents as [`pair`] picks them.
fn api_txns(total: usize) -> anyhow::Result<Map<String, Value>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let dir = tempfile::tempdir()?;
        let path = sync_node::init::init(&sync_node::init::InitOptions::new(
            "bench".parse()?,
            dir.path(),
        ))?;
        let node = sync_node::Node::start(&sync_node::config::Config::load(&path)?).await?;
        let http = reqwest::Client::new();
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let (http, next) = (http.clone(), next.clone());
            let (url, token) = (node.url(), node.token().to_owned());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return anyhow::Ok(());
                    }
                    let (a, b) = pair(i, DOCS);
                    let ops = json!([{"op": "set", "path": format!("/k{}", i % 10), "value": i}]);
                    let body = json!({"docs": [
                        {"id": format!("bench/{a}"), "ops": ops},
                        {"id": format!("bench/{b}"), "ops": ops},
                    ]});
                    let response = http
                        .post(format!("{url}/v1/txn"))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await?;
                    let status = response.status();
                    if !status.is_success() {
                        anyhow::bail!("transaction failed: {status} {}", response.text().await?);
                    }
                }
            }));
        }
        for task in tasks {
            task.await??;
        }
        let seconds = started.elapsed().as_secs_f64();
        node.shutdown().await?;
        let per_second = (total as f64 / seconds).round();
        eprintln!(
            "  POST /v1/txn, 2 of {DOCS} documents, {CLIENTS} clients: {total} transactions in {seconds:.3} s = {per_second} per second"
        );
        Ok(metrics(&[
            ("api_txns", json!(total)),
            ("api_docs", json!(DOCS)),
            ("api_clients", json!(CLIENTS)),
            ("api_seconds", json!(seconds)),
            ("api_txn_per_second", json!(per_second)),
        ]))
    })
}

/// One commit at A in the live part: the transaction (none for a single
/// change), the changes it made, and when its call started.
struct LiveCommit {
    txn: Option<TxnId>,
    hashes: Vec<ChangeHash>,
    started: Instant,
}

/// When B's feed published a change, and the transactions of its event.
type Arrivals = HashMap<ChangeHash, (Instant, Vec<TxnId>)>;

/// The live part: `per_kind` single changes and as many 2-document
/// transactions, taking turns every `interval` at A; commit-to-visible
/// latencies at B of each kind.
fn live(per_kind: usize, interval: Duration) -> anyhow::Result<Map<String, Value>> {
    let (mut singles, mut txns, hold_times) =
        runtime()?.block_on(live_latencies(per_kind, interval))?;
    let (single_p50, txn_p50) = (median_ms(&mut singles), median_ms(&mut txns));
    let (single_p99, txn_p99) = (percentile(&singles, 0.99), percentile(&txns, 0.99));
    // The replica's clock counts whole milliseconds: most holds read 0.
    let hold_mean_ms = hold_times.iter().sum::<f64>() * 1000.0 / hold_times.len().max(1) as f64;
    eprintln!(
        "  live, commit to visible at B ({per_kind} of each, every {interval:?}): transaction of 2 p50 {txn_p50:.3} ms p99 {txn_p99:.3} ms, single change p50 {single_p50:.3} ms p99 {single_p99:.3} ms; B held {} transactions back, {hold_mean_ms:.3} ms on average (whole milliseconds)",
        hold_times.len()
    );
    Ok(metrics(&[
        ("live_per_kind", json!(per_kind)),
        ("live_single_p50_ms", json!(single_p50)),
        ("live_single_p99_ms", json!(single_p99)),
        ("live_txn_p50_ms", json!(txn_p50)),
        ("live_txn_p99_ms", json!(txn_p99)),
        ("live_txns_held_at_b", json!(hold_times.len())),
        ("live_txn_hold_mean_ms", json!(hold_mean_ms)),
        ("live_p50_ratio_vs_single", json!(txn_p50 / single_p50)),
    ]))
}

/// Two sites as `live` sets them up (100 documents synced, one unmeasured
/// change per document), then A alternates a single change and a
/// 2-document transaction every `interval`, `per_kind` of each. Returns
/// the latencies from the start of A's call to B's publication of the
/// single changes, of the transactions (their last member), and how long
/// B held each transaction back, in seconds.
async fn live_latencies(
    per_kind: usize,
    interval: Duration,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Vec<f64>)> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (
        open(dir.path(), "site-a", None)?,
        open(dir.path(), "site-b", None)?,
    );
    let ids: Vec<DocId> = (0..DOCS)
        .map(|d| format!("live/{d}").parse())
        .collect::<Result<_, _>>()?;
    for id in &ids {
        a.apply_ops(id, &set_op(0, 0), None)?;
    }
    let link = Link::connect(&a, &b, false).await?;
    until_same(&a, &b, &ids, Duration::from_millis(5)).await?;
    // One unmeasured round, a change per document: B keeps a document
    // received whole as bytes until first used, and loading it would be
    // timed with its first live change.
    let mut tick = tokio::time::interval(interval);
    for (n, id) in ids.iter().enumerate() {
        tick.tick().await;
        let (a, id) = (a.clone(), id.clone());
        tokio::task::spawn_blocking(move || a.apply_ops(&id, &set_op(n, 1_000_000 + n), None))
            .await??;
    }
    until_same(&a, &b, &ids, Duration::from_millis(5)).await?;
    b.take_txn_hold_times();
    let changes = per_kind * 3;
    let mut feed = b.subscribe();
    let arrivals = tokio::spawn(async move {
        let mut seen = Arrivals::new();
        while seen.len() < changes {
            match feed.recv().await {
                Ok(committed) => {
                    let now = Instant::now();
                    for hash in committed.hashes {
                        seen.insert(hash, (now, committed.txns.clone()));
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
        seen
    });
    let writer = {
        let (a, ids) = (a.clone(), ids.clone());
        std::thread::spawn(move || live_writer(&a, &ids, per_kind, interval))
    };
    let commits = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the writing thread panicked"))??;
    let seen = tokio::time::timeout(WAIT_MAX, arrivals).await??;
    let hold_times = b.take_txn_hold_times();
    link.close().await;
    let (mut singles, mut txns) = (Vec::with_capacity(per_kind), Vec::with_capacity(per_kind));
    for commit in &commits {
        let mut visible = commit.started;
        for hash in &commit.hashes {
            let (arrived, event_txns) = seen
                .get(hash)
                .ok_or_else(|| anyhow::anyhow!("change {hash} never arrived at B"))?;
            let expected: &[TxnId] = commit.txn.as_slice();
            anyhow::ensure!(
                event_txns.as_slice() == expected,
                "change {hash} was published at B with transactions {event_txns:?}, not {expected:?}"
            );
            visible = visible.max(*arrived);
        }
        let latency = visible.saturating_duration_since(commit.started);
        match commit.txn {
            Some(_) => txns.push(latency),
            None => singles.push(latency),
        }
    }
    Ok((singles, txns, hold_times))
}

/// A's writing thread in the live part, as a program embedding the
/// library's synchronous API calls it: every `interval` a single change
/// (even turns, round-robin over `ids`) or a 2-document transaction (odd
/// turns, the documents of [`pair`]).
fn live_writer(
    a: &Replica,
    ids: &[DocId],
    per_kind: usize,
    interval: Duration,
) -> anyhow::Result<Vec<LiveCommit>> {
    let mut commits = Vec::with_capacity(per_kind * 2);
    let start = Instant::now();
    for i in 0..per_kind * 2 {
        let due = start + interval * (i as u32 + 1);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let started = Instant::now();
        let commit = if i % 2 == 0 {
            let commit = a.apply_ops(&ids[i % ids.len()], &set_op(i, i + 1), None)?;
            LiveCommit {
                txn: None,
                hashes: vec![commit
                    .change
                    .ok_or_else(|| anyhow::anyhow!("a single commit made no change"))?],
                started,
            }
        } else {
            let (first, second) = pair(i, ids.len());
            let commit = a.commit_txn(&set_txn(&[&ids[first], &ids[second]], i, i + 1))?;
            LiveCommit {
                txn: Some(commit.txn),
                hashes: commit
                    .docs
                    .iter()
                    .map(|(id, c)| {
                        c.change
                            .ok_or_else(|| anyhow::anyhow!("transaction member {id} got no change"))
                    })
                    .collect::<anyhow::Result<_>>()?,
                started,
            }
        };
        commits.push(commit);
    }
    Ok(commits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_pairs_are_disjoint_and_vary() {
        let mut partners = std::collections::HashSet::new();
        for i in 0..5_000 {
            let window: Vec<usize> = (i..i + 16)
                .flat_map(|j| {
                    let (a, b) = pair(j, DOCS);
                    [a, b]
                })
                .collect();
            assert!(window.iter().all(|d| *d < DOCS), "{window:?}");
            let distinct: std::collections::HashSet<&usize> = window.iter().collect();
            assert_eq!(distinct.len(), window.len(), "{i}: {window:?}");
            partners.insert(pair(i, DOCS));
        }
        assert_eq!(partners.len(), DOCS / 2 * DOCS / 2);
    }

    #[test]
    fn a_small_txn_scenario_measures_every_metric() {
        let out = measure(&Sizes {
            commit_reps: 5,
            api_txns: 40,
            live_per_kind: 5,
            live_interval: Duration::from_millis(2),
        })
        .unwrap();
        for name in [
            "commit_ratio_k4",
            "commit_k4_ms",
            "commit_single_ms",
            "api_txn_per_second",
            "live_p50_ratio_vs_single",
            "live_single_p50_ms",
            "live_txn_p50_ms",
        ] {
            let value = out[name].as_f64().unwrap();
            assert!(value.is_finite() && value > 0.0, "{name} = {value}");
        }
    }
}
