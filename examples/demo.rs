//! The README's first command: a small payments API on 127.0.0.1:3000 that
//! counts what it executes, with idemproxy in front of it on 127.0.0.1:8080
//! (admin on 127.0.0.1:9901), configured by `config/idemproxy.toml`.
//!
//! ```text
//! cargo run --example demo
//! curl -si localhost:8080/v1/payments/charge -H 'Idempotency-Key: pay-1' -d '{"amount": 100}'
//! curl -si localhost:8080/v1/payments/charge -H 'Idempotency-Key: pay-1' -d '{"amount": 100}'
//! ```
//! The second answer is the first one replayed (`Idempotent-Replayed: true`),
//! and the API's log shows one charge.

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use idemproxy::app::{App, Listeners};
use idemproxy::config::{Config, Overrides};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter("idemproxy=info")
        .with_writer(std::io::stderr)
        .init();
    let api = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    let charges = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = api.accept().await else { continue };
            let charges = charges.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| execute(charges.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });

    let config = Config::load(Path::new("config/idemproxy.toml"), true, &Overrides::default())?;
    let app = App::build(config).await?;
    let listeners = Listeners::bind(&app.config).await?;
    eprintln!(
        "demo API on 127.0.0.1:3000; idemproxy on {} (admin {}). Try:\n  \
         curl -si localhost:8080/v1/payments/charge -H 'Idempotency-Key: pay-1' -d '{{\"amount\": 100}}'\n\
         twice, then Ctrl-C.",
        listeners.main_addr()?,
        listeners.admin.local_addr()?
    );
    app.run(listeners, idemproxy::shutdown::signal()).await?;
    Ok(())
}

/// The demo API: every request it executes is a new charge with a new id.
async fn execute(
    charges: Arc<AtomicU64>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let n = charges.fetch_add(1, Ordering::SeqCst) + 1;
    eprintln!("demo API: executed {} {} -> charge ch_{n}", parts.method, parts.uri);
    let json = format!(
        "{{\"id\":\"ch_{n}\",\"path\":\"{}\",\"request\":{}}}\n",
        parts.uri.path(),
        if body.is_empty() {
            "null".into()
        } else {
            String::from_utf8_lossy(&body).into_owned()
        }
    );
    let mut res = Response::new(Full::new(Bytes::from(json)));
    *res.status_mut() = hyper::StatusCode::CREATED;
    res.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(res)
}
