//! The `sync-node` command line (clap): `ca init`, `init`, `run`, and client
//! commands against a running node (`status`, `doc get|put|ops|history|list`,
//! `conflicts list|show|resolve|dismiss`), `check` across nodes, and
//! `backup` and `restore` of a node's store.
//!
//! Exit codes: 0 on success, 1 when the command fails (including an error
//! answer from the node, whose message goes to stderr), 2 for usage errors
//! (clap's own, and arguments that parse but make no sense, such as a
//! value that is not JSON), and 3 when `check` finds nodes that differ.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use archipelago::conflict::ConflictId;
use archipelago::SiteName;
use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{json, Value};

use crate::backup;
use crate::ca::init_ca;
use crate::client::{encode, Client};
use crate::config::{Config, PeerConfig, SITE_KEY_FILE_NAME, TOKEN_FILE_NAME};
use crate::init::{init, written_files, InitError, InitOptions};
use crate::node::Node;

/// The archipelago daemon: one per site; stores documents and serves the
/// HTTP API.
#[derive(Debug, Parser)]
#[command(name = "sync-node", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the cluster certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Write a node directory: config file, API token and, with `--ca-dir`,
    /// the site's key and certificate.
    Init(InitArgs),
    /// Run a node.
    Run(RunArgs),
    /// Show a running node's status.
    Status(StatusArgs),
    /// Read and write documents of a running node.
    #[command(subcommand)]
    Doc(DocCommand),
    /// List, show, resolve and dismiss the conflict reports of a running
    /// node.
    #[command(subcommand)]
    Conflicts(ConflictsCommand),
    /// Create, list and revoke a running node's scoped client tokens (the
    /// node's admin token, from --config, is needed).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Commit a transaction across documents on a running node: the body
    /// of `POST /v1/txn` (`{"docs": [{"id", "ops", "if_heads"?,
    /// "if_absent"?}], "message"?}`) from a file, or `-` for stdin.
    Txn(TxnArgs),
    /// Read several documents of a running node at one consistent cut.
    Read(ReadArgs),
    /// Start, list and show the sagas of a running node.
    #[command(subcommand)]
    Saga(SagaCommand),
    /// Show and change the strong tier's voters (through joint consensus).
    #[command(subcommand)]
    Strong(StrongCommand),
    /// Compare the documents and heads of several running nodes: exit 0
    /// when identical, 3 when some still differ after the retries.
    Check(CheckArgs),
    /// Save a consistent copy of a running node's store to a file.
    Backup(BackupArgs),
    /// Put a backup in place of a stopped node's store; once restarted, the
    /// node gets back from its peers what it wrote after the backup.
    Restore(RestoreArgs),
    /// Run three sites on 127.0.0.1 (real QUIC and SQLite), write
    /// concurrently, partition one site, heal, and check they converge.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
