//! The run: start the app and every path, verify them, measure workload by workload with the
//! paths side by side, then write the report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;

use crate::chain::{self, Chain, PathKind, Setup};
use crate::loadgen::{self, Job, RunStats, Slot, Workload};
use crate::procs;
use crate::procstat;
use crate::report::{
    self, Errors, LatencyRow, MemoryPoint, MemoryRow, MtlsCost, MtlsFigure, NotRun, Report,
    ThroughputRow,
};
use crate::rounds::{self, RoundSample, Rounds};
use crate::syscalls;

/// Concurrency of every load run: connections for HTTP/1.1 and TCP, streams for h2.
pub(crate) const SLOTS: usize = 64;
/// Connections the h2 streams share.
const H2_CONNECTIONS: usize = 4;
/// Quiet time between opening the idle connections and reading memory.
const IDLE_SETTLE: Duration = Duration::from_secs(3);
/// Idle connections opened at once for the memory measurement.
const IDLE_OPEN_PARALLEL: usize = 256;
/// Everything one traced (strace) run may take: attach, the counted run, detach.
const TRACED_RUN_TIMEOUT: Duration = Duration::from_secs(60);
const NOFILE: u64 = 200_000;

#[derive(Debug, Clone, Args)]
pub struct Options {
    /// Shorter runs and fewer rows (well under 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Worker threads of each proxy: Pylon's --threads, nginx's worker_processes, HAProxy's
    /// nbthread.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The pylon-proxy binary (default: next to this one; `benches/run` passes the one the image
    /// ships, from scripts/build-release-proxy).
    #[arg(long)]
    pylon_bin: Option<PathBuf>,
    /// Where latest.md, latest.json and the dated copies go.
    #[arg(long, default_value_os_t = crate::default_results_dir())]
    results_dir: PathBuf,
    /// Paths to run (comma-separated subset of direct,pylon,pylon-mtls,nginx,haproxy; direct is
    /// always run). pylon-mtls is Pylon with mTLS between the proxies; the mTLS cost row is
    /// measured whenever pylon is run, pylon-mtls or not.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,pylon,nginx,haproxy"
    )]
    paths: Vec<String>,
    /// Don't pin processes to cores.
    #[arg(long)]
    no_pin: bool,
    /// Seconds per measurement (default 5, or 1.5 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Alternated rounds of the target workloads, for their run-to-run spread (default 5, or 2
    /// with --quick; 0 skips them).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per run within a round (default 3, or 1 with --quick).
    #[arg(long)]
    round_seconds: Option<f64>,
}

struct Plan {
    measure: Duration,
    warmup: Duration,
    rates: Vec<u64>,
    idle_connections: Vec<usize>,
    /// Alternated rounds of the target workloads (`rounds.rs`).
    rounds: usize,
    round_measure: Duration,
}

impl Plan {
    fn new(o: &Options) -> Plan {
        let default = if o.quick { 1.5 } else { 5.0 };
        let measure = Duration::from_secs_f64(o.seconds.unwrap_or(default).max(0.5));
        let (rounds, round_seconds) = if o.quick { (2, 1.0) } else { (5, 3.0) };
        let rounds = o.rounds.unwrap_or(rounds);
        let round_measure =
            Duration::from_secs_f64(o.round_seconds.unwrap_or(round_seconds).max(0.5));
        if o.quick {
            Plan {
                measure,
                warmup: Duration::from_millis(300),
                rates: vec![1_000],
                idle_connections: vec![1_000],
                rounds,
                round_measure,
            }
        } else {
            Plan {
                measure,
                warmup: Duration::from_secs(1),
                rates: vec![1_000, 5_000],
                idle_connections: vec![1_000, 10_000],
                rounds,
                round_measure,
            }
        }
    }
}

/// Which cores the load side (generator and app) and the proxies get.
struct Pinning {
    load: Option<String>,
    proxies: Option<String>,
    text: String,
}

fn pinning(no_pin: bool) -> Result<Pinning> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if no_pin || cores < 2 {
        return Ok(Pinning {
            load: None,
            proxies: None,
            text: format!(
                "none ({cores} core(s){})",
                if no_pin { ", --no-pin" } else { "" }
            ),
        });
    }
    procs::pin_self(&[0]).context("pinning the bench to core 0")?;
    let proxies = if cores > 2 {
        format!("1-{}", cores - 1)
    } else {
        "1".to_owned()
    };
    Ok(Pinning {
        load: Some("0".into()),
        text: format!(
            "taskset: load generator + app on core 0; every proxy process on core{} {proxies}",
            if cores > 2 { "s" } else { "" }
        ),
        proxies: Some(proxies),
    })
}

