//! Detection: what a merge made conflict, found from the merge's patches and
//! the ops of the changes on either side of it (never a whole-document
//! scan).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use automerge::{
    Automerge, Change, ChangeHash, ObjId, ObjType, Patch, PatchAction, Prop, ReadDoc, Value, ROOT,
};

use automerge::legacy::OpType;

use crate::doc::json::{hydrated_to_json, scalar_to_json};
use crate::doc::Pointer;
use crate::id::{site_of_actor, DocId, SiteName};

use super::is_reserved_key;
use super::report::{Body, ConflictId, ConflictValue, Kind};
use super::rule::{Check, ConflictConfig, Rule};

/// Most list elements shown per lost write in a `delete_update` report.
const WRITES_SHOWN_MAX: usize = 100;

/// Most instances of one rule checked per merge (a `*` expanded over a
/// large collection stops here).
const RULE_INSTANCES_MAX: usize = 1024;

/// What detection needs to know about one merge.
pub(crate) struct DetectInput<'a> {
    pub(crate) doc_id: &'a DocId,
    /// The document after the merge.
    pub(crate) doc: &'a Automerge,
    /// Its heads before the merge.
    pub(crate) before: &'a [ChangeHash],
    /// The changes the merge applied, in causal order.
    pub(crate) incoming: &'a [Change],
    /// The objects (other than the root) the received changes write into,
    /// when known from decoding them earlier.
    pub(crate) written: Option<&'a [String]>,
    /// The merge's patches (relative to `before`).
    pub(crate) patches: &'a [Patch],
    pub(crate) config: &'a ConflictConfig,
    pub(crate) site: &'a SiteName,
    pub(crate) now_ms: i64,
    /// Reads another document (for `references`).
    pub(crate) lookup: &'a dyn Fn(&DocId) -> Option<Automerge>,
}

/// The reports a merge calls for, deduplicated by id.
pub(crate) fn detect(input: &DetectInput<'_>) -> Vec<Body> {
    let mut found: BTreeMap<ConflictId, Body> = BTreeMap::new();
    let doc_id = input.doc_id.as_str();
    let mut divergent = Divergent::new(input);
    if input.config.concurrent_write.enabled_for(doc_id) {
        for body in concurrent_writes(input) {
            found.entry(body.id.clone()).or_insert(body);
        }
    }
    if input.config.delete_update.enabled_for(doc_id) {
        for body in delete_updates(input, &mut divergent) {
            found.entry(body.id.clone()).or_insert(body);
        }
    }
    for rule in &input.config.rules {
        if rule.docs.matches(doc_id) {
            for body in invariant_failures(input, rule, &mut divergent) {
                found.entry(body.id.clone()).or_insert(body);
            }
        }
    }
    found.into_values().collect()
}

/// The JSON pointer of a patch's target object plus `prop`.
fn patch_pointer(patch: &Patch, prop: Option<&Prop>) -> Vec<String> {
    patch
        .path
        .iter()
        .map(|(_, p)| prop_text(p))
        .chain(prop.map(prop_text))
        .collect()
}

fn prop_text(prop: &Prop) -> String {
    match prop {
        Prop::Map(key) => key.clone(),
        Prop::Seq(index) => index.to_string(),
    }
}

/// Whether a patch is about archipelago's own keys.
fn is_reserved_patch(patch: &Patch) -> bool {
    let first = match patch.path.first() {
        Some((_, prop)) => Some(prop.clone()),
        None => match &patch.action {
            PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => {
                Some(Prop::Map(key.clone()))
            }
            PatchAction::Conflict { prop } | PatchAction::Increment { prop, .. } => {
                Some(prop.clone())
            }
            _ => None,
        },
    };
    matches!(first, Some(Prop::Map(key)) if is_reserved_key(&key))
}

