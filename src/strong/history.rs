//! Linearizability checker for histories of register operations recorded by concurrent clients.
//!
//! Tests of the strong (linearizable) store record every operation a client issues on a key — when
//! it was invoked, when it returned and what it observed — and [`check`] decides whether one total
//! order of those operations, consistent with real time, explains every observation. It is the
//! Wing–Gong search with Lowe's memoization, as in Knossos and Porcupine: keys are independent
//! registers, so each is checked on its own; the search only tries operations that could come
//! next in real time; and it remembers every (set of linearized operations, register value) pair
//! it has explored. An operation whose outcome the client never learned ([`Outcome::Unknown`]) may
//! take effect at any point after its invocation, or never; the search uses as few of those as it
//! can, and when they multiply the configurations to explore it starts over, exploring those that
//! use fewer of them first. The search is bounded, so a history too tangled to decide yields
//! [`CheckError::Inconclusive`] instead of running forever.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Default bound on the search states explored for one key before the check gives up as
/// inconclusive. A state costs up to about two hundred bytes, so this caps memory near 400 MB;
/// a search that reaches it takes a few seconds.
pub const DEFAULT_MAX_STATES: usize = 2_000_000;

/// How many states the first, plain depth-first search may explore before the search starts
/// over, level by level (see `Search::run`).
const QUICK_STATES: usize = 50_000;

/// How many candidate operations a [`Violation`] lists at most.
const MAX_REPORTED: usize = 8;

/// An operation on one key: a register holding `Option<i64>` that starts as `None` (absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Read the current value.
    Read,
    /// Set the value to `Some(v)`.
    Write(i64),
    /// Set the value to `Some(new)` if and only if it is currently `Some(expect)`.
    Cas {
        /// The value the register must hold for the swap to happen.
        expect: i64,
        /// The value stored when the swap happens.
        new: i64,
    },
}

/// What the client learned about an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A read returned this value (`None` means the key was absent).
    Read(Option<i64>),
    /// A write was acknowledged.
    WriteOk,
    /// A compare-and-swap found the expected value and stored the new one.
    CasOk,
    /// A compare-and-swap found another value (or none) and changed nothing.
    CasFailed,
    /// The client never learned whether the operation took effect (timeout, lost connection, a
    /// 503/504 after the request may have reached the leader): it may have taken effect at any
    /// point after its invocation, or not at all.
    Unknown,
}

/// One operation as recorded by a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The client that issued the operation; only used in reports.
    pub client: u64,
    /// The key (register) the operation addressed.
    pub key: String,
    /// The operation.
    pub op: Op,
    /// When the request was sent, in nanoseconds of a clock shared by all clients.
    pub invoked_ns: u64,
    /// When the response arrived, on the same clock; ignored for [`Outcome::Unknown`].
    pub returned_ns: Option<u64>,
    /// What the response said.
    pub outcome: Outcome,
}

/// Why a history failed the check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckError {
    /// The history of one key has no linearization.
    NotLinearizable(Violation),
    /// The search for one key explored more than the allowed number of states without an answer;
    /// the history may or may not be linearizable.
    Inconclusive {
        /// The key whose search was abandoned.
        key: String,
        /// How many operations that key's history holds.
        ops: usize,
        /// How many search states had been explored.
        states: usize,
    },
    /// An event contradicts itself, so the history cannot be judged.
    Malformed {
        /// Position of the event in the slice given to [`check`].
        index: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Evidence that one key's history is not linearizable: how far the longest explainable prefix got
/// and the operations none of which can come next after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The key whose history is not linearizable.
    pub key: String,
    /// How many operations of the key were checked (reads with unknown outcome are dropped).
    pub ops: usize,
    /// How many of them completed with a known outcome; all of these must be linearized.
    pub completed: usize,
    /// The largest number of completed operations any partial linearization contains.
    pub linearized: usize,
    /// The register value after one such longest partial linearization.
    pub value: Option<i64>,
    /// Completed operations that could come next in real time after it (at most eight), none of
    /// which leads to a full linearization.
    pub next: Vec<Event>,
}

/// Checks that the history of every key is linearizable, with [`DEFAULT_MAX_STATES`] as bound.
pub fn check(events: &[Event]) -> Result<(), CheckError> {
    check_with_limit(events, DEFAULT_MAX_STATES)
}

/// Checks that the history of every key is linearizable, giving up with
/// [`CheckError::Inconclusive`] once the search for one key has explored `max_states` states.
pub fn check_with_limit(events: &[Event], max_states: usize) -> Result<(), CheckError> {
    check_keys(events, max_states, QUICK_STATES)
}

