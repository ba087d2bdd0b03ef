//! `sync-node demo`: three sites on 127.0.0.1 with real QUIC (mutual TLS
//! from a fresh CA), real SQLite stores in a temporary directory, and UDP
//! relays between them (a few milliseconds of delay, and the switch that
//! partitions a site). The sites write concurrently, one site is cut off
//! while both sides sell the last units of two products, the partition
//! heals, and the demo prints its timings, the oversell of the plain counter
//! becoming one conflict report at every site that `us-east` compensates
//! once, the bounded counter (escrow) preventing its oversell instead (each
//! side sells what its rights allow, the next sale is refused), and
//! `converged` once every site holds the same heads and reports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use archipelago::conflict::{Conflict, Filter, Kind, Status};
use archipelago::doc::Op;
use archipelago::transport::relay::{Faults, Relay};
use archipelago::{DocId, Replica, SiteName};
use serde_json::json;

use crate::ca::init_ca;
use crate::config::{Config, PeerConfig};
use crate::init::{init, InitOptions};
use crate::Node;

/// Settings of a demo run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where the sites keep their files; a temporary directory when `None`.
    pub dir: Option<PathBuf>,
    /// Documents each site writes in the concurrent phase.
    pub docs: usize,
    /// How long one site stays cut off.
    pub partition: Duration,
    /// One-way delay added by every relay.
    pub delay: Duration,
    /// Fraction of datagrams every relay drops (0 to 1).
    pub loss: f64,
}

impl Default for DemoOptions {
    fn default() -> DemoOptions {
        DemoOptions {
            dir: None,
            docs: 200,
            partition: Duration::from_secs(3),
            delay: Duration::from_millis(5),
            loss: 0.0,
        }
    }
}

/// Longest wait for the sites to connect or converge.
const WAIT_MAX: Duration = Duration::from_secs(40);

const SITES: [&str; 3] = ["ap-south", "eu-west", "us-east"];

/// Appended to every site's `sync-node.toml`.
const DEMO_RULES: &str = r#"
[[rules]]
name = "stock-non-negative"
docs = "inventory/*"
path = "/stock"
min = 0
resolver = "us-east"
policy = "clamp"
"#;

/// Desk lamps us-east receives before the partition.
const STOCK: i64 = 5;
/// What each side of the partition sells of them.
const AP_SOUTH_SELLS: i64 = 3;
const US_EAST_SELLS: i64 = 4;

/// Headphones (inventory/sku-2, a bounded counter) us-east receives, and the
/// rights it gives ap-south before the partition.
const BOUNDED_STOCK: i64 = 6;
const AP_SOUTH_RIGHTS: i64 = 2;

/// The running demo cluster.
struct Cluster {
    nodes: Vec<Node>,
    /// Relays carrying `ap-south`'s connections (to eu-west, to us-east).
    ap_relays: Vec<Relay>,
    other_relays: Vec<Relay>,
}

fn site(name: &str) -> anyhow::Result<SiteName> {
    Ok(name.parse()?)
}

fn peer(name: &str, addr: SocketAddr) -> anyhow::Result<PeerConfig> {
    format!("{name}={addr}")
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))
}

/// Writes a node directory and starts the node.
async fn start_node(
    root: &Path,
    ca_dir: &Path,
    name: &str,
    peers: Vec<PeerConfig>,
) -> anyhow::Result<Node> {
    let mut options = InitOptions::new(site(name)?, root.join(name));
    options.ca_dir = Some(ca_dir.to_path_buf());
    options.peers = peers;
    options.force = true;
    let path = init(&options).with_context(|| format!("init {name}"))?;
    // The rule the oversell breaks; us-east compensates it.
    let mut config = std::fs::read_to_string(&path)?;
    config.push_str(DEMO_RULES);
    std::fs::write(&path, config)?;
    let node = Node::start(&Config::load(&path)?)
        .await
        .with_context(|| format!("start {name}"))?;
    Ok(node)
}

