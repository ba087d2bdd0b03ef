//! [`StrongTier`]: the strong tier running at one site. It owns the
//! openraft node, the leader's proposer (which batches the writes waiting
//! into one log entry, making their changes on copies of the documents),
//! forwarding of writes and reads from followers to the leader, lease and
//! membership requests, and the tier's status.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use automerge::transaction::{CommitOptions, Transaction};
use automerge::{Automerge, ChangeHash, ReadDoc as _};
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, RaftMetrics, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::command::{Command, Lease, Response, StrongChange, StrongTxn};
use super::log::LogStore;
use super::machine::StateMachine;
use super::network::{
    call, encode, AnsweredDoc, BoxFuture, Network, ReadDoc, Reply, Request, Rpc, RpcError,
    RpcHandler, WriteAnswer, WriteDoc, WriteRequest,
};
use super::{node_id, strong_actor, Raft, StrongConfig};
use crate::doc::Op;
use crate::id::{DocId, SiteName};
use crate::replica::{Commit, Replica};
use crate::store::Store;
use crate::txn::{Precondition, Txn, TxnCommit, TxnHeader, TxnId};

type NodeId = u64;

/// Proposals queued for the leader's proposer.
const PROPOSALS_QUEUED_MAX: usize = 4_096;

/// How often a write waiting for a leader looks again.
const LEADER_POLL: Duration = Duration::from_millis(20);

/// Why a strong operation did not happen, or may not have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum StrongError {
    /// No majority of voters can be reached from here: the write was not
    /// proposed and nothing was applied.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// The write was proposed, but whether it was committed is not known
    /// yet (it may still be, or may have been lost with its leader).
    #[error("the outcome is unknown: {0}")]
    Unknown(String),
    /// A precondition does not hold; nothing was applied.
    #[error("precondition failed for {doc}: {reason}")]
    PreconditionFailed {
        /// The document whose precondition failed.
        doc: DocId,
        /// What differs.
        reason: String,
    },
    /// An op does not fit its document; nothing was applied.
    #[error("{doc}: {message}")]
    Op {
        /// The document.
        doc: DocId,
        /// Why the op does not fit.
        message: String,
    },
    /// The request is malformed (a document outside the tier, too many
    /// documents, ...); nothing was applied.
    #[error("{0}")]
    Bad(String),
    /// This site is not the leader (between sites only: the caller asks
    /// again).
    #[error("not the leader")]
    NotLeader,
    /// The tier failed here (storage, shutdown).
    #[error("strong tier: {0}")]
    Failed(String),
}

/// A change of the tier's voters, through joint consensus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// Make the site a voter (first a learner that catches up).
    Add(SiteName),
    /// Take the site out of the voters (and the tier).
    Remove(SiteName),
}

/// One voter as the tier's status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VoterStatus {
    /// The site.
    pub site: String,
    /// The last log index the leader knows it holds (leader only).
    pub match_index: Option<u64>,
    /// How far it is behind the leader's log (leader only).
    pub lag: Option<u64>,
}

/// The tier as one site sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StrongStatus {
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    /// The current term.
    pub term: u64,
    /// The leader's site, if known.
    pub leader: Option<String>,
    /// The last log index applied here (every entry up to it is committed).
    pub commit_index: Option<u64>,
    /// The last index in this site's log.
    pub last_log_index: Option<u64>,
    /// The voters, with their match index and lag when this site leads.
    pub voters: Vec<VoterStatus>,
    /// Sites that receive the log without voting.
    pub learners: Vec<String>,
    /// Milliseconds since a majority last answered the leader (leader
    /// only).
    pub millis_since_quorum_ack: Option<u64>,
    /// Elections seen here since the tier started.
    pub elections: u64,
    /// Strong transactions committed through this site.
    pub commits: u64,
}

/// A lease as [`StrongTier::leases`] shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseView {
    /// The lease's name.
    pub name: String,
    /// Its holder.
    pub holder: String,
    /// The holder's epoch.
    pub epoch: u64,
    /// When it lapses unless renewed (ms since the Unix epoch).
    pub expires_ms: i64,
}

/// A document read through the leader.
#[derive(Debug, Clone, PartialEq)]
pub struct StrongRead {
    /// The document.
    pub id: DocId,
    /// Its heads at the read.
    pub heads: Vec<ChangeHash>,
    /// Its value, `None` when it does not exist.
    pub value: Option<serde_json::Value>,
}

/// A write waiting for the proposer.
struct Proposal {
    txn: Txn,
    reply: oneshot::Sender<Result<WriteAnswer, StrongError>>,
}

