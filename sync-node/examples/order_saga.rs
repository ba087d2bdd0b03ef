//! A saga over two sites and a payment service: take the order at
//! eu-west, reserve the stock held at us-east, charge the card through an
//! HTTP service. The first order goes through; the payment service refuses
//! the second, so its reservation and its order are undone, in reverse
//! order, each once, at the site that owns them.
//!
//!     cargo run -p sync-node --example order_saga
//!
//! Two in-process nodes over QUIC on 127.0.0.1 and a payment service on
//! 127.0.0.1; everything stops by itself.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

async fn start(
    root: &std::path::Path,
    ca: &std::path::Path,
    name: &str,
    peer: String,
) -> anyhow::Result<sync_node::Node> {
    let mut options = sync_node::init::InitOptions::new(name.parse()?, root.join(name));
    options.ca_dir = Some(ca.to_path_buf());
    options.peers = vec![peer.parse().map_err(|e: String| anyhow::anyhow!(e))?];
    let config = sync_node::config::Config::load(&sync_node::init::init(&options)?)?;
    Ok(sync_node::Node::start(&config).await?)
}

async fn call(
    node: &sync_node::Node,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", node.url()))
        .bearer_auth(node.token());
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status();
    let value: Value = response.json().await?;
    anyhow::ensure!(status.is_success(), "{path}: {status} {value}");
    Ok(value)
}

/// Waits (at most 30 s) until the saga is finished at both sites, and
/// returns it as eu-west shows it.
async fn finished(eu: &sync_node::Node, us: &sync_node::Node, id: &str) -> anyhow::Result<Value> {
    let started = Instant::now();
    loop {
        let path = format!("/v1/sagas/{id}");
        let (a, b) = (
            call(eu, reqwest::Method::GET, &path, None).await,
            call(us, reqwest::Method::GET, &path, None).await,
        );
        if let (Ok(a), Ok(b)) = (a, b) {
            let done =
                |s: &Value| !matches!(s["status"].as_str(), Some("running" | "compensating"));
            if done(&a) && a == b {
                return Ok(a);
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "saga {id} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn print_saga(saga: &Value) {
    println!("   saga {}: {}", saga["id"], saga["status"]);
    for step in saga["steps"].as_array().into_iter().flatten() {
        let error = step["error"]
            .as_str()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        println!(
            "     {:8} at {:8} {}{error}",
            step["name"].as_str().unwrap_or(""),
            step["site"].as_str().unwrap_or(""),
            step["status"].as_str().unwrap_or("")
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let ca = root.path().join("ca");
    sync_node::ca::init_ca(&ca, true)?;
    let us = start(
        root.path(),
        &ca,
        "us-east",
        "eu-west=127.0.0.1:9".to_owned(),
    )
    .await?;
    let us_sync = us.sync_addr().context("us-east has no sync endpoint")?;
    let eu = start(root.path(), &ca, "eu-west", format!("us-east={us_sync}")).await?;

    // The payment service: accepts the first order's charge, refuses the
    // second's (a 402 is a refusal: the charge took no effect).
    let charges = Arc::new(AtomicU32::new(0));
    let counted = charges.clone();
    let app = axum::Router::new().route(
        "/charge",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let counted = counted.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                println!("   payment service: charge {key}");
                if key.starts_with("order-2/") {
                    return axum::http::StatusCode::PAYMENT_REQUIRED;
                }
                counted.fetch_add(1, Ordering::SeqCst);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let payments = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    println!(
        "1. the stock, held at us-east (a bounded counter), and an empty order book at eu-west"
    );
    call(
        &us,
        reqwest::Method::POST,
        "/v1/docs/stock%2Fsku-1/ops",
        Some(json!({"ops": [
            {"op": "set", "path": "/available", "value": 10, "as": "bounded", "min": 0}
        ]})),
    )
    .await?;

    for (n, id) in ["order-1", "order-2"].into_iter().enumerate() {
        println!("{}. saga {id}: take the order at eu-west, reserve 2 at us-east, charge at the payment service", n + 2);
        let saga = json!({"id": id, "steps": [
            {"name": "take", "site": "eu-west",
             "txn": {"docs": [{"id": format!("orders/{id}"), "ops": [{"op": "set", "path": "/status", "value": "taken"}]}]},
             "compensate": {"docs": [{"id": format!("orders/{id}"), "ops": [{"op": "set", "path": "/status", "value": "cancelled"}]}]}},
            {"name": "reserve", "site": "us-east",
             "txn": {"docs": [{"id": "stock/sku-1", "ops": [{"op": "inc", "path": "/available", "by": -2}]}]},
             "compensate": {"docs": [{"id": "stock/sku-1", "ops": [{"op": "inc", "path": "/available", "by": 2}]}]}},
            {"name": "charge", "site": "eu-west",
             "http": {"url": format!("http://{payments}/charge"), "body": {"order": id, "amount": 40}}}
        ]});
        let started = call(&eu, reqwest::Method::POST, "/v1/sagas", Some(saga)).await?;
        println!("   started: {started}");
        print_saga(&finished(&eu, &us, id).await?);
    }

    let order_1 = call(&eu, reqwest::Method::GET, "/v1/docs/orders%2Forder-1", None).await?;
    let order_2 = call(&eu, reqwest::Method::GET, "/v1/docs/orders%2Forder-2", None).await?;
    let stock = call(&us, reqwest::Method::GET, "/v1/docs/stock%2Fsku-1", None).await?;
    println!(
        "4. orders: order-1 {}, order-2 {}; stock available {}; charges taken {}",
        order_1["value"]["status"],
        order_2["value"]["status"],
        stock["value"]["available"],
        charges.load(Ordering::SeqCst)
    );
    anyhow::ensure!(
        order_1["value"]["status"] == "taken" && order_2["value"]["status"] == "cancelled"
    );
    anyhow::ensure!(
        stock["value"]["available"] == 8,
        "one reservation kept, one given back"
    );
    anyhow::ensure!(charges.load(Ordering::SeqCst) == 1);
    println!("ok: order-1 done; order-2 refused by the payment service and undone in reverse order, once");
    eu.shutdown().await?;
    us.shutdown().await?;
    Ok(())
}
