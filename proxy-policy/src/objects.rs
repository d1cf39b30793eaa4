//! Mesh objects: the Kubernetes shapes Pylon understands, parsed and validated from
//! untyped YAML values.
//!
//! Parsing walks a [`serde_yaml_ng::Value`] by hand instead of deriving `Deserialize`, so
//! that every rejection names the exact field (`spec.ports[0].port`) and every field that
//! Kubernetes would not know about can be reported as a warning without rejecting the object.
//!
//! A new kind slots in by adding a variant to [`ObjectKind`] and [`MeshObject`], a match arm
//! in [`ObjectKind::from_type_meta`] and a `parse_*` function.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde_yaml_ng::{Mapping, Value};

pub use self::authz::{
    AuthenticationKind, AuthenticationRef, AuthorizationPolicy, IdentityRef, LabelSelector,
    LabelSelectorRequirement, MeshTlsAuthentication, Network, NetworkAuthentication, PolicyTarget,
    ProxyProtocol, SelectorOperator, Server, ServerPort,
};
pub use self::pod::{Namespace, OwnerRef, Pod, Workload, WorkloadKind, PROXY_CONTAINER_NAMES};
pub use self::profile::ServiceProfile;
pub use self::split::{SplitBackend, TrafficSplit};

mod authz;
mod pod;
mod profile;
mod split;

/// The kinds of mesh object the Store understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// `v1 Service`.
    Service,
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice,
    /// `linkerd.io/v1alpha2 ServiceProfile` (`v1alpha1` accepted too).
    ServiceProfile,
    /// SMI `split.smi-spec.io` `TrafficSplit`, `v1alpha1` to `v1alpha4`.
    TrafficSplit,
    /// `policy.linkerd.io` `Server`, `v1alpha1` to `v1beta3`: one port of the workloads a
    /// label selector picks.
    Server,
    /// `policy.linkerd.io/v1alpha1 AuthorizationPolicy`: who may reach a Server (or every
    /// Server of a namespace).
    AuthorizationPolicy,
    /// `policy.linkerd.io/v1alpha1 MeshTLSAuthentication`: a set of client identities.
    MeshTlsAuthentication,
    /// `policy.linkerd.io/v1alpha1 NetworkAuthentication`: a set of client networks.
    NetworkAuthentication,
    /// `v1 Pod`: an endpoint's workload, ServiceAccount and whether it is meshed.
    Pod,
    /// `v1 Namespace` (cluster-scoped: its key's namespace is empty).
    Namespace,
}

