//! Range-based set reconciliation: after a reconnect, two sites find which
//! documents differ at a cost in bytes and round trips proportional to the
//! number of differences, not to the number of documents.
//!
//! Each site summarizes its documents as an [`ItemSet`] of items
//! `(DocId, ItemHash)`, where the [`ItemHash`] ([`item_hash`]) hashes the
//! document's automerge heads. Items are ordered by document id in byte order,
//! and the protocol speaks about ranges of that key space. The sides exchange
//! [`RangeMessage`]s whose ranges cover the whole key space, each range
//! described by a [`Mode`]: a fingerprint of the sender's items in it, an
//! explicit item list, or nothing to say. A range whose fingerprints agree is
//! settled; one that disagrees is split into [`BRANCHING`] sub-ranges, or
//! listed item by item once a side holds at most [`ID_LIST_MAX`] items in it.
//! The design follows negentropy (range-based set reconciliation).
//!
//! Costs (postcard, both directions, ids like `tenant-3/orders/42`; see
//! `tests/reconcile.rs`). Two sets of 10,000 identical documents settle with
//! one message of 22 bytes. Ten changed documents among 10,000 take about
//! 6 KB in six messages, 100 among 100,000 about 74 KB in six. Each
//! disagreeing range costs up to [`BRANCHING`] fingerprints of about 24 bytes
//! per level, over about `log_BRANCHING(n / ID_LIST_MAX)` levels, and then a
//! list of about a dozen items of about 13 bytes each.
//!
//! A side that can guess which of its documents differ (those changed since
//! the peer last held everything) opens with them listed and the gaps
//! between them fingerprinted ([`ItemSet::initiate_hinted`]): when the guess
//! covers the differences, one round trip settles everything, at about 60
//! bytes per listed document (ten among 2,000: 821 bytes in two messages,
//! against about 4.4 KB in five). A wrong guess only costs bytes: the gaps
//! that differ are split as usual.
//!
//! The module is sans-IO and deterministic: [`ItemSet::respond`] takes a
//! message and returns the reply and what this side learned. The sides call it
//! in turn until one of them has nothing to send back. A peer's message never
//! makes it panic: malformed input is a [`ReconcileError`], and every limit
//! ([`RANGES_PER_MESSAGE_MAX`], [`ITEMS_PER_MESSAGE_MAX`], [`ID_LIST_MAX`]) is
//! checked on input and respected on output.
//!
//! Item lists carry only the first 8 bytes of each item hash
//! ([`ShortHash`]). Two different states of one document are taken for equal
//! only if those 8 bytes collide, which happens with probability 2^-64 per
//! compared pair: negligible next to everything else that can go wrong.
//! Fingerprints are 16 bytes of SHA-256, which makes an undetected difference
//! in a range as unlikely.
//!
//! ```
//! use archipelago::protocol::reconcile::{item_hash, Differences, ItemSet};
//! use archipelago::DocId;
//!
//! let item = |id: &str, head: u8| {
//!     let id: DocId = id.parse().expect("valid id");
//!     let hash = item_hash(&id, &[[head; 32]]);
//!     (id, hash)
//! };
//! let east = ItemSet::new([item("orders/1", 1), item("orders/2", 1), item("orders/3", 1)])?;
//! let west = ItemSet::new([item("orders/1", 1), item("orders/2", 2), item("orders/4", 1)])?;
//!
//! // East opens; the sides answer in turn until one has nothing to say.
//! let sides = [&east, &west];
//! let mut learned = [Differences::default(), Differences::default()];
//! let mut message = east.initiate();
//! let mut turn = 1;
//! loop {
//!     let (reply, found) = sides[turn].respond(&message)?;
//!     learned[turn].append(found);
//!     match reply {
//!         Some(reply) => message = reply,
//!         None => break,
//!     }
//!     turn = 1 - turn;
//! }
//!
//! let id = |s: &str| s.parse::<DocId>().expect("valid id");
//! assert_eq!(learned[0].differ, [id("orders/2")]);
//! assert_eq!(learned[0].only_mine, [id("orders/3")]);
//! assert_eq!(learned[0].only_theirs, [id("orders/4")]);
//! # Ok::<(), archipelago::protocol::reconcile::ReconcileError>(())
//! ```

use std::borrow::Cow;
use std::cmp::Ordering;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::id::{DocId, DOC_ID_BYTES_MAX};

/// Hash of one document's state, as computed by [`item_hash`]. Two sites hold
/// the same state of a document exactly when their item hashes agree.
pub type ItemHash = [u8; 32];

/// The first 8 bytes of an [`ItemHash`], as carried in item lists.
pub type ShortHash = [u8; 8];

/// Most sub-ranges a disagreeing range is split into. A side splits into
/// fewer when that still reaches short lists in as many rounds.
pub const BRANCHING: usize = 16;

/// A side holding at most this many items in a disagreeing range lists them
/// instead of splitting the range; also the longest list a message may carry
/// in one range.
pub const ID_LIST_MAX: usize = 32;

/// Splitting aims at about this many items per bucket at the last level: on
/// the wire a fingerprint range costs about 24 bytes and a listed item about
/// 13, and this balances the two (measured on ids like `tenant-3/orders/42`).
const LEAF_ITEMS_TARGET: usize = 12;

/// Most ranges one message may hold. A reply that would need more describes
/// the rest of the key space with one fingerprint and leaves it for later
/// rounds. With [`ITEMS_PER_MESSAGE_MAX`] this bounds an encoded message
/// under 5 MB even with 256-byte ids; typical messages are far smaller.
pub const RANGES_PER_MESSAGE_MAX: usize = 8192;

/// Most listed items one message may hold, over all its ranges.
pub const ITEMS_PER_MESSAGE_MAX: usize = 8192;

// A reply must always have room for the worst-case answer to one range plus
// the closing fingerprint, or it could make no progress.
const _: () = assert!(BRANCHING >= 2);
const _: () = assert!(RANGES_PER_MESSAGE_MAX >= BRANCHING + 2);
const _: () = assert!(ITEMS_PER_MESSAGE_MAX >= ID_LIST_MAX);

/// The item hash of a document: SHA-256 over the id's bytes, a zero byte, and
/// the 32 bytes of each head in sorted order, so the order in which the heads
/// are given does not matter.
pub fn item_hash(id: &DocId, heads: &[[u8; 32]]) -> ItemHash {
    let mut sorted = heads.to_vec();
    sorted.sort_unstable();
    let mut hasher = Sha256::new();
    hasher.update(id.as_str().as_bytes());
    hasher.update([0u8]);
    for head in &sorted {
        hasher.update(head);
    }
    hasher.finalize().into()
}

/// The truncated hash carried in item lists: the first 8 bytes.
pub fn short_hash(hash: &ItemHash) -> ShortHash {
    let mut short = [0u8; 8];
    short.copy_from_slice(&hash[..8]);
    short
}

