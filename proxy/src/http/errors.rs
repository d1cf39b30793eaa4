//! Responses the proxy makes itself. Each carries `pylon-proxy-error: <reason>` so operators can
//! tell a proxy's 504 from the app's, and each is logged once at warn where it happens.
//!
//! Errors say who caused them. A client's bad or aborted request is a 4xx (or a cancelled
//! request), recorded as the client's, and never counts against an endpoint: not for failure
//! accrual, not for retries, not in the endpoint's success rate. A gRPC client gets every
//! proxy-made error as gRPC does errors: HTTP 200 with `grpc-status` and `grpc-message`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service};

use pylon_proxy_metrics::Classification;

use super::{ProxyResponse, ResponseBody};
use crate::connect::TlsFailure;

pub const PROXY_ERROR_HEADER: &str = "pylon-proxy-error";
/// Linkerd's name for the same header: Linkerd's tools (and its tap's response headers) read
/// this one, so every proxy-made response carries both.
pub const L5D_PROXY_ERROR_HEADER: &str = "l5d-proxy-error";

const GRPC_CANCELLED: u32 = 1;
const GRPC_INVALID_ARGUMENT: u32 = 3;
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_PERMISSION_DENIED: u32 = 7;
const GRPC_RESOURCE_EXHAUSTED: u32 = 8;
const GRPC_UNAVAILABLE: u32 = 14;

/// A gRPC request (`application/grpc`, `application/grpc+proto`, ...; not gRPC-Web, whose
/// errors travel in the body).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().strip_prefix(b"application/grpc"))
        .is_some_and(|rest| matches!(rest.first(), None | Some(b'+' | b';')))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no endpoints")]
    NoEndpoints,
    #[error("endpoint connection refused")]
    ConnectionRefused,
    #[error("endpoint connection reset")]
    ConnectionReset,
    /// The endpoint broke HTTP (a malformed response, most often): what was malformed, when
    /// hyper said.
    #[error("endpoint protocol error")]
    EndpointProtocol(Malformed),
    /// Mesh TLS with a meshed endpoint failed (wrong identity, unknown CA, ...). Never a
    /// reason to fall back to plaintext.
    #[error("{}", .0.reason())]
    TlsHandshake(TlsFailure),
    #[error("connect timeout")]
    ConnectTimeout,
    #[error("response timeout")]
    ResponseTimeout,
    /// The route's timeout (a ServiceProfile `timeout`, retries included) fired.
    #[error("route timeout")]
    RouteTimeout,
    #[error("destination not resolvable")]
    Unresolvable,
    #[error("missing destination authority")]
    MissingAuthority,
    #[error("malformed request")]
    MalformedRequest,
    /// The client's request body could not be parsed (a bad chunk): the client's fault.
    #[error("malformed request body")]
    MalformedRequestBody,
    /// The request's head (request line and headers) is over 64 KiB.
    #[error("request headers too large")]
    HeadersTooLarge,
    /// The client went away (or reset its stream) before its request body ended.
    #[error("client aborted request")]
    ClientAborted,
    /// The request would come back to this proxy (one of its own listeners) or has already
    /// crossed too many proxies.
    #[error("loop detected")]
    LoopDetected,
    /// The inbound policy does not let this client call this port.
    #[error("unauthorized connection")]
    Unauthorized,
}

