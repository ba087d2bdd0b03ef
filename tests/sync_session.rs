//! The sans-IO sync session driven directly between two replicas: handshake
//! and identity, catch-up, live push, scope enforcement, and hostile input.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use archipelago::doc::Op;
use archipelago::protocol::wire::{self, close_code, Message};
use archipelago::protocol::{Event, Glob, Lane, Scope, Session, SessionConfig};
use archipelago::store::Memory;
use archipelago::{Committed, DocId, Origin, Replica, ReplicaOptions, SiteName};
use serde_json::json;
use tokio::sync::broadcast;

fn site(name: &str) -> SiteName {
    name.parse().unwrap()
}

fn id(s: &str) -> DocId {
    s.parse().unwrap()
}

fn set(replica: &Replica, doc: &str, key: &str, value: serde_json::Value) {
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": format!("/{key}"), "value": value}]))
            .unwrap();
    replica.apply_ops(&id(doc), &ops, None).unwrap();
}

/// One end: a replica, its session with the other end, and its change feed.
struct End {
    replica: Replica,
    session: Session,
    feed: broadcast::Receiver<Committed>,
    events: Vec<Event>,
}

struct Pair {
    a: End,
    b: End,
    now: Instant,
    /// Frames in flight to a and to b, per lane.
    to_a: Vec<(Lane, VecDeque<Vec<u8>>)>,
    to_b: Vec<(Lane, VecDeque<Vec<u8>>)>,
    bytes_on_wire: usize,
    /// Bundles of compressed frames sent, both ways.
    bundles: usize,
    /// Messages sent, by kind, both ways.
    kinds: std::collections::BTreeMap<&'static str, usize>,
}

impl Pair {
    fn new(a: Replica, b: Replica, a_scope: Scope, b_scope: Scope) -> Pair {
        let now = Instant::now();
        let mut a_config = SessionConfig::new(a.site().clone(), b.site().clone());
        a_config.scope = a_scope;
        let mut b_config = SessionConfig::new(b.site().clone(), a.site().clone());
        b_config.scope = b_scope;
        let lanes = || {
            vec![
                (Lane::Control, VecDeque::new()),
                (Lane::Live, VecDeque::new()),
            ]
        };
        Pair {
            a: End {
                feed: a.subscribe(),
                session: Session::new(a_config, now),
                replica: a,
                events: Vec::new(),
            },
            b: End {
                feed: b.subscribe(),
                session: Session::new(b_config, now),
                replica: b,
                events: Vec::new(),
            },
            now,
            to_a: lanes(),
            to_b: lanes(),
            bytes_on_wire: 0,
            bundles: 0,
            kinds: Default::default(),
        }
    }

    fn everything(a: Replica, b: Replica) -> Pair {
        Pair::new(a, b, Scope::everything(), Scope::everything())
    }

    /// Moves outputs into lanes and committed changes into sessions.
    fn pump(&mut self) {
        for (end, out) in [(&mut self.a, &mut self.to_b), (&mut self.b, &mut self.to_a)] {
            while let Ok(committed) = end.feed.try_recv() {
                end.session.handle_committed(&end.replica, &committed);
            }
            while let Some((lane, frame)) = end.session.poll_transmit() {
                self.bytes_on_wire += frame.len();
                if frame[4] == wire::WIRE_BUNDLE {
                    self.bundles += 1;
                }
                let mut decoder = wire::FrameDecoder::new();
                decoder.push(&frame);
                while let Ok(Some(message)) = decoder.next_message() {
                    *self.kinds.entry(message.kind()).or_default() += 1;
                }
                out.iter_mut()
                    .find(|(l, _)| *l == lane)
                    .unwrap()
                    .1
                    .push_back(frame);
            }
            while let Some(event) = end.session.poll_event() {
                end.events.push(event);
            }
        }
    }

