//! The load generator: HTTP/1.1 (one keep-alive connection per slot), h2c (slots multiplexed
//! over a few connections), gRPC unary over h2c, a 64 KiB HTTP/1.1 POST, and a TCP echo.
//!
//! Two modes:
//! - [`closed_loop`]: every slot sends back-to-back for a fixed time (maximum throughput);
//! - [`fixed_rate`]: open loop at a constant rate. A pacer thread (1 µs timer slack) emits each
//!   request's *intended* send time; a free slot sends it, and latency is `done - intended`, so a
//!   stall delays and counts against every request scheduled behind it (no coordinated omission).
//!   In-flight requests are bounded by the number of slots; a request that found no free slot is
//!   counted as `late` (it waited, and its wait is in its latency).
//!
//! Public tools don't cover this: wrk2 is not packaged, wrk and h2load have no CO-corrected fixed
//! rate for h2/gRPC/TCP, and `oha` needs a long `cargo install` on 2 cores.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};

use crate::app::{grpc_frame, GRPC_PATH, GRPC_REPLY, SMALL_BODY};

/// Longest a single request may take before it counts as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a fixed-rate run may overrun its schedule before the rest is counted as unsent.
pub const OVERRUN_GRACE: Duration = Duration::from_secs(5);
/// Bytes written (and read back) per TCP echo request.
pub const ECHO_BYTES: usize = 128;
/// Body size of the POST workload.
pub const POST_BYTES: usize = 64 * 1024;
/// Upper bound on the requests of any single closed-loop run.
pub const MAX_CLOSED_LOOP_REQUESTS: u64 = 20_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    Http1Get,
    H2cGet,
    GrpcUnary,
    Http1Post64k,
    TcpEcho,
    /// As `Http1Get`, the response with a typical head (`app::TYPICAL_HEADERS`): for
    /// `benches/profile.py`, not in [`Workload::ALL`] (the load bench's workloads).
    Http1GetHeaders,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Http1Get,
        Workload::H2cGet,
        Workload::GrpcUnary,
        Workload::Http1Post64k,
        Workload::TcpEcho,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Http1Get => "HTTP/1.1 GET (64 B body)",
            Workload::H2cGet => "h2c GET (64 B body)",
            Workload::GrpcUnary => "gRPC unary (h2c)",
            Workload::Http1Post64k => "HTTP/1.1 POST 64 KiB",
            Workload::TcpEcho => "opaque TCP echo (128 B)",
            Workload::Http1GetHeaders => "HTTP/1.1 GET (64 B body, 10 response headers)",
        }
    }

    /// Multiplexed over a few h2 connections.
    pub fn is_h2(self) -> bool {
        matches!(self, Workload::H2cGet | Workload::GrpcUnary)
    }
}

/// Where requests go and what they say.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host` / `:authority`.
    pub authority: String,
}

/// A workload against a target, with its request bodies built once.
pub struct Job {
    pub workload: Workload,
    pub target: Target,
    post_body: Bytes,
    grpc_body: Bytes,
    grpc_reply: Bytes,
    echo: Vec<u8>,
}

impl Job {
    pub fn new(workload: Workload, target: Target) -> Arc<Job> {
        Arc::new(Job {
            workload,
            target,
            post_body: Bytes::from(vec![b'x'; POST_BYTES]),
            grpc_body: grpc_frame(b"unary request 18B"),
            grpc_reply: grpc_frame(GRPC_REPLY),
            echo: (0..ECHO_BYTES).map(|i| (i % 251) as u8).collect(),
        })
    }

