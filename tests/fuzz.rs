//! Property-driven fuzzing of everything a client or a disk can feed the
//! proxy byte for byte: the key header parser, tenant extraction (JWT
//! decoding included) and stored-record decoding (issue 10, item 8).
//!
//! These run in CI with a bounded number of cases each (a few seconds in
//! all); `PROPTEST_CASES=100000 cargo test --release --test fuzz` runs a
//! longer campaign. The properties: nothing panics, and whatever is accepted
//! has the shape the rest of the proxy relies on. That a record which does
//! not decode is answered with a 503 `store_unavailable` and never a crash is
//! tested against the real binary in `tests/crash.rs`.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};
use idemproxy::config::{JwtKey, JwtTenant, TenantSource};
use idemproxy::idempotency::jwt::JwtVerifier;
use idemproxy::idempotency::replay::Replay;
use idemproxy::idempotency::{key, tenant};
use idemproxy::problem::Code;
use idemproxy::store::{Completed, Record};
use proptest::prelude::*;

fn cases(n: u32) -> ProptestConfig {
    // PROPTEST_CASES, when set, overrides the per-test count.
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(n),
        ..ProptestConfig::default()
    }
}

fn well_formed_key(k: &str) -> bool {
    (1..=255).contains(&k.len()) && k.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

// ------------------------------------------------------------------- keys

/// Header values that look like keys often enough to reach every branch.
fn key_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        "[ -~]{0,260}".prop_map(String::into_bytes),
        "\"[ -~]{0,260}\"?".prop_map(String::into_bytes),
        "\"(\\\\[\"\\\\a]|[a-z]){0,20}\"".prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(cases(4000))]

    #[test]
    fn key_header_parser_never_panics_and_accepts_only_well_formed_keys(raw in key_bytes()) {
        if let Ok(k) = key::parse(&raw) {
            prop_assert!(well_formed_key(&k), "accepted {k:?} from {raw:?}");
        }
        if let Ok(k) = key::verbatim(&raw) {
            prop_assert!(well_formed_key(k));
            prop_assert_eq!(k.as_bytes(), &raw[..]);
        }
        let name = HeaderName::from_static("idempotency-key");
        if let Ok(value) = HeaderValue::from_bytes(&raw) {
            let mut headers = HeaderMap::new();
            headers.append(&name, value.clone());
            let one = key::from_headers(&headers, &name);
            if let Ok(Some(k)) = &one {
                prop_assert!(well_formed_key(k));
            }
            // A repeated header is always refused.
            headers.append(&name, value);
            prop_assert!(key::from_headers(&headers, &name).is_err());
        }
    }
}

// ---------------------------------------------------------------- tenants

fn jwt_source(verifier: JwtVerifier) -> TenantSource {
    TenantSource::Jwt(JwtTenant {
        claim: "sub".into(),
        key: JwtKey::Unverified,
        verifier: Arc::new(verifier),
    })
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, Into::into)),
        "\\PC{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("sub|exp|nbf|iat|alg|kid|[a-z]{1,4}", inner, 0..5)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `Authorization` values: random bytes, or bearer tokens whose three parts
/// are base64url of JSON (a header naming some algorithm, arbitrary claims)
/// and of random bytes, sometimes mangled.
fn authorization() -> impl Strategy<Value = Vec<u8>> {
    let token = (
        prop_oneof![
            Just("HS256".to_owned()),
            Just("RS256".to_owned()),
            Just("ES256".to_owned()),
            Just("none".to_owned()),
            "[A-Za-z0-9]{0,6}".prop_map(|s: String| s)
        ],
        json_value(),
        proptest::collection::vec(any::<u8>(), 0..80),
        any::<u8>(),
    )
        .prop_map(|(alg, claims, sig, mangle)| {
            let header = serde_json::json!({"alg": alg, "typ": "JWT"});
            let mut t = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string()),
                URL_SAFE_NO_PAD.encode(sig)
            );
            match mangle % 5 {
                0 => t.truncate(t.len() / 2),
                1 => t.push('.'),
                2 => t = t.replace('.', ""),
                _ => {}
            }
            let scheme = ["Bearer ", "bearer ", "BEARER  ", "Basic ", ""][usize::from(mangle) % 5];
            format!("{scheme}{t}").into_bytes()
        });
    prop_oneof![proptest::collection::vec(any::<u8>(), 0..200), token]
}

