//! What set reconciliation costs after a reconnect: bytes on the wire
//! (postcard, both directions) and messages, for realistic document ids.
//! Run with `--nocapture` to see the numbers.

use std::collections::BTreeSet;

use archipelago::protocol::reconcile::{item_hash, Differences, ItemHash, ItemSet, RangeMessage};
use archipelago::DocId;

/// What an exchange cost and what each side learned.
struct Exchange {
    learned: [Differences; 2],
    messages: usize,
    bytes: usize,
}

impl Exchange {
    fn round_trips(&self) -> usize {
        self.messages.div_ceil(2)
    }
}

/// Runs an exchange, `sides[0]` opening, sending every message through
/// postcard.
fn exchange(sides: [&ItemSet; 2]) -> anyhow::Result<Exchange> {
    let mut outcome = Exchange {
        learned: Default::default(),
        messages: 0,
        bytes: 0,
    };
    let mut message = sides[0].initiate();
    let mut turn = 1;
    loop {
        let bytes = postcard::to_allocvec(&message)?;
        outcome.messages += 1;
        outcome.bytes += bytes.len();
        let received: RangeMessage = postcard::from_bytes(&bytes)?;
        let (reply, found) = sides[turn].respond(&received)?;
        outcome.learned[turn].append(found);
        match reply {
            Some(reply) => message = reply,
            None => return Ok(outcome),
        }
        anyhow::ensure!(outcome.messages < 100, "exchange does not terminate");
        turn = 1 - turn;
    }
}

fn doc_id(k: usize) -> DocId {
    DocId::new(&format!("tenant-{}/orders/{k}", k % 7)).expect("valid id")
}

fn item(k: usize, version: u8) -> (DocId, ItemHash) {
    let id = doc_id(k);
    let hash = item_hash(&id, &[[version; 32], [version ^ 0x5a; 32]]);
    (id, hash)
}

/// `n` documents; those in `changed` are at another version.
fn documents(n: usize, changed: &BTreeSet<usize>) -> anyhow::Result<ItemSet> {
    Ok(ItemSet::new((0..n).map(|k| {
        let version = if changed.contains(&k) { 2 } else { 1 };
        item(k, version)
    }))?)
}

/// `count` document numbers spread over `0..n`, deterministically.
fn spread(count: usize, n: usize) -> BTreeSet<usize> {
    (0..count).map(|i| (i * 7919 + 13) * 104_729 % n).collect()
}

fn report(name: &str, outcome: &Exchange) {
    println!(
        "{name}: {} bytes in {} messages ({} round trips)",
        outcome.bytes,
        outcome.messages,
        outcome.round_trips()
    );
}

/// Every changed document was found by at least one side.
fn assert_changed_found(changed: &BTreeSet<usize>, outcome: &Exchange) {
    let found: BTreeSet<DocId> = outcome
        .learned
        .iter()
        .flat_map(|learned| learned.differ.iter().cloned())
        .collect();
    let expected: BTreeSet<DocId> = changed.iter().map(|&k| doc_id(k)).collect();
    assert_eq!(found, expected);
    for learned in &outcome.learned {
        assert!(learned.only_mine.is_empty() && learned.only_theirs.is_empty());
    }
}

#[test]
fn ten_thousand_identical_docs_reconcile_in_one_round_trip_under_100_bytes() -> anyhow::Result<()> {
    let a = documents(10_000, &BTreeSet::new())?;
    let b = documents(10_000, &BTreeSet::new())?;
    let outcome = exchange([&a, &b])?;
    report("10,000 identical", &outcome);
    assert!(outcome.messages <= 2);
    assert!(outcome.bytes < 100, "{} bytes", outcome.bytes);
    assert!(outcome.learned.iter().all(Differences::is_empty));
    Ok(())
}

#[test]
fn ten_changed_of_ten_thousand_cost_a_few_kilobytes() -> anyhow::Result<()> {
    let changed = spread(10, 10_000);
    assert_eq!(changed.len(), 10);
    let a = documents(10_000, &BTreeSet::new())?;
    let b = documents(10_000, &changed)?;
    let outcome = exchange([&a, &b])?;
    report("10 changed of 10,000", &outcome);
    assert_changed_found(&changed, &outcome);
    assert!(outcome.bytes < 20_000, "{} bytes", outcome.bytes);
    assert!(outcome.round_trips() <= 5);
    Ok(())
}

#[test]
fn ten_added_and_ten_removed_of_ten_thousand_are_all_named() -> anyhow::Result<()> {
    let a = ItemSet::new((0..10_000).map(|k| item(k, 1)))?;
    let removed = spread(10, 10_000);
    let b = ItemSet::new(
        (0..10_010)
            .filter(|k| !removed.contains(k))
            .map(|k| item(k, 1)),
    )?;
    let outcome = exchange([&a, &b])?;
    report("10 added and 10 removed of 10,000", &outcome);
    let [la, lb] = &outcome.learned;
    let only_a: BTreeSet<DocId> = la
        .only_mine
        .iter()
        .chain(&lb.only_theirs)
        .cloned()
        .collect();
    let only_b: BTreeSet<DocId> = lb
        .only_mine
        .iter()
        .chain(&la.only_theirs)
        .cloned()
        .collect();
    assert_eq!(only_a, removed.iter().map(|&k| doc_id(k)).collect());
    assert_eq!(only_b, (10_000..10_010).map(doc_id).collect());
    assert!(la.differ.is_empty() && lb.differ.is_empty());
    assert!(outcome.bytes < 40_000, "{} bytes", outcome.bytes);
    Ok(())
}

#[test]
fn hundred_changed_of_hundred_thousand_cost_tens_of_kilobytes() -> anyhow::Result<()> {
    let changed = spread(100, 100_000);
    assert_eq!(changed.len(), 100);
    let a = documents(100_000, &BTreeSet::new())?;
    let b = documents(100_000, &changed)?;
    let outcome = exchange([&a, &b])?;
    report("100 changed of 100,000", &outcome);
    assert_changed_found(&changed, &outcome);
    assert!(outcome.bytes < 200_000, "{} bytes", outcome.bytes);
    Ok(())
}
