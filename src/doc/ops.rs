//! Document operations addressed by JSON pointer (`set`, `inc`, `del`,
//! `insert`, `splice`) and their application to an automerge transaction.
//!
//! Ops are applied in order inside one transaction; the caller rolls the
//! transaction back when any op fails, so a batch is all-or-nothing.

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, ScalarValue, Value};
use serde::{Deserialize, Serialize};

use super::path::{clip, parse_list_index, ListIndex, Pointer};
use super::OpError;

/// Most ops accepted in one batch.
pub const OPS_PER_BATCH_MAX: usize = 10_000;
/// Deepest JSON value accepted in a write.
pub const VALUE_DEPTH_MAX: usize = 64;

/// How a JSON value is stored when the plain mapping is not wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueKind {
    /// An integer stored as a counter: concurrent increments add up.
    Counter,
    /// A string stored as collaborative text: concurrent splices merge.
    Text,
    /// An integer stored as a bounded counter (with `min` and optionally
    /// `max`): see [`crate::escrow`]. Only a replica creates one, since the
    /// rights go to its site.
    Bounded,
}

/// One operation on a document. The JSON form is the HTTP API's:
/// `{"op": "set", "path": "/stock", "value": 5, "as": "counter"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Op {
    /// Writes `value` at `path`, creating missing parent maps; `/-` appends
    /// to a list.
    Set {
        /// Where to write.
        path: String,
        /// What to write.
        value: serde_json::Value,
        /// Store as a counter or text instead of the plain mapping.
        #[serde(rename = "as", default, skip_serializing_if = "Option::is_none")]
        kind: Option<ValueKind>,
        /// The lower bound of a bounded counter (`"as": "bounded"` only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<i64>,
        /// The upper bound of a bounded counter, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<i64>,
    },
    /// Adds `by` to the counter at `path`.
    Inc {
        /// The counter.
        path: String,
        /// The amount, may be negative.
        #[serde(default = "one")]
        by: i64,
    },
    /// Deletes the map key or list element at `path`.
    Del {
        /// What to delete.
        path: String,
    },
    /// Inserts `value` into a list at `/list/INDEX` (or `/list/-`).
    Insert {
        /// The list position.
        path: String,
        /// What to insert.
        value: serde_json::Value,
        /// Store as a counter or text instead of the plain mapping.
        #[serde(rename = "as", default, skip_serializing_if = "Option::is_none")]
        kind: Option<ValueKind>,
    },
    /// Replaces `delete` characters at `index` of the text at `path` with
    /// `text`. Indexes count Unicode code points.
    Splice {
        /// The text object.
        path: String,
        /// Where the splice starts.
        index: usize,
        /// How many characters to remove.
        #[serde(default)]
        delete: usize,
        /// What to insert.
        #[serde(default)]
        text: String,
    },
}

fn one() -> i64 {
    1
}

impl Op {
    /// The op's path as written.
    pub fn path(&self) -> &str {
        match self {
            Op::Set { path, .. }
            | Op::Inc { path, .. }
            | Op::Del { path }
            | Op::Insert { path, .. }
            | Op::Splice { path, .. } => path,
        }
    }
}

/// Applies `ops` in order. On error the transaction holds a partial batch
/// and must be rolled back by the caller.
pub fn apply_ops<T: Transactable>(tx: &mut T, ops: &[Op]) -> Result<(), OpError> {
    if ops.len() > OPS_PER_BATCH_MAX {
        return Err(OpError::BadValue(format!(
            "more than {OPS_PER_BATCH_MAX} ops in one batch"
        )));
    }
    for op in ops {
        apply_op(tx, op)?;
    }
    Ok(())
}

