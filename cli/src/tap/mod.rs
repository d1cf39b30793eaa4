//! `pylon tap` and `pylon profile --tap`: live requests from the proxies' tap ports (Linkerd's
//! `io.linkerd.proxy.tap.Tap/Observe`, the `linkerd2-proxy-api` crate's generated client).
//!
//! A proxy is named by its admin address (`--proxy`, as for `pylon stat`); its tap port is asked
//! from the admin server (`GET /tap-addr`), or given directly (`--tap ADDR`).
//!
//! - [`event`]: one event as a Linkerd-style line or a JSON object;
//! - [`profile`]: observed requests grouped into ServiceProfile routes.
//!
//! Exit codes: 0 done (the limit was reached, the streams ended, or Ctrl-C); 1 a proxy could
//! not be tapped (unreachable, refused) or a stream failed; 2 the command line is wrong.

pub mod event;
pub mod profile;
pub mod top;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use clap::{Args, ValueEnum};
use hyper::Method;
use linkerd2_proxy_api::tap::observe_request::r#match::{self as pb, http as pbhttp};
use linkerd2_proxy_api::tap::observe_request::Match;
use linkerd2_proxy_api::tap::tap_client::TapClient;
use linkerd2_proxy_api::tap::{ObserveRequest, TapEvent};
use tokio::sync::mpsc;

use crate::demo::admin_client;
use crate::stat::resource::{service_of_authority, Kind, Resource};
use event::{Kind as EventKind, Line};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TapOutput {
    /// Linkerd's tap lines.
    Text,
    /// One JSON object per event and line.
    Json,
}

#[derive(Args, Debug)]
pub struct TapArgs {
    /// What to tap: `deployment/NAME`, `pod/NAME`, `ns/NAME` (every request the proxies given
    /// see), `svc/NAME` or `authority/HOST` (requests to it).
    #[arg(value_name = "RESOURCE")]
    resource: String,

    /// Only requests RESOURCE sends to this destination (`svc/NAME` or `authority/HOST`), as its
    /// outbound proxy sees them.
    #[arg(long, value_name = "RESOURCE")]
    to: Option<String>,

    /// Only requests with this `:authority` (`HOST` matches any port).
    #[arg(long)]
    authority: Option<String>,

    /// Only requests with this HTTP method.
    #[arg(long)]
    method: Option<String>,

    /// Only requests whose path starts with this.
    #[arg(long, value_name = "PREFIX")]
    path: Option<String>,

    /// Requests sampled per second by each proxy.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    max_rps: u32,

    /// Stop after this many requests (their `req`, `rsp` and `end` events).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,

    /// Output: Linkerd's tap lines, or JSON lines.
    #[arg(long, short = 'o', value_enum, default_value_t = TapOutput::Text)]
    output: TapOutput,

    /// A tap port to use directly (repeatable), for a proxy whose admin server is out of reach.
    #[arg(long = "tap", visible_alias = "tap-addr", value_name = "ADDR")]
    taps: Vec<SocketAddr>,

    #[command(flatten)]
    proxies: ProxyArgs,
}

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// Build the profile from the live requests of this resource (`svc/NAME`, `deploy/NAME`...).
    #[arg(long = "tap", value_name = "RESOURCE")]
    resource: String,

    /// How long to tap (Go-style duration: 10s, 1m).
    #[arg(long, default_value = "10s")]
    tap_duration: String,

    /// The service the profile is for (default: RESOURCE's, when a `svc/`, else the service
    /// the observed requests were addressed to).
    #[arg(long, value_name = "NAME")]
    service: Option<String>,

    /// The cluster domain of the profile's name (`NAME.NS.svc.DOMAIN`).
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,

    /// Requests sampled per second by each proxy.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    max_rps: u32,

    /// A tap port to use directly (repeatable), for a proxy whose admin server is out of reach.
    #[arg(long = "tap-addr", value_name = "ADDR")]
    taps: Vec<SocketAddr>,

    #[command(flatten)]
    proxies: ProxyArgs,
}

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Whose traffic: `deployment/NAME`, `pod/NAME`, `ns/NAME` (every request the proxies
    /// given see), `svc/NAME` or `authority/HOST` (requests to it).
    #[arg(value_name = "RESOURCE")]
    resource: String,

    /// Requests sampled per second by each proxy.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    max_rps: u32,

    /// The initial order (`s` changes it in the live view).
    #[arg(long, value_enum, default_value_t = top::SortBy::Count)]
    sort: top::SortBy,

    /// Print one table after tapping this long (Go-style duration: 10s) instead of the live
    /// full-screen view.
    #[arg(long, value_name = "DURATION")]
    once: Option<String>,

    /// A tap port to use directly (repeatable), for a proxy whose admin server is out of reach.
    #[arg(long = "tap-addr", value_name = "ADDR")]
    taps: Vec<SocketAddr>,

    #[command(flatten)]
    proxies: ProxyArgs,
}

