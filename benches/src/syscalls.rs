//! Syscalls per request: `strace -c -f` attached to every process of a path's proxies over a
//! short counted closed-loop run of its own.
//!
//! A separate run from the timed ones: strace stops a proxy at every syscall, so this run's
//! throughput and times mean nothing; only the call counts are kept. Together with the
//! user/system split of the timed runs it tells whether a proxy makes more calls per request or
//! does more per call.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::chain::{Chain, PathKind};
use crate::loadgen::{self, Job, Workload};
use crate::{procstat, report};

/// Requests of the traced run: a few thousand, enough that connection setup and idle wakeups
/// are noise next to the per-request calls.
pub const TRACED_REQUESTS: u64 = 3_000;
/// Connections of the traced run (h2c: streams of one connection). Fewer than the timed runs':
/// this run counts calls, and 8 keep a traced proxy busy without piling up timeouts.
pub const TRACED_SLOTS: usize = 8;
/// The traced run stops here even if the count was not reached (strace can make a proxy
/// very slow); the requests that completed are what the counts are divided by.
const TRACED_LIMIT: Duration = Duration::from_secs(15);
/// Closed-loop warm-up before strace attaches, so the proxies' own connections to each other
/// exist and their setup is not counted.
const WARMUP: Duration = Duration::from_millis(200);
/// How long strace may take to attach to every thread.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long strace may take to detach and write its summary after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Most frequent syscalls kept per row.
const TOP: usize = 5;
/// Rarer than this per request per hop is not "most frequent" (a timer, an allocator's madvise).
const TOP_AT_LEAST: f64 = 0.005;

/// One syscall's count, per request per proxy on the path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyscallCount {
    pub name: String,
    pub per_request_per_hop: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyscallRow {
    /// The traced run (its fields sit at the top level of the row's JSON).
    #[serde(flatten)]
    pub traced: Traced,
    /// Every syscall strace counted on the path's proxies (its `total` line).
    pub syscalls: u64,
    /// `syscalls` per request per proxy.
    pub per_request_per_hop: f64,
    /// The most frequent, most first.
    pub top: Vec<SyscallCount>,
}

/// What `strace -c` counted: calls per syscall, and its `total` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub calls: Vec<(String, u64)>,
    pub total: u64,
}

/// Parses an `strace -c` summary table:
///
/// ```text
/// % time     seconds  usecs/call     calls    errors syscall
/// ------ ----------- ----------- --------- --------- ----------------
///  10.51    0.000492           7        69        19 openat
///   7.41    0.000347          10        34           mprotect
/// ------ ----------- ----------- --------- --------- ----------------
/// 100.00    0.004681           9       493        25 total
/// ```
///
/// Columns are found by the header's names (`-U` can reorder them). `errors` is the one column
/// strace leaves blank (no failed calls), so a row one field short lacks exactly that one. The
/// `total` line must match the sum of the rows, or the summary was cut short.
pub fn parse_summary(text: &str) -> Result<Summary> {
    // Column names of the header in effect; `% time` is one column of two words.
    let mut columns: Option<Vec<&str>> = None;
    let mut calls = Vec::new();
    let mut total = None;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() || fields[0].starts_with("---") {
            continue;
        }
        if fields.contains(&"calls") && fields.contains(&"syscall") {
            let mut names = fields.clone();
            if names.starts_with(&["%", "time"]) {
                names.splice(0..2, ["% time"]);
            }
            columns = Some(names);
            continue;
        }
        let Some(names) = &columns else {
            // Before the table: strace's own messages (attach, detach) when not -q.
            continue;
        };
        let names: Vec<&str> = match fields.len() {
            n if n == names.len() => names.clone(),
            n if n + 1 == names.len() => names.iter().copied().filter(|c| *c != "errors").collect(),
            _ => bail!("strace summary line {line:?} does not fit the header {names:?}"),
        };
        let field = |column: &str| -> Result<&str> {
            names
                .iter()
                .position(|c| *c == column)
                .map(|i| fields[i])
                .with_context(|| format!("no {column:?} column in strace summary line {line:?}"))
        };
        let name = field("syscall")?;
        let count = field("calls")?;
        let count = count.parse::<u64>().with_context(|| {
            format!("strace summary line {line:?}: calls {count:?} is not a number")
        })?;
        if name == "total" {
            // One table per personality (64-bit, 32-bit, x32) when a tracee used several.
            total = Some(total.unwrap_or(0) + count);
        } else {
            calls.push((name.to_owned(), count));
        }
    }
    if columns.is_none() {
        bail!(
            "no strace -c summary header in {:?}",
            first_chars(text, 300)
        );
    }
    let total = total.context("the strace summary has no total line (cut short?)")?;
    let sum: u64 = calls.iter().map(|(_, c)| c).sum();
    if sum != total {
        bail!("the strace summary's rows add up to {sum} calls but its total says {total}");
    }
    Ok(Summary { calls, total })
}

