//! The strong tier: linearizable, serializable transactions on chosen
//! namespaces, agreed through Raft ([openraft]) among voter sites, beside
//! the CRDT core that stays writable everywhere.
//!
//! The flow of a strong write: the API hands a [`crate::txn::Txn`] whose
//! documents all lie under the tier's prefixes to [`StrongTier::write`].
//! A follower forwards it to the leader over the sites' QUIC connections
//! (a stream of its own per call). The leader's proposer takes the writes
//! waiting, checks each one's preconditions against the state every earlier
//! committed entry left (the leader proposes only once its state machine
//! applied every entry before its own), makes the automerge changes once,
//! on copies of the documents, and proposes them as one log entry. When the
//! entry is committed, every voter's state machine applies the carried
//! changes to its replica (one durable write with the machine's own state),
//! so every site ends with the same changes and heads; sites outside the
//! tier receive them by ordinary sync, held back like any transaction.
//!
//! - [`command`]: what a log entry carries and what applying it answers.
//! - `log`: the Raft log and vote, durable in the node's [`Store`].
//! - `machine`: the state machine over the [`Replica`] (strong documents,
//!   leases), and its snapshots.
//! - `network`: the RPCs between sites, over the [`Rpc`] seam (QUIC in a
//!   node, memory in tests and the simulation).
//! - `tier`: [`StrongTier`], the running tier: proposer, forwarding,
//!   linearizable reads, membership, status.
//! - `history` (feature `sim`): a linearizability checker for histories
//!   recorded by tests against the tier.
//!
//! Invariants:
//! - Strong documents change only through the log: the replica refuses
//!   local writes to them ([`crate::ReplicaOptions::strong`]), and the
//!   state machine is the only writer, applying each entry's changes in
//!   log order.
//! - A change is made once, by the leader of one term, with an actor of
//!   that term ([`strong_actor`]): one actor's sequence numbers never fork,
//!   because within a term one leader appends and waits for each entry to
//!   apply before making the next.
//! - A write is answered `no_quorum` only if it was never proposed (the
//!   leader heard from a majority too long ago, or there is no leader);
//!   a proposed write whose fate is unknown when the caller stops waiting
//!   is answered as unknown, never as refused.
//!
//! [`Store`]: crate::store::Store
//! [`Replica`]: crate::Replica

pub mod command;
#[cfg(feature = "sim")]
pub mod history;
// openraft's storage traits fix their error type, which is large.
#[allow(clippy::result_large_err)]
mod log;
#[allow(clippy::result_large_err)]
mod machine;
mod network;
mod tier;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::id::SiteName;
use crate::protocol::Glob;

pub use command::{Command, Lease, Response};
pub use network::{BoxFuture, MemoryNet, Rpc, RpcError, RpcHandler, RPC_BYTES_MAX};
pub use tier::{
    LeaseView, MemberChange, StrongError, StrongRead, StrongStatus, StrongTier, VoterStatus,
};

openraft::declare_raft_types!(
    /// The types openraft runs the strong tier with: sites are nodes
    /// (`u64` ids from [`node_id`], the site's name as the node's address),
    /// entries carry [`Command`]s, snapshots are bytes.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Vec<u8>,
);

/// The openraft node of a site.
pub type Raft = openraft::Raft<TypeConfig>;