struct BackupArgs {
    /// The config file of the node to back up.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "node",
        conflicts_with = "node"
    )]
    config: Option<PathBuf>,
    /// The API address of the node to back up (`http://HOST:PORT`), for a
    /// node whose config is elsewhere.
    #[arg(long, value_name = "URL", requires = "token_file")]
    node: Option<String>,
    /// The API token file of `--node`.
    #[arg(long, value_name = "FILE", requires = "node")]
    token_file: Option<PathBuf>,
    /// The file to write; it must not exist.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// The config file of the node whose store is replaced; the node must
    /// be stopped.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The backup to restore (written by `sync-node backup`).
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// Restore a backup taken at another site.
    #[arg(long)]
    allow_other_site: bool,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The config file of a node to compare; give two or more nodes in
    /// all, by config or by `--node`.
    #[arg(long = "config", value_name = "FILE")]
    configs: Vec<PathBuf>,
    /// The API address of a node to compare (`http://HOST:PORT`), for
    /// nodes whose config is elsewhere; each takes the `--token-file`
    /// given in the same position.
    #[arg(long = "node", value_name = "URL")]
    nodes: Vec<String>,
    /// The API token file of the `--node` in the same position.
    #[arg(long = "token-file", value_name = "FILE")]
    token_files: Vec<PathBuf>,
    /// Only documents whose id starts with this (sites replicating
    /// different namespaces should be compared on a prefix they share).
    #[arg(long, default_value = "")]
    prefix: String,
    /// Comparisons before differences are reported, so changes still in
    /// flight can arrive (1 to 100).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    attempts: u32,
    /// Pause between attempts, in milliseconds (at most 10 minutes).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    wait_ms: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Keep the sites' files here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Orders each site writes in the concurrent phase.
    #[arg(long, default_value_t = 200)]
    docs: usize,
    /// How long one site stays cut off, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    partition_ms: u64,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a new CA: `ca.crt` and `ca.key` (mode 0600) in a directory.
    Init {
        /// Directory to write the CA into, created if missing.
        #[arg(long, value_name = "CA")]
        dir: PathBuf,
        /// Replace an existing CA (sites it issued will no longer be trusted).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Site name (a-z, 0-9, -).
    #[arg(long, value_name = "NAME")]
    site: SiteName,
    /// Node directory to write `sync-node.toml` and `api.token` into.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Address of the HTTP API (port 0 picks a free port at each start).
    #[arg(long, value_name = "HOST:PORT")]
    api: SocketAddr,
    /// Address of the site-to-site sync endpoint.
    #[arg(long, value_name = "HOST:PORT")]
    listen: SocketAddr,
    /// Directory of the cluster CA (`sync-node ca init`): issue the site's
    /// key and certificate from it.
    #[arg(long, value_name = "CA")]
    ca_dir: Option<PathBuf>,
    /// A peer site; repeat for several.
    #[arg(long = "peer", value_name = "SITE=HOST:PORT")]
    peers: Vec<PeerConfig>,
    /// Overwrite an existing config (and generate a new token).
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The config file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Log line format (stderr). `RUST_LOG` sets the filter.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// The config file of the node to talk to.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token that opens only documents under the prefixes; prints it
    /// once (the node keeps only its hash).
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// Its name, unique at the node.
        #[arg(long)]
        name: String,
        /// A document id prefix it opens (repeat for more).
        #[arg(long = "prefix", value_name = "P", required = true)]
        prefixes: Vec<String>,
        /// Reads only: no writes through the API, no changes from clients.
        #[arg(long)]
        read_only: bool,
        /// It stops working after this long: `30d`, `12h`, `15m`, `90s`.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_s)]
        expires_in: Option<u64>,
    },
    /// List the tokens (never their secrets).
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke a token: it stops working at once, and its open WebSockets
    /// close within seconds.
    Revoke {
        #[command(flatten)]
        client: ClientArgs,
        /// The token's name.
        name: String,
    },
}

/// `30d`, `12h`, `15m` or `90s`, in seconds.
fn parse_duration_s(text: &str) -> Result<u64, String> {
    let split = text.len().saturating_sub(1);
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err("give a number and a unit: d, h, m or s (30d, 12h, 15m, 90s)".to_owned()),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{number:?} is not a whole number"))?;
    match number.checked_mul(scale) {
        Some(0) => Err("the duration must be positive".to_owned()),
        Some(seconds) => Ok(seconds),
        None => Err("the duration is too long".to_owned()),
    }
}

#[derive(Debug, Args)]
struct TxnArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The transaction: a JSON file, `-` for stdin, or the JSON itself.
    #[arg(value_name = "FILE.json | -")]
    txn: String,
}

