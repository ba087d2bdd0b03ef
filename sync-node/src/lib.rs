//! The `sync-node` daemon as a library: one node per site stores documents
//! in SQLite, syncs them with peer sites over QUIC and serves them over an
//! HTTP API; the binary (`main.rs`) is a thin command line over this crate,
//! and tests, benchmarks and the demo start nodes in-process with it.
//!
//! - [`config`]: the TOML configuration file and the paths it names.
//! - [`ca`]: the cluster certificate authority's directory (`ca init`).
//! - [`init`]: writing a new node directory (config, API token and, from
//!   the CA, the site's key and certificate).
//! - [`node`]: a running node — store, replica, sync endpoint, HTTP
//!   server, graceful shutdown; how to run several sites in one process.
//! - [`events`]: the node's sequence-numbered event log (`/v1/events`), its
//!   view of peers and replication lag (`/v1/status`), and the task feeding
//!   both and the peer metrics.
//! - [`api`]: the HTTP API (axum router), usable on its own.
//! - [`backup`]: saving a running node's store to a file and restoring it
//!   in place of a stopped node's store.
//! - [`cli`]: the command line, including the client commands.
//!
//! Starting a node in-process on a free loopback port and calling it:
//!
//! ```
//! use sync_node::config::Config;
//! use sync_node::init::{init, InitOptions};
//! use sync_node::Node;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! // API on 127.0.0.1:0: the node picks a free port.
//! let config_path = init(&InitOptions::new("us-east".parse()?, dir.path()))?;
//! let node = Node::start(&Config::load(&config_path)?).await?;
//!
//! let status: serde_json::Value = reqwest::Client::new()
//!     .get(format!("{}/v1/status", node.url()))
//!     .bearer_auth(node.token())
//!     .send()
//!     .await?
//!     .json()
//!     .await?;
//! assert_eq!(status["site"], "us-east");
//!
//! node.shutdown().await?;
//! # Ok(())
//! # }
//! ```

pub mod api;
pub mod backup;
pub mod ca;
mod check;
pub mod cli;
mod client;
pub mod config;
pub mod demo;
pub mod events;
pub mod init;
pub mod node;
pub mod sagas;

pub use node::{Node, NodeError};