/// [`check_with_limit`], with the plain depth-first search limited to `quick_states` states.
fn check_keys(events: &[Event], max_states: usize, quick_states: usize) -> Result<(), CheckError> {
    let mut by_key: BTreeMap<&str, Vec<Entry>> = BTreeMap::new();
    for (index, event) in events.iter().enumerate() {
        match classify(event) {
            Err(reason) => return Err(CheckError::Malformed { index, reason }),
            // A read whose outcome is unknown observed nothing and changed nothing.
            Ok(None) => {}
            Ok(Some((action, returned))) => {
                let (invoked, slot) = (event.invoked_ns, 0);
                let entry = Entry {
                    event: index,
                    action,
                    invoked,
                    returned,
                    slot,
                };
                by_key.entry(&event.key).or_default().push(entry);
            }
        }
    }
    for (key, entries) in by_key {
        Search::new(entries).run(key, events, max_states, quick_states)?;
    }
    Ok(())
}

/// The effect of an operation together with what its outcome demands of the register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Read(Option<i64>),
    Write(i64),
    /// A successful CAS from the first value to the second.
    CasOk(i64, i64),
    /// A failed CAS that expected this value.
    CasFailed(i64),
    /// A CAS with unknown outcome: if it took effect it swapped exactly when the value matched.
    CasMaybe(i64, i64),
}

impl Action {
    /// Returns the register value after this action, or `None` if the outcome contradicts `value`.
    fn apply(self, value: Option<i64>) -> Option<Option<i64>> {
        match self {
            Action::Read(seen) => (seen == value).then_some(value),
            Action::Write(v) => Some(Some(v)),
            Action::CasOk(expect, new) => (value == Some(expect)).then_some(Some(new)),
            Action::CasFailed(expect) => (value != Some(expect)).then_some(value),
            Action::CasMaybe(expect, new) if value == Some(expect) => Some(Some(new)),
            Action::CasMaybe(..) => Some(value),
        }
    }
}

/// Turns an event into its action and return time (`None` when unknown), or `Ok(None)` when the
/// event can be dropped.
fn classify(event: &Event) -> Result<Option<(Action, Option<u64>)>, &'static str> {
    let action = match (event.op, event.outcome) {
        (Op::Read, Outcome::Unknown) => return Ok(None),
        (Op::Write(v), Outcome::Unknown) => return Ok(Some((Action::Write(v), None))),
        (Op::Cas { expect, new }, Outcome::Unknown) => {
            return Ok(Some((Action::CasMaybe(expect, new), None)))
        }
        (Op::Read, Outcome::Read(seen)) => Action::Read(seen),
        (Op::Write(v), Outcome::WriteOk) => Action::Write(v),
        (Op::Cas { expect, new }, Outcome::CasOk) => Action::CasOk(expect, new),
        (Op::Cas { expect, .. }, Outcome::CasFailed) => Action::CasFailed(expect),
        _ => return Err("the outcome does not fit the kind of operation"),
    };
    match event.returned_ns {
        None => Err("a known outcome needs a return time"),
        Some(returned) if returned < event.invoked_ns => Err("it returned before it was invoked"),
        returned => Ok(Some((action, returned))),
    }
}

/// One operation of a key's history, ready for the search.
struct Entry {
    /// Index of the event in the caller's slice.
    event: usize,
    action: Action,
    invoked: u64,
    /// `None` for unknown outcomes: such operations never force anything to precede them.
    returned: Option<u64>,
    /// Bit index within the set of completed or of unknown operations, whichever this is.
    slot: usize,
}

/// Memo of explored configurations. A configuration is the set of linearized completed operations,
/// the register value and the set of unknown operations used so far. Using fewer unknown operations
/// only leaves more options (they never have to be linearized and never block anything), so a
/// configuration is skipped if one with the same completed set and value and a subset of its
/// unknown set was already explored.
#[derive(Default)]
struct Cache {
    /// For each (completed set, value): the minimal unknown sets it was reached with.
    seen: HashMap<ConfigKey, Vec<Box<[u64]>>>,
    /// Configurations recorded so far, including those later superseded by smaller unknown sets.
    states: usize,
}

/// A completed set in compact form (see [`Cache::visit`]) together with the register value.
type ConfigKey = (usize, Box<[u64]>, Option<i64>);