impl Cluster {
    /// Starts the three sites. The site whose name sorts first dials the
    /// others, so nodes start from the last: each dialer needs the bound
    /// address of the sites it dials (through a relay).
    async fn start(root: &Path, delay: Duration, loss: f64) -> anyhow::Result<Cluster> {
        let ca_dir = root.join("ca");
        init_ca(&ca_dir, true)?;
        let never_dialed: SocketAddr = "127.0.0.1:9".parse()?;
        let faults = Faults {
            delay,
            loss,
            seed: 7,
            ..Faults::default()
        };
        let us = start_node(
            root,
            &ca_dir,
            "us-east",
            vec![
                peer("ap-south", never_dialed)?,
                peer("eu-west", never_dialed)?,
            ],
        )
        .await?;
        let us_addr = us.sync_addr().context("us-east has no sync endpoint")?;
        let eu_to_us = Relay::start(us_addr, faults.clone()).await?;
        let ap_to_us = Relay::start(us_addr, faults.clone()).await?;
        let eu = start_node(
            root,
            &ca_dir,
            "eu-west",
            vec![
                peer("ap-south", never_dialed)?,
                peer("us-east", eu_to_us.local_addr())?,
            ],
        )
        .await?;
        let eu_addr = eu.sync_addr().context("eu-west has no sync endpoint")?;
        let ap_to_eu = Relay::start(eu_addr, faults).await?;
        let ap = start_node(
            root,
            &ca_dir,
            "ap-south",
            vec![
                peer("eu-west", ap_to_eu.local_addr())?,
                peer("us-east", ap_to_us.local_addr())?,
            ],
        )
        .await?;
        Ok(Cluster {
            nodes: vec![ap, eu, us],
            ap_relays: vec![ap_to_eu, ap_to_us],
            other_relays: vec![eu_to_us],
        })
    }

    fn replicas(&self) -> Vec<Replica> {
        self.nodes.iter().map(|n| n.replica().clone()).collect()
    }

