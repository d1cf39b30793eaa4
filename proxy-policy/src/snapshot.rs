//! Immutable snapshots of the mesh, with lookup indexes precomputed at build time so the
//! data path resolves a destination with a couple of hash lookups and no allocation.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::inbound::{InboundConfig, InboundPolicy};
use crate::objects::{
    AddressType, AuthenticationKind, Endpoint, EndpointSlice, MeshObject, Namespace, ObjectKey,
    ObjectKind, Pod, PolicyTarget, Protocol, ResolvedService, Service, ServicePort, ServiceProfile,
    ServiceRef, TargetPort, TrafficSplit,
};
use crate::route::RouteTable;
use crate::store::ConfigError;

fn as_pod(object: Option<&Arc<MeshObject>>) -> Option<&Pod> {
    match object.map(|o| &**o) {
        Some(MeshObject::Pod(p)) => Some(p),
        _ => None,
    }
}

/// What the Store merged from its files: everything a snapshot is built from.
#[derive(Debug, Default)]
pub(crate) struct MeshContent {
    /// The validated objects in force, by identity.
    pub objects: BTreeMap<ObjectKey, Arc<MeshObject>>,
    /// The file each object in force came from.
    pub sources: BTreeMap<ObjectKey, PathBuf>,
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<ConfigError>,
}

/// One published view of the mesh. Never changes once built.
#[derive(Debug)]
pub struct Snapshot {
    generation: u64,
    default_namespace: Arc<str>,
    cluster_domain: Arc<str>,
    /// The validated objects in force, by identity.
    objects: BTreeMap<ObjectKey, Arc<MeshObject>>,
    sources: BTreeMap<ObjectKey, PathBuf>,
    errors: Vec<ConfigError>,
    /// The files' warnings, then the [`Snapshot::reference_warnings`].
    warnings: Vec<ConfigError>,
    /// How many of `warnings` came from the files (the rest are derived here).
    file_warnings: usize,
    /// namespace -> name -> service. Nested so lookups borrow `&str` without allocating.
    services: HashMap<Arc<str>, HashMap<Arc<str>, ServiceEntry>>,
    by_cluster_ip: HashMap<IpAddr, ServiceRef>,
    /// ServiceProfile name (the service FQDN, lowercase) -> its routes.
    route_tables: HashMap<Arc<str>, Arc<RouteTable>>,
    /// Apex service -> the TrafficSplit that shares its traffic.
    splits: HashMap<ServiceRef, Arc<MeshObject>>,
    /// Pod IP -> the pod using it (a ready one first: finished pods keep their IPs).
    pods_by_ip: HashMap<IpAddr, Arc<MeshObject>>,
    /// namespace -> name -> pod, so a lookup borrows `&str` and allocates nothing.
    pods: HashMap<Arc<str>, HashMap<Arc<str>, Arc<MeshObject>>>,
    /// The authorization objects, in key order: what an inbound policy is compiled from.
    policy_objects: Vec<Arc<MeshObject>>,
}

#[derive(Debug)]
struct ServiceEntry {
    service: Arc<MeshObject>,
    has_endpoint_slices: bool,
    /// Its EndpointSlices, in name order.
    slices: Vec<Arc<MeshObject>>,
    /// Service port -> its resolution, built once per snapshot.
    ports: HashMap<u16, ResolvedService>,
}

impl Snapshot {
    pub(crate) fn empty(default_namespace: Arc<str>, cluster_domain: Arc<str>) -> Self {
        Self::build(0, default_namespace, cluster_domain, MeshContent::default())
    }

