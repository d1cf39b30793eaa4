//! Filtering and summing [`Series`] into rows, and printing them as Linkerd's CLI does.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::data::Series;
use super::resource::Matcher;
use crate::demo::metrics::histogram_quantile;

/// What one row adds up: counts over the window (counters' increases), so a row's numbers
/// are exact sums and only [`Stats::rps`] divides.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// The window's length in seconds.
    pub seconds: f64,
    pub success: f64,
    pub failure: f64,
    /// `(le, count)`, summed by bound.
    pub buckets: Vec<(f64, f64)>,
    /// Open connections, where the proxies record them for the selection.
    pub tcp_conn: Option<f64>,
    /// Route requests asked for / sent to backends (retries included).
    pub requested: f64,
    pub actual: f64,
    /// Pods (proxies) seen for the row.
    pub pods: BTreeSet<String>,
    /// TLS of the row's traffic: `Some(true)` only if every series was `tls="true"`.
    pub secured: Option<bool>,
    /// Peer identities of the row's mTLS traffic (`server_id` outbound, `client_id` inbound).
    pub identities: BTreeSet<String>,
}

impl Stats {
    fn over(seconds: f64) -> Stats {
        Stats {
            seconds,
            ..Stats::default()
        }
    }

    /// Responses in the window.
    pub fn requests(&self) -> f64 {
        self.success + self.failure
    }

    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests() / self.seconds
        } else {
            0.0
        }
    }

    pub fn success_rate(&self) -> Option<f64> {
        let n = self.requests();
        (n > 0.0).then(|| self.success / n)
    }

    /// Retries per request (`actual / requested - 1`); `None` where nothing was requested or
    /// the attempts were not counted (inbound proxies don't retry).
    pub fn retry_ratio(&self) -> Option<f64> {
        (self.requested > 0.0 && self.actual > 0.0)
            .then(|| (self.actual / self.requested - 1.0).max(0.0))
    }

    pub fn latency(&self, q: f64) -> Option<f64> {
        let mut b = self.buckets.clone();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        histogram_quantile(q, &b)
    }

    fn add_bucket(&mut self, le: f64, v: f64) {
        match self.buckets.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += v,
            None => self.buckets.push((le, v)),
        }
    }
}

/// Which series a view reads, and how it groups them into rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub matchers: Vec<Matcher>,
    /// The row key: these labels' values, in order. Series missing one are left out.
    pub group: Vec<&'static str>,
    /// Read `route_response_*` instead of `response_*`.
    pub routes: bool,
    /// `peer` of the TCP connections counted (`src` inbound, `dst` outbound).
    pub tcp_peer: &'static str,
    /// Count the pods of `proxy_build_info` matching these (workload views only), so a
    /// workload without traffic still gets a row.
    pub meshed: Option<Vec<Matcher>>,
}

