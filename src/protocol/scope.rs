//! Replication scope: which documents a peer may receive from us and which
//! it may write to us, as globs over document ids.

use serde::{Deserialize, Serialize};

use crate::id::DocId;

/// A glob over document ids: `*` matches any run of characters (including
/// `/`, so `eu/*` covers every document under `eu/`), `?` one character.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Glob(String);

impl Glob {
    /// A glob from its pattern.
    pub fn new(pattern: &str) -> Glob {
        Glob(pattern.to_owned())
    }

    /// The pattern.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `id` matches.
    pub fn matches(&self, id: &str) -> bool {
        glob_match(self.0.as_bytes(), id.as_bytes())
    }
}

/// Iterative glob matching with one backtrack point: linear in practice and
/// never exponential.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// What one peer may receive and write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// Documents sent to the peer.
    pub send: Vec<Glob>,
    /// Documents accepted from the peer.
    pub receive: Vec<Glob>,
}

impl Default for Scope {
    fn default() -> Scope {
        Scope::everything()
    }
}

impl Scope {
    /// Every document, both ways.
    pub fn everything() -> Scope {
        Scope {
            send: vec![Glob::new("*")],
            receive: vec![Glob::new("*")],
        }
    }

    /// True when `doc` may be sent to the peer.
    pub fn may_send(&self, doc: &DocId) -> bool {
        self.send.iter().any(|g| g.matches(doc.as_str()))
    }

    /// True when changes to `doc` are accepted from the peer.
    pub fn may_receive(&self, doc: &DocId) -> bool {
        self.receive.iter().any(|g| g.matches(doc.as_str()))
    }

    /// True when `doc` is replicated with the peer in either direction.
    pub fn covers(&self, doc: &DocId) -> bool {
        self.may_send(doc) || self.may_receive(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_namespaces() {
        let g = Glob::new("eu/*");
        assert!(g.matches("eu/a"));
        assert!(g.matches("eu/a/b"));
        assert!(!g.matches("us/a"));
        assert!(!g.matches("eu"));
        assert!(Glob::new("*").matches("anything/at/all"));
        assert!(Glob::new("inv/sku-?").matches("inv/sku-1"));
        assert!(!Glob::new("inv/sku-?").matches("inv/sku-10"));
        assert!(Glob::new("a*b*c").matches("a/x/b/y/c"));
        assert!(!Glob::new("a*b*c").matches("a/x/b/y/d"));
        assert!(Glob::new("exact").matches("exact"));
        // Pathological patterns stay fast.
        let long = "a".repeat(256);
        assert!(!Glob::new("*a*a*a*a*a*a*a*a*b").matches(&long));
    }

    #[test]
    fn scope_directions_are_independent() {
        let scope = Scope {
            send: vec![Glob::new("eu/*")],
            receive: vec![Glob::new("shared/*")],
        };
        let eu = DocId::new("eu/1").unwrap();
        let shared = DocId::new("shared/1").unwrap();
        assert!(scope.may_send(&eu) && !scope.may_receive(&eu));
        assert!(!scope.may_send(&shared) && scope.may_receive(&shared));
        assert!(!scope.covers(&DocId::new("us/1").unwrap()));
    }
}
