//! `endpoints_*`: how each Service's endpoints cover the ready pods its selector picks, for an
//! alert on the story's "2 of 3 pods" (a ready pod the EndpointSlices leave out gets no
//! traffic, and nothing else says so).
//!
//! | family | labels | value |
//! |---|---|---|
//! | `endpoints_ready_pods` | `dst_namespace`, `dst_service` | ready pods the Service selects (running, `Ready`, not terminating) |
//! | `endpoints_missing_pods` | `dst_namespace`, `dst_service` | of them, those not among the Service's endpoints |
//! | `endpoints_unknown_addresses` | `dst_namespace`, `dst_service` | endpoint addresses no Pod has |
//! | `endpoints_missing_pod_info` | `dst_namespace`, `dst_service`, `dst_pod`, `dst_<kind>` (`dst_deployment`, ...) | 1 per missing pod, naming it and its workload |
//!
//! Only Services with a selector, in a namespace whose Pods the source has, have series (see
//! [`pylon_proxy_policy::coverage`], which computes them). The proxy exports them in
//! config-dir mode, `pylon-controller` on its admin port; every exporter reports the same
//! values, so aggregate with `max by (dst_namespace, dst_service)`.
//!
//! The rows are computed when the mesh snapshot changes ([`EndpointGauges::update`]) and
//! swapped in whole, so a scrape reads one consistent set without a lock, and series of a
//! Service that went away (or a pod that came back) disappear with the next update.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use pylon_proxy_policy::{EndpointCoverage, Snapshot, WorkloadKind};

/// One Service's row.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    namespace: Arc<str>,
    service: Arc<str>,
    ready: i64,
    missing: i64,
    unknown: i64,
    missing_pods: Vec<MissingPod>,
}

/// A pod of `endpoints_missing_pod_info`.
#[derive(Debug, PartialEq, Eq)]
struct MissingPod {
    name: Arc<str>,
    /// Its workload's label (`dst_deployment`, as Linkerd's destination labels name it) and
    /// name; `None` for a bare pod, which `dst_pod` names already.
    workload: Option<(String, Arc<str>)>,
}

impl Row {
    fn of(c: &EndpointCoverage) -> Row {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        Row {
            namespace: c.service.namespace.clone(),
            service: c.service.name.clone(),
            ready: count(c.ready_count()),
            missing: count(c.missing_count()),
            unknown: count(c.unknown_addresses.len()),
            missing_pods: c
                .missing()
                .map(|p| MissingPod {
                    name: p.name.clone(),
                    workload: (p.workload.kind != WorkloadKind::Pod).then(|| {
                        (
                            format!("dst_{}", p.workload.kind.label()),
                            p.workload.name.clone(),
                        )
                    }),
                })
                .collect(),
        }
    }
}

type Count = fn(&Row) -> i64;

/// The per-Service gauges: name, help, value.
const GAUGES: [(&str, &str, Count); 3] = [
    (
        "endpoints_ready_pods",
        "Ready pods a Service's selector picks (running, Ready, not terminating)",
        |r| r.ready,
    ),
    (
        "endpoints_missing_pods",
        "Ready pods a Service's selector picks that are not among its endpoints, so they get none of its traffic",
        |r| r.missing,
    ),
    (
        "endpoints_unknown_addresses",
        "Addresses in a Service's endpoints that no Pod has, so requests sent there fail",
        |r| r.unknown,
    ),
];

/// The `endpoints_*` families; register it once and [`update`](EndpointGauges::update) it
/// whenever the snapshot changes.
#[derive(Debug, Default)]
pub struct EndpointGauges {
    rows: ArcSwap<Vec<Row>>,
}

impl EndpointGauges {
    pub fn new() -> Arc<EndpointGauges> {
        Arc::default()
    }

    /// Recomputes every Service's row from `snapshot` (one coverage per Service) and publishes
    /// them together. Costs a pass over each namespace's pods per Service: call it per
    /// snapshot change, never per request.
    pub fn update(&self, snapshot: &Snapshot) {
        let rows: Vec<Row> = snapshot.endpoint_coverages().iter().map(Row::of).collect();
        if **self.rows.load() != rows {
            self.rows.store(Arc::new(rows));
        }
    }
}

impl crate::Metrics {
    /// The `endpoints_*` gauges in this registry (empty until updated).
    pub fn endpoint_gauges(&self) -> &EndpointGauges {
        &self.endpoints
    }
}

