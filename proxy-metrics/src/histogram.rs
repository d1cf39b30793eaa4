//! A lock-free histogram of durations, in milliseconds.
//!
//! `prometheus_client::metrics::histogram::Histogram` takes a mutex on every
//! `observe`; the data path records a latency per response, so this one uses
//! one atomic add per bucket hit and one for the sum. The encoding is still
//! done by prometheus-client (`MetricEncoder::encode_histogram`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Linkerd's `response_latency_ms` bucket bounds (ms), `+Inf` implied.
pub const LATENCY_MS_BUCKETS: &[f64] = &[
    1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
    1_000.0, 2_000.0, 3_000.0, 4_000.0, 5_000.0, 10_000.0, 20_000.0, 30_000.0, 40_000.0, 50_000.0,
];

/// Linkerd's `tcp_connection_duration_ms` bucket bounds (ms), `+Inf` implied.
pub const TCP_DURATION_MS_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    100.0,
    1_000.0,
    10_000.0,
    100_000.0,
    1_000_000.0,
    10_000_000.0,
];

/// A histogram of durations with fixed bucket bounds in milliseconds.
/// Clones share the same counts.
#[derive(Clone, Debug)]
pub struct MsHistogram(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    bounds: &'static [f64],
    /// One count per bound, plus the `+Inf` overflow bucket; not cumulative.
    buckets: Box<[AtomicU64]>,
    /// Sum of all observations in microseconds (exported in ms).
    sum_us: AtomicU64,
}

impl MsHistogram {
    /// A histogram over `bounds` (ascending, finite, in ms).
    pub fn new(bounds: &'static [f64]) -> Self {
        let buckets = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self(Arc::new(Inner {
            bounds,
            buckets,
            sum_us: AtomicU64::new(0),
        }))
    }

    /// Records one duration: two relaxed atomic adds, no lock, no allocation.
    pub fn observe(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1_000.0;
        // First bucket whose bound is >= ms (`le` semantics); the overflow
        // bucket when none is.
        let idx = self.0.bounds.partition_point(|b| *b < ms);
        if let Some(bucket) = self.0.buckets.get(idx) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.0.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The bucket bounds (ms), without the implied `+Inf`.
    pub(crate) fn bounds(&self) -> &'static [f64] {
        self.0.bounds
    }

    /// Identity of the counts: clones share it.
    pub(crate) fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    /// The bucket counts (not cumulative, `+Inf` last) into `counts`; returns the sum in
    /// microseconds.
    pub(crate) fn read(&self, counts: &mut Vec<u64>) -> u64 {
        counts.extend(self.0.buckets.iter().map(|b| b.load(Ordering::Relaxed)));
        self.0.sum_us.load(Ordering::Relaxed)
    }

    /// Number of observations.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.0
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    /// Sum of observations in milliseconds.
    pub fn sum_ms(&self) -> f64 {
        self.0.sum_us.load(Ordering::Relaxed) as f64 / 1_000.0
    }
}

impl TypedMetric for MsHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for MsHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        let bounds = self.0.bounds.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(self.0.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        // The count is the sum of the bucket counts read above, so `_count`
        // always equals the `+Inf` bucket even under concurrent updates.
        let count = buckets.iter().map(|(_, c)| c).sum();
        encoder.encode_histogram::<NoLabelSet>(self.sum_ms(), count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_use_le_semantics() {
        let h = MsHistogram::new(LATENCY_MS_BUCKETS);
        h.observe(Duration::from_micros(500)); // 0.5ms -> le=1
        h.observe(Duration::from_millis(1)); // exactly 1ms -> le=1
        h.observe(Duration::from_micros(1_001)); // -> le=2
        h.observe(Duration::from_secs(60)); // -> +Inf
        let counts: Vec<u64> =
            h.0.buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
        assert_eq!(counts[0], 2);
        assert_eq!(counts[1], 1);
        assert_eq!(counts[LATENCY_MS_BUCKETS.len()], 1);
        assert_eq!(h.count(), 4);
        assert!((h.sum_ms() - (0.5 + 1.0 + 1.001 + 60_000.0)).abs() < 1e-9);
    }
}