impl Cache {
    /// Records the configuration and returns true unless it is dominated by one already seen.
    fn visit(&mut self, completed: &[u64], unknown: &[u64], value: Option<i64>) -> bool {
        // The completed set is mostly a prefix of the invocation order, so store it as the index
        // of its first incomplete word plus the words from there to its last set bit.
        let start = completed.iter().position(|&w| w != u64::MAX);
        let start = start.unwrap_or(completed.len());
        let end = completed.iter().rposition(|&w| w != 0).map_or(0, |i| i + 1);
        let key = (start, Box::from(&completed[start..end.max(start)]), value);
        let subset = |a: &[u64], b: &[u64]| a.iter().zip(b).all(|(x, y)| x & !y == 0);
        let known = self.seen.entry(key).or_default();
        if known.iter().any(|k| subset(k, unknown)) {
            return false;
        }
        known.retain(|k| !subset(unknown, k));
        known.push(Box::from(unknown));
        self.states += 1;
        true
    }
}

/// A configuration to explore: linearized completed and unknown operations, and the value.
type Start = (Vec<u64>, Vec<u64>, Option<i64>);

/// The deepest point reached: completed operations linearized, the value, the candidates there.
type Deepest = (usize, Option<i64>, Vec<usize>);

/// The search state for one key's history: which operations are linearized so far.
struct Search {
    /// Operations sorted by invocation time.
    ops: Vec<Entry>,
    /// Indices into `ops` of the completed operations by slot, so in invocation order.
    completed_ops: Vec<usize>,
    /// Indices into `ops` of the unknown operations by slot, so in invocation order.
    unknown_ops: Vec<usize>,
    /// Which completed operations are linearized, as a bitset over their slots.
    completed_done: Vec<u64>,
    /// Which unknown operations are linearized, as a bitset over their slots.
    unknown_done: Vec<u64>,
    /// How many completed operations are not linearized yet.
    remaining: usize,
}

/// Whether bit `slot` of the bitset is set.
fn is_set(bits: &[u64], slot: usize) -> bool {
    bits[slot / 64] & (1 << (slot % 64)) != 0
}

/// Flips bit `slot` of the bitset.
fn flip(bits: &mut [u64], slot: usize) {
    bits[slot / 64] ^= 1 << (slot % 64);
}

/// The index of the lowest clear bit of the bitset.
fn first_clear(bits: &[u64]) -> usize {
    let word = bits
        .iter()
        .position(|&w| w != u64::MAX)
        .unwrap_or(bits.len());
    word * 64 + bits.get(word).map_or(0, |w| w.trailing_ones() as usize)
}

impl Search {
    fn new(mut ops: Vec<Entry>) -> Search {
        ops.sort_by_key(|e| (e.invoked, e.event));
        let (mut completed_ops, mut unknown_ops) = (Vec::new(), Vec::new());
        for (i, entry) in ops.iter_mut().enumerate() {
            let class = if entry.returned.is_some() {
                &mut completed_ops
            } else {
                &mut unknown_ops
            };
            entry.slot = class.len();
            class.push(i);
        }
        Search {
            completed_done: vec![0; completed_ops.len().div_ceil(64)],
            unknown_done: vec![0; unknown_ops.len().div_ceil(64)],
            remaining: completed_ops.len(),
            ops,
            completed_ops,
            unknown_ops,
        }
    }

    /// Puts the search in the configuration where exactly the given operations are linearized.
    fn reset(&mut self, (completed_done, unknown_done): (Vec<u64>, Vec<u64>)) {
        let done: u32 = completed_done.iter().map(|w| w.count_ones()).sum();
        self.remaining = self.completed_ops.len() - done as usize;
        (self.completed_done, self.unknown_done) = (completed_done, unknown_done);
    }

    /// Marks operation `i` as linearized.
    fn lift(&mut self, i: usize) {
        let slot = self.ops[i].slot;
        if self.ops[i].returned.is_some() {
            flip(&mut self.completed_done, slot);
            self.remaining -= 1;
        } else {
            flip(&mut self.unknown_done, slot);
        }
    }

    /// Undoes `lift(i)`.
    fn unlift(&mut self, i: usize) {
        let slot = self.ops[i].slot;
        if self.ops[i].returned.is_some() {
            flip(&mut self.completed_done, slot);
            self.remaining += 1;
        } else {
            flip(&mut self.unknown_done, slot);
        }
    }

