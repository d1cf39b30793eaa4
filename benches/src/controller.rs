//! `pylon-bench controller`: the control plane at scale. A fake Kubernetes API (in this
//! process) holds 1,000 Services with 10 endpoints each (their Pods and EndpointSlices); a real
//! `pylon-controller` (release build, its own process) watches it; this process then holds
//! 2,000 `Destination.Get` streams, as 2,000 proxies would, and changes endpoints one at a time
//! and in a burst.
//!
//! Measured: the controller's memory (RSS), the time from an endpoint change in the API to the
//! moment every subscriber of that service has it (p50, p99, max), and the controller's CPU
//! per change. Results go to `benches/results/controller-latest.md` and a dated copy.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use linkerd2_proxy_api::destination::destination_client::DestinationClient;
use linkerd2_proxy_api::destination::{update, GetDestination};
use linkerd2_proxy_api::net::ip_address;
use pylon_fake_kube_api::FakeApiServer;
use serde_json::json;
use tokio::sync::mpsc;

use crate::procs::{free_addr, Managed};
use crate::procstat;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Services in the cluster.
    #[arg(long, default_value_t = 1_000)]
    services: usize,
    /// Endpoints (pods) per service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Subscribed `Get` streams, spread evenly over the services.
    #[arg(long, default_value_t = 2_000)]
    streams: usize,
    /// Proxies' connections the streams share (h2 multiplexes them).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Endpoint changes made one at a time.
    #[arg(long, default_value_t = 300)]
    updates: usize,
    /// Changes made at once (in distinct services) for the burst measure.
    #[arg(long, default_value_t = 200)]
    burst: usize,
    /// The controller binary (default: target/release/pylon-controller).
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Where controller-latest.md and the dated copy go.
    #[arg(long, default_value_os_t = crate::default_results_dir())]
    results_dir: PathBuf,
}

/// What one stream saw: (service, address added, when).
type Seen = (usize, IpAddr, Instant);

fn pod_ip(service: usize, endpoint: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        1 + (service / 250) as u8,
        (service % 250) as u8,
        1 + endpoint as u8,
    ))
}

/// The address a change gives endpoint 0 of a service: unique per change.
fn changed_ip(change: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        200 + (change / 62_500) as u8,
        ((change / 250) % 250) as u8,
        1 + (change % 250) as u8,
    ))
}

fn service_name(s: usize) -> String {
    format!("svc-{s}")
}

fn slice(s: usize, endpoints: usize, first_ip: Option<IpAddr>) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = (0..endpoints)
        .map(|e| {
            let ip = match (e, first_ip) {
                (0, Some(ip)) => ip,
                _ => pod_ip(s, e),
            };
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "name": format!("{}-{e}", service_name(s)), "namespace": "bench"}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{}-slice", service_name(s)), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": service_name(s)}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    })
}

fn populate(api: &FakeApiServer, o: &Options) -> Result<()> {
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}))?;
    for s in 0..o.services {
        let name = service_name(s);
        api.apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"clusterIP": format!("10.96.{}.{}", s / 250, 1 + s % 250), "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
        }))?;
        for e in 0..o.endpoints {
            api.apply(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{name}-{e}"), "namespace": "bench",
                             "labels": {"app": name, "pod-template-hash": "5d8f7"},
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                  "name": format!("{name}-5d8f7"), "uid": "u", "controller": true}]},
                "spec": {"serviceAccountName": name,
                         "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]},
                                        {"name": "pylon-proxy"}]},
                "status": {"phase": "Running", "podIP": pod_ip(s, e).to_string(),
                           "conditions": [{"type": "Ready", "status": "True"}]}
            }))?;
        }
        api.apply(slice(s, o.endpoints, None))?;
    }
    Ok(())
}

fn http_get(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    raw.split_whitespace().nth(1)?.parse().ok()
}

pub fn main(o: Options, runtime: &tokio::runtime::Runtime) -> Result<()> {
    runtime.block_on(run(o))
}

