//! rustls configuration for the inbound listener (`[server.tls]`) and for
//! `https://` upstreams. Both use the ring provider explicitly, so no
//! process-wide default provider has to be installed.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ConfigError, TlsFiles};

/// The crypto provider every rustls config of the process uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn load_certs(path: &Path, key: &str, file: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bad = |reason: String| ConfigError {
        file: file.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("cannot read certificates from {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(bad(format!("no certificate in {}", path.display())));
    }
    Ok(certs)
}

/// The inbound TLS config: the given chain and key, ALPN h2 then http/1.1.
pub fn server_config(files: &TlsFiles, file: &str) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let certs = load_certs(&files.cert, "server.tls.cert", file)?;
    let bad = |reason: String| ConfigError {
        file: file.to_owned(),
        key: "server.tls.key".into(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| bad(format!("cannot read a private key from {}: {e}", files.key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(format!("certificate and key do not fit together: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The upstream TLS config: webpki roots, the system's roots and `ca_file`.
pub fn client_config(ca_file: Option<&Path>, file: &str) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // Unreadable system certificates are not fatal: webpki roots remain.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        for cert in load_certs(path, "upstream.ca_file", file)? {
            roots.add(cert).map_err(|e| ConfigError {
                file: file.to_owned(),
                key: "upstream.ca_file".into(),
                reason: format!("unusable CA certificate in {}: {e}", path.display()),
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError {
            file: file.to_owned(),
            key: "upstream".into(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}
