//! A client that speaks HTTP by hand over one TCP connection, for the tests
//! that must control every byte and see the connection close: stalled bodies,
//! partial heads, idle keep-alive connections (HTTP/1.1 and h2c).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One raw connection to the proxy.
pub struct Raw {
    pub tcp: TcpStream,
    /// Bytes read but not yet consumed.
    buf: Vec<u8>,
}

/// An HTTP/1.1 response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// The head, lowercased (header names and values), for `contains` checks.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.head.lines().find_map(|l| l.strip_prefix(&prefix).map(str::trim))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            tcp: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes into the buffer; false at EOF or on a reset.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads one HTTP/1.1 response with a `Content-Length` (bounded: 10 s).
    pub async fn response(&mut self) -> RawResponse {
        tokio::time::timeout(Duration::from_secs(10), async {
            let end = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                assert!(
                    self.fill().await,
                    "connection closed before a response head: {:?}",
                    self.buf
                );
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
            let status = head[9..12].parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while self.buf.len() < end + len {
                assert!(self.fill().await, "connection closed inside a response body");
            }
            let body = self.buf[end..end + len].to_vec();
            self.buf.drain(..end + len);
            RawResponse { status, head, body }
        })
        .await
        .expect("no response within 10s")
    }

    /// Reads until the proxy closes the connection (bounded: 10 s) and
    /// returns what came before the close.
    pub async fn until_closed(&mut self, what: &str) -> Vec<u8> {
        let closed = tokio::time::timeout(Duration::from_secs(10), async { while self.fill().await {} }).await;
        assert!(closed.is_ok(), "{what}: the proxy kept the connection open");
        std::mem::take(&mut self.buf)
    }

    /// Plays a well-behaved HTTP/2 client that sends nothing of its own
    /// (it acknowledges SETTINGS and answers PINGs, as a real client does)
    /// until the proxy closes the connection (bounded: 10 s). Returns
    /// (type, flags, stream id) of every frame received.
    pub async fn h2_frames_until_closed(&mut self, what: &str) -> Vec<(u8, u8, u32)> {
        let mut frames = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                while self.buf.len() >= 9 {
                    let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                    if self.buf.len() < 9 + len {
                        break;
                    }
                    let frame: Vec<u8> = self.buf.drain(..9 + len).collect();
                    let (kind, flags) = (frame[3], frame[4]);
                    let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
                    frames.push((kind, flags, stream));
                    let reply = match (kind, flags & 0x1) {
                        (H2_SETTINGS, 0) => Some(vec![0, 0, 0, H2_SETTINGS, 0x1, 0, 0, 0, 0]),
                        (H2_PING, 0) => {
                            let mut ack = vec![0, 0, 8, H2_PING, 0x1, 0, 0, 0, 0];
                            ack.extend_from_slice(&frame[9..]);
                            Some(ack)
                        }
                        _ => None,
                    };
                    if let Some(reply) = reply {
                        // The proxy may already have closed: that is the end.
                        let _ = self.tcp.write_all(&reply).await;
                    }
                }
                if !self.fill().await {
                    return;
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "{what}: the proxy kept the connection open; frames {frames:?}"
        );
        frames
    }
}

/// HTTP/2 frame types the tests look for.
pub const H2_HEADERS: u8 = 0x1;
pub const H2_SETTINGS: u8 = 0x4;
pub const H2_PING: u8 = 0x6;
pub const H2_GOAWAY: u8 = 0x7;

/// The client preface, an empty SETTINGS frame and `GET /path` on stream 1
/// (HPACK: `:method GET`, `:scheme http`, a literal `:path`, a literal
/// `:authority`; no Huffman coding), ending the stream.
pub fn h2c_get(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 0x04]);
    block.extend_from_slice(b"test");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    let len = block.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    // HEADERS, END_STREAM | END_HEADERS, stream 1.
    out.extend_from_slice(&[H2_HEADERS, 0x5, 0, 0, 0, 1]);
    out.extend_from_slice(&block);
    out
}
