//! What `pylon stat` says of a resource's endpoints: when a Service of it leaves ready pods
//! out of its endpoints (the story's "2 of 3 pods", where the third pod gets no traffic and
//! the table alone shows only the two that do), or names an address no pod has.
//!
//! The finding is proxy-policy's [`EndpointCoverage`], read from wherever the numbers come
//! from:
//! - `--config-dir DIR`: computed from the dir's Services, EndpointSlices and Pods, as the
//!   proxies compute it (pod names, addresses, the slices they are not in);
//! - `--proxy ADDR`: the proxies' `endpoints_*` gauges on their `/metrics` (a proxy run with a
//!   config dir exports them);
//! - `--prometheus URL`: the same gauges, from pylon-controller and the proxies, queried.
//!
//! The gauges carry counts per Service and one `endpoints_missing_pod_info` series per missing
//! pod (its name and workload), so from metrics only Services missing pods are known to
//! belong to a workload; from a dir every Service selecting the resource's pods is.
//!
//! Reading it is best-effort: a source without the gauges leaves the table as it was, with a
//! note on stderr.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use anyhow::{anyhow, Context, Result};
use pylon_proxy_policy::{EndpointCoverage, Store, StoreConfig};
use serde::Serialize;

use super::data::{http_get, parse_vector, url_encode, Series};
use super::resource::{service_of_authority, Kind, Resource};
use super::{Failure, SourceArgs};
use crate::demo::admin_client;

/// The gauges (see `proxy-metrics/src/endpoints.rs`).
const READY: &str = "endpoints_ready_pods";
const MISSING: &str = "endpoints_missing_pods";
const UNKNOWN: &str = "endpoints_unknown_addresses";
const MISSING_POD: &str = "endpoints_missing_pod_info";

/// One Service's endpoints against its ready pods, as stat prints it and `-o json` carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EndpointFinding {
    pub namespace: String,
    pub service: String,
    /// Ready pods the Service selects.
    pub ready_pods: u64,
    /// Of them, those not among its endpoints.
    pub missing_pods: u64,
    /// Each missing pod, as far as the source says.
    pub missing: Vec<MissingPod>,
    /// Endpoint addresses no Pod has (`10.0.0.9`, `10.0.0.9 (pod web-x)`); from metrics only
    /// their number is known.
    pub unknown_addresses: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown: Vec<String>,
    /// The Service's EndpointSlices (a config dir says; metrics don't).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub slices: Vec<String>,
    /// Workloads (`deployment/web`) and pods known to be the Service's, to select by.
    #[serde(skip)]
    workloads: BTreeSet<String>,
    #[serde(skip)]
    pods: BTreeSet<String>,
}

/// A ready pod missing from a Service's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MissingPod {
    pub pod: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// `deployment/web`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// The EndpointSlice that lists it, as not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listed_not_ready_in: Option<String>,
}

impl EndpointFinding {
    fn of(c: &EndpointCoverage) -> EndpointFinding {
        EndpointFinding {
            namespace: c.service.namespace.to_string(),
            service: c.service.name.to_string(),
            ready_pods: c.ready_count() as u64,
            missing_pods: c.missing_count() as u64,
            missing: c
                .missing()
                .map(|p| MissingPod {
                    pod: p.name.to_string(),
                    ip: Some(p.ip.to_string()),
                    workload: Some(p.workload.to_string()),
                    listed_not_ready_in: p.listed_not_ready_in.as_deref().map(str::to_string),
                })
                .collect(),
            unknown_addresses: c.unknown_addresses.len() as u64,
            unknown: c
                .unknown_addresses
                .iter()
                .map(ToString::to_string)
                .collect(),
            slices: c.slices.iter().map(ToString::to_string).collect(),
            workloads: c
                .ready_pods
                .iter()
                .map(|p| p.workload.to_string())
                .collect(),
            pods: c.ready_pods.iter().map(|p| p.name.to_string()).collect(),
        }
    }