fn first_chars(text: &str, n: usize) -> String {
    text.chars().take(n).collect()
}

/// What a traced run did, besides the summary.
#[derive(Debug, Clone, Serialize)]
pub struct Traced {
    pub workload: Workload,
    pub path: PathKind,
    /// Proxies on the path (the per-hop divisor).
    pub proxies: usize,
    /// Processes strace was attached to (nginx: master and workers), with all their threads.
    pub traced_processes: usize,
    /// Requests that completed while strace was attached (the per-request divisor).
    pub requests: u64,
    pub errors: u64,
    /// How long the traced run took (slow: strace stops the proxies at every call).
    pub seconds: f64,
}

/// The row for a summary: counts divided by requests and proxies, the `TOP` most frequent kept.
pub fn row(traced: Traced, summary: Summary) -> Result<SyscallRow> {
    if traced.requests == 0 {
        bail!("no request completed under strace");
    }
    let per = traced.requests as f64 * traced.proxies.max(1) as f64;
    let mut calls = summary.calls;
    // Most calls first; equal counts by name, so the row is the same run to run.
    calls.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let top = calls
        .into_iter()
        .map(|(name, n)| SyscallCount {
            name,
            per_request_per_hop: n as f64 / per,
        })
        .take_while(|c| c.per_request_per_hop >= TOP_AT_LEAST)
        .take(TOP)
        .collect();
    Ok(SyscallRow {
        traced,
        syscalls: summary.total,
        per_request_per_hop: summary.total as f64 / per,
        top,
    })
}

/// The path's proxies under `strace -c -f` over a counted closed loop of `workload`.
/// strace is killed on every way out (dropping the child kills it), so no proxy stays traced.
pub async fn measure(chain: &Chain, workload: Workload, strace: &Path) -> Result<SyscallRow> {
    let target = chain.target(workload).map_err(anyhow::Error::msg)?;
    let job = Job::new(workload, target);
    // Connections open (and warm) before strace attaches: their accepts and handshakes are not
    // per-request work.
    let slots = loadgen::open_slots(&job, TRACED_SLOTS, 1)
        .await
        .context("opening the traced run's connections")?;
    let (_, slots) = loadgen::closed_loop(job.clone(), slots, WARMUP).await;
    let pids = procstat::with_descendants(chain.pids(workload))?;
    let proxies = report::proxies_on(chain.hops(workload));

    let dir = tempfile::Builder::new()
        .prefix("pylon-bench-strace-")
        .tempdir()
        .context("a directory for strace's output")?;
    let tracer = Tracer::attach(strace, &pids, dir.path()).await?;
    let (stats, slots) =
        loadgen::closed_loop_counted(job, slots, TRACED_LIMIT, TRACED_REQUESTS).await;
    let summary = tracer.stop().await?;
    // Closed only now, so the closing calls are not counted.
    drop(slots);
    if stats.ok == 0 {
        bail!(
            "no request completed under strace ({} errors; first: {})",
            stats.errors,
            stats.first_error.as_deref().unwrap_or("none")
        );
    }
    let traced = Traced {
        workload,
        path: chain.kind,
        proxies,
        traced_processes: pids.len(),
        requests: stats.ok,
        errors: stats.errors,
        seconds: stats.elapsed.as_secs_f64(),
    };
    row(traced, summary)
}