    fn http_request(&self) -> Result<Request<Full<Bytes>>> {
        let authority = &self.target.authority;
        let (method, path, body) = match self.workload {
            Workload::Http1Get | Workload::H2cGet => (Method::GET, "/small", Bytes::new()),
            Workload::Http1GetHeaders => (Method::GET, "/headers", Bytes::new()),
            Workload::Http1Post64k => (Method::POST, "/upload", self.post_body.clone()),
            Workload::GrpcUnary => (Method::POST, GRPC_PATH, self.grpc_body.clone()),
            Workload::TcpEcho => bail!("TCP echo has no HTTP request"),
        };
        let mut builder = Request::builder().method(method);
        builder = if self.workload.is_h2() {
            // h2 takes :scheme and :authority from an absolute URI.
            builder.uri(format!("http://{authority}{path}"))
        } else {
            builder
                .uri(path)
                .header(http::header::HOST, authority.as_str())
        };
        if self.workload == Workload::GrpcUnary {
            builder = builder
                .header(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                )
                .header(http::header::TE, HeaderValue::from_static("trailers"));
        }
        builder
            .body(Full::new(body))
            .context("building the request")
    }

    /// Is this the answer the app gives?
    fn check(
        &self,
        status: StatusCode,
        body: &[u8],
        trailers: Option<&http::HeaderMap>,
    ) -> Result<()> {
        if status != StatusCode::OK {
            let proxy_error = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            bail!("status {status} (body {proxy_error:?})");
        }
        match self.workload {
            Workload::Http1Get | Workload::H2cGet | Workload::Http1GetHeaders => {
                if body != SMALL_BODY {
                    bail!("body of {} bytes is not the app's", body.len());
                }
            }
            Workload::Http1Post64k => {
                if body != POST_BYTES.to_string().as_bytes() {
                    bail!(
                        "app saw {:?} bytes of the {POST_BYTES}-byte body",
                        String::from_utf8_lossy(body)
                    );
                }
            }
            Workload::GrpcUnary => {
                if body != self.grpc_reply.as_ref() {
                    bail!("gRPC reply of {} bytes is not the app's", body.len());
                }
                let status = trailers
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok());
                if status != Some("0") {
                    bail!("grpc-status {status:?} in trailers, expected \"0\"");
                }
            }
            Workload::TcpEcho => {}
        }
        Ok(())
    }
}

/// One open connection of a workload.
enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
    Tcp(TcpStream, Vec<u8>),
}

async fn dial(addr: SocketAddr) -> Result<TcpStream> {
    let stream = timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr}: timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    Ok(stream)
}

impl Conn {
    async fn connect(job: &Job) -> Result<Conn> {
        let stream = dial(job.target.addr).await?;
        Ok(match job.workload {
            Workload::TcpEcho => Conn::Tcp(stream, vec![0; ECHO_BYTES]),
            w if w.is_h2() => {
                let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .context("h2 handshake")?;
                tokio::spawn(conn);
                Conn::H2(send)
            }
            _ => {
                let (send, conn) = http1::handshake(TokioIo::new(stream))
                    .await
                    .context("HTTP/1.1 handshake")?;
                tokio::spawn(conn);
                Conn::H1(send)
            }
        })
    }

    async fn request(&mut self, job: &Job) -> Result<()> {
        let response = match self {
            Conn::Tcp(stream, buf) => {
                stream.write_all(&job.echo).await.context("writing")?;
                stream.read_exact(buf).await.context("reading the echo")?;
                if *buf != job.echo {
                    bail!("echo differs from what was sent");
                }
                return Ok(());
            }
            Conn::H1(send) => {
                send.ready().await.context("connection closed")?;
                send.send_request(job.http_request()?).await
            }
            Conn::H2(send) => {
                send.ready().await.context("connection closed")?;
                send.send_request(job.http_request()?).await
            }
        };
        let (parts, body) = response.context("sending the request")?.into_parts();
        let body = body.collect().await.context("reading the response body")?;
        let trailers = body.trailers().cloned();
        job.check(parts.status, &body.to_bytes(), trailers.as_ref())
    }

    /// Whether the connection can carry another request after an error.
    fn usable(&self) -> bool {
        match self {
            Conn::Tcp(..) => false,
            Conn::H1(s) => !s.is_closed(),
            Conn::H2(s) => !s.is_closed(),
        }
    }
}

