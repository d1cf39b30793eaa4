//! Pylon's metrics: this crate owns the metric families, with
//! Linkerd-compatible names and labels (so Linkerd's dashboards, queries and
//! alerts work), and the per-target handles the proxy records through.
//!
//! It knows nothing of sockets or HTTP libraries: callers pass plain `u16` status
//! codes, `Duration`s and `&'static str` reasons. Of the configuration it reads only
//! proxy-policy's endpoint coverage, for the `endpoints_*` gauges.
//!
//! - [`Metrics`] holds the registry; [`Metrics::encode`] renders it in the
//!   OpenMetrics text format via `prometheus-client` (never by hand).
//! - [`Metrics::http_target`] / [`Metrics::tcp_target`] resolve a
//!   [`TargetLabels`] once into an [`HttpTarget`] / [`TcpTarget`] handle.
//!   Recording through a handle builds no label set, takes no lock and
//!   allocates nothing (after the first occurrence of a status / error
//!   combination, whose series is then cached in lock-free slots).
//! - [`classify`] is the shared success/failure rule.
//! - `process_*`, `config_errors_total` and `proxy_build_info` are produced
//!   at scrape time by collectors, with no background task.
//! - [`exposition::parse`] reads the text back (for the CLI, benches and tests).
//! - `endpoints_*` ([`EndpointGauges`]) render proxy-policy's endpoint coverage of a mesh
//!   snapshot, recomputed by the caller when the snapshot changes.
//!
//! The proxy's own `namespace`, `deployment` and `pod` ([`ProxyLabels`]) are
//! constant labels on every series.
//!
//! Series are never removed: keep the cardinality of [`TargetLabels`]
//! bounded (known authorities and endpoints, a fixed set of error reasons).
//!
//! ```
//! use std::time::Duration;
//! use pylon_proxy_metrics::{Direction, Metrics, ProxyLabels, TargetLabels, Tls};
//!
//! let metrics = Metrics::new(ProxyLabels {
//!     namespace: Some("default".into()),
//!     deployment: Some("web".into()),
//!     pod: Some("web-0".into()),
//! });
//! // Once per (route, endpoint), off the hot path:
//! let target = metrics.http_target(
//!     TargetLabels::new(
//!         Direction::Outbound,
//!         "books.default.svc.cluster.local:8080",
//!         "10.1.2.3:8080",
//!         Tls::NoIdentity("not_provided_by_service_discovery"),
//!     )
//!     .with_dst_service("books")
//!     .with_dst_namespace("default"),
//! );
//! // Per request:
//! target.request();
//! target.response(Some(504), None, Some("response_timeout"), Duration::from_secs(10));
//!
//! // Per TCP connection:
//! let tcp = metrics.tcp_target(TargetLabels::new(
//!     Direction::Inbound,
//!     "web.default.svc.cluster.local:80",
//!     "127.0.0.1:8080",
//!     Tls::Secured,
//! ));
//! let conn = tcp.open();
//! conn.read_bytes(512);
//! conn.close(Some("ECONNRESET"));
//!
//! let mut body = String::new();
//! metrics.encode(&mut body)?;
//! assert!(body.contains("error=\"response_timeout\""));
//! # Ok::<(), std::fmt::Error>(())
//! ```

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

mod endpoints;
pub mod exposition;
mod histogram;
mod http;
mod labels;
mod process;
mod slots;
mod tcp;
mod window;

pub use endpoints::EndpointGauges;
pub use histogram::{LATENCY_MS_BUCKETS, TCP_DURATION_MS_BUCKETS};
pub use http::{HttpTarget, RouteTarget};
pub use labels::{
    classify, AuthzLabels, Classification, Direction, DstLabels, HandleLabels, Peer, RouteLabels,
    TargetLabels, Tls,
};
pub use process::{ProcessCollector, ProcessStats};
pub use tcp::{TcpConnMetrics, TcpTarget};
pub use window::{WindowStore, MAX_WINDOW};

use labels::{BuildLabels, EventLabels, SkippedLabels};
use prometheus_client::metrics::counter::Counter;
use window::WindowedHttp;

/// The proxy's own identity, added as constant labels to every series.
/// `None` fields are left out.
#[derive(Clone, Debug, Default)]
pub struct ProxyLabels {
    /// `namespace`.
    pub namespace: Option<String>,
    /// `deployment`.
    pub deployment: Option<String>,
    /// `pod`.
    pub pod: Option<String>,
}

