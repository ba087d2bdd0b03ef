//! The daemon's configuration file (`sync-node.toml`): its TOML shape, the
//! checks made when it is loaded, and the paths it names, which are relative
//! to the directory holding the file.
//!
//! A loaded [`Config`] is valid: the site name and addresses parsed, no peer
//! listed twice, the site not its own peer, every conflict rule and detector
//! policy well-formed ([`Config::conflict_config`] succeeds). Errors name the file and the
//! problem, because an operator reads them at startup.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use archipelago::conflict::{Check, ConflictConfig, DetectorSwitch, Policy, Rule};
use archipelago::protocol::{Glob, Scope};
use archipelago::transport::tls::{ca_cert_from_pem, CertificateDer, SiteIdentity};
use archipelago::SiteName;
use serde::{Deserialize, Serialize};

use crate::api::ApiToken;

/// Name of the configuration file `sync-node init` writes.
pub const CONFIG_FILE_NAME: &str = "sync-node.toml";
/// Name of the API token file `sync-node init` writes next to the config.
pub const TOKEN_FILE_NAME: &str = "api.token";
/// Name of the file, next to the config, where a running node writes the
/// address its HTTP API is bound to.
pub const API_ADDR_FILE_NAME: &str = "api.addr";
/// Name of the file, next to the config, where a running node with a site
/// identity writes the address its sync endpoint is bound to.
pub const SYNC_ADDR_FILE_NAME: &str = "sync.addr";
/// Default data directory, relative to the config file.
pub const DATA_DIR_NAME: &str = "data";
/// Name of the SQLite database inside the data directory.
pub const STORE_FILE_NAME: &str = "store.db";
/// Name of the site certificate file `sync-node init --ca-dir` writes.
pub const SITE_CERT_FILE_NAME: &str = "site.crt";
/// Name of the site private key file `sync-node init --ca-dir` writes.
pub const SITE_KEY_FILE_NAME: &str = "site.key";
/// Most documents kept loaded that a config may ask for.
pub const CACHE_DOCS_MAX_LIMIT: usize = 10_000_000;

/// The configuration file as written in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// This node's site.
    pub site: SiteName,
    /// Where the store lives (relative to the config file's directory).
    pub data_dir: PathBuf,
    /// The HTTP API.
    pub api: ApiConfig,
    /// Site-to-site sync over QUIC; without a site identity (`cert`, `key`,
    /// `ca_cert`) the node runs alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncConfig>,
    /// Peer sites the sync endpoint accepts and (those whose name sorts
    /// after this site's) dials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
    /// Storage tuning.
    #[serde(default)]
    pub store: StoreConfig,
    /// automerge-repo clients on `GET /v1/automerge-repo` (`[clients]`).
    #[serde(default, skip_serializing_if = "ClientsConfig::is_default")]
    pub clients: ClientsConfig,
    /// How sagas' external steps are called (`[sagas]`).
    #[serde(default, skip_serializing_if = "SagasConfig::is_default")]
    pub sagas: SagasConfig,
    /// Bounds on what the node holds back for transactions (`[txn]`).
    #[serde(default, skip_serializing_if = "TxnConfig::is_default")]
    pub txn: TxnConfig,
    /// Backups the node takes by itself (`[backup]`); none without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupConfig>,
    /// The built-in conflict detectors (`[conflicts.concurrent_write]`,
    /// `[conflicts.delete_update]`).
    #[serde(default, skip_serializing_if = "ConflictsConfig::is_default")]
    pub conflicts: ConflictsConfig,
    /// Declared invariants (`[[rules]]`), checked after every merge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleConfig>,
    /// How this site manages the rights of bounded counters (`[[escrow]]`),
    /// first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub escrow: Vec<EscrowRuleConfig>,
    /// The strong tier (`[strong]`): voter sites and the namespaces written
    /// through it. Every site of the cluster lists the same `prefixes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strong: Option<StrongTierConfig>,
}

/// The `[strong]` table: linearizable transactions for documents under
/// `prefixes`, agreed through Raft among `voters` (3 or 5 sites, each a
/// peer of the others). A site with the table but not among the voters
/// forwards strong writes to the leader once the tier adds it as a member,
/// and otherwise answers them 503 `no_quorum`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrongTierConfig {
    /// The voter sites the tier starts with.
    pub voters: Vec<SiteName>,
    /// Globs of the documents written only through the tier.
    pub prefixes: Vec<String>,
    /// Interval of the leader's heartbeats, in milliseconds.
    #[serde(default = "default_strong_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Least silence before a follower stands for election, in
    /// milliseconds (size it to several round trips of the slowest link).
    #[serde(default = "default_strong_election_timeout_min_ms")]
    pub election_timeout_min_ms: u64,
    /// Most silence before a follower stands for election, in
    /// milliseconds.
    #[serde(default = "default_strong_election_timeout_max_ms")]
    pub election_timeout_max_ms: u64,
    /// How long a strong write waits to commit before it is answered 504
    /// `outcome_unknown`, in milliseconds.
    #[serde(default = "default_strong_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Log entries between snapshots.
    #[serde(default = "default_strong_snapshot_logs")]
    pub snapshot_logs: u64,
}

fn strong_defaults() -> archipelago::strong::StrongConfig {
    archipelago::strong::StrongConfig::new(Vec::new(), Vec::new())
}

fn default_strong_heartbeat_ms() -> u64 {
    strong_defaults().heartbeat_ms
}

fn default_strong_election_timeout_min_ms() -> u64 {
    strong_defaults().election_timeout_min_ms
}

fn default_strong_election_timeout_max_ms() -> u64 {
    strong_defaults().election_timeout_max_ms
}

fn default_strong_write_timeout_ms() -> u64 {
    strong_defaults().write_timeout_ms
}

fn default_strong_snapshot_logs() -> u64 {
    strong_defaults().snapshot_logs
}

/// Longest strong-tier timer a config may set, in milliseconds.
pub const STRONG_TIMER_MS_MAX: u64 = 10 * 60 * 1000;

impl StrongTierConfig {
    /// The library's settings for this table.
    pub fn tier_config(&self) -> archipelago::strong::StrongConfig {
        let mut config = archipelago::strong::StrongConfig::new(
            self.voters.clone(),
            self.prefixes
                .iter()
                .map(|p| archipelago::protocol::Glob::new(p))
                .collect(),
        );
        config.heartbeat_ms = self.heartbeat_ms;
        config.election_timeout_min_ms = self.election_timeout_min_ms;
        config.election_timeout_max_ms = self.election_timeout_max_ms;
        config.write_timeout_ms = self.write_timeout_ms;
        config.snapshot_logs = self.snapshot_logs;
        config
    }

