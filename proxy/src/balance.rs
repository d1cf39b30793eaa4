//! Load balancing: power of two choices (P2C) over PeakEWMA latency, across the live EndpointSet.
//!
//! Why not `tower::balance::p2c`: tower's balancer is a `Service` that needs `&mut self` to pick,
//! so every connection would share it through a `Buffer` (a channel hop and a task per request).
//! Here the endpoint set is an immutable snapshot behind an `ArcSwap` and each endpoint's load is
//! a pair of atomics, so any connection picks concurrently without a lock or a hop. The cost model
//! is the one tower and Finagle use: `cost = rtt_ewma * (pending + 1)`, where the RTT estimate
//! jumps to a new peak at once and decays towards lower samples.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::Request;
use tower::{Layer, Service};

use crate::accrual::EndpointHealth;
use crate::discovery::Logical;
use crate::http::body::release_on_end;
use crate::http::metrics::fail_unrouted;
use crate::http::tap::EndpointSlot;
use crate::http::{BoxFuture, ProxyError, ProxyResponse};
use crate::profiles::RouteState;

/// RTT assumed for an endpoint we have not measured yet (tower's and Linkerd's default).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How quickly old latency observations are forgotten.
const DECAY: Duration = Duration::from_secs(10);
/// The latency charged for a connection-level failure. Failing fast is not being fast: without
/// this, an endpoint that refuses every connection would look like the quickest one and attract
/// the traffic. It decays like any observation, so the endpoint is tried again later.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// The PeakEWMA load of one endpoint.
pub struct PeakEwma {
    /// RTT estimate in nanoseconds, as f64 bits.
    rtt_ns: AtomicU64,
    /// When the estimate was last updated, in `now_ns()` time.
    updated_ns: AtomicU64,
    pending: AtomicUsize,
}

/// Nanoseconds on one process-wide monotonic clock, so a pick reads the clock once for both
/// candidates.
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
        Self {
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            // A new endpoint's default estimate decays from now, like any observation.
            updated_ns: AtomicU64::new(now_ns()),
            pending: AtomicUsize::new(0),
        }
    }

    /// Lower is better. The estimate decays with time since the last observation, so an
    /// endpoint that stopped being picked (it was slow once) is tried again eventually.
    pub fn cost(&self) -> f64 {
        self.cost_at(now_ns())
    }

    /// `cost()` at a given `now_ns()` reading.
    pub fn cost_at(&self, now_ns: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let idle_ns = now_ns.saturating_sub(self.updated_ns.load(Ordering::Relaxed)) as f64;
        let decayed = rtt * (-idle_ns / DECAY.as_nanos() as f64).exp();
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        decayed * (pending + 1.0)
    }

    /// Marks a request as in flight until the returned guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            health: None,
            start: Instant::now(),
            observed: false,
        }
    }

    fn observe(&self, rtt: Duration) {
        let now_ns = now_ns();
        let last_ns = self.updated_ns.swap(now_ns, Ordering::Relaxed);
        let sample = rtt.as_nanos() as f64;
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
    start: Instant,
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
            self.load.observe(self.start.elapsed());
        }
    }

    /// The request failed without a response: `unreachable` when the endpoint could not be
    /// reached or dropped the connection (its latency estimate takes the penalty), otherwise
    /// it did not answer in time. Both count towards failure accrual.
    pub fn failed(&mut self, unreachable: bool) {
        if unreachable && !self.observed {
            self.observed = true;
            self.load.observe(self.start.elapsed().max(FAILURE_PENALTY));
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

    /// Failure accrual: an ejected endpoint is not picked.
    fn is_available(&self, _now_ns: u64) -> bool {
        true
    }
}

/// Why the balancer has nothing to pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickError {
    NoEndpoints,
    /// Every endpoint failed repeatedly and waits out its backoff.
    AllEjected,
}

impl From<PickError> for ProxyError {
    fn from(e: PickError) -> Self {
        match e {
            PickError::NoEndpoints => ProxyError::NoEndpoints,
            PickError::AllEjected => ProxyError::AllEndpointsEjected,
        }
    }
}

/// The live endpoints of one backend. Readers never lock; discovery swaps in a new set.
pub struct EndpointSet<E> {
    current: ArcSwap<Vec<Arc<E>>>,
}

impl<E: Balanced> EndpointSet<E> {
    pub fn new(endpoints: Vec<Arc<E>>) -> Self {
        Self {
            current: ArcSwap::from_pointee(endpoints),
        }
    }

