//! Load balancing: power of two choices (P2C) over PeakEWMA latency, across the live EndpointSet.
//!
//! Why not `tower::balance::p2c`: tower's balancer is a `Service` that needs `&mut self` to pick,
//! so every connection would share it through a `Buffer` (a channel hop and a task per request).
//! Here the endpoint set is an immutable snapshot behind an `ArcSwap` and each endpoint's load is
//! a pair of atomics, so any connection picks concurrently without a lock or a hop. The cost model
//! is the one tower and Finagle use: `cost = rtt_ewma * (pending + 1)`, where the RTT estimate
//! jumps to a new peak at once and decays towards lower samples.
//!
//! Two things the textbook model gets wrong for a mesh, fixed here:
//! - A new endpoint starts at its peers' average estimate, not at a fixed 30 ms: against peers
//!   measured at 1 ms a 30 ms newcomer loses every comparison until its estimate has decayed
//!   below theirs (about 25 s at one request at a time), the "third pod got zero traffic" of
//!   a stale-looking endpoint set.
//! - A request whose endpoint refuses the connection has not left the proxy, so the balancer
//!   connects before handing the request down and, when that fails, tries another endpoint.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Request;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::accrual::{AccrualPolicy, DestinationHealth, EndpointHealth};
use crate::discovery::{Endpoint, Logical};
use crate::http::body::release_on_end;
use crate::http::client::{RequestShape, UnsentSlot};
use crate::http::ctx::WithCtx;
use crate::http::metrics::fail_unrouted;
use crate::http::request_body::RequestBody;
use crate::http::{boxed_out_of_line, BoxFuture, ProxyError, ProxyResponse};
use crate::names::EndpointNames;
use crate::profiles::RouteState;

/// RTT assumed for an endpoint we have not measured yet (tower's and Linkerd's default).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How quickly old latency observations are forgotten.
const DECAY: Duration = Duration::from_secs(10);
/// The latency charged for a connection-level failure. Failing fast is not being fast: without
/// this, an endpoint that refuses every connection would look like the quickest one and attract
/// the traffic. It decays like any observation, so the endpoint is tried again later.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// Endpoints a request may try to connect to before it fails. It has not left the proxy, so
/// going elsewhere is always safe; the bound keeps a dead set from costing many timeouts.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

/// The PeakEWMA load of one endpoint.
pub struct PeakEwma {
    /// RTT estimate in nanoseconds, as f64 bits.
    rtt_ns: AtomicU64,
    /// When the estimate was last updated, in `now_ns()` time.
    updated_ns: AtomicU64,
    pending: AtomicUsize,
}

/// Nanoseconds on one process-wide monotonic clock, so a pick reads the clock once for both
/// candidates. Tokio's clock, so tests of the stages that keep time (balancing, failure accrual,
/// retry budgets) can pause and advance it.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new()
    }
}

impl PeakEwma {
    pub fn new() -> Self {
        Self::with_estimate(DEFAULT_RTT.as_nanos() as f64)
    }

    /// Starts at `rtt_ns` (a new endpoint: its peers' average).
    pub fn with_estimate(rtt_ns: f64) -> Self {
        Self {
            rtt_ns: AtomicU64::new(rtt_ns.to_bits()),
            // A new endpoint's default estimate decays from now, like any observation.
            updated_ns: AtomicU64::new(now_ns()),
            pending: AtomicUsize::new(0),
        }
    }

    /// The RTT estimate at `now_ns`, decayed, without the pending requests.
    fn estimate_at(&self, now_ns: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let idle_ns = now_ns.saturating_sub(self.updated_ns.load(Ordering::Relaxed)) as f64;
        rtt * (-idle_ns / DECAY.as_nanos() as f64).exp()
    }

    /// Lower is better. The estimate decays with time since the last observation, so an
    /// endpoint that stopped being picked (it was slow once) is tried again eventually.
    pub fn cost(&self) -> f64 {
        self.cost_at(now_ns())
    }

