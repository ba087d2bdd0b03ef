//! Escrow (bounded) counters as pure functions over automerge documents: a
//! counter that never goes below its `min` (nor above its `max`) although
//! every site writes it without coordination (O'Neil's escrow method; the
//! bounded counter of Balegas et al., SRDS 2015, as in AntidoteDB's
//! `antidote_crdt_counter_b`).
//!
//! The amount above `min` is split into *rights* held per site. A site
//! decrements only within its own rights, and rights move between sites by
//! transfers. With a `max`, a second pool of rights bounds increments the same
//! way. Nothing here does I/O: the caller passes an automerge transaction
//! (anything [`Transactable`]) and commits or rolls it back.
//!
//! # Layout
//!
//! For a bounded counter at pointer `P` (say `/stock`):
//!
//! - `P` holds the value as an ordinary automerge counter, so every existing
//!   read shows the number.
//! - The root key `_archipelago/escrow` + `P` (so `_archipelago/escrow/stock`,
//!   see [`state_key`]) holds a map `{"min": Int, "max": Int (optional),
//!   "down": POOL, "up": POOL (only with max)}`. It is one root key per
//!   counter, so sites creating different counters concurrently never write
//!   the same key, and it is under the reserved prefix, so JSON reads hide it,
//!   whole-value writes keep it and ops cannot address it, and a pool is
//!   `{"grants": {FROM: {TO: Counter}}, "spent": {SITE: Int}}`.
//!   `grants[s][s]` counts rights created at `s`, `grants[s][t]` rights `s`
//!   gave `t`, `spent[s]` rights `s` used up, so
//!   `rights(s) = grants[s][s] + Σ grants[t][s] − Σ grants[s][t] − spent[s]`
//!   (sums over `t ≠ s`). The rights of a pool add up to `value − min`
//!   (down) or `max − value` (up).
//!
//! # Why a merge cannot double-spend
//!
//! Every entry under `grants[s]` and `spent[s]` is written by site `s` only.
//! Grants are counters; `spent[s]` is the total `s` has used, which `s`
//! rewrites whole at each spend (documents written before hold a counter
//! there, read the same way): a register costs the same at every spend,
//! where a counter's every increment stays in its history and makes the
//! next one slower. Concurrent changes of different sites therefore touch
//! different keys, or add to counters, and a merge loses nothing. The entries that lower `rights(s)` (`grants[s][t]`, `spent[s]`)
//! are exactly the ones `s` writes itself; what other sites write about `s`
//! (`grants[t][s]`) only raises it. So when `s` checks `rights(s) ≥ amount`
//! before spending, it sees every change that could lower its rights, and
//! whatever a later merge brings in can only add to them: no site's rights
//! become negative in any merged state, and since the rights add up to
//! `value − min`, the value never goes below `min`.
//!
//! That argument needs each site to write as one sequence: a site's changes
//! must each see the site's earlier ones (one writer per site, as a
//! [`crate::Replica`] is). Two processes writing as one site concurrently
//! could both spend the same rights.

use std::collections::{BTreeMap, BTreeSet};

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};

use crate::doc::ops::{Op, ValueKind};
use crate::doc::{OpError, Pointer};
use crate::id::SiteName;

/// Root keys of rights states start with this (then the counter's pointer);
/// it lies under [`crate::conflict::RESERVED_PREFIX`].
pub const STATE_PREFIX: &str = "_archipelago/escrow";

/// The root key holding the rights state of the counter at `pointer`.
pub fn state_key(pointer: &str) -> String {
    format!("{STATE_PREFIX}{pointer}")
}

const MIN_KEY: &str = "min";
const MAX_KEY: &str = "max";
const DOWN_KEY: &str = "down";
const UP_KEY: &str = "up";
const GRANTS_KEY: &str = "grants";
const SPENT_KEY: &str = "spent";

/// Why an escrow operation was refused or a state could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EscrowError {
    /// There is no bounded counter at the pointer.
    #[error("{pointer}: not a bounded counter")]
    NotBounded {
        /// The pointer asked for.
        pointer: String,
    },
    /// The site does not hold enough rights.
    #[error("{pointer}: insufficient rights ({available_here} here, {available_total} at all sites as far as this site knows)")]
    Insufficient {
        /// The counter.
        pointer: String,
        /// The pool short of rights.
        pool: PoolKind,
        /// The amount asked for.
        wanted: i64,
        /// The rights this site holds in the pool asked for.
        available_here: i64,
        /// The rights all sites hold in that pool, as far as this site knows.
        available_total: i64,
    },
    /// An increment would pass the upper bound.
    #[error("{pointer}: increment would pass max {max} (value {value})")]
    AboveMax {
        /// The counter.
        pointer: String,
        /// Its upper bound.
        max: i64,
        /// Its value here.
        value: i64,
    },
    /// Amounts must be positive.
    #[error("amount must be positive, got {amount}")]
    BadAmount {
        /// The amount given.
        amount: i64,
    },
    /// `min`, `max` and the initial value do not fit together.
    #[error("{pointer}: {reason}")]
    BadBounds {
        /// The counter.
        pointer: String,
        /// What does not fit.
        reason: String,
    },
    /// A transfer names the same site on both ends.
    #[error("{pointer}: a site cannot transfer rights to itself")]
    SameSite {
        /// The counter.
        pointer: String,
    },
    /// The up pool was asked for, but the counter has no `max`.
    #[error("{pointer}: no upper bound, so no up pool")]
    NoUpperBound {
        /// The counter.
        pointer: String,
    },
    /// The result would not fit an `i64`.
    #[error("{pointer}: arithmetic overflow")]
    Overflow {
        /// The counter.
        pointer: String,
    },
    /// The document holds something else than the layout this module writes.
    #[error("{pointer}: malformed escrow state: {reason}")]
    Malformed {
        /// The counter (empty for the `_escrow` map itself).
        pointer: String,
        /// What is wrong.
        reason: String,
    },
    /// `create` found a bounded counter already at the pointer.
    #[error("{pointer}: already a bounded counter")]
    Exists {
        /// The counter.
        pointer: String,
    },
    /// The pointer is invalid, or writing the value failed.
    #[error(transparent)]
    Op(#[from] OpError),
    /// automerge refused an operation.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}

impl EscrowError {
    /// A stable machine-readable code for APIs.
    pub fn code(&self) -> &'static str {
        match self {
            EscrowError::NotBounded { .. } => "not_bounded",
            EscrowError::Insufficient { .. } => "insufficient_rights",
            EscrowError::AboveMax { .. } => "above_max",
            EscrowError::BadAmount { .. } => "bad_amount",
            EscrowError::BadBounds { .. } => "bad_bounds",
            EscrowError::SameSite { .. } => "same_site",
            EscrowError::NoUpperBound { .. } => "no_upper_bound",
            EscrowError::Overflow { .. } => "overflow",
            EscrowError::Malformed { .. } => "malformed_escrow",
            EscrowError::Exists { .. } => "exists",
            EscrowError::Op(e) => e.code(),
            EscrowError::Automerge(_) => "op_rejected",
        }
    }
}

