//! Durability against the real binary on a sled store: a graceful restart
//! keeps replays, a SIGKILL mid-flight leaves the key `lost` and
//! `on_lost_outcome` decides what a retry gets, kills at random points never
//! lead to a second execution, and a store that fails answers 503 without
//! forwarding anything.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};
use support::*;

/// A full config: the shared `config()` fixes `upstream.timeout` and `[store]`.
fn conf(upstream: &str, upstream_timeout: &str, store: &str, rest: &str) -> String {
    format!(
        "[upstream]\nurl = \"{upstream}\"\ntimeout = \"{upstream_timeout}\"\n\n[store]\npath = \"{{dir}}/data\"\n{store}\n\n{rest}\n"
    )
}

type RawClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// A client whose failures are values: requests in flight when the proxy is
/// killed fail, and that is expected.
fn raw_client() -> RawClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

async fn try_post(c: &RawClient, url: &str, key: &str, body: &str) -> Result<Resp, String> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("idempotency-key", key)
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(30), c.request(req))
        .await
        .map_err(|_| "no answer within 30s".to_owned())?
        .map_err(|e| e.to_string())?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

async fn stop(proxy: &mut Proxy) {
    proxy.signal(Signal::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "SIGTERM exits 0, got {status}");
}

#[tokio::test]
async fn replay_survives_a_graceful_restart() {
    let up = Upstream::start().await;
    let cfg = config(&up.url(), "");
    let mut proxy = Proxy::start(&cfg);
    let dir = proxy.dir.clone();
    let c = Client::new();
    let url = proxy.url("/v1/orders?cookie=1");
    let first = c.post_key(&url, "durable", "{\"amount\":5}").await;
    assert_eq!(first.replayed(), Some("false"));
    // A request still running at SIGTERM is finished and stored.
    let slow_url = proxy.url("/v1/orders?delay=400");
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), slow_url.clone());
        async move { c.post_key(&url, "draining", "{}").await }
    });
    up.wait_arrived(2).await;
    stop(&mut proxy).await;
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, StatusCode::CREATED, "in-flight requests finish on SIGTERM");
    drop(proxy);

    let proxy = Proxy::start_in(dir, &cfg);
    let c = Client::new();
    let replay = c
        .post_key(&proxy.url("/v1/orders?cookie=1"), "durable", "{\"amount\":5}")
        .await;
    assert_eq!(replay.status, first.status);
    assert_eq!(replay.body, first.body, "the same bytes after a restart");
    assert_eq!(replay.replayed(), Some("true"));
    assert_eq!(replay.header("set-cookie"), None);
    let drained = c.post_key(&proxy.url("/v1/orders?delay=400"), "draining", "{}").await;
    assert_eq!(drained.body, slow.body);
    assert_eq!(drained.replayed(), Some("true"));
    assert_eq!(up.executions(), 2, "nothing executed again");
    assert_eq!(
        record(&c, &proxy, "anonymous", "durable").await.unwrap()["state"],
        "completed"
    );
}

#[tokio::test]
async fn crash_mid_flight_rejects_retries_as_outcome_unknown() {
    let up = Upstream::start().await;
    let cfg = conf(
        &up.url(),
        "5s",
        "sync = \"always\"",
        "[idempotency]\non_lost_outcome = \"reject\"\n",
    );
    let mut proxy = Proxy::start(&cfg);
    let dir = proxy.dir.clone();
    let url = proxy.url("/v1/orders?delay=3000");
    let raw = raw_client();
    let inflight = tokio::spawn(async move { try_post(&raw, &url, "crashed", "{}").await });
    up.wait_arrived(1).await;
    proxy.kill();
    assert!(inflight.await.unwrap().is_err(), "the client saw the crash");

    let proxy = Proxy::start_in(dir, &cfg);
    let c = Client::new();
    let rec = record(&c, &proxy, "anonymous", "crashed")
        .await
        .expect("the claim was durable");
    assert_eq!(rec["state"], "lost");
    assert_eq!(rec["status"], serde_json::Value::Null);
    for _ in 0..3 {
        let retry = c.post_key(&proxy.url("/v1/orders?delay=3000"), "crashed", "{}").await;
        assert_eq!(retry.status, StatusCode::CONFLICT);
        assert_eq!(retry.code(), "outcome_unknown");
        assert_eq!(retry.replayed(), None);
    }
    assert_eq!(
        record(&c, &proxy, "anonymous", "crashed").await.unwrap()["state"],
        "lost"
    );
    // A different request with that key is still a mismatch.
    let other = c.post_key(&proxy.url("/v1/orders"), "crashed", "{}").await;
    assert_eq!(other.code(), "idempotency_key_reused");
    assert_eq!(up.executions(), 1);
}