/// The pointers a merge touched (outside reserved keys).
fn touched_pointers(patches: &[Patch]) -> Vec<Vec<String>> {
    let mut out: BTreeSet<Vec<String>> = BTreeSet::new();
    for patch in patches.iter().filter(|p| !is_reserved_patch(p)) {
        let prop = match &patch.action {
            PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => {
                Some(Prop::Map(key.clone()))
            }
            PatchAction::PutSeq { index, .. }
            | PatchAction::Insert { index, .. }
            | PatchAction::DeleteSeq { index, .. } => Some(Prop::Seq(*index)),
            PatchAction::Increment { prop, .. } | PatchAction::Conflict { prop } => {
                Some(prop.clone())
            }
            PatchAction::SpliceText { .. } | PatchAction::Mark { .. } => None,
        };
        out.insert(patch_pointer(patch, prop.as_ref()));
    }
    out.into_iter().collect()
}

fn pointer_text(segments: &[String]) -> String {
    Pointer::from_segments(segments).as_str().to_owned()
}

/// The value at `pointer` as JSON, now or as of `heads`; `None` when absent.
pub(crate) fn value_at(
    doc: &Automerge,
    pointer: &str,
    heads: Option<&[ChangeHash]>,
) -> Option<serde_json::Value> {
    let pointer = Pointer::parse(pointer).ok()?;
    value_at_segments(doc, pointer.segments(), heads)
}

fn value_at_segments(
    doc: &Automerge,
    segments: &[String],
    heads: Option<&[ChangeHash]>,
) -> Option<serde_json::Value> {
    let mut obj = ROOT;
    let mut typ = ObjType::Map;
    if segments.is_empty() {
        return Some(object_json(doc, &ROOT, heads));
    }
    for (i, segment) in segments.iter().enumerate() {
        let prop: Prop = match typ {
            ObjType::Map | ObjType::Table => segment.as_str().into(),
            ObjType::List => Prop::Seq(segment.parse().ok()?),
            ObjType::Text => return None,
        };
        let found = match heads {
            Some(heads) => doc.get_at(&obj, prop, heads).ok()?,
            None => doc.get(&obj, prop).ok()?,
        };
        match found? {
            (Value::Object(t), id) => {
                obj = id;
                typ = t;
            }
            (Value::Scalar(s), _) => {
                return (i + 1 == segments.len()).then(|| scalar_to_json(&s));
            }
        }
    }
    Some(object_json(doc, &obj, heads))
}

fn object_json(doc: &Automerge, obj: &ObjId, heads: Option<&[ChangeHash]>) -> serde_json::Value {
    let value = match ReadDoc::hydrate(doc, obj, heads) {
        Ok(v) => hydrated_to_json(&v),
        Err(_) => serde_json::Value::Null,
    };
    match (obj == &ROOT, value) {
        (true, serde_json::Value::Object(mut map)) => {
            map.retain(|k, _| !is_reserved_key(k));
            serde_json::Value::Object(map)
        }
        (_, value) => value,
    }
}

fn value_json(doc: &Automerge, value: &Value<'_>, id: &ObjId) -> serde_json::Value {
    match value {
        Value::Scalar(s) => scalar_to_json(s),
        Value::Object(_) => object_json(doc, id, None),
    }
}

fn actor_of(id: &ObjId) -> Option<automerge::ActorId> {
    match id {
        ObjId::Id(_, actor, _) => Some(actor.clone()),
        ObjId::Root => None,
    }
}

fn first_site<'a>(sites: impl Iterator<Item = &'a Option<SiteName>>) -> Option<SiteName> {
    sites.flatten().min().cloned()
}