/// Malformed input: a message that breaks the protocol's rules, or items
/// that cannot form a set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    /// The same document id was given twice when building an [`ItemSet`].
    #[error("document id {0} appears twice")]
    DuplicateId(DocId),
    /// A message has no ranges, so it does not cover the key space.
    #[error("message has no ranges")]
    NoRanges,
    /// A message has more ranges than [`RANGES_PER_MESSAGE_MAX`].
    #[error("message has {count} ranges, more than {max}")]
    TooManyRanges {
        /// Ranges in the message.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A message lists more items than [`ITEMS_PER_MESSAGE_MAX`].
    #[error("message lists {count} items, more than {max}")]
    TooManyItems {
        /// Items listed over all ranges.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// One range lists more items than [`ID_LIST_MAX`].
    #[error("range {index} lists {count} items, more than {max}")]
    ListTooLong {
        /// Position of the range in the message.
        index: usize,
        /// Items in the list.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A bound is empty, longer than a document id, or has characters no
    /// document id can have.
    #[error("range {index} has an invalid bound")]
    InvalidBound {
        /// Position of the range in the message.
        index: usize,
    },
    /// A bound is not greater than the one before it.
    #[error("range {index} ends at or before the previous range")]
    BoundNotIncreasing {
        /// Position of the range in the message.
        index: usize,
    },
    /// A range other than the last ends at infinity.
    #[error("range {index} ends at infinity but is not the last")]
    InfinityBeforeEnd {
        /// Position of the range in the message.
        index: usize,
    },
    /// The last range does not end at infinity, so the message does not cover
    /// the key space.
    #[error("the last range does not end at infinity")]
    LastBoundFinite,
    /// Listed ids are unsorted or repeated.
    #[error("range {index} lists ids that are unsorted or repeated")]
    ListNotIncreasing {
        /// Position of the range in the message.
        index: usize,
    },
    /// A listed id lies outside its range.
    #[error("range {index} lists an id outside the range")]
    ListOutOfRange {
        /// Position of the range in the message.
        index: usize,
    },
    /// A listed id could not be decoded into a valid document id.
    #[error("range {index} lists an invalid document id")]
    InvalidItem {
        /// Position of the range in the message.
        index: usize,
    },
}

/// The exclusive upper end of a range. Ranges are half-open: a range holds
/// the ids at or after the previous range's bound (the first range starts at
/// the empty string) and before its own bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// The range holds ids that sort before this string in byte order. The
    /// sender picks the shortest prefix of the next id that still sorts after
    /// the previous id, to keep messages small; it is never empty.
    Prefix(String),
    /// The range extends to the end of the key space; only the last range of a
    /// message ends here.
    Infinity,
}

/// What the sender says about its items in one range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Nothing to say: the range is settled as far as the sender knows.
    Skip,
    /// A summary of the sender's items in the range.
    Fingerprint {
        /// The first 16 bytes of SHA-256 over the sum of the item hashes
        /// (little-endian 256-bit integers, modulo 2^256) followed by the
        /// count as a little-endian `u64`.
        fingerprint: [u8; 16],
        /// How many items the sender has in the range.
        count: u64,
    },
    /// Every item the sender has in the range, sorted by id. The receiver
    /// works out all differences in the range and answers with
    /// [`Mode::ItemsFinal`] when the sender could not work them out itself.
    Items(Vec<(DocId, ShortHash)>),
    /// The answer to [`Mode::Items`]: the sender's items in the range that
    /// were missing from the list or listed with another hash, sorted by id.
    /// The receiver records them and answers nothing, so lists never bounce.
    ItemsFinal(Vec<(DocId, ShortHash)>),
}

impl Mode {
    fn list(&self) -> Option<&[(DocId, ShortHash)]> {
        match self {
            Mode::Items(list) | Mode::ItemsFinal(list) => Some(list),
            Mode::Skip | Mode::Fingerprint { .. } => None,
        }
    }
}

/// One range of a [`RangeMessage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// Where the range ends (exclusive); it starts where the previous ends.
    pub upper: Bound,
    /// What the sender says about it.
    pub mode: Mode,
}

/// One reconciliation message: ranges in increasing order that together cover
/// the whole key space, the last ending at [`Bound::Infinity`].
///
/// On the wire (serde, meant for postcard) each bound and listed id is
/// front-coded against the string before it: the number of leading bytes it
/// shares, then the rest. Decoding rebuilds the full strings and refuses
/// anything longer than a document id or over the message limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeMessage {
    /// The ranges, in key order.
    pub ranges: Vec<Range>,
}

/// What one side learned from one message. Across the whole exchange, each
/// difference is reported by at least one side: an id held by one side only
/// is `only_mine` at the side that has it or `only_theirs` at the side that
/// lacks it, and an id held at different states is `differ` on at least one
/// side. Identical documents are never reported.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Differences {
    /// Both sides have the document, at different states.
    pub differ: Vec<DocId>,
    /// Only this side has the document.
    pub only_mine: Vec<DocId>,
    /// Only the other side has the document.
    pub only_theirs: Vec<DocId>,
    /// Of the above, those this side's reply lists for the peer (as
    /// [`Mode::ItemsFinal`]): the peer learns from that list that they
    /// differ, and with which state here.
    pub told: Vec<DocId>,
    /// Of the above, those the peer listed for this side (its
    /// [`Mode::ItemsFinal`]), with the short hash of its state: the peer
    /// knows they differ too.
    pub listed_by_peer: Vec<(DocId, ShortHash)>,
}

impl Differences {
    /// Whether nothing was learned.
    pub fn is_empty(&self) -> bool {
        self.differ.is_empty() && self.only_mine.is_empty() && self.only_theirs.is_empty()
    }

    /// Adds what `other` holds to this, for accumulating over rounds. Does not
    /// remove duplicates.
    pub fn append(&mut self, mut other: Differences) {
        self.differ.append(&mut other.differ);
        self.only_mine.append(&mut other.only_mine);
        self.only_theirs.append(&mut other.only_theirs);
        self.told.append(&mut other.told);
        self.listed_by_peer.append(&mut other.listed_by_peer);
    }
}

/// A 256-bit sum of item hashes, as little-endian 64-bit limbs.
type Sum = [u64; 4];

fn limbs(hash: &ItemHash) -> Sum {
    let mut sum = [0u64; 4];
    for (limb, bytes) in sum.iter_mut().zip(hash.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(bytes);
        *limb = u64::from_le_bytes(word);
    }
    sum
}

fn add(a: Sum, b: Sum) -> Sum {
    let mut out = [0u64; 4];
    let mut carry = false;
    for i in 0..4 {
        let (partial, carry_a) = a[i].overflowing_add(b[i]);
        let (total, carry_b) = partial.overflowing_add(u64::from(carry));
        out[i] = total;
        carry = carry_a || carry_b;
    }
    out
}

fn subtract(a: Sum, b: Sum) -> Sum {
    let mut out = [0u64; 4];
    let mut borrow = false;
    for i in 0..4 {
        let (partial, borrow_a) = a[i].overflowing_sub(b[i]);
        let (total, borrow_b) = partial.overflowing_sub(u64::from(borrow));
        out[i] = total;
        borrow = borrow_a || borrow_b;
    }
    out
}

fn fingerprint_of(sum: Sum, count: u64) -> [u8; 16] {
    let mut hasher = Sha256::new();
    for limb in sum {
        hasher.update(limb.to_le_bytes());
    }
    hasher.update(count.to_le_bytes());
    let digest = hasher.finalize();
    let mut fingerprint = [0u8; 16];
    fingerprint.copy_from_slice(&digest[..16]);
    fingerprint
}

/// The shortest prefix `p` of `next` with `previous < p <= next`, given
/// `previous < next`.
fn separator(previous: &str, next: &str) -> String {
    let shared = previous
        .bytes()
        .zip(next.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    // Ids are ASCII, so every byte index is a character boundary.
    next[..(shared + 1).min(next.len())].to_owned()
}

/// Protocol parameters; the public constants, or smaller ones in tests that
/// exercise the limits.
#[derive(Debug, Clone, Copy)]
struct Limits {
    branching: usize,
    list_max: usize,
    ranges_max: usize,
    items_max: usize,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        branching: BRANCHING,
        list_max: ID_LIST_MAX,
        ranges_max: RANGES_PER_MESSAGE_MAX,
        items_max: ITEMS_PER_MESSAGE_MAX,
    };
}

/// A sorted snapshot of one side's items, ready to answer messages.
#[derive(Debug, Clone)]
pub struct ItemSet {
    /// Sorted by id; ids are unique.
    items: Vec<(DocId, ItemHash)>,
    /// `sums[i]` is the sum of the first `i` item hashes, so the sum over any
    /// range is one subtraction; `sums.len() == items.len() + 1`.
    sums: Vec<Sum>,
}

impl Default for ItemSet {
    fn default() -> ItemSet {
        ItemSet {
            items: Vec::new(),
            sums: vec![[0; 4]],
        }
    }
}

