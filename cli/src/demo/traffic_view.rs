//! What the demo prints: per-endpoint request rate, success rate and latency quantiles computed
//! from two scrapes of the proxies' metrics, as a table (or JSON lines with `-o json`).

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use clap::ValueEnum;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::load_generator::LoadReport;
use super::metrics::{per_second, ProxyTraffic, TrafficCounters};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// What the view needs to know about one endpoint.
#[derive(Clone, Debug)]
pub struct EndpointInfo {
    pub pod: String,
    pub behaviour: &'static str,
    pub target_addr: SocketAddr,
    pub admin: SocketAddr,
}

/// The whole mesh, for the header.
#[derive(Clone, Debug)]
pub struct MeshInfo {
    /// What the client calls, `host:port`.
    pub authority: String,
    /// The same without the port, as the client writes it in URLs and `Host`.
    pub host: String,
    pub config_dir: String,
    /// The mTLS identities: the client's, then the service's.
    pub identities: (String, String),
    pub outbound_listener: SocketAddr,
    pub outbound_admin: SocketAddr,
    pub endpoints: Vec<EndpointInfo>,
    pub rps: u32,
    pub duration: Option<Duration>,
    /// Where the demo's dashboard serves.
    pub dashboard: SocketAddr,
}

/// One scrape of every proxy. `inbound[i]` is endpoint `i`'s own proxy (None if unreachable).
#[derive(Clone, Debug)]
pub struct MeshScrape {
    pub at: Instant,
    pub outbound: ProxyTraffic,
    pub inbound: Vec<Option<ProxyTraffic>>,
}

/// An endpoint's traffic between two scrapes.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointStats {
    pub name: String,
    pub behaviour: &'static str,
    pub target_addr: String,
    pub requests: f64,
    pub rps: f64,
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Success as the endpoint's own inbound proxy counted it.
    pub inbound_success_rate: Option<f64>,
}

impl EndpointStats {
    fn from_counters(
        name: String,
        behaviour: &'static str,
        target_addr: String,
        outbound: &TrafficCounters,
        inbound: Option<&TrafficCounters>,
        elapsed: Duration,
    ) -> EndpointStats {
        EndpointStats {
            name,
            behaviour,
            target_addr,
            requests: outbound.requests,
            rps: per_second(outbound.requests, elapsed),
            success_rate: outbound.success_rate(),
            p50_ms: outbound.latency_ms.quantile(0.5),
            p99_ms: outbound.latency_ms.quantile(0.99),
            inbound_success_rate: inbound.and_then(TrafficCounters::success_rate),
        }
    }
}

/// Per-endpoint stats (and a total row) for the traffic between `before` and `now`.
pub fn endpoint_stats(
    mesh: &MeshInfo,
    before: &MeshScrape,
    now: &MeshScrape,
) -> (Vec<EndpointStats>, EndpointStats) {
    let elapsed = now.at.saturating_duration_since(before.at);
    let mut rows = Vec::with_capacity(mesh.endpoints.len());
    let mut total_out = TrafficCounters::default();
    let mut total_in = TrafficCounters::default();
    let mut inbound_complete = true;
    for (i, endpoint) in mesh.endpoints.iter().enumerate() {
        let target = endpoint.target_addr.to_string();
        let outbound = now
            .outbound
            .outbound_to(&target)
            .since(&before.outbound.outbound_to(&target));
        let inbound = match (now.inbound.get(i), before.inbound.get(i)) {
            (Some(Some(now)), Some(Some(before))) => Some(now.inbound.since(&before.inbound)),
            _ => None,
        };
        total_out.add_all(&outbound);
        match &inbound {
            Some(inbound) => total_in.add_all(inbound),
            None => inbound_complete = false,
        }
        rows.push(EndpointStats::from_counters(
            endpoint.pod.clone(),
            endpoint.behaviour,
            target,
            &outbound,
            inbound.as_ref(),
            elapsed,
        ));
    }
    let total = EndpointStats::from_counters(
        "TOTAL".to_owned(),
        "-",
        "-".to_owned(),
        &total_out,
        inbound_complete.then_some(&total_in),
        elapsed,
    );
    (rows, total)
}

fn percent(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".to_owned(), |r| format!("{:.2}%", r * 100.0))
}

