//! Configuration: the TOML file of SPEC §2, parsed in two steps.
//!
//! [`raw`] mirrors the file with serde (`deny_unknown_fields`, everything
//! optional); [`Config::from_raw`] turns it into the typed, validated
//! [`Config`] the rest of the program uses: `Duration`s, byte counts, compiled
//! route matchers, status bitmaps. Every error carries the file and the dotted
//! key path (`routes[1].ttl`) so one stderr line tells the operator what to fix.

pub mod raw;
pub mod units;

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, Uri};

use self::raw::{RawConfig, RawPolicy, RawStore, RawTenant};
use self::units::StatusSet;

/// Where the config came from, for error messages.
pub const DEFAULT_CONFIG_PATH: &str = "config/idemproxy.toml";

/// A config problem: which file, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config {file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

/// Overrides given on the command line; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub upstream: Option<String>,
    pub data_dir: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from, if any (reload re-reads it).
    pub source: Option<PathBuf>,
    /// The command-line overrides it was loaded with (reload applies them again).
    pub overrides: Overrides,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub store: StoreConfig,
    pub rules: Arc<Rules>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub shutdown_grace: Duration,
    pub tls: Option<TlsFiles>,
    /// `GET {status_path}/{key}` answers a client's own key state; `None` = off.
    pub status_path: Option<String>,
    pub log_format: LogFormat,
    /// How long a client may take to send request headers (slowloris guard).
    pub header_read_timeout: Duration,
    /// Connections accepted at once on the main listener; more wait in the backlog.
    pub max_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: Uri,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub pool_idle_timeout: Duration,
}

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

/// The routing table and idempotency policies; swapped whole on reload.
#[derive(Debug)]
pub struct Rules {
    pub defaults: Arc<Policy>,
    pub routes: Vec<Route>,
}

#[derive(Debug)]
pub struct Route {
    pub pattern: PathPattern,
    pub enabled: bool,
    pub policy: Arc<Policy>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    /// `"/p/*"` is stored as `"/p/"`: matches `/p/` and below, not `/p`.
    Prefix(String),
}

impl PathPattern {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => path == p,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Idempotency settings of one route, with `[idempotency]` inherited.
#[derive(Debug, Clone)]
pub struct Policy {
    pub header: HeaderName,
    pub methods: Vec<Method>,
    pub required: bool,
    /// Zero means coalesce only: nothing is kept after completion.
    pub ttl: Duration,
    /// Zero means off; else longer than `ttl`.
    pub tombstone_ttl: Duration,
    pub wait_timeout: Duration,
    pub fingerprint: bool,
    pub max_body: u64,
    pub max_response_body: u64,
    pub storable: StatusSet,
    pub on_lost_outcome: LostOutcome,
    pub max_waiters: u32,
    pub tenant: TenantSource,
    pub derive_key: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostOutcome {
    Reject,
    Retry,
}

#[derive(Debug, Clone)]
pub enum TenantSource {
    Authorization,
    Header(HeaderName),
    None,
    Jwt(JwtTenant),
}

#[derive(Debug, Clone)]
pub struct JwtTenant {
    pub claim: String,
    pub key: JwtKey,
    /// Built once at load: keys parsed, ready for every request.
    pub verifier: Arc<crate::idempotency::jwt::JwtVerifier>,
}

#[derive(Debug, Clone)]
pub enum JwtKey {
    /// HS256 with the secret read from this environment variable at load.
    Hs256 { env: String, secret: Vec<u8> },
    /// RS256 / ES256 keys from a JWKS file.
    Jwks { file: PathBuf, json: String },
    /// Trust a gateway in front that already verified the token.
    Unverified,
}

impl Rules {
    /// The policy for a request, or `None` when no enabled route matches
    /// (plain pass-through). First match wins.
    pub fn policy_for(&self, method: &Method, path: &str) -> Option<&Arc<Policy>> {
        if self.routes.is_empty() {
            return self.defaults.methods.contains(method).then_some(&self.defaults);
        }
        let route = self
            .routes
            .iter()
            .find(|r| r.pattern.matches(path) && r.policy.methods.contains(method))?;
        route.enabled.then_some(&route.policy)
    }
}

impl Rules {
    /// Like [`Rules::policy_for`], also naming the matched route's index
    /// (`None` for the defaults that apply when there are no routes).
    pub fn route_for(&self, method: &Method, path: &str) -> Option<(Option<usize>, &Arc<Policy>)> {
        if self.routes.is_empty() {
            return self.defaults.methods.contains(method).then_some((None, &self.defaults));
        }
        let (i, route) = self
            .routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.pattern.matches(path) && r.policy.methods.contains(method))?;
        route.enabled.then_some((Some(i), &route.policy))
    }
}

impl Config {
    /// Reads and validates a config file, applying command-line overrides.
    ///
    /// `explicit` says whether the path was named by the user (flag or
    /// environment); only the default path may be absent.
    pub fn load(path: &Path, explicit: bool, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => None,
            Err(e) => return Err(err(&file, "(file)", format!("cannot read: {e}"))),
        };
        let mut raw = match &text {
            Some(t) => parse_toml(&file, t)?,
            None => RawConfig::default(),
        };
        apply_overrides(&mut raw, overrides);
        let mut config = Config::from_raw(raw, &file)?;
        config.source = text.map(|_| path.to_path_buf());
        config.overrides = overrides.clone();
        Ok(config)
    }