struct Inner {
    site: SiteName,
    node: NodeId,
    config: StrongConfig,
    raft: Raft,
    replica: Replica,
    machine: StateMachine,
    rpc: Arc<dyn Rpc>,
    proposals: mpsc::Sender<Proposal>,
    /// When each peer last accepted this node's appends.
    acks: super::network::Acks,
    commits: AtomicU64,
    elections: AtomicU64,
    /// Transactions the proposer has made, for their ids.
    made: AtomicU64,
}

/// The strong tier at one site. Clones share it.
#[derive(Clone)]
pub struct StrongTier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StrongTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StrongTier")
            .field("site", &self.inner.site)
            .finish_non_exhaustive()
    }
}

fn failed(e: impl std::fmt::Display) -> StrongError {
    StrongError::Failed(e.to_string())
}

fn hashes(bytes: &[[u8; 32]]) -> Vec<ChangeHash> {
    bytes.iter().map(|b| ChangeHash(*b)).collect()
}

impl WriteRequest {
    fn from_txn(txn: &Txn) -> Result<WriteRequest, StrongError> {
        let docs = txn
            .docs
            .iter()
            .map(|doc| {
                Ok(WriteDoc {
                    id: doc.id.clone(),
                    ops_json: serde_json::to_string(&doc.ops).map_err(failed)?,
                    if_heads: doc
                        .precondition
                        .if_heads
                        .as_ref()
                        .map(|heads| heads.iter().map(|h| h.0).collect()),
                    if_absent: doc.precondition.if_absent,
                })
            })
            .collect::<Result<_, StrongError>>()?;
        Ok(WriteRequest {
            docs,
            message: txn.message.clone(),
        })
    }

    fn into_txn(self) -> Result<Txn, StrongError> {
        let docs = self
            .docs
            .into_iter()
            .map(|doc| {
                let ops: Vec<Op> = serde_json::from_str(&doc.ops_json)
                    .map_err(|e| StrongError::Bad(format!("{}: {e}", doc.id)))?;
                Ok(crate::txn::TxnDoc {
                    id: doc.id,
                    ops,
                    precondition: Precondition {
                        if_heads: doc.if_heads.map(|h| hashes(&h)),
                        if_absent: doc.if_absent,
                    },
                })
            })
            .collect::<Result<_, StrongError>>()?;
        Ok(Txn {
            docs,
            message: self.message,
        })
    }
}

