//! Backup and restore on real nodes: `sync-node backup` copies a running
//! site's store; after the site wrote more and stopped, `sync-node restore`
//! puts the copy back, and the restarted site gets back from its peer what
//! it wrote after the backup, writes with a new actor id, and agrees with
//! the peer again. Restoring over a running node, a file that is not a
//! store, or another site's backup is refused.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sync_node::config::Config;
use sync_node::init::{init, InitOptions};
use sync_node::Node;

mod support;
use support::{get_json, metrics_text, put_json as put, BIN};

/// Bound on every wait for something to happen over the network.
const WAIT: Duration = Duration::from_secs(30);
/// Bound on the whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// Writes a node directory for `site` with an identity from the CA at
/// `ca_dir` and one peer; returns its config file.
fn node_dir(dir: &Path, site: &str, ca_dir: &Path, peer: String) -> PathBuf {
    let mut options = InitOptions::new(site.parse().unwrap(), dir.join(site));
    options.ca_dir = Some(ca_dir.to_path_buf());
    options.peers = vec![peer.parse().unwrap()];
    init(&options).unwrap()
}

async fn start(config: &Path) -> Node {
    Node::start(&Config::load(config).unwrap()).await.unwrap()
}

/// Runs the binary off the async threads (the nodes answer it from this
/// process).
async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| (*a).to_owned()).collect()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn get(http: &reqwest::Client, node: &Node, path: &str) -> Value {
    let (status, body) = get_json(http, node, path).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    body
}

