//! Tenants from a JWT claim (`tenant = { from = "jwt", ... }`, SPEC §6).
//!
//! Hashing `Authorization` would make a retry with a refreshed token a new
//! operation; the subject of a verified token stays the same across refreshes.
//! Verification uses `jsonwebtoken`: HS256 with a secret from the environment,
//! or RS256 / ES256 with the keys of a JWKS file; `exp` and `nbf` are checked
//! when present. `verify = false` only decodes: it is for deployments where a
//! gateway in front has already verified the token.

use std::collections::HashSet;
use std::fmt;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::problem::{Code, Problem};

pub struct JwtVerifier {
    claim: String,
    mode: Mode,
}

enum Mode {
    Hs256(DecodingKey),
    Jwks(Vec<JwksKey>),
    Unverified,
}

struct JwksKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match &self.mode {
            Mode::Hs256(_) => "hs256".to_owned(),
            Mode::Jwks(keys) => format!("jwks({} keys)", keys.len()),
            Mode::Unverified => "unverified".to_owned(),
        };
        f.debug_struct("JwtVerifier")
            .field("claim", &self.claim)
            .field("mode", &mode)
            .finish()
    }
}

type Claims = serde_json::Map<String, serde_json::Value>;

fn invalid(detail: impl Into<std::borrow::Cow<'static, str>>) -> Problem {
    Problem::new(Code::InvalidToken, detail)
}

impl JwtVerifier {
    pub fn hs256(claim: String, secret: &[u8]) -> JwtVerifier {
        JwtVerifier {
            claim,
            mode: Mode::Hs256(DecodingKey::from_secret(secret)),
        }
    }

    pub fn unverified(claim: String) -> JwtVerifier {
        JwtVerifier {
            claim,
            mode: Mode::Unverified,
        }
    }

    /// Reads the RS256 / ES256 (P-256) keys of a JWKS document.
    pub fn jwks(claim: String, json: &str) -> Result<JwtVerifier, String> {
        let set: JwkSet = serde_json::from_str(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => Algorithm::ES256,
                _ => {
                    return Err(format!(
                        "keys[{i}]: only RSA (RS256) and P-256 (ES256) keys are supported"
                    ))
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("keys[{i}]: {e}"))?;
            keys.push(JwksKey {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            });
        }
        if keys.is_empty() {
            return Err("the JWKS document has no keys".into());
        }
        Ok(JwtVerifier {
            claim,
            mode: Mode::Jwks(keys),
        })
    }

    /// The tenant named by the bearer token; `None` without a token.
    pub fn tenant(&self, headers: &HeaderMap) -> Result<Option<String>, Problem> {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return Ok(None);
        };
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or_else(|| invalid("the Authorization header is not a bearer token"))?;
        let claims = self.verify(token)?;
        match claims.get(&self.claim) {
            Some(serde_json::Value::String(s)) if !s.is_empty() && !s.contains('\0') => Ok(Some(s.clone())),
            Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
            _ => Err(invalid(format!("the token has no usable \"{}\" claim", self.claim))),
        }
    }

    fn verify(&self, token: &str) -> Result<Claims, Problem> {
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.required_spec_claims = HashSet::new();
            v.validate_exp = true;
            v.validate_nbf = true;
            v.validate_aud = false;
            v.leeway = 30;
            v
        };
        let failed = |e: jsonwebtoken::errors::Error| invalid(format!("the token failed verification: {e}"));
        match &self.mode {
            Mode::Unverified => jsonwebtoken::dangerous::insecure_decode::<Claims>(token)
                .map(|t| t.claims)
                .map_err(|e| invalid(format!("the token cannot be decoded: {e}"))),
            Mode::Hs256(key) => jsonwebtoken::decode::<Claims>(token, key, &validation(Algorithm::HS256))
                .map(|t| t.claims)
                .map_err(failed),
            Mode::Jwks(keys) => {
                let header = jsonwebtoken::decode_header(token).map_err(failed)?;
                let mut last = None;
                for k in keys
                    .iter()
                    .filter(|k| k.alg == header.alg && (header.kid.is_none() || header.kid == k.kid))
                {
                    match jsonwebtoken::decode::<Claims>(token, &k.key, &validation(k.alg)) {
                        Ok(t) => return Ok(t.claims),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.map_or_else(
                    || invalid("no key of the JWKS file matches the token's alg and kid"),
                    failed,
                ))
            }
        }
    }
}
