//! `saga`: sagas run by the nodes' runners.
//!
//! - `p50_ms` / `p99_ms`: two nodes (QUIC, SQLite) through the relay at
//!   25 ms one-way delay; a 3-step saga (site-a, site-b, site-a) started by
//!   `POST /v1/sagas` at A, timed from the request until A's replica holds
//!   it done. Each step hands the saga to the next site in one message, so
//!   the least it can take is two one-way delays (`target_ms` allows 20 ms
//!   more for the steps' durable commits).
//! - `sagas_per_second`: one node; 8 HTTP clients start 1-site 3-step sagas
//!   through the API; from the first request until every saga is done
//!   (the last step of each counts it in its client's document).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use archipelago::transport::relay::{Faults, Relay};
use archipelago::DocId;
use serde_json::{json, Map, Value};

use crate::scenarios::metrics;
use crate::versus::percentile;

/// One-way delay of the relay.
const DELAY: Duration = Duration::from_millis(25);
/// Clients starting sagas at once in the throughput part.
const CLIENTS: usize = 8;
/// Longest any part may take.
const PART_TIME_MAX: Duration = Duration::from_secs(300);

/// `saga` with the sizes of `quick` or full mode.
pub(crate) fn saga(quick: bool) -> anyhow::Result<Map<String, Value>> {
    let (latency_reps, throughput_sagas) = if quick { (20, 400) } else { (100, 4_000) };
    let runtime = crate::versus::runtime()?;
    let mut out = runtime.block_on(latency(latency_reps))?;
    out.extend(runtime.block_on(throughput(throughput_sagas))?);
    Ok(out)
}

/// A node `name` under `root`, its one peer at `peer` (`SITE=ADDR`).
async fn node(
    root: &std::path::Path,
    ca: &std::path::Path,
    name: &str,
    peer: &str,
) -> anyhow::Result<sync_node::Node> {
    let mut options = sync_node::init::InitOptions::new(
        name.parse().map_err(|e| anyhow::anyhow!("{e}"))?,
        root.join(name),
    );
    options.ca_dir = Some(ca.to_path_buf());
    options.peers = vec![peer.parse().map_err(|e: String| anyhow::anyhow!(e))?];
    let config = sync_node::config::Config::load(&sync_node::init::init(&options)?)?;
    Ok(sync_node::Node::start(&config).await?)
}

