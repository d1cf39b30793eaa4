//! Inbound authorization: who may connect to this workload's ports, decided from Linkerd's
//! policy objects the way Linkerd's policy controller and proxy decide it.
//!
//! [`Snapshot::inbound_policy`](crate::Snapshot::inbound_policy) compiles the objects that
//! apply to one workload (its namespace and labels) into an [`InboundPolicy`]: every Server
//! selecting the workload becomes a [`PortPolicy`] with its authorizations resolved (identity
//! sets hashed, networks parsed, references followed), and every other port gets the default
//! policy. The proxy builds it once per snapshot; [`PortPolicy::authorize`] then decides a
//! connection or request without allocating.
//!
//! Semantics, as Linkerd documents and implements them (`policy-controller` `inbound/index.rs`
//! and `defaults.rs`; the "Authorization Policy" reference and feature pages):
//!
//! - A port no Server selects uses the workload's default policy ([`DefaultPolicy`]).
//! - A port a Server selects allows a client when *any* AuthorizationPolicy targeting that
//!   Server (or, with `kind: Namespace`, every Server of the namespace) has *all* of its
//!   `requiredAuthenticationRefs` satisfied; otherwise the Server's `accessPolicy` decides,
//!   and an absent `accessPolicy` is `deny`.
//! - A policy whose authentication reference cannot be resolved is ignored (Linkerd logs
//!   "Illegal AuthorizationPolicy; ignoring"), so it authorizes nobody: failing closed.
//! - A MeshTLSAuthentication (or ServiceAccount) requirement needs a TLS client with a
//!   matching identity; a NetworkAuthentication requirement needs a peer address in one of
//!   its networks (minus `except`). A policy with no identity requirement admits clients with
//!   or without TLS; one with no network requirement admits every address.
//! - Linkerd's admission webhook allows one identity and one network requirement per policy;
//!   Pylon takes any number and requires them all.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::objects::{
    AuthenticationKind, AuthenticationRef, AuthorizationPolicy, IdentityRef, MeshObject, Network,
    ObjectKey, ObjectKind, PolicyTarget, ProxyProtocol, Server, ServerPort,
};

/// What a port no Server selects allows, and what a Server's `accessPolicy` allows when no
/// AuthorizationPolicy does: Linkerd's `config.linkerd.io/default-inbound-policy` values.
///
/// "Authenticated" means a TLS client with a mesh identity; "cluster" means a peer address in
/// the cluster networks ([`InboundConfig::cluster_networks`]). Linkerd's reference:
/// `all-authenticated` allows meshed clients from anywhere, `cluster-authenticated` meshed
/// clients *in the cluster*, `cluster-unauthenticated` meshed and unmeshed clients in the
/// cluster (its `DefaultPolicy::Allow { authenticated_only, cluster_only }`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DefaultPolicy {
    /// Every client (Linkerd's default).
    #[default]
    AllUnauthenticated,
    /// Meshed clients, from any address.
    AllAuthenticated,
    /// Meshed clients whose address is in the cluster networks.
    ClusterAuthenticated,
    /// Any client whose address is in the cluster networks.
    ClusterUnauthenticated,
    /// Nobody.
    Deny,
    /// Every client, but flagged: the decision's `authz_name` is `audit`, so logs and
    /// metrics show what a stricter policy would refuse.
    Audit,
}

impl DefaultPolicy {
    pub const ALL: [DefaultPolicy; 6] = [
        Self::AllUnauthenticated,
        Self::AllAuthenticated,
        Self::ClusterAuthenticated,
        Self::ClusterUnauthenticated,
        Self::Deny,
        Self::Audit,
    ];

    /// Linkerd's spelling, also the `srv_name`/`authz_name` of default decisions.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllUnauthenticated => "all-unauthenticated",
            Self::AllAuthenticated => "all-authenticated",
            Self::ClusterAuthenticated => "cluster-authenticated",
            Self::ClusterUnauthenticated => "cluster-unauthenticated",
            Self::Deny => "deny",
            Self::Audit => "audit",
        }
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a default policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown default policy {0:?}: expected all-unauthenticated, all-authenticated, \
     cluster-authenticated, cluster-unauthenticated, deny or audit"
)]
pub struct UnknownDefaultPolicy(pub String);

