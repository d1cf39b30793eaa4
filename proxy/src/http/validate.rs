//! `ValidateRequest`: requests hyper accepts but the RFCs call malformed, answered 400
//! before they go anywhere (nginx and HAProxy answer 400 too):
//!
//! - more than one `Host` (RFC 9112 §3.2): a proxy that routes by the first while the app reads
//!   the second can be steered past the app's own checks;
//! - an HTTP/2 request whose `Host` names another authority than its `:authority` (RFC 9113
//!   §8.3.1).
//!
//! - a head (request line and headers) over 64 KiB, answered 431 as nginx and HAProxy do:
//!   hyper's only bound on an HTTP/1 head is its read buffer (see `server::MAX_REQUEST_HEAD`).

use http::{header, HeaderValue, Request, Version};

use super::guard::{GuardLayer, RequestGuard};
use super::server::MAX_REQUEST_HEAD;
use super::ProxyError;

/// What `check` needs of a request's head, read in one pass over its headers (a lookup of
/// `Host` by name on top cost ~100 instructions per request).
struct Head<'a> {
    /// The request line and a line per header, as sent on HTTP/1.
    size: usize,
    host: Option<&'a HeaderValue>,
    hosts: usize,
}

fn read_head<B>(req: &Request<B>) -> Head<'_> {
    let uri = req.uri();
    let line = req.method().as_str().len()
        + uri
            .authority()
            .map_or(0, |a| a.as_str().len() + "http://".len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len())
        + "  HTTP/1.1\r\n".len();
    let mut head = Head {
        size: line,
        host: None,
        hosts: 0,
    };
    for (name, value) in req.headers() {
        head.size += name.as_str().len() + value.len() + ": \r\n".len();
        if name == header::HOST {
            head.host.get_or_insert(value);
            head.hosts += 1;
        }
    }
    head
}

fn is_malformed<B>(req: &Request<B>, head: &Head<'_>) -> bool {
    let Some(host) = head.host else {
        return false;
    };
    if head.hosts > 1 {
        return true;
    }
    req.version() == Version::HTTP_2
        && req
            .uri()
            .authority()
            .is_some_and(|a| !a.as_str().as_bytes().eq_ignore_ascii_case(host.as_bytes()))
}

/// Refuses what hyper accepts but the RFCs call malformed.
#[derive(Clone, Copy, Debug)]
pub struct ValidateRequest {
    direction: &'static str,
}

impl ValidateRequest {
    pub fn layer(direction: &'static str) -> GuardLayer<Self> {
        GuardLayer::new(Self { direction })
    }
}

impl RequestGuard for ValidateRequest {
    fn check<B>(&self, req: &mut Request<B>) -> Result<(), ProxyError> {
        let head = read_head(req);
        let refused = if is_malformed(req, &head) {
            ProxyError::MalformedRequest
        } else if head.size > MAX_REQUEST_HEAD {
            ProxyError::HeadersTooLarge
        } else {
            return Ok(());
        };
        super::metrics::log_proxy_error(self.direction, "", None, refused);
        Err(refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut r = Request::builder().version(version).uri(uri);
        for h in hosts {
            r = r.header(header::HOST, *h);
        }
        r.body(()).unwrap()
    }

    fn is_malformed(req: &Request<()>) -> bool {
        super::is_malformed(req, &read_head(req))
    }

    fn head_size(req: &Request<()>) -> usize {
        read_head(req).size
    }

    #[test]
    fn two_hosts_are_malformed() {
        assert!(is_malformed(&req(Version::HTTP_11, "/", &["a", "b"])));
        // Even the same one twice (RFC 9112: "more than one Host header field line").
        assert!(is_malformed(&req(Version::HTTP_11, "/", &["a", "a"])));
        assert!(!is_malformed(&req(Version::HTTP_11, "/", &["a"])));
        assert!(!is_malformed(&req(Version::HTTP_10, "/", &[])));
    }

    #[test]
    fn h2_host_must_agree_with_authority() {
        assert!(is_malformed(&req(
            Version::HTTP_2,
            "http://a:80/",
            &["b:80"]
        )));
        assert!(!is_malformed(&req(
            Version::HTTP_2,
            "http://a:80/",
            &["A:80"]
        )));
        assert!(!is_malformed(&req(Version::HTTP_2, "http://a:80/", &[])));
        // HTTP/1.1 absolute-form: the URI's authority wins and Host is replaced (RFC 9112 §3.2.2).
        assert!(!is_malformed(&req(
            Version::HTTP_11,
            "http://a:80/",
            &["b"]
        )));
    }

    #[test]
    fn a_head_is_measured_as_sent() {
        let r = req(Version::HTTP_11, "/index.html", &["example.com"]);
        // "GET /index.html HTTP/1.1\r\n" + "host: example.com\r\n"
        assert_eq!(head_size(&r), 26 + 19);
        let mut big = req(Version::HTTP_11, "/", &["a"]);
        big.headers_mut().insert(
            "x-big",
            HeaderValue::from_str(&"a".repeat(MAX_REQUEST_HEAD)).unwrap(),
        );
        assert!(head_size(&big) > MAX_REQUEST_HEAD);
    }
}
