//! archipelago replicates business data across geographic sites with
//! automerge CRDTs: every site writes locally without coordination, sites
//! exchange changes, all replicas converge, and semantic conflicts that a
//! merge cannot decide are reported so business rules can resolve them.
//!
//! This crate is the library a multi-region service embeds; the `sync-node`
//! daemon is built on it. The main types:
//!
//! - [`Replica`]: the documents of one site over a [`store::Store`], with
//!   durable commits, JSON-pointer ops, JSON and typed (autosurgeon) access,
//!   history and time travel, and a subscription to committed changes.
//! - [`store::Sqlite`] and [`store::Memory`]: storage backends.
//! - [`DocId`], [`SiteName`]: validated identifiers.
//!
//! Two replicas of different sites exchanging changes by hand (the sync
//! protocol automates exactly this):
//!
//! ```
//! use std::sync::Arc;
//! use archipelago::{store::Memory, Origin, Replica, ReplicaOptions};
//!
//! #[derive(Debug, Default, PartialEq, autosurgeon::Hydrate, autosurgeon::Reconcile)]
//! struct Item { name: String, price: i64 }
//!
//! let east = Replica::open(ReplicaOptions::new("us-east".parse()?), Arc::new(Memory::new()))?;
//! let west = Replica::open(ReplicaOptions::new("us-west".parse()?), Arc::new(Memory::new()))?;
//! let id = "catalog/item-1".parse()?;
//! east.put(&id, &Item { name: "lamp".into(), price: 30 }, Some("create"))?;
//!
//! // Ship everything east has to west.
//! let changes = east.changes_after(&id, &[])?.expect("document exists");
//! west.apply_changes(&id, &changes, Origin::Peer(east.site().clone()))?;
//!
//! // Concurrent edits of different fields both survive the merge.
//! let west_heads = west.heads(&id).expect("document exists");
//! east.update(&id, None, |item: &mut Item| item.price = 25)?;
//! west.update(&id, None, |item: &mut Item| item.name = "desk lamp".into())?;
//! let to_west = east.changes_after(&id, &west_heads)?.expect("exists");
//! let to_east = west.changes_after(&id, &west_heads)?.expect("exists");
//! west.apply_changes(&id, &to_west, Origin::Peer(east.site().clone()))?;
//! east.apply_changes(&id, &to_east, Origin::Peer(west.site().clone()))?;
//!
//! let merged: Item = east.get(&id)?.expect("exists");
//! assert_eq!(merged, Item { name: "desk lamp".into(), price: 25 });
//! assert_eq!(west.get::<Item>(&id)?, Some(merged));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod clients;
pub mod conflict;
pub mod doc;
mod error;
pub mod escrow;
pub mod id;
pub mod protocol;
mod replica;
pub mod saga;
#[cfg(feature = "sim")]
pub mod sim;
pub mod store;
pub mod strong;
pub mod transport;
pub mod txn;

pub use error::Error;
pub use id::{ChangeHash, DocId, InvalidId, SiteName};
pub use replica::{
    decode_change, load_document, ActorSource, Applied, Clock, Commit, Committed, DocView,
    EscrowStats, HeadsDigest, HoldLimits, Origin, RandomActors, Replica, ReplicaOptions,
    ReplicaStats, RightsWanted, Snapshot, SystemClock, TxnStats, READ_DOCS_MAX,
};

pub use automerge;
pub use autosurgeon;
