//! Failure accrual: an endpoint that fails `max_failures` (7) times in a row (responses its
//! route classifies as failures, or connection errors) is ejected from balancing, then probed
//! again after a backoff that starts at 1 s and doubles up to 60 s, jittered so a fleet of
//! proxies doesn't probe in step. A success restores it; a failed probe ejects it again for
//! longer. Ejections are logged and counted (`endpoint_ejections_total`).
//!
//! Accrual must never turn one bad path into an outage of the whole destination. At most half
//! of a destination's endpoints are out (ejected, or probing after an ejection) at a time, as
//! Envoy caps its ejections: the ejection that would pass that share is skipped, logged and
//! counted (`endpoint_ejections_capped_total`), so a one-endpoint service is never ejected at
//! all. And when fewer than half are left in anyway (the endpoint set shrank under the
//! ejected ones), the balancer ignores ejections and uses them all, as Envoy's panic threshold
//! does (`balancer_panic_total`, logged).
//!
//! Off unless asked for, as in Linkerd (`--failure-accrual consecutive` for every destination,
//! or Linkerd's annotations on a Service: `balancer.linkerd.io/failure-accrual: consecutive` and
//! `balancer.linkerd.io/failure-accrual-consecutive-{max-failures,min-penalty,max-penalty,
//! jitter-ratio}`, or `disabled`). Without it, PeakEWMA already steers away from slow and
//! refusing endpoints, and a refused connection goes to another endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use pylon_proxy_metrics::{Direction, EventCounter, LazyHandle, Metrics, TargetLabels, Tls};

use crate::balance::now_ns;
use crate::names::EndpointNames;

const ANNOTATION: &str = "balancer.linkerd.io/failure-accrual";
const ANNOTATION_PREFIX: &str = "balancer.linkerd.io/failure-accrual-consecutive-";

/// How one destination's endpoints accrue failures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccrualPolicy {
    /// Consecutive failures that eject an endpoint; 0 disables accrual.
    pub max_failures: u32,
    pub min_penalty: Duration,
    pub max_penalty: Duration,
    /// Each backoff is scaled by a random factor in `1 ± jitter / 2`.
    pub jitter: f64,
}

impl AccrualPolicy {
    /// Linkerd's consecutive-failure defaults: 7 failures, 1 s doubling to 60 s, jitter 0.5.
    pub const CONSECUTIVE: Self = Self {
        max_failures: 7,
        min_penalty: Duration::from_secs(1),
        max_penalty: Duration::from_secs(60),
        jitter: 0.5,
    };

    pub const DISABLED: Self = Self {
        max_failures: 0,
        ..Self::CONSECUTIVE
    };

    /// The policy a Service's annotations ask for, starting from the proxy's default. Bad
    /// values are named in the returned problems and leave that setting at its default.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
        default: Self,
    ) -> (Self, Vec<String>) {
        let mut policy = default;
        let mut problems = Vec::new();
        match annotations.get(ANNOTATION).map(|v| v.trim()) {
            None => {}
            Some("consecutive") if policy.max_failures == 0 => {
                policy.max_failures = Self::CONSECUTIVE.max_failures
            }
            Some("consecutive") => {}
            Some("disabled" | "none") => policy.max_failures = 0,
            Some(other) => problems.push(format!(
                "{ANNOTATION}: {other:?} is not one of consecutive, disabled"
            )),
        }
        if policy.max_failures == 0 {
            return (policy, problems);
        }
        for (key, value) in annotations {
            let Some(setting) = key.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let ok = match setting {
                "max-failures" => value
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map(|n| policy.max_failures = n),
                "min-penalty" => pylon_proxy_policy::duration::parse(value)
                    .ok()
                    .map(|d| policy.min_penalty = d),
                "max-penalty" => pylon_proxy_policy::duration::parse(value)
                    .ok()
                    .map(|d| policy.max_penalty = d),
                "jitter-ratio" => value
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=2.0).contains(r))
                    .map(|r| policy.jitter = r),
                _ => None,
            };
            if ok.is_none() {
                problems.push(format!("{key}: invalid value {value:?}"));
            }
        }
        if policy.max_penalty < policy.min_penalty {
            problems.push(format!(
                "{ANNOTATION_PREFIX}max-penalty is below min-penalty; using min-penalty for both"
            ));
            policy.max_penalty = policy.min_penalty;
        }
        (policy, problems)
    }

    /// min_penalty doubling per ejection in a row, up to max_penalty, jittered.
    fn backoff(&self, level: u32) -> Duration {
        let base = self
            .min_penalty
            .saturating_mul(1u32 << level.min(20))
            .min(self.max_penalty);
        let spread = self.jitter / 2.0;
        let factor = if spread > 0.0 {
            rand::random_range(1.0 - spread..1.0 + spread)
        } else {
            1.0
        };
        base.mul_f64(factor.max(0.0)).min(self.max_penalty)
    }
}