#[derive(Debug, Subcommand)]
enum StrongCommand {
    /// The tier as the node sees it: role, term, leader, voters with their
    /// match index and lag, learners.
    Members {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make a site a voter (a learner first, until it caught up).
    Add {
        #[command(flatten)]
        client: ClientArgs,
        /// The site.
        site: String,
    },
    /// Take a site out of the voters.
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        /// The site.
        site: String,
    },
    /// The tier's leases: name, holder, epoch, expiry.
    Leases {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
enum SagaCommand {
    /// Start a saga: the body of `POST /v1/sagas` (`{"id"?, "steps":
    /// [...], "deadline_ms"?}`) from a file, `-` for stdin, or the JSON
    /// itself.
    Start {
        #[command(flatten)]
        client: ClientArgs,
        /// The saga.
        #[arg(value_name = "FILE.json | -")]
        saga: String,
    },
    /// List sagas, optionally those in one status (running, done,
    /// compensating, compensated, failed).
    List {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one saga and its steps.
    Show {
        #[command(flatten)]
        client: ClientArgs,
        /// The saga's id.
        id: String,
    },
}

#[derive(Debug, Args)]
struct ReadArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Document ids (at most 1,000).
    #[arg(value_name = "ID", required = true)]
    ids: Vec<String>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Wait up to this many seconds for the node to answer (it may be
    /// starting), instead of failing at once (at most 600).
    #[arg(long, value_name = "SECS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=600))]
    wait: u64,
}

#[derive(Debug, Subcommand)]
enum DocCommand {
    /// Print a document and its heads.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        /// Document id.
        id: String,
        /// Read as of these heads (comma-separated change hashes).
        #[arg(long, value_name = "HEAD,HEAD")]
        at: Option<String>,
    },
    /// Write a whole document (a JSON object), reconciled field by field.
    Put {
        #[command(flatten)]
        client: ClientArgs,
        /// Document id.
        id: String,
        /// The value: JSON text, `@FILE`, or `-` for stdin.
        value: String,
        /// Commit message.
        #[arg(long)]
        message: Option<String>,
    },
    /// Apply a JSON array of ops atomically.
    Ops {
        #[command(flatten)]
        client: ClientArgs,
        /// Document id.
        id: String,
        /// The ops: JSON text, `@FILE`, or `-` for stdin.
        ops: String,
        /// Commit message.
        #[arg(long)]
        message: Option<String>,
    },
    /// Print a document's change history.
    History {
        #[command(flatten)]
        client: ClientArgs,
        /// Document id.
        id: String,
    },
    /// List document ids.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Only ids starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConflictsCommand {
    /// List reports as a table (oldest first), as JSON with `--json`, or
    /// their ids with `--ids`.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Only reports with this status.
        #[arg(long, value_parser = ["open", "resolved", "dismissed"])]
        status: Option<String>,
        /// Only reports of this document.
        #[arg(long, value_name = "ID")]
        doc: Option<String>,
        /// Only reports of this kind.
        #[arg(long, value_parser = ["concurrent_write", "delete_update", "invariant"])]
        kind: Option<String>,
        /// Only reports of this rule.
        #[arg(long, value_name = "NAME")]
        rule: Option<String>,
        /// Print the node's JSON answer instead of a table.
        #[arg(long, conflicts_with = "ids")]
        json: bool,
        /// Print only the ids, one a line (for scripts).
        #[arg(long)]
        ids: bool,
    },
    /// Print one report as JSON.
    Show {
        #[command(flatten)]
        client: ClientArgs,
        /// Conflict id (32 hex digits).
        id: String,
    },
    /// Resolve an open report, optionally with ops applied to its document
    /// in the same change.
    Resolve {
        #[command(flatten)]
        client: ClientArgs,
        /// Conflict id (32 hex digits).
        id: String,
        /// Ops for the conflict's document: a JSON array as text, `@FILE`,
        /// or `-` for stdin.
        #[arg(long, value_name = "OPS_JSON")]
        ops: Option<String>,
        /// Edits of other documents, committed with the resolution as one
        /// transaction: a JSON array `[{"id", "ops"}]` as text, `@FILE`,
        /// or `-` for stdin.
        #[arg(long, value_name = "DOCS_JSON")]
        docs: Option<String>,
        /// A note recorded in the report.
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
    },
    /// Close an open report without action.
    Dismiss {
        #[command(flatten)]
        client: ClientArgs,
        /// Conflict id (32 hex digits).
        id: String,
        /// A note recorded in the report.
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
    },
    /// End the hold on automatic resolutions that a restore sets, once the
    /// node has caught up with its peers, and run those that waited.
    Release {
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// An argument that parsed but cannot be used: exit code 2.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// `sync-node check` found documents that differ: exit code 3.
#[derive(Debug)]
struct Inconsistent(usize);

impl std::fmt::Display for Inconsistent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} documents differ between the nodes", self.0)
    }
}

impl std::error::Error for Inconsistent {}