    /// The operations that may be linearized next when the register holds `value`: those invoked
    /// no later than the earliest return among unlinearized operations (anything invoked after it
    /// must follow it), split into completed and unknown ones. An unknown operation is offered
    /// only if it would change the value, and only one per resulting value: the earliest invoked,
    /// and a CAS rather than a write, because the write can later do whatever the CAS could.
    fn candidates(&self, value: Option<i64>) -> (Vec<usize>, Vec<usize>) {
        // Only operations invoked before the earliest return seen so far can return earlier.
        let (mut horizon, mut completed) = (u64::MAX, Vec::new());
        for &i in &self.completed_ops[first_clear(&self.completed_done)..] {
            let entry = &self.ops[i];
            if entry.invoked > horizon {
                break;
            }
            if !is_set(&self.completed_done, entry.slot) {
                horizon = horizon.min(entry.returned.unwrap_or(u64::MAX));
                completed.push(i);
            }
        }
        completed.retain(|&i| self.ops[i].invoked <= horizon);
        let mut unknown = Vec::<(Option<i64>, usize)>::new();
        for &i in &self.unknown_ops[first_clear(&self.unknown_done)..] {
            let (action, slot) = (self.ops[i].action, self.ops[i].slot);
            if self.ops[i].invoked > horizon {
                break;
            }
            let Some(next) = action.apply(value).filter(|&next| next != value) else {
                continue;
            };
            if is_set(&self.unknown_done, slot) {
                continue;
            }
            match unknown.iter_mut().find(|(v, _)| *v == next) {
                None => unknown.push((next, i)),
                Some((_, chosen)) if matches!(action, Action::CasMaybe(..)) => {
                    if matches!(self.ops[*chosen].action, Action::Write(_)) {
                        *chosen = i;
                    }
                }
                Some(_) => {}
            }
        }
        (completed, unknown.into_iter().map(|(_, i)| i).collect())
    }

    /// Searches for an order that linearizes every completed operation. A plain depth-first
    /// search, trying unknown operations after the completed ones at each step, settles most
    /// histories at once. But it may reach a configuration using some unknown operations and
    /// later again using fewer, and must then explore it again; with many unknown operations
    /// that repetition grows exponentially. So past `quick` states the search starts over, level
    /// by level: first the configurations that use no unknown operation, then those that use
    /// one, and so on, which explores each configuration once.
    fn run(
        mut self,
        key: &str,
        events: &[Event],
        max: usize,
        quick: usize,
    ) -> Result<(), CheckError> {
        if self.remaining == 0 {
            return Ok(());
        }
        let mut deepest = (0, None, self.candidates(None).0);
        let mut cache = Cache::default();
        let mut outcome = self.explore(None, &mut cache, None, &mut deepest, quick.min(max));
        if outcome.is_err() && max > quick {
            cache = Cache::default();
            let start = (
                vec![0; self.completed_done.len()],
                vec![0; self.unknown_done.len()],
            );
            outcome = self.by_levels(start, &mut cache, &mut deepest, max);
        }
        match outcome {
            Ok(true) => Ok(()),
            Err(states) => {
                let (key, ops) = (key.to_owned(), self.ops.len());
                Err(CheckError::Inconclusive { key, ops, states })
            }
            Ok(false) => {
                let (linearized, value, next) = deepest;
                let next = next.iter().take(MAX_REPORTED);
                Err(CheckError::NotLinearizable(Violation {
                    key: key.to_owned(),
                    ops: self.ops.len(),
                    completed: self.completed_ops.len(),
                    linearized,
                    value,
                    next: next.map(|&i| events[self.ops[i].event].clone()).collect(),
                }))
            }
        }
    }

    /// The level-by-level search from the configuration with the given linearized operations.
    fn by_levels(
        &mut self,
        (completed_done, unknown_done): (Vec<u64>, Vec<u64>),
        cache: &mut Cache,
        deepest: &mut Deepest,
        max_states: usize,
    ) -> Result<bool, usize> {
        let mut level = vec![(completed_done, unknown_done, None)];
        while !level.is_empty() {
            // Deepest starts first: they are the likeliest to lead to a full linearization.
            level.sort_by_cached_key(|(done, ..)| done.iter().map(|w| w.count_ones()).sum::<u32>());
            let mut next_level = Vec::new();
            while let Some((completed_done, unknown_done, value)) = level.pop() {
                if cache.visit(&completed_done, &unknown_done, value) {
                    self.reset((completed_done, unknown_done));
                    if self.explore(value, cache, Some(&mut next_level), deepest, max_states)? {
                        return Ok(true);
                    }
                }
            }
            level = next_level;
        }
        Ok(false)
    }

