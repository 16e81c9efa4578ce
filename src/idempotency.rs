//! The idempotency engine: SPEC §3 for one matching request.
//!
//! ```text
//! request ──► key? ──no──► required? 400 : pass through
//!              │yes (or derived)
//!              ▼
//!         tenant, body ≤ max_body, fingerprint
//!              │
//!              ▼
//!     join the in-process flight for tenant + key
//!        │leader                         │follower
//!        ▼                               ▼
//!   detached task: store.claim      wait ≤ wait_timeout for the
//!   ├ acquired → upstream, finish   leader's outcome (422 if the
//!   ├ completed → replay            fingerprint differs, 409 when
//!   ├ lost / expired → 409 / 410    max_waiters are waiting)
//!   └ in flight elsewhere → wait for the other process
//! ```
//!
//! The leader's work runs in a task of its own, detached from the client's
//! connection: a client that disconnects does not cancel the upstream call,
//! and the result is still stored, so its retry is a replay. The response is
//! made durable before anyone, the leader's own client included, sees it;
//! except a stream (`stream_types`, SPEC §7), which every client reads live
//! from one shared [`recording`] and which is stored when it ends.

pub mod flight;
pub mod jwt;
pub mod key;
mod leader;
pub mod limits;
pub mod recording;
pub mod replay;
pub mod status;
pub mod tenant;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{Request, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use self::flight::{Flight, Flights, Joined, Shared};
use self::limits::Limits;
use crate::body::ResponseBody;
use crate::config::Policy;
use crate::metrics::{Metrics, Outcome};
use crate::problem::{Code, Problem};
use crate::proxy::{ConnInfo, Upstream};
use crate::store::{now_ms, Completed, Ending, Fingerprint, RecordKey, Store};

/// The engine handle. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    flights: Flights,
    upstream: Upstream,
    metrics: Metrics,
    /// Detached leader tasks, so shutdown can wait for them.
    tasks: TaskTracker,
    /// The bound on keyed work in progress, detached tasks included.
    limits: Limits,
}

type Answer = (Response<ResponseBody>, Outcome);

/// What a held duplicate ends with. Returned once per held request and
/// matched at once, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Followed {
    Answer(Answer),
    /// Its request differs from the one in flight: once that one finished,
    /// go to the store like a new request (it answers 422 or replays).
    Rejoin,
}

/// How often a request re-joins after waiting for a different request.
const REJOINS: usize = 3;

fn problem(p: Problem, outcome: Outcome) -> Answer {
    (p.into_response(), outcome)
}

