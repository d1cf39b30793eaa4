//! `pylon stat`, `pylon routes`, `pylon edges`: the mesh's golden metrics per resource, per
//! route and per edge, read from the proxies' Linkerd-compatible metrics.
//!
//! - [`resource`]: `deployment/web`, `svc/web`, ... and the label matchers selecting them;
//! - [`data`]: the numbers, from each proxy's own rolling window on its admin port
//!   (`--proxy`, `--config-dir`: up to 15 minutes, at once) or from Prometheus (`--prometheus`,
//!   counter values at the window's two ends);
//! - [`view`]: filtering and summing series into rows, and the tables and JSON.
//!
//! What the metrics can say: inbound series are the receiving workload's own (its
//! `deployment`, `namespace`, `pod` labels) and name the client only by its mTLS identity
//! (`client_id`, a service account, not a workload); outbound series carry the client workload's labels and the destination
//! service (`dst_service`, `dst_namespace`). So `stat deploy/web` is what web received,
//! `stat deploy/client --to svc/web` and `stat svc/web --from deploy/client` what client sent
//! to web, and `edges` pairs client workloads with destination services.
//!
//! Exit codes: 0 the table was printed; 1 the data could not be had (a proxy or Prometheus
//! unreachable, no traffic in the window); 2 the command line is wrong.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, ValueEnum};

pub mod data;
pub mod resource;
pub mod view;

use data::Observed;
use resource::{service_of_authority, Kind, Matcher, Resource};
use view::{Edge, Selection, StatRow};

/// Where the numbers come from, and how to print them (shared by the three verbs).
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// A proxy's admin address (`/metrics`) to scrape; repeat for every proxy of the mesh.
    #[arg(long = "proxy", value_name = "ADMIN_ADDR")]
    proxies: Vec<SocketAddr>,

    /// Scrape every meshed pod listed in this config dir (Pods with a `pylon-admin` port).
    #[arg(long, value_name = "DIR", conflicts_with = "prometheus")]
    config_dir: Option<PathBuf>,

    /// Read from Prometheus instead (`http://host:port`), which scrapes the proxies.
    #[arg(long, value_name = "URL", conflicts_with = "proxies")]
    prometheus: Option<String>,

    /// The time window (Go-style duration: 30s, 1m, 1m30s): up to 15m from the proxies (they
    /// keep it and answer at once), any length from Prometheus.
    #[arg(long, short = 'w', default_value = "1m")]
    window: String,

    /// Namespace of the resources named.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,

    /// Every namespace.
    #[arg(long, short = 'A')]
    all_namespaces: bool,

    /// Output: a table, a wider table (adds RETRY%), or JSON for machines.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Json,
}

#[derive(Args, Debug)]
pub struct StatArgs {
    /// `deployment/NAME` (or `deployment` for all), `pod/NAME`, `ns/NAME`, `svc/NAME`,
    /// `authority/HOST`.
    #[arg(value_name = "RESOURCE")]
    resource: String,

    /// Traffic RESOURCE sends to this resource (`svc/NAME` or `authority/HOST`).
    #[arg(long, value_name = "RESOURCE", conflicts_with = "from")]
    to: Option<String>,

    /// Traffic RESOURCE receives from this resource (RESOURCE a `svc/` or `authority/`, this a
    /// workload: inbound metrics name clients by mTLS service account, not by workload).
    #[arg(long, value_name = "RESOURCE")]
    from: Option<String>,

    #[command(flatten)]
    source: SourceArgs,
}

#[derive(Args, Debug)]
pub struct RoutesArgs {
    /// The workload whose served (inbound) routes to show (`deployment/NAME`...), or
    /// `svc/NAME` for every client's routes to that service.
    #[arg(value_name = "RESOURCE")]
    resource: String,

    /// Instead, the routes RESOURCE calls on this destination (`svc/NAME` or
    /// `authority/HOST`), as its outbound proxy saw them.
    #[arg(long, value_name = "RESOURCE")]
    to: Option<String>,

    #[command(flatten)]
    source: SourceArgs,
}

#[derive(Args, Debug)]
pub struct EdgesArgs {
    /// The kind of the edges' sources: `deployment`, `pod` or `ns`.
    #[arg(value_name = "RESOURCE-KIND")]
    kind: String,

    #[command(flatten)]
    source: SourceArgs,
}

/// A failure with its exit code.
struct Failure(u8, anyhow::Error);

fn usage(msg: impl std::fmt::Display) -> Failure {
    Failure(2, anyhow::anyhow!("{msg}"))
}

