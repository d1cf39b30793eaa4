//! `pylon tap`, `pylon top` and `pylon profile --tap`: live requests from the proxies' tap
//! ports (Linkerd's `io.linkerd.proxy.tap.Tap/Observe`, the `linkerd2-proxy-api` crate's
//! generated client).
//!
//! A proxy is named by its admin address (`--proxy`, as for `pylon stat`) or found in a config
//! dir (`--config-dir`); its tap port is asked from the admin server (`GET /tap-addr`), or
//! given directly (`--tap-addr`). A workload's (`deployment/X`) commands use only X's proxies.
//!
//! - [`select`]: which proxies, and which of their requests (`--to`, `--from`, a side);
//! - [`event`]: one event as a Linkerd-style line or a JSON object;
//! - [`profile`]: observed requests grouped into ServiceProfile routes;
//! - [`top`]: the busiest paths.
//!
//! Exit codes: 0 done (the limit was reached, the streams ended, or Ctrl-C); 1 a proxy could
//! not be tapped (unreachable, refused, none of the workload's) or a stream failed; 2 the
//! command line is wrong.

pub mod event;
pub mod profile;
pub mod select;
pub mod top;

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use hyper::Method;
use linkerd2_proxy_api::tap::observe_request::Match;
use linkerd2_proxy_api::tap::tap_client::TapClient;
use linkerd2_proxy_api::tap::{ObserveRequest, TapEvent};
use tokio::sync::mpsc;

use crate::demo::admin_client;
use crate::flags::{Namespace, Output, OutputFlag, Peers, Sampling, Scope, TapSource};
use crate::proxies::{self, DirMesh};
use crate::stat::resource::{Kind, Resource};
use event::{Kind as EventKind, Line};
use select::{Filters, Plan, Selector, INBOUND};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct TapArgs {
    /// What to tap: deployment/NAME, pod/NAME, ns/NAME (every request of its proxies, in and
    /// out), svc/NAME or authority/HOST (requests to it, on every proxy given).
    #[arg(value_name = "RESOURCE")]
    resource: String,

    #[command(flatten)]
    peers: Peers,

    /// Only requests with this :authority (HOST matches any port).
    #[arg(long)]
    authority: Option<String>,

    /// Only requests with this HTTP method.
    #[arg(long)]
    method: Option<String>,

    /// Only requests whose path starts with this.
    #[arg(long, value_name = "PREFIX")]
    path: Option<String>,

    #[command(flatten)]
    sampling: Sampling,

    /// Stop after this many requests (their req, rsp and end events).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,

    #[command(flatten)]
    scope: Scope,

    #[command(flatten)]
    output: OutputFlag,

    #[command(flatten)]
    source: TapSource,

    /// `--tap-addr`'s earlier spelling.
    #[arg(long = "tap", value_name = "TAP_ADDR", hide = true)]
    tap_addr_alias: Vec<SocketAddr>,
}

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// Build the profile from the live requests of this resource: svc/NAME (its requests on
    /// every proxy given) or deployment/NAME (the requests its proxies serve).
    #[arg(long = "tap", value_name = "RESOURCE")]
    resource: String,

    /// How long to tap (Go-style duration: 10s, 1m).
    #[arg(long, default_value = "10s")]
    tap_duration: String,

    /// The service the profile is for (default: RESOURCE's, when a svc/, else the service
    /// the observed requests were addressed to).
    #[arg(long, value_name = "NAME")]
    service: Option<String>,

    /// The cluster domain of the profile's name (NAME.NS.svc.DOMAIN).
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,

    #[command(flatten)]
    sampling: Sampling,

    #[command(flatten)]
    ns: Namespace,

    #[command(flatten)]
    source: TapSource,
}

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Whose traffic: deployment/NAME, pod/NAME, ns/NAME (every request of its proxies, in
    /// and out), svc/NAME or authority/HOST (requests to it, on every proxy given).
    #[arg(value_name = "RESOURCE")]
    resource: String,

    #[command(flatten)]
    peers: Peers,

    #[command(flatten)]
    sampling: Sampling,

    /// The initial order (`s` changes it in the live view).
    #[arg(long, value_enum, default_value_t = top::SortBy::Count)]
    sort: top::SortBy,

    /// Print one table after tapping this long (Go-style duration: 10s) instead of the live
    /// full-screen view.
    #[arg(long, value_name = "DURATION")]
    once: Option<String>,

    #[command(flatten)]
    scope: Scope,

    #[command(flatten)]
    output: OutputFlag,

    #[command(flatten)]
    source: TapSource,
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure(u8, anyhow::Error);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.1)
    }
}

