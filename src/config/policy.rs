//! Routes and their idempotency policies: the `[idempotency]` table and
//! each `[[routes]]` entry resolved into a [`Policy`] (route values over the
//! table's over the built-in defaults), and the [`Rules`] that pick one for a
//! request. This is what a reload swaps.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};

use super::raw::{RawPolicy, RawTenant};
use super::units::{self, StatusSet};
use super::{err, ConfigError};

/// The routing table and idempotency policies; swapped whole on reload.
#[derive(Debug)]
pub struct Rules {
    pub defaults: Arc<Policy>,
    pub routes: Vec<Route>,
}

#[derive(Debug)]
pub struct Route {
    pub pattern: PathPattern,
    pub enabled: bool,
    pub policy: Arc<Policy>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    /// `"/p/*"` is stored as `"/p/"`: matches `/p/` and below, not `/p`.
    Prefix(String),
}

impl PathPattern {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => path == p,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Idempotency settings of one route, with `[idempotency]` inherited.
#[derive(Debug, Clone)]
pub struct Policy {
    pub header: HeaderName,
    pub methods: Vec<Method>,
    pub required: bool,
    /// Zero means coalesce only: nothing is kept after completion.
    pub ttl: Duration,
    /// Zero means off; else longer than `ttl`.
    pub tombstone_ttl: Duration,
    pub wait_timeout: Duration,
    pub fingerprint: bool,
    pub max_body: u64,
    pub max_response_body: u64,
    pub storable: StatusSet,
    pub on_lost_outcome: LostOutcome,
    pub max_waiters: u32,
    pub tenant: TenantSource,
    pub derive_key: bool,
    /// Media types (lowercase, no parameters) whose responses are forwarded
    /// live and recorded as they arrive instead of buffered; empty = always buffer.
    pub stream_types: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostOutcome {
    Reject,
    Retry,
}

#[derive(Debug, Clone)]
pub enum TenantSource {
    Authorization,
    Header(HeaderName),
    None,
    Jwt(JwtTenant),
}

#[derive(Debug, Clone)]
pub struct JwtTenant {
    pub claim: String,
    pub key: JwtKey,
    /// Built once at load: keys parsed, ready for every request.
    pub verifier: Arc<crate::idempotency::jwt::JwtVerifier>,
}

#[derive(Debug, Clone)]
pub enum JwtKey {
    /// HS256 with the secret read from this environment variable at load.
    Hs256 { env: String, secret: Vec<u8> },
    /// RS256 / ES256 keys from a JWKS file.
    Jwks { file: PathBuf, json: String },
    /// Trust a gateway in front that already verified the token.
    Unverified,
}

impl Rules {
    /// The policy for a request, or `None` when no enabled route matches
    /// (plain pass-through). First match wins.
    pub fn policy_for(&self, method: &Method, path: &str) -> Option<&Arc<Policy>> {
        self.route_for(method, path).map(|(_, policy)| policy)
    }

    /// Like [`Rules::policy_for`], also naming the matched route's index
    /// (`None` for the defaults that apply when there are no routes).
    pub fn route_for(&self, method: &Method, path: &str) -> Option<(Option<usize>, &Arc<Policy>)> {
        if self.routes.is_empty() {
            return self.defaults.methods.contains(method).then_some((None, &self.defaults));
        }
        let (i, route) = self
            .routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.pattern.matches(path) && r.policy.methods.contains(method))?;
        route.enabled.then_some((Some(i), &route.policy))
    }
}

impl Policy {
    /// True when a response with this `Content-Type` is a stream to forward
    /// live (its media type, parameters aside, is one of `stream_types`).
    pub fn streams(&self, content_type: Option<&http::HeaderValue>) -> bool {
        if self.stream_types.is_empty() {
            return false;
        }
        let Some(media) = content_type
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim())
        else {
            return false;
        };
        self.stream_types.iter().any(|t| t.eq_ignore_ascii_case(media))
    }