    /// `cost()` at a given `now_ns()` reading.
    pub fn cost_at(&self, now_ns: u64) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        self.estimate_at(now_ns) * (pending + 1.0)
    }

    /// Marks a request as in flight until the returned guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.start_at(now_ns())
    }

    /// [`start`](Self::start) at a `now_ns()` reading (the pick's).
    pub fn start_at(self: &Arc<Self>, now_ns: u64) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            health: None,
            start_ns: now_ns,
            observed: false,
        }
    }

    /// An RTT of `rtt_ns` observed at `now_ns`.
    fn observe_at(&self, now_ns: u64, rtt_ns: u64) {
        let last_ns = self.updated_ns.swap(now_ns, Ordering::Relaxed);
        let sample = rtt_ns as f64;
        let elapsed = now_ns.saturating_sub(last_ns) as f64;
        let w = (-elapsed / DECAY.as_nanos() as f64).exp();
        let prev = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed)) * w;
        let next = if sample > prev {
            // Peak: react to a slowdown at once.
            sample
        } else {
            prev + sample * (1.0 - w)
        };
        // Concurrent observers may overwrite each other; either value is a fair estimate.
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    #[cfg(test)]
    fn observe(&self, rtt: Duration) {
        self.observe_at(now_ns(), rtt.as_nanos() as u64);
    }

    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

/// One request in flight on an endpoint. Record the RTT when response headers arrive; the request
/// stays pending until the response body ends (the guard drops).
pub struct InFlight {
    load: Arc<PeakEwma>,
    /// Told how the request ended, for failure accrual.
    health: Option<Arc<EndpointHealth>>,
    /// When it started, in `now_ns()` time: one clock reading gives both the RTT and the
    /// observation's time.
    start_ns: u64,
    observed: bool,
}

impl InFlight {
    pub fn with_health(mut self, health: Arc<EndpointHealth>) -> Self {
        self.health = Some(health);
        self
    }

    /// How the response was classified once it ended: failure accrual counts it.
    pub fn finished(&mut self, success: bool) {
        if let Some(h) = self.health.take() {
            if success {
                h.success()
            } else {
                h.failure()
            }
        }
    }

    pub fn response_received(&mut self) {
        if !self.observed {
            self.observed = true;
            let now = now_ns();
            self.load.observe_at(now, now.saturating_sub(self.start_ns));
        }
    }

    /// The request failed without a response: `unreachable` when the endpoint could not be
    /// reached or dropped the connection (its latency estimate takes the penalty), otherwise
    /// it did not answer in time. Both count towards failure accrual.
    pub fn failed(&mut self, unreachable: bool) {
        if unreachable && !self.observed {
            self.observed = true;
            let now = now_ns();
            let rtt = now.saturating_sub(self.start_ns);
            self.load
                .observe_at(now, rtt.max(FAILURE_PENALTY.as_nanos() as u64));
        }
        self.finished(false);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Failures before headers still teach us the endpoint is slow.
        self.response_received();
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Anything the balancer can pick.
pub trait Balanced {
    fn load(&self) -> &PeakEwma;

    /// Failure accrual: an ejected endpoint is not picked (while enough others are in).
    fn is_available(&self, _now_ns: u64) -> bool {
        true
    }
}

/// Why the balancer has nothing to pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickError {
    NoEndpoints,
}

impl From<PickError> for ProxyError {
    fn from(e: PickError) -> Self {
        match e {
            PickError::NoEndpoints => ProxyError::NoEndpoints,
        }
    }
}

/// The live endpoints of one backend. Readers never lock; discovery swaps in a new set.
pub struct EndpointSet<E> {
    current: ArcSwap<Vec<Arc<E>>>,
    /// Failure accrual's view of the whole set: how many are out, and whether too many are.
    health: Arc<DestinationHealth>,
}

impl<E: Balanced> EndpointSet<E> {
    /// A set without failure accrual (benches, tests).
    pub fn new(endpoints: Vec<Arc<E>>) -> Self {
        let health = DestinationHealth::standalone(AccrualPolicy::DISABLED);
        Self::with_health(endpoints, Arc::new(health))
    }

