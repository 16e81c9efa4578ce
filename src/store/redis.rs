//! The shared backend: one Redis (standalone or Redis Cluster) for every
//! replica, so a retry that lands on another pod is still a replay (SPEC §5).
//!
//! # Layout
//!
//! One hash per tenant + key at `{key_prefix}:{h}` where `h` is the first 32
//! hex digits of SHA-256(tenant NUL key). The braces are a Redis Cluster hash
//! tag: the record lives in one slot, so every script below touches one slot.
//! Fields:
//!
//! | field | meaning |
//! |---|---|
//! | `s` | state: `f` in flight, `c` completed, `l` lost |
//! | `t` | owner token (in flight only) |
//! | `fp` | request fingerprint, raw bytes; empty = not fingerprinted |
//! | `b` | started_at (in flight, lost) or stored_at (completed), ms |
//! | `e`, `r` | expires_at, retry_at (ms, replica clock) |
//! | `l` | lease_until (ms, **Redis server clock**; in flight only) |
//! | `x` | tombstone_until (completed only; 0 = none) |
//!
//! A completed record keeps its response (the whole [`Record::Completed`],
//! [`Record::encode`]d) in a second key, `{key_prefix}:{h}:rec` (same hash
//! tag, same slot), which Redis expires at `expires_at`, while the hash lives
//! until `tombstone_until` if that is later: an expired key then costs only
//! the small hash (SPEC §6), not the response. The scripts treat "completed,
//! and past `expires_at` or its response key gone" as [`Record::Expired`].
//! Two keys cost less than one even without a tombstone: a response in a
//! hash field (longer than `hash-max-listpack-value`, 64 bytes) would turn
//! the whole hash from a compact listpack into a hash table.

//! # Clocks
//!
//! Leases are judged by Redis's own clock (`TIME` inside the scripts), so a
//! replica with a skewed clock can neither steal a live claim nor keep a dead
//! one alive. Every other timestamp (started, expires, retry, tombstone) is
//! the replica's clock, exactly as in the embedded stores, because the record
//! rules of [`super::record`] and the records API compare them with the
//! replica's `now`. Redis expiries are set relative (`PEXPIRE`, computed as
//! `gone_at - now` on the writing replica), so clock skew moves nothing inside
//! Redis.
//!
//! # Round trips
//!
//! A first request costs two (the claim script, the finish script), a replay
//! one (the claim script returns the completed record), a renewal one per
//! `lease/3` of upstream time. Scripts are loaded at start and run by
//! `EVALSHA`; after a Redis restart the first call of each reloads it.
//!
//! # Waiting across replicas
//!
//! Every state change (finish, delete, lost) is `PUBLISH`ed on the key's
//! channel `{key}:changed`. [`RedisStore::wait_change`] subscribes through a
//! single dedicated RESP3 connection per process whose push messages are fanned
//! out to local waiters; the in-process flight already makes one request per
//! key the only local waiter, so there is one subscription per key per
//! replica. After subscribing it re-reads the key and returns at once if it
//! is no longer a live in-flight record, so a completion between the caller's
//! claim and the subscription is never missed. It also returns when the
//! owner's lease runs out, so a dead owner's key turns `lost` promptly.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{
    Cmd, FromRedisValue, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Script, ScriptInvocation, Value,
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::record::{self, Claim, ClaimRequest, Completed, Finish, InFlight, Lost, Record, Token, Tombstone};
use super::{now_ms, RecordKey, StoreError};
use crate::config::RedisConfig;

/// The claim rule of [`record::claim`], atomically, with leases.
///
/// KEYS[1] record, KEYS[2] its response key. ARGV: 1 token, 2 fingerprint,
/// 3 now, 4 expires_at, 5 retry_at, 6 in-flight ttl (ms), 7 lost_retry
/// ("1"/"0"), 8 lease (ms), 9 channel.
/// Returns `{0}` acquired, `{1, started_at}` in flight, `{2, record}`
/// completed (the caller tells whether it has expired), `{3, fp, started,
/// expires, retry}` lost, `{4}` mismatch, `{5, fp, stored, tombstone_until}`
/// expired (the response is gone; only the tombstone is left).
const CLAIM_LUA: &str = r"
local key = KEYS[1]
local now = tonumber(ARGV[3])
local t = redis.call('TIME')
local srv = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function take()
  redis.call('DEL', key, KEYS[2])
  redis.call('HSET', key, 's', 'f', 't', ARGV[1], 'fp', ARGV[2], 'b', ARGV[3], 'e', ARGV[4],
    'r', ARGV[5], 'l', string.format('%.0f', srv + tonumber(ARGV[8])))
  redis.call('PEXPIRE', key, ARGV[6])
  return {0}
