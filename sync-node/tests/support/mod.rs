//! Helpers shared by the tests that run the real `sync-node` binary or
//! in-process nodes.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_sync-node");

/// Longest wait for a node to start or sites to agree.
pub(crate) const WAIT_MAX: Duration = Duration::from_secs(60);

/// A `sync-node run` process, killed on drop so a failing test leaves no
/// process behind.
pub(crate) struct Process(Option<Child>);

impl Process {
    /// Runs `sync-node run --config CONFIG`, stderr to `log`.
    pub(crate) fn start(config: &Path, log: &Path) -> Process {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Process(Some(child))
    }

    /// SIGKILL, and reap.
    pub(crate) fn kill_9(&mut self) {
        if let Some(mut child) = self.0.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a client command of the binary, which must succeed.
pub(crate) fn cli(args: &[&str]) {
    let output = Command::new(BIN).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Waits for a file a node writes once it has bound its sockets.
pub(crate) fn wait_file(path: &Path) -> String {
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.trim().is_empty() {
                return text.trim().to_owned();
            }
        }
        assert!(
            started.elapsed() < WAIT_MAX,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET path` on an in-process node with its token: the status and the
/// JSON answer (`null` when it is not JSON).
pub(crate) async fn get_json(
    http: &reqwest::Client,
    node: &sync_node::Node,
    path: &str,
) -> (reqwest::StatusCode, serde_json::Value) {
    let response = http
        .get(format!("{}{path}", node.url()))
        .bearer_auth(node.token())
        .send()
        .await
        .unwrap();
    let status = response.status();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// `PUT /v1/docs/{id}` (`id` percent-encoded) with `{"value": value}` on
/// an in-process node with its token, which must accept it.
pub(crate) async fn put_json(
    http: &reqwest::Client,
    node: &sync_node::Node,
    id: &str,
    value: serde_json::Value,
) {
    let response = http
        .put(format!("{}/v1/docs/{id}", node.url()))
        .bearer_auth(node.token())
        .json(&serde_json::json!({ "value": value }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
}

/// `GET /metrics` on an in-process node with its token: the Prometheus text.
pub(crate) async fn metrics_text(http: &reqwest::Client, node: &sync_node::Node) -> String {
    http.get(format!("{}/metrics", node.url()))
        .bearer_auth(node.token())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