fn usage(msg: impl std::fmt::Display) -> Failure {
    Failure(2, anyhow!("{msg}"))
}

fn fail(msg: impl std::fmt::Display) -> Failure {
    Failure(1, anyhow!("{msg}"))
}

fn exit(verb: &str, result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("pylon {verb}: error: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// RESOURCE, `--to` and `--from`, parsed as every command parses them.
fn resources(
    resource: &str,
    peers: &Peers,
) -> Result<(Resource, Option<Resource>, Option<Resource>), Failure> {
    let res = Resource::parse(resource).map_err(usage)?;
    let (to, from) = peers.parse().map_err(usage)?;
    Ok((res, to, from))
}

// ---------------------------------------------------------------------------------------------
// Reaching the tap ports
// ---------------------------------------------------------------------------------------------

/// A tap port, the admin address it was learned from, and whose proxy it is.
#[derive(Clone, Debug)]
pub struct Target {
    pub tap: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// `pod web-0 (deployment/web, namespace default)`, when known.
    pub owner: Option<String>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.admin {
            Some(admin) => write!(f, "{} of proxy {admin}", self.tap)?,
            None => write!(f, "{}", self.tap)?,
        }
        match &self.owner {
            Some(owner) => write!(f, " ({owner})"),
            None => Ok(()),
        }
    }
}

/// The tap address an admin server reports; an unspecified IP means the admin's host.
pub fn tap_addr_from(admin: SocketAddr, body: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = body.trim().parse().map_err(|_| {
        format!("the proxy at {admin} answered GET /tap-addr with {body:?}, not an address")
    })?;
    Ok(if addr.ip().is_unspecified() {
        SocketAddr::new(admin.ip(), addr.port())
    } else {
        addr
    })
}

async fn ask_tap_addr(admin: SocketAddr) -> Result<SocketAddr, Failure> {
    let (status, body) = admin_client::request(admin, Method::GET, "/tap-addr", CONNECT_TIMEOUT)
        .await
        .map_err(|e| {
            fail(format!(
                "the proxy admin address {admin} is unreachable: {e:#} (is the proxy running, and is this its --admin-addr?)"
            ))
        })?;
    if status == hyper::StatusCode::NOT_FOUND {
        return Err(fail(format!(
            "the proxy at {admin} does not say where its tap port is (GET /tap-addr: 404); give it with --tap-addr TAP_ADDR"
        )));
    }
    if !status.is_success() {
        return Err(fail(format!(
            "the proxy at {admin} answered GET /tap-addr with {status}"
        )));
    }
    tap_addr_from(admin, &String::from_utf8_lossy(&body)).map_err(fail)
}

/// Where the proxies were named, for messages.
fn source_name(src: &TapSource) -> String {
    match (&src.proxies.config_dir, src.proxies.proxies.is_empty()) {
        (Some(dir), true) => format!("the config dir {}", dir.display()),
        (Some(dir), false) => format!("the config dir {} and --proxy", dir.display()),
        (None, _) => "the proxies given with --proxy".to_string(),
    }
}

/// The tap ports to read (of the plan's workload only, when it names one), and the config
/// dir's mesh.
pub(crate) async fn targets(
    src: &TapSource,
    extra_taps: &[SocketAddr],
    plan: &Plan,
) -> Result<(Vec<Target>, Option<DirMesh>), Failure> {
    let (located, mesh) = proxies::locate(&src.proxies)
        .await
        .map_err(|e| fail(format!("{e:#}")))?;
    let taps: Vec<SocketAddr> = src.taps.iter().chain(extra_taps).copied().collect();
    if located.is_empty() && taps.is_empty() {
        return Err(usage(
            "no proxy to tap: give --proxy ADMIN_ADDR (repeatable, e.g. --proxy 127.0.0.1:4191), --config-dir DIR or --tap-addr TAP_ADDR",
        ));
    }
    let located = match &plan.proxies_of {
        Some(of) if !located.is_empty() => {
            proxies::scope(located, of, plan.namespace.as_deref(), &source_name(src))
                .await
                .map_err(|e| fail(format!("{e:#}")))?
        }
        _ => located,
    };
    let mut out: Vec<Target> = taps
        .iter()
        .map(|&tap| Target {
            tap,
            admin: None,
            owner: None,
        })
        .collect();
    for p in located {
        let known = p.owner != proxies::Owner::default();
        out.push(Target {
            tap: ask_tap_addr(p.admin).await?,
            admin: Some(p.admin),
            owner: known.then(|| p.owner.to_string()),
        });
    }
    Ok((out, mesh))
}

/// Opens a stream on every target.
pub(crate) async fn observe_all(
    targets: &[Target],
    matcher: &Option<Match>,
    limit: u32,
    max_rps: u32,
) -> Result<Vec<Events>, Failure> {
    let mut streams = Vec::new();
    for t in targets {
        streams.push(observe(t, matcher.clone(), limit, max_rps).await?);
    }
    Ok(streams)
}

fn explain(target: &Target, status: tonic::Status) -> Failure {
    match status.code() {
        tonic::Code::PermissionDenied => fail(format!(
            "tap refused by {target}: this proxy only allows tap from the networks in its --tap-allow (loopback unless set), and this client is not in them; see --tap-allow ({})",
            status.message()
        )),
        tonic::Code::Unavailable => fail(format!(
            "the tap port {target} is unreachable: {}",
            status.message()
        )),
        tonic::Code::InvalidArgument => usage(format!(
            "the proxy at {target} rejected the tap: {}",
            status.message()
        )),
        code => fail(format!(
            "tapping {target} failed: {code:?}: {}",
            status.message()
        )),
    }
}

pub(crate) type Events = tonic::codec::Streaming<TapEvent>;

async fn observe(
    target: &Target,
    matcher: Option<Match>,
    limit: u32,
    max_rps: u32,
) -> Result<Events, Failure> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", target.tap))
        .map_err(|e| fail(format!("bad tap address {target}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| {
        fail(format!(
            "the tap port {target} is unreachable: {:#}",
            anyhow::Error::new(e)
        ))
    })?;
    let mut req = tonic::Request::new(ObserveRequest {
        limit,
        r#match: matcher,
        extract: None,
    });
    req.metadata_mut()
        .insert(pylon_tap_server::MAX_RPS_HEADER, max_rps.into());
    let rsp = tokio::time::timeout(CONNECT_TIMEOUT, TapClient::new(channel).observe(req))
        .await
        .map_err(|_| fail(format!("the tap port {target} did not answer within 5s")))?;
    rsp.map(tonic::Response::into_inner)
        .map_err(|s| explain(target, s))
}

/// What the event loop does with each event: `Ok(true)` to go on.
pub(crate) type Sink<'a> = dyn FnMut(usize, TapEvent) -> Result<bool, Failure> + Send + 'a;

/// Ctrl-C, which ends the CLI's taps (the dashboard's end when their page goes).
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Reads every stream until they all end, `sink` says stop, `until` passes or `stop` ends.
pub(crate) async fn run_streams(
    targets: &[Target],
    streams: Vec<Events>,
    until: Option<Duration>,
    stop: impl std::future::Future<Output = ()>,
    sink: &mut Sink<'_>,
) -> Result<(), Failure> {
    let (tx, mut rx) = mpsc::channel::<(usize, Result<Option<TapEvent>, tonic::Status>)>(256);
    let mut tasks = Vec::new();
    for (i, mut stream) in streams.into_iter().enumerate() {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let item = stream.message().await;
                let last = !matches!(item, Ok(Some(_)));
                if tx.send((i, item)).await.is_err() || last {
                    return;
                }
            }
        }));
    }
    drop(tx);
    let deadline = until.map(|d| tokio::time::Instant::now() + d);
    let sleep = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep);
    tokio::pin!(stop);
    let mut open = targets.len();
    let result = loop {
        tokio::select! {
            item = rx.recv() => match item {
                None => break Ok(()),
                Some((_, Ok(None))) => {
                    open -= 1;
                    if open == 0 {
                        break Ok(());
                    }
                }
                Some((i, Ok(Some(ev)))) => match sink(i, ev) {
                    Ok(true) => {}
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                },
                Some((i, Err(status))) => {
                    let target = &targets[i];
                    break Err(fail(format!(
                        "the tap stream from {target} failed: {:?}: {}",
                        status.code(),
                        status.message()
                    )));
                }
            },
            _ = &mut sleep => break Ok(()),
            _ = &mut stop => break Ok(()),
        }
    };
    for t in tasks {
        t.abort();
    }
    result
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("starting the runtime: {e}")))
}