/// The registry and every family; share it as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The proxy's constant labels, for the window's registry.
    constant: Vec<(Cow<'static, str>, Cow<'static, str>)>,
    window: Arc<WindowStore>,
    build_info: Family<BuildLabels, Gauge>,
    http: http::HttpFamilies,
    route: http::HttpFamilies<RouteLabels>,
    route_actual: http::HttpFamilies<RouteLabels>,
    retry_skipped: Family<SkippedLabels, Counter>,
    ejections: Family<labels::TargetKey, Counter>,
    ejections_capped: Family<labels::TargetKey, Counter>,
    balancer_panic: Family<labels::TargetKey, Counter>,
    warnings: Family<EventLabels, Counter>,
    control_streams: Family<ControlLabels, Gauge>,
    control_disconnects: Family<ControlLabels, Counter>,
    tcp: tcp::TcpFamilies,
    config_errors: Arc<SourcedCounter>,
    endpoints: Arc<EndpointGauges>,
    tap_dropped: Arc<SourcedCounter>,
    authz: AuthzFamilies,
    identity_expiry: Gauge,
    identity_refreshes: Counter,
    identity_certify_failures: Counter,
}

/// Linkerd's inbound authorization counters.
#[derive(Debug, Default)]
struct AuthzFamilies {
    http_allow: Family<AuthzLabels, Counter>,
    http_deny: Family<AuthzLabels, Counter>,
    tcp_allow: Family<AuthzLabels, Counter>,
    tcp_deny: Family<AuthzLabels, Counter>,
}

/// What an authorization decision is counted as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthzCounter {
    HttpAllow,
    HttpDeny,
    TcpAllow,
    TcpDeny,
}

impl Metrics {
    /// `Content-Type` of [`Metrics::encode`]'s output (OpenMetrics text 1.0).
    pub const CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";

