//! The demo's client workload: calls `POST http://ml-inference.default.svc.cluster.local/predict`
//! through the outbound proxy (origin-form with that `Host`, as a workload with an HTTP proxy
//! setting would) at a steady rate, bounded in count, concurrency and time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{interval, timeout, Instant, MissedTickBehavior};

/// Requests in flight at most; beyond that the generator skips (and counts) sends rather than
/// queueing without bound when the mesh is slow.
const MAX_IN_FLIGHT: usize = 256;
/// Each request's deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long stopping waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest response body read.
const MAX_RESPONSE_BODY: usize = 64 * 1024;
/// The header on responses the proxy generated itself.
const PROXY_ERROR_HEADER: &str = "pylon-proxy-error";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What the load generator saw, from the client's side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub sent: u64,
    /// 2xx responses.
    pub succeeded: u64,
    /// Non-2xx responses from the app.
    pub failed: u64,
    /// Non-2xx responses the proxy made itself (`pylon-proxy-error`).
    pub proxy_errors: u64,
    /// No response: connection errors and timeouts.
    pub transport_errors: u64,
    /// Sends skipped because `MAX_IN_FLIGHT` requests were outstanding.
    pub skipped: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    proxy_errors: AtomicU64,
    transport_errors: AtomicU64,
    skipped: AtomicU64,
}

impl Counters {
    fn report(&self) -> LoadReport {
        LoadReport {
            sent: self.sent.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            proxy_errors: self.proxy_errors.load(Ordering::Relaxed),
            transport_errors: self.transport_errors.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }
}

/// Where and how fast to send.
#[derive(Clone, Debug)]
pub struct LoadPlan {
    /// The outbound proxy's listener.
    pub proxy: SocketAddr,
    /// `Host` of the requests: the logical destination.
    pub authority: String,
    pub path: String,
    pub requests_per_second: u32,
    /// Hard cap on requests sent.
    pub max_requests: u64,
}

/// A running load generator.
pub struct LoadGenerator {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    counters: Arc<Counters>,
}

impl LoadGenerator {
    pub fn start(plan: LoadPlan) -> LoadGenerator {
        let (stop, stopped) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(generate(plan, counters.clone(), stopped));
        LoadGenerator {
            stop,
            task,
            counters,
        }
    }

    /// Stops sending, waits (bounded) for requests in flight, and reports.
    pub async fn stop(self) -> LoadReport {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if timeout(DRAIN_TIMEOUT + Duration::from_secs(1), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        self.counters.report()
    }
}

/// Sends one probe through the proxy; `Ok(status)` if it answered.
pub async fn probe(plan: &LoadPlan) -> Result<StatusCode> {
    let client = client();
    let (status, _) = send(&client, plan).await?;
    Ok(status)
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build_http()
}

async fn generate(plan: LoadPlan, counters: Arc<Counters>, mut stopped: watch::Receiver<bool>) {
    let client = client();
    let rps = f64::from(plan.requests_per_second.max(1));
    // Tick at the request interval, but no faster than every 5 ms; each tick sends however many
    // requests are due, so high rates don't depend on timer resolution.
    let period = Duration::from_secs_f64(1.0 / rps).max(Duration::from_millis(5));
    let mut ticker = interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut in_flight = JoinSet::new();
    let plan = Arc::new(plan);
    let started = Instant::now();
    let mut scheduled: u64 = 0;

    'sending: while scheduled < plan.max_requests {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped.changed() => break,
        }
        if *stopped.borrow() {
            break;
        }
        while in_flight.try_join_next().is_some() {}
        // Requests due by now (the first one at once), at most one second's worth per tick.
        let due = (started.elapsed().as_secs_f64() * rps) as u64 + 1;
        let burst = due.saturating_sub(scheduled).min(rps as u64);
        for _ in 0..burst {
            if scheduled >= plan.max_requests {
                break 'sending;
            }
            scheduled += 1;
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                counters.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (client, plan, counters) = (client.clone(), plan.clone(), counters.clone());
            in_flight.spawn(async move {
                counters.sent.fetch_add(1, Ordering::Relaxed);
                let counter = match send(&client, &plan).await {
                    Ok((status, _)) if status.is_success() => &counters.succeeded,
                    Ok((_, true)) => &counters.proxy_errors,
                    Ok((_, false)) => &counters.failed,
                    Err(_) => &counters.transport_errors,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                drop(slot);
            });
        }
    }
    // Let requests in flight finish so their responses are counted, within bounds.
    let drained = timeout(DRAIN_TIMEOUT, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        in_flight.abort_all();
    }
}

/// One request: `(status, generated by the proxy)`.
async fn send(client: &HttpClient, plan: &LoadPlan) -> Result<(StatusCode, bool)> {
    let body = json!({ "model": "ml-inference", "inputs": [[0.12, 0.5, 0.33, 0.9]] }).to_string();
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}{}", plan.proxy, plan.path))
        .header(HOST, &plan.authority)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .context("building the request")?;
    let exchange = async {
        let response = client.request(req).await?;
        let status = response.status();
        let from_proxy = response.headers().contains_key(PROXY_ERROR_HEADER);
        Limited::new(response.into_body(), MAX_RESPONSE_BODY)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the response: {e}"))?;
        Ok::<_, anyhow::Error>((status, from_proxy))
    };
    timeout(REQUEST_TIMEOUT, exchange)
        .await
        .context("timed out")?
}
