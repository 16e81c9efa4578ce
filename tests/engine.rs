//! SPEC §3 and §4 against the real binary: one test per row of the §3 table
//! (each counts executions at the upstream and compares status, problem
//! `code` and body bytes), route rules, tenants, the load tests, the records
//! API, metrics and logs. Crash, restart and store failure live in
//! `tests/crash.rs`.
//!
//! No test sleeps where a signal can be awaited: the upstream reports
//! arrivals (`wait_arrived`), and where only time can tell (TTL expiry, a
//! fresh `Date`) a bounded polling loop is used. Asserts never compare
//! durations.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------- helpers

/// A full config (the shared `config()` fixes `upstream.timeout` and the
/// `[store]` table, which some tests need to change).
fn conf(upstream: &str, upstream_timeout: &str, store: &str, rest: &str) -> String {
    format!(
        "[upstream]\nurl = \"{upstream}\"\ntimeout = \"{upstream_timeout}\"\n\n[store]\npath = \"{{dir}}/data\"\n{store}\n\n{rest}\n"
    )
}

async fn post(c: &Client, url: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    c.send(Method::POST, url, headers, Bytes::copy_from_slice(body.as_bytes()))
        .await
}

/// The `execution` number the upstream wrote into its JSON body.
fn execution(r: &Resp) -> u64 {
    r.json()["execution"].as_u64().expect("an upstream body")
}

async fn delete_record(c: &Client, p: &Proxy, tenant: &str, key: &str) -> StatusCode {
    c.send(
        Method::DELETE,
        &p.admin_url(&format!("/v1/records?tenant={tenant}&key={key}")),
        &[],
        Bytes::new(),
    )
    .await
    .status
}

/// `idemproxy_requests_total` by outcome, read from `/metrics`.
async fn outcomes(c: &Client, p: &Proxy) -> std::collections::HashMap<String, u64> {
    let text = c.get(&p.admin_url("/metrics")).await;
    let text = String::from_utf8(text.body.to_vec()).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("idemproxy_requests_total{outcome=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(o, n)| (o.to_owned(), n.trim().parse().unwrap()))
        .collect()
}

/// One metric sample by its exact name and labels, 0 when absent.
async fn sample(c: &Client, p: &Proxy, name: &str) -> f64 {
    let text = c.get(&p.admin_url("/metrics")).await;
    let text = String::from_utf8(text.body.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The tenant id of `authorization` tenants: lowercase hex SHA-256.
fn auth_tenant(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

/// Headers of a response that must be replayed byte for byte: everything but
/// `Date`, `Age`, `Set-Cookie` and `Idempotent-Replayed`.
fn end_to_end(r: &Resp) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = r
        .headers
        .iter()
        .filter(|(n, _)| !matches!(n.as_str(), "date" | "age" | "set-cookie" | "idempotent-replayed"))
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    v.sort();
    v
}

/// Sends raw bytes on a fresh connection and parses the (single) response.
/// For what the shared client cannot send: a chunked body.
async fn raw(addr: SocketAddr, request: &[u8]) -> Resp {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    // Read until the head and its Content-Length worth of body are in.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("response within 10s")
            .unwrap();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..at]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= at + 4 + len || n == 0 {
                let mut lines = head.lines();
                let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
                let mut headers = http::HeaderMap::new();
                for l in lines {
                    let (k, v) = l.split_once(':').unwrap();
                    headers.append(
                        http::HeaderName::from_bytes(k.trim().as_bytes()).unwrap(),
                        v.trim().parse().unwrap(),
                    );
                }
                let end = (at + 4 + len).min(buf.len());
                return Resp {
                    status: StatusCode::from_u16(status).unwrap(),
                    headers,
                    body: Bytes::copy_from_slice(&buf[at + 4..end]),
                };
            }
        }
        assert!(n > 0, "connection closed before a full response: {buf:?}");
    }
}

fn key(k: &str) -> [(&str, &str); 1] {
    [("idempotency-key", k)]
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal upstream on `listener` that counts the requests it answers.
fn serve_counting(listener: tokio::net::TcpListener) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("late upstream {n}"))))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    count
}

// ------------------------------------------------------- §3, row by row

#[tokio::test]
async fn no_key_not_required_is_proxied_untouched() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let a = post(&c, &proxy.url("/v1/orders?x=1"), &[("x-custom", "kept")], "hello").await;
    let b = post(&c, &proxy.url("/v1/orders?x=1"), &[("x-custom", "kept")], "hello").await;
    assert_eq!((a.status, b.status), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(a.replayed(), None, "a request without a key is not handled");
    assert_eq!(b.replayed(), None);
    assert_eq!(a.json()["body"], "hello");
    assert_eq!(a.json()["path"], "/v1/orders?x=1");
    assert_eq!(a.json()["headers"]["x-custom"], "kept");
    assert_eq!(a.json()["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_ne!(a.body, b.body, "each request executes");
    assert_eq!(up.executions(), 2);
    assert_eq!(outcomes(&c, &proxy).await.get("passthrough"), Some(&2));
}

#[tokio::test]
async fn derive_key_executes_once_per_distinct_request() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[idempotency]\nderive_key = true\n"));
    let c = Client::new();
    let url = proxy.url("/v1/hooks");
    let a = post(&c, &url, &[], "event-1").await;
    let b = post(&c, &url, &[], "event-1").await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!((a.replayed(), b.replayed()), (Some("false"), Some("true")));
    assert_eq!(a.body, b.body);
    assert_eq!(up.executions(), 1, "same method, path and body: one execution");
    let other = post(&c, &url, &[], "event-2").await;
    assert_eq!(other.replayed(), Some("false"));
    assert_eq!(execution(&other), 2);
    let query = post(&c, &proxy.url("/v1/hooks?v=2"), &[], "event-1").await;
    assert_eq!(execution(&query), 3, "the query is part of the derived key");
    let patch = c.send(Method::PATCH, &url, &[], Bytes::from_static(b"event-1")).await;
    assert_eq!(execution(&patch), 4, "the method is part of the derived key");
    assert_eq!(up.executions(), 4);
}

#[tokio::test]
async fn required_key_missing_is_400() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[idempotency]\nrequired = true\n"));
    let c = Client::new();
    let r = post(&c, &proxy.url("/v1/orders"), &[], "{}").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "idempotency_key_missing");
    assert_eq!(r.replayed(), None, "problems carry no Idempotent-Replayed");
    assert_eq!(up.executions(), 0);
    // A GET is not a keyed method: it passes.
    assert_eq!(c.get(&proxy.url("/v1/orders")).await.status, StatusCode::CREATED);
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn malformed_keys_are_400() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let long = "k".repeat(256);
    let cases: [(&str, Vec<(&str, &str)>); 7] = [
        ("empty", vec![("idempotency-key", "")]),
        ("empty sf-string", vec![("idempotency-key", "\"\"")]),
        ("256 characters", vec![("idempotency-key", long.as_str())]),
        ("space inside an sf-string", vec![("idempotency-key", "\"a b\"")]),
        ("non-ASCII", vec![("idempotency-key", "caf\u{e9}")]),
        ("unterminated sf-string", vec![("idempotency-key", "\"abc")]),
        (
            "repeated header",
            vec![("idempotency-key", "a"), ("idempotency-key", "a")],
        ),
    ];
    for (what, headers) in &cases {
        let r = post(&c, &url, headers, "{}").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(r.code(), "idempotency_key_invalid", "{what}");
        assert_eq!(r.replayed(), None, "{what}");
    }
    assert_eq!(up.executions(), 0);
    // The limits are inclusive, and `"abc"` and `abc` name the same key.
    let max = "k".repeat(255);
    assert_eq!(
        post(&c, &url, &[("idempotency-key", &max)], "{}").await.replayed(),
        Some("false")
    );
    let a = post(&c, &url, &[("idempotency-key", "\"abc\"")], "{}").await;
    let b = post(&c, &url, &[("idempotency-key", "abc")], "{}").await;
    assert_eq!((a.replayed(), b.replayed()), (Some("false"), Some("true")));
    assert_eq!(a.body, b.body);
    let uuid = "550e8400-e29b-41d4-a716-446655440000";
    assert_eq!(
        post(&c, &url, &[("idempotency-key", uuid)], "{}").await.status,
        StatusCode::CREATED
    );
    assert_eq!(up.executions(), 3);
    assert_eq!(outcomes(&c, &proxy).await.get("invalid_key"), Some(&7));
}