    /// A destination's set, sharing `health` with its endpoints' failure accrual.
    pub fn with_health(endpoints: Vec<Arc<E>>, health: Arc<DestinationHealth>) -> Self {
        health.set_endpoints(endpoints.len());
        Self {
            current: ArcSwap::from_pointee(endpoints),
            health,
        }
    }

    pub fn update(&self, endpoints: Vec<Arc<E>>) {
        self.health.set_endpoints(endpoints.len());
        self.current.store(Arc::new(endpoints));
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<E>>> {
        self.current.load_full()
    }

    pub fn health(&self) -> &Arc<DestinationHealth> {
        &self.health
    }

    /// The estimate a new endpoint starts with: the average of its peers' (those in balancing),
    /// so it competes for its share from its first request; the default when it has none.
    pub fn newcomer_estimate(&self) -> f64 {
        let now = now_ns();
        let set = self.current.load();
        let (sum, n) = set
            .iter()
            .filter(|e| e.is_available(now))
            .fold((0.0, 0u32), |(sum, n), e| {
                (sum + e.load().estimate_at(now), n + 1)
            });
        if n == 0 {
            DEFAULT_RTT.as_nanos() as f64
        } else {
            sum / f64::from(n)
        }
    }

    /// P2C: two distinct endpoints at random, the one with the lower cost wins. Ejected
    /// endpoints are passed over, unless too few are left in (then all are used).
    pub fn pick(&self) -> Result<Arc<E>, PickError> {
        self.pick_at(now_ns())
    }

    /// [`pick`](Self::pick) at a `now_ns()` reading (shared with the request's `InFlight`).
    pub fn pick_at(&self, now: u64) -> Result<Arc<E>, PickError> {
        self.p2c(&self.current.load(), now)
    }

    /// [`pick`](Self::pick) among the endpoints not in `tried`.
    pub fn pick_excluding(&self, tried: &[Arc<E>]) -> Result<Arc<E>, PickError> {
        let rest: Vec<Arc<E>> = self
            .current
            .load()
            .iter()
            .filter(|e| !tried.iter().any(|t| Arc::ptr_eq(t, e)))
            .cloned()
            .collect();
        self.p2c(&rest, now_ns())
    }

    fn p2c(&self, set: &[Arc<E>], now: u64) -> Result<Arc<E>, PickError> {
        let cheaper = |a: &Arc<E>, b: &Arc<E>| {
            if b.load().cost_at(now) < a.load().cost_at(now) {
                b.clone()
            } else {
                a.clone()
            }
        };
        match set.len() {
            0 => Err(PickError::NoEndpoints),
            1 => {
                if !set[0].is_available(now) {
                    // Ejected, and the only one: ejecting it must not make an outage.
                    self.health.panicked();
                }
                Ok(set[0].clone())
            }
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (&set[a], &set[b]);
                Ok(match (ea.is_available(now), eb.is_available(now)) {
                    (true, true) => cheaper(ea, eb),
                    _ if self.health.too_few_in() => {
                        self.health.panicked();
                        cheaper(ea, eb)
                    }
                    (true, false) => ea.clone(),
                    (false, true) => eb.clone(),
                    // Both ejected: any endpoint still in, scanning from a random place.
                    (false, false) => match (0..n)
                        .map(|i| &set[(a + i) % n])
                        .find(|e| e.is_available(now))
                    {
                        Some(e) => e.clone(),
                        None => {
                            self.health.panicked();
                            cheaper(ea, eb)
                        }
                    },
                })
            }
        }
    }
}

/// An endpoint with a connection ready for the request, and the request in flight on it.
pub struct Connected<T> {
    pub endpoint: Arc<Endpoint>,
    pub in_flight: InFlight,
    pub conn: T,
}

/// Connects to `first` with `connect`; when that fails, to another endpoint of `logical` not in
/// `tried` (the endpoints a request already failed at, added to as it goes), up to
/// [`MAX_CONNECT_ATTEMPTS`] in all. Nothing of the request has been sent while connecting, so
/// any endpoint will do. Each failed endpoint is charged as a connection failure (its latency
/// penalty, failure accrual). The error comes back with the last endpoint tried.
pub async fn connect_with_failover<T, F, Fut>(
    logical: &Logical,
    first: Arc<Endpoint>,
    tried: &mut Vec<Arc<Endpoint>>,
    mut connect: F,
) -> Result<Connected<T>, (ProxyError, Arc<Endpoint>)>
where
    F: FnMut(Arc<Endpoint>) -> Fut,
    Fut: Future<Output = Result<T, ProxyError>>,
{
    let mut endpoint = first;
    loop {
        let mut in_flight = endpoint
            .load_handle()
            .start()
            .with_health(endpoint.health.clone());
        let err = match connect(endpoint.clone()).await {
            Ok(conn) => {
                return Ok(Connected {
                    endpoint,
                    in_flight,
                    conn,
                })
            }
            Err(err) => err,
        };
        // A loop is this proxy's configuration, not the endpoint's failing.
        if err.is_endpoint_failure() {
            in_flight.failed(true);
        }
        tried.push(endpoint.clone());
        let Some(next) = next_untried(logical, tried, err) else {
            return Err((err, endpoint));
        };
        endpoint = next;
    }
}

/// Another endpoint for a request that failed with `err`, before any of it was sent, at those
/// in `tried` (the last one last); none once [`MAX_CONNECT_ATTEMPTS`] endpoints were tried.
fn next_untried(
    logical: &Logical,
    tried: &[Arc<Endpoint>],
    err: ProxyError,
) -> Option<Arc<Endpoint>> {
    if tried.len() >= MAX_CONNECT_ATTEMPTS {
        return None;
    }
    let next = logical.endpoints.pick_excluding(tried).ok()?;
    let failed = tried.last().map(|e| &e.target);
    let names = failed.map(|t| &**t.names());
    crate::warn_limited!(
        "endpoint_connect_failed",
        destination = %logical.authority,
        endpoint = failed.map(|t| tracing::field::display(t.addr)),
        endpoint_pod = names.and_then(EndpointNames::pod),
        endpoint_workload = names.and_then(EndpointNames::workload),
        endpoint_namespace = names.and_then(EndpointNames::namespace),
        error = %err,
        next = %next.addr,
        next_pod = next.target.names().pod(),
        "could not reach the endpoint; the request goes to another"
    );
    Some(next)
}

/// `BalanceLayer`: picks the endpoint of the request's logical destination (P2C over PeakEWMA)
/// with a connection ready for it (another endpoint when one can't be reached), hands its target
/// (with its metric handle) down in the `RequestCtx`, and keeps the request in flight on
/// that endpoint until the response ends. No endpoints at all fails fast with 503.
#[derive(Clone, Copy, Debug)]
pub struct BalanceLayer {
    access_log: bool,
}

impl BalanceLayer {
    pub fn new(access_log: bool) -> Self {
        Self { access_log }
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Balance {
            inner,
            access_log: self.access_log,
            spare: UnsentSlot::default(),
        }
    }
}

/// The stack below the balancer, as `Balance` and its future use it: cloned to send a request
/// again, its futures polled where they are (no box around them).
pub trait BelowBalancer:
    Service<
        Request<RequestBody>,
        Response = ProxyResponse,
        Error = ProxyError,
        Future: Send + Unpin + 'static,
    > + Clone
    + Send
    + Unpin
    + 'static
{
}

impl<S> BelowBalancer for S where
    S: Service<
            Request<RequestBody>,
            Response = ProxyResponse,
            Error = ProxyError,
            Future: Send + Unpin + 'static,
        > + Clone
        + Send
        + Unpin
        + 'static
{
}

#[derive(Clone)]
pub struct Balance<S> {
    inner: S,
    access_log: bool,
    /// The last request's slot, for the next (see `UnsentSlot::reuse`).
    spare: UnsentSlot,
}

impl<S: BelowBalancer> Service<Request<RequestBody>> for Balance<S> {
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = Balancing<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        let Some(logical) = req.ctx().logical.clone() else {
            // LogicalLayer always runs first; without it there is nothing to balance over.
            return Balancing::failed(ProxyError::NoEndpoints);
        };
        // One clock reading for the pick and the request's start on the endpoint picked.
        let now = now_ns();
        let endpoint = match logical.pick_at(now) {
            Ok(e) => e,
            Err(e) => {
                let err = fail_unrouted(
                    "outbound",
                    &logical.authority,
                    None,
                    logical.no_endpoint_metrics(),
                    self.access_log,
                    &req,
                    e.into(),
                );
                return Balancing::failed(err);
            }
        };
        if let Some(slot) = &req.ctx().endpoint_slot {
            // Someone is tapping: the tap layer above reports this endpoint (the first
            // choice, should it refuse the connection).
            slot.set(endpoint.addr, endpoint.labels(), endpoint.target.meshed);
        }
        let delivery = Delivery {
            logical,
            // The route's response classes decide what failure accrual counts as a failure.
            route: req.ctx().route.clone(),
            access_log: self.access_log,
            // A clone for a request sent again; the one made ready is used first.
            inner: self.inner.clone(),
        };
        if !endpoint.target.is_connected(RequestShape::of(&req)) {
            // Connect first (to another endpoint if this one can't be reached), then send.
            return Balancing::Own(boxed_out_of_line(move || {
                delivery.deliver(endpoint, Vec::new(), req)
            }));
        }
        // The usual case: a connection is ready, nothing to wait for before sending.
        let in_flight = endpoint
            .load_handle()
            .start_at(now)
            .with_health(endpoint.health.clone());
        let unsent = UnsentSlot::reuse(&mut self.spare);
        req.ctx_mut().target = Some(endpoint.target.with_unsent(&unsent));
        Balancing::Sending {
            response: self.inner.call(req),
            sent: Some(Sent {
                endpoint,
                in_flight,
                unsent,
                delivery,
            }),
        }
    }
}

