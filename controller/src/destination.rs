//! `io.linkerd.proxy.destination.Destination`: a proxy asks for a destination (a service name
//! and port, or an address) and gets a stream that keeps its endpoint set (`Get`) or its
//! profile (`GetProfile`) current.
//!
//! Each subscription is a task that recomputes its answer from every new Store snapshot and
//! sends only what changed: the endpoints added (with Linkerd's `metric_labels`, TLS identity
//! and protocol hint) and removed, or a whole new profile. The first message always carries
//! the full state, so a proxy that reconnects replaces whatever it had, as the protocol asks.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::Stream;
use linkerd2_proxy_api::destination::{
    self as api, destination_server::Destination, protocol_hint, tls_identity, update,
};
use linkerd2_proxy_api::meta;
use pylon_proxy_policy::proto::{profile_to_proto, tcp_address};
use pylon_proxy_policy::{
    Endpoint, MeshObject, Pod, ResolvedService, RouteTable, ServiceRef, Snapshot, Store,
    WeightedAuthority,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::mesh::MeshConfig;

/// Linkerd's endpoint weight; all endpoints are equal.
const ENDPOINT_WEIGHT: u32 = 10_000;
/// Messages a slow subscriber may have queued before its task waits for it.
const STREAM_BUFFER: usize = 8;

/// Subscription counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct DestinationStats {
    pub get_streams: AtomicI64,
    pub profile_streams: AtomicI64,
    pub updates_sent: AtomicU64,
}

#[derive(Clone)]
pub struct DestinationService {
    store: Arc<Store>,
    mesh: Arc<MeshConfig>,
    stats: Arc<DestinationStats>,
}

