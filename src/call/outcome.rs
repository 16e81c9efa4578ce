//! What a call did, said once: the `effect`, the exit status, and the JSON
//! report that has the same shape whatever happened, so that a script can
//! read `.effect` without first finding out which kind of answer it got.
//!
//! The effect is read from the answer alone, the way any client of the IETF
//! draft or of Stripe can: `Idempotent-Replayed: true` means the stored
//! response of an earlier execution, and the problem `code` (top level as in
//! RFC 9457, or Stripe's `error.code`) names the idempotency failures.

use http::header::CONTENT_TYPE;
use http::StatusCode;
use serde_json::{json, Map, Value};

use super::transport::Reply;

/// What happened to the operation; the `effect` field of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Executed by this call (a 2xx that is not a replay).
    Created,
    /// Answered from the store: an earlier call executed it.
    Replayed,
    /// Not done: the status and body say why.
    Failed,
    /// The original request with this key is still running.
    InProgress,
    /// Dry run: a call would execute now.
    WouldExecute,
    /// Dry run: a call would get the stored response.
    WouldReplay,
    /// The key's stored response has expired; a call is refused.
    Expired,
    /// The server cannot tell whether the original executed.
    UnknownOutcome,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Created => "created",
            Effect::Replayed => "replayed",
            Effect::Failed => "failed",
            Effect::InProgress => "in_progress",
            Effect::WouldExecute => "would_execute",
            Effect::WouldReplay => "would_replay",
            Effect::Expired => "expired",
            Effect::UnknownOutcome => "unknown_outcome",
        }
    }
}

/// The process exit status (SPEC §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A 2xx (created or replayed), or a dry run that found the key usable.
    Ok = 0,
    /// A final answer that is neither 2xx nor 4xx (a 3xx, a 500, ...), or a
    /// server that cannot be trusted (TLS): not worth retrying as it is.
    Failed = 1,
    /// A final 4xx: the request itself is refused; retrying it cannot help.
    /// Also a command line that cannot be run (clap's usage errors too).
    Refused = 2,
    /// 422 `idempotency_key_reused`: this key belongs to another request.
    Reused = 3,
    /// `unknown_outcome` or `expired`: nobody can say any more what happened.
    Unknown = 4,
    /// Retries ran out, or the original is still in progress (no `--wait`):
    /// running the same command later with the same key is safe.
    Exhausted = 5,
}

/// Everything a call reports.
#[derive(Debug, Clone)]
pub struct Report {
    pub effect: Effect,
    pub exit: Exit,
    /// The key sent (none for safe methods).
    pub key: Option<String>,
    /// Requests sent, retries included.
    pub attempts: u32,
    /// The last response, if any arrived.
    pub reply: Option<Reply>,
    /// Why there is no response (the last error), when there is none.
    pub note: Option<String>,
}

impl Report {
    /// The report of a final answer from the API.
    pub fn answered(reply: Reply, key: Option<String>, attempts: u32) -> Report {
        let (effect, exit) = judge(&reply);
        Report {
            effect,
            exit,
            key,
            attempts,
            reply: Some(reply),
            note: None,
        }
    }

    pub fn ok(&self) -> bool {
        self.exit == Exit::Ok
    }

    /// The one JSON object of `--output json`; always the same seven members.
    pub fn to_json(&self) -> Value {
        let (status, headers, body) = match &self.reply {
            Some(r) => (Some(r.status.as_u16()), headers_json(r), body_json(r)),
            None => (None, Map::new(), self.note.clone().map_or(Value::Null, Value::String)),
        };
        json!({
            "ok": self.ok(),
            "effect": self.effect.as_str(),
            "status": status,
            "key": self.key,
            "attempts": self.attempts,
            "headers": headers,
            "body": body,
        })
    }

    /// One line for stderr when stdout carries the raw body.
    pub fn summary(&self) -> String {
        let mut s = format!("idemproxy call: {}", self.effect.as_str());
        if let Some(r) = &self.reply {
            s.push_str(&format!(" ({})", r.status));
        }
        match &self.key {
            Some(k) => s.push_str(&format!(", key {k}")),
            None => s.push_str(", no key"),
        }
        let plural = if self.attempts == 1 { "" } else { "s" };
        s.push_str(&format!(", {} attempt{plural}", self.attempts));
        if let Some(note) = &self.note {
            s.push_str(&format!(": {note}"));
        }
        s
    }
}

/// Effect and exit status of a final answer.
fn judge(reply: &Reply) -> (Effect, Exit) {
    let status = reply.status;
    if status.is_success() {
        return if replayed(reply) {
            (Effect::Replayed, Exit::Ok)
        } else {
            (Effect::Created, Exit::Ok)
        };
    }
    let code = problem_code(reply);
    match code.as_deref() {
        Some("outcome_unknown") => (Effect::UnknownOutcome, Exit::Unknown),
        Some("idempotency_key_expired") => (Effect::Expired, Exit::Unknown),
        Some("idempotency_key_reused") if status.is_client_error() => (Effect::Failed, Exit::Reused),
        _ if status.is_client_error() => (Effect::Failed, Exit::Refused),
        _ => (Effect::Failed, Exit::Failed),
    }
}

