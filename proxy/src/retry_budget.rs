//! `RetryBudget`: over any `ttl` window, retries <= `retry_ratio` x requests +
//! `min_retries_per_second` x ttl seconds (Linkerd's and Finagle's budget).
//!
//! Why not `tower::retry::budget::TpsBudget`: it takes a `Mutex` on every deposit, rounds
//! `1 / retry_ratio` to an integer (a ratio of 0.3 would allow 0.33), and panics on a ttl
//! outside 1–60 s, which here comes from a user's file. This one keeps ten time buckets of
//! atomics in thousandths of a retry, so ratios are exact and nothing locks.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use pylon_proxy_policy::RetryBudgetSpec;

use crate::balance::now_ns;

const BUCKETS: usize = 10;
/// One retry, in the budget's unit.
const RETRY_COST: i64 = 1000;
/// The shortest window the budget keeps (a shorter `ttl` is raised to it).
const MIN_TTL: Duration = Duration::from_millis(100);

pub struct RetryBudget {
    spec: RetryBudgetSpec,
    bucket_ns: u64,
    /// What each request deposits, in thousandths of a retry.
    deposit: i64,
    /// `min_retries_per_second` x ttl, always available.
    reserve: i64,
    buckets: [Bucket; BUCKETS],
}

#[derive(Default)]
struct Bucket {
    /// Which bucket-width period of the clock this bucket currently counts.
    period: AtomicU64,
    balance: AtomicI64,
}

impl RetryBudget {
    pub fn new(spec: RetryBudgetSpec) -> Self {
        let ttl = spec.ttl.max(MIN_TTL);
        let deposit = (spec.retry_ratio.clamp(0.0, 1000.0) * RETRY_COST as f64).round() as i64;
        let reserve =
            (f64::from(spec.min_retries_per_second) * ttl.as_secs_f64() * RETRY_COST as f64)
                .min(i64::MAX as f64 / 4.0) as i64;
        Self {
            spec,
            bucket_ns: (ttl.as_nanos() / BUCKETS as u128).max(1) as u64,
            deposit,
            reserve,
            buckets: Default::default(),
        }
    }

    /// The configuration this budget enforces.
    pub fn spec(&self) -> &RetryBudgetSpec {
        &self.spec
    }

    /// Every original request earns `retry_ratio` of a retry.
    pub fn deposit(&self) {
        self.add(now_ns(), self.deposit);
    }

    /// Takes one retry from the budget; `false` when it is exhausted.
    pub fn withdraw(&self) -> bool {
        let now = now_ns();
        // Concurrent withdrawals may both pass the check and overdraw by a retry or two; the
        // budget is a rate limit, not an exact account.
        if self.balance(now) >= RETRY_COST {
            self.add(now, -RETRY_COST);
            true
        } else {
            false
        }
    }

    fn add(&self, now: u64, amount: i64) {
        let period = now / self.bucket_ns;
        let bucket = &self.buckets[(period % BUCKETS as u64) as usize];
        let seen = bucket.period.load(Ordering::Acquire);
        if seen != period
            && bucket
                .period
                .compare_exchange(seen, period, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // This bucket last counted a period that has left the window.
            bucket.balance.store(0, Ordering::Release);
        }
        bucket.balance.fetch_add(amount, Ordering::AcqRel);
    }

    fn balance(&self, now: u64) -> i64 {
        let period = now / self.bucket_ns;
        let oldest = period.saturating_sub(BUCKETS as u64 - 1);
        let windowed: i64 = self
            .buckets
            .iter()
            .filter(|b| (oldest..=period).contains(&b.period.load(Ordering::Acquire)))
            .map(|b| b.balance.load(Ordering::Acquire))
            .sum();
        windowed + self.reserve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ratio: f64, min: u32, ttl_s: u64) -> RetryBudgetSpec {
        RetryBudgetSpec {
            retry_ratio: ratio,
            min_retries_per_second: min,
            ttl: Duration::from_secs(ttl_s),
        }
    }

    fn withdrawals(b: &RetryBudget) -> usize {
        (0..100_000).take_while(|_| b.withdraw()).count()
    }

    #[test]
    fn retries_are_the_ratio_of_requests() {
        for (ratio, requests, want) in [(0.2, 1000, 200), (0.3, 1000, 300), (0.05, 100, 5)] {
            let b = RetryBudget::new(spec(ratio, 0, 10));
            for _ in 0..requests {
                b.deposit();
            }
            assert_eq!(withdrawals(&b), want, "ratio {ratio}");
        }
    }

    #[test]
    fn the_reserve_allows_retries_without_traffic() {
        // Linkerd's defaults: 10 retries a second over 10 s.
        let b = RetryBudget::new(RetryBudgetSpec::default());
        assert_eq!(withdrawals(&b), 100);
        let none = RetryBudget::new(spec(0.0, 0, 10));
        none.deposit();
        assert!(!none.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_the_ttl() {
        let (early, late) = (
            RetryBudget::new(spec(1.0, 0, 10)),
            RetryBudget::new(spec(1.0, 0, 10)),
        );
        for _ in 0..10 {
            early.deposit();
            late.deposit();
        }
        // Still in the window a bucket (1 s) before the ttl, gone after it.
        tokio::time::advance(Duration::from_millis(8_900)).await;
        assert!(early.withdraw(), "a deposit left the window early");
        tokio::time::advance(Duration::from_millis(1_200)).await;
        assert!(!late.withdraw(), "old deposits left the window");
        late.deposit();
        assert!(late.withdraw());
    }

    #[test]
    fn silly_values_do_not_panic() {
        let b = RetryBudget::new(RetryBudgetSpec {
            retry_ratio: 1e12,
            min_retries_per_second: u32::MAX,
            ttl: Duration::ZERO,
        });
        b.deposit();
        assert!(b.withdraw());
    }
}
