//! The Redis backend (SPEC §5) against real `redis-server` processes: several
//! proxy replicas on one Redis, a crashed owner, Redis going away and coming
//! back, a real 3-master Redis Cluster, the owner-token check, `WAIT`, the
//! Redis round trips per request, compact tombstones, coalesce-only routes
//! across replicas, and `rediss://` with a private CA.
//!
//! Every test starts its own `redis-server` on a free port in a temp dir
//! (`apt-get install redis-server redis-tools` provides it).

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use idemproxy::config::{RedisConfig, StoreConfig};
use idemproxy::metrics::Metrics;
use idemproxy::store::{now_ms, Claim, ClaimRequest, Completed, Finish, Record, RecordKey, Store, StoreError};
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::AsyncWriteExt;

// ------------------------------------------------------------ redis-server

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `redis-server` on a free loopback port with its own temp dir; killed on drop.
struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> RedisServer {
        Self::start_with(&[])
    }

    fn start_with(args: &[&str]) -> RedisServer {
        Self::start_on(free_port(), args)
    }

    fn start_on(port: u16, args: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        server.spawn();
        server
    }

    /// (Re)starts the process on the same port and dir.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let bin = which("redis-server");
        let child = Command::new(bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", "redis.log"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start redis-server");
        self.child = Some(child);
        self.wait_ping();
    }

    /// Waits (bounded) until the server answers PING.
    fn wait_ping(&mut self) {
        let start = Instant::now();
        loop {
            if ping(self.port) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                panic!("redis-server on port {} exited ({status}): {log}", self.port);
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not answer PING within 10s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: Redis is gone, its data with it (no persistence).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn which(bin: &str) -> String {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = format!("{dir}/{bin}");
        if std::path::Path::new(&p).exists() {
            return p;
        }
    }
    panic!("{bin} not found: apt-get install -y redis-server redis-tools");
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(which("redis-cli"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 3-master Redis Cluster on loopback, no replicas.
struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &free_port().to_string(),
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(RedisServer::addr));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        let out = Command::new(which("redis-cli"))
            .args(&args)
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let start = Instant::now();
        while !nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(start.elapsed() < Duration::from_secs(15), "cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster { nodes }
    }

    fn store_section(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| format!("\"redis://{}\"", n.addr())).collect();
        format!("cluster = [{}]", seeds.join(", "))
    }
}

// ------------------------------------------------------------------ helpers

/// A proxy config on the Redis backend: `store` goes into `[store]`.
fn redis_config(upstream: &str, upstream_timeout: &str, store: &str, extra: &str) -> String {
    format!(
        "[upstream]\nurl = \"{upstream}\"\ntimeout = \"{upstream_timeout}\"\n\n[store]\nbackend = \"redis\"\n{store}\n\n{extra}\n"
    )
}

fn start_replicas(n: usize, config: &str) -> Vec<Proxy> {
    (0..n).map(|_| Proxy::start(config)).collect()
}

/// The record of `key` (tenant `anonymous`) through the records API.
async fn record_state(c: &Client, proxy: &Proxy, key: &str) -> Option<String> {
    let r = c
        .get(&proxy.admin_url(&format!("/v1/records?tenant=anonymous&key={key}")))
        .await;
    match r.status {
        StatusCode::OK => Some(r.json()["state"].as_str().unwrap().to_owned()),
        StatusCode::NOT_FOUND => None,
        s => panic!("records API answered {s}"),
    }
}

/// Sends a keyed POST and leaves it running: the proxy may die under it.
async fn fire(proxy: &Proxy, path: &str, key: &str, body: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\nidempotency-key: {key}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// The Redis key the proxy uses for tenant `anonymous` and `key`.
fn redis_key(prefix: &str, key: &str) -> String {
    let digest = Sha256::digest(format!("anonymous\0{key}").as_bytes());
    format!("{prefix}:{{{}}}", hex::encode(&digest[..16]))
}

/// `count` concurrent duplicates of one keyed request spread over `proxies`;
/// returns the responses and when each arrived.
async fn duplicates(proxies: &[Proxy], path: &str, key: &str, count: usize) -> Vec<(Resp, Instant)> {
    let c = Client::new();
    let mut tasks = Vec::new();
    for i in 0..count {
        let url = proxies[i % proxies.len()].url(path);
        let c = c.clone();
        let key = key.to_owned();
        tasks.push(tokio::spawn(async move {
            let r = c.post_key(&url, &key, "{\"n\":1}").await;
            (r, Instant::now())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Exactly one execution for `count` duplicates; every body identical.
async fn check_held_duplicates(up: &Upstream, proxies: &[Proxy], path: &str, key: &str, count: usize) {
    let before = up.executions_of(path);
    let res = duplicates(proxies, &format!("{path}?delay=400"), key, count).await;
    assert_eq!(
        up.executions_of(path) - before,
        1,
        "{count} duplicates must execute once"
    );
    let first = &res[0].0;
    for (r, _) in &res {
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        assert_eq!(r.body, first.body, "every duplicate gets the same bytes");
    }
    let originals = res.iter().filter(|(r, _)| r.replayed() == Some("false")).count();
    assert_eq!(originals, 1, "one original, the rest replayed");
    let followers: Vec<Instant> = res
        .iter()
        .filter(|(r, _)| r.replayed() == Some("true"))
        .map(|(_, t)| *t)
        .collect();
    let spread = followers
        .iter()
        .max()
        .unwrap()
        .duration_since(*followers.iter().min().unwrap());
    eprintln!(
        "{count} duplicates over {} replicas: followers answered within {spread:?} of each other",
        proxies.len()
    );
}

/// Hundreds of keys, several duplicates each, on random replicas:
/// executions == keys, and each key's answers are identical.
async fn check_mixed_load(up: &Upstream, proxies: &[Proxy], path: &str, keys: usize, dups: usize) {
    use rand::seq::SliceRandom;
    use rand::Rng;
    let before = up.executions_of(path);
    let mut work: Vec<(usize, usize)> = (0..keys).flat_map(|k| (0..dups).map(move |_| (k, 0))).collect();
    let mut rng = rand::thread_rng();
    for w in &mut work {
        w.1 = rng.gen_range(0..proxies.len());
    }
    work.shuffle(&mut rng);
    let c = Client::new();
    let limit = Arc::new(tokio::sync::Semaphore::new(48));
    let mut tasks = Vec::new();
    for (k, p) in work {
        let url = proxies[p].url(&format!("{path}?delay=20"));
        let c = c.clone();
        let limit = limit.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await.unwrap();
            let r = c.post_key(&url, &format!("mixed-{k}"), &format!("{{\"k\":{k}}}")).await;
            (k, r)
        }));
    }
    let mut bodies: HashMap<usize, Bytes> = HashMap::new();
    for t in tasks {
        let (k, r) = t.await.unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "key {k}: {:?}", r.body);
        let prev = bodies.entry(k).or_insert_with(|| r.body.clone());
        assert_eq!(*prev, r.body, "key {k}: duplicates must get the same bytes");
    }
    assert_eq!(up.executions_of(path) - before, keys, "executions == keys");
}

async fn check_replay_across(up: &Upstream, proxies: &[Proxy]) {
    let c = Client::new();
    let first = c.post_key(&proxies[0].url("/v1/across"), "across", "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.replayed(), Some("false"));
    for p in &proxies[1..] {
        let r = c.post_key(&p.url("/v1/across"), "across", "{}").await;
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.replayed(), Some("true"), "another replica replays");
        assert_eq!(r.body, first.body);
        assert_eq!(r.header("x-execution"), first.header("x-execution"));
    }
    assert_eq!(up.executions_of("/v1/across"), 1);
}

// -------------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_redis() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let config = redis_config(&up.url(), "5s", &format!("url = \"{}\"", redis.url()), "");
    let proxies = start_replicas(3, &config);

    check_replay_across(&up, &proxies).await;
    check_held_duplicates(&up, &proxies, "/v1/held", "held", 30).await;
    check_mixed_load(&up, &proxies, "/v1/mixed", 300, 4).await;

    // Every in-flight record was finished: nothing is left in flight.
    let c = Client::new();
    assert_eq!(
        record_state(&c, &proxies[2], "held").await.as_deref(),
        Some("completed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_owner_reject_never_executes_twice() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let store = format!("url = \"{}\"\nlease = \"1s\"", redis.url());
    let config = redis_config(&up.url(), "3s", &store, "");
    let mut proxies = start_replicas(2, &config);
    let c = Client::new();

    let _conn = fire(&proxies[0], "/v1/pay?delay=1500", "crash", "{}").await;
    up.wait_arrived(1).await;
    proxies[0].kill();

    // The dead owner's lease has not run out yet: in flight, as on its own replica.
    assert_eq!(
        record_state(&c, &proxies[1], "crash").await.as_deref(),
        Some("in_flight")
    );
    // A duplicate is held until the lease ends, then the outcome is unknown.
    let started = Instant::now();
    let r = c.post_key(&proxies[1].url("/v1/pay?delay=1500"), "crash", "{}").await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code(), "outcome_unknown");
    eprintln!(
        "held duplicate got outcome_unknown after {:?} (lease 1s)",
        started.elapsed()
    );
    assert_eq!(record_state(&c, &proxies[1], "crash").await.as_deref(), Some("lost"));
    let again = c.post_key(&proxies[1].url("/v1/pay?delay=1500"), "crash", "{}").await;
    assert_eq!(again.code(), "outcome_unknown");
    assert_eq!(up.executions_of("/v1/pay"), 1, "reject: never a second execution");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_owner_retry_executes_again_after_upstream_timeout() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let store = format!("url = \"{}\"\nlease = \"1s\"", redis.url());
    let config = redis_config(&up.url(), "2s", &store, "[idempotency]\non_lost_outcome = \"retry\"\n");
    let mut proxies = start_replicas(2, &config);
    let c = Client::new();
    let path = "/v1/pay?delay=1200";

    let _conn = fire(&proxies[0], path, "crash", "{}").await;
    up.wait_arrived(1).await;
    let killed_at = Instant::now();
    proxies[0].kill();
    assert_eq!(
        record_state(&c, &proxies[1], "crash").await.as_deref(),
        Some("in_flight")
    );

    // Lease over, but the original's upstream.timeout has not passed: in use.
    let r = c.post_key(&proxies[1].url(path), "crash", "{}").await;
    assert_eq!(r.code(), "idempotency_key_in_use");
    assert!(r.header("retry-after").is_some());
    assert_eq!(up.executions_of("/v1/pay"), 1);

    // Then a retry executes again, once.
    let start = Instant::now();
    let retried = loop {
        let r = c.post_key(&proxies[1].url(path), "crash", "{}").await;
        if r.status != StatusCode::CONFLICT {
            break r;
        }
        assert_eq!(r.code(), "idempotency_key_in_use");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the key never became retryable"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("retry executed {:?} after the owner was killed", killed_at.elapsed());
    assert_eq!(retried.status, StatusCode::CREATED);
    assert_eq!(retried.replayed(), Some("false"));
    assert_eq!(up.executions_of("/v1/pay"), 2, "retry: exactly one more execution");
    let replay = c.post_key(&proxies[1].url(path), "crash", "{}").await;
    assert_eq!(replay.replayed(), Some("true"));
    assert_eq!(replay.body, retried.body);
    assert_eq!(up.executions_of("/v1/pay"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_then_back_without_proxy_restart() {
    let mut redis = RedisServer::start();
    let up = Upstream::start().await;
    let store = format!("url = \"{}\"\nop_timeout = \"300ms\"", redis.url());
    let config = redis_config(&up.url(), "5s", &store, "");
    let proxy = Proxy::start(&config);
    let c = Client::new();

    assert_eq!(
        c.post_key(&proxy.url("/v1/a"), "before", "{}").await.status,
        StatusCode::CREATED
    );
    assert_eq!(c.get(&proxy.admin_url("/readyz")).await.status, StatusCode::OK);

    redis.kill();
    let start = Instant::now();
    let r = c.post_key(&proxy.url("/v1/down"), "down", "{}").await;
    eprintln!("keyed request with Redis down answered in {:?}", start.elapsed());
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.code(), "store_unavailable");
    assert_eq!(up.executions_of("/v1/down"), 0, "nothing forwarded");
    // Requests that need no key are still proxied.
    let plain = c.send(Method::POST, &proxy.url("/v1/plain"), &[], "{}").await;
    assert_eq!(plain.status, StatusCode::CREATED);
    assert_eq!(c.get(&proxy.url("/v1/plain")).await.status, StatusCode::CREATED);
    assert_eq!(up.executions_of("/v1/plain"), 2);
    assert_eq!(
        c.get(&proxy.admin_url("/readyz")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    redis.spawn();
    let start = Instant::now();
    while c.get(&proxy.admin_url("/readyz")).await.status != StatusCode::OK {
        assert!(start.elapsed() < Duration::from_secs(15), "readyz never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("readyz 200 again {:?} after Redis restarted", start.elapsed());
    let r = c.post_key(&proxy.url("/v1/down"), "down", "{}").await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.replayed(), Some("false"));
    assert_eq!(
        c.post_key(&proxy.url("/v1/down"), "down", "{}").await.replayed(),
        Some("true")
    );
    assert_eq!(up.executions_of("/v1/down"), 1);

    // Redis hangs (SIGSTOP): slower than op_timeout is a store failure too.
    redis.signal(nix::sys::signal::Signal::SIGSTOP);
    let start = Instant::now();
    let r = c.post_key(&proxy.url("/v1/slow"), "slow", "{}").await;
    eprintln!(
        "keyed request with Redis stopped answered in {:?} (op_timeout 300ms)",
        start.elapsed()
    );
    assert_eq!(r.code(), "store_unavailable");
    assert_eq!(up.executions_of("/v1/slow"), 0, "nothing forwarded");
    assert_eq!(
        c.get(&proxy.admin_url("/readyz")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    redis.signal(nix::sys::signal::Signal::SIGCONT);
    let start = Instant::now();
    while c.get(&proxy.admin_url("/readyz")).await.status != StatusCode::OK {
        assert!(start.elapsed() < Duration::from_secs(15), "readyz never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = c.post_key(&proxy.url("/v1/slow"), "slow", "{}").await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?} {}", r.body, proxy.stderr());
    assert_eq!(r.replayed(), Some("false"));
    assert_eq!(up.executions_of("/v1/slow"), 1);

    // Redis stalls while the upstream call runs: the client still gets its
    // response, and the finish lands once Redis is back: a retry is a replay.
    let arrived = up.executions();
    let stalled = {
        let c = c.clone();
        let url = proxy.url("/v1/stall?delay=500");
        tokio::spawn(async move { c.post_key(&url, "stall", "{}").await })
    };
    up.wait_arrived(arrived + 1).await;
    redis.signal(nix::sys::signal::Signal::SIGSTOP);
    let r = stalled.await.unwrap();
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.replayed(), Some("false"));
    redis.signal(nix::sys::signal::Signal::SIGCONT);
    let start = Instant::now();
    while c.get(&proxy.admin_url("/readyz")).await.status != StatusCode::OK {
        assert!(start.elapsed() < Duration::from_secs(15), "readyz never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = c.post_key(&proxy.url("/v1/stall?delay=500"), "stall", "{}").await;
    assert_eq!(again.replayed(), Some("true"), "{:?}", again.body);
    assert_eq!(again.body, r.body);
    assert_eq!(up.executions_of("/v1/stall"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_starts_before_redis_and_becomes_ready() {
    let port = free_port();
    let up = Upstream::start().await;
    let store = format!("url = \"redis://127.0.0.1:{port}/0\"\nop_timeout = \"300ms\"");
    let proxy = Proxy::start(&redis_config(&up.url(), "5s", &store, ""));
    let c = Client::new();
    assert_eq!(
        c.get(&proxy.admin_url("/readyz")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let r = c.post_key(&proxy.url("/v1/early"), "early", "{}").await;
    assert_eq!(r.code(), "store_unavailable");
    assert_eq!(up.executions(), 0);

    let _redis = RedisServer::start_on(port, &[]);
    let start = Instant::now();
    while c.get(&proxy.admin_url("/readyz")).await.status != StatusCode::OK {
        assert!(start.elapsed() < Duration::from_secs(15), "readyz never turned 200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The scripts were not loaded at start: the first call loads them.
    let r = c.post_key(&proxy.url("/v1/early"), "early", "{}").await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        c.post_key(&proxy.url("/v1/early"), "early", "{}").await.replayed(),
        Some("true")
    );
    assert_eq!(up.executions_of("/v1/early"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_exactly_once_across_slots() {
    let cluster = RedisCluster::start();
    let up = Upstream::start().await;
    let config = redis_config(&up.url(), "5s", &cluster.store_section(), "");
    let proxies = start_replicas(3, &config);

    check_replay_across(&up, &proxies).await;
    check_held_duplicates(&up, &proxies, "/v1/held", "held", 30).await;
    check_mixed_load(&up, &proxies, "/v1/mixed", 200, 3).await;

    // The keys really are spread over the three masters' slots.
    for n in &cluster.nodes {
        let keys: u64 = n.cli(&["DBSIZE"]).trim().parse().unwrap();
        assert!(keys > 20, "node {} holds only {keys} records", n.addr());
    }
}

fn store_config(url: &str, lease: Duration) -> StoreConfig {
    StoreConfig::Redis(RedisConfig {
        url: Some(url.to_owned()),
        cluster: Vec::new(),
        key_prefix: "tokentest".into(),
        lease,
        op_timeout: Duration::from_secs(2),
        wait_replicas: 0,
    })
}

fn claim_req(store: &Store, lost_retry: bool) -> (ClaimRequest, idemproxy::store::Token) {
    let token = store.token();
    let req = ClaimRequest {
        token,
        fingerprint: Some([7; 32]),
        now: now_ms(),
        inflight_ttl: 60_000,
        lost_retry,
        retry_delay: 0,
    };
    (req, token)
}

fn completed(body: &'static str) -> Finish {
    let now = now_ms();
    Finish::Store(Arc::new(Completed {
        fingerprint: Some([7; 32]),
        status: 201,
        headers: vec![("x-who".into(), Bytes::from_static(body.as_bytes()))],
        body: Bytes::from_static(body.as_bytes()),
        replayable: true,
        stored_at: now,
        expires_at: now + 60_000,
        tombstone_until: 0,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_owner_cannot_complete_over_a_newer_owner() {
    let redis = RedisServer::start();
    // Two replicas (two Store instances); a short lease nobody renews.
    let config = store_config(&redis.url(), Duration::from_millis(150));
    let a = Store::open(&config, Metrics::new()).await.unwrap();
    let b = Store::open(&config, Metrics::new()).await.unwrap();
    assert!(a.is_shared());
    assert_eq!(a.renew_every(), Some(Duration::from_millis(50)));

    // on_lost_outcome = retry: B takes over once A's lease ran out.
    let key = RecordKey::new("tenant", "taken-over");
    let (req, ta) = claim_req(&a, true);
    assert_eq!(a.claim(&key, &req).await.unwrap(), Claim::Acquired);
    let (req_b, tb) = claim_req(&b, true);
    assert!(matches!(b.claim(&key, &req_b).await.unwrap(), Claim::InFlight { .. }));
    a.renew(&key, ta).await.expect("the owner renews its own lease");
    // wait_change resolves when A's lease runs out (A stalls: no renewal).
    let ended = tokio::time::timeout(Duration::from_secs(3), b.wait_change(&key, tb))
        .await
        .expect("wait_change resolves at the end of the lease");
    assert!(ended.is_none(), "A left no ending: it never finished");
    let (mut req_b, _) = claim_req(&b, true);
    req_b.token = tb;
    assert_eq!(b.claim(&key, &req_b).await.unwrap(), Claim::Acquired, "B takes over");

    // The stalled owner wakes up: it can neither renew nor complete.
    assert!(matches!(a.renew(&key, ta).await, Err(StoreError::NotOwner(_))));
    assert!(matches!(
        a.finish(&key, ta, completed("from A")).await,
        Err(StoreError::NotOwner(_))
    ));
    assert!(matches!(
        a.finish(&key, ta, Finish::Release).await,
        Err(StoreError::NotOwner(_))
    ));
    assert!(matches!(a.get(&key).await.unwrap(), Some(Record::InFlight(_))));
    b.finish(&key, tb, completed("from B")).await.unwrap();
    let Some(Record::Completed(c)) = a.get(&key).await.unwrap() else {
        panic!("completed by B")
    };
    assert_eq!(&c.body[..], b"from B");
    // And once B completed, A's token is still refused.
    assert!(matches!(
        a.finish(&key, ta, completed("from A")).await,
        Err(StoreError::NotOwner(_))
    ));
    let (req, _) = claim_req(&a, true);
    let Claim::Completed(c) = a.claim(&key, &req).await.unwrap() else {
        panic!("replay")
    };
    assert_eq!(&c.body[..], b"from B");

    // on_lost_outcome = reject: the verdict "lost" is persisted; nobody took
    // the key over, so the stalled owner's late outcome still replaces
    // "unknown" (its token is still the record's).
    let key = RecordKey::new("tenant", "lost");
    let (req, ta) = claim_req(&a, false);
    assert_eq!(a.claim(&key, &req).await.unwrap(), Claim::Acquired);
    let (req_b, tb) = claim_req(&b, false);
    assert!(matches!(b.claim(&key, &req_b).await.unwrap(), Claim::InFlight { .. }));
    tokio::time::timeout(Duration::from_secs(3), b.wait_change(&key, tb))
        .await
        .expect("wait_change resolves at the end of the lease");
    let (req_b, _) = claim_req(&b, false);
    assert!(matches!(b.claim(&key, &req_b).await.unwrap(), Claim::Lost(_)));
    assert!(matches!(b.get(&key).await.unwrap(), Some(Record::Lost(_))));
    a.finish(&key, ta, completed("late")).await.unwrap();
    assert!(matches!(b.get(&key).await.unwrap(), Some(Record::Completed(_))));

    // A different request under the same key is a mismatch, nothing changes.
    let (mut other, _) = claim_req(&b, true);
    other.fingerprint = Some([8; 32]);
    assert_eq!(b.claim(&key, &other).await.unwrap(), Claim::Mismatch);

    // Delete wakes a waiter on another replica at once.
    let key = RecordKey::new("tenant", "deleted");
    let (req, _) = claim_req(&a, false);
    assert_eq!(a.claim(&key, &req).await.unwrap(), Claim::Acquired);
    a.renew(&key, req.token).await.unwrap();
    let (req_b, tb) = claim_req(&b, false);
    assert!(matches!(b.claim(&key, &req_b).await.unwrap(), Claim::InFlight { .. }));
    let waiter = {
        let b = b.clone();
        let key = key.clone();
        tokio::spawn(async move { b.wait_change(&key, tb).await })
    };
    // Give the waiter a moment to subscribe; correctness does not depend on it.
    tokio::task::yield_now().await;
    assert!(b.delete(&key).await.unwrap());
    tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(a.get(&key).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_waits_for_a_replica() {
    let primary = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let start = Instant::now();
    while !replica.cli(&["INFO", "replication"]).contains("master_link_status:up") {
        assert!(start.elapsed() < Duration::from_secs(10), "replica never synced");
        std::thread::sleep(Duration::from_millis(20));
    }
    let up = Upstream::start().await;
    let store = format!("url = \"{}\"\nwait_replicas = 1", primary.url());
    let proxy = Proxy::start(&redis_config(&up.url(), "5s", &store, ""));
    let c = Client::new();
    for i in 0..20 {
        let key = format!("w{i}");
        let r = c.post_key(&proxy.url("/v1/w"), &key, "{}").await;
        assert_eq!(r.status, StatusCode::CREATED);
        // WAIT returned before the client saw the response: the replica has it.
        let on_replica = replica.cli(&["HGET", &redis_key("idemproxy", &key), "s"]);
        assert_eq!(on_replica.trim(), "c", "record {key} not on the replica yet");
    }

    // Fewer replicas than wait_replicas: logged, the request still succeeds.
    let lonely = RedisServer::start();
    let store = format!("url = \"{}\"\nwait_replicas = 1\nop_timeout = \"500ms\"", lonely.url());
    let proxy = Proxy::start(&redis_config(&up.url(), "5s", &store, ""));
    let r = c.post_key(&proxy.url("/v1/lonely"), "lonely", "{}").await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        c.post_key(&proxy.url("/v1/lonely"), "lonely", "{}").await.replayed(),
        Some("true")
    );
    let start = Instant::now();
    // "fewer Redis replicas ..." (or, on a loaded machine, "WAIT for Redis replicas timed out").
    while !proxy.stderr().contains("Redis replicas") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no warning logged: {}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Watches what clients send to Redis (`MONITOR`), without what scripts
/// call inside Redis.
struct Monitor {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    port: u16,
}

impl Monitor {
    fn start(redis: &RedisServer) -> Monitor {
        let mut child = Command::new(which("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &redis.port.to_string(), "MONITOR"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let m = Monitor {
            child,
            lines,
            port: redis.port,
        };
        // redis-cli prints OK once MONITOR is active.
        let ok = m
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("MONITOR did not start");
        assert_eq!(ok, "OK");
        m
    }

    /// Client commands seen until `marker` (sent by this helper) comes back.
    fn until(&self, marker: &str) -> Vec<String> {
        cli(self.port, &["ECHO", marker]);
        let mut seen = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(5))
                .expect("MONITOR went quiet");
            if line.contains(marker) {
                return seen;
            }
            // `1700000000.123456 [0 127.0.0.1:5555] "EVALSHA" ...`; scripts show `[0 lua]`.
            if line.contains(" lua]") {
                continue;
            }
            if let Some(cmd) = line.split("] \"").nth(1).and_then(|r| r.split('"').next()) {
                seen.push(cmd.to_ascii_lowercase());
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_first_request_and_replay() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&redis_config(
        &up.url(),
        "5s",
        &format!("url = \"{}\"", redis.url()),
        "",
    ));
    let c = Client::new();
    // Warm up: the connection is open and the scripts are loaded.
    assert_eq!(
        c.post_key(&proxy.url("/v1/rt"), "warm", "{}").await.status,
        StatusCode::CREATED
    );

    let monitor = Monitor::start(&redis);
    let first = c.post_key(&proxy.url("/v1/rt"), "rt", "{}").await;
    assert_eq!(first.replayed(), Some("false"));
    let sent = monitor.until("first-done");
    eprintln!("first request: {} Redis round trips {sent:?}", sent.len());
    assert_eq!(sent, ["evalsha", "evalsha"], "claim + finish");

    let replay = c.post_key(&proxy.url("/v1/rt"), "rt", "{}").await;
    assert_eq!(replay.replayed(), Some("true"));
    let sent = monitor.until("replay-done");
    eprintln!("replay: {} Redis round trip {sent:?}", sent.len());
    assert_eq!(sent, ["evalsha"], "one claim returns the stored response");
}

/// Coalesce-only (`ttl = "0s"`) across replicas: a duplicate on the same
/// replica and one held on another replica both get the original's
/// response (one execution, never two at once); a request that arrives
/// after the original ended executes again; no record is kept in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesce_only_across_replicas_never_runs_twice_at_once() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let config = redis_config(
        &up.url(),
        "5s",
        &format!("url = \"{}\"", redis.url()),
        "[idempotency]\nttl = \"0s\"\n",
    );
    let proxies = start_replicas(2, &config);
    let c = Client::new();
    let url = |i: usize| proxies[i].url("/v1/job?gate=1");
    let send = |u: String| {
        let c = c.clone();
        tokio::spawn(async move { c.post_key(&u, "job", "{}").await })
    };
    let original = send(url(0));
    up.wait_arrived(1).await;
    let same = send(url(0));
    let other = send(url(1));
    wait_held_elsewhere(&redis, &["job"]).await;
    up.open_gate();
    let original = original.await.unwrap();
    let same = same.await.unwrap();
    let other = other.await.unwrap();

    assert_eq!(original.replayed(), Some("false"));
    assert_eq!(same.replayed(), Some("true"), "same replica: shares the response");
    assert_eq!(same.body, original.body);
    assert_eq!(other.status, StatusCode::CREATED);
    assert_eq!(other.replayed(), Some("true"), "other replica: shares the response too");
    assert_eq!(other.body, original.body);
    assert_eq!(up.executions_of("/v1/job"), 1, "held duplicates never execute");

    // Once it ended, the key is free: the next request executes again.
    let again = c.post_key(&url(1), "job", "{}").await;
    assert_eq!(again.replayed(), Some("false"));
    assert_eq!(again.header("x-execution"), Some("2"));
    assert_eq!(up.executions_of("/v1/job"), 2);
    let k = redis_key("idemproxy", "job");
    assert!(!exists(&redis, &k), "no record is kept after a coalesce-only request");
    let ending_ttl: i64 = redis.cli(&["PTTL", &format!("{k}:end")]).trim().parse().unwrap();
    assert!(
        ending_ttl <= 30_000,
        "what the waiter read lasts at most wait_timeout ({ending_ttl} ms)"
    );
}

/// `MEMORY USAGE` of a Redis key in bytes; 0 when it does not exist.
fn memory_usage(redis: &RedisServer, key: &str) -> u64 {
    redis.cli(&["MEMORY", "USAGE", key]).trim().parse().unwrap_or(0)
}

fn exists(redis: &RedisServer, key: &str) -> bool {
    redis.cli(&["EXISTS", key]).trim() == "1"
}

/// SPEC §6 on Redis: once the response expires only a compact tombstone
/// (the small hash, no response) is left; it answers 410 without executing
/// until `tombstone_ttl`, then the key is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_key_leaves_a_compact_tombstone() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let config = redis_config(
        &up.url(),
        "5s",
        &format!("url = \"{}\"", redis.url()),
        "[idempotency]\nttl = \"1s\"\ntombstone_ttl = \"4s\"\n",
    );
    let proxy = Proxy::start(&config);
    let c = Client::new();
    let url = proxy.url("/v1/late");
    // The upstream echoes the body: a response of about 1.5 KB.
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(1000));
    let hash = redis_key("idemproxy", "late");
    let response = format!("{hash}:rec");

    let first = c.post_key(&url, "late", &body).await;
    let completed = Instant::now();
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = c.post_key(&url, "late", &body).await;
    assert_eq!(replay.replayed(), Some("true"), "replayed within ttl");
    assert_eq!(replay.body, first.body);
    assert_eq!(record_state(&c, &proxy, "late").await.as_deref(), Some("completed"));
    assert!(exists(&redis, &response), "the response has its own key");
    let record_bytes = memory_usage(&redis, &hash) + memory_usage(&redis, &response);

    // Deleting a record removes its response too.
    assert_eq!(
        c.post_key(&proxy.url("/v1/deleted"), "deleted", &body).await.status,
        StatusCode::CREATED
    );
    let deleted = redis_key("idemproxy", "deleted");
    assert!(exists(&redis, &format!("{deleted}:rec")));
    let r = c
        .send(
            Method::DELETE,
            &proxy.admin_url("/v1/records?tenant=anonymous&key=deleted"),
            &[],
            "",
        )
        .await;
    assert!(r.status.is_success(), "DELETE answered {}", r.status);
    assert!(!exists(&redis, &deleted) && !exists(&redis, &format!("{deleted}:rec")));

    // Past ttl: the response key is gone, the tombstone answers 410.
    tokio::time::sleep_until((completed + Duration::from_millis(1100)).into()).await;
    let late = c.post_key(&url, "late", &body).await;
    assert_eq!(late.status, StatusCode::GONE, "{:?}", late.body);
    assert_eq!(late.code(), "idempotency_key_expired");
    assert_eq!(up.executions_of("/v1/late"), 1, "a late retry is not executed");
    assert_eq!(record_state(&c, &proxy, "late").await.as_deref(), Some("expired"));
    assert!(!exists(&redis, &response), "the response expired with ttl");
    assert!(exists(&redis, &hash), "the tombstone stays until tombstone_ttl");
    assert_eq!(redis.cli(&["HEXISTS", &hash, "rec"]).trim(), "0");
    let tombstone_bytes = memory_usage(&redis, &hash);
    eprintln!(
        "Redis MEMORY USAGE: completed record {record_bytes} bytes (hash + response, {} byte body), tombstone {tombstone_bytes} bytes",
        first.body.len()
    );
    assert!(tombstone_bytes < 256, "tombstone is {tombstone_bytes} bytes");

    // Past tombstone_ttl the key is new: it executes again.
    let start = Instant::now();
    while record_state(&c, &proxy, "late").await.is_some() {
        assert!(start.elapsed() < Duration::from_secs(8), "the tombstone never went");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("tombstone gone {:?} after completion", completed.elapsed());
    assert!(!exists(&redis, &hash));
    let fresh = c.post_key(&url, "late", &body).await;
    assert_eq!(fresh.status, StatusCode::CREATED);
    assert_eq!(fresh.replayed(), Some("false"));
    assert_eq!(up.executions_of("/v1/late"), 2);
}

/// A private CA and a `localhost` server certificate it signed, written to
/// `dir` as `ca.pem`, `server.pem` and `server.key`.
fn private_ca(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "idemproxy test Redis CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), leaf_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), leaf_key.serialize_pem()).unwrap();
}

/// `rediss://` to a Redis whose certificate a private CA signed: the proxy
/// trusts the system's roots, so `SSL_CERT_FILE` (read by
/// rustls-native-certs) is enough; without it the handshake fails and keyed
/// requests get 503 with nothing forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_from_ssl_cert_file() {
    let certs = tempfile::tempdir().unwrap();
    private_ca(certs.path());
    let file = |name: &str| certs.path().join(name).to_str().unwrap().to_owned();
    let tls_port = free_port();
    // The plain port stays open for the test's own redis-cli; the proxy
    // only gets the TLS one.
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &file("server.pem"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.pem"),
        "--tls-auth-clients",
        "no",
    ]);
    let up = Upstream::start().await;
    let store = format!("url = \"rediss://localhost:{tls_port}/0\"\nop_timeout = \"500ms\"");
    let config = redis_config(&up.url(), "5s", &store, "");
    let c = Client::new();

    // Not trusted: the CA is in no root store the proxy reads.
    let untrusted = Proxy::try_start_in(Arc::new(tempfile::tempdir().unwrap()), &config, &[]).unwrap();
    let r = c.post_key(&untrusted.url("/v1/tls"), "tls", "{}").await;
    assert_eq!(r.code(), "store_unavailable");
    assert_eq!(
        c.get(&untrusted.admin_url("/readyz")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(up.executions_of("/v1/tls"), 0);
    let start = Instant::now();
    while !untrusted.stderr().contains("UnknownIssuer") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the handshake must fail on the certificate: {}",
            untrusted.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(untrusted);

    let ca = file("ca.pem");
    let proxy = Proxy::try_start_in(
        Arc::new(tempfile::tempdir().unwrap()),
        &config,
        &[("SSL_CERT_FILE", ca.as_str())],
    )
    .unwrap();
    let start = Instant::now();
    while c.get(&proxy.admin_url("/readyz")).await.status != StatusCode::OK {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never ready over rediss://: {}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = c.post_key(&proxy.url("/v1/tls"), "tls", "{}").await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    assert_eq!(first.replayed(), Some("false"));
    let replay = c.post_key(&proxy.url("/v1/tls"), "tls", "{}").await;
    assert_eq!(replay.replayed(), Some("true"));
    assert_eq!(replay.body, first.body);
    assert_eq!(up.executions_of("/v1/tls"), 1);
    // Stored in that Redis, reached over TLS.
    assert_eq!(redis.cli(&["HGET", &redis_key("idemproxy", "tls"), "s"]).trim(), "c");
}

#[test]
fn backend_settings_of_another_backend_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let check = |store: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!("[upstream]\nurl = \"http://127.0.0.1:3000\"\n[store]\n{store}\n"),
        )
        .unwrap();
        let (code, _, err) = run_cli(&["check", "--config", path.to_str().unwrap()], &[], dir.path());
        assert_ne!(code, 0, "{store:?} must be rejected");
        err
    };
    assert!(check("backend = \"sled\"\nurl = \"redis://x:6379\"").contains("store.url"));
    assert!(check("backend = \"sled\"\nlease = \"5s\"").contains("store.lease"));
    assert!(check("backend = \"redis\"\npath = \"data\"").contains("store.path"));
    assert!(check("backend = \"redis\"\nsweep_interval = \"1s\"").contains("store.sweep_interval"));
    assert!(check("backend = \"redis\"\nurl = \"http://x\"").contains("store.url"));
    assert!(check("backend = \"redis\"\nurl = \"redis://a\"\ncluster = [\"redis://b\"]").contains("store.cluster"));
    let ok = dir.path().join("ok.toml");
    std::fs::write(
        &ok,
        "[upstream]\nurl = \"http://127.0.0.1:3000\"\n[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\nlease = \"5s\"\nwait_replicas = 1\n",
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "--config", ok.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("redis"), "{out}");
}

// ------------------------------------------- replicas behave as one process

/// Waits (bounded) until a request for each of `keys` is held on some
/// replica for an original on another one: its replica subscribed to the
/// key's channel.
async fn wait_held_elsewhere(redis: &RedisServer, keys: &[&str]) {
    let channels: Vec<String> = keys
        .iter()
        .map(|k| format!("{}:changed", redis_key("idemproxy", k)))
        .collect();
    let mut args = vec!["PUBSUB", "NUMSUB"];
    args.extend(channels.iter().map(String::as_str));
    let start = Instant::now();
    loop {
        let out = redis.cli(&args);
        let counts: Vec<u64> = out
            .lines()
            .skip(1)
            .step_by(2)
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if counts.len() == keys.len() && counts.iter().all(|n| *n > 0) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the duplicates were never held on the other replica: {out}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One original on replica 0, one duplicate held on replica 1 until the
/// original ends; both answers, and when each arrived.
struct HeldElsewhere {
    original: (Resp, Instant),
    held: (Resp, Instant),
}

/// Sends `key` to replica 0 on `path` (which must hold the upstream until
/// `release` runs, e.g. with `gate=1`), holds a duplicate on replica 1,
/// then releases the original.
async fn held_elsewhere(
    redis: &RedisServer,
    proxies: &[Proxy],
    path: &str,
    key: &str,
    in_flight: impl std::future::Future<Output = ()>,
    release: impl FnOnce(),
) -> HeldElsewhere {
    let c = Client::new();
    let send = |i: usize| {
        let (c, url, key) = (c.clone(), proxies[i].url(path), key.to_owned());
        tokio::spawn(async move {
            let r = c.post_key(&url, &key, "{\"n\":1}").await;
            (r, Instant::now())
        })
    };
    let original = send(0);
    in_flight.await;
    let held = send(1);
    wait_held_elsewhere(redis, &[key]).await;
    release();
    HeldElsewhere {
        original: original.await.unwrap(),
        held: held.await.unwrap(),
    }
}

/// Two replicas on one Redis with `extra` config; upstream timeout `timeout`.
fn two_replicas(redis: &RedisServer, upstream: &str, timeout: &str, extra: &str) -> Vec<Proxy> {
    let config = redis_config(upstream, timeout, &format!("url = \"{}\"", redis.url()), extra);
    start_replicas(2, &config)
}

/// The upstream answered but nothing was stored: the held duplicate on the
/// other replica gets the same response, marked replayed, and the upstream
/// runs once; a later request executes again.
async fn check_unstored_response_reaches_the_other_replica(status: u16, extra: &str) {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let proxies = two_replicas(&redis, &up.url(), "5s", extra);
    let path = format!("/v1/unstored?gate=1&status={status}");
    let h = held_elsewhere(&redis, &proxies, &path, "k", up.wait_arrived(1), || up.open_gate()).await;
    let (original, held) = (h.original.0, h.held.0);
    assert_eq!(original.status.as_u16(), status);
    assert_eq!(original.replayed(), Some("false"));
    assert_eq!(
        up.executions_of("/v1/unstored"),
        1,
        "the held duplicate did not execute"
    );
    assert_eq!(held.status.as_u16(), status, "{:?}", held.body);
    assert_eq!(held.replayed(), Some("true"), "the upstream's response, shared");
    assert_eq!(held.body, original.body);
    assert_eq!(held.header("x-execution"), Some("1"));

    // Nothing was stored: a request after the original ended executes again.
    let c = Client::new();
    let again = c.post_key(&proxies[1].url(&path), "k", "{\"n\":1}").await;
    assert_eq!(again.replayed(), Some("false"));
    assert_eq!(up.executions_of("/v1/unstored"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_duplicate_on_another_replica_gets_the_original_503() {
    check_unstored_response_reaches_the_other_replica(503, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_duplicate_on_another_replica_gets_a_never_store_status() {
    check_unstored_response_reaches_the_other_replica(429, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_duplicate_on_another_replica_gets_the_original_on_a_coalesce_only_route() {
    check_unstored_response_reaches_the_other_replica(201, "[idempotency]\nttl = \"0s\"\n").await;
}

/// A listener whose accept queue is full: a connection to it hangs until
/// the connecting side's timeout, then fails as refused (nothing sent).
async fn unreachable_upstream() -> (std::net::SocketAddr, Vec<std::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let listener = socket.listen(0).unwrap();
    std::mem::forget(listener); // never accepts; lives until the test ends
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => fillers.push(s),
            Err(_) => return (addr, fillers),
        }
    }
    panic!("the accept queue never filled up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_duplicate_on_another_replica_gets_the_original_502_refused() {
    let redis = RedisServer::start();
    let (addr, _fillers) = unreachable_upstream().await;
    let config = redis_config(
        &format!("http://{addr}"),
        "10s",
        &format!("url = \"{}\"", redis.url()),
        "",
    )
    .replace("[upstream]\n", "[upstream]\nconnect_timeout = \"3s\"\n");
    let proxies = start_replicas(2, &config);
    let c = Client::new();
    // The original is in flight (claimed) while its connect hangs.
    let in_flight = async {
        let start = Instant::now();
        while record_state(&c, &proxies[1], "refused").await.as_deref() != Some("in_flight") {
            assert!(start.elapsed() < Duration::from_secs(10), "never in flight");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let h = held_elsewhere(&redis, &proxies, "/v1/refused", "refused", in_flight, || {}).await;
    let ((original, done), (held, held_done)) = (h.original, h.held);
    assert_eq!(original.status, StatusCode::BAD_GATEWAY);
    assert_eq!(original.code(), "upstream_unavailable");
    assert_eq!(held.status, StatusCode::BAD_GATEWAY, "{:?}", held.body);
    assert_eq!(held.code(), "upstream_unavailable");
    assert_eq!(
        held.replayed(),
        None,
        "a problem of the proxy carries no Idempotent-Replayed"
    );
    // Had it connected itself, it would have hung for another connect_timeout.
    let lag = held_done.saturating_duration_since(done);
    assert!(
        lag < Duration::from_millis(1500),
        "the held duplicate got the original's 502 ({lag:?} later), not its own"
    );
    assert_eq!(
        record_state(&c, &proxies[0], "refused").await,
        None,
        "refused: the key is free"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_duplicate_on_another_replica_gets_the_original_unknown_outcome() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let proxies = two_replicas(&redis, &up.url(), "5s", "");
    let path = "/v1/broken?gate=1&close=1";
    let h = held_elsewhere(&redis, &proxies, path, "broken", up.wait_arrived(1), || up.open_gate()).await;
    let (original, held) = (h.original.0, h.held.0);
    assert_eq!(original.status, StatusCode::BAD_GATEWAY);
    assert_eq!(original.code(), "upstream_unavailable");
    assert_eq!(held.status, StatusCode::BAD_GATEWAY, "{:?}", held.body);
    assert_eq!(held.code(), "upstream_unavailable");
    assert_eq!(up.executions_of("/v1/broken"), 1, "the held duplicate did not execute");
    // The outcome is unknown: retries are refused (on_lost_outcome = reject).
    let c = Client::new();
    let retry = c.post_key(&proxies[1].url(path), "broken", "{\"n\":1}").await;
    assert_eq!(retry.code(), "outcome_unknown");
    assert_eq!(up.executions_of("/v1/broken"), 1);
}

/// A replica whose clock runs 10 s ahead neither takes a live claim (whose
/// in-flight lifetime on the owner's clock is 7 s) nor sees a stored
/// response (ttl 5 s) as expired: Redis's clock and expiry decide.
/// `IDEMPROXY_TEST_CLOCK_SKEW_MS` is a test-only knob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_skewed_clock_neither_steals_nor_expires() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let config = redis_config(
        &up.url(),
        "2s",
        &format!("url = \"{}\"", redis.url()),
        "[[routes]]\npath = \"/v1/co/*\"\nttl = \"0s\"\n[[routes]]\npath = \"/v1/short/*\"\nttl = \"5s\"\n",
    );
    let accurate = Proxy::start(&config);
    let ahead = Proxy::try_start_in(
        Arc::new(tempfile::tempdir().unwrap()),
        &config,
        &[("IDEMPROXY_TEST_CLOCK_SKEW_MS", "10000")],
    )
    .unwrap();
    let c = Client::new();

    // A live claim (coalesce-only) stays its owner's.
    let original = c.spawn_post_key(&accurate.url("/v1/co/job?gate=1"), "live", "{}");
    up.wait_arrived(1).await;
    let dup = c.spawn_post_key(&ahead.url("/v1/co/job?gate=1"), "live", "{}");
    // Either it is held (new code) or it executed (a stolen claim).
    let start = Instant::now();
    loop {
        let held = redis.cli(&[
            "PUBSUB",
            "NUMSUB",
            &format!("{}:changed", redis_key("idemproxy", "live")),
        ]);
        if held.lines().nth(1).is_some_and(|n| n.trim() != "0") || up.executions() > 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "neither held nor executed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    up.open_gate();
    let (original, dup) = (original.await.unwrap(), dup.await.unwrap());
    assert_eq!(
        up.executions_of("/v1/co/job"),
        1,
        "the skewed replica took a live claim"
    );
    assert_eq!(dup.replayed(), Some("true"));
    assert_eq!(dup.body, original.body);

    // A stored response is replayed on the skewed replica within its ttl.
    let first = c.post_key(&accurate.url("/v1/short/x"), "stored", "{}").await;
    assert_eq!(first.replayed(), Some("false"));
    let replay = c.post_key(&ahead.url("/v1/short/x"), "stored", "{}").await;
    assert_eq!(replay.replayed(), Some("true"), "expiry is Redis's, not the replica's");
    assert_eq!(replay.body, first.body);
    assert_eq!(up.executions_of("/v1/short/x"), 1);
}

/// A Redis Cluster of one node whose every connection goes through a fault
/// proxy: the node announces the proxy's port.
async fn cluster_behind_a_fault_proxy() -> (RedisServer, support::fault::FaultProxy) {
    let port = free_port();
    let fault = support::fault::FaultProxy::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let node = RedisServer::start_on(
        port,
        &[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-port",
            &free_port().to_string(),
            "--cluster-announce-ip",
            "127.0.0.1",
            "--cluster-announce-port",
            &fault.port().to_string(),
        ],
    );
    assert!(node.cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]).contains("OK"));
    let start = Instant::now();
    while !node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
        assert!(start.elapsed() < Duration::from_secs(15), "cluster did not become ok");
        std::thread::sleep(Duration::from_millis(50));
    }
    (node, fault)
}

/// Polls the records API until `key` is `want` (bounded), failing at once
/// if it is ever `lost`.
async fn settles_to(c: &Client, proxy: &Proxy, key: &str, want: Option<&str>) {
    let start = Instant::now();
    loop {
        let state = record_state(c, proxy, key).await;
        assert_ne!(
            state.as_deref(),
            Some("lost"),
            "{key} turned lost without an upstream call"
        );
        if state.as_deref() == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{key} is {state:?}, never {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The claim ran in Redis but its reply was lost with the connection; the
/// cluster client retries the script on a new connection: the claim
/// recognises its own token and the key executes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_claim_reply_retried_by_the_cluster_client_is_the_callers_own() {
    let (_node, fault) = cluster_behind_a_fault_proxy().await;
    let up = Upstream::start().await;
    let store = format!(
        "cluster = [\"redis://127.0.0.1:{}\"]\nlease = \"1s\"\nop_timeout = \"3s\"",
        fault.port()
    );
    let proxy = Proxy::start(&redis_config(&up.url(), "5s", &store, ""));
    let c = Client::new();
    assert_eq!(
        c.post_key(&proxy.url("/v1/warm"), "warm", "{}").await.status,
        StatusCode::CREATED
    );

    let k = redis_key("idemproxy", "lost-reply");
    fault.drop_reply_to(&[b"EVALSHA", k.as_bytes()]);
    let r = c.post_key(&proxy.url("/v1/lr"), "lost-reply", "{}").await;
    fault.wait_dropped(1).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?} {}", r.body, proxy.stderr());
    assert_eq!(r.replayed(), Some("false"));
    assert_eq!(up.executions_of("/v1/lr"), 1);
    settles_to(&c, &proxy, "lost-reply", Some("completed")).await;
    let again = c.post_key(&proxy.url("/v1/lr"), "lost-reply", "{}").await;
    assert_eq!(again.replayed(), Some("true"));
    assert_eq!(up.executions_of("/v1/lr"), 1);
}

/// Standalone Redis: the claim's or the finish's reply is lost with the
/// connection. A lost claim is answered 503 (nothing forwarded) and
/// settled, so the key is free, never `lost`; a lost finish is settled, so
/// the response is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_on_standalone_redis_never_leave_a_key_lost() {
    let redis = RedisServer::start();
    let fault = support::fault::FaultProxy::start(redis.addr().parse().unwrap()).await;
    let up = Upstream::start().await;
    let store = format!(
        "url = \"redis://127.0.0.1:{}/0\"\nlease = \"1s\"\nop_timeout = \"2s\"",
        fault.port()
    );
    let proxy = Proxy::start(&redis_config(&up.url(), "5s", &store, ""));
    let c = Client::new();

    let k = redis_key("idemproxy", "claim");
    fault.drop_reply_to(&[b"EVALSHA", k.as_bytes()]);
    let r = c.post_key(&proxy.url("/v1/claim"), "claim", "{}").await;
    fault.wait_dropped(1).await;
    if r.status == StatusCode::SERVICE_UNAVAILABLE {
        assert_eq!(r.code(), "store_unavailable");
        assert_eq!(up.executions_of("/v1/claim"), 0, "nothing forwarded");
        settles_to(&c, &proxy, "claim", None).await;
        let r = c.post_key(&proxy.url("/v1/claim"), "claim", "{}").await;
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.replayed(), Some("false"));
    } else {
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    assert_eq!(up.executions_of("/v1/claim"), 1, "exactly once");
    settles_to(&c, &proxy, "claim", Some("completed")).await;

    // The finish carries the response; its reply is lost.
    let k = redis_key("idemproxy", "finish");
    fault.drop_reply_to(&[b"EVALSHA", k.as_bytes(), b"execution"]);
    let r = c.post_key(&proxy.url("/v1/finish"), "finish", "{}").await;
    fault.wait_dropped(1).await;
    assert_eq!(r.status, StatusCode::CREATED);
    settles_to(&c, &proxy, "finish", Some("completed")).await;
    let again = c.post_key(&proxy.url("/v1/finish"), "finish", "{}").await;
    assert_eq!(again.replayed(), Some("true"));
    assert_eq!(again.body, r.body);
    assert_eq!(up.executions_of("/v1/finish"), 1);
}

/// A keyed POST over its own HTTP/1.1 connection, waiting as long as it
/// takes (bounded: 2 minutes; the shared client gives up after 30 s, which
/// a request held through a brown-out on a loaded machine may need).
async fn post_patiently(addr: std::net::SocketAddr, path: &str, key: &str) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\nidempotency-key: {key}\r\ncontent-length: 2\r\n\r\n{{}}"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, text)
    };
    tokio::time::timeout(Duration::from_secs(120), exchange)
        .await
        .expect("no answer within 2 minutes")
}

/// A brown-out longer than 30 s (and than the lease) between two replicas
/// and Redis, with 2000 keyed requests in flight: 1500 forwarded, whose
/// finishes never get through; 500 whose claims ran in Redis but whose
/// replies never came (the callers answered 503). Then every connection
/// breaks, losing whatever was held, and Redis is reachable again.
/// Afterwards every key is either stored once or free: none is `lost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_brown_out_every_key_is_stored_once_or_free() {
    const FORWARDED: usize = 1500;
    const CLAIMING: usize = 500;
    let redis = RedisServer::start();
    let fault = support::fault::FaultProxy::start(redis.addr().parse().unwrap()).await;
    let up = Upstream::start().await;
    let store = format!(
        "url = \"redis://127.0.0.1:{}/0\"\nlease = \"2s\"\nop_timeout = \"2s\"",
        fault.port()
    );
    let proxies = start_replicas(2, &redis_config(&up.url(), "60s", &store, ""));
    let c = Client::new();
    let send = |i: usize| {
        let addr = proxies[i % 2].addr;
        tokio::spawn(async move { post_patiently(addr, &format!("/v1/bo/{i}?gate=1"), &format!("bo-{i}")).await })
    };

    // In batches, so that the claims of the burst meet no timeout of ours.
    let start = Instant::now();
    let mut forwarded = Vec::new();
    for batch in (0..FORWARDED).collect::<Vec<_>>().chunks(250) {
        forwarded.extend(batch.iter().copied().map(send));
        while up.executions() < forwarded.len() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "only {} of the first {FORWARDED} requests reached the upstream",
                up.executions()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("{FORWARDED} forwarded in {:?}", start.elapsed());

    // The claims run in Redis, their replies do not come; then nothing
    // gets through either way, before the claimants give up (op_timeout).
    fault.stall_replies();
    let browned = Instant::now();
    let claiming: Vec<_> = (FORWARDED..FORWARDED + CLAIMING).map(send).collect();
    let start = Instant::now();
    while redis
        .cli(&["EVAL", "return #redis.call('KEYS', 'idemproxy:{*}')", "0"])
        .trim()
        != (FORWARDED + CLAIMING).to_string()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the claims never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fault.stall();
    for t in claiming {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("store_unavailable"), "{body}");
    }
    eprintln!("{CLAIMING} claims refused {:?} into the brown-out", browned.elapsed());
    up.open_gate();
    for t in forwarded {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    eprintln!("{FORWARDED} answered {:?} into the brown-out", browned.elapsed());
    tokio::time::sleep_until((browned + Duration::from_secs(35)).into()).await;
    fault.reset_all();
    fault.resume();
    eprintln!("brown-out over after {:?}", browned.elapsed());

    // Settled: no record left in flight or lost (asked of Redis at once).
    const UNSETTLED: &str = "local n = 0 for _, k in ipairs(redis.call('KEYS', 'idemproxy:{*}')) do \
        local s = redis.call('HGET', k, 's') if s == 'f' or s == 'l' then n = n + 1 end end return n";
    let start = Instant::now();
    loop {
        let unsettled = redis.cli(&["EVAL", UNSETTLED, "0"]);
        if unsettled.trim() == "0" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} keys still in flight or lost {:?} after the brown-out",
            unsettled.trim(),
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("every key settled {:?} after the brown-out", start.elapsed());
    let lookups = Arc::new(tokio::sync::Semaphore::new(32));
    let states: Vec<_> = (0..FORWARDED + CLAIMING)
        .map(|i| {
            let (c, admin, lookups) = (c.clone(), proxies[i % 2].admin_url("/"), lookups.clone());
            tokio::spawn(async move {
                let _permit = lookups.acquire_owned().await.unwrap();
                let r = c.get(&format!("{admin}v1/records?tenant=anonymous&key=bo-{i}")).await;
                (r.status == StatusCode::OK).then(|| r.json()["state"].as_str().unwrap().to_owned())
            })
        })
        .collect();
    let mut found = Vec::new();
    for t in states {
        found.push(t.await.unwrap());
    }
    let states = found;
    for (i, state) in states.iter().enumerate() {
        let executions = up.executions_of(&format!("/v1/bo/{i}"));
        match (executions, state.as_deref()) {
            (1, Some("completed")) | (0, None) => {}
            other => panic!("bo-{i}: (executions, state) = {other:?}"),
        }
        assert_eq!(executions, usize::from(i < FORWARDED), "bo-{i}");
    }
    let replay = c.post_key(&proxies[1].url("/v1/bo/0?gate=1"), "bo-0", "{}").await;
    assert_eq!(replay.replayed(), Some("true"));
    let fresh = c
        .post_key(
            &proxies[0].url(&format!("/v1/bo/{FORWARDED}")),
            &format!("bo-{FORWARDED}"),
            "{}",
        )
        .await;
    assert_eq!(fresh.replayed(), Some("false"));
    assert_eq!(up.executions_of(&format!("/v1/bo/{FORWARDED}")), 1);
}

/// How long a duplicate held on another replica waits after the original's
/// client got its response: by notification, about one Redis round trip.
/// `IDEMPROXY_LAG_ROUNDS` (default 5) and `IDEMPROXY_LAG_KEYS` (keys at once
/// per round, default 20) give more or quieter samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_held_on_another_replica_answers_right_after_the_original() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let proxies = two_replicas(&redis, &up.url(), "5s", "");
    let c = Client::new();
    let rounds: usize = std::env::var("IDEMPROXY_LAG_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let per_round: usize = std::env::var("IDEMPROXY_LAG_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut lags = Vec::new();
    for round in 0..rounds {
        let keys: Vec<String> = (0..per_round).map(|i| format!("lag-{round}-{i}")).collect();
        let send = |i: usize, key: &str| {
            let (c, url, key) = (c.clone(), proxies[i].url("/v1/lag?delay=400"), key.to_owned());
            tokio::spawn(async move {
                let r = c.post_key(&url, &key, "{}").await;
                (r, Instant::now())
            })
        };
        let before = up.executions();
        let originals: Vec<_> = keys.iter().map(|k| send(0, k)).collect();
        up.wait_arrived(before + keys.len()).await;
        let held: Vec<_> = keys.iter().map(|k| send(1, k)).collect();
        let names: Vec<&str> = keys.iter().map(String::as_str).collect();
        wait_held_elsewhere(&redis, &names).await;
        for (o, h) in originals.into_iter().zip(held) {
            let ((o, done), (h, held_done)) = (o.await.unwrap(), h.await.unwrap());
            assert_eq!(o.replayed(), Some("false"));
            assert_eq!(h.replayed(), Some("true"));
            assert_eq!(h.body, o.body);
            lags.push(held_done.saturating_duration_since(done));
        }
    }
    assert_eq!(up.executions_of("/v1/lag"), rounds * per_round);
    lags.sort();
    let at = |q: f64| lags[((lags.len() as f64 * q).ceil() as usize).clamp(1, lags.len()) - 1];
    eprintln!(
        "held on another replica, answered after the original: p50 {:?}, p99 {:?}, max {:?} ({} samples)",
        at(0.5),
        at(0.99),
        lags[lags.len() - 1],
        lags.len()
    );
    // By notification, not a poll period (CI machines are noisy: a wide bound).
    assert!(at(0.5) < Duration::from_millis(50), "p50 {:?}", at(0.5));
}
