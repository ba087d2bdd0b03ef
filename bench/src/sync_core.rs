//! Benchmarks of the sans-IO sync core: two replicas over in-memory stores
//! joined by a pair of sessions, with frames passed by hand (no sockets).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use archipelago::automerge::sync::{self, SyncDoc};
use archipelago::automerge::{Automerge, Change};
use archipelago::doc::Op;
use archipelago::protocol::{Session, SessionConfig};
use archipelago::store::Memory;
use archipelago::{Committed, DocId, Origin, Replica, ReplicaOptions};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use crate::scenarios::metrics;

fn replica(site: &str) -> anyhow::Result<Replica> {
    let mut options = ReplicaOptions::new(site.parse()?);
    options.cache_docs_max = 2048;
    Ok(Replica::open(options, Arc::new(Memory::new()))?)
}

/// What one connection between two replicas cost.
struct Exchange {
    bytes: usize,
    /// Flights: maximal runs of frames in one direction.
    round_trips: usize,
    seconds: f64,
}

/// Connects `a` and `b` with fresh sessions and runs until quiet,
/// delivering everything one direction at a time.
fn connect(a: &Replica, b: &Replica) -> anyhow::Result<Exchange> {
    let now = Instant::now();
    let mut sa = Session::new(SessionConfig::new(a.site().clone(), b.site().clone()), now);
    let mut sb = Session::new(SessionConfig::new(b.site().clone(), a.site().clone()), now);
    let mut feed_a: broadcast::Receiver<Committed> = a.subscribe();
    let mut feed_b: broadcast::Receiver<Committed> = b.subscribe();
    let started = Instant::now();
    let (mut bytes, mut flights) = (0usize, 0usize);
    let mut to_b: VecDeque<Vec<u8>> = VecDeque::new();
    let mut to_a: VecDeque<Vec<u8>> = VecDeque::new();
    loop {
        while let Ok(c) = feed_a.try_recv() {
            sa.handle_committed(a, &c);
        }
        while let Ok(c) = feed_b.try_recv() {
            sb.handle_committed(b, &c);
        }
        while let Some((_, frame)) = sa.poll_transmit() {
            bytes += frame.len();
            to_b.push_back(frame);
        }
        while let Some((_, frame)) = sb.poll_transmit() {
            bytes += frame.len();
            to_a.push_back(frame);
        }
        if to_a.is_empty() && to_b.is_empty() {
            break;
        }
        if !to_b.is_empty() {
            flights += 1;
            for frame in to_b.drain(..) {
                sb.handle_bytes(now, b, &frame);
            }
        }
        if !to_a.is_empty() {
            flights += 1;
            for frame in to_a.drain(..) {
                sa.handle_bytes(now, a, &frame);
            }
        }
    }
    anyhow::ensure!(
        sa.is_reconciled() && sb.is_reconciled() && !sa.is_closed(),
        "sessions did not finish"
    );
    Ok(Exchange {
        bytes,
        round_trips: flights.div_ceil(2),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn set_ops(i: usize) -> Vec<Op> {
    serde_json::from_value(json!([{"op": "set", "path": format!("/k{}", i % 10), "value": i}]))
        .expect("static op")
}

/// Bytes and round trips to reconcile `docs` identical documents after a
/// reconnect, and with 10 changed at one side, against a per-document
/// automerge sync handshake (sync states persisted from a previous sync).
pub(crate) fn reconcile(quick: bool) -> anyhow::Result<Map<String, Value>> {
    let docs = if quick { 2_000 } else { 10_000 };
    let changes_per_doc = 20;
    let (a, b) = (replica("site-a")?, replica("site-b")?);
    let ids: Vec<DocId> = (0..docs)
        .map(|d| format!("tenant-{}/orders/{d}", d % 7).parse())
        .collect::<Result<_, _>>()?;
    for id in &ids {
        for i in 0..changes_per_doc {
            a.apply_ops(id, &set_ops(i), None)?;
        }
        let all = a.changes_after(id, &[])?.unwrap_or_default();
        b.apply_changes(id, &all, Origin::Peer(a.site().clone()))?;
    }
    // automerge docs for the baseline, synced once so their states are warm.
    let mut baseline: Vec<(Automerge, Automerge, sync::State, sync::State)> = Vec::new();
    for id in &ids {
        let mut doc_a = Automerge::new();
        let changes: Vec<Change> = a
            .changes_after(id, &[])?
            .unwrap_or_default()
            .iter()
            .map(|c| Change::try_from(c.as_slice()))
            .collect::<Result<_, _>>()?;
        doc_a.apply_changes(changes)?;
        let doc_b = doc_a.fork();
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        let mut pair = (doc_a, doc_b);
        automerge_sync(&mut pair.0, &mut pair.1, &mut sa, &mut sb)?;
        // Persist and restore the states, as a node does across reconnects.
        let sa = sync::State::decode(&sa.encode())?;
        let sb = sync::State::decode(&sb.encode())?;
        baseline.push((pair.0, pair.1, sa, sb));
    }

    let identical = connect(&a, &b)?;
    let mut automerge_identical = (0usize, 0usize);
    for (da, db, sa, sb) in &mut baseline {
        let (bytes, trips) = automerge_sync(da, db, &mut sa.clone(), &mut sb.clone())?;
        automerge_identical.0 += bytes;
        automerge_identical.1 = automerge_identical.1.max(trips);
    }

    // Ten documents change at A while apart.
    for (n, id) in ids.iter().step_by(docs / 10).enumerate() {
        a.apply_ops(id, &set_ops(1000 + n), None)?;
    }
    let changed = connect(&a, &b)?;
    let mut automerge_changed = (0usize, 0usize);
    for (n, (da, db, sa, sb)) in baseline.iter_mut().enumerate() {
        if n % (docs / 10) == 0 {
            let mut tx = da.transaction();
            archipelago::automerge::transaction::Transactable::put(
                &mut tx,
                archipelago::automerge::ROOT,
                "k0",
                1000 + n as i64,
            )?;
            tx.commit();
        }
        let (bytes, trips) = automerge_sync(da, db, sa, sb)?;
        automerge_changed.0 += bytes;
        automerge_changed.1 = automerge_changed.1.max(trips);
    }
    anyhow::ensure!(
        a.heads(&ids[0]) == b.heads(&ids[0]),
        "changed document did not arrive"
    );
    Ok(metrics(&[
        ("docs", json!(docs)),
        ("identical_bytes", json!(identical.bytes)),
        ("identical_round_trips", json!(identical.round_trips)),
        ("identical_seconds", json!(identical.seconds)),
        (
            "automerge_sync_identical_bytes",
            json!(automerge_identical.0),
        ),
        (
            "identical_bytes_ratio_vs_automerge_sync",
            json!(identical.bytes as f64 / automerge_identical.0 as f64),
        ),
        ("changed_10_bytes", json!(changed.bytes)),
        ("changed_10_round_trips", json!(changed.round_trips)),
        ("changed_10_seconds", json!(changed.seconds)),
        (
            "automerge_sync_changed_10_bytes",
            json!(automerge_changed.0),
        ),
        ("automerge_sync_round_trips", json!(automerge_changed.1)),
        (
            "changed_10_bytes_ratio_vs_automerge_sync",
            json!(changed.bytes as f64 / automerge_changed.0 as f64),
        ),
    ]))
}

/// Runs automerge's sync protocol between two docs until both are quiet;
/// returns the bytes of all messages and the round trips.
fn automerge_sync(
    a: &mut Automerge,
    b: &mut Automerge,
    sa: &mut sync::State,
    sb: &mut sync::State,
) -> anyhow::Result<(usize, usize)> {
    let (mut bytes, mut flights) = (0usize, 0usize);
    for _ in 0..100 {
        let mut quiet = true;
        if let Some(m) = a.generate_sync_message(sa) {
            let encoded = m.encode();
            bytes += encoded.len();
            flights += 1;
            b.receive_sync_message(sb, sync::Message::decode(&encoded)?)?;
            quiet = false;
        }
        if let Some(m) = b.generate_sync_message(sb) {
            let encoded = m.encode();
            bytes += encoded.len();
            flights += 1;
            a.receive_sync_message(sa, sync::Message::decode(&encoded)?)?;
            quiet = false;
        }
        if quiet {
            return Ok((bytes, flights.div_ceil(2)));
        }
    }
    anyhow::bail!("automerge sync did not finish")
}

/// Bulk catch-up of 100,000 changes across 1,000 documents into an empty
/// replica, against decoding and applying the same changes in-process with
/// automerge in one batch per document.
pub(crate) fn catchup(quick: bool) -> anyhow::Result<Map<String, Value>> {
    let docs = 1_000;
    let per_doc = if quick { 30 } else { 100 };
    let a = replica("site-a")?;
    let ids: Vec<DocId> = (0..docs)
        .map(|d| format!("bulk/{d}").parse())
        .collect::<Result<_, _>>()?;
    let mut all: Vec<Vec<Vec<u8>>> = Vec::new();
    for id in &ids {
        for i in 0..per_doc {
            a.apply_ops(id, &set_ops(i), None)?;
        }
        all.push(a.changes_after(id, &[])?.unwrap_or_default());
    }
    let total: usize = all.iter().map(Vec::len).sum();

    let in_process = crate::scenarios::automerge_in_process(&all)?;

    let b = replica("site-b")?;
    let exchange = connect(&a, &b)?;
    anyhow::ensure!(b.doc_ids("bulk/").len() == docs, "catch-up incomplete");
    anyhow::ensure!(
        b.heads(&ids[docs - 1]) == a.heads(&ids[docs - 1]),
        "catch-up incomplete"
    );
    let ours = Duration::from_secs_f64(exchange.seconds);

    // The change-by-change path: the peer holds each document's first
    // change, so the rest travels as changes, not as saved documents.
    let c = replica("site-c")?;
    for (id, changes) in ids.iter().zip(&all) {
        c.apply_changes(id, &changes[..1], Origin::Peer(a.site().clone()))?;
    }
    let started = Instant::now();
    for changes in &all {
        let mut doc = Automerge::new();
        doc.apply_changes(vec![Change::try_from(changes[0].as_slice())?])?;
        let rest: Vec<Change> = changes[1..]
            .iter()
            .map(|c| Change::try_from(c.as_slice()))
            .collect::<Result<_, _>>()?;
        doc.apply_changes(rest)?;
    }
    let in_process_rest = started.elapsed();
    let by_changes = connect(&a, &c)?;
    anyhow::ensure!(
        c.heads(&ids[docs - 1]) == a.heads(&ids[docs - 1]),
        "catch-up incomplete"
    );
    Ok(metrics(&[
        ("changes_path_seconds", json!(by_changes.seconds)),
        (
            "changes_path_rate_vs_automerge_in_process",
            json!(in_process_rest.as_secs_f64() / by_changes.seconds),
        ),
        ("changes_path_wire_bytes", json!(by_changes.bytes)),
        ("changes", json!(total)),
        ("docs", json!(docs)),
        ("seconds", json!(ours.as_secs_f64())),
        (
            "changes_per_second",
            json!((total as f64 / ours.as_secs_f64()).round()),
        ),
        (
            "automerge_in_process_seconds",
            json!(in_process.as_secs_f64()),
        ),
        (
            "rate_vs_automerge_in_process",
            json!(in_process.as_secs_f64() / ours.as_secs_f64()),
        ),
        ("wire_bytes", json!(exchange.bytes)),
    ]))
}
