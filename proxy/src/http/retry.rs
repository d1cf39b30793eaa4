//! `RetryLayer`: on a retryable route, a failed attempt (a response its route classifies as a
//! failure, or a connection-level error) is tried again, through the balancer again, while the
//! destination's retry budget allows and the request body was kept (up to 64 KiB; see
//! `request_body`). Skipped retries are counted by reason.
//!
//! Responses are classified by their head: status and a trailers-only `grpc-status`. A gRPC
//! failure reported in trailers after a streamed body is not retried; that would need the whole
//! response held back from the client.

use std::task::{Context, Poll};

use http::{Method, Request};
use tower::{Layer, Service, ServiceExt};

use super::body::grpc_status;
use super::ctx::{RequestCtx, WithCtx};
use super::request_body::{Captured, RequestBody};
use super::{boxed_out_of_line, headers, PassThrough, ProxyError, ProxyResponse};
use crate::profiles::RouteState;

/// A safety net under the budget: no request is sent more than this many times.
const MAX_ATTEMPTS: u32 = 10;

/// Which attempt a request is (1 = the original), in its context.
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

impl<S> Service<Request<RequestBody>> for Retry<S>
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

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let route = req
            .ctx()
            .route
            .as_ref()
            .filter(|r| r.route.is_retryable() && can_replay(&req))
            .cloned();
        let Some(route) = route else {
            return PassThrough::Inner(self.inner.call(req));
        };
        route.budget.deposit();

        let (parts, body) = req.into_parts();
        let (mut body, captured) = body.capturing();
        body.ctx_mut().attempt = Some(Attempt(1));
        let head = Head::of(&parts, body.ctx());
        let first = self.inner.call(Request::from_parts(parts, body));
        // The inner service was made ready for the first call; retries ready their own clone.
        let mut inner = self.inner.clone();
        PassThrough::Own(boxed_out_of_line(move || async move {
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
                let req = head.request(body, Attempt(attempt));
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
    ctx: RequestCtx,
}

impl Head {
    fn of(parts: &http::request::Parts, ctx: &RequestCtx) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            extensions: parts.extensions.clone(),
            ctx: ctx.clone(),
        }
    }

    fn request(&self, body: &Captured, attempt: Attempt) -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::replay(body, self.ctx.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        *req.extensions_mut() = self.extensions.clone();
        req.ctx_mut().attempt = Some(attempt);
        req
    }
}

#[cfg(test)]
mod tests {
    //! The retry stage against a scripted endpoint, on tokio's paused clock.

    use std::sync::Arc;
    use std::time::Duration;

    use http::StatusCode;
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::http::test_support::{route, routed, Answer, Mock};

    const RETRYABLE: &str = "  routes:\n  - name: POST /items\n    condition: {method: POST, pathRegex: /items}\n    isRetryable: true\n";
    const NOW: Duration = Duration::ZERO;

    fn with_budget(ratio: &str, min_per_second: u32) -> String {
        format!(
            "{RETRYABLE}  retryBudget:\n    retryRatio: {ratio}\n    minRetriesPerSecond: {min_per_second}\n    ttl: 10s\n"
        )
    }

