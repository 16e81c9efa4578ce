//! RFC 9457 problem responses: every error the proxy itself answers with.
//!
//! [`Problem`] is the one place where an error becomes an HTTP response, so the
//! status, `code` and headers of each situation in SPEC §3 are decided here and
//! nowhere else.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::body::ResponseBody;

/// The machine-readable `code` member of a problem; also decides the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IdempotencyKeyMissing,
    IdempotencyKeyInvalid,
    RequestBodyTooLarge,
    RequestTimeout,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    OutcomeUnknown,
    ResponseNotReplayable,
    IdempotencyKeyExpired,
    IdempotencyKeyUnknown,
    InvalidToken,
    StoreUnavailable,
    UpstreamUnavailable,
    UpstreamTimeout,
    BadRequest,
    MethodNotAllowed,
    /// The bound on keyed requests in progress (or the bytes they hold) is reached.
    Overloaded,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::IdempotencyKeyMissing => "idempotency_key_missing",
            Code::IdempotencyKeyInvalid => "idempotency_key_invalid",
            Code::RequestBodyTooLarge => "request_body_too_large",
            Code::RequestTimeout => "request_timeout",
            Code::IdempotencyKeyInUse => "idempotency_key_in_use",
            Code::IdempotencyKeyReused => "idempotency_key_reused",
            Code::OutcomeUnknown => "outcome_unknown",
            Code::ResponseNotReplayable => "response_not_replayable",
            Code::IdempotencyKeyExpired => "idempotency_key_expired",
            Code::IdempotencyKeyUnknown => "idempotency_key_unknown",
            Code::InvalidToken => "invalid_token",
            Code::StoreUnavailable => "store_unavailable",
            Code::UpstreamUnavailable => "upstream_unavailable",
            Code::UpstreamTimeout => "upstream_timeout",
            Code::BadRequest => "bad_request",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::Overloaded => "overloaded",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Code::IdempotencyKeyMissing | Code::IdempotencyKeyInvalid | Code::BadRequest => StatusCode::BAD_REQUEST,
            Code::RequestBodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Code::IdempotencyKeyInUse | Code::OutcomeUnknown | Code::ResponseNotReplayable => StatusCode::CONFLICT,
            Code::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Code::IdempotencyKeyExpired => StatusCode::GONE,
            Code::IdempotencyKeyUnknown => StatusCode::NOT_FOUND,
            Code::InvalidToken => StatusCode::UNAUTHORIZED,
            Code::StoreUnavailable | Code::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Code::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Code::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Code::IdempotencyKeyMissing => "Idempotency key missing",
            Code::IdempotencyKeyInvalid => "Idempotency key invalid",
            Code::RequestBodyTooLarge => "Request body too large",
            Code::RequestTimeout => "Request body timed out",
            Code::IdempotencyKeyInUse => "Idempotency key in use",
            Code::IdempotencyKeyReused => "Idempotency key reused with a different request",
            Code::OutcomeUnknown => "Outcome of the original request is unknown",
            Code::ResponseNotReplayable => "Response not replayable",
            Code::IdempotencyKeyExpired => "Idempotency key expired",
            Code::IdempotencyKeyUnknown => "Idempotency key unknown",
            Code::InvalidToken => "Invalid token",
            Code::StoreUnavailable => "Idempotency store unavailable",
            Code::UpstreamUnavailable => "Upstream unavailable",
            Code::UpstreamTimeout => "Upstream timed out",
            Code::BadRequest => "Bad request",
            Code::MethodNotAllowed => "Method not allowed",
            Code::Overloaded => "Too many keyed requests in progress",
        }
    }
}

/// An error answered by the proxy itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub code: Code,
    pub detail: Cow<'static, str>,
    /// Sent as `Retry-After` in whole seconds (at least 1).
    pub retry_after: Option<Duration>,
}

impl Problem {
    pub fn new(code: Code, detail: impl Into<Cow<'static, str>>) -> Self {
        Problem {
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub fn to_json(&self) -> Bytes {
        let status = self.code.status().as_u16();
        let body = serde_json::json!({
            "type": format!("https://idemproxy.dev/problems/{}", self.code.as_str().replace('_', "-")),
            "title": self.code.title(),
            "status": status,
            "detail": self.detail,
            "code": self.code.as_str(),
        });
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    pub fn into_response(self) -> Response<ResponseBody> {
        let mut res = Response::new(ResponseBody::full(self.to_json()));
        *res.status_mut() = self.code.status();
        let h = res.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            h.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_json_and_retry_after() {
        let res = Problem::new(Code::IdempotencyKeyInUse, "busy")
            .retry_after(Duration::from_millis(1500))
            .into_response();
        assert_eq!(res.status(), 409);
        assert_eq!(res.headers()[RETRY_AFTER], "2");
        assert_eq!(res.headers()[CONTENT_TYPE], "application/problem+json");
        let v: serde_json::Value =
            serde_json::from_slice(&Problem::new(Code::StoreUnavailable, "x").to_json()).unwrap();
        assert_eq!(v["code"], "store_unavailable");
        assert_eq!(v["status"], 503);
        let zero = Problem::new(Code::IdempotencyKeyInUse, "")
            .retry_after(Duration::ZERO)
            .into_response();
        assert_eq!(zero.headers()[RETRY_AFTER], "1");
    }
}
