//! Pylon's mesh objects and the watched Store: the proxy's one source of truth about the
//! mesh.
//!
//! This crate owns the Kubernetes-shaped objects (`v1 Service`, `discovery.k8s.io/v1
//! EndpointSlice`, `linkerd.io/v1alpha2 ServiceProfile`, SMI `TrafficSplit` `v1alpha1`-`v1alpha4`,
//! with more kinds to come), their
//! parsing from YAML/JSON files, their validation (every problem names file, object and
//! field), and the [`Store`], which keeps the last good version of each object, watches
//! the config directory, and publishes immutable [`Snapshot`]s that the data path reads
//! without locks. A snapshot also lists what was rejected ([`Snapshot::errors`]), fields that
//! were ignored ([`Snapshot::warnings`]) and the file each object came from, which is all an
//! audit such as `pylon check` needs to report problems without parsing anything itself.
//!
//! ServiceProfiles become [`RouteTable`]s, the internal route model in [`route`], which
//! does not mirror the ServiceProfile shape (Gateway API `HTTPRoute` will map onto it too).
//! A table is built once per object version (regexes compiled then) and found with
//! [`Snapshot::route_table`]; [`RouteTable::route_for`] picks the first matching route or
//! the default one, and [`Route::classify`] decides whether a response is a failure, both
//! without allocating.
//!
//! It must not know about sockets, HTTP or metrics: it answers "which service and which
//! endpoints does this name or cluster IP mean" and "which route is this request on", and
//! the proxy does the rest.

pub mod duration;
mod objects;
pub mod route;
mod snapshot;
mod store;
#[cfg(test)]
mod test_support;

pub use crate::objects::{
    AddressType, Endpoint, EndpointPort, EndpointSlice, MeshObject, ObjectKey, ObjectKind,
    ObjectMeta, Protocol, ResolvedService, Service, ServicePort, ServiceProfile, ServiceRef,
    SliceEndpoint, SplitBackend, TargetPort, TrafficSplit, SERVICE_NAME_LABEL,
};
pub use crate::route::{
    PathRegex, RequestMatcher, ResponseClass, ResponseMatcher, RetryBudgetSpec, Route, RouteTable,
    WeightedAuthority, DEFAULT_ROUTE_NAME,
};
pub use crate::store::{ConfigError, Snapshot, Store, StoreConfig, StoreError, WatchHandle};