    /// Delivers everything, lane by lane in the given order, until quiet.
    fn run(&mut self, lane_order: [Lane; 2]) {
        for _ in 0..10_000 {
            self.pump();
            let mut delivered = false;
            for lane in lane_order {
                for to_b in [true, false] {
                    let queue = if to_b { &mut self.to_b } else { &mut self.to_a };
                    let frames: Vec<Vec<u8>> = queue
                        .iter_mut()
                        .find(|(l, _)| *l == lane)
                        .unwrap()
                        .1
                        .drain(..)
                        .collect();
                    let end = if to_b { &mut self.b } else { &mut self.a };
                    for frame in frames {
                        delivered = true;
                        end.session.handle_bytes(self.now, &end.replica, &frame);
                    }
                }
            }
            if !delivered {
                return;
            }
        }
        panic!("no quiescence");
    }

    fn assert_converged(&self, doc: &str) {
        let a = self
            .a
            .replica
            .read_json(&id(doc), None)
            .unwrap()
            .expect("a has it");
        let b = self
            .b
            .replica
            .read_json(&id(doc), None)
            .unwrap()
            .expect("b has it");
        assert_eq!(a.value, b.value);
        let (mut ha, mut hb) = (a.heads, b.heads);
        ha.sort();
        hb.sort();
        assert_eq!(ha, hb);
    }
}

/// The frames inside `frame` when it is a bundle, else `frame` itself.
fn plain_frames(frame: Vec<u8>) -> Vec<Vec<u8>> {
    if frame[4] != wire::WIRE_BUNDLE {
        return vec![frame];
    }
    let inner = wire::unbundle(&frame[4..]).unwrap();
    wire::frames_in(&inner)
        .map(|payload| {
            let payload = payload.unwrap();
            let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(payload);
            frame
        })
        .collect()
}

fn replica(name: &str) -> Replica {
    Replica::open(ReplicaOptions::new(site(name)), Arc::new(Memory::new())).unwrap()
}

#[test]
fn sites_catch_up_then_stream_live_changes() {
    let (a, b) = (replica("east"), replica("west"));
    for i in 0..20 {
        set(&a, &format!("inv/{i}"), "stock", json!(i));
    }
    set(&b, "inv/only-west", "stock", json!(1));
    let mut pair = Pair::everything(a, b);
    pair.run([Lane::Control, Lane::Live]);
    assert!(pair.a.session.is_reconciled() && pair.b.session.is_reconciled());
    assert!(pair
        .a
        .events
        .iter()
        .any(|e| matches!(e, Event::Connected { .. })));
    assert_eq!(pair.b.replica.doc_ids("inv/").len(), 21);
    assert_eq!(pair.a.replica.doc_ids("inv/").len(), 21);
    // Live: a commit at a reaches b with no reconciliation.
    set(&pair.a.replica, "inv/3", "stock", json!(99));
    pair.run([Lane::Live, Lane::Control]);
    pair.assert_converged("inv/3");
    assert!(pair.a.session.is_idle() && pair.b.session.is_idle());
}

#[test]
fn reconnecting_identical_sites_costs_one_small_exchange() {
    let (a, b) = (replica("east"), replica("west"));
    for i in 0..500 {
        set(&a, &format!("inv/{i}"), "stock", json!(i));
    }
    let mut first = Pair::everything(a.clone(), b.clone());
    first.run([Lane::Control, Lane::Live]);
    let mut again = Pair::everything(a, b);
    again.run([Lane::Control, Lane::Live]);
    // Two hellos, one fingerprint, one done: well under a kilobyte.
    assert!(again.bytes_on_wire < 300, "{} bytes", again.bytes_on_wire);
}

