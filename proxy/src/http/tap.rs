//! Tap: while someone is tapping, each request is described to the tap registry (request,
//! response head, response end) with Pylon's facts in the metadata labels: route, retry
//! attempt, trace id, the endpoint's pod and workload, and `pylon-proxy-error` when the proxy
//! made the response. While no one is tapping each layer costs one atomic load and builds
//! nothing.
//!
//! Two layers, because a response can be made above the attempt:
//!
//! - `TapLayer` sits by the endpoint and describes each attempt (a retry is a request of its
//!   own, numbered), with the endpoint it went to. An error from below (no endpoints, a refused
//!   connection, a response timeout, a malformed response) is described as the response the
//!   client gets.
//!   An attempt a layer above abandons (a route timeout cancels the one in flight) is described
//!   as the response the proxy makes for it, not as a bare reset: the layer drops it through
//!   `body::abandon`, which tells it why.
//! - `TapRescueLayer` sits at the top of the stack, under `RespondLayer`, and describes the
//!   requests the proxy refuses before any attempt (a guard's 400/403/508, an unresolvable
//!   destination) as requests of their own, with their response.
//!
//! The two share the request's facts (copied once per tapped request) through its
//! `RequestCtx`, so the top layer knows whether an attempt was described.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http::{HeaderMap, Request};
use http_body::Body as _;
use pylon_proxy_metrics::DstLabels;
use pylon_proxy_policy::ServiceRef;
use pylon_tap_server::{Direction, RequestMeta, TapHandle, Taps};
use tower::{Layer, Service};

use super::body::abandoned_for;
use super::ctx::WithCtx;
use super::errors::is_grpc;
use super::headers::request_authority;
use super::request_body::RequestBody;
use super::{boxed_out_of_line, PassThrough, ProxyError, ProxyResponse};
use crate::access_log::trace_id;

/// What requests report besides metrics: access-log lines and tap events.
#[derive(Clone)]
pub struct Telemetry {
    pub access_log: bool,
    pub taps: Taps,
}

/// Tap events for each attempt, by the endpoint.
#[derive(Clone)]
pub struct TapLayer {
    taps: Taps,
    direction: Direction,
    /// The client of this connection.
    client: SocketAddr,
    /// The client's connection is mesh TLS (inbound).
    client_tls: bool,
}

impl TapLayer {
    pub fn new(taps: Taps, direction: Direction, client: SocketAddr) -> Self {
        Self {
            taps,
            direction,
            client,
            client_tls: false,
        }
    }

    /// Inbound: the client connected over mesh TLS (tap's `tls=true`).
    pub fn client_tls(mut self, tls: bool) -> Self {
        self.client_tls = tls;
        self
    }
}

impl<S> Layer<S> for TapLayer {
    type Service = TapService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TapService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TapService<S> {
    inner: S,
    layer: TapLayer,
}

impl<S> Service<Request<RequestBody>> for TapService<S>
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

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        if !self.layer.taps.is_tapping() {
            return PassThrough::Inner(self.inner.call(req));
        }
        // The request's facts: the rescue layer's copy, else (a tap opened meanwhile) our own.
        let tapped = req.ctx().tapped.clone();
        let own;
        let facts = match &tapped {
            Some(t) => {
                t.attempted.store(true, Ordering::Relaxed);
                &t.facts
            }
            None => {
                own = RequestFacts::of(&req);
                &own
            }
        };
        let attempt = AttemptFacts::of(&req);
        // Outbound, the balancer below picks the endpoint during `call` and notes it here.
        let slot = EndpointSlot::default();
        req.ctx_mut().endpoint_slot = Some(slot.clone());
        let response = self.inner.call(req);
        let picked = slot.0.get();
        let endpoint = attempt.target.or_else(|| picked.map(|p| p.addr));
        let endpoint_labels = picked.and_then(|p| p.labels.as_ref());
        // Mesh TLS: inbound the client's connection, outbound the endpoint's.
        let tls = match self.layer.direction {
            Direction::Inbound => self.layer.client_tls,
            Direction::Outbound => picked.is_some_and(|p| p.meshed) || attempt.meshed,
        };
        let Some(handle) = observe(
            &self.layer.taps,
            self.layer.direction,
            self.layer.client,
            facts,
            &attempt,
            endpoint,
            endpoint_labels,
            tls,
        ) else {
            return PassThrough::Inner(response);
        };
        // Should the attempt be abandoned before its response (a route timeout), the handle
        // describes the response the proxy makes instead.
        let mut pending = Pending {
            handle: Some(handle),
            grpc: is_grpc(&facts.headers),
        };
        PassThrough::Own(boxed_out_of_line(move || async move {
            let mut result = response.await;
            if let Some(mut handle) = pending.handle.take() {
                match &mut result {
                    Ok(rsp) => {
                        handle.response_init(rsp.status().as_u16(), rsp.headers(), None);
                        rsp.body_mut().tap_on_end(handle);
                    }
                    // What the client will get (a gRPC client, a gRPC error).
                    Err(err) => proxy_response(handle, *err, pending.grpc),
                }
            }
            result
        }))
    }
}

