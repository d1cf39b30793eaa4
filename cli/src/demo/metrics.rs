//! Reading the proxies' own `/metrics`: the text is parsed by `pylon_proxy_metrics::exposition`, then
//! folded into per-endpoint traffic counters. Rates and latency quantiles are computed the way
//! PromQL's `rate()` and `histogram_quantile()` would, from the difference between two scrapes.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use pylon_proxy_metrics::exposition::{self, Sample};

/// A cumulative histogram: `(upper bound "le", observations <= le)`, sorted by bound, the last
/// bound normally `+Inf`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    buckets: Vec<(f64, f64)>,
}

impl Histogram {
    #[cfg(test)]
    pub fn from_buckets(buckets: impl IntoIterator<Item = (f64, f64)>) -> Self {
        let mut h = Histogram::default();
        for (le, count) in buckets {
            h.add_bucket(le, count);
        }
        h
    }

    /// Adds `count` to the bucket bounded by `le`, creating it if needed (series with different
    /// label values but the same bucket layout are summed, as `sum by (le)` would).
    pub(crate) fn add_bucket(&mut self, le: f64, count: f64) {
        if le.is_nan() || count.is_nan() {
            return;
        }
        match self.buckets.binary_search_by(|(b, _)| b.total_cmp(&le)) {
            Ok(i) => self.buckets[i].1 += count,
            Err(i) => self.buckets.insert(i, (le, count)),
        }
    }

    fn merge(&mut self, other: &Histogram) {
        for &(le, count) in &other.buckets {
            self.add_bucket(le, count);
        }
    }

    /// Observations in the histogram: the `+Inf` bucket's count (or the largest bucket's).
    #[cfg(test)]
    pub fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |&(_, c)| c)
    }

    /// The observations made since `earlier`. If any bucket went down the process restarted
    /// (a counter reset), and everything counted now is new.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let mut out = Vec::with_capacity(self.buckets.len());
        for &(le, count) in &self.buckets {
            let before = earlier
                .buckets
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |&(_, c)| c);
            if count < before {
                return self.clone();
            }
            out.push((le, count - before));
        }
        Histogram { buckets: out }
    }

    /// The `q`-quantile, interpolated linearly within the bucket that holds it.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        histogram_quantile(q, &self.buckets)
    }
}

/// PromQL's `histogram_quantile(q, ...)` over one set of cumulative buckets `(le, count)` sorted
/// by `le`. `None` where PromQL would answer NaN: no observations, fewer than two buckets, no
/// `+Inf` bucket, or `q` outside `[0, 1]`.
///
/// The quantile's rank is located in the first bucket whose cumulative count reaches it, and
/// the value is interpolated linearly between that bucket's lower and upper bounds (the lowest
/// bucket starts at 0). A rank in the `+Inf` bucket answers the highest finite bound.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    if !(0.0..=1.0).contains(&q) || buckets.len() < 2 {
        return None;
    }
    let (last_le, _) = buckets[buckets.len() - 1];
    if last_le != f64::INFINITY {
        return None;
    }
    // Cumulative counts must not decrease; float noise or a torn scrape could make them, and
    // PromQL then uses the running maximum.
    let mut monotonic = Vec::with_capacity(buckets.len());
    let mut max = 0.0_f64;
    for &(le, count) in buckets {
        max = max.max(count);
        monotonic.push((le, max));
    }
    let observations = max;
    if observations <= 0.0 {
        return None;
    }
    let rank = q * observations;
    let b = monotonic
        .iter()
        .position(|&(_, count)| count >= rank)
        .unwrap_or(monotonic.len() - 1);
    if b == monotonic.len() - 1 {
        // Only the +Inf bucket holds the rank: the best we can say is the highest finite bound.
        return Some(monotonic[b - 1].0);
    }
    let (upper, count) = monotonic[b];
    if b == 0 && upper <= 0.0 {
        return Some(upper);
    }
    let (lower, below) = if b == 0 { (0.0, 0.0) } else { monotonic[b - 1] };
    let in_bucket = count - below;
    if in_bucket <= 0.0 {
        return Some(lower);
    }
    Some(lower + (upper - lower) * ((rank - below) / in_bucket))
}

