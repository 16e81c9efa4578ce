//! The embedded backend: sled, one directory per process.
//!
//! One tree, `records` (record key → [`Record::encode_stamped`]). Each value
//! starts with the time the sweeper is due to look at it, so a sweep is one
//! pass over the tree that decodes only what is due, and there is no second
//! index tree to keep in step: one write per state change instead of two,
//! which is half of what sled's log has to absorb and clean under churn
//! (BENCHMARKS.md, "Storage under churn"). Stores written by earlier versions
//! had an `expiry` index tree; it is dropped at open, their records are
//! swept by the same pass.
//!
//! Point operations (get, compare-and-swap) run inline: they touch sled's
//! page cache and do not fsync. Everything that may fsync or scan, the
//! flush and the sweep, runs on the blocking pool.
//!
//! **Durable before visible** (`sync = "always"`). A completion is written to
//! sled's in-memory tree first and made durable by the next group-commit
//! flush; in between, a crash would lose it. So the key is *unsettled* from
//! just before the write until its flush returns, and every reader checks
//! that after reading: the replay fast path treats an unsettled key as a
//! miss (the retry then joins the leader's flight and gets the answer once it
//! is durable), and the records API and the status endpoint wait for a flush
//! of their own before they answer.
//!
//! **A failing disk** is the business of [`recover`]: the open database sits
//! behind a swappable [`Handle`], and a handle that failed to write is
//! replaced by a freshly opened one once the disk takes writes again.

mod recover;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use dashmap::DashMap;

use super::commit::GroupCommit;
use super::record::{self, Claim, ClaimRequest, Finish, Record, Token};
use super::{RecordKey, StoreError};
use crate::config::SyncMode;

/// Background flush period with `sync = "interval"`: the most a crash can lose.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// TEST ONLY: milliseconds to wait before every group-commit flush, to widen
/// the window between a write and its durability in the durability tests.
/// Never set it in production: every keyed request would wait that long.
pub const TEST_FLUSH_DELAY_ENV: &str = "IDEMPROXY_TEST_FLUSH_DELAY_MS";

const PROBE_KEY: &[u8] = b"\xffprobe";
/// The expiry index tree of earlier versions.
const LEGACY_INDEX: &[u8] = b"expiry";

/// The sled store. Cheap to clone.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    cache_capacity: u64,
    /// The open database; `None` only while it is being reopened.
    current: ArcSwapOption<Handle>,
    /// `sync = "always"`: the group commit every write waits for.
    commit: Option<Arc<GroupCommit>>,
    /// Keys whose in-memory state is not known to be durable: a completion
    /// waiting for its flush, or one whose flush failed (see `recover`).
    unsettled: DashMap<RecordKey, ()>,
    /// `sync = "interval"`: keys written since the last successful flush.
    dirty: Option<recover::Dirty>,
    /// Finishes that could not be made durable, redone after recovery.
    redo: Mutex<Vec<recover::Redo>>,
    /// Values the failed database held in memory but maybe not on disk.
    carried: Mutex<Vec<(RecordKey, Option<sled::IVec>)>>,
    runtime: tokio::runtime::Handle,
}

/// One open database. Replaced as a whole when it fails (see `recover`).
struct Handle {
    db: sled::Db,
    records: sled::Tree,
    /// A write failed: refuse writes, reads still work.
    failed: AtomicBool,
    /// A recovery task owns this handle's replacement.
    recovering: AtomicBool,
}

impl Handle {
    /// Opens (and recovers) the database at `path`; blocking.
    fn open(path: &Path, cache_capacity: u64) -> Result<Handle, sled::Error> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity)
            // Flushes are ours (group commit or the interval flusher), so a
            // failed one is noticed and the written keys are known.
            .flush_every_ms(None)
            .open()?;
        let records = db.open_tree("records")?;
        if db.tree_names().iter().any(|n| n == LEGACY_INDEX) {
            db.drop_tree(LEGACY_INDEX)?;
        }
        Ok(Handle {
            db,
            records,
            failed: AtomicBool::new(false),
            recovering: AtomicBool::new(false),
        })
    }

    fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

fn decode(v: &[u8]) -> Result<Record, StoreError> {
    Record::decode(v).map_err(|e| StoreError::Corrupt(Arc::new(e)))
}

fn refused() -> StoreError {
    StoreError::Io("the store failed to write and is recovering; nothing is written until it can write again".into())
}

fn reopening() -> StoreError {
    StoreError::Io("the store is being reopened".into())
}

fn joined(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io(e.to_string())
}