/// What one destination's endpoints share: the policy, and how many of them are out.
pub struct DestinationHealth {
    /// The destination's policy (its Service's annotations, else the proxy's default).
    policy: ArcSwap<AccrualPolicy>,
    /// Endpoints in the destination's current set.
    endpoints: AtomicUsize,
    /// How many endpoints are out: ejected, or probing after an ejection until a success.
    out: AtomicUsize,
    authority: Arc<str>,
    /// `balancer_panic_total`, made on first use (a destination that never panics has no
    /// series).
    panic: LazyHandle<EventCounter>,
}

impl DestinationHealth {
    pub fn new(
        policy: AccrualPolicy,
        authority: Arc<str>,
        panic: LazyHandle<EventCounter>,
    ) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            endpoints: AtomicUsize::new(0),
            out: AtomicUsize::new(0),
            authority,
            panic,
        }
    }

    /// A destination with a metric registry of its own (benches, tests).
    pub fn standalone(policy: AccrualPolicy) -> Self {
        let metrics = Metrics::new(Default::default());
        let labels = TargetLabels::new(Direction::Outbound, "", "", Tls::NoIdentity("standalone"));
        Self::new(policy, "".into(), LazyHandle::new(&metrics, labels))
    }

    /// How many requests were balanced over every endpoint.
    #[cfg(test)]
    pub fn panics(&self) -> u64 {
        self.panic.get(Metrics::balancer_panic).get()
    }

    pub fn policy(&self) -> AccrualPolicy {
        **self.policy.load()
    }

    pub fn set_policy(&self, policy: AccrualPolicy) {
        self.policy.store(Arc::new(policy));
    }

    /// The destination's endpoint set now has `n` endpoints.
    pub fn set_endpoints(&self, n: usize) {
        self.endpoints.store(n, Ordering::Release);
    }

    /// The most endpoints that may be out at once: half, rounded down (none of one).
    fn max_out(endpoints: usize) -> usize {
        endpoints / 2
    }

    /// Takes a place among the endpoints that may be out; `false` when they are all taken.
    fn take_out(&self) -> bool {
        let max = Self::max_out(self.endpoints.load(Ordering::Acquire));
        self.out
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |out| {
                (out < max).then_some(out + 1)
            })
            .is_ok()
    }

    fn put_back(&self) {
        let _ = self
            .out
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |out| {
                Some(out.saturating_sub(1))
            });
    }

    /// Fewer than half of the endpoints are in (the set shrank under the ejected ones): the
    /// balancer should use them all rather than overload the few, or fail.
    pub fn too_few_in(&self) -> bool {
        let endpoints = self.endpoints.load(Ordering::Acquire);
        self.out.load(Ordering::Acquire) > Self::max_out(endpoints)
    }

    #[cfg(test)]
    pub fn set_out(&self, n: usize) {
        self.out.store(n, Ordering::Release);
    }

    /// A request balanced over every endpoint, ejected ones included.
    pub fn panicked(&self) {
        self.panic.get(Metrics::balancer_panic).inc();
        crate::warn_limited!(
            "balancer_panic",
            destination = %self.authority,
            endpoints = self.endpoints.load(Ordering::Relaxed),
            out = self.out.load(Ordering::Relaxed),
            "too few endpoints left in after failure accrual; balancing over all of them"
        );
    }
}

