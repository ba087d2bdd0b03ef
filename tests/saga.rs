//! Sagas over replicas in memory, exchanged by hand: steps run in order,
//! each at its own site and exactly once; a failure (precondition, rights,
//! function, deadline) compensates the steps that took effect in reverse
//! order; external calls are handed out with their idempotency key; a
//! store that fails or was restored runs nothing twice.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use archipelago::saga::{
    CompensationState, ExternalOutcome, SagaDef, SagaFns, SagaStatus, StepState,
};
use archipelago::store::{Faulty, Memory, Store, Write};
use archipelago::txn::{Precondition, TxnDoc};
use archipelago::{Clock, DocId, Error, Origin, Replica, ReplicaOptions};
use serde_json::{json, Value};

struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn options(site: &str) -> ReplicaOptions {
    ReplicaOptions::new(site.parse().unwrap())
}

fn open(options: ReplicaOptions, store: Arc<dyn Store>) -> Replica {
    Replica::open(options, store).unwrap()
}

fn replica(site: &str) -> Replica {
    open(options(site), Arc::new(Memory::new()))
}

fn ops(value: Value) -> Vec<archipelago::doc::Op> {
    serde_json::from_value(value).unwrap()
}

fn id(s: &str) -> DocId {
    s.parse().unwrap()
}

/// Sends every change `from` holds to `to` (a whole exchange, as sync would
/// bring it: every member of a transaction arrives).
fn send(from: &Replica, to: &Replica) {
    for (doc, _) in from.index() {
        let changes = from.changes_after(&doc, &[]).unwrap().unwrap();
        to.apply_changes(&doc, &changes, Origin::Peer(from.site().clone()))
            .unwrap();
    }
}

fn exchange(a: &Replica, b: &Replica) {
    send(a, b);
    send(b, a);
}

/// Counts, at `at`, the effects of each step: `effects/NAME` documents hold
/// counters `action` and `compensation` that the steps increment.
fn effects(at: &Replica, name: &str) -> (i64, i64) {
    let Some(view) = at.read_json(&id(&format!("effects/{name}")), None).unwrap() else {
        return (0, 0);
    };
    let read = |key: &str| view.value.get(key).and_then(Value::as_i64).unwrap_or(0);
    (read("action"), read("compensation"))
}

/// Creates the effect counters of `names` at `at` (before any saga runs;
/// send them to the other site).
fn counters(at: &Replica, names: &[&str]) {
    for name in names {
        at.apply_ops(
            &id(&format!("effects/{name}")),
            &ops(json!([
                {"op": "set", "path": "/action", "value": 0, "as": "counter"},
                {"op": "set", "path": "/compensation", "value": 0, "as": "counter"}
            ])),
            None,
        )
        .unwrap();
    }
}

fn counted(name: &str, key: &str) -> Value {
    json!({"docs": [{"id": format!("effects/{name}"), "ops": [{"op": "inc", "path": format!("/{key}"), "by": 1}]}]})
}

/// A step at `site` that counts its action and compensation.
fn step(name: &str, site: &str) -> Value {
    json!({"name": name, "site": site, "txn": counted(name, "action"), "compensate": counted(name, "compensation")})
}

fn saga(id: &str, steps: Vec<Value>) -> SagaDef {
    serde_json::from_value(json!({"id": id, "steps": steps})).unwrap()
}

fn status(at: &Replica, saga: &str) -> SagaStatus {
    at.saga(saga).unwrap().unwrap().state.status()
}

/// Runs what is due and exchanges, until neither site does anything more
/// (bounded).
fn settle(a: &Replica, b: &Replica, saga: &str) {
    let mut quiet = 0;
    for _ in 0..20 {
        exchange(a, b);
        let ran_a = a.run_saga(saga).unwrap();
        let ran_b = b.run_saga(saga).unwrap();
        quiet = if ran_a.is_empty() && ran_b.is_empty() {
            quiet + 1
        } else {
            0
        };
        if quiet == 2 {
            return;
        }
    }
    panic!("the saga did not settle");
}

