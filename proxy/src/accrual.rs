//! Failure accrual: an endpoint that fails `max_failures` (7) times in a row (responses its
//! route classifies as failures, or connection errors) is ejected from balancing, then probed
//! again after a backoff that starts at 1 s and doubles up to 60 s, jittered so a fleet of
//! proxies doesn't probe in step. A success restores it; a failed probe ejects it again for
//! longer. Ejections are logged and counted (`endpoint_ejections_total`).
//!
//! On by default (`--failure-accrual`); a Service tunes or disables it with Linkerd's
//! annotations (`balancer.linkerd.io/failure-accrual: consecutive` and
//! `balancer.linkerd.io/failure-accrual-consecutive-{max-failures,min-penalty,max-penalty,
//! jitter-ratio}`), plus `balancer.linkerd.io/failure-accrual: disabled`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pylon_proxy_metrics::EventCounter;

use crate::balance::now_ns;

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

/// The health of one endpoint, shared by every request to it.
pub struct EndpointHealth {
    consecutive: AtomicU32,
    /// Ejections since the last success: the backoff exponent.
    ejections_in_a_row: AtomicU32,
    /// `now_ns()` until which the endpoint is ejected; 0 when it never was or has recovered.
    ejected_until_ns: AtomicU64,
    /// The destination's policy, shared by its endpoints and updated with the config.
    policy: Arc<ArcSwap<AccrualPolicy>>,
    addr: SocketAddr,
    destination: Arc<str>,
    counter: EventCounter,
}

impl EndpointHealth {
    pub fn new(
        policy: Arc<ArcSwap<AccrualPolicy>>,
        addr: SocketAddr,
        destination: Arc<str>,
        counter: EventCounter,
    ) -> Self {
        Self {
            consecutive: AtomicU32::new(0),
            ejections_in_a_row: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
            policy,
            addr,
            destination,
            counter,
        }
    }

    /// Whether the balancer may pick this endpoint now (an ejection whose backoff has passed
    /// lets requests through as probes).
    pub fn is_available(&self, now_ns: u64) -> bool {
        now_ns >= self.ejected_until_ns.load(Ordering::Acquire)
    }

    pub fn success(&self) {
        self.consecutive.store(0, Ordering::Release);
        if self.ejections_in_a_row.swap(0, Ordering::AcqRel) > 0 {
            self.ejected_until_ns.store(0, Ordering::Release);
            tracing::info!(destination = %self.destination, endpoint = %self.addr, "endpoint recovered; back in balancing");
        }
    }

    pub fn failure(&self) {
        let failures = self
            .consecutive
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let policy = **self.policy.load();
        if policy.max_failures == 0 || failures < policy.max_failures {
            return;
        }
        let now = now_ns();
        let until = self.ejected_until_ns.load(Ordering::Acquire);
        if now < until {
            // Already ejected: requests that were in flight are still failing.
            return;
        }
        let level = self.ejections_in_a_row.fetch_add(1, Ordering::AcqRel);
        let backoff = policy.backoff(level);
        let next = now.saturating_add(backoff.as_nanos() as u64);
        if self
            .ejected_until_ns
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.counter.inc();
            tracing::warn!(
                destination = %self.destination,
                endpoint = %self.addr,
                consecutive_failures = failures,
                backoff_ms = backoff.as_millis() as u64,
                "endpoint ejected after consecutive failures"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = AccrualPolicy::CONSECUTIVE.max_failures;

    fn health() -> EndpointHealth {
        let metrics = pylon_proxy_metrics::Metrics::new(Default::default());
        let labels = pylon_proxy_metrics::TargetLabels::new(
            pylon_proxy_metrics::Direction::Outbound,
            "web:80",
            "127.0.0.1:1",
            pylon_proxy_metrics::Tls::NoIdentity("test"),
        );
        EndpointHealth::new(
            Arc::new(ArcSwap::from_pointee(AccrualPolicy::CONSECUTIVE)),
            "127.0.0.1:1".parse().unwrap(),
            "web:80".into(),
            metrics.endpoint_ejections(labels),
        )
    }

    #[test]
    fn ejected_after_consecutive_failures_only() {
        let h = health();
        for _ in 0..MAX - 1 {
            h.failure();
        }
        h.success();
        for _ in 0..MAX - 1 {
            h.failure();
        }
        assert!(h.is_available(now_ns()), "a success resets the count");
        h.failure();
        assert!(!h.is_available(now_ns()));
        assert_eq!(h.counter.get(), 1);
        // Failures while ejected don't extend it.
        h.failure();
        assert_eq!(h.counter.get(), 1);
        let until = h.ejected_until_ns.load(Ordering::Relaxed);
        let backoff = Duration::from_nanos(until - now_ns());
        assert!(backoff <= Duration::from_millis(1250), "{backoff:?}");
        assert!(h.is_available(until));
        h.success();
        assert!(h.is_available(now_ns()));
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