#[test]
fn documents_changed_while_apart_cost_one_round_trip_and_no_heads() {
    let (a, b) = (replica("east"), replica("west"));
    for i in 0..2_000 {
        set(&a, &format!("inv/{i}"), "stock", json!(i));
    }
    Pair::everything(a.clone(), b.clone()).run([Lane::Control, Lane::Live]);
    // East (which opens reconciliation) changes ten while apart.
    for i in (0..2_000).step_by(200) {
        set(&a, &format!("inv/{i}"), "stock", json!(-1));
    }
    let mut pair = Pair::everything(a.clone(), b.clone());
    pair.run([Lane::Control, Lane::Live]);
    for i in (0..2_000).step_by(200) {
        pair.assert_converged(&format!("inv/{i}"));
    }
    // The hinted opening and its answer; then the changes, straight away.
    assert_eq!(pair.kinds.get("reconcile"), Some(&2), "{:?}", pair.kinds);
    assert_eq!(pair.kinds.get("have"), None, "{:?}", pair.kinds);
    assert_eq!(pair.kinds.get("changes"), Some(&10), "{:?}", pair.kinds);
    // West (which answers) changes five, east five others: found by
    // splitting, and every one arrives.
    for i in (0..2_000).step_by(400) {
        set(&b, &format!("inv/{i}"), "stock", json!(-2));
        set(&a, &format!("inv/{}", i + 1), "stock", json!(-3));
    }
    let mut pair = Pair::everything(a, b);
    pair.run([Lane::Control, Lane::Live]);
    for i in (0..2_000).step_by(400) {
        pair.assert_converged(&format!("inv/{i}"));
        pair.assert_converged(&format!("inv/{}", i + 1));
    }
}

#[test]
fn catch_up_travels_in_compressed_bundles_when_both_sides_accept_them() {
    let (a, b) = (replica("east"), replica("west"));
    for i in 0..2_000 {
        set(
            &a,
            &format!("tenant-{}/orders/{i}", i % 7),
            "stock",
            json!(i),
        );
    }
    Pair::everything(a.clone(), b.clone()).run([Lane::Control, Lane::Live]);
    let mut bytes = Vec::new();
    for (round, bundles_at_b) in [(1, true), (2, false)] {
        for i in (0..2_000).step_by(200) {
            set(
                &a,
                &format!("tenant-{}/orders/{i}", i % 7),
                "stock",
                json!(-round),
            );
        }
        let mut pair = Pair::everything(a.clone(), b.clone());
        pair.b.session = {
            let mut config = SessionConfig::new(site("west"), site("east"));
            config.bundles = bundles_at_b;
            Session::new(config, pair.now)
        };
        pair.run([Lane::Control, Lane::Live]);
        for i in (0..2_000).step_by(200) {
            pair.assert_converged(&format!("tenant-{}/orders/{i}", i % 7));
        }
        assert_eq!(pair.kinds.get("changes"), Some(&10), "{:?}", pair.kinds);
        if bundles_at_b {
            assert!(pair.bundles >= 1, "no bundle sent");
        } else {
            // One side without bundles: neither side sends one.
            assert_eq!(pair.bundles, 0);
        }
        bytes.push(pair.bytes_on_wire);
    }
    // The ten changes repeat the actor, the id prefix and the column
    // layout: bundled, the whole exchange takes well under three quarters.
    assert!(
        bytes[0] * 4 < bytes[1] * 3,
        "bundled {} vs plain {}",
        bytes[0],
        bytes[1]
    );
}

#[test]
fn concurrent_histories_find_a_common_base_instead_of_resending_everything() {
    let (a, b) = (replica("east"), replica("west"));
    for i in 0..300 {
        set(&a, "ledger/1", &format!("k{}", i % 7), json!(i));
    }
    Pair::everything(a.clone(), b.clone()).run([Lane::Control, Lane::Live]);
    // Both sides edit while apart.
    set(&a, "ledger/1", "east", json!(1));
    set(&b, "ledger/1", "west", json!(2));
    let mut pair = Pair::everything(a, b);
    pair.run([Lane::Control, Lane::Live]);
    pair.assert_converged("ledger/1");
    let sent = pair.a.session.stats().changes_sent + pair.b.session.stats().changes_sent;
    assert!(
        sent <= 40,
        "sent {sent} changes for 2 new ones (history is 300)"
    );
}

