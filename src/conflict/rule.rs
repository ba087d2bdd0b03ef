//! Declared rules, detector switches and resolution policies.

use std::sync::Arc;

use crate::doc::{Op, Pointer};
use crate::id::SiteName;
use crate::protocol::scope::Glob;

use super::report::{Conflict, Kind};

/// A custom check over the value at a rule's path (`None` when absent):
/// `true` means the rule holds.
pub type Predicate = Arc<dyn Fn(Option<&serde_json::Value>) -> bool + Send + Sync>;

/// What a rule checks at each value its path matches.
#[derive(Clone)]
pub enum Check {
    /// A number (or counter) at least this.
    Min(f64),
    /// A number (or counter) at most this.
    Max(f64),
    /// The entries of the map or list at the path have distinct values of
    /// this field (entries without it are ignored).
    Unique(String),
    /// The value names an existing entry: `docs` is a document id in which
    /// `*` stands for the value (or a fixed id), `pointer` a JSON pointer in
    /// that document in which `*` stands for the value; without `*` the
    /// value must be a key of the map (or an element of the list) there.
    References {
        /// The document id pattern.
        docs: String,
        /// The pointer pattern.
        pointer: String,
    },
    /// A custom predicate over the value at the path (`None` when absent);
    /// `true` means the rule holds.
    Predicate(Predicate),
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Min(v) => write!(f, "min = {v}"),
            Check::Max(v) => write!(f, "max = {v}"),
            Check::Unique(field) => write!(f, "unique = {field:?}"),
            Check::References { docs, pointer } => write!(f, "references = \"{docs}:{pointer}\""),
            Check::Predicate(_) => f.write_str("predicate"),
        }
    }
}

impl Check {
    /// Parses a `references` target, `DOCS:POINTER`.
    pub fn references(target: &str) -> Result<Check, RuleError> {
        let (docs, pointer) = target.split_once(':').ok_or_else(|| {
            RuleError(format!(
                "references = {target:?}: expected DOCS:POINTER, e.g. \"customers/*:\" or \"catalog:/skus\""
            ))
        })?;
        if docs.is_empty() {
            return Err(RuleError(format!("references = {target:?}: no document")));
        }
        Pointer::parse(pointer).map_err(|e| RuleError(format!("references = {target:?}: {e}")))?;
        Ok(Check::References {
            docs: docs.to_owned(),
            pointer: pointer.to_owned(),
        })
    }
}

/// What a resolver decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    /// Edits applied to the conflict's document in the same change that
    /// closes the report (may be empty).
    pub ops: Vec<Op>,
    /// How it was resolved, recorded in the report (e.g. `restock`).
    pub how: String,
    /// A note recorded in the report.
    pub note: Option<String>,
    /// Edits of other documents (each at most once), committed with the
    /// closing as one transaction: cancel the order and restock in one
    /// atomic step. Resolutions with such edits run once the merge that
    /// raised the report is durable, taking every document's lock.
    pub docs: Vec<(crate::id::DocId, Vec<Op>)>,
}

/// Resolves reports in Rust. Runs at the conflict's resolver site only,
/// under the document's lock, while the report is open; its ops and the
/// report's closing commit as one change.
pub trait Resolver: Send + Sync + 'static {
    /// Decides how to resolve `conflict` given the document's current JSON;
    /// `None` leaves the report open.
    fn resolve(&self, conflict: &Conflict, doc: &serde_json::Value) -> Option<Resolution>;
}

impl<F> Resolver for F
where
    F: Fn(&Conflict, &serde_json::Value) -> Option<Resolution> + Send + Sync + 'static,
{
    fn resolve(&self, conflict: &Conflict, doc: &serde_json::Value) -> Option<Resolution> {
        self(conflict, doc)
    }
}

/// How the resolver site closes a report automatically.
#[derive(Clone, Default)]
pub enum Policy {
    /// Nobody resolves automatically: the report waits for a person.
    #[default]
    Manual,
    /// Keep what the merge chose and mark the report resolved.
    Accept,
    /// Bring the value back to the rule's `min`/`max` bound (a counter is
    /// incremented by the difference, so the compensation is itself a
    /// mergeable edit) and record the adjustment in the report.
    Clamp,
    /// Make the value the one written by this site.
    PreferSite(SiteName),
    /// A resolver written in Rust.
    Custom(Arc<dyn Resolver>),
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::Manual => f.write_str("manual"),
            Policy::Accept => f.write_str("accept"),
            Policy::Clamp => f.write_str("clamp"),
            Policy::PreferSite(site) => write!(f, "prefer:{site}"),
            Policy::Custom(_) => f.write_str("custom"),
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Policy, RuleError> {
        match s {
            "manual" => Ok(Policy::Manual),
            "accept" => Ok(Policy::Accept),
            "clamp" => Ok(Policy::Clamp),
            _ => match s.strip_prefix("prefer:") {
                Some(site) => site
                    .parse()
                    .map(Policy::PreferSite)
                    .map_err(|e| RuleError(format!("policy {s:?}: {e}"))),
                None => Err(RuleError(format!(
                    "unknown policy {s:?} (expected manual, accept, clamp or prefer:SITE)"
                ))),
            },
        }
    }
}

