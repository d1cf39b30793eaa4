//! Linkerd's authorization objects (`policy.linkerd.io`): `Server`, `AuthorizationPolicy`,
//! `MeshTLSAuthentication` and `NetworkAuthentication`, parsed as Linkerd's CRDs define them.
//!
//! Each object is validated alone here; references between them (a policy naming a Server or
//! an authentication that does not exist) are the Snapshot's business, and the decisions they
//! add up to are [`crate::inbound`]'s.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde_yaml_ng::{Mapping, Value};

use super::{
    as_mapping, display_scalar, get, is_dns1123_label, is_dns1123_subdomain, is_iana_svc_name,
    join, note_unknown, opt_mapping, opt_seq, opt_str, port_number, req_mapping, req_str,
    string_values, type_name, FieldError, ObjectMeta,
};
use crate::inbound::DefaultPolicy;

/// Linkerd's API group for every kind in this module.
pub(crate) const POLICY_GROUP: &str = "policy.linkerd.io";

// ===== types =====

/// A Kubernetes `LabelSelector`: `matchLabels` and `matchExpressions`, ANDed. An empty
/// selector selects everything (as Linkerd's v1beta1+ `Server` documents).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    /// Non-empty for `In`/`NotIn`, empty for `Exists`/`DoesNotExist`.
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Whether a workload with these labels is selected (Kubernetes semantics: `NotIn` and
    /// `DoesNotExist` also hold when the label is absent).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => value.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// `spec.port`: a container port number or name (Kubernetes' IntOrString).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ServerPort {
    Number(u16),
    /// A container port name, resolved per workload (see [`crate::InboundConfig`]).
    Name(Arc<str>),
}

impl fmt::Display for ServerPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// `spec.proxyProtocol`: what the inbound proxy should expect on the port. Anything but
/// `Unknown` lets it skip protocol detection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    /// Detect (Linkerd's default).
    #[default]
    Unknown,
    Http1,
    Http2,
    Grpc,
    /// Proxied as TCP without detection.
    Opaque,
    /// TLS the proxy does not terminate: proxied as TCP.
    Tls,
}

impl ProxyProtocol {
    /// The spelling Linkerd's CRD uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Http1 => "HTTP/1",
            Self::Http2 => "HTTP/2",
            Self::Grpc => "gRPC",
            Self::Opaque => "opaque",
            Self::Tls => "TLS",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        // Exact spellings, as the CRD's enum accepts.
        [
            Self::Unknown,
            Self::Http1,
            Self::Http2,
            Self::Grpc,
            Self::Opaque,
            Self::Tls,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `policy.linkerd.io` `Server`: one port on the workloads of its namespace that a selector
/// picks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    pub meta: ObjectMeta,
    /// `spec.podSelector`, or `spec.externalWorkloadSelector` (v1beta2+): Pylon knows a
    /// workload by its namespace and labels only, so both select the same way.
    pub pod_selector: LabelSelector,
    pub port: ServerPort,
    pub proxy_protocol: ProxyProtocol,
    /// `spec.accessPolicy` (v1beta3): what happens to traffic no AuthorizationPolicy allows.
    /// Absent means [`DefaultPolicy::Deny`], as in Linkerd: once a Server selects a port, only
    /// what is authorized gets through.
    pub access_policy: DefaultPolicy,
}

/// `spec.targetRef` of an AuthorizationPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PolicyTarget {
    /// A Server in the policy's namespace.
    Server(Arc<str>),
    /// Every Server in the policy's namespace (Linkerd allows only the policy's own).
    Namespace,
}

/// The kinds `requiredAuthenticationRefs` may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuthenticationKind {
    MeshTls,
    Network,
    /// A core `ServiceAccount`: its identity, exactly.
    ServiceAccount,
}

impl AuthenticationKind {
    /// The kind as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MeshTls => "MeshTLSAuthentication",
            Self::Network => "NetworkAuthentication",
            Self::ServiceAccount => "ServiceAccount",
        }
    }
}

/// One `requiredAuthenticationRefs` entry, with its namespace defaulted to the policy's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuthenticationRef {
    pub kind: AuthenticationKind,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

/// `policy.linkerd.io/v1alpha1 AuthorizationPolicy`: clients meeting *all* the required
/// authentications may reach the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub meta: ObjectMeta,
    pub target: PolicyTarget,
    /// In file order. Empty authorizes every client (Linkerd: no identity and no network
    /// requirement).
    pub required_authentications: Vec<AuthenticationRef>,
}

/// An `identityRefs` entry of a MeshTLSAuthentication; its identity depends on the mesh's
/// identity suffix, so it is resolved when the policy is built.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IdentityRef {
    /// `NAME.NS.serviceaccount.identity.<...>`.
    ServiceAccount { namespace: Arc<str>, name: Arc<str> },
    /// Every service account of a namespace: `*.NS.serviceaccount.identity.<...>`.
    Namespace(Arc<str>),
}

