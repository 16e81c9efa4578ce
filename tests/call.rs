//! SPEC §8: `idemproxy call`, the agent-safe client, run as a real process
//! against the real proxy and the counting upstream. Every test counts
//! executions at the upstream; the retry tests also count what crossed the
//! wire (the flaky relay) or what the proxy answered (its metrics). Waits are
//! on signals (arrivals at the upstream, the proxy's metrics) with bounds.

mod support;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::flaky::Flaky;
use support::*;

// ---------------------------------------------------------------- helpers

/// What one `idemproxy call` process did.
struct Ran {
    code: i32,
    /// stdout parsed as the JSON report.
    json: Value,
    stderr: String,
}

impl Ran {
    fn effect(&self) -> &str {
        self.json["effect"]
            .as_str()
            .unwrap_or_else(|| panic!("no effect: {}", self.json))
    }

    fn members(&self) -> Vec<String> {
        self.json.as_object().expect("a JSON object").keys().cloned().collect()
    }
}

/// Starts `idemproxy call ARGS` in the background. Its stdout is a pipe, so
/// the report is JSON by default, as for an agent capturing it.
fn spawn_call(args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_idemproxy"))
        .arg("call")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn finish(child: tokio::process::Child) -> Ran {
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("idemproxy call ran for more than 60s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout:?}\nstderr: {stderr}"));
    Ran {
        code: out.status.code().unwrap_or(-1),
        json,
        stderr,
    }
}

async fn call(args: &[&str]) -> Ran {
    finish(spawn_call(args)).await
}