#[test]
fn large_catch_up_is_cut_into_bounded_messages() {
    let (a, b) = (replica("east"), replica("west"));
    set(&a, "big/doc", "start", json!(0));
    Pair::everything(a.clone(), b.clone()).run([Lane::Control, Lane::Live]);
    // While apart, a adds ~3 MB of changes that b must catch up on.
    let blob = "x".repeat(2000);
    for i in 0..1500 {
        set(
            &a,
            "big/doc",
            &format!("k{}", i % 50),
            json!(format!("{blob}{i}")),
        );
    }
    let mut pair = Pair::everything(a, b);
    pair.run([Lane::Control, Lane::Live]);
    pair.assert_converged("big/doc");
    let stats = pair.a.session.stats();
    assert!(stats.batches_sent >= 3, "{stats:?}");
    assert_eq!(stats.changes_sent, 1500);
}

#[test]
fn a_peer_without_the_document_gets_it_whole_in_saved_form() {
    let (a, b) = (replica("east"), replica("west"));
    for i in 0..200 {
        set(&a, "orders/1", &format!("k{}", i % 9), json!(i));
    }
    let mut pair = Pair::everything(a, b.clone());
    pair.run([Lane::Control, Lane::Live]);
    pair.assert_converged("orders/1");
    let stats = pair.a.session.stats();
    assert_eq!(
        (stats.snapshots_sent, stats.changes_sent),
        (1, 0),
        "{stats:?}"
    );
    // The received document keeps its history and takes new edits.
    assert_eq!(b.history(&id("orders/1")).unwrap().unwrap().len(), 200);
    set(&b, "orders/1", "k0", json!("west"));
    pair.run([Lane::Live, Lane::Control]);
    pair.assert_converged("orders/1");
}

#[test]
fn a_forged_snapshot_is_rejected_and_stores_nothing() {
    let (a, west) = (replica("east"), replica("west"));
    set(&west, "d", "v", json!(1));
    let mut bytes = west.save_bytes(&id("d")).unwrap().unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    let mut session = open_session(&a, Scope::everything());
    session.handle_bytes(
        Instant::now(),
        &a,
        &wire::encode(&Message::Snapshot {
            doc: id("d"),
            bytes,
            batch: 1,
        }),
    );
    assert!(session.is_open());
    let events: Vec<Event> = std::iter::from_fn(|| session.poll_event()).collect();
    assert!(matches!(&events[0], Event::Rejected { .. }), "{events:?}");
    assert_eq!(a.heads(&id("d")), None);
}

#[test]
fn live_changes_that_overtake_their_dependencies_are_caught_up() {
    let (a, b) = (replica("east"), replica("west"));
    set(&a, "d", "v", json!(0));
    let mut pair = Pair::everything(a, b);
    pair.run([Lane::Control, Lane::Live]);
    for i in 1..5 {
        set(&pair.a.replica, "d", "v", json!(i));
        pair.pump();
    }
    // Deliver the live lane in reverse order: later changes arrive first.
    let live = &mut pair
        .to_b
        .iter_mut()
        .find(|(l, _)| *l == Lane::Live)
        .unwrap()
        .1;
    let frames: Vec<Vec<u8>> = live.drain(..).rev().collect();
    for frame in frames {
        pair.b
            .session
            .handle_bytes(pair.now, &pair.b.replica, &frame);
    }
    pair.run([Lane::Control, Lane::Live]);
    pair.assert_converged("d");
}

