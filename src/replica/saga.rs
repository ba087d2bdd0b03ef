//! Running sagas at a site: starting one, reading it, and running the
//! steps due here (see [`crate::saga`]).
//!
//! An internal step commits as one transaction with its record in the
//! saga's document, under a precondition that the document is still at the
//! heads the plan was made from; a saga document's local changes publish
//! only once durable (as bounded counters' do), so a step that did not
//! become durable was seen by nobody and is simply due again. Steps never
//! run while automatic resolutions are held after a restore: the restored
//! store may lack steps this site already ran.

use automerge::{ChangeHash, ReadDoc};

use super::Replica;
use crate::error::Error;
use crate::id::DocId;
use crate::saga::{
    clip_error, create_ops, plan, record_ops, saga_doc, saga_id_of, Action, CompensationState, Due,
    HttpCall, SagaCall, SagaDef, SagaError, SagaState, StepRecord, StepState, SAGA_PREFIX,
};
use crate::txn::{Precondition, Txn, TxnDoc};

/// Rounds of [`Replica::run_saga`] at most: one per step and compensation,
/// and one retry each when the document moved under a plan.
const ROUNDS_PER_STEP: usize = 4;

/// A saga as [`Replica::saga`] reads it: its state, and the change that
/// recorded each step's latest status.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaView {
    /// The saga.
    pub state: SagaState,
    /// Per step, the change that wrote its record last (an internal step's
    /// change carries its effects too: they are one transaction).
    pub changes: Vec<Option<ChangeHash>>,
    /// The saga document's heads.
    pub heads: Vec<ChangeHash>,
}

/// An external call due at this site: its step, whether it is the
/// compensation, and the idempotency key every try carries.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalDue {
    /// The saga.
    pub saga: String,
    /// The step's index.
    pub step: usize,
    /// The step's name.
    pub name: String,
    /// Whether it is the step's compensation.
    pub compensate: bool,
    /// The call.
    pub call: HttpCall,
    /// `SAGA/STEP`, or `SAGA/STEP/compensate`.
    pub key: String,
    /// Tries made so far.
    pub attempts: u64,
}

/// How an external call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalOutcome {
    /// It answered with success.
    Done,
    /// It refused (an answer that is not a success, or not worth retrying):
    /// it took no effect.
    Refused(String),
    /// No try got an answer: it may have taken effect.
    Unknown(String),
}

/// What [`Replica::run_saga`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SagaRun {
    /// Steps whose action took effect here.
    pub done: Vec<String>,
    /// Steps that failed here (precondition, rights, deadline, function).
    pub failed: Vec<String>,
    /// Compensations that took effect here.
    pub compensated: Vec<String>,
    /// An external call now due here (the caller makes it).
    pub external: Option<ExternalDue>,
    /// Steps are held (a restored store) and nothing ran.
    pub held: bool,
}

impl SagaRun {
    /// Whether it did anything.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty() && self.failed.is_empty() && self.compensated.is_empty()
    }
}

/// A step's name and the record to write for it.
type NamedRecord = (String, StepRecord);

/// The documents of `docs` and of `def`'s leading steps that run at `site`
/// as transactions, merged into one transaction's, with those steps'
/// records (done at `now`); `None` when the first step is not such a step.
/// A document in several of them keeps its first precondition and gets
/// their ops in order; a step whose document another step already changes
/// and that sets a precondition on it ends the run (evaluated before the
/// earlier step's ops, it would not mean what it says).
fn leading_steps(
    def: &SagaDef,
    site: &crate::id::SiteName,
    docs: &[TxnDoc],
    now: i64,
) -> Option<(Vec<TxnDoc>, Vec<NamedRecord>)> {
    let mut merged: Vec<TxnDoc> = docs.to_vec();
    let mut records = Vec::new();
    for step in &def.steps {
        let (Some(Action::Txn(spec)), true) = (step.action(), step.site == *site) else {
            break;
        };
        let Ok(parts) = spec.to_docs() else {
            break;
        };
        let clash = parts.iter().any(|part| {
            part.precondition != Precondition::none() && merged.iter().any(|m| m.id == part.id)
        });
        if clash || merged.len() + parts.len() >= crate::txn::TXN_DOCS_MAX {
            break;
        }
        for part in parts {
            match merged.iter_mut().find(|m| m.id == part.id) {
                Some(m) => m.ops.extend(part.ops),
                None => merged.push(part),
            }
        }
        records.push((
            step.name.clone(),
            StepRecord {
                status: StepState::Done,
                at: Some(now),
                ..StepRecord::default()
            },
        ));
    }
    (!records.is_empty()).then_some((merged, records))
}

