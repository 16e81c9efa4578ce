//! An upstream that records how each request body ended: complete (with its
//! length) or aborted (the connection closed or failed before the body's
//! end). It answers `200` with the received length once the body is complete.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How one request body ended at the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyEnd {
    Complete(usize),
    /// Bytes received before the body broke off.
    Aborted(usize),
}

pub struct BodyProbe {
    pub addr: SocketAddr,
    ends: Arc<Mutex<Vec<(String, BodyEnd)>>>,
    count: watch::Receiver<usize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl BodyProbe {
    pub async fn start() -> BodyProbe {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ends = Arc::new(Mutex::new(Vec::new()));
        let (count_tx, count) = watch::channel(0usize);
        let count_tx = Arc::new(count_tx);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = ends.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    _ = &mut stopped => return,
                };
                let (ends, count_tx) = (shared.clone(), count_tx.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (ends, count_tx) = (ends.clone(), count_tx.clone());
                        async move {
                            let path = req.uri().path().to_owned();
                            let mut body = req.into_body();
                            let mut n = 0;
                            let end = loop {
                                match body.frame().await {
                                    None => break BodyEnd::Complete(n),
                                    Some(Ok(f)) => n += f.data_ref().map_or(0, Bytes::len),
                                    Some(Err(_)) => break BodyEnd::Aborted(n),
                                }
                            };
                            ends.lock().unwrap().push((path, end));
                            count_tx.send_modify(|c| *c += 1);
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{{\"received\":{n}}}")))))
                        }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        BodyProbe {
            addr,
            ends,
            count,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits (bounded: 10 s) until `n` request bodies have ended, and
    /// returns every ending so far: (path, how).
    pub async fn ended(&self, n: usize) -> Vec<(String, BodyEnd)> {
        let mut rx = self.count.clone();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("the upstream saw fewer than {n} request bodies end within 10s"))
            .unwrap();
        self.ends.lock().unwrap().clone()
    }

    /// Every body ending so far, without waiting.
    pub fn ends(&self) -> Vec<(String, BodyEnd)> {
        self.ends.lock().unwrap().clone()
    }
}
