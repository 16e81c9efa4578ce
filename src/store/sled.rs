//! The embedded backend: sled, one directory per process.
//!
//! Two trees: `records` (record key → encoded [`Record`]) and `expiry`
//! (big-endian due time ++ record key → nothing), the index the sweeper walks
//! so it never scans live records. Index entries may be stale (a record was
//! rewritten since); the sweeper re-checks the record itself.
//!
//! Point operations (get, compare-and-swap) run inline: they touch sled's
//! page cache and do not fsync. Everything that may fsync or scan, the
//! flush and the sweep, runs on the blocking pool.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::commit::GroupCommit;
use super::record::{self, Claim, ClaimRequest, Finish, Record, Token};
use super::{RecordKey, StoreError};
use crate::config::SyncMode;

/// Background flush period with `sync = "interval"`: the most a crash can lose.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

const PROBE_KEY: &[u8] = b"\xffprobe";

#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    records: sled::Tree,
    expiry: sled::Tree,
    commit: Option<Arc<GroupCommit>>,
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

fn decode(v: &[u8]) -> Result<Record, StoreError> {
    Record::decode(v).map_err(|e| StoreError::Corrupt(Arc::new(e)))
}

impl SledStore {
    pub async fn open(path: &Path, sync: SyncMode, cache_capacity: u64) -> Result<SledStore, StoreError> {
        let path = path.to_path_buf();
        let flush_every = match sync {
            SyncMode::Always => None,
            SyncMode::Interval => Some(FLUSH_INTERVAL.as_millis() as u64),
        };
        let db = tokio::task::spawn_blocking(move || {
            sled::Config::new()
                .path(&path)
                .cache_capacity(cache_capacity)
                .flush_every_ms(flush_every)
                .open()
        })
        .await
        .map_err(|e| StoreError::Io(e.to_string()))?
        .map_err(|e| StoreError::Io(format!("cannot open sled store: {e}")))?;
        let records = db.open_tree("records").map_err(io)?;
        let expiry = db.open_tree("expiry").map_err(io)?;
        let commit = (sync == SyncMode::Always).then(|| {
            let db = db.clone();
            GroupCommit::start(move || db.flush().map(drop).map_err(|e| e.to_string()))
        });
        Ok(SledStore {
            db,
            records,
            expiry,
            commit,
        })
    }

    async fn sync(&self) -> Result<(), StoreError> {
        match &self.commit {
            Some(c) => c.sync().await,
            None => Ok(()),
        }
    }

    /// Writes `update` over `current` atomically; false if `current` changed.
    fn swap(&self, key: &RecordKey, current: Option<sled::IVec>, update: &Option<Record>) -> Result<bool, StoreError> {
        let new = update.as_ref().map(Record::encode);
        match self
            .records
            .compare_and_swap(key.as_bytes(), current, new)
            .map_err(io)?
        {
            Err(_) => Ok(false),
            Ok(()) => {
                if let Some(r) = update {
                    self.index(key, due(r))?;
                }
                Ok(true)
            }
        }
    }

    fn index(&self, key: &RecordKey, at: u64) -> Result<(), StoreError> {
        let mut k = Vec::with_capacity(8 + key.as_bytes().len());
        k.extend_from_slice(&at.to_be_bytes());
        k.extend_from_slice(key.as_bytes());
        self.expiry.insert(k, &[]).map_err(io)?;
        Ok(())
    }

    pub async fn claim(&self, key: &RecordKey, req: &ClaimRequest, instance: u64) -> Result<Claim, StoreError> {
        let claim = loop {
            let current = self.records.get(key.as_bytes()).map_err(io)?;
            let existing = current.as_deref().map(decode).transpose()?;
            let (claim, update) = record::claim(existing.as_ref(), req, instance);
            match update {
                None => break claim,
                Some(update) => {
                    if self.swap(key, current, &update)? {
                        break claim;
                    }
                }
            }
        };
        if claim == Claim::Acquired {
            if let Err(e) = self.sync().await {
                // Nothing will be forwarded: take the claim back, so the key is
                // not left in flight (and later "lost") for a request that
                // never reached the upstream.
                if let Err(undo) = self.finish_unsynced(key, req.token, &Finish::Release) {
                    tracing::error!(error = %undo, "could not release a claim whose flush failed");
                }
                return Err(e);
            }
        }
        Ok(claim)
    }