impl ObjectKind {
    /// Maps `apiVersion` + `kind` to a known kind; `None` means "not ours, skip it".
    pub fn from_type_meta(api_version: &str, kind: &str) -> Option<Self> {
        match (api_version, kind) {
            ("v1", "Service") => Some(Self::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Self::EndpointSlice),
            ("linkerd.io/v1alpha2" | "linkerd.io/v1alpha1", "ServiceProfile") => {
                Some(Self::ServiceProfile)
            }
            (
                "split.smi-spec.io/v1alpha1"
                | "split.smi-spec.io/v1alpha2"
                | "split.smi-spec.io/v1alpha3"
                | "split.smi-spec.io/v1alpha4",
                "TrafficSplit",
            ) => Some(Self::TrafficSplit),
            (
                "policy.linkerd.io/v1alpha1"
                | "policy.linkerd.io/v1beta1"
                | "policy.linkerd.io/v1beta2"
                | "policy.linkerd.io/v1beta3",
                "Server",
            ) => Some(Self::Server),
            ("policy.linkerd.io/v1alpha1", "AuthorizationPolicy") => {
                Some(Self::AuthorizationPolicy)
            }
            ("policy.linkerd.io/v1alpha1", "MeshTLSAuthentication") => {
                Some(Self::MeshTlsAuthentication)
            }
            ("policy.linkerd.io/v1alpha1", "NetworkAuthentication") => {
                Some(Self::NetworkAuthentication)
            }
            ("v1", "Pod") => Some(Self::Pod),
            ("v1", "Namespace") => Some(Self::Namespace),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::ServiceProfile => "ServiceProfile",
            Self::TrafficSplit => "TrafficSplit",
            Self::Server => "Server",
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::MeshTlsAuthentication => "MeshTLSAuthentication",
            Self::NetworkAuthentication => "NetworkAuthentication",
            Self::Pod => "Pod",
            Self::Namespace => "Namespace",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of an object: two versions with the same key are the same object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: ObjectKind,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl fmt::Display for ObjectKey {
    /// `"EndpointSlice default/web-abc"`, the form used in error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A validated mesh object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshObject {
    Service(Service),
    EndpointSlice(EndpointSlice),
    ServiceProfile(ServiceProfile),
    TrafficSplit(TrafficSplit),
    Server(Server),
    AuthorizationPolicy(AuthorizationPolicy),
    MeshTlsAuthentication(MeshTlsAuthentication),
    NetworkAuthentication(NetworkAuthentication),
    Pod(Pod),
    Namespace(Namespace),
}

impl MeshObject {
    pub fn key(&self) -> ObjectKey {
        let (kind, meta) = match self {
            Self::Service(s) => (ObjectKind::Service, &s.meta),
            Self::EndpointSlice(s) => (ObjectKind::EndpointSlice, &s.meta),
            Self::ServiceProfile(p) => (ObjectKind::ServiceProfile, &p.meta),
            Self::TrafficSplit(t) => (ObjectKind::TrafficSplit, &t.meta),
            Self::Server(s) => (ObjectKind::Server, &s.meta),
            Self::AuthorizationPolicy(p) => (ObjectKind::AuthorizationPolicy, &p.meta),
            Self::MeshTlsAuthentication(a) => (ObjectKind::MeshTlsAuthentication, &a.meta),
            Self::NetworkAuthentication(a) => (ObjectKind::NetworkAuthentication, &a.meta),
            Self::Pod(p) => (ObjectKind::Pod, &p.meta),
            Self::Namespace(n) => (ObjectKind::Namespace, &n.meta),
        };
        ObjectKey {
            kind,
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
        }
    }
}

/// The parts of `metadata` Pylon uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub labels: BTreeMap<String, String>,
    /// Read for Linkerd's configuration annotations (e.g. `balancer.linkerd.io/...`).
    pub annotations: BTreeMap<String, String>,
}

/// A reference to a Service, the unit clients name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceRef {
    /// `name.ns.svc.<cluster_domain>`.
    pub fn fqdn(&self, cluster_domain: &str) -> String {
        format!("{}.{}.svc.{}", self.name, self.namespace, cluster_domain)
    }

    /// The inverse of [`ServiceRef::fqdn`]: the service a `name.ns.svc.<cluster_domain>`
    /// name means (case-insensitive, optional trailing dot, like the domain), or `None` for
    /// any other name. Whether the service exists is the Snapshot's business.
    pub fn from_fqdn(fqdn: &str, cluster_domain: &str) -> Option<ServiceRef> {
        let fqdn = fqdn.strip_suffix('.').unwrap_or(fqdn);
        let cluster_domain = cluster_domain.trim_matches('.');
        let mut labels = fqdn.splitn(4, '.');
        let (name, namespace) = (labels.next()?, labels.next()?);
        let svc = labels.next()?;
        let domain = labels.next()?;
        let ok = !name.is_empty()
            && !namespace.is_empty()
            && svc.eq_ignore_ascii_case("svc")
            && domain.eq_ignore_ascii_case(cluster_domain);
        ok.then(|| ServiceRef {
            namespace: namespace.to_ascii_lowercase().into(),
            name: name.to_ascii_lowercase().into(),
        })
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Service resolved for one of its ports, as the data path needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedService {
    pub service: ServiceRef,
    /// The service port requested.
    pub port: u16,
    /// Canonical `name.ns.svc.<cluster-domain>:port`.
    pub authority: Arc<str>,
    /// Endpoints for that port, sorted by address and deduplicated.
    pub endpoints: Arc<[Endpoint]>,
}

/// One backend address of a service port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Pod name, when the slice's `targetRef` is a Pod.
    pub pod: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    /// The TLS identity the endpoint's proxy serves, from its slice's
    /// [`IDENTITY_ANNOTATION`]: `Some` means the endpoint is meshed and a client should
    /// expect (and verify) this server identity.
    pub identity: Option<Arc<str>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
}

/// `targetPort`: Kubernetes' IntOrString.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name; only resolvable through EndpointSlice ports.
    Name(Arc<str>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `""` when unnamed.
    pub name: Arc<str>,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: Protocol,
}

/// `v1 Service`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub meta: ObjectMeta,
    pub ports: Vec<ServicePort>,
    /// Allocated cluster IPs; empty for headless (`None`) services.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.selector`: the labels of the workloads behind the service (empty: none, the
    /// endpoints are managed by hand). Used to learn a workload's named ports.
    pub selector: BTreeMap<String, String>,
}

impl Service {
    pub fn service_ref(&self) -> ServiceRef {
        ServiceRef {
            namespace: self.meta.namespace.clone(),
            name: self.meta.name.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressType {
    Ipv4,
    Ipv6,
    /// Parsed but never used for routing (kube-proxy ignores FQDN slices too).
    Fqdn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPort {
    /// `""` when unnamed.
    pub name: Arc<str>,
    /// `None` means "unspecified", which no service port can use.
    pub port: Option<u16>,
    pub protocol: Protocol,
}

/// One `endpoints[]` entry with its conditions already defaulted per Kubernetes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Only the first address of `addresses[]`: Kubernetes defines no meaning for the rest,
    /// and kube-proxy ignores them.
    pub address: Option<IpAddr>,
    /// `conditions.ready`; nil means ready.
    pub ready: bool,
    /// `conditions.serving`; nil defers to `ready`.
    pub serving: bool,
    /// `conditions.terminating`; nil means false.
    pub terminating: bool,
    pub pod: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
}

/// `discovery.k8s.io/v1 EndpointSlice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub meta: ObjectMeta,
    /// From the `kubernetes.io/service-name` label; the Service is in the same namespace.
    pub service_name: Option<Arc<str>>,
    pub address_type: AddressType,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<SliceEndpoint>,
    /// From the [`IDENTITY_ANNOTATION`]: every endpoint of the slice is meshed and serves
    /// this TLS identity.
    pub identity: Option<Arc<str>>,
}

impl EndpointSlice {
    pub fn service_ref(&self) -> Option<ServiceRef> {
        self.service_name.as_ref().map(|name| ServiceRef {
            namespace: self.meta.namespace.clone(),
            name: name.clone(),
        })
    }
}

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// EndpointSlice annotation naming the TLS identity its endpoints' proxies serve
/// (`web.shop.serviceaccount.identity.pylon.cluster.local`). Pylon's discovery has no
/// destination controller to tell it which endpoints are meshed, so the slice says so.
pub const IDENTITY_ANNOTATION: &str = "pylon.io/identity";

// ===== parsing =====

/// Why a field was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The outcome of parsing one YAML document.
#[derive(Debug)]
pub enum ParsedDocument {
    /// An empty document (`---` with nothing after it).
    Empty,
    /// A kind Pylon does not handle.
    Skipped { api_version: String, kind: String },
    Valid {
        object: MeshObject,
        /// Field paths Kubernetes would not know; reported, not fatal.
        unknown_fields: Vec<String>,
    },
    Invalid {
        /// Known when the identity could be read, so the last good version can be kept.
        key: Option<ObjectKey>,
        kind: Option<ObjectKind>,
        error: FieldError,
    },
}

/// A `v1 Pod` document as Pylon reads it (`None` when it is not a valid Pod): what the
/// injector uses to name a pod's workload the way the controller does.
pub fn parse_pod(doc: &Value) -> Option<MeshObject> {
    match parse_document(doc, "default") {
        ParsedDocument::Valid {
            object: object @ MeshObject::Pod(_),
            ..
        } => Some(object),
        _ => None,
    }
}

/// Parses one document with the given namespace default.
pub fn parse_document(doc: &Value, default_namespace: &str) -> ParsedDocument {
    if doc.is_null() {
        return ParsedDocument::Empty;
    }
    let Some(root) = doc.as_mapping() else {
        return ParsedDocument::Invalid {
            key: None,
            kind: None,
            error: FieldError::new("(document)", "must be a mapping with apiVersion and kind"),
        };
    };
    let type_meta = (|| {
        let api_version = req_str(root, "", "apiVersion")?;
        let kind = req_str(root, "", "kind")?;
        Ok::<_, FieldError>((api_version, kind))
    })();
    let (api_version, kind_name) = match type_meta {
        Ok(t) => t,
        Err(error) => {
            return ParsedDocument::Invalid {
                key: None,
                kind: None,
                error,
            }
        }
    };
    let Some(kind) = ObjectKind::from_type_meta(api_version, kind_name) else {
        return ParsedDocument::Skipped {
            api_version: api_version.to_string(),
            kind: kind_name.to_string(),
        };
    };

    let mut unknown = Vec::new();
    let meta = match parse_meta(root, kind, default_namespace, &mut unknown) {
        Ok(meta) => meta,
        Err(error) => {
            return ParsedDocument::Invalid {
                key: identity_hint(root, kind, default_namespace),
                kind: Some(kind),
                error,
            }
        }
    };
    let key = ObjectKey {
        kind,
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
    };
    let parsed = match kind {
        ObjectKind::Service => parse_service(root, meta, &mut unknown).map(MeshObject::Service),
        ObjectKind::EndpointSlice => {
            parse_endpoint_slice(root, meta, &mut unknown).map(MeshObject::EndpointSlice)
        }
        ObjectKind::ServiceProfile => {
            profile::parse_service_profile(root, meta, &mut unknown).map(MeshObject::ServiceProfile)
        }
        ObjectKind::TrafficSplit => {
            split::parse_traffic_split(root, meta, &mut unknown).map(MeshObject::TrafficSplit)
        }
        ObjectKind::Server => authz::parse_server(root, meta, &mut unknown).map(MeshObject::Server),
        ObjectKind::AuthorizationPolicy => {
            authz::parse_authorization_policy(root, meta, &mut unknown)
                .map(MeshObject::AuthorizationPolicy)
        }
        ObjectKind::MeshTlsAuthentication => {
            authz::parse_meshtls_authentication(root, meta, &mut unknown)
                .map(MeshObject::MeshTlsAuthentication)
        }
        ObjectKind::NetworkAuthentication => {
            authz::parse_network_authentication(root, meta, &mut unknown)
                .map(MeshObject::NetworkAuthentication)
        }
        ObjectKind::Pod => pod::parse_pod(root, meta).map(MeshObject::Pod),
        ObjectKind::Namespace => Ok(MeshObject::Namespace(pod::parse_namespace(meta))),
    };
    match parsed {
        Ok(object) => ParsedDocument::Valid {
            object,
            unknown_fields: unknown,
        },
        Err(error) => ParsedDocument::Invalid {
            key: Some(key),
            kind: Some(kind),
            error,
        },
    }
}

/// Best-effort identity of an object whose metadata is itself invalid (e.g. a bad
/// namespace), so the error message can still name it.
fn identity_hint(root: &Mapping, kind: ObjectKind, default_namespace: &str) -> Option<ObjectKey> {
    let meta = get(root, "metadata")?.as_mapping()?;
    let name = get(meta, "name")?.as_str()?;
    let namespace = match get(meta, "namespace") {
        None => default_namespace,
        Some(v) => v.as_str()?,
    };
    Some(ObjectKey {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    })
}

const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "generateName",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "ownerReferences",
    "finalizers",
    "managedFields",
    "selfLink",
];

fn parse_meta(
    root: &Mapping,
    kind: ObjectKind,
    default_namespace: &str,
    unknown: &mut Vec<String>,
) -> Result<ObjectMeta, FieldError> {
    let meta = req_mapping(root, "", "metadata")?;
    note_unknown(meta, "metadata", OBJECT_META_FIELDS, unknown);
    let name = req_str(meta, "metadata", "name")?;
    let name_ok = match kind {
        // Service names become DNS labels (`name.ns.svc...`).
        ObjectKind::Service => is_dns1035_label(name),
        // Slices, and profiles, which are named by the service's FQDN.
        ObjectKind::EndpointSlice
        | ObjectKind::ServiceProfile
        | ObjectKind::TrafficSplit
        | ObjectKind::Server
        | ObjectKind::AuthorizationPolicy
        | ObjectKind::MeshTlsAuthentication
        | ObjectKind::NetworkAuthentication
        | ObjectKind::Pod => is_dns1123_subdomain(name),
        ObjectKind::Namespace => is_dns1123_label(name),
    };
    if !name_ok {
        return Err(FieldError::new(
            "metadata.name",
            format!("invalid name {name:?}: must be lowercase alphanumerics and '-'"),
        ));
    }
    let namespace = match kind {
        // Cluster-scoped.
        ObjectKind::Namespace => "",
        _ => opt_str(meta, "metadata", "namespace")?.unwrap_or(default_namespace),
    };
    if kind != ObjectKind::Namespace && !is_dns1123_label(namespace) {
        return Err(FieldError::new(
            "metadata.namespace",
            format!("invalid namespace {namespace:?}: must be a DNS label"),
        ));
    }
    Ok(ObjectMeta {
        name: name.into(),
        namespace: namespace.into(),
        labels: string_map(meta, "labels")?,
        annotations: string_map(meta, "annotations")?,
    })
}

/// `metadata.labels` / `metadata.annotations`: string keys to string values.
fn string_map(meta: &Mapping, key: &str) -> Result<BTreeMap<String, String>, FieldError> {
    let mut out = BTreeMap::new();
    if let Some(map) = opt_mapping(meta, "metadata", key)? {
        for (k, v) in map {
            let Some(k) = k.as_str() else {
                return Err(FieldError::new(
                    format!("metadata.{key}"),
                    "keys must be strings",
                ));
            };
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                _ => {
                    return Err(FieldError::new(
                        format!("metadata.{key}.{k}"),
                        "values must be strings",
                    ))
                }
            };
            out.insert(k.to_string(), v);
        }
    }
    Ok(out)
}

/// A mapping of strings to strings (`matchLabels`); Kubernetes has no null or numeric label
/// values, so neither is accepted.
fn string_values(map: &Mapping, path: &str) -> Result<BTreeMap<String, String>, FieldError> {
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let Some(k) = k.as_str() else {
            return Err(FieldError::new(path, "keys must be strings"));
        };
        let Some(v) = v.as_str() else {
            return Err(FieldError::new(
                join(path, k),
                format!("must be a string, found {}", type_name(v)),
            ));
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

const SERVICE_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];
const SERVICE_SPEC_FIELDS: &[&str] = &[
    "ports",
    "clusterIP",
    "clusterIPs",
    "type",
    "selector",
    "sessionAffinity",
    "sessionAffinityConfig",
    "ipFamilies",
    "ipFamilyPolicy",
    "externalName",
    "externalIPs",
    "externalTrafficPolicy",
    "internalTrafficPolicy",
    "publishNotReadyAddresses",
    "loadBalancerIP",
    "loadBalancerClass",
    "loadBalancerSourceRanges",
    "allocateLoadBalancerNodePorts",
    "healthCheckNodePort",
    "trafficDistribution",
];
const SERVICE_PORT_FIELDS: &[&str] = &[
    "name",
    "port",
    "targetPort",
    "protocol",
    "nodePort",
    "appProtocol",
];

fn parse_service(
    root: &Mapping,
    meta: ObjectMeta,
    unknown: &mut Vec<String>,
) -> Result<Service, FieldError> {
    note_unknown(root, "", SERVICE_FIELDS, unknown);
    let empty = Mapping::new();
    let spec = opt_mapping(root, "", "spec")?.unwrap_or(&empty);
    note_unknown(spec, "spec", SERVICE_SPEC_FIELDS, unknown);

    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, item) in opt_seq(spec, "spec", "ports")?.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        let p = as_mapping(item, &path)?;
        note_unknown(p, &path, SERVICE_PORT_FIELDS, unknown);
        let name = opt_str(p, &path, "name")?.unwrap_or("");
        if !name.is_empty() && !is_dns1123_label(name) {
            return Err(FieldError::new(
                join(&path, "name"),
                format!("invalid port name {name:?}: must be a DNS label"),
            ));
        }
        let port = port_number(
            get(p, "port").ok_or_else(|| FieldError::new(join(&path, "port"), "is required"))?,
            &join(&path, "port"),
        )?;
        let target_port = match get(p, "targetPort") {
            None => TargetPort::Number(port),
            Some(Value::String(s)) => {
                if !is_iana_svc_name(s) {
                    return Err(FieldError::new(
                        join(&path, "targetPort"),
                        format!(
                            "invalid port name {s:?}: must be a number or a name of at most 15 \
                             lowercase alphanumerics and '-', with at least one letter"
                        ),
                    ));
                }
                TargetPort::Name(s.as_str().into())
            }
            Some(v) => TargetPort::Number(port_number(v, &join(&path, "targetPort"))?),
        };
        let protocol = protocol(p, &path)?;
        for (j, other) in ports.iter().enumerate() {
            if other.name.as_ref() == name {
                return Err(FieldError::new(
                    join(&path, "name"),
                    format!("duplicate port name {name:?} (also spec.ports[{j}])"),
                ));
            }
            if other.port == port && other.protocol == protocol {
                return Err(FieldError::new(
                    join(&path, "port"),
                    format!("duplicate port {port} (also spec.ports[{j}])"),
                ));
            }
        }
        ports.push(ServicePort {
            name: name.into(),
            port,
            target_port,
            protocol,
        });
    }

