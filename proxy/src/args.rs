//! Command-line flags. Every flag has a `PYLON_*` environment twin; flags win.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Linkerd's default opaque ports: protocols where the server speaks first, so detection would
/// only add the detect timeout to every connection.
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

#[derive(Debug, Parser)]
#[command(
    name = "pylon-proxy",
    version,
    about = "Pylon's transparent sidecar proxy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install (or remove) the iptables rules that redirect a pod's TCP through the proxy.
    Init(crate::init::InitArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// Listener for traffic to this workload.
    #[arg(long, env = "PYLON_INBOUND_ADDR", default_value = "0.0.0.0:4143")]
    pub inbound_addr: SocketAddr,

    /// Listener for traffic from this workload.
    #[arg(long, env = "PYLON_OUTBOUND_ADDR", default_value = "127.0.0.1:4140")]
    pub outbound_addr: SocketAddr,

    /// Admin server: /metrics, /ready, /live, /proxy-log-level, /shutdown.
    #[arg(long, env = "PYLON_ADMIN_ADDR", default_value = "0.0.0.0:4191")]
    pub admin_addr: SocketAddr,

    /// Tap gRPC server (Linkerd's `io.linkerd.proxy.tap.Tap` API).
    #[arg(long, env = "PYLON_TAP_ADDR", default_value = "0.0.0.0:4190")]
    pub tap_addr: SocketAddr,

    /// Networks whose clients may tap (CIDRs or addresses, comma-separated); loopback only
    /// when unset.
    #[arg(long, env = "PYLON_TAP_ALLOW", value_delimiter = ',')]
    pub tap_allow: Vec<String>,

    /// Directory of mesh objects (Kubernetes YAML), watched and reloaded live.
    #[arg(long, env = "PYLON_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,

    /// This workload, e.g. `deployment/web`.
    #[arg(long, env = "PYLON_WORKLOAD")]
    pub workload: Option<String>,

    /// This workload's namespace; short service names resolve in it.
    #[arg(long, env = "PYLON_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// This workload's pod name.
    #[arg(long, env = "PYLON_POD")]
    pub pod: Option<String>,

    /// The cluster's DNS domain, as in `web.default.svc.<domain>`.
    #[arg(long, env = "PYLON_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Where inbound traffic goes when it was not redirected by iptables (HOST:PORT).
    #[arg(long, env = "PYLON_INBOUND_FORWARD")]
    pub inbound_forward: Option<String>,

    /// Ports whose traffic is proxied as opaque TCP without detection (added to Linkerd's
    /// server-speaks-first defaults).
    #[arg(long, env = "PYLON_OPAQUE_PORTS", value_delimiter = ',')]
    pub opaque_ports: Vec<u16>,

    /// How long to wait for a client's first bytes before treating the connection as TCP.
    #[arg(long, env = "PYLON_DETECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub detect_timeout: Duration,

    /// Time allowed to connect to an endpoint (then 504 `connect timeout`).
    #[arg(long, env = "PYLON_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Time allowed for an endpoint's response headers (none by default).
    #[arg(long, env = "PYLON_RESPONSE_TIMEOUT", value_parser = parse_duration)]
    pub response_timeout: Option<Duration>,

    /// How long shutdown waits for in-flight requests.
    #[arg(long, env = "PYLON_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Failure accrual for destinations whose Service doesn't say (Linkerd's
    /// `balancer.linkerd.io/failure-accrual` annotation): `consecutive` ejects an endpoint after
    /// 7 failures in a row (never more than half of a destination's endpoints); `disabled`, the
    /// default as in Linkerd, never ejects.
    #[arg(long, env = "PYLON_FAILURE_ACCRUAL", default_value = "disabled", value_parser = ["consecutive", "disabled"])]
    pub failure_accrual: String,

    /// This workload's identity: `ca.crt` (trust anchor), `tls.crt` (chain) and `tls.key`, as
    /// `pylon identity issue` writes them; watched and rotated live. Without it the proxy
    /// neither originates nor terminates mesh TLS.
    #[arg(long, env = "PYLON_IDENTITY_DIR", conflicts_with = "identity_addr")]
    pub identity_dir: Option<PathBuf>,

    /// The identity service (Linkerd's `Identity/Certify` API), HOST:PORT: this workload's
    /// key is made in the process and its certificate requested there, renewed at 70% of its
    /// lifetime; `/ready` waits for the first one. Linkerd's
    /// `LINKERD2_PROXY_IDENTITY_SVC_ADDR` is read when neither this nor `--identity-dir` is set.
    #[arg(long, env = "PYLON_IDENTITY_ADDR")]
    pub identity_addr: Option<String>,

    /// With `--identity-addr`: the identity to ask for,
    /// `SA.NS.serviceaccount.identity.pylon.DOMAIN` (or Linkerd's `...identity.linkerd.DOMAIN`);
    /// else `LINKERD2_PROXY_IDENTITY_LOCAL_NAME`.
    #[arg(long, env = "PYLON_IDENTITY_NAME")]
    pub identity_name: Option<String>,

    /// With `--identity-addr`: the ServiceAccount token proving the identity, re-read for every
    /// request; else `LINKERD2_PROXY_IDENTITY_TOKEN_FILE`, else
    /// /var/run/secrets/tokens/linkerd-identity-token if present, else the pod's ServiceAccount
    /// token.
    #[arg(long, env = "PYLON_IDENTITY_TOKEN_FILE")]
    pub identity_token_file: Option<PathBuf>,

    /// With `--identity-addr`: the trust anchors, a PEM file (or PEM text); else
    /// `LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS` (PEM text).
    #[arg(long, env = "PYLON_IDENTITY_TRUST_ANCHORS", allow_hyphen_values = true)]
    pub identity_trust_anchors: Option<String>,

    /// With `--identity-addr`: the identity service's own identity; when set (or
    /// `LINKERD2_PROXY_IDENTITY_SVC_NAME`) the proxy talks TLS to it and checks it proves this
    /// name, otherwise plaintext gRPC.
    #[arg(long, env = "PYLON_IDENTITY_SVC_NAME")]
    pub identity_svc_name: Option<String>,

    /// Who may connect to a port no `Server` describes: `all-unauthenticated`,
    /// `all-authenticated`, `cluster-authenticated`, `cluster-unauthenticated`, `deny` or
    /// `audit` (Linkerd's default inbound policies).
    #[arg(long, env = "PYLON_DEFAULT_POLICY", default_value = "all-unauthenticated", value_parser = parse_default_policy)]
    pub default_policy: pylon_proxy_policy::DefaultPolicy,

    /// This pod's labels (`k=v`, comma-separated), matched by `Server` pod selectors.
    #[arg(long, env = "PYLON_WORKLOAD_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub workload_labels: Vec<(String, String)>,

    /// The cluster's pod and node networks (CIDRs, comma-separated), for the `cluster-*`
    /// policies; Linkerd's defaults plus loopback when unset.
    #[arg(long, env = "PYLON_CLUSTER_NETWORKS", value_delimiter = ',')]
    pub cluster_networks: Vec<pylon_proxy_policy::IpNet>,

    /// The control plane's destination API (`host:port`; Linkerd's
    /// `LINKERD2_PROXY_DESTINATION_SVC_ADDR` is read too): endpoints, routes and splits come
    /// from it, subscribed per destination, instead of `--config-dir`.
    #[arg(long, env = "PYLON_DESTINATION_ADDR")]
    pub destination_addr: Option<String>,

    /// The control plane's inbound policy API (`host:port`; or Linkerd's
    /// `LINKERD2_PROXY_POLICY_SVC_ADDR`): each inbound port's policy is subscribed there.
    #[arg(long, env = "PYLON_POLICY_ADDR")]
    pub policy_addr: Option<String>,

    /// Sent with destination lookups (Linkerd's `LINKERD2_PROXY_DESTINATION_CONTEXT`);
    /// default `{"ns":NAMESPACE,"pod":POD}`.
    #[arg(long, env = "PYLON_DESTINATION_CONTEXT")]
    pub destination_context: Option<String>,

    /// The workload's ports whose policy `/ready` waits for (Linkerd's
    /// `LINKERD2_PROXY_INBOUND_PORTS`); other ports are subscribed on first use.
    #[arg(long, env = "PYLON_INBOUND_PORTS", value_delimiter = ',')]
    pub inbound_ports: Vec<u16>,

    /// Worker threads (default: the number of CPUs); 1 runs everything on one thread.
    #[arg(long, env = "PYLON_THREADS")]
    pub threads: Option<usize>,
}

