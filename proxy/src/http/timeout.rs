//! `ResponseTimeoutLayer`: bounds the wait for an endpoint's response headers
//! (`--response-timeout`); when it fires the request is cancelled and the client gets 504.

use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tower::{Layer, Service};

use super::{BoxFuture, ProxyError, ProxyResponse};

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
