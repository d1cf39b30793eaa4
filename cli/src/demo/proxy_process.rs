//! A Pylon proxy running as a child process of the demo: `pylon proxy <flags>` (the same
//! binary, so the demo needs nothing else installed). Its listeners bind loopback port 0, and
//! the chosen addresses are read from its `listening` log lines.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hyper::Method;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout, Instant};

use super::admin_client;

/// How long a proxy may take to log its listeners and answer `/ready`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a proxy may take to drain and exit after `POST /shutdown`, then after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const TERMINATE_GRACE: Duration = Duration::from_secs(2);
/// Log lines kept for error reports.
const LOG_TAIL_LINES: usize = 30;
const LOG_LINE_MAX_CHARS: usize = 2_000;

/// Who a proxy is and what it fronts.
pub struct ProxySpec<'a> {
    pub pod: &'a str,
    pub workload: &'a str,
    pub namespace: &'a str,
    pub config_dir: &'a Path,
    /// The local app that inbound traffic goes to; `None` for a client-only workload.
    pub inbound_forward: Option<SocketAddr>,
    /// The workload's mTLS identity (`pylon identity issue` output).
    pub identity_dir: &'a Path,
}

/// The addresses a proxy bound.
#[derive(Clone, Copy, Debug)]
pub struct ListenerAddrs {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
}

type LogTail = Arc<Mutex<VecDeque<String>>>;

/// A started, ready proxy. Dropping it kills the process; [`ProxyProcess::shutdown`] stops it
/// gracefully.
pub struct ProxyProcess {
    pod: String,
    child: Child,
    addrs: ListenerAddrs,
    log_tail: LogTail,
    log_drains: Vec<JoinHandle<()>>,
}

