//! The dashboard's JSON: what its pages show, computed by the same selections and sums as
//! `pylon stat`, `routes` and `edges` ([`crate::stat`]) from one reading of the source per
//! answer. Nothing here queries on its own; it only picks rows and shapes them for the page.
//!
//! - overview: `stat deployment -A` (what each workload received, and its meshed pods), with
//!   each workload's retry ratio from what it sent (retries are its own proxy's doing);
//! - a workload: its row, `edges --to` it and from it, `routes` it serves, its pods, and a
//!   15-minute history of one-minute windows;
//! - the topology: workloads as nodes, edges between them as `pylon edges` flags them;
//! - check: `pylon check`'s findings for the config dir.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::Serialize;

use super::layout;
use crate::check::{self, Finding, Summary};
use crate::stat::data::{Observed, Series, Source};
use crate::stat::resource::{Kind, Matcher, Resource};
use crate::stat::view::{self, Edge, Selection, StatRow, FAILING_BELOW, RETRY_HEAVY_ABOVE};
use crate::stat::{self as stat_cmd};

/// The label the dashboard gives an outbound series' destination node: `deployment/NAME`
/// where discovery named the workload, else `service/NAME` (a destination outside the mesh's
/// known pods is still a box on the map).
const DST_NODE: &str = "dst_node";

/// A workload row: `stat`'s, with what the page flags.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadRow {
    pub namespace: String,
    pub kind: &'static str,
    #[serde(flatten)]
    pub stat: StatRow,
    pub failing: bool,
    pub retry_heavy: bool,
}

