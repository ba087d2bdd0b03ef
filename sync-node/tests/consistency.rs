//! The consistency check: `GET /v1/heads` and `/v1/heads/digest` on real
//! nodes, and `sync-node check` comparing two syncing sites (identical) and
//! a site that syncs with neither (different), by exit code and report.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sync_node::config::Config;
use sync_node::init::{init, InitOptions};
use sync_node::Node;

mod support;
use support::{get_json, put_json};

/// Bound on every wait for something to happen over the network.
const WAIT: Duration = Duration::from_secs(20);
/// Bound on the whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

struct Site {
    node: Node,
    config: PathBuf,
}

/// Writes a node directory for `site` (with an identity from the CA at
/// `ca_dir`, when given) and starts the node.
async fn start(dir: &Path, site: &str, ca_dir: Option<&Path>, peer: Option<String>) -> Site {
    let mut options = InitOptions::new(site.parse().unwrap(), dir.join(site));
    options.ca_dir = ca_dir.map(Path::to_path_buf);
    options.peers = peer.into_iter().map(|p| p.parse().unwrap()).collect();
    let config = init(&options).unwrap();
    let node = Node::start(&Config::load(&config).unwrap()).await.unwrap();
    Site { node, config }
}

async fn get(http: &reqwest::Client, site: &Site, path: &str) -> Value {
    let (status, body) = get_json(http, &site.node, path).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    body
}

async fn put(http: &reqwest::Client, site: &Site, id: &str, value: Value) {
    put_json(http, &site.node, id, value).await;
}

/// Runs `sync-node check` over the given sites' configs, off the async
/// threads (the nodes answer it from this process).
async fn check(sites: &[&Site], extra: &[&str]) -> Output {
    let configs: Vec<&Path> = sites.iter().map(|s| s.config.as_path()).collect();
    check_configs(&configs, extra).await
}

