//! Three real sites (QUIC with mutual TLS, SQLite) on 127.0.0.1 through UDP
//! relays: a lossy, slow WAN with a 10 s partition still converges, and the
//! `sync-node demo` command (the README's first command) prints
//! `converged`. Every test is bounded in time.

use std::process::Command;
use std::time::Duration;

use sync_node::demo::{run, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_over_a_slow_lossy_wan_converge_after_a_ten_second_partition() {
    let options = DemoOptions {
        docs: 40,
        partition: Duration::from_secs(10),
        delay: Duration::from_millis(50),
        loss: 0.01,
        ..DemoOptions::default()
    };
    tokio::time::timeout(Duration::from_secs(120), run(options))
        .await
        .expect("the demo finishes in time")
        .expect("the sites converge");
}

#[test]
fn the_demo_command_prints_converged() {
    let output = Command::new(env!("CARGO_BIN_EXE_sync-node"))
        .args(["demo", "--docs", "20", "--partition-ms", "500"])
        .output()
        .expect("sync-node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("converged:")),
        "{stdout}"
    );
}