/// The Raft node id of `site`: the first 8 bytes of the SHA-256 of its
/// name, the same at every site.
pub fn node_id(site: &SiteName) -> u64 {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::digest(format!("archipelago strong node\0{site}").as_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(id)
}

/// The actor a leader writes strong changes with during `term`: the site's
/// bytes, a zero, then 16 bytes derived from the term (the layout of every
/// actor id, so a change still names its site).
pub fn strong_actor(site: &SiteName, term: u64) -> automerge::ActorId {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::digest(format!("archipelago strong actor\0{site}\0{term}").as_bytes());
    let mut bytes = site.as_str().as_bytes().to_vec();
    bytes.push(0);
    bytes.extend_from_slice(&digest[..16]);
    automerge::ActorId::from(bytes)
}

/// Settings of the strong tier (`[strong]` in a node's config).
#[derive(Debug, Clone)]
pub struct StrongConfig {
    /// The voter sites the tier starts with (3 or 5). Later changes go
    /// through [`StrongTier::change_members`] and the log.
    pub voters: Vec<SiteName>,
    /// Documents written only through the tier.
    pub prefixes: Vec<Glob>,
    /// Interval of the leader's heartbeats, and how long the leader waits
    /// for a follower to answer an append (openraft uses one for both): it
    /// must exceed the longest round trip between voters plus a follower's
    /// durable write of the entries.
    pub heartbeat_ms: u64,
    /// Least time a follower waits without a heartbeat before it stands
    /// for election.
    pub election_timeout_min_ms: u64,
    /// Most time a follower waits without a heartbeat before it stands for
    /// election.
    pub election_timeout_max_ms: u64,
    /// How long a write waits to be committed before it is answered as
    /// unknown.
    pub write_timeout_ms: u64,
    /// Log entries after which a snapshot is taken and the log before it
    /// purged.
    pub snapshot_logs: u64,
    /// Most transactions one log entry carries.
    pub batch_txns_max: usize,
}

impl StrongConfig {
    /// Defaults for WAN links between `voters`, for documents under
    /// `prefixes`.
    pub fn new(voters: Vec<SiteName>, prefixes: Vec<Glob>) -> StrongConfig {
        StrongConfig {
            voters,
            prefixes,
            heartbeat_ms: 250,
            election_timeout_min_ms: 1_000,
            election_timeout_max_ms: 2_000,
            write_timeout_ms: 5_000,
            snapshot_logs: 10_000,
            batch_txns_max: 256,
        }
    }

    /// Whether `doc` is written through the tier.
    pub fn covers(&self, doc: &crate::DocId) -> bool {
        self.prefixes.iter().any(|glob| glob.matches(doc.as_str()))
    }

    /// Checks the settings: 1 to 7 distinct voters (3 or 5 in production:
    /// 1 is for tests), sane timers.
    pub fn check(&self) -> Result<(), String> {
        let mut voters = self.voters.clone();
        voters.sort();
        voters.dedup();
        if voters.len() != self.voters.len() {
            return Err("a voter is named twice".to_owned());
        }
        if self.voters.is_empty() || self.voters.len() > 7 {
            return Err(format!(
                "the tier needs 1 to 7 voters, not {}",
                self.voters.len()
            ));
        }
        let ids: BTreeMap<u64, &SiteName> = self.voters.iter().map(|s| (node_id(s), s)).collect();
        if ids.len() != self.voters.len() {
            return Err("two voters' names map to one node id".to_owned());
        }
        if self.heartbeat_ms == 0 || self.heartbeat_ms * 3 > self.election_timeout_min_ms {
            return Err(format!(
                "heartbeat_ms ({}) must be above 0 and at most a third of election_timeout_min_ms ({})",
                self.heartbeat_ms, self.election_timeout_min_ms
            ));
        }
        if self.election_timeout_min_ms >= self.election_timeout_max_ms {
            return Err("election_timeout_min_ms must be below election_timeout_max_ms".to_owned());
        }
        if self.write_timeout_ms == 0 || self.batch_txns_max == 0 || self.snapshot_logs == 0 {
            return Err(
                "write_timeout_ms, batch_txns_max and snapshot_logs must be above 0".to_owned(),
            );
        }
        Ok(())
    }

    fn raft_config(&self, site: &SiteName) -> openraft::Config {
        openraft::Config {
            cluster_name: "archipelago-strong".to_owned(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            max_payload_entries: 64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_logs),
            max_in_snapshot_log_to_keep: 1_000,
            install_snapshot_timeout: 30_000,
            ..openraft::Config::default()
        }
        .validate()
        .unwrap_or_else(|e| {
            tracing::warn!(%site, error = %e, "strong tier timers refused; using openraft's defaults");
            openraft::Config::default()
        })
    }

    /// How long since the leader last heard from a majority before it
    /// stops proposing.
    fn quorum_silence_max(&self) -> Duration {
        Duration::from_millis(self.election_timeout_max_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str) -> SiteName {
        name.parse().unwrap()
    }

    #[test]
    fn node_ids_and_actors_are_stable_and_distinct() {
        assert_eq!(node_id(&site("us-east")), node_id(&site("us-east")));
        assert_ne!(node_id(&site("us-east")), node_id(&site("eu-west")));
        let a = strong_actor(&site("us-east"), 3);
        assert_eq!(a, strong_actor(&site("us-east"), 3));
        assert_ne!(a, strong_actor(&site("us-east"), 4));
        assert!(a.to_bytes().starts_with(b"us-east\0"));
    }

    #[test]
    fn a_config_with_bad_voters_or_timers_is_refused() {
        let glob = Glob::new("accounts/*");
        let good = StrongConfig::new(vec![site("a"), site("b"), site("c")], vec![glob]);
        assert!(good.check().is_ok());
        let mut twice = good.clone();
        twice.voters.push(site("a"));
        assert!(twice.check().is_err());
        let mut none = good.clone();
        none.voters.clear();
        assert!(none.check().is_err());
        let mut timers = good.clone();
        timers.heartbeat_ms = 900;
        assert!(timers.check().is_err());
        assert!(good.covers(&"accounts/1".parse().unwrap()));
        assert!(!good.covers(&"orders/1".parse().unwrap()));
    }
}
