//! Identifier newtypes: document ids, site names, actor ids that carry their
//! site. Each type can only hold a valid value ("parse, don't validate").

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

pub use automerge::ChangeHash;

/// Longest accepted document id, in bytes.
pub const DOC_ID_BYTES_MAX: usize = 256;
/// Longest accepted site name, in bytes.
pub const SITE_NAME_BYTES_MAX: usize = 63;

/// An identifier that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct InvalidId {
    kind: &'static str,
    value: String,
    reason: &'static str,
}

impl InvalidId {
    fn new(kind: &'static str, value: &str, reason: &'static str) -> InvalidId {
        // Keep error messages bounded even for huge inputs.
        let value: String = value.chars().take(80).collect();
        InvalidId {
            kind,
            value,
            reason,
        }
    }
}

/// A document id: 1 to 256 bytes of `[A-Za-z0-9._~/-]`. A `/` separates
/// namespaces, as in `tenant-a/orders/1042`.
///
/// ```
/// use archipelago::DocId;
/// let id: DocId = "inventory/sku-1".parse().unwrap();
/// assert_eq!(id.as_str(), "inventory/sku-1");
/// assert!("has space".parse::<DocId>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocId(Arc<str>);

/// Ids compare, order and hash as their text, so maps keyed by id can be
/// searched with a `&str`.
impl std::borrow::Borrow<str> for DocId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl DocId {
    /// Parses and validates a document id.
    pub fn new(value: &str) -> Result<DocId, InvalidId> {
        if value.is_empty() {
            return Err(InvalidId::new("document id", value, "must not be empty"));
        }
        if value.len() > DOC_ID_BYTES_MAX {
            return Err(InvalidId::new(
                "document id",
                value,
                "longer than 256 bytes",
            ));
        }
        let valid =
            |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'/' | b'-');
        if !value.bytes().all(valid) {
            return Err(InvalidId::new(
                "document id",
                value,
                "allowed characters are A-Z a-z 0-9 . _ ~ / -",
            ));
        }
        Ok(DocId(Arc::from(value)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DocId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<DocId, InvalidId> {
        DocId::new(s)
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({:?})", &*self.0)
    }
}

impl serde::Serialize for DocId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for DocId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DocId, D::Error> {
        let s = String::deserialize(d)?;
        DocId::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A site name: 1 to 63 bytes of `[a-z0-9-]`, such as `us-east`.
///
/// ```
/// use archipelago::SiteName;
/// assert!("us-east".parse::<SiteName>().is_ok());
/// assert!("US_East".parse::<SiteName>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteName(Arc<str>);

impl SiteName {
    /// Parses and validates a site name.
    pub fn new(value: &str) -> Result<SiteName, InvalidId> {
        if value.is_empty() {
            return Err(InvalidId::new("site name", value, "must not be empty"));
        }
        if value.len() > SITE_NAME_BYTES_MAX {
            return Err(InvalidId::new("site name", value, "longer than 63 bytes"));
        }
        let valid = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
        if !value.bytes().all(valid) {
            return Err(InvalidId::new(
                "site name",
                value,
                "allowed characters are a-z 0-9 -",
            ));
        }
        Ok(SiteName(Arc::from(value)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SiteName {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<SiteName, InvalidId> {
        SiteName::new(s)
    }
}

impl fmt::Display for SiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SiteName({:?})", &*self.0)
    }
}

impl serde::Serialize for SiteName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SiteName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SiteName, D::Error> {
        let s = String::deserialize(d)?;
        SiteName::new(&s).map_err(serde::de::Error::custom)
    }
}

/// Number of random bytes in an actor id after the site name.
pub const ACTOR_RANDOM_BYTES: usize = 16;

/// Builds a fresh automerge actor id for a replica of `site`.
///
/// The actor id is the site name, a zero byte, and 16 random bytes, so every
/// change names the site that made it ([`site_of_actor`]) while two processes
/// of one site never share an actor id (automerge assumes one actor's
/// sequence numbers never fork).
pub fn new_actor(site: &SiteName) -> automerge::ActorId {
    actor_of_site(site, rand::random())
}

/// The actor id of `site` with the given 16 bytes in place of random ones,
/// in [`new_actor`]'s layout. For callers that draw those bytes themselves
/// (the simulation, from its seed); they must never hand out one twice.
pub fn actor_of_site(site: &SiteName, unique: [u8; ACTOR_RANDOM_BYTES]) -> automerge::ActorId {
    let mut bytes = Vec::with_capacity(site.as_str().len() + 1 + ACTOR_RANDOM_BYTES);
    bytes.extend_from_slice(site.as_str().as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(&unique);
    automerge::ActorId::from(bytes)
}

/// The site recorded in an actor id made by [`new_actor`], if it has one.
pub fn site_of_actor(actor: &automerge::ActorId) -> Option<SiteName> {
    let bytes = actor.to_bytes();
    let end = bytes.iter().position(|&b| b == 0)?;
    let name = std::str::from_utf8(&bytes[..end]).ok()?;
    SiteName::new(name).ok()
}

/// Parses a change hash from 64 hex digits.
pub fn parse_change_hash(text: &str) -> Result<ChangeHash, InvalidId> {
    text.parse::<ChangeHash>()
        .map_err(|_| InvalidId::new("change hash", text, "expected 64 hex digits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_id_limits() {
        assert!(DocId::new(&"a".repeat(256)).is_ok());
        assert!(DocId::new(&"a".repeat(257)).is_err());
        assert!(DocId::new("").is_err());
        assert!(DocId::new("a/b.c_d~e-F9").is_ok());
        assert!(DocId::new("a b").is_err());
        assert!(DocId::new("é").is_err());
    }

    #[test]
    fn site_name_limits() {
        assert!(SiteName::new(&"a".repeat(63)).is_ok());
        assert!(SiteName::new(&"a".repeat(64)).is_err());
        assert!(SiteName::new("eu-west-1").is_ok());
        assert!(SiteName::new("Eu").is_err());
        assert!(SiteName::new("a.b").is_err());
    }

    #[test]
    fn actor_carries_site_and_is_unique() {
        let site = SiteName::new("us-east").unwrap();
        let a = new_actor(&site);
        let b = new_actor(&site);
        assert_ne!(a, b);
        assert_eq!(site_of_actor(&a), Some(site));
        assert_eq!(
            site_of_actor(&automerge::ActorId::from(vec![1u8, 2, 3])),
            None
        );
    }
}
