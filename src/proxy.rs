//! The upstream side: a pooled hyper client and the rewriting of a client's
//! request into the upstream's (URI, hop-by-hop headers, `X-Forwarded-*`).
//!
//! Failures are classified here by what the upstream may have seen, because
//! the idempotency engine treats them differently: a refused connection sent
//! nothing (the key is freed), while a timeout or a connection broken after
//! sending leaves the outcome unknown.

pub mod headers;
pub mod timed_body;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ResponseBody;
use crate::config::{ConfigError, UpstreamConfig};
use crate::metrics::Outcome;
use crate::problem::{Code, Problem};
use crate::server::worker;
use timed_body::{BodyReadTimeout, TimedBody};

/// A request body on its way upstream: the client's stream (pass-through,
/// cut off when it stalls) or the buffered bytes of a keyed request.
pub type UpstreamBody = Either<TimedBody<Incoming>, Full<Bytes>>;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// What the proxy knows about the client's connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// `server.body_read_timeout`: the longest silence inside a request body.
    pub body_read_timeout: Duration,
}

/// How an upstream exchange failed, by what the upstream may have seen.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The connection could not be made: nothing was sent.
    #[error("cannot connect to upstream: {0}")]
    Connect(#[source] hyper_util::client::legacy::Error),
    /// No complete response within `upstream.timeout`.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed after the request may have been sent.
    #[error("upstream connection failed: {0}")]
    Broken(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl UpstreamError {
    /// True when the upstream cannot have executed the request.
    pub fn nothing_sent(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }

    pub fn problem(&self) -> Problem {
        match self {
            UpstreamError::Connect(_) => Problem::new(Code::UpstreamUnavailable, "the upstream refused the connection"),
            UpstreamError::Timeout(t) => Problem::new(
                Code::UpstreamTimeout,
                format!("the upstream did not answer within {}", humantime::format_duration(*t)),
            ),
            UpstreamError::Broken(_) => Problem::new(
                Code::UpstreamUnavailable,
                "the connection to the upstream failed before a complete response",
            ),
        }
    }
}

/// The pooled upstream client. Cheap to clone.
///
/// One pool per serving worker (indexed by [`worker::index`]), plus one for
/// any other thread: a worker's requests use connections that its own
/// runtime drives, so an upstream exchange never leaves the worker.
#[derive(Clone)]
pub struct Upstream {
    clients: Arc<[Client<Connector, UpstreamBody>]>,
    scheme: Scheme,
    authority: Authority,
    pub timeout: Duration,
}

impl Upstream {
    /// The client for `workers` serving workers.
    pub fn new(config: &UpstreamConfig, file: &str, workers: usize) -> Result<Self, ConfigError> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.enforce_http(false);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = crate::tls::client_config(config.ca_file.as_deref(), file)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let clients = (0..=workers)
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(config.pool_idle_timeout)
                    .pool_max_idle_per_host(1024)
                    .build(connector.clone())
            })
            .collect();
        let scheme = config.url.scheme().cloned().unwrap_or(Scheme::HTTP);
        let authority = config
            .url
            .authority()
            .cloned()
            .expect("validated upstream URL has a host");
        Ok(Upstream {
            clients,
            scheme,
            authority,
            timeout: config.timeout,
        })
    }

    /// Validates what building the client would read (`ca_file`), without
    /// starting anything: for `idemproxy check`.
    pub fn check(config: &crate::config::Config) -> Result<(), ConfigError> {
        let file = config
            .source
            .as_ref()
            .map_or_else(|| "(defaults)".to_owned(), |p| p.display().to_string());
        crate::tls::client_config(config.upstream.ca_file.as_deref(), &file)?;
        if let Some(files) = &config.server.tls {
            crate::tls::server_config(files, &file)?;
        }
        Ok(())
    }

    /// Rewrites a client's request head for the upstream: absolute URI of the
    /// upstream with the client's path and query, hop-by-hop headers removed,
    /// `Host` kept as the client sent it (from `:authority` for HTTP/2),
    /// `X-Forwarded-*` added.
    pub fn prepare(&self, parts: &mut http::request::Parts, conn: &ConnInfo) {
        if !parts.headers.contains_key(http::header::HOST) {
            if let Some(host) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                parts.headers.insert(http::header::HOST, host);
            }
        }
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::add_forwarded(
            &mut parts.headers,
            conn.peer.ip(),
            if conn.tls { "https" } else { "http" },
        );
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        uri.path_and_query = Some(pq);
        parts.uri = Uri::from_parts(uri).expect("scheme, authority and path make a URI");
        // The pooled connection decides the upstream protocol (ALPN for https).
        parts.version = Version::HTTP_11;
    }

    /// Sends a prepared request and waits for the response head, at most
    /// until `deadline`. The body is the caller's to read within the same deadline.
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let pools = self.clients.len();
        let client = &self.clients[worker::index().map_or(pools - 1, |i| i.min(pools - 1))];
        match tokio::time::timeout_at(deadline, client.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout(self.timeout)),
            Ok(Ok(mut res)) => {
                headers::strip_hop_by_hop(res.headers_mut());
                Ok(res)
            }
            Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Connect(e)),
            Ok(Err(e)) => Err(UpstreamError::Broken(e.into())),
        }
    }

    /// Plain pass-through: both bodies stream, nothing is buffered.
    ///
    /// A client body that stalls past `body_read_timeout` aborts the upstream
    /// request mid-body (the upstream connection is closed, so the upstream
    /// never sees a complete request) and the client gets 408.
    pub async fn forward(&self, req: Request<Incoming>, conn: &ConnInfo) -> (Response<ResponseBody>, Outcome) {
        let (mut parts, body) = req.into_parts();
        self.prepare(&mut parts, conn);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let body = Either::Left(TimedBody::new(body, conn.body_read_timeout));
        match self.send(Request::from_parts(parts, body), deadline).await {
            Ok(res) => {
                let (parts, body) = res.into_parts();
                (
                    Response::from_parts(parts, ResponseBody::upstream(body, deadline)),
                    Outcome::passthrough,
                )
            }
            Err(UpstreamError::Broken(e)) if BodyReadTimeout::in_chain(e.as_ref()).is_some() => {
                let stalled = BodyReadTimeout::in_chain(e.as_ref()).expect("just found");
                tracing::debug!(error = %stalled, "pass-through request body stalled");
                (stalled.problem().into_response(), Outcome::request_timeout)
            }
            Err(e) => {
                tracing::debug!(error = %e, "pass-through request failed");
                (e.problem().into_response(), Outcome::upstream_error)
            }
        }
    }
}
