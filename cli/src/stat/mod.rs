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
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

pub mod data;
mod endpoints;
pub mod resource;
pub mod view;

use data::{Observed, Source};
use resource::{service_of_authority, Matcher, Resource};
use view::{Edge, Selection, StatRow};

pub use crate::flags::Output;
use crate::flags::{MetricsSource, OutputFlag, Peers, Scope};

/// Where the numbers come from, and how to print them (shared by the three verbs; the flags
/// are [`crate::flags`]' so tap and top spell them the same).
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    #[command(flatten)]
    source: MetricsSource,

    /// The time window (Go-style duration: 30s, 1m, 1m30s): up to 15m from the proxies (they
    /// keep it and answer at once), any length from Prometheus.
    #[arg(long, short = 'w', default_value = "1m")]
    window: String,

    #[command(flatten)]
    scope: Scope,

    #[command(flatten)]
    output: OutputFlag,
}

impl SourceArgs {
    fn output(&self) -> Output {
        self.output.output
    }
}

#[derive(Args, Debug)]
pub struct StatArgs {
    /// deployment/NAME (or deployment for all), pod/NAME, ns/NAME, svc/NAME, authority/HOST.
    /// Workloads show what they received; with --to, what they sent; a service with --from,
    /// what the workload sent it (inbound metrics name clients by mTLS identity only).
    #[arg(value_name = "RESOURCE")]
    resource: String,

    #[command(flatten)]
    peers: Peers,

    #[command(flatten)]
    source: SourceArgs,
}

#[derive(Args, Debug)]
pub struct RoutesArgs {
    /// The workload whose served (inbound) routes to show (deployment/NAME...), or
    /// svc/NAME for every client's routes to that service (with --from, one client's).
    /// With --to svc/NAME, the routes RESOURCE calls on it, as its outbound proxy saw them.
    #[arg(value_name = "RESOURCE")]
    resource: String,

    #[command(flatten)]
    peers: Peers,

    #[command(flatten)]
    source: SourceArgs,
}

#[derive(Args, Debug)]
pub struct EdgesArgs {
    /// The kind of the edges' sources: deployment, pod or ns.
    #[arg(value_name = "RESOURCE-KIND")]
    kind: String,

    #[command(flatten)]
    peers: Peers,

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
    let source = Source::from_flags(&src.source).map_err(usage)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(1, anyhow::anyhow!("starting the runtime: {e}")))?;
    rt.block_on(source.observe(window, matchers))
        .map_err(|e| Failure(1, e))
}

fn namespace(src: &SourceArgs) -> Option<&str> {
    src.scope.namespace()
}

/// RESOURCE, `--to` and `--from`, parsed as every command parses them (outbound series name
/// a destination by its `dst_*` labels, from the control plane or the config dir's Pods, and
/// its authority; multicluster names are refused before anything is read).
fn resources(
    resource: &str,
    peers: &Peers,
) -> Result<(Resource, Option<Resource>, Option<Resource>), Failure> {
    let res = parse_resource(resource)?;
    let (to, from) = peers.parse().map_err(usage)?;
    Ok((res, to, from))
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
    let (res, to, from) = resources(&args.resource, &args.peers)?;
    let src = &args.source;
    let sel = stat_selection(&res, to.as_ref(), from.as_ref(), namespace(src)).map_err(usage)?;
    let seen = fetch(src, &sel.matchers)?;
    // Whether the destination's (or the workload's) Services leave ready pods out.
    let endpoints = endpoints::findings(to.as_ref().unwrap_or(&res), src);
    let workload = sel.meshed.is_some();
    let out = stat_rows(&seen, &sel, to.is_some());
    if out.iter().all(|r| r.requests == 0) {
        let mut what = res.to_string();
        if let Some(to) = &to {
            what = format!("{what} to {to}");
        }
        if let Some(from) = &from {
            what = format!("{what} from {from}");
        }
        return Err(endpoints::explain(
            no_traffic(&what, &src.window),
            &endpoints,
        ));
    }
    // What a client sends is what its proxy retries: RETRY% belongs in that table (the
    // story's retry storm was found with exactly `stat deploy/a --to deploy/b`).
    let mut table = view::stat_table(
        "NAME",
        None,
        &out.iter().cloned().map(|r| (r, None)).collect::<Vec<_>>(),
        workload,
        workload || to.is_some(),
        src.output() == Output::Wide || to.is_some(),
    );
    for row in &out {
        if let Some(ratio) = row.retry_ratio.filter(|r| *r > view::RETRY_HEAVY_ABOVE) {
            let to = to.as_ref().map_or_else(String::new, |t| format!(" to {t}"));
            table.push_str(&format!(
                "\n{name}{to}: {pct:.1}% of requests were retries (over {limit}%): the proxy is \
                 hiding failures from the app, and SUCCESS counts every attempt\n",
                name = row.name,
                pct = ratio * 100.0,
                limit = view::RETRY_HEAVY_ABOVE * 100.0,
            ));
        }
    }
    endpoints::append(&mut table, &endpoints);
    let json = serde_json::json!({ "rows": out, "endpoints": endpoints });
    render(src.output(), &json, table)
}

