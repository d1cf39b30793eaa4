//! `pylon-proxy`: the Pylon sidecar.
//!
//! This crate owns the data plane: listeners, protocol detection, the inbound and outbound request
//! paths, discovery of endpoints, load balancing, the endpoint clients, mesh TLS on the wire,
//! inbound authorization, the admin server and the iptables set-up (`pylon-proxy init`). It reads
//! the mesh through `pylon-proxy-policy`'s Store (and its authorization model), its identity
//! through `pylon-identity`, and records through `pylon-proxy-metrics`' handles; it must not parse
//! mesh YAML or certificates, or encode metrics, itself.
//!
//! Reading order for a newcomer: `app.rs` (start-up and shutdown), `listener.rs` (accept and
//! detect), then `outbound.rs` and `inbound.rs`, each of which reads top to bottom as the path a
//! request takes in that direction; `connect.rs` and `mesh_tls.rs` for how a hop is secured,
//! `authz.rs` for who may call.

mod access_log;
mod accrual;
mod admin;
mod app;
mod args;
mod authz;
pub mod balance;
mod connect;
mod control;
pub mod detect;
mod discovery;
mod http;
mod identity_client;
mod inbound;
pub mod init;
mod io;
mod listener;
mod logging;
mod loops;
mod mesh_tls;
mod names;
mod orig_dst;
mod outbound;
mod profiles;
mod retry_budget;
mod shutdown;
mod split;
mod tcp;
mod timer;
mod warnings;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

pub use args::{Cli, Command, ProxyArgs};

/// Entry point shared by the `pylon-proxy` binary and `pylon proxy` (the CLI runs the proxy in
/// its own child processes for `pylon demo`). `args[0]` is the program name.
pub fn main_with_args(args: Vec<OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout and errors to stderr with the right exit code.
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    match cli.command {
        Some(Command::Init(init_args)) => match init::run(&init_args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pylon-proxy init: {e}");
                ExitCode::FAILURE
            }
        },
        None => app::main(cli.proxy),
    }
}
