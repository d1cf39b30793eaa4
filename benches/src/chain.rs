//! The paths under test, set up on loopback: `direct` (load -> app), and the same one-hop
//! sidecar chain (outbound proxy -> inbound proxy -> app) built from Pylon, nginx and HAProxy.
//! Configs are rendered here (pure functions, unit-tested) into the run's temp dir.
//!
//! Opaque TCP goes through the inbound proxy only, for every proxy: Pylon's outbound listener
//! needs SO_ORIGINAL_DST (an iptables redirect) to know where an opaque connection goes, and
//! a one-hop row is only comparable with one-hop rows.
//!
//! `pylon-mtls` is the Pylon chain with mesh identities: a throwaway CA in the run's temp dir
//! issues the client's (outbound proxy's) and the server's (inbound proxy's) certificates, and
//! the EndpointSlice carries `pylon.io/identity`, so the hop between the proxies is TLS 1.3
//! (HTTP/1.1 from the load generator travels as HTTP/2 on it).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use pylon_identity::ca;
use pylon_proxy_metrics::exposition;
use serde::Serialize;

use crate::loadgen::{self, Job, Target, Workload};
use crate::procs::{find_program, free_addr, output_of, Managed};

/// The name requests carry (`Host` / `:authority`); the outbound Pylon resolves it through the
/// Service in its config dir.
pub const AUTHORITY: &str = "bench.default.svc.cluster.local";
/// How long a freshly started path may take to answer its first request.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// The EndpointSlice annotation naming the identity its endpoints prove (mesh TLS to them).
pub const IDENTITY_ANNOTATION: &str = "pylon.io/identity";
/// The mTLS chain's throwaway CA: trust domain, and how long it and its certificates last.
const TRUST_DOMAIN: &str = "cluster.local";
const CA_VALID_FOR: Duration = Duration::from_secs(24 * 3600);
const CERT_VALID_FOR: Duration = Duration::from_secs(12 * 3600);
/// Service accounts of the mTLS chain's two workloads (namespace `default`).
const SERVER_SA: &str = "bench";
const CLIENT_SA: &str = "bench-client";
/// Largest `/metrics` body read from an admin server.
const MAX_METRICS_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Direct,
    Pylon,
    /// The Pylon chain with mesh identities: mTLS between the two proxies.
    #[serde(rename = "pylon-mtls")]
    PylonMtls,
    Nginx,
    Haproxy,
}

impl PathKind {
    pub const ALL: [PathKind; 5] = [
        PathKind::Direct,
        PathKind::Pylon,
        PathKind::PylonMtls,
        PathKind::Nginx,
        PathKind::Haproxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Pylon => "pylon",
            PathKind::PylonMtls => "pylon-mtls",
            PathKind::Nginx => "nginx",
            PathKind::Haproxy => "haproxy",
        }
    }

    pub fn parse(s: &str) -> Result<PathKind> {
        PathKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .with_context(|| {
                format!("unknown path {s:?} (direct, pylon, pylon-mtls, nginx, haproxy)")
            })
    }
}

/// The upstream app's two listeners.
#[derive(Debug, Clone, Copy)]
pub struct AppAddrs {
    pub http: SocketAddr,
    pub echo: SocketAddr,
}

/// What every path is started with.
pub struct Setup<'a> {
    pub app: AppAddrs,
    pub threads: usize,
    /// RLIMIT_NOFILE every proxy inherits.
    pub nofile: u64,
    pub proxy_cpus: Option<&'a str>,
    pub dir: &'a Path,
    pub pylon_bin: &'a Path,
}

/// A running path: where each workload enters it and which processes do its work.
pub struct Chain {
    pub kind: PathKind,
    /// Entry for HTTP/1.1 workloads.
    h1: SocketAddr,
    /// Entry for h2c and gRPC workloads.
    h2: SocketAddr,
    /// Entry for the TCP echo, or why this path has none.
    tcp: std::result::Result<SocketAddr, String>,
    /// The proxies of the HTTP chain (outbound and inbound); empty for direct.
    pub http_pids: Vec<u32>,
    /// The tap ports of the HTTP chain's proxies (Pylon only).
    pub tap_addrs: Vec<SocketAddr>,
    /// The admin ports of the HTTP chain's proxies, outbound first (Pylon only).
    pub admin_addrs: Vec<SocketAddr>,
    /// The identities of the HTTP chain's proxies (`pylon-mtls` only).
    pub identities: Option<MeshIdentities>,
    /// The proxy carrying the TCP echo.
    pub tcp_pids: Vec<u32>,
    /// The outbound Pylon's config dir, which it watches (Pylon only).
    pub mesh_dir: Option<PathBuf>,
    procs: Vec<Managed>,
}

