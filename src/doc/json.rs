//! The JSON view of a document (counters read as numbers, text as strings)
//! and the field-by-field reconcile of a whole JSON value into a document.

use automerge::transaction::Transactable;
use automerge::{hydrate, ChangeHash, ObjId, ObjType, ScalarValue, Value};

use super::ops::{check_depth, scalar_from_json};
use super::OpError;

/// The whole document as JSON, now or as of `heads` (which the caller has
/// checked the document knows).
/// Root keys reserved for conflict reports are left out.
pub fn to_json(doc: &automerge::Automerge, heads: Option<&[ChangeHash]>) -> serde_json::Value {
    let mut value = hydrated_to_json(&doc.hydrate(heads));
    if let serde_json::Value::Object(map) = &mut value {
        map.retain(|key, _| !crate::conflict::is_reserved_key(key));
    }
    value
}

/// Converts a hydrated automerge value to JSON.
pub fn hydrated_to_json(value: &hydrate::Value) -> serde_json::Value {
    match value {
        hydrate::Value::Map(map) => serde_json::Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), hydrated_to_json(&v.value)))
                .collect(),
        ),
        hydrate::Value::List(list) => {
            serde_json::Value::Array(list.iter().map(|v| hydrated_to_json(&v.value)).collect())
        }
        hydrate::Value::Text(text) => serde_json::Value::String(text.to_string()),
        hydrate::Value::Scalar(scalar) => scalar_to_json(scalar),
    }
}

/// Converts an automerge scalar to JSON: counters and timestamps become
/// numbers, bytes a hex string, non-finite floats and unknown types null.
pub fn scalar_to_json(scalar: &ScalarValue) -> serde_json::Value {
    match scalar {
        ScalarValue::Bytes(b) => serde_json::Value::String(hex::encode(b)),
        ScalarValue::Str(s) => serde_json::Value::String(s.to_string()),
        ScalarValue::Int(i) => (*i).into(),
        ScalarValue::Uint(u) => (*u).into(),
        ScalarValue::F64(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        ScalarValue::Counter(c) => i64::from(c).into(),
        ScalarValue::Timestamp(t) => (*t).into(),
        ScalarValue::Boolean(b) => (*b).into(),
        ScalarValue::Unknown { .. } | ScalarValue::Null => serde_json::Value::Null,
    }
}

/// Makes the document's root equal `value` (a JSON object), changing only
/// what differs: equal scalars are left alone, nested maps and lists are
/// updated in place, text is diffed, and a counter given a new number is
/// incremented by the difference so concurrent increments still add up.
pub fn reconcile_root<T: Transactable>(
    tx: &mut T,
    value: &serde_json::Value,
) -> Result<(), OpError> {
    check_depth(value)?;
    let serde_json::Value::Object(map) = value else {
        return Err(OpError::BadValue(
            "a document value must be a JSON object".to_owned(),
        ));
    };
    if let Some(key) = map.keys().find(|k| crate::conflict::is_reserved_key(k)) {
        return Err(OpError::BadValue(format!(
            "root key {key:?} is reserved for conflict reports"
        )));
    }
    reconcile_map(tx, &automerge::ROOT, map)
}

fn reconcile_map<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    new: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), OpError> {
    // Reserved root keys (conflict reports) are not the caller's to delete.
    let stale: Vec<String> = tx
        .keys(obj)
        .filter(|key| !new.contains_key(key.as_str()))
        .filter(|key| *obj != automerge::ROOT || !crate::conflict::is_reserved_key(key))
        .collect();
    for key in stale {
        tx.delete(obj, key.as_str())?;
    }
    for (key, value) in new {
        let prop: automerge::Prop = key.as_str().into();
        reconcile_entry(tx, obj, prop, value)?;
    }
    Ok(())
}

fn reconcile_list<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    new: &[serde_json::Value],
) -> Result<(), OpError> {
    let old_len = tx.length(obj);
    for (i, value) in new.iter().enumerate().take(old_len) {
        reconcile_entry(tx, obj, i.into(), value)?;
    }
    for i in (new.len()..old_len).rev() {
        tx.delete(obj, i)?;
    }
    for (i, value) in new.iter().enumerate().skip(old_len) {
        insert_json(tx, obj, i, value)?;
    }
    Ok(())
}

/// Updates an existing map entry or list element (or a missing map key).
fn reconcile_entry<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: automerge::Prop,
    value: &serde_json::Value,
) -> Result<(), OpError> {
    let existing = tx
        .get(obj, prop.clone())?
        .map(|(v, id)| (v.into_owned(), id));
    match (existing, value) {
        (
            Some((Value::Object(ObjType::Map | ObjType::Table), id)),
            serde_json::Value::Object(m),
        ) => reconcile_map(tx, &id, m),
        (Some((Value::Object(ObjType::List), id)), serde_json::Value::Array(items)) => {
            reconcile_list(tx, &id, items)
        }
        (Some((Value::Object(ObjType::Text), id)), serde_json::Value::String(s)) => {
            tx.update_text(&id, s)?;
            Ok(())
        }
        (Some((Value::Scalar(old), _)), new) if !new.is_object() && !new.is_array() => {
            match (old.as_ref(), new.as_i64()) {
                (ScalarValue::Counter(c), Some(target)) => {
                    let delta = target.wrapping_sub(i64::from(c));
                    if delta != 0 {
                        tx.increment(obj, prop, delta)?;
                    }
                }
                (old, _) => {
                    let new = scalar_from_json(new);
                    if !same_scalar(old, &new) {
                        tx.put(obj, prop, new)?;
                    }
                }
            }
            Ok(())
        }
        (_, value) => put_json(tx, obj, prop, value),
    }
}

/// Equal as JSON sees them: an `Int(5)` and a `Uint(5)` are the same number.
fn same_scalar(old: &ScalarValue, new: &ScalarValue) -> bool {
    old == new || scalar_to_json(old) == scalar_to_json(new)
}

fn put_json<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: automerge::Prop,
    value: &serde_json::Value,
) -> Result<(), OpError> {
    match value {
        serde_json::Value::Object(map) => {
            let child = tx.put_object(obj, prop, ObjType::Map)?;
            reconcile_map(tx, &child, map)
        }
        serde_json::Value::Array(items) => {
            let child = tx.put_object(obj, prop, ObjType::List)?;
            reconcile_list(tx, &child, items)
        }
        scalar => {
            tx.put(obj, prop, scalar_from_json(scalar))?;
            Ok(())
        }
    }
}

fn insert_json<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    index: usize,
    value: &serde_json::Value,
) -> Result<(), OpError> {
    match value {
        serde_json::Value::Object(map) => {
            let child = tx.insert_object(obj, index, ObjType::Map)?;
            reconcile_map(tx, &child, map)
        }
        serde_json::Value::Array(items) => {
            let child = tx.insert_object(obj, index, ObjType::List)?;
            reconcile_list(tx, &child, items)
        }
        scalar => {
            tx.insert(obj, index, scalar_from_json(scalar))?;
            Ok(())
        }
    }
}