    /// Depth-first search from the current configuration, holding `value`. With `next_level`
    /// it only steps through completed operations and leaves every step through an unknown one
    /// there. Returns whether all completed operations were linearized, or the number of states
    /// once there are more than `max_states`; either way the configuration may be left changed.
    fn explore(
        &mut self,
        value: Option<i64>,
        cache: &mut Cache,
        mut next_level: Option<&mut Vec<Start>>,
        deepest: &mut Deepest,
        max_states: usize,
    ) -> Result<bool, usize> {
        let first = self.enter(value, next_level.as_deref_mut(), deepest);
        // One frame per search node: its candidates, how many were tried and the value there.
        let mut stack = vec![(first, 0, value)];
        // The operation that led to each frame except the first.
        let mut path: Vec<usize> = Vec::new();
        while let Some((candidates, tried, before)) = stack.last_mut() {
            let Some(&i) = candidates.get(*tried) else {
                stack.pop();
                if let Some(i) = path.pop() {
                    self.unlift(i);
                }
                continue;
            };
            *tried += 1;
            let Some(value) = self.ops[i].action.apply(*before) else {
                continue;
            };
            self.lift(i);
            if self.remaining == 0 {
                return Ok(true);
            }
            if !cache.visit(&self.completed_done, &self.unknown_done, value) {
                self.unlift(i);
                continue;
            }
            let states = cache.states + next_level.as_ref().map_or(0, |next| next.len());
            if states > max_states {
                return Err(states);
            }
            stack.push((
                self.enter(value, next_level.as_deref_mut(), deepest),
                0,
                value,
            ));
            path.push(i);
        }
        Ok(false)
    }

    /// Prepares a search node holding `value`: records it if it is the deepest so far and returns
    /// the candidates to try from it, leaving the steps through unknown operations in
    /// `next_level` if given.
    fn enter(
        &self,
        value: Option<i64>,
        next_level: Option<&mut Vec<Start>>,
        deepest: &mut Deepest,
    ) -> Vec<usize> {
        let (mut candidates, unknown) = self.candidates(value);
        let linearized = self.completed_ops.len() - self.remaining;
        if linearized > deepest.0 {
            *deepest = (linearized, value, candidates.clone());
        }
        let Some(next_level) = next_level else {
            candidates.extend(unknown);
            return candidates;
        };
        for i in unknown {
            let mut unknown_done = self.unknown_done.clone();
            flip(&mut unknown_done, self.ops[i].slot);
            let after = self.ops[i].action.apply(value).unwrap_or(value);
            next_level.push((self.completed_done.clone(), unknown_done, after));
        }
        candidates
    }
}

/// Formats a register value for reports.
fn show(value: Option<i64>) -> String {
    value.map_or_else(|| "absent".to_owned(), |v| v.to_string())
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Read => "read".to_owned(),
            Op::Write(v) => format!("write({v})"),
            Op::Cas { expect, new } => format!("cas({expect} -> {new})"),
        };
        let outcome = match self.outcome {
            Outcome::Read(seen) => show(seen),
            Outcome::WriteOk | Outcome::CasOk => "ok".to_owned(),
            Outcome::CasFailed => "failed".to_owned(),
            Outcome::Unknown => "unknown".to_owned(),
        };
        let returned = match (self.outcome, self.returned_ns) {
            (Outcome::Unknown, _) | (_, None) => "?".to_owned(),
            (_, Some(r)) => format!("{r}ns"),
        };
        let span = format!("[{}ns, {returned}]", self.invoked_ns);
        write!(f, "client {}: {op} = {outcome} {span}", self.client)
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key {:?} is not linearizable: of its {} operations ({} completed), at most {} \
             completed ones can be put in a valid order, one of which leaves the register at {}; \
             after it none of these can come next:",
            self.key,
            self.ops,
            self.completed,
            self.linearized,
            show(self.value)
        )?;
        self.next
            .iter()
            .try_for_each(|event| write!(f, "\n  {event}"))
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::NotLinearizable(violation) => violation.fmt(f),
            CheckError::Inconclusive { key, ops, states } => write!(
                f,
                "linearizability of key {key:?} ({ops} operations) is undecided: the search \
                 gave up after {states} states"
            ),
            CheckError::Malformed { index, reason } => write!(f, "event {index}: {reason}"),
        }
    }
}

impl std::error::Error for CheckError {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn event(client: u64, key: &str, op: Op, span: (u64, Option<u64>), outcome: Outcome) -> Event {
        let (key, (invoked_ns, returned_ns)) = (key.to_owned(), span);
        Event {
            client,
            key,
            op,
            invoked_ns,
            returned_ns,
            outcome,
        }
    }