impl DestinationService {
    pub fn new(store: Arc<Store>, mesh: Arc<MeshConfig>, stats: Arc<DestinationStats>) -> Self {
        Self { store, mesh, stats }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<api::Update, Status>> + Send>>;
type ProfileStream = Pin<Box<dyn Stream<Item = Result<api::DestinationProfile, Status>> + Send>>;

#[tonic::async_trait]
impl Destination for DestinationService {
    type GetStream = UpdateStream;
    type GetProfileStream = ProfileStream;

    async fn get(
        &self,
        request: Request<api::GetDestination>,
    ) -> Result<Response<UpdateStream>, Status> {
        let target = Target::parse(&request.get_ref().path)?;
        tracing::debug!(path = %request.get_ref().path, "Get");
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (store, mesh, stats) = (self.store.clone(), self.mesh.clone(), self.stats.clone());
        tokio::spawn(async move {
            let _count = Gauge::inc(&stats.get_streams);
            let mut snapshots = store.subscribe();
            let mut sent = EndpointView::Unsent;
            let mut inputs: Option<Inputs> = None;
            loop {
                let snapshot = snapshots.borrow_and_update().clone();
                // Most changes are to other destinations: then nothing is recomputed.
                let now = Inputs::for_endpoints(&snapshot, &target);
                if inputs.as_ref() != Some(&now) {
                    let view = EndpointView::of(&snapshot, &mesh, &target);
                    drop(snapshot);
                    for update in sent.diff(&view) {
                        stats.updates_sent.fetch_add(1, Ordering::Relaxed);
                        if tx.send(Ok(update)).await.is_err() {
                            return;
                        }
                    }
                    sent = view;
                    inputs = Some(now);
                }
                tokio::select! {
                    changed = snapshots.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_profile(
        &self,
        request: Request<api::GetDestination>,
    ) -> Result<Response<ProfileStream>, Status> {
        let target = Target::parse(&request.get_ref().path)?;
        tracing::debug!(path = %request.get_ref().path, "GetProfile");
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (store, mesh, stats) = (self.store.clone(), self.mesh.clone(), self.stats.clone());
        tokio::spawn(async move {
            let _count = Gauge::inc(&stats.profile_streams);
            let mut snapshots = store.subscribe();
            let mut sent: Option<api::DestinationProfile> = None;
            let mut inputs: Option<Inputs> = None;
            loop {
                let snapshot = snapshots.borrow_and_update().clone();
                let now = Inputs::for_profile(&snapshot, &target);
                if inputs.as_ref() != Some(&now) {
                    let profile = profile_for(&snapshot, &mesh, &target);
                    drop(snapshot);
                    if sent.as_ref() != Some(&profile) {
                        stats.updates_sent.fetch_add(1, Ordering::Relaxed);
                        if tx.send(Ok(profile.clone())).await.is_err() {
                            return;
                        }
                        sent = Some(profile);
                    }
                    inputs = Some(now);
                }
                tokio::select! {
                    changed = snapshots.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What a destination's answer is computed from: the resolved service (by value) and the
/// objects the answer reads (its Service, Namespace, endpoints' Pods, split, routes), held so
/// that an unchanged one is known by `Arc::ptr_eq` (a snapshot reuses untouched objects, and
/// holding them means a freed object's address can't come back as a false match).
struct Inputs {
    service: Option<ResolvedService>,
    /// Whether slices exist decides "unknown" for a service without a selector.
    has_slices: bool,
    objects: Vec<Option<Arc<MeshObject>>>,
    routes: Option<Arc<RouteTable>>,
}

impl PartialEq for Inputs {
    fn eq(&self, other: &Self) -> bool {
        self.service == other.service
            && self.has_slices == other.has_slices
            && match (&self.routes, &other.routes) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
            && self.objects.len() == other.objects.len()
            && self
                .objects
                .iter()
                .zip(&other.objects)
                .all(|(a, b)| match (a, b) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                })
    }
}

impl Inputs {
    fn for_endpoints(snapshot: &Snapshot, target: &Target) -> Inputs {
        let service = resolve(snapshot, target);
        let mut objects = Vec::new();
        match &service {
            Some(svc) => {
                let ns = &svc.service.namespace;
                objects.push(snapshot.service_object(&svc.service).cloned());
                objects.push(snapshot.namespace_object(ns).cloned());
                for ep in svc.endpoints.iter() {
                    let pod = ep
                        .pod
                        .as_deref()
                        .and_then(|name| snapshot.pod_object(ns, name))
                        .or_else(|| snapshot.pod_object_by_ip(ep.addr.ip()));
                    objects.push(pod.cloned());
                }
            }
            None => {
                if let Target::Addr(addr) = target {
                    objects.push(snapshot.pod_object_by_ip(addr.ip()).cloned());
                }
            }
        }
        let has_slices = service
            .as_ref()
            .is_some_and(|svc| snapshot.has_endpoint_slices(&svc.service));
        Inputs {
            service,
            has_slices,
            objects,
            routes: None,
        }
    }

    fn for_profile(snapshot: &Snapshot, target: &Target) -> Inputs {
        let service = resolve(snapshot, target);
        let (objects, routes) = match (&service, target) {
            (Some(svc), _) => (
                vec![
                    snapshot.service_object(&svc.service).cloned(),
                    snapshot.namespace_object(&svc.service.namespace).cloned(),
                    snapshot.split_object(&svc.service).cloned(),
                ],
                snapshot
                    .route_table(&svc.service.fqdn(snapshot.cluster_domain()))
                    .cloned(),
            ),
            (None, Target::Name { host, .. }) => (Vec::new(), snapshot.route_table(host).cloned()),
            (None, Target::Addr(addr)) => {
                (vec![snapshot.pod_object_by_ip(addr.ip()).cloned()], None)
            }
        };
        Inputs {
            service,
            has_slices: false,
            objects,
            routes,
        }
    }
}

fn resolve(snapshot: &Snapshot, target: &Target) -> Option<ResolvedService> {
    match target {
        Target::Name { host, port } => snapshot.resolve_name(host, *port),
        Target::Addr(addr) => snapshot.resolve_cluster_ip(*addr),
    }
}

/// Counts a live stream for as long as it is held.
struct Gauge<'a>(&'a AtomicI64);

impl<'a> Gauge<'a> {
    fn inc(g: &'a AtomicI64) -> Self {
        g.fetch_add(1, Ordering::Relaxed);
        Self(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a proxy asked for: `host:port`, the host a name or an address.
#[derive(Clone, Debug)]
enum Target {
    Name { host: String, port: u16 },
    Addr(SocketAddr),
}

impl Target {
    fn parse(path: &str) -> Result<Target, Status> {
        let authority: http::uri::Authority = path.parse().map_err(|_| {
            Status::invalid_argument(format!("invalid destination {path:?}: expected host:port"))
        })?;
        let port = authority.port_u16().unwrap_or(80);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        Ok(match host.parse::<IpAddr>() {
            Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
            Err(_) => Target::Name {
                host: host.trim_end_matches('.').to_ascii_lowercase(),
                port,
            },
        })
    }
}

/// A destination's endpoints as last computed.
#[derive(Debug, PartialEq)]
enum EndpointView {
    /// Nothing sent yet.
    Unsent,
    /// No such destination: the proxy may fall back to DNS.
    Unknown,
    Endpoints {
        set_labels: BTreeMap<String, String>,
        addrs: BTreeMap<SocketAddr, api::WeightedAddr>,
    },
}

impl EndpointView {
    fn of(snapshot: &Snapshot, mesh: &MeshConfig, target: &Target) -> EndpointView {
        let service = match target {
            Target::Name { host, port } => snapshot.resolve_name(host, *port),
            Target::Addr(addr) => snapshot.resolve_cluster_ip(*addr),
        };
        if let Some(service) = service {
            if !has_endpoints_source(snapshot, &service.service) {
                // ExternalName or a Service without a selector or slices: DNS knows better.
                return EndpointView::Unknown;
            }
            return service_view(snapshot, mesh, &service);
        }
        // A pod's own address: that pod, so the proxy learns its identity.
        if let Target::Addr(addr) = target {
            if let Some(pod) = snapshot.pod_by_ip(addr.ip()) {
                let addr = *addr;
                return EndpointView::Endpoints {
                    set_labels: BTreeMap::from([(
                        "namespace".into(),
                        pod.meta.namespace.to_string(),
                    )]),
                    addrs: BTreeMap::from([(addr, pod_addr(mesh, addr, Some(pod), None, None))]),
                };
            }
        }
        EndpointView::Unknown
    }

    /// The updates that take a proxy from `self` to `next`.
    fn diff(&self, next: &EndpointView) -> Vec<api::Update> {
        let update = |u| api::Update { update: Some(u) };
        let add = |set_labels: &BTreeMap<String, String>, addrs: Vec<api::WeightedAddr>| {
            update(update::Update::Add(api::WeightedAddrSet {
                addrs,
                metric_labels: set_labels.clone().into_iter().collect(),
            }))
        };
        match (self, next) {
            (_, EndpointView::Unsent) => Vec::new(),
            (EndpointView::Unknown, EndpointView::Unknown) => Vec::new(),
            (_, EndpointView::Unknown) => {
                vec![update(update::Update::NoEndpoints(api::NoEndpoints {
                    exists: false,
                }))]
            }
            (
                EndpointView::Unsent | EndpointView::Unknown,
                EndpointView::Endpoints { set_labels, addrs },
            ) => {
                if addrs.is_empty() {
                    vec![update(update::Update::NoEndpoints(api::NoEndpoints {
                        exists: true,
                    }))]
                } else {
                    vec![add(set_labels, addrs.values().cloned().collect())]
                }
            }
            (
                EndpointView::Endpoints {
                    addrs: old,
                    set_labels: old_labels,
                },
                EndpointView::Endpoints { set_labels, addrs },
            ) => {
                let mut updates = Vec::new();
                let removed: Vec<_> = old
                    .keys()
                    .filter(|a| !addrs.contains_key(a))
                    .map(|a| tcp_address(*a))
                    .collect();
                if !removed.is_empty() {
                    updates.push(update(update::Update::Remove(api::AddrSet {
                        addrs: removed,
                    })));
                }
                let added: Vec<_> = addrs
                    .iter()
                    .filter(|(a, w)| old_labels != set_labels || old.get(a) != Some(w))
                    .map(|(_, w)| w.clone())
                    .collect();
                if !added.is_empty() {
                    updates.push(add(set_labels, added));
                }
                updates
            }
        }
    }
}

/// Whether Kubernetes manages endpoints for the service (or someone wrote slices for it).
fn has_endpoints_source(snapshot: &Snapshot, service: &ServiceRef) -> bool {
    snapshot.has_endpoint_slices(service)
        || snapshot
            .service(service)
            .is_some_and(|s| !s.selector.is_empty())
}

fn service_view(snapshot: &Snapshot, mesh: &MeshConfig, service: &ResolvedService) -> EndpointView {
    let ns = &service.service.namespace;
    let set_labels = BTreeMap::from([
        ("namespace".to_string(), ns.to_string()),
        ("service".to_string(), service.service.name.to_string()),
    ]);
    let opaque = mesh.is_opaque(snapshot, Some(&service.service), None, service.port);
    let addrs = service
        .endpoints
        .iter()
        .map(|ep| {
            let pod = ep
                .pod
                .as_deref()
                .and_then(|name| snapshot.pod(ns, name))
                .or_else(|| snapshot.pod_by_ip(ep.addr.ip()));
            (
                ep.addr,
                pod_addr(mesh, ep.addr, pod, Some(ep), Some(opaque)),
            )
        })
        .collect();
    EndpointView::Endpoints { set_labels, addrs }
}

/// One endpoint as Linkerd's destination controller describes it.
fn pod_addr(
    mesh: &MeshConfig,
    addr: SocketAddr,
    pod: Option<&Pod>,
    endpoint: Option<&Endpoint>,
    opaque: Option<bool>,
) -> api::WeightedAddr {
    let mut labels: BTreeMap<String, String> = pod
        .map(|p| {
            p.metric_labels()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect()
        })
        .unwrap_or_default();
    if let Some(zone) = endpoint.and_then(|e| e.zone.as_deref()) {
        labels.insert("zone".to_string(), zone.to_string());
    }
    // The slice's annotation names the identity outright (a config dir's way); in a cluster
    // a meshed pod's ServiceAccount does.
    let identity = endpoint
        .and_then(|e| e.identity.as_deref().map(str::to_string))
        .or_else(|| {
            pod.filter(|p| p.meshed)
                .map(|p| mesh.identity_of(&p.service_account, &p.meta.namespace))
        });
    let opaque =
        opaque.unwrap_or_else(|| pod.is_some_and(|p| mesh.pod_port_is_opaque(p, addr.port())));
    let protocol_hint = identity.as_ref().map(|_| api::ProtocolHint {
        protocol: Some(if opaque {
            protocol_hint::Protocol::Opaque(protocol_hint::Opaque {})
        } else {
            protocol_hint::Protocol::H2(protocol_hint::H2 {})
        }),
        opaque_transport: opaque.then_some(protocol_hint::OpaqueTransport {
            inbound_port: u32::from(mesh.inbound_port),
        }),
    });
    let tls_identity = identity.map(|name| api::TlsIdentity {
        strategy: Some(tls_identity::Strategy::DnsLikeIdentity(
            tls_identity::DnsLikeIdentity { name: name.clone() },
        )),
        server_name: Some(tls_identity::DnsLikeIdentity { name }),
    });
    let resource_ref = pod.map(|p| meta::Metadata {
        kind: Some(meta::metadata::Kind::Resource(meta::Resource {
            group: String::new(),
            kind: "Pod".into(),
            name: p.meta.name.to_string(),
            namespace: p.meta.namespace.to_string(),
            section: String::new(),
            port: 0,
        })),
    });
    api::WeightedAddr {
        addr: Some(tcp_address(addr)),
        weight: ENDPOINT_WEIGHT,
        metric_labels: labels.into_iter().collect(),
        tls_identity,
        protocol_hint,
        authority_override: None,
        http2: None,
        resource_ref,
    }
}

/// The profile for a target: its service's routes and split, or an external name's routes,
/// or (for a pod's address) that endpoint alone.
fn profile_for(snapshot: &Snapshot, mesh: &MeshConfig, target: &Target) -> api::DestinationProfile {
    let service = match target {
        Target::Name { host, port } => snapshot.resolve_name(host, *port),
        Target::Addr(addr) => snapshot.resolve_cluster_ip(*addr),
    };
    let Some(service) = service else {
        return match target {
            Target::Name { host, .. } => {
                let table = route_table(snapshot, host);
                profile_to_proto(&table, "", false)
            }
            Target::Addr(addr) => {
                let pod = snapshot.pod_by_ip(addr.ip());
                let opaque = pod.is_some_and(|p| mesh.pod_port_is_opaque(p, addr.port()));
                let mut profile = profile_to_proto(&RouteTable::default(), "", opaque);
                profile.endpoint = pod.map(|p| pod_addr(mesh, *addr, Some(p), None, Some(opaque)));
                profile
            }
        };
    };
    let svc = &service.service;
    let fqdn = svc.fqdn(snapshot.cluster_domain());
    let table = route_table(snapshot, &fqdn);
    // A TrafficSplit on the service decides its backends, as the SMI adaptor makes it do.
    let table = match snapshot.split_for(svc) {
        Some(split) => {
            let overrides = split
                .backends
                .iter()
                .map(|b| WeightedAuthority {
                    authority: format!(
                        "{}:{}",
                        split.backend_ref(b).fqdn(snapshot.cluster_domain()),
                        service.port
                    )
                    .into(),
                    weight_milli: b.weight_milli,
                })
                .collect();
            RouteTable::new(table.routes().to_vec(), *table.retry_budget(), overrides)
        }
        None => table,
    };
    let opaque = mesh.is_opaque(snapshot, Some(svc), None, service.port);
    let mut profile = profile_to_proto(&table, &fqdn, opaque);
    profile.parent_ref = Some(resource_ref(
        "Service",
        &svc.namespace,
        &svc.name,
        service.port,
    ));
    if snapshot.route_table(&fqdn).is_some() {
        profile.profile_ref = Some(resource_ref("ServiceProfile", &svc.namespace, &fqdn, 0));
    }
    profile
}

/// A profile's routes (the default table without one). When several namespaces define one,
/// the Store's rule picks it (its default namespace first); Linkerd's per-client choice by the
/// context token's namespace is not made.
fn route_table(snapshot: &Snapshot, name: &str) -> RouteTable {
    snapshot
        .route_table(name)
        .map(|t| RouteTable::clone(t))
        .unwrap_or_default()
}

fn resource_ref(kind: &str, namespace: &str, name: &str, port: u16) -> meta::Metadata {
    meta::Metadata {
        kind: Some(meta::metadata::Kind::Resource(meta::Resource {
            group: if kind == "ServiceProfile" {
                "linkerd.io".into()
            } else {
                String::new()
            },
            kind: kind.into(),
            name: name.into(),
            namespace: namespace.into(),
            section: String::new(),
            port: u32::from(port),
        })),
    }
}