end
local h = redis.call('HMGET', key, 's', 'fp', 'b', 'e', 'r', 'l', 'x')
local s = h[1]
if not s then return take() end
local gone = tonumber(h[4])
if s == 'c' then gone = math.max(gone, tonumber(h[7] or '0')) end
if now >= gone then return take() end
if ARGV[2] ~= '' and h[2] ~= '' and ARGV[2] ~= h[2] then return {4} end
if s == 'c' then
  if now < tonumber(h[4]) then
    local rec = redis.call('GET', KEYS[2])
    if rec then return {2, rec} end
  end
  return {5, h[2], h[3], h[7]}
end
if s == 'f' and srv < tonumber(h[6]) then return {1, h[3]} end
if ARGV[7] == '1' and now >= tonumber(h[5]) then return take() end
if s == 'f' then
  redis.call('HSET', key, 's', 'l')
  redis.call('HDEL', key, 't', 'l')
  redis.call('PUBLISH', ARGV[9], 'l')
end
return {3, h[2], h[3], h[4], h[5]}
";

/// The finish rule of [`record::finish`]: only the current owner may.
///
/// KEYS[1] record, KEYS[2] its response key. ARGV: 1 token, 2 how (`s`
/// store, `r` release, `l` lost), 3 channel; with `s`: 4 record, 5 ttl of
/// the record (ms, until it is gone), 6 fingerprint, 7 expires_at,
/// 8 tombstone_until, 9 stored_at, 10 ttl of the response (ms; 0: already
/// expired, not kept).
/// Returns 1, or 0 when the token no longer owns the key.
const FINISH_LUA: &str = r"
local key = KEYS[1]
local h = redis.call('HMGET', key, 's', 't')
if h[1] ~= 'f' or h[2] ~= ARGV[1] then return 0 end
if ARGV[2] == 's' then
  redis.call('DEL', key, KEYS[2])
  redis.call('HSET', key, 's', 'c', 'fp', ARGV[6], 'b', ARGV[9], 'e', ARGV[7], 'x', ARGV[8])
  if tonumber(ARGV[10]) > 0 then redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[10]) end
  redis.call('PEXPIRE', key, ARGV[5])
elseif ARGV[2] == 'r' then
  redis.call('DEL', key, KEYS[2])
else
  redis.call('HSET', key, 's', 'l')
  redis.call('HDEL', key, 't', 'l')
end
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
";

/// Extends the owner's lease. KEYS[1] record; ARGV: 1 token, 2 lease (ms).
const RENEW_LUA: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] ~= 'f' or h[2] ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local srv = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'l', string.format('%.0f', srv + tonumber(ARGV[2])))
return 1
";

/// Reads a record and Redis's clock, for the records API and waiters.
/// KEYS[1] record, KEYS[2] its response key; ARGV[1] "1": include the
/// response. Returns `{s, t, fp, b, e, r, l, x, rec, server_now}` (absent
/// fields nil; `rec` nil for a tombstone whose response has expired).
const READ_LUA: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 't', 'fp', 'b', 'e', 'r', 'l', 'x')
h[9] = false
if ARGV[1] == '1' and h[1] == 'c' then h[9] = redis.call('GET', KEYS[2]) end
local t = redis.call('TIME')
h[10] = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return h
";

/// Deletes a record and its response, and wakes its waiters. KEYS[1]
/// record, KEYS[2] its response key; ARGV[1] channel.
const DELETE_LUA: &str = r"
local n = redis.call('DEL', KEYS[1], KEYS[2])
if n > 0 then redis.call('PUBLISH', ARGV[1], 'd') end
return n
";

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_LUA));
static FINISH: LazyLock<Script> = LazyLock::new(|| Script::new(FINISH_LUA));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LUA));
static READ: LazyLock<Script> = LazyLock::new(|| Script::new(READ_LUA));
static DELETE: LazyLock<Script> = LazyLock::new(|| Script::new(DELETE_LUA));

