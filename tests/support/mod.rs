//! Setup shared by the tests that run sites over QUIC: names, in-memory
//! replicas, loopback addresses, and a comparable view of a replica.

// Each test file uses a different subset.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use archipelago::store::Memory;
use archipelago::{ChangeHash, DocId, Replica, ReplicaOptions, SiteName};
use serde_json::json;

pub(crate) fn site(name: &str) -> SiteName {
    name.parse().unwrap()
}

pub(crate) fn doc(name: &str) -> DocId {
    name.parse().unwrap()
}

pub(crate) fn replica(name: &str) -> Replica {
    Replica::open(ReplicaOptions::new(site(name)), Arc::new(Memory::new())).unwrap()
}

pub(crate) fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// An address nothing listens on, for peers that are never dialed.
pub(crate) fn nowhere() -> SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

/// Every document with sorted heads, in order.
pub(crate) fn index(replica: &Replica) -> Vec<(DocId, Vec<ChangeHash>)> {
    let mut index = replica.index();
    for (_, heads) in &mut index {
        heads.sort();
    }
    index.sort();
    index
}

/// Writes `{"n": n, "by": SITE}` as the whole document `id`.
pub(crate) fn write(replica: &Replica, id: &str, n: i64) {
    replica
        .put_json(
            &doc(id),
            &json!({ "n": n, "by": replica.site().as_str() }),
            None,
        )
        .unwrap();
}
