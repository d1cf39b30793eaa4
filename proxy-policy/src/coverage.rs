//! Endpoint coverage: a Service's endpoints compared with the Pods its selector picks.
//!
//! The story's "2 of 3 pods" incident is a ready Pod that the Service selects but that its
//! EndpointSlices leave out (stale, hand-written, or an endpoint controller that is behind):
//! the proxies balance over the other pods and send it nothing, and nothing else says so. The
//! opposite, an endpoint address no Pod has, sends requests to nowhere. This module computes
//! both, once, as one typed [`EndpointCoverage`] per Service; `pylon check`, `pylon stat`, the
//! proxy's and the controller's `endpoints_*` gauges all render it.
//!
//! The rules, as Kubernetes' EndpointSlice controller would apply them:
//! - a Pod is *expected* in its Services' endpoints when the selector picks it, it is ready
//!   (`Running`, `Ready=True`), not terminating (a `deletionTimestamp`: Kubernetes marks it
//!   not ready in the slices before its `Ready` condition changes) and has an IP;
//! - the endpoints compared are those the proxy itself sends to ([`Snapshot::service_endpoints`]:
//!   ready ones, or serving terminating ones when none is ready), on any of the Service's ports;
//! - an endpoint is a Pod's when its `targetRef` names the Pod and its address is one of the
//!   Pod's IPs, or, without a `targetRef`, when its address is one of the Pod's IPs. A
//!   `targetRef` is what tells pods sharing an address apart (a loopback mesh), and what shows
//!   a slice that kept a recreated pod's old address.
//!
//! A Service without a selector (endpoints managed by hand) and a namespace without Pods (a
//! hand-written config dir) have nothing to compare: no coverage at all, rather than one that
//! says every endpoint is unknown.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::objects::{Pod, Service, ServiceRef, Workload};
use crate::snapshot::Snapshot;

/// One Service's endpoints against the pods its selector picks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointCoverage {
    pub service: ServiceRef,
    /// Pods the selector picks, in any state.
    pub selected_pods: usize,
    /// The pods expected in the endpoints (selected, ready, not terminating, with an IP), by
    /// name, each with whether it is there.
    pub ready_pods: Vec<PodCoverage>,
    /// Endpoint addresses the proxy sends to that are no Pod's, by address.
    pub unknown_addresses: Vec<UnknownAddress>,
    /// The Service's EndpointSlices, by name.
    pub slices: Vec<Arc<str>>,
}

/// A ready pod a Service selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCoverage {
    pub name: Arc<str>,
    /// Its first IP.
    pub ip: IpAddr,
    pub workload: Workload,
    /// One of the endpoints the proxy sends the Service's traffic to.
    pub in_endpoints: bool,
    /// When it is not: the EndpointSlice that lists it anyway, as not ready.
    pub listed_not_ready_in: Option<Arc<str>>,
}

impl fmt::Display for PodCoverage {
    /// `web-7c9f5-x2 (10.0.0.7)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.ip)
    }
}

/// An endpoint address no Pod has.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnknownAddress {
    pub ip: IpAddr,
    /// The pod its `targetRef` names (which does not exist, or no longer has the address).
    pub pod: Option<Arc<str>>,
    /// The first EndpointSlice (by name) that lists it.
    pub slice: Option<Arc<str>>,
}

impl fmt::Display for UnknownAddress {
    /// `10.0.0.9`, or `10.0.0.9 (pod web-x)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pod {
            Some(pod) => write!(f, "{} (pod {pod})", self.ip),
            None => write!(f, "{}", self.ip),
        }
    }
}

impl EndpointCoverage {
    /// The ready pods missing from the endpoints.
    pub fn missing(&self) -> impl Iterator<Item = &PodCoverage> + '_ {
        self.ready_pods.iter().filter(|p| !p.in_endpoints)
    }

    pub fn ready_count(&self) -> usize {
        self.ready_pods.len()
    }

    pub fn missing_count(&self) -> usize {
        self.missing().count()
    }

    /// Ready pods that are in the endpoints.
    pub fn covered_count(&self) -> usize {
        self.ready_count() - self.missing_count()
    }

    /// The selector picks no pod at all: the Service has no workload behind it.
    pub fn selects_no_pod(&self) -> bool {
        self.selected_pods == 0
    }

    /// Some ready pod is missing, or some endpoint is no pod's.
    pub fn is_stale(&self) -> bool {
        self.missing().next().is_some() || !self.unknown_addresses.is_empty()
    }

    /// Whether any of the ready pods is `workload`'s.
    pub fn covers_workload(&self, workload: &Workload) -> bool {
        self.ready_pods.iter().any(|p| p.workload == *workload)
    }
}

