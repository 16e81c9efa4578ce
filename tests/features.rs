//! SPEC §6 against the real binary: coalesce-only routes, tombstones for
//! expired keys, JWT tenants, the key status endpoint, reload on SIGHUP and
//! JSON logs. Every test counts executions at the upstream and checks
//! problem `code`s and bytes; waits are on signals (the upstream's arrival
//! count, the proxy's own logs and metrics) or bounded polling loops.

mod support;

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use support::*;

// ---------------------------------------------------------------- helpers

/// Polls `f` every 50 ms until it yields `Some`, for at most `limit`.
async fn poll<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) until the proxy's stderr satisfies `pred`.
async fn wait_stderr(proxy: &Proxy, what: &str, pred: impl Fn(&str) -> bool) -> String {
    poll(what, Duration::from_secs(10), || {
        let s = proxy.stderr();
        std::future::ready(pred(&s).then_some(s))
    })
    .await
}

/// `GET /v1/records` on the admin listener.
async fn record(c: &Client, proxy: &Proxy, tenant: &str, key: &str) -> Resp {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("tenant", tenant)
        .append_pair("key", key)
        .finish();
    c.get(&proxy.admin_url(&format!("/v1/records?{q}"))).await
}

async fn metrics(c: &Client, proxy: &Proxy) -> String {
    String::from_utf8(c.get(&proxy.admin_url("/metrics")).await.body.to_vec()).unwrap()
}

/// POST with a key and extra headers.
async fn post(c: &Client, url: &str, key: Option<&str>, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    if let Some(k) = key {
        h.push(("idempotency-key", k));
    }
    c.send(Method::POST, url, &h, Bytes::copy_from_slice(body.as_bytes()))
        .await
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn execution(r: &Resp) -> u64 {
    r.json()["execution"].as_u64().expect("an upstream answer")
}

// ------------------------------------------------------- coalesce only

/// `ttl = "0s"`: concurrent duplicates share one execution and its bytes;
/// nothing is kept afterwards, so the same key executes again.
#[tokio::test]
async fn coalesce_only_route_shares_in_flight_and_keeps_nothing() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[[routes]]\npath = \"/v1/jobs\"\nttl = \"0s\"\n"));
    let c = Client::new();
    let url = proxy.url("/v1/jobs?gate=1");

    let leader = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { c.post_key(&url, "job-1", "{\"run\":1}").await }
    });
    up.wait_arrived(1).await;
    let dups: Vec<_> = (0..4)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { c.post_key(&url, "job-1", "{\"run\":1}").await })
        })
        .collect();
    // Every keyed request is logged (hashed) just before it joins the
    // in-process flight: once all five are, the duplicates are held.
    wait_stderr(&proxy, "5 keyed requests", |s| s.matches("keyed request").count() >= 5).await;
    up.open_gate();

    let first = leader.await.unwrap();
    assert_eq!(first.status, 201);
    assert_eq!(first.replayed(), Some("false"));
    for d in dups {
        let d = d.await.unwrap();
        assert_eq!(d.status, 201);
        assert_eq!(d.body, first.body, "a held duplicate gets the original's bytes");
        assert_eq!(d.replayed(), Some("true"));
    }
    assert_eq!(up.executions(), 1);

    // Nothing is kept: the records API forgets the key, a retry executes.
    let r = record(&c, &proxy, "anonymous", "job-1").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "idempotency_key_unknown");
    let again = c.post_key(&url, "job-1", "{\"run\":1}").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.replayed(), Some("false"));
    assert_eq!(execution(&again), 2);
    assert_eq!(up.executions(), 2);
    assert_eq!(record(&c, &proxy, "anonymous", "job-1").await.status, 404);
}

// ---------------------------------------------------------- tombstones

/// After `ttl` a tombstone answers 410 without executing; after
/// `tombstone_ttl` the key is new. On sled (the default backend).
#[tokio::test]
async fn expired_key_answers_410_until_the_tombstone_goes() {
    let up = Upstream::start().await;
    let cfg = config(&up.url(), TOMBSTONES).replace("[store]\n", "[store]\nsweep_interval = \"200ms\"\n");
    tombstone_lifecycle(&up, Proxy::start(&cfg)).await;
}

/// The same with the memory backend and its own sweeper.
#[tokio::test]
async fn expired_key_answers_410_until_the_tombstone_goes_memory() {
    let up = Upstream::start().await;
    let cfg = format!(
        "[upstream]\nurl = \"{}\"\n\n[store]\nbackend = \"memory\"\nsweep_interval = \"200ms\"\n\n{TOMBSTONES}",
        up.url()
    );
    tombstone_lifecycle(&up, Proxy::start(&cfg)).await;
}

