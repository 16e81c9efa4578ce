//! The main listener: accept loop, optional TLS, HTTP/1.1 + HTTP/2 through
//! hyper-util's `auto` builder, and a bounded graceful drain.
//!
//! Slow or idle clients cannot pin the proxy: request heads must arrive within
//! `header_read_timeout`, TLS handshakes likewise, and at most
//! `max_connections` connections are served at once (further ones wait in the
//! kernel's backlog). hyper's own header timer only runs once HTTP/1 has been
//! recognised, and `auto` waits for the client's first bytes (to tell HTTP/1
//! from an HTTP/2 preface) without any limit, so a connection that has not
//! delivered its first complete request head within `header_read_timeout` is
//! closed here.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::proxy::ConnInfo;
use crate::service::Proxy;

/// Serves `listener` until `shutdown` resolves, then stops accepting and
/// waits up to `grace` for open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    proxy: Proxy,
    header_read_timeout: Duration,
    max_connections: usize,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(1024);
    let acceptor = tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(max_connections));
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore is never closed"),
            () = &mut shutdown => break,
        };
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
        let _ = tcp.set_nodelay(true);
        let conn = ConnInfo {
            peer,
            tls: acceptor.is_some(),
        };
        let proxy = proxy.clone();
        let first_request = Arc::new(Notify::new());
        let arrived = first_request.clone();
        let service = service_fn(move |req| {
            arrived.notify_one();
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, conn).await) }
        });
        let builder = builder.clone();
        let span = tracing::debug_span!("conn", %peer);
        match &acceptor {
            None => {
                let fut = graceful.watch(builder.serve_connection(TokioIo::new(tcp), service).into_owned());
                let fut = first_request_within(fut, first_request, header_read_timeout);
                tokio::spawn(
                    async move {
                        if let Err(e) = fut.await {
                            tracing::debug!(error = %e, "connection ended with error");
                        }
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Some(acceptor) => {
                let handshake = tokio::time::timeout(header_read_timeout, acceptor.accept(tcp));
                let watcher = graceful.watcher();
                tokio::spawn(
                    async move {
                        let stream = match handshake.await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => return tracing::debug!("TLS handshake timed out"),
                        };
                        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                        let conn = first_request_within(watcher.watch(conn), first_request, header_read_timeout);
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "connection ended with error");
                        }
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!("shutdown grace elapsed with connections still open"),
    }
}

/// Drives `conn`, closing it (by dropping it) when no request has reached the
/// service within `limit` of its start. After the first request, hyper's own
/// timers take over.
async fn first_request_within<E>(
    conn: impl Future<Output = Result<(), E>>,
    first_request: Arc<Notify>,
    limit: Duration,
) -> Result<(), E> {
    tokio::pin!(conn);
    tokio::select! {
        r = &mut conn => return r,
        arrived = tokio::time::timeout(limit, first_request.notified()) => {
            if arrived.is_err() {
                tracing::debug!("no complete request head within header_read_timeout; closing");
                return Ok(());
            }
        }
    }
    conn.await
}
