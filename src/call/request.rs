//! The request a call sends on every attempt, built once from the command
//! line: method, URL, headers, body and key never change between retries,
//! which is what makes a retry the same operation.
//!
//! Choices where curl and the contract leave room: the method is POST with
//! `-d` and GET without (curl's rule); the body is sent byte for byte (like
//! curl's `--data-binary`, because the key and the server's fingerprint
//! cover the exact bytes); without a `Content-Type` header a body that
//! parses as JSON is sent as `application/json`, any other body as
//! `application/x-www-form-urlencoded` (curl's default). A `-H` naming the
//! key header counts as `--idempotency-key`.

use std::io::Read;
use std::path::PathBuf;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::Full;

use super::key::{self, KeyError, Source};
use crate::cli::CallArgs;

/// A command line that cannot be run; nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("bad URL {0:?}: {1}")]
    Url(String, String),
    #[error("bad method {0:?}")]
    Method(String),
    #[error("bad header {0:?}: expected 'Name: value'")]
    Header(String),
    #[error("bad --key-header {0:?}")]
    KeyHeader(String),
    #[error("cannot read the body from {0}: {1}")]
    Data(PathBuf, #[source] std::io::Error),
    #[error("cannot read the body from stdin: {0}")]
    Stdin(#[source] std::io::Error),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("two different idempotency keys given (--idempotency-key and -H)")]
    TwoKeys,
    #[error("--dry-run needs the call's key: --idempotency-key K or --key-from-inputs (a fresh random key would always execute)")]
    DryRunNeedsKey,
}

/// One call's request, the same on every attempt.
#[derive(Debug, Clone)]
pub struct Plan {
    pub method: Method,
    pub url: Uri,
    /// The caller's headers plus our defaults; without the key.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The key and where it came from; `None` for safe methods.
    pub key: Option<(String, Source)>,
    pub key_header: HeaderName,
}

impl Plan {
    /// Builds the plan; `stdin` is read for `-d @-`.
    pub fn from_args(args: &CallArgs, stdin: impl Read) -> Result<Plan, PlanError> {
        let url: Uri = args
            .url
            .parse()
            .map_err(|e: http::uri::InvalidUri| PlanError::Url(args.url.clone(), e.to_string()))?;
        match url.scheme_str() {
            Some("http" | "https") if url.authority().is_some() => {}
            _ => {
                return Err(PlanError::Url(
                    args.url.clone(),
                    "expected http://HOST/... or https://HOST/...".into(),
                ))
            }
        }
        let body = match args.data.as_deref() {
            None => Bytes::new(),
            Some(data) => read_data(data, stdin)?,
        };
        let method = match &args.method {
            Some(m) => {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| PlanError::Method(m.clone()))?
            }
            None if args.data.is_some() => Method::POST,
            None => Method::GET,
        };
        let key_header = HeaderName::from_bytes(args.key_header.as_bytes())
            .map_err(|_| PlanError::KeyHeader(args.key_header.clone()))?;
        let mut headers = HeaderMap::new();
        let mut header_key = None;
        for line in &args.headers {
            let (name, value) = parse_header(line)?;
            if name == key_header {
                header_key = Some(value.to_str().map_err(|_| KeyError::Characters)?.to_owned());
            } else {
                headers.append(name, value);
            }
        }
        if !body.is_empty() && !headers.contains_key(CONTENT_TYPE) {
            let ct = if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() {
                "application/json"
            } else {
                "application/x-www-form-urlencoded"
            };
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        if !headers.contains_key(USER_AGENT) {
            headers.insert(
                USER_AGENT,
                HeaderValue::from_static(concat!("idemproxy-call/", env!("CARGO_PKG_VERSION"))),
            );
        }
        let explicit = match (&args.idempotency_key, header_key) {
            (Some(a), Some(b)) if *a != b => return Err(PlanError::TwoKeys),
            (Some(a), _) => Some(a.clone()),
            (None, b) => b,
        };
        let key = if key::is_safe(&method) {
            None
        } else if let Some(k) = explicit {
            key::validate(&k)?;
            Some((k, Source::Explicit))
        } else if args.key_from_inputs {
            let k = key::from_inputs(&method, &url, &body, args.scope.as_deref());
            Some((k, Source::Inputs))
        } else {
            Some((key::random(), Source::Random))
        };
        if args.dry_run && matches!(key, Some((_, Source::Random))) {
            return Err(PlanError::DryRunNeedsKey);
        }
        Ok(Plan {
            method,
            url,
            headers,
            body,
            key,
            key_header,
        })
    }

    pub fn key(&self) -> Option<&str> {
        self.key.as_ref().map(|(k, _)| k.as_str())
    }

    /// The request of one attempt: the same every time.
    pub fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.url.clone();
        *req.headers_mut() = self.headers.clone();
        if let Some(value) = self.key().and_then(|k| HeaderValue::from_str(k).ok()) {
            req.headers_mut().insert(self.key_header.clone(), value);
        }
        req
    }
}

