//! archipelago benchmarks. Prints a table of what each scenario measured and,
//! with `--json FILE`, writes `{"scenarios": [{"name": ..., metric: value}]}`.
//!
//! ```text
//! cargo run --release -p bench -- [--quick] [--json FILE] [--only NAME,NAME]
//! ```

mod conflicts;
mod escrow;
mod saga;
mod samod_side;
mod scenarios;
mod sync_core;
mod txn;
mod versus;
mod ws_clients;

use std::time::Instant;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use serde_json::{json, Map, Value};

/// Command-line settings.
struct Args {
    quick: bool,
    json: Option<String>,
    only: Option<Vec<String>>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        quick: false,
        json: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--json" => {
                args.json = Some(
                    it.next()
                        .ok_or_else(|| anyhow::anyhow!("--json needs a file"))?,
                )
            }
            "--only" => {
                let list = it
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--only needs scenario names"))?;
                args.only = Some(list.split(',').map(str::to_owned).collect());
            }
            "-h" | "--help" => {
                println!("usage: bench [--quick] [--json FILE] [--only NAME,NAME]");
                println!("scenarios: {}", scenarios::NAMES.join(", "));
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    // `ws_clients` runs its servers as children: this binary again.
    if let Ok(server) = std::env::var(ws_clients::SERVER_ENV) {
        let (kind, docs) = server
            .split_once(' ')
            .ok_or_else(|| anyhow::anyhow!("{}: KIND DOCS", ws_clients::SERVER_ENV))?;
        return ws_clients::serve_child(kind, docs.parse()?);
    }
    let args = parse_args()?;
    if let Some(only) = &args.only {
        for name in only {
            anyhow::ensure!(
                scenarios::NAMES.contains(&name.as_str()),
                "unknown scenario {name:?}"
            );
        }
    }
    let mode = if args.quick { "quick" } else { "full" };
    println!(
        "archipelago bench ({mode} mode); reproduce with: cargo run --release -p bench --{}",
        if args.quick { " --quick" } else { "" }
    );
    let started = Instant::now();
    let mut results = Vec::new();
    for name in scenarios::NAMES {
        if args
            .only
            .as_ref()
            .is_some_and(|only| !only.iter().any(|n| n == name))
        {
            continue;
        }
        eprintln!("running {name} ...");
        let metrics = scenarios::run(name, args.quick)?;
        print_row(name, &metrics);
        let mut entry = Map::new();
        entry.insert("name".into(), json!(name));
        entry.extend(metrics);
        results.push(Value::Object(entry));
    }
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json!({"scenarios": results}))?,
        )?;
        println!("wrote {path}");
    }
    Ok(())
}

fn print_row(name: &str, metrics: &Map<String, Value>) {
    let cells: Vec<String> = metrics
        .iter()
        .map(|(k, v)| match v.as_f64() {
            Some(f) if f.fract() != 0.0 => format!("{k}={f:.3}"),
            _ => format!("{k}={v}"),
        })
        .collect();
    println!("{name:<28} {}", cells.join("  "));
}
