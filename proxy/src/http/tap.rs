//! `TapLayer`: while someone is tapping, describes each attempt to the tap registry (request,
//! response head, response end) with Pylon's facts in the metadata labels: route, retry
//! attempt, trace id, and `pylon-proxy-error` when the proxy made the response. While no one
//! is tapping it costs one atomic load and builds nothing.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http::{HeaderMap, Request};
use pylon_tap_server::{Direction, RequestMeta, Taps};
use tower::{Layer, Service};

use super::client::EndpointTarget;
use super::errors::is_grpc;
use super::headers::request_authority;
use super::retry::Attempt;
use super::{PassThrough, ProxyError, ProxyResponse};
use crate::access_log::trace_id;
use crate::discovery::Logical;
use crate::profiles::RouteState;

/// What requests report besides metrics: access-log lines and tap events.
#[derive(Clone)]
pub struct Telemetry {
    pub access_log: bool,
    pub taps: Taps,
}

#[derive(Clone)]
pub struct TapLayer {
    taps: Taps,
    direction: Direction,
    /// The client of this connection.
    client: SocketAddr,
}

impl TapLayer {
    pub fn new(taps: Taps, direction: Direction, client: SocketAddr) -> Self {
        Self {
            taps,
            direction,
            client,
        }
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

impl<S, B> Service<Request<B>> for TapService<S>
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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if !self.layer.taps.is_tapping() {
            return PassThrough::Inner(self.inner.call(req));
        }
        // What the events need of the request, before it goes down the stack.
        let seen = Seen::of(&req);
        // Outbound, the balancer below picks the endpoint during `call` and notes it here.
        let slot = EndpointSlot::default();
        req.extensions_mut().insert(slot.clone());
        let response = self.inner.call(req);
        let destination = seen.target.or_else(|| slot.0.get().copied());
        let Some(mut handle) = self.observe(&seen, destination) else {
            return PassThrough::Inner(response);
        };
        let grpc = is_grpc(&seen.headers);
        PassThrough::Own(Box::pin(async move {
            match response.await {
                Ok(mut rsp) => {
                    handle.response_init(rsp.status().as_u16(), rsp.headers(), None);
                    rsp.body_mut().tap_on_end(handle);
                    Ok(rsp)
                }
                Err(err) => {
                    // What the client will get (a gRPC client, a gRPC error).
                    let rsp = err.response(grpc);
                    handle.response_init(rsp.status().as_u16(), rsp.headers(), Some(err.reason()));
                    handle.response_end(grpc.then(|| err.grpc_status()), None);
                    Err(err)
                }
            }
        }))
    }
}

/// Where the balancer notes the endpoint it picked, for a tapped request.
#[derive(Clone, Default)]
pub struct EndpointSlot(pub Arc<OnceLock<SocketAddr>>);

/// A tapped request's facts, copied (only while someone taps).
struct Seen {
    method: http::Method,
    scheme: String,
    authority: String,
    path: String,
    headers: HeaderMap,
    /// The endpoint, when a layer above already chose it (inbound: the workload).
    target: Option<SocketAddr>,
    destination: Option<Arc<str>>,
    route: Option<Arc<str>>,
    attempt: Option<String>,
    trace: Option<String>,
}

impl Seen {
    fn of<B>(req: &Request<B>) -> Self {
        let ext = req.extensions();
        let target = ext.get::<EndpointTarget>();
        let destination = target
            .map(|t| t.destination.clone())
            .or_else(|| ext.get::<Arc<Logical>>().map(|l| l.authority.clone()));
        Self {
            method: req.method().clone(),
            scheme: req.uri().scheme_str().unwrap_or("http").to_owned(),
            authority: request_authority(req)
                .and_then(|a| std::str::from_utf8(a).ok())
                .unwrap_or("")
                .to_owned(),
            path: req.uri().path().to_owned(),
            headers: req.headers().clone(),
            target: target.map(|t| t.addr),
            destination,
            route: ext.get::<Arc<RouteState>>().map(|r| r.route.name().clone()),
            attempt: ext.get::<Attempt>().map(|a| a.0.to_string()),
            trace: trace_id(req.headers()),
        }
    }
}

impl<S> TapService<S> {
    fn observe(
        &self,
        seen: &Seen,
        destination: Option<SocketAddr>,
    ) -> Option<pylon_tap_server::TapHandle> {
        let mut labels: Vec<(&str, &str)> = Vec::with_capacity(4);
        if let Some(d) = &seen.destination {
            labels.push(("authority", d));
        }
        labels.push(("tls", "no_identity"));
        if let Some(a) = &seen.attempt {
            labels.push(("pylon.io/retry-attempt", a));
        }
        if let Some(t) = &seen.trace {
            labels.push(("pylon.io/trace-id", t));
        }
        let route_labels: Vec<(&str, &str)> = seen
            .route
            .as_deref()
            .map(|r| vec![("route", r)])
            .unwrap_or_default();
        self.layer.taps.observe_request(&RequestMeta {
            direction: self.layer.direction,
            source: Some(self.layer.client),
            destination,
            destination_labels: &labels,
            route_labels: &route_labels,
            method: &seen.method,
            scheme: &seen.scheme,
            authority: &seen.authority,
            path: &seen.path,
            headers: &seen.headers,
        })
    }
}