/// `policy.linkerd.io/v1alpha1 MeshTLSAuthentication`: clients with one of these identities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshTlsAuthentication {
    pub meta: ObjectMeta,
    /// `spec.identities`, lowercased: exact names, `*` (any authenticated client) or
    /// `*.SUFFIX` (any identity ending in `.SUFFIX`).
    pub identities: Vec<Arc<str>>,
    pub identity_refs: Vec<IdentityRef>,
}

/// One `spec.networks` entry: `cidr` minus `except`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Network {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl Network {
    /// Whether `ip` (already canonical: IPv4-mapped addresses as IPv4) is in the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

/// `policy.linkerd.io/v1alpha1 NetworkAuthentication`: clients from these networks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkAuthentication {
    pub meta: ObjectMeta,
    /// At least one.
    pub networks: Vec<Network>,
}

// ===== parsing =====

const TOP_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];
const SERVER_SPEC_FIELDS: &[&str] = &[
    "podSelector",
    "externalWorkloadSelector",
    "port",
    "proxyProtocol",
    "accessPolicy",
];
const SELECTOR_FIELDS: &[&str] = &["matchLabels", "matchExpressions"];
const REQUIREMENT_FIELDS: &[&str] = &["key", "operator", "values"];
const POLICY_SPEC_FIELDS: &[&str] = &["targetRef", "requiredAuthenticationRefs"];
const TARGET_REF_FIELDS: &[&str] = &["group", "kind", "name", "namespace"];
const MESHTLS_SPEC_FIELDS: &[&str] = &["identities", "identityRefs"];
const NETWORK_SPEC_FIELDS: &[&str] = &["networks"];
const NETWORK_FIELDS: &[&str] = &["cidr", "except"];

fn spec<'v>(root: &'v Mapping, unknown: &mut Vec<String>) -> Result<&'v Mapping, FieldError> {
    note_unknown(root, "", TOP_FIELDS, unknown);
    req_mapping(root, "", "spec")
}

pub(super) fn parse_server(
    root: &Mapping,
    meta: ObjectMeta,
    unknown: &mut Vec<String>,
) -> Result<Server, FieldError> {
    let spec = spec(root, unknown)?;
    note_unknown(spec, "spec", SERVER_SPEC_FIELDS, unknown);

    let pods = opt_mapping(spec, "spec", "podSelector")?;
    let external = opt_mapping(spec, "spec", "externalWorkloadSelector")?;
    let pod_selector = match (pods, external) {
        (Some(s), None) => label_selector(s, "spec.podSelector", unknown)?,
        (None, Some(s)) => label_selector(s, "spec.externalWorkloadSelector", unknown)?,
        (None, None) => return Err(FieldError::new("spec.podSelector", "is required")),
        (Some(_), Some(_)) => {
            return Err(FieldError::new(
                "spec.externalWorkloadSelector",
                "set either podSelector or externalWorkloadSelector, not both",
            ))
        }
    };

    let port = match get(spec, "port") {
        None => return Err(FieldError::new("spec.port", "is required")),
        Some(Value::String(name)) => {
            // A numeric string is how IntOrString arrives from some tools; take it as a number.
            match name.parse::<u64>() {
                Ok(n) => ServerPort::Number(port_number(&Value::Number(n.into()), "spec.port")?),
                Err(_) if is_iana_svc_name(name) => ServerPort::Name(name.as_str().into()),
                Err(_) => {
                    return Err(FieldError::new(
                        "spec.port",
                        format!(
                            "invalid port {name:?}: must be a number from 1 to 65535 or a \
                             container port name (at most 15 lowercase alphanumerics and '-', \
                             with at least one letter)"
                        ),
                    ))
                }
            }
        }
        Some(v) => ServerPort::Number(port_number(v, "spec.port")?),
    };

    let proxy_protocol = match opt_str(spec, "spec", "proxyProtocol")? {
        None | Some("") => ProxyProtocol::Unknown,
        Some(p) => ProxyProtocol::parse(p).ok_or_else(|| {
            FieldError::new(
                "spec.proxyProtocol",
                format!(
                    "unknown proxyProtocol {p:?}: expected unknown, HTTP/1, HTTP/2, gRPC, \
                     opaque or TLS"
                ),
            )
        })?,
    };

    let access_policy = match opt_str(spec, "spec", "accessPolicy")? {
        None | Some("") => DefaultPolicy::Deny,
        Some(p) => p
            .parse::<DefaultPolicy>()
            .map_err(|e| FieldError::new("spec.accessPolicy", e.to_string()))?,
    };

    Ok(Server {
        meta,
        pod_selector,
        port,
        proxy_protocol,
        access_policy,
    })
}