fn finish(verb: &str, result: Result<String, Failure>) -> ExitCode {
    match result {
        Ok(text) => match std::io::stdout().lock().write_all(text.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pylon {verb}: error: writing the output: {e}");
                ExitCode::FAILURE
            }
        },
        Err(Failure(code, e)) => {
            eprintln!("pylon {verb}: error: {e:#}");
            ExitCode::from(code)
        }
    }
}

pub fn run_stat(args: StatArgs) -> ExitCode {
    finish("stat", stat(args))
}

pub fn run_routes(args: RoutesArgs) -> ExitCode {
    finish("routes", routes(args))
}

pub fn run_edges(args: EdgesArgs) -> ExitCode {
    finish("edges", edges(args))
}

/// Parses `--window`.
pub fn parse_window(s: &str) -> Result<Duration, String> {
    let d = pylon_proxy_policy::duration::parse(s).map_err(|e| format!("bad --window: {e}"))?;
    if d < Duration::from_millis(100) {
        return Err(format!("bad --window {s:?}: must be at least 100ms"));
    }
    Ok(d)
}

fn parse_resource(s: &str) -> Result<Resource, Failure> {
    Resource::parse(s).map_err(usage)
}

/// The series over the window, from wherever the flags say.
fn fetch(src: &SourceArgs, matchers: &[Matcher]) -> Result<Observed, Failure> {
    let window = parse_window(&src.window).map_err(usage)?;
    if src.proxies.is_empty() && src.config_dir.is_none() && src.prometheus.is_none() {
        return Err(usage(
            "no data source: give --proxy ADMIN_ADDR (repeatable, e.g. --proxy 127.0.0.1:4191), --config-dir DIR or --prometheus URL",
        ));
    }
    let proxies = crate::proxies::resolve(&src.proxies, src.config_dir.as_deref())
        .map_err(|e| Failure(1, e))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(1, anyhow::anyhow!("starting the runtime: {e}")))?;
    let result = rt.block_on(async {
        match &src.prometheus {
            Some(url) => data::from_prometheus(url, window, matchers).await,
            None => data::from_proxies(&proxies, window).await,
        }
    });
    result.map_err(|e| Failure(1, e))
}

fn namespace(src: &SourceArgs) -> Option<&str> {
    (!src.all_namespaces).then_some(src.namespace.as_str())
}

/// Where `--to`/`--from` may point: a destination that outbound series name.
fn destination(r: &Resource, flag: &str) -> Result<(), Failure> {
    match r.kind {
        // Outbound series carry the destination's `dst_deployment`/`dst_pod` (from the
        // control plane, or the config dir's Pods) as well as its service and authority.
        Kind::Service | Kind::Authority | Kind::Deployment | Kind::Pod if r.name.is_some() => {
            Ok(())
        }
        _ => Err(usage(format!(
            "{flag} {r}: expected deployment/NAME, pod/NAME, svc/NAME or authority/HOST"
        ))),
    }
}

/// The selection `stat` reads, and whether the rows are workloads (MESHED, TCP columns).
pub fn stat_selection(
    res: &Resource,
    to: Option<&Resource>,
    from: Option<&Resource>,
    ns: Option<&str>,
) -> Result<Selection, String> {
    let outbound = Matcher::eq("direction", "outbound");
    let mut sel = Selection {
        matchers: vec![],
        group: res.group_labels(),
        routes: false,
        tcp_peer: "dst",
        meshed: None,
    };
    match (to, from) {
        (Some(to), _) => {
            if !res.kind.is_workload() {
                return Err(format!(
                    "--to: {res} is not a workload; traffic is sent by deployments, pods or namespaces (try `pylon stat svc/NAME --from deploy/CLIENT`)"
                ));
            }
            sel.matchers.push(outbound);
            sel.matchers.extend(res.matchers(ns));
            sel.matchers.extend(to.dst_matchers(ns));
            sel.meshed = Some(res.matchers(ns));
        }
        (None, Some(from)) => {
            if res.kind.is_workload() {
                return Err(format!(
                    "--from: the proxies' inbound metrics carry no client identity by workload (with mTLS, `client_id` names a service account), so traffic {res} received cannot be split by deployment; try `pylon stat {from} --to svc/NAME`"
                ));
            }
            if !from.kind.is_workload() {
                return Err(format!(
                    "--from {from}: expected a workload (deployment/NAME, pod/NAME, ns/NAME)"
                ));
            }
            sel.matchers.push(outbound);
            sel.matchers.extend(from.matchers(ns));
            sel.matchers.extend(res.matchers(ns));
        }
        (None, None) if res.kind.is_workload() => {
            sel.matchers.push(Matcher::eq("direction", "inbound"));
            sel.matchers.extend(res.matchers(ns));
            sel.tcp_peer = "src";
            sel.meshed = Some(res.matchers(ns));
        }
        (None, None) => {
            sel.matchers.push(outbound);
            sel.matchers.extend(res.matchers(ns));
        }
    }
    Ok(sel)
}

