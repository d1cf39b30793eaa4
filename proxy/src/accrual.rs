//! Failure accrual: an endpoint that fails [`CONSECUTIVE_FAILURES`] times in a row (responses its
//! route classifies as failures, or connection errors) is ejected from balancing, then probed
//! again after a backoff that starts at 1 s and doubles up to 60 s, jittered so a fleet of
//! proxies doesn't probe in step. A success restores it; a failed probe ejects it again for
//! longer. Ejections are logged and counted (`endpoint_ejections_total`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pylon_proxy_metrics::EventCounter;

use crate::balance::now_ns;

/// Linkerd's default for consecutive-failure accrual.
pub const CONSECUTIVE_FAILURES: u32 = 7;
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The health of one endpoint, shared by every request to it.
pub struct EndpointHealth {
    consecutive: AtomicU32,
    /// Ejections since the last success: the backoff exponent.
    ejections_in_a_row: AtomicU32,
    /// `now_ns()` until which the endpoint is ejected; 0 when it never was or has recovered.
    ejected_until_ns: AtomicU64,
    addr: SocketAddr,
    destination: Arc<str>,
    counter: EventCounter,
}

impl EndpointHealth {
    pub fn new(addr: SocketAddr, destination: Arc<str>, counter: EventCounter) -> Self {
        Self {
            consecutive: AtomicU32::new(0),
            ejections_in_a_row: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
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
        if failures < CONSECUTIVE_FAILURES {
            return;
        }
        let now = now_ns();
        let until = self.ejected_until_ns.load(Ordering::Acquire);
        if now < until {
            // Already ejected: requests that were in flight are still failing.
            return;
        }
        let level = self.ejections_in_a_row.fetch_add(1, Ordering::AcqRel);
        let backoff = backoff(level);
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

/// 1 s, 2 s, 4 s, ... 60 s, each within ±20 %.
fn backoff(level: u32) -> Duration {
    let base = MIN_BACKOFF
        .saturating_mul(1u32 << level.min(6))
        .min(MAX_BACKOFF);
    let jitter = rand::random_range(0.8..1.2);
    base.mul_f64(jitter).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> EndpointHealth {
        let metrics = pylon_proxy_metrics::Metrics::new(Default::default());
        let labels = pylon_proxy_metrics::TargetLabels::new(
            pylon_proxy_metrics::Direction::Outbound,
            "web:80",
            "127.0.0.1:1",
            pylon_proxy_metrics::Tls::NoIdentity("test"),
        );
        EndpointHealth::new(
            "127.0.0.1:1".parse().unwrap(),
            "web:80".into(),
            metrics.endpoint_ejections(labels),
        )
    }

    #[test]
    fn ejected_after_consecutive_failures_only() {
        let h = health();
        for _ in 0..CONSECUTIVE_FAILURES - 1 {
            h.failure();
        }
        h.success();
        for _ in 0..CONSECUTIVE_FAILURES - 1 {
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
        assert!(backoff <= Duration::from_millis(1200), "{backoff:?}");
        assert!(h.is_available(until));
        h.success();
        assert!(h.is_available(now_ns()));
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        for (level, lo, hi) in [(0, 0.8, 1.2), (1, 1.6, 2.4), (3, 6.4, 9.6), (6, 48.0, 60.0)] {
            let b = backoff(level).as_secs_f64();
            assert!((lo..=hi).contains(&b), "level {level}: {b}");
        }
        assert!(backoff(30) <= MAX_BACKOFF);
    }
}