impl StrongTier {
    /// Starts the tier at `site` over `replica` and its `store`, reaching
    /// other sites through `rpc`. A voter of `config` whose log is empty
    /// seeds the membership with `config.voters` (every voter does, with
    /// the same list, so whichever starts first is right).
    pub async fn start(
        site: SiteName,
        config: StrongConfig,
        replica: Replica,
        store: Arc<dyn Store>,
        rpc: Arc<dyn Rpc>,
    ) -> Result<StrongTier, StrongError> {
        config.check().map_err(StrongError::Bad)?;
        let node = node_id(&site);
        let log = LogStore::open(store.clone()).map_err(failed)?;
        let machine = StateMachine::open(replica.clone(), store).map_err(failed)?;
        let acks = super::network::Acks::default();
        let raft = Raft::new(
            node,
            Arc::new(config.raft_config(&site)),
            Network {
                rpc: rpc.clone(),
                acks: acks.clone(),
            },
            log,
            machine.clone(),
        )
        .await
        .map_err(failed)?;
        if config.voters.contains(&site) && !raft.is_initialized().await.map_err(failed)? {
            let members: BTreeMap<NodeId, BasicNode> = config
                .voters
                .iter()
                .map(|voter| (node_id(voter), BasicNode::new(voter.as_str())))
                .collect();
            match raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(failed(e)),
            }
        }
        let (proposals, queue) = mpsc::channel(PROPOSALS_QUEUED_MAX);
        let inner = Arc::new(Inner {
            site,
            node,
            config,
            raft,
            replica,
            machine,
            rpc,
            proposals,
            acks,
            commits: AtomicU64::new(0),
            elections: AtomicU64::new(0),
            made: AtomicU64::new(0),
        });
        tokio::spawn(run_proposer(Arc::downgrade(&inner), queue));
        tokio::spawn(count_elections(
            Arc::downgrade(&inner),
            inner.raft.metrics(),
        ));
        Ok(StrongTier { inner })
    }

    /// The site this tier runs at.
    pub fn site(&self) -> &SiteName {
        &self.inner.site
    }

    /// Whether `doc` is written through the tier.
    pub fn covers(&self, doc: &DocId) -> bool {
        self.inner.config.covers(doc)
    }

    /// What answers other sites' requests to this one.
    pub fn handler(&self) -> Arc<dyn RpcHandler> {
        Arc::new(Handler {
            inner: self.inner.clone(),
        })
    }

    /// Commits `txn` (every document under the tier's prefixes) through
    /// the log: preconditions checked against the state every earlier
    /// committed transaction left, the changes made once by the leader.
    /// Returns once this site applied it.
    pub async fn write(&self, txn: &Txn) -> Result<TxnCommit, StrongError> {
        self.check(txn)?;
        let inner = &self.inner;
        let deadline = Instant::now() + Duration::from_millis(inner.config.write_timeout_ms);
        let request = WriteRequest::from_txn(txn)?;
        let answer = loop {
            let answer = match inner.leader() {
                Some(leader) if leader == inner.node => inner.write_at_leader(txn.clone()).await,
                Some(leader) => match inner.site_of(leader) {
                    Some(site) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match call(
                            inner.rpc.as_ref(),
                            &site,
                            &Request::Write(request.clone()),
                            left.max(Duration::from_millis(1)),
                        )
                        .await
                        {
                            Ok(Reply::Write(answer)) => answer,
                            Ok(_) => Err(StrongError::Unknown(format!(
                                "{site} answered with something else"
                            ))),
                            Err(RpcError::Unreachable(_)) => Err(StrongError::NoQuorum(format!(
                                "the leader {site} cannot be reached"
                            ))),
                            Err(e) => Err(StrongError::Unknown(format!(
                                "forwarded to the leader {site}: {e}"
                            ))),
                        }
                    }
                    None => Err(StrongError::NotLeader),
                },
                None => Err(StrongError::NotLeader),
            };
            match answer {
                // Nothing was proposed: wait for a leader while there is time.
                Err(StrongError::NotLeader)
                    if Instant::now() + LEADER_POLL
                        < deadline.min(
                            Instant::now()
                                + Duration::from_millis(inner.config.election_timeout_max_ms * 2),
                        ) =>
                {
                    tokio::time::sleep(LEADER_POLL).await;
                }
                Err(StrongError::NotLeader) => {
                    return Err(StrongError::NoQuorum(
                        "no leader can be reached from this site".to_owned(),
                    ))
                }
                other => break other?,
            }
        };
        // Read your writes: wait until this site applied it.
        inner.wait_applied(answer.log_index, deadline).await;
        Ok(TxnCommit {
            txn: TxnId(answer.txn),
            docs: answer
                .docs
                .into_iter()
                .map(|(id, heads, change)| {
                    (
                        id,
                        Commit {
                            heads: hashes(&heads),
                            change: change.map(ChangeHash),
                        },
                    )
                })
                .collect(),
        })
    }

    /// Checks that `txn` is well formed and wholly in the tier.
    fn check(&self, txn: &Txn) -> Result<(), StrongError> {
        txn.check().map_err(|e| StrongError::Bad(e.to_string()))?;
        let inside = txn.docs.iter().filter(|d| self.covers(&d.id)).count();
        if inside != txn.docs.len() {
            return Err(StrongError::Bad(
                "a transaction cannot mix strong documents with others".to_owned(),
            ));
        }
        Ok(())
    }

    /// Reads `ids` linearizably: through the leader, after it confirmed
    /// with a majority that it still leads.
    pub async fn read(&self, ids: &[DocId]) -> Result<Vec<StrongRead>, StrongError> {
        if ids.len() > crate::READ_DOCS_MAX {
            return Err(StrongError::Bad(format!(
                "one read takes at most {} documents",
                crate::READ_DOCS_MAX
            )));
        }
        let inner = &self.inner;
        // While no leader is known (an election), wait for one a while.
        let deadline =
            Instant::now() + Duration::from_millis(inner.config.election_timeout_max_ms * 2);
        while inner.leader().is_none() && Instant::now() + LEADER_POLL < deadline {
            tokio::time::sleep(LEADER_POLL).await;
        }
        let docs = match inner.leader() {
            Some(leader) if leader == inner.node => inner.read_at_leader(ids.to_vec()).await?,
            Some(leader) => {
                let site = inner.site_of(leader).ok_or(StrongError::NotLeader)?;
                match call(
                    inner.rpc.as_ref(),
                    &site,
                    &Request::Read(ids.to_vec()),
                    inner.timeout(),
                )
                .await
                {
                    Ok(Reply::Read(answer)) => answer?,
                    Ok(_) => return Err(failed("the leader answered with something else")),
                    Err(e) => {
                        return Err(StrongError::NoQuorum(format!(
                            "the leader {site} did not answer: {e}"
                        )))
                    }
                }
            }
            None => return Err(StrongError::NoQuorum("there is no leader".to_owned())),
        };
        docs.into_iter()
            .map(|doc| {
                Ok(StrongRead {
                    id: doc.id,
                    heads: hashes(&doc.heads),
                    value: doc
                        .json
                        .map(|text| serde_json::from_str(&text))
                        .transpose()
                        .map_err(failed)?,
                })
            })
            .collect()
    }

    /// Adds or removes a voter (at the leader, forwarded there if need
    /// be; asked again while leadership moves).
    pub async fn change_members(&self, change: MemberChange) -> Result<(), StrongError> {
        let deadline = Instant::now() + self.inner.timeout() * 4;
        loop {
            match self.inner.change_members_once(change.clone()).await {
                Err(StrongError::NotLeader) if Instant::now() + LEADER_POLL < deadline => {
                    tokio::time::sleep(LEADER_POLL).await;
                }
                Err(StrongError::NotLeader) => {
                    return Err(StrongError::NoQuorum(
                        "no leader took the change".to_owned(),
                    ))
                }
                other => return other,
            }
        }
    }

    /// Takes or renews lease `name` for this site for `ttl`; whether it was
    /// granted, and the lease as it stands.
    pub async fn acquire_lease(
        &self,
        name: &str,
        ttl: Duration,
    ) -> Result<(bool, Option<Lease>), StrongError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.inner.lease_retrying(name, ttl_ms, None).await
    }

    /// Gives up lease `name`, held at `epoch`.
    pub async fn release_lease(
        &self,
        name: &str,
        epoch: u64,
    ) -> Result<(bool, Option<Lease>), StrongError> {
        self.inner.lease_retrying(name, 0, Some(epoch)).await
    }

    /// The leases as applied at this site.
    pub fn leases(&self) -> Vec<LeaseView> {
        self.inner
            .machine
            .leases()
            .into_iter()
            .map(|l| LeaseView {
                name: l.name,
                holder: l.holder.to_string(),
                epoch: l.epoch,
                expires_ms: l.expires_ms,
            })
            .collect()
    }

    /// The tier as this site sees it.
    pub fn status(&self) -> StrongStatus {
        let inner = &self.inner;
        let metrics = inner.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let name = |id: &NodeId| {
            membership
                .get_node(id)
                .map_or_else(|| format!("node-{id:016x}"), |n| n.addr.clone())
        };
        let last = metrics.last_log_index;
        let voters = membership
            .voter_ids()
            .map(|id| {
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten())
                    .map(|log_id| log_id.index);
                let matched = if id == inner.node && metrics.state == ServerState::Leader {
                    last
                } else {
                    matched
                };
                VoterStatus {
                    site: name(&id),
                    match_index: matched,
                    lag: match (metrics.state, last, matched) {
                        (ServerState::Leader, Some(last), Some(m)) => Some(last.saturating_sub(m)),
                        (ServerState::Leader, Some(last), None) => Some(last + 1),
                        _ => None,
                    },
                }
            })
            .collect();
        StrongStatus {
            role: match metrics.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .to_owned(),
            term: metrics.current_term,
            leader: metrics.current_leader.map(|id| name(&id)),
            commit_index: metrics.last_applied.map(|id| id.index),
            last_log_index: last,
            voters,
            learners: membership.learner_ids().map(|id| name(&id)).collect(),
            millis_since_quorum_ack: metrics.millis_since_quorum_ack,
            elections: inner.elections.load(Ordering::Relaxed),
            commits: inner.commits.load(Ordering::Relaxed),
        }
    }

    /// Stops the tier's Raft node.
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "the strong tier did not stop cleanly");
        }
    }
}