    fn validate(&self, site: &SiteName, peers: &[PeerConfig]) -> Result<(), String> {
        if self.prefixes.is_empty() {
            return Err("strong.prefixes must name at least one glob".to_owned());
        }
        for (key, value) in [
            ("heartbeat_ms", self.heartbeat_ms),
            ("election_timeout_min_ms", self.election_timeout_min_ms),
            ("election_timeout_max_ms", self.election_timeout_max_ms),
            ("write_timeout_ms", self.write_timeout_ms),
        ] {
            if value > STRONG_TIMER_MS_MAX {
                return Err(format!(
                    "strong.{key} must be at most {STRONG_TIMER_MS_MAX}, not {value}"
                ));
            }
        }
        self.tier_config()
            .check()
            .map_err(|e| format!("strong: {e}"))?;
        for voter in self.voters.iter().filter(|v| *v != site) {
            if !peers.iter().any(|p| p.site == *voter) {
                return Err(format!(
                    "strong.voters names {voter}, which is not among this site's peers"
                ));
            }
        }
        Ok(())
    }
}

/// One `[[escrow]]` entry: the policy of the bounded counters at `path` in
/// the documents `docs` matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscrowRuleConfig {
    /// Document glob (`*` any run, `?` one character); every document when
    /// left out.
    #[serde(default = "all_docs")]
    pub docs: String,
    /// The counter's JSON pointer; a `*` segment matches any one key.
    pub path: String,
    /// Rights this site keeps: below it, it asks peers for more ahead of
    /// demand, and it never grants away what is under it.
    #[serde(default)]
    pub low_water: i64,
    /// How much it grants when asked: `"on_demand"` (what was asked, as far
    /// as it can spare) or `"proportional"` (at least half its spare).
    #[serde(default)]
    pub rebalance: Rebalance,
    /// How long an op short of rights waits for a grant, in milliseconds,
    /// when the request does not say (`wait_ms`).
    #[serde(default = "default_escrow_wait_ms")]
    pub wait_ms: u64,
}

/// `rebalance` of an `[[escrow]]` entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rebalance {
    /// Grant what was asked for.
    OnDemand,
    /// Grant at least half of what can be spared.
    #[default]
    Proportional,
}

fn all_docs() -> String {
    "*".to_owned()
}

fn default_escrow_wait_ms() -> u64 {
    2000
}

/// Longest `wait_ms` a config or a request may ask for.
pub const ESCROW_WAIT_MS_MAX: u64 = 30_000;

/// The `[conflicts]` table: one sub-table per built-in detector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictsConfig {
    /// `[conflicts.concurrent_write]`: one field set concurrently to
    /// different values.
    #[serde(default, skip_serializing_if = "DetectorConfig::is_default")]
    pub concurrent_write: DetectorConfig,
    /// `[conflicts.delete_update]`: an object deleted at one site while
    /// another wrote inside it.
    #[serde(default, skip_serializing_if = "DetectorConfig::is_default")]
    pub delete_update: DetectorConfig,
}

impl ConflictsConfig {
    fn is_default(&self) -> bool {
        *self == ConflictsConfig::default()
    }
}

/// One built-in detector's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorConfig {
    /// Whether it runs at all (default true).
    #[serde(default = "enabled_by_default", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// Documents it skips (globs over document ids).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<Glob>,
    /// How its reports are closed automatically: `manual` (the default),
    /// `accept` or `prefer:SITE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

fn enabled_by_default() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

impl Default for DetectorConfig {
    fn default() -> DetectorConfig {
        DetectorConfig {
            enabled: true,
            skip: Vec::new(),
            policy: None,
        }
    }
}

impl DetectorConfig {
    fn is_default(&self) -> bool {
        *self == DetectorConfig::default()
    }
}

/// One `[[rules]]` entry: an invariant over the documents matching `docs`,
/// with exactly one check (`min`, `max`, `unique` or `references`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name; part of report ids, so renaming a rule makes its
    /// future reports new ones.
    pub name: String,
    /// Glob over document ids (`*` spans `/`).
    pub docs: String,
    /// JSON pointer of the checked value; a `*` segment matches any one key
    /// or index.
    pub path: String,
    /// The number there is at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// The number there is at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The entries of the map or list there have distinct values of this
    /// field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<String>,
    /// The value there names an existing entry: `"DOCGLOB:POINTER"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub references: Option<String>,
    /// The site that resolves its reports; by default the first (by name)
    /// of the sites involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolver: Option<String>,
    /// How the resolver closes reports automatically: `manual` (the
    /// default), `accept`, `clamp` (with `min` or `max`) or `prefer:SITE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

impl RuleConfig {
    /// The rule it declares, or why it makes no sense (naming the rule).
    pub fn to_rule(&self) -> Result<Rule, String> {
        let name = &self.name;
        let mut checks = Vec::new();
        if let Some(min) = self.min {
            checks.push(("min", finite(name, "min", min).map(Check::Min)));
        }
        if let Some(max) = self.max {
            checks.push(("max", finite(name, "max", max).map(Check::Max)));
        }
        if let Some(field) = &self.unique {
            checks.push(("unique", Ok(Check::Unique(field.clone()))));
        }
        if let Some(target) = &self.references {
            let check = Check::references(target).map_err(|e| format!("rule {name:?}: {e}"));
            checks.push(("references", check));
        }
        let check = match checks.len() {
            0 => {
                return Err(format!(
                    "rule {name:?} has no check: give one of min, max, unique or references"
                ))
            }
            1 => checks.pop().expect("one check").1?,
            _ => {
                let names: Vec<&str> = checks.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "rule {name:?} has {} checks ({}): give exactly one per rule, and declare another rule for the other",
                    names.len(),
                    names.join(", ")
                ));
            }
        };
        let bounded = matches!(check, Check::Min(_) | Check::Max(_));
        let mut rule = Rule::new(name, &self.docs, &self.path, check).map_err(|e| {
            // The library names the rule in most of its errors.
            let message = e.to_string();
            if message.contains(&format!("{name:?}")) {
                message
            } else {
                format!("rule {name:?}: {message}")
            }
        })?;
        if let Some(site) = &self.resolver {
            let site: SiteName = site
                .parse()
                .map_err(|e| format!("rule {name:?}: resolver {site:?}: {e}"))?;
            rule = rule.resolver(site);
        }
        if let Some(text) = &self.policy {
            let policy = parse_policy(text).map_err(|e| format!("rule {name:?}: {e}"))?;
            if matches!(policy, Policy::Clamp) && !bounded {
                return Err(format!(
                    "rule {name:?}: policy \"clamp\" needs a min or max check"
                ));
            }
            rule = rule.policy(policy);
        }
        Ok(rule)
    }
}

fn finite(rule: &str, key: &str, value: f64) -> Result<f64, String> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(format!("rule {rule:?}: {key} must be a finite number"))
    }
}

fn parse_policy(text: &str) -> Result<Policy, String> {
    text.parse::<Policy>().map_err(|e| e.to_string())
}

