//! The replica side of bounded counters ([`crate::escrow`]): reading their
//! state, moving rights by hand, granting them when a peer asks, asking
//! peers when this site runs short (or falls below its low-water mark), and
//! waiting a bounded time for a grant.
//!
//! Asking is a message, granting an ordinary change: a [`RightsWanted`] goes
//! out on [`Replica::subscribe_rights_wanted`] (the transport sends it to
//! the peer it names), the peer's replica commits a transfer in
//! [`Replica::grant_rights`], and the change comes back with replication
//! like any other. Rights are never in flight: they are at the granter
//! until its change arrives, then at the asker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{lock, Commit, Replica};
use crate::doc::OpError;
use crate::error::Error;
use crate::escrow::{self, Bounded, PoolKind, Spent};
use crate::id::{DocId, SiteName};

/// A request for rights, for the transport to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RightsWanted {
    /// The document.
    pub doc: DocId,
    /// The counter's pointer.
    pub pointer: String,
    /// Which rights.
    pub pool: PoolKind,
    /// How many this site needs.
    pub amount: i64,
    /// The peer to ask; `None`: every connected peer.
    pub ask: Option<SiteName>,
}

/// Most rights requests queued for the transport; older ones are dropped
/// (a waiting op asks again).
pub(super) const RIGHTS_WANTED_CAPACITY: usize = 1024;

/// A waiting op asks again this often (every peer, after the first ask
/// went to the best-placed one).
const ASK_AGAIN: Duration = Duration::from_millis(250);

/// A site below its low-water mark asks again for the same counter no
/// sooner than this.
const REBALANCE_EVERY: Duration = Duration::from_millis(200);

/// Most counters remembered for rate-limiting rebalancing asks.
const REBALANCE_MEMORY_MAX: usize = 4096;

/// What the escrow layer of a replica has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EscrowStats {
    /// Ops on bounded counters that found the rights here at once.
    pub served_locally: u64,
    /// Ops that waited and then found the rights a peer granted.
    pub served_after_transfer: u64,
    /// Ops refused for want of rights (after waiting, if allowed to).
    pub refused: u64,
    /// Requests for rights sent to peers.
    pub asked: u64,
    /// Grants committed for peers.
    pub granted: u64,
    /// Ops waiting for rights now.
    pub waiting: u64,
}

#[derive(Default)]
pub(super) struct EscrowShared {
    /// Ops on bounded counters that committed (served locally or after a
    /// transfer).
    served: AtomicU64,
    served_after_transfer: AtomicU64,
    refused: AtomicU64,
    asked: AtomicU64,
    granted: AtomicU64,
    /// Ops waiting for rights, per counter.
    waiting: std::sync::Mutex<HashMap<(DocId, String), u64>>,
    /// When each counter last asked to rebalance.
    /// When each counter last asked (the replica clock's ms, so a
    /// simulation replays it).
    last_rebalance: std::sync::Mutex<HashMap<(DocId, String, PoolKind), i64>>,
    /// Seconds from first ask to the grant's use, of ops served after a
    /// transfer, for [`Replica::take_transfer_times`].
    transfer_times: std::sync::Mutex<Vec<f64>>,
}

/// The shortfall an error reports: which counter, pool and how many rights
/// are missing here.
fn shortfall(error: &Error) -> Option<(Option<&DocId>, &str, PoolKind, i64, i64)> {
    let (doc, op) = match error {
        Error::Op(op) => (None, &**op),
        Error::TxnOp { doc, source } => (Some(doc), &**source),
        _ => return None,
    };
    match op {
        OpError::InsufficientRights {
            path,
            pool,
            wanted,
            available_here,
            ..
        } => Some((doc, path, *pool, wanted - available_here, *available_here)),
        _ => None,
    }
}

impl Replica {
    /// The bounded counter at `pointer` of document `id`; `Ok(None)` when
    /// the document or the counter does not exist.
    pub fn escrow(&self, id: &DocId, pointer: &str) -> Result<Option<Bounded>, Error> {
        let read = self.with_doc(id, |doc| escrow::read(doc, pointer))?;
        match read {
            None => Ok(None),
            Some(state) => state.map_err(|e| Error::from(OpError::from(e))),
        }
    }

    /// Every bounded counter of document `id`, by pointer.
    pub fn escrow_list(&self, id: &DocId) -> Result<Vec<(String, Bounded)>, Error> {
        let read = self.with_doc(id, escrow::list)?;
        match read {
            None => Ok(Vec::new()),
            Some(list) => list.map_err(|e| Error::from(OpError::from(e))),
        }
    }

