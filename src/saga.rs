//! Sagas across sites: steps T1…Tn, each run by the site that owns its
//! data, each with an optional compensation; the outcome is T1…Tn, or
//! T1…Tj followed by the compensations of Tj…T1 (Garcia-Molina and Salem,
//! 1987).
//!
//! A saga is a replicated document, `sagas/ID`: its definition (written
//! once, when it starts) and one map per step that only the step's site
//! writes, so no two sites ever write the same field and the document
//! never conflicts. A site finds through its replica that a step of its
//! own is due and runs it: an internal step (a transaction, or a Rust
//! function returning one) commits **together with its step's `done`
//! marker**, as one transaction published only once durable, so it takes
//! effect exactly once, whatever crashes, restarts, duplicated frames or
//! partitions happen. An external step (an HTTP call) cannot be made
//! exactly once; it is called with the same idempotency key on every try.
//!
//! This module is the state without I/O: the definition, its checks, and
//! what is due at a site given the document ([`plan`]).
//! [`crate::Replica::run_sagas`] runs what is due.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::replica::{ExternalDue, ExternalOutcome, SagaRun, SagaView};

use crate::doc::Op;
use crate::id::{parse_change_hash, DocId, SiteName};
use crate::txn::{Precondition, Txn, TxnDoc, TxnError, TXN_DOCS_MAX};

/// Where saga documents live: `sagas/ID`.
pub const SAGA_PREFIX: &str = "sagas/";
/// Most steps of one saga.
pub const SAGA_STEPS_MAX: usize = 64;
/// Longest step name, in bytes.
pub const STEP_NAME_BYTES_MAX: usize = 64;
/// Longest saga id, in bytes.
pub const SAGA_ID_BYTES_MAX: usize = 128;
/// Largest definition, in bytes of JSON.
pub const SAGA_DEF_BYTES_MAX: usize = 1 << 20;
/// The error a step failed with is kept up to this many bytes.
pub const STEP_ERROR_BYTES_MAX: usize = 1024;

/// A saga as it is started: `POST /v1/sagas`'s body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaDef {
    /// Its id (the document is `sagas/ID`); the node picks one when none
    /// is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The steps, run in order.
    pub steps: Vec<StepDef>,
    /// After this many milliseconds from the start, a step not started yet
    /// fails instead of running, and the saga compensates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

/// One step: where it runs, its action, and its compensation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    /// Its name, unique in the saga.
    pub name: String,
    /// The site that runs it (and its compensation).
    pub site: SiteName,
    /// Action: a transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<TxnSpec>,
    /// Action: an HTTP call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCall>,
    /// Action: a Rust function the site registered ([`SagaFns`]).
    #[serde(rename = "fn", default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// Compensation: a transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<TxnSpec>,
    /// Compensation: an HTTP call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate_http: Option<HttpCall>,
    /// Compensation: a registered Rust function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate_fn: Option<String>,
}

/// A transaction of a step: `POST /v1/txn`'s `docs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxnSpec {
    /// The documents.
    pub docs: Vec<TxnDocSpec>,
}

/// One document of a step's transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxnDocSpec {
    /// The document.
    pub id: DocId,
    /// Its ops; none: only its precondition is checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<Op>,
    /// It is still at these heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_heads: Option<Vec<String>>,
    /// It does not exist yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub if_absent: bool,
}

/// An external step: `POST url` with `body`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCall {
    /// Where to.
    pub url: String,
    /// The JSON body.
    #[serde(default)]
    pub body: Value,
}

/// What a step does (as its action or its compensation).
#[derive(Debug, Clone, PartialEq)]
pub enum Action<'a> {
    /// A transaction.
    Txn(&'a TxnSpec),
    /// An HTTP call.
    Http(&'a HttpCall),
    /// A registered Rust function.
    Fn(&'a str),
}

impl StepDef {
    /// Its action.
    pub fn action(&self) -> Option<Action<'_>> {
        one_of(&self.txn, &self.http, &self.function)
    }

    /// Its compensation, if it has one.
    pub fn compensation(&self) -> Option<Action<'_>> {
        one_of(&self.compensate, &self.compensate_http, &self.compensate_fn)
    }
}