    /// Loads only what documentation needs (routes and policies): a file
    /// without `upstream.url` is fine here.
    pub fn load_rules(path: &Path, explicit: bool) -> Result<Arc<Rules>, ConfigError> {
        let file = path.display().to_string();
        let mut raw = match std::fs::read_to_string(path) {
            Ok(t) => parse_toml(&file, &t)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => RawConfig::default(),
            Err(e) => return Err(err(&file, "(file)", format!("cannot read: {e}"))),
        };
        raw.upstream.url.get_or_insert_with(|| "http://127.0.0.1:1".to_owned());
        Ok(Config::from_raw(raw, &file)?.rules)
    }

    /// Validates a parsed file. `file` is only used in error messages.
    pub fn from_raw(raw: RawConfig, file: &str) -> Result<Config, ConfigError> {
        let e = |key: &str, reason: String| err(file, key, reason);
        let s = raw.server;
        let listen = socket_addr(s.listen.as_deref().unwrap_or("0.0.0.0:8080")).map_err(|r| e("server.listen", r))?;
        let admin_listen = socket_addr(s.admin_listen.as_deref().unwrap_or("127.0.0.1:9901"))
            .map_err(|r| e("server.admin_listen", r))?;
        let status_path = match s.status_path.as_deref() {
            None | Some("") => None,
            Some(p) if p.starts_with('/') && !p.ends_with('/') && !p.contains('*') => Some(p.to_owned()),
            Some(p) => {
                return Err(e(
                    "server.status_path",
                    format!("{p:?} must start with '/', not end with '/' and contain no '*'"),
                ))
            }
        };
        let log_format = match s.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(e("server.log_format", format!("{other:?} is not \"text\" or \"json\""))),
        };
        let max_connections = s.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(e("server.max_connections", "must be at least 1".into()));
        }
        let server = ServerConfig {
            listen,
            admin_listen,
            shutdown_grace: dur(s.shutdown_grace, 30),
            tls: s.tls.map(|t| TlsFiles {
                cert: t.cert.into(),
                key: t.key.into(),
            }),
            status_path,
            log_format,
            header_read_timeout: dur(s.header_read_timeout, 10),
            max_connections: max_connections as usize,
        };

        let u = raw.upstream;
        let url = u.url.ok_or_else(|| {
            e(
                "upstream.url",
                "missing; set it in the file or pass --upstream URL".into(),
            )
        })?;
        let url = upstream_url(&url).map_err(|r| e("upstream.url", r))?;
        let upstream = UpstreamConfig {
            url,
            connect_timeout: dur(u.connect_timeout, 2),
            timeout: dur(u.timeout, 60),
            ca_file: u.ca_file.map(PathBuf::from),
            pool_idle_timeout: dur(u.pool_idle_timeout, 90),
        };
        if upstream.timeout.is_zero() {
            return Err(e("upstream.timeout", "must be greater than 0s".into()));
        }
        if upstream.connect_timeout.is_zero() {
            return Err(e("upstream.connect_timeout", "must be greater than 0s".into()));
        }

        let store = store_config(raw.store, file)?;

        let defaults = policy(&raw.idempotency, None, "idempotency", file)?;
        if raw.idempotency.path.is_some() {
            return Err(e("idempotency.path", "only allowed in [[routes]]".into()));
        }
        if raw.idempotency.enabled.is_some() {
            return Err(e(
                "idempotency.enabled",
                "only allowed in [[routes]]; use a route with enabled = false".into(),
            ));
        }
        let mut routes = Vec::new();
        for (i, r) in raw.routes.unwrap_or_default().iter().enumerate() {
            let at = format!("routes[{i}]");
            let path = r.path.as_deref().ok_or_else(|| e(&at, "missing key `path`".into()))?;
            let pattern = path_pattern(path).map_err(|r| e(&format!("{at}.path"), r))?;
            let policy = policy(r, Some(&raw.idempotency), &at, file)?;
            routes.push(Route {
                pattern,
                enabled: r.enabled.unwrap_or(true),
                policy: Arc::new(policy),
            });
        }
        Ok(Config {
            source: None,
            overrides: Overrides::default(),
            server,
            upstream,
            store,
            rules: Arc::new(Rules {
                defaults: Arc::new(defaults),
                routes,
            }),
        })
    }

    /// The human-readable summary `idemproxy check` prints.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "listen        {}", self.server.listen);
        let _ = writeln!(out, "admin_listen  {}", self.server.admin_listen);
        let _ = writeln!(out, "upstream      {}", self.upstream.url);
        let _ = writeln!(out, "store         {}", self.store.describe());
        if self.rules.routes.is_empty() {
            let _ = writeln!(out, "routes        (none: defaults apply to every path)");
            let _ = writeln!(out, "  /*  {}", self.rules.defaults.describe());
        } else {
            let _ = writeln!(out, "routes        (first match wins; unmatched requests pass through)");
            for (i, r) in self.rules.routes.iter().enumerate() {
                if r.enabled {
                    let _ = writeln!(out, "  [{i}] {}  {}", r.pattern, r.policy.describe());
                } else {
                    let _ = writeln!(
                        out,
                        "  [{i}] {}  methods={} disabled (pass-through)",
                        r.pattern,
                        methods_str(&r.policy.methods)
                    );
                }
            }
        }
        out
    }
}