fn describe(targets: &[Target]) -> String {
    let list: Vec<String> = targets.iter().map(ToString::to_string).collect();
    format!(
        "{} prox{}: {}",
        targets.len(),
        if targets.len() == 1 { "y" } else { "ies" },
        list.join(", ")
    )
}

/// `deployment/a to deployment/b`, for messages.
fn what(res: &Resource, to: Option<&Resource>, from: Option<&Resource>) -> String {
    match (to, from) {
        (Some(to), _) => format!("{res} to {to}"),
        (None, Some(from)) => format!("{res} from {from}"),
        (None, None) => res.to_string(),
    }
}

/// A tap line with `-o wide`'s destination fields, before the fields that may hold spaces
/// (`proxy_error=`, `route=`), which a tap line keeps last.
fn wide_line(text: String, fields: &str) -> String {
    // The plain line already names the pod when the event did.
    let fields = match fields.split_once(" dst_pod=") {
        Some((before, _)) if text.contains(" dst_pod=") => before,
        _ => fields,
    };
    let at = [" proxy_error=", " route="]
        .iter()
        .filter_map(|f| text.find(f))
        .min()
        .unwrap_or(text.len());
    let (head, tail) = text.split_at(at);
    format!("{head}{fields}{tail}")
}

// ---------------------------------------------------------------------------------------------
// pylon tap
// ---------------------------------------------------------------------------------------------