/// Connections that `finish` + `WAIT` use when `wait_replicas > 0`: `WAIT`
/// blocks its connection until the replicas answer, so it must not sit in
/// front of other requests' claims on the shared connection.
const DURABLE_CONNECTIONS: usize = 4;

/// How often a waiter re-reads the key when its subscription failed.
const POLL_WITHOUT_SUBSCRIPTION: Duration = Duration::from_millis(100);

/// At most this many timed-out operations are being settled at once.
const MAX_SETTLING: usize = 1024;

/// How long a timed-out operation is retried (at least the lease).
const SETTLE_FOR: Duration = Duration::from_secs(30);

/// Margin past the owner's lease before a waiter re-claims.
const LEASE_MARGIN: Duration = Duration::from_millis(5);

/// A connection to standalone Redis or to a cluster. Both reconnect by
/// themselves; cloning shares the underlying connection.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn script<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
        }
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    async fn load(&self, script: &Script) -> redis::RedisResult<String> {
        match self {
            Conn::Single(c) => script.load_async(&mut c.clone()).await,
            Conn::Cluster(c) => script.load_async(&mut c.clone()).await,
        }
    }

    async fn subscribe(&self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Conn::Single(c) => c.clone().subscribe(channel).await,
            Conn::Cluster(c) => c.clone().subscribe(channel).await,
        }
    }

    async fn unsubscribe(&self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Conn::Single(c) => c.clone().unsubscribe(channel).await,
            Conn::Cluster(c) => c.clone().unsubscribe(channel).await,
        }
    }

    /// `WAIT replicas timeout` for the writes this connection made to `key`.
    async fn wait(&self, key: &str, replicas: u32, timeout: Duration) -> redis::RedisResult<i64> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout.as_millis() as u64);
        match self {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => {
                // Only the key's primary saw the write; the client library
                // would otherwise send WAIT to every primary.
                let route = Route::with_key(key.as_bytes(), SlotAddr::Master);
                let v = c
                    .clone()
                    .route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)))
                    .await?;
                redis::from_redis_value(v).map_err(Into::into)
            }
        }
    }
}

/// The Redis store handle. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    data: Conn,
    durable: Vec<Conn>,
    next_durable: AtomicUsize,
    /// Background settlements of timed-out claims and finishes under way.
    settling: AtomicUsize,
    notifier: Arc<Notifier>,
    prefix: String,
    lease: Duration,
    op_timeout: Duration,
    wait_replicas: u32,
}