impl StoreConfig {
    fn describe(&self) -> String {
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

impl Policy {
    fn describe(&self) -> String {
        let tenant = match &self.tenant {
            TenantSource::Authorization => "authorization".to_owned(),
            TenantSource::Header(h) => format!("header:{h}"),
            TenantSource::None => "none".to_owned(),
            TenantSource::Jwt(j) => format!("jwt:{}", j.claim),
        };
        format!(
            "methods={} header={} required={} ttl={} wait_timeout={} fingerprint={} max_body={} max_response_body={} on_lost_outcome={:?} max_waiters={} tenant={} derive_key={}",
            methods_str(&self.methods),
            self.header,
            self.required,
            humantime::format_duration(self.ttl),
            humantime::format_duration(self.wait_timeout),
            self.fingerprint,
            self.max_body,
            self.max_response_body,
            self.on_lost_outcome,
            self.max_waiters,
            tenant,
            self.derive_key,
        )
        .replace("Reject", "reject")
        .replace("Retry", "retry")
    }
}

fn methods_str(m: &[Method]) -> String {
    m.iter().map(Method::as_str).collect::<Vec<_>>().join(",")
}

fn err(file: &str, key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn dur(v: Option<units::HumanDuration>, default_secs: u64) -> Duration {
    v.map_or(Duration::from_secs(default_secs), |d| d.0)
}

/// Parses TOML, turning serde's error into one with a dotted key path.
fn parse_toml(file: &str, text: &str) -> Result<RawConfig, ConfigError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut key = String::new();
        for seg in e.path().iter() {
            use serde_path_to_error::Segment;
            match seg {
                Segment::Seq { index } => {
                    let _ = write!(key, "[{index}]");
                }
                Segment::Map { key: k } | Segment::Enum { variant: k } => {
                    if !key.is_empty() {
                        key.push('.');
                    }
                    key.push_str(k);
                }
                Segment::Unknown => {}
            }
        }
        let inner = e.inner();
        // toml's messages may span lines ("invalid table header\nexpected ..."):
        // the error must stay one stderr line.
        let mut reason = inner
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        // serde reports an unknown key at its parent; name the key itself.
        if let Some(rest) = reason.strip_prefix("unknown field `") {
            if let Some(end) = rest.find('`') {
                let field = &rest[..end];
                if !key.ends_with(field) {
                    if !key.is_empty() {
                        key.push('.');
                    }
                    key.push_str(field);
                }
                reason = format!("unknown key ({reason})");
            }
        }
        if key.is_empty() {
            key = "(file)".to_owned();
            if let Some(span) = inner.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                reason = format!("line {line}: {reason}");
            }
        }
        err(file, &key, reason)
    })
}

