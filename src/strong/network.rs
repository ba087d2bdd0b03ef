//! The RPCs of the strong tier between sites: openraft's (append entries,
//! vote, whole snapshots) and the tier's own (a write or a linearizable
//! read forwarded to the leader, a membership or lease request). Each call
//! is one request and one reply, postcard-encoded, carried by an [`Rpc`]:
//! a QUIC stream of its own on the sites' connection in a node
//! ([`crate::transport::quic::SyncEndpoint::rpc`]), [`MemoryNet`] in tests.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Snapshot, SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};

use super::command::Lease;
use super::tier::{MemberChange, StrongError};
use super::TypeConfig;
use crate::id::{DocId, SiteName};

type NodeId = u64;

/// A boxed future that can move between threads.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Most bytes of one RPC request or reply (a snapshot carries every
/// strong document).
pub const RPC_BYTES_MAX: usize = 256 << 20;

/// Why an RPC got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// There is no connection to the site now.
    #[error("no connection to {0}")]
    Unreachable(String),
    /// No reply came in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The call failed on the way.
    #[error("{0}")]
    Failed(String),
}

/// Carries one request to a site and brings back its reply.
pub trait Rpc: Send + Sync + 'static {
    /// Sends `request` to `to`; its reply, or why there is none within
    /// `timeout`.
    fn call(
        &self,
        to: &SiteName,
        request: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<Result<Vec<u8>, RpcError>>;
}

/// Answers the requests other sites send this one.
pub trait RpcHandler: Send + Sync + 'static {
    /// The reply to `request`, sent by `from` (a site the transport
    /// authenticated).
    fn handle(&self, from: SiteName, request: Vec<u8>) -> BoxFuture<Vec<u8>>;
}

/// A request between sites.
#[derive(Serialize, Deserialize)]
pub(crate) enum Request {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot {
        vote: Vote<NodeId>,
        meta: SnapshotMeta<NodeId, BasicNode>,
        data: Vec<u8>,
    },
    /// A write forwarded to the leader.
    Write(WriteRequest),
    /// A linearizable read forwarded to the leader.
    Read(Vec<DocId>),
    /// A membership change forwarded to the leader.
    Members(MemberChange),
    /// A lease request forwarded to the leader: acquire (or renew) when
    /// `epoch` is `None`, release otherwise.
    Lease {
        name: String,
        ttl_ms: u64,
        epoch: Option<u64>,
    },
}

/// The reply to a [`Request`].
#[derive(Serialize, Deserialize)]
pub(crate) enum Reply {
    AppendEntries(AppendEntriesResponse<NodeId>),
    Vote(VoteResponse<NodeId>),
    Snapshot(SnapshotResponse<NodeId>),
    Write(Result<WriteAnswer, StrongError>),
    Read(Result<Vec<ReadDoc>, StrongError>),
    Members(Result<(), StrongError>),
    Lease(Result<(bool, Option<Lease>), StrongError>),
    /// The request could not be handled at all.
    Failed(String),
}

/// A transaction as it travels to the leader (ops as the API's JSON: the
/// op type is internally tagged, which postcard cannot carry).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WriteRequest {
    pub(crate) docs: Vec<WriteDoc>,
    pub(crate) message: Option<String>,
}

/// One document of a [`WriteRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WriteDoc {
    pub(crate) id: DocId,
    pub(crate) ops_json: String,
    pub(crate) if_heads: Option<Vec<[u8; 32]>>,
    pub(crate) if_absent: bool,
}

/// A committed strong transaction, as the leader answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WriteAnswer {
    pub(crate) txn: [u8; 16],
    /// The log entry that carried it.
    pub(crate) log_index: u64,
    /// Per document in the order given: heads right after, and its change
    /// (none for a document only checked).
    pub(crate) docs: Vec<AnsweredDoc>,
}

/// One document of a [`WriteAnswer`]: its id, heads right after the
/// transaction, and its change (none for a document only checked).
pub(crate) type AnsweredDoc = (DocId, Vec<[u8; 32]>, Option<[u8; 32]>);

/// A document read at the leader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ReadDoc {
    pub(crate) id: DocId,
    pub(crate) heads: Vec<[u8; 32]>,
    /// Its JSON text; `None` when it does not exist.
    pub(crate) json: Option<String>,
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).unwrap_or_else(|e| {
        postcard::to_stdvec(&Reply::Failed(format!("encoding: {e}")))
            .expect("a short string always encodes")
    })
}

/// Sends `request` to `site` and decodes its reply.
pub(crate) async fn call(
    rpc: &dyn Rpc,
    site: &SiteName,
    request: &Request,
    timeout: Duration,
) -> Result<Reply, RpcError> {
    let bytes = postcard::to_stdvec(request).map_err(|e| RpcError::Failed(e.to_string()))?;
    let reply = rpc.call(site, bytes, timeout).await?;
    postcard::from_bytes(&reply).map_err(|e| RpcError::Failed(format!("bad reply: {e}")))
}

/// When each peer node last answered an append (a heartbeat or entries)
/// without refusing this node's term: the leader's own view of which
/// voters it reaches.
pub(crate) type Acks = Arc<Mutex<BTreeMap<NodeId, tokio::time::Instant>>>;

/// Makes openraft's network clients: one per peer node, named by its
/// site (the node's address).
pub(crate) struct Network {
    pub(crate) rpc: Arc<dyn Rpc>,
    pub(crate) acks: Acks,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = NetworkClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> NetworkClient {
        NetworkClient {
            rpc: self.rpc.clone(),
            site: node.addr.parse().ok(),
            address: node.addr.clone(),
            target,
            acks: self.acks.clone(),
        }
    }
}