fn millis(ms: Option<f64>) -> String {
    match ms {
        None => "-".to_owned(),
        Some(ms) if ms < 10.0 => format!("{ms:.1}ms"),
        Some(ms) => format!("{ms:.0}ms"),
    }
}

fn opt_json(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |v| json!(v))
}

impl EndpointStats {
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "behaviour": self.behaviour,
            "target_addr": self.target_addr,
            "requests": self.requests,
            "rps": self.rps,
            "success_rate": opt_json(self.success_rate),
            "latency_p50_ms": opt_json(self.p50_ms),
            "latency_p99_ms": opt_json(self.p99_ms),
            "inbound_success_rate": opt_json(self.inbound_success_rate),
        })
    }
}

/// One row per endpoint and a total; `count` is the per-second rate or the run's total.
fn endpoint_table(
    rows: &[EndpointStats],
    total: &EndpointStats,
    count_header: &str,
    count: impl Fn(&EndpointStats) -> String,
) -> String {
    let headers = [
        "ENDPOINT",
        "BEHAVIOUR",
        "TARGET_ADDR",
        count_header,
        "SUCCESS",
        "LATENCY_P50",
        "LATENCY_P99",
        "INBOUND_SUCCESS",
    ];
    let cells = |s: &EndpointStats| {
        vec![
            s.name.clone(),
            s.behaviour.to_owned(),
            s.target_addr.clone(),
            count(s),
            percent(s.success_rate),
            millis(s.p50_ms),
            millis(s.p99_ms),
            percent(s.inbound_success_rate),
        ]
    };
    let mut table_rows: Vec<Vec<String>> = rows.iter().map(cells).collect();
    table_rows.push(cells(total));
    render_table(&headers, &table_rows, 3)
}