const TOMBSTONES: &str =
    "[server]\nstatus_path = \"/_idempotency\"\n\n[idempotency]\nttl = \"1s\"\ntombstone_ttl = \"3s\"\n";

async fn tombstone_lifecycle(up: &Upstream, proxy: Proxy) {
    let c = Client::new();
    let url = proxy.url("/v1/orders");

    let first = c.post_key(&url, "late-1", "{\"n\":1}").await;
    assert_eq!(first.status, 201);
    let replay = c.post_key(&url, "late-1", "{\"n\":1}").await;
    assert_eq!(replay.replayed(), Some("true"));
    assert_eq!(replay.body, first.body);
    assert_eq!(up.executions(), 1);
    let completed = record(&c, &proxy, "anonymous", "late-1").await.json();
    assert_eq!(completed["state"], "completed");
    let stored_at = completed["stored_at"].as_str().unwrap().to_owned();

    // Past ttl: the records API reports the tombstone.
    let expired = poll("state expired", Duration::from_secs(5), || async {
        let r = record(&c, &proxy, "anonymous", "late-1").await.json();
        (r["state"] == "expired").then_some(r)
    })
    .await;
    assert_eq!(expired["status"], Value::Null);
    assert_eq!(expired["stored_at"].as_str().unwrap(), stored_at);

    let late = c.post_key(&url, "late-1", "{\"n\":1}").await;
    assert_eq!(late.status, 410);
    assert_eq!(late.code(), "idempotency_key_expired");
    assert_eq!(late.replayed(), None);
    let detail = late.json()["detail"].as_str().unwrap().to_owned();
    // The detail names the completion time (to the second, RFC 3339).
    assert!(
        detail.contains(&format!("{}Z", &stored_at[..19])),
        "detail {detail:?} should name {stored_at}"
    );
    assert!(!late.body.windows(9).any(|w| w == b"execution"), "no body in a 410");
    assert_eq!(up.executions(), 1, "a late retry is not executed");
    let status = c.get(&proxy.url("/_idempotency/late-1")).await.json();
    assert_eq!(status["state"], "expired");
    assert_eq!(status["replay"], false);

    // Past tombstone_ttl the key is new again (the sweeper deleted it).
    poll("tombstone swept", Duration::from_secs(8), || async {
        (record(&c, &proxy, "anonymous", "late-1").await.status == 404).then_some(())
    })
    .await;
    let fresh = c.post_key(&url, "late-1", "{\"n\":1}").await;
    assert_eq!(fresh.status, 201);
    assert_eq!(fresh.replayed(), Some("false"));
    assert_eq!(execution(&fresh), 2);
    assert_eq!(up.executions(), 2);
}

/// The stored size of a tombstone versus a completed record with a 200-byte
/// body (the value sled keeps under tenant + NUL + key). Printed for the
/// report; asserted to stay compact.
#[test]
fn tombstone_bytes() {
    use idemproxy::store::record::Tombstone;
    use idemproxy::store::{Completed, Record, RecordKey};
    use std::sync::Arc;
    let now = 1_760_000_000_000u64;
    let fp = Some([0xabu8; 32]);
    let tomb = Record::Expired(Tombstone {
        fingerprint: fp,
        completed_at: now,
        until: now + 7 * 24 * 3600 * 1000,
    });
    let completed = Record::Completed(Arc::new(Completed {
        fingerprint: fp,
        status: 201,
        headers: vec![
            ("content-type".into(), Bytes::from_static(b"application/json")),
            ("x-request-id".into(), Bytes::from_static(b"0f9c2b7e4d1a4c53")),
        ],
        body: Bytes::from(vec![b'x'; 200]),
        replayable: true,
        stored_at: now,
        expires_at: now + 24 * 3600 * 1000,
        tombstone_until: now + 7 * 24 * 3600 * 1000,
    }));
    let (t, c) = (tomb.encode().len(), completed.encode().len());
    let key = RecordKey::new("anonymous", "550e8400-e29b-41d4-a716-446655440000")
        .as_bytes()
        .len();
    println!("tombstone value: {t} bytes; completed record (200-byte body, 2 headers): {c} bytes; record key (anonymous + UUID): {key} bytes");
    assert_eq!(Record::decode(&tomb.encode()).unwrap(), tomb);
    assert!(t <= 64, "a tombstone is {t} bytes");
    assert!(c > t + 200);
}

