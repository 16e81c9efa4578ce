//! A real streaming upstream and a client that reads bodies as they arrive,
//! for the streamed-response tests (SPEC §7).
//!
//! The upstream answers every POST with a stream whose pace the test
//! controls: with `gated=1`, event `i` (1-based) is sent only once the test
//! has called [`StreamUpstream::release`] with `i` or more, so a test can
//! prove that a client saw event 1 while event 2 was not yet sent. Query
//! parameters:
//! - `events=N` (default 5): events in the stream;
//! - `gated=1`: wait for [`StreamUpstream::release`] before each event;
//! - `reset=K`: after K events, reset the connection (TCP RST, no final chunk);
//! - `every=MS`: wait MS milliseconds before each event after the first;
//! - `pad=N`: add N bytes of padding to every event;
//! - `ndjson=1`: `application/x-ndjson` lines instead of server-sent events;
//! - `status=N`: the response status (default 200).
//!
//! `POST /v1/chat/completions` is a small fake of OpenAI's streaming chat
//! completions (`stream: true`): one chunk per token, then `data: [DONE]`;
//! its tokens name the execution, so a second execution is visible.
//! Every event carries the execution number.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The tokens of the fake chat completion; `{n}` is the execution number.
pub const TOKENS: [&str; 5] = ["Hello", " from", " execution", " {n}", "!"];

/// A streaming upstream on `127.0.0.1:0`, served until dropped.
pub struct StreamUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct State {
    executions: AtomicUsize,
    /// Gated events up to this number may be sent (all executions).
    released: watch::Sender<usize>,
    /// Events sent, over all executions.
    sent: watch::Sender<usize>,
}

impl StreamUpstream {
    pub async fn start() -> StreamUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            executions: AtomicUsize::new(0),
            released: watch::Sender::new(0),
            sent: watch::Sender::new(0),
        });
        let st = state.clone();
        let stop = super::accept_until_stopped(listener, move |tcp| {
            // Closing with linger 0 sends a TCP RST: a cut stream is a real
            // reset, not a polite end of file. (Deprecated because a non-zero
            // linger blocks on drop; zero never does.)
            #[allow(deprecated)]
            let _ = tcp.set_linger(Some(Duration::ZERO));
            let _ = tcp.set_nodelay(true);
            let st = st.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(st.clone(), req));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
            });
        });
        StreamUpstream {
            addr,
            state,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Streams the upstream started (requests it executed).
    pub fn executions(&self) -> usize {
        self.state.executions.load(Ordering::SeqCst)
    }

    /// Lets gated events up to number `upto` go out.
    pub fn release(&self, upto: usize) {
        self.state.released.send_replace(upto);
    }

    /// Events sent so far, all executions together.
    pub fn sent(&self) -> usize {
        *self.state.sent.borrow()
    }

    /// Waits until `n` events have been sent (bounded: 20 s).
    pub async fn wait_sent(&self, n: usize) {
        let mut rx = self.state.sent.subscribe();
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|v| *v >= n))
            .await
            .unwrap_or_else(|_| panic!("the upstream did not send {n} events within 20s"))
            .unwrap();
    }
}

fn query(req: &Request<Incoming>) -> std::collections::HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Response<ChannelBody>, Infallible> {
    let q = query(&req);
    let chat = req.uri().path() == "/v1/chat/completions";
    let _ = req.into_body().collect().await;
    let n = st.executions.fetch_add(1, Ordering::SeqCst) + 1;
    let num = |k: &str| q.get(k).and_then(|v| v.parse::<usize>().ok());
    let events: Vec<Bytes> = if chat {
        chat_chunks(n)
    } else {
        let pad = "p".repeat(num("pad").unwrap_or(0));
        (1..=num("events").unwrap_or(5))
            .map(|i| {
                let json = format!("{{\"execution\":{n},\"event\":{i},\"pad\":\"{pad}\"}}");
                if q.contains_key("ndjson") {
                    Bytes::from(format!("{json}\n"))
                } else {
                    Bytes::from(format!("id: {i}\ndata: {json}\n\n"))
                }
            })
            .collect()
    };
    let gated = q.contains_key("gated");
    let reset = num("reset");
    let every = Duration::from_millis(num("every").unwrap_or(0) as u64);
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut released = st.released.subscribe();
        for (i, event) in events.into_iter().enumerate() {
            let number = i + 1;
            if reset.is_some_and(|k| i == k) {
                let _ = tx.send(Err("upstream reset mid-stream".into())).await;
                return;
            }
            if gated && released.wait_for(|r| *r >= number).await.is_err() {
                return;
            }
            if number > 1 && !every.is_zero() {
                tokio::time::sleep(every).await;
            }
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
            st.sent.send_modify(|s| *s += 1);
        }
    });
    let mut res = Response::new(ChannelBody(rx));
    *res.status_mut() = StatusCode::from_u16(num("status").unwrap_or(200) as u16).unwrap();
    let ct = if q.contains_key("ndjson") {
        "application/x-ndjson"
    } else {
        "text/event-stream; charset=utf-8"
    };
    res.headers_mut().insert("content-type", ct.parse().unwrap());
    res.headers_mut().insert("cache-control", "no-cache".parse().unwrap());
    res.headers_mut().insert("x-execution", n.into());
    Ok(res)
}