/// An attempt's handle until its response. Dropped before it, the attempt was cancelled: by
/// a layer above that answered for it (a route timeout: that response is described), else by
/// the client going away (the handle ends it as a reset).
struct Pending {
    handle: Option<TapHandle>,
    grpc: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let (Some(handle), Some(reason)) = (self.handle.take(), abandoned_for()) {
            proxy_response(handle, reason, self.grpc);
        }
    }
}

/// Tap events for the responses the proxy makes above the attempts, at the top of the stack.
#[derive(Clone)]
pub struct TapRescueLayer {
    taps: Taps,
    direction: Direction,
    /// The client of this connection.
    client: SocketAddr,
    /// Where the connection's requests go when that is known before any attempt (inbound:
    /// the workload's port).
    target: Option<SocketAddr>,
    /// The client's connection is mesh TLS (inbound).
    client_tls: bool,
}

impl TapRescueLayer {
    pub fn new(
        taps: Taps,
        direction: Direction,
        client: SocketAddr,
        target: Option<SocketAddr>,
    ) -> Self {
        Self {
            taps,
            direction,
            client,
            target,
            client_tls: false,
        }
    }

    /// Inbound: the client connected over mesh TLS (tap's `tls=true`).
    pub fn client_tls(mut self, tls: bool) -> Self {
        self.client_tls = tls;
        self
    }
}

impl<S> Layer<S> for TapRescueLayer {
    type Service = TapRescue<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TapRescue {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TapRescue<S> {
    inner: S,
    layer: TapRescueLayer,
}

impl<S> Service<Request<RequestBody>> for TapRescue<S>
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

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        if !self.layer.taps.is_tapping() {
            return PassThrough::Inner(self.inner.call(req));
        }
        let tapped = Arc::new(Tapped {
            facts: RequestFacts::of(&req),
            attempted: AtomicBool::new(false),
        });
        req.ctx_mut().tapped = Some(tapped.clone());
        let response = self.inner.call(req);
        let layer = self.layer.clone();
        PassThrough::Own(boxed_out_of_line(move || async move {
            let result = response.await;
            if let Err(err) = &result {
                layer.describe(&tapped, *err);
            }
            result
        }))
    }
}

impl TapRescueLayer {
    /// The proxy answered `err` above the attempts. An attempt that was described has said
    /// so already (an attempt abandoned for `err` too, as it was dropped); a request refused
    /// before any attempt is described here, request and response.
    fn describe(&self, tapped: &Tapped, err: ProxyError) {
        if tapped.attempted.load(Ordering::Relaxed) {
            return;
        }
        let handle = observe(
            &self.taps,
            self.direction,
            self.client,
            &tapped.facts,
            &AttemptFacts::default(),
            self.target,
            None,
            self.client_tls && self.direction == Direction::Inbound,
        );
        if let Some(handle) = handle {
            proxy_response(handle, err, is_grpc(&tapped.facts.headers));
        }
    }
}

/// One tapped request, shared by the two layers through the request's context.
pub struct Tapped {
    facts: RequestFacts,
    /// An attempt reached `TapLayer` (and was described, unless sampled out).
    attempted: AtomicBool,
}