impl Inner {
    fn metrics(&self) -> RaftMetrics<NodeId, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    fn leader(&self) -> Option<NodeId> {
        self.metrics().current_leader
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.write_timeout_ms)
    }

    /// The site of node `id`, from the membership.
    fn site_of(&self, id: NodeId) -> Option<SiteName> {
        let metrics = self.metrics();
        let node = metrics.membership_config.membership().get_node(&id)?;
        node.addr.parse().ok()
    }

    /// Refuses when this leader has not heard from a majority of voters
    /// within the longest election timeout (by the answers to its own
    /// heartbeats and appends): on the minority side of a partition
    /// nothing is proposed.
    fn check_quorum(&self, metrics: &RaftMetrics<NodeId, BasicNode>) -> Result<(), StrongError> {
        if metrics.current_leader != Some(self.node) {
            return Err(StrongError::NotLeader);
        }
        let silence = self.config.quorum_silence_max();
        let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        let acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        let heard = voters
            .iter()
            .filter(|v| **v == self.node || acks.get(v).is_some_and(|at| at.elapsed() <= silence))
            .count();
        if heard * 2 > voters.len() {
            Ok(())
        } else {
            Err(StrongError::NoQuorum(format!(
                "the leader heard from {heard} of {} voters within {} ms",
                voters.len(),
                silence.as_millis()
            )))
        }
    }

    async fn write_at_leader(&self, txn: Txn) -> Result<WriteAnswer, StrongError> {
        self.check_quorum(&self.metrics())?;
        let (reply, answer) = oneshot::channel();
        self.proposals
            .try_send(Proposal { txn, reply })
            .map_err(|_| StrongError::NoQuorum("the leader's queue is full".to_owned()))?;
        match tokio::time::timeout(self.timeout(), answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(StrongError::Unknown(
                "the proposer stopped before it answered".to_owned(),
            )),
            Err(_) => Err(StrongError::Unknown(format!(
                "not committed within {} ms",
                self.config.write_timeout_ms
            ))),
        }
    }

    /// Waits (until `deadline`) for this site to apply entry `index`.
    async fn wait_applied(&self, index: u64, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = self
            .raft
            .wait(Some(left.max(Duration::from_millis(1))))
            .applied_index_at_least(Some(index), "a strong write applied here")
            .await;
    }

    async fn read_at_leader(&self, ids: Vec<DocId>) -> Result<Vec<ReadDoc>, StrongError> {
        match tokio::time::timeout(self.timeout(), self.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => {}
            Ok(Err(RaftError::APIError(e))) => {
                return Err(StrongError::NoQuorum(format!(
                    "leadership not confirmed: {e}"
                )))
            }
            Ok(Err(e)) => return Err(failed(e)),
            Err(_) => {
                return Err(StrongError::NoQuorum(
                    "a majority did not confirm the leader in time".to_owned(),
                ))
            }
        }
        let replica = self.replica.clone();
        tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .map(|id| {
                    let view = replica.read_json(&id, None).map_err(failed)?;
                    Ok(match view {
                        Some(view) => ReadDoc {
                            id,
                            heads: view.heads.iter().map(|h| h.0).collect(),
                            json: Some(view.value.to_string()),
                        },
                        None => ReadDoc {
                            id,
                            heads: Vec::new(),
                            json: None,
                        },
                    })
                })
                .collect()
        })
        .await
        .map_err(failed)?
    }

    async fn change_members_once(&self, change: MemberChange) -> Result<(), StrongError> {
        match self.leader() {
            Some(leader) if leader == self.node => self.members_at_leader(change).await,
            Some(leader) => {
                let site = self.site_of(leader).ok_or(StrongError::NotLeader)?;
                match call(
                    self.rpc.as_ref(),
                    &site,
                    &Request::Members(change),
                    self.timeout() * 4,
                )
                .await
                {
                    Ok(Reply::Members(answer)) => answer,
                    Ok(_) => Err(failed("the leader answered with something else")),
                    Err(RpcError::Unreachable(_)) => Err(StrongError::NotLeader),
                    Err(e) => Err(StrongError::Unknown(format!(
                        "the leader {site} did not answer: {e}"
                    ))),
                }
            }
            None => Err(StrongError::NotLeader),
        }
    }

    async fn members_at_leader(&self, change: MemberChange) -> Result<(), StrongError> {
        let write_error = |e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => StrongError::NotLeader,
            RaftError::APIError(e) => StrongError::Bad(e.to_string()),
            RaftError::Fatal(e) => failed(e),
        };
        let membership = self.metrics().membership_config.membership().clone();
        match change {
            MemberChange::Add(site) => {
                let id = node_id(&site);
                if membership.voter_ids().any(|v| v == id) {
                    return Ok(());
                }
                self.raft
                    .add_learner(id, BasicNode::new(site.as_str()), true)
                    .await
                    .map_err(write_error)?;
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(write_error)?;
            }
            MemberChange::Remove(site) => {
                let id = node_id(&site);
                if !membership.voter_ids().any(|v| v == id) {
                    return Ok(());
                }
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                    .await
                    .map_err(write_error)?;
            }
        }
        Ok(())
    }

    /// [`Inner::lease`], asked again while no leader is known.
    async fn lease_retrying(
        &self,
        name: &str,
        ttl_ms: u64,
        epoch: Option<u64>,
    ) -> Result<(bool, Option<Lease>), StrongError> {
        let deadline =
            Instant::now() + Duration::from_millis(self.config.election_timeout_max_ms * 2);
        loop {
            match self.lease(name, ttl_ms, epoch).await {
                Err(StrongError::NotLeader) if Instant::now() + LEADER_POLL < deadline => {
                    tokio::time::sleep(LEADER_POLL).await;
                }
                Err(StrongError::NotLeader) => {
                    return Err(StrongError::NoQuorum(
                        "no leader can be reached from this site".to_owned(),
                    ))
                }
                other => return other,
            }
        }
    }

    async fn lease(
        &self,
        name: &str,
        ttl_ms: u64,
        epoch: Option<u64>,
    ) -> Result<(bool, Option<Lease>), StrongError> {
        match self.leader() {
            Some(leader) if leader == self.node => {
                self.lease_at_leader(self.site.clone(), name, ttl_ms, epoch)
                    .await
            }
            Some(leader) => {
                let site = self.site_of(leader).ok_or(StrongError::NotLeader)?;
                let request = Request::Lease {
                    name: name.to_owned(),
                    ttl_ms,
                    epoch,
                };
                match call(self.rpc.as_ref(), &site, &request, self.timeout()).await {
                    Ok(Reply::Lease(answer)) => answer,
                    Ok(_) => Err(failed("the leader answered with something else")),
                    Err(RpcError::Unreachable(_)) => Err(StrongError::NoQuorum(format!(
                        "the leader {site} cannot be reached"
                    ))),
                    Err(e) => Err(StrongError::Unknown(format!("{site}: {e}"))),
                }
            }
            None => Err(StrongError::NotLeader),
        }
    }

    async fn lease_at_leader(
        &self,
        site: SiteName,
        name: &str,
        ttl_ms: u64,
        epoch: Option<u64>,
    ) -> Result<(bool, Option<Lease>), StrongError> {
        self.check_quorum(&self.metrics())?;
        let command = match epoch {
            None => Command::AcquireLease {
                name: name.to_owned(),
                site,
                ttl_ms,
                now_ms: self.replica.now_ms(),
            },
            Some(epoch) => Command::ReleaseLease {
                name: name.to_owned(),
                site,
                epoch,
            },
        };
        command.check().map_err(StrongError::Bad)?;
        match tokio::time::timeout(self.timeout(), self.raft.client_write(command)).await {
            Ok(Ok(response)) => match response.data {
                Response::Lease { granted, lease } => Ok((granted, lease)),
                other => Err(failed(format!("unexpected answer {other:?}"))),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                Err(StrongError::NotLeader)
            }
            Ok(Err(e)) => Err(StrongError::Unknown(e.to_string())),
            Err(_) => Err(StrongError::Unknown(format!(
                "not committed within {} ms",
                self.config.write_timeout_ms
            ))),
        }
    }

    /// Makes and proposes one batch of writes; answers each.
    async fn propose(&self, batch: Vec<Proposal>) {
        let mut metrics = self.metrics();
        if let Err(e) = self.check_quorum(&metrics) {
            return answer_all(batch, &e);
        }
        // Preconditions are checked against what every entry before this
        // leader's first applied left: wait until that is applied here.
        if metrics.last_applied.map(|id| id.leader_id.term) != Some(metrics.current_term) {
            let term = metrics.current_term;
            let ready = self
                .raft
                .wait(Some(self.timeout()))
                .metrics(
                    |m| {
                        m.current_term != term
                            || m.last_applied.map(|id| id.leader_id.term) == Some(term)
                    },
                    "the leader applied its first entry",
                )
                .await;
            match ready {
                Ok(m) if m.current_term == term && m.current_leader == Some(self.node) => {
                    metrics = m;
                }
                _ => return answer_all(batch, &StrongError::NotLeader),
            }
        }
        let term = metrics.current_term;
        let actor = strong_actor(&self.site, term);
        let now_ms = self.replica.now_ms();
        let mut forks: HashMap<DocId, Fork> = HashMap::new();
        let mut made = Vec::with_capacity(batch.len());
        // A write refused by a precondition may have been refused because
        // of one made before it in this batch, not committed yet: it is
        // answered once the batch is committed, or asked again of the next
        // leader (it was never proposed) if the batch is not.
        let mut refused = Vec::new();
        for proposal in batch {
            let counter = self.made.fetch_add(1, Ordering::Relaxed);
            let txn_id = TxnId::derive(&actor, (term << 32) ^ counter);
            match self.make(&mut forks, &proposal.txn, &actor, txn_id, now_ms) {
                Ok((txn, docs)) => made.push((proposal, txn, docs)),
                Err(e) => refused.push((proposal, e)),
            }
        }
        let refuse = |refused: Vec<(Proposal, StrongError)>, committed: bool| {
            for (proposal, e) in refused {
                let _ =
                    proposal
                        .reply
                        .send(Err(if committed { e } else { StrongError::NotLeader }));
            }
        };
        if made.is_empty() {
            // Refused by the committed state alone.
            return refuse(refused, true);
        }
        let command = Command::Txns(made.iter().map(|(_, txn, _)| txn.clone()).collect());
        // No timeout here: the next batch must not be made until this one's
        // fate is known (its callers stop waiting on their own).
        match self.raft.client_write(command).await {
            Ok(response) => {
                refuse(refused, true);
                let Response::Txns(applied) = response.data else {
                    return answer_all(
                        made.into_iter().map(|(p, _, _)| p).collect(),
                        &failed("the state machine answered with something else"),
                    );
                };
                let count = made.len() as u64;
                for ((proposal, txn, mut docs), applied) in made.into_iter().zip(applied) {
                    for (doc, heads, change) in &mut docs {
                        if let Some(done) = applied.iter().find(|a| a.doc == *doc) {
                            *heads = done.heads.clone();
                            *change = Some(done.change);
                        }
                    }
                    let _ = proposal.reply.send(Ok(WriteAnswer {
                        txn: txn.id,
                        log_index: response.log_id.index,
                        docs,
                    }));
                }
                self.commits.fetch_add(count, Ordering::Relaxed);
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                // Refused before it was appended, or its entry was
                // overwritten by another leader's: never committed.
                refuse(refused, false);
                answer_all(
                    made.into_iter().map(|(p, _, _)| p).collect(),
                    &StrongError::NotLeader,
                );
            }
            Err(e) => {
                refuse(refused, false);
                answer_all(
                    made.into_iter().map(|(p, _, _)| p).collect(),
                    &StrongError::Unknown(e.to_string()),
                );
            }
        }
    }

    /// Makes `txn`'s changes on the batch's copies of its documents, after
    /// checking its preconditions on them; on any failure every copy is
    /// left as it was.
    fn make(
        &self,
        forks: &mut HashMap<DocId, Fork>,
        txn: &Txn,
        actor: &automerge::ActorId,
        id: TxnId,
        now_ms: i64,
    ) -> Result<(StrongTxn, Vec<AnsweredDoc>), StrongError> {
        for doc in &txn.docs {
            if !self.config.covers(&doc.id) {
                return Err(StrongError::Bad(format!(
                    "{} is not a strong document: a transaction cannot mix them",
                    doc.id
                )));
            }
            if !forks.contains_key(&doc.id) {
                let copy = self.replica.fork_doc(&doc.id).map_err(failed)?;
                forks.insert(doc.id.clone(), Fork { doc: copy });
            }
            let fork = &forks[&doc.id];
            let heads = fork
                .doc
                .as_ref()
                .map(Automerge::get_heads)
                .unwrap_or_default();
            if let Some(reason) = doc.precondition.failure(fork.doc.is_some(), &heads) {
                return Err(StrongError::PreconditionFailed {
                    doc: doc.id.clone(),
                    reason,
                });
            }
        }
        let mut members: Vec<DocId> = txn
            .docs
            .iter()
            .filter(|d| !d.ops.is_empty())
            .map(|d| d.id.clone())
            .collect();
        members.sort();
        let message = TxnHeader {
            id,
            members: members.clone(),
        }
        .message(txn.message.as_deref());
        // Take the members' copies out, to edit them side by side.
        let mut docs: Vec<(DocId, bool, Automerge)> = members
            .iter()
            .map(|m| {
                let fork = forks.get_mut(m).expect("every document was copied above");
                let existed = fork.doc.is_some();
                let mut doc = fork.doc.take().unwrap_or_default();
                doc.set_actor(actor.clone());
                (m.clone(), existed, doc)
            })
            .collect();
        let result = edit_all(&mut docs, txn, &message, now_ms);
        let changes = match result {
            Ok(changes) => changes,
            Err(e) => {
                for (m, existed, doc) in docs {
                    forks.get_mut(&m).expect("taken above").doc = existed.then_some(doc);
                }
                return Err(e);
            }
        };
        let mut carried = Vec::with_capacity(docs.len());
        for ((m, _, doc), (_, bytes)) in docs.into_iter().zip(changes) {
            carried.push(StrongChange {
                doc: m.clone(),
                change: bytes,
            });
            forks.get_mut(&m).expect("taken above").doc = Some(doc);
        }
        let results = txn
            .docs
            .iter()
            .map(|d| {
                let heads = forks[&d.id]
                    .doc
                    .as_ref()
                    .map(|doc| doc.get_heads().iter().map(|h| h.0).collect())
                    .unwrap_or_default();
                (d.id.clone(), heads, None)
            })
            .collect();
        Ok((
            StrongTxn {
                id: id.0,
                changes: carried,
            },
            results,
        ))
    }
}

