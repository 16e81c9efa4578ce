//! Where records live: one [`Store`] handle over interchangeable backends.
//!
//! The request path only ever calls the operations below, which are shaped
//! for a shared store as much as for an embedded one:
//!
//! - [`Store::claim`]: one atomic decision per key (a compare-and-swap in
//!   sled and memory, one Lua script in Redis) that either makes the caller
//!   the owner, identified by a [`Token`], or reports the existing record;
//! - [`Store::finish`]: token-checked completion, release or "lost", so an
//!   owner whose claim was taken over can never overwrite the newer owner;
//! - [`Store::renew`]: keeps a claim alive while the upstream call runs
//!   (a lease in Redis; embedded stores need none);
//! - [`Store::wait_change`]: resolves when another process may have changed
//!   the key (Redis pub/sub; embedded stores have no other process).
//!
//! An enum rather than a trait object: no boxed future per call on the hot
//! path, and every backend is visible in one `match`.

pub mod commit;
pub mod memory;
pub mod record;
pub mod redis;
pub mod sled;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

pub use self::redis::Ending;
use crate::config::StoreConfig;
use crate::metrics::Metrics;
pub use record::{Claim, ClaimRequest, Completed, Fingerprint, Finish, Record, Token};

/// The stored identity of one operation: tenant and key, joined by a NUL
/// byte (neither can contain one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordKey(Bytes);

impl RecordKey {
    pub fn new(tenant: &str, key: &str) -> Self {
        let mut v = Vec::with_capacity(tenant.len() + 1 + key.len());
        v.extend_from_slice(tenant.as_bytes());
        v.push(0);
        v.extend_from_slice(key.as_bytes());
        RecordKey(Bytes::from(v))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn from_bytes(b: &[u8]) -> Self {
        RecordKey(Bytes::copy_from_slice(b))
    }
}

/// A store operation failed: the proxy answers 503 and forwards nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("store operation timed out")]
    Timeout,
    #[error(transparent)]
    Corrupt(Arc<record::DecodeError>),
    #[error(transparent)]
    NotOwner(#[from] record::NotOwner),
}

/// Milliseconds since the Unix epoch, the unit of every stored timestamp.
pub fn now_ms() -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    ms.saturating_add_signed(*CLOCK_SKEW_MS)
}

/// TEST ONLY: `IDEMPROXY_TEST_CLOCK_SKEW_MS` shifts this process's clock
/// (milliseconds, may be negative), so a test can run one replica with a
/// clock that is off (tests/redis.rs). Never set it in production.
static CLOCK_SKEW_MS: std::sync::LazyLock<i64> = std::sync::LazyLock::new(|| {
    std::env::var("IDEMPROXY_TEST_CLOCK_SKEW_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
});

#[derive(Clone)]
enum Backend {
    Memory(memory::MemoryStore),
    Sled(sled::SledStore),
    Redis(redis::RedisStore),
}

/// The store handle. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    shared: Arc<Shared>,
}

struct Shared {
    /// Random per process start: tells this process's claims from a dead one's.
    instance: u64,
    seq: AtomicU64,
    metrics: Metrics,
}

impl Store {
    /// Opens the configured backend.
    pub async fn open(config: &StoreConfig, metrics: Metrics) -> Result<Store, StoreError> {
        let backend = match config {
            StoreConfig::Memory { .. } => Backend::Memory(memory::MemoryStore::default()),
            StoreConfig::Sled {
                path,
                sync,
                cache_capacity,
                ..
            } => Backend::Sled(sled::SledStore::open(path, *sync, *cache_capacity).await?),
            StoreConfig::Redis(c) => Backend::Redis(redis::RedisStore::open(c).await?),
        };
        Ok(Store {
            backend,
            shared: Arc::new(Shared {
                instance: rand::random::<u64>() | 1,
                seq: AtomicU64::new(1),
                metrics,
            }),
        })
    }

    /// A fresh token for a claim by this process.
    pub fn token(&self) -> Token {
        Token {
            instance: self.shared.instance,
            seq: self.shared.seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn observe<T>(
        &self,
        op: &'static str,
        start: std::time::Instant,
        r: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.shared.metrics.store_op(
            op,
            start.elapsed(),
            r.is_ok() || matches!(r, Err(StoreError::NotOwner(_))),
        );
        r
    }

    /// Atomically claims `key` or reports its record. When acquired, the
    /// in-flight record is durable (per the sync mode) before this returns.
    pub async fn claim(&self, key: &RecordKey, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let start = std::time::Instant::now();
        let r = match &self.backend {
            Backend::Memory(m) => Ok(m.claim(key, req, self.shared.instance)),
            Backend::Sled(s) => s.claim(key, req, self.shared.instance).await,
            Backend::Redis(r) => r.claim(key, req).await,
        };
        self.observe("claim", start, r)
    }

    /// Finishes the claim held by `token`; the new state is durable (per the
    /// sync mode) before this returns.
    pub async fn finish(&self, key: &RecordKey, token: Token, how: Finish) -> Result<(), StoreError> {
        self.finish_told(key, token, how, None, Duration::ZERO).await
    }

    /// Finishes like [`Store::finish`]; when nothing is stored, `ending`
    /// (what the owner answered) is left for `keep` to the duplicates that
    /// other replicas held for this claim, so they answer the same instead
    /// of executing the key again (SPEC §5). Embedded stores have no other
    /// replicas: their held duplicates get the outcome in process.
    pub async fn finish_told(
        &self,
        key: &RecordKey,
        token: Token,
        how: Finish,
        ending: Option<&Ending>,
        keep: Duration,
    ) -> Result<(), StoreError> {
        let start = std::time::Instant::now();
        let r = match &self.backend {
            Backend::Memory(m) => m.finish(key, token, &how),
            Backend::Sled(s) => s.finish(key, token, &how).await,
            Backend::Redis(r) => r.finish(key, token, &how, ending, keep).await,
        };
        self.observe("finish", start, r)
    }

    /// Keeps `token`'s claim alive (a Redis lease); embedded stores have no
    /// leases. `NotOwner` when the claim was lost or taken over meanwhile.
    pub async fn renew(&self, key: &RecordKey, token: Token) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Memory(_) | Backend::Sled(_) => Ok(()),
            Backend::Redis(r) => {
                let start = std::time::Instant::now();
                let r = r.renew(key, token).await;
                self.observe("renew", start, r)
            }
        }
    }