impl ProxyError {
    pub fn status(self) -> StatusCode {
        match self {
            Self::NoEndpoints | Self::Unresolvable => StatusCode::SERVICE_UNAVAILABLE,
            Self::ConnectionRefused
            | Self::ConnectionReset
            | Self::EndpointProtocol(_)
            | Self::TlsHandshake(_) => StatusCode::BAD_GATEWAY,
            Self::ConnectTimeout | Self::ResponseTimeout | Self::RouteTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::MissingAuthority
            | Self::MalformedRequest
            | Self::MalformedRequestBody
            | Self::ClientAborted => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::FORBIDDEN,
            Self::LoopDetected => StatusCode::LOOP_DETECTED,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    /// The client caused it (a request it should not have sent, or sent only in part): its
    /// status is a 4xx, and it is recorded as the client's, never as a failure of the
    /// destination.
    pub fn caused_by_client(self) -> bool {
        self.status().is_client_error()
    }

    /// How the response counts in success rates: the client's errors are 4xx, which Linkerd's
    /// default rule (and Pylon's) calls a success of the server; every other proxy error fails.
    pub fn classification(self) -> Classification {
        if self.caused_by_client() {
            Classification::Success
        } else {
            Classification::Failure
        }
    }

    /// The gRPC status a gRPC client gets instead of the HTTP status.
    pub fn grpc_status(self) -> u32 {
        match self {
            Self::ConnectTimeout | Self::ResponseTimeout | Self::RouteTimeout => {
                GRPC_DEADLINE_EXCEEDED
            }
            Self::Unauthorized => GRPC_PERMISSION_DENIED,
            Self::MissingAuthority | Self::MalformedRequest | Self::MalformedRequestBody => {
                GRPC_INVALID_ARGUMENT
            }
            Self::ClientAborted => GRPC_CANCELLED,
            // As gRPC's own servers answer oversized metadata.
            Self::HeadersTooLarge => GRPC_RESOURCE_EXHAUSTED,
            Self::NoEndpoints
            | Self::ConnectionRefused
            | Self::ConnectionReset
            | Self::EndpointProtocol(_)
            | Self::TlsHandshake(_)
            | Self::Unresolvable
            | Self::LoopDetected => GRPC_UNAVAILABLE,
        }
    }

    /// The endpoint itself failed (not the request's budget, nor discovery): the balancer should
    /// steer away from it.
    pub fn is_endpoint_failure(self) -> bool {
        matches!(
            self,
            Self::ConnectionRefused
                | Self::ConnectionReset
                | Self::EndpointProtocol(_)
                | Self::ConnectTimeout
                | Self::TlsHandshake(_)
        )
    }

    /// A retryable route may try again after this: the endpoint failed or didn't answer in
    /// time, so another attempt (through the balancer again) may succeed.
    pub fn is_retryable(self) -> bool {
        self.is_endpoint_failure() || self == Self::ResponseTimeout
    }

    /// The value of `pylon-proxy-error` and of the `error` metric label: a fixed vocabulary.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoEndpoints => "no endpoints",
            Self::ConnectionRefused => "endpoint connection refused",
            Self::ConnectionReset => "endpoint connection reset",
            Self::EndpointProtocol(_) => "endpoint protocol error",
            Self::TlsHandshake(failure) => failure.reason(),
            Self::ConnectTimeout => "connect timeout",
            Self::ResponseTimeout => "response timeout",
            Self::RouteTimeout => "route timeout",
            Self::Unresolvable => "destination not resolvable",
            Self::MissingAuthority => "missing destination authority",
            Self::MalformedRequest => "malformed request",
            Self::MalformedRequestBody => "malformed request body",
            Self::HeadersTooLarge => "request headers too large",
            Self::ClientAborted => "client aborted request",
            Self::Unauthorized => "unauthorized connection",
            Self::LoopDetected => "loop detected",
        }
    }