#[tokio::test]
async fn keyed_body_over_max_body_is_413() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[idempotency]\nmax_body = \"1KiB\"\n"));
    let c = Client::new();
    let big = "b".repeat(1025);
    // Declared by Content-Length.
    let r = post(&c, &proxy.url("/v1/orders"), &[("idempotency-key", "big")], &big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "request_body_too_large");
    // Chunked: found while reading.
    let mut req = format!(
        "POST /v1/orders HTTP/1.1\r\nhost: {}\r\nidempotency-key: big2\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        proxy.addr
    )
    .into_bytes();
    for _ in 0..3 {
        req.extend_from_slice(format!("{:x}\r\n{}\r\n", 400, "c".repeat(400)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = raw(proxy.addr, &req).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "request_body_too_large");
    assert_eq!(up.executions(), 0);
    // At the limit it passes, chunked or not; no record was left by the 413s.
    let ok = "b".repeat(1024);
    assert_eq!(
        post(&c, &proxy.url("/v1/orders"), &[("idempotency-key", "big")], &ok)
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(up.executions(), 1);
    assert_eq!(outcomes(&c, &proxy).await.get("too_large"), Some(&2));
}

#[tokio::test]
async fn first_request_is_marked_not_replayed() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let r = c.post_key(&proxy.url("/v1/orders"), "first", "{\"a\":1}").await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.replayed(), Some("false"));
    assert_eq!(r.header("x-execution"), Some("1"));
    assert_eq!(r.json()["body"], "{\"a\":1}");
    assert_eq!(r.json()["headers"]["idempotency-key"], "first", "the key is forwarded");
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn held_duplicate_gets_the_same_response() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let url = proxy.url("/v1/orders?delay=600");
    let first = c.spawn_post_key(&url, "held", "{}");
    up.wait_arrived(1).await;
    let dup = c.post_key(&url, "held", "{}").await;
    let first = first.await.unwrap();
    assert_eq!(up.executions(), 1);
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(dup.status, first.status);
    assert_eq!(dup.body, first.body);
    assert_eq!(end_to_end(&dup), end_to_end(&first));
    assert_eq!((first.replayed(), dup.replayed()), (Some("false"), Some("true")));
    assert_eq!(outcomes(&c, &proxy).await.get("coalesced"), Some(&1));
}

