//! Which tenant a request belongs to. Records are keyed by tenant + key, so
//! no request can ever be answered with another tenant's response.
//!
//! A tenant id names its source: `header:` + the header's value, `jwt:` + the
//! claim, the 64-digit hex hash of `Authorization`, `default` for `none` and
//! `anonymous` without a credential. Routes may take tenants from different
//! sources, and the same string from two sources means two different
//! principals: a forged `X-Tenant-Id: alice` must never reach the records of
//! the JWT subject `alice`. The prefixes make that true by construction (no
//! prefixed id is 64 hex digits, `default` or `anonymous`), wherever a tenant
//! id is used: store keys, the records API, the status endpoint, log hashes.

use std::borrow::Cow;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::TenantSource;
use crate::problem::{Code, Problem};

pub const ANONYMOUS: &str = "anonymous";
pub const DEFAULT: &str = "default";
/// Prefix of tenant ids taken from a gateway's header.
pub const HEADER_PREFIX: &str = "header:";
/// Prefix of tenant ids taken from a JWT claim.
pub const JWT_PREFIX: &str = "jwt:";

/// The tenant id of a request, as the records API names it.
pub fn of<'h>(source: &TenantSource, headers: &'h HeaderMap) -> Result<Cow<'h, str>, Problem> {
    match source {
        TenantSource::Authorization => Ok(match headers.get(AUTHORIZATION) {
            // Lowercase hex SHA-256 of the value exactly as received.
            Some(v) => Cow::Owned(hex::encode(Sha256::digest(v.as_bytes()))),
            None => Cow::Borrowed(ANONYMOUS),
        }),
        TenantSource::Header(name) => match headers.get(name) {
            None => Ok(Cow::Borrowed(ANONYMOUS)),
            Some(v) => match v.to_str() {
                Ok(s) if !s.is_empty() && !s.contains('\0') => Ok(Cow::Owned(format!("{HEADER_PREFIX}{s}"))),
                _ => Err(Problem::new(
                    Code::BadRequest,
                    format!("the {name} header must be printable ASCII"),
                )),
            },
        },
        TenantSource::None => Ok(Cow::Borrowed(DEFAULT)),
        TenantSource::Jwt(jwt) => Ok(match jwt.verifier.tenant(headers)? {
            Some(subject) => Cow::Owned(format!("{JWT_PREFIX}{subject}")),
            None => Cow::Borrowed(ANONYMOUS),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_hash_and_anonymous() {
        let mut h = HeaderMap::new();
        assert_eq!(of(&TenantSource::Authorization, &h).unwrap(), "anonymous");
        h.insert(AUTHORIZATION, "Bearer alice".parse().unwrap());
        let t = of(&TenantSource::Authorization, &h).unwrap();
        assert_eq!(t, hex::encode(Sha256::digest(b"Bearer alice")));
        assert_eq!(of(&TenantSource::None, &h).unwrap(), "default");
        let name = http::HeaderName::from_static("x-tenant-id");
        assert_eq!(of(&TenantSource::Header(name.clone()), &h).unwrap(), "anonymous");
        h.insert(&name, "acme".parse().unwrap());
        assert_eq!(of(&TenantSource::Header(name.clone()), &h).unwrap(), "header:acme");
        // A header value that imitates another source still names the header.
        h.insert(&name, "anonymous".parse().unwrap());
        assert_eq!(of(&TenantSource::Header(name), &h).unwrap(), "header:anonymous");
    }
}
