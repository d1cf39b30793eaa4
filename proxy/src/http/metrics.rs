//! `HttpMetricsLayer`: counts the request, and records its response (status, gRPC status,
//! latency, classification) when the response stream ends, or the proxy error at once. It also
//! writes the access-log line, so every request is accounted for in exactly one place.

use std::task::{Context, Poll};
use std::time::Instant;

use http::Request;
use pylon_proxy_metrics::HttpTarget;
use tower::{Layer, Service};

use super::body::{record_on_end, record_proxy_error, Pending, RecordIfCancelled, Recorder};
use super::client::{EndpointTarget, UnsentSlot};
use super::ctx::WithCtx;
use super::{BoxFuture, ProxyError, ProxyResponse};
use crate::access_log::AccessEntry;
use crate::names::EndpointNames;

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
        let mut pending = metrics.map(|metrics| {
            RecordIfCancelled::new(Pending {
                metrics,
                start,
                access,
            })
        });
        Box::pin(async move {
            let result = response.await;
            let answered = pending.as_mut().and_then(RecordIfCancelled::answered);
            match result {
                Ok(mut rsp) => {
                    if let Some(Pending {
                        metrics, access, ..
                    }) = answered
                    {
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
                    let destination = target.as_ref().map_or("", |t| &*t.destination);
                    // A request handed back unsent goes to another endpoint: the balancer says
                    // so; the client isn't answered with this error.
                    let handed_back = target
                        .as_ref()
                        .and_then(|t| t.unsent.as_ref())
                        .is_some_and(UnsentSlot::is_filled);
                    if handed_back {
                        let endpoint = target.as_ref().map(|t| tracing::field::display(t.addr));
                        tracing::debug!(direction, destination, endpoint, error = %err, "request handed back unsent");
                    } else {
                        log_proxy_error(direction, destination, target.as_ref(), err);
                    }
                    if let Some(p) = answered {
                        record_proxy_error(&p.metrics, err, start, p.access);
                    }
                    Err(err)
                }
            }
        })
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
