//! `idemproxy openapi`: tell an API's clients how to retry, in its own
//! OpenAPI document.
//!
//! Without `--spec`, prints the idempotency components (the key header
//! parameter, the `Idempotent-Replayed` response header, the problem schema
//! and responses with their `code`s). With `--spec API.yaml|json`, prints that
//! document back with the components added and, on exactly the operations a
//! configured route covers, the key parameter (required where the route
//! requires a key), the header on every response, and the problem responses.
//! An operation that declares a streamed response (`text/event-stream`, or any
//! of the route's `stream_types`) also gets `x-idempotency-replay`, saying how
//! the proxy delivers and replays its stream (SPEC §7).
//! The output keeps the input's format (JSON in, JSON out; YAML otherwise).

use http::Method;
use serde_json::{json, Map, Value};

use crate::config::{LostOutcome, Policy, Rules};

#[derive(Debug, thiserror::Error)]
pub enum OpenApiError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0} is not a YAML or JSON document: {1}")]
    Parse(String, String),
    #[error("{0} is not an OpenAPI document (no `paths` object)")]
    NotOpenApi(String),
}

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// The components every idempotent operation refers to.
pub fn components(header: &str) -> Value {
    let problem = |desc: &str, codes: &[&str]| {
        json!({
            "description": format!("{desc} (`code`: {})", codes.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")),
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/IdempotencyProblem"}}},
        })
    };
    let key_schema = json!({"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"});
    let key_desc = "A unique key for this operation (e.g. a UUID). Retries with the same key and the same request \
                    are answered with the first response instead of executing again.";
    json!({
        "parameters": {
            "IdempotencyKey": {"name": header, "in": "header", "required": false, "description": key_desc, "schema": key_schema},
            "IdempotencyKeyRequired": {"name": header, "in": "header", "required": true, "description": key_desc, "schema": key_schema},
        },
        "headers": {
            "IdempotentReplayed": {
                "description": "`true` when this response is the stored response of an earlier request with the same key.",
                "schema": {"type": "string", "enum": ["true", "false"]},
            },
        },
        "schemas": {
            "IdempotencyProblem": {
                "type": "object",
                "description": "RFC 9457 problem details with a machine-readable code.",
                "required": ["type", "title", "status", "code"],
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                    "code": {"type": "string"},
                },
            },
        },
        "responses": {
            "IdempotencyBadRequest": problem("The idempotency key is missing or malformed", &["idempotency_key_missing", "idempotency_key_invalid"]),
            "IdempotencyConflict": problem(
                "A request with this key is still in progress, its outcome is unknown, or its response cannot be replayed; see Retry-After",
                &["idempotency_key_in_use", "outcome_unknown", "response_not_replayable"],
            ),
            "IdempotencyTooLarge": problem("The request body is larger than the proxy keeps for keyed requests", &["request_body_too_large"]),
            "IdempotencyReused": problem("This key was used with a different request", &["idempotency_key_reused"]),
            "IdempotencyUnavailable": problem("The idempotency store is unavailable; nothing was executed", &["store_unavailable"]),
        },
    })
}

/// Prints the components, or `spec` with them applied per `rules`.
pub fn render(rules: &Rules, spec: Option<(&str, &str)>) -> Result<String, OpenApiError> {
    let header = rules.defaults.header.as_str();
    let header = canonical(header);
    let Some((name, text)) = spec else {
        let doc = json!({"components": components(&header)});
        return Ok(serde_yaml_ng::to_string(&doc).unwrap_or_default());
    };
    let mut doc: Value =
        serde_yaml_ng::from_str(text).map_err(|e| OpenApiError::Parse(name.to_owned(), e.to_string()))?;
    annotate(&mut doc, rules, &header).ok_or_else(|| OpenApiError::NotOpenApi(name.to_owned()))?;
    Ok(if text.trim_start().starts_with('{') {
        serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
    } else {
        serde_yaml_ng::to_string(&doc).unwrap_or_default()
    })
}