impl ProxyProcess {
    /// Starts a proxy and waits (bounded) until it has logged its listeners and is ready.
    pub async fn spawn(spec: ProxySpec<'_>) -> Result<ProxyProcess> {
        let exe = std::env::current_exe().context("locating the pylon binary to run proxies")?;
        let mut cmd = Command::new(exe);
        cmd.arg("proxy")
            .args(["--inbound-addr", "127.0.0.1:0"])
            .args(["--outbound-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--tap-addr", "127.0.0.1:0"])
            // Bound the drain on POST /shutdown below our own grace period.
            .args(["--shutdown-grace", "3s"])
            // One core each, as a sidecar usually gets.
            .args(["--threads", "1"])
            .arg("--config-dir")
            .arg(spec.config_dir)
            .args(["--workload", spec.workload])
            .args(["--namespace", spec.namespace])
            .args(["--pod", spec.pod])
            .arg("--identity-dir")
            .arg(spec.identity_dir);
        if let Some(app) = spec.inbound_forward {
            cmd.arg("--inbound-forward").arg(app.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Own process group: Ctrl-C in the terminal reaches only the demo, which then
            // stops the proxies in order.
            .process_group(0);
        #[cfg(target_os = "linux")]
        {
            let parent = std::process::id();
            // SAFETY: the closure runs between fork and exec and only calls prctl and getppid,
            // which are async-signal-safe, and allocates nothing.
            unsafe {
                cmd.pre_exec(move || die_with_parent(parent));
            }
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning the proxy for {}", spec.pod))?;

        let log_tail: LogTail = Arc::default();
        let (listening_tx, mut listening_rx) = mpsc::unbounded_channel();
        let mut log_drains = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            log_drains.push(tokio::spawn(drain_log(
                stderr,
                listening_tx.clone(),
                log_tail.clone(),
            )));
        }
        if let Some(stdout) = child.stdout.take() {
            log_drains.push(tokio::spawn(drain_log(
                stdout,
                listening_tx,
                log_tail.clone(),
            )));
        }

        let mut proxy = ProxyProcess {
            pod: spec.pod.to_owned(),
            child,
            addrs: ListenerAddrs {
                inbound: unspecified(),
                outbound: unspecified(),
                admin: unspecified(),
            },
            log_tail,
            log_drains,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        match proxy.await_listeners(&mut listening_rx, deadline).await {
            Ok(addrs) => proxy.addrs = addrs,
            Err(e) => return Err(proxy.failure(e).await),
        }
        if let Err(e) = proxy.await_ready(deadline).await {
            return Err(proxy.failure(e).await);
        }
        Ok(proxy)
    }

    async fn await_listeners(
        &mut self,
        listening: &mut mpsc::UnboundedReceiver<(String, SocketAddr)>,
        deadline: Instant,
    ) -> Result<ListenerAddrs> {
        let (mut inbound, mut outbound, mut admin) = (None, None, None);
        loop {
            if let (Some(inbound), Some(outbound), Some(admin)) = (inbound, outbound, admin) {
                return Ok(ListenerAddrs {
                    inbound,
                    outbound,
                    admin,
                });
            }
            tokio::select! {
                line = listening.recv() => match line {
                    Some((listener, addr)) => match listener.as_str() {
                        "inbound" => inbound = Some(addr),
                        "outbound" => outbound = Some(addr),
                        "admin" => admin = Some(addr),
                        _ => {}
                    },
                    None => {
                        // Its output closed: it is exiting. Report how.
                        let status = timeout(Duration::from_secs(2), self.child.wait()).await;
                        return Err(match status {
                            Ok(Ok(status)) => anyhow!("exited ({status}) before it was listening"),
                            _ => anyhow!("closed its output before it was listening"),
                        });
                    }
                },
                status = self.child.wait() => {
                    let status = status.context("waiting for the proxy")?;
                    bail!("exited ({status}) before it was listening");
                }
                _ = sleep_until(deadline) => {
                    let missing: Vec<&str> = [("inbound", inbound.is_none()), ("outbound", outbound.is_none()), ("admin", admin.is_none())]
                        .into_iter()
                        .filter_map(|(name, missing)| missing.then_some(name))
                        .collect();
                    bail!(
                        "did not log `listening` for {} within {STARTUP_TIMEOUT:?}",
                        missing.join(", ")
                    );
                }
            }
        }
    }

    async fn await_ready(&mut self, deadline: Instant) -> Result<()> {
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("exited ({status}) before it was ready");
            }
            match admin_client::request(
                self.addrs.admin,
                Method::GET,
                "/ready",
                Duration::from_secs(1),
            )
            .await
            {
                Ok((status, _)) if status.is_success() => return Ok(()),
                Ok((status, _)) => last = format!("GET /ready answered {status}"),
                Err(e) => last = format!("{e:#}"),
            }
            sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "was not ready within {STARTUP_TIMEOUT:?} (admin {}: {last})",
            self.addrs.admin
        )
    }

    /// Turns a startup error into one that carries the proxy's last log lines.
    async fn failure(mut self, error: anyhow::Error) -> anyhow::Error {
        let _ = self.child.start_kill();
        // Let the log readers reach the end of the output so the tail is complete.
        for drain in &mut self.log_drains {
            let _ = timeout(Duration::from_millis(500), drain).await;
        }
        anyhow!(
            "the proxy for {} failed to start: {error:#}\n  its last output:\n{}",
            self.pod,
            self.log_tail()
        )
    }

    pub fn addrs(&self) -> ListenerAddrs {
        self.addrs
    }

    /// The proxy's last log lines, indented, for error reports.
    pub fn log_tail(&self) -> String {
        let tail = match self.log_tail.lock() {
            Ok(tail) => tail,
            Err(poisoned) => poisoned.into_inner(),
        };
        if tail.is_empty() {
            return "    (no output)".to_owned();
        }
        tail.iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `Some(description)` if the process has exited (it should not while the demo runs).
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(format!(
                "the proxy for {} exited unexpectedly ({status}); its last output:\n{}",
                self.pod,
                self.log_tail()
            )),
            Err(e) => Some(format!(
                "the proxy for {} cannot be waited on: {e}",
                self.pod
            )),
        }
    }

