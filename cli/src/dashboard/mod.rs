//! `pylon dashboard`: the mesh in a browser, served by the CLI itself.
//!
//! - [`server`]: the HTTP server, the page shell and its assets, compiled into the binary;
//! - [`api`]: the JSON the pages read, from the same selections as `stat`, `routes` and
//!   `edges`;
//! - [`live`]: the tap page's server-sent events, from `tap`'s streams and `top`'s table;
//! - [`layout`]: where the topology page draws each workload and edge.
//!
//! The front end (`assets/`) is plain JavaScript modules with no build step: nothing to
//! install for `cargo build`, and what is committed is exactly what runs. It binds to
//! loopback unless told otherwise: a dashboard shows every request's path and status, so
//! serving it to a network is a decision (`--allow-remote`), not a default.

mod api;
mod layout;
mod live;
mod server;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::net::TcpListener;

use crate::flags::MetricsSource;
use crate::stat::data::Source;
use server::Dashboard;

/// The address `pylon dashboard` and `pylon demo` serve on unless told otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:50750";

#[derive(Args, Debug)]
pub struct DashboardArgs {
    #[command(flatten)]
    source: MetricsSource,

    /// Where to serve the dashboard (port 0: any free port).
    #[arg(long, default_value = DEFAULT_ADDR)]
    addr: SocketAddr,

    /// Serve on an address other than loopback, and answer requests for any host name.
    #[arg(long)]
    allow_remote: bool,
}

/// Why `addr` may not be served on: anything but loopback needs `--allow-remote`.
fn check_addr(addr: SocketAddr, allow_remote: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || allow_remote {
        return Ok(());
    }
    Err(format!(
        "--addr {addr} is not a loopback address: the dashboard shows every request's path and status to whoever reaches it; add --allow-remote to serve it there"
    ))
}

pub fn run(args: DashboardArgs) -> ExitCode {
    let fail = |code: u8, e: &dyn std::fmt::Display| {
        eprintln!("pylon dashboard: error: {e}");
        ExitCode::from(code)
    };
    if let Err(e) = check_addr(args.addr, args.allow_remote) {
        return fail(2, &e);
    }
    let source = match Source::from_flags(&args.source) {
        Ok(source) => source,
        Err(e) => return fail(2, &e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, &format!("starting the runtime: {e}")),
    };
    let served = runtime.block_on(async {
        let listener = TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        let addr = listener.local_addr()?;
        println!("dashboard: http://{addr}/ (reading {})", source.describe());
        println!("press Ctrl-C to stop");
        serve(listener, source, args.allow_remote, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &format!("{e:#}")),
    }
}

/// Serves the dashboard on `listener` until `stop` ends (open tap streams are cut then).
pub async fn serve(
    listener: TcpListener,
    source: Source,
    allow_remote: bool,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = server::router(Arc::new(Dashboard::new(source, allow_remote)));
    let (stopping, mut stopped) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        stop.await;
        let _ = stopping.send(true);
    });
    // Event streams never end on their own: graceful shutdown gets two seconds.
    tokio::select! {
        served = server => served.context("serving the dashboard"),
        _ = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        } => Ok(()),
    }
}

/// The demo's dashboard: on `preferred`, or any free loopback port when that is taken (two
/// demos at once); returns where it listens.
pub async fn serve_on_loopback(
    source: Source,
    preferred: SocketAddr,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr> {
    if !preferred.ip().is_loopback() {
        bail!("the demo's dashboard serves on loopback only, not {preferred}");
    }
    let listener = match TcpListener::bind(preferred).await {
        Ok(l) => l,
        Err(_) => TcpListener::bind(SocketAddr::new(preferred.ip(), 0))
            .await
            .context("listening for the dashboard")?,
    };
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, source, false, stop).await {
            eprintln!("pylon demo: the dashboard stopped: {e:#}");
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_without_allow_remote() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert!(check_addr(addr("127.0.0.1:50750"), false).is_ok());
        assert!(check_addr(addr("[::1]:0"), false).is_ok());
        let err = check_addr(addr("0.0.0.0:50750"), false).expect_err("refused");
        assert!(err.contains("--allow-remote"), "{err}");
        assert!(check_addr(addr("0.0.0.0:50750"), true).is_ok());
    }
}