    async fn send(
        mock: &Mock,
        route: &Arc<RouteState>,
        body: &'static [u8],
    ) -> Result<ProxyResponse, ProxyError> {
        let req = routed(route, "POST", "/items", body).await;
        RetryLayer.layer(mock.clone()).oneshot(req).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_attempt_is_retried_with_the_same_body() {
        let (route, _) = route(RETRYABLE, "POST", "/items");
        let mock = Mock::new([Answer::Status(503, NOW), Answer::Status(200, NOW)]);
        let rsp = send(&mock, &route, b"hello").await.expect("a response");
        assert_eq!(rsp.status(), StatusCode::OK);
        let seen = mock.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].attempt, Some(1));
        assert_eq!(seen[1].attempt, Some(2));
        assert!(seen.iter().all(|s| &s.body[..] == b"hello"), "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_error_is_retried_and_a_client_error_is_not() {
        let (route, _) = route(RETRYABLE, "POST", "/items");
        let mock = Mock::new([
            Answer::Fail(ProxyError::ConnectionRefused, NOW),
            Answer::Status(200, NOW),
        ]);
        assert_eq!(send(&mock, &route, b"x").await.unwrap().status(), 200);
        assert_eq!(mock.attempts(), 2);
        // The client's own failures go back to it as they are.
        for err in [ProxyError::ClientAborted, ProxyError::MalformedRequestBody] {
            let mock = Mock::new([Answer::Fail(err, NOW), Answer::Status(200, NOW)]);
            assert_eq!(send(&mock, &route, b"x").await.err(), Some(err));
            assert_eq!(mock.attempts(), 1, "{err} was retried");
        }
        // A 4xx is the route's success by default: not retried.
        let mock = Mock::new([Answer::Status(404, NOW), Answer::Status(200, NOW)]);
        assert_eq!(send(&mock, &route, b"x").await.unwrap().status(), 404);
        assert_eq!(mock.attempts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_non_retryable_route_is_not_retried() {
        let (route, _) = route(RETRYABLE, "POST", "/other");
        let mock = Mock::new([Answer::Status(503, NOW), Answer::Status(200, NOW)]);
        let req = routed(&route, "POST", "/other", b"x").await;
        let rsp = RetryLayer.layer(mock.clone()).oneshot(req).await.unwrap();
        assert_eq!(rsp.status(), 503);
        assert_eq!(mock.attempts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_bounds_retries_over_its_window() {
        // 0.2 retries per request and no reserve: 10 failing requests earn 2 retries.
        let (route, _) = route(&with_budget("0.2", 0), "POST", "/items");
        let mock = Mock::new([Answer::Status(503, NOW)]);
        for _ in 0..10 {
            assert_eq!(send(&mock, &route, b"x").await.unwrap().status(), 503);
        }
        assert_eq!(mock.attempts(), 12);
        // Every request ended on a failure the budget could not pay to retry.
        assert_eq!(route.skipped_budget.get(), 10);
        // Deposits leave the window after its ttl (10 s): nothing is left to spend.
        for _ in 0..4 {
            send(&mock, &route, b"x").await.unwrap();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        let before = mock.attempts();
        send(&mock, &route, b"x").await.unwrap();
        assert_eq!(
            mock.attempts(),
            before + 1,
            "an expired deposit paid for a retry"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_allows_retries_without_traffic() {
        // minRetriesPerSecond 1 over a 10 s window: 10 retries, then none.
        let (route, _) = route(&with_budget("0", 1), "POST", "/items");
        let mock = Mock::new([
            Answer::Status(503, NOW),
            Answer::Status(503, NOW),
            Answer::Status(200, NOW),
        ]);
        let mock_fails = Mock::new([Answer::Status(503, NOW)]);
        assert_eq!(send(&mock, &route, b"x").await.unwrap().status(), 200);
        assert_eq!(mock.attempts(), 3);
        for _ in 0..10 {
            send(&mock_fails, &route, b"x").await.unwrap();
        }
        // 2 retries above, 8 more here, then the budget is spent.
        assert_eq!(mock_fails.attempts(), 10 + 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_over_64_kib_is_not_retried() {
        static BIG: [u8; 70 * 1024] = [b'z'; 70 * 1024];
        let (route, _) = route(RETRYABLE, "POST", "/items");
        let mock = Mock::new([Answer::Status(503, NOW), Answer::Status(200, NOW)]);
        let rsp = send(&mock, &route, &BIG).await.unwrap();
        assert_eq!(rsp.status(), 503);
        assert_eq!(mock.attempts(), 1);
        assert_eq!(route.skipped_body.get(), 1);
        assert_eq!(
            mock.seen.lock().unwrap()[0].body.len(),
            BIG.len(),
            "streamed whole"
        );
    }
}
