//! Pylon's mesh objects and the watched Store: the proxy's one source of truth about the
//! mesh.
//!
//! This crate owns the Kubernetes-shaped objects (`v1 Service`, `discovery.k8s.io/v1
//! EndpointSlice`, `linkerd.io/v1alpha2 ServiceProfile`, SMI `TrafficSplit` `v1alpha1`-`v1alpha4`,
//! and Linkerd's authorization objects: `policy.linkerd.io` `Server` `v1alpha1`-`v1beta3`,
//! `AuthorizationPolicy`, `MeshTLSAuthentication` and `NetworkAuthentication` `v1alpha1`), their
//! parsing from YAML/JSON files, their validation (every problem names file, object and
//! field), and the [`Store`], which keeps the last good version of each object, is fed by one
//! of two sources (a watched config directory, or the changes `pylon-controller` sees on the
//! Kubernetes API, [`Store::apply_api_changes`], under the same rules), and publishes
//! immutable [`Snapshot`]s that the data path reads without locks. A snapshot also lists what was rejected ([`Snapshot::errors`]), fields that
//! were ignored and references that lead nowhere ([`Snapshot::warnings`]) and the file each
//! object came from, which is all an audit such as `pylon check` needs to report problems
//! without parsing anything itself.
//!
//! The authorization objects become an [`InboundPolicy`] for one workload (its namespace and
//! labels) with [`Snapshot::inbound_policy`]: per port, the Server's authorizations compiled
//! once (identities hashed, networks parsed, references resolved, unresolvable ones failing
//! closed), or the workload's [`DefaultPolicy`]. [`PortPolicy::authorize`] decides a
//! [`ClientInfo`] without allocating and returns the names Linkerd's authorization metrics
//! use (`srv_kind`, `srv_name`, `authz_kind`, `authz_name`, ...). See [`inbound`] for the
//! Linkerd semantics followed. An EndpointSlice annotated [`IDENTITY_ANNOTATION`] gives its
//! endpoints the TLS identity their proxies serve ([`Endpoint::identity`]).
//!
//! ServiceProfiles become [`RouteTable`]s, the internal route model in [`route`], which
//! does not mirror the ServiceProfile shape (Gateway API `HTTPRoute` will map onto it too).
//! A table is built once per object version (regexes compiled then) and found with
//! [`Snapshot::route_table`]; [`RouteTable::route_for`] picks the first matching route or
//! the default one, and [`Route::classify`] decides whether a response is a failure, both
//! without allocating.
//!
//! With the `proto` feature, [`proto`] converts routes and a port's policy to and from
//! Linkerd's proxy API, both ways, for the controller and for a proxy fed by a controller.
//! `v1 Pod` and `v1 Namespace` say what endpoints are (workload, ServiceAccount, meshed) for
//! the controller's answers, and [`coverage`] compares each Service's endpoints with the Pods
//! its selector picks ([`Snapshot::endpoint_coverage`]: a ready pod left out, an address no
//! pod has), the one computation `pylon check`, `pylon stat` and the `endpoints_*` gauges use.
//!
//! It must not know about sockets, HTTP or metrics: it answers "which service and which
//! endpoints does this name or cluster IP mean", "which route is this request on" and "may
//! this client connect to this port", and the proxy does the rest.

pub mod coverage;
pub mod duration;
pub mod inbound;
mod objects;
#[cfg(feature = "proto")]
pub mod proto;
pub mod route;
mod snapshot;
mod store;
#[cfg(test)]
mod test_support;

pub use crate::coverage::{EndpointCoverage, PodCoverage, UnknownAddress};
pub use crate::inbound::{
    default_cluster_networks, identity_suffix, Authorization, ClientInfo, DefaultPolicy,
    InboundConfig, InboundPolicy, PortPolicy, UnknownDefaultPolicy,
};
pub use crate::objects::{
    is_dns1123_subdomain, parse_pod, AddressType, AuthenticationKind, AuthenticationRef,
    AuthorizationPolicy, Endpoint, EndpointPort, EndpointSlice, IdentityRef, LabelSelector,
    LabelSelectorRequirement, MeshObject, MeshTlsAuthentication, Namespace, Network,
    NetworkAuthentication, ObjectKey, ObjectKind, ObjectMeta, OwnerRef, Pod, PolicyTarget,
    Protocol, ProxyProtocol, ResolvedService, SelectorOperator, Server, ServerPort, Service,
    ServicePort, ServiceProfile, ServiceRef, SliceEndpoint, SplitBackend, TargetPort, TrafficSplit,
    Workload, WorkloadKind, IDENTITY_ANNOTATION, PROXY_CONTAINER_NAMES, SERVICE_NAME_LABEL,
};
pub use crate::route::{
    PathRegex, RequestMatcher, ResponseClass, ResponseMatcher, RetryBudgetSpec, Route, RouteTable,
    WeightedAuthority, DEFAULT_ROUTE_NAME,
};
pub use crate::store::{
    is_config_file_name, ApiChange, ApiObject, ConfigError, Snapshot, Store, StoreConfig,
    StoreError, WatchHandle,
};
/// CIDRs, as [`InboundConfig::cluster_networks`] and [`Network`] hold them.
pub use ipnet::IpNet;
