//! The in-memory backend: records in a sharded map, lost on restart. For
//! tests, development and coalesce-only deployments that need no durability.
//!
//! Each operation holds one shard's lock for a few hundred nanoseconds and
//! never across an `.await`, so there is no global lock per request.

use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::record::{self, Claim, ClaimRequest, Finish, Record, Token};
use super::{RecordKey, StoreError};

#[derive(Clone, Default)]
pub struct MemoryStore {
    map: Arc<DashMap<RecordKey, Record>>,
}

impl MemoryStore {
    pub fn claim(&self, key: &RecordKey, req: &ClaimRequest, instance: u64) -> Claim {
        match self.map.entry(key.clone()) {
            Entry::Occupied(mut e) => {
                let (claim, update) = record::claim(Some(e.get()), req, instance);
                match update {
                    Some(Some(r)) => {
                        e.insert(r);
                    }
                    Some(None) => {
                        e.remove();
                    }
                    None => {}
                }
                claim
            }
            Entry::Vacant(e) => {
                let (claim, update) = record::claim(None, req, instance);
                if let Some(Some(r)) = update {
                    e.insert(r);
                }
                claim
            }
        }
    }

    pub fn finish(&self, key: &RecordKey, token: Token, how: &Finish) -> Result<(), StoreError> {
        let now = super::now_ms();
        match self.map.entry(key.clone()) {
            Entry::Occupied(mut e) => match record::finish(Some(e.get()), token, how, now)? {
                Some(r) => {
                    e.insert(r);
                }
                None => {
                    e.remove();
                }
            },
            Entry::Vacant(_) => return Err(record::NotOwner.into()),
        }
        Ok(())
    }

    pub fn get(&self, key: &RecordKey) -> Option<Record> {
        self.map.get(key).map(|r| r.clone())
    }

    /// True if there was a record that had not expired yet (as `get` sees it).
    pub fn delete(&self, key: &RecordKey) -> bool {
        let now = super::now_ms();
        self.map.remove(key).is_some_and(|(_, r)| r.gone_at() > now)
    }

    pub fn sweep(&self, now: u64) -> u64 {
        let before = self.map.len();
        self.map.retain(|_, r| r.gone_at() > now);
        // Expired responses with a tombstone shrink to the tombstone.
        self.map.alter_all(|_, r| match &r {
            Record::Completed(c) if now >= c.expires_at => Record::Expired(record::Tombstone {
                fingerprint: c.fingerprint,
                completed_at: c.stored_at,
                until: c.tombstone_until,
            }),
            _ => r,
        });
        (before.saturating_sub(self.map.len())) as u64
    }
}