    pub(crate) fn build(
        generation: u64,
        default_namespace: Arc<str>,
        cluster_domain: Arc<str>,
        content: MeshContent,
    ) -> Self {
        let MeshContent {
            objects,
            sources,
            errors,
            mut warnings,
        } = content;
        let file_warnings = warnings.len();
        warnings.extend(reference_warnings(&objects, &sources));
        let mut slices_by_service: HashMap<ServiceRef, Vec<&Arc<MeshObject>>> = HashMap::new();
        for object in objects.values() {
            if let MeshObject::EndpointSlice(slice) = &**object {
                match slice.service_ref() {
                    Some(svc) => slices_by_service.entry(svc).or_default().push(object),
                    None => tracing::debug!(
                        slice = %object.key(),
                        "EndpointSlice has no kubernetes.io/service-name label; unused"
                    ),
                }
            }
        }

        let mut services: HashMap<Arc<str>, HashMap<Arc<str>, ServiceEntry>> = HashMap::new();
        let mut by_cluster_ip: HashMap<IpAddr, ServiceRef> = HashMap::new();
        for object in objects.values() {
            let MeshObject::Service(svc) = &**object else {
                continue;
            };
            let svc_ref = svc.service_ref();
            let slice_objects = slices_by_service
                .get(&svc_ref)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let slices: Vec<&EndpointSlice> = slice_objects
                .iter()
                .filter_map(|o| match &***o {
                    MeshObject::EndpointSlice(s) => Some(s),
                    _ => None,
                })
                .collect();
            let ports = svc
                .ports
                .iter()
                // The proxy carries TCP; a UDP or SCTP port with the same number is not it.
                .filter(|p| p.protocol == Protocol::Tcp)
                .map(|p| {
                    let resolved = ResolvedService {
                        service: svc_ref.clone(),
                        port: p.port,
                        authority: format!("{}:{}", svc_ref.fqdn(&cluster_domain), p.port).into(),
                        endpoints: endpoints_for_port(p, &slices).into(),
                    };
                    (p.port, resolved)
                })
                .collect();
            for ip in &svc.cluster_ips {
                // Objects are visited in key order, so the winner of a clash is stable.
                if let Some(first) = by_cluster_ip.get(ip) {
                    tracing::warn!(
                        cluster_ip = %ip,
                        service = %svc_ref,
                        already = %first,
                        "cluster IP used by two Services; ignoring the second"
                    );
                    continue;
                }
                by_cluster_ip.insert(*ip, svc_ref.clone());
            }
            services
                .entry(svc_ref.namespace.clone())
                .or_default()
                .insert(
                    svc_ref.name.clone(),
                    ServiceEntry {
                        service: object.clone(),
                        has_endpoint_slices: !slices.is_empty(),
                        slices: slice_objects.iter().map(|o| Arc::clone(o)).collect(),
                        ports,
                    },
                );
        }

        let route_tables = route_tables(&objects, &default_namespace);
        let mut splits: HashMap<ServiceRef, Arc<MeshObject>> = HashMap::new();
        for object in objects.values() {
            let MeshObject::TrafficSplit(split) = &**object else {
                continue;
            };
            // Objects are visited in key order, so the first split by name wins a clash.
            match splits.get(&split.apex()) {
                Some(first) => tracing::warn!(
                    apex = %split.apex(),
                    using = %first.key(),
                    ignoring = %object.key(),
                    "two TrafficSplits for the same service; using the first by name"
                ),
                None => {
                    splits.insert(split.apex(), object.clone());
                }
            }
        }

        let policy_objects = objects
            .values()
            .filter(|o| {
                matches!(
                    &***o,
                    MeshObject::Server(_)
                        | MeshObject::AuthorizationPolicy(_)
                        | MeshObject::MeshTlsAuthentication(_)
                        | MeshObject::NetworkAuthentication(_)
                )
            })
            .cloned()
            .collect();
        let mut pods_by_ip: HashMap<IpAddr, Arc<MeshObject>> = HashMap::new();
        let mut pods: HashMap<Arc<str>, HashMap<Arc<str>, Arc<MeshObject>>> = HashMap::new();
        for object in objects.values() {
            let MeshObject::Pod(pod) = &**object else {
                continue;
            };
            pods.entry(pod.meta.namespace.clone())
                .or_default()
                .insert(pod.meta.name.clone(), object.clone());
            for ip in &pod.ips {
                let replace = match pods_by_ip.get(ip).map(|o| &**o) {
                    Some(MeshObject::Pod(first)) => pod.ready && !first.ready,
                    _ => true,
                };
                if replace {
                    pods_by_ip.insert(*ip, object.clone());
                }
            }
        }

        Self {
            generation,
            default_namespace,
            cluster_domain,
            objects,
            sources,
            errors,
            warnings,
            file_warnings,
            services,
            by_cluster_ip,
            route_tables,
            splits,
            pods_by_ip,
            pods,
            policy_objects,
        }
    }

    /// Increases by one with every published snapshot (0 for an empty Store).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Resolves `NAME`, `NAME.NS`, `NAME.NS.svc` or `NAME.NS.svc.<cluster-domain>`
    /// (case-insensitive, optional trailing dot) and a service port.
    ///
    /// Returns `None` if the service or the port does not exist. A service port with no
    /// usable endpoints resolves with an empty endpoint list.
    pub fn resolve_name(&self, host: &str, port: u16) -> Option<ResolvedService> {
        let host = host.strip_suffix('.').unwrap_or(host);
        // Kubernetes names are lowercase, so only mixed-case input pays for a copy.
        let host: Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        let mut labels = host.splitn(4, '.');
        let name = labels.next()?;
        let namespace = labels.next().unwrap_or(&self.default_namespace);
        match (labels.next(), labels.next()) {
            (None, _) | (Some("svc"), None) => {}
            (Some("svc"), Some(domain)) if domain == &*self.cluster_domain => {}
            _ => return None,
        }
        self.entry(namespace, name)?.ports.get(&port).cloned()
    }

    /// Maps a `ClusterIP:port` to the service behind it, as kube-proxy would.
    pub fn resolve_cluster_ip(&self, addr: SocketAddr) -> Option<ResolvedService> {
        // A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6.
        let svc = self.by_cluster_ip.get(&addr.ip().to_canonical())?;
        self.entry(&svc.namespace, &svc.name)?
            .ports
            .get(&addr.port())
            .cloned()
    }