    /// The reason with what the proxy knows more, for people rather than metrics: a malformed
    /// response says what hyper found malformed (`endpoint protocol error: invalid HTTP
    /// header parsed`). Linkerd's `l5d-proxy-error` carries its errors' messages so; the
    /// proxy in front of the client passes it on, and its log and tap show it. Still a fixed
    /// set of values.
    pub fn message(self) -> &'static str {
        match self {
            Self::EndpointProtocol(malformed) => malformed.message(),
            other => other.reason(),
        }
    }

    /// The response the client gets: the HTTP status with the reason as text, or for a gRPC
    /// request a trailers-only gRPC error (HTTP 200, `grpc-status`, `grpc-message`), as Linkerd
    /// answers. Both carry the reason in `pylon-proxy-error` and the [`message`] in Linkerd's
    /// `l5d-proxy-error`.
    ///
    /// [`message`]: Self::message
    pub fn response(self, grpc: bool) -> Response<ResponseBody> {
        let reason = HeaderValue::from_static(self.reason());
        let message = HeaderValue::from_static(self.message());
        if grpc {
            let mut rsp = Response::new(ResponseBody::empty());
            let headers = rsp.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(self.grpc_status()));
            // The reasons are printable ASCII without '%': valid grpc-message as they are.
            headers.insert("grpc-message", message.clone());
            headers.insert(L5D_PROXY_ERROR_HEADER, message);
            headers.insert(PROXY_ERROR_HEADER, reason);
            return rsp;
        }
        let mut rsp = Response::new(ResponseBody::full(Bytes::from(format!(
            "{}\n",
            self.message()
        ))));
        *rsp.status_mut() = self.status();
        let headers = rsp.headers_mut();
        headers.insert(L5D_PROXY_ERROR_HEADER, message);
        headers.insert(PROXY_ERROR_HEADER, reason);
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        rsp
    }

    /// Classifies a failure to connect to an endpoint.
    pub fn from_connect(err: &crate::tcp::ConnectError) -> Self {
        match err {
            crate::tcp::ConnectError::Timeout(_) => Self::ConnectTimeout,
            crate::tcp::ConnectError::Loop(_) => Self::LoopDetected,
            crate::tcp::ConnectError::Io(_, e) => Self::from_upstream(e),
            crate::tcp::ConnectError::Tls { failure, .. } => Self::TlsHandshake(*failure),
        }
    }

    /// Classifies a failure of the endpoint `connect` reaches, as [`from_upstream`]. An endpoint
    /// that broke the protocol (a malformed status line or header, a bad h2 frame) is logged
    /// here, at error, with what was malformed (the error's whole cause chain, e.g. "invalid
    /// HTTP header parsed") and which endpoint sent it: its 502 and the `error` label only say
    /// `endpoint protocol error`. Error, not warn: unlike a reset or a timeout it is a defect of
    /// that workload that retries and time won't heal, and the mesh is turning its answers into
    /// failures, so it belongs with what an operator filters for first
    /// (`jq 'select(.level == "ERROR")'`).
    ///
    /// [`from_upstream`]: Self::from_upstream
    pub fn from_endpoint(
        err: &(dyn std::error::Error + 'static),
        connect: &crate::connect::Connect,
    ) -> Self {
        let classified = Self::from_upstream(err);
        if let Self::EndpointProtocol(_) = classified {
            let names = connect.names();
            crate::error_limited!(
                "endpoint_protocol_error",
                destination = names.destination(),
                endpoint = %connect.addr(),
                endpoint_pod = names.pod(),
                endpoint_workload = names.workload(),
                endpoint_namespace = names.namespace(),
                error = %classified,
                cause = %Causes(err),
                "endpoint protocol error: {}",
                Causes(err)
            );
        }
        classified
    }

    pub fn from_upstream(err: &(dyn std::error::Error + 'static)) -> Self {
        // A meshed endpoint may refuse this proxy's certificate only after the client side of
        // the handshake is done (TLS 1.3): then the alert arrives as the first read's error.
        if let Some(failure) = TlsFailure::find(err) {
            return Self::TlsHandshake(failure);
        }
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => Self::ConnectionRefused,
                    std::io::ErrorKind::TimedOut => Self::ConnectTimeout,
                    std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof => Self::ConnectionReset,
                    _ => Self::EndpointProtocol(Malformed::Other),
                };
            }
            if let Some(h) = e.downcast_ref::<hyper::Error>() {
                if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                    return Self::ConnectionReset;
                }
                if h.is_timeout() {
                    return Self::ResponseTimeout;
                }
                if h.is_parse() || h.is_parse_status() || h.is_parse_too_large() {
                    return Self::EndpointProtocol(Malformed::of(h));
                }
            }
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                if h2.is_reset() || h2.is_go_away() || h2.is_io() {
                    return Self::ConnectionReset;
                }
            }
            cur = e.source();
        }
        Self::EndpointProtocol(Malformed::Other)
    }
}

/// What an endpoint's malformed response got wrong, as hyper reports it. hyper's messages
/// are a fixed set, and so are these: safe in a response header and in a tap event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    StatusLine,
    Version,
    Header,
    ContentLength,
    TransferEncoding,
    HeadTooLarge,
    /// Something else (hyper didn't say, or not in words we know).
    Other,
}