impl FromStr for DefaultPolicy {
    type Err = UnknownDefaultPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownDefaultPolicy(s.to_string()))
    }
}

/// The cluster networks when none are configured: Linkerd's `clusterNetworks` default
/// (`10.0.0.0/8`, `100.64.0.0/10`, `172.16.0.0/12`, `192.168.0.0/16`, `fd00::/8`) plus
/// loopback (`127.0.0.0/8`, `::1/128`), where a sidecar's local peers and Pylon's demo live.
pub fn default_cluster_networks() -> Vec<IpNet> {
    [
        IpNet::new_assert([10, 0, 0, 0].into(), 8),
        IpNet::new_assert([100, 64, 0, 0].into(), 10),
        IpNet::new_assert([172, 16, 0, 0].into(), 12),
        IpNet::new_assert([192, 168, 0, 0].into(), 16),
        IpNet::new_assert([0xfd00, 0, 0, 0, 0, 0, 0, 0].into(), 8),
        IpNet::new_assert([127, 0, 0, 0].into(), 8),
        IpNet::new_assert(std::net::Ipv6Addr::LOCALHOST.into(), 128),
    ]
    .into()
}

/// `serviceaccount.identity.pylon.<trust_domain>`: the suffix of Pylon's service-account
/// identities (Linkerd's meshes use `serviceaccount.identity.linkerd.cluster.local`; set
/// [`InboundConfig::identity_suffix`] to that to share them).
pub fn identity_suffix(trust_domain: &str) -> String {
    format!(
        "serviceaccount.identity.pylon.{}",
        trust_domain.trim_matches('.').to_ascii_lowercase()
    )
}

/// What the proxy knows about itself that the objects don't say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundConfig {
    /// For ports no Server selects. Default: [`DefaultPolicy::AllUnauthenticated`].
    pub default_policy: DefaultPolicy,
    /// The networks `cluster-*` policies trust. Default: [`default_cluster_networks`].
    pub cluster_networks: Vec<IpNet>,
    /// Service account `NAME` in `NS` has identity `NAME.NS.<identity_suffix>`. Default:
    /// [`identity_suffix`] of `cluster.local`.
    pub identity_suffix: String,
    /// Container port names of this workload, for Servers that name their port. They win
    /// over the names learned from Services selecting the workload (a named `targetPort`
    /// and the number its EndpointSlices give it).
    pub port_names: BTreeMap<String, u16>,
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self::with_trust_domain("cluster.local")
    }
}

impl InboundConfig {
    /// Defaults, with identities under `serviceaccount.identity.pylon.<trust_domain>`.
    pub fn with_trust_domain(trust_domain: &str) -> Self {
        Self {
            default_policy: DefaultPolicy::default(),
            cluster_networks: default_cluster_networks(),
            identity_suffix: identity_suffix(trust_domain),
            port_names: BTreeMap::new(),
        }
    }

    /// `NAME.NS.<identity_suffix>`.
    pub fn service_account_identity(&self, namespace: &str, name: &str) -> String {
        format!(
            "{name}.{namespace}.{}",
            self.identity_suffix.trim_matches('.')
        )
    }
}

/// The client of one connection or request, as the inbound proxy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientInfo<'a> {
    /// The peer address (IPv4-mapped IPv6 is taken as IPv4).
    pub peer: IpAddr,
    /// Whether the proxy terminated mesh TLS from this client.
    pub tls: bool,
    /// The client's verified identity, when `tls` (ignored otherwise). As in the
    /// certificate: identities are compared exactly, and Pylon lowercases configured ones.
    pub identity: Option<&'a str>,
}

impl<'a> ClientInfo<'a> {
    /// The identity that counts: only a TLS client is authenticated.
    fn authenticated(&self) -> Option<&'a str> {
        if self.tls {
            self.identity
        } else {
            None
        }
    }
}