proptest! {
    #![proptest_config(cases(1500))]

    #[test]
    fn tenant_extraction_never_panics_and_always_names_its_source(auth in authorization(), gateway in proptest::collection::vec(any::<u8>(), 0..40)) {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&auth) {
            headers.insert(AUTHORIZATION, v);
        }
        let name = HeaderName::from_static("x-tenant-id");
        if let Ok(v) = HeaderValue::from_bytes(&gateway) {
            headers.insert(&name, v);
        }
        match tenant::of(&TenantSource::Authorization, &headers) {
            Ok(t) => prop_assert!(
                t == tenant::ANONYMOUS || (t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
            ),
            Err(p) => prop_assert!(false, "authorization tenants never fail: {p:?}"),
        }
        if let Ok(t) = tenant::of(&TenantSource::Header(name), &headers) {
            prop_assert!(t == tenant::ANONYMOUS || t.starts_with(tenant::HEADER_PREFIX));
        }
        prop_assert_eq!(tenant::of(&TenantSource::None, &headers).unwrap(), tenant::DEFAULT);
        for verifier in [JwtVerifier::unverified("sub".into()), JwtVerifier::hs256("sub".into(), b"fuzz-secret")] {
            match tenant::of(&jwt_source(verifier), &headers) {
                Ok(t) => prop_assert!(
                    t == tenant::ANONYMOUS || (t.starts_with(tenant::JWT_PREFIX) && t.len() > tenant::JWT_PREFIX.len())
                ),
                Err(p) => prop_assert_eq!(p.code, Code::InvalidToken),
            }
        }
    }
}

// ---------------------------------------------------------------- records

fn completed() -> impl Strategy<Value = Completed> {
    (
        any::<u16>(),
        proptest::collection::vec(
            ("[a-zA-Z0-9:\\- ]{0,12}", proptest::collection::vec(any::<u8>(), 0..16)),
            0..6,
        ),
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<(bool, u64, u64, u64)>(),
        proptest::option::of(any::<[u8; 32]>()),
    )
        .prop_map(
            |(status, headers, body, (replayable, stored_at, expires_at, tombstone_until), fp)| Completed {
                fingerprint: fp,
                status,
                headers: headers.into_iter().map(|(n, v)| (n, Bytes::from(v))).collect(),
                body: body.into(),
                replayable,
                stored_at,
                expires_at,
                tombstone_until,
            },
        )
}

/// What a disk can hand back: random bytes, or a real encoding damaged by
/// flipped bytes and truncation.
fn stored_bytes() -> impl Strategy<Value = Vec<u8>> {
    let damaged = (
        completed(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(c, flips, cut, truncate)| {
            let mut bytes = Record::Completed(Arc::new(c)).encode();
            for (at, x) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        });
    prop_oneof![proptest::collection::vec(any::<u8>(), 0..200), damaged]
}

proptest! {
    #![proptest_config(cases(4000))]

    #[test]
    fn stored_record_decoding_never_panics(bytes in stored_bytes()) {
        match Record::decode(&bytes) {
            Err(e) => prop_assert!(e.to_string().starts_with("corrupt record")),
            Ok(record) => {
                // Whatever decodes must be usable by every reader without
                // panicking: the state machine and the replay path.
                let _ = record.at(u64::MAX / 2, 7);
                let _ = record.fingerprint();
                if let Record::Completed(c) = &record {
                    prop_assert!((100..=999).contains(&c.status), "status {} decoded", c.status);
                    let replay = Replay::from_completed(c);
                    let _ = replay.response(c.stored_at.saturating_add(1));
                }
                // And it encodes back to something that decodes the same.
                prop_assert_eq!(Record::decode(&record.encode()).unwrap(), record);
            }
        }
    }

    #[test]
    fn every_completed_record_round_trips_unless_its_status_is_impossible(c in completed()) {
        let possible = (100..=999).contains(&c.status);
        let record = Record::Completed(Arc::new(c));
        match Record::decode(&record.encode()) {
            Ok(back) => prop_assert!(possible && back == record),
            Err(_) => prop_assert!(!possible),
        }
    }
}