    /// The routes of the ServiceProfile named `service_fqdn` (`web.default.svc.cluster.local`;
    /// case-insensitive, optional trailing dot, no port), or `None` when the service has no
    /// profile and every request takes the default route.
    ///
    /// The name must be the full FQDN a profile is named by: the proxy canonicalizes the
    /// destination (e.g. with [`Snapshot::resolve_name`] and [`ServiceRef::fqdn`]) first.
    /// When profiles with that name exist in several namespaces, the one in the Store's
    /// default namespace (the client's own, a Linkerd client-side override) wins, else the
    /// first in namespace order. Borrows and allocates nothing unless the name has
    /// uppercase letters.
    pub fn route_table(&self, service_fqdn: &str) -> Option<&Arc<RouteTable>> {
        let name = service_fqdn.strip_suffix('.').unwrap_or(service_fqdn);
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.route_tables.get(name.to_ascii_lowercase().as_str())
        } else {
            self.route_tables.get(name)
        }
    }

    /// The TrafficSplit whose apex is `service`, if any.
    pub fn split_for(&self, service: &ServiceRef) -> Option<&TrafficSplit> {
        match self.splits.get(service).map(|o| &**o) {
            Some(MeshObject::TrafficSplit(split)) => Some(split),
            _ => None,
        }
    }

    /// The authorization objects (Servers, AuthorizationPolicies, MeshTLS- and
    /// NetworkAuthentications) as shared objects, in key order: an inbound policy depends on
    /// these, its workload's labels and the port names it is given.
    pub fn policy_objects(&self) -> &[Arc<MeshObject>] {
        &self.policy_objects
    }

    /// [`Snapshot::split_for`] as the shared object (see [`Snapshot::pod_object`]).
    pub fn split_object(&self, service: &ServiceRef) -> Option<&Arc<MeshObject>> {
        self.splits.get(service)
    }

    /// Every current configuration problem (the objects they affect keep their last good
    /// version, if they had one).
    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }

    /// Problems that reject nothing, in the same shape as [`Snapshot::errors`]: the fields of
    /// valid objects that Kubernetes would not know (the proxy ignores them), then the
    /// [`Snapshot::reference_warnings`].
    pub fn warnings(&self) -> &[ConfigError] {
        &self.warnings
    }

    /// Valid objects naming objects that do not exist: an AuthorizationPolicy's target
    /// Server, or its required MeshTLSAuthentication or NetworkAuthentication (then the policy
    /// authorizes nobody until it exists). Part of [`Snapshot::warnings`].
    pub fn reference_warnings(&self) -> &[ConfigError] {
        &self.warnings[self.file_warnings..]
    }

    /// The inbound authorization policy of the workload `namespace`/`labels` (the proxy's
    /// own, from its flags) on every port. Builds it from this snapshot's Servers,
    /// AuthorizationPolicies and authentications, so call it once per snapshot (on each
    /// [`Store::subscribe`](crate::Store::subscribe) update) and keep the `Arc`.
    ///
    /// Servers naming their port resolve it through `config.port_names`, then through the
    /// Services whose `spec.selector` matches `labels`: a named `targetPort` is given its
    /// number by the EndpointSlice port of the same service port name.
    pub fn inbound_policy(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        config: &InboundConfig,
    ) -> Arc<InboundPolicy> {
        let learned = self.workload_port_names(namespace, labels);
        Arc::new(crate::inbound::build(
            &self.objects,
            namespace,
            labels,
            config,
            &learned,
        ))
    }

    /// Container port names of a workload, as its Services reveal them: a Service selecting
    /// the workload whose port has a named `targetPort`, and an EndpointSlice of that Service
    /// giving the service port's number. The first Service by name wins a clash.
    pub fn workload_port_names(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> BTreeMap<String, u16> {
        let mut names = BTreeMap::new();
        let Some(services) = self.services.get(namespace) else {
            return names;
        };
        let mut services: Vec<&Service> = services
            .values()
            .filter_map(|e| match &*e.service {
                MeshObject::Service(s) => Some(s),
                _ => None,
            })
            .filter(|s| {
                !s.selector.is_empty() && s.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect();
        services.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        for svc in services {
            let svc_ref = svc.service_ref();
            for p in &svc.ports {
                let TargetPort::Name(target) = &p.target_port else {
                    continue;
                };
                let number = self.objects.values().find_map(|o| match &**o {
                    MeshObject::EndpointSlice(slice)
                        if slice.service_ref().as_ref() == Some(&svc_ref) =>
                    {
                        slice
                            .ports
                            .iter()
                            .find(|sp| sp.name == p.name && sp.protocol == p.protocol)
                            .and_then(|sp| sp.port)
                    }
                    _ => None,
                });
                if let Some(number) = number {
                    names.entry(target.to_string()).or_insert(number);
                }
            }
        }
        names
    }

    /// The file the object in force with this key came from.
    pub fn source_file(&self, key: &ObjectKey) -> Option<&Path> {
        self.sources.get(key).map(PathBuf::as_path)
    }

    /// The Service object, if it exists.
    pub fn service(&self, svc: &ServiceRef) -> Option<&Service> {
        match &*self.entry(&svc.namespace, &svc.name)?.service {
            MeshObject::Service(s) => Some(s),
            _ => None,
        }
    }

    /// Whether any EndpointSlice names this service. The proxy falls back to DNS for a
    /// destination without one, rather than failing on an empty endpoint list.
    pub fn has_endpoint_slices(&self, svc: &ServiceRef) -> bool {
        self.entry(&svc.namespace, &svc.name)
            .is_some_and(|e| e.has_endpoint_slices)
    }

    /// Every Service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Service> + '_ {
        self.services
            .values()
            .flat_map(HashMap::values)
            .filter_map(|e| match &*e.service {
                MeshObject::Service(s) => Some(s),
                _ => None,
            })
    }

    /// The EndpointSlices naming this service, in name order.
    pub fn endpoint_slices(&self, svc: &ServiceRef) -> impl Iterator<Item = &EndpointSlice> + '_ {
        self.entry(&svc.namespace, &svc.name)
            .into_iter()
            .flat_map(|e| e.slices.iter())
            .filter_map(|o| match &**o {
                MeshObject::EndpointSlice(s) => Some(s),
                _ => None,
            })
    }

    /// The endpoints the proxy would send this service's traffic to, on any of its ports
    /// (as [`Snapshot::resolve_name`] gives them per port; an address may repeat).
    pub fn service_endpoints(&self, svc: &ServiceRef) -> impl Iterator<Item = &Endpoint> + '_ {
        self.entry(&svc.namespace, &svc.name)
            .into_iter()
            .flat_map(|e| e.ports.values())
            .flat_map(|r| r.endpoints.iter())
    }

    /// The pods of a namespace, in no particular order.
    pub fn pods_in(&self, namespace: &str) -> impl Iterator<Item = &Pod> + '_ {
        self.pods
            .get(namespace)
            .into_iter()
            .flat_map(HashMap::values)
            .filter_map(|o| as_pod(Some(o)))
    }

    /// A pod by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        as_pod(self.pod_object(namespace, name))
    }

    /// The pod with this IP, a ready one if several have had it.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        as_pod(self.pod_object_by_ip(ip))
    }

    /// [`Snapshot::pod`] as the shared object. An object no change touched is the same
    /// allocation in the next snapshot (`Arc::ptr_eq`): a reader can tell cheaply that nothing
    /// it depends on changed.
    pub fn pod_object(&self, namespace: &str, name: &str) -> Option<&Arc<MeshObject>> {
        self.pods.get(namespace)?.get(name)
    }

    /// [`Snapshot::pod_by_ip`] as the shared object.
    pub fn pod_object_by_ip(&self, ip: IpAddr) -> Option<&Arc<MeshObject>> {
        self.pods_by_ip.get(&ip)
    }

    /// [`Snapshot::service`] as the shared object.
    pub fn service_object(&self, svc: &ServiceRef) -> Option<&Arc<MeshObject>> {
        self.entry(&svc.namespace, &svc.name).map(|e| &e.service)
    }

    /// A Namespace object, when the source has them (the cluster does; a config dir may).
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        match self.namespace_object(name).map(|o| &**o) {
            Some(MeshObject::Namespace(n)) => Some(n),
            _ => None,
        }
    }

    /// [`Snapshot::namespace`] as the shared object.
    pub fn namespace_object(&self, name: &str) -> Option<&Arc<MeshObject>> {
        let key = ObjectKey {
            kind: ObjectKind::Namespace,
            namespace: "".into(),
            name: name.into(),
        };
        self.objects.get(&key)
    }

    /// All validated objects in force, in key order.
    pub fn objects(&self) -> impl Iterator<Item = &MeshObject> + '_ {
        self.objects.values().map(|o| &**o)
    }

    pub fn cluster_domain(&self) -> &str {
        &self.cluster_domain
    }

    pub fn default_namespace(&self) -> &str {
        &self.default_namespace
    }

    pub(crate) fn object_map(&self) -> &BTreeMap<ObjectKey, Arc<MeshObject>> {
        &self.objects
    }

    /// Whether this snapshot was built from exactly `content`, so publishing it again would
    /// change nothing.
    pub(crate) fn has_content(&self, content: &MeshContent) -> bool {
        self.objects == content.objects
            && self.sources == content.sources
            && self.errors == content.errors
            && self.warnings[..self.file_warnings] == content.warnings[..]
    }

    fn entry(&self, namespace: &str, name: &str) -> Option<&ServiceEntry> {
        self.services.get(namespace)?.get(name)
    }
}

