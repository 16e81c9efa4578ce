//! One streamed response, recorded as it arrives and read by everyone who
//! asked for it (SPEC §7).
//!
//! The leader's task appends each upstream chunk once; the leader's client and
//! every held duplicate read the same chunks through their own [`Reader`],
//! each at its own pace, so memory is one recording per key whatever the
//! number of readers. A reader that starts late gets everything recorded so
//! far at once, then the rest live.
//!
//! While the recording can still be replayed (not past `max_response_body`)
//! every chunk is kept: it becomes the stored body at the end. Past the limit
//! nothing will be stored, so chunks are dropped once they are more than a
//! window behind the newest; new readers are refused and a reader that falls
//! further behind than the window is cut off. Memory per stream therefore
//! stays below about twice `max_response_body`, however long the stream and
//! however slow a client.
//!
//! The state sits behind a std `Mutex`, held only to push or clone a chunk
//! and never across an `.await`; readers park their waker in it and the
//! writer wakes them all after each chunk.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use crate::body::BoxError;

/// How a recording ended, as its readers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The upstream finished the body.
    Complete,
    /// The upstream connection broke, timed out, or the task was dropped.
    Broken,
}

/// Why a reader's stream was cut short: the body errors, so the client sees
/// no clean end (HTTP/1.1: no final chunk; HTTP/2: a reset stream).
#[derive(Debug, thiserror::Error)]
pub enum Cut {
    #[error("the upstream stream broke before its end")]
    Broken,
    #[error("this reader fell too far behind the live stream")]
    Lagged,
}

/// A streamed response shared by all its readers.
#[derive(Debug)]
pub struct Recording {
    pub status: StatusCode,
    /// The replayable headers (no `Date`, no `Set-Cookie`).
    pub headers: HeaderMap,
    /// Unix milliseconds; drives `Age` for duplicates.
    pub started_at: u64,
    /// `max_response_body`: past it, the recording is not replayable.
    limit: u64,
    /// Bytes kept behind the newest chunk once the recording is past its limit.
    window: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    chunks: VecDeque<Bytes>,
    /// Index (since the start of the stream) of `chunks[0]`.
    first: usize,
    /// Bytes in `chunks`.
    held: u64,
    /// Bytes recorded since the start.
    total: u64,
    /// Every chunk since the start is still held (not past the limit).
    replayable: bool,
    end: Option<End>,
    wakers: Vec<Waker>,
    /// Counts wake-ups, so a reader parks its waker once per wake-up.
    wakes: u64,
}