impl Chain {
    /// Where `workload` enters this path, or why it can't run here.
    pub fn entry(&self, workload: Workload) -> std::result::Result<SocketAddr, String> {
        match workload {
            Workload::TcpEcho => self.tcp.clone(),
            w if w.is_h2() => Ok(self.h2),
            _ => Ok(self.h1),
        }
    }

    pub fn target(&self, workload: Workload) -> std::result::Result<Target, String> {
        Ok(Target {
            addr: self.entry(workload)?,
            authority: AUTHORITY.to_owned(),
        })
    }

    /// The processes whose CPU a workload costs.
    pub fn pids(&self, workload: Workload) -> &[u32] {
        if workload == Workload::TcpEcho {
            &self.tcp_pids
        } else {
            &self.http_pids
        }
    }

    /// What a workload crosses on this path.
    pub fn hops(&self, workload: Workload) -> &'static str {
        match (self.kind, workload) {
            (PathKind::Direct, _) => "load -> app",
            (_, Workload::TcpEcho) => "load -> inbound -> echo",
            (PathKind::PylonMtls, _) => "load -> outbound =mTLS=> inbound -> app",
            _ => "load -> outbound -> inbound -> app",
        }
    }

    pub fn check_running(&mut self) -> Result<()> {
        for p in &mut self.procs {
            p.check_running()?;
        }
        Ok(())
    }

    /// Stops every process of the path with SIGTERM, failing if one does not exit within
    /// `grace` ([`Managed::stop`]).
    pub fn stop(self, grace: Duration) -> Result<()> {
        for p in self.procs {
            p.stop(grace)?;
        }
        Ok(())
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for p in &self.procs {
            let _ = write!(out, "\n--- {} log (tail) ---\n{}", p.name, p.log_tail());
        }
        out
    }

    /// Sends one real request of every workload it supports, retrying while the proxies start;
    /// fails with their logs if any workload never succeeds.
    pub async fn verify(&mut self) -> Result<()> {
        for workload in Workload::ALL {
            let Ok(target) = self.target(workload) else {
                continue;
            };
            let job = Job::new(workload, target);
            let deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
            loop {
                self.check_running()?;
                match loadgen::verify(&job).await {
                    Ok(()) => break,
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        bail!(
                            "path {} cannot carry {}: {e:#}{}",
                            self.kind.name(),
                            workload.name(),
                            self.logs()
                        );
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Ok(())
    }
}

pub fn direct(app: AppAddrs) -> Chain {
    Chain {
        kind: PathKind::Direct,
        h1: app.http,
        h2: app.http,
        tcp: Ok(app.echo),
        http_pids: Vec::new(),
        tap_addrs: Vec::new(),
        admin_addrs: Vec::new(),
        identities: None,
        tcp_pids: Vec::new(),
        mesh_dir: None,
        procs: Vec::new(),
    }
}

/// The Service and EndpointSlice the outbound Pylon resolves `bench` with. With `identity`,
/// the slice carries `pylon.io/identity: <identity>`: the outbound proxy speaks mesh TLS to the
/// endpoint and requires it to prove that identity.
pub fn render_pylon_mesh(inbound: SocketAddr, identity: Option<&str>) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Service\n\
         metadata:\n  name: bench\n  namespace: default\n\
         spec:\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    targetPort: http\n\
         ---\n{}",
        render_endpoint_slice("bench-1", inbound, identity)
    )
}

