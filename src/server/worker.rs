//! Thread-per-core serving, nginx's worker model.
//!
//! `server.workers` threads each run a single-threaded tokio runtime with its
//! own `SO_REUSEPORT` listening socket (the kernel spreads new connections
//! over them) and its own upstream connection pool. A connection, its
//! requests, their upstream exchanges and the detached leader tasks they
//! start all stay on the thread that accepted it: no hand-off between
//! threads, no shared pool lock, no cross-core wake-up on the pass-through
//! path. What must be shared (in-flight keys, the store, the rules, the
//! connection limit) is `Send + Sync` and touched only where the semantics
//! need it; a duplicate held on another worker is woken across threads.
//!
//! The admin listener, signals, the store's background work and the final
//! flush run on the control runtime of the main thread.

use std::cell::Cell;
use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::ServerConfig;
use crate::service::Proxy;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The worker this thread is, if it is one: per-worker resources (the
/// upstream pool, metric shards) are picked with it.
pub fn index() -> Option<usize> {
    let i = INDEX.get();
    (i != usize::MAX).then_some(i)
}

/// The running workers.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    drained: Vec<oneshot::Receiver<()>>,
    /// Cancelled: stop accepting and drain connections.
    accepting: CancellationToken,
    /// Cancelled: the runtimes may stop (their leader tasks are done).
    release: CancellationToken,
}

impl Workers {
    /// Starts one worker per listener. Everything that can fail (runtimes,
    /// registering the sockets) fails here, before any thread runs.
    pub fn start(
        listeners: Vec<std::net::TcpListener>,
        tls: Option<Arc<rustls::ServerConfig>>,
        proxy: &Proxy,
        server: &ServerConfig,
    ) -> io::Result<Workers> {
        let accepting = CancellationToken::new();
        let release = CancellationToken::new();
        // One limit for the whole process, not per worker.
        let limit = Arc::new(Semaphore::new(server.max_connections));
        let mut prepared = Vec::new();
        for listener in listeners {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let listener = {
                let _in = runtime.enter();
                TcpListener::from_std(listener)?
            };
            prepared.push((runtime, listener));
        }
        let mut threads = Vec::new();
        let mut drained = Vec::new();
        let (ready, started) = std::sync::mpsc::channel();
        for (i, (runtime, listener)) in prepared.into_iter().enumerate() {
            let (done, done_rx) = oneshot::channel();
            drained.push(done_rx);
            let (tls, proxy, server) = (tls.clone(), proxy.for_worker(), server.clone());
            let (limit, accepting, release) = (limit.clone(), accepting.clone(), release.clone());
            let ready = ready.clone();
            let thread = std::thread::Builder::new()
                .name(format!("idemproxy-w{i}"))
                .spawn(move || {
                    INDEX.set(i);
                    let _ = ready.send(());
                    runtime.block_on(
                        async move {
                            super::serve(listener, tls, proxy, &server, limit, accepting.cancelled()).await;
                            let _ = done.send(());
                            // Keep running this worker's leader tasks until
                            // the engine has drained them.
                            release.cancelled().await;
                        }
                        .instrument(tracing::debug_span!("worker", i)),
                    );
                    runtime.shutdown_timeout(Duration::from_millis(100));
                })?;
            threads.push(thread);
        }
        // Ready means running: every worker thread is up before this returns.
        for _ in 0..threads.len() {
            let _ = started.recv();
        }
        Ok(Workers {
            threads,
            drained,
            accepting,
            release,
        })
    }

    /// Stops accepting and waits until every worker has drained its
    /// connections (each within `server.shutdown_grace`).
    pub async fn drain(&mut self) {
        self.accepting.cancel();
        for done in self.drained.drain(..) {
            // An error means the worker is gone: nothing left to wait for.
            let _ = done.await;
        }
    }

    /// Lets the worker runtimes end and joins their threads.
    pub async fn stop(self) {
        self.release.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("a worker thread panicked");
                }
            }
        })
        .await;
    }
}