/// `Balance`'s future. The usual case, a request sent on a ready connection, is the inner
/// future and what its end needs, with no box; a request its connection never sent goes on
/// to another endpoint (boxed: that is rare).
pub enum Balancing<S: Service<Request<RequestBody>>> {
    Sending {
        response: S::Future,
        /// Taken when the response is in.
        sent: Option<Sent<S>>,
    },
    Own(BoxFuture<Result<ProxyResponse, ProxyError>>),
}

/// A request sent to `endpoint`, until its response is in.
pub struct Sent<S> {
    endpoint: Arc<Endpoint>,
    in_flight: InFlight,
    unsent: UnsentSlot,
    delivery: Delivery<S>,
}

impl<S: Service<Request<RequestBody>>> Balancing<S> {
    fn failed(err: ProxyError) -> Self {
        Self::Own(Box::pin(std::future::ready(Err(err))))
    }
}

impl<S: BelowBalancer> Future for Balancing<S> {
    type Output = Result<ProxyResponse, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let (response, sent) = match this {
            Self::Own(f) => return f.as_mut().poll(cx),
            Self::Sending { response, sent } => (response, sent),
        };
        // Handed on as polled, the response seen where it lies (see `respond_in_place`).
        let mut polled = Pin::new(response).poll(cx);
        let Poll::Ready(result) = &mut polled else {
            return Poll::Pending;
        };
        let Some(sent) = sent.take() else {
            return polled;
        };
        if let Err(err) = *result {
            // The connection died before the request went out (its endpoint with it, as it
            // refused a new one): the request goes to another endpoint.
            if let Some(req) = sent.unsent.take() {
                charge(sent.in_flight, err);
                let delivery = sent.delivery;
                *this = Self::Own(boxed_out_of_line(move || {
                    delivery.deliver_elsewhere(vec![sent.endpoint], req, err)
                }));
                return Pin::new(this).poll(cx);
            }
        }
        respond_in_place(result, sent.in_flight, sent.delivery.route);
        polled
    }
}