#[tokio::test]
async fn crash_mid_flight_retries_after_the_upstream_timeout() {
    let up = Upstream::start().await;
    let cfg = conf(
        &up.url(),
        "3s",
        "sync = \"always\"",
        "[idempotency]\non_lost_outcome = \"retry\"\n",
    );
    let mut proxy = Proxy::start(&cfg);
    let dir = proxy.dir.clone();
    let url = proxy.url("/v1/orders?delay=800");
    let raw = raw_client();
    let inflight = tokio::spawn({
        let url = url.clone();
        async move { try_post(&raw, &url, "crashed", "{}").await }
    });
    up.wait_arrived(1).await;
    proxy.kill();
    assert!(inflight.await.unwrap().is_err());

    let proxy = Proxy::start_in(dir, &cfg);
    let c = Client::new();
    let url = proxy.url("/v1/orders?delay=800");
    // Before the original's upstream.timeout has passed the original may
    // still be running upstream: in use.
    let early = c.post_key(&url, "crashed", "{}").await;
    assert_eq!(early.status, StatusCode::CONFLICT);
    assert_eq!(early.code(), "idempotency_key_in_use");
    let after: u64 = early.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(
        (1..=3).contains(&after),
        "Retry-After {after} points at the end of upstream.timeout"
    );
    assert_eq!(up.executions(), 1);
    // After it, the retry executes again (once).
    let mut executed = None;
    for _ in 0..50 {
        let r = c.post_key(&url, "crashed", "{}").await;
        if r.status == StatusCode::CONFLICT {
            assert_eq!(r.code(), "idempotency_key_in_use");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        executed = Some(r);
        break;
    }
    let executed = executed.expect("the key became retryable");
    assert_eq!(executed.status, StatusCode::CREATED);
    assert_eq!(executed.replayed(), Some("false"));
    assert_eq!(up.executions(), 2);
    let replay = c.post_key(&url, "crashed", "{}").await;
    assert_eq!(replay.replayed(), Some("true"));
    assert_eq!(replay.body, executed.body);
    assert_eq!(up.executions(), 2);
}

/// What a key's first attempt saw before the kill.
#[derive(Debug)]
enum Seen {
    /// A complete response reached the client.
    Answered(Resp),
    /// The request failed with the proxy.
    Failed,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_never_execute_a_key_twice() {
    const ITERATIONS: usize = 8;
    const KEYS_PER_ROUND: usize = 12;
    let up = Upstream::start().await;
    let cfg = conf(
        &up.url(),
        "5s",
        "sync = \"always\"",
        "[idempotency]\non_lost_outcome = \"reject\"\n",
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc4a5);
    let mut proxy = Proxy::start(&cfg);
    let dir = proxy.dir.clone();
    // Every key ever answered, with the bytes its client got.
    let mut answered: HashMap<String, (String, Bytes)> = HashMap::new();
    let mut sent = 0usize;
    let (mut seen_answered, mut lost, mut fresh, mut replayed_unseen) = (0, 0, 0, 0);
    for round in 0..ITERATIONS {
        let raw = Arc::new(raw_client());
        let mut tasks = Vec::new();
        for i in 0..KEYS_PER_ROUND {
            let key = format!("r{round}k{i}");
            let path = format!("/v1/crash/{key}");
            let pq = format!("{path}?delay={}", rng.gen_range(0..120));
            let url = proxy.url(&pq);
            let raw = raw.clone();
            // Staggered, so a kill finds keys in every stage: not yet sent,
            // claimed, upstream running, being stored, answered.
            let wait = Duration::from_millis(rng.gen_range(0..150));
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let seen = match try_post(&raw, &url, &key, "{}").await {
                    Ok(r) if r.status == StatusCode::CREATED => Seen::Answered(r),
                    Ok(r) => panic!("{key}: unexpected {} {:?}", r.status, r.body),
                    Err(_) => Seen::Failed,
                };
                (key, path, pq, seen)
            }));
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..160))).await;
        proxy.kill();
        let mut round_keys = Vec::new();
        for t in tasks {
            round_keys.push(t.await.unwrap());
        }
        drop(proxy);

        proxy = Proxy::start_in(dir.clone(), &cfg);
        let c = Client::new();
        for (key, path, pq, seen) in &round_keys {
            let retry = c.post_key(&proxy.url(pq), key, "{}").await;
            match seen {
                Seen::Answered(first) => {
                    assert_eq!(retry.status, StatusCode::CREATED, "{key}");
                    assert_eq!(retry.body, first.body, "{key}: an answered key replays its bytes");
                    assert_eq!(retry.replayed(), Some("true"), "{key}");
                    seen_answered += 1;
                    answered.insert(key.clone(), (pq.clone(), first.body.clone()));
                }
                Seen::Failed if retry.status == StatusCode::CONFLICT => {
                    assert_eq!(retry.code(), "outcome_unknown", "{key}");
                    lost += 1;
                }
                Seen::Failed => {
                    assert_eq!(retry.status, StatusCode::CREATED, "{key}");
                    if retry.replayed() == Some("true") {
                        replayed_unseen += 1;
                    } else {
                        fresh += 1;
                    }
                    answered.insert(key.clone(), (pq.clone(), retry.body.clone()));
                }
            }
            assert!(
                up.executions_of(path) <= 1,
                "{key} executed {} times",
                up.executions_of(path)
            );
        }
        assert!(
            up.executions() <= sent,
            "{} executions for {sent} keys",
            up.executions()
        );
    }
    // Everything answered so far still replays, byte for byte, after all the kills.
    let c = Client::new();
    for (key, (path, body)) in &answered {
        let r = c.post_key(&proxy.url(path), key, "{}").await;
        assert_eq!(&r.body, body, "{key}");
        assert_eq!(r.replayed(), Some("true"), "{key}");
    }
    assert!(up.executions() <= sent);
    eprintln!(
        "random kills: {ITERATIONS} kills, {sent} keys, {} executions; {seen_answered} answered before a kill \
         (all replayed after it), {lost} lost (409 outcome_unknown), {fresh} first executed after a restart, \
         {replayed_unseen} completed but unseen before the kill",
        up.executions()
    );
}

