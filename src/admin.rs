//! The admin listener (`server.admin_listen`, loopback by default): health,
//! readiness, Prometheus metrics and the records API (SPEC §4). Kept off the
//! main listener so that clients of the API can never reach it.

use std::convert::Infallible;
use std::future::Future;
use std::time::{Duration, UNIX_EPOCH};

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;

use crate::body::ResponseBody;
use crate::metrics::Metrics;
use crate::problem::{Code, Problem};
use crate::store::{Record, RecordKey, Store};

#[derive(Clone)]
pub struct Admin {
    pub store: Store,
    pub metrics: Metrics,
}

/// Serves the admin API until `shutdown` resolves.
pub async fn serve(listener: TcpListener, admin: Admin, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let admin = admin.clone();
        let service = service_fn(move |req| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(admin.handle(req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(tcp), service);
        let fut = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = fut.await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

/// The methods a known admin path answers, for 405 responses.
fn allowed(path: &str) -> Option<&'static str> {
    match path {
        "/healthz" | "/readyz" | "/metrics" => Some("GET"),
        "/v1/records" => Some("GET, DELETE"),
        _ => None,
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut res = Response::new(ResponseBody::full(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let mut res = Response::new(ResponseBody::full(serde_json::to_vec(value).unwrap_or_default()));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn not_found() -> Response<ResponseBody> {
    Problem::new(Code::IdempotencyKeyUnknown, "no record for this tenant and key").into_response()
}

/// RFC 3339 UTC with milliseconds.
pub fn timestamp(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The public view of a record: state and times, never bodies.
pub fn record_json(record: &Record) -> serde_json::Value {
    match record {
        Record::InFlight(f) => {
            json!({"state": "in_flight", "status": null, "stored_at": timestamp(f.started_at), "expires_at": timestamp(f.expires_at)})
        }
        Record::Lost(l) => {
            json!({"state": "lost", "status": null, "stored_at": timestamp(l.started_at), "expires_at": timestamp(l.expires_at)})
        }
        Record::Completed(c) => {
            json!({"state": "completed", "status": c.status, "stored_at": timestamp(c.stored_at), "expires_at": timestamp(c.expires_at)})
        }
        Record::Expired(t) => {
            json!({"state": "expired", "status": null, "stored_at": timestamp(t.completed_at), "expires_at": timestamp(t.until)})
        }
    }
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => match self.store.probe().await {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(e) => {
                    tracing::warn!(error = %e, "readiness probe failed");
                    text(StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
                }
            },
            (&Method::GET, "/metrics") => {
                let mut res = Response::new(ResponseBody::full(self.metrics.encode()));
                res.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                );
                res
            }
            (m, "/v1/records") if m == Method::GET || m == Method::DELETE => {
                let (mut tenant, mut key) = (None, None);
                for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
                    match &*k {
                        "tenant" => tenant = Some(v.into_owned()),
                        "key" => key = Some(v.into_owned()),
                        _ => {}
                    }
                }
                let (Some(tenant), Some(key)) = (tenant, key) else {
                    return Problem::new(Code::BadRequest, "give both tenant and key as query parameters")
                        .into_response();
                };
                let rkey = RecordKey::new(&tenant, &key);
                let unavailable = |e: crate::store::StoreError| {
                    tracing::error!(error = %e, "records API: store failed");
                    Problem::new(Code::StoreUnavailable, "the idempotency store is unavailable").into_response()
                };
                if m == Method::GET {
                    match self.store.get(&rkey).await {
                        Ok(Some(r)) => json_response(StatusCode::OK, &record_json(&r)),
                        Ok(None) => not_found(),
                        Err(e) => unavailable(e),
                    }
                } else {
                    match self.store.delete(&rkey).await {
                        Ok(true) => {
                            let mut res = Response::new(ResponseBody::empty());
                            *res.status_mut() = StatusCode::NO_CONTENT;
                            res
                        }
                        Ok(false) => not_found(),
                        Err(e) => unavailable(e),
                    }
                }
            }
            (_, path) => match allowed(path) {
                Some(allow) => {
                    let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
                    res.headers_mut()
                        .insert(http::header::ALLOW, HeaderValue::from_static(allow));
                    res
                }
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            },
        }
    }
}