    pub async fn finish(&self, key: &RecordKey, token: Token, how: &Finish) -> Result<(), StoreError> {
        self.finish_unsynced(key, token, how)?;
        self.sync().await
    }

    fn finish_unsynced(&self, key: &RecordKey, token: Token, how: &Finish) -> Result<(), StoreError> {
        loop {
            let current = self.records.get(key.as_bytes()).map_err(io)?;
            let existing = current.as_deref().map(decode).transpose()?;
            let update = record::finish(existing.as_ref(), token, how, super::now_ms())?;
            if self.swap(key, current, &update)? {
                return Ok(());
            }
        }
    }

    /// A point read for the replay fast path; errors and corrupt records
    /// read as "nothing" and are reported by the claim that follows.
    pub fn get_now(&self, key: &RecordKey) -> Option<Record> {
        let bytes = self.records.get(key.as_bytes()).ok()??;
        Record::decode(&bytes).ok()
    }

    pub async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.records
            .get(key.as_bytes())
            .map_err(io)?
            .as_deref()
            .map(decode)
            .transpose()
    }

    /// Deletes the record; true if there was one that had not expired yet
    /// (an expired one awaiting the sweeper is already unknown to `get`). A
    /// record that cannot be decoded counts as existing: deleting it is how
    /// an operator frees its key.
    pub async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let removed = self.records.remove(key.as_bytes()).map_err(io)?;
        self.sync().await?;
        let now = super::now_ms();
        Ok(removed.is_some_and(|v| Record::decode(&v).map_or(true, |r| r.gone_at() > now)))
    }

    pub async fn sweep(&self, now: u64) -> Result<u64, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sweep_blocking(now))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?
    }

    fn sweep_blocking(&self, now: u64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        let upper = (now + 1).to_be_bytes();
        for entry in self.expiry.range(..&upper[..]) {
            let (ikey, _) = entry.map_err(io)?;
            let key = RecordKey::from_bytes(&ikey[8..]);
            // Re-read and swap: a request may be rewriting this key right now.
            loop {
                let current = self.records.get(key.as_bytes()).map_err(io)?;
                let Some(bytes) = &current else { break };
                let Ok(rec) = Record::decode(bytes) else { break };
                let update = if rec.gone_at() <= now {
                    None
                } else if let Record::Completed(c) = &rec {
                    if now < c.expires_at {
                        break;
                    }
                    Some(Record::Expired(record::Tombstone {
                        fingerprint: c.fingerprint,
                        completed_at: c.stored_at,
                        until: c.tombstone_until,
                    }))
                } else {
                    break;
                };
                let gone = update.is_none();
                if self.swap(&key, current, &update)? {
                    deleted += u64::from(gone);
                    break;
                }
            }
            self.expiry.remove(&ikey).map_err(io)?;
        }
        if deleted > 0 {
            self.db.flush().map_err(io)?;
        }
        Ok(deleted)
    }

    pub async fn probe(&self) -> Result<(), StoreError> {
        self.records.insert(PROBE_KEY, &[]).map_err(io)?;
        self.records.remove(PROBE_KEY).map_err(io)?;
        match &self.commit {
            Some(c) => c.sync().await,
            None => self.flush().await,
        }
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush().map(drop))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?
            .map_err(io)
    }
}

/// When the sweeper should next look at a record.
fn due(r: &Record) -> u64 {
    match r {
        Record::Completed(c) if c.tombstone_until > c.expires_at => c.expires_at,
        other => other.gone_at(),
    }
}
