//! Connection timeouts (SPEC §2 `[server]`, §3; issue 10 item 3), end to end
//! against the real binary with short limits: a request body that goes silent
//! gets 408 `request_timeout` and its connection closes, with nothing executed
//! upstream; stalled clients cannot lock out the others; keep-alive
//! connections with no request in progress are closed after `idle_timeout`
//! (HTTP/1.1 and h2c), while the head limit applies only to a head.
//!
//! Every wait is bounded; "on time" is checked as "not before the limit and
//! well within a bounded wait", never as a tight upper bound.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::body_probe::{BodyEnd, BodyProbe};
use support::raw::{h2c_get, Raw, H2_GOAWAY, H2_HEADERS};
use support::*;

const STALL: Duration = Duration::from_millis(400);

fn stall_config(upstream: &str, extra: &str) -> String {
    config(
        upstream,
        &format!("[server]\nbody_read_timeout = \"{}ms\"\n{extra}", STALL.as_millis()),
    )
}

/// A request head announcing 100 body bytes, followed by only 10 of them.
fn stalled_post(path: &str, key: Option<&str>) -> Vec<u8> {
    let key = key.map_or(String::new(), |k| format!("Idempotency-Key: {k}\r\n"));
    format!("POST {path} HTTP/1.1\r\nHost: test\r\n{key}Content-Length: 100\r\n\r\n0123456789").into_bytes()
}

/// Asserts a 408 `request_timeout` problem that closes the connection.
fn assert_request_timeout(raw: &[u8]) {
    let text = String::from_utf8_lossy(raw).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 408 "), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.contains("content-type: application/problem+json"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
}

#[tokio::test]
async fn a_keyed_body_that_stalls_gets_408_closes_the_connection_and_executes_nothing() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&stall_config(&up.url(), ""));

    let mut raw = Raw::connect(proxy.addr).await;
    let sent = Instant::now();
    raw.send(&stalled_post("/orders", Some("stall-1"))).await;
    let answer = raw.until_closed("stalled keyed body").await;
    assert!(
        sent.elapsed() >= STALL,
        "answered before the body had been silent for the limit"
    );
    assert_request_timeout(&answer);
    assert_eq!(up.executions(), 0, "nothing was forwarded");

    // Nothing was claimed either: the complete retry executes, once.
    let c = Client::new();
    let r = c.post_key(&proxy.url("/orders"), "stall-1", "{}").await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.replayed(), Some("false"));
    assert_eq!(up.executions(), 1);

    // HTTP/2: the stalled stream gets the same problem.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    tx.send(Ok(Frame::data(Bytes::from_static(b"{\"half\":"))))
        .await
        .unwrap();
    let req = Request::builder()
        .method(Method::POST)
        .uri(proxy.url("/orders"))
        .header("idempotency-key", "stall-h2")
        .body(StreamBody::new(ReceiverStream(rx)))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("no answer to the stalled h2 stream within 10s")
        .unwrap();
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["code"], "request_timeout");
    drop(tx);
    assert_eq!(up.executions(), 1, "the stalled h2 request was not forwarded");
}