// ----------------------------------------------------------------- JWT

const SECRET_ENV: &str = "FEATURES_JWT_SECRET";
const SECRET: &str = "features-test-secret-0123456789abcdef";

fn claims(sub: Option<&str>, iat: u64, exp: u64) -> Value {
    let mut c = json!({"iat": iat, "exp": exp});
    if let Some(s) = sub {
        c["sub"] = json!(s);
    }
    c
}

fn hs256(secret: &str, claims: &Value) -> String {
    let t = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    format!("Bearer {t}")
}

/// A P-256 key generated for the test, and its JWKS entry.
struct EcKey {
    encoding: EncodingKey,
    jwk: Value,
}

fn ec_key(kid: &str) -> EcKey {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let encoding = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    let raw = kp.public_key_raw();
    assert_eq!((raw.len(), raw[0]), (65, 0x04), "an uncompressed P-256 point");
    let jwk = json!({
        "kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        "kid": kid, "alg": "ES256", "use": "sig",
    });
    EcKey { encoding, jwk }
}

fn es256(key: &EcKey, kid: &str, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.to_owned());
    format!("Bearer {}", jsonwebtoken::encode(&h, claims, &key.encoding).unwrap())
}

fn jwt_route_config(up: &Upstream, tenant: &str) -> String {
    config(&up.url(), &format!("[idempotency]\ntenant = {tenant}\n"))
}

/// Checks a 401 `invalid_token` that was not forwarded.
async fn assert_rejected(c: &Client, proxy: &Proxy, up: &Upstream, auth: &str, key: &str, why: &str) {
    let before = up.executions();
    let r = post(c, &proxy.url("/v1/orders"), Some(key), &[("authorization", auth)], "{}").await;
    assert_eq!(r.status, 401, "{why}: {:?}", r.body);
    assert_eq!(r.code(), "invalid_token", "{why}");
    assert_eq!(r.replayed(), None);
    assert_eq!(up.executions(), before, "{why}: not forwarded");
}