/// What a write of a step's record left: the saga document's heads and
/// the change that wrote it.
struct Written {
    heads: Vec<ChangeHash>,
    change: Option<ChangeHash>,
}

impl Written {
    /// `view` with step `k`'s record as written.
    fn apply(self, mut view: SagaView, k: usize, record: StepRecord) -> SagaView {
        view.state.records[k] = record;
        view.changes[k] = self.change.or(view.changes[k]);
        view.heads = self.heads;
        view
    }
}

fn failure_is_final(error: &Error, saga: &DocId) -> Option<bool> {
    match error {
        // The saga moved: plan again.
        Error::PreconditionFailed { doc, .. } if doc == saga => Some(false),
        Error::PreconditionFailed { .. } | Error::TxnOp { .. } | Error::Op(_) | Error::Txn(_) => {
            Some(true)
        }
        _ => None,
    }
}

impl Replica {
    /// Starts saga `def` (whose `id` must be given): creates `sagas/ID`
    /// with its definition and a pending record per step, durably, then
    /// runs what is due here. Steps at other sites start once the
    /// document reaches them.
    pub fn start_saga(&self, def: &SagaDef) -> Result<(SagaView, SagaRun), Error> {
        self.start_saga_with(def, Vec::new())
    }

    /// [`Replica::start_saga`], committing `docs` in the same transaction
    /// (the order a saga is for, the counters its steps count with): every
    /// site sees them together with the saga, and none without it.
    pub fn start_saga_with(
        &self,
        def: &SagaDef,
        docs: Vec<TxnDoc>,
    ) -> Result<(SagaView, SagaRun), Error> {
        let (view, ran) = self.create_and_run_leading(def, docs)?;
        let mut run = self.run_saga(&view.state.id)?;
        run.done.splice(0..0, ran);
        let view = self
            .saga(&view.state.id)?
            .ok_or_else(|| SagaError::NotFound(view.state.id.clone()))?;
        Ok((view, run))
    }

    /// Creates saga `def` (with `docs` in the same transaction) without
    /// running any step: [`Replica::run_saga`] runs them.
    pub fn create_saga(&self, def: &SagaDef, docs: Vec<TxnDoc>) -> Result<SagaView, Error> {
        self.create(def, docs, Vec::new())
    }

    /// Creates saga `def` together with its leading steps when they are
    /// transactions of this site: one transaction in place of one per
    /// step, as if they ran at once after it started. When that
    /// transaction fails (a step's precondition or rights), the saga is
    /// created alone and its steps run one by one, so the failing step is
    /// recorded as failed and the ones before it are compensated. Returns
    /// the saga and the steps that ran.
    pub fn create_and_run_leading(
        &self,
        def: &SagaDef,
        docs: Vec<TxnDoc>,
    ) -> Result<(SagaView, Vec<String>), Error> {
        let now = self.shared.options.clock.now_ms();
        let leading = if self.resolutions_held() {
            None
        } else {
            leading_steps(def, self.site(), &docs, now)
        };
        if let Some((merged, records)) = leading {
            let names: Vec<String> = records.iter().map(|(n, _)| n.clone()).collect();
            match self.create(def, merged, records) {
                Ok(view) => return Ok((view, names)),
                Err(e @ Error::Saga(_)) => return Err(e),
                Err(e)
                    if failure_is_final(&e, &saga_doc(def.id.as_deref().unwrap_or(""))?)
                        .is_some() => {}
                Err(e) => return Err(e),
            }
        }
        Ok((self.create(def, docs, Vec::new())?, Vec::new()))
    }