impl DetectorConfig {
    /// The library's switch for this detector; `name` (such as
    /// `conflicts.concurrent_write`) is used in errors.
    fn to_switch(&self, name: &str) -> Result<DetectorSwitch, String> {
        let policy = match &self.policy {
            None => Policy::Manual,
            Some(text) => {
                let policy = parse_policy(text).map_err(|e| format!("{name}.policy: {e}"))?;
                if matches!(policy, Policy::Clamp) {
                    return Err(format!(
                        "{name}.policy: \"clamp\" applies to rules with min or max only"
                    ));
                }
                policy
            }
        };
        Ok(DetectorSwitch {
            enabled: self.enabled,
            skip: self.skip.clone(),
            policy,
        })
    }
}

/// The conflict layer's settings declared by `file`: detectors and rules.
fn conflict_config(file: &ConfigFile) -> Result<ConflictConfig, String> {
    let mut config = ConflictConfig {
        concurrent_write: file
            .conflicts
            .concurrent_write
            .to_switch("conflicts.concurrent_write")?,
        delete_update: file
            .conflicts
            .delete_update
            .to_switch("conflicts.delete_update")?,
        rules: Vec::with_capacity(file.rules.len()),
    };
    for rule in &file.rules {
        config = config
            .with_rule(rule.to_rule()?)
            .map_err(|e| e.to_string())?;
    }
    Ok(config)
}

/// The `[api]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the HTTP API binds; port 0 picks a free port, which the node
    /// then writes to [`API_ADDR_FILE_NAME`].
    pub listen: SocketAddr,
    /// File holding the bearer token (relative to the config's directory).
    pub token_file: PathBuf,
    /// Origins (`http://localhost:5173`) whose web pages may call the API
    /// from a browser; none by default. See [`crate::api::cors`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cors_origins: Vec<String>,
}

/// The `[sync]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Address the QUIC endpoint binds; port 0 picks a free port, which the
    /// node then writes to [`SYNC_ADDR_FILE_NAME`].
    pub listen: SocketAddr,
    /// Informational only, and no longer written by `sync-node init`: the
    /// directory of the cluster CA the identity was issued from. The node
    /// never reads it (it reads only the files below); configs written by
    /// earlier versions carry it, so it is still accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_dir: Option<PathBuf>,
    /// The site's certificate (PEM, relative to the config's directory).
    /// `cert`, `key` and `ca_cert` are given together or not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The site's private key (PEM, relative to the config's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The cluster CA certificate (PEM, relative to the config's
    /// directory), the only root trusted for peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

/// One `[[peers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's site.
    pub site: SiteName,
    /// Where the peer's sync endpoint listens.
    pub addr: PeerAddr,
    /// Documents sent to the peer (globs over document ids; `*` spans `/`).
    /// Everything when left out.
    #[serde(default = "all_documents", skip_serializing_if = "is_all_documents")]
    pub send: Vec<Glob>,
    /// Documents the peer may write here; its changes to others are refused
    /// and reported. Everything when left out.
    #[serde(default = "all_documents", skip_serializing_if = "is_all_documents")]
    pub receive: Vec<Glob>,
}

fn all_documents() -> Vec<Glob> {
    vec![Glob::new("*")]
}

fn is_all_documents(globs: &[Glob]) -> bool {
    *globs == all_documents()
}

impl PeerConfig {
    /// The replication scope with this peer.
    pub fn scope(&self) -> Scope {
        Scope {
            send: self.send.clone(),
            receive: self.receive.clone(),
        }
    }
}

impl FromStr for PeerConfig {
    type Err = String;

    /// Parses `SITE=HOST:PORT`, the form of the `--peer` option.
    fn from_str(text: &str) -> Result<PeerConfig, String> {
        let (site, addr) = text
            .split_once('=')
            .ok_or_else(|| format!("peer {text:?} is not SITE=HOST:PORT"))?;
        Ok(PeerConfig {
            site: site.parse().map_err(|e| format!("{e}"))?,
            addr: addr.parse()?,
            send: all_documents(),
            receive: all_documents(),
        })
    }
}

/// A `HOST:PORT` address of a peer: an IP address or a DNS name, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PeerAddr(String);

/// Longest accepted peer address, in bytes.
const PEER_ADDR_BYTES_MAX: usize = 260;

impl PeerAddr {
    /// The address as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PeerAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<PeerAddr, String> {
        let invalid = |why: &str| format!("invalid peer address {text:?}: {why}");
        if text.len() > PEER_ADDR_BYTES_MAX {
            return Err(invalid("too long"));
        }
        if text.parse::<SocketAddr>().is_ok() {
            return Ok(PeerAddr(text.to_owned()));
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected HOST:PORT"))?;
        port.parse::<u16>()
            .map_err(|_| invalid("the port is not a number from 0 to 65535"))?;
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            && !host.starts_with('-')
            && !host.starts_with('.');
        if !host_ok {
            return Err(invalid("the host is neither an IP address nor a DNS name"));
        }
        Ok(PeerAddr(text.to_owned()))
    }
}

impl TryFrom<String> for PeerAddr {
    type Error = String;
    fn try_from(text: String) -> Result<PeerAddr, String> {
        text.parse()
    }
}