    /// Stops the proxy: `POST /shutdown` and wait for it to drain, then SIGTERM, then SIGKILL.
    /// Always leaves the process gone; `Err` says it did not stop cleanly.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            return self.expect_clean_exit(status, "before shutdown");
        }
        let asked = admin_client::request(
            self.addrs.admin,
            Method::POST,
            "/shutdown",
            Duration::from_secs(2),
        )
        .await;
        if let Ok(Ok(status)) = timeout(SHUTDOWN_GRACE, self.child.wait()).await {
            return self.expect_clean_exit(status, "after POST /shutdown");
        }
        let why = match asked {
            Ok((status, _)) if !status.is_success() => format!("POST /shutdown answered {status}"),
            Ok(_) => format!("it did not exit within {SHUTDOWN_GRACE:?} of POST /shutdown"),
            Err(e) => format!("POST /shutdown failed: {e:#}"),
        };
        if let Some(pid) = self.child.id().and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: plain kill(2) on our own child's pid, which is not yet reaped (`id()` is
            // Some only until then), so it cannot name another process.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            if let Ok(Ok(_)) = timeout(TERMINATE_GRACE, self.child.wait()).await {
                bail!(
                    "the proxy for {} needed SIGTERM: {why}; its last output:\n{}",
                    self.pod,
                    self.log_tail()
                );
            }
        }
        self.child
            .kill()
            .await
            .with_context(|| format!("killing the proxy for {}", self.pod))?;
        bail!(
            "the proxy for {} had to be killed: {why}; its last output:\n{}",
            self.pod,
            self.log_tail()
        )
    }

    fn expect_clean_exit(&self, status: ExitStatus, when: &str) -> Result<()> {
        if status.success() {
            Ok(())
        } else {
            bail!(
                "the proxy for {} exited {when} with {status}; its last output:\n{}",
                self.pod,
                self.log_tail()
            )
        }
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Runs in the forked child before exec: ask the kernel to SIGTERM this proxy if the demo dies
/// without cleaning up (e.g. SIGKILL), so no proxy outlives it. The signal follows the thread
/// that forked; the demo spawns from runtime threads that live as long as the demo.
#[cfg(target_os = "linux")]
fn die_with_parent(parent: u32) -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid take no pointers.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may have died before the prctl took effect.
        if u32::try_from(libc::getppid()).ok() != Some(parent) {
            return Err(std::io::Error::other(
                "the demo exited while starting a proxy",
            ));
        }
    }
    Ok(())
}

/// Reads a proxy's log stream to the end, so its pipe never fills: reports `listening` lines,
/// keeps the last lines for error reports.
async fn drain_log(
    stream: impl AsyncRead + Unpin,
    listening: mpsc::UnboundedSender<(String, SocketAddr)>,
    tail: LogTail,
) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        if let Some(found) = parse_listening(line) {
            // The receiver is gone once startup is over; that's fine.
            let _ = listening.send(found);
        }
        let mut tail = match tail.lock() {
            Ok(tail) => tail,
            Err(poisoned) => poisoned.into_inner(),
        };
        if tail.len() == LOG_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.chars().take(LOG_LINE_MAX_CHARS).collect());
    }
}

/// `Some((listener, addr))` for a JSON log line `{"message":"listening","listener":..,"addr":..}`
/// (fields at the top level, or under `fields` as tracing-subscriber's JSON format nests them).
fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    let field = |name: &str| {
        event
            .get(name)
            .or_else(|| event.get("fields").and_then(|f| f.get(name)))
            .and_then(|v| v.as_str())
    };
    if field("message")? != "listening" {
        return None;
    }
    let addr = field("addr")?.parse().ok()?;
    Some((field("listener")?.to_owned(), addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listening_lines() {
        let flat = r#"{"timestamp":"2026-11-26T05:00:00Z","level":"INFO","message":"listening","listener":"admin","addr":"127.0.0.1:41234","target":"pylon_proxy"}"#;
        assert_eq!(
            parse_listening(flat),
            Some(("admin".to_owned(), "127.0.0.1:41234".parse().expect("addr")))
        );
        let nested = r#"{"level":"INFO","fields":{"message":"listening","listener":"inbound","addr":"127.0.0.1:4143"}}"#;
        assert_eq!(
            parse_listening(nested),
            Some((
                "inbound".to_owned(),
                "127.0.0.1:4143".parse().expect("addr")
            ))
        );
        assert_eq!(
            parse_listening(r#"{"message":"accepted","addr":"127.0.0.1:1"}"#),
            None
        );
        assert_eq!(
            parse_listening(r#"{"message":"listening","listener":"admin","addr":"nope"}"#),
            None
        );
        assert_eq!(parse_listening("listening on 127.0.0.1:1"), None);
    }
}
