//! `HttpMetricsLayer`: counts the request, and records its response (status, gRPC status,
//! latency, classification) when the response stream ends, or the proxy error at once. It also
//! writes the access-log line, so every request is accounted for in exactly one place.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::Request;
use pylon_proxy_metrics::HttpTarget;
use tower::{Layer, Service};

use super::body::{record_on_end, record_proxy_error, Pending, RecordIfCancelled, Recorder};
use super::client::{EndpointTarget, UnsentSlot};
use super::ctx::WithCtx;
use super::request_body::RequestBody;
use super::{ProxyError, ProxyResponse};
use crate::access_log::AccessEntry;
use crate::names::EndpointNames;
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

impl<S> Service<Request<RequestBody>> for HttpMetrics<S>
where
    S: Service<Request<RequestBody>, Response = ProxyResponse, Error = ProxyError>,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = Recording<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let start = Instant::now();
        let direction = self.layer.direction;
        // The target (and its metric handle) is set by the layer that chose it.
        let ctx = req.ctx();
        let target = ctx.target.clone();
        let metrics = target.as_ref().map(|t| t.metrics.clone());
        // The route's response classes decide success, when a route was chosen above.
        let route = ctx.route.clone();
        let access = match (&target, self.layer.access_log) {
            (Some(t), true) => {
                let mut entry = AccessEntry::new(direction, &req, &t.destination);
                entry.set_endpoint(t.addr, t.names());
                Some(entry)
            }
            _ => None,
        };
        if let Some(m) = &metrics {
            m.request();
        }
        let response = self.inner.call(req);
        let pending = metrics.map(|metrics| {
            RecordIfCancelled::new(Pending {
                metrics,
                start,
                access,
            })
        });
        Recording {
            response,
            direction,
            start,
            target,
            route,
            pending,
        }
    }
}

pin_project_lite::pin_project! {
    /// [`HttpMetrics`]' response future: records the response (or the proxy error) when the
    /// stack below answers. A named future rather than a boxed `async` block: one allocation
    /// and one copy fewer per request.
    pub struct Recording<F> {
        #[pin]
        response: F,
        direction: &'static str,
        start: Instant,
        target: Option<EndpointTarget>,
        route: Option<Arc<RouteState>>,
        pending: Option<RecordIfCancelled<Pending>>,
    }
}

impl<F> Future for Recording<F>
where
    F: Future<Output = Result<ProxyResponse, ProxyError>>,
{
    type Output = Result<ProxyResponse, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // Recorded in place and handed on as polled (see `route::Recorded`).
        let mut polled = this.response.poll(cx);
        let Poll::Ready(result) = &mut polled else {
            return Poll::Pending;
        };
        let answered = this.pending.as_mut().and_then(RecordIfCancelled::answered);
        match result {
            Ok(rsp) => {
                if let Some(Pending {
                    metrics, access, ..
                }) = answered
                {
                    let recorder = Recorder {
                        metrics,
                        start: *this.start,
                        route: this.route.take(),
                        access,
                    };
                    record_on_end(rsp, recorder);
                }
            }
            &mut Err(err) => {
                let direction = *this.direction;
                let target = this.target.as_ref();
                let destination = target.map_or("", |t| &*t.destination);
                // A request handed back unsent goes to another endpoint: the balancer says
                // so; the client isn't answered with this error.
                let handed_back = target
                    .and_then(|t| t.unsent.as_ref())
                    .is_some_and(UnsentSlot::is_filled);
                if handed_back {
                    let endpoint = target.map(|t| tracing::field::display(t.addr));
                    tracing::debug!(direction, destination, endpoint, error = %err, "request handed back unsent");
                } else {
                    log_proxy_error(direction, destination, target, err);
                }
                if let Some(p) = answered {
                    record_proxy_error(&p.metrics, err, *this.start, p.access);
                }
            }
        }
        polled
    }
}

/// Logs a proxy-made error response at warn, rate-limited: a client can cause one per request.
/// The client's own errors are a separate event, so they can't hide the destination's. The
/// endpoint, when there was one, is named by its address and, when discovery knows them, its
/// pod and workload.
pub fn log_proxy_error(
    direction: &'static str,
    destination: &str,
    endpoint: Option<&EndpointTarget>,
    err: ProxyError,
) {
    let status = err.status().as_u16();
    let addr = endpoint.map(|t| tracing::field::display(t.addr));
    let names = endpoint.map(|t| &**t.names());
    let pod = names.and_then(EndpointNames::pod);
    let workload = names.and_then(EndpointNames::workload);
    let namespace = names.and_then(EndpointNames::namespace);
    // An unnamed destination (a request refused before it named one) is left out.
    let destination = (!destination.is_empty()).then_some(destination);
    if err.caused_by_client() {
        crate::warn_limited!("client_error", direction, destination, endpoint = addr, endpoint_pod = pod, endpoint_workload = workload, endpoint_namespace = namespace, error = %err, "proxy error response {status} (the client's)");
    } else {
        crate::warn_limited!("proxy_error", direction, destination, endpoint = addr, endpoint_pod = pod, endpoint_workload = workload, endpoint_namespace = namespace, error = %err, "proxy error response {status}");
    }
}

/// A request that fails before it has an endpoint to send it on (none at all, or none that
/// could be reached: then `endpoint` is the last one tried): logged and counted under
/// `metrics` (the destination's own handle, or the endpoint's), then answered by
/// `RespondLayer`.
pub fn fail_unrouted<B>(
    direction: &'static str,
    destination: &str,
    endpoint: Option<&EndpointTarget>,
    metrics: &HttpTarget,
    access_log: bool,
    req: &Request<B>,
    err: ProxyError,
) -> ProxyError {
    log_proxy_error(direction, destination, endpoint, err);
    let access = access_log.then(|| {
        let mut entry = AccessEntry::new(direction, req, destination);
        if let Some(t) = endpoint {
            entry.set_endpoint(t.addr, t.names());
        }
        entry
    });
    metrics.request();
    record_proxy_error(metrics, err, Instant::now(), access);
    err
}
