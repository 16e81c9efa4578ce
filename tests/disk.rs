//! A full disk, for real: the sled store lives on a 16 MiB tmpfs that a
//! filler file fills up. While the disk is full, new keys get 503 and reach
//! nobody, stored responses keep replaying, pass-through is untouched and
//! `/readyz` says 503. Once the filler is deleted the same process takes
//! writes again by itself, and nothing stored before, during or across the
//! failure is lost or executed twice.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::tmpfs::Tmpfs;
use support::*;

/// Polls `/readyz` until it answers `want` (bounded: 60 s).
async fn wait_ready(c: &Client, proxy: &Proxy, want: StatusCode) {
    for _ in 0..600 {
        if c.get(&proxy.admin_url("/readyz")).await.status == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz did not answer {want} within 60s\n{}", proxy.stderr());
}

#[tokio::test]
async fn a_full_disk_refuses_new_keys_keeps_replays_and_recovers_without_a_restart() {
    full_disk("always").await;
}

/// With `sync = "interval"` writes do not wait for the disk: keys answered
/// just before the failure was noticed exist only in memory, and the
/// reopen must carry them over.
#[tokio::test]
async fn a_full_disk_with_interval_sync_loses_nothing_answered_before_it_was_noticed() {
    full_disk("interval").await;
}

async fn full_disk(sync: &str) {
    let Some(disk) = Tmpfs::mount("16m") else {
        eprintln!("SKIPPED: mounting a tmpfs is not permitted here (needs root); the full-disk test did not run");
        return;
    };
    let up = Upstream::start().await;
    let store = disk.path().join("data");
    let cfg = format!(
        "[upstream]\nurl = \"{}\"\ntimeout = \"10s\"\n\n[store]\npath = \"{}\"\nsync = \"{sync}\"\n",
        up.url(),
        store.display()
    );
    let proxy = Proxy::start(&cfg);
    let c = Client::new();
    let url = |key: &str| proxy.url(&format!("/v1/orders/{key}"));

    // Stored before the disk fills.
    let mut stored = Vec::new();
    for i in 0..3 {
        let key = format!("before-{i}");
        let r = c.post_key(&url(&key), &key, "{}").await;
        assert_eq!(r.replayed(), Some("false"));
        stored.push((key, r.body));
    }
    // In flight (claimed, durable) when the disk fills: held upstream.
    let held = c.spawn_post_key(&proxy.url("/v1/orders/held?gate=1"), "held", "{}");
    up.wait_arrived(4).await;

    let filler = disk.fill();
    // The first writes may still fit in pages the log already has; the
    // first one that does not is refused, and from then on every new key.
    let mut refused = None;
    for i in 0..2000 {
        let key = format!("during-{i}");
        let r = c.post_key(&url(&key), &key, "{}").await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(r.code(), "store_unavailable");
            refused = Some(key);
            break;
        }
        assert_eq!(r.status, StatusCode::CREATED, "{key}: {:?}", r.body);
        stored.push((key, r.body));
    }
    let refused = refused.expect("a full disk refuses new keys");
    eprintln!(
        "sync = {sync}: {} keys answered after the disk filled, before the failure was noticed",
        stored.len() - 3
    );
    let executions = up.executions();
    for key in [refused.as_str(), "new-while-full"] {
        let r = c.post_key(&url(key), key, "{}").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{key}");
        assert_eq!(r.code(), "store_unavailable");
        assert_eq!(r.replayed(), None);
    }
    assert_eq!(
        up.executions(),
        executions,
        "nothing is forwarded while the store cannot write"
    );
    assert_eq!(
        c.get(&proxy.admin_url("/readyz")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    for (i, (key, body)) in stored.iter().enumerate() {
        let r = c.post_key(&url(key), key, "{}").await;
        if i >= 3 && r.status == StatusCode::SERVICE_UNAVAILABLE {
            // Answered while the disk filled, but its completion could not
            // be made durable: decided after recovery, never executed again.
            assert_eq!(r.code(), "store_unavailable");
            continue;
        }
        assert_eq!(r.replayed(), Some("true"), "{key} replays while the disk is full");
        assert_eq!(&r.body, body, "{key}");
    }
    assert_eq!(up.executions(), executions);
    let plain = c.get(&proxy.url("/v1/plain")).await;
    assert_eq!(plain.status, StatusCode::CREATED, "pass-through is unaffected");
    assert_eq!(up.executions_of("/v1/plain"), 1);

    // The held request completes while the store cannot write: its client
    // gets the response, and no retry may execute it again.
    up.open_gate();
    let held = held.await.unwrap();
    assert_eq!(held.status, StatusCode::CREATED);
    assert_eq!(held.replayed(), Some("false"));
    let retry = c.post_key(&proxy.url("/v1/orders/held?gate=1"), "held", "{}").await;
    assert_eq!(retry.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", retry.body);
    assert_eq!(retry.code(), "store_unavailable");
    let executions = up.executions();

    // Space is freed: the same process recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    wait_ready(&c, &proxy, StatusCode::OK).await;
    // The deferred finish is redone right after the reopen; until it lands a
    // retry is still refused (503), never executed. Bounded: 10 s.
    let start = std::time::Instant::now();
    let retry = loop {
        let r = c.post_key(&proxy.url("/v1/orders/held?gate=1"), "held", "{}").await;
        if r.status != StatusCode::SERVICE_UNAVAILABLE || start.elapsed() > std::time::Duration::from_secs(10) {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        retry.replayed(),
        Some("true"),
        "the response delivered during the failure was kept"
    );
    assert_eq!(retry.body, held.body);
    for (key, body) in &stored {
        let r = c.post_key(&url(key), key, "{}").await;
        assert_eq!(r.replayed(), Some("true"), "{key} survives the reopen");
        assert_eq!(&r.body, body, "{key}");
    }
    assert_eq!(up.executions(), executions, "nothing executed twice across the reopen");
    for key in [refused.as_str(), "after"] {
        let first = c.post_key(&url(key), key, "{}").await;
        assert_eq!(first.status, StatusCode::CREATED, "{key} is stored now");
        assert_eq!(first.replayed(), Some("false"));
        let again = c.post_key(&url(key), key, "{}").await;
        assert_eq!(again.replayed(), Some("true"));
        assert_eq!(again.body, first.body);
    }
    assert_eq!(up.executions(), executions + 2);
    let rec = record(&c, &proxy, "anonymous", "held").await.unwrap();
    assert_eq!(rec["state"], "completed");
    assert!(!proxy.stderr().contains("panicked"), "{}", proxy.stderr());
    drop(proxy);
}