impl From<EscrowError> for OpError {
    fn from(error: EscrowError) -> OpError {
        let mismatch = |path: String, code: &'static str, reason: String| OpError::Mismatch {
            path,
            code,
            reason,
        };
        let reason = error.to_string();
        match error {
            EscrowError::Insufficient {
                pointer,
                pool,
                wanted,
                available_here,
                available_total,
            } => OpError::InsufficientRights {
                path: pointer,
                pool,
                wanted,
                available_here,
                available_total,
            },
            EscrowError::AboveMax {
                pointer,
                max,
                value,
            } => OpError::AboveMax {
                path: pointer,
                max,
                value,
            },
            EscrowError::BadAmount { .. } | EscrowError::BadBounds { .. } => {
                OpError::BadValue(reason)
            }
            EscrowError::NotBounded { pointer } => mismatch(pointer, "not_bounded", reason),
            EscrowError::SameSite { pointer } => mismatch(pointer, "same_site", reason),
            EscrowError::NoUpperBound { pointer } => mismatch(pointer, "no_upper_bound", reason),
            EscrowError::Overflow { pointer } => mismatch(pointer, "overflow", reason),
            EscrowError::Malformed { pointer, .. } => mismatch(pointer, "malformed_escrow", reason),
            EscrowError::Exists { pointer } => mismatch(pointer, "exists", reason),
            EscrowError::Op(e) => e,
            EscrowError::Automerge(e) => OpError::Automerge(e),
        }
    }
}

/// Applies `ops` in order as `site`, like [`crate::doc::ops::apply_ops`]
/// but knowing bounded counters: `set` with `"as": "bounded"` creates one
/// (rights at `site`), `inc` on one decrements or increments within
/// `site`'s rights, and any other op that would overwrite or remove a
/// bounded counter (on its path or a parent's) is refused. Returns the
/// rights `site` has left in each pool it spent from, so the caller can ask
/// for more ahead of demand. On error the transaction holds a partial batch
/// and must be rolled back.
///
/// With `held` (the site was restored from a backup and may not yet know
/// what it spent before), every op that spends or creates rights is
/// refused with `rights_held`; only increments of counters without a `max`
/// (which only add rights) go through.
pub fn apply_ops<T: Transactable>(
    tx: &mut T,
    ops: &[Op],
    site: &SiteName,
    held: bool,
) -> Result<Vec<Spent>, OpError> {
    apply_ops_known(tx, ops, site, held, &mut Known::default())
}

/// [`apply_ops`], with what `known` holds of the counters' state instead of
/// reading it again, and leaving in `known` what the decrements made of
/// it. `known` must have been taken at the document state `tx` starts
/// from (and, on an error, be dropped with the rolled back transaction).
pub fn apply_ops_known<T: Transactable>(
    tx: &mut T,
    ops: &[Op],
    site: &SiteName,
    held: bool,
    known: &mut Known,
) -> Result<Vec<Spent>, OpError> {
    if ops.len() > crate::doc::ops::OPS_PER_BATCH_MAX {
        return Err(OpError::BadValue(format!(
            "more than {} ops in one batch",
            crate::doc::ops::OPS_PER_BATCH_MAX
        )));
    }
    let mut bounded = any(tx);
    let mut spent = Vec::new();
    for op in ops {
        match op {
            Op::Set {
                path,
                value,
                kind: Some(ValueKind::Bounded),
                min,
                max,
            } => {
                let value = value.as_i64().ok_or_else(|| {
                    OpError::BadValue(format!("{path}: a bounded counter needs an integer value"))
                })?;
                let min = min.ok_or_else(|| {
                    OpError::BadValue(format!("{path}: a bounded counter needs \"min\""))
                })?;
                if held {
                    return Err(rights_held(path));
                }
                if bounded {
                    refuse_overwrite(tx, path, true)?;
                }
                known.counters.clear();
                create(tx, path, value, min, *max, site)?;
                bounded = true;
            }
            Op::Inc { path, by } if bounded && is_bounded(tx, path) => {
                let canonical = Pointer::parse(path)?.as_str().to_owned();
                if held
                    && (*by < 0
                        || read(tx, path)
                            .ok()
                            .flatten()
                            .is_some_and(|b| b.max.is_some()))
                {
                    return Err(rights_held(path));
                }
                match by.signum() {
                    -1 => {
                        let amount = by.checked_neg().ok_or_else(|| {
                            OpError::BadValue(format!("{path}: inc by {by} does not fit"))
                        })?;
                        let left = decrement_known(tx, path, site, amount, known)?;
                        spent.push(Spent {
                            pointer: canonical,
                            pool: PoolKind::Down,
                            left,
                        });
                    }
                    1 => {
                        known.counters.remove(&canonical);
                        if let Some(left) = increment(tx, path, site, *by)? {
                            spent.push(Spent {
                                pointer: canonical,
                                pool: PoolKind::Up,
                                left,
                            });
                        }
                    }
                    _ => {}
                }
            }
            Op::Inc { .. } => crate::doc::ops::apply_op(tx, op)?,
            other => {
                if bounded {
                    refuse_overwrite(tx, other.path(), false)?;
                }
                crate::doc::ops::apply_op(tx, other)?;
            }
        }
    }
    Ok(spent)
}