/// openraft's client for one peer.
pub(crate) struct NetworkClient {
    rpc: Arc<dyn Rpc>,
    /// `None` when the node's address is not a site name.
    site: Option<SiteName>,
    address: String,
    target: NodeId,
    acks: Acks,
}

impl NetworkClient {
    async fn send(&self, request: &Request, option: &RPCOption) -> Result<Reply, RpcError> {
        let site = self
            .site
            .as_ref()
            .ok_or_else(|| RpcError::Unreachable(format!("{} is not a site", self.address)))?;
        call(self.rpc.as_ref(), site, request, option.hard_ttl()).await
    }
}

fn rpc_error<E: std::error::Error>(e: RpcError) -> RPCError<NodeId, BasicNode, E> {
    match e {
        RpcError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected(reply: Reply) -> RpcError {
    RpcError::Failed(match reply {
        Reply::Failed(why) => why,
        _ => "the peer answered another request".to_owned(),
    })
}

impl RaftNetwork<TypeConfig> for NetworkClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.send(&Request::AppendEntries(rpc), &option).await {
            Ok(Reply::AppendEntries(response)) => {
                if !matches!(response, AppendEntriesResponse::HigherVote(_)) {
                    self.acks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(self.target, tokio::time::Instant::now());
                }
                Ok(response)
            }
            Ok(other) => Err(rpc_error(unexpected(other))),
            Err(e) => Err(rpc_error(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.send(&Request::Vote(rpc), &option).await {
            Ok(Reply::Vote(response)) => {
                // A granted vote is as recent a word from a voter as an
                // answered heartbeat.
                if response.vote_granted {
                    self.acks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(self.target, tokio::time::Instant::now());
                }
                Ok(response)
            }
            Ok(other) => Err(rpc_error(unexpected(other))),
            Err(e) => Err(rpc_error(e)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let request = Request::Snapshot {
            vote,
            meta: snapshot.meta,
            data: *snapshot.snapshot,
        };
        let failed = |e: RpcError| match e {
            RpcError::Unreachable(_) => StreamingError::Unreachable(Unreachable::new(&e)),
            _ => StreamingError::Network(NetworkError::new(&e)),
        };
        match self.send(&request, &option).await {
            Ok(Reply::Snapshot(response)) => Ok(response),
            Ok(other) => Err(failed(unexpected(other))),
            Err(e) => Err(failed(e)),
        }
    }
}

/// An in-memory network of sites for tests and the simulation: calls go
/// straight to the target's handler, unless a partition cuts the pair or
/// the target is down.
#[derive(Clone, Default)]
pub struct MemoryNet {
    inner: Arc<Mutex<MemoryNetState>>,
}

#[derive(Default)]
struct MemoryNetState {
    handlers: BTreeMap<SiteName, Arc<dyn RpcHandler>>,
    /// Pairs that cannot reach each other (stored both ways).
    cut: BTreeSet<(SiteName, SiteName)>,
    /// Added to every call, each way.
    delay: Duration,
}

impl MemoryNet {
    /// A network with no sites.
    pub fn new() -> MemoryNet {
        MemoryNet::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryNetState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `site` on the network, answering with `handler`.
    pub fn join(&self, site: SiteName, handler: Arc<dyn RpcHandler>) {
        self.state().handlers.insert(site, handler);
    }

    /// Takes `site` off the network (it crashed).
    pub fn leave(&self, site: &SiteName) {
        self.state().handlers.remove(site);
    }

    /// Cuts `a` off from every site in `others`.
    pub fn cut(&self, a: &SiteName, others: &[SiteName]) {
        let mut state = self.state();
        for b in others {
            state.cut.insert((a.clone(), b.clone()));
            state.cut.insert((b.clone(), a.clone()));
        }
    }

    /// Heals every cut.
    pub fn heal(&self) {
        self.state().cut.clear();
    }

    /// Delays every call by `delay` each way.
    pub fn set_delay(&self, delay: Duration) {
        self.state().delay = delay;
    }

    /// A caller of this network as `site`.
    pub fn rpc(&self, site: SiteName) -> Arc<dyn Rpc> {
        Arc::new(MemoryRpc {
            net: self.clone(),
            site,
        })
    }
}

/// One site's way into a [`MemoryNet`].
struct MemoryRpc {
    net: MemoryNet,
    site: SiteName,
}

impl Rpc for MemoryRpc {
    fn call(
        &self,
        to: &SiteName,
        request: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<Result<Vec<u8>, RpcError>> {
        let (net, from, to) = (self.net.clone(), self.site.clone(), to.clone());
        Box::pin(async move {
            let reachable = |net: &MemoryNet| {
                let state = net.state();
                if state.cut.contains(&(from.clone(), to.clone())) {
                    return Err(RpcError::Unreachable(to.to_string()));
                }
                state
                    .handlers
                    .get(&to)
                    .cloned()
                    .map(|h| (h, state.delay))
                    .ok_or_else(|| RpcError::Unreachable(to.to_string()))
            };
            let (handler, delay) = reachable(&net)?;
            let exchange = async {
                tokio::time::sleep(delay).await;
                let reply = handler.handle(from.clone(), request).await;
                tokio::time::sleep(delay).await;
                // A cut made meanwhile loses the reply.
                reachable(&net)?;
                Ok(reply)
            };
            tokio::time::timeout(timeout, exchange)
                .await
                .unwrap_or(Err(RpcError::Timeout(timeout)))
        })
    }
}