/// One unit of concurrency: a connection (or an h2 stream slot), redialled after it breaks.
pub struct Slot {
    conn: Option<Conn>,
}

impl Slot {
    async fn request(&mut self, job: &Job) -> Result<()> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => self.conn.insert(Conn::connect(job).await?),
        };
        let result = match timeout(REQUEST_TIMEOUT, conn.request(job)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}")),
        };
        if result.is_err() && !conn.usable() {
            self.conn = None;
        }
        result
    }
}

/// Opens `slots` slots: one connection each, or for h2 workloads `h2_connections` connections
/// shared round-robin.
pub async fn open_slots(job: &Job, slots: usize, h2_connections: usize) -> Result<Vec<Slot>> {
    let mut out = Vec::with_capacity(slots);
    if job.workload.is_h2() {
        let mut conns = Vec::new();
        for _ in 0..h2_connections.max(1) {
            match Conn::connect(job).await? {
                Conn::H2(s) => conns.push(s),
                _ => bail!("expected an h2 connection"),
            }
        }
        for i in 0..slots {
            out.push(Slot {
                conn: Some(Conn::H2(conns[i % conns.len()].clone())),
            });
        }
    } else {
        for _ in 0..slots {
            out.push(Slot {
                conn: Some(Conn::connect(job).await?),
            });
        }
    }
    Ok(out)
}

/// Sends one request on a new connection: the check that a path works before it is measured.
pub async fn verify(job: &Job) -> Result<()> {
    let mut slot = Slot { conn: None };
    slot.request(job).await
}

/// What one run measured. Latencies are in nanoseconds.
pub struct RunStats {
    pub latency: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Fixed rate only: requests that found every slot busy and waited for one.
    pub late: u64,
    /// Fixed rate only: scheduled requests not sent before the run's deadline.
    pub unsent: u64,
    pub elapsed: Duration,
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 60 s at 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

impl RunStats {
    fn new() -> Self {
        RunStats {
            latency: new_histogram(),
            ok: 0,
            errors: 0,
            first_error: None,
            late: 0,
            unsent: 0,
            elapsed: Duration::ZERO,
        }
    }

    fn record(&mut self, result: &Result<()>, latency: Duration) {
        match result {
            Ok(()) => {
                self.ok += 1;
                self.latency.saturating_record(
                    u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1),
                );
            }
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{e:#}"));
                }
            }
        }
    }

    fn merge(&mut self, other: RunStats) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        self.errors += other.errors;
        self.late += other.late;
        self.unsent += other.unsent;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// Successful requests per second of wall time.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }
}

/// Every slot sends back-to-back for `duration`.
pub async fn closed_loop(
    job: Arc<Job>,
    slots: Vec<Slot>,
    duration: Duration,
) -> (RunStats, Vec<Slot>) {
    closed_loop_counted(job, slots, duration, MAX_CLOSED_LOOP_REQUESTS).await
}

/// Every slot sends back-to-back until `requests` have been sent (failed ones included) or
/// `duration` has passed, whichever comes first.
pub async fn closed_loop_counted(
    job: Arc<Job>,
    slots: Vec<Slot>,
    duration: Duration,
    requests: u64,
) -> (RunStats, Vec<Slot>) {
    let start = Instant::now();
    let end = start + duration;
    let budget = Arc::new(AtomicU64::new(requests));
    let mut tasks = Vec::with_capacity(slots.len());
    for mut slot in slots {
        let job = job.clone();
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = RunStats::new();
            // checked_sub: a spent budget stays at zero instead of wrapping to u64::MAX.
            while Instant::now() < end
                && budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            {
                let t0 = Instant::now();
                let result = slot.request(&job).await;
                stats.record(&result, t0.elapsed());
                if result.is_err() {
                    // Don't spin on a path that is down.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            (stats, slot)
        }));
    }
    let mut total = RunStats::new();
    let mut back = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok((stats, slot)) => {
                total.merge(stats);
                back.push(slot);
            }
            Err(e) => {
                total.errors += 1;
                total
                    .first_error
                    .get_or_insert_with(|| format!("load task failed: {e}"));
            }
        }
    }
    total.elapsed = start.elapsed();
    (total, back)
}