/// Rights a site spent by an op, and what it has left in that pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spent {
    /// The counter.
    pub pointer: String,
    /// The pool spent from.
    pub pool: PoolKind,
    /// The site's rights left in it.
    pub left: i64,
}

/// The refusal of an op that would spend rights while they are held.
pub fn rights_held(path: &str) -> OpError {
    OpError::Mismatch {
        path: crate::doc::path::clip(path),
        code: "rights_held",
        reason: "this site was restored from a backup and spends no rights until it has caught \
                 up with its peers and its held resolutions are released"
            .to_owned(),
    }
}

/// Whether `path` (as written in an op) is a bounded counter.
pub fn is_bounded<D: ReadDoc>(doc: &D, path: &str) -> bool {
    Pointer::parse(path).is_ok_and(|p| {
        !p.is_root() && matches!(doc.get(ROOT, state_key(p.as_str()).as_str()), Ok(Some(_)))
    })
}

/// Refuses an op at `path` that would replace or remove a bounded counter:
/// `path` is one, or a parent of one. With `creating`, `path` itself may
/// be one (create then reports [`EscrowError::Exists`]).
fn refuse_overwrite<D: ReadDoc>(doc: &D, path: &str, creating: bool) -> Result<(), OpError> {
    let Ok(pointer) = Pointer::parse(path) else {
        // The op itself reports the bad path.
        return Ok(());
    };
    let p = pointer.as_str();
    for counter in pointers(doc) {
        let inside = counter.len() > p.len()
            && counter.starts_with(p)
            && counter.as_bytes()[p.len()] == b'/';
        if inside || (counter == p && !creating) {
            return Err(OpError::Mismatch {
                path: counter.chars().take(200).collect(),
                code: "bounded_counter",
                reason: format!(
                    "is a bounded counter: change it with inc (the op at {} would overwrite or \
                     remove it)",
                    crate::doc::path::clip(path)
                ),
            });
        }
    }
    Ok(())
}

/// Refuses a whole-document write that changed a bounded counter other
/// than through [`apply_ops`] (a PUT reconciles a counter by incrementing
/// it, which would bypass the rights).
pub fn check_untouched<D: ReadDoc>(doc: &D) -> Result<(), OpError> {
    check(doc).map_err(|violation| OpError::Mismatch {
        path: violation.pointer.chars().take(200).collect(),
        code: "bounded_counter",
        reason: format!(
            "a whole-document write must leave bounded counters as they are (change them with \
             inc): {}",
            violation.kind
        ),
    })
}

/// Which pool of rights: to decrement (`Down`) or to increment (`Up`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// Rights to decrement; they add up to `value − min`.
    Down,
    /// Rights to increment (only with a `max`); they add up to `max − value`.
    Up,
}

impl PoolKind {
    fn key(self) -> &'static str {
        match self {
            PoolKind::Down => DOWN_KEY,
            PoolKind::Up => UP_KEY,
        }
    }
}

/// One pool of rights as read from a document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pool {
    /// `grants[from][to]`: rights created at `from` when `from == to`,
    /// otherwise rights `from` transferred to `to`.
    pub grants: BTreeMap<String, BTreeMap<String, i64>>,
    /// `spent[site]`: rights `site` used up.
    pub spent: BTreeMap<String, i64>,
}

impl Pool {
    /// The rights `site` holds. A state read by [`read`] never saturates;
    /// a hand-built one saturates at the `i64` range.
    pub fn rights(&self, site: &SiteName) -> i64 {
        saturate(self.rights_wide(site.as_str()))
    }

    /// The rights of every site named anywhere in the pool.
    pub fn rights_all(&self) -> BTreeMap<String, i64> {
        self.sites()
            .into_iter()
            .map(|site| (site.to_owned(), saturate(self.rights_wide(site))))
            .collect()
    }

    /// The rights of all sites together: created minus spent (transfers
    /// cancel out).
    pub fn total(&self) -> i64 {
        saturate(self.total_wide())
    }

    /// What `site` can give away and keep `low_water`:
    /// `max(0, rights − low_water)`.
    pub fn spare(&self, site: &SiteName, low_water: i64) -> i64 {
        saturate((self.rights_wide(site.as_str()) - i128::from(low_water)).max(0))
    }

    fn sites(&self) -> BTreeSet<&str> {
        let mut sites = BTreeSet::new();
        for (from, row) in &self.grants {
            sites.insert(from.as_str());
            sites.extend(row.keys().map(String::as_str));
        }
        sites.extend(self.spent.keys().map(String::as_str));
        sites
    }

    /// `rights` without overflow: each term is an `i64`, and there are far
    /// fewer than 2^64 of them.
    fn rights_wide(&self, site: &str) -> i128 {
        let mut rights = 0i128;
        for (from, row) in &self.grants {
            for (to, &n) in row {
                // grants[s][s] (created at s) and grants[t][s] (given to s)
                // add; grants[s][t] (given away) subtracts.
                if to == site {
                    rights += i128::from(n);
                } else if from == site {
                    rights -= i128::from(n);
                }
            }
        }
        rights - i128::from(self.spent.get(site).copied().unwrap_or(0))
    }

    fn total_wide(&self) -> i128 {
        let created: i128 = self
            .grants
            .iter()
            .filter_map(|(from, row)| row.get(from))
            .map(|&n| i128::from(n))
            .sum();
        let spent: i128 = self.spent.values().map(|&n| i128::from(n)).sum();
        created - spent
    }

    fn entry(&self, from: &str, to: &str) -> i64 {
        self.grants
            .get(from)
            .and_then(|row| row.get(to))
            .copied()
            .unwrap_or(0)
    }
}

fn saturate(n: i128) -> i64 {
    i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
}

/// A bounded counter as read from a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounded {
    /// The lower bound.
    pub min: i64,
    /// The upper bound, if any.
    pub max: Option<i64>,
    /// The value (the automerge counter at the pointer).
    pub value: i64,
    /// Rights to decrement.
    pub down: Pool,
    /// Rights to increment, present exactly when `max` is.
    pub up: Option<Pool>,
}