fn key_of(s: &Series, group: &[&'static str]) -> Option<Vec<String>> {
    group.iter().map(|g| s.labels.get(*g).cloned()).collect()
}

fn row(rows: &mut BTreeMap<Vec<String>, Stats>, key: Vec<String>, seconds: f64) -> &mut Stats {
    rows.entry(key).or_insert_with(|| Stats::over(seconds))
}

/// Sums the series (counts over a window of `seconds`) into one [`Stats`] per row key.
pub fn aggregate(series: &[Series], sel: &Selection, seconds: f64) -> BTreeMap<Vec<String>, Stats> {
    let (responses, latency) = if sel.routes {
        ("route_response_total", "route_response_latency_ms_bucket")
    } else {
        ("response_total", "response_latency_ms_bucket")
    };
    let mut rows: BTreeMap<Vec<String>, Stats> = BTreeMap::new();
    for s in series {
        if s.metric == "proxy_build_info" {
            let Some(meshed) = &sel.meshed else { continue };
            if meshed.iter().all(|m| m.matches(|k| s.label(k))) {
                if let (Some(key), Some(pod)) = (key_of(s, &sel.group), s.label("pod")) {
                    row(&mut rows, key, seconds).pods.insert(pod);
                }
            }
            continue;
        }
        if !sel.matchers.iter().all(|m| m.matches(|k| s.label(k))) {
            continue;
        }
        let Some(key) = key_of(s, &sel.group) else {
            continue;
        };
        let m = s.metric.as_str();
        if m == responses {
            let row = row(&mut rows, key, seconds);
            match s.labels.get("classification").map(String::as_str) {
                Some("success") => row.success += s.value,
                Some("failure") => row.failure += s.value,
                _ => {}
            }
            if !sel.routes && s.value > 0.0 {
                let tls = s.labels.get("tls").map(String::as_str) == Some("true");
                row.secured = Some(row.secured.unwrap_or(true) && tls);
                for id in ["server_id", "client_id"] {
                    if let Some(v) = s.labels.get(id).filter(|v| !v.is_empty()) {
                        row.identities.insert(v.clone());
                    }
                }
            }
        } else if m == latency {
            if let Some(le) = s.le {
                row(&mut rows, key, seconds).add_bucket(le, s.value);
            }
        } else if m == "tcp_open_connections" && !sel.routes {
            if s.labels.get("peer").map(String::as_str) == Some(sel.tcp_peer) {
                let row = row(&mut rows, key, seconds);
                row.tcp_conn = Some(row.tcp_conn.unwrap_or(0.0) + s.value);
            }
        } else if m == "route_request_total" {
            row(&mut rows, key, seconds).requested += s.value;
        } else if m == "route_actual_request_total" {
            row(&mut rows, key, seconds).actual += s.value;
        }
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------------

pub fn fmt_percent(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0))
}

pub fn fmt_rps(rps: f64) -> String {
    if rps > 0.0 {
        format!("{rps:.1}rps")
    } else {
        "-".into()
    }
}

pub fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 1.0 => format!("{v:.0}ms"),
        Some(v) => format!("{v:.1}ms"),
    }
}

/// Left-aligned columns, three spaces apart, as Linkerd's CLI prints them.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        let mut l = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            l.push_str(cell);
            if i + 1 < n {
                let pad = widths[i] - cell.chars().count() + 3;
                l.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// A row of `stat` / `routes` output, as `-o json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatRow {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Pods with a proxy, where the resource is a workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meshed: Option<usize>,
    pub success_rate: Option<f64>,
    /// Responses in the window (the count RPS is computed from).
    pub requests: u64,
    pub rps: f64,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p95: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    /// `None` where the proxies record no connections for the selection.
    pub tcp_conn: Option<f64>,
    pub retry_ratio: Option<f64>,
}

impl StatRow {
    pub fn new(
        name: String,
        namespace: Option<String>,
        meshed: Option<usize>,
        stats: &Stats,
        tcp: bool,
    ) -> StatRow {
        StatRow {
            name,
            namespace,
            meshed,
            success_rate: stats.success_rate(),
            requests: stats.requests().round() as u64,
            rps: stats.rps(),
            latency_ms_p50: stats.latency(0.5),
            latency_ms_p95: stats.latency(0.95),
            latency_ms_p99: stats.latency(0.99),
            tcp_conn: if tcp { stats.tcp_conn } else { None },
            retry_ratio: stats.retry_ratio(),
        }
    }

    fn cells(&self, first: &str, tcp: bool, wide: bool) -> Vec<String> {
        let mut c = vec![first.to_string()];
        if let Some(m) = self.meshed {
            c.push(format!("{m}/{m}"));
        }
        c.push(fmt_percent(self.success_rate));
        c.push(fmt_rps(self.rps));
        c.push(fmt_ms(self.latency_ms_p50));
        c.push(fmt_ms(self.latency_ms_p95));
        c.push(fmt_ms(self.latency_ms_p99));
        if tcp {
            c.push(self.tcp_conn.map_or("-".into(), |t| format!("{t:.0}")));
        }
        if wide {
            c.push(fmt_percent(self.retry_ratio));
        }
        c
    }
}