/// Parses the process arguments, runs the command and returns the exit
/// code. Usage errors exit from here with code 2 (clap's convention).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_command(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            if error.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else if error.downcast_ref::<Inconsistent>().is_some() {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Ca(CaCommand::Init { dir, force }) => {
            let files = init_ca(&dir, force)?;
            println!("wrote {}", files.cert.display());
            println!(
                "wrote {} (private: keep it off the sites)",
                files.key.display()
            );
            Ok(())
        }
        Command::Init(args) => init_node(args),
        Command::Run(args) => run_node(&args),
        Command::Status(args) => status(&args),
        Command::Doc(doc) => doc_command(doc),
        Command::Conflicts(conflicts) => conflicts_command(conflicts),
        Command::Token(command) => token_command(command),
        Command::Txn(args) => {
            let text = args.txn.trim_start();
            let body = if args.txn == "-" || text.starts_with('{') {
                read_json_argument("TXN_JSON", &args.txn)?
            } else {
                read_json_argument("TXN_JSON", &format!("@{}", args.txn))?
            };
            if !body.is_object() {
                return Err(UsageError("the transaction must be a JSON object".to_owned()).into());
            }
            client_request(&args.client, Method::POST, "/v1/txn", Some(&body))
        }
        Command::Saga(command) => saga_command(command),
        Command::Strong(command) => strong_command(command),
        Command::Read(args) => {
            let body = json!({ "ids": args.ids });
            client_request(&args.client, Method::POST, "/v1/read", Some(&body))
        }
        Command::Check(args) => run_check(args),
        Command::Backup(args) => run_backup(args),
        Command::Restore(args) => run_restore(args),
        Command::Demo(args) => run_demo(args),
    }
}

fn run_backup(args: BackupArgs) -> anyhow::Result<()> {
    let source = match (args.config, args.node, args.token_file) {
        (Some(config), _, _) => backup::Source::Config(config),
        (None, Some(url), Some(token_file)) => backup::Source::Node { url, token_file },
        _ => {
            return Err(UsageError("give --config, or --node with --token-file".to_owned()).into())
        }
    };
    let info = backup::backup(&source, &args.out)?;
    let site = info.label.map(|l| l.site).unwrap_or_default();
    println!(
        "saved a backup of site {site} to {}: {} documents, {} bytes",
        args.out.display(),
        info.docs,
        info.bytes
    );
    Ok(())
}

fn run_restore(args: RestoreArgs) -> anyhow::Result<()> {
    let restored = backup::restore(&args.config, &args.from, args.allow_other_site)?;
    println!(
        "restored {} ({} documents); at its next start the node catches up from its peers",
        args.from.display(),
        restored.backup.docs
    );
    if let Some(replaced) = restored.replaced {
        println!(
            "the replaced store is kept at {} (delete it once the node has caught up)",
            replaced.display()
        );
    }
    println!(
        "automatic conflict resolutions are held, so none is made twice: once `sync-node check` \
         shows this site agrees with its peers, run `sync-node conflicts release --config {}`",
        args.config.display()
    );
    Ok(())
}

/// Most differing documents `check` lists as text.
const CHECK_LINES_MAX: usize = 50;

fn run_check(args: CheckArgs) -> anyhow::Result<()> {
    if args.nodes.len() != args.token_files.len() {
        return Err(UsageError(format!(
            "give one --token-file per --node ({} nodes, {} token files)",
            args.nodes.len(),
            args.token_files.len()
        ))
        .into());
    }
    if args.configs.len() + args.nodes.len() < 2 {
        return Err(UsageError(
            "give at least two nodes (--config FILE, or --node URL with --token-file FILE)"
                .to_owned(),
        )
        .into());
    }
    let mut clients = args
        .configs
        .iter()
        .map(|path| Client::from_config(path))
        .collect::<anyhow::Result<Vec<Client>>>()?;
    for (url, token_file) in args.nodes.iter().zip(&args.token_files) {
        clients.push(Client::from_url(url, token_file)?);
    }
    let options = crate::check::CheckOptions {
        prefix: args.prefix,
        attempts: args.attempts,
        wait: std::time::Duration::from_millis(args.wait_ms),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(crate::check::check(&clients, &options))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_text(CHECK_LINES_MAX));
    }
    if report.consistent() {
        Ok(())
    } else {
        Err(Inconsistent(report.differing.len()).into())
    }
}

fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let options = crate::demo::DemoOptions {
        dir: args.dir,
        docs: args.docs.clamp(1, 100_000),
        partition: std::time::Duration::from_millis(args.partition_ms.min(600_000)),
        ..crate::demo::DemoOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(crate::demo::run(options))
}

