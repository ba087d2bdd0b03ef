//! Reports: their shape, deterministic ids, and how they are kept inside
//! their document.

use automerge::{ChangeHash, ObjId, Patch, PatchAction, ReadDoc, ScalarValue, Value, ROOT};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::id::{DocId, SiteName};

use super::RESERVED_PREFIX;

/// What kind of conflict a report describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// One field set concurrently to different values.
    ConcurrentWrite,
    /// An object deleted at one site while another wrote inside it.
    DeleteUpdate,
    /// A declared rule that held on each side fails after the merge.
    Invariant,
}

impl Kind {
    /// The kind's name as it appears in reports and queries.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ConcurrentWrite => "concurrent_write",
            Kind::DeleteUpdate => "delete_update",
            Kind::Invariant => "invariant",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        match s {
            "concurrent_write" => Ok(Kind::ConcurrentWrite),
            "delete_update" => Ok(Kind::DeleteUpdate),
            "invariant" => Ok(Kind::Invariant),
            _ => Err(format!(
                "unknown conflict kind {s:?} (expected concurrent_write, delete_update or invariant)"
            )),
        }
    }
}

/// Where a report stands. `open` moves to `resolved` or `dismissed` once
/// and never back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a resolution.
    Open,
    /// Resolved, possibly with compensating edits.
    Resolved,
    /// Closed without action.
    Dismissed,
}

impl Status {
    /// The status's name as it appears in reports and queries.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Resolved => "resolved",
            Status::Dismissed => "dismissed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Status, String> {
        match s {
            "open" => Ok(Status::Open),
            "resolved" => Ok(Status::Resolved),
            "dismissed" => Ok(Status::Dismissed),
            _ => Err(format!(
                "unknown status {s:?} (expected open, resolved or dismissed)"
            )),
        }
    }
}

/// A report's id: 32 hex digits, the same at every site.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConflictId(String);

impl ConflictId {
    /// The id of the conflict of `kind` in `doc` at `path` (under `rule`)
    /// between `changes` (in any order; duplicates count once).
    pub fn compute(
        kind: Kind,
        doc: &DocId,
        rule: Option<&str>,
        path: &str,
        changes: &[ChangeHash],
    ) -> ConflictId {
        let mut sorted = changes.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut hasher = Sha256::new();
        for part in [
            "archipelago conflict v1",
            kind.as_str(),
            doc.as_str(),
            rule.unwrap_or(""),
            path,
        ] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        for change in &sorted {
            hasher.update(change.0);
        }
        ConflictId(hex::encode(&hasher.finalize()[..16]))
    }