pub fn run_tap(args: TapArgs) -> ExitCode {
    exit("tap", tap(args))
}

/// Which requests of which proxy are printed, for `--limit` across proxies.
#[derive(Default)]
struct Admitted {
    limit: Option<usize>,
    admitted: HashSet<(usize, String)>,
    open: HashSet<(usize, String)>,
}

impl Admitted {
    /// Whether to print this event.
    fn admit(&mut self, proxy: usize, line: &Line) -> bool {
        let Some(limit) = self.limit else { return true };
        let key = (proxy, line.id.clone());
        match line.kind {
            Some(EventKind::Req) => {
                if self.admitted.len() >= limit {
                    return false;
                }
                self.admitted.insert(key.clone());
                self.open.insert(key);
                true
            }
            Some(EventKind::End) => {
                self.open.remove(&key);
                self.admitted.contains(&key)
            }
            _ => self.admitted.contains(&key),
        }
    }

    fn done(&self) -> bool {
        self.limit
            .is_some_and(|l| self.admitted.len() >= l && self.open.is_empty())
    }
}

fn tap(args: TapArgs) -> Result<(), Failure> {
    let (res, to, from) = resources(&args.resource, &args.peers)?;
    let filters = Filters {
        authority: args.authority.as_deref(),
        method: args.method.as_deref(),
        path: args.path.as_deref(),
    };
    let plan = Plan::new(
        &res,
        to.as_ref(),
        from.as_ref(),
        &filters,
        args.scope.namespace(),
    )
    .map_err(usage)?;
    let output = args.output.output;
    let rt = runtime()?;
    rt.block_on(async {
        let (targets, mesh) = targets(&args.source, &args.tap_addr_alias, &plan).await?;
        // The proxies end a stream after `limit` requests; with a filter only the CLI can
        // apply, the CLI counts alone.
        let server_limit = match (args.limit, plan.server_side_only()) {
            (Some(l), true) => l,
            _ => 0,
        };
        let streams =
            observe_all(&targets, &plan.matcher, server_limit, args.sampling.max_rps).await?;
        eprintln!(
            "tapping {} on {} (Ctrl-C to stop)",
            what(&res, to.as_ref(), from.as_ref()),
            describe(&targets)
        );
        let mut selector = Selector::new(plan, mesh);
        let mut admitted = Admitted {
            limit: args.limit.and_then(|l| usize::try_from(l).ok()),
            ..Admitted::default()
        };
        let stdout = std::io::stdout();
        let mut sink = |i: usize, ev: TapEvent| -> Result<bool, Failure> {
            let Some(line) = Line::from_event(&ev) else {
                return Ok(true);
            };
            let Some(dst) = selector.keep(i, &ev, &line) else {
                return Ok(true);
            };
            if !admitted.admit(i, &line) {
                return Ok(!admitted.done());
            }
            let text = match output {
                Output::Table => line.text(),
                Output::Wide => wide_line(line.text(), &select::wide_fields(&dst)),
                Output::Json => line.json(),
            };
            let mut out = stdout.lock();
            if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                // The reader went away (`| head`): nothing more to do.
                return Ok(false);
            }
            Ok(!admitted.done())
        };
        run_streams(&targets, streams, None, interrupted(), &mut sink).await
    })
}