    /// Whether this Service is `res`'s (read in `namespace`, `None`: any).
    fn concerns(&self, res: &Resource, namespace: Option<&str>) -> bool {
        let namespace = res.namespace_or(namespace);
        if res.kind == Kind::Namespace {
            return res.name.as_deref().is_none_or(|n| n == self.namespace);
        }
        if namespace.is_some_and(|ns| ns != self.namespace) {
            return false;
        }
        let Some(name) = res.name.as_deref() else {
            return true;
        };
        match res.kind {
            Kind::Deployment => self.workloads.contains(&format!("deployment/{name}")),
            Kind::Pod => self.pods.contains(name),
            Kind::Service => self.service == name,
            Kind::Authority => service_of_authority(name)
                .is_some_and(|(svc, ns)| svc == self.service && ns == self.namespace),
            Kind::Namespace => true,
        }
    }

    /// The lines stat prints under its table (none when nothing is wrong).
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        let svc = format!("svc/{} (namespace {})", self.service, self.namespace);
        if self.missing_pods > 0 {
            let not_in = match self.slices.as_slice() {
                [] if self.missing.iter().any(|p| p.ip.is_some()) => {
                    "not in any EndpointSlice (the Service has none)".to_string()
                }
                [] => "not among its endpoints".to_string(),
                [one] => format!("not in EndpointSlice {one}"),
                many => format!("not in EndpointSlices {}", many.join(", ")),
            };
            let (absent, not_ready): (Vec<&MissingPod>, Vec<&MissingPod>) = self
                .missing
                .iter()
                .partition(|p| p.listed_not_ready_in.is_none());
            let mut why = Vec::new();
            if !absent.is_empty() {
                why.push(format!(
                    "{} {} ready but {not_in}",
                    pods(&absent),
                    if absent.len() == 1 { "is" } else { "are" }
                ));
            }
            for p in not_ready {
                why.push(format!(
                    "{} is ready but EndpointSlice {} lists it as not ready",
                    pods(&[p]),
                    p.listed_not_ready_in.as_deref().unwrap_or_default()
                ));
            }
            if why.is_empty() {
                why.push(format!("{} not among its endpoints", self.missing_pods));
            }
            out.push(format!(
                "endpoints {} of {} ready pods of {svc}: {}, so the proxies send {} nothing",
                self.ready_pods.saturating_sub(self.missing_pods),
                self.ready_pods,
                why.join("; "),
                if self.missing_pods == 1 { "it" } else { "them" }
            ));
        }
        if self.unknown_addresses > 0 {
            let what = if self.unknown.is_empty() {
                format!("{} addresses", self.unknown_addresses)
            } else {
                self.unknown.join(", ")
            };
            out.push(format!(
                "endpoints of {svc} include {what} that no Pod has: requests sent there fail"
            ));
        }
        out
    }
}

/// `web-7c9f5-c (10.0.0.7)`, `web-7c9f5-c (deployment/web)`, ...
fn pods(pods: &[&MissingPod]) -> String {
    let named: Vec<String> = pods
        .iter()
        .map(|p| match (&p.ip, &p.workload) {
            (Some(ip), _) => format!("{} ({ip})", p.pod),
            (None, Some(w)) => format!("{} ({w})", p.pod),
            (None, None) => p.pod.clone(),
        })
        .collect();
    named.join(", ")
}

/// The findings for `res` (the resource stat is about: the `--to` destination when there is
/// one), from the flags' source. Best-effort: a source that can't say is noted on stderr.
pub(super) fn findings(res: &Resource, src: &SourceArgs) -> Vec<EndpointFinding> {
    let namespace = src.scope.namespace();
    match read(src) {
        Ok(all) => all
            .into_iter()
            .filter(|f| f.concerns(res, namespace))
            .collect(),
        Err(e) => {
            eprintln!("pylon stat: note: endpoints not checked: {e:#}");
            Vec::new()
        }
    }
}

/// Appends the stale findings' lines to stat's table.
pub(super) fn append(table: &mut String, findings: &[EndpointFinding]) {
    for line in findings.iter().flat_map(EndpointFinding::lines) {
        table.push('\n');
        table.push_str(&line);
        table.push('\n');
    }
}

/// A "no traffic" failure, with the findings that may explain it (a workload whose pods are
/// all missing from its Service's endpoints gets no traffic at all).
pub(super) fn explain(failure: Failure, findings: &[EndpointFinding]) -> Failure {
    let lines: Vec<String> = findings.iter().flat_map(EndpointFinding::lines).collect();
    if lines.is_empty() {
        return failure;
    }
    let Failure(code, e) = failure;
    Failure(code, anyhow!("{e}\n{}", lines.join("\n")))
}

