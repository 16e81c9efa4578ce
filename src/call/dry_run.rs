//! `--dry-run`: ask, send nothing. The proxy's key status endpoint (SPEC §6)
//! is asked about the call's key with the call's own headers and
//! `?path=` the URL's path, so the proxy computes the tenant exactly as it
//! would for the call itself; its answer says what the call would do. This
//! is the one part of `idemproxy call` that needs idemproxy in front of the
//! API: plain IETF-draft or Stripe servers have no such endpoint.

use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, StatusCode, Uri};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

use std::time::Duration;

use super::outcome::{problem_code, Effect, Exit, Report};
use super::request::Plan;
use super::transport::Reply;
use super::{Attempts, How};

/// Characters left as they are in the key's path segment (RFC 3986 unreserved).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// Asks the status endpoint (retrying like any call) and reports what the
/// call would do; with `--wait`, polls until the original is no longer in flight.
pub(super) async fn run(attempts: &Attempts<'_>, plan: &Plan, status_path: &str, wait: bool) -> Report {
    let key = plan.key().map(str::to_owned);
    let Some(k) = key.as_deref() else {
        return safe_method(&plan.method);
    };
    let mut sent = 0;
    let mut poll = Duration::from_millis(250);
    loop {
        let ended = attempts.until_final(|| status_request(plan, k, status_path)).await;
        sent += ended.attempts;
        let How::Final(reply) = ended.how else {
            return Report {
                attempts: sent,
                ..ended.report(key)
            };
        };
        let (effect, exit) = judge(&reply);
        if effect == Effect::InProgress && wait {
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(Duration::from_secs(2));
            continue;
        }
        return Report {
            effect,
            exit,
            key,
            attempts: sent,
            reply: Some(reply),
            note: None,
        };
    }
}

/// The status request for the plan's key: `GET {status_path}/{key}?path=P`
/// on the URL's origin, with the call's headers (minus the body's).
pub fn status_request(plan: &Plan, key: &str, status_path: &str) -> Request<http_body_util::Full<bytes::Bytes>> {
    let path = format!(
        "{}/{}?{}",
        status_path.trim_end_matches('/'),
        utf8_percent_encode(key, SEGMENT),
        form_urlencoded::Serializer::new(String::new())
            .append_pair("path", plan.url.path())
            .finish()
    );
    let mut parts = plan.url.clone().into_parts();
    parts.path_and_query = Some(path.parse().expect("an encoded path and query"));
    let mut req = Request::new(Default::default());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = Uri::from_parts(parts).expect("the call's URL with another path");
    *req.headers_mut() = plan.headers.clone();
    req.headers_mut().remove(CONTENT_TYPE);
    req.headers_mut().remove(CONTENT_LENGTH);
    req
}

/// What the status endpoint's answer says a call would do.
pub fn judge(reply: &Reply) -> (Effect, Exit) {
    if reply.status == StatusCode::NOT_FOUND && problem_code(reply).as_deref() == Some("idempotency_key_unknown") {
        return (Effect::WouldExecute, Exit::Ok);
    }
    if reply.status != StatusCode::OK {
        let exit = if reply.status.is_client_error() {
            Exit::Refused
        } else {
            Exit::Failed
        };
        return (Effect::Failed, exit);
    }
    let answer: Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    match (answer["state"].as_str(), answer["replay"].as_bool()) {
        (Some("completed"), Some(true)) => (Effect::WouldReplay, Exit::Ok),
        // Completed but too large to keep: a call gets 409 response_not_replayable.
        (Some("completed"), _) => (Effect::Failed, Exit::Refused),
        (Some("in_flight"), _) => (Effect::InProgress, Exit::Exhausted),
        (Some("lost"), _) => (Effect::UnknownOutcome, Exit::Unknown),
        (Some("expired"), _) => (Effect::Expired, Exit::Unknown),
        // A 200 that is no status answer: the endpoint is off (or elsewhere)
        // and the API itself answered.
        _ => (Effect::Failed, Exit::Failed),
    }
}

/// The report of a dry run of a safe method: it always executes; nothing is asked.
fn safe_method(method: &Method) -> Report {
    Report {
        effect: Effect::WouldExecute,
        exit: Exit::Ok,
        key: None,
        attempts: 0,
        reply: None,
        note: Some(format!("{method} is sent without a key: a call always executes")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::outcome::reply;
    use super::*;

    const JSON: (&str, &str) = ("content-type", "application/json");

    fn state(state: &str, replay: bool) -> Reply {
        let body = format!(r#"{{"key":"k","state":"{state}","status":201,"replay":{replay}}}"#);
        reply(StatusCode::OK, &[JSON], &body)
    }

    #[test]
    fn each_state_has_its_effect() {
        assert_eq!(judge(&state("completed", true)), (Effect::WouldReplay, Exit::Ok));
        assert_eq!(judge(&state("completed", false)), (Effect::Failed, Exit::Refused));
        assert_eq!(judge(&state("in_flight", false)), (Effect::InProgress, Exit::Exhausted));
        assert_eq!(judge(&state("lost", false)), (Effect::UnknownOutcome, Exit::Unknown));
        assert_eq!(judge(&state("expired", false)), (Effect::Expired, Exit::Unknown));
        let unknown = reply(
            StatusCode::NOT_FOUND,
            &[("content-type", "application/problem+json")],
            r#"{"code":"idempotency_key_unknown"}"#,
        );
        assert_eq!(judge(&unknown), (Effect::WouldExecute, Exit::Ok));
    }

    #[test]
    fn an_answer_from_elsewhere_is_no_status() {
        assert_eq!(
            judge(&reply(StatusCode::NOT_FOUND, &[], "nope")),
            (Effect::Failed, Exit::Refused)
        );
        assert_eq!(
            judge(&reply(StatusCode::OK, &[JSON], "{}")),
            (Effect::Failed, Exit::Failed)
        );
    }

    #[test]
    fn the_status_request_carries_the_call_s_tenant() {
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from([
            "idemproxy",
            "call",
            "https://api.example/v1/orders?x=1",
            "-d",
            "{}",
            "-H",
            "Authorization: Bearer alice",
            "--idempotency-key",
            "k/1",
        ])
        .unwrap();
        let crate::cli::Command::Call(args) = cli.command else {
            unreachable!()
        };
        let plan = Plan::from_args(&args, &b""[..]).unwrap();
        let req = status_request(&plan, "k/1", "/_idempotency/");
        assert_eq!(
            req.uri().to_string(),
            "https://api.example/_idempotency/k%2F1?path=%2Fv1%2Forders"
        );
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.headers()["authorization"], "Bearer alice");
        assert!(!req.headers().contains_key(CONTENT_TYPE));
    }
}