async fn check_configs(configs: &[&Path], extra: &[&str]) -> Output {
    let mut args: Vec<String> = Vec::new();
    for config in configs {
        args.push("--config".to_owned());
        args.push(config.to_str().unwrap().to_owned());
    }
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sync-node"))
            .arg("check")
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_finds_syncing_sites_identical_and_a_lone_site_different() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let temp = tempfile::tempdir().unwrap();
        let ca_dir = temp.path().join("ca");
        sync_node::ca::init_ca(&ca_dir, false).unwrap();
        // `ap-south` sorts after `ap-north`, so it only accepts.
        let high = start(
            temp.path(),
            "ap-south",
            Some(&ca_dir),
            Some("ap-north=127.0.0.1:9".to_owned()),
        )
        .await;
        let high_sync = high.node.sync_addr().unwrap();
        let low = start(
            temp.path(),
            "ap-north",
            Some(&ca_dir),
            Some(format!("ap-south={high_sync}")),
        )
        .await;
        let lone = start(temp.path(), "lone", None, None).await;
        let http = reqwest::Client::new();

        for n in 0..5 {
            put(&http, &high, &format!("orders%2F{n}"), json!({ "n": n })).await;
            put(&http, &low, &format!("stock%2F{n}"), json!({ "n": n })).await;
        }
        put(&http, &lone, "orders%2F0", json!({ "n": 0 })).await;

        // The routes: pages in id order with `next`, and a digest that is
        // the same at both syncing sites once they converged.
        let deadline = tokio::time::Instant::now() + WAIT;
        let digest = loop {
            let a = get(&http, &high, "/v1/heads/digest").await;
            let b = get(&http, &low, "/v1/heads/digest").await;
            if a == b && a["docs"] == 10 {
                break a;
            }
            assert!(tokio::time::Instant::now() < deadline, "{a} {b}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(digest["prefix"], "");
        assert_eq!(digest["digest"].as_str().unwrap().len(), 64);
        let page = get(&http, &high, "/v1/heads?prefix=orders%2F&limit=2").await;
        assert_eq!(page["docs"][0]["id"], "orders/0");
        assert_eq!(page["docs"][1]["id"], "orders/1");
        assert_eq!(page["next"], "orders/1");
        let heads = page["docs"][0]["heads"].as_array().unwrap();
        let doc = get(&http, &high, "/v1/docs/orders%2F0").await;
        assert_eq!(heads, doc["heads"].as_array().unwrap());
        let rest = get(&http, &high, "/v1/heads?prefix=orders%2F&after=orders%2F1").await;
        assert_eq!(rest["docs"].as_array().unwrap().len(), 3);
        assert!(rest.get("next").is_none(), "{rest}");
        let other = get(&http, &lone, "/v1/heads/digest?prefix=orders%2F").await;
        assert_eq!(other["docs"], 1);
        assert_ne!(other["digest"], digest["digest"]);

        // Two syncing sites: identical, exit 0.
        let output = check(&[&high, &low], &["--wait-ms", "200"]).await;
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        assert!(
            stdout(&output)
                .starts_with("consistent: 10 documents identical at 2 sites (ap-south, ap-north)"),
            "{output:?}"
        );

        // The same by address and token file, as for a node whose config
        // is on another machine; a node without its token file is a usage
        // error.
        let low_url = low.node.url();
        let low_token = low.config.with_file_name("api.token");
        let output = check(
            &[&high],
            &[
                "--node",
                &low_url,
                "--token-file",
                low_token.to_str().unwrap(),
            ],
        )
        .await;
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        assert!(
            stdout(&output).starts_with("consistent: 10 documents"),
            "{output:?}"
        );
        let output = check(&[&high], &["--node", &low_url]).await;
        assert_eq!(output.status.code(), Some(2), "{output:?}");

        // A site that syncs with neither: its `orders/0` has other heads and
        // it lacks the rest; exit 3, every difference listed in JSON.
        let output = check(
            &[&high, &lone],
            &[
                "--prefix",
                "orders/",
                "--attempts",
                "2",
                "--wait-ms",
                "50",
                "--json",
            ],
        )
        .await;
        assert_eq!(output.status.code(), Some(3), "{output:?}");
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["consistent"], false);
        assert_eq!(report["sites"], json!(["ap-south", "lone"]));
        assert_eq!(
            (report["docs"].clone(), report["attempts"].clone()),
            (json!(5), json!(2))
        );
        let differing = report["differing"].as_array().unwrap();
        assert_eq!(differing.len(), 5);
        assert_eq!(differing[0]["id"], "orders/0");
        assert!(differing[0]["heads"]["lone"].is_array());
        assert_ne!(
            differing[0]["heads"]["lone"],
            differing[0]["heads"]["ap-south"]
        );
        assert_eq!(differing[1]["heads"]["lone"], Value::Null);
        assert_eq!(differing[1]["changing"], false);

        // As text, and on a prefix none of them holds.
        let output = check(&[&low, &lone], &["--attempts", "1"]).await;
        assert_eq!(output.status.code(), Some(3), "{output:?}");
        let text = stdout(&output);
        assert!(
            text.starts_with(
                "inconsistent: 10 of 10 documents differ between ap-north, lone after 1 attempts"
            ),
            "{text}"
        );
        assert!(text.contains("  stock/4: ap-north ["), "{text}");
        assert!(text.contains(", lone missing"), "{text}");
        let output = check(&[&high, &low, &lone], &["--prefix", "none/"]).await;
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        assert!(stdout(&output)
            .starts_with("consistent: 0 documents under \"none/\" identical at 3 sites"));

        // One node is no comparison, nor is one node twice; an unreachable
        // node is an error.
        let output = check(&[&high], &[]).await;
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        let output = check(&[&high, &low, &high], &[]).await;
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("the same site"),
            "{output:?}"
        );
        lone.node.shutdown().await.unwrap();
        let output = check_configs(&[&high.config, &lone.config], &["--attempts", "1"]).await;
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("is the node running?"),
            "{output:?}"
        );
        low.node.shutdown().await.unwrap();
        high.node.shutdown().await.unwrap();
    })
    .await
    .expect("the test finished in time");
}
