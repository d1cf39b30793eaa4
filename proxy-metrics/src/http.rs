//! HTTP families (`request_total`, `response_total`, `response_latency_ms`,
//! and the same three per route: `route_*`, `route_actual_*`) and the
//! [`HttpTarget`] handle that records into one label set of them.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::histogram::{MsHistogram, LATENCY_MS_BUCKETS};
use crate::labels::{
    classify, Classification, HandleLabels, LatencyLabels, ResponseKey, ResponseLabels, TargetKey,
    TargetLabels,
};
use crate::slots::{IndexedSlots, SlotTable};
use crate::window::{Source, WindowStore, WindowedHttp};

type HistCtor = fn() -> MsHistogram;

fn latency_histogram() -> MsHistogram {
    MsHistogram::new(LATENCY_MS_BUCKETS)
}

/// One set of HTTP families (requests, responses, latency), shared by every
/// [`HttpTarget`] recording into it.
#[derive(Clone, Debug)]
pub(crate) struct HttpFamilies<L = TargetLabels> {
    pub(crate) requests: Family<TargetKey<L>, Counter>,
    pub(crate) responses: Family<ResponseLabels<L>, Counter>,
    pub(crate) latency: Family<LatencyLabels<L>, MsHistogram, HistCtor>,
    /// Every series of these families is also kept in rolling windows.
    window: Arc<WindowStore>,
    windowed: WindowedHttp,
}

impl<L: HandleLabels> HttpFamilies<L> {
    /// Registers the three families under the names `/metrics` and the window share.
    pub(crate) fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let names = self.windowed;
        registry.register(
            names.requests.name(),
            names.requests.help(),
            self.requests.clone(),
        );
        registry.register(
            names.responses.name(),
            names.responses.help(),
            self.responses.clone(),
        );
        registry.register(
            names.latency.name(),
            names.latency.help(),
            self.latency.clone(),
        );
    }

    pub(crate) fn new(window: Arc<WindowStore>, windowed: WindowedHttp) -> Self {
        Self {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as HistCtor),
            window,
            windowed,
        }
    }
}

/// The metrics one response combination updates.
#[derive(Debug)]
struct ResponseSlot {
    total: Counter,
    latency: MsHistogram,
}

impl ResponseSlot {
    fn record(&self, latency: Duration) {
        self.total.inc();
        self.latency.observe(latency);
    }
}

/// Lowest status code with a pre-resolved slot.
const STATUS_MIN: u16 = 100;
/// Status codes 100..=599, in groups of a hundred.
const STATUS_GROUPS: usize = 5;
/// gRPC status codes 0..=16 (OK..UNAUTHENTICATED).
const GRPC_CODES: usize = 17;
/// Other combinations (proxy errors, responses without a status, gRPC on a
/// non-200 status...) cached per target before falling back to the family.
const OTHER_SLOTS: usize = 16;

/// A resolved HTTP label set: records requests and responses without
/// building label sets, locking or allocating (after the first occurrence of
/// each status / grpc-status / error / classification combination). Cheap to
/// clone.
///
/// `HttpTarget` (labels [`TargetLabels`]) records `request_total` and friends;
/// [`RouteTarget`] (labels [`RouteLabels`](crate::RouteLabels)) records
/// `route_*` or `route_actual_*`.
#[derive(Debug)]
pub struct HttpTarget<L = TargetLabels>(Arc<HttpInner<L>>);

/// A route's handle: `route_request_total` and friends, or the `route_actual_*`
/// ones (one handle per route and backend).
pub type RouteTarget = HttpTarget<crate::RouteLabels>;

impl<L> Clone for HttpTarget<L> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

#[derive(Debug)]
struct HttpInner<L> {
    labels: Arc<L>,
    families: HttpFamilies<L>,
    requests: Counter,
    /// Plain HTTP: status 100..=599, no grpc-status, no proxy error.
    by_status: IndexedSlots<ResponseSlot, 100>,
    /// gRPC: status 200, grpc-status 0..=16, no proxy error.
    by_grpc: [std::sync::OnceLock<ResponseSlot>; GRPC_CODES],
    other: SlotTable<ResponseKey, ResponseSlot, OTHER_SLOTS>,
}