impl ItemSet {
    /// Builds a set from items in any order; refuses a repeated id.
    pub fn new(
        items: impl IntoIterator<Item = (DocId, ItemHash)>,
    ) -> Result<ItemSet, ReconcileError> {
        let mut items: Vec<(DocId, ItemHash)> = items.into_iter().collect();
        items.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if let Some(pair) = items.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(ReconcileError::DuplicateId(pair[0].0.clone()));
        }
        let mut sums = Vec::with_capacity(items.len() + 1);
        let mut sum = [0u64; 4];
        sums.push(sum);
        for (_, hash) in &items {
            sum = add(sum, limbs(hash));
            sums.push(sum);
        }
        Ok(ItemSet { items, sums })
    }

    /// How many items the set holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the set holds no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The item hash of a document, if the set holds it.
    pub fn get(&self, id: &DocId) -> Option<&ItemHash> {
        self.items
            .binary_search_by(|(other, _)| other.cmp(id))
            .ok()
            .map(|index| &self.items[index].1)
    }

    /// The items in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&DocId, &ItemHash)> + '_ {
        self.items.iter().map(|(id, hash)| (id, hash))
    }

    /// The first message of an exchange: one range over the whole key space,
    /// a fingerprint of everything (about 20 bytes on the wire whatever the
    /// size of the set), or an empty list when the set is empty.
    pub fn initiate(&self) -> RangeMessage {
        RangeMessage {
            ranges: vec![Range {
                upper: Bound::Infinity,
                mode: self.describe(0, self.items.len()),
            }],
        }
    }

    /// The first message of an exchange when this side has a guess of
    /// which of its documents differ (`hints`, in any order; ids it does not
    /// hold are ignored): each hinted item is listed in a range of its own
    /// and the gaps between them are fingerprinted. When the guess covers
    /// every difference the peer settles all gaps at once and the exchange
    /// ends after one round trip, at about 60 bytes per hinted document. A
    /// gap that differs is split further as usual, so a wrong guess costs
    /// bytes, never a missed difference. Too many hints for one message
    /// fall back to [`ItemSet::initiate`].
    pub fn initiate_hinted(&self, hints: &[DocId]) -> RangeMessage {
        self.initiate_hinted_with(hints, &Limits::DEFAULT)
    }

    fn initiate_hinted_with(&self, hints: &[DocId], limits: &Limits) -> RangeMessage {
        let mut positions: Vec<usize> = hints
            .iter()
            .filter_map(|id| self.items.binary_search_by(|(other, _)| other.cmp(id)).ok())
            .collect();
        positions.sort_unstable();
        positions.dedup();
        // Each hint costs at most two ranges (its list and the gap before)
        // and one listed item; the last gap needs one more range.
        if positions.is_empty()
            || 2 * positions.len() + 1 > limits.ranges_max
            || positions.len() > limits.items_max
        {
            return self.initiate();
        }
        // The bound that ends a range just before item `i`.
        let before = |i: usize| match self.items.get(i) {
            None => Bound::Infinity,
            Some((next, _)) => {
                Bound::Prefix(separator(self.items[i - 1].0.as_str(), next.as_str()))
            }
        };
        let mut ranges = Vec::with_capacity(2 * positions.len() + 1);
        let (mut start, mut k) = (0, 0);
        while k < positions.len() {
            // A run of adjacent hinted items, as long as one list may be.
            let first = positions[k];
            let mut end = first + 1;
            k += 1;
            while k < positions.len() && positions[k] == end && end - first < limits.list_max {
                end += 1;
                k += 1;
            }
            if first > start {
                ranges.push(Range {
                    upper: before(first),
                    mode: self.describe(start, first),
                });
            }
            ranges.push(Range {
                upper: before(end),
                mode: Mode::Items(self.list(first, end)),
            });
            start = end;
        }
        if start < self.items.len() {
            ranges.push(Range {
                upper: Bound::Infinity,
                mode: self.describe(start, self.items.len()),
            });
        }
        RangeMessage { ranges }
    }

    /// Answers a peer's message: the reply, or `None` when this side has
    /// nothing to send back and the exchange is over, and the differences this
    /// side can name from the message.
    ///
    /// Costs `O(ranges × log n)` plus the items listed and reported, and
    /// never more than `O(n log n)`. A malformed message is refused whole,
    /// before anything is reported.
    pub fn respond(
        &self,
        message: &RangeMessage,
    ) -> Result<(Option<RangeMessage>, Differences), ReconcileError> {
        self.respond_with(message, &Limits::DEFAULT)
    }

    fn respond_with(
        &self,
        message: &RangeMessage,
        limits: &Limits,
    ) -> Result<(Option<RangeMessage>, Differences), ReconcileError> {
        validate(message, limits)?;
        let mut reply = Reply::new(limits);
        let mut differences = Differences::default();
        let mut start = 0;
        for range in &message.ranges {
            if !reply.has_room_for(&range.mode) {
                // Leave the rest of the key space for later rounds: one
                // summary of it keeps the reply within the limits while the
                // ranges before it make progress.
                reply.push(Bound::Infinity, self.describe(start, self.items.len()));
                break;
            }
            let end = self.position_from(start, &range.upper);
            match &range.mode {
                Mode::Skip => reply.push(range.upper.clone(), Mode::Skip),
                Mode::Fingerprint { fingerprint, count } => self.answer_fingerprint(
                    start,
                    end,
                    (*fingerprint, *count),
                    &range.upper,
                    &mut reply,
                    &mut differences,
                ),
                Mode::Items(list) => {
                    let mode =
                        answer_items(&self.items[start..end], list, &mut differences, limits);
                    reply.push(range.upper.clone(), mode);
                }
                Mode::ItemsFinal(list) => {
                    absorb_final(&self.items[start..end], list, &mut differences);
                    reply.push(range.upper.clone(), Mode::Skip);
                }
            }
            start = end;
        }
        Ok((reply.finish(), differences))
    }

    /// Index of the first item at or after `start` whose id is not below
    /// `bound`.
    fn position_from(&self, start: usize, bound: &Bound) -> usize {
        match bound {
            Bound::Infinity => self.items.len(),
            Bound::Prefix(prefix) => {
                let rest = self.items.get(start..).unwrap_or_default();
                start + rest.partition_point(|(id, _)| id.as_str() < prefix.as_str())
            }
        }
    }

    fn fingerprint(&self, start: usize, end: usize) -> [u8; 16] {
        let sum = subtract(self.sums[end], self.sums[start]);
        fingerprint_of(sum, (end - start) as u64)
    }

    /// A summary of the items at `start..end`: an empty list when there are
    /// none (shorter than a fingerprint, and just as final), else a
    /// fingerprint.
    fn describe(&self, start: usize, end: usize) -> Mode {
        if start == end {
            Mode::Items(Vec::new())
        } else {
            Mode::Fingerprint {
                fingerprint: self.fingerprint(start, end),
                count: (end - start) as u64,
            }
        }
    }

    fn list(&self, start: usize, end: usize) -> Vec<(DocId, ShortHash)> {
        self.items[start..end]
            .iter()
            .map(|(id, hash)| (id.clone(), short_hash(hash)))
            .collect()
    }

    fn answer_fingerprint(
        &self,
        start: usize,
        end: usize,
        (fingerprint, count): ([u8; 16], u64),
        upper: &Bound,
        reply: &mut Reply<'_>,
        differences: &mut Differences,
    ) {
        let mine = end - start;
        let mode = if mine as u64 == count && self.fingerprint(start, end) == fingerprint {
            Mode::Skip
        } else if mine == 0 {
            if count == 0 {
                Mode::Skip
            } else {
                // The peer learns from an empty list that everything it has
                // here is missing on this side.
                Mode::Items(Vec::new())
            }
        } else if count == 0 {
            // The peer has nothing here: everything of ours is missing there.
            differences
                .only_mine
                .extend(self.items[start..end].iter().map(|(id, _)| id.clone()));
            if mine <= reply.limits.list_max {
                let list = self.list(start, end);
                differences
                    .told
                    .extend(list.iter().map(|(id, _)| id.clone()));
                Mode::ItemsFinal(list)
            } else {
                Mode::Skip
            }
        } else if mine <= reply.limits.list_max {
            Mode::Items(self.list(start, end))
        } else {
            self.split(start, end, upper, reply);
            return;
        };
        reply.push(upper.clone(), mode);
    }

    /// Splits the items at `start..end` (more than the list limit) into
    /// equal buckets and describes each; the last bucket ends at `upper`.
    fn split(&self, start: usize, end: usize, upper: &Bound, reply: &mut Reply<'_>) {
        let count = end - start;
        let buckets = bucket_count(count, reply.limits);
        let mut bucket_start = start;
        for bucket in 1..=buckets {
            let bucket_end = start + count * bucket / buckets;
            let bound = if bucket == buckets {
                upper.clone()
            } else {
                Bound::Prefix(separator(
                    self.items[bucket_end - 1].0.as_str(),
                    self.items[bucket_end].0.as_str(),
                ))
            };
            reply.push(bound, self.describe(bucket_start, bucket_end));
            bucket_start = bucket_end;
        }
    }
}