fn concurrent_writes(input: &DetectInput<'_>) -> Vec<Body> {
    let doc = input.doc;
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut out = Vec::new();
    for patch in input.patches.iter().filter(|p| !is_reserved_patch(p)) {
        let prop = match &patch.action {
            PatchAction::PutMap {
                key,
                conflict: true,
                ..
            } => Prop::Map(key.clone()),
            PatchAction::PutSeq {
                index,
                conflict: true,
                ..
            } => Prop::Seq(*index),
            PatchAction::Conflict { prop } => prop.clone(),
            _ => continue,
        };
        if !seen.insert((patch.obj.to_string(), prop_text(&prop))) {
            continue;
        }
        let Ok(all) = doc.get_all(&patch.obj, prop.clone()) else {
            continue;
        };
        if all.len() < 2 {
            continue;
        }
        let mut values = Vec::with_capacity(all.len());
        let mut has_object = false;
        for (value, id) in &all {
            has_object |= value.is_object();
            let (Some(actor), Some(change)) = (actor_of(id), doc.hash_for_opid(id)) else {
                continue;
            };
            values.push(ConflictValue {
                value: value_json(doc, value, id),
                site: site_of_actor(&actor),
                actor: actor.to_hex_string(),
                change,
                txn: None,
            });
        }
        if values.len() < 2 || (!has_object && values.iter().all(|v| v.value == values[0].value)) {
            continue;
        }
        let path = pointer_text(&patch_pointer(patch, Some(&prop)));
        let provisional = match doc.get(&patch.obj, prop) {
            Ok(Some((value, id))) => value_json(doc, &value, &id),
            _ => serde_json::Value::Null,
        };
        let changes: Vec<ChangeHash> = values.iter().map(|v| v.change).collect();
        out.push(Body {
            id: ConflictId::compute(Kind::ConcurrentWrite, input.doc_id, None, &path, &changes),
            kind: Kind::ConcurrentWrite,
            doc: input.doc_id.clone(),
            path,
            rule: None,
            resolver: first_site(values.iter().map(|v| &v.site)),
            values,
            provisional,
            detected_at: input.now_ms,
            detected_by: input.site.clone(),
        });
    }
    out
}

/// One op of a change on either side of the merge, with what detection
/// needs of it.
struct OpInfo {
    change: ChangeHash,
    actor: automerge::ActorId,
    /// The object the op is in (`_root` or `COUNTER@ACTOR`).
    obj: String,
    key: Option<String>,
    action: OpType,
    pred: Vec<String>,
    /// This op's own id, `COUNTER@ACTOR`.
    id: String,
}

/// The changes on either side of a merge: the received ones and the local
/// ones they did not know about. Computed once, on first need.
struct Divergent<'a> {
    input: &'a DetectInput<'a>,
    loaded: Option<Loaded>,
}

struct Loaded {
    ops: Vec<OpInfo>,
    deps: HashMap<ChangeHash, Vec<ChangeHash>>,
    incoming: HashSet<ChangeHash>,
}

impl<'a> Divergent<'a> {
    fn new(input: &'a DetectInput<'a>) -> Divergent<'a> {
        Divergent {
            input,
            loaded: None,
        }
    }

    fn get(&mut self) -> &Loaded {
        self.loaded.get_or_insert_with(|| {
            let input = self.input;
            let incoming: HashSet<ChangeHash> = input.incoming.iter().map(Change::hash).collect();
            // The boundary: what the received changes depend on that was
            // already here. Everything after it is one side or the other.
            let mut boundary: Vec<ChangeHash> = input
                .incoming
                .iter()
                .flat_map(|c| c.deps().iter().copied())
                .filter(|d| !incoming.contains(d))
                .collect();
            boundary.sort_unstable();
            boundary.dedup();
            let changes = input.doc.get_changes(&boundary);
            let mut ops = Vec::new();
            let mut deps = HashMap::new();
            for change in &changes {
                let hash = change.hash();
                deps.insert(hash, change.deps().to_vec());
                let expanded = change.decode();
                let actor_hex = expanded.actor_id.to_hex_string();
                for (i, op) in expanded.operations.iter().enumerate() {
                    let counter = expanded.start_op.get() + i as u64;
                    ops.push(OpInfo {
                        change: hash,
                        actor: expanded.actor_id.clone(),
                        obj: op.obj.to_string(),
                        key: match &op.key {
                            automerge::legacy::Key::Map(k) => Some(k.to_string()),
                            automerge::legacy::Key::Seq(_) => None,
                        },
                        action: op.action.clone(),
                        pred: op.pred.iter().map(ToString::to_string).collect(),
                        id: format!("{counter}@{actor_hex}"),
                    });
                }
            }
            Loaded {
                ops,
                deps,
                incoming,
            }
        })
    }
}