// ---------------------------------------------------------------------------------------------
// pylon top
// ---------------------------------------------------------------------------------------------

pub fn run_top(args: TopArgs) -> ExitCode {
    exit("top", run_top_inner(args))
}

fn run_top_inner(args: TopArgs) -> Result<(), Failure> {
    let (res, to, from) = resources(&args.resource, &args.peers)?;
    let once = args
        .once
        .as_deref()
        .map(pylon_proxy_policy::duration::parse)
        .transpose()
        .map_err(|e| usage(format!("bad --once: {e}")))?;
    let output = args.output.output;
    if output == Output::Json && once.is_none() {
        return Err(usage(
            "-o json prints the table of --once DURATION; the live view is for people",
        ));
    }
    let plan = Plan::new(
        &res,
        to.as_ref(),
        from.as_ref(),
        &Filters::default(),
        args.scope.namespace(),
    )
    .map_err(usage)?;
    let rt = runtime()?;
    let (targets, mesh, streams) = rt.block_on(async {
        let (targets, mesh) = targets(&args.source, &[], &plan).await?;
        let streams = observe_all(&targets, &plan.matcher, 0, args.sampling.max_rps).await?;
        Ok::<_, Failure>((targets, mesh, streams))
    })?;
    let what = what(&res, to.as_ref(), from.as_ref());
    let wide = output == Output::Wide;
    let paths = std::sync::Arc::new(std::sync::Mutex::new(top::Paths::default()));
    let sink_paths = paths.clone();
    let mut selector = Selector::new(plan, mesh);
    let mut sink = move |proxy: usize, ev: TapEvent| -> Result<bool, Failure> {
        let Some(line) = Line::from_event(&ev) else {
            return Ok(true);
        };
        if let Some(dst) = selector.keep(proxy, &ev, &line) {
            // Unplaced destinations are named by their address.
            let destination = wide.then(|| {
                select::destination_name(&dst)
                    .or_else(|| line.dst.map(|a| a.to_string()))
                    .unwrap_or_default()
            });
            sink_paths
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe(proxy, &line, destination);
        }
        Ok(true)
    };
    let title = format!("pylon top {what} ({})", describe(&targets));
    match once {
        Some(d) => {
            eprintln!(
                "tapping {what} on {} for {}...",
                describe(&targets),
                args.once.as_deref().unwrap_or("")
            );
            rt.block_on(run_streams(
                &targets,
                streams,
                Some(d),
                interrupted(),
                &mut sink,
            ))?;
            let paths = paths.lock().unwrap_or_else(|e| e.into_inner());
            let text = match output {
                Output::Json => top::render_json(&paths, args.sort),
                _ => top::render_text(&paths, args.sort, wide),
            };
            std::io::stdout()
                .lock()
                .write_all(text.as_bytes())
                .map_err(|e| fail(format!("writing the output: {e}")))
        }
        None => {
            // The streams run on their own thread; this one draws and reads keys.
            std::thread::spawn(move || {
                let _ = rt.block_on(run_streams(
                    &targets,
                    streams,
                    None,
                    interrupted(),
                    &mut sink,
                ));
            });
            top::interactive(paths, title, args.sort, wide)
                .map_err(|e| fail(format!("the terminal: {e}")))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// pylon profile --tap
// ---------------------------------------------------------------------------------------------

pub fn run_profile(args: ProfileArgs) -> ExitCode {
    match profile(args) {
        Ok(yaml) => match std::io::stdout().lock().write_all(yaml.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => exit("profile", Err(fail(format!("writing the output: {e}")))),
        },
        Err(e) => exit("profile", Err(e)),
    }
}

fn profile(args: ProfileArgs) -> Result<String, Failure> {
    let res = Resource::parse(&args.resource).map_err(usage)?;
    let duration = pylon_proxy_policy::duration::parse(&args.tap_duration)
        .map_err(|e| usage(format!("bad --tap-duration: {e}")))?;
    if duration.is_zero() {
        return Err(usage("bad --tap-duration: must be more than 0s"));
    }
    let ns = res.namespace.clone().unwrap_or(args.ns.namespace.clone());
    let service = match (&args.service, res.kind, &res.name) {
        (Some(s), _, _) => Some((s.clone(), ns.clone())),
        (None, Kind::Service, Some(name)) => Some((name.clone(), ns.clone())),
        _ => None,
    };
    let plan = Plan::for_profile(&res, &ns).map_err(usage)?;
    let rt = runtime()?;
    let observed = rt.block_on(async {
        let (targets, mesh) = targets(&args.source, &[], &plan).await?;
        let streams = observe_all(&targets, &plan.matcher, 0, args.sampling.max_rps).await?;
        eprintln!(
            "tapping {res} on {} for {}...",
            describe(&targets),
            args.tap_duration
        );
        let mut selector = Selector::new(plan, mesh);
        let mut observed = profile::Observed::default();
        let mut sink = |i: usize, ev: TapEvent| -> Result<bool, Failure> {
            let Some(line) = Line::from_event(&ev) else {
                return Ok(true);
            };
            let kept = selector.keep(i, &ev, &line).is_some();
            // One per request: retries repeat the request.
            if kept && line.kind == Some(EventKind::Req) && line.attempt.unwrap_or(1) == 1 {
                if let (Some(m), Some(p)) = (&line.method, &line.path) {
                    observed.observe(line.proxy == INBOUND, line.authority.as_deref(), m, p);
                }
            }
            Ok(true)
        };
        run_streams(&targets, streams, Some(duration), interrupted(), &mut sink).await?;
        Ok::<_, Failure>(observed)
    })?;
    if observed.is_empty() {
        return Err(fail(format!(
            "no requests for {res} in {} (is traffic flowing through the proxies given?)",
            args.tap_duration
        )));
    }
    let (service, ns) = match service {
        Some(s) => s,
        None => observed.busiest_service().ok_or_else(|| {
            usage("the requests observed name no in-cluster service (NAME.NS.svc...); give --service NAME")
        })?,
    };
    let routes = observed.routes_of(&(service.clone(), ns.clone()));
    if routes.is_empty() {
        return Err(fail(format!(
            "none of the requests observed for {res} in {} were for service {service} in namespace {ns}",
            args.tap_duration
        )));
    }
    let fqdn = format!("{service}.{ns}.svc.{}", args.cluster_domain);
    let comment = format!(
        "Generated by `pylon profile --tap {res}` from {} request(s) observed in {}.",
        routes.requests, args.tap_duration
    );
    Ok(routes.yaml(&fqdn, &ns, &comment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tap_address_of_an_unspecified_ip_is_the_admins_host() {
        let admin: SocketAddr = "10.1.2.3:4191".parse().unwrap();
        assert_eq!(
            tap_addr_from(admin, "0.0.0.0:4190\n"),
            Ok("10.1.2.3:4190".parse().unwrap())
        );
        assert_eq!(
            tap_addr_from(admin, "127.0.0.1:5555"),
            Ok("127.0.0.1:5555".parse().unwrap())
        );
        assert!(tap_addr_from(admin, "not found").is_err());
    }

    #[test]
    fn the_limit_counts_requests_across_proxies() {
        let ev = |kind, id: &str| Line {
            kind: Some(kind),
            id: id.into(),
            ..Line::default()
        };
        let mut a = Admitted {
            limit: Some(2),
            ..Admitted::default()
        };
        assert!(a.admit(0, &ev(EventKind::Req, "1:1")));
        assert!(a.admit(1, &ev(EventKind::Req, "1:1")));
        assert!(!a.admit(0, &ev(EventKind::Req, "1:2")), "over the limit");
        assert!(!a.admit(0, &ev(EventKind::Rsp, "1:2")));
        assert!(a.admit(0, &ev(EventKind::Rsp, "1:1")));
        assert!(a.admit(0, &ev(EventKind::End, "1:1")));
        assert!(!a.done(), "one request still open");
        assert!(a.admit(1, &ev(EventKind::End, "1:1")));
        assert!(a.done());
    }

    #[test]
    fn wide_fields_go_before_the_fields_with_spaces() {
        let f = " dst_res=deployment/b";
        assert_eq!(
            wide_line("req id=1 :path=/x route=GET /x".into(), f),
            "req id=1 :path=/x dst_res=deployment/b route=GET /x"
        );
        assert_eq!(
            wide_line("rsp id=1 :status=504 proxy_error=route timeout".into(), f),
            "rsp id=1 :status=504 dst_res=deployment/b proxy_error=route timeout"
        );
        assert_eq!(
            wide_line("end id=1".into(), f),
            "end id=1 dst_res=deployment/b"
        );
    }

    #[test]
    fn commands_parse_their_resources_alike() {
        let peers = Peers {
            to: Some("deployment/b".into()),
            from: None,
        };
        let (res, to, _) = resources("deploy/a", &peers).unwrap();
        assert_eq!(
            what(&res, to.as_ref(), None),
            "deployment/a to deployment/b"
        );
        let peers = Peers {
            to: Some("deployment/data-service.remote-cluster".into()),
            from: None,
        };
        let Err(Failure(code, e)) = resources("deploy/api-gateway", &peers) else {
            panic!("accepted")
        };
        assert_eq!(code, 2);
        assert!(
            e.to_string().starts_with("not supported yet: multicluster"),
            "{e}"
        );
        let peers = Peers {
            to: None,
            from: Some("svc/web".into()),
        };
        assert!(resources("deploy/a", &peers).is_err(), "--from a service");
    }
}