    /// True when other processes share this store (their claims can be
    /// waited for); false for embedded stores owned by this process alone.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Redis(_))
    }

    /// The replayable response stored under `key`, if there is one now, read
    /// without claiming anything. Embedded stores only: there a read is a
    /// local lookup, so a replay needs no flight and no task. For Redis this
    /// would be an extra round trip before every first request, so it answers
    /// `None` and the claim (which returns the record) does the job.
    pub fn peek_replay(&self, key: &RecordKey, fingerprint: Option<&Fingerprint>) -> Option<Arc<Completed>> {
        let record = match &self.backend {
            Backend::Memory(m) => m.get(key),
            Backend::Sled(s) => s.get_now(key),
            Backend::Redis(_) => None,
        }?;
        match record.at(now_ms(), self.shared.instance)? {
            Record::Completed(c)
                if c.replayable && (fingerprint.is_none() || c.fingerprint.as_ref() == fingerprint) =>
            {
                Some(c)
            }
            _ => None,
        }
    }

    /// How often the owner must call [`Store::renew`]; `None` = never.
    pub fn renew_every(&self) -> Option<Duration> {
        match &self.backend {
            Backend::Redis(r) => Some(r.lease() / 3),
            Backend::Memory(_) | Backend::Sled(_) => None,
        }
    }

    /// Resolves when another process may have changed `key`, for the claim
    /// token `me` that found it in flight. Embedded stores are owned by one
    /// process, so this never resolves for them: local waiters are woken by
    /// the in-process flight instead. With Redis it resolves on the key's
    /// change notification, when its owner's lease runs out, or at once if
    /// the key is no longer in flight. `Some(ending)`: the owner ended
    /// without storing and this is what it answered; answer the same and
    /// never execute the key. `None`: claim again.
    pub async fn wait_change(&self, key: &RecordKey, me: Token) -> Option<Ending> {
        match &self.backend {
            Backend::Redis(r) => r.wait_change(key, me).await,
            Backend::Memory(_) | Backend::Sled(_) => std::future::pending().await,
        }
    }

    /// The record as it stands now, for the records API and the status endpoint.
    pub async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let start = std::time::Instant::now();
        let r = match &self.backend {
            Backend::Memory(m) => Ok(m.get(key)),
            Backend::Sled(s) => s.get(key).await,
            Backend::Redis(r) => r.get(key).await,
        };
        let now = now_ms();
        let shared = matches!(self.backend, Backend::Redis(_));
        self.observe("get", start, r).map(|o| {
            o.and_then(|rec| {
                // In a shared store another process's claim is alive until
                // its lease ends (Redis judged that already), not dead.
                let live = match &rec {
                    Record::InFlight(f) if shared => f.token.instance,
                    _ => self.shared.instance,
                };
                rec.at(now, live)
            })
        })
    }

    /// Deletes a record; true if there was one.
    pub async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let start = std::time::Instant::now();
        let r = match &self.backend {
            Backend::Memory(m) => Ok(m.delete(key)),
            Backend::Sled(s) => s.delete(key).await,
            Backend::Redis(r) => r.delete(key).await,
        };
        self.observe("delete", start, r)
    }

    /// Deletes records that are gone (and turns expired responses into
    /// tombstones); returns how many were deleted.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        let start = std::time::Instant::now();
        let now = now_ms();
        let r = match &self.backend {
            Backend::Memory(m) => Ok(m.sweep(now)),
            Backend::Sled(s) => s.sweep(now).await,
            // Redis expires records itself.
            Backend::Redis(_) => Ok(0),
        };
        let r = self.observe("sweep", start, r);
        if let Ok(n) = r {
            self.shared.metrics.swept(n);
        }
        r
    }

    /// Checks that the store can take a write now (for `/readyz`).
    pub async fn probe(&self) -> Result<(), StoreError> {
        let start = std::time::Instant::now();
        let r = match &self.backend {
            Backend::Memory(_) => Ok(()),
            Backend::Sled(s) => s.probe().await,
            Backend::Redis(r) => r.probe().await,
        };
        self.observe("probe", start, r)
    }

    /// Makes everything written so far durable (at shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Memory(_) => Ok(()),
            // Redis's durability is its own (appendonly, replicas + WAIT);
            // what is left is to settle operations whose reply never came.
            Backend::Redis(r) => r.flush().await,
            Backend::Sled(s) => s.flush().await,
        }
    }

    /// Runs the expiry sweeper every `every` until the store is dropped
    /// elsewhere and `stop` resolves.
    pub fn spawn_sweeper(&self, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => return,
                }
                match store.sweep().await {
                    Ok(n) if n > 0 => tracing::debug!(deleted = n, "expired records swept"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
                }
            }
        });
    }
}
