//! `RetryLayer`: on a retryable route, a failed attempt (a response its route classifies as a
//! failure, or a connection-level error) is tried again, through the balancer again, while the
//! destination's retry budget allows and the request body was kept (up to 64 KiB; see
//! `request_body`). Skipped retries are counted by reason.
//!
//! Responses are classified by their head: status and a trailers-only `grpc-status`. A gRPC
//! failure reported in trailers after a streamed body is not retried; that would need the whole
//! response held back from the client.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request};
use hyper::body::Incoming;
use tower::{Layer, Service, ServiceExt};

use super::body::grpc_status;
use super::request_body::RequestBody;
use super::{headers, PassThrough, ProxyError, ProxyResponse};
use crate::profiles::RouteState;

/// A safety net under the budget: no request is sent more than this many times.
const MAX_ATTEMPTS: u32 = 10;

/// Which attempt a request is (1 = the original), as a request extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt(pub u32);

#[derive(Clone, Copy, Debug, Default)]
pub struct RetryLayer;

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Retry { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
}

impl<S> Service<Request<Incoming>> for Retry<S>
where
    S: Service<Request<RequestBody>, Response = ProxyResponse, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + Unpin + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = PassThrough<S::Future, Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let route = req
            .extensions()
            .get::<Arc<RouteState>>()
            .filter(|r| r.route.is_retryable() && can_replay(&req))
            .cloned();
        let Some(route) = route else {
            return PassThrough::Inner(self.inner.call(req.map(RequestBody::streaming)));
        };
        route.budget.deposit();

        let (mut parts, body) = req.into_parts();
        let (body, captured) = RequestBody::capturing(body);
        parts.extensions.insert(Attempt(1));
        let head = Head::of(&parts);
        let first = self.inner.call(Request::from_parts(parts, body));
        // The inner service was made ready for the first call; retries ready their own clone.
        let mut inner = self.inner.clone();
        PassThrough::Own(Box::pin(async move {
            let mut result = first.await;
            let mut attempt = 1;
            while attempt < MAX_ATTEMPTS && is_failure(&route, &result) {
                let Some(body) = captured.get() else {
                    route.skipped_body.inc();
                    break;
                };
                if !route.budget.withdraw() {
                    route.skipped_budget.inc();
                    tracing::debug!(destination = %route.dst, route = %route.route.name(), "retry budget exhausted");
                    break;
                }
                // The failed response records its attempt (and its endpoint's failure).
                if let Ok(rsp) = result {
                    rsp.into_body().discard();
                }
                attempt += 1;
                let req = head.request(RequestBody::replay(body), Attempt(attempt));
                inner.ready().await?;
                result = inner.call(req).await;
            }
            result
        }))
    }
}

/// Upgrades and CONNECT hand the connection over; they can't be sent twice.
fn can_replay<B>(req: &Request<B>) -> bool {
    req.method() != Method::CONNECT && !headers::wants_upgrade(req.headers())
}

fn is_failure(route: &RouteState, result: &Result<ProxyResponse, ProxyError>) -> bool {
    match result {
        Ok(rsp) => !route
            .classify(rsp.status().as_u16(), grpc_status(rsp.headers()))
            .is_success(),
        Err(e) => e.is_retryable(),
    }
}

/// What a retry needs of the original request besides its body.
struct Head {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    extensions: http::Extensions,
}

impl Head {
    fn of(parts: &http::request::Parts) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            extensions: parts.extensions.clone(),
        }
    }

    fn request(&self, body: RequestBody, attempt: Attempt) -> Request<RequestBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        *req.extensions_mut() = self.extensions.clone();
        req.extensions_mut().insert(attempt);
        req
    }
}
