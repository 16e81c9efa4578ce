//! Settling the operations whose reply never came.
//!
//! A claim or a finish that timed out (or whose connection broke) may still
//! be applied by Redis: it was slow, not gone, or a client-side retry sends
//! it again. Left alone, a timed-out claim sits in flight with no owner and
//! turns `lost` although nothing was forwarded (its caller answered 503),
//! and a timed-out finish leaves a forwarded key in flight although its
//! response is known. So each is handed to the settler, which repeats it
//! until Redis answers, however long Redis is away:
//!
//! - a claim is cancelled ([`super::scripts`]' cancel script): the key is
//!   freed if the claim landed, and a late repeat of it is refused;
//! - a finish is repeated; the token check makes a repeat harmless.
//!
//! One task per store settles everything, a bounded number at once, and
//! while Redis does not answer it waits for a `PING` to succeed (backing off
//! up to a second) instead of queueing more work on a stalled connection.
//! Nothing is dropped: the queue holds a few hundred bytes per pending
//! operation (plus the response of a pending finish) until Redis is back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use super::conn::Conn;
use super::scripts::{self, Finishing, Keys};
use crate::store::now_ms;
use crate::store::record::Token;

/// Settlements in progress at once, so a backlog does not flood Redis.
const PARALLEL: usize = 64;

const FIRST_PAUSE: Duration = Duration::from_millis(20);
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Logged again each time the backlog grows past another multiple of this.
const BACKLOG_WARNING: usize = 1000;

pub(super) enum Op {
    /// A claim whose reply never came: its caller forwarded nothing.
    Cancel,
    /// A finish whose reply never came.
    Finish(Finishing),
}

struct Pending {
    keys: Keys,
    token: Token,
    op: Op,
}

/// The handle; the task ends when the store is dropped.
pub(super) struct Settler {
    tx: mpsc::UnboundedSender<Pending>,
    count: Arc<Count>,
}

#[derive(Default)]
struct Count {
    pending: AtomicUsize,
    idle: Notify,
}

impl Settler {
    pub fn start(conn: Conn, op_timeout: Duration) -> Settler {
        let (tx, rx) = mpsc::unbounded_channel();
        let count = Arc::new(Count::default());
        tokio::spawn(run(conn, op_timeout, rx, count.clone()));
        Settler { tx, count }
    }

    pub fn add(&self, keys: Keys, token: Token, op: Op) {
        let n = self.count.pending.fetch_add(1, Ordering::AcqRel) + 1;
        if n.is_multiple_of(BACKLOG_WARNING) {
            tracing::warn!(
                pending = n,
                "store operations waiting for Redis to answer; they are kept until it does"
            );
        }
        if self.tx.send(Pending { keys, token, op }).is_err() {
            self.count.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Waits up to `limit` until nothing is pending; false if something is.
    pub async fn settled(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.count.idle.notified();
                if self.count.pending.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

async fn run(conn: Conn, op_timeout: Duration, mut rx: mpsc::UnboundedReceiver<Pending>, count: Arc<Count>) {
    let mut queue: Vec<Pending> = Vec::new();
    let mut pause = FIRST_PAUSE;
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(p) => queue.push(p),
                None => return,
            }
        }
        while let Ok(p) = rx.try_recv() {
            queue.push(p);
        }
        let tried = queue.len();
        queue = attempt(&conn, op_timeout, std::mem::take(&mut queue)).await;
        let settled = tried - queue.len();
        if settled > 0 {
            tracing::info!(
                settled,
                left = queue.len(),
                "settled store operations whose reply had not come"
            );
            if count.pending.fetch_sub(settled, Ordering::AcqRel) == settled {
                count.idle.notify_waiters();
            }
        }
        if queue.is_empty() {
            pause = FIRST_PAUSE;
            continue;
        }
        // Redis did not answer: wait until it does before trying them all again.
        loop {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
            let ping = tokio::time::timeout(op_timeout, conn.query::<redis::Value>(&redis::cmd("PING"))).await;
            if matches!(ping, Ok(Ok(_))) {
                break;
            }
        }
    }
}

/// Tries each once, until Redis fails to answer one; returns those not
/// settled (failed or not tried).
async fn attempt(conn: &Conn, op_timeout: Duration, batch: Vec<Pending>) -> Vec<Pending> {
    let mut failed = Vec::new();
    let mut running = JoinSet::new();
    let mut todo = batch.into_iter();
    loop {
        while running.len() < PARALLEL && failed.is_empty() {
            let Some(p) = todo.next() else { break };
            let conn = conn.clone();
            running.spawn(async move {
                let answered = settle(&conn, op_timeout, &p).await;
                (p, answered)
            });
        }
        match running.join_next().await {
            None => {
                failed.extend(todo);
                return failed;
            }
            Some(Ok((p, false))) => failed.push(p),
            Some(Ok((_, true))) | Some(Err(_)) => {}
        }
    }
}

/// One attempt; true once Redis answered (whatever it answered: a token
/// that no longer owns the key has nothing left to settle).
async fn settle(conn: &Conn, op_timeout: Duration, p: &Pending) -> bool {
    let inv = match &p.op {
        Op::Cancel => scripts::cancel(&p.keys, p.token),
        Op::Finish(f) => scripts::finish(&p.keys, p.token, f, now_ms()).0,
    };
    match tokio::time::timeout(op_timeout, conn.script::<i64>(&inv)).await {
        Ok(Ok(n)) => {
            if let Op::Finish(f) = &p.op {
                tracing::debug!(finish = f.kind(), applied = n == 1, "settled a finish");
            }
            true
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "settling a store operation failed; retrying");
            false
        }
        Err(_) => false,
    }
}
