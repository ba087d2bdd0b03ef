//! What the conflict layer costs a merge: 100 remote changes merged in one
//! batch into a document of 1k or 100k ops, through `Replica::apply_changes`
//! (change verification, merge, store commit) with the detectors and a rule
//! on, against the same with the layer off (no patch log, no detection).

use std::sync::Arc;
use std::time::{Duration, Instant};

use archipelago::conflict::{Check, ConflictConfig, Rule};
use archipelago::doc::Op;
use archipelago::store::Memory;
use archipelago::{DocId, Origin, Replica, ReplicaOptions};
use serde_json::{json, Map, Value};

use crate::scenarios::metrics;

fn ops(value: Value) -> Vec<Op> {
    serde_json::from_value(value).expect("static ops parse")
}

fn replica(site: &str, config: ConflictConfig) -> anyhow::Result<Replica> {
    let mut options = ReplicaOptions::new(site.parse()?);
    options.conflicts = Arc::new(config);
    Ok(Replica::open(options, Arc::new(Memory::new()))?)
}

fn layer_on() -> anyhow::Result<ConflictConfig> {
    Ok(ConflictConfig::default().with_rule(Rule::new(
        "stock-non-negative",
        "inventory/*",
        "/stock",
        Check::Min(0.0),
    )?)?)
}

fn layer_off() -> ConflictConfig {
    ConflictConfig::default().without_detectors()
}

/// The local document (saved) and the 100 remote changes to merge into it.
struct Fixture {
    local: Vec<u8>,
    remote: Vec<Vec<u8>>,
    reports: usize,
}

fn fixture(history_ops: usize) -> anyhow::Result<Fixture> {
    let id: DocId = "inventory/sku-1".parse()?;
    let a = replica("ap-south", layer_off())?;
    let b = replica("eu-west", layer_off())?;
    a.apply_ops(
        &id,
        &ops(json!([{"op": "set", "path": "/stock", "value": 1_000_000, "as": "counter"}])),
        None,
    )?;
    // History: changes of 100 puts over 1,000 keys.
    for c in 0..history_ops / 100 {
        let batch: Vec<Value> = (0..100)
            .map(
                |i| json!({"op": "set", "path": format!("/k{}", (c * 100 + i) % 1000), "value": c}),
            )
            .collect();
        a.apply_ops(&id, &ops(Value::Array(batch)), None)?;
    }
    let fork = a.heads(&id).expect("written above");
    b.apply_changes(
        &id,
        &a.changes_after(&id, &[])?.expect("exists"),
        Origin::Local,
    )?;
    // Concurrent work on both sides: 10 local changes, 100 remote ones that
    // sell stock and overwrite fields (10 of them the same as locally).
    for i in 0..10 {
        a.apply_ops(
            &id,
            &ops(
                json!([{"op": "set", "path": format!("/k{}", i * 10), "value": "local"},
                        {"op": "inc", "path": "/stock", "by": -1}]),
            ),
            None,
        )?;
    }
    for i in 0..100 {
        b.apply_ops(
            &id,
            &ops(
                json!([{"op": "set", "path": format!("/k{i}"), "value": "remote"},
                        {"op": "inc", "path": "/stock", "by": -1}]),
            ),
            None,
        )?;
    }
    let remote = b.changes_after(&id, &fork)?.expect("exists");
    anyhow::ensure!(remote.len() == 100, "expected 100 remote changes");
    // How many reports the merge raises (the work detection does).
    let check = replica("ap-south", layer_on()?)?;
    check.apply_snapshot(&id, &a.save_bytes(&id)?.expect("exists"), Origin::Local)?;
    check.apply_changes(&id, &remote, Origin::Local)?;
    let reports = check
        .conflicts(&archipelago::conflict::Filter::default())?
        .len();
    Ok(Fixture {
        local: a.save_bytes(&id)?.expect("exists"),
        remote,
        reports,
    })
}

/// Time of merging the fixture's remote changes into a fresh copy of the
/// local document.
fn merge_once(f: &Fixture, config: &ConflictConfig) -> anyhow::Result<Duration> {
    let id: DocId = "inventory/sku-1".parse()?;
    let r = replica("ap-south", config.clone())?;
    r.apply_snapshot(&id, &f.local, Origin::Local)?;
    // Load it, so the timing covers the merge alone.
    r.with_doc(&id, |_| ())?;
    let started = Instant::now();
    let applied = r.apply_changes(&id, &f.remote, Origin::Local)?;
    let elapsed = started.elapsed();
    anyhow::ensure!(applied.applied.len() == 100, "all 100 changes merge");
    Ok(elapsed)
}

/// Median merge times with the layer off and on, over `trials` each; the
/// trials alternate so that drift (other load, CPU frequency) affects both
/// sides alike.
fn merge_times(
    f: &Fixture,
    off: &ConflictConfig,
    on: &ConflictConfig,
    trials: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let (mut offs, mut ons) = (Vec::with_capacity(trials), Vec::with_capacity(trials));
    for _ in 0..trials {
        offs.push(merge_once(f, off)?);
        ons.push(merge_once(f, on)?);
    }
    offs.sort();
    ons.sort();
    Ok((offs[trials / 2], ons[trials / 2]))
}

pub(crate) fn overhead(quick: bool) -> anyhow::Result<Map<String, Value>> {
    let mut out = Vec::new();
    let mut worst: f64 = 0.0;
    for (label, history_ops, trials) in [
        ("1k", 1_000, if quick { 21 } else { 51 }),
        ("100k", 100_000, if quick { 5 } else { 11 }),
    ] {
        let f = fixture(history_ops)?;
        let (off, on) = merge_times(&f, &layer_off(), &layer_on()?, trials)?;
        let ratio = on.as_secs_f64() / off.as_secs_f64();
        worst = worst.max(ratio);
        out.push((format!("ratio_{label}_ops"), json!(ratio)));
        out.push((
            format!("us_per_change_off_{label}_ops"),
            json!(off.as_secs_f64() * 1e6 / 100.0),
        ));
        out.push((
            format!("us_per_change_on_{label}_ops"),
            json!(on.as_secs_f64() * 1e6 / 100.0),
        ));
        out.push((format!("reports_{label}_ops"), json!(f.reports)));
    }
    let mut pairs: Vec<(&str, Value)> = vec![("ratio", json!(worst))];
    pairs.extend(out.iter().map(|(k, v)| (k.as_str(), v.clone())));
    Ok(metrics(&pairs))
}
