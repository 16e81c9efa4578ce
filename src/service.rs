//! The per-request entry point of the main listener: pick the route, then
//! pass through or hand the request to the idempotency engine.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::ResponseBody;
use crate::config::Rules;
use crate::idempotency::Engine;
use crate::metrics::Metrics;
use crate::proxy::{ConnInfo, Upstream};

/// Cheap to clone; one per connection.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    /// Swapped whole on reload; requests load it once, without locking.
    rules: ArcSwap<Rules>,
    engine: Engine,
    upstream: Upstream,
    metrics: Metrics,
}

impl Proxy {
    pub fn new(rules: Arc<Rules>, engine: Engine, upstream: Upstream, metrics: Metrics) -> Self {
        Proxy {
            inner: Arc::new(Inner {
                rules: ArcSwap::new(rules),
                engine,
                upstream,
                metrics,
            }),
        }
    }

    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<ResponseBody> {
        let start = Instant::now();
        let policy = self
            .inner
            .rules
            .load()
            .policy_for(req.method(), req.uri().path())
            .cloned();
        let (res, outcome) = match policy {
            None => self.inner.upstream.forward(req, &conn).await,
            Some(policy) => self.inner.engine.handle(req, conn, policy).await,
        };
        self.inner.metrics.request(outcome, start.elapsed());
        res
    }

    /// Installs new routes and policies for requests that start from now on.
    pub fn set_rules(&self, rules: Arc<Rules>) {
        self.inner.rules.store(rules);
    }
}
