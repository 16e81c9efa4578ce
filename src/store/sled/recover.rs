//! A full (or failing) disk, and getting back from it without a restart.
//!
//! sled 0.34 keeps the first I/O error forever: once a write to its log
//! fails, every later write fails too, even after space was freed. So the
//! failed database is replaced, not retried:
//!
//! 1. Any write or flush error marks the [`Handle`] failed. From then on it
//!    takes no writes (claims of new keys get 503, nothing is forwarded),
//!    while reads still work (stored responses keep replaying).
//! 2. A recovery task probes the disk from the blocking pool (a file of
//!    [`PROBE_BYTES`] written, synced and removed) with a growing pause.
//! 3. When a probe succeeds it reopens: the handle is taken out of service,
//!    every operation still holding it ends (writers hold it until their
//!    flush returns, so none is left half-done), the values the failed
//!    database held in memory but maybe not on disk are copied out, the
//!    database is dropped and opened again (sled's crash recovery runs), the
//!    copied values are written and flushed, and only then is the new handle
//!    swapped in.
//! 4. Finishes that could not be made durable (the leader's client already
//!    has its response) are redone on the new handle with their token, so
//!    the stored response survives and no retry executes the key again.
//!    Until then their keys are *unsettled*: a retry gets 503, never a second
//!    execution and never a response that is not durable.
//!
//! Which values to copy: with `sync = "always"` every write waits for its
//! flush, and one that fails leaves a redo (a claim is released, a
//! completion stored), so the disk plus the redos are the whole state. With
//! `sync = "interval"` writes do not wait, so [`Dirty`] remembers the keys
//! written since the last successful flush; their in-memory values are
//! copied over. Keys claimed before the failure therefore stay claimed by
//! their running owner across the reopen, whatever the sync mode.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;

use super::{Handle, Inner, SledStore, FLUSH_INTERVAL};
use crate::store::record::{Finish, Token};
use crate::store::{RecordKey, StoreError};

/// Bytes the recovery probe writes: two of sled's log segments.
pub const PROBE_BYTES: usize = 1024 * 1024;
const PROBE_FILE: &str = "recovery-probe";
const FIRST_PAUSE: Duration = Duration::from_millis(200);
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// A finish to redo once the store can write again.
pub(super) struct Redo {
    key: RecordKey,
    token: Token,
    how: Finish,
}

/// Keys written since the last successful flush (`sync = "interval"`), in
/// two generations: a flush closes the current one and clears it once the
/// flush succeeded. A write marks its key after writing, so a key missing
/// from both generations was covered by a successful flush.
#[derive(Default)]
pub(super) struct Dirty {
    epoch: AtomicU64,
    sets: [DashMap<RecordKey, ()>; 2],
}

impl Dirty {
    pub(super) fn mark(&self, key: &RecordKey) {
        let epoch = self.epoch.load(Ordering::SeqCst);
        self.sets[(epoch & 1) as usize].insert(key.clone(), ());
    }

    /// Starts a new generation; returns the one a flush starting now covers.
    fn close(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::SeqCst)
    }

    fn flushed(&self, epoch: u64) {
        self.sets[(epoch & 1) as usize].clear();
    }

    fn take(&self) -> Vec<RecordKey> {
        let mut keys = Vec::new();
        for set in &self.sets {
            keys.extend(set.iter().map(|e| e.key().clone()));
            set.clear();
        }
        keys
    }
}

/// Marks `h` failed and starts its recovery (once per handle).
pub(super) fn mark_failed(store: &SledStore, h: &Arc<Handle>) {
    if !h.failed.swap(true, Ordering::AcqRel) {
        tracing::error!("the store failed to write; refusing new keys until it can write again");
    }
    if !h.recovering.swap(true, Ordering::AcqRel) {
        let store = store.clone();
        store.inner.runtime.clone().spawn(recover(store));
    }
}

/// Keeps a finish (or a claim's release) that could not be made durable, to
/// redo it after recovery; its key stays unsettled until then.
pub(super) fn defer(store: &SledStore, failed: Option<&Arc<Handle>>, key: &RecordKey, token: Token, how: Finish) {
    let inner = &store.inner;
    inner.unsettled.insert(key.clone(), ());
    inner.redo.lock().unwrap().push(Redo {
        key: key.clone(),
        token,
        how,
    });
    match failed {
        Some(h) => mark_failed(store, h),
        // No handle was at hand: if the store recovered meanwhile, the
        // recovery may have redone its list already; redo this one now.
        None => {
            if store.writable().is_ok() {
                let store = store.clone();
                inner.runtime.spawn(async move { redo(&store).await });
            }
        }
    }
}

async fn recover(store: SledStore) {
    let mut pause = FIRST_PAUSE;
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LONGEST_PAUSE);
        let path = store.inner.path.clone();
        match tokio::task::spawn_blocking(move || probe_disk(&path)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "the store's disk still refuses writes");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the store's disk probe did not run");
                continue;
            }
        }
        match reopen(&store).await {
            Ok(()) => {
                tracing::info!("the store was reopened and takes writes again");
                redo(&store).await;
                return;
            }
            Err(e) => tracing::warn!(error = %e, "reopening the store failed; will try again"),
        }
    }
}

