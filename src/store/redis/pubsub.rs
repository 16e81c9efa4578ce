//! Change notifications: one RESP3 subscriber connection per process,
//! fanned out to local waiters.
//!
//! Every state change of a record (finish, delete, lost) is `PUBLISH`ed on
//! the record's channel. The in-process flight already makes one request
//! per key the only local waiter, so there is one subscription per key per
//! replica, made when the first waiter joins and dropped when the last one
//! leaves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::watch;

use super::conn::Conn;

/// One RESP3 subscriber connection per process, fanned out to local waiters.
pub(super) struct Notifier {
    conn: OnceLock<Conn>,
    channels: Arc<Mutex<HashMap<String, Arc<Channel>>>>,
    op_timeout: Duration,
}

struct Channel {
    /// Local waiters; changed only under the `channels` lock.
    waiters: AtomicUsize,
    /// Whether Redis confirmed our subscription. Every SUBSCRIBE and
    /// UNSUBSCRIBE of this channel happens under this lock, in order.
    subscribed: tokio::sync::Mutex<bool>,
    changed: watch::Sender<u64>,
}

/// A push from Redis: wake the channel's waiters; a lost connection wakes
/// everyone, since messages may have been missed while it was down.
fn on_push(channels: &Mutex<HashMap<String, Arc<Channel>>>, info: PushInfo) {
    let map = channels.lock().unwrap_or_else(|e| e.into_inner());
    match info.kind {
        PushKind::Message | PushKind::SMessage => {
            if let Some(Value::BulkString(name)) = info.data.first() {
                if let Some(c) = std::str::from_utf8(name).ok().and_then(|n| map.get(n)) {
                    c.changed.send_modify(|v| *v += 1);
                }
            }
        }
        PushKind::Disconnection => map.values().for_each(|c| c.changed.send_modify(|v| *v += 1)),
        _ => {}
    }
}

/// One local waiter on a channel; leaving unsubscribes the last one.
pub(super) struct Waiter {
    notifier: Arc<Notifier>,
    name: String,
    channel: Arc<Channel>,
    pub rx: watch::Receiver<u64>,
    pub subscribed: bool,
}

impl Notifier {
    pub fn new(op_timeout: Duration) -> Arc<Notifier> {
        Arc::new(Notifier {
            conn: OnceLock::new(),
            channels: Arc::new(Mutex::new(HashMap::new())),
            op_timeout,
        })
    }

    /// The push handler for the subscriber connection.
    pub fn on_push(&self) -> impl Fn(PushInfo) -> Result<(), ()> + Send + Sync + 'static {
        let channels = self.channels.clone();
        move |info| {
            on_push(&channels, info);
            Ok(())
        }
    }

    /// The subscriber connection, once it is built (at open).
    pub fn set_conn(&self, conn: Conn) {
        let _ = self.conn.set(conn);
    }

    fn conn(&self) -> &Conn {
        self.conn.get().expect("set at open")
    }

    pub async fn join(this: &Arc<Notifier>, name: String) -> Waiter {
        let channel = {
            let mut map = this.channels.lock().unwrap_or_else(|e| e.into_inner());
            let c = map
                .entry(name.clone())
                .or_insert_with(|| {
                    Arc::new(Channel {
                        waiters: AtomicUsize::new(0),
                        subscribed: tokio::sync::Mutex::new(false),
                        changed: watch::Sender::new(0),
                    })
                })
                .clone();
            c.waiters.fetch_add(1, Ordering::AcqRel);
            c
        };
        // Subscribed to the watch before Redis confirms: nothing published
        // after the confirmation can slip by.
        let rx = channel.changed.subscribe();
        let mut waiter = Waiter {
            notifier: this.clone(),
            name,
            channel,
            rx,
            subscribed: false,
        };
        let mut subscribed = waiter.channel.subscribed.lock().await;
        if !*subscribed {
            match tokio::time::timeout(this.op_timeout, this.conn().subscribe(&waiter.name)).await {
                Ok(Ok(())) => *subscribed = true,
                Ok(Err(e)) => tracing::warn!(error = %e, "redis SUBSCRIBE failed; polling instead"),
                Err(_) => tracing::warn!("redis SUBSCRIBE timed out; polling instead"),
            }
        }
        waiter.subscribed = *subscribed;
        drop(subscribed);
        waiter
    }

    async fn leave(self: Arc<Self>, name: String, channel: Arc<Channel>) {
        let mut subscribed = channel.subscribed.lock().await;
        if channel.waiters.load(Ordering::Acquire) > 0 {
            return;
        }
        if *subscribed {
            // Not knowing whether it went through is fine: a stray
            // subscription only delivers messages nobody listens to.
            let _ = tokio::time::timeout(self.op_timeout, self.conn().unsubscribe(&name)).await;
            *subscribed = false;
        }
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if channel.waiters.load(Ordering::Acquire) == 0 && map.get(&name).is_some_and(|c| Arc::ptr_eq(c, &channel)) {
            map.remove(&name);
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let last = {
            let _map = self.notifier.channels.lock().unwrap_or_else(|e| e.into_inner());
            self.channel.waiters.fetch_sub(1, Ordering::AcqRel) == 1
        };
        if last {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(self.notifier.clone().leave(self.name.clone(), self.channel.clone()));
            }
        }
    }
}