/// HS256 with the secret from the environment.
#[tokio::test]
async fn jwt_hs256_tenant_is_the_subject() {
    let up = Upstream::start().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let cfg = jwt_route_config(
        &up,
        &format!("{{ from = \"jwt\", claim = \"sub\", hs256_secret_env = \"{SECRET_ENV}\" }}"),
    )
    .replace(
        "[idempotency]",
        "[server]\nstatus_path = \"/_idempotency\"\n\n[idempotency]",
    );
    let proxy = Proxy::try_start_in(dir, &cfg, &[(SECRET_ENV, SECRET)]).expect("proxy starts");
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let now = now_secs();

    let alice1 = hs256(SECRET, &claims(Some("alice"), now, now + 600));
    let alice2 = hs256(SECRET, &claims(Some("alice"), now - 60, now + 1200));
    assert_ne!(alice1, alice2, "a refreshed token is a different Authorization header");
    let first = post(&c, &url, Some("pay-1"), &[("authorization", &alice1)], "{\"amount\":5}").await;
    assert_eq!(first.status, 201);
    let retry = post(&c, &url, Some("pay-1"), &[("authorization", &alice2)], "{\"amount\":5}").await;
    assert_eq!(
        retry.replayed(),
        Some("true"),
        "same subject, refreshed token: a replay"
    );
    assert_eq!(retry.body, first.body);
    assert_eq!(up.executions(), 1);
    assert_eq!(
        record(&c, &proxy, "jwt:alice", "pay-1").await.json()["state"],
        "completed"
    );
    // The scheme is case-insensitive.
    let shouting = alice2.replacen("Bearer", "BEARER", 1);
    let retry = post(
        &c,
        &url,
        Some("pay-1"),
        &[("authorization", &shouting)],
        "{\"amount\":5}",
    )
    .await;
    assert_eq!(retry.replayed(), Some("true"), "{:?}", retry.body);
    assert_eq!(up.executions(), 1);

    // Another subject with the same key is another operation.
    let bob = hs256(SECRET, &claims(Some("bob"), now, now + 600));
    let other = post(&c, &url, Some("pay-1"), &[("authorization", &bob)], "{\"amount\":5}").await;
    assert_eq!(other.status, 201);
    assert_eq!(other.replayed(), Some("false"));
    assert_ne!(other.body, first.body);
    assert_eq!(execution(&other), 2);
    assert_eq!(up.executions(), 2);

    // Tokens that fail verification never reach the upstream, even for a
    // key whose response is stored.
    let expired = hs256(SECRET, &claims(Some("alice"), now - 7200, now - 3600));
    assert_rejected(&c, &proxy, &up, &expired, "pay-1", "expired token").await;
    assert_rejected(&c, &proxy, &up, &expired, "pay-2", "expired token, fresh key").await;
    let forged = hs256(
        "another-secret-entirely-0123456789",
        &claims(Some("alice"), now, now + 600),
    );
    assert_rejected(&c, &proxy, &up, &forged, "pay-1", "wrong signature").await;
    let no_sub = hs256(SECRET, &claims(None, now, now + 600));
    assert_rejected(&c, &proxy, &up, &no_sub, "pay-3", "no sub claim").await;
    let mut not_yet = claims(Some("alice"), now, now + 7200);
    not_yet["nbf"] = json!(now + 3600);
    assert_rejected(&c, &proxy, &up, &hs256(SECRET, &not_yet), "pay-4", "nbf in the future").await;
    assert_rejected(&c, &proxy, &up, "Bearer not.a.jwt", "pay-5", "garbage").await;
    let unsigned = format!(
        "Bearer {}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims(Some("alice"), now, now + 600).to_string())
    );
    assert_rejected(&c, &proxy, &up, &unsigned, "pay-1", "alg none").await;
    assert_rejected(&c, &proxy, &up, "Basic YWxpY2U6cHc=", "pay-6", "not a bearer token").await;
    assert_rejected(&c, &proxy, &up, "Bearer ", "pay-6", "empty bearer token").await;
    assert_eq!(up.executions(), 2);

    // The status endpoint computes the tenant the same way.
    let status = |auth: String| {
        let (c, url) = (c.clone(), proxy.url("/_idempotency/pay-1"));
        async move {
            c.send(Method::GET, &url, &[("authorization", &auth)], Bytes::new())
                .await
        }
    };
    let refreshed = hs256(SECRET, &claims(Some("alice"), now + 1, now + 3600));
    let s = status(refreshed).await.json();
    assert_eq!(
        (s["state"].as_str(), s["replay"].as_bool()),
        (Some("completed"), Some(true))
    );
    let carol = hs256(SECRET, &claims(Some("carol"), now, now + 600));
    assert_eq!(status(carol).await.code(), "idempotency_key_unknown");
    let r = status(expired.clone()).await;
    assert_eq!((r.status.as_u16(), r.code()), (401, "invalid_token".to_owned()));
    assert_eq!(up.executions(), 2);

    // No token at all: the anonymous tenant, which works like any other.
    let anon = post(&c, &url, Some("pay-1"), &[], "{\"amount\":5}").await;
    assert_eq!(anon.status, 201);
    assert_eq!(execution(&anon), 3);
    let anon2 = post(&c, &url, Some("pay-1"), &[], "{\"amount\":5}").await;
    assert_eq!(anon2.replayed(), Some("true"));
    assert_eq!(anon2.body, anon.body);
    assert_eq!(
        record(&c, &proxy, "anonymous", "pay-1").await.json()["state"],
        "completed"
    );
    assert_eq!(up.executions(), 3);
}

