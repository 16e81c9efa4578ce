//! The record of one tenant + key and its state machine.
//!
//! ```text
//!            claim                 finish(Store)
//!   (none) ────────► InFlight ─────────────────► Completed ──ttl──► Expired (tombstone) ──► (none)
//!      ▲                │  finish(Release)                │ ttl, no tombstone
//!      └────────────────┤◄────────────────────────────────┘
//!                       │ finish(Lost) / owner crashed
//!                       ▼
//!                     Lost ──(on_lost_outcome = retry, after retry_at)──► InFlight
//! ```
//!
//! The transitions are pure functions over `Option<&Record>` so that the
//! memory and sled backends apply exactly the same rules (each with its own
//! atomic compare-and-swap), and so a property test can check them against a
//! model. The Redis backend implements the same rules in its Lua scripts.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// SHA-256 of method, path + query and body.
pub type Fingerprint = [u8; 32];

/// Identifies one claim: the owning process instance plus a counter. Only the
/// holder of the current token may finish an in-flight record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Token {
    pub instance: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    InFlight(InFlight),
    Completed(Arc<Completed>),
    Lost(Lost),
    /// The response has expired; only the fact that it completed is kept.
    Expired(Tombstone),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub token: Token,
    pub fingerprint: Option<Fingerprint>,
    pub started_at: u64,
    pub expires_at: u64,
    /// When a crashed owner's key may be retried (`on_lost_outcome = retry`).
    pub retry_at: u64,
}

/// A completed response. `replayable = false` keeps only the fact (body too
/// large); `body` and `headers` are then empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completed {
    pub fingerprint: Option<Fingerprint>,
    pub status: u16,
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
    pub replayable: bool,
    pub stored_at: u64,
    pub expires_at: u64,
    /// 0 = no tombstone; else the tombstone lasts until then.
    pub tombstone_until: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    pub fingerprint: Option<Fingerprint>,
    pub started_at: u64,
    pub expires_at: u64,
    pub retry_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub fingerprint: Option<Fingerprint>,
    pub completed_at: u64,
    pub until: u64,
}

impl Record {
    /// When the store may forget this record entirely.
    pub fn gone_at(&self) -> u64 {
        match self {
            Record::InFlight(r) => r.expires_at,
            Record::Completed(c) => c.expires_at.max(c.tombstone_until),
            Record::Lost(r) => r.expires_at,
            Record::Expired(t) => t.until,
        }
    }

    /// The record as it stands at `now`: `None` once gone, a tombstone once
    /// the response expired, `Lost` for an in-flight record of a dead process.
    pub fn at(&self, now: u64, live_instance: u64) -> Option<Record> {
        if now >= self.gone_at() {
            return None;
        }
        Some(match self {
            Record::Completed(c) if now >= c.expires_at => Record::Expired(Tombstone {
                fingerprint: c.fingerprint,
                completed_at: c.stored_at,
                until: c.tombstone_until,
            }),
            Record::InFlight(f) if f.token.instance != live_instance => Record::Lost(Lost {
                fingerprint: f.fingerprint,
                started_at: f.started_at,
                expires_at: f.expires_at,
                retry_at: f.retry_at,
            }),
            other => other.clone(),
        })
    }

    pub fn fingerprint(&self) -> Option<&Fingerprint> {
        match self {
            Record::InFlight(r) => r.fingerprint.as_ref(),
            Record::Completed(c) => c.fingerprint.as_ref(),
            Record::Lost(r) => r.fingerprint.as_ref(),
            Record::Expired(t) => t.fingerprint.as_ref(),
        }
    }

    /// When a sweeper should next look at this record: when the response
    /// expires if a tombstone outlives it, else when the record is gone.
    pub fn sweep_due(&self) -> u64 {
        match self {
            Record::Completed(c) if c.tombstone_until > c.expires_at => c.expires_at,
            other => other.gone_at(),
        }
    }