impl Bounded {
    /// The down-rights `site` holds: how much it may decrement on its own.
    pub fn rights(&self, site: &SiteName) -> i64 {
        self.down.rights(site)
    }

    /// The down-rights of every site named in the state.
    pub fn rights_all(&self) -> BTreeMap<String, i64> {
        self.down.rights_all()
    }

    /// The down-rights of all sites together (`value − min` when the state
    /// is consistent).
    pub fn available_total(&self) -> i64 {
        self.down.total()
    }

    /// One of the pools; `None` for `Up` without a `max`.
    pub fn pool(&self, kind: PoolKind) -> Option<&Pool> {
        match kind {
            PoolKind::Down => Some(&self.down),
            PoolKind::Up => self.up.as_ref(),
        }
    }
}

/// How a site with spare rights answers a request for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantPolicy {
    /// Give what was asked for, as far as the spare allows.
    OnDemand,
    /// Give at least half the spare (rounded up), so the asker does not come
    /// back soon: `min(spare, max(needed, ceil(spare / 2)))`.
    Proportional,
}

/// How many rights of `pool` `granter` should transfer to a site that needs
/// `needed`, keeping its own `low_water`. Never negative, never more than the
/// granter's [`Pool::spare`].
pub fn grant_for(
    pool: &Pool,
    granter: &SiteName,
    needed: i64,
    low_water: i64,
    policy: GrantPolicy,
) -> i64 {
    let spare = pool.spare(granter, low_water);
    let needed = needed.max(0);
    match policy {
        GrantPolicy::OnDemand => needed.min(spare),
        // spare ≥ 0, so spare / 2 + spare % 2 neither overflows nor rounds down.
        GrantPolicy::Proportional => spare.min(needed.max(spare / 2 + spare % 2)),
    }
}

/// How a site manages the rights of the bounded counters a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Rights this site keeps: below it, it asks peers for more before it
    /// runs out, and it never grants away the rights under it.
    pub low_water: i64,
    /// How much it grants when asked.
    pub rebalance: GrantPolicy,
    /// How long an op short of rights waits for a grant by default.
    pub wait: std::time::Duration,
}

/// Longest wait for rights an op may ask for.
pub const WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(30);

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            low_water: 0,
            rebalance: GrantPolicy::Proportional,
            wait: std::time::Duration::from_millis(2000),
        }
    }
}

/// A [`Policy`] for the bounded counters of some documents.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The documents.
    pub docs: crate::protocol::scope::Glob,
    /// The counter's pointer; a `*` segment matches any one key.
    pub path: String,
    /// What applies to them.
    pub policy: Policy,
}

impl Rule {
    /// Whether the rule covers the counter at `pointer` of document `doc`.
    pub fn covers(&self, doc: &str, pointer: &str) -> bool {
        if !self.docs.matches(doc) {
            return false;
        }
        let (Ok(want), Ok(got)) = (Pointer::parse(&self.path), Pointer::parse(pointer)) else {
            return false;
        };
        want.segments().len() == got.segments().len()
            && want
                .segments()
                .iter()
                .zip(got.segments())
                .all(|(w, g)| w == "*" || w == g)
    }
}

/// The escrow policies of a replica: the first rule covering a counter
/// applies, otherwise the default.
#[derive(Debug, Clone, Default)]
pub struct EscrowConfig {
    /// Rules in order.
    pub rules: Vec<Rule>,
    /// What applies where no rule does.
    pub default: Policy,
}

impl EscrowConfig {
    /// The policy of the counter at `pointer` of document `doc`.
    pub fn policy(&self, doc: &str, pointer: &str) -> Policy {
        self.rules
            .iter()
            .find(|rule| rule.covers(doc, pointer))
            .map_or(self.default, |rule| rule.policy)
    }
}

/// True when `site` holds fewer than `low_water` rights of `pool` while some
/// other site has rights to spare above that same mark.
pub fn needs_rebalance(pool: &Pool, site: &SiteName, low_water: i64) -> bool {
    if pool.rights(site) >= low_water {
        return false;
    }
    pool.sites()
        .into_iter()
        .filter(|other| *other != site.as_str())
        .any(|other| pool.rights_wide(other) > i128::from(low_water))
}

/// Makes `pointer` a bounded counter holding `value`, with all rights at
/// `site`: down-rights `value − min` and, with a `max`, up-rights
/// `max − value`. Missing parent maps are created. On error the transaction
/// may hold part of the write (only when writing the value itself fails) and
/// must be rolled back.
pub fn create<T: Transactable>(
    tx: &mut T,
    pointer: &str,
    value: i64,
    min: i64,
    max: Option<i64>,
    site: &SiteName,
) -> Result<(), EscrowError> {
    let pointer = parse_pointer(pointer)?;
    let p = pointer.as_str();
    let bad = |reason: String| EscrowError::BadBounds {
        pointer: p.to_owned(),
        reason,
    };
    if value < min {
        return Err(bad(format!("value {value} below min {min}")));
    }
    if let Some(max) = max {
        if value > max {
            return Err(bad(format!("value {value} above max {max}")));
        }
    }
    let down = value.checked_sub(min).ok_or_else(|| overflow(p))?;
    let up = max
        .map(|max| max.checked_sub(value).ok_or_else(|| overflow(p)))
        .transpose()?;

    let key = state_key(p);
    if tx.get(ROOT, key.as_str())?.is_some() {
        return Err(EscrowError::Exists {
            pointer: p.to_owned(),
        });
    }
    check_map_path(tx, &pointer)?;

    crate::doc::ops::apply_op(
        tx,
        &Op::Set {
            path: p.to_owned(),
            value: serde_json::Value::from(value),
            kind: Some(ValueKind::Counter),
            min: None,
            max: None,
        },
    )?;
    let state = tx.put_object(ROOT, key.as_str(), ObjType::Map)?;
    tx.put(&state, MIN_KEY, ScalarValue::Int(min))?;
    if let Some(max) = max {
        tx.put(&state, MAX_KEY, ScalarValue::Int(max))?;
    }
    write_new_pool(tx, &state, DOWN_KEY, site, down)?;
    if let Some(up) = up {
        write_new_pool(tx, &state, UP_KEY, site, up)?;
    }
    Ok(())
}

