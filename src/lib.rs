//! idemproxy: a reverse proxy that makes any HTTP API safe to retry.
//!
//! A tour, following a request:
//!
//! - [`server`] accepts connections (HTTP/1.1 and HTTP/2, optional TLS) and
//!   hands each request to [`service::Proxy`], which picks the route from the
//!   [`config::Rules`] (swapped atomically on reload).
//! - Requests on no enabled route go straight through [`proxy::Upstream`]:
//!   streamed both ways, hop-by-hop headers removed, `X-Forwarded-*` added.
//! - Keyed requests go to the [`idempotency::Engine`]: key and tenant are
//!   read, the body is fingerprinted, and concurrent duplicates are coalesced
//!   in process ([`idempotency::flight`]). The one leader claims the key in
//!   the [`store::Store`] (sled, memory; Redis for several replicas), forwards
//!   the request, stores the response durably and only then answers.
//! - Every error the proxy answers itself is a [`problem::Problem`]
//!   (RFC 9457), built in one place.
//! - [`admin`] serves health, readiness, [`metrics`] and the records API on
//!   a separate listener.
//!
//! - [`call`] is the other side: `idemproxy call`, the client that keeps
//!   one key across its retries and reports `created` or `replayed`.
//!
//! [`app::App`] wires it all together; `main.rs` only parses the command line.

pub mod admin;
pub mod app;
pub mod body;
pub mod call;
pub mod cli;
pub mod config;
pub mod idempotency;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod proxy;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod tls;
