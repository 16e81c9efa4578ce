//! One connection handle over standalone Redis or a Redis Cluster, so the
//! store's code is written once. Both kinds reconnect by themselves;
//! cloning shares the underlying connection.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, FromRedisValue, Script, ScriptInvocation};

/// A connection to standalone Redis or to a cluster. Both reconnect by
/// themselves; cloning shares the underlying connection.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    pub async fn script<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
        }
    }

    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    pub async fn load(&self, script: &Script) -> redis::RedisResult<String> {
        match self {
            Conn::Single(c) => script.load_async(&mut c.clone()).await,
            Conn::Cluster(c) => script.load_async(&mut c.clone()).await,
        }
    }

    pub async fn subscribe(&self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Conn::Single(c) => c.clone().subscribe(channel).await,
            Conn::Cluster(c) => c.clone().subscribe(channel).await,
        }
    }

    pub async fn unsubscribe(&self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Conn::Single(c) => c.clone().unsubscribe(channel).await,
            Conn::Cluster(c) => c.clone().unsubscribe(channel).await,
        }
    }

    /// `WAIT replicas timeout` for the writes this connection made to `key`.
    pub async fn wait(&self, key: &str, replicas: u32, timeout: Duration) -> redis::RedisResult<i64> {
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