    pub(super) fn describe(&self) -> String {
        let tenant = match &self.tenant {
            TenantSource::Authorization => "authorization".to_owned(),
            TenantSource::Header(h) => format!("header:{h}"),
            TenantSource::None => "none".to_owned(),
            TenantSource::Jwt(j) => format!("jwt:{}", j.claim),
        };
        format!(
            "methods={} header={} required={} ttl={} wait_timeout={} fingerprint={} max_body={} max_response_body={} on_lost_outcome={:?} max_waiters={} tenant={} derive_key={} stream_types={}",
            methods_str(&self.methods),
            self.header,
            self.required,
            humantime::format_duration(self.ttl),
            humantime::format_duration(self.wait_timeout),
            self.fingerprint,
            self.max_body,
            self.max_response_body,
            self.on_lost_outcome,
            self.max_waiters,
            tenant,
            self.derive_key,
            if self.stream_types.is_empty() {
                "[]".to_owned()
            } else {
                self.stream_types.join(",")
            },
        )
        .replace("Reject", "reject")
        .replace("Retry", "retry")
    }
}

pub(super) fn methods_str(m: &[Method]) -> String {
    m.iter().map(Method::as_str).collect::<Vec<_>>().join(",")
}

pub(super) fn path_pattern(p: &str) -> Result<PathPattern, String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} must start with '/'"));
    }
    if let Some(prefix) = p.strip_suffix('*') {
        if !prefix.ends_with('/') || prefix.contains('*') {
            return Err(format!("{p:?}: '*' is only allowed as a final \"/*\""));
        }
        return Ok(PathPattern::Prefix(prefix.to_owned()));
    }
    if p.contains('*') {
        return Err(format!("{p:?}: '*' is only allowed as a final \"/*\""));
    }
    if p.contains(['?', '#', ' ']) {
        return Err(format!("{p:?} must be a path without query, fragment or spaces"));
    }
    Ok(PathPattern::Exact(p.to_owned()))
}

