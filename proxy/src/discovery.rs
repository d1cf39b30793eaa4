//! Discovery: from the authority a client named (or the address it dialled) to a **logical**
//! destination whose live endpoint set is kept current from the Store, or from DNS re-resolved
//! on its TTL. Logical destinations are cached so the request path does one lock-free map lookup.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use pylon_proxy_metrics::{
    Direction, DstLabels, HttpTarget, LazyHandle, Metrics, Peer, TargetLabels, Tls,
};
use pylon_proxy_policy::{ServiceRef, Snapshot, Store};

use crate::accrual::{AccrualPolicy, DestinationHealth, EndpointHealth};
use crate::balance::{Balanced, EndpointSet, PeakEwma, PickError};
use crate::connect::Connect;
use crate::control::ControlPlane;
use crate::http::client::EndpointTarget;
use crate::http::ctx::WithCtx;
use crate::http::headers::request_authority;
use crate::http::metrics::log_proxy_error;
use crate::http::request_body::RequestBody;
use crate::http::{boxed_out_of_line, PassThrough, ProxyError, ProxyResponse};
use crate::mesh_tls::MeshTls;
use crate::names::AuthorityMap;
use crate::names::EndpointNames;
use crate::profiles::{DestinationRoutes, Profiles};
use crate::split::{BackendTarget, Backends};

/// Bound on cached authorities, so arbitrary Host headers can't grow memory without limit. The
/// cache is copied on insert (readers never lock), so it holds the hot set, not every name.
const MAX_CACHED_AUTHORITIES: usize = 1_000;
/// Bound on cached logical destinations (each DNS one also has a refresh task).
const MAX_CACHED_TARGETS: usize = 10_000;
const DNS_MIN_TTL: Duration = Duration::from_secs(1);
const DNS_MAX_TTL: Duration = Duration::from_secs(60);
const DNS_RETRY: Duration = Duration::from_secs(5);
/// The `tls` label of an endpoint discovery names no identity for (Linkerd's reason).
const NOT_MESHED: Tls = Tls::NoIdentity("not_provided_by_service_discovery");

/// What discovery says of one endpoint: its address, the TLS identity its proxy serves when
/// it is meshed (the EndpointSlice's `pylon.io/identity`, or the control plane's
/// `tls_identity`), and the labels a control plane gives it (`namespace`, `service`, `pod`,
/// `deployment`, ...), which its metrics carry as `dst_*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub identity: Option<Arc<str>>,
    pub labels: Option<DstLabels>,
}

impl EndpointSpec {
    pub fn new(addr: SocketAddr, identity: Option<Arc<str>>) -> Self {
        Self {
            addr,
            identity,
            labels: None,
        }
    }
}

/// The `dst_*` labels of an endpoint on a Pod the config dir knows (by the slice's `targetRef`,
/// else by address), as a control plane would send them.
fn pod_labels(
    snapshot: &Snapshot,
    namespace: &str,
    endpoint: &pylon_proxy_policy::Endpoint,
) -> Option<DstLabels> {
    let pod = endpoint
        .pod
        .as_deref()
        .and_then(|name| snapshot.pod(namespace, name))
        .or_else(|| snapshot.pod_by_ip(endpoint.addr.ip()))?;
    Some(
        pod.metric_labels()
            .into_iter()
            .map(|(k, v)| (Arc::from(k), Arc::from(v)))
            .collect(),
    )
}

/// Endpoints learnt from DNS or dialled by address: no identity, so plaintext.
pub(crate) fn unmeshed(addrs: &[SocketAddr]) -> Vec<EndpointSpec> {
    addrs.iter().map(|a| EndpointSpec::new(*a, None)).collect()
}

/// One endpoint of one logical destination, with its load, metric handles and connections.
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The identity discovery named for it; a change makes a new `Endpoint` (new connections).
    identity: Option<Arc<str>>,
    /// Its control-plane labels; a change makes a new `Endpoint` (new metric series).
    labels: Option<DstLabels>,
    /// How its connections are made: over mesh TLS when it is meshed and this proxy has an
    /// identity. Decided here, once, for every request and connection to it.
    pub connect: Arc<Connect>,
    /// Its connections and its metric handle.
    pub target: EndpointTarget,
    load: Arc<PeakEwma>,
    /// Failure accrual: consecutive failures eject it for a while.
    pub health: Arc<EndpointHealth>,
}

impl Endpoint {
    pub fn load_handle(&self) -> &Arc<PeakEwma> {
        &self.load
    }

    /// Its control-plane (or config-dir Pod) labels: `pod`, `deployment`, ...
    pub fn labels(&self) -> Option<&DstLabels> {
        self.labels.as_ref()
    }
}

impl Balanced for Endpoint {
    fn load(&self) -> &PeakEwma {
        &self.load
    }

