//! The client's request body with a limit on silence
//! (`server.body_read_timeout`).
//!
//! A client that sends a request head and part of its body, then goes quiet,
//! would otherwise hold its connection, its buffers and (for a keyed request)
//! nothing else forever. The limit is on the longest wait for the next chunk,
//! not on the whole body: a slow but steady upload is fine. The timer only
//! exists once the body actually has to wait, so a body that is already in
//! the read buffer (most small requests) costs nothing extra.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;
use crate::problem::{Code, Problem};

/// The client sent nothing for `server.body_read_timeout` inside a body.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for more than {}", humantime::format_duration(*.0))]
pub struct BodyReadTimeout(pub Duration);

impl BodyReadTimeout {
    /// The 408 answer; the caller closes the connection.
    pub fn problem(&self) -> Problem {
        Problem::new(
            Code::RequestTimeout,
            format!(
                "the request body stalled for more than {}; the request was not executed",
                humantime::format_duration(self.0)
            ),
        )
    }

    /// Finds a body timeout anywhere in an error's source chain (the
    /// upstream client reports it as the cause of a failed send).
    pub fn in_chain<'e>(mut e: &'e (dyn std::error::Error + 'static)) -> Option<&'e BodyReadTimeout> {
        loop {
            if let Some(t) = e.downcast_ref::<BodyReadTimeout>() {
                return Some(t);
            }
            e = e.source()?;
        }
    }
}

pin_project_lite::pin_project! {
    /// `body`, failing with [`BodyReadTimeout`] after `limit` without a frame.
    pub struct TimedBody<B = Incoming> {
        #[pin]
        body: B,
        limit: Duration,
        // Boxed so that a body that never waits never allocates it.
        timer: Option<Pin<Box<Sleep>>>,
        // A frame arrived since the timer was last set.
        progressed: bool,
    }
}

impl<B> TimedBody<B> {
    pub fn new(body: B, limit: Duration) -> Self {
        TimedBody {
            body,
            limit,
            timer: None,
            progressed: false,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.body.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.progressed = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                let timer = match this.timer {
                    None => this.timer.insert(Box::pin(tokio::time::sleep(*this.limit))),
                    Some(t) => {
                        if *this.progressed {
                            t.as_mut().reset(Instant::now() + *this.limit);
                        }
                        t
                    }
                };
                *this.progressed = false;
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyReadTimeout(*this.limit).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Chunks = tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::convert::Infallible>>;

    fn stream(rx: Chunks) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        struct S(Chunks);
        impl futures_core::Stream for S {
            type Item = Result<Frame<Bytes>, std::convert::Infallible>;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
                self.0.poll_recv(cx)
            }
        }
        StreamBody::new(S(rx))
    }

    #[tokio::test]
    async fn silence_longer_than_the_limit_fails_steady_progress_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let body = TimedBody::new(stream(rx), Duration::from_secs(1));
        let sender = tokio::spawn(async move {
            // Twelve chunks 100 ms apart: 1.2 s in all, never 1 s of silence.
            for _ in 0..12 {
                tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(tx);
        });
        let mut body = std::pin::pin!(body);
        for _ in 0..12 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.downcast_ref::<BodyReadTimeout>().is_some(), "{err}");
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "not before the limit of silence"
        );
        sender.abort();
    }
}
