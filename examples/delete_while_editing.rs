//! Clinical records: a patient is discharged at one hospital site, which
//! deletes the active patient record, while a nurse at another site records
//! a newly discovered allergy in that same record. A CRDT merge lets the
//! delete win and silently drops the allergy with the deleted object. The
//! `delete_update` detector reports it at both sites with the same id and
//! carries the lost write, so a person can restore the record, allergy
//! included, in the change that resolves the report.
//!
//! Run: `cargo run --example delete_while_editing`

use std::sync::Arc;

use archipelago::conflict::{ConflictConfig, Filter, Kind, Status};
use archipelago::doc::Op;
use archipelago::store::Sqlite;
use archipelago::{DocId, Origin, Replica, ReplicaOptions};
use serde_json::json;

/// Ships every change each site has to the others until all hold the same
/// heads (`sync-node` does this over QUIC; here it is done by hand).
fn exchange(sites: &[&Replica], doc: &DocId) -> anyhow::Result<()> {
    for _ in 0..6 {
        for from in sites {
            let Some(changes) = from.changes_after(doc, &[])? else {
                continue;
            };
            for to in sites.iter().filter(|to| to.site() != from.site()) {
                to.apply_changes(doc, &changes, Origin::Peer(from.site().clone()))?;
            }
        }
        if sites.windows(2).all(|w| w[0].heads(doc) == w[1].heads(doc)) {
            return Ok(());
        }
    }
    anyhow::bail!("sites did not converge on {doc}")
}

fn ops(value: serde_json::Value) -> anyhow::Result<Vec<Op>> {
    Ok(serde_json::from_value(value)?)
}

fn record(site: &Replica, doc: &DocId) -> anyhow::Result<serde_json::Value> {
    Ok(site.read_json(doc, None)?.expect("exists").value)
}

fn main() -> anyhow::Result<()> {
    // The built-in detectors (concurrent_write, delete_update) are on by
    // default; no rule is needed.
    let config = Arc::new(ConflictConfig::default());
    let dir = tempfile::tempdir()?;
    let open = |site: &str| -> anyhow::Result<Replica> {
        let mut options = ReplicaOptions::new(site.parse()?);
        options.conflicts = config.clone();
        let store = Sqlite::open(dir.path().join(format!("{site}.db")))?;
        Ok(Replica::open(options, Arc::new(store))?)
    };
    let ward = open("eu-west")?;
    let clinic = open("us-east")?;
    let sites = [&ward, &clinic];
    let doc: DocId = "records/mrn-20931".parse()?;

    ward.apply_ops(
        &doc,
        &ops(json!([
            {"op": "set", "path": "/mrn", "value": "20931"},
            {"op": "set", "path": "/patient",
             "value": {"name": "Kim Lee", "allergies": "none known"}},
        ]))?,
        Some("admit"),
    )?;
    exchange(&sites, &doc)?;
    println!("1. both sites hold {}", record(&ward, &doc)?);

    println!("2. concurrently: eu-west discharges (deletes /patient), us-east records an allergy");
    ward.apply_ops(
        &doc,
        &ops(json!([{"op": "del", "path": "/patient"}]))?,
        Some("discharge"),
    )?;
    clinic.apply_ops(
        &doc,
        &ops(json!([{"op": "set", "path": "/patient/allergies", "value": "penicillin"}]))?,
        Some("record allergy"),
    )?;

    println!("3. the sites exchange changes; the delete wins the merge");
    exchange(&sites, &doc)?;
    for site in sites {
        println!("   at {}: {}", site.site(), record(site, &doc)?);
    }
    let reports = ward.conflicts(&Filter::default())?;
    anyhow::ensure!(reports.len() == 1, "expected one report: {reports:#?}");
    anyhow::ensure!(
        clinic.conflicts(&Filter::default())? == reports,
        "sites disagree"
    );
    let report = reports[0].clone();
    assert_eq!(report.kind, Kind::DeleteUpdate);
    assert_eq!(report.path, "/patient");
    assert_eq!(report.status, Status::Open);
    println!(
        "   both sites: {} report {} on {}",
        report.kind.as_str(),
        report.id,
        report.path
    );
    for v in &report.values {
        let site = v.site.as_ref().map_or("?".into(), |s| s.to_string());
        println!(
            "     {site} wrote {} (change {})",
            v.value,
            &v.change.to_string()[..12]
        );
    }
    let lost = report
        .values
        .iter()
        .find(|v| v.site == Some("us-east".parse().expect("a site name")))
        .expect("us-east's write is in the report");
    assert_eq!(lost.value, json!({"allergies": "penicillin"}));

    println!("4. eu-west restores the record with the lost allergy, resolving the report");
    // The record as the us-east nurse left it: time travel to the lost write.
    let as_edited = ward.read_json(&doc, Some(&[lost.change]))?.expect("exists");
    let mut patient = as_edited.value["patient"].clone();
    println!("   /patient as of the lost write: {patient}");
    patient["discharged"] = json!(true);
    ward.resolve_conflict(
        &report.id,
        &ops(json!([{"op": "set", "path": "/patient", "value": patient}]))?,
        Some("restored after discharge: allergy was recorded concurrently"),
    )?;

    println!("5. the sites exchange changes again");
    exchange(&sites, &doc)?;
    let expected = json!({
        "mrn": "20931",
        "patient": {"name": "Kim Lee", "allergies": "penicillin", "discharged": true},
    });
    for site in sites {
        let value = record(site, &doc)?;
        let status = site.conflict(&report.id)?.expect("known").status;
        println!("   at {}: {value} (report {status:?})", site.site());
        assert_eq!(value, expected);
        assert_eq!(status, Status::Resolved);
        assert!(site
            .conflicts(&Filter {
                status: Some(Status::Open),
                ..Filter::default()
            })?
            .is_empty());
    }
    println!("ok: the lost allergy was reported at both sites and restored once");
    Ok(())
}
