//! `sync-node check`: the consistency check. Compares the documents and
//! heads that several running nodes hold under a prefix.
//!
//! Each attempt first asks every node for its digest (`GET
//! /v1/heads/digest`, one small answer); equal digests mean the same
//! documents at the same heads everywhere. Only when they differ does it
//! list every node's heads (`GET /v1/heads`, paged) and name the documents
//! that differ. Changes still in flight differ for a moment, so a check
//! that finds differences waits and tries again, and reports only what
//! still differs on its last attempt, marking the documents whose heads
//! moved between attempts as `changing` (written meanwhile; replication
//! may just be behind) as opposed to stuck.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::future::try_join_all;
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::{encode, Client};

/// Most documents the check lists per node when digests differ: a bound on
/// its memory (about 200 bytes a document). Larger sets are checked a
/// prefix at a time.
pub(crate) const CHECK_DOCS_MAX: usize = 1_000_000;

/// How the check runs.
#[derive(Debug, Clone)]
pub(crate) struct CheckOptions {
    /// Only documents whose id starts with this.
    pub(crate) prefix: String,
    /// Comparisons before reporting differences, at least 1.
    pub(crate) attempts: u32,
    /// Pause between attempts.
    pub(crate) wait: Duration,
}

/// One document that differs between the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Difference {
    pub(crate) id: String,
    /// Per node, in the order of the nodes: its heads (sorted), or `None`
    /// when it does not hold the document.
    pub(crate) heads: Vec<Option<Vec<String>>>,
    /// Some node's heads for it moved since the previous attempt.
    pub(crate) changing: bool,
}

/// What the check found.
#[derive(Debug, Clone)]
pub(crate) struct CheckReport {
    pub(crate) prefix: String,
    /// The nodes' site names, in the order they were given.
    pub(crate) sites: Vec<String>,
    /// Documents held by at least one node.
    pub(crate) docs: usize,
    /// The common digest, when the digests were equal.
    pub(crate) digest: Option<String>,
    /// Attempts made.
    pub(crate) attempts: u32,
    /// What still differed on the last attempt, in id order.
    pub(crate) differing: Vec<Difference>,
}

impl CheckReport {
    pub(crate) fn consistent(&self) -> bool {
        self.differing.is_empty()
    }

    pub(crate) fn to_json(&self) -> Value {
        let differing: Vec<Value> = self
            .differing
            .iter()
            .map(|difference| {
                let heads: serde_json::Map<String, Value> = self
                    .sites
                    .iter()
                    .zip(&difference.heads)
                    .map(|(site, heads)| (site.clone(), json!(heads)))
                    .collect();
                json!({
                    "id": difference.id,
                    "changing": difference.changing,
                    "heads": heads,
                })
            })
            .collect();
        json!({
            "consistent": self.consistent(),
            "prefix": self.prefix,
            "sites": self.sites,
            "docs": self.docs,
            "digest": self.digest,
            "attempts": self.attempts,
            "differing": differing,
        })
    }

    /// The report as text: one line when consistent, else a summary line
    /// and a line per differing document (at most `lines_max`).
    pub(crate) fn to_text(&self, lines_max: usize) -> String {
        let scope = if self.prefix.is_empty() {
            String::new()
        } else {
            format!(" under {:?}", self.prefix)
        };
        let sites = self.sites.join(", ");
        if self.consistent() {
            let digest = self
                .digest
                .as_deref()
                .map(|d| format!("; digest {}", &d[..d.len().min(16)]))
                .unwrap_or_default();
            return format!(
                "consistent: {} documents{scope} identical at {} sites ({sites}){digest}\n",
                self.docs,
                self.sites.len(),
            );
        }
        let changing = self.differing.iter().filter(|d| d.changing).count();
        let mut text = format!(
            "inconsistent: {} of {} documents{scope} differ between {sites} after {} attempts ({changing} still changing)\n",
            self.differing.len(),
            self.docs,
            self.attempts,
        );
        for difference in self.differing.iter().take(lines_max) {
            let per_site: Vec<String> = self
                .sites
                .iter()
                .zip(&difference.heads)
                .map(|(site, heads)| match heads {
                    None => format!("{site} missing"),
                    Some(heads) => {
                        let short: Vec<&str> =
                            heads.iter().map(|h| &h[..h.len().min(12)]).collect();
                        format!("{site} [{}]", short.join(" "))
                    }
                })
                .collect();
            let changing = if difference.changing {
                "  (changing)"
            } else {
                ""
            };
            text.push_str(&format!(
                "  {}: {}{changing}\n",
                difference.id,
                per_site.join(", ")
            ));
        }
        if self.differing.len() > lines_max {
            text.push_str(&format!(
                "  ... and {} more (--json lists them all)\n",
                self.differing.len() - lines_max
            ));
        }
        text
    }
}

