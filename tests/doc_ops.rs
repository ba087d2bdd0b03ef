//! Property tests of the JSON-pointer op layer against a plain-JSON model,
//! plus the JSON write/read round trip and batch atomicity.

use std::sync::Arc;

use archipelago::doc::Op;
use archipelago::store::Memory;
use archipelago::{DocId, Replica, ReplicaOptions};
use proptest::prelude::*;
use serde_json::{json, Value};

fn replica() -> Replica {
    Replica::open(
        ReplicaOptions::new("test-site".parse().unwrap()),
        Arc::new(Memory::new()),
    )
    .unwrap()
}

fn doc() -> DocId {
    "props/doc".parse().unwrap()
}

/// The ops the model understands, over a small space of keys so that ops
/// collide often.
#[derive(Debug, Clone)]
enum ModelOp {
    SetMap(u8, i64),
    DelMap(u8),
    SetList(usize, i64),
    AppendList(i64),
    InsertList(usize, i64),
    DelList(usize),
    Inc(u8, i64),
    Splice(usize, usize, String),
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        (0u8..4, -50i64..50).prop_map(|(k, v)| ModelOp::SetMap(k, v)),
        (0u8..4).prop_map(ModelOp::DelMap),
        (0usize..6, -50i64..50).prop_map(|(i, v)| ModelOp::SetList(i, v)),
        (-50i64..50).prop_map(ModelOp::AppendList),
        (0usize..6, -50i64..50).prop_map(|(i, v)| ModelOp::InsertList(i, v)),
        (0usize..6).prop_map(ModelOp::DelList),
        (0u8..3, -5i64..5).prop_map(|(k, by)| ModelOp::Inc(k, by)),
        (0usize..8, 0usize..4, "[a-zé😀]{0,3}").prop_map(|(i, d, t)| ModelOp::Splice(i, d, t)),
    ]
}

impl ModelOp {
    fn to_op(&self) -> Op {
        let parse = |v: Value| serde_json::from_value::<Op>(v).unwrap();
        match self {
            ModelOp::SetMap(k, v) => {
                parse(json!({"op": "set", "path": format!("/m/k{k}"), "value": v}))
            }
            ModelOp::DelMap(k) => parse(json!({"op": "del", "path": format!("/m/k{k}")})),
            ModelOp::SetList(i, v) => {
                parse(json!({"op": "set", "path": format!("/l/{i}"), "value": v}))
            }
            ModelOp::AppendList(v) => parse(json!({"op": "set", "path": "/l/-", "value": v})),
            ModelOp::InsertList(i, v) => {
                parse(json!({"op": "insert", "path": format!("/l/{i}"), "value": v}))
            }
            ModelOp::DelList(i) => parse(json!({"op": "del", "path": format!("/l/{i}")})),
            ModelOp::Inc(k, by) => parse(json!({"op": "inc", "path": format!("/c{k}"), "by": by})),
            ModelOp::Splice(i, d, t) => {
                parse(json!({"op": "splice", "path": "/t", "index": i, "delete": d, "text": t}))
            }
        }
    }

    /// Applies the op to the model; `false` when the op must be refused.
    fn apply(&self, model: &mut Value) -> bool {
        match self {
            ModelOp::SetMap(k, v) => {
                model["m"][format!("k{k}")] = json!(v);
                true
            }
            ModelOp::DelMap(k) => model["m"]
                .as_object_mut()
                .unwrap()
                .remove(&format!("k{k}"))
                .is_some(),
            ModelOp::SetList(i, v) => {
                let list = model["l"].as_array_mut().unwrap();
                if *i < list.len() {
                    list[*i] = json!(v);
                } else if *i == list.len() {
                    list.push(json!(v));
                } else {
                    return false;
                }
                true
            }
            ModelOp::AppendList(v) => {
                model["l"].as_array_mut().unwrap().push(json!(v));
                true
            }
            ModelOp::InsertList(i, v) => {
                let list = model["l"].as_array_mut().unwrap();
                if *i > list.len() {
                    return false;
                }
                list.insert(*i, json!(v));
                true
            }
            ModelOp::DelList(i) => {
                let list = model["l"].as_array_mut().unwrap();
                if *i >= list.len() {
                    return false;
                }
                list.remove(*i);
                true
            }
            ModelOp::Inc(k, by) => {
                let key = format!("c{k}");
                model[&key] = json!(model[&key].as_i64().unwrap() + by);
                true
            }
            ModelOp::Splice(i, d, t) => {
                let chars: Vec<char> = model["t"].as_str().unwrap().chars().collect();
                if *i > chars.len() || i + d > chars.len() {
                    return false;
                }
                let mut out: String = chars[..*i].iter().collect();
                out.push_str(t);
                out.extend(&chars[i + d..]);
                model["t"] = json!(out);
                true
            }
        }
    }
}

