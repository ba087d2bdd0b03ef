//! Document ids of the automerge-repo protocol and the automerge URLs that
//! carry them, mapped to archipelago document ids.
//!
//! An automerge-repo document id is 16 bytes, written as their bs58check
//! encoding; its URL is `automerge:` and that text. A document a client
//! creates is stored as `NAMESPACE/ID` (namespace `repo` by default), so
//! its id is in its name. Any other document gets an id derived from its
//! name (the first 16 bytes of a SHA-256), the same at every site, so one
//! URL opens it wherever a client connects.

use sha2::{Digest, Sha256};

use crate::DocId;

/// What an automerge URL starts with.
pub const URL_SCHEME: &str = "automerge:";

/// An automerge-repo document id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoId([u8; 16]);

impl RepoId {
    /// The id written in `text` (bs58check of 16 bytes), if it is one.
    pub fn parse(text: &str) -> Option<RepoId> {
        // 16 bytes and a 4-byte check encode in at most 28 characters.
        if text.is_empty() || text.len() > 32 {
            return None;
        }
        let bytes = bs58::decode(text).with_check(None).into_vec().ok()?;
        Some(RepoId(bytes.try_into().ok()?))
    }

    /// The id in a URL `automerge:ID` (a `#heads` suffix is ignored).
    pub fn from_url(url: &str) -> Option<RepoId> {
        let rest = url.strip_prefix(URL_SCHEME)?;
        RepoId::parse(rest.split('#').next().unwrap_or(rest))
    }

    /// The id derived from a document's name, for documents whose name does
    /// not carry one.
    pub fn derived(doc: &DocId) -> RepoId {
        let digest = Sha256::new()
            .chain_update(b"archipelago automerge-repo id\0")
            .chain_update(doc.as_str().as_bytes())
            .finalize();
        let mut bytes = [0; 16];
        bytes.copy_from_slice(&digest[..16]);
        RepoId(bytes)
    }

    /// The id of `doc` for clients: the one in its name when it is
    /// `namespace/ID`, otherwise [`RepoId::derived`].
    pub fn of(doc: &DocId, namespace: &str) -> RepoId {
        doc.as_str()
            .strip_prefix(namespace)
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(RepoId::parse)
            .unwrap_or_else(|| RepoId::derived(doc))
    }

    /// The name a document created by a client under this id is stored as.
    pub fn doc_in(&self, namespace: &str) -> Option<DocId> {
        format!("{namespace}/{self}").parse().ok()
    }

    /// The automerge URL, `automerge:ID`.
    pub fn url(&self) -> String {
        format!("{URL_SCHEME}{self}")
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&bs58::encode(&self.0).with_check().into_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_bad_ones_are_refused() {
        let doc: DocId = "inventory/sku-1".parse().unwrap();
        let id = RepoId::derived(&doc);
        assert_eq!(RepoId::parse(&id.to_string()), Some(id));
        assert_eq!(RepoId::from_url(&id.url()), Some(id));
        assert_eq!(RepoId::from_url(&format!("{}#abc", id.url())), Some(id));
        // Derived the same way everywhere, and different per document.
        assert_eq!(RepoId::derived(&doc), id);
        assert_ne!(RepoId::derived(&"inventory/sku-2".parse().unwrap()), id);
        // A client's document carries its id in its name.
        let stored = id.doc_in("repo").unwrap();
        assert_eq!(stored.as_str(), format!("repo/{id}"));
        assert_eq!(RepoId::of(&stored, "repo"), id);
        assert_ne!(RepoId::of(&stored, "other"), id);

        for bad in ["", "x", "automerge", "0OIl", &"1".repeat(40)] {
            assert_eq!(RepoId::parse(bad), None, "{bad}");
        }
        // A valid bs58check of the wrong length.
        let short = bs58::encode([1u8; 8]).with_check().into_string();
        assert_eq!(RepoId::parse(&short), None);
        // A flipped character breaks the check.
        let mut text = id.to_string().into_bytes();
        text[3] = if text[3] == b'2' { b'3' } else { b'2' };
        assert_eq!(RepoId::parse(std::str::from_utf8(&text).unwrap()), None);
    }
}