    // `clusterIP` is `clusterIPs[0]` when both are set; take the union so either form works.
    let mut cluster_ips = Vec::new();
    let mut add_ip = |raw: &str, field: String| -> Result<(), FieldError> {
        // "None" is headless; "" means "not yet allocated". Neither routes.
        if raw.is_empty() || raw == "None" {
            return Ok(());
        }
        let ip: IpAddr = raw
            .parse()
            .map_err(|_| FieldError::new(field, format!("invalid IP address {raw:?}")))?;
        if !cluster_ips.contains(&ip) {
            cluster_ips.push(ip);
        }
        Ok(())
    };
    if let Some(ip) = opt_str(spec, "spec", "clusterIP")? {
        add_ip(ip, "spec.clusterIP".into())?;
    }
    for (i, v) in opt_seq(spec, "spec", "clusterIPs")?.iter().enumerate() {
        let field = format!("spec.clusterIPs[{i}]");
        let s = v
            .as_str()
            .ok_or_else(|| FieldError::new(field.clone(), "must be a string"))?;
        add_ip(s, field)?;
    }

    // Only used to learn workloads' port names, so an unquoted number or boolean (which the
    // API server would refuse) is read as its text rather than rejecting a working Service.
    let mut selector = BTreeMap::new();
    if let Some(map) = opt_mapping(spec, "spec", "selector")? {
        for (k, v) in map {
            let (Some(k), Value::String(_) | Value::Number(_) | Value::Bool(_)) = (k.as_str(), v)
            else {
                return Err(FieldError::new(
                    "spec.selector",
                    "must map label names to label values",
                ));
            };
            let v = match v {
                Value::String(s) => s.clone(),
                other => display_scalar(other),
            };
            selector.insert(k.to_string(), v);
        }
    }

