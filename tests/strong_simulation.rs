//! A seeded simulation of the strong tier: three sites on an in-memory
//! network, in virtual time (tokio's paused clock, so a seed runs in
//! well under a second), under a random schedule of partitions, crashes
//! (the tier and replica dropped, restarted from their store) and
//! concurrent strong transactions from every site:
//!
//! - transfers between four accounts, each a read at the leader and a
//!   transaction guarded by `if_heads` on both accounts that moves an
//!   amount only if the source holds it;
//! - claims of usernames (`if_absent`) from several sites at once.
//!
//! After every step, at every running site, a consistent read of the
//! accounts must show no balance below zero and the starting total
//! (transactions are visible whole); every username must be held by at
//! most the one site whose claim was acknowledged. At the end, healed and
//! restarted, the sites must converge to the same documents.
//!
//! `SIM_SEEDS=A..B cargo test --release --test strong_simulation` runs
//! seeds A to B (default 0..6). The seed decides the workload and the
//! fault schedule; openraft's own election timers draw from its own
//! random source, so a failing seed may take a few runs to fail again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use archipelago::doc::Op;
use archipelago::protocol::Glob;
use archipelago::store::{Memory, Store};
use archipelago::strong::{MemoryNet, StrongConfig, StrongError, StrongTier};
use archipelago::txn::{Precondition, Txn, TxnDoc};
use archipelago::{DocId, Replica, ReplicaOptions, SiteName};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const ACCOUNTS: usize = 4;
const BALANCE: i64 = 100;
const USERNAMES: usize = 6;
const STEPS: usize = 40;

fn config() -> StrongConfig {
    let mut config = StrongConfig::new(
        SITES.iter().map(|s| s.parse().unwrap()).collect(),
        vec![Glob::new("accounts/*"), Glob::new("usernames/*")],
    );
    config.heartbeat_ms = 50;
    config.election_timeout_min_ms = 300;
    config.election_timeout_max_ms = 600;
    config.write_timeout_ms = 2_000;
    config
}

fn account(k: usize) -> DocId {
    format!("accounts/{k}").parse().unwrap()
}

fn username(k: usize) -> DocId {
    format!("usernames/u{k}").parse().unwrap()
}

fn set_balance(k: usize, value: i64, precondition: Precondition) -> TxnDoc {
    TxnDoc {
        id: account(k),
        ops: serde_json::from_value::<Vec<Op>>(
            json!([{"op": "set", "path": "/balance", "value": value}]),
        )
        .unwrap(),
        precondition,
    }
}

struct Site {
    name: SiteName,
    store: Arc<dyn Store>,
    /// `None` while crashed.
    running: Option<(Replica, StrongTier)>,
}

async fn start(net: &MemoryNet, name: &SiteName, store: Arc<dyn Store>) -> (Replica, StrongTier) {
    let config = config();
    let mut options = ReplicaOptions::new(name.clone());
    let covers = config.clone();
    options.strong = Arc::new(move |id| covers.covers(id));
    let replica = Replica::open(options, store.clone()).unwrap();
    let tier = StrongTier::start(
        name.clone(),
        config,
        replica.clone(),
        store,
        net.rpc(name.clone()),
    )
    .await
    .unwrap();
    net.join(name.clone(), tier.handler());
    (replica, tier)
}

/// A transfer of `amount` from `from` to `to`, through `tier`, if the
/// source holds it: `Ok(true)` when committed.
async fn transfer(tier: &StrongTier, from: usize, to: usize, amount: i64) -> Result<bool, String> {
    let read = match tier.read(&[account(from), account(to)]).await {
        Ok(read) => read,
        Err(_) => return Ok(false),
    };
    let balance = |k: usize| read[k].value.as_ref().and_then(|v| v["balance"].as_i64());
    let (Some(source), Some(target)) = (balance(0), balance(1)) else {
        return Err(format!("an account read without a balance: {read:?}"));
    };
    if source < amount {
        return Ok(false);
    }
    let txn = Txn {
        docs: vec![
            set_balance(
                from,
                source - amount,
                Precondition::if_heads(read[0].heads.clone()),
            ),
            set_balance(
                to,
                target + amount,
                Precondition::if_heads(read[1].heads.clone()),
            ),
        ],
        message: None,
    };
    match tier.write(&txn).await {
        Ok(_) => Ok(true),
        Err(StrongError::Bad(e) | StrongError::Op { message: e, .. }) => Err(e),
        Err(_) => Ok(false),
    }
}