fn init_node(args: InitArgs) -> anyhow::Result<()> {
    let options = InitOptions {
        site: args.site,
        dir: args.dir,
        api_listen: args.api,
        sync_listen: args.listen,
        ca_dir: args.ca_dir,
        peers: args.peers,
        force: args.force,
    };
    match init(&options) {
        Ok(_) => {
            for file in written_files(&options) {
                let what = match file.file_name().and_then(|name| name.to_str()) {
                    Some(TOKEN_FILE_NAME) => " (private: the API's bearer token)",
                    Some(SITE_KEY_FILE_NAME) => " (private: the site's key)",
                    _ => "",
                };
                println!("wrote {}{what}", file.display());
            }
            Ok(())
        }
        Err(InitError::Invalid(message)) => Err(UsageError(message).into()),
        Err(error) => Err(error.into()),
    }
}

fn run_node(args: &RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let config = Config::load(&args.config)?;
    // Nothing uses the identity until the QUIC transport exists, but a
    // missing or wrong certificate is reported now, at startup.
    if let Some(sync) = config.load_sync_identity()? {
        tracing::debug!(site = %sync.identity.site(), "site identity loaded");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sync-node")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let node = Node::start(&config).await?;
        node.run_until(shutdown_signal()).await
    })?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = log_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    // Only fails when a subscriber is already set, which then stays.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Whether log lines carry colour codes: only for a terminal, and not when
/// `NO_COLOR` is set to anything but the empty string (no-color.org).
fn log_colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => tracing::info!("received SIGTERM"),
                    () = interrupt => tracing::info!("received SIGINT"),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the node");
                interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    interrupt.await;
}

fn doc_command(command: DocCommand) -> anyhow::Result<()> {
    match command {
        DocCommand::Get { client, id, at } => {
            let mut path = format!("/v1/docs/{}", encode(&id));
            if let Some(at) = at {
                path.push_str("?at=");
                path.push_str(&encode(&at));
            }
            client_request(&client, Method::GET, &path, None)
        }
        DocCommand::Put {
            client,
            id,
            value,
            message,
        } => {
            let value = read_json_argument("VALUE_JSON", &value)?;
            let mut body = json!({ "value": value });
            if let Some(message) = message {
                body["message"] = Value::String(message);
            }
            let path = format!("/v1/docs/{}", encode(&id));
            client_request(&client, Method::PUT, &path, Some(&body))
        }
        DocCommand::Ops {
            client,
            id,
            ops,
            message,
        } => {
            let ops = read_json_argument("OPS_JSON", &ops)?;
            if !ops.is_array() {
                return Err(UsageError("OPS_JSON must be a JSON array of ops".to_owned()).into());
            }
            let mut body = json!({ "ops": ops });
            if let Some(message) = message {
                body["message"] = Value::String(message);
            }
            let path = format!("/v1/docs/{}/ops", encode(&id));
            client_request(&client, Method::POST, &path, Some(&body))
        }
        DocCommand::History { client, id } => {
            let path = format!("/v1/docs/{}/history", encode(&id));
            client_request(&client, Method::GET, &path, None)
        }
        DocCommand::List { client, prefix } => {
            let path = format!("/v1/docs?prefix={}", encode(&prefix));
            client_request(&client, Method::GET, &path, None)
        }
    }
}

/// A conflict id given on the command line, checked before asking the node.
fn conflict_id(id: &str) -> anyhow::Result<ConflictId> {
    ConflictId::parse(id)
        .ok_or_else(|| UsageError(format!("{id:?} is not a conflict id (32 hex digits)")).into())
}

fn token_command(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            client,
            name,
            prefixes,
            read_only,
            expires_in,
        } => {
            let mut body = json!({"name": name, "prefixes": prefixes, "read_only": read_only});
            if let Some(seconds) = expires_in {
                body["expires_in_s"] = json!(seconds);
            }
            client_request(&client, Method::POST, "/v1/tokens", Some(&body))
        }
        TokenCommand::List { client } => client_request(&client, Method::GET, "/v1/tokens", None),
        TokenCommand::Revoke { client, name } => {
            let path = format!(
                "/v1/tokens/{}",
                percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC)
            );
            client_request(&client, Method::DELETE, &path, None)
        }
    }
}