/// Lays out rows under headers; the first `left` columns are left-aligned, the rest right.
fn render_table(headers: &[&str], rows: &[Vec<String>], left: usize) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            if i < left {
                let _ = write!(line, "{cell:<w$}");
            } else {
                let _ = write!(line, "{cell:>w$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Prints the demo's output in the chosen format.
pub struct Printer {
    format: OutputFormat,
    authority: String,
    /// On a terminal each table redraws the screen; otherwise tables are appended.
    redraw: bool,
    mesh_info: String,
}

impl Printer {
    pub fn new(format: OutputFormat) -> Printer {
        Printer {
            format,
            authority: String::new(),
            redraw: format == OutputFormat::Table && std::io::stdout().is_terminal(),
            mesh_info: String::new(),
        }
    }

    fn emit(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        // A closed stdout (e.g. `| head`) must not stop the demo from cleaning up.
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
    }

    /// Progress during startup goes to stderr, leaving stdout for the tables.
    pub fn progress(&self, message: &str) {
        if self.format == OutputFormat::Table {
            eprintln!("  {message}");
        }
    }

    pub fn mesh(&mut self, mesh: &MeshInfo) {
        self.authority = mesh.authority.clone();
        match self.format {
            OutputFormat::Json => {
                let event = json!({
                    "event": "mesh",
                    "authority": mesh.authority,
                    "config_dir": mesh.config_dir,
                    "client_identity": mesh.identities.0,
                    "server_identity": mesh.identities.1,
                    "outbound_listener": mesh.outbound_listener.to_string(),
                    "outbound_admin": mesh.outbound_admin.to_string(),
                    "rps": mesh.rps,
                    "duration_secs": mesh.duration.map(|d| d.as_secs_f64()),
                    "dashboard": format!("http://{}/", mesh.dashboard),
                    "endpoints": mesh.endpoints.iter().map(|e| json!({
                        "name": e.pod,
                        "behaviour": e.behaviour,
                        "target_addr": e.target_addr.to_string(),
                        "admin": e.admin.to_string(),
                    })).collect::<Vec<_>>(),
                });
                self.emit(&format!("{event}\n"));
            }
            OutputFormat::Table => {
                let mut text = String::new();
                let run = match mesh.duration {
                    Some(d) => format!("for {}s (Ctrl-C stops early)", d.as_secs_f64()),
                    None => "until Ctrl-C".to_owned(),
                };
                let _ = writeln!(
                    text,
                    "pylon demo: {} rps to http://{}/predict through the outbound proxy, {run}",
                    mesh.rps, mesh.host
                );
                let _ = writeln!(
                    text,
                    "dashboard   http://{}/   (workloads, topology, live tap: open it in a browser)",
                    mesh.dashboard
                );
                let _ = writeln!(text, "config dir  {}", mesh.config_dir);
                let _ = writeln!(
                    text,
                    "mTLS        {} -> {}",
                    mesh.identities.0, mesh.identities.1
                );
                let _ = writeln!(
                    text,
                    "admin       {:<15} http://{}/metrics",
                    "outbound", mesh.outbound_admin
                );
                for e in &mesh.endpoints {
                    let _ = writeln!(text, "admin       {:<15} http://{}/metrics", e.pod, e.admin);
                }
                let _ = writeln!(
                    text,
                    "try         curl -X POST -H 'Host: {}' http://{}/predict",
                    mesh.host, mesh.outbound_listener
                );
                // Every proxy of the demo is listed in its config dir (pods.yaml).
                let dir = format!(" --config-dir {}", mesh.config_dir);
                let _ = writeln!(
                    text,
                    "look        pylon stat deploy/ml-inference{dir} --window 10s"
                );
                let _ = writeln!(
                    text,
                    "            pylon routes deploy/loadgen --to svc/ml-inference{dir} --window 10s"
                );
                let _ = writeln!(text, "            pylon edges deployment{dir} --window 10s");
                let _ = writeln!(
                    text,
                    "            pylon tap deploy/loadgen --path /predict{dir} --limit 3"
                );
                let _ = writeln!(text, "            pylon top deploy/loadgen{dir} --once 10s");
                self.emit(&format!("{text}\n"));
                self.mesh_info = text;
            }
        }
    }

    /// One interval's table.
    pub fn interval(&self, since_start: Duration, rows: &[EndpointStats], total: &EndpointStats) {
        match self.format {
            OutputFormat::Json => {
                let event = json!({
                    "event": "interval",
                    "elapsed_secs": since_start.as_secs_f64(),
                    "endpoints": rows.iter().map(EndpointStats::to_json).collect::<Vec<_>>(),
                    "total": total.to_json(),
                });
                self.emit(&format!("{event}\n"));
            }
            OutputFormat::Table => {
                let table = endpoint_table(rows, total, "RPS", |s| format!("{:.1}", s.rps));
                let mut text = String::new();
                if self.redraw {
                    text.push_str("\x1b[H\x1b[2J");
                    text.push_str(&self.mesh_info);
                    text.push('\n');
                }
                let _ = writeln!(
                    text,
                    "[{:>4.0}s] outbound proxy's view of {}, last second:",
                    since_start.as_secs_f64(),
                    self.authority
                );
                text.push_str(&table);
                text.push('\n');
                self.emit(&text);
            }
        }
    }

    /// The whole run, from the proxies' counters, and the client's own count.
    pub fn summary(
        &self,
        run: Duration,
        rows: &[EndpointStats],
        total: &EndpointStats,
        load: &LoadReport,
    ) {
        match self.format {
            OutputFormat::Json => {
                let event = json!({
                    "event": "summary",
                    "elapsed_secs": run.as_secs_f64(),
                    "endpoints": rows.iter().map(EndpointStats::to_json).collect::<Vec<_>>(),
                    "total": total.to_json(),
                    "load_generator": {
                        "sent": load.sent,
                        "succeeded": load.succeeded,
                        "failed": load.failed,
                        "proxy_errors": load.proxy_errors,
                        "transport_errors": load.transport_errors,
                        "skipped": load.skipped,
                    },
                });
                self.emit(&format!("{event}\n"));
            }
            OutputFormat::Table => {
                let table =
                    endpoint_table(rows, total, "REQUESTS", |s| format!("{:.0}", s.requests));
                let mut text = format!(
                    "summary of {:.1}s, from the proxies' counters:\n",
                    run.as_secs_f64()
                );
                text.push_str(&table);
                for row in rows {
                    let share = row.requests / total.requests;
                    if total.requests > 0.0 && share < 0.1 {
                        let _ = writeln!(
                            text,
                            "note: {} ({}) got {:.1}% of the requests: the outbound proxy balances \
                             by latency (P2C over PeakEWMA) and prefers faster endpoints",
                            row.name,
                            row.behaviour,
                            share * 100.0
                        );
                    }
                }
                let _ = writeln!(
                    text,
                    "load generator: sent {}, 2xx {}, app errors {}, proxy errors {}, \
                     no response {}, skipped (too many in flight) {}",
                    load.sent,
                    load.succeeded,
                    load.failed,
                    load.proxy_errors,
                    load.transport_errors,
                    load.skipped
                );
                self.emit(&text);
            }
        }
    }

    /// A problem worth telling the user that doesn't stop the demo.
    pub fn warn(&self, message: &str) {
        eprintln!("pylon demo: warning: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(requests: u64, ok: u64, failed: u64, le5: u64) -> String {
        format!(
            "# TYPE response_latency_ms histogram\n\
             request_total{{direction=\"outbound\",target_addr=\"127.0.0.1:4001\"}} {requests}\n\
             response_total{{direction=\"outbound\",target_addr=\"127.0.0.1:4001\",classification=\"success\"}} {ok}\n\
             response_total{{direction=\"outbound\",target_addr=\"127.0.0.1:4001\",classification=\"failure\"}} {failed}\n\
             response_latency_ms_bucket{{direction=\"outbound\",target_addr=\"127.0.0.1:4001\",le=\"5\"}} {le5}\n\
             response_latency_ms_bucket{{direction=\"outbound\",target_addr=\"127.0.0.1:4001\",le=\"+Inf\"}} {requests}\n"
        )
    }

    #[test]
    fn stats_are_rates_over_the_interval() {
        let mesh = MeshInfo {
            authority: "ml-inference.default.svc.cluster.local:80".to_owned(),
            host: "ml-inference.default.svc.cluster.local".to_owned(),
            config_dir: "/tmp/x".to_owned(),
            identities: ("a".to_owned(), "b".to_owned()),
            outbound_listener: "127.0.0.1:4140".parse().expect("addr"),
            outbound_admin: "127.0.0.1:4191".parse().expect("addr"),
            endpoints: vec![EndpointInfo {
                pod: "ml-inference-1".to_owned(),
                behaviour: "healthy",
                target_addr: "127.0.0.1:4001".parse().expect("addr"),
                admin: "127.0.0.1:4002".parse().expect("addr"),
            }],
            rps: 10,
            duration: None,
            dashboard: "127.0.0.1:50750".parse().expect("addr"),
        };
        let t0 = Instant::now();
        let before = MeshScrape {
            at: t0,
            outbound: ProxyTraffic::parse(&exposition(10, 10, 0, 10)).expect("parses"),
            inbound: vec![None],
        };
        let now = MeshScrape {
            at: t0 + Duration::from_secs(2),
            outbound: ProxyTraffic::parse(&exposition(30, 28, 2, 20)).expect("parses"),
            inbound: vec![None],
        };
        let (rows, total) = endpoint_stats(&mesh, &before, &now);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.requests, 20.0);
        assert_eq!(r.rps, 10.0);
        assert_eq!(r.success_rate, Some(0.9));
        // 10 of the 20 new observations are <= 5 ms: the median is the top of that bucket.
        assert_eq!(r.p50_ms, Some(5.0));
        // p99 falls in +Inf: the highest finite bound.
        assert_eq!(r.p99_ms, Some(5.0));
        assert_eq!(r.inbound_success_rate, None);
        assert_eq!(total.requests, 20.0);
        assert_eq!(total.success_rate, Some(0.9));
    }

    #[test]
    fn table_aligns_columns() {
        let t = render_table(
            &["NAME", "RPS"],
            &[
                vec!["a".into(), "1.0".into()],
                vec!["longer".into(), "10.0".into()],
            ],
            1,
        );
        assert_eq!(t, "NAME     RPS\na        1.0\nlonger  10.0\n");
    }

    #[test]
    fn formats_percent_and_millis() {
        assert_eq!(percent(Some(0.98)), "98.00%");
        assert_eq!(percent(None), "-");
        assert_eq!(millis(Some(2.345)), "2.3ms");
        assert_eq!(millis(Some(31.6)), "32ms");
        assert_eq!(millis(None), "-");
    }
}