    /// Creates the saga with `docs`, its steps' records as `records` say
    /// (the leading steps that commit with it) and pending otherwise.
    fn create(
        &self,
        def: &SagaDef,
        mut docs: Vec<TxnDoc>,
        records: Vec<(String, StepRecord)>,
    ) -> Result<SagaView, Error> {
        def.check(None)?;
        let id = def
            .id
            .as_deref()
            .ok_or_else(|| SagaError::Invalid("a saga needs an id here".to_owned()))?;
        let doc = saga_doc(id)?;
        let now = self.shared.options.clock.now_ms();
        if docs.iter().any(|d| saga_id_of(&d.id).is_some()) {
            return Err(SagaError::Invalid(
                "the documents started with a saga may not be sagas".to_owned(),
            )
            .into());
        }
        let mut ops = create_ops(def, now, self.site());
        for (name, record) in &records {
            ops.extend(record_ops(name, record));
        }
        docs.push(TxnDoc {
            id: doc.clone(),
            ops,
            precondition: Precondition {
                if_heads: None,
                if_absent: true,
            },
        });
        let created = self.commit_txn(&Txn {
            docs,
            message: None,
        });
        let commit = match created {
            Err(Error::PreconditionFailed { doc: failed, .. }) if failed == doc => {
                return Err(SagaError::Exists(id.to_owned()).into())
            }
            other => other?,
        };
        // The saga as written, without reading it back.
        let (_, written) = commit.docs.last().expect("the saga's document is the last");
        let mut state = SagaState {
            id: id.to_owned(),
            def: def.clone(),
            records: vec![StepRecord::default(); def.steps.len()],
            created_at: now,
            created_by: self.site().to_string(),
        };
        for (k, step) in def.steps.iter().enumerate() {
            if let Some((_, record)) = records.iter().find(|(name, _)| *name == step.name) {
                state.records[k] = record.clone();
            }
        }
        Ok(SagaView {
            state,
            // The creation wrote every step's record.
            changes: vec![written.change; def.steps.len()],
            heads: written.heads.clone(),
        })
    }

    /// Saga `id` as this site holds it.
    pub fn saga(&self, id: &str) -> Result<Option<SagaView>, Error> {
        let doc = saga_doc(id)?;
        let read = self.with_doc(&doc, |am| {
            let value = crate::doc::json::to_json(am, None);
            let state = SagaState::from_json(id, &value)?;
            let steps = am
                .get(automerge::ROOT, "steps")
                .ok()
                .flatten()
                .map(|(_, obj)| obj);
            let changes = state
                .def
                .steps
                .iter()
                .map(|step| {
                    let steps = steps.as_ref()?;
                    let (_, record) = am.get(steps, step.name.as_str()).ok()??;
                    am.hash_for_opid(&record)
                })
                .collect();
            Ok::<_, String>(SagaView {
                state,
                changes,
                heads: am.get_heads(),
            })
        })?;
        match read {
            None => Ok(None),
            Some(Ok(view)) => Ok(Some(view)),
            Some(Err(e)) => Err(Error::Saga(SagaError::Invalid(format!(
                "sagas/{id} is not a saga: {e}"
            )))),
        }
    }

    /// The ids of the sagas this site holds, in order.
    pub fn saga_ids(&self) -> Vec<String> {
        self.doc_ids(SAGA_PREFIX)
            .iter()
            .filter_map(|doc| saga_id_of(doc).map(str::to_owned))
            .collect()
    }

    /// Runs every step due at this site of every saga it holds (after a
    /// restart, and whenever a saga document may have changed). Returns
    /// per saga what ran; errors of one saga are logged and leave it due.
    pub fn run_sagas(&self) -> Vec<(String, SagaRun)> {
        let mut runs = Vec::new();
        for id in self.saga_ids() {
            match self.run_saga(&id) {
                Ok(run) => runs.push((id, run)),
                Err(e) => tracing::warn!(saga = %id, error = %e, "a saga's step did not run"),
            }
        }
        runs
    }

    /// Runs the steps of saga `id` due at this site, one after another,
    /// until the next is another site's, is an external call (returned for
    /// the caller to make), or none is left.
    pub fn run_saga(&self, id: &str) -> Result<SagaRun, Error> {
        self.run_saga_view(id).map(|(run, _)| run)
    }