/// What a namespace's pods are, for comparing endpoints with: built once per namespace.
struct NamespacePods<'a> {
    pods: Vec<&'a Pod>,
    by_name: HashMap<&'a str, &'a Pod>,
    ips: HashSet<IpAddr>,
}

impl<'a> NamespacePods<'a> {
    fn of(snapshot: &'a Snapshot, namespace: &str) -> Option<Self> {
        let mut pods: Vec<&Pod> = snapshot.pods_in(namespace).collect();
        if pods.is_empty() {
            return None;
        }
        pods.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        Some(Self {
            by_name: pods.iter().map(|p| (&*p.meta.name, *p)).collect(),
            ips: pods.iter().flat_map(|p| p.ips.iter().copied()).collect(),
            pods,
        })
    }

    /// Whether an endpoint at `ip`, naming `target` (its `targetRef`), is some pod's.
    fn has(&self, ip: IpAddr, target: Option<&str>) -> bool {
        match target {
            Some(name) => self.by_name.get(name).is_some_and(|p| p.ips.contains(&ip)),
            None => self.ips.contains(&ip),
        }
    }
}

/// Whether an endpoint at `ip` naming `target` is `pod`.
fn is_pod(ip: IpAddr, target: Option<&str>, pod: &Pod) -> bool {
    pod.ips.contains(&ip) && target.is_none_or(|name| *name == *pod.meta.name)
}