/// A declared invariant.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Unique name; part of report ids.
    pub name: String,
    /// Documents it applies to.
    pub docs: Glob,
    /// JSON pointer; a `*` segment matches any one key or index.
    pub path: String,
    /// The check.
    pub check: Check,
    /// The site that resolves its reports; `None` picks the first (by name)
    /// of the sites whose changes are involved.
    pub resolver: Option<SiteName>,
    /// How the resolver closes reports automatically.
    pub policy: Policy,
}

impl Rule {
    /// A rule with no resolver site and the manual policy.
    pub fn new(name: &str, docs: &str, path: &str, check: Check) -> Result<Rule, RuleError> {
        if name.is_empty() || name.len() > 128 {
            return Err(RuleError(format!(
                "rule name {name:?} must be 1 to 128 characters"
            )));
        }
        Pointer::parse(path).map_err(|e| RuleError(format!("rule {name:?}: path: {e}")))?;
        if let Check::Unique(field) = &check {
            if field.is_empty() {
                return Err(RuleError(format!("rule {name:?}: unique needs a field")));
            }
        }
        Ok(Rule {
            name: name.to_owned(),
            docs: Glob::new(docs),
            path: path.to_owned(),
            check,
            resolver: None,
            policy: Policy::Manual,
        })
    }

    /// Sets the resolver site.
    pub fn resolver(mut self, site: SiteName) -> Rule {
        self.resolver = Some(site);
        self
    }

    /// Sets the policy.
    pub fn policy(mut self, policy: Policy) -> Rule {
        self.policy = policy;
        self
    }

    pub(crate) fn segments(&self) -> Vec<String> {
        Pointer::parse(&self.path)
            .map(|p| p.segments().to_vec())
            .unwrap_or_default()
    }
}

/// A rule or configuration that does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuleError(pub String);

/// Whether a built-in detector runs for a document.
#[derive(Debug, Clone)]
pub struct DetectorSwitch {
    /// On by default.
    pub enabled: bool,
    /// Documents for which it is off even when enabled.
    pub skip: Vec<Glob>,
    /// How the resolver site closes its reports (the resolver is the first
    /// involved site by name).
    pub policy: Policy,
}

impl Default for DetectorSwitch {
    fn default() -> DetectorSwitch {
        DetectorSwitch {
            enabled: true,
            skip: Vec::new(),
            policy: Policy::Manual,
        }
    }
}

impl DetectorSwitch {
    /// Whether it runs for `doc`.
    pub fn enabled_for(&self, doc: &str) -> bool {
        self.enabled && !self.skip.iter().any(|g| g.matches(doc))
    }
}

/// Everything the conflict layer of a replica needs.
#[derive(Debug, Clone, Default)]
pub struct ConflictConfig {
    /// The `concurrent_write` detector.
    pub concurrent_write: DetectorSwitch,
    /// The `delete_update` detector.
    pub delete_update: DetectorSwitch,
    /// Declared invariants.
    pub rules: Vec<Rule>,
}

impl ConflictConfig {
    /// Adds a rule, refusing a duplicate name.
    pub fn with_rule(mut self, rule: Rule) -> Result<ConflictConfig, RuleError> {
        if self.rules.iter().any(|r| r.name == rule.name) {
            return Err(RuleError(format!("rule {:?} is declared twice", rule.name)));
        }
        self.rules.push(rule);
        Ok(self)
    }

    /// Turns every detector off (rules are still checked if declared).
    pub fn without_detectors(mut self) -> ConflictConfig {
        self.concurrent_write.enabled = false;
        self.delete_update.enabled = false;
        self
    }

    /// Whether any detector or rule covers `doc`.
    pub fn covers(&self, doc: &str) -> bool {
        self.concurrent_write.enabled_for(doc)
            || self.delete_update.enabled_for(doc)
            || self.rules.iter().any(|r| r.docs.matches(doc))
    }

    pub(crate) fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// The policy that applies to a report.
    pub(crate) fn policy_for(&self, conflict: &Conflict) -> Policy {
        match conflict.kind {
            Kind::ConcurrentWrite => self.concurrent_write.policy.clone(),
            Kind::DeleteUpdate => self.delete_update.policy.clone(),
            Kind::Invariant => conflict
                .rule
                .as_deref()
                .and_then(|r| self.rule(r))
                .map(|r| r.policy.clone())
                .unwrap_or_default(),
        }
    }
}