/// Resolves one policy: `own` over `base` (the `[idempotency]` table) over
/// the built-in defaults.
pub(super) fn policy(own: &RawPolicy, base: Option<&RawPolicy>, at: &str, file: &str) -> Result<Policy, ConfigError> {
    let e = |key: &str, reason: String| err(file, &format!("{at}.{key}"), reason);
    // Pick the route's own value, else the inherited one.
    macro_rules! pick {
        ($f:ident) => {
            own.$f.clone().or_else(|| base.and_then(|b| b.$f.clone()))
        };
    }
    let header_name = pick!(header).unwrap_or_else(|| "Idempotency-Key".to_owned());
    let header = HeaderName::try_from(header_name.as_str())
        .map_err(|_| e("header", format!("{header_name:?} is not a valid header name")))?;
    let mut methods = Vec::new();
    for (i, m) in pick!(methods)
        .unwrap_or_else(|| vec!["POST".into(), "PATCH".into()])
        .iter()
        .enumerate()
    {
        let upper = m.to_ascii_uppercase();
        let method = Method::from_bytes(upper.as_bytes())
            .map_err(|_| e(&format!("methods[{i}]"), format!("{m:?} is not an HTTP method")))?;
        methods.push(method);
    }
    if methods.is_empty() {
        return Err(e("methods", "must name at least one method".into()));
    }
    let ttl = pick!(ttl).map_or(Duration::from_secs(24 * 3600), |d| d.0);
    let tombstone_ttl = pick!(tombstone_ttl).map_or(Duration::ZERO, |d| d.0);
    if !tombstone_ttl.is_zero() && tombstone_ttl <= ttl {
        return Err(e(
            "tombstone_ttl",
            format!(
                "must be longer than ttl ({}) or \"0s\"",
                humantime::format_duration(ttl)
            ),
        ));
    }
    let max_body = pick!(max_body).map_or(1 << 20, |b| b.0);
    let max_response_body = pick!(max_response_body).map_or(4 << 20, |b| b.0);
    let store_statuses = pick!(store_statuses).unwrap_or_else(|| {
        use units::StatusPattern::Class;
        vec![Class(2), Class(3), Class(4)]
    });
    let never_store = pick!(never_store).unwrap_or_else(|| {
        use units::StatusPattern::Exact;
        vec![Exact(408), Exact(409), Exact(425), Exact(429)]
    });
    let on_lost_outcome = match pick!(on_lost_outcome).as_deref().unwrap_or("reject") {
        "reject" => LostOutcome::Reject,
        "retry" => LostOutcome::Retry,
        other => {
            return Err(e(
                "on_lost_outcome",
                format!("{other:?} is not \"reject\" or \"retry\""),
            ))
        }
    };
    let max_waiters = pick!(max_waiters).unwrap_or(1024);
    let stream_types = stream_types(pick!(stream_types), &e)?;
    let tenant = match pick!(tenant) {
        None | Some(RawTenant::Authorization) => TenantSource::Authorization,
        Some(RawTenant::None) => TenantSource::None,
        Some(RawTenant::Header { name }) => TenantSource::Header(
            HeaderName::try_from(name.as_str())
                .map_err(|_| e("tenant.name", format!("{name:?} is not a valid header name")))?,
        ),
        Some(RawTenant::Jwt {
            claim,
            hs256_secret_env,
            jwks_file,
            verify,
        }) => {
            let claim = claim.unwrap_or_else(|| "sub".to_owned());
            let key = match (hs256_secret_env, jwks_file, verify.unwrap_or(true)) {
                (None, None, false) => JwtKey::Unverified,
                (Some(env), None, true) => {
                    let secret = std::env::var(&env).map_err(|_| {
                        e(
                            "tenant.hs256_secret_env",
                            format!("environment variable {env} is not set"),
                        )
                    })?;
                    if secret.is_empty() {
                        return Err(e(
                            "tenant.hs256_secret_env",
                            format!("environment variable {env} is empty"),
                        ));
                    }
                    JwtKey::Hs256 {
                        env,
                        secret: secret.into_bytes(),
                    }
                }
                (None, Some(f), true) => {
                    let json = std::fs::read_to_string(&f)
                        .map_err(|err| e("tenant.jwks_file", format!("cannot read {f}: {err}")))?;
                    JwtKey::Jwks { file: f.into(), json }
                }
                (_, _, false) => {
                    return Err(e(
                        "tenant.verify",
                        "verify = false takes neither hs256_secret_env nor jwks_file".into(),
                    ))
                }
                (None, None, true) => {
                    return Err(e(
                        "tenant",
                        "jwt needs hs256_secret_env or jwks_file (or verify = false)".into(),
                    ))
                }
                (Some(_), Some(_), true) => {
                    return Err(e("tenant", "set either hs256_secret_env or jwks_file, not both".into()))
                }
            };
            use crate::idempotency::jwt::JwtVerifier;
            let verifier = match &key {
                JwtKey::Hs256 { secret, .. } => JwtVerifier::hs256(claim.clone(), secret),
                JwtKey::Unverified => JwtVerifier::unverified(claim.clone()),
                JwtKey::Jwks { json, file } => JwtVerifier::jwks(claim.clone(), json)
                    .map_err(|r| e("tenant.jwks_file", format!("{}: {r}", file.display())))?,
            };
            TenantSource::Jwt(JwtTenant {
                claim,
                key,
                verifier: Arc::new(verifier),
            })
        }
    };
    Ok(Policy {
        header,
        methods,
        required: pick!(required).unwrap_or(false),
        ttl,
        tombstone_ttl,
        wait_timeout: pick!(wait_timeout).map_or(Duration::from_secs(30), |d| d.0),
        fingerprint: pick!(fingerprint).unwrap_or(true),
        max_body,
        max_response_body,
        storable: StatusSet::new(&store_statuses, &never_store),
        on_lost_outcome,
        max_waiters,
        tenant,
        derive_key: pick!(derive_key).unwrap_or(false),
        stream_types,
    })
}

/// `stream_types`: bare media types (`type/subtype`), kept lowercase.
fn stream_types(
    raw: Option<Vec<String>>,
    e: &impl Fn(&str, String) -> ConfigError,
) -> Result<Vec<String>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(vec!["text/event-stream".to_owned(), "application/x-ndjson".to_owned()]);
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    raw.iter()
        .enumerate()
        .map(|(i, t)| match t.split_once('/') {
            Some((ty, sub)) if token(ty) && token(sub) => Ok(t.to_ascii_lowercase()),
            _ => Err(e(
                &format!("stream_types[{i}]"),
                format!("{t:?} is not a media type like \"text/event-stream\" (no parameters)"),
            )),
        })
        .collect()
}
