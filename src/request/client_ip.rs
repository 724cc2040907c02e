//! `anonymous = "by_ip"`: the client address a request without a user is counted under.
//!
//! The peer address comes from the connection: axum's `ConnectInfo<SocketAddr>` (feature
//! `axum`, on by default) or a plain `SocketAddr` request extension (what a hyper server
//! inserts itself). `X-Forwarded-For` and `Forwarded` are believed only when the peer is
//! one of `[identity] trusted_proxies`, and then walked from the right: the first address
//! that is not a trusted proxy is the client. Entries a client prepends are never
//! reached, so it cannot choose its bucket.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use http::header::{HeaderName, FORWARDED};
use http::{HeaderMap, Request};
use ipnet::IpNet;

use crate::config::IdentityConfig;
use crate::key::Subject;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Most forwarding entries walked per request: beyond them the nearest trusted proxy
/// counts as the client (bounded work, and strict rather than lenient).
pub(crate) const MAX_HOPS: usize = 16;

/// The peer address of the connection, if the server put one in the extensions.
pub(crate) fn peer<B>(req: &Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    #[cfg(feature = "axum")]
    if let Some(info) = ext.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(info.0.ip());
    }
    ext.get::<SocketAddr>().map(SocketAddr::ip)
}

/// The subject of an anonymous request under `by_ip`: its client network. `None` without a
/// peer address.
pub(crate) fn subject<B>(req: &Request<B>, cfg: &IdentityConfig) -> Option<Subject<'static>> {
    let peer = peer(req)?;
    let client = client_address(peer, req.headers(), cfg.trusted_nets());
    Some(group(client, cfg.ipv6_prefix()))
}

/// IPv4-mapped IPv6 counts as IPv4; IPv6 is masked to `ipv6_prefix`.
pub(crate) fn group(addr: IpAddr, ipv6_prefix: u8) -> Subject<'static> {
    match addr.to_canonical() {
        IpAddr::V4(v4) => Subject::Client(IpAddr::V4(v4), 32),
        IpAddr::V6(v6) => {
            // The config keeps the prefix within 32..=128; anything else is the whole address.
            let prefix = ipv6_prefix.min(128);
            let network = ipnet::Ipv6Net::new(v6, prefix).map_or(v6, |net| net.network());
            Subject::Client(IpAddr::V6(network), prefix)
        }
    }
}

fn trusted(addr: IpAddr, nets: &[IpNet]) -> bool {
    let addr = addr.to_canonical();
    nets.iter().any(|net| net.contains(&addr))
}

/// The client behind `peer`: `peer` itself unless it is a trusted proxy; then the
/// forwarding header walked from the right past trusted proxies.
pub(crate) fn client_address(peer: IpAddr, headers: &HeaderMap, nets: &[IpNet]) -> IpAddr {
    if nets.is_empty() || !trusted(peer, nets) {
        return peer;
    }
    let xff = headers.contains_key(&X_FORWARDED_FOR);
    let fwd = headers.contains_key(FORWARDED);
    let (name, forwarded) = match (xff, fwd) {
        (true, false) => (&X_FORWARDED_FOR, false),
        (false, true) => (&FORWARDED, true),
        // Neither: the proxy itself is the client. Both: which one did the trusted proxy
        // append to? A client may have sent the other; the proxy's own address is the
        // strict answer (only that client's requests land in it).
        _ => return peer,
    };
    let mut current = peer;
    let mut walked = 0;
    for value in headers.get_all(name).iter().rev() {
        let Ok(text) = value.to_str() else {
            return current;
        };
        for entry in text.rsplit(',') {
            walked += 1;
            if walked > MAX_HOPS {
                return current;
            }
            let parsed = if forwarded {
                forwarded_for(entry)
            } else {
                parse_node(entry.trim())
            };
            let Some(addr) = parsed else {
                // "unknown", an obfuscated node or garbage: the hop that reported it is
                // the last address known.
                return current;
            };
            current = addr;
            if !trusted(addr, nets) {
                return addr;
            }
        }
    }
    current
}

/// The `for=` node of one `Forwarded` element (RFC 7239).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_node(value.trim().trim_matches('"')))
            .flatten()
    })
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:80`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(addr) = node.parse::<IpAddr>() {
        return Some(addr);
    }
    if let Ok(sock) = node.parse::<SocketAddr>() {
        return Some(sock.ip());
    }
    let inner = node.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::canonical;
    use http::HeaderValue;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", b"6.6.6.6, 1.2.3.4, 10.0.0.2")]);
        assert_eq!(client_address(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
        // An untrusted peer's header is ignored.
        assert_eq!(client_address(ip("7.7.7.7"), &h, &trusted), ip("7.7.7.7"));
        // Several header lines are one list, in order.
        let h = headers(&[
            ("x-forwarded-for", b"6.6.6.6"),
            ("x-forwarded-for", b"1.2.3.4"),
        ]);
        assert_eq!(client_address(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
        // Garbage ends the walk at the proxy that reported it.
        let h = headers(&[("x-forwarded-for", b"1.2.3.4, unknown")]);
        assert_eq!(client_address(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.1"));
        let h = headers(&[("x-forwarded-for", b"\xff\xfe")]);
        assert_eq!(client_address(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.1"));
        // Both headers: the proxy's own address.
        let h = headers(&[
            ("x-forwarded-for", b"1.2.3.4"),
            ("forwarded", b"for=5.6.7.8"),
        ]);
        assert_eq!(client_address(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.1"));
    }

    #[test]
    fn forwarded_nodes_are_parsed() {
        let trusted = nets(&["10.0.0.0/8", "::1/128"]);
        let h = headers(&[(
            "forwarded",
            b"for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https, For=10.0.0.3;by=10.0.0.1",
        )]);
        assert_eq!(client_address(ip("::1"), &h, &trusted), ip("2001:db8::7"));
        assert_eq!(parse_node("1.2.3.4:80"), Some(ip("1.2.3.4")));
        assert_eq!(parse_node("[::1]"), Some(ip("::1")));
        assert_eq!(forwarded_for("proto=http"), None);
    }

    #[test]
    fn work_per_request_is_bounded() {
        let trusted = nets(&["10.0.0.0/8"]);
        let long: String = "10.0.0.9, ".repeat(10_000) + "10.0.0.8";
        let h = headers(&[("x-forwarded-for", long.as_bytes())]);
        assert!(trusted
            .iter()
            .any(|n| n.contains(&client_address(ip("10.0.0.1"), &h, &trusted))));
    }

    #[test]
    fn ipv6_is_grouped_and_mapped_ipv4_is_ipv4() {
        assert_eq!(
            group(ip("2001:db8:1:2:aaaa::1"), 64),
            Subject::Client(ip("2001:db8:1:2::"), 64)
        );
        assert_eq!(
            group(ip("2001:db8::1"), 128),
            Subject::Client(ip("2001:db8::1"), 128)
        );
        assert_eq!(
            group(ip("::ffff:1.2.3.4"), 64),
            Subject::Client(ip("1.2.3.4"), 32)
        );
        assert!(trusted(ip("::ffff:10.1.2.3"), &nets(&["10.0.0.0/8"])));
        assert_eq!(
            canonical("::ffff:10.0.0.0/104".parse().unwrap()),
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
    }
}