    /// Builds the registry with every family, the `process_*` collector and
    /// `proxy_build_info` (version of this build).
    pub fn new(proxy: ProxyLabels) -> Arc<Metrics> {
        let constant: Vec<(Cow<'static, str>, Cow<'static, str>)> = [
            ("namespace", proxy.namespace),
            ("deployment", proxy.deployment),
            ("pod", proxy.pod),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((Cow::Borrowed(k), Cow::Owned(v?))))
        .collect();
        let mut registry = Registry::with_labels(constant.clone().into_iter());
        let window = WindowStore::new(std::time::Instant::now());

        // Counters are registered without `_total` (the encoder adds it) and
        // help texts without a final period (the registry adds one).
        let http = http::HttpFamilies::new(window.clone(), WindowedHttp::TARGET);
        // Per route (ServiceProfile routes, `[DEFAULT]` for the rest), as Linkerd names them:
        // `route_*` once per request the client made, `route_actual_*` once per attempt.
        let route = http::HttpFamilies::<RouteLabels>::new(window.clone(), WindowedHttp::ROUTE);
        let route_actual =
            http::HttpFamilies::<RouteLabels>::new(window.clone(), WindowedHttp::ROUTE_ACTUAL);
        http.register(&mut registry);
        route.register(&mut registry);
        route_actual.register(&mut registry);
        let retry_skipped = Family::<SkippedLabels, Counter>::default();
        registry.register(
            "route_retry_skipped",
            "Total count of failed requests on retryable routes that were not retried, by reason (budget_exhausted, body_too_large)",
            retry_skipped.clone(),
        );

        let ejections = Family::<labels::TargetKey, Counter>::default();
        registry.register(
            "endpoint_ejections",
            "Total count of times an endpoint was taken out of balancing after consecutive failures",
            ejections.clone(),
        );
        let ejections_capped = Family::<labels::TargetKey, Counter>::default();
        registry.register(
            "endpoint_ejections_capped",
            "Total count of times an endpoint failed enough to be ejected but was kept, because ejecting it would take more than half of its destination's endpoints out",
            ejections_capped.clone(),
        );
        let balancer_panic = Family::<labels::TargetKey, Counter>::default();
        registry.register(
            "balancer_panic",
            "Total count of requests balanced over all of a destination's endpoints, ejected ones included, because too few were left in",
            balancer_panic.clone(),
        );
        let warnings = Family::<EventLabels, Counter>::default();
        registry.register(
            "proxy_warnings",
            "Total count of warnings about peers (malformed requests, proxy-made error responses, ...), by event; the log shows at most a few per event every 10 seconds",
            warnings.clone(),
        );

        let control_streams = Family::<ControlLabels, Gauge>::default();
        registry.register(
            "control_plane_streams",
            "Subscriptions to the control plane by API and state: a disconnected one keeps routing on the last state it received while it reconnects",
            control_streams.clone(),
        );
        let control_disconnects = Family::<ControlLabels, Counter>::default();
        registry.register(
            "control_plane_stream_errors",
            "Total count of control-plane subscriptions that failed or ended and were retried, by API",
            control_disconnects.clone(),
        );

        let tcp = tcp::TcpFamilies::new();
        registry.register(
            "tcp_open",
            "Total count of opened connections",
            tcp.open_total.clone(),
        );
        registry.register(
            "tcp_close",
            "Total count of closed connections",
            tcp.close_total.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "Number of currently-open connections",
            tcp.open_connections.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Total count of bytes read from peers",
            tcp.read_bytes.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Total count of bytes written to peers",
            tcp.write_bytes.clone(),
        );
        registry.register(
            "tcp_connection_duration_ms",
            "Connection lifetimes, in milliseconds",
            tcp.duration.clone(),
        );

        let config_errors = Arc::new(SourcedCounter::new(
            "config_errors",
            "Total count of invalid mesh objects rejected by the config store.",
        ));
        registry.register_collector(Box::new(config_errors.clone()));
        let endpoints = EndpointGauges::new();
        registry.register_collector(Box::new(endpoints.clone()));
        let tap_dropped = Arc::new(SourcedCounter::new(
            "tap_events_dropped",
            "Total count of tap events dropped because a tap client fell behind.",
        ));
        registry.register_collector(Box::new(tap_dropped.clone()));
        let authz = AuthzFamilies::default();
        for (name, help, family) in [
            (
                "inbound_http_authz_allow",
                "Total count of HTTP requests authorized by a server's policy",
                &authz.http_allow,
            ),
            (
                "inbound_http_authz_deny",
                "Total count of HTTP requests denied by a server's policy",
                &authz.http_deny,
            ),
            (
                "inbound_tcp_authz_allow",
                "Total count of TCP connections authorized by a server's policy",
                &authz.tcp_allow,
            ),
            (
                "inbound_tcp_authz_deny",
                "Total count of TCP connections denied by a server's policy",
                &authz.tcp_deny,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        let identity_expiry = Gauge::default();
        registry.register(
            "identity_cert_expiration_timestamp_seconds",
            "Time when this proxy's current mTLS identity certificate will expire (in seconds since the UNIX epoch)",
            identity_expiry.clone(),
        );
        // Linkerd's proxy names this `identity_cert_refresh_count` (Prometheus text, no
        // `_total`); OpenMetrics counters end in `_total`.
        let identity_refreshes = Counter::default();
        registry.register(
            "identity_cert_refresh",
            "Total count of times this proxy's mTLS identity certificate has been refreshed by the identity service",
            identity_refreshes.clone(),
        );
        let identity_certify_failures = Counter::default();
        registry.register(
            "identity_certify_failures",
            "Total count of failed requests to the identity service for this proxy's certificate (each is retried with backoff, the current certificate kept)",
            identity_certify_failures.clone(),
        );

        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "proxy_build_info",
            "Proxy build info (always 1)",
            build_info.clone(),
        );

        registry.register_collector(Box::new(process::ProcessCollector));

        Arc::new(Metrics {
            registry,
            constant,
            window,
            build_info,
            http,
            route,
            route_actual,
            retry_skipped,
            ejections,
            ejections_capped,
            balancer_panic,
            warnings,
            control_streams,
            control_disconnects,
            tcp,
            config_errors,
            endpoints,
            tap_dropped,
            authz,
            identity_expiry,
            identity_refreshes,
            identity_certify_failures,
        })
    }

    /// Resolve an HTTP label set once; keep the handle.
    pub fn http_target(&self, labels: TargetLabels) -> HttpTarget {
        HttpTarget::new(&self.http, labels)
    }

    /// Resolve a route's `route_*` label set once; keep the handle.
    pub fn route_target(&self, labels: RouteLabels) -> RouteTarget {
        HttpTarget::new(&self.route, labels)
    }

    /// Resolve a route's `route_actual_*` label set (`dst` = the backend) once.
    pub fn route_actual_target(&self, labels: RouteLabels) -> RouteTarget {
        HttpTarget::new(&self.route_actual, labels)
    }

    /// `route_retry_skipped_total` for a route and a reason (a fixed vocabulary:
    /// `"budget_exhausted"`, `"body_too_large"`).
    pub fn route_retry_skipped(&self, labels: RouteLabels, reason: &'static str) -> EventCounter {
        EventCounter(self.retry_skipped.get_or_create_owned(&SkippedLabels {
            route: Arc::new(labels),
            reason,
        }))
    }

    /// `endpoint_ejections_total` for one endpoint (failure accrual).
    pub fn endpoint_ejections(&self, labels: TargetLabels) -> EventCounter {
        EventCounter(
            self.ejections
                .get_or_create_owned(&labels::TargetKey(Arc::new(labels))),
        )
    }

    /// `endpoint_ejections_capped_total` for one endpoint: an ejection the cap prevented.
    pub fn endpoint_ejections_capped(&self, labels: TargetLabels) -> EventCounter {
        EventCounter(
            self.ejections_capped
                .get_or_create_owned(&labels::TargetKey(Arc::new(labels))),
        )
    }

    /// `balancer_panic_total` for one destination (`target_addr` empty): requests balanced over
    /// every endpoint because too few were left after ejections.
    pub fn balancer_panic(&self, labels: TargetLabels) -> EventCounter {
        EventCounter(
            self.balancer_panic
                .get_or_create_owned(&labels::TargetKey(Arc::new(labels))),
        )
    }

    /// `proxy_warnings_total` for one kind of warning (a fixed vocabulary of short names).
    pub fn warning_counter(&self, event: &'static str) -> EventCounter {
        EventCounter(self.warnings.get_or_create_owned(&EventLabels { event }))
    }

    /// The gauges and counter of one control-plane API's subscriptions (`destination`,
    /// `profile`, `policy`, `identity`).
    pub fn control_plane(&self, api: &'static str) -> ControlPlaneMetrics {
        let labels = |state| ControlLabels { api, state };
        ControlPlaneMetrics {
            connected: self
                .control_streams
                .get_or_create_owned(&labels("connected")),
            disconnected: self
                .control_streams
                .get_or_create_owned(&labels("disconnected")),
            errors: EventCounter(self.control_disconnects.get_or_create_owned(&labels(""))),
        }
    }

    /// Resolve a TCP label set once; keep the handle.
    pub fn tcp_target(&self, labels: TargetLabels) -> TcpTarget {
        TcpTarget::new(&self.tcp, labels)
    }

    /// `config_errors_total` reports `src`'s value at each scrape (the Store
    /// owns and increments it). Replaces any previous source; before one is
    /// set the counter reads 0.
    pub fn set_config_errors_source(&self, src: Arc<AtomicU64>) {
        self.config_errors.set_source(src);
    }

    /// `tap_events_dropped_total` reports `src`'s value at each scrape (the tap registry owns
    /// and increments it).
    pub fn set_tap_dropped_source(&self, src: Arc<AtomicU64>) {
        self.tap_dropped.set_source(src);
    }

    /// The counter for one kind of authorization decision with these labels: resolve it once
    /// per connection, count per request.
    pub fn authz_counter(&self, kind: AuthzCounter, labels: &AuthzLabels) -> EventCounter {
        let family = match kind {
            AuthzCounter::HttpAllow => &self.authz.http_allow,
            AuthzCounter::HttpDeny => &self.authz.http_deny,
            AuthzCounter::TcpAllow => &self.authz.tcp_allow,
            AuthzCounter::TcpDeny => &self.authz.tcp_deny,
        };
        EventCounter(family.get_or_create(labels).clone())
    }

    /// `identity_cert_expiration_timestamp_seconds`: the current certificate's `notAfter`.
    pub fn set_identity_expiry(&self, unix_secs: i64) {
        self.identity_expiry.set(unix_secs);
    }

    /// `identity_cert_refresh_total`: certificates obtained from the identity service.
    pub fn identity_cert_refreshes(&self) -> EventCounter {
        EventCounter(self.identity_refreshes.clone())
    }

    /// `identity_certify_failures_total`: failed requests to the identity service.
    pub fn identity_certify_failures(&self) -> EventCounter {
        EventCounter(self.identity_certify_failures.clone())
    }

    /// OpenMetrics text for `/metrics` (ends with `# EOF`); serve it with
    /// [`Metrics::CONTENT_TYPE`].
    pub fn encode(&self, out: &mut String) -> std::fmt::Result {
        prometheus_client::encoding::text::encode(out, &self.registry)
    }

    /// Moves the rolling windows on (see [`WindowStore::tick`]); call it about once a second.
    pub fn window_tick(&self, now: std::time::Instant) {
        self.window.tick(now);
    }

    /// OpenMetrics text of the last `window` (at most [`MAX_WINDOW`]): each HTTP request,
    /// response and latency series' increase over it under its usual name and labels,
    /// `window_seconds` (what the increases cover), and the current `tcp_open_connections`
    /// and `proxy_build_info`. Not for Prometheus (its counters go down); for tools that want
    /// a recent window at once.
    pub fn encode_window(
        &self,
        out: &mut String,
        window: std::time::Duration,
        now: std::time::Instant,
    ) -> std::fmt::Result {
        let mut registry = Registry::with_labels(self.constant.clone().into_iter());
        registry.register(
            "tcp_open_connections",
            "Number of currently-open connections",
            self.tcp.open_connections.clone(),
        );
        registry.register(
            "proxy_build_info",
            "Proxy build info (always 1)",
            self.build_info.clone(),
        );
        registry.register_collector(self.window.collector(window, now));
        prometheus_client::encoding::text::encode(out, &registry)
    }

    /// Bytes the rolling windows' rings take.
    pub fn window_bytes(&self) -> usize {
        self.window.ring_bytes()
    }
}

/// One control-plane API's subscription metrics.
#[derive(Clone, Debug)]
pub struct ControlPlaneMetrics {
    /// Subscriptions with a live stream.
    pub connected: Gauge,
    /// Subscriptions reconnecting, serving their last state meanwhile.
    pub disconnected: Gauge,
    pub errors: EventCounter,
}

/// `control_plane_*` labels: `api` and, for the streams gauge, `state`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ControlLabels {
    api: &'static str,
    state: &'static str,
}

