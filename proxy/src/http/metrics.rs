//! `HttpMetricsLayer`: counts the request, and records its response (status, gRPC status,
//! latency, classification) when the response stream ends, or the proxy error at once. It also
//! writes the access-log line, so every request is accounted for in exactly one place.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::Request;
use pylon_proxy_metrics::HttpTarget;
use tower::{Layer, Service};

use super::body::{record_on_end, record_proxy_error, Pending, RecordIfCancelled, Recorder};
use super::client::{EndpointTarget, UnsentSlot};
use super::{BoxFuture, ProxyError, ProxyResponse};
use crate::access_log::AccessEntry;
use crate::profiles::RouteState;

#[derive(Clone, Copy, Debug)]
pub struct HttpMetricsLayer {
    direction: &'static str,
    access_log: bool,
}

impl HttpMetricsLayer {
    pub fn new(direction: &'static str, access_log: bool) -> Self {
        Self {
            direction,
            access_log,
        }
    }
}

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        HttpMetrics {
            inner,
            layer: *self,
        }
    }
}

#[derive(Clone, Debug)]
pub struct HttpMetrics<S> {
    inner: S,
    layer: HttpMetricsLayer,
}

impl<S, B> Service<Request<B>> for HttpMetrics<S>
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
        let start = Instant::now();
        let direction = self.layer.direction;
        // The target (and its metric handle) is set by the layer that chose it.
        let target = req.extensions().get::<EndpointTarget>().cloned();
        let metrics = target.as_ref().map(|t| t.metrics.clone());
        // The route's response classes decide success, when a route was chosen above.
        let route = req.extensions().get::<Arc<RouteState>>().cloned();
        let access = match (&target, self.layer.access_log) {
            (Some(t), true) => {
                let mut entry = AccessEntry::new(direction, &req, &t.destination);
                entry.set_endpoint(t.addr);
                Some(entry)
            }
            _ => None,
        };
        if let Some(m) = &metrics {
            m.request();
        }
        let response = self.inner.call(req);
        let mut pending = metrics.map(|metrics| RecordIfCancelled::new(Pending { metrics, start }));
        Box::pin(async move {
            let result = response.await;
            let metrics = pending
                .as_mut()
                .and_then(RecordIfCancelled::answered)
                .map(|p| p.metrics);
            match result {
                Ok(mut rsp) => {
                    if let Some(metrics) = metrics {
                        let recorder = Recorder {
                            metrics,
                            start,
                            route,
                            access,
                        };
                        record_on_end(&mut rsp, recorder);
                    }
                    Ok(rsp)
                }
                Err(err) => {
                    let (destination, endpoint) = match &target {
                        Some(t) => (&*t.destination, Some(t.addr)),
                        None => ("", None),
                    };
                    // A request handed back unsent goes to another endpoint: the balancer says
                    // so; the client isn't answered with this error.
                    let handed_back = target
                        .as_ref()
                        .and_then(|t| t.unsent.as_ref())
                        .is_some_and(UnsentSlot::is_filled);
                    if handed_back {
                        tracing::debug!(direction, destination, endpoint = endpoint.map(tracing::field::display), error = %err, "request handed back unsent");
                    } else {
                        log_proxy_error(direction, destination, endpoint, err);
                    }
                    if let Some(m) = &metrics {
                        record_proxy_error(m, err, start, access);
                    }
                    Err(err)
                }
            }
        })
    }
}

/// Logs a proxy-made error response at warn, rate-limited: a client can cause one per request.
/// The client's own errors are a separate event, so they can't hide the destination's.
pub fn log_proxy_error(
    direction: &'static str,
    destination: &str,
    endpoint: Option<std::net::SocketAddr>,
    err: ProxyError,
) {
    let status = err.status().as_u16();
    if err.caused_by_client() {
        crate::warn_limited!("client_error", direction, destination, endpoint = endpoint.map(tracing::field::display), error = %err, "proxy error response {status} (the client's)");
    } else {
        crate::warn_limited!("proxy_error", direction, destination, endpoint = endpoint.map(tracing::field::display), error = %err, "proxy error response {status}");
    }
}

/// A request that fails before it has an endpoint (say, no endpoints at all): logged and counted
/// under the destination's own handle, then answered by `RespondLayer`.
pub fn fail_unrouted<B>(
    direction: &'static str,
    destination: &str,
    metrics: &HttpTarget,
    access_log: bool,
    req: &Request<B>,
    err: ProxyError,
) -> ProxyError {
    log_proxy_error(direction, destination, None, err);
    let access = access_log.then(|| AccessEntry::new(direction, req, destination));
    metrics.request();
    record_proxy_error(metrics, err, Instant::now(), access);
    err
}