/// Checks the invariants at every running site; `claims` maps each
/// username to the site whose claim was acknowledged.
fn check(sites: &[Site], claims: &BTreeMap<usize, String>, step: usize) -> Result<(), String> {
    let ids: Vec<DocId> = (0..ACCOUNTS).map(account).collect();
    for site in sites {
        let Some((replica, _)) = &site.running else {
            continue;
        };
        let views = replica.read_many(&ids).map_err(|e| e.to_string())?;
        let balances: Vec<i64> = views
            .iter()
            .map(|v| {
                v.as_ref()
                    .and_then(|v| v.value["balance"].as_i64())
                    .unwrap_or(BALANCE)
            })
            .collect();
        if let Some(k) = balances.iter().position(|b| *b < 0) {
            return Err(format!(
                "step {step}: {} shows account {k} below zero: {balances:?}",
                site.name
            ));
        }
        let total: i64 = balances.iter().sum();
        if total != BALANCE * ACCOUNTS as i64 {
            return Err(format!(
                "step {step}: {} shows the accounts summing to {total}: {balances:?}",
                site.name
            ));
        }
        for k in 0..USERNAMES {
            let holder = replica
                .read_json(&username(k), None)
                .map_err(|e| e.to_string())?
                .and_then(|v| v.value["holder"].as_str().map(str::to_owned));
            if let (Some(holder), Some(claimed)) = (&holder, claims.get(&k)) {
                if holder != claimed {
                    return Err(format!(
                        "step {step}: {} shows u{k} held by {holder}, but {claimed}'s claim was acknowledged",
                        site.name
                    ));
                }
            }
        }
    }
    Ok(())
}

