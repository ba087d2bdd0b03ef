//! What the strong tier's log carries ([`Command`]) and what applying an
//! entry answers ([`Response`]). Both travel between sites (postcard) and
//! are kept in the log, so they hold plain data: hashes as bytes, ids as
//! strings.

use serde::{Deserialize, Serialize};

use crate::id::{DocId, SiteName};

/// Longest lease name.
pub const LEASE_NAME_BYTES_MAX: usize = 128;

/// Longest lease time to live: a holder that stops renewing blocks the
/// lease at most this long.
pub const LEASE_TTL_MS_MAX: u64 = 10 * 60 * 1000;

/// The payload of one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Transactions the leader made, in the order it made them (each
    /// change depends on the state the ones before it left).
    Txns(Vec<StrongTxn>),
    /// `site` takes or renews lease `name` until `now_ms + ttl_ms`, if it
    /// is free, expired at `now_ms`, or already `site`'s. `now_ms` is the
    /// proposing leader's clock, so every site decides alike.
    AcquireLease {
        /// The lease.
        name: String,
        /// Who asks.
        site: SiteName,
        /// How long it holds from `now_ms`.
        ttl_ms: u64,
        /// The leader's wall clock when it proposed, in milliseconds.
        now_ms: i64,
    },
    /// `site` gives up lease `name`, if it still holds it at `epoch`.
    ReleaseLease {
        /// The lease.
        name: String,
        /// Who gives it up.
        site: SiteName,
        /// The epoch it held.
        epoch: u64,
    },
}

/// One transaction made by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StrongTxn {
    /// The transaction's id ([`crate::txn::TxnId`]), also in each change's
    /// header.
    pub id: [u8; 16],
    /// The change of each member document, encoded.
    pub changes: Vec<StrongChange>,
}

/// One document's change of a [`StrongTxn`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StrongChange {
    /// The document.
    pub doc: DocId,
    /// The automerge change, encoded.
    pub change: Vec<u8>,
}

/// A named lease kept by the tier: who holds it, since which epoch, until
/// when (by the clocks of the leaders that granted and renewed it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The lease's name.
    pub name: String,
    /// The site holding it.
    pub holder: SiteName,
    /// Grows by one each time the lease changes hands: a holder acts only
    /// with the epoch it was granted, so a stale one is fenced off.
    pub epoch: u64,
    /// When it lapses unless renewed, in milliseconds since the epoch.
    pub expires_ms: i64,
}

/// What applying one entry answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A blank or membership entry.
    None,
    /// Per transaction of a [`Command::Txns`], in order: per changed
    /// document, its heads right after the transaction.
    Txns(Vec<Vec<AppliedDoc>>),
    /// The lease after a lease command, and whether the command took
    /// effect.
    Lease {
        /// The command took effect.
        granted: bool,
        /// The lease as it stands (None once released).
        lease: Option<Lease>,
    },
}

/// One document of an applied transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedDoc {
    /// The document.
    pub doc: DocId,
    /// Its heads right after the transaction.
    pub heads: Vec<[u8; 32]>,
    /// The transaction's change to it.
    pub change: [u8; 32],
}

impl Command {
    /// Checks what a peer's entry may hold: lease names and times to live
    /// within their bounds.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Command::Txns(_) => Ok(()),
            Command::AcquireLease { name, ttl_ms, .. } => {
                check_lease_name(name)?;
                if *ttl_ms == 0 || *ttl_ms > LEASE_TTL_MS_MAX {
                    return Err(format!(
                        "a lease lives 1 to {LEASE_TTL_MS_MAX} ms, not {ttl_ms}"
                    ));
                }
                Ok(())
            }
            Command::ReleaseLease { name, .. } => check_lease_name(name),
        }
    }
}

/// A lease name: 1 to [`LEASE_NAME_BYTES_MAX`] bytes of `[A-Za-z0-9._/-]`.
pub fn check_lease_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > LEASE_NAME_BYTES_MAX
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
    {
        return Err(format!(
            "a lease name is 1 to {LEASE_NAME_BYTES_MAX} characters of A-Z a-z 0-9 . _ / -"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_through_postcard() {
        let command = Command::Txns(vec![StrongTxn {
            id: [7; 16],
            changes: vec![StrongChange {
                doc: "accounts/1".parse().unwrap(),
                change: vec![1, 2, 3],
            }],
        }]);
        let bytes = postcard::to_stdvec(&command).unwrap();
        assert_eq!(postcard::from_bytes::<Command>(&bytes).unwrap(), command);
        let lease = Command::AcquireLease {
            name: "rules/stock".to_owned(),
            site: "us-east".parse().unwrap(),
            ttl_ms: 5_000,
            now_ms: 1,
        };
        assert!(lease.check().is_ok());
        let bytes = postcard::to_stdvec(&lease).unwrap();
        assert_eq!(postcard::from_bytes::<Command>(&bytes).unwrap(), lease);
    }

    #[test]
    fn bad_lease_names_and_times_are_refused() {
        assert!(check_lease_name("").is_err());
        assert!(check_lease_name("a b").is_err());
        assert!(check_lease_name(&"x".repeat(LEASE_NAME_BYTES_MAX + 1)).is_err());
        let forever = Command::AcquireLease {
            name: "x".to_owned(),
            site: "a".parse().unwrap(),
            ttl_ms: LEASE_TTL_MS_MAX + 1,
            now_ms: 0,
        };
        assert!(forever.check().is_err());
    }
}
