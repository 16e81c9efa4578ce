use super::*;

const ME: u64 = 7;

fn req(seq: u64, fp: u8, now: u64) -> ClaimRequest {
    ClaimRequest {
        token: Token { instance: ME, seq },
        fingerprint: Some([fp; 32]),
        now,
        inflight_ttl: 1_000,
        lost_retry: false,
        retry_delay: 100,
    }
}

fn completed(fp: u8, now: u64, ttl: u64) -> Arc<Completed> {
    Arc::new(Completed {
        fingerprint: Some([fp; 32]),
        status: 201,
        headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
        body: Bytes::from_static(b"made"),
        replayable: true,
        stored_at: now,
        expires_at: now + ttl,
        tombstone_until: 0,
    })
}

#[test]
fn claim_then_store_then_replay_then_expire() {
    let (c, u) = claim(None, &req(1, 1, 0), ME);
    assert_eq!(c, Claim::Acquired);
    let rec = u.unwrap().unwrap();
    let (c, u) = claim(Some(&rec), &req(2, 1, 10), ME);
    assert!(matches!(c, Claim::InFlight { started_at: 0 }) && u.is_none());
    let (c, _) = claim(Some(&rec), &req(2, 9, 10), ME);
    assert_eq!(c, Claim::Mismatch);
    let stored = finish(
        Some(&rec),
        Token { instance: ME, seq: 1 },
        &Finish::Store(completed(1, 20, 100)),
        20,
    )
    .unwrap()
    .unwrap();
    assert!(matches!(
        claim(Some(&stored), &req(3, 1, 50), ME).0,
        Claim::Completed(_)
    ));
    assert_eq!(claim(Some(&stored), &req(3, 1, 120), ME).0, Claim::Acquired);
}

#[test]
fn only_the_owner_finishes() {
    let (_, u) = claim(None, &req(1, 1, 0), ME);
    let rec = u.unwrap().unwrap();
    assert_eq!(
        finish(Some(&rec), Token { instance: ME, seq: 2 }, &Finish::Release, 1),
        Err(NotOwner)
    );
    assert_eq!(
        finish(None, Token { instance: ME, seq: 1 }, &Finish::Release, 1),
        Err(NotOwner)
    );
    assert_eq!(
        finish(Some(&rec), Token { instance: ME, seq: 1 }, &Finish::Release, 1),
        Ok(None)
    );
}

#[test]
fn crashed_owner_is_lost_and_retry_waits_for_retry_at() {
    let other = ClaimRequest {
        token: Token { instance: 99, seq: 1 },
        ..req(1, 1, 0)
    };
    let rec = claim(None, &other, 99).1.unwrap().unwrap();
    let (c, u) = claim(Some(&rec), &req(2, 1, 50), ME);
    assert!(matches!(c, Claim::Lost(_)));
    assert!(matches!(u, Some(Some(Record::Lost(_)))), "the verdict is persisted");
    let retry = ClaimRequest {
        lost_retry: true,
        ..req(2, 1, 50)
    };
    assert!(
        matches!(claim(Some(&rec), &retry, ME).0, Claim::Lost(_)),
        "before retry_at"
    );
    let retry = ClaimRequest {
        lost_retry: true,
        ..req(2, 1, 100)
    };
    assert_eq!(claim(Some(&rec), &retry, ME).0, Claim::Acquired);
}

#[test]
fn tombstone_after_expiry() {
    let (_, u) = claim(None, &req(1, 1, 0), ME);
    let rec = u.unwrap().unwrap();
    let mut c = (*completed(1, 10, 100)).clone();
    c.tombstone_until = 500;
    let stored = finish(
        Some(&rec),
        Token { instance: ME, seq: 1 },
        &Finish::Store(Arc::new(c)),
        10,
    )
    .unwrap()
    .unwrap();
    assert!(matches!(
        claim(Some(&stored), &req(2, 1, 200), ME).0,
        Claim::Expired(Tombstone { completed_at: 10, .. })
    ));
    assert_eq!(claim(Some(&stored), &req(2, 1, 500), ME).0, Claim::Acquired);
}

#[test]
fn encode_decode_roundtrip() {
    let r = Record::Completed(completed(3, 5, 10));
    assert_eq!(Record::decode(&r.encode()).unwrap(), r);
    assert!(Record::decode(&[9, 1, 2]).is_err());
    assert!(Record::decode(&[]).is_err());
}
