//! A response as it is replayed: status, end-to-end headers and body bytes;
//! also the answer of a duplicate that joins a live stream.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AGE, DATE, SET_COOKIE};
use http::{HeaderMap, Response, StatusCode};

use super::recording::{Reader, Recording};
use crate::body::ResponseBody;
use crate::store::Completed;

pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A response ready to be answered any number of times.
#[derive(Debug)]
pub struct Replay {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Unix milliseconds; drives `Age`.
    pub stored_at: u64,
}

impl Replay {
    /// The replayable form of an upstream response: `Date` is regenerated
    /// and `Set-Cookie` belongs to the first client only.
    pub fn new(status: StatusCode, headers: &HeaderMap, body: Bytes, stored_at: u64) -> Replay {
        Replay {
            status,
            headers: replayable(headers),
            body,
            stored_at,
        }
    }

    pub fn from_completed(c: &Completed) -> Replay {
        let mut headers = HeaderMap::with_capacity(c.headers.len());
        for (name, value) in &c.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::try_from(name.as_str()),
                HeaderValue::from_maybe_shared(value.clone()),
            ) {
                headers.append(n, v);
            }
        }
        Replay {
            status: StatusCode::from_u16(c.status).unwrap_or(StatusCode::OK),
            headers,
            body: c.body.clone(),
            stored_at: c.stored_at,
        }
    }

    /// The headers in their stored form.
    pub fn stored_headers(&self) -> Vec<(String, Bytes)> {
        stored_form(&self.headers)
    }

    /// The response for a held duplicate or a retry.
    pub fn response(&self, now_ms: u64) -> Response<ResponseBody> {
        replayed(
            self.status,
            &self.headers,
            ResponseBody::full(self.body.clone()),
            self.stored_at,
            now_ms,
        )
    }
}

/// The response of a duplicate that joins a stream while it runs: the
/// recorded prefix at once, then the rest live.
pub fn joined(recording: &Recording, reader: Reader, now_ms: u64) -> Response<ResponseBody> {
    let body = ResponseBody::Recorded { reader };
    replayed(recording.status, &recording.headers, body, recording.started_at, now_ms)
}

fn replayed(
    status: StatusCode,
    headers: &HeaderMap,
    body: ResponseBody,
    stored_at: u64,
    now_ms: u64,
) -> Response<ResponseBody> {
    let mut res = Response::new(body);
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.clone_from(headers);
    h.insert(IDEMPOTENT_REPLAYED.clone(), HeaderValue::from_static("true"));
    h.insert(AGE, HeaderValue::from(now_ms.saturating_sub(stored_at) / 1000));
    res
}

/// The headers a replay keeps: `Date` is regenerated and `Set-Cookie`
/// belongs to the first client only.
pub fn replayable(headers: &HeaderMap) -> HeaderMap {
    let mut headers = headers.clone();
    headers.remove(DATE);
    headers.remove(SET_COOKIE);
    headers
}

/// Headers in their stored form.
pub fn stored_form(headers: &HeaderMap) -> Vec<(String, Bytes)> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}
