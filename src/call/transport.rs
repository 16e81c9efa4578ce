//! One HTTP exchange: a hyper client over rustls, the whole response read
//! within `--timeout`.
//!
//! Trust is curl's: the system's root certificates (webpki's bundle when the
//! system has none, as in minimal containers), or with `--cacert` only the
//! certificates in that file. Failures are told apart by whether the server
//! may have seen the request, which is what makes a retry with the same key
//! necessary rather than merely harmless.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// A complete response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why an exchange produced no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: the server cannot have seen the request.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The TLS handshake failed (an untrusted certificate, a wrong name):
    /// nothing was sent, and trying again cannot change it.
    #[error("TLS failed: {0}")]
    Tls(String),
    /// No complete response within `--timeout`.
    #[error("no complete response within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The connection failed after the request may have been sent.
    #[error("the connection failed: {0}")]
    Broken(String),
}

impl SendError {
    /// True when the server may have received (and executed) the request.
    pub fn maybe_sent(&self) -> bool {
        !matches!(self, SendError::Connect(_) | SendError::Tls(_))
    }

    /// False when another attempt would fail the same way.
    pub fn retryable(&self) -> bool {
        !matches!(self, SendError::Tls(_))
    }
}

/// `--cacert` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {0}: {1}")]
    Read(PathBuf, String),
    #[error("no certificate in {0}")]
    Empty(PathBuf),
    #[error("unusable CA certificate in {0}: {1}")]
    Unusable(PathBuf, rustls::Error),
    #[error("TLS setup failed: {0}")]
    Setup(rustls::Error),
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The client of one `idemproxy call`, shared by its attempts.
pub struct Transport {
    client: Client<Connector, Full<Bytes>>,
    timeout: Duration,
}

impl Transport {
    pub fn new(cacert: Option<&Path>, timeout: Duration) -> Result<Self, TlsError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_root_certificates(roots(cacert)?)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Transport { client, timeout })
    }

    /// Sends `req` and reads the whole response, within the timeout.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Reply, SendError> {
        let exchange = async {
            let res = self.client.request(req).await.map_err(|e| {
                if e.is_connect() && tls_failure(&e) {
                    SendError::Tls(chain(&e))
                } else if e.is_connect() {
                    SendError::Connect(chain(&e))
                } else {
                    SendError::Broken(chain(&e))
                }
            })?;
            let (parts, body) = res.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| SendError::Broken(chain(&e)))?
                .to_bytes();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| SendError::Timeout(self.timeout))?
    }
}

fn roots(cacert: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match cacert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError::Read(path.to_owned(), e.to_string()))?;
            if certs.is_empty() {
                return Err(TlsError::Empty(path.to_owned()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| TlsError::Unusable(path.to_owned(), e))?;
            }
        }
        None => {
            // Unreadable system certificates are skipped, as curl does.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
        }
    }
    Ok(roots)
}

/// True when a rustls error is somewhere in the chain. It arrives inside
/// `io::Error`s (tokio-rustls wraps it, hyper-rustls wraps that again), whose
/// `source()` skips the error they wrap, so each one is opened by hand.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<rustls::Error>() {
            return true;
        }
        next = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// An error and its sources on one line: hyper's own message alone
/// ("client error (Connect)") does not say what went wrong.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