/// The `stat` / `routes` table: `first` heads the name column; `meshed` and `tcp` say whether
/// those columns exist.
pub fn stat_table(
    first: &str,
    extra: Option<&str>,
    rows: &[(StatRow, Option<String>)],
    meshed: bool,
    tcp: bool,
    wide: bool,
) -> String {
    let mut headers = vec![first];
    if let Some(e) = extra {
        headers.push(e);
    }
    if meshed {
        headers.push("MESHED");
    }
    headers.extend([
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P95",
        "LATENCY_P99",
    ]);
    if tcp {
        headers.push("TCP_CONN");
    }
    if wide {
        headers.push("RETRY%");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|(r, extra_cell)| {
            let mut c = r.cells(&r.name, tcp, wide);
            if let Some(e) = extra_cell {
                c.insert(1, e.clone());
            }
            c
        })
        .collect();
    table(&headers, &cells)
}

/// An edge between a source workload and a destination service.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Edge {
    pub src: String,
    pub dst: String,
    pub src_namespace: String,
    pub dst_namespace: String,
    pub secured: bool,
    /// The destination's mTLS identities (`server_id`), when secured.
    pub server_ids: Vec<String>,
    pub success_rate: Option<f64>,
    pub requests: u64,
    pub rps: f64,
    pub retry_ratio: Option<f64>,
    /// `failing` (success < 99.5%) and/or `retry-heavy` (retry ratio > 5%).
    pub flags: Vec<&'static str>,
}

pub const FAILING_BELOW: f64 = 0.995;
pub const RETRY_HEAVY_ABOVE: f64 = 0.05;

impl Edge {
    pub fn new(src_ns: &str, src: &str, dst_ns: &str, dst: &str, stats: &Stats) -> Edge {
        let success_rate = stats.success_rate();
        let retry_ratio = stats.retry_ratio();
        let mut flags = Vec::new();
        if success_rate.is_some_and(|s| s < FAILING_BELOW) {
            flags.push("failing");
        }
        if retry_ratio.is_some_and(|r| r > RETRY_HEAVY_ABOVE) {
            flags.push("retry-heavy");
        }
        Edge {
            src: src.into(),
            dst: dst.into(),
            src_namespace: src_ns.into(),
            dst_namespace: dst_ns.into(),
            secured: stats.secured == Some(true),
            server_ids: stats.identities.iter().cloned().collect(),
            success_rate,
            requests: stats.requests().round() as u64,
            rps: stats.rps(),
            retry_ratio,
            flags,
        }
    }
}