    /// [`Replica::run_saga`], with the saga as the run left it when it
    /// knows it without reading it again.
    pub fn run_saga_view(&self, id: &str) -> Result<(SagaRun, Option<SagaView>), Error> {
        let doc = saga_doc(id)?;
        let mut run = SagaRun::default();
        if self.resolutions_held() {
            run.held = true;
            return Ok((run, None));
        }
        let mut rounds = 0;
        // The saga as this run last wrote it: read again only when a write
        // found it moved.
        let mut known: Option<SagaView> = None;
        loop {
            let view = match known.take() {
                Some(view) => view,
                None => match self.saga(id)? {
                    Some(view) => view,
                    None => return Ok((run, None)),
                },
            };
            rounds += 1;
            if rounds > ROUNDS_PER_STEP * (view.state.def.steps.len() + 1) {
                tracing::warn!(saga = %id, "a saga's document kept moving under its steps; they run again later");
                return Ok((run, None));
            }
            let state = &view.state;
            let now = self.shared.options.clock.now_ms();
            let Some(due) = plan(state, self.site(), now) else {
                return Ok((run, Some(view)));
            };
            let (k, compensate) = match due {
                Due::Action(k) | Due::Deadline(k) => (k, false),
                Due::Compensate(k) => (k, true),
            };
            let step = &state.def.steps[k];
            let mut record = state.records[k].clone();
            record.at = Some(now);
            let action = if compensate {
                step.compensation()
            } else {
                step.action()
            };
            let Some(action) = action else {
                return Ok((run, None));
            };
            let guard = Precondition::if_heads(view.heads.clone());
            if due == Due::Deadline(k) {
                record.status = StepState::Failed;
                record.error =
                    Some("the saga's deadline passed before the step started".to_owned());
                if let Some(written) = self.write_record(&doc, &step.name, &record, &guard)? {
                    run.failed.push(step.name.clone());
                    known = Some(written.apply(view, k, record));
                }
                continue;
            }
            let docs = match action {
                Action::Http(call) => {
                    run.external = Some(ExternalDue {
                        saga: id.to_owned(),
                        step: k,
                        name: step.name.clone(),
                        compensate,
                        call: call.clone(),
                        key: if compensate {
                            format!("{id}/{}/compensate", step.name)
                        } else {
                            format!("{id}/{}", step.name)
                        },
                        attempts: record.attempts,
                    });
                    return Ok((run, None));
                }
                Action::Txn(spec) => spec.to_docs().map_err(|e| e.to_string()),
                Action::Fn(name) => match self.shared.options.saga_fns.get(name) {
                    Some(f) => f(&SagaCall {
                        saga: state,
                        step: k,
                        compensate,
                    }),
                    None => Err(format!(
                        "no saga function {name:?} is registered at this site"
                    )),
                },
            };
            let mut done = record.clone();
            if compensate {
                done.compensation = CompensationState::Done;
            } else {
                done.status = StepState::Done;
            }
            let outcome = match docs {
                Ok(docs) => self.commit_step(&doc, &step.name, docs, &done, &guard),
                Err(reason) => Ok(Err(reason)),
            };
            match outcome? {
                Ok(Some(written)) => {
                    if compensate {
                        run.compensated.push(step.name.clone());
                    } else {
                        run.done.push(step.name.clone());
                    }
                    known = Some(written.apply(view, k, done));
                }
                Ok(None) => {}
                Err(reason) => {
                    if compensate {
                        record.compensation = CompensationState::Failed;
                    } else {
                        record.status = StepState::Failed;
                    }
                    record.error = Some(clip_error(&reason));
                    if let Some(written) = self.write_record(&doc, &step.name, &record, &guard)? {
                        run.failed.push(step.name.clone());
                        known = Some(written.apply(view, k, record));
                    }
                }
            }
        }
    }