fn label_selector(
    map: &Mapping,
    path: &str,
    unknown: &mut Vec<String>,
) -> Result<LabelSelector, FieldError> {
    note_unknown(map, path, SELECTOR_FIELDS, unknown);
    let match_labels = match opt_mapping(map, path, "matchLabels")? {
        None => BTreeMap::new(),
        Some(m) => string_values(m, &join(path, "matchLabels"))?,
    };
    let mut match_expressions = Vec::new();
    for (i, item) in opt_seq(map, path, "matchExpressions")?.iter().enumerate() {
        let rpath = format!("{path}.matchExpressions[{i}]");
        let r = as_mapping(item, &rpath)?;
        note_unknown(r, &rpath, REQUIREMENT_FIELDS, unknown);
        let key = req_str(r, &rpath, "key")?;
        let operator = match req_str(r, &rpath, "operator")? {
            "In" => SelectorOperator::In,
            "NotIn" => SelectorOperator::NotIn,
            "Exists" => SelectorOperator::Exists,
            "DoesNotExist" => SelectorOperator::DoesNotExist,
            other => {
                return Err(FieldError::new(
                    join(&rpath, "operator"),
                    format!(
                        "unknown operator {other:?}: expected In, NotIn, Exists or DoesNotExist"
                    ),
                ))
            }
        };
        let values = string_list(r, &rpath, "values")?;
        let wants_values = matches!(operator, SelectorOperator::In | SelectorOperator::NotIn);
        if wants_values && values.is_empty() {
            return Err(FieldError::new(
                join(&rpath, "values"),
                format!("must not be empty for operator {operator:?}"),
            ));
        }
        if !wants_values && !values.is_empty() {
            return Err(FieldError::new(
                join(&rpath, "values"),
                format!("must be empty for operator {operator:?}"),
            ));
        }
        match_expressions.push(LabelSelectorRequirement {
            key: key.to_string(),
            operator,
            values,
        });
    }
    Ok(LabelSelector {
        match_labels,
        match_expressions,
    })
}

fn string_list(map: &Mapping, path: &str, key: &str) -> Result<Vec<String>, FieldError> {
    opt_seq(map, path, key)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                FieldError::new(
                    format!("{}[{i}]", join(path, key)),
                    format!("must be a string, found {}", type_name(v)),
                )
            })
        })
        .collect()
}

/// A `targetRef`-shaped reference: `group`, `kind`, `name`, optional `namespace`.
struct Ref<'v> {
    group: Option<&'v str>,
    kind: &'v str,
    name: &'v str,
    namespace: Option<&'v str>,
}

fn reference<'v>(
    v: &'v Value,
    path: &str,
    unknown: &mut Vec<String>,
) -> Result<Ref<'v>, FieldError> {
    let m = as_mapping(v, path)?;
    note_unknown(m, path, TARGET_REF_FIELDS, unknown);
    Ok(Ref {
        group: opt_str(m, path, "group")?.filter(|g| !g.is_empty()),
        kind: req_str(m, path, "kind")?,
        name: req_str(m, path, "name")?,
        namespace: opt_str(m, path, "namespace")?.filter(|n| !n.is_empty()),
    })
}

impl Ref<'_> {
    /// Whether the group is `group`. An absent group means the core group to Kubernetes;
    /// for Linkerd's own kinds Pylon also takes it as `policy.linkerd.io`, since no core
    /// kind shares their names.
    fn group_is(&self, group: &str) -> bool {
        match self.group {
            None => true,
            Some(g) if group.is_empty() => g.eq_ignore_ascii_case("core"),
            Some(g) => g.eq_ignore_ascii_case(group),
        }
    }

    fn wrong_group(&self, path: &str, group: &str) -> FieldError {
        let expected = if group.is_empty() {
            "the core group (omit it)".to_string()
        } else {
            group.to_string()
        };
        FieldError::new(
            join(path, "group"),
            format!(
                "{} is in {expected}, not {:?}",
                self.kind,
                self.group.unwrap_or_default()
            ),
        )
    }

    /// The referenced object's namespace, checked, defaulting to the referrer's.
    fn namespace(&self, path: &str, default: &Arc<str>) -> Result<Arc<str>, FieldError> {
        match self.namespace {
            None => Ok(default.clone()),
            Some(ns) if is_dns1123_label(ns) => Ok(ns.into()),
            Some(ns) => Err(FieldError::new(
                join(path, "namespace"),
                format!("invalid namespace {ns:?}: must be a DNS label"),
            )),
        }
    }

    fn checked_name(&self, path: &str) -> Result<Arc<str>, FieldError> {
        if is_dns1123_subdomain(self.name) {
            Ok(self.name.into())
        } else {
            Err(FieldError::new(
                join(path, "name"),
                format!(
                    "invalid name {:?}: must be lowercase alphanumerics, '-' and '.'",
                    self.name
                ),
            ))
        }
    }
}

