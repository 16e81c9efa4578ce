//! The bound on keyed work in progress (SPEC §3, issue 10 item 3):
//! `server.max_keyed_requests` counts every keyed request from before its
//! body is read until its work is done, detached leaders whose client went
//! away and held duplicates included; `server.max_keyed_buffer` counts the
//! bytes of the bodies they hold. Past either bound a keyed request gets 503
//! `overloaded` and nothing is forwarded; pass-through is not affected.

mod support;

use std::future::Future;
use std::time::{Duration, Instant};

use http::Method;
use support::*;

/// Polls `f` every 20 ms until it yields `true`, for at most 10 s.
async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_overloaded(r: &Resp) {
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.code(), "overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.replayed(), None);
}

#[tokio::test]
async fn detached_leaders_and_held_duplicates_count_against_max_keyed_requests() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[server]\nmax_keyed_requests = 3\n"));
    let c = Client::new();

    // A stored key, replayed below as a probe that executes nothing.
    assert_eq!(c.post_key(&proxy.url("/r"), "stored", "{}").await.status, 201);
    let probe = || async { c.post_key(&proxy.url("/r"), "stored", "{}").await };

    // Two leaders held at the upstream, whose clients then disconnect: their
    // work goes on in detached tasks, and so do their places.
    let a = c.spawn_post_key(&proxy.url("/x?gate=1"), "a", "{}");
    let b = c.spawn_post_key(&proxy.url("/x?gate=1"), "b", "{}");
    up.wait_arrived(3).await;
    a.abort();
    b.abort();
    assert_eq!(probe().await.replayed(), Some("true"), "one place is still free");

    // A duplicate of `a` held in the proxy takes the last place.
    let held = c.spawn_post_key(&proxy.url("/x?gate=1"), "a", "{}");
    until("the held duplicate to take the last place", || async {
        probe().await.status == 503
    })
    .await;

    let fresh = c.post_key(&proxy.url("/x"), "c", "{}").await;
    assert_overloaded(&fresh);
    assert_eq!(up.executions(), 3, "nothing forwarded past the bound");
    // Requests without idempotency handling are not bounded by it.
    let pass = c.send(Method::GET, &proxy.url("/pass"), &[], "").await;
    assert_eq!(pass.status, 201);
    assert_eq!(up.executions(), 4);

    // Once the leaders finish, the places come back.
    up.open_gate();
    let held = held.await.unwrap();
    assert_eq!((held.status.as_u16(), held.replayed()), (201, Some("true")));
    until("the detached leaders to finish", || async {
        c.post_key(&proxy.url("/x"), "c", "{}").await.status == 201
    })
    .await;
    assert_eq!(up.executions(), 5, "a, b, the pass-through, stored and c: each once");
}

#[tokio::test]
async fn buffered_bodies_count_against_max_keyed_buffer() {
    let up = Upstream::start().await;
    let extra = "[server]\nmax_keyed_buffer = \"64KiB\"\n\n[idempotency]\nmax_body = \"40KiB\"\n";
    let proxy = Proxy::start(&config(&up.url(), extra));
    let c = Client::new();
    let body = |kib: usize| "x".repeat(kib * 1024);

    let a = c.spawn_post_key(&proxy.url("/x?gate=1"), "a", &body(40));
    up.wait_arrived(1).await;
    // 40 KiB held: 30 more do not fit, 20 do.
    assert_overloaded(&c.post_key(&proxy.url("/x?gate=1"), "b", &body(30)).await);
    let small = c.spawn_post_key(&proxy.url("/x?gate=1"), "c", &body(20));
    up.wait_arrived(2).await;
    // A held duplicate's copy of the body counts too.
    assert_overloaded(&c.post_key(&proxy.url("/x?gate=1"), "a", &body(40)).await);
    assert_eq!(up.executions(), 2);

    up.open_gate();
    assert_eq!(a.await.unwrap().status, 201);
    assert_eq!(small.await.unwrap().status, 201);
    until("the buffer to drain", || async {
        c.post_key(&proxy.url("/x"), "b", &body(30)).await.status == 201
    })
    .await;
    assert_eq!(up.executions(), 3);
}

#[tokio::test]
async fn a_buffer_smaller_than_max_body_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = "[server]\nmax_keyed_buffer = \"1MiB\"\n\n[upstream]\nurl = \"http://127.0.0.1:1\"\n\n[[routes]]\npath = \"/big/*\"\nmax_body = \"2MiB\"\n";
    std::fs::write(&path, text).unwrap();
    let (code, _, err) = run_cli(&["check", "--config", path.to_str().unwrap()], &[], dir.path());
    assert_ne!(code, 0);
    assert!(
        err.contains("bad.toml") && err.contains("server.max_keyed_buffer"),
        "{err}"
    );
}
