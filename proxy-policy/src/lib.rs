//! Pylon's mesh objects and the watched Store: the proxy's one source of truth about the
//! mesh.
//!
//! This crate owns the Kubernetes-shaped objects (`v1 Service`, `discovery.k8s.io/v1
//! EndpointSlice`, with more kinds to come), their parsing from YAML/JSON files, their
//! validation (every problem names file, object and field), and the [`Store`], which
//! keeps the last good version of each object, watches the config directory, and
//! publishes immutable [`Snapshot`]s that the data path reads without locks.
//!
//! It must not know about sockets, HTTP or metrics: it answers "which service and which
//! endpoints does this name or cluster IP mean", and the proxy does the rest.

pub mod duration;
mod objects;
mod snapshot;
mod store;
#[cfg(test)]
mod test_support;

pub use crate::objects::{
    AddressType, Endpoint, EndpointPort, EndpointSlice, MeshObject, ObjectKey, ObjectKind,
    ObjectMeta, Protocol, ResolvedService, Service, ServicePort, ServiceRef, SliceEndpoint,
    TargetPort, SERVICE_NAME_LABEL,
};
pub use crate::store::{ConfigError, Snapshot, Store, StoreConfig, StoreError, WatchHandle};
