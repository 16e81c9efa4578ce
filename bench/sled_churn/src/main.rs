//! sled under idemproxy's churn, without HTTP: `RATE` new keys per virtual
//! second for `SECONDS`, each written twice (a ~120-byte claim, then a
//! ~420-byte completion), deleted `TTL` later by a sweep every `SWEEP`
//! seconds, and a flush every 200 virtual ms (`sync = "interval"`). Prints
//! the directory size per live key (`RATE * TTL` keys) every 20 s.
//!
//! `sled_churn LAYOUT SEGMENT_SIZE COMPRESSION`
//! - LAYOUT `one`: one records tree (idemproxy now); `index`: records plus an
//!   expiry index tree (idemproxy before); `buckets`: one tree per 5-second
//!   creation bucket, dropped whole once all of it expired.
//! - SEGMENT_SIZE: sled's `segment_size` in bytes (default 524288).
//! - COMPRESSION `zstd` or `plain`. The synthetic values repeat most of
//!   their bytes, so they compress far better than real responses.
//!
//! The store lives in /dev/shm (tmpfs) so the disk is not what is measured.

use std::collections::VecDeque;
use std::path::Path;

use rand::{Rng, SeedableRng};

const RATE: u64 = 5600;
const SECONDS: u64 = 180;
const TTL: u64 = 20;
const SWEEP: u64 = 5;
const TICKS: u64 = 5;
const BUCKET_MS: u64 = 5000;

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_size(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

fn index_key(due: u64, key: &[u8]) -> Vec<u8> {
    let mut k = due.to_be_bytes().to_vec();
    k.extend_from_slice(key);
    k
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let layout = args.get(1).map_or("one", String::as_str).to_owned();
    let segment: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(512 * 1024);
    let zstd = args.get(3).is_some_and(|s| s == "zstd");
    assert!(["one", "index", "buckets"].contains(&layout.as_str()), "layout: one | index | buckets");
    let dir = Path::new("/dev/shm").join(format!("sled-churn-{layout}-{segment}-{zstd}-{}", std::process::id()));
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(64 << 20)
        .segment_size(segment)
        .use_compression(zstd)
        .flush_every_ms(None)
        .open()
        .unwrap();
    let records = db.open_tree("records").unwrap();
    let expiry = db.open_tree("expiry").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut live: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut buckets: VecDeque<(u64, sled::Tree)> = VecDeque::new();
    let claim = vec![1u8; 120];
    let mut done = vec![2u8; 420];
    for tick in 0..SECONDS * TICKS {
        let now = tick * 1000 / TICKS;
        for _ in 0..RATE / TICKS {
            let key = format!("default\0{:032x}", rng.gen::<u128>()).into_bytes();
            rng.fill(&mut done[..16]);
            if layout == "buckets" {
                let b = now / BUCKET_MS;
                if buckets.back().map(|x| x.0) != Some(b) {
                    buckets.push_back((b, db.open_tree(format!("b{b}")).unwrap()));
                }
                let tree = &buckets.back().unwrap().1;
                tree.insert(&key, &claim[..]).unwrap();
                tree.insert(&key, &done[..]).unwrap();
                continue;
            }
            records.insert(&key, &claim[..]).unwrap();
            if layout == "index" {
                expiry.insert(index_key(now + 30_000, &key), &[]).unwrap();
            }
            records.insert(&key, &done[..]).unwrap();
            if layout == "index" {
                expiry.insert(index_key(now + TTL * 1000, &key), &[]).unwrap();
            }
            live.push_back((now + TTL * 1000, key));
        }
        db.flush().unwrap();
        if tick % (SWEEP * TICKS) == 0 {
            while buckets.front().is_some_and(|(b, _)| (b + 1) * BUCKET_MS + TTL * 1000 <= now) {
                let (b, tree) = buckets.pop_front().unwrap();
                drop(tree);
                db.drop_tree(format!("b{b}")).unwrap();
            }
            while live.front().is_some_and(|(due, _)| *due <= now) {
                let (due, key) = live.pop_front().unwrap();
                records.remove(&key).unwrap();
                if layout == "index" {
                    expiry.remove(index_key(due, &key)).unwrap();
                    expiry.remove(index_key(due + 10_000, &key)).unwrap();
                }
            }
            db.flush().unwrap();
        }
        if tick > 0 && tick % (20 * TICKS) == 0 {
            let size = dir_size(&dir);
            let live_keys = RATE * TTL.min(tick / TICKS);
            println!(
                "{layout} segment={segment} zstd={zstd} t={}s dir={:.1}MiB per_live_key={}B",
                tick / TICKS,
                size as f64 / 1048576.0,
                size / live_keys
            );
        }
    }
    drop((records, expiry, buckets, db));
    let _ = std::fs::remove_dir_all(&dir);
}