pub fn main(options: Options, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let pin = pinning(options.no_pin)?;
    let nofile = procs::raise_nofile(NOFILE).context("raising the open-file limit")?;
    runtime.block_on(async {
        tokio::select! {
            r = run(&options, &pin, nofile) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })
}

fn pylon_bin(o: &Options) -> Result<PathBuf> {
    let bin = match &o.pylon_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating this binary")?
            .with_file_name("pylon-proxy"),
    };
    if !bin.is_file() {
        bail!(
            "{} not found: build it (scripts/build-release-proxy prints where it put it) and pass \
             --pylon-bin, or run benches/run, which does",
            bin.display()
        );
    }
    Ok(bin)
}

async fn run(o: &Options, pin: &Pinning, nofile: u64) -> Result<()> {
    let mut plan = Plan::new(o);
    // Each idle connection costs the outbound proxy a descriptor (HAProxy reserves two), so the
    // largest count must fit the open-file limit every proxy gets.
    let fd_cap =
        usize::try_from(chain::haproxy_maxconn(nofile).saturating_sub(450)).unwrap_or(usize::MAX);
    let mut capped = None;
    for n in &mut plan.idle_connections {
        if *n > fd_cap {
            capped = Some((*n, fd_cap));
            *n = fd_cap;
        }
    }
    let mut kinds = vec![PathKind::Direct];
    for p in &o.paths {
        let k = PathKind::parse(p.trim())?;
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    let pylon_bin = pylon_bin(o)?;
    // Known before anything is measured, so CI fails in seconds rather than after the run.
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let mut syscalls_not_counted = Vec::new();
    let strace = procs::find_program("strace");
    if strace.is_none() {
        let why = "strace not found (apt-get install strace; benches/run installs it as root)";
        if in_ci {
            bail!("{why}: CI=true needs the syscall counts");
        }
        eprintln!("pylon-bench: the syscall table is skipped: {why}");
        syscalls_not_counted.push(format!("skipped for every path: {why}."));
    }
    let dir = tempfile::Builder::new()
        .prefix("pylon-bench-")
        .tempdir()
        .context("creating the run's temp dir")?;
    let hz = procstat::clock_ticks_per_second()? as f64;
    eprintln!("pylon-bench: configs and logs in {}", dir.path().display());

    // The app, on the load core.
    let (app, app_proc) = chain::start_app(pin.load.as_deref(), dir.path())?;
    let load_pids = [std::process::id(), app_proc.pid()];

    let setup = Setup {
        app,
        threads: o.threads.max(1),
        nofile,
        proxy_cpus: pin.proxies.as_deref(),
        dir: dir.path(),
        pylon_bin: &pylon_bin,
    };
    let mut chains: Vec<Chain> = Vec::new();
    let mut stream_note = None;
    for &kind in &kinds {
        let mut c = match kind {
            PathKind::Direct => chain::direct(app),
            PathKind::Pylon => chain::pylon(&setup)?,
            PathKind::PylonMtls => chain::pylon_mtls(&setup)?,
            PathKind::Nginx => {
                if chain::nginx_stream()? == chain::NginxStream::Missing {
                    stream_note = Some(());
                }
                chain::nginx(&setup)?
            }
            PathKind::Haproxy => chain::haproxy(&setup)?,
        };
        eprintln!(
            "pylon-bench: checking path {} with one request per workload",
            kind.name()
        );
        c.verify().await?;
        chains.push(c);
    }

    // Idle memory, after every path has carried one request of each workload.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut memory = Vec::new();
    for c in chains.iter().filter(|c| c.kind != PathKind::Direct) {
        memory.push(MemoryRow {
            path: c.kind,
            idle_rss_mib: mib(procstat::total_rss_kib(&c.http_pids)?),
            idle_anon_mib: mib(procstat::total_anon_kib(&c.http_pids)?),
            idle_pss_mib: mib(procstat::total_pss_kib(&c.http_pids)?),
            with_connections: Vec::new(),
        });
    }

    // What else the machine was doing during the measurements (other users of the cores skew
    // every figure; the report says how much there was).
    let measured_start = std::time::Instant::now();
    let busy0 = procstat::machine_busy_ticks()?;
    let ours0 = procstat::cpu_ticks(&[std::process::id()])?;

    let mut latency_rows = Vec::new();
    let mut throughput_rows = Vec::new();
    let mut not_run = Vec::new();
    for workload in Workload::ALL {
        for c in chains.iter_mut() {
            let target = match c.target(workload) {
                Ok(t) => t,
                Err(reason) => {
                    not_run.push(NotRun {
                        path: c.kind,
                        workload,
                        reason,
                    });
                    continue;
                }
            };
            eprintln!("pylon-bench: {} via {}", workload.name(), c.kind.name());
            let job = Job::new(workload, target);
            let mut slots = loadgen::open_slots(&job, SLOTS, H2_CONNECTIONS)
                .await
                .with_context(|| {
                    format!(
                        "opening connections to {} for {}",
                        c.kind.name(),
                        workload.name()
                    )
                })?;
            let (_, back) = loadgen::closed_loop(job.clone(), slots, plan.warmup).await;
            slots = back;
            let pids = c.pids(workload).to_vec();

            for &rate in &plan.rates {
                let cpu0 = procstat::cpu_ticks(&pids)?;
                let (stats, back) =
                    loadgen::fixed_rate(job.clone(), slots, rate, plan.measure).await;
                slots = back;
                let cpu = (procstat::cpu_ticks(&pids)? - cpu0) as f64 / hz;
                let latency = must_have_latency(&stats, c.kind, workload, &format!("{rate}/s"))?;
                latency_rows.push(LatencyRow {
                    workload,
                    path: c.kind,
                    rate_per_s: rate,
                    ok: stats.ok,
                    errors: errors(&stats),
                    late: stats.late,
                    unsent: stats.unsent,
                    latency,
                    added_us: None,
                    added_p99_vs_best_other: None,
                    proxy_cpu_s: cpu,
                });
                c.check_running()?;
            }

            let cpu0 = procstat::cpu_split(&pids)?;
            let load0 = procstat::own_cpu_ticks(&load_pids)?;
            let (stats, back) = loadgen::closed_loop(job.clone(), slots, plan.measure).await;
            drop(back);
            let used = procstat::cpu_split(&pids)?.since(cpu0);
            let cpu = used.total() as f64 / hz;
            let load_cpu = (procstat::own_cpu_ticks(&load_pids)? - load0) as f64 / hz;
            let latency = must_have_latency(&stats, c.kind, workload, "closed loop")?;
            let seconds = stats.elapsed.as_secs_f64();
            throughput_rows.push(ThroughputRow {
                workload,
                path: c.kind,
                hops: c.hops(workload).to_owned(),
                ok: stats.ok,
                errors: errors(&stats),
                seconds,
                req_per_s: stats.throughput(),
                vs_direct: None,
                latency,
                proxy_cpu_s: cpu,
                proxy_user_cpu_s: used.user as f64 / hz,
                proxy_system_cpu_s: used.system as f64 / hz,
                // Filled from `hops` with the ratios.
                proxies: 0,
                user_us_per_req_per_hop: None,
                sys_us_per_req_per_hop: None,
                req_per_proxy_cpu_s: None,
                per_cpu_vs_best_other: None,
                proxy_cpu_s_per_100k: None,
                load_side_cpu_pct: 100.0 * load_cpu / seconds.max(1e-9),
            });
            c.check_running()?;
            // Let the closed connections drain before the next path starts.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // The target workloads again, in alternated rounds: their run-to-run spread.
    let rounds = if plan.rounds > 0 {
        Some(alternated_rounds(&mut chains, &plan, hz).await?)
    } else {
        None
    };

    // Syscalls per request: each path's proxies under strace over a short counted run of their
    // own (strace slows them down, so never during the timed runs).
    let mut syscall_rows = Vec::new();
    for workload in [Workload::Http1Get, Workload::H2cGet] {
        let Some(strace) = &strace else { break };
        for c in chains.iter_mut().filter(|c| c.kind != PathKind::Direct) {
            if c.target(workload).is_err() {
                continue;
            }
            eprintln!(
                "pylon-bench: syscalls of {} via {} (strace -c)",
                workload.name(),
                c.kind.name()
            );
            let traced =
                tokio::time::timeout(TRACED_RUN_TIMEOUT, syscalls::measure(c, workload, strace))
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!("not done within {TRACED_RUN_TIMEOUT:?}"))
                    });
            // A dead proxy is the bench's failure, not strace's.
            c.check_running()?;
            match traced {
                Ok(row) => syscall_rows.push(row),
                Err(e) => {
                    let why = format!(
                        "{} via {}: the traced run failed: {e:#}",
                        workload.name(),
                        c.kind.name()
                    );
                    if in_ci {
                        bail!("syscall counts: {why}");
                    }
                    eprintln!("pylon-bench: syscall counts: {why}");
                    syscalls_not_counted.push(why);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // What telemetry costs: Pylon's HTTP/1.1 closed loop with no tap, then with a tap on both
    // proxies reading every event, then with taps sampling Linkerd's usual 100 requests/s.
    let mut tap_cost = "n/a: the pylon path was not run".to_owned();
    if let Some(c) = chains.iter_mut().find(|c| c.kind == PathKind::Pylon) {
        tap_cost = tap_cost_row(c, &plan, hz).await?;
    }

    // What mTLS between the proxies costs: the plaintext chain against the mTLS one (started
    // here for the row unless pylon-mtls is a path of the run), back to back.
    let mut mtls_cost = MtlsCost {
        summary: "n/a: the pylon path was not run".to_owned(),
        figures: Vec::new(),
    };
    if kinds.contains(&PathKind::Pylon) {
        let mut own = None;
        if !kinds.contains(&PathKind::PylonMtls) {
            eprintln!("pylon-bench: starting the pylon-mtls chain for the mTLS cost row");
            let mut c = chain::pylon_mtls(&setup)?;
            c.verify().await?;
            own = Some(c);
        }
        let find = |k: PathKind| chains.iter().chain(own.iter()).find(|c| c.kind == k);
        if let (Some(plain), Some(mtls)) = (find(PathKind::Pylon), find(PathKind::PylonMtls)) {
            mtls_cost = mtls_cost_row(plain, mtls, &plan, hz).await?;
        }
        for c in chains.iter_mut().chain(own.iter_mut()) {
            c.check_running()?;
        }
        drop(own);
    }

    // Memory with idle keep-alive connections, the same method for every proxy.
    for c in chains.iter_mut().filter(|c| c.kind != PathKind::Direct) {
        let target = c.target(Workload::Http1Get).map_err(anyhow::Error::msg)?;
        for &n in &plan.idle_connections {
            eprintln!("pylon-bench: {n} idle connections to {}", c.kind.name());
            let idle = loadgen::open_idle_connections(&target, n, IDLE_OPEN_PARALLEL).await;
            // Idle means idle: every proxy gets the same quiet time to settle (Pylon frees an
            // HTTP/1 connection's buffers after 1 s without traffic; nginx and HAProxy at once).
            tokio::time::sleep(IDLE_SETTLE).await;
            let rss = mib(procstat::total_rss_kib(&c.http_pids)?);
            let point = MemoryPoint {
                connections: n,
                opened: idle.streams.len(),
                errors: Errors {
                    count: idle.errors,
                    first: idle.first_error.clone(),
                },
                rss_mib: rss,
            };
            drop(idle);
            if let Some(row) = memory.iter_mut().find(|m| m.path == c.kind) {
                row.with_connections.push(point);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            c.check_running()?;
        }
    }

    let busy = procstat::machine_busy_ticks()?.saturating_sub(busy0);
    let ours = procstat::cpu_ticks(&[std::process::id()])?.saturating_sub(ours0);
    let other_load_pct =
        100.0 * busy.saturating_sub(ours) as f64 / hz / measured_start.elapsed().as_secs_f64();

    let mut notes = vec![
        "Load generator: pylon-bench's own (hyper 1 + hyper-util + h2 + hdrhistogram, in \
         benches/src/loadgen.rs). No public tool here covers all five workloads with \
         coordinated-omission-corrected fixed rates: wrk and h2load have no corrected fixed rate \
         (and nothing for gRPC trailers or raw TCP), wrk2 is not packaged, and `oha` would need a \
         long `cargo install` on 2 cores."
            .to_owned(),
        "Fixed-rate runs are open loop: a pacer thread schedules every request's intended send \
         time; latency is measured from that time to the end of the response, so stalls count \
         against the requests queued behind them. `late` counts requests that found all 64 slots \
         busy (plus any not sent before the deadline)."
            .to_owned(),
        "Opaque TCP echo goes through the inbound proxy only, for every proxy (load -> inbound -> \
         echo): Pylon's outbound listener needs SO_ORIGINAL_DST (an iptables redirect) to know \
         where an opaque connection goes, so a two-hop Pylon TCP row would need a network \
         namespace; one-hop rows are compared with one-hop rows."
            .to_owned(),
        "Protocols between the hops: Pylon keeps each request's protocol (HTTP/1.1 pooled, h2 on \
         one shared h2 connection per endpoint); HAProxy is h2 end to end for the h2c and gRPC \
         workloads (`proto h2` on bind and server lines); nginx cannot proxy_pass over h2, so its \
         h2c GET goes on as HTTP/1.1 keep-alive and gRPC uses grpc_pass over h2."
            .to_owned(),
        format!(
            "Pylon runs with PYLON_LOG=warn (no per-request logs, like access_log off / no log \
             lines for the others). Open-file limit raised to {nofile}."
        ),
    ];
    if let Some((wanted, got)) = capped {
        notes.push(format!(
            "Memory with {wanted} connections became {got} for every proxy: the open-file limit \
             here is {nofile} and cannot be raised (no CAP_SYS_RESOURCE), and HAProxy reserves two \
             descriptors per connection and refuses to start when maxconn needs more."
        ));
    }
    if stream_note.is_some() {
        notes.push(format!(
            "nginx TCP row not measured: this nginx has no stream module ({} missing; Debian \
             package libnginx-mod-stream, which benches/run installs when run as root).",
            chain::NGINX_STREAM_MODULE
        ));
    }

    let nginx = kinds
        .contains(&PathKind::Nginx)
        .then(chain::nginx_program)
        .transpose()?;
    let haproxy = kinds
        .contains(&PathKind::Haproxy)
        .then(chain::haproxy_program)
        .transpose()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    let threads = setup.threads;
    let mut report = Report {
        date_utc: report::utc_timestamp(now),
        mode: if o.quick { "quick" } else { "full" }.to_owned(),
        machine: crate::machine::describe(nginx.as_deref(), haproxy.as_deref(), &pylon_bin),
        pinning: pin.text.clone(),
        settings: vec![
            (
                "proxy threads".into(),
                format!("{threads} (pylon --threads, nginx worker_processes, haproxy nbthread)"),
            ),
            (
                "each measurement".into(),
                format!(
                    "{:.1} s after a {:.1} s closed-loop warm-up per path and workload",
                    plan.measure.as_secs_f64(),
                    plan.warmup.as_secs_f64()
                ),
            ),
            (
                "other load during the run".into(),
                format!(
                    "{other_load_pct:.0}% of one core on average (CPU busy time of processes \
                     other than the bench, its app and its proxies)"
                ),
            ),
            (
                "paths".into(),
                kinds
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ],
        notes,
        latency: latency_rows,
        throughput: throughput_rows,
        syscalls: syscall_rows,
        syscalls_not_counted,
        memory,
        not_run,
        tap_active_vs_idle: tap_cost,
        mtls_vs_plaintext: mtls_cost,
        profiles: crate::profiles::read(&o.results_dir),
        rounds,
    };
    report::fill_ratios(&mut report);
    let md = report::markdown(&report);
    write_results(&o.results_dir, &report, &md)?;
    println!("{md}");
    drop(chains);
    drop(app_proc);
    Ok(())
}

/// Requests per proxy CPU-second of Pylon's HTTP/1.1 closed loop without a tap, with a tap of
/// every request on both proxies, and with taps sampling 100 requests/s.
async fn tap_cost_row(c: &mut Chain, plan: &Plan, hz: f64) -> Result<String> {
    let target = c.target(Workload::Http1Get).map_err(anyhow::Error::msg)?;
    let job = Job::new(Workload::Http1Get, target);
    let pids = c.pids(Workload::Http1Get).to_vec();
    let run = |label: &'static str| {
        let job = job.clone();
        let pids = pids.clone();
        async move {
            eprintln!("pylon-bench: tap cost, {label}");
            let slots = loadgen::open_slots(&job, SLOTS, H2_CONNECTIONS).await?;
            let cpu0 = procstat::cpu_ticks(&pids)?;
            let (stats, _) = loadgen::closed_loop(job.clone(), slots, plan.measure).await;
            let cpu = (procstat::cpu_ticks(&pids)? - cpu0) as f64 / hz;
            if stats.ok == 0 {
                anyhow::bail!("no successful request in the tap-cost run ({label})");
            }
            Ok::<f64, anyhow::Error>(stats.ok as f64 / cpu.max(1e-9))
        }
    };
    let idle = run("no tap").await?;
    let taps = crate::tap::Taps::open(&c.tap_addrs, u32::MAX).await?;
    let all = run("every request tapped").await?;
    let events = taps.close();
    let taps = crate::tap::Taps::open(&c.tap_addrs, pylon_tap_default_rps()).await?;
    let sampled = run("100 requests/s tapped").await?;
    let sampled_events = taps.close();
    let taps = crate::tap::Taps::open_stalled(&c.tap_addrs).await?;
    let stalled = run("a stalled tap client").await?;
    taps.close();
    c.check_running()?;
    Ok(format!(
        "HTTP/1.1 GET closed loop, req per proxy CPU-s: no tap {idle:.0}; every request tapped on \
         both proxies {all:.0} ({:.2}× idle, {events} events read); taps sampling 100 req/s \
         {sampled:.0} ({:.2}× idle, {sampled_events} events); a stalled tap client (never reads; \
         events beyond its queue dropped and counted) {stalled:.0} ({:.2}× idle)",
        all / idle,
        sampled / idle,
        stalled / idle,
    ))
}

/// The target workloads in `plan.rounds` rounds, each round every path once per workload, the
/// paths' order rotated by one from round to round (`rounds.rs` says why).
async fn alternated_rounds(chains: &mut [Chain], plan: &Plan, hz: f64) -> Result<Rounds> {
    let rate = plan.rates.first().copied().unwrap_or(1_000);
    let mut samples = Vec::new();
    let n = chains.len();
    for round in 0..plan.rounds {
        for workload in rounds::WORKLOADS {
            for i in 0..n {
                let c = &mut chains[(i + round) % n];
                if c.target(workload).is_err() {
                    continue;
                }
                eprintln!(
                    "pylon-bench: round {}/{}, {} via {}",
                    round + 1,
                    plan.rounds,
                    workload.name(),
                    c.kind.name()
                );
                samples.push(round_sample(c, workload, round, rate, plan, hz).await?);
                c.check_running()?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Ok(Rounds {
        rounds: plan.rounds,
        seconds: plan.round_measure.as_secs_f64(),
        warmup_seconds: plan.warmup.as_secs_f64(),
        rate_per_s: rate,
        samples,
    })
}

/// Fresh connections to `c` for `workload`, warmed up with a closed loop of `warmup`.
async fn warmed_slots(
    c: &Chain,
    workload: Workload,
    warmup: Duration,
) -> Result<(Arc<Job>, Vec<Slot>)> {
    let target = c.target(workload).map_err(anyhow::Error::msg)?;
    let job = Job::new(workload, target);
    let slots = loadgen::open_slots(&job, SLOTS, H2_CONNECTIONS)
        .await
        .with_context(|| format!("opening connections to {}", c.kind.name()))?;
    let (_, slots) = loadgen::closed_loop(job.clone(), slots, warmup).await;
    Ok((job, slots))
}

/// One path's sample of a round: fresh connections, a closed-loop warm-up, the fixed rate (for
/// the p99), then (through a proxy) the closed loop with the proxies' CPU read around it.
async fn round_sample(
    c: &Chain,
    workload: Workload,
    round: usize,
    rate: u64,
    plan: &Plan,
    hz: f64,
) -> Result<RoundSample> {
    let (job, slots) = warmed_slots(c, workload, plan.warmup).await?;
    let label = format!(
        "round {}, {} req/s",
        round + 1,
        report::thousands(rate as usize)
    );
    let (fixed, slots) = loadgen::fixed_rate(job.clone(), slots, rate, plan.round_measure).await;
    let p99_us = must_have_latency(&fixed, c.kind, workload, &label)?.p99_us;
    let mut sample = RoundSample {
        round,
        workload,
        path: c.kind,
        p99_us,
        req_per_proxy_cpu_s: None,
        user_us_per_req_per_hop: None,
        ok: fixed.ok,
        errors: errors(&fixed),
    };
    if c.kind == PathKind::Direct {
        return Ok(sample);
    }
    let pids = c.pids(workload);
    let cpu0 = procstat::cpu_split(pids)?;
    let (closed, _) = loadgen::closed_loop(job, slots, plan.round_measure).await;
    let used = procstat::cpu_split(pids)?.since(cpu0);
    must_have_latency(
        &closed,
        c.kind,
        workload,
        &format!("round {}, closed loop", round + 1),
    )?;
    let hops = report::proxies_on(c.hops(workload)) as f64;
    sample.req_per_proxy_cpu_s = report::ratio(closed.ok as f64, used.total() as f64 / hz);
    sample.user_us_per_req_per_hop =
        report::ratio(used.user as f64 / hz * 1e6, closed.ok as f64 * hops);
    sample.ok += closed.ok;
    sample.errors.count += closed.errors;
    if sample.errors.first.is_none() {
        sample.errors.first = closed.first_error;
    }
    Ok(sample)
}

/// How one mTLS-cost sample drives its chain.
#[derive(Debug, Clone, Copy)]
enum Drive {
    ClosedLoop,
    FixedRate(u64),
}

impl Drive {
    fn label(self) -> String {
        match self {
            Drive::ClosedLoop => "closed loop".to_owned(),
            Drive::FixedRate(rate) => format!("{} req/s", report::thousands(rate as usize)),
        }
    }
}

/// One or more runs of a workload on one chain, summed.
struct Sample {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
    proxy_cpu_s: f64,
    latency: Histogram<u64>,
}

impl Sample {
    fn empty() -> Sample {
        Sample {
            ok: 0,
            errors: 0,
            first_error: None,
            seconds: 0.0,
            proxy_cpu_s: 0.0,
            latency: loadgen::new_histogram(),
        }
    }

    fn add(&mut self, other: Sample) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.seconds += other.seconds;
        self.proxy_cpu_s += other.proxy_cpu_s;
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency.add(&other.latency);
    }

    fn per_second(&self) -> f64 {
        report::ratio(self.ok as f64, self.seconds).unwrap_or(0.0)
    }

    fn per_cpu_second(&self) -> f64 {
        report::ratio(self.ok as f64, self.proxy_cpu_s).unwrap_or(0.0)
    }

    /// Proxy CPU µs per successful request.
    fn cpu_us_per_request(&self) -> f64 {
        report::ratio(self.proxy_cpu_s * 1e6, self.ok as f64).unwrap_or(0.0)
    }

    fn quantile_us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1_000.0
    }
}

/// One measurement of `workload` on `c`: fresh slots, a closed-loop warm-up on them, then the
/// measured run with the CPU of both proxies read around it.
async fn sample(
    c: &Chain,
    workload: Workload,
    drive: Drive,
    plan: &Plan,
    hz: f64,
) -> Result<Sample> {
    let (job, slots) = warmed_slots(c, workload, plan.warmup).await?;
    let pids = c.pids(workload);
    let cpu0 = procstat::cpu_ticks(pids)?;
    let (stats, _) = match drive {
        Drive::ClosedLoop => loadgen::closed_loop(job, slots, plan.measure).await,
        Drive::FixedRate(rate) => loadgen::fixed_rate(job, slots, rate, plan.measure).await,
    };
    let proxy_cpu_s = procstat::cpu_ticks(pids)?.saturating_sub(cpu0) as f64 / hz;
    if stats.ok == 0 {
        bail!(
            "{} via {} ({}): no successful request ({} errors; first: {})",
            workload.name(),
            c.kind.name(),
            drive.label(),
            stats.errors,
            stats.first_error.as_deref().unwrap_or("none")
        );
    }
    Ok(Sample {
        ok: stats.ok,
        errors: stats.errors,
        first_error: stats.first_error,
        seconds: stats.elapsed.as_secs_f64(),
        proxy_cpu_s,
        latency: stats.latency,
    })
}

/// Pylon plaintext against Pylon with mTLS between its proxies, on the same run: closed-loop
/// throughput and requests per proxy CPU-second (both proxies) for HTTP/1.1 GET, h2c, gRPC and
/// the 64 KiB POST (where encryption is per byte, not per request), and HTTP/1.1 GET latency
/// and CPU per request at the first fixed rate. Each figure alternates the
/// chains (plaintext, mTLS, mTLS, plaintext) and sums both runs of each, so drift in what else
/// the machine does falls on both. The mTLS chain's proxies must have counted its requests as
/// mesh TLS with each other (`/metrics`), or the row fails.
async fn mtls_cost_row(plain: &Chain, mtls: &Chain, plan: &Plan, hz: f64) -> Result<MtlsCost> {
    let ids = mtls
        .identities
        .as_ref()
        .context("the pylon-mtls chain has no identities")?;
    let rate = plan.rates.first().copied().unwrap_or(1_000);
    let specs = [
        (Workload::Http1Get, Drive::ClosedLoop),
        (Workload::H2cGet, Drive::ClosedLoop),
        (Workload::GrpcUnary, Drive::ClosedLoop),
        (Workload::Http1Post64k, Drive::ClosedLoop),
        (Workload::Http1Get, Drive::FixedRate(rate)),
    ];
    let (out0, in0) = mtls.mtls_responses().await?;
    let mut mtls_ok = 0;
    let mut figures = Vec::new();
    let mut first_errors = Vec::new();
    for (workload, drive) in specs {
        let (mut p, mut m) = (Sample::empty(), Sample::empty());
        for (i, on_mtls) in [false, true, true, false].into_iter().enumerate() {
            let (c, into) = if on_mtls {
                (mtls, &mut m)
            } else {
                (plain, &mut p)
            };
            eprintln!(
                "pylon-bench: mTLS cost, {} {} via {} ({}/4)",
                workload.name(),
                drive.label(),
                c.kind.name(),
                i + 1
            );
            into.add(sample(c, workload, drive, plan, hz).await?);
        }
        mtls_ok += m.ok;
        for (side, s) in [("plaintext", &p), ("mTLS", &m)] {
            if let Some(e) = &s.first_error {
                first_errors.push(format!("{} {side}: {e}", workload.name()));
            }
        }
        let errors = (p.errors, m.errors);
        match drive {
            Drive::ClosedLoop => {
                figures.push(MtlsFigure::new(
                    workload,
                    "req/s (closed loop)",
                    p.per_second(),
                    m.per_second(),
                    errors,
                ));
                figures.push(MtlsFigure::new(
                    workload,
                    "req per proxy CPU-s (closed loop)",
                    p.per_cpu_second(),
                    m.per_cpu_second(),
                    errors,
                ));
            }
            Drive::FixedRate(_) => {
                for (q, label) in [(0.50, "p50"), (0.99, "p99")] {
                    figures.push(MtlsFigure::new(
                        workload,
                        format!("{label} µs at {}", drive.label()),
                        p.quantile_us(q),
                        m.quantile_us(q),
                        errors,
                    ));
                }
                figures.push(MtlsFigure::new(
                    workload,
                    format!("proxy CPU µs per request at {}", drive.label()),
                    p.cpu_us_per_request(),
                    m.cpu_us_per_request(),
                    errors,
                ));
            }
        }
    }
    let (out1, in1) = mtls.mtls_responses().await?;
    let (out_n, in_n) = (out1.saturating_sub(out0), in1.saturating_sub(in0));
    if out_n < mtls_ok || in_n < mtls_ok {
        bail!(
            "the pylon-mtls chain is not mTLS end to end: {mtls_ok} requests succeeded through it, \
             but its outbound proxy counted {out_n} responses with tls=\"true\",server_id=\"{}\" \
             and its inbound proxy {in_n} with tls=\"true\",client_id=\"{}\"",
            ids.server,
            ids.client
        );
    }
    let mut summary = format!(
        "Pylon's two-proxy chain with mesh identities (a throwaway CA in the run's temp dir; \
         `--identity-dir` on both proxies; the EndpointSlice annotated `pylon.io/identity`: \
         TLS 1.3 between the proxies) against the plaintext chain. Each figure alternates the \
         chains (plaintext, mTLS, mTLS, plaintext; {:.1} s each after a {:.1} s warm-up on fresh \
         connections) and sums both runs of each; proxy CPU is both proxies' utime+stime. \
         Checked on the proxies' /metrics: over the mTLS runs the outbound proxy counted {out_n} \
         responses with tls=\"true\",server_id=\"{}\" and the inbound proxy {in_n} with \
         client_id=\"{}\" ({mtls_ok} measured requests, plus warm-ups). Between mTLS proxies \
         HTTP/1.1 travels as HTTP/2 (l5d-orig-proto, every request on the endpoint's one h2 \
         connection; plaintext Pylon keeps HTTP/1.1 on pooled connections), so the HTTP/1.1 \
         ratios are TLS plus that change of protocol; h2c and gRPC are h2 between the proxies \
         either way, so theirs are TLS alone. No handshake is in these figures: the proxies keep \
         their connection, and a new load-generator connection per request ends at the outbound \
         proxy without making a new TLS connection to the inbound one.",
        plan.measure.as_secs_f64(),
        plan.warmup.as_secs_f64(),
        ids.server,
        ids.client,
    );
    if !first_errors.is_empty() {
        summary.push_str(&format!(" First errors: {}.", first_errors.join("; ")));
    }
    Ok(MtlsCost { summary, figures })
}

/// Linkerd's tap samples 100 requests per second by default, as Pylon's does.
fn pylon_tap_default_rps() -> u32 {
    100
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn errors(s: &RunStats) -> Errors {
    Errors {
        count: s.errors,
        first: s.first_error.clone(),
    }
}

/// A run without a single successful request has no numbers to print: fail loudly.
fn must_have_latency(
    s: &RunStats,
    path: PathKind,
    workload: Workload,
    what: &str,
) -> Result<report::Percentiles> {
    report::percentiles(&s.latency).with_context(|| {
        format!(
            "{} via {} ({what}): no successful request ({} errors; first: {})",
            workload.name(),
            path.name(),
            s.errors,
            s.first_error.as_deref().unwrap_or("none")
        )
    })
}

fn write_results(dir: &Path, report: &Report, md: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(report).context("serializing the report")?;
    let stamp = report.date_utc.replace(':', "");
    let files = [
        ("latest.md".to_owned(), md),
        ("latest.json".to_owned(), json.as_str()),
        (format!("{stamp}-{}.md", report.mode), md),
        (format!("{stamp}-{}.json", report.mode), json.as_str()),
    ];
    for (name, content) in files {
        let path = dir.join(&name);
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "pylon-bench: results in {}",
        dir.join("latest.md").display()
    );
    Ok(())
}