async fn post(
    http: &reqwest::Client,
    node_url: &str,
    token: &str,
    body: &Value,
) -> anyhow::Result<()> {
    let response = http
        .post(format!("{node_url}/v1/sagas"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == 201,
        "POST /v1/sagas: {} {}",
        response.status(),
        response.text().await.unwrap_or_default()
    );
    Ok(())
}

fn step(name: &str, site: &str, doc: &str, ops: Value) -> Value {
    json!({"name": name, "site": site, "txn": {"docs": [{"id": doc, "ops": ops}]}})
}

async fn latency(reps: usize) -> anyhow::Result<Map<String, Value>> {
    let root = tempfile::tempdir()?;
    let ca = root.path().join("ca");
    sync_node::ca::init_ca(&ca, true)?;
    // site-a dials site-b, through the relay.
    let b = node(root.path(), &ca, "site-b", "site-a=127.0.0.1:9").await?;
    let relay = Relay::start(
        b.sync_addr().context("site-b has no sync endpoint")?,
        Faults {
            delay: DELAY,
            ..Faults::default()
        },
    )
    .await?;
    let a = node(
        root.path(),
        &ca,
        "site-a",
        &format!("site-b={}", relay.local_addr()),
    )
    .await?;
    let http = reqwest::Client::new();
    let mut times = Vec::with_capacity(reps);
    // One unmeasured saga first: the connection and both runners warm.
    for i in 0..=reps {
        let id = format!("lat-{i}");
        let doc = format!("bench/order-{i}");
        let body = json!({"id": id, "steps": [
            step("take", "site-a", &doc, json!([{"op": "set", "path": "/taken", "value": true}])),
            step("reserve", "site-b", &doc, json!([{"op": "set", "path": "/reserved", "value": true}])),
            step("confirm", "site-a", &doc, json!([{"op": "set", "path": "/confirmed", "value": true}])),
        ]});
        let mut feed = a.replica().subscribe();
        let saga_doc: DocId = format!("sagas/{id}").parse()?;
        let started = Instant::now();
        post(&http, &a.url(), a.token(), &body).await?;
        loop {
            let done = a
                .replica()
                .saga(&id)?
                .is_some_and(|v| v.state.status() == archipelago::saga::SagaStatus::Done);
            if done {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < PART_TIME_MAX,
                "saga {id} did not finish"
            );
            // The next change of the saga's document here, or a poll.
            let _ = tokio::time::timeout(Duration::from_millis(50), async {
                loop {
                    match feed.recv().await {
                        Ok(c) if c.doc == saga_doc => return,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            })
            .await;
        }
        if i > 0 {
            times.push(started.elapsed());
        }
    }
    a.shutdown().await?;
    b.shutdown().await?;
    relay.stop().await;
    times.sort();
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
    let delay_ms = DELAY.as_secs_f64() * 1e3;
    let target = 2.0 * delay_ms + 20.0;
    eprintln!(
        "  3-step saga over two sites, relay {delay_ms} ms each way ({reps} sagas): p50 {p50:.1} ms, p99 {p99:.1} ms (target p50 <= {target:.0})"
    );
    Ok(metrics(&[
        ("sagas", json!(reps)),
        ("one_way_delay_ms", json!(delay_ms)),
        ("p50_ms", json!(p50)),
        ("p99_ms", json!(p99)),
        ("target_ms", json!(target)),
    ]))
}

async fn throughput(total: usize) -> anyhow::Result<Map<String, Value>> {
    let root = tempfile::tempdir()?;
    let ca = root.path().join("ca");
    sync_node::ca::init_ca(&ca, true)?;
    let a = node(root.path(), &ca, "site-a", "site-b=127.0.0.1:9").await?;
    let http = reqwest::Client::new();
    // Each client's sagas count themselves done in its own document.
    for c in 0..CLIENTS {
        let ops: Vec<archipelago::doc::Op> = serde_json::from_value(
            json!([{"op": "set", "path": "/done", "value": 0, "as": "counter"}]),
        )?;
        a.replica()
            .apply_ops(&format!("bench/done-{c}").parse()?, &ops, None)?;
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (http, url, token, next) = (http.clone(), a.url(), a.token().to_owned(), next.clone());
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                let doc = format!("bench/tp-{i}");
                let body = json!({"id": format!("tp-{i}"), "steps": [
                    step("take", "site-a", &doc, json!([{"op": "set", "path": "/taken", "value": true}])),
                    step("reserve", "site-a", &doc, json!([{"op": "set", "path": "/reserved", "value": true}])),
                    step("confirm", "site-a", &format!("bench/done-{c}"), json!([{"op": "inc", "path": "/done", "by": 1}])),
                ]});
                post(&http, &url, &token, &body).await?;
            }
        }));
    }
    for client in clients {
        client.await??;
    }
    let posted = started.elapsed();
    loop {
        let mut done = 0;
        for c in 0..CLIENTS {
            let view = a
                .replica()
                .read_json(&format!("bench/done-{c}").parse()?, None)?;
            done += view.and_then(|v| v.value["done"].as_i64()).unwrap_or(0);
        }
        if done as usize >= total {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < PART_TIME_MAX,
            "only {done} of {total} sagas finished"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    a.shutdown().await?;
    let rate = total as f64 / elapsed.as_secs_f64();
    eprintln!(
        "  1-site 3-step sagas through the API, {CLIENTS} clients: {total} in {:.2} s ({:.2} s to start them all): {rate:.0} sagas/s (target >= 1,000)",
        elapsed.as_secs_f64(),
        posted.as_secs_f64()
    );
    Ok(metrics(&[
        ("throughput_sagas", json!(total)),
        ("sagas_per_second", json!(rate)),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_saga_scenario_measures_every_metric() {
        let runtime = crate::versus::runtime().unwrap();
        let mut out = runtime.block_on(latency(2)).unwrap();
        out.extend(runtime.block_on(throughput(16)).unwrap());
        for key in ["p50_ms", "p99_ms", "sagas_per_second"] {
            let value = out[key].as_f64().unwrap();
            assert!(value.is_finite() && value > 0.0, "{key} = {value}");
        }
        // Two hand-offs over a 25 ms link take at least 50 ms.
        assert!(out["p50_ms"].as_f64().unwrap() >= 50.0);
    }
}