fn one_of<'a>(
    txn: &'a Option<TxnSpec>,
    http: &'a Option<HttpCall>,
    function: &'a Option<String>,
) -> Option<Action<'a>> {
    if let Some(txn) = txn {
        return Some(Action::Txn(txn));
    }
    if let Some(http) = http {
        return Some(Action::Http(http));
    }
    function.as_deref().map(Action::Fn)
}

/// Why a saga cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// The definition is not valid.
    #[error("{0}")]
    Invalid(String),
    /// A saga with this id exists.
    #[error("saga {0} exists")]
    Exists(String),
    /// No saga with this id here.
    #[error("no saga {0} here")]
    NotFound(String),
}

fn invalid(message: impl Into<String>) -> SagaError {
    SagaError::Invalid(message.into())
}

/// The document of saga `id`, if `id` may name a saga: the document
/// `sagas/ID` is valid, and the id holds no `/`.
pub fn saga_doc(id: &str) -> Result<DocId, SagaError> {
    if id.is_empty() || id.len() > SAGA_ID_BYTES_MAX || id.contains('/') {
        return Err(invalid(format!(
            "a saga id is 1 to {SAGA_ID_BYTES_MAX} bytes without /, not {id:?}"
        )));
    }
    format!("{SAGA_PREFIX}{id}")
        .parse()
        .map_err(|e| invalid(format!("saga id {id:?}: {e}")))
}