/// The decision for one client, with the names Linkerd's inbound authorization metrics and
/// logs use (`inbound_http_authz_allow_total`, `inbound_http_authz_deny_total`,
/// `inbound_tcp_authz_allow_total`, `inbound_tcp_authz_deny_total`), so the proxy copies
/// them into labels as they are. Borrowed from the [`PortPolicy`]: nothing is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Authorization<'p> {
    pub allowed: bool,
    /// `policy.linkerd.io` for a Server, `""` for a default policy.
    pub srv_group: &'p str,
    /// `server`, or `default` when no Server selects the port.
    pub srv_kind: &'p str,
    /// The Server's name, or the default policy's (`all-unauthenticated`, ...).
    pub srv_name: &'p str,
    pub srv_port: u16,
    /// `""` for Pylon: there are no route objects, every request is on the default route.
    pub route_group: &'p str,
    /// `default`.
    pub route_kind: &'p str,
    /// `default`.
    pub route_name: &'p str,
    /// `policy.linkerd.io` for an AuthorizationPolicy, `""` for a default; `""` when denied
    /// (Linkerd's deny metrics carry no authz labels).
    pub authz_group: &'p str,
    /// `authorizationpolicy` or `default`; `""` when denied.
    pub authz_kind: &'p str,
    /// The AuthorizationPolicy's name or the default policy's; `""` when denied.
    pub authz_name: &'p str,
    /// The Server's `proxyProtocol` (`Unknown` for default ports): anything else means the
    /// proxy can skip protocol detection.
    pub protocol: ProxyProtocol,
}

impl Authorization<'_> {
    /// Allowed only by audit mode: Linkerd logs these at INFO with `authz.name=audit`.
    pub fn is_audit(&self) -> bool {
        self.allowed && self.authz_kind == DEFAULT_KIND && self.authz_name == "audit"
    }
}

const DEFAULT_KIND: &str = "default";
const SERVER_KIND: &str = "server";
const POLICY_KIND: &str = "authorizationpolicy";
const POLICY_GROUP: &str = "policy.linkerd.io";

/// Identities a requirement accepts, hashed once.
#[derive(Debug, Default, PartialEq, Eq)]
struct IdentitySet {
    /// `*`: any authenticated client.
    any: bool,
    exact: HashSet<Arc<str>>,
    /// `*.SUFFIX` as `.SUFFIX`, so a match needs at least one label before it.
    suffixes: Box<[Box<str>]>,
}

impl IdentitySet {
    fn any() -> Self {
        Self {
            any: true,
            ..Self::default()
        }
    }

    fn from_patterns<'s>(patterns: impl IntoIterator<Item = &'s str>) -> Self {
        let mut set = Self::default();
        let mut suffixes = Vec::new();
        for p in patterns {
            match p.strip_prefix('*') {
                Some("") => set.any = true,
                Some(suffix) => suffixes.push(suffix.into()),
                None => {
                    set.exact.insert(p.into());
                }
            }
        }
        set.suffixes = suffixes.into();
        set
    }

    fn matches(&self, id: &str) -> bool {
        self.any
            || self.exact.contains(id)
            || self
                .suffixes
                .iter()
                .any(|s| id.len() > s.len() && id.ends_with(&**s))
    }
}

/// One way in: every requirement must hold.
#[derive(Debug, PartialEq, Eq)]
struct Authz {
    group: Arc<str>,
    kind: Arc<str>,
    name: Arc<str>,
    /// Each entry is one required authentication's identities.
    identities: Box<[Arc<IdentitySet>]>,
    /// Each entry is one required authentication's networks (any of them).
    networks: Box<[Arc<[Network]>]>,
}

impl Authz {
    fn permits(&self, client: &ClientInfo<'_>, peer: IpAddr) -> bool {
        if !self
            .networks
            .iter()
            .all(|nets| nets.iter().any(|n| n.contains(peer)))
        {
            return false;
        }
        if self.identities.is_empty() {
            return true;
        }
        match client.authenticated() {
            Some(id) => self.identities.iter().all(|set| set.matches(id)),
            None => false,
        }
    }
}

/// What one Server (or the default) allows.
#[derive(Debug, PartialEq, Eq)]
struct ServerPolicy {
    group: Arc<str>,
    kind: Arc<str>,
    name: Arc<str>,
    protocol: ProxyProtocol,
    /// Tried in order: AuthorizationPolicies by name, then the access/default policy.
    authzs: Box<[Authz]>,
}