/// `stat`'s rows: one per resource of the selection (`to`: the selection is what a workload
/// sent, so its connections count too).
pub fn stat_rows(seen: &Observed, sel: &Selection, to: bool) -> Vec<StatRow> {
    let workload = sel.meshed.is_some();
    view::aggregate(&seen.series, sel, seen.window.as_secs_f64())
        .iter()
        .map(|(key, stats)| {
            let (ns, name) = split_key(key);
            let meshed = workload.then_some(stats.pods.len());
            StatRow::new(name, ns, meshed, stats, workload || to)
        })
        .collect()
}

/// A row key `[namespace, name]` or `[name]`.
fn split_key(key: &[String]) -> (Option<String>, String) {
    match key {
        [ns, name] => (Some(ns.clone()), name.clone()),
        [name] => (None, name.clone()),
        _ => (None, key.join("/")),
    }
}

/// The series `routes` reads: a workload's own routes are those it serves (inbound), as
/// Linkerd shows them; with `--to`, or for a service, those its clients call (outbound); a
/// service's `--from` client's, from that client's outbound side.
pub fn routes_matchers(
    res: &Resource,
    to: Option<&Resource>,
    from: Option<&Resource>,
    ns: Option<&str>,
) -> Result<Vec<Matcher>, String> {
    if let Some(to) = to {
        // Route series name their destination by authority; `--to deployment/X` finds them
        // through the workload labels the data layer copies from the same proxy's series for
        // that authority (`data::route_destinations`).
        if !res.kind.is_workload() {
            return Err(format!(
                "--to: {res} is not a workload; routes are called by deployments, pods or namespaces (try `pylon routes {to}`)"
            ));
        }
    }
    if let Some(from) = from {
        if res.kind.is_workload() {
            return Err(format!(
                "--from: the proxies' inbound route metrics carry no client workload, so the routes {res} served cannot be split by client; try `pylon routes {from} --to svc/NAME`"
            ));
        }
    }
    let direction = if to.is_none() && from.is_none() && res.kind.is_workload() {
        "inbound"
    } else {
        "outbound"
    };
    let mut matchers = vec![Matcher::eq("direction", direction)];
    matchers.extend(res.matchers(ns));
    if let Some(to) = to {
        matchers.extend(to.dst_matchers(ns));
    }
    if let Some(from) = from {
        matchers.extend(from.matchers(ns));
    }
    Ok(matchers)
}

/// The route rows of `matchers` ([`routes_matchers`]): one per authority and route.
pub fn routes_selection(matchers: Vec<Matcher>) -> Selection {
    Selection {
        matchers,
        group: vec!["authority", "rt_route"],
        routes: true,
        tcp_peer: "dst",
        meshed: None,
    }
}

/// `routes`' rows: each route with traffic, and the service it belongs to.
pub fn route_rows(seen: &Observed, sel: &Selection) -> Vec<(StatRow, Option<String>)> {
    view::aggregate(&seen.series, sel, seen.window.as_secs_f64())
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
        .collect()
}