    Ok(Service {
        meta,
        ports,
        cluster_ips,
        selector,
    })
}

const SLICE_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "addressType",
    "endpoints",
    "ports",
];
const SLICE_PORT_FIELDS: &[&str] = &["name", "port", "protocol", "appProtocol"];
const SLICE_ENDPOINT_FIELDS: &[&str] = &[
    "addresses",
    "conditions",
    "hostname",
    "targetRef",
    "nodeName",
    "zone",
    "hints",
    "deprecatedTopology",
];
const CONDITION_FIELDS: &[&str] = &["ready", "serving", "terminating"];
const OBJECT_REFERENCE_FIELDS: &[&str] = &[
    "kind",
    "name",
    "namespace",
    "uid",
    "apiVersion",
    "resourceVersion",
    "fieldPath",
];

fn parse_endpoint_slice(
    root: &Mapping,
    meta: ObjectMeta,
    unknown: &mut Vec<String>,
) -> Result<EndpointSlice, FieldError> {
    note_unknown(root, "", SLICE_FIELDS, unknown);
    let address_type = match req_str(root, "", "addressType")? {
        "IPv4" => AddressType::Ipv4,
        "IPv6" => AddressType::Ipv6,
        "FQDN" => AddressType::Fqdn,
        other => {
            return Err(FieldError::new(
                "addressType",
                format!("unsupported address type {other:?}: expected IPv4, IPv6 or FQDN"),
            ))
        }
    };

    let mut ports = Vec::new();
    for (i, item) in opt_seq(root, "", "ports")?.iter().enumerate() {
        let path = format!("ports[{i}]");
        let p = as_mapping(item, &path)?;
        note_unknown(p, &path, SLICE_PORT_FIELDS, unknown);
        let name = opt_str(p, &path, "name")?.unwrap_or("");
        if !name.is_empty() && !is_dns1123_label(name) {
            return Err(FieldError::new(
                join(&path, "name"),
                format!("invalid port name {name:?}: must be a DNS label"),
            ));
        }
        let port = match get(p, "port") {
            None => None,
            Some(v) => Some(port_number(v, &join(&path, "port"))?),
        };
        ports.push(EndpointPort {
            name: name.into(),
            port,
            protocol: protocol(p, &path)?,
        });
    }

    let mut endpoints = Vec::new();
    for (i, item) in opt_seq(root, "", "endpoints")?.iter().enumerate() {
        let path = format!("endpoints[{i}]");
        let e = as_mapping(item, &path)?;
        note_unknown(e, &path, SLICE_ENDPOINT_FIELDS, unknown);

        let addresses = opt_seq(e, &path, "addresses")?;
        if addresses.is_empty() {
            return Err(FieldError::new(
                join(&path, "addresses"),
                "must contain at least one address",
            ));
        }
        let mut first = None;
        for (j, a) in addresses.iter().enumerate() {
            let field = format!("{path}.addresses[{j}]");
            let raw = a
                .as_str()
                .ok_or_else(|| FieldError::new(field.clone(), "must be a string"))?;
            let ip = match address_type {
                AddressType::Fqdn => None,
                AddressType::Ipv4 => match raw.parse::<IpAddr>() {
                    Ok(ip @ IpAddr::V4(_)) => Some(ip),
                    _ => {
                        return Err(FieldError::new(
                            field,
                            format!("invalid IPv4 address {raw:?}"),
                        ))
                    }
                },
                AddressType::Ipv6 => match raw.parse::<IpAddr>() {
                    Ok(ip @ IpAddr::V6(_)) => Some(ip),
                    _ => {
                        return Err(FieldError::new(
                            field,
                            format!("invalid IPv6 address {raw:?}"),
                        ))
                    }
                },
            };
            if j == 0 {
                first = ip;
            }
        }

        let cond_path = join(&path, "conditions");
        let (ready, serving, terminating) = match opt_mapping(e, &path, "conditions")? {
            None => (None, None, None),
            Some(c) => {
                note_unknown(c, &cond_path, CONDITION_FIELDS, unknown);
                (
                    opt_bool(c, &cond_path, "ready")?,
                    opt_bool(c, &cond_path, "serving")?,
                    opt_bool(c, &cond_path, "terminating")?,
                )
            }
        };
        // Kubernetes: nil ready is "unknown, treat as ready"; nil serving defers to ready;
        // nil terminating is false.
        let ready = ready.unwrap_or(true);
        let serving = serving.unwrap_or(ready);
        let terminating = terminating.unwrap_or(false);

        let pod = match opt_mapping(e, &path, "targetRef")? {
            None => None,
            Some(r) => {
                let ref_path = join(&path, "targetRef");
                note_unknown(r, &ref_path, OBJECT_REFERENCE_FIELDS, unknown);
                let kind = opt_str(r, &ref_path, "kind")?;
                let name = opt_str(r, &ref_path, "name")?;
                opt_str(r, &ref_path, "namespace")?;
                match (kind, name) {
                    (Some("Pod"), Some(name)) => Some(Arc::from(name)),
                    _ => None,
                }
            }
        };
        opt_str(e, &path, "nodeName")?;
        opt_str(e, &path, "hostname")?;
        let zone = opt_str(e, &path, "zone")?.map(Arc::from);

        endpoints.push(SliceEndpoint {
            address: first,
            ready,
            serving,
            terminating,
            pod,
            zone,
        });
    }

    let service_name = meta
        .labels
        .get(SERVICE_NAME_LABEL)
        .filter(|s| !s.is_empty())
        .map(|s| Arc::from(s.as_str()));
    let identity = match meta.annotations.get(IDENTITY_ANNOTATION) {
        None => None,
        Some(id) if is_dns1123_subdomain(id) => Some(Arc::from(id.as_str())),
        Some(id) => {
            return Err(FieldError::new(
                format!("metadata.annotations.{IDENTITY_ANNOTATION}"),
                format!(
                    "invalid identity {id:?}: must be a lowercase DNS name such as \
                     web.shop.serviceaccount.identity.pylon.cluster.local"
                ),
            ))
        }
    };
    Ok(EndpointSlice {
        meta,
        service_name,
        address_type,
        ports,
        endpoints,
        identity,
    })
}