fn coverage(snapshot: &Snapshot, service: &Service, pods: &NamespacePods<'_>) -> EndpointCoverage {
    let svc = service.service_ref();
    let selected: Vec<&Pod> = pods
        .pods
        .iter()
        .copied()
        .filter(|p| {
            service
                .selector
                .iter()
                .all(|(k, v)| p.meta.labels.get(k) == Some(v))
        })
        .collect();
    // Address -> the targetRefs the proxy's endpoints at it carry.
    let mut endpoints: HashMap<IpAddr, Vec<Option<&str>>> = HashMap::new();
    for e in snapshot.service_endpoints(&svc) {
        let targets = endpoints.entry(e.addr.ip()).or_default();
        let target = e.pod.as_deref();
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    let slices: Vec<_> = snapshot.endpoint_slices(&svc).collect();
    let ready_pods = selected
        .iter()
        .filter(|p| p.ready && !p.terminating)
        .filter_map(|p| {
            let ip = *p.ips.first()?;
            let in_endpoints = p.ips.iter().any(|ip| {
                endpoints
                    .get(ip)
                    .is_some_and(|ts| ts.iter().any(|t| is_pod(*ip, *t, p)))
            });
            let listed_not_ready_in = if in_endpoints {
                None
            } else {
                slices
                    .iter()
                    .find(|s| {
                        s.endpoints
                            .iter()
                            .any(|e| e.address.is_some_and(|ip| is_pod(ip, e.pod.as_deref(), p)))
                    })
                    .map(|s| s.meta.name.clone())
            };
            Some(PodCoverage {
                name: p.meta.name.clone(),
                ip,
                workload: p.workload(),
                in_endpoints,
                listed_not_ready_in,
            })
        })
        .collect();
    let mut unknown_addresses: Vec<UnknownAddress> = endpoints
        .iter()
        .flat_map(|(ip, targets)| targets.iter().map(move |t| (*ip, *t)))
        .filter(|(ip, target)| !pods.has(*ip, *target))
        .map(|(ip, target)| UnknownAddress {
            ip,
            pod: target.map(Arc::from),
            slice: slices
                .iter()
                .find(|s| {
                    s.endpoints
                        .iter()
                        .any(|e| e.address == Some(ip) && e.pod.as_deref() == target)
                })
                .map(|s| s.meta.name.clone()),
        })
        .collect();
    unknown_addresses.sort();
    EndpointCoverage {
        service: svc,
        selected_pods: selected.len(),
        ready_pods,
        unknown_addresses,
        slices: slices.iter().map(|s| s.meta.name.clone()).collect(),
    }
}

impl Snapshot {
    /// The coverage of one Service's endpoints; `None` when there is nothing to compare (no
    /// such Service, no selector, or no Pods in its namespace).
    pub fn endpoint_coverage(&self, svc: &ServiceRef) -> Option<EndpointCoverage> {
        let service = self.service(svc).filter(|s| !s.selector.is_empty())?;
        let pods = NamespacePods::of(self, &svc.namespace)?;
        Some(coverage(self, service, &pods))
    }

    /// The coverage of every Service that has one (see [`Snapshot::endpoint_coverage`]), by
    /// namespace and name. Each namespace's pods are indexed once.
    pub fn endpoint_coverages(&self) -> Vec<EndpointCoverage> {
        let mut services: Vec<&Service> =
            self.services().filter(|s| !s.selector.is_empty()).collect();
        services.sort_by(|a, b| {
            (&a.meta.namespace, &a.meta.name).cmp(&(&b.meta.namespace, &b.meta.name))
        });
        let mut out = Vec::with_capacity(services.len());
        let mut current: Option<(&str, Option<NamespacePods<'_>>)> = None;
        for service in services {
            let ns = &*service.meta.namespace;
            if current.as_ref().is_none_or(|(have, _)| *have != ns) {
                current = Some((ns, NamespacePods::of(self, ns)));
            }
            if let Some((_, Some(pods))) = &current {
                out.push(coverage(self, service, pods));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{endpoint, load, web_slice};
    use crate::{StoreConfig, WorkloadKind};

    /// `shop/web`, selecting `app: web`, one port whose slices say 8080.
    const WEB: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
";

    /// A pod of deployment `web` (ReplicaSet `web-7c9f5`).
    fn pod(name: &str, ip: &str, ready: bool) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  \
             labels: {{app: web, pod-template-hash: 7c9f5}}\n  \
             ownerReferences: [{{kind: ReplicaSet, name: web-7c9f5, controller: true}}]\n\
             spec: {{containers: [{{name: app}}]}}\n\
             status: {{phase: Running, podIP: \"{ip}\", conditions: [{{type: Ready, status: \"{}\"}}]}}\n",
            if ready { "True" } else { "False" }
        )
    }

    /// An endpoint with no targetRef.
    fn bare(ip: &str) -> String {
        format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n")
    }

    fn coverage_of(files: &[(&str, &str)]) -> Option<EndpointCoverage> {
        let (_dir, store) = load(files, StoreConfig::default());
        let snap = store.snapshot();
        assert!(snap.errors().is_empty(), "{:?}", snap.errors());
        let web = ServiceRef {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let one = snap.endpoint_coverage(&web);
        let all = snap.endpoint_coverages();
        assert_eq!(all.iter().find(|c| c.service == web), one.as_ref());
        one
    }

    fn names<'a>(pods: impl Iterator<Item = &'a PodCoverage>) -> Vec<String> {
        pods.map(|p| p.to_string()).collect()
    }

    #[test]
    fn a_ready_pod_missing_from_the_slice_is_named_with_its_workload() {
        let slice = web_slice(
            "web-abc",
            &(endpoint("10.0.0.1", "web-7c9f5-a") + &endpoint("10.0.0.2", "web-7c9f5-b")),
        );
        let cov = coverage_of(&[
            ("web.yaml", WEB),
            ("slice.yaml", &slice),
            ("a.yaml", &pod("web-7c9f5-a", "10.0.0.1", true)),
            ("b.yaml", &pod("web-7c9f5-b", "10.0.0.2", true)),
            ("c.yaml", &pod("web-7c9f5-c", "10.0.0.3", true)),
        ])
        .expect("coverage");
        assert_eq!((cov.ready_count(), cov.covered_count()), (3, 2));
        assert_eq!(names(cov.missing()), ["web-7c9f5-c (10.0.0.3)"]);
        let missing = cov.missing().next().expect("one");
        assert_eq!(missing.workload.to_string(), "deployment/web");
        assert_eq!(missing.listed_not_ready_in, None);
        assert_eq!(cov.slices, [Arc::from("web-abc")]);
        assert!(cov.is_stale());
        assert!(cov.unknown_addresses.is_empty());
        assert!(cov.covers_workload(&Workload {
            kind: WorkloadKind::Deployment,
            name: "web".into(),
        }));
    }

    #[test]
    fn an_address_no_pod_has_is_unknown() {
        // 10.0.0.9 is nobody's; web-gone's targetRef names no pod; web-7c9f5-a's endpoint
        // keeps an address the pod no longer has (it is at .1 now).
        let slice = web_slice(
            "web-abc",
            &(endpoint("10.0.0.1", "web-7c9f5-a")
                + &bare("10.0.0.9")
                + &endpoint("10.0.0.8", "web-gone")
                + &endpoint("10.0.0.7", "web-7c9f5-a")),
        );
        let cov = coverage_of(&[
            ("web.yaml", WEB),
            ("slice.yaml", &slice),
            ("a.yaml", &pod("web-7c9f5-a", "10.0.0.1", true)),
        ])
        .expect("coverage");
        assert_eq!((cov.ready_count(), cov.missing_count()), (1, 0));
        let unknown: Vec<String> = cov
            .unknown_addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            unknown,
            [
                "10.0.0.7 (pod web-7c9f5-a)",
                "10.0.0.8 (pod web-gone)",
                "10.0.0.9"
            ]
        );
        assert!(cov
            .unknown_addresses
            .iter()
            .all(|u| u.slice.as_deref() == Some("web-abc")));
        assert!(cov.is_stale());
    }

    #[test]
    fn a_selector_that_picks_no_pod_and_sources_without_pods() {
        let slice = web_slice("web-abc", &endpoint("10.0.0.1", "api-0"));
        let api = pod("api-0", "10.0.0.1", true).replace("app: web", "app: api");
        let cov = coverage_of(&[
            ("web.yaml", WEB),
            ("slice.yaml", &slice),
            ("api.yaml", &api),
        ])
        .expect("coverage");
        assert!(cov.selects_no_pod());
        assert_eq!(cov.ready_count(), 0);
        // api-0 has the address: not unknown, but not web's either.
        assert!(cov.unknown_addresses.is_empty());

        // No Pods in the namespace (a hand-written dir): nothing to compare.
        assert_eq!(
            coverage_of(&[("web.yaml", WEB), ("slice.yaml", &slice)]),
            None
        );
        // No selector (endpoints managed by hand): nothing to compare.
        let manual = WEB.replace("  selector: {app: web}\n", "");
        assert_eq!(
            coverage_of(&[
                ("web.yaml", &manual),
                ("slice.yaml", &slice),
                ("api.yaml", &api)
            ]),
            None
        );
    }

    #[test]
    fn pods_that_are_not_ready_are_not_expected() {
        // web-b is not ready, and its slice says so too: nothing is wrong.
        let slice = web_slice(
            "web-abc",
            &(endpoint("10.0.0.1", "web-7c9f5-a")
                + "- addresses: [\"10.0.0.2\"]\n  conditions: {ready: false}\n  \
                   targetRef: {kind: Pod, name: web-7c9f5-b}\n"),
        );
        let pending = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-7c9f5-p\n  namespace: shop\n  \
                       labels: {app: web}\nspec: {containers: [{name: app}]}\nstatus: {phase: Pending}\n";
        let cov = coverage_of(&[
            ("web.yaml", WEB),
            ("slice.yaml", &slice),
            ("a.yaml", &pod("web-7c9f5-a", "10.0.0.1", true)),
            ("b.yaml", &pod("web-7c9f5-b", "10.0.0.2", false)),
            ("p.yaml", pending),
        ])
        .expect("coverage");
        assert_eq!(cov.selected_pods, 3);
        assert_eq!(names(cov.ready_pods.iter()), ["web-7c9f5-a (10.0.0.1)"]);
        assert!(!cov.is_stale());
    }

    #[test]
    fn a_ready_pod_the_slice_lists_as_not_ready_says_where() {
        let slice = web_slice(
            "web-abc",
            &(endpoint("10.0.0.1", "web-7c9f5-a")
                + "- addresses: [\"10.0.0.2\"]\n  conditions: {ready: false}\n  \
                   targetRef: {kind: Pod, name: web-7c9f5-b}\n"),
        );
        let cov = coverage_of(&[
            ("web.yaml", WEB),
            ("slice.yaml", &slice),
            ("a.yaml", &pod("web-7c9f5-a", "10.0.0.1", true)),
            ("b.yaml", &pod("web-7c9f5-b", "10.0.0.2", true)),
        ])
        .expect("coverage");
        let missing: Vec<_> = cov.missing().collect();
        assert_eq!(missing.len(), 1);
        assert_eq!(&*missing[0].name, "web-7c9f5-b");
        assert_eq!(missing[0].listed_not_ready_in.as_deref(), Some("web-abc"));
    }

    #[test]
    fn terminating_pods_are_not_expected_even_while_ready() {
        // Being deleted, still Ready=True: the endpoint controller has taken it out already.
        let terminating = pod("web-7c9f5-t", "10.0.0.5", true).replace(
            "  namespace: shop\n",
            "  namespace: shop\n  deletionTimestamp: \"2024-05-01T03:17:00Z\"\n",
        );
        let slice = web_slice(
            "web-abc",
            &(endpoint("10.0.0.1", "web-7c9f5-a")
                + "- addresses: [\"10.0.0.5\"]\n  conditions: {ready: false, serving: true, terminating: true}\n  \
                   targetRef: {kind: Pod, name: web-7c9f5-t}\n"),
        );
        let cov = coverage_of(&[
            ("web.yaml", WEB),
            ("slice.yaml", &slice),
            ("a.yaml", &pod("web-7c9f5-a", "10.0.0.1", true)),
            ("t.yaml", &terminating),
        ])
        .expect("coverage");
        assert_eq!(cov.selected_pods, 2);
        assert_eq!(names(cov.ready_pods.iter()), ["web-7c9f5-a (10.0.0.1)"]);
        assert!(!cov.is_stale(), "{cov:?}");

        // Alone, it is what the proxy sends to (serving, terminating): still a pod's address.
        let slice = web_slice(
            "web-abc",
            "- addresses: [\"10.0.0.5\"]\n  conditions: {ready: false, serving: true, terminating: true}\n  \
             targetRef: {kind: Pod, name: web-7c9f5-t}\n",
        );
        let cov = coverage_of(&[
            ("web.yaml", WEB),
            ("slice.yaml", &slice),
            ("t.yaml", &terminating),
        ])
        .expect("coverage");
        assert_eq!(cov.ready_count(), 0);
        assert!(cov.unknown_addresses.is_empty());
    }

    #[test]
    fn pods_across_several_slices_are_all_covered() {
        // Kubernetes splits a large Service's endpoints over slices; a pod in any of them is in.
        let a = web_slice("web-a", &endpoint("10.0.0.1", "web-7c9f5-a"));
        let b = web_slice(
            "web-b",
            &(endpoint("10.0.0.2", "web-7c9f5-b") + &endpoint("10.0.0.1", "web-7c9f5-a")),
        );
        let files = [
            ("web.yaml", WEB),
            ("a.yaml", a.as_str()),
            ("b.yaml", b.as_str()),
            ("pa.yaml", &pod("web-7c9f5-a", "10.0.0.1", true)),
            ("pb.yaml", &pod("web-7c9f5-b", "10.0.0.2", true)),
            ("pc.yaml", &pod("web-7c9f5-c", "10.0.0.3", true)),
        ];
        let cov = coverage_of(&files).expect("coverage");
        assert_eq!(cov.slices, [Arc::from("web-a"), Arc::from("web-b")]);
        assert_eq!((cov.ready_count(), cov.covered_count()), (3, 2));
        assert_eq!(names(cov.missing()), ["web-7c9f5-c (10.0.0.3)"]);
    }

    #[test]
    fn pods_sharing_an_address_are_told_apart_by_target_ref() {
        // A loopback mesh: every pod is 127.0.0.1 (each on its own port); the slices name
        // two of the three.
        let a = web_slice("web-a", &endpoint("127.0.0.1", "web-7c9f5-a"));
        let b = web_slice("web-b", &endpoint("127.0.0.1", "web-7c9f5-b"))
            .replace("port: 8080", "port: 8081");
        let cov = coverage_of(&[
            ("web.yaml", WEB),
            ("a.yaml", &a),
            ("b.yaml", &b),
            ("pa.yaml", &pod("web-7c9f5-a", "127.0.0.1", true)),
            ("pb.yaml", &pod("web-7c9f5-b", "127.0.0.1", true)),
            ("pc.yaml", &pod("web-7c9f5-c", "127.0.0.1", true)),
        ])
        .expect("coverage");
        assert_eq!(names(cov.missing()), ["web-7c9f5-c (127.0.0.1)"]);
    }

    #[test]
    fn services_of_other_namespaces_are_compared_with_their_own_pods() {
        let other = WEB.replace("namespace: shop", "namespace: other");
        let (_dir, store) = load(
            &[
                ("web.yaml", WEB),
                ("other.yaml", &other),
                ("a.yaml", &pod("web-7c9f5-a", "10.0.0.1", true)),
            ],
            StoreConfig::default(),
        );
        let all = store.snapshot().endpoint_coverages();
        // other/web has no Pods in its namespace: no coverage.
        assert_eq!(all.len(), 1);
        assert_eq!(&*all[0].service.namespace, "shop");
        assert_eq!(all[0].missing_count(), 1);
    }
}