    /// Serialized form: a format byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        postcard::to_io(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// The embedded store's form: [`Record::sweep_due`] in a fixed 8-byte
    /// header before the postcard body, so a sweep reads when a record is
    /// due without decoding it, and needs no second index tree.
    pub fn encode_stamped(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(FORMAT_STAMPED);
        out.extend_from_slice(&self.sweep_due().to_be_bytes());
        postcard::to_io(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// The sweep due time of a stamped record, read from its header; `None`
    /// for another format (decode it instead).
    pub fn stamped_due(bytes: &[u8]) -> Option<u64> {
        match bytes {
            [FORMAT_STAMPED, due @ ..] if due.len() >= 8 => Some(u64::from_be_bytes(due[..8].try_into().ok()?)),
            _ => None,
        }
    }

    /// Reads either form.
    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        let body = match bytes.split_first() {
            Some((&FORMAT, rest)) => rest,
            Some((&FORMAT_STAMPED, rest)) if rest.len() >= 8 => &rest[8..],
            Some((v, _)) => return Err(DecodeError(format!("unknown record format {v}"))),
            None => return Err(DecodeError("empty record".into())),
        };
        let record: Record = postcard::from_bytes(body).map_err(|e| DecodeError(e.to_string()))?;
        // A record that decodes but could never have been written is as
        // corrupt as one that does not decode: replaying it would answer
        // something the upstream never said.
        if let Record::Completed(c) = &record {
            if !(100..=999).contains(&c.status) {
                return Err(DecodeError(format!("status {} is not an HTTP status", c.status)));
            }
        }
        Ok(record)
    }
}

const FORMAT: u8 = 1;
const FORMAT_STAMPED: u8 = 2;

#[derive(Debug, thiserror::Error)]
#[error("corrupt record: {0}")]
pub struct DecodeError(String);

/// What a claim asks for.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub token: Token,
    /// `None` when the route does not fingerprint.
    pub fingerprint: Option<Fingerprint>,
    pub now: u64,
    /// In-flight record lifetime (the route's ttl, at least the upstream timeout).
    pub inflight_ttl: u64,
    /// `on_lost_outcome = "retry"`: a lost record past its `retry_at` may be taken over.
    pub lost_retry: bool,
    /// How long after `started_at` a crashed owner's key may be retried.
    pub retry_delay: u64,
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller owns the key now and must finish it.
    Acquired,
    /// Another owner is executing it.
    InFlight {
        started_at: u64,
    },
    Completed(Arc<Completed>),
    Lost(Lost),
    Expired(Tombstone),
    /// Same key, different request.
    Mismatch,
}

/// How the owner finishes its claim.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Keep the response for replay (or the fact of it, if not replayable).
    Store(Arc<Completed>),
    /// Forget the key: the next request executes again.
    Release,
    /// The outcome is unknown (`on_lost_outcome = "reject"`).
    Lost,
}

/// A store update: the value to put (or `None` to delete).
pub type Update = Option<Record>;

/// The claim transition. `Some(update)` means the store must atomically
/// replace `existing` with `update`.
pub fn claim(existing: Option<&Record>, req: &ClaimRequest, live_instance: u64) -> (Claim, Option<Update>) {
    let take = || {
        let r = Record::InFlight(InFlight {
            token: req.token,
            fingerprint: req.fingerprint,
            started_at: req.now,
            expires_at: req.now + req.inflight_ttl,
            retry_at: req.now + req.retry_delay,
        });
        (Claim::Acquired, Some(Some(r)))
    };
    let Some(current) = existing.and_then(|r| r.at(req.now, live_instance)) else {
        return take();
    };
    if let (Some(want), Some(have)) = (req.fingerprint.as_ref(), current.fingerprint()) {
        if want != have {
            return (Claim::Mismatch, None);
        }
    }
    match current {
        Record::InFlight(f) => (
            Claim::InFlight {
                started_at: f.started_at,
            },
            None,
        ),
        Record::Completed(c) => (Claim::Completed(c), None),
        Record::Expired(t) => (Claim::Expired(t), None),
        Record::Lost(l) if req.lost_retry && req.now >= l.retry_at => take(),
        Record::Lost(l) => {
            // Persist the crash verdict so every later reader agrees.
            let persist = matches!(existing, Some(Record::InFlight(_))).then(|| Some(Record::Lost(l.clone())));
            (Claim::Lost(l), persist)
        }
    }
}

/// The finish transition; `Err` when `token` no longer owns the key.
pub fn finish(existing: Option<&Record>, token: Token, how: &Finish, now: u64) -> Result<Update, NotOwner> {
    match existing {
        Some(Record::InFlight(f)) if f.token == token => Ok(match how {
            Finish::Store(c) if c.expires_at.max(c.tombstone_until) > now => Some(Record::Completed(c.clone())),
            Finish::Store(_) | Finish::Release => None,
            Finish::Lost => Some(Record::Lost(Lost {
                fingerprint: f.fingerprint,
                started_at: f.started_at,
                expires_at: f.expires_at,
                retry_at: f.retry_at,
            })),
        }),
        _ => Err(NotOwner),
    }
}

/// The key is no longer owned by this token (expired, deleted or taken over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the claim is no longer held by this owner")]
pub struct NotOwner;

#[cfg(test)]
mod tests;