/// How much a counter grew between two scrapes; a counter that went down was reset, and then
/// its whole current value is new (as PromQL's `increase()` treats resets).
pub fn counter_increase(now: f64, before: f64) -> f64 {
    if now >= before {
        now - before
    } else {
        now
    }
}

/// Per-second rate of an increase observed over `elapsed`.
pub fn per_second(increase: f64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        0.0
    } else {
        increase / secs
    }
}

/// The traffic one proxy counted for one direction (and, outbound, one endpoint).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrafficCounters {
    pub requests: f64,
    pub successes: f64,
    pub failures: f64,
    pub latency_ms: Histogram,
}

impl TrafficCounters {
    /// The traffic counted since `earlier`.
    pub fn since(&self, earlier: &TrafficCounters) -> TrafficCounters {
        TrafficCounters {
            requests: counter_increase(self.requests, earlier.requests),
            successes: counter_increase(self.successes, earlier.successes),
            failures: counter_increase(self.failures, earlier.failures),
            latency_ms: self.latency_ms.since(&earlier.latency_ms),
        }
    }

    /// Adds another set of counters to these (as `sum()` across series would).
    pub fn add_all(&mut self, other: &TrafficCounters) {
        self.requests += other.requests;
        self.successes += other.successes;
        self.failures += other.failures;
        self.latency_ms.merge(&other.latency_ms);
    }

    /// Fraction of classified responses that succeeded; `None` with no responses.
    pub fn success_rate(&self) -> Option<f64> {
        let responses = self.successes + self.failures;
        (responses > 0.0).then(|| self.successes / responses)
    }

    fn add(&mut self, sample: &Sample) {
        match sample.name.as_str() {
            "request_total" => self.requests += sample.value,
            "response_total" => match sample.label("classification") {
                Some("success") => self.successes += sample.value,
                Some("failure") => self.failures += sample.value,
                _ => {}
            },
            // Buckets of every series are summed by bound, as `sum by (le)` would.
            "response_latency_ms_bucket" => {
                if let Some(le) = sample.label("le").and_then(bucket_bound) {
                    self.latency_ms.add_bucket(le, sample.value);
                }
            }
            _ => {}
        }
    }
}

/// A bucket's `le` (`+Inf` included).
pub fn bucket_bound(le: &str) -> Option<f64> {
    match le {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        _ => le.parse().ok(),
    }
}

/// What one scrape of one proxy's `/metrics` says about HTTP traffic.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyTraffic {
    /// Outbound traffic by endpoint (`target_addr`).
    pub outbound_by_endpoint: BTreeMap<String, TrafficCounters>,
    /// All inbound traffic, summed over routes, sources and status codes.
    pub inbound: TrafficCounters,
}

impl ProxyTraffic {
    /// Parses a Prometheus text exposition (as served on the admin `/metrics`).
    pub fn parse(exposition: &str) -> Result<ProxyTraffic> {
        let samples = exposition::parse(exposition).context("parsing the Prometheus exposition")?;
        let mut traffic = ProxyTraffic::default();
        for sample in &samples {
            match sample.label("direction") {
                Some("outbound") => {
                    let Some(target) = sample.label("target_addr") else {
                        continue;
                    };
                    traffic
                        .outbound_by_endpoint
                        .entry(target.to_owned())
                        .or_default()
                        .add(sample);
                }
                Some("inbound") => traffic.inbound.add(sample),
                _ => {}
            }
        }
        Ok(traffic)
    }