/// The saga id of a document, if it is a saga's.
pub fn saga_id_of(doc: &DocId) -> Option<&str> {
    doc.as_str()
        .strip_prefix(SAGA_PREFIX)
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

impl TxnSpec {
    /// The transaction's documents, heads parsed.
    pub fn to_docs(&self) -> Result<Vec<TxnDoc>, SagaError> {
        self.docs
            .iter()
            .map(|doc| {
                let if_heads = doc
                    .if_heads
                    .as_ref()
                    .map(|heads| {
                        heads
                            .iter()
                            .map(|h| {
                                parse_change_hash(h)
                                    .map_err(|e| invalid(format!("{}: if_heads: {e}", doc.id)))
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .transpose()?;
                Ok(TxnDoc {
                    id: doc.id.clone(),
                    ops: doc.ops.clone(),
                    precondition: Precondition {
                        if_heads,
                        if_absent: doc.if_absent,
                    },
                })
            })
            .collect()
    }
}

/// Checks a step transaction's shape: at most one document fewer than a
/// transaction may hold (its step's marker is the last), no saga
/// document, each document once.
fn check_txn(step: &str, what: &str, spec: &TxnSpec) -> Result<(), SagaError> {
    let at = |m: String| invalid(format!("step {step}: {what}: {m}"));
    if spec.docs.is_empty() {
        return Err(at("no documents".to_owned()));
    }
    if spec.docs.len() >= TXN_DOCS_MAX {
        return Err(at(format!(
            "at most {} documents, not {}",
            TXN_DOCS_MAX - 1,
            spec.docs.len()
        )));
    }
    if let Some(doc) = spec
        .docs
        .iter()
        .find(|d| d.id.as_str().starts_with(SAGA_PREFIX))
    {
        return Err(at(format!("{} is a saga's document", doc.id)));
    }
    let docs = spec.to_docs().map_err(|e| at(e.to_string()))?;
    match (Txn {
        docs,
        message: None,
    })
    .check()
    {
        Ok(_) | Err(TxnError::NoOps) => Ok(()),
        Err(e) => Err(at(e.to_string())),
    }
}

impl SagaDef {
    /// Checks the definition: 1 to 64 steps with unique names, each with
    /// one action and at most one compensation, transactions of a valid
    /// shape. `sites`, when given, are the sites a step may name.
    pub fn check(&self, sites: Option<&[SiteName]>) -> Result<(), SagaError> {
        if let Some(id) = &self.id {
            saga_doc(id)?;
        }
        if self.steps.is_empty() {
            return Err(invalid("a saga needs at least one step"));
        }
        if self.steps.len() > SAGA_STEPS_MAX {
            return Err(invalid(format!(
                "a saga has at most {SAGA_STEPS_MAX} steps, not {}",
                self.steps.len()
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        for step in &self.steps {
            let name = &step.name;
            let valid = !name.is_empty()
                && name.len() <= STEP_NAME_BYTES_MAX
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !valid {
                return Err(invalid(format!(
                    "step name {name:?}: 1 to {STEP_NAME_BYTES_MAX} characters of A-Z a-z 0-9 - _ ."
                )));
            }
            if !names.insert(name.as_str()) {
                return Err(invalid(format!("step {name} is listed twice")));
            }
            if let Some(sites) = sites {
                if !sites.contains(&step.site) {
                    return Err(invalid(format!("step {name}: unknown site {}", step.site)));
                }
            }
            let actions = [
                step.txn.is_some(),
                step.http.is_some(),
                step.function.is_some(),
            ];
            match actions.iter().filter(|a| **a).count() {
                0 => {
                    return Err(invalid(format!(
                        "step {name} has no action (txn, http or fn)"
                    )))
                }
                1 => {}
                _ => {
                    return Err(invalid(format!(
                        "step {name} has more than one action (txn, http, fn)"
                    )))
                }
            }
            let compensations = [
                step.compensate.is_some(),
                step.compensate_http.is_some(),
                step.compensate_fn.is_some(),
            ];
            if compensations.iter().filter(|c| **c).count() > 1 {
                return Err(invalid(format!(
                    "step {name} has more than one compensation"
                )));
            }
            if let Some(txn) = &step.txn {
                check_txn(name, "txn", txn)?;
            }
            if let Some(txn) = &step.compensate {
                check_txn(name, "compensate", txn)?;
            }
            for call in [&step.http, &step.compensate_http].into_iter().flatten() {
                let url = &call.url;
                if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048
                {
                    return Err(invalid(format!(
                        "step {name}: {url:?} is not an http:// or https:// URL"
                    )));
                }
            }
            for f in [&step.function, &step.compensate_fn].into_iter().flatten() {
                if f.is_empty() || f.len() > STEP_NAME_BYTES_MAX {
                    return Err(invalid(format!("step {name}: function name {f:?}")));
                }
            }
        }
        let bytes = serde_json::to_vec(self).map(|v| v.len()).unwrap_or(0);
        if bytes > SAGA_DEF_BYTES_MAX {
            return Err(invalid(format!(
                "a saga's definition is at most {SAGA_DEF_BYTES_MAX} bytes of JSON, not {bytes}"
            )));
        }
        Ok(())
    }
}

/// Where a step's action stands, as its site recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// Not started.
    #[default]
    Pending,
    /// An external call in progress (internal steps never show it: they
    /// commit whole).
    Running,
    /// Took effect.
    Done,
    /// Did not take effect (or, for an external call whose every try
    /// failed without an answer, may have).
    Failed,
}

/// Where a step's compensation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompensationState {
    /// Not started (or not needed).
    #[default]
    None,
    /// An external compensation in progress.
    Running,
    /// Took effect.
    Done,
    /// Failed: the saga needs a person.
    Failed,
}

/// What the step's site recorded of it, in `steps/NAME` of the document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The action.
    #[serde(default)]
    pub status: StepState,
    /// The compensation.
    #[serde(default)]
    pub compensation: CompensationState,
    /// Tries of its external call (action and compensation together).
    #[serde(default)]
    pub attempts: u64,
    /// Why it (or its compensation) failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// An external action failed with no answer to its last try: it may
    /// have taken effect, so it is compensated like a done step.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
    /// When its site last recorded a change of it (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<i64>,
}

/// A saga's outcome so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SagaStatus {
    /// Steps are still to run.
    Running,
    /// Every step took effect.
    Done,
    /// A step failed; compensations are under way.
    Compensating,
    /// A step failed and every step before it that took effect was
    /// compensated.
    Compensated,
    /// A compensation failed: a person must finish the saga.
    Failed,
}

impl SagaStatus {
    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Done => "done",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Failed => "failed",
        }
    }

    /// Whether nothing more happens to it.
    pub fn finished(self) -> bool {
        !matches!(self, SagaStatus::Running | SagaStatus::Compensating)
    }
}

impl std::str::FromStr for SagaStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<SagaStatus, String> {
        Ok(match s {
            "running" => SagaStatus::Running,
            "done" => SagaStatus::Done,
            "compensating" => SagaStatus::Compensating,
            "compensated" => SagaStatus::Compensated,
            "failed" => SagaStatus::Failed,
            _ => {
                return Err(format!(
                    "unknown saga status {s:?} (running, done, compensating, compensated, failed)"
                ))
            }
        })
    }
}

/// A saga as a site holds it: its definition and its steps' records.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaState {
    /// Its id.
    pub id: String,
    /// Its definition.
    pub def: SagaDef,
    /// Each step's record, in the order of the definition.
    pub records: Vec<StepRecord>,
    /// When it started (ms since the epoch).
    pub created_at: i64,
    /// The site that started it.
    pub created_by: String,
}

/// What is due at a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Run step `0`'s action.
    Action(usize),
    /// The deadline passed before step `0` started: it fails.
    Deadline(usize),
    /// Run step `0`'s compensation.
    Compensate(usize),
}