// ===== Value helpers: each returns a FieldError naming the full field path =====

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A field set to `null` is the same as an absent field, as in Kubernetes.
fn get<'v>(map: &'v Mapping, key: &str) -> Option<&'v Value> {
    map.get(key).filter(|v| !v.is_null())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn as_mapping<'v>(v: &'v Value, path: &str) -> Result<&'v Mapping, FieldError> {
    v.as_mapping()
        .ok_or_else(|| FieldError::new(path, format!("must be a mapping, found {}", type_name(v))))
}

fn req_mapping<'v>(map: &'v Mapping, path: &str, key: &str) -> Result<&'v Mapping, FieldError> {
    opt_mapping(map, path, key)?.ok_or_else(|| FieldError::new(join(path, key), "is required"))
}

fn opt_mapping<'v>(
    map: &'v Mapping,
    path: &str,
    key: &str,
) -> Result<Option<&'v Mapping>, FieldError> {
    get(map, key)
        .map(|v| as_mapping(v, &join(path, key)))
        .transpose()
}

fn opt_seq<'v>(map: &'v Mapping, path: &str, key: &str) -> Result<&'v [Value], FieldError> {
    match get(map, key) {
        None => Ok(&[]),
        Some(Value::Sequence(s)) => Ok(s),
        Some(v) => Err(FieldError::new(
            join(path, key),
            format!("must be a list, found {}", type_name(v)),
        )),
    }
}

