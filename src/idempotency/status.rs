//! The key status endpoint for clients (`server.status_path`, SPEC §6):
//! `GET {status_path}/{key}` answers the caller's own key state, so a client
//! or an agent can ask "did my call go through, would a retry be a replay?"
//! before it retries. Nothing is forwarded, nothing is executed, no body is
//! ever returned, and the tenant is computed exactly as for a keyed request,
//! so nobody can read another tenant's keys.

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::json;

use super::{key, tenant, Engine};
use crate::admin::timestamp;
use crate::body::ResponseBody;
use crate::config::Policy;
use crate::metrics::Outcome;
use crate::problem::{Code, Problem};
use crate::store::{Record, RecordKey};

/// The answer to a status request, and what the access log may show of its
/// key: the same hash as every other log line, never the key itself.
pub struct Answer {
    pub response: Response<ResponseBody>,
    pub outcome: Outcome,
    /// `key::log_hash(tenant, key)`, once both are known.
    pub log_key: Option<String>,
}

/// Answers `GET {status_path}/{encoded key}`; `rest` is the path after the prefix.
pub async fn answer<B>(engine: &Engine, policy: &Policy, req: &Request<B>, rest: &str) -> Answer {
    let fail = |p: Problem, outcome| Answer {
        response: p.into_response(),
        outcome,
        log_key: None,
    };
    if req.method() != http::Method::GET {
        let mut response =
            Problem::new(Code::MethodNotAllowed, "the key status endpoint only answers GET").into_response();
        response
            .headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET"));
        return Answer {
            response,
            outcome: Outcome::status,
            log_key: None,
        };
    }
    let Ok(decoded) = percent_decode_str(rest).decode_utf8() else {
        return fail(
            Problem::new(Code::IdempotencyKeyInvalid, "the key is not valid UTF-8"),
            Outcome::invalid_key,
        );
    };
    // The path segment is the key itself: sf-string quoting is header syntax.
    let key = match key::verbatim(decoded.as_bytes()) {
        Ok(k) => k.to_owned(),
        Err(e) => {
            return fail(
                Problem::new(Code::IdempotencyKeyInvalid, e.to_string()),
                Outcome::invalid_key,
            )
        }
    };
    let tenant = match tenant::of(&policy.tenant, req.headers()) {
        Ok(t) => t,
        Err(p) => {
            let outcome = if p.code == Code::InvalidToken {
                Outcome::invalid_token
            } else {
                Outcome::invalid_key
            };
            return fail(p, outcome);
        }
    };
    let log_key = key::log_hash(&tenant, &key);
    let fail = |p: Problem, outcome| Answer {
        response: p.into_response(),
        outcome,
        log_key: Some(log_key.clone()),
    };
    let record = match engine.store().get(&RecordKey::new(&tenant, &key)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "status endpoint: store failed");
            let p = Problem::new(Code::StoreUnavailable, "the idempotency store is unavailable");
            return fail(p, Outcome::store_error);
        }
    };
    let Some(record) = record else {
        let p = Problem::new(Code::IdempotencyKeyUnknown, "no request with this key is known for you");
        return fail(p, Outcome::status);
    };
    let (state, status, completed_at, expires_at, replay) = match &record {
        Record::InFlight(f) => ("in_flight", None, None, f.expires_at, false),
        Record::Lost(l) => ("lost", None, None, l.expires_at, false),
        Record::Completed(c) => (
            "completed",
            Some(c.status),
            Some(c.stored_at),
            c.expires_at,
            c.replayable,
        ),
        Record::Expired(t) => ("expired", None, Some(t.completed_at), t.until, false),
    };
    let body = json!({
        "key": key,
        "state": state,
        "status": status,
        "completed_at": completed_at.map(timestamp),
        "expires_at": timestamp(expires_at),
        "replay": replay,
    });
    let mut res = Response::new(ResponseBody::full(serde_json::to_vec(&body).unwrap_or_default()));
    *res.status_mut() = StatusCode::OK;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Answer {
        response: res,
        outcome: Outcome::status,
        log_key: Some(log_key),
    }
}