#[test]
fn a_peer_claiming_another_site_is_refused() {
    let (a, b) = (replica("east"), replica("mallory"));
    let now = Instant::now();
    let mut session = Session::new(SessionConfig::new(site("east"), site("west")), now);
    let mut impostor = Session::new(SessionConfig::new(site("mallory"), site("east")), now);
    let (_, hello) = impostor.poll_transmit().unwrap();
    session.handle_bytes(now, &a, &hello);
    let events: Vec<Event> = std::iter::from_fn(|| session.poll_event()).collect();
    assert!(
        matches!(
            events.last(),
            Some(Event::Closed {
                code: close_code::IDENTITY,
                by_peer: false,
                ..
            })
        ),
        "{events:?}"
    );
    assert!(session.is_closed());
    drop(b);
}

#[test]
fn another_protocol_version_is_refused() {
    let a = replica("east");
    let now = Instant::now();
    let mut session = Session::new(SessionConfig::new(site("east"), site("west")), now);
    let hello = wire::encode(&Message::Hello {
        version: 99,
        site: site("west"),
        capabilities: 1,
    });
    session.handle_bytes(now, &a, &hello);
    assert!(session.is_closed());
    let events: Vec<Event> = std::iter::from_fn(|| session.poll_event()).collect();
    assert!(matches!(
        events.last(),
        Some(Event::Closed {
            code: close_code::VERSION,
            ..
        })
    ));
}

#[test]
fn a_silent_peer_times_out() {
    let a = replica("east");
    let now = Instant::now();
    let mut session = Session::new(SessionConfig::new(site("east"), site("west")), now);
    let deadline = session.poll_timeout().unwrap();
    session.handle_timeout(now + Duration::from_millis(1));
    assert!(!session.is_closed());
    session.handle_timeout(deadline);
    assert!(session.is_closed());
    drop(a);
}

#[test]
fn malformed_frames_close_the_session_and_touch_nothing() {
    let a = replica("east");
    set(&a, "d", "v", json!(1));
    let before = a.index();
    for garbage in [
        vec![0, 0, 0, 3, 1, 0xff, 0xff],
        vec![0xff; 8],
        vec![0, 0, 0, 1, 7],
    ] {
        let now = Instant::now();
        let mut session = Session::new(SessionConfig::new(site("east"), site("west")), now);
        let hello = wire::encode(&Message::Hello {
            version: 1,
            site: site("west"),
            capabilities: 1,
        });
        session.handle_bytes(now, &a, &hello);
        assert!(session.is_open());
        session.handle_bytes(now, &a, &garbage);
        assert!(
            session.is_closed(),
            "garbage {garbage:?} closes the session"
        );
    }
    assert_eq!(a.index(), before);
}

/// A session at `east` that has accepted `west`'s hello.
fn open_session(replica: &Replica, scope: Scope) -> Session {
    let now = Instant::now();
    let mut config = SessionConfig::new(site("east"), site("west"));
    config.scope = scope;
    let mut session = Session::new(config, now);
    let hello = wire::encode(&Message::Hello {
        version: 1,
        site: site("west"),
        capabilities: 1,
    });
    session.handle_bytes(now, replica, &hello);
    assert!(session.is_open());
    while session.poll_transmit().is_some() {}
    while session.poll_event().is_some() {}
    session
}

