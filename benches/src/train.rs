//! `pylon-bench train`: the traffic a profile-guided build of pylon-proxy learns from
//! (`scripts/build-release-proxy` runs it against a `-Cprofile-generate` build, then builds again
//! with what it recorded).
//!
//! Why it is broad rather than the bench's measured runs alone: LLVM takes code a training run
//! never reached for cold, and optimises it for size, so a path left out here would be slower
//! than in an ordinary build. So every kind of traffic the proxy carries goes through it:
//! - the bench's chain (outbound -> inbound -> app), plaintext and with mesh mTLS between the
//!   proxies, one worker thread and two (the current-thread and the work-stealing schedulers);
//! - every workload (HTTP/1.1 GET and 64 KiB POST, h2c, gRPC, opaque TCP), one request at a
//!   time and eight;
//! - a ServiceProfile with routes, a timeout and retries (route matching, route metrics, the
//!   retry budget), a second endpoint (the balancer's choice between two), and a tap reading
//!   every request (tap events are built only while tapped);
//! - requests the app answers with errors and requests for paths no route matches.
//!
//! Each step checks what it needs to have happened (no failed request, the route metrics
//! present), so a training run that silently stopped exercising a path fails the build instead.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::chain::{self, Chain, Setup};
use crate::loadgen::{self, Job, Workload};
use crate::procs;
use crate::tap::Taps;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// The instrumented pylon-proxy (built with `-Cprofile-generate`).
    #[arg(long)]
    pylon_bin: PathBuf,
    /// Requests per workload, concurrency and path.
    #[arg(long, default_value_t = 3000)]
    requests: u64,
}

/// Longest any one run may take (an instrumented proxy is slower, but not this slow).
const RUN_LIMIT: Duration = Duration::from_secs(120);
const NOFILE: u64 = 4096;
/// How long a proxy may take to drain (its grace is 1 s) and write its counts.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Routes for every path the bench's app serves, the GET's retryable under a budget.
const SERVICE_PROFILE: &str = "apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata:
  name: bench.default.svc.cluster.local
  namespace: default
spec:
  routes:
  - name: GET /small
    condition:
      method: GET
      pathRegex: /small
    isRetryable: true
    timeout: 10s
  - name: GET /fail
    condition:
      method: GET
      pathRegex: /fail
    isRetryable: true
  - name: POST /upload
    condition:
      method: POST
      pathRegex: /upload
    responseClasses:
    - condition:
        status:
          min: 500
      isFailure: true
  - name: gRPC Unary
    condition:
      method: POST
      pathRegex: /bench\\.Bench/Unary
  retryBudget:
    retryRatio: 0.2
    minRetriesPerSecond: 10
    ttl: 10s
";

pub async fn main(o: Options) -> Result<()> {
    procs::raise_nofile(NOFILE).context("raising the open-file limit")?;
    let dir = tempfile::Builder::new()
        .prefix("pylon-train-")
        .tempdir()
        .context("creating the training's temp dir")?;
    let (app, _app_process) = chain::start_app(None, dir.path())?;
    for (threads, mtls) in [(1, false), (2, true)] {
        let setup = Setup {
            app,
            threads,
            nofile: NOFILE,
            proxy_cpus: None,
            dir: dir.path(),
            pylon_bin: &o.pylon_bin,
        };
        let mut c = if mtls {
            chain::pylon_mtls(&setup)?
        } else {
            chain::pylon(&setup)?
        };
        c.verify().await?;
        let name = c.kind.name();
        eprintln!("pylon-bench train: {name}, {threads} thread(s): every workload");
        every_workload(&c, o.requests).await?;

        eprintln!("pylon-bench train: {name}: with a ServiceProfile and a tap");
        let mesh = c
            .mesh_dir
            .clone()
            .context("a Pylon chain has a config dir")?;
        std::fs::write(mesh.join("profile.yaml"), SERVICE_PROFILE)
            .context("writing the training's ServiceProfile")?;
        wait_for_routes(&c).await?;
        std::fs::write(mesh.join("app-slice.yaml"), app_slice(app.http))
            .context("writing the training's second EndpointSlice")?;
        wait_for_two_endpoints(&c).await?;
        let taps = Taps::open(&c.tap_addrs, u32::MAX).await?;
        every_workload(&c, o.requests).await?;
        let tapped = taps.close();
        if tapped == 0 {
            bail!("the tap on {name} saw no request");
        }
        errors_and_unrouted(&c, o.requests).await?;
        // SIGTERM: the proxies drain and exit, which is when an instrumented binary writes its
        // counts; one killed instead would leave them out, so that fails the training.
        c.stop(STOP_GRACE)?;
    }
    Ok(())
}