fn io(e: redis::RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else {
        StoreError::Io(format!("redis: {e}"))
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Io(format!("redis: unexpected script reply ({what})"))
}

impl RedisStore {
    /// Connects lazily: the proxy starts (not ready) even while Redis is
    /// down, and every operation reconnects as needed.
    pub async fn open(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        let op = config.op_timeout;
        let notifier = Arc::new(Notifier {
            conn: std::sync::OnceLock::new(),
            channels: Arc::new(Mutex::new(HashMap::new())),
            op_timeout: op,
        });
        let push = {
            let channels = notifier.channels.clone();
            move |info: PushInfo| -> Result<(), ()> {
                on_push(&channels, info);
                Ok(())
            }
        };
        let (data, durable, pubsub) = match &config.url {
            Some(url) => {
                let info = url.as_str().into_connection_info().map_err(io)?;
                let manager_config = || {
                    ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(op))
                        .set_response_timeout(Some(op))
                        .set_number_of_retries(2)
                        .set_min_delay(Duration::from_millis(20))
                        .set_max_delay(Duration::from_millis(500))
                };
                let client = redis::Client::open(info.clone()).map_err(io)?;
                let data = ConnectionManager::new_lazy_with_config(client.clone(), manager_config()).map_err(io)?;
                let durable = if config.wait_replicas > 0 {
                    (0..DURABLE_CONNECTIONS)
                        .map(|_| {
                            ConnectionManager::new_lazy_with_config(client.clone(), manager_config()).map(Conn::Single)
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(io)?
                } else {
                    Vec::new()
                };
                let resp3 = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                let sub_client = redis::Client::open(info.set_redis_settings(resp3)).map_err(io)?;
                let pubsub = ConnectionManager::new_lazy_with_config(
                    sub_client,
                    manager_config().set_push_sender(push).set_automatic_resubscription(),
                )
                .map_err(io)?;
                (Conn::Single(data), durable, Conn::Single(pubsub))
            }
            None => {
                let cluster_config = || ClusterConfig::new().set_connection_timeout(op).set_response_timeout(op);
                let client = ClusterClientBuilder::new(config.cluster.clone())
                    .retries(3)
                    .build()
                    .map_err(io)?;
                let data = client.get_pending_async_connection_with_config(cluster_config());
                let sub_client = ClusterClientBuilder::new(config.cluster.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .retries(3)
                    .build()
                    .map_err(io)?;
                let pubsub =
                    sub_client.get_pending_async_connection_with_config(cluster_config().set_push_sender(push));
                // One connection per node already; WAIT is routed to the
                // key's primary on it.
                (Conn::Cluster(data), Vec::new(), Conn::Cluster(pubsub))
            }
        };
        let _ = notifier.conn.set(pubsub);
        let store = RedisStore {
            inner: Arc::new(Inner {
                data,
                durable,
                next_durable: AtomicUsize::new(0),
                settling: AtomicUsize::new(0),
                notifier,
                prefix: config.key_prefix.clone(),
                lease: config.lease,
                op_timeout: op,
                wait_replicas: config.wait_replicas,
            }),
        };
        // Load the scripts now so the first request pays no NOSCRIPT round
        // trip; Redis being down at start is not fatal (readyz says so).
        let load = async {
            for s in [&*CLAIM, &*FINISH, &*RENEW, &*READ, &*DELETE] {
                store.inner.data.load(s).await?;
            }
            Ok::<_, redis::RedisError>(())
        };
        if let Err(e) = store.bounded(load).await {
            tracing::warn!(error = %e, "redis is not reachable yet; keyed requests get 503 until it is");
        }
        Ok(store)
    }

    /// Runs one Redis operation within `op_timeout`.
    async fn bounded<T>(&self, f: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.inner.op_timeout, f).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(r) => r.map_err(io),
        }
    }

    /// The Redis key of a record: `{prefix}:{<32 hex>}`.
    fn key(&self, key: &RecordKey) -> String {
        let digest = Sha256::digest(key.as_bytes());
        let hex = hex::encode(&digest[..16]);
        format!("{}:{{{hex}}}", self.inner.prefix)
    }

    fn lease_ms(&self) -> u64 {
        self.inner.lease.as_millis() as u64
    }

    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    pub async fn claim(&self, key: &RecordKey, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let k = self.key(key);
        let mut inv = CLAIM.prepare_invoke();
        inv.key(&k)
            .key(response_key(&k))
            .arg(token_str(req.token))
            .arg(fp_bytes(req.fingerprint.as_ref()))
            .arg(req.now)
            .arg(req.now + req.inflight_ttl)
            .arg(req.now + req.retry_delay)
            .arg(req.inflight_ttl.max(1))
            .arg(if req.lost_retry { "1" } else { "0" })
            .arg(self.lease_ms())
            .arg(channel(&k));
        let v: Vec<Value> = match tokio::time::timeout(self.inner.op_timeout, self.inner.data.script(&inv)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                // Sent but unanswered: Redis may still apply it.
                if e.is_timeout() || e.is_connection_dropped() {
                    self.settle_later(k, req.token, Finish::Release);
                }
                return Err(io(e));
            }
            Err(_) => {
                self.settle_later(k, req.token, Finish::Release);
                return Err(StoreError::Timeout);
            }
        };
        match int(v.first())? {
            0 => Ok(Claim::Acquired),
            1 => Ok(Claim::InFlight {
                started_at: int(v.get(1))?,
            }),
            2 => match decode(v.get(1))?.at(req.now, 0) {
                Some(Record::Completed(c)) => Ok(Claim::Completed(c)),
                Some(Record::Expired(t)) => Ok(Claim::Expired(t)),
                _ => Err(corrupt("completed record")),
            },
            3 => Ok(Claim::Lost(Lost {
                fingerprint: fingerprint(v.get(1))?,
                started_at: int(v.get(2))?,
                expires_at: int(v.get(3))?,
                retry_at: int(v.get(4))?,
            })),
            4 => Ok(Claim::Mismatch),
            5 => Ok(Claim::Expired(Tombstone {
                fingerprint: fingerprint(v.get(1))?,
                completed_at: int(v.get(2))?,
                until: int(v.get(3))?,
            })),
            _ => Err(corrupt("claim code")),
        }
    }

    pub async fn finish(&self, key: &RecordKey, token: Token, how: &Finish) -> Result<(), StoreError> {
        let k = self.key(key);
        let (inv, stored) = finish_invocation(&k, token, how, now_ms());
        let replicate = stored && self.inner.wait_replicas > 0;
        let conn = if replicate && !self.inner.durable.is_empty() {
            let i = self.inner.next_durable.fetch_add(1, Ordering::Relaxed) % self.inner.durable.len();
            &self.inner.durable[i]
        } else {
            &self.inner.data
        };
        let owned: i64 = match tokio::time::timeout(self.inner.op_timeout, conn.script(&inv)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                if e.is_timeout() || e.is_connection_dropped() {
                    self.settle_later(k, token, how.clone());
                }
                return Err(io(e));
            }
            Err(_) => {
                self.settle_later(k, token, how.clone());
                return Err(StoreError::Timeout);
            }
        };
        if owned == 0 {
            return Err(record::NotOwner.into());
        }
        if replicate {
            self.replicate(conn, &k).await;
        }
        Ok(())
    }

    /// A claim or finish whose reply timed out may still be applied by Redis
    /// (it was slow, not gone). After a claim the client was told nothing
    /// was forwarded, so the claim is released here (`how` = release):
    /// otherwise the key would sit in flight, then `lost`, and every retry
    /// would get 409 `outcome_unknown`. After a finish, the finish is
    /// repeated so the response still gets stored (or the key freed). The
    /// token check makes repeating harmless; the same connection keeps it
    /// after the original if that is still queued. Retried in the background
    /// until Redis answers either way.
    fn settle_later(&self, k: String, token: Token, how: Finish) {
        let inner = &self.inner;
        if inner.settling.fetch_add(1, Ordering::AcqRel) >= MAX_SETTLING {
            inner.settling.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(
                "too many timed-out store operations to settle; this key may stay in flight until its lease ends"
            );
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            let give_up = tokio::time::Instant::now() + SETTLE_FOR.max(store.inner.lease);
            let mut pause = Duration::from_millis(20);
            loop {
                let (inv, _) = finish_invocation(&k, token, &how, now_ms());
                match store.bounded(store.inner.data.script::<i64>(&inv)).await {
                    Ok(1) => {
                        tracing::info!(
                            finish = kind(&how),
                            "settled a store operation whose reply had timed out"
                        );
                        break;
                    }
                    Ok(_) => break,
                    Err(_) if tokio::time::Instant::now() < give_up => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "could not settle a timed-out store operation; the key may stay in flight until its lease ends");
                        break;
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            store.inner.settling.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// `WAIT wait_replicas timeout` after a stored response, with Redis's
    /// own timeout at ¾ of `op_timeout` so that it answers (with the count
    /// it got) before the connection's `op_timeout` gives up on it. Fewer
    /// acks are logged, not failed: the response is on the primary already
    /// and a retry would be replayed from it; failing would only turn an
    /// executed request into a 503.
    async fn replicate(&self, conn: &Conn, key: &str) {
        let want = self.inner.wait_replicas;
        let limit = self.inner.op_timeout;
        match tokio::time::timeout(limit, conn.wait(key, want, limit * 3 / 4)).await {
            Ok(Ok(acks)) if acks >= i64::from(want) => {}
            Ok(Ok(acks)) => tracing::warn!(
                acks,
                wait_replicas = want,
                "stored response acknowledged by fewer Redis replicas than wait_replicas; a failover now could lose it"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "WAIT for Redis replicas failed"),
            Err(_) => tracing::warn!("WAIT for Redis replicas timed out"),
        }
    }

    pub async fn renew(&self, key: &RecordKey, token: Token) -> Result<(), StoreError> {
        let k = self.key(key);
        let mut inv = RENEW.prepare_invoke();
        inv.key(&k).arg(token_str(token)).arg(self.lease_ms());
        let owned: i64 = self.bounded(self.inner.data.script(&inv)).await?;
        if owned == 0 {
            return Err(record::NotOwner.into());
        }
        Ok(())
    }

    /// The raw fields and Redis's clock; the response too if `response`.
    async fn read(&self, k: &str, response: bool) -> Result<Vec<Value>, StoreError> {
        let mut inv = READ.prepare_invoke();
        inv.key(k).key(response_key(k)).arg(if response { "1" } else { "0" });
        self.bounded(self.inner.data.script(&inv)).await
    }

    /// The record with its lease judged: an in-flight record whose lease ran
    /// out is reported `Lost` (the next claim persists that).
    pub async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let v = self.read(&self.key(key), true).await?;
        let server_now = int(v.get(9))?;
        let field = |i: usize| v.get(i).filter(|v| !matches!(v, Value::Nil));
        let Some(state) = field(0) else {
            return Ok(None);
        };
        let lost = || -> Result<Record, StoreError> {
            Ok(Record::Lost(Lost {
                fingerprint: fingerprint(field(2))?,
                started_at: int(field(3))?,
                expires_at: int(field(4))?,
                retry_at: int(field(5))?,
            }))
        };
        Ok(Some(match bytes(Some(state))? {
            b"c" if field(8).is_some() => decode(field(8))?,
            // The response has expired: the tombstone is all that is left.
            b"c" => Record::Expired(Tombstone {
                fingerprint: fingerprint(field(2))?,
                completed_at: int(field(3))?,
                until: field(7).map_or(Ok(0), |x| int(Some(x)))?,
            }),
            b"l" => lost()?,
            b"f" if server_now >= int(field(6))? => lost()?,
            b"f" => Record::InFlight(InFlight {
                token: parse_token(bytes(field(1))?).ok_or_else(|| corrupt("token"))?,
                fingerprint: fingerprint(field(2))?,
                started_at: int(field(3))?,
                expires_at: int(field(4))?,
                retry_at: int(field(5))?,
            }),
            _ => return Err(corrupt("state")),
        }))
    }

    /// How long the key's current owner still holds its lease, or `None`
    /// when the key is not a live in-flight record any more.
    async fn lease_left(&self, k: &str) -> Result<Option<Duration>, StoreError> {
        let v = self.read(k, false).await?;
        let in_flight = matches!(v.first(), Some(Value::BulkString(s)) if s == b"f");
        if !in_flight {
            return Ok(None);
        }
        let left = int(v.get(6))?.saturating_sub(int(v.get(9))?);
        Ok((left > 0).then(|| Duration::from_millis(left)))
    }

    pub async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let k = self.key(key);
        let mut inv = DELETE.prepare_invoke();
        inv.key(&k).key(response_key(&k)).arg(channel(&k));
        let n: i64 = self.bounded(self.inner.data.script(&inv)).await?;
        Ok(n > 0)
    }

    pub async fn probe(&self) -> Result<(), StoreError> {
        let _: Value = self.bounded(self.inner.data.query(&redis::cmd("PING"))).await?;
        Ok(())
    }

    /// Resolves when `key` may have changed: a notification on its channel,
    /// its owner's lease running out, or at once if it is no longer a live
    /// in-flight record (or Redis cannot tell: the caller's next claim will
    /// report the failure).
    pub async fn wait_change(&self, key: &RecordKey) {
        let k = self.key(key);
        let mut waiter = Notifier::join(&self.inner.notifier, channel(&k)).await;
        let left = match self.lease_left(&k).await {
            Ok(Some(left)) => left,
            Ok(None) | Err(_) => return,
        };
        let limit = if waiter.subscribed {
            left + LEASE_MARGIN
        } else {
            left.min(POLL_WITHOUT_SUBSCRIPTION)
        };
        tokio::select! {
            _ = waiter.rx.changed() => {}
            () = tokio::time::sleep(limit) => {}
        }
    }
}