#[tokio::test]
async fn duplicate_waiting_longer_than_wait_timeout_is_409() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[idempotency]\nwait_timeout = \"300ms\"\n"));
    let c = Client::new();
    // The upstream holds its answer until the gate opens.
    let url = proxy.url("/v1/orders?gate=1");
    let first = c.spawn_post_key(&url, "slow", "{}");
    up.wait_arrived(1).await;
    let dup = c.post_key(&url, "slow", "{}").await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert_eq!(dup.code(), "idempotency_key_in_use");
    assert_eq!(dup.replayed(), None);
    let after: u64 = dup.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(after >= 1);
    assert!(!first.is_finished(), "the 409 came while the original was running");
    up.open_gate();
    let first = first.await.unwrap();
    assert_eq!(first.replayed(), Some("false"));
    // Once the original is done, the retry is a replay.
    let retry = c.post_key(&url, "slow", "{}").await;
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn wait_timeout_zero_never_waits() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[idempotency]\nwait_timeout = \"0s\"\n"));
    let c = Client::new();
    let url = proxy.url("/v1/orders?gate=1");
    let first = c.spawn_post_key(&url, "nowait", "{}");
    up.wait_arrived(1).await;
    let dup = c.post_key(&url, "nowait", "{}").await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert_eq!(dup.code(), "idempotency_key_in_use");
    let after: u64 = dup.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(after >= 1);
    assert!(!first.is_finished(), "answered without waiting for the original");
    up.open_gate();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn replay_after_completion_is_byte_for_byte() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let url = proxy.url("/v1/orders?cookie=1&status=200");
    let first = c.post_key(&url, "replay", "{\"n\":1}").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.replayed(), Some("false"));
    assert_eq!(
        first.header("set-cookie"),
        Some("session=1"),
        "the first client gets its cookie"
    );
    let replay = c.post_key(&url, "replay", "{\"n\":1}").await;
    assert_eq!(up.executions(), 1);
    assert_eq!(replay.status, first.status);
    assert_eq!(replay.body, first.body);
    assert_eq!(end_to_end(&replay), end_to_end(&first));
    assert_eq!(replay.replayed(), Some("true"));
    assert_eq!(replay.header("set-cookie"), None, "Set-Cookie is never replayed");
    let age: u64 = replay.header("age").expect("Age").parse().unwrap();
    assert!(age < 3600);
    // Date is regenerated, not stored: within a few seconds a replay's Date
    // differs from the original's.
    let original_date = first.header("date").expect("Date").to_owned();
    let mut fresh = false;
    for _ in 0..30 {
        let r = c.post_key(&url, "replay", "{\"n\":1}").await;
        assert_eq!(r.body, first.body);
        assert_eq!(r.replayed(), Some("true"));
        if r.header("date").expect("Date") != original_date {
            fresh = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(fresh, "a replay carries a fresh Date");
    assert_eq!(up.executions(), 1);
    let m = outcomes(&c, &proxy).await;
    assert_eq!(m.get("stored"), Some(&1));
    assert!(m["replayed"] >= 2);
}

#[tokio::test]
async fn hop_by_hop_headers_are_neither_forwarded_nor_stored() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let url = proxy.url("/v1/orders?hop=1");
    let first = c.post_key(&url, "hop", "{}").await;
    let replay = c.post_key(&url, "hop", "{}").await;
    assert_eq!(replay.replayed(), Some("true"));
    for r in [&first, &replay] {
        assert_eq!(r.header("x-end-to-end"), Some("kept"));
        for hop in ["x-up-hop", "keep-alive", "proxy-authenticate", "upgrade", "trailer"] {
            assert_eq!(r.header(hop), None, "{hop} in {:?}", r.headers);
        }
    }
    assert_eq!(end_to_end(&replay), end_to_end(&first));
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn same_key_different_request_is_422() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let k = [("idempotency-key", "reuse")];
    let first = post(&c, &proxy.url("/v1/orders?a=1"), &k, "body").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let other_body = post(&c, &proxy.url("/v1/orders?a=1"), &k, "body!").await;
    let other_path = post(&c, &proxy.url("/v1/other?a=1"), &k, "body").await;
    let other_query = post(&c, &proxy.url("/v1/orders?a=2"), &k, "body").await;
    let other_method = c
        .send(
            Method::PATCH,
            &proxy.url("/v1/orders?a=1"),
            &k,
            Bytes::from_static(b"body"),
        )
        .await;
    for r in [&other_body, &other_path, &other_query, &other_method] {
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(r.code(), "idempotency_key_reused");
        assert_eq!(r.replayed(), None);
    }
    // Headers are not part of the fingerprint.
    let same = post(&c, &proxy.url("/v1/orders?a=1"), &[k[0], ("x-other", "1")], "body").await;
    assert_eq!(same.replayed(), Some("true"));
    assert_eq!(same.body, first.body);
    assert_eq!(up.executions(), 1);
    assert_eq!(outcomes(&c, &proxy).await.get("mismatch"), Some(&4));
}

#[tokio::test]
async fn mismatch_while_in_flight_is_422() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let url = proxy.url("/v1/orders?gate=1");
    let first = c.spawn_post_key(&url, "flying", "one");
    up.wait_arrived(1).await;
    let other = c.post_key(&url, "flying", "two").await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.code(), "idempotency_key_reused");
    assert!(!first.is_finished());
    up.open_gate();
    assert_eq!(first.await.unwrap().replayed(), Some("false"));
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn fingerprint_off_replays_whatever_the_body() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[idempotency]\nfingerprint = false\n"));
    let c = Client::new();
    let a = c.post_key(&proxy.url("/v1/orders"), "nofp", "one").await;
    let b = c.post_key(&proxy.url("/v1/orders"), "nofp", "two").await;
    assert_eq!(b.replayed(), Some("true"));
    assert_eq!(a.body, b.body);
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn non_storable_status_is_delivered_and_frees_the_key() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    // 500, with a duplicate held while it runs.
    let url = proxy.url("/v1/orders?status=500&delay=600");
    let first = c.spawn_post_key(&url, "e500", "{}");
    up.wait_arrived(1).await;
    let held = c.post_key(&url, "e500", "{}").await;
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(first.replayed(), Some("false"));
    assert_eq!(
        held.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "held duplicates share the response"
    );
    assert_eq!(held.body, first.body);
    assert_eq!(held.replayed(), Some("true"));
    assert_eq!(up.executions(), 1);
    assert_eq!(record(&c, &proxy, "anonymous", "e500").await, None, "the key is free");
    let retry = c.post_key(&url, "e500", "{}").await;
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(retry.replayed(), Some("false"));
    assert_eq!(execution(&retry), 2, "the retry executes again");

    // 429 is in never_store.
    let url = proxy.url("/v1/orders?status=429");
    let a = c.post_key(&url, "e429", "{}").await;
    let b = c.post_key(&url, "e429", "{}").await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::TOO_MANY_REQUESTS, StatusCode::TOO_MANY_REQUESTS)
    );
    assert_eq!((a.replayed(), b.replayed()), (Some("false"), Some("false")));
    assert_ne!(a.body, b.body);
    assert_eq!(up.executions(), 4);
    assert_eq!(outcomes(&c, &proxy).await.get("not_stored"), Some(&4));
}

#[tokio::test]
async fn refused_upstream_is_502_and_frees_the_key() {
    let port = free_port();
    let proxy = Proxy::start(&config(&format!("http://127.0.0.1:{port}"), ""));
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let r = c.post_key(&url, "refused", "{}").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.code(), "upstream_unavailable");
    assert_eq!(r.replayed(), None);
    assert_eq!(record(&c, &proxy, "anonymous", "refused").await, None);
    // The upstream comes up on that port: the retry executes.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let count = serve_counting(listener);
    let retry = c.post_key(&url, "refused", "{}").await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.replayed(), Some("false"));
    assert_eq!(&retry.body[..], b"late upstream 1");
    let again = c.post_key(&url, "refused", "{}").await;
    assert_eq!(again.replayed(), Some("true"));
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn upstream_timeout_then_outcome_unknown_with_reject() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&conf(&up.url(), "500ms", "", ""));
    let c = Client::new();
    let url = proxy.url("/v1/orders?hang=1");
    let first = c.spawn_post_key(&url, "hung", "{}");
    up.wait_arrived(1).await;
    let held = c.post_key(&url, "hung", "{}").await;
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(first.code(), "upstream_timeout");
    assert_eq!(
        held.status,
        StatusCode::GATEWAY_TIMEOUT,
        "waiting clients get the 504 too"
    );
    assert_eq!(held.code(), "upstream_timeout");
    for _ in 0..2 {
        let retry = c.post_key(&url, "hung", "{}").await;
        assert_eq!(retry.status, StatusCode::CONFLICT);
        assert_eq!(retry.code(), "outcome_unknown");
    }
    assert_eq!(record(&c, &proxy, "anonymous", "hung").await.unwrap()["state"], "lost");
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn upstream_timeout_then_executes_again_with_retry() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&conf(
        &up.url(),
        "500ms",
        "",
        "[idempotency]\non_lost_outcome = \"retry\"\n",
    ));
    let c = Client::new();
    let url = proxy.url("/v1/orders?hang=1");
    let first = c.post_key(&url, "hung", "{}").await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(first.code(), "upstream_timeout");
    assert_eq!(record(&c, &proxy, "anonymous", "hung").await, None);
    let retry = c.post_key(&url, "hung", "{}").await;
    assert_eq!(retry.code(), "upstream_timeout");
    assert_eq!(up.executions(), 2, "the retry executed again");
}

