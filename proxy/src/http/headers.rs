//! Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and must not be forwarded.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Request;

/// The authority a request names, as sent: absolute-form URI or `:authority`, else `Host`.
/// Borrowed, so caches keyed by it cost no allocation per request.
pub fn request_authority(req: &Request<impl Sized>) -> Option<&[u8]> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().as_bytes());
    }
    // A scan, not a hashed lookup (~100 instructions): HTTP/1 clients send `Host` first.
    req.headers()
        .iter()
        .find(|(name, _)| *name == header::HOST)
        .map(|(_, host)| host.as_bytes())
}

const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// `TE: trailers` is end-to-end for gRPC; any other TE value is hop-by-hop.
fn is_te_trailers(value: &HeaderValue) -> bool {
    value.as_bytes().eq_ignore_ascii_case(b"trailers")
}

/// Whether a header has to go: a hop-by-hop one, or `TE` other than `TE: trailers`. Any header
/// a message's `Connection` names comes with `Connection`.
fn is_hop_by_hop(name: &HeaderName, value: &HeaderValue) -> bool {
    HOP_BY_HOP.contains(name)
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || (name == header::TE && !is_te_trailers(value))
}

/// Removes hop-by-hop headers. When `keep_upgrade` is set (a WebSocket handshake), `Upgrade` and
/// `Connection: upgrade` are kept so the endpoint sees the handshake.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none (a gRPC request's `TE: trailers` stays): one pass over their
    // few headers costs less than a hashed lookup for each name that could be there (this runs
    // twice per proxied request).
    if keep_upgrade
        || headers
            .iter()
            .any(|(name, value)| is_hop_by_hop(name, value))
    {
        remove_hop_by_hop(headers, keep_upgrade);
    }
}

/// `strip_hop_by_hop` for headers already known to hold some (see [`HeaderFacts`]).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Headers the sender named in `Connection` are hop-by-hop too.
    if let Some(conn) = headers.get(header::CONNECTION).cloned() {
        if let Ok(conn) = conn.to_str() {
            for name in conn.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if keep_upgrade && name.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                    if name != header::TE {
                        headers.remove(name);
                    }
                }
            }
        }
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && (name == header::UPGRADE || name == header::CONNECTION) {
            continue;
        }
        headers.remove(name);
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if !headers.get_all(header::TE).iter().all(is_te_trailers) {
        headers.remove(header::TE);
    }
}

/// An HTTP/1.1 protocol upgrade (e.g. WebSocket) asked for by the client.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    HeaderFacts::of(headers).upgrade
}

fn names_upgrade(connection: &HeaderValue) -> bool {
    connection
        .to_str()
        .map(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
        .unwrap_or(false)
}

/// What the endpoint client needs of a request's headers, read in one pass over them: for a
/// request's few headers that costs less than a hashed lookup of each name (~100 instructions
/// each).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeaderFacts {
    /// `Upgrade` with `Connection: upgrade`: an HTTP/1.1 protocol upgrade (e.g. WebSocket).
    pub upgrade: bool,
    /// A `Host` header.
    pub host: bool,
    /// Some header `strip_hop_by_hop` would remove.
    pub hop_by_hop: bool,
}

impl HeaderFacts {
    pub fn of(headers: &HeaderMap) -> Self {
        let mut facts = Self::default();
        let (mut upgrade, mut connection_upgrade) = (false, false);
        for (name, value) in headers {
            if name == header::HOST {
                facts.host = true;
            } else if is_hop_by_hop(name, value) {
                facts.hop_by_hop = true;
                if name == header::UPGRADE {
                    upgrade = true;
                } else if name == header::CONNECTION && names_upgrade(value) {
                    connection_upgrade = true;
                }
            }
        }
        facts.upgrade = upgrade && connection_upgrade;
        facts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_standard_and_named_hop_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn each_hop_header_alone_is_stripped_and_others_are_left_alone() {
        for (name, value) in [
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
        ] {
            let mut h = map(&[(name, value), ("x-kept", "yes")]);
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.len(), 1, "{name}");
            assert_eq!(h["x-kept"], "yes");
        }
        let mut h = map(&[("host", "web"), ("accept", "*/*"), ("te", "trailers")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before, "nothing hop-by-hop: untouched");
    }

    #[test]
    fn keeps_te_trailers() {
        let mut h = map(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
        let mut h = map(&[("te", "Trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "Trailers");
        // Another value beside it makes the header hop-by-hop, all of it.
        let mut h = map(&[("te", "trailers"), ("te", "gzip"), ("x-kept", "yes")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("te").is_none());
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn keeps_upgrade_handshake() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn facts_are_read_in_one_pass() {
        let facts = |pairs: &[(&str, &str)]| HeaderFacts::of(&map(pairs));
        assert_eq!(
            facts(&[("host", "web"), ("accept", "*/*"), ("te", "trailers")]),
            HeaderFacts {
                upgrade: false,
                host: true,
                hop_by_hop: false,
            }
        );
        assert_eq!(
            facts(&[
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "websocket")
            ]),
            HeaderFacts {
                upgrade: true,
                host: false,
                hop_by_hop: true,
            }
        );
        // Either half alone is no upgrade, but both are hop-by-hop.
        for half in [("upgrade", "websocket"), ("connection", "upgrade")] {
            let f = facts(&[half]);
            assert!(!f.upgrade && f.hop_by_hop && !f.host, "{half:?}");
        }
        assert!(facts(&[("te", "gzip")]).hop_by_hop);
        assert_eq!(facts(&[]), HeaderFacts::default());
    }

    #[test]
    fn the_authority_is_the_uri_s_else_the_first_host() {
        let mut req = Request::builder()
            .uri("/")
            .header("accept", "*/*")
            .header("host", "web:80")
            .body(())
            .unwrap();
        assert_eq!(request_authority(&req), Some(&b"web:80"[..]));
        *req.uri_mut() = "http://api:8080/".parse().unwrap();
        assert_eq!(request_authority(&req), Some(&b"api:8080"[..]));
        let bare = Request::builder().uri("/").body(()).unwrap();
        assert_eq!(request_authority(&bare), None);
    }
}