/// An EndpointSlice `name` of the `bench` Service with one endpoint, `addr`; with `identity`,
/// annotated with the mesh identity the endpoint must prove.
pub fn render_endpoint_slice(name: &str, addr: SocketAddr, identity: Option<&str>) -> String {
    let ip = addr.ip();
    let port = addr.port();
    let annotations = identity
        .map(|id| format!("  annotations:\n    {IDENTITY_ANNOTATION}: {id}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: discovery.k8s.io/v1\n\
         kind: EndpointSlice\n\
         metadata:\n  name: {name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: bench\n\
         {annotations}\
         addressType: IPv4\n\
         ports:\n- name: http\n  port: {port}\n  protocol: TCP\n\
         endpoints:\n- addresses:\n  - \"{ip}\"\n  conditions:\n    ready: true\n"
    )
}

/// Starts the bench's app (this binary's `app` command) on two free loopback ports.
pub fn start_app(cpus: Option<&str>, dir: &Path) -> Result<(AppAddrs, Managed)> {
    let app = AppAddrs {
        http: free_addr()?,
        echo: free_addr()?,
    };
    let exe = std::env::current_exe().context("locating this binary")?;
    let process = Managed::spawn(
        "app",
        &exe,
        &[
            "app".into(),
            "--http".into(),
            app.http.to_string(),
            "--echo".into(),
            app.echo.to_string(),
        ],
        &[],
        cpus,
        dir,
    )?;
    Ok((app, process))
}

/// The mTLS chain's workload identities and where their identity dirs are.
#[derive(Debug, Clone)]
pub struct MeshIdentities {
    /// The outbound proxy's (the client workload's) identity.
    pub client: String,
    pub client_dir: PathBuf,
    /// The inbound proxy's (the server workload's) identity: the EndpointSlice's annotation.
    pub server: String,
    pub server_dir: PathBuf,
}

/// A throwaway CA under `dir` and an identity dir for each of the two workloads.
fn issue_identities(dir: &Path) -> Result<MeshIdentities> {
    let root = dir.join("identity");
    let ca_dir = root.join("ca");
    ca::init_ca(TRUST_DOMAIN, &ca_dir, CA_VALID_FOR).context("creating the bench's CA")?;
    let issue = |sa: &str| -> Result<(String, PathBuf)> {
        let out = root.join(sa);
        let (cert, _) = ca::issue(&ca_dir, sa, "default", &out, CERT_VALID_FOR)
            .with_context(|| format!("issuing the identity of {sa}"))?;
        Ok((cert.identity.as_str().to_owned(), out))
    };
    let (server, server_dir) = issue(SERVER_SA)?;
    let (client, client_dir) = issue(CLIENT_SA)?;
    Ok(MeshIdentities {
        client,
        client_dir,
        server,
        server_dir,
    })
}

fn pylon_args(
    threads: usize,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
    tap: SocketAddr,
) -> Vec<String> {
    vec![
        "--inbound-addr".into(),
        inbound.to_string(),
        "--outbound-addr".into(),
        outbound.to_string(),
        "--admin-addr".into(),
        admin.to_string(),
        "--tap-addr".into(),
        tap.to_string(),
        "--threads".into(),
        threads.to_string(),
        "--shutdown-grace".into(),
        "1s".into(),
    ]
}

/// Pylon's log level for the bench: warnings only (the equivalent of access logs off).
const PYLON_ENV: &[(&str, &str)] = &[("PYLON_LOG", "warn")];

/// The Pylon chain, plaintext between the proxies.
pub fn pylon(s: &Setup) -> Result<Chain> {
    pylon_chain(s, None)
}

/// The Pylon chain with mTLS between the proxies: both get an identity from a throwaway CA
/// (`--identity-dir`) and the EndpointSlice names the inbound proxy's. Its TCP echo is not
/// measured: it would be the plaintext chain's (a plaintext client straight to the inbound).
pub fn pylon_mtls(s: &Setup) -> Result<Chain> {
    let ids = issue_identities(s.dir)?;
    pylon_chain(s, Some(ids))
}

fn pylon_chain(s: &Setup, ids: Option<MeshIdentities>) -> Result<Chain> {
    let (kind, prefix) = match ids {
        Some(_) => (PathKind::PylonMtls, "pylon-mtls"),
        None => (PathKind::Pylon, "pylon"),
    };
    let identity_args = |dir: Option<&PathBuf>| -> Vec<String> {
        dir.map(|d| vec!["--identity-dir".into(), d.display().to_string()])
            .unwrap_or_default()
    };
    let inbound = free_addr()?;
    let (in_tap, out_tap) = (free_addr()?, free_addr()?);
    let (in_admin, out_admin) = (free_addr()?, free_addr()?);
    let mut in_args = pylon_args(s.threads, inbound, free_addr()?, in_admin, in_tap);
    in_args.extend(["--inbound-forward".into(), s.app.http.to_string()]);
    in_args.extend(identity_args(ids.as_ref().map(|i| &i.server_dir)));
    let inbound_proxy = Managed::spawn(
        &format!("{prefix}-inbound"),
        s.pylon_bin,
        &in_args,
        PYLON_ENV,
        s.proxy_cpus,
        s.dir,
    )?;

    let mesh = s.dir.join(format!("{prefix}-mesh"));
    std::fs::create_dir_all(&mesh).with_context(|| format!("creating {}", mesh.display()))?;
    let server_id = ids.as_ref().map(|i| i.server.as_str());
    std::fs::write(
        mesh.join("bench.yaml"),
        render_pylon_mesh(inbound, server_id),
    )
    .context("writing the outbound proxy's mesh objects")?;
    let outbound = free_addr()?;
    let mut out_args = pylon_args(s.threads, free_addr()?, outbound, out_admin, out_tap);
    out_args.extend(["--config-dir".into(), mesh.display().to_string()]);
    out_args.extend(identity_args(ids.as_ref().map(|i| &i.client_dir)));
    let outbound_proxy = Managed::spawn(
        &format!("{prefix}-outbound"),
        s.pylon_bin,
        &out_args,
        PYLON_ENV,
        s.proxy_cpus,
        s.dir,
    )?;

    let http_pids = vec![outbound_proxy.pid(), inbound_proxy.pid()];
    let mut procs = vec![outbound_proxy, inbound_proxy];
    let (tcp, tcp_pids) = if ids.is_some() {
        (
            Err(
                "the echo goes from a plaintext client to the inbound proxy only: the same as \
                 the pylon path's (no mTLS hop)"
                    .to_owned(),
            ),
            Vec::new(),
        )
    } else {
        let tcp = free_addr()?;
        let mut tcp_args = pylon_args(s.threads, tcp, free_addr()?, free_addr()?, free_addr()?);
        tcp_args.extend([
            "--inbound-forward".into(),
            s.app.echo.to_string(),
            "--opaque-ports".into(),
            s.app.echo.port().to_string(),
        ]);
        let tcp_proxy = Managed::spawn(
            "pylon-inbound-tcp",
            s.pylon_bin,
            &tcp_args,
            PYLON_ENV,
            s.proxy_cpus,
            s.dir,
        )?;
        let pid = tcp_proxy.pid();
        procs.push(tcp_proxy);
        (Ok(tcp), vec![pid])
    };

    Ok(Chain {
        kind,
        h1: outbound,
        h2: outbound,
        tcp,
        http_pids,
        tap_addrs: vec![out_tap, in_tap],
        admin_addrs: vec![out_admin, in_admin],
        identities: ids,
        tcp_pids,
        mesh_dir: Some(mesh),
        procs,
    })
}

/// `GET /metrics` from an admin server, on a connection of its own.
pub async fn fetch_metrics(admin: SocketAddr) -> Result<String> {
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(admin).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let connection = tokio::spawn(connection);
        let request = http::Request::get("/metrics")
            .header(http::header::HOST, admin.to_string())
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_METRICS_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the body: {e}"))?
            .to_bytes();
        connection.abort();
        if !status.is_success() {
            bail!("answered {status}");
        }
        String::from_utf8(body.to_vec()).context("the body is not UTF-8")
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| anyhow!("no answer within 5 s"))?
        .with_context(|| format!("GET http://{admin}/metrics"))
}