    fn is_available(&self, now_ns: u64) -> bool {
        self.health.is_available(now_ns)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TargetKey {
    /// A Service in the Store, by the name it resolves under and the service port.
    Service { service: ServiceRef, port: u16 },
    /// A name the Store doesn't know: DNS.
    Dns { host: Arc<str>, port: u16 },
    /// An address with no Service: forwarded as-is.
    Addr(SocketAddr),
    /// A name or address the control plane resolves (`--destination-addr`): its profile,
    /// split and endpoints are followed there, with DNS as the fallback for names it does
    /// not know.
    Remote { authority: Arc<str> },
}

/// A destination as the client named it: a service, a DNS name or an address.
pub struct Logical {
    /// Canonical authority, the `authority` metric label (e.g. `web.default.svc.cluster.local:80`).
    pub authority: Arc<str>,
    key: TargetKey,
    pub service: Option<ServiceRef>,
    pub endpoints: EndpointSet<Endpoint>,
    /// Its routes (from the service's ServiceProfile, if any).
    pub routes: Arc<DestinationRoutes>,
    /// Where its requests go: itself, or backends by weight.
    pub backends: ArcSwap<Backends>,
    /// Where proxy-made responses are counted when no endpoint was chosen (first use only).
    no_endpoint: LazyHandle<HttpTarget>,
    /// The control plane says its connections are opaque TCP (`opaque_protocol`): no
    /// protocol detection for them.
    pub opaque: std::sync::atomic::AtomicBool,
    /// For a destination followed on the control plane: true once it has endpoints to use.
    pub(crate) resolved: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>>,
}

impl Logical {
    pub fn pick(&self) -> Result<Arc<Endpoint>, PickError> {
        self.endpoints.pick()
    }

    /// [`pick`](Self::pick) at a `now_ns()` reading.
    pub fn pick_at(&self, now_ns: u64) -> Result<Arc<Endpoint>, PickError> {
        self.endpoints.pick_at(now_ns)
    }

    pub fn no_endpoint_metrics(&self) -> &HttpTarget {
        self.no_endpoint.get(Metrics::http_target)
    }
}

pub struct Discovery {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    profiles: Arc<Profiles>,
    connect_timeout: Duration,
    /// Failure accrual where a Service doesn't say.
    accrual: AccrualPolicy,
    cluster_domain: Arc<str>,
    /// This proxy's mesh TLS; endpoints with an identity are reached through it.
    mesh_tls: Option<Arc<MeshTls>>,
    /// Keyed by the authority exactly as clients send it.
    by_authority: ArcSwap<AuthorityMap<Arc<Logical>>>,
    by_target: Mutex<HashMap<TargetKey, Arc<Logical>>>,
    /// The system resolver, made when a name first needs it: most proxies never resolve one
    /// (the config dir or the control plane names every destination), and it costs memory.
    dns: std::sync::OnceLock<Option<hickory_resolver::TokioResolver>>,
    /// With `--destination-addr`, names and addresses are resolved there.
    control: Option<Arc<ControlPlane>>,
}

/// How endpoints are reached and judged, from the proxy's flags.
pub struct DiscoverySettings<'a> {
    pub connect_timeout: Duration,
    /// Failure accrual where a Service doesn't say.
    pub accrual: AccrualPolicy,
    pub cluster_domain: &'a str,
}

impl Discovery {
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        profiles: Arc<Profiles>,
        settings: DiscoverySettings<'_>,
        mesh_tls: Option<Arc<MeshTls>>,
        control: Option<Arc<ControlPlane>>,
    ) -> Arc<Self> {
        let DiscoverySettings {
            connect_timeout,
            accrual,
            cluster_domain,
        } = settings;
        Arc::new(Self {
            store,
            metrics,
            profiles,
            connect_timeout,
            accrual,
            cluster_domain: cluster_domain.into(),
            mesh_tls,
            by_authority: ArcSwap::from_pointee(AuthorityMap::default()),
            by_target: Mutex::new(HashMap::new()),
            dns: std::sync::OnceLock::new(),
            control: control.filter(|c| c.destination.is_some()),
        })
    }

    pub(crate) fn profiles(&self) -> &Arc<Profiles> {
        &self.profiles
    }

    pub(crate) fn store_snapshot(&self) -> Arc<Snapshot> {
        self.store.snapshot()
    }