/// A batch's copy of one document: `None` while it does not exist.
struct Fork {
    doc: Option<Automerge>,
}

/// Runs each member's ops in a transaction of its own, all before any
/// commit (so a failing op leaves every copy as it was), then commits each
/// with `message`; the hash and bytes of each member's change.
fn edit_all(
    docs: &mut [(DocId, bool, Automerge)],
    txn: &Txn,
    message: &str,
    now_ms: i64,
) -> Result<Vec<(ChangeHash, Vec<u8>)>, StrongError> {
    let ops: HashMap<&DocId, &[Op]> = txn.docs.iter().map(|d| (&d.id, d.ops.as_slice())).collect();
    let mut open: Vec<Transaction<'_>> = Vec::with_capacity(docs.len());
    let mut failure = None;
    for (id, _, doc) in docs.iter_mut() {
        let mut tx = doc.transaction();
        if let Err(e) = crate::doc::ops::apply_ops(&mut tx, ops[&*id]) {
            tx.rollback();
            failure = Some(StrongError::Op {
                doc: id.clone(),
                message: e.to_string(),
            });
            break;
        }
        open.push(tx);
    }
    if let Some(e) = failure {
        for tx in open {
            tx.rollback();
        }
        return Err(e);
    }
    let options = || {
        CommitOptions::default()
            .with_time(now_ms)
            .with_message(message.to_owned())
    };
    let made: Vec<Option<ChangeHash>> = open
        .into_iter()
        .map(|tx| tx.commit_with(options()).0)
        .collect();
    Ok(docs
        .iter_mut()
        .zip(made)
        .map(|((_, _, doc), made)| {
            // A member whose ops changed nothing still gets a change: the
            // others name it, and receivers wait for it.
            let hash = made.unwrap_or_else(|| doc.empty_commit(options()));
            let bytes = doc
                .get_change_by_hash(&hash)
                .expect("a change just committed is in the document")
                .raw_bytes()
                .to_vec();
            (hash, bytes)
        })
        .collect())
}