/// Which side of the mTLS hop a proxy's `/metrics` is read on, and the peer it must name.
#[derive(Debug, Clone, Copy)]
pub enum MtlsPeer<'a> {
    /// The outbound proxy: `direction="outbound"`, `server_id="<identity>"`.
    Server(&'a str),
    /// The inbound proxy: `direction="inbound"`, `client_id="<identity>"`.
    Client(&'a str),
}

/// Responses a proxy counted over mesh TLS with `peer`: the sum of its
/// `response_total{direction=...,tls="true",server_id|client_id="<identity>"}` series.
pub fn mtls_responses(metrics: &str, peer: MtlsPeer) -> Result<u64> {
    let (direction, label, id) = match peer {
        MtlsPeer::Server(id) => ("outbound", "server_id", id),
        MtlsPeer::Client(id) => ("inbound", "client_id", id),
    };
    let samples = exposition::parse(metrics).context("parsing the Prometheus text")?;
    let total: f64 = samples
        .iter()
        .filter(|s| s.name == "response_total")
        .filter(|s| {
            s.label("direction") == Some(direction)
                && s.label("tls") == Some("true")
                && s.label(label) == Some(id)
        })
        .map(|s| s.value)
        .sum();
    Ok(total.max(0.0) as u64)
}

impl Chain {
    /// Responses both proxies of the `pylon-mtls` chain counted over mesh TLS with each other
    /// (outbound: `server_id` = the inbound's identity; inbound: `client_id` = the outbound's).
    pub async fn mtls_responses(&self) -> Result<(u64, u64)> {
        let (Some(ids), [outbound, inbound, ..]) = (&self.identities, self.admin_addrs.as_slice())
        else {
            bail!("path {} has no mesh identities", self.kind.name());
        };
        let out = mtls_responses(
            &fetch_metrics(*outbound).await?,
            MtlsPeer::Server(&ids.server),
        )?;
        let inb = mtls_responses(
            &fetch_metrics(*inbound).await?,
            MtlsPeer::Client(&ids.client),
        )?;
        Ok((out, inb))
    }
}

/// One proxy of a two-proxy chain: what it listens on and where it sends.
#[derive(Debug, Clone)]
pub struct Hop {
    pub name: String,
    pub listen_h1: SocketAddr,
    pub listen_h2: SocketAddr,
    /// The next HTTP/1.1 hop (the inbound proxy's h1 listener, or the app).
    pub next_h1: SocketAddr,
    /// The next h2c hop (the inbound proxy's h2 listener, or the app, which speaks both).
    pub next_h2: SocketAddr,
    /// Opaque TCP: (listen, upstream).
    pub tcp: Option<(SocketAddr, SocketAddr)>,
}

/// How this nginx can proxy TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NginxStream {
    /// Compiled in (`--with-stream`).
    Static,
    /// A dynamic module to `load_module`.
    Module(PathBuf),
    Missing,
}