pub(super) fn parse_authorization_policy(
    root: &Mapping,
    meta: ObjectMeta,
    unknown: &mut Vec<String>,
) -> Result<AuthorizationPolicy, FieldError> {
    let spec = spec(root, unknown)?;
    note_unknown(spec, "spec", POLICY_SPEC_FIELDS, unknown);

    let target_path = "spec.targetRef";
    let target_value =
        get(spec, "targetRef").ok_or_else(|| FieldError::new(target_path, "is required"))?;
    let t = reference(target_value, target_path, unknown)?;
    let target = if t.kind.eq_ignore_ascii_case("Server") {
        if !t.group_is(POLICY_GROUP) {
            return Err(t.wrong_group(target_path, POLICY_GROUP));
        }
        PolicyTarget::Server(t.checked_name(target_path)?)
    } else if t.kind.eq_ignore_ascii_case("Namespace") {
        if !t.group_is("") {
            return Err(t.wrong_group(target_path, ""));
        }
        // Linkerd: a policy may only target its own namespace.
        if t.name != &*meta.namespace {
            return Err(FieldError::new(
                join(target_path, "name"),
                format!(
                    "a policy can only target its own namespace {:?}, not {:?}",
                    meta.namespace, t.name
                ),
            ));
        }
        PolicyTarget::Namespace
    } else {
        let why = if t.kind.eq_ignore_ascii_case("HTTPRoute")
            || t.kind.eq_ignore_ascii_case("GRPCRoute")
        {
            "route-level authorization is not supported by Pylon yet; target the route's Server"
        } else {
            "expected Server or Namespace"
        };
        return Err(FieldError::new(
            join(target_path, "kind"),
            format!("unsupported target kind {:?}: {why}", t.kind),
        ));
    };

    // Linkerd's CRD requires the list; an empty one authorizes every client.
    if get(spec, "requiredAuthenticationRefs").is_none() {
        return Err(FieldError::new(
            "spec.requiredAuthenticationRefs",
            "is required (an empty list authorizes every client)",
        ));
    }
    let mut required_authentications: Vec<AuthenticationRef> = Vec::new();
    for (i, item) in opt_seq(spec, "spec", "requiredAuthenticationRefs")?
        .iter()
        .enumerate()
    {
        let path = format!("spec.requiredAuthenticationRefs[{i}]");
        let r = reference(item, &path, unknown)?;
        let (kind, group) = if r.kind.eq_ignore_ascii_case("MeshTLSAuthentication") {
            (AuthenticationKind::MeshTls, POLICY_GROUP)
        } else if r.kind.eq_ignore_ascii_case("NetworkAuthentication") {
            (AuthenticationKind::Network, POLICY_GROUP)
        } else if r.kind.eq_ignore_ascii_case("ServiceAccount") {
            (AuthenticationKind::ServiceAccount, "")
        } else {
            return Err(FieldError::new(
                join(&path, "kind"),
                format!(
                    "unsupported authentication kind {:?}: expected MeshTLSAuthentication, \
                     NetworkAuthentication or ServiceAccount",
                    r.kind
                ),
            ));
        };
        if !r.group_is(group) {
            return Err(r.wrong_group(&path, group));
        }
        let reference = AuthenticationRef {
            kind,
            namespace: r.namespace(&path, &meta.namespace)?,
            name: r.checked_name(&path)?,
        };
        if let Some(j) = required_authentications
            .iter()
            .position(|x| *x == reference)
        {
            return Err(FieldError::new(
                path,
                format!("listed twice (also spec.requiredAuthenticationRefs[{j}])"),
            ));
        }
        required_authentications.push(reference);
    }

    Ok(AuthorizationPolicy {
        meta,
        target,
        required_authentications,
    })
}

