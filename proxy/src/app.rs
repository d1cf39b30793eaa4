//! Start-up and shutdown: read flags, load the Store, bind listeners, serve, drain.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;

use pylon_proxy_metrics::{Metrics, ProxyLabels};
use pylon_proxy_policy::{Store, StoreConfig};

use crate::access_log;
use crate::admin::Admin;
use crate::args::ProxyArgs;
use crate::authz::{Client, InboundAuthz};
use crate::control::ControlPlane;
use crate::discovery::{Discovery, DiscoverySettings};
use crate::http::tap::Telemetry;
use crate::inbound::Inbound;
use crate::listener::{accept_loop, bind};
use crate::logging;
use crate::mesh_tls::MeshTls;
use crate::outbound::Outbound;
use crate::profiles::Profiles;
use crate::shutdown::Shutdown;
use pylon_tap_server::{Authz, PolicyCheck, Taps};

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Bind(#[from] crate::listener::BindError),
    #[error("config dir: {0}")]
    Store(#[from] pylon_proxy_policy::StoreError),
    #[error("--inbound-forward {addr:?}: {reason}")]
    InboundForward { addr: String, reason: String },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("--tap-allow: {0}")]
    TapAllow(String),
    #[error("--identity-dir: {0}")]
    Identity(#[from] pylon_identity::IdentityError),
    #[error(transparent)]
    ControlPlane(#[from] crate::control::AddrError),
    #[error(transparent)]
    IdentityService(#[from] crate::identity_client::ConfigError),
}

pub fn main(args: ProxyArgs) -> ExitCode {
    let log_level = logging::init();
    let threads = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    // One core (the common sidecar budget) runs everything on the main thread: no work-stealing
    // and no cross-thread wake-ups, as linkerd2-proxy does.
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = builder
        .thread_name("pylon-proxy")
        .enable_all()
        .build()
        .map_err(StartError::Runtime);
    let result = match runtime {
        Ok(rt) => rt.block_on(run(args, log_level)),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "pylon-proxy failed to start");
            ExitCode::FAILURE
        }
    }
}

async fn run(mut args: ProxyArgs, log_level: logging::LogLevel) -> Result<(), StartError> {
    args.apply_linkerd_env();
    let args = Arc::new(args);
    let shutdown = Shutdown::new();

    let store_cfg = StoreConfig {
        default_namespace: args.namespace.clone(),
        cluster_domain: args.cluster_domain.clone(),
    };
    let store = match &args.config_dir {
        Some(dir) => Store::load_dir(dir, store_cfg)?,
        None => Store::empty(store_cfg),
    };
    let _watch = match &args.config_dir {
        Some(_) => Some(store.watch()?),
        None => None,
    };
    let inbound_forward = args
        .inbound_forward
        .as_deref()
        .map(resolve_forward)
        .transpose()?;

    let metrics = Metrics::new(ProxyLabels {
        namespace: Some(args.namespace.clone()),
        deployment: args
            .workload
            .as_deref()
            .map(|w| w.strip_prefix("deployment/").unwrap_or(w).to_string()),
        pod: args.pod.clone(),
    });
    metrics.set_config_errors_source(store.config_errors_counter());
    crate::warnings::init(&metrics);
    let tap_networks = if args.tap_allow.is_empty() {
        Authz::default()
    } else {
        Authz::networks(&args.tap_allow).map_err(StartError::TapAllow)?
    };
    let taps = Taps::new();
    metrics.set_tap_dropped_source(taps.dropped_counter());
    // Without an identity the proxy neither originates nor terminates mesh TLS.
    let identity_service =
        crate::identity_client::Config::from_args(&args, |name| std::env::var(name).ok())?;
    let mesh_tls = match (&args.identity_dir, identity_service) {
        (Some(dir), _) => Some(MeshTls::start(dir, metrics.clone())?),
        (None, Some(config)) => Some(MeshTls::start_certifying(config, metrics.clone())?),
        (None, None) => None,
    };
    let trust_domain = mesh_tls
        .as_ref()
        .map_or(args.cluster_domain.as_str(), |t| {
            t.local_identity().trust_domain()
        })
        .to_owned();
    // With a control plane, destinations and inbound policy are subscribed there instead.
    let control = if args.destination_addr.is_some() || args.policy_addr.is_some() {
        Some(Arc::new(ControlPlane::new(
            args.destination_addr.as_deref(),
            args.policy_addr.as_deref(),
            args.destination_context(),
            args.policy_workload(),
            metrics.clone(),
        )?))
    } else {
        None
    };
    let authz = InboundAuthz::new(
        &args,
        &store,
        &trust_domain,
        metrics.clone(),
        control.clone(),
    );

    // Bind everything before serving anything, so a bad address fails start-up cleanly.
    let (admin_listener, admin_local) = bind("admin", args.admin_addr).await?;
    let (inbound_listener, inbound_local) = bind("inbound", args.inbound_addr).await?;
    let (outbound_listener, outbound_local) = bind("outbound", args.outbound_addr).await?;
    let (tap_listener, tap_local) = bind("tap", args.tap_addr).await?;
    crate::loops::set_own_listeners(vec![admin_local, inbound_local, outbound_local, tap_local]);
    if let Some(forward) = inbound_forward.filter(|f| crate::loops::is_own_listener(*f)) {
        return Err(StartError::InboundForward {
            addr: forward.to_string(),
            reason: "that is this proxy's own listener (a loop)".into(),
        });
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(StartError::Signals)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(StartError::Signals)?;

    let access_log = access_log::enabled_from_env();
    let profiles = Profiles::new(store.clone(), metrics.clone());
    profiles.spawn_updates();
    let discovery = Discovery::new(
        store.clone(),
        metrics.clone(),
        profiles.clone(),
        DiscoverySettings {
            connect_timeout: args.connect_timeout,
            accrual: args.failure_accrual(),
            cluster_domain: &args.cluster_domain,
        },
        mesh_tls.clone(),
        control,
    );
    discovery.spawn_updates();
    let telemetry = Telemetry {
        access_log,
        taps: taps.clone(),
    };
    let outbound = Outbound::new(
        args.clone(),
        discovery,
        metrics.clone(),
        telemetry.clone(),
        shutdown.clone(),
    );
    let inbound = Inbound::new(
        args.clone(),
        inbound_forward,
        store.clone(),
        profiles,
        metrics.clone(),
        telemetry,
        mesh_tls.clone(),
        authz.clone(),
        shutdown.clone(),
    );
    // The tap port obeys the inbound policy too (on top of --tap-allow).
    let tap_authz = {
        let (authz, label): (_, Arc<str>) = (authz.clone(), tap_local.to_string().into());
        tap_networks.with_policy(PolicyCheck(Arc::new(move |peer| {
            let decision = authz.decide(tap_local.port(), &Client::plain(peer), &label);
            decision.count_tcp();
            decision.allowed
        })))
    };
    let admin = Arc::new(Admin {
        metrics,
        tap_addr: tap_local,
        log_level,
        shutdown: shutdown.clone(),
        admin_label: admin_local.to_string().into(),
        admin_addr: admin_local,
        authz,
        mesh_tls,
    });

    tokio::spawn(tick_windows(admin.metrics.clone()));
    tokio::spawn(admin.serve(admin_listener));
    {
        let (taps, shutdown) = (taps.clone(), shutdown.clone());
        tokio::spawn(async move {
            let stop = async move { shutdown.signaled().await };
            if let Err(e) = pylon_tap_server::serve(tap_listener, taps, tap_authz, stop).await {
                tracing::warn!(error = %e, "tap server stopped");
            }
        });
    }
    tokio::spawn(accept_loop(
        inbound_listener,
        inbound_local,
        shutdown.clone(),
        move |stream, peer, local| inbound.clone().serve_connection(stream, peer, local),
    ));
    tokio::spawn(accept_loop(
        outbound_listener,
        outbound_local,
        shutdown.clone(),
        move |stream, peer, local| outbound.clone().serve_connection(stream, peer, local),
    ));

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM received; draining"),
        _ = sigint.recv() => tracing::info!("SIGINT received; draining"),
        _ = shutdown.signaled() => {}
    }
    shutdown.begin();
    if shutdown.drain(args.shutdown_grace).await {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!(
            grace_ms = args.shutdown_grace.as_millis() as u64,
            "shutdown grace expired with connections still open; exiting"
        );
    }
    Ok(())
}

fn resolve_forward(addr: &str) -> Result<SocketAddr, StartError> {
    let err = |reason: String| StartError::InboundForward {
        addr: addr.to_string(),
        reason,
    };
    addr.to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("resolved to no address".into()))
}

/// Moves the metrics' rolling windows on once a second, for the life of the process.
async fn tick_windows(metrics: Arc<Metrics>) {
    let mut every_second = tokio::time::interval(std::time::Duration::from_secs(1));
    every_second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every_second.tick().await;
        metrics.window_tick(tokio::time::Instant::now().into_std());
    }
}