fn strong_command(command: StrongCommand) -> anyhow::Result<()> {
    match command {
        StrongCommand::Members { client } => {
            client_request(&client, Method::GET, "/v1/strong/members", None)
        }
        StrongCommand::Add { client, site } => client_request(
            &client,
            Method::POST,
            "/v1/strong/members",
            Some(&serde_json::json!({ "add": site })),
        ),
        StrongCommand::Remove { client, site } => client_request(
            &client,
            Method::POST,
            "/v1/strong/members",
            Some(&serde_json::json!({ "remove": site })),
        ),
        StrongCommand::Leases { client } => {
            client_request(&client, Method::GET, "/v1/strong/leases", None)
        }
    }
}

fn saga_command(command: SagaCommand) -> anyhow::Result<()> {
    match command {
        SagaCommand::Start { client, saga } => {
            let text = saga.trim_start();
            let body = if saga == "-" || text.starts_with('{') {
                read_json_argument("SAGA_JSON", &saga)?
            } else {
                read_json_argument("SAGA_JSON", &format!("@{saga}"))?
            };
            if !body.is_object() {
                return Err(UsageError("the saga must be a JSON object".to_owned()).into());
            }
            client_request(&client, Method::POST, "/v1/sagas", Some(&body))
        }
        SagaCommand::List { client, status } => {
            let path = match status {
                Some(status) => format!("/v1/sagas?status={}", encode(&status)),
                None => "/v1/sagas".to_owned(),
            };
            client_request(&client, Method::GET, &path, None)
        }
        SagaCommand::Show { client, id } => client_request(
            &client,
            Method::GET,
            &format!("/v1/sagas/{}", encode(&id)),
            None,
        ),
    }
}