/// What sending a request again needs: where it goes, and the stack below the balancer.
struct Delivery<S> {
    logical: Arc<Logical>,
    route: Option<Arc<RouteState>>,
    access_log: bool,
    inner: S,
}

impl<S> Delivery<S>
where
    S: Service<Request<RequestBody>, Response = ProxyResponse, Error = ProxyError> + Clone,
{
    /// Sends `req` to `first` with a connection made for it, or to other endpoints not in
    /// `tried` while none of the request has left the proxy (the endpoint refused to connect,
    /// or its connection closed before sending): at most [`MAX_CONNECT_ATTEMPTS`] in all.
    async fn deliver(
        self,
        mut first: Arc<Endpoint>,
        mut tried: Vec<Arc<Endpoint>>,
        mut req: Request<RequestBody>,
    ) -> Result<ProxyResponse, ProxyError> {
        let shape = RequestShape::of(&req);
        loop {
            let connected =
                connect_with_failover(&self.logical, first, &mut tried, |e| async move {
                    e.target.connect_for(shape).await
                })
                .await;
            let (endpoint, in_flight) = match connected {
                Ok(c) => (c.endpoint, c.in_flight),
                Err((err, endpoint)) => {
                    return Err(fail_unrouted(
                        "outbound",
                        &self.logical.authority,
                        Some(&endpoint.target),
                        &endpoint.target.metrics,
                        self.access_log,
                        &req,
                        err,
                    ))
                }
            };
            let unsent = UnsentSlot::default();
            req.ctx_mut().target = Some(endpoint.target.with_unsent(&unsent));
            let (err, again) = match (self.inner.clone().oneshot(req).await, unsent.take()) {
                (Err(err), Some(again)) => (err, again),
                (result, _) => return respond(result, in_flight, self.route),
            };
            charge(in_flight, err);
            tried.push(endpoint);
            let Some(next) = next_untried(&self.logical, &tried, err) else {
                return Err(err);
            };
            first = next;
            req = again;
        }
    }

    /// [`deliver`](Self::deliver) to an endpoint not in `tried`, for a request that failed
    /// unsent with `err` (the answer when no endpoint is left to try).
    async fn deliver_elsewhere(
        self,
        tried: Vec<Arc<Endpoint>>,
        req: Request<RequestBody>,
        err: ProxyError,
    ) -> Result<ProxyResponse, ProxyError> {
        match next_untried(&self.logical, &tried, err) {
            Some(next) => self.deliver(next, tried, req).await,
            None => Err(err),
        }
    }
}