/// Applies one op; on error the transaction may hold part of it. Bounded
/// counters are not known here: [`crate::escrow::apply_ops`] routes ops on
/// them.
pub(crate) fn apply_op<T: Transactable>(tx: &mut T, op: &Op) -> Result<(), OpError> {
    let pointer = Pointer::parse(op.path())?;
    let Some((parents, last)) = pointer.split_last() else {
        return Err(OpError::BadPath {
            path: String::new(),
            reason: "ops address a field; write the whole document with PUT".to_owned(),
        });
    };
    if pointer
        .segments()
        .first()
        .is_some_and(|first| crate::conflict::is_reserved_key(first))
    {
        return Err(OpError::BadPath {
            path: clip(op.path()),
            reason: format!(
                "root keys starting with {:?} are reserved for conflict reports",
                crate::conflict::RESERVED_PREFIX
            ),
        });
    }
    let create_maps = matches!(op, Op::Set { .. });
    let (parent, parent_type) = walk(tx, &pointer, parents, create_maps)?;
    match op {
        Op::Set {
            value,
            kind,
            min,
            max,
            ..
        } => {
            check_depth(value)?;
            if (min.is_some() || max.is_some()) && *kind != Some(ValueKind::Bounded) {
                return Err(OpError::BadValue(format!(
                    "{pointer}: \"min\" and \"max\" go with \"as\": \"bounded\""
                )));
            }
            match parent_type {
                ObjType::Map | ObjType::Table => {
                    write_value(tx, &parent, Slot::Key(last), value, *kind, &pointer)
                }
                ObjType::List => {
                    let len = tx.length(&parent);
                    match list_index(last, &pointer)? {
                        ListIndex::At(i) if i < len => {
                            write_value(tx, &parent, Slot::Replace(i), value, *kind, &pointer)
                        }
                        ListIndex::At(i) if i == len => {
                            write_value(tx, &parent, Slot::Insert(i), value, *kind, &pointer)
                        }
                        ListIndex::End => {
                            write_value(tx, &parent, Slot::Insert(len), value, *kind, &pointer)
                        }
                        ListIndex::At(i) => Err(out_of_range(&pointer, i, len)),
                    }
                }
                ObjType::Text => Err(not_container(&pointer)),
            }
        }
        Op::Insert { value, kind, .. } => {
            check_depth(value)?;
            if parent_type != ObjType::List {
                return Err(OpError::Mismatch {
                    path: pointer.to_string(),
                    code: "not_a_list",
                    reason: "insert needs a list position such as /items/0 or /items/-".to_owned(),
                });
            }
            let len = tx.length(&parent);
            let index = match list_index(last, &pointer)? {
                ListIndex::At(i) if i <= len => i,
                ListIndex::At(i) => return Err(out_of_range(&pointer, i, len)),
                ListIndex::End => len,
            };
            write_value(tx, &parent, Slot::Insert(index), value, *kind, &pointer)
        }
        Op::Inc { by, .. } => {
            let prop = existing_prop(tx, &parent, parent_type, last, &pointer)?;
            match tx.get(&parent, prop.clone())? {
                Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_)) => {
                    tx.increment(&parent, prop, *by)?;
                    Ok(())
                }
                Some(_) => Err(OpError::Mismatch {
                    path: pointer.to_string(),
                    code: "not_a_counter",
                    reason: "inc needs a counter (write it with \"as\": \"counter\")".to_owned(),
                }),
                None => Err(not_found(&pointer)),
            }
        }
        Op::Del { .. } => {
            let prop = existing_prop(tx, &parent, parent_type, last, &pointer)?;
            if tx.get(&parent, prop.clone())?.is_none() {
                return Err(not_found(&pointer));
            }
            tx.delete(&parent, prop)?;
            Ok(())
        }
        Op::Splice {
            index,
            delete,
            text,
            ..
        } => {
            let prop = existing_prop(tx, &parent, parent_type, last, &pointer)?;
            let text_obj = match tx.get(&parent, prop)? {
                Some((Value::Object(ObjType::Text), id)) => id,
                Some(_) => {
                    return Err(OpError::Mismatch {
                        path: pointer.to_string(),
                        code: "not_text",
                        reason: "splice needs a text object (write it with \"as\": \"text\")"
                            .to_owned(),
                    })
                }
                None => return Err(not_found(&pointer)),
            };
            let len = tx.length(&text_obj);
            let end = index.checked_add(*delete).unwrap_or(usize::MAX);
            if *index > len || end > len {
                return Err(OpError::Mismatch {
                    path: pointer.to_string(),
                    code: "index_out_of_range",
                    reason: format!("splice {index}+{delete} outside text of length {len}"),
                });
            }
            let delete = isize::try_from(*delete).map_err(|_| out_of_range(&pointer, end, len))?;
            tx.splice_text(&text_obj, *index, delete, text)?;
            Ok(())
        }
    }
}