#[test]
fn steps_run_in_order_each_once_at_its_site() {
    let (east, west) = (replica("east"), replica("west"));
    counters(&east, &["take", "reserve", "confirm"]);
    exchange(&east, &west);
    let def = saga(
        "order-1",
        vec![
            step("take", "east"),
            step("reserve", "west"),
            step("confirm", "east"),
        ],
    );
    let (view, run) = east.start_saga(&def).unwrap();
    assert_eq!(run.done, ["take"], "the first step runs where it starts");
    assert_eq!(view.state.records[0].status, StepState::Done);
    assert!(view.changes[0].is_some());
    assert_eq!(view.state.status(), SagaStatus::Running);
    // Nothing more here until west did its part.
    assert!(east.run_saga("order-1").unwrap().is_empty());
    exchange(&east, &west);
    let run = west.run_saga("order-1").unwrap();
    assert_eq!(run.done, ["reserve"]);
    assert!(west.run_saga("order-1").unwrap().is_empty());
    exchange(&east, &west);
    assert_eq!(east.run_saga("order-1").unwrap().done, ["confirm"]);
    settle(&east, &west, "order-1");
    for site in [&east, &west] {
        assert_eq!(status(site, "order-1"), SagaStatus::Done);
        for name in ["take", "reserve", "confirm"] {
            assert_eq!(effects(site, name), (1, 0), "{name} at {}", site.site());
        }
    }
    let (a, b) = (
        east.saga("order-1").unwrap().unwrap(),
        west.saga("order-1").unwrap().unwrap(),
    );
    assert_eq!(a, b, "the same at both sites");
    assert!(a.state.finished_at().is_some());
    // The same id again: refused, nothing changed.
    let heads = east.heads(&id("sagas/order-1"));
    match east.start_saga(&def) {
        Err(Error::Saga(archipelago::saga::SagaError::Exists(id))) => assert_eq!(id, "order-1"),
        other => panic!("expected Exists, got {other:?}"),
    }
    assert_eq!(east.heads(&id("sagas/order-1")), heads);
}

#[test]
fn a_failed_step_compensates_the_earlier_ones_in_reverse_order() {
    let (east, west) = (replica("east"), replica("west"));
    counters(&east, &["take", "reserve", "book"]);
    east.apply_ops(
        &id("orders/taken"),
        &ops(json!([{"op": "set", "path": "/x", "value": 1}])),
        None,
    )
    .unwrap();
    exchange(&east, &west);
    // The third step needs orders/taken absent: it fails by precondition.
    let mut third = step("book", "east");
    third["txn"]["docs"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "orders/taken", "if_absent": true}));
    let def = saga(
        "order-2",
        vec![step("take", "east"), step("reserve", "west"), third],
    );
    east.start_saga(&def).unwrap();
    settle(&east, &west, "order-2");
    for site in [&east, &west] {
        let view = site.saga("order-2").unwrap().unwrap();
        assert_eq!(view.state.status(), SagaStatus::Compensated);
        let book = &view.state.records[2];
        assert_eq!(book.status, StepState::Failed);
        assert!(
            book.error.as_deref().unwrap().contains("orders/taken"),
            "{book:?}"
        );
        for k in 0..2 {
            assert_eq!(view.state.records[k].compensation, CompensationState::Done);
        }
        assert_eq!(effects(site, "take"), (1, 1));
        assert_eq!(effects(site, "reserve"), (1, 1));
        assert_eq!(effects(site, "book"), (0, 0));
    }
    // Reverse order: reserve's compensation was recorded before take's.
    let view = east.saga("order-2").unwrap().unwrap();
    assert!(view.state.records[1].at <= view.state.records[0].at);
}

#[test]
fn insufficient_rights_fail_a_step_cleanly() {
    let (east, west) = (replica("east"), replica("west"));
    counters(&east, &["take", "reserve"]);
    west.apply_ops(
        &id("stock/sku-1"),
        &ops(json!([{"op": "set", "path": "/n", "value": 0, "as": "bounded", "min": 0}])),
        None,
    )
    .unwrap();
    exchange(&east, &west);
    let reserve = json!({"name": "reserve", "site": "west", "txn": {"docs": [
        {"id": "stock/sku-1", "ops": [{"op": "inc", "path": "/n", "by": -1}]},
        {"id": "effects/reserve", "ops": [{"op": "inc", "path": "/action", "by": 1}]}
    ]}});
    east.start_saga(&saga("order-3", vec![step("take", "east"), reserve]))
        .unwrap();
    settle(&east, &west, "order-3");
    let view = east.saga("order-3").unwrap().unwrap();
    assert_eq!(view.state.status(), SagaStatus::Compensated);
    assert!(view.state.records[1]
        .error
        .as_deref()
        .unwrap()
        .contains("insufficient rights"));
    assert_eq!(effects(&east, "take"), (1, 1));
    assert_eq!(effects(&west, "reserve"), (0, 0));
}