#[tokio::test]
async fn broken_upstream_connection_is_502_outcome_unknown() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let url = proxy.url("/v1/orders?close=1");
    let first = c.post_key(&url, "broken", "{}").await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert_eq!(first.code(), "upstream_unavailable");
    let retry = c.post_key(&url, "broken", "{}").await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(retry.code(), "outcome_unknown");
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn more_than_max_waiters_is_409() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[idempotency]\nmax_waiters = 2\n"));
    let c = Client::new();
    let url = proxy.url("/v1/orders?gate=1");
    let first = c.spawn_post_key(&url, "crowd", "{}");
    up.wait_arrived(1).await;
    let mut dups = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let (c, url) = (c.clone(), url.clone());
        dups.spawn(async move { c.post_key(&url, "crowd", "{}").await });
    }
    let mut all = Vec::new();
    // The refused come back while the original is held at the gate (if the
    // proxy held them all instead, upstream.timeout ends this loop).
    while all.iter().filter(|r: &&Resp| r.status == StatusCode::CONFLICT).count() < 3 {
        let Some(r) = dups.join_next().await else { break };
        all.push(r.unwrap());
    }
    assert!(!first.is_finished());
    up.open_gate();
    while let Some(r) = dups.join_next().await {
        all.push(r.unwrap());
    }
    let (refused, held): (Vec<Resp>, Vec<Resp>) = all.into_iter().partition(|r| r.status == StatusCode::CONFLICT);
    for r in &refused {
        assert_eq!(r.code(), "idempotency_key_in_use");
        assert!(r.header("retry-after").is_some());
    }
    let refused = refused.len();
    let first = first.await.unwrap();
    assert_eq!(refused, 3, "two may wait, the other three are refused");
    assert_eq!(held.len(), 2);
    for r in &held {
        assert_eq!(r.body, first.body);
        assert_eq!(r.replayed(), Some("true"));
    }
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn response_over_max_response_body_is_delivered_but_not_replayable() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[idempotency]\nmax_response_body = \"64KiB\"\n"));
    let c = Client::new();
    let url = proxy.url("/v1/export?size=300000");
    let first = c.post_key(&url, "huge", "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.replayed(), Some("false"));
    assert_eq!(first.body.len(), 300_000, "delivered whole");
    assert!(first.body.iter().all(|&b| b == b'x'));
    let retry = c.post_key(&url, "huge", "{}").await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(retry.code(), "response_not_replayable");
    assert_eq!(up.executions(), 1);
    let rec = record(&c, &proxy, "anonymous", "huge").await.unwrap();
    assert_eq!(rec["state"], "completed");
    assert_eq!(rec["status"], 201);
    // Exactly at the limit it is replayable.
    let url = proxy.url("/v1/export?size=65536");
    let a = c.post_key(&url, "fits", "{}").await;
    let b = c.post_key(&url, "fits", "{}").await;
    assert_eq!(b.replayed(), Some("true"));
    assert_eq!(a.body, b.body);
    assert_eq!(up.executions(), 2);
}

#[tokio::test]
async fn key_older_than_ttl_executes_again() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[idempotency]\nttl = \"1s\"\n"));
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let first = c.post_key(&url, "old", "{}").await;
    assert_eq!(first.replayed(), Some("false"));
    // Kept for exactly ttl (when that is over is the proxy's clock, so the
    // test reads it instead of guessing it).
    if let Some(rec) = record(&c, &proxy, "anonymous", "old").await {
        let stored = humantime::parse_rfc3339(rec["stored_at"].as_str().unwrap()).unwrap();
        let expires = humantime::parse_rfc3339(rec["expires_at"].as_str().unwrap()).unwrap();
        assert_eq!(expires.duration_since(stored).unwrap(), Duration::from_secs(1));
    }
    let mut again = None;
    for _ in 0..40 {
        let r = c.post_key(&url, "old", "{}").await;
        if r.replayed() == Some("false") {
            again = Some(r);
            break;
        }
        assert_eq!(r.replayed(), Some("true"));
        assert_eq!(r.body, first.body, "until it expires the key replays");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = again.expect("the key executed again after its ttl");
    assert_eq!(execution(&again), 2);
    assert_eq!(up.executions(), 2);
}

