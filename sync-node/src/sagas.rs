//! The node's saga runner: runs the steps due at this site (see
//! [`archipelago::saga`]) as saga documents change, retries what failed for
//! a passing reason every few seconds (and notices deadlines then), and
//! makes the external steps' HTTP calls: `POST` with the body and
//! `Idempotency-Key: SAGA/STEP` (`SAGA/STEP/compensate`), the same key on
//! every try, retried with capped exponential backoff on network errors
//! and 5xx, at most `[sagas] http_attempts_max` tries. A 2xx answer is
//! success; another answer (a 4xx) fails the step, which took no effect;
//! the last failed try fails it as possibly done, so it is compensated too.
//!
//! Each run happens on the blocking pool, one at a time per saga, many
//! sagas at once.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use archipelago::saga::{
    CompensationState, ExternalDue, ExternalOutcome, SagaRun, SagaView, StepState,
};
use archipelago::{Replica, SiteName};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::api::telemetry::{SAGAS, SAGA_HTTP_TRIES, SAGA_STEPS, SAGA_STEP_SECONDS};
use crate::config::SagasConfig;
use crate::events::{EventKind, EventLog, SyncPeers};

/// How often unfinished sagas are looked at again: steps whose write
/// failed run again, and deadlines are noticed.
pub const SAGA_RETRY_EVERY: Duration = Duration::from_secs(2);

/// A time (ms since the epoch) as RFC 3339.
fn rfc3339(ms: i64) -> Value {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(Value::Null, Value::String)
}

/// A saga as the API shows it. A step that is due at a site this node
/// cannot reach now (`unreachable` says which) shows as `waiting`, with
/// `since` when it became due.
pub fn saga_json(view: &SagaView, unreachable: &dyn Fn(&SiteName) -> bool) -> Value {
    let state = &view.state;
    let next = state.next();
    let steps: Vec<Value> = state
        .def
        .steps
        .iter()
        .zip(&state.records)
        .enumerate()
        .map(|(k, (step, record))| {
            let mut status = match (record.compensation, record.status) {
                (CompensationState::Done, _) => "compensated",
                (CompensationState::Running, _) => "running",
                (CompensationState::Failed, _) => "failed",
                (_, StepState::Pending) => "pending",
                (_, StepState::Running) => "running",
                (_, StepState::Done) => "done",
                (_, StepState::Failed) => "failed",
            };
            let mut out = json!({
                "name": step.name,
                "site": step.site,
                "status": status,
                "attempts": record.attempts,
            });
            if let Some((due, since)) = next {
                let at = match due {
                    archipelago::saga::Due::Action(i)
                    | archipelago::saga::Due::Deadline(i)
                    | archipelago::saga::Due::Compensate(i) => i,
                };
                if at == k && unreachable(&step.site) {
                    status = "waiting";
                    out["status"] = json!(status);
                    out["since"] = rfc3339(since);
                }
            }
            if record.compensation != CompensationState::None {
                out["compensation"] = json!(record.compensation);
            }
            if let Some(change) = view.changes.get(k).copied().flatten() {
                if record.at.is_some() {
                    out["change"] = json!(change.to_string());
                }
            }
            if let Some(error) = &record.error {
                out["error"] = json!(error);
            }
            if let Some(at) = record.at {
                out["at"] = rfc3339(at);
            }
            out
        })
        .collect();
    let mut out = json!({
        "id": state.id,
        "status": state.status().as_str(),
        "steps": steps,
        "created_at": rfc3339(state.created_at),
        "created_by": state.created_by,
    });
    if let Some(at) = state.finished_at() {
        out["finished_at"] = rfc3339(at);
    }
    if let Some(ms) = state.def.deadline_ms {
        out["deadline_ms"] = json!(ms);
    }
    out
}

/// Whether `site` is a peer this node is not connected to now.
pub fn unreachable_by(peers: Option<&SyncPeers>) -> impl Fn(&SiteName) -> bool + '_ {
    let connected: BTreeMap<SiteName, bool> = peers
        .map(|p| {
            p.status()
                .into_iter()
                .map(|v| (v.status.site.clone(), v.status.connected))
                .collect()
        })
        .unwrap_or_default();
    move |site| connected.get(site).is_some_and(|c| !c)
}

/// What the runner hears back.
enum Report {
    /// A run of a saga ended.
    Ran {
        id: String,
        result: Result<Box<(SagaRun, Option<SagaView>)>, String>,
    },
    /// An external call ended: its saga may have more due.
    Called { id: String, key: String },
}

/// Starts the runner of `replica`'s sagas; it stops when the replica's
/// feed closes.
pub fn spawn_sagas(
    replica: &Replica,
    config: SagasConfig,
    events: Arc<EventLog>,
    peers: Option<Arc<SyncPeers>>,
) -> JoinHandle<()> {
    let commits = replica.subscribe();
    tokio::spawn(run(replica.clone(), commits, config, events, peers))
}