/// Describes the response the proxy makes for `err`, and its end.
fn proxy_response(mut handle: TapHandle, err: ProxyError, grpc: bool) {
    let rsp = err.response(grpc);
    handle.response_init(rsp.status().as_u16(), rsp.headers(), Some(err.reason()));
    if let Some(len) = rsp.body().size_hint().exact() {
        handle.add_bytes(len);
    }
    handle.response_end(grpc.then(|| err.grpc_status()), None);
}

/// The endpoint the balancer picked for a tapped request (its first choice, should it refuse
/// the connection), with its discovery labels.
#[derive(Clone, Default)]
pub struct EndpointSlot(Arc<OnceLock<Picked>>);

struct Picked {
    addr: SocketAddr,
    labels: Option<DstLabels>,
    /// Reached over mesh TLS.
    meshed: bool,
}

impl EndpointSlot {
    pub fn set(&self, addr: SocketAddr, labels: Option<&DstLabels>, meshed: bool) {
        let _ = self.0.set(Picked {
            addr,
            labels: labels.cloned(),
            meshed,
        });
    }
}

/// A tapped request's facts, copied (only while someone taps).
struct RequestFacts {
    method: http::Method,
    scheme: String,
    authority: String,
    path: String,
    headers: HeaderMap,
    trace: Option<String>,
}

impl RequestFacts {
    fn of<B>(req: &Request<B>) -> Self {
        Self {
            method: req.method().clone(),
            scheme: req.uri().scheme_str().unwrap_or("http").to_owned(),
            authority: request_authority(req)
                .and_then(|a| std::str::from_utf8(a).ok())
                .unwrap_or("")
                .to_owned(),
            path: req.uri().path().to_owned(),
            headers: req.headers().clone(),
            trace: trace_id(req.headers()),
        }
    }
}

/// What the layers between the two tap layers decided for one attempt.
#[derive(Default)]
struct AttemptFacts {
    /// The endpoint, when a layer above already chose it (inbound: the workload).
    target: Option<SocketAddr>,
    destination: Option<Arc<str>>,
    route: Option<Arc<str>>,
    attempt: Option<String>,
    /// The service the attempt went to (the backend, after a split).
    service: Option<ServiceRef>,
    /// The endpoint chosen above is reached over mesh TLS.
    meshed: bool,
}

impl AttemptFacts {
    fn of(req: &Request<RequestBody>) -> Self {
        let ctx = req.ctx();
        let target = ctx.target.as_ref();
        let logical = ctx.logical.as_ref();
        let destination = target
            .map(|t| t.destination.clone())
            .or_else(|| logical.map(|l| l.authority.clone()));
        Self {
            target: target.map(|t| t.addr),
            meshed: target.is_some_and(|t| t.meshed),
            destination,
            service: logical.and_then(|l| l.service.clone()),
            route: ctx.route.as_ref().map(|r| r.route.name().clone()),
            attempt: ctx.attempt.map(|a| a.0.to_string()),
        }
    }
}

/// The endpoint labels tap passes on, as the control plane names them (`pod`, `deployment`,
/// `namespace`, ...): Linkerd's tap clients read the same keys.
fn is_endpoint_label(key: &str) -> bool {
    !matches!(key, "pod_template_hash" | "control_plane_ns")
}

#[allow(clippy::too_many_arguments)] // the request's facts, split by who knows them
fn observe(
    taps: &Taps,
    direction: Direction,
    client: SocketAddr,
    facts: &RequestFacts,
    attempt: &AttemptFacts,
    destination: Option<SocketAddr>,
    endpoint_labels: Option<&DstLabels>,
    tls: bool,
) -> Option<TapHandle> {
    let mut labels: Vec<(&str, &str)> = Vec::with_capacity(12);
    if let Some(d) = &attempt.destination {
        labels.push(("authority", d));
    } else if !facts.authority.is_empty() {
        labels.push(("authority", &facts.authority));
    }
    // Linkerd's tap labels: `true` over mesh TLS.
    labels.push(("tls", if tls { "true" } else { "no_identity" }));
    if let Some(a) = &attempt.attempt {
        labels.push(("pylon.io/retry-attempt", a));
    }
    if let Some(t) = &facts.trace {
        labels.push(("pylon.io/trace-id", t));
    }
    for (k, v) in endpoint_labels.into_iter().flat_map(|l| l.iter()) {
        if is_endpoint_label(k) {
            labels.push((k, v));
        }
    }
    // The service's own names where the endpoint's labels don't give them.
    if let Some(s) = &attempt.service {
        for (k, v) in [("namespace", &s.namespace), ("service", &s.name)] {
            if !labels.iter().any(|(have, _)| *have == k) {
                labels.push((k, v));
            }
        }
    }
    let route_labels: Vec<(&str, &str)> = attempt
        .route
        .as_deref()
        .map(|r| vec![("route", r)])
        .unwrap_or_default();
    taps.observe_request(&RequestMeta {
        direction,
        source: Some(client),
        destination,
        destination_labels: &labels,
        route_labels: &route_labels,
        method: &facts.method,
        scheme: &facts.scheme,
        authority: &facts.authority,
        path: &facts.path,
        headers: &facts.headers,
    })
}

