//! The config file exactly as written: serde structs that mirror the TOML,
//! every field optional so that "absent" and "set to the default" stay
//! distinguishable (settings of another store backend are errors), and
//! `deny_unknown_fields` everywhere so a typo is an error, not a silent default.

use serde::Deserialize;

use super::units::{ByteSize, HumanDuration, StatusPattern};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub idempotency: RawPolicy,
    pub routes: Option<Vec<RawPolicy>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub shutdown_grace: Option<HumanDuration>,
    pub tls: Option<RawTls>,
    pub status_path: Option<String>,
    pub log_format: Option<String>,
    pub header_read_timeout: Option<HumanDuration>,
    pub body_read_timeout: Option<HumanDuration>,
    pub idle_timeout: Option<HumanDuration>,
    pub max_connections: Option<u32>,
    pub workers: Option<u32>,
    pub max_keyed_requests: Option<u32>,
    pub max_keyed_buffer: Option<ByteSize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Option<String>,
    pub connect_timeout: Option<HumanDuration>,
    pub timeout: Option<HumanDuration>,
    pub ca_file: Option<String>,
    pub pool_idle_timeout: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<String>,
    // sled
    pub path: Option<String>,
    pub sync: Option<String>,
    pub sweep_interval: Option<HumanDuration>,
    pub cache_capacity: Option<ByteSize>,
    // redis
    pub url: Option<String>,
    pub cluster: Option<Vec<String>>,
    pub key_prefix: Option<String>,
    pub lease: Option<HumanDuration>,
    pub op_timeout: Option<HumanDuration>,
    pub wait_replicas: Option<u32>,
}

/// `[idempotency]` and each `[[routes]]` entry share these fields. `path` and
/// `enabled` only make sense on a route; validation rejects them under
/// `[idempotency]`. (One struct instead of a flattened one because serde's
/// `flatten` cannot be combined with `deny_unknown_fields`.)
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub path: Option<String>,
    pub enabled: Option<bool>,
    pub header: Option<String>,
    pub methods: Option<Vec<String>>,
    pub required: Option<bool>,
    pub ttl: Option<HumanDuration>,
    pub tombstone_ttl: Option<HumanDuration>,
    pub wait_timeout: Option<HumanDuration>,
    pub fingerprint: Option<bool>,
    pub max_body: Option<ByteSize>,
    pub max_response_body: Option<ByteSize>,
    pub store_statuses: Option<Vec<StatusPattern>>,
    pub never_store: Option<Vec<StatusPattern>>,
    pub on_lost_outcome: Option<String>,
    pub max_waiters: Option<u32>,
    pub tenant: Option<RawTenant>,
    pub derive_key: Option<bool>,
    pub stream_types: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "from", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawTenant {
    Authorization,
    Header {
        name: String,
    },
    None,
    Jwt {
        claim: Option<String>,
        hs256_secret_env: Option<String>,
        jwks_file: Option<String>,
        verify: Option<bool>,
    },
}
