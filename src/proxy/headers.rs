//! Header rules for a proxy hop: hop-by-hop removal (RFC 9110 §7.6.1) and
//! the `X-Forwarded-*` family.

use std::cell::RefCell;
use std::net::IpAddr;

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The fixed hop-by-hop names (RFC 9110 §7.6.1 and the legacy ones).
fn hop_by_hop() -> [&'static HeaderName; 9] {
    [
        &CONNECTION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
        &UPGRADE,
        &PROXY_AUTHENTICATE,
        &PROXY_AUTHORIZATION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
    ]
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop().contains(&name)
}

/// Removes hop-by-hop headers: the fixed list and every name listed in
/// `Connection`. These describe one connection and must never be forwarded
/// nor stored for replay.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none: one pass over the few headers present is
    // cheaper than nine removals that find nothing.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(connection) = headers.get(CONNECTION) {
        // Only allocate when the (rare) Connection header lists names.
        let listed: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .chain(std::iter::once(connection))
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for name in hop_by_hop() {
        headers.remove(name);
    }
}

/// Sets `X-Forwarded-For` (appended to any value from a proxy in front),
/// `X-Forwarded-Proto` and `X-Forwarded-Host` (the Host the client asked for).
pub fn add_forwarded(headers: &mut HeaderMap, peer: IpAddr, proto: &'static str) {
    // Several `X-Forwarded-For` lines are one comma-separated list (RFC 9110
    // §5.3): keep every hop, in order, then add ours.
    let mut earlier = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|v| !v.is_empty())
        .peekable();
    if earlier.peek().is_none() {
        headers.insert(X_FORWARDED_FOR.clone(), peer_value(peer));
    } else {
        let mut list = Vec::new();
        for prev in earlier {
            list.extend_from_slice(prev);
            list.extend_from_slice(b", ");
        }
        list.extend_from_slice(peer_value(peer).as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&list) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    if let Some(host) = headers.get(HOST).cloned() {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
}

thread_local! {
    /// The last client address rendered on this thread: a proxy sees few
    /// distinct peers (a load balancer, a sidecar's pod), so most requests
    /// reuse it instead of formatting and allocating the address again.
    static LAST_PEER: RefCell<Option<(IpAddr, HeaderValue)>> = const { RefCell::new(None) };
}

/// `peer` as a header value.
fn peer_value(peer: IpAddr) -> HeaderValue {
    LAST_PEER.with_borrow_mut(|last| match last {
        Some((ip, value)) if *ip == peer => value.clone(),
        _ => {
            let value = HeaderValue::from_str(&peer.to_string()).expect("an IP address is a valid header value");
            *last = Some((peer, value.clone()));
            value
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_fixed_and_listed_names() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn appends_forwarded_for() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR.clone(), HeaderValue::from_static("10.0.0.1"));
        h.insert(HOST, HeaderValue::from_static("api.example"));
        add_forwarded(&mut h, "127.0.0.1".parse().unwrap(), "https");
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "api.example");
    }

    #[test]
    fn joins_several_forwarded_for_lines() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR.clone(), HeaderValue::from_static("10.0.0.1"));
        h.append(X_FORWARDED_FOR.clone(), HeaderValue::from_static(" "));
        h.append(X_FORWARDED_FOR.clone(), HeaderValue::from_static("10.0.0.2, 10.0.0.3"));
        add_forwarded(&mut h, "::1".parse().unwrap(), "http");
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2, 10.0.0.3, ::1");
    }

    #[test]
    fn each_peer_gets_its_own_address_whatever_was_rendered_before() {
        for peer in ["10.1.1.1", "10.1.1.1", "192.168.0.9", "10.1.1.1", "fe80::1"] {
            let mut h = HeaderMap::new();
            add_forwarded(&mut h, peer.parse().unwrap(), "http");
            assert_eq!(h[&X_FORWARDED_FOR], peer);
        }
    }
}
