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
    /// 503: `server.max_keyed_requests` or `server.max_keyed_buffer` reached.
    overloaded,
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

/// Request counts and latencies, one shard per serving worker.
///
/// Every request records its outcome and its duration. With one shared set
/// of atomics, each of those writes would move a cache line between the
/// cores of the workers; with a shard per worker (padded to its own lines),
/// a request writes only memory its own core already owns. Scrapes add the
/// shards up.
#[derive(Debug)]
struct RequestShards {
    shards: Box<[RequestShard]>,
}

#[derive(Debug)]
#[repr(align(128))]
struct RequestShard {
    outcomes: [AtomicU64; OUTCOMES.len()],
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    buckets: [AtomicU64; REQUEST_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// Shards: one per worker up to this many, and shard 0 for other threads.
const SHARDS: usize = 33;

impl RequestShards {
    fn new() -> Self {
        let shards = (0..SHARDS)
            .map(|_| RequestShard {
                outcomes: std::array::from_fn(|_| AtomicU64::new(0)),
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_nanos: AtomicU64::new(0),
            })
            .collect();
        RequestShards { shards }
    }

    fn record(&self, outcome: Outcome, elapsed: Duration) {
        let shard = crate::server::worker::index().map_or(0, |i| i % (SHARDS - 1) + 1);
        let shard = &self.shards[shard];
        shard.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = REQUEST_BUCKET_NANOS
            .iter()
            .position(|b| nanos <= *b)
            .unwrap_or(REQUEST_BUCKET_NANOS.len());
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn total(&self, read: impl Fn(&RequestShard) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| read(s).load(Ordering::Relaxed)).sum()
    }
}

/// `idemproxy_requests_total{outcome}`, read from the shards.
#[derive(Debug, Clone)]
struct RequestCounts(Arc<RequestShards>);

impl TypedMetric for RequestCounts {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for RequestCounts {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for outcome in OUTCOMES {
            let n = self.0.total(|s| &s.outcomes[outcome as usize]);
            encoder
                .encode_family(&OutcomeLabels { outcome })?
                .encode_counter::<(), _, u64>(&n, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// `idemproxy_request_duration_seconds`, read from the shards.
#[derive(Debug, Clone)]
struct RequestDurations(Arc<RequestShards>);

impl TypedMetric for RequestDurations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for RequestDurations {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts: Vec<u64> = (0..=REQUEST_BUCKETS.len())
            .map(|i| self.0.total(|s| &s.buckets[i]))
            .collect();
        let buckets: Vec<(f64, u64)> = REQUEST_BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(counts.iter().copied())
            .collect();
        let sum = self.0.total(|s| &s.sum_nanos) as f64 / 1e9;
        encoder.encode_histogram::<()>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// `REQUEST_BUCKETS` in nanoseconds: no float conversion per request.
const REQUEST_BUCKET_NANOS: [u64; 15] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
];
const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

/// Store operations recorded by name; series are created once, up front.
const STORE_OPS: &[&str] = &[
    "claim", "finish", "renew", "get", "delete", "sweep", "probe", "wait", "other",
];

/// Every outcome, in declaration order (`Outcome as usize` indexes it).
const OUTCOMES: [Outcome; 17] = [
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
    Outcome::overloaded,
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
    /// Outcome counts and durations, sharded by worker: no lookup, no lock
    /// and no shared cache line on the request path.
    requests: Arc<RequestShards>,
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
        let requests = Arc::new(RequestShards::new());
        registry.register(
            "idemproxy_requests",
            "Requests by how they ended",
            RequestCounts(requests.clone()),
        );
        registry.register(
            "idemproxy_request_duration_seconds",
            "Time from request head to response head",
            RequestDurations(requests.clone()),
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
                inflight,
                reloads,
                store_ops,
                swept,
            }),
        }
    }

    pub fn request(&self, outcome: Outcome, elapsed: Duration) {
        self.inner.requests.record(outcome, elapsed);
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
        let (_, latency, errors) = &self.inner.store_ops[store_op_index(op)];
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

/// The position of `op` in `STORE_OPS` ("other" for an unknown name): a
/// match (a jump on the length, then one comparison) instead of a search.
fn store_op_index(op: &str) -> usize {
    match op {
        "claim" => 0,
        "finish" => 1,
        "renew" => 2,
        "get" => 3,
        "delete" => 4,
        "sweep" => 5,
        "probe" => 6,
        "wait" => 7,
        _ => STORE_OPS.len() - 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_op_names_map_to_their_series() {
        for (i, op) in STORE_OPS.iter().enumerate() {
            assert_eq!(store_op_index(op), i, "{op}");
        }
        assert_eq!(STORE_OPS[store_op_index("bogus")], "other");
    }

    #[test]
    fn sharded_request_metrics_add_up_in_the_exposition() {
        let m = Metrics::new();
        m.request(Outcome::passthrough, Duration::from_micros(300));
        m.request(Outcome::passthrough, Duration::from_millis(3));
        // From other threads (other shards) too.
        std::thread::scope(|s| {
            s.spawn(|| m.request(Outcome::replayed, Duration::from_micros(100)));
        });
        let text = m.encode();
        assert!(
            text.contains("idemproxy_requests_total{outcome=\"passthrough\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("idemproxy_requests_total{outcome=\"replayed\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("idemproxy_requests_total{outcome=\"request_timeout\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("idemproxy_request_duration_seconds_count 3\n"), "{text}");
        assert!(
            text.contains("idemproxy_request_duration_seconds_bucket{le=\"0.0005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("idemproxy_request_duration_seconds_bucket{le=\"0.005\"} 3\n"),
            "{text}"
        );
    }
}