/// `pylon-bench send`: a counted run rather than a timed one.
#[derive(Debug, clap::Args)]
pub struct SendOptions {
    #[arg(long, value_enum)]
    pub workload: Workload,
    /// Where to send (a proxy's listener).
    #[arg(long)]
    pub to: SocketAddr,
    /// `Host` / `:authority`.
    #[arg(long, default_value = "app")]
    pub authority: String,
    #[arg(long)]
    pub requests: u64,
    /// Requests in flight at once: streams of one connection for h2 workloads, else
    /// connections.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
}

pub async fn send(o: SendOptions) -> Result<()> {
    let job = Job::new(
        o.workload,
        Target {
            addr: o.to,
            authority: o.authority,
        },
    );
    let slots = open_slots(&job, o.concurrency.max(1), 1).await?;
    let left = Arc::new(AtomicU64::new(o.requests));
    let mut tasks = Vec::with_capacity(slots.len());
    for mut slot in slots {
        let (job, left) = (job.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                slot.request(&job).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await.context("a sending task failed")??;
    }
    Ok(())
}

/// Open loop: `rate` requests per second for `duration`, latency from each intended send time.
pub async fn fixed_rate(
    job: Arc<Job>,
    slots: Vec<Slot>,
    rate: u64,
    duration: Duration,
) -> (RunStats, Vec<Slot>) {
    let n_slots = slots.len();
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = Instant::now() + Duration::from_millis(5);
    let deadline = start + duration + OVERRUN_GRACE;

    // The pacer: a plain thread with a fine timer, so sends are not rounded to tokio's 1 ms
    // timer wheel.
    let (tick_tx, mut tick_rx) = mpsc::unbounded_channel::<Instant>();
    let stop = Arc::new(AtomicBool::new(false));
    let pacer = {
        let stop = stop.clone();
        let start = start.into_std();
        std::thread::spawn(move || {
            set_fine_timer_slack();
            for i in 0..total {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let at = start + interval.mul_f64(i as f64);
                let now = std::time::Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                if tick_tx.send(Instant::from_std(at)).is_err() {
                    break;
                }
            }
        })
    };

    let (idle_tx, mut idle_rx) = mpsc::channel::<Slot>(n_slots.max(1));
    for slot in slots {
        // The channel holds every slot, so this cannot fail.
        let _ = idle_tx.try_send(slot);
    }
    let stats = Arc::new(Mutex::new(RunStats::new()));
    let mut dispatched = 0u64;
    let mut late = 0u64;
    while let Ok(Some(intended)) = timeout_at(deadline, tick_rx.recv()).await {
        let mut slot = match idle_rx.try_recv() {
            Ok(s) => s,
            Err(_) => {
                late += 1;
                match timeout_at(deadline, idle_rx.recv()).await {
                    Ok(Some(s)) => s,
                    _ => break,
                }
            }
        };
        dispatched += 1;
        let job = job.clone();
        let stats = stats.clone();
        let idle_tx = idle_tx.clone();
        tokio::spawn(async move {
            let result = slot.request(&job).await;
            let latency = Instant::now().saturating_duration_since(intended);
            if let Ok(mut s) = stats.lock() {
                s.record(&result, latency);
            }
            let _ = idle_tx.send(slot).await;
        });
    }
    stop.store(true, Ordering::Relaxed);
    drop(tick_rx);
    let _ = pacer.join();

    // Wait for the requests in flight (each bounded by REQUEST_TIMEOUT) and take the slots back.
    let mut back = Vec::with_capacity(n_slots);
    let collect_deadline = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(1);
    while back.len() < n_slots {
        match timeout_at(collect_deadline, idle_rx.recv()).await {
            Ok(Some(s)) => back.push(s),
            _ => break,
        }
    }
    let elapsed = start.elapsed();
    let mut out = match Arc::try_unwrap(stats) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(shared) => {
            // A request still in flight holds a reference: copy what we have.
            let s = shared.lock().unwrap_or_else(|p| p.into_inner());
            let mut copy = RunStats::new();
            let _ = copy.latency.add(&s.latency);
            copy.ok = s.ok;
            copy.errors = s.errors + (n_slots - back.len()) as u64;
            copy.first_error = s.first_error.clone();
            copy
        }
    };
    out.late = late;
    out.unsent = total - dispatched;
    out.elapsed = elapsed;
    (out, back)
}