fn conflicts_command(command: ConflictsCommand) -> anyhow::Result<()> {
    match command {
        ConflictsCommand::List {
            client,
            status,
            doc,
            kind,
            rule,
            json,
            ids,
        } => {
            let query: Vec<String> = [
                ("status", status),
                ("doc", doc),
                ("kind", kind),
                ("rule", rule),
            ]
            .into_iter()
            .filter_map(|(key, value)| value.map(|v| format!("{key}={}", encode(&v))))
            .collect();
            let mut path = "/v1/conflicts".to_owned();
            if !query.is_empty() {
                path.push('?');
                path.push_str(&query.join("&"));
            }
            let answer = client_call(&client, Method::GET, &path, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else if ids {
                let reports = answer["conflicts"]
                    .as_array()
                    .map_or(&[][..], Vec::as_slice);
                for report in reports {
                    if let Some(id) = report["id"].as_str() {
                        println!("{id}");
                    }
                }
            } else {
                print!("{}", conflicts_table(&answer));
            }
            Ok(())
        }
        ConflictsCommand::Show { client, id } => {
            let path = format!("/v1/conflicts/{}", conflict_id(&id)?);
            client_request(&client, Method::GET, &path, None)
        }
        ConflictsCommand::Resolve {
            client,
            id,
            ops,
            docs,
            note,
        } => {
            let path = format!("/v1/conflicts/{}/resolve", conflict_id(&id)?);
            let mut body = json!({});
            if let Some(ops) = ops {
                let ops = read_json_argument("OPS_JSON", &ops)?;
                if !ops.is_array() {
                    return Err(
                        UsageError("OPS_JSON must be a JSON array of ops".to_owned()).into(),
                    );
                }
                body["ops"] = ops;
            }
            if let Some(docs) = docs {
                let docs = read_json_argument("DOCS_JSON", &docs)?;
                if !docs.is_array() {
                    return Err(UsageError(
                        "DOCS_JSON must be a JSON array of {\"id\", \"ops\"}".to_owned(),
                    )
                    .into());
                }
                body["docs"] = docs;
            }
            if let Some(note) = note {
                body["note"] = Value::String(note);
            }
            client_request(&client, Method::POST, &path, Some(&body))
        }
        ConflictsCommand::Dismiss { client, id, note } => {
            let path = format!("/v1/conflicts/{}/dismiss", conflict_id(&id)?);
            let mut body = json!({});
            if let Some(note) = note {
                body["note"] = Value::String(note);
            }
            client_request(&client, Method::POST, &path, Some(&body))
        }
        ConflictsCommand::Release { client } => {
            client_request(&client, Method::POST, "/v1/resolutions/release", None)
        }
    }
}

/// Longest provisional value shown in the table, in characters.
const PROVISIONAL_CHARS_MAX: usize = 40;

/// `{"conflicts": [...]}` as a table with a header line, one report a line;
/// `no conflicts` when there are none.
fn conflicts_table(answer: &Value) -> String {
    let reports = answer["conflicts"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if reports.is_empty() {
        return "no conflicts\n".to_owned();
    }
    let text = |value: &Value| match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut rows =
        vec![["ID", "KIND", "STATUS", "DOC", "PATH", "RULE", "PROVISIONAL"].map(str::to_owned)];
    for report in reports {
        let mut provisional = report["provisional"].to_string();
        if let Some((cut, _)) = provisional.char_indices().nth(PROVISIONAL_CHARS_MAX) {
            provisional.truncate(cut);
            provisional.push('…');
        }
        rows.push([
            text(&report["id"]),
            text(&report["kind"]),
            text(&report["status"]),
            text(&report["doc"]),
            text(&report["path"]),
            text(&report["rule"]),
            provisional,
        ]);
    }
    let mut widths = [0; 7];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Reads a JSON argument given inline, as `@FILE`, or as `-` (stdin).
fn read_json_argument(name: &str, argument: &str) -> anyhow::Result<Value> {
    let text = if argument == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {name} from stdin"))?;
        text
    } else if let Some(path) = argument.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {name} from {path}"))?
    } else {
        argument.to_owned()
    };
    serde_json::from_str(&text)
        .map_err(|e| UsageError(format!("{name} is not valid JSON: {e}")).into())
}

/// `sync-node status`: asks until the node answers or `--wait` runs out.
/// An error answer ends it at once: the node is up.
fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.wait);
    loop {
        match client_call(&args.client, Method::GET, "/v1/status", None) {
            Ok(answer) => {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(());
            }
            Err(error)
                if error.downcast_ref::<crate::client::HttpError>().is_none()
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Sends one request and prints the answer, pretty-printed.
fn client_request(
    args: &ClientArgs,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<()> {
    let answer = client_call(args, method, path, body)?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

/// Sends one request and returns the JSON answer.
fn client_call(
    args: &ClientArgs,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let client = Client::from_config(&args.config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(client.request(method, path, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn json_arguments_are_read_inline_and_from_files() {
        assert_eq!(read_json_argument("X", "[1]").unwrap(), json!([1]));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.json");
        std::fs::write(&path, r#"{"a": 1}"#).unwrap();
        let arg = format!("@{}", path.display());
        assert_eq!(read_json_argument("X", &arg).unwrap(), json!({"a": 1}));
        let error = read_json_argument("X", "{oops").unwrap_err();
        assert!(error.downcast_ref::<UsageError>().is_some());
    }

    #[test]
    fn conflicts_print_as_an_aligned_table() {
        assert_eq!(conflicts_table(&json!({"conflicts": []})), "no conflicts\n");
        let answer = json!({"conflicts": [
            {"id": "a".repeat(32), "kind": "concurrent_write", "status": "open",
             "doc": "colors/1", "path": "/color", "rule": null, "provisional": "red"},
            {"id": "b".repeat(32), "kind": "invariant", "status": "resolved",
             "doc": "inventory/sku-1", "path": "/stock", "rule": "stock-non-negative",
             "provisional": -1},
        ]});
        let table = conflicts_table(&answer);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("ID  "), "{table}");
        assert!(
            lines[1].contains("concurrent_write  open")
                && lines[1].ends_with(" -                   \"red\""),
            "{table}"
        );
        assert!(lines[2].ends_with("stock-non-negative  -1"), "{table}");
        assert_eq!(lines[1].find("/color"), lines[2].find("/stock"), "{table}");
        assert_eq!(lines[0].find("DOC"), lines[1].find("colors"), "{table}");
    }

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(log_colour(true, None));
        assert!(log_colour(true, Some(OsStr::new(""))));
        assert!(!log_colour(true, Some(OsStr::new("1"))));
        assert!(!log_colour(false, None));
    }

    #[test]
    fn conflict_ids_are_checked_before_asking_the_node() {
        assert!(conflict_id(&"0a".repeat(16)).is_ok());
        let error = conflict_id("nope").unwrap_err();
        assert!(error.downcast_ref::<UsageError>().is_some());
    }
}