/// A running `strace -c -f -q -p PID...`, killed when dropped.
struct Tracer {
    child: tokio::process::Child,
    pid: u32,
    summary: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Tracer {
    /// Starts strace on `pids` and returns once every thread of them is traced.
    async fn attach(strace: &Path, pids: &[u32], dir: &Path) -> Result<Tracer> {
        if pids.is_empty() {
            bail!("no process to trace");
        }
        let summary = dir.join("summary.txt");
        let log = dir.join("strace.log");
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = tokio::process::Command::new(strace);
        cmd.args(["-c", "-f", "-q", "-o"]).arg(&summary);
        for pid in pids {
            cmd.arg("-p").arg(pid.to_string());
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", strace.display()))?;
        let pid = child.id().context("strace exited at once")?;
        let mut tracer = Tracer {
            child,
            pid,
            summary,
            log,
        };
        // Requests sent before strace holds every thread would go partly uncounted.
        let deadline = tokio::time::Instant::now() + ATTACH_TIMEOUT;
        loop {
            if let Some(status) = tracer.child.try_wait().context("polling strace")? {
                bail!(
                    "strace exited ({status}) before attaching: {}",
                    tracer.log_text()
                );
            }
            if all_traced_by(pids, pid) {
                return Ok(tracer);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "strace did not attach to every thread of {pids:?} within {ATTACH_TIMEOUT:?}: {}",
                    tracer.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGINT (strace detaches and writes its summary), then the parsed summary.
    async fn stop(mut self) -> Result<Summary> {
        let pid = libc::pid_t::try_from(self.pid).context("strace's pid is out of range")?;
        // SAFETY: kill(2) on the child we spawned and have not reaped (we hold its handle).
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sending SIGINT to strace");
        }
        let status = match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.context("waiting for strace")?,
            Err(_) => bail!("strace did not stop within {STOP_TIMEOUT:?} of SIGINT"),
        };
        let text = fs::read_to_string(&self.summary).unwrap_or_default();
        if text.trim().is_empty() {
            bail!("strace wrote no summary ({status}): {}", self.log_text());
        }
        parse_summary(&text).with_context(|| format!("strace's summary ({status})"))
    }

    fn log_text(&self) -> String {
        match fs::read_to_string(&self.log) {
            Ok(t) if !t.trim().is_empty() => first_chars(t.trim(), 600),
            Ok(_) => "(no output)".to_owned(),
            Err(e) => format!("(cannot read {}: {e})", self.log.display()),
        }
    }
}

/// Whether every thread of every one of `pids` has `tracer` as its tracer.
fn all_traced_by(pids: &[u32], tracer: u32) -> bool {
    pids.iter().all(|pid| {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|task| {
            // A thread that exits meanwhile is no thread to wait for.
            fs::read_to_string(task.path().join("status"))
                .map_or(true, |s| tracer_pid(&s) == Some(tracer))
        })
    })
}

/// `TracerPid:` of a `/proc/PID/status` (0 when untraced).
fn tracer_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `strace -c -f -q -o FILE curl -s http://127.0.0.1:1/` on this machine (strace 6.1): rows
    /// with and without errors, separators and the total line.
    const CURL: &str = include_str!("strace_c_sample.txt");

    #[test]
    fn reads_a_real_strace_summary() {
        let s = parse_summary(CURL).expect("parses");
        assert_eq!(s.calls.first(), Some(&("read".to_owned(), 41)));
        // With an errors count and with the errors column blank, the calls are the same column.
        assert!(s.calls.contains(&("openat".to_owned(), 69)));
        assert!(s.calls.contains(&("connect".to_owned(), 3)));
        assert!(s.calls.contains(&("mmap".to_owned(), 152)));
        assert!(s.calls.contains(&("execve".to_owned(), 1)));
        assert_eq!(s.calls.len(), 30);
        assert!(!s
            .calls
            .iter()
            .any(|(n, _)| n == "total" || n.starts_with('-')));
        assert_eq!(s.total, 493);
    }

    #[test]
    fn reads_a_reordered_summary_and_strace_messages_before_it() {
        // `strace -c -U name,calls,errors` on this machine; the errors column is last here.
        let text = "strace: Process 4242 attached\n\
                    syscall              calls    errors\n\
                    ---------------- --------- ---------\n\
                    read                     1          \n\
                    access                   1         1\n\
                    execve                   1          \n\
                    ---------------- --------- ---------\n\
                    total                    3         1\n";
        let s = parse_summary(text).expect("parses");
        assert_eq!(
            s.calls,
            vec![
                ("read".to_owned(), 1),
                ("access".to_owned(), 1),
                ("execve".to_owned(), 1)
            ]
        );
        assert_eq!(s.total, 3);
    }

    #[test]
    fn rejects_what_is_not_a_whole_summary() {
        assert!(
            parse_summary("strace: attach: ptrace(PTRACE_SEIZE, 1): No such process\n").is_err()
        );
        assert!(parse_summary("").is_err());
        // Cut before the total line.
        let cut: String = CURL.lines().take(10).map(|l| format!("{l}\n")).collect();
        assert!(parse_summary(&cut).is_err());
        // A total that does not match its rows.
        let wrong = CURL.replace("       493 ", "       494 ");
        assert!(parse_summary(&wrong).is_err());
        // A calls column that is not a number.
        let garbled = CURL.replace("        41           read", "        4x           read");
        assert!(parse_summary(&garbled).is_err());
    }

    #[test]
    fn divides_by_requests_and_proxies_and_keeps_the_most_frequent() {
        let s = parse_summary(CURL).expect("parses");
        let traced = |requests: u64| Traced {
            workload: Workload::Http1Get,
            path: PathKind::Nginx,
            proxies: 2,
            traced_processes: 3,
            requests,
            errors: 0,
            seconds: 1.0,
        };
        let r = row(traced(100), s.clone()).expect("row");
        assert!((r.per_request_per_hop - 2.465).abs() < 1e-9, "{r:?}");
        let names: Vec<&str> = r.top.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["mmap", "openat", "close", "newfstatat", "read"]);
        assert!((r.top[0].per_request_per_hop - 0.76).abs() < 1e-9);
        // Over 10,000 requests and 2 proxies, mmap is 0.0076 per request per hop and openat
        // 0.00345: below 0.005 a call is not listed.
        let r = row(traced(10_000), s.clone()).expect("row");
        let names: Vec<&str> = r.top.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["mmap"]);
        assert!(row(traced(0), s).is_err());
    }

    /// Whether this process may attach strace to a process it did not start as strace's child.
    fn can_trace() -> Option<std::path::PathBuf> {
        let strace = crate::procs::find_program("strace")?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let scope = fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
            .map_or(0, |s| s.trim().parse().unwrap_or(1));
        (root || scope == 0).then_some(strace)
    }

    #[tokio::test]
    async fn traces_a_busy_process_and_reports_a_failed_attach() {
        let Some(strace) = can_trace() else {
            // CI installs strace (scripts/test) and runs as root: there, a missing one fails.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: strace is missing or may not attach here (scripts/test installs it)"
            );
            eprintln!("skipped: no strace, or not allowed to attach it here");
            return;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        // `yes` writes to /dev/null in a loop: every call is a write.
        let mut busy = tokio::process::Command::new("yes")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("yes");
        let pid = busy.id().expect("pid");
        let tracer = Tracer::attach(&strace, &[pid], dir.path())
            .await
            .expect("attached");
        assert!(all_traced_by(&[pid], tracer.pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let summary = tracer.stop().await.expect("summary");
        assert!(
            summary.calls.iter().any(|(n, c)| n == "write" && *c > 0),
            "{summary:?}"
        );
        // Detached: it runs on, untraced.
        assert_eq!(tracer_pid_of(pid), Some(0));
        busy.kill().await.expect("kill yes");

        // No such process: strace's own words come back.
        let err = Tracer::attach(&strace, &[u32::MAX / 2], dir.path())
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("No such process"), "{err}");
    }

    fn tracer_pid_of(pid: u32) -> Option<u32> {
        tracer_pid(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
    }

    #[test]
    fn reads_the_tracer_pid() {
        let status = "Name:\tnginx\nState:\tS (sleeping)\nTracerPid:\t4242\nUid:\t0\n";
        assert_eq!(tracer_pid(status), Some(4242));
        assert_eq!(tracer_pid("Name:\tx\nTracerPid:\t0\n"), Some(0));
        assert_eq!(tracer_pid("Name:\tx\n"), None);
        // This test process is not traced by pid 1 (or anyone on a plain `cargo test`).
        assert!(!all_traced_by(&[std::process::id()], 1));
    }
}