impl From<PeerAddr> for String {
    fn from(addr: PeerAddr) -> String {
        addr.0
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `[store]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Most documents kept loaded in memory.
    #[serde(default = "default_cache_docs_max")]
    pub cache_docs_max: usize,
    /// Seconds a loaded document stays in memory unused before it is
    /// dropped back to its stored bytes (30 by default).
    #[serde(
        default = "default_cache_idle_s",
        skip_serializing_if = "is_default_cache_idle_s"
    )]
    pub cache_idle_s: u64,
}

fn default_cache_docs_max() -> usize {
    1024
}

fn default_cache_idle_s() -> u64 {
    30
}

fn is_default_cache_idle_s(s: &u64) -> bool {
    *s == default_cache_idle_s()
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            cache_docs_max: default_cache_docs_max(),
            cache_idle_s: default_cache_idle_s(),
        }
    }
}

/// The `[clients]` table: where automerge-repo clients' documents go, and
/// the limits of their connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientsConfig {
    /// Where documents that clients create are stored: `NAMESPACE/ID`.
    #[serde(default = "default_client_namespace")]
    pub namespace: String,
    /// Open WebSockets one token may hold (the admin token counts as one).
    #[serde(default = "default_connections_per_token")]
    pub connections_per_token: usize,
    /// Documents one connection may sync.
    #[serde(default = "default_docs_per_connection")]
    pub docs_per_connection: usize,
    /// Messages a second one connection may send, on average (five
    /// seconds' worth may come at once).
    #[serde(default = "default_messages_per_second")]
    pub messages_per_second: u32,
    /// The largest message taken, in bytes.
    #[serde(default = "default_message_bytes_max")]
    pub message_bytes_max: usize,
}

/// Largest `[clients]` count a config may set.
pub const CLIENTS_LIMIT_MAX: usize = 1 << 24;
/// Largest `clients.message_bytes_max` a config may set.
pub const CLIENT_MESSAGE_BYTES_LIMIT: usize = 64 << 20;

fn default_client_namespace() -> String {
    crate::api::DEFAULT_CLIENT_NAMESPACE.to_owned()
}

fn default_connections_per_token() -> usize {
    10_000
}

fn default_docs_per_connection() -> usize {
    10_000
}

fn default_messages_per_second() -> u32 {
    1_000
}

fn default_message_bytes_max() -> usize {
    16 << 20
}

impl Default for ClientsConfig {
    fn default() -> ClientsConfig {
        ClientsConfig {
            namespace: default_client_namespace(),
            connections_per_token: default_connections_per_token(),
            docs_per_connection: default_docs_per_connection(),
            messages_per_second: default_messages_per_second(),
            message_bytes_max: default_message_bytes_max(),
        }
    }
}

impl ClientsConfig {
    fn is_default(&self) -> bool {
        *self == ClientsConfig::default()
    }

    fn validate(&self) -> Result<(), String> {
        let namespace = &self.namespace;
        let valid = !namespace.is_empty()
            && !namespace.ends_with('/')
            && format!("{namespace}/x")
                .parse::<archipelago::DocId>()
                .is_ok();
        if !valid {
            return Err(format!(
                "clients.namespace {namespace:?} must be a document id prefix without a trailing /"
            ));
        }
        for (key, value) in [
            ("connections_per_token", self.connections_per_token),
            ("docs_per_connection", self.docs_per_connection),
            ("messages_per_second", self.messages_per_second as usize),
        ] {
            if value == 0 || value > CLIENTS_LIMIT_MAX {
                return Err(format!(
                    "clients.{key} must be from 1 to {CLIENTS_LIMIT_MAX}, not {value}"
                ));
            }
        }
        if !(1024..=CLIENT_MESSAGE_BYTES_LIMIT).contains(&self.message_bytes_max) {
            return Err(format!(
                "clients.message_bytes_max must be from 1024 to {CLIENT_MESSAGE_BYTES_LIMIT}, not {}",
                self.message_bytes_max
            ));
        }
        Ok(())
    }
}

/// The `[sagas]` table: the external calls of saga steps run at this site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagasConfig {
    /// URL globs external steps may call (`https://payments.example/*`;
    /// `*` matches any run of characters). Loopback URLs
    /// (`http://127.0.0.1:...`, `http://localhost:...`) are always allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_allow: Vec<String>,
    /// Tries of one call at most (network errors and 5xx are retried).
    #[serde(default = "default_http_attempts_max")]
    pub http_attempts_max: u32,
    /// Wait before the second try, in milliseconds; doubled each try.
    #[serde(default = "default_http_backoff_ms")]
    pub http_backoff_ms: u64,
    /// Longest wait between tries, in milliseconds.
    #[serde(default = "default_http_backoff_max_ms")]
    pub http_backoff_max_ms: u64,
    /// Longest one try may take, in milliseconds.
    #[serde(default = "default_http_timeout_ms")]
    pub http_timeout_ms: u64,
}

/// Largest `[sagas]` time a config may set, in milliseconds (a day).
pub const SAGAS_MS_MAX: u64 = 86_400_000;
/// Most tries of one external call a config may set.
pub const SAGAS_ATTEMPTS_MAX: u32 = 1_000;

fn default_http_attempts_max() -> u32 {
    5
}

fn default_http_backoff_ms() -> u64 {
    200
}

fn default_http_backoff_max_ms() -> u64 {
    10_000
}

fn default_http_timeout_ms() -> u64 {
    10_000
}

impl Default for SagasConfig {
    fn default() -> SagasConfig {
        SagasConfig {
            http_allow: Vec::new(),
            http_attempts_max: default_http_attempts_max(),
            http_backoff_ms: default_http_backoff_ms(),
            http_backoff_max_ms: default_http_backoff_max_ms(),
            http_timeout_ms: default_http_timeout_ms(),
        }
    }
}

impl SagasConfig {
    fn is_default(&self) -> bool {
        *self == SagasConfig::default()
    }

    /// Whether an external step may call `url`.
    pub fn allows(&self, url: &str) -> bool {
        let loopback = ["http://127.0.0.1:", "http://localhost:", "http://[::1]:"]
            .iter()
            .any(|prefix| url.starts_with(prefix));
        loopback
            || self
                .http_allow
                .iter()
                .any(|glob| archipelago::protocol::scope::Glob::new(glob).matches(url))
    }

    fn validate(&self) -> Result<(), String> {
        if !(1..=SAGAS_ATTEMPTS_MAX).contains(&self.http_attempts_max) {
            return Err(format!(
                "sagas.http_attempts_max must be from 1 to {SAGAS_ATTEMPTS_MAX}, not {}",
                self.http_attempts_max
            ));
        }
        for (key, value) in [
            ("http_backoff_ms", self.http_backoff_ms),
            ("http_backoff_max_ms", self.http_backoff_max_ms),
            ("http_timeout_ms", self.http_timeout_ms),
        ] {
            if value == 0 || value > SAGAS_MS_MAX {
                return Err(format!(
                    "sagas.{key} must be from 1 to {SAGAS_MS_MAX}, not {value}"
                ));
            }
        }
        for glob in &self.http_allow {
            if !(glob.starts_with("http://") || glob.starts_with("https://")) {
                return Err(format!(
                    "sagas.http_allow: {glob:?} must start with http:// or https://"
                ));
            }
        }
        Ok(())
    }
}

/// The `[txn]` table: bounds on the changes received from peers that wait
/// for the rest of their transaction. Past a bound the oldest waiting
/// transaction is dropped whole (never applied in part) and comes back
/// with the next reconciliation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxnConfig {
    /// Most changes held.
    #[serde(default = "default_hold_changes_max")]
    pub hold_changes_max: usize,
    /// Most bytes of changes held.
    #[serde(default = "default_hold_bytes_max")]
    pub hold_bytes_max: usize,
    /// Longest a transaction waits for its members, in seconds.
    #[serde(default = "default_hold_secs_max")]
    pub hold_secs_max: u64,
}

/// Largest `[txn]` bound a config may set.
pub const TXN_HOLD_LIMIT: u64 = 1 << 40;

fn default_hold_changes_max() -> usize {
    archipelago::HoldLimits::default().changes_max
}

fn default_hold_bytes_max() -> usize {
    archipelago::HoldLimits::default().bytes_max
}

fn default_hold_secs_max() -> u64 {
    archipelago::HoldLimits::default().age_max.as_secs()
}

impl Default for TxnConfig {
    fn default() -> TxnConfig {
        TxnConfig {
            hold_changes_max: default_hold_changes_max(),
            hold_bytes_max: default_hold_bytes_max(),
            hold_secs_max: default_hold_secs_max(),
        }
    }
}