#[cfg(test)]
mod tests {
    //! The two tap layers around the stages that make responses of their own, against a
    //! scripted endpoint on tokio's paused clock: what a tap client sees of each response the
    //! proxy makes.

    use std::time::Duration;

    use linkerd2_proxy_api::tap::{eos, tap_event, TapEvent};
    use pylon_tap_server::Matcher;
    use tokio::sync::mpsc;
    use tower::ServiceExt;

    use super::*;
    use crate::http::retry::RetryLayer;
    use crate::http::test_support::{incoming, route, routed, Answer, Mock, DST};
    use crate::http::timeout::RouteTimeoutLayer;

    const CLIENT: &str = "10.1.1.1:40000";

    fn layers(taps: &Taps) -> (TapRescueLayer, TapLayer) {
        let client = CLIENT.parse().unwrap();
        (
            TapRescueLayer::new(taps.clone(), Direction::Outbound, client, None),
            TapLayer::new(taps.clone(), Direction::Outbound, client),
        )
    }

    /// The events queued so far, as (kind, status, proxy error label, l5d-proxy-error header).
    fn drain(rx: &mut mpsc::Receiver<TapEvent>) -> Vec<(&'static str, u32, String, String)> {
        use tap_event::http::Event as H;
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            let label = ev
                .destination_meta
                .as_ref()
                .and_then(|m| m.labels.get("pylon-proxy-error"))
                .cloned()
                .unwrap_or_default();
            let Some(tap_event::Event::Http(tap_event::Http { event: Some(e) })) = ev.event else {
                panic!("not an http event")
            };
            out.push(match e {
                H::RequestInit(_) => ("req", 0, label, String::new()),
                H::ResponseInit(rsp) => {
                    let header = rsp
                        .headers
                        .iter()
                        .flat_map(|h| &h.headers)
                        .find(|h| h.name == "l5d-proxy-error")
                        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
                        .unwrap_or_default();
                    ("rsp", rsp.http_status, label, header)
                }
                H::ResponseEnd(end) => {
                    let reset = matches!(
                        end.eos.and_then(|e| e.end),
                        Some(eos::End::ResetErrorCode(_))
                    );
                    (if reset { "reset" } else { "end" }, 0, label, String::new())
                }
            });
        }
        out
    }

    fn s(v: &str) -> String {
        v.to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_timeout_is_a_504_response_not_a_reset() {
        let taps = Taps::new();
        let mut rx = taps.open(Matcher::Any, 0, 1000);
        let (route, _) = route(
            "  routes:\n  - name: GET /slow\n    condition: {method: GET, pathRegex: /slow}\n    timeout: 500ms\n",
            "GET",
            "/slow",
        );
        let (rescue, tap) = layers(&taps);
        // Never answers within the route's timeout: the attempt in flight is cancelled.
        let mock = Mock::new([Answer::Status(200, Duration::from_secs(3600))]);
        let stack = rescue.layer(RouteTimeoutLayer.layer(RetryLayer.layer(tap.layer(mock))));
        let req = routed(&route, "GET", "/slow", b"").await;
        let result = stack.oneshot(req).await;
        assert_eq!(result.err(), Some(ProxyError::RouteTimeout));
        assert_eq!(
            drain(&mut rx),
            [
                ("req", 0, s(""), s("")),
                ("rsp", 504, s("route timeout"), s("route timeout")),
                ("end", 0, s("route timeout"), s("")),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn under_retries_the_cancelled_attempt_gets_the_504() {
        let taps = Taps::new();
        let mut rx = taps.open(Matcher::Any, 0, 1000);
        let (route, _) = route(
            "  routes:\n  - name: GET /flaky\n    condition: {method: GET, pathRegex: /flaky}\n    isRetryable: true\n    timeout: 1500ms\n",
            "GET",
            "/flaky",
        );
        let (rescue, tap) = layers(&taps);
        // The first attempt fails at once, the retry hangs past the route's timeout.
        let mock = Mock::new([
            Answer::Status(503, Duration::ZERO),
            Answer::Status(200, Duration::from_secs(3600)),
        ]);
        let stack = rescue.layer(RouteTimeoutLayer.layer(RetryLayer.layer(tap.layer(mock))));
        let req = routed(&route, "GET", "/flaky", b"").await;
        assert_eq!(
            stack.oneshot(req).await.err(),
            Some(ProxyError::RouteTimeout)
        );
        assert_eq!(
            drain(&mut rx),
            [
                ("req", 0, s(""), s("")),
                ("rsp", 503, s(""), s("")),
                ("end", 0, s(""), s("")),
                ("req", 0, s(""), s("")),
                ("rsp", 504, s("route timeout"), s("route timeout")),
                ("end", 0, s("route timeout"), s("")),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_refused_before_any_attempt_is_described_whole() {
        let taps = Taps::new();
        let mut rx = taps.open(Matcher::Any, 0, 1000);
        let (rescue, _) = layers(&taps);
        // A guard above the attempts refuses it (as the inbound policy does).
        let refuse = tower::service_fn(|_req: Request<RequestBody>| {
            Box::pin(async { Err::<ProxyResponse, _>(ProxyError::Unauthorized) })
        });
        let req = http::Request::builder()
            .uri("/admin")
            .header("host", DST)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let req = incoming(req).await.map(RequestBody::streaming);
        let result = rescue.layer(refuse).oneshot(req).await;
        assert_eq!(result.err(), Some(ProxyError::Unauthorized));
        assert_eq!(
            drain(&mut rx),
            [
                ("req", 0, s(""), s("")),
                (
                    "rsp",
                    403,
                    s("unauthorized connection"),
                    s("unauthorized connection")
                ),
                ("end", 0, s("unauthorized connection"), s("")),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_below_the_attempt_is_described_once() {
        let taps = Taps::new();
        let mut rx = taps.open(Matcher::Any, 0, 1000);
        let (route, _) = route("  routes: []\n", "GET", "/");
        let (rescue, tap) = layers(&taps);
        let mock = Mock::new([Answer::Fail(ProxyError::NoEndpoints, Duration::ZERO)]);
        let stack = rescue.layer(RouteTimeoutLayer.layer(RetryLayer.layer(tap.layer(mock))));
        let req = routed(&route, "GET", "/", b"").await;
        assert_eq!(
            stack.oneshot(req).await.err(),
            Some(ProxyError::NoEndpoints)
        );
        assert_eq!(
            drain(&mut rx),
            [
                ("req", 0, s(""), s("")),
                ("rsp", 503, s("no endpoints"), s("no endpoints")),
                ("end", 0, s("no endpoints"), s("")),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_goes_away_still_ends_in_a_reset() {
        let taps = Taps::new();
        let mut rx = taps.open(Matcher::Any, 0, 1000);
        let (route, _) = route("  routes: []\n", "GET", "/");
        let (rescue, tap) = layers(&taps);
        let mock = Mock::new([Answer::Status(200, Duration::from_secs(3600))]);
        let stack = rescue.layer(RouteTimeoutLayer.layer(RetryLayer.layer(tap.layer(mock))));
        let req = routed(&route, "GET", "/", b"").await;
        let cancelled = tokio::time::timeout(Duration::from_secs(1), stack.oneshot(req)).await;
        assert!(cancelled.is_err());
        assert_eq!(
            drain(&mut rx),
            [("req", 0, s(""), s("")), ("reset", 0, s(""), s(""))]
        );
    }
}