#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// A proxy's admin address (repeatable); its tap port is asked from it (`GET /tap-addr`).
    #[arg(long = "proxy", value_name = "ADMIN_ADDR")]
    proxies: Vec<SocketAddr>,

    /// Every meshed pod listed in this config dir (Pods with a `pylon-admin` port).
    #[arg(long, value_name = "DIR")]
    config_dir: Option<PathBuf>,

    /// Namespace of the resources named.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure(u8, anyhow::Error);

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

// ---------------------------------------------------------------------------------------------
// The match
// ---------------------------------------------------------------------------------------------

fn http_match(m: pbhttp::Match) -> Match {
    Match {
        r#match: Some(pb::Match::Http(pb::Http { r#match: Some(m) })),
    }
}

fn string_match(m: pbhttp::string_match::Match) -> pbhttp::StringMatch {
    pbhttp::StringMatch { r#match: Some(m) }
}

fn any(matches: Vec<Match>) -> Match {
    Match {
        r#match: Some(pb::Match::Any(pb::Seq { matches })),
    }
}

fn all(mut matches: Vec<Match>) -> Option<Match> {
    match matches.len() {
        0 => None,
        1 => matches.pop(),
        _ => Some(Match {
            r#match: Some(pb::Match::All(pb::Seq { matches })),
        }),
    }
}

fn authority_prefix(prefix: String) -> Match {
    http_match(pbhttp::Match::Authority(string_match(
        pbhttp::string_match::Match::Prefix(prefix),
    )))
}

/// `HOST:PORT` exactly, or `HOST` with any port (or none).
fn authority_is(a: &str) -> Match {
    let exact = http_match(pbhttp::Match::Authority(string_match(
        pbhttp::string_match::Match::Exact(a.to_string()),
    )));
    let has_port = a
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if has_port {
        exact
    } else {
        any(vec![exact, authority_prefix(format!("{a}:"))])
    }
}

/// Requests to a `svc/NAME` (its in-cluster names `NAME.NS.svc.…`) or an `authority/HOST`.
fn destination_match(r: &Resource, ns: &str, flag: &str) -> Result<Option<Match>, String> {
    match (r.kind, &r.name) {
        (Kind::Service, Some(name)) => Ok(Some(authority_prefix(format!("{name}.{ns}.svc.")))),
        (Kind::Authority, Some(host)) => Ok(Some(authority_is(host))),
        _ if flag.is_empty() => Ok(None),
        _ => Err(format!(
            "{flag} {r}: expected svc/NAME or authority/HOST (tap sees the requests' authority, not the workload behind it)"
        )),
    }
}

/// What the flags ask for.
#[derive(Debug, PartialEq)]
pub struct Query {
    /// Linkerd's match, for the proxies.
    pub matcher: Option<Match>,
    /// Only the outbound side (`--to`): the API cannot match a direction, so the CLI filters.
    pub outbound_only: bool,
}

pub fn build_query(
    res: &Resource,
    to: Option<&Resource>,
    authority: Option<&str>,
    method: Option<&str>,
    path: Option<&str>,
    ns: &str,
) -> Result<Query, String> {
    let mut matches = Vec::new();
    if let Some(m) = destination_match(res, ns, "")? {
        matches.push(m);
    }
    if let Some(to) = to {
        if !res.kind.is_workload() {
            return Err(format!(
                "--to: {res} is not a workload; requests are sent by deployments, pods or namespaces (try `pylon tap {to}`)"
            ));
        }
        matches.extend(destination_match(to, ns, "--to")?);
    }
    if let Some(a) = authority {
        matches.push(authority_is(a));
    }
    if let Some(m) = method {
        let m = http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("bad --method {m:?}"))?;
        matches.push(http_match(pbhttp::Match::Method(m.into())));
    }
    if let Some(p) = path {
        if !p.starts_with('/') {
            return Err(format!("bad --path {p:?}: a path prefix starts with /"));
        }
        matches.push(http_match(pbhttp::Match::Path(string_match(
            pbhttp::string_match::Match::Prefix(p.to_string()),
        ))));
    }
    Ok(Query {
        matcher: all(matches),
        outbound_only: to.is_some(),
    })
}

