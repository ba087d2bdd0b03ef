//! Two services, one per region, each embedding a replica that syncs with
//! the other over QUIC with mutual TLS: the same protocol a `sync-node`
//! speaks, so an embedded replica can as well be a peer of its site's node.
//! Each region edits a different field of one typed record at the same
//! time; both edits arrive at the other region on their own, and the
//! replicas end identical, as their heads digests show.
//!
//! Run: `cargo run --example embedded_sync`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use archipelago::store::Sqlite;
use archipelago::transport::quic::SyncEndpoint;
use archipelago::transport::tls::CertificateAuthority;
use archipelago::{Committed, DocId, Origin, Replica, ReplicaOptions, SiteName};
use autosurgeon::{Hydrate, Reconcile};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Default, PartialEq, Hydrate, Reconcile)]
struct Item {
    name: String,
    price_cents: i64,
    warehouse: String,
}

/// Longest wait for something to arrive over the loopback link.
const WAIT: Duration = Duration::from_secs(10);

/// Waits for the next change of `id` that came from a peer.
async fn remote_change(
    feed: &mut broadcast::Receiver<Committed>,
    id: &DocId,
) -> anyhow::Result<Committed> {
    tokio::time::timeout(WAIT, async {
        loop {
            let committed = feed.recv().await?;
            if &committed.doc == id && matches!(committed.origin, Origin::Peer(_)) {
                return Ok(committed);
            }
        }
    })
    .await?
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // In production the CA is `sync-node ca init`, and each service gets
    // its key and certificate from `sync-node init --ca-dir` (loaded with
    // `SiteIdentity::from_pem`).
    let ca = CertificateAuthority::generate("example cluster")?;
    let (east_site, west_site): (SiteName, SiteName) = ("us-east".parse()?, "us-west".parse()?);
    let open = |site: &SiteName| -> anyhow::Result<Replica> {
        let store = Sqlite::open(dir.path().join(format!("{site}.db")))?;
        Ok(Replica::open(
            ReplicaOptions::new(site.clone()),
            Arc::new(store),
        )?)
    };
    let (east, west) = (open(&east_site)?, open(&west_site)?);

    // Of two sites the one whose name sorts first dials; us-west only
    // accepts, so its entry for us-east needs no real address.
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let never_dialed: SocketAddr = "127.0.0.1:9".parse()?;
    let west_endpoint = SyncEndpoint::bind(
        loopback,
        ca.issue_site(&west_site)?,
        ca.cert_der(),
        vec![(east_site.clone(), never_dialed)],
        west.clone(),
    )?;
    let east_endpoint = SyncEndpoint::bind(
        loopback,
        ca.issue_site(&east_site)?,
        ca.cert_der(),
        vec![(west_site.clone(), west_endpoint.local_addr()?)],
        east.clone(),
    )?;

    let id: DocId = "inventory/sku-1".parse()?;
    let mut west_feed = west.subscribe();
    let mut east_feed = east.subscribe();
    east.put(
        &id,
        &Item {
            name: "desk lamp".into(),
            price_cents: 3000,
            warehouse: "NJ-1".into(),
        },
        Some("create sku-1"),
    )?;
    remote_change(&mut west_feed, &id).await?;
    let arrived: Option<Item> = west.get(&id)?;
    println!("us-west received {id}: {arrived:?}");

    // Both regions edit different fields at the same time; each edit is
    // pushed to the other region as it commits.
    east.update(&id, Some("price drop"), |item: &mut Item| {
        item.price_cents = 2500
    })?;
    west.update(&id, Some("moved stock"), |item: &mut Item| {
        item.warehouse = "CA-2".into()
    })?;
    remote_change(&mut west_feed, &id).await?;
    remote_change(&mut east_feed, &id).await?;

    let at_east: Option<Item> = east.get(&id)?;
    let at_west: Option<Item> = west.get(&id)?;
    println!("us-east sees {at_east:?}");
    println!("us-west sees {at_west:?}");
    anyhow::ensure!(at_east == at_west, "the regions disagree");
    anyhow::ensure!(
        at_east
            .as_ref()
            .map(|i| (i.price_cents, i.warehouse.as_str()))
            == Some((2500, "CA-2")),
        "an edit was lost"
    );
    let (east_digest, west_digest) = (east.heads_digest(""), west.heads_digest(""));
    anyhow::ensure!(east_digest == west_digest, "the replicas differ");
    println!(
        "both edits kept at both regions; {} document, digest {} at both",
        east_digest.docs,
        &east_digest.to_hex()[..16]
    );
    for status in east_endpoint.peer_status() {
        println!(
            "us-east's peer {}: connected {}",
            status.site, status.connected
        );
    }

    east_endpoint.shutdown().await;
    west_endpoint.shutdown().await;
    Ok(())
}