    /// Parses an id given by a user.
    pub fn parse(text: &str) -> Option<ConflictId> {
        (text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| ConflictId(text.to_ascii_lowercase()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ConflictId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One of the competing values of a conflict and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictValue {
    /// The value as JSON (`null` for a delete).
    pub value: serde_json::Value,
    /// The site that wrote it, when its actor names one.
    pub site: Option<SiteName>,
    /// The automerge actor that wrote it, hex.
    pub actor: String,
    /// The change that wrote it.
    pub change: ChangeHash,
    /// The transaction that change belongs to, if any: the other documents
    /// it wrote changed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<crate::txn::TxnId>,
}

/// A conflict report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    /// Deterministic id.
    pub id: ConflictId,
    /// What happened.
    pub kind: Kind,
    /// The document.
    pub doc: DocId,
    /// JSON pointer of the field, object or rule instance concerned.
    pub path: String,
    /// The rule that failed (invariants only).
    pub rule: Option<String>,
    /// The competing values, each with the site, actor and change behind it.
    pub values: Vec<ConflictValue>,
    /// The value the merge settled on (what readers see now).
    pub provisional: serde_json::Value,
    /// When the report was first written, ms since the Unix epoch.
    pub detected_at: i64,
    /// The site that wrote the report (every involved site detects it; one
    /// write wins).
    pub detected_by: SiteName,
    /// The site that resolves it automatically, if any does.
    pub resolver: Option<SiteName>,
    /// Where it stands.
    pub status: Status,
    /// Who resolved or dismissed it.
    pub resolved_by: Option<SiteName>,
    /// When, ms since the Unix epoch.
    pub resolved_at: Option<i64>,
    /// How: `manual`, `dismissed`, or a policy name such as `clamp`.
    pub resolution: Option<String>,
    /// A note given with the resolution.
    pub note: Option<String>,
    /// The change that closed the report (it also carries the compensating
    /// edits, if any).
    pub resolved_change: Option<ChangeHash>,
}

/// The part of a report written once when it is detected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Body {
    pub(crate) id: ConflictId,
    pub(crate) kind: Kind,
    pub(crate) doc: DocId,
    pub(crate) path: String,
    pub(crate) rule: Option<String>,
    pub(crate) values: Vec<ConflictValue>,
    pub(crate) provisional: serde_json::Value,
    pub(crate) detected_at: i64,
    pub(crate) detected_by: SiteName,
    pub(crate) resolver: Option<SiteName>,
}

/// The part written when a report is closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Closing {
    pub(crate) status: Status,
    pub(crate) by: SiteName,
    pub(crate) at: i64,
    pub(crate) how: String,
    pub(crate) note: Option<String>,
}

/// Root key holding a report's body (a JSON string).
pub(crate) fn body_key(id: &ConflictId) -> String {
    format!("{RESERVED_PREFIX}conflict/{id}")
}

/// Root key holding a report's closing (a JSON string); absent while open.
pub(crate) fn status_key(id: &ConflictId) -> String {
    format!("{RESERVED_PREFIX}conflict/{id}/status")
}

fn id_of_key(key: &str) -> Option<ConflictId> {
    let rest = key
        .strip_prefix(RESERVED_PREFIX)?
        .strip_prefix("conflict/")?;
    let id = rest.strip_suffix("/status").unwrap_or(rest);
    ConflictId::parse(id)
}

fn str_at(doc: &impl ReadDoc, key: &str) -> Option<(String, ObjId)> {
    match doc.get(ROOT, key).ok()?? {
        (Value::Scalar(s), opid) => match s.as_ref() {
            ScalarValue::Str(text) => Some((text.to_string(), opid)),
            _ => None,
        },
        _ => None,
    }
}

/// Every closing written for report `id`: more than one when sites closed
/// it concurrently (the report shows the one automerge picked).
#[cfg(feature = "sim")]
pub(crate) fn closings(doc: &automerge::Automerge, id: &ConflictId) -> Vec<Closing> {
    doc.get_all(ROOT, status_key(id))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(value, _)| match value {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Str(text) => serde_json::from_str(text).ok(),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The report `id` as stored in `doc`, if present.
pub(crate) fn read_report(doc: &automerge::Automerge, id: &ConflictId) -> Option<Conflict> {
    let (body, _) = str_at(doc, &body_key(id))?;
    let body: Body = serde_json::from_str(&body).ok()?;
    let closing = str_at(doc, &status_key(id)).and_then(|(text, opid)| {
        let closing: Closing = serde_json::from_str(&text).ok()?;
        Some((closing, doc.hash_for_opid(&opid)))
    });
    Some(assemble(body, closing))
}

pub(crate) fn assemble(body: Body, closing: Option<(Closing, Option<ChangeHash>)>) -> Conflict {
    let (status, resolved_by, resolved_at, resolution, note, resolved_change) = match closing {
        Some((c, change)) => (
            c.status,
            Some(c.by),
            Some(c.at),
            Some(c.how),
            c.note,
            change,
        ),
        None => (Status::Open, None, None, None, None, None),
    };
    Conflict {
        id: body.id,
        kind: body.kind,
        doc: body.doc,
        path: body.path,
        rule: body.rule,
        values: body.values,
        provisional: body.provisional,
        detected_at: body.detected_at,
        detected_by: body.detected_by,
        resolver: body.resolver,
        status,
        resolved_by,
        resolved_at,
        resolution,
        note,
        resolved_change,
    }
}

/// Every report stored in `doc` (a range read over the reserved keys).
pub(crate) fn reports_in(doc: &automerge::Automerge) -> Vec<Conflict> {
    let start = format!("{RESERVED_PREFIX}conflict/");
    let end = format!("{RESERVED_PREFIX}conflict0");
    let mut ids: Vec<ConflictId> = doc
        .map_range(ROOT, start..end)
        .filter_map(|item| id_of_key(&item.key))
        .collect();
    ids.dedup();
    ids.iter().filter_map(|id| read_report(doc, id)).collect()
}

/// Ids of reports whose keys the patches of a merge touched.
pub(crate) fn report_ids_in_patches(patches: &[Patch]) -> Vec<ConflictId> {
    let mut ids: Vec<ConflictId> = patches
        .iter()
        .filter(|p| p.obj == ROOT)
        .filter_map(|p| match &p.action {
            PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => id_of_key(key),
            PatchAction::Conflict {
                prop: automerge::Prop::Map(key),
            } => id_of_key(key),
            _ => None,
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_ignore_change_order_and_depend_on_everything_else() {
        let doc: DocId = "inventory/sku-1".parse().unwrap();
        let a = ChangeHash([1; 32]);
        let b = ChangeHash([2; 32]);
        let id = ConflictId::compute(Kind::Invariant, &doc, Some("r"), "/stock", &[a, b]);
        assert_eq!(
            id,
            ConflictId::compute(Kind::Invariant, &doc, Some("r"), "/stock", &[b, a, b])
        );
        assert_ne!(
            id,
            ConflictId::compute(Kind::Invariant, &doc, Some("r"), "/stock", &[a])
        );
        assert_ne!(
            id,
            ConflictId::compute(Kind::Invariant, &doc, Some("s"), "/stock", &[a, b])
        );
        assert_ne!(
            id,
            ConflictId::compute(Kind::ConcurrentWrite, &doc, Some("r"), "/stock", &[a, b])
        );
        assert_eq!(ConflictId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(id_of_key(&body_key(&id)), Some(id.clone()));
        assert_eq!(id_of_key(&status_key(&id)), Some(id));
        assert_eq!(ConflictId::parse("xyz"), None);
    }
}