fn write_new_pool<T: Transactable>(
    tx: &mut T,
    state: &ObjId,
    key: &str,
    site: &SiteName,
    rights: i64,
) -> Result<(), EscrowError> {
    let pool = tx.put_object(state, key, ObjType::Map)?;
    let grants = tx.put_object(&pool, GRANTS_KEY, ObjType::Map)?;
    tx.put_object(&pool, SPENT_KEY, ObjType::Map)?;
    let own = tx.put_object(&grants, site.as_str(), ObjType::Map)?;
    tx.put(&own, site.as_str(), ScalarValue::counter(rights))?;
    Ok(())
}

/// Lowers the counter at `pointer` by `amount` within `site`'s down-rights,
/// and returns the down-rights `site` has left. Every refusal is decided
/// before anything is written.
pub fn decrement<T: Transactable>(
    tx: &mut T,
    pointer: &str,
    site: &SiteName,
    amount: i64,
) -> Result<i64, EscrowError> {
    decrement_known(tx, pointer, site, amount, &mut Known::default())
}

/// [`decrement`], taking the counter's state from `known` when it is there
/// (see [`apply_ops_known`]) and leaving there what the spend made of it.
fn decrement_known<T: Transactable>(
    tx: &mut T,
    pointer: &str,
    site: &SiteName,
    amount: i64,
    known: &mut Known,
) -> Result<i64, EscrowError> {
    let pointer = parse_pointer(pointer)?;
    let p = pointer.as_str();
    positive(amount)?;
    let s = site.as_str();
    let mut found = match known.counters.remove(p) {
        Some(found) => found,
        None => locate_for(tx, &pointer, Some(s))?.ok_or_else(|| EscrowError::NotBounded {
            pointer: p.to_owned(),
        })?,
    };
    let state = &found.state;
    let here = state.down.rights(site);
    if here < amount {
        // The refusal names what all sites hold: read the whole pool.
        let total = locate_existing(tx, &pointer)?.state.down.total();
        return Err(EscrowError::Insufficient {
            pointer: p.to_owned(),
            pool: PoolKind::Down,
            wanted: amount,
            available_here: here,
            available_total: total,
        });
    }
    // rights ≤ value − min, so the value stays ≥ min and fits.
    let spent = spent_of(&state.down, s)
        .checked_add(amount)
        .ok_or_else(|| overflow(p))?;

    tx.increment(&found.value_parent, found.value_key.as_str(), -amount)?;
    tx.put(&found.down.spent, s, ScalarValue::Int(spent))?;
    found.state.down.spent.insert(s.to_owned(), spent);
    if let Some(up) = &found.up {
        let own = own_grants(tx, up, site)?;
        add_to(tx, &own, s, amount)?;
        if let Some(pool) = found.state.up.as_mut() {
            let entry = pool
                .grants
                .entry(s.to_owned())
                .or_default()
                .entry(s.to_owned())
                .or_default();
            *entry = entry.saturating_add(amount);
        }
    }
    known.counters.insert(p.to_owned(), found);
    Ok(here - amount)
}

/// Raises the counter at `pointer` by `amount`; with a `max`, within
/// `site`'s up-rights, and returns the up-rights `site` has left (`None`
/// without a `max`). The new down-rights go to `site`. Every refusal is
/// decided before anything is written.
pub fn increment<T: Transactable>(
    tx: &mut T,
    pointer: &str,
    site: &SiteName,
    amount: i64,
) -> Result<Option<i64>, EscrowError> {
    let pointer = parse_pointer(pointer)?;
    let p = pointer.as_str();
    positive(amount)?;
    let found = locate_existing(tx, &pointer)?;
    let state = &found.state;
    let s = site.as_str();
    if let (Some(max), Some(up)) = (state.max, &state.up) {
        let here = up.rights(site);
        if here < amount {
            if i128::from(state.value) + i128::from(amount) > i128::from(max) {
                return Err(EscrowError::AboveMax {
                    pointer: p.to_owned(),
                    max,
                    value: state.value,
                });
            }
            return Err(EscrowError::Insufficient {
                pointer: p.to_owned(),
                pool: PoolKind::Up,
                wanted: amount,
                available_here: here,
                available_total: up.total(),
            });
        }
        spent_of(up, s)
            .checked_add(amount)
            .ok_or_else(|| overflow(p))?;
    }
    let new_value = state.value.checked_add(amount).ok_or_else(|| overflow(p))?;
    // The down pool must still add up within an i64.
    new_value
        .checked_sub(state.min)
        .ok_or_else(|| overflow(p))?;
    state
        .down
        .entry(s, s)
        .checked_add(amount)
        .ok_or_else(|| overflow(p))?;

    tx.increment(&found.value_parent, found.value_key.as_str(), amount)?;
    let own = own_grants(tx, &found.down, site)?;
    add_to(tx, &own, s, amount)?;
    if let (Some(up), Some(pool)) = (&found.up, &state.up) {
        // Checked above to fit.
        tx.put(&up.spent, s, ScalarValue::Int(spent_of(pool, s) + amount))?;
    }
    Ok(state.up.as_ref().map(|up| up.rights(site) - amount))
}

/// Moves `amount` rights of `pool` from site `from` to site `to`. Only `from`
/// may call this (the caller passes its own site): the entry written,
/// `grants[from][to]`, belongs to `from`. Every refusal is decided before
/// anything is written.
pub fn transfer<T: Transactable>(
    tx: &mut T,
    pointer: &str,
    pool: PoolKind,
    from: &SiteName,
    to: &SiteName,
    amount: i64,
) -> Result<(), EscrowError> {
    let pointer = parse_pointer(pointer)?;
    let p = pointer.as_str();
    positive(amount)?;
    if from == to {
        return Err(EscrowError::SameSite {
            pointer: p.to_owned(),
        });
    }
    let found = locate_existing(tx, &pointer)?;
    let (rights, objs) = match pool {
        PoolKind::Down => (&found.state.down, &found.down),
        PoolKind::Up => match (&found.state.up, &found.up) {
            (Some(rights), Some(objs)) => (rights, objs),
            _ => {
                return Err(EscrowError::NoUpperBound {
                    pointer: p.to_owned(),
                })
            }
        },
    };
    let here = rights.rights(from);
    if here < amount {
        return Err(EscrowError::Insufficient {
            pointer: p.to_owned(),
            pool,
            wanted: amount,
            available_here: here,
            available_total: rights.total(),
        });
    }
    rights
        .entry(from.as_str(), to.as_str())
        .checked_add(amount)
        .ok_or_else(|| overflow(p))?;

    let own = own_grants(tx, objs, from)?;
    add_to(tx, &own, to.as_str(), amount)?;
    Ok(())
}