#[test]
fn malformed_changes_are_rejected_and_the_session_carries_on() {
    let (a, west) = (replica("east"), replica("west"));
    set(&west, "d", "v", json!(7));
    let good = west.changes_after(&id("d"), &[]).unwrap().unwrap();
    let mut session = open_session(&a, Scope::everything());
    let now = Instant::now();
    // Bytes shaped like an automerge change header, then junk.
    let bad = Message::Changes {
        doc: id("d"),
        changes: vec![vec![0x85, 0x6f, 0x4a, 0x83, 9, 9, 9, 9, 1, 2, 3]],
        batch: 1,
    };
    session.handle_bytes(now, &a, &wire::encode(&bad));
    let ok = Message::Changes {
        doc: id("d"),
        changes: good,
        batch: 2,
    };
    session.handle_bytes(now, &a, &wire::encode(&ok));
    assert!(session.is_open());
    let events: Vec<Event> = std::iter::from_fn(|| session.poll_event()).collect();
    assert!(
        matches!(&events[0], Event::Rejected { reason, .. } if reason.contains("malformed")),
        "{events:?}"
    );
    assert!(
        matches!(&events[1], Event::Applied { changes: 1, .. }),
        "{events:?}"
    );
    assert_eq!(
        a.read_json(&id("d"), None).unwrap().unwrap().value,
        json!({"v": 7})
    );
    // Both batches were acknowledged, by one cumulative `Ack` (the first
    // was still queued when the second was handled).
    let acks: Vec<Message> = std::iter::from_fn(|| session.poll_transmit())
        .map(|(_, f)| wire::decode_payload(&f[4..]).unwrap())
        .filter(|m| matches!(m, Message::Ack { .. }))
        .collect();
    assert_eq!(acks, vec![Message::Ack { batch: 2 }]);
}

#[test]
fn writes_outside_the_peer_scope_are_rejected_and_the_rest_applies() {
    let (a, west) = (replica("east"), replica("west"));
    set(&west, "eu/patient-1", "name", json!("x"));
    set(&west, "shared/catalog", "name", json!("y"));
    let scope = Scope {
        send: vec![Glob::new("*")],
        receive: vec![Glob::new("shared/*")],
    };
    let mut session = open_session(&a, scope);
    let now = Instant::now();
    for (batch, doc) in [(1, "eu/patient-1"), (2, "shared/catalog")] {
        let changes = west.changes_after(&id(doc), &[]).unwrap().unwrap();
        session.handle_bytes(
            now,
            &a,
            &wire::encode(&Message::Changes {
                doc: id(doc),
                changes,
                batch,
            }),
        );
    }
    let events: Vec<Event> = std::iter::from_fn(|| session.poll_event()).collect();
    assert!(
        matches!(&events[0], Event::Rejected { doc, .. } if doc.as_str() == "eu/patient-1"),
        "{events:?}"
    );
    assert!(session.is_open());
    assert_eq!(a.heads(&id("eu/patient-1")), None);
    assert!(a.heads(&id("shared/catalog")).is_some());
}

#[test]
fn documents_outside_the_send_scope_never_leave() {
    let (a, b) = (replica("eu-central"), replica("us-east"));
    set(&a, "eu/patient-1", "name", json!("x"));
    set(&a, "catalog/1", "name", json!("y"));
    let eu_only_home = Scope {
        send: vec![Glob::new("catalog/*")],
        receive: vec![Glob::new("catalog/*")],
    };
    let mut pair = Pair::new(a, b, eu_only_home.clone(), eu_only_home);
    pair.run([Lane::Control, Lane::Live]);
    set(&pair.a.replica, "eu/patient-1", "name", json!("z"));
    pair.run([Lane::Live, Lane::Control]);
    assert_eq!(pair.b.replica.doc_ids(""), vec![id("catalog/1")]);
}