fn opt_str<'v>(map: &'v Mapping, path: &str, key: &str) -> Result<Option<&'v str>, FieldError> {
    match get(map, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(FieldError::new(
            join(path, key),
            format!("must be a string, found {}", type_name(v)),
        )),
    }
}

fn req_str<'v>(map: &'v Mapping, path: &str, key: &str) -> Result<&'v str, FieldError> {
    match opt_str(map, path, key)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(FieldError::new(join(path, key), "is required")),
    }
}

fn opt_bool(map: &Mapping, path: &str, key: &str) -> Result<Option<bool>, FieldError> {
    match get(map, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(FieldError::new(
            join(path, key),
            format!("must be true or false, found {}", type_name(v)),
        )),
    }
}

fn port_number(v: &Value, field: &str) -> Result<u16, FieldError> {
    let out_of_range = || {
        FieldError::new(
            field,
            format!(
                "invalid port {}: must be an integer from 1 to 65535",
                display_scalar(v)
            ),
        )
    };
    let n = match v {
        Value::Number(n) => n.as_u64().ok_or_else(out_of_range)?,
        _ => return Err(out_of_range()),
    };
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(out_of_range()),
    }
}

fn display_scalar(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Bool(b) => b.to_string(),
        other => type_name(other).to_string(),
    }
}