/// The bounded counter at `pointer`, or `None` when there is none. A state
/// that does not have this module's layout is [`EscrowError::Malformed`].
pub fn read<D: ReadDoc>(doc: &D, pointer: &str) -> Result<Option<Bounded>, EscrowError> {
    let pointer = parse_pointer(pointer)?;
    Ok(locate(doc, &pointer)?.map(|found| found.state))
}

/// Every bounded counter of the document, by pointer.
pub fn list<D: ReadDoc>(doc: &D) -> Result<Vec<(String, Bounded)>, EscrowError> {
    let mut all = Vec::new();
    for pointer in pointers(doc) {
        let parsed = parse_pointer(&pointer).map_err(|_| malformed(&pointer, "not a pointer"))?;
        let found = locate(doc, &parsed)?.ok_or_else(|| malformed(&pointer, "state vanished"))?;
        all.push((pointer, found.state));
    }
    Ok(all)
}

/// The pointers of every bounded counter of the document, in key order.
pub fn pointers<D: ReadDoc>(doc: &D) -> Vec<String> {
    // Every state key is STATE_PREFIX + "/...", and '0' follows '/'.
    let end = format!("{STATE_PREFIX}0");
    doc.map_range(ROOT, format!("{STATE_PREFIX}/")..end)
        .map(|item| item.key[STATE_PREFIX.len()..].to_owned())
        .collect()
}

/// Whether the document holds any bounded counter.
pub fn any<D: ReadDoc>(doc: &D) -> bool {
    let end = format!("{STATE_PREFIX}0");
    doc.map_range(ROOT, format!("{STATE_PREFIX}/")..end)
        .next()
        .is_some()
}

/// An invariant of a bounded counter that the document breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pointer}: {kind}")]
pub struct Violation {
    /// The counter (empty for the `_escrow` map itself).
    pub pointer: String,
    /// What failed.
    pub kind: ViolationKind,
}

/// What [`check`] found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ViolationKind {
    /// The state cannot be read.
    #[error("malformed: {reason}")]
    Malformed {
        /// What is wrong.
        reason: String,
    },
    /// Sites created the same escrow map concurrently; only one of the
    /// conflicting values is visible, so rights written into the other are
    /// hidden.
    #[error("{key} was created concurrently {count} times")]
    ConcurrentCreate {
        /// The key with conflicting values.
        key: String,
        /// How many values it has.
        count: usize,
    },
    /// The counter differs from `min + created − spent` of the down pool.
    #[error("value {value}, but the down pool accounts for {expected}")]
    ValueMismatch {
        /// The automerge counter.
        value: i64,
        /// `min + Σ grants[s][s] − Σ spent[s]`.
        expected: i128,
    },
    /// The value is below `min`.
    #[error("value {value} below min {min}")]
    BelowMin {
        /// The value.
        value: i64,
        /// The bound.
        min: i64,
    },
    /// The value is above `max`.
    #[error("value {value} above max {max}")]
    AboveMax {
        /// The value.
        value: i64,
        /// The bound.
        max: i64,
    },
    /// A site holds negative rights.
    #[error("{site} holds {rights} rights in the {pool:?} pool")]
    NegativeRights {
        /// The pool.
        pool: PoolKind,
        /// The site.
        site: String,
        /// Its rights.
        rights: i128,
    },
    /// The rights of a pool do not add up to the room left on its side.
    #[error("{pool:?} rights add up to {sum}, expected {expected}")]
    PoolSum {
        /// The pool.
        pool: PoolKind,
        /// The sum of every site's rights.
        sum: i128,
        /// `value − min` (down) or `max − value` (up).
        expected: i128,
    },
}

