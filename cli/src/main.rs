//! `pylon`, the Pylon operator CLI.
//!
//! - `pylon demo` starts a small mesh on loopback (three endpoints behind their own inbound
//!   proxies, a client's outbound proxy, a load generator) and prints what the proxies see:
//!   request rate, success rate and latency per endpoint, read from their `/metrics`.
//! - `pylon check [DIR]` audits a config dir with the proxy's own parser and validator, plus
//!   the cross-object checks no single object's validation can make (split weights, missing
//!   backends, shadowed routes, risky retries), and exits 1 when it finds errors.
//! - `pylon stat RESOURCE`, `pylon routes RESOURCE`, `pylon edges KIND` show the mesh's
//!   success rate, requests/s and latency per resource, route and edge, from the proxies'
//!   rolling windows on their admin ports (answered at once, up to 15 minutes) or from
//!   Prometheus.
//! - `pylon dashboard` serves the same numbers, the topology, a live tap and `check`'s
//!   findings as web pages on loopback.
//! - `pylon tap RESOURCE` prints live requests from the proxies' tap ports (Linkerd's tap API),
//!   one line per request, response and end; `pylon top RESOURCE` the busiest paths among
//!   them; `pylon profile --tap RESOURCE` turns a few seconds of them into a ServiceProfile.
//!   The five share one set of flags (`crate::flags`): `-n`, `-A`, `--to`, `--from`, `-o`,
//!   `--proxy`, `--config-dir`.
//! - `pylon completion bash|zsh|fish` prints a shell completion script.
//! - `pylon identity init-ca` and `pylon identity issue` make a mesh CA and workload
//!   certificates (the proxy's `ca.crt`, `tls.crt`, `tls.key` identity dir).
//! - `pylon install [--crds] [--ha]` prints the control plane (with a fresh trust anchor,
//!   issuer and webhook certificate) or the CRDs, for `kubectl apply -f -`.
//! - `pylon inject` / `pylon uninject` add the proxy to Kubernetes YAML (or take it out), with
//!   the transform the controller's webhook runs.
//! - `pylon proxy ...` (hidden) runs the sidecar proxy itself with the given flags, so the demo
//!   can start proxies from this same binary without anything else installed.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod check;
mod completion;
mod dashboard;
mod demo;
mod flags;
mod identity;
mod inject;
mod install;
mod proxies;
mod stat;
mod tap;

#[derive(Parser, Debug)]
#[command(name = "pylon", version, about = "The Pylon service mesh operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a small mesh on loopback and watch what its proxies see.
    Demo(demo::DemoArgs),

    /// Audit a config dir: every problem with its file, object and field.
    Check(check::CheckArgs),

    /// Golden metrics per resource: success rate, requests/s, latency, TCP connections.
    Stat(stat::StatArgs),

    /// Golden metrics per ServiceProfile route (`[DEFAULT]` for unmatched requests).
    Routes(stat::RoutesArgs),

    /// Who calls whom: source workloads to destination services, failing and retry-heavy
    /// edges flagged.
    Edges(stat::EdgesArgs),

    /// The mesh in a browser: workloads, topology, routes, live tap and check, served on
    /// loopback.
    Dashboard(dashboard::DashboardArgs),

    /// Live requests, responses and their ends, from the proxies' tap ports.
    Tap(tap::TapArgs),

    /// Write a ServiceProfile for the routes observed by tapping live traffic.
    Profile(tap::ProfileArgs),

    /// The busiest paths of the live traffic (from tap): counts, latency and success; `q` quits.
    Top(tap::TopArgs),

    /// Mesh identity: create a CA, issue workload certificates.
    Identity(identity::IdentityArgs),

    /// Print the control plane for `kubectl apply -f -` (`--crds` first), with fresh keys.
    Install(install::InstallArgs),

    /// Add the Pylon proxy to the pods of Kubernetes YAML (files, dirs or `-`), printed to stdout.
    Inject(inject::InjectArgs),

    /// Take the Pylon proxy out of Kubernetes YAML again.
    Uninject(inject::UninjectArgs),

    /// Print a shell completion script (bash, zsh or fish).
    Completion(completion::CompletionArgs),

    /// Run the sidecar proxy (`pylon-proxy`) with the given flags.
    #[command(hide = true, disable_help_flag = true)]
    Proxy {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Proxy { args } => {
            let mut argv = Vec::with_capacity(args.len() + 1);
            argv.push(OsString::from("pylon-proxy"));
            argv.extend(args);
            pylon_proxy::main_with_args(argv)
        }
        Command::Check(args) => check::run(args),
        Command::Stat(args) => stat::run_stat(args),
        Command::Routes(args) => stat::run_routes(args),
        Command::Edges(args) => stat::run_edges(args),
        Command::Dashboard(args) => dashboard::run(args),
        Command::Tap(args) => tap::run_tap(args),
        Command::Profile(args) => tap::run_profile(args),
        Command::Top(args) => tap::run_top(args),
        Command::Identity(args) => identity::run(args),
        Command::Install(args) => install::run(args),
        Command::Inject(args) => inject::run_inject(args),
        Command::Uninject(args) => inject::run_uninject(args),
        Command::Completion(args) => completion::run(args, Cli::command()),
        Command::Demo(args) => match demo::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pylon demo: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