/// Every Service's finding the source knows.
fn read(src: &SourceArgs) -> Result<Vec<EndpointFinding>> {
    let source = &src.source;
    if let Some(dir) = &source.proxies.config_dir {
        let store = Store::load_dir(dir, StoreConfig::default())
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("reading the config dir {}", dir.display()))?;
        return Ok(store
            .snapshot()
            .endpoint_coverages()
            .iter()
            .map(EndpointFinding::of)
            .collect());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let series = match &source.prometheus {
        Some(url) => rt.block_on(from_prometheus(url))?,
        None => rt.block_on(from_proxies(&source.proxies.proxies))?,
    };
    Ok(from_series(&series))
}

/// The `endpoints_*` samples of every proxy's `/metrics`.
async fn from_proxies(proxies: &[SocketAddr]) -> Result<Vec<Series>> {
    let mut scrapes = tokio::task::JoinSet::new();
    for &addr in proxies {
        scrapes.spawn(async move { (addr, admin_client::metrics(addr).await) });
    }
    let mut out = Vec::new();
    while let Some(joined) = scrapes.join_next().await {
        let (addr, text) = joined.context("scraping a proxy")?;
        let text = text?;
        let samples = pylon_proxy_metrics::exposition::parse(&text)
            .with_context(|| format!("parsing http://{addr}/metrics"))?;
        out.extend(
            samples
                .into_iter()
                .filter(|s| [READY, MISSING, UNKNOWN, MISSING_POD].contains(&s.name.as_str()))
                .map(|s| Series {
                    metric: s.name,
                    labels: s.labels.into_iter().collect(),
                    le: None,
                    value: s.value,
                }),
        );
    }
    Ok(out)
}

/// The gauges from Prometheus: each Service's counts (the highest any exporter reports) and
/// its missing pods.
async fn from_prometheus(base: &str) -> Result<Vec<Series>> {
    let base = base.trim_end_matches('/');
    let by = "dst_namespace, dst_service";
    // The missing pods as exported (one per exporter; a pod's workload label depends on its
    // kind, so no `by` would keep it): few, as they are only the missing ones.
    let queries = [
        (READY, format!("max by ({by}) ({READY})")),
        (MISSING, format!("max by ({by}) ({MISSING})")),
        (UNKNOWN, format!("max by ({by}) ({UNKNOWN})")),
        (MISSING_POD, MISSING_POD.to_string()),
    ];
    let mut out = Vec::new();
    for (metric, expr) in queries {
        let url = format!("{base}/api/v1/query?query={}", url_encode(&expr));
        let body = http_get(&url)
            .await
            .with_context(|| format!("querying Prometheus at {base}"))?;
        out.extend(parse_vector(metric, &body).with_context(|| format!("query {expr}"))?);
    }
    Ok(out)
}