#[tokio::test]
async fn client_disconnect_does_not_cancel_the_original() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let req = format!(
        "POST /v1/orders?delay=400 HTTP/1.1\r\nhost: {}\r\nidempotency-key: walked-away\r\ncontent-length: 2\r\n\r\n{{}}",
        proxy.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    up.wait_arrived(1).await;
    drop(s);
    // The proxy finishes the upstream call and stores the result.
    let mut state = serde_json::Value::Null;
    for _ in 0..60 {
        state = record(&c, &proxy, "anonymous", "walked-away").await.expect("claimed")["state"].clone();
        if state == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, "completed");
    let retry = c
        .post_key(&proxy.url("/v1/orders?delay=400"), "walked-away", "{}")
        .await;
    assert_eq!(retry.replayed(), Some("true"), "the retry is a replay");
    assert_eq!(execution(&retry), 1);
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn keyed_requests_over_h2c() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::h2c();
    let url = proxy.url("/v1/orders?cookie=1");
    let first = c.post_key(&url, "h2", "{}").await;
    let replay = c.post_key(&url, "h2", "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!((first.replayed(), replay.replayed()), (Some("false"), Some("true")));
    assert_eq!(replay.body, first.body);
    assert_eq!(end_to_end(&replay), end_to_end(&first));
    assert_eq!(first.json()["version"], "HTTP/1.1", "the upstream side is HTTP/1.1");
    // An HTTP/1.1 retry of the same key replays the same bytes.
    let h1 = Client::new().post_key(&url, "h2", "{}").await;
    assert_eq!(h1.body, first.body);
    assert_eq!(up.executions(), 1);
}

/// The in-memory backend applies the same rules as sled (the tests above
/// all run on sled).
#[tokio::test]
async fn memory_backend_follows_the_same_rules() {
    let up = Upstream::start().await;
    let cfg = format!(
        "[upstream]\nurl = \"{}\"\ntimeout = \"500ms\"\n\n[store]\nbackend = \"memory\"\nsweep_interval = \"200ms\"\n\n\
         [[routes]]\npath = \"/short\"\nttl = \"300ms\"\n\n[[routes]]\npath = \"/*\"\n",
        up.url()
    );
    let proxy = Proxy::start(&cfg);
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let a = c.post_key(&url, "m", "1").await;
    let b = c.post_key(&url, "m", "1").await;
    assert_eq!((a.replayed(), b.replayed()), (Some("false"), Some("true")));
    assert_eq!(a.body, b.body);
    assert_eq!(c.post_key(&url, "m", "2").await.code(), "idempotency_key_reused");
    assert_eq!(
        record(&c, &proxy, "anonymous", "m").await.unwrap()["state"],
        "completed"
    );
    // Not storable: freed.
    let e = proxy.url("/v1/orders?status=503");
    c.post_key(&e, "e", "").await;
    assert_eq!(execution(&c.post_key(&e, "e", "").await), 3);
    // Outcome unknown: rejected.
    let h = proxy.url("/v1/orders?hang=1");
    assert_eq!(c.post_key(&h, "h", "").await.code(), "upstream_timeout");
    assert_eq!(c.post_key(&h, "h", "").await.code(), "outcome_unknown");
    assert_eq!(record(&c, &proxy, "anonymous", "h").await.unwrap()["state"], "lost");
    assert_eq!(
        delete_record(&c, &proxy, "anonymous", "h").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(c.post_key(&h, "h", "").await.code(), "upstream_timeout");
    assert_eq!(up.executions(), 5);
    // Expiry and the sweeper.
    let s = proxy.url("/short");
    c.post_key(&s, "s", "").await;
    let mut swept = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if sample(&c, &proxy, "idemproxy_store_expired_records_total").await >= 1.0 {
            swept = true;
            break;
        }
    }
    assert!(swept, "the sweeper deleted the expired record");
    assert_eq!(record(&c, &proxy, "anonymous", "s").await, None);
    assert_eq!(c.post_key(&s, "s", "").await.replayed(), Some("false"));
    assert_eq!(up.executions(), 7);
}

// ----------------------------------------------------------- route rules

#[tokio::test]
async fn route_rules_first_match_wins() {
    let up = Upstream::start().await;
    let routes = r#"
[[routes]]
path = "/internal/*"
enabled = false

[[routes]]
path = "/exact"
required = true

[[routes]]
path = "/p/*"
methods = ["POST"]
required = true

[[routes]]
path = "/p/*"
methods = ["PUT"]

[[routes]]
path = "/*"
methods = ["POST"]
"#;
    let proxy = Proxy::start(&config(&up.url(), routes));
    let c = Client::new();

    // `/p/*` (first match) requires a key; `/*` would not.
    assert_eq!(
        post(&c, &proxy.url("/p/x"), &[], "").await.code(),
        "idempotency_key_missing"
    );
    assert_eq!(
        post(&c, &proxy.url("/p/"), &[], "").await.code(),
        "idempotency_key_missing"
    );
    // `/p` is not under `/p/*`: the catch-all takes it, no key needed.
    let r = post(&c, &proxy.url("/p"), &[], "").await;
    assert_eq!((r.status, r.replayed()), (StatusCode::CREATED, None));
    assert_eq!(
        post(&c, &proxy.url("/exact"), &[], "").await.code(),
        "idempotency_key_missing"
    );
    assert_eq!(
        post(&c, &proxy.url("/exact/sub"), &[], "").await.status,
        StatusCode::CREATED
    );
    assert_eq!(up.executions(), 2);

    // Methods pick the route: PUT goes to the second `/p/*` route (keyed,
    // not required); GET matches no route (pass-through even with a key).
    let a = c.send(Method::PUT, &proxy.url("/p/y"), &key("put"), Bytes::new()).await;
    let b = c.send(Method::PUT, &proxy.url("/p/y"), &key("put"), Bytes::new()).await;
    assert_eq!((a.replayed(), b.replayed()), (Some("false"), Some("true")));
    assert_eq!(
        c.send(Method::PUT, &proxy.url("/p/y"), &[], Bytes::new())
            .await
            .replayed(),
        None
    );
    let g1 = c.send(Method::GET, &proxy.url("/p/y"), &key("get"), Bytes::new()).await;
    let g2 = c.send(Method::GET, &proxy.url("/p/y"), &key("get"), Bytes::new()).await;
    assert_eq!((g1.replayed(), g2.replayed()), (None, None));
    assert_ne!(g1.body, g2.body);
    assert_eq!(up.executions(), 6);

    // A disabled route is plain pass-through, even though `/*` follows.
    let i1 = post(&c, &proxy.url("/internal/job"), &key("int"), "").await;
    let i2 = post(&c, &proxy.url("/internal/job"), &key("int"), "").await;
    assert_eq!((i1.replayed(), i2.replayed()), (None, None));
    assert_eq!(up.executions(), 8);

    // Keyed requests on `/p/x` and the catch-all are handled.
    let k1 = post(&c, &proxy.url("/p/x"), &key("px"), "").await;
    let k2 = post(&c, &proxy.url("/p/x"), &key("px"), "").await;
    assert_eq!(k2.replayed(), Some("true"));
    assert_eq!(k1.body, k2.body);
    let o1 = post(&c, &proxy.url("/other"), &key("other"), "").await;
    let o2 = post(&c, &proxy.url("/other"), &key("other"), "").await;
    assert_eq!(o2.replayed(), Some("true"));
    assert_eq!(o1.body, o2.body);
    assert_eq!(up.executions(), 10);
}

#[tokio::test]
async fn route_values_inherit_and_override_idempotency() {
    let up = Upstream::start().await;
    let cfg = r#"
[idempotency]
required = true
header = "X-Request-Key"

[[routes]]
path = "/a"

[[routes]]
path = "/b"
required = false
"#;
    let proxy = Proxy::start(&config(&up.url(), cfg));
    let c = Client::new();
    assert_eq!(
        post(&c, &proxy.url("/a"), &[], "").await.code(),
        "idempotency_key_missing"
    );
    assert_eq!(post(&c, &proxy.url("/b"), &[], "").await.replayed(), None);
    let a = post(&c, &proxy.url("/a"), &[("x-request-key", "h")], "").await;
    let b = post(&c, &proxy.url("/a"), &[("x-request-key", "h")], "").await;
    assert_eq!((a.replayed(), b.replayed()), (Some("false"), Some("true")));
    assert_eq!(up.executions(), 2);
}

// --------------------------------------------------------------- tenants

#[tokio::test]
async fn tenants_by_authorization_never_share_responses() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let alice = [("idempotency-key", "shared"), ("authorization", "Bearer alice")];
    let bob = [("idempotency-key", "shared"), ("authorization", "Bearer bob")];
    let a1 = post(&c, &url, &alice, "{}").await;
    let b1 = post(&c, &url, &bob, "{}").await;
    assert_eq!((a1.replayed(), b1.replayed()), (Some("false"), Some("false")));
    assert_eq!(up.executions(), 2, "the same key from two tenants is two operations");
    let a2 = post(&c, &url, &alice, "{}").await;
    let b2 = post(&c, &url, &bob, "{}").await;
    assert_eq!((a2.replayed(), b2.replayed()), (Some("true"), Some("true")));
    assert_eq!(a2.body, a1.body);
    assert_eq!(b2.body, b1.body);
    assert_ne!(a2.body, b1.body, "never the other tenant's body");
    assert_eq!(a1.json()["headers"]["authorization"], "Bearer alice");
    assert_eq!(b2.json()["headers"]["authorization"], "Bearer bob");
    // Without Authorization: anonymous, a third operation.
    let anon = c.post_key(&url, "shared", "{}").await;
    assert_eq!(execution(&anon), 3);
    assert_eq!(up.executions(), 3);
    // The records API names tenants as the proxy computes them.
    for (tenant, exec) in [(auth_tenant("Bearer alice"), 1), (auth_tenant("Bearer bob"), 2)] {
        let rec = record(&c, &proxy, &tenant, "shared").await.expect("recorded");
        assert_eq!(rec["state"], "completed");
        assert_eq!(rec["status"], 201, "execution {exec}");
    }
    assert!(record(&c, &proxy, "anonymous", "shared").await.is_some());
    assert_eq!(record(&c, &proxy, "default", "shared").await, None);
}