#[test]
fn functions_external_calls_and_deadlines() {
    let clock = Arc::new(TestClock(AtomicI64::new(1_000_000)));
    let mut east_options = options("east");
    east_options.clock = clock.clone();
    east_options.saga_fns = Arc::new(SagaFns::default().with("note", |call| {
        Ok(vec![TxnDoc {
            id: format!("notes/{}", call.saga.id).parse().unwrap(),
            ops: serde_json::from_value(
                json!([{"op": "set", "path": "/by", "value": call.saga.def.steps[call.step].name}]),
            )
            .unwrap(),
            precondition: Precondition::none(),
        }])
    }));
    let east = open(east_options, Arc::new(Memory::new()));
    let def: SagaDef = serde_json::from_value(json!({"id": "pay-1", "steps": [
        {"name": "note", "site": "east", "fn": "note"},
        {"name": "charge", "site": "east", "http": {"url": "http://127.0.0.1:9/pay", "body": {"n": 1}},
         "compensate_http": {"url": "http://127.0.0.1:9/refund"}},
        {"name": "missing", "site": "east", "fn": "nowhere"}
    ]}))
    .unwrap();
    let (_, run) = east.start_saga(&def).unwrap();
    assert_eq!(run.done, ["note"]);
    assert_eq!(
        east.read_json(&id("notes/pay-1"), None)
            .unwrap()
            .unwrap()
            .value,
        json!({"by": "note"})
    );
    let due = run.external.expect("the call is due here");
    assert_eq!(
        (due.name.as_str(), due.key.as_str()),
        ("charge", "pay-1/charge")
    );
    assert_eq!(east.saga_external_try(&due).unwrap(), Some(1));
    assert_eq!(east.saga_external_try(&due).unwrap(), Some(2));
    let view = east.saga("pay-1").unwrap().unwrap();
    assert_eq!(view.state.records[1].status, StepState::Running);
    // After a restart the call is handed out again, with the same key.
    let again = east.run_saga("pay-1").unwrap().external.unwrap();
    assert_eq!((again.key.as_str(), again.attempts), ("pay-1/charge", 2));
    // It went through; the next step names a function nobody registered:
    // it fails, and the charge is refunded.
    let run = east
        .saga_external_done(&due, &ExternalOutcome::Done)
        .unwrap();
    assert_eq!(run.failed, ["missing"]);
    let refund = run.external.expect("the refund is due");
    assert_eq!(refund.key, "pay-1/charge/compensate");
    assert!(refund.compensate);
    let run = east
        .saga_external_done(&refund, &ExternalOutcome::Done)
        .unwrap();
    assert!(run.external.is_none());
    let view = east.saga("pay-1").unwrap().unwrap();
    assert!(view.state.records[2]
        .error
        .as_deref()
        .unwrap()
        .contains("nowhere"));
    // The function step has no compensation, so the saga is compensated.
    assert_eq!(view.state.status(), SagaStatus::Compensated);
    // A done call reported twice changes nothing the second time.
    let heads = east.heads(&id("sagas/pay-1"));
    east.saga_external_done(&refund, &ExternalOutcome::Done)
        .unwrap();
    assert_eq!(east.heads(&id("sagas/pay-1")), heads);

    // A deadline: the step at a site that comes too late fails unstarted.
    let west_clock = Arc::new(TestClock(AtomicI64::new(1_000_000)));
    let mut west_options = options("west");
    west_options.clock = west_clock.clone();
    let west = open(west_options, Arc::new(Memory::new()));
    counters(&east, &["take", "reserve"]);
    exchange(&east, &west);
    let mut late = saga(
        "late-1",
        vec![step("take", "east"), step("reserve", "west")],
    );
    late.deadline_ms = Some(5_000);
    east.start_saga(&late).unwrap();
    west_clock.0.store(1_010_000, Ordering::SeqCst);
    exchange(&east, &west);
    assert_eq!(west.run_saga("late-1").unwrap().failed, ["reserve"]);
    settle(&east, &west, "late-1");
    let view = east.saga("late-1").unwrap().unwrap();
    assert_eq!(view.state.status(), SagaStatus::Compensated);
    assert!(view.state.records[1]
        .error
        .as_deref()
        .unwrap()
        .contains("deadline"));
    assert_eq!(effects(&east, "take"), (1, 1));
    assert_eq!(effects(&west, "reserve"), (0, 0));
}

