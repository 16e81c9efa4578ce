//! The leader's detached task: claim the key in the store, run the upstream
//! exchange, finish the record durably, then answer the leader's client and
//! every held follower. A stream (SPEC §7) is answered at its head instead:
//! every client reads the [`Recording`] live, and the record is finished when
//! the upstream ends, before any client sees that end.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

mod stream;

use super::flight::{Leader, Shared};
use super::key::LogKey;
use super::replay::{Replay, IDEMPOTENT_REPLAYED};
use super::{in_use, reused, Answer, Engine};
use crate::body::{BoxError, ResponseBody};
use crate::config::{LostOutcome, Policy};
use crate::metrics::Outcome;
use crate::problem::{Code, Problem};
use crate::proxy::UpstreamError;
use crate::store::{now_ms, Claim, ClaimRequest, Completed, Ending, Fingerprint, Finish, Token};

pub(super) struct LeaderTask {
    pub engine: Engine,
    pub leader: Leader,
    pub parts: http::request::Parts,
    pub body: Bytes,
    pub policy: Arc<Policy>,
    pub fingerprint: Option<Fingerprint>,
    pub reply: oneshot::Sender<Answer>,
}

/// The upstream response, read as far as `max_response_body` allows.
enum Read {
    Complete(Bytes),
    /// Too large to keep: what was read so far, and the rest of the stream.
    TooLarge(Vec<Bytes>, Incoming),
    /// A stream (`stream_types`): nothing read yet; forwarded live.
    Stream(Incoming),
}