impl Loaded {
    /// Changes among the divergent ones that `hash` depends on.
    fn ancestors(&self, hash: &ChangeHash) -> HashSet<ChangeHash> {
        let mut seen = HashSet::new();
        let mut stack: Vec<ChangeHash> = self.deps.get(hash).cloned().unwrap_or_default();
        while let Some(h) = stack.pop() {
            if self.deps.contains_key(&h) && seen.insert(h) {
                stack.extend(self.deps[&h].iter().copied());
            }
        }
        seen
    }
}

/// Where an object sits: the object ids from it up to the root, its
/// pointer, and whether it is visible (no deleted or losing link on the way).
#[derive(Clone)]
struct Lineage {
    ids: Vec<String>,
    props: Vec<String>,
    visible: bool,
}

/// The lineage of `obj`; `None` if automerge does not know it.
fn lineage(doc: &Automerge, obj: &ObjId) -> Option<Lineage> {
    let mut ids = vec![obj.to_string()];
    let mut props = Vec::new();
    let mut visible = true;
    for parent in doc.parents(obj).ok()? {
        ids.push(parent.obj.to_string());
        props.push(prop_text(&parent.prop));
        visible &= parent.visible;
    }
    props.reverse();
    Some(Lineage {
        ids,
        props,
        visible,
    })
}