/// The finish script's invocation; true when it stores a response.
fn finish_invocation(k: &str, token: Token, how: &Finish, now: u64) -> (ScriptInvocation<'static>, bool) {
    let mut inv = FINISH.prepare_invoke();
    inv.key(k).key(response_key(k)).arg(token_str(token));
    let stored = match how {
        Finish::Store(c) if gone_at(c) > now => {
            inv.arg("s")
                .arg(channel(k))
                .arg(Record::Completed(c.clone()).encode())
                .arg(gone_at(c) - now)
                .arg(fp_bytes(c.fingerprint.as_ref()))
                .arg(c.expires_at)
                .arg(c.tombstone_until)
                .arg(c.stored_at)
                .arg(c.expires_at.saturating_sub(now));
            true
        }
        Finish::Store(_) | Finish::Release => {
            inv.arg("r").arg(channel(k));
            false
        }
        Finish::Lost => {
            inv.arg("l").arg(channel(k));
            false
        }
    };
    (inv, stored)
}

fn kind(how: &Finish) -> &'static str {
    match how {
        Finish::Store(_) => "store",
        Finish::Release => "release",
        Finish::Lost => "lost",
    }
}

fn gone_at(c: &Completed) -> u64 {
    c.expires_at.max(c.tombstone_until)
}