async fn every_workload(c: &Chain, requests: u64) -> Result<()> {
    for workload in Workload::ALL {
        let Ok(target) = c.target(workload) else {
            continue;
        };
        for concurrency in [1, 8] {
            let job = Job::new(workload, target.clone());
            let slots = loadgen::open_slots(&job, concurrency, 1).await?;
            let (stats, _) = loadgen::closed_loop_counted(job, slots, RUN_LIMIT, requests).await;
            if stats.errors > 0 || stats.ok < requests {
                bail!(
                    "{} via {}: {} of {requests} answered, {} failed (first: {})",
                    workload.name(),
                    c.kind.name(),
                    stats.ok,
                    stats.errors,
                    stats.first_error.as_deref().unwrap_or("none")
                );
            }
        }
    }
    Ok(())
}

/// Waits until the outbound proxy has loaded the ServiceProfile: its route metrics name the
/// GET's route once a GET has gone through it.
async fn wait_for_routes(c: &Chain) -> Result<()> {
    let outbound_admin = *c
        .admin_addrs
        .first()
        .context("the chain has no admin address")?;
    let job = Job::new(
        Workload::Http1Get,
        c.target(Workload::Http1Get).map_err(anyhow::Error::msg)?,
    );
    wait_until(
        "the outbound proxy never routed by the training's ServiceProfile",
        async || {
            loadgen::verify(&job).await?;
            let metrics = chain::fetch_metrics(outbound_admin).await?;
            Ok(metrics.contains("rt_route=\"GET /small\""))
        },
    )
    .await
}

/// Probes until `ready` says so, every 200 ms, for at most [`RUN_LIMIT`]; then fails with `what`.
async fn wait_until(what: &str, mut ready: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + RUN_LIMIT;
    while !ready().await? {
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A second EndpointSlice of the bench's Service: the app itself, without a proxy in front (and
/// so without mesh TLS), beside the inbound proxy.
fn app_slice(app: SocketAddr) -> String {
    chain::render_endpoint_slice("bench-2", app, None)
}

/// Waits until the outbound proxy balances over both endpoints: of a batch of GETs, some no
/// longer reach the inbound proxy.
async fn wait_for_two_endpoints(c: &Chain) -> Result<()> {
    const BATCH: u64 = 50;
    let inbound_admin = *c
        .admin_addrs
        .last()
        .context("the chain has no admin address")?;
    let job = Job::new(
        Workload::Http1Get,
        c.target(Workload::Http1Get).map_err(anyhow::Error::msg)?,
    );
    wait_until(
        "the outbound proxy never balanced over the training's second endpoint",
        async || {
            let before = inbound_requests(inbound_admin).await?;
            for _ in 0..BATCH {
                loadgen::verify(&job).await?;
            }
            Ok(inbound_requests(inbound_admin).await? - before < BATCH)
        },
    )
    .await
}

/// The inbound proxy's `request_total`, every series summed.
async fn inbound_requests(admin: SocketAddr) -> Result<u64> {
    Ok(inbound_request_total(&chain::fetch_metrics(admin).await?))
}

fn inbound_request_total(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("request_total{") && l.contains("direction=\"inbound\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Responses the app fails (retried, within the budget) and requests no route matches: the
/// failure classification's, the retries' and the route fallback's paths.
async fn errors_and_unrouted(c: &Chain, requests: u64) -> Result<()> {
    let target = c.target(Workload::Http1Get).map_err(anyhow::Error::msg)?;
    let stream = tokio::net::TcpStream::connect(target.addr)
        .await
        .with_context(|| format!("connecting to {}", target.addr))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    let conn = tokio::spawn(conn);
    for (path, want) in [
        ("/fail", StatusCode::INTERNAL_SERVER_ERROR),
        ("/no-route-for-this", StatusCode::NOT_FOUND),
    ] {
        for _ in 0..requests / 10 {
            let req = Request::get(path)
                .header(http::header::HOST, &target.authority)
                .body(Empty::<Bytes>::new())
                .context("building a request")?;
            let rsp = sender
                .send_request(req)
                .await
                .context("sending a request")?;
            let status = rsp.status();
            rsp.into_body()
                .collect()
                .await
                .context("reading a response")?;
            if status != want {
                bail!("GET {path} via {}: {status}, not {want}", c.kind.name());
            }
        }
    }
    drop(sender);
    let _ = conn.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_requests_sum_every_inbound_series_and_nothing_else() {
        let metrics = "# TYPE request_total counter
request_total{direction=\"inbound\",authority=\"a\",tls=\"true\"} 40
request_total{direction=\"inbound\",authority=\"b\",tls=\"false\"} 2
request_total{direction=\"outbound\",authority=\"a\"} 99
response_total{direction=\"inbound\",authority=\"a\"} 7
";
        assert_eq!(inbound_request_total(metrics), 42);
    }

    #[test]
    fn the_second_slice_names_the_app_under_the_bench_service() {
        let slice = app_slice("127.0.0.1:8123".parse().unwrap());
        assert!(
            slice.contains("kubernetes.io/service-name: bench\n"),
            "{slice}"
        );
        assert!(slice.contains("port: 8123\n"), "{slice}");
        assert!(slice.contains("- \"127.0.0.1\"\n"), "{slice}");
    }
}
