//! The `sync-node` binary end to end: `ca init` writes a private CA, `init`
//! writes a config, a private token and (from the CA) a site identity and
//! refuses bad input, `run` serves on a free loopback port, the client
//! commands (documents, status, conflicts) talk to it, and SIGTERM stops it
//! cleanly.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_sync-node");

/// Kills the child on drop, so a failing test leaves no process behind.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    /// Waits for the child to exit, at most `limit`.
    fn wait_for_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.0.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.0 = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sync-node did not exit in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn sync_node(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs a client command that must succeed and returns its JSON output.
fn client_json(args: &[&str]) -> Value {
    let output = sync_node(args);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Waits for a file to appear, at most `limit`.
fn wait_for_file(path: &Path, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear in {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn init_node(dir: &Path) -> PathBuf {
    let output = sync_node(&[
        "init",
        "--site",
        "us-east",
        "--dir",
        path_str(dir),
        "--api",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--peer",
        "eu-west=127.0.0.1:7081",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    dir.join("sync-node.toml")
}

#[test]
fn init_writes_config_and_private_token_and_refuses_to_overwrite() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("node");
    let config = init_node(&dir);
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("site = \"us-east\""), "{text}");
    assert!(text.contains("eu-west"), "{text}");
    let token = std::fs::read_to_string(dir.join("api.token")).unwrap();
    let token = token.trim();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("api.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let again = sync_node(&[
        "init",
        "--site",
        "us-west",
        "--dir",
        path_str(&dir),
        "--api",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), text);

    let forced = sync_node(&[
        "init",
        "--site",
        "us-west",
        "--dir",
        path_str(&dir),
        "--api",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--force",
    ]);
    assert!(forced.status.success());
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("site = \"us-west\""), "{text}");
}

#[test]
fn init_rejects_bad_site_names_addresses_and_peers() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("node");
    let dir = path_str(&dir);
    let base = ["init", "--dir", dir, "--listen", "127.0.0.1:0"];
    let cases: [&[&str]; 5] = [
        &["--site", "US_East", "--api", "127.0.0.1:0"],
        &["--site", "us-east", "--api", "nowhere"],
        &[
            "--site",
            "us-east",
            "--api",
            "127.0.0.1:0",
            "--peer",
            "eu-west",
        ],
        &[
            "--site",
            "us-east",
            "--api",
            "127.0.0.1:0",
            "--peer",
            "us-east=127.0.0.1:1",
        ],
        &[
            "--site",
            "us-east",
            "--api",
            "127.0.0.1:0",
            "--peer",
            "eu-west=127.0.0.1:1",
            "--peer",
            "eu-west=127.0.0.1:2",
        ],
    ];
    for extra in cases {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let output = sync_node(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(!output.stderr.is_empty());
        assert!(
            !temp.path().join("node/sync-node.toml").exists(),
            "{args:?}"
        );
    }
}

#[test]
fn run_serves_the_client_commands_and_stops_on_sigterm() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("node");
    let config = init_node(&dir);
    let config = path_str(&config);
    let log = std::fs::File::create(temp.path().join("node.log")).unwrap();
    let mut node = ChildGuard(Some(
        Command::new(BIN)
            .args(["run", "--config", config, "--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    ));
    let addr = wait_for_file(&dir.join("api.addr"), Duration::from_secs(20));
    assert!(addr.trim().starts_with("127.0.0.1:"), "{addr}");

    let commit = client_json(&[
        "doc",
        "ops",
        "--config",
        config,
        "inventory/sku-1",
        r#"[{"op": "set", "path": "/stock", "value": 5, "as": "counter"}, {"op": "inc", "path": "/stock", "by": 2}]"#,
        "--message",
        "receive stock",
    ]);
    let first_head = commit["change"].as_str().unwrap().to_owned();

    let doc = client_json(&["doc", "get", "--config", config, "inventory/sku-1"]);
    assert_eq!(doc["id"], "inventory/sku-1");
    assert_eq!(doc["value"], json!({"stock": 7}));

    let ops_file = temp.path().join("ops.json");
    std::fs::write(
        &ops_file,
        r#"[{"op": "set", "path": "/name", "value": "lamp"}]"#,
    )
    .unwrap();
    let at_file = format!("@{}", path_str(&ops_file));
    client_json(&[
        "doc",
        "ops",
        "--config",
        config,
        "inventory/sku-1",
        &at_file,
    ]);

    let put = client_json(&[
        "doc",
        "put",
        "--config",
        config,
        "inventory/sku-1",
        r#"{"stock": 10, "name": "lamp", "price": 30}"#,
    ]);
    assert!(put["change"].is_string());

    // VALUE_JSON from stdin.
    let mut child = Command::new(BIN)
        .args(["doc", "put", "--config", config, "notes/1", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"text": "from stdin"}"#)
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let doc = client_json(&["doc", "get", "--config", config, "inventory/sku-1"]);
    assert_eq!(
        doc["value"],
        json!({"stock": 10, "name": "lamp", "price": 30})
    );
    let old = client_json(&[
        "doc",
        "get",
        "--config",
        config,
        "inventory/sku-1",
        "--at",
        &first_head,
    ]);
    assert_eq!(old["value"], json!({"stock": 7}));

    let history = client_json(&["doc", "history", "--config", config, "inventory/sku-1"]);
    let changes = history["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 3);
    assert_eq!(changes[0]["message"], "receive stock");
    assert_eq!(changes[0]["site"], "us-east");

    let list = client_json(&["doc", "list", "--config", config]);
    assert_eq!(list, json!({"docs": ["inventory/sku-1", "notes/1"]}));

    let status = client_json(&["status", "--config", config]);
    assert_eq!(status["site"], "us-east");
    assert_eq!(status["docs"], 2);
    assert_eq!(status["conflicts_open"], 0);

    // A single node has no conflicts to list; ids are checked locally.
    let conflicts = client_json(&["conflicts", "list", "--config", config, "--json"]);
    assert_eq!(conflicts, json!({"conflicts": []}));
    let table = sync_node(&["conflicts", "list", "--config", config, "--status", "open"]);
    assert!(table.status.success());
    assert_eq!(String::from_utf8_lossy(&table.stdout), "no conflicts\n");
    let unknown = sync_node(&["conflicts", "show", "--config", config, &"0".repeat(32)]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("404"));
    let malformed = sync_node(&["conflicts", "show", "--config", config, "nope"]);
    assert_eq!(malformed.status.code(), Some(2));
    let bad_status = sync_node(&["conflicts", "list", "--config", config, "--status", "x"]);
    assert_eq!(bad_status.status.code(), Some(2));

    // An error answer: message on stderr, exit code 1.
    let absent = sync_node(&["doc", "get", "--config", config, "absent"]);
    assert_eq!(absent.status.code(), Some(1));
    assert!(absent.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&absent.stderr);
    assert!(stderr.contains("not found"), "{stderr}");
    let bad = sync_node(&[
        "doc",
        "ops",
        "--config",
        config,
        "inventory/sku-1",
        r#"[{"op": "inc", "path": "/name"}]"#,
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("422"));
    // Arguments that are not JSON are usage errors.
    let usage = sync_node(&["doc", "put", "--config", config, "x", "{nope"]);
    assert_eq!(usage.status.code(), Some(2));

    let killed = Command::new("kill")
        .args(["-TERM", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = node.wait_for_exit(Duration::from_secs(20));
    let log = std::fs::read_to_string(temp.path().join("node.log")).unwrap();
    assert!(status.success(), "exit {status:?}, log:\n{log}");
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(!dir.join("api.addr").exists());

    // The data survived the restart-free shutdown: a new run sees it.
    let mut node = ChildGuard(Some(
        Command::new(BIN)
            .args(["run", "--config", config])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    wait_for_file(&dir.join("api.addr"), Duration::from_secs(20));
    let doc = client_json(&["doc", "get", "--config", config, "notes/1"]);
    assert_eq!(doc["value"], json!({"text": "from stdin"}));
    Command::new("kill")
        .args(["-TERM", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(node.wait_for_exit(Duration::from_secs(20)).success());
}

#[test]
fn client_commands_fail_cleanly_without_a_running_node() {
    let temp = tempfile::tempdir().unwrap();
    let config = init_node(&temp.path().join("node"));
    let output = sync_node(&["status", "--config", path_str(&config)]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("api.addr"), "{stderr}");
    let output = sync_node(&["status", "--config", "/nonexistent/sync-node.toml"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/sync-node.toml"), "{stderr}");
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_init_and_init_with_a_ca_issue_site_identities_and_refuse_to_overwrite_the_ca() {
    use archipelago::transport::tls::{ca_cert_from_pem, site_name_of, SiteIdentity};

    let temp = tempfile::tempdir().unwrap();
    let ca = temp.path().join("ca");
    let output = sync_node(&["ca", "init", "--dir", path_str(&ca)]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("ca.crt") && stdout.contains("ca.key"),
        "{stdout}"
    );
    let ca_cert = std::fs::read_to_string(ca.join("ca.crt")).unwrap();
    #[cfg(unix)]
    assert_eq!(mode(&ca.join("ca.key")), 0o600);

    let again = sync_node(&["ca", "init", "--dir", path_str(&ca)]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(ca.join("ca.crt")).unwrap(), ca_cert);

    for (site, peer) in [("us-east", "eu-west"), ("eu-west", "us-east")] {
        let dir = temp.path().join(site);
        let peer_arg = format!("{peer}=127.0.0.1:7081");
        let output = sync_node(&[
            "init",
            "--site",
            site,
            "--dir",
            path_str(&dir),
            "--ca-dir",
            path_str(&ca),
            "--api",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--peer",
            &peer_arg,
        ]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("site.key"), "{stdout}");
        #[cfg(unix)]
        {
            assert_eq!(mode(&dir.join("site.key")), 0o600);
            assert_eq!(mode(&dir.join("api.token")), 0o600);
        }
        let config = std::fs::read_to_string(dir.join("sync-node.toml")).unwrap();
        assert!(config.contains("cert = \"site.crt\""), "{config}");
        assert!(config.contains("key = \"site.key\""), "{config}");
        assert!(config.contains("ca_cert = \"ca.crt\""), "{config}");
        assert!(config.contains(peer), "{config}");

        let cert_pem = std::fs::read_to_string(dir.join("site.crt")).unwrap();
        let key_pem = std::fs::read_to_string(dir.join("site.key")).unwrap();
        let identity = SiteIdentity::from_pem(&cert_pem, &key_pem).unwrap();
        assert_eq!(identity.site().as_str(), site);
        assert_eq!(
            site_name_of(&identity.cert_chain()[0]).unwrap().as_str(),
            site
        );
        let copied = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
        assert_eq!(copied, ca_cert);
        ca_cert_from_pem(&copied).unwrap();
    }

    // `run` refuses a config whose identity files are missing, naming the file.
    let config = temp.path().join("us-east/sync-node.toml");
    std::fs::remove_file(temp.path().join("us-east/site.crt")).unwrap();
    let output = sync_node(&["run", "--config", path_str(&config)]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("site.crt"), "{stderr}");

    // `init --ca-dir` with no CA there fails and writes nothing.
    let dir = temp.path().join("ap-south");
    let output = sync_node(&[
        "init",
        "--site",
        "ap-south",
        "--dir",
        path_str(&dir),
        "--ca-dir",
        path_str(&temp.path().join("no-ca")),
        "--api",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(!dir.join("sync-node.toml").exists());
}