impl ProxyArgs {
    pub fn failure_accrual(&self) -> crate::accrual::AccrualPolicy {
        match self.failure_accrual.as_str() {
            "disabled" => crate::accrual::AccrualPolicy::DISABLED,
            _ => crate::accrual::AccrualPolicy::CONSECUTIVE,
        }
    }

    pub fn is_opaque_port(&self, port: u16) -> bool {
        DEFAULT_OPAQUE_PORTS.contains(&port) || self.opaque_ports.contains(&port)
    }

    /// Fills what Pylon's own flags and variables left unset from Linkerd's variables, so a
    /// pod injected for Linkerd runs Pylon unchanged.
    pub fn apply_linkerd_env(&mut self) {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if self.destination_addr.is_none() {
            self.destination_addr = env("LINKERD2_PROXY_DESTINATION_SVC_ADDR");
        }
        if self.policy_addr.is_none() {
            self.policy_addr = env("LINKERD2_PROXY_POLICY_SVC_ADDR");
        }
        if self.destination_context.is_none() {
            self.destination_context = env("LINKERD2_PROXY_DESTINATION_CONTEXT");
        }
        if self.inbound_ports.is_empty() {
            self.inbound_ports = env("LINKERD2_PROXY_INBOUND_PORTS")
                .map(|ports| {
                    ports
                        .split(',')
                        .filter_map(|p| p.trim().parse().ok())
                        .collect()
                })
                .unwrap_or_default();
        }
    }

    /// The context token destination lookups carry: the client's namespace and pod.
    pub fn destination_context(&self) -> String {
        self.destination_context.clone().unwrap_or_else(|| {
            serde_json::json!({"ns": self.namespace, "pod": self.pod.clone().unwrap_or_default()})
                .to_string()
        })
    }

    /// This pod as the policy API names it (Linkerd's `LINKERD2_PROXY_POLICY_WORKLOAD`).
    pub fn policy_workload(&self) -> String {
        std::env::var("LINKERD2_PROXY_POLICY_WORKLOAD")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| {
                serde_json::json!({"ns": self.namespace, "pod": self.pod.clone().unwrap_or_default()})
                    .to_string()
            })
    }
}

fn parse_default_policy(s: &str) -> Result<pylon_proxy_policy::DefaultPolicy, String> {
    s.parse()
        .map_err(|e: pylon_proxy_policy::UnknownDefaultPolicy| e.to_string())
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, not {s:?}")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    pylon_proxy_policy::duration::parse(s).map_err(|e| e.to_string())
}