impl Malformed {
    /// hyper's error, by its message (hyper names its parse errors only in words).
    fn of(err: &hyper::Error) -> Self {
        if err.is_parse_status() {
            return Self::StatusLine;
        }
        if err.is_parse_too_large() {
            return Self::HeadTooLarge;
        }
        let message = err.to_string();
        match message.as_str() {
            "invalid HTTP header parsed" => Self::Header,
            "invalid content-length parsed" => Self::ContentLength,
            "invalid transfer-encoding parsed" | "unexpected transfer-encoding parsed" => {
                Self::TransferEncoding
            }
            m if m.starts_with("invalid HTTP version parsed") => Self::Version,
            _ => Self::Other,
        }
    }

    /// `endpoint protocol error`, with hyper's words for what was malformed.
    fn message(self) -> &'static str {
        match self {
            Self::StatusLine => "endpoint protocol error: invalid HTTP status-code parsed",
            Self::Version => "endpoint protocol error: invalid HTTP version parsed",
            Self::Header => "endpoint protocol error: invalid HTTP header parsed",
            Self::ContentLength => "endpoint protocol error: invalid content-length parsed",
            Self::TransferEncoding => {
                "endpoint protocol error: unexpected transfer-encoding parsed"
            }
            Self::HeadTooLarge => "endpoint protocol error: message head is too large",
            Self::Other => "endpoint protocol error",
        }
    }
}

/// An error and its sources, as one line (`outer: inner: innermost`), each message once.
pub struct Causes<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut last = String::new();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self.0);
        let mut first = true;
        while let Some(e) = cur {
            let msg = e.to_string();
            // Some errors repeat their source's message in their own; say it once.
            if !msg.is_empty() && !last.contains(&msg) {
                if !first {
                    f.write_str(": ")?;
                }
                f.write_str(&msg)?;
                first = false;
            }
            last = msg;
            cur = e.source();
        }
        Ok(())
    }
}

/// `RespondLayer`: the top of every HTTP stack. A `ProxyError` from below becomes the response
/// the client sees (status, `pylon-proxy-error`, a short body); the layer that raised it has
/// already logged and counted it.
#[derive(Clone, Copy, Debug, Default)]
pub struct RespondLayer;

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Respond {
            inner,
            not_ready: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Respond<S> {
    inner: S,
    /// The stack below failed to get ready: the next request is answered with this.
    not_ready: Option<ProxyError>,
}

impl<S, B> Service<Request<B>> for Respond<S>
where
    S: Service<Request<B>, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Unpin,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = Responded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A readiness error below becomes a response too, so this layer never fails to get
        // ready. (`StackService` calls the stack right after asking.)
        if let Poll::Ready(Err(err)) = self.inner.poll_ready(cx) {
            self.not_ready = Some(err);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = is_grpc(req.headers());
        match self.not_ready.take() {
            Some(err) => Responded::Failed(err, grpc),
            None => Responded::Inner(self.inner.call(req), grpc),
        }
    }
}

/// `Respond`'s future: the stack's response, or the response for its error (gRPC's for a gRPC
/// client). Not boxed: it is the outermost future, already in the server's own task.
pub enum Responded<F> {
    Inner(F, bool),
    Failed(ProxyError, bool),
}

