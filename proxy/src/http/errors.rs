//! Responses the proxy makes itself. Each carries `pylon-proxy-error: <reason>` so operators can
//! tell a proxy's 504 from the app's, and each is logged once at warn where it happens.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};

use super::{BoxFuture, ProxyResponse, ResponseBody};
use crate::connect::TlsFailure;

pub const PROXY_ERROR_HEADER: &str = "pylon-proxy-error";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no endpoints")]
    NoEndpoints,
    /// Failure accrual took every endpoint out; they are probed again after a backoff.
    #[error("all endpoints ejected after consecutive failures")]
    AllEndpointsEjected,
    #[error("endpoint connection refused")]
    ConnectionRefused,
    #[error("endpoint connection reset")]
    ConnectionReset,
    #[error("endpoint protocol error")]
    EndpointProtocol,
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
    /// The inbound policy does not let this client call this port.
    #[error("unauthorized connection")]
    Unauthorized,
}

impl ProxyError {
    pub fn status(self) -> StatusCode {
        match self {
            Self::NoEndpoints | Self::AllEndpointsEjected | Self::Unresolvable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::ConnectionRefused
            | Self::ConnectionReset
            | Self::EndpointProtocol
            | Self::TlsHandshake(_) => StatusCode::BAD_GATEWAY,
            Self::ConnectTimeout | Self::ResponseTimeout | Self::RouteTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::MissingAuthority | Self::MalformedRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::FORBIDDEN,
        }
    }

    /// The endpoint itself failed (not the request's budget, nor discovery): the balancer should
    /// steer away from it.
    pub fn is_endpoint_failure(self) -> bool {
        matches!(
            self,
            Self::ConnectionRefused
                | Self::ConnectionReset
                | Self::EndpointProtocol
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
            Self::AllEndpointsEjected => "all endpoints ejected after consecutive failures",
            Self::ConnectionRefused => "endpoint connection refused",
            Self::ConnectionReset => "endpoint connection reset",
            Self::EndpointProtocol => "endpoint protocol error",
            Self::TlsHandshake(failure) => failure.reason(),
            Self::ConnectTimeout => "connect timeout",
            Self::ResponseTimeout => "response timeout",
            Self::RouteTimeout => "route timeout",
            Self::Unresolvable => "destination not resolvable",
            Self::MissingAuthority => "missing destination authority",
            Self::MalformedRequest => "malformed request",
            Self::Unauthorized => "unauthorized connection",
        }
    }

    pub fn response(self) -> Response<ResponseBody> {
        let mut rsp = Response::new(ResponseBody::full(Bytes::from(format!(
            "{}\n",
            self.reason()
        ))));
        *rsp.status_mut() = self.status();
        let headers = rsp.headers_mut();
        headers.insert(PROXY_ERROR_HEADER, HeaderValue::from_static(self.reason()));
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
            crate::tcp::ConnectError::Io(_, e) => Self::from_upstream(e),
            crate::tcp::ConnectError::Tls { failure, .. } => Self::TlsHandshake(*failure),
        }
    }

    /// Classifies a failure to get a response from an endpoint.
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
                    _ => Self::EndpointProtocol,
                };
            }
            if let Some(h) = e.downcast_ref::<hyper::Error>() {
                if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                    return Self::ConnectionReset;
                }
                if h.is_timeout() {
                    return Self::ResponseTimeout;
                }
            }
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                if h2.is_reset() || h2.is_go_away() || h2.is_io() {
                    return Self::ConnectionReset;
                }
            }
            cur = e.source();
        }
        Self::EndpointProtocol
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
        Respond { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Respond<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Respond<S>
where
    S: Service<Request<B>, Response = ProxyResponse, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = BoxFuture<Result<ProxyResponse, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness errors below become responses too, so this layer is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            Ok(match inner.oneshot(req).await {
                Ok(rsp) => rsp,
                Err(err) => err.response(),
            })
        })
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
    fn tls_failures_are_bad_gateways_that_count_against_the_endpoint() {
        let err = ProxyError::TlsHandshake(TlsFailure::WrongIdentity);
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        assert!(err.is_endpoint_failure());
        let rsp = err.response();
        let reason = rsp.headers()[PROXY_ERROR_HEADER].to_str().unwrap();
        assert!(
            reason.contains("TLS") && reason.contains("identity"),
            "{reason}"
        );
    }

    #[test]
    fn responses_carry_the_reason() {
        let rsp = ProxyError::NoEndpoints.response();
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rsp.headers()[PROXY_ERROR_HEADER], "no endpoints");
    }
}