/// Indexes ServiceProfiles by name. Objects are visited in key order (namespace, name),
/// so the choice among same-named profiles is stable.
fn route_tables(
    objects: &BTreeMap<ObjectKey, Arc<MeshObject>>,
    default_namespace: &str,
) -> HashMap<Arc<str>, Arc<RouteTable>> {
    let mut chosen: HashMap<Arc<str>, &ServiceProfile> = HashMap::new();
    for object in objects.values() {
        let MeshObject::ServiceProfile(profile) = &**object else {
            continue;
        };
        let name = &profile.meta.name;
        match chosen.get(name) {
            None => {
                chosen.insert(name.clone(), profile);
            }
            Some(first) => {
                let (keep, ignore) = if *profile.meta.namespace == *default_namespace {
                    (profile, *first)
                } else {
                    (*first, profile)
                };
                tracing::debug!(
                    profile = %name,
                    using = %keep.meta.namespace,
                    ignoring = %ignore.meta.namespace,
                    "ServiceProfiles with the same name in two namespaces"
                );
                chosen.insert(name.clone(), keep);
            }
        }
    }
    chosen
        .into_iter()
        .map(|(name, p)| (name, p.table.clone()))
        .collect()
}

/// References between authorization objects that lead nowhere, reported against the object
/// that holds them (its file, name and field).
fn reference_warnings(
    objects: &BTreeMap<ObjectKey, Arc<MeshObject>>,
    sources: &BTreeMap<ObjectKey, PathBuf>,
) -> Vec<ConfigError> {
    let exists = |kind: ObjectKind, namespace: &Arc<str>, name: &Arc<str>| {
        objects.contains_key(&ObjectKey {
            kind,
            namespace: namespace.clone(),
            name: name.clone(),
        })
    };
    let mut warnings = Vec::new();
    for (key, object) in objects {
        let MeshObject::AuthorizationPolicy(policy) = &**object else {
            continue;
        };
        let mut warn = |field: String, message: String| {
            warnings.push(ConfigError {
                file: sources.get(key).cloned().unwrap_or_default(),
                object: key.to_string(),
                field,
                message,
            })
        };
        let ns = &policy.meta.namespace;
        if let PolicyTarget::Server(server) = &policy.target {
            if !exists(ObjectKind::Server, ns, server) {
                warn(
                    "spec.targetRef.name".to_string(),
                    format!("there is no Server {ns}/{server}; this policy applies to nothing"),
                );
            }
        }
        for (i, r) in policy.required_authentications.iter().enumerate() {
            let kind = match r.kind {
                AuthenticationKind::MeshTls => ObjectKind::MeshTlsAuthentication,
                AuthenticationKind::Network => ObjectKind::NetworkAuthentication,
                // Service accounts are not mesh objects; their identity needs no lookup.
                AuthenticationKind::ServiceAccount => continue,
            };
            if !exists(kind, &r.namespace, &r.name) {
                warn(
                    format!("spec.requiredAuthenticationRefs[{i}].name"),
                    format!(
                        "there is no {kind} {}/{}; the policy authorizes no client until it \
                         exists",
                        r.namespace, r.name
                    ),
                );
            }
        }
    }
    warnings
}