/// `Idempotent-Replayed: true` (idemproxy, Stripe).
pub fn replayed(reply: &Reply) -> bool {
    reply
        .headers
        .get("idempotent-replayed")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// The machine-readable error code of a JSON error body: RFC 9457's
/// top-level `code` extension (idemproxy), or Stripe's `error.code`.
/// Stripe's `error.type = "idempotency_error"` (a key reused with other
/// parameters) reads as `idempotency_key_reused`.
pub fn problem_code(reply: &Reply) -> Option<String> {
    if reply.status.is_success() || !is_json(reply) {
        return None;
    }
    let v: Value = serde_json::from_slice(&reply.body).ok()?;
    if let Some(code) = v.get("code").and_then(Value::as_str) {
        return Some(code.to_owned());
    }
    let error = v.get("error")?;
    if let Some(code) = error.get("code").and_then(Value::as_str) {
        return Some(code.to_owned());
    }
    (error.get("type").and_then(Value::as_str) == Some("idempotency_error")).then(|| "idempotency_key_reused".into())
}

/// `application/json`, `application/problem+json` and every other `+json`.
fn is_json(reply: &Reply) -> bool {
    let Some(ct) = reply.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Header names in lowercase; a repeated header's values joined by ", ".
fn headers_json(reply: &Reply) -> Map<String, Value> {
    let mut out = Map::new();
    for name in reply.headers.keys() {
        let values: Vec<String> = reply
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        out.insert(name.as_str().to_owned(), Value::String(values.join(", ")));
    }
    out
}

/// The body as parsed JSON when the response says it is JSON and it parses,
/// else as text (invalid UTF-8 replaced: use `--output raw` for bytes).
fn body_json(reply: &Reply) -> Value {
    if is_json(reply) {
        if let Ok(v) = serde_json::from_slice(&reply.body) {
            return v;
        }
    }
    Value::String(String::from_utf8_lossy(&reply.body).into_owned())
}

/// A reply built from parts, for the tests and the dry run.
pub fn reply(status: StatusCode, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            v.parse().expect("header value"),
        );
    }
    Reply {
        status,
        headers: map,
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBLEM: (&str, &str) = ("content-type", "application/problem+json");

    fn judged(status: u16, headers: &[(&str, &str)], body: &str) -> (Effect, Exit) {
        judge(&reply(StatusCode::from_u16(status).unwrap(), headers, body))
    }

    #[test]
    fn a_2xx_is_created_unless_replayed() {
        assert_eq!(judged(201, &[], ""), (Effect::Created, Exit::Ok));
        assert_eq!(
            judged(201, &[("idempotent-replayed", "false")], ""),
            (Effect::Created, Exit::Ok)
        );
        assert_eq!(
            judged(200, &[("idempotent-replayed", "true")], ""),
            (Effect::Replayed, Exit::Ok)
        );
    }

    #[test]
    fn idempotency_failures_have_their_own_exit_status() {
        let body = |code: &str| format!(r#"{{"status":0,"code":"{code}"}}"#);
        assert_eq!(
            judged(422, &[PROBLEM], &body("idempotency_key_reused")),
            (Effect::Failed, Exit::Reused)
        );
        assert_eq!(
            judged(409, &[PROBLEM], &body("outcome_unknown")),
            (Effect::UnknownOutcome, Exit::Unknown)
        );
        assert_eq!(
            judged(410, &[PROBLEM], &body("idempotency_key_expired")),
            (Effect::Expired, Exit::Unknown)
        );
        assert_eq!(
            judged(422, &[PROBLEM], &body("validation")),
            (Effect::Failed, Exit::Refused)
        );
        assert_eq!(judged(400, &[], "bad"), (Effect::Failed, Exit::Refused));
        assert_eq!(judged(500, &[], "oops"), (Effect::Failed, Exit::Failed));
        assert_eq!(judged(303, &[], ""), (Effect::Failed, Exit::Failed));
    }

    #[test]
    fn stripe_errors_are_understood() {
        let json = ("content-type", "application/json; charset=utf-8");
        let reused = r#"{"error":{"type":"idempotency_error","message":"Keys for idempotent requests can only be used with the same parameters"}}"#;
        assert_eq!(judged(400, &[json], reused), (Effect::Failed, Exit::Reused));
        let in_use = reply(
            StatusCode::CONFLICT,
            &[json],
            r#"{"error":{"code":"idempotency_key_in_use"}}"#,
        );
        assert_eq!(problem_code(&in_use).as_deref(), Some("idempotency_key_in_use"));
    }

    #[test]
    fn the_report_has_the_same_members_whatever_happened() {
        let members = |r: &Report| -> Vec<String> { r.to_json().as_object().unwrap().keys().cloned().collect() };
        let created = Report::answered(reply(StatusCode::CREATED, &[], "{}"), Some("k".into()), 1);
        let nothing = Report {
            effect: Effect::Failed,
            exit: Exit::Exhausted,
            key: None,
            attempts: 6,
            reply: None,
            note: Some("cannot connect".into()),
        };
        assert_eq!(
            members(&created),
            ["ok", "effect", "status", "key", "attempts", "headers", "body"]
        );
        assert_eq!(members(&created), members(&nothing));
        assert_eq!(nothing.to_json()["body"], "cannot connect");
        assert_eq!(nothing.to_json()["status"], Value::Null);
    }

    #[test]
    fn json_bodies_are_parsed_and_others_are_text() {
        let j = Report::answered(
            reply(StatusCode::OK, &[("content-type", "application/json")], r#"{"id":7}"#),
            None,
            1,
        );
        assert_eq!(j.to_json()["body"], json!({"id": 7}));
        let t = Report::answered(
            reply(StatusCode::OK, &[("content-type", "text/plain")], r#"{"id":7}"#),
            None,
            1,
        );
        assert_eq!(t.to_json()["body"], r#"{"id":7}"#);
        let broken = Report::answered(
            reply(StatusCode::OK, &[("content-type", "application/json")], "{"),
            None,
            1,
        );
        assert_eq!(broken.to_json()["body"], "{");
    }

    #[test]
    fn repeated_headers_are_joined() {
        let r = Report::answered(reply(StatusCode::OK, &[("x-a", "1"), ("x-a", "2")], ""), None, 1);
        assert_eq!(r.to_json()["headers"]["x-a"], "1, 2");
    }
}