struct Runner {
    replica: Replica,
    config: Arc<SagasConfig>,
    http: reqwest::Client,
    reports: mpsc::UnboundedSender<Report>,
    /// Sagas not finished, as last seen.
    active: BTreeSet<String>,
    /// Sagas being run now, and those to run again once that ends.
    running: HashSet<String>,
    again: HashSet<String>,
    /// External calls under way, by key.
    calls: HashSet<String>,
    /// The heads of each saga last published as an event.
    published: BTreeMap<String, Vec<archipelago::ChangeHash>>,
    /// Each saga's status as last seen, for the gauge.
    statuses: BTreeMap<String, archipelago::saga::SagaStatus>,
    events: Arc<EventLog>,
    peers: Option<Arc<SyncPeers>>,
}

async fn run(
    replica: Replica,
    mut commits: broadcast::Receiver<archipelago::Committed>,
    config: SagasConfig,
    events: Arc<EventLog>,
    peers: Option<Arc<SyncPeers>>,
) {
    let (reports, mut heard) = mpsc::unbounded_channel();
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_millis(config.http_timeout_ms))
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client for sagas' external steps");
            return;
        }
    };
    let mut runner = Runner {
        active: replica.saga_ids().into_iter().collect(),
        replica,
        config: Arc::new(config),
        http,
        reports,
        running: HashSet::new(),
        again: HashSet::new(),
        calls: HashSet::new(),
        published: BTreeMap::new(),
        statuses: BTreeMap::new(),
        events,
        peers,
    };
    let mut retry = tokio::time::interval(SAGA_RETRY_EVERY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            committed = commits.recv() => match committed {
                Ok(committed) => {
                    if let Some(id) = archipelago::saga::saga_id_of(&committed.doc) {
                        // The state the last run ended at (its own last
                        // write) needs no run.
                        if runner.published.get(id) != Some(&committed.heads) {
                            runner.schedule(id.to_owned());
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    for id in runner.replica.saga_ids() {
                        runner.schedule(id);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            report = heard.recv() => match report {
                Some(report) => runner.heard(report),
                None => return,
            },
            _ = retry.tick() => {
                let active: Vec<String> = runner.active.iter().cloned().collect();
                for id in active {
                    runner.schedule(id);
                }
                runner.count();
            }
        }
    }
}

impl Runner {
    fn schedule(&mut self, id: String) {
        if self.running.contains(&id) {
            self.again.insert(id);
            return;
        }
        self.running.insert(id.clone());
        let replica = self.replica.clone();
        let reports = self.reports.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = replica
                .run_saga_view(&id)
                .and_then(|(run, view)| {
                    let view = match view {
                        Some(view) => Some(view),
                        None => replica.saga(&id)?,
                    };
                    Ok(Box::new((run, view)))
                })
                .map_err(|e| e.to_string());
            if let Ok(ran) = &result {
                let run = &ran.0;
                let seconds = started.elapsed().as_secs_f64();
                for (outcome, steps) in [
                    ("done", &run.done),
                    ("failed", &run.failed),
                    ("compensated", &run.compensated),
                ] {
                    for _ in steps {
                        metrics::counter!(SAGA_STEPS, "outcome" => outcome).increment(1);
                        metrics::histogram!(SAGA_STEP_SECONDS).record(seconds);
                    }
                }
            }
            let _ = reports.send(Report::Ran { id, result });
        });
    }

    fn heard(&mut self, report: Report) {
        match report {
            Report::Ran { id, result } => {
                self.running.remove(&id);
                match result {
                    Ok(ran) => {
                        let (run, view) = *ran;
                        if let Some(view) = view {
                            self.publish(&view);
                            self.statuses.insert(id.clone(), view.state.status());
                            if view.state.status().finished() {
                                self.active.remove(&id);
                            } else {
                                self.active.insert(id.clone());
                            }
                        }
                        if let Some(due) = run.external {
                            self.call(due);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(saga = %id, error = %e, "a saga's step did not run; it is tried again");
                        self.active.insert(id.clone());
                    }
                }
                if self.again.remove(&id) {
                    self.schedule(id);
                }
            }
            Report::Called { id, key } => {
                self.calls.remove(&key);
                self.schedule(id);
            }
        }
    }

    /// Publishes a `saga` event when the saga changed since the last one.
    fn publish(&mut self, view: &SagaView) {
        let id = &view.state.id;
        if self.published.get(id) == Some(&view.heads) {
            return;
        }
        self.published.insert(id.clone(), view.heads.clone());
        let unreachable = unreachable_by(self.peers.as_deref());
        self.events
            .publish(EventKind::Saga, saga_json(view, &unreachable));
    }

    /// Sets the gauge of sagas by status (every saga here is looked at
    /// once after a start, so it counts them all).
    fn count(&self) {
        use archipelago::saga::SagaStatus;
        for status in [
            SagaStatus::Running,
            SagaStatus::Done,
            SagaStatus::Compensating,
            SagaStatus::Compensated,
            SagaStatus::Failed,
        ] {
            let n = self.statuses.values().filter(|s| **s == status).count();
            metrics::gauge!(SAGAS, "status" => status.as_str()).set(n as f64);
        }
    }

    /// Makes `due`'s call (and those that become due after it) on a task
    /// of its own, unless it is under way.
    fn call(&mut self, due: ExternalDue) {
        if !self.calls.insert(due.key.clone()) {
            return;
        }
        let (replica, http, config, reports) = (
            self.replica.clone(),
            self.http.clone(),
            self.config.clone(),
            self.reports.clone(),
        );
        tokio::spawn(async move {
            let (id, key) = (due.saga.clone(), due.key.clone());
            if let Err(e) = call_until_done(&replica, &http, &config, due).await {
                tracing::warn!(saga = %id, key = %key, error = %e, "an external step's outcome is not recorded yet; it is tried again");
            }
            let _ = reports.send(Report::Called { id, key });
        });
    }
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, archipelago::Error> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the task failed: {e}")),
    }
}

/// Tries the call until it answers, refuses or runs out of tries, and
/// records the outcome.
async fn call_until_done(
    replica: &Replica,
    http: &reqwest::Client,
    config: &SagasConfig,
    due: ExternalDue,
) -> Result<(), String> {
    loop {
        let tried = {
            let (replica, due) = (replica.clone(), due.clone());
            blocking(move || replica.saga_external_try(&due)).await?
        };
        let Some(attempts) = tried else {
            // No longer due (recorded meanwhile).
            return Ok(());
        };
        metrics::counter!(SAGA_HTTP_TRIES).increment(1);
        let outcome = if !config.allows(&due.call.url) {
            Some(ExternalOutcome::Refused(format!(
                "{} is not in [sagas] http_allow",
                due.call.url
            )))
        } else {
            let answer = http
                .post(&due.call.url)
                .header("Idempotency-Key", &due.key)
                .json(&due.call.body)
                .send()
                .await;
            let last = attempts >= u64::from(config.http_attempts_max);
            match answer {
                Ok(r) if r.status().is_success() => Some(ExternalOutcome::Done),
                Ok(r) if r.status().is_server_error() => last.then(|| {
                    ExternalOutcome::Unknown(format!(
                        "{} answered {} to the last of {attempts} tries",
                        due.call.url,
                        r.status()
                    ))
                }),
                Ok(r) => Some(ExternalOutcome::Refused(format!(
                    "{} answered {}",
                    due.call.url,
                    r.status()
                ))),
                Err(e) => last.then(|| {
                    ExternalOutcome::Unknown(format!(
                        "{}: {e} (the last of {attempts} tries)",
                        due.call.url
                    ))
                }),
            }
        };
        let Some(outcome) = outcome else {
            let shift = u32::try_from(attempts.saturating_sub(1))
                .unwrap_or(u32::MAX)
                .min(20);
            let wait = config
                .http_backoff_ms
                .saturating_mul(1 << shift)
                .min(config.http_backoff_max_ms);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            continue;
        };
        // What becomes due next (another call too) the runner hands out.
        let (replica, due) = (replica.clone(), due.clone());
        blocking(move || replica.saga_external_done(&due, &outcome)).await?;
        return Ok(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use archipelago::saga::{SagaDef, SagaState, StepRecord};

    fn view() -> SagaView {
        let def: SagaDef = serde_json::from_value(json!({"id": "s", "steps": [
            {"name": "take", "site": "eu-west", "fn": "f"},
            {"name": "reserve", "site": "us-east", "fn": "g"}
        ]}))
        .unwrap();
        let done = StepRecord {
            status: StepState::Done,
            at: Some(1_700_000_000_000),
            ..StepRecord::default()
        };
        SagaView {
            state: SagaState {
                id: "s".to_owned(),
                def,
                records: vec![done, StepRecord::default()],
                created_at: 1_699_999_999_000,
                created_by: "eu-west".to_owned(),
            },
            changes: vec![None, None],
            heads: Vec::new(),
        }
    }

    #[test]
    fn a_step_due_at_an_unreachable_site_shows_as_waiting_since_it_became_due() {
        let view = view();
        let reachable = saga_json(&view, &|_| false);
        assert_eq!(reachable["status"], "running");
        assert_eq!(reachable["steps"][0]["status"], "done");
        assert_eq!(reachable["steps"][1]["status"], "pending");
        assert!(reachable["steps"][1].get("since").is_none());
        let cut_off = saga_json(&view, &|site| site.as_str() == "us-east");
        assert_eq!(cut_off["steps"][1]["status"], "waiting");
        assert_eq!(cut_off["steps"][1]["since"], "2023-11-14T22:13:20Z");
        assert_eq!(cut_off["steps"][0]["at"], "2023-11-14T22:13:20Z");
        assert_eq!(cut_off["created_at"], "2023-11-14T22:13:19Z");
        assert!(cut_off.get("finished_at").is_none());
    }
}