/// The policy of one port: cheap to clone (an `Arc` and the port), shared by every
/// connection to it.
#[derive(Clone, Debug)]
pub struct PortPolicy {
    port: u16,
    server: Arc<ServerPolicy>,
}

impl PortPolicy {
    /// Decides for one client: the first authorization it satisfies allows it, else it is
    /// denied. Allocates nothing.
    pub fn authorize(&self, client: &ClientInfo<'_>) -> Authorization<'_> {
        let peer = client.peer.to_canonical();
        let s = &*self.server;
        let allowed = s.authzs.iter().find(|a| a.permits(client, peer));
        let (authz_group, authz_kind, authz_name) = match allowed {
            Some(a) => (&*a.group, &*a.kind, &*a.name),
            None => ("", "", ""),
        };
        Authorization {
            allowed: allowed.is_some(),
            srv_group: &s.group,
            srv_kind: &s.kind,
            srv_name: &s.name,
            srv_port: self.port,
            route_group: "",
            route_kind: DEFAULT_KIND,
            route_name: DEFAULT_KIND,
            authz_group,
            authz_kind,
            authz_name,
            protocol: s.protocol,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Server's `proxyProtocol`; `Unknown` (detect) for default ports.
    pub fn protocol(&self) -> ProxyProtocol {
        self.server.protocol
    }

    /// The Server's name, or `None` when the default policy applies.
    pub fn server_name(&self) -> Option<&str> {
        (&*self.server.kind == SERVER_KIND).then_some(&*self.server.name)
    }
}

/// One workload's inbound policy for every port, built from one snapshot. Comparable, so
/// a config change that leaves it as it was can be told apart (decisions stay valid).
#[derive(Debug, PartialEq, Eq)]
pub struct InboundPolicy {
    ports: HashMap<u16, Arc<ServerPolicy>>,
    default: Arc<ServerPolicy>,
}

impl InboundPolicy {
    /// The policy of `port`: its Server's, or the default policy's.
    pub fn for_port(&self, port: u16) -> PortPolicy {
        PortPolicy {
            port,
            server: self.ports.get(&port).unwrap_or(&self.default).clone(),
        }
    }

    /// The ports Servers select, with the Server's name, in port order.
    pub fn server_ports(&self) -> Vec<(u16, &str)> {
        let mut ports: Vec<(u16, &str)> = self
            .ports
            .iter()
            .map(|(port, s)| (*port, &*s.name))
            .collect();
        ports.sort_unstable();
        ports
    }
}

/// A resolved requirement; `None` in the cache means "unresolvable".
#[derive(Clone, Debug)]
enum Requirement {
    Identities(Arc<IdentitySet>),
    Networks(Arc<[Network]>),
}

struct Builder<'a> {
    objects: &'a BTreeMap<ObjectKey, Arc<MeshObject>>,
    cfg: &'a InboundConfig,
    any_identity: Arc<IdentitySet>,
    cluster: Arc<[Network]>,
    resolved: HashMap<AuthenticationRef, Option<Requirement>>,
}

/// Compiles the policy of the workload `namespace`/`labels`. `learned_port_names` are the
/// workload's named ports found in Services (the config's own win).
pub(crate) fn build(
    objects: &BTreeMap<ObjectKey, Arc<MeshObject>>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    cfg: &InboundConfig,
    learned_port_names: &BTreeMap<String, u16>,
) -> InboundPolicy {
    let mut b = Builder {
        objects,
        cfg,
        any_identity: Arc::new(IdentitySet::any()),
        cluster: cfg
            .cluster_networks
            .iter()
            .map(|n| Network {
                cidr: n.trunc(),
                except: Vec::new(),
            })
            .collect(),
        resolved: HashMap::new(),
    };
    let policies: Vec<&AuthorizationPolicy> = objects
        .values()
        .filter_map(|o| match &**o {
            MeshObject::AuthorizationPolicy(p) if &*p.meta.namespace == namespace => Some(p),
            _ => None,
        })
        .collect();

    let mut ports: HashMap<u16, Arc<ServerPolicy>> = HashMap::new();
    // Key order: the first Server by name wins a port two of them select (Linkerd's admission
    // webhook forbids the overlap; its index takes whichever it sees first).
    for object in objects.values() {
        let MeshObject::Server(server) = &**object else {
            continue;
        };
        if &*server.meta.namespace != namespace || !server.pod_selector.matches(labels) {
            continue;
        }
        let port = match &server.port {
            ServerPort::Number(n) => *n,
            ServerPort::Name(name) => {
                match cfg
                    .port_names
                    .get(&**name)
                    .or_else(|| learned_port_names.get(&**name))
                {
                    Some(n) => *n,
                    None => {
                        // As Linkerd: a Server naming a port the workload lacks selects nothing.
                        tracing::debug!(server = %object.key(), port = %name, "named port unknown for this workload; Server skipped");
                        continue;
                    }
                }
            }
        };
        if let Some(first) = ports.get(&port) {
            tracing::debug!(port, using = %first.name, ignoring = %server.meta.name, "two Servers select the same port");
            continue;
        }
        let policy = b.server_policy(server, &policies);
        ports.insert(port, Arc::new(policy));
    }

    let default = Arc::new(ServerPolicy {
        group: "".into(),
        kind: DEFAULT_KIND.into(),
        name: cfg.default_policy.as_str().into(),
        protocol: ProxyProtocol::Unknown,
        authzs: b.default_authz(cfg.default_policy).into_iter().collect(),
    });
    InboundPolicy { ports, default }
}

impl Builder<'_> {
    fn server_policy(
        &mut self,
        server: &Server,
        policies: &[&AuthorizationPolicy],
    ) -> ServerPolicy {
        let mut authzs = Vec::new();
        for policy in policies {
            let applies = match &policy.target {
                PolicyTarget::Server(name) => *name == server.meta.name,
                PolicyTarget::Namespace => true,
            };
            if !applies {
                continue;
            }
            let mut identities = Vec::new();
            let mut networks = Vec::new();
            let mut complete = true;
            for r in &policy.required_authentications {
                match self.resolve(r) {
                    Some(Requirement::Identities(set)) => identities.push(set),
                    Some(Requirement::Networks(nets)) => networks.push(nets),
                    None => {
                        complete = false;
                        break;
                    }
                }
            }
            if !complete {
                // Fail closed: a requirement that can't be checked is never met.
                tracing::debug!(policy = %policy.meta.name, server = %server.meta.name, "AuthorizationPolicy has an unresolved authentication; it authorizes nobody");
                continue;
            }
            authzs.push(Authz {
                group: POLICY_GROUP.into(),
                kind: POLICY_KIND.into(),
                name: policy.meta.name.clone(),
                identities: identities.into(),
                networks: networks.into(),
            });
        }
        authzs.extend(self.default_authz(server.access_policy));
        ServerPolicy {
            group: POLICY_GROUP.into(),
            kind: SERVER_KIND.into(),
            name: server.meta.name.clone(),
            protocol: server.proxy_protocol,
            authzs: authzs.into(),
        }
    }

    /// Linkerd's `DefaultPolicy::default_authzs`: `authenticated_only` requires any identity,
    /// `cluster_only` the cluster networks; `deny` admits nobody.
    fn default_authz(&self, policy: DefaultPolicy) -> Option<Authz> {
        let (authenticated, cluster) = match policy {
            DefaultPolicy::AllUnauthenticated | DefaultPolicy::Audit => (false, false),
            DefaultPolicy::AllAuthenticated => (true, false),
            DefaultPolicy::ClusterAuthenticated => (true, true),
            DefaultPolicy::ClusterUnauthenticated => (false, true),
            DefaultPolicy::Deny => return None,
        };
        Some(Authz {
            group: "".into(),
            kind: DEFAULT_KIND.into(),
            name: policy.as_str().into(),
            identities: if authenticated {
                Box::new([self.any_identity.clone()])
            } else {
                Box::new([])
            },
            networks: if cluster {
                Box::new([self.cluster.clone()])
            } else {
                Box::new([])
            },
        })
    }

    fn resolve(&mut self, r: &AuthenticationRef) -> Option<Requirement> {
        if let Some(done) = self.resolved.get(r) {
            return done.clone();
        }
        let found = match r.kind {
            AuthenticationKind::ServiceAccount => {
                let id = self.cfg.service_account_identity(&r.namespace, &r.name);
                Some(Requirement::Identities(Arc::new(
                    IdentitySet::from_patterns([id.as_str()]),
                )))
            }
            AuthenticationKind::MeshTls => {
                match self.object(ObjectKind::MeshTlsAuthentication, r) {
                    Some(MeshObject::MeshTlsAuthentication(a)) => {
                        let suffix = self.cfg.identity_suffix.trim_matches('.');
                        let from_refs: Vec<String> = a
                            .identity_refs
                            .iter()
                            .map(|i| match i {
                                IdentityRef::ServiceAccount { namespace, name } => {
                                    self.cfg.service_account_identity(namespace, name)
                                }
                                IdentityRef::Namespace(ns) => format!("*.{ns}.{suffix}"),
                            })
                            .collect();
                        let patterns = a
                            .identities
                            .iter()
                            .map(|i| &**i)
                            .chain(from_refs.iter().map(String::as_str));
                        Some(Requirement::Identities(Arc::new(
                            IdentitySet::from_patterns(patterns),
                        )))
                    }
                    _ => None,
                }
            }
            AuthenticationKind::Network => {
                match self.object(ObjectKind::NetworkAuthentication, r) {
                    Some(MeshObject::NetworkAuthentication(a)) => {
                        Some(Requirement::Networks(a.networks.clone().into()))
                    }
                    _ => None,
                }
            }
        };
        self.resolved.insert(r.clone(), found.clone());
        found
    }

    fn object(&self, kind: ObjectKind, r: &AuthenticationRef) -> Option<&MeshObject> {
        let key = ObjectKey {
            kind,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        };
        self.objects.get(&key).map(|o| &**o)
    }
}

#[cfg(test)]
mod policy_tests;
#[cfg(feature = "proto")]
mod proto;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policies_parse_and_display_as_linkerd_spells_them() {
        for p in DefaultPolicy::ALL {
            assert_eq!(p.to_string().parse::<DefaultPolicy>(), Ok(p));
        }
        assert_eq!(DefaultPolicy::default(), DefaultPolicy::AllUnauthenticated);
        let err = "allow-all".parse::<DefaultPolicy>().expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown default policy \"allow-all\": expected all-unauthenticated, \
             all-authenticated, cluster-authenticated, cluster-unauthenticated, deny or audit"
        );
        assert!("Deny".parse::<DefaultPolicy>().is_err(), "exact spelling");
    }

    #[test]
    fn identity_sets_match_exactly_or_by_suffix() {
        let set = IdentitySet::from_patterns([
            "web.shop.serviceaccount.identity.pylon.cluster.local",
            "*.ops.serviceaccount.identity.pylon.cluster.local",
        ]);
        assert!(set.matches("web.shop.serviceaccount.identity.pylon.cluster.local"));
        assert!(set.matches("a.ops.serviceaccount.identity.pylon.cluster.local"));
        assert!(!set.matches("ops.serviceaccount.identity.pylon.cluster.local"));
        assert!(!set.matches("api.shop.serviceaccount.identity.pylon.cluster.local"));
        assert!(!set.matches("xops.serviceaccount.identity.pylon.cluster.local"));
        assert!(IdentitySet::from_patterns(["*"]).matches("anything"));
    }

    #[test]
    fn identities_follow_the_configured_suffix() {
        let cfg = InboundConfig::with_trust_domain("Corp.Example.");
        assert_eq!(
            cfg.service_account_identity("shop", "web"),
            "web.shop.serviceaccount.identity.pylon.corp.example"
        );
        let linkerd = InboundConfig {
            identity_suffix: "serviceaccount.identity.linkerd.cluster.local".into(),
            ..InboundConfig::default()
        };
        assert_eq!(
            linkerd.service_account_identity("shop", "web"),
            "web.shop.serviceaccount.identity.linkerd.cluster.local"
        );
    }
}