async fn run(o: Options) -> Result<()> {
    let bin = o.controller_bin.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/pylon-controller")
    });
    if !bin.exists() {
        bail!(
            "{} not found: cargo build --release -p pylon-controller",
            bin.display()
        );
    }
    let api = FakeApiServer::start().await?;
    api.register_mesh_kinds();
    let t = Instant::now();
    populate(&api, &o)?;
    eprintln!(
        "controller bench: {} services x {} endpoints ({} objects) in the API in {:?}",
        o.services,
        o.endpoints,
        o.services * (o.endpoints + 2) + 1,
        t.elapsed()
    );
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let (destination, policy, admin) = (free_addr()?, free_addr()?, free_addr()?);
    let started = Instant::now();
    let args: Vec<String> = vec![
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--destination-addr".into(),
        destination.to_string(),
        "--policy-addr".into(),
        policy.to_string(),
        "--admin-addr".into(),
        admin.to_string(),
    ];
    let mut controller = Managed::spawn(
        "pylon-controller",
        &bin,
        &args,
        &[("PYLON_LOG", "warn")],
        None,
        dir.path(),
    )?;
    let pid = controller.pid();
    // /ready is answered by a blocking probe; the fake API runs on this runtime, so the probe
    // goes to a blocking thread.
    loop {
        let ready = tokio::task::spawn_blocking(move || http_get(admin, "/ready")).await?;
        if ready == Some(200) {
            break;
        }
        controller.check_running()?;
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the controller was not ready within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sync_time = started.elapsed();
    let rss_synced = procstat::rss_kib(pid)?;

    // The subscribers.
    let mut clients = Vec::with_capacity(o.connections);
    for _ in 0..o.connections.max(1) {
        clients.push(DestinationClient::connect(format!("http://{destination}")).await?);
    }
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let subscribe_start = Instant::now();
    for i in 0..o.streams {
        let service = i % o.services;
        let mut client = clients[i % clients.len()].clone();
        let (seen_tx, ready_tx) = (seen_tx.clone(), ready_tx.clone());
        let path = format!("{}.bench.svc.cluster.local:80", service_name(service));
        tokio::spawn(async move {
            let request = GetDestination {
                scheme: "k8s".into(),
                path,
                context_token: String::new(),
            };
            let Ok(rsp) = client.get(request).await else {
                return;
            };
            let mut stream = rsp.into_inner();
            let mut first = true;
            while let Ok(Some(msg)) = stream.message().await {
                let at = Instant::now();
                if std::mem::take(&mut first) {
                    let _ = ready_tx.send(());
                }
                if let Some(update::Update::Add(set)) = msg.update {
                    for addr in set.addrs {
                        let ip = addr.addr.and_then(|a| a.ip).and_then(|ip| ip.ip);
                        if let Some(ip_address::Ip::Ipv4(v4)) = ip {
                            let _ = seen_tx.send((service, IpAddr::V4(Ipv4Addr::from(v4)), at));
                        }
                    }
                }
            }
        });
    }
    drop(ready_tx);
    let mut subscribed = 0;
    while subscribed < o.streams {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some(())) => subscribed += 1,
            _ => bail!(
                "only {subscribed} of {} streams got their first update",
                o.streams
            ),
        }
    }
    let subscribe_time = subscribe_start.elapsed();
    // The initial adds are not changes.
    while seen_rx.try_recv().is_ok() {}
    let streams_per_service = o.streams.div_ceil(o.services);
    let subscribers = |s: usize| (0..o.streams).filter(|i| i % o.services == s).count();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_subscribed = procstat::rss_kib(pid)?;

    // One change at a time.
    let ticks = procstat::clock_ticks_per_second()? as f64;
    let cpu_before = procstat::own_cpu_ticks(&[pid])?;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for u in 0..o.updates {
        let s = (u * 7) % o.services;
        let ip = changed_ip(u);
        let t0 = Instant::now();
        api.apply(slice(s, o.endpoints, Some(ip)))?;
        let want = subscribers(s);
        let last = wait_seen(&mut seen_rx, &[(s, ip)], want).await?;
        latency.record((last - t0).as_micros().max(1) as u64)?;
    }
    let cpu_updates = procstat::own_cpu_ticks(&[pid])? - cpu_before;
    let cpu_per_update_ms = cpu_updates as f64 / ticks * 1000.0 / o.updates as f64;

    // A burst: changes in `burst` services at once.
    let burst: Vec<(usize, IpAddr)> = (0..o.burst.min(o.services))
        .map(|b| ((b * 13) % o.services, changed_ip(o.updates + b)))
        .collect();
    let cpu_before = procstat::own_cpu_ticks(&[pid])?;
    let t0 = Instant::now();
    for (s, ip) in &burst {
        api.apply(slice(*s, o.endpoints, Some(*ip)))?;
    }
    let want: usize = burst.iter().map(|(s, _)| subscribers(*s)).sum();
    let last = wait_seen(&mut seen_rx, &burst, want).await?;
    let burst_time = last - t0;
    let cpu_burst = procstat::own_cpu_ticks(&[pid])? - cpu_before;
    let rss_after = procstat::rss_kib(pid)?;

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let date = crate::report::utc_timestamp(now);
    let machine: Vec<String> = crate::machine::describe(None, None, &bin)
        .into_iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let ms = |us: u64| us as f64 / 1000.0;
    let md = format!(
        "# Controller at scale\n\n\
         `cargo build --release -p pylon-controller -p pylon-bench && target/release/pylon-bench controller`, {date}. {machine}\n\n\
         A fake Kubernetes API on loopback (in the bench process) holds {services} Services x {endpoints} endpoints \
         ({objects} objects: Services, Pods, EndpointSlices). A release `pylon-controller` (its own process) watches it \
         and serves {streams} `Destination.Get` streams ({per} per service, over {conns} h2 connections), held by the \
         bench as {streams} proxies would. Each change rewrites one EndpointSlice (endpoint 0 gets a new address); \
         its time is from the API write to the moment every subscriber of that service has the new address.\n\n\
         | measure | value |\n|---|---|\n\
         | time to list everything and become ready | {sync:.2} s |\n\
         | time for {streams} streams to get their first update | {sub:.2} s |\n\
         | controller RSS, synced, no streams | {rss0:.1} MiB |\n\
         | controller RSS, {streams} streams | {rss1:.1} MiB |\n\
         | controller RSS, after the changes | {rss2:.1} MiB |\n\
         | change -> every subscriber, one at a time ({updates} changes): p50 | {p50:.2} ms |\n\
         | p99 | {p99:.2} ms |\n\
         | max | {max:.2} ms |\n\
         | controller CPU per change (one at a time) | {cpu:.2} ms |\n\
         | burst of {burst} changes -> every subscriber | {burst_ms:.1} ms ({burst_cpu:.1} ms CPU, {burst_per:.2} ms per change) |\n\n\
         For comparison, Linkerd's published control-plane memory: 324 MB in its 2021 benchmark and 365 MB in the \
         2021 redux (whole control plane, a different workload: read those as orders of magnitude, not a like-for-like \
         ratio).\n\n\
         What costs what: every change rebuilds the controller's immutable snapshot of all objects (parsed Pods, \
         Services, slices; no raw JSON kept), then each subscription recomputes its own destination from it and \
         sends only the difference; changes queued while a rebuild runs are applied together, which is why a burst \
         costs less per change than changes one at a time.\n",
        date = date,
        machine = machine.join("; "),
        services = o.services,
        endpoints = o.endpoints,
        objects = o.services * (o.endpoints + 2) + 1,
        streams = o.streams,
        per = streams_per_service,
        conns = clients.len(),
        sync = sync_time.as_secs_f64(),
        sub = subscribe_time.as_secs_f64(),
        rss0 = mib(rss_synced),
        rss1 = mib(rss_subscribed),
        rss2 = mib(rss_after),
        updates = o.updates,
        p50 = ms(latency.value_at_quantile(0.5)),
        p99 = ms(latency.value_at_quantile(0.99)),
        max = ms(latency.max()),
        cpu = cpu_per_update_ms,
        burst = burst.len(),
        burst_ms = burst_time.as_secs_f64() * 1000.0,
        burst_cpu = cpu_burst as f64 / ticks * 1000.0,
        burst_per = cpu_burst as f64 / ticks * 1000.0 / burst.len().max(1) as f64,
    );
    print!("{md}");
    write(&o.results_dir, &date, &md)?;
    drop(controller);
    Ok(())
}

/// Waits until every `(service, ip)` was seen by its subscribers (`want` sightings in all);
/// returns when the last one came.
async fn wait_seen(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    changes: &[(usize, IpAddr)],
    want: usize,
) -> Result<Instant> {
    let wanted: HashMap<(usize, IpAddr), ()> = changes.iter().map(|c| (*c, ())).collect();
    let mut got = 0;
    let mut last = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((s, ip, at))) => {
                if wanted.contains_key(&(s, ip)) {
                    got += 1;
                    last = at;
                }
            }
            _ => bail!("only {got} of {want} subscribers saw the change within 60 s"),
        }
    }
    Ok(last)
}

fn write(dir: &Path, date: &str, md: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let stamp = date.replace(':', "");
    std::fs::write(dir.join("controller-latest.md"), md)?;
    std::fs::write(dir.join(format!("{stamp}-controller.md")), md)?;
    eprintln!("wrote {}", dir.join("controller-latest.md").display());
    Ok(())
}