#[tokio::test]
async fn tenants_in_flight_at_once_are_not_coalesced() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let url = proxy.url("/v1/orders?gate=1");
    let send = |who: &'static str| {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, &[("idempotency-key", "same"), ("authorization", who)], "{}").await })
    };
    let alice = send("Bearer alice");
    up.wait_arrived(1).await;
    let bob = send("Bearer bob");
    // Bob's request reaches the upstream while Alice's is still held there:
    // it was not held behind hers.
    up.wait_arrived(2).await;
    up.open_gate();
    let (alice, bob) = (alice.await.unwrap(), bob.await.unwrap());
    assert_eq!((alice.replayed(), bob.replayed()), (Some("false"), Some("false")));
    assert_ne!(alice.body, bob.body);
    assert_eq!(alice.json()["headers"]["authorization"], "Bearer alice");
    assert_eq!(bob.json()["headers"]["authorization"], "Bearer bob");
    assert_eq!(up.executions(), 2);
}

#[tokio::test]
async fn tenants_by_header_and_none() {
    let up = Upstream::start().await;
    let cfg = r#"
[[routes]]
path = "/h/*"
tenant = { from = "header", name = "X-Tenant-Id" }

[[routes]]
path = "/n/*"
tenant = { from = "none" }
"#;
    let proxy = Proxy::start(&config(&up.url(), cfg));
    let c = Client::new();
    let acme = [("idempotency-key", "k"), ("x-tenant-id", "acme")];
    let globex = [("idempotency-key", "k"), ("x-tenant-id", "globex")];
    let a = post(&c, &proxy.url("/h/x"), &acme, "").await;
    let g = post(&c, &proxy.url("/h/x"), &globex, "").await;
    let a2 = post(&c, &proxy.url("/h/x"), &acme, "").await;
    let none = post(&c, &proxy.url("/h/x"), &[("idempotency-key", "k")], "").await;
    assert_eq!((execution(&a), execution(&g), execution(&none)), (1, 2, 3));
    assert_eq!(a2.body, a.body);
    assert_eq!(a2.replayed(), Some("true"));
    assert_eq!(
        record(&c, &proxy, "header:acme", "k").await.unwrap()["state"],
        "completed"
    );
    assert_eq!(
        record(&c, &proxy, "header:globex", "k").await.unwrap()["state"],
        "completed"
    );
    assert_eq!(
        record(&c, &proxy, "anonymous", "k").await.unwrap()["state"],
        "completed"
    );

    // `none`: one tenant for everybody, whatever Authorization says.
    let x = post(
        &c,
        &proxy.url("/n/x"),
        &[("idempotency-key", "k"), ("authorization", "Bearer x")],
        "",
    )
    .await;
    let y = post(
        &c,
        &proxy.url("/n/x"),
        &[("idempotency-key", "k"), ("authorization", "Bearer y")],
        "",
    )
    .await;
    assert_eq!(y.replayed(), Some("true"));
    assert_eq!(x.body, y.body);
    assert_eq!(record(&c, &proxy, "default", "k").await.unwrap()["state"], "completed");
    assert_eq!(up.executions(), 4);
}