fn render<T: serde::Serialize>(output: Output, json: &T, table: String) -> Result<String, Failure> {
    match output {
        Output::Json => serde_json::to_string_pretty(json)
            .map(|s| s + "\n")
            .map_err(|e| Failure(1, anyhow::anyhow!("rendering JSON: {e}"))),
        _ => Ok(table),
    }
}

fn no_traffic(what: &str, window: &str) -> Failure {
    Failure(
        1,
        anyhow::anyhow!(
            "no traffic for {what} in the last {window} (check the resource name and -n, and that traffic is flowing)"
        ),
    )
}

fn stat(args: StatArgs) -> Result<String, Failure> {
    let res = parse_resource(&args.resource)?;
    let to = args.to.as_deref().map(parse_resource).transpose()?;
    let from = args.from.as_deref().map(parse_resource).transpose()?;
    if let Some(to) = &to {
        destination(to, "--to")?;
    }
    let src = &args.source;
    let sel = stat_selection(&res, to.as_ref(), from.as_ref(), namespace(src)).map_err(usage)?;
    let seen = fetch(src, &sel.matchers)?;
    let rows = view::aggregate(&seen.series, &sel, seen.window.as_secs_f64());
    let workload = sel.meshed.is_some();
    let out: Vec<StatRow> = rows
        .iter()
        .map(|(key, stats)| {
            let (ns, name) = split_key(key);
            let meshed = workload.then_some(stats.pods.len());
            StatRow::new(name, ns, meshed, stats, workload || to.is_some())
        })
        .collect();
    if out.iter().all(|r| r.requests == 0) {
        let mut what = res.to_string();
        if let Some(to) = &to {
            what = format!("{what} to {to}");
        }
        if let Some(from) = &from {
            what = format!("{what} from {from}");
        }
        return Err(no_traffic(&what, &src.window));
    }
    let table = view::stat_table(
        "NAME",
        None,
        &out.iter().cloned().map(|r| (r, None)).collect::<Vec<_>>(),
        workload,
        workload || to.is_some(),
        src.output == Output::Wide,
    );
    render(src.output, &serde_json::json!({ "rows": out }), table)
}

/// A row key `[namespace, name]` or `[name]`.
fn split_key(key: &[String]) -> (Option<String>, String) {
    match key {
        [ns, name] => (Some(ns.clone()), name.clone()),
        [name] => (None, name.clone()),
        _ => (None, key.join("/")),
    }
}

fn routes(args: RoutesArgs) -> Result<String, Failure> {
    let res = parse_resource(&args.resource)?;
    let to = args.to.as_deref().map(parse_resource).transpose()?;
    if let Some(to) = &to {
        destination(to, "--to")?;
        // Route series name their destination by authority (a ServiceProfile is a service's).
        if matches!(to.kind, Kind::Deployment | Kind::Pod) {
            return Err(usage(format!(
                "--to {to}: routes belong to a destination service's ServiceProfile; use --to svc/NAME"
            )));
        }
    }
    let src = &args.source;
    let ns = namespace(src);
    // A workload's own routes are those it serves (inbound), as Linkerd shows them; with
    // --to, or for a service, those its clients call (outbound).
    let direction = if to.is_none() && res.kind.is_workload() {
        "inbound"
    } else {
        "outbound"
    };
    let mut matchers = vec![Matcher::eq("direction", direction)];
    matchers.extend(res.matchers(ns));
    if let Some(to) = &to {
        matchers.extend(to.matchers(ns));
    }
    let sel = Selection {
        matchers,
        group: vec!["authority", "rt_route"],
        routes: true,
        tcp_peer: "dst",
        meshed: None,
    };
    let seen = fetch(src, &sel.matchers)?;
    let rows = view::aggregate(&seen.series, &sel, seen.window.as_secs_f64());
    let out: Vec<(StatRow, Option<String>)> = rows
        .iter()
        .filter(|(_, stats)| stats.requests() > 0.0 || stats.requested > 0.0)
        .filter_map(|(key, stats)| {
            let [authority, route] = key.as_slice() else {
                return None;
            };
            let service = service_of_authority(authority)
                .map(|(svc, _)| svc)
                .unwrap_or_else(|| authority.clone());
            Some((
                StatRow::new(route.clone(), None, None, stats, false),
                Some(service),
            ))
        })
        .collect();
    if out.iter().all(|(r, _)| r.requests == 0) {
        return Err(no_traffic(&format!("the routes of {res}"), &src.window));
    }
    let table = view::stat_table(
        "ROUTE",
        Some("SERVICE"),
        &out,
        false,
        false,
        src.output == Output::Wide,
    );
    let json: Vec<serde_json::Value> = out
        .iter()
        .map(|(row, service)| {
            let mut v = serde_json::to_value(row).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("service".into(), serde_json::json!(service));
            }
            v
        })
        .collect();
    render(src.output, &serde_json::json!({ "rows": json }), table)
}