/// One node's documents and their heads (sorted).
type NodeHeads = BTreeMap<String, Vec<String>>;

/// The documents whose heads are not the same at every node, in id order.
/// `previous` is the last attempt's differences: a document whose heads
/// at some node are not what they were then is `changing`.
pub(crate) fn differences(nodes: &[NodeHeads], previous: &[Difference]) -> Vec<Difference> {
    let previous: BTreeMap<&str, &Difference> =
        previous.iter().map(|d| (d.id.as_str(), d)).collect();
    let ids: BTreeSet<&String> = nodes.iter().flat_map(BTreeMap::keys).collect();
    ids.into_iter()
        .filter_map(|id| {
            let heads: Vec<Option<Vec<String>>> =
                nodes.iter().map(|node| node.get(id).cloned()).collect();
            if heads.windows(2).all(|pair| pair[0] == pair[1]) {
                return None;
            }
            let changing = previous
                .get(id.as_str())
                .is_some_and(|before| before.heads != heads);
            Some(Difference {
                id: id.clone(),
                heads,
                changing,
            })
        })
        .collect()
}

/// Runs the check against `clients` (at least two nodes).
pub(crate) async fn check(
    clients: &[Client],
    options: &CheckOptions,
) -> anyhow::Result<CheckReport> {
    let mut report = CheckReport {
        prefix: options.prefix.clone(),
        sites: try_join_all(clients.iter().map(site_of)).await?,
        docs: 0,
        digest: None,
        attempts: 0,
        differing: Vec::new(),
    };
    let unique: BTreeSet<&String> = report.sites.iter().collect();
    anyhow::ensure!(
        unique.len() == report.sites.len(),
        "two of the configs are the same site ({}); give each node once",
        report.sites.join(", ")
    );
    for attempt in 1..=options.attempts.max(1) {
        if attempt > 1 {
            tokio::time::sleep(options.wait).await;
        }
        report.attempts = attempt;
        let digests = try_join_all(clients.iter().map(|c| digest_of(c, &options.prefix))).await?;
        if digests.windows(2).all(|pair| pair[0] == pair[1]) {
            let (docs, digest) = digests.into_iter().next().unwrap_or_default();
            report.docs = docs;
            report.digest = Some(digest);
            report.differing.clear();
            return Ok(report);
        }
        let nodes = try_join_all(clients.iter().map(|c| heads_of(c, &options.prefix))).await?;
        report.docs = nodes
            .iter()
            .flat_map(BTreeMap::keys)
            .collect::<BTreeSet<_>>()
            .len();
        report.differing = differences(&nodes, &report.differing);
        if report.differing.is_empty() {
            // The digests were read a moment before the listings, and what
            // was in flight then has arrived.
            return Ok(report);
        }
    }
    Ok(report)
}

/// The site name a node reports in `/v1/status`.
async fn site_of(client: &Client) -> anyhow::Result<String> {
    let status = client.request(Method::GET, "/v1/status", None).await?;
    status["site"]
        .as_str()
        .map(str::to_owned)
        .context("the node's status has no site name")
}

/// A node's document count and digest under `prefix`.
async fn digest_of(client: &Client, prefix: &str) -> anyhow::Result<(usize, String)> {
    let path = format!("/v1/heads/digest?prefix={}", encode(prefix));
    let answer = client.request(Method::GET, &path, None).await?;
    let docs = answer["docs"]
        .as_u64()
        .context("the digest answer has no document count")?;
    let digest = answer["digest"]
        .as_str()
        .context("the digest answer has no digest")?;
    Ok((usize::try_from(docs)?, digest.to_owned()))
}