/// Endpoints of one service port across all of the service's slices, following kube-proxy:
/// the slice port with the same name (and protocol) gives the endpoint port, falling back
/// to a numeric `targetPort`; ready endpoints are used, or, when none is ready, the serving
/// terminating ones.
fn endpoints_for_port(svc_port: &ServicePort, slices: &[&EndpointSlice]) -> Vec<Endpoint> {
    let mut ready = Vec::new();
    let mut terminating = Vec::new();
    for slice in slices {
        if slice.address_type == AddressType::Fqdn {
            continue;
        }
        let slice_port = slice
            .ports
            .iter()
            .find(|p| p.name == svc_port.name && p.protocol == svc_port.protocol)
            .and_then(|p| p.port);
        let fallback = match svc_port.target_port {
            TargetPort::Number(n) => Some(n),
            // A named port can only be resolved through the slice.
            TargetPort::Name(_) => None,
        };
        let Some(port) = slice_port.or(fallback) else {
            continue;
        };
        for e in &slice.endpoints {
            let Some(ip) = e.address else {
                continue;
            };
            let endpoint = Endpoint {
                addr: SocketAddr::new(ip, port),
                pod: e.pod.clone(),
                zone: e.zone.clone(),
                identity: slice.identity.clone(),
            };
            if e.ready {
                ready.push(endpoint);
            } else if e.serving && e.terminating {
                terminating.push(endpoint);
            }
        }
    }
    let mut endpoints = if ready.is_empty() { terminating } else { ready };
    endpoints.sort();
    endpoints.dedup_by(|a, b| a.addr == b.addr);
    endpoints
}

#[cfg(test)]
mod tests {
    use crate::test_support::{addrs, endpoint, load, web_slice, WEB_SERVICE};
    use crate::StoreConfig;

    fn shop_cfg() -> StoreConfig {
        StoreConfig {
            default_namespace: "shop".into(),
            ..StoreConfig::default()
        }
    }

