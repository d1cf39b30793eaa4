//! Timeouts, two layers:
//!
//! - `RouteTimeoutLayer`: the route's timeout (ServiceProfile `timeout`), over the whole
//!   request including its retries. When it fires the attempt in flight is cancelled and the
//!   client gets 504 with `pylon-proxy-error: route timeout`.
//! - `ResponseTimeoutLayer`: bounds each attempt's wait for an endpoint's response headers
//!   (`--response-timeout`); 504 `response timeout` (and a retryable route may try again).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tower::{Layer, Service};

use super::{BoxFuture, PassThrough, ProxyError, ProxyResponse};
use crate::profiles::RouteState;

#[derive(Clone, Copy, Debug)]
pub struct ResponseTimeoutLayer {
    timeout: Option<Duration>,
}

impl ResponseTimeoutLayer {
    pub fn new(timeout: Option<Duration>) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for ResponseTimeoutLayer {
    type Service = ResponseTimeout<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ResponseTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ResponseTimeout<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S, B> Service<Request<B>> for ResponseTimeout<S>
where
    S: Service<Request<B>, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = BoxFuture<Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let response = self.inner.call(req);
        match self.timeout {
            // Dropping the inner future cancels the upstream request.
            Some(t) => Box::pin(async move {
                tokio::time::timeout(t, response)
                    .await
                    .unwrap_or(Err(ProxyError::ResponseTimeout))
            }),
            None => Box::pin(response),
        }
    }
}

/// Applies the timeout of the route chosen above (none: no limit).
#[derive(Clone, Copy, Debug, Default)]
pub struct RouteTimeoutLayer;

impl<S> Layer<S> for RouteTimeoutLayer {
    type Service = RouteTimeout<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RouteTimeout { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RouteTimeout<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for RouteTimeout<S>
where
    S: Service<Request<B>, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Send + Unpin + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = PassThrough<S::Future, Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = req.extensions().get::<Arc<RouteState>>().cloned();
        let response = self.inner.call(req);
        let Some((route, timeout)) = route.and_then(|r| Some((r.clone(), r.route.timeout()?)))
        else {
            return PassThrough::Inner(response);
        };
        PassThrough::Own(Box::pin(async move {
            match tokio::time::timeout(timeout, response).await {
                Ok(result) => result,
                // Dropping the inner future cancels the attempt in flight.
                Err(_) => {
                    crate::warn_limited!(
                        "route_timeout",
                        destination = %route.dst,
                        route = %route.route.name(),
                        timeout_ms = timeout.as_millis() as u64,
                        "route timeout: the proxy cancelled the request and answered 504"
                    );
                    Err(ProxyError::RouteTimeout)
                }
            }
        }))
    }
}
