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

/// Bound on each wait for a server-sent event.
pub(crate) const EVENT_WAIT: Duration = Duration::from_secs(20);

/// One server-sent event.
#[derive(Debug, Clone)]
pub(crate) struct SseEvent {
    pub(crate) id: u64,
    pub(crate) event: String,
    pub(crate) data: serde_json::Value,
}

/// A `/v1/events` stream, parsed.
pub(crate) struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    pub(crate) async fn open(
        http: &reqwest::Client,
        node: &sync_node::Node,
        last_event_id: Option<u64>,
    ) -> EventStream {
        let mut request = http
            .get(format!("{}/v1/events", node.url()))
            .bearer_auth(node.token())
            // The client's overall timeout would cut the stream.
            .timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        EventStream {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped), or `None` when the
    /// stream ended; fails after [`EVENT_WAIT`].
    pub(crate) async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, None, String::new());
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("id:") {
                        id = Some(value.trim().parse::<u64>().unwrap());
                    } else if let Some(value) = line.strip_prefix("event:") {
                        event = Some(value.trim().to_owned());
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim_start());
                    }
                }
                match (id, event) {
                    (Some(id), Some(event)) => {
                        let data = serde_json::from_str(&data).unwrap();
                        return Some(SseEvent { id, event, data });
                    }
                    (None, None) => continue,
                    other => panic!("an event without id or type: {other:?} in {block:?}"),
                }
            }
            let chunk = tokio::time::timeout(EVENT_WAIT, self.response.chunk())
                .await
                .expect("timed out waiting for an event")
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Reads events until one satisfies `wanted`; returns every event read.
    pub(crate) async fn until(&mut self, wanted: impl Fn(&SseEvent) -> bool) -> Vec<SseEvent> {
        let deadline = tokio::time::Instant::now() + EVENT_WAIT;
        let mut seen = Vec::new();
        loop {
            let event = tokio::time::timeout_at(deadline, self.next())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for an event; read {seen:?}"))
                .expect("the stream ended early");
            let done = wanted(&event);
            seen.push(event);
            if done {
                return seen;
            }
        }
    }
}