impl WorkloadRow {
    fn new(namespace: String, mut stat: StatRow, retry_ratio: Option<f64>) -> WorkloadRow {
        stat.namespace = None;
        stat.retry_ratio = retry_ratio;
        WorkloadRow {
            namespace,
            kind: Kind::Deployment.as_str(),
            failing: stat.success_rate.is_some_and(|s| s < FAILING_BELOW),
            retry_heavy: retry_ratio.is_some_and(|r| r > RETRY_HEAVY_ABOVE),
            stat,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct NamespaceRow {
    pub name: String,
    pub workloads: usize,
    pub meshed: usize,
    pub success_rate: Option<f64>,
    pub requests: u64,
    pub rps: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Overview {
    pub window_seconds: f64,
    pub source: String,
    pub namespaces: Vec<NamespaceRow>,
    pub workloads: Vec<WorkloadRow>,
}

/// An edge as the pages draw and link it.
#[derive(Clone, Debug, Serialize)]
pub struct PageEdge {
    #[serde(flatten)]
    pub edge: Edge,
    pub src_id: String,
    pub dst_id: String,
    /// `deployment` or `service`.
    pub dst_kind: String,
    /// The tap page's query string for this edge's requests.
    pub tap: String,
    /// Stroke width and polyline, on the topology only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub points: Option<Vec<[f64; 2]>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RouteRow {
    #[serde(flatten)]
    pub stat: StatRow,
    pub service: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub window_seconds: f64,
    pub workload: WorkloadRow,
    pub inbound: Vec<PageEdge>,
    pub outbound: Vec<PageEdge>,
    pub routes: Vec<RouteRow>,
    pub pods: Vec<StatRow>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Point {
    /// How long ago the point's minute ended.
    pub ago_seconds: u64,
    /// How much of the minute the source covered (less for proxies younger than it).
    pub seconds: f64,
    pub success_rate: Option<f64>,
    pub rps: f64,
    pub requests: u64,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct History {
    pub step_seconds: u64,
    pub points: Vec<Point>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Thresholds {
    pub failing_below: f64,
    pub retry_heavy_above: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Node {
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub kind: String,
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
    pub meshed: Option<usize>,
    pub success_rate: Option<f64>,
    pub rps: f64,
    /// What it sends, over all its edges.
    pub sent_rps: f64,
    pub failing: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Topology {
    pub window_seconds: f64,
    pub width: f64,
    pub height: f64,
    pub thresholds: Thresholds,
    pub nodes: Vec<Node>,
    pub edges: Vec<PageEdge>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Check {
    Found {
        available: bool,
        dir: String,
        summary: Summary,
        findings: Vec<Finding>,
    },
    Unavailable {
        available: bool,
        reason: String,
    },
}

/// A failure to answer: the status and the message the page shows.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    NotFound(String),
    /// The source could not be read (a proxy or Prometheus unreachable).
    Unavailable(String),
}

impl ApiError {
    fn source(e: anyhow::Error) -> ApiError {
        ApiError::Unavailable(format!("{e:#}"))
    }
}

fn all_deployments() -> Resource {
    Resource {
        kind: Kind::Deployment,
        name: None,
        namespace: None,
    }
}

fn deployment(ns: &str, name: &str) -> Resource {
    Resource {
        kind: Kind::Deployment,
        name: Some(name.to_string()),
        namespace: Some(ns.to_string()),
    }
}

/// What each workload (by `[namespace, deployment]`) sent, retries counted: `stat --to`'s
/// RETRY% for all of them at once.
fn sent_retry_ratios(seen: &Observed) -> BTreeMap<Vec<String>, Option<f64>> {
    let sel = stat_cmd::routes_selection(vec![Matcher::eq("direction", "outbound")]);
    let sel = Selection {
        group: all_deployments().group_labels(),
        ..sel
    };
    view::aggregate(&seen.series, &sel, seen.window.as_secs_f64())
        .into_iter()
        .map(|(key, stats)| (key, stats.retry_ratio()))
        .collect()
}

/// Every workload's row (what it received, its pods), with the retries of what it sent.
fn workload_rows(seen: &Observed, only: Option<&Resource>) -> Vec<WorkloadRow> {
    let res = only.cloned().unwrap_or_else(all_deployments);
    let Ok(sel) = stat_cmd::stat_selection(&res, None, None, None) else {
        return Vec::new();
    };
    let retries = sent_retry_ratios(seen);
    stat_cmd::stat_rows(seen, &sel, false)
        .into_iter()
        .map(|row| {
            let ns = row.namespace.clone().unwrap_or_default();
            let retry = retries
                .get(&vec![ns.clone(), row.name.clone()])
                .copied()
                .flatten();
            WorkloadRow::new(ns, row, retry)
        })
        .collect()
}

pub async fn overview(source: &Source, window: Duration) -> Result<Overview, ApiError> {
    let seen = source
        .observe(window, &[])
        .await
        .map_err(ApiError::source)?;
    let workloads = workload_rows(&seen, None);
    let all_ns = Resource {
        kind: Kind::Namespace,
        name: None,
        namespace: None,
    };
    let namespaces = match stat_cmd::stat_selection(&all_ns, None, None, None) {
        Ok(sel) => stat_cmd::stat_rows(&seen, &sel, false)
            .into_iter()
            .map(|row| NamespaceRow {
                workloads: workloads.iter().filter(|w| w.namespace == row.name).count(),
                meshed: row.meshed.unwrap_or(0),
                success_rate: row.success_rate,
                requests: row.requests,
                rps: row.rps,
                name: row.name,
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    Ok(Overview {
        window_seconds: seen.window.as_secs_f64(),
        source: source.describe(),
        namespaces,
        workloads,
    })
}

/// The reading with every outbound series' destination node named ([`DST_NODE`]). A series
/// without the workload (counted before discovery knew the pods, or a route series whose
/// endpoints' labels differ) takes it from its service when every series naming both agrees
/// on one workload, so a service's traffic is not split over two boxes.
fn with_destination_nodes(mut seen: Observed) -> Observed {
    let outbound = |s: &Series| s.label("direction").as_deref() == Some("outbound");
    let present = |v: Option<String>| v.filter(|v| !v.is_empty());
    // (dst_namespace, dst_service) -> its one workload, or None once two differ.
    let mut workload_of: HashMap<(Option<String>, String), Option<String>> = HashMap::new();
    for s in seen.series.iter().filter(|s| outbound(s)) {
        if let (Some(svc), Some(d)) = (
            present(s.label("dst_service")),
            present(s.label("dst_deployment")),
        ) {
            workload_of
                .entry((s.label("dst_namespace"), svc))
                .and_modify(|known| {
                    if known.as_ref() != Some(&d) {
                        *known = None;
                    }
                })
                .or_insert(Some(d));
        }
    }
    for s in seen.series.iter_mut().filter(|s| outbound(s)) {
        let svc = present(s.label("dst_service"));
        let node = match (present(s.label("dst_deployment")), svc) {
            (Some(d), _) => format!("deployment/{d}"),
            (None, Some(svc)) => match workload_of.get(&(s.label("dst_namespace"), svc.clone())) {
                Some(Some(d)) => format!("deployment/{d}"),
                _ => format!("service/{svc}"),
            },
            (None, None) => continue,
        };
        s.labels.insert(DST_NODE.to_string(), node);
    }
    seen
}

/// The edges of a selection from [`stat_cmd::edges_selection`] over [`DST_NODE`].
fn page_edges(seen: &Observed, sel: &Selection) -> Vec<PageEdge> {
    stat_cmd::edge_rows(seen, sel)
        .into_iter()
        .map(|mut edge| {
            let (kind, name) = edge
                .dst
                .split_once('/')
                .map(|(k, n)| (k.to_string(), n.to_string()))
                .unwrap_or_else(|| ("service".to_string(), edge.dst.clone()));
            edge.dst = name;
            let to = match kind.as_str() {
                "deployment" if edge.dst_namespace == edge.src_namespace => {
                    format!("deployment/{}", edge.dst)
                }
                // Another namespace's workload has no name tap's `-n` can give; its service's
                // DNS name has.
                _ => format!("svc/{}.{}.svc.cluster.local", edge.dst, edge.dst_namespace),
            };
            let tap = format!(
                "resource={}&to={}&namespace={}",
                url_encode(&format!("deployment/{}", edge.src)),
                url_encode(&to),
                url_encode(&edge.src_namespace)
            );
            PageEdge {
                src_id: node_id(&edge.src_namespace, "deployment", &edge.src),
                dst_id: node_id(&edge.dst_namespace, &kind, &edge.dst),
                dst_kind: kind,
                tap,
                width: None,
                points: None,
                edge,
            }
        })
        .collect()
}

fn node_id(ns: &str, kind: &str, name: &str) -> String {
    format!("{ns}/{kind}/{name}")
}

fn url_encode(s: &str) -> String {
    crate::stat::data::url_encode(s)
}

pub async fn workload(
    source: &Source,
    window: Duration,
    ns: &str,
    name: &str,
) -> Result<Workload, ApiError> {
    let seen = source
        .observe(window, &[])
        .await
        .map_err(ApiError::source)?;
    let seen = with_destination_nodes(seen);
    let me = deployment(ns, name);
    let row = workload_rows(&seen, Some(&me))
        .into_iter()
        .find(|w| w.namespace == ns && w.stat.name == name)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no workload deployment/{name} in namespace {ns}: no proxy of it reports to {}",
                source.describe()
            ))
        })?;
    // Its callers: by the node the series were given, which is the workload's also where
    // only the service was named.
    let mut inbound_sel = stat_cmd::edges_selection(&all_deployments(), None, None, None, DST_NODE);
    inbound_sel.matchers.extend([
        Matcher::eq("dst_namespace", ns),
        Matcher::eq(DST_NODE, format!("deployment/{name}")),
    ]);
    let outbound_sel = stat_cmd::edges_selection(&me, None, None, None, DST_NODE);
    let served = stat_cmd::routes_matchers(&me, None, None, None).map_err(ApiError::BadRequest)?;
    let routes = stat_cmd::route_rows(&seen, &stat_cmd::routes_selection(served))
        .into_iter()
        .map(|(stat, service)| RouteRow { stat, service })
        .collect();
    let pods = match stat_cmd::stat_selection(&me, None, None, None) {
        Ok(sel) => {
            let sel = Selection {
                group: vec!["namespace", "pod"],
                ..sel
            };
            stat_cmd::stat_rows(&seen, &sel, false)
                .into_iter()
                .map(|mut p| {
                    p.namespace = None;
                    p.meshed = None;
                    p
                })
                .collect()
        }
        Err(_) => Vec::new(),
    };
    Ok(Workload {
        window_seconds: seen.window.as_secs_f64(),
        workload: row,
        inbound: page_edges(&seen, &inbound_sel),
        outbound: page_edges(&seen, &outbound_sel),
        routes,
        pods,
    })
}

/// One minute per point, the last 15 minutes: what proxies keep.
const HISTORY_STEP: Duration = Duration::from_secs(60);
const HISTORY_POINTS: u32 = 15;

pub async fn history(source: &Source, ns: &str, name: &str) -> Result<History, ApiError> {
    let me = deployment(ns, name);
    let sel = stat_cmd::stat_selection(&me, None, None, None).map_err(ApiError::BadRequest)?;
    let windows = source
        .history(HISTORY_STEP, HISTORY_POINTS, &sel.matchers)
        .await
        .map_err(ApiError::source)?;
    let last = windows.len().saturating_sub(1);
    let key = vec![ns.to_string(), name.to_string()];
    let points = windows
        .iter()
        .enumerate()
        .map(|(i, seen)| {
            let ago_seconds = (last - i) as u64 * HISTORY_STEP.as_secs();
            let rows = view::aggregate(&seen.series, &sel, seen.window.as_secs_f64());
            match rows.get(&key) {
                Some(stats) => Point {
                    ago_seconds,
                    seconds: seen.window.as_secs_f64(),
                    success_rate: stats.success_rate(),
                    rps: stats.rps(),
                    requests: stats.requests().round() as u64,
                    latency_ms_p50: stats.latency(0.5),
                    latency_ms_p99: stats.latency(0.99),
                },
                None => Point {
                    ago_seconds,
                    seconds: seen.window.as_secs_f64(),
                    ..Point::default()
                },
            }
        })
        .collect();
    Ok(History {
        step_seconds: HISTORY_STEP.as_secs(),
        points,
    })
}

pub async fn topology(source: &Source, window: Duration) -> Result<Topology, ApiError> {
    let seen = with_destination_nodes(
        source
            .observe(window, &[])
            .await
            .map_err(ApiError::source)?,
    );
    let workloads = workload_rows(&seen, None);
    let sel = stat_cmd::edges_selection(&all_deployments(), None, None, None, DST_NODE);
    let mut edges = page_edges(&seen, &sel);

    // Nodes: every meshed workload, and every destination an edge names.
    let mut ids: BTreeSet<String> = BTreeSet::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut add = |nodes: &mut Vec<Node>, ns: &str, kind: &str, name: &str| {
        let id = node_id(ns, kind, name);
        if ids.insert(id.clone()) {
            let row = workloads
                .iter()
                .find(|w| kind == "deployment" && w.namespace == ns && w.stat.name == name);
            nodes.push(Node {
                id,
                namespace: ns.to_string(),
                name: name.to_string(),
                kind: kind.to_string(),
                x: 0.0,
                y: 0.0,
                w: layout::NODE_W,
                h: layout::NODE_H,
                meshed: row.and_then(|r| r.stat.meshed),
                success_rate: row.and_then(|r| r.stat.success_rate),
                rps: row.map_or(0.0, |r| r.stat.rps),
                sent_rps: 0.0,
                failing: row.is_some_and(|r| r.failing),
            });
        }
    };
    for w in &workloads {
        add(&mut nodes, &w.namespace, "deployment", &w.stat.name);
    }
    for e in &edges {
        add(&mut nodes, &e.edge.src_namespace, "deployment", &e.edge.src);
        add(&mut nodes, &e.edge.dst_namespace, &e.dst_kind, &e.edge.dst);
    }
    let index: BTreeMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    // Every edge's ends were added above: each pair is its edge's.
    let pairs: Vec<(usize, usize)> = edges
        .iter()
        .map(|e| {
            let at = |id: &str| index.get(id).copied().unwrap_or_default();
            (at(&e.src_id), at(&e.dst_id))
        })
        .collect();
    for (&(src, _), e) in pairs.iter().zip(&edges) {
        nodes[src].sent_rps += e.edge.rps;
    }
    let drawing = layout::layout(nodes.len(), &pairs);
    for (node, place) in nodes.iter_mut().zip(&drawing.nodes) {
        node.x = place.x;
        node.y = place.y;
    }
    let busiest = edges.iter().map(|e| e.edge.rps).fold(0.0, f64::max);
    for (edge, points) in edges.iter_mut().zip(drawing.edges) {
        edge.width = Some(layout::width(edge.edge.rps, busiest));
        edge.points = Some(points);
    }
    Ok(Topology {
        window_seconds: seen.window.as_secs_f64(),
        width: drawing.width,
        height: drawing.height,
        thresholds: Thresholds {
            failing_below: FAILING_BELOW,
            retry_heavy_above: RETRY_HEAVY_ABOVE,
        },
        nodes,
        edges,
    })
}

pub fn check(source: &Source) -> Check {
    let Some(dir) = source.config_dir() else {
        return Check::Unavailable {
            available: false,
            reason: format!(
                "check audits a config dir, and the dashboard reads {}: start it with --config-dir DIR",
                source.describe()
            ),
        };
    };
    match check::check_dir(dir, Default::default()) {
        Ok((findings, summary)) => Check::Found {
            available: true,
            dir: dir.display().to_string(),
            summary,
            findings,
        },
        Err(reason) => Check::Unavailable {
            available: false,
            reason,
        },
    }
}
