//! The one-tree layout, and stores written by earlier versions.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::store::record::Completed;

fn completed(stored_at: u64, ttl: u64) -> Record {
    Record::Completed(Arc::new(Completed {
        fingerprint: None,
        status: 201,
        headers: vec![],
        body: Bytes::from_static(b"done"),
        replayable: true,
        stored_at,
        expires_at: stored_at + ttl,
        tombstone_until: 0,
    }))
}

#[tokio::test]
async fn an_earlier_stores_records_are_read_and_swept_and_its_index_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let now = crate::store::now_ms();
    let (old, live) = (RecordKey::new("t", "old"), RecordKey::new("t", "live"));
    {
        let db = sled::open(dir.path()).unwrap();
        let records = db.open_tree("records").unwrap();
        records
            .insert(old.as_bytes(), completed(now - 10_000, 1_000).encode())
            .unwrap();
        records
            .insert(live.as_bytes(), completed(now, 60_000).encode())
            .unwrap();
        let index = db.open_tree(LEGACY_INDEX).unwrap();
        index.insert(b"anything", &[]).unwrap();
        db.flush().unwrap();
    }
    let store = SledStore::open(dir.path(), SyncMode::Always, 1 << 20).await.unwrap();
    let h = store.readable().unwrap();
    assert!(
        !h.db.tree_names().iter().any(|n| n == LEGACY_INDEX),
        "the old index tree is gone"
    );
    assert_eq!(store.sweep(now).await.unwrap(), 1, "the expired plain record is swept");
    assert!(store.get(&old).await.unwrap().is_none());
    assert_eq!(store.get(&live).await.unwrap(), Some(completed(now, 60_000)));
}

#[tokio::test]
async fn records_are_written_stamped_with_their_sweep_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), SyncMode::Interval, 1 << 20).await.unwrap();
    let key = RecordKey::new("t", "k");
    let now = crate::store::now_ms();
    let req = ClaimRequest {
        token: Token { instance: 1, seq: 1 },
        fingerprint: None,
        now,
        inflight_ttl: 5_000,
        lost_retry: false,
        retry_delay: 1_000,
    };
    assert_eq!(store.claim(&key, &req, 1).await.unwrap(), Claim::Acquired);
    let raw = store.readable().unwrap().records.get(key.as_bytes()).unwrap().unwrap();
    assert_eq!(Record::stamped_due(&raw), Some(now + 5_000));
    assert_eq!(store.sweep(now + 4_999).await.unwrap(), 0);
    assert_eq!(store.sweep(now + 5_000).await.unwrap(), 1, "gone once due");
}