impl Engine {
    pub fn new(store: Store, upstream: Upstream, metrics: Metrics, limits: Limits) -> Self {
        Engine {
            inner: Arc::new(Inner {
                store,
                flights: Flights::default(),
                upstream,
                metrics,
                tasks: TaskTracker::new(),
                limits,
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Handles a request that matched an enabled route.
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo, policy: Arc<Policy>) -> Answer {
        let (mut parts, body) = req.into_parts();
        let key = match key::from_headers(&parts.headers, &policy.header) {
            Ok(k) => k.map(|k| k.into_owned()),
            Err(e) => {
                return problem(
                    Problem::new(Code::IdempotencyKeyInvalid, e.to_string()),
                    Outcome::invalid_key,
                )
            }
        };
        if key.is_none() && !policy.derive_key {
            if policy.required {
                let detail = format!("this endpoint requires an {} header", policy.header);
                return problem(Problem::new(Code::IdempotencyKeyMissing, detail), Outcome::missing_key);
            }
            return self
                .inner
                .upstream
                .forward(Request::from_parts(parts, body), &conn)
                .await;
        }
        let tenant = match tenant::of(&policy.tenant, &parts.headers) {
            Ok(t) => t.into_owned(),
            Err(p) => {
                let outcome = if p.code == Code::InvalidToken {
                    Outcome::invalid_token
                } else {
                    Outcome::invalid_key
                };
                return problem(p, outcome);
            }
        };
        // Held until this request's work is done: by the detached leader
        // task, or here while a duplicate waits.
        let mut admission = match self.inner.limits.admit() {
            Ok(a) => a,
            Err(p) => return problem(p, Outcome::overloaded),
        };
        let body = match read_body(&parts.headers, body, policy.max_body, conn.body_read_timeout).await {
            Ok(b) => b,
            Err(p) if p.code == Code::RequestTimeout => return problem(p, Outcome::request_timeout),
            Err(p) => return problem(p, Outcome::too_large),
        };
        if let Err(p) = self.inner.limits.hold_body(&mut admission, body.len()) {
            return problem(p, Outcome::overloaded);
        }
        let mut admission = Some(admission);
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let fp = key::fingerprint(&parts.method, pq, &body);
        let key = key.unwrap_or_else(|| hex::encode(fp));
        let record_key = RecordKey::new(&tenant, &key);
        let fingerprint = policy.fingerprint.then_some(fp);
        tracing::debug!(key = %key::LogKey(&record_key), method = %parts.method, path = parts.uri.path(), "keyed request");

        // Replays from an embedded store need no coordination: one read.
        if let Some(c) = self.inner.store.peek_replay(&record_key, fingerprint.as_ref()) {
            return (replay::Replay::from_completed(&c).response(now_ms()), Outcome::replayed);
        }

        // A follower whose request differs from the flight's waits for it and
        // joins again: the store, not the other request, decides who is right.
        for _ in 0..REJOINS {
            let leader = match self.inner.flights.join(&record_key, fingerprint) {
                Joined::Leader(leader) => leader,
                Joined::Follower(flight) => match self.follow(flight, fingerprint, &policy).await {
                    Followed::Answer(answer) => return answer,
                    Followed::Rejoin => continue,
                },
            };
            self.inner.upstream.prepare(&mut parts, &conn);
            let (reply, answer) = oneshot::channel();
            let task = leader::LeaderTask {
                engine: self.clone(),
                leader,
                parts,
                body,
                policy,
                fingerprint,
                reply,
            };
            let admission = admission.take();
            self.inner.tasks.spawn(async move {
                let _admission = admission;
                task.run().await
            });
            return answer.await.unwrap_or_else(|_| {
                problem(
                    Problem::new(Code::UpstreamUnavailable, "the request failed inside the proxy"),
                    Outcome::upstream_error,
                )
            });
        }
        // Only reachable when requests with different bodies keep racing
        // for this key; refusing is the safe answer.
        problem(reused(), Outcome::mismatch)
    }

    /// A held duplicate: wait for the leader's outcome.
    async fn follow(&self, flight: Arc<Flight>, fingerprint: Option<Fingerprint>, policy: &Policy) -> Followed {
        let differs = policy.fingerprint && flight.fingerprint != fingerprint;
        if policy.wait_timeout.is_zero() {
            let p = if differs {
                reused()
            } else {
                in_use(Duration::from_secs(1))
            };
            let outcome = if differs { Outcome::mismatch } else { Outcome::conflict };
            return Followed::Answer(problem(p, outcome));
        }
        let Some(_slot) = flight.add_waiter(policy.max_waiters) else {
            let p = Problem::new(
                Code::IdempotencyKeyInUse,
                "too many duplicates are already waiting for this key",
            )
            .retry_after(Duration::from_secs(1));
            return Followed::Answer(problem(p, Outcome::conflict));
        };
        let mut rx = flight.subscribe();
        if differs {
            // A different request under this key: if the leader's request
            // owns the key, this one is a mismatch; if the leader's was the
            // mismatch (the key holds another request), ask the store again.
            let mut executing = flight.executing();
            return tokio::select! {
                // A stream is published while its flight is still open: the
                // leader owns the key by then, so this is a mismatch.
                biased;
                _ = executing.wait_for(|e| *e) => Followed::Answer(problem(reused(), Outcome::mismatch)),
                _ = rx.wait_for(Option::is_some) => Followed::Rejoin,
                () = tokio::time::sleep(policy.wait_timeout) => {
                    Followed::Answer(problem(in_use(Duration::from_secs(1)), Outcome::conflict))
                }
            };
        }
        let shared = match tokio::time::timeout(policy.wait_timeout, rx.wait_for(Option::is_some)).await {
            Ok(Ok(v)) => v.clone(),
            Ok(Err(_)) => None,
            Err(_) => return Followed::Answer(problem(in_use(Duration::from_secs(1)), Outcome::conflict)),
        };
        Followed::Answer(match shared {
            Some(Shared::Response(r)) => (r.response(now_ms()), Outcome::coalesced),
            Some(Shared::Problem(p, o)) => problem(p, o),
            Some(Shared::Stream(rec)) => match rec.reader() {
                Some(reader) => (replay::joined(&rec, reader, now_ms()), Outcome::coalesced),
                None => problem(not_replayable(), Outcome::conflict),
            },
            None => problem(
                Problem::new(Code::UpstreamUnavailable, "the original request was abandoned"),
                Outcome::upstream_error,
            ),
        })
    }

    /// Waits up to `grace` for detached leader tasks (at shutdown).
    pub async fn drain(&self, grace: Duration) -> bool {
        self.inner.tasks.close();
        tokio::time::timeout(grace, self.inner.tasks.wait()).await.is_ok()
    }
}

/// The answer of a request that waited on this replica for an original on
/// another replica which ended without storing anything (SPEC §5): the
/// original's response, marked replayed, or its problem; never a second
/// execution.
fn ended_elsewhere(e: &Ending) -> (Answer, Shared) {
    if let Some(p) = e.to_problem() {
        let outcome = if p.code.status().is_server_error() {
            Outcome::upstream_error
        } else {
            Outcome::conflict
        };
        return (problem(p.clone(), outcome), Shared::Problem(p, outcome));
    }
    let Ending::Response {
        status,
        headers,
        body,
        at,
    } = e
    else {
        unreachable!("an ending is a problem or a response")
    };
    let replay = Arc::new(replay::Replay::from_completed(&Completed {
        fingerprint: None,
        status: *status,
        headers: headers.clone(),
        body: body.clone(),
        replayable: true,
        stored_at: *at,
        expires_at: *at,
        tombstone_until: 0,
    }));
    (
        (replay.response(now_ms()), Outcome::coalesced),
        Shared::Response(replay),
    )
}

fn reused() -> Problem {
    Problem::new(
        Code::IdempotencyKeyReused,
        "this idempotency key was used with a different request (method, path or body); use a new key",
    )
}

fn not_replayable() -> Problem {
    Problem::new(
        Code::ResponseNotReplayable,
        "the original response is larger than max_response_body and is not kept; it cannot be replayed",
    )
}

fn in_use(retry_after: Duration) -> Problem {
    Problem::new(
        Code::IdempotencyKeyInUse,
        "a request with this idempotency key is still in progress; retry later",
    )
    .retry_after(retry_after)
}

/// Buffers a keyed request body, refusing more than `max` bytes (by
/// `Content-Length` before reading anything, or while reading), and a body
/// that stalls for longer than `stall` (408; nothing is forwarded).
async fn read_body(headers: &http::HeaderMap, body: Incoming, max: u64, stall: Duration) -> Result<Bytes, Problem> {
    let too_large = || {
        Problem::new(
            Code::RequestBodyTooLarge,
            format!("keyed request bodies are limited to {max} bytes"),
        )
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let body = crate::proxy::timed_body::TimedBody::new(body, stall);
    match Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(match e.downcast_ref::<crate::proxy::timed_body::BodyReadTimeout>() {
            Some(stalled) => stalled.problem(),
            None => Problem::new(Code::BadRequest, format!("could not read the request body: {e}")),
        }),
    }
}