fn protocol(map: &Mapping, path: &str) -> Result<Protocol, FieldError> {
    match opt_str(map, path, "protocol")? {
        None => Ok(Protocol::Tcp),
        Some(s) => Protocol::parse(s).ok_or_else(|| {
            FieldError::new(
                join(path, "protocol"),
                format!("unsupported protocol {s:?}: expected TCP, UDP or SCTP"),
            )
        }),
    }
}

fn note_unknown(map: &Mapping, path: &str, known: &[&str], unknown: &mut Vec<String>) {
    for k in map.keys() {
        match k.as_str() {
            Some(k) if known.contains(&k) => {}
            Some(k) => unknown.push(join(path, k)),
            None => unknown.push(join(path, &format!("{k:?}"))),
        }
    }
}

// ===== Kubernetes name rules =====

/// DNS-1123 label: lowercase alphanumerics and '-', alphanumeric at both ends, ≤ 63.
fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// DNS-1035 label: a DNS-1123 label that starts with a letter (Service names).
fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// DNS-1123 subdomain: dot-separated labels, ≤ 253 (object names, identity names).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// IANA service name, the rule for named `targetPort`s: ≤ 15 chars, lowercase
/// alphanumerics and '-', at least one letter, no leading, trailing or double '-'.
fn is_iana_svc_name(s: &str) -> bool {
    s.len() <= 15
        && is_dns1123_label(s)
        && !s.contains("--")
        && s.bytes().any(|c| c.is_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> ParsedDocument {
        let v: Value = serde_yaml_ng::from_str(yaml).expect("test yaml");
        parse_document(&v, "default")
    }

    fn invalid(yaml: &str) -> (Option<ObjectKey>, FieldError) {
        match parse(yaml) {
            ParsedDocument::Invalid { key, error, .. } => (key, error),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn service_defaults() {
        let ParsedDocument::Valid { object, unknown_fields } = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
             spec: {clusterIP: 10.0.0.1, ports: [{port: 80}, {name: admin, port: 9000, targetPort: admin-http, protocol: TCP}]}",
        ) else {
            panic!("expected valid");
        };
        assert!(unknown_fields.is_empty());
        let MeshObject::Service(svc) = object else {
            panic!("expected a Service")
        };
        assert_eq!(&*svc.meta.namespace, "default");
        assert_eq!(svc.cluster_ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(svc.ports[0].target_port, TargetPort::Number(80));
        assert_eq!(svc.ports[0].protocol, Protocol::Tcp);
        assert_eq!(&*svc.ports[0].name, "");
        assert_eq!(
            svc.ports[1].target_port,
            TargetPort::Name("admin-http".into())
        );
    }

    #[test]
    fn headless_service_has_no_cluster_ip() {
        let ParsedDocument::Valid {
            object: MeshObject::Service(svc),
            ..
        } = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: data}\n\
             spec: {clusterIP: None, clusterIPs: [None], ports: [{port: 5432}]}",
        )
        else {
            panic!("expected a valid Service");
        };
        assert!(svc.cluster_ips.is_empty());
        assert_eq!(&*svc.meta.namespace, "data");
    }

    #[test]
    fn bad_ports_name_the_field() {
        for (port, shown) in [
            ("0", "0"),
            ("65536", "65536"),
            ("-1", "-1"),
            ("'80'", "\"80\""),
        ] {
            let (key, err) = invalid(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n\
                 spec: {{ports: [{{port: 80}}, {{name: b, port: {port}}}]}}"
            ));
            assert_eq!(
                key.map(|k| k.to_string()).as_deref(),
                Some("Service default/web")
            );
            assert_eq!(err.field, "spec.ports[1].port");
            assert!(err.message.contains(shown), "{err:?}");
        }
    }

    #[test]
    fn missing_name_and_wrong_types_are_rejected() {
        let (key, err) = invalid("apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n");
        assert!(key.is_none());
        assert_eq!(err.field, "metadata.name");

        let (_, err) =
            invalid("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: 80}");
        assert_eq!(err.field, "spec.ports");
        assert!(err.message.contains("must be a list"));

        let (_, err) = invalid("apiVersion: v1\nkind: Service\nmetadata: {name: Web}\n");
        assert_eq!(err.field, "metadata.name");

        let (_, err) = invalid(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.0.0.300}",
        );
        assert_eq!(err.field, "spec.clusterIP");
    }

    #[test]
    fn endpoint_conditions_follow_kubernetes_defaults() {
        let ParsedDocument::Valid {
            object: MeshObject::EndpointSlice(slice),
            ..
        } = parse(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n\
             - addresses: [10.1.0.1]\n\
             - addresses: [10.1.0.2]\n  conditions: {ready: false}\n\
             - addresses: [10.1.0.3]\n  conditions: {ready: false, serving: true, terminating: true}\n  targetRef: {kind: Pod, name: web-3}\n  zone: z1\n",
        )
        else {
            panic!("expected a valid EndpointSlice");
        };
        assert_eq!(slice.service_name.as_deref(), Some("web"));
        let e = &slice.endpoints;
        assert!(e[0].ready && e[0].serving && !e[0].terminating);
        assert!(!e[1].ready && !e[1].serving);
        assert!(!e[2].ready && e[2].serving && e[2].terminating);
        assert_eq!(e[2].pod.as_deref(), Some("web-3"));
        assert_eq!(e[2].zone.as_deref(), Some("z1"));
    }

    #[test]
    fn slice_address_must_match_address_type() {
        let (key, err) = invalid(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1}\n\
             addressType: IPv4\nendpoints: [{addresses: ['fd00::1']}]",
        );
        assert_eq!(
            key.map(|k| k.to_string()).as_deref(),
            Some("EndpointSlice default/web-1")
        );
        assert_eq!(err.field, "endpoints[0].addresses[0]");
    }

    #[test]
    fn unknown_fields_are_reported_not_fatal() {
        let ParsedDocument::Valid { unknown_fields, .. } = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, colour: red}\n\
             spec: {ports: [{port: 80, weight: 3}], selector: {app: web}}\nextra: 1",
        ) else {
            panic!("expected valid");
        };
        assert_eq!(
            unknown_fields,
            vec!["metadata.colour", "extra", "spec.ports[0].weight"]
        );
    }

    #[test]
    fn unknown_kinds_are_skipped() {
        assert!(matches!(
            parse("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}"),
            ParsedDocument::Skipped { .. }
        ));
        // Same kind name in another API group is a different kind.
        assert!(matches!(
            parse("apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: web}"),
            ParsedDocument::Skipped { .. }
        ));
    }

    #[test]
    fn service_refs_from_fqdns() {
        let web = ServiceRef {
            namespace: "shop".into(),
            name: "web".into(),
        };
        for name in [
            "web.shop.svc.cluster.local",
            "web.shop.svc.cluster.local.",
            "Web.SHOP.svc.Cluster.Local",
        ] {
            assert_eq!(
                ServiceRef::from_fqdn(name, "cluster.local").as_ref(),
                Some(&web),
                "{name}"
            );
        }
        assert_eq!(
            ServiceRef::from_fqdn(&web.fqdn("corp.example"), ".Corp.Example."),
            Some(web)
        );
        for name in [
            "web",
            "web.shop",
            "web.shop.svc",
            "web.shop.svc.example.org",
            "web.shop.pod.cluster.local",
            ".shop.svc.cluster.local",
            "web..svc.cluster.local",
            "api.example.com",
        ] {
            assert_eq!(ServiceRef::from_fqdn(name, "cluster.local"), None, "{name}");
        }
    }

    #[test]
    fn name_rules() {
        assert!(is_iana_svc_name("http"));
        assert!(!is_iana_svc_name("8080"));
        assert!(!is_iana_svc_name("a--b"));
        assert!(!is_iana_svc_name("this-name-is-too-long"));
        assert!(is_dns1035_label("web-1"));
        assert!(!is_dns1035_label("1web"));
        assert!(is_dns1123_subdomain("web-abc.x"));
    }
}
