//! The shared backend: one Redis (standalone or Redis Cluster) for every
//! replica, so that the replicas behave as one process (SPEC §5).
//!
//! # Layout
//!
//! One hash per tenant + key at `{key_prefix}:{h}` where `h` is the first 32
//! hex digits of SHA-256(tenant NUL key). The braces are a Redis Cluster hash
//! tag: the record and its companions (see [`scripts`]) live in one slot, so
//! every script touches one slot. Fields:
//!
//! | field | meaning |
//! |---|---|
//! | `s` | state: `f` in flight, `c` completed, `l` lost |
//! | `t` | owner token |
//! | `fp` | request fingerprint, raw bytes; empty = not fingerprinted |
//! | `b` | started_at (in flight, lost) or stored_at (completed), ms, shown only |
//! | `e` | expires_at, ms, shown only (Redis expires the keys) |
//! | `r` | retry_at, ms, **Redis clock** (`on_lost_outcome = "retry"`) |
//! | `l` | lease_until, ms, **Redis clock** (in flight only) |
//! | `x` | tombstone_until (completed only; 0 = none) |
//!
//! A completed record keeps its response (the whole [`Record::Completed`],
//! [`Record::encode`]d) in a second key, `{key_prefix}:{h}:rec`, which Redis
//! expires at `expires_at`, while the hash lives until `tombstone_until` if
//! that is later: an expired key then costs only the small hash (SPEC §6).
//! Two keys cost less than one even without a tombstone: a response in a
//! hash field (longer than `hash-max-listpack-value`, 64 bytes) would turn
//! the whole hash from a compact listpack into a hash table.
//!
//! # Clocks
//!
//! Whether a key exists, has expired or may be taken is decided inside
//! Redis only: by key expiry (set relative, `PEXPIRE` of `gone_at - now` on
//! the writing replica) and by Redis's own clock (`TIME`) for leases and
//! `retry_at`. A replica whose clock is off can neither take a live claim
//! nor make a record live longer or shorter. Replica timestamps are kept
//! only to be shown (`stored_at`, `Age`), and the records API reports
//! expiry times as "now + what Redis says is left".
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
//! A claim that finds a live owner registers the caller's token as a waiter
//! and [`RedisStore::wait_change`] subscribes to the record's channel
//! ([`pubsub`]). When the owner stores a response the waiter's next claim
//! replays it; when the owner ends without storing (a 5xx, a `never_store`
//! status, 502 refused, an unknown outcome, a coalesce-only route), its
//! finish script leaves the [`Ending`] for the registered waiters, who
//! answer with it and never execute the key themselves. A waiter also
//! returns when the owner's lease runs out, so a dead owner's key turns
//! `lost` promptly.
//!
//! # Replies that never came
//!
//! A claim repeated after a lost reply (a client-side retry of the script)
//! finds its own token and is acquired, not "in flight". A claim or finish
//! that timed out is settled in the background until Redis answers
//! ([`settle`]): after any outage every key is either stored or free.

mod conn;
mod ending;
mod pubsub;
mod scripts;
mod settle;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, Value};
use sha2::{Digest, Sha256};

use self::conn::Conn;
pub use self::ending::Ending;
use self::pubsub::Notifier;
use self::scripts::{Finishing, Keys};
use self::settle::{Op, Settler};
use super::record::{self, Claim, ClaimRequest, Finish, InFlight, Lost, Record, Token, Tombstone};
use super::{now_ms, RecordKey, StoreError};
use crate::config::RedisConfig;

/// Connections that `finish` + `WAIT` use when `wait_replicas > 0`: `WAIT`
/// blocks its connection until the replicas answer, so it must not sit in
/// front of other requests' claims on the shared connection.
const DURABLE_CONNECTIONS: usize = 4;

/// How often a waiter re-reads the key when its subscription failed.
const POLL_WITHOUT_SUBSCRIPTION: Duration = Duration::from_millis(100);

/// Margin past the owner's lease before a waiter re-claims.
const LEASE_MARGIN: Duration = Duration::from_millis(5);

/// The Redis store handle. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    data: Conn,
    durable: Vec<Conn>,
    next_durable: AtomicUsize,
    settler: Settler,
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

/// What a waiter on another replica finds.
enum Awaited {
    /// The owner it waited for ended without storing: answer with this.
    Ended(Ending),
    /// A live owner still runs; its lease lasts this much longer.
    Running(Duration),
    /// Neither: claim again (a stored response, a freed or lost key).
    Changed,
}

