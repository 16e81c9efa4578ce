//! When to try again, and how long to wait first.
//!
//! A retry is only safe because it carries the same key; what this module
//! decides is whether another attempt can change the answer. Connection
//! errors, timeouts, 502/503/504 and 429 are passing trouble; a 409 whose
//! code is `idempotency_key_in_use` (ours, Stripe's) or that asks to be
//! retried with `Retry-After` (the IETF draft's concurrent request) means the
//! original is still running. Everything else is the server's final word.
//!
//! The pause is exponential with jitter (so that a fleet of agents that
//! failed together does not retry together), and never shorter than the
//! server's `Retry-After`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::RETRY_AFTER;
use http::{HeaderMap, StatusCode};
use rand::Rng;

/// A `Retry-After` longer than this ends the retries instead of stalling the
/// caller (the report says when the server asked to come back).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// What a response means for the retry loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The server's final answer: report it.
    Final,
    /// Passing trouble: try again with the same key.
    Retry,
    /// The original request with this key is still in flight.
    InUse,
}

/// Classifies a response by its status, its problem `code` (if any) and
/// whether it carries `Retry-After`.
pub fn verdict(status: StatusCode, code: Option<&str>, has_retry_after: bool) -> Verdict {
    match status.as_u16() {
        409 if code == Some("idempotency_key_in_use") => Verdict::InUse,
        409 if code.is_none() && has_retry_after => Verdict::InUse,
        429 | 502 | 503 | 504 => Verdict::Retry,
        _ => Verdict::Final,
    }
}

/// Exponential backoff with "equal jitter": the n-th retry waits a random
/// time between half and all of `min(cap, base * 2^(n-1))`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    /// Stripe's SDKs start at 0.5 s; we allow a little more at the top
    /// because a proxy restart or failover takes a few seconds.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(8),
        }
    }
}

impl Backoff {
    /// The pause before retry number `n` (1 for the first retry).
    pub fn delay(&self, n: u32, rng: &mut impl Rng) -> Duration {
        let exp = self.base.saturating_mul(1u32 << n.saturating_sub(1).min(20));
        let full = exp.min(self.cap);
        let half = full / 2;
        half + full.saturating_sub(half).mul_f64(rng.gen::<f64>())
    }
}

/// The server's `Retry-After`, as a duration from `now`: delay-seconds or
/// an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`). A date in the past is
/// zero; anything unreadable is ignored.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = http_date(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses an IMF-fixdate (RFC 9110 §5.6.7), the form every current server sends.
fn http_date(s: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_weekday, day, month, year, time, "GMT"] = parts[..] else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let mut hms = time.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's method).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::mock::StepRng;

    #[test]
    fn passing_trouble_is_retried_and_client_errors_are_final() {
        for s in [429, 502, 503, 504] {
            assert_eq!(verdict(StatusCode::from_u16(s).unwrap(), None, false), Verdict::Retry);
        }
        for s in [200, 201, 301, 400, 401, 403, 404, 410, 422, 500, 501] {
            assert_eq!(
                verdict(StatusCode::from_u16(s).unwrap(), None, true),
                Verdict::Final,
                "{s}"
            );
        }
    }

    #[test]
    fn only_an_in_use_conflict_waits_for_the_original() {
        let c = StatusCode::CONFLICT;
        assert_eq!(verdict(c, Some("idempotency_key_in_use"), true), Verdict::InUse);
        assert_eq!(verdict(c, None, true), Verdict::InUse);
        assert_eq!(verdict(c, None, false), Verdict::Final);
        assert_eq!(verdict(c, Some("outcome_unknown"), true), Verdict::Final);
        assert_eq!(verdict(c, Some("resource_exists"), true), Verdict::Final);
    }

    #[test]
    fn backoff_grows_with_jitter_and_stops_at_the_cap() {
        let b = Backoff::default();
        let (mut low, mut high) = (StepRng::new(0, 0), StepRng::new(u64::MAX, 0));
        assert_eq!(b.delay(1, &mut low), Duration::from_millis(250));
        assert!(b.delay(1, &mut high) <= Duration::from_millis(500));
        assert!(b.delay(1, &mut high) > Duration::from_millis(499));
        assert_eq!(b.delay(3, &mut low), Duration::from_millis(1000));
        assert_eq!(b.delay(10, &mut low), Duration::from_secs(4));
        assert!(b.delay(40, &mut high) <= Duration::from_secs(8));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        let now = UNIX_EPOCH + Duration::from_secs(784_111_770); // 1994-11-06 08:49:30 UTC
        assert_eq!(retry_after(&h, now), None);
        h.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(3)));
        h.insert(RETRY_AFTER, "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        h.insert(RETRY_AFTER, "Sun, 06 Nov 1994 08:49:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h, now), None);
    }

    #[test]
    fn http_dates_are_exact() {
        let at = http_date("Thu, 01 Jan 1970 00:00:00 GMT").unwrap();
        assert_eq!(at, UNIX_EPOCH);
        let at = http_date("Tue, 29 Feb 2028 23:59:59 GMT").unwrap();
        assert_eq!(at.duration_since(UNIX_EPOCH).unwrap().as_secs(), 1_835_481_599);
        assert_eq!(http_date("Tue, 29 Feb 2028 24:00:00 GMT"), None);
        assert_eq!(http_date("Tue, 29 Feb 2028 23:59:59 CET"), None);
    }
}