/// The health of one endpoint, shared by every request to it.
pub struct EndpointHealth {
    consecutive: AtomicU32,
    /// `now_ns()` until which the endpoint is ejected; 0 when it never was or has recovered.
    ejected_until_ns: AtomicU64,
    /// Out: ejected, or probing after an ejection (counted in the destination's `out`).
    out: AtomicBool,
    /// Ejections since the last success (the backoff exponent). The lock orders ejections and
    /// recoveries, which are rare; requests read the atomics above.
    ejections_in_a_row: Mutex<u32>,
    destination: Arc<DestinationHealth>,
    addr: SocketAddr,
    /// Its pod and workload, for the logs.
    names: Arc<EndpointNames>,
    ejections: EventCounter,
    capped: EventCounter,
}

impl EndpointHealth {
    pub fn new(
        destination: Arc<DestinationHealth>,
        addr: SocketAddr,
        ejections: EventCounter,
        capped: EventCounter,
    ) -> Self {
        Self {
            consecutive: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
            out: AtomicBool::new(false),
            ejections_in_a_row: Mutex::new(0),
            destination,
            addr,
            names: EndpointNames::unknown(),
            ejections,
            capped,
        }
    }

    /// Discovery's names for the endpoint, for the logs.
    pub fn named(mut self, names: Arc<EndpointNames>) -> Self {
        self.names = names;
        self
    }

    /// Whether the balancer may pick this endpoint now (an ejection whose backoff has passed
    /// lets requests through as probes).
    pub fn is_available(&self, now_ns: u64) -> bool {
        now_ns >= self.ejected_until_ns.load(Ordering::Acquire)
    }

