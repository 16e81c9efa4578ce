//! `idemproxy openapi` and `docs/openapi.yaml`, checked by a real OpenAPI
//! validator (openapi-spec-validator from PyPI, installed by scripts/test).

mod support;

use std::path::Path;
use std::process::Command;

use support::run_cli;

fn validate(file: &Path) {
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(file)
        .output()
        .expect("python3 runs (scripts/test installs openapi-spec-validator)");
    assert!(
        out.status.success(),
        "{} is not a valid OpenAPI document:\n{}\n{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn admin_document_is_valid_openapi_31() {
    validate(&repo().join("docs/openapi.yaml"));
}

const CONFIG: &str = r#"
[upstream]
url = "http://127.0.0.1:3000"
[[routes]]
path = "/v1/pets"
methods = ["POST"]
required = true
[[routes]]
path = "/v1/pets/*"
methods = ["PATCH", "DELETE"]
[[routes]]
path = "/internal/*"
enabled = false
"#;

#[test]
fn spec_is_annotated_on_exactly_the_covered_operations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("idemproxy.toml"), CONFIG).unwrap();
    let spec = repo().join("tests/data/petstore.yaml");
    let (code, out, err) = run_cli(
        &[
            "openapi",
            "--config",
            "idemproxy.toml",
            "--spec",
            spec.to_str().unwrap(),
        ],
        &[],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_yaml_ng::from_str(&out).unwrap();
    let op = |path: &str, m: &str| doc["paths"][path][m].clone();
    let refs = |v: &serde_json::Value| -> Vec<String> {
        v["parameters"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["$ref"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    // POST /v1/pets: required key, header on its own responses, problem responses.
    let create = op("/v1/pets", "post");
    assert_eq!(refs(&create), ["#/components/parameters/IdempotencyKeyRequired"]);
    assert_eq!(
        create["responses"]["201"]["headers"]["Idempotent-Replayed"]["$ref"],
        "#/components/headers/IdempotentReplayed"
    );
    assert_eq!(
        create["responses"]["default"]["$ref"], "#/components/responses/Error",
        "$ref responses are kept as they are"
    );
    for status in ["400", "409", "413", "422", "503"] {
        assert!(
            create["responses"][status]["$ref"].is_string(),
            "POST /v1/pets lacks {status}"
        );
    }
    // PATCH and DELETE below /v1/pets/: optional key; GET untouched.
    assert_eq!(
        refs(&op("/v1/pets/{petId}", "patch")),
        ["#/components/parameters/IdempotencyKey"]
    );
    assert_eq!(
        refs(&op("/v1/pets/{petId}", "delete")),
        ["#/components/parameters/IdempotencyKey"]
    );
    for (p, m) in [
        ("/v1/pets", "get"),
        ("/v1/pets/{petId}", "get"),
        ("/internal/reindex", "post"),
    ] {
        assert!(refs(&op(p, m)).is_empty(), "{m} {p} must not be annotated");
        assert!(
            op(p, m)["responses"].get("409").is_none(),
            "{m} {p} must not get problem responses"
        );
    }
    // The document's own components survive next to ours.
    assert!(doc["components"]["schemas"]["Pet"].is_object());
    assert_eq!(
        doc["components"]["parameters"]["IdempotencyKey"]["name"],
        "Idempotency-Key"
    );
    let annotated = dir.path().join("annotated.yaml");
    std::fs::write(&annotated, &out).unwrap();
    validate(&annotated);
}

#[test]
fn json_in_json_out_and_defaults_cover_post_and_patch() {
    let dir = tempfile::tempdir().unwrap();
    let spec = repo().join("tests/data/orders.json");
    // No config file at the default path: the defaults apply to every path.
    let (code, out, err) = run_cli(&["openapi", "--spec", spec.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("JSON in, JSON out");
    assert_eq!(
        doc["paths"]["/v1/orders"]["post"]["parameters"][0]["$ref"],
        "#/components/parameters/IdempotencyKey"
    );
    assert!(doc["paths"]["/v1/orders"]["get"].get("parameters").is_none());
    let file = dir.path().join("out.json");
    std::fs::write(&file, &out).unwrap();
    validate(&file);
}

#[test]
fn components_alone_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, _) = run_cli(&["openapi"], &[], dir.path());
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_yaml_ng::from_str(&out).unwrap();
    let conflict = doc["components"]["responses"]["IdempotencyConflict"]["description"]
        .as_str()
        .unwrap();
    assert!(conflict.contains("idempotency_key_in_use") && conflict.contains("outcome_unknown"));
    std::fs::write(dir.path().join("x.yaml"), "title: not openapi\n").unwrap();
    let (code, _, err) = run_cli(&["openapi", "--spec", "x.yaml"], &[], dir.path());
    assert_ne!(code, 0);
    assert!(
        err.contains("x.yaml") && err.contains("not an OpenAPI document"),
        "{err}"
    );
    let (code, _, err) = run_cli(&["openapi", "--spec", "missing.yaml"], &[], dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("missing.yaml"), "{err}");
}

/// The schemathesis command: on PATH, else in Python's scripts directory
/// (where pip put it, when no shim or PATH entry points there).
fn schemathesis_bin() -> std::path::PathBuf {
    let on_path = Command::new("schemathesis")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return "schemathesis".into();
    }
    let out = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
        .expect("python3 runs");
    Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("schemathesis")
}

/// Runs schemathesis (PyPI; installed by scripts/test) against a live proxy.
fn schemathesis(base: &str, path_filter: &[&str]) {
    let out = Command::new(schemathesis_bin())
        .args([
            "run",
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"),
            "--url",
            base,
        ])
        .args([
            "--checks",
            "all",
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--generation-database",
            "none",
        ])
        // Stateful links would feed one operation's output into another's
        // path; the two listeners here are tested separately instead.
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(path_filter)
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .output()
        .expect("schemathesis runs (scripts/test installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures against {base}:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "schemathesis ran no test case:\n{report}");
}

#[tokio::test]
async fn live_admin_api_and_status_endpoint_match_the_document() {
    // The upstream is a closed port: a status request that were forwarded
    // would come back 502, which schemathesis reports as a server error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = support::Proxy::start(&support::config(
        &format!("http://{closed}"),
        "[server]\nstatus_path = \"/_idempotency\"\n",
    ));
    let admin = format!("http://{}", proxy.admin);
    let main = format!("http://{}", proxy.addr);
    tokio::task::spawn_blocking(move || {
        schemathesis(&admin, &["--exclude-path-regex", "^/_idempotency"]);
        schemathesis(&main, &["--include-path-regex", "^/_idempotency"]);
    })
    .await
    .unwrap();
}