    /// Keeps every cached destination's endpoints current as the Store changes, and the
    /// `endpoints_*` gauges with them (computed here, once per snapshot; a proxy fed by a
    /// control plane has an empty Store and exports none).
    pub fn spawn_updates(self: &Arc<Self>) {
        let mut rx = self.store.subscribe();
        let first = rx.borrow().clone();
        self.metrics.endpoint_gauges().update(&first);
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let snapshot = rx.borrow_and_update().clone();
                let Some(this) = this.upgrade() else { return };
                this.apply(&snapshot);
                this.metrics.endpoint_gauges().update(&snapshot);
            }
        });
    }

    /// The destination `raw` names, when a request has named it before (the usual case).
    pub fn cached(&self, raw: &[u8]) -> Option<Arc<Logical>> {
        self.by_authority.load().get(raw).cloned()
    }

    /// The logical destination for a request's authority (`Host`, `:authority` or an
    /// absolute-form URI).
    pub async fn resolve_authority(
        self: &Arc<Self>,
        raw: &[u8],
    ) -> Result<Arc<Logical>, ProxyError> {
        if let Some(l) = self.cached(raw) {
            return Ok(l);
        }
        let authority = Authority::try_from(raw).map_err(|_| ProxyError::MalformedRequest)?;
        let port = authority.port_u16().unwrap_or(80);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let snapshot = self.store.snapshot();
        let key = if self.control.is_some() {
            TargetKey::Remote {
                authority: match host.parse::<IpAddr>() {
                    Ok(ip) => SocketAddr::new(ip, port).to_string(),
                    Err(_) => format!("{}:{port}", host.trim_end_matches('.').to_ascii_lowercase()),
                }
                .into(),
            }
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            self.key_for_addr(&snapshot, SocketAddr::new(ip, port))
        } else if let Some(svc) = snapshot
            .resolve_name(host, port)
            .filter(|s| snapshot.has_endpoint_slices(&s.service))
        {
            // A Service without EndpointSlices has no endpoints we know of: DNS decides.
            TargetKey::Service {
                service: svc.service.clone(),
                port,
            }
        } else {
            TargetKey::Dns {
                host: host.to_ascii_lowercase().into(),
                port,
            }
        };
        let logical = self.logical(key, &snapshot).await?;
        self.by_authority.rcu(|map| {
            let mut map = if map.len() >= MAX_CACHED_AUTHORITIES {
                AuthorityMap::default()
            } else {
                AuthorityMap::clone(map)
            };
            map.insert(raw.into(), logical.clone());
            map
        });
        Ok(logical)
    }

    /// The logical destination for a connection's original destination (transparent mode):
    /// a Service's cluster IP maps to the service, as kube-proxy would; anything else is
    /// forwarded as-is.
    pub async fn resolve_addr(self: &Arc<Self>, addr: SocketAddr) -> Arc<Logical> {
        let snapshot = self.store.snapshot();
        let key = match &self.control {
            Some(_) => TargetKey::Remote {
                authority: addr.to_string().into(),
            },
            None => self.key_for_addr(&snapshot, addr),
        };
        match self.logical(key, &snapshot).await {
            Ok(l) => l,
            // Only DNS keys can fail, and an address never becomes one.
            Err(_) => self.addr_logical(addr),
        }
    }

    fn key_for_addr(&self, snapshot: &Snapshot, addr: SocketAddr) -> TargetKey {
        match snapshot.resolve_cluster_ip(addr) {
            Some(svc) => TargetKey::Service {
                service: svc.service.clone(),
                port: addr.port(),
            },
            None => TargetKey::Addr(addr),
        }
    }

    fn addr_logical(&self, addr: SocketAddr) -> Arc<Logical> {
        let logical = self.new_logical(addr.to_string().into(), TargetKey::Addr(addr), None);
        logical.endpoints.update(vec![self.endpoint(
            &logical,
            &EndpointSpec::new(addr, None),
            None,
        )]);
        logical
    }

    async fn logical(
        self: &Arc<Self>,
        key: TargetKey,
        snapshot: &Arc<Snapshot>,
    ) -> Result<Arc<Logical>, ProxyError> {
        let cached = self.lock_targets().get(&key).cloned();
        if let Some(l) = cached {
            crate::control::destination::first_answer(&l).await;
            return Ok(l);
        }
        let logical = match &key {
            TargetKey::Addr(addr) => self.addr_logical(*addr),
            TargetKey::Service { service, port } => {
                let authority = format!("{}:{port}", service.fqdn(&self.cluster_domain));
                let logical =
                    self.new_logical(authority.into(), key.clone(), Some(service.clone()));
                self.refresh_service(&logical, snapshot);
                logical
            }
            TargetKey::Dns { host, port } => {
                let addrs = self.resolve_dns(host, *port).await?;
                let logical = self.new_logical(format!("{host}:{port}").into(), key.clone(), None);
                self.set_endpoints(&logical, &unmeshed(&addrs.0));
                self.spawn_dns_refresh(&logical, addrs.1);
                logical
            }
            // Followed once cached (below), so its own split finds it.
            TargetKey::Remote { authority } => {
                self.new_logical(authority.clone(), key.clone(), None)
            }
        };
        let (logical, inserted) = {
            let mut targets = self.lock_targets();
            if targets.len() >= MAX_CACHED_TARGETS {
                // Names and addresses come from clients: forget them (their DNS refreshes and
                // control-plane subscriptions stop) rather than grow without bound. Services
                // are bounded by the config.
                targets.retain(|k, _| matches!(k, TargetKey::Service { .. }));
                self.by_authority.store(Arc::new(AuthorityMap::default()));
            }
            // Another request may have built it meanwhile; keep the first.
            match targets.get(&key) {
                Some(first) => (first.clone(), false),
                None => {
                    targets.insert(key, logical.clone());
                    (logical, true)
                }
            }
        };
        if let TargetKey::Remote { .. } = &logical.key {
            if let (true, Some(control)) = (inserted, &self.control) {
                crate::control::destination::follow_logical(self, &logical, control);
            }
            // The first answers are awaited (briefly), so the first request does not find an
            // empty endpoint set. Its split comes with its profile.
            crate::control::destination::first_answer(&logical).await;
        } else if inserted {
            // Cached first, so a split whose backends lead back here finds it.
            let spec = self.backend_spec(&logical, snapshot);
            if !spec.is_empty() {
                let backends = Box::pin(self.resolve_backends(&logical, spec, snapshot)).await;
                logical.backends.store(Arc::new(backends));
            }
        }
        Ok(logical)
    }

    /// What a destination's requests are split by: a TrafficSplit on its service, else its
    /// ServiceProfile's `dstOverrides`, else nothing.
    fn backend_spec(&self, logical: &Logical, snapshot: &Snapshot) -> Vec<(BackendTarget, u64)> {
        if let TargetKey::Service { service, .. } = &logical.key {
            if let Some(split) = snapshot.split_for(service) {
                return split
                    .backends
                    .iter()
                    .map(|b| (BackendTarget::Service(split.backend_ref(b)), b.weight_milli))
                    .collect();
            }
        }
        // Named when the destination was made; no profile for a bare address (nor, from the
        // Store, for a remote destination).
        let Some(profile) = logical.routes.profile_name() else {
            return Vec::new();
        };
        snapshot
            .route_table(profile)
            .map(|t| {
                t.dst_overrides()
                    .iter()
                    .map(|o| {
                        (
                            BackendTarget::Authority(o.authority.clone()),
                            o.weight_milli,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) async fn resolve_backends(
        self: &Arc<Self>,
        apex: &Arc<Logical>,
        spec: Vec<(BackendTarget, u64)>,
        snapshot: &Arc<Snapshot>,
    ) -> Backends {
        let mut resolved = Vec::with_capacity(spec.len());
        for (target, _) in &spec {
            let backend = match target {
                BackendTarget::Service(service) => {
                    let port = match &apex.key {
                        TargetKey::Service { port, .. } => *port,
                        _ => 80,
                    };
                    let key = TargetKey::Service {
                        service: service.clone(),
                        port,
                    };
                    if key == apex.key {
                        resolved.push(Ok(None));
                        continue;
                    }
                    Box::pin(self.logical(key, snapshot)).await
                }
                BackendTarget::Authority(authority) => {
                    Box::pin(self.resolve_authority(authority.as_bytes())).await
                }
            };
            resolved.push(match backend {
                Ok(b) if Arc::ptr_eq(&b, apex) => Ok(None),
                Ok(b) => Ok(Some(b)),
                Err(e) => {
                    tracing::warn!(destination = %apex.authority, backend = %target, error = %e, "split backend unavailable; it gets no share");
                    Err(())
                }
            });
        }
        let shares: Vec<String> = spec
            .iter()
            .zip(&resolved)
            .map(|((t, w), r)| {
                format!(
                    "{t}={}{}",
                    *w as f64 / 1000.0,
                    if r.is_err() { "(unavailable)" } else { "" }
                )
            })
            .collect();
        tracing::info!(destination = %apex.authority, backends = %shares.join(", "), "traffic split updated");
        Backends::new(spec, resolved)
    }

    fn lock_targets(&self) -> std::sync::MutexGuard<'_, HashMap<TargetKey, Arc<Logical>>> {
        self.by_target.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_logical(
        &self,
        authority: Arc<str>,
        key: TargetKey,
        service: Option<ServiceRef>,
    ) -> Arc<Logical> {
        let no_endpoint = LazyHandle::new(
            &self.metrics,
            self.labels(&authority, "", service.as_ref(), NOT_MESHED),
        );
        // A ServiceProfile is named by the service's FQDN (or an external name's).
        let profile_name = match &key {
            TargetKey::Service { service, .. } => Some(service.fqdn(&self.cluster_domain)),
            TargetKey::Dns { host, .. } => Some(host.to_string()),
            // The control plane sends a remote destination's routes.
            TargetKey::Addr(_) | TargetKey::Remote { .. } => None,
        };
        let routes =
            self.profiles
                .destination(Direction::Outbound, authority.clone(), profile_name);
        // Failure accrual for its endpoints (the Service's annotations, else the proxy
        // default), and the count of those out.
        let health = Arc::new(DestinationHealth::new(
            self.accrual,
            authority.clone(),
            no_endpoint.sibling(),
        ));
        Arc::new(Logical {
            authority,
            key,
            service,
            endpoints: EndpointSet::with_health(Vec::new(), health),
            routes,
            backends: ArcSwap::from_pointee(Backends::default()),
            no_endpoint,
            opaque: std::sync::atomic::AtomicBool::new(false),
            resolved: std::sync::OnceLock::new(),
        })
    }

    fn labels(
        &self,
        authority: &Arc<str>,
        target: &str,
        service: Option<&ServiceRef>,
        tls: Tls,
    ) -> TargetLabels {
        TargetLabels {
            direction: Direction::Outbound,
            peer: None,
            authority: authority.clone(),
            target_addr: target.into(),
            tls,
            dst_service: service.map(|s| s.name.clone()),
            dst_namespace: service.map(|s| s.namespace.clone()),
            dst_labels: None,
            srv_port: None,
        }
    }

    /// Labels with a control plane's names for the destination: `namespace` and `service`
    /// become `dst_namespace` and `dst_service`, the rest `dst_<name>`.
    fn with_dst_labels(mut labels: TargetLabels, dst: Option<&DstLabels>) -> TargetLabels {
        let Some(dst) = dst else { return labels };
        let mut rest = Vec::with_capacity(dst.len());
        for (name, value) in dst.iter() {
            match &**name {
                "namespace" => labels.dst_namespace = Some(value.clone()),
                "service" => labels.dst_service = Some(value.clone()),
                _ => rest.push((name.clone(), value.clone())),
            }
        }
        labels.dst_labels = (!rest.is_empty()).then(|| rest.into());
        labels
    }

    /// A new endpoint of `logical`; its latency estimate starts at `estimate` (ns), else the
    /// default.
    fn endpoint(
        &self,
        logical: &Logical,
        spec: &EndpointSpec,
        estimate: Option<f64>,
    ) -> Arc<Endpoint> {
        let (addr, identity) = (spec.addr, spec.identity.clone());
        let (connect, tls) = match (&identity, &self.mesh_tls) {
            (Some(id), Some(mesh)) => (
                Connect::meshed(addr, self.connect_timeout, mesh.clone(), id.clone()),
                Tls::ServerId(id.clone()),
            ),
            // Meshed, but this proxy has no identity to present (no --identity-dir).
            (Some(_), None) => (
                Connect::plain(addr, self.connect_timeout),
                Tls::NoIdentity("disabled"),
            ),
            (None, _) => (Connect::plain(addr, self.connect_timeout), NOT_MESHED),
        };
        let labels = Self::with_dst_labels(
            self.labels(
                &logical.authority,
                &addr.to_string(),
                logical.service.as_ref(),
                tls,
            ),
            spec.labels.as_ref(),
        );
        // What the logs call it besides its address: its pod and workload, when known.
        let names = EndpointNames::new(
            &logical.authority,
            spec.labels.as_ref(),
            logical.service.as_ref().map(|s| &s.namespace),
        );
        // Every connection to the endpoint (HTTP or opaque) is counted, as Linkerd does.
        let connect = Arc::new(
            connect
                .counted(self.metrics.tcp_target(labels.clone().with_peer(Peer::Dst)))
                .named(names.clone()),
        );
        Arc::new(Endpoint {
            addr,
            identity,
            labels: spec.labels.clone(),
            connect: connect.clone(),
            target: EndpointTarget::with_connect(
                connect,
                logical.authority.clone(),
                self.metrics.http_target(labels.clone()),
            ),
            load: Arc::new(estimate.map_or_else(PeakEwma::new, PeakEwma::with_estimate)),
            health: Arc::new(
                EndpointHealth::new(
                    logical.endpoints.health().clone(),
                    addr,
                    self.metrics.endpoint_ejections(labels.clone()),
                    self.metrics.endpoint_ejections_capped(labels.clone()),
                )
                .named(names),
            ),
        })
    }

    /// Swaps in a new endpoint set, keeping the state (load, connections) of endpoints that stay.
    /// An endpoint whose identity changed is a new one: its connections (plaintext or TLS to
    /// the old identity) must not be reused. Endpoints that leave finish their in-flight
    /// requests: those hold their own `Arc`.
    pub(crate) fn set_endpoints(&self, logical: &Logical, specs: &[EndpointSpec]) {
        let current = logical.endpoints.snapshot();
        let same = |e: &Endpoint, spec: &EndpointSpec| {
            e.addr == spec.addr && e.identity == spec.identity && e.labels == spec.labels
        };
        if current.len() == specs.len() && current.iter().zip(specs).all(|(e, s)| same(e, s)) {
            return;
        }
        let mut estimate = None;
        let next = specs
            .iter()
            .map(|spec| {
                current
                    .iter()
                    .find(|e| same(e, spec))
                    .cloned()
                    .unwrap_or_else(|| {
                        // Its peers' average: a newcomer takes its share from its first request.
                        let estimate =
                            *estimate.get_or_insert_with(|| logical.endpoints.newcomer_estimate());
                        self.endpoint(logical, spec, Some(estimate))
                    })
            })
            .collect::<Vec<_>>();
        tracing::info!(
            authority = %logical.authority,
            endpoints = next.len(),
            "endpoint set updated"
        );
        logical.endpoints.update(next);
    }

    fn refresh_service(&self, logical: &Logical, snapshot: &Snapshot) -> bool {
        let TargetKey::Service { service, port } = &logical.key else {
            return true;
        };
        if let Some(svc) = snapshot.service(service) {
            let (policy, problems) =
                AccrualPolicy::from_annotations(&svc.meta.annotations, self.accrual);
            let health = logical.endpoints.health();
            if policy != health.policy() {
                for problem in &problems {
                    tracing::warn!(service = %service, "{problem}");
                }
                health.set_policy(policy);
            }
        }
        let name = format!("{}.{}", service.name, service.namespace);
        match snapshot.resolve_name(&name, *port) {
            Some(resolved) => {
                let specs: Vec<EndpointSpec> = resolved
                    .endpoints
                    .iter()
                    .map(|e| EndpointSpec {
                        addr: e.addr,
                        identity: e.identity.clone(),
                        labels: pod_labels(snapshot, &service.namespace, e),
                    })
                    .collect();
                self.set_endpoints(logical, &specs);
                true
            }
            None => {
                self.set_endpoints(logical, &[]);
                false
            }
        }
    }

    fn apply(self: &Arc<Self>, snapshot: &Arc<Snapshot>) {
        let mut stale = Vec::new();
        let mut resplit = Vec::new();
        for (key, logical) in self.lock_targets().iter() {
            if matches!(key, TargetKey::Remote { .. }) {
                // Followed on the control plane, not in the Store.
                continue;
            }
            let spec = self.backend_spec(logical, snapshot);
            if spec != logical.backends.load().spec() {
                resplit.push((logical.clone(), spec));
            }
            let keep = match key {
                TargetKey::Service { .. } => self.refresh_service(logical, snapshot),
                // A name that is now a Service, or an address that is now a cluster IP, must
                // be looked up again.
                TargetKey::Dns { host, port } => snapshot.resolve_name(host, *port).is_none(),
                TargetKey::Addr(addr) => snapshot.resolve_cluster_ip(*addr).is_none(),
                TargetKey::Remote { .. } => true,
            };
            if !keep {
                stale.push(key.clone());
            }
        }
        for (logical, spec) in resplit {
            let this = self.clone();
            let snapshot = snapshot.clone();
            tokio::spawn(async move {
                let backends = this.resolve_backends(&logical, spec, &snapshot).await;
                logical.backends.store(Arc::new(backends));
            });
        }
        if !stale.is_empty() {
            let mut targets = self.lock_targets();
            for key in &stale {
                targets.remove(key);
            }
            drop(targets);
            self.by_authority.rcu(|map| {
                let mut map = AuthorityMap::clone(map);
                map.retain(|_, l| !stale.contains(&l.key));
                map
            });
        }
    }

    pub(crate) async fn resolve_dns(
        &self,
        host: &str,
        port: u16,
    ) -> Result<(Vec<SocketAddr>, Duration), ProxyError> {
        let dns = self
            .dns
            .get_or_init(|| match hickory_resolver::TokioResolver::builder_tokio() {
                Ok(b) => Some(b.build()),
                Err(e) => {
                    tracing::warn!(error = %e, "no system DNS configuration; names outside the config dir won't resolve");
                    None
                }
            });
        let Some(dns) = dns else {
            return Err(ProxyError::Unresolvable);
        };
        match dns.lookup_ip(host).await {
            Ok(lookup) => {
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now())
                    .clamp(DNS_MIN_TTL, DNS_MAX_TTL);
                let mut addrs: Vec<SocketAddr> =
                    lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                addrs.sort();
                addrs.dedup();
                Ok((addrs, ttl))
            }
            Err(e) => {
                // Any client can name any host: rate-limited.
                crate::warn_limited!("dns_failed", %host, error = %e, "DNS resolution failed");
                Err(ProxyError::Unresolvable)
            }
        }
    }

    fn spawn_dns_refresh(self: &Arc<Self>, logical: &Arc<Logical>, first_ttl: Duration) {
        let weak: Weak<Logical> = Arc::downgrade(logical);
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut wait = first_ttl;
            loop {
                tokio::time::sleep(wait).await;
                let (Some(logical), Some(this)) = (weak.upgrade(), this.upgrade()) else {
                    return;
                };
                let TargetKey::Dns { host, port } = &logical.key else {
                    return;
                };
                // A destination evicted from the cache stops refreshing once unused.
                if !this.lock_targets().contains_key(&logical.key) {
                    return;
                }
                wait = match this.resolve_dns(host, *port).await {
                    Ok((addrs, ttl)) => {
                        this.set_endpoints(&logical, &unmeshed(&addrs));
                        ttl
                    }
                    // Keep the last answer rather than failing every request.
                    Err(_) => DNS_RETRY,
                };
            }
        });
    }
}

/// `LogicalLayer`: the first step of an outbound request, naming its logical destination: the
/// address the app dialled when iptables redirected it, else the request's authority (absolute
/// URI, `:authority` or `Host`). The destination travels on in the `RequestCtx`.
#[derive(Clone)]
pub struct LogicalLayer {
    discovery: Arc<Discovery>,
    dialled: Option<Arc<Logical>>,
}

impl LogicalLayer {
    pub fn new(discovery: Arc<Discovery>, dialled: Option<Arc<Logical>>) -> Self {
        Self { discovery, dialled }
    }
}

impl<S> tower::Layer<S> for LogicalLayer {
    type Service = LogicalService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        LogicalService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct LogicalService<S> {
    inner: S,
    layer: LogicalLayer,
}

impl<S> tower::Service<http::Request<RequestBody>> for LogicalService<S>
where
    S: tower::Service<http::Request<RequestBody>, Response = ProxyResponse, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + Unpin + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    // A destination already known (nearly every request) goes straight down: no box.
    type Future = PassThrough<S::Future, Result<ProxyResponse, ProxyError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<RequestBody>) -> Self::Future {
        let known = match &self.layer.dialled {
            Some(l) => Some(l.clone()),
            None => request_authority(&req).and_then(|a| self.layer.discovery.cached(a)),
        };
        if let Some(logical) = known {
            req.ctx_mut().logical = Some(logical);
            return PassThrough::Inner(self.inner.call(req));
        }
        // The inner service was made ready for this call; keep that one, leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let discovery = self.layer.discovery.clone();
        PassThrough::Own(boxed_out_of_line(move || async move {
            let Some(authority) = request_authority(&req) else {
                let err = ProxyError::MissingAuthority;
                log_proxy_error("outbound", "", None, err);
                return Err(err);
            };
            let logical = discovery
                .resolve_authority(authority)
                .await
                .inspect_err(|err| {
                    let destination = String::from_utf8_lossy(authority);
                    log_proxy_error("outbound", &destination, None, *err);
                })?;
            req.ctx_mut().logical = Some(logical);
            inner.call(req).await
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery() -> Arc<Discovery> {
        discovery_with(None)
    }

    fn discovery_with(mesh_tls: Option<Arc<MeshTls>>) -> Arc<Discovery> {
        let store = Store::empty(pylon_proxy_policy::StoreConfig::default());
        let metrics = Metrics::new(Default::default());
        let profiles = Profiles::new(store.clone(), metrics.clone());
        Discovery::new(
            store,
            metrics,
            profiles,
            DiscoverySettings {
                connect_timeout: Duration::from_secs(1),
                accrual: AccrualPolicy::CONSECUTIVE,
                cluster_domain: "cluster.local",
            },
            mesh_tls,
            None,
        )
    }

    #[tokio::test]
    async fn an_identity_makes_an_endpoint_meshed_and_a_change_makes_a_new_one() {
        use crate::connect::test_support::{ca, identity, mesh_tls};
        let (_dir, tls) = mesh_tls(&ca(), "client");
        let d = discovery_with(Some(tls));
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let l = d.resolve_authority(b"127.0.0.1:8080").await.unwrap();
        let plain = l.pick().unwrap();
        assert!(!plain.target.meshed);
        assert!(plain.connect.server_id().is_none());

        // The slice gains the annotation: new endpoint, connections and metric labels.
        d.set_endpoints(&l, &[EndpointSpec::new(addr, Some(identity("web")))]);
        let meshed = l.pick().unwrap();
        assert!(!Arc::ptr_eq(&plain, &meshed));
        assert!(meshed.target.meshed);
        assert_eq!(meshed.connect.server_id(), Some(&identity("web")));

        // Unchanged: the same endpoint (its connections and load are kept).
        d.set_endpoints(&l, &[EndpointSpec::new(addr, Some(identity("web")))]);
        assert!(Arc::ptr_eq(&meshed, &l.pick().unwrap()));

        // Another identity, or none: new again.
        d.set_endpoints(&l, &[EndpointSpec::new(addr, Some(identity("api")))]);
        let other = l.pick().unwrap();
        assert_eq!(other.connect.server_id(), Some(&identity("api")));
        d.set_endpoints(&l, &[EndpointSpec::new(addr, None)]);
        assert!(!l.pick().unwrap().target.meshed);
    }

    #[tokio::test]
    async fn without_an_identity_of_its_own_the_proxy_stays_plaintext() {
        use crate::connect::test_support::identity;
        let d = discovery();
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let l = d.resolve_authority(b"127.0.0.1:8080").await.unwrap();
        d.set_endpoints(&l, &[EndpointSpec::new(addr, Some(identity("web")))]);
        let e = l.pick().unwrap();
        assert!(!e.target.meshed);
        assert!(e.connect.server_id().is_none());
    }

    #[tokio::test]
    async fn an_address_is_its_own_endpoint() {
        let d = discovery();
        let l = d.resolve_authority(b"127.0.0.1:8080").await.unwrap();
        assert_eq!(&*l.authority, "127.0.0.1:8080");
        let picked = l.pick().expect("one endpoint");
        assert_eq!(picked.addr, "127.0.0.1:8080".parse().unwrap());
        // The same authority is one cached destination.
        let again = d.resolve_authority(b"127.0.0.1:8080").await.unwrap();
        assert!(Arc::ptr_eq(&l, &again));
    }

    #[tokio::test]
    async fn client_named_destinations_are_bounded() {
        let d = discovery();
        for port in 1..=(MAX_CACHED_TARGETS as u16 + 10) {
            let authority = format!("127.0.0.1:{port}");
            d.resolve_authority(authority.as_bytes()).await.unwrap();
        }
        let cached = d.lock_targets().len();
        assert!(cached <= MAX_CACHED_TARGETS, "{cached} cached destinations");
        assert!(d.by_authority.load().len() <= MAX_CACHED_AUTHORITIES);
    }

    async fn connect_opaque(e: Arc<Endpoint>) -> Result<crate::connect::EndpointIo, ProxyError> {
        e.connect
            .connect(crate::mesh_tls::Alpn::Opaque)
            .await
            .map_err(|err| ProxyError::from_connect(&err))
    }

    #[tokio::test]
    async fn a_refused_connection_goes_to_another_endpoint() {
        use crate::balance::{connect_with_failover, Connected, MAX_CONNECT_ATTEMPTS};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let alive = listener.local_addr().unwrap();
        let dead: Vec<SocketAddr> = (0..MAX_CONNECT_ATTEMPTS).map(|_| closed()).collect();
        let d = discovery();
        let l = d.resolve_authority(b"127.0.0.1:1").await.unwrap();
        let find = |addr: SocketAddr| {
            l.endpoints
                .snapshot()
                .iter()
                .find(|e| e.addr == addr)
                .cloned()
                .unwrap()
        };

        // One dead, one alive, the dead one picked first: the alive one takes the request.
        d.set_endpoints(&l, &unmeshed(&[dead[0], alive]));
        let first = find(dead[0]);
        let Ok(Connected { endpoint, .. }) =
            connect_with_failover(&l, first.clone(), &mut Vec::new(), connect_opaque).await
        else {
            panic!("no endpoint connected");
        };
        assert_eq!(endpoint.addr, alive);
        // The refusal was charged to the dead one: it now looks slow to the balancer.
        assert!(first.load_handle().cost() > 0.9e9);

        // All dead: the error, after at most MAX_CONNECT_ATTEMPTS endpoints.
        let mut addrs = dead.clone();
        addrs.push(closed());
        let specs = unmeshed(&addrs);
        d.set_endpoints(&l, &specs);
        let Err((err, last)) =
            connect_with_failover(&l, find(dead[0]), &mut Vec::new(), connect_opaque).await
        else {
            panic!("a dead endpoint connected");
        };
        assert_eq!(err, ProxyError::ConnectionRefused);
        let tried = l
            .endpoints
            .snapshot()
            .iter()
            .filter(|e| e.load_handle().cost() > 0.9e9)
            .count();
        assert_eq!(tried, MAX_CONNECT_ATTEMPTS, "last tried: {}", last.addr);
    }

    /// The balancer sends a request the endpoint client handed back unsent (its connection
    /// died, and its endpoint refused a new one) to another endpoint, whichever it picked first.
    #[tokio::test]
    async fn a_request_handed_back_unsent_goes_to_another_endpoint() {
        use crate::balance::BalanceLayer;
        use crate::http::request_body::RequestBody;
        use http::Request;
        use tower::{Layer, ServiceExt};

        // Both endpoints accept connections; the mock below plays the client, handing every
        // request for `gone` back unsent as a dead pooled connection would.
        let listen = || async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                let mut conns = Vec::new();
                while let Ok((c, _)) = l.accept().await {
                    conns.push(c);
                }
            });
            addr
        };
        let (gone, alive) = (listen().await, listen().await);
        let d = discovery();
        let l = d.resolve_authority(b"127.0.0.1:1").await.unwrap();
        d.set_endpoints(&l, &unmeshed(&[gone, alive]));
        let endpoint = |addr| {
            l.endpoints
                .snapshot()
                .iter()
                .find(|e| e.addr == addr)
                .cloned()
                .unwrap()
        };
        // Answers at once (a ready future, as `Balance` wants an `Unpin` one).
        let client = tower::service_fn(move |req: Request<RequestBody>| {
            let target = req.ctx().target.clone().unwrap();
            if target.addr == gone {
                target.unsent.expect("a slot").put(req);
                return std::future::ready(Err(ProxyError::ConnectionRefused));
            }
            let mut rsp = http::Response::new(crate::http::ResponseBody::empty());
            *rsp.status_mut() = http::StatusCode::from_u16(200 + target.addr.port() % 100).unwrap();
            std::future::ready(Ok::<_, ProxyError>(rsp))
        });
        let balance = BalanceLayer::new(false).layer(client);
        for _ in 0..20 {
            let mut req = Request::new(RequestBody::empty());
            req.ctx_mut().logical = Some(l.clone());
            let rsp = balance.clone().oneshot(req).await.expect("answered");
            assert_eq!(rsp.status().as_u16(), 200 + alive.port() % 100);
        }
        // The endpoint that could not take them looks slow now (the connection-failure
        // penalty), so the balancer keeps away from it.
        assert!(endpoint(gone).load_handle().cost() > 0.9e9);
    }

    /// A loopback address nothing listens on.
    fn closed() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn a_malformed_authority_is_a_bad_request() {
        let d = discovery();
        let res = d.resolve_authority(b"bad host:x").await;
        assert!(matches!(res, Err(ProxyError::MalformedRequest)));
    }
}