#[tokio::test]
async fn a_pass_through_body_that_stalls_is_aborted_upstream_and_gets_408() {
    // Pass-through streams, so the upstream has the head and the first bytes
    // when the client goes silent. What it must never get is a complete
    // request: the proxy breaks the upstream connection mid-body.
    let probe = BodyProbe::start().await;
    let proxy = Proxy::start(&stall_config(&probe.url(), "[[routes]]\npath = \"/keyed\"\n"));

    let mut raw = Raw::connect(proxy.addr).await;
    let sent = Instant::now();
    raw.send(&stalled_post("/upload", None)).await;
    let answer = raw.until_closed("stalled pass-through body").await;
    assert!(sent.elapsed() >= STALL);
    assert_request_timeout(&answer);
    let ends = probe.ended(1).await;
    assert_eq!(ends, vec![("/upload".to_owned(), BodyEnd::Aborted(10))]);

    // A complete pass-through body still goes through whole.
    let c = Client::new();
    let r = c.send(Method::PUT, &proxy.url("/upload"), &[], vec![b'b'; 100]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(probe.ended(2).await[1], ("/upload".to_owned(), BodyEnd::Complete(100)));
}

#[tokio::test]
async fn a_slow_but_steady_body_is_not_cut_off() {
    // The limit is on silence, not on the whole body: 25 bytes, one every
    // 100 ms (2.5 s in all) under a 2 s limit.
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[server]\nbody_read_timeout = \"2s\"\n"));
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"POST /slow HTTP/1.1\r\nHost: test\r\nIdempotency-Key: steady\r\nContent-Length: 25\r\n\r\n")
        .await;
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        raw.send(b"s").await;
    }
    let r = raw.response().await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["body"], "s".repeat(25));
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn stalled_bodies_do_not_lock_out_a_normal_client() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&stall_config(&up.url(), "max_connections = 8\n"));
    // Eight clients take every connection slot: keyed and pass-through
    // bodies that stop after 10 of 100 bytes.
    let mut stalled = Vec::new();
    for i in 0..8 {
        let mut raw = Raw::connect(proxy.addr).await;
        let key = format!("held-{i}");
        let request = if i % 2 == 0 {
            stalled_post("/held-keyed", Some(&key))
        } else {
            stalled_post("/held-pass", None)
        };
        raw.send(&request).await;
        stalled.push(raw);
    }
    // The ninth waits in the backlog until a stalled one is cut off.
    let c = Client::new();
    let r = tokio::time::timeout(Duration::from_secs(10), c.get(&proxy.url("/normal")))
        .await
        .expect("stalled bodies kept a normal client out for 10s");
    assert_eq!(r.status, StatusCode::CREATED);
    for (i, raw) in stalled.iter_mut().enumerate() {
        let answer = raw.until_closed(&format!("stalled client {i}")).await;
        assert_request_timeout(&answer);
    }
    assert_eq!(up.executions_of("/normal"), 1);
    assert_eq!(
        up.executions_of("/held-keyed"),
        0,
        "no stalled keyed request was forwarded"
    );
}

#[tokio::test]
async fn idle_http1_keep_alive_connections_are_closed_after_idle_timeout() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        &up.url(),
        "[server]\nidle_timeout = \"300ms\"\nheader_read_timeout = \"60s\"\n",
    ));
    let mut raw = Raw::connect(proxy.addr).await;
    // Idleness starts when the response has been sent: after this instant.
    let sent = Instant::now();
    raw.send(b"GET /a HTTP/1.1\r\nHost: test\r\n\r\n").await;
    assert_eq!(raw.response().await.status, 201);
    let rest = raw.until_closed("idle HTTP/1.1 connection").await;
    assert!(sent.elapsed() >= Duration::from_millis(300));
    assert!(rest.is_empty(), "nothing more was sent: {rest:?}");
}

#[tokio::test]
async fn idle_h2c_connections_are_closed_after_idle_timeout() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        &up.url(),
        "[server]\nidle_timeout = \"300ms\"\nheader_read_timeout = \"60s\"\n",
    ));
    let mut raw = Raw::connect(proxy.addr).await;
    let started = Instant::now();
    raw.send(&h2c_get("/h2-idle")).await;
    let frames = raw.h2_frames_until_closed("idle h2c connection").await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        frames
            .iter()
            .any(|&(kind, _, stream)| kind == H2_HEADERS && stream == 1),
        "the request was answered first: {frames:?}"
    );
    assert_eq!(
        frames.last().map(|f| f.0),
        Some(H2_GOAWAY),
        "GOAWAY, then close: {frames:?}"
    );
    assert_eq!(up.executions_of("/h2-idle"), 1);
}

#[tokio::test]
async fn the_head_limit_applies_to_heads_not_to_idle_keep_alive_time() {
    // header_read_timeout < the idle pause < idle_timeout: the connection
    // stays open for its next request; a next head that stops half-way is
    // cut off after header_read_timeout.
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        &up.url(),
        "[server]\nheader_read_timeout = \"200ms\"\nidle_timeout = \"60s\"\n",
    ));
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"GET /first HTTP/1.1\r\nHost: test\r\n\r\n").await;
    assert_eq!(raw.response().await.status, 201);
    tokio::time::sleep(Duration::from_secs(1)).await;
    raw.send(b"GET /second HTTP/1.1\r\nHost: test\r\n\r\n").await;
    assert_eq!(raw.response().await.status, 201, "the idle connection was kept");

    let started = Instant::now();
    raw.send(b"GET /third HTTP/1.1\r\nHost: te").await;
    let rest = raw.until_closed("a half head on a kept-alive connection").await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"), "{rest:?}");
    assert_eq!(up.executions(), 2);
}

/// A request body fed from a channel: it stalls while the sender holds on.
struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}