/// Checks every bounded counter of the document: the value is the down
/// pool's `min + created − spent`, lies within `[min, max]`, no site's
/// rights are negative, and each pool's rights add up to the room on its
/// side. The first broken invariant is returned.
pub fn check<D: ReadDoc>(doc: &D) -> Result<(), Violation> {
    let violation = |pointer: &str, kind| Violation {
        pointer: pointer.to_owned(),
        kind,
    };
    let as_violation = |pointer: &str, e: EscrowError| match e {
        EscrowError::Malformed { pointer, reason } => {
            violation(&pointer, ViolationKind::Malformed { reason })
        }
        other => violation(
            pointer,
            ViolationKind::Malformed {
                reason: other.to_string(),
            },
        ),
    };
    for pointer in pointers(doc) {
        let key = state_key(&pointer);
        match doc.get_all(ROOT, key.as_str()).map(|all| all.len()) {
            Ok(count) if count > 1 => {
                return Err(violation(
                    &pointer,
                    ViolationKind::ConcurrentCreate { key, count },
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(as_violation(&pointer, e.into())),
        }
        let state = parse_pointer(&pointer)
            .and_then(|parsed| locate(doc, &parsed))
            .map_err(|e| as_violation(&pointer, e))?
            .ok_or_else(|| as_violation(&pointer, malformed(&pointer, "state vanished")))?
            .state;
        check_one(&state).map_err(|kind| violation(&pointer, kind))?;
    }
    Ok(())
}

fn check_one(state: &Bounded) -> Result<(), ViolationKind> {
    let value = i128::from(state.value);
    let expected = i128::from(state.min) + state.down.total_wide();
    if value != expected {
        return Err(ViolationKind::ValueMismatch {
            value: state.value,
            expected,
        });
    }
    if state.value < state.min {
        return Err(ViolationKind::BelowMin {
            value: state.value,
            min: state.min,
        });
    }
    if let Some(max) = state.max {
        if state.value > max {
            return Err(ViolationKind::AboveMax {
                value: state.value,
                max,
            });
        }
    }
    let mut pools = vec![(PoolKind::Down, &state.down, value - i128::from(state.min))];
    if let (Some(max), Some(up)) = (state.max, &state.up) {
        pools.push((PoolKind::Up, up, i128::from(max) - value));
    }
    for (kind, pool, expected) in pools {
        let mut sum = 0i128;
        for site in pool.sites() {
            let rights = pool.rights_wide(site);
            if rights < 0 {
                return Err(ViolationKind::NegativeRights {
                    pool: kind,
                    site: site.to_owned(),
                    rights,
                });
            }
            sum += rights;
        }
        if sum != expected {
            return Err(ViolationKind::PoolSum {
                pool: kind,
                sum,
                expected,
            });
        }
    }
    Ok(())
}

/// Where a pool's two maps live.
#[derive(Debug, Clone)]
struct PoolObjs {
    grants: ObjId,
    spent: ObjId,
}

/// What this site's own decrements in one document left of its counters'
/// state (the entries naming this site, and where they live), so that the
/// next decrement there need not read it again: reading the state is most
/// of what a decrement costs beyond the plain counter's increment.
///
/// It describes one document state only. A [`crate::Replica`] keeps it
/// with the heads its commit produced and passes it on only while the
/// document is still at exactly those heads: any other change, local or
/// merged, moves the heads and the state is read again.
#[derive(Debug, Default, Clone)]
pub struct Known {
    counters: BTreeMap<String, Located>,
}

impl Known {
    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }
}

/// A bounded counter read from a document, with the objects an op writes.
#[derive(Debug, Clone)]
struct Located {
    state: Bounded,
    value_parent: ObjId,
    value_key: String,
    down: PoolObjs,
    up: Option<PoolObjs>,
}

fn parse_pointer(text: &str) -> Result<Pointer, EscrowError> {
    let pointer = Pointer::parse(text)?;
    let bad = |reason: &str| {
        EscrowError::Op(OpError::BadPath {
            path: pointer.as_str().chars().take(200).collect(),
            reason: reason.to_owned(),
        })
    };
    match pointer.segments().first() {
        None => Err(bad("a bounded counter is a field, not the whole document")),
        Some(first) if crate::conflict::is_reserved_key(first) => {
            Err(bad("root keys with the conflict prefix are reserved"))
        }
        Some(_) => Ok(pointer),
    }
}

fn positive(amount: i64) -> Result<(), EscrowError> {
    if amount > 0 {
        Ok(())
    } else {
        Err(EscrowError::BadAmount { amount })
    }
}

fn overflow(pointer: &str) -> EscrowError {
    EscrowError::Overflow {
        pointer: pointer.to_owned(),
    }
}

fn malformed(pointer: &str, reason: impl Into<String>) -> EscrowError {
    EscrowError::Malformed {
        pointer: pointer.to_owned(),
        reason: reason.into(),
    }
}

fn spent_of(pool: &Pool, site: &str) -> i64 {
    pool.spent.get(site).copied().unwrap_or(0)
}

/// Refuses a pointer whose existing prefix passes through anything but
/// maps: a list index would name a different element after a concurrent
/// insert, and the rights would follow the pointer, not the element.
fn check_map_path<D: ReadDoc>(doc: &D, pointer: &Pointer) -> Result<(), EscrowError> {
    let Some((parents, _)) = pointer.split_last() else {
        return Ok(());
    };
    let mut obj = ROOT;
    for segment in parents {
        match doc.get(&obj, segment.as_str())? {
            None => return Ok(()),
            Some((Value::Object(ObjType::Map | ObjType::Table), id)) => obj = id,
            Some(_) => {
                return Err(EscrowError::Op(OpError::BadPath {
                    path: pointer.as_str().chars().take(200).collect(),
                    reason: "a bounded counter lives in maps only (no lists, text or scalars on \
                             the way)"
                        .to_owned(),
                }))
            }
        }
    }
    Ok(())
}

fn locate_existing<D: ReadDoc>(doc: &D, pointer: &Pointer) -> Result<Located, EscrowError> {
    locate(doc, pointer)?.ok_or_else(|| EscrowError::NotBounded {
        pointer: pointer.as_str().to_owned(),
    })
}

fn locate<D: ReadDoc>(doc: &D, pointer: &Pointer) -> Result<Option<Located>, EscrowError> {
    locate_for(doc, pointer, None)
}

/// [`locate`], reading with `focus` only what a spend by that site needs:
/// the pool entries naming it, and not the value. Reading a counter sums
/// every increment it ever had, so a spend reads no more counters than it
/// must; the state it returns has `value` 0 and partial pools.
fn locate_for<D: ReadDoc>(
    doc: &D,
    pointer: &Pointer,
    focus: Option<&str>,
) -> Result<Option<Located>, EscrowError> {
    let p = pointer.as_str();
    let state_obj = match doc.get(ROOT, state_key(p).as_str())? {
        None => return Ok(None),
        Some((Value::Object(ObjType::Map), id)) => id,
        Some(_) => return Err(malformed(p, "state is not a map")),
    };
    let min = read_int(doc, &state_obj, MIN_KEY, p)?.ok_or_else(|| malformed(p, "no min"))?;
    let max = read_int(doc, &state_obj, MAX_KEY, p)?;
    let (down, down_objs) = read_pool(doc, &state_obj, PoolKind::Down.key(), p, focus)?
        .ok_or_else(|| malformed(p, "no down pool"))?;
    let up = read_pool(doc, &state_obj, PoolKind::Up.key(), p, focus)?;
    if max.is_some() != up.is_some() {
        return Err(malformed(
            p,
            "an up pool goes with a max, and only with one",
        ));
    }
    let (up, up_objs) = up.unzip();

    let (value_parent, value_key) = value_slot(doc, pointer)?;
    let value = match doc.get(&value_parent, value_key.as_str())? {
        Some((Value::Scalar(_), _)) if focus.is_some() => 0,
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Counter(c) => i64::from(c),
            _ => return Err(malformed(p, "the value is not a counter")),
        },
        Some(_) => return Err(malformed(p, "the value is not a counter")),
        None => return Err(malformed(p, "no value at the pointer")),
    };
    let state = Bounded {
        min,
        max,
        value,
        down,
        up,
    };
    check_fits(&state, p)?;
    Ok(Some(Located {
        state,
        value_parent,
        value_key,
        down: down_objs,
        up: up_objs,
    }))
}

/// Refuses a state whose rights or totals do not fit an `i64`, so the
/// accessors of [`Pool`] never saturate on what [`read`] returns.
fn check_fits(state: &Bounded, p: &str) -> Result<(), EscrowError> {
    for pool in std::iter::once(&state.down).chain(&state.up) {
        let fits = |n: i128| i64::try_from(n).is_ok();
        if !fits(pool.total_wide()) || !pool.sites().into_iter().all(|s| fits(pool.rights_wide(s)))
        {
            return Err(malformed(p, "rights do not fit an i64"));
        }
    }
    Ok(())
}

/// The map holding the value and its key, following maps only.
fn value_slot<D: ReadDoc>(doc: &D, pointer: &Pointer) -> Result<(ObjId, String), EscrowError> {
    let p = pointer.as_str();
    let (parents, last) = pointer
        .split_last()
        .ok_or_else(|| malformed(p, "the root is not a counter"))?;
    let mut obj = ROOT;
    for segment in parents {
        match doc.get(&obj, segment.as_str())? {
            Some((Value::Object(ObjType::Map | ObjType::Table), id)) => obj = id,
            Some(_) => return Err(malformed(p, "the path to the value is not all maps")),
            None => return Err(malformed(p, "no value at the pointer")),
        }
    }
    Ok((obj, last.to_owned()))
}

fn read_int<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    key: &str,
    p: &str,
) -> Result<Option<i64>, EscrowError> {
    match doc.get(obj, key)? {
        None => Ok(None),
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Int(n) => Ok(Some(*n)),
            _ => Err(malformed(p, format!("{key} is not an integer"))),
        },
        Some(_) => Err(malformed(p, format!("{key} is not an integer"))),
    }
}

