//! Shared harness for the integration tests: a real upstream that counts
//! executions, the real `idemproxy` binary started on port 0, and a client.
//!
//! The upstream's behaviour is chosen per request by query parameters, so
//! one upstream serves every scenario:
//! - `delay=MS`: wait before answering;
//! - `status=N`: answer with this status;
//! - `size=N`: answer with N bytes, streamed in 64 KiB chunks;
//! - `hang=1`: never answer; `close=1`: drop the connection after reading;
//! - `cookie=1`: add a `Set-Cookie` header;
//! - `hop=1`: add hop-by-hop response headers (`Connection: x-up-hop`,
//!   `X-Up-Hop`, `Keep-Alive`, `Proxy-Authenticate`, `Upgrade`, `Trailer`)
//!   next to an end-to-end `X-End-To-End`;
//! - `gate=1`: hold the answer until the test calls [`Upstream::open_gate`].
//!
//! The JSON body of a normal answer names the execution number, the method,
//! the path and query, the body it received and the headers it saw, so a
//! test can compare bytes and headers exactly.
#![allow(dead_code)]

pub mod body_probe;
pub mod fault;
pub mod flaky;
pub mod raw;
pub mod tmpfs;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

// ---------------------------------------------------------------- upstream

/// A counting upstream on `127.0.0.1:0`, served until dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[derive(Default)]
struct UpstreamState {
    executions: AtomicUsize,
    /// Executions by path (without query).
    by_path: Mutex<HashMap<String, usize>>,
    /// Requests that have arrived (incremented before any delay).
    arrived: watch::Sender<usize>,
    /// Bytes of request bodies consumed by `/sink`.
    sunk: AtomicUsize,
    /// `gate=1` requests wait until this is true.
    gate: watch::Sender<bool>,
    /// TCP connections accepted.
    connections: AtomicUsize,
}

impl Upstream {
    pub async fn start() -> Upstream {
        Self::start_with(None).await
    }

    /// An upstream served over TLS with `tls` (an `https://` upstream).
    pub async fn start_tls(tls: Arc<rustls::ServerConfig>) -> Upstream {
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState::default());
        let st = state.clone();
        let stop = accept_until_stopped(listener, move |tcp| {
            st.connections.fetch_add(1, Ordering::SeqCst);
            let st = st.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(st.clone(), req));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                    Some(tls) => {
                        if let Ok(stream) = tls.accept(tcp).await {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                }
            });
        });
        Upstream {
            addr,
            state,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests the upstream executed (answered or hanging), all paths.
    pub fn executions(&self) -> usize {
        self.state.executions.load(Ordering::SeqCst)
    }

    pub fn executions_of(&self, path: &str) -> usize {
        *self.state.by_path.lock().unwrap().get(path).unwrap_or(&0)
    }

    /// TCP connections the upstream accepted (pooling shows here).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn sunk_bytes(&self) -> usize {
        self.state.sunk.load(Ordering::SeqCst)
    }

    /// Releases every `gate=1` request, present and future.
    pub fn open_gate(&self) {
        self.state.gate.send_replace(true);
    }

    /// Waits until at least `n` requests have arrived (bounded: 10 s).
    pub async fn wait_arrived(&self, n: usize) {
        let mut rx = self.state.arrived.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| *v >= n))
            .await
            .expect("upstream did not see the expected requests within 10s")
            .unwrap();
    }
}

/// Accepts connections on `listener` and hands each to `serve` until the
/// returned sender is dropped (the test upstreams' accept loop).
pub fn accept_until_stopped(
    listener: TcpListener,
    serve: impl Fn(tokio::net::TcpStream) + Send + 'static,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = listener.accept() => if let Ok((tcp, _)) = r { serve(tcp) },
                _ = &mut stopped => return,
            }
        }
    });
    stop
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