fn set_fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only affects this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// Connections held open for the memory measurement.
pub struct IdleConnections {
    pub streams: Vec<TcpStream>,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Opens `n` HTTP/1.1 keep-alive connections to `target`, sends one `GET /small` on each and
/// reads its answer, then leaves them idle (held until the result is dropped). Opens at most
/// `parallel` at once.
pub async fn open_idle_connections(target: &Target, n: usize, parallel: usize) -> IdleConnections {
    let mut out = IdleConnections {
        streams: Vec::with_capacity(n),
        errors: 0,
        first_error: None,
    };
    let request = format!(
        "GET /small HTTP/1.1\r\nHost: {}\r\nUser-Agent: pylon-bench\r\n\r\n",
        target.authority
    );
    let mut set = tokio::task::JoinSet::new();
    let mut started = 0;
    while started < n || !set.is_empty() {
        while started < n && set.len() < parallel.max(1) {
            let addr = target.addr;
            let request = request.clone();
            set.spawn(async move {
                timeout(REQUEST_TIMEOUT, one_get(addr, request))
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}"))
                    })
            });
            started += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(stream))) => out.streams.push(stream),
            Some(Ok(Err(e))) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Some(Err(e)) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
            }
            None => {}
        }
    }
    out
}

async fn one_get(addr: SocketAddr, request: String) -> Result<TcpStream> {
    let mut stream = dial(addr).await?;
    // Close with RST when dropped: 10,000 sockets in TIME_WAIT would crowd the port range.
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .context("setting SO_LINGER")?;
    stream
        .write_all(request.as_bytes())
        .await
        .context("writing")?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await.context("reading")?;
        if n == 0 {
            bail!("connection closed before a full response");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head) = parse_response_head(&buf)? {
            if head.status != 200 {
                bail!("status {}", head.status);
            }
            if buf.len() >= head.head_len + head.content_length {
                return Ok(stream);
            }
        }
    }
}

/// The parts of an HTTP/1.1 response head the idle-connection opener needs.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub content_length: usize,
    /// Bytes up to and including the blank line.
    pub head_len: usize,
}