/// How many buckets to split a range of `count` items into: as few as reach
/// buckets of about [`LEAF_ITEMS_TARGET`] items in as many levels as full
/// branching needs to reach lists of [`ID_LIST_MAX`], so fewer buckets cost no
/// extra round trip.
fn bucket_count(count: usize, limits: &Limits) -> usize {
    let mut levels = 0u32;
    let mut size = count;
    while size > limits.list_max {
        size = size.div_ceil(limits.branching);
        levels += 1;
    }
    let leaves = count.div_ceil(LEAF_ITEMS_TARGET.min(limits.list_max));
    let mut buckets = 2;
    while buckets < limits.branching && buckets.saturating_pow(levels) < leaves {
        buckets += 1;
    }
    buckets.min(count)
}

/// Compares the peer's full list of a range with ours, records every
/// difference, and returns the answer: the items the peer could not learn
/// otherwise, or nothing.
fn answer_items(
    mine: &[(DocId, ItemHash)],
    theirs: &[(DocId, ShortHash)],
    differences: &mut Differences,
    limits: &Limits,
) -> Mode {
    let mut delta = Vec::new();
    let mut delta_overflows = false;
    let mut keep = |id: &DocId, hash: &ItemHash| {
        if delta.len() < limits.list_max {
            delta.push((id.clone(), short_hash(hash)));
        } else {
            delta_overflows = true;
        }
    };
    let (mut m, mut t) = (0, 0);
    loop {
        let order = match (mine.get(m), theirs.get(t)) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((my_id, _)), Some((their_id, _))) => my_id.cmp(their_id),
        };
        match order {
            Ordering::Less => {
                let (id, hash) = &mine[m];
                differences.only_mine.push(id.clone());
                keep(id, hash);
                m += 1;
            }
            Ordering::Greater => {
                differences.only_theirs.push(theirs[t].0.clone());
                t += 1;
            }
            Ordering::Equal => {
                let (id, hash) = &mine[m];
                if short_hash(hash) != theirs[t].1 {
                    differences.differ.push(id.clone());
                    keep(id, hash);
                }
                m += 1;
                t += 1;
            }
        }
    }
    if delta.is_empty() || delta_overflows {
        // Either the range is equal, or too much differs to list: this side
        // has recorded every difference in the range, which is enough.
        Mode::Skip
    } else {
        differences
            .told
            .extend(delta.iter().map(|(id, _)| id.clone()));
        Mode::ItemsFinal(delta)
    }
}

/// Records the differences the peer named in its answer to our list.
fn absorb_final(
    mine: &[(DocId, ItemHash)],
    theirs: &[(DocId, ShortHash)],
    differences: &mut Differences,
) {
    for (id, their_hash) in theirs {
        match mine.binary_search_by(|(other, _)| other.cmp(id)) {
            Ok(index) => {
                if short_hash(&mine[index].1) != *their_hash {
                    differences.differ.push(id.clone());
                    differences.listed_by_peer.push((id.clone(), *their_hash));
                }
            }
            Err(_) => {
                differences.only_theirs.push(id.clone());
                differences.listed_by_peer.push((id.clone(), *their_hash));
            }
        }
    }
}

/// A reply under construction: merges adjacent skips and keeps count of what
/// the limits allow.
struct Reply<'l> {
    limits: &'l Limits,
    ranges: Vec<Range>,
    items: usize,
}

impl<'l> Reply<'l> {
    fn new(limits: &'l Limits) -> Reply<'l> {
        Reply {
            limits,
            ranges: Vec::new(),
            items: 0,
        }
    }

    /// Whether the worst-case answer to a range in `mode`, plus one closing
    /// range, still fits.
    fn has_room_for(&self, mode: &Mode) -> bool {
        let (ranges, items) = match mode {
            Mode::Fingerprint { .. } => (self.limits.branching, self.limits.list_max),
            Mode::Items(_) => (1, self.limits.list_max),
            Mode::Skip | Mode::ItemsFinal(_) => (1, 0),
        };
        self.ranges.len() + ranges < self.limits.ranges_max
            && self.items + items <= self.limits.items_max
    }

    fn push(&mut self, upper: Bound, mode: Mode) {
        if mode == Mode::Skip {
            if let Some(last) = self.ranges.last_mut() {
                if last.mode == Mode::Skip {
                    last.upper = upper;
                    return;
                }
            }
        }
        self.items += mode.list().map_or(0, <[_]>::len);
        self.ranges.push(Range { upper, mode });
    }

    fn finish(self) -> Option<RangeMessage> {
        if self.ranges.iter().all(|range| range.mode == Mode::Skip) {
            None
        } else {
            Some(RangeMessage {
                ranges: self.ranges,
            })
        }
    }
}

fn bound_is_valid(bound: &str) -> bool {
    // A bound is a non-empty prefix of a document id, so it is one itself.
    DocId::new(bound).is_ok()
}

/// Checks everything about a message before any of it is acted on.
fn validate(message: &RangeMessage, limits: &Limits) -> Result<(), ReconcileError> {
    let count = message.ranges.len();
    if count == 0 {
        return Err(ReconcileError::NoRanges);
    }
    if count > limits.ranges_max {
        return Err(ReconcileError::TooManyRanges {
            count,
            max: limits.ranges_max,
        });
    }
    let items = message
        .ranges
        .iter()
        .map(|range| range.mode.list().map_or(0, <[_]>::len))
        .fold(0usize, usize::saturating_add);
    if items > limits.items_max {
        return Err(ReconcileError::TooManyItems {
            count: items,
            max: limits.items_max,
        });
    }
    let mut lower = "";
    for (index, range) in message.ranges.iter().enumerate() {
        let upper = match &range.upper {
            Bound::Infinity if index + 1 < count => {
                return Err(ReconcileError::InfinityBeforeEnd { index })
            }
            Bound::Infinity => None,
            Bound::Prefix(_) if index + 1 == count => return Err(ReconcileError::LastBoundFinite),
            Bound::Prefix(prefix) => {
                if !bound_is_valid(prefix) {
                    return Err(ReconcileError::InvalidBound { index });
                }
                if prefix.as_str() <= lower {
                    return Err(ReconcileError::BoundNotIncreasing { index });
                }
                Some(prefix.as_str())
            }
        };
        if let Some(list) = range.mode.list() {
            if list.len() > limits.list_max {
                return Err(ReconcileError::ListTooLong {
                    index,
                    count: list.len(),
                    max: limits.list_max,
                });
            }
            if list.windows(2).any(|pair| pair[0].0 >= pair[1].0) {
                return Err(ReconcileError::ListNotIncreasing { index });
            }
            let below_lower = list.first().is_some_and(|(id, _)| id.as_str() < lower);
            let above_upper = match (list.last(), upper) {
                (Some((id, _)), Some(upper)) => id.as_str() >= upper,
                _ => false,
            };
            if below_lower || above_upper {
                return Err(ReconcileError::ListOutOfRange { index });
            }
        }
        if let Some(upper) = upper {
            lower = upper;
        }
    }
    Ok(())
}

// Wire form. Bounds and listed ids are front-coded: `shared` leading bytes of
// the previous string (the previous bound, or for a list the previous id,
// starting from the range's lower bound), then `suffix`. Ids of one namespace
// share long prefixes, so this roughly halves the size of a message.

#[derive(Serialize, Deserialize)]
struct WireRange<'a> {
    /// 0 for [`Bound::Infinity`] (with an empty suffix), else 1 + the bytes
    /// shared with the previous bound: one byte instead of an enum tag plus a
    /// length.
    upper_shared: u16,
    #[serde(borrow)]
    upper_suffix: Cow<'a, str>,
    #[serde(borrow)]
    mode: WireMode<'a>,
}