pub fn edges_table(edges: &[Edge]) -> String {
    let rows: Vec<Vec<String>> = edges
        .iter()
        .map(|e| {
            vec![
                e.src.clone(),
                e.dst.clone(),
                e.src_namespace.clone(),
                e.dst_namespace.clone(),
                if e.secured { "yes" } else { "no" }.into(),
                fmt_percent(e.success_rate),
                fmt_rps(e.rps),
                fmt_percent(e.retry_ratio),
                if e.server_ids.is_empty() {
                    "-".into()
                } else {
                    e.server_ids.join(",")
                },
                if e.flags.is_empty() {
                    String::new()
                } else {
                    format!("!! {}", e.flags.join(","))
                },
            ]
        })
        .collect();
    let mut out = table(
        &[
            "SRC",
            "DST",
            "SRC_NS",
            "DST_NS",
            "SECURED",
            "SUCCESS",
            "RPS",
            "RETRY%",
            "SERVER_ID",
            "",
        ],
        &rows,
    );
    let failing = edges
        .iter()
        .filter(|e| e.flags.contains(&"failing"))
        .count();
    let heavy = edges
        .iter()
        .filter(|e| e.flags.contains(&"retry-heavy"))
        .count();
    out.push_str(&format!(
        "\n{} edges: {failing} failing (success < {}%), {heavy} retry-heavy (retries > {}%)\n",
        edges.len(),
        FAILING_BELOW * 100.0,
        RETRY_HEAVY_ABOVE * 100.0
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(metric: &str, labels: &[(&str, &str)], le: Option<f64>, value: f64) -> Series {
        Series {
            metric: metric.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            le,
            value,
        }
    }

    #[test]
    fn aggregates_by_group_and_filters() {
        let web = [("direction", "inbound"), ("deployment", "web")];
        let api = [("direction", "inbound"), ("deployment", "api")];
        let s = vec![
            series(
                "response_total",
                &[web[0], web[1], ("classification", "success")],
                None,
                9.0,
            ),
            series(
                "response_total",
                &[web[0], web[1], ("classification", "failure")],
                None,
                1.0,
            ),
            series(
                "response_total",
                &[api[0], api[1], ("classification", "success")],
                None,
                5.0,
            ),
            series(
                "response_total",
                &[
                    ("direction", "outbound"),
                    web[1],
                    ("classification", "failure"),
                ],
                None,
                7.0,
            ),
            series("response_latency_ms_bucket", &web, Some(10.0), 10.0),
            series(
                "response_latency_ms_bucket",
                &web,
                Some(f64::INFINITY),
                10.0,
            ),
            series(
                "tcp_open_connections",
                &[web[0], web[1], ("peer", "src")],
                None,
                2.0,
            ),
            series(
                "tcp_open_connections",
                &[web[0], web[1], ("peer", "dst")],
                None,
                5.0,
            ),
            series(
                "proxy_build_info",
                &[("deployment", "web"), ("pod", "web-0")],
                None,
                1.0,
            ),
            series(
                "proxy_build_info",
                &[("deployment", "db"), ("pod", "db-0")],
                None,
                1.0,
            ),
        ];
        let sel = Selection {
            matchers: vec![Matcher::eq("direction", "inbound")],
            group: vec!["deployment"],
            routes: false,
            tcp_peer: "src",
            meshed: Some(vec![]),
        };
        let rows = aggregate(&s, &sel, 2.0);
        assert_eq!(rows.len(), 3, "{rows:?}");
        let w = &rows[&vec!["web".to_string()]];
        assert_eq!((w.requests(), w.rps()), (10.0, 5.0));
        assert_eq!(w.success_rate(), Some(0.9));
        assert_eq!(w.tcp_conn, Some(2.0));
        assert_eq!(w.pods.len(), 1);
        assert_eq!(w.latency(0.5), Some(5.0));
        // A meshed workload without traffic still has a row.
        let db = &rows[&vec!["db".to_string()]];
        assert_eq!((db.rps(), db.success_rate()), (0.0, None));
    }

    #[test]
    fn retry_ratio_from_route_series() {
        let s = Stats {
            requested: 10.0,
            actual: 11.0,
            ..Stats::default()
        };
        assert!((s.retry_ratio().expect("ratio") - 0.1).abs() < 1e-9);
        assert_eq!(Stats::default().retry_ratio(), None);
        let uncounted = Stats {
            requested: 10.0,
            ..Stats::default()
        };
        assert_eq!(uncounted.retry_ratio(), None);
    }

    #[test]
    fn formats_like_linkerd() {
        assert_eq!(fmt_percent(Some(0.99123)), "99.12%");
        assert_eq!(fmt_percent(None), "-");
        assert_eq!(fmt_rps(12.34), "12.3rps");
        assert_eq!(fmt_rps(0.0), "-");
        assert_eq!(fmt_ms(Some(4.2)), "4ms");
        assert_eq!(fmt_ms(Some(0.52)), "0.5ms");
        let t = table(
            &["NAME", "SUCCESS", "RPS"],
            &[
                vec!["web".into(), "99.12%".into(), "12.3rps".into()],
                vec!["longer-name".into(), "-".into(), "-".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME          SUCCESS   RPS\n\
             web           99.12%    12.3rps\n\
             longer-name   -         -\n"
        );
    }

    #[test]
    fn edges_are_flagged_and_summarised() {
        let bad = Stats {
            success: 90.0,
            failure: 10.0,
            requested: 100.0,
            actual: 120.0,
            secured: Some(false),
            ..Stats::default()
        };
        let good = Stats {
            success: 100.0,
            ..Stats::default()
        };
        let edges = vec![
            Edge::new("default", "client", "default", "web", &bad),
            Edge::new("default", "client", "default", "api", &good),
        ];
        assert_eq!(edges[0].flags, vec!["failing", "retry-heavy"]);
        assert!(edges[1].flags.is_empty());
        let t = edges_table(&edges);
        assert!(
            t.starts_with("SRC      DST   SRC_NS    DST_NS    SECURED   SUCCESS   RPS"),
            "{t}"
        );
        assert!(t.contains("!! failing,retry-heavy"), "{t}");
        assert!(
            t.contains("2 edges: 1 failing (success < 99.5%), 1 retry-heavy (retries > 5%)"),
            "{t}"
        );
    }
}