fn apply_overrides(raw: &mut RawConfig, o: &Overrides) {
    if let Some(v) = &o.listen {
        raw.server.listen = Some(v.clone());
    }
    if let Some(v) = &o.admin_listen {
        raw.server.admin_listen = Some(v.clone());
    }
    if let Some(v) = &o.upstream {
        raw.upstream.url = Some(v.clone());
    }
    // The data directory is the sled store's; other backends have none, so
    // the same command line (the Docker image's) works with every backend.
    if let Some(v) = &o.data_dir {
        if matches!(raw.store.backend.as_deref(), None | Some("sled")) {
            raw.store.path = Some(v.clone());
        }
    }
}

fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address such as \"0.0.0.0:8080\" or \"[::1]:8080\""))
}

fn upstream_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("{s:?} must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{s:?} has no host"));
    }
    if uri.query().is_some() || !matches!(uri.path(), "" | "/") {
        return Err(format!("{s:?} must not have a path or query; requests keep their own"));
    }
    Ok(uri)
}

fn path_pattern(p: &str) -> Result<PathPattern, String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} must start with '/'"));
    }
    if let Some(prefix) = p.strip_suffix('*') {
        if !prefix.ends_with('/') || prefix.contains('*') {
            return Err(format!("{p:?}: '*' is only allowed as a final \"/*\""));
        }
        return Ok(PathPattern::Prefix(prefix.to_owned()));
    }
    if p.contains('*') {
        return Err(format!("{p:?}: '*' is only allowed as a final \"/*\""));
    }
    if p.contains(['?', '#', ' ']) {
        return Err(format!("{p:?} must be a path without query, fragment or spaces"));
    }
    Ok(PathPattern::Exact(p.to_owned()))
}

