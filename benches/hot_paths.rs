//! Criterion benchmarks for the per-request hot paths: route match, key
//! parse, fingerprint, record encode/decode, and the store operations of a
//! keyed request (claim + finish, get) on sled and in memory.
//!
//! `cargo bench --bench hot_paths` (add a filter, e.g. `-- store`, to run a
//! group). The end-to-end figures are `bench/run.sh`'s; see BENCHMARKS.md.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::Method;
use idemproxy::config::raw::RawConfig;
use idemproxy::config::{Config, Rules, StoreConfig, SyncMode};
use idemproxy::idempotency::key;
use idemproxy::metrics::Metrics;
use idemproxy::store::{now_ms, ClaimRequest, Completed, Finish, Record, RecordKey, Store};

/// Ten routes, the matching one near the end, as a larger deployment might have.
const ROUTES: &str = r#"
[upstream]
url = "http://127.0.0.1:3000"

[[routes]]
path = "/internal/*"
enabled = false
[[routes]]
path = "/v1/tasks"
methods = ["POST"]
required = true
[[routes]]
path = "/v1/orders/*"
[[routes]]
path = "/v1/refunds/*"
ttl = "72h"
[[routes]]
path = "/v1/customers/*"
methods = ["POST", "PATCH", "PUT"]
[[routes]]
path = "/v1/invoices/*"
[[routes]]
path = "/v1/subscriptions/*"
[[routes]]
path = "/v1/transfers"
[[routes]]
path = "/v1/payments/*"
ttl = "72h"
[[routes]]
path = "/webhooks/*"
derive_key = true
"#;

fn rules() -> Arc<Rules> {
    let raw: RawConfig = toml::from_str(ROUTES).expect("bench config parses");
    let config = Config::from_raw(raw, "bench.toml").expect("bench config is valid");
    assert_eq!(config.rules.routes.len(), 10);
    config.rules
}

/// A completed ~200-byte JSON response with typical headers.
fn completed(now: u64) -> Arc<Completed> {
    let body = format!(
        "{{\"id\":\"ch_0001\",\"status\":\"succeeded\",\"amount\":100,\"padding\":\"{}\"}}",
        "x".repeat(136)
    );
    assert!((195..=205).contains(&body.len()), "body is {} bytes", body.len());
    Arc::new(Completed {
        fingerprint: Some([7; 32]),
        status: 201,
        headers: vec![
            ("content-type".into(), Bytes::from_static(b"application/json")),
            ("content-length".into(), Bytes::from(body.len().to_string())),
            ("server".into(), Bytes::from_static(b"nginx/1.22.1")),
        ],
        body: Bytes::from(body),
        replayable: true,
        stored_at: now,
        expires_at: now + 86_400_000,
        tombstone_until: 0,
    })
}

fn route_match(c: &mut Criterion) {
    let rules = rules();
    let mut g = c.benchmark_group("route_match");
    g.bench_function("hit_9th_of_10", |b| {
        b.iter(|| rules.policy_for(black_box(&Method::POST), black_box("/v1/payments/charge")))
    });
    g.bench_function("miss_all_10", |b| {
        b.iter(|| rules.policy_for(black_box(&Method::POST), black_box("/v2/unknown/path")))
    });
    g.bench_function("method_not_keyed", |b| {
        b.iter(|| rules.policy_for(black_box(&Method::GET), black_box("/v1/payments/charge")))
    });
    g.finish();
}

fn key_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("key_parse");
    g.bench_function("bare_uuid", |b| {
        b.iter(|| key::parse(black_box(b"550e8400-e29b-41d4-a716-446655440000")))
    });
    g.bench_function("sf_string_escaped", |b| {
        b.iter(|| key::parse(black_box(br#""order-\"42\"-550e8400-e29b-41d4-a716-446655440000""#)))
    });
    g.finish();
}

fn fingerprint(c: &mut Criterion) {
    let body = vec![b'a'; 1024];
    let mut g = c.benchmark_group("fingerprint");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("1KiB_body", |b| {
        b.iter(|| {
            key::fingerprint(
                &Method::POST,
                black_box("/v1/payments/charge?currency=EUR"),
                black_box(&body),
            )
        })
    });
    g.finish();
}

fn record_codec(c: &mut Criterion) {
    let record = Record::Completed(completed(now_ms()));
    let encoded = record.encode();
    let mut g = c.benchmark_group("record");
    g.bench_function("encode_completed_200B", |b| b.iter(|| black_box(&record).encode()));
    g.bench_function("decode_completed_200B", |b| {
        b.iter(|| Record::decode(black_box(&encoded)).expect("decodes"))
    });
    g.finish();
}

/// One keyed request's store work: claim a fresh key, then store its response.
async fn claim_finish(store: &Store, n: u64, response: &Arc<Completed>) {
    let key = RecordKey::new("default", &format!("bench-{n}"));
    let token = store.token();
    let req = ClaimRequest {
        token,
        fingerprint: Some([7; 32]),
        now: now_ms(),
        inflight_ttl: 86_400_000,
        lost_retry: false,
        retry_delay: 60_000,
    };
    let claim = store.claim(&key, &req).await.expect("claim");
    assert_eq!(claim, idemproxy::store::Claim::Acquired);
    store
        .finish(&key, token, Finish::Store(response.clone()))
        .await
        .expect("finish");
}

fn store_ops(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let sled_store = |name: &str, sync: SyncMode| {
        let config = StoreConfig::Sled {
            path: dir.path().join(name),
            sync,
            sweep_interval: Duration::from_secs(3600),
            cache_capacity: 64 << 20,
        };
        rt.block_on(Store::open(&config, Metrics::new())).expect("open sled")
    };
    let stores = [
        (
            "memory",
            rt.block_on(Store::open(
                &StoreConfig::Memory {
                    sweep_interval: Duration::from_secs(3600),
                },
                Metrics::new(),
            ))
            .expect("open memory"),
        ),
        ("sled_interval", sled_store("interval", SyncMode::Interval)),
        ("sled_always", sled_store("always", SyncMode::Always)),
    ];
    let response = completed(now_ms());
    let counter = AtomicU64::new(0);

    let mut g = c.benchmark_group("store");
    for (name, store) in &stores {
        if *name == "sled_always" {
            // Two fsyncs per iteration: fewer samples, or this group takes minutes.
            g.sample_size(10);
        }
        g.bench_function(format!("{name}/claim_finish"), |b| {
            b.iter(|| rt.block_on(claim_finish(store, counter.fetch_add(1, Ordering::Relaxed), &response)))
        });
        // A hit on a stored key, as the replay path reads it.
        let n = counter.fetch_add(1, Ordering::Relaxed);
        rt.block_on(claim_finish(store, n, &response));
        let key = RecordKey::new("default", &format!("bench-{n}"));
        g.bench_function(format!("{name}/get_hit"), |b| {
            b.iter_batched(
                || key.clone(),
                |k| rt.block_on(store.get(&k)).expect("get").expect("stored"),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = route_match, key_parse, fingerprint, record_codec, store_ops
}
criterion_main!(benches);