impl SagaState {
    /// The saga in `doc` (a saga document's JSON), or why it is not one.
    pub fn from_json(id: &str, doc: &Value) -> Result<SagaState, String> {
        let text = doc
            .get("definition")
            .and_then(Value::as_str)
            .ok_or("no definition")?;
        let def: SagaDef =
            serde_json::from_str(text).map_err(|e| format!("the definition: {e}"))?;
        let records = def
            .steps
            .iter()
            .map(|step| {
                doc.get("steps")
                    .and_then(|steps| steps.get(&step.name))
                    .map(|record| serde_json::from_value(record.clone()))
                    .transpose()
                    .map(Option::unwrap_or_default)
                    .map_err(|e| format!("step {}: {e}", step.name))
            })
            .collect::<Result<Vec<StepRecord>, String>>()?;
        Ok(SagaState {
            id: id.to_owned(),
            def,
            records,
            created_at: doc.get("created_at").and_then(Value::as_i64).unwrap_or(0),
            created_by: doc
                .get("created_by")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        })
    }

    /// The first step whose action failed.
    fn failed_at(&self) -> Option<usize> {
        self.records
            .iter()
            .position(|r| r.status == StepState::Failed)
    }

    /// Whether step `k` is to be compensated once a later step failed: it
    /// took effect (or may have), and it has a compensation.
    fn needs_compensation(&self, k: usize) -> bool {
        let record = &self.records[k];
        let took_effect = record.status == StepState::Done
            || (record.status == StepState::Failed && record.unknown);
        took_effect && self.def.steps[k].compensation().is_some()
    }

    /// The saga's outcome so far.
    pub fn status(&self) -> SagaStatus {
        let Some(failed) = self.failed_at() else {
            return if self.records.iter().all(|r| r.status == StepState::Done) {
                SagaStatus::Done
            } else {
                SagaStatus::Running
            };
        };
        let owed: Vec<usize> = (0..=failed)
            .filter(|&k| self.needs_compensation(k))
            .collect();
        if owed
            .iter()
            .any(|&k| self.records[k].compensation == CompensationState::Failed)
        {
            return SagaStatus::Failed;
        }
        if owed
            .iter()
            .all(|&k| self.records[k].compensation == CompensationState::Done)
        {
            SagaStatus::Compensated
        } else {
            SagaStatus::Compensating
        }
    }

    /// When the saga finished: the latest record's time, once finished.
    pub fn finished_at(&self) -> Option<i64> {
        if !self.status().finished() {
            return None;
        }
        self.records.iter().filter_map(|r| r.at).max()
    }

    /// The step that must happen next, wherever it runs, and since when
    /// it is due (ms): for a step waiting on an unreachable site.
    pub fn next(&self) -> Option<(Due, i64)> {
        let due_since = |k: usize| -> i64 {
            self.records[..k]
                .iter()
                .filter_map(|r| r.at)
                .max()
                .unwrap_or(self.created_at)
        };
        match self.failed_at() {
            None => {
                let k = self
                    .records
                    .iter()
                    .position(|r| r.status != StepState::Done)?;
                Some((Due::Action(k), due_since(k)))
            }
            Some(failed) => {
                // Compensations run in reverse order: the latest step owed
                // one, once no later step still owes its own.
                let k = (0..=failed).rev().find(|&k| {
                    self.needs_compensation(k)
                        && self.records[k].compensation != CompensationState::Done
                })?;
                if self.records[k].compensation == CompensationState::Failed {
                    return None;
                }
                let since = self
                    .records
                    .iter()
                    .filter_map(|r| r.at)
                    .max()
                    .unwrap_or(self.created_at);
                Some((Due::Compensate(k), since))
            }
        }
    }
}