    #[test]
    fn splits_are_found_by_apex_and_the_first_by_name_wins() {
        let split = |name: &str, backend: &str| {
            format!(
                "apiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  service: web\n  backends:\n  - {{service: web, weight: 90}}\n  - {{service: {backend}, weight: 10}}\n"
            )
        };
        let (_dir, store) = load(
            &[
                ("svc.yaml", WEB_SERVICE),
                ("a.yaml", &split("a-split", "web-v2")),
                ("b.yaml", &split("b-split", "web-v3")),
            ],
            shop_cfg(),
        );
        let snap = store.snapshot();
        let apex = crate::ServiceRef {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let found = snap.split_for(&apex).expect("split");
        assert_eq!(&*found.meta.name, "a-split");
        assert_eq!(&*found.backends[1].service, "web-v2");
        assert_eq!(found.total_weight_milli(), 100_000);
        let other = crate::ServiceRef {
            namespace: "default".into(),
            name: "web".into(),
        };
        assert!(snap.split_for(&other).is_none(), "splits are per namespace");
    }

    #[test]
    fn all_name_forms_resolve_case_insensitively() {
        let slice = web_slice("web-a", &endpoint("10.0.0.1", "web-1"));
        let (_dir, store) = load(
            &[("web.yaml", WEB_SERVICE), ("slice.yaml", &slice)],
            shop_cfg(),
        );
        let snap = store.snapshot();
        for host in [
            "web",
            "web.shop",
            "web.shop.svc",
            "web.shop.svc.cluster.local",
            "web.shop.svc.cluster.local.",
            "WEB.Shop.SVC.Cluster.Local.",
            "Web.",
        ] {
            let resolved = snap
                .resolve_name(host, 80)
                .unwrap_or_else(|| panic!("{host} should resolve"));
            assert_eq!(&*resolved.service.name, "web");
            assert_eq!(&*resolved.service.namespace, "shop");
            assert_eq!(resolved.port, 80);
            assert_eq!(&*resolved.authority, "web.shop.svc.cluster.local:80");
            assert_eq!(addrs(&resolved), ["10.0.0.1:8080"]);
        }
        for host in [
            "web.other",
            "web.shop.svc.example.org",
            "web.shop.svc.cluster",
            "web.shop.pod.cluster.local",
            "api",
            "",
            ".",
        ] {
            assert_eq!(snap.resolve_name(host, 80), None, "{host}");
        }
        // A port the service does not have.
        assert_eq!(snap.resolve_name("web", 8080), None);
    }

    #[test]
    fn default_namespace_and_cluster_domain_are_configurable() {
        let cfg = StoreConfig {
            default_namespace: "default".into(),
            cluster_domain: "Corp.Example.".into(),
        };
        let (_dir, store) = load(&[("web.yaml", WEB_SERVICE)], cfg);
        let snap = store.snapshot();
        // Bare names use the Store's default namespace, and web lives in shop.
        assert_eq!(snap.resolve_name("web", 80), None);
        let resolved = snap
            .resolve_name("web.shop.svc.corp.example", 80)
            .expect("custom domain");
        assert_eq!(&*resolved.authority, "web.shop.svc.corp.example:80");
        assert_eq!(snap.resolve_name("web.shop.svc.cluster.local", 80), None);
        assert_eq!(
            resolved.service.fqdn("corp.example"),
            "web.shop.svc.corp.example"
        );
    }

    #[test]
    fn service_ports_map_to_slice_ports_by_name() {
        let slice = web_slice("web-a", &endpoint("10.0.0.1", "web-1"));
        let unnamed = "\
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec:
  ports: [{port: 5000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: plain-a
  namespace: shop
  labels: {kubernetes.io/service-name: plain}
addressType: IPv4
ports: [{port: 5555}]
endpoints: [{addresses: [10.0.1.1]}]
";
        let (_dir, store) = load(
            &[
                ("web.yaml", WEB_SERVICE),
                ("slice.yaml", &slice),
                ("plain.yaml", unnamed),
            ],
            shop_cfg(),
        );
        let snap = store.snapshot();
        // Named targetPort, resolved through the slice's port of the same name.
        assert_eq!(
            addrs(&snap.resolve_name("web", 80).expect("80")),
            ["10.0.0.1:8080"]
        );
        // No slice port named "admin": the numeric targetPort is used.
        assert_eq!(
            addrs(&snap.resolve_name("web", 9000).expect("9000")),
            ["10.0.0.1:9990"]
        );
        // Named targetPort with no matching slice port: the port exists, no endpoints.
        let metrics = snap.resolve_name("web", 9100).expect("9100");
        assert!(metrics.endpoints.is_empty());
        // Unnamed matches unnamed.
        assert_eq!(
            addrs(&snap.resolve_name("plain", 5000).expect("5000")),
            ["10.0.1.1:5555"]
        );
    }

    #[test]
    fn only_ready_endpoints_are_used_and_nil_means_ready() {
        let endpoints = "\
- addresses: [10.0.0.1]
- addresses: [10.0.0.2]
  conditions: {ready: true}
- addresses: [10.0.0.3]
  conditions: {ready: false}
- addresses: [10.0.0.4]
  conditions: {ready: false, serving: true, terminating: true}
";
        let slice = web_slice("web-a", endpoints);
        let (_dir, store) = load(
            &[("web.yaml", WEB_SERVICE), ("slice.yaml", &slice)],
            shop_cfg(),
        );
        let resolved = store.snapshot().resolve_name("web", 80).expect("web");
        assert_eq!(addrs(&resolved), ["10.0.0.1:8080", "10.0.0.2:8080"]);
    }

    #[test]
    fn serving_terminating_endpoints_are_used_when_none_is_ready() {
        let endpoints = "\
- addresses: [10.0.0.3]
  conditions: {ready: false}
- addresses: [10.0.0.4]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.0.0.5]
  conditions: {ready: false, serving: false, terminating: true}
";
        let slice = web_slice("web-a", endpoints);
        let (_dir, store) = load(
            &[("web.yaml", WEB_SERVICE), ("slice.yaml", &slice)],
            shop_cfg(),
        );
        let resolved = store.snapshot().resolve_name("web", 80).expect("web");
        assert_eq!(addrs(&resolved), ["10.0.0.4:8080"]);
    }

    #[test]
    fn slices_merge_sorted_and_deduplicated() {
        let a = web_slice(
            "web-a",
            &(endpoint("10.0.0.9", "web-9") + &endpoint("10.0.0.2", "web-2")),
        );
        let b = web_slice(
            "web-b",
            &(endpoint("10.0.0.2", "web-2") + &endpoint("10.0.0.10", "web-10")),
        );
        let (_dir, store) = load(
            &[("web.yaml", WEB_SERVICE), ("a.yaml", &a), ("b.yml", &b)],
            shop_cfg(),
        );
        let snap = store.snapshot();
        let resolved = snap.resolve_name("web", 80).expect("web");
        assert_eq!(
            addrs(&resolved),
            ["10.0.0.2:8080", "10.0.0.9:8080", "10.0.0.10:8080"]
        );
        assert_eq!(resolved.endpoints[0].pod.as_deref(), Some("web-2"));
        assert_eq!(resolved.endpoints[0].zone.as_deref(), Some("zone-a"));
        assert!(snap.has_endpoint_slices(&resolved.service));
    }

    #[test]
    fn slices_of_other_services_and_namespaces_do_not_leak() {
        let other_ns = web_slice("web-x", &endpoint("10.0.0.7", "x"))
            .replace("namespace: shop", "namespace: other");
        let other_svc = web_slice("api-a", &endpoint("10.0.0.8", "y"))
            .replace("service-name: web", "service-name: api");
        let (_dir, store) = load(
            &[
                ("web.yaml", WEB_SERVICE),
                ("x.yaml", &other_ns),
                ("y.yaml", &other_svc),
            ],
            shop_cfg(),
        );
        let snap = store.snapshot();
        let resolved = snap.resolve_name("web", 80).expect("web");
        assert!(resolved.endpoints.is_empty());
        assert!(!snap.has_endpoint_slices(&resolved.service));
    }

    #[test]
    fn cluster_ip_maps_to_service_port() {
        let slice = web_slice("web-a", &endpoint("10.0.0.1", "web-1"));
        let headless = "\
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, ports: [{port: 5432}]}
";
        let (_dir, store) = load(
            &[
                ("web.yaml", WEB_SERVICE),
                ("slice.yaml", &slice),
                ("db.yaml", headless),
            ],
            shop_cfg(),
        );
        let snap = store.snapshot();
        let by_ip = snap
            .resolve_cluster_ip("10.96.0.10:80".parse().expect("addr"))
            .expect("cluster ip");
        assert_eq!(Some(by_ip.clone()), snap.resolve_name("web", 80));
        let mapped = snap
            .resolve_cluster_ip("[::ffff:10.96.0.10]:9000".parse().expect("addr"))
            .expect("v4-mapped");
        assert_eq!(addrs(&mapped), ["10.0.0.1:9990"]);
        assert_eq!(
            snap.resolve_cluster_ip("10.96.0.10:81".parse().expect("addr")),
            None
        );
        assert_eq!(
            snap.resolve_cluster_ip("10.96.0.11:80".parse().expect("addr")),
            None
        );
        // Headless services resolve by name only.
        assert!(snap.resolve_name("db", 5432).is_some());
    }

    const PROFILE: &str = r"apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata:
  name: web.shop.svc.cluster.local
  namespace: shop
spec:
  routes:
  - name: GET /api/users/{id}
    condition:
      method: GET
      pathRegex: /api/users/\d+
    responseClasses:
    - condition: {status: {min: 429, max: 429}}
      isFailure: true
    isRetryable: true
    timeout: 300ms
  - name: users
    condition:
      pathRegex: /api/users/.*
";

    #[test]
    fn profiles_are_found_by_fqdn() {
        let (_dir, store) = load(
            &[("web.yaml", WEB_SERVICE), ("profile.yaml", PROFILE)],
            shop_cfg(),
        );
        let snap = store.snapshot();
        assert!(snap.errors().is_empty(), "{:?}", snap.errors());
        for name in [
            "web.shop.svc.cluster.local",
            "web.shop.svc.cluster.local.",
            "Web.Shop.svc.Cluster.Local",
        ] {
            assert!(snap.route_table(name).is_some(), "{name}");
        }
        // Only the full FQDN the profile is named by; the caller canonicalizes.
        assert!(snap.route_table("web").is_none());
        assert!(snap.route_table("api.shop.svc.cluster.local").is_none());

        let table = snap
            .route_table("web.shop.svc.cluster.local")
            .expect("table");
        let r = table.route_for("GET", "/api/users/12");
        assert_eq!(&**r.name(), "GET /api/users/{id}");
        assert!(r.is_retryable());
        assert_eq!(r.timeout(), Some(std::time::Duration::from_millis(300)));
        assert!(r.classify(429, None));
        // Whole-path match: the first route does not take the sub-resource.
        assert_eq!(
            &**table.route_for("GET", "/api/users/12/orders").name(),
            "users"
        );
        assert!(table.route_for("GET", "/healthz").is_default());
        // Defaults when the profile has no retryBudget.
        assert_eq!(*table.retry_budget(), crate::RetryBudgetSpec::default());
        assert_eq!(table.retry_budget().retry_ratio, 0.2);
        assert_eq!(table.retry_budget().min_retries_per_second, 10);
        assert_eq!(table.retry_budget().ttl, std::time::Duration::from_secs(10));
    }

    #[test]
    fn invalid_profile_keeps_the_last_good_one() {
        let (dir, store) = load(&[("profile.yaml", PROFILE)], shop_cfg());
        let path = dir.path().join("profile.yaml");
        let before = store
            .snapshot()
            .route_table("web.shop.svc.cluster.local")
            .expect("table")
            .clone();

        // A new route is added, but with a broken regex: the whole new version is rejected.
        let bad = PROFILE.replace(r"/api/users/.*", r"/api/(users/.*")
            + "  - name: new
    condition: {method: POST}
";
        crate::test_support::write(dir.path(), "profile.yaml", &bad);
        store.reload();
        let snap = store.snapshot();
        assert_eq!(snap.errors().len(), 1, "{:?}", snap.errors());
        let err = &snap.errors()[0];
        assert_eq!(err.file, path);
        assert_eq!(err.object, "ServiceProfile shop/web.shop.svc.cluster.local");
        assert_eq!(err.field, "spec.routes[1].condition.pathRegex");
        assert!(err.message.contains("unclosed group"), "{err:?}");
        assert_eq!(store.config_errors_total(), 1);
        let table = snap
            .route_table("web.shop.svc.cluster.local")
            .expect("kept");
        assert!(
            std::sync::Arc::ptr_eq(table, &before),
            "last good table, not rebuilt"
        );
        assert_eq!(table.routes().len(), 2);
        assert!(table.route_for("POST", "/x").is_default());

        // Fixed: the new version is in force.
        let good = PROFILE.to_string()
            + "  - name: new
    condition: {method: POST}
";
        crate::test_support::write(dir.path(), "profile.yaml", &good);
        store.reload();
        let snap = store.snapshot();
        assert!(snap.errors().is_empty());
        let table = snap
            .route_table("web.shop.svc.cluster.local")
            .expect("table");
        assert_eq!(&**table.route_for("POST", "/x").name(), "new");
    }

    #[test]
    fn unknown_profile_fields_are_not_fatal() {
        let with_extra = PROFILE
            .replace(
                "    isRetryable: true\n",
                "    isRetryable: true\n    retryPolicy: aggressive\n",
            )
            .replace("spec:\n", "spec:\n  opaquePorts: ['3306']\n");
        assert_ne!(with_extra, PROFILE);
        let (_dir, store) = load(&[("profile.yaml", &with_extra)], shop_cfg());
        let snap = store.snapshot();
        assert!(snap.errors().is_empty(), "{:?}", snap.errors());
        assert_eq!(store.config_errors_total(), 0);
        let table = snap
            .route_table("web.shop.svc.cluster.local")
            .expect("table");
        assert_eq!(table.routes().len(), 2);
    }

    #[test]
    fn same_named_profiles_prefer_the_clients_namespace() {
        let server_side = PROFILE.to_string();
        let client_side = PROFILE
            .replace("namespace: shop", "namespace: client")
            .replace("name: users", "name: client-users");
        let cfg = StoreConfig {
            default_namespace: "client".into(),
            ..StoreConfig::default()
        };
        let (_dir, store) = load(&[("a.yaml", &server_side), ("b.yaml", &client_side)], cfg);
        let snap = store.snapshot();
        let table = snap
            .route_table("web.shop.svc.cluster.local")
            .expect("table");
        assert_eq!(
            &**table.route_for("PUT", "/api/users/1").name(),
            "client-users"
        );
        let (_dir, store) = load(
            &[("a.yaml", &server_side), ("b.yaml", &client_side)],
            shop_cfg(),
        );
        let snap = store.snapshot();
        let table = snap
            .route_table("web.shop.svc.cluster.local")
            .expect("table");
        assert_eq!(&**table.route_for("PUT", "/api/users/1").name(), "users");
    }

    #[test]
    fn annotated_slices_give_their_endpoints_an_identity() {
        let meshed = web_slice("web-a", &endpoint("10.0.0.1", "web-1")).replace(
            "  labels:\n",
            "  annotations: {pylon.io/identity: web.shop.serviceaccount.identity.pylon.cluster.local}\n  labels:\n",
        );
        let plain = web_slice("web-b", &endpoint("10.0.0.2", "web-2"));
        let (dir, store) = load(
            &[
                ("web.yaml", WEB_SERVICE),
                ("a.yaml", &meshed),
                ("b.yaml", &plain),
            ],
            shop_cfg(),
        );
        let resolved = store.snapshot().resolve_name("web", 80).expect("web");
        let ids: Vec<Option<&str>> = resolved
            .endpoints
            .iter()
            .map(|e| e.identity.as_deref())
            .collect();
        assert_eq!(
            ids,
            [
                Some("web.shop.serviceaccount.identity.pylon.cluster.local"),
                None
            ]
        );

        // Not a DNS name: the slice is rejected, naming the annotation, and the last good
        // version stays.
        crate::test_support::write(
            dir.path(),
            "a.yaml",
            &meshed.replace("web.shop.serviceaccount", "Web Shop"),
        );
        store.reload();
        let snap = store.snapshot();
        assert_eq!(snap.errors().len(), 1, "{:?}", snap.errors());
        let err = &snap.errors()[0];
        assert_eq!(err.object, "EndpointSlice shop/web-a");
        assert_eq!(err.field, "metadata.annotations.pylon.io/identity");
        assert!(err.message.contains("\"Web Shop.identity"), "{err:?}");
        let resolved = snap.resolve_name("web", 80).expect("web");
        assert!(resolved.endpoints[0].identity.is_some(), "last good kept");
    }

    #[test]
    fn service_selectors_are_read() {
        let svc = WEB_SERVICE.replace("spec:\n", "spec:\n  selector: {app: web, tier: front}\n");
        let (_dir, store) = load(&[("web.yaml", &svc)], shop_cfg());
        let snap = store.snapshot();
        let web = crate::ServiceRef {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let selector = &snap.service(&web).expect("web").selector;
        assert_eq!(selector.get("tier").map(String::as_str), Some("front"));

        // Unquoted numbers are read as text; only non-scalars are refused.
        let number = WEB_SERVICE.replace("spec:\n", "spec:\n  selector: {version: 2}\n");
        let (_dir, store) = load(&[("web.yaml", &number)], shop_cfg());
        let snap = store.snapshot();
        let selector = &snap.service(&web).expect("web").selector;
        assert_eq!(selector.get("version").map(String::as_str), Some("2"));
        let bad = WEB_SERVICE.replace("spec:\n", "spec:\n  selector: {app: [web]}\n");
        let (_dir, store) = load(&[("web.yaml", &bad)], shop_cfg());
        let snap = store.snapshot();
        assert_eq!(snap.errors()[0].field, "spec.selector");
    }

    #[test]
    fn empty_store_resolves_nothing() {
        let store = crate::Store::empty(StoreConfig::default());
        let snap = store.snapshot();
        assert_eq!(snap.generation(), 0);
        assert_eq!(snap.resolve_name("web", 80), None);
        assert_eq!(
            snap.resolve_cluster_ip("10.96.0.10:80".parse().expect("addr")),
            None
        );
        assert!(snap.errors().is_empty());
    }
}
