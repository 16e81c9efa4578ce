//! Configuration: the TOML file of SPEC §2, parsed in two steps.
//!
//! [`raw`] mirrors the file with serde (`deny_unknown_fields`, everything
//! optional); [`Config::from_raw`] turns it into the typed, validated
//! [`Config`] the rest of the program uses: `Duration`s, byte counts, compiled
//! route matchers, status bitmaps. Every error carries the file and the dotted
//! key path (`routes[1].ttl`) so one stderr line tells the operator what to fix.

mod policy;
pub mod raw;
mod store;
pub mod units;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;

use self::policy::{methods_str, path_pattern, policy};
pub use self::policy::{JwtKey, JwtTenant, LostOutcome, PathPattern, Policy, Route, Rules, TenantSource};
use self::raw::RawConfig;
use self::store::store_config;
pub use self::store::{RedisConfig, StoreConfig, SyncMode};

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
    /// The longest silence allowed inside a request body; then 408.
    pub body_read_timeout: Duration,
    /// How long a keep-alive connection may wait with no request in progress.
    pub idle_timeout: Duration,
    /// Connections accepted at once on the main listener; more wait in the backlog.
    pub max_connections: usize,
    /// Serving threads, each with its own listening socket and upstream pool.
    pub workers: usize,
    /// Keyed requests in progress at once (leaders, detached or not, and
    /// held duplicates); more get 503 `overloaded`.
    pub max_keyed_requests: usize,
    /// Bytes of keyed request bodies held in memory at once.
    pub max_keyed_buffer: u64,
}

impl ServerConfig {
    /// The connection limits, for `idemproxy check`.
    pub fn describe(&self) -> String {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        format!(
            "workers={} header_read_timeout={} body_read_timeout={} idle_timeout={} max_connections={} shutdown_grace={}{}",
            self.workers,
            d(self.header_read_timeout),
            d(self.body_read_timeout),
            d(self.idle_timeout),
            self.max_connections,
            d(self.shutdown_grace),
            if self.tls.is_some() { " tls" } else { "" },
        )
    }
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
        let workers = match s.workers {
            None => std::thread::available_parallelism().map_or(1, usize::from),
            Some(0) => return Err(e("server.workers", "must be at least 1".into())),
            Some(n) => n as usize,
        };
        let positive = |v, default_secs, key: &str| {
            let d = dur(v, default_secs);
            if d.is_zero() {
                return Err(e(key, "must be greater than 0s".into()));
            }
            Ok(d)
        };
        let max_keyed_requests = s.max_keyed_requests.unwrap_or(4096);
        if max_keyed_requests == 0 {
            return Err(e("server.max_keyed_requests", "must be at least 1".into()));
        }
        let max_keyed_buffer = s.max_keyed_buffer.map_or(256 << 20, |b| b.0);
        if max_keyed_buffer == 0 {
            return Err(e("server.max_keyed_buffer", "must be greater than 0".into()));
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
            header_read_timeout: positive(s.header_read_timeout, 10, "server.header_read_timeout")?,
            body_read_timeout: positive(s.body_read_timeout, 30, "server.body_read_timeout")?,
            idle_timeout: positive(s.idle_timeout, 60, "server.idle_timeout")?,
            max_connections: max_connections as usize,
            workers,
            max_keyed_requests: max_keyed_requests as usize,
            max_keyed_buffer,
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
        // A body the buffer bound can never admit would get 503 forever.
        let largest = routes
            .iter()
            .map(|r| r.policy.max_body)
            .fold(defaults.max_body, u64::max);
        if largest > server.max_keyed_buffer {
            return Err(e(
                "server.max_keyed_buffer",
                format!(
                    "{} bytes is less than the largest max_body ({largest} bytes)",
                    server.max_keyed_buffer
                ),
            ));
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
        let _ = writeln!(out, "server        {}", self.server.describe());
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

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
    fn connection_timeouts_default_and_parse() {
        let c = parse(UP).unwrap();
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(30));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
        let c = parse(&format!(
            "{UP}[server]\nbody_read_timeout = \"250ms\"\nidle_timeout = \"2m\"\n"
        ))
        .unwrap();
        assert_eq!(c.server.body_read_timeout, Duration::from_millis(250));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(120));
        assert!(c.describe().contains("body_read_timeout=250ms idle_timeout=2m"));
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
            (
                &format!("{UP}[server]\nbody_read_timeout = \"0s\"\n"),
                "server.body_read_timeout",
            ),
            (
                &format!("{UP}[server]\nidle_timeout = \"soon\"\n"),
                "server.idle_timeout",
            ),
            (&format!("{UP}[server]\nworkers = 0\n"), "server.workers"),
        ];
        for (text, key) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(!e.to_string().contains('\n'), "one line: {e:?}");
        }
    }
}