/// Tenant ids name their source: a header value that spells a JWT subject
/// (or `anonymous`) is another tenant, even on a route without fingerprints.
#[tokio::test]
async fn tenants_of_different_sources_never_collide() {
    let up = Upstream::start().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let extra = format!(
        r#"
[server]
status_path = "/_idempotency"

[[routes]]
path = "/orders"
tenant = {{ from = "jwt", claim = "sub", hs256_secret_env = "{SECRET_ENV}" }}

[[routes]]
path = "/legacy/*"
tenant = {{ from = "header", name = "X-Tenant-Id" }}
fingerprint = false
"#
    );
    let proxy = Proxy::try_start_in(dir, &config(&up.url(), &extra), &[(SECRET_ENV, SECRET)]).expect("proxy starts");
    let c = Client::new();
    let now = now_secs();
    let alice = hs256(SECRET, &claims(Some("alice"), now, now + 600));
    let original = post(&c, &proxy.url("/orders"), Some("K"), &[("authorization", &alice)], "{}").await;
    assert_eq!((original.status.as_u16(), original.replayed()), (201, Some("false")));

    // A forged gateway header naming Alice is its own tenant: a new execution.
    let forged = post(
        &c,
        &proxy.url("/legacy/x"),
        Some("K"),
        &[("x-tenant-id", "alice")],
        "{}",
    )
    .await;
    assert_eq!(forged.replayed(), Some("false"), "never Alice's stored response");
    assert_ne!(forged.body, original.body);
    assert_eq!(up.executions(), 2);

    // A JWT subject literally named `anonymous` is not the tenant of requests
    // without a token, and a header saying `anonymous` is neither of them.
    let anon_subject = hs256(SECRET, &claims(Some("anonymous"), now, now + 600));
    let tokenless = post(&c, &proxy.url("/orders"), Some("A"), &[], "{}").await;
    let subject = post(
        &c,
        &proxy.url("/orders"),
        Some("A"),
        &[("authorization", &anon_subject)],
        "{}",
    )
    .await;
    let header = post(
        &c,
        &proxy.url("/legacy/x"),
        Some("A"),
        &[("x-tenant-id", "anonymous")],
        "{}",
    )
    .await;
    for r in [&tokenless, &subject, &header] {
        assert_eq!(r.replayed(), Some("false"));
    }
    assert_eq!(up.executions(), 5, "three tenants, three operations");

    // The records API and the status endpoint name tenants with their source.
    for (tenant, key) in [
        ("jwt:alice", "K"),
        ("header:alice", "K"),
        ("anonymous", "A"),
        ("jwt:anonymous", "A"),
        ("header:anonymous", "A"),
    ] {
        assert_eq!(
            record(&c, &proxy, tenant, key).await.json()["state"],
            "completed",
            "{tenant}"
        );
    }
    assert_eq!(record(&c, &proxy, "alice", "K").await.status, 404);

    // The status endpoint takes the tenant source of the route `?path=` names.
    let status = |path: &'static str, auth: Vec<(&'static str, String)>| {
        let (c, url) = (c.clone(), proxy.url(path));
        async move {
            let headers: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
            c.send(Method::GET, &url, &headers, Bytes::new()).await
        }
    };
    let mine = status("/_idempotency/K?path=/orders", vec![("authorization", alice.clone())]).await;
    assert_eq!(mine.json()["state"], "completed", "{:?}", mine.body);
    let defaults = status("/_idempotency/K", vec![("authorization", alice.clone())]).await;
    assert_eq!(
        defaults.code(),
        "idempotency_key_unknown",
        "the defaults hash Authorization"
    );
    let forged = status("/_idempotency/K?path=/legacy/x", vec![("x-tenant-id", "alice".into())]).await;
    assert_eq!(forged.json()["state"], "completed", "header:alice has its own K");
    let spoof = status("/_idempotency/A?path=/legacy/x", vec![("x-tenant-id", "nobody".into())]).await;
    assert_eq!(spoof.code(), "idempotency_key_unknown");
    assert_eq!(up.executions(), 5, "status requests are never forwarded");
}

/// ES256 with a key generated here and published in a JWKS file.
#[tokio::test]
async fn jwt_es256_from_jwks_file() {
    let up = Upstream::start().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let key = ec_key("k1");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [key.jwk]}).to_string()).unwrap();
    let cfg = jwt_route_config(
        &up,
        &format!(
            "{{ from = \"jwt\", claim = \"sub\", jwks_file = \"{}\" }}",
            jwks.display()
        ),
    );
    let proxy = Proxy::start_in(dir, &cfg);
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let now = now_secs();

    let alice1 = es256(&key, "k1", &claims(Some("alice"), now, now + 600));
    let alice2 = es256(&key, "k1", &claims(Some("alice"), now - 30, now + 900));
    let first = post(&c, &url, Some("es-1"), &[("authorization", &alice1)], "{}").await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let retry = post(&c, &url, Some("es-1"), &[("authorization", &alice2)], "{}").await;
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(up.executions(), 1);

    let bob = es256(&key, "k1", &claims(Some("bob"), now, now + 600));
    let other = post(&c, &url, Some("es-1"), &[("authorization", &bob)], "{}").await;
    assert_eq!(other.replayed(), Some("false"));
    assert_ne!(other.body, first.body);
    assert_eq!(up.executions(), 2);

    // An attacker's key under the same kid, an expired token, an HS256
    // token (algorithm confusion), a token without the claim: all 401.
    let mallory = ec_key("k1");
    let forged = es256(&mallory, "k1", &claims(Some("alice"), now, now + 600));
    assert_rejected(&c, &proxy, &up, &forged, "es-1", "wrong signing key").await;
    let expired = es256(&key, "k1", &claims(Some("alice"), now - 7200, now - 3600));
    assert_rejected(&c, &proxy, &up, &expired, "es-2", "expired token").await;
    let hs = hs256(SECRET, &claims(Some("alice"), now, now + 600));
    assert_rejected(&c, &proxy, &up, &hs, "es-3", "HS256 against a JWKS").await;
    let no_sub = es256(&key, "k1", &claims(None, now, now + 600));
    assert_rejected(&c, &proxy, &up, &no_sub, "es-4", "no sub claim").await;
    assert_eq!(up.executions(), 2);
}