impl LeaderTask {
    pub async fn run(self) {
        let store = self.engine.inner.store.clone();
        let upstream_timeout = self.engine.inner.upstream.timeout;
        let token = store.token();
        let wait_until = Instant::now() + self.policy.wait_timeout;
        loop {
            let now = now_ms();
            let req = ClaimRequest {
                token,
                fingerprint: self.fingerprint,
                now,
                // An in-flight record must outlive the upstream call it guards.
                inflight_ttl: ms(self.policy.ttl.max(upstream_timeout + Duration::from_secs(5))),
                lost_retry: self.policy.on_lost_outcome == LostOutcome::Retry,
                retry_delay: ms(upstream_timeout),
            };
            let claim = match store.claim(self.leader.key(), &req).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(key = %LogKey(self.leader.key()), error = %e, "store claim failed; nothing forwarded");
                    let p = Problem::new(
                        Code::StoreUnavailable,
                        "the idempotency store is unavailable; nothing was forwarded",
                    )
                    .retry_after(Duration::from_secs(1));
                    return self.fail(p, Outcome::store_error);
                }
            };
            match claim {
                Claim::Acquired => {
                    self.leader.executing();
                    return self.execute(token).await;
                }
                Claim::Completed(c) if c.replayable => {
                    let replay = Arc::new(Replay::from_completed(&c));
                    let own = replay.response(now);
                    return self.done((own, Outcome::replayed), Shared::Response(replay));
                }
                Claim::Completed(_) => {
                    let p = Problem::new(
                        Code::ResponseNotReplayable,
                        "the original response was larger than max_response_body and was not kept; it cannot be replayed",
                    );
                    return self.fail(p, Outcome::conflict);
                }
                Claim::Mismatch => return self.fail(reused(), Outcome::mismatch),
                Claim::Expired(t) => {
                    let p = Problem::new(
                        Code::IdempotencyKeyExpired,
                        format!(
                            "the request with this key completed at {} and its response is no longer kept; use a new key",
                            rfc3339(t.completed_at)
                        ),
                    );
                    return self.fail(p, Outcome::expired);
                }
                Claim::Lost(l) => {
                    let p = match self.policy.on_lost_outcome {
                        LostOutcome::Reject => Problem::new(
                            Code::OutcomeUnknown,
                            "the outcome of the original request is unknown (it timed out or the proxy restarted); it will not be executed again with this key",
                        ),
                        LostOutcome::Retry => in_use(Duration::from_millis(l.retry_at.saturating_sub(now))),
                    };
                    return self.fail(p, Outcome::conflict);
                }
                Claim::InFlight { .. } => {
                    // Owned by another process (shared store) or by a claim of
                    // ours that could not be finished: wait for it to change.
                    if !store.is_shared() || Instant::now() >= wait_until {
                        return self.fail(in_use(Duration::from_secs(1)), Outcome::conflict);
                    }
                    let ended = tokio::select! {
                        e = store.wait_change(self.leader.key(), token) => e,
                        () = tokio::time::sleep_until(wait_until) => None,
                    };
                    if let Some(e) = ended {
                        let (own, shared) = super::ended_elsewhere(&e);
                        return self.done(own, shared);
                    }
                }
            }
        }
    }

    /// Answers the followers and the leader's client; the flight ends.
    ///
    /// The flight is ended first: once a client holds an answer, its next
    /// request must find the key in the store, not join this finished flight
    /// (whose fingerprint may be a rejected request's).
    fn done(self, own: Answer, shared: Shared) {
        let LeaderTask { reply, leader, .. } = self;
        leader.finish(shared);
        let _ = reply.send(own);
    }

    fn fail(self, p: Problem, outcome: Outcome) {
        let own = (p.clone().into_response(), outcome);
        self.done(own, Shared::Problem(p, outcome));
    }

    /// We own the key: forward, then finish the record before answering.
    async fn execute(self, token: Token) {
        let engine = self.engine.clone();
        let inner = &engine.inner;
        inner.metrics.inflight().inc();
        let _gauge = scopeguard(|| {
            inner.metrics.inflight().dec();
        });
        let deadline = Instant::now() + inner.upstream.timeout;
        let req = Request::from_parts(self.parts.clone(), Either::Right(Full::new(self.body.clone())));
        let limit = usize::try_from(self.policy.max_response_body).unwrap_or(usize::MAX);
        let exchange = async {
            let res = inner.upstream.send(req, deadline).await?;
            let (head, body) = res.into_parts();
            if self.policy.streams(head.headers.get(CONTENT_TYPE)) {
                return Ok((head, Read::Stream(body)));
            }
            let read = read_up_to(body, limit, deadline, inner.upstream.timeout).await?;
            Ok::<_, UpstreamError>((head, read))
        };
        let result = keep_claim_alive(&engine, self.leader.key().clone(), token, exchange).await;
        let key = self.leader.key().clone();
        let store = &inner.store;

        let (head, read) = match result {
            Ok(r) => r,
            Err(e) => {
                // Refused: nothing was sent, free the key. Otherwise the
                // upstream may have acted: the policy decides.
                let how = if e.nothing_sent() || self.policy.on_lost_outcome == LostOutcome::Retry {
                    Finish::Release
                } else {
                    Finish::Lost
                };
                tracing::warn!(key = %LogKey(self.leader.key()), error = %e, finish = ?how, "upstream exchange failed");
                let p = e.problem();
                let ending = Ending::problem(&p);
                let told = store.finish_told(&key, token, how, Some(&ending), self.policy.wait_timeout);
                if let Err(se) = told.await {
                    tracing::error!(key = %LogKey(self.leader.key()), error = %se, "could not record the failed exchange");
                }
                return self.fail(p, Outcome::upstream_error);
            }
        };
        let status = head.status;
        let storable = self.policy.storable.contains(status.as_u16()) && !self.policy.ttl.is_zero();
        let now = now_ms();
        match read {
            Read::Complete(body) => {
                let replay = Arc::new(Replay::new(status, &head.headers, body.clone(), now));
                let how = self.completion(storable, status, Some((replay.stored_headers(), body.clone())), now);
                let outcome = if storable { Outcome::stored } else { Outcome::not_stored };
                let ending = (!storable).then(|| Ending::response(status, replay.stored_headers(), body.clone(), now));
                self.finish_record(token, how, ending.as_ref()).await;
                let mut own = Response::from_parts(head, ResponseBody::full(body));
                own.headers_mut()
                    .insert(IDEMPOTENT_REPLAYED.clone(), HeaderValue::from_static("false"));
                self.done((own, outcome), Shared::Response(replay));
            }
            Read::TooLarge(prefix, rest) => {
                let how = self.completion(storable, status, None, now);
                let p = Problem::new(
                    Code::ResponseNotReplayable,
                    "the original response is larger than max_response_body and is not kept",
                );
                self.finish_record(token, how, (!storable).then(|| Ending::problem(&p)).as_ref())
                    .await;
                let (tx, rx) = mpsc::channel(8);
                let mut own = Response::from_parts(head, ResponseBody::Channel { rx });
                own.headers_mut()
                    .insert(IDEMPOTENT_REPLAYED.clone(), HeaderValue::from_static("false"));
                self.done((own, Outcome::not_stored), Shared::Problem(p, Outcome::conflict));
                pump(prefix, rest, tx, deadline).await;
            }
            Read::Stream(body) => self.stream(token, head, body, deadline, storable).await,
        }
    }

    /// How to finish a record after a response: keep it (with its headers and
    /// body when `kept` is given, else only the fact that it was too large to
    /// replay), or free the key when the status or the route says not to keep.
    fn completion(
        &self,
        storable: bool,
        status: http::StatusCode,
        kept: Option<(Vec<(String, Bytes)>, Bytes)>,
        now: u64,
    ) -> Finish {
        if !storable {
            return Finish::Release;
        }
        let replayable = kept.is_some();
        let (headers, body) = kept.unwrap_or_default();
        Finish::Store(Arc::new(Completed {
            fingerprint: self.fingerprint,
            status: status.as_u16(),
            headers,
            body,
            replayable,
            stored_at: now,
            expires_at: now + ms(self.policy.ttl),
            tombstone_until: tombstone_until(&self.policy, now),
        }))
    }

    /// Finishes the record; a failure is logged, not hidden behind a
    /// second execution: the response is still delivered, and the key stays
    /// claimed (in flight, then lost) so no retry executes it again.
    async fn finish_record(&self, token: Token, how: Finish, ending: Option<&Ending>) {
        let store = &self.engine.inner.store;
        let told = store.finish_told(self.leader.key(), token, how, ending, self.policy.wait_timeout);
        if let Err(e) = told.await {
            tracing::error!(key = %LogKey(self.leader.key()), error = %e, "could not store the completed response");
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn tombstone_until(policy: &Policy, now: u64) -> u64 {
    if policy.tombstone_ttl.is_zero() {
        0
    } else {
        now + ms(policy.tombstone_ttl)
    }
}

pub(super) fn rfc3339(ms_since_epoch: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms_since_epoch);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Reads the body until `limit` bytes or the end, whichever comes first.
async fn read_up_to(
    mut body: Incoming,
    limit: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<Read, UpstreamError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(UpstreamError::Timeout(timeout)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(UpstreamError::Broken(e.into())),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            total += data.len();
            chunks.push(data);
            if total > limit {
                return Ok(Read::TooLarge(chunks, body));
            }
        }
    }
    Ok(Read::Complete(match chunks.len() {
        0 => Bytes::new(),
        // Copy even a single chunk: it is a slice of hyper's read buffer, and
        // keeping it in the store would keep that whole buffer alive.
        1 => Bytes::copy_from_slice(&chunks[0]),
        _ => {
            let mut buf = BytesMut::with_capacity(total);
            chunks.iter().for_each(|c| buf.extend_from_slice(c));
            buf.freeze()
        }
    }))
}

/// Streams an oversized response to the leader's client. If the client has
/// gone, the rest is still read so the upstream exchange completes.
async fn pump(prefix: Vec<Bytes>, mut rest: Incoming, tx: mpsc::Sender<Result<Bytes, BoxError>>, deadline: Instant) {
    let mut open = true;
    for chunk in prefix {
        open = open && tx.send(Ok(chunk)).await.is_ok();
    }
    loop {
        match tokio::time::timeout_at(deadline, rest.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let (true, Ok(data)) = (open, frame.into_data()) {
                    open = tx.send(Ok(data)).await.is_ok();
                }
            }
            Ok(None) => return,
            Ok(Some(Err(e))) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
            Err(_) => {
                let _ = tx.send(Err(crate::body::BodyTimeout.into())).await;
                return;
            }
        }
    }
}

/// Runs `exchange` while renewing the claim's lease (shared stores only).
async fn keep_claim_alive<F: std::future::Future>(
    engine: &Engine,
    key: crate::store::RecordKey,
    token: Token,
    exchange: F,
) -> F::Output {
    let store = &engine.inner.store;
    let Some(every) = store.renew_every() else {
        return exchange.await;
    };
    let renew = async {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = store.renew(&key, token).await {
                tracing::warn!(error = %e, "lease renewal failed");
            }
        }
    };
    tokio::select! {
        out = exchange => out,
        () = renew => unreachable!("the renewal loop never ends"),
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