/// Reads `nginx -V`: static stream, or the dynamic module if it is installed.
pub fn nginx_stream_support(configure_args: &str, module: &Path) -> NginxStream {
    let flags: Vec<&str> = configure_args.split_whitespace().collect();
    if flags.contains(&"--with-stream") {
        NginxStream::Static
    } else if flags.contains(&"--with-stream=dynamic") && module.is_file() {
        NginxStream::Module(module.to_path_buf())
    } else {
        NginxStream::Missing
    }
}

/// nginx as a careful operator runs it as a sidecar: `threads` workers, access log off,
/// keep-alive (and many requests per connection) on both sides, request bodies streamed rather
/// than spooled to disk, h2c on the h2 listener, `grpc_pass` for gRPC, `stream {}` for TCP.
pub fn render_nginx(
    hop: &Hop,
    threads: usize,
    nofile: u64,
    dir: &Path,
    as_root: bool,
    stream: &NginxStream,
) -> String {
    let d = dir.display();
    let name = &hop.name;
    let mut c = String::new();
    if let NginxStream::Module(path) = stream {
        if hop.tcp.is_some() {
            let _ = writeln!(c, "load_module {};", path.display());
        }
    }
    if as_root {
        // Workers must read and write the run's temp dir (mode 0700).
        c.push_str("user root;\n");
    }
    let _ = write!(
        c,
        "worker_processes {threads};
worker_rlimit_nofile {nofile};
daemon off;
master_process on;
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;
events {{
    worker_connections {worker_connections};
}}
http {{
    access_log off;
    client_body_temp_path {d}/{name}-body;
    proxy_temp_path {d}/{name}-proxy;
    fastcgi_temp_path {d}/{name}-fastcgi;
    uwsgi_temp_path {d}/{name}-uwsgi;
    scgi_temp_path {d}/{name}-scgi;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    client_max_body_size 1m;
    client_body_buffer_size 128k;
    proxy_request_buffering off;
    proxy_http_version 1.1;
    proxy_set_header Connection \"\";
    proxy_set_header Host $host;
    upstream next_h1 {{
        server {next_h1};
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    upstream next_h2 {{
        server {next_h2};
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {listen_h1} backlog=4096;
        location / {{
            proxy_pass http://next_h1;
        }}
    }}
    # h2c (prior knowledge). nginx proxies plain HTTP to upstreams over HTTP/1.1 only; gRPC
    # goes on over h2 with grpc_pass.
    server {{
        listen {listen_h2} http2 backlog=4096;
        location / {{
            proxy_pass http://next_h1;
        }}
        location /bench.Bench/ {{
            grpc_pass grpc://next_h2;
        }}
    }}
}}
",
        next_h1 = hop.next_h1,
        next_h2 = hop.next_h2,
        listen_h1 = hop.listen_h1,
        listen_h2 = hop.listen_h2,
        // Client and upstream connections both count; leave room for listeners and logs.
        worker_connections = nofile.saturating_sub(64).max(1024),
    );
    if let (Some((listen, upstream)), true) = (hop.tcp, *stream != NginxStream::Missing) {
        let _ = write!(
            c,
            "stream {{
    server {{
        listen {listen} backlog=4096;
        proxy_pass {upstream};
    }}
}}
"
        );
    }
    c
}

/// HAProxy as a careful operator runs it as a sidecar: `threads` threads, no logging,
/// connection reuse to the next hop, h2c end to end (`proto h2` on bind and server lines) for
/// h2 workloads, `mode tcp` for the echo.
pub fn render_haproxy(hop: &Hop, threads: usize, nofile: u64) -> String {
    let mut c = format!(
        "global
    nbthread {threads}
    maxconn {maxconn}

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    timeout http-request 10s

frontend h1
    bind {listen_h1} backlog 4096
    default_backend next_h1

frontend h2
    bind {listen_h2} proto h2 backlog 4096
    default_backend next_h2

backend next_h1
    http-reuse always
    server next {next_h1}

backend next_h2
    http-reuse always
    server next {next_h2} proto h2
",
        listen_h1 = hop.listen_h1,
        listen_h2 = hop.listen_h2,
        next_h1 = hop.next_h1,
        next_h2 = hop.next_h2,
        maxconn = haproxy_maxconn(nofile),
    );
    if let Some((listen, upstream)) = hop.tcp {
        let _ = write!(
            c,
            "
listen tcp
    mode tcp
    bind {listen} backlog 4096
    server next {upstream}
"
        );
    }
    c
}

