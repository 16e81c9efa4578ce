//! Human-friendly units in the config file: humantime durations (`"250ms"`,
//! `"24h"`), byte sizes (`"64KiB"`, `"1MiB"`) and status lists (`"2xx"`, `409`).
//!
//! Each is a newtype with its own `Deserialize`, so a bad value is reported by
//! serde at the exact key path where it was written.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration written as a humantime string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map(HumanDuration).map_err(|e| {
            de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write e.g. \"250ms\", \"30s\", \"24h\""
            ))
        })
    }
}

/// A byte size written as `"64KiB"`, `"1MiB"`, `"512B"` or a bare integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `N`, `NB`, `NKB`, `NKiB`, ... (binary and decimal units).
    pub fn parse(s: &str) -> Result<u64, String> {
        s.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| format!("invalid size {s:?} ({e}); write e.g. \"64KiB\", \"1MiB\""))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"64KiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("size must not be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// One entry of `store_statuses` / `never_store`: a class (`"2xx"`) or one
/// status (`409` or `"409"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusPattern {
    Class(u16),
    Exact(u16),
}

impl StatusPattern {
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let b = s.as_bytes();
        if b.len() == 3 && (b'1'..=b'5').contains(&b[0]) && b[1..].eq_ignore_ascii_case(b"xx") {
            return Ok(StatusPattern::Class(u16::from(b[0] - b'0')));
        }
        match s.parse::<u16>() {
            Ok(n) if (100..=599).contains(&n) => Ok(StatusPattern::Exact(n)),
            _ => Err(format!(
                "invalid status {s:?}; write a class such as \"2xx\" or a status from 100 to 599"
            )),
        }
    }

    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusPattern::Class(c) => status / 100 == c,
            StatusPattern::Exact(n) => status == n,
        }
    }
}

impl<'de> Deserialize<'de> for StatusPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StatusPattern;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a status class such as \"2xx\" or a status code")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StatusPattern, E> {
                StatusPattern::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StatusPattern, E> {
                StatusPattern::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StatusPattern, E> {
                StatusPattern::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Which response statuses may be stored, as a bitmap over 0..=599 so the
/// per-response check is one shift and mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    /// Statuses matched by `store` and not by `never`.
    pub fn new(store: &[StatusPattern], never: &[StatusPattern]) -> Self {
        let mut bits = [0u64; 10];
        for status in 100u16..=599 {
            if store.iter().any(|p| p.matches(status)) && !never.iter().any(|p| p.matches(status)) {
                bits[usize::from(status / 64)] |= 1 << (status % 64);
            }
        }
        StatusSet(bits)
    }

    pub fn contains(&self, status: u16) -> bool {
        status < 640 && self.0[usize::from(status / 64)] & (1 << (status % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("64KiB").unwrap(), 64 * 1024);
        assert_eq!(ByteSize::parse("1MiB").unwrap(), 1024 * 1024);
        assert_eq!(ByteSize::parse("512").unwrap(), 512);
        assert!(ByteSize::parse("lots").is_err());
    }

    #[test]
    fn status_sets() {
        let store = [
            StatusPattern::parse("2xx").unwrap(),
            StatusPattern::parse("4xx").unwrap(),
        ];
        let never = [StatusPattern::Exact(409), StatusPattern::Exact(429)];
        let set = StatusSet::new(&store, &never);
        assert!(set.contains(200) && set.contains(201) && set.contains(404));
        assert!(!set.contains(409) && !set.contains(429) && !set.contains(500) && !set.contains(302));
        assert!(StatusPattern::parse("6xx").is_err());
        assert!(StatusPattern::parse("99").is_err());
    }
}
