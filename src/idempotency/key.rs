//! The `Idempotency-Key` header and the request fingerprint.
//!
//! A key is an RFC 8941 sf-string (`"abc"`) or a bare value (`abc`, e.g. a
//! UUID, taken verbatim); both mean `abc`. After unquoting it must be 1 to
//! 255 visible ASCII characters: a space is invalid even inside quotes.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, Method};
use sha2::{Digest, Sha256};

use crate::store::Fingerprint;

pub const MAX_KEY_LEN: usize = 255;

/// Why a key header was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key header is repeated; send it once")]
    Repeated,
    #[error("the key is empty")]
    Empty,
    #[error("the key is longer than 255 characters")]
    TooLong,
    #[error("the key must be visible ASCII characters only (no spaces or control characters)")]
    BadCharacter,
    #[error("the key is an unterminated or malformed quoted string")]
    BadQuoting,
}

/// The key from `headers`, `Ok(None)` when absent.
pub fn from_headers<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<Option<Cow<'h, str>>, KeyError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    parse(value.as_bytes()).map(Some)
}

/// Parses one header value into the key it names.
pub fn parse(raw: &[u8]) -> Result<Cow<'_, str>, KeyError> {
    let key: Cow<'_, [u8]> = match raw {
        [b'"', inner @ .., b'"'] => unquote(inner)?,
        [b'"', ..] => return Err(KeyError::BadQuoting),
        _ => Cow::Borrowed(raw),
    };
    check(&key)?;
    Ok(match key {
        Cow::Borrowed(b) => Cow::Borrowed(std::str::from_utf8(b).expect("visible ASCII is UTF-8")),
        Cow::Owned(v) => Cow::Owned(String::from_utf8(v).expect("visible ASCII is UTF-8")),
    })
}

/// A key given verbatim (a URL path segment, not a header): 1 to 255
/// visible ASCII characters, with no sf-string unquoting.
pub fn verbatim(raw: &[u8]) -> Result<&str, KeyError> {
    check(raw)?;
    Ok(std::str::from_utf8(raw).expect("visible ASCII is UTF-8"))
}

/// What makes a key a key, after any unquoting: 1 to 255 visible ASCII
/// characters.
fn check(key: &[u8]) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    if !key.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::BadCharacter);
    }
    Ok(())
}

/// The inside of an sf-string: only `\"` and `\\` are escapes (RFC 8941 §3.3.3).
fn unquote(inner: &[u8]) -> Result<Cow<'_, [u8]>, KeyError> {
    if !inner.contains(&b'\\') {
        if inner.contains(&b'"') {
            return Err(KeyError::BadQuoting);
        }
        return Ok(Cow::Borrowed(inner));
    }
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&e @ (b'"' | b'\\')) => out.push(e),
                _ => return Err(KeyError::BadQuoting),
            },
            b'"' => return Err(KeyError::BadQuoting),
            other => out.push(other),
        }
    }
    Ok(Cow::Owned(out))
}

/// SHA-256 over method, path + query as sent, and the exact body bytes.
/// Fields are NUL-separated; neither a method nor a request target can
/// contain NUL, so different requests cannot collide by shifting bytes.
pub fn fingerprint(method: &Method, path_and_query: &str, body: &[u8]) -> Fingerprint {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update([0]);
    h.update(path_and_query.as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().into()
}

/// Displays as [`log_hash`] of a record key, computed only when a log event
/// that names it is actually written (tracing formats fields lazily), so the
/// request path pays nothing for it when debug logging is off.
pub struct LogKey<'a>(pub &'a crate::store::RecordKey);

impl std::fmt::Display for LogKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The record key is tenant, NUL, key: the same bytes `log_hash` hashes.
        let digest = Sha256::digest(self.0.as_bytes());
        f.write_str(&hex::encode(&digest[..8]))
    }
}