#[derive(Serialize, Deserialize)]
enum WireMode<'a> {
    Skip,
    Fingerprint { fingerprint: [u8; 16], count: u64 },
    Items(#[serde(borrow)] Vec<WireItem<'a>>),
    ItemsFinal(#[serde(borrow)] Vec<WireItem<'a>>),
}

#[derive(Serialize, Deserialize)]
struct WireItem<'a> {
    shared: u16,
    #[serde(borrow)]
    suffix: Cow<'a, str>,
    hash: ShortHash,
}

/// Splits `text` into the number of leading bytes it shares with `reference`
/// and the rest.
fn front_code<'a>(reference: &str, text: &'a str) -> (u16, &'a str) {
    let mut shared = reference
        .bytes()
        .zip(text.bytes())
        .take_while(|(a, b)| a == b)
        .count()
        .min(usize::from(u16::MAX - 1));
    while !text.is_char_boundary(shared) {
        shared -= 1;
    }
    let shared_bytes = u16::try_from(shared).unwrap_or(u16::MAX - 1);
    (shared_bytes, &text[shared..])
}

/// Rebuilds a front-coded string; `None` if it does not fit or is longer than
/// a document id.
fn front_decode(reference: &str, shared: u16, suffix: &str) -> Option<String> {
    let shared = usize::from(shared);
    let prefix = reference.as_bytes().get(..shared)?;
    if shared + suffix.len() > DOC_ID_BYTES_MAX {
        return None;
    }
    let mut bytes = Vec::with_capacity(shared + suffix.len());
    bytes.extend_from_slice(prefix);
    bytes.extend_from_slice(suffix.as_bytes());
    String::from_utf8(bytes).ok()
}

fn encode_list<'a>(lower: &str, list: &'a [(DocId, ShortHash)]) -> Vec<WireItem<'a>> {
    let mut previous = lower;
    let mut out = Vec::with_capacity(list.len());
    for (id, hash) in list {
        let (shared, suffix) = front_code(previous, id.as_str());
        out.push(WireItem {
            shared,
            suffix: Cow::Borrowed(suffix),
            hash: *hash,
        });
        previous = id.as_str();
    }
    out
}