fn read_data(data: &str, mut stdin: impl Read) -> Result<Bytes, PlanError> {
    match data.strip_prefix('@') {
        Some("-") => {
            let mut buf = Vec::new();
            stdin.read_to_end(&mut buf).map_err(PlanError::Stdin)?;
            Ok(buf.into())
        }
        Some(path) => std::fs::read(path)
            .map(Bytes::from)
            .map_err(|e| PlanError::Data(path.into(), e)),
        None => Ok(Bytes::copy_from_slice(data.as_bytes())),
    }
}

/// `Name: value`, the value trimmed; `Name:` is an empty value.
fn parse_header(line: &str) -> Result<(HeaderName, HeaderValue), PlanError> {
    let bad = || PlanError::Header(line.to_owned());
    let (name, value) = line.split_once(':').ok_or_else(bad)?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
    let value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn plan(args: &[&str]) -> Result<Plan, PlanError> {
        plan_stdin(args, b"")
    }

    fn plan_stdin(args: &[&str], stdin: &[u8]) -> Result<Plan, PlanError> {
        let cli = crate::cli::Cli::try_parse_from(["idemproxy", "call"].iter().chain(args)).unwrap();
        let crate::cli::Command::Call(a) = cli.command else {
            unreachable!()
        };
        Plan::from_args(&a, stdin)
    }

    #[test]
    fn method_follows_curl() {
        assert_eq!(plan(&["http://h/x"]).unwrap().method, Method::GET);
        assert_eq!(plan(&["http://h/x", "-d", "a=1"]).unwrap().method, Method::POST);
        assert_eq!(plan(&["-X", "patch", "http://h/x"]).unwrap().method, Method::PATCH);
    }

    #[test]
    fn safe_methods_carry_no_key() {
        assert_eq!(plan(&["http://h/x", "--idempotency-key", "k"]).unwrap().key, None);
        let p = plan(&["http://h/x", "-X", "POST"]).unwrap();
        assert_eq!(p.key.as_ref().map(|k| k.1), Some(Source::Random));
        assert!(p.request().headers().contains_key("idempotency-key"));
    }

    #[test]
    fn a_key_header_counts_as_the_key() {
        let p = plan(&["http://h/x", "-d", "x", "-H", "Idempotency-Key: abc"]).unwrap();
        assert_eq!(p.key, Some(("abc".into(), Source::Explicit)));
        assert_eq!(p.request().headers().get_all("idempotency-key").iter().count(), 1);
        let two = plan(&[
            "http://h/x",
            "-d",
            "x",
            "-H",
            "Idempotency-Key: a",
            "--idempotency-key",
            "b",
        ]);
        assert!(matches!(two, Err(PlanError::TwoKeys)));
    }

    #[test]
    fn derived_keys_cover_the_scope() {
        let a = plan(&["http://h/x", "-d", "{}", "--key-from-inputs"]).unwrap();
        let b = plan(&["http://h/x", "-d", "{}", "--key-from-inputs", "--scope", "s"]).unwrap();
        assert_eq!(a.key.as_ref().unwrap().1, Source::Inputs);
        assert_ne!(a.key, b.key);
        assert_eq!(
            a.key,
            plan(&["http://h/x", "-d", "{}", "--key-from-inputs"]).unwrap().key
        );
    }

    #[test]
    fn content_type_defaults_by_body() {
        let ct = |p: Plan| p.headers.get(CONTENT_TYPE).unwrap().to_str().unwrap().to_owned();
        assert_eq!(
            ct(plan(&["http://h/x", "-d", r#"{"a":1}"#]).unwrap()),
            "application/json"
        );
        assert_eq!(
            ct(plan(&["http://h/x", "-d", "a=1"]).unwrap()),
            "application/x-www-form-urlencoded"
        );
        assert_eq!(
            ct(plan(&["http://h/x", "-d", "a", "-H", "content-type: text/plain"]).unwrap()),
            "text/plain"
        );
    }

    #[test]
    fn data_comes_from_files_and_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("body.json");
        std::fs::write(&file, b"{\"n\":1}\n").unwrap();
        let p = plan(&["http://h/x", "-d", &format!("@{}", file.display())]).unwrap();
        assert_eq!(&p.body[..], b"{\"n\":1}\n");
        assert_eq!(
            &plan_stdin(&["http://h/x", "-d", "@-"], b"piped").unwrap().body[..],
            b"piped"
        );
        assert!(matches!(
            plan(&["http://h/x", "-d", "@/nonexistent/x"]),
            Err(PlanError::Data(..))
        ));
    }

    #[test]
    fn bad_command_lines_are_refused() {
        assert!(matches!(plan(&["ftp://h/x"]), Err(PlanError::Url(..))));
        assert!(matches!(plan(&["/x"]), Err(PlanError::Url(..))));
        assert!(matches!(
            plan(&["http://h/x", "-H", "nocolon"]),
            Err(PlanError::Header(_))
        ));
        assert!(matches!(
            plan(&["http://h/x", "-d", "x", "--idempotency-key", "a b"]),
            Err(PlanError::Key(_))
        ));
        assert!(matches!(
            plan(&["http://h/x", "-d", "x", "--dry-run"]),
            Err(PlanError::DryRunNeedsKey)
        ));
    }
}