/// The proxy's `idemproxy_requests_total` for one outcome.
async fn outcomes(c: &Client, proxy: &Proxy, outcome: &str) -> u64 {
    let text = String::from_utf8(c.get(&proxy.admin_url("/metrics")).await.body.to_vec()).unwrap();
    let prefix = format!("idemproxy_requests_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Waits (bounded: 20 s) until the proxy has answered `n` duplicates with
/// 409 `idempotency_key_in_use`.
async fn wait_conflicts(c: &Client, proxy: &Proxy, n: u64) {
    let start = Instant::now();
    while outcomes(c, proxy, "conflict").await < n {
        assert!(start.elapsed() < Duration::from_secs(20), "no 409 in_use within 20s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const SEVEN: [&str; 7] = ["ok", "effect", "status", "key", "attempts", "headers", "body"];

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn the_same_command_twice_executes_once_then_replays() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let url = proxy.url("/v1/orders");
    let cmd = ["-d", r#"{"sku":"A-1"}"#, "--idempotency-key", "order-1", url.as_str()];

    let first = call(&cmd).await;
    let second = call(&cmd).await;

    assert_eq!(up.executions(), 1);
    assert_eq!((first.code, first.effect()), (0, "created"), "{}", first.stderr);
    assert_eq!((second.code, second.effect()), (0, "replayed"), "{}", second.stderr);
    assert_eq!(first.members(), SEVEN);
    assert_eq!(second.members(), first.members());
    for ran in [&first, &second] {
        assert_eq!(ran.json["ok"], true);
        assert_eq!(ran.json["status"], 201);
        assert_eq!(ran.json["key"], "order-1");
        assert_eq!(ran.json["attempts"], 1);
    }
    // The replay is the original, parsed as JSON: execution 1, our body.
    assert_eq!(second.json["body"], first.json["body"]);
    assert_eq!(first.json["body"]["execution"], 1);
    assert_eq!(first.json["body"]["body"], r#"{"sku":"A-1"}"#);
    assert_eq!(first.json["body"]["headers"]["idempotency-key"], "order-1");
    assert_eq!(first.json["body"]["headers"]["content-type"], "application/json");
    assert_eq!(first.json["headers"]["idempotent-replayed"], "false");
    assert_eq!(second.json["headers"]["idempotent-replayed"], "true");
}

#[tokio::test]
async fn key_from_inputs_makes_a_rerun_in_another_process_the_same_operation() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let url = proxy.url("/v1/deploys");
    let body = r#"{"service":"api","version":"1.4.2"}"#;
    let cmd = ["-d", body, "--key-from-inputs", "--scope", "release-7", url.as_str()];

    let first = call(&cmd).await;
    let rerun = call(&cmd).await;

    assert_eq!(up.executions(), 1);
    assert_eq!((first.effect(), rerun.effect()), ("created", "replayed"));
    assert_eq!((first.code, rerun.code), (0, 0));
    let key = first.json["key"].as_str().unwrap();
    assert_eq!(key.len(), 64, "a SHA-256 in hex: {key}");
    assert_eq!(rerun.json["key"], key);
    assert_eq!(first.json["body"]["headers"]["idempotency-key"], key);

    // Another scope is another operation.
    let other = call(&["-d", body, "--key-from-inputs", "--scope", "release-8", &url]).await;
    assert_eq!((other.code, other.effect()), (0, "created"));
    assert_ne!(other.json["key"], key);
    assert_eq!(up.executions(), 2);
}

#[tokio::test]
async fn a_lost_response_is_retried_with_the_same_key_and_replayed() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let net = Flaky::start(proxy.addr).await;
    net.drop_responses(1);
    let url = net.url("/v1/payments");

    // No key given: a random one, kept across this invocation's retries.
    let ran = call(&["-d", r#"{"amount":100}"#, "--timeout", "3s", &url]).await;

    assert_eq!(net.dropped(), ["HTTP/1.1 201 Created"]);
    assert_eq!(up.executions(), 1, "{}", ran.stderr);
    assert_eq!((ran.code, ran.effect()), (0, "replayed"), "{}", ran.stderr);
    // Two attempts, unless a loaded machine made the replay itself slow.
    assert!(ran.json["attempts"].as_u64().unwrap() >= 2, "{}", ran.json);
    assert_eq!(ran.json["status"], 201);
    let key = ran.json["key"].as_str().unwrap();
    assert_eq!(key.len(), 36, "a UUID: {key}");
    // The upstream executed the first attempt, under the same key.
    assert_eq!(ran.json["body"]["execution"], 1);
    assert_eq!(ran.json["body"]["headers"]["idempotency-key"], key);
    assert!(ran.stderr.contains("retrying"), "{}", ran.stderr);
}

/// Holds an original in flight at the upstream (`gate=1`), so duplicates
/// are answered 409 `idempotency_key_in_use` at once (`wait_timeout = "0s"`).
async fn in_flight_original(key: &str) -> (Upstream, Proxy, Client, tokio::task::JoinHandle<Resp>, String) {
    let up = Upstream::start().await;
    let extra = "[server]\nstatus_path = \"/_idempotency\"\n\n[idempotency]\nwait_timeout = \"0s\"\n";
    let proxy = Proxy::start(&config(&up.url(), extra));
    let c = Client::new();
    let url = proxy.url("/v1/jobs?gate=1");
    let original = c.spawn_post_key(&url, key, r#"{"job":"build"}"#);
    up.wait_arrived(1).await;
    (up, proxy, c, original, url)
}

#[tokio::test]
async fn wait_returns_the_in_flight_original_s_result() {
    let (up, proxy, c, original, url) = in_flight_original("job-1").await;
    let args = [
        "-d",
        r#"{"job":"build"}"#,
        "--idempotency-key",
        "job-1",
        "--wait",
        "--retries",
        "0",
    ];

    let child = spawn_call(&[&args[..], &[url.as_str()]].concat());
    let dry = spawn_call(&[&args[..], &["--dry-run", url.as_str()]].concat());
    // Both keep waiting past their retry budget (none): the call through
    // more than one 409, the dry run through more than one status answer.
    wait_conflicts(&c, &proxy, 2).await;
    let start = Instant::now();
    while outcomes(&c, &proxy, "status").await < 2 {
        assert!(start.elapsed() < Duration::from_secs(20), "the dry run did not poll");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    up.open_gate();
    let ran = finish(child).await;
    let dry = finish(dry).await;
    let original = original.await.unwrap();

    assert_eq!(up.executions(), 1);
    assert_eq!((ran.code, ran.effect()), (0, "replayed"), "{}", ran.stderr);
    assert_eq!(ran.json["status"], 201);
    assert_eq!(ran.json["body"], original.json());
    assert!(ran.json["attempts"].as_u64().unwrap() >= 3, "{}", ran.json);
    assert_eq!((dry.code, dry.effect()), (0, "would_replay"), "{}", dry.stderr);
}

#[tokio::test]
async fn without_wait_an_original_in_flight_is_reported_in_progress() {
    let (up, proxy, c, original, url) = in_flight_original("job-2").await;
    let args = [
        "-d",
        r#"{"job":"build"}"#,
        "--idempotency-key",
        "job-2",
        "--retries",
        "1",
    ];

    let start = Instant::now();
    let ran = call(&[&args[..], &[url.as_str()]].concat()).await;
    let took = start.elapsed();
    let dry = call(&[&args[..], &["--dry-run", url.as_str()]].concat()).await;

    assert_eq!((ran.code, ran.effect()), (5, "in_progress"), "{}", ran.stderr);
    assert_eq!(ran.json["ok"], false);
    assert_eq!(ran.json["status"], 409);
    assert_eq!(ran.json["body"]["code"], "idempotency_key_in_use");
    assert_eq!(ran.json["attempts"], 2);
    assert_eq!(outcomes(&c, &proxy, "conflict").await, 2);
    // The proxy's `Retry-After: 1` was honoured (the backoff alone is shorter).
    assert!(took >= Duration::from_secs(1), "retried after {took:?}");
    assert_eq!((dry.code, dry.effect()), (5, "in_progress"), "{}", dry.stderr);
    assert_eq!(dry.json["body"]["state"], "in_flight");
    up.open_gate();
    original.await.unwrap();
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn dry_run_says_what_a_call_would_do_and_sends_nothing() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[server]\nstatus_path = \"/_idempotency\"\n"));
    let url = proxy.url("/v1/invoices");
    let call_of = |dry: bool, who: &'static str| {
        let mut args = vec!["-d", r#"{"total":5}"#, "--idempotency-key", "inv-9", "-H", who];
        if dry {
            args.push("--dry-run");
        }
        args.push(url.as_str());
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move { call(&args.iter().map(String::as_str).collect::<Vec<_>>()).await };
    let alice = "Authorization: Bearer alice";

    let before = run(call_of(true, alice)).await;
    assert_eq!(
        (before.code, before.effect()),
        (0, "would_execute"),
        "{}",
        before.stderr
    );
    assert_eq!(up.executions(), 0);

    let real = run(call_of(false, alice)).await;
    assert_eq!(real.effect(), "created");
    assert_eq!(up.executions(), 1);

    let after = run(call_of(true, alice)).await;
    assert_eq!((after.code, after.effect()), (0, "would_replay"), "{}", after.stderr);
    assert_eq!(after.json["body"]["state"], "completed");
    assert_eq!(after.json["key"], "inv-9");
    assert_eq!(after.members(), real.members());
    // Asked with the call's own headers: another tenant's key is not alice's.
    let bob = run(call_of(true, "Authorization: Bearer bob")).await;
    assert_eq!(bob.effect(), "would_execute");
    assert_eq!(up.executions(), 1, "the dry runs executed nothing");
}

#[tokio::test]
async fn a_key_reused_with_another_body_exits_3() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let url = proxy.url("/v1/transfers");

    let first = call(&["-d", r#"{"to":"a"}"#, "--idempotency-key", "t-1", &url]).await;
    let reused = call(&["-d", r#"{"to":"b"}"#, "--idempotency-key", "t-1", &url]).await;

    assert_eq!(first.code, 0);
    assert_eq!((reused.code, reused.effect()), (3, "failed"), "{}", reused.stderr);
    assert_eq!(reused.json["status"], 422);
    assert_eq!(reused.json["body"]["code"], "idempotency_key_reused");
    assert_eq!(reused.json["attempts"], 1);
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn a_400_is_final_and_not_retried() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let net = Flaky::start(proxy.addr).await;

    let ran = call(&[
        "-d",
        "{}",
        "--idempotency-key",
        "bad-1",
        &net.url("/v1/orders?status=400"),
    ])
    .await;

    assert_eq!((ran.code, ran.effect()), (2, "failed"), "{}", ran.stderr);
    assert_eq!(ran.json["status"], 400);
    assert_eq!(ran.json["attempts"], 1);
    // One request on the wire, one answered by the proxy, one execution.
    assert_eq!(net.delivered(), 1);
    assert_eq!(outcomes(&c, &proxy, "stored").await, 1);
    assert_eq!(outcomes(&c, &proxy, "replayed").await, 0);
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn a_503_is_retried_with_the_same_key_until_the_retries_run_out() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));

    let url = proxy.url("/v1/orders?status=503");
    let ran = call(&["--retries", "2", "-d", "{}", "--idempotency-key", "busy-1", &url]).await;

    // A 503 is not stored: the proxy freed the key, every retry executed.
    assert_eq!((ran.code, ran.effect()), (5, "failed"), "{}", ran.stderr);
    assert_eq!(ran.json["status"], 503);
    assert_eq!(ran.json["attempts"], 3);
    assert_eq!(up.executions(), 3);
    assert_eq!(ran.json["body"]["headers"]["idempotency-key"], "busy-1");
    assert_eq!(ran.json["body"]["execution"], 3);
}

#[tokio::test]
async fn get_is_sent_without_a_key() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));

    let ran = call(&["--idempotency-key", "ignored", &proxy.url("/v1/orders/7?status=200")]).await;

    assert_eq!((ran.code, ran.effect()), (0, "created"));
    assert_eq!(ran.json["key"], Value::Null);
    assert_eq!(ran.json["body"]["method"], "GET");
    assert!(ran.json["body"]["headers"].get("idempotency-key").is_none());
    assert_eq!(ran.members(), SEVEN);
}

#[tokio::test]
async fn nothing_listening_is_retried_then_reported_without_a_response() {
    // A port that was just free: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1/orders");

    let ran = call(&["--retries", "1", "-d", "{}", &url]).await;

    assert_eq!((ran.code, ran.effect()), (5, "failed"), "{}", ran.stderr);
    assert_eq!(ran.json["status"], Value::Null);
    assert_eq!(ran.json["attempts"], 2);
    assert!(ran.json["key"].is_string());
    assert!(
        ran.json["body"].as_str().unwrap().contains("cannot connect"),
        "{}",
        ran.json
    );
    assert_eq!(ran.members(), SEVEN);
}

#[tokio::test]
async fn raw_output_prints_the_body_and_reports_on_stderr() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_idemproxy"))
        .args(["call", "--output", "raw", "-d", "x=1", "--idempotency-key", "raw-1"])
        .arg(proxy.url("/v1/forms"))
        .output()
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["body"], "x=1");
    assert_eq!(body["headers"]["content-type"], "application/x-www-form-urlencoded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("created (201 Created), key raw-1, 1 attempt"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(0));
}

#[tokio::test]
async fn a_bad_command_line_exits_2_and_sends_nothing() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let url = proxy.url("/v1/orders");
    for args in [
        vec!["-d", "@/nonexistent/body.json", url.as_str()],
        vec!["-d", "{}", "--idempotency-key", "has space", url.as_str()],
        vec!["-d", "{}", "--dry-run", url.as_str()],
    ] {
        let out = spawn_call(&args).wait_with_output().await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("idemproxy call: "));
    }
    assert_eq!(up.executions(), 0);
}

#[tokio::test]
async fn https_trusts_cacert_and_refuses_an_unknown_certificate_without_retrying() {
    let up = Upstream::start().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let rcgen::CertifiedKey { cert, key_pair } = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cacert = dir.path().join("cert.pem");
    std::fs::write(&cacert, cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key_pair.serialize_pem()).unwrap();
    let tls = "[server.tls]\ncert = \"{dir}/cert.pem\"\nkey = \"{dir}/key.pem\"\n";
    let proxy = Proxy::start_in(dir.clone(), &config(&up.url(), tls));
    let url = format!("https://localhost:{}/v1/secure", proxy.addr.port());
    let cmd = [
        "-d",
        "{}",
        "--idempotency-key",
        "tls-1",
        "--cacert",
        cacert.to_str().unwrap(),
        url.as_str(),
    ];

    let first = call(&cmd).await;
    let second = call(&cmd).await;
    assert_eq!((first.code, first.effect()), (0, "created"), "{}", first.stderr);
    assert_eq!((second.code, second.effect()), (0, "replayed"), "{}", second.stderr);
    assert_eq!(first.json["body"]["headers"]["x-forwarded-proto"], "https");

    // The system roots do not know this certificate: final at once.
    let untrusted = call(&["-d", "{}", "--idempotency-key", "tls-2", &url]).await;
    assert_eq!(
        (untrusted.code, untrusted.effect()),
        (1, "failed"),
        "{}",
        untrusted.stderr
    );
    assert_eq!(untrusted.json["attempts"], 1);
    assert!(
        untrusted.json["body"].as_str().unwrap().contains("certificate"),
        "{}",
        untrusted.json
    );
    assert_eq!(up.executions(), 1);
}