impl RedisStore {
    /// Connects lazily: the proxy starts (not ready) even while Redis is
    /// down, and every operation reconnects as needed.
    pub async fn open(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        let op = config.op_timeout;
        let notifier = Notifier::new(op);
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
                    manager_config()
                        .set_push_sender(notifier.on_push())
                        .set_automatic_resubscription(),
                )
                .map_err(io)?;
                (Conn::Single(data), durable, Conn::Single(pubsub))
            }
            None => {
                let cluster_config = || ClusterConfig::new().set_connection_timeout(op).set_response_timeout(op);
                // The client retries a command whose connection broke; the
                // scripts recognise a repeat by its token (module docs).
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
                let pubsub = sub_client
                    .get_pending_async_connection_with_config(cluster_config().set_push_sender(notifier.on_push()));
                // One connection per node already; WAIT is routed to the
                // key's primary on it.
                (Conn::Cluster(data), Vec::new(), Conn::Cluster(pubsub))
            }
        };
        notifier.set_conn(pubsub);
        let store = RedisStore {
            inner: Arc::new(Inner {
                settler: Settler::start(data.clone(), op),
                data,
                durable,
                next_durable: AtomicUsize::new(0),
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
            for s in scripts::all() {
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

    /// Runs a script whose effect must not be left undecided: when Redis
    /// may have applied it without the reply reaching us, `unsettled` is
    /// handed to the settler.
    async fn decisive<T: redis::FromRedisValue>(
        &self,
        conn: &Conn,
        inv: &redis::ScriptInvocation<'_>,
        unsettled: impl FnOnce() -> (Keys, Token, Op),
    ) -> Result<T, StoreError> {
        let e = match tokio::time::timeout(self.inner.op_timeout, conn.script(inv)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if e.is_timeout() || e.is_connection_dropped() => io(e),
            Ok(Err(e)) => return Err(io(e)),
            Err(_) => StoreError::Timeout,
        };
        let (keys, token, op) = unsettled();
        self.inner.settler.add(keys, token, op);
        Err(e)
    }

    /// The Redis keys of a record: `{prefix}:{<32 hex>}` and its companions.
    fn keys(&self, key: &RecordKey) -> Keys {
        let digest = Sha256::digest(key.as_bytes());
        let hex = hex::encode(&digest[..16]);
        Keys::of(format!("{}:{{{hex}}}", self.inner.prefix))
    }

    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    pub async fn claim(&self, key: &RecordKey, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let k = self.keys(key);
        let mut inv = scripts::CLAIM.prepare_invoke();
        scripts::claim_keys(&k, &mut inv);
        inv.arg(scripts::token_str(req.token))
            .arg(scripts::fp_bytes(req.fingerprint.as_ref()))
            .arg(req.now)
            .arg(req.now + req.inflight_ttl)
            .arg(req.retry_delay)
            .arg(req.inflight_ttl.max(1))
            .arg(if req.lost_retry { "1" } else { "0" })
            .arg(self.inner.lease.as_millis() as u64)
            .arg(&k.channel);
        // The caller answers 503 and forwards nothing: a claim that landed
        // anyway is cancelled.
        let v: Vec<Value> = self
            .decisive(&self.inner.data, &inv, || (k.clone(), req.token, Op::Cancel))
            .await?;
        match int(v.first())? {
            0 => Ok(Claim::Acquired),
            1 => Ok(Claim::InFlight {
                started_at: int(v.get(1))?,
            }),
            // Redis has judged it alive: no replica clock is asked again.
            2 => match decode(v.get(1))? {
                Record::Completed(c) => Ok(Claim::Completed(c)),
                _ => Err(corrupt("completed record")),
            },
            3 => Ok(Claim::Lost(Lost {
                fingerprint: fingerprint(v.get(1))?,
                started_at: int(v.get(2))?,
                expires_at: req.now + int(v.get(3))?,
                retry_at: req.now + int(v.get(4))?,
            })),
            4 => Ok(Claim::Mismatch),
            5 => Ok(Claim::Expired(Tombstone {
                fingerprint: fingerprint(v.get(1))?,
                completed_at: int(v.get(2))?,
                until: int(v.get(3))?,
            })),
            6 => Err(StoreError::Io("redis: this claim was already given up".into())),
            _ => Err(corrupt("claim code")),
        }
    }

    /// Finishes `token`'s claim; when nothing is stored, `ending` is left
    /// for `keep` to the duplicates that other replicas hold for it.
    pub async fn finish(
        &self,
        key: &RecordKey,
        token: Token,
        how: &Finish,
        ending: Option<&Ending>,
        keep: Duration,
    ) -> Result<(), StoreError> {
        let k = self.keys(key);
        let f = Finishing::new(how.clone(), ending, ending::keep_ms(keep));
        let (inv, stored) = scripts::finish(&k, token, &f, now_ms());
        let replicate = stored && self.inner.wait_replicas > 0;
        let conn = if replicate && !self.inner.durable.is_empty() {
            let i = self.inner.next_durable.fetch_add(1, Ordering::Relaxed) % self.inner.durable.len();
            &self.inner.durable[i]
        } else {
            &self.inner.data
        };
        // The response may already be on its way to the client: a finish
        // that did not answer is repeated until it does.
        let record = k.record.clone();
        let owned: i64 = self.decisive(conn, &inv, || (k, token, Op::Finish(f))).await?;
        if owned == 0 {
            return Err(record::NotOwner.into());
        }
        if replicate {
            self.replicate(conn, &record).await;
        }
        Ok(())
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
        let k = self.keys(key);
        let mut inv = scripts::RENEW.prepare_invoke();
        inv.key(&k.record)
            .arg(scripts::token_str(token))
            .arg(self.inner.lease.as_millis() as u64);
        let owned: i64 = self.bounded(self.inner.data.script(&inv)).await?;
        if owned == 0 {
            return Err(record::NotOwner.into());
        }
        Ok(())
    }

    /// The record with its lease judged, its times in this replica's clock
    /// (now + what Redis says is left): an in-flight record whose lease ran
    /// out is reported `Lost` (the next claim persists that).
    pub async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let k = self.keys(key);
        let mut inv = scripts::READ.prepare_invoke();
        inv.key(&k.record).key(&k.response);
        let v: Vec<Value> = self.bounded(self.inner.data.script(&inv)).await?;
        let now = now_ms();
        let field = |i: usize| v.get(i).filter(|v| !matches!(v, Value::Nil));
        let Some(state) = field(0) else {
            return Ok(None);
        };
        let server_now = int(v.get(9))?;
        let left = |i: usize| match v.get(i) {
            Some(Value::Int(ms)) if *ms > 0 => now + *ms as u64,
            _ => now,
        };
        let on_redis_clock =
            |i: usize| -> Result<u64, StoreError> { Ok(now + int(field(i))?.saturating_sub(server_now)) };
        let lost = || -> Result<Record, StoreError> {
            Ok(Record::Lost(Lost {
                fingerprint: fingerprint(field(2))?,
                started_at: int(field(3))?,
                expires_at: left(10),
                retry_at: on_redis_clock(5)?,
            }))
        };
        Ok(Some(match bytes(Some(state))? {
            b"c" if field(8).is_some() => match decode(field(8))? {
                Record::Completed(mut c) => {
                    let times = Arc::make_mut(&mut c);
                    times.expires_at = left(11);
                    if times.tombstone_until > 0 {
                        times.tombstone_until = left(10);
                    }
                    Record::Completed(c)
                }
                _ => return Err(corrupt("completed record")),
            },
            // The response has expired: the tombstone is all that is left.
            b"c" => Record::Expired(Tombstone {
                fingerprint: fingerprint(field(2))?,
                completed_at: int(field(3))?,
                until: left(10),
            }),
            b"l" => lost()?,
            b"f" if server_now >= int(field(6))? => lost()?,
            b"f" => Record::InFlight(InFlight {
                token: scripts::parse_token(bytes(field(1))?).ok_or_else(|| corrupt("token"))?,
                fingerprint: fingerprint(field(2))?,
                started_at: int(field(3))?,
                expires_at: left(10),
                retry_at: on_redis_clock(5)?,
            }),
            _ => return Err(corrupt("state")),
        }))
    }

    /// What `me`, a waiter, finds now.
    async fn awaited(&self, k: &Keys, me: Token) -> Result<Awaited, StoreError> {
        let mut inv = scripts::AWAIT.prepare_invoke();
        inv.key(&k.record).key(&k.endings).arg(scripts::token_str(me));
        let v: Vec<Value> = self.bounded(self.inner.data.script(&inv)).await?;
        Ok(match int(v.first())? {
            2 => Awaited::Ended(Ending::decode(bytes(v.get(1))?).ok_or_else(|| corrupt("ending"))?),
            1 => Awaited::Running(Duration::from_millis(int(v.get(1))?)),
            _ => Awaited::Changed,
        })
    }

    pub async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let k = self.keys(key);
        let mut inv = scripts::DELETE.prepare_invoke();
        inv.key(&k.record).key(&k.response).key(&k.waiters).arg(&k.channel);
        let n: i64 = self.bounded(self.inner.data.script(&inv)).await?;
        Ok(n > 0)
    }

    pub async fn probe(&self) -> Result<(), StoreError> {
        let _: Value = self.bounded(self.inner.data.query(&redis::cmd("PING"))).await?;
        Ok(())
    }

    /// Waits a little for the operations being settled (at shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let limit = (self.inner.op_timeout * 3).max(Duration::from_secs(2));
        if self.inner.settler.settled(limit).await {
            Ok(())
        } else {
            Err(StoreError::Io(
                "redis: some timed-out operations were not settled before shutdown".into(),
            ))
        }
    }

    /// Waits, as the claim token `me` that found `key` in flight, until the
    /// key may have changed: a notification on its channel, its owner's
    /// lease running out, or at once if it is no longer a live in-flight
    /// record (or Redis cannot tell: the caller's next claim reports the
    /// failure). Returns the owner's [`Ending`] when it ended without
    /// storing anything; otherwise the caller claims again.
    pub async fn wait_change(&self, key: &RecordKey, me: Token) -> Option<Ending> {
        let k = self.keys(key);
        let mut waiter = Notifier::join(&self.inner.notifier, k.channel.clone()).await;
        let left = match self.awaited(&k, me).await {
            Ok(Awaited::Ended(e)) => return Some(e),
            Ok(Awaited::Running(left)) => left,
            Ok(Awaited::Changed) | Err(_) => return None,
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
        // The next claim replays a stored response, or (having seen this
        // token's ending in Redis) answers "in flight" and the next wait
        // returns the ending at once.
        None
    }
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