fn answer_all(batch: Vec<Proposal>, error: &StrongError) {
    for proposal in batch {
        let _ = proposal.reply.send(Err(error.clone()));
    }
}

/// The leader's proposer: takes the writes waiting (up to a batch) and
/// proposes them as one entry, one entry at a time.
async fn run_proposer(inner: std::sync::Weak<Inner>, mut queue: mpsc::Receiver<Proposal>) {
    while let Some(first) = queue.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < inner.config.batch_txns_max {
            match queue.try_recv() {
                Ok(proposal) => batch.push(proposal),
                Err(_) => break,
            }
        }
        inner.propose(batch).await;
    }
}

/// Counts the terms this site sees begin.
async fn count_elections(
    inner: std::sync::Weak<Inner>,
    mut metrics: tokio::sync::watch::Receiver<RaftMetrics<NodeId, BasicNode>>,
) {
    let mut term = metrics.borrow().current_term;
    while metrics.changed().await.is_ok() {
        let now = metrics.borrow().current_term;
        if now > term {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            inner
                .elections
                .fetch_add(now.saturating_sub(term), Ordering::Relaxed);
            term = now;
        }
    }
}

/// Answers other sites' requests.
struct Handler {
    inner: Arc<Inner>,
}

impl RpcHandler for Handler {
    fn handle(&self, from: SiteName, request: Vec<u8>) -> BoxFuture<Vec<u8>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let request: Request = match postcard::from_bytes(&request) {
                Ok(request) => request,
                Err(e) => return encode(&Reply::Failed(format!("malformed request: {e}"))),
            };
            let reply = match request {
                Request::AppendEntries(rpc) => match inner.raft.append_entries(rpc).await {
                    Ok(response) => Reply::AppendEntries(response),
                    Err(e) => Reply::Failed(e.to_string()),
                },
                Request::Vote(rpc) => match inner.raft.vote(rpc).await {
                    Ok(response) => Reply::Vote(response),
                    Err(e) => Reply::Failed(e.to_string()),
                },
                Request::Snapshot { vote, meta, data } => {
                    let snapshot = openraft::Snapshot {
                        meta,
                        snapshot: Box::new(data),
                    };
                    match inner.raft.install_full_snapshot(vote, snapshot).await {
                        Ok(response) => Reply::Snapshot(response),
                        Err(e) => Reply::Failed(e.to_string()),
                    }
                }
                Request::Write(write) => Reply::Write(match write.into_txn() {
                    Ok(txn) => inner.write_at_leader(txn).await,
                    Err(e) => Err(e),
                }),
                Request::Read(ids) => Reply::Read(if ids.len() > crate::READ_DOCS_MAX {
                    Err(StrongError::Bad("too many documents".to_owned()))
                } else {
                    inner.read_at_leader(ids).await
                }),
                Request::Members(change) => Reply::Members(inner.members_at_leader(change).await),
                // A site asks for its own leases only: `from` is the
                // site its certificate names.
                Request::Lease {
                    name,
                    ttl_ms,
                    epoch,
                } => Reply::Lease(inner.lease_at_leader(from, &name, ttl_ms, epoch).await),
            };
            encode(&reply)
        })
    }
}