/// What is due at `site` at `now_ms`: the next step of the saga, if its
/// site is this one.
pub fn plan(saga: &SagaState, site: &SiteName, now_ms: i64) -> Option<Due> {
    let (due, _) = saga.next()?;
    match due {
        Due::Action(k) | Due::Deadline(k) => {
            if saga.def.steps[k].site != *site {
                return None;
            }
            let record = &saga.records[k];
            let late = saga.def.deadline_ms.is_some_and(|ms| {
                now_ms.saturating_sub(saga.created_at) > i64::try_from(ms).unwrap_or(i64::MAX)
            });
            // A call already under way goes on; one not started fails.
            if late && record.status == StepState::Pending {
                Some(Due::Deadline(k))
            } else {
                Some(Due::Action(k))
            }
        }
        Due::Compensate(k) => (saga.def.steps[k].site == *site).then_some(due),
    }
}

/// The ops that write step `name`'s record in its saga's document.
pub fn record_ops(name: &str, record: &StepRecord) -> Vec<Op> {
    let value = serde_json::to_value(record).expect("a record serializes");
    vec![Op::Set {
        // Step names need no escaping in a pointer (see SagaDef::check).
        path: format!("/steps/{name}"),
        value,
        kind: None,
        min: None,
        max: None,
    }]
}

/// The ops that create saga `id`'s document at `now_ms` by `site`.
pub fn create_ops(def: &SagaDef, now_ms: i64, site: &SiteName) -> Vec<Op> {
    let set = |path: &str, value: Value| Op::Set {
        path: path.to_owned(),
        value,
        kind: None,
        min: None,
        max: None,
    };
    let steps: serde_json::Map<String, Value> = def
        .steps
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                serde_json::to_value(StepRecord::default()).expect("a record serializes"),
            )
        })
        .collect();
    vec![
        set(
            "/definition",
            Value::String(serde_json::to_string(def).expect("a definition serializes")),
        ),
        set("/created_at", Value::from(now_ms)),
        set("/created_by", Value::String(site.to_string())),
        set("/steps", Value::Object(steps)),
    ]
}

/// `text` cut to [`STEP_ERROR_BYTES_MAX`] bytes.
pub fn clip_error(text: &str) -> String {
    if text.len() <= STEP_ERROR_BYTES_MAX {
        return text.to_owned();
    }
    let mut cut = STEP_ERROR_BYTES_MAX;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

/// The Rust functions a site runs as steps: by name, each given the saga
/// and the step and returning the documents its transaction changes
/// (committed with the step's marker), or why the step fails.
pub type SagaFn = dyn Fn(&SagaCall<'_>) -> Result<Vec<TxnDoc>, String> + Send + Sync;

/// What a [`SagaFn`] is called with.
#[derive(Debug, Clone, Copy)]
pub struct SagaCall<'a> {
    /// The saga.
    pub saga: &'a SagaState,
    /// The step's index.
    pub step: usize,
    /// Whether this is the step's compensation.
    pub compensate: bool,
}

/// The registered [`SagaFn`]s of a site.
#[derive(Clone, Default)]
pub struct SagaFns {
    fns: std::collections::BTreeMap<String, std::sync::Arc<SagaFn>>,
}

impl std::fmt::Debug for SagaFns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.fns.keys()).finish()
    }
}