fn store_config(s: RawStore, file: &str) -> Result<StoreConfig, ConfigError> {
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

/// Resolves one policy: `own` over `base` (the `[idempotency]` table) over
/// the built-in defaults.
fn policy(own: &RawPolicy, base: Option<&RawPolicy>, at: &str, file: &str) -> Result<Policy, ConfigError> {
    let e = |key: &str, reason: String| err(file, &format!("{at}.{key}"), reason);
    // Pick the route's own value, else the inherited one.
    macro_rules! pick {
        ($f:ident) => {
            own.$f.clone().or_else(|| base.and_then(|b| b.$f.clone()))
        };
    }
    let header_name = pick!(header).unwrap_or_else(|| "Idempotency-Key".to_owned());
    let header = HeaderName::try_from(header_name.as_str())
        .map_err(|_| e("header", format!("{header_name:?} is not a valid header name")))?;
    let mut methods = Vec::new();
    for (i, m) in pick!(methods)
        .unwrap_or_else(|| vec!["POST".into(), "PATCH".into()])
        .iter()
        .enumerate()
    {
        let upper = m.to_ascii_uppercase();
        let method = Method::from_bytes(upper.as_bytes())
            .map_err(|_| e(&format!("methods[{i}]"), format!("{m:?} is not an HTTP method")))?;
        methods.push(method);
    }
    if methods.is_empty() {
        return Err(e("methods", "must name at least one method".into()));
    }
    let ttl = pick!(ttl).map_or(Duration::from_secs(24 * 3600), |d| d.0);
    let tombstone_ttl = pick!(tombstone_ttl).map_or(Duration::ZERO, |d| d.0);
    if !tombstone_ttl.is_zero() && tombstone_ttl <= ttl {
        return Err(e(
            "tombstone_ttl",
            format!(
                "must be longer than ttl ({}) or \"0s\"",
                humantime::format_duration(ttl)
            ),
        ));
    }
    let max_body = pick!(max_body).map_or(1 << 20, |b| b.0);
    let max_response_body = pick!(max_response_body).map_or(4 << 20, |b| b.0);
    let store_statuses = pick!(store_statuses).unwrap_or_else(|| {
        use units::StatusPattern::Class;
        vec![Class(2), Class(3), Class(4)]
    });
    let never_store = pick!(never_store).unwrap_or_else(|| {
        use units::StatusPattern::Exact;
        vec![Exact(408), Exact(409), Exact(425), Exact(429)]
    });
    let on_lost_outcome = match pick!(on_lost_outcome).as_deref().unwrap_or("reject") {
        "reject" => LostOutcome::Reject,
        "retry" => LostOutcome::Retry,
        other => {
            return Err(e(
                "on_lost_outcome",
                format!("{other:?} is not \"reject\" or \"retry\""),
            ))
        }
    };
    let max_waiters = pick!(max_waiters).unwrap_or(1024);
    let tenant = match pick!(tenant) {
        None | Some(RawTenant::Authorization) => TenantSource::Authorization,
        Some(RawTenant::None) => TenantSource::None,
        Some(RawTenant::Header { name }) => TenantSource::Header(
            HeaderName::try_from(name.as_str())
                .map_err(|_| e("tenant.name", format!("{name:?} is not a valid header name")))?,
        ),
        Some(RawTenant::Jwt {
            claim,
            hs256_secret_env,
            jwks_file,
            verify,
        }) => {
            let claim = claim.unwrap_or_else(|| "sub".to_owned());
            let key = match (hs256_secret_env, jwks_file, verify.unwrap_or(true)) {
                (None, None, false) => JwtKey::Unverified,
                (Some(env), None, true) => {
                    let secret = std::env::var(&env).map_err(|_| {
                        e(
                            "tenant.hs256_secret_env",
                            format!("environment variable {env} is not set"),
                        )
                    })?;
                    if secret.is_empty() {
                        return Err(e(
                            "tenant.hs256_secret_env",
                            format!("environment variable {env} is empty"),
                        ));
                    }
                    JwtKey::Hs256 {
                        env,
                        secret: secret.into_bytes(),
                    }
                }
                (None, Some(f), true) => {
                    let json = std::fs::read_to_string(&f)
                        .map_err(|err| e("tenant.jwks_file", format!("cannot read {f}: {err}")))?;
                    JwtKey::Jwks { file: f.into(), json }
                }
                (_, _, false) => {
                    return Err(e(
                        "tenant.verify",
                        "verify = false takes neither hs256_secret_env nor jwks_file".into(),
                    ))
                }
                (None, None, true) => {
                    return Err(e(
                        "tenant",
                        "jwt needs hs256_secret_env or jwks_file (or verify = false)".into(),
                    ))
                }
                (Some(_), Some(_), true) => {
                    return Err(e("tenant", "set either hs256_secret_env or jwks_file, not both".into()))
                }
            };
            use crate::idempotency::jwt::JwtVerifier;
            let verifier = match &key {
                JwtKey::Hs256 { secret, .. } => JwtVerifier::hs256(claim.clone(), secret),
                JwtKey::Unverified => JwtVerifier::unverified(claim.clone()),
                JwtKey::Jwks { json, file } => JwtVerifier::jwks(claim.clone(), json)
                    .map_err(|r| e("tenant.jwks_file", format!("{}: {r}", file.display())))?,
            };
            TenantSource::Jwt(JwtTenant {
                claim,
                key,
                verifier: Arc::new(verifier),
            })
        }
    };
    Ok(Policy {
        header,
        methods,
        required: pick!(required).unwrap_or(false),
        ttl,
        tombstone_ttl,
        wait_timeout: pick!(wait_timeout).map_or(Duration::from_secs(30), |d| d.0),
        fingerprint: pick!(fingerprint).unwrap_or(true),
        max_body,
        max_response_body,
        storable: StatusSet::new(&store_statuses, &never_store),
        on_lost_outcome,
        max_waiters,
        tenant,
        derive_key: pick!(derive_key).unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw = parse_toml("t.toml", text)?;
        Config::from_raw(raw, "t.toml")
    }

    const UP: &str = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n";

    #[test]
    fn defaults_and_inheritance() {
        let c = parse(&format!(
            "{UP}[idempotency]\nttl = \"1h\"\n[[routes]]\npath = \"/v1/tasks\"\nmethods = [\"POST\"]\nrequired = true\n[[routes]]\npath = \"/v1/payments/*\"\nttl = \"72h\"\n[[routes]]\npath = \"/internal/*\"\nenabled = false\n"
        ))
        .unwrap();
        let r = &c.rules;
        assert_eq!(r.routes.len(), 3);
        assert!(r.routes[0].policy.required);
        assert_eq!(r.routes[0].policy.ttl, Duration::from_secs(3600));
        assert_eq!(r.routes[1].policy.ttl, Duration::from_secs(72 * 3600));
        let post = Method::POST;
        assert!(r.policy_for(&post, "/v1/tasks").is_some());
        assert!(r.policy_for(&Method::PATCH, "/v1/tasks").is_none());
        assert!(r.policy_for(&post, "/v1/payments/").is_some());
        assert!(r.policy_for(&post, "/v1/payments").is_none());
        assert!(r.policy_for(&post, "/internal/x").is_none());
        assert!(r.policy_for(&post, "/other").is_none());
    }

    #[test]
    fn no_routes_means_defaults_everywhere() {
        let c = parse(UP).unwrap();
        assert!(c.rules.policy_for(&Method::POST, "/anything").is_some());
        assert!(c.rules.policy_for(&Method::GET, "/anything").is_none());
    }

    #[test]
    fn data_dir_applies_to_sled_only() {
        let o = Overrides {
            data_dir: Some("/data/x".into()),
            ..Overrides::default()
        };
        let mut raw = parse_toml("t.toml", &format!("{UP}[store]\nbackend = \"redis\"\n")).unwrap();
        apply_overrides(&mut raw, &o);
        assert!(matches!(
            Config::from_raw(raw, "t.toml").unwrap().store,
            StoreConfig::Redis(_)
        ));
        let mut raw = parse_toml("t.toml", UP).unwrap();
        apply_overrides(&mut raw, &o);
        let StoreConfig::Sled { path, .. } = Config::from_raw(raw, "t.toml").unwrap().store else {
            panic!("sled")
        };
        assert_eq!(path, PathBuf::from("/data/x"));
    }

    #[test]
    fn error_paths() {
        let cases = [
            ("[upstream]\nurl = \"http://x\"\nbogus_key = 1\n", "upstream.bogus_key"),
            (
                &format!("{UP}[[routes]]\npath = \"/a\"\n[[routes]]\npath = \"/b\"\nttl = \"forever\"\n"),
                "routes[1].ttl",
            ),
            (&format!("{UP}[idempotency]\nttl = \"soon\"\n"), "idempotency.ttl"),
            (
                &format!("{UP}[idempotency]\nmax_body = \"huge\"\n"),
                "idempotency.max_body",
            ),
            ("[upstream]\nurl = \"ftp://x\"\n", "upstream.url"),
            (&format!("{UP}[[routes]]\npath = \"/a/*/b\"\n"), "routes[0].path"),
            (
                &format!("{UP}[store]\nbackend = \"redis\"\npath = \"x\"\n"),
                "store.path",
            ),
            (&format!("{UP}[store]\nurl = \"redis://x\"\n"), "store.url"),
            (
                &format!("{UP}[idempotency]\nstore_statuses = [\"7xx\"]\n"),
                "idempotency.store_statuses[0]",
            ),
            (
                &format!("{UP}[[routes]]\npath = \"/a\"\nmethod = [\"POST\"]\n"),
                "routes[0].method",
            ),
            ("[server\n", "(file)"),
        ];
        for (text, key) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(!e.to_string().contains('\n'), "one line: {e:?}");
        }
    }
}
