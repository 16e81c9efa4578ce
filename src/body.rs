//! The response body type every handler returns.
//!
//! An enum instead of a boxed trait object: a pass-through response streams
//! the upstream body as it arrives (bounded by the upstream deadline), a
//! replay or problem is one `Bytes`, and a leader whose response is too large
//! to store streams it through a channel from the detached upstream task, and
//! a streamed keyed response (SPEC §7) is read from its shared recording. No
//! per-response allocation is needed to pick between them.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tokio::time::Sleep;

use crate::idempotency::recording::Reader;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream did not finish its body before `upstream.timeout`.
#[derive(Debug, thiserror::Error)]
#[error("upstream response body exceeded the upstream timeout")]
pub struct BodyTimeout;

pin_project_lite::pin_project! {
    #[project = Proj]
    pub enum ResponseBody {
        /// Streamed from the upstream until `deadline`.
        Upstream { #[pin] body: Incoming, #[pin] deadline: Sleep },
        /// A complete body (replays, problems, small admin answers).
        Full { data: Option<Bytes> },
        /// Chunks handed over by a detached task.
        Channel { rx: mpsc::Receiver<Result<Bytes, BoxError>> },
        /// A streamed response, read from the recording every client shares.
        Recorded { reader: Reader },
    }
}

impl ResponseBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        ResponseBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    pub fn empty() -> Self {
        ResponseBody::Full { data: None }
    }

    pub fn upstream(body: Incoming, deadline: tokio::time::Instant) -> Self {
        ResponseBody::Upstream {
            body,
            deadline: tokio::time::sleep_until(deadline),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            Proj::Upstream { body, deadline } => match body.poll_frame(cx) {
                Poll::Ready(r) => Poll::Ready(r.map(|f| f.map_err(Into::into))),
                Poll::Pending => match deadline.poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout.into()))),
                    Poll::Pending => Poll::Pending,
                },
            },
            Proj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Proj::Channel { rx } => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
            Proj::Recorded { reader } => reader.poll_chunk(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Full { data } => data.is_none(),
            ResponseBody::Channel { .. } => false,
            ResponseBody::Recorded { reader } => reader.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Full { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            ResponseBody::Channel { .. } | ResponseBody::Recorded { .. } => SizeHint::default(),
        }
    }
}
