//! Timeouts, two layers:
//!
//! - `RouteTimeoutLayer`: the route's timeout (ServiceProfile `timeout`), over the whole
//!   request including its retries. When it fires the attempt in flight is cancelled and the
//!   client gets 504 with `pylon-proxy-error: route timeout`.
//! - `ResponseTimeoutLayer`: bounds each attempt's wait for an endpoint's response headers
//!   (`--response-timeout`); 504 `response timeout` (and a retryable route may try again).

use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tower::{Layer, Service};

use super::body::abandon;
use super::ctx::WithCtx;
use super::request_body::RequestBody;
use super::{boxed_out_of_line, PassThrough, ProxyError, ProxyResponse};

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
    S::Future: Send + Unpin + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    // Without a timeout (the default) the inner future as it is: no box around its box.
    type Future = PassThrough<S::Future, Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let response = self.inner.call(req);
        match self.timeout {
            // Dropping the inner future cancels the upstream request.
            Some(t) => PassThrough::Own(boxed_out_of_line(move || async move {
                tokio::time::timeout(t, response)
                    .await
                    .unwrap_or(Err(ProxyError::ResponseTimeout))
            })),
            None => PassThrough::Inner(response),
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

impl<S> Service<Request<RequestBody>> for RouteTimeout<S>
where
    S: Service<Request<RequestBody>, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Send + Unpin + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = PassThrough<S::Future, Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let route = req
            .ctx()
            .route
            .as_ref()
            .and_then(|r| Some((r.clone(), r.route.timeout()?)));
        let response = self.inner.call(req);
        let Some((route, timeout)) = route else {
            return PassThrough::Inner(response);
        };
        PassThrough::Own(boxed_out_of_line(move || async move {
            let mut response = response;
            let expired = tokio::time::sleep(timeout);
            tokio::pin!(expired);
            let answered = tokio::select! {
                biased;
                result = &mut response => Some(result),
                () = &mut expired => None,
            };
            if let Some(result) = answered {
                return result;
            }
            // Dropping the inner future cancels the attempt in flight; what it was recording
            // (metrics, tap) records this 504, not a client gone away.
            abandon(response, ProxyError::RouteTimeout);
            crate::warn_limited!(
                "route_timeout",
                destination = %route.dst,
                route = %route.route.name(),
                timeout_ms = timeout.as_millis() as u64,
                "route timeout: the proxy cancelled the request and answered 504"
            );
            Err(ProxyError::RouteTimeout)
        }))
    }
}

#[cfg(test)]
mod tests {
    //! Timeouts against a scripted endpoint, on tokio's paused clock: a timeout fires exactly
    //! when it should, and nothing races a real clock.

    use std::time::Duration;

    use tokio::time::Instant;
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::http::retry::RetryLayer;
    use crate::http::test_support::{route, routed, Answer, Mock};

    const SLOW: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn the_route_timeout_covers_the_request_and_its_retries() {
        let (route, _) = route(
            "  routes:\n  - name: POST /items\n    condition: {method: POST, pathRegex: /items}\n    isRetryable: true\n    timeout: 1500ms\n",
            "POST",
            "/items",
        );
        // Each attempt fails after a second: the second is cut off half-way.
        let mock = Mock::new([Answer::Status(503, SLOW)]);
        let stack = RouteTimeoutLayer.layer(RetryLayer.layer(mock.clone()));
        let start = Instant::now();
        let req = routed(&route, "POST", "/items", b"x").await;
        let result = stack.oneshot(req).await;
        assert_eq!(result.err(), Some(ProxyError::RouteTimeout));
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
        let seen = mock.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].at - start, SLOW, "the retry went at once");
    }

    #[tokio::test(start_paused = true)]
    async fn the_attempt_a_route_timeout_cancels_is_recorded_as_its_504() {
        use crate::http::route::RouteActualLayer;
        let (slow, metrics) = route(
            "  routes:\n  - name: GET /slow\n    condition: {method: GET, pathRegex: /slow}\n    timeout: 500ms\n",
            "GET",
            "/slow",
        );
        let actual = |metrics: &pylon_proxy_metrics::Metrics| {
            let mut text = String::new();
            metrics.encode(&mut text).unwrap();
            text.lines()
                .filter(|l| l.starts_with("route_actual_response_total{"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        // Cancelled by the route's timeout: the client got 504 `route timeout`, and so the
        // attempt is recorded, a failure of the destination.
        let mock = Mock::new([Answer::Status(200, SLOW)]);
        let stack = RouteTimeoutLayer.layer(RetryLayer.layer(RouteActualLayer.layer(mock)));
        let req = routed(&slow, "GET", "/slow", b"").await;
        assert_eq!(
            stack.oneshot(req).await.err(),
            Some(ProxyError::RouteTimeout)
        );
        let lines = actual(&metrics);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("status_code=\"504\"")
                && lines[0].contains("error=\"route timeout\"")
                && lines[0].contains("classification=\"failure\""),
            "{lines:#?}"
        );
        // Cancelled by the client (its future dropped): still the client's abort.
        let (plain, metrics) = route("  routes: []\n", "GET", "/");
        let mock = Mock::new([Answer::Status(200, SLOW)]);
        let stack = RouteTimeoutLayer.layer(RetryLayer.layer(RouteActualLayer.layer(mock)));
        let req = routed(&plain, "GET", "/", b"").await;
        let gone = tokio::time::timeout(Duration::from_millis(10), stack.oneshot(req)).await;
        assert!(gone.is_err());
        let lines = actual(&metrics);
        assert!(
            lines.len() == 1
                && lines[0].contains("error=\"client aborted request\"")
                && lines[0].contains("classification=\"success\""),
            "{lines:#?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_without_a_timeout_waits() {
        let (route, _) = route("  routes: []\n", "GET", "/");
        let mock = Mock::new([Answer::Status(200, Duration::from_secs(3600))]);
        let start = Instant::now();
        let req = routed(&route, "GET", "/", b"").await;
        let rsp = RouteTimeoutLayer.layer(mock).oneshot(req).await.unwrap();
        assert_eq!(rsp.status(), 200);
        assert_eq!(start.elapsed(), Duration::from_secs(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn the_response_timeout_bounds_each_attempt_and_a_retry_follows() {
        let (route, _) = route(
            "  routes:\n  - name: POST /items\n    condition: {method: POST, pathRegex: /items}\n    isRetryable: true\n",
            "POST",
            "/items",
        );
        let timeout = Duration::from_millis(200);
        // Alone: 504 response timeout after exactly 200 ms.
        let mock = Mock::new([Answer::Status(200, SLOW)]);
        let start = Instant::now();
        let req = routed(&route, "POST", "/items", b"x").await;
        let result = ResponseTimeoutLayer::new(Some(timeout))
            .layer(mock)
            .oneshot(req)
            .await;
        assert_eq!(result.err(), Some(ProxyError::ResponseTimeout));
        assert_eq!(start.elapsed(), timeout);
        // Under retries: the slow attempt is abandoned and the next one answers.
        let mock = Mock::new([
            Answer::Status(200, SLOW),
            Answer::Status(200, Duration::ZERO),
        ]);
        let stack = RetryLayer.layer(ResponseTimeoutLayer::new(Some(timeout)).layer(mock.clone()));
        let start = Instant::now();
        let req = routed(&route, "POST", "/items", b"x").await;
        let rsp = stack.oneshot(req).await.expect("the retry answers");
        assert_eq!(rsp.status(), 200);
        assert_eq!(start.elapsed(), timeout);
        assert_eq!(mock.attempts(), 2);
    }
}
