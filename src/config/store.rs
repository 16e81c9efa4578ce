//! The `[store]` section: which backend, with its own settings only
//! (another backend's keys are errors naming the key).

use std::path::PathBuf;
use std::time::Duration;

use super::raw::RawStore;
use super::{dur, err, ConfigError};

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Memory {
        sweep_interval: Duration,
    },
    Sled {
        path: PathBuf,
        sync: SyncMode,
        sweep_interval: Duration,
        cache_capacity: u64,
    },
    Redis(RedisConfig),
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: Option<String>,
    pub cluster: Vec<String>,
    pub key_prefix: String,
    pub lease: Duration,
    pub op_timeout: Duration,
    pub wait_replicas: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Flush before forwarding and before answering (group commit).
    Always,
    /// Flush every `FLUSH_INTERVAL`; a crash can lose that much.
    Interval,
}

impl StoreConfig {
    pub(super) fn describe(&self) -> String {
        match self {
            StoreConfig::Memory { .. } => "memory (not durable)".into(),
            StoreConfig::Sled { path, sync, .. } => {
                format!("sled at {} (sync = {:?})", path.display(), sync).to_lowercase()
            }
            StoreConfig::Redis(r) => match &r.url {
                Some(u) => format!("redis {}", redact(u)),
                None => format!("redis cluster of {} seed nodes", r.cluster.len()),
            },
        }
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

pub(super) fn store_config(s: RawStore, file: &str) -> Result<StoreConfig, ConfigError> {
    let e = |key: &str, reason: String| err(file, key, reason);
    let backend = s.backend.as_deref().unwrap_or("sled");
    let sled_keys = [
        ("path", s.path.is_some()),
        ("sync", s.sync.is_some()),
        ("cache_capacity", s.cache_capacity.is_some()),
    ];
    let redis_keys = [
        ("url", s.url.is_some()),
        ("cluster", s.cluster.is_some()),
        ("key_prefix", s.key_prefix.is_some()),
        ("lease", s.lease.is_some()),
        ("op_timeout", s.op_timeout.is_some()),
        ("wait_replicas", s.wait_replicas.is_some()),
    ];
    let reject = |keys: &[(&str, bool)], backend: &str| -> Result<(), ConfigError> {
        match keys.iter().find(|(_, set)| *set) {
            Some((k, _)) => Err(e(
                &format!("store.{k}"),
                format!("not a setting of backend {backend:?}"),
            )),
            None => Ok(()),
        }
    };
    let sweep_interval = dur(s.sweep_interval, 60);
    if sweep_interval.is_zero() {
        return Err(e("store.sweep_interval", "must be greater than 0s".into()));
    }
    match backend {
        "memory" => {
            reject(&sled_keys, backend)?;
            reject(&redis_keys, backend)?;
            Ok(StoreConfig::Memory { sweep_interval })
        }
        "sled" => {
            reject(&redis_keys, backend)?;
            let sync = match s.sync.as_deref().unwrap_or("always") {
                "always" => SyncMode::Always,
                "interval" => SyncMode::Interval,
                other => return Err(e("store.sync", format!("{other:?} is not \"always\" or \"interval\""))),
            };
            let path = s.path.unwrap_or_else(|| "data/idemproxy".to_owned());
            if path.is_empty() {
                return Err(e("store.path", "must not be empty".into()));
            }
            Ok(StoreConfig::Sled {
                path: path.into(),
                sync,
                sweep_interval,
                cache_capacity: s.cache_capacity.map_or(64 << 20, |c| c.0),
            })
        }
        "redis" => {
            reject(&sled_keys, backend)?;
            if s.sweep_interval.is_some() {
                return Err(e(
                    "store.sweep_interval",
                    "not a setting of backend \"redis\" (Redis expires keys itself)".into(),
                ));
            }
            let cluster = s.cluster.unwrap_or_default();
            let url = match (s.url, cluster.is_empty()) {
                (Some(_), false) => {
                    return Err(e(
                        "store.cluster",
                        "set either store.url or store.cluster, not both".into(),
                    ))
                }
                (None, true) => Some("redis://127.0.0.1:6379/0".to_owned()),
                (url, _) => url,
            };
            for (i, u) in url.iter().chain(cluster.iter()).enumerate() {
                if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                    let key = if url.is_some() {
                        "store.url".to_owned()
                    } else {
                        format!("store.cluster[{i}]")
                    };
                    return Err(e(
                        &key,
                        format!("{:?} must start with redis:// or rediss://", redact(u)),
                    ));
                }
            }
            let lease = dur(s.lease, 10);
            if lease < Duration::from_millis(30) {
                return Err(e("store.lease", "must be at least 30ms".into()));
            }
            let op_timeout = s.op_timeout.map_or(Duration::from_secs(1), |d| d.0);
            if op_timeout.is_zero() {
                return Err(e("store.op_timeout", "must be greater than 0s".into()));
            }
            let key_prefix = s.key_prefix.unwrap_or_else(|| "idemproxy".to_owned());
            if key_prefix.is_empty() || key_prefix.contains(['{', '}']) {
                return Err(e(
                    "store.key_prefix",
                    "must be non-empty and contain no '{' or '}'".into(),
                ));
            }
            Ok(StoreConfig::Redis(RedisConfig {
                url,
                cluster,
                key_prefix,
                lease,
                op_timeout,
                wait_replicas: s.wait_replicas.unwrap_or(0),
            }))
        }
        other => Err(e(
            "store.backend",
            format!("{other:?} is not \"sled\", \"memory\" or \"redis\""),
        )),
    }
}