pub(super) fn parse_meshtls_authentication(
    root: &Mapping,
    meta: ObjectMeta,
    unknown: &mut Vec<String>,
) -> Result<MeshTlsAuthentication, FieldError> {
    let spec = spec(root, unknown)?;
    note_unknown(spec, "spec", MESHTLS_SPEC_FIELDS, unknown);

    let mut identities: Vec<Arc<str>> = Vec::new();
    for (i, v) in opt_seq(spec, "spec", "identities")?.iter().enumerate() {
        let path = format!("spec.identities[{i}]");
        let Some(raw) = v.as_str() else {
            return Err(FieldError::new(
                path,
                format!("must be a string, found {}", type_name(v)),
            ));
        };
        let id = raw.trim().to_ascii_lowercase();
        if id.is_empty() {
            return Err(FieldError::new(path, "must not be empty"));
        }
        // Only `*` and a leading `*.` are wildcards in Linkerd; a `*` elsewhere would be
        // compared literally and never match, which is surely not what was meant.
        let rest = match id.strip_prefix('*') {
            Some("") => "",
            Some(rest) => rest.strip_prefix('.').unwrap_or("*"),
            None => &id,
        };
        if rest.contains('*') || id.contains(char::is_whitespace) {
            return Err(FieldError::new(
                path,
                format!(
                    "invalid identity {raw:?}: `*` alone, or `*.` at the start, is the only \
                     wildcard"
                ),
            ));
        }
        identities.push(id.into());
    }

    let mut identity_refs = Vec::new();
    for (i, item) in opt_seq(spec, "spec", "identityRefs")?.iter().enumerate() {
        let path = format!("spec.identityRefs[{i}]");
        let r = reference(item, &path, unknown)?;
        let identity_ref = if r.kind.eq_ignore_ascii_case("ServiceAccount") {
            if !r.group_is("") {
                return Err(r.wrong_group(&path, ""));
            }
            IdentityRef::ServiceAccount {
                namespace: r.namespace(&path, &meta.namespace)?,
                name: r.checked_name(&path)?,
            }
        } else if r.kind.eq_ignore_ascii_case("Namespace") {
            if !r.group_is("") {
                return Err(r.wrong_group(&path, ""));
            }
            if !is_dns1123_label(r.name) {
                return Err(FieldError::new(
                    join(&path, "name"),
                    format!("invalid namespace {:?}: must be a DNS label", r.name),
                ));
            }
            IdentityRef::Namespace(r.name.into())
        } else {
            return Err(FieldError::new(
                join(&path, "kind"),
                format!(
                    "unsupported kind {:?}: expected ServiceAccount or Namespace",
                    r.kind
                ),
            ));
        };
        identity_refs.push(identity_ref);
    }

    // Linkerd refuses these too ("No identities configured"): it would authenticate nobody.
    if identities.is_empty() && identity_refs.is_empty() {
        return Err(FieldError::new(
            "spec.identities",
            "must list at least one identity (or spec.identityRefs); `*` means any meshed client",
        ));
    }
    Ok(MeshTlsAuthentication {
        meta,
        identities,
        identity_refs,
    })
}

pub(super) fn parse_network_authentication(
    root: &Mapping,
    meta: ObjectMeta,
    unknown: &mut Vec<String>,
) -> Result<NetworkAuthentication, FieldError> {
    let spec = spec(root, unknown)?;
    note_unknown(spec, "spec", NETWORK_SPEC_FIELDS, unknown);
    let mut networks = Vec::new();
    for (i, item) in opt_seq(spec, "spec", "networks")?.iter().enumerate() {
        let path = format!("spec.networks[{i}]");
        let n = as_mapping(item, &path)?;
        note_unknown(n, &path, NETWORK_FIELDS, unknown);
        let cidr_path = join(&path, "cidr");
        let cidr = cidr(
            get(n, "cidr").ok_or_else(|| FieldError::new(&cidr_path, "is required"))?,
            &cidr_path,
        )?;
        let except = opt_seq(n, &path, "except")?
            .iter()
            .enumerate()
            .map(|(j, v)| self::cidr(v, &format!("{path}.except[{j}]")))
            .collect::<Result<Vec<_>, _>>()?;
        networks.push(Network { cidr, except });
    }
    if networks.is_empty() {
        return Err(FieldError::new(
            "spec.networks",
            "must list at least one network (0.0.0.0/0 and ::/0 for every client)",
        ));
    }
    Ok(NetworkAuthentication { meta, networks })
}