/// HAProxy reserves two descriptors per connection (client and server) and refuses to start when
/// `maxconn` needs more than RLIMIT_NOFILE allows.
pub fn haproxy_maxconn(nofile: u64) -> u64 {
    (nofile.saturating_sub(100) / 2).clamp(1_000, 60_000)
}

/// The two hops of a chain: the outbound proxy sends to the inbound one, which sends to the app
/// and also carries the TCP echo.
fn two_hops(prefix: &str, app: AppAddrs) -> Result<(Hop, Hop)> {
    let inbound = Hop {
        name: format!("{prefix}-inbound"),
        listen_h1: free_addr()?,
        listen_h2: free_addr()?,
        next_h1: app.http,
        next_h2: app.http,
        tcp: Some((free_addr()?, app.echo)),
    };
    let outbound = Hop {
        name: format!("{prefix}-outbound"),
        listen_h1: free_addr()?,
        listen_h2: free_addr()?,
        next_h1: inbound.listen_h1,
        next_h2: inbound.listen_h2,
        tcp: None,
    };
    Ok((outbound, inbound))
}

pub fn nginx_program() -> Result<PathBuf> {
    find_program("nginx")
        .context("nginx not found (install nginx-light or nginx; benches/run does)")
}

pub fn haproxy_program() -> Result<PathBuf> {
    find_program("haproxy").context("haproxy not found (install haproxy; benches/run does)")
}

pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

pub fn nginx_stream() -> Result<NginxStream> {
    let v = output_of(&nginx_program()?, &["-V"])?;
    Ok(nginx_stream_support(&v, Path::new(NGINX_STREAM_MODULE)))
}

