//! The bound on keyed work in progress (`server.max_keyed_requests`,
//! `server.max_keyed_buffer`).
//!
//! A keyed request outlives its connection: the leader's upstream call runs
//! in a detached task, so a client that sends and disconnects (or resets an
//! HTTP/2 stream) at once frees its connection slot while its work goes on.
//! Without a bound, such a client could pile up tasks and buffered bodies
//! until memory runs out. Every keyed request therefore holds an
//! [`Admission`] from before its body is read until its work is done (the
//! detached leader task keeps it), and its buffered body holds its size in
//! bytes. When either bound is reached the request gets 503 `overloaded`
//! at once, with nothing forwarded: waiting would only move the pile-up
//! into the accept queue. Two semaphores, no lock, two atomic operations
//! per keyed request.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::problem::{Code, Problem};

/// Shared by every worker; cheap to clone.
#[derive(Clone, Debug)]
pub struct Limits {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// A keyed request's place in the bound. Dropping it frees the place and
/// the bytes of its body.
#[derive(Debug)]
pub struct Admission {
    _request: OwnedSemaphorePermit,
    body: Option<OwnedSemaphorePermit>,
}

impl Limits {
    pub fn new(max_requests: usize, max_bytes: u64) -> Self {
        let max_bytes = usize::try_from(max_bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Limits {
            requests: Arc::new(Semaphore::new(max_requests.min(Semaphore::MAX_PERMITS))),
            bytes: Arc::new(Semaphore::new(max_bytes)),
        }
    }

    /// A place for one more keyed request, or 503 `overloaded`.
    pub fn admit(&self) -> Result<Admission, Problem> {
        match self.requests.clone().try_acquire_owned() {
            Ok(permit) => Ok(Admission {
                _request: permit,
                body: None,
            }),
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => Err(overloaded(
                "too many keyed requests are in progress (server.max_keyed_requests); retry later",
            )),
        }
    }

    /// Accounts `len` bytes of buffered body to `admission`, or 503.
    pub fn hold_body(&self, admission: &mut Admission, len: usize) -> Result<(), Problem> {
        if len == 0 {
            return Ok(());
        }
        let n = u32::try_from(len).map_err(|_| overloaded("the request body is too large to buffer"))?;
        match self.bytes.clone().try_acquire_many_owned(n) {
            Ok(permit) => {
                admission.body = Some(permit);
                Ok(())
            }
            Err(_) => Err(overloaded(
                "keyed request bodies in progress fill the buffer (server.max_keyed_buffer); retry later",
            )),
        }
    }
}

fn overloaded(detail: &'static str) -> Problem {
    Problem::new(Code::Overloaded, detail).retry_after(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_and_bytes_come_back_when_dropped() {
        let limits = Limits::new(2, 100);
        let mut a = limits.admit().unwrap();
        let b = limits.admit().unwrap();
        assert_eq!(limits.admit().unwrap_err().code, Code::Overloaded);
        limits.hold_body(&mut a, 80).unwrap();
        drop(b);
        let mut c = limits.admit().unwrap();
        assert_eq!(limits.hold_body(&mut c, 21).unwrap_err().code, Code::Overloaded);
        limits.hold_body(&mut c, 20).unwrap();
        drop(a);
        // a's place and its 80 bytes are back; c still holds 20.
        let mut d = limits.admit().unwrap();
        assert!(limits.admit().is_err(), "c and d hold both places");
        assert!(limits.hold_body(&mut d, 81).is_err());
        limits.hold_body(&mut d, 80).unwrap();
    }
}