fn delete_updates(input: &DetectInput<'_>, divergent: &mut Divergent<'_>) -> Vec<Body> {
    let doc = input.doc;
    // Cheap test first: only a merge that deletes something, or whose
    // changes write into objects that are no longer visible, can lose
    // writes. Patches show deletes; invisible targets need the ops.
    let deletes_something = input.patches.iter().any(|p| {
        !is_reserved_patch(p)
            && matches!(
                p.action,
                PatchAction::DeleteMap { .. } | PatchAction::DeleteSeq { .. }
            )
    });
    if !deletes_something && !writes_into_hidden(doc, input.incoming, input.written) {
        return Vec::new();
    }
    let loaded = divergent.get();
    let mut lineages: HashMap<String, Option<Lineage>> = HashMap::new();
    let mut lineage_of = |obj: &str| -> Option<Lineage> {
        lineages
            .entry(obj.to_owned())
            .or_insert_with(|| {
                let id = doc.import_obj(obj).ok()?;
                lineage(doc, &id)
            })
            .clone()
    };
    // Deletes (on either side) of objects.
    let mut out = Vec::new();
    for delete in loaded.ops.iter().filter(|op| op.action == OpType::Delete) {
        for target in &delete.pred {
            let Ok((object, _)) = doc.import(target) else {
                continue;
            };
            let Some(Lineage { props, .. }) = lineage(doc, &object) else {
                continue;
            };
            let before_delete = loaded.ancestors(&delete.change);
            let writes: Vec<&OpInfo> = loaded
                .ops
                .iter()
                .filter(|w| {
                    w.change != delete.change
                        && !before_delete.contains(&w.change)
                        && (loaded.incoming.contains(&w.change)
                            || loaded.incoming.contains(&delete.change))
                        && w.obj != "_root"
                        && lineage_of(&w.obj).is_some_and(|l| l.ids.iter().any(|i| i == target))
                        && !loaded.ancestors(&w.change).contains(&delete.change)
                })
                .collect();
            if writes.is_empty() {
                continue;
            }
            let mut values = vec![ConflictValue {
                value: serde_json::Value::Null,
                site: site_of_actor(&delete.actor),
                actor: delete.actor.to_hex_string(),
                change: delete.change,
                txn: None,
            }];
            // One value per change and object written: what the change wrote
            // there, nested under its place inside the deleted object
            // (`{"contact": {"phone": "555"}}`, `{"tags": ["vip"]}`).
            let mut grouped: BTreeMap<(ChangeHash, String), (serde_json::Value, &OpInfo)> =
                BTreeMap::new();
            for w in &writes {
                let value = match &w.action {
                    OpType::Put(s) => scalar_to_json(s),
                    OpType::Increment(by) => serde_json::json!({ "inc": by }),
                    OpType::Make(_) => doc
                        .import_obj(&w.id)
                        .map(|id| object_json(doc, &id, None))
                        .unwrap_or(serde_json::Value::Null),
                    OpType::Delete => serde_json::json!({ "del": true }),
                    OpType::MarkBegin(..) | OpType::MarkEnd(..) => continue,
                };
                let entry = grouped.entry((w.change, w.obj.clone())).or_insert_with(|| {
                    let empty = match w.key {
                        Some(_) => serde_json::Value::Object(serde_json::Map::new()),
                        None => serde_json::Value::Array(Vec::new()),
                    };
                    (empty, *w)
                });
                match (&mut entry.0, &w.key) {
                    (serde_json::Value::Object(map), Some(key)) => {
                        map.insert(key.clone(), value);
                    }
                    (serde_json::Value::Array(list), None) if list.len() < WRITES_SHOWN_MAX => {
                        list.push(value);
                    }
                    _ => {}
                }
            }
            for ((change, obj), (mut value, w)) in grouped {
                let is_text = doc
                    .import_obj(&obj)
                    .is_ok_and(|id| doc.object_type(&id) == Ok(ObjType::Text));
                if let (true, serde_json::Value::Array(chars)) = (is_text, &value) {
                    value = serde_json::Value::String(
                        chars.iter().filter_map(|c| c.as_str()).collect(),
                    );
                }
                let inside: Vec<String> = lineage_of(&obj)
                    .map(|l| l.props.get(props.len()..).unwrap_or_default().to_vec())
                    .unwrap_or_default();
                for segment in inside.iter().rev() {
                    value = serde_json::json!({ segment.clone(): value });
                }
                values.push(ConflictValue {
                    value,
                    site: site_of_actor(&w.actor),
                    actor: w.actor.to_hex_string(),
                    change,
                    txn: None,
                });
            }
            let path = pointer_text(&props);
            let changes: Vec<ChangeHash> = values.iter().map(|v| v.change).collect();
            out.push(Body {
                id: ConflictId::compute(Kind::DeleteUpdate, input.doc_id, None, &path, &changes),
                kind: Kind::DeleteUpdate,
                doc: input.doc_id.clone(),
                path,
                rule: None,
                resolver: first_site(values.iter().map(|v| &v.site)),
                values,
                provisional: serde_json::Value::Null,
                detected_at: input.now_ms,
                detected_by: input.site.clone(),
            });
        }
    }
    out
}

/// Whether any received op writes into an object that is not visible now.
fn writes_into_hidden(doc: &Automerge, incoming: &[Change], written: Option<&[String]>) -> bool {
    let hidden = |obj: &str| {
        doc.import_obj(obj)
            .ok()
            .and_then(|id| lineage(doc, &id))
            .is_some_and(|l| !l.visible)
    };
    if let Some(written) = written {
        return written.iter().any(|obj| hidden(obj));
    }
    let mut checked: HashMap<String, bool> = HashMap::new();
    incoming.iter().any(|change| {
        change.decode().operations.iter().any(|op| {
            let obj = op.obj.to_string();
            obj != "_root" && *checked.entry(obj).or_insert_with_key(|obj| hidden(obj))
        })
    })
}