#[test]
fn a_failed_store_write_runs_the_step_later_once_and_a_restore_holds_steps() {
    let store = Arc::new(Faulty::new(Memory::new()));
    let east = open(options("east"), store.clone());
    let west = replica("west");
    counters(&west, &["take", "reserve"]);
    let def = saga(
        "order-4",
        vec![step("take", "west"), step("reserve", "east")],
    );
    west.start_saga(&def).unwrap();
    send(&west, &east);
    let mut events = east.subscribe();
    store.set_fail_commits(true);
    assert!(east.run_saga("order-4").is_err(), "the write fails");
    assert!(
        events.try_recv().is_err(),
        "nothing of the step was published"
    );
    assert_eq!(effects(&east, "reserve"), (0, 0));
    store.set_fail_commits(false);
    assert_eq!(east.run_saga("order-4").unwrap().done, ["reserve"]);
    // A restart finds it done.
    drop(events);
    drop(east);
    let east = open(options("east"), store.clone());
    assert!(east.run_saga("order-4").unwrap().is_empty());
    assert_eq!(effects(&east, "reserve"), (1, 0));

    // A store restored from a backup holds steps until released.
    let def = saga(
        "order-5",
        vec![step("take", "west"), step("reserve", "east")],
    );
    west.start_saga(&def).unwrap();
    drop(east);
    store
        .commit(vec![Write::PutMeta {
            key: archipelago::store::RESOLUTIONS_HELD_KEY.to_owned(),
            value: vec![0; 8],
        }])
        .unwrap();
    let east = open(options("east"), store);
    send(&west, &east);
    assert!(east.run_saga("order-5").unwrap().held);
    assert_eq!(
        effects(&east, "reserve"),
        (1, 0),
        "order-5's step did not run"
    );
    east.release_resolutions().unwrap();
    assert_eq!(east.run_saga("order-5").unwrap().done, ["reserve"]);
}

#[test]
fn leading_steps_at_the_starting_site_commit_with_the_saga_or_run_one_by_one() {
    let store = Arc::new(Faulty::new(Memory::new()));
    let east = open(options("east"), store.clone());
    counters(&east, &["a", "b", "c", "d", "e"]);
    // Three steps here: one write for the saga and all three.
    let before = store.commits();
    let (view, run) = east
        .start_saga(&saga(
            "local-1",
            vec![step("a", "east"), step("b", "east"), step("c", "east")],
        ))
        .unwrap();
    assert_eq!(store.commits() - before, 1);
    assert_eq!(run.done, ["a", "b", "c"]);
    assert_eq!(view.state.status(), SagaStatus::Done);
    assert!(view.changes.iter().all(Option::is_some));
    for name in ["a", "b", "c"] {
        assert_eq!(effects(&east, name), (1, 0), "{name}");
    }
    // The second step cannot hold: the saga starts alone, the first step
    // runs, the second fails, the first is compensated: once each.
    let mut failing = step("e", "east");
    failing["txn"]["docs"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "effects/a", "if_absent": true}));
    let (view, run) = east
        .start_saga(&saga("local-2", vec![step("d", "east"), failing]))
        .unwrap();
    assert_eq!(run.done, ["d"]);
    assert_eq!(run.failed, ["e"]);
    assert_eq!(run.compensated, ["d"]);
    assert_eq!(view.state.status(), SagaStatus::Compensated);
    assert_eq!(effects(&east, "d"), (1, 1));
    assert_eq!(effects(&east, "e"), (0, 0));
    // What creating answers is what reading back gives.
    let (created, ran) = east
        .create_and_run_leading(
            &saga("local-3", vec![step("a", "east"), step("b", "west")]),
            Vec::new(),
        )
        .unwrap();
    assert_eq!(ran, ["a"]);
    assert_eq!(created, east.saga("local-3").unwrap().unwrap());
    let created = east
        .create_saga(&saga("local-4", vec![step("a", "east")]), Vec::new())
        .unwrap();
    assert_eq!(created, east.saga("local-4").unwrap().unwrap());
}