fn routes(args: RoutesArgs) -> Result<String, Failure> {
    let (res, to, from) = resources(&args.resource, &args.peers)?;
    let src = &args.source;
    let ns = namespace(src);
    let matchers = routes_matchers(&res, to.as_ref(), from.as_ref(), ns).map_err(usage)?;
    let sel = routes_selection(matchers);
    let seen = fetch(src, &sel.matchers)?;
    let out = route_rows(&seen, &sel);
    if out.iter().all(|(r, _)| r.requests == 0) {
        return Err(no_traffic(&format!("the routes of {res}"), &src.window));
    }
    let table = view::stat_table(
        "ROUTE",
        Some("SERVICE"),
        &out,
        false,
        false,
        src.output() == Output::Wide,
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
    render(src.output(), &serde_json::json!({ "rows": json }), table)
}

/// The series of the edges from workloads of `res`'s kind: outbound ones (`from` narrows
/// their sources, `to` their destinations), one row per source and destination, the
/// destination named by `dst_label` (`dst_service`, as `pylon edges` shows them, or another
/// destination label).
pub fn edges_selection(
    res: &Resource,
    to: Option<&Resource>,
    from: Option<&Resource>,
    ns: Option<&str>,
    dst_label: &'static str,
) -> Selection {
    let mut matchers = vec![Matcher::eq("direction", "outbound")];
    matchers.extend(res.matchers(ns));
    if let Some(from) = from {
        matchers.extend(from.matchers(ns));
    }
    if let Some(to) = to {
        matchers.extend(to.dst_matchers(ns));
    }
    Selection {
        matchers,
        group: vec![
            "namespace",
            res.kind.name_label(),
            "dst_namespace",
            dst_label,
        ],
        routes: false,
        tcp_peer: "dst",
        meshed: None,
    }
}

/// The edges with traffic, flagged `failing` and `retry-heavy` by [`Edge::new`].
pub fn edge_rows(seen: &Observed, sel: &Selection) -> Vec<Edge> {
    view::aggregate(&seen.series, sel, seen.window.as_secs_f64())
        .iter()
        .filter(|(_, s)| s.requests() > 0.0)
        .filter_map(|(key, stats)| match key.as_slice() {
            [src_ns, src, dst_ns, dst] => Some(Edge::new(src_ns, src, dst_ns, dst, stats)),
            _ => None,
        })
        .collect()
}

fn edges(args: EdgesArgs) -> Result<String, Failure> {
    let (res, to, from) = resources(&args.kind, &args.peers)?;
    if !res.kind.is_workload() {
        return Err(usage(format!(
            "edges {res}: the sources of edges are workloads: deployment, pod or ns"
        )));
    }
    let src = &args.source;
    let sel = edges_selection(
        &res,
        to.as_ref(),
        from.as_ref(),
        namespace(src),
        "dst_service",
    );
    let seen = fetch(src, &sel.matchers)?;
    let edges = edge_rows(&seen, &sel);
    if edges.is_empty() {
        return Err(no_traffic(&format!("edges from {res}"), &src.window));
    }
    render(
        src.output(),
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
        let peers = |to: &str| Peers {
            to: Some(to.into()),
            from: None,
        };
        for ok in [
            "deploy/web",
            "pod/web-0",
            "svc/web",
            "authority/web:80",
            "ns/shop",
        ] {
            assert!(resources("deploy/client", &peers(ok)).is_ok(), "{ok}");
        }
        let Err(Failure(code, e)) = resources("deploy/client", &peers("deployment")) else {
            panic!("accepted")
        };
        assert_eq!(code, 2);
        assert!(e.to_string().contains("expected one destination"), "{e}");
        // Another cluster's names fail at once, naming what was given.
        let Err(Failure(code, e)) = resources(
            "deployment/api-gateway",
            &peers("deployment/data-service.remote-cluster"),
        ) else {
            panic!("accepted")
        };
        assert_eq!(code, 2);
        let e = e.to_string();
        assert!(e.starts_with("not supported yet: multicluster"), "{e}");
        assert!(e.contains("deployment/data-service.remote-cluster"), "{e}");
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

    #[test]
    fn routes_read_the_side_that_has_the_routes() {
        let ns = Some("default");
        let m = routes_matchers(&r("deploy/web"), None, None, ns).expect("served");
        assert_eq!(m[0], Matcher::eq("direction", "inbound"));
        let m = routes_matchers(&r("deploy/client"), Some(&r("svc/web")), None, ns).expect("ok");
        assert_eq!(m[0], Matcher::eq("direction", "outbound"));
        assert!(m.contains(&Matcher::eq("dst_service", "web")));
        let m = routes_matchers(&r("svc/web"), None, Some(&r("deploy/client")), ns).expect("ok");
        assert_eq!(m[0], Matcher::eq("direction", "outbound"));
        assert!(m.contains(&Matcher::eq("deployment", "client")));
        assert!(m.contains(&Matcher::eq("dst_service", "web")));
        // A destination workload: its routes carry its labels once the data layer joined them.
        let m = routes_matchers(&r("deploy/client"), Some(&r("deploy/web")), None, ns)
            .expect("a workload's routes");
        assert!(m.contains(&Matcher::eq("dst_deployment", "web")));
        let err = routes_matchers(&r("deploy/web"), None, Some(&r("deploy/client")), ns)
            .expect_err("inbound has no client");
        assert!(err.contains("cannot be split by client"), "{err}");
        let err = routes_matchers(&r("svc/web"), Some(&r("svc/db")), None, ns)
            .expect_err("a service calls nothing");
        assert!(err.contains("not a workload"), "{err}");
    }
}
