//! Which idempotency key a call carries. Every attempt of one call carries
//! the same key, so the server can tell a retry from a new operation; the
//! three ways of choosing it differ in how far "the same operation" reaches:
//!
//! - explicit (`--idempotency-key`): as far as the caller reuses the key;
//! - derived (`--key-from-inputs`): every run of the same command, on any
//!   machine, is the same operation (the inputs are hashed);
//! - random: only this invocation's own retries (as Stripe's SDKs do); the
//!   key is reported so that a caller can reuse it.
//!
//! Safe methods (GET, HEAD, OPTIONS, TRACE) carry no key: repeating them is
//! harmless by definition (RFC 9110 §9.2.1).

use http::{Method, Uri};
use sha2::{Digest, Sha256};

/// Where a call's key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Explicit,
    Inputs,
    Random,
}

/// A key that the proxy (and the IETF draft's servers) would refuse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the idempotency key is empty")]
    Empty,
    #[error("the idempotency key is longer than 255 characters")]
    TooLong,
    #[error("the idempotency key may only hold visible ASCII characters (no spaces)")]
    Characters,
}

/// True for the methods that are sent without a key.
pub fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
}

/// Checks a caller's key against the rules of SPEC §3: 1–255 visible ASCII.
pub fn validate(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > 255 {
        return Err(KeyError::TooLong);
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(KeyError::Characters);
    }
    Ok(())
}

/// The stable key of `--key-from-inputs`: lowercase hex SHA-256 of the
/// method, the URL (scheme and host lowercased, as they are case-insensitive),
/// the body bytes and the scope, each length-prefixed so that no two
/// different inputs can run together into the same bytes. Headers are left
/// out on purpose: a refreshed token must not make a rerun a new operation.
pub fn from_inputs(method: &Method, url: &Uri, body: &[u8], scope: Option<&str>) -> String {
    let scheme = url.scheme_str().unwrap_or("").to_ascii_lowercase();
    let authority = url.authority().map(|a| a.as_str()).unwrap_or("").to_ascii_lowercase();
    let path = url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut hash = Sha256::new();
    hash.update(b"idemproxy-call-key/v1");
    for part in [
        method.as_str().as_bytes(),
        scheme.as_bytes(),
        authority.as_bytes(),
        path.as_bytes(),
        body,
        scope.unwrap_or("").as_bytes(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hex::encode(hash.finalize())
}

/// A fresh random key, formatted as a version 4 UUID.
pub fn random() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn derived_key_is_stable_and_valid() {
        let a = from_inputs(&Method::POST, &uri("http://h/v1/x?a=1"), b"{}", Some("s"));
        assert_eq!(
            a,
            from_inputs(&Method::POST, &uri("http://h/v1/x?a=1"), b"{}", Some("s"))
        );
        assert_eq!(a.len(), 64);
        assert_eq!(validate(&a), Ok(()));
    }

    #[test]
    fn derived_key_changes_with_every_input() {
        let base = from_inputs(&Method::POST, &uri("http://h/v1/x"), b"{}", None);
        let others = [
            from_inputs(&Method::PUT, &uri("http://h/v1/x"), b"{}", None),
            from_inputs(&Method::POST, &uri("https://h/v1/x"), b"{}", None),
            from_inputs(&Method::POST, &uri("http://h/v1/y"), b"{}", None),
            from_inputs(&Method::POST, &uri("http://h/v1/x?q"), b"{}", None),
            from_inputs(&Method::POST, &uri("http://h/v1/x"), b"{ }", None),
            from_inputs(&Method::POST, &uri("http://h/v1/x"), b"{}", Some("job-2")),
        ];
        for other in others {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn derived_key_ignores_host_case_only() {
        assert_eq!(
            from_inputs(&Method::POST, &uri("HTTP://Example.COM/A"), b"", None),
            from_inputs(&Method::POST, &uri("http://example.com/A"), b"", None)
        );
        assert_ne!(
            from_inputs(&Method::POST, &uri("http://example.com/A"), b"", None),
            from_inputs(&Method::POST, &uri("http://example.com/a"), b"", None)
        );
    }

    #[test]
    fn fields_cannot_run_together() {
        // Without length prefixes "ab" + "" and "a" + "b" would hash alike.
        assert_ne!(
            from_inputs(&Method::POST, &uri("http://h/"), b"ab", None),
            from_inputs(&Method::POST, &uri("http://h/"), b"a", Some("b"))
        );
    }

    #[test]
    fn random_keys_are_uuids_and_differ() {
        let (a, b) = (random(), random());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_eq!(validate(&a), Ok(()));
    }

    #[test]
    fn validation_follows_the_proxy() {
        assert_eq!(validate(""), Err(KeyError::Empty));
        assert_eq!(validate(&"k".repeat(256)), Err(KeyError::TooLong));
        assert_eq!(validate(&"k".repeat(255)), Ok(()));
        assert_eq!(validate("a b"), Err(KeyError::Characters));
        assert_eq!(validate("ké"), Err(KeyError::Characters));
    }

    #[test]
    fn safe_methods_carry_no_key() {
        assert!(is_safe(&Method::GET) && is_safe(&Method::HEAD));
        assert!(!is_safe(&Method::POST) && !is_safe(&Method::DELETE) && !is_safe(&Method::PATCH));
    }
}
