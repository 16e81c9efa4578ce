//! The main listener: accept loop, optional TLS, HTTP/1.1 + HTTP/2 through
//! hyper-util's `auto` builder, and a bounded graceful drain.
//!
//! Slow or idle clients cannot pin the proxy: request heads must arrive within
//! `header_read_timeout`, TLS handshakes likewise, a request body may not
//! stall for longer than `body_read_timeout`, a connection with no request in
//! progress is closed after `idle_timeout` ([`conn`] keeps each connection's
//! clock), and at most `max_connections` connections are served at once
//! (further ones wait in the kernel's backlog).

pub mod conn;
pub mod worker;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use self::conn::{Limits, Phase, Tracked, Watched};
use crate::config::ServerConfig;
use crate::proxy::ConnInfo;
use crate::service::Proxy;

/// One worker's accept loop: serves `listener` until `shutdown` resolves,
/// then stops accepting and waits up to `server.shutdown_grace` for open
/// connections to finish their requests. `limit` is shared by all workers.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    proxy: Proxy,
    server: &ServerConfig,
    limit: Arc<Semaphore>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Head and idle limits are kept by `conn`: hyper's own header timer
    // would also cut idle keep-alive connections.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(None);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(1024);
    let acceptor = tls.map(TlsAcceptor::from);
    let limits = Limits {
        header_read: server.header_read_timeout,
        idle: server.idle_timeout,
    };
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);

    loop {
        // Accept, then wait for a slot: with one socket per worker, a worker
        // holding a free slot while the next connection sits in another
        // worker's queue would stall it. Each worker holds at most one
        // accepted connection while waiting; the rest wait in the backlog.
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let info = ConnInfo {
            peer,
            tls: acceptor.is_some(),
            body_read_timeout: server.body_read_timeout,
        };
        let phase = Phase::new();
        let service = {
            let (proxy, phase) = (proxy.clone(), phase.clone());
            service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let guard = phase.request_started(req.version());
                let proxy = proxy.clone();
                async move {
                    let res = proxy.handle(req, info).await;
                    Ok::<_, Infallible>(res.map(|body| Tracked::new(body, guard)))
                }
            })
        };
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let stopped = stop.clone().cancelled_owned();
        let handshake_limit = server.header_read_timeout;
        connections.spawn(
            async move {
                let ended = match acceptor {
                    None => {
                        let io = TokioIo::new(Watched::new(tcp, phase.clone()));
                        let conn = builder.serve_connection(io, service);
                        conn::drive(conn, phase, limits, stopped).await
                    }
                    Some(acceptor) => {
                        let stream = match tokio::time::timeout(handshake_limit, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => return tracing::debug!("TLS handshake timed out"),
                        };
                        let io = TokioIo::new(Watched::new(stream, phase.clone()));
                        let conn = builder.serve_connection(io, service);
                        conn::drive(conn, phase, limits, stopped).await
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with error");
                }
                drop(permit);
            }
            .instrument(tracing::debug_span!("conn", %peer)),
        );
    }
    drop(listener);
    stop.cancel();
    connections.close();
    tokio::select! {
        () = connections.wait() => tracing::debug!("all connections closed"),
        () = tokio::time::sleep(server.shutdown_grace) => tracing::warn!("shutdown grace elapsed with connections still open"),
    }
}