async fn handle(st: Arc<UpstreamState>, req: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    let q = query(&req);
    let method = req.method().to_string();
    let path_q = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let path = req.uri().path().to_owned();
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let version = format!("{:?}", req.version());
    let n = st.executions.fetch_add(1, Ordering::SeqCst) + 1;
    *st.by_path.lock().unwrap().entry(path.clone()).or_default() += 1;
    st.arrived.send_modify(|v| *v += 1);

    if path == "/sink" {
        // Consume a (large) body without keeping it.
        let mut body = req.into_body();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            if let Ok(d) = frame.map(|f| f.into_data()) {
                total += d.map(|d| d.len()).unwrap_or(0);
            }
        }
        st.sunk.fetch_add(total, Ordering::SeqCst);
        return Ok(Response::new(full(format!("{{\"received\":{total}}}"))));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if let Some(ms) = q.get("delay").and_then(|d| d.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if q.contains_key("gate") {
        let mut open = st.gate.subscribe();
        let _ = open.wait_for(|o| *o).await;
    }
    if q.contains_key("hang") {
        std::future::pending::<()>().await;
    }
    if q.contains_key("close") {
        // Answer with a broken response: a Content-Length we never honour.
        let stream = futures_stream(vec![
            Ok(Bytes::from_static(b"partial")),
            Err("upstream went away".into()),
        ]);
        let mut res = Response::new(stream);
        res.headers_mut().insert("content-length", "100".parse().unwrap());
        return Ok(res);
    }
    let status = q.get("status").and_then(|s| s.parse::<u16>().ok()).unwrap_or(201);
    let mut res = if let Some(size) = q.get("size").and_then(|s| s.parse::<usize>().ok()) {
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let mut chunks = Vec::new();
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            chunks.push(Ok(chunk.slice(..n)));
            left -= n;
        }
        Response::new(futures_stream(chunks))
    } else {
        let json = serde_json::json!({
            "execution": n,
            "method": method,
            "path": path_q,
            "version": version,
            "body": String::from_utf8_lossy(&body),
            "headers": headers,
        });
        let mut r = Response::new(full(json.to_string()));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    };
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res.headers_mut().insert("x-execution", n.to_string().parse().unwrap());
    if q.contains_key("cookie") {
        res.headers_mut()
            .insert("set-cookie", format!("session={n}").parse().unwrap());
    }
    if q.contains_key("hop") {
        let h = res.headers_mut();
        for (k, v) in [
            ("connection", "x-up-hop"),
            ("x-up-hop", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic realm=\"up\""),
            ("upgrade", "h2c"),
            ("trailer", "x-up-trailer"),
            ("x-end-to-end", "kept"),
        ] {
            h.insert(k, v.parse().unwrap());
        }
    }
    Ok(res)
}

pub fn full(s: impl Into<Bytes>) -> BoxBody {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

fn futures_stream(items: Vec<Result<Bytes, Box<dyn std::error::Error + Send + Sync>>>) -> BoxBody {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for item in items {
            if tx.send(item.map(Frame::data)).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream_from(rx);
    BodyExt::boxed(StreamBody::new(stream))
}

/// A minimal `Stream` over an mpsc receiver (avoids a tokio-stream dependency).
fn tokio_stream_from<T>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    struct S<T>(tokio::sync::mpsc::Receiver<T>);
    impl<T> futures_core::Stream for S<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    S(rx)
}

// ------------------------------------------------------------------- proxy

/// The real binary, started with a config file in a temp dir.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    child: Option<Child>,
    pub dir: Arc<tempfile::TempDir>,
    pub config_path: PathBuf,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
}

impl Proxy {
    /// Starts the proxy with `config` (TOML); `{dir}` in it is replaced by a
    /// fresh temp dir (for the sled store). Listens on port 0.
    pub fn start(config: &str) -> Proxy {
        Self::start_in(Arc::new(tempfile::tempdir().unwrap()), config)
    }

    /// Like `start`, in an existing dir (a restart on the same data).
    pub fn start_in(dir: Arc<tempfile::TempDir>, config: &str) -> Proxy {
        Self::try_start_in(dir, config, &[]).expect("proxy did not start")
    }