/// The channel a record's changes are published on (same hash tag).
fn channel(redis_key: &str) -> String {
    format!("{redis_key}:changed")
}

/// Where a completed record keeps its response (same hash tag).
fn response_key(redis_key: &str) -> String {
    format!("{redis_key}:rec")
}

fn token_str(t: Token) -> String {
    format!("{:016x}.{:016x}", t.instance, t.seq)
}

fn parse_token(b: &[u8]) -> Option<Token> {
    let s = std::str::from_utf8(b).ok()?;
    let (i, q) = s.split_once('.')?;
    Some(Token {
        instance: u64::from_str_radix(i, 16).ok()?,
        seq: u64::from_str_radix(q, 16).ok()?,
    })
}

fn fp_bytes(fp: Option<&record::Fingerprint>) -> &[u8] {
    fp.map_or(&[][..], |f| &f[..])
}

fn bytes(v: Option<&Value>) -> Result<&[u8], StoreError> {
    match v {
        Some(Value::BulkString(b)) => Ok(b),
        Some(Value::SimpleString(s)) => Ok(s.as_bytes()),
        _ => Err(corrupt("expected a string")),
    }
}

fn int(v: Option<&Value>) -> Result<u64, StoreError> {
    match v {
        Some(Value::Int(i)) => u64::try_from(*i).map_err(|_| corrupt("negative number")),
        other => std::str::from_utf8(bytes(other)?)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("expected a number")),
    }
}