/// Concrete instances of `pattern` related to the touched pointers.
fn rule_instances(
    doc: &Automerge,
    pattern: &[String],
    touched: &[Vec<String>],
) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    for t in touched {
        let mut bound: Vec<String> = Vec::with_capacity(pattern.len());
        let mut related = true;
        for (i, p) in pattern.iter().enumerate() {
            match t.get(i) {
                Some(seg) if p == "*" || p == seg => bound.push(seg.clone()),
                Some(_) => {
                    related = false;
                    break;
                }
                None => {
                    bound.extend(pattern[i..].iter().cloned());
                    break;
                }
            }
        }
        if related {
            expand(doc, &bound, 0, &[], &mut out);
        }
        if out.len() >= RULE_INSTANCES_MAX {
            break;
        }
    }
    out
}

/// Expands remaining `*` segments against the document's current keys.
fn expand(
    doc: &Automerge,
    pattern: &[String],
    at: usize,
    prefix: &[String],
    out: &mut BTreeSet<Vec<String>>,
) {
    if out.len() >= RULE_INSTANCES_MAX {
        return;
    }
    let Some(star) = pattern[at..].iter().position(|s| s == "*").map(|p| p + at) else {
        let mut full = prefix.to_vec();
        full.extend(pattern[at..].iter().cloned());
        out.insert(full);
        return;
    };
    let mut parent = prefix.to_vec();
    parent.extend(pattern[at..star].iter().cloned());
    let Some(obj) = object_at(doc, &parent) else {
        return;
    };
    let keys: Vec<String> = match doc.object_type(&obj) {
        Ok(ObjType::Map | ObjType::Table) => doc.keys(&obj).collect(),
        Ok(ObjType::List) => (0..doc.length(&obj)).map(|i| i.to_string()).collect(),
        _ => return,
    };
    for key in keys {
        let mut next = parent.clone();
        next.push(key);
        expand(doc, pattern, star + 1, &next, out);
    }
}

fn object_at(doc: &Automerge, segments: &[String]) -> Option<ObjId> {
    let mut obj = ROOT;
    for segment in segments {
        let prop: Prop = match doc.object_type(&obj).ok()? {
            ObjType::Map | ObjType::Table => segment.as_str().into(),
            ObjType::List => Prop::Seq(segment.parse().ok()?),
            ObjType::Text => return None,
        };
        match doc.get(&obj, prop).ok()?? {
            (Value::Object(_), id) => obj = id,
            _ => return None,
        }
    }
    Some(obj)
}

/// Whether `rule` holds for `value` (absent values hold, except for
/// predicates, which decide).
fn holds(
    rule: &Rule,
    value: Option<&serde_json::Value>,
    this: (&DocId, &Automerge, Option<&[ChangeHash]>),
    lookup: &dyn Fn(&DocId) -> Option<Automerge>,
) -> bool {
    match &rule.check {
        Check::Min(min) => value.and_then(|v| v.as_f64()).is_none_or(|v| v >= *min),
        Check::Max(max) => value.and_then(|v| v.as_f64()).is_none_or(|v| v <= *max),
        Check::Unique(field) => {
            let entries: Vec<&serde_json::Value> = match value {
                Some(serde_json::Value::Object(map)) => map.values().collect(),
                Some(serde_json::Value::Array(list)) => list.iter().collect(),
                _ => return true,
            };
            let mut seen = HashSet::new();
            entries
                .iter()
                .filter_map(|e| e.get(field))
                .filter(|v| !v.is_null())
                .all(|v| seen.insert(v.to_string()))
        }
        Check::References { docs, pointer } => {
            let name = match value {
                None | Some(serde_json::Value::Null) => return true,
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                Some(_) => return false,
            };
            let Ok(target) = DocId::new(&docs.replacen('*', &name, 1)) else {
                return false;
            };
            let escaped = name.replace('~', "~0").replace('/', "~1");
            let (doc, heads, owned);
            if &target == this.0 {
                doc = this.1;
                heads = this.2;
            } else {
                match lookup(&target) {
                    Some(other) => owned = other,
                    None => return false,
                }
                doc = &owned;
                heads = None;
            }
            if pointer.contains('*') {
                value_at(doc, &pointer.replacen('*', &escaped, 1), heads).is_some()
            } else {
                match value_at(doc, pointer, heads) {
                    Some(serde_json::Value::Object(map)) => map.contains_key(&name),
                    Some(serde_json::Value::Array(list)) => list.iter().any(|v| match v {
                        serde_json::Value::String(s) => *s == name,
                        serde_json::Value::Number(n) => n.to_string() == name,
                        _ => false,
                    }),
                    _ => false,
                }
            }
        }
        Check::Predicate(f) => f(value),
    }
}