    /// Outbound traffic to one endpoint (empty if the proxy has not sent it anything yet).
    pub fn outbound_to(&self, target_addr: &str) -> TrafficCounters {
        self.outbound_by_endpoint
            .get(target_addr)
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INF: f64 = f64::INFINITY;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn quantile_interpolates_within_the_bucket() {
        // 10 observations <= 1, 10 more in (1, 5], 0 beyond.
        let b = [(1.0, 10.0), (5.0, 20.0), (10.0, 20.0), (INF, 20.0)];
        // rank 10 is reached exactly at the top of the first bucket.
        assert!(close(histogram_quantile(0.5, &b), 1.0));
        // rank 15: halfway through the (1, 5] bucket.
        assert!(close(histogram_quantile(0.75, &b), 3.0));
        // rank 19.8: 98% through (1, 5].
        assert!(close(histogram_quantile(0.99, &b), 1.0 + 4.0 * 0.98));
        // The lowest bucket starts at 0: rank 5 is halfway through [0, 1].
        assert!(close(histogram_quantile(0.25, &b), 0.5));
    }

    #[test]
    fn quantile_in_the_inf_bucket_is_the_highest_finite_bound() {
        let b = [(1.0, 1.0), (10.0, 2.0), (INF, 10.0)];
        assert!(close(histogram_quantile(0.99, &b), 10.0));
    }

    #[test]
    fn quantile_is_none_where_promql_is_nan() {
        assert_eq!(histogram_quantile(0.5, &[(1.0, 0.0), (INF, 0.0)]), None);
        assert_eq!(histogram_quantile(0.5, &[(INF, 3.0)]), None);
        assert_eq!(histogram_quantile(0.5, &[(1.0, 1.0), (2.0, 3.0)]), None);
        assert_eq!(histogram_quantile(1.5, &[(1.0, 1.0), (INF, 3.0)]), None);
    }

    #[test]
    fn quantile_tolerates_non_monotonic_buckets() {
        // A torn read: the second bucket is below the first. PromQL uses the running maximum.
        let b = [(1.0, 4.0), (2.0, 3.0), (INF, 4.0)];
        assert!(close(histogram_quantile(0.5, &b), 0.5));
    }

    #[test]
    fn counter_increase_and_rate_handle_resets() {
        assert_eq!(counter_increase(150.0, 100.0), 50.0);
        // The process restarted and has counted 7 since.
        assert_eq!(counter_increase(7.0, 100.0), 7.0);
        assert_eq!(per_second(50.0, Duration::from_millis(500)), 100.0);
        assert_eq!(per_second(50.0, Duration::ZERO), 0.0);
    }

    #[test]
    fn histogram_since_subtracts_per_bucket_and_detects_resets() {
        let before = Histogram::from_buckets([(1.0, 2.0), (5.0, 4.0), (INF, 5.0)]);
        let now = Histogram::from_buckets([(1.0, 3.0), (5.0, 8.0), (INF, 10.0)]);
        let delta = now.since(&before);
        assert_eq!(
            delta,
            Histogram::from_buckets([(1.0, 1.0), (5.0, 4.0), (INF, 5.0)])
        );
        assert_eq!(delta.count(), 5.0);
        let restarted = Histogram::from_buckets([(1.0, 1.0), (5.0, 1.0), (INF, 1.0)]);
        assert_eq!(restarted.since(&now), restarted);
    }

    const EXPOSITION: &str = r#"# HELP request Total count of HTTP requests.
# TYPE request counter
request_total{direction="outbound",authority="ml-inference.default.svc.cluster.local:80",target_addr="127.0.0.1:4001",dst_service="ml-inference",dst_namespace="default",tls="no_identity"} 30
request_total{direction="outbound",authority="ml-inference.default.svc.cluster.local:80",target_addr="127.0.0.1:4002",dst_service="ml-inference",dst_namespace="default",tls="no_identity"} 20
request_total{direction="inbound",authority="web:80",target_addr="127.0.0.1:8080",tls="disabled"} 5
# HELP response Total count of HTTP responses.
# TYPE response counter
response_total{direction="outbound",authority="ml-inference.default.svc.cluster.local:80",target_addr="127.0.0.1:4001",classification="success",status_code="200",tls="no_identity"} 30
response_total{direction="outbound",authority="ml-inference.default.svc.cluster.local:80",target_addr="127.0.0.1:4002",classification="success",status_code="200",tls="no_identity"} 18
response_total{direction="outbound",authority="ml-inference.default.svc.cluster.local:80",target_addr="127.0.0.1:4002",classification="failure",status_code="503",tls="no_identity"} 2
response_total{direction="inbound",authority="web:80",target_addr="127.0.0.1:8080",classification="success",status_code="200",tls="disabled"} 4
response_total{direction="inbound",authority="web:80",target_addr="127.0.0.1:8080",classification="failure",status_code="500",tls="disabled"} 1
# HELP response_latency_ms Elapsed times between a request's headers being received and its response stream completing.
# TYPE response_latency_ms histogram
response_latency_ms_sum{direction="outbound",target_addr="127.0.0.1:4001",status_code="200"} 60.0
response_latency_ms_count{direction="outbound",target_addr="127.0.0.1:4001",status_code="200"} 30
response_latency_ms_bucket{le="1.0",direction="outbound",target_addr="127.0.0.1:4001",status_code="200"} 0
response_latency_ms_bucket{le="2.0",direction="outbound",target_addr="127.0.0.1:4001",status_code="200"} 20
response_latency_ms_bucket{le="3.0",direction="outbound",target_addr="127.0.0.1:4001",status_code="200"} 30
response_latency_ms_bucket{le="+Inf",direction="outbound",target_addr="127.0.0.1:4001",status_code="200"} 30
response_latency_ms_bucket{le="1.0",direction="outbound",target_addr="127.0.0.1:4002",status_code="200"} 18
response_latency_ms_bucket{le="2.0",direction="outbound",target_addr="127.0.0.1:4002",status_code="200"} 18
response_latency_ms_bucket{le="3.0",direction="outbound",target_addr="127.0.0.1:4002",status_code="200"} 18
response_latency_ms_bucket{le="+Inf",direction="outbound",target_addr="127.0.0.1:4002",status_code="200"} 18
response_latency_ms_bucket{le="1.0",direction="outbound",target_addr="127.0.0.1:4002",status_code="503"} 0
response_latency_ms_bucket{le="2.0",direction="outbound",target_addr="127.0.0.1:4002",status_code="503"} 2
response_latency_ms_bucket{le="3.0",direction="outbound",target_addr="127.0.0.1:4002",status_code="503"} 2
response_latency_ms_bucket{le="+Inf",direction="outbound",target_addr="127.0.0.1:4002",status_code="503"} 2
# TYPE process_cpu_seconds counter
process_cpu_seconds_total 0.5
# EOF
"#;

    #[test]
    fn parses_outbound_per_endpoint_and_inbound_totals() {
        let t = ProxyTraffic::parse(EXPOSITION).expect("parses");
        let e1 = t.outbound_to("127.0.0.1:4001");
        assert_eq!((e1.requests, e1.successes, e1.failures), (30.0, 30.0, 0.0));
        assert_eq!(e1.success_rate(), Some(1.0));
        assert_eq!(e1.latency_ms.count(), 30.0);
        // 20 of 30 in (1, 2], 10 in (2, 3]: rank 15 is 3/4 through (1, 2].
        assert!(close(e1.latency_ms.quantile(0.5), 1.75));

        let e2 = t.outbound_to("127.0.0.1:4002");
        assert_eq!((e2.requests, e2.successes, e2.failures), (20.0, 18.0, 2.0));
        assert_eq!(e2.success_rate(), Some(0.9));
        // The 200 and 503 series are summed by bucket: 18 in [0, 1], 2 in (1, 2].
        assert_eq!(e2.latency_ms.count(), 20.0);
        assert!(close(e2.latency_ms.quantile(0.5), 10.0 / 18.0));

        assert_eq!(t.inbound.requests, 5.0);
        assert_eq!(t.inbound.success_rate(), Some(0.8));
        assert_eq!(t.outbound_to("127.0.0.1:9"), TrafficCounters::default());
    }

    #[test]
    fn traffic_since_an_earlier_scrape() {
        let before = ProxyTraffic::parse(EXPOSITION).expect("parses");
        let later = EXPOSITION.replace(
            r#"target_addr="127.0.0.1:4001",dst_service="ml-inference",dst_namespace="default",tls="no_identity"} 30"#,
            r#"target_addr="127.0.0.1:4001",dst_service="ml-inference",dst_namespace="default",tls="no_identity"} 45"#,
        );
        let now = ProxyTraffic::parse(&later).expect("parses");
        let delta = now
            .outbound_to("127.0.0.1:4001")
            .since(&before.outbound_to("127.0.0.1:4001"));
        assert_eq!(delta.requests, 15.0);
        assert_eq!(delta.success_rate(), None);
        assert_eq!(delta.latency_ms.quantile(0.5), None);
    }
}