    /// Commits a step's documents with its record. `Ok(Ok(Some))`: done;
    /// `Ok(Ok(None))`: the saga moved, plan again; `Ok(Err(reason))`: the
    /// step fails for good; `Err`: try again later.
    fn commit_step(
        &self,
        doc: &DocId,
        name: &str,
        mut docs: Vec<TxnDoc>,
        record: &StepRecord,
        guard: &Precondition,
    ) -> Result<Result<Option<Written>, String>, Error> {
        if docs.iter().any(|d| d.id == *doc) {
            return Ok(Err("a step may not change its saga's document".to_owned()));
        }
        docs.push(TxnDoc {
            id: doc.clone(),
            ops: record_ops(name, record),
            precondition: guard.clone(),
        });
        match self.commit_txn(&Txn {
            docs,
            message: None,
        }) {
            Ok(commit) => {
                let (_, saga) = commit.docs.last().expect("the saga's document is the last");
                Ok(Ok(Some(Written {
                    heads: saga.heads.clone(),
                    change: saga.change,
                })))
            }
            Err(e) => match failure_is_final(&e, doc) {
                Some(true) => Ok(Err(e.to_string())),
                Some(false) => Ok(Ok(None)),
                None => Err(e),
            },
        }
    }

    /// Writes a step's record alone; `None` when the saga moved first.
    fn write_record(
        &self,
        doc: &DocId,
        name: &str,
        record: &StepRecord,
        guard: &Precondition,
    ) -> Result<Option<Written>, Error> {
        match self.commit_step(doc, name, Vec::new(), record, guard)? {
            Ok(done) => Ok(done),
            Err(reason) => Err(SagaError::Invalid(reason).into()),
        }
    }

    /// Records that an external call due here is about to be tried
    /// (`running`, one more attempt), durably, before it is made: after a
    /// crash it is tried again with the same key. Returns the tries made
    /// so far, this one included; `None` if it is no longer due.
    pub fn saga_external_try(&self, due: &ExternalDue) -> Result<Option<u64>, Error> {
        self.record_external(due, |record| {
            if due.compensate {
                record.compensation = CompensationState::Running;
            } else {
                record.status = StepState::Running;
            }
            record.attempts += 1;
        })
        .map(|r| r.map(|r| r.attempts))
    }

    /// Records how an external call ended, then runs what became due here.
    pub fn saga_external_done(
        &self,
        due: &ExternalDue,
        outcome: &ExternalOutcome,
    ) -> Result<SagaRun, Error> {
        self.record_external(due, |record| {
            let (ok, error, unknown) = match outcome {
                ExternalOutcome::Done => (true, None, false),
                ExternalOutcome::Refused(e) => (false, Some(clip_error(e)), false),
                ExternalOutcome::Unknown(e) => (false, Some(clip_error(e)), true),
            };
            record.error = error;
            if due.compensate {
                record.compensation = if ok {
                    CompensationState::Done
                } else {
                    CompensationState::Failed
                };
            } else {
                record.status = if ok {
                    StepState::Done
                } else {
                    StepState::Failed
                };
                record.unknown = unknown;
            }
        })?;
        self.run_saga(&due.saga)
    }

    /// Changes the record of `due`'s step as `change` says, if the call is
    /// still the one due here.
    fn record_external(
        &self,
        due: &ExternalDue,
        change: impl Fn(&mut StepRecord),
    ) -> Result<Option<StepRecord>, Error> {
        let doc = saga_doc(&due.saga)?;
        for _ in 0..ROUNDS_PER_STEP {
            let Some(view) = self.saga(&due.saga)? else {
                return Ok(None);
            };
            let now = self.shared.options.clock.now_ms();
            let still = match plan(&view.state, self.site(), now) {
                Some(Due::Action(k)) => k == due.step && !due.compensate,
                Some(Due::Compensate(k)) => k == due.step && due.compensate,
                // Past the deadline a call under way still ends as it ends.
                Some(Due::Deadline(k)) => k == due.step && !due.compensate,
                None => false,
            };
            if !still {
                return Ok(None);
            }
            let mut record = view.state.records[due.step].clone();
            change(&mut record);
            record.at = Some(now);
            let guard = Precondition::if_heads(view.heads.clone());
            if self
                .write_record(&doc, &due.name, &record, &guard)?
                .is_some()
            {
                return Ok(Some(record));
            }
        }
        Err(Error::Saga(SagaError::Invalid(format!(
            "sagas/{}: the document kept moving; the call's outcome is recorded later",
            due.saga
        ))))
    }
}