fn edges(args: EdgesArgs) -> Result<String, Failure> {
    let res = parse_resource(&args.kind)?;
    if !res.kind.is_workload() {
        return Err(usage(format!(
            "edges {res}: the sources of edges are workloads: deployment, pod or ns"
        )));
    }
    let src = &args.source;
    let mut matchers = vec![Matcher::eq("direction", "outbound")];
    matchers.extend(res.matchers(namespace(src)));
    let sel = Selection {
        matchers,
        group: vec![
            "namespace",
            res.kind.name_label(),
            "dst_namespace",
            "dst_service",
        ],
        routes: false,
        tcp_peer: "dst",
        meshed: None,
    };
    let seen = fetch(src, &sel.matchers)?;
    let edges: Vec<Edge> = view::aggregate(&seen.series, &sel, seen.window.as_secs_f64())
        .iter()
        .filter(|(_, s)| s.requests() > 0.0)
        .filter_map(|(key, stats)| match key.as_slice() {
            [src_ns, src, dst_ns, dst] => Some(Edge::new(src_ns, src, dst_ns, dst, stats)),
            _ => None,
        })
        .collect();
    if edges.is_empty() {
        return Err(no_traffic(&format!("edges from {res}"), &src.window));
    }
    render(
        src.output,
        &serde_json::json!({ "edges": edges }),
        view::edges_table(&edges),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Resource {
        Resource::parse(s).expect("resource")
    }

    #[test]
    fn windows_are_go_durations() {
        assert_eq!(parse_window("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_window("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_window("2s"), Ok(Duration::from_secs(2)));
        let err = parse_window("5 minutes").expect_err("bad");
        assert!(err.starts_with("bad --window: invalid duration"), "{err}");
        assert!(parse_window("10ms").is_err());
    }

    #[test]
    fn stat_is_inbound_by_default_and_outbound_with_to() {
        let sel = stat_selection(&r("deploy/web"), None, None, Some("default")).expect("ok");
        assert_eq!(sel.matchers[0], Matcher::eq("direction", "inbound"));
        assert_eq!(sel.tcp_peer, "src");
        assert!(sel.meshed.is_some());

        let svc = r("svc/web");
        let sel =
            stat_selection(&r("deploy/client"), Some(&svc), None, Some("default")).expect("ok");
        assert_eq!(
            sel.matchers,
            vec![
                Matcher::eq("direction", "outbound"),
                Matcher::eq("namespace", "default"),
                Matcher::eq("deployment", "client"),
                Matcher::eq("dst_namespace", "default"),
                Matcher::eq("dst_service", "web"),
            ]
        );
        assert_eq!(sel.group, vec!["namespace", "deployment"]);
    }

    #[test]
    fn from_is_only_where_the_data_has_the_source() {
        let err = stat_selection(&r("deploy/web"), None, Some(&r("deploy/client")), None)
            .expect_err("inbound has no source");
        assert!(err.contains("no client identity"), "{err}");
        let sel = stat_selection(&r("svc/web"), None, Some(&r("deploy/client")), None)
            .expect("outbound has the source");
        assert!(sel.matchers.contains(&Matcher::eq("deployment", "client")));
        assert!(sel.matchers.contains(&Matcher::eq("dst_service", "web")));
    }

    #[test]
    fn to_names_a_destination_by_workload_service_or_authority() {
        for ok in ["deploy/web", "pod/web-0", "svc/web", "authority/web:80"] {
            assert!(destination(&r(ok), "--to").is_ok(), "{ok}");
        }
        let Err(Failure(code, e)) = destination(&r("ns/shop"), "--to") else {
            panic!("accepted")
        };
        assert_eq!(code, 2);
        assert!(e.to_string().contains("expected deployment/NAME"), "{e}");
        let sel = stat_selection(
            &r("deploy/client"),
            Some(&r("deploy/web")),
            None,
            Some("shop"),
        )
        .expect("a workload to a workload");
        assert!(sel.matchers.contains(&Matcher::eq("dst_deployment", "web")));
        assert!(sel.matchers.contains(&Matcher::eq("dst_namespace", "shop")));
    }
}