impl TxnConfig {
    fn is_default(&self) -> bool {
        *self == TxnConfig::default()
    }

    /// The bounds for [`archipelago::ReplicaOptions::txn_hold`].
    pub fn hold_limits(&self) -> archipelago::HoldLimits {
        archipelago::HoldLimits {
            changes_max: self.hold_changes_max,
            bytes_max: self.hold_bytes_max,
            age_max: std::time::Duration::from_secs(self.hold_secs_max),
        }
    }
}

/// The `[backup]` table: backups the node takes every `interval_secs`
/// into `dir`, keeping the newest `keep`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// Where backups go (relative to the config file's directory); best on
    /// another disk than the data directory.
    pub dir: PathBuf,
    /// Seconds between two backups (1 to a year), counted from the newest
    /// backup already in `dir` (a minute after the start when there is
    /// none).
    pub interval_secs: u64,
    /// How many of this site's backups in `dir` to keep (1 to 10,000); the
    /// oldest beyond that are deleted after each new one.
    #[serde(default = "default_backup_keep")]
    pub keep: usize,
}

fn default_backup_keep() -> usize {
    7
}

/// Longest interval between scheduled backups, in seconds (a year).
pub const BACKUP_INTERVAL_SECS_MAX: u64 = 365 * 24 * 3600;
/// Most scheduled backups a config may keep.
pub const BACKUP_KEEP_MAX: usize = 10_000;

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not have the expected shape.
    #[error("config file {} is invalid: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation, with line and column.
        message: String,
    },
    /// The file parsed but its contents do not make sense.
    #[error("config file {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The API token file could not be used.
    #[error("token file {} (named by config file {}): {message}", token_path.display(), path.display())]
    Token {
        /// The config file.
        path: PathBuf,
        /// The token file.
        token_path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A site certificate, key or CA certificate file could not be used.
    #[error("{} (named by config file {}): {message}", file.display(), path.display())]
    Tls {
        /// The config file.
        path: PathBuf,
        /// The certificate or key file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The site identity named by the `[sync]` table, loaded and checked.
#[derive(Debug)]
pub struct SyncIdentity {
    /// The site's certificate and key; the certificate names the
    /// configured site.
    pub identity: SiteIdentity,
    /// The cluster CA certificate.
    pub ca_cert: CertificateDer<'static>,
}

/// A loaded and checked configuration, with the location it was read from
/// (relative paths inside it are resolved against that directory).
#[derive(Debug, Clone)]
pub struct Config {
    /// The contents.
    pub file: ConfigFile,
    path: PathBuf,
    dir: PathBuf,
}

impl Config {
    /// Reads and checks the configuration file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: ConfigFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Config::new(file, path)
    }

    /// Checks `file` as if it had been read from `path`.
    pub fn new(file: ConfigFile, path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref().to_path_buf();
        if let Err(message) = validate(&file) {
            return Err(ConfigError::Invalid { path, message });
        }
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Config { file, path, dir })
    }

    /// The configuration file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory holding the configuration file.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data directory, resolved.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(&self.file.data_dir)
    }

    /// The SQLite database file.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir().join(STORE_FILE_NAME)
    }

    /// The directory of scheduled backups, resolved, if `[backup]` is set.
    pub fn backup_dir(&self) -> Option<PathBuf> {
        self.file.backup.as_ref().map(|b| self.dir.join(&b.dir))
    }

    /// The API token file, resolved.
    pub fn token_path(&self) -> PathBuf {
        self.dir.join(&self.file.api.token_file)
    }

    /// The file where a running node writes its bound API address.
    pub fn api_addr_path(&self) -> PathBuf {
        self.dir.join(API_ADDR_FILE_NAME)
    }

    /// The file where a running node writes its bound sync address.
    pub fn sync_addr_path(&self) -> PathBuf {
        self.dir.join(SYNC_ADDR_FILE_NAME)
    }

    /// The site certificate, key and CA certificate files named by
    /// `[sync]`, resolved, if it names them.
    pub fn tls_paths(&self) -> Option<TlsPaths> {
        let sync = self.file.sync.as_ref()?;
        match (&sync.cert, &sync.key, &sync.ca_cert) {
            (Some(cert), Some(key), Some(ca_cert)) => Some(TlsPaths {
                cert: self.dir.join(cert),
                key: self.dir.join(key),
                ca_cert: self.dir.join(ca_cert),
            }),
            // `validate` allows all three or none.
            _ => None,
        }
    }

    /// Loads the site identity and CA certificate named by `[sync]`, or
    /// `None` when the config names none. Fails, naming the file, when a
    /// file is missing or unusable, or when the certificate is not for this
    /// config's site.
    pub fn load_sync_identity(&self) -> Result<Option<SyncIdentity>, ConfigError> {
        let Some(paths) = self.tls_paths() else {
            return Ok(None);
        };
        let error = |file: &Path, message: String| ConfigError::Tls {
            path: self.path.clone(),
            file: file.to_path_buf(),
            message,
        };
        let read = |file: &Path| {
            std::fs::read_to_string(file).map_err(|e| error(file, format!("cannot read it: {e}")))
        };
        let cert_pem = read(&paths.cert)?;
        let key_pem = read(&paths.key)?;
        let ca_pem = read(&paths.ca_cert)?;
        warn_if_readable_by_others(&paths.key);
        let identity = SiteIdentity::from_pem(&cert_pem, &key_pem)
            .map_err(|e| error(&paths.cert, e.to_string()))?;
        if identity.site() != &self.file.site {
            return Err(error(
                &paths.cert,
                format!(
                    "the certificate is for site {}, not {}",
                    identity.site(),
                    self.file.site
                ),
            ));
        }
        let ca_cert =
            ca_cert_from_pem(&ca_pem).map_err(|e| error(&paths.ca_cert, e.to_string()))?;
        Ok(Some(SyncIdentity { identity, ca_cert }))
    }

    /// The conflict layer's settings: the `[conflicts]` detectors and the
    /// `[[rules]]`, for [`archipelago::ReplicaOptions::conflicts`].
    pub fn conflict_config(&self) -> Result<ConflictConfig, ConfigError> {
        conflict_config(&self.file).map_err(|message| ConfigError::Invalid {
            path: self.path.clone(),
            message,
        })
    }

    /// The bounded counters' policies (`[[escrow]]`), for
    /// [`archipelago::ReplicaOptions::escrow`].
    pub fn escrow_config(&self) -> archipelago::escrow::EscrowConfig {
        use archipelago::escrow::{GrantPolicy, Policy, Rule};
        archipelago::escrow::EscrowConfig {
            rules: self
                .file
                .escrow
                .iter()
                .map(|rule| Rule {
                    docs: Glob::new(&rule.docs),
                    path: rule.path.clone(),
                    policy: Policy {
                        low_water: rule.low_water,
                        rebalance: match rule.rebalance {
                            Rebalance::OnDemand => GrantPolicy::OnDemand,
                            Rebalance::Proportional => GrantPolicy::Proportional,
                        },
                        wait: std::time::Duration::from_millis(rule.wait_ms),
                    },
                })
                .collect(),
            default: Policy::default(),
        }
    }

    /// The origins whose web pages may call the API (`[api] cors_origins`).
    pub fn cors_origins(&self) -> Result<crate::api::CorsOrigins, ConfigError> {
        crate::api::CorsOrigins::new(&self.file.api.cors_origins).map_err(|message| {
            ConfigError::Invalid {
                path: self.path.clone(),
                message,
            }
        })
    }

    /// Reads the API token from the token file.
    pub fn read_token(&self) -> Result<ApiToken, ConfigError> {
        let token_path = self.token_path();
        let error = |message: String| ConfigError::Token {
            path: self.path.clone(),
            token_path: token_path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&token_path).map_err(|e| error(e.to_string()))?;
        ApiToken::new(text.trim()).map_err(|e| error(e.to_string()))
    }
}