    /// An operation on key "k" that completed with a known outcome.
    fn done(client: u64, (inv, ret): (u64, u64), op: Op, outcome: Outcome) -> Event {
        event(client, "k", op, (inv, Some(ret)), outcome)
    }

    fn read(client: u64, inv: u64, ret: u64, seen: Option<i64>) -> Event {
        done(client, (inv, ret), Op::Read, Outcome::Read(seen))
    }

    fn write(client: u64, inv: u64, ret: u64, v: i64) -> Event {
        done(client, (inv, ret), Op::Write(v), Outcome::WriteOk)
    }

    fn cas(client: u64, inv: u64, ret: u64, (expect, new): (i64, i64), ok: bool) -> Event {
        let outcome = [Outcome::CasFailed, Outcome::CasOk][usize::from(ok)];
        done(client, (inv, ret), Op::Cas { expect, new }, outcome)
    }

    fn unknown(client: u64, inv: u64, op: Op) -> Event {
        event(client, "k", op, (inv, None), Outcome::Unknown)
    }

    fn violation(events: &[Event]) -> Violation {
        match check(events) {
            Err(CheckError::NotLinearizable(v)) => v,
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn correct_sequential_histories_pass() {
        let history = [
            read(1, 0, 1, None),
            cas(1, 2, 3, (0, 1), false),
            write(2, 4, 5, 1),
            read(3, 6, 7, Some(1)),
            cas(1, 8, 9, (1, 2), true),
            cas(2, 10, 11, (1, 3), false),
            read(3, 12, 13, Some(2)),
        ];
        assert_eq!(check(&history), Ok(()));
        assert_eq!(check(&[]), Ok(()));
    }

    #[test]
    fn a_read_of_a_value_never_written_fails() {
        let v = violation(&[write(1, 0, 10, 1), read(2, 20, 30, Some(7))]);
        assert_eq!(
            (v.key.as_str(), v.ops, v.linearized, v.value),
            ("k", 2, 1, Some(1))
        );
        assert_eq!(v.next, [read(2, 20, 30, Some(7))]);
        let report = v.to_string();
        assert!(report.contains("at 1;") && report.ends_with("client 2: read = 7 [20ns, 30ns]"));
    }

    #[test]
    fn a_stale_read_after_a_completed_write_fails() {
        let history = [write(1, 0, 10, 1), write(1, 20, 30, 2)];
        violation(&[&history[..], &[read(2, 40, 50, Some(1))]].concat());
    }

    #[test]
    fn overlapping_writes_may_be_seen_in_either_order() {
        let writes = [write(1, 0, 100, 1), write(2, 10, 90, 2)];
        for (first, last) in [(1, 1), (2, 2), (2, 1)] {
            let reads = [read(3, 50, 60, Some(first)), read(3, 120, 130, Some(last))];
            let history = [writes.clone(), reads].concat();
            assert_eq!(check(&history), Ok(()), "{first} {last}");
        }
    }

    #[test]
    fn a_read_cannot_go_back_to_an_older_write_once_a_newer_one_was_seen() {
        let reads = [read(3, 110, 120, Some(2)), read(4, 130, 140, Some(1))];
        violation(&[[write(1, 0, 100, 1), write(2, 10, 90, 2)], reads.clone()].concat());
        violation(&[[write(1, 0, 10, 1), write(2, 20, 30, 2)], reads].concat());
    }

    #[test]
    fn two_concurrent_cas_with_the_same_expectation_cannot_both_succeed() {
        let (free, first) = (write(1, 0, 10, 0), cas(2, 20, 40, (0, 2), true));
        let v = violation(&[free.clone(), first.clone(), cas(3, 25, 35, (0, 3), true)]);
        assert_eq!(v.linearized, 2);
        assert_eq!(check(&[free, first, cas(3, 25, 35, (0, 3), false)]), Ok(()));
    }

    #[test]
    fn a_read_may_see_a_value_only_an_unknown_write_produced() {
        let history = [write(1, 0, 10, 1), unknown(2, 20, Op::Write(5))];
        let history = [&history[..], &[read(3, 30, 40, Some(5))]].concat();
        assert_eq!(check(&history), Ok(()));
        // Once seen, the unknown write has happened and the older value cannot come back.
        violation(&[history, vec![read(3, 50, 60, Some(1))]].concat());
    }

    #[test]
    fn an_unknown_cas_may_never_have_happened() {
        let history = [
            write(1, 0, 10, 1),
            unknown(2, 20, Op::Cas { expect: 1, new: 2 }),
            read(3, 30, 40, Some(1)),
            unknown(3, 45, Op::Read),
            read(3, 50, 60, Some(1)),
        ];
        assert_eq!(check(&history), Ok(()));
    }

    #[test]
    fn an_unknown_operation_cannot_take_effect_before_its_invocation() {
        let v = violation(&[read(1, 0, 10, Some(5)), unknown(2, 20, Op::Write(5))]);
        assert_eq!((v.ops, v.completed, v.linearized), (2, 1, 0));
    }

    #[test]
    fn keys_are_independent() {
        let mut other = read(2, 20, 30, None);
        other.key = "other".to_owned();
        assert_eq!(check(&[write(1, 0, 10, 1), other.clone()]), Ok(()));
        other.outcome = Outcome::Read(Some(1));
        assert_eq!(violation(&[write(1, 0, 10, 1), other]).key, "other");
    }

    #[test]
    fn malformed_events_are_rejected() {
        let backwards = read(1, 10, 5, None);
        let mismatched = done(1, (0, 1), Op::Read, Outcome::CasOk);
        let unfinished = event(1, "k", Op::Write(1), (0, None), Outcome::WriteOk);
        for bad in [backwards, mismatched, unfinished] {
            let r = check(&[write(1, 0, 1, 1), bad]);
            assert!(matches!(r, Err(CheckError::Malformed { index: 1, .. })));
        }
    }

    #[test]
    fn a_search_past_its_bound_is_reported_as_inconclusive() {
        // Twenty concurrent writes can be ordered in a million ways, none ending in 99.
        let mut history: Vec<Event> = (0..20).map(|c| write(c, 0, 100, c as i64)).collect();
        history.push(read(99, 200, 300, Some(99)));
        let r = check_with_limit(&history, 1000);
        assert!(matches!(
            r,
            Err(CheckError::Inconclusive { states: 1001, .. })
        ));
    }

    /// A small deterministic generator (SplitMix64) so the tests need no dependencies.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let z = (self.0 ^ (self.0 >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n
        }

        fn op(&mut self) -> Op {
            let (a, b) = (self.below(4) as i64, self.below(4) as i64);
            [Op::Read, Op::Write(a), Op::Cas { expect: a, new: b }][self.below(3) as usize]
        }
    }