/// An endpoint's failure to take a request: its load and failure accrual learn of it.
fn charge(mut in_flight: InFlight, err: ProxyError) {
    if err.is_retryable() {
        in_flight.failed(err.is_endpoint_failure());
    }
}

/// The endpoint's answer: its load and failure accrual learn how it went (when the response
/// body ends, or at once for an error).
fn respond(
    mut response: Result<ProxyResponse, ProxyError>,
    in_flight: InFlight,
    route: Option<Arc<RouteState>>,
) -> Result<ProxyResponse, ProxyError> {
    respond_in_place(&mut response, in_flight, route);
    response
}

/// `respond`, on a response left where it lies: a response (~180 bytes) moved out of a
/// result and into another is two copies per request.
fn respond_in_place(
    response: &mut Result<ProxyResponse, ProxyError>,
    mut in_flight: InFlight,
    route: Option<Arc<RouteState>>,
) {
    match response {
        Ok(rsp) => {
            in_flight.response_received();
            release_on_end(rsp, in_flight, route);
        }
        Err(err) => charge(in_flight, *err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination's shared health, with failure accrual on.
    fn health() -> Arc<DestinationHealth> {
        Arc::new(DestinationHealth::standalone(AccrualPolicy::CONSECUTIVE))
    }

    fn set_of<E: Balanced>(endpoints: Vec<Arc<E>>) -> EndpointSet<E> {
        EndpointSet::with_health(endpoints, health())
    }

    struct Ep(Arc<PeakEwma>, u16);
    impl Balanced for Ep {
        fn load(&self) -> &PeakEwma {
            &self.0
        }
    }

    #[test]
    fn empty_set_picks_nothing() {
        let set: EndpointSet<Ep> = set_of(vec![]);
        assert_eq!(set.pick().err(), Some(PickError::NoEndpoints));
    }

    struct Ejectable(Arc<PeakEwma>, bool, u16);
    impl Balanced for Ejectable {
        fn load(&self) -> &PeakEwma {
            &self.0
        }
        fn is_available(&self, _now_ns: u64) -> bool {
            self.1
        }
    }

    fn ejectable(ok: bool, id: u16) -> Arc<Ejectable> {
        Arc::new(Ejectable(Arc::new(PeakEwma::new()), ok, id))
    }

    #[test]
    fn ejected_endpoints_are_passed_over() {
        let health = health();
        let set = EndpointSet::with_health(
            vec![
                ejectable(false, 1),
                ejectable(true, 2),
                ejectable(false, 3),
                ejectable(false, 4),
            ],
            health.clone(),
        );
        for _ in 0..200 {
            assert_eq!(set.pick().map(|e| e.2).ok(), Some(2));
        }
        assert_eq!(health.panics(), 0);
    }

    #[test]
    fn with_every_endpoint_ejected_all_are_used_and_counted() {
        for endpoints in [
            vec![ejectable(false, 1)],
            vec![ejectable(false, 1), ejectable(false, 2)],
        ] {
            let n = endpoints.len();
            let health = health();
            let set = EndpointSet::with_health(endpoints, health.clone());
            for _ in 0..10 {
                assert!(set.pick().is_ok(), "{n} ejected endpoints: an outage");
            }
            assert_eq!(health.panics(), 10);
        }
    }

    #[test]
    fn too_few_left_in_means_balancing_over_all() {
        // Four endpoints, three of them out: fewer than half are in, so the ejected ones take
        // traffic too rather than the last one taking it all.
        let health = health();
        let set = EndpointSet::with_health(
            vec![
                ejectable(true, 1),
                ejectable(false, 2),
                ejectable(false, 3),
                ejectable(false, 4),
            ],
            health.clone(),
        );
        health.set_out(3);
        let picks: Vec<u16> = (0..400)
            .filter_map(|_| set.pick().ok().map(|e| e.2))
            .collect();
        let others = picks.iter().filter(|id| **id != 1).count();
        assert!(others > 100, "ejected endpoints got {others} of 400");
        assert!(health.panics() > 0);
        // Back to half out: the ejected ones are passed over again.
        health.set_out(2);
        set.update(set.snapshot().to_vec());
        let before = health.panics();
        let picks: Vec<u16> = (0..100)
            .filter_map(|_| set.pick().ok().map(|e| e.2))
            .collect();
        assert!(picks.iter().all(|id| *id == 1), "{picks:?}");
        assert_eq!(health.panics(), before);
    }

    #[test]
    fn a_retry_after_a_refused_connection_picks_another_endpoint() {
        let eps: Vec<_> = (1..=3).map(|id| ejectable(true, id)).collect();
        let set = set_of(eps.clone());
        for _ in 0..100 {
            let next = set.pick_excluding(&eps[..1]).expect("two left");
            assert_ne!(next.2, 1);
            let last = set.pick_excluding(&eps[..2]).expect("one left");
            assert_eq!(last.2, 3);
        }
        assert_eq!(set.pick_excluding(&eps).err(), Some(PickError::NoEndpoints));
    }

    /// Sends `requests` one at a time through `set`, each answered in `rtt` (paused time), and
    /// returns how many went to the endpoint with id `id`.
    async fn sequential_picks_of(
        set: &EndpointSet<Ep>,
        requests: usize,
        rtt: Duration,
        id: u16,
    ) -> usize {
        let mut picked = 0;
        for _ in 0..requests {
            let e = set.pick().expect("endpoints");
            picked += usize::from(e.1 == id);
            let in_flight = e.0.start();
            tokio::time::advance(rtt).await;
            drop(in_flight);
        }
        picked
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_takes_its_share_at_once() {
        // Three endpoints answering in 2 ms, requests one at a time: the story's third pod.
        let rtt = Duration::from_millis(2);
        let peers: Vec<_> = (1..=3)
            .map(|id| Arc::new(Ep(Arc::new(PeakEwma::new()), id)))
            .collect();
        let set = set_of(peers.clone());
        sequential_picks_of(&set, 300, rtt, 0).await;

        // Starting at its peers' average estimate, it wins its comparisons about half the time:
        // a quarter of the requests, from the first ones on.
        let newcomer = Arc::new(Ep(
            Arc::new(PeakEwma::with_estimate(set.newcomer_estimate())),
            4,
        ));
        let mut next = peers.clone();
        next.push(newcomer);
        set.update(next);
        let share = sequential_picks_of(&set, 400, rtt, 4).await;
        assert!(share >= 60, "the new endpoint got {share} of 400 requests");

        // With the fixed 30 ms start (tower's and Linkerd's) it loses every comparison for as
        // long as this test runs (0.8 s of requests; about 25 s in all).
        let stale = Arc::new(Ep(Arc::new(PeakEwma::new()), 5));
        let mut next = peers;
        next.push(stale);
        set.update(next);
        assert_eq!(sequential_picks_of(&set, 400, rtt, 5).await, 0);
    }

    #[test]
    fn the_first_endpoints_start_at_the_default() {
        let set: EndpointSet<Ep> = set_of(vec![]);
        assert_eq!(set.newcomer_estimate(), DEFAULT_RTT.as_nanos() as f64);
    }

    #[tokio::test(start_paused = true)]
    async fn peak_is_taken_at_once_and_decays() {
        let l = PeakEwma::new();
        l.observe(Duration::from_millis(500));
        assert_eq!(l.cost(), 500e6, "peak taken at once");
        tokio::time::advance(Duration::from_millis(20)).await;
        l.observe(Duration::from_millis(1));
        let c = l.cost();
        assert!(c < 500e6 && c > 490e6, "decays gradually: {c}");
    }

    #[test]
    fn prefers_the_cheaper_endpoint() {
        let fast = Arc::new(Ep(Arc::new(PeakEwma::new()), 1));
        let slow = Arc::new(Ep(Arc::new(PeakEwma::new()), 2));
        fast.0.observe(Duration::from_millis(1));
        slow.0.observe(Duration::from_millis(100));
        let set = set_of(vec![fast, slow]);
        let fast_picks = (0..1000)
            .filter(|_| set.pick().map(|e| e.1).ok() == Some(1))
            .count();
        // With two endpoints P2C compares both every time.
        assert_eq!(fast_picks, 1000);
    }

    #[test]
    fn idle_estimate_decays_towards_zero() {
        // An endpoint measured at 100 ms, looked at one decay period (10 s) later.
        let l = PeakEwma::new();
        l.rtt_ns.store(100e6_f64.to_bits(), Ordering::Relaxed);
        let later = l.updated_ns.load(Ordering::Relaxed) + DECAY.as_nanos() as u64;
        let c = l.cost_at(later);
        let expected = 100e6 * (-1.0f64).exp();
        assert!(
            (c - expected).abs() / expected < 0.05,
            "cost {c} ~ {expected}"
        );
    }

    #[test]
    fn connection_failures_make_an_endpoint_expensive() {
        let refusing = Arc::new(PeakEwma::new());
        let mut attempt = refusing.start();
        // Refused at once, yet charged like a 1 s response.
        attempt.failed(true);
        drop(attempt);
        let cost = refusing.cost();
        assert!(cost > 0.99e9 && cost <= 1e9, "cost {cost}");
    }

    #[test]
    fn pending_requests_raise_cost() {
        let l = Arc::new(PeakEwma::new());
        let base = l.cost();
        let g = l.start();
        assert!(l.cost() > base);
        assert_eq!(l.pending(), 1);
        drop(g);
        assert_eq!(l.pending(), 0);
    }
}
