//! Streamed responses on keyed routes (SPEC §7), against the real binary and
//! a real streaming upstream whose events the tests release one by one: a
//! client sees each event while the upstream still holds the next, held
//! duplicates join the live stream, a clean end is stored and replayed, and
//! a broken stream (upstream reset, proxy crash) is an unknown outcome.

mod support;

use std::process::Stdio;
use std::time::Duration;

use http::StatusCode;
use support::streaming::{event, post_stream, StreamUpstream, TOKENS};
use support::{record, run_cli, Client, Proxy};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A sled store in `{dir}`, a generous upstream timeout (a stream must end
/// within it), then `extra`.
fn config(upstream: &str, extra: &str) -> String {
    format!("[upstream]\nurl = \"{upstream}\"\ntimeout = \"30s\"\n\n[store]\npath = \"{{dir}}/data\"\n\n{extra}\n")
}

/// The whole stream of execution `n` with `events` events, as sent.
fn whole(n: usize, events: usize) -> String {
    (1..=events).map(|i| event(n, i)).collect()
}

/// Waits until the records API reports `state` for `key` (bounded: 20 s).
async fn wait_state(p: &Proxy, key: &str, state: &str) {
    let c = Client::new();
    for _ in 0..1000 {
        if record(&c, p, "anonymous", key)
            .await
            .is_some_and(|r| r["state"] == state)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{key} did not become {state} within 20s");
}

#[tokio::test]
async fn the_first_event_reaches_the_client_while_the_upstream_holds_the_second() {
    let up = StreamUpstream::start().await;
    let p = Proxy::start(&config(&up.url(), ""));
    up.release(1);
    let mut first = post_stream(&p.url("/v1/chat?gated=1"), "k-live").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("idempotent-replayed"), Some("false"));
    assert_eq!(first.header("content-type"), Some("text/event-stream; charset=utf-8"));
    first.read_until(&event(1, 1)).await.unwrap();
    assert_eq!(up.sent(), 1, "event 1 arrived while event 2 was still held upstream");
    for i in 2..=5 {
        up.release(i);
        first.read_until(&event(1, i)).await.unwrap();
        assert_eq!(up.sent(), i);
    }
    assert_eq!(first.finish().await.unwrap(), whole(1, 5));
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn twenty_duplicates_attached_mid_stream_receive_identical_bytes_from_one_execution() {
    let up = StreamUpstream::start().await;
    let p = Proxy::start(&config(&up.url(), ""));
    let url = p.url("/v1/chat?gated=1");
    up.release(2);
    let mut first = post_stream(&url, "k-fan").await;
    first.read_until(&event(1, 2)).await.unwrap();

    // Events 1 and 2 are out, 3 is held: every duplicate gets the prefix at once.
    let mut dups = Vec::new();
    for _ in 0..20 {
        dups.push(tokio::spawn({
            let url = url.clone();
            async move {
                let mut d = post_stream(&url, "k-fan").await;
                d.read_until(&event(1, 2)).await.unwrap();
                d
            }
        }));
    }
    let mut joined = Vec::new();
    for d in dups {
        joined.push(d.await.unwrap());
    }
    assert_eq!(up.sent(), 2, "the duplicates got the prefix before event 3 was sent");
    up.release(5);
    let expected = whole(1, 5);
    assert_eq!(first.finish().await.unwrap(), expected);
    for d in joined {
        assert_eq!(d.status, StatusCode::OK);
        assert_eq!(d.header("idempotent-replayed"), Some("true"));
        assert_eq!(d.header("x-execution"), Some("1"));
        assert_eq!(d.finish().await.unwrap(), expected, "a duplicate's bytes differ");
    }
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn a_completed_stream_is_stored_and_replayed_whole() {
    let up = StreamUpstream::start().await;
    let p = Proxy::start(&config(&up.url(), ""));
    let url = p.url("/v1/chat?gated=1");
    up.release(1);
    let mut first = post_stream(&url, "k-replay").await;
    first.read_until(&event(1, 1)).await.unwrap();
    up.release(5);
    // The clean end reaches the client only once the stream is stored.
    let original = first.finish().await.unwrap();

    let retry = Client::new().post_key(&url, "k-replay", "{\"prompt\":\"hi\"}").await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.header("content-type"), Some("text/event-stream; charset=utf-8"));
    assert_eq!(retry.body, original);
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn an_upstream_reset_cuts_the_stream_and_the_retry_gets_outcome_unknown() {
    let up = StreamUpstream::start().await;
    let p = Proxy::start(&config(&up.url(), ""));
    let url = p.url("/v1/chat?reset=2");
    let mut first = post_stream(&url, "k-reset").await;
    first.read_until(&event(1, 2)).await.unwrap();
    let (read, _) = first.finish().await.expect_err("a reset stream must not end cleanly");
    assert_eq!(read, whole(1, 2), "the client got what was sent, then the cut");

    let retry = Client::new().post_key(&url, "k-reset", "{\"prompt\":\"hi\"}").await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(retry.code(), "outcome_unknown");
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn an_upstream_reset_with_on_lost_outcome_retry_executes_the_retry() {
    let up = StreamUpstream::start().await;
    let p = Proxy::start(&config(&up.url(), "[idempotency]\non_lost_outcome = \"retry\"\n"));
    let url = p.url("/v1/chat?reset=2");
    let mut first = post_stream(&url, "k-reset-retry").await;
    first.read_until(&event(1, 2)).await.unwrap();
    assert!(first.finish().await.is_err(), "a reset stream must not end cleanly");

    let mut again = post_stream(&url, "k-reset-retry").await;
    assert_eq!(again.header("idempotent-replayed"), Some("false"));
    again.read_until(&event(2, 1)).await.unwrap();
    assert_eq!(up.executions(), 2);
}

#[tokio::test]
async fn a_proxy_killed_mid_stream_leaves_an_unknown_outcome() {
    let up = StreamUpstream::start().await;
    let mut p = Proxy::start(&config(&up.url(), ""));
    let url = p.url("/v1/chat?gated=1");
    up.release(1);
    let mut first = post_stream(&url, "k-crash").await;
    first.read_until(&event(1, 1)).await.unwrap();
    p.kill();
    let (read, _) = first.finish().await.expect_err("a crash must cut the stream");
    assert_eq!(read, event(1, 1));

    let p = Proxy::start_in(p.dir.clone(), &config(&up.url(), ""));
    let retry = Client::new()
        .post_key(&p.url("/v1/chat?gated=1"), "k-crash", "{\"prompt\":\"hi\"}")
        .await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(retry.code(), "outcome_unknown");
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn a_proxy_killed_mid_stream_with_on_lost_outcome_retry_executes_after_the_upstream_timeout() {
    let up = StreamUpstream::start().await;
    let cfg = |up: &str| {
        format!(
            "[upstream]\nurl = \"{up}\"\ntimeout = \"2s\"\n\n[store]\npath = \"{{dir}}/data\"\n\n[idempotency]\non_lost_outcome = \"retry\"\n"
        )
    };
    let mut p = Proxy::start(&cfg(&up.url()));
    up.release(1);
    let mut first = post_stream(&p.url("/v1/chat?gated=1"), "k-crash-retry").await;
    first.read_until(&event(1, 1)).await.unwrap();
    p.kill();
    assert!(first.finish().await.is_err(), "a crash must cut the stream");

    let p = Proxy::start_in(p.dir.clone(), &cfg(&up.url()));
    up.release(5);
    let url = p.url("/v1/chat?gated=1");
    let c = Client::new();
    // Until the original's upstream timeout has passed, the key is in use.
    let mut last = None;
    for _ in 0..300 {
        let r = c.post_key(&url, "k-crash-retry", "{\"prompt\":\"hi\"}").await;
        if r.status != StatusCode::CONFLICT {
            last = Some(r);
            break;
        }
        assert_eq!(r.code(), "idempotency_key_in_use");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = last.expect("the retry was not executed within 30s");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, whole(2, 5));
    assert_eq!(up.executions(), 2);
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_gets_the_whole_stream_on_retry() {
    let up = StreamUpstream::start().await;
    let p = Proxy::start(&config(&up.url(), ""));
    let url = p.url("/v1/chat?gated=1");
    up.release(1);
    let mut first = post_stream(&url, "k-gone").await;
    first.read_until(&event(1, 1)).await.unwrap();
    drop(first);

    up.release(5);
    up.wait_sent(5).await;
    wait_state(&p, "k-gone", "completed").await;
    let retry = Client::new().post_key(&url, "k-gone", "{\"prompt\":\"hi\"}").await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.body, whole(1, 5));
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn a_stream_past_max_response_body_stays_live_and_is_not_replayable() {
    let up = StreamUpstream::start().await;
    let p = Proxy::start(&config(&up.url(), "[idempotency]\nmax_response_body = \"1KiB\"\n"));
    // Five events of about 450 bytes: past 1 KiB at the third.
    let url = p.url("/v1/chat?gated=1&pad=400");
    up.release(1);
    let mut first = post_stream(&url, "k-big").await;
    first.read_until("\"event\":1,").await.unwrap();
    up.release(4);
    first.read_until("\"event\":4,").await.unwrap();
    assert_eq!(up.sent(), 4, "still live past the limit");

    // A duplicate that arrives now cannot get the whole stream.
    let dup = Client::new().post_key(&url, "k-big", "{\"prompt\":\"hi\"}").await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert_eq!(dup.code(), "response_not_replayable");

    up.release(5);
    let body = first.finish().await.unwrap();
    assert_eq!(body.len(), 5 * (event(1, 1).len() + 400));
    let retry = Client::new().post_key(&url, "k-big", "{\"prompt\":\"hi\"}").await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(retry.code(), "response_not_replayable");
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn ndjson_streams_by_default() {
    let up = StreamUpstream::start().await;
    let p = Proxy::start(&config(&up.url(), ""));
    up.release(1);
    let mut lines = post_stream(&p.url("/v1/jobs?gated=1&ndjson=1"), "k-ndjson").await;
    assert_eq!(lines.header("content-type"), Some("application/x-ndjson"));
    lines
        .read_until("{\"execution\":1,\"event\":1,\"pad\":\"\"}\n")
        .await
        .unwrap();
    assert_eq!(up.sent(), 1, "the first line arrived while the second was held");
    up.release(5);
    lines.finish().await.unwrap();
}

#[tokio::test]
async fn a_route_with_empty_stream_types_buffers_streams_as_before() {
    let up = StreamUpstream::start().await;
    let routes = "[[routes]]\npath = \"/buffered\"\nstream_types = []\n[[routes]]\npath = \"/v1/*\"\n";
    let p = Proxy::start(&config(&up.url(), routes));
    // Buffered like any response: complete, with its length, before the head.
    let buffered = post_stream(&p.url("/buffered"), "k-buffered").await;
    assert_eq!(
        buffered.header("content-length"),
        Some(whole(1, 5).len().to_string().as_str())
    );
    assert_eq!(buffered.finish().await.unwrap(), whole(1, 5));
    let retry = Client::new()
        .post_key(&p.url("/buffered"), "k-buffered", "{\"prompt\":\"hi\"}")
        .await;
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.body, whole(1, 5));
    assert_eq!(up.executions(), 1);
}

/// A `redis-server` on a free loopback port, without persistence; killed on drop.
struct Redis(std::process::Child, u16);

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/test installs it)");
        // Owned at once, so a panic below still kills and reaps it.
        let redis = Redis(child, port);
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not listen within 10s");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_duplicate_on_another_replica_gets_the_whole_stream_after_its_end() {
    let up = StreamUpstream::start().await;
    let redis = Redis::start();
    let cfg = format!(
        "[upstream]\nurl = \"{}\"\ntimeout = \"30s\"\n[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:{}/0\"\n",
        up.url(),
        redis.1
    );
    let (a, b) = (Proxy::start(&cfg), Proxy::start(&cfg));
    up.release(1);
    let mut first = post_stream(&a.url("/v1/chat?gated=1"), "k-replicas").await;
    first.read_until(&event(1, 1)).await.unwrap();

    // Held on replica B while A streams: B answers once A's stream is stored.
    let url_b = b.url("/v1/chat?gated=1");
    let other = tokio::spawn(async move { post_stream(&url_b, "k-replicas").await });
    up.release(5);
    let original = first.finish().await.unwrap();
    let other = other.await.unwrap();
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.header("idempotent-replayed"), Some("true"));
    assert_eq!(other.finish().await.unwrap(), original);
    assert_eq!(original, whole(1, 5));
    assert_eq!(up.executions(), 1);
}

#[test]
fn check_shows_stream_types_per_route_and_names_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("idemproxy.toml");
    let good = "[upstream]\nurl = \"http://127.0.0.1:9\"\n[idempotency]\nstream_types = [\"text/event-stream\"]\n\
                [[routes]]\npath = \"/a\"\n[[routes]]\npath = \"/b\"\nstream_types = []\n";
    std::fs::write(&file, good).unwrap();
    let (code, out, err) = run_cli(&["check", "--config", file.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 0, "{err}");
    let line = |p: &str| {
        out.lines()
            .find(|l| l.contains(p))
            .unwrap_or_else(|| panic!("{p} in {out}"))
    };
    assert!(line("[0] /a").contains("stream_types=text/event-stream"), "{out}");
    assert!(line("[1] /b").contains("stream_types=[]"), "{out}");

    let bad = "[upstream]\nurl = \"http://127.0.0.1:9\"\n[[routes]]\npath = \"/a\"\n[[routes]]\npath = \"/b\"\n\
               stream_types = [\"text/event-stream\", \"ndjson\"]\n";
    std::fs::write(&file, bad).unwrap();
    let (code, _, err) = run_cli(&["check", "--config", file.to_str().unwrap()], &[], dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("routes[1].stream_types[1]"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn openapi_marks_the_replay_behaviour_of_streaming_operations() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("idemproxy.toml");
    std::fs::write(&cfg, "[upstream]\nurl = \"http://127.0.0.1:9\"\n").unwrap();
    let spec = dir.path().join("api.yaml");
    std::fs::write(
        &spec,
        "openapi: 3.1.0\ninfo: {title: t, version: '1'}\npaths:\n  /v1/chat:\n    post:\n      responses:\n        '200':\n          description: tokens\n          content:\n            text/event-stream:\n              schema: {type: string}\n  /v1/orders:\n    post:\n      responses:\n        '201':\n          description: created\n          content:\n            application/json:\n              schema: {type: object}\n",
    )
    .unwrap();
    let (code, out, err) = run_cli(
        &[
            "openapi",
            "--config",
            cfg.to_str().unwrap(),
            "--spec",
            spec.to_str().unwrap(),
        ],
        &[],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_yaml_ng::from_str(&out).unwrap();
    let chat = &doc["paths"]["/v1/chat"]["post"];
    assert_eq!(chat["x-idempotency-replay"]["mode"], "stream", "{out}");
    assert!(chat["x-idempotency-replay"]["description"]
        .as_str()
        .unwrap()
        .contains("outcome_unknown"));
    assert!(doc["paths"]["/v1/orders"]["post"].get("x-idempotency-replay").is_none());
}

/// The `openai` Python SDK (a real streaming client) through the proxy: it
/// reads tokens as they come, and with an `Idempotency-Key` of its own
/// (`extra_headers`) a retry gets the same tokens without a new execution.
#[tokio::test]
async fn the_openai_python_sdk_streams_through_the_proxy_and_its_retry_replays() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("SKIPPED: python3 cannot import openai (scripts/test installs it: pip install openai)");
        return;
    }
    let up = StreamUpstream::start().await;
    let p = Proxy::start(&config(&up.url(), ""));
    let base = p.url("/v1");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_stream.py");
    let run = |key: &'static str| {
        let mut child = tokio::process::Command::new("python3")
            .args([script, &base, key])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    };
    async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the SDK printed nothing within 30s")
            .unwrap()
            .expect("the SDK script ended early");
        serde_json::from_str(&line).unwrap()
    }

    // Chunk 1 carries the role, chunk 2 the first token; chunk 3 is held.
    up.release(2);
    let (mut child, mut lines) = run("sdk-key-1");
    assert_eq!(next_line(&mut lines).await["replayed"], "false");
    assert_eq!(next_line(&mut lines).await["token"], TOKENS[0]);
    assert_eq!(up.sent(), 2, "the SDK read the first token while the next was held");
    up.release(100);
    let mut tokens = vec![TOKENS[0].to_owned()];
    loop {
        let v = next_line(&mut lines).await;
        if v["done"] == true {
            break;
        }
        tokens.push(v["token"].as_str().unwrap().to_owned());
    }
    assert!(child.wait().await.unwrap().success());
    let expected: Vec<String> = TOKENS.iter().map(|t| t.replace("{n}", "1")).collect();
    assert_eq!(tokens, expected);

    let (mut child, mut lines) = run("sdk-key-1");
    assert_eq!(next_line(&mut lines).await["replayed"], "true");
    let mut again = Vec::new();
    loop {
        let v = next_line(&mut lines).await;
        if v["done"] == true {
            break;
        }
        again.push(v["token"].as_str().unwrap().to_owned());
    }
    assert!(child.wait().await.unwrap().success());
    assert_eq!(again, expected, "the retry got the same tokens");
    assert_eq!(up.executions(), 1);
}

/// Measurements for BENCHMARKS.md ("Streaming"), not a check: run with
/// `cargo test --release --test streaming measure -- --ignored --nocapture`.
/// Time to first byte through the proxy (streamed with the sled store and
/// with the memory store, and buffered with `stream_types = []`) next to the
/// upstream direct; then the proxy's memory with 1000 duplicates reading one
/// stream, for two stream sizes (if every follower held its own copy, the
/// larger stream would cost each follower four times as much).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand for BENCHMARKS.md"]
async fn measure_time_to_first_byte_and_follower_memory() {
    let up = StreamUpstream::start().await;
    let routes = "[[routes]]\npath = \"/buffered\"\nstream_types = []\n[[routes]]\npath = \"/v1/*\"\n";
    let sled = Proxy::start(&config(&up.url(), routes));
    let memory = format!(
        "[upstream]\nurl = \"{}\"\ntimeout = \"60s\"\n[store]\nbackend = \"memory\"\n{routes}",
        up.url()
    );
    let memory = Proxy::start(&memory);
    // Five events 20 ms apart: the whole stream takes 80 ms upstream.
    let query = "?events=5&every=20";
    measure_ttfb("direct", &format!("{}/v1/chat{query}", up.url())).await;
    measure_ttfb("proxy, sled, streamed", &sled.url(&format!("/v1/chat{query}"))).await;
    measure_ttfb("proxy, memory, streamed", &memory.url(&format!("/v1/chat{query}"))).await;
    measure_ttfb("proxy, memory, buffered", &memory.url(&format!("/buffered{query}"))).await;
    drop((sled, memory));
    // A fresh proxy per size, so neither inherits the other's freed memory.
    let memory = format!(
        "[upstream]\nurl = \"{}\"\ntimeout = \"60s\"\n[store]\nbackend = \"memory\"\n",
        up.url()
    );
    measure_fan_out(&up, &Proxy::start(&memory), "fan-1k", 1000).await;
    measure_fan_out(&up, &Proxy::start(&memory), "fan-4k", 4000).await;
}

/// Prints the p50/p99 time to the first event and p50 to the last, over 200
/// requests, each on a new connection with a new key.
async fn measure_ttfb(label: &str, url: &str) {
    use std::time::Instant;
    let mut first = Vec::new();
    let mut last = Vec::new();
    for i in 0..200 {
        let start = Instant::now();
        let key = format!("{}-{i}", label.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
        let mut s = post_stream(url, &key).await;
        s.read_until("\"event\":1,").await.unwrap();
        first.push(start.elapsed());
        s.finish().await.unwrap();
        last.push(start.elapsed());
    }
    first.sort();
    last.sort();
    let pct = |v: &[Duration], q: f64| v[((v.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
    println!(
        "{label:<26} first event p50 {:7.2} ms  p99 {:7.2} ms   last event p50 {:7.2} ms",
        pct(&first, 0.5),
        pct(&first, 0.99),
        pct(&last, 0.5)
    );
}

/// 1000 duplicates join one stream of 200 events of `pad` bytes after the
/// first 100 are out: each gets the prefix at once, then the rest live.
/// Prints the proxy's RSS at each step.
async fn measure_fan_out(up: &StreamUpstream, p: &Proxy, key: &str, pad: usize) {
    use std::time::Instant;
    let (idle, _) = p.memory_kib();
    let url = p.url(&format!("/v1/fan?gated=1&events=200&pad={pad}"));
    up.release(100);
    let mut first = post_stream(&url, key).await;
    first.read_until("\"event\":100,").await.unwrap();
    let (one, _) = p.memory_kib();
    let start = Instant::now();
    let mut joined = Vec::new();
    for batch in 0..10 {
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (url, key) = (url.clone(), key.to_owned());
                tokio::spawn(async move {
                    let mut d = post_stream(&url, &key).await;
                    d.read_until("\"event\":100,").await.unwrap();
                    d
                })
            })
            .collect();
        for t in tasks {
            joined.push(t.await.unwrap());
        }
        assert_eq!(joined.len(), (batch + 1) * 100);
    }
    let attach = start.elapsed();
    let (attached, _) = p.memory_kib();
    up.release(200);
    let start = Instant::now();
    let expected = first.finish().await.unwrap();
    let reads: Vec<_> = joined.into_iter().map(|d| tokio::spawn(d.finish())).collect();
    for r in reads {
        assert_eq!(r.await.unwrap().unwrap(), expected);
    }
    let rest = start.elapsed();
    let (after, peak) = p.memory_kib();
    println!(
        "1000 followers on a {} KiB stream: RSS before {idle} KiB, one reader {one} KiB, 1000 attached {attached} KiB \
         (+{:.1} KiB per follower), after the end {after} KiB, peak {peak} KiB; 1000 attached in {:.0} ms, \
         the second half to all in {:.0} ms",
        expected.len() / 1024,
        attached.saturating_sub(one) as f64 / 1000.0,
        attach.as_secs_f64() * 1000.0,
        rest.as_secs_f64() * 1000.0
    );
}
