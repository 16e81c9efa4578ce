//! The per-request entry point of the main listener: pick the route, then
//! pass through or hand the request to the idempotency engine. Also answers
//! the client key status endpoint, and writes the access log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::ResponseBody;
use crate::config::Rules;
use crate::idempotency::{status, Engine};
use crate::metrics::{Metrics, Outcome};
use crate::proxy::{ConnInfo, Upstream};

/// Cheap to clone; one per connection.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    /// Swapped whole on reload (for every worker at once); requests load it
    /// once, without locking.
    rules: Arc<ArcSwap<Rules>>,
    engine: Engine,
    upstream: Upstream,
    metrics: Metrics,
    /// `server.status_path` followed by '/', if the endpoint is on.
    status_prefix: Option<String>,
    request_ids: Arc<AtomicU64>,
}

impl Proxy {
    pub fn new(
        rules: Arc<Rules>,
        engine: Engine,
        upstream: Upstream,
        metrics: Metrics,
        status_path: Option<&str>,
    ) -> Self {
        Proxy {
            inner: Arc::new(Inner {
                rules: Arc::new(ArcSwap::new(rules)),
                engine,
                upstream,
                metrics,
                status_prefix: status_path.map(|p| format!("{p}/")),
                request_ids: Arc::new(AtomicU64::new(0)),
            }),
        }
    }

    /// A handle for one serving worker: the same rules, engine and metrics,
    /// but a reference count of its own, so that cloning it per request
    /// touches no memory another core writes.
    pub fn for_worker(&self) -> Proxy {
        let i = &*self.inner;
        Proxy {
            inner: Arc::new(Inner {
                rules: i.rules.clone(),
                engine: i.engine.clone(),
                upstream: i.upstream.clone(),
                metrics: i.metrics.clone(),
                status_prefix: i.status_prefix.clone(),
                request_ids: i.request_ids.clone(),
            }),
        }
    }

    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<ResponseBody> {
        let start = Instant::now();
        let version = req.version();
        let inner = &*self.inner;
        // The access log costs a few allocations; only pay when it is on.
        let access = tracing::enabled!(target: "idemproxy::access", tracing::Level::INFO);
        let mut head = access.then(|| {
            (
                req.method().clone(),
                req.uri().path().to_owned(),
                request_id(inner, &req),
            )
        });
        let (res, outcome, route) = if let Some(rest) = self.status_key(&req) {
            let policy = status_policy(&inner.rules.load(), &req);
            let answer = status::answer(&inner.engine, &policy, &req, rest).await;
            // The path holds the raw key, which is never logged: show its hash.
            if let (Some((_, path, _)), Some(prefix)) = (head.as_mut(), inner.status_prefix.as_deref()) {
                *path = format!("{prefix}{}", answer.log_key.as_deref().unwrap_or("-"));
            }
            (answer.response, answer.outcome, None)
        } else {
            // Only the matched policy is cloned out of the rules: the guard
            // itself costs no shared reference count and ends here.
            let matched = inner
                .rules
                .load()
                .route_for(req.method(), req.uri().path())
                .map(|(index, policy)| (index, policy.clone()));
            match matched {
                None => {
                    let (res, outcome) = inner.upstream.forward(req, &conn).await;
                    (res, outcome, None)
                }
                Some((index, policy)) => {
                    let (res, outcome) = inner.engine.handle(req, conn, policy).await;
                    (res, outcome, index)
                }
            }
        };
        let mut res = res;
        if outcome == Outcome::request_timeout && version < http::Version::HTTP_2 {
            // The rest of the stalled body may still come: the connection
            // cannot carry another request.
            res.headers_mut()
                .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        let elapsed = start.elapsed();
        inner.metrics.request(outcome, elapsed);
        if let Some((method, path, id)) = head {
            tracing::info!(
                target: "idemproxy::access",
                request_id = %id,
                %method,
                path,
                route = route.map(|i| i as i64).unwrap_or(-1),
                status = res.status().as_u16(),
                outcome = ?outcome,
                latency_ms = elapsed.as_secs_f64() * 1000.0,
            );
        }
        res
    }

    /// The encoded key of a status request, if this is one.
    /// The whole prefix belongs to the endpoint: nothing under it is forwarded
    /// (other methods get 405 from `status::answer`).
    fn status_key<'r>(&self, req: &'r Request<Incoming>) -> Option<&'r str> {
        let prefix = self.inner.status_prefix.as_deref()?;
        req.uri().path().strip_prefix(prefix)
    }

    /// Installs new routes and policies for requests that start from now on.
    pub fn set_rules(&self, rules: Arc<Rules>) {
        self.inner.rules.store(rules);
    }
}

/// The policy whose tenant source a status request uses: that of the route
/// a POST to `?path=P` would match, else the `[idempotency]` defaults. A key's
/// owner on a route with its own tenant source finds its key this way.
fn status_policy<B>(rules: &Rules, req: &Request<B>) -> Arc<crate::config::Policy> {
    let path = req.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(name, _)| name == "path")
            .map(|(_, value)| value)
    });
    path.and_then(|p| {
        rules
            .route_for(&http::Method::POST, &p)
            .map(|(_, policy)| policy.clone())
    })
    .unwrap_or_else(|| rules.defaults.clone())
}

/// The client's `X-Request-Id` if it sent one, else a process-unique number.
fn request_id(inner: &Inner, req: &Request<Incoming>) -> String {
    match req.headers().get("x-request-id").and_then(|v| v.to_str().ok()) {
        Some(id) => id.to_owned(),
        None => format!("{:016x}", inner.request_ids.fetch_add(1, Ordering::Relaxed)),
    }
}