/// `verify = false` decodes without checking (a gateway in front verified).
#[tokio::test]
async fn jwt_unverified_decodes_without_checking() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&jwt_route_config(
        &up,
        "{ from = \"jwt\", claim = \"sub\", verify = false }",
    ));
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let now = now_secs();
    // Signed with unrelated secrets: nothing checks the signature.
    let a1 = hs256("gateway-secret-one", &claims(Some("carol"), now, now + 600));
    let a2 = hs256("gateway-secret-two", &claims(Some("carol"), now - 5, now + 900));
    let first = post(&c, &url, Some("nv-1"), &[("authorization", &a1)], "{}").await;
    assert_eq!(first.status, 201);
    let retry = post(&c, &url, Some("nv-1"), &[("authorization", &a2)], "{}").await;
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(
        record(&c, &proxy, "jwt:carol", "nv-1").await.json()["state"],
        "completed"
    );
    let dave = hs256("x", &claims(Some("dave"), now, now + 600));
    let other = post(&c, &url, Some("nv-1"), &[("authorization", &dave)], "{}").await;
    assert_eq!(other.replayed(), Some("false"));
    assert_eq!(up.executions(), 2);
    // Still a JWT with the claim, or 401.
    assert_rejected(&c, &proxy, &up, "Bearer not-a-jwt", "nv-2", "undecodable").await;
    let no_sub = hs256("x", &claims(None, now, now + 600));
    assert_rejected(&c, &proxy, &up, &no_sub, "nv-3", "no sub claim").await;
}

// ------------------------------------------------------- status endpoint

/// `GET {status_path}/{key}`: the caller's own key, never forwarded, never
/// a body, never another tenant's key.
#[tokio::test]
async fn status_endpoint_reports_own_keys_only() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), "[server]\nstatus_path = \"/_idempotency\"\n"));
    let c = Client::new();
    const ALICE: &[(&str, &str)] = &[("authorization", "Bearer alice")];
    const BOB: &[(&str, &str)] = &[("authorization", "Bearer bob")];
    let status = |key: &str, who: &'static [(&'static str, &'static str)]| {
        let (c, url) = (c.clone(), proxy.url(&format!("/_idempotency/{key}")));
        async move { c.send(Method::GET, &url, who, Bytes::new()).await }
    };

    let unknown = status("st-1", ALICE).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.code(), "idempotency_key_unknown");

    // In flight: the upstream holds the original.
    let url = proxy.url("/v1/orders?gate=1");
    let original = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { post(&c, &url, Some("st-1"), ALICE, "{\"item\":\"book\"}").await }
    });
    up.wait_arrived(1).await;
    let s = status("st-1", ALICE).await;
    assert_eq!(s.status, 200);
    let j = s.json();
    assert_eq!(j["state"], "in_flight");
    assert_eq!(j["replay"], false);
    assert_eq!(j["status"], Value::Null);
    assert_eq!(status("st-1", BOB).await.code(), "idempotency_key_unknown");
    up.open_gate();
    let first = original.await.unwrap();
    assert_eq!(first.status, 201);

    // Completed: status and replay, and nothing of the response body.
    let s = status("st-1", ALICE).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("application/json"));
    let j = s.json();
    let mut fields: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["completed_at", "expires_at", "key", "replay", "state", "status"]
    );
    assert_eq!(j["key"], "st-1");
    assert_eq!(j["state"], "completed");
    assert_eq!(j["status"], 201);
    assert_eq!(j["replay"], true);
    assert!(j["completed_at"].is_string() && j["expires_at"].is_string());
    assert!(!s.body.windows(4).any(|w| w == b"book"), "no body: {:?}", s.body);

    // Another tenant cannot see it; its own request is its own operation.
    let other = status("st-1", BOB).await;
    assert_eq!(other.status, 404);
    assert_eq!(other.code(), "idempotency_key_unknown");
    assert_eq!(status("st-1", &[]).await.status, 404, "anonymous is a tenant too");

    // The answer was true: a retry is a replay. Nothing above was forwarded.
    let retry = post(
        &c,
        &proxy.url("/v1/orders?gate=1"),
        Some("st-1"),
        ALICE,
        "{\"item\":\"book\"}",
    )
    .await;
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(up.executions(), 1);
    assert_eq!(up.executions_of("/_idempotency/st-1"), 0);
    let fresh = post(&c, &proxy.url("/v1/orders"), Some("st-1"), BOB, "{}").await;
    assert_eq!(fresh.replayed(), Some("false"));
    assert_eq!(up.executions(), 2);

    // A malformed key is a 400, not a lookup.
    let bad = c.get(&proxy.url("/_idempotency/a%20b")).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.code(), "idempotency_key_invalid");
    assert_eq!(up.executions(), 2);
}