/// Waits until both nodes hold `docs` documents at the same heads.
async fn converged(http: &reqwest::Client, a: &Node, b: &Node, docs: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let x = get(http, a, "/v1/heads/digest").await;
        let y = get(http, b, "/v1/heads/digest").await;
        if x == y && x["docs"] == docs {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{x} {y}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The distinct actors of `site` in a document's history.
async fn actors(http: &reqwest::Client, node: &Node, id: &str, site: &str) -> Vec<String> {
    let history = get(http, node, &format!("/v1/docs/{id}/history")).await;
    let mut actors: Vec<String> = history["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["site"] == site)
        .map(|c| c["actor"].as_str().unwrap().to_owned())
        .collect();
    actors.sort();
    actors.dedup();
    actors
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_site_gets_back_what_it_wrote_after_the_backup() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let temp = tempfile::tempdir().unwrap();
        let ca_dir = temp.path().join("ca");
        sync_node::ca::init_ca(&ca_dir, false).unwrap();
        // `ap-south` sorts after `ap-north`, so it only accepts: `ap-north`
        // dials it, and can do so again after its restart.
        let south_config = node_dir(
            temp.path(),
            "ap-south",
            &ca_dir,
            "ap-north=127.0.0.1:9".into(),
        );
        let south = start(&south_config).await;
        let south_sync = south.sync_addr().unwrap();
        let north_config = node_dir(
            temp.path(),
            "ap-north",
            &ca_dir,
            format!("ap-south={south_sync}"),
        );
        let north = start(&north_config).await;
        let http = reqwest::Client::new();

        for n in 0..5 {
            put(
                &http,
                &north,
                &format!("orders%2F{n}"),
                json!({ "n": n, "by": "north" }),
            )
            .await;
        }
        put(&http, &south, "stock%2F0", json!({ "qty": 7 })).await;
        converged(&http, &north, &south, 6).await;
        let before = actors(&http, &north, "orders%2F0", "ap-north").await;
        assert_eq!(before.len(), 1);

        // Without the token: refused.
        let response = http
            .get(format!("{}/v1/backup", north.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

        let backup = temp.path().join("north.db");
        let backup_arg = backup.to_str().unwrap();
        let output = run(args(&[
            "backup",
            "--config",
            north_config.to_str().unwrap(),
            "--out",
            backup_arg,
        ]))
        .await;
        assert!(output.status.success(), "{}", text(&output));
        assert!(
            text(&output).starts_with(&format!(
                "saved a backup of site ap-north to {backup_arg}: 6 documents"
            )),
            "{}",
            text(&output)
        );
        assert!(!Path::new(&format!("{backup_arg}.partial")).exists());
        // The same file again: refused, the first backup untouched.
        let size = std::fs::metadata(&backup).unwrap().len();
        let output = run(args(&[
            "backup",
            "--config",
            north_config.to_str().unwrap(),
            "--out",
            backup_arg,
        ]))
        .await;
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));
        assert!(
            text(&output).contains("already exists"),
            "{}",
            text(&output)
        );
        assert_eq!(std::fs::metadata(&backup).unwrap().len(), size);
        // By address and token file, as from a backup host.
        let by_url = temp.path().join("north-by-url.db");
        let token_file = north_config.with_file_name("api.token");
        let output = run(args(&[
            "backup",
            "--node",
            &north.url(),
            "--token-file",
            token_file.to_str().unwrap(),
            "--out",
            by_url.to_str().unwrap(),
        ]))
        .await;
        assert!(output.status.success(), "{}", text(&output));

        // Written after the backup: the backup lacks it, the peer holds it.
        put(
            &http,
            &north,
            "orders%2Fafter",
            json!({ "n": 99, "by": "north" }),
        )
        .await;
        put(
            &http,
            &north,
            "orders%2F1",
            json!({ "n": 11, "by": "north" }),
        )
        .await;
        converged(&http, &north, &south, 7).await;
        let south_digest = get(&http, &south, "/v1/heads/digest").await;

        // Over a running node: refused.
        let restore = |config: &Path, extra: &[&str]| {
            let mut list = args(&[
                "restore",
                "--config",
                config.to_str().unwrap(),
                "--from",
                backup_arg,
            ]);
            list.extend(args(extra));
            run(list)
        };
        let output = restore(&north_config, &[]).await;
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));
        assert!(
            text(&output).contains("stop the node first"),
            "{}",
            text(&output)
        );
        // Another site's backup: refused, even with that site stopped or not.
        let output = restore(&south_config, &[]).await;
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));
        assert!(
            text(&output).contains("is a backup of site ap-north"),
            "{}",
            text(&output)
        );
        // Told to take it anyway, it gets past that check to the next one:
        // that site's node is running.
        let output = restore(&south_config, &["--allow-other-site"]).await;
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));
        assert!(
            text(&output).contains("stop the node first"),
            "{}",
            text(&output)
        );
        // A file that is not a store: refused.
        let bogus = temp.path().join("bogus.db");
        std::fs::write(&bogus, "not a store").unwrap();
        let output = run(args(&[
            "restore",
            "--config",
            north_config.to_str().unwrap(),
            "--from",
            bogus.to_str().unwrap(),
        ]))
        .await;
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));

        north.shutdown().await.unwrap();
        let output = restore(&north_config, &[]).await;
        assert!(output.status.success(), "{}", text(&output));
        assert!(text(&output).contains("restored"), "{}", text(&output));
        let replaced: Vec<_> = std::fs::read_dir(north_config.parent().unwrap().join("data"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with("store.db.replaced-"))
            .collect();
        assert!(!replaced.is_empty(), "the replaced store is kept");

        // Restarted from the backup alone, it lacks the later writes...
        let info = archipelago::store::inspect_backup(&backup).unwrap();
        assert_eq!(info.docs, 6);
        assert_eq!(info.label.unwrap().site, "ap-north");
        let north = Node::start(&Config::load(&north_config).unwrap())
            .await
            .unwrap();
        // ...until its peer sends them back.
        converged(&http, &north, &south, 7).await;
        assert_eq!(get(&http, &north, "/v1/heads/digest").await, south_digest);
        let doc = get(&http, &north, "/v1/docs/orders%2Fafter").await;
        assert_eq!(doc["value"]["n"], 99);
        let doc = get(&http, &north, "/v1/docs/orders%2F1").await;
        assert_eq!(doc["value"]["n"], 11);

        // Automatic conflict resolutions wait until the operator releases
        // them, once the site has caught up.
        let status = get(&http, &north, "/v1/status").await;
        assert_eq!(status["resolutions_held"], true, "{status}");
        assert!(
            text(&output).contains("sync-node conflicts release"),
            "{}",
            text(&output)
        );
        let release = args(&[
            "conflicts",
            "release",
            "--config",
            north_config.to_str().unwrap(),
        ]);
        let released = run(release.clone()).await;
        assert!(released.status.success(), "{}", text(&released));
        let answer: Value = serde_json::from_slice(&released.stdout).unwrap();
        assert_eq!(answer, json!({ "released": true, "resolved": 0 }));
        let status = get(&http, &north, "/v1/status").await;
        assert_eq!(status["resolutions_held"], false, "{status}");
        let again: Value = serde_json::from_slice(&run(release).await.stdout).unwrap();
        assert_eq!(again["released"], false);
        let status = get(&http, &south, "/v1/status").await;
        assert_eq!(status["resolutions_held"], false, "{status}");

        // It writes with a new actor, and its writes reach the peer.
        put(
            &http,
            &north,
            "orders%2F0",
            json!({ "n": 100, "by": "north" }),
        )
        .await;
        converged(&http, &north, &south, 7).await;
        let doc = get(&http, &south, "/v1/docs/orders%2F0").await;
        assert_eq!(doc["value"]["n"], 100);
        let after = actors(&http, &south, "orders%2F0", "ap-north").await;
        assert_eq!(after.len(), 2, "{after:?}");
        assert!(after.contains(&before[0]));

        // Backups and the hold are in the metrics.
        let metrics = metrics_text(&http, &north).await;
        assert!(
            metrics.contains("archipelago_backups_total{result=\"ok\"}"),
            "{metrics}"
        );
        assert!(metrics.contains("archipelago_backup_bytes "), "{metrics}");
        assert!(
            metrics.contains("archipelago_resolutions_held 0"),
            "{metrics}"
        );

        north.shutdown().await.unwrap();
        south.shutdown().await.unwrap();
    })
    .await
    .expect("the test finished in time");
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_backups_keep_the_newest() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let temp = tempfile::tempdir().unwrap();
        let config = init(&InitOptions::new(
            "eu-west".parse().unwrap(),
            temp.path().join("eu-west"),
        ))
        .unwrap();
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str("\n[backup]\ndir = \"backups\"\ninterval_secs = 1\nkeep = 2\n");
        std::fs::write(&config, text).unwrap();
        let dir = config.parent().unwrap().join("backups");
        // A copy a killed process left half-written goes with the pruning.
        std::fs::create_dir_all(&dir).unwrap();
        let stale = dir.join("eu-west-0000000000001.db.partial");
        std::fs::write(&stale, "half").unwrap();
        // Anything else there is left alone.
        let other = dir.join("eu-west-notes.txt");
        std::fs::write(&other, "mine").unwrap();
        let node = start(&config).await;
        let http = reqwest::Client::new();
        put(&http, &node, "orders%2F1", json!({ "n": 1 })).await;

        let names = || -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut seen = std::collections::BTreeSet::new();
        while seen
            .iter()
            .filter(|n: &&String| n.starts_with("eu-west-1") && n.ends_with(".db"))
            .count()
            < 4
        {
            seen.extend(names());
            assert!(tokio::time::Instant::now() < deadline, "{seen:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        node.shutdown().await.unwrap();

        assert!(!stale.exists());
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "mine");
        std::fs::remove_file(&other).unwrap();
        let left = names();
        assert_eq!(left.len(), 2, "keep = 2: {left:?} (seen {seen:?})");
        // The newest are kept, and each is a whole backup of this site.
        let newest: Vec<&String> = seen
            .iter()
            .filter(|n| n.starts_with("eu-west-1") && n.ends_with(".db"))
            .rev()
            .take(2)
            .collect();
        assert_eq!(left.iter().rev().collect::<Vec<_>>(), newest);
        for name in &left {
            assert!(
                name.starts_with("eu-west-") && name.ends_with(".db"),
                "{name}"
            );
            let info = archipelago::store::inspect_backup(&dir.join(name)).unwrap();
            assert_eq!(info.label.unwrap().site, "eu-west");
            assert!(info.docs <= 1);
        }
        let last = archipelago::store::inspect_backup(&dir.join(&left[1])).unwrap();
        assert_eq!(last.docs, 1);
    })
    .await
    .expect("the test finished in time");
}