    pub fn update(&self, endpoints: Vec<Arc<E>>) {
        self.current.store(Arc::new(endpoints));
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<E>>> {
        self.current.load_full()
    }

    /// P2C: two distinct endpoints at random, the one with the lower cost wins. Ejected
    /// endpoints are passed over.
    pub fn pick(&self) -> Result<Arc<E>, PickError> {
        let set = self.current.load();
        let now = now_ns();
        match set.len() {
            0 => Err(PickError::NoEndpoints),
            1 if set[0].is_available(now) => Ok(set[0].clone()),
            1 => Err(PickError::AllEjected),
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (&set[a], &set[b]);
                let winner = match (ea.is_available(now), eb.is_available(now)) {
                    (true, true) if eb.load().cost_at(now) < ea.load().cost_at(now) => eb,
                    (true, _) => ea,
                    (false, true) => eb,
                    // Both ejected: any endpoint still in, scanning from a random place.
                    (false, false) => (0..n)
                        .map(|i| &set[(a + i) % n])
                        .find(|e| e.is_available(now))
                        .ok_or(PickError::AllEjected)?,
                };
                Ok(winner.clone())
            }
        }
    }
}

/// `BalanceLayer`: picks the endpoint of the request's logical destination (P2C over PeakEWMA),
/// hands its target (with its metric handle) down as a request extension, and keeps the request in
/// flight on that endpoint until the response ends. No endpoints at all fails fast with 503.
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
        }
    }
}

#[derive(Clone, Debug)]
pub struct Balance<S> {
    inner: S,
    access_log: bool,
}

impl<S, B> Service<Request<B>> for Balance<S>
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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(logical) = req.extensions().get::<Arc<Logical>>().cloned() else {
            // LogicalLayer always runs first; without it there is nothing to balance over.
            return Box::pin(std::future::ready(Err(ProxyError::NoEndpoints)));
        };
        let endpoint = match logical.pick() {
            Ok(e) => e,
            Err(e) => {
                let err = fail_unrouted(
                    "outbound",
                    &logical.authority,
                    logical.no_endpoint_metrics(),
                    self.access_log,
                    &req,
                    e.into(),
                );
                return Box::pin(std::future::ready(Err(err)));
            }
        };
        if let Some(slot) = req.extensions().get::<EndpointSlot>() {
            // Someone is tapping: the tap layer above reports this endpoint.
            let _ = slot.0.set(endpoint.addr);
        }
        let mut in_flight = endpoint
            .load_handle()
            .start()
            .with_health(endpoint.health.clone());
        // The route's response classes decide what failure accrual counts as a failure.
        let route = req.extensions().get::<Arc<RouteState>>().cloned();
        req.extensions_mut().insert(endpoint.target.clone());
        let response = self.inner.call(req);
        Box::pin(async move {
            let mut rsp = match response.await {
                Ok(rsp) => rsp,
                Err(err) => {
                    if err.is_retryable() {
                        in_flight.failed(err.is_endpoint_failure());
                    }
                    return Err(err);
                }
            };
            in_flight.response_received();
            release_on_end(&mut rsp, in_flight, route);
            Ok(rsp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ep(Arc<PeakEwma>, u16);
    impl Balanced for Ep {
        fn load(&self) -> &PeakEwma {
            &self.0
        }
    }

    #[test]
    fn empty_set_picks_nothing() {
        let set: EndpointSet<Ep> = EndpointSet::new(vec![]);
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

    #[test]
    fn ejected_endpoints_are_passed_over() {
        let ep = |ok, id| Arc::new(Ejectable(Arc::new(PeakEwma::new()), ok, id));
        let set = EndpointSet::new(vec![ep(false, 1), ep(true, 2), ep(false, 3), ep(false, 4)]);
        for _ in 0..200 {
            assert_eq!(set.pick().map(|e| e.2).ok(), Some(2));
        }
        let all_out = EndpointSet::new(vec![ep(false, 1), ep(false, 2)]);
        assert_eq!(all_out.pick().err(), Some(PickError::AllEjected));
        let one_out = EndpointSet::new(vec![ep(false, 1)]);
        assert_eq!(one_out.pick().err(), Some(PickError::AllEjected));
    }

    #[test]
    fn peak_is_taken_at_once_and_decays() {
        let l = PeakEwma::new();
        l.observe(Duration::from_millis(500));
        let c = l.cost();
        assert!(c <= 500e6 && c > 490e6, "peak taken at once: {c}");
        std::thread::sleep(Duration::from_millis(20));
        l.observe(Duration::from_millis(1));
        let c = l.cost();
        assert!(c < 500e6 && c > 1e6, "decays gradually: {c}");
    }

    #[test]
    fn prefers_the_cheaper_endpoint() {
        let fast = Arc::new(Ep(Arc::new(PeakEwma::new()), 1));
        let slow = Arc::new(Ep(Arc::new(PeakEwma::new()), 2));
        fast.0.observe(Duration::from_millis(1));
        slow.0.observe(Duration::from_millis(100));
        let set = EndpointSet::new(vec![fast, slow]);
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
