//! How the logs name an endpoint, as an operator does. Every log line about an endpoint has its
//! address as `endpoint` (`10.0.0.5:8080`) and, when discovery knows them (a config-dir Pod
//! behind the EndpointSlice, or the control plane's metric labels), `endpoint_pod`
//! (`web-7c9f-x2`), `endpoint_workload` (`deployment/web`, the form `pylon stat` takes) and
//! `endpoint_namespace`; `destination` is the service it was discovered for. Fields discovery
//! doesn't know are left out of the line, never logged empty or as `None`.
//!
//! The names are worked out once per endpoint, when discovery makes it, and shared by its
//! connections and targets: nothing is looked up per request.

use std::sync::{Arc, OnceLock};

use pylon_proxy_metrics::DstLabels;

/// Discovery's names for one endpoint (all absent for an endpoint it knows only by address).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointNames {
    destination: Option<Arc<str>>,
    pod: Option<Arc<str>>,
    workload: Option<Arc<str>>,
    namespace: Option<Arc<str>>,
}

/// Workload kinds as the control plane and config-dir Pods label them, the owner that names a
/// workload first (a Deployment's pods also carry their ReplicaSet's hash).
const WORKLOAD_KINDS: &[&str] = &[
    "deployment",
    "statefulset",
    "daemonset",
    "cronjob",
    "job",
    "replicationcontroller",
    "replicaset",
];

impl EndpointNames {
    /// An endpoint discovery knows only by its address.
    pub fn unknown() -> Arc<Self> {
        static UNKNOWN: OnceLock<Arc<EndpointNames>> = OnceLock::new();
        UNKNOWN.get_or_init(Arc::default).clone()
    }

    /// The names in an endpoint's `dst_*` labels (`pod`, `deployment`, `namespace`, ...), for
    /// an endpoint of `destination` (a service in `namespace`, when it is one).
    pub fn new(
        destination: &Arc<str>,
        labels: Option<&DstLabels>,
        namespace: Option<&Arc<str>>,
    ) -> Arc<Self> {
        let label = |name: &str| {
            labels.and_then(|l| {
                l.iter()
                    .find(|(k, v)| &**k == name && !v.is_empty())
                    .map(|(_, v)| v.clone())
            })
        };
        let pod = label("pod");
        let workload = WORKLOAD_KINDS
            .iter()
            .find_map(|kind| label(kind).map(|name| Arc::from(format!("{kind}/{name}"))));
        // A namespace only says something next to a pod or workload.
        let namespace = (pod.is_some() || workload.is_some())
            .then(|| label("namespace").or_else(|| namespace.cloned()))
            .flatten();
        Arc::new(Self {
            destination: Some(destination.clone()),
            pod,
            workload,
            namespace,
        })
    }

    pub fn destination(&self) -> Option<&str> {
        self.destination.as_deref()
    }

    pub fn pod(&self) -> Option<&str> {
        self.pod.as_deref()
    }

    pub fn workload(&self) -> Option<&str> {
        self.workload.as_deref()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }
}

/// A map keyed by the authority a client wrote (`Host`, `:authority`), looked up on every
/// request: hashed with foldhash (seeded per process) rather than SipHash, whose cost per
/// lookup was ~1% of a hop. Both maps are bounded, so a client choosing keys can't make one
/// grow its chains far.
pub type AuthorityMap<V> = std::collections::HashMap<Box<[u8]>, V, foldhash::fast::RandomState>;

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> DstLabels {
        pairs
            .iter()
            .map(|(k, v)| (Arc::from(*k), Arc::from(*v)))
            .collect()
    }

    #[test]
    fn pods_and_workloads_come_from_the_labels() {
        let dst: Arc<str> = "web.default.svc.cluster.local:80".into();
        let ns: Arc<str> = "default".into();
        let l = labels(&[
            ("pod", "web-7c9f-x2"),
            ("pod_template_hash", "7c9f"),
            ("replicaset", "web-7c9f"),
            ("deployment", "web"),
            ("serviceaccount", "web"),
        ]);
        let names = EndpointNames::new(&dst, Some(&l), Some(&ns));
        assert_eq!(names.pod(), Some("web-7c9f-x2"));
        assert_eq!(names.workload(), Some("deployment/web"));
        assert_eq!(names.namespace(), Some("default"));
        assert_eq!(
            names.destination(),
            Some("web.default.svc.cluster.local:80")
        );

        // The control plane's own namespace label wins.
        let l = labels(&[
            ("pod", "db-0"),
            ("statefulset", "db"),
            ("namespace", "data"),
        ]);
        let names = EndpointNames::new(&dst, Some(&l), Some(&ns));
        assert_eq!(names.workload(), Some("statefulset/db"));
        assert_eq!(names.namespace(), Some("data"));
    }

    #[test]
    fn an_address_only_endpoint_has_no_names() {
        let dst: Arc<str> = "example.com:80".into();
        let names = EndpointNames::new(&dst, None, None);
        assert_eq!(
            (names.pod(), names.workload(), names.namespace()),
            (None, None, None)
        );
        assert_eq!(names.destination(), Some("example.com:80"));
        assert_eq!(EndpointNames::unknown().destination(), None);
    }
}