    async fn all_connected(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if self
                .nodes
                .iter()
                .all(|n| n.peers().iter().all(|p| p.status.connected))
            {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(
                started.elapsed() < WAIT_MAX,
                "sites did not connect within {WAIT_MAX:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn set_partitioned(&self, partitioned: bool) {
        for relay in &self.ap_relays {
            relay.set_partitioned(partitioned);
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        for node in self.nodes {
            node.shutdown().await?;
        }
        for relay in self.ap_relays.into_iter().chain(self.other_relays) {
            relay.stop().await;
        }
        Ok(())
    }
}

/// Every document with sorted heads, in order.
/// Waits until every site holds the same documents at the same heads,
/// compared by their digests (as `sync-node check` does).
async fn converge(replicas: &[Replica]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let first = replicas[0].heads_digest("");
        if replicas[1..].iter().all(|r| r.heads_digest("") == first) {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < WAIT_MAX,
            "sites did not converge within {WAIT_MAX:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ops(value: serde_json::Value) -> anyhow::Result<Vec<Op>> {
    Ok(serde_json::from_value(value)?)
}

/// Commits on a blocking thread (commits wait for the disk).
async fn commit(replica: &Replica, id: &str, ops: Vec<Op>, message: &str) -> anyhow::Result<()> {
    let (replica, id, message) = (replica.clone(), id.parse::<DocId>()?, message.to_owned());
    tokio::task::spawn_blocking(move || replica.apply_ops(&id, &ops, Some(&message))).await??;
    Ok(())
}

/// Waits until every site lists the same reports, all closed.
async fn reports_settled(replicas: &[Replica]) -> anyhow::Result<Vec<Conflict>> {
    let started = Instant::now();
    loop {
        let lists: Vec<Vec<Conflict>> = replicas
            .iter()
            .map(|r| r.conflicts(&Filter::default()))
            .collect::<Result<_, _>>()?;
        let invariant_closed = lists[0]
            .iter()
            .any(|c| c.kind == Kind::Invariant && c.status == Status::Resolved);
        if invariant_closed && lists.iter().all(|l| *l == lists[0]) {
            return Ok(lists[0].clone());
        }
        anyhow::ensure!(
            started.elapsed() < WAIT_MAX,
            "conflict reports did not settle within {WAIT_MAX:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn stock(replica: &Replica) -> anyhow::Result<serde_json::Value> {
    let view = replica
        .read_json(&"inventory/sku-1".parse()?, None)?
        .context("inventory/sku-1 is missing")?;
    Ok(view.value)
}

/// The rights per site of the headphones' stock, as JSON.
fn rights(replica: &Replica) -> anyhow::Result<serde_json::Value> {
    let state = replica
        .escrow(&"inventory/sku-2".parse()?, "/stock")?
        .context("inventory/sku-2 has no bounded stock")?;
    Ok(json!(state.rights_all()))
}

/// Sells one headphone at `replica`, waiting briefly for rights: `None`
/// when sold, the refusal when not.
async fn sell_bounded(replica: &Replica) -> anyhow::Result<Option<String>> {
    let replica = replica.clone();
    let id: DocId = "inventory/sku-2".parse()?;
    let ops = ops(json!([{"op": "inc", "path": "/stock", "by": -1}]))?;
    let result = tokio::task::spawn_blocking(move || {
        replica.with_rights(&id, Some(Duration::from_millis(300)), || {
            replica.apply_ops(&id, &ops, Some("sell 1"))
        })
    })
    .await?;
    match result {
        Ok(_) => Ok(None),
        Err(archipelago::Error::Op(op)) if op.code() == "insufficient_rights" => {
            Ok(Some(format!("{} ({op})", op.code())))
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs the demo, printing as it goes.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let temp = tempfile::tempdir()?;
    let root = options
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    println!(
        "archipelago demo: sites {} on 127.0.0.1, QUIC + mutual TLS, SQLite in {}",
        SITES.join(", "),
        root.display()
    );
    println!(
        "  links: {} ms one-way delay, {:.1}% loss (UDP relays)",
        options.delay.as_millis(),
        options.loss * 100.0
    );
    let cluster = Cluster::start(&root, options.delay, options.loss).await?;
    let connected = cluster.all_connected().await?;
    println!("  connected all 3 sites in {} ms", connected.as_millis());
    let replicas = cluster.replicas();

    // Phase 1: every site writes at once.
    let writes = Instant::now();
    commit(&replicas[2], "inventory/sku-1", ops(json!([{"op": "set", "path": "/stock", "value": STOCK, "as": "counter"}, {"op": "set", "path": "/name", "value": "desk lamp"}]))?, "receive stock").await?;
    let mut tasks = Vec::new();
    for (n, replica) in replicas.iter().enumerate() {
        let replica = replica.clone();
        let docs = options.docs;
        tasks.push(tokio::spawn(async move {
            for i in 0..docs {
                let value = json!([{"op": "set", "path": "/total_cents", "value": 1000 + i}, {"op": "set", "path": "/site", "value": SITES[n]}]);
                commit(&replica, &format!("orders/{}-{i}", SITES[n]), ops(value)?, "new order").await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    commit(&replicas[2], "inventory/sku-2", ops(json!([{"op": "set", "path": "/stock", "value": BOUNDED_STOCK, "as": "bounded", "min": 0}, {"op": "set", "path": "/name", "value": "headphones"}]))?, "receive stock").await?;
    {
        let (us, id) = (replicas[2].clone(), "inventory/sku-2".parse::<DocId>()?);
        let ap = site("ap-south")?;
        tokio::task::spawn_blocking(move || {
            us.escrow_transfer(
                &id,
                "/stock",
                archipelago::escrow::PoolKind::Down,
                &ap,
                AP_SOUTH_RIGHTS,
                Some("rights for ap-south"),
            )
        })
        .await??;
    }
    let converged = converge(&replicas).await?;
    println!(
        "  concurrent writes: {} orders ({} per site) written in {} ms, all sites agree {} ms later",
        3 * options.docs,
        options.docs,
        (writes.elapsed() - converged).as_millis(),
        converged.as_millis()
    );
    println!(
        "  us-east received {STOCK} desk lamps (inventory/sku-1, a plain counter); every site sees {}",
        stock(&replicas[0])?
    );
    println!(
        "  us-east received {BOUNDED_STOCK} headphones (inventory/sku-2, a bounded counter, min 0) \
         and gave ap-south the rights to sell {AP_SOUTH_RIGHTS}: rights {}",
        rights(&replicas[0])?
    );

    // Phase 2: ap-south is cut off; both sides sell the last units.
    cluster.set_partitioned(true);
    println!(
        "  partition: ap-south cut off for {} ms",
        options.partition.as_millis()
    );
    for (n, sold) in [(0, AP_SOUTH_SELLS), (2, US_EAST_SELLS)] {
        let before = stock(&replicas[n])?["stock"].clone();
        commit(&replicas[n], "inventory/sku-1", ops(json!([{"op": "inc", "path": "/stock", "by": -sold}, {"op": "set", "path": "/last_sale", "value": SITES[n]}]))?, &format!("sell {sold}")).await?;
        println!(
            "    {:<8} sells {sold} of the {before} it sees in stock",
            SITES[n]
        );
    }
    // The bounded counter: each side sells one at a time until refused.
    let mut bounded_sold = Vec::new();
    for n in [0, 2] {
        let mut sold = 0;
        let refusal = loop {
            match sell_bounded(&replicas[n]).await? {
                None => sold += 1,
                Some(refusal) => break refusal,
            }
            anyhow::ensure!(
                sold <= BOUNDED_STOCK,
                "{} sold more than the stock",
                SITES[n]
            );
        };
        println!(
            "    {:<8} sells {sold} headphones, then is refused: {refusal}",
            SITES[n]
        );
        bounded_sold.push(sold);
    }
    anyhow::ensure!(
        bounded_sold.iter().sum::<i64>() == BOUNDED_STOCK,
        "the sides together sold {bounded_sold:?} of {BOUNDED_STOCK}"
    );
    commit(
        &replicas[1],
        "orders/eu-west-during-partition",
        ops(json!([{"op": "set", "path": "/total_cents", "value": 4200}]))?,
        "new order",
    )
    .await?;
    tokio::time::sleep(options.partition).await;
    println!("    ap-south sees {}", stock(&replicas[0])?);
    println!("    us-east  sees {}", stock(&replicas[2])?);
    anyhow::ensure!(
        replicas[0].heads_digest("") != replicas[2].heads_digest(""),
        "the partition did not separate the sites"
    );

    // Phase 3: heal.
    cluster.set_partitioned(false);
    let healed = converge(&replicas).await?;
    println!(
        "  healed: all sites agree {} ms after the partition ended",
        healed.as_millis()
    );
    let reports = reports_settled(&replicas).await?;
    let oversell = reports
        .iter()
        .find(|c| c.kind == Kind::Invariant)
        .context("the oversell raised no report")?;
    println!(
        "  oversold: each side alone kept stock >= 0, the merge made it \
         {STOCK} - {AP_SOUTH_SELLS} - {US_EAST_SELLS} = {}",
        oversell.provisional
    );
    for report in &reports {
        println!(
            "    report {} {:<16} {} {:<11} at every site: {}{}",
            report.id,
            report.kind.as_str(),
            report.path,
            report.rule.as_deref().unwrap_or("-"),
            report.status,
            match (&report.resolved_by, &report.note) {
                (Some(by), Some(note)) => format!(" by {by}: {note}"),
                (Some(by), None) => format!(" by {by}"),
                _ => String::new(),
            }
        );
    }
    if let Some(open) = reports.iter().find(|c| c.status == Status::Open) {
        println!(
            "    the {} report stays open: both sides set it and no rule decides \
             between them, so it waits for a person (`sync-node conflicts resolve`); \
             until then every site shows {}, the value automerge kept",
            open.path, open.provisional
        );
    }
    for (n, replica) in replicas.iter().enumerate() {
        println!("    {:<8} sees {}", SITES[n], stock(replica)?);
        anyhow::ensure!(
            stock(replica)?["stock"] == 0,
            "{} does not show the compensated stock",
            SITES[n]
        );
    }
    for (n, replica) in replicas.iter().enumerate() {
        let view = replica
            .read_json(&"inventory/sku-2".parse()?, None)?
            .context("inventory/sku-2 is missing")?;
        anyhow::ensure!(
            view.value["stock"] == 0,
            "{} shows {} headphones",
            SITES[n],
            view.value["stock"]
        );
    }
    anyhow::ensure!(
        !reports.iter().any(|r| r.doc.as_str() == "inventory/sku-2"),
        "the bounded counter raised a report"
    );
    println!(
        "  prevented: the headphones (bounded) are at 0 at every site, never below, and raised no report"
    );
    let oversold = -(STOCK - AP_SOUTH_SELLS - US_EAST_SELLS);
    println!(
        "  compensated once by us-east (the rule's resolver): -{oversold} + {oversold} = 0 at every \
         site, and the report is resolved everywhere"
    );
    let docs = replicas[0].stats().docs;
    cluster.stop().await?;
    println!(
        "converged: {} documents identical at {} sites in {:.1} s",
        docs,
        SITES.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