// ------------------------------------------------------------------ load

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_duplicates_execute_once() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let url = proxy.url("/v1/orders?delay=300");
    let start = std::time::Instant::now();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { c.post_key(&url, "herd", "{\"amount\":100}").await })
        })
        .collect();
    let mut responses = Vec::new();
    for t in tasks {
        responses.push(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    assert_eq!(up.executions(), 1, "exactly one execution");
    let body = &responses[0].body;
    assert!(responses
        .iter()
        .all(|r| r.status == StatusCode::CREATED && r.body == *body));
    let replayed = responses.iter().filter(|r| r.replayed() == Some("true")).count();
    let original = responses.iter().filter(|r| r.replayed() == Some("false")).count();
    assert_eq!((original, replayed), (1, 199));
    let m = outcomes(&c, &proxy).await;
    assert_eq!(m.get("stored"), Some(&1));
    assert_eq!(m.get("coalesced").unwrap_or(&0) + m.get("replayed").unwrap_or(&0), 199);
    eprintln!(
        "200 duplicates: {elapsed:?}, 1 execution, {} coalesced, {} replayed from the store",
        m.get("coalesced").unwrap_or(&0),
        m.get("replayed").unwrap_or(&0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_load_executes_each_key_once() {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    const KEYS: usize = 300;
    const DUPLICATES: usize = 4;
    const CLIENTS: usize = 48;
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1de4);
    let delays: Vec<u64> = (0..KEYS).map(|_| rng.gen_range(0..30)).collect();
    let mut work: Vec<usize> = (0..KEYS).flat_map(|k| std::iter::repeat_n(k, DUPLICATES)).collect();
    work.shuffle(&mut rng);
    let work = Arc::new(work);
    let next = Arc::new(AtomicUsize::new(0));
    let delays = Arc::new(delays);
    let start = std::time::Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (work, next, delays) = (work.clone(), next.clone(), delays.clone());
            let url = proxy.url("/v1/mix");
            tokio::spawn(async move {
                let c = Client::new();
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&k) = work.get(i) else { return out };
                    let r = c
                        .post_key(
                            &format!("{url}?delay={}", delays[k]),
                            &format!("mix-{k}"),
                            &format!("{{\"k\":{k}}}"),
                        )
                        .await;
                    out.push((k, r));
                }
            })
        })
        .collect();
    let mut by_key: Vec<Vec<Resp>> = vec![Vec::new(); KEYS];
    for w in workers {
        for (k, r) in w.await.unwrap() {
            by_key[k].push(r);
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(up.executions(), KEYS, "executions == keys");
    for (k, rs) in by_key.iter().enumerate() {
        assert_eq!(rs.len(), DUPLICATES);
        assert!(
            rs.iter()
                .all(|r| r.status == StatusCode::CREATED && r.body == rs[0].body),
            "key {k}"
        );
        assert_eq!(
            rs[0].json()["body"],
            format!("{{\"k\":{k}}}"),
            "key {k} got its own response"
        );
        let originals = rs.iter().filter(|r| r.replayed() == Some("false")).count();
        assert_eq!(originals, 1, "key {k}: one original, the rest replayed");
    }
    eprintln!(
        "mixed load: {} requests over {KEYS} keys by {CLIENTS} clients in {elapsed:?}, {} executions",
        KEYS * DUPLICATES,
        up.executions()
    );
}

// ----------------------------------------------------- §4 admin and metrics

#[tokio::test]
async fn records_api_states_and_delete() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&conf(&up.url(), "500ms", "", "[idempotency]\nttl = \"1h\"\n"));
    let c = Client::new();
    assert_eq!(record(&c, &proxy, "anonymous", "unknown").await, None);
    let unknown = c
        .get(&proxy.admin_url("/v1/records?tenant=anonymous&key=unknown"))
        .await;
    assert_eq!(unknown.code(), "idempotency_key_unknown");
    assert_eq!(
        delete_record(&c, &proxy, "anonymous", "unknown").await,
        StatusCode::NOT_FOUND
    );

    // in_flight while the upstream works.
    let url = proxy.url("/v1/orders?gate=1");
    let first = c.spawn_post_key(&url, "rec", "{}");
    up.wait_arrived(1).await;
    let rec = record(&c, &proxy, "anonymous", "rec").await.unwrap();
    assert_eq!(rec["state"], "in_flight");
    assert_eq!(rec["status"], serde_json::Value::Null);
    let stored = humantime::parse_rfc3339(rec["stored_at"].as_str().unwrap()).expect("RFC 3339 UTC");
    let expires = humantime::parse_rfc3339(rec["expires_at"].as_str().unwrap()).expect("RFC 3339 UTC");
    // An in-flight record expires ttl after it was created.
    assert_eq!(expires.duration_since(stored).unwrap(), Duration::from_secs(3600));
    up.open_gate();
    first.await.unwrap();

    // completed, with the response's status and the ttl window.
    let rec = record(&c, &proxy, "anonymous", "rec").await.unwrap();
    assert_eq!(rec["state"], "completed");
    assert_eq!(rec["status"], 201);
    let stored = humantime::parse_rfc3339(rec["stored_at"].as_str().unwrap()).unwrap();
    let expires = humantime::parse_rfc3339(rec["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires.duration_since(stored).unwrap(), Duration::from_secs(3600));
    assert!(!rec.as_object().unwrap().contains_key("body"), "never bodies");

    // DELETE frees the key: the next request executes again.
    assert_eq!(
        delete_record(&c, &proxy, "anonymous", "rec").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(record(&c, &proxy, "anonymous", "rec").await, None);
    assert_eq!(
        delete_record(&c, &proxy, "anonymous", "rec").await,
        StatusCode::NOT_FOUND
    );
    let again = c.post_key(&url, "rec", "{}").await;
    assert_eq!(again.replayed(), Some("false"));
    assert_eq!(execution(&again), 2);

    // lost: the upstream timed out (reject).
    let lost = c.post_key(&proxy.url("/v1/orders?hang=1"), "gone", "{}").await;
    assert_eq!(lost.code(), "upstream_timeout");
    let rec = record(&c, &proxy, "anonymous", "gone").await.unwrap();
    assert_eq!(rec["state"], "lost");
    assert_eq!(rec["status"], serde_json::Value::Null);
    let stored = humantime::parse_rfc3339(rec["stored_at"].as_str().unwrap()).unwrap();
    let expires = humantime::parse_rfc3339(rec["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires.duration_since(stored).unwrap(), Duration::from_secs(3600));
    assert_eq!(
        delete_record(&c, &proxy, "anonymous", "gone").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(up.executions(), 3);

    // Both parameters are required.
    let bad = c.get(&proxy.admin_url("/v1/records?tenant=anonymous")).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(c.get(&proxy.admin_url("/healthz")).await.status, StatusCode::OK);
    assert_eq!(c.get(&proxy.admin_url("/readyz")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn ttl_expiry_and_sweeper() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&conf(
        &up.url(),
        "5s",
        "sweep_interval = \"200ms\"",
        "[idempotency]\nttl = \"300ms\"\n",
    ));
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let first = c.post_key(&url, "short", "{}").await;
    assert_eq!(first.replayed(), Some("false"));
    // The sweeper deletes it (counted), and the records API forgets it.
    let mut swept = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if sample(&c, &proxy, "idemproxy_store_expired_records_total").await >= 1.0 {
            swept = true;
            break;
        }
    }
    assert!(swept, "the sweeper deleted the expired record");
    assert_eq!(record(&c, &proxy, "anonymous", "short").await, None);
    assert_eq!(
        delete_record(&c, &proxy, "anonymous", "short").await,
        StatusCode::NOT_FOUND
    );
    let again = c.post_key(&url, "short", "{}").await;
    assert_eq!(again.replayed(), Some("false"));
    assert_eq!(up.executions(), 2);
}

/// Before the sweeper runs, an expired record is already unknown to the
/// records API: GET and DELETE agree on 404.
#[tokio::test]
async fn expired_record_is_unknown_before_the_sweep() {
    let up = Upstream::start().await;
    for backend in ["sled", "memory"] {
        let store = if backend == "memory" {
            "[store]\nbackend = \"memory\"\nsweep_interval = \"1h\"\n".to_owned()
        } else {
            "[store]\npath = \"{dir}/data\"\nsweep_interval = \"1h\"\n".to_owned()
        };
        let cfg = format!(
            "[upstream]\nurl = \"{}\"\n\n{store}\n[idempotency]\nttl = \"300ms\"\n",
            up.url()
        );
        let proxy = Proxy::start(&cfg);
        let c = Client::new();
        c.post_key(&proxy.url("/v1/orders"), "brief", "{}").await;
        let mut gone = false;
        for _ in 0..50 {
            if record(&c, &proxy, "anonymous", "brief").await.is_none() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(gone, "{backend}: the record expired");
        assert_eq!(
            delete_record(&c, &proxy, "anonymous", "brief").await,
            StatusCode::NOT_FOUND,
            "{backend}: DELETE of an expired record"
        );
    }
}

#[tokio::test]
async fn metrics_count_outcomes() {
    let up = Upstream::start().await;
    let routes = r#"
[[routes]]
path = "/nowait"
wait_timeout = "0s"

[[routes]]
path = "/*"
"#;
    let proxy = Proxy::start(&config(&up.url(), routes));
    let c = Client::new();
    // stored, then replayed.
    c.post_key(&proxy.url("/m"), "a", "1").await;
    c.post_key(&proxy.url("/m"), "a", "1").await;
    // coalesced.
    let slow = proxy.url("/m?delay=600");
    let leader = tokio::spawn({
        let (c, url) = (c.clone(), slow.clone());
        async move { c.post_key(&url, "b", "").await }
    });
    up.wait_arrived(2).await;
    assert_eq!(c.post_key(&slow, "b", "").await.replayed(), Some("true"));
    leader.await.unwrap();
    // conflict.
    let nowait = proxy.url("/nowait?gate=1");
    let leader = tokio::spawn({
        let (c, url) = (c.clone(), nowait.clone());
        async move { c.post_key(&url, "c", "").await }
    });
    up.wait_arrived(3).await;
    assert_eq!(c.post_key(&nowait, "c", "").await.code(), "idempotency_key_in_use");
    up.open_gate();
    leader.await.unwrap();
    // mismatch.
    assert_eq!(
        c.post_key(&proxy.url("/m"), "a", "2").await.code(),
        "idempotency_key_reused"
    );

    let m = outcomes(&c, &proxy).await;
    for (outcome, n) in [
        ("stored", 3),
        ("replayed", 1),
        ("coalesced", 1),
        ("conflict", 1),
        ("mismatch", 1),
    ] {
        assert_eq!(m.get(outcome), Some(&n), "{outcome}: {m:?}");
    }
    assert_eq!(m.values().sum::<u64>(), 7, "{m:?}");
    assert_eq!(sample(&c, &proxy, "idemproxy_inflight").await, 0.0);
    assert_eq!(
        sample(&c, &proxy, "idemproxy_request_duration_seconds_count").await,
        7.0
    );
    assert_eq!(up.executions(), 3);
}

#[tokio::test]
async fn logs_never_contain_the_raw_key() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&conf(&up.url(), "500ms", "", ""));
    let c = Client::new();
    let key = "raw-KEY-must-not-leak-7f3a9";
    let url = proxy.url("/v1/orders");
    c.post_key(&url, key, "1").await;
    c.post_key(&url, key, "1").await;
    c.post_key(&url, key, "2").await;
    c.post_key(&proxy.url("/v1/orders?hang=1"), key, "1").await;
    c.post_key(&proxy.url("/v1/orders?status=500"), &format!("{key}-x"), "1")
        .await;
    // The hash the logs carry instead: SHA-256 of tenant, NUL, key.
    let mut h = Sha256::new();
    h.update(b"anonymous\0");
    h.update(key.as_bytes());
    let label = hex::encode(&h.finalize()[..8]);
    let mut logs = String::new();
    for _ in 0..50 {
        logs = proxy.stderr();
        if logs.contains(&label) && logs.contains("upstream exchange failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        logs.contains(&label),
        "requests are logged with the key's hash:\n{logs}"
    );
    assert!(!logs.contains(key), "the raw key leaked into the logs:\n{logs}");
    assert!(!logs.contains("must-not-leak"), "part of the raw key leaked:\n{logs}");
    let metrics = c.get(&proxy.admin_url("/metrics")).await;
    assert!(!String::from_utf8_lossy(&metrics.body).contains("must-not-leak"));
}

/// A correct retry must never be refused because a request with another body
/// happens to lead the in-process flight while it asks the store: the store,
/// not the other request, decides. Fired together many times, every correct
/// retry replays and every different body gets 422.
#[tokio::test]
async fn correct_retries_racing_a_mismatched_request_still_replay() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let first = c.post_key(&url, "race", "right").await;
    assert_eq!(first.status, StatusCode::CREATED);
    for round in 0..20 {
        let mut tasks = Vec::new();
        for i in 0..16 {
            let (c, url) = (c.clone(), url.clone());
            let body = if (i + round) % 2 == 0 { "right" } else { "wrong" };
            tasks.push(tokio::spawn(
                async move { (body, c.post_key(&url, "race", body).await) },
            ));
        }
        for t in tasks {
            let (body, r) = t.await.unwrap();
            if body == "right" {
                assert_eq!(
                    r.status,
                    StatusCode::CREATED,
                    "round {round}: a correct retry got {:?}",
                    r.body
                );
                assert_eq!(r.body, first.body);
                assert_eq!(r.replayed(), Some("true"));
            } else {
                assert_eq!(r.code(), "idempotency_key_reused", "round {round}");
            }
        }
    }
    assert_eq!(up.executions(), 1);
}
