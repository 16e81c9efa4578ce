//! A flaky network between a client and a server: a TCP relay on
//! `127.0.0.1:0` that reads HTTP/1.1 responses as whole messages (head,
//! then a `Content-Length` or chunked body) and can lose one of them.
//!
//! Losing a response is the fault that makes client retries dangerous: the
//! server executed the request and answered, but the client never hears of
//! it. The relay swallows the response and everything after it on that
//! connection while keeping the client's side open, so the client sees
//! neither an answer nor a closed connection: it times out, as it would
//! behind a dead NAT entry or a partitioned load balancer. Later
//! connections relay normally.
//!
//! Not handled: responses to HEAD (their `Content-Length` announces a body
//! that never comes) and HTTP/2.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The relay, served until dropped.
pub struct Flaky {
    pub addr: SocketAddr,
    state: Arc<State>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[derive(Default)]
struct State {
    /// Responses still to lose, starting with the next one.
    to_drop: AtomicUsize,
    /// Responses delivered to the client.
    delivered: AtomicUsize,
    /// Status lines of the responses lost so far.
    dropped: watch::Sender<Vec<String>>,
}

impl Flaky {
    /// A relay to `target` that delivers everything until told otherwise.
    pub async fn start(target: SocketAddr) -> Flaky {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    r = listener.accept() => match r { Ok((c, _)) => c, Err(_) => continue },
                    _ = &mut stopped => return,
                };
                tokio::spawn(relay(client, target, st.clone()));
            }
        });
        Flaky {
            addr,
            state,
            _stop: stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Loses the next `n` responses (each after the server sent it whole).
    pub fn drop_responses(&self, n: usize) {
        self.state.to_drop.store(n, Ordering::SeqCst);
    }

    /// Status lines of the responses lost so far.
    pub fn dropped(&self) -> Vec<String> {
        self.state.dropped.borrow().clone()
    }

    /// Responses the client received through the relay.
    pub fn delivered(&self) -> usize {
        self.state.delivered.load(Ordering::SeqCst)
    }

    /// Waits until `n` responses have been lost (bounded: 10 s).
    pub async fn wait_dropped(&self, n: usize) {
        let mut rx = self.state.dropped.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|d| d.len() >= n))
            .await
            .expect("the relay did not lose the expected responses within 10s")
            .unwrap();
    }
}

async fn relay(client: TcpStream, target: SocketAddr, state: Arc<State>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (server_read, mut server_write) = server.into_split();
    let requests = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    });
    let mut server_read = BufReader::new(server_read);
    loop {
        let Ok(Some(message)) = read_response(&mut server_read).await else {
            // The server closed (or broke) the connection: so do we.
            let _ = client_write.shutdown().await;
            break;
        };
        let lose = state
            .to_drop
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lose {
            state.dropped.send_modify(|d| d.push(message.status_line));
            // Swallow the rest; the client's side stays open until it gives up.
            let _ = tokio::io::copy(&mut server_read, &mut tokio::io::sink()).await;
            break;
        }
        if client_write.write_all(&message.bytes).await.is_err() {
            break;
        }
        if !message.interim {
            state.delivered.fetch_add(1, Ordering::SeqCst);
        }
    }
    let _ = requests.await;
}

/// One response as it came on the wire.
struct Message {
    status_line: String,
    bytes: Vec<u8>,
    /// A 1xx: the real response follows.
    interim: bool,
}

/// Reads one whole response; `None` at a clean end of the connection.
async fn read_response<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> std::io::Result<Option<Message>> {
    let mut bytes = Vec::new();
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line).await? == 0 {
        return Ok(None);
    }
    let status_line = String::from_utf8_lossy(&line).trim_end().to_owned();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not a status line: {status_line:?}")))?;
    bytes.extend_from_slice(&line);
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        bytes.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if text.is_empty() {
            break;
        }
        if let Some((name, value)) = text.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "content-length" {
                length = value.parse::<usize>().ok();
            } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    let interim = (100..200).contains(&status);
    if interim || status == 204 || status == 304 {
        // No body.
    } else if chunked {
        read_chunked(r, &mut bytes).await?;
    } else if let Some(n) = length {
        let start = bytes.len();
        bytes.resize(start + n, 0);
        r.read_exact(&mut bytes[start..]).await?;
    } else {
        r.read_to_end(&mut bytes).await?;
    }
    Ok(Some(Message {
        status_line,
        bytes,
        interim,
    }))
}

/// Appends a chunked body, trailers included, to `bytes`.
async fn read_chunked<R: AsyncRead + Unpin>(r: &mut BufReader<R>, bytes: &mut Vec<u8>) -> std::io::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        r.read_until(b'\n', &mut line).await?;
        bytes.extend_from_slice(&line);
        let size = String::from_utf8_lossy(&line);
        let size = size.trim_end().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size.trim(), 16).map_err(std::io::Error::other)?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                bytes.extend_from_slice(&line);
                if line == b"\r\n" || line == b"\n" {
                    return Ok(());
                }
            }
        }
        let start = bytes.len();
        bytes.resize(start + size + 2, 0);
        r.read_exact(&mut bytes[start..]).await?;
    }
}