/// Off by default: the path is an ordinary path of the upstream.
#[tokio::test]
async fn status_endpoint_is_off_by_default() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let first = c.post_key(&proxy.url("/v1/orders"), "off-1", "{}").await;
    assert_eq!(first.status, 201);
    let r = c.get(&proxy.url("/_idempotency/off-1")).await;
    assert_eq!(r.status, 201, "proxied to the upstream");
    assert_eq!(r.json()["path"], "/_idempotency/off-1");
    assert_eq!(up.executions_of("/_idempotency/off-1"), 1);
}

// --------------------------------------------------------------- reload

/// SIGHUP swaps routes; an invalid file keeps the running config.
#[tokio::test]
async fn sighup_reloads_routes_and_keeps_running_config_on_error() {
    let up = Upstream::start().await;
    let route = |required: bool, extra: &str| {
        config(
            &up.url(),
            &format!("[[routes]]\npath = \"/v1/tasks\"\nmethods = [\"POST\"]\nrequired = {required}\n{extra}"),
        )
    };
    let proxy = Proxy::start(&route(true, ""));
    let c = Client::new();
    let url = proxy.url("/v1/tasks");
    let write = |text: String| {
        std::fs::write(
            &proxy.config_path,
            text.replace("{dir}", proxy.dir.path().to_str().unwrap()),
        )
        .unwrap()
    };

    let missing = post(&c, &url, None, &[], "{}").await;
    assert_eq!(missing.status, 400);
    assert_eq!(missing.code(), "idempotency_key_missing");
    let keyed = c.post_key(&url, "task-1", "{}").await;
    assert_eq!(keyed.status, 201);
    assert_eq!(up.executions(), 1);

    // The new file changes a route, the [idempotency] defaults and a
    // setting that needs a restart.
    write(config(
        &up.url(),
        "[server]\nshutdown_grace = \"7s\"\n\n[idempotency]\nheader = \"X-Op-Key\"\n\n[[routes]]\npath = \"/v1/tasks\"\nmethods = [\"POST\"]\nrequired = false\n",
    ));
    proxy.signal(Signal::SIGHUP);
    let passed = poll("a keyless request to pass", Duration::from_secs(10), || async {
        let r = post(&c, &url, None, &[], "{}").await;
        (r.status == 201).then_some(r)
    })
    .await;
    assert_eq!(passed.replayed(), None, "keyless: proxied untouched");
    assert_eq!(up.executions(), 2);
    // What a reload cannot apply is named in the log.
    let log = wait_stderr(&proxy, "the restart warning", |s| s.contains("take effect on restart")).await;
    assert!(log.contains("[server]") && !log.contains("[store]"), "{log}");
    // The key header is the new one; the store was not touched, so the
    // stored key still replays under it.
    let replay = post(&c, &url, None, &[("x-op-key", "task-1")], "{}").await;
    assert_eq!(replay.replayed(), Some("true"));
    assert_eq!(replay.body, keyed.body);
    assert_eq!(up.executions(), 2);

    // An invalid file (which would require keys again) is not applied.
    write(route(true, "ttl = \"banana\"\n"));
    proxy.signal(Signal::SIGHUP);
    let m = poll("a failed reload in the metrics", Duration::from_secs(10), || async {
        let m = metrics(&c, &proxy).await;
        m.contains("idemproxy_config_reloads_total{result=\"failure\"} 1")
            .then_some(m)
    })
    .await;
    assert!(
        m.contains("idemproxy_config_reloads_total{result=\"success\"} 1"),
        "{m}"
    );
    let err = wait_stderr(&proxy, "the reload error", |s| s.contains("routes[0].ttl")).await;
    assert!(err.contains("keeping the running config"), "{err}");
    let still = post(&c, &url, None, &[], "{}").await;
    assert_eq!(still.status, 201, "the running config still applies");
    assert_eq!(up.executions(), 3);
    let replay = post(&c, &url, None, &[("x-op-key", "task-1")], "{}").await;
    assert_eq!(replay.replayed(), Some("true"), "and its key header");
    assert_eq!(up.executions(), 3);
}

