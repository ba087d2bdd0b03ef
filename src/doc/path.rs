//! RFC 6901 JSON pointers, as used by document ops (`/stock`, `/seats/3`,
//! `/items/-`).

use super::OpError;

/// Deepest accepted pointer, in segments.
pub const POINTER_SEGMENTS_MAX: usize = 64;

/// A parsed JSON pointer: the empty pointer is the document root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    text: String,
    segments: Vec<String>,
}

impl Pointer {
    /// Parses an RFC 6901 pointer (`""`, `/a/b`, with `~1` for `/` and `~0`
    /// for `~`).
    pub fn parse(text: &str) -> Result<Pointer, OpError> {
        let bad = |reason: &str| OpError::BadPath {
            path: clip(text),
            reason: reason.to_owned(),
        };
        if text.is_empty() {
            return Ok(Pointer {
                text: String::new(),
                segments: Vec::new(),
            });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(bad("a JSON pointer starts with '/'"));
        };
        let mut segments = Vec::new();
        for raw in rest.split('/') {
            if segments.len() == POINTER_SEGMENTS_MAX {
                return Err(bad("more than 64 segments"));
            }
            segments.push(unescape(raw).ok_or_else(|| bad("'~' must be followed by 0 or 1"))?);
        }
        Ok(Pointer {
            text: text.to_owned(),
            segments,
        })
    }

    /// Builds a pointer from unescaped segments.
    pub fn from_segments<S: AsRef<str>>(segments: &[S]) -> Pointer {
        let mut text = String::new();
        for segment in segments {
            text.push('/');
            text.push_str(&segment.as_ref().replace('~', "~0").replace('/', "~1"));
        }
        Pointer {
            text,
            segments: segments.iter().map(|s| s.as_ref().to_owned()).collect(),
        }
    }

    /// The unescaped segments, outermost first.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// True for the empty pointer, which names the whole document.
    pub fn is_root(&self) -> bool {
        self.segments.is_empty()
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The segments before the last one, and the last one; `None` at the root.
    pub fn split_last(&self) -> Option<(&[String], &str)> {
        let (last, parent) = self.segments.split_last()?;
        Some((parent, last))
    }
}

impl std::fmt::Display for Pointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

fn unescape(raw: &str) -> Option<String> {
    if !raw.contains('~') {
        return Some(raw.to_owned());
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// A list position in a pointer segment: an index or `-` (one past the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListIndex {
    At(usize),
    End,
}

/// Parses a list index segment: decimal without leading zeros, or `-`.
pub(crate) fn parse_list_index(segment: &str) -> Option<ListIndex> {
    if segment == "-" {
        return Some(ListIndex::End);
    }
    let digits_ok = !segment.is_empty()
        && segment.bytes().all(|b| b.is_ascii_digit())
        && (segment == "0" || !segment.starts_with('0'));
    if !digits_ok {
        return None;
    }
    segment.parse().ok().map(ListIndex::At)
}

/// Shortens user input quoted in error messages.
pub(crate) fn clip(text: &str) -> String {
    if text.len() <= 200 {
        return text.to_owned();
    }
    let mut end = 200;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc6901_examples() {
        assert!(Pointer::parse("").unwrap().is_root());
        assert_eq!(
            Pointer::parse("/a~1b/m~0n").unwrap().segments(),
            ["a/b", "m~n"]
        );
        assert_eq!(Pointer::parse("/").unwrap().segments(), [""]);
        assert!(Pointer::parse("a").is_err());
        assert!(Pointer::parse("/a~2").is_err());
        assert!(Pointer::parse(&"/x".repeat(65)).is_err());
    }

    #[test]
    fn list_indexes() {
        assert_eq!(parse_list_index("0"), Some(ListIndex::At(0)));
        assert_eq!(parse_list_index("12"), Some(ListIndex::At(12)));
        assert_eq!(parse_list_index("-"), Some(ListIndex::End));
        assert_eq!(parse_list_index("01"), None);
        assert_eq!(parse_list_index("-1"), None);
        assert_eq!(parse_list_index(""), None);
    }

    #[test]
    fn segments_round_trip() {
        let p = Pointer::from_segments(&["a/b", "c~d", "0"]);
        assert_eq!(p.as_str(), "/a~1b/c~0d/0");
        assert_eq!(Pointer::parse(p.as_str()).unwrap(), p);
    }
}