// ---------------------------------------------------------------------------------------------
// Reaching the tap ports
// ---------------------------------------------------------------------------------------------

/// A tap port, and the admin address it was learned from.
#[derive(Clone, Debug)]
pub struct Target {
    pub tap: SocketAddr,
    pub admin: Option<SocketAddr>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.admin {
            Some(admin) => write!(f, "{} of proxy {admin}", self.tap),
            None => write!(f, "{}", self.tap),
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

async fn ask_tap_addr(admin: SocketAddr) -> Result<Target, Failure> {
    let (status, body) = admin_client::request(admin, Method::GET, "/tap-addr", CONNECT_TIMEOUT)
        .await
        .map_err(|e| {
            fail(format!(
                "the proxy admin address {admin} is unreachable: {e:#} (is the proxy running, and is this its --admin-addr?)"
            ))
        })?;
    if status == hyper::StatusCode::NOT_FOUND {
        return Err(fail(format!(
            "the proxy at {admin} does not say where its tap port is (GET /tap-addr: 404); give it with --tap ADDR"
        )));
    }
    if !status.is_success() {
        return Err(fail(format!(
            "the proxy at {admin} answered GET /tap-addr with {status}"
        )));
    }
    let tap = tap_addr_from(admin, &String::from_utf8_lossy(&body)).map_err(fail)?;
    Ok(Target {
        tap,
        admin: Some(admin),
    })
}

async fn targets(args: &ProxyArgs, taps: &[SocketAddr]) -> Result<Vec<Target>, Failure> {
    let proxies = crate::proxies::resolve(&args.proxies, args.config_dir.as_deref())
        .map_err(|e| fail(format!("{e:#}")))?;
    if proxies.is_empty() && taps.is_empty() {
        return Err(usage(
            "no proxy to tap: give --proxy ADMIN_ADDR (repeatable, e.g. --proxy 127.0.0.1:4191), --config-dir DIR or --tap-addr ADDR",
        ));
    }
    let mut out: Vec<Target> = taps
        .iter()
        .map(|&tap| Target { tap, admin: None })
        .collect();
    for admin in proxies {
        out.push(ask_tap_addr(admin).await?);
    }
    Ok(out)
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

type Events = tonic::codec::Streaming<TapEvent>;

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
type Sink<'a> = dyn FnMut(usize, TapEvent) -> Result<bool, Failure> + 'a;

/// Reads every stream until they all end, `sink` says stop, `until` passes or Ctrl-C.
async fn run_streams(
    targets: &[Target],
    streams: Vec<Events>,
    until: Option<Duration>,
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
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
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
            _ = &mut ctrl_c => break Ok(()),
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
    let res = Resource::parse(&args.resource).map_err(usage)?;
    let to = args
        .to
        .as_deref()
        .map(Resource::parse)
        .transpose()
        .map_err(usage)?;
    let ns = &args.proxies.namespace;
    let query = build_query(
        &res,
        to.as_ref(),
        args.authority.as_deref(),
        args.method.as_deref(),
        args.path.as_deref(),
        ns,
    )
    .map_err(usage)?;
    let rt = runtime()?;
    rt.block_on(async {
        let targets = targets(&args.proxies, &args.taps).await?;
        // The proxies end a stream after `limit` requests; with a filter only the CLI can
        // apply, the CLI counts alone.
        let server_limit = match (args.limit, query.outbound_only) {
            (Some(l), false) => l,
            _ => 0,
        };
        let mut streams = Vec::new();
        for t in &targets {
            streams.push(observe(t, query.matcher.clone(), server_limit, args.max_rps).await?);
        }
        eprintln!("tapping {res} on {} (Ctrl-C to stop)", describe(&targets));
        let mut admitted = Admitted {
            limit: args.limit.and_then(|l| usize::try_from(l).ok()),
            ..Admitted::default()
        };
        let stdout = std::io::stdout();
        let mut sink = |i: usize, ev: TapEvent| -> Result<bool, Failure> {
            let Some(line) = Line::from_event(&ev) else {
                return Ok(true);
            };
            if query.outbound_only && line.proxy != "out" {
                return Ok(true);
            }
            if !admitted.admit(i, &line) {
                return Ok(!admitted.done());
            }
            let text = match args.output {
                TapOutput::Text => line.text(),
                TapOutput::Json => line.json(),
            };
            let mut out = stdout.lock();
            if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                // The reader went away (`| head`): nothing more to do.
                return Ok(false);
            }
            Ok(!admitted.done())
        };
        run_streams(&targets, streams, None, &mut sink).await
    })
}

// ---------------------------------------------------------------------------------------------
// pylon profile --tap
// ---------------------------------------------------------------------------------------------

pub fn run_top(args: TopArgs) -> ExitCode {
    exit("top", run_top_inner(args))
}

fn run_top_inner(args: TopArgs) -> Result<(), Failure> {
    let res = Resource::parse(&args.resource).map_err(usage)?;
    let once = args
        .once
        .as_deref()
        .map(pylon_proxy_policy::duration::parse)
        .transpose()
        .map_err(|e| usage(format!("bad --once: {e}")))?;
    let query =
        build_query(&res, None, None, None, None, &args.proxies.namespace).map_err(usage)?;
    let rt = runtime()?;
    let (targets, streams) = rt.block_on(async {
        let targets = targets(&args.proxies, &args.taps).await?;
        let mut streams = Vec::new();
        for t in &targets {
            streams.push(observe(t, query.matcher.clone(), 0, args.max_rps).await?);
        }
        Ok::<_, Failure>((targets, streams))
    })?;
    let paths = std::sync::Arc::new(std::sync::Mutex::new(top::Paths::default()));
    let sink_paths = paths.clone();
    let mut sink = move |proxy: usize, ev: TapEvent| -> Result<bool, Failure> {
        if let Some(line) = Line::from_event(&ev) {
            sink_paths
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe(proxy, &line);
        }
        Ok(true)
    };
    let title = format!("pylon top {res} ({})", describe(&targets));
    match once {
        Some(d) => {
            eprintln!(
                "tapping {res} on {} for {}...",
                describe(&targets),
                args.once.as_deref().unwrap_or("")
            );
            rt.block_on(run_streams(&targets, streams, Some(d), &mut sink))?;
            let text =
                top::render_text(&paths.lock().unwrap_or_else(|e| e.into_inner()), args.sort);
            std::io::stdout()
                .lock()
                .write_all(text.as_bytes())
                .map_err(|e| fail(format!("writing the output: {e}")))
        }
        None => {
            // The streams run on their own thread; this one draws and reads keys.
            std::thread::spawn(move || {
                let _ = rt.block_on(run_streams(&targets, streams, None, &mut sink));
            });
            top::interactive(paths, title, args.sort)
                .map_err(|e| fail(format!("the terminal: {e}")))
        }
    }
}

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
    let ns = args.proxies.namespace.clone();
    let service = match (&args.service, res.kind, &res.name) {
        (Some(s), _, _) => Some(s.clone()),
        (None, Kind::Service, Some(name)) => Some(name.clone()),
        _ => None,
    };
    let query = build_query(&res, None, None, None, None, &ns).map_err(usage)?;
    let rt = runtime()?;
    let (routes, authorities) = rt.block_on(async {
        let targets = targets(&args.proxies, &args.taps).await?;
        let mut streams = Vec::new();
        for t in &targets {
            streams.push(observe(t, query.matcher.clone(), 0, args.max_rps).await?);
        }
        eprintln!(
            "tapping {res} on {} for {}...",
            describe(&targets),
            args.tap_duration
        );
        let mut routes = profile::Routes::default();
        let mut authorities: HashMap<String, u64> = HashMap::new();
        let mut sink = |_: usize, ev: TapEvent| -> Result<bool, Failure> {
            let Some(line) = Line::from_event(&ev) else {
                return Ok(true);
            };
            // One per request: retries repeat the request.
            if line.kind == Some(EventKind::Req) && line.attempt.unwrap_or(1) == 1 {
                if let (Some(m), Some(p)) = (&line.method, &line.path) {
                    routes.observe(m, p);
                }
                if let Some(a) = &line.authority {
                    *authorities.entry(a.clone()).or_default() += 1;
                }
            }
            Ok(true)
        };
        run_streams(&targets, streams, Some(duration), &mut sink).await?;
        Ok::<_, Failure>((routes, authorities))
    })?;
    if routes.is_empty() {
        return Err(fail(format!(
            "no requests for {res} in {} (is traffic flowing through the proxies given?)",
            args.tap_duration
        )));
    }
    let (service, ns) = match service {
        Some(s) => (s, ns),
        None => {
            let mut seen: Vec<(&String, &u64)> = authorities.iter().collect();
            seen.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            seen.iter()
                .find_map(|(a, _)| service_of_authority(a))
                .ok_or_else(|| {
                    usage("the requests observed name no in-cluster service (NAME.NS.svc...); give --service NAME")
                })?
        }
    };
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

    fn r(s: &str) -> Resource {
        Resource::parse(s).expect("resource")
    }

    fn prefix(p: &str) -> Match {
        authority_prefix(p.to_string())
    }

    #[test]
    fn workloads_tap_everything_services_their_authority() {
        let q = build_query(&r("deploy/web"), None, None, None, None, "default").unwrap();
        assert_eq!(q.matcher, None);
        assert!(!q.outbound_only);
        let q = build_query(&r("svc/web"), None, None, None, None, "prod").unwrap();
        assert_eq!(q.matcher, Some(prefix("web.prod.svc.")));
    }

    #[test]
    fn flags_are_all_of_the_match() {
        let svc = r("svc/web");
        let q = build_query(
            &r("deploy/client"),
            Some(&svc),
            None,
            Some("get"),
            Some("/users"),
            "default",
        )
        .unwrap();
        assert!(q.outbound_only);
        let method = http_match(pbhttp::Match::Method(http::Method::GET.into()));
        let path = http_match(pbhttp::Match::Path(string_match(
            pbhttp::string_match::Match::Prefix("/users".into()),
        )));
        assert_eq!(
            q.matcher,
            all(vec![prefix("web.default.svc."), method, path])
        );
    }

    #[test]
    fn authorities_match_with_or_without_port() {
        let exact = |a: &str| {
            http_match(pbhttp::Match::Authority(string_match(
                pbhttp::string_match::Match::Exact(a.into()),
            )))
        };
        assert_eq!(authority_is("web:80"), exact("web:80"));
        assert_eq!(
            authority_is("web.example.com"),
            any(vec![exact("web.example.com"), prefix("web.example.com:")])
        );
        let q = build_query(&r("authority/web:80"), None, None, None, None, "x").unwrap();
        assert_eq!(q.matcher, Some(exact("web:80")));
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        let err = build_query(&r("svc/web"), Some(&r("svc/db")), None, None, None, "d")
            .expect_err("a service sends nothing");
        assert!(err.contains("not a workload"), "{err}");
        let err = build_query(&r("deploy/a"), Some(&r("deploy/b")), None, None, None, "d")
            .expect_err("--to a workload");
        assert!(err.contains("expected svc/NAME or authority/HOST"), "{err}");
        let err = build_query(&r("deploy/a"), None, None, Some("G T"), None, "d").unwrap_err();
        assert!(err.contains("bad --method"), "{err}");
        let err = build_query(&r("deploy/a"), None, None, None, Some("users"), "d").unwrap_err();
        assert!(err.contains("bad --path"), "{err}");
        assert!(Resource::parse("widget/x")
            .unwrap_err()
            .contains("unknown resource kind"));
    }

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
}