    /// The definition read literally: try every order of the completed operations and of any
    /// choice of unknown ones, placing an operation only once all that returned before it started.
    fn brute_force(events: &[Event], placed: &mut [bool], value: Option<i64>) -> bool {
        let open = |a: usize, p: &[bool]| !p[a] && events[a].outcome != Outcome::Unknown;
        if !(0..events.len()).any(|a| open(a, placed)) {
            return true;
        }
        for (i, e) in events.iter().enumerate() {
            let before = |a: usize| events[a].returned_ns.is_some_and(|r| r < e.invoked_ns);
            if placed[i] || (0..events.len()).any(|a| open(a, placed) && before(a)) {
                continue;
            }
            let next = match (e.op, e.outcome) {
                (Op::Read, Outcome::Read(seen)) => (seen == value).then_some(value),
                (Op::Read, _) => Some(value),
                (Op::Write(v), _) => Some(Some(v)),
                (Op::Cas { expect, new }, o) => match (value == Some(expect), o) {
                    (true, Outcome::CasOk | Outcome::Unknown) => Some(Some(new)),
                    (false, Outcome::CasFailed | Outcome::Unknown) => Some(value),
                    _ => None,
                },
            };
            if let Some(next) = next {
                placed[i] = true;
                let found = brute_force(events, placed, next);
                placed[i] = false;
                if found {
                    return true;
                }
            }
        }
        false
    }