impl Collector for EndpointGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let rows = self.rows.load();
        // Each family's descriptor is written even without rows, so the names are there for
        // dashboards and rule checks before a Service is seen.
        for (name, help, value) in GAUGES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for row in rows.iter() {
                let labels = [
                    ("dst_namespace", &*row.namespace),
                    ("dst_service", &*row.service),
                ];
                ConstGauge::new(value(row)).encode(family.encode_family(&labels)?)?;
            }
        }
        // A gauge of value 1 named `_info`, as `proxy_build_info` and kube-state-metrics' are
        // (the OpenMetrics info type is unknown to the Prometheus text format).
        let mut info = encoder.encode_descriptor(
            "endpoints_missing_pod_info",
            "A ready pod a Service's selector picks that is not among its endpoints (always 1), with its workload",
            None,
            MetricType::Gauge,
        )?;
        for row in rows.iter() {
            for pod in &row.missing_pods {
                let mut labels = vec![
                    ("dst_namespace", &*row.namespace),
                    ("dst_service", &*row.service),
                    ("dst_pod", &*pod.name),
                ];
                if let Some((label, name)) = &pod.workload {
                    labels.push((label.as_str(), &**name));
                }
                ConstGauge::new(1).encode(info.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;
    use pylon_proxy_policy::{Store, StoreConfig};

    fn pod(name: &str, ready: bool) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  \
             labels: {{app: web, pod-template-hash: 7c9f5}}\n  \
             ownerReferences: [{{kind: ReplicaSet, name: web-7c9f5, controller: true}}]\n\
             spec: {{containers: [{{name: app}}]}}\n\
             status: {{phase: Running, podIP: 127.0.0.1, conditions: [{{type: Ready, status: \"{}\"}}]}}\n",
            if ready { "True" } else { "False" }
        )
    }

    fn slice(pods: &[&str]) -> String {
        let endpoints: String = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                     metadata: {{name: {p}, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
                     addressType: IPv4\nports: [{{name: http, port: {}}}]\n\
                     endpoints: [{{addresses: [127.0.0.1], targetRef: {{kind: Pod, name: {p}}}}}]\n",
                    8080 + i
                )
            })
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
             spec: {{selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: http}}]}}\n{endpoints}"
        )
    }

    fn encode(gauges: &Arc<EndpointGauges>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(gauges.clone()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        out
    }

    #[test]
    fn two_of_three_pods_and_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text);
        for p in ["web-7c9f5-a", "web-7c9f5-b", "web-7c9f5-c"] {
            write(&format!("{p}.yaml"), &pod(p, true)).expect("write");
        }
        write("web.yaml", &slice(&["web-7c9f5-a", "web-7c9f5-b"])).expect("write");
        let store = Store::load_dir(dir.path(), StoreConfig::default()).expect("load");
        let gauges = EndpointGauges::new();
        let empty = encode(&gauges);
        assert!(
            empty.contains("# TYPE endpoints_missing_pods gauge"),
            "{empty}"
        );
        assert!(
            empty.contains("# TYPE endpoints_missing_pod_info gauge"),
            "{empty}"
        );
        assert!(!empty.contains("dst_service"), "{empty}");

        gauges.update(&store.snapshot());
        let text = encode(&gauges);
        let svc = "dst_namespace=\"shop\",dst_service=\"web\"";
        assert!(
            text.contains(&format!("endpoints_ready_pods{{{svc}}} 3")),
            "{text}"
        );
        assert!(
            text.contains(&format!("endpoints_missing_pods{{{svc}}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("endpoints_unknown_addresses{{{svc}}} 0")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "endpoints_missing_pod_info{{{svc},dst_pod=\"web-7c9f5-c\",dst_deployment=\"web\"}} 1"
            )),
            "{text}"
        );

        write(
            "web.yaml",
            &slice(&["web-7c9f5-a", "web-7c9f5-b", "web-7c9f5-c"]),
        )
        .expect("write");
        store.reload();
        gauges.update(&store.snapshot());
        let text = encode(&gauges);
        assert!(
            text.contains(&format!("endpoints_missing_pods{{{svc}}} 0")),
            "{text}"
        );
        assert!(!text.contains("endpoints_missing_pod_info{"), "{text}");
    }
}