#[test]
fn an_interrupted_catch_up_resumes_where_it_stopped() {
    let store_b = Arc::new(Memory::new());
    let a = replica("east");
    let b = Replica::open(ReplicaOptions::new(site("west")), store_b.clone()).unwrap();
    // b holds the start of every document, so the rest travels as changes.
    for d in 0..50 {
        set(&a, &format!("inv/{d}"), "k", json!(0));
    }
    Pair::everything(a.clone(), b.clone()).run([Lane::Control, Lane::Live]);
    for d in 0..50 {
        for i in 1..40 {
            set(&a, &format!("inv/{d}"), &format!("k{}", i % 5), json!(i));
        }
    }
    let needed = 50 * 39;

    // First connection: b applies about half of the batches, then b crashes.
    let mut first = Pair::everything(a.clone(), b);
    let mut applied_first = 0;
    'cut: for _ in 0..1000 {
        first.pump();
        // Bundles are opened so that b can stop between any two messages.
        let frames: Vec<Vec<u8>> = first
            .to_b
            .iter_mut()
            .flat_map(|(_, q)| q.drain(..))
            .flat_map(plain_frames)
            .collect();
        let back: Vec<Vec<u8>> = first
            .to_a
            .iter_mut()
            .flat_map(|(_, q)| q.drain(..))
            .collect();
        for frame in back {
            first
                .a
                .session
                .handle_bytes(first.now, &first.a.replica, &frame);
        }
        for frame in frames {
            first
                .b
                .session
                .handle_bytes(first.now, &first.b.replica, &frame);
            applied_first = first.b.session.stats().changes_applied;
            if applied_first >= needed as u64 / 2 {
                break 'cut;
            }
        }
    }
    assert!(
        applied_first >= needed as u64 / 2 && applied_first < needed as u64,
        "{applied_first}"
    );
    drop(first);

    // b restarts from its store; the new session sends only what is missing.
    let b = Replica::open(ReplicaOptions::new(site("west")), store_b).unwrap();
    let mut second = Pair::everything(a, b);
    second.run([Lane::Control, Lane::Live]);
    for d in 0..50 {
        second.assert_converged(&format!("inv/{d}"));
    }
    let resent = second.a.session.stats().changes_sent;
    assert_eq!(
        resent,
        needed as u64 - applied_first,
        "only the missing changes travel again"
    );
}

/// A host that records how many whole documents each write is given.
struct CountingHost {
    replica: Replica,
    batches: std::sync::Mutex<Vec<usize>>,
}

impl archipelago::protocol::Host for CountingHost {
    fn index(&self) -> Vec<(DocId, Vec<archipelago::ChangeHash>)> {
        self.replica.index()
    }
    fn heads(&self, doc: &DocId) -> Option<Vec<archipelago::ChangeHash>> {
        archipelago::protocol::Host::heads(&self.replica, doc)
    }
    fn known(
        &self,
        doc: &DocId,
        hashes: &[archipelago::ChangeHash],
    ) -> Result<Vec<archipelago::ChangeHash>, archipelago::Error> {
        self.replica.known(doc, hashes)
    }
    fn changes_after(
        &self,
        doc: &DocId,
        have: &[archipelago::ChangeHash],
    ) -> Result<Vec<Vec<u8>>, archipelago::Error> {
        archipelago::protocol::Host::changes_after(&self.replica, doc, have)
    }
    fn sample(&self, doc: &DocId) -> Result<Vec<archipelago::ChangeHash>, archipelago::Error> {
        self.replica.sample(doc)
    }
    fn apply(
        &self,
        doc: &DocId,
        changes: &[Vec<u8>],
        from: &SiteName,
    ) -> Result<archipelago::Applied, archipelago::Error> {
        archipelago::protocol::Host::apply(&self.replica, doc, changes, from)
    }
    fn snapshot(
        &self,
        doc: &DocId,
    ) -> Result<(Vec<u8>, Vec<archipelago::ChangeHash>), archipelago::Error> {
        self.replica.snapshot(doc)
    }
    fn apply_snapshot(
        &self,
        doc: &DocId,
        bytes: &[u8],
        from: &SiteName,
    ) -> Result<archipelago::Applied, archipelago::Error> {
        self.apply_snapshots(&[(doc.clone(), bytes)], from)
            .pop()
            .unwrap()
    }
    fn apply_snapshots(
        &self,
        docs: &[(DocId, &[u8])],
        from: &SiteName,
    ) -> Vec<Result<archipelago::Applied, archipelago::Error>> {
        self.batches.lock().unwrap().push(docs.len());
        archipelago::protocol::Host::apply_snapshots(&self.replica, docs, from)
    }
}