impl SledStore {
    pub async fn open(path: &Path, sync: SyncMode, cache_capacity: u64) -> Result<SledStore, StoreError> {
        let dir = path.to_path_buf();
        let handle = tokio::task::spawn_blocking(move || Handle::open(&dir, cache_capacity))
            .await
            .map_err(joined)?
            .map_err(|e| StoreError::Io(format!("cannot open sled store: {e}")))?;
        let flush_delay = test_flush_delay();
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| Inner {
            path: path.to_path_buf(),
            cache_capacity,
            current: ArcSwapOption::from_pointee(handle),
            commit: (sync == SyncMode::Always).then(|| {
                let weak = weak.clone();
                GroupCommit::start(move || group_flush(&weak, flush_delay))
            }),
            unsettled: DashMap::new(),
            dirty: (sync == SyncMode::Interval).then(recover::Dirty::default),
            redo: Mutex::new(Vec::new()),
            carried: Mutex::new(Vec::new()),
            runtime: tokio::runtime::Handle::current(),
        });
        if sync == SyncMode::Interval {
            recover::spawn_interval_flusher(Arc::downgrade(&inner));
        }
        Ok(SledStore { inner })
    }

    /// The open database, failed or not (reads still work on a failed one).
    fn readable(&self) -> Result<Arc<Handle>, StoreError> {
        self.inner.current.load_full().ok_or_else(reopening)
    }

    /// The open database if it takes writes.
    fn writable(&self) -> Result<Arc<Handle>, StoreError> {
        let h = self.readable()?;
        if h.is_failed() {
            return Err(refused());
        }
        Ok(h)
    }

    /// Marks `h` failed (starting its recovery) and converts the error.
    fn fail(&self, h: &Arc<Handle>, e: sled::Error) -> StoreError {
        recover::mark_failed(self, h);
        StoreError::Io(e.to_string())
    }

    fn is_unsettled(&self, key: &RecordKey) -> bool {
        self.inner.unsettled.contains_key(key)
    }

    /// Waits until everything written to `h` so far is durable. The caller
    /// keeps `h` until this returns, so a reopen never replaces a database
    /// whose writes are still waiting for their flush.
    async fn sync(&self, h: &Arc<Handle>) -> Result<(), StoreError> {
        match &self.inner.commit {
            Some(c) => c.sync().await.inspect_err(|_| recover::mark_failed(self, h)),
            None => Ok(()),
        }
    }

    /// Writes `update` over `current` atomically; false if `current` changed.
    fn swap(
        &self,
        h: &Arc<Handle>,
        key: &RecordKey,
        current: Option<sled::IVec>,
        update: &Option<Record>,
    ) -> Result<bool, StoreError> {
        let new = update.as_ref().map(Record::encode_stamped);
        match h.records.compare_and_swap(key.as_bytes(), current, new) {
            Err(e) => Err(self.fail(h, e)),
            Ok(Err(_)) => Ok(false),
            Ok(Ok(())) => {
                if let Some(d) = &self.inner.dirty {
                    d.mark(key);
                }
                Ok(true)
            }
        }
    }

    pub async fn claim(&self, key: &RecordKey, req: &ClaimRequest, instance: u64) -> Result<Claim, StoreError> {
        // Only a finish that could not be made durable leaves a key unsettled
        // once its flight is over: its outcome is not decided until recovery.
        if self.is_unsettled(key) {
            return Err(refused());
        }
        let h = self.readable()?;
        let claim = loop {
            let current = h.records.get(key.as_bytes()).map_err(|e| self.fail(&h, e))?;
            let existing = current.as_deref().map(decode).transpose()?;
            let (claim, update) = record::claim(existing.as_ref(), req, instance);
            match update {
                None => break claim,
                // A failed store still answers what needs no write (a replay).
                Some(_) if h.is_failed() => return Err(refused()),
                Some(update) => {
                    if self.swap(&h, key, current, &update)? {
                        break claim;
                    }
                }
            }
        };
        if claim == Claim::Acquired {
            if let Err(e) = self.sync(&h).await {
                // Nothing will be forwarded: the claim is taken back once the
                // store can write again, so the key is not left in flight (and
                // later "lost") for a request that never reached the upstream.
                recover::defer(self, Some(&h), key, req.token, Finish::Release);
                return Err(e);
            }
        }
        Ok(claim)
    }

    pub async fn finish(&self, key: &RecordKey, token: Token, how: &Finish) -> Result<(), StoreError> {
        let always = self.inner.commit.is_some();
        if always {
            self.inner.unsettled.insert(key.clone(), ());
        }
        let h = match self.writable() {
            Ok(h) => h,
            Err(e) => {
                recover::defer(self, None, key, token, how.clone());
                return Err(e);
            }
        };
        let written = match self.finish_on(&h, key, token, how) {
            Ok(()) => self.sync(&h).await,
            Err(e @ (StoreError::NotOwner(_) | StoreError::Corrupt(_))) => {
                // Nothing was written: there is nothing to settle or redo.
                if always {
                    self.inner.unsettled.remove(key);
                }
                return Err(e);
            }
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => {
                if always {
                    self.inner.unsettled.remove(key);
                }
                Ok(())
            }
            Err(e) => {
                recover::defer(self, Some(&h), key, token, how.clone());
                Err(e)
            }
        }
    }

    /// The token-checked finish transition on `h`, not yet durable.
    fn finish_on(&self, h: &Arc<Handle>, key: &RecordKey, token: Token, how: &Finish) -> Result<(), StoreError> {
        loop {
            let current = h.records.get(key.as_bytes()).map_err(|e| self.fail(h, e))?;
            let existing = current.as_deref().map(decode).transpose()?;
            let update = record::finish(existing.as_ref(), token, how, super::now_ms())?;
            if self.swap(h, key, current, &update)? {
                return Ok(());
            }
        }
    }

    /// A point read for the replay fast path; errors, corrupt records and
    /// records not yet durable read as "nothing" (the claim that follows
    /// reports the first two; the flight answers the last).
    pub fn get_now(&self, key: &RecordKey) -> Option<Record> {
        let guard = self.inner.current.load();
        let bytes = guard.as_ref()?.records.get(key.as_bytes()).ok()??;
        // After the read: a completion is unsettled from before its write
        // until after its flush, so a record seen here and not unsettled
        // now is durable.
        if self.is_unsettled(key) {
            return None;
        }
        Record::decode(&bytes).ok()
    }

    /// The record for the records API and the status endpoint; a record not
    /// yet durable is answered once a flush covers it.
    pub async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let h = self.readable()?;
        let bytes = h.records.get(key.as_bytes()).map_err(|e| self.fail(&h, e))?;
        let record = bytes.as_deref().map(decode).transpose()?;
        if self.is_unsettled(key) {
            if h.is_failed() || self.inner.commit.is_none() {
                // Its flush failed: the outcome is known after recovery.
                return Err(refused());
            }
            self.sync(&h).await?;
        }
        Ok(record)
    }

    /// Deletes the record; true if there was one that had not expired yet
    /// (an expired one awaiting the sweeper is already unknown to `get`). A
    /// record that cannot be decoded counts as existing: deleting it is how
    /// an operator frees its key.
    pub async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
        if self.is_unsettled(key) {
            return Err(refused());
        }
        let h = self.writable()?;
        let removed = h.records.remove(key.as_bytes()).map_err(|e| self.fail(&h, e))?;
        if let Some(d) = &self.inner.dirty {
            d.mark(key);
        }
        self.sync(&h).await?;
        let now = super::now_ms();
        Ok(removed.is_some_and(|v| Record::decode(&v).map_or(true, |r| r.gone_at() > now)))
    }

    pub async fn sweep(&self, now: u64) -> Result<u64, StoreError> {
        let h = self.writable()?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sweep_blocking(&h, now))
            .await
            .map_err(joined)?
    }

    fn sweep_blocking(&self, h: &Arc<Handle>, now: u64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for entry in h.records.iter() {
            let (k, v) = entry.map_err(|e| self.fail(h, e))?;
            let due = Record::stamped_due(&v).or_else(|| Record::decode(&v).ok().map(|r| r.sweep_due()));
            if due.is_none_or(|d| d > now) {
                continue;
            }
            let key = RecordKey::from_bytes(&k);
            if self.is_unsettled(&key) {
                // Settled (or redone) first; a later sweep sees it.
                continue;
            }
            // Re-read and swap: a request may be rewriting this key right now.
            loop {
                let current = h.records.get(key.as_bytes()).map_err(|e| self.fail(h, e))?;
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
                if self.swap(h, &key, current, &update)? {
                    deleted += u64::from(gone);
                    break;
                }
            }
        }
        if deleted > 0 {
            h.db.flush().map_err(|e| self.fail(h, e))?;
        }
        Ok(deleted)
    }

    /// Readiness: false while the store is failed, else a real write.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let h = self.writable()?;
        h.records.insert(PROBE_KEY, &[]).map_err(|e| self.fail(&h, e))?;
        h.records.remove(PROBE_KEY).map_err(|e| self.fail(&h, e))?;
        match &self.inner.commit {
            Some(_) => self.sync(&h).await,
            None => self.flush_handle(h).await,
        }
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        let h = self.writable()?;
        self.flush_handle(h).await
    }

    async fn flush_handle(&self, h: Arc<Handle>) -> Result<(), StoreError> {
        let db = h.db.clone();
        match tokio::task::spawn_blocking(move || db.flush()).await.map_err(joined)? {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(&h, e)),
        }
    }
}

/// The group-commit flush (`sync = "always"`), on the blocking pool.
fn group_flush(inner: &Weak<Inner>, delay: Option<Duration>) -> Result<(), String> {
    let inner = inner.upgrade().ok_or("the store was closed")?;
    let h = inner.current.load_full().ok_or("the store is being reopened")?;
    if h.is_failed() {
        return Err("the store failed to write and is recovering".into());
    }
    if let Some(d) = delay {
        std::thread::sleep(d);
    }
    h.db.flush().map(drop).map_err(|e| {
        recover::mark_failed(&SledStore { inner: inner.clone() }, &h);
        e.to_string()
    })
}

/// See [`TEST_FLUSH_DELAY_ENV`].
fn test_flush_delay() -> Option<Duration> {
    let ms = std::env::var(TEST_FLUSH_DELAY_ENV).ok()?.parse::<u64>().ok()?;
    tracing::warn!(
        delay_ms = ms,
        "{TEST_FLUSH_DELAY_ENV} is set: every store flush is delayed (for tests only)"
    );
    Some(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests;