    pub fn try_start_in(dir: Arc<tempfile::TempDir>, config: &str, env: &[(&str, &str)]) -> Result<Proxy, String> {
        let config_path = dir.path().join("idemproxy.toml");
        let text = config.replace("{dir}", dir.path().to_str().unwrap());
        std::fs::write(&config_path, text).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_idemproxy"));
        cmd.args(["run", "--config"]).arg(&config_path);
        cmd.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
        cmd.env("IDEMPROXY_LOG", "idemproxy=debug,info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::launch(cmd, dir, config_path)
    }

    /// Starts `idemproxy` with exactly `args` in the working directory `dir`
    /// and no config file written (nor `IDEMPROXY_CONFIG` inherited): for the
    /// default config path. `args` must make it listen on port 0.
    pub fn try_start_args(dir: Arc<tempfile::TempDir>, args: &[&str], env: &[(&str, &str)]) -> Result<Proxy, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_idemproxy"));
        cmd.args(args).current_dir(dir.path()).env_remove("IDEMPROXY_CONFIG");
        cmd.env("IDEMPROXY_LOG", "idemproxy=debug,info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let config_path = dir.path().join("config/idemproxy.toml");
        Self::launch(cmd, dir, config_path)
    }

    fn launch(mut cmd: Command, dir: Arc<tempfile::TempDir>, config_path: PathBuf) -> Result<Proxy, String> {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        // Keep draining stdout (kept, like stderr) so the child never blocks
        // on a full pipe.
        let stdout = Arc::new(Mutex::new(line.clone()));
        let sink = stdout.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let Some((main, admin)) = listening_line(line.trim()) else {
            let status = child.wait().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            return Err(format!("exit {status}: {}", stderr.lock().unwrap()));
        };
        Ok(Proxy {
            addr: main,
            admin,
            child: Some(child),
            dir,
            config_path,
            stderr,
            stdout,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// SIGKILL and reap: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit (bounded), returning its status.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < limit, "proxy did not exit within {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().expect("running").try_wait().unwrap()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Everything the process wrote on stdout so far, the readiness line first.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Resident set size in KiB (VmRSS) and its peak (VmHWM).
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The bound addresses from the proxy's readiness line on stdout: the text
/// form `idemproxy listening on MAIN admin ADMIN`, or with JSON logs the
/// object `{"event": "listening", "main": ..., "admin": ...}`.
pub fn listening_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if let Some(rest) = line.strip_prefix("idemproxy listening on ") {
        let (main, admin) = rest.split_once(" admin ")?;
        return Some((main.parse().ok()?, admin.parse().ok()?));
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v["event"] != "listening" {
        return None;
    }
    Some((v["main"].as_str()?.parse().ok()?, v["admin"].as_str()?.parse().ok()?))
}

/// Runs `idemproxy` with `args` to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idemproxy"));
    cmd.args(args).current_dir(cwd).env_remove("IDEMPROXY_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A minimal config: upstream, sled store in `{dir}`, then `extra`.
pub fn config(upstream: &str, extra: &str) -> String {
    format!("[upstream]\nurl = \"{upstream}\"\ntimeout = \"5s\"\n\n[store]\npath = \"{{dir}}/data\"\n\n{extra}\n")
}

// ------------------------------------------------------------------ client

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The problem `code`, asserting the problem+json content type.
    pub fn code(&self) -> String {
        assert_eq!(
            self.headers.get("content-type").map(|v| v.to_str().unwrap()),
            Some("application/problem+json"),
            "expected a problem, got {} {:?}",
            self.status,
            self.body
        );
        self.json()["code"].as_str().unwrap().to_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn replayed(&self) -> Option<&str> {
        self.header("idempotent-replayed")
    }
}

/// An HTTP/1.1 client with keep-alive.
#[derive(Clone)]
pub struct Client {
    inner: HyperClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Client {
        Client {
            inner: HyperClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// HTTP/2 with prior knowledge (h2c).
    pub fn h2c() -> Client {
        Client {
            inner: HyperClient::builder(TokioExecutor::new()).http2_only(true).build_http(),
        }
    }

    pub async fn send(&self, method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Resp {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let res = tokio::time::timeout(Duration::from_secs(30), self.inner.request(req))
            .await
            .expect("request took more than 30s")
            .expect("request failed");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("read body").to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, url: &str) -> Resp {
        self.send(Method::GET, url, &[], Bytes::new()).await
    }

    /// POST with an idempotency key, in the background (to hold it in flight).
    pub fn spawn_post_key(&self, url: &str, key: &str, body: &str) -> tokio::task::JoinHandle<Resp> {
        let (c, url, key, body) = (self.clone(), url.to_owned(), key.to_owned(), body.to_owned());
        tokio::spawn(async move { c.post_key(&url, &key, &body).await })
    }

    /// POST with an idempotency key.
    pub async fn post_key(&self, url: &str, key: &str, body: &str) -> Resp {
        self.send(
            Method::POST,
            url,
            &[("idempotency-key", key)],
            Bytes::copy_from_slice(body.as_bytes()),
        )
        .await
    }
}

impl Client {
    /// Like `send`, but a failed exchange (connection refused or cut, body
    /// broken, more than 30 s) is an `Err` instead of a panic.
    pub async fn try_send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Resp, String> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).map_err(|e| e.to_string())?;
        let exchange = async {
            let res = self
                .inner
                .request(req)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let (parts, body) = res.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("body failed: {e}"))?
                .to_bytes();
            Ok(Resp {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .map_err(|_| "request took more than 30s".to_owned())?
    }

    /// GET whose body is handed to `each` chunk by chunk instead of being
    /// collected: for downloads too large to keep. Returns status and headers.
    pub async fn get_each(&self, url: &str, mut each: impl FnMut(&[u8])) -> (StatusCode, HeaderMap) {
        let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
        let res = tokio::time::timeout(Duration::from_secs(30), self.inner.request(req))
            .await
            .expect("request took more than 30s")
            .expect("request failed");
        let (parts, mut body) = res.into_parts();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.expect("read body").data_ref() {
                each(data);
            }
        }
        (parts.status, parts.headers)
    }
}

/// A request body of `left` bytes produced chunk by chunk from one shared
/// `Bytes` (no allocation per chunk, nothing kept), with an unknown length
/// so it goes out chunked: a real stream, not a buffer.
pub struct RepeatBody {
    chunk: Bytes,
    left: usize,
}

impl RepeatBody {
    pub fn new(byte: u8, total: usize) -> Self {
        RepeatBody {
            chunk: Bytes::from(vec![byte; 64 * 1024]),
            left: total,
        }
    }
}

impl http_body::Body for RepeatBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len());
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

/// Sends `total` bytes of `byte` as a streamed (chunked) request body.
pub async fn send_stream(method: Method, url: &str, byte: u8, total: usize) -> Resp {
    send_stream_with(
        HyperClient::builder(TokioExecutor::new()).build_http(),
        method,
        url,
        byte,
        total,
    )
    .await
}

/// `send_stream` over HTTP/2 with prior knowledge (h2c).
pub async fn send_stream_h2c(method: Method, url: &str, byte: u8, total: usize) -> Resp {
    let client = HyperClient::builder(TokioExecutor::new()).http2_only(true).build_http();
    send_stream_with(client, method, url, byte, total).await
}

async fn send_stream_with(
    client: HyperClient<hyper_util::client::legacy::connect::HttpConnector, RepeatBody>,
    method: Method,
    url: &str,
    byte: u8,
    total: usize,
) -> Resp {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .body(RepeatBody::new(byte, total))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("request took more than 30s")
        .expect("request failed");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("read body").to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `GET /v1/records`: the JSON record, or `None` on 404.
pub async fn record(c: &Client, p: &Proxy, tenant: &str, key: &str) -> Option<serde_json::Value> {
    let r = c
        .get(&p.admin_url(&format!("/v1/records?tenant={tenant}&key={key}")))
        .await;
    match r.status {
        StatusCode::OK => Some(r.json()),
        StatusCode::NOT_FOUND => None,
        s => panic!("records API answered {s}: {:?}", r.body),
    }
}
pub mod streaming;