/// The chunks of OpenAI's streaming chat completion format for execution `n`.
fn chat_chunks(n: usize) -> Vec<Bytes> {
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        let v = serde_json::json!({
            "id": format!("chatcmpl-{n}"),
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        Bytes::from(format!("data: {v}\n\n"))
    };
    let mut out = vec![chunk(
        serde_json::json!({"role": "assistant", "content": ""}),
        serde_json::Value::Null,
    )];
    for t in TOKENS {
        let t = t.replace("{n}", &n.to_string());
        out.push(chunk(serde_json::json!({"content": t}), serde_json::Value::Null));
    }
    out.push(chunk(serde_json::json!({}), serde_json::json!("stop")));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

/// A response body fed by the upstream's event task.
pub struct ChannelBody(mpsc::Receiver<Result<Bytes, BoxError>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

// ------------------------------------------------------------------ client

/// A response whose body is read as it arrives.
pub struct Streamed {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    /// Everything read so far.
    pub read: Vec<u8>,
}

impl Streamed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Reads until the body so far contains `needle` (bounded: 20 s).
    /// `Err` if the body ends or breaks first.
    pub async fn read_until(&mut self, needle: &str) -> Result<(), String> {
        // Only the new bytes (and a needle's length before them) are searched.
        let mut from = 0;
        let mut found = |read: &[u8]| {
            let hit = read[from..].windows(needle.len()).any(|w| w == needle.as_bytes());
            from = read.len().saturating_sub(needle.len());
            hit
        };
        let step = async {
            while !found(&self.read) {
                match self.body.frame().await {
                    None => return Err(format!("the body ended before {needle:?}")),
                    Some(Err(e)) => return Err(format!("the body broke before {needle:?}: {e}")),
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            self.read.extend_from_slice(d);
                        }
                    }
                }
            }
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(20), step)
            .await
            .map_err(|_| format!("{needle:?} did not arrive within 20s"))?
    }

    /// Reads to the end: `Ok(all bytes)` after a clean end, `Err((bytes read,
    /// error))` when the stream is cut (bounded: 30 s).
    pub async fn finish(mut self) -> Result<Bytes, (Bytes, String)> {
        let step = async {
            loop {
                match self.body.frame().await {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(e.to_string()),
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            self.read.extend_from_slice(d);
                        }
                    }
                }
            }
        };
        let r = tokio::time::timeout(Duration::from_secs(30), step)
            .await
            .unwrap_or_else(|_| Err("the body did not end within 30s".to_owned()));
        let bytes = Bytes::from(self.read);
        match r {
            Ok(()) => Ok(bytes),
            Err(e) => Err((bytes, e)),
        }
    }
}

/// POSTs with an idempotency key and returns as soon as the head arrives
/// (bounded: 20 s). A fresh connection per call, like separate clients.
pub async fn post_stream(url: &str, key: &str) -> Streamed {
    let client = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::post(url)
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{\"prompt\":\"hi\"}")))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("no response head within 20s")
        .expect("request failed");
    let (parts, body) = res.into_parts();
    Streamed {
        status: parts.status,
        headers: parts.headers,
        body,
        read: Vec::new(),
    }
}

/// The SSE event `i` of execution `n`, as [`StreamUpstream`] sends it (no padding).
pub fn event(n: usize, i: usize) -> String {
    format!("id: {i}\ndata: {{\"execution\":{n},\"event\":{i},\"pad\":\"\"}}\n\n")
}
