//! The leader's streamed responses (SPEC §7): answered at their head, read
//! live by every client from one [`Recording`], and finished in the store
//! when the upstream ends, before any client sees that end.

use http::header::HeaderValue;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{keep_claim_alive, LeaderTask};
use crate::body::ResponseBody;
use crate::config::LostOutcome;
use crate::idempotency::flight::Shared;
use crate::idempotency::key::LogKey;
use crate::idempotency::recording::{End, Recording, Writer};
use crate::idempotency::replay::{self, IDEMPOTENT_REPLAYED};
use crate::metrics::Outcome;
use crate::proxy::UpstreamError;
use crate::store::{now_ms, Ending, Finish, Token};

impl LeaderTask {
    /// A streamed response: the leader's client and every duplicate read one
    /// recording as the upstream sends it. When the upstream ends, the record
    /// is finished first (stored when clean, storable and within
    /// `max_response_body`; lost or released when broken, per
    /// `on_lost_outcome`), then the flight, and only then do the readers see
    /// the end: a client that saw a clean end can count on a replay.
    pub(super) async fn stream(
        mut self,
        token: Token,
        head: http::response::Parts,
        mut body: Incoming,
        deadline: Instant,
        storable: bool,
    ) {
        let engine = self.engine.clone();
        let limit = self.policy.max_response_body;
        let recording = Recording::new(head.status, replay::replayable(&head.headers), now_ms(), limit);
        let writer = Writer(recording.clone());
        let reader = recording.reader().expect("a new recording is replayable");
        let mut own = Response::from_parts(head, ResponseBody::Recorded { reader });
        own.headers_mut()
            .insert(IDEMPOTENT_REPLAYED.clone(), HeaderValue::from_static("false"));
        let outcome = if storable { Outcome::stored } else { Outcome::not_stored };
        self.leader.stream(recording.clone());
        // The leader's client is answered now; the task keeps the flight
        // (duplicates join the stream) and the record until the upstream ends.
        let (unused, _) = oneshot::channel();
        let _ = std::mem::replace(&mut self.reply, unused).send((own, outcome));

        let timeout = engine.inner.upstream.timeout;
        let exchange = async {
            loop {
                match tokio::time::timeout_at(deadline, body.frame()).await {
                    Err(_) => return Err(UpstreamError::Timeout(timeout)),
                    Ok(None) => return Ok(()),
                    Ok(Some(Err(e))) => return Err(UpstreamError::Broken(e.into())),
                    Ok(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            recording.push(data);
                        }
                    }
                }
            }
        };
        let result = keep_claim_alive(&engine, self.leader.key().clone(), token, exchange).await;
        let end = match result {
            Ok(()) => {
                let kept = recording
                    .body()
                    .map(|body| (replay::stored_form(&recording.headers), body));
                let ending = (!storable).then(|| recording.body()).flatten().map(|body| {
                    Ending::response(
                        recording.status,
                        replay::stored_form(&recording.headers),
                        body,
                        now_ms(),
                    )
                });
                let how = self.completion(storable, recording.status, kept, now_ms());
                self.finish_record(token, how, ending.as_ref()).await;
                End::Complete
            }
            Err(e) => {
                let how = if self.policy.on_lost_outcome == LostOutcome::Retry {
                    Finish::Release
                } else {
                    Finish::Lost
                };
                tracing::warn!(key = %LogKey(self.leader.key()), error = %e, finish = ?how, bytes = recording.len(), "upstream stream broke");
                self.finish_record(token, how, Some(&Ending::problem(&e.problem())))
                    .await;
                End::Broken
            }
        };
        self.leader.finish(Shared::Stream(recording));
        writer.end(end);
    }
}