    /// Ops waiting for rights of the counter now.
    pub fn escrow_waiting(&self, id: &DocId, pointer: &str) -> u64 {
        lock(&self.shared.escrow.waiting)
            .get(&(id.clone(), pointer.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Moves `amount` rights of `pool` from this site to `to`, durably.
    pub fn escrow_transfer(
        &self,
        id: &DocId,
        pointer: &str,
        pool: PoolKind,
        to: &SiteName,
        amount: i64,
        message: Option<&str>,
    ) -> Result<Commit, Error> {
        if self.with_doc(id, |_| ())?.is_none() {
            return Err(Error::NotFound(id.clone()));
        }
        if self.resolutions_held() {
            return Err(escrow::rights_held(pointer).into());
        }
        self.transact_checked(id, message, None, |tx| {
            escrow::transfer(tx, pointer, pool, self.site(), to, amount)
                .map_err(|e| Error::from(OpError::from(e)))
        })
        .map(|(commit, ())| commit)
    }

    /// Answers a peer's request: transfers to `to` what this site's policy
    /// lets it spare of `needed` ([`escrow::grant_for`]), as an ordinary
    /// change. `Ok(None)` when there is nothing to give (no counter, no
    /// spare rights).
    pub fn grant_rights(
        &self,
        id: &DocId,
        pointer: &str,
        pool: PoolKind,
        to: &SiteName,
        needed: i64,
    ) -> Result<Option<Commit>, Error> {
        if to == self.site() || needed <= 0 || self.resolutions_held() {
            return Ok(None);
        }
        let policy = self.shared.options.escrow.policy(id.as_str(), pointer);
        let message = format!("archipelago: escrow grant to {to}");
        let granted = self.transact_checked(id, Some(&message), None, |tx| {
            let Some(state) =
                escrow::read(&*tx, pointer).map_err(|e| Error::from(OpError::from(e)))?
            else {
                return Ok(0);
            };
            let Some(rights) = state.pool(pool) else {
                return Ok(0);
            };
            let amount = escrow::grant_for(
                rights,
                self.site(),
                needed,
                policy.low_water,
                policy.rebalance,
            );
            if amount > 0 {
                escrow::transfer(tx, pointer, pool, self.site(), to, amount)
                    .map_err(|e| Error::from(OpError::from(e)))?;
            }
            Ok(amount)
        });
        match granted {
            Ok((commit, amount)) if amount > 0 => {
                self.shared.escrow.granted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(doc = %id, pointer, %to, amount, "granted rights");
                Ok(Some(commit))
            }
            Ok(_) => Ok(None),
            // The document does not exist here.
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Requests for rights this replica makes, for the transport to send.
    pub fn subscribe_rights_wanted(&self) -> tokio::sync::broadcast::Receiver<RightsWanted> {
        self.shared.rights_wanted.subscribe()
    }

    /// Asks peers for `amount` rights of the counter: the site that holds
    /// the most (as far as this site knows), or every peer with `broadcast`
    /// or when none is known to hold any.
    pub fn ask_rights(
        &self,
        id: &DocId,
        pointer: &str,
        pool: PoolKind,
        amount: i64,
        broadcast: bool,
    ) {
        let best = if broadcast {
            None
        } else {
            self.escrow(id, pointer).ok().flatten().and_then(|state| {
                let rights = state.pool(pool)?.rights_all();
                rights
                    .into_iter()
                    .filter(|(site, n)| *n > 0 && site != self.site().as_str())
                    .max_by_key(|(_, n)| *n)
                    .and_then(|(site, _)| site.parse::<SiteName>().ok())
            })
        };
        self.shared.escrow.asked.fetch_add(1, Ordering::Relaxed);
        let _ = self.shared.rights_wanted.send(RightsWanted {
            doc: id.clone(),
            pointer: pointer.to_owned(),
            pool,
            amount,
            ask: best,
        });
    }

    /// Runs `attempt` (an op or transaction touching bounded counters) and,
    /// while it fails for want of rights, asks peers and runs it again each
    /// time a change arrives, until `wait` has passed (`None`: the wait of
    /// the counter's policy; at most [`escrow::WAIT_MAX`]). The error
    /// returned then is the last attempt's, so nothing was applied.
    /// `id_hint` names the document of single-document attempts (whose
    /// errors do not).
    pub fn with_rights<R>(
        &self,
        id_hint: &DocId,
        wait: Option<Duration>,
        mut attempt: impl FnMut() -> Result<R, Error>,
    ) -> Result<R, Error> {
        let started = Instant::now();
        let mut deadline: Option<Instant> = None;
        let mut seen = lock(&self.shared.state).update;
        let mut first = true;
        let mut asked: Option<(Instant, DocId, String)> = None;
        let result = loop {
            let result = attempt();
            let Err(error) = &result else { break result };
            let Some((doc, pointer, pool, missing, _)) = shortfall(error) else {
                break result;
            };
            let doc = doc.unwrap_or(id_hint).clone();
            let pointer = pointer.to_owned();
            let deadline = *deadline.get_or_insert_with(|| {
                let wait = wait.unwrap_or_else(|| {
                    self.shared
                        .options
                        .escrow
                        .policy(doc.as_str(), &pointer)
                        .wait
                });
                started + wait.min(escrow::WAIT_MAX)
            });
            let now = Instant::now();
            if now >= deadline {
                break result;
            }
            let ask_again = match &asked {
                None => true,
                Some((at, d, p)) => *d != doc || *p != pointer || now >= *at + ASK_AGAIN,
            };
            if ask_again {
                self.ask_rights(&doc, &pointer, pool, missing, !first);
                if first {
                    *lock(&self.shared.escrow.waiting)
                        .entry((doc.clone(), pointer.clone()))
                        .or_default() += 1;
                }
                first = false;
                asked = Some((now, doc, pointer));
            }
            // Sleep until something is published, the next ask, or the deadline.
            let next_ask = asked.as_ref().map_or(deadline, |(at, ..)| *at + ASK_AGAIN);
            let until = deadline.min(next_ask);
            let mut state = lock(&self.shared.state);
            while state.update == seen {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                state = self
                    .shared
                    .published
                    .wait_timeout(state, until - now)
                    .map(|(guard, _)| guard)
                    .unwrap_or_else(|poisoned| poisoned.into_inner().0);
            }
            seen = state.update;
        };
        if let Some((_, doc, pointer)) = &asked {
            let mut waiting = lock(&self.shared.escrow.waiting);
            let key = (doc.clone(), pointer.clone());
            if let Some(n) = waiting.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    waiting.remove(&key);
                }
            }
        }
        let stats = &self.shared.escrow;
        match &result {
            Ok(_) if asked.is_some() => {
                stats.served_after_transfer.fetch_add(1, Ordering::Relaxed);
                let mut times = lock(&stats.transfer_times);
                if times.len() < 4096 {
                    times.push(started.elapsed().as_secs_f64());
                }
            }
            Err(error) if shortfall(error).is_some() => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        result
    }

    /// Counts the ops on bounded counters served with local rights, and asks
    /// for more rights for each counter that fell below its low-water mark.
    pub(super) fn after_escrow_ops(&self, spent: &[(DocId, Spent)]) {
        if spent.is_empty() {
            return;
        }
        self.shared.escrow.served.fetch_add(1, Ordering::Relaxed);
        for (doc, spent) in spent {
            let policy = self
                .shared
                .options
                .escrow
                .policy(doc.as_str(), &spent.pointer);
            if spent.left >= policy.low_water {
                continue;
            }
            let now = self.shared.options.clock.now_ms();
            let every = REBALANCE_EVERY.as_millis() as i64;
            {
                let mut last = lock(&self.shared.escrow.last_rebalance);
                let key = (doc.clone(), spent.pointer.clone(), spent.pool);
                if last
                    .get(&key)
                    .is_some_and(|at| now < at.saturating_add(every))
                {
                    continue;
                }
                if last.len() >= REBALANCE_MEMORY_MAX {
                    last.retain(|_, at| now < at.saturating_add(every));
                }
                last.insert(key, now);
            }
            // Ask for enough to get back to twice the mark.
            let amount = policy
                .low_water
                .saturating_mul(2)
                .saturating_sub(spent.left)
                .max(1);
            self.ask_rights(doc, &spent.pointer, spent.pool, amount, false);
        }
    }

    /// What the escrow layer has done.
    pub fn escrow_stats(&self) -> EscrowStats {
        let s = &self.shared.escrow;
        let after_transfer = s.served_after_transfer.load(Ordering::Relaxed);
        EscrowStats {
            served_locally: s
                .served
                .load(Ordering::Relaxed)
                .saturating_sub(after_transfer),
            served_after_transfer: after_transfer,
            refused: s.refused.load(Ordering::Relaxed),
            asked: s.asked.load(Ordering::Relaxed),
            granted: s.granted.load(Ordering::Relaxed),
            waiting: lock(&s.waiting).values().sum(),
        }
    }

    /// Takes the recorded times (seconds) from the first ask for rights to
    /// the op that used the grant.
    pub fn take_transfer_times(&self) -> Vec<f64> {
        std::mem::take(&mut *lock(&self.shared.escrow.transfer_times))
    }
}