/// Follows `segments` from the root; with `create_maps`, missing map keys
/// become new maps (for `set`).
fn walk<T: Transactable>(
    tx: &mut T,
    pointer: &Pointer,
    segments: &[String],
    create_maps: bool,
) -> Result<(ObjId, ObjType), OpError> {
    let mut obj = automerge::ROOT;
    let mut obj_type = ObjType::Map;
    for (depth, segment) in segments.iter().enumerate() {
        let here = || Pointer::from_segments(&segments[..=depth]).to_string();
        let prop: automerge::Prop = match obj_type {
            ObjType::Map | ObjType::Table => segment.as_str().into(),
            ObjType::List => match parse_list_index(segment) {
                Some(ListIndex::At(i)) if i < tx.length(&obj) => i.into(),
                Some(ListIndex::At(_)) | Some(ListIndex::End) => {
                    return Err(OpError::PathNotFound { path: here() })
                }
                None => return Err(bad_index(pointer, segment)),
            },
            ObjType::Text => return Err(not_container_at(here())),
        };
        match tx.get(&obj, prop.clone())? {
            Some((Value::Object(child_type), child)) => {
                obj = child;
                obj_type = child_type;
            }
            Some((Value::Scalar(_), _)) => {
                return Err(not_container_at(
                    Pointer::from_segments(&segments[..=depth]).to_string(),
                ))
            }
            None if create_maps && matches!(obj_type, ObjType::Map | ObjType::Table) => {
                obj = tx.put_object(&obj, prop, ObjType::Map)?;
                obj_type = ObjType::Map;
            }
            None => return Err(OpError::PathNotFound { path: here() }),
        }
    }
    Ok((obj, obj_type))
}

/// The prop of an existing entry named by the last segment.
fn existing_prop<T: Transactable>(
    tx: &T,
    parent: &ObjId,
    parent_type: ObjType,
    last: &str,
    pointer: &Pointer,
) -> Result<automerge::Prop, OpError> {
    match parent_type {
        ObjType::Map | ObjType::Table => Ok(last.into()),
        ObjType::List => match list_index(last, pointer)? {
            ListIndex::At(i) if i < tx.length(parent) => Ok(i.into()),
            _ => Err(not_found(pointer)),
        },
        ObjType::Text => Err(not_container(pointer)),
    }
}

/// Where a value goes in its parent.
#[derive(Debug, Clone, Copy)]
enum Slot<'a> {
    Key(&'a str),
    Replace(usize),
    Insert(usize),
}

/// Writes a JSON value as new automerge data at `slot`.
fn write_value<T: Transactable>(
    tx: &mut T,
    parent: &ObjId,
    slot: Slot<'_>,
    value: &serde_json::Value,
    kind: Option<ValueKind>,
    pointer: &Pointer,
) -> Result<(), OpError> {
    match kind {
        Some(ValueKind::Counter) => {
            let n = value.as_i64().ok_or_else(|| {
                OpError::BadValue(format!("{pointer}: a counter needs an integer value"))
            })?;
            put_scalar(tx, parent, slot, ScalarValue::counter(n))
        }
        Some(ValueKind::Bounded) => Err(OpError::BadValue(format!(
            "{pointer}: a bounded counter is created through a replica (it gives the rights to \
             the replica's site), and in maps only"
        ))),
        Some(ValueKind::Text) => {
            let s = value.as_str().ok_or_else(|| {
                OpError::BadValue(format!("{pointer}: text needs a string value"))
            })?;
            let text = put_object(tx, parent, slot, ObjType::Text)?;
            tx.splice_text(&text, 0, 0, s)?;
            Ok(())
        }
        None => write_json(tx, parent, slot, value),
    }
}