impl<F> Future for Responded<F>
where
    F: Future<Output = Result<ProxyResponse, ProxyError>> + Unpin,
{
    type Output = Result<ProxyResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Matched straight out of the inner poll: a response is moved once on its way through
        // here, not into a tuple and out of it again.
        match self.get_mut() {
            Self::Inner(inner, grpc) => match Pin::new(inner).poll(cx) {
                Poll::Ready(Ok(rsp)) => Poll::Ready(Ok(rsp)),
                Poll::Ready(Err(err)) => Poll::Ready(Ok(err.response(*grpc))),
                Poll::Pending => Poll::Pending,
            },
            Self::Failed(err, grpc) => Poll::Ready(Ok(err.response(*grpc))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_statuses() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            ProxyError::from_upstream(&refused),
            ProxyError::ConnectionRefused
        );
        assert_eq!(
            ProxyError::ConnectionRefused.status(),
            StatusCode::BAD_GATEWAY
        );
        let timeout = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert_eq!(
            ProxyError::from_upstream(&timeout),
            ProxyError::ConnectTimeout
        );
        assert_eq!(
            ProxyError::ConnectTimeout.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }

    #[test]
    fn causes_read_as_one_line_each_message_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("error sending request")]
        struct Outer(#[source] Middle);
        #[derive(Debug, thiserror::Error)]
        #[error("invalid HTTP header parsed")]
        struct Middle(#[source] Inner);
        // An error that repeats its source's message in its own.
        #[derive(Debug, thiserror::Error)]
        #[error("invalid HTTP header parsed")]
        struct Inner;
        assert_eq!(
            Causes(&Outer(Middle(Inner))).to_string(),
            "error sending request: invalid HTTP header parsed"
        );
        let io = std::io::Error::other("connection closed");
        assert_eq!(Causes(&io).to_string(), "connection closed");
        // What `from_endpoint` logs them for: they are the endpoint's protocol errors.
        assert_eq!(
            ProxyError::from_upstream(&Outer(Middle(Inner))),
            ProxyError::EndpointProtocol(Malformed::Other)
        );
    }

    #[test]
    fn tls_failures_are_bad_gateways_that_count_against_the_endpoint() {
        let err = ProxyError::TlsHandshake(TlsFailure::WrongIdentity);
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        assert!(err.is_endpoint_failure());
        let rsp = err.response(false);
        let reason = rsp.headers()[PROXY_ERROR_HEADER].to_str().unwrap();
        assert!(
            reason.contains("TLS") && reason.contains("identity"),
            "{reason}"
        );
    }

    #[test]
    fn responses_carry_the_reason() {
        let rsp = ProxyError::NoEndpoints.response(false);
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rsp.headers()[PROXY_ERROR_HEADER], "no endpoints");
        assert_eq!(rsp.headers()[L5D_PROXY_ERROR_HEADER], "no endpoints");
    }

    #[test]
    fn grpc_clients_get_grpc_errors() {
        for (err, code) in [
            (ProxyError::NoEndpoints, GRPC_UNAVAILABLE),
            (ProxyError::ConnectionRefused, GRPC_UNAVAILABLE),
            (ProxyError::RouteTimeout, GRPC_DEADLINE_EXCEEDED),
            (ProxyError::ResponseTimeout, GRPC_DEADLINE_EXCEEDED),
            (ProxyError::Unauthorized, GRPC_PERMISSION_DENIED),
            (ProxyError::LoopDetected, GRPC_UNAVAILABLE),
        ] {
            let rsp = err.response(true);
            assert_eq!(rsp.status(), StatusCode::OK, "{err}");
            assert_eq!(rsp.headers()["content-type"], "application/grpc");
            assert_eq!(rsp.headers()["grpc-status"], code.to_string().as_str());
            assert_eq!(rsp.headers()["grpc-message"], err.reason());
            assert_eq!(rsp.headers()[PROXY_ERROR_HEADER], err.reason());
            assert_eq!(rsp.headers()[L5D_PROXY_ERROR_HEADER], err.reason());
            // Trailers-only: the status is in the headers and the stream ends with them.
            assert!(http_body::Body::is_end_stream(rsp.body()));
        }
    }

    #[test]
    fn grpc_is_told_by_content_type() {
        let with = |ct: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_str(ct).unwrap(),
            );
            is_grpc(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(with("application/grpc;charset=utf-8"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/json"));
        assert!(!is_grpc(&http::HeaderMap::new()));
    }

    #[test]
    fn every_reason_is_a_valid_grpc_message() {
        use crate::connect::TlsFailure as F;
        let all = [
            ProxyError::NoEndpoints,
            ProxyError::ConnectionRefused,
            ProxyError::ConnectionReset,
            ProxyError::EndpointProtocol(Malformed::Other),
            ProxyError::EndpointProtocol(Malformed::Header),
            ProxyError::EndpointProtocol(Malformed::StatusLine),
            ProxyError::TlsHandshake(F::WrongIdentity),
            ProxyError::TlsHandshake(F::UnknownCa),
            ProxyError::TlsHandshake(F::CertificateNotValidNow),
            ProxyError::TlsHandshake(F::Refused),
            ProxyError::TlsHandshake(F::NotTls),
            ProxyError::TlsHandshake(F::TimedOut),
            ProxyError::TlsHandshake(F::Other),
            ProxyError::ConnectTimeout,
            ProxyError::ResponseTimeout,
            ProxyError::RouteTimeout,
            ProxyError::Unresolvable,
            ProxyError::MissingAuthority,
            ProxyError::MalformedRequest,
            ProxyError::MalformedRequestBody,
            ProxyError::HeadersTooLarge,
            ProxyError::ClientAborted,
            ProxyError::LoopDetected,
            ProxyError::Unauthorized,
        ];
        for err in all {
            for r in [err.reason(), err.message()] {
                assert!(
                    r.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'%'),
                    "{r:?}"
                );
            }
        }
    }

    #[test]
    fn a_malformed_response_says_what_in_linkerds_header_only() {
        let err = ProxyError::EndpointProtocol(Malformed::Header);
        let rsp = err.response(false);
        assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
        // The reason stays the metrics' fixed one; the message says what was malformed.
        assert_eq!(rsp.headers()[PROXY_ERROR_HEADER], "endpoint protocol error");
        assert_eq!(
            rsp.headers()[L5D_PROXY_ERROR_HEADER],
            "endpoint protocol error: invalid HTTP header parsed"
        );
        assert_eq!(err.to_string(), "endpoint protocol error");
        assert_eq!(
            ProxyError::EndpointProtocol(Malformed::Other).message(),
            "endpoint protocol error"
        );
    }

    #[test]
    fn client_errors_are_4xx_and_never_the_endpoints() {
        for err in [
            ProxyError::MalformedRequestBody,
            ProxyError::ClientAborted,
            ProxyError::MalformedRequest,
        ] {
            assert!(err.status().is_client_error(), "{err}");
            assert!(err.caused_by_client());
            assert!(!err.is_endpoint_failure());
            assert!(!err.is_retryable());
            assert_eq!(err.classification(), Classification::Success);
        }
        assert_eq!(
            ProxyError::ConnectionReset.classification(),
            Classification::Failure
        );
    }

    /// A stack below that fails to get ready, or fails the call, as `Respond` sees it.
    #[derive(Clone)]
    struct Failing {
        ready: Result<(), ProxyError>,
        call: Result<(), ProxyError>,
    }

    impl Service<Request<()>> for Failing {
        type Response = ProxyResponse;
        type Error = ProxyError;
        type Future = std::future::Ready<Result<ProxyResponse, ProxyError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
            Poll::Ready(self.ready)
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            std::future::ready(self.call.map(|()| Response::new(ResponseBody::empty())))
        }
    }

    async fn respond(stack: Failing, grpc: bool) -> ProxyResponse {
        use tower::ServiceExt;
        let mut req = Request::new(());
        if grpc {
            req.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
        }
        let Ok(rsp) = RespondLayer.layer(stack).oneshot(req).await;
        rsp
    }

    #[tokio::test]
    async fn errors_from_below_become_the_clients_response_readiness_ones_included() {
        let ok = respond(
            Failing {
                ready: Ok(()),
                call: Ok(()),
            },
            false,
        )
        .await;
        assert_eq!(ok.status(), StatusCode::OK);

        let refused = respond(
            Failing {
                ready: Ok(()),
                call: Err(ProxyError::ConnectionRefused),
            },
            false,
        )
        .await;
        assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
        assert!(refused.headers().contains_key(L5D_PROXY_ERROR_HEADER));

        let not_ready = respond(
            Failing {
                ready: Err(ProxyError::NoEndpoints),
                call: Ok(()),
            },
            false,
        )
        .await;
        assert_eq!(not_ready.status(), StatusCode::SERVICE_UNAVAILABLE);

        // A gRPC client gets its error as a gRPC status.
        let grpc = respond(
            Failing {
                ready: Ok(()),
                call: Err(ProxyError::NoEndpoints),
            },
            true,
        )
        .await;
        assert_eq!(grpc.status(), StatusCode::OK);
        assert_eq!(grpc.headers()["grpc-status"], "14");
    }
}