    #[test]
    fn small_random_histories_agree_with_brute_force() {
        let (mut rng, mut verdicts) = (Rng(7), [0; 2]);
        for _ in 0..3000 {
            let mut clock = [0u64; 3];
            let history: Vec<Event> = (0..1 + rng.below(7))
                .map(|_| {
                    let client = rng.below(3);
                    let invoked = clock[client as usize] + rng.below(3);
                    let returned = invoked + rng.below(4);
                    clock[client as usize] = returned + 1;
                    let op = rng.op();
                    // Unknown outcomes keep a return time here, which the checker must ignore.
                    let outcome = match (op, rng.below(8)) {
                        (_, 0) => Outcome::Unknown,
                        (Op::Read, n) => Outcome::Read(Some(n as i64 - 2).filter(|&v| v >= 0)),
                        (Op::Write(_), _) => Outcome::WriteOk,
                        (Op::Cas { .. }, n) => [Outcome::CasOk, Outcome::CasFailed][n as usize % 2],
                    };
                    done(client, (invoked, returned), op, outcome)
                })
                .collect();
            let expected = brute_force(&history, &mut vec![false; history.len()], None);
            // Also without the plain depth-first search, to cover the level-by-level one.
            for quick in [QUICK_STATES, 0] {
                let actual = match check_keys(&history, DEFAULT_MAX_STATES, quick) {
                    Ok(()) => true,
                    Err(CheckError::NotLinearizable(_)) => false,
                    Err(other) => panic!("{other}"),
                };
                assert_eq!(actual, expected, "{history:#?}");
            }
            verdicts[usize::from(expected)] += 1;
        }
        assert!(verdicts.iter().all(|&n| n > 300), "{verdicts:?}");
    }

    /// Runs a correct register: every operation takes effect at a point inside its window, in the
    /// order of those points. A few time out, having taken effect or not at random.
    fn simulate(seed: u64, clients: u64, ops: u64) -> Vec<Event> {
        let mut rng = Rng(seed);
        let mut clock = vec![0u64; clients as usize];
        let mut planned: Vec<(u64, Event)> = (0..ops)
            .map(|n| {
                let client = n % clients;
                let invoked = clock[client as usize] + rng.below(50);
                let point = invoked + 1 + rng.below(100);
                // One operation in twenty is slow, overlapping many others.
                let slow = rng.below(2000) * u64::from(rng.below(20) == 0);
                let returned = point + 1 + rng.below(100) + slow;
                clock[client as usize] = returned;
                let (key, op) = (["a", "b", "c"][rng.below(3) as usize], rng.op());
                let span = (invoked, Some(returned));
                (point, event(client, key, op, span, Outcome::Unknown))
            })
            .collect();
        planned.sort_by_key(|(point, _)| *point);
        let mut registers: HashMap<String, Option<i64>> = HashMap::new();
        for (_, e) in &mut planned {
            let value = registers.entry(e.key.clone()).or_default();
            let lost = rng.below(30) == 0;
            if lost {
                e.returned_ns = None;
                if rng.below(2) == 0 {
                    continue;
                }
            }
            let outcome = match e.op {
                Op::Read => Outcome::Read(*value),
                Op::Write(v) => {
                    *value = Some(v);
                    Outcome::WriteOk
                }
                Op::Cas { expect, new } if *value == Some(expect) => {
                    *value = Some(new);
                    Outcome::CasOk
                }
                Op::Cas { .. } => Outcome::CasFailed,
            };
            if !lost {
                e.outcome = outcome;
            }
        }
        planned.into_iter().map(|(_, e)| e).collect()
    }

    #[test]
    fn generated_linearizable_histories_pass_quickly() {
        for seed in 0..3 {
            let history = simulate(seed, 8, 2000);
            let unknowns = history.iter().filter(|e| e.outcome == Outcome::Unknown);
            assert!(unknowns.count() > 20);
            let start = Instant::now();
            assert_eq!(check(&history), Ok(()), "seed {seed}");
            let elapsed = start.elapsed();
            assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        }
    }

    #[test]
    fn generated_histories_with_a_corrupted_read_fail() {
        for seed in 0..3 {
            let history = simulate(seed, 8, 2000);
            // Reads invoked after a write to their key completed: they cannot find it absent.
            let wrote_before = |read: &Event| {
                history.iter().any(|w| {
                    w.key == read.key
                        && matches!(w.outcome, Outcome::WriteOk | Outcome::CasOk)
                        && w.returned_ns.is_some_and(|t| t < read.invoked_ns)
                })
            };
            let reads: Vec<usize> = (0..history.len())
                .filter(|&i| matches!(history[i].outcome, Outcome::Read(_)))
                .filter(|&i| wrote_before(&history[i]))
                .collect();
            for quarter in 1..4 {
                let target = reads[reads.len() * quarter / 4];
                for corrupt in [Some(1000), None] {
                    let mut bad = history.clone();
                    bad[target].outcome = Outcome::Read(corrupt);
                    let v = violation(&bad);
                    assert_eq!(v.key, history[target].key, "seed {seed}: {v}");
                }
            }
        }
    }
}
