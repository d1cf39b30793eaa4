//! HTTP/1 between meshed proxies travels as HTTP/2, as Linkerd does: one multiplexed TLS
//! connection per endpoint instead of a pool, and no head-of-line blocking.
//!
//! The outbound proxy marks the request with `l5d-orig-proto: HTTP/1.1` (or `HTTP/1.0`), sends
//! its `Host` as `:authority`, and restores the response to the app's version. The inbound
//! proxy turns the request back into HTTP/1 when it sees the header ([`downgrade_request`]).
//! Linkerd's header name and values, so the two meshes agree.

use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};

use super::ProxyError;

/// Linkerd's header for the version a request (or response) had before the h2 hop.
pub const L5D_ORIG_PROTO: HeaderName = HeaderName::from_static("l5d-orig-proto");

const HTTP_11: &str = "HTTP/1.1";
const HTTP_10: &str = "HTTP/1.0";

/// Whether a request of this version can be upgraded (HTTP/1.0 and 1.1; HTTP/0.9 can't).
pub fn can_upgrade(version: Version) -> bool {
    version == Version::HTTP_11 || version == Version::HTTP_10
}

/// Rewrites an HTTP/1 request to travel as HTTP/2: marks its version in `l5d-orig-proto`,
/// moves its `Host` (else the destination the client named) into an absolute URI, so it
/// travels as `:authority`, and drops `Host`. Returns the original version for
/// [`downgrade_response`]. Hop-by-hop headers (`Transfer-Encoding` among them) are already
/// gone: h2 frames the body itself.
pub fn upgrade_request<B>(req: &mut Request<B>, destination: &str) -> Result<Version, ProxyError> {
    let orig = req.version();
    let value = if orig == Version::HTTP_10 {
        HTTP_10
    } else {
        HTTP_11
    };
    // An absolute-form URI already names the authority (and `Host` must agree with it).
    let host = req.headers_mut().remove(header::HOST);
    if req.uri().authority().is_none() {
        let authority = match host {
            // As sent, case preserved (one copy: a header value can't give up its bytes).
            Some(host) => Authority::try_from(host.as_bytes()),
            None => Authority::try_from(destination),
        }
        .map_err(|_| ProxyError::MalformedRequest)?;
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::MalformedRequest)?;
    }
    req.headers_mut()
        .insert(L5D_ORIG_PROTO, HeaderValue::from_static(value));
    *req.version_mut() = Version::HTTP_2;
    Ok(orig)
}

/// The response to an upgraded request, back to the app's HTTP/1: the version the inbound
/// proxy reported (`l5d-orig-proto`, removed), else the request's own.
pub fn downgrade_response<B>(rsp: &mut Response<B>, orig: Version) {
    let version = match rsp.headers_mut().remove(L5D_ORIG_PROTO) {
        Some(v) if v == HTTP_10 => Version::HTTP_10,
        Some(v) if v == HTTP_11 => Version::HTTP_11,
        _ => orig,
    };
    *rsp.version_mut() = version;
}

/// At the inbound proxy: a request another proxy carried over h2 goes to the app as the
/// HTTP/1 it was (`l5d-orig-proto`, removed); other requests are left alone. Only an h2
/// request can carry it, as Linkerd reads it: an HTTP/1 request costs no lookup.
pub fn downgrade_request<B>(req: &mut Request<B>) {
    if req.version() != Version::HTTP_2 {
        return;
    }
    let Some(orig) = req.headers_mut().remove(L5D_ORIG_PROTO) else {
        return;
    };
    *req.version_mut() = if orig == HTTP_10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h1(uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri).version(Version::HTTP_11);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn origin_form_moves_host_to_authority() {
        let mut req = h1("/a/b?c=d", Some("Web.Default:8080"));
        req.headers_mut()
            .insert("x-custom", HeaderValue::from_static("kept"));
        let orig = upgrade_request(&mut req, "web.default.svc.cluster.local:80").unwrap();
        assert_eq!(orig, Version::HTTP_11);
        assert_eq!(req.version(), Version::HTTP_2);
        // Case kept: the inbound proxy gives the app exactly the Host it was sent.
        assert_eq!(req.uri().to_string(), "http://Web.Default:8080/a/b?c=d");
        assert!(req.headers().get(header::HOST).is_none());
        assert_eq!(req.headers()[L5D_ORIG_PROTO], "HTTP/1.1");
        assert_eq!(req.headers()["x-custom"], "kept");
    }

    #[test]
    fn absolute_form_keeps_its_authority() {
        let mut req = h1("http://web:80/x", Some("web:80"));
        upgrade_request(&mut req, "ignored:1").unwrap();
        assert_eq!(req.uri().to_string(), "http://web:80/x");
        assert!(req.headers().get(header::HOST).is_none());
    }

    #[test]
    fn http10_without_host_gets_the_destination() {
        let mut req = h1("/", None);
        *req.version_mut() = Version::HTTP_10;
        let orig = upgrade_request(&mut req, "web.default.svc.cluster.local:80").unwrap();
        assert_eq!(orig, Version::HTTP_10);
        assert_eq!(req.headers()[L5D_ORIG_PROTO], "HTTP/1.0");
        assert_eq!(
            req.uri().authority().map(|a| a.as_str()),
            Some("web.default.svc.cluster.local:80")
        );
    }

    #[test]
    fn a_host_that_is_no_authority_is_a_bad_request() {
        let mut req = h1("/", Some("bad host"));
        assert_eq!(
            upgrade_request(&mut req, "web:80").err(),
            Some(ProxyError::MalformedRequest)
        );
    }

    #[test]
    fn response_gets_the_version_back() {
        let mut rsp = Response::builder()
            .version(Version::HTTP_2)
            .header(L5D_ORIG_PROTO, "HTTP/1.0")
            .body(())
            .unwrap();
        downgrade_response(&mut rsp, Version::HTTP_11);
        assert_eq!(rsp.version(), Version::HTTP_10);
        assert!(rsp.headers().get(L5D_ORIG_PROTO).is_none());

        let mut rsp = Response::builder()
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        downgrade_response(&mut rsp, Version::HTTP_11);
        assert_eq!(rsp.version(), Version::HTTP_11);
    }

    #[test]
    fn only_h2_requests_are_downgraded() {
        let mut h2 = Request::builder()
            .version(Version::HTTP_2)
            .header(L5D_ORIG_PROTO, "HTTP/1.0")
            .body(())
            .unwrap();
        downgrade_request(&mut h2);
        assert_eq!(h2.version(), Version::HTTP_10);
        assert!(h2.headers().get(L5D_ORIG_PROTO).is_none());

        let mut h1 = Request::builder()
            .version(Version::HTTP_11)
            .header(L5D_ORIG_PROTO, "HTTP/1.0")
            .body(())
            .unwrap();
        downgrade_request(&mut h1);
        assert_eq!(h1.version(), Version::HTTP_11);
    }

    #[test]
    fn upgrades_only_http1() {
        assert!(can_upgrade(Version::HTTP_11));
        assert!(can_upgrade(Version::HTTP_10));
        assert!(!can_upgrade(Version::HTTP_2));
        assert!(!can_upgrade(Version::HTTP_09));
    }
}
