//! Prometheus metrics, exported on the admin listener.
//!
//! One [`Metrics`] handle is created at start and passed down (no global
//! registry), so tests can run several proxies in one process.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
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
    /// 408: the client's request body stalled past `server.body_read_timeout`.
    request_timeout,
}

/// A latency histogram of atomic counters. prometheus-client's `Histogram`
/// takes a write lock on every observation, which would make it the one lock
/// every request shares; this one is a handful of relaxed atomic adds.
#[derive(Clone, Debug)]
pub struct LatencyHistogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        LatencyHistogram(Arc::new(HistogramInner {
            bounds,
            counts,
            sum_nanos: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .0
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.0.bounds.len());
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0
            .sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &*self.0;
        let counts: Vec<u64> = inner.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(counts.iter().copied())
            .collect();
        let sum = inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<()>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

/// Store operations recorded by name; series are created once, up front.
const STORE_OPS: &[&str] = &[
    "claim", "finish", "renew", "get", "delete", "sweep", "probe", "wait", "other",
];

/// Every outcome, in declaration order (`Outcome as usize` indexes it).
const OUTCOMES: [Outcome; 16] = [
    Outcome::passthrough,
    Outcome::stored,
    Outcome::replayed,
    Outcome::coalesced,
    Outcome::conflict,
    Outcome::mismatch,
    Outcome::missing_key,
    Outcome::invalid_key,
    Outcome::too_large,
    Outcome::not_stored,
    Outcome::upstream_error,
    Outcome::store_error,
    Outcome::expired,
    Outcome::invalid_token,
    Outcome::status,
    Outcome::request_timeout,
];

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
    /// One counter per outcome, indexed by `Outcome as usize`: no lookup and
    /// no lock on the request path.
    requests: Vec<Counter>,
    duration: LatencyHistogram,
    inflight: Gauge<i64, AtomicI64>,
    reloads: Family<ResultLabels, Counter>,
    /// Per store operation (in `STORE_OPS` order): latency and errors.
    store_ops: Vec<(&'static str, LatencyHistogram, Counter)>,
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
        let family = Family::<OutcomeLabels, Counter>::default();
        registry.register("idemproxy_requests", "Requests by how they ended", family.clone());
        let requests = OUTCOMES
            .iter()
            .map(|&outcome| family.get_or_create(&OutcomeLabels { outcome }).clone())
            .collect();
        let duration = LatencyHistogram::new(REQUEST_BUCKETS);
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
        let latency =
            Family::<OpLabels, LatencyHistogram>::new_with_constructor(|| LatencyHistogram::new(STORE_BUCKETS));
        registry.register(
            "idemproxy_store_operation_duration_seconds",
            "Store operation latency by operation",
            latency.clone(),
        );
        let errors = Family::<OpLabels, Counter>::default();
        registry.register(
            "idemproxy_store_errors",
            "Store operation failures by operation",
            errors.clone(),
        );
        let store_ops = STORE_OPS
            .iter()
            .map(|&op| {
                let labels = OpLabels { op };
                (
                    op,
                    latency.get_or_create(&labels).clone(),
                    errors.get_or_create(&labels).clone(),
                )
            })
            .collect();
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
                swept,
            }),
        }
    }

    pub fn request(&self, outcome: Outcome, elapsed: Duration) {
        self.inner.requests[outcome as usize].inc();
        self.inner.duration.observe(elapsed);
    }

    pub fn inflight(&self) -> &Gauge<i64, AtomicI64> {
        &self.inner.inflight
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.inner.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Records one store operation. `op` must be one of `STORE_OPS`;
    /// another name is recorded under "other".
    pub fn store_op(&self, op: &'static str, elapsed: Duration, ok: bool) {
        let ops = &self.inner.store_ops;
        let Some((_, latency, errors)) = ops.iter().find(|(name, _, _)| *name == op).or_else(|| ops.last()) else {
            return;
        };
        latency.observe(elapsed);
        if !ok {
            errors.inc();
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