fn fingerprint(v: Option<&Value>) -> Result<Option<record::Fingerprint>, StoreError> {
    let b = match v {
        None | Some(Value::Nil) => return Ok(None),
        Some(v) => bytes(Some(v))?,
    };
    if b.is_empty() {
        return Ok(None);
    }
    b.try_into().map(Some).map_err(|_| corrupt("fingerprint"))
}

fn decode(v: Option<&Value>) -> Result<Record, StoreError> {
    Record::decode(bytes(v)?).map_err(|e| StoreError::Corrupt(Arc::new(e)))
}

// ---------------------------------------------------------------- pub/sub

/// One RESP3 subscriber connection per process, fanned out to local waiters.
struct Notifier {
    conn: std::sync::OnceLock<Conn>,
    channels: Arc<Mutex<HashMap<String, Arc<Channel>>>>,
    op_timeout: Duration,
}

struct Channel {
    /// Local waiters; changed only under the `channels` lock.
    waiters: AtomicUsize,
    /// Whether Redis confirmed our subscription. Every SUBSCRIBE and
    /// UNSUBSCRIBE of this channel happens under this lock, in order.
    subscribed: tokio::sync::Mutex<bool>,
    changed: watch::Sender<u64>,
}

/// A push from Redis: wake the channel's waiters; a lost connection wakes
/// everyone, since messages may have been missed while it was down.
fn on_push(channels: &Mutex<HashMap<String, Arc<Channel>>>, info: PushInfo) {
    let map = channels.lock().unwrap_or_else(|e| e.into_inner());
    match info.kind {
        PushKind::Message | PushKind::SMessage => {
            if let Some(Value::BulkString(name)) = info.data.first() {
                if let Some(c) = std::str::from_utf8(name).ok().and_then(|n| map.get(n)) {
                    c.changed.send_modify(|v| *v += 1);
                }
            }
        }
        PushKind::Disconnection => map.values().for_each(|c| c.changed.send_modify(|v| *v += 1)),
        _ => {}
    }
}

