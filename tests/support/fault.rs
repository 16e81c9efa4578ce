//! A TCP fault proxy for the network between the replicas and Redis: bytes
//! are relayed unchanged until the test asks for a fault.
//!
//! - [`FaultProxy::drop_reply_to`]: the next command whose bytes contain all
//!   the given patterns reaches Redis, which executes it; its reply is
//!   dropped and the client's connection reset (a reply lost to a broken
//!   connection, as in a failover or `CLIENT KILL`);
//! - [`FaultProxy::stall`] / [`FaultProxy::resume`]: nothing is relayed in
//!   either direction meanwhile (Redis or the network hangs); held bytes
//!   flow on resume. [`FaultProxy::stall_replies`] holds only what Redis
//!   sends: commands still run, their replies do not come;
//! - [`FaultProxy::reset_all`]: every open connection is reset, and the
//!   bytes held in it are lost.
//!
//! Client connections close with RST (`SO_LINGER` 0), like a dropped link.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The proxy, served until dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

struct State {
    target: SocketAddr,
    /// Patterns of the next command whose reply is to be dropped.
    armed: Mutex<Option<Vec<Vec<u8>>>>,
    /// Replies dropped so far.
    dropped: watch::Sender<usize>,
    /// Which directions are held.
    stalled: watch::Sender<Held>,
    /// Cancelled by `reset_all`; replaced by a fresh token afterwards.
    reset: Mutex<CancellationToken>,
}

impl FaultProxy {
    /// Relays `127.0.0.1:0` to `target` (a loopback address).
    pub async fn start(target: SocketAddr) -> FaultProxy {
        assert!(target.ip().is_loopback(), "the fault proxy only relays to loopback");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            target,
            armed: Mutex::new(None),
            dropped: watch::Sender::new(0),
            stalled: watch::Sender::new(Held::default()),
            reset: Mutex::new(CancellationToken::new()),
        });
        let stop = CancellationToken::new();
        let (st, stopped) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    r = listener.accept() => match r { Ok((c, _)) => c, Err(_) => continue },
                    () = stopped.cancelled() => return,
                };
                tokio::spawn(relay(st.clone(), client, stopped.clone()));
            }
        });
        FaultProxy { addr, state, stop }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The next command containing every pattern runs in Redis, but its
    /// reply never reaches the client: the client's connection is reset.
    pub fn drop_reply_to(&self, patterns: &[&[u8]]) {
        *self.state.armed.lock().unwrap() = Some(patterns.iter().map(|p| p.to_vec()).collect());
    }

    /// Waits (bounded: 10 s) until `n` replies have been dropped in all.
    pub async fn wait_dropped(&self, n: usize) {
        let mut rx = self.state.dropped.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|d| *d >= n))
            .await
            .expect("no command matched the armed fault within 10s")
            .unwrap();
    }

    pub fn stall(&self) {
        self.state.stalled.send_replace(Held {
            commands: true,
            replies: true,
        });
    }

    pub fn stall_replies(&self) {
        self.state.stalled.send_replace(Held {
            commands: false,
            replies: true,
        });
    }

    pub fn resume(&self) {
        self.state.stalled.send_replace(Held::default());
    }

    pub fn reset_all(&self) {
        let mut reset = self.state.reset.lock().unwrap();
        reset.cancel();
        *reset = CancellationToken::new();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn relay(st: Arc<State>, client: TcpStream, stop: CancellationToken) {
    let Ok(server) = TcpStream::connect(st.target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    #[allow(deprecated)]
    let _ = client.set_linger(Some(Duration::ZERO));
    let reset = st.reset.lock().unwrap().clone();
    let drop_next_reply = Arc::new(AtomicBool::new(false));
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();

    let up = {
        let (st, drop_next_reply) = (st.clone(), drop_next_reply.clone());
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
                {
                    let mut armed = st.armed.lock().unwrap();
                    let hit = armed.as_ref().is_some_and(|ps| ps.iter().all(|p| contains(chunk, p)));
                    if hit {
                        *armed = None;
                        drop_next_reply.store(true, Ordering::SeqCst);
                    }
                }
                held(&st, |h| h.commands).await;
                if to_server.write_all(chunk).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            held(&st, |h| h.replies).await;
            if drop_next_reply.swap(false, Ordering::SeqCst) {
                // Redis executed it; the client never hears so.
                st.dropped.send_modify(|d| *d += 1);
                return;
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever ends first (or a reset) ends the connection; dropping the
    // halves closes both sockets, the client's with RST.
    tokio::select! {
        () = up => {}
        () = down => {}
        () = reset.cancelled() => {}
        () = stop.cancelled() => {}
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Held {
    commands: bool,
    replies: bool,
}

/// Waits while this direction is held.
async fn held(st: &State, direction: fn(&Held) -> bool) {
    let mut rx = st.stalled.subscribe();
    let _ = rx.wait_for(|h| !direction(h)).await;
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}