pub fn nginx(s: &Setup) -> Result<Chain> {
    let program = nginx_program()?;
    let stream = nginx_stream()?;
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let (out_hop, in_hop) = two_hops("nginx", s.app)?;
    let mut procs = Vec::new();
    for hop in [&in_hop, &out_hop] {
        let conf = s.dir.join(format!("{}.conf", hop.name));
        std::fs::write(
            &conf,
            render_nginx(hop, s.threads, s.nofile, s.dir, as_root, &stream),
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        let args = vec![
            "-p".into(),
            s.dir.display().to_string(),
            "-e".into(),
            s.dir
                .join(format!("{}.startup.log", hop.name))
                .display()
                .to_string(),
            "-c".into(),
            conf.display().to_string(),
        ];
        procs.push(Managed::spawn(
            &hop.name,
            &program,
            &args,
            &[],
            s.proxy_cpus,
            s.dir,
        )?);
    }
    let (inbound, outbound) = (procs[0].pid(), procs[1].pid());
    let tcp = match (&stream, in_hop.tcp) {
        (NginxStream::Missing, _) | (_, None) => Err(format!(
            "nginx here has no stream module ({NGINX_STREAM_MODULE} missing; Debian package \
             libnginx-mod-stream)"
        )),
        (_, Some((listen, _))) => Ok(listen),
    };
    Ok(Chain {
        kind: PathKind::Nginx,
        h1: out_hop.listen_h1,
        h2: out_hop.listen_h2,
        tcp,
        http_pids: vec![outbound, inbound],
        tap_addrs: Vec::new(),
        admin_addrs: Vec::new(),
        identities: None,
        tcp_pids: vec![inbound],
        mesh_dir: None,
        procs,
    })
}

pub fn haproxy(s: &Setup) -> Result<Chain> {
    let program = haproxy_program()?;
    let (out_hop, in_hop) = two_hops("haproxy", s.app)?;
    let mut procs = Vec::new();
    for hop in [&in_hop, &out_hop] {
        let conf = s.dir.join(format!("{}.cfg", hop.name));
        std::fs::write(&conf, render_haproxy(hop, s.threads, s.nofile))
            .with_context(|| format!("writing {}", conf.display()))?;
        let check = output_of(&program, &["-c", "-f", &conf.display().to_string()]);
        if let Err(e) = check {
            bail!("HAProxy rejects the generated {}: {e:#}", conf.display());
        }
        let args = vec!["-db".into(), "-f".into(), conf.display().to_string()];
        procs.push(Managed::spawn(
            &hop.name,
            &program,
            &args,
            &[],
            s.proxy_cpus,
            s.dir,
        )?);
    }
    let (inbound, outbound) = (procs[0].pid(), procs[1].pid());
    let tcp = in_hop
        .tcp
        .map(|(listen, _)| listen)
        .context("the inbound hop has a TCP listener")?;
    Ok(Chain {
        kind: PathKind::Haproxy,
        h1: out_hop.listen_h1,
        h2: out_hop.listen_h2,
        tcp: Ok(tcp),
        http_pids: vec![outbound, inbound],
        tap_addrs: Vec::new(),
        admin_addrs: Vec::new(),
        identities: None,
        tcp_pids: vec![inbound],
        mesh_dir: None,
        procs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(tcp: bool) -> Hop {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        Hop {
            name: "x-inbound".into(),
            listen_h1: a(1001),
            listen_h2: a(1002),
            next_h1: a(2001),
            next_h2: a(2002),
            tcp: tcp.then(|| (a(1003), a(2003))),
        }
    }

    #[test]
    fn nginx_config_has_the_operator_settings() {
        let c = render_nginx(
            &hop(true),
            2,
            20_000,
            Path::new("/tmp/b"),
            true,
            &NginxStream::Module("/m.so".into()),
        );
        assert!(c.starts_with("load_module /m.so;\nuser root;\n"));
        for needle in [
            "worker_processes 2;",
            "worker_rlimit_nofile 20000;",
            "worker_connections 19936;",
            "access_log off;",
            "keepalive 256;",
            "proxy_http_version 1.1;",
            "proxy_set_header Connection \"\";",
            "server 127.0.0.1:2001;",
            "server 127.0.0.1:2002;",
            "listen 127.0.0.1:1001 backlog=4096;",
            "listen 127.0.0.1:1002 http2 backlog=4096;",
            "grpc_pass grpc://next_h2;",
            "listen 127.0.0.1:1003 backlog=4096;\n        proxy_pass 127.0.0.1:2003;",
            "pid /tmp/b/x-inbound.pid;",
        ] {
            assert!(c.contains(needle), "missing {needle:?} in\n{c}");
        }
        assert_eq!(c.matches('{').count(), c.matches('}').count());

        let no_stream = render_nginx(
            &hop(true),
            1,
            20_000,
            Path::new("/tmp/b"),
            false,
            &NginxStream::Missing,
        );
        assert!(!no_stream.contains("stream {"));
        assert!(!no_stream.contains("load_module"));
        assert!(!no_stream.contains("user root"));
    }

    #[test]
    fn haproxy_config_has_the_operator_settings() {
        let c = render_haproxy(&hop(true), 3, 20_000);
        assert!(c.contains("maxconn 9950\n"), "{c}");
        for needle in [
            "nbthread 3",
            "bind 127.0.0.1:1001 backlog 4096",
            "bind 127.0.0.1:1002 proto h2 backlog 4096",
            "server next 127.0.0.1:2001\n",
            "server next 127.0.0.1:2002 proto h2",
            "http-reuse always",
            "mode tcp\n    bind 127.0.0.1:1003 backlog 4096\n    server next 127.0.0.1:2003",
        ] {
            assert!(c.contains(needle), "missing {needle:?} in\n{c}");
        }
        assert!(
            !c.lines().any(|l| l.trim_start().starts_with("log ")),
            "logging must be off"
        );
        assert!(!render_haproxy(&hop(false), 1, 20_000).contains("mode tcp"));
    }

    #[test]
    fn pylon_mesh_points_the_service_at_the_inbound_proxy() {
        let yaml = render_pylon_mesh("127.0.0.1:4143".parse().expect("addr"), None);
        assert!(yaml.contains("kind: Service\nmetadata:\n  name: bench\n  namespace: default"));
        assert!(yaml.contains("kubernetes.io/service-name: bench"));
        assert!(yaml.contains("ports:\n- name: http\n  port: 4143"));
        assert!(yaml.contains("- \"127.0.0.1\""));
        assert!(!yaml.contains("annotations"), "{yaml}");
    }

    fn yaml_docs(yaml: &str) -> Vec<serde_yaml_ng::Value> {
        serde_yaml_ng::Deserializer::from_str(yaml)
            .map(|doc| serde::Deserialize::deserialize(doc).expect("valid YAML"))
            .collect()
    }

    #[test]
    fn pylon_mesh_with_an_identity_annotates_the_endpoint_slice() {
        let id = "bench.default.serviceaccount.identity.pylon.cluster.local";
        let yaml = render_pylon_mesh("127.0.0.1:4143".parse().expect("addr"), Some(id));
        let docs = yaml_docs(&yaml);
        assert_eq!(docs.len(), 2, "{yaml}");
        assert_eq!(docs[0]["kind"].as_str(), Some("Service"));
        assert!(docs[0]["metadata"].get("annotations").is_none(), "{yaml}");
        let slice = &docs[1];
        assert_eq!(slice["kind"].as_str(), Some("EndpointSlice"));
        assert_eq!(
            slice["metadata"]["annotations"]["pylon.io/identity"].as_str(),
            Some(id)
        );
        // The annotation sits beside the labels, which still name the Service.
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"].as_str(),
            Some("bench")
        );
        assert_eq!(slice["metadata"]["name"].as_str(), Some("bench-1"));
        assert_eq!(slice["addressType"].as_str(), Some("IPv4"));
        assert_eq!(slice["ports"][0]["port"].as_u64(), Some(4143));
        assert_eq!(
            slice["endpoints"][0]["addresses"][0].as_str(),
            Some("127.0.0.1")
        );
        // Without one, the same objects parse and carry no annotation.
        let plain = yaml_docs(&render_pylon_mesh(
            "127.0.0.1:4143".parse().expect("addr"),
            None,
        ));
        assert!(plain[1]["metadata"].get("annotations").is_none());
        assert_eq!(plain[1]["ports"], slice["ports"]);
    }

    #[test]
    fn issues_identities_for_both_workloads_from_one_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = issue_identities(dir.path()).expect("identities");
        assert_eq!(
            ids.server,
            "bench.default.serviceaccount.identity.pylon.cluster.local"
        );
        assert_eq!(
            ids.client,
            "bench-client.default.serviceaccount.identity.pylon.cluster.local"
        );
        for d in [&ids.server_dir, &ids.client_dir] {
            for f in ["ca.crt", "tls.crt", "tls.key"] {
                assert!(d.join(f).is_file(), "{} missing in {}", f, d.display());
            }
        }
        let ca = |d: &Path| std::fs::read_to_string(d.join("ca.crt")).expect("ca.crt");
        assert_eq!(ca(&ids.server_dir), ca(&ids.client_dir));
    }

    #[test]
    fn counts_mtls_responses_with_the_peer_identity() {
        let id = "bench.default.serviceaccount.identity.pylon.cluster.local";
        let metrics = format!(
            "# HELP response Total count of HTTP responses.\n\
             # TYPE response counter\n\
             response_total{{direction=\"outbound\",authority=\"bench.default.svc.cluster.local:80\",tls=\"true\",server_id=\"{id}\",classification=\"success\",status_code=\"200\"}} 120\n\
             response_total{{direction=\"outbound\",authority=\"bench.default.svc.cluster.local:80\",tls=\"true\",server_id=\"{id}\",classification=\"failure\",status_code=\"502\"}} 3\n\
             response_total{{direction=\"outbound\",tls=\"true\",server_id=\"other.default.serviceaccount.identity.pylon.cluster.local\",classification=\"success\",status_code=\"200\"}} 7\n\
             response_total{{direction=\"outbound\",tls=\"no_identity\",no_tls_reason=\"not_provided_by_service_discovery\",classification=\"success\",status_code=\"200\"}} 50\n\
             response_total{{direction=\"inbound\",tls=\"true\",client_id=\"x\",server_id=\"{id}\",classification=\"success\",status_code=\"200\"}} 9\n\
             # EOF\n"
        );
        let count = |peer| mtls_responses(&metrics, peer).expect("parses");
        assert_eq!(count(MtlsPeer::Server(id)), 123);
        assert_eq!(count(MtlsPeer::Server("nobody")), 0);
        assert_eq!(count(MtlsPeer::Client("x")), 9);
        assert_eq!(count(MtlsPeer::Client(id)), 0);
        assert_eq!(mtls_responses("", MtlsPeer::Server(id)).expect("parses"), 0);
    }

    #[test]
    fn detects_nginx_stream_support() {
        let missing = Path::new("/nonexistent/ngx_stream_module.so");
        assert_eq!(
            nginx_stream_support("--with-stream --with-http_v2_module", missing),
            NginxStream::Static
        );
        assert_eq!(
            nginx_stream_support("--with-stream=dynamic", missing),
            NginxStream::Missing
        );
        assert_eq!(
            nginx_stream_support("--with-http_v2_module", missing),
            NginxStream::Missing
        );
        let here = std::env::current_exe().expect("exe");
        assert_eq!(
            nginx_stream_support("--with-stream=dynamic", &here),
            NginxStream::Module(here.clone())
        );
    }
}