/// One seed; what it did.
async fn simulate(seed: u64) -> Result<String, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let net = MemoryNet::new();
    let mut sites = Vec::new();
    for name in SITES {
        let name: SiteName = name.parse().unwrap();
        let store: Arc<dyn Store> = Arc::new(Memory::new());
        let running = Some(start(&net, &name, store.clone()).await);
        sites.push(Site {
            name,
            store,
            running,
        });
    }
    // The accounts, created once a leader takes writes.
    let create = Txn {
        docs: (0..ACCOUNTS)
            .map(|k| set_balance(k, BALANCE, Precondition::if_absent()))
            .collect(),
        message: None,
    };
    let mut created = false;
    for _ in 0..100 {
        let tier = &sites[0].running.as_ref().expect("running").1;
        match tier.write(&create).await {
            Ok(_) => {
                created = true;
                break;
            }
            Err(StrongError::PreconditionFailed { .. }) => {
                created = true;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    if !created {
        return Err("the accounts were never created".to_owned());
    }
    let mut claims: BTreeMap<usize, String> = BTreeMap::new();
    let (mut transfers, mut claimed, mut faults) = (0, 0, 0);
    for step in 0..STEPS {
        // Faults.
        match rng.random_range(0..10) {
            0 => {
                let k = rng.random_range(0..3);
                let others: Vec<SiteName> = sites
                    .iter()
                    .filter(|s| s.name != sites[k].name)
                    .map(|s| s.name.clone())
                    .collect();
                net.cut(&sites[k].name, &others);
                faults += 1;
            }
            1 => net.heal(),
            2 => {
                let k = rng.random_range(0..3);
                if let Some((_, tier)) = sites[k].running.take() {
                    net.leave(&sites[k].name);
                    tier.shutdown().await;
                    faults += 1;
                }
            }
            3 => {
                for site in sites.iter_mut().filter(|s| s.running.is_none()) {
                    site.running = Some(start(&net, &site.name, site.store.clone()).await);
                }
            }
            _ => {}
        }
        // Concurrent operations from every running site.
        let mut tasks = Vec::new();
        for site in &sites {
            let Some((_, tier)) = &site.running else {
                continue;
            };
            for _ in 0..rng.random_range(1..=3) {
                let tier = tier.clone();
                let name = site.name.to_string();
                if rng.random_bool(0.7) {
                    let from = rng.random_range(0..ACCOUNTS);
                    let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
                    let amount = rng.random_range(1..=60);
                    tasks.push(tokio::spawn(async move {
                        transfer(&tier, from, to, amount)
                            .await
                            .map(|done| (done, None))
                    }));
                } else {
                    let k = rng.random_range(0..USERNAMES);
                    tasks.push(tokio::spawn(async move {
                        let claim = Txn {
                            docs: vec![TxnDoc {
                                id: username(k),
                                ops: serde_json::from_value::<Vec<Op>>(
                                    json!([{"op": "set", "path": "/holder", "value": name}]),
                                )
                                .unwrap(),
                                precondition: Precondition::if_absent(),
                            }],
                            message: None,
                        };
                        Ok(match tier.write(&claim).await {
                            Ok(_) => (true, Some((k, name))),
                            Err(_) => (false, None),
                        })
                    }));
                }
            }
        }
        for task in tasks {
            match task.await.map_err(|e| e.to_string())?? {
                (true, Some((k, name))) => {
                    if let Some(earlier) = claims.insert(k, name.clone()) {
                        return Err(format!(
                            "step {step}: u{k} claimed by {earlier} and then by {name}"
                        ));
                    }
                    claimed += 1;
                }
                (true, None) => transfers += 1,
                _ => {}
            }
        }
        check(&sites, &claims, step)?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
    }
    // Heal, restart, converge.
    net.heal();
    for site in sites.iter_mut().filter(|s| s.running.is_none()) {
        site.running = Some(start(&net, &site.name, site.store.clone()).await);
    }
    let ids: Vec<DocId> = (0..ACCOUNTS)
        .map(account)
        .chain((0..USERNAMES).map(username))
        .collect();
    let mut converged = false;
    for _ in 0..200 {
        let heads: Vec<Vec<Option<Vec<archipelago::ChangeHash>>>> = sites
            .iter()
            .map(|s| {
                let (replica, _) = s.running.as_ref().expect("restarted");
                ids.iter().map(|id| replica.heads(id)).collect()
            })
            .collect();
        if heads.iter().all(|h| *h == heads[0]) {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check(&sites, &claims, STEPS)?;
    if !converged {
        return Err("the sites did not converge after healing".to_owned());
    }
    for site in &sites {
        if let Some((_, tier)) = &site.running {
            tier.shutdown().await;
        }
    }
    Ok(format!(
        "{transfers} transfers, {claimed} usernames claimed, {faults} faults"
    ))
}

fn seeds() -> std::ops::Range<u64> {
    match std::env::var("SIM_SEEDS") {
        Ok(range) => {
            let (a, b) = range.split_once("..").expect("SIM_SEEDS is a range A..B");
            a.parse().expect("SIM_SEEDS start")..b.parse().expect("SIM_SEEDS end")
        }
        Err(_) => 0..6,
    }
}

#[test]
fn strong_transactions_keep_their_invariants_under_partitions_and_crashes() {
    let mut failures = Vec::new();
    let (mut transfers_total, mut runs) = (0, 0);
    for seed in seeds() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        match runtime.block_on(simulate(seed)) {
            Ok(summary) => {
                eprintln!("seed {seed}: {summary}");
                transfers_total += 1;
            }
            Err(e) => failures.push(format!("seed {seed}: {e}")),
        }
        runs += 1;
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(transfers_total, runs);
}