fn decode_list(
    lower: &str,
    list: &[WireItem<'_>],
    index: usize,
) -> Result<Vec<(DocId, ShortHash)>, ReconcileError> {
    let mut out: Vec<(DocId, ShortHash)> = Vec::with_capacity(list.len());
    for item in list {
        let previous = out.last().map_or(lower, |(id, _)| id.as_str());
        let id = front_decode(previous, item.shared, &item.suffix)
            .and_then(|text| DocId::new(&text).ok())
            .ok_or(ReconcileError::InvalidItem { index })?;
        out.push((id, item.hash));
    }
    Ok(out)
}

fn decode(wire: Vec<WireRange<'_>>) -> Result<RangeMessage, ReconcileError> {
    let limits = Limits::DEFAULT;
    if wire.len() > limits.ranges_max {
        return Err(ReconcileError::TooManyRanges {
            count: wire.len(),
            max: limits.ranges_max,
        });
    }
    let mut items = 0usize;
    for (index, range) in wire.iter().enumerate() {
        if let WireMode::Items(list) | WireMode::ItemsFinal(list) = &range.mode {
            if list.len() > limits.list_max {
                return Err(ReconcileError::ListTooLong {
                    index,
                    count: list.len(),
                    max: limits.list_max,
                });
            }
            items += list.len();
        }
    }
    if items > limits.items_max {
        return Err(ReconcileError::TooManyItems {
            count: items,
            max: limits.items_max,
        });
    }
    let mut ranges = Vec::with_capacity(wire.len());
    let mut lower = String::new();
    for (index, range) in wire.into_iter().enumerate() {
        let mode = match range.mode {
            WireMode::Skip => Mode::Skip,
            WireMode::Fingerprint { fingerprint, count } => {
                Mode::Fingerprint { fingerprint, count }
            }
            WireMode::Items(list) => Mode::Items(decode_list(&lower, &list, index)?),
            WireMode::ItemsFinal(list) => Mode::ItemsFinal(decode_list(&lower, &list, index)?),
        };
        let upper = match range.upper_shared.checked_sub(1) {
            None if range.upper_suffix.is_empty() => Bound::Infinity,
            None => return Err(ReconcileError::InvalidBound { index }),
            Some(shared) => {
                let bound = front_decode(&lower, shared, &range.upper_suffix)
                    .ok_or(ReconcileError::InvalidBound { index })?;
                lower.clone_from(&bound);
                Bound::Prefix(bound)
            }
        };
        ranges.push(Range { upper, mode });
    }
    Ok(RangeMessage { ranges })
}

impl Serialize for RangeMessage {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut wire = Vec::with_capacity(self.ranges.len());
        let mut lower = "";
        for range in &self.ranges {
            let mode = match &range.mode {
                Mode::Skip => WireMode::Skip,
                Mode::Fingerprint { fingerprint, count } => WireMode::Fingerprint {
                    fingerprint: *fingerprint,
                    count: *count,
                },
                Mode::Items(list) => WireMode::Items(encode_list(lower, list)),
                Mode::ItemsFinal(list) => WireMode::ItemsFinal(encode_list(lower, list)),
            };
            let (upper_shared, upper_suffix) = match &range.upper {
                Bound::Infinity => (0, ""),
                Bound::Prefix(prefix) => {
                    let (shared, suffix) = front_code(lower, prefix);
                    lower = prefix;
                    (shared + 1, suffix)
                }
            };
            wire.push(WireRange {
                upper_shared,
                upper_suffix: Cow::Borrowed(upper_suffix),
                mode,
            });
        }
        wire.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RangeMessage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RangeMessage, D::Error> {
        let wire = Vec::<WireRange<'de>>::deserialize(deserializer)?;
        decode(wire).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    fn id(text: &str) -> DocId {
        DocId::new(text).unwrap()
    }

    fn item(text: &str, version: u8) -> (DocId, ItemHash) {
        let id = id(text);
        let hash = item_hash(&id, &[[version; 32]]);
        (id, hash)
    }

    fn set(items: &[(&str, u8)]) -> ItemSet {
        ItemSet::new(items.iter().map(|(text, version)| item(text, *version))).unwrap()
    }

    /// What an exchange cost and what each side learned.
    #[derive(Debug, Default)]
    struct Exchange {
        learned: [Differences; 2],
        messages: usize,
        bytes: usize,
    }

    /// Runs an exchange, `sides[0]` opening, with every message going
    /// through postcard.
    fn exchange(sides: [&ItemSet; 2], limits: &Limits) -> Exchange {
        exchange_from(sides[0].initiate(), sides, limits)
    }

    /// [`exchange`] opened with `first` (from `sides[0]`).
    fn exchange_from(first: RangeMessage, sides: [&ItemSet; 2], limits: &Limits) -> Exchange {
        let mut outcome = Exchange::default();
        let mut message = first;
        let mut turn = 1;
        loop {
            let bytes = postcard::to_allocvec(&message).unwrap();
            outcome.messages += 1;
            outcome.bytes += bytes.len();
            let decoded: RangeMessage = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(decoded, message);
            let (reply, found) = sides[turn].respond_with(&decoded, limits).unwrap();
            let mut all: Vec<&DocId> = found
                .differ
                .iter()
                .chain(&found.only_mine)
                .chain(&found.only_theirs)
                .collect();
            let reported = all.len();
            all.sort();
            all.dedup();
            assert_eq!(all.len(), reported, "an id reported twice in one call");
            outcome.learned[turn].append(found);
            match reply {
                Some(reply) => message = reply,
                None => return outcome,
            }
            assert!(outcome.messages < 10_000, "exchange does not terminate");
            turn = 1 - turn;
        }
    }

    /// The true differences between `a` and `b`: (only in a, only in b,
    /// differ).
    fn truth(a: &ItemSet, b: &ItemSet) -> [BTreeSet<DocId>; 3] {
        let (mut only_a, mut only_b, mut differ) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for (id, hash) in a.iter() {
            match b.get(id) {
                None => {
                    only_a.insert(id.clone());
                }
                Some(other) if other != hash => {
                    differ.insert(id.clone());
                }
                Some(_) => {}
            }
        }
        for (id, _) in b.iter() {
            if a.get(id).is_none() {
                only_b.insert(id.clone());
            }
        }
        [only_a, only_b, differ]
    }

    /// Asserts the exchange's outcome covers exactly the true differences.
    fn assert_exact(a: &ItemSet, b: &ItemSet, outcome: &Exchange) {
        let [only_a, only_b, differ] = truth(a, b);
        let set = |ids: &[DocId]| ids.iter().cloned().collect::<BTreeSet<_>>();
        let [la, lb] = &outcome.learned;
        // No false positives, at either side.
        assert!(set(&la.only_mine).is_subset(&only_a));
        assert!(set(&la.only_theirs).is_subset(&only_b));
        assert!(set(&la.differ).is_subset(&differ));
        assert!(set(&lb.only_mine).is_subset(&only_b));
        assert!(set(&lb.only_theirs).is_subset(&only_a));
        assert!(set(&lb.differ).is_subset(&differ));
        // Full coverage by the union.
        let union = |x: &[DocId], y: &[DocId]| &set(x) | &set(y);
        assert_eq!(union(&la.only_mine, &lb.only_theirs), only_a);
        assert_eq!(union(&lb.only_mine, &la.only_theirs), only_b);
        assert_eq!(union(&la.differ, &lb.differ), differ);
    }

    fn round_bound(a: &ItemSet, b: &ItemSet) -> usize {
        let n = a.len().max(b.len()).max(2) as f64;
        let levels = (n.ln() / (BRANCHING as f64).ln()).ceil() as usize;
        2 + 2 * levels + 2
    }

    #[test]
    fn empty_against_empty_settles_at_once() {
        let empty = ItemSet::default();
        let outcome = exchange([&empty, &empty], &Limits::DEFAULT);
        assert_eq!(outcome.messages, 1);
        assert!(outcome.learned.iter().all(Differences::is_empty));
    }

    #[test]
    fn empty_against_full_names_everything() {
        let full = ItemSet::new((0..500).map(|k| item(&format!("doc/{k}"), 1))).unwrap();
        let empty = ItemSet::default();
        for sides in [[&full, &empty], [&empty, &full]] {
            let outcome = exchange(sides, &Limits::DEFAULT);
            assert_exact(sides[0], sides[1], &outcome);
            assert!(outcome.messages <= 2, "{outcome:?}");
        }
    }

    #[test]
    fn identical_sets_settle_in_one_message() {
        let items = (0..10_000).map(|k| item(&format!("tenant-{}/orders/{k}", k % 7), 3));
        let a = ItemSet::new(items).unwrap();
        let b = a.clone();
        let (reply, found) = b.respond(&a.initiate()).unwrap();
        assert_eq!(reply, None);
        assert!(found.is_empty());
        let bytes = postcard::to_allocvec(&a.initiate()).unwrap();
        assert!(bytes.len() <= 24, "{} bytes", bytes.len());
    }

    #[test]
    fn one_differing_hash_is_found() {
        let items = |changed: u8| {
            ItemSet::new((0..3000).map(|k| {
                let version = if k == 1234 { changed } else { 0 };
                item(&format!("inventory/sku-{k}"), version)
            }))
            .unwrap()
        };
        let (a, b) = (items(1), items(2));
        let outcome = exchange([&a, &b], &Limits::DEFAULT);
        assert_exact(&a, &b, &outcome);
        assert!(outcome.learned[0]
            .differ
            .contains(&id("inventory/sku-1234")));
        assert!(outcome.messages <= round_bound(&a, &b));
    }

    #[test]
    fn small_sets_list_items_and_both_sides_learn() {
        let a = set(&[("orders/1", 1), ("orders/2", 1), ("orders/3", 1)]);
        let b = set(&[("orders/1", 1), ("orders/2", 2), ("orders/4", 1)]);
        let outcome = exchange([&a, &b], &Limits::DEFAULT);
        assert_exact(&a, &b, &outcome);
        // Fingerprint, list, final answer.
        assert_eq!(outcome.messages, 3);
        let [la, lb] = &outcome.learned;
        assert_eq!(la.differ, [id("orders/2")]);
        assert_eq!(la.only_mine, [id("orders/3")]);
        assert_eq!(la.only_theirs, [id("orders/4")]);
        assert_eq!(lb.differ, [id("orders/2")]);
        assert_eq!(lb.only_theirs, [id("orders/3")]);
    }

    #[test]
    fn hints_that_cover_the_differences_settle_in_one_round_trip() {
        let names: Vec<String> = (0..2000)
            .map(|k| format!("tenant-{}/orders/{k}", k % 7))
            .collect();
        let b = set(&names.iter().map(|n| (n.as_str(), 0)).collect::<Vec<_>>());
        let changed: Vec<&String> = names.iter().step_by(200).collect();
        let a = set(&names
            .iter()
            .map(|n| (n.as_str(), u8::from(changed.contains(&n))))
            .collect::<Vec<_>>());
        let hints: Vec<DocId> = changed.iter().map(|n| id(n)).collect();
        let plain = exchange([&a, &b], &Limits::DEFAULT);
        let hinted = exchange_from(a.initiate_hinted(&hints), [&a, &b], &Limits::DEFAULT);
        assert_exact(&a, &b, &hinted);
        assert_eq!(hinted.messages, 2, "the hinted message and its answer");
        assert_eq!(hinted.learned[0].differ.len(), 10, "the opener learns too");
        assert!(
            hinted.bytes * 4 < plain.bytes,
            "{} bytes hinted, {} plain",
            hinted.bytes,
            plain.bytes
        );
        // No hints held by this side: the plain opening.
        assert_eq!(a.initiate_hinted(&[id("elsewhere/1")]), a.initiate());
    }

    #[test]
    fn separator_is_the_shortest_prefix_that_separates() {
        assert_eq!(separator("a", "b"), "b");
        assert_eq!(separator("a", "a/"), "a/");
        assert_eq!(separator("a/", "a/b"), "a/b");
        assert_eq!(separator("a/b", "a/b0"), "a/b0");
        assert_eq!(separator("a/b0", "a/b1"), "a/b1");
        assert_eq!(separator("a/b0zzz", "a/b1"), "a/b1");
        assert_eq!(
            separator("tenant-3/orders/999", "tenant-4/orders/1"),
            "tenant-4"
        );
        for (previous, next) in [("a", "a/"), ("abc", "abd0000"), ("x", "xxxxxxxx")] {
            let bound = separator(previous, next);
            assert!(previous < bound.as_str() && bound.as_str() <= next);
        }
    }

    #[test]
    fn ids_that_are_prefixes_of_each_other_reconcile() {
        let mut names: Vec<String> = vec!["a".into(), "a/".into(), "a/b".into(), "a/b0".into()];
        names.extend((1..=256).map(|length| "x".repeat(length)));
        names.extend((0..300).map(|k| format!("a/b0/{k}")));
        names.extend(["a~", "a.", "a-", "a_", "~", "0", "Z", "a/b0/"].map(String::from));
        let all: Vec<(&str, u8)> = names.iter().map(|name| (name.as_str(), 0)).collect();
        let full = set(&all);
        // Every third id missing from one side, every fifth changed.
        let partial: Vec<(&str, u8)> = all
            .iter()
            .enumerate()
            .filter(|(k, _)| k % 3 != 0)
            .map(|(k, (name, _))| (*name, u8::from(k % 5 == 0)))
            .collect();
        let partial = set(&partial);
        for sides in [[&full, &partial], [&partial, &full]] {
            let outcome = exchange(sides, &Limits::DEFAULT);
            assert_exact(sides[0], sides[1], &outcome);
            assert!(outcome.messages <= round_bound(sides[0], sides[1]));
        }
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let error = ItemSet::new([item("a", 1), item("b", 1), item("a", 2)]).unwrap_err();
        assert_eq!(error, ReconcileError::DuplicateId(id("a")));
    }

    #[test]
    fn item_hash_ignores_head_order() {
        let doc = id("catalog/1");
        let (x, y) = ([1u8; 32], [2u8; 32]);
        assert_eq!(item_hash(&doc, &[x, y]), item_hash(&doc, &[y, x]));
        assert_ne!(item_hash(&doc, &[x]), item_hash(&doc, &[y]));
        assert_ne!(item_hash(&doc, &[x]), item_hash(&id("catalog/2"), &[x]));
    }

    #[test]
    fn range_sums_wrap_modulo_two_to_the_256() {
        let max = [u64::MAX; 4];
        assert_eq!(add(max, [1, 0, 0, 0]), [0; 4]);
        assert_eq!(subtract([0; 4], [1, 0, 0, 0]), max);
        let a = [u64::MAX, 5, u64::MAX, 7];
        let b = [3, u64::MAX, 9, 1];
        assert_eq!(subtract(add(a, b), b), a);
    }

    #[test]
    fn fingerprint_of_a_range_matches_the_definition() {
        let s = set(&[("a", 1), ("b", 2), ("c", 3), ("d", 4)]);
        let sum = add(limbs(&s.items[1].1), limbs(&s.items[2].1));
        let mut hasher = Sha256::new();
        for limb in sum {
            hasher.update(limb.to_le_bytes());
        }
        hasher.update(2u64.to_le_bytes());
        assert_eq!(s.fingerprint(1, 3)[..], hasher.finalize()[..16]);
    }

    fn message(ranges: Vec<(Bound, Mode)>) -> RangeMessage {
        RangeMessage {
            ranges: ranges
                .into_iter()
                .map(|(upper, mode)| Range { upper, mode })
                .collect(),
        }
    }

    fn prefix(text: &str) -> Bound {
        Bound::Prefix(text.to_owned())
    }

    fn listed(names: &[&str]) -> Vec<(DocId, ShortHash)> {
        names.iter().map(|name| (id(name), [0; 8])).collect()
    }

    #[test]
    fn adversarial_messages_are_refused() {
        let s = ItemSet::new((0..100).map(|k| item(&format!("d/{k}"), 0))).unwrap();
        let fingerprint = |count| Mode::Fingerprint {
            fingerprint: [7; 16],
            count,
        };
        let cases: Vec<(RangeMessage, ReconcileError)> = vec![
            (message(vec![]), ReconcileError::NoRanges),
            (
                message(vec![
                    (prefix("b"), Mode::Skip),
                    (prefix("a"), Mode::Skip),
                    (Bound::Infinity, Mode::Skip),
                ]),
                ReconcileError::BoundNotIncreasing { index: 1 },
            ),
            (
                message(vec![
                    (prefix("b"), Mode::Skip),
                    (prefix("b"), Mode::Skip),
                    (Bound::Infinity, Mode::Skip),
                ]),
                ReconcileError::BoundNotIncreasing { index: 1 },
            ),
            (
                message(vec![
                    (prefix(""), Mode::Skip),
                    (Bound::Infinity, Mode::Skip),
                ]),
                ReconcileError::InvalidBound { index: 0 },
            ),
            (
                message(vec![
                    (prefix("a b"), Mode::Skip),
                    (Bound::Infinity, Mode::Skip),
                ]),
                ReconcileError::InvalidBound { index: 0 },
            ),
            (
                message(vec![
                    (prefix(&"a".repeat(257)), Mode::Skip),
                    (Bound::Infinity, Mode::Skip),
                ]),
                ReconcileError::InvalidBound { index: 0 },
            ),
            (
                message(vec![
                    (Bound::Infinity, Mode::Skip),
                    (Bound::Infinity, Mode::Skip),
                ]),
                ReconcileError::InfinityBeforeEnd { index: 0 },
            ),
            (
                message(vec![(prefix("m"), fingerprint(1))]),
                ReconcileError::LastBoundFinite,
            ),
            (
                message(vec![(Bound::Infinity, Mode::Items(listed(&["b", "a"])))]),
                ReconcileError::ListNotIncreasing { index: 0 },
            ),
            (
                message(vec![(
                    Bound::Infinity,
                    Mode::ItemsFinal(listed(&["a", "a"])),
                )]),
                ReconcileError::ListNotIncreasing { index: 0 },
            ),
            (
                message(vec![
                    (prefix("m"), Mode::Items(listed(&["a", "m"]))),
                    (Bound::Infinity, Mode::Skip),
                ]),
                ReconcileError::ListOutOfRange { index: 0 },
            ),
            (
                message(vec![
                    (prefix("m"), Mode::Skip),
                    (Bound::Infinity, Mode::Items(listed(&["a"]))),
                ]),
                ReconcileError::ListOutOfRange { index: 1 },
            ),
            (
                message(vec![(Bound::Infinity, Mode::Items(listed(&["a"; 33])))]),
                ReconcileError::ListTooLong {
                    index: 0,
                    count: 33,
                    max: ID_LIST_MAX,
                },
            ),
        ];
        for (message, expected) in cases {
            assert_eq!(s.respond(&message).unwrap_err(), expected, "{message:?}");
        }

        // 100,000 listed items in one range, and spread over many ranges.
        let many: Vec<(DocId, ShortHash)> = (0..100_000)
            .map(|k| (id(&format!("d/{k:06}")), [0; 8]))
            .collect();
        let one_list = message(vec![(Bound::Infinity, Mode::Items(many.clone()))]);
        assert!(matches!(
            s.respond(&one_list),
            Err(ReconcileError::TooManyItems { .. } | ReconcileError::ListTooLong { .. })
        ));
        let mut spread: Vec<(Bound, Mode)> = many
            .chunks(ID_LIST_MAX)
            .map(|chunk| {
                let last = chunk[chunk.len() - 1].0.as_str();
                (prefix(&format!("{last}0")), Mode::Items(chunk.to_vec()))
            })
            .collect();
        spread.truncate(RANGES_PER_MESSAGE_MAX - 1);
        spread.push((Bound::Infinity, Mode::Skip));
        assert!(matches!(
            s.respond(&message(spread)),
            Err(ReconcileError::TooManyItems { .. })
        ));

        // 100,000 ranges.
        let mut ranges: Vec<(Bound, Mode)> = (0..100_000)
            .map(|k| (prefix(&format!("r/{k:06}")), fingerprint(1)))
            .collect();
        ranges.push((Bound::Infinity, Mode::Skip));
        assert!(matches!(
            s.respond(&message(ranges)),
            Err(ReconcileError::TooManyRanges { .. })
        ));

        // Huge claimed counts are only numbers: answered, not allocated.
        for count in [u64::MAX, u64::MAX / 2, 1 << 40] {
            let huge = message(vec![
                (prefix("d/5"), fingerprint(count)),
                (Bound::Infinity, fingerprint(count)),
            ]);
            let (reply, _) = s.respond(&huge).unwrap();
            let reply = reply.unwrap();
            assert!(reply.ranges.len() <= 2 * BRANCHING);
        }
    }

    #[test]
    fn decoding_refuses_front_coding_that_does_not_fit() {
        let range = |upper_shared: u16, suffix: &'static str| WireRange {
            upper_shared,
            upper_suffix: Cow::Borrowed(suffix),
            mode: WireMode::Skip,
        };
        let decodes = |wire: &[WireRange<'_>]| {
            let bytes = postcard::to_allocvec(wire).unwrap();
            postcard::from_bytes::<RangeMessage>(&bytes)
        };
        assert!(decodes(&[range(1, "b"), range(0, "")]).is_ok());
        // Sharing more bytes than the previous bound has.
        assert!(decodes(&[range(1 + 3, "x"), range(0, "")]).is_err());
        // Infinity with a suffix.
        assert!(decodes(&[range(0, "x")]).is_err());
        // Bounds that grow past the longest id by sharing everything.
        let long: &'static str = "a".repeat(200).leak();
        let mut wire = vec![range(1, long)];
        wire.extend((0..10).map(|_| {
            range(
                1 + 200,
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            )
        }));
        wire.push(range(0, ""));
        assert!(decodes(&wire).is_err());
        // Front coding that splits a character.
        assert!(decodes(&[range(1, "é"), range(2, "x"), range(0, "")]).is_err());
        // Listed ids: invalid characters, and sharing past the reference.
        let listed = |shared: u16, suffix: &'static str| WireRange {
            upper_shared: 0,
            upper_suffix: Cow::Borrowed(""),
            mode: WireMode::Items(vec![WireItem {
                shared,
                suffix: Cow::Borrowed(suffix),
                hash: [0; 8],
            }]),
        };
        assert!(decodes(&[listed(0, "ok")]).is_ok());
        assert!(decodes(&[listed(0, "not ok")]).is_err());
        assert!(decodes(&[listed(1, "x")]).is_err());
    }

    #[test]
    fn tiny_limits_still_converge() {
        let limits = Limits {
            branching: 2,
            list_max: 2,
            ranges_max: 4,
            items_max: 2,
        };
        let a = ItemSet::new((0..300).map(|k| item(&format!("k/{k}"), 0))).unwrap();
        let b = ItemSet::new(
            (0..300)
                .filter(|k| k % 4 != 0)
                .map(|k| item(&format!("k/{k}"), u8::from(k % 3 == 0))),
        )
        .unwrap();
        for sides in [[&a, &b], [&b, &a]] {
            let outcome = exchange(sides, &limits);
            assert_exact(sides[0], sides[1], &outcome);
        }
    }

    /// Builds a document id from a number, in shapes that share long
    /// prefixes or are prefixes of one another.
    fn shaped_id(key: u32) -> String {
        match key % 5 {
            0 => format!("tenant-{}/orders/{}", key % 7, key / 5),
            1 => "x".repeat(1 + (key / 5 % 256) as usize),
            2 => format!("a/{}", "b/".repeat((key / 5 % 4) as usize)) + &(key / 20).to_string(),
            3 => format!("{:x}", key / 5),
            _ => format!("n.{}~{}", key / 5 % 3, key / 15),
        }
    }

    /// Two sets derived from one base: each item kept, dropped from either
    /// side or changed on one side, with differences at `rate` per thousand.
    fn derived(base: &[(u32, u16)], rate: u16) -> (ItemSet, ItemSet) {
        let unique: BTreeMap<String, u16> = base
            .iter()
            .map(|(key, fate)| (shaped_id(*key), *fate))
            .collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (name, fate) in unique {
            let (id, version) = (id(&name), (fate % 251) as u8);
            let hash = item_hash(&id, &[[version; 32]]);
            let changed = item_hash(&id, &[[version.wrapping_add(1); 32]]);
            if fate >= rate {
                a.push((id.clone(), hash));
                b.push((id, hash));
                continue;
            }
            match fate % 3 {
                0 => a.push((id, hash)),
                1 => b.push((id, hash)),
                _ => {
                    a.push((id.clone(), hash));
                    b.push((id, changed));
                }
            }
        }
        (ItemSet::new(a).unwrap(), ItemSet::new(b).unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn exchange_finds_exactly_the_differences(
            base in prop::collection::vec((0u32..100_000, 0u16..1000), 0..2000),
            rate in prop_oneof![0u16..5, 0u16..50, 0u16..1001],
            a_opens in any::<bool>(),
        ) {
            let (a, b) = derived(&base, rate);
            let sides = if a_opens { [&a, &b] } else { [&b, &a] };
            let outcome = exchange(sides, &Limits::DEFAULT);
            assert_exact(sides[0], sides[1], &outcome);
            prop_assert!(
                outcome.messages <= round_bound(&a, &b),
                "{} messages for {} and {} items", outcome.messages, a.len(), b.len()
            );
        }

        #[test]
        fn hinted_exchange_finds_exactly_the_differences(
            base in prop::collection::vec((0u32..100_000, 0u16..1000), 0..1500),
            rate in prop_oneof![0u16..5, 0u16..50, 0u16..1001],
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
            tight in any::<bool>(),
        ) {
            let limits = if tight {
                Limits { branching: 3, list_max: 4, ranges_max: 8, items_max: 6 }
            } else {
                Limits::DEFAULT
            };
            let (a, b) = derived(&base, rate);
            // Hints are a guess: some true differences, some equal items,
            // some ids the opener does not hold.
            let ids: Vec<DocId> = a.iter().chain(b.iter()).map(|(id, _)| id.clone()).collect();
            let hints: Vec<DocId> = if ids.is_empty() {
                Vec::new()
            } else {
                picks.iter().map(|pick| pick.get(&ids).clone()).collect()
            };
            let first = a.initiate_hinted_with(&hints, &limits);
            let outcome = exchange_from(first, [&a, &b], &limits);
            assert_exact(&a, &b, &outcome);
        }

        #[test]
        fn exchange_under_tight_limits_finds_exactly_the_differences(
            base in prop::collection::vec((0u32..100_000, 0u16..1000), 0..400),
            rate in 0u16..1001,
        ) {
            let limits = Limits { branching: 3, list_max: 4, ranges_max: 8, items_max: 6 };
            let (a, b) = derived(&base, rate);
            let outcome = exchange([&a, &b], &limits);
            assert_exact(&a, &b, &outcome);
        }

        #[test]
        fn well_typed_nonsense_never_panics(
            bounds in prop::collection::btree_set("[ab/~0]{1,4}", 0..12),
            modes in prop::collection::vec(
                (0u8..4, any::<[u8; 16]>(), prop_oneof![Just(0u64), 0u64..40, Just(u64::MAX)],
                 prop::collection::vec(("[ab/~0]{1,5}", any::<u8>()), 0..6)),
                13,
            ),
            sorted_lists in any::<bool>(),
        ) {
            let s = ItemSet::new(
                ["a", "a/", "a/b", "a/b0", "b", "b~", "~", "0", "ab", "aa/0"]
                    .into_iter()
                    .chain((0..40).map(|_| "x"))
                    .enumerate()
                    .map(|(k, name)| if name == "x" { item(&format!("a/{k}"), 0) } else { item(name, 1) }),
            )
            .unwrap();
            let uppers = bounds.into_iter().map(Bound::Prefix).chain([Bound::Infinity]);
            let ranges = uppers
                .zip(modes)
                .map(|(upper, (kind, fingerprint, count, list))| {
                    let mut list: Vec<(DocId, ShortHash)> =
                        list.iter().map(|(name, h)| (id(name), [*h; 8])).collect();
                    if sorted_lists {
                        list.sort();
                        list.dedup_by(|x, y| x.0 == y.0);
                    }
                    let mode = match kind {
                        0 => Mode::Skip,
                        1 => Mode::Fingerprint { fingerprint, count },
                        2 => Mode::Items(list),
                        _ => Mode::ItemsFinal(list),
                    };
                    Range { upper, mode }
                })
                .collect();
            let message = RangeMessage { ranges };
            if let Ok((Some(reply), _)) = s.respond(&message) {
                // Whatever it answers is itself a valid message.
                let bytes = postcard::to_allocvec(&reply).unwrap();
                let decoded: RangeMessage = postcard::from_bytes(&bytes).unwrap();
                prop_assert_eq!(&decoded, &reply);
                prop_assert!(validate(&reply, &Limits::DEFAULT).is_ok());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let s = ItemSet::new((0..200).map(|k| item(&format!("d/{k}"), 0))).unwrap();
            if let Ok(message) = postcard::from_bytes::<RangeMessage>(&bytes) {
                let _ = s.respond(&message);
            }
        }

        #[test]
        fn mutated_messages_never_panic(
            base in prop::collection::vec((0u32..100_000, 0u16..1000), 0..300),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let (a, b) = derived(&base, 300);
            // A realistic message from the middle of an exchange.
            let first = a.initiate();
            let message = match b.respond(&first) {
                Ok((Some(reply), _)) => reply,
                _ => first,
            };
            let mut bytes = postcard::to_allocvec(&message).unwrap();
            for (index, value) in flips {
                let at = index.index(bytes.len());
                bytes[at] = value;
            }
            if let Ok(message) = postcard::from_bytes::<RangeMessage>(&bytes) {
                let _ = a.respond(&message);
                let _ = b.respond(&message);
            }
        }

        #[test]
        fn messages_round_trip_through_postcard(
            base in prop::collection::vec((0u32..100_000, 0u16..1000), 0..600),
            rate in 0u16..1001,
        ) {
            let (a, b) = derived(&base, rate);
            let mut message = a.initiate();
            let sides = [&a, &b];
            let mut turn = 1;
            for _ in 0..20 {
                let bytes = postcard::to_allocvec(&message).unwrap();
                let decoded: RangeMessage = postcard::from_bytes(&bytes).unwrap();
                prop_assert_eq!(&decoded, &message);
                match sides[turn].respond(&decoded).unwrap() {
                    (Some(reply), _) => message = reply,
                    (None, _) => break,
                }
                turn = 1 - turn;
            }
        }
    }
}
