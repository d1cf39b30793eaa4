//! `pylon-bench`: Pylon against direct, nginx and HAProxy, side by side in one run, on
//! loopback. See `benches/run` (the one command) and the README's Benchmarks section.
//!
//! `pylon-bench [--quick]` starts the upstream app (`pylon-bench app`, its own process) and every
//! path ([`chain`]), checks each path with a real request of every workload, then measures
//! latency at fixed rates and maximum throughput with its own load generator ([`loadgen`]),
//! proxy CPU and memory from `/proc` ([`procstat`]), and writes the tables ([`report`]) to
//! `benches/results/`. Every process it starts is killed when it ends ([`procs`]).
//!
//! `pylon-bench train` drives an instrumented proxy through every kind of traffic, for the
//! profile-guided release build ([`train`], run by `scripts/build-release-proxy`).

mod app;
mod bench;
mod chain;
mod controller;
mod loadgen;
mod machine;
mod procs;
mod procstat;
mod profiles;
mod report;
mod rounds;
mod syscalls;
mod tap;
mod train;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "pylon-bench",
    about = "Load benches: Pylon against direct, nginx and HAProxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: bench::Options,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The upstream app (started by the bench itself): HTTP/1.1 + h2c, and a TCP echo.
    App {
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        echo: SocketAddr,
    },
    /// Sends exactly `--requests` requests of one workload and exits (failing on the first
    /// error): a fixed amount of work to profile a proxy by (`benches/profile.py`).
    Send(loadgen::SendOptions),
    /// The control plane at scale: a fake Kubernetes API, a release pylon-controller and
    /// thousands of subscribed streams (writes benches/results/controller-latest.md).
    Controller(controller::Options),
    /// The traffic a profile-guided build of pylon-proxy learns from: every workload through
    /// an instrumented proxy chain (`scripts/build-release-proxy` runs it).
    Train(train::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pylon-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Command::App { http, echo }) => runtime.block_on(app::serve(http, echo)),
        Some(Command::Controller(o)) => controller::main(o, &runtime),
        Some(Command::Train(o)) => runtime.block_on(train::main(o)),
        Some(Command::Send(o)) => runtime.block_on(loadgen::send(o)),
        None => bench::main(cli.run, &runtime),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pylon-bench: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where results go by default: `benches/results` in the source tree.
fn default_results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results")
}