/// A SIGHUP right after the proxy reports it is listening must not kill it
/// (the default action of SIGHUP is to terminate).
#[tokio::test]
async fn sighup_right_after_start_does_not_kill() {
    let up = Upstream::start().await;
    let mut proxy = Proxy::start(&config(&up.url(), ""));
    proxy.signal(Signal::SIGHUP);
    let c = Client::new();
    poll("a reload", Duration::from_secs(10), || async {
        metrics(&c, &proxy)
            .await
            .contains("idemproxy_config_reloads_total{result=\"success\"} 1")
            .then_some(())
    })
    .await;
    assert!(proxy.try_exit().is_none(), "the proxy exited on SIGHUP");
    let log = proxy.stderr();
    assert!(!log.contains("take effect on restart"), "nothing changed: {log}");
    assert_eq!(c.post_key(&proxy.url("/v1/x"), "h-1", "{}").await.status, 201);
}

// ------------------------------------------------------------ JSON logs

/// `log_format = "json"`: one JSON object per line; access events with
/// request id, route, outcome and latency; the raw key never appears.
#[tokio::test]
async fn json_logs_are_one_object_per_line_without_raw_keys() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        &up.url(),
        "[server]\nlog_format = \"json\"\nstatus_path = \"/_idempotency\"\n\n[[routes]]\npath = \"/v1/orders\"\n",
    ));
    let c = Client::new();
    let key = "zq7-SECRET-key-9f3e1b";
    let url = proxy.url("/v1/orders");
    let rid = [("x-request-id", "req-features-42")];
    assert_eq!(post(&c, &url, Some(key), &rid, "{}").await.status, 201);
    assert_eq!(c.post_key(&url, key, "{}").await.replayed(), Some("true"));
    assert_eq!(
        c.post_key(&url, key, "{\"other\":1}").await.code(),
        "idempotency_key_reused"
    );
    assert_eq!(c.get(&proxy.url(&format!("/_idempotency/{key}"))).await.status, 200);
    assert_eq!(c.get(&proxy.url("/elsewhere")).await.status, 201);
    assert_eq!(up.executions(), 2);

    let log = wait_stderr(&proxy, "5 access events", |s| {
        s.matches("idemproxy::access").count() >= 5
    })
    .await;
    let mut access = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.is_object(), "not an object: {line}");
        if v["target"] == "idemproxy::access" {
            access.push(v);
        }
    }
    assert!(!log.contains(key), "the raw key was logged:\n{log}");
    assert!(
        log.contains(&idemproxy::idempotency::key::log_hash("anonymous", key)),
        "the keyed request is logged by its hash"
    );
    assert_eq!(access.len(), 5, "{access:#?}");
    for a in &access {
        for field in [
            "request_id",
            "method",
            "path",
            "route",
            "status",
            "outcome",
            "latency_ms",
        ] {
            assert!(a.get(field).is_some(), "access event without {field}: {a}");
        }
        assert!(a["latency_ms"].is_number());
    }
    let first = &access[0];
    assert_eq!(first["request_id"], "req-features-42");
    assert_eq!(first["route"], 0);
    assert_eq!(first["status"], 201);
    assert_eq!(first["outcome"], "stored");
    assert_eq!(access[1]["outcome"], "replayed");
    assert_eq!(access[2]["outcome"], "mismatch");
    assert_eq!(access[4]["outcome"], "passthrough");
    assert_eq!(access[4]["route"], -1);
    let ids: std::collections::HashSet<_> = access.iter().map(|a| a["request_id"].to_string()).collect();
    assert_eq!(ids.len(), 5, "request ids are unique");

    // Every line on both streams, from start to a drained exit, is JSON;
    // the readiness line is a JSON event too.
    proxy.signal(Signal::SIGTERM);
    let mut proxy = proxy;
    assert!(proxy.wait_exit(Duration::from_secs(10)).await.success());
    let (out, err) = (proxy.stdout(), proxy.stderr());
    let first: Value = serde_json::from_str(out.lines().next().unwrap()).expect("readiness line is JSON");
    assert_eq!(first["event"], "listening");
    for line in out.lines().chain(err.lines()).filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.is_object(), "not an object: {line}");
    }
}