/// `idempotency-key` → `Idempotency-Key`, as documentation shows it.
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Adds the components and annotates covered operations; `None` if `doc`
/// has no `paths` object.
fn annotate(doc: &mut Value, rules: &Rules, header: &str) -> Option<()> {
    let paths = doc.get_mut("paths")?.as_object_mut()?;
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else { continue };
        for m in METHODS {
            let Some(op) = item.get_mut(m).and_then(Value::as_object_mut) else {
                continue;
            };
            let method = Method::from_bytes(m.to_ascii_uppercase().as_bytes()).expect("known method");
            if let Some((_, policy)) = rules.route_for(&method, path) {
                annotate_operation(op, policy);
            }
        }
    }
    let root = doc.as_object_mut()?;
    let comps = root.entry("components").or_insert_with(|| json!({}));
    if let (Some(comps), Value::Object(ours)) = (comps.as_object_mut(), components(header)) {
        for (section, entries) in ours {
            let target = comps.entry(section).or_insert_with(|| json!({}));
            if let (Some(target), Value::Object(entries)) = (target.as_object_mut(), entries) {
                for (k, v) in entries {
                    target.entry(k).or_insert(v);
                }
            }
        }
    }
    Some(())
}

fn annotate_operation(op: &mut Map<String, Value>, policy: &Policy) {
    let param = if policy.required {
        "IdempotencyKeyRequired"
    } else {
        "IdempotencyKey"
    };
    let params = op.entry("parameters").or_insert_with(|| json!([]));
    if let Some(list) = params.as_array_mut() {
        let r = json!({"$ref": format!("#/components/parameters/{param}")});
        if !list.contains(&r) {
            list.push(r);
        }
    }
    let responses = op.entry("responses").or_insert_with(|| json!({}));
    let Some(responses) = responses.as_object_mut() else {
        return;
    };
    for (_, res) in responses.iter_mut() {
        // A `$ref` response cannot take siblings in OpenAPI 3.0; leave those.
        if let Some(res) = res.as_object_mut().filter(|r| !r.contains_key("$ref")) {
            let headers = res.entry("headers").or_insert_with(|| json!({}));
            if let Some(h) = headers.as_object_mut() {
                h.entry("Idempotent-Replayed")
                    .or_insert(json!({"$ref": "#/components/headers/IdempotentReplayed"}));
            }
        }
    }
    if let Some(replay) = stream_replay(responses, policy) {
        op.insert("x-idempotency-replay".to_owned(), replay);
    }
    let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
        return;
    };
    for (status, name) in [
        ("400", "IdempotencyBadRequest"),
        ("409", "IdempotencyConflict"),
        ("413", "IdempotencyTooLarge"),
        ("422", "IdempotencyReused"),
        ("503", "IdempotencyUnavailable"),
    ] {
        responses
            .entry(status)
            .or_insert(json!({"$ref": format!("#/components/responses/{name}")}));
    }
}

/// How the proxy treats this operation's streamed responses, if it declares
/// any: live and recorded when their media type is in `stream_types`, else
/// buffered like any other response.
fn stream_replay(responses: &Map<String, Value>, policy: &Policy) -> Option<Value> {
    let declared: Vec<String> = responses
        .values()
        .filter_map(|r| r.get("content").and_then(Value::as_object))
        .flat_map(|c| c.keys().map(|k| k.to_ascii_lowercase()))
        .collect();
    let live: Vec<&String> = declared.iter().filter(|t| policy.stream_types.contains(t)).collect();
    if live.is_empty() {
        if !declared.iter().any(|t| t == "text/event-stream") {
            return None;
        }
        return Some(json!({
            "mode": "buffered",
            "description": "The proxy does not stream this route's responses (its stream_types leaves them out): \
                            the whole response is stored before any client sees a byte, then replayed to retries.",
        }));
    }
    let types = live.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ");
    let broken = match policy.on_lost_outcome {
        LostOutcome::Reject => "retries with the same key get 409 `outcome_unknown` and are not executed",
        LostOutcome::Retry => "a retry with the same key executes the request again",
    };
    Some(json!({
        "mode": "stream",
        "description": format!(
            "Streamed responses ({types}) reach the first client as the API sends them, and are recorded. \
             A duplicate sent while the stream runs receives everything sent so far at once, then the rest live \
             (`Idempotent-Replayed: true`). A retry after a clean end replays the whole stream. A stream that is \
             cut off (the body fails instead of ending cleanly) has an unknown outcome: {broken}. A stream longer \
             than {} bytes is delivered but not kept: retries get 409 `response_not_replayable`.",
            policy.max_response_body
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names() {
        assert_eq!(canonical("idempotency-key"), "Idempotency-Key");
        assert_eq!(canonical("x-idem"), "X-Idem");
    }
}
