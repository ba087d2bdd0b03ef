//! Seeded multi-site simulation: five sites edit the same documents while
//! the network duplicates and reorders frames, connections reset, sites are
//! partitioned, crash and restart, and stores refuse writes for a while
//! (the changes stay in memory, published, and are written later); after
//! the final heal every site must hold
//! the same documents (sorted heads and JSON values) and the same conflict
//! reports with the same statuses, and each site's report index must agree
//! with the reports stored in its documents, and each site reopened from its
//! store alone must list what it shows. Transactions of 2 to 5 documents
//! are part of the workload; after every delivery, every site must show
//! each of them whole or not at all.
//!
//! `SIM_SEEDS=A..B cargo test --release --test simulation` runs seeds A..B;
//! without it a default range runs. A failure prints its seed and the
//! command that replays it. The 10,000-seed soak:
//! `SIM_SEEDS=0..10000 cargo test --release --test simulation -- --include-ignored soak`.

use std::ops::Range;

use archipelago::sim::{Sim, SimConfig};

/// Seeds from `SIM_SEEDS` (`A..B`), or `default`.
fn seeds(default: Range<u64>) -> Range<u64> {
    let Ok(text) = std::env::var("SIM_SEEDS") else {
        return default;
    };
    let (a, b) = text
        .split_once("..")
        .unwrap_or_else(|| panic!("SIM_SEEDS must look like 0..100, not {text:?}"));
    let a: u64 = a.trim().parse().expect("SIM_SEEDS start is a number");
    let b: u64 = b.trim().parse().expect("SIM_SEEDS end is a number");
    a..b
}

fn run(seeds: Range<u64>, config: &SimConfig) {
    let mut edits = 0;
    let mut resets = 0;
    let mut conflicts = 0;
    let mut closed = 0;
    let mut failed_writes = 0;
    let mut restores = 0;
    let mut txns = 0;
    let mut txn_checks = 0;
    let (mut escrow_ops, mut escrow_refused, mut escrow_checks) = (0, 0, 0);
    let (mut sagas, mut sagas_done, mut saga_effects) = (0, 0, 0);
    let count = seeds.end.saturating_sub(seeds.start);
    for seed in seeds {
        match Sim::new(seed, config.clone()).run() {
            Ok(report) => {
                edits += report.edits;
                resets += report.resets;
                conflicts += report.conflicts;
                closed += report.conflicts_closed;
                failed_writes += report.failed_writes;
                restores += report.restores;
                txns += report.txns;
                txn_checks += report.txn_checks;
                escrow_ops += report.escrow_ops;
                escrow_refused += report.escrow_refused;
                escrow_checks += report.escrow_checks;
                sagas += report.sagas;
                sagas_done += report.sagas_done;
                saga_effects += report.saga_effects;
            }
            Err(failure) => panic!("{failure}"),
        }
    }
    eprintln!(
        "{count} seeds converged ({edits} edits, {resets} connection resets, \
         {conflicts} conflict reports identical at every site, {closed} of them closed, \
         {failed_writes} edits whose store write failed, {restores} sites restored from a backup, \
         {txns} transactions never seen in part in {txn_checks} checks after deliveries, \
         {escrow_ops} ops on bounded counters and {escrow_refused} refused for want of rights, \
         invariants held in {escrow_checks} checks after deliveries, \
         {sagas} sagas finished everywhere, {sagas_done} of them done and the rest compensated, \
         {saga_effects} steps and compensations each counted once)"
    );
    assert!(
        count == 0 || (sagas > 0 && sagas_done > 0 && sagas_done < sagas && saga_effects > 0),
        "sagas were not exercised both ways ({sagas} sagas, {sagas_done} done)"
    );
    assert!(
        count == 0 || (escrow_ops > 0 && escrow_refused > 0 && escrow_checks > 0),
        "bounded counters were not exercised, so their invariants went unchecked"
    );
    assert!(
        count == 0 || (txns > 0 && txn_checks > 0),
        "no transaction committed, so atomic visibility went unchecked"
    );
    assert!(
        count < 8 || !config.faults || failed_writes > 0,
        "no store write failed, so the unsaved-change path went untested"
    );
    assert!(
        count == 0 || conflicts > 0,
        "the workload raised no conflicts, so the report check checked nothing"
    );
}

#[test]
fn five_sites_converge_under_faults_for_every_seed() {
    run(seeds(0..24), &SimConfig::default());
}

#[test]
fn five_sites_converge_without_faults() {
    run(
        seeds(1000..1008),
        &SimConfig {
            faults: false,
            ..SimConfig::default()
        },
    );
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let a = Sim::new(7, SimConfig::default())
        .run()
        .expect("seed 7 converges");
    let b = Sim::new(7, SimConfig::default())
        .run()
        .expect("seed 7 converges");
    assert_eq!(a, b);
    assert!(
        a.edits > 0 && a.deliveries > 0 && a.docs > 0,
        "the run did something: {a:?}"
    );
    // Equal digests mean equal change hashes: the replay wrote the very same
    // changes, actor ids and timestamps included.
    assert_eq!(a.heads_digest.len(), 64, "{a:?}");
}

#[test]
#[ignore = "soak: thousands of seeds, run in release"]
fn soak() {
    run(seeds(0..10_000), &SimConfig::default());
}

/// Seeds that once failed, replayed in every run: 251 stored a change
/// whose dependency was put off to a later batch, and then put off every
/// later change for good behind a transaction whose document's write had
/// failed.
#[test]
fn seeds_that_once_failed_converge() {
    for seed in [251] {
        if let Err(failure) = Sim::new(seed, SimConfig::default()).run() {
            panic!("{failure}");
        }
    }
}
