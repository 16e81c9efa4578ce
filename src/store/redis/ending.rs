//! What an owner answered when nothing was stored, for the duplicates that
//! other replicas held for its claim (SPEC §5).
//!
//! On one replica a held duplicate simply receives the leader's outcome in
//! process. Across replicas the waiter only sees the record change; when
//! the owner frees the key (a 5xx, a `never_store` status, 502 refused, a
//! coalesce-only route) or marks it lost (the 502/504 of an unknown
//! outcome), the waiter must still answer what the original answered
//! instead of claiming the key and executing it again. So the owner's finish
//! script leaves its ending in Redis, under its claim token, for the waiters
//! that registered while it was in flight; new requests never see it.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::problem::{Code, Problem};

/// An owner's outcome that the store did not keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ending {
    /// The upstream's response, answered to waiters as a replay.
    Response {
        status: u16,
        headers: Vec<(String, Bytes)>,
        body: Bytes,
        /// When the owner received it (Unix ms), for `Age`.
        at: u64,
    },
    /// A problem the proxy answered with (`code`, `detail`).
    Problem { code: String, detail: String },
}

/// Shortest time an ending is kept, whatever the owner's `wait_timeout`:
/// a waiter reads it within milliseconds of being notified.
const MIN_KEEP: Duration = Duration::from_secs(1);

/// The problems an owner can end with, by `code`.
const CODES: [Code; 4] = [
    Code::UpstreamUnavailable,
    Code::UpstreamTimeout,
    Code::ResponseNotReplayable,
    Code::StoreUnavailable,
];

const FORMAT: u8 = 1;

impl Ending {
    pub fn response(status: http::StatusCode, headers: Vec<(String, Bytes)>, body: Bytes, at: u64) -> Ending {
        Ending::Response {
            status: status.as_u16(),
            headers,
            body,
            at,
        }
    }

    pub fn problem(p: &Problem) -> Ending {
        Ending::Problem {
            code: p.code.as_str().to_owned(),
            detail: p.detail.to_string(),
        }
    }

    /// The problem again, or `None` for a response.
    pub fn to_problem(&self) -> Option<Problem> {
        let Ending::Problem { code, detail } = self else {
            return None;
        };
        let code = CODES
            .into_iter()
            .find(|c| c.as_str() == code)
            .unwrap_or(Code::UpstreamUnavailable);
        Some(Problem::new(code, detail.clone()))
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        postcard::to_io(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    pub(super) fn decode(b: &[u8]) -> Option<Ending> {
        match b.split_first() {
            Some((&FORMAT, rest)) => postcard::from_bytes(rest).ok(),
            _ => None,
        }
    }
}

/// How long an ending stays readable for a waiter: the owner's wait_timeout.
pub(super) fn keep_ms(wait_timeout: Duration) -> u64 {
    wait_timeout.max(MIN_KEEP).as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_round_trip() {
        let r = Ending::Response {
            status: 503,
            headers: vec![("x-a".into(), Bytes::from_static(b"1"))],
            body: Bytes::from_static(b"busy"),
            at: 42,
        };
        assert_eq!(Ending::decode(&r.encode()), Some(r));
        let p = Problem::new(Code::UpstreamTimeout, "slow");
        let e = Ending::problem(&p);
        assert_eq!(Ending::decode(&e.encode()).unwrap().to_problem(), Some(p));
        assert_eq!(Ending::decode(b"\x09junk"), None);
    }
}