impl<L: HandleLabels> HttpTarget<L> {
    pub(crate) fn new(families: &HttpFamilies<L>, labels: L) -> Self {
        let labels = Arc::new(labels);
        let key = TargetKey(labels.clone());
        let requests = families.requests.get_or_create_owned(&key);
        families.window.track(
            families.windowed.requests,
            Source::Counter(requests.clone()),
            || key,
        );
        Self(Arc::new(HttpInner {
            labels,
            families: families.clone(),
            requests,
            by_status: IndexedSlots::new(STATUS_GROUPS),
            by_grpc: std::array::from_fn(|_| std::sync::OnceLock::new()),
            other: SlotTable::default(),
        }))
    }

    /// The labels this handle records under.
    pub fn labels(&self) -> &L {
        &self.0.labels
    }

    /// Counts a request (`request_total`).
    pub fn request(&self) {
        self.0.requests.inc();
    }

    /// Counts a response (`response_total`) and records its latency
    /// (`response_latency_ms`), classified by the default rule ([`classify`]).
    ///
    /// `grpc_status`: `Some(code)` when the response carried `grpc-status`;
    /// `error`: `Some(reason)` when the proxy made this response itself (a
    /// bounded set of reasons, e.g. `"response_timeout"`).
    pub fn response(
        &self,
        status: Option<u16>,
        grpc_status: Option<u32>,
        error: Option<&'static str>,
        latency: Duration,
    ) {
        let classification = classify(status, grpc_status, error);
        self.classified_response(status, grpc_status, error, classification, latency);
    }

    /// [`HttpTarget::response`] with the classification decided by the caller
    /// (a route's response classes).
    pub fn classified_response(
        &self,
        status: Option<u16>,
        grpc_status: Option<u32>,
        error: Option<&'static str>,
        classification: Classification,
        latency: Duration,
    ) {
        let key = ResponseKey {
            status,
            grpc_status,
            error,
            classification,
        };
        let inner = &*self.0;
        let init = || inner.resolve(key);
        // The indexed slots hold the default classification of each status; a route that
        // classifies otherwise uses the keyed slots.
        let usual = classification == classify(status, grpc_status, error);
        let slot = match (status, grpc_status, error) {
            (Some(s), None, None) if usual => s
                .checked_sub(STATUS_MIN)
                .and_then(|i| inner.by_status.get_or_init(usize::from(i), init)),
            (Some(200), Some(g), None) if usual => usize::try_from(g)
                .ok()
                .and_then(|g| inner.by_grpc.get(g))
                .map(|slot| slot.get_or_init(init)),
            _ => None,
        };
        match slot {
            Some(slot) => slot.record(latency),
            None => match inner.other.get_or_init(key, init) {
                Some(slot) => slot.record(latency),
                // More distinct combinations than cached slots: resolve
                // through the families (hash + read lock), still correct.
                None => inner.resolve(key).record(latency),
            },
        }
    }
}

impl<L: HandleLabels> HttpInner<L> {
    fn resolve(&self, key: ResponseKey) -> ResponseSlot {
        let families = &self.families;
        let response_labels = ResponseLabels {
            target: self.labels.clone(),
            key,
        };
        let total = families.responses.get_or_create_owned(&response_labels);
        let latency_labels = LatencyLabels {
            target: self.labels.clone(),
            classification: key.classification,
            status: key.status,
        };
        let latency = families.latency.get_or_create_owned(&latency_labels);
        // A first occurrence, or (past the cached slots) a lookup that finds the series
        // already kept.
        families.window.track(
            families.windowed.responses,
            Source::Counter(total.clone()),
            || response_labels,
        );
        families.window.track(
            families.windowed.latency,
            Source::Histogram(latency.clone()),
            || latency_labels,
        );
        ResponseSlot { total, latency }
    }
}