/// The site identity files named by `[sync]`, resolved against the config's
/// directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// The site certificate.
    pub cert: PathBuf,
    /// The site private key.
    pub key: PathBuf,
    /// The cluster CA certificate.
    pub ca_cert: PathBuf,
}

/// Logs a warning when a private key file can be read by other users.
fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(metadata) = std::fs::metadata(path) {
            if metadata.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(), "private key is readable by other users; chmod 600 it");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Checks what TOML parsing cannot: peers, limits, identity files, rules.
pub(crate) fn validate(file: &ConfigFile) -> Result<(), String> {
    if let Some(sync) = &file.sync {
        let named = [&sync.cert, &sync.key, &sync.ca_cert]
            .iter()
            .filter(|path| path.is_some())
            .count();
        if named != 0 && named != 3 {
            return Err("sync.cert, sync.key and sync.ca_cert must be given together".to_owned());
        }
    }
    let mut seen = BTreeSet::new();
    for peer in &file.peers {
        if peer.site == file.site {
            return Err(format!(
                "site {} is listed as its own peer",
                peer.site.as_str()
            ));
        }
        if !seen.insert(peer.site.clone()) {
            return Err(format!(
                "peer {} is listed more than once",
                peer.site.as_str()
            ));
        }
    }
    crate::api::CorsOrigins::new(&file.api.cors_origins)?;
    for (i, rule) in file.escrow.iter().enumerate() {
        let at = format!("escrow[{i}]");
        archipelago::doc::Pointer::parse(&rule.path)
            .map_err(|e| format!("{at}.path: {e}"))
            .and_then(|p| {
                if p.is_root() {
                    Err(format!("{at}.path must name a field"))
                } else {
                    Ok(())
                }
            })?;
        if rule.low_water < 0 {
            return Err(format!("{at}.low_water must not be negative"));
        }
        if rule.wait_ms > ESCROW_WAIT_MS_MAX {
            return Err(format!(
                "{at}.wait_ms must be at most {ESCROW_WAIT_MS_MAX}, not {}",
                rule.wait_ms
            ));
        }
    }
    file.clients.validate()?;
    file.sagas.validate()?;
    let txn = &file.txn;
    for (key, value) in [
        ("hold_changes_max", txn.hold_changes_max as u64),
        ("hold_bytes_max", txn.hold_bytes_max as u64),
        ("hold_secs_max", txn.hold_secs_max),
    ] {
        if value == 0 || value > TXN_HOLD_LIMIT {
            return Err(format!(
                "txn.{key} must be from 1 to {TXN_HOLD_LIMIT}, not {value}"
            ));
        }
    }
    let cache = file.store.cache_docs_max;
    if cache == 0 || cache > CACHE_DOCS_MAX_LIMIT {
        return Err(format!(
            "store.cache_docs_max must be from 1 to {CACHE_DOCS_MAX_LIMIT}, not {cache}"
        ));
    }
    if let Some(backup) = &file.backup {
        if !(1..=BACKUP_INTERVAL_SECS_MAX).contains(&backup.interval_secs) {
            return Err(format!(
                "backup.interval_secs must be from 1 to {BACKUP_INTERVAL_SECS_MAX}, not {}",
                backup.interval_secs
            ));
        }
        if !(1..=BACKUP_KEEP_MAX).contains(&backup.keep) {
            return Err(format!(
                "backup.keep must be from 1 to {BACKUP_KEEP_MAX}, not {}",
                backup.keep
            ));
        }
    }
    if let Some(strong) = &file.strong {
        strong.validate(&file.site, &file.peers)?;
    }
    conflict_config(file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
site = "us-east"
data_dir = "data"

[api]
listen = "127.0.0.1:7070"
token_file = "api.token"

[sync]
listen = "127.0.0.1:7071"
ca_dir = "/path/ca"

[[peers]]
site = "eu-west"
addr = "127.0.0.1:7081"

[[peers]]
site = "ap-south"
addr = "ap-south.example.com:7081"

[store]
cache_docs_max = 16

[[rules]]
name = "stock-non-negative"
docs = "inventory/*"
path = "/stock"
min = 0
resolver = "us-east"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "x.toml".into(),
            message: e.to_string(),
        })?;
        Config::new(file, "/etc/archipelago/x.toml")
    }

    #[test]
    fn example_parses_and_paths_resolve_against_the_config_dir() {
        let config = parse(EXAMPLE).unwrap();
        assert_eq!(config.file.site.as_str(), "us-east");
        assert_eq!(config.file.peers.len(), 2);
        assert_eq!(config.file.store.cache_docs_max, 16);
        assert_eq!(config.file.rules.len(), 1);
        let conflicts = config.conflict_config().unwrap();
        assert_eq!(conflicts.rules.len(), 1);
        let rule = &conflicts.rules[0];
        assert_eq!(rule.name, "stock-non-negative");
        assert!(rule.docs.matches("inventory/sku-1"));
        assert!(!rule.docs.matches("orders/1"));
        assert_eq!(rule.path, "/stock");
        assert!(matches!(rule.check, Check::Min(min) if min == 0.0));
        assert_eq!(
            rule.resolver.as_ref().map(SiteName::as_str),
            Some("us-east")
        );
        assert!(matches!(rule.policy, Policy::Manual));
        assert!(conflicts.concurrent_write.enabled && conflicts.delete_update.enabled);
        assert_eq!(
            config.store_path(),
            PathBuf::from("/etc/archipelago/data/store.db")
        );
        assert_eq!(
            config.token_path(),
            PathBuf::from("/etc/archipelago/api.token")
        );
    }

    #[test]
    fn txn_hold_bounds_are_read_and_checked() {
        let config = parse(EXAMPLE).unwrap();
        assert_eq!(config.file.txn, TxnConfig::default());
        assert_eq!(
            config.file.txn.hold_limits(),
            archipelago::HoldLimits::default()
        );
        let text = format!("{EXAMPLE}\n[txn]\nhold_changes_max = 10\nhold_secs_max = 5\n");
        let limits = parse(&text).unwrap().file.txn.hold_limits();
        assert_eq!(limits.changes_max, 10);
        assert_eq!(limits.age_max, std::time::Duration::from_secs(5));
        assert_eq!(
            limits.bytes_max,
            archipelago::HoldLimits::default().bytes_max
        );
        let zero = format!("{EXAMPLE}\n[txn]\nhold_bytes_max = 0\n");
        let err = parse(&zero).unwrap_err().to_string();
        assert!(err.contains("txn.hold_bytes_max"), "{err}");
    }

    #[test]
    fn saga_calls_are_read_and_checked() {
        let sagas = parse(EXAMPLE).unwrap().file.sagas;
        assert!(sagas.allows("http://127.0.0.1:8080/pay"));
        assert!(!sagas.allows("https://payments.example/pay"));
        let text = format!(
            "{EXAMPLE}\n[sagas]\nhttp_allow = [\"https://payments.example/*\"]\nhttp_attempts_max = 3\n"
        );
        let sagas = parse(&text).unwrap().file.sagas;
        assert!(sagas.allows("https://payments.example/v1/charge"));
        assert!(!sagas.allows("https://evil.example/payments.example/"));
        assert_eq!(sagas.http_attempts_max, 3);
        for (bad, key) in [
            ("http_attempts_max = 0", "sagas.http_attempts_max"),
            ("http_timeout_ms = 0", "sagas.http_timeout_ms"),
            ("http_allow = [\"payments.example\"]", "sagas.http_allow"),
        ] {
            let text = format!("{EXAMPLE}\n[sagas]\n{bad}\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn client_limits_are_read_and_checked() {
        assert_eq!(
            parse(EXAMPLE).unwrap().file.clients,
            ClientsConfig::default()
        );
        let text =
            format!("{EXAMPLE}\n[clients]\nnamespace = \"apps/js\"\nconnections_per_token = 3\n");
        let clients = parse(&text).unwrap().file.clients;
        assert_eq!(clients.namespace, "apps/js");
        assert_eq!(clients.connections_per_token, 3);
        assert_eq!(clients.docs_per_connection, 10_000);
        for (bad, key) in [
            ("namespace = \"apps/\"", "clients.namespace"),
            ("namespace = \"\"", "clients.namespace"),
            ("namespace = \"has space\"", "clients.namespace"),
            ("connections_per_token = 0", "clients.connections_per_token"),
            ("message_bytes_max = 10", "clients.message_bytes_max"),
        ] {
            let text = format!("{EXAMPLE}\n[clients]\n{bad}\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = EXAMPLE.replace("[store]", "[store]\ncache_size = 3");
        assert!(matches!(parse(&text), Err(ConfigError::Parse { .. })));
        let text = format!("colour = \"blue\"\n{EXAMPLE}");
        assert!(matches!(parse(&text), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn duplicate_and_self_peers_are_refused() {
        let dup = EXAMPLE.replace("ap-south\"\naddr", "eu-west\"\naddr");
        let err = parse(&dup).unwrap_err().to_string();
        assert!(err.contains("more than once"), "{err}");
        let own = EXAMPLE.replace("\"eu-west\"", "\"us-east\"");
        let err = parse(&own).unwrap_err().to_string();
        assert!(err.contains("own peer"), "{err}");
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.toml");
        std::fs::write(&path, "site = \"US\"\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("broken.toml"), "{err}");
        let err = Config::load(dir.path().join("absent.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent.toml"), "{err}");
    }

    #[test]
    fn identity_files_are_named_together_and_must_exist_and_match_the_site() {
        let only_cert = EXAMPLE.replace("ca_dir = \"/path/ca\"", "cert = \"site.crt\"");
        let err = parse(&only_cert).unwrap_err().to_string();
        assert!(err.contains("together"), "{err}");

        let temp = tempfile::tempdir().unwrap();
        let text = EXAMPLE.replace(
            "ca_dir = \"/path/ca\"",
            "cert = \"site.crt\"\nkey = \"site.key\"\nca_cert = \"ca.crt\"",
        );
        let path = temp.path().join("sync-node.toml");
        std::fs::write(&path, &text).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(
            config.tls_paths().unwrap().key,
            temp.path().join("site.key")
        );
        let err = config.load_sync_identity().unwrap_err().to_string();
        assert!(
            err.contains("site.crt") && err.contains("sync-node.toml"),
            "{err}"
        );

        let ca = archipelago::transport::tls::CertificateAuthority::generate("t").unwrap();
        let (cert, key) = ca.issue_site(&"eu-west".parse().unwrap()).unwrap().to_pem();
        std::fs::write(temp.path().join("site.crt"), cert).unwrap();
        std::fs::write(temp.path().join("site.key"), key).unwrap();
        let err = config.load_sync_identity().unwrap_err().to_string();
        assert!(err.contains("ca.crt"), "{err}");
        std::fs::write(temp.path().join("ca.crt"), ca.cert_pem()).unwrap();
        let err = config.load_sync_identity().unwrap_err().to_string();
        assert!(err.contains("for site eu-west, not us-east"), "{err}");

        let (cert, key) = ca.issue_site(&"us-east".parse().unwrap()).unwrap().to_pem();
        std::fs::write(temp.path().join("site.crt"), cert).unwrap();
        std::fs::write(temp.path().join("site.key"), key).unwrap();
        let sync = config.load_sync_identity().unwrap().unwrap();
        assert_eq!(sync.identity.site().as_str(), "us-east");
        assert_eq!(&sync.ca_cert, ca.cert_der());
    }

    /// The example with its `[[rules]]` entry replaced by `rules` (TOML).
    fn with_rules(rules: &str) -> String {
        let start = EXAMPLE.find("[[rules]]").unwrap();
        format!("{}{rules}", &EXAMPLE[..start])
    }

    #[track_caller]
    fn invalid(text: &str) -> String {
        match parse(text) {
            Err(error @ ConfigError::Invalid { .. }) => error.to_string(),
            other => panic!("expected an invalid config, got {other:?}"),
        }
    }

    #[test]
    fn scheduled_backups_are_bounded() {
        let with_backup = |table: &str| with_rules(&format!("\n[backup]\n{table}\n"));
        let config = parse(&with_backup("dir = \"../backups\"\ninterval_secs = 3600")).unwrap();
        let backup = config.file.backup.clone().unwrap();
        assert_eq!((backup.interval_secs, backup.keep), (3600, 7));
        assert_eq!(config.backup_dir(), Some(config.dir().join("../backups")));
        assert!(invalid(&with_backup("dir = \"b\"\ninterval_secs = 0"))
            .contains("backup.interval_secs must be from 1"));
        assert!(
            invalid(&with_backup("dir = \"b\"\ninterval_secs = 60\nkeep = 0"))
                .contains("backup.keep must be from 1")
        );
        assert!(parse(&with_rules("")).unwrap().backup_dir().is_none());
    }

    #[test]
    fn every_check_and_policy_parses_into_a_rule() {
        let text = with_rules(
            r#"
[[rules]]
name = "stock-max"
docs = "inventory/*"
path = "/stock"
max = 1000.5
policy = "clamp"

[[rules]]
name = "one-booking-per-seat"
docs = "flights/*"
path = "/bookings"
unique = "seat"
policy = "prefer:eu-west"

[[rules]]
name = "order-customer-exists"
docs = "orders/*"
path = "/customer"
references = "customers/*:"
policy = "accept"

[conflicts.concurrent_write]
enabled = false

[conflicts.delete_update]
skip = ["logs/*"]
policy = "prefer:us-east"
"#,
        );
        let config = parse(&text).unwrap();
        let conflicts = config.conflict_config().unwrap();
        let checks: Vec<String> = conflicts
            .rules
            .iter()
            .map(|r| format!("{:?} {:?}", r.check, r.policy))
            .collect();
        assert_eq!(
            checks,
            [
                "max = 1000.5 clamp",
                "unique = \"seat\" prefer:eu-west",
                "references = \"customers/*:\" accept",
            ]
        );
        assert!(!conflicts.concurrent_write.enabled);
        assert!(conflicts.delete_update.enabled_for("orders/1"));
        assert!(!conflicts.delete_update.enabled_for("logs/1"));
        assert_eq!(
            format!("{:?}", conflicts.delete_update.policy),
            "prefer:us-east"
        );
        // Defaults are not written back out.
        let written = toml::to_string(&config.file).unwrap();
        assert!(!written.contains("enabled = true"), "{written}");
        assert!(written.contains("enabled = false"), "{written}");
        assert!(!written.contains("resolver"), "{written}");
        let reread: ConfigFile = toml::from_str(&written).unwrap();
        assert_eq!(reread, config.file);
    }

    #[test]
    fn bad_rules_are_refused_naming_the_rule() {
        let rule = |body: &str| {
            with_rules(&format!(
                "[[rules]]\nname = \"r1\"\ndocs = \"inventory/*\"\n{body}\n"
            ))
        };
        let cases = [
            ("path = \"/stock\"\nmin = 0\n[[rules]]\nname = \"r1\"\ndocs = \"x\"\npath = \"/a\"\nmax = 1", "declared twice"),
            ("path = \"stock\"\nmin = 0", "path"),
            ("path = \"/stock\"", "no check"),
            ("path = \"/stock\"\nmin = 0\nmax = 10", "2 checks (min, max)"),
            ("path = \"/a\"\nunique = \"id\"\nreferences = \"c/*:\"", "2 checks (unique, references)"),
            ("path = \"/stock\"\nmin = 0\nresolver = \"US East\"", "resolver \"US East\""),
            ("path = \"/stock\"\nmin = 0\npolicy = \"later\"", "unknown policy \"later\""),
            ("path = \"/stock\"\nmin = 0\npolicy = \"prefer:EU\"", "policy \"prefer:EU\""),
            ("path = \"/a\"\nunique = \"id\"\npolicy = \"clamp\"", "needs a min or max"),
            ("path = \"/a\"\nreferences = \"customers\"", "DOCS:POINTER"),
            ("path = \"/a\"\nunique = \"\"", "unique needs a field"),
            ("path = \"/a\"\nmin = nan", "finite"),
        ];
        for (body, expected) in cases {
            let err = invalid(&rule(body));
            assert!(err.contains("rule \"r1\""), "{body}: {err}");
            assert!(err.contains(expected), "{body}: {err}");
            assert!(err.contains("x.toml"), "{body}: {err}");
        }
        // Unknown keys and wrong types are refused by the parser, with the
        // line (which lies in the rule).
        for body in [
            "path = \"/a\"\nmin = 0\ncheck = \"min\"",
            "path = \"/a\"\nmin = \"zero\"",
        ] {
            assert!(
                matches!(parse(&rule(body)), Err(ConfigError::Parse { .. })),
                "{body}"
            );
        }
    }

    #[test]
    fn bad_detector_settings_are_refused_naming_the_detector() {
        let err = invalid(&with_rules(
            "[conflicts.concurrent_write]\npolicy = \"sometimes\"\n",
        ));
        assert!(
            err.contains("conflicts.concurrent_write.policy") && err.contains("sometimes"),
            "{err}"
        );
        let err = invalid(&with_rules(
            "[conflicts.delete_update]\npolicy = \"clamp\"\n",
        ));
        assert!(err.contains("conflicts.delete_update.policy"), "{err}");
        let text = with_rules("[conflicts.delete_update]\nenable = false\n");
        assert!(matches!(parse(&text), Err(ConfigError::Parse { .. })));
        let text = with_rules("[conflicts]\nmerge = true\n");
        assert!(matches!(parse(&text), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn peer_addresses_are_checked() {
        assert!("127.0.0.1:1".parse::<PeerAddr>().is_ok());
        assert!("[::1]:7081".parse::<PeerAddr>().is_ok());
        assert!("eu.example.com:7081".parse::<PeerAddr>().is_ok());
        assert!("eu.example.com".parse::<PeerAddr>().is_err());
        assert!("eu example:1".parse::<PeerAddr>().is_err());
        assert!(":1".parse::<PeerAddr>().is_err());
        assert!("host:99999".parse::<PeerAddr>().is_err());
        let peer: PeerConfig = "eu-west=127.0.0.1:7081".parse().unwrap();
        assert_eq!(peer.site.as_str(), "eu-west");
        assert!("EU=127.0.0.1:1".parse::<PeerConfig>().is_err());
        assert!("eu-west".parse::<PeerConfig>().is_err());
    }
}

#[cfg(test)]
mod scope_tests {
    use super::*;

    #[test]
    fn peer_scopes_default_to_everything_and_parse_globs() {
        let plain: PeerConfig =
            toml::from_str("site = \"eu-west\"\naddr = \"127.0.0.1:7081\"").unwrap();
        assert_eq!(plain.scope(), Scope::everything());
        assert!(
            !toml::to_string(&plain).unwrap().contains("send"),
            "defaults are not written out"
        );
        let scoped: PeerConfig = toml::from_str(
            "site = \"us-east\"\naddr = \"127.0.0.1:7071\"\nsend = [\"catalog/*\"]\nreceive = [\"catalog/*\", \"orders/us/*\"]",
        )
        .unwrap();
        let scope = scoped.scope();
        assert!(scope.may_send(&"catalog/1".parse().unwrap()));
        assert!(!scope.may_send(&"eu/patient-1".parse().unwrap()));
        assert!(scope.may_receive(&"orders/us/7".parse().unwrap()));
    }
}
