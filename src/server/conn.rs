//! One client connection and its clock.
//!
//! hyper times out neither an idle HTTP/2 connection nor, in the way a proxy
//! needs, an idle HTTP/1.1 one: its `header_read_timeout` starts as soon as a
//! keep-alive connection waits for its next request, so it would close every
//! idle connection after the head limit, and it does not exist for HTTP/2.
//! The connection's phases are therefore tracked here, like nginx's
//! `client_header_timeout` and `keepalive_timeout`:
//!
//! - **head**: from accept, and on HTTP/1.1 from the first byte of a later
//!   request, the head must be complete within `header_read_timeout`;
//!   otherwise the connection is dropped;
//! - **busy**: requests are in progress (their bodies have their own limit,
//!   `body_read_timeout`, see [`crate::proxy::timed_body`]);
//! - **idle**: no request in progress; after `idle_timeout` the connection
//!   is shut down gracefully (HTTP/2: GOAWAY, then close).
//!
//! The phase lives in a few atomics written by the reads ([`Watched`]), by
//! the service when a request starts and by the response body when it is
//! dropped ([`Tracked`]). One timer per connection, re-armed only when it
//! fires or when a new head starts, enforces the limits.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::body::{BoxError, ResponseBody};

/// The per-connection limits of `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read: Duration,
    pub idle: Duration,
}

/// Where one connection is in its life; shared by its reads, its requests
/// (HTTP/2 streams run as tasks of their own) and its watchdog.
#[derive(Debug)]
pub struct Phase {
    start: Instant,
    /// Requests whose response has not been sent (or dropped) yet.
    active: AtomicUsize,
    /// Milliseconds after `start` + 1 at which the pending head began; 0 when
    /// no head is pending.
    head_since: AtomicU64,
    /// Milliseconds after `start` at which the last request ended.
    idle_since: AtomicU64,
    /// HTTP/2: bytes on an idle connection are pings and window updates,
    /// not the start of a head.
    multiplexed: AtomicBool,
}

impl Phase {
    /// A fresh connection: its first head is due `header_read` after now.
    pub fn new() -> Arc<Phase> {
        Arc::new(Phase {
            start: Instant::now(),
            active: AtomicUsize::new(0),
            head_since: AtomicU64::new(1),
            idle_since: AtomicU64::new(0),
            multiplexed: AtomicBool::new(false),
        })
    }

    /// Rounded up, so that a deadline computed from it is never early.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
    }

    /// A request reached the service. The guard ends it when dropped (after
    /// its response body, or with the service future if that is dropped).
    pub fn request_started(self: &Arc<Self>, version: http::Version) -> RequestGuard {
        if version == http::Version::HTTP_2 {
            self.multiplexed.store(true, Ordering::Relaxed);
        }
        self.active.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    /// Bytes arrived: on an idle HTTP/1.1 connection they start a head.
    fn bytes_read(&self) {
        if self.active.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
            && !self.multiplexed.load(Ordering::Relaxed)
        {
            self.head_since.store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// When the connection must be closed as things stand, and why; `None`
    /// while requests are in progress.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Why)> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let at = |ms: u64, limit: Duration| self.start + Duration::from_millis(ms) + limit;
        match self.head_since.load(Ordering::Relaxed) {
            0 => Some((at(self.idle_since.load(Ordering::Relaxed), limits.idle), Why::Idle)),
            since => Some((at(since - 1, limits.header_read), Why::Head)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Head,
    Idle,
}

/// One request in progress on a connection.
#[derive(Debug)]
pub struct RequestGuard(Arc<Phase>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let phase = &self.0;
        // Written before the count drops, so the watchdog never sees an idle
        // connection with a stale start of idleness.
        phase.idle_since.store(phase.now_ms(), Ordering::Relaxed);
        phase.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client's stream, reporting reads to the connection's [`Phase`].
pub struct Watched<T> {
    io: T,
    phase: Arc<Phase>,
}

impl<T> Watched<T> {
    pub fn new(io: T, phase: Arc<Phase>) -> Self {
        Watched { io, phase }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.phase.bytes_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends its request (the guard) when dropped.
    pub struct Tracked {
        #[pin]
        body: ResponseBody,
        guard: RequestGuard,
    }
}

impl Tracked {
    pub fn new(body: ResponseBody, guard: RequestGuard) -> Self {
        Tracked { body, guard }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A served connection that can be asked to finish gracefully.
pub trait Graceful: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, E, B> Graceful for hyper_util::server::conn::auto::Connection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Future: 'static,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    E: hyper_util::server::conn::auto::HttpServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper_util::server::conn::auto::Connection::graceful_shutdown(self)
    }
}

/// Drives `conn` to its end under the connection's limits. When `stop`
/// fires (shutdown), the connection finishes its requests and closes.
pub async fn drive<C, E>(
    conn: C,
    phase: Arc<Phase>,
    limits: Limits,
    stop: WaitForCancellationFutureOwned,
) -> Result<(), E>
where
    C: Graceful<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    let mut stop = std::pin::pin!(stop);
    let first = phase.start + limits.header_read;
    let mut timer = std::pin::pin!(tokio::time::sleep_until(first));
    let mut armed_head = 1;
    let recheck = limits.idle.min(limits.header_read);
    let mut closing = false;
    // Set once the connection was asked to close because it was idle: an
    // HTTP/2 client must still answer the GOAWAY's PING; one that does not
    // is dropped after `header_read`.
    let mut idle_close = false;
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if idle_close && timer.as_mut().poll(cx).is_ready() {
            tracing::debug!("the client did not finish closing an idle connection; dropping it");
            return Poll::Ready(Ok(()));
        }
        if closing {
            return Poll::Pending;
        }
        if stop.as_mut().poll(cx).is_ready() {
            conn.as_mut().graceful_shutdown();
            closing = true;
            continue;
        }
        // A read during that poll may have started a head on an idle
        // connection: its deadline is likely earlier than the idle one.
        let head = phase.head_since.load(Ordering::Relaxed);
        if head != armed_head {
            armed_head = head;
            // Busy: look again within `recheck` (the request may end soon).
            // The timer is moved only when that brings it closer, so a
            // busy connection does not touch the timer wheel per request.
            let at = phase.deadline(&limits).map_or(Instant::now() + recheck, |(at, _)| at);
            if at < timer.deadline() || phase.head_since.load(Ordering::Relaxed) != 0 {
                timer.as_mut().reset(at);
            }
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let now = Instant::now();
        match phase.deadline(&limits) {
            // Busy: look again later; the phase says when it is idle.
            None => timer.as_mut().reset(now + recheck),
            Some((at, _)) if at > now => timer.as_mut().reset(at),
            Some((_, Why::Head)) => {
                tracing::debug!("no complete request head within header_read_timeout; closing");
                return Poll::Ready(Ok(()));
            }
            Some((_, Why::Idle)) => {
                tracing::debug!("idle for idle_timeout; closing");
                conn.as_mut().graceful_shutdown();
                closing = true;
                idle_close = true;
                timer.as_mut().reset(now + limits.header_read);
            }
        }
    })
    .await
}