/// One local waiter on a channel; leaving unsubscribes the last one.
struct Waiter {
    notifier: Arc<Notifier>,
    name: String,
    channel: Arc<Channel>,
    rx: watch::Receiver<u64>,
    subscribed: bool,
}

impl Notifier {
    fn conn(&self) -> &Conn {
        self.conn.get().expect("set at open")
    }

    async fn join(this: &Arc<Notifier>, name: String) -> Waiter {
        let channel = {
            let mut map = this.channels.lock().unwrap_or_else(|e| e.into_inner());
            let c = map
                .entry(name.clone())
                .or_insert_with(|| {
                    Arc::new(Channel {
                        waiters: AtomicUsize::new(0),
                        subscribed: tokio::sync::Mutex::new(false),
                        changed: watch::Sender::new(0),
                    })
                })
                .clone();
            c.waiters.fetch_add(1, Ordering::AcqRel);
            c
        };
        // Subscribed to the watch before Redis confirms: nothing published
        // after the confirmation can slip by.
        let rx = channel.changed.subscribe();
        let mut waiter = Waiter {
            notifier: this.clone(),
            name,
            channel,
            rx,
            subscribed: false,
        };
        let mut subscribed = waiter.channel.subscribed.lock().await;
        if !*subscribed {
            match tokio::time::timeout(this.op_timeout, this.conn().subscribe(&waiter.name)).await {
                Ok(Ok(())) => *subscribed = true,
                Ok(Err(e)) => tracing::warn!(error = %e, "redis SUBSCRIBE failed; polling instead"),
                Err(_) => tracing::warn!("redis SUBSCRIBE timed out; polling instead"),
            }
        }
        waiter.subscribed = *subscribed;
        drop(subscribed);
        waiter
    }

    async fn leave(self: Arc<Self>, name: String, channel: Arc<Channel>) {
        let mut subscribed = channel.subscribed.lock().await;
        if channel.waiters.load(Ordering::Acquire) > 0 {
            return;
        }
        if *subscribed {
            // Not knowing whether it went through is fine: a stray
            // subscription only delivers messages nobody listens to.
            let _ = tokio::time::timeout(self.op_timeout, self.conn().unsubscribe(&name)).await;
            *subscribed = false;
        }
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if channel.waiters.load(Ordering::Acquire) == 0 && map.get(&name).is_some_and(|c| Arc::ptr_eq(c, &channel)) {
            map.remove(&name);
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let last = {
            let _map = self.notifier.channels.lock().unwrap_or_else(|e| e.into_inner());
            self.channel.waiters.fetch_sub(1, Ordering::AcqRel) == 1
        };
        if last {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(self.notifier.clone().leave(self.name.clone(), self.channel.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let t = Token {
            instance: u64::MAX - 3,
            seq: 42,
        };
        assert_eq!(parse_token(token_str(t).as_bytes()), Some(t));
        assert_eq!(parse_token(b"nonsense"), None);
    }

    #[test]
    fn key_layout_keeps_one_slot() {
        let k = format!(
            "p:{{{}}}",
            hex::encode(&Sha256::digest(RecordKey::new("t", "k").as_bytes())[..16])
        );
        assert_eq!(k.len(), "p:{}".len() + 32);
        let slot = redis::cluster_routing::Slot::for_key(&k);
        assert_eq!(slot, redis::cluster_routing::Slot::for_key(channel(&k)));
        assert_eq!(slot, redis::cluster_routing::Slot::for_key(response_key(&k)));
    }
}
