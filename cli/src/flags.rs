//! The flags `stat`, `routes`, `edges`, `tap`, `top` and `profile --tap` share, defined once
//! (and flattened into each command) so they are spelled and documented the same everywhere:
//!
//! | flags | stat, routes, edges | tap, top | profile --tap |
//! |---|---|---|---|
//! | `-n/--namespace`, `-A/--all-namespaces` | [`Scope`] | [`Scope`] | `-n` ([`Namespace`]) |
//! | `--to`, `--from` | [`Peers`] | [`Peers`] | |
//! | `-o/--output table\|wide\|json` | [`OutputFlag`] | [`OutputFlag`] | |
//! | `--proxy`, `--config-dir` | [`MetricsSource`] (+ `--prometheus`) | [`TapSource`] (+ `--tap-addr`) | [`TapSource`] |
//! | `--max-rps` | | [`Sampling`] | [`Sampling`] |
//!
//! `-w/--window` applies to the three that sum a window (`stat`, `routes`, `edges`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::stat::resource::Resource;

/// Which proxies to talk to.
#[derive(Args, Debug, Clone, Default)]
pub struct ProxyFlags {
    /// A proxy's admin address (its --admin-addr, e.g. 127.0.0.1:4191); repeat for every proxy.
    #[arg(long = "proxy", value_name = "ADMIN_ADDR")]
    pub proxies: Vec<SocketAddr>,

    /// The mesh's config dir: the proxies of its meshed Pods (a container port named
    /// pylon-admin or linkerd-admin, at status.podIP), and the workloads they belong to.
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
}

/// Where `stat`, `routes` and `edges` read their numbers.
#[derive(Args, Debug, Clone)]
pub struct MetricsSource {
    #[command(flatten)]
    pub proxies: ProxyFlags,

    /// Read from Prometheus instead (http://host:port), which scrapes the proxies.
    #[arg(long, value_name = "URL", conflicts_with_all = ["proxies", "config_dir"])]
    pub prometheus: Option<String>,
}

/// Where `tap`, `top` and `profile --tap` find the proxies' tap ports.
#[derive(Args, Debug, Clone, Default)]
pub struct TapSource {
    #[command(flatten)]
    pub proxies: ProxyFlags,

    /// A proxy's tap port to use directly (repeatable), for a proxy whose admin server is out
    /// of reach.
    #[arg(long = "tap-addr", value_name = "TAP_ADDR")]
    pub taps: Vec<SocketAddr>,
}

/// `-n` alone, for commands about one namespace's resource (`profile --tap`).
#[derive(Args, Debug, Clone)]
pub struct Namespace {
    /// Namespace of the resources named (RESOURCE, --to, --from).
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
}

/// `-n` and `-A`.
#[derive(Args, Debug, Clone)]
pub struct Scope {
    #[command(flatten)]
    pub ns: Namespace,

    /// Every namespace (instead of -n).
    #[arg(long, short = 'A')]
    pub all_namespaces: bool,
}

impl Scope {
    /// The namespace names are read in; `None` for every namespace.
    pub fn namespace(&self) -> Option<&str> {
        (!self.all_namespaces).then_some(self.ns.namespace.as_str())
    }
}

/// `--to` and `--from`.
#[derive(Args, Debug, Clone, Default)]
pub struct Peers {
    /// Only traffic RESOURCE sends to this destination: deployment/NAME, pod/NAME, ns/NAME,
    /// svc/NAME or authority/HOST (as the senders' outbound proxies name it).
    #[arg(long, value_name = "RESOURCE", conflicts_with = "from")]
    pub to: Option<String>,

    /// Only traffic RESOURCE receives from this workload: deployment/NAME, pod/NAME or
    /// ns/NAME (as the workload's outbound proxies saw it).
    #[arg(long, value_name = "RESOURCE")]
    pub from: Option<String>,
}

impl Peers {
    /// `--to` and `--from`, parsed and checked by the rules every command shares.
    pub fn parse(&self) -> Result<(Option<Resource>, Option<Resource>), String> {
        let to = self.to.as_deref().map(Resource::parse_to).transpose()?;
        let from = self.from.as_deref().map(Resource::parse_from).transpose()?;
        Ok((to, from))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table (tap: Linkerd's tap lines).
    #[default]
    #[value(alias = "text")]
    Table,
    /// More columns: RETRY% (stat, routes; edges always show it), the destination's workload
    /// and pod (tap, top).
    Wide,
    /// JSON for machines (tap: one object per line).
    Json,
}

/// `-o`.
#[derive(Args, Debug, Clone, Default)]
pub struct OutputFlag {
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `--max-rps`.
#[derive(Args, Debug, Clone)]
pub struct Sampling {
    /// Requests sampled per second by each proxy.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rps: u32,
}