/// Writes, syncs and removes a probe file in the store's directory.
fn probe_disk(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(PROBE_FILE);
    let written = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    });
    let removed = std::fs::remove_file(&path);
    written.and(removed)
}

/// Replaces the failed handle by a freshly opened database holding every
/// value the failed one held. Errors leave the store failed (or without a
/// handle) for the next attempt; copied values are kept until written.
async fn reopen(store: &SledStore) -> Result<(), String> {
    let inner = &store.inner;
    if let Some(old) = inner.current.swap(None) {
        // Operations holding the old handle end soon: it refuses writes and
        // its flushes fail at once. The last one must not drop it on the
        // runtime (dropping a database joins sled's threads).
        let mut waited = 0u32;
        while Arc::strong_count(&old) > 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            waited += 1;
            if waited.is_multiple_of(2500) {
                tracing::warn!("still waiting for operations on the failed store to end");
            }
        }
        if let Some(dirty) = &inner.dirty {
            let keys = dirty.take();
            let mut copied = Vec::with_capacity(keys.len());
            for key in keys {
                match old.records.get(key.as_bytes()) {
                    Ok(v) => copied.push((key, v)),
                    Err(e) => {
                        // Keep what we know and the old handle, try later.
                        copied.into_iter().for_each(|(k, _)| dirty.mark(&k));
                        dirty.mark(&key);
                        inner.current.store(Some(old));
                        return Err(format!("cannot read the failed store: {e}"));
                    }
                }
            }
            inner.carried.lock().unwrap().extend(copied);
        }
        tokio::task::spawn_blocking(move || drop(old))
            .await
            .map_err(|e| e.to_string())?;
    }
    let (path, cache) = (inner.path.clone(), inner.cache_capacity);
    let carried = inner.carried.lock().unwrap().clone();
    let applied = carried.len();
    let opened = tokio::task::spawn_blocking(move || {
        let h = Handle::open(&path, cache)?;
        let copied = write_carried(&h, &carried).and_then(|()| h.db.flush().map(drop));
        Ok::<_, sled::Error>((h, copied))
    })
    .await
    .map_err(|e| e.to_string())?;
    let (h, copied) = opened.map_err(|e| format!("cannot open the store: {e}"))?;
    let h = Arc::new(h);
    if let Err(e) = copied {
        // Readable, not writable: serve replays meanwhile; this task goes on.
        h.failed.store(true, Ordering::Release);
        h.recovering.store(true, Ordering::Release);
        inner.current.store(Some(h));
        return Err(format!("cannot write to the reopened store: {e}"));
    }
    inner.carried.lock().unwrap().drain(..applied);
    inner.current.store(Some(h));
    Ok(())
}

fn write_carried(h: &Handle, carried: &[(RecordKey, Option<sled::IVec>)]) -> Result<(), sled::Error> {
    for (key, value) in carried {
        match value {
            Some(v) => {
                h.records.insert(key.as_bytes(), v.clone())?;
            }
            None => {
                h.records.remove(key.as_bytes())?;
            }
        }
    }
    Ok(())
}

/// Redoes the deferred finishes on the current handle and settles their
/// keys once durable; on failure they are kept for the next recovery.
async fn redo(store: &SledStore) {
    let inner = &store.inner;
    let list = std::mem::take(&mut *inner.redo.lock().unwrap());
    if list.is_empty() {
        return;
    }
    let keep = |list: Vec<Redo>| inner.redo.lock().unwrap().extend(list);
    let Ok(h) = store.writable() else {
        return keep(list);
    };
    for r in &list {
        match store.finish_on(&h, &r.key, r.token, &r.how) {
            // Already finished (or replaced): nothing left to redo.
            Ok(()) | Err(StoreError::NotOwner(_) | StoreError::Corrupt(_)) => {}
            Err(_) => return keep(list),
        }
    }
    if store.flush_handle(h).await.is_err() {
        return keep(list);
    }
    for r in &list {
        inner.unsettled.remove(&r.key);
    }
    tracing::info!(
        count = list.len(),
        "finishes deferred by the store failure are now durable"
    );
}

/// `sync = "interval"`: flushes every [`FLUSH_INTERVAL`], tracking which
/// keys each flush made durable; a failed flush starts the recovery.
pub(super) fn spawn_interval_flusher(inner: Weak<Inner>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            let Some(h) = inner.current.load_full() else { continue };
            if h.is_failed() {
                continue;
            }
            let dirty = inner.dirty.as_ref().expect("interval mode tracks written keys");
            let epoch = dirty.close();
            let db = h.db.clone();
            match tokio::task::spawn_blocking(move || db.flush()).await {
                Ok(Ok(_)) => dirty.flushed(epoch),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "store flush failed");
                    mark_failed(&SledStore { inner: inner.clone() }, &h);
                }
                Err(e) => tracing::warn!(error = %e, "store flush did not run"),
            }
        }
    });
}
