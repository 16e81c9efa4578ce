//! Group commit for the embedded store.
//!
//! With `sync = "always"` every claim and every completion must be on disk
//! before the request moves on. One fsync per request would cap throughput at
//! the disk's flush rate, so requests take a ticket and wait; a single flusher
//! task flushes once for every ticket taken before it started, and wakes them
//! all. Under load, one flush serves many requests.
//!
//! Correctness rests on ordering: a request writes first, then takes its
//! ticket, so a flush that started after ticket `n` was taken covers every
//! write made before ticket `n`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

use super::StoreError;

/// The last flushed ticket, and the last ticket whose flush failed.
#[derive(Debug, Clone, Copy, Default)]
struct Flushed {
    upto: u64,
    failed_upto: u64,
}

pub struct GroupCommit {
    taken: AtomicU64,
    wake: Notify,
    flushed: watch::Sender<Flushed>,
}

impl GroupCommit {
    /// Starts the flusher task; `flush` runs on the blocking pool.
    pub fn start<F>(flush: F) -> Arc<GroupCommit>
    where
        F: Fn() -> Result<(), String> + Send + Sync + Clone + 'static,
    {
        let gc = Arc::new(GroupCommit {
            taken: AtomicU64::new(0),
            wake: Notify::new(),
            flushed: watch::Sender::new(Flushed::default()),
        });
        // The flusher lives as long as the process: the store is opened once.
        let this = gc.clone();
        tokio::spawn(async move {
            let gc = this;
            loop {
                let target = gc.taken.load(Ordering::Acquire);
                if target == gc.flushed.borrow().upto {
                    gc.wake.notified().await;
                    continue;
                }
                let f = flush.clone();
                let result = tokio::task::spawn_blocking(f)
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                if let Err(e) = &result {
                    tracing::error!(error = %e, "store flush failed");
                }
                gc.flushed.send_modify(|s| {
                    s.upto = target;
                    if result.is_err() {
                        s.failed_upto = target;
                    }
                });
            }
        });
        gc
    }

    /// Waits until everything written before this call is durable.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let ticket = self.taken.fetch_add(1, Ordering::AcqRel) + 1;
        let mut rx = self.flushed.subscribe();
        self.wake.notify_one();
        let state = *rx
            .wait_for(|s| s.upto >= ticket)
            .await
            .map_err(|_| StoreError::Io("store flusher stopped".into()))?;
        if state.failed_upto >= ticket {
            return Err(StoreError::Io("flush to disk failed".into()));
        }
        Ok(())
    }
}