/// A short, non-reversible label for logs: the raw key is never logged.
pub fn log_hash(tenant: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    hex::encode(&h.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(parse(b"abc").unwrap(), "abc");
        assert_eq!(parse(b"\"abc\"").unwrap(), "abc");
        assert_eq!(parse(b"\"a\\\"b\"").unwrap(), "a\"b");
        assert_eq!(
            parse(b"550e8400-e29b-41d4-a716-446655440000").unwrap(),
            "550e8400-e29b-41d4-a716-446655440000"
        );
        assert_eq!(parse(b""), Err(KeyError::Empty));
        assert_eq!(parse(b"\"\""), Err(KeyError::Empty));
        assert_eq!(parse(b"\"a b\""), Err(KeyError::BadCharacter));
        assert_eq!(parse(b"a b"), Err(KeyError::BadCharacter));
        assert_eq!(parse(b"\"abc"), Err(KeyError::BadQuoting));
        assert_eq!(parse(b"\"a\\x\""), Err(KeyError::BadQuoting));
        assert_eq!(parse(&[b'k'; 256]), Err(KeyError::TooLong));
        assert_eq!(parse(&[b'k'; 255]).unwrap().len(), 255);
        assert_eq!(parse("é".as_bytes()), Err(KeyError::BadCharacter));
    }

    #[test]
    fn verbatim_keys_are_not_unquoted() {
        assert_eq!(verbatim(b"\"").unwrap(), "\"");
        assert_eq!(verbatim(b"\"abc\"").unwrap(), "\"abc\"");
        assert_eq!(verbatim(b""), Err(KeyError::Empty));
        assert_eq!(verbatim(b"a b"), Err(KeyError::BadCharacter));
        assert_eq!(verbatim(&[b'k'; 256]), Err(KeyError::TooLong));
    }

    #[test]
    fn repeated_header_is_invalid() {
        let mut h = HeaderMap::new();
        let name = HeaderName::from_static("idempotency-key");
        assert_eq!(from_headers(&h, &name), Ok(None));
        h.append(&name, "a".parse().unwrap());
        assert_eq!(from_headers(&h, &name).unwrap().unwrap(), "a");
        h.append(&name, "b".parse().unwrap());
        assert_eq!(from_headers(&h, &name), Err(KeyError::Repeated));
    }

    #[test]
    fn lazy_log_key_matches_log_hash() {
        let rk = crate::store::RecordKey::new("tenant", "key-1");
        assert_eq!(LogKey(&rk).to_string(), log_hash("tenant", "key-1"));
    }

    #[test]
    fn fingerprint_separates_fields() {
        let a = fingerprint(&Method::POST, "/a", b"b");
        assert_ne!(a, fingerprint(&Method::POST, "/ab", b""));
        assert_ne!(a, fingerprint(&Method::PATCH, "/a", b"b"));
        assert_eq!(a, fingerprint(&Method::POST, "/a", b"b"));
    }

    proptest! {
        /// Any bare visible-ASCII key of 1..=255 chars is taken verbatim.
        #[test]
        fn bare_visible_ascii_is_verbatim(k in "[!-~]{1,255}") {
            prop_assume!(!k.starts_with('"'));
            prop_assert_eq!(parse(k.as_bytes()).unwrap(), k.as_str());
        }

        /// Quoting a key (escaping `"` and `\`) round-trips to the same key.
        #[test]
        fn quoted_roundtrip(k in "[!-~]{1,255}") {
            let quoted = format!("\"{}\"", k.replace('\\', "\\\\").replace('"', "\\\""));
            prop_assert_eq!(parse(quoted.as_bytes()).unwrap(), k.as_str());
        }

        /// Whatever the bytes, parsing never panics, and an accepted key is
        /// always 1..=255 visible ASCII characters.
        #[test]
        fn accepted_keys_are_well_formed(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(k) = parse(&raw) {
                prop_assert!(!k.is_empty() && k.len() <= MAX_KEY_LEN);
                prop_assert!(k.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            }
        }
    }
}