fn read_counter<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str, p: &str) -> Result<i64, EscrowError> {
    match doc.get(obj, key)? {
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Counter(c) => Ok(i64::from(c)),
            ScalarValue::Int(n) => Ok(*n),
            _ => Err(malformed(p, format!("entry {key:?} is not a number"))),
        },
        _ => Err(malformed(p, format!("entry {key:?} is not a number"))),
    }
}

fn read_map<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    key: &str,
    p: &str,
) -> Result<Option<ObjId>, EscrowError> {
    match doc.get(obj, key)? {
        None => Ok(None),
        Some((Value::Object(ObjType::Map), id)) => Ok(Some(id)),
        Some(_) => Err(malformed(p, format!("{key} is not a map"))),
    }
}

fn site_key(key: &str, p: &str) -> Result<String, EscrowError> {
    SiteName::new(key)
        .map(|_| key.to_owned())
        .map_err(|_| malformed(p, format!("{key:?} is not a site name")))
}

/// A pool's entries; with `focus`, only those naming that site.
fn read_pool<D: ReadDoc>(
    doc: &D,
    state: &ObjId,
    key: &str,
    p: &str,
    focus: Option<&str>,
) -> Result<Option<(Pool, PoolObjs)>, EscrowError> {
    let Some(pool_obj) = read_map(doc, state, key, p)? else {
        return Ok(None);
    };
    let in_pool = |what: &str| malformed(p, format!("{key} pool has no {what}"));
    let grants_obj = read_map(doc, &pool_obj, GRANTS_KEY, p)?.ok_or_else(|| in_pool(GRANTS_KEY))?;
    let spent_obj = read_map(doc, &pool_obj, SPENT_KEY, p)?.ok_or_else(|| in_pool(SPENT_KEY))?;
    let mut pool = Pool::default();
    for from in doc.keys(&grants_obj) {
        let from = site_key(&from, p)?;
        let row_obj = read_map(doc, &grants_obj, &from, p)?
            .ok_or_else(|| malformed(p, "grants row vanished"))?;
        let mut row = BTreeMap::new();
        for to in doc.keys(&row_obj) {
            let to = site_key(&to, p)?;
            if focus.is_some_and(|f| f != from && f != to) {
                continue;
            }
            let n = read_counter(doc, &row_obj, &to, p)?;
            row.insert(to, n);
        }
        pool.grants.insert(from, row);
    }
    for site in doc.keys(&spent_obj) {
        let site = site_key(&site, p)?;
        if focus.is_some_and(|f| f != site) {
            continue;
        }
        let n = read_counter(doc, &spent_obj, &site, p)?;
        pool.spent.insert(site, n);
    }
    Ok(Some((
        pool,
        PoolObjs {
            grants: grants_obj,
            spent: spent_obj,
        },
    )))
}

/// `grants[site]` of a pool, created when missing. Only `site` itself calls
/// this for its own name, so the map is never created concurrently by two
/// sites.
fn own_grants<T: Transactable>(
    tx: &mut T,
    pool: &PoolObjs,
    site: &SiteName,
) -> Result<ObjId, EscrowError> {
    match tx.get(&pool.grants, site.as_str())? {
        Some((Value::Object(ObjType::Map), id)) => Ok(id),
        // `locate` already refused anything else.
        Some(_) | None => Ok(tx.put_object(&pool.grants, site.as_str(), ObjType::Map)?),
    }
}

/// Adds `amount` to the counter at `map[key]`, creating it when absent.
fn add_to<T: Transactable>(
    tx: &mut T,
    map: &ObjId,
    key: &str,
    amount: i64,
) -> Result<(), EscrowError> {
    if tx.get(map, key)?.is_some() {
        tx.increment(map, key, amount)?;
    } else {
        tx.put(map, key, ScalarValue::counter(amount))?;
    }
    Ok(())
}