    pub fn success(&self) {
        // Reads first: a success changes nothing on a healthy endpoint, and a write per
        // request would bounce the cache line between cores.
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Release);
        }
        if self.out.load(Ordering::Acquire) {
            self.recover();
        }
    }

    fn recover(&self) {
        let mut level = self.lock();
        if self.out.swap(false, Ordering::AcqRel) {
            *level = 0;
            self.ejected_until_ns.store(0, Ordering::Release);
            self.destination.put_back();
            tracing::info!(
                destination = %self.destination.authority,
                endpoint = %self.addr,
                endpoint_pod = self.names.pod(),
                endpoint_workload = self.names.workload(),
                endpoint_namespace = self.names.namespace(),
                "endpoint recovered; back in balancing"
            );
        }
    }

    pub fn failure(&self) {
        self.failure_at(now_ns())
    }

    fn failure_at(&self, now: u64) {
        let failures = self
            .consecutive
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let policy = self.destination.policy();
        if policy.max_failures == 0 || failures < policy.max_failures {
            return;
        }
        if now < self.ejected_until_ns.load(Ordering::Acquire) {
            // Already ejected: requests that were in flight are still failing.
            return;
        }
        let mut level = self.lock();
        if now < self.ejected_until_ns.load(Ordering::Acquire) {
            return;
        }
        if !self.out.load(Ordering::Acquire) {
            // Its first ejection: only while at least half of its destination stays in.
            if !self.destination.take_out() {
                self.consecutive.store(0, Ordering::Release);
                self.capped.inc();
                crate::warn_limited!(
                    "ejection_capped",
                    destination = %self.destination.authority,
                    endpoint = %self.addr,
                    endpoint_pod = self.names.pod(),
                    endpoint_workload = self.names.workload(),
                    endpoint_namespace = self.names.namespace(),
                    consecutive_failures = failures,
                    "endpoint not ejected: at most half of a destination's endpoints are taken out"
                );
                return;
            }
            self.out.store(true, Ordering::Release);
        }
        let backoff = policy.backoff(*level);
        *level = level.saturating_add(1);
        self.ejected_until_ns.store(
            now.saturating_add(backoff.as_nanos() as u64),
            Ordering::Release,
        );
        self.ejections.inc();
        tracing::warn!(
            destination = %self.destination.authority,
            endpoint = %self.addr,
            endpoint_pod = self.names.pod(),
            endpoint_workload = self.names.workload(),
            endpoint_namespace = self.names.namespace(),
            consecutive_failures = failures,
            backoff_ms = backoff.as_millis() as u64,
            "endpoint ejected after consecutive failures"
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u32> {
        self.ejections_in_a_row
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for EndpointHealth {
    fn drop(&mut self) {
        if *self.out.get_mut() {
            self.destination.put_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = AccrualPolicy::CONSECUTIVE.max_failures;
    /// Backoffs are jittered by at most ±25 % around 1 s, 2 s, ...
    const SECOND: u64 = 1_000_000_000;

    fn destination(endpoints: usize, policy: AccrualPolicy) -> Arc<DestinationHealth> {
        let d = Arc::new(DestinationHealth::standalone(policy));
        d.set_endpoints(endpoints);
        d
    }

    fn health(destination: &Arc<DestinationHealth>, port: u16) -> EndpointHealth {
        let metrics = pylon_proxy_metrics::Metrics::new(Default::default());
        let labels = pylon_proxy_metrics::TargetLabels::new(
            pylon_proxy_metrics::Direction::Outbound,
            "web:80",
            format!("127.0.0.1:{port}"),
            pylon_proxy_metrics::Tls::NoIdentity("test"),
        );
        EndpointHealth::new(
            destination.clone(),
            SocketAddr::from(([127, 0, 0, 1], port)),
            metrics.endpoint_ejections(labels.clone()),
            metrics.endpoint_ejections_capped(labels),
        )
    }

    fn fail(h: &EndpointHealth, times: u32, at: u64) {
        for _ in 0..times {
            h.failure_at(at);
        }
    }

    #[test]
    fn ejected_after_consecutive_failures_only() {
        let d = destination(2, AccrualPolicy::CONSECUTIVE);
        let h = health(&d, 1);
        let t = 100 * SECOND;
        fail(&h, MAX - 1, t);
        h.success();
        fail(&h, MAX - 1, t);
        assert!(h.is_available(t), "a success resets the count");
        h.failure_at(t);
        assert!(!h.is_available(t));
        assert_eq!(h.ejections.get(), 1);
        // Failures while ejected don't extend it.
        h.failure_at(t);
        assert_eq!(h.ejections.get(), 1);
        let until = h.ejected_until_ns.load(Ordering::Relaxed);
        assert!((t + SECOND * 3 / 4..=t + SECOND * 5 / 4).contains(&until));
        assert!(h.is_available(until));
        h.success();
        assert!(h.is_available(t));
        assert_eq!(d.out.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_failed_probe_ejects_again_for_longer_and_a_success_ends_it() {
        let d = destination(3, AccrualPolicy::CONSECUTIVE);
        let h = health(&d, 1);
        let t0 = 100 * SECOND;
        fail(&h, MAX, t0);
        let first = h.ejected_until_ns.load(Ordering::Relaxed);
        // After the backoff it takes a probe; that one failure ejects it again, about 2 s.
        assert!(h.is_available(first));
        h.failure_at(first);
        let second = h.ejected_until_ns.load(Ordering::Relaxed);
        let backoff = second - first;
        assert!(
            (SECOND * 3 / 2..=SECOND * 5 / 2).contains(&backoff),
            "{backoff}"
        );
        assert_eq!(h.ejections.get(), 2);
        assert_eq!(d.out.load(Ordering::Relaxed), 1, "one endpoint out, twice");
        // A successful probe restores it and resets the backoff.
        h.success();
        assert!(h.is_available(second - 1));
        assert_eq!(d.out.load(Ordering::Relaxed), 0);
        fail(&h, MAX, second);
        let again = h.ejected_until_ns.load(Ordering::Relaxed) - second;
        assert!(again <= SECOND * 5 / 4, "backoff starts over: {again}");
    }

    #[test]
    fn a_lone_endpoint_is_never_ejected() {
        let d = destination(1, AccrualPolicy::CONSECUTIVE);
        let h = health(&d, 1);
        let t = 100 * SECOND;
        fail(&h, 10 * MAX, t);
        assert!(h.is_available(t), "ejecting it would be an outage");
        assert_eq!(h.ejections.get(), 0);
        // Each would-be ejection is counted (and the count starts over).
        assert_eq!(h.capped.get(), 10);
    }

    #[test]
    fn at_most_half_of_a_destination_is_out() {
        let d = destination(5, AccrualPolicy::CONSECUTIVE);
        let hs: Vec<_> = (1..=5).map(|p| health(&d, p)).collect();
        let t = 100 * SECOND;
        for h in &hs {
            fail(h, MAX, t);
        }
        let out = hs.iter().filter(|h| !h.is_available(t)).count();
        assert_eq!(out, 2, "5 endpoints: 2 out, 3 in");
        assert_eq!(hs.iter().map(|h| h.capped.get()).sum::<u64>(), 3);
        // One recovers: its place goes to the next that fails enough.
        let (ejected, kept): (Vec<_>, Vec<_>) = hs.iter().partition(|h| !h.is_available(t));
        ejected[0].success();
        fail(kept[0], MAX, t);
        assert!(!kept[0].is_available(t));
        assert_eq!(d.out.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn an_endpoint_that_leaves_gives_back_its_place() {
        let d = destination(2, AccrualPolicy::CONSECUTIVE);
        let h = health(&d, 1);
        fail(&h, MAX, 100 * SECOND);
        assert_eq!(d.out.load(Ordering::Relaxed), 1);
        drop(h);
        assert_eq!(d.out.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn too_few_in_when_the_set_shrinks_under_the_ejected() {
        let d = destination(4, AccrualPolicy::CONSECUTIVE);
        let hs: Vec<_> = (1..=4).map(|p| health(&d, p)).collect();
        for h in &hs[..2] {
            fail(h, MAX, 100 * SECOND);
        }
        assert!(!d.too_few_in(), "2 of 4 out is the cap, not too few");
        // Discovery removes the two healthy ones: 2 endpoints, both out.
        d.set_endpoints(2);
        assert!(d.too_few_in());
        d.set_endpoints(4);
        assert!(!d.too_few_in());
    }

    #[test]
    fn disabled_never_ejects() {
        let d = destination(4, AccrualPolicy::DISABLED);
        let h = health(&d, 1);
        fail(&h, 100, 100 * SECOND);
        assert!(h.is_available(100 * SECOND));
        assert_eq!(h.capped.get() + h.ejections.get(), 0);
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        let p = AccrualPolicy::CONSECUTIVE;
        for (level, lo, hi) in [
            (0, 0.75, 1.25),
            (1, 1.5, 2.5),
            (3, 6.0, 10.0),
            (6, 45.0, 60.0),
        ] {
            let b = p.backoff(level).as_secs_f64();
            assert!((lo..=hi).contains(&b), "level {level}: {b}");
        }
        assert!(p.backoff(30) <= p.max_penalty);
    }

    #[test]
    fn linkerd_annotations_tune_or_disable_it() {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let (p, problems) = AccrualPolicy::from_annotations(&map(&[]), AccrualPolicy::CONSECUTIVE);
        assert_eq!(p, AccrualPolicy::CONSECUTIVE);
        assert!(problems.is_empty());
        let (p, _) = AccrualPolicy::from_annotations(
            &map(&[(ANNOTATION, "disabled")]),
            AccrualPolicy::CONSECUTIVE,
        );
        assert_eq!(p.max_failures, 0);
        // Opt-in when the proxy's default is off, as in Linkerd.
        let (p, problems) = AccrualPolicy::from_annotations(
            &map(&[
                (ANNOTATION, "consecutive"),
                (
                    "balancer.linkerd.io/failure-accrual-consecutive-max-failures",
                    "3",
                ),
                (
                    "balancer.linkerd.io/failure-accrual-consecutive-min-penalty",
                    "250ms",
                ),
                (
                    "balancer.linkerd.io/failure-accrual-consecutive-max-penalty",
                    "10s",
                ),
                (
                    "balancer.linkerd.io/failure-accrual-consecutive-jitter-ratio",
                    "0",
                ),
            ]),
            AccrualPolicy::DISABLED,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(p.max_failures, 3);
        assert_eq!(p.backoff(0), Duration::from_millis(250));
        assert_eq!(p.backoff(9), Duration::from_secs(10));
        let (p, problems) = AccrualPolicy::from_annotations(
            &map(&[
                (ANNOTATION, "sometimes"),
                (
                    "balancer.linkerd.io/failure-accrual-consecutive-max-failures",
                    "zero",
                ),
            ]),
            AccrualPolicy::CONSECUTIVE,
        );
        assert_eq!(p, AccrualPolicy::CONSECUTIVE);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
