//! `pylon demo`: a small mesh on loopback, and what its proxies see.
//!
//! The demo starts three `ml-inference` endpoints (in-process HTTP apps, each behind its own
//! inbound proxy process), writes the Service and EndpointSlices that describe them to a
//! temporary config dir, starts a client workload's outbound proxy on that dir, and sends load
//! through it. Every second it scrapes the proxies' `/metrics` and prints per-endpoint request
//! rate, success rate and latency, and serves `pylon dashboard` on the mesh (its URL printed at
//! start). It stops after `--duration` or on Ctrl-C, stops every proxy, and removes the config
//! dir.

pub(crate) mod admin_client;
mod app_server;
mod load_generator;
mod mesh;
pub(crate) mod mesh_config;
pub(crate) mod metrics;
mod proxy_process;
mod traffic_view;

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tokio::sync::watch;
use tokio::time::{interval_at, sleep, Instant, MissedTickBehavior};

use load_generator::{LoadGenerator, LoadPlan};
use mesh::Mesh;
use metrics::ProxyTraffic;
use traffic_view::{EndpointInfo, MeshInfo, MeshScrape, OutputFormat, Printer};

/// A `--duration 0` run is still bounded: it stops after this long.
const LONGEST_RUN: Duration = Duration::from_secs(24 * 60 * 60);
/// How long the demo waits for the outbound proxy to route its first request.
const WARM_UP: Duration = Duration::from_secs(5);
const REFRESH: Duration = Duration::from_secs(1);

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How long to run, e.g. `30s`, `2m`, `500ms` (a bare number is seconds); `0` runs until
    /// Ctrl-C.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,

    /// Requests per second the load generator sends.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    rps: u32,

    /// Where the dashboard serves the demo's mesh (a loopback address; when it is taken, any
    /// free port, printed at start).
    #[arg(long, default_value = crate::dashboard::DEFAULT_ADDR)]
    dashboard_addr: std::net::SocketAddr,

    /// Output format: a table per second, or one JSON object per line.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

/// A Go duration (`30s`, `500ms`, `2m`, `1m30s`), or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("`{s}` is too long"));
    }
    pylon_proxy_policy::duration::parse(s).map_err(|e| e.to_string())
}

/// Runs the demo to completion; `Ok` once everything it started is gone.
pub fn run(args: DemoArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_demo(args))
}

async fn run_demo(args: DemoArgs) -> Result<()> {
    let mut printer = Printer::new(args.output);
    // Listen for Ctrl-C / SIGTERM before starting anything, so an early interrupt still cleans
    // up rather than killing the demo outright.
    let interrupted = watch_for_interrupt()?;
    let run_for = match args.duration {
        Duration::ZERO => None,
        d => Some(d),
    };

    printer.progress("starting the mesh on 127.0.0.1");
    let mut stop = interrupted.clone();
    let progress = |m: &str| printer.progress(m);
    let mut mesh = tokio::select! {
        started = Mesh::start(&progress) => started?,
        _ = stop.wait_for(|&interrupted| interrupted) => {
            // Dropping the half-started mesh killed its proxies and removed its config dir.
            eprintln!("pylon demo: interrupted while starting; stopped");
            return Ok(());
        }
    };

    let source = crate::stat::data::Source::Proxies {
        named: Vec::new(),
        config_dir: Some(mesh.config_dir().to_path_buf()),
    };
    let (stop_dashboard, dashboard_stopped) = tokio::sync::oneshot::channel::<()>();
    let dashboard = match crate::dashboard::serve_on_loopback(source, args.dashboard_addr, async {
        let _ = dashboard_stopped.await;
    })
    .await
    {
        Ok(addr) => addr,
        Err(e) => {
            let _ = mesh.shutdown().await;
            return Err(e);
        }
    };
    let watched = watch_traffic(
        &mut mesh,
        &args,
        run_for,
        dashboard,
        interrupted,
        &mut printer,
    )
    .await;
    let _ = stop_dashboard.send(());
    let problems = mesh.shutdown().await;
    for problem in &problems {
        printer.warn(problem);
    }
    watched?;
    if !problems.is_empty() {
        bail!("the mesh did not stop cleanly (see the warnings above)");
    }
    Ok(())
}

/// A flag that turns true on Ctrl-C or SIGTERM.
fn watch_for_interrupt() -> Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for Ctrl-C")?;
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