impl SagaFns {
    /// Registers `f` as `name`.
    pub fn with(
        mut self,
        name: &str,
        f: impl Fn(&SagaCall<'_>) -> Result<Vec<TxnDoc>, String> + Send + Sync + 'static,
    ) -> SagaFns {
        self.fns.insert(name.to_owned(), std::sync::Arc::new(f));
        self
    }

    /// The function registered as `name`.
    pub fn get(&self, name: &str) -> Option<&std::sync::Arc<SagaFn>> {
        self.fns.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn site(name: &str) -> SiteName {
        name.parse().unwrap()
    }

    fn def(value: Value) -> SagaDef {
        serde_json::from_value(value).unwrap()
    }

    fn three() -> SagaDef {
        def(json!({"id": "order-1", "steps": [
            {"name": "take", "site": "eu-west", "txn": {"docs": [{"id": "orders/1", "ops": [{"op": "set", "path": "/taken", "value": true}]}]},
             "compensate": {"docs": [{"id": "orders/1", "ops": [{"op": "set", "path": "/taken", "value": false}]}]}},
            {"name": "reserve", "site": "us-east", "txn": {"docs": [{"id": "stock/1", "ops": [{"op": "inc", "path": "/n", "by": -1}]}]},
             "compensate": {"docs": [{"id": "stock/1", "ops": [{"op": "inc", "path": "/n", "by": 1}]}]}},
            {"name": "charge", "site": "eu-west", "http": {"url": "http://127.0.0.1:9/pay", "body": {"amount": 5}}}
        ]}))
    }

    fn state(def: SagaDef, records: Vec<StepRecord>) -> SagaState {
        SagaState {
            id: "order-1".to_owned(),
            def,
            records,
            created_at: 1_000,
            created_by: "eu-west".to_owned(),
        }
    }

    fn record(status: StepState, compensation: CompensationState) -> StepRecord {
        StepRecord {
            status,
            compensation,
            at: Some(2_000),
            ..StepRecord::default()
        }
    }

    #[test]
    fn definitions_are_checked() {
        let sites = [site("eu-west"), site("us-east")];
        three().check(Some(&sites)).unwrap();
        let bad = |value: Value, says: &str| {
            let err = def(value).check(Some(&sites)).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        };
        bad(json!({"steps": []}), "at least one step");
        bad(
            json!({"steps": [{"name": "a", "site": "ap-south", "fn": "f"}]}),
            "unknown site ap-south",
        );
        bad(
            json!({"steps": [{"name": "a", "site": "eu-west"}]}),
            "no action",
        );
        bad(
            json!({"steps": [{"name": "a", "site": "eu-west", "fn": "f"}, {"name": "a", "site": "eu-west", "fn": "g"}]}),
            "listed twice",
        );
        bad(
            json!({"steps": [{"name": "a b", "site": "eu-west", "fn": "f"}]}),
            "step name",
        );
        bad(
            json!({"steps": [{"name": "a", "site": "eu-west", "txn": {"docs": [{"id": "sagas/x", "ops": []}]}}]}),
            "saga's document",
        );
        bad(
            json!({"steps": [{"name": "a", "site": "eu-west", "http": {"url": "ftp://x"}}]}),
            "not an http",
        );
        bad(
            json!({"id": "a/b", "steps": [{"name": "a", "site": "eu-west", "fn": "f"}]}),
            "without /",
        );
        let many: Vec<Value> = (0..65)
            .map(|i| json!({"name": format!("s{i}"), "site": "eu-west", "fn": "f"}))
            .collect();
        bad(json!({ "steps": many }), "at most 64 steps");
        assert!(serde_json::from_value::<SagaDef>(json!({"steps": [], "colour": 1})).is_err());
    }

    #[test]
    fn steps_run_in_order_each_at_its_site() {
        let (eu, us) = (site("eu-west"), site("us-east"));
        let pending = StepRecord::default;
        let mut saga = state(three(), vec![pending(), pending(), pending()]);
        assert_eq!(plan(&saga, &eu, 1_500), Some(Due::Action(0)));
        assert_eq!(plan(&saga, &us, 1_500), None);
        saga.records[0] = record(StepState::Done, CompensationState::None);
        assert_eq!(plan(&saga, &eu, 2_500), None);
        assert_eq!(plan(&saga, &us, 2_500), Some(Due::Action(1)));
        assert_eq!(saga.next(), Some((Due::Action(1), 2_000)));
        saga.records[1] = record(StepState::Done, CompensationState::None);
        assert_eq!(plan(&saga, &eu, 2_500), Some(Due::Action(2)));
        assert_eq!(saga.status(), SagaStatus::Running);
        saga.records[2] = record(StepState::Done, CompensationState::None);
        assert_eq!(saga.status(), SagaStatus::Done);
        assert_eq!(saga.finished_at(), Some(2_000));
        assert_eq!(plan(&saga, &eu, 2_500), None);
        assert_eq!(plan(&saga, &us, 2_500), None);
    }

    #[test]
    fn a_failure_compensates_in_reverse_order() {
        let (eu, us) = (site("eu-west"), site("us-east"));
        let done = || record(StepState::Done, CompensationState::None);
        let mut saga = state(
            three(),
            vec![
                done(),
                done(),
                record(StepState::Failed, CompensationState::None),
            ],
        );
        assert_eq!(saga.status(), SagaStatus::Compensating);
        // The external step failed with an answer: nothing to undo there.
        assert_eq!(plan(&saga, &eu, 3_000), None);
        assert_eq!(plan(&saga, &us, 3_000), Some(Due::Compensate(1)));
        saga.records[1].compensation = CompensationState::Done;
        assert_eq!(plan(&saga, &us, 3_000), None);
        assert_eq!(plan(&saga, &eu, 3_000), Some(Due::Compensate(0)));
        saga.records[0].compensation = CompensationState::Done;
        assert_eq!(saga.status(), SagaStatus::Compensated);
        assert_eq!(plan(&saga, &eu, 3_000), None);

        // A failed compensation stops the saga for a person.
        let mut stuck = state(
            three(),
            vec![
                done(),
                done(),
                record(StepState::Failed, CompensationState::None),
            ],
        );
        stuck.records[1].compensation = CompensationState::Failed;
        assert_eq!(stuck.status(), SagaStatus::Failed);
        assert_eq!(plan(&stuck, &us, 3_000), None);
        assert_eq!(plan(&stuck, &eu, 3_000), None);
    }

    #[test]
    fn steps_without_compensation_are_passed_over_and_unknown_outcomes_compensated() {
        let eu = site("eu-west");
        let mut definition = three();
        definition.steps[1].compensate = None;
        definition.steps[2].compensate_http = Some(HttpCall {
            url: "http://127.0.0.1:9/refund".to_owned(),
            body: json!({}),
        });
        let done = || record(StepState::Done, CompensationState::None);
        let mut failed = record(StepState::Failed, CompensationState::None);
        failed.unknown = true;
        let mut saga = state(definition, vec![done(), done(), failed]);
        // The call that may have gone through is compensated first.
        assert_eq!(plan(&saga, &eu, 3_000), Some(Due::Compensate(2)));
        saga.records[2].compensation = CompensationState::Done;
        // us-east's step has no compensation: eu-west's first step is next.
        assert_eq!(plan(&saga, &eu, 3_000), Some(Due::Compensate(0)));
        saga.records[0].compensation = CompensationState::Done;
        assert_eq!(saga.status(), SagaStatus::Compensated);
    }

    #[test]
    fn a_deadline_fails_the_step_not_started_and_lets_calls_under_way_finish() {
        let eu = site("eu-west");
        let mut definition = three();
        definition.deadline_ms = Some(500);
        let mut saga = state(definition, vec![StepRecord::default(); 3]);
        assert_eq!(plan(&saga, &eu, 1_400), Some(Due::Action(0)));
        assert_eq!(plan(&saga, &eu, 1_600), Some(Due::Deadline(0)));
        saga.records[0] = record(StepState::Done, CompensationState::None);
        saga.records[1] = record(StepState::Done, CompensationState::None);
        saga.records[2].status = StepState::Running;
        assert_eq!(plan(&saga, &eu, 9_000), Some(Due::Action(2)));
    }

    #[test]
    fn a_saga_reads_back_from_its_document() {
        let definition = three();
        let ops = create_ops(&definition, 1_000, &site("eu-west"));
        let mut doc = json!({});
        for op in ops {
            if let Op::Set { path, value, .. } = op {
                doc[path.trim_start_matches('/')] = value;
            }
        }
        let saga = SagaState::from_json("order-1", &doc).unwrap();
        assert_eq!(saga.def, definition);
        assert_eq!(saga.records, vec![StepRecord::default(); 3]);
        assert_eq!(saga.created_at, 1_000);
        assert_eq!(saga.status(), SagaStatus::Running);
        assert!(SagaState::from_json("x", &json!({})).is_err());
    }
}
