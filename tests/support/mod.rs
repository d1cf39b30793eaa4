//! Shared end-to-end harness: runs the real `pylon-proxy` binary and real backends on loopback.
//!
//! Every test binary (`e2e_http`, `e2e_grpc`, ...) includes this module with `mod support;` and
//! uses only a part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead, BufReader as StdBufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Upper bound for one whole test (the brief: no test longer than 60 s).
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Generous bound for a single request/operation on a noisy 2-core machine.
pub const OP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the proxy gets to log its four "listening" lines.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The canonical fully qualified name of the `web` service used by most tests.
pub const WEB_FQDN: &str = "web.default.svc.cluster.local";

/// Runs a test body with the global per-test bound; panics with a clear message on timeout.
pub async fn within<F: Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Wraps a whole test in [`TEST_TIMEOUT`].
pub async fn test_body<F: Future>(fut: F) -> F::Output {
    within("whole test (60 s bound)", TEST_TIMEOUT, fut).await
}

// ---------------------------------------------------------------------------------------------
// The controller process
// ---------------------------------------------------------------------------------------------

/// A free loopback address (bound, then released for a child process to take).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// One plain HTTP/1.1 GET over a fresh connection, blocking: `(status, body)`.
pub fn blocking_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// A `pylon-controller` process on fixed loopback ports (chosen up front, so proxies can be
/// pointed at it before it starts and a restart keeps them).
pub struct ControllerProcess {
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    args: Vec<String>,
    pub destination: SocketAddr,
    pub policy: SocketAddr,
    pub identity: SocketAddr,
    pub admin: SocketAddr,
}

impl ControllerProcess {
    /// Its ports and arguments (`source`: `--config-dir D` or `--kubeconfig K`, and any more
    /// flags); not started.
    pub fn new(source: &[&str]) -> ControllerProcess {
        let (destination, policy, identity, admin) =
            (free_port(), free_port(), free_port(), free_port());
        let mut args: Vec<String> = source.iter().map(|a| a.to_string()).collect();
        for (flag, addr) in [
            ("--destination-addr", destination),
            ("--policy-addr", policy),
            ("--identity-addr", identity),
            ("--admin-addr", admin),
        ] {
            args.push(flag.into());
            args.push(addr.to_string());
        }
        ControllerProcess {
            child: None,
            logs: Arc::default(),
            args,
            destination,
            policy,
            identity,
            admin,
        }
    }

    /// Started, and ready (every watched kind listed once).
    pub fn start(source: &[&str]) -> ControllerProcess {
        let mut c = Self::new(source);
        c.spawn();
        c
    }

    /// Starts (or restarts) the process on its ports and waits (bounded) for `/ready`.
    pub fn spawn(&mut self) {
        let bin = Path::new(&*PROXY_BIN).with_file_name("pylon-controller");
        assert!(
            bin.exists(),
            "{} not found: build it first with `cargo build -p pylon-controller --bins`",
            bin.display()
        );
        let mut child = Command::new(&bin)
            .args(&self.args)
            .env("PYLON_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pylon-controller");
        for out in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let logs = self.logs.clone();
            std::thread::spawn(move || {
                for line in StdBufReader::new(out).lines().map_while(Result::ok) {
                    logs.lock().expect("logs").push(line);
                }
            });
        }
        self.child = Some(child);
        let admin = self.admin;
        let ready = wait_for(
            || blocking_get(admin, "/ready").is_some_and(|(s, _)| s == 200),
            Duration::from_secs(30),
        );
        assert!(
            ready,
            "the controller never got ready:\n{}",
            self.logs_joined()
        );
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn logs_joined(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }

    pub fn metrics(&self) -> String {
        blocking_get(self.admin, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy process
// ---------------------------------------------------------------------------------------------

/// The proxy binary. Cargo names it for the proxy crate's own tests; other crates' tests (the
/// CLI's) find it in their target dir, built first with `cargo build -p pylon-proxy --bins`.
pub static PROXY_BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    if let Some(bin) = option_env!("CARGO_BIN_EXE_pylon-proxy") {
        return bin.to_string();
    }
    // target/<profile>/deps/<this test> -> target/<profile>/pylon-proxy
    let exe = std::env::current_exe().expect("the test's own path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("pylon-proxy"))
        .expect("a target dir");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p pylon-proxy --bins`",
        bin.display()
    );
    bin.display().to_string()
});

/// A running `pylon-proxy` child process. Dropping it kills the process.
pub struct Proxy {
    child: Option<Child>,
    pid: u32,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
    tap: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

/// Builder for [`Proxy`]: extra args, env vars, and whether to add the `127.0.0.1:0` addresses.
#[derive(Default, Clone)]
pub struct ProxyBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    no_default_addrs: bool,
}

impl ProxyBuilder {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Do not add `--inbound-addr/--outbound-addr/--admin-addr 127.0.0.1:0` for flags the
    /// caller did not pass itself.
    pub fn no_default_addrs(mut self) -> Self {
        self.no_default_addrs = true;
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&*PROXY_BIN);
        // Hermetic: no PYLON_* (or jemalloc options) from the developer's environment leaks
        // into the child.
        for (k, _) in std::env::vars() {
            if k.starts_with("PYLON_") || k == "_RJEM_MALLOC_CONF" {
                cmd.env_remove(&k);
            }
        }
        cmd.env("PYLON_LOG", "info");
        // One core, as sidecars usually get (the single-threaded runtime); tests may override.
        cmd.env("PYLON_THREADS", "1");
        let mut args: Vec<String> = Vec::new();
        if !self.no_default_addrs {
            for flag in [
                "--inbound-addr",
                "--outbound-addr",
                "--admin-addr",
                "--tap-addr",
            ] {
                let given = self
                    .args
                    .iter()
                    .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
                if !given {
                    args.push(flag.to_string());
                    args.push("127.0.0.1:0".to_string());
                }
            }
        }
        args.extend(self.args.iter().cloned());
        cmd.args(&args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Spawns the proxy and waits (bounded) for its four "listening" lines.
    pub fn start(self) -> Proxy {
        let mut cmd = self.command();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to spawn {}: {e}", *PROXY_BIN));
        let pid = child.id();
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = mpsc::channel::<String>();

        let stderr = child.stderr.take().expect("stderr piped");
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                let mut r = StdBufReader::new(stderr);
                let mut line = String::new();
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let l = line.trim_end().to_string();
                            logs.lock().unwrap().push(l.clone());
                            let _ = tx.send(l);
                        }
                    }
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout piped");
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                let r = StdBufReader::new(stdout);
                for l in r.lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(format!("[stdout] {l}"));
                }
            });
        }

        let deadline = Instant::now() + START_TIMEOUT;
        let mut found: HashMap<String, SocketAddr> = HashMap::new();
        while found.len() < 4 {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some((listener, addr)) = parse_listening(&line) {
                        found.insert(listener, addr);
                    }
                }
                Err(e) => {
                    let status = child.try_wait().ok().flatten();
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    let so_far = logs.lock().unwrap().join("\n");
                    panic!(
                        "pylon-proxy did not log all four \"listening\" lines within \
                         {START_TIMEOUT:?} ({e:?}; exit status {status:?}); found {found:?}.\n\
                         --- proxy output so far ---\n{so_far}\n---"
                    );
                }
            }
        }
        Proxy {
            child: Some(child),
            pid,
            inbound: found["inbound"],
            outbound: found["outbound"],
            admin: found["admin"],
            tap: found["tap"],
            logs,
        }
    }
}

/// Gets a field from a JSON log line, at the top level or under tracing's `fields` object.
pub fn log_field<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    v.get(key)
        .or_else(|| v.get("fields").and_then(|f| f.get(key)))
}

fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if log_field(&v, "message")?.as_str()? != "listening" {
        return None;
    }
    let listener = log_field(&v, "listener")?.as_str()?.to_string();
    let addr = log_field(&v, "addr")?.as_str()?.parse().ok()?;
    Some((listener, addr))
}

impl Proxy {
    /// The `x-backend` that answered one GET for `authority` through the outbound listener.
    pub async fn backend_for(&self, authority: &str) -> String {
        let rsp = get(self.outbound(), authority, "/")
            .await
            .expect("a response");
        assert_eq!(rsp.status, 200, "{}\n{}", rsp.text(), self.log_tail(20));
        rsp.backend().unwrap_or_default().to_string()
    }

    /// Sends requests for `authority` until four in a row go to backends in `want` (within
    /// `bound`, else the test fails); returns how long that took.
    pub async fn until_backends(
        &self,
        authority: &str,
        want: &[&str],
        bound: Duration,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let mut all = true;
            for _ in 0..4 {
                all &= want.contains(&self.backend_for(authority).await.as_str());
            }
            if all {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < bound,
                "requests did not move to {want:?} within {bound:?}\n{}",
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn builder() -> ProxyBuilder {
        ProxyBuilder::default()
    }

    /// Starts the proxy with these extra args (addresses default to `127.0.0.1:0`).
    pub fn start(args: &[&str]) -> Proxy {
        Self::builder().args(args.iter().copied()).start()
    }

    /// Starts the proxy with `--config-dir` pointing at `cfg` plus extra args.
    pub fn with_config(cfg: &ConfigDir, args: &[&str]) -> Proxy {
        Self::builder()
            .arg("--config-dir")
            .arg(cfg.path_str())
            .args(args.iter().copied())
            .start()
    }

    pub fn inbound(&self) -> SocketAddr {
        self.inbound
    }
    pub fn outbound(&self) -> SocketAddr {
        self.outbound
    }
    pub fn tap(&self) -> SocketAddr {
        self.tap
    }
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// All stderr (and `[stdout]`-prefixed stdout) lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn logs_joined(&self) -> String {
        self.logs().join("\n")
    }

    /// Last `n` log lines, for assertion messages.
    pub fn log_tail(&self, n: usize) -> String {
        let logs = self.logs();
        let start = logs.len().saturating_sub(n);
        logs[start..].join("\n")
    }

    /// Polls the log buffer until a line matches, or `timeout` passes.
    pub async fn wait_for_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.logs().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the log buffer until at least `n` lines match, or `timeout` passes: how many did.
    /// (The proxy's log reaches the buffer through a reader thread, a little after the proxy
    /// has answered: a count taken at once can miss the latest lines.)
    pub async fn wait_for_log_count(
        &self,
        timeout: Duration,
        n: usize,
        pred: impl Fn(&str) -> bool,
    ) -> usize {
        let count = || self.logs().iter().filter(|l| pred(l)).count();
        wait_until(|| count() >= n, timeout).await;
        count()
    }

    /// An admin request (blocking, bounded): returns status and body.
    pub fn admin_request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        blocking_http(self.admin, method, path, body)
            .unwrap_or_else(|e| panic!("admin {method} {path} failed: {e}"))
    }

    /// GET /metrics text (panics if not 200).
    pub fn metrics(&self) -> String {
        let (status, body) = self.admin_request("GET", "/metrics", "");
        assert_eq!(status, 200, "GET /metrics returned {status}: {body}");
        body
    }

    /// Sum of all series of `name` whose labels include every `(label, value)` pair.
    pub fn metric_value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.metrics(), name, labels)
    }

    /// Sum of all series of `name` whose labels satisfy `pred`.
    pub fn metric_sum(&self, name: &str, pred: impl Fn(&Sample) -> bool) -> Option<f64> {
        metric_sum(&self.metrics(), name, pred)
    }

    /// Waits (bounded) until `metric_value(name, labels) == Some(want)`, returning the last value.
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        timeout: Duration,
    ) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric_value(name, labels);
            if v == Some(want) || Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The child's resident set size in KiB (from /proc/PID/status VmRSS).
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid)
    }

    /// Sends a signal to the child.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid);
    }

    /// Waits (bounded, without blocking the runtime) for the child to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- last pylon-proxy log lines (pid {}) ---\n{}\n---",
                self.pid,
                self.log_tail(60)
            );
        }
    }
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs the proxy expecting it to exit by itself (for error cases). Returns the exit status
/// (None if it was still running after `timeout`, in which case it is killed) and its output.
pub fn run_to_exit(builder: ProxyBuilder, timeout: Duration) -> (Option<ExitStatus>, String) {
    let mut cmd = builder.command();
    let mut child = cmd.spawn().expect("spawn pylon-proxy");
    let mut stderr = child.stderr.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = format!(
        "{}{}",
        err_t.join().unwrap_or_default(),
        out_t.join().unwrap_or_default()
    );
    (status, out)
}

// ---------------------------------------------------------------------------------------------
// Blocking mini HTTP/1.1 client (admin endpoint)
// ---------------------------------------------------------------------------------------------

/// One HTTP/1.1 request with `Connection: close`, read to EOF; handles chunked responses.
pub fn blocking_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end in {text:?}")))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size_line, rest)) = s.split_once("\r\n") {
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        s = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Prometheus text parsing
// ---------------------------------------------------------------------------------------------

pub use pylon_proxy_metrics::exposition::Sample;

/// Parses Prometheus / OpenMetrics text exposition (with the parser the CLI uses). Returns an
/// error naming the first bad line.
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>, String> {
    pylon_proxy_metrics::exposition::parse(text).map_err(|e| e.to_string())
}

pub fn metric_sum(text: &str, name: &str, pred: impl Fn(&Sample) -> bool) -> Option<f64> {
    let samples = parse_metrics(text).unwrap_or_else(|e| panic!("unparsable /metrics: {e}"));
    let mut found = false;
    let mut sum = 0.0;
    for s in samples.iter().filter(|s| s.name == name && pred(s)) {
        found = true;
        sum += s.value;
    }
    found.then_some(sum)
}

pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric_sum(text, name, |s| {
        labels.iter().all(|(k, v)| s.label(k) == Some(*v))
    })
}

/// The series of `name` in `text`, for assertion messages.
pub fn series_of(text: &str, name: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Polling helpers
// ---------------------------------------------------------------------------------------------

/// Polls `cond` every 50 ms until true or `timeout`; returns the final result.
pub fn wait_for(mut cond: impl FnMut() -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Async twin of [`wait_for`], which does not block a runtime thread while sleeping.
pub async fn wait_until(mut cond: impl FnMut() -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Config dir: Service + EndpointSlice YAML
// ---------------------------------------------------------------------------------------------

/// A temporary `--config-dir` holding YAML mesh objects.
pub struct ConfigDir {
    dir: tempfile::TempDir,
}

/// A Service port: `name`, `port`, `targetPort` (a port name).
#[derive(Clone, Copy, Debug)]
pub struct SvcPort<'a> {
    pub name: &'a str,
    pub port: u16,
    pub target: &'a str,
}

impl Default for ConfigDir {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigDir {
    pub fn new() -> Self {
        ConfigDir {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A config dir with Service `web` (port 80 `http` -> `http`) and one slice per backend.
    pub fn web(backends: &[SocketAddr]) -> Self {
        let c = Self::new();
        c.write_service("web", &[HTTP_PORT]);
        c.set_endpoints("web", "http", backends);
        c
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_str(&self) -> String {
        self.dir.path().to_str().expect("utf-8 tempdir").to_string()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a file atomically (temp file in a hidden sub-directory, then rename).
    pub fn write(&self, name: &str, contents: &str) {
        let staging = self.dir.path().join(".staging");
        std::fs::create_dir_all(&staging).expect("create staging dir");
        let tmp = staging.join(name);
        std::fs::write(&tmp, contents).expect("write staged config");
        std::fs::rename(&tmp, self.file(name)).expect("rename config into place");
    }

    /// Overwrites a file in place (not atomic): used to write garbage over a good file.
    pub fn write_in_place(&self, name: &str, contents: &str) {
        std::fs::write(self.file(name), contents).expect("write config");
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.file(name)).expect("remove config");
    }

    /// Writes `<name>-service.yaml`.
    pub fn write_service(&self, name: &str, ports: &[SvcPort<'_>]) {
        self.write(
            &format!("{name}-service.yaml"),
            &service_yaml(name, "default", ports),
        );
    }

    /// (Re)writes `<service>-endpoints.yaml`: one EndpointSlice per endpoint (each with its own
    /// port, all with port name `port_name`), atomically. No endpoints -> one empty slice.
    pub fn set_endpoints(&self, service: &str, port_name: &str, endpoints: &[SocketAddr]) {
        self.write(
            &format!("{service}-endpoints.yaml"),
            &endpoint_slices_yaml(service, "default", port_name, endpoints),
        );
    }

    pub fn endpoints_file(service: &str) -> String {
        format!("{service}-endpoints.yaml")
    }
}

pub const HTTP_PORT: SvcPort<'static> = SvcPort {
    name: "http",
    port: 80,
    target: "http",
};

pub fn service_yaml(name: &str, namespace: &str, ports: &[SvcPort<'_>]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         spec:\n  type: ClusterIP\n  selector:\n    app: {name}\n  ports:\n"
    );
    for p in ports {
        y.push_str(&format!(
            "    - name: {}\n      port: {}\n      targetPort: {}\n      protocol: TCP\n",
            p.name, p.port, p.target
        ));
    }
    y
}

/// One EndpointSlice document: `ports` (name, port) apply to every address in `ips`.
pub fn slice_yaml(
    slice_name: &str,
    service: &str,
    namespace: &str,
    ports: &[(&str, u16)],
    ips: &[IpAddr],
    ready: bool,
) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice_name}\n  \
         namespace: {namespace}\n  labels:\n    kubernetes.io/service-name: {service}\n\
         addressType: IPv4\nports:\n"
    );
    for (name, port) in ports {
        y.push_str(&format!(
            "  - name: {name}\n    port: {port}\n    protocol: TCP\n"
        ));
    }
    if ips.is_empty() {
        y.push_str("endpoints: []\n");
    } else {
        y.push_str("endpoints:\n");
        for ip in ips {
            y.push_str(&format!(
                "  - addresses:\n      - \"{ip}\"\n    conditions:\n      ready: {ready}\n"
            ));
        }
    }
    y
}

pub fn endpoint_slices_yaml(
    service: &str,
    namespace: &str,
    port_name: &str,
    endpoints: &[SocketAddr],
) -> String {
    if endpoints.is_empty() {
        return slice_yaml(
            &format!("{service}-empty"),
            service,
            namespace,
            &[(port_name, 1)],
            &[],
            true,
        );
    }
    endpoints
        .iter()
        .map(|ep| {
            slice_yaml(
                &format!("{service}-{}", ep.port()),
                service,
                namespace,
                &[(port_name, ep.port())],
                &[ep.ip()],
                true,
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync()
}

/// A body of `len` bytes generated on the fly in `chunk`-sized frames (no allocation per frame).
pub struct RepeatBody {
    chunk: Bytes,
    remaining: u64,
    sent: Option<Arc<AtomicU64>>,
}

impl RepeatBody {
    pub fn new(len: u64, chunk_size: usize) -> Self {
        let chunk: Vec<u8> = (0..chunk_size).map(|i| (i % 251) as u8).collect();
        RepeatBody {
            chunk: Bytes::from(chunk),
            remaining: len,
            sent: None,
        }
    }

    /// Counts bytes handed to the transport in `counter`.
    pub fn counting(mut self, counter: Arc<AtomicU64>) -> Self {
        self.sent = Some(counter);
        self
    }

    pub fn boxed_body(self) -> Body {
        BodyExt::boxed_unsync(self)
    }
}

impl hyper::body::Body for RepeatBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = (self.chunk.len() as u64).min(self.remaining) as usize;
        self.remaining -= n as u64;
        if let Some(c) = &self.sent {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.remaining)
    }
}

/// A body from a channel of frames (for streaming/trailers tests).
pub fn channel_body() -> (tokio::sync::mpsc::Sender<Frame<Bytes>>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, BoxError>(f), rx))
    });
    (tx, http_body_util::StreamBody::new(stream).boxed_unsync())
}

/// Reads a body fully: (data, trailers).
pub async fn collect_body<B>(body: B) -> Result<(Bytes, Option<HeaderMap>), BoxError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let collected = body.collect().await.map_err(Into::into)?;
    let trailers = collected.trailers().cloned();
    Ok((collected.to_bytes(), trailers))
}

// ---------------------------------------------------------------------------------------------
// HTTP clients (hyper 1, connection level)
// ---------------------------------------------------------------------------------------------

/// A response read fully.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn proxy_error(&self) -> Option<&str> {
        self.header("pylon-proxy-error")
    }
    /// The `x-backend` name stamped by [`Backend`].
    pub fn backend(&self) -> Option<&str> {
        self.header("x-backend")
    }
}

pub type H1Client = hyper::client::conn::http1::SendRequest<Body>;
pub type H2Client = hyper::client::conn::http2::SendRequest<Body>;

/// Opens one HTTP/1.1 client connection; a failed connect or handshake is an error.
pub async fn try_h1_client(addr: SocketAddr) -> Result<H1Client, BoxError> {
    let tcp = tokio::time::timeout(OP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect {addr}: timed out"))??;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(send)
}

/// Opens one HTTP/1.1 client connection (panics if it can't).
pub async fn h1_client(addr: SocketAddr) -> H1Client {
    try_h1_client(addr)
        .await
        .unwrap_or_else(|e| panic!("h1 client to {addr}: {e}"))
}

/// Opens one HTTP/2 prior-knowledge (h2c) client connection.
pub async fn h2_client(addr: SocketAddr) -> H2Client {
    let tcp = within("connect", OP_TIMEOUT, TcpStream::connect(addr))
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let _ = tcp.set_nodelay(true);
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A request in origin-form with a Host header (HTTP/1.1).
pub fn h1_request(method: &str, authority: &str, path: &str, body: Body) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority)
        .body(body)
        .expect("request")
}

/// A request with an absolute URI (absolute-form on HTTP/1.1, :authority on HTTP/2).
pub fn abs_request(method: &str, authority: &str, path: &str, body: Body) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(format!("http://{authority}{path}"))
        .body(body)
        .expect("request")
}

pub async fn read_resp(resp: Response<Incoming>) -> Result<Resp, BoxError> {
    let (parts, body) = resp.into_parts();
    let (body, trailers) = collect_body(body).await?;
    Ok(Resp {
        status: parts.status,
        headers: parts.headers,
        body,
        trailers,
    })
}

pub async fn send_h1(client: &mut H1Client, req: Request<Body>) -> Result<Resp, BoxError> {
    within("h1 request", OP_TIMEOUT, async {
        client.ready().await?;
        let resp = client.send_request(req).await?;
        read_resp(resp).await
    })
    .await
}

pub async fn send_h2(client: &mut H2Client, req: Request<Body>) -> Result<Resp, BoxError> {
    within("h2 request", OP_TIMEOUT, async {
        client.ready().await?;
        let resp = client.send_request(req).await?;
        read_resp(resp).await
    })
    .await
}

/// GET `path` with `Host: authority` on a fresh HTTP/1.1 connection to `proxy_addr`.
pub async fn get(proxy_addr: SocketAddr, authority: &str, path: &str) -> Result<Resp, BoxError> {
    let mut c = h1_client(proxy_addr).await;
    send_h1(&mut c, h1_request("GET", authority, path, empty())).await
}

/// Like [`get`] with extra request headers.
pub async fn get_with(
    proxy_addr: SocketAddr,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Resp, BoxError> {
    let mut c = h1_client(proxy_addr).await;
    let mut req = h1_request("GET", authority, path, empty());
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    send_h1(&mut c, req).await
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1 over TCP (for byte-exact tests)
// ---------------------------------------------------------------------------------------------

/// A raw HTTP/1 response as read off the wire.
#[derive(Debug, Default)]
pub struct RawResponse {
    pub status: u16,
    pub status_line: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    pub chunked: bool,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn trailer(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.trailers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut line = String::new();
    let n = r.read_line(&mut line).await?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

async fn read_header_lines<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(r).await?;
        if line.is_empty() {
            return Ok(headers);
        }
        let (k, v) = line.split_once(':').unwrap_or((&line, ""));
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
}

/// Reads only a status line and headers (e.g. a `100 Continue` or a CONNECT `200`).
pub async fn read_raw_head<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<RawResponse> {
    let status_line = read_line(r).await?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers = read_header_lines(r).await?;
    Ok(RawResponse {
        status,
        status_line,
        headers,
        ..Default::default()
    })
}

/// Reads one full response (skipping no 1xx: the caller sees them). `head_request`: no body.
pub async fn read_raw_response<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    head_request: bool,
) -> std::io::Result<RawResponse> {
    let mut resp = read_raw_head(r).await?;
    if (100..200).contains(&resp.status) || resp.status == 204 || resp.status == 304 || head_request
    {
        return Ok(resp);
    }
    let te = resp.header("transfer-encoding").unwrap_or("").to_string();
    if te.to_ascii_lowercase().contains("chunked") {
        resp.chunked = true;
        loop {
            let size_line = read_line(r).await?;
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size line {size_line:?}")))?;
            if size == 0 {
                resp.trailers = read_header_lines(r).await?;
                break;
            }
            let mut buf = vec![0; size];
            r.read_exact(&mut buf).await?;
            resp.body.extend_from_slice(&buf);
            let crlf = read_line(r).await?;
            if !crlf.is_empty() {
                return Err(std::io::Error::other("missing CRLF after chunk"));
            }
        }
    } else if let Some(cl) = resp.header("content-length") {
        let n: usize = cl
            .parse()
            .map_err(|_| std::io::Error::other(format!("bad content-length {cl:?}")))?;
        let mut buf = vec![0; n];
        r.read_exact(&mut buf).await?;
        resp.body = buf;
    } else {
        r.read_to_end(&mut resp.body).await?;
    }
    Ok(resp)
}

/// A raw connection: buffered reader half + writer half.
pub struct RawConn {
    pub reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    pub writer: tokio::net::tcp::OwnedWriteHalf,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let tcp = within("connect", OP_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let _ = tcp.set_nodelay(true);
        let (r, w) = tcp.into_split();
        RawConn {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        within(
            "raw write",
            OP_TIMEOUT,
            self.writer.write_all(bytes.as_ref()),
        )
        .await
        .expect("raw write");
    }

    pub async fn response(&mut self) -> std::io::Result<RawResponse> {
        within(
            "raw response",
            OP_TIMEOUT,
            read_raw_response(&mut self.reader, false),
        )
        .await
    }

    pub async fn head(&mut self) -> std::io::Result<RawResponse> {
        within(
            "raw response head",
            OP_TIMEOUT,
            read_raw_head(&mut self.reader),
        )
        .await
    }

    /// True if the peer closes the connection (EOF or reset) within `timeout`; data read
    /// meanwhile is discarded.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let fut = async {
            let mut buf = [0u8; 4096];
            loop {
                match self.reader.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.is_ok()
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP backend
// ---------------------------------------------------------------------------------------------

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub uri: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub at: Instant,
}

/// Shared counters of one backend.
#[derive(Default)]
pub struct BackendState {
    pub name: String,
    pub requests: AtomicUsize,
    pub connections: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub completed: AtomicUsize,
    pub bytes_received: AtomicU64,
    pub delay_ms: AtomicU64,
    pub recorded: Mutex<Vec<Recorded>>,
    pub trailers: Mutex<Vec<HeaderMap>>,
}

impl BackendState {
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
    pub fn recorded(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().clone()
    }
    pub fn last(&self) -> Option<Recorded> {
        self.recorded.lock().unwrap().last().cloned()
    }
}

pub type Handler =
    Arc<dyn Fn(Request<Incoming>, Arc<BackendState>) -> BoxFuture<Response<Body>> + Send + Sync>;

/// A hyper 1 HTTP/1 + h2 (auto-detected) server on 127.0.0.1:0. Dropping it stops it, including
/// its open connections.
pub struct Backend {
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
    task: JoinHandle<()>,
}

struct InFlightGuard(Arc<BackendState>);
impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.completed.fetch_add(1, Ordering::SeqCst);
    }
}

impl Backend {
    /// The standard test backend (see [`standard_handler`]).
    pub async fn start(name: &str) -> Backend {
        Self::start_with(
            name,
            Arc::new(|req, st| Box::pin(standard_handler(req, st))),
        )
        .await
    }

    /// The standard backend with a fixed delay before every response.
    pub async fn with_delay(name: &str, delay: Duration) -> Backend {
        let b = Self::start(name).await;
        b.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
        b
    }

    pub async fn start_with(name: &str, handler: Handler) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BackendState {
            name: name.to_string(),
            ..Default::default()
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let handler = handler.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let st = st.clone();
                        let handler = handler.clone();
                        async move {
                            st.requests.fetch_add(1, Ordering::SeqCst);
                            let n = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            st.max_in_flight.fetch_max(n, Ordering::SeqCst);
                            let _guard = InFlightGuard(st.clone());
                            st.recorded.lock().unwrap().push(Recorded {
                                method: req.method().to_string(),
                                uri: req.uri().to_string(),
                                version: req.version(),
                                headers: req.headers().clone(),
                                at: Instant::now(),
                            });
                            let mut resp = handler(req, st.clone()).await;
                            if let Ok(v) = http::HeaderValue::from_str(&st.name) {
                                resp.headers_mut().insert("x-backend", v);
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                        .await;
                });
                // Reap finished connection tasks so the set does not grow without bound.
                while conns.try_join_next().is_some() {}
            }
        });
        Backend { addr, state, task }
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }
    pub fn requests(&self) -> usize {
        self.state.requests()
    }
    pub fn connections(&self) -> usize {
        self.state.connections()
    }

    /// Stops accepting and closes every open connection.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header_u64(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
}

fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
    })
}

fn boxed_incoming(b: Incoming) -> Body {
    b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()
}

/// Standard backend behaviour, by path:
/// - `/echo`: streams the request body back (backpressure flows end to end);
/// - `/count`: reads the body frame by frame, responds with the byte count as text;
/// - `/generate?bytes=N`: streams N generated bytes;
/// - `/chunked`: responds with 5 chunks, 20 ms apart, no Content-Length;
/// - `/trailers`: reads the body (recording request trailers), responds `trailers-ok` with
///   trailer `x-backend-trailer: yes` (declared in a `Trailer` header);
/// - anything else: reads the body, responds with the backend's name.
///
/// Request headers: `x-status: NNN` sets the status; `x-delay-ms: N` adds a delay (on top of the
/// backend's configured delay). Every response carries `x-backend: <name>`.
pub async fn standard_handler(req: Request<Incoming>, st: Arc<BackendState>) -> Response<Body> {
    let delay = Duration::from_millis(
        st.delay_ms.load(Ordering::SeqCst) + header_u64(&req, "x-delay-ms").unwrap_or(0),
    );
    let status = header_u64(&req, "x-status")
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::OK);
    let path = req.uri().path().to_string();
    let builder = Response::builder().status(status);

    match path.as_str() {
        "/echo" => {
            tokio::time::sleep(delay).await;
            builder.body(boxed_incoming(req.into_body())).unwrap()
        }
        "/count" | "/trailers" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            n += d.len() as u64;
                            st.bytes_received
                                .fetch_add(d.len() as u64, Ordering::SeqCst);
                        } else if let Some(t) = f.trailers_ref() {
                            st.trailers.lock().unwrap().push(t.clone());
                        }
                    }
                    Err(e) => {
                        return builder
                            .status(StatusCode::BAD_REQUEST)
                            .body(full(format!("body error after {n} bytes: {e}")))
                            .unwrap();
                    }
                }
            }
            tokio::time::sleep(delay).await;
            if path == "/count" {
                builder.body(full(n.to_string())).unwrap()
            } else {
                let (tx, body) = channel_body();
                tokio::spawn(async move {
                    let _ = tx
                        .send(Frame::data(Bytes::from_static(b"trailers-ok")))
                        .await;
                    let mut t = HeaderMap::new();
                    t.insert("x-backend-trailer", http::HeaderValue::from_static("yes"));
                    let _ = tx.send(Frame::trailers(t)).await;
                });
                builder
                    .header("trailer", "x-backend-trailer")
                    .body(body)
                    .unwrap()
            }
        }
        "/generate" => {
            tokio::time::sleep(delay).await;
            let n = query_u64(&req, "bytes").unwrap_or(1024);
            builder
                .body(RepeatBody::new(n, 64 * 1024).boxed_body())
                .unwrap()
        }
        "/chunked" => {
            tokio::time::sleep(delay).await;
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                for i in 0..5 {
                    if tx
                        .send(Frame::data(Bytes::from(format!("chunk-{i};"))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            builder.body(body).unwrap()
        }
        _ => {
            let mut body = req.into_body();
            while let Some(Ok(f)) = body.frame().await {
                if let Some(d) = f.data_ref() {
                    st.bytes_received
                        .fetch_add(d.len() as u64, Ordering::SeqCst);
                }
            }
            tokio::time::sleep(delay).await;
            builder.body(full(st.name.clone())).unwrap()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TCP servers
// ---------------------------------------------------------------------------------------------

/// A raw TCP server (echo, optionally speaking first). Dropping it stops it.
pub struct TcpServer {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub bytes: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TcpServer {
    /// Echoes every byte back.
    pub async fn echo() -> TcpServer {
        Self::start(None).await
    }

    /// Writes `banner` as soon as a connection is accepted, then echoes.
    pub async fn speaks_first(banner: &'static [u8]) -> TcpServer {
        Self::start(Some(banner)).await
    }

    async fn start(banner: Option<&'static [u8]>) -> TcpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (c, b) = (connections.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let b = b.clone();
                conns.spawn(async move {
                    if let Some(banner) = banner {
                        if tcp.write_all(banner).await.is_err() {
                            return;
                        }
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                b.fetch_add(n as u64, Ordering::SeqCst);
                                if tcp.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        TcpServer {
            addr,
            connections,
            bytes,
            task,
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A WebSocket echo server (tokio-tungstenite). Dropping it stops it.
pub struct WsServer {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl WsServer {
    pub async fn echo() -> WsServer {
        use futures_util::{SinkExt, StreamExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws");
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let c = connections.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                conns.spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_text() || msg.is_binary() {
                            if ws.send(msg).await.is_err() {
                                break;
                            }
                        } else if msg.is_close() {
                            break;
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        WsServer {
            addr,
            connections,
            task,
        }
    }
}

impl Drop for WsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback port that refuses connections: a socket bound to it that never listens, held
/// for the rest of the test process. A port found free and then let go could be taken by the
/// next listener (a proxy's admin listener once took one, and the test's "refused" endpoint
/// answered 508, the proxy's own loop guard); no listener can take a port still bound here.
pub fn closed_port() -> SocketAddr {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("bound address");
    // Held until the test process exits.
    std::mem::forget(socket);
    addr
}

// ---------------------------------------------------------------------------------------------
// Prerequisites of tests that need root and system tools
// ---------------------------------------------------------------------------------------------

/// Finds a tool in PATH, /usr/sbin or /sbin.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// True when `test` can run: root (for network namespaces) and `tools` are there. Otherwise a
/// notice naming what's missing and how to install it (and `false`), or under `CI=true` a
/// failure: a test never silently skips in CI.
pub fn prerequisites(test: &str, tools: &[&str], apt_packages: &str) -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (it creates network namespaces)".to_string());
    }
    for tool in tools {
        if find_tool(tool).is_none() {
            missing.push(format!("`{tool}`"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test} needs {}; as root: apt-get install -y {apt_packages}",
        missing.join(", ")
    );
    if in_ci() {
        panic!("{msg} (failing because CI=true)");
    }
    // Straight to the stream: libtest captures `eprintln!` of passing tests, and a skip
    // must be seen.
    let _ = writeln!(std::io::stderr(), "NOTICE: skipping: {msg}");
    false
}

// ---------------------------------------------------------------------------------------------
// Reliability helpers (e2e_reliability; rss_sampler moved here from e2e_http): RSS sampling,
// raw HTTP/2 frames, a bounded closed-loop HTTP/1 load.
// ---------------------------------------------------------------------------------------------

use std::sync::atomic::AtomicBool;

/// Samples the proxy's RSS every 100 ms until `stop` is set; returns the maximum in KiB.
pub fn rss_sampler(pid: u32, stop: Arc<AtomicU64>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut max = 0;
        while stop.load(Ordering::SeqCst) == 0 {
            if let Some(kib) = rss_kib(pid) {
                max = max.max(kib);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        max
    })
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_CLIENT_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const H2_DATA: u8 = 0x0;
pub const H2_HEADERS: u8 = 0x1;
pub const H2_RST_STREAM: u8 = 0x3;
pub const H2_SETTINGS: u8 = 0x4;
pub const H2_PING: u8 = 0x6;
pub const H2_GOAWAY: u8 = 0x7;
pub const H2_WINDOW_UPDATE: u8 = 0x8;
pub const H2_CONTINUATION: u8 = 0x9;
pub const H2_FLAG_ACK: u8 = 0x1;
pub const H2_FLAG_END_STREAM: u8 = 0x1;
pub const H2_FLAG_END_HEADERS: u8 = 0x4;
/// GOAWAY / RST_STREAM error code ENHANCE_YOUR_CALM (RFC 9113 §7).
pub const H2_ENHANCE_YOUR_CALM: u32 = 0xb;

/// One HTTP/2 frame as read off the wire (RFC 9113 §4.1).
#[derive(Debug, Clone)]
pub struct H2Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl H2Frame {
    /// A GOAWAY's error code.
    pub fn goaway_code(&self) -> Option<u32> {
        (self.kind == H2_GOAWAY && self.payload.len() >= 8)
            .then(|| u32::from_be_bytes(self.payload[4..8].try_into().unwrap()))
    }
}

/// Encodes one frame: 24-bit length, type, flags, 31-bit stream id, payload.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 1 << 24, "frame payload too long");
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads one frame (any size the peer sends).
pub async fn read_h2_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<H2Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(H2Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
        payload,
    })
}

/// One request of a [`ClosedLoad`] that did not get a 200.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub conn: usize,
    pub seq: usize,
    /// The response's status, or `None` for a transport error or timeout.
    pub status: Option<u16>,
    pub proxy_error: Option<String>,
    pub what: String,
}

/// What a [`ClosedLoad`] did: successes, failures, and which backend (`x-backend`) answered.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: usize,
    pub failures: Vec<LoadFailure>,
    pub by_backend: HashMap<String, usize>,
}

impl LoadReport {
    pub fn total(&self) -> usize {
        self.ok + self.failures.len()
    }

    /// The first `n` failures, one a line, for assertion messages.
    pub fn failures_text(&self, n: usize) -> String {
        self.failures
            .iter()
            .take(n)
            .map(|f| format!("{f:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Closed-loop HTTP/1.1 load: `conns` kept-alive client connections each sending sequential
/// GETs until stopped, `max_per_conn` requests were sent or `max_time` passed (bounded in count
/// and in time; every request is bounded by [`OP_TIMEOUT`]). A failed request is recorded (never
/// a panic) and its connection replaced; a connection the proxy closed while idle (its
/// `ready()` fails before anything was sent) is replaced without counting a failure.
pub struct ClosedLoad {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    ok: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<LoadReport>>,
}

impl ClosedLoad {
    pub fn start(
        addr: SocketAddr,
        authority: &str,
        path: &str,
        conns: usize,
        max_per_conn: usize,
        max_time: Duration,
    ) -> ClosedLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let ok_count = Arc::new(AtomicUsize::new(0));
        let deadline = Instant::now() + max_time;
        let tasks = (0..conns)
            .map(|conn| {
                let (stop, done, ok_count) = (stop.clone(), done.clone(), ok_count.clone());
                let (authority, path) = (authority.to_string(), path.to_string());
                tokio::spawn(async move {
                    let mut report = LoadReport::default();
                    let mut client: Option<H1Client> = None;
                    let mut seq = 0;
                    while seq < max_per_conn
                        && !stop.load(Ordering::SeqCst)
                        && Instant::now() < deadline
                    {
                        let mut c = match client.take() {
                            Some(c) => c,
                            None => match try_h1_client(addr).await {
                                Ok(c) => c,
                                Err(e) => {
                                    report.failures.push(LoadFailure {
                                        conn,
                                        seq,
                                        status: None,
                                        proxy_error: None,
                                        what: format!("connect: {e}"),
                                    });
                                    done.fetch_add(1, Ordering::SeqCst);
                                    seq += 1;
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                    continue;
                                }
                            },
                        };
                        if c.ready().await.is_err() {
                            // Closed while idle: nothing was sent; open another one.
                            continue;
                        }
                        let req = h1_request("GET", &authority, &path, empty());
                        let res = tokio::time::timeout(OP_TIMEOUT, async {
                            let resp = c.send_request(req).await?;
                            read_resp(resp).await
                        })
                        .await;
                        seq += 1;
                        match res {
                            Ok(Ok(r)) if r.status == StatusCode::OK => {
                                report.ok += 1;
                                ok_count.fetch_add(1, Ordering::SeqCst);
                                let backend = r.backend().unwrap_or("").to_string();
                                *report.by_backend.entry(backend).or_default() += 1;
                                client = Some(c);
                            }
                            Ok(Ok(r)) => {
                                report.failures.push(LoadFailure {
                                    conn,
                                    seq,
                                    status: Some(r.status.as_u16()),
                                    proxy_error: r.proxy_error().map(str::to_string),
                                    what: format!("body {:?}", r.text()),
                                });
                                client = Some(c);
                            }
                            Ok(Err(e)) => report.failures.push(LoadFailure {
                                conn,
                                seq,
                                status: None,
                                proxy_error: None,
                                what: format!("error: {e}"),
                            }),
                            Err(_) => report.failures.push(LoadFailure {
                                conn,
                                seq,
                                status: None,
                                proxy_error: None,
                                what: format!("no response within {OP_TIMEOUT:?}"),
                            }),
                        }
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    report
                })
            })
            .collect();
        ClosedLoad {
            stop,
            done,
            ok: ok_count,
            tasks,
        }
    }

    /// Requests answered so far (any outcome).
    pub fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops the load and collects every connection's report.
    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = LoadReport::default();
        for t in self.tasks {
            let r = within("load task", OP_TIMEOUT + Duration::from_secs(5), t)
                .await
                .expect("load task panicked");
            all.ok += r.ok;
            all.failures.extend(r.failures);
            for (k, v) in r.by_backend {
                *all.by_backend.entry(k).or_default() += v;
            }
        }
        all
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoints that misbehave, endpoints with pods, and reading the proxy's JSON logs
// ---------------------------------------------------------------------------------------------

/// An HTTP/1 endpoint that answers every request with `response`, byte for byte (a malformed
/// one, say), then closes the connection. Dropping it stops it.
pub struct RawHttpServer {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawHttpServer {
    pub async fn start(response: &'static [u8]) -> RawHttpServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw http");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                let seen = seen.clone();
                conns.spawn(async move {
                    // The request's head, then the scripted answer.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    let _ = tcp.write_all(response).await;
                    let _ = tcp.shutdown().await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        RawHttpServer {
            addr,
            requests,
            task,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for RawHttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A ready Pod `pod` of Deployment `deployment` (through its ReplicaSet) in `default`, at
/// `ip`: the config dir's endpoints at that address are then named by it.
pub fn deployment_pod_yaml(pod: &str, deployment: &str, ip: IpAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\n\
         metadata:\n  name: {pod}\n  namespace: default\n  labels: {{app: {deployment}, pod-template-hash: 5d8f7}}\n  \
         ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {deployment}-5d8f7, uid: u, controller: true}}]\n\
         spec: {{serviceAccountName: {deployment}, containers: [{{name: app}}]}}\n\
         status: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    )
}

/// A Server `web-http` on `port` (pods labelled `app=web`, in `default`) that only meshed
/// (mTLS) clients may call: a plain client gets 403 from the proxy. Run the proxy with
/// `--workload-labels app=web --namespace default`.
pub fn identity_only_server_yaml(port: u16) -> String {
    format!(
        "apiVersion: policy.linkerd.io/v1beta3\nkind: Server\n\
         metadata: {{name: web-http, namespace: default}}\n\
         spec:\n  podSelector:\n    matchLabels: {{app: web}}\n  port: {port}\n\
         ---\napiVersion: policy.linkerd.io/v1alpha1\nkind: MeshTLSAuthentication\n\
         metadata: {{name: meshed, namespace: default}}\nspec:\n  identities: ['*']\n\
         ---\napiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: web-http-meshed, namespace: default}}\nspec:\n  \
         targetRef: {{group: policy.linkerd.io, kind: Server, name: web-http}}\n  \
         requiredAuthenticationRefs:\n  \
         - {{group: policy.linkerd.io, kind: MeshTLSAuthentication, name: meshed}}\n"
    )
}

/// The proxy's log lines that parse as JSON.
pub fn json_logs(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Log fields whose value is a Rust `Debug` form rather than what an operator reads
/// (`Some(10.0.0.5:8080)`, `None`, `Endpoint { addr: .. }`, `Unavailable(..)`), as
/// `"field=value in line"`.
pub fn debug_forms_in_logs(lines: &[String]) -> Vec<String> {
    fn debug_like(v: &str) -> bool {
        let v = v.trim();
        if v == "None" || v.contains("Some(") || v.contains("None)") {
            return true;
        }
        // `Name { field: .. }` or `Name(..)`: a type name, then a struct or tuple body.
        let name_end = v
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(v.len());
        let (name, rest) = v.split_at(name_end);
        let typename = name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
            && name.chars().any(|c| c.is_ascii_lowercase());
        typename && (rest.starts_with(" { ") || (rest.starts_with('(') && rest.ends_with(')')))
    }
    let mut found = Vec::new();
    for line in lines {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(line)
        else {
            continue;
        };
        let fields = map.iter().chain(
            map.get("fields")
                .and_then(|f| f.as_object())
                .into_iter()
                .flatten(),
        );
        for (k, v) in fields {
            if let Some(s) = v.as_str() {
                if debug_like(s) {
                    found.push(format!("{k}={s} in {line}"));
                }
            }
        }
    }
    found
}