fn setup(replica: &Replica) -> Value {
    let ops: Vec<Op> = serde_json::from_value(json!([
        {"op": "set", "path": "/m", "value": {}},
        {"op": "set", "path": "/l", "value": []},
        {"op": "set", "path": "/t", "value": "", "as": "text"},
        {"op": "set", "path": "/c0", "value": 0, "as": "counter"},
        {"op": "set", "path": "/c1", "value": 10, "as": "counter"},
        {"op": "set", "path": "/c2", "value": -3, "as": "counter"},
    ]))
    .unwrap();
    replica.apply_ops(&doc(), &ops, Some("setup")).unwrap();
    json!({"m": {}, "l": [], "t": "", "c0": 0, "c1": 10, "c2": -3})
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn ops_match_a_json_model(ops in proptest::collection::vec(model_op(), 1..40)) {
        let replica = replica();
        let mut model = setup(&replica);
        for op in ops {
            let before = replica.heads(&doc()).unwrap();
            let accepted = op.apply(&mut model);
            let result = replica.apply_ops(&doc(), &[op.to_op()], None);
            prop_assert_eq!(result.is_ok(), accepted, "op {:?}: {:?}", op, result);
            if !accepted {
                prop_assert_eq!(replica.heads(&doc()).unwrap(), before);
            }
            prop_assert_eq!(&replica.read_json(&doc(), None).unwrap().unwrap().value, &model);
        }
    }

    #[test]
    fn a_batch_with_a_failing_op_changes_nothing(
        ops in proptest::collection::vec(model_op(), 1..10),
        bad_at in 0usize..10,
    ) {
        let replica = replica();
        setup(&replica);
        let before = replica.read_json(&doc(), None).unwrap().unwrap();
        let mut batch: Vec<Op> = ops.iter().map(ModelOp::to_op).collect();
        let bad: Op = serde_json::from_value(json!({"op": "inc", "path": "/m"})).unwrap();
        batch.insert(bad_at.min(batch.len()), bad);
        prop_assert!(replica.apply_ops(&doc(), &batch, None).is_err());
        prop_assert_eq!(replica.read_json(&doc(), None).unwrap().unwrap(), before);
    }

    #[test]
    fn json_values_round_trip_and_rewrites_are_empty(value in json_object(), next in json_object()) {
        let replica = replica();
        replica.put_json(&doc(), &value, None).unwrap();
        prop_assert_eq!(&replica.read_json(&doc(), None).unwrap().unwrap().value, &value);
        let again = replica.put_json(&doc(), &value, None).unwrap();
        prop_assert_eq!(again.change, None, "writing the same value again changes nothing");
        replica.put_json(&doc(), &next, None).unwrap();
        prop_assert_eq!(&replica.read_json(&doc(), None).unwrap().unwrap().value, &next);
    }
}

fn json_object() -> impl Strategy<Value = Value> {
    let scalar = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(|f| json!(f)),
        "[a-z ]{0,8}".prop_map(Value::from),
    ];
    let tree = scalar.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-c]{1,2}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    proptest::collection::btree_map("[a-e]{1,2}", tree, 0..5)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

#[test]
fn set_creates_missing_parent_maps_but_not_through_scalars() {
    let replica = replica();
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": "/a/b/c", "value": 1}])).unwrap();
    replica.apply_ops(&doc(), &ops, None).unwrap();
    assert_eq!(
        replica.read_json(&doc(), None).unwrap().unwrap().value,
        json!({"a": {"b": {"c": 1}}})
    );
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": "/a/b/c/d", "value": 1}])).unwrap();
    let err = replica.apply_ops(&doc(), &ops, None).unwrap_err();
    assert!(
        matches!(err, archipelago::Error::Op(ref e) if e.code() == "not_a_container"),
        "{err}"
    );
}

#[test]
fn escaped_pointer_segments_address_keys_with_slashes() {
    let replica = replica();
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": "/a~1b/c~0d", "value": true}]))
            .unwrap();
    replica.apply_ops(&doc(), &ops, None).unwrap();
    assert_eq!(
        replica.read_json(&doc(), None).unwrap().unwrap().value,
        json!({"a/b": {"c~d": true}})
    );
}

#[test]
fn putting_a_number_on_a_counter_keeps_it_a_counter() {
    let replica = replica();
    let ops: Vec<Op> = serde_json::from_value(
        json!([{"op": "set", "path": "/stock", "value": 5, "as": "counter"}]),
    )
    .unwrap();
    replica.apply_ops(&doc(), &ops, None).unwrap();
    replica
        .put_json(&doc(), &json!({"stock": 3}), None)
        .unwrap();
    let inc: Vec<Op> =
        serde_json::from_value(json!([{"op": "inc", "path": "/stock", "by": 2}])).unwrap();
    replica.apply_ops(&doc(), &inc, None).unwrap();
    assert_eq!(
        replica.read_json(&doc(), None).unwrap().unwrap().value,
        json!({"stock": 5})
    );
}

#[test]
fn misspelled_op_fields_are_refused() {
    let typo = serde_json::from_value::<Op>(
        json!({"op": "set", "path": "/a", "value": 1, "ass": "counter"}),
    );
    assert!(typo.is_err());
    let ok = serde_json::from_value::<Op>(
        json!({"op": "set", "path": "/a", "value": 1, "as": "counter"}),
    );
    assert!(ok.is_ok());
    let splice = serde_json::from_value::<Op>(
        json!({"op": "splice", "path": "/t", "index": 0, "text": "x"}),
    );
    assert!(splice.is_ok(), "optional fields may be left out");
}