impl prometheus_client::encoding::EncodeLabelSet for ControlLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> std::fmt::Result {
        labels::label(encoder, "api", self.api)?;
        if !self.state.is_empty() {
            labels::label(encoder, "state", self.state)?;
        }
        Ok(())
    }
}

/// A handle resolved from `labels` on first use, so a label set that never records has no
/// series. Resolve it with the [`Metrics`] method that makes the family's handle, e.g.
/// `lazy.get(Metrics::http_target)`.
#[derive(Debug)]
pub struct LazyHandle<T> {
    metrics: Arc<Metrics>,
    labels: TargetLabels,
    handle: std::sync::OnceLock<T>,
}

impl<T> LazyHandle<T> {
    pub fn new(metrics: &Arc<Metrics>, labels: TargetLabels) -> Self {
        Self {
            metrics: metrics.clone(),
            labels,
            handle: std::sync::OnceLock::new(),
        }
    }

    /// The handle, made with `make` the first time.
    pub fn get(&self, make: impl FnOnce(&Metrics, TargetLabels) -> T) -> &T {
        self.handle
            .get_or_init(|| make(&self.metrics, self.labels.clone()))
    }

    /// Another lazy handle on the same labels (of another family).
    pub fn sibling<U>(&self) -> LazyHandle<U> {
        LazyHandle::new(&self.metrics, self.labels.clone())
    }
}

/// A resolved counter of events (no labels to build when counting).
#[derive(Clone, Debug)]
pub struct EventCounter(Counter);

impl EventCounter {
    /// Counts one event.
    pub fn inc(&self) {
        self.0.inc();
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A counter another component owns (`config_errors_total`: the Store; `tap_events_dropped_total`:
/// the tap registry), read at scrape time.
#[derive(Debug)]
struct SourcedCounter {
    name: &'static str,
    help: &'static str,
    source: RwLock<Option<Arc<AtomicU64>>>,
}

impl SourcedCounter {
    fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            source: RwLock::new(None),
        }
    }

    fn set_source(&self, src: Arc<AtomicU64>) {
        let mut slot = self
            .source
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = Some(src);
    }
}

impl Collector for SourcedCounter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let value = self
            .source
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .map_or(0, |src| src.load(Ordering::Relaxed));
        let metric = encoder.encode_descriptor(self.name, self.help, None, MetricType::Counter)?;
        ConstCounter::new(value).encode(metric)
    }
}

#[cfg(test)]
mod tests;