/// Tips of the received changes: the heads the sending side had.
fn incoming_tips(incoming: &[Change]) -> Vec<ChangeHash> {
    let deps: HashSet<ChangeHash> = incoming
        .iter()
        .flat_map(|c| c.deps().iter().copied())
        .collect();
    incoming
        .iter()
        .map(Change::hash)
        .filter(|h| !deps.contains(h))
        .collect()
}

fn related(a: &[String], b: &[String]) -> bool {
    a.iter().zip(b).all(|(x, y)| x == y)
}

fn invariant_failures(
    input: &DetectInput<'_>,
    rule: &Rule,
    divergent: &mut Divergent<'_>,
) -> Vec<Body> {
    let doc = input.doc;
    let touched = touched_pointers(input.patches);
    if touched.is_empty() {
        return Vec::new();
    }
    let instances = rule_instances(doc, &rule.segments(), &touched);
    let tips = incoming_tips(input.incoming);
    let mut out = Vec::new();
    for instance in instances {
        let now = value_at_segments(doc, &instance, None);
        if holds(rule, now.as_ref(), (input.doc_id, doc, None), input.lookup) {
            continue;
        }
        let held_on = |heads: &[ChangeHash]| {
            let value = value_at_segments(doc, &instance, Some(heads));
            holds(
                rule,
                value.as_ref(),
                (input.doc_id, doc, Some(heads)),
                input.lookup,
            )
        };
        if !held_on(input.before) || !held_on(&tips) {
            // It already failed on one side: not the merge's doing.
            continue;
        }
        let loaded = divergent.get();
        let mut involved: BTreeMap<ChangeHash, automerge::ActorId> = BTreeMap::new();
        let mut paths: HashMap<&str, Option<Vec<String>>> = HashMap::new();
        for op in &loaded.ops {
            let base = paths.entry(op.obj.as_str()).or_insert_with(|| {
                let id = doc.import_obj(&op.obj).ok()?;
                lineage(doc, &id).map(|l| l.props)
            });
            let Some(base) = base else { continue };
            let mut at = base.clone();
            at.extend(op.key.iter().cloned());
            if related(&at, &instance) {
                involved.insert(op.change, op.actor.clone());
            }
        }
        let path = pointer_text(&instance);
        let values: Vec<ConflictValue> = involved
            .iter()
            .map(|(change, actor)| ConflictValue {
                value: value_at_segments(doc, &instance, Some(&[*change]))
                    .unwrap_or(serde_json::Value::Null),
                site: site_of_actor(actor),
                actor: actor.to_hex_string(),
                change: *change,
                txn: None,
            })
            .collect();
        let changes: Vec<ChangeHash> = involved.keys().copied().collect();
        out.push(Body {
            id: ConflictId::compute(
                Kind::Invariant,
                input.doc_id,
                Some(&rule.name),
                &path,
                &changes,
            ),
            kind: Kind::Invariant,
            doc: input.doc_id.clone(),
            path,
            rule: Some(rule.name.clone()),
            resolver: rule
                .resolver
                .clone()
                .or_else(|| first_site(values.iter().map(|v| &v.site))),
            values,
            provisional: now.unwrap_or(serde_json::Value::Null),
            detected_at: input.now_ms,
            detected_by: input.site.clone(),
        });
    }
    out
}