#[test]
fn whole_documents_in_bundles_are_written_in_bounded_batches() {
    let west = replica("west");
    for d in 0..600 {
        set(&west, &format!("inv/{d}"), "stock", json!(d));
    }
    let host = CountingHost {
        replica: replica("east"),
        batches: Default::default(),
    };
    let now = Instant::now();
    let mut session = Session::new(SessionConfig::new(site("east"), site("west")), now);
    let hello = wire::encode(&Message::Hello {
        version: 1,
        site: site("west"),
        capabilities: wire::capabilities::RANGE_RECONCILE | wire::capabilities::BUNDLES,
    });
    session.handle_bytes(now, &host, &hello);
    // 600 whole documents, bundled as a sender bundles them.
    let frames: Vec<Vec<u8>> = (0..600)
        .map(|d| Message::Snapshot {
            doc: id(&format!("inv/{d}")),
            bytes: west.save_bytes(&id(&format!("inv/{d}"))).unwrap().unwrap(),
            batch: d + 1,
        })
        .map(|m| wire::encode(&m))
        .collect();
    let mut bundles = Vec::new();
    let mut start = 0;
    while start < frames.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < frames.len() && bytes + frames[end].len() <= wire::BUNDLE_BYTES_MAX {
            bytes += frames[end].len();
            end += 1;
        }
        bundles.push(wire::bundle(&frames[start..end]));
        start = end;
    }
    let payloads: Vec<&[u8]> = bundles.iter().map(|b| &b[4..]).collect();
    session.handle_frames(now, &host, &payloads);
    assert!(session.is_open());
    let batches = host.batches.lock().unwrap().clone();
    assert_eq!(batches.iter().sum::<usize>(), 600, "{batches:?}");
    assert!(
        batches
            .iter()
            .all(|&n| n <= archipelago::protocol::session::SNAPSHOTS_PER_WRITE_MAX),
        "{batches:?}"
    );
    assert_eq!(host.replica.doc_ids("inv/").len(), 600);
}

#[test]
fn a_change_from_the_peers_earlier_process_goes_back_to_it() {
    // `west` wrote a change and sent it before its own write was durable,
    // then was killed: the restarted `west` lacks it. `east` applies it from
    // the old connection while the new session is already open, so the
    // commit reaches the new session with `west` as its origin. The new
    // session did not receive it, so it must not assume `west` holds it.
    let (east, west) = (replica("east"), replica("west"));
    set(&east, "orders/1", "qty", json!(1));
    let mut pair = Pair::everything(east, west);
    pair.run([Lane::Control, Lane::Live]);
    pair.assert_converged("orders/1");

    let lost_west = replica("west");
    let base = pair
        .a
        .replica
        .changes_after(&id("orders/1"), &[])
        .unwrap()
        .unwrap();
    lost_west
        .apply_changes(&id("orders/1"), &base, Origin::Peer(site("east")))
        .unwrap();
    set(&lost_west, "orders/1", "shipped", json!(true));
    let heads = pair.a.replica.heads(&id("orders/1")).unwrap();
    let lost = lost_west
        .changes_after(&id("orders/1"), &heads)
        .unwrap()
        .unwrap();
    assert_eq!(lost.len(), 1);
    pair.a
        .replica
        .apply_changes(&id("orders/1"), &lost, Origin::Peer(site("west")))
        .unwrap();
    pair.run([Lane::Live, Lane::Control]);
    pair.assert_converged("orders/1");

    // A change this session did receive from the peer is not sent back.
    let sent = pair.kinds.clone();
    set(&pair.b.replica, "orders/1", "paid", json!(true));
    pair.run([Lane::Live, Lane::Control]);
    pair.assert_converged("orders/1");
    let a_to_b_changes =
        pair.kinds.get("changes").copied().unwrap_or(0) - sent.get("changes").copied().unwrap_or(0);
    assert_eq!(
        a_to_b_changes, 1,
        "only west's change travels, once: {:?}",
        pair.kinds
    );
}