/// Every document a node holds under `prefix`, with its heads, read page
/// by page.
async fn heads_of(client: &Client, prefix: &str) -> anyhow::Result<NodeHeads> {
    let mut docs = NodeHeads::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/v1/heads?prefix={}", encode(prefix));
        if let Some(after) = &after {
            path.push_str("&after=");
            path.push_str(&encode(after));
        }
        let answer = client.request(Method::GET, &path, None).await?;
        let page = answer["docs"]
            .as_array()
            .context("the heads answer has no document list")?;
        for entry in page {
            let id = entry["id"]
                .as_str()
                .context("a listed document has no id")?;
            let mut heads: Vec<String> = entry["heads"]
                .as_array()
                .context("a listed document has no heads")?
                .iter()
                .map(|h| h.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .context("a head is not a string")?;
            heads.sort_unstable();
            docs.insert(id.to_owned(), heads);
        }
        anyhow::ensure!(
            docs.len() <= CHECK_DOCS_MAX,
            "a node holds more than {CHECK_DOCS_MAX} documents under the prefix; check a narrower one"
        );
        match answer.get("next").and_then(Value::as_str) {
            Some(next) if !page.is_empty() => after = Some(next.to_owned()),
            _ => return Ok(docs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(docs: &[(&str, &[&str])]) -> NodeHeads {
        docs.iter()
            .map(|(id, heads)| {
                (
                    (*id).to_owned(),
                    heads.iter().map(|h| (*h).to_owned()).collect(),
                )
            })
            .collect()
    }

    fn heads(list: &[&str]) -> Option<Vec<String>> {
        Some(list.iter().map(|h| (*h).to_owned()).collect())
    }

    #[test]
    fn differences_name_missing_and_differing_documents_only() {
        let a = node(&[("same", &["h1"]), ("moved", &["h2"]), ("only-a", &["h3"])]);
        let b = node(&[("same", &["h1"]), ("moved", &["h2", "h4"])]);
        let found = differences(&[a, b], &[]);
        assert_eq!(
            found,
            vec![
                Difference {
                    id: "moved".to_owned(),
                    heads: vec![heads(&["h2"]), heads(&["h2", "h4"])],
                    changing: false,
                },
                Difference {
                    id: "only-a".to_owned(),
                    heads: vec![heads(&["h3"]), None],
                    changing: false,
                },
            ]
        );
        // The next attempt: `moved` got a new change at a, `only-a` did not
        // move.
        let a = node(&[("same", &["h1"]), ("moved", &["h5"]), ("only-a", &["h3"])]);
        let b = node(&[("same", &["h1"]), ("moved", &["h2", "h4"])]);
        let again = differences(&[a, b], &found);
        let changing: Vec<(&str, bool)> =
            again.iter().map(|d| (d.id.as_str(), d.changing)).collect();
        assert_eq!(changing, [("moved", true), ("only-a", false)]);
    }

    #[test]
    fn identical_nodes_have_no_differences() {
        let a = node(&[("x", &["h1", "h2"]), ("y", &[])]);
        assert!(differences(&[a.clone(), a.clone(), a], &[]).is_empty());
        assert!(differences(&[NodeHeads::new(), NodeHeads::new()], &[]).is_empty());
    }

    #[test]
    fn the_text_report_names_sites_and_caps_its_lines() {
        let report = CheckReport {
            prefix: "orders/".to_owned(),
            sites: vec!["east".to_owned(), "west".to_owned()],
            docs: 10,
            digest: None,
            attempts: 3,
            differing: (0..3)
                .map(|n| Difference {
                    id: format!("orders/{n}"),
                    heads: vec![heads(&["0123456789abcdef"]), None],
                    changing: n == 0,
                })
                .collect(),
        };
        let text = report.to_text(2);
        assert!(text.starts_with(
            "inconsistent: 3 of 10 documents under \"orders/\" differ between east, west after 3 attempts (1 still changing)\n"
        ), "{text}");
        assert!(text.contains("  orders/0: east [0123456789ab], west missing  (changing)\n"));
        assert!(text.contains("  orders/1: east [0123456789ab], west missing\n"));
        assert!(!text.contains("orders/2:"));
        assert!(text.ends_with("  ... and 1 more (--json lists them all)\n"));
        assert_eq!(
            report.to_json()["differing"][2]["heads"]["west"],
            Value::Null
        );
        assert_eq!(report.to_json()["consistent"], false);
    }
}