/// A CIDR (`10.0.0.0/8`, `fd00::/8`), or a bare address meaning just that host.
fn cidr(v: &Value, path: &str) -> Result<IpNet, FieldError> {
    let Some(s) = v.as_str() else {
        return Err(FieldError::new(
            path,
            format!(
                "invalid CIDR {}: must be a string such as 10.0.0.0/8",
                display_scalar(v)
            ),
        ));
    };
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        // `10.1.2.3/8` means the /8 it is in; keep the canonical form.
        return Ok(net.trunc());
    }
    match s.parse::<IpAddr>() {
        Ok(ip) => Ok(IpNet::from(ip)),
        Err(_) => Err(FieldError::new(
            path,
            format!(
                "invalid CIDR {s:?}: expected an address/prefix such as 10.0.0.0/8 or fd00::/8"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{parse_document, MeshObject, ObjectKey, ParsedDocument};

    fn parse(yaml: &str) -> ParsedDocument {
        let v: Value = serde_yaml_ng::from_str(yaml).expect("test yaml");
        parse_document(&v, "shop")
    }

    fn valid(yaml: &str) -> (MeshObject, Vec<String>) {
        match parse(yaml) {
            ParsedDocument::Valid {
                object,
                unknown_fields,
            } => (object, unknown_fields),
            other => panic!("expected valid, got {other:?}"),
        }
    }

    fn invalid(yaml: &str) -> (Option<ObjectKey>, FieldError) {
        match parse(yaml) {
            ParsedDocument::Invalid { key, error, .. } => (key, error),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    fn server(version: &str, spec: &str) -> String {
        format!(
            "apiVersion: policy.linkerd.io/{version}\nkind: Server\n\
             metadata: {{name: web-http, namespace: shop}}\nspec:\n{spec}"
        )
    }

    // Shaped like Linkerd's documented examples: a gRPC Server picked by matchLabels and an
    // HTTP/2 one by matchExpressions.
    #[test]
    fn servers_of_every_version() {
        for version in ["v1alpha1", "v1beta1", "v1beta2", "v1beta3"] {
            let (object, unknown) = valid(&server(
                version,
                "  podSelector:\n    matchLabels: {app: web}\n  port: grpc\n  proxyProtocol: gRPC\n",
            ));
            let MeshObject::Server(srv) = object else {
                panic!("a Server")
            };
            assert!(unknown.is_empty(), "{unknown:?}");
            assert_eq!(srv.port, ServerPort::Name("grpc".into()));
            assert_eq!(srv.proxy_protocol, ProxyProtocol::Grpc);
            assert_eq!(srv.access_policy, DefaultPolicy::Deny, "Linkerd's default");
            let web = BTreeMap::from([("app".to_string(), "web".to_string())]);
            assert!(srv.pod_selector.matches(&web));
        }
        let (object, _) = valid(&server(
            "v1beta3",
            "  podSelector:\n    matchExpressions:\n    - {key: app, operator: In, values: [web, api]}\n    \
             - {key: env, operator: NotIn, values: [dev]}\n  port: 8080\n  proxyProtocol: HTTP/2\n  \
             accessPolicy: all-authenticated\n",
        ));
        let MeshObject::Server(srv) = object else {
            panic!("a Server")
        };
        assert_eq!(srv.port, ServerPort::Number(8080));
        assert_eq!(srv.proxy_protocol, ProxyProtocol::Http2);
        assert_eq!(srv.access_policy, DefaultPolicy::AllAuthenticated);
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let sel = &srv.pod_selector;
        assert!(
            sel.matches(&labels(&[("app", "api")])),
            "NotIn holds when absent"
        );
        assert!(sel.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!sel.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!sel.matches(&labels(&[("app", "db")])));
        assert!(!sel.matches(&labels(&[])));
    }

    #[test]
    fn server_problems_name_the_field() {
        let cases = [
            (
                "  podSelector: {}\n  port: 0\n",
                "spec.port",
                "invalid port 0",
            ),
            ("  podSelector: {}\n  port: 70000\n", "spec.port", "70000"),
            (
                "  podSelector: {}\n  port: Not_A_Name\n",
                "spec.port",
                "Not_A_Name",
            ),
            ("  podSelector: {}\n", "spec.port", "is required"),
            ("  port: 80\n", "spec.podSelector", "is required"),
            (
                "  podSelector: {}\n  port: 80\n  proxyProtocol: http\n",
                "spec.proxyProtocol",
                "unknown proxyProtocol \"http\"",
            ),
            (
                "  podSelector: {}\n  port: 80\n  accessPolicy: allow\n",
                "spec.accessPolicy",
                "unknown default policy \"allow\"",
            ),
            (
                "  podSelector:\n    matchExpressions: [{key: app, operator: Has}]\n  port: 80\n",
                "spec.podSelector.matchExpressions[0].operator",
                "Has",
            ),
            (
                "  podSelector:\n    matchExpressions: [{key: app, operator: In}]\n  port: 80\n",
                "spec.podSelector.matchExpressions[0].values",
                "must not be empty",
            ),
            (
                "  podSelector:\n    matchLabels: {app: 3}\n  port: 80\n",
                "spec.podSelector.matchLabels.app",
                "must be a string",
            ),
        ];
        for (spec, field, message) in cases {
            let (key, err) = invalid(&server("v1beta3", spec));
            assert_eq!(
                key.map(|k| k.to_string()).as_deref(),
                Some("Server shop/web-http"),
                "{spec}"
            );
            assert_eq!(err.field, field, "{spec}");
            assert!(err.message.contains(message), "{spec}: {err:?}");
        }
    }

    #[test]
    fn numeric_port_strings_are_numbers() {
        let (MeshObject::Server(srv), _) =
            valid(&server("v1beta3", "  podSelector: {}\n  port: '8080'\n"))
        else {
            panic!("a Server")
        };
        assert_eq!(srv.port, ServerPort::Number(8080));
    }

    fn policy(spec: &str) -> String {
        format!(
            "apiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: web-policy, namespace: shop}}\nspec:\n{spec}"
        )
    }

    #[test]
    fn authorization_policies_target_servers_or_the_namespace() {
        let (MeshObject::AuthorizationPolicy(p), unknown) = valid(&policy(
            "  targetRef: {group: policy.linkerd.io, kind: Server, name: web-http}\n  \
             requiredAuthenticationRefs:\n  \
             - {name: web-clients, kind: MeshTLSAuthentication, group: policy.linkerd.io}\n  \
             - {name: office, kind: NetworkAuthentication, group: policy.linkerd.io, namespace: infra}\n  \
             - {name: checkout, kind: ServiceAccount}\n",
        )) else {
            panic!("a policy")
        };
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(p.target, PolicyTarget::Server("web-http".into()));
        let refs: Vec<(AuthenticationKind, &str, &str)> = p
            .required_authentications
            .iter()
            .map(|r| (r.kind, &*r.namespace, &*r.name))
            .collect();
        assert_eq!(
            refs,
            [
                (AuthenticationKind::MeshTls, "shop", "web-clients"),
                (AuthenticationKind::Network, "infra", "office"),
                (AuthenticationKind::ServiceAccount, "shop", "checkout"),
            ]
        );

        let (MeshObject::AuthorizationPolicy(p), _) = valid(&policy(
            "  targetRef: {kind: Namespace, name: shop}\n  requiredAuthenticationRefs: []\n",
        )) else {
            panic!("a policy")
        };
        assert_eq!(p.target, PolicyTarget::Namespace);
        assert!(p.required_authentications.is_empty());
    }

    #[test]
    fn authorization_policy_problems_name_the_field() {
        let refs = "  requiredAuthenticationRefs: [{kind: ServiceAccount, name: web}]\n";
        let cases = [
            (
                format!("  targetRef: {{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}}\n{refs}"),
                "spec.targetRef.kind",
                "route-level authorization is not supported",
            ),
            (
                format!("  targetRef: {{kind: Deployment, name: web}}\n{refs}"),
                "spec.targetRef.kind",
                "unsupported target kind \"Deployment\"",
            ),
            (
                format!("  targetRef: {{group: core, kind: Server, name: web}}\n{refs}"),
                "spec.targetRef.group",
                "policy.linkerd.io",
            ),
            (
                format!("  targetRef: {{kind: Namespace, name: other}}\n{refs}"),
                "spec.targetRef.name",
                "its own namespace",
            ),
            (
                "  targetRef: {kind: Server, name: web}\n".to_string(),
                "spec.requiredAuthenticationRefs",
                "is required",
            ),
            (
                "  targetRef: {kind: Server, name: web}\n  requiredAuthenticationRefs: [{kind: Secret, name: x}]\n".to_string(),
                "spec.requiredAuthenticationRefs[0].kind",
                "unsupported authentication kind \"Secret\"",
            ),
            (
                "  targetRef: {kind: Server, name: web}\n  requiredAuthenticationRefs: [{kind: ServiceAccount}]\n".to_string(),
                "spec.requiredAuthenticationRefs[0].name",
                "is required",
            ),
            (
                "  requiredAuthenticationRefs: []\n".to_string(),
                "spec.targetRef",
                "is required",
            ),
        ];
        for (spec, field, message) in cases {
            let (key, err) = invalid(&policy(&spec));
            assert_eq!(
                key.map(|k| k.to_string()).as_deref(),
                Some("AuthorizationPolicy shop/web-policy")
            );
            assert_eq!(err.field, field, "{spec}");
            assert!(err.message.contains(message), "{spec}: {err:?}");
        }
    }

    fn meshtls(spec: &str) -> String {
        format!(
            "apiVersion: policy.linkerd.io/v1alpha1\nkind: MeshTLSAuthentication\n\
             metadata: {{name: web-clients, namespace: shop}}\nspec:\n{spec}"
        )
    }

    #[test]
    fn meshtls_authentications_take_identities_and_refs() {
        let (MeshObject::MeshTlsAuthentication(a), _) = valid(&meshtls(
            "  identities:\n  - Checkout.Shop.serviceaccount.identity.pylon.cluster.local\n  \
             - '*.ops.serviceaccount.identity.pylon.cluster.local'\n  - '*'\n  \
             identityRefs:\n  - {kind: ServiceAccount, name: books}\n  \
             - {kind: ServiceAccount, name: web, namespace: front}\n  - {kind: Namespace, name: batch}\n",
        )) else {
            panic!("a MeshTLSAuthentication")
        };
        let ids: Vec<&str> = a.identities.iter().map(|i| &**i).collect();
        assert_eq!(
            ids,
            [
                "checkout.shop.serviceaccount.identity.pylon.cluster.local",
                "*.ops.serviceaccount.identity.pylon.cluster.local",
                "*",
            ]
        );
        assert_eq!(
            a.identity_refs,
            [
                IdentityRef::ServiceAccount {
                    namespace: "shop".into(),
                    name: "books".into()
                },
                IdentityRef::ServiceAccount {
                    namespace: "front".into(),
                    name: "web".into()
                },
                IdentityRef::Namespace("batch".into()),
            ]
        );
    }

    #[test]
    fn meshtls_problems_name_the_field() {
        let cases = [
            (
                "  identities: []\n",
                "spec.identities",
                "at least one identity",
            ),
            (
                "  identities: ['']\n",
                "spec.identities[0]",
                "must not be empty",
            ),
            ("  identities: ['web*']\n", "spec.identities[0]", "wildcard"),
            (
                "  identities: ['*.a.*.b']\n",
                "spec.identities[0]",
                "wildcard",
            ),
            (
                "  identities: [3]\n",
                "spec.identities[0]",
                "must be a string",
            ),
            (
                "  identityRefs: [{kind: Pod, name: web}]\n",
                "spec.identityRefs[0].kind",
                "unsupported kind \"Pod\"",
            ),
        ];
        for (spec, field, message) in cases {
            let (key, err) = invalid(&meshtls(spec));
            assert_eq!(
                key.map(|k| k.to_string()).as_deref(),
                Some("MeshTLSAuthentication shop/web-clients")
            );
            assert_eq!(err.field, field, "{spec}");
            assert!(err.message.contains(message), "{spec}: {err:?}");
        }
    }

    fn network(spec: &str) -> String {
        format!(
            "apiVersion: policy.linkerd.io/v1alpha1\nkind: NetworkAuthentication\n\
             metadata: {{name: office, namespace: shop}}\nspec:\n{spec}"
        )
    }

    #[test]
    fn network_authentications_take_v4_and_v6_with_exceptions() {
        let (MeshObject::NetworkAuthentication(a), _) = valid(&network(
            "  networks:\n  - cidr: 10.0.0.0/8\n    except: [10.1.0.0/16, 10.2.3.4]\n  \
             - cidr: fd00::/8\n  - cidr: 192.168.1.77/24\n",
        )) else {
            panic!("a NetworkAuthentication")
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let office = &a.networks[0];
        assert!(office.contains(ip("10.9.9.9")));
        assert!(!office.contains(ip("10.1.2.3")));
        assert!(!office.contains(ip("10.2.3.4")));
        assert!(office.contains(ip("10.2.3.5")));
        assert!(!office.contains(ip("11.0.0.1")));
        assert!(a.networks[1].contains(ip("fd12::1")));
        assert!(!a.networks[1].contains(ip("fe80::1")));
        assert_eq!(
            a.networks[2].cidr.to_string(),
            "192.168.1.0/24",
            "host bits dropped"
        );
    }

    #[test]
    fn network_problems_name_the_field() {
        let cases = [
            ("  networks: []\n", "spec.networks", "at least one network"),
            (
                "  networks: [{cidr: 10.0.0.0/33}]\n",
                "spec.networks[0].cidr",
                "invalid CIDR",
            ),
            (
                "  networks: [{cidr: 'fd00::/129'}]\n",
                "spec.networks[0].cidr",
                "invalid CIDR",
            ),
            (
                "  networks: [{except: [10.0.0.0/8]}]\n",
                "spec.networks[0].cidr",
                "is required",
            ),
            (
                "  networks: [{cidr: 10.0.0.0/8, except: [10.0.0.0/8, nope]}]\n",
                "spec.networks[0].except[1]",
                "\"nope\"",
            ),
            (
                "  networks: [{cidr: 10}]\n",
                "spec.networks[0].cidr",
                "must be a string",
            ),
        ];
        for (spec, field, message) in cases {
            let (key, err) = invalid(&network(spec));
            assert_eq!(
                key.map(|k| k.to_string()).as_deref(),
                Some("NetworkAuthentication shop/office")
            );
            assert_eq!(err.field, field, "{spec}");
            assert!(err.message.contains(message), "{spec}: {err:?}");
        }
    }

    #[test]
    fn unknown_fields_are_warnings() {
        let (_, unknown) = valid(&server(
            "v1beta3",
            "  podSelector: {matchLabels: {app: web}, colour: red}\n  port: 80\n  rateLimit: 5\n",
        ));
        assert_eq!(unknown, ["spec.rateLimit", "spec.podSelector.colour"]);
    }
}