impl Recording {
    /// A recording that stays replayable up to `limit` bytes.
    pub fn new(status: StatusCode, headers: HeaderMap, started_at: u64, limit: u64) -> Arc<Recording> {
        Arc::new(Recording {
            status,
            headers,
            started_at,
            limit,
            window: limit.max(64 * 1024),
            state: Mutex::new(State {
                replayable: true,
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the state consistent (every
        // update is a single push or pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reader from the first byte; `None` once the start has been dropped
    /// (past `max_response_body`): such a stream cannot be given whole.
    pub fn reader(self: &Arc<Self>) -> Option<Reader> {
        self.lock().replayable.then(|| Reader {
            recording: self.clone(),
            next: 0,
            parked: None,
        })
    }

    /// Appends a chunk and wakes the readers. Returns false once the
    /// recording is past its limit: it is no longer replayable.
    pub fn push(&self, chunk: Bytes) -> bool {
        if chunk.is_empty() {
            return true;
        }
        let wakers = {
            let mut s = self.lock();
            s.total += chunk.len() as u64;
            s.held += chunk.len() as u64;
            s.chunks.push_back(chunk);
            if s.total > self.limit {
                s.replayable = false;
            }
            if !s.replayable {
                // Keep at least the newest chunk, so no live reader is cut
                // merely because one chunk is larger than the window.
                while s.held > self.window && s.chunks.len() > 1 {
                    let old = s.chunks.pop_front().expect("more than one chunk");
                    s.held -= old.len() as u64;
                    s.first += 1;
                }
            }
            let replayable = s.replayable;
            (s.take_wakers(), replayable)
        };
        wakers.0.into_iter().for_each(Waker::wake);
        wakers.1
    }

    /// Ends the recording (once; later calls are ignored) and wakes the readers.
    pub fn end(&self, how: End) {
        let wakers = {
            let mut s = self.lock();
            if s.end.is_some() {
                return;
            }
            s.end = Some(how);
            s.take_wakers()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// The whole body in one buffer, if every byte is still held.
    pub fn body(&self) -> Option<Bytes> {
        let (chunks, held) = {
            let s = self.lock();
            if !s.replayable {
                return None;
            }
            // Cloning `Bytes` only counts references: the copy below runs
            // without holding the lock the readers need.
            (s.chunks.clone(), s.held)
        };
        // Copy even one chunk: it is a slice of hyper's read buffer, and the
        // store would keep that whole buffer alive.
        let mut buf = BytesMut::with_capacity(held as usize);
        chunks.iter().for_each(|c| buf.extend_from_slice(c));
        Some(buf.freeze())
    }

    /// Bytes recorded so far.
    pub fn len(&self) -> u64 {
        self.lock().total
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl State {
    fn take_wakers(&mut self) -> Vec<Waker> {
        self.wakes += 1;
        std::mem::take(&mut self.wakers)
    }
}

/// One client's position in a recording.
#[derive(Debug)]
pub struct Reader {
    recording: Arc<Recording>,
    /// Index of the next chunk to hand out.
    next: usize,
    /// The wake-up count when this reader last parked its waker.
    parked: Option<u64>,
}

impl Reader {
    /// The next chunk, `None` at a clean end, or the cut.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        let mut s = self.recording.lock();
        if self.next < s.first {
            return Poll::Ready(Some(Err(Cut::Lagged.into())));
        }
        if let Some(chunk) = s.chunks.get(self.next - s.first) {
            self.next += 1;
            return Poll::Ready(Some(Ok(chunk.clone())));
        }
        match s.end {
            Some(End::Complete) => Poll::Ready(None),
            Some(End::Broken) => Poll::Ready(Some(Err(Cut::Broken.into()))),
            None => {
                // A body is polled by one task: park once until the next wake-up.
                if self.parked != Some(s.wakes) {
                    self.parked = Some(s.wakes);
                    s.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// True once everything is read and the recording ended cleanly.
    pub fn is_done(&self) -> bool {
        let s = self.recording.lock();
        s.end == Some(End::Complete) && self.next >= s.first + s.chunks.len()
    }
}

/// The writer's side: ends the recording as broken if dropped before
/// [`Writer::end`] (a panic or a cancelled task), so no reader waits forever.
pub struct Writer(pub Arc<Recording>);

impl Writer {
    pub fn end(self, how: End) {
        self.0.end(how);
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.end(End::Broken);
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    fn rec(limit: u64) -> Arc<Recording> {
        Recording::new(StatusCode::OK, HeaderMap::new(), 0, limit)
    }

    async fn next(r: &mut Reader) -> Option<Result<Bytes, BoxError>> {
        poll_fn(|cx| r.poll_chunk(cx)).await
    }

    #[tokio::test]
    async fn late_reader_gets_the_prefix_then_the_rest_live() {
        let rec = rec(1024);
        let mut early = rec.reader().unwrap();
        rec.push(Bytes::from_static(b"a"));
        rec.push(Bytes::from_static(b"b"));
        let mut late = rec.reader().unwrap();
        assert_eq!(next(&mut early).await.unwrap().unwrap(), "a");
        assert_eq!(next(&mut late).await.unwrap().unwrap(), "a");
        assert_eq!(next(&mut late).await.unwrap().unwrap(), "b");
        let waiting = tokio::spawn(async move { next(&mut late).await.map(Result::unwrap) });
        tokio::task::yield_now().await;
        rec.push(Bytes::from_static(b"c"));
        assert_eq!(waiting.await.unwrap().unwrap(), "c");
        rec.end(End::Complete);
        assert_eq!(next(&mut early).await.unwrap().unwrap(), "b");
        assert_eq!(next(&mut early).await.unwrap().unwrap(), "c");
        assert!(next(&mut early).await.is_none());
        assert_eq!(rec.body().unwrap(), "abc");
    }

    #[tokio::test]
    async fn broken_end_cuts_every_reader() {
        let rec = rec(1024);
        let mut r = rec.reader().unwrap();
        {
            let w = Writer(rec.clone());
            rec.push(Bytes::from_static(b"a"));
            drop(w);
        }
        assert_eq!(next(&mut r).await.unwrap().unwrap(), "a");
        assert!(next(&mut r).await.unwrap().is_err());
    }

    #[tokio::test]
    async fn past_the_limit_the_start_is_dropped_and_laggards_cut() {
        let limit = 64 * 1024;
        let rec = rec(limit);
        let mut slow = rec.reader().unwrap();
        let mut fast = rec.reader().unwrap();
        let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
        for i in 0..16 {
            let keep = rec.push(chunk.clone());
            assert_eq!(keep, i < 4, "chunk {i}");
            assert_eq!(next(&mut fast).await.unwrap().unwrap().len(), chunk.len());
        }
        assert!(rec.reader().is_none(), "no new reader past the limit");
        assert!(rec.body().is_none());
        assert!(rec.lock().held <= 64 * 1024, "memory bounded by the window");
        assert!(next(&mut slow).await.unwrap().is_err(), "the laggard is cut");
    }
}