fn write_json<T: Transactable>(
    tx: &mut T,
    parent: &ObjId,
    slot: Slot<'_>,
    value: &serde_json::Value,
) -> Result<(), OpError> {
    match value {
        serde_json::Value::Object(map) => {
            let obj = put_object(tx, parent, slot, ObjType::Map)?;
            for (key, child) in map {
                write_json(tx, &obj, Slot::Key(key), child)?;
            }
            Ok(())
        }
        serde_json::Value::Array(items) => {
            let obj = put_object(tx, parent, slot, ObjType::List)?;
            for (i, child) in items.iter().enumerate() {
                write_json(tx, &obj, Slot::Insert(i), child)?;
            }
            Ok(())
        }
        scalar => put_scalar(tx, parent, slot, scalar_from_json(scalar)),
    }
}

/// The automerge scalar for a JSON scalar (objects and arrays excluded).
pub(crate) fn scalar_from_json(value: &serde_json::Value) -> ScalarValue {
    match value {
        serde_json::Value::Null => ScalarValue::Null,
        serde_json::Value::Bool(b) => ScalarValue::Boolean(*b),
        serde_json::Value::String(s) => ScalarValue::Str(s.as_str().into()),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => ScalarValue::Null,
    }
}

fn put_scalar<T: Transactable>(
    tx: &mut T,
    parent: &ObjId,
    slot: Slot<'_>,
    value: ScalarValue,
) -> Result<(), OpError> {
    match slot {
        Slot::Key(key) => tx.put(parent, key, value)?,
        Slot::Replace(i) => tx.put(parent, i, value)?,
        Slot::Insert(i) => tx.insert(parent, i, value)?,
    }
    Ok(())
}

fn put_object<T: Transactable>(
    tx: &mut T,
    parent: &ObjId,
    slot: Slot<'_>,
    obj_type: ObjType,
) -> Result<ObjId, OpError> {
    Ok(match slot {
        Slot::Key(key) => tx.put_object(parent, key, obj_type)?,
        Slot::Replace(i) => tx.put_object(parent, i, obj_type)?,
        Slot::Insert(i) => tx.insert_object(parent, i, obj_type)?,
    })
}

/// Rejects values nested deeper than [`VALUE_DEPTH_MAX`].
pub(crate) fn check_depth(value: &serde_json::Value) -> Result<(), OpError> {
    fn depth(value: &serde_json::Value, level: usize) -> bool {
        if level > VALUE_DEPTH_MAX {
            return false;
        }
        match value {
            serde_json::Value::Object(map) => map.values().all(|v| depth(v, level + 1)),
            serde_json::Value::Array(items) => items.iter().all(|v| depth(v, level + 1)),
            _ => true,
        }
    }
    if depth(value, 0) {
        Ok(())
    } else {
        Err(OpError::BadValue(format!(
            "value nested deeper than {VALUE_DEPTH_MAX} levels"
        )))
    }
}

fn list_index(segment: &str, pointer: &Pointer) -> Result<ListIndex, OpError> {
    parse_list_index(segment).ok_or_else(|| bad_index(pointer, segment))
}

fn bad_index(pointer: &Pointer, segment: &str) -> OpError {
    OpError::BadPath {
        path: pointer.to_string(),
        reason: format!("{:?} is not a list index (digits or '-')", clip(segment)),
    }
}

fn out_of_range(pointer: &Pointer, index: usize, len: usize) -> OpError {
    OpError::Mismatch {
        path: pointer.to_string(),
        code: "index_out_of_range",
        reason: format!("index {index} outside list of length {len}"),
    }
}

fn not_found(pointer: &Pointer) -> OpError {
    OpError::PathNotFound {
        path: pointer.to_string(),
    }
}

fn not_container(pointer: &Pointer) -> OpError {
    not_container_at(pointer.to_string())
}

fn not_container_at(path: String) -> OpError {
    OpError::Mismatch {
        path,
        code: "not_a_container",
        reason: "a scalar or text cannot hold fields".to_owned(),
    }
}