fn mesh_info(
    mesh: &Mesh,
    args: &DemoArgs,
    run_for: Option<Duration>,
    dashboard: std::net::SocketAddr,
) -> MeshInfo {
    MeshInfo {
        authority: format!("{}:{}", mesh::AUTHORITY, mesh::SERVICE_PORT),
        host: mesh::AUTHORITY.to_owned(),
        config_dir: mesh.config_dir().display().to_string(),
        identities: mesh.identities.clone(),
        outbound_listener: mesh.client_proxy.addrs().outbound,
        outbound_admin: mesh.client_proxy.addrs().admin,
        endpoints: mesh
            .endpoints
            .iter()
            .map(|e| EndpointInfo {
                pod: e.pod.to_owned(),
                behaviour: e.behaviour.label(),
                target_addr: e.target_addr(),
                admin: e.proxy.addrs().admin,
            })
            .collect(),
        rps: args.rps,
        duration: run_for,
        dashboard,
    }
}

/// Sends load and prints what the proxies count, until the run ends or is interrupted.
async fn watch_traffic(
    mesh: &mut Mesh,
    args: &DemoArgs,
    run_for: Option<Duration>,
    dashboard: std::net::SocketAddr,
    mut interrupted: watch::Receiver<bool>,
    printer: &mut Printer,
) -> Result<()> {
    let info = mesh_info(mesh, args, run_for, dashboard);
    let plan = LoadPlan {
        proxy: info.outbound_listener,
        authority: mesh::AUTHORITY.to_owned(),
        path: "/predict".to_owned(),
        requests_per_second: args.rps,
        max_requests: u64::from(args.rps)
            .saturating_mul(run_for.unwrap_or(LONGEST_RUN).as_secs().max(1)),
    };
    tokio::select! {
        _ = warm_up(&plan, printer) => {}
        _ = interrupted.wait_for(|&i| i) => return Ok(()),
    }
    printer.mesh(&info);

    let baseline = scrape_mesh(mesh).await?;
    let started = baseline.at;
    let deadline = started + run_for.unwrap_or(LONGEST_RUN);
    let load = LoadGenerator::start(plan);
    let mut previous = baseline.clone();
    let mut ticker = interval_at(started + REFRESH, REFRESH);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failure = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = interrupted.wait_for(|&i| i) => break,
        }
        if let Some(exited) = mesh.exited_proxy() {
            failure = Some(anyhow!(exited));
            break;
        }
        match scrape_mesh(mesh).await {
            Ok(now) => {
                let (rows, total) = traffic_view::endpoint_stats(&info, &previous, &now);
                printer.interval(now.at.duration_since(started), &rows, &total);
                previous = now;
            }
            Err(e) => printer.warn(&format!("{e:#}")),
        }
        if Instant::now() + Duration::from_millis(100) >= deadline {
            break;
        }
    }
    let report = load.stop().await;
    if let Some(failure) = failure {
        return Err(failure);
    }
    let last = scrape_mesh(mesh).await?;
    let (rows, total) = traffic_view::endpoint_stats(&info, &baseline, &last);
    printer.summary(last.at.duration_since(started), &rows, &total, &report);
    Ok(())
}

/// Waits (bounded) until the outbound proxy routes a request to the service, so the first
/// table doesn't show discovery catching up. Not fatal: the table will show what happens.
async fn warm_up(plan: &LoadPlan, printer: &Printer) {
    let deadline = Instant::now() + WARM_UP;
    let mut last = String::new();
    while Instant::now() < deadline {
        match load_generator::probe(plan).await {
            Ok(status) if status.is_success() => return,
            Ok(status) => last = format!("answered {status}"),
            Err(e) => last = format!("{e:#}"),
        }
        sleep(Duration::from_millis(100)).await;
    }
    printer.warn(&format!(
        "the outbound proxy did not route to {} within {WARM_UP:?} (last: {last}); starting anyway",
        plan.authority
    ));
}

/// Scrapes every proxy's `/metrics`. The outbound proxy is required; an unreachable inbound
/// proxy only blanks its column.
async fn scrape_mesh(mesh: &Mesh) -> Result<MeshScrape> {
    let outbound_admin = mesh.client_proxy.addrs().admin;
    let at = Instant::now();
    let text = admin_client::metrics(outbound_admin)
        .await
        .context("scraping the outbound proxy")?;
    let outbound = ProxyTraffic::parse(&text)
        .with_context(|| format!("reading http://{outbound_admin}/metrics"))?;
    let mut inbound = Vec::with_capacity(mesh.endpoints.len());
    for endpoint in &mesh.endpoints {
        let scraped = match admin_client::metrics(endpoint.proxy.addrs().admin).await {
            Ok(text) => ProxyTraffic::parse(&text).ok(),
            Err(_) => None,
        };
        inbound.push(scraped);
    }
    Ok(MeshScrape {
        at,
        outbound,
        inbound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("6s"), Ok(Duration::from_secs(6)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3d").is_err());
    }
}
