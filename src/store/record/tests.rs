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

#[test]
fn a_stamped_record_tells_when_it_is_due_without_decoding() {
    let r = Record::Completed(completed(3, 5, 10));
    let bytes = r.encode_stamped();
    assert_eq!(Record::decode(&bytes).unwrap(), r);
    assert_eq!(Record::stamped_due(&bytes), Some(r.sweep_due()));
    assert_eq!(Record::stamped_due(&r.encode()), None, "the plain form has no header");
    assert!(Record::decode(&[2, 0, 0]).is_err(), "a truncated header is corrupt");
    assert_eq!(Record::stamped_due(&[2, 0, 0]), None);
}

// ---------------------------------------------------------------------------
// The state machine against a model.
//
// Random sequences of claims (by fresh tokens of the live process), finishes
// (by any token ever issued, or one never issued), time steps, restarts (the
// live instance changes, so earlier claims belong to a dead process) and
// encode/decode round trips (what sled does between two operations) are
// applied both to `claim` / `finish` and to a model written independently,
// state by state. After every step the stored record must equal the model,
// and these must hold whatever the model says:
//
// - at most one token can finish the key, and a new owner is only admitted
//   when the previous one's record is gone, or lost with `lost_retry` past
//   its `retry_at`;
// - only the owner finishes; any other finish is `NotOwner` and writes nothing;
// - a stored response is replayed, with its body, to every matching claim
//   until it expires, across restarts;
// - a mismatch never changes the state.

mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    pub enum How {
        /// ttl of the response, extra tombstone time (0 = none), replayable.
        Store(u64, u64, bool),
        Release,
        Lost,
    }

    #[derive(Debug, Clone)]
    pub enum Op {
        Claim {
            fp: Option<u8>,
            lost_retry: bool,
        },
        /// `pick` indexes the tokens issued so far; past the end, a token
        /// that was never issued.
        Finish {
            pick: usize,
            how: How,
        },
        Advance(u64),
        Restart,
        Roundtrip,
    }

    fn how() -> impl Strategy<Value = How> {
        prop_oneof![
            3 => (0u64..300, prop_oneof![Just(0u64), 1u64..300], any::<bool>()).prop_map(|(t, s, r)| How::Store(t, s, r)),
            1 => Just(How::Release),
            1 => Just(How::Lost),
        ]
    }

    pub fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (proptest::option::weighted(0.85, 0u8..3), any::<bool>())
                .prop_map(|(fp, lost_retry)| Op::Claim { fp, lost_retry }),
            3 => (0usize..12, how()).prop_map(|(pick, how)| Op::Finish { pick, how }),
            2 => (0u64..300).prop_map(Op::Advance),
            1 => Just(Op::Restart),
            1 => Just(Op::Roundtrip),
        ]
    }

    /// The model's stored state of the one key.
    #[derive(Debug, Clone, PartialEq)]
    enum M {
        Free,
        Running {
            token: Token,
            fp: Option<Fingerprint>,
            started: u64,
            expires: u64,
            retry_at: u64,
        },
        Done(Arc<Completed>),
        Unknown {
            fp: Option<Fingerprint>,
            started: u64,
            expires: u64,
            retry_at: u64,
        },
    }

    /// How the model's state looks to a claim at `now`.
    #[derive(Debug)]
    enum View {
        Free,
        Running {
            fp: Option<Fingerprint>,
            started: u64,
        },
        Replay(Arc<Completed>),
        Tombstone {
            fp: Option<Fingerprint>,
            completed_at: u64,
            until: u64,
        },
        Unknown {
            fp: Option<Fingerprint>,
            retry_at: u64,
            dead_running: bool,
        },
    }

    fn view(m: &M, now: u64, live: u64) -> View {
        match m {
            M::Free => View::Free,
            M::Running { expires, .. } if now >= *expires => View::Free,
            M::Running {
                token,
                fp,
                started,
                retry_at,
                ..
            } => {
                if token.instance == live {
                    View::Running {
                        fp: *fp,
                        started: *started,
                    }
                } else {
                    View::Unknown {
                        fp: *fp,
                        retry_at: *retry_at,
                        dead_running: true,
                    }
                }
            }
            M::Done(c) if now < c.expires_at => View::Replay(c.clone()),
            M::Done(c) if now < c.tombstone_until => View::Tombstone {
                fp: c.fingerprint,
                completed_at: c.stored_at,
                until: c.tombstone_until,
            },
            M::Done(_) => View::Free,
            M::Unknown { expires, .. } if now >= *expires => View::Free,
            M::Unknown { fp, retry_at, .. } => View::Unknown {
                fp: *fp,
                retry_at: *retry_at,
                dead_running: false,
            },
        }
    }

    fn to_model(r: Option<&Record>) -> M {
        match r {
            None => M::Free,
            Some(Record::InFlight(f)) => M::Running {
                token: f.token,
                fp: f.fingerprint,
                started: f.started_at,
                expires: f.expires_at,
                retry_at: f.retry_at,
            },
            Some(Record::Completed(c)) => M::Done(c.clone()),
            Some(Record::Lost(l)) => M::Unknown {
                fp: l.fingerprint,
                started: l.started_at,
                expires: l.expires_at,
                retry_at: l.retry_at,
            },
            Some(Record::Expired(t)) => panic!("claim and finish never write a tombstone: {t:?}"),
        }
    }

    fn fp_of(b: Option<u8>) -> Option<Fingerprint> {
        b.map(|b| [b; 32])
    }

    /// Runs `ops` with the given lifetimes; panics (via prop_assert) on any
    /// difference from the model or broken invariant.
    pub fn run(ops: &[Op], inflight_ttl: u64, retry_delay: u64) -> Result<(), TestCaseError> {
        let mut now = 1_000u64;
        let mut live = 1u64;
        let mut seq = 0u64;
        let mut stored: Option<Record> = None;
        let mut m = M::Free;
        // Every token issued, with the fingerprint it claimed with.
        let mut tokens: Vec<(Token, Option<Fingerprint>)> = Vec::new();
        // A replayable response promised until it expires.
        let mut promise: Option<Arc<Completed>> = None;

        for op in ops {
            match op {
                Op::Advance(dt) => now += dt,
                Op::Restart => live += 1,
                Op::Roundtrip => {
                    if let Some(r) = &stored {
                        let back = Record::decode(&r.encode()).expect("decodes");
                        prop_assert_eq!(&back, r);
                    }
                }
                Op::Claim { fp, lost_retry } => {
                    seq += 1;
                    let token = Token { instance: live, seq };
                    let req = ClaimRequest {
                        token,
                        fingerprint: fp_of(*fp),
                        now,
                        inflight_ttl,
                        lost_retry: *lost_retry,
                        retry_delay,
                    };
                    let (got, update) = claim(stored.as_ref(), &req, live);

                    // The model's answer.
                    let running = M::Running {
                        token,
                        fp: req.fingerprint,
                        started: now,
                        expires: now + inflight_ttl,
                        retry_at: now + retry_delay,
                    };
                    let v = view(&m, now, live);
                    let v_fp = match &v {
                        View::Free => None,
                        View::Running { fp, .. } | View::Tombstone { fp, .. } | View::Unknown { fp, .. } => *fp,
                        View::Replay(c) => c.fingerprint,
                    };
                    let mismatch =
                        !matches!(v, View::Free) && matches!((req.fingerprint, v_fp), (Some(a), Some(b)) if a != b);
                    let (want, next) = if mismatch {
                        (Claim::Mismatch, m.clone())
                    } else {
                        match v {
                            View::Free => (Claim::Acquired, running),
                            View::Running { started, .. } => (Claim::InFlight { started_at: started }, m.clone()),
                            View::Replay(c) => (Claim::Completed(c), m.clone()),
                            View::Tombstone {
                                fp,
                                completed_at,
                                until,
                            } => (
                                Claim::Expired(Tombstone {
                                    fingerprint: fp,
                                    completed_at,
                                    until,
                                }),
                                m.clone(),
                            ),
                            View::Unknown { retry_at, .. } if *lost_retry && now >= retry_at => {
                                (Claim::Acquired, running)
                            }
                            View::Unknown { dead_running, .. } => {
                                let (fp, started, expires, retry_at) = match &m {
                                    M::Running {
                                        fp,
                                        started,
                                        expires,
                                        retry_at,
                                        ..
                                    }
                                    | M::Unknown {
                                        fp,
                                        started,
                                        expires,
                                        retry_at,
                                    } => (*fp, *started, *expires, *retry_at),
                                    _ => unreachable!("unknown views come from running or unknown states"),
                                };
                                let lost = Lost {
                                    fingerprint: fp,
                                    started_at: started,
                                    expires_at: expires,
                                    retry_at,
                                };
                                // The crash verdict is written once.
                                let next = if dead_running {
                                    M::Unknown {
                                        fp,
                                        started,
                                        expires,
                                        retry_at,
                                    }
                                } else {
                                    m.clone()
                                };
                                (Claim::Lost(lost), next)
                            }
                        }
                    };
                    prop_assert_eq!(&got, &want, "claim at {} by {:?}", now, token);

                    // Invariants that do not depend on the model.
                    if got == Claim::Mismatch {
                        prop_assert!(update.is_none(), "a mismatch changed the state");
                    }
                    if got == Claim::Acquired {
                        if let Some(Record::InFlight(prev)) = &stored {
                            let gone = now >= prev.expires_at;
                            let taken_over = prev.token.instance != live && *lost_retry && now >= prev.retry_at;
                            prop_assert!(
                                gone || taken_over,
                                "a second owner while {:?} holds the key",
                                prev.token
                            );
                        }
                        prop_assert!(matches!(update, Some(Some(Record::InFlight(ref f))) if f.token == token));
                    }
                    if let Some(p) = &promise {
                        if now < p.expires_at {
                            let differs = matches!((req.fingerprint, p.fingerprint), (Some(a), Some(b)) if a != b);
                            if !differs {
                                prop_assert!(
                                    matches!(&got, Claim::Completed(c) if c.body == p.body && c.status == p.status),
                                    "a stored response was not replayed before its expiry: {:?}",
                                    got
                                );
                            } else {
                                prop_assert_eq!(&got, &Claim::Mismatch);
                            }
                        } else {
                            promise = None;
                        }
                    }

                    if let Some(u) = update {
                        stored = u;
                    }
                    m = next;
                    tokens.push((token, req.fingerprint));
                }
                Op::Finish { pick, how } => {
                    let (token, fp) = tokens.get(*pick).copied().unwrap_or((
                        Token {
                            instance: u64::MAX,
                            seq: *pick as u64,
                        },
                        None,
                    ));
                    let finish_how = match how {
                        How::Store(ttl, tomb, replayable) => Finish::Store(Arc::new(Completed {
                            fingerprint: fp,
                            status: 200 + (token.seq % 50) as u16,
                            headers: vec![("x-seq".into(), Bytes::from(token.seq.to_string()))],
                            body: if *replayable {
                                Bytes::from(format!("response of {}", token.seq))
                            } else {
                                Bytes::new()
                            },
                            replayable: *replayable,
                            stored_at: now,
                            expires_at: now + ttl,
                            tombstone_until: if *tomb == 0 { 0 } else { now + ttl + tomb },
                        })),
                        How::Release => Finish::Release,
                        How::Lost => Finish::Lost,
                    };
                    let got = finish(stored.as_ref(), token, &finish_how, now);
                    let owner = matches!(&m, M::Running { token: t, .. } if *t == token);
                    if !owner {
                        prop_assert_eq!(got, Err(NotOwner), "{:?} finished a key it does not own", token);
                        continue;
                    }
                    let next = match (&finish_how, &m) {
                        (Finish::Store(c), _) if c.expires_at.max(c.tombstone_until) > now => M::Done(c.clone()),
                        (Finish::Store(_) | Finish::Release, _) => M::Free,
                        (
                            Finish::Lost,
                            M::Running {
                                fp,
                                started,
                                expires,
                                retry_at,
                                ..
                            },
                        ) => M::Unknown {
                            fp: *fp,
                            started: *started,
                            expires: *expires,
                            retry_at: *retry_at,
                        },
                        _ => unreachable!("the owner's state is running"),
                    };
                    let update = got.map_err(|e| TestCaseError::fail(format!("the owner could not finish: {e}")))?;
                    stored = update;
                    if let M::Done(c) = &next {
                        if c.replayable && c.expires_at > now {
                            promise = Some(c.clone());
                        }
                    }
                    m = next;
                }
            }
            // The stored record is the model's, and at most one token owns it.
            prop_assert_eq!(to_model(stored.as_ref()), m.clone(), "after {:?}", op);
            let owners = tokens
                .iter()
                .filter(|(t, _)| finish(stored.as_ref(), *t, &Finish::Release, now).is_ok())
                .count();
            prop_assert!(owners <= 1, "{} tokens can finish the key", owners);
        }
        Ok(())
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    #[test]
    fn record_state_machine_matches_the_model(
        ops in proptest::collection::vec(model::op(), 1..80),
        inflight_ttl in 1u64..400,
        retry_delay in 0u64..400,
    ) {
        model::run(&ops, inflight_ttl, retry_delay)?;
    }
}