/// `Ok(None)` while the head is incomplete.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    if !parts.next().unwrap_or_default().starts_with("HTTP/1.") {
        bail!("not an HTTP/1 response: {status_line:?}");
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status code in {status_line:?}"))?;
    let mut content_length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                content_length = Some(
                    value
                        .trim()
                        .parse()
                        .with_context(|| format!("bad content-length {value:?}"))?,
                );
            } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
                bail!("chunked responses are not expected from the app");
            }
        }
    }
    Ok(Some(ResponseHead {
        status,
        content_length: content_length.context("response has no content-length")?,
        head_len: end + 4,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response_head() {
        let buf = b"HTTP/1.1 200 OK\r\ncontent-length: 64\r\ndate: x\r\n\r\nbody";
        let head = parse_response_head(buf).expect("valid").expect("complete");
        assert_eq!(
            head,
            ResponseHead {
                status: 200,
                content_length: 64,
                head_len: buf.len() - 4
            }
        );
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\ncontent-le")
            .expect("valid so far")
            .is_none());
        assert!(parse_response_head(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }

    #[test]
    fn checks_answers() {
        let job = Job::new(
            Workload::GrpcUnary,
            Target {
                addr: "127.0.0.1:1".parse().expect("addr"),
                authority: "bench".into(),
            },
        );
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let reply = grpc_frame(GRPC_REPLY);
        assert!(job.check(StatusCode::OK, &reply, Some(&trailers)).is_ok());
        assert!(job.check(StatusCode::OK, &reply, None).is_err());
        assert!(job
            .check(StatusCode::BAD_GATEWAY, &reply, Some(&trailers))
            .is_err());

        let get = Job::new(Workload::Http1Get, job.target.clone());
        assert!(get.check(StatusCode::OK, SMALL_BODY, None).is_ok());
        assert!(get.check(StatusCode::OK, b"short", None).is_err());
        let req = get.http_request().expect("request");
        assert_eq!(req.uri(), "/small");
        assert_eq!(req.headers()[http::header::HOST], "bench");
        let headers = Job::new(Workload::Http1GetHeaders, job.target.clone());
        assert_eq!(headers.http_request().expect("request").uri(), "/headers");
        assert!(headers.check(StatusCode::OK, SMALL_BODY, None).is_ok());
        assert!(!Workload::ALL.contains(&Workload::Http1GetHeaders));
        let h2 = Job::new(Workload::H2cGet, job.target.clone());
        assert_eq!(
            h2.http_request().expect("request").uri(),
            "http://bench/small"
        );
    }

    #[test]
    fn run_stats_merge_and_throughput() {
        let mut a = RunStats::new();
        a.record(&Ok(()), Duration::from_micros(100));
        let mut b = RunStats::new();
        b.record(&Ok(()), Duration::from_micros(300));
        b.record(&Err(anyhow::anyhow!("boom")), Duration::ZERO);
        a.merge(b);
        a.elapsed = Duration::from_secs(2);
        assert_eq!(a.ok, 2);
        assert_eq!(a.errors, 1);
        assert_eq!(a.first_error.as_deref(), Some("boom"));
        assert_eq!(a.latency.len(), 2);
        assert!((a.throughput() - 1.0).abs() < 1e-9);
    }

    #[tokio::test]
    async fn fixed_rate_against_a_local_app_has_no_errors() {
        let http = free_port();
        let echo = free_port();
        tokio::spawn(crate::app::serve(http, echo));
        let target = Target {
            addr: http,
            authority: "bench".into(),
        };
        for _ in 0..100 {
            if TcpStream::connect(http).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for workload in Workload::ALL {
            let t = if workload == Workload::TcpEcho {
                Target {
                    addr: echo,
                    ..target.clone()
                }
            } else {
                target.clone()
            };
            let job = Job::new(workload, t);
            verify(&job).await.expect("verify");
            let slots = open_slots(&job, 4, 2).await.expect("slots");
            let (stats, slots) =
                fixed_rate(job.clone(), slots, 500, Duration::from_millis(200)).await;
            assert_eq!(stats.errors, 0, "{workload:?}: {:?}", stats.first_error);
            assert_eq!(stats.ok, 100);
            assert_eq!(stats.unsent, 0);
            assert_eq!(slots.len(), 4);
            let (stats, slots) = closed_loop(job.clone(), slots, Duration::from_millis(100)).await;
            assert!(stats.ok > 0);
            assert_eq!(stats.errors, 0);
            // A counted run stops at the count, however many slots share it.
            let (stats, _) = closed_loop_counted(job, slots, Duration::from_secs(10), 37).await;
            assert_eq!((stats.ok, stats.errors), (37, 0), "{workload:?}");
        }
        let idle = open_idle_connections(&target, 20, 5).await;
        assert_eq!(idle.streams.len(), 20, "{:?}", idle.first_error);
    }

    fn free_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    }
}