#[tokio::test]
async fn corrupt_store_record_is_503_and_nothing_is_forwarded() {
    let up = Upstream::start().await;
    let cfg = config(&up.url(), "");
    let mut proxy = Proxy::start(&cfg);
    let dir = proxy.dir.clone();
    let c = Client::new();
    let good = c.post_key(&proxy.url("/v1/orders"), "good", "{}").await;
    assert_eq!(good.replayed(), Some("false"));
    stop(&mut proxy).await;
    drop(proxy);

    // Write garbage where the record of tenant "anonymous", key "broken" lives.
    {
        let db = sled::open(dir.path().join("data")).unwrap();
        let records = db.open_tree("records").unwrap();
        records
            .insert(b"anonymous\0broken", &b"\x01\xff\xff\xff\xff\xff\xff\xff"[..])
            .unwrap();
        db.flush().unwrap();
    }

    let proxy = Proxy::start_in(dir, &cfg);
    let c = Client::new();
    for _ in 0..2 {
        let r = c.post_key(&proxy.url("/v1/orders"), "broken", "{}").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.code(), "store_unavailable");
        assert_eq!(r.replayed(), None);
    }
    assert_eq!(up.executions(), 1, "nothing was forwarded");
    let rec = c.get(&proxy.admin_url("/v1/records?tenant=anonymous&key=broken")).await;
    assert_eq!(rec.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(rec.code(), "store_unavailable");
    // Other keys are unaffected.
    let replay = c.post_key(&proxy.url("/v1/orders"), "good", "{}").await;
    assert_eq!(replay.body, good.body);
    assert_eq!(replay.replayed(), Some("true"));
    // Deleting the broken record frees the key.
    let del = c
        .send(
            Method::DELETE,
            &proxy.admin_url("/v1/records?tenant=anonymous&key=broken"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    let fixed = c.post_key(&proxy.url("/v1/orders"), "broken", "{}").await;
    assert_eq!(fixed.replayed(), Some("false"));
    assert_eq!(up.executions(), 2);
    let m = c.get(&proxy.admin_url("/metrics")).await;
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.lines()
            .any(|l| l == "idemproxy_requests_total{outcome=\"store_error\"} 2"),
        "{text}"
    );
}

/// `sync = "always"`: whoever asks, nobody sees a completed response before
/// it is durable. Every flush is delayed by the test-only
/// `IDEMPROXY_TEST_FLUSH_DELAY_MS`, which holds a completion written but
/// not yet on disk for 1.5 s; retries, the records API and the status
/// endpoint ask all through that window, and the proxy is SIGKILLed the
/// moment any of them sees the result. After the restart the key must not
/// be `lost`: what a client saw was durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_seen_before_it_is_durable() {
    let up = Upstream::start().await;
    let cfg = conf(
        &up.url(),
        "10s",
        "sync = \"always\"",
        "[server]\nstatus_path = \"/_idempotency\"\n\n[idempotency]\non_lost_outcome = \"reject\"\n",
    );
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut proxy = Proxy::try_start_in(dir.clone(), &cfg, &[("IDEMPROXY_TEST_FLUSH_DELAY_MS", "1500")]).unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(&str, Option<Bytes>)>();
    let raw = Arc::new(raw_client());
    let url = proxy.url("/v1/orders/window");
    let leader = tokio::spawn({
        let (raw, url, seen) = (raw.clone(), url.clone(), seen_tx.clone());
        async move {
            if let Ok(r) = try_post(&raw, &url, "window", "{}").await {
                let _ = seen.send(("the first client", Some(r.body)));
            }
        }
    });
    // Claimed (durably) and executing: the completion is about to be written.
    up.wait_arrived(1).await;
    let mut askers = vec![leader];
    // Retries, one every 25 ms: those that arrive after the completion was
    // written but before its flush must not be answered from it.
    askers.push(tokio::spawn({
        let (raw, url, seen) = (raw.clone(), url.clone(), seen_tx.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            let mut retries = Vec::new();
            for _ in 0..120 {
                tick.tick().await;
                let (raw, url, seen) = (raw.clone(), url.clone(), seen.clone());
                retries.push(tokio::spawn(async move {
                    if let Ok(r) = try_post(&raw, &url, "window", "{}").await {
                        assert_eq!(r.status, StatusCode::CREATED);
                        let _ = seen.send(("a retry", Some(r.body)));
                    }
                }));
            }
            for r in retries {
                r.await.unwrap();
            }
        }
    }));
    // The records API and the status endpoint, polled the same way.
    for (who, url) in [
        (
            "the records API",
            proxy.admin_url("/v1/records?tenant=anonymous&key=window"),
        ),
        ("the status endpoint", proxy.url("/_idempotency/window")),
    ] {
        let (raw, seen) = (raw.clone(), seen_tx.clone());
        askers.push(tokio::spawn(async move {
            for _ in 0..120 {
                let req = Request::get(&url).body(Full::new(Bytes::new())).unwrap();
                let Ok(Ok(res)) = tokio::time::timeout(Duration::from_secs(30), raw.request(req)).await else {
                    return;
                };
                let Ok(body) = res.into_body().collect().await else {
                    return;
                };
                let v: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
                if v["state"] == "completed" {
                    let _ = seen.send((who, None));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }));
    }
    drop(seen_tx);
    let (who, body) = tokio::time::timeout(Duration::from_secs(30), seen.recv())
        .await
        .expect("someone saw the result within 30s")
        .expect("someone saw the result");
    proxy.kill();
    for a in askers {
        a.await.unwrap();
    }
    drop(proxy);

    let proxy = Proxy::start_in(dir, &cfg);
    let c = Client::new();
    let rec = record(&c, &proxy, "anonymous", "window")
        .await
        .expect("the key is known");
    assert_eq!(
        rec["state"], "completed",
        "{who} saw the result before it was durable: after a crash the key is {}",
        rec["state"]
    );
    let replay = c.post_key(&proxy.url("/v1/orders/window"), "window", "{}").await;
    assert_eq!(replay.replayed(), Some("true"));
    if let Some(body) = body {
        assert_eq!(replay.body, body, "{who} saw the bytes that were stored");
    }
    assert_eq!(up.executions(), 1);
}