/// Findings from the gauges' samples (several exporters report each Service: the highest
/// count wins, each missing pod is named once).
fn from_series(series: &[Series]) -> Vec<EndpointFinding> {
    let mut by_service: BTreeMap<(String, String), EndpointFinding> = BTreeMap::new();
    for s in series {
        let (Some(namespace), Some(service)) = (s.label("dst_namespace"), s.label("dst_service"))
        else {
            continue;
        };
        let f = by_service
            .entry((namespace.clone(), service.clone()))
            .or_insert_with(|| EndpointFinding {
                namespace,
                service,
                ..EndpointFinding::default()
            });
        // Gauges of small counts: a negative or fractional value is no count.
        let count = if s.value.is_finite() && s.value >= 0.0 {
            s.value as u64
        } else {
            0
        };
        match s.metric.as_str() {
            READY => f.ready_pods = f.ready_pods.max(count),
            MISSING => f.missing_pods = f.missing_pods.max(count),
            UNKNOWN => f.unknown_addresses = f.unknown_addresses.max(count),
            MISSING_POD => {
                let Some(pod) = s.label("dst_pod") else {
                    continue;
                };
                // The one other `dst_` label is the workload's: `dst_deployment="web"`.
                let workload = s.labels.iter().find_map(|(k, v)| {
                    let kind = k.strip_prefix("dst_")?;
                    (!["namespace", "service", "pod"].contains(&kind))
                        .then(|| format!("{kind}/{v}"))
                });
                if f.pods.insert(pod.clone()) {
                    f.workloads.extend(workload.clone());
                    f.missing.push(MissingPod {
                        pod,
                        workload,
                        ..MissingPod::default()
                    });
                }
            }
            _ => {}
        }
    }
    by_service
        .into_values()
        .map(|mut f| {
            f.missing.sort_by(|a, b| a.pod.cmp(&b.pod));
            f
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(metric: &str, labels: &[(&str, &str)], value: f64) -> Series {
        Series {
            metric: metric.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            le: None,
            value,
        }
    }

    fn r(s: &str) -> Resource {
        Resource::parse(s).expect("resource")
    }

    #[test]
    fn gauges_from_several_exporters_make_one_finding_per_service() {
        let svc = [("dst_namespace", "default"), ("dst_service", "ml")];
        let pod = [
            ("dst_namespace", "default"),
            ("dst_service", "ml"),
            ("dst_pod", "ml-7c9f5-c"),
            ("dst_deployment", "ml"),
        ];
        let found = from_series(&[
            series(READY, &svc, 3.0),
            series(MISSING, &svc, 1.0),
            series(UNKNOWN, &svc, 0.0),
            // The controller and a proxy both name the pod.
            series(MISSING_POD, &pod, 1.0),
            series(
                MISSING_POD,
                &[&pod[..], &[("pod", "client-0")]].concat(),
                1.0,
            ),
            series(
                READY,
                &[("dst_namespace", "default"), ("dst_service", "db")],
                1.0,
            ),
        ]);
        assert_eq!(found.len(), 2);
        let ml = &found[1];
        assert_eq!((ml.ready_pods, ml.missing_pods), (3, 1));
        assert_eq!(ml.missing.len(), 1);
        assert_eq!(ml.missing[0].workload.as_deref(), Some("deployment/ml"));
        assert_eq!(
            ml.lines(),
            [
                "endpoints 2 of 3 ready pods of svc/ml (namespace default): ml-7c9f5-c \
              (deployment/ml) is ready but not among its endpoints, so the proxies send it nothing"
            ]
        );
        assert!(ml.concerns(&r("deployment/ml"), Some("default")));
        assert!(ml.concerns(&r("svc/ml"), Some("default")));
        assert!(ml.concerns(&r("pod/ml-7c9f5-c"), None));
        assert!(!ml.concerns(&r("deployment/ml"), Some("shop")));
        assert!(!ml.concerns(&r("deployment/db"), None));
        // db misses nothing, and metrics don't say whose it is.
        assert!(found[0].lines().is_empty());
        assert!(!found[0].concerns(&r("deployment/db"), None));
        assert!(found[0].concerns(&r("ns/default"), None));
    }

    #[test]
    fn a_dirs_finding_names_the_pod_its_address_and_the_slices() {
        let f = EndpointFinding {
            namespace: "default".into(),
            service: "web".into(),
            ready_pods: 3,
            missing_pods: 2,
            missing: vec![
                MissingPod {
                    pod: "web-x2".into(),
                    ip: Some("10.0.0.7".into()),
                    workload: Some("deployment/web".into()),
                    listed_not_ready_in: None,
                },
                MissingPod {
                    pod: "web-x3".into(),
                    ip: Some("10.0.0.8".into()),
                    workload: Some("deployment/web".into()),
                    listed_not_ready_in: Some("web-abc".into()),
                },
            ],
            unknown_addresses: 1,
            unknown: vec!["10.0.0.9".into()],
            slices: vec!["web-abc".into()],
            ..EndpointFinding::default()
        };
        assert_eq!(
            f.lines(),
            [
                "endpoints 1 of 3 ready pods of svc/web (namespace default): web-x2 (10.0.0.7) is \
                 ready but not in EndpointSlice web-abc; web-x3 (10.0.0.8) is ready but \
                 EndpointSlice web-abc lists it as not ready, so the proxies send them nothing",
                "endpoints of svc/web (namespace default) include 10.0.0.9 that no Pod has: \
                 requests sent there fail",
            ]
        );
        let mut table = String::from("NAME ...\n");
        append(&mut table, &[f]);
        assert!(table.contains("\nendpoints 1 of 3"), "{table}");
        let json = serde_json::to_value(EndpointFinding::default()).expect("json");
        assert!(
            json.get("workloads").is_none() && json.get("slices").is_none(),
            "{json}"
        );
    }
}
