//! Prometheus metrics, exported on the admin listener.
//!
//! One [`Metrics`] handle is created at start and passed down (no global
//! registry), so tests can run several proxies in one process.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How a request ended; the `outcome` label of `idemproxy_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// No idempotency handling (no enabled route, or no key and not required).
    passthrough,
    /// First request with its key; the response was stored.
    stored,
    /// Answered from the store.
    replayed,
    /// Held while the original ran, then given its response.
    coalesced,
    /// 409: key in use, outcome unknown, not replayable, too many waiters.
    conflict,
    /// 422: same key, different request.
    mismatch,
    missing_key,
    invalid_key,
    too_large,
    /// Forwarded, but the response was not stored (status not storable, too large).
    not_stored,
    /// 502 / 504 from the proxy.
    upstream_error,
    /// 503: the store failed.
    store_error,
    /// 410: the key's response has expired and only its tombstone remains.
    expired,
    /// 401: the tenant's token failed verification.
    invalid_token,
    /// Answered by the key status endpoint.
    status,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

/// Cheap to clone; every field is shared.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    duration: Histogram,
    inflight: Gauge<i64, AtomicI64>,
    reloads: Family<ResultLabels, Counter>,
    store_ops: Family<OpLabels, Histogram>,
    store_errors: Family<OpLabels, Counter>,
    swept: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register("idemproxy_requests", "Requests by how they ended", requests.clone());
        let buckets = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let duration = Histogram::new(buckets.into_iter());
        registry.register(
            "idemproxy_request_duration_seconds",
            "Time from request head to response head",
            duration.clone(),
        );
        let inflight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "idemproxy_inflight",
            "Keyed requests executing upstream right now",
            inflight.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "idemproxy_config_reloads",
            "Config reloads on SIGHUP by result",
            reloads.clone(),
        );
        let store_ops = Family::<OpLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(
                [
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
                ]
                .into_iter(),
            )
        });
        registry.register(
            "idemproxy_store_operation_duration_seconds",
            "Store operation latency by operation",
            store_ops.clone(),
        );
        let store_errors = Family::<OpLabels, Counter>::default();
        registry.register(
            "idemproxy_store_errors",
            "Store operation failures by operation",
            store_errors.clone(),
        );
        let swept = Counter::default();
        registry.register(
            "idemproxy_store_expired_records",
            "Records deleted by the expiry sweeper",
            swept.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                duration,
                inflight,
                reloads,
                store_ops,
                store_errors,
                swept,
            }),
        }
    }

    pub fn request(&self, outcome: Outcome, elapsed: Duration) {
        self.inner.requests.get_or_create(&OutcomeLabels { outcome }).inc();
        self.inner.duration.observe(elapsed.as_secs_f64());
    }

    pub fn inflight(&self) -> &Gauge<i64, AtomicI64> {
        &self.inner.inflight
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.inner.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn store_op(&self, op: &'static str, elapsed: Duration, ok: bool) {
        self.inner
            .store_ops
            .get_or_create(&OpLabels { op })
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.inner.store_errors.get_or_create(&OpLabels { op }).inc();
        }
    }

    pub fn swept(&self, n: u64) {
        self.inner.swept.inc_by(n);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}
